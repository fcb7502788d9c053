"""QArray: quantized values, their scales and zero points, as one pytree.

Byte layout of ``QArray.values``
--------------------------------
* 8- and 16-bit formats with a numpy/ml_dtypes type (int8, uint8, int16, fp8 variants,
  fp16, bf16) are stored in that dtype, in the array's own shape.
* Other formats of at most 16 bits (emulated ``ExMy``) are stored as their bit patterns
  (``uint8``/``uint16``), in the array's own shape.
* Formats of fewer than 8 bits (int1..int7, uint1..uint7, fp4, fp6, nf4, binary, ternary,
  MX elements of 4/6 bits) are **bit-packed along the last axis**: each row of ``n``
  codes becomes ``ceil(n * bits / 8)`` bytes (``uint8``). Codes form an LSB-first bit
  stream: code ``i`` occupies stream bits ``[i*bits, (i+1)*bits)``, stream bit ``j`` is
  bit ``j % 8`` of byte ``j // 8``. For 4-bit formats, element ``2k`` is the low nibble of
  byte ``k``. Codes are two's complement for signed ints, the IEEE-style bit pattern for
  floats, and the index into the sorted value table for codebooks. A row's unused tail
  bits are zero. Leading axes are untouched, so sharding along them is preserved.

``scale`` has the granularity plan's ``scale_shape`` (the blocked view with reduced axes
of size 1) and is stored in the spec's scale format (float32, bfloat16, float16 or e8m0).
``zero_point`` (asymmetric only) has the same shape, in the smallest integer type that
holds the format's range.

Two-level formats (NVFP4) keep the per-block scales in ``scale`` (E4M3, ``float8_e4m3fn``)
and the per-tensor encode scale ``S`` in ``tensor_scale`` (float32, shape ``()``; a
``vmap``-ped quantize gives one per example). Every other format has ``tensor_scale=None``,
which adds no leaf: their pytrees have the same leaves as before the field existed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant._src import formats, rounding
from jaxquant._src.checks import check_int, describe
from jaxquant._src.formats import Format
from jaxquant._src.spec import QuantSpec


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["values", "scale", "zero_point", "tensor_scale"],
    meta_fields=["spec", "shape", "dtype"],
)
@dataclasses.dataclass(frozen=True)
class QArray:
    """A quantized array.

    Invariants: ``dequantize()`` returns an array of ``shape`` and ``dtype``; ``values`` uses
    the layout in this module's docstring (formats below 8 bits: ``uint8`` bytes holding an
    LSB-first bit stream along the last axis; 8- and 16-bit formats: their own dtype);
    ``scale`` (and ``zero_point`` when not None) have
    ``spec.granularity.plan(shape).scale_shape``. A QArray is a pytree (``values``,
    ``scale`` and ``zero_point`` its leaves), so it passes through ``jax.jit``.

    Attributes:
      values: stored codes or low-precision values (packed for sub-byte formats).
      scale: per-group scales, in the spec's scale format.
      zero_point: per-group integer zero points, or None for symmetric quantization.
      spec: the static :class:`QuantSpec` that produced it.
      shape: the original array's shape.
      dtype: the original array's dtype (what ``dequantize`` returns).
      tensor_scale: the float32 per-tensor encode scale of a two-level format (NVFP4:
        ``x_hat = e * (scale / tensor_scale)``); None for every other format.

    Example:
      >>> import jax, jax.numpy as jnp, jaxquant as jq
      >>> q = jq.quantize(jnp.array([1.0, -2.0, 3.0, -7.0]), jq.QuantSpec("int4"))
      >>> q
      QArray(shape=(4,), dtype=float32, spec=QuantSpec(int4, per_tensor, absmax), nbytes=6)
      >>> q.values.dtype, q.values.tolist()  # four int4 codes packed in two bytes
      (dtype('uint8'), [225, 147])
      >>> jax.jit(jq.dequantize)(q).tolist()
      [1.0, -2.0, 3.0, -7.0]
    """

    values: jax.Array
    scale: jax.Array
    zero_point: jax.Array | None
    spec: QuantSpec
    shape: tuple[int, ...]
    dtype: np.dtype
    tensor_scale: jax.Array | None = None

    def __post_init__(self) -> None:
        # Static fields only: pytree unflattening (jit, vmap, tree_map) rebuilds QArrays with
        # placeholders or tracers in the data fields, and runs this on every rebuild, so the
        # common case (what quantize builds) is a few isinstance checks.
        if not isinstance(self.spec, QuantSpec):
            raise TypeError(
                f"QArray: spec must be the jq.QuantSpec the values were quantized with, got "
                f"{describe(self.spec)}. QArrays come from jq.quantize(x, spec)."
            )
        shape = self.shape
        if type(shape) is not tuple or not all(type(d) is int and d >= 0 for d in shape):
            object.__setattr__(self, "shape", _check_shape(shape))
        dtype = self.dtype
        if not isinstance(dtype, np.dtype) or not _is_floating(dtype):
            object.__setattr__(self, "dtype", _check_dtype(dtype))

    @property
    def nbytes(self) -> int:
        """True storage size in bytes: packed values + scales + zero points."""
        n = _nbytes(self.values) + _nbytes(self.scale)
        if self.zero_point is not None:
            n += _nbytes(self.zero_point)
        if self.tensor_scale is not None:
            n += _nbytes(self.tensor_scale)
        return n

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def bits_per_value(self) -> float:
        """Average stored bits per element, scales included."""
        return 8 * self.nbytes / max(self.size, 1)

    def __getitem__(self, index: object) -> QArray:
        """``q[...]`` is ``q`` itself (how ``nnx.Variable`` reads its value); any other
        index is an error: slice the dequantized array, or quantize the slice."""
        if index is Ellipsis:
            return self
        raise TypeError(
            f"QArray does not support indexing with {index!r}: its values may be packed and "
            "its scales blocked. Use q.dequantize()[...] or quantize the slice."
        )

    def codes(self) -> jax.Array:
        """The stored codes, unpacked, in the array's own shape: the inverse of the packing
        in this module's docstring.

        Signed ints as signed integers (int8 for up to 8 bits), unsigned ints as unsigned,
        codebooks (nf4, binary, ternary) as indices into the sorted value table, float
        formats (fp8, fp6, fp4, bf16, emulated ExMy, MX elements) as their bit patterns
        (uint8 / uint16 / uint32).

        Example:
          >>> import jax.numpy as jnp, jaxquant as jq
          >>> q = jq.quantize(jnp.array([-0.5, 0.3, 1.2, -2.1]), jq.QuantSpec("int4"))
          >>> q.values.tolist()  # packed: two 4-bit codes per byte, low nibble first
          [30, 148]
          >>> q.codes().tolist()
          [-2, 1, 4, -7]
        """
        return codes(self.values, self.spec.element, self.shape)

    def dequantize(self) -> jax.Array:
        """The float array this QArray represents (``(q - z) * s``, in ``dtype``)."""
        return dequantize(self)

    def __repr__(self) -> str:
        return (
            f"QArray(shape={self.shape}, dtype={np.dtype(self.dtype).name}, "
            f"spec={self.spec}, nbytes={self.nbytes})"
        )


def _check_shape(shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, tuple | list):
        raise TypeError(
            f"QArray: shape must be a tuple of ints (the original array's shape), got "
            f"{describe(shape)}."
        )
    return tuple(check_int(d, f"QArray: shape[{i}]", lo=0) for i, d in enumerate(shape))


@functools.cache
def _is_floating(dtype: np.dtype) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.floating))


def _check_dtype(dtype: Any) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or not _is_floating(dt):
        raise TypeError(
            f"QArray: dtype must be the floating-point dtype of the original array (what "
            f"dequantize returns), e.g. jnp.float32, got {describe(dtype)}."
        )
    return dt


def check_array(value: Any, what: str, *, floating: bool = False) -> jax.Array:
    """``value`` as a JAX array, or a TypeError naming the argument ``what``.

    Refuses None, strings, QArrays (a quantized array is not an operand: dequantize it)
    and whatever ``jnp.asarray`` refuses; with ``floating``, non-floating dtypes too.
    Tracers pass through, so this runs while tracing.

    Args:
      value: the argument.
      what: how the user spells it, e.g. ``"dot_general: lhs"``.
      floating: whether the array must have a floating-point dtype.
    """
    kind = "a floating-point array" if floating else "an array"
    if isinstance(value, QArray):
        raise TypeError(
            f"{what} is a QArray; it must be {kind}. Pass jq.dequantize(q) (or q.dequantize())."
        )
    if value is None or isinstance(value, str | bytes):
        raise TypeError(f"{what} must be {kind}, got {describe(value)}.")
    try:
        with warnings.catch_warnings():  # numpy's dtype-alias warning for a list of strings
            warnings.simplefilter("ignore", DeprecationWarning)
            a = jnp.asarray(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{what} must be {kind}, got {describe(value)} ({err}).") from None
    if floating and not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(
            f"{what} must be {kind}, got dtype {a.dtype}. Cast it first, e.g. "
            "x.astype(jnp.float32)."
        )
    if not floating and not (
        jnp.issubdtype(a.dtype, jnp.number) or jnp.issubdtype(a.dtype, jnp.bool_)
    ):
        raise TypeError(f"{what} must be {kind} of numbers, got dtype {a.dtype}.")
    return a


def _nbytes(a: jax.Array) -> int:
    return int(math.prod(a.shape)) * np.dtype(a.dtype).itemsize


# ---------------------------------------------------------------- values <-> codes


def _nan_code(fmt: Format) -> int:
    if fmt.num_codes > 2**16:  # too many to list: the layout's highest NaN pattern
        return 2 ** (fmt.bits - 1) if fmt.nan_style == "fnuz" else 2**fmt.bits - 1
    table = formats.code_table(fmt)
    nans = np.nonzero(np.isnan(table))[0]
    return int(nans[-1]) if len(nans) else int(np.argmin(np.abs(table)))


def float_codes(v: jax.Array, fmt: Format) -> jax.Array:
    """uint32 bit patterns of float32 values already on float format ``fmt``'s grid.

    Integer arithmetic on the float32 bits: the exponent is re-biased and the mantissa
    shifted (further, for the format's subnormals). Exact for every grid value; NaN gets
    the format's NaN code (0 where it has none), +-Inf its Inf code, and formats without a
    negative zero (fnuz) store -0 as +0.
    """
    e_bits, m = fmt.exp_bits, fmt.man_bits
    bits = jax.lax.bitcast_convert_type(v.astype(jnp.float32), jnp.uint32)
    sign = bits >> 31
    mag = bits & jnp.uint32(0x7FFFFFFF)
    biased = (mag >> 23).astype(jnp.int32)
    sig = (mag & jnp.uint32(0x7FFFFF)) | jnp.where(biased > 0, jnp.uint32(1 << 23), jnp.uint32(0))
    # A float32 subnormal is normalised first (its leading bit moved to bit 23, its exponent
    # below -126): formats with emin = -126 (8 exponent bits) store it as their own
    # subnormal, which the plain exponent field would call a normal 2^-126 number.
    lead = jnp.where(biased > 0, 0, jnp.maximum(jax.lax.clz(sig).astype(jnp.int32) - 8, 0))
    sig = sig << lead.astype(jnp.uint32)
    eu = jnp.maximum(biased, 1) - 127 - lead  # unbiased exponent
    normal = eu >= fmt.emin
    shift = jnp.clip(23 - m + jnp.maximum(fmt.emin - eu, 0), 0, 31).astype(jnp.uint32)
    man = (sig >> shift) & jnp.uint32(2**m - 1)
    exp = jnp.where(normal, eu + fmt.bias, 0).astype(jnp.uint32)
    code = (exp << m) | man
    if fmt.signed:
        code = code | (sign << (e_bits + m))
    if fmt.nan_style == "fnuz":
        code = jnp.where(mag == 0, jnp.uint32(0), code)
    if fmt.has_inf:
        inf_code = jnp.uint32((2**e_bits - 1) << m)
        code = jnp.where(jnp.isinf(v), inf_code | (sign << (e_bits + m)), code)
    nan_code = _nan_code(fmt) if fmt.has_nan else 0
    return jnp.where(jnp.isnan(v), jnp.uint32(nan_code), code)


def encode(v: jax.Array, fmt: Format) -> jax.Array:
    """Encode float32 values already on ``fmt``'s grid into ``fmt.storage_dtype``.

    NaN becomes the format's NaN code, or code 0 (the value 0) where it has none (ints,
    codebooks, fp6, fp4), as ml_dtypes casts do. (An integer grid is finite: the
    quantizers clip onto ``[qmin, qmax]`` before they encode, so NaN is the one
    non-grid value an integer format gets here.)
    """
    sdt = fmt.storage_dtype
    if fmt.kind == "mx":
        assert fmt.element is not None
        return encode(v, fmt.element)
    if fmt.kind == "int":
        v = jnp.where(jnp.isnan(v), jnp.float32(0.0), v)
        if fmt.bits < 8:
            return (v.astype(jnp.int32) & (2**fmt.bits - 1)).astype(jnp.uint8)
        return v.astype(sdt)
    if fmt.kind == "codebook":  # v already holds indices (see quantize)
        return v.astype(sdt)
    if fmt.dtype is not None and fmt.bits in (16, 32):
        return v.astype(sdt)
    if fmt.dtype is not None and fmt.bits == 8:
        # Same bits either way (tested); XLA's CPU backend converts to fp8 in software,
        # slower than building the bit pattern, while GPUs convert in hardware.
        def by_bits(v: jax.Array) -> jax.Array:
            return jax.lax.bitcast_convert_type(float_codes(v, fmt).astype(jnp.uint8), sdt)

        return jax.lax.platform_dependent(v, cpu=by_bits, default=lambda v: v.astype(sdt))
    return float_codes(v, fmt).astype(sdt)


def decode(c: jax.Array, fmt: Format) -> jax.Array:
    """float32 values of stored codes/values (inverse of :func:`encode`)."""
    if fmt.kind == "mx":
        assert fmt.element is not None
        return decode(c, fmt.element)
    if fmt.kind == "float" and c.dtype == jnp.uint32:  # more than 16 bits: no table
        return float_values(c, fmt)
    if c.dtype in (jnp.uint8, jnp.uint16) and not (fmt.kind == "int" and fmt.bits >= 8):
        table = jnp.asarray(formats.code_table(fmt).astype(np.float32))
        return table[c.astype(jnp.int32)]
    return c.astype(jnp.float32)


def float_values(c: jax.Array, fmt: Format) -> jax.Array:
    """float32 values of float format ``fmt``'s bit patterns ``c`` (inverse of
    :func:`float_codes`), built from bits with integer operations only (every value of a
    format jaxquant accepts is a float32, subnormals included, and XLA flushes those in
    arithmetic)."""
    e_bits, m = fmt.exp_bits, fmt.man_bits
    c = c.astype(jnp.uint32)
    sign = (c >> (e_bits + m)) & 1 if fmt.signed else jnp.zeros_like(c)
    ef = ((c >> m) & (2**e_bits - 1)).astype(jnp.int32)
    mf = c & jnp.uint32(2**m - 1)
    top = 2**e_bits - 1
    # Normal: exponent ef - bias, the fraction shifted up to 23 bits.
    normal = ((ef - fmt.bias + 127).astype(jnp.uint32) << 23) | (mf << (23 - m))
    # Subnormal: mf * 2^(emin - m); normalise the leading bit when the result is a float32
    # normal, else it is a float32 subnormal whose bits are mf shifted into place.
    k = 31 - jax.lax.clz(jnp.maximum(mf, 1)).astype(jnp.int32)  # leading bit of mf
    e32 = fmt.emin - m + k
    frac = (mf << (23 - k).astype(jnp.uint32)) & jnp.uint32(0x7FFFFF)
    sub_normal32 = ((e32 + 127).astype(jnp.uint32) << 23) | frac
    sub_sub32 = mf << jnp.uint32(max(fmt.emin - m + 149, 0))
    sub = jnp.where(mf == 0, jnp.uint32(0), jnp.where(e32 >= -126, sub_normal32, sub_sub32))
    mag = jnp.where(ef == 0, sub, normal)
    nan = jnp.zeros_like(c, dtype=bool)
    if fmt.nan_style == "ieee":
        inf = (ef == top) & (mf == 0)
        mag = jnp.where(inf, jnp.uint32(0x7F800000), mag)
        nan = (ef == top) & (mf != 0)
    elif fmt.nan_style == "fn":
        nan = (ef == top) & (mf == 2**m - 1)
    elif fmt.nan_style == "fnuz":
        nan = (sign == 1) & (ef == 0) & (mf == 0)
    bits = mag | (sign << 31)
    bits = jnp.where(nan, jnp.uint32(0x7FC00000), bits)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


@functools.partial(jax.jit, static_argnums=(1, 2))
def codes(values: jax.Array, fmt: Format, shape: tuple[int, ...]) -> jax.Array:
    """Unpacked codes of stored ``values`` of element format ``fmt`` (see QArray.codes).

    Jitted: called eagerly, the unpacking's shifts and masks would each compile on their
    own for every new shape (about 0.2 s for the first int4 call), and each later call
    would dispatch them one by one."""
    if fmt.packed:
        n = shape[-1] if shape else 1
        c = unpack(values, fmt.bits, n).reshape(shape)
    else:
        c = values
    if fmt.kind == "int":
        if fmt.packed and fmt.signed:  # two's complement in the low bits: sign-extend
            shift = jnp.uint8(8 - fmt.bits)
            return jax.lax.shift_right_arithmetic((c << shift).view(jnp.int8), shift.view(jnp.int8))
        return c
    if fmt.kind == "float" and jnp.issubdtype(c.dtype, jnp.floating):
        width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[np.dtype(c.dtype).itemsize]
        return jax.lax.bitcast_convert_type(c, width)
    return c


# ---------------------------------------------------------------------- bit packing


def packed_length(n: int, bits: int) -> int:
    """Bytes holding ``n`` codes of ``bits`` bits."""
    return -(-n * bits // 8)


def pack(codes: jax.Array, bits: int) -> jax.Array:
    """Pack uint8 ``codes`` (< 2^bits) along the last axis into an LSB-first bit stream."""
    if not 1 <= bits < 8:
        raise ValueError(f"pack: bits must be 1..7, got {bits}.")
    codes = codes.astype(jnp.uint8)
    *lead, n = codes.shape
    if 8 % bits == 0:  # 1, 2, 4 bits: k codes per byte
        k = 8 // bits
        pad = (-n) % k
        c = jnp.pad(codes, [(0, 0)] * len(lead) + [(0, pad)]).reshape(*lead, (n + pad) // k, k)
        return _or_reduce(c << _lanes(k, bits, c.ndim))
    # 3, 5, 6, 7 bits: expand to a bit stream, regroup by 8.
    pad = (-n) % 8  # 8 codes -> `bits` whole bytes
    c = jnp.pad(codes, [(0, 0)] * len(lead) + [(0, pad)])
    stream = (c[..., None] >> _lanes(bits, 1, c.ndim + 1)) & jnp.uint8(1)
    stream = stream.reshape(*lead, (n + pad) * bits // 8, 8)
    out = _or_reduce(stream << _lanes(8, 1, stream.ndim))
    return out[..., : packed_length(n, bits)]


def _lanes(n: int, step: int, ndim: int) -> jax.Array:
    """uint8 shifts ``0, step, 2 step, ...`` shaped to broadcast on a trailing axis of n."""
    return (jnp.arange(n, dtype=jnp.uint8) * jnp.uint8(step)).reshape((1,) * (ndim - 1) + (n,))


def _or_reduce(x: jax.Array) -> jax.Array:
    # Bits don't overlap, so a sum is an OR (and reduces faster everywhere).
    return jnp.sum(x, axis=-1, dtype=jnp.uint8)


def unpack(packed: jax.Array, bits: int, n: int) -> jax.Array:
    """Inverse of :func:`pack`: uint8 codes of length ``n`` along the last axis."""
    *lead, nbytes = packed.shape
    mask = jnp.uint8(2**bits - 1)
    if 8 % bits == 0:
        k = 8 // bits
        c = (packed[..., None] >> _lanes(k, bits, packed.ndim + 1)) & mask
        return c.reshape(*lead, nbytes * k)[..., :n]
    stream = (packed[..., None] >> _lanes(8, 1, packed.ndim + 1)) & jnp.uint8(1)
    stream = stream.reshape(*lead, nbytes * 8)
    total = n * bits
    stream = stream[..., :total].reshape(*lead, n, bits)
    return _or_reduce(stream << _lanes(bits, 1, stream.ndim))


# ------------------------------------------------------------------- dequantize


def widen(a: jax.Array, dtype: Any) -> jax.Array:
    """float32 ``a`` in the compute dtype of a ``dtype`` result (float64 exactly)."""
    if np.dtype(dtype) == np.float64:
        return rounding.float32_to_float64(a)
    return a.astype(jnp.float32)


def dequantize(q: QArray, dtype: jax.typing.DTypeLike | None = None) -> jax.Array:
    """The array a QArray stands for: ``(q - z) * s``, in ``q.dtype`` (or ``dtype``).

    Args:
      q: a :class:`QArray` from :func:`quantize`.
      dtype: the floating-point dtype of the result; None for the dtype ``q`` was
        quantized from.

    Returns:
      An array of ``q.shape``.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> q = jq.quantize(jnp.array([-0.5, 0.3, 1.2, -2.1]), jq.QuantSpec("int8"))
      >>> [round(v, 4) for v in jq.dequantize(q).tolist()]
      [-0.4961, 0.2976, 1.2071, -2.1]
      >>> jq.dequantize(q, jnp.bfloat16).dtype
      dtype(bfloat16)
    """
    if not isinstance(q, QArray):
        raise TypeError(
            f"dequantize expects a QArray (from jq.quantize), got {type(q).__name__}; an "
            "array that was never quantized needs no dequantize."
        )
    try:
        out = np.dtype(q.dtype if dtype is None else dtype)
    except TypeError:
        raise TypeError(
            f"dequantize: dtype must be a floating-point dtype such as jnp.float32, got {dtype!r}."
        ) from None
    if not np.issubdtype(out, np.floating) and out.name not in ("bfloat16",):
        raise TypeError(f"dequantize: dtype must be a floating-point dtype, got {out}.")
    return _dequantize(q, out)


@functools.partial(jax.jit, static_argnums=1)
def _dequantize(q: QArray, dtype: np.dtype) -> jax.Array:
    spec = q.spec
    plan = spec.granularity.plan(q.shape)
    values = q.values
    if spec.element.packed:
        n = q.shape[-1] if q.shape else 1
        values = unpack(values, spec.element.bits, n)
        if not q.shape:
            values = values.reshape(())
    v = widen(decode(values, spec.element).reshape(plan.view), dtype)
    s32 = q.scale.astype(jnp.float32)
    if spec.format.tensor_scale:
        if q.tensor_scale is None:
            raise ValueError(
                f"dequantize: a {spec.format.name} QArray needs its tensor_scale (the float32 "
                "per-tensor scale); rebuild it with jq.quantize."
            )
        # The effective block scale b / S, one correctly rounded division per block, as
        # quantize.nvfp4_scales computes it for fake_quant.
        t = jnp.asarray(q.tensor_scale, jnp.float32).reshape(())
        s32 = rounding.divide(s32, jnp.broadcast_to(t, s32.shape))
    s = widen(s32, dtype)
    if q.zero_point is not None:
        out = (v - widen(q.zero_point.astype(jnp.float32), dtype)) * s
    elif spec.calibration is None:
        # A plain cast stores s = 1: XLA's CPU backend flushes float32 subnormals in a
        # multiply (bf16 9.18e-41 * 1 -> 0), a select does not.
        out = jnp.where(s == 1, v, v * s)
    else:
        out = v * s
    return out.reshape(q.shape).astype(dtype)
