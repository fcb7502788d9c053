"""QuantConfig: how one contraction is quantized, frozen, keyword-only and hashable.

One object describes a quantized ``dot_general`` / ``einsum`` / ``conv_general_dilated``
whole: the specs of its operands by role (the *weight*, a parameter or something computed
from parameters only; the *activation*, anything else), the spec of the output gradient, how
the scales are chosen over time, the straight-through estimator and the compute mode. It is
the same object everywhere:

* ``jq.dot_general(lhs, rhs, dn, config=cfg)`` (and ``jq.einsum`` / ``jq.conv_general_dilated``):
  the activation spec applies to ``lhs``, the weight spec to ``rhs``;
* ``jq.flax.Rule(pattern, cfg)``: a Rule is a path pattern plus a config; inside a matched
  module every contraction is quantized with it, the operand that comes from the parameters
  taking ``weight`` and every other operand ``act``;
* ``jq.recipes.get(name)``: a named config.

Names follow the roles, not the positions: ``weight`` / ``act`` / ``grad`` here, in
:class:`~jaxquant.flax.Rule` and in the recipes alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from jaxquant._src.checks import check_int, describe
from jaxquant._src.granularity import PerChannel, PerTensor
from jaxquant._src.hadamard import DotHadamard
from jaxquant._src.spec import QuantSpec

Mode = Literal["auto", "real", "emulate"]
Scaling = Literal["current", "delayed"]
Ste = Literal["plain", "clipped", "lsq"]
Backward = Literal["saved", "requantize"]

MODES = ("auto", "real", "emulate")
SCALINGS = ("current", "delayed")
STES = ("plain", "clipped", "lsq")
BACKWARDS = ("saved", "requantize")
ROLES = ("weight", "act", "grad")
_INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """How one contraction is quantized (see the module docstring).

    Args:
      weight: :class:`~jaxquant.QuantSpec` of the weight operand (a Dense kernel, the
        embedding matrix of a tied head, ``kernel.T`` inside a custom layer), or None to
        keep it in float.
      act: spec of the activation operand(s); in a contraction of two activations
        (attention's ``q @ k``) both operands take it.
      grad: spec of the output gradient in the backward pass (e.g. e5m2).
      mode: ``"auto"`` (real int8 / fp8 compute where :func:`jaxquant.dot_capabilities`
        says so), ``"real"`` or ``"emulate"``.
      scaling: ``"current"`` (each step's own amax) or ``"delayed"`` (an amax history,
        :func:`jaxquant.delayed_scaling`; the state lives in Flax variables, so delayed
        configs need :func:`jaxquant.flax.quantize_model` or a state you thread yourself).
      history_len, margin: of the delayed scaling.
      ste: ``"plain"``, ``"clipped"`` (zero gradient where an operand saturated) or
        ``"lsq"`` (learned step size, Esser et al. 2019, https://arxiv.org/abs/1902.08153;
        Flax only: the steps are parameters).
      backward: the operands of the two backward products. ``"saved"``: the forward's
        quantized operands, multiplied by the quantized output gradient
        (``dx = Q(dy) Q(w)^T``, ``dw = Q(x)^T Q(dy)``). ``"requantize"``: what a block-scaled
        (FP4 / MX) GEMM can run: each backward product quantizes its operands with their
        blocks along *its* contracted axes, from the float values. ``dgrad`` (``dx``)
        contracts the weight's output axes: the gradient and the weight get 1-D blocks
        along them; ``wgrad`` (``dw``) contracts the tokens: the gradient and the activation
        get 1-D blocks along those (Transformer Engine's NVFP4 recipe: forward ``x`` 1x16
        along K and ``w`` 16x16, dgrad ``dy`` 1x16 along N, wgrad ``dy^T`` and ``x^T`` 1x16
        along the tokens). Only 1-D block specs (``per_block``, MX formats) move; a 2-D
        block weight (:func:`~jaxquant.per_block_2d`) is reused as it is, the same values as
        the forward (NVFP4's reason for 2-D weights), and per-tensor / per-channel operands
        are reused as with ``"saved"``. The float operands are kept for the backward pass
        only where they are requantized.
      hadamard: a :class:`~jaxquant.rotations.DotHadamard`: random (or deterministic)
        Hadamard transforms of both operands of chosen products along their contracted
        axis before quantization, or None.

    Raises:
      TypeError / ValueError: a field of the wrong type or value, naming it and the fix.

    Example:
      >>> import jaxquant as jq
      >>> cfg = jq.QuantConfig(weight=jq.QuantSpec("int8", jq.per_channel(-1)),
      ...                      act=jq.QuantSpec("int8"))
      >>> cfg.quantizes, cfg.stateful
      (True, False)
      >>> cfg.replace(scaling="delayed", weight=jq.QuantSpec("int8")).stateful
      True
    """

    weight: QuantSpec | None = None
    act: QuantSpec | None = None
    grad: QuantSpec | None = None
    mode: Mode = "auto"
    scaling: Scaling = "current"
    history_len: int = 16
    margin: int = 0
    ste: Ste = "plain"
    backward: Backward = "saved"
    hadamard: DotHadamard | None = None

    def __post_init__(self) -> None:
        check_config_fields(self, "QuantConfig")

    # ----------------------------------------------------------------- derived facts

    @property
    def specs(self) -> tuple[QuantSpec | None, QuantSpec | None, QuantSpec | None]:
        """``(weight, act, grad)``."""
        return (self.weight, self.act, self.grad)

    @property
    def quantizes(self) -> bool:
        """Whether anything is quantized (a config without specs keeps float)."""
        return any(s is not None for s in self.specs)

    @property
    def needs_key(self) -> bool:
        """Whether a spec rounds stochastically (a PRNG key per call)."""
        return any(s is not None and s.stochastic for s in self.specs)

    @property
    def stateful(self) -> bool:
        """Whether the config keeps state across calls (delayed scales, learned steps) or
        draws PRNG keys: Flax keeps those in variables."""
        return self.scaling == "delayed" or self.ste == "lsq" or self.needs_key

    def replace(self, **changes: Any) -> QuantConfig:
        """A copy with fields changed (checked like the constructor)."""
        return dataclasses.replace(self, **changes)

    def deterministic(self) -> QuantConfig:
        """The config with stochastic specs rounding to nearest (evaluation)."""

        def det(spec: QuantSpec | None) -> QuantSpec | None:
            if spec is not None and spec.stochastic:
                return spec.replace(rounding="nearest")
            return spec

        return self.replace(weight=det(self.weight), act=det(self.act), grad=det(self.grad))


def check_config_fields(obj: Any, where: str) -> None:
    """Check (and normalise) the config fields of ``obj`` (a QuantConfig or a Recipe, which
    names the same fields); errors name ``where.field``."""
    for name in ROLES:
        spec = getattr(obj, name)
        if spec is not None and not isinstance(spec, QuantSpec):
            raise TypeError(
                f"{where}.{name} must be a jq.QuantSpec or None (float), got {describe(spec)}. "
                "Build one, e.g. jq.QuantSpec('int8')."
            )
    for name, choices in (
        ("mode", MODES),
        ("scaling", SCALINGS),
        ("ste", STES),
        ("backward", BACKWARDS),
    ):
        # getattr: a Recipe names the fields it has (backward, hadamard came later).
        value = getattr(obj, name, choices[0])
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"{where}.{name} must be one of {choices}, got {describe(value)}.")
    hadamard = getattr(obj, "hadamard", None)
    if hadamard is not None and not isinstance(hadamard, DotHadamard):
        raise TypeError(
            f"{where}.hadamard must be a jq.rotations.DotHadamard or None, got "
            f"{describe(hadamard)}; e.g. jq.rotations.DotHadamard(gemms=('wgrad',))."
        )
    history_len = check_int(obj.history_len, f"{where}.history_len", lo=1, hi=_INT32_MAX)
    # 2^margin scales a float32 amax: jq.delayed_scaling's bound.
    margin = check_int(obj.margin, f"{where}.margin (powers of two of headroom)")
    if not -126 <= margin <= 126:
        raise ValueError(
            f"{where}.margin must be in -126..126, got {margin}. Transformer Engine uses 0."
        )
    object.__setattr__(obj, "history_len", history_len)
    object.__setattr__(obj, "margin", margin)
    if obj.scaling == "delayed" and obj.ste == "lsq":
        raise ValueError(
            f"{where}: scaling='delayed' and ste='lsq' both choose the operands' scales; pick one."
        )
    for name in ("weight", "act") if obj.scaling == "delayed" or obj.ste == "lsq" else ():
        spec = getattr(obj, name)
        if spec is None:
            continue
        bad_gran = not isinstance(spec.granularity, PerTensor | PerChannel) or (
            name == "act" and not isinstance(spec.granularity, PerTensor)
        )
        if spec.calibration is None or spec.format.kind == "mx" or bad_gran:
            what = "scaling='delayed'" if obj.scaling == "delayed" else "ste='lsq'"
            raise ValueError(
                f"{where}.{name}: {what} keeps one scale per group across steps, so the "
                f"groups must not depend on the batch or on blocks; got {spec}. Use "
                "per_tensor() (or, for the weight, per_channel over the kernel's output "
                "axes)."
            )


def check_config(config: Any, where: str) -> QuantConfig | None:
    """``config`` if it is a QuantConfig or None, else a TypeError naming ``where``."""
    if config is None or isinstance(config, QuantConfig):
        return config
    raise TypeError(
        f"{where}: config must be a jq.QuantConfig or None, got {describe(config)}. Build one: "
        "jq.QuantConfig(weight=jq.QuantSpec('int8'), act=jq.QuantSpec('int8'))."
    )
