"""jaxquant.flax: rule-based QAT of existing Linen and NNX models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant.flax import Rule, quantize_model, report

W_SPEC = jq.QuantSpec("int8", jq.per_channel(-1))
A_SPEC = jq.QuantSpec("int8")
# One rules object for both front ends: the NNX MLP names its layers like Linen does.
RULES = (Rule(r"Dense_\d+", weight=W_SPEC, act=A_SPEC),)
N_IN, N_HID, N_OUT = 16, 32, 4


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(N_HID)(x))
        return nn.Dense(N_OUT)(h)


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.Dense_0 = nnx.Linear(N_IN, N_HID, rngs=rngs)
        self.Dense_1 = nnx.Linear(N_HID, N_OUT, rngs=rngs)

    def __call__(self, x):
        return self.Dense_1(nnx.relu(self.Dense_0(x)))


def _data(n=64):
    kx, kw = jax.random.split(jax.random.key(42))
    x = jax.random.normal(kx, (n, N_IN), jnp.float32)
    y = jnp.argmax(x @ jax.random.normal(kw, (N_IN, N_OUT), jnp.float32), axis=-1)
    return x, y


def _loss(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _ref(x, layers, quantized):
    """Hand-written MLP with fake-quantized weights and activations where ``quantized``."""
    for i, (k, b) in enumerate(layers):
        if i:
            x = jax.nn.relu(x)
        if quantized[i]:
            x, k = jq.fake_quant(x, A_SPEC), jq.fake_quant(k, W_SPEC)
        x = jnp.dot(x, k, precision="highest") + b[None, :]
    return x


def _linen():
    model = LinenMLP()
    x, _ = _data()
    params = model.init(jax.random.key(0), x)  # the float model's params
    p = params["params"]
    return model, params, [(p[f"Dense_{i}"]["kernel"], p[f"Dense_{i}"]["bias"]) for i in (0, 1)]


def _nnx_layers(m):
    return [
        (m.Dense_0.kernel[...], m.Dense_0.bias[...]),
        (m.Dense_1.kernel[...], m.Dense_1.bias[...]),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("jit", [False, True])
def test_linen_forward_matches_reference(jit):
    model, params, layers = _linen()
    qmodel = quantize_model(model, RULES)
    x, _ = _data()
    apply = jax.jit(qmodel.apply) if jit else qmodel.apply
    y = apply(params, x)  # float params work unchanged
    ref = _ref(x, layers, (True, True))
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(y), np.asarray(model.apply(params, x)), atol=1e-6)
    # Same variables tree as the float model.
    qparams = qmodel.init(jax.random.key(0), x)
    assert jax.tree.structure(qparams) == jax.tree.structure(params)
    assert [(m.path, m.module, m.rule) for m in report(qmodel)] == [
        ("Dense_0", "Dense", RULES[0]),
        ("Dense_1", "Dense", RULES[0]),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("jit", [False, True])
def test_nnx_forward_matches_reference(jit):
    model = NnxMLP(nnx.Rngs(0))
    x, _ = _data()
    float_y = model(x)
    assert quantize_model(model, RULES) is model
    y = nnx.jit(lambda m, x: m(x))(model, x) if jit else model(x)
    ref = _ref(x, _nnx_layers(model), (True, True))
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(y), np.asarray(float_y), atol=1e-6)
    assert [(m.path, m.module, m.rule) for m in report(model)] == [
        ("Dense_0", "Linear", RULES[0]),
        ("Dense_1", "Linear", RULES[0]),
    ]


@pytest.mark.slow
def test_same_rules_select_same_layers():
    rules = [Rule("Dense_1", weight=W_SPEC, act=A_SPEC)]
    model, _, _ = _linen()
    qlinen = quantize_model(model, rules)
    qlinen.init(jax.random.key(0), _data()[0])
    qnnx = quantize_model(NnxMLP(nnx.Rngs(0)), rules)
    assert [m.path for m in report(qlinen)] == [m.path for m in report(qnnx)] == ["Dense_1"]


@pytest.mark.slow
def test_linen_regex_quantizes_only_matched_layers():
    model, params, layers = _linen()
    qmodel = quantize_model(model, [Rule("Dense_1", weight=W_SPEC, act=A_SPEC)])
    x, _ = _data()
    kw = dict(capture_intermediates=True, mutable=["intermediates"])
    yq, sq = qmodel.apply(params, x, **kw)
    yf, sf = model.apply(params, x, **kw)
    h_q = sq["intermediates"]["Dense_0"]["__call__"][0]
    h_f = sf["intermediates"]["Dense_0"]["__call__"][0]
    np.testing.assert_array_equal(np.asarray(h_q), np.asarray(h_f))  # bit-identical
    ref = _ref(x, layers, (False, True))
    np.testing.assert_allclose(np.asarray(yq), np.asarray(ref), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(yq), np.asarray(yf), atol=1e-6)


def test_nnx_regex_quantizes_only_matched_layers():
    x, _ = _data()
    fmodel = NnxMLP(nnx.Rngs(0))
    qmodel = quantize_model(NnxMLP(nnx.Rngs(0)), [Rule("Dense_1", weight=W_SPEC, act=A_SPEC)])
    np.testing.assert_array_equal(np.asarray(qmodel.Dense_0(x)), np.asarray(fmodel.Dense_0(x)))
    assert qmodel.Dense_0.dot_general is fmodel.Dense_0.dot_general
    ref = _ref(x, _nnx_layers(qmodel), (False, True))
    np.testing.assert_allclose(np.asarray(qmodel(x)), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_first_matching_rule_wins_and_empty_rule_keeps_float():
    rules = [Rule("Dense_1"), Rule(r"Dense_\d", weight=W_SPEC)]
    model = quantize_model(NnxMLP(nnx.Rngs(0)), rules)
    assert [(m.path, m.rule) for m in report(model)] == [("Dense_0", rules[1])]


@pytest.mark.slow
def test_linen_training_reduces_loss():
    model, params, _ = _linen()
    qmodel = quantize_model(model, RULES)
    x, y = _data()
    opt = optax.sgd(0.1)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss, g = jax.value_and_grad(lambda p: _loss(qmodel.apply(p, x), y))(params)
        updates, state = opt.update(g, state)
        return optax.apply_updates(params, updates), state, loss, g

    losses = []
    for i in range(10):
        params, state, loss, g = step(params, state)
        if i == 0:  # straight-through: every kernel gets a finite, nonzero gradient
            for leaf in jax.tree.leaves(g):
                assert np.all(np.isfinite(np.asarray(leaf))) and np.any(np.asarray(leaf) != 0)
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.slow
def test_nnx_training_reduces_loss():
    model = quantize_model(NnxMLP(nnx.Rngs(0)), RULES)
    x, y = _data()
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        loss, g = nnx.value_and_grad(lambda m: _loss(m(x), y))(model)
        opt.update(model, g)
        return loss, g

    losses = []
    for i in range(10):
        loss, g = step(model, opt)
        if i == 0:
            for leaf in jax.tree.leaves(g):
                assert np.all(np.isfinite(np.asarray(leaf))) and np.any(np.asarray(leaf) != 0)
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses
    assert len(report(model)) == 2  # still quantized after jit/update round trips


def test_strict_rule_matching_nothing():
    rules = [*RULES, Rule("encoder/.*", weight=W_SPEC)]
    with pytest.raises(ValueError, match=r"'encoder/\.\*' matched no module.*'Dense_0', 'Dense_1'"):
        quantize_model(NnxMLP(nnx.Rngs(0)), rules)
    model, params, _ = _linen()
    qmodel = quantize_model(model, rules)
    with pytest.raises(ValueError, match=r"'encoder/\.\*' matched no module.*'Dense_0', 'Dense_1'"):
        qmodel.apply(params, _data()[0])


def test_strict_failure_leaves_nnx_model_unchanged():
    model = NnxMLP(nnx.Rngs(0))
    with pytest.raises(ValueError, match="matched no module"):
        quantize_model(model, [*RULES, Rule("nope")])
    assert report(model) == []


def test_non_strict_warns():
    with pytest.warns(UserWarning, match="'nope' matched no module"):
        model = quantize_model(NnxMLP(nnx.Rngs(0)), [*RULES, Rule("nope")], strict=False)
    assert len(report(model)) == 2
    lmodel, params, _ = _linen()
    qmodel = quantize_model(lmodel, [Rule("nope")], strict=False)
    with pytest.warns(UserWarning, match="'nope' matched no module"):
        qmodel.apply(params, _data()[0])


def test_nnx_in_place_keeps_param_arrays():
    model = NnxMLP(nnx.Rngs(0))
    variables = [model.Dense_0.kernel, model.Dense_0.bias, model.Dense_1.kernel]
    arrays = [v[...] for v in variables]
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert quantize_model(model, RULES) is model
    after = [model.Dense_0.kernel, model.Dense_0.bias, model.Dense_1.kernel]
    assert all(a is b for a, b in zip(variables, after, strict=True))  # same Variables
    assert all(v[...] is a for v, a in zip(after, arrays, strict=True))  # same arrays, no copy
    new_leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(a is b for a, b in zip(leaves, new_leaves, strict=True))


@pytest.mark.slow
def test_nnx_einsum_and_linear_general():
    x = jax.random.normal(jax.random.key(1), (5, 4, 6), jnp.float32)
    e = nnx.Einsum("bij,jk->bik", (6, 3), rngs=nnx.Rngs(0))
    quantize_model(e, Rule(".*", weight=W_SPEC, act=A_SPEC))
    ref = jnp.einsum("bij,jk->bik", jq.fake_quant(x, A_SPEC), jq.fake_quant(e.kernel[...], W_SPEC))
    assert e.bias is None  # nnx.Einsum has no bias unless bias_shape is given
    np.testing.assert_allclose(np.asarray(e(x)), np.asarray(ref), rtol=1e-5, atol=1e-5)
    lg = nnx.LinearGeneral((4, 6), (2, 3), axis=(-2, -1), rngs=nnx.Rngs(0))
    quantize_model(lg, Rule("", weight=jq.QuantSpec("int8"), act=A_SPEC))
    assert lg(x).shape == (5, 2, 3) and report(lg)[0].module == "LinearGeneral"


def test_custom_dot_general_is_not_replaced():
    model = NnxMLP(nnx.Rngs(0))
    model.Dense_0.dot_general = lambda *a, **k: jax.lax.dot_general(*a, **k)
    with pytest.raises(ValueError, match="custom dot_general"):
        quantize_model(model, RULES)


def test_rule_validation():
    with pytest.raises(ValueError, match="not a valid regex"):
        Rule("Dense_(")
    assert Rule("x", weight=jq.QuantSpec("int8", rounding="stochastic")).stateful
    with pytest.raises(TypeError, match="QuantSpec"):
        Rule("x", weight="int8")
    with pytest.raises(ValueError, match="mode"):
        Rule("x", mode="fast")
    with pytest.raises(TypeError, match=r"linen\.Module or flax\.nnx\.Module"):
        quantize_model(object(), RULES)
    assert Rule("Dense_1").matches("Dense_1") and not Rule("Dense_1").matches("Dense_10")


@pytest.mark.slow
def test_module_wrappers_check_their_fields_at_construction():
    """Each used to fail at init with an AttributeError, or take strict='False' as True."""
    from jaxquant.flax import NnxPolicyModule, NnxQuantOp, Policy, PolicyModule, QuantizedModule

    qm = QuantizedModule(LinenMLP(), list(RULES), strict=np.True_)
    assert qm.rules == RULES and qm.strict is True  # a tuple: the module stays hashable
    x = jnp.ones((2, N_IN))
    assert qm.apply(qm.init(jax.random.key(0), x), x).shape == (2, N_OUT)
    with pytest.raises(TypeError, match=r"QuantizedModule: rules must be jq.flax.Rule objects"):
        QuantizedModule(LinenMLP(), (W_SPEC,))
    with pytest.raises(TypeError, match=r"quantize_model: strict must be True or False"):
        quantize_model(NnxMLP(nnx.Rngs(0)), RULES, strict="False")
    with pytest.raises(TypeError, match=r"PolicyModule: policy must be a jq.flax.Policy"):
        PolicyModule(LinenMLP(), jnp.bfloat16)
    with pytest.raises(TypeError, match=r"a Linen module: use PolicyModule"):
        NnxPolicyModule(LinenMLP(), Policy())
    with pytest.raises(TypeError, match=r"Policy.param_dtype must be a floating dtype"):
        Policy(param_dtype=None)  # np.dtype(None) would be float64
    with pytest.raises(ValueError, match=r"QuantOp: kernel_shape \(-1, 3\) entry must be"):
        NnxQuantOp(RULES[0], "l", (-1, 3), False, None)
    with pytest.raises(TypeError, match=r"QuantOp: einsum must be True or False"):
        NnxQuantOp(RULES[0], "l", (4, 3), "False", None)
