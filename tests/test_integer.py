"""Integer-only arithmetic against an int64 numpy transcription of gemmlowp."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
import jaxquant.integer as jqi

I32 = np.iinfo(np.int32)


def _srdhm_ref(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.int64), b.astype(np.int64)
    ab = a64 * b64
    nudge = np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    # C integer division truncates toward zero.
    s = ab + nudge
    q = np.where(s >= 0, s // (1 << 31), -((-s) // (1 << 31)))
    out = q.astype(np.int64)
    out = np.where((a == I32.min) & (b == I32.min), I32.max, out)
    return out.astype(np.int32)


def _rdbp_ref(x: np.ndarray, e: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.int64)
    mask = (np.int64(1) << e.astype(np.int64)) - 1
    rem = x64 & mask
    thr = (mask >> 1) + (x64 < 0)
    return ((x64 >> e.astype(np.int64)) + (rem > thr)).astype(np.int32)


def _edges(rng: np.random.Generator, n: int) -> np.ndarray:
    special = np.array(
        [
            0,
            1,
            -1,
            2,
            -2,
            I32.max,
            I32.min,
            I32.min + 1,
            I32.max - 1,
            1 << 30,
            -(1 << 30),
            (1 << 16) - 1,
            1 << 16,
            -(1 << 16),
        ],
        np.int64,
    )
    r = rng.integers(I32.min, I32.max, n, dtype=np.int64, endpoint=True)
    small = rng.integers(-(1 << 20), 1 << 20, n, dtype=np.int64)
    return np.concatenate([special, r, small]).astype(np.int32)


@pytest.mark.slow
def test_doubling_high_mul_is_bit_exact():
    rng = np.random.default_rng(0)
    a = _edges(rng, 20000)
    b = np.concatenate([_edges(rng, 20000)[: a.size - 14], a[:14][::-1]])
    b = rng.permutation(b)
    got = np.asarray(jax.jit(jqi.saturating_rounding_doubling_high_mul)(a, b))
    np.testing.assert_array_equal(got, _srdhm_ref(a, b))
    sp = _edges(rng, 0)
    A, B = np.meshgrid(sp, sp)
    got = np.asarray(jqi.saturating_rounding_doubling_high_mul(A.ravel(), B.ravel()))
    np.testing.assert_array_equal(got, _srdhm_ref(A.ravel(), B.ravel()))


def test_rounding_divide_by_pot_is_bit_exact():
    rng = np.random.default_rng(1)
    x = _edges(rng, 5000)
    for e in range(0, 32):
        ee = np.full(x.shape, e, np.int32)
        np.testing.assert_array_equal(
            np.asarray(jqi.rounding_divide_by_pot(x, ee)), _rdbp_ref(x, ee)
        )


@pytest.mark.slow
def test_quantize_multiplier_round_trips():
    m = np.array([0.3, 1e-4, 0.999, 0.5, 2.5, 7.3e-7], np.float32)
    m0, shift = jqi.quantize_multiplier(m)
    m0, shift = np.asarray(m0), np.asarray(shift)
    assert np.all((m0 >= 1 << 30) & (m0.astype(np.int64) < 1 << 31))
    np.testing.assert_array_equal(
        m0.astype(np.float64) * 2.0 ** (-31.0 - shift), m.astype(np.float64)
    )
    x = np.arange(-5000, 5000, 7, dtype=np.int32)
    for mm, a, s in zip(m[:4], m0[:4], shift[:4], strict=True):
        got = np.asarray(jqi.multiply_by_quantized_multiplier(x, a, s))
        assert np.max(np.abs(got - np.round(x * np.float64(mm)))) <= 1


# The float side of the comparison, one program each (eagerly, one per operation).
@jax.jit
def _output_quantizer(x, w, b, s1, s2):
    """The output quantizer from the float layer's range: s3, z3, the int32 bias, and the
    multiplier s1 s2 / s3."""
    y_float = x @ w + b[None]
    s3 = (jnp.max(y_float) - jnp.min(y_float)) / 255.0
    z3 = jnp.round(-jnp.min(y_float) / s3).astype(jnp.int32)
    bias_q = jnp.round(b / (s1 * s2)).astype(jnp.int32)  # [40] (s2: [1] or [40])
    return s3, z3, bias_q, s1 * s2 / s3


@functools.partial(jax.jit, static_argnums=8)
def _simulated(xq, z1, wq, bias_q, s1, s2, s3, z3, relu):
    """Dequantized operands and bias, float matmul, output fake-quantized."""
    z1f, z3f = z1.astype(jnp.float32), z3.astype(jnp.float32)
    xr = (xq.astype(jnp.float32) - z1f) * s1
    r = jnp.dot(xr, wq.astype(jnp.float32) * s2[None], precision="highest")
    r = r + (bias_q.astype(jnp.float32) * (s1 * s2))[None]
    return jnp.clip(jnp.round(r / s3) + z3f, z3f if relu else 0.0, 255.0)


# relu (the output clamp) and per_channel (one multiplier per column) act on different
# stages: each value of each once, not the 2 x 2 product (each case compiles its programs).
@pytest.mark.slow
@pytest.mark.parametrize(("relu", "per_channel"), [(False, True), (True, False)])
def test_integer_dense_agrees_with_the_simulated_path_within_one_lsb(relu, per_channel):
    """Jacob et al.'s claim: the integer-only layer equals the float-simulated quantized
    layer to within 1 LSB of the output."""
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.nn.relu(jax.random.normal(k[0], (64, 96))) + 0.05  # post-ReLU activations
    w = jax.random.normal(k[1], (96, 40)) * 0.1
    b = jax.random.normal(k[2], (40,)) * 0.1
    xs = jq.QuantSpec("uint8", calibration=jq.minmax(), symmetric=False)
    qx = jq.quantize(x, xs)
    ws = jq.QuantSpec("int8", jq.per_channel(-1) if per_channel else None)
    qw = jq.quantize(w, ws)
    s1, z1 = qx.scale.reshape(()), qx.zero_point.reshape(()).astype(jnp.int32)
    s2 = qw.scale.reshape(-1)
    s3, z3, bias_q, mult = _output_quantizer(x, w, b, s1, s2)
    m0, shift = jqi.quantize_multiplier(mult)
    got = jax.jit(jqi.dense, static_argnames=("relu",))(
        qx.values, z1, qw.values, bias_q, m0, shift, z3, relu=relu
    )
    assert got.dtype == jnp.uint8
    sim = _simulated(qx.values, z1, qw.values, bias_q, s1, s2, s3, z3, relu)
    diff = np.abs(np.asarray(got, np.int64) - np.asarray(sim, np.int64))
    assert diff.max() <= 1
    assert (diff == 0).mean() > 0.95
    with pytest.raises(TypeError, match="int8"):
        jqi.dense(qx.values, z1, w, None, m0, shift, z3)


@pytest.mark.slow
def test_multipliers_below_two_to_the_minus_32_are_exactly_zero():
    """|x m| < 2^31 2^-32 = 1/2 for every int32 x: the pair is (0, 0), never a shift past 31
    (which rounding_divide_by_pot does not define: it gave -1 and 1 at the int32 extremes)."""
    x = np.array([I32.min, I32.min + 1, -5, -1, 0, 1, 5, I32.max], np.int32)
    m = np.array([1e-20, 2.0**-33, 2.0**-32 * 0.75, 0.0, 1e-30, 2.0**-40], np.float32)
    # The shapes of test_quantize_multiplier_round_trips' (6 multipliers, 1429 values):
    # its eagerly compiled operations serve both.
    x = np.concatenate([x, np.arange(-5000, 5000, 7, dtype=np.int32)[: 1429 - x.size]])
    m0, shift = jqi.quantize_multiplier(m)
    np.testing.assert_array_equal(np.asarray(m0), 0)
    np.testing.assert_array_equal(np.asarray(shift), 0)
    for a, s in zip(np.asarray(m0), np.asarray(shift), strict=True):
        np.testing.assert_array_equal(np.asarray(jqi.multiply_by_quantized_multiplier(x, a, s)), 0)
    m0, shift = jqi.quantize_multiplier(np.float32(2.0**-32))  # the smallest that stays
    assert (int(m0), int(shift)) == (1 << 30, 31)


@pytest.mark.parametrize("m", [np.nan, np.inf, -0.5, 2.0**31, np.array([0.5, -1.0])])
def test_quantize_multiplier_refuses_what_no_pair_holds(m):
    with pytest.raises(ValueError, match=r"quantize_multiplier: m must be"):
        jqi.quantize_multiplier(m)
    with pytest.raises(ValueError, match=r"quantize_multiplier: m must be"):
        jqi.quantize_multiplier(jnp.asarray(m, jnp.float32))  # concrete: values known


def test_operands_are_checked_by_dtype_and_host_values_by_range():
    x = np.arange(-8, 8, dtype=np.int32)
    # Host values (Python, numpy) are range-checked; any integer dtype is fine if they fit.
    with pytest.raises(ValueError, match=r"shift must be an integer in -31..31, got 40"):
        jqi.multiply_by_quantized_multiplier(x, 2**30, 40)
    with pytest.raises(ValueError, match=r"exponent must be an integer in 0..31, got -1"):
        jqi.rounding_divide_by_pot(x, np.array([1, -1]))
    got = jqi.rounding_divide_by_pot(x.astype(np.int64), np.int64(2))
    np.testing.assert_array_equal(np.asarray(got), _rdbp_ref(x, np.full(x.shape, 2)))
    # Floats are never truncated, jax arrays or not, traced or not.
    with pytest.raises(TypeError, match=r"multiply_by_quantized_multiplier: m0 has the wrong"):
        jqi.multiply_by_quantized_multiplier(x, 0.5, 1)
    with pytest.raises(TypeError, match=r"rounding_divide_by_pot: x has the wrong dtype"):
        jax.jit(jqi.rounding_divide_by_pot)(jnp.asarray(x, jnp.float32), 1)
    with pytest.raises(TypeError, match=r"a must be an integer array int32 holds .* uint32"):
        jqi.saturating_rounding_doubling_high_mul(jnp.asarray(x, jnp.uint32), x)
    # Traced values are not checked (they are not known while tracing).
    got = jax.jit(jqi.rounding_divide_by_pot)(x, jnp.int32(3))
    np.testing.assert_array_equal(np.asarray(got), _rdbp_ref(x, np.full(x.shape, 3)))


@pytest.mark.slow
def test_dense_checks_shapes_zero_points_and_flags():
    x = jnp.full((2, 4), 3, jnp.int8)
    w = jnp.ones((4, 3), jnp.int8)
    m0, shift = jqi.quantize_multiplier(0.25)
    y = jqi.dense(x, -128, w, None, m0[None], shift, 127, out_dtype=jnp.int8)
    assert y.dtype == jnp.int8 and y.shape == (2, 3)
    with pytest.raises(ValueError, match=r"x_zero_point must be an integer in -128..127"):
        jqi.dense(x, 128, w, None, m0, shift, 0, out_dtype=jnp.int8)
    with pytest.raises(ValueError, match=r"out_zero_point must be an integer in -128..127"):
        jqi.dense(x, 0, w, None, m0, shift, 200, out_dtype=jnp.int8)
    with pytest.raises(ValueError, match=r"x has shape \(2, 5\); its last axis must be w's K"):
        jqi.dense(jnp.ones((2, 5), jnp.int8), 0, w, None, m0, shift, 0)
    with pytest.raises(ValueError, match=r"bias must be a scalar or one value per output"):
        jqi.dense(x, 0, w, jnp.zeros(4, jnp.int32), m0, shift, 0)
    with pytest.raises(TypeError, match=r"relu must be True or False, got 'False'"):
        jqi.dense(x, 0, w, None, m0, shift, 0, relu="False")
    with pytest.raises(TypeError, match=r"out_dtype must be an integer dtype"):
        jqi.dense(x, 0, w, None, m0, shift, 0, out_dtype=jnp.float32)
