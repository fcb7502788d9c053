"""Scaling over time: delayed (amax history, TE semantics), current and static scaling."""

import pickle

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant._src.quantize import compute_scale
from jaxquant._src.scaling import (
    ScaleState,
    Scaling,
    current_scaling,
    delayed_scaling,
    fake_quant_with,
    quantize_with,
    static_scaling,
)

INT8 = jq.QuantSpec("int8")
E4M3 = jq.QuantSpec("e4m3")


def _scale(amax, spec):
    """The scale jaxquant's rule gives for a symmetric range [-amax, amax] (float32)."""
    a = jnp.asarray(amax, jnp.float32)
    return np.asarray(compute_scale(-a, a, spec)[0], np.float32)


def _steps(amaxes, shape=(8,), seed=0):
    """One array per step whose max |x| is exactly the given amax (sign alternating)."""
    rng = np.random.default_rng(seed)
    out = []
    for i, a in enumerate(amaxes):
        x = rng.uniform(-1, 1, shape).astype(np.float32) * np.float32(a) * np.float32(0.5)
        x.flat[i % x.size] = np.float32(a) * (1 if i % 2 else -1)
        out.append(jnp.asarray(x))
    return out


def _reference_delayed(amaxes, spec, history_len, margin, reduction):
    """Transformer Engine's rule, written out with numpy: scale used at each step."""
    hist: list[float] = []
    used = []
    for t, a in enumerate(amaxes):
        if t == 0:
            r = a
        else:
            window = hist[:history_len]
            r = max(window) if reduction == "max" else window[0]
        used.append(_scale(np.float32(r) * np.float32(2.0**margin), spec))
        hist.insert(0, a)
    return used


AMAXES = [1.0, 4.0, 0.5, 0.25, 0.25, 0.125, 8.0, 0.1, 0.1, 0.1]


# Every (reduction, history length) once, eager and jit alternating so that each
# reduction and each length meets both modes (each mode compiles its own programs).
@pytest.mark.slow
@pytest.mark.parametrize(
    ("reduction", "history_len", "use_jit"),
    [
        ("max", 1, False),
        ("max", 3, True),
        ("max", 16, False),
        ("most_recent", 1, True),
        ("most_recent", 3, False),
        ("most_recent", 16, True),
    ],
)
def test_delayed_scaling_uses_previous_steps(use_jit, reduction, history_len):
    sc = delayed_scaling(INT8, history_len=history_len, reduction=reduction)
    update = jax.jit(sc.update) if use_jit else sc.update
    state = sc.init((8,))
    want = _reference_delayed(AMAXES, INT8, history_len, 0, reduction)
    for t, x in enumerate(_steps(AMAXES)):
        scale, state = update(state, x)
        assert scale.dtype == jnp.float32 and scale.shape == ()
        np.testing.assert_array_equal(np.asarray(scale), want[t], err_msg=f"step {t}")
        assert int(state.count) == t + 1
        # The history holds the most recent amaxes, newest first.
        recent = AMAXES[: t + 1][::-1][:history_len]
        np.testing.assert_array_equal(
            np.asarray(state.amax_history)[: len(recent)], np.float32(recent)
        )


def test_first_step_falls_back_to_current_amax():
    sc = delayed_scaling(INT8)
    x = jnp.array([0.3, -2.54, 1.0])
    scale, _ = sc.update(sc.init(x), x)
    q_now = jq.quantize(x, INT8)
    np.testing.assert_array_equal(np.asarray(scale), np.asarray(q_now.scale).reshape(()))


def test_delayed_scale_clips_when_range_grows():
    """The point of a delayed scale: step t does not see its own amax (TE semantics)."""
    sc = delayed_scaling(INT8, history_len=4)
    state = sc.init((2,))
    _, state = sc.update(state, jnp.array([1.0, 0.0]))
    x = jnp.array([10.0, 0.5])
    q, state = quantize_with(sc, state, x)
    assert np.asarray(q.values).tolist() == [127, 64]  # 10.0 saturates at 1.0
    _, state = sc.update(state, x)  # now the history has seen 10
    q, _ = quantize_with(sc, state, x)
    assert np.asarray(q.values).tolist() == [127, 6]


@pytest.mark.parametrize("margin", [-1, 0, 1, 3])
def test_margin_gives_power_of_two_headroom(margin):
    sc = delayed_scaling(E4M3, margin=margin, history_len=4)
    want = _reference_delayed(AMAXES[:5], E4M3, 4, margin, "max")
    state = sc.init((8,))
    for t, x in enumerate(_steps(AMAXES[:5])):
        scale, state = sc.update(state, x)
        np.testing.assert_array_equal(np.asarray(scale), want[t])
    # s = amax * 2^margin / 448 with float32 scales (the division is exact here).
    np.testing.assert_allclose(float(want[0]), 2.0**margin / 448, rtol=2**-23)


@pytest.mark.slow
def test_e8m0_scale_format_gives_powers_of_two():
    spec = jq.QuantSpec("e4m3", scale_format="e8m0")
    sc = delayed_scaling(spec, history_len=2)
    state = sc.init((8,))
    for x in _steps([3.0, 100.0, 0.7, 0.01]):
        scale, state = sc.update(state, x)
        m, _ = np.frexp(np.asarray(scale))
        assert m == 0.5  # a power of two
    for amax in [3.0, 100.0]:
        s = float(_scale(amax, spec))
        assert s >= amax / 448 and s / 2 < amax / 448  # rounded up: nothing extra clips


@pytest.mark.slow
def test_mx_spec_keeps_one_history_per_block():
    spec = jq.QuantSpec("mxfp8")
    sc = delayed_scaling(spec, history_len=2)
    x = jax.random.normal(jax.random.key(0), (4, 64))
    state = sc.init(x)
    assert state.amax_history.shape == (2, 4, 2, 1)
    scale, state = sc.update(state, x)
    q = jq.quantize(x, spec)
    np.testing.assert_array_equal(np.asarray(scale), np.asarray(q.scale, np.float32))
    q2, _ = quantize_with(sc, state, x)
    np.testing.assert_array_equal(np.asarray(q2.values), np.asarray(q.values))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("gran", "shape", "scale_shape"),
    [
        (jq.per_tensor(), (6, 5), ()),
        (jq.per_channel(-1), (6, 5), (1, 5)),
        (jq.per_token(-1), (6, 5), (6, 1)),
        (jq.per_block(-1, 4), (3, 8), (3, 2, 1)),
    ],
)
def test_per_channel_histories(gran, shape, scale_shape):
    spec = jq.QuantSpec("int8", gran)
    sc = delayed_scaling(spec, history_len=5)
    state = sc.init(shape)
    assert state.amax_history.shape == (5, *scale_shape)
    assert state.scale.shape == scale_shape
    xs = [jax.random.normal(jax.random.key(i), shape) * (i + 1) for i in range(3)]
    update = jax.jit(sc.update)  # one program (eager updates: the tests above)
    for t, x in enumerate(xs):
        scale, state = update(state, x)
        amax_prev = np.max(
            [np.asarray(jnp.abs(jq.quantize(xs[i], spec).scale)) * 127 for i in range(max(t, 1))],
            axis=0,
        )
        # scale = amax/127 (float32), so recomputing amax from the scale is within 1 ulp.
        np.testing.assert_allclose(
            np.asarray(scale) * 127, amax_prev.reshape(scale_shape), rtol=1e-6
        )
        q = jq.quantize(x, spec, scale=scale)  # the scale plugs into quantize
        assert q.scale.shape == jq.quantize(x, spec).scale.shape


def test_nonfinite_values_are_ignored_and_zero_gives_unit_scale():
    sc = delayed_scaling(INT8, history_len=2)
    state = sc.init((4,))
    scale, state = sc.update(state, jnp.array([0.0, 0.0, 0.0, 0.0]))
    assert float(scale) == 1.0
    _, state = sc.update(state, jnp.array([jnp.nan, jnp.inf, -1.27, 0.5]))
    np.testing.assert_array_equal(np.asarray(state.amax_history), np.float32([1.27, 0.0]))
    np.testing.assert_array_equal(np.asarray(state.scale), _scale(1.27, INT8))


@pytest.mark.slow
def test_current_scaling_is_quantize_without_scale():
    for spec in [INT8, E4M3, jq.QuantSpec("int4", jq.per_channel(0)), jq.QuantSpec("mxfp4")]:
        sc = current_scaling(spec)
        x = jax.random.normal(jax.random.key(3), (4, 64)) * 3
        state = sc.init(x)
        assert state == ()
        q, state = quantize_with(sc, state, x)
        ref = jq.quantize(x, spec)
        np.testing.assert_array_equal(np.asarray(q.values), np.asarray(ref.values))
        np.testing.assert_array_equal(
            np.asarray(q.scale, np.float32), np.asarray(ref.scale, np.float32)
        )
        assert state == ()


@pytest.mark.slow
def test_static_scaling_is_fixed():
    sc = static_scaling(INT8, 12.7)
    state = sc.init((3,))
    for x in [jnp.ones(3), jnp.full(3, 100.0)]:
        scale, state = sc.update(state, x)
        np.testing.assert_array_equal(np.asarray(scale), _scale(12.7, INT8))
    q, _ = quantize_with(sc, state, jnp.array([100.0, 0.1, -1.0]))
    assert np.asarray(q.values).tolist() == [127, 1, -10]
    # Per-channel amaxes; the calibration of the spec is not needed.
    spec = jq.QuantSpec("int8", jq.per_channel(-1), calibration=None)
    sc = static_scaling(spec, np.array([[1.27, 2.54]], np.float32))
    scale, _ = sc.update((), jnp.ones((3, 2)))
    np.testing.assert_allclose(np.asarray(scale), [[0.01, 0.02]], rtol=1e-7)
    q = jq.quantize(jnp.ones((3, 2)), spec, scale=scale)
    assert np.asarray(q.values)[0].tolist() == [100, 50]


@pytest.mark.slow
@pytest.mark.parametrize(
    "make",
    [
        lambda s: delayed_scaling(s, history_len=3),
        current_scaling,
        lambda s: static_scaling(s, 2.0),
    ],
)
def test_same_interface_swappable_under_scan(make):
    """A training-loop style lax.scan over steps works for every scaling."""
    sc = make(E4M3)
    assert isinstance(sc, Scaling) and sc.spec == E4M3
    xs = jnp.stack(_steps([1.0, 2.0, 0.5, 1.5], shape=(4, 8)))
    state0 = sc.init(xs[0])

    def step(state, x):
        y, state = fake_quant_with(sc, state, x)
        return state, y

    state, ys = jax.lax.scan(step, state0, xs)
    assert ys.shape == xs.shape
    # Same as the Python loop.
    state_py = state0
    for t in range(4):
        y, state_py = fake_quant_with(sc, state_py, xs[t])
        np.testing.assert_array_equal(np.asarray(ys[t]), np.asarray(y))
    jax.tree_util.tree_map(np.testing.assert_array_equal, state, state_py)


@pytest.mark.slow
def test_fake_quant_with_is_straight_through():
    sc = delayed_scaling(INT8)

    def loss(x, state):
        y, state = fake_quant_with(sc, state, x)
        return jnp.sum(y * jnp.arange(4.0)), state

    x = jnp.array([0.3, -1.0, 2.0, 0.01])
    g, state = jax.grad(loss, has_aux=True)(x, sc.init(x))
    np.testing.assert_array_equal(np.asarray(g), np.arange(4.0, dtype=np.float32))
    assert int(state.count) == 1
    g2, _ = jax.grad(loss, has_aux=True)(x, state)
    np.testing.assert_array_equal(np.asarray(g2), np.arange(4.0, dtype=np.float32))
    y, _ = fake_quant_with(sc, state, x, ste="clipped")
    assert y.shape == x.shape


@pytest.mark.slow
def test_stochastic_rounding_through_quantize_with(key):
    spec = jq.QuantSpec("int8", rounding="stochastic")
    sc = delayed_scaling(spec)
    x = jnp.full((4096,), 0.3)
    state = sc.init(x)
    with pytest.raises(ValueError, match="PRNG key"):
        quantize_with(sc, state, x)
    q, state = quantize_with(sc, state, x, key=key)
    assert int(state.count) == 1 and q.values.shape == x.shape
    # A static scale of 1/127: x / s = 38.1 rounds up with probability 0.1.
    q, _ = quantize_with(static_scaling(spec, 1.0), (), x, key=key)
    v = np.asarray(q.values, np.float64)
    assert set(np.unique(v).tolist()) == {38, 39}
    # mean of 4096 draws of 38 + Bernoulli(0.1): std 0.3/64 = 0.0047; 5 sigma bound.
    assert abs(v.mean() - 0.3 * 127) < 5 * 0.3 / 64


# ------------------------------------------------------------------ state as a pytree


def _advanced_state(spec=INT8, shape=(3, 4), history_len=4, steps=3):
    sc = delayed_scaling(spec, history_len=history_len)
    state = sc.init(shape)
    for i in range(steps):
        _, state = sc.update(state, jax.random.normal(jax.random.key(i), shape) * (i + 1))
    return sc, state


def _assert_same_state(a, b):
    assert type(a) is type(b) is ScaleState
    assert a._fields == b._fields == ("amax_history", "scale", "count")
    for f in a._fields:
        x, y = getattr(a, f), getattr(b, f)
        assert np.asarray(x).dtype == np.asarray(y).dtype, f
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f)


@pytest.mark.slow
def test_state_fields_dtypes_shapes():
    _, state = _advanced_state()
    assert state.amax_history.dtype == jnp.float32 and state.amax_history.shape == (4,)
    assert state.scale.dtype == jnp.float32 and state.scale.shape == ()
    assert state.count.dtype == jnp.int32 and state.count.shape == ()
    assert int(state.count) == 3


def test_state_survives_jit_with_every_field():
    """jmp's DynamicLossScale drops min_loss_scale through jit; ScaleState keeps all."""
    _, state = _advanced_state()
    out = jax.jit(lambda s: s)(state)
    _assert_same_state(out, state)
    leaves = jax.tree_util.tree_leaves(state)
    assert len(leaves) == 3
    # And as a jit output built inside.
    sc = delayed_scaling(INT8, history_len=4)
    out = jax.jit(sc.init, static_argnums=0)((3, 4))
    _assert_same_state(out, sc.init((3, 4)))


def test_state_tree_map_keeps_structure():
    _, state = _advanced_state()
    doubled = jax.tree_util.tree_map(lambda a: a * 2, state)
    assert isinstance(doubled, ScaleState)
    assert doubled.count.dtype == jnp.int32 and int(doubled.count) == 6
    _assert_same_state(jax.tree_util.tree_map(lambda a: a, state), state)


@pytest.mark.slow
def test_state_vmaps_over_stacked_layers():
    sc = delayed_scaling(INT8, history_len=4)
    xs = jnp.stack([jnp.full((5,), 1.27 * (i + 1)) for i in range(3)])
    states = jax.jit(jax.vmap(sc.init))(xs)  # one program each, not one per operation
    assert states.amax_history.shape == (3, 4) and states.count.shape == (3,)
    scales, states = jax.jit(jax.vmap(sc.update))(states, xs)
    np.testing.assert_allclose(np.asarray(scales), [0.01, 0.02, 0.03], rtol=1e-6)
    for i in range(3):
        _, st = sc.update(sc.init(xs[i]), xs[i])
        _assert_same_state(jax.tree_util.tree_map(lambda a, i=i: a[i], states), st)


def test_state_round_trips_through_flax_serialization_and_pickle():
    sc, state = _advanced_state()
    d = flax.serialization.to_state_dict(state)
    assert set(d) == {"amax_history", "scale", "count"}
    template = sc.init((3, 4))
    back = flax.serialization.from_state_dict(template, d)
    _assert_same_state(back, state)
    blob = flax.serialization.to_bytes(state)
    _assert_same_state(flax.serialization.from_bytes(template, blob), state)
    np_state = jax.tree_util.tree_map(np.asarray, state)
    again = pickle.loads(pickle.dumps(np_state))
    _assert_same_state(ScaleState(*map(jnp.asarray, again)), state)
    # The restored state keeps working.
    scale, _ = sc.update(back, jnp.ones((3, 4)))
    np.testing.assert_array_equal(np.asarray(scale), np.asarray(state.scale))


def test_counter_saturates_instead_of_wrapping():
    sc = delayed_scaling(INT8, history_len=2)
    top = np.iinfo(np.int32).max
    state = sc.init((2,))._replace(count=jnp.asarray(top - 1, jnp.int32))
    update = jax.jit(sc.update)
    _, state = update(state, jnp.ones(2))
    assert int(state.count) == top
    _, state = update(state, jnp.ones(2))
    assert int(state.count) == top and state.count.dtype == jnp.int32


# ------------------------------------------------------------------------- errors


def test_errors_are_clear():
    with pytest.raises(ValueError, match="history_len"):
        delayed_scaling(INT8, history_len=0)
    with pytest.raises(ValueError, match="reduction"):
        delayed_scaling(INT8, reduction="mean")
    with pytest.raises(TypeError, match="margin"):
        delayed_scaling(INT8, margin=0.5)
    with pytest.raises(ValueError, match="asymmetric"):
        delayed_scaling(jq.QuantSpec("uint8", calibration=jq.minmax(), symmetric=False))
    with pytest.raises(ValueError, match="calibration=None"):
        current_scaling(jq.QuantSpec("e4m3", calibration=None))
    with pytest.raises(TypeError, match="QuantSpec"):
        delayed_scaling("int8")
    with pytest.raises(ValueError, match="amax"):
        static_scaling(INT8, -1.0)
    sc = delayed_scaling(jq.QuantSpec("int8", jq.per_channel(-1)))
    with pytest.raises(ValueError, match=r"init\(x.shape\)"):
        sc.update(sc.init((4, 3)), jnp.ones((4, 5)))
    with pytest.raises(TypeError, match="ScaleState"):
        sc.update((), jnp.ones((4, 3)))
    with pytest.raises(TypeError, match="floating-point"):
        sc.update(sc.init((4, 3)), jnp.ones((4, 3), jnp.int32))
    with pytest.raises(TypeError, match=r"jq\.Scaling"):
        quantize_with(INT8, (), jnp.ones(3))
