"""Named quantized-training recipes: the specs, scaling and estimator of a known method.

A :class:`Recipe` is a named :class:`~jaxquant.QuantConfig` (frozen, hashable). It becomes

* that config (:attr:`Recipe.config`) for ``jq.dot_general(..., config=...)``,
  ``jq.einsum`` and ``jq.conv_general_dilated``, or
* keyword arguments of :func:`jaxquant.dot_general` / :func:`jaxquant.einsum` for plain JAX
  (:meth:`Recipe.dot_kwargs`), or
* :class:`jaxquant.flax.Rule` objects for :func:`jaxquant.flax.quantize_model`
  (:meth:`Recipe.rules`), which add what plain functions cannot hold: delayed-scaling
  state, learned step sizes and per-step PRNG keys.

The weight is the dot's ``rhs`` (a Dense kernel ``(in, out)``), the activation its ``lhs``
(``(..., in)``), the gradient the output cotangent. Specs name the kernel's axes as Dense
lays them out: ``per_channel(-1)`` is one scale per output unit; ``per_block(0, g)`` groups
``g`` consecutive input rows.

=============  ======================  ======================  =================  ===========
name           weight                  activation              gradient           scaling
=============  ======================  ======================  =================  ===========
fp8_current    e4m3 per-tensor         e4m3 per-tensor         e5m2 per-tensor    current
fp8_delayed    e4m3 per-tensor         e4m3 per-tensor         e5m2 per-tensor    delayed (16)
w8a8_int8      int8 per-channel        int8 per-token          float              current
w4a16_int4     int4 per-group (128)    float                   float              current
binary         {-1,+1} * E|W|          float                   float              current
ternary        TWN: 0.7 E|W|           float                   float              current
mxfp8          mxfp8 (e8m0 / 32)       mxfp8 (e8m0 / 32)       mxfp8 e5m2         block
=============  ======================  ======================  =================  ===========

Int8 and fp8 operand pairs run as real int8 / fp8 dots where the backend has them
(:func:`jaxquant.dot_capabilities`); the others (per-group int4, binary, ternary, MX,
whose scales change along the contracted axis) are quantized and dequantized around a
float dot -- "emulated", which is what QAT needs. Binary and ternary weights usually keep
the first and last layers in float: pass their patterns as ``keep_float``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

from jaxquant._src.calibration import mean_abs, twn
from jaxquant._src.checks import check_int, describe
from jaxquant._src.config import QuantConfig, check_config_fields
from jaxquant._src.granularity import per_block, per_channel, per_token
from jaxquant._src.spec import QuantSpec

_INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named quantized-training method (see the module table): a name and a
    :class:`~jaxquant.QuantConfig` (:attr:`config`), whose fields it holds.

    Attributes:
      name: the registry name.
      weight, act, grad: :class:`QuantSpec` of the weight (dot ``rhs``), activation
        (``lhs``) and output gradient, or None for float.
      scaling: ``"current"`` (per-batch scales) or ``"delayed"`` (amax history: Flax rules
        keep it in the ``"quant_state"`` collection).
      history_len, margin: delayed-scaling amax history length and power-of-two margin.
      ste: straight-through estimator: ``"plain"``, ``"clipped"`` or ``"lsq"`` (learned
        step size, Flax rules only).
      description: one line for listings.
      mode: ``"auto"``, ``"real"`` or ``"emulate"`` (:func:`jaxquant.dot_general`).

    Example:
      >>> import jaxquant as jq
      >>> r = jq.recipes.get("w8a8_int8")
      >>> r.config == jq.QuantConfig(weight=r.weight, act=r.act)
      True
    """

    name: str
    weight: QuantSpec | None
    act: QuantSpec | None
    grad: QuantSpec | None
    scaling: Literal["current", "delayed"] = "current"
    history_len: int = 16
    margin: int = 0
    ste: Literal["plain", "clipped", "lsq"] = "plain"
    description: str = ""
    mode: Literal["auto", "real", "emulate"] = "auto"

    def __post_init__(self) -> None:
        # The checks of QuantConfig (and so of jaxquant.flax.Rule, which rules() builds): a
        # bad field is refused here, where the recipe is written, not at its first use.
        if not isinstance(self.name, str):
            raise TypeError(f"Recipe.name must be a str, got {describe(self.name)}.")
        check_config_fields(self, "Recipe")
        if not isinstance(self.description, str):
            raise TypeError(f"Recipe.description must be a str, got {describe(self.description)}.")

    @property
    def config(self) -> QuantConfig:
        """The recipe's :class:`~jaxquant.QuantConfig`: what
        ``jq.dot_general(..., config=recipe.config)`` and ``Rule(pattern, recipe.config)``
        take."""
        return QuantConfig(
            weight=self.weight,
            act=self.act,
            grad=self.grad,
            mode=self.mode,
            scaling=self.scaling,
            history_len=self.history_len,
            margin=self.margin,
            ste=self.ste,
        )

    def replace(self, **changes: Any) -> Recipe:
        """A copy with fields changed, e.g. learned step sizes (which need a per-tensor
        activation spec): ``recipe.replace(ste="lsq", act=jq.QuantSpec("int8"))``."""
        return dataclasses.replace(self, **changes)

    def dot_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`jaxquant.dot_general` / :func:`jaxquant.einsum`
        (current scaling; ``scaling="delayed"`` and ``ste="lsq"`` need state, which
        :meth:`rules` provides through Flax). ``config=recipe.config`` is the same."""
        if self.scaling != "current" or self.ste == "lsq":
            raise ValueError(
                f"Recipe {self.name!r}: scaling={self.scaling!r}, ste={self.ste!r} keeps state "
                "between steps; use recipe.rules() with jaxquant.flax.quantize_model, or "
                "thread a jq.delayed_scaling state yourself."
            )
        kw: dict[str, Any] = {"lhs_spec": self.act, "rhs_spec": self.weight, "grad_spec": self.grad}
        if self.ste != "plain":
            kw["ste"] = self.ste
        if self.mode != "auto":
            kw["mode"] = self.mode
        return kw

    def rules(self, pattern: str = ".*", *, keep_float: Sequence[str] = ()) -> tuple[Any, ...]:
        """:class:`jaxquant.flax.Rule` objects: ``keep_float`` patterns first (left in
        float), then ``Rule(pattern, recipe.config)``.

        Example:
          >>> import jaxquant as jq
          >>> rules = jq.recipes.get("ternary").rules(keep_float=["layers_0", "layers_2"])
          >>> [(r.pattern, r.quantizes) for r in rules]
          [('layers_0', False), ('layers_2', False), ('.*', True)]
        """
        from jaxquant._src.flax.rules import Rule  # imports no flax itself

        if isinstance(keep_float, str):
            keep_float = (keep_float,)
        out = [Rule(p) for p in keep_float]
        out.append(Rule(pattern, self.config))
        return tuple(out)


def _fp8(scaling: Literal["current", "delayed"], history_len: int, margin: int) -> Recipe:
    return Recipe(
        f"fp8_{scaling}",
        weight=QuantSpec("e4m3"),
        act=QuantSpec("e4m3"),
        grad=QuantSpec("e5m2"),
        scaling=scaling,
        history_len=history_len,
        margin=margin,
        description=(
            "FP8 training (Micikevicius et al. 2022): e4m3 forward, e5m2 gradients, "
            f"per-tensor {scaling} scaling"
        ),
    )


def fp8_current() -> Recipe:
    """FP8 training with per-batch (current) per-tensor scales: e4m3 operands, e5m2
    gradients. Real fp8 GEMMs on Hopper / Ada / Blackwell.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> cfg = jq.recipes.fp8_current().config
      >>> x = jnp.array([[1.0, -2.0, 0.5, 4.0]])
      >>> w = jnp.array([[0.5, -1.0], [0.25, 2.0], [1.0, 0.0], [-0.5, 0.75]])
      >>> y = jq.dot_general(x, w, (((1,), (0,)), ((), ())), config=cfg)
      >>> [round(v, 3) for v in y[0].tolist()], (x @ w)[0].tolist()
      ([-1.5, -2.143], [-1.5, -2.0])

    References:
      Micikevicius et al., "FP8 Formats for Deep Learning", https://arxiv.org/abs/2209.05433
    """
    return _fp8("current", 16, 0)


def fp8_delayed(history_len: int = 16, margin: int = 0) -> Recipe:
    """FP8 training with Transformer Engine's delayed scaling of the operands (amax
    history of ``history_len`` steps, ``margin`` powers of two of headroom); the gradient
    keeps a current scale.

    The amax history is state kept between steps, so the recipe runs through Flax rules
    (:meth:`Recipe.rules` with :func:`jaxquant.flax.quantize_model`), or with a
    :func:`jaxquant.delayed_scaling` state threaded by hand; :meth:`Recipe.dot_kwargs`
    refuses it.

    Example:
      >>> import jaxquant as jq
      >>> r = jq.recipes.fp8_delayed(history_len=4)
      >>> r.scaling, r.history_len, r.config.scaling
      ('delayed', 4, 'delayed')
      >>> [rule.pattern for rule in r.rules("Dense_.*")]
      ['Dense_.*']

    References:
      Micikevicius et al., "FP8 Formats for Deep Learning", https://arxiv.org/abs/2209.05433
    """
    return _fp8("delayed", history_len, margin)


def w8a8_int8() -> Recipe:
    """Int8 QAT: per-output-channel int8 weights, per-token int8 activations, real
    int8 x int8 -> int32 dots where the backend has them.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> cfg = jq.recipes.w8a8_int8().config
      >>> x = jnp.array([[1.0, -2.0, 0.5, 4.0]])
      >>> w = jnp.array([[0.5, -1.0], [0.25, 2.0], [1.0, 0.0], [-0.5, 0.75]])
      >>> y = jq.dot_general(x, w, (((1,), (0,)), ((), ())), config=cfg)
      >>> [round(v, 3) for v in y[0].tolist()]  # float: [-1.5, -2.0]
      [-1.512, -2.024]

    References:
      Jacob et al., "Quantization and Training of Neural Networks for Efficient
      Integer-Arithmetic-Only Inference", https://arxiv.org/abs/1712.05877
    """
    return Recipe(
        "w8a8_int8",
        weight=QuantSpec("int8", per_channel(-1)),
        act=QuantSpec("int8", per_token(-1)),
        grad=None,
        description="int8 weights (per output channel) x int8 activations (per token)",
    )


def w4a16_int4(group_size: int = 128) -> Recipe:
    """Weight-only int4 QAT with one scale per ``group_size`` input rows of the kernel
    (GPTQ / AWQ-style groups); activations stay in float.

    Args:
      group_size: input rows per scale; it must divide the kernel's input size.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> r = jq.recipes.w4a16_int4(group_size=2)
      >>> w = jnp.array([[0.5, -1.0], [0.25, 2.0], [1.0, 0.0], [-0.5, 0.75]])
      >>> q = jq.quantize(w, r.weight)
      >>> q.scale.shape  # (input groups, 1 row each, output channels)
      (2, 1, 2)

    References:
      Frantar et al., "GPTQ", https://arxiv.org/abs/2210.17323;
      Lin et al., "AWQ", https://arxiv.org/abs/2306.00978
    """
    group_size = check_int(group_size, "w4a16_int4: group_size", lo=1, hi=_INT32_MAX)
    return Recipe(
        "w4a16_int4",
        weight=QuantSpec("int4", per_block(0, group_size)),
        act=None,
        grad=None,
        description=f"int4 weights, one scale per {group_size} input rows; float activations",
    )


def binary() -> Recipe:
    """Binary weights ``sign(W) * E|W|`` per output channel (BWN, Rastegari et al. 2016).

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> w = jnp.array([[0.5, -1.0], [0.25, 2.0], [1.0, 0.0], [-0.5, 0.75]])
      >>> jq.fake_quant(w, jq.recipes.binary().weight).tolist()  # E|W| per column
      [[0.5625, -0.9375], [0.5625, 0.9375], [0.5625, 0.9375], [-0.5625, 0.9375]]

    References:
      Rastegari et al., "XNOR-Net", https://arxiv.org/abs/1603.05279
    """
    return Recipe(
        "binary",
        weight=QuantSpec("binary", per_channel(-1), mean_abs()),
        act=None,
        grad=None,
        description="binary weights sign(W) * E|W| per output channel (BWN)",
    )


def ternary(threshold: float = 0.7) -> Recipe:
    """Ternary weights (TWN, Li & Liu 2016): 0 below ``threshold * E|W|``, else
    ``+-E[|W| : kept]``, per output channel.

    Args:
      threshold: the fraction of ``E|W|`` below which a weight becomes 0.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> w = jnp.array([[0.5, -1.0], [0.25, 2.0], [1.0, 0.0], [-0.5, 0.75]])
      >>> w_hat = jq.fake_quant(w, jq.recipes.ternary().weight).tolist()
      >>> [[round(v, 3) for v in row] for row in w_hat]
      [[0.667, -1.25], [0.0, 1.25], [0.667, 0.0], [-0.667, 1.25]]

    References:
      Li & Liu, "Ternary Weight Networks", https://arxiv.org/abs/1605.04711
    """
    return Recipe(
        "ternary",
        weight=QuantSpec("ternary", per_channel(-1), twn(threshold)),
        act=None,
        grad=None,
        description=f"ternary weights (TWN, threshold {threshold:g} E|W|) per output channel",
    )


def mxfp8() -> Recipe:
    """OCP MX fp8: e4m3 elements sharing an e8m0 scale per 32 values along the contracted
    axis (activations along their last axis, weights along the kernel's input axis),
    e5m2 MX gradients (blocks along the output's last axis). Emulated: MX GEMMs need
    Blackwell-class hardware.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> r = jq.recipes.mxfp8()
      >>> r.act.format.name, r.act.scale_format.name, r.grad.format.name
      ('mxfp8', 'float8_e8m0fnu', 'mxfp8_e5m2')
      >>> x, w = jnp.full((1, 64), 0.5), jnp.full((64, 32), 0.25)  # blocks of 32
      >>> y = jq.dot_general(x, w, (((1,), (0,)), ((), ())), config=r.config)
      >>> y.shape, float(y[0, 0])
      ((1, 32), 8.0)

    References:
      OCP Microscaling Formats (MX) v1.0; Rouhani et al., https://arxiv.org/abs/2310.10537
    """
    return Recipe(
        "mxfp8",
        weight=QuantSpec("mxfp8", per_block(0, 32)),
        act=QuantSpec("mxfp8", per_block(-1, 32)),
        grad=QuantSpec("mxfp8_e5m2", per_block(-1, 32)),
        description="MX fp8 (e4m3 elements, e8m0 scale per 32) operands and gradients",
    )


_REGISTRY: dict[str, Callable[..., Recipe]] = {
    "fp8_current": fp8_current,
    "fp8_delayed": fp8_delayed,
    "w8a8_int8": w8a8_int8,
    "w4a16_int4": w4a16_int4,
    "binary": binary,
    "ternary": ternary,
    "mxfp8": mxfp8,
}


def names() -> tuple[str, ...]:
    """The registered recipe names.

    Example:
      >>> import jaxquant as jq
      >>> jq.recipes.names()
      ('fp8_current', 'fp8_delayed', 'w8a8_int8', 'w4a16_int4', 'binary', 'ternary', 'mxfp8')
    """
    return tuple(_REGISTRY)


def get(name: str, **kwargs: Any) -> Recipe:
    """The recipe ``name`` (see :func:`names`), built with ``kwargs``
    (e.g. ``get("w4a16_int4", group_size=32)``).

    Example:
      >>> import jaxquant as jq
      >>> r = jq.recipes.get("w8a8_int8")
      >>> r.weight.format.name, r.act.format.name, r.grad
      ('int8', 'int8', None)
    """
    if isinstance(name, Recipe):
        return name
    try:
        factory = _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"jq.recipes.get: unknown recipe {name!r}; known: {', '.join(_REGISTRY)}."
        ) from None
    try:
        return factory(**kwargs)
    except TypeError as e:
        raise TypeError(f"jq.recipes.get({name!r}): {e}") from None
