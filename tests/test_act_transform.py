"""Online activation transforms (jaxquant/_src/flax/act_transform.py): a layer applies the
smoothing / Hadamard rotation stored with its variables to its input before the contraction,
in Linen and NNX, quantized or observed, and refuses when it cannot."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
import jaxquant.rotations as jqr
from jaxquant._src.flax.act_transform import PTQVariable
from jaxquant.flax import Rule, layer_statistics, quantize_model

X = jax.random.normal(jax.random.key(1), (8, 32), jnp.float32)
SMOOTH = jnp.exp(jax.random.normal(jax.random.key(2), (64,), jnp.float32))
SIGNS = jnp.where(jax.random.bernoulli(jax.random.key(3), 0.5, (64,)), 1.0, -1.0)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(64, name="Dense_0")(x))
        return nn.Dense(16, name="Dense_1")(h)


def _hidden(v):
    p = v["params"]["Dense_0"]
    return nn.relu(X @ p["kernel"] + p["bias"][None])


def _transformed_variables(v, smooth=None, signs=None):
    """Dense_1's kernel changed offline by the inverse of its online transform."""
    w = v["params"]["Dense_1"]["kernel"]
    ptq = {}
    if smooth is not None:
        w = w / smooth[:, None]
        ptq["smooth"] = smooth
    if signs is not None:
        w = jqr.walsh_hadamard(signs[:, None] * w, axis=0)
        ptq["hadamard"] = signs
    params = {**v["params"], "Dense_1": {**v["params"]["Dense_1"], "kernel": w}}
    return {"params": params, "ptq": {"Dense_1": ptq}}


@pytest.mark.parametrize("parts", ["smooth", "hadamard", "both"])
def test_linen_transform_keeps_the_function(parts):
    model = MLP()
    v = model.init(jax.random.key(0), X)
    smooth = SMOOTH if parts in ("smooth", "both") else None
    signs = SIGNS if parts in ("hadamard", "both") else None
    v2 = _transformed_variables(v, smooth, signs)
    qm = quantize_model(model, [Rule("Dense_1")])  # a rule without specs: float
    ref = model.apply(v, X)
    out = jax.jit(qm.apply)(v2, X)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)
    # without the transform the changed kernel gives another function: the test has teeth
    wrong = model.apply({"params": v2["params"]}, X)
    assert np.abs(np.asarray(wrong) - np.asarray(ref)).max() > 1e-2


def test_linen_quantized_layer_quantizes_the_transformed_input():
    model = MLP()
    v = model.init(jax.random.key(0), X)
    v2 = _transformed_variables(v, SMOOTH, SIGNS)
    spec = jq.QuantSpec("int8", jq.per_channel())
    qm = quantize_model(model, [Rule("Dense_1", weight=spec, act=jq.QuantSpec("int8"))])
    out = jax.jit(qm.apply)(v2, X)
    # the oracle: the hand-transformed input and kernel through jq.dot_general
    h = _hidden(v)
    x2 = jqr.walsh_hadamard(h * (SMOOTH * SIGNS)[None], axis=-1)
    k2 = v2["params"]["Dense_1"]["kernel"]
    dn = (((1,), (0,)), ((), ()))
    ref = jq.dot_general(
        x2, k2, dn, lhs_spec=jq.QuantSpec("int8"), rhs_spec=jq.QuantSpec("int8", jq.per_channel(1))
    )
    ref = ref + v["params"]["Dense_1"]["bias"][None]
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_statistics_see_the_transformed_input():
    model = MLP()
    v = model.init(jax.random.key(0), X)
    v2 = _transformed_variables(v, smooth=SMOOTH)
    stats = layer_statistics(model, [X], v2, rules=[Rule("Dense_1", weight=jq.QuantSpec("int8"))])
    h = _hidden(v)
    want = np.abs(np.asarray(h) * np.asarray(SMOOTH)).max(0)
    np.testing.assert_allclose(np.asarray(stats["Dense_1"].absmax), want, rtol=1e-6)


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(32, 64, rngs=rngs)
        self.b = nnx.Linear(64, 16, rngs=rngs)

    def __call__(self, x):
        return self.b(nnx.relu(self.a(x)))


def test_nnx_transform_keeps_the_function():
    model = NnxMLP(nnx.Rngs(0))
    ref = model(X)
    w = model.b.kernel[...]
    model.b.kernel[...] = jqr.walsh_hadamard(SIGNS[:, None] * (w / SMOOTH[:, None]), axis=0)
    model.b.ptq_smooth = PTQVariable(SMOOTH)
    model.b.ptq_hadamard = PTQVariable(SIGNS)
    qm = quantize_model(model, [Rule("b")])
    out = nnx.jit(lambda m, x: m(x))(qm, X)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)


def test_a_transform_of_the_wrong_width_names_the_layer():
    model = MLP()
    v = model.init(jax.random.key(0), X)
    bad = {**v, "ptq": {"Dense_1": {"smooth": jnp.ones(63)}}}
    qm = quantize_model(model, [Rule("Dense_1")])
    with pytest.raises(ValueError, match=r"'Dense_1'.*shape \(63,\).*64 channels"):
        qm.apply(bad, X)


def test_a_transform_on_a_conv_layer_is_refused():
    class Conv(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(4, (3,))(x)

    x = jnp.ones((2, 8, 3))
    v = Conv().init(jax.random.key(0), x)
    bad = {**v, "ptq": {"Conv_0": {"smooth": jnp.ones(3)}}}
    with pytest.raises(ValueError, match=r"'Conv_0'.*online input transform"):
        quantize_model(Conv(), [Rule("Conv_0")]).apply(bad, x)


def test_calibration_measures_the_transformed_input_and_runs_the_transformed_model():
    """Static activation ranges of a layer with an online transform are those of its
    transformed input (the range its quantizer sees), Linen and NNX; the layers after it
    see the model's true activations."""
    from jaxquant.flax import calibrate

    model = MLP()
    v = model.init(jax.random.key(0), X)
    v2 = _transformed_variables(v, smooth=SMOOTH)
    rules = [Rule(".*", weight=jq.QuantSpec("int8"), act=jq.QuantSpec("int8"))]
    got = calibrate(model, [X], v2, rules=rules)
    want = float(np.abs(np.asarray(_hidden(v)) * np.asarray(SMOOTH)).max())
    assert got.ranges["Dense_1"][1] == pytest.approx(want, rel=1e-6)
    assert got.ranges["Dense_0"][1] == pytest.approx(float(np.abs(np.asarray(X)).max()), rel=1e-6)

    nm = NnxMLP(nnx.Rngs(0))
    nm.b.kernel[...] = nm.b.kernel[...] / SMOOTH[:, None]
    nm.b.ptq_smooth = PTQVariable(SMOOTH)
    h = nnx.relu(nm.a(X))
    got = calibrate(quantize_model(nm, rules), [X], rules=rules)
    want = float(np.abs(np.asarray(h) * np.asarray(SMOOTH)).max())
    assert got.ranges["b"][1] == pytest.approx(want, rel=1e-6)
