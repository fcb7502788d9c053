"""Tests for jaxquant.optax's 8-bit Adam (block-wise dynamic-tree quantized moments)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxquant.optax as jqo
from jaxquant._src.optax.adam8bit import (
    DYNAMIC_SIGNED_CODE,
    DYNAMIC_UNSIGNED_CODE,
    dequantize_blockwise,
    quantize_blockwise,
)

TABLES = {True: DYNAMIC_SIGNED_CODE, False: DYNAMIC_UNSIGNED_CODE}


# ------------------------------------------------------------------------------ code tables


@pytest.mark.parametrize("signed", [True, False])
def test_code_table(signed):
    t = TABLES[signed]
    assert t.dtype == np.float32 and t.shape == (256,)
    assert np.all(np.diff(t) > 0)  # sorted and distinct
    assert 0.0 in t and t[-1] == 1.0
    assert t[0] == (-1.0 if signed else 0.0)
    # Dynamic: the spacing grows with magnitude (finer resolution near 0).
    pos = t[t > 0]
    gaps = np.diff(pos)
    assert gaps[0] < 1e-5 and gaps[-1] > 1e-3
    assert pos[0] <= 1e-6  # at least six decades of dynamic range
    # Exactly one step per decade (the fraction bins) at the top: 2**F + 1 values.
    top = pos[pos > 0.1]
    assert top.size == (64 if signed else 128)
    np.testing.assert_allclose(np.diff(top), 0.9 / top.size, rtol=1e-4)


def test_signed_table_symmetric_but_one():
    t = DYNAMIC_SIGNED_CODE
    neg, pos = -t[t < 0][::-1], t[t > 0]
    np.testing.assert_array_equal(neg, pos[1:])  # +1e-7 is the one extra positive code
    assert pos[0] == np.float32(1e-7)


# ------------------------------------------------------------------------------ round trip


SIZES = [1, 2047, 2048, 5000]


@pytest.mark.slow
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("size", SIZES)
def test_round_trip_nearest_code(signed, size):
    # Eager and jit alternate over the sizes, the other way round for each table: every
    # size and every table in both modes (each mode compiles its own programs per size).
    jit = (SIZES.index(size) + signed) % 2 == 1
    block = 2048
    # numpy data (jax.random and logspace would compile programs per size, eagerly).
    rng = np.random.default_rng(size)
    x = (rng.standard_normal(size) * np.logspace(-4, 1, size)).astype(np.float32)
    x = jnp.asarray(x if signed else np.square(x))
    q_fn = lambda x: quantize_blockwise(x, signed=signed, block_size=block)
    q = jax.jit(q_fn)(x) if jit else q_fn(x)
    n_blocks = -(-size // block)
    assert q.codes.shape == (n_blocks, block) and q.codes.dtype == jnp.uint8
    assert q.absmax.shape == (n_blocks,) and q.absmax.dtype == jnp.float32
    y = np.asarray(jax.jit(dequantize_blockwise)(q) if jit else dequantize_blockwise(q))
    assert y.shape == x.shape and y.dtype == np.float32

    xs = np.asarray(x)
    pad = np.zeros(n_blocks * block - size, np.float32)
    blocks = np.concatenate([xs, pad]).reshape(n_blocks, block)
    absmax = np.abs(blocks).max(axis=1)
    np.testing.assert_array_equal(np.asarray(q.absmax), absmax)
    # Nearest code, by brute force (ties at midpoints may go either way: compare errors).
    t = TABLES[signed]
    normed = blocks / absmax[:, None]
    best = t[np.abs(normed[..., None] - t).argmin(-1)] * absmax[:, None]
    err = np.abs(y - xs)
    best_err = np.abs(best.reshape(-1)[:size] - xs)
    assert np.all(err <= best_err + 1e-6 * np.repeat(absmax, block)[:size])
    # Per-block bound: half the largest gap of the table, times the block's absmax.
    half_gap = np.diff(t).max() / 2  # 0.00703 signed, 0.00352 unsigned
    per_block_err = np.concatenate([err, pad]).reshape(n_blocks, block).max(axis=1)
    assert np.all(per_block_err <= half_gap * absmax * (1 + 1e-5))
    # The block's largest magnitude round-trips exactly (+-1 are codes).
    i = np.argmax(np.abs(xs))
    assert y[i] == xs[i]
    # In the top decade (|x| >= absmax / 10) the relative error is <= half a bin / 0.1:
    # 0.9 / 64 / 2 / 0.1 = 7.0% (signed), 0.9 / 128 / 2 / 0.1 = 3.5% (unsigned).
    scale = np.repeat(absmax, block)[:size]
    top = np.abs(xs) >= 0.1 * scale
    assert np.all(err[top] <= np.abs(xs[top]) * half_gap / 0.1 * (1 + 1e-5))


@pytest.mark.slow
def test_round_trip_zero_and_nan():
    # One program for both inputs (eager round trips: test_round_trip_nearest_code).
    quant = jax.jit(lambda x: quantize_blockwise(x, signed=True, block_size=1024))
    q = quant(jnp.zeros(3000))
    np.testing.assert_array_equal(q.absmax, np.zeros(3, np.float32))
    np.testing.assert_array_equal(jax.jit(dequantize_blockwise)(q), np.zeros(3000, np.float32))
    x = jnp.ones(3000).at[1500].set(jnp.nan)
    y = np.asarray(jax.jit(dequantize_blockwise)(quant(x)))
    assert np.all(np.isnan(y[1024:2048])) and np.all(y[:1024] == 1) and np.all(y[2048:] == 1)


@pytest.mark.slow
def test_quantized_moment_is_a_pytree():
    q = jax.jit(lambda x: quantize_blockwise(x, signed=False, block_size=4))(jnp.arange(10.0))
    leaves = jax.tree_util.tree_leaves(q)
    assert len(leaves) == 2
    q2 = jax.tree_util.tree_map(lambda a: a, q)
    assert q2.shape == (10,) and q2.signed is False
    np.testing.assert_array_equal(q2.dequantize(), q.dequantize())


# ------------------------------------------------------------------------------ optimizer


def _ref_adam(lr, b1=0.9, b2=0.999, eps=1e-8):
    """Plain float32 Adam (optax.adam fails under strict dtype promotion here)."""

    def init(params):
        zeros = jax.tree_util.tree_map(lambda p: jnp.zeros_like(p, jnp.float32), params)
        return (jnp.zeros((), jnp.int32), zeros, zeros)

    def update(g, state):
        t, m, v = state
        t = t + 1
        tf = t.astype(jnp.float32)
        m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, m, g)
        v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, v, g)
        c1, c2 = 1 - jnp.float32(b1) ** tf, 1 - jnp.float32(b2) ** tf
        u = jax.tree_util.tree_map(lambda m, v: -lr * (m / c1) / (jnp.sqrt(v / c2) + eps), m, v)
        return u, (t, m, v)

    return init, update


@functools.cache
def _mlp_problem():
    """Noisy teacher-student regression, MLP 16 -> 320 -> 16 -> 1 (w1, w2: 5120 params, 8-bit).

    Built once for the tests that share it (key 0), with its gradient at the start."""
    k = jax.random.split(jax.random.key(0), 7)
    x = jax.random.normal(k[0], (1024, 16), jnp.float32)
    tw1 = jax.random.normal(k[1], (16, 32), jnp.float32) / 4
    tw2 = jax.random.normal(k[2], (32, 1), jnp.float32) / np.sqrt(32)
    y = jnp.tanh(x @ tw1) @ tw2 + 0.1 * jax.random.normal(k[6], (1024, 1), jnp.float32)
    params = {
        "w1": jax.random.normal(k[3], (16, 320), jnp.float32) / 4,
        "b1": jnp.zeros(320, jnp.float32),
        "w2": jax.random.normal(k[4], (320, 16), jnp.float32) / np.sqrt(320),
        "w3": jax.random.normal(k[5], (16, 1), jnp.float32) / 4,
    }

    def loss(p):
        h = jnp.tanh(x @ p["w1"] + p["b1"][None, :])
        return jnp.mean(jnp.square(jnp.tanh(h @ p["w2"]) @ p["w3"] - y))

    return params, loss, jax.jit(jax.grad(loss))(params)


def _train(init, update, params, loss, steps):
    @jax.jit
    def run(params):
        def step(carry, _):
            params, state = carry
            value, g = jax.value_and_grad(loss)(params)
            u, state = update(g, state)
            return (optax.apply_updates(params, u), state), value

        (params, state), losses = jax.lax.scan(step, (params, init(params)), None, steps)
        return params, state, losses

    return run(params)


@pytest.mark.slow
def test_state_layout():
    params, _, _ = _mlp_problem()
    state = jax.jit(jqo.scale_by_adam_8bit().init)(params)
    assert isinstance(state, jqo.ScaleByAdam8bitState)
    assert state.count.dtype == jnp.int32
    for name in ("w1", "w2"):  # 5120 >= min_size: 8-bit, 3 padded blocks of 2048
        m, v = state.mu[name], state.nu[name]
        assert isinstance(m, jqo.QuantizedMoment) and m.signed and not v.signed
        assert m.codes.shape == v.codes.shape == (3, 2048) and m.codes.dtype == jnp.uint8
        assert m.absmax.shape == (3,) and m.absmax.dtype == jnp.float32
    for name in ("b1", "w3"):  # small leaves stay float32
        assert state.mu[name].dtype == jnp.float32 and state.mu[name].shape == params[name].shape
        assert state.nu[name].dtype == jnp.float32
    # Survives tree_map (static shape / signed kept) and jit.
    s2 = jax.tree_util.tree_map(lambda a: a, state)
    assert s2.mu["w1"].shape == (16, 320) and s2.nu["w1"].signed is False
    s3 = jax.jit(lambda s: s)(state)
    assert jax.tree_util.tree_structure(s3) == jax.tree_util.tree_structure(state)


@pytest.mark.slow
def test_one_step_matches_fp32_adam():
    params, _, g = _mlp_problem()
    opt = jqo.adam_8bit(1e-3)
    # Under jit: one program each (eager updates: test_jit_and_eager_agree).
    u, state = jax.jit(lambda g, p: opt.update(g, opt.init(p)))(g, params)
    r_init, r_update = _ref_adam(1e-3)
    ru, (_, rm, rv) = jax.jit(lambda g, p: r_update(g, r_init(p)))(g, params)
    for name in params:
        # The first update uses the fresh float32 moments: equal to float32 Adam.
        np.testing.assert_allclose(u[name], ru[name], rtol=1e-5, atol=1e-9)
    inner = state[0]
    for name in ("w1", "w2"):
        m, v = inner.mu[name].dequantize(), inner.nu[name].dequantize()
        amax_m, amax_v = float(jnp.max(jnp.abs(rm[name]))), float(jnp.max(rv[name]))
        assert float(jnp.max(jnp.abs(m - rm[name]))) <= 0.00704 * amax_m
        assert float(jnp.max(jnp.abs(v - rv[name]))) <= 0.00352 * amax_v
    np.testing.assert_array_equal(inner.mu["b1"], rm["b1"])


@pytest.mark.slow
def test_200_steps_track_fp32_adam():
    params, loss, _ = _mlp_problem()
    lr, steps = 3e-3, 200
    opt = jqo.adam_8bit(lr)
    p8, state, l8 = _train(opt.init, lambda g, s: opt.update(g, s), params, loss, steps)
    p32, _, l32 = _train(*_ref_adam(lr), params, loss, steps)
    final8, final32, first = float(loss(p8)), float(loss(p32)), float(l32[0])
    # Measured (CPU): first 0.476; final fp32 0.002112, 8-bit 0.002126 (+0.65%); worst step
    # 2.7% apart.
    assert final32 < 0.02 * first  # the problem is learned
    assert abs(final8 - final32) <= 0.05 * final32
    # The whole curve tracks: every step within 5% of fp32's loss + 1e-4.
    assert np.all(np.abs(np.asarray(l8) - np.asarray(l32)) <= 0.05 * np.asarray(l32) + 1e-4)
    assert int(state[0].count) == steps


@pytest.mark.slow
def test_jit_and_eager_agree():
    params, _, g = _mlp_problem()
    opt = jqo.adam_8bit(1e-3)
    state = opt.init(params)
    u1, s1 = opt.update(g, state)
    u1, s1 = opt.update(g, s1)
    upd = jax.jit(opt.update)
    u2, s2 = upd(g, state)
    u2, s2 = upd(g, s2)
    leaves1, leaves2 = jax.tree_util.tree_leaves((u1, s1)), jax.tree_util.tree_leaves((u2, s2))
    for a, b in zip(leaves1, leaves2, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)


@pytest.mark.slow
def test_state_nbytes_vs_fp32_adam():
    n = 2**20
    params = {"w": jnp.zeros((1024, 1024), jnp.float32), "b": jnp.zeros(1024, jnp.float32)}
    # Abstract states: the byte counts need only shapes and dtypes (quantizing a million
    # zeros compiled and ran for seconds); a concrete state counts the same bytes as its
    # abstract one (test_quantized_moment_checks_its_fields_yet_survives_transformations).
    s8 = jax.eval_shape(jqo.adam_8bit(1e-3).init, params)
    with jax.numpy_dtype_promotion("standard"):
        s32 = jax.eval_shape(optax.adam(1e-3).init, params)
    n8, n32 = jqo.state_nbytes(s8), jqo.state_nbytes(s32)
    # fp32 Adam: 8 bytes/param + count; 8-bit: 2 bytes + 8 / 2048 per quantized param,
    # 8 bytes per parameter of the small (float32) bias, and the count.
    assert n32 == 8 * (n + 1024) + 4
    assert n8 == 2 * n + 2 * 4 * (n // 2048) + 8 * 1024 + 4
    assert n8 / n32 < 0.30  # measured: 0.2512 (2_109_444 vs 8_396_804 bytes)


@pytest.mark.slow
def test_padding_counted_in_nbytes():
    state = jax.jit(jqo.scale_by_adam_8bit(block_size=1000, min_size=0).init)(jnp.zeros(2500))
    assert jqo.state_nbytes(state) == 4 + 2 * (3 * 1000 + 3 * 4)


@pytest.mark.slow
def test_small_leaves_stay_float32():
    params = {"small": jnp.ones(4095), "big": jnp.ones(4096)}
    state = jax.jit(jqo.scale_by_adam_8bit().init)(params)
    assert isinstance(state.mu["small"], jax.Array) and state.mu["small"].dtype == jnp.float32
    assert isinstance(state.mu["big"], jqo.QuantizedMoment)
    state = jax.jit(jqo.scale_by_adam_8bit(min_size=0).init)(params)
    assert isinstance(state.mu["small"], jqo.QuantizedMoment)


def test_zero_gradients_keep_zero_states():
    params = {"w": jnp.ones(5000), "b": jnp.ones(10)}
    opt = jqo.adam_8bit(1e-3)
    state = opt.init(params)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    update = jax.jit(opt.update)
    for _ in range(3):
        u, state = update(zeros, state)
    for leaf in jax.tree_util.tree_leaves((u, state)):
        assert not np.any(np.isnan(leaf))
    for leaf in jax.tree_util.tree_leaves(u):
        np.testing.assert_array_equal(leaf, 0)
    inner = state[0]
    np.testing.assert_array_equal(inner.mu["w"].absmax, 0)
    np.testing.assert_array_equal(inner.nu["w"].dequantize(), 0)
    np.testing.assert_array_equal(inner.mu["b"], 0)


@pytest.mark.slow
def test_nan_gradient_poisons_its_block_only():
    opt = jqo.scale_by_adam_8bit(block_size=1024, min_size=0)
    p = jnp.ones(3072)
    state = jax.jit(opt.init)(p)
    _, state = jax.jit(opt.update)(jnp.ones(3072).at[5].set(jnp.nan), state)
    m = np.asarray(state.mu.dequantize())
    assert np.all(np.isnan(m[:1024])) and np.all(np.isfinite(m[1024:]))
    # optax.apply_if_finite skips such steps and keeps the states clean.
    safe = optax.apply_if_finite(jqo.scale_by_adam_8bit(min_size=0), max_consecutive_errors=5)
    s = jax.jit(safe.init)(p)
    _, s = jax.jit(safe.update)(jnp.ones(3072).at[5].set(jnp.nan), s)
    assert np.all(np.asarray(s.inner_state.mu.absmax) == 0)


@pytest.mark.slow
def test_dtype_of_updates_follows_gradients():
    opt = jqo.scale_by_adam_8bit(min_size=0)
    p = jnp.ones(4096, jnp.bfloat16)
    # One program (eager updates: test_jit_and_eager_agree).
    u, state = jax.jit(lambda g, p: opt.update(g, opt.init(p)))(jnp.ones(4096, jnp.bfloat16), p)
    assert u.dtype == jnp.bfloat16 and state.mu.absmax.dtype == jnp.float32


@pytest.mark.slow
def test_count_saturates():
    opt = jqo.scale_by_adam_8bit(min_size=0)
    state = opt.init(jnp.ones(8))
    state = state._replace(count=jnp.asarray(np.iinfo(np.int32).max, jnp.int32))
    u, state = opt.update(jnp.ones(8), state)
    assert int(state.count) == np.iinfo(np.int32).max and np.all(np.isfinite(u))


@pytest.mark.parametrize(
    "kwargs, err",
    [
        ({"b1": 1.0}, ValueError),
        ({"b2": -0.1}, ValueError),
        ({"eps": -1.0}, ValueError),
        ({"block_size": 0}, ValueError),
        ({"block_size": 2.0}, TypeError),
        ({"min_size": -1}, ValueError),
    ],
)
def test_bad_config(kwargs, err):
    with pytest.raises(err):
        jqo.scale_by_adam_8bit(**kwargs)


def test_shape_mismatch_raises():
    opt = jqo.scale_by_adam_8bit()
    with pytest.raises(ValueError, match="does not match"):
        opt.update(jnp.ones(4), opt.init(jnp.ones(3)))


@pytest.mark.parametrize("signed", [True, False])
def test_nearest_code_equals_the_binary_search(signed):
    """The closed-form code search is exactly searchsorted on the float32 midpoints: at
    every code, every midpoint and their float32 neighbours, and across all decades."""
    from jaxquant._src.optax import adam8bit as A

    table, mid = A._table(signed), A._midpoints(signed)
    u = np.random.default_rng(0).uniform(0, 1, 50_000).astype(np.float32)
    parts = [table, mid, u, u**4, 10.0 ** (-8 * u), [0.0, 1.0, 1e-30, 5e-8, 0.1, 1e-6]]
    parts += [np.nextafter(np.float32(v), np.float32(d)) for v in (table, mid) for d in (-2, 2)]
    x = np.clip(np.concatenate([np.asarray(p, np.float32).ravel() for p in parts]), -1, 1)
    x = np.concatenate([x, -x]) if signed else np.abs(x)
    got = np.asarray(jax.jit(lambda y: A._nearest_code(y, signed))(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.searchsorted(mid, x, side="left"))


@pytest.mark.slow
def test_quantized_moment_checks_its_fields_yet_survives_transformations():
    q = jax.jit(lambda x: quantize_blockwise(x, signed=True, block_size=4))(jnp.arange(10.0))
    with pytest.raises(TypeError, match=r"QuantizedMoment.signed must be True or False"):
        jqo.QuantizedMoment(q.codes, q.absmax, (10,), "False")
    with pytest.raises(ValueError, match=r"QuantizedMoment.shape \(-1,\) entry must be"):
        jqo.QuantizedMoment(q.codes, q.absmax, (-1,), True)
    with pytest.raises(TypeError, match=r"state_nbytes: QuantizedMoment.codes must be a uint8"):
        jqo.state_nbytes(jqo.QuantizedMoment(q.codes.astype(jnp.float32), q.absmax, (10,), True))
    with pytest.raises(ValueError, match=r"codes has shape \(3, 4\), but a tensor of shape"):
        jqo.state_nbytes(jqo.QuantizedMoment(q.codes, q.absmax, (30,), True))
    assert jqo.QuantizedMoment(q.codes, q.absmax, [np.int64(10)], np.True_).shape == (10,)
    # The array fields hold whatever a transformation puts there: only used ones are checked.
    assert jax.tree_util.tree_map(lambda a: None, q).codes is None
    vmapped = jax.vmap(lambda m: m.dequantize())(jax.tree_util.tree_map(lambda a: a[None], q))
    np.testing.assert_array_equal(vmapped[0], q.dequantize())
    opt = jqo.scale_by_adam_8bit(min_size=0)
    abstract = jax.eval_shape(opt.init, {"w": jnp.ones(5000)})
    assert jqo.state_nbytes(abstract) == jqo.state_nbytes(opt.init({"w": jnp.ones(5000)}))


def test_update_names_the_bad_state_field():
    opt = jqo.scale_by_adam_8bit(min_size=0)
    g = {"w": jnp.ones(8)}
    state = opt.init(g)
    with pytest.raises(TypeError, match=r"ScaleByAdam8bitState.count must be an int32 scalar"):
        opt.update(g, state._replace(count=jnp.float32(0)))
    with pytest.raises(ValueError, match=r"the state's nu does not have the gradients' tree"):
        opt.update(g, state._replace(nu={"v": state.nu["w"]}))
    with pytest.raises(TypeError, match=r"state.nu leaf 0 must be a QuantizedMoment"):
        opt.update(g, state._replace(nu={"w": jnp.zeros(8)}))


@pytest.mark.parametrize(
    "lr", [0.1, 1, np.float32(0.1), jnp.float32(0.1), optax.linear_schedule(0.1, 0.0, 10)]
)
def test_learning_rate_spellings_are_accepted(lr):
    opt = jqo.adam_8bit(lr)
    u, _ = opt.update(jnp.ones(3), opt.init(jnp.ones(3)))
    assert u.shape == (3,)


def test_traced_learning_rate_through_inject_hyperparams():
    static = ("b1", "b2", "eps", "block_size", "min_size")
    opt = optax.inject_hyperparams(jqo.adam_8bit, static_args=static)(learning_rate=0.1)
    params = jnp.ones(3)
    u, _ = jax.jit(opt.update)(params, opt.init(params), params)
    np.testing.assert_allclose(u, -0.1, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"b1": "0.9"}, r"b1 must be a number, got '0.9'"),
        ({"b2": True}, r"b2 must be a number, got True"),
        ({"block_size": 2**31}, r"block_size must be an int in 1..2147483647"),
        ({"learning_rate": None}, r"adam_8bit: learning_rate must be a number, got None"),
        ({"learning_rate": jnp.ones(2)}, r"learning_rate must be a number, a scalar array"),
    ],
)
def test_config_types_are_checked_before_values(kwargs, match):
    kwargs = {"learning_rate": 0.1, **kwargs}
    with pytest.raises((TypeError, ValueError), match=match):
        jqo.adam_8bit(**kwargs)
