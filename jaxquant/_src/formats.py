"""Number formats: one registry of every format jaxquant can quantize to.

A :class:`Format` is a frozen, hashable description of a set of representable values and
how they are encoded in bits. Four kinds exist:

* ``"float"`` -- IEEE-like ``ExMy`` floats (sign, ``e`` exponent bits, ``m`` mantissa bits,
  a bias, subnormals). Every float type that ``ml_dtypes`` ships is registered with its
  ``dtype``; :func:`float_format` builds *any* other ``ExMy`` format, emulated in float32
  (bit-for-bit equal to ml_dtypes wherever both have the format).
* ``"int"`` -- two's-complement ``int1``..``int8``, ``int16``, and ``uint1``..``uint8``.
* ``"codebook"`` -- a sorted table of values: NF4 (QLoRA), binary ``{-1, +1}``,
  ternary ``{-1, 0, +1}``.
* ``"mx"`` -- block-scaled formats: an element format plus one shared scale per block.
  OCP Microscaling (MXFP8/6/4, MXINT8) shares a power-of-two (``e8m0``) scale per block of
  32 elements; NVIDIA's NVFP4 (:func:`nvfp4_format`) shares an E4M3 scale per block of 16
  and adds a second, float32 scale per tensor (``block_scale`` and ``tensor_scale`` set).

Float encodings differ in how they spend their top exponent code (``nan_style``):

==========  ===================================================  ======================
style       meaning                                              examples
==========  ===================================================  ======================
``ieee``    top exponent reserved: mantissa 0 is Inf, else NaN   fp32, fp16, bf16, e5m2
``fn``      finite + NaN: only ``S.1..1.1..1`` is NaN, no Inf    e4m3fn
``fnuz``    finite, unsigned zero: ``1.0..0.0..0`` is NaN        e4m3fnuz, e5m2fnuz
``none``    finite only: every code is a number                  fp6, fp4 (OCP MX)
==========  ===================================================  ======================
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Literal, TypeVar

import ml_dtypes
import numpy as np

from jaxquant._src.checks import check_bool, check_int, describe

Kind = Literal["float", "int", "codebook", "mx"]
NanStyle = Literal["ieee", "fn", "fnuz", "none"]
_T = TypeVar("_T")

# QLoRA's NormalFloat4 (arXiv 2305.14314, Appendix E): quantiles of N(0, 1) normalised to
# [-1, 1], asymmetric so that 0 is exact. papers/nf4 rebuilds them from the definition.
NF4_VALUES: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


def _element_property(fn: Callable[[Format], _T]) -> property:
    """A property that an MX format takes from its element format."""
    name = fn.__name__

    @functools.wraps(fn)
    def get(self: Format) -> _T:
        if self.kind == "mx":
            return getattr(self.element, name)
        return fn(self)

    return property(get)


@dataclasses.dataclass(frozen=True)
class Format:
    """A number format: its value set, its encoding, and its properties.

    Instances are immutable and hashable, so they can be closed over or passed as static
    arguments under ``jax.jit``. Build them with :func:`get`, :func:`float_format`,
    :func:`int_format`; don't call the constructor directly.

    Attributes:
      name: canonical name (``"float8_e4m3fn"``, ``"int4"``, ``"nf4"``, ``"mxfp8"``).
      kind: ``"float"``, ``"int"``, ``"codebook"`` or ``"mx"``.
      bits: bits per stored element (for ``mx``, the element's bits; see ``bits_per_value``).
      exp_bits, man_bits, bias: the float layout (0 for non-floats).
      nan_style: how the float spends its top codes (see module docstring).
      signed: whether negative values exist.
      dtype: the numpy/ml_dtypes storage dtype when one exists, else ``None`` (emulated).
      codebook: the sorted values of a codebook format.
      element: the element format of an ``mx`` format.
      block_size: elements per shared scale of an ``mx`` format.
      block_scale: the format of an ``mx`` format's block scales; None for OCP's ``e8m0``
        (NVFP4: ``float8_e4m3fn``).
      tensor_scale: whether an ``mx`` format also has a float32 scale per tensor (NVFP4's
        two-level scaling).
      scale_floor: the smallest block scale before rounding to ``block_scale`` (0: none,
        Transformer Engine; torchao uses 2^-6, ModelOpt 2^-9; see :func:`nvfp4_format`).

    Example:
      >>> import jaxquant as jq
      >>> f = jq.formats.get("e4m3")
      >>> f
      Format('float8_e4m3fn')
      >>> f.kind, f.bits, f.exp_bits, f.man_bits, f.bias, f.nan_style
      ('float', 8, 4, 3, 7, 'fn')
      >>> f.max, f.min_normal, f.min_subnormal, f.eps
      (448.0, 0.015625, 0.001953125, 0.125)
    """

    name: str
    kind: Kind
    bits: int
    exp_bits: int = 0
    man_bits: int = 0
    bias: int = 0
    nan_style: NanStyle = "none"
    signed: bool = True
    dtype: np.dtype | None = dataclasses.field(default=None, compare=False)
    codebook: tuple[float, ...] | None = None
    element: Format | None = None
    block_size: int = 0
    block_scale: Format | None = None
    tensor_scale: bool = False
    scale_floor: float = 0.0

    def __post_init__(self) -> None:
        # The builders validate layouts; this catches direct construction with the wrong
        # kind of value, which would otherwise fail far away inside the quantizer.
        _check_name(self.name, "Format(name)")
        if self.kind not in ("float", "int", "codebook", "mx"):
            raise ValueError(
                f"Format(kind): must be 'float', 'int', 'codebook' or 'mx', got {self.kind!r}. "
                "Build formats with float_format, int_format, codebook_format or mx_format."
            )
        check_int(self.bits, "Format(bits)", lo=1, hi=32)
        check_bool(self.signed, "Format(signed)")

    def __repr__(self) -> str:
        return f"Format({self.name!r})"

    # ---------------------------------------------------------------- properties
    @property
    def is_float(self) -> bool:
        return self.kind == "float"

    @property
    def is_int(self) -> bool:
        return self.kind == "int"

    @property
    def has_inf(self) -> bool:
        return self.kind == "float" and self.nan_style == "ieee"

    @property
    def has_nan(self) -> bool:
        return self.kind == "float" and self.nan_style != "none"

    @_element_property
    def emax(self) -> int:
        """Unbiased exponent of the largest finite value (floats); 0 otherwise."""
        if self.kind != "float":
            return 0
        top = 2**self.exp_bits - 1  # the all-ones exponent field
        if self.nan_style == "ieee" or (self.nan_style == "fn" and self.man_bits == 0):
            top -= 1  # Inf/NaN own the whole top field (e8m0: 0xFF is NaN)
        return top - self.bias

    @property
    def emin(self) -> int:
        """Unbiased exponent of the smallest normal value (floats); 0 otherwise."""
        if self.kind != "float":
            return 0
        if self.man_bits == 0:  # e8m0: no subnormals, field 0 is a normal number
            return -self.bias
        return 1 - self.bias

    @_element_property
    def max(self) -> float:
        """Largest finite value."""
        if self.kind == "int":
            return float(2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1)
        if self.kind == "codebook":
            assert self.codebook is not None
            return float(max(self.codebook))
        m = self.man_bits
        frac_codes = 2**m - 1  # largest mantissa field
        if self.nan_style == "fn" and m > 0:
            frac_codes -= 1  # S.1..1.1..1 is NaN
        return float((1 + frac_codes / 2**m) * 2.0**self.emax)

    @property
    def min(self) -> float:
        """Smallest (most negative) finite value."""
        if self.kind == "int":
            return float(-(2 ** (self.bits - 1)) if self.signed else 0)
        if self.kind == "codebook":
            assert self.codebook is not None
            return float(min(self.codebook))
        return -self.max if self.signed else (self.min_subnormal if self.kind == "float" else 0.0)

    @_element_property
    def min_normal(self) -> float:
        """Smallest positive normal value (1 for integers, a codebook's least ``|v| > 0``)."""
        if self.kind == "float":
            return float(2.0**self.emin)
        return self.min_subnormal

    @_element_property
    def min_subnormal(self) -> float:
        """Smallest positive value."""
        if self.kind == "float":
            return float(2.0 ** (self.emin - self.man_bits))
        if self.kind == "int":
            return 1.0
        assert self.codebook is not None
        return float(min(abs(v) for v in self.codebook if v != 0))

    @_element_property
    def eps(self) -> float:
        """Distance from 1 to the next larger value (floats: 2^-man_bits); 1 for integers."""
        if self.kind == "float":
            return float(2.0**-self.man_bits)
        if self.kind == "int":
            return 1.0
        assert self.codebook is not None
        above = [v for v in self.codebook if v > 1.0]
        below = sorted(v for v in self.codebook if v < 1.0)
        return float(above[0] - 1.0) if above else float(1.0 - below[-1])

    @_element_property
    def decimal_digits(self) -> float:
        """Significant decimal digits: (man_bits + 1) * log10(2) for floats."""
        if self.kind == "float":
            return (self.man_bits + 1) * math.log10(2)
        if self.kind == "int":
            return (self.bits - (1 if self.signed else 0)) * math.log10(2)
        return math.log10(len(self.codebook or ()))

    @property
    def num_codes(self) -> int:
        """Number of bit patterns (2^bits; 3 for ternary)."""
        if self.kind == "codebook":
            assert self.codebook is not None
            return len(self.codebook)
        return 2**self.bits

    @property
    def num_finite(self) -> int:
        """Number of distinct finite values (+0 and -0 counted once)."""
        if self.kind != "float":
            return self.num_codes
        return len(finite_values(self))

    @property
    def dynamic_range_db(self) -> float:
        """20 log10(max / smallest positive value)."""
        return 20 * math.log10(max(abs(self.max), abs(self.min)) / self.min_subnormal)

    @property
    def bits_per_value(self) -> float:
        """Storage bits per element, including shared scales for ``mx`` formats."""
        if self.kind == "mx":
            assert self.element is not None
            scale_bits = 8 if self.block_scale is None else self.block_scale.bits
            return self.element.bits + scale_bits / self.block_size
        return float(self.bits)

    @_element_property
    def storage_dtype(self) -> np.dtype:
        """dtype of the unpacked values held in memory (codes for emulated/sub-byte formats)."""
        if self.dtype is not None and self.bits >= 8:
            return self.dtype
        if self.kind == "int" and self.bits == 16:
            return np.dtype(np.int16)
        if self.bits > 16:  # emulated ExMy wider than 16 bits: their bit patterns
            return np.dtype(np.uint32)
        return np.dtype(np.uint8) if self.bits <= 8 else np.dtype(np.uint16)

    @property
    def packed(self) -> bool:
        """Whether QArray stores these values bit-packed (fewer than 8 bits each)."""
        return self.bits < 8

    def properties(self) -> dict[str, object]:
        """All properties as a plain dict (used by the ``jaxquant formats`` table)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "bits": self.bits_per_value,
            "exp_bits": self.exp_bits if self.kind == "float" else None,
            "man_bits": self.man_bits if self.kind == "float" else None,
            "bias": self.bias if self.kind == "float" else None,
            "max": self.max,
            "min_normal": self.min_normal,
            "min_subnormal": self.min_subnormal,
            "eps": self.eps,
            "decimal_digits": round(self.decimal_digits, 2),
            "inf": self.has_inf,
            "nan": self.has_nan,
            "codes": self.num_codes,
            "dynamic_range_db": round(self.dynamic_range_db, 1),
        }


# ------------------------------------------------------------------------- constructors


def float_format(
    exp_bits: int,
    man_bits: int,
    *,
    bias: int | None = None,
    nan_style: NanStyle = "ieee",
    signed: bool = True,
    name: str | None = None,
) -> Format:
    """An IEEE-like ``ExMy`` float, emulated exactly in float32.

    Values are ``(-1)^s * 2^(E - bias) * (1 + M / 2^m)`` for exponent field ``E >= 1`` and
    ``(-1)^s * 2^(1 - bias) * (M / 2^m)`` for ``E = 0`` (subnormals).

    Args:
      exp_bits: exponent bits, 1..8.
      man_bits: mantissa bits, 0..23 (a 0-mantissa format needs ``signed=False`` or
        ``nan_style`` other than ``"ieee"`` to have finite values).
      bias: exponent bias; default ``2^(exp_bits-1) - 1``.
      nan_style: ``"ieee"``, ``"fn"``, ``"fnuz"`` or ``"none"`` (see module docstring).
      signed: whether a sign bit exists.
      name: registry name; default ``"e{exp_bits}m{man_bits}"`` plus a suffix.

    Returns:
      The :class:`Format`. If ml_dtypes has the same format, its ``dtype`` is attached.

    Example:
      >>> import jaxquant as jq
      >>> jq.formats.float_format(4, 3, nan_style="fn").max
      448.0
    """
    exp_bits = check_int(exp_bits, "float_format(exp_bits)")
    man_bits = check_int(man_bits, "float_format(man_bits)")
    if not (1 <= exp_bits <= 8):
        raise ValueError(
            f"float_format(exp_bits): exp_bits must be in 1..8 (float32's exponent is the "
            f"widest jaxquant emulates), got {exp_bits}."
        )
    if not (0 <= man_bits <= 23):
        raise ValueError(
            f"float_format(man_bits): man_bits must be in 0..23 (float32's mantissa is the "
            f"widest jaxquant emulates), got {man_bits}."
        )
    if not isinstance(nan_style, str) or nan_style not in ("ieee", "fn", "fnuz", "none"):
        raise ValueError(
            "float_format(nan_style): nan_style must be 'ieee', 'fn', 'fnuz' or 'none', got "
            f"{nan_style!r}."
        )
    signed = check_bool(signed, "float_format(signed)")
    if bias is not None:
        bias = check_int(bias, "float_format(bias)")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise TypeError(
            f"float_format(name): expected a non-empty str or None, got {describe(name)}."
        )
    if bias is None:
        bias = 2 ** (exp_bits - 1) - 1
    bits = int(signed) + exp_bits + man_bits
    if bits > 32:
        raise ValueError(f"float_format: {bits} bits is wider than float32.")
    if nan_style == "ieee" and exp_bits == 1:
        raise ValueError("float_format: an 'ieee' format needs exp_bits >= 2 (E1 is all Inf/NaN).")
    if name is None:
        suffix = {"ieee": "", "fn": "fn", "fnuz": "fnuz", "none": "fn"}[nan_style]
        default_bias = 2 ** (exp_bits - 1) - 1
        bias_part = "" if bias == default_bias else f"b{bias}"
        name = f"e{exp_bits}m{man_bits}{bias_part}{suffix}" + ("" if signed else "u")
    fmt = Format(
        name=name,
        kind="float",
        bits=bits,
        exp_bits=exp_bits,
        man_bits=man_bits,
        bias=bias,
        nan_style=nan_style,
        signed=signed,
    )
    if (fmt.emin < -126 and man_bits > 0) or fmt.emin < -127 or fmt.emax > 127:
        raise ValueError(
            f"float_format: exponent range [{fmt.emin}, {fmt.emax}] (bias {bias}) does not "
            "fit float32's normal range [-126, 127]; choose a bias closer to "
            f"{2 ** (exp_bits - 1) - 1}."
        )
    # Attach the ml_dtypes dtype when the same format exists there.
    for dt in _ML_FLOATS:
        if _float_layout(dt) == (exp_bits, man_bits, bias, nan_style, signed):
            fmt = dataclasses.replace(fmt, dtype=np.dtype(dt))
            break
    return fmt


def int_format(bits: int, *, signed: bool = True) -> Format:
    """Two's-complement ``int{bits}`` (signed) or ``uint{bits}``; bits in 1..8 or 16.

    Args:
      bits: the width, 1..8 or 16.
      signed: ``int{bits}`` (range ``[-2^(bits-1), 2^(bits-1) - 1]``) if True, else
        ``uint{bits}`` (range ``[0, 2^bits - 1]``).

    Returns:
      The :class:`Format`, with the ml_dtypes / numpy ``dtype`` where one exists.

    Example:
      >>> import jaxquant as jq
      >>> f = jq.formats.int_format(3)
      >>> f.name, f.min, f.max
      ('int3', -4.0, 3.0)
      >>> jq.formats.int_format(4, signed=False).max
      15.0
    """
    bits = check_int(bits, "int_format(bits)")
    if bits not in (*range(1, 9), 16):
        raise ValueError(f"int_format(bits): bits must be 1..8 or 16, got {bits}.")
    signed = check_bool(signed, "int_format(signed)")
    name = f"{'' if signed else 'u'}int{bits}"
    dtype = getattr(ml_dtypes, name, None) or getattr(np, name, None)
    return Format(
        name=name,
        kind="int",
        bits=bits,
        signed=signed,
        dtype=None if dtype is None else np.dtype(dtype),
    )


def codebook_format(name: str, values: tuple[float, ...], bits: int) -> Format:
    """A codebook format: ``values`` sorted ascending, stored as ``bits``-bit indices.

    A value quantizes to its nearest codebook entry (NF4, binary and ternary are codebook
    formats).

    Args:
      name: the format's name.
      values: at least 2 finite, strictly increasing numbers.
      bits: index width, 1..16, with ``len(values) <= 2**bits``.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> f = jq.formats.codebook_format("my3", (-1.0, -0.25, 0.0, 0.5, 1.0), bits=3)
      >>> f.kind, f.bits, f.max
      ('codebook', 3, 1.0)
      >>> spec = jq.QuantSpec(f, calibration=None)  # no scale: the values themselves
      >>> jq.fake_quant(jnp.array([-0.3, 0.2, 0.3, 0.9]), spec).tolist()
      [-0.25, 0.0, 0.5, 1.0]
    """
    _check_name(name, "codebook_format(name)")
    if isinstance(values, str | bytes) or not hasattr(values, "__len__"):
        raise TypeError(
            f"codebook_format(values): expected a sequence of numbers, got {describe(values)}."
        )
    if any(isinstance(v, bool | np.bool_ | str | bytes) for v in values):
        raise TypeError(f"codebook_format(values): expected numbers, got {values!r}.")
    try:
        vals = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise TypeError(f"codebook_format(values): expected numbers, got {values!r}.") from None
    if len(vals) < 2 or not all(math.isfinite(v) for v in vals):
        raise ValueError(f"codebook_format(values): need at least 2 finite values, got {vals}.")
    if list(vals) != sorted(vals) or len(set(vals)) != len(vals):
        raise ValueError(
            f"codebook_format(values): values must be strictly increasing, got {vals}."
        )
    bits = check_int(bits, "codebook_format(bits)", lo=1, hi=16)
    if len(vals) > 2**bits:
        raise ValueError(
            f"codebook_format(bits): {len(vals)} values don't fit in {bits} bits; use "
            f"bits={math.ceil(math.log2(len(vals)))}."
        )
    return Format(name=name, kind="codebook", bits=bits, codebook=vals, signed=vals[0] < 0)


# The element formats of the OCP Microscaling spec v1.0 (Table 1), by layout
# (exp_bits, man_bits, bias, nan_style, signed); MXINT8's int8 is checked by kind.
_OCP_MX_ELEMENTS = {
    (4, 3, 7, "fn", True): "e4m3 (float8_e4m3fn)",
    (5, 2, 15, "ieee", True): "e5m2 (float8_e5m2)",
    (2, 3, 1, "none", True): "e2m3 (float6_e2m3fn)",
    (3, 2, 3, "none", True): "e3m2 (float6_e3m2fn)",
    (2, 1, 1, "none", True): "e2m1 (float4_e2m1fn)",
}


def mx_format(name: str, element: Format | str, block_size: int = 32) -> Format:
    """An OCP Microscaling format: ``element`` values sharing one e8m0 scale per block.

    The shared scale of a block is ``X = 2^(floor(log2 amax) - emax_elem)`` (OCP v1.0,
    section 6.3), ``emax_elem`` the exponent of the element's largest power of two. For
    MXINT8 the element is int8 with an implied scale of 2^-6 (values ``k / 64``,
    ``emax_elem = 0``); jaxquant stores the int8 code ``k`` and folds the 2^-6 into the
    stored scale, ``2^(floor(log2 amax) - 6)``, so the codes are the spec's bit patterns and
    ``k * scale`` is the spec's value. Codes are ``[-127, 127]`` (as microxcaling clamps;
    -128, the spec's optional -2.0, is not produced).

    Args:
      name: the registry name.
      element: an element format of the OCP MX spec: e4m3, e5m2 (FP8), e2m3, e3m2 (FP6),
        e2m1 (FP4) or int8 (MXINT8), as a Format or a name.
      block_size: elements per shared scale (the spec's 32; others are accepted).

    Raises:
      ValueError: another element format (other ints, codebooks, floats outside the spec).

    Example:
      >>> import jaxquant as jq
      >>> f = jq.formats.mx_format("mxfp6_e3m2_b16", "e3m2", block_size=16)
      >>> f.kind, f.element.name, f.block_size, f.max
      ('mx', 'float6_e3m2fn', 16, 28.0)
      >>> f.bits_per_value  # 6 bits per element + one 8-bit scale per 16 elements
      6.5
      >>> jq.formats.get("mxint8").bits_per_value
      8.25

    References:
      OCP Microscaling Formats (MX) Specification v1.0,
      https://www.opencompute.org/documents/ocp-microscaling-formats-mx-v1-0-spec-final-pdf
    """
    _check_name(name, "mx_format(name)")
    element = resolve(element, "mx_format(element)")
    layout = (element.exp_bits, element.man_bits, element.bias, element.nan_style, element.signed)
    is_int8 = element.kind == "int" and element.bits == 8 and element.signed
    if not is_int8 and (element.kind != "float" or layout not in _OCP_MX_ELEMENTS):
        raise ValueError(
            f"mx_format(element): {element.name} is not an OCP MX element format; use one of "
            f"{', '.join(_OCP_MX_ELEMENTS.values())} or int8 (MXINT8). For other integer or "
            "codebook values with a shared scale, use QuantSpec(fmt, per_block(axis, size), "
            "scale_format='e8m0')."
        )
    block_size = check_int(block_size, "mx_format(block_size)", lo=1)
    return Format(
        name=name,
        kind="mx",
        bits=element.bits,
        element=element,
        block_size=block_size,
        signed=element.signed,
    )


def nvfp4_format(name: str = "nvfp4", *, block_size: int = 16, scale_floor: float = 0.0) -> Format:
    """NVIDIA's NVFP4: e2m1 elements, an E4M3 scale per block of 16, a float32 scale per tensor.

    Two-level scaling, as Transformer Engine implements it (the recipe of arXiv 2509.25149):

    * per tensor, the encode scale ``S = 6 * 448 / amax`` (float32; 1 when ``amax`` is 0 or
      Inf; ``amax`` is the largest ``|x|``, Inf included, NaN ignored; capped at float32's
      max for a tiny ``amax``);
    * per block, the scale ``b = e4m3(block_amax * (S * fl(1/6)))``: round to nearest even
      onto E4M3, saturating at 448, E4M3's subnormal scales (down to 2^-9) kept, smaller
      ones 0;
    * elements ``e = e2m1(x * min(1 / (b * (1 / S)), f32max))``, saturating at +-6,
      rounded to nearest even or stochastically (a block with ``b = 0`` decodes to 0);
    * decode ``x_hat = e * (b / S)``, the quotient ``b / S`` rounded to float32 once per
      block (the effective block scale that ``fake_quant``, ``dequantize`` and the
      quantized dot all multiply by).

    The quantizer performs Transformer Engine's float32 operations in its order
    (``core_nvfp4.cuh``), with correctly rounded divisions, so its codes and block scales
    are TE's wherever TE's divisions are IEEE (tested against a numpy transcription of
    those operations, not against TE itself), except where XLA flushes float32
    subnormals: tensors with ``amax`` below about 3e-35. TE's own dequantize multiplies by
    ``b * amax * fl(1/2688)`` instead of ``b / S`` (ulp-level differences, and Inf for a
    tensor holding an Inf); its GEMM applies the ``1 / S`` of both operands to the product.
    torchao computes its scales in another order: ``scale_floor`` reproduces its floor
    rule, not every last bit.

    Storage: 4 bits per element + 1 byte per 16 elements + 4 bytes per tensor (a QArray's
    ``scale`` holds the E4M3 block scales, ``tensor_scale`` the float32 ``S``).

    Where other implementations differ: torchao and NVIDIA ModelOpt floor the block scale
    before rounding (torchao at 2^-6, E4M3's smallest normal; ModelOpt at 2^-9, its smallest
    subnormal), which changes blocks whose scale would be below the floor (all-zero blocks
    included), and both return NaN for an all-zero tensor (they divide by ``amax = 0``),
    where Transformer Engine and jaxquant use ``S = 1`` and return zeros. ``scale_floor``
    reproduces the floors; the all-zero NaN is not reproduced.

    Args:
      name: the registry name.
      block_size: elements per E4M3 scale (16 in NVFP4).
      scale_floor: the block scale's floor before E4M3 rounding: 0 (Transformer Engine,
        the default), ``2**-6`` (torchao) or ``2**-9`` (ModelOpt).

    Example:
      >>> import jaxquant as jq
      >>> f = jq.formats.get("nvfp4")
      >>> f.kind, f.element.name, f.block_scale.name, f.block_size, f.tensor_scale
      ('mx', 'float4_e2m1fn', 'float8_e4m3fn', 16, True)
      >>> f.bits_per_value  # per-tensor scale not counted: 4 B per tensor
      4.5
      >>> f.scale_floor  # Transformer Engine's rule: no floor
      0.0

    References:
      NVIDIA, "Pretraining Large Language Models with NVFP4", https://arxiv.org/abs/2509.25149
    """
    _check_name(name, "nvfp4_format(name)")
    block_size = check_int(block_size, "nvfp4_format(block_size)", lo=1)
    if isinstance(scale_floor, bool) or not isinstance(scale_floor, int | float):
        raise TypeError(
            f"nvfp4_format(scale_floor): expected a number, got {describe(scale_floor)}."
        )
    scale_floor = float(scale_floor)
    if not (0.0 <= scale_floor <= 448.0):
        raise ValueError(
            f"nvfp4_format(scale_floor): must be in [0, 448] (0: none; torchao 2**-6, "
            f"ModelOpt 2**-9), got {scale_floor}."
        )
    element = get("e2m1")
    return Format(
        name=name,
        kind="mx",
        bits=element.bits,
        element=element,
        block_size=block_size,
        signed=True,
        block_scale=get("e4m3"),
        tensor_scale=True,
        scale_floor=scale_floor,
    )


def _check_name(name: object, what: str) -> None:
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"{what}: expected a non-empty str, got {describe(name)}.")


# ----------------------------------------------------------------- ml_dtypes float layouts

_ML_FLOATS = [
    np.float32,
    np.float16,
    ml_dtypes.bfloat16,
    ml_dtypes.float8_e4m3fn,
    ml_dtypes.float8_e5m2,
    ml_dtypes.float8_e4m3fnuz,
    ml_dtypes.float8_e5m2fnuz,
    ml_dtypes.float8_e4m3b11fnuz,
    ml_dtypes.float8_e3m4,
    ml_dtypes.float8_e4m3,
    ml_dtypes.float8_e8m0fnu,
    ml_dtypes.float6_e2m3fn,
    ml_dtypes.float6_e3m2fn,
    ml_dtypes.float4_e2m1fn,
]


@functools.cache
def _float_layout(dt: type) -> tuple[int, int, int, NanStyle, bool]:
    """(exp_bits, man_bits, bias, nan_style, signed) of an ml_dtypes/numpy float type."""
    name = np.dtype(dt).name
    fi = ml_dtypes.finfo(dt)
    man = int(fi.nmant)
    signed = name != "float8_e8m0fnu"
    total = np.dtype(dt).itemsize * 8 if name not in _SUBBYTE_BITS else _SUBBYTE_BITS[name]
    exp = total - man - int(signed)
    if name.endswith("fnuz"):
        style: NanStyle = "fnuz"
    elif name in ("float8_e4m3fn", "float8_e8m0fnu"):
        style = "fn"
    elif name.startswith(("float6", "float4")):
        style = "none"
    else:
        style = "ieee"
    bias = 1 - int(fi.minexp) if man > 0 else -int(fi.minexp)
    return exp, man, bias, style, signed


_SUBBYTE_BITS = {"float6_e2m3fn": 6, "float6_e3m2fn": 6, "float4_e2m1fn": 4}


def _from_dtype(dt: type, name: str) -> Format:
    exp, man, bias, style, signed = _float_layout(dt)
    return dataclasses.replace(
        float_format(exp, man, bias=bias, nan_style=style, signed=signed), name=name
    )


# ------------------------------------------------------------------------------ registry

_REGISTRY: dict[str, Format] = {}
_ALIASES: dict[str, str] = {}


def register(fmt: Format, *aliases: str) -> Format:
    """Add ``fmt`` to the registry under its name and ``aliases`` (case-insensitive).

    Registered formats are found by :func:`get` (and so by ``QuantSpec("name")``), listed
    by :func:`names` and ``jaxquant formats``. Registering a format under a name already
    taken replaces it.

    Args:
      fmt: a :class:`Format` from :func:`float_format`, :func:`int_format`,
        :func:`codebook_format` or :func:`mx_format`.
      *aliases: other names it is found by.

    Returns:
      ``fmt``.

    Example:
      >>> import jaxquant as jq
      >>> nf4 = jq.formats.register(jq.formats.get("nf4"), "qlora_nf4")  # a new alias
      >>> jq.formats.get("QLoRA_NF4") is nf4
      True
    """
    if not isinstance(fmt, Format):
        raise TypeError(
            f"register(fmt): expected a Format (from float_format, int_format, "
            f"codebook_format or mx_format), got {describe(fmt)}."
        )
    for a in aliases:
        _check_name(a, "register(aliases)")
    _REGISTRY[fmt.name] = fmt
    for a in (fmt.name, *aliases):
        _ALIASES[a.lower()] = fmt.name
    return fmt


def _register_builtins() -> None:
    float_names = {
        np.float32: ("float32", "fp32", "f32", "e8m23"),
        np.float16: ("float16", "fp16", "f16", "half", "e5m10"),
        ml_dtypes.bfloat16: ("bfloat16", "bf16", "e8m7"),
        ml_dtypes.float8_e4m3fn: ("float8_e4m3fn", "fp8", "e4m3", "e4m3fn", "fp8_e4m3"),
        ml_dtypes.float8_e5m2: ("float8_e5m2", "e5m2", "fp8_e5m2"),
        ml_dtypes.float8_e4m3fnuz: ("float8_e4m3fnuz", "e4m3fnuz"),
        ml_dtypes.float8_e5m2fnuz: ("float8_e5m2fnuz", "e5m2fnuz"),
        ml_dtypes.float8_e4m3b11fnuz: ("float8_e4m3b11fnuz", "e4m3b11fnuz", "e4m3b11"),
        ml_dtypes.float8_e3m4: ("float8_e3m4", "e3m4"),
        ml_dtypes.float8_e4m3: ("float8_e4m3", "e4m3ieee"),
        ml_dtypes.float8_e8m0fnu: ("float8_e8m0fnu", "e8m0", "e8m0fnu"),
        ml_dtypes.float6_e2m3fn: ("float6_e2m3fn", "fp6", "e2m3", "fp6_e2m3"),
        ml_dtypes.float6_e3m2fn: ("float6_e3m2fn", "e3m2", "fp6_e3m2"),
        ml_dtypes.float4_e2m1fn: ("float4_e2m1fn", "fp4", "e2m1", "fp4_e2m1"),
    }
    for dt, (name, *aliases) in float_names.items():
        register(_from_dtype(dt, name), *aliases)
    for b in (*range(1, 9), 16):
        register(int_format(b, signed=True))
    for b in range(1, 9):
        register(int_format(b, signed=False))
    register(codebook_format("nf4", NF4_VALUES, 4), "normalfloat4")
    register(codebook_format("binary", (-1.0, 1.0), 1), "bnn", "sign")
    register(codebook_format("ternary", (-1.0, 0.0, 1.0), 2), "tnn", "twn")
    register(mx_format("mxfp8", get("e4m3")), "mxfp8_e4m3")
    register(mx_format("mxfp8_e5m2", get("e5m2")))
    register(mx_format("mxfp6", get("e2m3")), "mxfp6_e2m3")
    register(mx_format("mxfp6_e3m2", get("e3m2")))
    register(mx_format("mxfp4", get("e2m1")), "mxfp4_e2m1")
    register(mx_format("mxint8", get("int8")))
    register(nvfp4_format("nvfp4"))


def get(fmt: str | Format) -> Format:
    """Look up a format by name or alias (case-insensitive); a Format passes through.

    Besides registered names, ``"eXmY"`` strings build an emulated IEEE-style float, and
    ``"intB"`` / ``"uintB"`` any integer width.

    Example:
      >>> import jaxquant as jq
      >>> jq.formats.get("fp8").name
      'float8_e4m3fn'
    """
    return resolve(fmt, "formats.get(fmt)")


def resolve(fmt: object, what: str) -> Format:
    """:func:`get` for the argument ``what`` of a public function (named in its errors)."""
    if isinstance(fmt, Format):
        return fmt
    if not isinstance(fmt, str):
        raise TypeError(
            f"{what}: a format is a name (str) or a Format, got {describe(fmt)}. Use e.g. "
            "'int8', 'fp8' or jq.formats.float_format(4, 3)."
        )
    key = fmt.strip().lower()
    if key in _ALIASES:
        return _REGISTRY[_ALIASES[key]]
    parsed = _parse_exmy(key)
    if parsed is not None:
        return parsed
    close = sorted(n for n in _ALIASES if n[:2] == key[:2])[:6]
    hint = f" Close names: {', '.join(close)}." if close else ""
    raise ValueError(
        f"{what}: Unknown format {fmt!r}.{hint} Run `jaxquant formats` for the list, or build "
        "one with jq.formats.float_format(exp_bits, man_bits)."
    )


def _parse_exmy(key: str) -> Format | None:
    import re

    m = re.fullmatch(r"e(\d)m(\d{1,2})(fn|fnuz)?", key)
    if not m:
        return None
    styles: dict[str | None, NanStyle] = {"fn": "fn", "fnuz": "fnuz", None: "ieee"}
    style = styles[m.group(3)]
    return float_format(int(m.group(1)), int(m.group(2)), nan_style=style)


def names() -> list[str]:
    """Canonical names of every registered format, in registration order.

    Example:
      >>> import jaxquant as jq
      >>> jq.formats.names()[:5]
      ['float32', 'float16', 'bfloat16', 'float8_e4m3fn', 'float8_e5m2']
    """
    return list(_REGISTRY)


def all_formats() -> list[Format]:
    """Every registered format, in registration order (as :func:`names`).

    Example:
      >>> import jaxquant as jq
      >>> [f.name for f in jq.formats.all_formats() if f.kind == "codebook"]
      ['nf4', 'binary', 'ternary']
    """
    return list(_REGISTRY.values())


# ------------------------------------------------------------------- code <-> value tables


def decode_code(fmt: Format | str, code: int) -> float:
    """The value of bit pattern ``code`` of a float/int/codebook format (pure Python).

    Args:
      fmt: a :class:`Format` or a name (not an MX format: its elements have the codes).
      code: the bit pattern, an int in ``[0, fmt.num_codes)``.

    Returns:
      The value as a Python float (``nan`` / ``inf`` for those codes).

    Example:
      >>> import jaxquant as jq
      >>> jq.formats.decode_code("fp16", 0x3C00), jq.formats.decode_code("int4", 0b1111)
      (1.0, -1.0)
      >>> jq.formats.decode_code("e4m3", 0x7E), jq.formats.decode_code("e4m3", 0x7F)
      (448.0, nan)
    """
    fmt = resolve(fmt, "decode_code(fmt)")
    if fmt.kind != "mx":
        code = check_int(code, "decode_code(code)", lo=0, hi=fmt.num_codes - 1)
    if fmt.kind == "int":
        code &= 2**fmt.bits - 1
        if fmt.signed and code >= 2 ** (fmt.bits - 1):
            code -= 2**fmt.bits
        return float(code)
    if fmt.kind == "codebook":
        assert fmt.codebook is not None
        return fmt.codebook[code] if code < len(fmt.codebook) else math.nan
    if fmt.kind != "float":
        raise ValueError(f"decode_code: {fmt.name} has no single-element codes.")
    e, m = fmt.exp_bits, fmt.man_bits
    sign = (code >> (e + m)) & 1 if fmt.signed else 0
    ef = (code >> m) & (2**e - 1)
    mf = code & (2**m - 1)
    s = -1.0 if sign else 1.0
    top = 2**e - 1
    if fmt.nan_style == "ieee" and ef == top:
        return s * math.inf if mf == 0 else math.nan
    if fmt.nan_style == "fn" and ef == top and mf == 2**m - 1:
        return math.nan
    if fmt.nan_style == "fnuz" and sign == 1 and ef == 0 and mf == 0:
        return math.nan
    if m == 0:  # e8m0: every field is a power of two
        return s * 2.0 ** (ef - fmt.bias)
    if ef == 0:
        return s * mf / 2**m * 2.0 ** (1 - fmt.bias)
    return s * (1 + mf / 2**m) * 2.0 ** (ef - fmt.bias)


def code_table(fmt: Format | str) -> np.ndarray:
    """float64 array of the value of every code, indexed by code (NaN where a code is NaN).

    Formats of up to ``2**16`` codes; an MX format gives its element's table.

    Example:
      >>> import jaxquant as jq
      >>> jq.formats.code_table("int2").tolist()
      [0.0, 1.0, -2.0, -1.0]
      >>> jq.formats.code_table("e2m1").tolist()[:8]
      [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    """
    return _code_table(resolve(fmt, "code_table(fmt)"))


@functools.cache
def _code_table(fmt: Format) -> np.ndarray:
    if fmt.kind == "mx":
        assert fmt.element is not None
        return code_table(fmt.element)
    if fmt.num_codes > 2**16:
        raise ValueError(f"code_table: {fmt.name} has {fmt.num_codes} codes; too many to list.")
    return np.array([decode_code(fmt, c) for c in range(fmt.num_codes)], dtype=np.float64)


def finite_values(fmt: Format | str) -> np.ndarray:
    """Sorted distinct finite values of a format (-0 merged with +0).

    Example:
      >>> import jaxquant as jq
      >>> jq.formats.finite_values("e2m1").tolist()  # FP4 of OCP MX
      [-6.0, -4.0, -3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    """
    return _finite_values(resolve(fmt, "finite_values(fmt)"))


@functools.cache
def _finite_values(fmt: Format) -> np.ndarray:
    if fmt.kind == "float" and fmt.bits > 16:
        raise ValueError(f"finite_values: {fmt.name} has too many values to list.")
    t = code_table(fmt)
    return np.unique(t[np.isfinite(t)] + 0.0)


_register_builtins()
