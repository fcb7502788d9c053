"""Rounding to a format's grid: round-to-nearest-even and stochastic, saturating by default.

Everything here maps float32 values to float32 values that lie exactly on a format's grid;
encoding those into storage bits is :mod:`jaxquant._src.qarray`'s job.

Float formats (any ``ExMy``) are rounded with integer exponent arithmetic, not by casting,
so the same code serves formats XLA has no type for. For ``|x|`` with float32 exponent
``e``, the grid spacing (quantum) is ``2^(max(e, emin) - m)``. Scaling by the inverse
quantum is exact (a power of two, applied in two halves so it never overflows), which
turns rounding into integer rounding: ``round_half_even`` for nearest, and
``floor(y) + [u < frac(y)]`` with ``u ~ U[0, 1)`` for stochastic rounding. The latter is
unbiased, ``E[SR(x)] = x``, up to the 2^-24 resolution of ``u``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant._src.checks import check_int, describe
from jaxquant._src.formats import Format

# ---------------------------------------------------------------------- random numbers


def _lowbias32(x: jax.Array) -> jax.Array:
    """Chris Wellons' lowbias32 integer hash: a bijection of uint32 with strong avalanche."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def check_key(key: Any, what: str) -> None:
    """A TypeError naming ``what`` unless ``key`` is a PRNG key: a typed key array from
    ``jax.random.key`` or a raw ``uint32[2]`` one from ``jax.random.PRNGKey`` (tracers of
    either pass: only the dtype and shape are looked at)."""
    if isinstance(key, jax.Array | np.ndarray):
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or (
            key.dtype == np.uint32 and key.ndim == 1 and key.shape[0] >= 2
        ):
            return
        got = f"an array of dtype {key.dtype} and shape {key.shape}"
    else:
        got = describe(key)
    raise TypeError(
        f"{what} must be a PRNG key from jax.random.key(seed) (or jax.random.PRNGKey(seed)), "
        f"got {got}."
    )


def _key_words(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two uint32 words from a typed or raw (uint32[2]) PRNG key."""
    check_key(key, "key")
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        data = jax.random.key_data(key)
    else:
        data = jnp.asarray(key)
    data = data.reshape(-1).astype(jnp.uint32)
    return data[0], data[-1]


def random_bits(key: jax.Array, shape: tuple[int, ...], *, impl: str = "hash") -> jax.Array:
    """uint32 random bits of ``shape`` from ``key``.

    ``impl="hash"`` hashes each element's linear index (times the golden-ratio constant,
    plus a per-key seed) with one lowbias32 round: element-wise, so XLA fuses it into the
    quantizer and it costs no extra pass over memory. ``impl="threefry"`` uses
    ``jax.random.bits`` (the JAX default generator).
    Both are deterministic functions of (key, shape).

    Args:
      key: a PRNG key (``jax.random.key``, or a legacy uint32 ``PRNGKey``).
      shape: the shape of the result, a tuple of non-negative ints.
      impl: ``"hash"`` or ``"threefry"``.

    Returns:
      A uint32 array of ``shape``.

    Example:
      >>> import jax, jaxquant as jq
      >>> bits = jq.random_bits(jax.random.key(0), (2, 3))
      >>> bits.dtype, bits.shape
      (dtype('uint32'), (2, 3))
      >>> bool((bits == jq.random_bits(jax.random.key(0), (2, 3))).all())  # deterministic
      True
      >>> bool((bits == jq.random_bits(jax.random.key(1), (2, 3))).any())
      False
    """
    check_key(key, "random_bits: key")
    if not isinstance(shape, tuple | list):
        raise TypeError(f"random_bits: shape must be a tuple of ints, got {describe(shape)}.")
    shape = tuple(check_int(d, f"random_bits: shape[{i}]", lo=0) for i, d in enumerate(shape))
    if impl == "threefry":
        return jax.random.bits(key, shape, jnp.uint32)
    if impl != "hash":
        raise ValueError(f"rng impl must be 'hash' or 'threefry', got {impl!r}.")
    k0, k1 = _key_words(key)
    idx = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in range(len(shape) - 1, -1, -1):
        idx = idx + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    # Key words are mixed once per call (scalars); each element costs one hash round.
    seed = _lowbias32(_lowbias32(k0 ^ jnp.uint32(0x9E3779B9)) ^ k1)
    return _lowbias32(idx * jnp.uint32(0x9E3779B9) + seed)


def uniform_from_bits(bits: jax.Array) -> jax.Array:
    """float32 in [0, 1) on a 2^-24 grid from uint32 bits (top 24 bits used)."""
    return (bits >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)


# ---------------------------------------------------------------------- exact division


def _split(mag: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(significand in [2^23, 2^24), unbiased exponent) from the int32 bits of a positive
    finite non-zero float32 (integer ops only: XLA's CPU backend flushes subnormals)."""
    i = lambda v: lax.full_like(mag, v)
    biased = lax.bitwise_and(lax.shift_right_logical(mag, i(23)), i(0xFF))
    implicit = lax.select(lax.gt(biased, i(0)), i(1 << 23), i(0))
    sig = lax.bitwise_or(lax.bitwise_and(mag, i(0x7FFFFF)), implicit)
    shift = lax.max(lax.sub(lax.clz(sig), i(8)), i(0))  # normalise subnormals
    return lax.shift_left(sig, shift), lax.sub(lax.sub(lax.max(biased, i(1)), i(127)), shift)


def div_rn(a: jax.Array, b: jax.Array) -> jax.Array:
    """Correctly rounded float32 ``a / b`` (round half to even) on every backend.

    XLA does not promise IEEE division: it rewrites divisions by constants and broadcasts
    into multiplications by a rounded reciprocal, and on GPU its f32 division is not
    correctly rounded (1 ulp off for ~4% of random operands, seen on an H200). Scales are
    divided once per group, so jaxquant computes them with this integer long division: 25
    quotient bits plus a sticky bit, then round-to-nearest-even, exactly like IEEE 754.

    For finite ``a`` and finite non-zero ``b``; a zero ``a`` gives 0. Results below 2^-126
    flush to 0 and above float32's max overflow to Inf (XLA flushes subnormals anyway).
    """
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    a, b = jnp.broadcast_arrays(a, b)
    # One jitted call: the 25 unrolled steps (~200 equations) are traced once per shape,
    # not once per quantizer; lax.platform_dependent traces this branch even on CPU, where
    # it is dropped (it was 80% of a quantized training step's equations, issue 12 item 10).
    return _div_rn(a, b)


@jax.jit
def _div_rn(a: jax.Array, b: jax.Array) -> jax.Array:
    # lax primitives only, unrolled in Python: jnp's operators and jnp.where are jitted
    # functions whose every call costs a trace-time dispatch; this way the ~200 equations
    # trace in ~10 ms per shape instead of ~35 ms (issue 12 item 10: compile time).
    abits = lax.bitcast_convert_type(a, jnp.int32)
    bbits = lax.bitcast_convert_type(b, jnp.int32)
    i = lambda v: lax.full_like(abits, v)
    zero_i, one_i = i(0), i(1)
    neg = lax.ne(lax.lt(abits, zero_i), lax.lt(bbits, zero_i))
    amag = lax.bitwise_and(abits, i(0x7FFFFFFF))
    zero = lax.eq(amag, zero_i)
    ma, ea = _split(lax.select(zero, i(0x3F800000), amag))  # (1.0 stands in for 0)
    mb, eb = _split(lax.bitwise_and(bbits, i(0x7FFFFFFF)))
    low = lax.lt(ma, mb)  # quotient in (1/2, 1): take one more bit from the dividend
    rem = lax.select(low, lax.shift_left(ma, one_i), ma)
    e = lax.sub(lax.sub(ea, eb), lax.convert_element_type(low, jnp.int32))
    q = zero_i
    for _ in range(25):  # 24 significand bits and a guard bit
        bit = lax.ge(rem, mb)
        q = lax.bitwise_or(lax.shift_left(q, one_i), lax.convert_element_type(bit, jnp.int32))
        rem = lax.shift_left(lax.sub(rem, lax.select(bit, mb, zero_i)), one_i)
    sticky = lax.ne(rem, zero_i)
    guard = lax.eq(lax.bitwise_and(q, one_i), one_i)
    sig = lax.shift_right_logical(q, one_i)
    odd = lax.eq(lax.bitwise_and(sig, one_i), one_i)
    up = lax.bitwise_and(guard, lax.bitwise_or(sticky, odd))  # round half to even
    sig = lax.add(sig, lax.convert_element_type(up, jnp.int32))
    carry = lax.shift_right_logical(sig, i(24))  # rounding overflowed to 2.0
    sig = lax.shift_right_logical(sig, carry)
    biased = lax.add(lax.add(e, carry), i(127))
    field = lax.shift_left(lax.clamp(one_i, biased, i(254)), i(23))
    out = lax.bitcast_convert_type(
        lax.bitwise_or(field, lax.bitwise_and(sig, i(0x7FFFFF))), jnp.float32
    )
    f = lambda v: lax.full_like(out, v)
    out = lax.select(lax.gt(biased, i(254)), f(np.inf), out)
    out = lax.select(lax.bitwise_or(zero, lax.lt(biased, one_i)), f(0.0), out)
    return lax.select(neg, lax.neg(out), out)


def _sign_bit(x: jax.Array) -> jax.Array:
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    return lax.bitwise_and(bits, lax.full_like(bits, 0x80000000))


def _signed_zero(x: jax.Array) -> jax.Array:
    """+-0 with the sign of float32 ``x`` (bits: exact where XLA flushes subnormals)."""
    return lax.bitcast_convert_type(_sign_bit(x), jnp.float32)


def _signed_inf(x: jax.Array) -> jax.Array:
    """+-inf with the sign of float32 ``x``."""
    s = _sign_bit(x)
    return lax.bitcast_convert_type(lax.bitwise_or(s, lax.full_like(s, 0x7F800000)), jnp.float32)


def divide(a: jax.Array, b: jax.Array) -> jax.Array:
    """Correctly rounded float32 ``a / b`` for same-shaped arrays, fast where possible.

    On CPU, XLA's division between two full arrays is IEEE (the optimization barrier keeps
    it from being rewritten into a multiplication by a reciprocal); elsewhere (GPU, TPU)
    :func:`div_rn`. Results below 2^-126 are 0 on both paths; on CPU a subnormal operand
    also counts as 0 (XLA flushes it), which jaxquant's scales never depend on (they are
    clamped to >= 2^-126).
    """
    a, b = jnp.broadcast_arrays(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))

    def cpu(a: jax.Array, b: jax.Array) -> jax.Array:
        # The divisor must be as batched as the dividend: under vmap an unbatched ``b`` (a
        # constant such as qmax) reaches XLA as ``a / broadcast(b)``, which the algebraic
        # simplifier rewrites into ``a * broadcast(1/b)`` -- 1 ulp off (issue 11, item 7).
        # ``b * (0 * a + 1)`` (finite ``a`` only; XLA does not fold ``x * 0`` for floats)
        # ties ``b`` to ``a``'s batch dimensions at the cost of two flops per group.
        # (lax primitives, not jnp: jnp.where / copysign are jitted functions traced anew
        # for every scale shape, most of a quantized step's trace time -- issue 12 item 10.)
        f = lambda v: lax.full_like(a, v)
        finite_a = lax.select(lax.is_finite(a), a, f(0.0))
        b = lax.mul(b, lax.add(lax.mul(finite_a, f(0.0)), f(1.0)))  # b * 1 keeps -0's sign
        q = lax.div(a, lax.optimization_barrier(b))
        return lax.select(lax.lt(lax.abs(q), f(2.0**-126)), _signed_zero(q), q)

    return lax.platform_dependent(a, b, cpu=cpu, default=div_rn)


def reciprocal(b: jax.Array) -> jax.Array:
    """``divide(1, b)``, bit for bit, written so that a division is its last operation.

    The quantizers multiply every element by the reciprocal of its group's scale. XLA
    fuses cheap per-group operations into the per-element loop that consumes them (and
    redoes them for every element), but not a division. :func:`divide`'s CPU path ends in
    a select (the flush of results below 2^-126), which XLA fused into every quantizer
    loop; here the flush happens before the division instead: ``|1/b| < 2^-126`` exactly
    when ``|b| > 2^126`` (``1 / 2^126 = 2^-126``; for any larger ``b`` the exact quotient
    is below 2^-126 by more than half a subnormal ulp, so it cannot round up to it), and
    ``1 / +-inf`` is the zero of ``b``'s sign that :func:`divide` returns. NaN, zero and
    Inf divisors go through unchanged, as in :func:`divide`. Elsewhere (GPU, TPU) this is
    :func:`div_rn` as before.
    """
    b = jnp.asarray(b, jnp.float32)

    def cpu(b: jax.Array) -> jax.Array:
        big = lax.gt(lax.abs(b), lax.full_like(b, 2.0**126))
        b = lax.select(big, _signed_inf(b), b)
        return lax.div(lax.full_like(b, 1.0), lax.optimization_barrier(b))

    return lax.platform_dependent(b, cpu=cpu, default=lambda b: div_rn(jnp.ones_like(b), b))


# ------------------------------------------------------------- float64 <-> float32, exact


def float64_to_float32_odd(x: jax.Array) -> jax.Array:
    """float64 ``x`` rounded to float32 *to odd*: truncated toward zero, with the last bit
    set when anything nonzero was dropped (overflow gives +-max, NaN and Inf stay).

    Rounding that result to nearest-even onto any grid of at most 22 significand bits is the
    correctly rounded result of ``x`` itself (Boldo & Melquiond 2008: round-to-odd with
    ``p + 2`` bits), where a plain conversion would round twice (1.0625000000009095 would
    become e4m3's 1.0 instead of 1.125). Integer operations on the bits only: XLA's CPU
    backend flushes float32 subnormals in conversions.
    """
    b = lax.bitcast_convert_type(x.astype(jnp.float64), jnp.uint64)
    sign = ((b >> 63) << 31).astype(jnp.uint32)
    e64 = ((b >> 52) & 0x7FF).astype(jnp.int32)
    m64 = b & jnp.uint64(2**52 - 1)
    e = e64 - 1023
    # Normal float32 range: keep the top 23 fraction bits, OR the rest into the last bit.
    man = (m64 >> 29).astype(jnp.uint32)
    rest = (m64 & jnp.uint64(2**29 - 1)) != 0
    normal = ((e + 127).astype(jnp.uint32) << 23) | man | rest.astype(jnp.uint32)
    # Below 2^-126: a float32 subnormal, significand (2^52 + m64) >> (-97 - e).
    sig = jnp.where(e64 > 0, m64 | jnp.uint64(2**52), m64)
    shift = jnp.clip(-97 - e, 0, 63).astype(jnp.uint64)
    kept = sig >> shift
    lost = jnp.where(-97 - e > 63, sig != 0, (kept << shift) != sig)
    sub = jnp.where(-97 - e > 63, jnp.uint32(0), kept.astype(jnp.uint32)) | lost.astype(jnp.uint32)
    mag = jnp.where(e >= -126, normal, sub)
    mag = jnp.where(e > 127, jnp.uint32(0x7F7FFFFF), mag)  # overflow: max (odd)
    special = e64 == 0x7FF
    mag = jnp.where(
        special, jnp.where(m64 == 0, jnp.uint32(0x7F800000), jnp.uint32(0x7FC00000)), mag
    )
    return lax.bitcast_convert_type(sign | mag, jnp.float32)


def float32_to_float64(x: jax.Array) -> jax.Array:
    """float32 -> float64, exact for subnormals too (XLA's CPU conversion flushes them)."""
    b = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    sign = (b >> 31).astype(jnp.uint64) << 63
    e32 = ((b >> 23) & 0xFF).astype(jnp.int32)
    m = b & jnp.uint32(0x7FFFFF)
    lead = jnp.maximum(lax.clz(m).astype(jnp.int32) - 8, 0)  # subnormal: normalise
    sub_m = ((m << lead.astype(jnp.uint32)) & jnp.uint32(0x7FFFFF)).astype(jnp.uint64)
    sub = ((-126 - lead + 1023).astype(jnp.uint64) << 52) | (sub_m << 29)
    sub = jnp.where(m == 0, jnp.uint64(0), sub)
    normal = ((e32 - 127 + 1023).astype(jnp.uint64) << 52) | (m.astype(jnp.uint64) << 29)
    mag = jnp.where(e32 == 0, sub, normal)
    top = jnp.uint64(0x7FF << 52) | (m.astype(jnp.uint64) << 29)
    mag = jnp.where(e32 == 0xFF, top, mag)  # Inf and NaN keep their payload
    return lax.bitcast_convert_type(sign | mag, jnp.float64)


# ---------------------------------------------------------------------- rounding rules


def _exp2i(k: jax.Array) -> jax.Array:
    """Exact float32 2^k for int32 k in [-126, 127], built from bits."""
    return lax.bitcast_convert_type((k + 127).astype(jnp.int32) << 23, jnp.float32)


def round_to_integer(y: jax.Array, u: jax.Array | None) -> jax.Array:
    """Round float32 ``y`` to an integer: nearest-even if ``u`` is None, else stochastically.

    Stochastic: ``floor(y) + [u < y - floor(y)]``; ``y - floor(y)`` is exact in float32, so
    the probability of rounding up is ``frac(y)`` to within the resolution of ``u``.
    """
    if u is None:
        return jnp.round(y)  # half to even
    lo = jnp.floor(y)
    return lo + (u < (y - lo)).astype(y.dtype)


def round_float(
    x: jax.Array, fmt: Format, u: jax.Array | None = None, *, saturate: bool = True
) -> jax.Array:
    """Round float32 ``x`` onto the value grid of float format ``fmt``.

    Args:
      x: float32 array.
      fmt: a ``kind == "float"`` format (any ExMy, emulated or ml_dtypes-backed).
      u: uniform [0, 1) float32 noise of ``x.shape`` for stochastic rounding, or None for
        round-to-nearest-even.
      saturate: if True, finite overflow and +-Inf become +-max (PTX ``cvt.satfinite``
        semantics); if False, overflow becomes +-Inf where the format has Inf, else NaN
        (ml_dtypes cast semantics). Formats with neither (fp6, fp4) always saturate.

    Returns:
      float32 values, each exactly representable in ``fmt``. NaN stays NaN. The sign of
      zero follows ``x`` (numerically irrelevant; encoding to an ``fnuz`` format drops it).
    """
    if fmt.kind != "float" or fmt.man_bits == 0 or not fmt.signed:
        raise ValueError(
            f"round_float: {fmt.name} is not a signed float format with a mantissa (e8m0 is a "
            "scale format: use QuantSpec(..., scale_format='e8m0'))."
        )
    x = x.astype(jnp.float32)
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    biased = ((bits >> 23) & 0xFF).astype(jnp.int32)
    e = jnp.maximum(biased, 1) - 127
    neg_qe = fmt.man_bits - jnp.maximum(e, fmt.emin)  # -(exponent of the quantum)
    a = neg_qe // 2
    b = neg_qe - a
    y = (jnp.abs(x) * _exp2i(a)) * _exp2i(b)  # |x| / quantum, exact
    # XLA's CPU backend flushes float32 subnormals in multiplies (DAZ/FTZ). Formats whose
    # grid reaches below 2^-126 (bf16, fp32) take subnormal inputs and outputs through
    # integer arithmetic on the bits instead, so they round exactly like ml_dtypes.
    # (A grid whose quantum is 2^-126 still rounds float32 subnormals up to it.)
    sub_grid = fmt.emin - fmt.man_bits <= -126
    if sub_grid:
        is_sub = biased == 0
        mant = (bits & 0x7FFFFF).astype(jnp.float32)  # exact: < 2^23
        # |x| / quantum = mant * 2^-149 / 2^(emin - m), exact (a power-of-two multiply of
        # an integer below 2^23).
        y = jnp.where(is_sub, mant * jnp.float32(2.0 ** (fmt.man_bits - fmt.emin - 149)), y)
    r = round_to_integer(y, u)
    out = (r * _exp2i(-a)) * _exp2i(-b)
    fmax = jnp.float32(fmt.max)
    if saturate or fmt.nan_style == "none":
        out = jnp.minimum(out, fmax)  # also maps Inf to max; NaN propagates
    else:
        overflow_to = jnp.float32(np.inf if fmt.has_inf else np.nan)
        out = jnp.where(out > fmax, overflow_to, out)
    if sub_grid:  # select last: min/where would flush a subnormal result too
        # r * 2^(emin - m) as float32 bits: r << (emin - m + 149) (continuous across the
        # float32 subnormal / normal boundary).
        shift = jnp.uint32(fmt.emin - fmt.man_bits + 149)
        sub_out = lax.bitcast_convert_type(
            jnp.nan_to_num(r).astype(jnp.uint32) << shift, jnp.float32
        )
        out = jnp.where(is_sub, sub_out, out)
    return jnp.copysign(out, x)


def is_float32_prefix(fmt: Format) -> bool:
    """Whether ``fmt`` is float32 with the low mantissa bits dropped (bf16, e8m3...)."""
    return (
        fmt.kind == "float"
        and fmt.exp_bits == 8
        and fmt.bias == 127
        and fmt.signed
        and fmt.nan_style == "ieee"
        and 0 < fmt.man_bits < 23
    )


def round_float32_prefix(
    x: jax.Array, fmt: Format, bits: jax.Array | None = None, *, saturate: bool = True
) -> jax.Array:
    """Round to a float32-prefix format (bf16) by integer add-and-truncate of the bits.

    The ``k`` low bits that the format drops get an integer added before they are
    truncated: ``2^(k-1) - 1 + lsb`` rounds to nearest, ties to even (the carry may run
    into the exponent, as it should); uniform random ``[0, 2^k)`` (from ``bits``) rounds
    the magnitude up with probability exactly ``dropped / 2^k`` -- exactly unbiased
    stochastic rounding. Same values as :func:`round_float` (tested), a few integer
    operations per element, and nothing for XLA to flush or elide.
    """
    if not is_float32_prefix(fmt):
        raise ValueError(f"round_float32_prefix: {fmt.name} is not a float32-prefix format.")
    x = x.astype(jnp.float32)
    drop = 23 - fmt.man_bits
    xb = lax.bitcast_convert_type(x, jnp.uint32)
    if bits is None:
        r = jnp.uint32(2 ** (drop - 1) - 1) + ((xb >> drop) & jnp.uint32(1))
    else:
        r = bits >> jnp.uint32(32 - drop)
    mask = jnp.uint32(~(2**drop - 1) & 0xFFFFFFFF)
    out = lax.bitcast_convert_type((xb + r) & mask, jnp.float32)
    out = jnp.where(jnp.isnan(x), x, out)  # a NaN payload must not carry into the sign
    fmax = jnp.float32(fmt.max)
    if saturate:
        out = jnp.where(jnp.abs(out) > fmax, jnp.copysign(fmax, x), out)
    return out


def round_int(y: jax.Array, qmin: float, qmax: float, u: jax.Array | None = None) -> jax.Array:
    """Round float32 ``y`` to integers in [qmin, qmax] (clip after rounding; NaN stays NaN)."""
    return jnp.clip(round_to_integer(y, u), qmin, qmax)


def round_codebook(
    y: jax.Array, values: tuple[float, ...], u: jax.Array | None = None
) -> jax.Array:
    """Index (int32) of the codebook value ``y`` rounds to; ``y`` is clipped to the range first.

    Nearest: ties go to the value of smaller magnitude (and to +1 for binary's 0), so the
    rule is symmetric. Stochastic: the upper neighbour with probability
    ``(y - lo) / (hi - lo)``, which is unbiased inside the range. NaN maps to the index
    that 0 rounds to (the value nearest 0; binary's +1).
    """
    c = np.asarray(values, np.float32)
    n = len(c)
    yc = jnp.clip(y, c[0], c[-1])
    if n <= 16:  # compares and selects: element-wise, fused and vectorized by XLA
        count = sum((yc > float(v)).astype(jnp.int32) for v in c[:-1])
        hi_i = jnp.clip(count, 1, n - 1)
    else:
        hi_i = jnp.clip(jnp.searchsorted(jnp.asarray(c), yc, side="left"), 1, n - 1)
        hi_i = hi_i.astype(jnp.int32)
    lo_i = hi_i - 1
    lo = table_lookup(lo_i, c)
    hi = table_lookup(hi_i, c)
    if u is None:
        # Compare with each pair's exact midpoint (float64, from the table): the float32
        # distances yc - lo and hi - yc can round to a false tie (binary sent -1e-8 to +1).
        mid = (c[:-1].astype(np.float64) + c[1:]) / 2
        mid32 = mid.astype(np.float32)
        exact = mid32.astype(np.float64) == mid
        # Rounding up is yc > t, or yc == t where t is the midpoint itself and the tie goes
        # up (to the smaller magnitude; binary's 0 to +1); where the midpoint is not a
        # float32, t is the float32 just above it and yc == t is above it too.
        above = np.where(exact | (mid32 > mid), mid32, np.nextafter(mid32, np.float32(np.inf)))
        pair_hi = np.abs(c[1:]) < np.abs(c[:-1])
        pair_hi |= (np.abs(c[1:]) == np.abs(c[:-1])) & (c[1:] > 0)
        t = table_lookup(lo_i, above)
        incl = table_lookup(lo_i, (~exact | pair_hi).astype(np.float32)) > 0
        up = (yc > t) | ((yc == t) & incl)
    else:
        up = u * (hi - lo) < (yc - lo)
    idx = jnp.where(up, hi_i, lo_i)
    # NaN is stored as what 0 rounds to (binary has no 0: +1, as for y = 0 above).
    zero_i = int(np.flatnonzero(np.abs(c) == np.abs(c).min())[-1])
    return jnp.where(jnp.isnan(y), zero_i, idx)


def table_lookup(idx: jax.Array, table: np.ndarray) -> jax.Array:
    """``table[idx]`` (float32) for int32 ``idx`` in range; a select chain for tables of
    up to 16 entries (a gather is far slower on CPU), a gather beyond."""
    t = np.asarray(table, np.float32)
    if len(t) > 16:
        return jnp.asarray(t)[idx]
    out = jnp.full(idx.shape, t[0], jnp.float32)
    for k in range(1, len(t)):
        out = jnp.where(idx == k, jnp.float32(t[k]), out)
    return out
