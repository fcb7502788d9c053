"""Stateful rules (delayed scaling, LSQ, stochastic rounding) under scan and remat.

Linen's ``nn.scan`` / ``nn.vmap`` see only the collections and RNG streams they are told to
pass: without ``'quant_state'`` in ``variable_axes`` (or ``'quant'`` in ``split_rngs``) the
error names the line to add. NNX layers stacked by ``nnx.vmap`` keep their quantization
state (and PRNG keys) stacked too, so ``nnx.scan`` slices it with the kernels: nothing to
declare. Each scanned model is checked against the same layers run one by one.

Compiling and tracing are most of this file's time (issue 13): a Linen model is
initialised by one jitted ``init`` (run eagerly, each initializer and quantizer op would
compile its own program), structures and errors come from ``jax.eval_shape``, and host-side
slicing and stacking is numpy.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant.flax import QuantState, Rule, quantize_model

INT8 = jq.QuantSpec("int8")
DELAYED = Rule(
    ".*",
    weight=jq.QuantSpec("int8", jq.per_channel(-1)),
    act=INT8,
    scaling="delayed",
    history_len=4,
)
LSQ = Rule(".*", weight=INT8, act=INT8, ste="lsq")
SR = Rule(".*", weight=jq.QuantSpec("int4", rounding="stochastic"))
N = 3  # layers
X = jax.random.normal(jax.random.key(0), (4, 16))


def _init(model, key, x):
    """``model.init`` as one compiled program."""
    return jax.jit(model.init)(key, x)


def _close(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------- Linen


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(16)(nn.relu(nn.Dense(32)(x))), None


def _stack(variable_axes, split_rngs=None, *, remat=False, length=N):
    block = nn.remat(Block) if remat else Block

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(
                block,
                variable_axes=variable_axes,
                split_rngs=split_rngs or {"params": True},
                length=length,
            )
            return scan(name="layers")(x, None)[0]

    return Stack()


SCANNED = {"params": 0, "quant_state": 0}


RULES = {"delayed": DELAYED, "lsq": LSQ}


@functools.cache
def _scanned(rule: str):
    """(the scanned stack quantized by RULES[rule], its variables): one init for the tests
    that start from it (none changes them)."""
    model = quantize_model(_stack(SCANNED), RULES[rule])
    return model, _init(model, jax.random.key(1), X)


def _linen_step(model, v, x, **kw):
    y, new = model.apply(v, x, mutable=["quant_state"], **kw)
    return y, {**v, **new}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RULES))
def test_linen_scan_keeps_one_state_per_layer_like_the_unrolled_layers(name):
    rule = RULES[name]
    model, v = _scanned(name)
    layer = quantize_model(Block(), rule)

    def layer_vars(tree, i):
        return jax.tree.map(lambda a: np.asarray(a)[i], tree["layers"])

    ref = [
        {"params": layer_vars(v["params"], i), "quant_state": layer_vars(v["quant_state"], i)}
        for i in range(N)
    ]
    if rule is LSQ:  # init took each layer's base steps from its own input
        bases = v["quant_state"]["layers"]["Dense_0"]["quant"]["lhs_step_base"]
        assert bases.shape == (N,) and len(set(np.asarray(bases).tolist())) == N
    step = jax.jit(lambda v, x: _linen_step(model, v, x))
    ref_step = jax.jit(lambda v, h: layer.apply(v, h, None, mutable=["quant_state"]))
    for t in range(3):
        x = X * (1.0 + t)
        y, v = step(v, x)
        h = x
        for i in range(N):
            (h, _), new = ref_step(ref[i], h)
            ref[i] = {**ref[i], **new}
        np.testing.assert_allclose(y, h, rtol=1e-5, atol=1e-6)
    stacked = jax.tree.map(lambda *a: np.stack(a), *[r["quant_state"] for r in ref])
    _close(v["quant_state"]["layers"], stacked)
    if rule is DELAYED:
        counts = v["quant_state"]["layers"]["Dense_1"]["quant"]["rhs_scaling"].count
        np.testing.assert_array_equal(counts, [3] * N)


@pytest.mark.slow
def test_linen_scan_without_quant_state_names_the_variable_axes_to_add():
    model = quantize_model(_stack({"params": 0}), DELAYED)
    with pytest.raises(
        ValueError,
        match=r"layers/Dense_\d.*nn\.scan.*variable_axes=\{'params': 0, 'quant_state': 0\}",
    ):
        jax.eval_shape(model.init, jax.random.key(1), X)
    fixed = quantize_model(_stack(SCANNED), DELAYED)
    jax.eval_shape(fixed.init, jax.random.key(1), X)  # the fix works (the error is a trace's)


@pytest.mark.slow
def test_linen_vmap_without_quant_state_names_the_variable_axes_to_add():
    class Ensemble(nn.Module):
        @nn.compact
        def __call__(self, x):
            vmapped = nn.vmap(
                nn.Dense,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=None,
                axis_size=2,
            )
            return vmapped(8)(x)

    with pytest.raises(ValueError, match=r"nn\.vmap.*'quant_state': 0"):
        jax.eval_shape(quantize_model(Ensemble(), DELAYED).init, jax.random.key(1), X)


@pytest.mark.slow
def test_linen_apply_without_the_state_collection_says_what_to_pass():
    model = quantize_model(nn.Dense(8), DELAYED)
    v = jax.eval_shape(model.init, jax.random.key(1), X)  # the error is raised while tracing
    with pytest.raises(ValueError, match=r"'lhs_scaling'.*pass the 'quant_state' collection"):
        jax.eval_shape(lambda p: model.apply({"params": p}, X), v["params"])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RULES))
def test_linen_remat_gives_the_same_values_gradients_and_state(name):
    rule = RULES[name]
    plain, v = _scanned(name)
    remat = quantize_model(_stack(SCANNED, remat=True), rule)
    assert jax.tree.structure(jax.eval_shape(remat.init, jax.random.key(1), X)) == (
        jax.tree.structure(v)
    )

    def loss(model, params):
        y, new = model.apply({**v, "params": params}, X, mutable=["quant_state"])
        return jnp.mean(y**2), new

    (l0, s0), g0 = jax.jit(jax.value_and_grad(lambda p: loss(plain, p), has_aux=True))(v["params"])
    (l1, s1), g1 = jax.jit(jax.value_and_grad(lambda p: loss(remat, p), has_aux=True))(v["params"])
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    _close(g0, g1)
    _close(s0, s1)
    assert float(jnp.abs(g0["layers"]["Dense_0"]["kernel"]).sum()) > 0

    # nn.remat on a single layer (no scan) too.
    dense = quantize_model(nn.remat(nn.Dense)(8), rule)

    @jax.jit
    def init_and_apply(key, x):
        vd = dense.init(key, x)
        return vd, dense.apply(vd, x, mutable=["quant_state"])

    vd, (y, new) = init_and_apply(jax.random.key(2), X)
    assert y.shape == (4, 8) and jax.tree.structure(new) == jax.tree.structure(
        {"quant_state": vd["quant_state"]}
    )


@pytest.mark.slow
def test_linen_scan_stochastic_rounding_needs_the_quant_stream_split():
    rngs = {"params": jax.random.key(1), "quant": jax.random.key(2)}
    model = quantize_model(_stack({"params": 0}), SR)
    with pytest.raises(
        ValueError, match=r"split_rngs of the nn\.scan.*\{'params': True, 'quant': True\}"
    ):
        jax.eval_shape(model.init, rngs, X)  # the error is a trace's
    model = quantize_model(_stack({"params": 0}, {"params": True, "quant": True}), SR)
    v = _init(model, rngs, X)
    apply = jax.jit(lambda v, key: model.apply(v, X, rngs={"quant": key}))
    a = apply(v, jax.random.key(3))
    b = apply(v, jax.random.key(4))
    c = apply(v, jax.random.key(3))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, c)


class LinenTransformerBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16)(h, h)
        h = nn.LayerNorm()(x)
        return x + nn.Dense(16)(nn.gelu(nn.Dense(32)(h))), None


@pytest.mark.slow
def test_linen_scanned_transformer_trains_with_delayed_scaling():
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(
                nn.remat(LinenTransformerBlock),
                variable_axes=SCANNED,
                split_rngs={"params": True},
                length=2,
            )
            return scan(name="layers")(x, None)[0]

    model = quantize_model(Model(), DELAYED)
    x = jax.random.normal(jax.random.key(5), (2, 6, 16))
    v = _init(model, jax.random.key(1), x)
    opt = optax.adam(1e-2)
    params, state = v["params"], v["quant_state"]
    with jax.numpy_dtype_promotion("standard"):
        opt_state = jax.jit(opt.init)(params)

        @jax.jit
        def step(params, state, opt_state):
            def loss(p):
                y, new = model.apply(
                    {"params": p, "quant_state": state}, x, mutable=["quant_state"]
                )
                return jnp.mean((y - 1.0) ** 2), new["quant_state"]

            (val, state), g = jax.value_and_grad(loss, has_aux=True)(params)
            updates, opt_state = opt.update(g, opt_state)
            return optax.apply_updates(params, updates), state, opt_state, val

        losses = []
        for _ in range(5):
            params, state, opt_state, val = step(params, state, opt_state)
            losses.append(float(val))
    assert losses[-1] < losses[0]
    counts = [
        np.asarray(leaf.count)
        for leaf in jax.tree.leaves(state, is_leaf=lambda t: isinstance(t, jq.ScaleState))
    ]
    assert len(counts) >= 2 * 6  # q, k, v, out and the MLP's two Dense, two operands each
    for c in counts:
        np.testing.assert_array_equal(c, [5, 5])


# ---------------------------------------------------------------------------------- NNX


class NBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.up = nnx.Linear(16, 32, rngs=rngs)
        self.down = nnx.Linear(32, 16, rngs=rngs)

    def __call__(self, x):
        return x + self.down(nnx.relu(self.up(x)))


class NStack(nnx.Module):
    """The nnx.scan pattern of flax's guides: layers built by nnx.vmap, run by nnx.scan."""

    def __init__(self, block, rngs: nnx.Rngs, *, remat: bool = False) -> None:
        @nnx.split_rngs(splits=N)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return block(rngs)

        self.layers = create(rngs)
        self.remat = remat

    def __call__(self, x):
        def body(x, layer):
            return layer(x)

        if self.remat:
            body = nnx.remat(body)

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(x, layer):
            return body(x, layer)

        return run(x, self.layers)


def _unrolled(stack: NStack) -> list[NBlock]:
    """The stack's layers as separate modules with the same (sliced) kernels and biases."""
    out = []
    for i in range(N):
        block = NBlock(nnx.Rngs(0))
        for name in ("up", "down"):
            for attr in ("kernel", "bias"):
                stacked = np.asarray(getattr(getattr(stack.layers, name), attr)[...])
                # sliced on the host: an eager slice would compile a program per shape
                getattr(getattr(block, name), attr)[...] = jax.device_put(stacked[i])
        out.append(block)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("rule", [DELAYED, LSQ], ids=["delayed", "lsq"])
def test_nnx_scan_over_stacked_layers_needs_no_declaration(rule):
    stack = NStack(NBlock, nnx.Rngs(0))
    layers = _unrolled(stack)
    quantize_model(stack, rule)
    for layer in layers:
        quantize_model(layer, rule)
    op = stack.layers.up.dot_general
    names = ("lhs_count", "rhs_amax_history") if rule is DELAYED else ("lhs_step_base",)
    for name in names:  # stacked like the kernel: one state per layer
        value = getattr(op, name)
        assert isinstance(value, QuantState) and value[...].shape[0] == N
    if rule is DELAYED:  # per-channel weight: (layers, history, 1, out)
        assert op.rhs_amax_history[...].shape == (N, 4, 1, 32)
    else:
        assert isinstance(op.rhs_step, nnx.Param) and op.rhs_step[...].shape == (N,)

    run = nnx.jit(lambda m, x: m(x))
    for t in range(3):
        x = X * (1.0 + t)
        y = run(stack, x)
        h = x
        for layer in layers:
            h = run(layer, h)
        np.testing.assert_allclose(y, h, rtol=1e-5, atol=1e-6)
    for name in ("up", "down"):
        got = nnx.state(getattr(stack.layers, name).dot_general, QuantState)
        want = [nnx.state(getattr(layer, name).dot_general, QuantState) for layer in layers]
        _close(got, jax.tree.map(lambda *a: np.stack(a), *want))
    if rule is DELAYED:
        np.testing.assert_array_equal(op.lhs_count[...], [3] * N)


@pytest.mark.slow
def test_nnx_scanned_lsq_steps_train_per_layer():
    stack = NStack(NBlock, nnx.Rngs(0))
    quantize_model(stack, LSQ)
    with jax.numpy_dtype_promotion("standard"):
        opt = nnx.Optimizer(stack, optax.sgd(0.1), wrt=nnx.Param)

        @nnx.jit
        def step(m, opt):
            loss, g = nnx.value_and_grad(lambda m: jnp.mean(m(X) ** 2))(m)
            opt.update(m, g)
            return loss

        step(stack, opt)
    steps = np.asarray(stack.layers.up.dot_general.lhs_step[...])
    bases = np.asarray(stack.layers.up.dot_general.lhs_step_base[...])
    assert steps.shape == bases.shape == (N,)
    assert np.all(steps != 1.0) and len(set(steps.tolist())) == N  # each its own gradient
    assert np.all(bases > 0) and len(set(bases.tolist())) == N  # each from its own input


@pytest.mark.slow
def test_nnx_scanned_stochastic_rounding_gets_a_key_per_layer():
    stack = NStack(NBlock, nnx.Rngs(0))
    quantize_model(stack, SR, rngs=nnx.Rngs(quant=7))
    keys = stack.layers.up.dot_general.rngs.quant.key[...]
    assert keys.shape == (N,)
    data = np.asarray(jax.random.key_data(keys))
    assert len({tuple(k) for k in data}) == N
    # The two layers of a block have their own streams too.
    other = np.asarray(jax.random.key_data(stack.layers.down.dot_general.rngs.quant.key[...]))
    assert not np.array_equal(data, other)
    run = nnx.jit(lambda m, x: m(x))
    a, b = run(stack, X), run(stack, X)
    assert not np.allclose(a, b)  # a fresh key per call
    np.testing.assert_array_equal(stack.layers.up.dot_general.rngs.quant.count[...], [2] * N)
    stack.eval()  # nearest rounding: no keys, the same result each call
    np.testing.assert_array_equal(run(stack, X), run(stack, X))


@pytest.mark.slow
@pytest.mark.parametrize("rule", [DELAYED, LSQ], ids=["delayed", "lsq"])
def test_nnx_remat_gives_the_same_values_gradients_and_state(rule):
    plain, remat = NStack(NBlock, nnx.Rngs(0)), NStack(NBlock, nnx.Rngs(0), remat=True)
    quantize_model(plain, rule)
    quantize_model(remat, rule)

    @nnx.jit
    def step(m):
        return nnx.value_and_grad(lambda m: jnp.mean(m(X) ** 2))(m)

    l0, g0 = step(plain)
    l1, g1 = step(remat)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    _close(g0, g1)
    _close(nnx.state(plain, QuantState), nnx.state(remat, QuantState))
    assert float(jnp.abs(g0["layers"]["up"]["kernel"][...]).sum()) > 0


class NTransformerBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.norm1 = nnx.LayerNorm(16, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=2, in_features=16, qkv_features=16, decode=False, rngs=rngs
        )
        self.norm2 = nnx.LayerNorm(16, rngs=rngs)
        self.up = nnx.Linear(16, 32, rngs=rngs)
        self.down = nnx.Linear(32, 16, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.down(nnx.gelu(self.up(self.norm2(x))))


@pytest.mark.slow
def test_nnx_scanned_transformer_trains_with_delayed_scaling():
    model = NStack(NTransformerBlock, nnx.Rngs(0), remat=True)
    quantize_model(model, DELAYED)
    assert model.layers.attn.query.dot_general.rhs_amax_history[...].shape == (N, 4, 1, 1, 8)
    x = jax.random.normal(jax.random.key(5), (2, 6, 16))
    with jax.numpy_dtype_promotion("standard"):
        opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

        @nnx.jit
        def step(m, opt):
            loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(x) - 1.0) ** 2))(m)
            opt.update(m, g)
            return loss

        losses = [float(step(model, opt)) for _ in range(5)]
    assert losses[-1] < losses[0]
    counts = [
        np.asarray(v[...])
        for path, v in nnx.iter_graph(model)
        if isinstance(v, QuantState) and path[-1].endswith("_count")
    ]
    assert len(counts) == 6 * 2  # q, k, v, out, up, down; two operands each
    for c in counts:
        np.testing.assert_array_equal(c, [5] * N)


def test_nnx_layers_stacked_on_a_later_axis_are_refused_with_the_fix():
    @nnx.split_rngs(splits=N)
    @nnx.vmap(in_axes=(0,), out_axes=1)
    def create(rngs):
        return nnx.Linear(16, 8, rngs=rngs)

    layer = create(nnx.Rngs(0))
    assert layer.kernel[...].shape == (16, N, 8)
    with pytest.raises(ValueError, match=r"\(16, 3, 8\).*stack axes first.*out_axes=0"):
        quantize_model(layer, DELAYED)
    assert isinstance(layer.dot_general, type(None)) or not hasattr(
        layer.dot_general, "rule"
    )  # nothing was changed
