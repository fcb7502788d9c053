"""Rounding: exact agreement with ml_dtypes casts, and unbiased stochastic rounding."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxquant as jq
from jaxquant._src import formats as F
from jaxquant._src import qarray, rounding

CAST_FORMATS = [
    f
    for f in F.all_formats()
    if f.kind == "float" and f.dtype is not None and f.bits <= 16 and f.man_bits > 0
]


# Every probe array of a width class has one length, so the eager runs of round_float /
# encode (op by op: one small program per primitive and shape) compile once for all the
# formats of the class instead of once per format: the random fill takes up the rest.
PROBES = {8: 22_000, 16: 300_000}  # formats of up to 8 bits, of 9 to 16 bits
N_RANDOM = 20_000  # at least this many random values in every probe array


def _probe_values(fmt, seed=0):
    """Every finite value, every tie between neighbours and the float32 numbers either side,
    overflow and specials, then random values over the whole range and the subnormals (at
    least N_RANDOM) up to the width class's fixed length."""
    rng = np.random.default_rng(seed)
    t = F.finite_values(fmt).astype(np.float64)
    ties = (t[1:] + t[:-1]) / 2
    near_ties = np.concatenate(
        [
            np.nextafter(ties.astype(np.float32), np.float32(np.inf)),
            np.nextafter(ties.astype(np.float32), np.float32(-np.inf)),
        ]
    )
    over = np.array([fmt.max * 1.01, fmt.max * 1.999, -fmt.max * 4, 1e38, -3e38])
    special = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0])
    fixed = np.concatenate([t, ties, near_ties, over, special])
    n_random = PROBES[8 if fmt.bits <= 8 else 16] - len(fixed)
    assert n_random >= N_RANDOM, (fmt.name, n_random)
    rnd = rng.standard_normal(n_random) * np.exp(
        rng.uniform(np.log(fmt.min_subnormal), np.log(fmt.max), n_random)
    )
    with np.errstate(over="ignore"):
        x = np.concatenate([fixed, rnd]).astype(np.float32)
    return x


def _same(a, b):
    """Equal as float32 bit-for-bit, except that any NaN equals any NaN."""
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    both_nan = np.isnan(a) & np.isnan(b)
    return both_nan | (a.view(np.uint32) == b.view(np.uint32))


def _ref_cast(x, fmt, saturate):
    if saturate:
        x = np.clip(x, np.float32(-fmt.max), np.float32(fmt.max))
    with np.errstate(invalid="ignore", over="ignore"):
        return x.astype(fmt.dtype).astype(np.float32)


@pytest.mark.parametrize("use_jit", [True, False])
@pytest.mark.parametrize("fmt", CAST_FORMATS, ids=lambda f: f.name)
def test_round_nearest_matches_ml_dtypes(fmt, use_jit):
    """round_float with saturate=False and True is ml_dtypes' cast (after clipping to +-max
    for saturate=True) bit for bit; under jit both come out of one program."""
    x = _probe_values(fmt)

    def fn(v):
        return tuple(rounding.round_float(v, fmt, saturate=sat) for sat in (False, True))

    outs = (jax.jit(fn) if use_jit else fn)(jnp.asarray(x))
    for saturate, out in zip((False, True), outs, strict=True):
        ours = np.asarray(out)
        ref = _ref_cast(x, fmt, saturate)
        if fmt.nan_style == "fnuz":  # no -0 in the format: compare values, not zero signs
            ours = ours + np.float32(0.0)
            ref = ref + np.float32(0.0)
        ok = _same(ours, ref)
        if not fmt.has_nan:  # fp6/fp4: NaN stays NaN in the value domain (storage maps it to 0)
            ok |= np.isnan(x) & np.isnan(ours)
        assert ok.all(), (saturate, x[~ok][:8], ours[~ok][:8], ref[~ok][:8])


@pytest.mark.parametrize("saturate", [False, True])
@pytest.mark.parametrize("use_jit", [True, False])
def test_bf16_add_and_truncate_rounding_matches(use_jit, saturate):
    """The integer RNE for bf16 gives exactly the ml_dtypes-verified emulation's values."""
    fmt = jq.formats.get("bf16")
    x = jnp.asarray(_probe_values(fmt, seed=5))
    fn = lambda v: rounding.round_float32_prefix(v, fmt, saturate=saturate)
    fast = np.asarray((jax.jit(fn) if use_jit else fn)(x))
    ref = np.asarray(rounding.round_float(x, fmt, saturate=saturate))
    ok = _same(fast, ref)
    assert ok.all(), (np.asarray(x)[~ok][:8], fast[~ok][:8], ref[~ok][:8])


@pytest.mark.slow
def test_saturation_semantics():
    # One jitted program for the three casts (the eager path is
    # test_round_nearest_matches_ml_dtypes's, on these values among others).
    e4m3, e5m2 = jq.formats.get("e4m3"), jq.formats.get("e5m2")

    @jax.jit
    def casts(x):
        return (
            rounding.round_float(x, e4m3),
            rounding.round_float(x, e4m3, saturate=False),
            rounding.round_float(x.at[0].set(1e5), e5m2, saturate=False),
        )

    sat, raw, e5m2_raw = map(
        np.asarray, casts(jnp.array([500.0, -1e6, jnp.inf, -jnp.inf, jnp.nan], jnp.float32))
    )
    np.testing.assert_array_equal(sat[:4], [448, -448, 448, -448])
    assert np.isnan(sat[4])
    assert np.isnan(raw[:4]).all()  # e4m3fn has no Inf: overflow is NaN, as in ml_dtypes
    np.testing.assert_array_equal(e5m2_raw[:4], [np.inf, -np.inf, np.inf, -np.inf])


@pytest.mark.slow
@pytest.mark.parametrize("fmt", [f for f in CAST_FORMATS if f.bits <= 8], ids=lambda f: f.name)
def test_emulated_encoding_matches_ml_dtypes_bits(fmt):
    """The emulated path (no dtype: binary search in the code table) produces the same bit
    patterns as ml_dtypes' own storage."""
    emulated = dataclasses.replace(fmt, dtype=None)
    x = _probe_values(fmt)
    v = rounding.round_float(jnp.asarray(x), emulated)
    codes = np.asarray(qarray.encode(v, emulated))
    ref = np.asarray(v).astype(fmt.dtype).view(np.uint8)
    if fmt.nan_style == "fnuz":
        ok = codes == ref
    else:
        ok = (codes == ref) | (np.isnan(np.asarray(v)))  # NaN has several codes
    assert ok.all(), (x[~ok][:5], codes[~ok][:5], ref[~ok][:5])
    back = np.asarray(qarray.decode(jnp.asarray(codes), emulated))
    v = np.asarray(v)
    if fmt.nan_style == "fnuz":
        back, v = back + np.float32(0), v + np.float32(0)
    fin = ~np.isnan(v)
    assert _same(back[fin], v[fin]).all()
    assert (np.isnan(back[~fin]) == fmt.has_nan).all()


@pytest.mark.slow
@pytest.mark.parametrize("e,m", [(3, 3), (5, 3), (2, 2), (6, 2)])
def test_emulated_rounding_is_nearest_on_the_grid(e, m):
    """For formats ml_dtypes lacks: the result is the nearest grid value, ties to even code."""
    fmt = jq.formats.float_format(e, m)
    grid = F.finite_values(fmt)
    x = _probe_values(fmt, seed=1)
    # zeros in place of the values off the grid's range: the length stays the class's
    x = np.where(np.isfinite(x) & (np.abs(x) <= fmt.max), x, np.float32(0))
    r = np.asarray(rounding.round_float(jnp.asarray(x), fmt)).astype(np.float64)
    assert np.isin(r, grid).all()
    # The nearest grid value is one of x's two neighbours in the sorted grid.
    x64 = x.astype(np.float64)
    i = np.clip(np.searchsorted(grid, x64, side="right"), 1, len(grid) - 1)
    below, above = x64 - grid[i - 1], grid[i] - x64
    assert (below >= 0).all() and (above >= 0).all()
    np.testing.assert_array_equal(np.abs(r - x64), np.minimum(below, above))
    # ties: the chosen value has an even mantissa field (encoded whole: one shape for all)
    ties = below == above
    assert ties.sum() > 10
    man = np.asarray(qarray.encode(jnp.asarray(r, jnp.float32), fmt))[ties] & (2**m - 1)
    assert (man % 2 == 0).all()


# ------------------------------------------------------------------ stochastic rounding

SR_CASES = ["bf16", "fp16", "e4m3", "e5m2", "e2m3", "e3m2", "e2m1", "e3m3"]


def _neighbours(fmt, x):
    grid = F.finite_values(fmt).astype(np.float64)
    i = np.searchsorted(grid, x, side="right")
    lo = grid[np.clip(i - 1, 0, len(grid) - 1)]
    hi = grid[np.clip(i, 0, len(grid) - 1)]
    return lo, hi


# hash (the default, cheap to compile) for every format; threefry (jax.random.bits, whose
# bits do not depend on the format and whose program takes 5x hash's to compile) for every
# other one, which still runs it through each rounding path: bf16's integer
# add-and-truncate and round_float's fp8, fp6 and fp4 grids.
SR_RNGS = [
    pytest.param(name, rng, id=f"{name}-{rng}")
    for i, name in enumerate(SR_CASES)
    for rng in (["hash", "threefry"] if i % 2 == 0 else ["hash"])
]


@pytest.mark.parametrize(("name", "rng"), SR_RNGS)
def test_stochastic_rounding_unbiased_float(name, rng):
    """E[SR(x)] = x and Var = p(1-p) q^2 for values across the range, subnormals included.

    N = 20000 samples per value; the mean must be within 6 standard errors of x, where the
    standard error is q sqrt(p(1-p)/N) (p = the probability of rounding up), plus the 2^-24
    resolution of the noise. The sample variance is within 25% of p(1-p) q^2.
    """
    fmt = jq.formats.get(name)
    rs = np.random.default_rng(0)
    grid = F.finite_values(fmt)
    pos = grid[(grid > 0) & (grid < fmt.max)]
    picks = rs.choice(len(pos) - 1, 12)
    frac = rs.uniform(0.05, 0.95, 12)
    x = (pos[picks] + frac * (pos[picks + 1] - pos[picks])).astype(np.float32)
    x = np.concatenate([x, -x, [pos[0] * 0.3]]).astype(np.float32)  # subnormal/underflow too
    n = 20000
    keys = jax.random.split(jax.random.key(42), n)
    spec = jq.QuantSpec(fmt, calibration=None, rounding="stochastic", rng=rng)

    @jax.jit
    def sample(k):
        return jq.fake_quant(jnp.asarray(x), spec, key=k)

    # vmap, not lax.map: XLA's CPU while loop flushes float32 subnormals in its outputs
    s = np.asarray(jax.vmap(sample)(keys), np.float64)  # [n, len(x)]
    lo, hi = _neighbours(fmt, x.astype(np.float64))
    assert np.all((s == lo) | (s == hi))  # only the two neighbours
    q = hi - lo
    p = (x - lo) / q
    se = q * np.sqrt(p * (1 - p) / n)
    err = np.abs(s.mean(0) - x)
    assert np.all(err <= 6 * se + q * 2.0**-24), (x, err / se)
    var = s.var(0)
    np.testing.assert_allclose(var, p * (1 - p) * q**2, rtol=0.25)


@pytest.mark.parametrize("name", ["int8", "int4", "nf4", "ternary"])
def test_stochastic_rounding_unbiased_int_and_codebook(name):
    spec = jq.QuantSpec(name, calibration=jq.fixed(1.0), rounding="stochastic")
    x = jnp.asarray(np.random.default_rng(1).uniform(-0.99, 0.99, 64).astype(np.float32))
    n = 20000
    keys = jax.random.split(jax.random.key(7), n)
    s = np.asarray(jax.vmap(lambda k: jq.fake_quant(x, spec, key=k))(keys), np.float64)
    scale = 1.0 / spec.qrange[1]
    grid = np.unique(s)
    xs = np.asarray(x, np.float64)
    i = np.searchsorted(grid, xs, side="right")
    lo = grid[i - 1]
    hi = grid[np.minimum(i, len(grid) - 1)]
    q = np.maximum(hi - lo, scale * 1e-6)
    p = (xs - lo) / q
    se = q * np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(s.mean(0) - xs) <= 6 * se + 1e-6)


def test_nearest_is_deterministic_and_sr_needs_key():
    spec = jq.QuantSpec("e4m3", rounding="stochastic")
    with pytest.raises(ValueError, match="PRNG key"):
        jq.fake_quant(jnp.ones(4), spec)


@pytest.mark.slow
def test_random_bits_hash_quality():
    # One jitted program for the three draws (random_bits is element-wise integer math:
    # the eager path is test_random_bits_argument_errors_name_the_argument's).
    bits_of = jax.jit(lambda key: rounding.random_bits(key, (256, 1024)))
    k = jax.random.key(3)
    b = np.asarray(bits_of(k))
    u = np.asarray(jax.jit(rounding.uniform_from_bits)(jnp.asarray(b)))
    n = u.size
    assert abs(u.mean() - 0.5) < 6 * np.sqrt(1 / 12 / n)
    hist = np.bincount((u.ravel() * 64).astype(int), minlength=64)
    chi2 = ((hist - n / 64) ** 2 / (n / 64)).sum()
    assert chi2 < 63 + 6 * np.sqrt(2 * 63)  # 63 dof, 6 sigma
    # every bit position is fair, and neighbours are uncorrelated
    bits = (b[..., None] >> np.arange(32)) & 1
    assert np.all(np.abs(bits.mean(axis=(0, 1)) - 0.5) < 6 * 0.5 / np.sqrt(n))
    flat = u.reshape(-1)
    assert abs(np.corrcoef(flat[:-1], flat[1:])[0, 1]) < 6 / np.sqrt(n)
    # deterministic in the key, different across keys
    np.testing.assert_array_equal(b, np.asarray(bits_of(k)))
    b2 = np.asarray(bits_of(jax.random.key(4)))
    assert (b != b2).mean() > 0.99
    raw = np.asarray(rounding.random_bits(jax.random.PRNGKey(3), (8,)))
    assert raw.shape == (8,)


def test_bf16_sr_beats_rne_for_accumulation():
    """Adding 1e-3 to 1.0 a thousand times in bf16: RNE stalls at 1, SR tracks ~2."""
    spec_sr = jq.QuantSpec("bf16", calibration=None, rounding="stochastic")
    spec_rn = jq.QuantSpec("bf16", calibration=None)

    def run(spec):
        def body(i, acc):
            return jq.fake_quant(acc + 1e-3, spec, key=jax.random.fold_in(jax.random.key(0), i))

        return float(jax.lax.fori_loop(0, 1000, body, jnp.float32(1.0)))

    assert run(spec_rn) == 1.0
    assert abs(run(spec_sr) - 2.0) < 0.1


def test_ml_dtypes_types_are_what_we_think():
    assert jq.formats.get("e2m1").dtype == np.dtype(ml_dtypes.float4_e2m1fn)


@pytest.mark.slow
def test_stochastic_truncate_bf16_edges():
    bf16 = jq.formats.get("bf16")
    x = jnp.array(
        [1.0 + 2.0**-10, -(1.0 + 2.0**-10), 1e-39, 3.395e38, jnp.inf, jnp.nan, 0.0], jnp.float32
    )
    lo = np.asarray(rounding.round_float32_prefix(x, bf16, jnp.zeros(x.shape, jnp.uint32)))
    hi = np.asarray(
        rounding.round_float32_prefix(x, bf16, jnp.full(x.shape, 0xFFFFFFFF, jnp.uint32))
    )
    xb = np.asarray(x).view(np.uint32)
    trunc = (xb & np.uint32(0xFFFF0000)).view(np.float32)
    np.testing.assert_array_equal(lo[:3], trunc[:3])  # zero noise: truncation
    up = ((xb & np.uint32(0xFFFF0000)) + np.uint32(0x10000)).view(np.float32)
    np.testing.assert_array_equal(hi[:3], up[:3])  # maximal noise: one step away from zero
    assert hi[0] == 1.0 + 2.0**-7 and hi[1] == -(1.0 + 2.0**-7)
    assert hi[2] - lo[2] == np.float32(2.0**-133)  # a subnormal step, not flushed
    assert hi[3] == bf16.max == lo[3] and hi[4] == bf16.max  # saturates, never overflows
    assert np.isnan(lo[5]) and np.isnan(hi[5]) and lo[6] == 0 and hi[6] == 0


@pytest.mark.parametrize("fn", [rounding.div_rn, rounding.divide], ids=["div_rn", "divide"])
@pytest.mark.parametrize("use_jit", [True, False])
def test_div_rn_is_ieee_division(use_jit, fn):
    """Integer long division matches numpy's correctly rounded float32 division bit for bit
    (200k random pairs over 2^+-115 plus equal mantissas, powers of two and qmax-like
    divisors; subnormal dividends included, results below 2^-126 flush to 0)."""
    rng = np.random.default_rng(0)
    n = 200_000
    a = (rng.standard_normal(n) * np.exp(rng.uniform(-80, 80, n))).astype(np.float32)
    b = (rng.standard_normal(n) * np.exp(rng.uniform(-40, 40, n))).astype(np.float32)
    a[:1000] = b[:1000]
    b[1000:2000] = 127
    b[2000:3000] = 2.0 ** rng.integers(-20, 20, 1000)
    a[3000:4000] = 0
    a[4000:5000] = rng.uniform(1e-45, 1e-38, 1000).astype(np.float32)  # subnormal dividends
    with np.errstate(over="ignore", under="ignore"):
        ref = a / b
    call = jax.jit(fn) if use_jit else fn
    out = np.asarray(call(jnp.asarray(a), jnp.asarray(b)))
    normal = np.isfinite(ref) & ((np.abs(ref) >= 2.0**-126) | (ref == 0))
    if fn is not rounding.div_rn:  # XLA's CPU division flushes subnormal operands
        normal &= np.abs(a) >= 2.0**-126
    assert normal.sum() > 0.9 * n
    np.testing.assert_array_equal(out[normal].view(np.uint32), ref[normal].view(np.uint32))
    assert np.all(out[np.abs(ref) < 2.0**-126] == 0)


@pytest.mark.slow
@pytest.mark.parametrize("use_jit", [True, False])
def test_reciprocal_is_divide_one_by(use_jit):
    """reciprocal(b) is divide(1, b) bit for bit (the quantizers' per-group 1/s): every
    float32 exponent with random mantissas and both signs, the 2^126 flush boundary and its
    neighbours, zeros, subnormals, Inf and NaN. (Checked on all 2^32 bit patterns once.)"""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**23, (256, 64), dtype=np.uint32) | (
        np.arange(256, dtype=np.uint32)[:, None] << 23
    )
    b = np.concatenate([bits.view(np.float32).ravel(), -bits.view(np.float32).ravel()])
    edge = np.float32(2.0**126)
    special = np.array(
        [
            edge,
            np.nextafter(edge, np.float32(0)),
            np.nextafter(edge, np.float32(np.inf)),
            2.0**127,
            3.4e38,
            2.0**-126,
            1e-40,
            0.0,
            np.inf,
            np.nan,
            1.0,
            127.0,
        ],
        np.float32,
    )
    b = jnp.asarray(np.concatenate([b, special, -special]))
    ref = rounding.divide(jnp.ones_like(b), b)
    call = jax.jit(rounding.reciprocal) if use_jit else rounding.reciprocal
    out = call(b)
    np.testing.assert_array_equal(np.asarray(out).view(np.uint32), np.asarray(ref).view(np.uint32))


@pytest.mark.slow
def test_random_bits_argument_errors_name_the_argument():
    k = jax.random.key(0)
    for bad in (3, "key", None, jnp.zeros(2, jnp.float32)):
        with pytest.raises(TypeError, match=r"random_bits: key must be a PRNG key"):
            rounding.random_bits(bad, (4,))
    with pytest.raises(TypeError, match=r"random_bits: shape must be a tuple of ints"):
        rounding.random_bits(k, "x")
    with pytest.raises(TypeError, match=r"random_bits: shape\[0\] must be an int, got 2.5"):
        rounding.random_bits(k, (2.5,))
    with pytest.raises(ValueError, match=r"random_bits: shape\[1\] must be an int >= 0, got -1"):
        rounding.random_bits(k, [2, -1], impl="threefry")
    # numpy ints and lists are shapes too, with the same bits
    np.testing.assert_array_equal(
        rounding.random_bits(k, [np.int64(3), 5]), rounding.random_bits(k, (3, 5))
    )
