"""Hypothesis properties of quantize / fake_quant: idempotence, range, monotonicity, sign
symmetry, the rounding error bound, and bitwise agreement of eager, jax.jit, jax.vmap and
the independent references of test_oracles.py for every format family and granularity.

Every property runs on float32 arrays of a fixed small shape with bounded finite values, so
each spec compiles once (the jitted functions are cached per spec outside the hypothesis
loop) and the examples only re-run the executable.
"""

import functools

import gfloat
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, reject, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

# The references of the bitwise-agreement section (numpy first principles, ml_dtypes, gfloat).
from test_oracles import (
    BINARY_SIGN,
    CASES,
    ROW,
    GfloatGrid,
    assert_bitwise,
    gfloat_info,
    near_grid,
    reference_mode,
    stored_codes,
    uint_view,
)
from test_oracles import GRANULARITIES as REF_GRANULARITIES
from test_oracles import run as run_in_mode

import jaxquant as jq

SHAPE = (8, 32)
BOUND = 1e3  # |x| <= BOUND, subnormals and zeros included
FORMATS = ["int8", "int4", "e4m3", "e2m1", "nf4"]
SETTINGS = settings(max_examples=30, deadline=None)
GRANULARITIES = {
    "per_tensor": jq.per_tensor(),
    "per_channel": jq.per_channel(-1),
    "per_block": jq.per_block(-1, 32),
}

# hypothesis' failure report trips a DeprecationWarning inside mypy_extensions, which the
# suite's warnings-as-errors would turn into an INTERNALERROR hiding the falsifying example.
pytestmark = pytest.mark.filterwarnings(
    "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"
)


def _arrays(shape=SHAPE, bound=BOUND):
    return hnp.arrays(
        np.float32,
        shape,
        elements=st.floats(-bound, bound, width=32, allow_nan=False, allow_infinity=False),
    )


@functools.cache
def _quantize(spec):
    return jax.jit(lambda x: jq.quantize(x, spec))


@functools.cache
def _quantize_with_scale(spec):
    return jax.jit(lambda x, s: jq.quantize(x, spec, scale=s))


@functools.cache
def _fake_quant(spec):
    return jax.jit(lambda x: jq.fake_quant(x, spec))


@functools.cache
def _fake_quant_with_scale(spec):
    return jax.jit(lambda x, s: jq.fake_quant(x, spec, scale=s))


@functools.cache
def _dequantize():
    return jax.jit(jq.dequantize)


@functools.cache
def _quantize_dequantize(spec):
    """x -> (scale, dequantize(quantize(x))) in one program."""

    def fn(x):
        q = jq.quantize(x, spec)
        return q.scale, jq.dequantize(q)

    return jax.jit(fn)


@functools.cache
def _roundtrip(spec):
    """x -> (q, quantize(dequantize(q), scale=q.scale)) in one program."""

    def fn(x):
        q = jq.quantize(x, spec)
        return q, jq.quantize(jq.dequantize(q), spec, scale=q.scale)

    return jax.jit(fn)


def _view(x, spec):
    """x viewed through the granularity plan (numpy), so it broadcasts against scales."""
    return np.asarray(x).reshape(spec.granularity.plan(tuple(np.shape(x))).view)


# ------------------------------------------------------------------------- idempotence


@pytest.mark.parametrize(
    ("fmt", "gran"),
    [(f, "per_channel") for f in FORMATS]
    + [("int8", "per_tensor"), ("nf4", "per_tensor")]
    + [("int4", "per_block"), ("e2m1", "per_block"), ("mxfp8", "per_block")],
)
@SETTINGS
@given(x=_arrays())
def test_requantize_with_same_scale_is_identity(fmt, gran, x):
    """quantize(dequantize(q), scale=q.scale) reproduces q's stored values and scale."""
    spec = jq.QuantSpec(fmt, GRANULARITIES[gran])
    q, q2 = _roundtrip(spec)(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(q2.values), np.asarray(q.values))
    np.testing.assert_array_equal(np.asarray(q2.scale), np.asarray(q.scale))
    assert q2.values.dtype == q.values.dtype


@pytest.mark.parametrize("fmt", FORMATS)
@SETTINGS
@given(x=_arrays())
def test_fake_quant_is_idempotent(fmt, x):
    """fake_quant(fake_quant(x)) == fake_quant(x) for per-tensor absmax (recalibrating)."""
    fq = _fake_quant(jq.QuantSpec(fmt))
    once = fq(jnp.asarray(x))
    twice = fq(once)
    np.testing.assert_array_equal(np.asarray(twice), np.asarray(once))


# ------------------------------------------------------------------------------- range


@pytest.mark.parametrize("calibration", ["absmax", "fixed"])
@pytest.mark.parametrize("fmt", FORMATS)
@SETTINGS
@given(x=_arrays())
def test_dequantized_values_lie_in_scaled_range(fmt, calibration, x):
    """Every x_hat lies in [qmin, qmax] * s of its group, also when a fixed range clips."""
    cal = jq.absmax() if calibration == "absmax" else jq.fixed(1.0)
    spec = jq.QuantSpec(fmt, jq.per_channel(-1), cal)
    scale, x_hat = _quantize_dequantize(spec)(jnp.asarray(x))
    x_hat = _view(x_hat, spec)
    s = np.asarray(scale, np.float32)
    qmin, qmax = spec.qrange
    assert np.all(x_hat >= np.float32(qmin) * s)
    assert np.all(x_hat <= np.float32(qmax) * s)


@pytest.mark.slow
@pytest.mark.parametrize("calibration", ["absmax", "fixed"])
@SETTINGS
@given(x=_arrays(shape=(16, 8)))
def test_symmetric_int8_never_emits_minus_128(calibration, x):
    """The restricted symmetric range: codes are in [-127, 127] in every column."""
    cal = jq.absmax() if calibration == "absmax" else jq.fixed(0.5)  # fixed: clips a lot
    spec = jq.QuantSpec("int8", jq.per_channel(-1), cal)
    values = np.asarray(_quantize(spec)(jnp.asarray(x)).values)
    assert values.dtype == np.int8
    assert values.min() >= -127
    # The negation of every representable code is representable.
    np.testing.assert_array_equal(
        np.asarray(_quantize(spec)(-jnp.asarray(x)).values), -values.astype(np.int16)
    )


@pytest.mark.parametrize("use_jit", [True, False])
def test_symmetric_int8_many_matrices_per_column(use_jit):
    """1000 random 16x8 matrices (Student-t, seed 12), one scale per (matrix, column): no
    code is -128, and each column whose largest magnitude is negative hits exactly -127."""
    x = np.random.default_rng(12).standard_t(2, (1000, 16, 8)).astype(np.float32)
    spec = jq.QuantSpec("int8", jq.per_channel(0, -1))
    fn = _quantize(spec) if use_jit else functools.partial(jq.quantize, spec=spec)
    values = np.asarray(fn(jnp.asarray(x)).values)
    assert values.min() == -127
    neg_max = np.abs(x.min(axis=1)) >= np.abs(x.max(axis=1))  # (1000, 8)
    np.testing.assert_array_equal(values.min(axis=1)[neg_max], -127)
    np.testing.assert_array_equal(values.max(axis=1)[~neg_max], 127)


# ------------------------------------------------------------------------ monotonicity

MONOTONE_FORMATS = ["e4m3", "e2m1", "e5m2", "int8", "int4", "uint8", "nf4", "ternary"]


@pytest.mark.parametrize("fmt", MONOTONE_FORMATS)
@SETTINGS
@given(x=_arrays(shape=(64,)), y=_arrays(shape=(64,)))
def test_fake_quant_is_monotone_for_a_fixed_scale(fmt, x, y):
    """x <= y elementwise implies fake_quant(x) <= fake_quant(y) (shared fixed scale)."""
    lo, hi = np.minimum(x, y), np.maximum(x, y)
    scale = jnp.float32(0.37)  # values up to 1e3 / 0.37 saturate every format
    fq = _fake_quant_with_scale(jq.QuantSpec(fmt))
    a = np.asarray(fq(jnp.asarray(lo), scale))
    b = np.asarray(fq(jnp.asarray(hi), scale))
    assert np.all(a <= b), (lo[a > b], hi[a > b], a[a > b], b[a > b])
    srt = np.sort(np.concatenate([x, y]))
    out = np.asarray(fq(jnp.asarray(srt[:64]), scale)), np.asarray(fq(jnp.asarray(srt[64:]), scale))
    assert np.all(np.diff(np.concatenate(out)) >= 0)


# ----------------------------------------------------------------------- sign symmetry

# nf4 is not symmetric (its codebook has 7 negative and 8 positive values) and binary
# rounds 0 to +1, so neither is in this list.
SYMMETRIC_FORMATS = ["int8", "int4", "e4m3", "e2m1", "ternary", "mxfp4", "mxfp8"]


@pytest.mark.parametrize(
    ("fmt", "gran"),
    [(f, "per_channel") for f in SYMMETRIC_FORMATS if not f.startswith("mx")]
    + [("mxfp4", "per_block"), ("mxfp8", "per_block"), ("e2m1", "per_block")]
    + [("int8", "per_tensor")],
)
@SETTINGS
@given(x=_arrays())
def test_sign_symmetry(fmt, gran, x):
    """fake_quant(-x) == -fake_quant(x) for symmetric specs with nearest rounding."""
    spec = jq.QuantSpec(fmt, GRANULARITIES[gran])
    fq = _fake_quant(spec)
    pos = np.asarray(fq(jnp.asarray(x)))
    neg = np.asarray(fq(jnp.asarray(-x)))
    np.testing.assert_array_equal(neg, -pos)


# ------------------------------------------------------------------------ exact ties


@functools.cache
def _exact_ties():
    """(x, s, codes): column j holds, for the scale s[j] (128 scales, seed 11), every
    x = fl((k + 1/2) s) with |k| < 127 for which x / s is exactly k + 1/2 (zero-padded);
    codes are the expected results, ties rounded half to even."""
    rng = np.random.default_rng(11)
    scales = (rng.uniform(1, 2, 128) / 127).astype(np.float32)
    k = np.arange(-126, 126) + 0.5
    x = np.zeros((len(k), len(scales)), np.float32)
    codes = np.zeros(x.shape)
    for j, s in enumerate(scales):
        col = (k * s).astype(np.float32)
        tie = col.astype(np.float64) / np.float64(s) == k
        x[: tie.sum(), j] = col[tie]
        codes[: tie.sum(), j] = np.round(k[tie])  # numpy rounds half to even
    return x, scales.reshape(1, -1), codes


@pytest.mark.parametrize("use_jit", [True, False])
def test_exact_ties_round_half_to_even(use_jit):
    """With a given scale s, an x with x / s = k + 1/2 exactly gets the even neighbour."""
    x, s, expected = _exact_ties()
    assert np.count_nonzero(x) > 500
    spec = jq.QuantSpec("int8", jq.per_channel(-1))
    eager = lambda a, scale: jq.quantize(a, spec, scale=scale)
    fn = _quantize_with_scale(spec) if use_jit else eager
    values = np.asarray(fn(jnp.asarray(x), jnp.asarray(s)).values)
    wrong = values != expected
    assert not wrong.any(), f"{wrong.sum()} of {np.count_nonzero(x)} exact ties rounded wrong"


# ------------------------------------------------------------------------- error bound


def _float_half_quantum(y, fmt):
    """Half the grid spacing of float format ``fmt`` at magnitude ``y`` (scaled domain)."""
    y = np.abs(y.astype(np.float64))
    e = np.floor(np.log2(np.where(y > 0, y, 1.0)))
    e = np.maximum(e, fmt.emin)
    return 0.5 * np.exp2(e - fmt.man_bits)


def _codebook_half_gap(y, fmt):
    """Half the gap between the two codebook values around ``y``."""
    c = np.asarray(fmt.codebook, np.float64)
    i = np.clip(np.searchsorted(c, y, side="left"), 1, len(c) - 1)
    return 0.5 * (c[i] - c[i - 1])


ERROR_FORMATS = ["int8", "int4", "uint4", "e4m3", "e5m2", "e2m1", "e3m2", "nf4", "mxfp8", "mxfp4"]


@pytest.mark.parametrize(
    ("fmt", "gran"),
    [(f, "per_channel") for f in ERROR_FORMATS if not f.startswith("mx")]
    + [(f, "per_block") for f in ("int4", "e2m1", "nf4", "mxfp8", "mxfp4")]
    + [("int8", "per_tensor"), ("e4m3", "per_tensor")],
)
@SETTINGS
@given(x=_arrays())
def test_error_is_at_most_half_a_step_inside_the_range(fmt, gran, x):
    """|x - x_hat| <= s/2 for ints, <= s * half an ulp of the format for floats, <= s * half
    the local gap for codebooks; only elements inside the range (|x| / s <= max) count."""
    spec = jq.QuantSpec(fmt, GRANULARITIES[gran])
    scale, x_hat = _quantize_dequantize(spec)(jnp.asarray(x))
    x_hat = _view(x_hat, spec).astype(np.float64)
    assert np.isfinite(x_hat).all()
    xv = _view(x, spec).astype(np.float64)
    s = np.asarray(scale, np.float64)
    y = xv / s
    f = spec.element
    qmin, qmax = spec.qrange
    tol = 1 + 2.0**-20  # x / s is rounded in float32: |x| = amax may give qmax (1 + eps)
    inside = (y >= qmin * tol) & (y <= qmax * tol)
    if f.kind == "int":
        half_step = np.full_like(y, 0.5)
    elif f.kind == "float":
        half_step = _float_half_quantum(y, f)
    else:
        half_step = _codebook_half_gap(y, f)
    # float32 arithmetic in x / s and v * s: a few ulps of |x| on top of the bound
    slack = 4 * np.finfo(np.float32).eps * (np.abs(xv) + np.abs(x_hat)) + 1e-30
    err = np.abs(xv - x_hat)
    bad = inside & (err > half_step * s + slack)
    assert not bad.any(), (xv[bad][:4], x_hat[bad][:4], (half_step * s)[bad][:4])
    if spec.format.kind != "mx" and f.signed:  # absmax: nothing is outside the range
        assert inside.all()


@pytest.mark.parametrize("fmt", [*FORMATS, "mxfp4"])
@SETTINGS
@given(x=_arrays())
def test_fake_quant_equals_dequantize_of_quantize(fmt, x):
    """fake_quant is dequantize(quantize(x)) bit for bit."""
    g = jq.per_block(-1, 32) if fmt.startswith("mx") else jq.per_channel(-1)
    spec = jq.QuantSpec(fmt, g)
    a = np.asarray(_fake_quant(spec)(jnp.asarray(x)))
    b = np.asarray(_quantize_dequantize(spec)(jnp.asarray(x))[1])
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("use_jit", [True, False])
@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
def test_mx_tiny_block_has_finite_scale(fmt, use_jit):
    """A block of finite, normal float32 values must not dequantize to NaN (the e8m0 scale
    2^-127 is a float32 subnormal, which XLA flushes to 0 on CPU; 0 encodes as e8m0's NaN)."""
    x = jnp.full((32,), 2.0**-126, jnp.float32)  # the smallest normal float32
    spec = jq.QuantSpec(fmt)
    quant = _quantize(spec) if use_jit else functools.partial(jq.quantize, spec=spec)
    q = quant(x)
    assert np.isfinite(np.asarray(q.scale, np.float32)).all()
    x_hat = np.asarray(jq.dequantize(q))
    assert np.isfinite(x_hat).all()
    np.testing.assert_array_equal(x_hat, np.asarray(jq.fake_quant(x, spec)))
    # 2^-126 is exactly representable as element * 2^k within e8m0's range
    np.testing.assert_array_equal(x_hat, np.asarray(x))


@pytest.mark.slow
def test_properties_also_hold_without_jit():
    """One eager run of each property on a fixed example (the tests above are jitted)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(SHAPE) * 10).astype(np.float32)
    spec = jq.QuantSpec("int8", jq.per_channel(-1))
    q = jq.quantize(jnp.asarray(x), spec)
    x_hat = jq.dequantize(q)
    q2 = jq.quantize(x_hat, spec, scale=q.scale)
    np.testing.assert_array_equal(np.asarray(q2.values), np.asarray(q.values))
    assert np.asarray(q.values).min() >= -127
    fq = np.asarray(jq.fake_quant(jnp.asarray(x), spec))
    np.testing.assert_array_equal(np.asarray(jq.fake_quant(jnp.asarray(-x), spec)), -fq)
    np.testing.assert_array_equal(fq, np.asarray(x_hat))
    s = np.asarray(q.scale)
    assert np.all(np.abs(x - fq) <= s / 2 * (1 + 1e-6))
    srt = np.sort(x.reshape(-1))
    out = np.asarray(jq.fake_quant(jnp.asarray(srt), jq.QuantSpec("e4m3"), scale=0.01))
    assert np.all(np.diff(out) >= 0)


# ------------------------------------------- eager, jit, vmap and numpy agree bitwise

# vmap over 2 arrays of (4, 64): 64 channels of 4, 8 blocks of 32. The rows have
# test_oracles.py's shape: eagerly and under jit, the rows run the programs compiled there.
BATCH = (2, *ROW)


# Dense arrays (no fill value) of |x| <= 2^40; magnitudes below 2^-40 become 0 in the test,
# so every group's scale is a normal float32 with room to spare (extreme ranges are
# test_oracles.py's). hypothesis' own choices bring zeros, ties and powers of two.
_BATCHES = hnp.arrays(
    np.float32,
    BATCH,
    elements=st.floats(-(2.0**40), 2.0**40, width=32, allow_subnormal=False),
    fill=st.nothing(),
)


@functools.cache
def _vmapped(spec):
    """x -> (quantize(x), dequantize(q), fake_quant(x)) under jax.jit(jax.vmap(...))."""

    def run(x):
        q = jq.quantize(x, spec)
        return q, jq.dequantize(q), jq.fake_quant(x, spec)

    return jax.jit(jax.vmap(run))


def _row(tree, i):
    return jax.tree_util.tree_map(lambda a: a[i], tree)


def _agree(ref, out, x, what):
    q, deq, fq = out
    assert_bitwise(stored_codes(q), ref.codes, f"{what}: codes", x)
    assert_bitwise(uint_view(np.asarray(q.scale)), ref.scale_bits, f"{what}: scale")
    if ref.zero_point is None:
        assert q.zero_point is None
    else:
        assert_bitwise(np.asarray(q.zero_point).astype(np.int64), ref.zero_point, f"{what}: z")
    assert_bitwise(deq, ref.x_hat, f"{what}: dequantize", x)
    # the sign of a zero: test_oracles.py::test_fake_quant_zero_has_the_sign_dequantize_gives
    assert_bitwise(np.asarray(fq) + 0, ref.x_hat + 0, f"{what}: fake_quant", x)


# The quick suite (-m "not slow") runs an integer and an MX case; the whole grid (every
# family and granularity, asymmetric included) is @slow. test_oracles.py's quick set has a
# case of every family against the same references.
QUICK = {("int8", "per_channel"), ("mxfp4", "per_block")}
AGREE_GRID = [
    pytest.param(
        case,
        gran,
        marks=(list(BINARY_SIGN) if case == "binary" else [])
        + ([] if (case, gran) in QUICK else [pytest.mark.slow]),
        id=f"{case}-{gran}",
    )
    for case in CASES
    for gran in REF_GRANULARITIES
    if not CASES[case].mx or gran == "per_block"
]
# Issue 11 item 7: under vmap, int8 of rows [[40.307384], [1.0]] got scale 0.31738096
# (40.307384 * fl32(1/127)), not 0.31738099; here every group of the first array.
_VMAP_ISSUE = np.stack([np.full(BATCH[1:], 40.307384, np.float32), np.ones(BATCH[1:], np.float32)])
# Every group (tensor, column, block) holds 1 and -2^-30: runs before the random examples.
_TINY_NEGATIVE = np.where(
    np.indices(BATCH).sum(axis=0) % 2 == 0, np.float32(1.0), np.float32(-(2.0**-30))
)


@pytest.mark.parametrize(("case", "gran"), AGREE_GRID)
@settings(
    # 6 drawn arrays of 512 floats per case (drawing them is a third of the test's time),
    # with the 2 explicit ones: 472 arrays over the grid
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.large_base_example, HealthCheck.too_slow],
)
@given(x=_BATCHES)
@example(x=_TINY_NEGATIVE)
@example(x=_VMAP_ISSUE)
def test_eager_jit_vmap_and_numpy_agree_bitwise(case, gran, x):
    """For every format family and granularity: quantize's stored codes, scale and zero point,
    dequantize and fake_quant are the same bits under jax.vmap (a batch of 2, against
    per-row calls), in the numpy reference, and eagerly or under jax.jit: the mode
    test_oracles.py::test_quantize_matches_reference runs the case in (eager and jit in turn
    over the granularities, so every family runs in every mode; each (spec, mode) is a
    compile); the quick cases in all three."""
    x = np.where(np.abs(x) < 2.0**-40, np.float32(0), x)
    c = CASES[case]
    jq_gran, ref_gran = REF_GRANULARITIES[gran]
    spec = c.spec(jq_gran)
    modes = ["eager", "jit"] if (case, gran) in QUICK else [reference_mode(case, gran)]
    batched = _vmapped(spec)(jnp.asarray(x))
    for i, row in enumerate(x):
        ref = c.reference(row, ref_gran)
        outs = [(mode, run_in_mode(row, spec, mode)) for mode in modes]
        for mode, out in [*outs, ("vmap", _row(batched, i))]:
            _agree(ref, out, row, f"{case} {gran} {mode} row {i}")


@st.composite
def _float_layouts(draw):
    """(exp_bits, man_bits, bias, nan_style) that float_format accepts, at most 12 bits (so
    every code is listed); biases up to 3 away from the default."""
    e = draw(st.integers(1, 7))
    m = draw(st.integers(1, 11 - e))
    style = draw(st.sampled_from(["fn", "fnuz", "none"] + (["ieee"] if e >= 2 else [])))
    bias = 2 ** (e - 1) - 1 + draw(st.integers(-3, 3))
    try:
        jq.formats.float_format(e, m, bias=bias, nan_style=style)
    except ValueError:
        reject()
    return e, m, bias, style


@pytest.mark.slow
@settings(max_examples=4, deadline=None)
@given(layout=_float_layouts(), saturate=st.booleans())
def test_any_float_format_casts_like_gfloat(layout, saturate):
    """Any float_format layout, drawn at random: under jax.jit and jax.vmap, a cast of every
    code's value and of the values around every grid point stores gfloat's code and returns
    gfloat's value."""
    e, m, bias, style = layout
    fi = gfloat_info(e, m, bias, style)
    fmt = jq.formats.float_format(e, m, bias=bias, nan_style=style)
    every = gfloat.decode_ndarray(fi, np.arange(2**fi.k, dtype=np.int64))
    with np.errstate(invalid="ignore", over="ignore"):
        x = np.concatenate([every.astype(np.float32), near_grid(every, fi.max)])
        if fi.num_nans == 0:
            x = x[~np.isnan(x)]
        x = np.stack([x, -x])
        r = GfloatGrid(fi).round(x, saturate)
    nan = np.isnan(r)
    codes = gfloat.encode_ndarray(fi, np.where(nan, 0.0, r)).astype(np.uint32)
    spec = jq.QuantSpec(fmt, calibration=None, saturate=saturate)
    jitted, vmapped = run_in_mode(x, spec, "jit"), _vmapped(spec)(jnp.asarray(x))
    for mode, (q, deq, fq) in (("jit", jitted), ("vmap", vmapped)):
        got = stored_codes(q)
        what = f"{fmt.name} saturate={saturate} {mode}"
        assert_bitwise(got[~nan], codes[~nan], f"{what}: codes", x[~nan])
        assert np.isnan(gfloat.decode_ndarray(fi, got[nan].astype(np.int64))).all(), what
        assert_bitwise(deq, r.astype(np.float32), f"{what}: dequantize", x)
        assert_bitwise(np.asarray(fq) + 0, r.astype(np.float32) + 0, f"{what}: fake_quant", x)
