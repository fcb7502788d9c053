"""AWQ (jaxquant/_src/ptq/awq.py): the alpha search against a numpy oracle, folding into
LayerNorms (detected and given) or the online transform with the float function unchanged,
clipping search, NNX, bad arguments; on the PTQ test bed (slow) AWQ beats round-to-nearest.

The edit-test loop (``-m "not slow"``, issue 13) runs AWQ of a small block (the detected
fold keeps the function) and the bad arguments; everything else here is marked slow and runs
in the whole suite.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant._src.ptq.awq import awq
from jaxquant.flax import Rule, quantize_model

G8 = jq.QuantSpec("int4", jq.per_block(0, 8))
X = jax.random.normal(jax.random.key(0), (64, 16)) * jnp.linspace(0.1, 10.0, 16)[None]


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="ln")(x)
        y = nn.Dense(32, name="a")(h) + nn.Dense(32, name="b")(h)
        return nn.Dense(8, name="c")(nn.relu(y))


def _block():
    model = Block()
    return model, model.init(jax.random.key(1), X)


def _float_out(model, variables):
    """The model run with its online transforms (a rule without specs: float)."""
    return jax.jit(quantize_model(model, Rule(".*")).apply)(variables, X)


def test_detected_fold_keeps_the_float_function():
    model, v = _block()
    res = awq(model, [X], v, rules=Rule(".*", weight=G8), clip_search=False)
    assert res.report["a"]["folded_into"] == "ln" and res.report["b"]["folded_into"] == "ln"
    assert res.report["a"]["alpha"] == res.report["b"]["alpha"]  # one s for the norm
    assert res.report["c"]["folded_into"] is None and res.report["c"]["online_why"]
    assert list(res.variables["ptq"]) == ["c"] and res.skipped == {}
    assert not np.allclose(res.variables["params"]["ln"]["scale"], v["params"]["ln"]["scale"])
    ref = model.apply(v, X)
    np.testing.assert_allclose(_float_out(model, res.variables), ref, rtol=1e-5, atol=1e-5)
    # the input is untouched
    assert "ptq" not in v and np.array_equal(model.apply(v, X), ref)


@pytest.mark.slow
def test_online_transform_keeps_the_float_function():
    model, v = _block()
    res = awq(model, [X], v, rules=Rule(".*", weight=G8), fold=False, clip_search=False)
    assert sorted(res.variables["ptq"]) == ["a", "b", "c"]
    assert np.array_equal(res.variables["params"]["ln"]["scale"], v["params"]["ln"]["scale"])
    smooth = res.variables["ptq"]["a"]["smooth"]
    assert not np.allclose(smooth, 1.0)  # the search moved away from RTN on these inputs
    np.testing.assert_allclose(
        _float_out(model, res.variables), model.apply(v, X), rtol=1e-5, atol=1e-5
    )
    # without the transforms the scaled kernels compute another function: the test has teeth
    wrong = model.apply({"params": res.variables["params"]}, X)
    assert np.abs(np.asarray(wrong) - np.asarray(model.apply(v, X))).max() > 1e-2


def _q_int4_groups(w, size):
    """numpy oracle: int4 symmetric, restricted grid [-7, 7], absmax per group of ``size``
    rows (per column), round half to even."""
    g = w.reshape(-1, size, w.shape[1])
    s = np.abs(g).max(axis=1, keepdims=True) / 7.0
    q = np.clip(np.round(g / np.where(s == 0, 1, s)), -7, 7) * s
    return q.reshape(w.shape)


@pytest.mark.slow
def test_alpha_search_equals_a_numpy_oracle():
    model = nn.Dense(8)
    v = model.init(jax.random.key(2), X)
    grid = 10
    res = awq(model, [X], v, rules=Rule(".*", weight=G8), grid=grid, clip_search=False)
    x = np.asarray(X, np.float64)
    w = np.asarray(v["params"]["kernel"], np.float64)
    m = np.abs(x).mean(0)
    losses = []
    for a in np.arange(grid) / grid:
        s = m**a
        s = s / np.sqrt(s.max() * s.min())
        y = (x / s) @ _q_int4_groups(s[:, None] * w, 8)
        losses.append(np.mean((y - x @ w) ** 2))
    r = res.report[""]
    best = int(np.argmin(losses))
    assert best > 0 and r["alpha"] == pytest.approx(best / grid)
    np.testing.assert_allclose([r["loss"], r["loss_rtn"]], [losses[best], losses[0]], rtol=1e-4)
    s = m ** (best / grid)
    s = s / np.sqrt(s.max() * s.min())
    np.testing.assert_allclose(res.variables["params"]["kernel"], s[:, None] * w, rtol=1e-5)
    np.testing.assert_allclose(res.variables["ptq"]["smooth"], 1 / s, rtol=1e-5)


@pytest.mark.slow
def test_clip_search_lowers_the_loss_and_clips():
    model, v = _block()
    plain = awq(model, [X], v, rules=Rule(".*", weight=G8), clip_search=False)
    clipped = awq(model, [X], v, rules=Rule(".*", weight=G8), clip_search=True)
    for p in ("a", "b", "c"):
        r = clipped.report[p]
        assert r["clip"] == "searched" and r["loss"] <= plain.report[p]["loss"] * (1 + 1e-6)
        w0 = np.abs(np.asarray(plain.variables["params"][p]["kernel"]))
        w1 = np.abs(np.asarray(clipped.variables["params"][p]["kernel"]))
        assert np.all(w1 <= w0 + 1e-6) and np.any(w1 < w0 - 1e-6)
    tensor = awq(model, [X], v, rules=Rule(".*", weight=jq.QuantSpec("int4")), clip_search=True)
    assert tensor.report["c"]["clip"].startswith("not searched")


@pytest.mark.slow
def test_layers_it_cannot_scale_are_skipped_by_name():
    model, v = _block()
    rules = [Rule("c", act=jq.QuantSpec("int8")), Rule(".*", weight=G8)]
    res = awq(model, [X], v, rules=rules, clip_search=False)
    assert "does not quantize the weight" in res.skipped["c"]
    assert sorted(res.report) == ["a", "b"]


@pytest.mark.slow
def test_a_layer_with_an_act_spec_quantizes_the_sample_in_the_search():
    model, v = _block()
    w_only = awq(model, [X], v, rules=Rule(".*", weight=G8), clip_search=False)
    w4a4 = awq(
        model, [X], v, rules=Rule(".*", weight=G8, act=jq.QuantSpec("int4")), clip_search=False
    )
    assert w4a4.report["c"]["loss_rtn"] > 2 * w_only.report["c"]["loss_rtn"]


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.ln = nnx.LayerNorm(16, rngs=rngs)
        self.a = nnx.Linear(16, 32, rngs=rngs)
        self.b = nnx.Linear(32, 8, rngs=rngs)

    def __call__(self, x):
        return self.b(nnx.relu(self.a(self.ln(x))))


@pytest.mark.slow
@pytest.mark.parametrize("pairs", [None, {"ln": ["a"]}])
def test_nnx(pairs):
    model = NnxBlock(nnx.Rngs(0))
    ref = model(X)
    res = awq(model, [X], rules=Rule(".*", weight=G8), pairs=pairs, clip_search=False)
    assert res.variables is model and sorted(res.report) == ["a", "b"]
    assert res.report["a"]["folded_into"] == (None if pairs is None else "ln")
    assert hasattr(model.a, "ptq_smooth") == (pairs is None) and hasattr(model.b, "ptq_smooth")
    out = nnx.jit(lambda m, x: m(x))(quantize_model(model, Rule(".*")), X)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_given_pairs_fold_and_are_checked():
    model, v = _block()
    res = awq(
        model, [X], v, rules=Rule(".*", weight=G8), pairs={"ln": ["a", "b"]}, clip_search=False
    )
    assert res.report["a"]["folded_into"] == "ln" and list(res.variables["ptq"]) == ["c"]
    np.testing.assert_allclose(
        _float_out(model, res.variables), model.apply(v, X), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match=r"'a' and 'c' do not read the same input"):
        awq(model, [X], v, rules=Rule(".*", weight=G8), pairs={"ln": ["a", "c"]})
    with pytest.raises(ValueError, match=r"names 'zz'"):
        awq(model, [X], v, rules=Rule(".*", weight=G8), pairs={"ln": ["zz"]})
    with pytest.raises(ValueError, match=r"no such module"):
        awq(model, [X], v, rules=Rule(".*", weight=G8), pairs={"nope": ["a"]})
    with pytest.raises(ValueError, match=r"'a' is in two pairs"):
        awq(model, [X], v, rules=Rule(".*", weight=G8), pairs={"ln": ["a"], "c": ["a"]})


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"grid": 0}, ValueError, "grid must be an int >= 1"),
        ({"grid": 2.5}, TypeError, "grid must be an int"),
        ({"max_samples": 0}, ValueError, "max_samples must be an int >= 1"),
        ({"clip_search": "yes"}, TypeError, "clip_search must be True or False"),
        ({"fold": 1}, TypeError, "fold must be True or False"),
        ({"pairs": ["ln"]}, TypeError, "pairs must be a dict"),
        ({"pairs": {"ln": [1]}}, TypeError, "pairs must map a norm path"),
        ({"rules": None}, ValueError, "pass rules="),
    ],
)
def test_bad_arguments(kwargs, err, match):
    model, v = _block()
    kwargs = {"rules": Rule(".*", weight=G8), **kwargs}
    with pytest.raises(err, match=match):
        awq(model, [X], v, **kwargs)


def test_bad_model_and_batches():
    model, v = _block()
    with pytest.raises(TypeError, match="model must be a Flax"):
        awq(object(), [X], v, rules=Rule(".*", weight=G8))
    with pytest.raises(TypeError, match="batches must be an iterable"):
        awq(model, X, v, rules=Rule(".*", weight=G8))


# ------------------------------------------------------------------ the PTQ test bed

W4G32 = jq.QuantSpec("int4", jq.per_block(0, 32))
W4G64 = jq.QuantSpec("int4", jq.per_block(0, 64))  # the residual width: one group per column
W3G32 = jq.QuantSpec("int3", jq.per_block(0, 32))


@functools.cache
def _awq(bed, spec, clip_search):
    """AWQ of the test bed (``"base"`` or ``"outliers"``), once per process: the tests below
    share the runs (and tests/_ptq_beds.py the served models and the float / RTN losses)."""
    import _ptq_beds as beds
    import ptq_testbed as tb

    v = {"params": beds.params(bed == "outliers")}
    rules = Rule(beds.LAYERS, weight=spec)
    return awq(tb.MODEL, tb.calibration_batches(), v, rules=rules, clip_search=clip_search)


def _increases(bed, spec, clip_search):
    """Held-out nats/byte over float, served with ``spec`` weights: (RTN, AWQ then RTN)."""
    import _ptq_beds as beds

    outliers = bed == "outliers"
    res = _awq(bed, spec, clip_search)
    got = beds.converted_loss(res.variables, spec) - beds.float_loss(outliers)
    return beds.rtn_increase(spec, outliers=outliers), got


@pytest.mark.slow
def test_testbed_folds_every_norm_and_keeps_the_function():
    import _ptq_beds as beds
    import ptq_testbed as tb

    v = {"params": tb.params()}
    res = _awq("base", W4G32, False)
    folded = {p: r["folded_into"] for p, r in res.report.items()}
    for i in range(2):
        for p in ("attn/q", "attn/k", "attn/v"):
            assert folded[f"block{i}/{p}"] == f"block{i}/ln1"
        assert folded[f"block{i}/fc1"] == f"block{i}/ln2"
        assert folded[f"block{i}/attn/o"] is None and folded[f"block{i}/fc2"] is None
    assert folded["head"] == "ln_f"
    assert all(0 <= r["alpha"] < 1 for r in res.report.values())
    assert any(r["alpha"] > 0 for r in res.report.values())
    x = tb.test_batches()[0]
    np.testing.assert_allclose(
        jax.jit(beds.served_model().apply)(res.variables, x),
        beds.float_apply(v, x),
        rtol=1e-4,
        atol=1e-4,
    )


# Held-out loss increase over float (nats/byte), measured (CPU, jax 0.10): RTN / AWQ with
# the clipping search. base: w4 g32 +0.0116 / +0.0105, w4 g64 +0.0140 / +0.0133, w3 g32
# (the full grid) +0.0838 / +0.0332. Outliers: w4 g32 +0.0759 / +0.0112, w3 g32 +0.1411 /
# +0.0454. The outlier model at w4 g32 (AWQ with the clipping search, this model,
# calibration and held-out windows; int4's default grid is the restricted one) is
# papers/awq's fast mode, asserted in tests/test_papers_ptq.py (AWQ under 0.25 of RTN's
# increase), not run twice.
@pytest.mark.slow
@pytest.mark.parametrize(
    ("bed", "spec", "ratio"),
    [
        ("base", W4G32, 0.97),
        ("base", W4G64, 0.99),
        ("base", W3G32, 0.8),
        ("outliers", W3G32, 0.5),
    ],
)
def test_awq_beats_round_to_nearest_on_the_testbed(bed, spec, ratio):
    rtn, got = _increases(bed, spec, True)
    assert got < ratio * rtn, (got, rtn)


@pytest.mark.slow
def test_scales_alone_beat_rtn_on_the_outlier_model():
    # measured: w4 g32 RTN +0.0759, AWQ's scales alone +0.0196 (no clipping)
    rtn, got = _increases("outliers", W4G32, False)
    assert got < 0.4 * rtn, (got, rtn)


@pytest.mark.slow
def test_hf_gpt2():
    pytest.importorskip("transformers")
    import third_party_models as tp

    m = tp.get("hf_gpt2")
    rules = Rule(".*", weight=jq.QuantSpec("int4", jq.per_block(32)))
    with tp.lenient():
        res = awq(
            m.model, [m.args], m.variables, rules=rules, call_kwargs=m.kwargs, clip_search=False
        )
        out = tp.call(m, quantize_model(m.model, Rule(".*")), res.variables)
        clipped = awq(
            m.model, [m.args], m.variables, rules=rules, call_kwargs=m.kwargs, clip_search=True
        )
    assert "lm_head" in res.skipped  # the tied head's kernel is wte.T, computed
    assert len(res.report) == m.weight_contractions - 1
    for i in range(tp.LAYERS):
        h = f"transformer/h/{i}"
        assert res.report[f"{h}/attn/c_attn"]["folded_into"] == f"{h}/ln_1"
        assert res.report[f"{h}/mlp/c_fc"]["folded_into"] == f"{h}/ln_2"
    assert all(r["loss"] <= r["loss_rtn"] * (1 + 1e-6) for r in res.report.values())
    assert all(r["clip"] == "searched" for r in clipped.report.values())
    # the scales alone keep the float function (the clipping changes it a little)
    np.testing.assert_allclose(out, tp.call(m), rtol=1e-4, atol=1e-4)
