"""Integer-only inference arithmetic (Jacob et al. 2018, gemmlowp / TFLite semantics).

A real value is ``r = S * (q - Z)`` with an 8-bit ``q``, a float scale ``S`` and an integer
zero point ``Z``. A dense layer ``r3 = r1 @ r2 + b`` becomes, in integers only,

    q3 = Z3 + M * sum_k (q1 - Z1)(q2 - Z2) + bias,   M = S1 * S2 / S3,

with the bias stored as int32 at scale ``S1 * S2`` and the real multiplier ``M`` stored as
a fixed-point pair: ``M = M0 * 2^-31 * 2^-shift`` with ``M0`` an int32 in ``[2^30, 2^31)``
(:func:`quantize_multiplier`). Applying it (:func:`multiply_by_quantized_multiplier`) is
gemmlowp's ``SaturatingRoundingDoublingHighMul`` (the high 32 bits of ``2 * a * M0``,
rounded to nearest, ties toward +infinity) followed by ``RoundingDivideByPOT`` (a rounding
arithmetic right shift), bit-exact to the reference C++ -- computed here with 32-bit integer limbs,
so it needs no ``jax_enable_x64``.

Arguments are checked while tracing, on static information: the dtype and shape of every
array (integer operands must be integer arrays int32 holds: a float is never silently
truncated), and the values of those given on the host (Python numbers, numpy arrays),
e.g. a shift outside ``-31..31``. Values of jax arrays, which may be traced, are not
checked.

:func:`dense` is the whole layer: a real int8 x int8 -> int32 ``dot_general`` (uint8
activations are shifted by -128 into int8 and the zero point is folded into a column-sum
correction), the int32 bias, the fixed-point requantization, the output zero point and
the clamp (a fused ReLU is a clamp at ``Z3``).

References:
  Jacob et al., "Quantization and Training of Neural Networks for Efficient
  Integer-Arithmetic-Only Inference", https://arxiv.org/abs/1712.05877; gemmlowp's
  fixedpoint.h.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant._src.checks import check_bool, check_real, describe

Array = jax.Array
_INT32_MIN = np.int32(np.iinfo(np.int32).min)
_INT32_MAX = np.int32(np.iinfo(np.int32).max)


def _array_info(x: Any) -> str:
    if hasattr(x, "dtype") and hasattr(x, "shape"):
        return f"{type(x).__name__} {np.dtype(x.dtype).name}{list(x.shape)}"
    return describe(x)


def _host(v: Any, what: str, kinds: str) -> np.ndarray | None:
    """``v`` as a numpy array when it lives on the host (Python numbers and sequences,
    numpy), None for jax arrays and tracers; a TypeError unless its dtype kind is one of
    ``kinds`` (numpy's: ``"i"``, ``"u"``, ``"f"``)."""
    if v is None or isinstance(v, bool | np.bool_ | str | bytes):
        raise TypeError(f"{what} must be an array or a number, got {describe(v)}.")
    if isinstance(v, jax.Array):  # device data, or a tracer: only its dtype is static
        if np.dtype(v.dtype).kind not in kinds:
            raise TypeError(f"{what} has the wrong dtype: got {_array_info(v)}.")
        return None
    a = np.asarray(v)
    if a.dtype.kind not in kinds:
        raise TypeError(f"{what} has the wrong dtype: got {_array_info(a)}.")
    return a


def _int32_operand(v: Any, what: str, lo: int = -(2**31), hi: int = 2**31 - 1) -> Array:
    """``v`` as an int32 array: an integer array int32 holds (jax) or integer values in
    ``[lo, hi]`` (host data)."""
    if isinstance(v, int) and not isinstance(v, bool):  # any size: before numpy sees it
        if not lo <= v <= hi:
            raise ValueError(f"{what} must be an integer in {lo}..{hi}, got {v}.")
        return jnp.asarray(v, jnp.int32)
    host = _host(v, what, "iu")
    if host is None:
        if not np.can_cast(v.dtype, np.int32):
            raise TypeError(
                f"{what} must be an integer array int32 holds (int8, uint8, int16, uint16, "
                f"int32), got {_array_info(v)}. Cast it with .astype(jnp.int32) if its "
                "values fit."
            )
        return jnp.asarray(v, jnp.int32)
    if host.size and not (lo <= host.min() and host.max() <= hi):
        bad = host.min() if host.min() < lo else host.max()
        raise ValueError(f"{what} must be an integer in {lo}..{hi}, got {bad}.")
    return jnp.asarray(host.astype(np.int64), jnp.int32)


def _data(v: Any, what: str) -> Array:
    if v is None or isinstance(v, str | bytes):
        raise TypeError(f"{what} must be an integer array, got {describe(v)}.")
    return jnp.asarray(v)


def _out_dtype(out_dtype: Any, what: str) -> np.dtype:
    try:
        dtype = np.dtype(out_dtype)
    except TypeError:
        dtype = None
    # The requantized value is int32: any integer type int32 holds can take it, clipped.
    if dtype is None or dtype.kind not in "iu" or not np.can_cast(dtype, np.int32):
        raise TypeError(
            f"{what} must be an integer dtype int32 holds (uint8 default, int8, int16, "
            f"uint16, int32), got {describe(out_dtype)}."
        )
    return dtype


def quantize_multiplier(m: jax.typing.ArrayLike) -> tuple[Array, Array]:
    """``(M0, shift)`` with ``m = M0 * 2^-31 * 2^-shift``, ``M0`` int32 in [2^30, 2^31).

    Args:
      m: positive real multiplier(s), e.g. ``S1 * S2 / S3`` (any shape; float32 precision:
        ``M0`` holds its 24-bit mantissa exactly). ``shift`` may be negative (``m >= 1``:
        a left shift).

    Returns:
      int32 arrays ``M0`` and ``shift`` of ``m``'s shape, ``shift`` in ``-31..31``. A
      multiplier below ``2^-32`` (every int32 product rounds to 0) and 0 give ``(0, 0)``.

    Raises:
      ValueError: a NaN, infinite, negative or ``>= 2^31`` multiplier given on the host
        (a Python number, numpy or a concrete jax array; traced values are not checked).
      TypeError: a multiplier that is not a number or a numeric array.

    Example:
      >>> import jaxquant.integer as jqi
      >>> m0, shift = jqi.quantize_multiplier(0.3)
      >>> int(m0), int(shift), int(m0) * 2.0**-31 * 2.0 ** -int(shift)
      (1288490240, 1, 0.30000001192092896)
    """
    what = "quantize_multiplier: m"
    if isinstance(m, numbers.Real) and not isinstance(m, bool | np.bool_):
        m = check_real(m, what, ge=0.0)
    host = _host(m, what, "iuf")
    if host is None:
        try:  # a concrete jax array: its values are known (this is setup, not a hot path)
            host = np.asarray(m)
        except jax.errors.TracerArrayConversionError:
            pass
    if host is not None:
        values = host.astype(np.float32)  # as computed: 2^31 - 1 rounds up to 2^31
        if not np.all(np.isfinite(values)) or np.any(values < 0) or np.any(values >= 2.0**31):
            bad = values[~(np.isfinite(values) & (values >= 0) & (values < 2.0**31))].flat[0]
            raise ValueError(
                f"{what} must be a finite multiplier in [0, 2^31) (S1 * S2 / S3 of positive "
                f"scales), got {bad!r}. M0 * 2^-31 * 2^-shift holds no other value: check "
                "the scales."
            )
    m = jnp.asarray(m, jnp.float32)
    mant, exp = jnp.frexp(m)  # m = mant * 2^exp, mant in [0.5, 1): exact
    m0 = jnp.round(mant * 2.0**31)  # exact: mant has 24 bits
    shift = -exp
    # m < 2^-32 (shift > 31, past rounding_divide_by_pot's range): |x m| < 2^31 2^-32 = 1/2
    # for every int32 x, so the exact result is 0: M0 = 0, shift = 0 (as TFLite does).
    keep = (m > 0) & (shift <= 31)
    m0 = jnp.where(keep, m0, 0.0)
    shift = jnp.where(keep, shift, 0)
    return m0.astype(jnp.int32), shift.astype(jnp.int32)  # m0 <= 2^31 - 2^7: no overflow


def _u32(x: Array) -> Array:
    return lax.bitcast_convert_type(x, jnp.uint32)


def _add64(h: Array, lo: Array, xh: Array, xl: Array) -> tuple[Array, Array]:
    """(h, lo) + (xh, xl) as unsigned 64-bit numbers in uint32 halves."""
    nl = lo + xl
    carry = (nl < lo).astype(jnp.uint32)
    return h + xh + carry, nl


def saturating_rounding_doubling_high_mul(
    a: jax.typing.ArrayLike, b: jax.typing.ArrayLike
) -> Array:
    """gemmlowp ``SaturatingRoundingDoublingHighMul``: ``round(a * b / 2^31)`` of int32
    ``a``, ``b``; ``INT32_MIN * INT32_MIN`` saturates to ``INT32_MAX``.

    Ties round toward +infinity (gemmlowp's nudge of ``2^30`` for a non-negative product,
    ``1 - 2^30`` for a negative one, then a division truncating toward zero): 1.5 -> 2,
    -1.5 -> -1.

    Example:
      >>> import jax, jax.numpy as jnp, jaxquant.integer as jqi
      >>> a = jnp.array([2**30, -(2**30), 2**30, -(2**31)], jnp.int32)
      >>> b = jnp.array([3, 3, 5, -(2**31)], jnp.int32)
      >>> jax.jit(jqi.saturating_rounding_doubling_high_mul)(a, b).tolist()  # 1.5 -1.5 2.5 2^31
      [2, -1, 3, 2147483647]
    """
    a = _int32_operand(a, "saturating_rounding_doubling_high_mul: a")
    b = _int32_operand(b, "saturating_rounding_doubling_high_mul: b")
    neg = (a < 0) != (b < 0)
    ua = jnp.where(a < 0, _u32(-a), _u32(a))  # |INT32_MIN| = 2^31 fits in uint32
    ub = jnp.where(b < 0, _u32(-b), _u32(b))
    m16 = jnp.uint32(0xFFFF)
    a1, a0 = ua >> 16, ua & m16
    b1, b0 = ub >> 16, ub & m16
    t1, t2 = a1 * b0, a0 * b1
    h, lo = a1 * b1, a0 * b0
    h, lo = _add64(h, lo, t1 >> 16, t1 << 16)
    h, lo = _add64(h, lo, t2 >> 16, t2 << 16)  # |a b| exactly, < 2^62
    neg = neg & ((h | lo) != 0)
    nudge = jnp.where(neg, jnp.uint32((1 << 30) - 1), jnp.uint32(1 << 30))
    h, lo = _add64(h, lo, jnp.zeros_like(h), nudge)
    mag = (h << 1) | (lo >> 31)  # floor((|a b| + nudge) / 2^31) < 2^31
    out = lax.bitcast_convert_type(mag, jnp.int32)
    out = jnp.where(neg, -out, out)
    return jnp.where((a == _INT32_MIN) & (b == _INT32_MIN), _INT32_MAX, out)


def rounding_divide_by_pot(x: jax.typing.ArrayLike, exponent: jax.typing.ArrayLike) -> Array:
    """gemmlowp ``RoundingDivideByPOT``: ``x / 2^exponent`` rounded to nearest, ties away
    from zero, for int32 ``x`` and ``0 <= exponent <= 31``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxquant.integer as jqi
      >>> x = jnp.array([5, 6, -5, -6, 7], jnp.int32)
      >>> jax.jit(jqi.rounding_divide_by_pot)(x, 2).tolist()  # 1.25, 1.5, -1.25, -1.5, 1.75
      [1, 2, -1, -2, 2]
    """
    x = _int32_operand(x, "rounding_divide_by_pot: x")
    e = _int32_operand(exponent, "rounding_divide_by_pot: exponent", 0, 31)
    mask = (jnp.int32(1) << e) - 1
    mask = jnp.where(e >= 31, _INT32_MAX, mask)
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0).astype(jnp.int32)
    return (x >> e) + (remainder > threshold).astype(jnp.int32)


def multiply_by_quantized_multiplier(
    x: jax.typing.ArrayLike, m0: jax.typing.ArrayLike, shift: jax.typing.ArrayLike
) -> Array:
    """``round(x * M0 * 2^-31 * 2^-shift)`` in int32 arithmetic (TFLite's
    ``MultiplyByQuantizedMultiplier``): a left shift for ``shift < 0``, the doubling high
    multiply, then a rounding right shift for ``shift > 0``.

    Args:
      x: int32 values (e.g. a dot's accumulators).
      m0, shift: the multiplier from :func:`quantize_multiplier`.

    Example:
      >>> import jax, jax.numpy as jnp, jaxquant.integer as jqi
      >>> m0, shift = jqi.quantize_multiplier(0.3)
      >>> x = jnp.array([10, 100, -7], jnp.int32)
      >>> jax.jit(jqi.multiply_by_quantized_multiplier)(x, m0, shift).tolist()  # 3, 30, -2.1
      [3, 30, -2]
    """
    fn = "multiply_by_quantized_multiplier"
    x = _int32_operand(x, f"{fn}: x")
    m0 = _int32_operand(m0, f"{fn}: m0", 0)
    # A left shift past 31 loses every bit; a right shift past 31, rounding_divide_by_pot's.
    shift = _int32_operand(shift, f"{fn}: shift", -31, 31)
    left = jnp.maximum(-shift, 0)
    right = jnp.maximum(shift, 0)
    y = saturating_rounding_doubling_high_mul(x << left, m0)
    return rounding_divide_by_pot(y, right)


def dense(
    x: jax.typing.ArrayLike,
    x_zero_point: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike,
    bias: jax.typing.ArrayLike | None,
    m0: jax.typing.ArrayLike,
    shift: jax.typing.ArrayLike,
    out_zero_point: jax.typing.ArrayLike,
    *,
    out_dtype: jax.typing.DTypeLike = jnp.uint8,
    relu: bool = False,
) -> Array:
    """Integer-only dense layer ``x @ w + bias`` with a fixed-point requantization.

    Args:
      x: activations ``[..., K]``, uint8 (or int8), real value ``S1 * (x - Z1)``.
      x_zero_point: ``Z1`` (int).
      w: weights ``[K, N]``, int8, symmetric (zero point 0): real value ``S2 * w`` with a
        scale per tensor or per output column.
      bias: int32 ``[N]`` at scale ``S1 * S2`` (``round(b / (S1 * S2))``), or None.
      m0, shift: :func:`quantize_multiplier` of ``S1 * S2 / S3``, scalar or ``[N]``.
      out_zero_point: ``Z3``.
      out_dtype: uint8 (default) or int8 output.
      relu: clamp the output at ``Z3`` (real value 0) as well.

    Returns:
      ``clip(Z3 + M * (sum_k (x - Z1) w + bias))`` in ``out_dtype``.

    Example:
      Real values ``x = [0, 1, -1, 2]`` (``S1 = 0.02``, ``Z1 = 128``), weights at
      ``S2 = 0.01``, bias ``[0, 0.1]``, output at ``S3 = 0.05``, ``Z3 = 128``:

      >>> import jax, jax.numpy as jnp, jaxquant.integer as jqi
      >>> x = jnp.array([[128, 178, 78, 228]], jnp.uint8)
      >>> w = jnp.array([[10, -20], [30, 40], [-50, 60], [70, 80]], jnp.int8)
      >>> bias = jnp.array([0, 500], jnp.int32)  # round(b / (S1 * S2))
      >>> m0, shift = jqi.quantize_multiplier(0.02 * 0.01 / 0.05)
      >>> y = jax.jit(jqi.dense)(x, 128, w, bias, m0, shift, 128)
      >>> y.dtype, y.tolist()  # real 0.05 * (y - 128) = [2.2, 1.5], as in float
      (dtype('uint8'), [[172, 158]])
    """
    fn = "integer dense"
    x, w = _data(x, f"{fn}: x"), _data(w, f"{fn}: w")
    if w.dtype != jnp.int8:
        raise TypeError(f"{fn}: w must be int8 (symmetric), got {_array_info(w)}.")
    if w.ndim != 2:
        raise ValueError(f"{fn}: w must be a [K, N] matrix, got shape {w.shape}.")
    if x.dtype not in (jnp.uint8, jnp.int8):
        raise TypeError(f"{fn}: x must be uint8 or int8, got {_array_info(x)}.")
    if x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(
            f"{fn}: x has shape {x.shape}; its last axis must be w's K = {w.shape[0]} "
            f"(w is {w.shape})."
        )
    out_dtype = _out_dtype(out_dtype, f"{fn}: out_dtype")
    relu = check_bool(relu, f"{fn}: relu")
    x_range, out_range = np.iinfo(x.dtype), np.iinfo(out_dtype)
    z1 = _int32_operand(x_zero_point, f"{fn}: x_zero_point", x_range.min, x_range.max)
    z3 = _int32_operand(out_zero_point, f"{fn}: out_zero_point", out_range.min, out_range.max)
    n = w.shape[1]

    def per_column(v: Any, name: str, lo: int = -(2**31), hi: int = 2**31 - 1) -> Array:
        v = _int32_operand(v, f"{fn}: {name}", lo, hi)
        if v.shape not in ((), (1,), (n,)):
            raise ValueError(
                f"{fn}: {name} must be a scalar or one value per output column ([N] = [{n}]), "
                f"got shape {v.shape}."
            )
        return v

    bias = None if bias is None else per_column(bias, "bias")
    m0 = per_column(m0, "m0", 0)
    shift = per_column(shift, "shift", -31, 31)
    if x.dtype == jnp.uint8:  # shift into int8 for the s8 x s8 GEMM; fold 128 into Z1
        xs = (x.astype(jnp.int32) - 128).astype(jnp.int8)
        z1 = z1 - 128
    else:
        xs = x
    dn = (((x.ndim - 1,), (0,)), ((), ()))
    acc = lax.dot_general(xs, w, dn, preferred_element_type=jnp.int32)

    def row(v: jax.typing.ArrayLike) -> Array:  # scalar or [N], laid out like acc's rows
        v = jnp.asarray(v, jnp.int32)
        return v.reshape((1,) * (acc.ndim - 1) + v.shape) if v.ndim else v

    colsum = jnp.sum(w.astype(jnp.int32), axis=0)
    acc = acc - z1 * row(colsum)  # sum_k (x - Z1) w = sum_k x w - Z1 sum_k w
    if bias is not None:
        acc = acc + row(bias)
    y = multiply_by_quantized_multiplier(acc, row(m0), row(shift))
    y = y + z3
    lo = jnp.maximum(z3, out_range.min) if relu else out_range.min
    return jnp.clip(y, lo, out_range.max).astype(out_dtype)
