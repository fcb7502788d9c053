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
nvfp4          nvfp4 16x16 tiles       nvfp4 1x16              nvfp4 1x16, SR     2-level
mxfp4          mxfp4 1x32              mxfp4 1x32              mxfp4 1x32, SR     block
=============  ======================  ======================  =================  ===========

The 4-bit recipes (:func:`nvfp4`, :func:`mxfp4`) add what 4-bit training needs: backward
products that requantize their operands along their own contracted axes
(``QuantConfig.backward="requantize"``), random Hadamard transforms inside chosen
products (:class:`jaxquant.rotations.DotHadamard`) and stochastic rounding of the
gradient, each a switch of the recipe's function, so that an ablation is one argument.

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
from jaxquant._src.granularity import per_block, per_block_2d, per_channel, per_token
from jaxquant._src.hadamard import DotHadamard
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
      backward: ``"saved"`` or ``"requantize"`` (:class:`~jaxquant.QuantConfig`).
      hadamard: a :class:`~jaxquant.rotations.DotHadamard` or None.

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
    backward: Literal["saved", "requantize"] = "saved"
    hadamard: DotHadamard | None = None

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
            backward=self.backward,
            hadamard=self.hadamard,
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
        if self.backward != "saved":
            kw["backward"] = self.backward
        if self.hadamard is not None:
            kw["hadamard"] = self.hadamard
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
    history of ``history_len`` steps, ``margin`` powers of two of headroom). The output
    gradient keeps a current scale unless the model is quantized with
    ``jaxquant.flax.quantize_model(..., delayed_grad=True)`` (its history is then carried
    out of the backward pass and written by :func:`jaxquant.optax.overwrite_with_gradient`).

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


_GEMMS = ("fwd", "dgrad", "wgrad")


def _check_flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{where} must be True or False, got {describe(value)}.")
    return value


def _check_gemms(gemms: Any, where: str) -> tuple[str, ...]:
    if isinstance(gemms, str):
        gemms = (gemms,)
    if not isinstance(gemms, tuple | list):
        raise TypeError(
            f"{where} must be a tuple of product names from {_GEMMS} (or () for none), got "
            f"{describe(gemms)}."
        )
    gemms = tuple(gemms)
    bad = [g for g in gemms if g not in _GEMMS]
    if bad:
        raise ValueError(
            f"{where}: unknown product(s) {bad}; choose from {_GEMMS} (or () for none)."
        )
    return gemms


def _fp4(
    name: str,
    fmt: str,
    block: int,
    *,
    weight_2d: bool,
    hadamard: Sequence[str],
    random_hadamard: bool,
    hadamard_block: int,
    stochastic_grad: bool,
    requantize: bool,
    description: str,
) -> Recipe:
    where = f"jq.recipes.{name.split('_')[0]}"
    weight_2d = _check_flag(weight_2d, f"{where}: weight_2d")
    random_hadamard = _check_flag(random_hadamard, f"{where}: random_hadamard")
    stochastic_grad = _check_flag(stochastic_grad, f"{where}: stochastic_grad")
    requantize = _check_flag(requantize, f"{where}: requantize")
    gemms = _check_gemms(hadamard, f"{where}: hadamard")
    hadamard_block = check_int(hadamard_block, f"{where}: hadamard_block", lo=1)
    try:
        rht = (
            DotHadamard(gemms=gemms, block=hadamard_block, random=random_hadamard)
            if gemms
            else None
        )
    except ValueError as e:  # DotHadamard names its own field; say which switch it was
        raise ValueError(f"{where}: hadamard_block={hadamard_block}: {e}") from None
    # per_block(size): blocks along the operand's contracted axis in each product (a Dense
    # kernel's input axis, an activation's features), whatever the layer's layout.
    blocks = per_block(block)
    return Recipe(
        name,
        weight=QuantSpec(fmt, per_block_2d(block) if weight_2d else blocks),
        act=QuantSpec(fmt, blocks),
        # The output gradient along its last axis (the ``dgrad`` product's contraction);
        # ``backward="requantize"`` moves its blocks to the tokens for ``wgrad``.
        grad=QuantSpec(
            fmt, per_block(-1, block), rounding="stochastic" if stochastic_grad else "nearest"
        ),
        backward="requantize" if requantize else "saved",
        hadamard=rht,
        description=description,
    )


def nvfp4(
    *,
    weight_2d: bool = True,
    hadamard: Sequence[str] = ("wgrad",),
    random_hadamard: bool = True,
    hadamard_block: int = 16,
    stochastic_grad: bool = True,
    requantize: bool = True,
) -> Recipe:
    """NVFP4 training, the recipe of NVIDIA's 12B / 10T-token run (arXiv 2509.25149):
    e2m1 values with an E4M3 scale per 16 and a float32 scale per tensor
    (:func:`jaxquant.formats.nvfp4_format`), and the paper's four techniques, each a
    switch:

    * ``weight_2d``: weights scaled per 16 x 16 tile (:func:`jaxquant.per_block_2d`), so
      the forward and the transposed ``dgrad`` product use the same quantized weight
      (``False``: 1 x 16 blocks along each product's contracted axis, as activations);
    * ``hadamard``: the products whose operands get a 16 x 16 random Hadamard transform
      (:class:`jaxquant.rotations.DotHadamard`), the weight gradient's only by default;
      ``()`` for none; ``random_hadamard=False`` drops the random signs (the deterministic
      transform of arXiv 2605.09825);
    * ``stochastic_grad``: the output gradient rounded stochastically (unbiased), weights
      and activations to nearest;
    * ``requantize``: each backward product quantizes its operands along its own
      contracted axes (what FP4 tensor cores multiply; ``False``: the forward's saved
      operands, not a product real hardware can run with 1-D blocks).

    The fourth technique of the paper, a few sensitive layers in high precision, is
    :meth:`Recipe.rules`' ``keep_float`` (by name, or as
    :func:`jaxquant.flax.worst_layers` picks from the per-layer error measured during
    training, :func:`jaxquant.flax.layer_errors`).
    Every quantized product is emulated: H100 / H200 have no FP4 tensor cores.

    Example:
      >>> import jaxquant as jq
      >>> r = jq.recipes.nvfp4()
      >>> print(r.weight.granularity, r.act.granularity, r.grad.rounding, r.backward)
      per_block_2d(16, axes=(-2, -1)) per_block(16) stochastic requantize
      >>> r.hadamard.gemms, r.weight.scale_format.name
      (('wgrad',), 'float8_e4m3fn')
      >>> jq.recipes.nvfp4(hadamard=(), stochastic_grad=False).hadamard is None
      True

    References:
      NVIDIA, "Pretraining Large Language Models with NVFP4",
      https://arxiv.org/abs/2509.25149
    """
    return _fp4(
        "nvfp4",
        "nvfp4",
        16,
        weight_2d=weight_2d,
        hadamard=hadamard,
        random_hadamard=random_hadamard,
        hadamard_block=hadamard_block,
        stochastic_grad=stochastic_grad,
        requantize=requantize,
        description="NVFP4 (e2m1, e4m3 per 16, f32 per tensor): 2-D weights, RHT on wgrad, SR "
        "gradients",
    )


def mxfp4(
    *,
    weight_2d: bool = False,
    hadamard: Sequence[str] = ("dgrad", "wgrad"),
    random_hadamard: bool = True,
    hadamard_block: int = 32,
    stochastic_grad: bool = True,
    requantize: bool = True,
) -> Recipe:
    """MXFP4 training with stochastic rounding and random Hadamard transforms (Tseng et
    al. 2025, arXiv 2502.20586): e2m1 values sharing an e8m0 scale per 32 (OCP MX),
    the gradient rounded stochastically (unbiased) and the operands of the backward
    products rotated by a random Hadamard transform, which bounds the variance that
    stochastic rounding adds at a block's outliers.

    The switches are :func:`nvfp4`'s, so an ablation, or both formats at an equal recipe
    (``jq.recipes.mxfp4(weight_2d=True, hadamard=("wgrad",), hadamard_block=16)``), is
    one argument. Differences from the paper: its forward products stay in BF16 (here
    every product is MXFP4, as in the full-pipeline study of arXiv 2605.09825; keep the
    forward in float with a separate rule if needed) and it scales the gradient by 3/4
    before stochastic rounding to avoid overflow (here the OCP scale
    ``2^(floor(log2 amax) - 2)`` is kept and values past 6 saturate).

    Example:
      >>> import jaxquant as jq
      >>> r = jq.recipes.mxfp4()
      >>> r.act.format.name, r.act.scale_format.name, r.hadamard.gemms, r.hadamard.block
      ('mxfp4', 'float8_e8m0fnu', ('dgrad', 'wgrad'), 32)

    References:
      Tseng et al., "Training LLMs with MXFP4", https://arxiv.org/abs/2502.20586;
      OCP Microscaling Formats (MX) v1.0
    """
    return _fp4(
        "mxfp4",
        "mxfp4",
        32,
        weight_2d=weight_2d,
        hadamard=hadamard,
        random_hadamard=random_hadamard,
        hadamard_block=hadamard_block,
        stochastic_grad=stochastic_grad,
        requantize=requantize,
        description="MXFP4 (e2m1, e8m0 per 32): SR gradients, RHT on the backward products",
    )


_REGISTRY: dict[str, Callable[..., Recipe]] = {
    "fp8_current": fp8_current,
    "fp8_delayed": fp8_delayed,
    "w8a8_int8": w8a8_int8,
    "w4a16_int4": w4a16_int4,
    "binary": binary,
    "ternary": ternary,
    "mxfp8": mxfp8,
    "nvfp4": nvfp4,
    "mxfp4": mxfp4,
}


def names() -> tuple[str, ...]:
    """The registered recipe names.

    Example:
      >>> import jaxquant as jq
      >>> print(*jq.recipes.names())
      fp8_current fp8_delayed w8a8_int8 w4a16_int4 binary ternary mxfp8 nvfp4 mxfp4
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
