"""Post-training quantization of models as they are published (issue 12, item 6).

Two models with the calling conventions of real ones, random-initialised in small configs:

* ``ResNet``: flax's ImageNet example (``examples/imagenet/models.py``, written out in
  tests/third_party_models.py): ``nn.Conv`` + ``nn.BatchNorm(use_running_average=not
  train)``, a ``train`` argument that defaults to True, ``batch_stats`` beside ``params``,
  a list attribute. Stage sizes ``[1, 1]``, 8 filters, 32x32 inputs: 6 Conv and 1 Dense.
  BatchNorm without the example's ``axis_name="batch"`` (see ``_resnet``).
* ``NnxNet``: an NNX model with Conv, BatchNorm, Dropout (its own RNG stream), a
  ``deterministic`` flag and a per-batch ``mask`` keyword.

Their weights, BatchNorm scales and running statistics are drawn at random (as after
training: the published init zeroes each block's last norm scale), so that every layer
affects the output. Each goes through calibrate -> convert -> serve and
sensitivity -> mixed-precision plan with its flag (``train=False`` / ``deterministic=True``)
and every variable collection; outputs are checked against the float model (SQNR bounds)
and every Conv / Dense kernel must be served as a QArray. The NNX state, RNG keys
included, round-trips through ``jq.orbax`` into ``nnx.update``.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import third_party_models as tp
from flax import nnx

import jaxquant as jq
import jaxquant.orbax
from jaxquant._src.orbax import checkpoint
from jaxquant.flax import (
    Rule,
    calibrate,
    convert,
    mixed_precision,
    quantize_model,
    report,
    sensitivity,
)

PC = jq.per_channel(-1)
W8A8 = Rule(".*", weight=jq.QuantSpec("int8", PC), act=jq.QuantSpec("int8"))
CANDIDATES = {
    "w8": Rule(".*", weight=jq.QuantSpec("int8", PC)),
    "w4": Rule(".*", weight=jq.QuantSpec("int4", PC)),
}
EVAL = {"train": False}


# ------------------------------------------------------------------------ the models


class NnxNet(nnx.Module):
    """Conv -> BatchNorm -> relu -> masked mean -> Dropout -> Linear -> relu -> Linear."""

    def __init__(self, rngs: nnx.Rngs):
        # Zero kernels: _nnx_net draws every weight (eager random initializers would
        # compile one program per shape, for values that are overwritten).
        zero = {"kernel_init": nnx.initializers.zeros_init(), "rngs": rngs}
        self.conv = nnx.Conv(3, 8, (3, 3), **zero)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.hidden = nnx.Linear(8, 16, **zero)
        self.head = nnx.Linear(16, 10, **zero)

    def __call__(self, x, *, mask=None, deterministic: bool = False):
        h = nnx.relu(self.bn(self.conv(x), use_running_average=deterministic))
        if mask is not None:  # which images count (a per-batch array)
            h = h * mask[:, None, None, None]
        h = self.drop(jnp.mean(h, axis=(1, 2)), deterministic=deterministic)
        return self.head(nnx.relu(self.hidden(h)))


RESNET_LAYERS = (
    "conv_init",
    "ResNetBlock_0/Conv_0",
    "ResNetBlock_0/Conv_1",
    "ResNetBlock_1/Conv_0",
    "ResNetBlock_1/Conv_1",
    "ResNetBlock_1/conv_proj",
    "Dense_0",
)
NNX_LAYERS = ("conv", "head", "hidden")  # graph order: by attribute name


def _resnet(block_cls=tp.ResNetBlock):
    # A list attribute, as the published ResNet18 passes; BatchNorm without the example's
    # axis_name="batch" (its pmap axis), so that calibrate can also run it in training
    # mode on one device (test_resnet_calibrate_convert_serve_...).
    model = tp.ResNet(
        stage_sizes=[1, 1], block_cls=block_cls, num_classes=10, num_filters=8, axis_name=None
    )
    x = jax.random.normal(jax.random.key(0), (3, 4, 32, 32, 3))
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(1), x[0])
    variables = tp.trained_like(shapes, 1)
    return model, variables, [x[i] for i in range(3)]


@pytest.fixture(scope="module")
def resnet():
    return _resnet()


def _nnx_net(seed: int = 0) -> NnxNet:
    model = NnxNet(nnx.Rngs(seed))
    weights = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    nnx.update(model, tp.trained_like(weights, 100 + seed))
    return model


@pytest.fixture(scope="module")
def nnx_data():
    x = jax.random.normal(jax.random.key(4), (3, 4, 16, 16, 3))
    masks = jnp.array([[1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    return [(x[i], masks[i]) for i in range(3)]


def _kernels(tree: Any) -> dict[str, Any]:
    """``{layer path: kernel}`` of a Linen params tree (QArrays as leaves)."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda t: isinstance(t, jq.QArray))
    out = {}
    for path, leaf in flat[0]:
        names = [p.key for p in path]
        if names[-1] == "kernel":
            out["/".join(names[:-1])] = leaf
    return out


# ------------------------------------------------------------------------ Linen ResNet


@pytest.mark.slow
def test_resnet_has_the_layers_and_collections_of_the_example(resnet):
    _, variables, _ = resnet
    assert sorted(variables) == ["batch_stats", "params"]
    assert sorted(_kernels(variables["params"])) == sorted(RESNET_LAYERS)


@pytest.mark.slow
def test_resnet_calibrate_convert_serve_with_train_false_and_batch_stats(resnet):
    model, variables, batches = resnet
    qmodel = quantize_model(model, W8A8)
    res = calibrate(qmodel, batches, variables, call_kwargs=EVAL)
    assert set(res.ranges) == set(RESNET_LAYERS)
    assert res.num_batches == 3 and not res.kept_float
    # The flag as a positional Python bool in the batch, or a keyword in a dict batch: a
    # static argument either way, the same model call and the same ranges.
    assert calibrate(qmodel, [(x, False) for x in batches], variables).ranges == res.ranges
    as_dicts = [{"x": x, "train": False} for x in batches]
    assert calibrate(qmodel, as_dicts, variables).ranges == res.ranges
    # Running statistics, not the batch's: the ranges of the layers after a BatchNorm
    # differ in training mode (mutable batch_stats, so that flax allows it).
    trained = calibrate(
        qmodel, batches, variables, call_kwargs={"train": True, "mutable": ["batch_stats"]}
    )
    assert trained.ranges["conv_init"] == res.ranges["conv_init"]
    assert trained.ranges["Dense_0"] != res.ranges["Dense_0"]

    served_model = quantize_model(model, res.rules)
    # report() and convert() need a first call; an abstract one compiles no initializer
    jax.eval_shape(functools.partial(served_model.init, train=False), jax.random.key(0), batches[0])
    assert [m.path for m in report(served_model)] == [r.pattern for r in res.rules]
    assert sorted(m.path for m in report(served_model)) == sorted(RESNET_LAYERS)
    served = convert(served_model, variables)
    kernels = _kernels(served["params"])
    assert sorted(kernels) == sorted(RESNET_LAYERS)
    assert all(isinstance(k, jq.QArray) and k.values.dtype == jnp.int8 for k in kernels.values())
    assert served["batch_stats"] is variables["batch_stats"]
    # One compilation of each model (eagerly, every op compiles for itself).
    ref, serve = (jax.jit(functools.partial(m.apply, train=False)) for m in (model, served_model))
    for x in batches:
        assert float(jq.metrics.sqnr(ref(variables, x), serve(served, x))) > 35.0  # 42.2 dB


@pytest.mark.slow
def test_resnet_sensitivity_and_plan_with_train_false(resnet):
    model, variables, batches = resnet
    data = [(x, None) for x in batches[:2]]
    sens = sensitivity(model, variables, CANDIDATES, data, metric="sqnr", call_kwargs=EVAL)
    assert sens.paths == RESNET_LAYERS
    for layer in sens.layers:  # every layer matters (random norms) and int4 hurts more
        assert 0.0 < layer.damage["w8"] < layer.damage["w4"] < 0.1, layer
    # Per-batch keyword arguments: (x, y, kwargs) triples, the same measurement (shown on
    # a layer before the first BatchNorm and on one after the last, where the flag
    # matters; one candidate: one compilation of the model with those layers gated).
    triples = [(x, None, EVAL) for x in batches[:2]]
    some = ["conv_init", "Dense_0"]
    w4 = {"w4": CANDIDATES["w4"]}
    per_batch = sensitivity(model, variables, w4, triples, metric="sqnr", layers=some)
    # To float32 rounding: each sensitivity compiles one model with its considered layers
    # gated, and XLA may round the two programs' shared float ops differently (-O0: FMAs,
    # tests/xla_options.py); a wrong flag (batch statistics) changes the damage by far more.
    assert [layer.damage for layer in per_batch.layers] == [
        {"float": 0.0, "w4": pytest.approx(sens.layer(p).damage["w4"], rel=1e-5)} for p in some
    ]

    plan = mixed_precision(sens, budget=0.2)
    assert set(plan.choice) == set(RESNET_LAYERS) and plan.nbytes <= plan.budget
    assert "float" not in plan.choice.values()  # 20% of float32 bytes: every layer <= 8 bits
    qmodel = quantize_model(model, plan)
    x = batches[2]
    ref, got = (jax.jit(functools.partial(m.apply, train=False)) for m in (model, qmodel))
    got = got(variables, x)
    assert sorted(m.path for m in report(qmodel)) == sorted(RESNET_LAYERS)
    # measured 26.8 dB (int4 conv_init and ResNetBlock_1/Conv_1, int8 elsewhere)
    assert float(jq.metrics.sqnr(ref(variables, x), got)) > 20.0


@pytest.mark.slow
def test_bottleneck_resnet_calibrate_convert_serve():
    model, variables, batches = _resnet(tp.BottleneckResNetBlock)
    layers = sorted(_kernels(variables["params"]))
    assert len(layers) == 10  # conv_init, 2 x (3 convs), 1 projection, Dense
    res = calibrate(quantize_model(model, W8A8), batches[:2], variables, call_kwargs=EVAL)
    served_model = quantize_model(model, res.rules)
    jax.eval_shape(functools.partial(served_model.init, train=False), jax.random.key(0), batches[0])
    served = convert(served_model, variables)
    assert all(isinstance(k, jq.QArray) for k in _kernels(served["params"]).values())
    assert sorted(_kernels(served["params"])) == layers
    ref, serve = (jax.jit(functools.partial(m.apply, train=False)) for m in (model, served_model))
    want, got = ref(variables, batches[2]), serve(served, batches[2])
    assert float(jq.metrics.sqnr(want, got)) > 30.0  # measured 36.5 dB


def test_calibrate_and_sensitivity_say_what_a_batchnorm_model_needs(resnet):
    model, variables, batches = resnet
    qmodel = quantize_model(model, W8A8)
    # Called as published (train=True by default): BatchNorm would update batch_stats.
    with pytest.raises(ValueError, match=r"calibrate: .*batch_stats.*call_kwargs=\{'train'"):
        calibrate(qmodel, batches[:1], variables)
    with pytest.raises(ValueError, match=r"sensitivity: .*batch_stats.*call_kwargs=\{'train'"):
        sensitivity(model, variables, CANDIDATES, [(batches[0], None)], metric="sqnr")
    # Only params: the running statistics are missing.
    params_only = {"params": variables["params"]}
    with pytest.raises(ValueError, match=r"calibrate: .*batch_stats.*every collection"):
        calibrate(qmodel, batches[:1], params_only, call_kwargs=EVAL)
    with pytest.raises(ValueError, match=r"sensitivity: .*batch_stats.*every collection"):
        sensitivity(model, params_only, CANDIDATES, [(batches[0], None)], call_kwargs=EVAL)
    # The flag in two places.
    with pytest.raises(ValueError, match=r"batches\[0\] and call_kwargs both give .*'train'"):
        calibrate(qmodel, [{"x": batches[0], "train": False}], variables, call_kwargs=EVAL)
    with pytest.raises(ValueError, match=r"data\[0\] and call_kwargs both give .*'train'"):
        sensitivity(model, variables, CANDIDATES, [(batches[0], None, EVAL)], call_kwargs=EVAL)


@pytest.mark.parametrize("bad", ["train=False", ["train"], {1: False}])
def test_call_kwargs_must_be_a_dict_of_keywords(resnet, bad):
    model, variables, batches = resnet
    with pytest.raises(TypeError, match=r"calibrate: call_kwargs must be a dict"):
        calibrate(model, batches, variables, rules=W8A8, call_kwargs=bad)
    with pytest.raises(TypeError, match=r"sensitivity: call_kwargs must be a dict"):
        sensitivity(model, variables, CANDIDATES, [(batches[0], None)], call_kwargs=bad)


def test_batches_hold_arrays_and_python_flags_only(resnet):
    model, variables, batches = resnet
    with pytest.raises(TypeError, match=r"batches\[0\] holds <object .*call_kwargs"):
        calibrate(model, [(batches[0], object())], variables, rules=W8A8)
    with pytest.raises(TypeError, match=r"data\[0\] holds <object .*call_kwargs"):
        sensitivity(model, variables, CANDIDATES, [(batches[0], None, {"train": object()})])
    with pytest.raises(TypeError, match=r"kwargs of data\[0\] .* must be a dict"):
        sensitivity(model, variables, CANDIDATES, [(batches[0], None, "train")])
    with pytest.raises(TypeError, match=r"\(x, y\) pair or an \(x, y, kwargs\) triple"):
        sensitivity(model, variables, CANDIDATES, [(batches[0],)])


# ------------------------------------------------------------------------ NNX


@functools.partial(nnx.jit, static_argnames="deterministic")
def _call(model, x, mask, deterministic=False):
    """``model(x, mask=mask, deterministic=...)``, one compiled program per mode for every
    NnxNet (eagerly, each op compiles on its own); updates the model's state as a call."""
    return model(x, mask=mask, deterministic=deterministic)


def _nnx_sqnr(float_model, qmodel, data) -> float:
    sig = noise = 0.0
    for x, m in data:
        want = np.asarray(_call(float_model, x, m, deterministic=True), np.float64)
        got = np.asarray(_call(qmodel, x, m, deterministic=True), np.float64)
        sig += float(np.sum(want**2))
        noise += float(np.sum((want - got) ** 2))
    return 10.0 * np.log10(sig / noise)


@pytest.mark.slow
def test_nnx_calibrate_convert_serve_with_deterministic_and_a_mask(nnx_data):
    model = _nnx_net()
    batches = [{"x": x, "mask": m} for x, m in nnx_data[:2]]
    flag = {"deterministic": True}
    res = calibrate(model, batches, rules=W8A8, call_kwargs=flag)
    assert set(res.ranges) == set(NNX_LAYERS) and not res.kept_float
    # The flag reaches the model: in training mode, dropout and batch statistics change
    # what the later layers see (the NNX model keeps its own RNG stream for dropout).
    trained = calibrate(model, batches, rules=W8A8, call_kwargs={"deterministic": False})
    assert trained.ranges["conv"] == res.ranges["conv"]
    assert trained.ranges["hidden"] != res.ranges["hidden"]

    qmodel = quantize_model(_nnx_net(), res.rules)
    assert [m.path for m in report(qmodel)] == list(NNX_LAYERS)
    convert(qmodel)
    for name in NNX_LAYERS:
        kernel = getattr(qmodel, name).kernel[...]
        assert isinstance(kernel, jq.QArray) and kernel.values.dtype == jnp.int8, name
    assert _nnx_sqnr(model, qmodel, nnx_data) > 30.0  # measured 35.9 dB
    # The model itself was not touched by calibrate (no dropout step, no stats update).
    np.testing.assert_array_equal(model.bn.mean[...], _nnx_net().bn.mean[...])


@pytest.mark.slow
def test_nnx_sensitivity_and_plan_with_deterministic_and_per_batch_masks(nnx_data):
    model = _nnx_net()
    data = [(x, None, {"mask": m}) for x, m in nnx_data[:2]]
    flag = {"deterministic": True}
    sens = sensitivity(model, None, CANDIDATES, data, metric="sqnr", call_kwargs=flag)
    assert sens.paths == NNX_LAYERS
    for layer in sens.layers:
        assert 0.0 < layer.damage["w8"] < layer.damage["w4"] < 0.1, layer
    plan = mixed_precision(sens, budget=0.2)
    assert "float" not in plan.choice.values()
    qmodel = quantize_model(_nnx_net(), plan)
    assert [m.path for m in report(qmodel)] == list(NNX_LAYERS)
    assert _nnx_sqnr(model, qmodel, nnx_data) > 20.0  # measured 26.9 dB (all int4)


# ------------------------------------------------------------------------ NNX + orbax


@pytest.mark.slow
def test_nnx_state_restores_into_nnx_update(tmp_path, nnx_data):
    """The issue: nnx.update(model, restore(path)) succeeded, then the call raised
    KeyError: Ellipsis (each variable got {"value": array} as its value)."""
    model = _nnx_net(0)
    x, m = nnx_data[0]
    _call(model, x, m)  # a training step: batch statistics and the dropout RNG move
    jq.orbax.save(tmp_path / "c", nnx.state(model))
    restored = jq.orbax.restore(tmp_path / "c")
    assert isinstance(restored["bn"]["mean"], jax.Array)  # values, as nnx.to_pure_dict
    other = _nnx_net(1)
    nnx.update(other, restored)
    pairs = zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(other)), strict=True)
    for a, b in pairs:
        assert a.dtype == b.dtype
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(a, b)
    want = _call(model, x, m, deterministic=True)
    np.testing.assert_array_equal(_call(other, x, m, deterministic=True), want)

    # With a target (concrete or abstract): an nnx.State of the target's variables.
    for target in (nnx.state(_nnx_net(2)), jax.eval_shape(lambda: nnx.state(_nnx_net(2)))):
        state = jq.orbax.restore(tmp_path / "c", target)
        assert isinstance(state, nnx.State)
        assert isinstance(state["bn"]["mean"], nnx.BatchStat)
        third = _nnx_net(3)
        nnx.update(third, state)
        np.testing.assert_array_equal(_call(third, x, m, deterministic=True), want)
    # A training step of both: same batch statistics, same dropout keys.
    np.testing.assert_array_equal(_call(other, x, m), _call(model, x, m))


@pytest.mark.slow
def test_converted_nnx_state_restores_into_a_converted_model(tmp_path, nnx_data):
    rules = Rule(".*", weight=jq.QuantSpec("int4", jq.per_channel(-1)))
    model = convert(quantize_model(_nnx_net(0), rules))
    jq.orbax.save(tmp_path / "c", nnx.state(model))
    other = convert(quantize_model(_nnx_net(1), rules))
    nnx.update(other, jq.orbax.restore(tmp_path / "c"))
    for name in NNX_LAYERS:
        got, want = getattr(other, name).kernel[...], getattr(model, name).kernel[...]
        assert isinstance(got, jq.QArray) and got.spec == want.spec
        np.testing.assert_array_equal(got.values, want.values)
    x, m = nnx_data[0]
    np.testing.assert_array_equal(
        _call(other, x, m, deterministic=True), _call(model, x, m, deterministic=True)
    )


@pytest.mark.slow
def test_nnx_state_saved_before_variables_were_recorded_warns_and_restores_with_target(
    tmp_path, monkeypatch
):
    """A checkpoint written before save recorded nnx.Variables (they were anonymous
    containers with one attribute ``value``): restore without a target says what to do."""
    model = _nnx_net(0)
    with monkeypatch.context() as mp:
        mp.setattr(checkpoint, "_variable_type", lambda x: None)
        jq.orbax.save(tmp_path / "old", nnx.state(model, nnx.Param))
    with pytest.warns(UserWarning, match=r"'value'.*target=nnx\.state\(model\)"):
        boxed = jq.orbax.restore(tmp_path / "old")
    assert set(boxed["head"]["kernel"]) == {"value"}
    state = jq.orbax.restore(tmp_path / "old", nnx.state(_nnx_net(1), nnx.Param))
    other = _nnx_net(1)
    nnx.update(other, state)
    np.testing.assert_array_equal(other.head.kernel[...], model.head.kernel[...])
    # A new save of the same state restores without a warning.
    jq.orbax.save(tmp_path / "new", state)
    assert jq.orbax.restore(tmp_path / "new")["head"]["kernel"].shape == (16, 10)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_prng_keys_round_trip(tmp_path, impl):
    keys = jax.random.split(jax.random.key(3, impl=impl), 5).reshape(5, 1)
    jq.orbax.save(tmp_path / "c", {"k": keys, "n": jnp.uint32(7)})
    entry = jq.orbax.layout(tmp_path / "c")["leaves"][0]
    assert (entry["kind"], entry["impl"], entry["shape"]) == ("key", impl, [5, 1])
    like = {"k": keys, "n": jnp.uint32(0)}
    for target in (None, like, jax.eval_shape(lambda: like)):
        got = jq.orbax.restore(tmp_path / "c", target)["k"]
        assert got.dtype == keys.dtype and got.shape == (5, 1)
        np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(keys))
    with pytest.raises(ValueError, match=r"target leaf 'k' .* PRNG keys"):
        jq.orbax.restore(tmp_path / "c", {"k": jnp.zeros((5, 1)), "n": jnp.uint32(0)})
    other = jax.random.split(jax.random.key(0, impl="unsafe_rbg" if impl == "rbg" else "rbg"), 5)
    with pytest.raises(ValueError, match=r"target leaf 'k' .* PRNG keys"):
        jq.orbax.restore(tmp_path / "c", {"k": other.reshape(5, 1), "n": jnp.uint32(0)})


def test_prng_key_data_is_checked_against_its_implementation(tmp_path):
    jq.orbax.save(tmp_path / "c", {"k": jax.random.key(0)})
    path = os.path.join(tmp_path, "c", "jaxquant.json")
    manifest = jq.orbax.layout(tmp_path / "c")
    manifest["leaves"][0]["impl"] = "rbg"  # 4 words per key, the data has 2
    manifest["manifest_sha256"] = checkpoint._seal(manifest)
    with open(path, "w") as f:
        json.dump(manifest, f)
    with pytest.raises(ValueError, match=r"malformed at leaf 0 .*implementation and shape"):
        jq.orbax.restore(tmp_path / "c")
