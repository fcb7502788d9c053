"""Tests for jaxquant.optax: dynamic loss scaling and stochastic-rounded updates."""

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxquant as jq
import jaxquant.optax as jqo

F32 = jnp.float32


def _maybe_jit(fn, use_jit):
    return jax.jit(fn) if use_jit else fn


def _tree_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    return ta == tb and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y, equal_nan=True)
        for x, y in zip(la, lb, strict=True)
    )


PARAMS = {"w": jnp.array([1.0, -2.0, 3.0], F32), "b": jnp.array(0.5, F32)}
GOOD = {"w": jnp.array([0.1, 0.2, -0.3], F32), "b": jnp.array(0.4, F32)}


# ------------------------------------------------------------------------ all_finite
def test_all_finite():
    assert bool(jqo.all_finite(GOOD))
    assert bool(jqo.all_finite({}))
    assert bool(jqo.all_finite({"i": jnp.arange(3)}))
    assert not bool(jqo.all_finite({**GOOD, "b": jnp.array(jnp.nan, F32)}))
    assert not bool(jax.jit(jqo.all_finite)({"w": jnp.array([1.0, -jnp.inf], jnp.float16)}))


# ------------------------------------------------------------------------ loss scale
@pytest.mark.slow
@pytest.mark.parametrize("use_jit", [False, True])
def test_growth_after_interval(use_jit):
    opt = jqo.dynamic_loss_scale(optax.sgd(0.1), initial_scale=8.0, growth_interval=3)
    state = opt.init(PARAMS)
    update = _maybe_jit(opt.update, use_jit)
    seen = []
    for _ in range(7):
        _, state = update(GOOD, state, PARAMS)
        seen.append((float(state.scale), int(state.good_steps)))
    assert seen == [(8, 1), (8, 2), (16, 0), (16, 1), (16, 2), (32, 0), (32, 1)]
    assert state.scale.dtype == F32 and state.good_steps.dtype == jnp.int32


@pytest.mark.parametrize("use_jit", [False, True])
def test_finite_update_unscales(use_jit):
    opt = jqo.dynamic_loss_scale(optax.sgd(0.5), initial_scale=2.0**10)
    state = opt.init(PARAMS)
    scaled = jax.tree_util.tree_map(lambda g: g * 2.0**10, GOOD)
    updates, _ = _maybe_jit(opt.update, use_jit)(scaled, state, PARAMS)
    expected, _ = optax.sgd(0.5).update(GOOD, optax.sgd(0.5).init(PARAMS), PARAMS)
    assert _tree_equal(updates, expected)


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("bad", [jnp.inf, -jnp.inf, jnp.nan])
def test_backoff_on_nonfinite(use_jit, bad):
    opt = jqo.dynamic_loss_scale(
        optax.sgd(0.1, momentum=0.9), initial_scale=64.0, growth_interval=100
    )
    state = opt.init(PARAMS)
    update = _maybe_jit(opt.update, use_jit)
    for _ in range(2):  # move the inner state and the counter off their initial values
        _, state = update(GOOD, state, PARAMS)
    assert int(state.good_steps) == 2
    bad_grads = {"w": GOOD["w"].at[1].set(bad), "b": GOOD["b"]}
    updates, new_state = update(bad_grads, state, PARAMS)
    new_params = optax.apply_updates(PARAMS, updates)
    assert _tree_equal(new_params, PARAMS)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree_util.tree_leaves(updates))
    assert _tree_equal(new_state.inner_state, state.inner_state)
    assert float(new_state.scale) == 32.0
    assert int(new_state.good_steps) == 0


@pytest.mark.parametrize("use_jit", [False, True])
def test_min_and_max_caps(use_jit):
    # min_scale is a closure constant: it survives jit (jmp's DynamicLossScale loses it).
    opt = jqo.dynamic_loss_scale(
        optax.sgd(0.1), initial_scale=8.0, min_scale=2.0, max_scale=32.0, growth_interval=1
    )
    update = _maybe_jit(opt.update, use_jit)
    state = opt.init(PARAMS)
    inf = jax.tree_util.tree_map(lambda g: g / 0.0, GOOD)
    scales = []
    for _ in range(4):
        _, state = update(inf, state, PARAMS)
        scales.append(float(state.scale))
    assert scales == [4.0, 2.0, 2.0, 2.0]
    scales = []
    for _ in range(6):
        _, state = update(GOOD, state, PARAMS)
        scales.append(float(state.scale))
    assert scales == [4.0, 8.0, 16.0, 32.0, 32.0, 32.0]


def test_counter_saturates():
    imax = np.iinfo(np.int32).max
    opt = jqo.dynamic_loss_scale(optax.sgd(0.1), initial_scale=4.0, growth_interval=2**40)
    state = opt.init(PARAMS)._replace(good_steps=jnp.asarray(imax - 1, jnp.int32))
    update = jax.jit(opt.update)
    for _ in range(3):
        _, state = update(GOOD, state, PARAMS)
        assert int(state.good_steps) == imax  # never wraps to a negative count
        assert float(state.scale) == 4.0


def test_state_survives_jit_tree_map_and_serialization():
    opt = jqo.dynamic_loss_scale(
        optax.sgd(0.1, momentum=0.9), initial_scale=16.0, growth_interval=5
    )
    state = opt.init(PARAMS)
    state = jax.jit(opt.update)(GOOD, state, PARAMS)[1]
    assert isinstance(state, jqo.LossScaleState)
    mapped = jax.tree_util.tree_map(lambda x: x, state)
    assert isinstance(mapped, jqo.LossScaleState) and _tree_equal(mapped, state)
    through_jit = jax.jit(lambda s: s)(state)
    assert isinstance(through_jit, jqo.LossScaleState) and _tree_equal(through_jit, state)
    restored = flax.serialization.from_bytes(opt.init(PARAMS), flax.serialization.to_bytes(state))
    assert _tree_equal(restored, state)
    assert float(restored.scale) == 16.0 and int(restored.good_steps) == 1
    # The restored state keeps training identically.
    a = jax.jit(opt.update)(GOOD, state, PARAMS)
    b = jax.jit(opt.update)(GOOD, restored, PARAMS)
    assert _tree_equal(a, b)


def _types(tree):
    return jax.tree_util.tree_map(
        lambda x: (x.shape, np.dtype(x.dtype), x.weak_type), jax.eval_shape(lambda: tree)
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "inner", [optax.adam(1e-2), optax.sgd(0.1, momentum=0.9)], ids=["adam", "momentum"]
)
def test_state_types_do_not_change_with_bf16_params(inner):
    """The float32 unscaled gradients used to turn adam's bf16 moments float32 after one
    update, so a lax.scan over steps did not compile and a restore against init's state
    refused. Every leaf of the state keeps its shape and dtype, on good and bad steps."""
    params = {"w": jnp.array([1.0, -2.0, 3.0], jnp.bfloat16), "b": jnp.array(0.5, jnp.bfloat16)}
    grads = {  # scaled gradients of 3 steps; the second overflows
        "w": jnp.array([[8.0, 16.0, -24.0], [jnp.inf, 1.0, 2.0], [4.0, -4.0, 8.0]], jnp.bfloat16),
        "b": jnp.array([32.0, 1.0, -8.0], jnp.bfloat16),
    }
    opt = jqo.dynamic_loss_scale(inner, initial_scale=8.0, growth_interval=2)
    state0 = opt.init(params)
    assert jax.tree_util.tree_leaves(_types(state0.inner_state))  # there is state to check

    def step(carry, g):
        p, s = carry
        updates, s = opt.update(g, s, p)
        return (optax.apply_updates(p, updates), s), None

    # optax's moment update mixes the float32 gradients with the bf16 moments.
    with jax.numpy_dtype_promotion("standard"):
        (p_scan, s_scan), _ = jax.jit(lambda c: jax.lax.scan(step, c, grads))((params, state0))
        carry, states = (params, state0), [state0]
        for i in range(3):
            carry = step(carry, jax.tree_util.tree_map(lambda g, i=i: g[i], grads))[0]
            states.append(carry[1])
    for s in states[1:]:
        assert _types(s) == _types(state0)
    assert _types(p_scan) == _types(params)
    assert (float(s_scan.scale), int(s_scan.good_steps)) == (4.0, 1)  # as stepped eagerly
    assert [float(s.scale) for s in states] == [8.0, 8.0, 4.0, 4.0]  # the bad step backed off
    assert _tree_equal(states[2].inner_state, states[1].inner_state)  # and kept the state
    assert not _tree_equal(states[3].inner_state, states[1].inner_state)


def test_scale_loss_dtype_and_overflow():
    opt = jqo.dynamic_loss_scale(optax.sgd(0.1), initial_scale=2.0**10)
    state = opt.init(PARAMS)
    y = jqo.scale_loss(jnp.array(3.0, jnp.float16), state)
    assert y.dtype == jnp.float16 and float(y) == 3072.0
    assert not bool(jnp.isfinite(jqo.scale_loss(jnp.array(100.0, jnp.float16), state)))
    with pytest.raises(TypeError, match="LossScaleState"):
        jqo.scale_loss(jnp.array(1.0), optax.sgd(0.1).init(PARAMS))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_scale": 0.0},
        {"initial_scale": 0.5},
        {"initial_scale": 2.0**30},
        {"growth_interval": 0},
        {"growth_factor": 0.5},
        {"backoff_factor": 1.5},
    ],
)
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError, match="dynamic_loss_scale"):
        jqo.dynamic_loss_scale(optax.sgd(0.1), **kwargs)


# ----------------------------------------------------------- fp16 training example
# y = x @ w_true with |x| <= 0.9 * 2^-14 (fp16's smallest normal), |w_true| <= 0.9, d = 4,
# w0 = 0. Then |err| <= 4 * 0.9 * 2^-14 * 0.9 < 2^-12 and each fp16 gradient entry
# |(2/n) sum err_i x_ij| < 2 * 2^-12 * 2^-14 = 2^-25, half of fp16's smallest subnormal
# 2^-24 ~ 6e-8: it rounds to exactly zero, in any evaluation order. Scaled by 2^15 it is
# representable, and unscaled into float32 master gradients it is not lost.
N, D = 32, 4


def _data():
    kx, kw = jax.random.split(jax.random.key(42))
    x = jax.random.uniform(kx, (N, D), F32, -0.9, 0.9) * 2.0**-14
    w_true = jax.random.uniform(kw, (D,), F32, -0.9, 0.9)
    return x.astype(jnp.float16), (x @ w_true).astype(jnp.float16), w_true


def _fp16_loss(w16, x, y):
    err = x @ w16 - y
    return jnp.mean(err * err)


def _mse32(w, x, y):
    err = x.astype(F32) @ w - y.astype(F32)
    return jnp.mean(err * err)


# Curvature of the loss is ~2 E[x^2] ~ 2e-9, so SGD needs a matching step size.
LR = 2.0**28
STEPS = 150


@pytest.mark.slow
def test_fp16_gradients_underflow_without_loss_scaling():
    x, y, _ = _data()
    opt = optax.sgd(LR)

    @jax.jit
    def step(w, s):
        g16 = jax.grad(_fp16_loss)(w.astype(jnp.float16), x, y)
        u, s = opt.update(g16.astype(F32), s, w)
        return optax.apply_updates(w, u), s, g16

    w = jnp.zeros(D, F32)
    s = opt.init(w)
    for _ in range(STEPS):
        w, s, g16 = step(w, s)
    assert g16.dtype == jnp.float16
    assert bool(jnp.all(g16 == 0))  # every gradient underflowed
    assert bool(jnp.all(w == 0))  # nothing was learned
    assert float(_mse32(w, x, y)) > 0


def test_fp16_learns_with_dynamic_loss_scaling():
    x, y, w_true = _data()
    opt = jqo.dynamic_loss_scale(optax.sgd(LR), growth_interval=10)

    @jax.jit
    def step(w, s):
        g16 = jax.grad(lambda w16: jqo.scale_loss(_fp16_loss(w16, x, y), s))(w.astype(jnp.float16))
        u, s = opt.update(g16, s, w)
        return optax.apply_updates(w, u), s

    w = jnp.zeros(D, F32)
    s = opt.init(w)
    loss0 = float(_mse32(w, x, y))
    scales = []
    for _ in range(STEPS):
        w, s = step(w, s)
        scales.append(float(s.scale))
    assert float(_mse32(w, x, y)) < 1e-3 * loss0
    np.testing.assert_allclose(w, w_true, atol=0.05)
    # The scale grew from 2^15 and backed off on fp16 overflow (65504 < 2^16 cotangent).
    assert max(scales) > 2.0**15 and min(scales[10:]) < max(scales)


# ----------------------------------------------------- stochastic-rounded parameters
# bf16 params at 1.0 (ulp 2^-7 ~ 7.8e-3) updated STEPS_SR times by +1e-3 < ulp/2.
# Round-to-nearest never moves. SR is unbiased per step, so E[p_N] = 1 + N * 1e-3 = 1.1;
# each step's rounding error has variance <= ulp^2 / 4 (ulp = 2^-7 on [1, 2)), the errors
# are martingale increments, so Var[p_N] <= N * ulp^2 / 4 per element, and the mean of
# M = 4096 independent elements has sd <= sqrt(N / 4) * ulp / sqrt(M) ~ 6.1e-4. We assert
# |mean - 1.1| < 6 sd (CLT two-sided tail ~ 2e-9), far below RTN's error of 0.1.
M_SR, STEPS_SR, STEP = 4096, 100, 1e-3


def _sr_sd_bound():
    return np.sqrt(STEPS_SR / 4) * 2.0**-7 / np.sqrt(M_SR)


@pytest.mark.parametrize("use_jit", [False, True])
def test_sr_tracks_float32_while_nearest_stalls(use_jit):
    p0 = jnp.ones(M_SR, jnp.bfloat16)
    u = jnp.full(M_SR, STEP, F32)
    apply_sr = _maybe_jit(jqo.apply_updates_sr, use_jit)
    key = jax.random.key(0)
    p_rtn, p_sr, p32 = p0, p0, p0.astype(F32)
    for t in range(STEPS_SR):
        p_rtn = optax.apply_updates(p_rtn, u.astype(jnp.bfloat16))
        p_sr = apply_sr(p_sr, u, jax.random.fold_in(key, t))
        p32 = p32 + u
    assert p_rtn.dtype == p_sr.dtype == jnp.bfloat16
    assert bool(jnp.all(p_rtn == p0))  # round-to-nearest stalls
    target = float(jnp.mean(p32))
    assert abs(target - 1.1) < 1e-4
    mean_sr = float(jnp.mean(p_sr.astype(F32)))
    assert abs(mean_sr - target) < 6 * _sr_sd_bound()
    assert len(np.unique(np.asarray(p_sr.astype(F32)))) > 1  # really stochastic


@pytest.mark.slow
def test_sr_tree_leaves_keys_and_dtypes():
    params = {
        "a": jnp.ones(256, jnp.bfloat16),
        "b": jnp.ones(256, jnp.bfloat16),
        "f32": jnp.ones(3, F32),
        "f16": jnp.ones(256, jnp.float16),
        "i": jnp.arange(3, dtype=jnp.int32),
    }
    updates = {
        "a": jnp.full(256, 2e-3, F32),
        "b": jnp.full(256, 2e-3, F32),
        "f32": jnp.full(3, 1e-3, F32),
        "f16": jnp.full(256, 1e-4, F32),  # < half an fp16 ulp (2^-10) of 1.0
        "i": jnp.ones(3, jnp.int32),
    }
    new = jax.jit(jqo.apply_updates_sr)(params, updates, jax.random.key(1))
    for k in params:
        assert new[k].dtype == params[k].dtype
    assert not bool(jnp.all(new["a"] == new["b"]))  # leaves get different noise
    np.testing.assert_array_equal(new["f32"], jnp.ones(3, F32) + 1e-3)
    np.testing.assert_array_equal(new["i"], jnp.arange(1, 4, dtype=jnp.int32))
    assert bool(jnp.any(new["f16"] != 1))  # fp16 leaves round stochastically too
    same = jqo.apply_updates_sr(params, updates, jax.random.key(1))
    assert _tree_equal(new, same)  # deterministic given the key
    # An explicit spec applies to every floating leaf: float32 storage, bf16 values.
    bf16_sr = jq.QuantSpec("bf16", calibration=None, rounding="stochastic")
    x = jqo.apply_updates_sr(
        {"w": jnp.ones(256, F32)}, {"w": jnp.full(256, 1e-3, F32)}, jax.random.key(2), spec=bf16_sr
    )["w"]
    assert x.dtype == F32
    np.testing.assert_array_equal(x.astype(jnp.bfloat16).astype(F32), x)
    with pytest.raises(ValueError, match="stochastic"):
        jqo.apply_updates_sr(params, updates, jax.random.key(0), spec=jq.QuantSpec("bf16"))


@pytest.mark.slow
@pytest.mark.parametrize("use_jit", [False, True])
def test_stochastic_round_updates_matches_apply_updates_sr(use_jit):
    params = {"w": jnp.ones(1024, jnp.bfloat16)}
    opt = optax.chain(optax.sgd(1e-3), jqo.stochastic_round_updates(seed=3))
    state = opt.init(params)
    update = _maybe_jit(opt.update, use_jit)
    grads = {"w": jnp.ones(1024, F32)}
    p = params
    for _ in range(50):
        key = state[1].key
        u, state = update(grads, state, p)
        ref = jqo.apply_updates_sr(p, {"w": -1e-3 * grads["w"]}, jax.random.split(key)[1])
        p = optax.apply_updates(p, u)
        assert _tree_equal(p, ref)
    # 50 steps of -1e-3 from 1.0: float32 gives 0.95; round-to-nearest would stay at 1.
    sd = np.sqrt(50 / 4) * 2.0**-7 / np.sqrt(1024)  # ulp is 2^-8 below 1, 2^-7 above
    assert abs(float(jnp.mean(p["w"].astype(F32))) - 0.95) < 6 * sd
    restored = flax.serialization.from_bytes(opt.init(params), flax.serialization.to_bytes(state))
    assert _tree_equal(restored, state)
    with pytest.raises(ValueError, match="params"):
        opt.update(grads, state)


# ------------------------------------------------------------------ argument checks
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"initial_scale": True}, TypeError, r"initial_scale must be a number, got True"),
        ({"initial_scale": "1"}, TypeError, r"initial_scale must be a number, got '1'"),
        ({"growth_factor": "2"}, TypeError, r"growth_factor must be a number"),
        ({"growth_interval": 2**100}, ValueError, r"growth_interval must be an int in 1\.\."),
        ({"growth_interval": 2.0}, TypeError, r"growth_interval must be an int"),
        ({"max_scale": np.inf}, ValueError, r"max_scale must be a finite number"),
        ({"unscale_dtype": jnp.int32}, TypeError, r"unscale_dtype must be a floating dtype"),
        ({"unscale_dtype": "bogus"}, TypeError, r"unscale_dtype must be a floating dtype"),
    ],
)
def test_loss_scale_config_types_are_checked_before_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        jqo.dynamic_loss_scale(optax.sgd(0.1), **kwargs)


def test_loss_scale_accepts_numpy_numbers_and_refuses_a_non_optimizer():
    opt = jqo.dynamic_loss_scale(
        optax.sgd(0.1),
        initial_scale=np.float32(8.0),
        growth_interval=np.int64(2**40),  # beyond int32: growth off (documented)
        unscale_dtype="bfloat16",
    )
    assert float(opt.init(PARAMS).scale) == 8.0
    with pytest.raises(TypeError, match=r"inner must be an optax GradientTransformation"):
        jqo.dynamic_loss_scale("adam")
    state = opt.init(PARAMS)
    with pytest.raises(TypeError, match=r"scale_loss: loss must be a floating-point scalar"):
        jqo.scale_loss(None, state)
    with pytest.raises(TypeError, match=r"LossScaleState.scale must be a float32 scalar"):
        jqo.scale_loss(jnp.float32(1.0), state._replace(scale="x"))
    with pytest.raises(TypeError, match=r"all_finite: the leaf of tree at \['s'\] is 'x'"):
        jqo.all_finite({"s": "x"})


def test_sr_updates_must_match_params_leaf_by_leaf():
    params = {"w": jnp.ones(4, jnp.bfloat16)}
    key = jax.random.key(0)
    scalar = jqo.apply_updates_sr(params, {"w": jnp.float32(1.0)}, key)  # broadcasts: fine
    np.testing.assert_array_equal(scalar["w"], 2.0)
    with pytest.raises(ValueError, match=r"updates must have the tree structure of params"):
        jqo.apply_updates_sr(params, {"v": jnp.ones(4)}, key)
    with pytest.raises(ValueError, match=r"the update at \['w'\] has shape \(3,\)"):
        jqo.apply_updates_sr(params, {"w": jnp.ones(3)}, key)
    with pytest.raises(ValueError, match=r"the update at \['w'\] has shape \(2, 4\)"):
        jqo.apply_updates_sr(params, {"w": jnp.ones((2, 4))}, key)  # would grow the param


@pytest.mark.parametrize("seed", [2.0, "3", None, 2**32, -1])
def test_sr_seed_is_an_int_whose_key_is_its_own(seed):
    """jax keeps a seed's low 32 bits (without x64): 2**32 would repeat seed 0."""
    with pytest.raises((TypeError, ValueError), match=r"stochastic_round_updates: seed must be"):
        jqo.stochastic_round_updates(seed=seed)
    assert jqo.stochastic_round_updates(seed=np.int64(2**32 - 1)).init(PARAMS).key.shape == (2,)
