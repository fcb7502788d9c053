"""quantize / dequantize / fake_quant / quantize_tree: the seed's examples and edge cases."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxquant as jq

SEED_X = np.array([-0.5, 0.3, 1.2, -2.1], np.float32)


@pytest.mark.parametrize("use_jit", [True, False])
def test_seed_worked_example_int8(use_jit):
    """Seed §3.2: symmetric INT8, s = max|x| / 127, q = clip(round(x / s), -127, 127)."""
    spec = jq.QuantSpec("int8")
    quant = jax.jit(jq.quantize, static_argnums=1) if use_jit else jq.quantize
    q = quant(jnp.asarray(SEED_X), spec)
    amax = np.float32(2.1)
    assert float(np.max(np.abs(SEED_X))) == amax
    s = amax / np.float32(127)
    assert q.scale.shape == (1,) and np.float32(q.scale[0]) == s
    y = SEED_X * (np.float32(1) / s)  # the quantizer multiplies by the reciprocal
    np.testing.assert_allclose(y, [-30.238, 18.143, 72.571, -127.0], atol=1e-3)
    assert np.asarray(q.values).tolist() == [-30, 18, 73, -127]
    assert q.values.dtype == jnp.int8
    x_hat = np.asarray(jq.dequantize(q))
    np.testing.assert_allclose(x_hat, np.array([-30, 18, 73, -127]) * s, rtol=1e-7)
    np.testing.assert_allclose(x_hat, [-0.49606, 0.29764, 1.20709, -2.1], atol=1e-5)
    assert np.max(np.abs(x_hat - SEED_X)) <= s / 2 + 1e-7
    np.testing.assert_array_equal(np.asarray(jq.fake_quant(jnp.asarray(SEED_X), spec)), x_hat)


def test_seed_worked_example_fp16():
    """Seed §4.2: float-to-float with s = max|x| / 65504, round to nearest."""
    spec = jq.QuantSpec("fp16")
    q = jq.quantize(jnp.asarray(SEED_X), spec)
    s = np.float32(2.1) / np.float32(65504)
    assert np.float32(q.scale[0]) == s
    y = SEED_X * (np.float32(1) / s)
    assert q.values.dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(q.values), y.astype(np.float16))
    np.testing.assert_array_equal(np.asarray(q.values, np.float32), [-15600, 9360, 37440, -65504])
    x_hat = np.asarray(jq.dequantize(q))
    np.testing.assert_array_equal(x_hat, y.astype(np.float16).astype(np.float32) * s)
    assert np.max(np.abs(x_hat - SEED_X) / np.abs(SEED_X)) < 2.0**-11  # fp16's half ulp


def test_plain_casts_are_saturating_rne_casts():
    x = jnp.array([0.1, 1e5, -1e9, 3.0e-8], jnp.float32)
    for name in ["bf16", "fp16", "e4m3", "e5m2"]:
        fmt = jq.formats.get(name)
        q = jq.quantize(x, jq.QuantSpec(fmt, calibration=None))
        ref = np.clip(np.asarray(x), -fmt.max, fmt.max).astype(fmt.dtype)
        np.testing.assert_array_equal(np.asarray(q.values), ref)
        assert float(q.scale[0]) == 1.0


def test_fp8_values_are_real_fp8_storage():
    x = jax.random.normal(jax.random.key(0), (16, 32))
    q = jq.quantize(x, jq.QuantSpec("e4m3", jq.per_channel(-1)))
    assert q.values.dtype == jnp.float8_e4m3fn
    inv = np.float32(1) / np.asarray(q.scale)
    expected = (np.asarray(x) * inv).astype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(np.asarray(q.values), expected)
    assert np.max(np.abs(np.asarray(q.values, np.float32))) == 448  # absmax hits fmax


@pytest.mark.slow
def test_restricted_symmetric_range_never_emits_qmin():
    x = jax.random.normal(jax.random.key(1), (256, 512))
    q = jq.quantize(x, jq.QuantSpec("int8", jq.per_channel(-1)))
    v = np.asarray(q.values)
    assert v.min() == -127 and v.max() == 127
    # the full range only matters with a known scale: -128 is then reachable
    y = jnp.array([-1.01, 1.01], jnp.float32)
    full = jq.quantize(y, jq.QuantSpec("int8", narrow_range=False), scale=1.0 / 127)
    assert np.asarray(full.values).tolist() == [-128, 127]
    narrow = jq.quantize(y, jq.QuantSpec("int8"), scale=1.0 / 127)
    assert np.asarray(narrow.values).tolist() == [-127, 127]


@pytest.mark.slow
def test_asymmetric_zero_point_keeps_zero_exact():
    x = jnp.array([0.0, 0.25, 3.7, 1.0, 0.0, 2.2], jnp.float32)
    spec = jq.QuantSpec("uint8", calibration=jq.minmax(), symmetric=False)
    q = jq.quantize(x, spec)
    z = int(q.zero_point[0])
    assert z == 0 and np.asarray(q.values).max() == 255
    x2 = x - 1.0
    q2 = jq.quantize(x2, spec)
    x_hat = np.asarray(jq.dequantize(q2))
    assert x_hat[np.asarray(x2) == 0.0].tolist() == [0.0]  # float 0 is exact
    s = float(q2.scale[0])
    assert np.max(np.abs(x_hat - np.asarray(x2))) <= s / 2 + 1e-6
    i8 = jq.quantize(x2, jq.QuantSpec("int8", calibration=jq.minmax(), symmetric=False))
    assert -128 <= int(i8.zero_point[0]) <= 127


# Each format in one input dtype, rotated so that ints, floats and codebooks each meet
# float32 and a narrow dtype (bf16 and f16 share one path: widened to float32 and back);
# each (format, dtype) compiles its own programs.
@pytest.mark.parametrize(
    ("fmt", "dtype"),
    [
        ("int8", jnp.float32),
        ("int4", jnp.bfloat16),
        ("e4m3", jnp.float16),
        ("e2m1", jnp.float32),
        ("nf4", jnp.bfloat16),
        ("mxfp8", jnp.float16),
        ("ternary", jnp.float32),
        ("mxfp8", jnp.bfloat16),
    ],
)
def test_dtypes_in_and_out(dtype, fmt):
    x = jax.random.normal(jax.random.key(3), (8, 64)).astype(dtype)
    spec = jq.QuantSpec(fmt)
    y = jax.jit(lambda v: jq.fake_quant(v, spec))(x)
    assert y.dtype == dtype and y.shape == x.shape
    d = jq.dequantize(jq.quantize(x, spec))
    assert d.dtype == dtype
    np.testing.assert_array_equal(np.asarray(d, np.float32), np.asarray(y, np.float32))


@pytest.mark.slow
def test_nan_and_inf_policy():
    x = jnp.array([1.0, jnp.nan, -2.0, jnp.inf, -jnp.inf, 0.5], jnp.float32)
    spec = jq.QuantSpec("int8")
    q = jq.quantize(x, spec)
    s = 2.0 / 127  # calibration ignores NaN/Inf
    assert float(q.scale[0]) == pytest.approx(s)
    assert np.asarray(q.values).tolist() == [64, 0, -127, 127, -127, 32]  # NaN stored as 0
    y = np.asarray(jq.fake_quant(x, spec))
    assert np.isnan(y[1])  # fake_quant propagates NaN
    np.testing.assert_allclose(y[[3, 4]], [2.0, -2.0], rtol=1e-6)  # Inf saturates
    f8 = jq.quantize(x, jq.QuantSpec("e4m3"))
    assert np.isnan(np.asarray(f8.values, np.float32)[1])  # e4m3 has a NaN code
    raw = jq.fake_quant(x, jq.QuantSpec("e5m2", saturate=False))
    assert np.isinf(np.asarray(raw)[3])  # non-saturating: Inf stays Inf where it exists
    assert int(jq.metrics.nan_count(x)) == 1


ZERO_CASES = [
    *(
        (fmt, gran)
        for fmt in ("int8", "e4m3", "nf4", "fp16")
        for gran in ("tensor", "channel", "block")
    ),
    ("mxfp4", "block"),  # MX has its own blocks only (the other two were the same case)
]
GRANS = {"tensor": jq.per_tensor(), "channel": jq.per_channel(-1), "block": jq.per_block(-1, 32)}


def _zero_spec(fmt, gran):
    return jq.QuantSpec(fmt, GRANS[gran]) if fmt != "mxfp4" else jq.QuantSpec(fmt)


@functools.cache
def _all_zero_results(fmt):
    """fake_quant, its gradient and quantize's scale of zeros for every granularity of a
    format, in one program (eager gradients: test_ste_gradients)."""
    specs = [_zero_spec(f, g) for f, g in ZERO_CASES if f == fmt]

    @jax.jit
    def run(x):
        out = []
        for spec in specs:
            loss = lambda v, spec=spec: jnp.sum(jq.fake_quant(v, spec) ** 2 + v)
            out.append((jq.fake_quant(x, spec), jax.grad(loss)(x), jq.quantize(x, spec).scale))
        return out

    return dict(zip(specs, run(jnp.zeros((4, 64))), strict=True))


@pytest.mark.slow
@pytest.mark.parametrize(("fmt", "gran"), ZERO_CASES)
def test_all_zero_input_gives_zeros_and_finite_grads(fmt, gran):
    y, g, scale = _all_zero_results(fmt)[_zero_spec(fmt, gran)]
    assert np.all(np.asarray(y) == 0)
    assert np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(scale, np.float32) == 1.0)


@pytest.mark.parametrize(
    "shape,gran", [((0,), jq.per_tensor()), ((0, 4), jq.per_channel(-1)), ((3, 0), jq.per_token())]
)
def test_empty_arrays(shape, gran):
    x = jnp.zeros(shape)
    for fmt in ["int8", "int4"]:
        spec = jq.QuantSpec(fmt, gran)
        q = jq.quantize(x, spec)
        assert jq.dequantize(q).shape == shape
        assert jq.fake_quant(x, spec).shape == shape


@pytest.mark.slow
def test_scalar_input():
    for fmt in ["int8", "int4", "e4m3"]:
        q = jq.quantize(jnp.float32(-0.7), jq.QuantSpec(fmt))
        assert jq.dequantize(q).shape == ()
        assert float(jq.dequantize(q)) == pytest.approx(-0.7, rel=1e-6)


def test_bad_input_errors():
    with pytest.raises(TypeError, match="floating-point"):
        jq.quantize(jnp.arange(4), jq.QuantSpec("int8"))
    with pytest.raises(ValueError, match="out of range"):
        jq.quantize(jnp.ones((4, 4)), jq.QuantSpec("int8", jq.per_channel(2)))
    with pytest.raises(ValueError, match="does not divide"):
        jq.quantize(jnp.ones((4, 40)), jq.QuantSpec("int4", jq.per_block(-1, 32)))
    with pytest.raises(ValueError, match="zero-point"):
        jq.QuantSpec("e4m3", symmetric=False)
    with pytest.raises(ValueError, match="scale format"):
        jq.QuantSpec("int8", scale_format="int8")
    with pytest.raises(ValueError, match="rounding"):
        jq.QuantSpec("int8", rounding="floor")
    with pytest.raises(ValueError, match="per_block"):
        jq.QuantSpec("mxfp8", jq.per_channel(-1))
    with pytest.raises(ValueError, match="e8m0"):
        jq.QuantSpec("e8m0")
    with pytest.raises(ValueError, match="saturate"):
        jq.QuantSpec("int8", saturate=False)
    with pytest.raises(ValueError, match="Unknown format"):
        jq.QuantSpec("int9x")
    with pytest.raises(TypeError, match="QArray"):
        jq.quantize(jq.quantize(jnp.ones(3), jq.QuantSpec("int8")), jq.QuantSpec("int8"))
    with pytest.raises(ValueError, match="PRNG key"):
        jq.quantize(jnp.ones(3), jq.QuantSpec("int8", rounding="stochastic"))


def test_ste_gradients():
    x = jnp.array([-3.0, -0.5, 0.2, 0.9, 2.5], jnp.float32)
    spec = jq.QuantSpec("int8")
    g = jax.grad(lambda v: jnp.sum(jq.fake_quant(v, spec, scale=1.0 / 127)))(x)
    np.testing.assert_array_equal(np.asarray(g), np.ones(5))
    gc = jax.grad(lambda v: jnp.sum(jq.fake_quant(v, spec, scale=1.0 / 127, ste="clipped")))(x)
    np.testing.assert_array_equal(np.asarray(gc), [0, 1, 1, 1, 0])


@pytest.mark.slow
def test_vmap_matches_per_row_scales():
    x = jax.random.normal(jax.random.key(5), (6, 32)) * jnp.arange(1.0, 7.0)[:, None]
    spec = jq.QuantSpec("int8")
    rows = jax.vmap(lambda r: jq.fake_quant(r, spec))(x)
    per_row = jq.fake_quant(x, jq.QuantSpec("int8", jq.per_token()))
    np.testing.assert_array_equal(np.asarray(rows), np.asarray(per_row))


@pytest.mark.slow
def test_known_scale_equals_fixed_calibration():
    x = jax.random.normal(jax.random.key(6), (32, 32))
    a = jq.quantize(x, jq.QuantSpec("e4m3"), scale=jnp.float32(1.5 / 448))
    b = jq.quantize(x, jq.QuantSpec("e4m3", calibration=jq.fixed(1.5)))
    np.testing.assert_array_equal(
        np.asarray(a.values, np.float32), np.asarray(b.values, np.float32)
    )
    with pytest.raises(ValueError, match="zero_point"):
        jq.quantize(x, jq.QuantSpec("uint8", calibration=jq.minmax(), symmetric=False), scale=0.1)


@pytest.mark.slow
def test_quantizer_is_exactly_reproducible_with_numpy():
    """Per-block scales are the true quotient amax / qmax, and y = x * (1/s): the same
    bits in numpy, eager and jit (XLA would otherwise rewrite divisions by constants)."""
    x = np.random.default_rng(1).standard_normal((64, 4096)).astype(np.float32)
    spec = jq.QuantSpec("int8", jq.per_block(-1, 32))
    q = jq.quantize(jnp.asarray(x), spec)
    qj = jax.jit(lambda v: jq.quantize(v, spec))(jnp.asarray(x))
    amax = np.abs(x.reshape(64, 128, 32)).max(-1, keepdims=True)
    s = amax / np.float32(127)
    np.testing.assert_array_equal(np.asarray(q.scale), s)
    np.testing.assert_array_equal(np.asarray(qj.scale), s)
    y = x.reshape(64, 128, 32) * (np.float32(1) / s)
    ref = np.clip(np.round(y), -127, 127).astype(np.int8).reshape(64, 4096)
    np.testing.assert_array_equal(np.asarray(q.values), ref)
    np.testing.assert_array_equal(np.asarray(qj.values), ref)
    # a value that lands exactly on a tie after scaling rounds half to even
    t = np.float32(71.5) * (np.float32(3) / np.float32(127))
    known = jq.quantize(jnp.full((2,), t), jq.QuantSpec("int8"), scale=np.float32(3 / 127))
    y_t = t * (np.float32(1) / np.float32(3 / 127))
    assert np.asarray(known.values).tolist() == [int(np.round(y_t))] * 2


@pytest.mark.slow
def test_scale_formats():
    x = jax.random.normal(jax.random.key(7), (8, 256)) * 3
    q = jq.quantize(x, jq.QuantSpec("int8", jq.per_block(-1, 32), scale_format="e8m0"))
    s = np.asarray(q.scale, np.float32)
    assert q.scale.dtype == jnp.float8_e8m0fnu
    np.testing.assert_array_equal(np.log2(s), np.round(np.log2(s)))  # powers of two
    xv = np.asarray(x).reshape(8, 8, 32)
    assert np.all(np.abs(xv / s) <= 127)  # rounded up: nothing extra clips
    qb = jq.quantize(x, jq.QuantSpec("int8", jq.per_channel(0), scale_format="bf16"))
    assert qb.scale.dtype == jnp.bfloat16


@pytest.mark.slow
def test_mx_scale_follows_ocp_rule():
    x = jax.random.normal(jax.random.key(8), (4, 64)) * 10
    q = jq.quantize(x, jq.QuantSpec("mxfp8"))
    amax = np.max(np.abs(np.asarray(x).reshape(4, 2, 32)), axis=-1, keepdims=True)
    expected = 2.0 ** (np.floor(np.log2(amax)) - 8)  # e4m3's emax = 8
    np.testing.assert_array_equal(np.asarray(q.scale, np.float32), expected)
    assert q.values.dtype == jnp.float8_e4m3fn


def test_given_half_integer_zero_point_is_rounded_consistently():
    """A given zero point is an integer grid point: quantize (which stores it) and
    fake_quant (which does not) round it the same way, so they agree."""
    spec = jq.QuantSpec("int4", symmetric=False)
    x = jnp.linspace(-1.0, 1.0, 33)
    for z in (-0.5, 0.5, 1.5, 2.0):
        q = jq.quantize(x, spec, scale=0.125, zero_point=z)
        np.testing.assert_array_equal(
            jq.dequantize(q), jq.fake_quant(x, spec, scale=0.125, zero_point=z)
        )
        assert float(q.zero_point.reshape(())) == float(np.round(z))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"scale": -1.0}, "scale= must be finite and > 0"),
        ({"scale": 0.0}, "scale= must be finite and > 0"),
        ({"scale": float("nan")}, "scale= must be finite and > 0"),
        ({"scale": 0.1, "zero_point": 300}, r"zero_point= must be integers in \[0, 255\]"),
        ({"scale": 0.1, "zero_point": float("inf")}, "zero_point= must be integers"),
    ],
)
def test_given_concrete_scales_and_zero_points_are_checked(kw, match):
    spec = jq.QuantSpec("uint8", calibration=jq.minmax(), symmetric="zero_point" not in kw)
    for fn in (jq.quantize, jq.fake_quant):
        with pytest.raises(ValueError, match=match):
            fn(jnp.ones(4), spec, **kw)
