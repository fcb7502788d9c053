"""QuaRot-style rotations (jaxquant/_src/ptq/rotate.py): rotate_inputs (online, any model,
Linen and NNX) and rotate_residual (ByteLM: LayerNorm folding, centering, one residual
rotation, per-head value/output pairs, online before fc2).

Oracles: scipy's Sylvester Hadamard matrices and dense numpy products (float64) for the
offline weight rotations; the unrotated float model for exactness; layer_statistics for the
outlier channels; the trained outlier test bed (tests/ptq_testbed.py) for w4a4.

Measured on the outlier test bed (float 2.3266 nats/byte held out), w4a4 = int4 per-channel
weights, int4 per-token activations on block<i>/* and head:
  RTN +3.122; rotate_inputs then RTN +35.4 (the outliers smeared over every channel of the
  row: worse); rotate_residual then RTN +0.0437; rotate_residual then GPTQ +0.0292 (1.3% of
  float's loss; the issue's target is 10%). Channel absmax max/median at the quantized
  layers' inputs: 995-1137 at q/k/v/fc1/head before, <= 1.8 at every layer after.

The edit-test loop (``-m "not slow"``, issue 13) runs _rotate_rows, rotate_inputs on a small
Linen model (the function kept, skips by name) and rotate_residual's refusals; everything
else here is marked slow and runs in the whole suite.
"""

import _ptq_beds as beds
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import ptq_testbed as tb
import pytest
import scipy.linalg
from flax import nnx

import jaxquant as jq
from jaxquant._src.flax.act_transform import PTQVariable
from jaxquant._src.ptq.rotate import (
    _residual_rotation,
    _rotate_rows,
    rotate_inputs,
    rotate_residual,
)
from jaxquant.app.models import ByteLM, inject_outliers
from jaxquant.flax import Rule, layer_statistics, quantize_model

W4 = jq.QuantSpec("int4", jq.per_channel(-1))
A4 = jq.QuantSpec("int4", jq.per_token())
W4A4 = [Rule(beds.LAYERS, weight=W4, act=A4)]
FLOAT = Rule(".*")  # no specs: every layer in float, its online transform applied


def _ratios(model, batches, variables, rules):
    st = layer_statistics(model, batches, variables, rules=rules, hessian=False)
    return {p: float(s.absmax.max() / jnp.median(s.absmax)) for p, s in st.items()}


# ------------------------------------------------------------------ the weight rotations


@pytest.mark.parametrize("jit", [False, True])
def test_rotate_rows_is_the_inverse_rotation(jit):
    n = 16
    signs = jnp.asarray(np.where(np.arange(n) % 3 == 0, -1.0, 1.0), jnp.float32)
    w = jax.random.normal(jax.random.key(0), (5, n, 7), jnp.float32)
    f = jax.jit(_rotate_rows, static_argnums=2) if jit else _rotate_rows
    got = np.asarray(f(w, signs, 1), np.float64)
    r = np.diag(np.asarray(signs, np.float64)) @ scipy.linalg.hadamard(n) / np.sqrt(n)
    ref = np.einsum("ji,ajb->aib", r, np.asarray(w, np.float64))  # R^T W along axis 1
    np.testing.assert_allclose(got, ref, atol=2e-6)


@pytest.mark.slow
@pytest.mark.parametrize("d", [16, 64, 80, 96])
def test_residual_rotation_is_orthogonal_and_keeps_the_ones_vector(d):
    rot = _residual_rotation(d, jax.random.key(3))
    q = np.asarray(rot(jnp.eye(d, dtype=jnp.float32), 1), np.float64)  # rows e_i Q
    np.testing.assert_allclose(q @ q.T, np.eye(d), atol=1e-5)
    ones = q @ np.ones(d)
    assert np.allclose(np.abs(ones), 1.0, atol=1e-5) and np.allclose(ones, ones[0])
    # it mixes: no entry carries a whole input channel (a random orthogonal's spread)
    assert np.abs(q).max() < 0.75
    # axis 0 of a reader applies Q^T: (x Q)(Q^T W) = x W
    w = jax.random.normal(jax.random.key(1), (d, 5), jnp.float32)
    np.testing.assert_allclose(np.asarray(rot(w, 0)), q.T @ np.asarray(w), atol=1e-5)


# ------------------------------------------------------------------------ rotate_inputs


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(12, name="a")(x))  # 16 -> 12: input 16
        h = nn.relu(nn.Dense(10, name="b")(h))  # input 12 (Paley II)
        return nn.Dense(3, name="c")(h)  # input 10: no Hadamard matrix


X = jax.random.normal(jax.random.key(1), (8, 16), jnp.float32)
RULES = [Rule(".*", weight=jq.QuantSpec("int8", jq.per_channel()))]


@pytest.mark.parametrize("jit", [False, True])
def test_rotate_inputs_linen_keeps_the_function_and_skips_by_name(jit):
    model = _Net()
    v = model.init(jax.random.key(0), X)
    out = rotate_inputs(model, [X], v, rules=RULES, key=jax.random.key(5))
    assert out.report == {
        "a": {"size": 16, "absmax_ratio": pytest.approx(out.report["a"]["absmax_ratio"])},
        "b": {"size": 12, "absmax_ratio": pytest.approx(out.report["b"]["absmax_ratio"])},
    }
    assert list(out.skipped) == ["c"] and "width 10" in out.skipped["c"]
    assert set(out.variables["ptq"]) == {"a", "b"}
    apply = quantize_model(model, FLOAT).apply
    got = (jax.jit(apply) if jit else apply)(out.variables, X)
    np.testing.assert_allclose(np.asarray(got), np.asarray(model.apply(v, X)), atol=1e-5)
    # the input is untouched, and the weights did change (the test has teeth)
    assert "ptq" not in v
    assert not np.allclose(out.variables["params"]["b"]["kernel"], v["params"]["b"]["kernel"])
    # the absmax ratio reported is the layer's input's, before the rotation
    h = np.asarray(X) @ np.asarray(v["params"]["a"]["kernel"]) + np.asarray(
        v["params"]["a"]["bias"]
    )
    h = np.maximum(h, 0.0)
    amax = np.abs(h).max(0)
    assert out.report["b"]["absmax_ratio"] == pytest.approx(amax.max() / np.median(amax), 1e-5)


@pytest.mark.slow
def test_rotate_inputs_named_layers():
    model = _Net()
    v = model.init(jax.random.key(0), X)
    out = rotate_inputs(model, [X], v, rules=RULES, layers=["b"])
    assert list(out.report) == ["b"] and out.skipped == {}
    with pytest.raises(ValueError, match=r"'c'.*width 10.*nearest covered: 8, 12"):
        rotate_inputs(model, [X], v, rules=RULES, layers=["c"])
    with pytest.raises(ValueError, match=r"'nope'.*no quantized layer"):
        rotate_inputs(model, [X], v, rules=RULES, layers=["nope"])
    with pytest.raises(TypeError, match="layers must be a sequence"):
        rotate_inputs(model, [X], v, rules=RULES, layers="b")
    # twice: the second finds the rotation there
    again = rotate_inputs(model, [X], out.variables, rules=RULES)
    assert "already rotates" in again.skipped["b"] and "b" not in again.report


@pytest.mark.slow
def test_rotate_inputs_composes_after_a_smoothing():
    model = _Net()
    v = model.init(jax.random.key(0), X)
    s = jnp.exp(jax.random.normal(jax.random.key(4), (12,), jnp.float32))
    params = {
        **v["params"],
        "b": {**v["params"]["b"], "kernel": v["params"]["b"]["kernel"] / s[:, None]},
    }
    smoothed = {"params": params, "ptq": {"b": {"smooth": s}}}
    out = rotate_inputs(model, [X], smoothed, rules=RULES)
    assert set(out.variables["ptq"]["b"]) == {"smooth", "hadamard"}
    got = quantize_model(model, FLOAT).apply(out.variables, X)
    np.testing.assert_allclose(np.asarray(got), np.asarray(model.apply(v, X)), atol=1e-5)


@pytest.mark.slow
def test_rotate_inputs_skips_an_embedding_table():
    class Tied(nn.Module):
        @nn.compact
        def __call__(self, ids):
            e = nn.Embed(32, 16, name="embed")
            return e.attend(nn.Dense(16, name="mid")(e(ids)))

    ids = jnp.arange(6, dtype=jnp.int32)
    v = Tied().init(jax.random.key(0), ids)
    out = rotate_inputs(Tied(), [ids], v, rules=RULES)
    assert "embedding table" in out.skipped["embed"] and list(out.report) == ["mid"]
    got = quantize_model(Tied(), FLOAT).apply(out.variables, ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(Tied().apply(v, ids)), atol=1e-5)


class _NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(16, 12, rngs=rngs)
        self.b = nnx.Linear(12, 3, rngs=rngs)

    def __call__(self, x):
        return self.b(nnx.relu(self.a(x)))


@pytest.mark.slow
def test_rotate_inputs_nnx_in_place():
    model = _NnxNet(nnx.Rngs(0))
    ref = model(X)
    kernel = np.asarray(model.b.kernel[...])
    out = rotate_inputs(model, [X], rules=RULES, key=jax.random.key(2))
    assert out.variables is model and sorted(out.report) == ["a", "b"]
    assert isinstance(model.b.ptq_hadamard, PTQVariable)
    signs = np.asarray(model.b.ptq_hadamard[...], np.float64)
    r = np.diag(signs) @ np.asarray(jq.rotations.hadamard_matrix(12, jnp.int8), np.float64)
    np.testing.assert_allclose(model.b.kernel[...], r.T @ kernel / np.sqrt(12), atol=1e-5)
    qm = quantize_model(model, FLOAT)
    got = nnx.jit(lambda m, x: m(x))(qm, X)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)


# ---------------------------------------------------------------------- rotate_residual


@pytest.fixture(scope="module")
def outlier_rotated():
    v = {"params": tb.outlier_params()}
    return v, rotate_residual(tb.MODEL, tb.calibration_batches(), v, rules=W4A4)


@pytest.mark.slow
def test_rotate_residual_is_exact_on_the_outlier_test_bed(outlier_rotated):
    v, out = outlier_rotated
    assert out.skipped == {}
    assert out.report["residual"]["check_error"] < 1e-5  # measured 9.3e-7
    assert out.report["block1/fc2"] == {"input": "online", "size": 256}
    assert out.report["block0/attn/o"] == {"input": "heads", "size": 16}
    x = tb.test_batches(1)[0]
    ref = np.asarray(beds.float_apply(v, x), np.float64)
    got = np.asarray(jax.jit(beds.served_model().apply)(out.variables, x), np.float64)
    # float32 rounding: the logits agree to a few ulps of their scale (~10)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    # LayerNorm parameters folded away; the residual writers centered and rotated
    p = out.variables["params"]
    assert bool((p["ln_f"]["scale"] == 1).all()) and bool((p["block0"]["ln1"]["bias"] == 0).all())
    assert np.abs(np.asarray(p["embed"]["embedding"]).sum(-1)).max() < 1e-4
    assert "ptq" not in v


@pytest.mark.slow
def test_rotate_residual_removes_the_outlier_channels(outlier_rotated):
    v, out = outlier_rotated
    cal = tb.calibration_batches()
    before = _ratios(tb.MODEL, cal, v, W4A4)
    after = _ratios(tb.MODEL, cal, out.variables, W4A4)
    assert set(before) == set(after) and len(after) == 13
    for p in ("block0/attn/q", "block1/fc1", "head"):  # measured 995-1137
        assert before[p] > 500, (p, before[p])
    assert max(after.values()) < 10, after  # measured <= 1.8


# Rotation then RTN, and rotation then GPTQ, on this outlier test bed (the same rotation key,
# rules, calibration and held-out windows) is papers/quarot's fast mode, asserted in
# tests/test_papers_ptq.py: W4A4 RTN above +2.5 nats/byte, rotation + RTN under +0.06 and
# within 5% of float (measured +0.0437, 1.9%), rotation + GPTQ within 3% of float and under
# +0.04 (measured +0.0292), below rotation + RTN. Not evaluated twice; here what the paper
# does not run.
@pytest.mark.slow
def test_online_rotation_alone_smears_the_outliers(outlier_rotated):
    v, _ = outlier_rotated
    fl = beds.float_loss(outliers=True)
    rtn = beds.loss(v, W4, A4) - fl  # W4A4: the weights quantized at each call
    assert rtn > 2.5  # measured +3.12
    # online rotation alone smears the outliers over every channel: worse than RTN here
    smeared = rotate_inputs(tb.MODEL, tb.calibration_batches(), v, rules=W4A4)
    assert smeared.skipped == {}
    assert beds.loss(smeared.variables, W4, A4) - fl > rtn  # measured +35.4


@pytest.mark.slow
def test_rotate_residual_non_power_of_two_width():
    """Both Paley bases in one model (each new width is a few CPU-s of compiling): the
    residual 96 = 12 * 8 and the heads 24 = 12 * 2 on the base of 12, fc2's online rotation
    320 = 20 * 16 on the base of 20 (the residual rotation of 80 = 20 * 4 is checked above)."""
    d, heads, hidden = 96, 4, 320
    lm = ByteLM(seq=16, d=d, layers=2, heads=heads, hidden=hidden)
    tok = jax.random.randint(jax.random.key(0), (4, 16), 0, 256, jnp.int32)
    v = jax.jit(lm.init)(jax.random.key(1), tok)
    v = {"params": inject_outliers(v["params"], [3, 40], [300.0, 1000.0])}
    out = rotate_residual(lm, [tok], v, rules=W4A4, key=jax.random.key(7))
    assert out.report["residual"] == {"size": d, "check_error": pytest.approx(0, abs=1e-5)}
    assert out.report["block0/attn/o"]["size"] == d // heads  # 24: the base of 12
    assert out.report["block1/fc2"] == {"input": "online", "size": hidden}  # the base of 20
    ref = np.asarray(jax.jit(lm.apply)(v, tok), np.float64)
    got = np.asarray(jax.jit(quantize_model(lm, FLOAT).apply)(out.variables, tok), np.float64)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    after = _ratios(lm, [tok], out.variables, W4A4)
    assert max(after.values()) < 10, after


def test_rotate_residual_refuses_other_models():
    model = _Net()
    v = model.init(jax.random.key(0), X)
    with pytest.raises(ValueError, match=r"not have ByteLM's structure.*rotate_inputs"):
        rotate_residual(model, [X], v, rules=RULES)
    with pytest.raises(TypeError, match=r"Linen module.*got _NnxNet"):
        rotate_residual(_NnxNet(nnx.Rngs(0)), [X], None, rules=RULES)
    lm = ByteLM(seq=8, d=16, layers=1, heads=2, hidden=32)
    tok = jnp.zeros((1, 8), jnp.int32)
    lv = jax.eval_shape(lm.init, jax.random.key(0), tok)
    with pytest.raises(ValueError, match=r"'ptq' collection.*Rotate first"):
        rotate_residual(lm, [tok], {**lv, "ptq": {"head": {"smooth": jnp.ones(16)}}}, rules=W4A4)
    with pytest.raises(ValueError, match=r"the residual width d is 184: no Hadamard"):
        wide = ByteLM(seq=8, d=184, layers=1, heads=2, hidden=32)  # 8 * 23: not covered
        rotate_residual(wide, [tok], jax.eval_shape(wide.init, jax.random.key(0), tok), rules=W4A4)


@pytest.mark.slow
def test_rotate_residual_checks_the_function_and_skips_fc2_without_a_rule():
    lm = ByteLM(seq=8, d=16, layers=1, heads=2, hidden=32)
    tok = (jnp.arange(16, dtype=jnp.int32).reshape(2, 8) * 13) % 256
    # jitted inits and applies: eager ones compile op by op
    v = jax.jit(lm.init)(jax.random.key(0), tok)
    out = rotate_residual(
        lm, [tok], v, rules=[Rule(r"block0/attn/.*|head", weight=jq.QuantSpec("int8"))]
    )
    assert "no rule matches it" in out.skipped["block0/fc2"] and "ptq" not in out.variables
    # without fc2's online rotation the function is kept too (its input is not rotated)
    got = jax.jit(quantize_model(lm, FLOAT).apply)(out.variables, tok)
    np.testing.assert_allclose(np.asarray(got), np.asarray(jax.jit(lm.apply)(v, tok)), atol=1e-4)

    class PostLN(ByteLM):  # same params, another computation: the check refuses it
        @nn.compact
        def __call__(self, tokens):
            pos = self.param("pos", nn.initializers.normal(0.02), (self.seq, self.d))
            x = nn.Embed(256, self.d, name="embed")(tokens) + pos[None, : tokens.shape[1]]
            # the head reads the raw residual too (not through a LayerNorm)
            return nn.Dense(256, name="head")(nn.LayerNorm(name="ln_f")(x) + x)

    post = PostLN(seq=8, d=16, layers=0, heads=2, hidden=32)
    pv = jax.jit(post.init)(jax.random.key(0), tok)
    pv = {"params": {**pv["params"], **{k: v["params"][k] for k in ("block0",)}}}
    with pytest.raises(ValueError, match=r"outputs differ.*check_tolerance"):
        rotate_residual(post, [tok], pv, rules=W4A4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hf_gpt2", "hf_bert", "nnx_lm1b"])
def test_rotate_inputs_on_third_party_models(name):
    tp = pytest.importorskip("third_party_models")
    if name.startswith("hf_"):
        pytest.importorskip("transformers")
    m = tp.get(name)
    rules = [Rule(".*", weight=jq.QuantSpec("int8", jq.per_channel()))]
    model = nnx.clone(m.model) if tp.is_nnx(m.model) else m.model
    ref = np.asarray(tp.call(m), np.float64)
    with tp.lenient():
        out = rotate_inputs(model, [m.args], m.variables, rules=rules, call_kwargs=m.kwargs)
        floats = quantize_model(model, FLOAT)
    assert len(out.report) >= 8, (out.report, out.skipped)  # q/k/v/o/MLP of 2 layers
    for path, why in out.skipped.items():  # each with its reason, never silently
        assert any(
            w in why
            for w in ("embedding table", "input axes", "covers", "no calibration batch", "computed")
        ), (path, why)
    got = np.asarray(tp.call(m, floats, None if tp.is_nnx(m.model) else out.variables), np.float64)
    assert np.abs(got - ref).max() <= 1e-4 * max(np.abs(ref).max(), 1.0)
