"""Metrics: every one against numpy on data with a known answer, jitted and eager."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import metrics

JIT = [True, False]


def _call(fn, *args, use_jit=True):
    return (jax.jit(fn) if use_jit else fn)(*args)


def _gauss(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------------------- sqnr


@pytest.mark.parametrize("use_jit", JIT)
@pytest.mark.parametrize("snr_db", [10.0, 30.0, 60.0])
def test_sqnr_of_known_noise(snr_db, use_jit):
    """x_hat = x + noise with sum(noise^2) = sum(x^2) * 10^(-snr/10) exactly (float64, then
    rounded to float32): sqnr is that ratio in dB."""
    x = _gauss(4096, 0).astype(np.float64)
    noise = _gauss(4096, 1).astype(np.float64)
    noise *= np.sqrt(np.sum(x**2) * 10 ** (-snr_db / 10) / np.sum(noise**2))
    x32, xh32 = x.astype(np.float32), (x + noise).astype(np.float32)
    ref = 10 * np.log10(np.sum(x32.astype(np.float64) ** 2) / np.sum((x32 - xh32) ** 2.0))
    got = float(_call(metrics.sqnr, jnp.asarray(x32), jnp.asarray(xh32), use_jit=use_jit))
    assert got == pytest.approx(ref, abs=1e-3)
    assert got == pytest.approx(snr_db, abs=0.01)


@pytest.mark.parametrize("use_jit", JIT)
def test_sqnr_is_inf_when_exact(use_jit):
    x = jnp.asarray(_gauss((8, 8), 2))
    assert float(_call(metrics.sqnr, x, x, use_jit=use_jit)) == math.inf
    z = jnp.zeros((8, 8), jnp.float32)
    assert float(_call(metrics.sqnr, z, z, use_jit=use_jit)) == math.inf


GRID = np.arange(-127, 128, dtype=np.float32) * np.float32(0.5)  # k * 0.5, amax 63.5


# int8 in both modes, the plain casts in one each (each mode compiles its own programs).
@pytest.mark.parametrize(
    ("fmt", "x", "use_jit"),
    [
        ("int8", GRID, True),  # s = 63.5 / 127 = 0.5: every value is on the grid
        ("int8", GRID, False),
        ("bfloat16", GRID, False),  # plain casts of representable values
        ("float32", _gauss(64, 11), True),
    ],
    ids=["int8-jit", "int8-eager", "bfloat16-eager", "float32-jit"],
)
def test_sqnr_of_an_exact_qarray_is_inf(fmt, x, use_jit):
    cal = jq.absmax() if fmt == "int8" else None
    q = jq.quantize(jnp.asarray(x), jq.QuantSpec(fmt, calibration=cal))
    assert float(_call(metrics.sqnr, jnp.asarray(x), q, use_jit=use_jit)) == math.inf
    assert float(_call(metrics.max_abs_error, jnp.asarray(x), q, use_jit=use_jit)) == 0.0


def test_sqnr_ignores_non_finite_reference_elements():
    x = _gauss(256, 3)
    x_hat = x + np.float32(0.01)
    x_bad, xh_bad = x.copy(), x_hat.copy()
    x_bad[[3, 7]] = [np.inf, np.nan]
    xh_bad[[3, 7]] = [0.0, 5.0]
    keep = np.ones(256, bool)
    keep[[3, 7]] = False
    got = float(jax.jit(metrics.sqnr)(jnp.asarray(x_bad), jnp.asarray(xh_bad)))
    ref = float(jax.jit(metrics.sqnr)(jnp.asarray(x[keep]), jnp.asarray(x_hat[keep])))
    assert got == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("use_jit", JIT)
def test_sqnr_of_a_nan_approximation_is_not_exact(use_jit):
    """A NaN in x_hat (e.g. an overflowing cast) must not be reported as a perfect +inf dB."""
    x = jnp.asarray(_gauss(64, 10))
    x_hat = x.at[5].set(jnp.nan)
    got = float(_call(metrics.sqnr, x, x_hat, use_jit=use_jit))
    assert not got == math.inf
    assert math.isnan(got)  # like mse and max_abs_error, which propagate the NaN
    assert math.isnan(float(metrics.mse(x, x_hat)))
    assert math.isnan(float(metrics.max_abs_error(x, x_hat)))


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_sqnr_of_uniform_int_quantization_is_6_02_bits(bits):
    """2^20 samples of U(-1, 1) (seed 4), symmetric int-b, per-tensor absmax.

    The step is s = amax / (2^(b-1) - 1): the restricted range has 2^b - 1 levels, so the
    exact SQNR is 20 log10(2^b - 2) = 6.02 b + 20 log10(1 - 2^(1-b)) dB, i.e. 6.02 b dB
    within 0.3 dB for b >= 6 but 1.16 dB below it at b = 4. The estimate's standard error
    at this sample size is ~0.005 dB.
    """
    x = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, 2**20).astype(np.float32))
    spec = jq.QuantSpec(f"int{bits}")
    got = float(jax.jit(lambda a: metrics.sqnr(a, jq.fake_quant(a, spec)))(x))
    assert got == pytest.approx(20 * math.log10(2**bits - 2), abs=0.05)
    if bits >= 6:
        assert got == pytest.approx(6.02 * bits, abs=0.5)
    # with all 2^b codes (asymmetric minmax) the grid has 2^b - 1 steps over the range
    spec = jq.QuantSpec(f"int{bits}", calibration=jq.minmax(), symmetric=False)
    got = float(jax.jit(lambda a: metrics.sqnr(a, jq.fake_quant(a, spec)))(x))
    assert got == pytest.approx(20 * math.log10(2**bits - 1), abs=0.05)


# ---------------------------------------------------------------- mse / max error


# Each dtype in one mode (each (dtype, mode) compiles its own programs).
@pytest.mark.parametrize(("dtype", "use_jit"), [(jnp.float32, True), (jnp.bfloat16, False)])
def test_mse_and_max_abs_error_match_numpy(dtype, use_jit):
    x = jnp.asarray(_gauss((32, 16), 5)).astype(dtype)
    x_hat = jq.fake_quant(x, jq.QuantSpec("int4", jq.per_channel(-1)))
    assert x_hat.dtype == dtype
    xn = np.asarray(x.astype(jnp.float32), np.float64)
    xhn = np.asarray(x_hat.astype(jnp.float32), np.float64)
    mse = _call(metrics.mse, x, x_hat, use_jit=use_jit)
    mae = _call(metrics.max_abs_error, x, x_hat, use_jit=use_jit)
    assert mse.dtype == jnp.float32 and mse.shape == ()
    np.testing.assert_allclose(float(mse), np.mean((xn - xhn) ** 2), rtol=1e-5)
    assert float(mae) == np.float32(np.max(np.abs(xn - xhn)))
    assert float(mae) > 0


@pytest.mark.slow
@pytest.mark.parametrize("use_jit", JIT)
def test_metrics_accept_a_qarray(use_jit):
    x = jnp.asarray(_gauss((16, 32), 6))
    spec = jq.QuantSpec("e4m3", jq.per_block(-1, 16))
    q = jq.quantize(x, spec)
    x_hat = jq.dequantize(q)
    for fn in (metrics.mse, metrics.max_abs_error, metrics.sqnr, metrics.underflow_rate):
        a = _call(fn, x, q, use_jit=use_jit)
        assert a.dtype == jnp.float32 and a.shape == (), fn.__name__
        b = float(_call(fn, x, x_hat, use_jit=use_jit))
        assert float(a) == pytest.approx(b, rel=1e-5), fn.__name__  # fusion may reorder sums


def test_mse_and_max_error_skip_non_finite_reference():
    x = np.array([1.0, np.inf, -np.inf, np.nan, 2.0], np.float32)
    x_hat = np.array([1.5, 0.0, 0.0, 9.0, 1.0], np.float32)
    assert float(jax.jit(metrics.mse)(x, x_hat)) == pytest.approx((0.25 + 1.0) / 2)
    assert float(jax.jit(metrics.max_abs_error)(x, x_hat)) == 1.0
    empty = jnp.zeros((0,), jnp.float32)
    assert float(jax.jit(metrics.max_abs_error)(empty, empty)) == 0.0
    assert float(jax.jit(metrics.mse)(empty, empty)) == 0.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.mse(jnp.zeros((4,)), jnp.zeros((5,)))


# ------------------------------------------------------------- saturation / underflow

# |x| = 0.0005, 0.0015, ..., 1.9995 (4000 values, none on a range edge)
RAMP = ((np.arange(4000, dtype=np.float64) - 1999.5) / 1000).astype(np.float32)


# Each format once, the ints in both modes and e4m3 in both (each mode compiles its own
# programs): not the 3 x 2 product.
@pytest.mark.parametrize(
    ("fmt", "amax", "use_jit"),
    [("int8", 1.5, True), ("int4", 0.5, False), ("e4m3", 1.0, True), ("e4m3", 1.0, False)],
)
def test_saturation_rate_with_a_fixed_range(fmt, amax, use_jit):
    """fixed(amax): exactly the elements with |x| > amax are clipped."""
    spec = jq.QuantSpec(fmt, calibration=jq.fixed(amax))
    x = jnp.asarray(RAMP)
    rate = _call(lambda a: metrics.saturation_rate(a, jq.quantize(a, spec)), x, use_jit=use_jit)
    expected = np.mean(np.abs(RAMP) > amax)  # 0.25, 0.75, 0.5
    assert float(rate) == pytest.approx(expected, abs=1e-7)
    # the clipped elements are the ones that come back as +-amax
    x_hat = np.asarray(jq.fake_quant(x, spec))
    np.testing.assert_allclose(np.abs(x_hat[np.abs(RAMP) > amax]), amax, rtol=1e-6)


def test_saturation_rate_per_channel_and_asymmetric():
    x = np.stack([RAMP, RAMP * 2], axis=1)  # column 1 twice as wide
    spec = jq.QuantSpec("int8", jq.per_channel(-1), jq.fixed(1.0))
    rate = jax.jit(lambda a: metrics.saturation_rate(a, jq.quantize(a, spec)))(x)
    assert float(rate) == pytest.approx((0.5 + 0.75) / 2, abs=1e-7)
    # asymmetric [-0.5, 1.5]: the representable range is [(qmin - z) s, (qmax - z) s]
    spec = jq.QuantSpec("uint8", calibration=jq.fixed((-0.5, 1.5)), symmetric=False)
    q = jq.quantize(jnp.asarray(RAMP), spec)
    s, z = float(q.scale[0]), float(q.zero_point[0])
    lo, hi = (0 - z) * s, (255 - z) * s
    expected = np.mean((RAMP < np.float32(lo)) | (RAMP > np.float32(hi)))
    assert float(jax.jit(metrics.saturation_rate)(RAMP, q)) == pytest.approx(expected, abs=1e-7)
    # absmax never saturates
    q = jq.quantize(jnp.asarray(RAMP), jq.QuantSpec("int8"))
    assert float(metrics.saturation_rate(RAMP, q)) == 0.0
    with pytest.raises(TypeError, match="QArray"):
        metrics.saturation_rate(RAMP, RAMP)


def test_saturation_rate_ignores_non_finite():
    x = np.concatenate([RAMP, [np.nan, np.inf]]).astype(np.float32)
    q = jq.quantize(jnp.asarray(x), jq.QuantSpec("int8", calibration=jq.fixed(1.5)))
    assert float(jax.jit(metrics.saturation_rate)(x, q)) == pytest.approx(0.25, abs=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("use_jit", JIT)
def test_underflow_rate(use_jit):
    """int8 per-tensor absmax with amax = 1: |x| < s / 2 = 1/254 rounds to 0."""
    small = np.linspace(1e-4, 3e-3, 30, dtype=np.float32)  # all < 1/254 = 3.94e-3
    big = np.linspace(0.01, 1.0, 70, dtype=np.float32)
    x = np.concatenate([small, -small[:10], big, np.zeros(20, np.float32)])
    x_hat = jq.fake_quant(jnp.asarray(x), jq.QuantSpec("int8"))
    rate = _call(metrics.underflow_rate, jnp.asarray(x), x_hat, use_jit=use_jit)
    assert float(rate) == pytest.approx(40 / 110, abs=1e-7)  # the zeros don't count
    assert float(metrics.underflow_rate(x, x)) == 0.0
    z = np.zeros(4, np.float32)
    assert float(metrics.underflow_rate(z, z)) == 0.0


# ------------------------------------------------------------------ nan / inf count


@pytest.mark.parametrize("use_jit", JIT)
def test_nan_and_inf_count(use_jit):
    x = np.zeros((6, 7), np.float32)
    x[0, :3] = np.nan
    x[2, 1] = np.inf
    x[5, [0, 6]] = -np.inf
    assert int(_call(metrics.nan_count, jnp.asarray(x), use_jit=use_jit)) == 3
    assert int(_call(metrics.inf_count, jnp.asarray(x), use_jit=use_jit)) == 3
    # QArrays are counted after dequantizing: e4m3 keeps NaN (saturating Inf to 448),
    # int8 has no NaN code and stores NaN as 0
    for fmt, nans in (("e4m3", 3), ("int8", 0)):
        q = jq.quantize(jnp.asarray(x), jq.QuantSpec(fmt, calibration=jq.fixed(1.0)))
        assert int(_call(metrics.nan_count, q, use_jit=use_jit)) == nans
        assert int(_call(metrics.inf_count, q, use_jit=use_jit)) == 0


# ---------------------------------------------------------------- summary / report


@functools.cache
def _params():
    rng = np.random.default_rng(9)
    return {
        "dense": {
            "kernel": jnp.asarray(rng.standard_normal((32, 16)).astype(np.float32)),
            "bias": jnp.asarray(rng.standard_normal(16).astype(np.float32)),
        },
        "embed": jnp.asarray(rng.standard_normal((8, 32)).astype(np.float32)),
        "step": jnp.asarray(7, jnp.int32),
    }


@pytest.mark.slow
def test_summary_keys_and_values():
    x = _params()["dense"]["kernel"]
    q = jq.quantize(x, jq.QuantSpec("int8", jq.per_channel(-1)))
    s = jax.jit(metrics.summary)(x, q)
    assert set(s) == {
        "sqnr_db",
        "mse",
        "max_abs_error",
        "underflow_rate",
        "nan_in",
        "nan_out",
        "saturation_rate",
        "scale_clamp_rate",
        "bits_per_value",
    }
    x_hat = q.dequantize()
    # The single metrics in one program (eagerly: the tests above).
    sqnr, mse, mae = (
        float(v)
        for v in jax.jit(
            lambda a, b: (metrics.sqnr(a, b), metrics.mse(a, b), metrics.max_abs_error(a, b))
        )(x, x_hat)
    )
    assert float(s["sqnr_db"]) == pytest.approx(sqnr, rel=1e-5)
    assert float(s["mse"]) == pytest.approx(mse, rel=1e-5)
    # (under jit XLA may fuse x - v * s into an FMA: the last bits can differ)
    assert float(s["max_abs_error"]) == pytest.approx(mae, rel=1e-5)
    assert float(s["saturation_rate"]) == 0.0
    assert float(s["scale_clamp_rate"]) == 0.0
    assert int(s["nan_in"]) == int(s["nan_out"]) == 0
    assert float(s["bits_per_value"]) == pytest.approx(8 * (32 * 16 + 4 * 16) / (32 * 16))
    # an array x_hat: no saturation / bits entries
    assert "saturation_rate" not in jax.jit(metrics.summary)(x, x_hat)


@pytest.mark.slow
@pytest.mark.parametrize("use_jit", JIT)
def test_report_over_a_quantized_tree(use_jit):
    params = _params()
    spec = jq.QuantSpec("int4", jq.per_channel(-1))
    policy = lambda path, leaf: spec if leaf.ndim == 2 else None  # bias stays float

    def run(tree):
        return metrics.report(tree, jq.quantize_tree(tree, policy))

    rep = _call(run, params, use_jit=use_jit)
    assert set(rep) == {"['dense']['bias']", "['dense']['kernel']", "['embed']"}  # no 'step'
    assert float(rep["['dense']['bias']"]["sqnr_db"]) == math.inf  # not quantized: exact
    for k in ("['dense']['kernel']", "['embed']"):
        leaf = params["dense"]["kernel"] if k.startswith("['dense']") else params["embed"]
        x_hat = jq.fake_quant(leaf, spec)
        assert float(rep[k]["sqnr_db"]) == pytest.approx(float(metrics.sqnr(leaf, x_hat)))
        assert 10 < float(rep[k]["sqnr_db"]) < 30  # int4: ~20 dB on Gaussian data
        assert float(rep[k]["bits_per_value"]) > 4
    # dequantize_tree gives back the structure with arrays
    deq = jq.dequantize_tree(jq.quantize_tree(params, policy))
    assert jax.tree_util.tree_structure(deq) == jax.tree_util.tree_structure(params)


def test_report_rejects_mismatched_trees():
    params = _params()
    with pytest.raises(ValueError, match="trees differ"):
        metrics.report(params, {"embed": params["embed"]})


@pytest.mark.slow
def test_report_refuses_trees_with_other_keys():
    """Same number of leaves, other keys: leaves used to be paired by position."""
    x = jnp.linspace(-1.0, 1.0, 8)
    q = jq.quantize(x, jq.QuantSpec("int8"))
    with pytest.raises(ValueError, match=r"trees differ \(leaf 0: \['v'\] in tree, \['w'\]"):
        metrics.report({"v": x}, {"w": q})
    with pytest.raises(ValueError, match=r"trees differ \(leaf 0: \(root\) in tree"):
        metrics.report("abc", {"w": q})
    # A QArray already in tree (quantize_tree keeps it) has no float original: skipped.
    tree = {"a": x, "b": q}
    rep = jax.jit(metrics.report)(tree, jq.quantize_tree(tree, jq.QuantSpec("int8")))
    assert list(rep) == ["['a']"]


def test_bad_inputs_are_errors_naming_the_argument():
    x = jnp.linspace(-1.0, 1.0, 8)
    q = jq.quantize(x, jq.QuantSpec("int8"))
    with pytest.raises(TypeError, match=r"mse: x_hat must be an array, got None"):
        metrics.mse(x, None)
    with pytest.raises(TypeError, match=r"summary: x must be an array, got 'abc'"):
        metrics.summary("abc", q)
    with pytest.raises(TypeError, match=r"sqnr: x is a QArray.*Pass the original array as x"):
        metrics.sqnr(q, x)
    with pytest.raises(TypeError, match=r"nan_count: x must be an array"):
        metrics.nan_count(None)
    for fn in (metrics.saturation_rate, metrics.scale_clamp_rate):
        with pytest.raises(
            ValueError, match=r"x has shape \(3,\) but q was quantized from shape \(8,\)"
        ):
            fn(jnp.ones(3), q)
        with pytest.raises(TypeError, match=r"q must be the QArray of x"):
            fn(x, x)
    with pytest.raises(ValueError, match=r"summary: shapes differ: x has shape \(3,\)"):
        metrics.summary(jnp.ones(3), q)


@pytest.mark.parametrize("use_jit", JIT)
def test_saturation_rate_of_the_full_int_grid_is_outside_the_calibrated_range(use_jit):
    """int_grid='full': s = amax / 7.5 for int4; values in (7 s, amax] round to code 7
    within half a step (the clipped STE keeps their gradient): not saturated."""
    for cal, amax in ((jq.fixed(0.5), 0.5), (jq.absmax(), float(np.max(np.abs(RAMP))))):
        spec = jq.QuantSpec("int4", calibration=cal, int_grid="full")
        x = jnp.asarray(RAMP)
        rate = _call(
            lambda a, spec=spec: metrics.saturation_rate(a, jq.quantize(a, spec)),
            x,
            use_jit=use_jit,
        )
        expected = np.mean(np.abs(RAMP) > np.float32(amax))
        assert float(rate) == pytest.approx(expected, abs=1e-7)
        # the same elements as the clipped STE's zero gradients
        g = jax.grad(lambda a, spec=spec: jq.fake_quant(a, spec, ste="clipped").sum())(x)
        assert float(rate) == pytest.approx(float(np.mean(np.asarray(g) == 0)), abs=1e-7)


@pytest.mark.parametrize(
    ("fmt", "kw", "amax", "clamped"),
    [
        # float16 scales saturate past 65504: amax / 127.5 (full), not amax / 128 or 127
        ("int8", {"int_grid": "full", "scale_format": "float16"}, 127.8 * 65504, True),
        ("int8", {"int_grid": "full", "scale_format": "float16"}, 127.2 * 65504, False),
        ("int8", {"narrow_range": False, "scale_format": "float16"}, 127.5 * 65504, True),
        # float32 scales below 2^-126 are clamped: amax / 3.5 for int3's full grid
        ("int3", {"int_grid": "full"}, 3.2 * 2.0**-126, True),
        ("int3", {"int_grid": "full"}, 3.7 * 2.0**-126, False),
    ],
)
def test_scale_clamp_rate_follows_the_scale_divisor(fmt, kw, amax, clamped):
    spec = jq.QuantSpec(fmt, jq.per_channel(0), **kw)
    x = jnp.asarray([[amax, 0.0], [1.0, 2.0]], jnp.float32)
    q = jq.quantize(x, spec)
    # the oracle: the stored scale differs from amax / scale_divisor beyond its rounding
    want = np.float64(np.float32(amax)) / spec.scale_divisor
    got = float(np.asarray(q.scale, np.float64)[0, 0])
    assert (abs(got - want) > 1e-3 * want) == clamped
    assert float(jax.jit(metrics.scale_clamp_rate)(x, q)) == (0.5 if clamped else 0.0)
