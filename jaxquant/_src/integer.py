"""Integer-only inference arithmetic (Jacob et al. 2018, gemmlowp / TFLite semantics).

A real value is ``r = S * (q - Z)`` with an 8-bit ``q``, a float scale ``S`` and an integer
zero point ``Z``. A dense layer ``r3 = r1 @ r2 + b`` becomes, in integers only,

    q3 = Z3 + M * sum_k (q1 - Z1)(q2 - Z2) + bias,   M = S1 * S2 / S3,

with the bias stored as int32 at scale ``S1 * S2`` and the real multiplier ``M`` stored as
a fixed-point pair: ``M = M0 * 2^-31 * 2^-shift`` with ``M0`` an int32 in ``[2^30, 2^31)``
(:func:`quantize_multiplier`). Applying it (:func:`multiply_by_quantized_multiplier`) is
gemmlowp's ``SaturatingRoundingDoublingHighMul`` (the high 32 bits of ``2 * a * M0``,
rounded half away from zero) followed by ``RoundingDivideByPOT`` (a rounding arithmetic
right shift), bit-exact to the reference C++ -- computed here with 32-bit integer limbs,
so it needs no ``jax_enable_x64``.

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

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
_INT32_MIN = np.int32(np.iinfo(np.int32).min)
_INT32_MAX = np.int32(np.iinfo(np.int32).max)


def quantize_multiplier(m: jax.typing.ArrayLike) -> tuple[Array, Array]:
    """``(M0, shift)`` with ``m = M0 * 2^-31 * 2^-shift``, ``M0`` int32 in [2^30, 2^31).

    Args:
      m: positive real multiplier(s), e.g. ``S1 * S2 / S3`` (any shape; float32 precision:
        ``M0`` holds its 24-bit mantissa exactly). ``shift`` may be negative (``m >= 1``:
        a left shift).

    Returns:
      int32 arrays ``M0`` and ``shift`` of ``m``'s shape.

    Example:
      >>> import jaxquant.integer as jqi
      >>> m0, shift = jqi.quantize_multiplier(0.3)
      >>> int(m0), int(shift), int(m0) * 2.0**-31 * 2.0 ** -int(shift)
      (1288490240, 1, 0.30000001192092896)
    """
    m = jnp.asarray(m, jnp.float32)
    if not jnp.issubdtype(m.dtype, jnp.floating):
        raise TypeError(f"quantize_multiplier: expected a float multiplier, got {m.dtype}.")
    mant, exp = jnp.frexp(m)  # m = mant * 2^exp, mant in [0.5, 1): exact
    m0 = jnp.round(mant * 2.0**31)  # exact: mant has 24 bits
    m0 = jnp.where(m > 0, m0, 0.0)
    return m0.astype(jnp.int32), (-exp).astype(jnp.int32)  # m0 <= 2^31 - 2^7: no overflow


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
    """gemmlowp ``SaturatingRoundingDoublingHighMul``: ``round(a * b / 2^31)`` (ties away
    from zero) of int32 ``a``, ``b``; ``INT32_MIN * INT32_MIN`` saturates to ``INT32_MAX``."""
    a = jnp.asarray(a, jnp.int32)
    b = jnp.asarray(b, jnp.int32)
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
    from zero, for int32 ``x`` and ``0 <= exponent <= 31``."""
    x = jnp.asarray(x, jnp.int32)
    e = jnp.asarray(exponent, jnp.int32)
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
    multiply, then a rounding right shift for ``shift > 0``."""
    x = jnp.asarray(x, jnp.int32)
    shift = jnp.asarray(shift, jnp.int32)
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
    """
    x = jnp.asarray(x)
    w = jnp.asarray(w)
    if w.dtype != jnp.int8:
        raise TypeError(f"integer dense: w must be int8 (symmetric), got {w.dtype}.")
    if x.dtype == jnp.uint8:  # shift into int8 for the s8 x s8 GEMM; fold 128 into Z1
        xs = (x.astype(jnp.int32) - 128).astype(jnp.int8)
        z1 = jnp.asarray(x_zero_point, jnp.int32) - 128
    elif x.dtype == jnp.int8:
        xs, z1 = x, jnp.asarray(x_zero_point, jnp.int32)
    else:
        raise TypeError(f"integer dense: x must be uint8 or int8, got {x.dtype}.")
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
    y = y + jnp.asarray(out_zero_point, jnp.int32)
    info = jnp.iinfo(out_dtype)
    lo = jnp.maximum(jnp.asarray(out_zero_point, jnp.int32), info.min) if relu else info.min
    return jnp.clip(y, lo, info.max).astype(out_dtype)
