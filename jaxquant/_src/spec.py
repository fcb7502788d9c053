"""QuantSpec: everything static about one quantizer, frozen and hashable."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from jaxquant._src import calibration as cal
from jaxquant._src import formats
from jaxquant._src import granularity as gran
from jaxquant._src.checks import check_bool

Rounding = Literal["nearest", "stochastic"]
IntGrid = Literal["restricted", "full"]
# The widths whose default (``int_grid="auto"``) is the full grid: papers/int_grids measured
# it better than the restricted grid at 2 and 3 bits (RTN loss increase halved at int2, -0.031
# nats/byte per channel at int3), not at 4 bits (tied per channel, +0.0018 worse per group)
# nor 8 (within noise).
FULL_GRID_BITS = (2, 3)
_SCALE_FORMATS = {
    "float32": "float32",
    "bfloat16": "bfloat16",
    "float16": "float16",
    "float8_e8m0fnu": "float8_e8m0fnu",
}


@dataclasses.dataclass(frozen=True, init=False)
class QuantSpec:
    """A quantizer's static configuration.

    ``q = clip(round(x * (1/s)) + z, qmin, qmax)``, ``x_hat = (q - z) * s``, where the scale
    ``s`` (and zero point ``z``) come from ``calibration`` over the groups of
    ``granularity``, rounded to ``scale_format``.

    Args:
      format: a :class:`~jaxquant.formats.Format` or its name (``"int8"``, ``"fp8"``,
        ``"nf4"``, ``"mxfp4"``, ``"e3m2"``...).
      granularity: :func:`per_tensor` (default), :func:`per_channel`, :func:`per_block`,
        :func:`per_token`. MX formats force ``per_block(-1, 32)`` unless given another
        per-block granularity. The layout-relative forms ``per_channel()`` and
        ``per_block(size)`` are accepted here and bound to explicit axes by the contraction
        that quantizes the operand; array-level functions (``quantize``, ``fake_quant``)
        refuse them with a ValueError.
      calibration: how the range is chosen (:func:`absmax` default, :func:`mean_std`,
        :func:`percentile`, :func:`mse`, :func:`kl`, :func:`fixed`, :func:`minmax`), or
        ``None`` for no scaling at all: a plain (saturating) cast, ``s = 1``.
      symmetric: ``True``: ``z = 0`` and, for signed ints, the grid ``int_grid``.
        ``False``: zero-point quantization (integer formats only), float 0 maps exactly to
        the integer ``z``; ``s = (hi - lo) / (2^b - 1)`` uses all ``2^b`` codes.
      rounding: ``"nearest"`` (half to even) or ``"stochastic"`` (needs ``key=``).
      scale_format: ``"float32"`` (default), ``"bfloat16"``, ``"float16"`` or ``"e8m0"``
        (power of two, rounded up so nothing extra clips; MX formats use the OCP rule).
        Block formats bring their own: e8m0 for OCP MX, e4m3 (plus a float32 scale per
        tensor) for NVFP4.
      int_grid: how a symmetric signed int grid covers the calibrated range
        ``[-amax, amax]`` (``qmax = 2^(b-1) - 1``):

        * ``"auto"`` (default): the grid ``papers/int_grids`` measured best for the width:
          ``"full"`` for int2 and int3 (round-to-nearest's loss increase on a byte LM halved
          at int2, a third lower at int3), ``"restricted"`` for int4 and wider (int4: no
          measurable gain from the extra level; int8: within noise, and the grid int8
          toolchains use). Also ``"restricted"`` where the full grid does not apply or was
          not measured: asymmetric and unsigned specs, non-int formats, int1,
          ``calibration=None`` (a plain cast) and ``narrow_range=False`` (an option of the
          restricted grid). The stored field is the resolved grid, so
          ``QuantSpec("int3") == QuantSpec("int3", int_grid="full")``.
        * ``"restricted"``: ``s = amax / qmax`` onto ``[-qmax, qmax]``, ``2^b - 1``
          levels, so negation is exact. The right choice at 8 bits, where ``-128`` buys
          little and breaks symmetry.
        * ``"full"``: all ``2^b`` codes ``[-2^(b-1), qmax]`` with ``s = amax / (qmax + 0.5)``
          (Qwix's symmetric integer grid): ``[-amax, amax]`` maps onto
          ``[-(qmax + 0.5), qmax + 0.5]``, so the step is finer (at 3 bits ``amax / 3.5``
          instead of ``amax / 3``) and no value is off by more than half a step: ``+amax``
          rounds to ``qmax``; ``-amax`` lies on the tie between ``-qmax`` and ``-2^(b-1)``
          (half to even picks ``-2^(b-1)`` when ``x * (1/s)`` is exactly the tie), and a
          clipping calibration (percentile, mse...) sends the values below its ``-amax``
          to ``-2^(b-1)``. A lower error than the restricted grid at 2-4 bits on
          Gaussian-like data. Signed integer formats only; a given ``scale=`` is used as
          it is. With error-compensating methods (GPTQ, AWQ's clipping search) it was also
          the better int4 grid on the PTQ benchmark (``benchmarks/peers_ptq.py``): ask for
          it explicitly there.
      narrow_range: with ``int_grid="restricted"``, whether the code ``-2^(b-1)`` is excluded
        (default True). False allows it, leaving the scale ``amax / qmax`` unchanged: only
        values clipped below ``-amax`` (a clipping calibration, a given scale) reach it. The
        full grid always has it: there ``narrow_range`` does not apply and reads False.
      saturate: out-of-range values become the largest finite value (default). False
        follows ml_dtypes: overflow to Inf where the format has it, else NaN.
      rng: the stochastic-rounding noise source, ``"hash"`` (a per-element counter hash,
        fused by XLA into the quantizer, default) or ``"threefry"`` (``jax.random.bits``).

    Raises:
      ValueError: for unknown names and invalid combinations, naming the field and the fix.

    Example:
      >>> import jaxquant as jq
      >>> jq.QuantSpec("int8", granularity=jq.per_channel(-1)).format.name
      'int8'
      >>> print(jq.QuantSpec("int4", jq.per_block(32)))  # blocks along the contraction axis
      QuantSpec(int4, per_block(32), absmax)
      >>> full = jq.QuantSpec("int3", jq.per_channel(-1))  # int_grid="auto": full at 3 bits
      >>> print(full)
      QuantSpec(int3, per_channel(-1,), absmax, full-grid)
      >>> full.qrange, full.scale_divisor  # 8 levels, s = amax / 3.5
      ((-4.0, 3.0), 3.5)
      >>> jq.QuantSpec("int4").int_grid, jq.QuantSpec("int8").qrange  # restricted from 4 bits
      ('restricted', (-127.0, 127.0))
    """

    format: formats.Format
    granularity: gran.Granularity
    calibration: cal.Calibration | None
    symmetric: bool
    rounding: Rounding
    scale_format: formats.Format
    narrow_range: bool
    saturate: bool
    rng: Literal["hash", "threefry"]
    int_grid: IntGrid

    def __init__(
        self,
        format: str | formats.Format,
        granularity: gran.Granularity | None = None,
        calibration: cal.Calibration | None = cal.AbsMax(),  # noqa: B008 - frozen, hashable
        *,
        symmetric: bool = True,
        rounding: Rounding = "nearest",
        scale_format: str | formats.Format = "float32",
        narrow_range: bool = True,
        saturate: bool = True,
        rng: Literal["hash", "threefry"] = "hash",
        int_grid: IntGrid | Literal["auto"] = "auto",
    ) -> None:
        symmetric = check_bool(symmetric, "QuantSpec.symmetric")
        if not isinstance(int_grid, str) or int_grid not in ("auto", "restricted", "full"):
            raise ValueError(
                f"QuantSpec.int_grid must be 'auto', 'restricted' or 'full', got {int_grid!r}."
            )
        narrow_range = check_bool(narrow_range, "QuantSpec.narrow_range")
        saturate = check_bool(saturate, "QuantSpec.saturate")
        fmt = formats.resolve(format, "QuantSpec.format")
        sfmt = formats.resolve(scale_format, "QuantSpec.scale_format")
        block_scale = fmt.block_scale if fmt.kind == "mx" else None
        if sfmt.name not in _SCALE_FORMATS and sfmt != block_scale:
            raise ValueError(
                f"QuantSpec.scale_format: {sfmt.name!r} is not a scale format; use one of "
                "'float32', 'bfloat16', 'float16', 'e8m0'."
            )
        if fmt.name == "float8_e8m0fnu":
            raise ValueError(
                "QuantSpec.format: e8m0 has no zero and no sign; it is a scale format. Use "
                "scale_format='e8m0' with an element format, or an MX format such as 'mxfp8'."
            )
        if granularity is None:
            granularity = (
                gran.PerBlock(-1, fmt.block_size) if fmt.kind == "mx" else gran.PerTensor()
            )
        if not isinstance(
            granularity,
            gran.PerTensor | gran.PerChannel | gran.PerBlock | gran.PerBlock2D | gran.PerToken,
        ):
            raise TypeError(
                "QuantSpec.granularity: expected per_tensor(), per_channel(axes), "
                "per_channel(), per_block(axis, size), per_block(size), per_block_2d(size) or "
                "per_token(), got "
                f"{granularity!r}."
            )
        if fmt.kind == "mx":
            if not isinstance(granularity, gran.PerBlock | gran.PerBlock2D):
                raise ValueError(
                    f"QuantSpec.granularity: {fmt.name} shares one scale per block; use "
                    f"per_block(axis, {fmt.block_size}) (the default) instead of {granularity}."
                )
            if calibration is None:
                raise ValueError(f"QuantSpec.calibration: {fmt.name} needs a calibration.")
            if not symmetric:
                raise ValueError(
                    f"QuantSpec.symmetric=False: {fmt.name} scales its blocks symmetrically "
                    "(no zero point); drop symmetric=False."
                )
            if fmt.tensor_scale and not isinstance(calibration, cal.AbsMax):
                raise ValueError(
                    f"QuantSpec.calibration: {fmt.name}'s two-level scales follow "
                    f"Transformer Engine's absmax rule; use calibration=jq.absmax() (the "
                    f"default), got {calibration!r}."
                )
            # The block scale format is part of the format: OCP MX's e8m0, NVFP4's e4m3.
            sfmt = fmt.block_scale if fmt.block_scale is not None else formats.get("e8m0")
        if calibration is not None and not isinstance(
            calibration,
            cal.AbsMax
            | cal.MeanStd
            | cal.Percentile
            | cal.MSE
            | cal.KL
            | cal.Fixed
            | cal.MeanAbs
            | cal.TWN,
        ):
            raise TypeError(
                "QuantSpec.calibration: expected absmax(), minmax(), mean_std(k), "
                f"percentile(p), mse(), kl(), fixed(amax), mean_abs(k), twn(t) or None, got "
                f"{calibration!r}."
            )
        if isinstance(calibration, cal.TWN) and fmt.name != "ternary":
            raise ValueError(
                f"QuantSpec.calibration: twn() thresholds onto {{-1, 0, +1}}; it needs the "
                f"'ternary' format, got {fmt.name}. Use QuantSpec('ternary', "
                "calibration=jq.twn())."
            )
        if not symmetric:
            if fmt.kind != "int":
                raise ValueError(
                    f"QuantSpec.symmetric=False: zero-point quantization needs an integer "
                    f"format, got {fmt.name}. Use symmetric=True, or an int/uint format."
                )
            if calibration is None:
                raise ValueError("QuantSpec: symmetric=False needs a calibration, e.g. minmax().")
            if isinstance(calibration, cal.KL):
                raise ValueError("QuantSpec: kl() calibration is symmetric only; use minmax().")
        if not isinstance(rounding, str) or rounding not in ("nearest", "stochastic"):
            raise ValueError(
                f"QuantSpec.rounding must be 'nearest' or 'stochastic', got {rounding!r}."
            )
        if not isinstance(rng, str) or rng not in ("hash", "threefry"):
            raise ValueError(f"QuantSpec.rng must be 'hash' or 'threefry', got {rng!r}.")
        if fmt.kind == "int" and not saturate:
            raise ValueError(
                "QuantSpec.saturate=False: integers have no Inf/NaN to overflow to (a raw cast "
                "would wrap); integer formats always saturate. Drop saturate=False."
            )
        auto = int_grid == "auto"
        if auto:
            int_grid = default_int_grid(fmt, symmetric, calibration, narrow_range)
        if int_grid == "full":
            _check_full_grid(fmt, symmetric)
            narrow_range = False  # the full grid has -2^(b-1): one stored value per grid
        if fmt.kind == "int" and fmt.bits == 1 and fmt.signed and symmetric and narrow_range:
            raise ValueError(
                "QuantSpec: int1's restricted symmetric range is {0}; use 'binary' for {-1,+1}, "
                "or narrow_range=False."
            )
        set_ = object.__setattr__
        set_(self, "format", fmt)
        set_(self, "granularity", granularity)
        set_(self, "calibration", calibration)
        set_(self, "symmetric", symmetric)
        set_(self, "rounding", rounding)
        set_(self, "scale_format", sfmt)
        set_(self, "narrow_range", narrow_range)
        set_(self, "saturate", saturate)
        set_(self, "rng", rng)
        set_(self, "int_grid", int_grid)
        # Not a dataclass field (equality, hashing and serialization see the resolved grid):
        # whether the grid came from "auto", so that replace() chooses it again.
        set_(self, "_auto_grid", auto)

    # ---------------------------------------------------------------- derived, static
    @property
    def stochastic(self) -> bool:
        return self.rounding == "stochastic"

    @property
    def element(self) -> formats.Format:
        """The format each value is rounded to (the element format of an MX format)."""
        if self.format.kind == "mx":
            assert self.format.element is not None
            return self.format.element
        return self.format

    @property
    def qrange(self) -> tuple[float, float]:
        """(qmin, qmax) of the quantized values (in the scaled domain)."""
        f = self.element
        if f.kind == "int":
            if not f.signed:
                return 0.0, f.max
            if self.symmetric and self.narrow_range:
                return -f.max, f.max
            return f.min, f.max  # the full grid, narrow_range=False, asymmetric
        if f.kind == "codebook":
            return f.min, f.max
        return (-f.max if f.signed else 0.0), f.max

    @property
    def scale_divisor(self) -> float:
        """The scaled value a symmetric spec's calibrated amax maps to: ``s = amax / d``.

        ``qmax`` (the grid's largest value: ``2^(b-1) - 1``, a float format's largest
        finite value, a codebook's largest entry), or ``qmax + 0.5`` for
        ``int_grid="full"``. MX formats use the OCP power-of-two rule instead.
        """
        qmax = float(self.qrange[1])
        return qmax + 0.5 if self.int_grid == "full" else qmax

    def replace(self, **changes: object) -> QuantSpec:
        """A copy with some fields changed (validated again).

        Changing ``int_grid`` alone also resets ``narrow_range`` to its default. A spec
        whose grid came from ``int_grid="auto"`` chooses it again for the copy's format and
        options unless ``int_grid`` is given: ``QuantSpec("int3").replace(format="int8")``
        is ``QuantSpec("int8")`` (restricted), and ``.replace(symmetric=False, ...)`` is
        asymmetric rather than an error about the full grid.
        """
        fields: dict[str, Any] = {
            "format": self.format,
            "granularity": self.granularity,
            "calibration": self.calibration,
            "symmetric": self.symmetric,
            "rounding": self.rounding,
            "scale_format": self.scale_format,
            "narrow_range": self.narrow_range,
            "saturate": self.saturate,
            "rng": self.rng,
            "int_grid": self.int_grid,
        }
        if getattr(self, "_auto_grid", False) and "int_grid" not in changes:
            fields["int_grid"] = "auto"
            if self.int_grid == "full" and "narrow_range" not in changes:
                fields["narrow_range"] = True  # the full grid's False is not the user's
        elif changes.get("int_grid", self.int_grid) != self.int_grid:
            # full -> restricted must not keep the full grid's False (a third grid).
            fields["narrow_range"] = True
        fields.update(changes)
        fmt = fields.pop("format")
        return QuantSpec(fmt, **fields)

    def __str__(self) -> str:
        parts = [self.format.name, str(self.granularity), str(self.calibration or "no-scale")]
        if not self.symmetric:
            parts.append("asymmetric")
        if self.int_grid == "full":
            parts.append("full-grid")
        if self.stochastic:
            parts.append("stochastic")
        if self.scale_format.name != "float32":
            parts.append(f"scale={self.scale_format.name}")
        return "QuantSpec(" + ", ".join(parts) + ")"


def default_int_grid(
    fmt: formats.Format, symmetric: bool, calibration: cal.Calibration | None, narrow_range: bool
) -> IntGrid:
    """The grid ``int_grid="auto"`` picks: ``"full"`` for symmetric signed int2 / int3 with a
    calibration (``papers/int_grids``' table), else ``"restricted"``.

    ``narrow_range=False`` is an option of the restricted grid (its scale, one more code), so
    asking for it keeps the restricted grid; ``calibration=None`` is a plain cast, where no
    scale is chosen and the table does not apply.

    Example:
      >>> from jaxquant._src import formats
      >>> [default_int_grid(formats.get(f"int{b}"), True, cal.AbsMax(), True) for b in (2, 3, 4)]
      ['full', 'full', 'restricted']
    """
    if (
        fmt.kind == "int"
        and fmt.signed
        and fmt.bits in FULL_GRID_BITS
        and symmetric
        and narrow_range
        and calibration is not None
    ):
        return "full"
    return "restricted"


def _check_full_grid(fmt: formats.Format, symmetric: bool) -> None:
    """``int_grid="full"`` is a symmetric signed integer grid: refuse everything else."""
    if fmt.kind != "int" or not fmt.signed:
        raise ValueError(
            f"QuantSpec.int_grid='full' is the all-codes grid of a signed integer format, got "
            f"{fmt.name} ({'unsigned int' if fmt.kind == 'int' else fmt.kind}). Use a signed "
            "int format such as 'int4', or drop int_grid."
        )
    if not symmetric:
        raise ValueError(
            "QuantSpec.int_grid='full' is for symmetric specs; asymmetric (symmetric=False) "
            "grids already use all 2^b codes. Drop int_grid."
        )
    if fmt.bits < 2:
        raise ValueError(
            "QuantSpec.int_grid='full': int1's full grid {-1, 0} with s = 2 amax rounds "
            "every value to 0. Use 'binary' for {-1, +1}."
        )
