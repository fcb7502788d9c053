"""What every post-training method of :mod:`jaxquant.ptq` returns."""

from __future__ import annotations

from typing import Any, NamedTuple


class PTQResult(NamedTuple):
    """A post-training method's result.

    Attributes:
      variables: Linen: the new variables (the input untouched); NNX: the model, modified
        in place.
      report: layer path -> the method's numbers for that layer.
      skipped: layer path -> why the method could not apply to it.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxquant as jq
      >>> from jaxquant.flax import Rule
      >>> model = nn.Dense(8)
      >>> x = jax.random.normal(jax.random.key(0), (16, 32))
      >>> variables = model.init(jax.random.key(1), x)
      >>> rule = Rule(".*", weight=jq.QuantSpec("int4", jq.per_channel()))
      >>> result = jq.ptq.gptq(model, [x], variables, rules=rule)
      >>> type(result).__name__, list(result.report), result.skipped
      ('PTQResult', [''], {})
      >>> result.variables["params"]["kernel"].spec.format.name  # served as a QArray
      'int4'
    """

    variables: Any
    report: dict[str, dict[str, Any]]
    skipped: dict[str, str]
