"""Calibration: the range each method picks, against numpy, per scale group.

Scales from exact statistics (max, fixed) are compared in ULPs (``amax / qmax`` is rounded
once in float32); scales from means, variances and interpolated quantiles, which the
library accumulates in float32, with a relative tolerance. Data are seeded numpy draws.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq

SHAPE = (4, 16, 64)  # every granularity below gets several groups of different ranges

GRANULARITIES = {
    "per_tensor": (jq.per_tensor(), (0, 1, 2)),
    "per_channel(-1)": (jq.per_channel(-1), (0, 1)),
    "per_channel(0)": (jq.per_channel(0), (1, 2)),
    "per_block(-1,32)": (jq.per_block(-1, 32), (3,)),  # reduced axis of the blocked view
    "per_token": (jq.per_token(), (2,)),
}


def _data(shape=SHAPE, seed=0):
    """Gaussian data whose spread differs along every axis, so every group differs."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    for ax, n in enumerate(shape):
        x = x * np.exp(rng.uniform(-1, 1, n)).reshape(
            [n if i == ax else 1 for i in range(len(shape))]
        )
    return (x + 0.3).astype(np.float32)  # a non-zero mean exercises |mean| in mean_std


def _blocked(x, gran_name):
    """numpy view of x matching the granularity's plan (blocks for per_block)."""
    if gran_name.startswith("per_block"):
        return x.reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    return x


def _ulp_distance(a, b):
    """Elementwise distance in float32 ULPs (same-sign finite values)."""
    a = np.asarray(a, np.float32).view(np.int32).astype(np.int64)
    b = np.asarray(b, np.float32).view(np.int32).astype(np.int64)
    return np.abs(a - b)


@functools.cache
def _jit_quantize(spec):
    return jax.jit(lambda x: jq.quantize(x, spec))


@functools.cache
def _jit_fake_quant(spec):
    return jax.jit(lambda x: jq.fake_quant(x, spec))


def _quantize(x, spec, use_jit=True):
    fn = _jit_quantize(spec) if use_jit else functools.partial(jq.quantize, spec=spec)
    return fn(jnp.asarray(x))


def _fake_quant(x, spec, use_jit=True):
    fn = _jit_fake_quant(spec) if use_jit else functools.partial(jq.fake_quant, spec=spec)
    return np.asarray(fn(jnp.asarray(x)))


@functools.cache
def _jit_quantize_many(specs):
    """One jitted program quantizing the same x with several specs (one compile for a
    test's cases, not one per case)."""
    return jax.jit(lambda x: tuple(jq.quantize(x, spec) for spec in specs))


# ----------------------------------------------------------------- numpy references


def _np_amax(xv, axes, cal):
    """The symmetric clip threshold numpy computes for calibration name ``cal``."""
    a = np.abs(xv.astype(np.float64))
    absmax = a.max(axis=axes, keepdims=True)
    if cal == "absmax":
        return absmax
    if cal == "mean_std":
        mean = xv.mean(axis=axes, keepdims=True, dtype=np.float64)
        std = xv.astype(np.float64).std(axis=axes, keepdims=True)  # population std
        return np.minimum(absmax, np.abs(mean) + 2.5 * std)
    if cal == "percentile":
        return np.percentile(a, 99.0, axis=axes, keepdims=True)
    if cal == "fixed":
        return np.full(absmax.shape, 0.75)
    raise AssertionError(cal)


CALIBRATIONS = {
    "absmax": jq.absmax(),
    "mean_std": jq.mean_std(2.5),
    "percentile": jq.percentile(99.0),
    "fixed": jq.fixed(0.75),
}


RANGE_CASES = [
    *((c, "int8", g) for c in ("absmax", "mean_std", "percentile") for g in GRANULARITIES),
    ("absmax", "e4m3", "per_channel(-1)"),
    ("absmax", "e4m3", "per_block(-1,32)"),
    ("fixed", "int8", "per_tensor"),
    ("fixed", "int8", "per_block(-1,32)"),
]


@pytest.mark.parametrize(("cal", "fmt", "gran_name"), RANGE_CASES)
def test_symmetric_range_matches_numpy(cal, fmt, gran_name):
    """s = amax / qmax per group, amax from numpy's version of each calibration."""
    x = _data()
    gran, axes = GRANULARITIES[gran_name]
    spec = jq.QuantSpec(fmt, gran, CALIBRATIONS[cal])
    # Quantized in one program with the cases of the same calibration and format.
    group = tuple(
        jq.QuantSpec(f, GRANULARITIES[g][0], CALIBRATIONS[c])
        for c, f, g in RANGE_CASES
        if (c, f) == (cal, fmt)
    )
    q = _jit_quantize_many(group)(jnp.asarray(x))[group.index(spec)]
    amax = _np_amax(_blocked(x, gran_name), axes, cal)
    expected = (amax / spec.qrange[1]).astype(np.float32)
    scale = np.asarray(q.scale)
    assert scale.shape == expected.shape == spec.granularity.plan(SHAPE).scale_shape
    assert scale.dtype == np.float32
    if cal in ("absmax", "fixed"):  # a max is exact: only the division rounds
        assert _ulp_distance(scale, expected).max() <= 1
    else:  # means, variances and interpolated quantiles accumulate in float32
        np.testing.assert_allclose(scale, expected, rtol=2e-6 if cal == "percentile" else 2e-5)
    if len(np.unique(scale)) > 1:  # the groups really got ranges of their own
        assert np.ptp(scale) > 0.1 * scale.max()


@pytest.mark.parametrize("cal", list(CALIBRATIONS))
def test_symmetric_range_without_jit(cal):
    """The same per-tensor ranges eagerly and under jit."""
    x = _data(shape=(1024,), seed=1)
    spec = jq.QuantSpec("int8", calibration=CALIBRATIONS[cal])
    scale = np.asarray(_quantize(x, spec, use_jit=False).scale)
    expected = (_np_amax(x, (0,), cal) / 127).astype(np.float32)
    np.testing.assert_allclose(scale, expected, rtol=2e-5)
    jit_scale = np.asarray(_quantize(x, spec, True).scale)
    assert _ulp_distance(scale, jit_scale).max() <= 1


@pytest.mark.parametrize("gran_name", ["per_channel(-1)", "per_block(-1,32)"])
def test_scale_is_correctly_rounded(gran_name):
    """s is the float32 division amax / qmax, correctly rounded (as numpy computes it), also
    with many groups (XLA compiles a division by a broadcast as a multiplication by the
    reciprocal, 1 ulp off for ~5% of groups, unless the library prevents it)."""
    x = _data()
    gran, axes = GRANULARITIES[gran_name]
    scale = np.asarray(_quantize(x, jq.QuantSpec("int8", gran)).scale)
    amax = np.abs(_blocked(x, gran_name)).max(axis=axes, keepdims=True)
    np.testing.assert_array_equal(scale, amax / np.float32(127))


MINMAX_CASES = [
    *(
        (g, f, True)
        for g in ("per_tensor", "per_channel(-1)", "per_block(-1,32)")
        for f in ("int8", "uint8", "int4")
    ),
    ("per_channel(-1)", "int4", False),  # eager
]


@pytest.mark.parametrize(("gran_name", "fmt", "use_jit"), MINMAX_CASES)
def test_minmax_asymmetric_range(gran_name, fmt, use_jit):
    """s = (hi - lo) / (qmax - qmin) over [min(x, 0), max(x, 0)]; z = round(qmin - lo / s);
    0 is exact and the group's min and max are within half a step."""
    x = _data() + np.float32(1.0)  # mostly positive: the asymmetric range matters
    gran, axes = GRANULARITIES[gran_name]
    spec = jq.QuantSpec(fmt, gran, jq.minmax(), symmetric=False)
    if use_jit:  # in one program with the other jitted cases
        group = tuple(
            jq.QuantSpec(f, GRANULARITIES[g][0], jq.minmax(), symmetric=False)
            for g, f, j in MINMAX_CASES
            if j
        )
        q = _jit_quantize_many(group)(jnp.asarray(x))[group.index(spec)]
    else:
        q = _quantize(x, spec, use_jit)
    xv = _blocked(x, gran_name)
    lo = np.minimum(xv.min(axis=axes, keepdims=True), 0)
    hi = np.maximum(xv.max(axis=axes, keepdims=True), 0)
    qmin, qmax = spec.qrange
    s = np.asarray(q.scale)
    z = np.asarray(q.zero_point).astype(np.float64)
    assert s.shape == z.shape == spec.granularity.plan(SHAPE).scale_shape
    assert _ulp_distance(s, ((hi - lo) / np.float32(qmax - qmin)).astype(np.float32)).max() <= 1
    np.testing.assert_array_equal(z, np.clip(np.round(qmin - lo / s), qmin, qmax))
    x_hat = _blocked(np.asarray(jq.dequantize(q)), gran_name)
    np.testing.assert_array_equal(x_hat[xv == 0], 0)
    err = np.abs(x_hat - xv)
    assert np.all(err <= s / 2 * (1 + 1e-5) + 1e-7 * np.abs(xv))


@pytest.mark.parametrize("use_jit", [True, False])
def test_mean_std_asymmetric_and_percentile_asymmetric(use_jit):
    """Asymmetric mean_std clips to [max(min, mean - k std), min(max, mean + k std)];
    asymmetric percentile to the (100 - p)th and pth percentiles."""
    x = _data(shape=(4096,), seed=2) * np.float32(2) + np.float32(1)
    mean, std = x.mean(dtype=np.float64), x.astype(np.float64).std()
    cases = {
        jq.mean_std(2.0): (max(x.min(), mean - 2 * std), min(x.max(), mean + 2 * std)),
        jq.percentile(98.0): (np.percentile(x, 2.0), np.percentile(x, 98.0)),
    }
    for cal, (lo, hi) in cases.items():
        spec = jq.QuantSpec("uint8", calibration=cal, symmetric=False)
        q = _quantize(x, spec, use_jit)
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        np.testing.assert_allclose(np.asarray(q.scale), [(hi - lo) / 255], rtol=2e-5)
        np.testing.assert_allclose(
            np.asarray(q.zero_point, np.float64),
            [np.clip(np.round(-lo / ((hi - lo) / 255)), 0, 255)],
        )


@pytest.mark.parametrize("use_jit", [True, False])
def test_fixed_range(use_jit):
    """fixed(amax) and fixed((lo, hi)) ignore the data entirely."""
    x = _data(shape=(256,), seed=3)
    for data in (x, x * np.float32(100)):
        q = _quantize(data, jq.QuantSpec("int8", calibration=jq.fixed(2.0)), use_jit)
        assert _ulp_distance(np.asarray(q.scale), [np.float32(2.0) / np.float32(127)]).max() <= 1
        # symmetric spec with a (lo, hi) range: amax = max(-lo, hi)
        q = _quantize(data, jq.QuantSpec("int8", calibration=jq.fixed((-0.5, 3.0))), use_jit)
        assert _ulp_distance(np.asarray(q.scale), [np.float32(3.0) / np.float32(127)]).max() <= 1
        spec = jq.QuantSpec("uint8", calibration=jq.fixed((-0.5, 3.0)), symmetric=False)
        q = _quantize(data, spec, use_jit)
        s = np.float32(3.5) / np.float32(255)
        assert _ulp_distance(np.asarray(q.scale), [s]).max() <= 1
        assert int(np.asarray(q.zero_point)[0]) == round(0.5 / float(s))  # 36
        x_hat = np.asarray(jq.dequantize(q))
        assert x_hat.min() >= -0.5 - s and x_hat.max() <= 3.0 + s


# ----------------------------------------------------------------- non-finite values

ALL_CALIBRATIONS = {
    "absmax": jq.absmax(),
    "mean_std": jq.mean_std(3.0),
    "percentile": jq.percentile(99.0),
    "mse": jq.mse(16),
    "kl": jq.kl(128, 16),
}


@functools.cache
def _jit_both(spec):
    """quantize and fake_quant of a clean and a bad array, in one program."""
    both = lambda x: (jq.quantize(x, spec), jq.fake_quant(x, spec))
    return jax.jit(lambda clean, bad: (both(clean), both(bad)))


BAD = {100: np.inf, 500: -np.inf, 900: np.nan}  # position in x_bad -> non-finite value


@pytest.mark.parametrize("cal", [*ALL_CALIBRATIONS, "minmax"])
def test_non_finite_values_are_ignored(cal):
    """An Inf, a -Inf and a NaN give the scale of the array without them, and leave the
    other elements' quantized values unchanged; Inf saturates, NaN stays NaN."""
    x = _data(shape=(1021,), seed=4)
    x_bad = x
    for pos, v in BAD.items():
        x_bad = np.insert(x_bad, pos, np.float32(v))
    if cal == "minmax":
        spec = jq.QuantSpec("int8", calibration=jq.minmax(), symmetric=False)
    else:
        spec = jq.QuantSpec("int8", calibration=ALL_CALIBRATIONS[cal])
    (q_clean, y_clean), (q_bad, y_bad) = _jit_both(spec)(jnp.asarray(x), jnp.asarray(x_bad))
    assert np.isfinite(np.asarray(q_bad.scale)).all()
    np.testing.assert_allclose(np.asarray(q_bad.scale), np.asarray(q_clean.scale), rtol=1e-6)
    if cal == "minmax":
        np.testing.assert_array_equal(np.asarray(q_bad.zero_point), np.asarray(q_clean.zero_point))
    y_bad = np.asarray(y_bad)
    np.testing.assert_allclose(
        np.delete(y_bad, list(BAD)), np.asarray(y_clean), rtol=1e-6, atol=1e-7
    )
    assert np.isnan(y_bad[900])
    s = np.asarray(q_bad.scale, np.float64)[0]
    z = 0.0 if q_bad.zero_point is None else float(np.asarray(q_bad.zero_point)[0])
    qmin, qmax = spec.qrange
    np.testing.assert_allclose(y_bad[[100, 500]], [(qmax - z) * s, (qmin - z) * s], rtol=1e-6)


@pytest.mark.parametrize("cal", ["percentile", "kl"])
def test_non_finite_value_only_affects_its_own_group(cal):
    """per_channel(-1): an Inf in column 3 changes no other column's scale."""
    x = _data(shape=(128, 8), seed=5)
    x_bad = x.copy()
    x_bad[17, 3] = np.inf
    x_bad[40, 5] = np.nan
    spec = jq.QuantSpec("int8", jq.per_channel(-1), ALL_CALIBRATIONS[cal])
    s_clean = np.asarray(_quantize(x, spec).scale)
    s_bad = np.asarray(_quantize(x_bad, spec).scale)
    others = [c for c in range(8) if c not in (3, 5)]
    np.testing.assert_array_equal(s_bad[:, others], s_clean[:, others])
    # the affected columns get the scale of the column without the bad element
    col_spec = jq.QuantSpec("int8", calibration=ALL_CALIBRATIONS[cal])
    for row, col in ((17, 3), (40, 5)):
        alone = np.asarray(_quantize(np.delete(x[:, col], row), col_spec).scale)
        np.testing.assert_allclose(s_bad[0, col], alone[0], rtol=1e-6)


# ----------------------------------------------------------------- all-zero groups


@pytest.mark.parametrize(
    ("cal", "ste"),
    # fixed(0) used to be the plain-STE case; a zero fixed range now raises
    # (tests/test_bad_arguments.py, jq.fixed/amax/zero).
    [(c, "clipped") for c in [*ALL_CALIBRATIONS, "minmax"]] + [("absmax", "plain")],
)
def test_all_zero_group_gives_unit_scale_zero_output_finite_grads(cal, ste):
    x = _data(shape=(64, 8), seed=6)
    x[:, 2] = 0.0
    if cal == "minmax":
        spec = jq.QuantSpec("int8", jq.per_channel(-1), jq.minmax(), symmetric=False)
    else:
        spec = jq.QuantSpec("int8", jq.per_channel(-1), ALL_CALIBRATIONS[cal])

    @jax.jit
    def run(a):
        loss = lambda t: jnp.sum(jq.fake_quant(t, spec, ste=ste) ** 2)
        return jq.quantize(a, spec).scale, jq.fake_quant(a, spec, ste=ste), jax.grad(loss)(a)

    scale, y, g = (np.asarray(v) for v in run(jnp.asarray(x)))
    assert scale[0, 2] == 1.0
    assert np.isfinite(scale).all() and (scale > 0).all()
    np.testing.assert_array_equal(y[:, 2], 0.0)
    assert np.isfinite(y).all()
    assert np.isfinite(g).all()
    np.testing.assert_array_equal(g[:, 2], 0.0)  # d(y^2)/dx = 2 y = 0 through the STE
    # an all-zero tensor
    scale0, y0, g0 = (np.asarray(v) for v in run(jnp.zeros_like(jnp.asarray(x))))
    np.testing.assert_array_equal(scale0, 1.0)
    np.testing.assert_array_equal(y0, 0.0)
    np.testing.assert_array_equal(g0, 0.0)


# ------------------------------------------------------------------------ outliers

N_BULK = 65536  # standard normal samples (seed 7) ...
OUTLIERS = np.array([50.0, -50.0, 50.0, -50.0], np.float32)  # ... plus these four


@functools.cache
def _outlier_data():
    rng = np.random.default_rng(7)
    x = rng.standard_normal(N_BULK).astype(np.float32)
    pos = rng.choice(N_BULK, len(OUTLIERS), replace=False)
    x[pos] = OUTLIERS
    bulk = np.ones(N_BULK, bool)
    bulk[pos] = False
    return x, bulk


@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("cal", ["percentile", "mean_std", "mse"])
def test_clipping_calibrations_beat_absmax_with_outliers(cal, fmt):
    """65536 N(0, 1) samples and 4 outliers at +-50: absmax spends the grid on the outliers;
    the clipping calibrations give the Gaussian bulk a much lower MSE (mse() by >= 10%,
    its clip trades bulk error against outlier error; the others by >= 10x)."""
    calibration = {"percentile": jq.percentile(99.9), "mean_std": jq.mean_std(3.0)}.get(
        cal, jq.mse()
    )
    x, bulk = _outlier_data()
    err_abs = (_fake_quant(x, jq.QuantSpec(fmt)) - x) ** 2
    err_cal = (_fake_quant(x, jq.QuantSpec(fmt, calibration=calibration)) - x) ** 2
    factor = 0.9 if cal == "mse" else 0.1
    assert err_cal[bulk].mean() < factor * err_abs[bulk].mean()
    if cal == "mse":  # mse() minimizes the total error, so that can't be worse either
        assert err_cal.mean() <= err_abs.mean()


# ------------------------------------------------------------------------------ mse


def _column_mse(x, y):
    return ((y.astype(np.float64) - x) ** 2).sum(axis=0)


@functools.cache
def _mixed_columns():
    """512 x 6 (seed 8): Gaussian, Laplace, uniform, Gaussian + one outlier, Student-t(3),
    half-normal columns."""
    rng = np.random.default_rng(8)
    cols = [
        rng.standard_normal(512),
        rng.laplace(size=512),
        rng.uniform(-1, 1, 512),
        np.concatenate([rng.standard_normal(511), [30.0]]),
        rng.standard_t(3, 512) * 5,
        np.abs(rng.standard_normal(512)),
    ]
    return np.stack(cols, axis=1).astype(np.float32)


@pytest.mark.parametrize(
    ("fmt", "num"),
    [
        ("int8", 32),
        ("int4", 32),
        ("e2m1", 32),
        ("nf4", 32),
        ("int4", 2),  # candidates {min_ratio, 1.0}
    ],
)
def test_mse_never_worse_than_absmax_per_group(fmt, num):
    """mse() includes the ratio 1.0 (absmax) among its candidates, so per group its error
    is at most absmax's (up to float32 summation order)."""
    x = _mixed_columns()
    spec_abs = jq.QuantSpec(fmt, jq.per_channel(-1))
    spec_mse = jq.QuantSpec(fmt, jq.per_channel(-1), jq.mse(num))
    e_abs = _column_mse(x, _fake_quant(x, spec_abs))
    e_mse = _column_mse(x, _fake_quant(x, spec_mse))
    assert np.all(e_mse <= e_abs * (1 + 1e-5))
    if num == 32 and fmt != "int8":  # at <= 4 bits clipping pays somewhere, and mse() finds it
        assert np.any(e_mse < 0.95 * e_abs)


def test_mse_without_jit_matches_jit():
    x = _mixed_columns()
    spec = jq.QuantSpec("int4", jq.per_channel(-1), jq.mse(8))
    s_jit = np.asarray(_quantize(x, spec).scale)
    s_eager = np.asarray(_quantize(x, spec, use_jit=False).scale)
    assert _ulp_distance(s_jit, s_eager).max() <= 1


# ------------------------------------------------------- search calibrations per group


@pytest.mark.slow
@pytest.mark.parametrize(
    ("cal", "layout"),
    [(jq.mse(), "per_channel(0)"), (jq.kl(), "per_block(-1,512)")],
    ids=["mse-per_channel(0)", "kl-per_block(-1,512)"],
)
def test_search_calibrations_calibrate_each_group_on_its_own(cal, layout):
    """mse() / kl() per group == the same calibration on that group alone (per-tensor)."""
    cols = _mixed_columns()  # (512, 6): six differently shaped groups
    if layout == "per_channel(0)":
        x, gran = cols.T, jq.per_channel(0)
    else:  # the six columns laid end to end, one block each
        x, gran = cols.T.reshape(1, -1), jq.per_block(-1, 512)
    scales = np.asarray(_quantize(x, jq.QuantSpec("int4", gran, cal)).scale).ravel()
    alone = [_quantize(cols[:, j], jq.QuantSpec("int4", calibration=cal)).scale for j in range(6)]
    alone = np.asarray(jnp.concatenate(alone))
    assert len(np.unique(alone)) == 6
    assert _ulp_distance(scales, alone).max() <= 1


# ------------------------------------------------------------------------------- kl


@functools.cache
def _kl_data(name):
    rng = np.random.default_rng(9)
    n = 2**18
    return {
        "gauss": rng.standard_normal(n),
        "laplace": rng.laplace(size=n),
        "student_t3": rng.standard_t(3, n),
        "uniform": rng.uniform(-1, 1, n),
    }[name].astype(np.float32)


KL_FORMATS = ["int8", "int4", "e4m3"]


def _kl_threshold(x, fmt, use_jit=True):
    spec = jq.QuantSpec(fmt, calibration=jq.kl())
    if use_jit:  # the three formats' searches in one program (it compiles for 0.4 s each)
        group = tuple(jq.QuantSpec(f, calibration=jq.kl()) for f in KL_FORMATS)
        q = _jit_quantize_many(group)(jnp.asarray(x))[KL_FORMATS.index(fmt)]
    else:
        q = _quantize(x, spec, use_jit)
    return float(np.asarray(q.scale)[0]) * spec.qrange[1]


@pytest.mark.parametrize("fmt", KL_FORMATS)
@pytest.mark.parametrize("dist", ["gauss", "laplace", "student_t3", "uniform"])
def test_kl_threshold_at_most_absmax(dist, fmt):
    """The KL threshold lies in [amax / 8, amax] (its candidates) on 2^16 samples."""
    x = _kl_data(dist)[: 2**16]
    thr = _kl_threshold(x, fmt)
    amax = float(np.abs(x).max())
    assert 0 < thr <= amax * (1 + 1e-6)
    assert thr >= amax / 8 * (1 - 1e-6)  # the smallest candidate: bins // 8 of bins


@pytest.mark.slow
def test_kl_without_jit_matches_jit():
    x = _kl_data("laplace")[: 2**16]  # the jitted program of test_kl_threshold_at_most_absmax
    assert _kl_threshold(x, "int4", use_jit=False) == pytest.approx(_kl_threshold(x, "int4"))


@pytest.mark.slow
def test_kl_does_not_clip_uniform_data_at_int8():
    """Uniform data has no tail: any clipping only loses information (2^16 samples: the
    program of test_kl_threshold_at_most_absmax)."""
    x = _kl_data("uniform")[: 2**16]
    assert _kl_threshold(x, "int8") >= 0.9 * float(np.abs(x).max())


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_kl_lower_mse_than_absmax_on_laplace(fmt):
    """2^18 Laplace(0, 1) samples (seed 9): max |x| ~ 12.5 wastes the grid on the tail; the
    KL threshold gives a lower MSE than absmax."""
    x = _kl_data("laplace")
    mse_abs = np.mean((_fake_quant(x, jq.QuantSpec(fmt)) - x) ** 2)
    mse_kl = np.mean((_fake_quant(x, jq.QuantSpec(fmt, calibration=jq.kl())) - x) ** 2)
    assert mse_kl < mse_abs


# --------------------------------------------------------------- input dtypes


@pytest.mark.parametrize(
    ("cal", "dtype"),
    [
        ("absmax", jnp.float32),
        ("absmax", jnp.bfloat16),
        ("absmax", jnp.float16),
        ("percentile", jnp.bfloat16),
    ],
)
def test_calibration_of_low_precision_inputs(cal, dtype):
    """bf16/f16 inputs are calibrated on their exact float32 values."""
    x = jnp.asarray(_data(shape=(32, 64), seed=10)).astype(dtype)
    x32 = np.asarray(x.astype(jnp.float32))
    spec = jq.QuantSpec("int8", jq.per_channel(-1), CALIBRATIONS[cal])
    # quantize and fake_quant in one program: they share the calibration.
    q, y = jax.jit(lambda v: (jq.quantize(v, spec), jq.fake_quant(v, spec)))(x)
    scale = np.asarray(q.scale)
    expected = (_np_amax(x32, (0,), cal) / 127).astype(np.float32)
    np.testing.assert_allclose(scale, expected, rtol=2e-6)
    assert y.dtype == dtype


def test_mse_needs_two_candidates():
    with pytest.raises(ValueError, match="num >= 2"):
        jq.mse(1)
