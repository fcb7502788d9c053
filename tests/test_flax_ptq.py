"""Post-training quantization of Flax models: calibrate, convert, serve (Linen and NNX)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant.flax import Rule, calibrate, convert, quantize_model, report

PC = jq.per_channel(-1)
W8A8 = Rule(".*", weight=jq.QuantSpec("int8", PC), act=jq.QuantSpec("int8"))


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(10)(x)


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(16, 32, rngs=rngs), nnx.Linear(32, 10, rngs=rngs)])

    def __call__(self, x):
        return self.layers[1](nnx.relu(self.layers[0](x)))


def _nnx_copy(params):
    m = NnxMLP(nnx.Rngs(0))
    for i in range(2):
        m.layers[i].kernel[...] = params["params"][f"Dense_{i}"]["kernel"]
        m.layers[i].bias[...] = params["params"][f"Dense_{i}"]["bias"]
    return m


@pytest.fixture(scope="module")
def setup():
    x = (
        jax.random.normal(jax.random.key(0), (4, 24, 16))
        * jnp.array([1.0, 2.0, 0.5, 1.5])[:, None, None]
    )
    model = MLP()
    variables = model.init(jax.random.key(1), x[0])
    return model, variables, [x[i] for i in range(4)]


def _layer_inputs(variables, batches):
    p = variables["params"]
    b0 = p["Dense_0"]["bias"][None]
    h = [jax.nn.relu(b @ p["Dense_0"]["kernel"] + b0) for b in batches]
    return {"Dense_0": batches, "Dense_1": h}


@pytest.mark.slow
def test_absmax_ranges_are_exact_and_rules_static(setup):
    model, variables, batches = setup
    res = calibrate(quantize_model(model, W8A8), batches, variables)
    inputs = _layer_inputs(variables, batches)
    for path, xs in inputs.items():
        amax = max(float(jnp.max(jnp.abs(x))) for x in xs)
        assert res.ranges[path] == pytest.approx((-amax, amax), rel=1e-6)
        assert res.stats[path]["count"] == sum(x.size for x in xs)
    assert [r.pattern for r in res.rules] == ["Dense_0", "Dense_1"]
    assert all(isinstance(r.act.calibration, type(jq.fixed(1.0))) for r in res.rules)
    assert res.num_batches == 4 and "Dense_1" in str(res)
    # A static scale: one sample's output does not depend on the rest of its batch.
    static = quantize_model(model, res.rules)
    full = static.apply(variables, batches[1])
    one = static.apply(variables, batches[1][:1])
    # equal up to the GEMM's accumulation order (which a GPU picks by batch size)
    np.testing.assert_allclose(full[:1], one, rtol=1e-6, atol=1e-6)
    dynamic = quantize_model(model, W8A8)
    moved = dynamic.apply(variables, batches[1])[:1] - dynamic.apply(variables, batches[1][:1])
    assert float(jnp.max(jnp.abs(moved))) > 1e-3  # a dynamic scale depends on the batch


@pytest.mark.slow
def test_ema_and_mean_aggregate(setup):
    model, variables, batches = setup
    qm = quantize_model(model, W8A8)
    per_batch = [float(jnp.max(jnp.abs(b))) for b in batches]
    ema = per_batch[0]
    for a in per_batch[1:]:
        ema = 0.5 * ema + 0.5 * a
    res = calibrate(qm, batches, variables, aggregate="ema", momentum=0.5)
    assert res.ranges["Dense_0"][1] == pytest.approx(ema, rel=1e-6)
    res = calibrate(qm, batches, variables, aggregate="mean")
    assert res.ranges["Dense_0"][1] == pytest.approx(np.mean(per_batch), rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    "calibration", [jq.percentile(99.0), jq.mse(), jq.kl(), jq.mean_std(2.0)], ids=str
)
def test_clipping_methods_clip_and_nnx_agrees(setup, calibration):
    model, variables, batches = setup
    rule = Rule(
        ".*", weight=jq.QuantSpec("int8", PC), act=jq.QuantSpec("int4", calibration=calibration)
    )
    res = calibrate(quantize_model(model, rule), batches, variables)
    absmax = calibrate(quantize_model(model, W8A8), batches, variables)
    for path in ("Dense_0", "Dense_1"):
        assert 0 < res.ranges[path][1] <= absmax.ranges[path][1]
    assert res.ranges["Dense_0"][1] < absmax.ranges["Dense_0"][1]  # Gaussian inputs: clipped
    nnx_model = quantize_model(_nnx_copy(variables), rule)
    res_nnx = calibrate(nnx_model, batches)
    for (p, r), (pn, rn) in zip(res.ranges.items(), res_nnx.ranges.items(), strict=True):
        assert pn == f"layers/{p[-1]}"
        np.testing.assert_allclose(r, rn, rtol=1e-5)


def _serve_linen(model, rules, variables, x):
    sm = quantize_model(model, rules)
    jax.eval_shape(sm.init, jax.random.key(0), x)
    served = convert(sm, variables)
    return sm, served, jax.jit(sm.apply)(served, x), sm.apply(variables, x)


SERVE_RULES = {
    "w8a8": W8A8,
    "fp8": Rule(".*", weight=jq.QuantSpec("e4m3", PC), act=jq.QuantSpec("e4m3")),
    "w4g8": Rule(".*", weight=jq.QuantSpec("int4", jq.per_block(0, 8))),
    "nf4g8": Rule(".*", weight=jq.QuantSpec("nf4", jq.per_block(0, 8))),
    "w4a8": Rule(".*", weight=jq.QuantSpec("int4", jq.per_block(0, 8)), act=jq.QuantSpec("int8")),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SERVE_RULES))
def test_served_equals_fake_quant_linen_and_nnx(setup, name):
    """Converted params served through int8 / fp8 / weight-only products give what the
    fake-quantized model with the same static rules computes on float params."""
    model, variables, batches = setup
    res = calibrate(quantize_model(model, SERVE_RULES[name]), batches, variables)
    x = batches[2]
    _, served, y, y_fq = _serve_linen(model, res.rules, variables, x)
    np.testing.assert_allclose(y, y_fq, atol=1e-5 * float(jnp.max(jnp.abs(y_fq))))
    kernels = [served["params"][f"Dense_{i}"]["kernel"] for i in range(2)]
    assert all(isinstance(k, jq.QArray) for k in kernels)
    floats = [a for a in jax.tree.leaves(served) if a.size >= 16 * 10 and a.dtype == jnp.float32]
    assert not floats  # no float copy of any kernel
    nnx_model = quantize_model(
        _nnx_copy(variables),
        calibrate(quantize_model(_nnx_copy(variables), SERVE_RULES[name]), batches).rules,
    )
    convert(nnx_model)
    assert isinstance(nnx_model.layers[0].kernel[...], jq.QArray)
    y_nnx = nnx.jit(lambda m, x: m(x))(nnx_model, x)
    np.testing.assert_allclose(y_nnx, y, atol=1e-5 * float(jnp.max(jnp.abs(y))))


@pytest.mark.slow
def test_int4_takes_half_a_byte_and_abstract_conversion(setup):
    model, variables, batches = setup
    rule = Rule(".*", weight=jq.QuantSpec("int4", jq.per_block(0, 8)))
    sm = quantize_model(model, rule)
    abstract = jax.eval_shape(sm.init, jax.random.key(0), batches[0])
    flat = {
        jax.tree_util.keystr(p, simple=True, separator="/"): v
        for p, v in jax.tree_util.tree_flatten_with_path(variables)[0]
    }
    loaded = []

    def load(path, leaf):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        loaded.append(name)
        return flat["params/" + name]

    served = convert(sm, abstract, load=load)
    concrete = convert(sm, variables)
    assert sorted(loaded) == sorted(k[len("params/") :] for k in flat)
    for a, b in zip(jax.tree.leaves(served), jax.tree.leaves(concrete), strict=True):
        np.testing.assert_array_equal(a, b)
    k = served["params"]["Dense_0"]["kernel"]
    assert k.values.shape == (16, 16) and k.values.dtype == jnp.uint8  # 16 x 32 int4
    assert k.nbytes == 16 * 32 // 2 + (16 // 8) * 32 * 4


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), name="conv")(x))
        return nn.Dense(10, name="head")(x.reshape(x.shape[0], -1))


class NnxCNN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.head = nnx.Linear(6 * 6 * 8, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv(x))
        return self.head(x.reshape(x.shape[0], -1))


@pytest.mark.slow
def test_conv_model_linen_and_nnx():
    x = jax.random.normal(jax.random.key(0), (5, 6, 6, 1))
    model = CNN()
    variables = model.init(jax.random.key(1), x)
    res = calibrate(quantize_model(model, W8A8), [x[:3], x[3:]], variables)
    assert set(res.ranges) == {"conv", "head"}
    sm, _, y, y_fq = _serve_linen(model, res.rules, variables, x)
    np.testing.assert_allclose(y, y_fq, atol=1e-5 * float(jnp.max(jnp.abs(y_fq))))
    assert [m.module for m in report(sm)] == ["Conv", "Dense"]
    m = NnxCNN(nnx.Rngs(0))
    m.conv.kernel[...] = variables["params"]["conv"]["kernel"]
    m.conv.bias[...] = variables["params"]["conv"]["bias"]
    m.head.kernel[...] = variables["params"]["head"]["kernel"]
    m.head.bias[...] = variables["params"]["head"]["bias"]
    res_nnx = calibrate(quantize_model(m, W8A8), [x[:3], x[3:]])
    np.testing.assert_allclose(res_nnx.ranges["conv"], res.ranges["conv"], rtol=1e-6)
    quantize_model(m, res_nnx.rules)
    convert(m)
    np.testing.assert_allclose(m(x), y, atol=1e-5 * float(jnp.max(jnp.abs(y))))


@pytest.mark.slow
def test_dense_general_and_einsum_serving():
    class Heads(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.DenseGeneral((2, 4), name="proj")(x)
            return nn.Einsum((2, 4, 3), "bhd,hdf->bf", name="mix")(h)

    x = jax.random.normal(jax.random.key(0), (6, 8))
    model = Heads()
    variables = model.init(jax.random.key(1), x)
    rule = Rule(".*", weight=jq.QuantSpec("int8", jq.per_channel(-1)), act=jq.QuantSpec("int8"))
    res = calibrate(quantize_model(model, rule), [x], variables)
    _, _, y, y_fq = _serve_linen(model, res.rules, variables, x)
    np.testing.assert_allclose(y, y_fq, atol=1e-5 * float(jnp.max(jnp.abs(y_fq))))


# ------------------------------------------------------------------------------ errors


@pytest.mark.slow
def test_nan_batch_is_an_error_naming_batch_and_layer(setup):
    model, variables, batches = setup
    bad = batches[1].at[3, 2].set(jnp.nan)
    with pytest.raises(ValueError, match=r"batch 1 gives 1 non-finite .*'Dense_0'"):
        calibrate(quantize_model(model, W8A8), [batches[0], bad], variables)
    nnx_model = quantize_model(_nnx_copy(variables), W8A8)
    with pytest.raises(ValueError, match=r"batch 1 .*'layers/0'"):
        calibrate(nnx_model, [batches[0], bad])


@pytest.mark.slow
def test_calibrate_errors(setup):
    model, variables, batches = setup
    qm = quantize_model(model, W8A8)
    with pytest.raises(ValueError, match="no calibration batches"):
        calibrate(qm, [], variables)
    with pytest.raises(ValueError, match="aggregate"):
        calibrate(qm, batches, variables, aggregate="median")
    with pytest.raises(ValueError, match="needs its variables"):
        calibrate(qm, batches)
    with pytest.raises(ValueError, match="pass no rules"):
        calibrate(qm, batches, variables, rules=W8A8)
    per_token = Rule(
        ".*", weight=jq.QuantSpec("int8", PC), act=jq.QuantSpec("int8", jq.per_token())
    )
    with pytest.raises(ValueError, match="one number per tensor"):
        calibrate(quantize_model(model, per_token), batches, variables)
    # plain model + rules works and matches
    res = calibrate(model, batches, variables, rules=W8A8)
    assert res.ranges == calibrate(qm, batches, variables).ranges


def test_convert_and_serve_errors(setup):
    model, variables, batches = setup
    sm = quantize_model(model, W8A8)
    with pytest.raises(ValueError, match="only known once it runs"):
        convert(sm, variables)
    sm.init(jax.random.key(0), batches[0])
    served = convert(sm, variables)
    with pytest.raises(ValueError, match="already a QArray"):
        convert(sm, served)
    with pytest.raises(ValueError, match="no such leaf"):
        convert(sm, {"params": {"Dense_0": variables["params"]["Dense_0"]}})
    other = quantize_model(model, Rule(".*", weight=jq.QuantSpec("int4", PC)))
    with pytest.raises(ValueError, match=r"quantized with .* but the rule"):
        other.apply(served, batches[0])
    float_head = quantize_model(model, [Rule("Dense_1"), W8A8])
    with pytest.raises(ValueError, match="no quantizing rule matches"):
        float_head.apply(served, batches[0])
    with pytest.raises(TypeError, match="expected a model returned by quantize_model"):
        convert(model, variables)
    delayed = Rule(".*", weight=jq.QuantSpec("int8"), act=jq.QuantSpec("int8"), scaling="delayed")
    m = quantize_model(_nnx_copy(variables), delayed)
    with pytest.raises(ValueError, match="stateful rule"):
        convert(m)
    m = quantize_model(_nnx_copy(variables), W8A8)
    with pytest.raises(ValueError, match="in place"):
        convert(m, variables)
    convert(m)
    with pytest.raises(ValueError, match="already a QArray"):
        convert(m)


class _DeadHidden(nn.Module):
    """Dense_1 only ever sees zeros: relu(-|h|) = 0 (a dead layer)."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(8)(x)
        return nn.Dense(4)(nn.relu(-jnp.abs(h))) + h[..., :4]


@pytest.mark.slow
@pytest.mark.parametrize("aggregate", ["global", "ema"])
@pytest.mark.parametrize(
    "act", [jq.QuantSpec("int8"), jq.QuantSpec("uint8", symmetric=False, calibration=jq.minmax())]
)
def test_all_zero_activations_keep_the_layer_float_and_say_so(setup, act, aggregate):
    """fixed(0) / fixed((0, 0)) have no scale: no crash, no silent unit scale either."""
    _, _, batches = setup
    model = _DeadHidden()
    variables = model.init(jax.random.key(2), batches[0])
    rule = Rule(".*", weight=jq.QuantSpec("int8", PC), act=act)
    with pytest.warns(UserWarning, match=r"'Dense_1': all 384 activation values .* were 0"):
        res = calibrate(quantize_model(model, rule), batches[:2], variables, aggregate=aggregate)
    assert list(res.kept_float) == ["Dense_1"]
    assert res.ranges["Dense_1"] == (0.0, 0.0)
    by_path = {r.pattern: r for r in res.rules}
    assert by_path["Dense_1"].act is None and by_path["Dense_1"].weight == rule.weight
    lo, hi = res.ranges["Dense_0"]
    assert by_path["Dense_0"].act.calibration == jq.fixed(hi if act.symmetric else (lo, hi))
    assert "(kept float)" in str(res)
    if not act.symmetric:  # calibrated, but a dot takes symmetric activations only
        return
    served_model = quantize_model(model, res.rules)
    served_model.init(jax.random.key(0), batches[0])
    served = convert(served_model, variables)
    y = served_model.apply(served, batches[2])
    assert bool(jnp.all(jnp.isfinite(y)))


def test_calibrate_checks_its_arguments_types_first(setup):
    model, variables, batches = setup
    qm = quantize_model(model, W8A8)
    with pytest.raises(TypeError, match=r"calibrate: momentum must be a number, got 'x'"):
        calibrate(qm, batches, variables, aggregate="ema", momentum="x")
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\), got 1.0"):
        calibrate(qm, batches, variables, aggregate="ema", momentum=1.0)
    with pytest.raises(TypeError, match=r"calibrate: batches must be an iterable .* got 'abc'"):
        calibrate(qm, "abc", variables)
    # Strings, bools and numbers are static arguments now (train=False); other objects
    # are refused with the way out.
    with pytest.raises(TypeError, match=r"calibrate: batches\[1\] holds <object .*call_kwargs"):
        calibrate(qm, [batches[0], (object(),)], variables)
    with pytest.raises(TypeError, match=r"calibrate: bins must be an int"):
        calibrate(qm, batches, variables, bins=2048.0)


# ------------------------------------------------------------- call arguments and collections


class _BNNet(nn.Module):
    """A ``train`` flag (BatchNorm running vs batch statistics) and a keyword array."""

    @nn.compact
    def __call__(self, x, train: bool = True, gain=None):
        h = nn.BatchNorm(use_running_average=not train, name="bn")(nn.Dense(16)(x))
        if gain is not None:
            h = h * gain
        return nn.Dense(4)(nn.relu(h))


class _NnxBNNet(nnx.Module):
    def __init__(self, rngs):
        self.Dense_0 = nnx.Linear(16, 16, rngs=rngs)
        self.bn = nnx.BatchNorm(16, rngs=rngs)
        self.Dense_1 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x, *, gain=None, deterministic: bool = False):
        h = self.bn(self.Dense_0(x), use_running_average=deterministic)
        if gain is not None:
            h = h * gain
        return self.Dense_1(nnx.relu(h))


def _bn_variables(model, x):
    variables = model.init(jax.random.key(1), x, train=False)
    stats = {  # running statistics unlike any batch's, so that the flag shows
        "mean": jnp.linspace(-1.0, 1.0, 16, dtype=jnp.float32),
        "var": jnp.linspace(0.5, 2.0, 16, dtype=jnp.float32),
    }
    return {"params": variables["params"], "batch_stats": {"bn": stats}}


@pytest.mark.slow
def test_calibrate_takes_a_train_flag_and_batch_stats(setup):
    """Was TracerBoolConversionError (a flag in the batch was traced); fast subset."""
    _, _, batches = setup
    model = _BNNet()
    variables = _bn_variables(model, batches[0])
    qm = quantize_model(model, W8A8)
    res = calibrate(qm, batches[:2], variables, call_kwargs={"train": False})
    assert set(res.ranges) == {"Dense_0", "Dense_1"}
    assert res.rules[1].act.calibration == jq.fixed(res.ranges["Dense_1"][1])
    with pytest.raises(
        ValueError, match=r"updates that collection.*call_kwargs=\{'train': False\}"
    ):
        calibrate(qm, batches[:2], variables)


@pytest.mark.slow
def test_calibrate_takes_call_kwargs_static_flags_and_every_collection(setup):
    """Was TracerBoolConversionError (a flag in the batch was traced); batch_stats pass.
    The flag in call_kwargs, a dict batch or positional, Linen and NNX, then serving."""
    _, _, batches = setup
    model = _BNNet()
    variables = _bn_variables(model, batches[0])
    gains = [jnp.full((1, 16), g, jnp.float32) for g in (1.0, 2.0, 0.5, 1.5)]
    qm = quantize_model(model, W8A8)
    # Dense_1's input, by hand: BatchNorm with the running statistics, then the gain.
    bn = variables["params"]["bn"]
    st = variables["batch_stats"]["bn"]

    def hidden(x, g):
        p = variables["params"]["Dense_0"]
        h = x @ p["kernel"] + p["bias"][None]
        h = (h - st["mean"][None]) / jnp.sqrt(st["var"][None] + 1e-5)
        h = h * bn["scale"][None] + bn["bias"][None]
        return jax.nn.relu(h * g)

    pairs = list(zip(batches, gains, strict=True))
    want = max(float(jnp.max(jnp.abs(hidden(x, g)))) for x, g in pairs)
    eval_flag = {"train": False}
    forms = {  # the flag in call_kwargs, in a dict batch, or positional in a tuple batch
        "call_kwargs": ([{"x": x, "gain": g} for x, g in pairs], eval_flag),
        "dict batch": ([{"x": x, "gain": g, "train": False} for x, g in pairs], None),
        "tuple batch": ([(x, False, g) for x, g in pairs], None),
    }
    for name, (bs, kw) in forms.items():
        res = calibrate(qm, bs, variables, call_kwargs=kw)
        np.testing.assert_allclose(res.ranges["Dense_1"][1], want, rtol=1e-6, err_msg=name)
        assert res.ranges["Dense_0"][1] == float(jnp.max(jnp.abs(jnp.stack(batches)))), name
    # NNX: the same with deterministic=True (nnx.BatchNorm's running statistics).
    nm = _NnxBNNet(nnx.Rngs(0))
    for name in ("Dense_0", "Dense_1"):
        getattr(nm, name).kernel[...] = variables["params"][name]["kernel"]
        getattr(nm, name).bias[...] = variables["params"][name]["bias"]
    nm.bn.scale[...], nm.bn.bias[...] = bn["scale"], bn["bias"]
    nm.bn.mean[...], nm.bn.var[...] = st["mean"], st["var"]
    bs = [{"x": x, "gain": g} for x, g in zip(batches, gains, strict=True)]
    res = calibrate(nm, bs, rules=W8A8, call_kwargs={"deterministic": True})
    np.testing.assert_allclose(res.ranges["Dense_1"][1], want, rtol=1e-6)
    # Served with the flag and the collections: converted kernels, batch_stats kept.
    served_model = quantize_model(model, calibrate(qm, bs, variables, call_kwargs=eval_flag).rules)
    served_model.init(jax.random.key(0), batches[0], train=False)
    served = convert(served_model, variables)
    assert served["batch_stats"] is variables["batch_stats"]
    y = served_model.apply(served, batches[0], train=False, gain=gains[0])
    ref = model.apply(variables, batches[0], train=False, gain=gains[0])
    assert float(jq.metrics.sqnr(ref, y)) > 30.0
