"""The backward products of a quantized dot: ``QuantConfig.backward``.

``"saved"`` multiplies the forward's quantized operands; ``"requantize"`` quantizes each
backward product's block-scaled operands from float with their blocks along that product's
contracted axes (Transformer Engine's NVFP4 recipe). Oracles: ``jq.fake_quant`` of each
operand with explicitly placed blocks, multiplied by a float64 numpy product.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant._src.dot import backend_capabilities
from jaxquant._src.dot.vjp import plan_backward

DN = (((1,), (0,)), ((), ()))


def _operands(m: int = 32, k: int = 64, n: int = 64, seed: int = 0):
    kx, kw, kc = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (m, k)) * jnp.exp(jax.random.normal(kx, (1, k)))  # outliers
    w = jax.random.normal(kw, (k, n)) * 0.1
    c = jax.random.normal(kc, (m, n))  # the output gradient (cotangent)
    return x, w, c


@functools.cache
def _grads_fn(cfg: jq.QuantConfig, jit: bool):
    """The forward and both gradients, one jitted program per config (the key is an
    argument: calls with other keys reuse it)."""

    def run(a, b, g, key):
        y, vjp = jax.vjp(lambda a, b: jq.dot_general(a, b, DN, config=cfg, key=key), a, b)
        return (y, *vjp(g))

    return jax.jit(run) if jit else run


def _grads(cfg: jq.QuantConfig, x, w, c, *, jit: bool = False, key=None):
    return _grads_fn(cfg, jit)(x, w, c, key)


def fq(a, spec):
    return np.asarray(jq.fake_quant(a, spec), np.float64)


@functools.cache
def _block_oracles(fmt: str):
    """fake_quant of x, w and the cotangent c with blocks along each axis ("x0": x with
    blocks along axis 0) and c with the format's default blocks, in one jitted program;
    as float64 arrays."""
    b = 16 if fmt == "nvfp4" else 32

    @jax.jit
    def run(x, w, c):
        out = {
            f"{name}{axis}": jq.fake_quant(a, jq.QuantSpec(fmt, jq.per_block(axis, b)))
            for name, a in (("x", x), ("w", w), ("c", c))
            for axis in (0, 1)
        }
        out["c_default"] = jq.fake_quant(c, jq.QuantSpec(fmt))
        return out

    return lambda x, w, c: {k: np.asarray(v, np.float64) for k, v in run(x, w, c).items()}


# Each format in one mode, MX in both (the two MX formats share one code path; each mode
# compiles its own programs): not the full 3 x 2 product. NVFP4's 1-D blocks move eagerly
# too in test_nvfp4_recipe_2d_weight_is_reused (both modes).
@pytest.mark.parametrize(("fmt", "jit"), [("nvfp4", True), ("mxfp4", False), ("mxfp8", True)])
def test_requantize_moves_1d_blocks_to_each_products_contracted_axis(jit: bool, fmt: str) -> None:
    x, w, c = _operands()
    b = 16 if fmt == "nvfp4" else 32
    blocks = jq.per_block(b)  # along the forward's contraction; moved in the backward
    spec = jq.QuantSpec(fmt, blocks)
    cfg = jq.QuantConfig(act=spec, weight=spec, grad=jq.QuantSpec(fmt), backward="requantize")
    y, dx, dw = _grads(cfg, x, w, c, jit=jit)
    o = _block_oracles(fmt)(x, w, c)
    # fwd: x 1 x b along K (axis 1), w b x 1 along K (axis 0).
    y_ref = o["x1"] @ o["w0"]
    # dgrad contracts N: dy along N (axis 1), w along N (its axis 1).
    dx_ref = o["c1"] @ o["w1"].T
    # wgrad contracts the tokens M: x along M (axis 0), dy along M (axis 0).
    dw_ref = o["x0"].T @ o["c0"]
    for got, ref in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        np.testing.assert_allclose(
            np.asarray(got, np.float64), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max()
        )
    # "saved" multiplies the forward's operands: w's blocks along K, the gradient as given
    # (MX / NVFP4 default: blocks along its last axis, N).
    _, dx_s, dw_s = _grads(cfg.replace(backward="saved"), x, w, c, jit=jit)
    w_fwd, x_fwd, g_fwd = o["w0"], o["x1"], o["c_default"]
    np.testing.assert_allclose(
        np.asarray(dx_s), g_fwd @ w_fwd.T, rtol=1e-5, atol=1e-5 * np.abs(dx_ref).max()
    )
    np.testing.assert_allclose(
        np.asarray(dw_s), x_fwd.T @ g_fwd, rtol=1e-5, atol=1e-5 * np.abs(dw_ref).max()
    )
    assert not np.allclose(np.asarray(dw_s), np.asarray(dw))  # the two really differ


@pytest.mark.parametrize("jit", [False, True])
def test_nvfp4_recipe_2d_weight_is_reused(jit: bool) -> None:
    # TE's NVFP4 recipe: x 1x16 along K, w 16x16 tiles; dgrad dy 1x16 along N times the
    # forward's w (2-D tiles: the same values transposed); wgrad dy and x 1x16 along M.
    x, w, c = _operands()
    act = jq.QuantSpec("nvfp4", jq.per_block(16))
    wt = jq.QuantSpec("nvfp4", jq.per_block_2d(16, axes=(0, 1)))
    cfg = jq.QuantConfig(act=act, weight=wt, grad=jq.QuantSpec("nvfp4"), backward="requantize")
    y, dx, dw = _grads(cfg, x, w, c, jit=jit)
    w_q = fq(w, wt)
    nv = functools.partial(jq.QuantSpec, "nvfp4")
    np.testing.assert_allclose(
        np.asarray(y), fq(x, nv(jq.per_block(1, 16))) @ w_q, rtol=1e-5, atol=1e-5
    )
    dx_ref = fq(c, nv(jq.per_block(1, 16))) @ w_q.T
    np.testing.assert_allclose(np.asarray(dx), dx_ref, rtol=1e-5, atol=1e-5 * np.abs(dx_ref).max())
    dw_ref = fq(x, nv(jq.per_block(0, 16))).T @ fq(c, nv(jq.per_block(0, 16)))
    np.testing.assert_allclose(np.asarray(dw), dw_ref, rtol=1e-5, atol=1e-5 * np.abs(dw_ref).max())
    # The plan keeps the float lhs (wgrad requantizes it) but not the float weight.
    plan = plan_backward(
        DN,
        (x.shape, w.shape, y.shape),
        (act.replace(granularity=jq.per_block(1, 16)), wt, jq.QuantSpec("nvfp4")),
        backward="requantize",
        hadamard=None,
        mode="auto",
        caps=backend_capabilities(),
        scales=(False, False, False),
    )
    assert plan is not None
    assert not plan.dgrad.requant and plan.wgrad.requant
    assert str(plan.dgrad.g_spec.granularity) == "per_block(1,16)"
    assert str(plan.wgrad.g_spec.granularity) == "per_block(0,16)"
    assert str(plan.wgrad.y_spec.granularity) == "per_block(0,16)"


@pytest.mark.parametrize(
    "act, weight, grad",
    [
        (
            jq.QuantSpec("int8", jq.per_token(-1)),
            jq.QuantSpec("int8", jq.per_channel(-1)),
            jq.QuantSpec("e5m2"),
        ),
        (jq.QuantSpec("e4m3"), jq.QuantSpec("e4m3"), jq.QuantSpec("e5m2")),
        (None, jq.QuantSpec("int4", jq.per_block_2d(16)), None),
    ],
)
def test_requantize_keeps_non_block_specs_as_saved(act, weight, grad) -> None:
    # Per-tensor, per-channel and 2-D tiles have nothing to move: bit-identical gradients.
    x, w, c = _operands()
    cfg = jq.QuantConfig(act=act, weight=weight, grad=grad)
    saved = _grads(cfg, x, w, c, jit=True)
    req = _grads(cfg.replace(backward="requantize"), x, w, c, jit=True)
    for a, b in zip(saved, req, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_requantize_batched_tokens_and_einsum() -> None:
    # x (B, T, K): wgrad contracts B and T; the blocks run along the innermost, T.
    kx, kw, kc = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(kx, (2, 32, 64))
    w = jax.random.normal(kw, (64, 32))
    c = jax.random.normal(kc, (2, 32, 32))
    spec = jq.QuantSpec("mxfp8")  # MX default: blocks of 32 along the last axis, moved
    cfg = jq.QuantConfig(act=spec, weight=spec, grad=spec, backward="requantize")

    def f(a, b):
        return jq.einsum("btk,kn->btn", a, b, config=cfg)

    _, vjp = jax.vjp(f, x, w)
    dx, dw = vjp(c)
    mx = functools.partial(jq.QuantSpec, "mxfp8")
    dw_ref = np.einsum(
        "btk,btn->kn", fq(x, mx(jq.per_block(1, 32))), fq(c, mx(jq.per_block(1, 32)))
    )
    dx_ref = np.einsum(
        "btn,kn->btk", fq(c, mx(jq.per_block(2, 32))), fq(w, mx(jq.per_block(1, 32)))
    )
    for got, ref in ((dw, dw_ref), (dx, dx_ref)):
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_vmap_of_the_gradient() -> None:
    x, w, c = _operands(m=16, k=32, n=32)
    spec = jq.QuantSpec("nvfp4", jq.per_block(16))
    cfg = jq.QuantConfig(act=spec, weight=spec, grad=jq.QuantSpec("nvfp4"), backward="requantize")
    xs = jnp.stack([x, 2.0 * x, -x])

    def dw_of(a):
        return jax.grad(lambda b: jnp.sum(jq.dot_general(a, b, DN, config=cfg) * c))(w)

    batched = jax.vmap(dw_of)(xs)
    for i in range(3):
        np.testing.assert_allclose(
            np.asarray(batched[i]), np.asarray(dw_of(xs[i])), rtol=1e-6, atol=1e-6
        )


@pytest.mark.slow
def test_stochastic_gradient_under_jit() -> None:
    x, w, c = _operands()
    act = jq.QuantSpec("nvfp4", jq.per_block(16))
    grad = jq.QuantSpec("nvfp4", rounding="stochastic")
    cfg = jq.QuantConfig(
        act=act, weight=jq.QuantSpec("nvfp4", jq.per_block_2d(16)), grad=grad, backward="requantize"
    )
    k = jax.random.key(5)
    a = _grads(cfg, x, w, c, jit=True, key=k)
    b = _grads(cfg, x, w, c, jit=True, key=k)
    d = _grads(cfg, x, w, c, jit=True, key=jax.random.key(6))
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    assert not np.array_equal(np.asarray(a[2]), np.asarray(d[2]))
    # Unbiased: the mean over keys of dw approaches the product with a nearest-rounded
    # forward and float gradient (200 draws; bound 5 standard errors of the mean).
    keys = jax.random.split(jax.random.key(7), 200)
    # One program for the 200 draws, of the forward and dw only (dx is never computed).
    dws = jax.jit(jax.vmap(lambda kk: _grads(cfg, x, w, c, key=kk)[2]))(keys)
    ref = fq(x, jq.QuantSpec("nvfp4", jq.per_block(0, 16))).T @ np.asarray(c, np.float64)
    err = np.asarray(dws.mean(0)) - ref
    se = np.asarray(dws.std(0)) / np.sqrt(200)
    assert np.abs(err).max() <= 5 * se.max() + 1e-6


def test_bad_arguments() -> None:
    x, w, _ = _operands()
    spec = jq.QuantSpec("nvfp4", jq.per_block(16))
    with pytest.raises(ValueError, match="backward must be one of"):
        jq.QuantConfig(backward="fresh")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backward must be one of"):
        jq.dot_general(x, w, DN, lhs_spec=spec, backward="fresh")  # type: ignore[arg-type]
    cfg = jq.QuantConfig(act=spec, backward="requantize")
    with pytest.raises(ValueError, match="config= and backward="):
        jq.dot_general(x, w, DN, config=cfg, backward="saved")
    g8 = jq.QuantSpec("int8", jq.per_block(-1, 16))
    with pytest.raises(ValueError, match="grad_scale"):
        jq.dot_general(
            x, w, DN, grad_spec=g8, backward="requantize", grad_scale=jnp.ones((32, 3, 1))
        )
    with pytest.raises(ValueError, match="convolutions"):
        jq.conv_general_dilated(jnp.ones((1, 4, 8)), jnp.ones((2, 4, 3)), (1,), "VALID", config=cfg)


@pytest.mark.slow
def test_linen_mlp_trains_with_requantize_and_hadamard() -> None:
    import flax.linen as nn

    nv = jq.QuantSpec("nvfp4", jq.per_block(16))
    cfg = jq.QuantConfig(
        act=nv,
        weight=jq.QuantSpec("nvfp4", jq.per_block_2d(16)),
        grad=jq.QuantSpec("nvfp4"),
        backward="requantize",
        hadamard=jq.rotations.DotHadamard(gemms=("wgrad",)),
    )
    dot = functools.partial(jq.dot_general, config=cfg)

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(64, dot_general=dot)(x))
            return nn.Dense(16, dot_general=dot)(x)

    kx, kt, ki = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (64, 32))
    target = jnp.tanh(x @ jax.random.normal(kt, (32, 16)) / 4)
    model = MLP()
    params = model.init(ki, x)
    lr = jnp.float32(0.2)

    @jax.jit
    def step(params):
        def loss_fn(p):
            return jnp.mean(jnp.square(model.apply(p, x) - target))

        loss, g = jax.value_and_grad(loss_fn)(params)
        return jax.tree.map(lambda p, d: p - lr * d, params, g), loss

    losses = []
    for _ in range(60):
        params, loss = step(params)
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < 0.3 * losses[0]
