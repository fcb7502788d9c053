"""Low-bit integer grids (jaxquant/_src/spec.py ``int_grid``, quantize.py ``compute_scale``).

Three grids for a b-bit signed integer format, ``qmax = 2^(b-1) - 1``:

* restricted (the default from int4 on): ``s = amax / qmax``, codes ``[-qmax, qmax]``
  (2^b - 1 levels);
* full (``int_grid="full"``, Qwix's; the default at int2 / int3, papers/int_grids):
  ``s = amax / (qmax + 0.5)``, codes ``[-2^(b-1), qmax]`` (all 2^b);
* asymmetric (``symmetric=False``, min/max): ``s = (hi - lo) / (2^b - 1)``, zero point ``z``.

Every grid is checked against a numpy first-principles oracle, exactly, over the
per-tensor / per-channel / per-block / per-token granularities, eager, under jit and under
vmap; then the reasons the full grid exists (all levels used, a lower error than the
restricted grid on Gaussian data at 2-4 bits), and that it carries through stochastic
rounding, the calibrations, the scalings, the clipped STE and quantized ``dot_general``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from xla_options import OPTIMIZED

import jaxquant as jq

F32 = np.float32
GRANS = {
    "per_tensor": jq.per_tensor(),
    "per_channel": jq.per_channel(-1),
    "per_block": jq.per_block(-1, 16),
    "per_token": jq.per_token(),
}


# ----------------------------------------------------------------------------- oracles


def _groups(x: np.ndarray, gran: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """x (2-D) viewed so that each scale group is reduced over ``axes`` (keepdims)."""
    if gran == "per_tensor":
        return x, (0, 1)
    if gran == "per_channel":  # one scale per column
        return x, (0,)
    if gran == "per_token":  # one scale per row, reducing the feature axis
        return x, (1,)
    assert gran == "per_block"
    return x.reshape(x.shape[0], x.shape[1] // 16, 16), (2,)


def ref_symmetric(x: np.ndarray, gran: str, bits: int, grid: str):
    """(codes, scale, dequantized) of a symmetric signed int grid, from first principles.

    ``s = fl32(amax / d)`` with ``d = qmax`` (restricted) or ``qmax + 0.5`` (full), 1 for a
    zero group; ``q = clip(round_half_even(x * fl32(1/s)), qmin, qmax)``: the multiply by
    the correctly rounded reciprocal that jaxquant documents (quantize.py, step 4).
    """
    qmax = 2 ** (bits - 1) - 1
    qmin, d = (-(qmax + 1), qmax + 0.5) if grid == "full" else (-qmax, qmax)
    v, axes = _groups(np.asarray(x, F32), gran)
    amax = np.max(np.abs(v), axis=axes, keepdims=True)
    s = np.where(amax > 0, amax / F32(d), F32(1)).astype(F32)
    y = v * (F32(1) / s)
    q = np.clip(np.round(y), qmin, qmax)
    return q.reshape(x.shape), s, (q * s).astype(F32).reshape(x.shape)


def ref_asymmetric(x: np.ndarray, gran: str, bits: int, signed: bool = True):
    """(codes, scale, zero point, dequantized) of min/max zero-point quantization.

    ``s = fl32((hi - lo) / (2^b - 1))`` over the range stretched to hold 0,
    ``z = clip(qmin - round(lo / s))``, ``q = clip(round(x * fl32(1/s)) + z)`` (PyTorch's
    formula; the zero point is added after rounding).
    """
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    v, axes = _groups(np.asarray(x, F32), gran)
    lo = np.minimum(np.min(v, axis=axes, keepdims=True), 0).astype(F32)
    hi = np.maximum(np.max(v, axis=axes, keepdims=True), 0).astype(F32)
    s = np.where(hi > lo, (hi - lo) / F32(qmax - qmin), F32(1)).astype(F32)
    z = np.clip(qmin - np.round(lo / s), qmin, qmax).astype(F32)
    q = np.clip(np.round(v * (F32(1) / s)) + z, qmin, qmax)
    return q.reshape(x.shape), s, z, ((q - z) * s).astype(F32).reshape(x.shape)


MODES = ["jit", "vmap", "eager"]


def _modes(fn):
    """fn eagerly, under jit, and under vmap over the batch of inputs (one result each).

    vmap under jit: one program, where an eager vmap compiles each of quantize, dequantize,
    fake_quant and the op-by-op unpacking of the codes batched (2.5x the compile time;
    eager vmap of the quantizers is test_exactness.py's and test_nvfp4.py's)."""

    def vmapped(xs):
        out = jax.jit(jax.vmap(fn))(jnp.stack(xs))
        return [jax.tree.map(lambda a, i=i: a[i], out) for i in range(len(xs))]

    return {
        "eager": lambda xs: [fn(jnp.asarray(x)) for x in xs],
        "jit": lambda xs: [jax.jit(fn)(jnp.asarray(x)) for x in xs],
        "vmap": vmapped,
    }


def _data(seed: int, shape=(8, 32), *, heavy: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(F32)
    if heavy:  # a few outliers, a zero row (scale 1, never a division by zero)
        x[1, 3] *= 40.0
        x[5] = 0.0
    return x


# ------------------------------------------------------------ 1. exact against oracles


def _grid_cases(rows: list[tuple]) -> list:
    """(*row, granularity, mode) for every row and granularity, in one mode each: the modes
    rotate over the granularities of a row and over the rows of a granularity, so every
    row (grid and width) and every granularity runs in every mode. Each (spec, mode) is a
    compile (three programs eagerly), and the mode is orthogonal to the grid's arithmetic."""
    grans = list(GRANS)
    return [
        pytest.param(*row, gran, mode, id="-".join(map(str, (*row, gran, mode))))
        for r, row in enumerate(rows)
        for g, gran in enumerate(grans)
        for mode in [MODES[(r + g) % len(MODES)]]
    ]


@pytest.mark.parametrize(
    ("grid", "bits", "gran", "mode"),
    _grid_cases([(g, b) for g in ("full", "restricted") for b in (2, 3, 4, 8)]),
)
def test_symmetric_grids_match_numpy_oracle(grid, bits, gran, mode):
    spec = jq.QuantSpec(f"int{bits}", GRANS[gran], int_grid=grid)
    xs = [_data(bits, heavy=True), _data(bits + 100)]

    def run(x):
        q = jq.quantize(x, spec)
        return q.codes(), q.scale, jq.dequantize(q), jq.fake_quant(x, spec)

    for x, (codes, scale, deq, fq) in zip(xs, _modes(run)[mode](xs), strict=True):
        want_q, want_s, want_x = ref_symmetric(x, gran, bits, grid)
        np.testing.assert_array_equal(np.asarray(scale), want_s)
        np.testing.assert_array_equal(np.asarray(codes), want_q)
        np.testing.assert_array_equal(np.asarray(deq), want_x)  # dequantize is exact
        np.testing.assert_array_equal(np.asarray(fq), want_x)
        # The brief's oracle, round(x / s), differs from round(x * (1/s)) at most where
        # x / s is within an ulp of a half-integer tie (the documented one-ulp latitude).
        v, _ = _groups(x, gran)
        y = (v / want_s).reshape(x.shape)
        qmax = 2 ** (bits - 1) - 1
        qmin = -(qmax + 1) if grid == "full" else -qmax
        other = np.clip(np.round(y), qmin, qmax)
        off = other != want_q
        tie_dist = np.abs(np.abs(y - np.floor(y)) - 0.5)
        assert np.all(tie_dist[off] <= 4 * np.spacing(np.abs(y[off]).astype(F32)))


@pytest.mark.parametrize(
    ("fmt", "gran", "mode"),
    _grid_cases([(f,) for f in ("int2", "int3", "int4", "uint2", "uint3", "uint4")]),
)
def test_asymmetric_grids_match_numpy_oracle(fmt, gran, mode):
    bits, signed = int(fmt[-1]), fmt.startswith("int")
    spec = jq.QuantSpec(fmt, GRANS[gran], jq.minmax(), symmetric=False)
    xs = [_data(bits, heavy=True) + 0.7, _data(bits + 200)]

    def run(x):
        q = jq.quantize(x, spec)
        return q.codes(), q.scale, q.zero_point, jq.dequantize(q)

    for x, (codes, scale, zp, deq) in zip(xs, _modes(run)[mode](xs), strict=True):
        want_q, want_s, want_z, want_x = ref_asymmetric(x, gran, bits, signed)
        np.testing.assert_array_equal(np.asarray(scale), want_s)
        np.testing.assert_array_equal(np.asarray(zp, F32), want_z)
        np.testing.assert_array_equal(np.asarray(codes), want_q)
        np.testing.assert_array_equal(np.asarray(deq), want_x)


def test_full_grid_with_e8m0_scales_rounds_the_half_step_scale_up():
    x = _data(3)
    spec = jq.QuantSpec("int4", jq.per_channel(-1), int_grid="full", scale_format="e8m0")
    amax = np.max(np.abs(x), axis=0, keepdims=True)
    want = 2.0 ** np.ceil(np.log2(amax / F32(7.5)))  # up: nothing extra clips
    np.testing.assert_array_equal(np.asarray(jq.quantize(x, spec).scale, F32), want)


@pytest.mark.parametrize(
    "spec",
    [jq.QuantSpec("int3", int_grid="full"), jq.QuantSpec("int3", narrow_range=False)],
    ids=str,
)
def test_a_range_near_float32_max_is_not_flushed(spec):
    # s = 3.4e38 / 3.5 > 2^126: its reciprocal would be a float32 subnormal, which XLA:CPU
    # flushes to 0 (every code 0) unless the scale is applied in two exact steps; the guard
    # must follow the divisor (3.5, or 3 for narrow_range=False) and not |qmin| = 4.
    x = np.array([3.4e38, -1.0e38, 1.0e38, 2.0e37], F32)
    q = jq.quantize(x, spec)
    s = np.float64(np.asarray(q.scale)[0])
    want = np.clip(np.round(x / s), *spec.qrange).astype(int).tolist()
    assert np.asarray(q.codes()).tolist() == want == [3, -1, 1, 0]


# ---------------------------------------------------------- 2. why the full grid exists


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_full_grid_uses_every_level_on_a_dense_ramp(bits):
    qmax = 2 ** (bits - 1) - 1
    # amax = (qmax + 0.5) / 8: s = 1/8 exactly, so -amax is exactly the tie -(qmax + 0.5),
    # which half-to-even sends to the even -2^(b-1).
    amax = (qmax + 0.5) / 8
    ramp = np.linspace(-amax, amax, 4099, dtype=F32)
    specs = (
        jq.QuantSpec(f"int{bits}", int_grid="full"),
        jq.QuantSpec(f"int{bits}", int_grid="restricted"),
        jq.QuantSpec(f"int{bits}", calibration=jq.minmax(), symmetric=False),
    )

    @jax.jit  # one program for the three quantizers and their codes
    def scales_and_codes(x):
        return [(q.scale, q.codes()) for q in (jq.quantize(x, s) for s in specs)]

    (s_full, full), (_, restricted), (_, asym) = scales_and_codes(ramp)
    assert float(s_full[0]) == 0.125
    assert np.unique(np.asarray(full)).tolist() == list(range(-qmax - 1, qmax + 1))
    assert np.unique(np.asarray(restricted)).size == 2**bits - 1
    assert np.unique(np.asarray(asym)).size == 2**bits


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_a_clipping_calibration_reaches_the_extra_negative_code(bits):
    # With absmax only -amax itself can reach -2^(b-1) (a tie); a clipping calibration
    # puts the tail below -amax there, as it does for every value past +amax at qmax.
    x = _data(bits, (64, 64))
    spec = jq.QuantSpec(f"int{bits}", calibration=jq.percentile(99.0), int_grid="full")
    codes = np.asarray(jq.quantize(x, spec).codes())
    assert (codes == -(2 ** (bits - 1))).sum() > 10


# Relative MSE (mse / var) on N(0, 1) data, 256 x 256, numpy seed 0, measured here (CPU;
# the quantizer is bit-exact across backends): restricted, full, asymmetric (min/max).
# The full grid wins by 5-48% at 2-4 bits and is no better at 8 bits (per_block(32): 9%
# worse), so the restricted grid stays the default there. Min/max asymmetric is lower still
# on this data (every level inside the group's own range), at the cost of a zero point,
# which quantized dot_general refuses.
MSE_TABLE = {
    ("per_tensor", 2): (0.9412, 0.6898, 0.6689),
    ("per_tensor", 3): (0.2088, 0.1529, 0.1454),
    ("per_tensor", 4): (0.0381, 0.03317, 0.03153),
    ("per_tensor", 8): (0.0001165, 0.0001154, 0.0001088),
    ("per_channel", 2): (0.6546, 0.3485, 0.3022),
    ("per_channel", 3): (0.08826, 0.0652, 0.05532),
    ("per_channel", 4): (0.01625, 0.0143, 0.01216),
    ("per_channel", 8): (4.941e-05, 4.958e-05, 4.172e-05),
    ("per_block32", 2): (0.4351, 0.2251, 0.166),
    ("per_block32", 3): (0.05175, 0.04158, 0.03007),
    ("per_block32", 4): (0.009578, 0.009096, 0.00657),
    ("per_block32", 8): (2.877e-05, 3.132e-05, 2.27e-05),
}


@pytest.mark.parametrize(("gran", "bits"), list(MSE_TABLE), ids=str)
def test_full_grid_has_lower_mse_than_restricted_on_gaussian_data(gran, bits):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((256, 256)).astype(F32))
    g = jq.per_block(-1, 32) if gran == "per_block32" else GRANS[gran]
    specs = (
        jq.QuantSpec(f"int{bits}", g, int_grid="restricted"),
        jq.QuantSpec(f"int{bits}", g, int_grid="full"),
        jq.QuantSpec(f"int{bits}", g, jq.minmax(), symmetric=False),
    )
    var = float(jnp.var(x))
    # the three fake_quants in one program (each is its own jitted call inside it: the same
    # bits as three eager calls)
    x_hats = jax.jit(lambda x: [jq.fake_quant(x, s) for s in specs])(x)
    err = [float(jq.metrics.mse(x, x_hat)) / var for x_hat in x_hats]
    np.testing.assert_allclose(err, MSE_TABLE[gran, bits], rtol=2e-3)  # the recorded table
    restricted, full, _ = err
    if bits <= 4:
        assert full < 0.96 * restricted  # the reason the full grid exists
    else:
        assert full > 0.98 * restricted  # ... and why 8 bits keeps the restricted default


def test_eight_bits_default_is_unchanged():
    spec = jq.QuantSpec("int8")
    assert spec.int_grid == "restricted" and spec.narrow_range and spec.qrange == (-127.0, 127.0)
    x = _data(8, heavy=True)
    q = jq.quantize(x, spec)
    want_q, want_s, _ = ref_symmetric(x, "per_tensor", 8, "restricted")
    np.testing.assert_array_equal(np.asarray(q.scale), want_s)
    np.testing.assert_array_equal(np.asarray(q.codes()), want_q)
    assert np.asarray(q.codes()).min() >= -127
    assert spec == jq.QuantSpec("int8", int_grid="restricted", narrow_range=True)


# --------------------------------------------------------- 3. every path carries it


def test_stochastic_rounding_on_the_full_grid_is_unbiased_inside_its_range():
    # Scaled values y across the whole code range [-4, 3] of int3 (a given scale reaches
    # below -3.5). N = 2^15 draws per value; each draw's rounding error has variance
    # <= 1/4 step^2, so the mean's standard deviation is <= 0.5 / sqrt(N) = 0.0028 steps:
    # bound |mean - y| <= 5 sigma = 0.014 steps.
    n, s = 2**15, 0.25
    ys = np.array([-3.9, -3.6, -3.25, -2.5, -0.3, 0.0, 0.5, 1.25, 2.9, 3.0], F32)
    x = jnp.asarray(np.repeat(ys * F32(s), n).reshape(len(ys), n))
    spec = jq.QuantSpec("int3", jq.per_channel(0), int_grid="full", rounding="stochastic")
    for key in (jax.random.key(0), jax.random.key(1)):
        q = jq.quantize(x, spec, key=key, scale=jnp.full((len(ys), 1), s, jnp.float32))
        c = np.asarray(q.codes(), np.float64)
        assert np.all((c == np.floor(ys)[:, None]) | (c == np.ceil(ys)[:, None]))
        np.testing.assert_allclose(c.mean(axis=1), ys, atol=5 * 0.5 / np.sqrt(n))
    # Calibrated: +amax scales to 3.5, past qmax = 3, so SR there is clipped (biased by
    # design, like nearest); everything in [-3.5, 3] is unbiased.
    xc = jnp.asarray(np.concatenate([np.repeat(F32(-2.3), n), [F32(3.5)]]))
    spec_t = spec.replace(granularity=jq.per_tensor())
    q = jq.quantize(xc, spec_t, key=jax.random.key(2))
    assert float(q.scale[0]) == 1.0
    c = np.asarray(q.codes(), np.float64)
    assert c[-1] == 3.0 and abs(c[:-1].mean() + 2.3) <= 5 * 0.5 / np.sqrt(n)


@pytest.mark.parametrize(
    "calibration",
    [jq.absmax(), jq.percentile(99.0), jq.mean_std(2.5), jq.mse(), jq.kl(), jq.fixed(2.0)],
    ids=str,
)
def test_every_calibration_maps_its_amax_to_qmax_plus_half(calibration):
    from jaxquant._src.quantize import trace

    x = jnp.asarray(_data(4, (32, 64)))
    spec = jq.QuantSpec("int3", jq.per_channel(-1), calibration, int_grid="full")
    # Optimized (xla_options.py): unoptimized, XLA's copies of the range differ by an ulp.
    traced = jax.jit(
        lambda x: (lambda st, out: (st.lo, st.hi, st.s, st.r, out))(*trace(x, spec)),
        compiler_options=OPTIMIZED,
    )
    lo, hi, s, r, out = traced(x)
    amax = np.maximum(-np.asarray(lo), np.asarray(hi)).astype(F32)
    np.testing.assert_array_equal(np.asarray(s), np.where(amax > 0, amax / F32(3.5), 1))
    assert np.asarray(r).min() >= -4 and np.asarray(r).max() <= 3
    fq = jax.jit(lambda x: jq.fake_quant(x, spec), compiler_options=OPTIMIZED)(x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(fq))


def test_scalings_use_the_half_step_scale():
    spec = jq.QuantSpec("int4", int_grid="full")
    x = jnp.asarray(_data(5))
    assert float(jq.static_scaling(spec, 7.5).update((), x)[0]) == 1.0
    s_cur, _ = jq.current_scaling(spec).update((), x)
    np.testing.assert_array_equal(np.asarray(s_cur), np.asarray(jq.quantize(x, spec).scale)[0])
    sc = jq.delayed_scaling(spec, history_len=2)
    _, state = jq.fake_quant_with(sc, sc.init(x), x)
    np.testing.assert_array_equal(np.asarray(state.scale), np.asarray(s_cur))


def test_clipped_ste_keeps_the_gradient_of_the_largest_value():
    # +amax scales to qmax + 0.5 and rounds to qmax like any value within half a step: not
    # a clipped value. Values past a clipping calibration's range get no gradient.
    x = jnp.asarray([-1.0, -0.2, 0.3, 1.0, 2.0], jnp.float32)
    for cal, want in ((jq.absmax(), [1, 1, 1, 1, 1]), (jq.fixed(1.0), [1, 1, 1, 1, 0])):
        spec = jq.QuantSpec("int3", calibration=cal, int_grid="full")
        g = jax.grad(lambda v, spec=spec: jq.fake_quant(v, spec, ste="clipped").sum())(x)
        assert np.asarray(g).tolist() == want


def _ramp_with_max_and_min(shape, seed):
    """Gaussian data whose largest |x| occurs as both +amax and -amax (per tensor)."""
    x = _data(seed, shape)
    amax = np.abs(x).max()
    x.flat[0], x.flat[1] = amax, -amax
    return x


@pytest.mark.parametrize("use_jit", [True, False])
def test_dot_general_clipped_ste_mask_is_fake_quants(use_jit):
    # The scaled dot computes its own clipped-STE mask; with the full grid +amax scales to
    # qmax + 0.5 (> qmax) and must keep its gradient like fake_quant's (ste_bounds).
    a = jnp.asarray(_ramp_with_max_and_min((8, 32), 21))
    b = jnp.asarray(_data(22, (32, 16)))
    sa = jq.QuantSpec("int4", int_grid="full", calibration=jq.fixed(float(jnp.abs(a).max())))
    dn = (((1,), (0,)), ((), ()))

    def loss(a):
        return jq.dot_general(a, b, dn, lhs_spec=sa, ste="clipped", mode="emulate").sum()

    def ref(a):
        return (jq.fake_quant(a, sa, ste="clipped") @ b).sum()

    grad = jax.grad(loss)
    g = np.asarray((jax.jit(grad) if use_jit else grad)(a))
    g_ref = np.asarray(jax.grad(ref)(a))
    assert g.flat[0] != 0 and g.flat[1] != 0  # +amax and -amax are in range
    np.testing.assert_allclose(g, g_ref, rtol=1e-6, atol=1e-6)
    # and a value past a clipping range gets none, as in fake_quant
    sc = sa.replace(calibration=jq.fixed(0.5 * float(jnp.abs(a).max())))
    gc = np.asarray(
        jax.grad(lambda a: jq.dot_general(a, b, dn, lhs_spec=sc, ste="clipped").sum())(a)
    )
    gq = np.asarray(jax.grad(lambda a: jq.fake_quant(a, sc, ste="clipped").sum())(a))
    np.testing.assert_array_equal(gc != 0, gq != 0)
    assert (gq == 0).any()


def test_conv_clipped_ste_mask_is_fake_quants():
    lhs = jnp.asarray(_ramp_with_max_and_min((2, 6, 6, 3), 23))
    rhs = jnp.asarray(_data(24, (3, 3, 3, 4)))
    spec = jq.QuantSpec("int4", int_grid="full")
    dn = ("NHWC", "HWIO", "NHWC")

    def loss(x):
        return jq.conv_general_dilated(
            x, rhs, (1, 1), "SAME", dimension_numbers=dn, lhs_spec=spec, ste="clipped"
        ).sum()

    def ref(x):
        y = jax.lax.conv_general_dilated(
            jq.fake_quant(x, spec, ste="clipped"), rhs, (1, 1), "SAME", dimension_numbers=dn
        )
        return y.sum()

    for grad in (jax.grad(loss), jax.jit(jax.grad(loss))):
        g = np.asarray(grad(lhs))
        assert g.flat[0] != 0 and g.flat[1] != 0  # +amax and -amax are in range
        np.testing.assert_allclose(g, np.asarray(jax.grad(ref)(lhs)), rtol=1e-5, atol=1e-5)


def test_one_pass_kernel_leaves_the_full_grid_to_the_jnp_path():
    from jaxquant._src.kernels import block_fake_quant, supported

    spec = jq.QuantSpec("int4", jq.per_block(-1, 32), scale_format="e8m0", int_grid="full")
    assert supported(spec.replace(int_grid="restricted"), (4096, 4096), jnp.float32, "gpu")
    assert not supported(spec, (4096, 4096), jnp.float32, "gpu")
    with pytest.raises(NotImplementedError, match=r"int_grid='full'.*jnp path"):
        block_fake_quant(jnp.ones((64, 64), jnp.float32), spec)


@pytest.mark.parametrize("mode", ["emulate", "auto"])
def test_dot_general_of_full_grid_int4_operands_is_the_product_of_the_dequantized(mode):
    rng = np.random.default_rng(7)
    a = rng.uniform(-7.4, 7.4, (8, 64)).astype(F32) / 16
    a[:, 0] = -7.5 / 16  # each row's amax is the tie: s = 1/16 and code -8 in every row
    b = rng.standard_normal((64, 16)).astype(F32)
    sa = jq.QuantSpec("int4", jq.per_token(), int_grid="full")
    sb = jq.QuantSpec("int4", jq.per_channel(-1), int_grid="full")
    qa, qb = jq.quantize(a, sa), jq.quantize(b, sb)
    assert (np.asarray(qa.codes())[:, 0] == -8).all()

    def dot(a, b):
        return jq.dot_general(a, b, (((1,), (0,)), ((), ())), lhs_spec=sa, rhs_spec=sb, mode=mode)

    for fn in (dot, jax.jit(dot)):
        _check_product(np.asarray(fn(jnp.asarray(a), jnp.asarray(b))), qa, qb)


def _check_product(got: np.ndarray, qa, qb) -> None:
    """``got`` is the product of the dequantized operands to float32 rounding.

    Exact reference: ``(codes_a @ codes_b) * s_a * s_b`` in float64 (integer sums, exact).
    The scaled dot sums the integer grid products exactly in float32 and applies the two
    scales: at most 2 roundings, 2^-22 relative. Against the product of the dequantized
    float32 arrays (each value rounded once, 2^-24), the bound is absolute:
    2^-22 * sum |a_hat| |b_hat| -- cancellation makes a relative one meaningless.
    """
    ca, cb = np.asarray(qa.codes(), np.float64), np.asarray(qb.codes(), np.float64)
    sa, sb = np.asarray(qa.scale, np.float64), np.asarray(qb.scale, np.float64)
    exact = (ca @ cb) * sa * sb
    np.testing.assert_allclose(got, exact, rtol=2.0**-22, atol=0)
    da, db = np.asarray(jq.dequantize(qa), np.float64), np.asarray(jq.dequantize(qb), np.float64)
    bound = 2.0**-22 * (np.abs(da) @ np.abs(db))
    assert np.all(np.abs(got - da @ db) <= bound)


def test_real_int8_dot_with_full_grid_operands_is_exact():
    rng = np.random.default_rng(8)
    a = rng.uniform(-127, 127, (16, 32)).astype(F32) / 64
    a[:, 0] = -127.5 / 64  # code -128 in every row (the full grid's extra level)
    b = rng.standard_normal((32, 8)).astype(F32)
    sa = jq.QuantSpec("int8", jq.per_token(), int_grid="full")
    sb = jq.QuantSpec("int8", jq.per_channel(-1), int_grid="full")
    qa, qb = jq.quantize(a, sa), jq.quantize(b, sb)
    assert (np.asarray(qa.codes())[:, 0] == -128).all()
    got = jq.dot_general(a, b, (((1,), (0,)), ((), ())), lhs_spec=sa, rhs_spec=sb, mode="real")
    _check_product(np.asarray(got), qa, qb)


@pytest.mark.slow  # imports flax
def test_a_flax_rule_with_a_full_grid_spec_quantizes_the_kernel_on_it():
    nn = pytest.importorskip("flax.linen")
    from jaxquant.flax import Rule, quantize_model

    x = jnp.asarray(_data(9, (4, 32)))
    model = nn.Dense(16)
    params = model.init(jax.random.key(0), x)
    spec = jq.QuantSpec("int3", jq.per_channel(-1), int_grid="full")
    y = quantize_model(model, [Rule(".*", weight=spec)]).apply(params, x)
    p = params["params"]
    codes = jq.quantize(p["kernel"], spec).codes()
    assert np.asarray(codes).max() <= 3 and np.asarray(codes).min() >= -4
    want = np.asarray(x, np.float64) @ np.asarray(jq.fake_quant(p["kernel"], spec), np.float64)
    np.testing.assert_allclose(np.asarray(y), want + np.asarray(p["bias"]), rtol=0, atol=1e-5)
