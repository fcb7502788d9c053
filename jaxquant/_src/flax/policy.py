"""Mixed-precision policy for Flax models: parameter, compute and output dtypes.

A :class:`Policy` (jmp's idea, applied to Flax's own ``dtype`` / ``param_dtype`` fields):

* ``param_dtype``: the dtype parameters are stored (and updated) in, e.g. float32;
* ``compute_dtype``: the dtype layers compute in (Flax's ``dtype``), e.g. bfloat16;
* ``output_dtype``: the dtype of the model's output, e.g. float32 for the loss.

Every layer that has both ``dtype`` and ``param_dtype`` (Dense, DenseGeneral, Einsum,
Conv, Embed, LayerNorm, attention...) gets them; layers without them run as written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, overload

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant._src.checks import describe
from jaxquant._src.types import PyTree


@dataclasses.dataclass(frozen=True)
class Policy:
    """Parameter / compute / output dtypes (frozen, hashable).

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from jaxquant.flax import Policy, apply_policy
      >>> model = apply_policy(nn.Dense(3), Policy(compute_dtype=jnp.bfloat16))
      >>> variables = model.init(jax.random.key(0), jnp.ones((1, 2)))
      >>> variables["params"]["kernel"].dtype, model.apply(variables, jnp.ones((1, 2))).dtype
      (dtype('float32'), dtype('float32'))
    """

    # any floating dtype-like; stored as the np.dtype (__post_init__)
    param_dtype: jax.typing.DTypeLike = jnp.float32
    compute_dtype: jax.typing.DTypeLike = jnp.bfloat16
    output_dtype: jax.typing.DTypeLike = jnp.float32

    def __post_init__(self) -> None:
        for name in ("param_dtype", "compute_dtype", "output_dtype"):
            value = getattr(self, name)
            try:
                # np.dtype(None) is float64: None would silently mean float64 parameters.
                dt = None if value is None else np.dtype(value)
            except TypeError:
                dt = None
            if dt is None or not jnp.issubdtype(dt, jnp.floating):
                error = TypeError if dt is None else ValueError
                raise error(
                    f"Policy.{name} must be a floating dtype such as jnp.float32 or "
                    f"jnp.bfloat16, got {describe(value)}."
                )
            object.__setattr__(self, name, dt)

    def cast_output(self, tree: PyTree) -> PyTree:
        """Floating leaves of ``tree`` in ``output_dtype``."""

        def cast(x: Any) -> Any:
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
                return x.astype(self.output_dtype)
            return x

        return jax.tree.map(cast, tree)


def check_policy(policy: Any, where: str) -> None:
    if not isinstance(policy, Policy):
        raise TypeError(
            f"{where}: policy must be a jq.flax.Policy, got {describe(policy)}. A dtype goes "
            "inside one: Policy(compute_dtype=jnp.bfloat16)."
        )


def _has_dtypes(m: Any) -> bool:
    return hasattr(m, "dtype") and hasattr(m, "param_dtype")


class PolicyModule(nn.Module):
    """A Linen model run under a :class:`Policy` (same variables as the model).

    Build it with :func:`apply_policy`.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from jaxquant.flax import Policy, apply_policy
      >>> policy = Policy(param_dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16)
      >>> model = apply_policy(nn.Dense(3), policy)
      >>> type(model).__name__
      'PolicyModule'
      >>> variables = model.init(jax.random.key(0), jnp.ones((1, 2)))
      >>> variables["params"]["kernel"].dtype, model.apply(variables, jnp.ones((1, 2))).dtype
      (dtype(bfloat16), dtype('float32'))
    """

    inner: nn.Module  # not `module`: QuantizedModule's field, which may wrap this one
    policy: Policy

    def __post_init__(self) -> None:
        if not isinstance(self.inner, nn.Module):
            raise TypeError(
                f"PolicyModule: inner must be a flax.linen.Module, got {describe(self.inner)}."
            )
        check_policy(self.policy, "PolicyModule")
        super().__post_init__()

    def setup(self) -> None:
        nn.share_scope(self, self.inner)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        policy = self.policy

        def interceptor(
            next_fun: Callable[..., Any],
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
            context: nn.module.InterceptorContext,
        ) -> Any:
            m = context.module
            if context.method_name != "__call__" or not _has_dtypes(m):
                return next_fun(*args, **kwargs)
            if m.dtype == policy.compute_dtype and m.param_dtype == policy.param_dtype:
                return next_fun(*args, **kwargs)
            q = m.clone(parent=m.scope, dtype=policy.compute_dtype, param_dtype=policy.param_dtype)
            return q(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            out = self.inner(*args, **kwargs)
        return policy.cast_output(out)


class NnxPolicyModule(nnx.Module):
    """An NNX model under a :class:`Policy`: the same model object (changed in place),
    with its output cast to the policy's output dtype.

    Build it with :func:`apply_policy`; ``.module`` is the model.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxquant.flax import Policy, apply_policy
      >>> layer = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> model = apply_policy(layer, Policy(param_dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16))
      >>> model.module is layer, layer.kernel[...].dtype
      (True, dtype(bfloat16))
      >>> model(jnp.ones((1, 2))).dtype  # the output dtype: float32 by default
      dtype('float32')
    """

    def __init__(self, module: nnx.Module, policy: Policy) -> None:
        if not isinstance(module, nnx.Module):
            raise TypeError(
                f"NnxPolicyModule: module must be a flax.nnx.Module, got {describe(module)}"
                + (" (a Linen module: use PolicyModule)." if isinstance(module, nn.Module) else ".")
            )
        check_policy(policy, "NnxPolicyModule")
        self.module = module
        self.policy = policy

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.policy.cast_output(self.module(*args, **kwargs))


@overload
def apply_policy(model: nn.Module, policy: Policy) -> PolicyModule: ...


@overload
def apply_policy(model: nnx.Module, policy: Policy) -> NnxPolicyModule: ...


def apply_policy(model: nn.Module | nnx.Module, policy: Policy) -> PolicyModule | NnxPolicyModule:
    """Run ``model`` under ``policy``.

    * Linen: returns a :class:`PolicyModule` with the model's variables (``init`` creates
      parameters in ``param_dtype``; existing ones are used as given).
    * NNX: sets ``dtype`` / ``param_dtype`` of every layer that has them and casts their
      ``nnx.Param`` values to ``param_dtype`` in place, then returns an
      :class:`NnxPolicyModule` that wraps the (same) model and casts its output.

    Composes with :func:`quantize_model` in either order: the quantized dot receives the
    layer's compute-dtype operands.

    Args:
      model: a Linen module or an NNX model.
      policy: the :class:`Policy`.

    Returns:
      A :class:`PolicyModule` (Linen) or :class:`NnxPolicyModule` (NNX).

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from jaxquant.flax import Policy, apply_policy
      >>> policy = Policy(param_dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16,
      ...                 output_dtype=jnp.bfloat16)
      >>> model = apply_policy(nn.Dense(3), policy)
      >>> variables = model.init(jax.random.key(0), jnp.ones((1, 2)))
      >>> model.apply(variables, jnp.ones((1, 2))).dtype
      dtype(bfloat16)
    """
    check_policy(policy, "apply_policy")
    if isinstance(model, nn.Module):
        return PolicyModule(model, policy)
    if isinstance(model, nnx.Module):
        for _, node in nnx.iter_graph(model):
            if not isinstance(node, nnx.Module) or not _has_dtypes(node):
                continue
            # _has_dtypes checked the layer has both; nnx.Module itself declares neither.
            node.dtype = policy.compute_dtype  # type: ignore[attr-defined]
            node.param_dtype = policy.param_dtype  # type: ignore[attr-defined]
            for _, var in nnx.iter_graph(node):
                if isinstance(var, nnx.Param) and jnp.issubdtype(var[...].dtype, jnp.floating):
                    var.set_value(var[...].astype(policy.param_dtype))
        return NnxPolicyModule(model, policy)
    raise TypeError(
        f"apply_policy: expected a flax.linen.Module or flax.nnx.Module, got "
        f"{type(model).__name__}."
    )
