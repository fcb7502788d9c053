"""GPTQ on whole models (jaxquant/_src/ptq/gptq.py): the converted tree, its codes against
the array solver on numpy Hessians, serving, NNX, online transforms, sequential Hessians,
skipped layers, bad arguments; on the PTQ test bed, held-out loss against round-to-nearest
at 3 and 4 bits, groups, full-range grids, nf4, MXFP4, the outlier model; third-party models.

The edit-test loop (``-m "not slow"``, issue 13) runs GPTQ of a small MLP (the tree, the
report, serving) and the bad arguments and models; everything else here is marked slow and
runs in the whole suite.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant._src import gptq as solver
from jaxquant._src.ptq.gptq import gptq
from jaxquant._src.ptq.result import PTQResult
from jaxquant.flax import Rule, convert, quantize_model

W4 = jq.QuantSpec("int4", jq.per_channel())
RULES = Rule(".*", weight=W4)


# ------------------------------------------------------------------ a small MLP


def _batches(n: int = 4, rows: int = 64, width: int = 16) -> list[jax.Array]:
    """Correlated inputs (a random mixing matrix): GPTQ's updates are not zero."""
    keys = jax.random.split(jax.random.key(0), n + 1)
    mix = jax.random.normal(keys[0], (width, width))
    return [jax.random.normal(k, (rows, width)) @ mix for k in keys[1:]]


MLP = nn.Sequential([nn.Dense(32), nn.relu, nn.Dense(8)])


@functools.cache
def _mlp_vars() -> dict:
    return MLP.init(jax.random.key(1), _batches()[0])


def _served(rules, variables, x, jit=True):
    qmodel = quantize_model(MLP, rules)
    fn = jax.jit(qmodel.apply) if jit else qmodel.apply
    return fn(variables, x)


def _dequantized(tree):
    return jax.tree_util.tree_map(
        lambda v: v.dequantize() if isinstance(v, jq.QArray) else v,
        tree,
        is_leaf=lambda v: isinstance(v, jq.QArray),
    )


def _proxy(w, q, h):
    d = np.asarray(w, np.float64) - np.asarray(q, np.float64)
    return float(np.sum(d * (np.asarray(h, np.float64) @ d)))


@pytest.mark.parametrize("jit", [True, False])
def test_mlp_tree_serving_and_report(jit):
    variables = _mlp_vars()
    before = jax.tree_util.tree_map(np.asarray, variables)
    res = gptq(MLP, _batches(), variables, rules=RULES)
    assert isinstance(res, PTQResult) and res.skipped == {}
    # The input is untouched.
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, variables)
    # The same tree as convert's: QArrays of the same shapes and specs, biases as they were.
    qmodel = quantize_model(MLP, RULES)
    qmodel.init(jax.random.key(0), _batches()[0])
    rtn = convert(qmodel, variables)
    is_q = lambda v: isinstance(v, jq.QArray)
    assert jax.tree_util.tree_structure(res.variables, is_leaf=is_q) == (
        jax.tree_util.tree_structure(rtn, is_leaf=is_q)
    )
    for layer in ("layers_0", "layers_2"):
        got, ref = res.variables["params"][layer]["kernel"], rtn["params"][layer]["kernel"]
        assert is_q(got) and got.spec == ref.spec and got.values.shape == ref.values.shape
        assert got.values.dtype == ref.values.dtype and got.scale.shape == ref.scale.shape
        assert not np.array_equal(got.values, ref.values)  # GPTQ's codes, not RTN's
        np.testing.assert_array_equal(
            res.variables["params"][layer]["bias"], variables["params"][layer]["bias"]
        )
        r = res.report[layer]
        assert r["loss"] < 0.8 * r["rtn_loss"]
        assert r["dead"] == 0 and r["rows"] == 256 and r["param"] == "kernel"
        assert r["damping"] > 0 and r["group"] in (0, 1)
    assert res.report["layers_0"]["inputs"] == 16 and res.report["layers_2"]["inputs"] == 32
    # Served output = the float model on the dequantized GPTQ weights.
    x = _batches()[1]
    served = _served(RULES, res.variables, x, jit)
    ref = MLP.apply(_dequantized(res.variables), x)
    np.testing.assert_allclose(served, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_mlp_codes_equal_solver_on_numpy_hessians():
    """The pipeline's codes are the array solver's on X^T X computed in numpy from the
    layers' inputs (the first layer: the data; the second: relu of the first's float
    output)."""
    variables = _mlp_vars()
    res = gptq(MLP, _batches(), variables, rules=RULES, damping=0.02, block_size=8)
    x = np.concatenate([np.asarray(b, np.float64) for b in _batches()])
    p = variables["params"]
    h1 = np.asarray(p["layers_0"]["kernel"], np.float64)
    x2 = np.maximum(x @ h1 + np.asarray(p["layers_0"]["bias"], np.float64), 0)
    for layer, inp in (("layers_0", x), ("layers_2", x2)):
        w = p[layer]["kernel"]
        h = jnp.asarray(inp.T @ inp, jnp.float32)
        ref = solver.gptq(w, h, W4, damping=0.02, block_size=8)
        got = res.variables["params"][layer]["kernel"]
        np.testing.assert_array_equal(got.values, ref.qarray.values)
        np.testing.assert_allclose(got.scale, ref.qarray.scale, rtol=1e-6)
        np.testing.assert_allclose(res.report[layer]["loss"], float(ref.loss), rtol=1e-3)
        # rtn_loss: tr((W - Q)^T H (W - Q)) with round-to-nearest's Q, in float64.
        rtn = jq.quantize(w, jq.QuantSpec("int4", jq.per_channel(1))).dequantize()
        np.testing.assert_allclose(res.report[layer]["rtn_loss"], _proxy(w, rtn, h), rtol=1e-3)


@pytest.mark.slow
def test_act_order_and_groups():
    rules = Rule(".*", weight=jq.QuantSpec("int3", jq.per_block(0, 8)))
    res = gptq(MLP, _batches(), _mlp_vars(), rules=rules, act_order=True)
    for r in res.report.values():
        assert r["loss"] < r["rtn_loss"]
    k = res.variables["params"]["layers_2"]["kernel"]
    ref = jq.quantize(
        _mlp_vars()["params"]["layers_2"]["kernel"], jq.QuantSpec("int3", jq.per_block(0, 8))
    )
    assert k.scale.shape == ref.scale.shape == (4, 1, 8)  # a scale per 8 inputs and output


@pytest.mark.slow
def test_sequential_hessian_sees_quantized_earlier_layers():
    variables = _mlp_vars()
    seq = gptq(MLP, _batches(), variables, rules=RULES, sequential=True)
    one = gptq(MLP, _batches(), variables, rules=RULES)
    assert [seq.report[p]["group"] for p in ("layers_0", "layers_2")] == [0, 1]
    # The first layer: the same Hessian, the same codes.
    np.testing.assert_array_equal(
        seq.variables["params"]["layers_0"]["kernel"].values,
        one.variables["params"]["layers_0"]["kernel"].values,
    )
    # The second: X^T X of relu(x Q1 + b1), Q1 the first layer's GPTQ weight.
    x = np.concatenate([np.asarray(b, np.float64) for b in _batches()])
    q1 = np.asarray(seq.variables["params"]["layers_0"]["kernel"].dequantize(), np.float64)
    x2 = np.maximum(x @ q1 + np.asarray(variables["params"]["layers_0"]["bias"]), 0)
    w = variables["params"]["layers_2"]["kernel"]
    rtn = jq.quantize(w, jq.QuantSpec("int4", jq.per_channel(1))).dequantize()
    np.testing.assert_allclose(
        seq.report["layers_2"]["rtn_loss"], _proxy(w, rtn, x2.T @ x2), rtol=1e-3
    )
    assert seq.report["layers_2"]["rtn_loss"] != pytest.approx(one.report["layers_2"]["rtn_loss"])


@pytest.mark.slow
@pytest.mark.parametrize("sequential", [False, True])
def test_online_transform_statistics_and_serving(sequential):
    """A layer with an online smoothing ('ptq' collection): its Hessian is of x * s (the
    stored weight is already W / s[:, None]); the transform is kept and served."""
    variables = _mlp_vars()
    s = jnp.linspace(0.5, 4.0, 16)
    p = variables["params"]
    smoothed = {
        "params": {
            **p,
            "layers_0": {**p["layers_0"], "kernel": p["layers_0"]["kernel"] / s[:, None]},
        },
        "ptq": {"layers_0": {"smooth": s}},
    }
    res = gptq(MLP, _batches(), smoothed, rules=RULES, sequential=sequential)
    assert "ptq" in res.variables
    np.testing.assert_array_equal(res.variables["ptq"]["layers_0"]["smooth"], s)
    x = np.concatenate([np.asarray(b, np.float64) for b in _batches()]) * np.asarray(s)
    w = smoothed["params"]["layers_0"]["kernel"]
    rtn = jq.quantize(w, jq.QuantSpec("int4", jq.per_channel(1))).dequantize()
    np.testing.assert_allclose(
        res.report["layers_0"]["rtn_loss"], _proxy(w, rtn, x.T @ x), rtol=1e-3
    )
    # Served: x * s through the GPTQ weight, i.e. the original function up to rounding.
    xb = _batches()[1]
    served = _served(RULES, res.variables, xb)
    deq = _dequantized(res.variables["params"])
    k0 = deq["layers_0"]["kernel"] * s[:, None]
    ref = MLP.apply({"params": {**deq, "layers_0": {**deq["layers_0"], "kernel": k0}}}, xb)
    np.testing.assert_allclose(served, ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ NNX


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.l1 = nnx.Linear(16, 32, rngs=rngs)
        self.l2 = nnx.Linear(32, 8, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(x)))


def _nnx_twin() -> NnxMLP:
    """The Linen MLP's weights in an NNX model."""
    m = NnxMLP(nnx.Rngs(0))
    p = _mlp_vars()["params"]
    for mine, theirs in (("l1", "layers_0"), ("l2", "layers_2")):
        getattr(m, mine).kernel.set_value(p[theirs]["kernel"])
        getattr(m, mine).bias.set_value(p[theirs]["bias"])
    return m


@pytest.mark.slow
@pytest.mark.parametrize("sequential", [False, True])
def test_nnx_twin_equals_linen(sequential):
    linen = gptq(MLP, _batches(), _mlp_vars(), rules=RULES, sequential=sequential)
    model = _nnx_twin()
    res = gptq(model, _batches(), rules=RULES, sequential=sequential)
    assert res.variables is model and res.skipped == {}
    for mine, theirs in (("l1", "layers_0"), ("l2", "layers_2")):
        k = getattr(model, mine).kernel[...]
        assert isinstance(k, jq.QArray)
        np.testing.assert_array_equal(k.values, linen.variables["params"][theirs]["kernel"].values)
        assert res.report[mine]["loss"] == pytest.approx(linen.report[theirs]["loss"], rel=1e-5)
    # Served in place: the float twin on the dequantized weights.
    x = _batches()[1]
    ref = _nnx_twin()
    ref.l1.kernel.set_value(model.l1.kernel[...].dequantize())
    ref.l2.kernel.set_value(model.l2.kernel[...].dequantize())
    np.testing.assert_allclose(model(x), ref(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model(x), _served(RULES, linen.variables, x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ skipped layers


class Mixed(nn.Module):
    """A tied embedding (lookups and head), a conv, a branch the batches never take and
    a head whose kernel the model computes."""

    @nn.compact
    def __call__(self, ids, branch: bool = False):
        embed = nn.Embed(16, 8, name="embed")
        x = embed(ids)
        x = nn.Conv(8, (3,), name="conv")(x)
        x = nn.Dense(8, name="dense")(x)
        if branch:
            x = nn.Dense(8, name="branch")(x)
        w = self.param("w", nn.initializers.normal(1.0), (8, 8))
        x = nn.Dense(8, name="computed").apply({"params": {"kernel": w.T, "bias": jnp.zeros(8)}}, x)
        return embed.attend(x)


@pytest.mark.slow
def test_skipped_layers_reported_and_rounded_to_nearest():
    ids = [jax.random.randint(jax.random.key(i), (4, 12), 0, 16) for i in range(3)]
    model = Mixed()
    variables = model.init(jax.random.key(0), ids[0], True)
    rules = Rule(".*", weight=jq.QuantSpec("int8", jq.per_channel()))
    res = gptq(model, ids, variables, rules=rules)
    assert list(res.report) == ["dense"]
    assert set(res.skipped) == {"embed", "conv", "branch", "computed", ""}
    assert "convolution" in res.skipped["conv"]
    assert "Embed table" in res.skipped["embed"]
    assert "did not take" in res.skipped["branch"]
    assert "another module" in res.skipped[""]  # the root's w, contracted by "computed"
    assert "not a stored parameter" in res.skipped["computed"]
    p = res.variables["params"]
    for name in ("embed", "conv"):  # convert's round-to-nearest
        assert "convert rounds it to nearest" in res.skipped[name]
        assert isinstance(p[name]["embedding" if name == "embed" else "kernel"], jq.QArray)
    for name in ("branch", ""):  # never ran while converting: float in the tree
        assert "stays float" in res.skipped[name]
    assert not isinstance(p["branch"]["kernel"], jq.QArray)
    assert not isinstance(p["w"], jq.QArray)


@pytest.mark.slow
def test_solver_failure_is_skipped_by_name():
    """A granularity GPTQ cannot follow (groups along the output axis of a 3-D kernel that
    are not contiguous in the Hessian's order) is reported, and convert rounds it."""
    model = nn.DenseGeneral((2, 4), axis=(-2, -1))
    x = [jax.random.normal(jax.random.key(i), (8, 4, 6)) for i in range(2)]
    variables = model.init(jax.random.key(0), x[0])
    spec = jq.QuantSpec("int4", jq.per_block(0, 2))  # blocks the outer contracted axis
    res = gptq(model, x, variables, rules=Rule(".*", weight=spec))
    assert res.report == {} and list(res.skipped) == [""]
    assert "GPTQ failed" in res.skipped[""] and "contiguous" in res.skipped[""]
    assert isinstance(res.variables["params"]["kernel"], jq.QArray)


# ------------------------------------------------------------------ bad arguments


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"rules": Rule(".*", act=jq.QuantSpec("int8"))}, ValueError, "no rule quantizes"),
        ({"damping": -1.0}, ValueError, "damping"),
        ({"block_size": 0}, ValueError, "block_size"),
        ({"act_order": 1}, TypeError, "act_order"),
        ({"sequential": "yes"}, TypeError, "sequential"),
        ({"rules": "block.*"}, TypeError, "Rule"),
        ({"batches": []}, ValueError, "no calibration batches"),
        ({"batches": jnp.ones((4, 16))}, TypeError, r"pass \[x\]"),
        ({"variables": None}, ValueError, "needs its variables"),
        ({"variables": {"kernel": 1}}, ValueError, "'params'"),
        ({"call_kwargs": 3}, TypeError, "call_kwargs"),
    ],
)
def test_bad_arguments(kwargs, err, match):
    args = {"batches": _batches(), "variables": _mlp_vars(), "rules": RULES, **kwargs}
    batches, variables = args.pop("batches"), args.pop("variables")
    with pytest.raises(err, match=match):
        gptq(MLP, batches, variables, **args)


def test_bad_models():
    with pytest.raises(TypeError, match="float model"):
        gptq(quantize_model(MLP, RULES), _batches(), _mlp_vars(), rules=RULES)
    with pytest.raises(TypeError, match="Linen or NNX"):
        gptq(lambda x: x, _batches(), rules=RULES)
    with pytest.raises(ValueError, match="pass none"):
        gptq(_nnx_twin(), _batches(), {"params": {}}, rules=RULES)
    with pytest.raises(ValueError, match="quantized already"):
        gptq(quantize_model(_nnx_twin(), RULES), _batches(), rules=RULES)


# ------------------------------------------------------------------ the PTQ test bed


@functools.cache
def _tb_increase(spec, outliers=False, **kwargs) -> float:
    """Held-out nats/byte over float of the test bed served with GPTQ's ``spec`` weights
    (round-to-nearest's: ``_ptq_beds.rtn_increase``). Cached: a few tests compare the same
    run."""
    import _ptq_beds as beds
    import ptq_testbed as tb

    variables = {"params": beds.params(outliers)}
    rules = Rule(beds.LAYERS, weight=spec)
    res = gptq(tb.MODEL, tb.calibration_batches(), variables, rules=rules, **kwargs)
    assert res.skipped == {} and len(res.report) == 13
    return beds.loss(res.variables, spec) - beds.float_loss(outliers)


def _tb_rtn(spec, outliers=False) -> float:
    import _ptq_beds as beds

    return beds.rtn_increase(spec, outliers=outliers)


# (spec, options, GPTQ's increase at most this fraction of RTN's). The options take turns
# over the specs (each GPTQ run of the test bed is a few CPU-s; activation order is also the
# outlier case's below); MXFP4's blocks of 32 are the groups along the input (the group
# scales GPTQ sets), as int4 in groups of 32 would be. Plain GPTQ at w4 and w3 per channel
# (the restricted grid) on this same model, calibration and held-out windows is
# papers/gptq's fast mode, asserted in tests/test_papers_ptq.py (GPTQ under 0.35 / 0.45 of
# RTN's increase), not run twice; w3 here is that spec (the same compiled solver),
# sequential. Measured (nats/byte, RTN -> GPTQ): w3 restricted sequential 0.0967 -> 0.0303,
# nf4 per channel in activation order 0.0249 -> 0.0064, MXFP4 0.0237 -> 0.0048 (plain: w4 per
# channel 0.0153 -> 0.0027, w3 0.0967 -> 0.0298, nf4 0.0249 -> 0.0025; int4 in groups of
# 32 0.0116 -> 0.0016, in activation order 0.0026).
TESTBED = [
    pytest.param(
        jq.QuantSpec("int3", jq.per_channel(), int_grid="restricted"),
        {"sequential": True},
        0.5,
        id="w3-seq",
    ),
    pytest.param(
        jq.QuantSpec("nf4", jq.per_channel()), {"act_order": True}, 0.5, id="nf4-act-order"
    ),
    pytest.param(jq.QuantSpec("mxfp4", jq.per_block(32)), {}, 0.5, id="mxfp4"),
]


@pytest.mark.slow
@pytest.mark.parametrize("spec, kwargs, ratio", TESTBED)
def test_testbed_gptq_beats_rtn(spec, kwargs, ratio):
    rtn = _tb_rtn(spec)
    got = _tb_increase(spec, **kwargs)
    assert rtn > 0.005
    assert got < ratio * rtn, (got, rtn)


# The outlier model: channels 60-1000x the median dominate the default damping (1% of the
# mean diag H), which then swamps the other channels' curvature: GPTQ at damping=0.01 is no
# better than RTN there (w3: +0.131 vs +0.120). Measured (RTN -> GPTQ damping=1e-4 with
# act_order): w3 (the full grid) 0.137 -> 0.054; w4 0.083 -> 0.033 (the bit width is not
# the point: one of them runs).
@pytest.mark.slow
def test_testbed_outliers_gptq_beats_rtn():
    spec = jq.QuantSpec("int3", jq.per_channel())
    rtn = _tb_rtn(spec, outliers=True)
    got = _tb_increase(spec, outliers=True, damping=1e-4, act_order=True)
    assert got < 0.65 * rtn, (got, rtn)


# The median of diag H is not inflated by the outlier channels: at the paper's 1% damping
# (measured 2026-12-06) w4 +0.0811 (mean) -> +0.0238 (median), w3 +0.131 -> +0.056; w3 in
# activation order (the spec, order and solver programs of the test above: the mean run
# compiles nothing new) +0.118 -> +0.022 (measured 2026-12-07).
@pytest.mark.slow
def test_testbed_outliers_median_damping():
    spec = jq.QuantSpec("int3", jq.per_channel())
    mean = _tb_increase(spec, outliers=True, act_order=True)
    median = _tb_increase(spec, outliers=True, act_order=True, damping_reference="median")
    assert median < 0.5 * mean, (median, mean)


# ------------------------------------------------------------------ third-party models


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hf_gpt2", "nnx_lm1b"])
def test_third_party(name):
    import third_party_models as tp

    m = tp.get(name)
    model = nnx.clone(m.model) if tp.is_nnx(m.model) else m.model
    rules = Rule(".*", weight=W4)
    with tp.lenient():
        res = gptq(model, [m.args], m.variables, rules=rules, call_kwargs=m.kwargs)
        if tp.is_nnx(model):
            got = tp.call(m, model)
            rtn_model = quantize_model(nnx.clone(m.model), rules)
            graphdef, state = nnx.split(rtn_model)
            jax.eval_shape(lambda s: nnx.merge(graphdef, s)(*m.args, **m.kwargs), state)
            rtn = tp.call(m, convert(rtn_model))
        else:
            qmodel = quantize_model(model, rules)
            got = tp.call(m, qmodel, res.variables)
            rtn = tp.call(m, qmodel, convert(qmodel, m.variables))
    assert len(res.report) >= 8
    for r in res.report.values():
        assert r["loss"] <= r["rtn_loss"]
    # Skipped, by name: GPT-2's head is the tied wte.T (computed), lm1b's the Embed table.
    if name == "hf_gpt2":
        assert "not a stored parameter" in res.skipped["lm_head"]
    else:
        assert "Embed table" in res.skipped["decoder/output_embed"]
    ref = tp.call(m)

    def err(y):
        return float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))

    assert err(got) < err(rtn)
