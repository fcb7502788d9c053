"""Quantized dot_general / einsum: numerics against fake-quant references, STE gradients,
real int8 / fp8 dots in the compiled HLO, errors, capabilities, flax injection.

Compiling is most of this file's time (issue 13): the test data comes from numpy (no
program per shape), and each reference (fake-quantized operands, their product, its
rounding bound, straight-through gradients) runs as one jitted program, cached per spec,
where run op by op it would compile a program per primitive. ``dot_general`` itself is one
compiled program whether it is called eagerly or under ``jit`` (``qdot_jit``).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxquant as jq
from jaxquant._src.dot import dot_capabilities, dot_general, einsum
from jaxquant._src.scaling import delayed_scaling

EPS32 = float(np.finfo(np.float32).eps)
CPU_ONLY = pytest.mark.skipif(jax.default_backend() != "cpu", reason="asserts XLA:CPU's HLO")
MATMUL = (((1,), (0,)), ((), ()))


def _normal(seed, shape, scale=1.0, dtype=jnp.float32):
    # numpy's draws, put on the device: jax.random and jnp.asarray compile per shape
    x = np.random.default_rng(seed).standard_normal(shape) * scale
    return jax.device_put(x.astype(dtype))


def _fq(x, spec, key=None):
    return x if spec is None else jq.fake_quant(x, spec, key=key)


def _grad_fq(spec, key=None):
    """Identity whose backward fake-quantizes the incoming gradient with ``spec``."""

    @jax.custom_vjp
    def ident(y):
        return y

    def fwd(y):
        return y, None

    def bwd(_, g):
        return (g if spec is None else jq.fake_quant(g, spec, key=key),)

    ident.defvjp(fwd, bwd)
    return ident


def _assert_dot_close(got, ref, bound_abs, k, factor=4.0):
    """|got - ref| <= factor * k * eps32 * (|A| @ |B|): float32 accumulation-order error."""
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    bound = factor * k * EPS32 * np.asarray(bound_abs, np.float64) + 1e-30
    err = np.abs(got - ref)
    assert np.all(err <= bound), f"max err {err.max()} vs bound {bound[err > bound].min()}"


def _abs_dot(a, b, dn):
    a = jnp.abs(jnp.asarray(a, jnp.float32))
    b = jnp.abs(jnp.asarray(b, jnp.float32))
    return lax.dot_general(a, b, dn, precision=lax.Precision.HIGHEST)


@functools.cache
def _reference_dot(ls, rs, dn=MATMUL):
    """Jitted ``(a, b) -> (fq(a) . fq(b), |fq(a)| . |fq(b)|)``: the fake-quant product and
    the bound of its float32 rounding, one compiled program per (specs, layout)."""

    @jax.jit
    def ref(a, b):
        fa, fb = _fq(a, ls), _fq(b, rs)
        return lax.dot_general(fa, fb, dn, precision=lax.Precision.HIGHEST), _abs_dot(fa, fb, dn)

    return ref


# Specs: per-tensor, per-row x per-column (the matmul's natural per-channel layout).
GRANS = {
    "per_tensor": (jq.per_tensor(), jq.per_tensor()),
    "per_channel": (jq.per_token(-1), jq.per_channel(-1)),
    "per_channel_axis": (jq.per_channel(0), jq.per_token(0)),
}


def _specs(fmt, gran):
    gl, gr = GRANS[gran]
    return jq.QuantSpec(fmt, gl), jq.QuantSpec(fmt, gr)


# ------------------------------------------------------------------------- forward


MODES = [("auto", True), ("auto", False), ("real", True), ("emulate", True)]
# Every format in every mode (eager and jit), and every granularity of each format: the
# granularity rotates over a format's modes (the scale layout is the same code in each
# mode), offset per format so that the two formats pair the modes with other layouts.
FORWARD_CASES = [
    (fmt, list(GRANS)[(i + offset) % len(GRANS)], mode, use_jit)
    for offset, fmt in enumerate(["int8", "e4m3"])
    for i, (mode, use_jit) in enumerate(MODES)
]


@pytest.mark.slow
@pytest.mark.parametrize(("fmt", "gran", "mode", "use_jit"), FORWARD_CASES)
def test_forward_matches_fake_quant_reference(fmt, gran, mode, use_jit):
    ls, rs = _specs(fmt, gran)
    lhs = _normal(0, (16, 64), 2.0)
    rhs = _normal(1, (64, 24), 0.1)
    f = functools.partial(
        dot_general, dimension_numbers=MATMUL, lhs_spec=ls, rhs_spec=rs, mode=mode
    )
    f = jax.jit(f) if use_jit else f
    y = f(lhs, rhs)
    ref, bound = _reference_dot(ls, rs)(lhs, rhs)
    assert y.shape == ref.shape and y.dtype == jnp.float32
    _assert_dot_close(y, ref, bound, k=64)


@pytest.mark.slow
def test_int8_real_equals_emulated_bitwise():
    """Small K: f32 accumulation of integer products is exact, so both paths agree exactly."""
    ls, rs = _specs("int8", "per_channel")
    lhs, rhs = _normal(2, (8, 32)), _normal(3, (32, 8))
    real = dot_general(lhs, rhs, MATMUL, lhs_spec=ls, rhs_spec=rs, mode="real")
    emu = dot_general(lhs, rhs, MATMUL, lhs_spec=ls, rhs_spec=rs, mode="emulate")
    np.testing.assert_array_equal(np.asarray(real), np.asarray(emu))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("lhs_shape", "rhs_shape", "dn", "gl", "gr"),
    [
        # batched matmul, per-batch-and-row / per-batch-and-column scales
        ((3, 8, 16), (3, 16, 4), (((2,), (1,)), ((0,), (0,))), jq.per_token(-1), jq.per_token(1)),
        # contraction on lhs axis 0 (x^T @ w), per-column scales
        ((16, 8), (16, 4), (((0,), (0,)), ((), ())), jq.per_channel(1), jq.per_channel(1)),
        # two contracted axes, per-tensor
        ((4, 6, 5), (6, 5, 3), (((1, 2), (0, 1)), ((), ())), jq.per_tensor(), jq.per_tensor()),
        # two contracted axes, per-channel over the free axes
        ((4, 6, 5), (5, 3, 6), (((1, 2), (2, 0)), ((), ())), jq.per_channel(0), jq.per_channel(1)),
        # batch axis not leading, scale per batch index only
        ((8, 2, 16), (2, 16, 4), (((2,), (1,)), ((1,), (0,))), jq.per_channel(1), jq.per_tensor()),
    ],
)
@pytest.mark.parametrize("fmt", ["int8", "e4m3"])
def test_general_dimension_numbers(fmt, lhs_shape, rhs_shape, dn, gl, gr):
    ls, rs = jq.QuantSpec(fmt, gl), jq.QuantSpec(fmt, gr)
    lhs, rhs = _normal(4, lhs_shape), _normal(5, rhs_shape)
    gs = jq.QuantSpec("e5m2")
    out_shape = jax.eval_shape(functools.partial(lax.dot_general, dimension_numbers=dn), lhs, rhs)
    c = _normal(6, out_shape.shape)

    def reference(a, b):
        return lax.dot_general(_fq(a, ls), _fq(b, rs), dn, precision=lax.Precision.HIGHEST)

    # Ours and the reference, forward and gradients, in one compiled program; each traced
    # once (vjp). The gradients of sum(y * c): the cotangent c, and the reference's
    # straight-through backward with the cotangent fake-quantized by grad_spec.
    @jax.jit
    def run(a, b):
        y, vjp = jax.vjp(
            lambda a, b: dot_general(a, b, dn, lhs_spec=ls, rhs_spec=rs, grad_spec=gs), a, b
        )
        ref, ref_vjp = jax.vjp(reference, a, b)
        bound = _abs_dot(_fq(a, ls), _fq(b, rs), dn)
        return y, ref, bound, (vjp(c), ref_vjp(_fq(c, gs)))

    y, ref, bound, (got, want) = run(lhs, rhs)
    k = int(np.prod([lhs_shape[d] for d in dn[0][0]]))
    _assert_dot_close(y, ref, bound, k)
    # Gradients in the same layouts as lax's.
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int4", "e5m2", "e2m1", "nf4", "e3m2"])
def test_emulated_formats(fmt):
    """Formats without a low-precision dot run as a float32 dot of their grid values."""
    ls = jq.QuantSpec(fmt, jq.per_token(-1))
    rs = jq.QuantSpec(fmt, jq.per_channel(-1))
    lhs, rhs = _normal(7, (8, 32)), _normal(8, (32, 8))
    reference = _reference_dot(ls, rs)  # ours and the reference: one compiled program
    y, (ref, bound) = jax.jit(
        lambda a, b: (dot_general(a, b, MATMUL, lhs_spec=ls, rhs_spec=rs), reference(a, b))
    )(lhs, rhs)
    _assert_dot_close(y, ref, bound, k=32)


@pytest.mark.slow
def test_one_operand_unquantized_and_mixed_formats():
    lhs, rhs = _normal(9, (8, 32)), _normal(10, (32, 8))
    rs = jq.QuantSpec("int8", jq.per_channel(-1))
    y = dot_general(lhs, rhs, MATMUL, rhs_spec=rs)  # weight-only quantization
    _assert_dot_close(y, *_reference_dot(None, rs)(lhs, rhs), k=32)
    ls = jq.QuantSpec("e4m3")
    y = dot_general(lhs, rhs, MATMUL, lhs_spec=ls, rhs_spec=rs)  # int8 x fp8: emulated
    _assert_dot_close(y, *_reference_dot(ls, rs)(lhs, rhs), k=32)


@pytest.mark.slow
def test_no_specs_is_plain_dot_general():
    lhs, rhs = _normal(11, (4, 8)), _normal(12, (8, 3))
    np.testing.assert_array_equal(
        np.asarray(dot_general(lhs, rhs, MATMUL)), np.asarray(lax.dot_general(lhs, rhs, MATMUL))
    )


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_keep_their_dtype(dtype):
    ls, rs = _specs("e4m3", "per_tensor")
    lhs, rhs = _normal(13, (8, 32), dtype=dtype), _normal(14, (32, 8), dtype=dtype)
    y = dot_general(lhs, rhs, MATMUL, lhs_spec=ls, rhs_spec=rs, grad_spec=jq.QuantSpec("e5m2"))
    assert y.dtype == dtype

    @jax.jit
    def reference(a, b):
        a, b = _fq(a, ls).astype(jnp.float32), _fq(b, rs).astype(jnp.float32)
        return jnp.dot(a, b, precision="highest")

    ref = np.asarray(reference(lhs, rhs))
    tol = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(
        np.asarray(y, np.float32), ref, rtol=tol, atol=tol * float(np.max(ref))
    )
    f = lambda a, b: jnp.sum(
        dot_general(a, b, MATMUL, lhs_spec=ls, rhs_spec=rs).astype(jnp.float32) ** 2
    )
    gl, gr = jax.jit(jax.grad(f, (0, 1)))(lhs, rhs)
    assert gl.dtype == dtype and gr.dtype == dtype
    # preferred_element_type widens the output.
    y32 = dot_general(lhs, rhs, MATMUL, None, jnp.float32, lhs_spec=ls, rhs_spec=rs)
    assert y32.dtype == jnp.float32


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("fmt", ["int8", "e4m3"])
def test_half_precision_backward_multiplies_in_half(dtype, fmt):
    """bf16 / f16 operands: the backward dots take the cotangent in its own dtype, as the
    transpose of a half-precision dot does. ``dlhs = g . w_hat``, ``w_hat`` the weight's
    fake-quant value in ``dtype`` (its per-channel scale lies along this dot's contracted
    axis); ``drhs = x_q^T . g`` with the grid values exact in ``dtype`` and the scale
    applied in float32 after the dot. Both accumulate in float32, rounded once."""
    ls, rs = jq.QuantSpec(fmt), jq.QuantSpec(fmt, jq.per_channel(-1))
    lhs, rhs = _normal(31, (32, 96), 2.0, dtype), _normal(32, (96, 64), 0.1, dtype)
    c = _normal(33, (32, 64), 1.0, dtype)

    def loss(a, b):
        y = dot_general(a, b, MATMUL, lhs_spec=ls, rhs_spec=rs)
        return jnp.sum((y * c).astype(jnp.float32))

    grad = jax.jit(jax.grad(loss, (0, 1)))
    gl, gr = grad(lhs, rhs)
    assert gl.dtype == dtype and gr.dtype == dtype

    @jax.jit
    def reference(lhs, rhs, c):
        c32 = c.astype(jnp.float32)
        w_hat = jq.fake_quant(rhs, rs)  # in dtype
        x_hat = jq.fake_quant(lhs.astype(jnp.float32), ls)  # exact grid value x scale
        want_l = jnp.dot(c32, w_hat.astype(jnp.float32).T, precision="highest")
        return want_l, jnp.dot(x_hat.T, c32, precision="highest")

    assert jax.eval_shape(lambda w: jq.fake_quant(w, rs), rhs).dtype == dtype  # w_hat
    want_l, want_r = reference(lhs, rhs, c)
    eps = float(jnp.finfo(dtype).eps)
    for got, want in ((gl, want_l), (gr, want_r)):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        # one rounding to dtype (half an ulp) plus float32 accumulation order
        assert np.all(np.abs(got - want) <= eps * np.abs(want) + 1e-6 * np.abs(want).max())
    hlo = grad.lower(lhs, rhs).as_text()
    dots = re.findall(r"dot_general.*?: \((tensor<[^>]*>), (tensor<[^>]*>)\)", hlo)
    half = jnp.dtype(dtype).name.replace("float16", "f16").replace("bfloat16", "bf16")
    # the two backward dots (the forward product is not needed for the gradients)
    assert dots == [
        (f"tensor<32x64x{half}>", f"tensor<96x64x{half}>"),
        (f"tensor<32x64x{half}>", f"tensor<32x96x{half}>"),
    ]


# ------------------------------------------------------------------------ backward


STE_SPECS = [
    ("e4m3", "e5m2", "per_tensor"),
    ("e4m3", "e5m2", "per_channel"),
    ("int8", "int8", "per_tensor"),
    ("int8", "int8", "per_channel"),
    ("int8", None, "per_channel"),
]
# Each spec combination in two of the three modes, rotating (combination i: modes i and
# i + 1): each format runs every mode, with several granularities and gradient formats.
STE_MODES = ("auto", "real", "emulate")
STE_CASES = [(*spec, STE_MODES[(i + j) % 3]) for i, spec in enumerate(STE_SPECS) for j in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize(("fmt", "gfmt", "gran", "mode"), STE_CASES)
def test_gradients_match_ste_reference(fmt, gfmt, gran, mode):
    ls, rs = _specs(fmt, gran)
    gs = None if gfmt is None else jq.QuantSpec(gfmt)
    lhs, rhs = _normal(15, (16, 48), 3.0), _normal(16, (48, 8), 0.2)
    c = _normal(17, (16, 8), 10.0)

    def ours(a, b):
        y = dot_general(a, b, MATMUL, lhs_spec=ls, rhs_spec=rs, grad_spec=gs, mode=mode)
        return jnp.sum(y * c)

    dl, dr = jax.jit(jax.grad(ours, (0, 1)))(lhs, rhs)
    (rl, rr), bound_l, bound_r = _ste_reference(ls, rs, gs)(lhs, rhs, c)
    _assert_dot_close(dl, rl, bound_l, k=8)
    _assert_dot_close(dr, rr, bound_r, k=16)


@functools.cache
def _ste_reference(ls, rs, gs):
    """Jitted ``(a, b, c) -> (grads of sum(fq(a) . fq(b) * c) with the cotangent
    fake-quantized by gs, their bounds' |.| products)``: shared by the three modes."""

    @jax.jit
    def ref(a, b, c):
        def loss(a, b):
            fa, fb = _fq(a, ls), _fq(b, rs)
            return jnp.sum(_grad_fq(gs)(jnp.dot(fa, fb, precision="highest")) * c)

        gq, fa, fb = _fq(c, gs), _fq(a, ls), _fq(b, rs)
        bound_l = _abs_dot(gq, fb, (((1,), (1,)), ((), ())))
        return jax.grad(loss, (0, 1))(a, b), bound_l, _abs_dot(fa, gq, (((0,), (0,)), ((), ())))

    return ref


@pytest.mark.slow
def test_stochastic_gradient_rounding_uses_documented_keys(key):
    ls, rs = _specs("e4m3", "per_tensor")
    gs = jq.QuantSpec("e5m2", rounding="stochastic")
    lhs, rhs = _normal(18, (16, 32)), _normal(19, (32, 8))
    c = _normal(20, (16, 8))

    sl = jq.QuantSpec("int8", rounding="stochastic")

    def ours(a, b, k):
        return jnp.sum(dot_general(a, b, MATMUL, lhs_spec=ls, rhs_spec=rs, grad_spec=gs, key=k) * c)

    @jax.jit
    def reference(a, b, key):
        def loss(a, b):
            y = jnp.dot(_fq(a, ls), _fq(b, rs), precision="highest")
            return jnp.sum(_grad_fq(gs, jax.random.fold_in(key, 2))(y) * c)

        # Stochastic operand rounding: lhs uses fold_in(key, 0), rhs fold_in(key, 1).
        fa = jq.fake_quant(a, sl, key=jax.random.fold_in(key, 0))
        fb = jq.fake_quant(b, sl, key=jax.random.fold_in(key, 1))
        return (
            jax.grad(loss, (0, 1))(a, b),
            jnp.dot(fa, fb, precision="highest"),
            _abs_dot(fa, fb, MATMUL),
        )

    grad = jax.jit(jax.grad(ours, (0, 1)))  # one program for both keys
    got = grad(lhs, rhs, key)
    want, ref, bound = reference(lhs, rhs, key)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
    other = grad(lhs, rhs, jax.random.key(1))
    assert not np.array_equal(np.asarray(other[0]), np.asarray(got[0]))
    y = dot_general(lhs, rhs, MATMUL, lhs_spec=sl, rhs_spec=sl, key=key)
    _assert_dot_close(y, ref, bound, k=32)


@pytest.mark.slow
def test_known_scales_plug_in_and_get_no_gradient():
    spec = jq.QuantSpec("int8")
    lhs, rhs = _normal(21, (4, 16)), _normal(22, (16, 4))
    sl, sr = jnp.float32(0.05), jnp.float32(0.01)
    y = dot_general(lhs, rhs, MATMUL, lhs_spec=spec, rhs_spec=spec, lhs_scale=sl, rhs_scale=sr)

    @jax.jit
    def reference(lhs, rhs):
        a, b = jq.fake_quant(lhs, spec, scale=sl), jq.fake_quant(rhs, spec, scale=sr)
        return jnp.dot(a, b, precision="highest"), _abs_dot(a, b, MATMUL)

    _assert_dot_close(y, *reference(lhs, rhs), k=16)
    g = jax.jit(
        jax.grad(
            lambda s: jnp.sum(
                dot_general(lhs, rhs, MATMUL, lhs_spec=spec, rhs_spec=spec, lhs_scale=s)
            )
        )
    )(sl)
    assert float(g) == 0.0


@pytest.mark.slow
def test_delayed_scaling_drives_the_dot():
    spec = jq.QuantSpec("e4m3")
    sc = delayed_scaling(spec)
    lhs, rhs = _normal(23, (8, 16)), _normal(24, (16, 8))

    @jax.jit
    def step(state, a, b):
        s, state = sc.update(state, a)
        return dot_general(a, b, MATMUL, lhs_spec=spec, rhs_spec=spec, lhs_scale=s), state

    state = sc.init(lhs)
    _, state = step(state, lhs, rhs)
    lhs2 = jax.device_put(np.asarray(lhs) * 2)
    y1, state = step(state, lhs2, rhs)  # scale from step 0's amax: the doubled values clip
    scale = float(np.max(np.abs(np.asarray(lhs)))) / 448
    ref = jax.jit(
        lambda a, b: jnp.dot(jq.fake_quant(a, spec, scale=scale), _fq(b, spec), precision="highest")
    )(lhs2, rhs)
    np.testing.assert_allclose(np.asarray(y1), np.asarray(ref), rtol=1e-5, atol=1e-5)
    assert int(state.count) == 2


# --------------------------------------------------------------- transformations


@pytest.mark.slow
def test_vmap_and_jit_of_grad():
    ls, rs = _specs("int8", "per_tensor")
    gs = jq.QuantSpec("int8")
    lhs = _normal(25, (5, 8, 32))
    rhs = _normal(26, (32, 8))
    f = lambda a, b: dot_general(a, b, MATMUL, lhs_spec=ls, rhs_spec=rs, grad_spec=gs)
    loss = lambda a, b: jnp.sum(f(a, b) ** 2)
    yv = jax.vmap(f, in_axes=(0, None))(lhs, rhs)
    gv = jax.jit(jax.vmap(jax.grad(loss, (0, 1)), in_axes=(0, None)))(lhs, rhs)
    # One example at a time (lax.map: a loop, not a batching rule), one compiled program.
    y1, g1 = jax.jit(lambda a, b: lax.map(lambda x: (f(x, b), jax.grad(loss, (0, 1))(x, b)), a))(
        lhs, rhs
    )
    for i in range(5):  # per-tensor scales are per example under vmap
        np.testing.assert_allclose(np.asarray(yv[i]), np.asarray(y1[i]), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(gv[0][i]), np.asarray(g1[0][i]), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(gv[1][i]), np.asarray(g1[1][i]), rtol=1e-6)
    # Second-order transformations compose: grad of a jitted function under vmap.
    hv = jax.vmap(jax.grad(lambda a: loss(a, rhs)))(lhs)
    assert hv.shape == lhs.shape


@pytest.mark.slow
def test_sharded_rows_keep_their_sharding():
    devices = np.array(jax.devices()[:8])
    if devices.size < 8:
        pytest.skip("needs 8 devices")
    mesh = jax.sharding.Mesh(devices, ("x",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x", None))
    ls, rs = _specs("int8", "per_channel")
    lhs = jax.device_put(_normal(27, (16, 32)), rows)
    rhs = _normal(28, (32, 8))
    y = jax.jit(lambda a, b: dot_general(a, b, MATMUL, lhs_spec=ls, rhs_spec=rs))(lhs, rhs)
    assert y.sharding.is_equivalent_to(rows, 2)
    ref = dot_general(np.asarray(lhs), rhs, MATMUL, lhs_spec=ls, rhs_spec=rs)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))


# ------------------------------------------------------------- HLO: real low precision


def _hlo_dots(text):
    """(result type, lhs type, rhs type) of every ``dot`` in an optimized HLO module."""
    found = []
    for comp in re.split(r"\n\s*\n", text):
        types = {}
        header = re.match(r"\s*(?:ENTRY\s+)?%[\w.\-]+\s*\((.*?)\)\s*->", comp)
        if header:
            for m in re.finditer(r"([\w.\-]+):\s*(\w+)\[", header.group(1)):
                types[m.group(1)] = m.group(2)
        for m in re.finditer(r"%([\w.\-]+) = (\w+)\[", comp):
            types[m.group(1)] = m.group(2)
        for m in re.finditer(r"= (\w+)\[[^\n]*? dot\(([^)]*)\)", comp):
            ops = []
            for op in m.group(2).split(","):
                inline = re.match(r"\s*(\w+)\[", op)
                name = re.search(r"%([\w.\-]+)", op)
                ops.append(inline.group(1) if inline else types.get(name.group(1)))
            found.append((m.group(1), *ops))
    return found


def _stablehlo_dots(text):
    """(lhs, rhs, result) element types of every stablehlo.dot_general."""
    t = r"tensor<(?:\d+x)*(\w+)>"
    return re.findall(rf"stablehlo\.dot_general .*?: \({t}, {t}\) -> {t}", text)


@pytest.mark.slow
def test_int8_forward_compiles_to_s8_dot_on_cpu():
    """What we check: the *optimized* HLO (``jit(f).lower(...).compile().as_text()``) holds a
    ``dot`` with two s8 operands and an s32 result (XLA:CPU wraps it in a YNNPACK fusion)."""
    ls, rs = _specs("int8", "per_channel")
    f = jax.jit(lambda a, b: dot_general(a, b, MATMUL, lhs_spec=ls, rhs_spec=rs))
    lhs, rhs = _normal(29, (64, 128)), _normal(30, (128, 32))
    lowered = f.lower(lhs, rhs)
    assert ("i8", "i8", "i32") in _stablehlo_dots(lowered.as_text())
    dots = _hlo_dots(lowered.compile().as_text())
    assert ("s32", "s8", "s8") in dots, dots
    assert not any(d[0] == "f32" for d in dots), dots  # no float dot besides it


@pytest.mark.slow
@CPU_ONLY
def test_int8_training_step_runs_all_three_dots_in_integers():
    """Per-tensor int8 operands and gradient: the forward and ``dlhs = g @ w^T`` compile to
    s8 x s8 -> s32 dots. ``drhs = x^T @ g`` contracts the major axis of both operands;
    XLA:CPU converts such a dot's s8 operands to s32 (its int8 GEMM wants the lhs
    contracted axis minor, and it folds away any transpose we insert), so on CPU that
    one is an s32 dot: still exact integer arithmetic, never a float dot."""
    spec = jq.QuantSpec("int8")
    f = lambda a, b: jnp.sum(
        dot_general(a, b, MATMUL, lhs_spec=spec, rhs_spec=spec, grad_spec=spec) ** 2
    )
    g = jax.jit(jax.grad(f, (0, 1)))
    lhs, rhs = _normal(31, (32, 64)), _normal(32, (64, 16))
    dots = _hlo_dots(g.lower(lhs, rhs).compile().as_text())
    assert len(dots) == 3, dots
    assert dots.count(("s32", "s8", "s8")) >= 2, dots
    assert all(d[0] == "s32" for d in dots), dots


@pytest.mark.slow
@CPU_ONLY
def test_fp8_paths_on_cpu():
    """CPU: mode='auto' emulates fp8 (a float32 dot of the grid values, no f8 dot at all);
    mode='real' emits a StableHLO dot_general on f8E4M3FN operands, which XLA:CPU compiles by
    converting the operands to f32 before its dot."""
    ls, rs = _specs("e4m3", "per_tensor")
    lhs, rhs = _normal(33, (32, 64)), _normal(34, (64, 16))
    auto = jax.jit(lambda a, b: dot_general(a, b, MATMUL, lhs_spec=ls, rhs_spec=rs)).lower(lhs, rhs)
    assert _stablehlo_dots(auto.as_text()) == [("f32", "f32", "f32")]
    real = jax.jit(
        lambda a, b: dot_general(a, b, MATMUL, lhs_spec=ls, rhs_spec=rs, mode="real")
    ).lower(lhs, rhs)
    assert ("f8E4M3FN", "f8E4M3FN", "f32") in _stablehlo_dots(real.as_text())
    compiled = real.compile().as_text()
    assert re.search(r"f32\[32,64\][^\n]* convert\(", compiled)  # XLA:CPU upcasts
    mixed = jax.jit(
        lambda a, b: dot_general(
            a, b, MATMUL, lhs_spec=ls, rhs_spec=jq.QuantSpec("e5m2"), mode="real"
        )
    ).lower(lhs, rhs)
    assert ("f8E4M3FN", "f8E5M2", "f32") in _stablehlo_dots(mixed.as_text())


@CPU_ONLY
def test_dot_capabilities_on_cpu():
    caps = dot_capabilities()
    assert caps["backend"] == "cpu" and caps["platform"] == "cpu"
    assert caps["int8"] is True and caps["fp8"] is False
    assert caps["fp8_pairs"] == ()
    assert caps["compute_capability"] is None
    assert "emulated" in caps["fp8_path"] and "real" in caps["int8_path"]
    assert dot_capabilities("cpu") == caps
    caps["int8"] = False  # a copy: the cache is not mutated
    assert dot_capabilities()["int8"] is True
    with pytest.raises(ValueError, match=r"backend 'no_such_backend' is not available"):
        dot_capabilities("no_such_backend")
    with pytest.raises(TypeError, match=r"backend must be a backend name"):
        dot_capabilities(3)


# -------------------------------------------------------------------------- errors


def test_errors_for_scales_along_the_contraction():
    lhs, rhs = jnp.ones((4, 8)), jnp.ones((8, 3))
    q = lambda gran, fmt="int8": jq.QuantSpec(fmt, gran)
    real = functools.partial(dot_general, lhs, rhs, MATMUL, mode="real")
    with pytest.raises(ValueError, match=r"lhs_spec per_channel\(1,\).*axis 1.*per_token\(1\)"):
        real(lhs_spec=q(jq.per_channel(1)), rhs_spec=q(None))
    with pytest.raises(ValueError, match=r"rhs_spec per_token.*axis 0, which dimension_numbers"):
        real(lhs_spec=q(None), rhs_spec=q(jq.per_token(-1)))
    with pytest.raises(ValueError, match=r"block scales.*mode='auto'"):
        real(lhs_spec=q(jq.per_block(1, 4)), rhs_spec=q(None))
    with pytest.raises(ValueError, match="block scales"):
        real(lhs_spec=q(None), rhs_spec=jq.QuantSpec("mxfp8", jq.per_block(0, 8)))
    with pytest.raises(ValueError, match=r"divid"):
        dot_general(lhs, rhs, MATMUL, lhs_spec=q(jq.per_block(1, 3)))
    with pytest.raises(ValueError, match="asymmetric"):
        dot_general(
            lhs,
            rhs,
            MATMUL,
            lhs_spec=jq.QuantSpec("uint8", calibration=jq.minmax(), symmetric=False),
        )
    with pytest.raises(ValueError, match="PRNG key"):
        dot_general(lhs, rhs, MATMUL, grad_spec=jq.QuantSpec("e5m2", rounding="stochastic"))
    with pytest.raises(ValueError, match="mode='real'"):
        dot_general(
            lhs, rhs, MATMUL, lhs_spec=q(None, "int4"), rhs_spec=q(None, "int4"), mode="real"
        )
    with pytest.raises(ValueError, match="mode='real'"):
        dot_general(lhs, rhs, MATMUL, lhs_spec=q(None), rhs_spec=q(None, "e4m3"), mode="real")
    with pytest.raises(ValueError, match="mode must be"):
        dot_general(lhs, rhs, MATMUL, lhs_spec=q(None), mode="fast")
    with pytest.raises(TypeError, match="QuantSpec or None"):
        dot_general(lhs, rhs, MATMUL, lhs_spec="int8")
    with pytest.raises(TypeError, match="floating point"):
        dot_general(jnp.ones((4, 8), jnp.int32), rhs, MATMUL, lhs_spec=q(None))
    with pytest.raises(TypeError, match="dimension_numbers"):
        dot_general(lhs, rhs, (1, 0), lhs_spec=q(None))
    # lax's shape check (TypeError, as lax.dot_general), naming the operands' shapes
    with pytest.raises(TypeError, match=r"lhs of shape \(4, 8\) and rhs of shape \(5, 3\)"):
        dot_general(lhs, jnp.ones((5, 3)), MATMUL, lhs_spec=q(None))
    with pytest.raises(TypeError, match=r"lhs of shape \(4, 8\) and rhs of shape \(5, 3\)"):
        dot_general(lhs, jnp.ones((5, 3)), MATMUL)  # unquantized: lax.dot_general directly
    with pytest.raises(TypeError, match=r"lhs of shape \(4, 8\) and rhs of shape \(5, 3\)"):
        dot_general(lhs, jq.quantize(jnp.ones((5, 3)), q(None)), MATMUL)  # serving
    with pytest.raises(ValueError, match="out of range"):
        dot_general(lhs, rhs, MATMUL, grad_spec=q(jq.per_channel(2)))


# -------------------------------------------------------------------------- einsum


@pytest.mark.slow
@pytest.mark.parametrize(
    ("subscripts", "a_shape", "b_shape", "gl", "gr"),
    [
        ("btd,df->btf", (2, 3, 16), (16, 5), jq.per_token(-1), jq.per_channel(-1)),
        ("...d,df->...f", (2, 3, 16), (16, 5), jq.per_token(-1), jq.per_channel(-1)),
        ("ij,jk", (4, 16), (16, 3), jq.per_channel(0), jq.per_tensor()),
        ("bij,bjk->bki", (2, 4, 16), (2, 16, 3), jq.per_channel(0, 1), jq.per_channel(0, 2)),
        ("bhqd,bhkd->bhqk", (2, 2, 4, 8), (2, 2, 5, 8), jq.per_token(-1), jq.per_token(-1)),
        ("ij,kj->ik", (4, 16), (3, 16), jq.per_tensor(), jq.per_token(-1)),
    ],
)
def test_einsum_matches_jnp_einsum_of_fake_quant(subscripts, a_shape, b_shape, gl, gr):
    ls, rs = jq.QuantSpec("int8", gl), jq.QuantSpec("int8", gr)
    gs = jq.QuantSpec("e5m2")
    a, b = _normal(35, a_shape), _normal(36, b_shape)
    y = einsum(subscripts, a, b, lhs_spec=ls, rhs_spec=rs, grad_spec=gs)  # eager
    c = _normal(37, y.shape)

    def reference(a, b):
        return jnp.einsum(subscripts, _fq(a, ls), _fq(b, rs), precision="highest")

    # The reference, and both sides' gradients of sum(y * c) (vjp: each traced once; the
    # reference's straight-through backward takes the cotangent fake-quantized by
    # grad_spec), in one compiled program.
    @jax.jit
    def run(a, b):
        _, vjp = jax.vjp(
            lambda a, b: einsum(subscripts, a, b, lhs_spec=ls, rhs_spec=rs, grad_spec=gs), a, b
        )
        ref, ref_vjp = jax.vjp(reference, a, b)
        return ref, vjp(c), ref_vjp(_fq(c, gs))

    ref, got, want = run(a, b)
    assert y.shape == ref.shape
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def test_einsum_errors():
    a, b = jnp.ones((4, 4)), jnp.ones((4, 3))
    spec = jq.QuantSpec("int8")
    with pytest.raises(ValueError, match="exactly two"):
        einsum("ij,jk,kl->il", a, b, lhs_spec=spec)
    with pytest.raises(ValueError, match="repeats"):
        einsum("ii,ik->k", a, b, lhs_spec=spec)
    with pytest.raises(ValueError, match="summed within one operand"):
        einsum("ij,jk->k", a, b, lhs_spec=spec)
    with pytest.raises(ValueError, match="names 3 axes"):
        einsum("ijk,jk->i", a, b, lhs_spec=spec)
    with pytest.raises(ValueError, match="in no operand"):
        einsum("ij,jk->iz", a, b, lhs_spec=spec)
    with pytest.raises(ValueError, match="contract"):
        einsum(
            "ij,jk->ik",
            a,
            b,
            lhs_spec=jq.QuantSpec("int8", jq.per_channel(1)),
            rhs_spec=spec,
            mode="real",
        )


# ----------------------------------------------------------------------- flax injection


@pytest.mark.slow
def test_flax_linen_dense_injection():
    import flax.linen as nn

    ls, rs = _specs("int8", "per_channel")
    qdot = functools.partial(dot_general, lhs_spec=ls, rhs_spec=rs)
    model = nn.Dense(8, dot_general=qdot)
    x = _normal(38, (4, 16))
    params = jax.jit(model.init)(jax.random.key(0), x)

    @jax.jit  # apply, the reference and the gradients: one compiled program
    def run(params, x):
        k, bias = params["params"]["kernel"], params["params"]["bias"]
        ref = jnp.dot(_fq(x, ls), _fq(k, rs), precision="highest") + bias[None, :]
        grads = jax.grad(lambda p: jnp.sum(model.apply(p, x) ** 2))(params)
        return model.apply(params, x), ref, grads

    y, ref, grads = run(params, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)
    assert grads["params"]["kernel"].shape == params["params"]["kernel"].shape
    # DenseGeneral passes batch dims and several contracted axes.
    dg = nn.DenseGeneral(
        (2, 3),
        axis=(-2, -1),
        dot_general=functools.partial(
            dot_general, lhs_spec=jq.QuantSpec("e4m3"), rhs_spec=jq.QuantSpec("e4m3")
        ),
    )
    xg = _normal(39, (5, 4, 6))
    assert jax.jit(lambda k, x: dg.apply(dg.init(k, x), x))(jax.random.key(1), xg).shape == (
        5,
        2,
        3,
    )


@pytest.mark.slow
def test_flax_nnx_linear_injection():
    from flax import nnx

    ls, rs = _specs("e4m3", "per_channel")
    qdot = functools.partial(dot_general, lhs_spec=ls, rhs_spec=rs, grad_spec=jq.QuantSpec("e5m2"))
    layer = nnx.Linear(16, 8, dot_general=qdot, rngs=nnx.Rngs(0))
    x = _normal(40, (4, 16))

    @nnx.jit  # the call, the reference and the gradients: one compiled program
    def run(layer, x):
        ref = jnp.dot(_fq(x, ls), _fq(layer.kernel[...], rs), precision="highest")
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
        return layer(x), ref + layer.bias[...][None, :], grads  # nnx passes out_sharding=None

    y, ref, grads = run(layer, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)
    assert grads.kernel[...].shape == (16, 8)


# ------------------------------------------------- scales along the contraction (auto)


@pytest.mark.slow
@pytest.mark.parametrize(
    "lhs_spec, rhs_spec",
    [
        (jq.QuantSpec("int8", jq.per_block(1, 4)), jq.QuantSpec("int4", jq.per_block(0, 4))),
        (jq.QuantSpec("mxfp8", jq.per_block(1, 8)), jq.QuantSpec("mxfp8", jq.per_block(0, 8))),
        (None, jq.QuantSpec("int8", jq.per_channel(0))),
    ],
)
def test_auto_mode_dequantizes_operands_with_contracted_scales(lhs_spec, rhs_spec):
    """Block / contracted-axis scales: the product of the fake-quantized operands, and
    straight-through gradients (the same as differentiating that float product)."""
    lhs, rhs, g = _normal(41, (6, 16)), _normal(42, (16, 5)), _normal(43, (6, 5))

    def fq(x, spec):
        return x if spec is None else jq.fake_quant(x, spec)

    def ours(a, b):
        return jnp.sum(dot_general(a, b, MATMUL, lhs_spec=lhs_spec, rhs_spec=rhs_spec) * g)

    def ref(a, b):
        return jnp.sum(jnp.dot(fq(a, lhs_spec), fq(b, rhs_spec), precision="highest") * g)

    @jax.jit  # ours and the reference, values and gradients: one compiled program
    def run(a, b):
        return jax.value_and_grad(ours, (0, 1))(a, b), jax.value_and_grad(ref, (0, 1))(a, b)

    (y, got), (y_ref, want) = run(lhs, rhs)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_clipped_ste_zeroes_the_gradient_of_saturated_elements():
    # A fixed range of 1.0: |x| > 1 saturates and must get no gradient.
    spec = jq.QuantSpec("int8", calibration=jq.fixed(1.0))
    lhs = jnp.array([[0.5, -2.0, 0.9, 3.0]])
    rhs = jnp.array([[1.0], [0.25], [-3.0], [0.5]])

    def f(a, b, ste):
        return jnp.sum(dot_general(a, b, MATMUL, lhs_spec=spec, rhs_spec=spec, ste=ste))

    gl, gr = jax.grad(f, argnums=(0, 1))(lhs, rhs, "clipped")
    pl, pr = jax.grad(f, argnums=(0, 1))(lhs, rhs, "plain")
    assert gl.tolist()[0][1] == 0.0 and gl.tolist()[0][3] == 0.0
    assert gl.tolist()[0][0] == pl.tolist()[0][0] != 0.0
    assert gr.tolist()[2][0] == 0.0 and gr.tolist()[0][0] == pr.tolist()[0][0] != 0.0
    with pytest.raises(ValueError, match="ste must be"):
        f(lhs, rhs, "lsq")


@pytest.mark.slow
def test_native_fp8_cast_matches_the_integer_rounding(monkeypatch):
    """The GPU fast path (hardware RNE conversion, bit-decoded fallbacks) forced on CPU:
    the same product and gradients as the integer-emulated rounding, for a real pair and
    for an e5m2 x e5m2 pair that cuBLASLt lacks (decoded through its bits)."""
    from jaxquant._src import dot as D

    x, w = _normal(44, (16, 64), 3.0), _normal(45, (64, 8))

    cases = [
        (jq.QuantSpec("e4m3"), jq.QuantSpec("e4m3")),
        (jq.QuantSpec("e5m2"), jq.QuantSpec("e5m2")),
        (jq.QuantSpec("e4m3", jq.per_token(-1)), jq.QuantSpec("e4m3", jq.per_channel(-1))),
    ]

    def run():
        """Every case's value and gradients, one compiled program (traced anew per call)."""

        def one(a, b, lspec, rspec):
            f = lambda a, b: jnp.sum(
                dot_general(a, b, MATMUL, lhs_spec=lspec, rhs_spec=rspec, grad_spec=rspec) ** 2
            )
            return jax.value_and_grad(f, argnums=(0, 1))(a, b)

        return jax.jit(lambda a, b: [one(a, b, *c) for c in cases])(x, w)

    want = run()
    fake_gpu = {**D._capabilities("cpu"), "platform": "gpu", "fp8": True}
    fake_gpu["fp8_pairs"] = D._CUBLASLT_FP8_PAIRS
    monkeypatch.setattr(D, "_capabilities", lambda backend: fake_gpu)
    monkeypatch.setattr(D, "_NATIVE_FP8_CAST", True)
    jax.clear_caches()
    for (v1, g1), (v0, g0) in zip(run(), want, strict=True):
        np.testing.assert_allclose(v1, v0, rtol=1e-6)
        for a, b in zip(g1, g0, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    jax.clear_caches()


@pytest.mark.slow
def test_bf16_specs_with_absmax_scales_do_not_overflow():
    """bf16 has float32's range: its absmax scale is ~1e-38, so the scales cannot be
    factored out of the dot (grid products overflow, scale products underflow)."""
    a, b = _normal(0, (8, 16)), _normal(1, (16, 4))
    s = jq.QuantSpec("bf16")
    y, g = jax.value_and_grad(  # eagerly
        lambda a: jnp.sum(dot_general(a, b, MATMUL, lhs_spec=s, rhs_spec=s, grad_spec=s) ** 2)
    )(a)
    ref = jax.jit(
        lambda a, b: jnp.sum(
            jnp.dot(jq.fake_quant(a, s), jq.fake_quant(b, s), precision="highest") ** 2
        )
    )(a, b)
    assert np.isfinite(float(y)) and np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_allclose(y, ref, rtol=1e-5)


def test_operand_scale_and_subscript_errors_name_the_argument():
    lhs, rhs = jnp.ones((4, 8)), jnp.ones((8, 3))
    spec = jq.QuantSpec("int8")
    with pytest.raises(TypeError, match=r"dot_general: lhs must be an array, got None"):
        dot_general(None, rhs, MATMUL, lhs_spec=spec)
    with pytest.raises(TypeError, match=r"dot_general: rhs must be an array, got 'abc'"):
        dot_general(lhs, "abc", MATMUL)
    with pytest.raises(TypeError, match=r"preferred_element_type must be a dtype"):
        dot_general(lhs, rhs, MATMUL, None, "bogus", lhs_spec=spec)
    # A scale must broadcast to the operand's scale shape, not the other way round.
    with pytest.raises(ValueError, match=r"dot_general: lhs_scale: scale= has shape \(7,\)"):
        dot_general(lhs, rhs, MATMUL, lhs_spec=spec, lhs_scale=jnp.ones(7))
    with pytest.raises(ValueError, match=r"dot_general: rhs_scale: scale= has shape \(3,\)"):
        dot_general(lhs, rhs, MATMUL, rhs_spec=spec, rhs_scale=jnp.ones(3))
    with pytest.raises(ValueError, match=r"dot_general: grad_scale: scale= has shape \(2,\)"):
        dot_general(lhs, rhs, MATMUL, grad_spec=jq.QuantSpec("e5m2"), grad_scale=jnp.ones(2))
    with pytest.raises(TypeError, match=r"lhs_scale: scale= got a QArray"):
        dot_general(lhs, rhs, MATMUL, lhs_spec=spec, lhs_scale=jq.quantize(lhs, spec))
    # a scalar scale still broadcasts: ones on a 2^-6 grid stay ones
    y = dot_general(lhs, rhs, MATMUL, lhs_spec=spec, lhs_scale=2.0**-6)
    np.testing.assert_array_equal(y, jnp.full((4, 3), 8.0))
    with pytest.raises(TypeError, match=r"einsum: subscripts must be a str"):
        einsum(3, lhs, rhs, lhs_spec=spec)
    with pytest.raises(TypeError, match=r"einsum: b must be an array, got None"):
        einsum("ij,jk->ik", lhs, None, lhs_spec=spec)
    with pytest.raises(TypeError, match=r"einsum: a QArray must be b"):
        einsum("ij,jk->ik", jq.quantize(lhs, spec), rhs)
    with pytest.raises(ValueError, match=r"'jk' names 2 axes but b has 1"):
        einsum("ij,jk->ik", lhs, jq.quantize(jnp.ones(8), spec))
    with pytest.raises(ValueError, match=r"label 'j' .* size 8 in a .* but 5 in b"):
        einsum("ij,jk->ik", lhs, jnp.ones((5, 3)), lhs_spec=spec)
