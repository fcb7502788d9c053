"""End-to-end quantized training with the accuracy benchmarks' own code (benchmarks/).

* digits (Linen): a short int8 QAT run under ``jax.jit`` learns, stays close to float,
  and really is quantized (``jq.flax.report`` and a hand-written fake-quant forward);
* data parallel: the same jitted train step on 8 CPU devices (batch sharded over a
  ``"data"`` mesh axis, parameters replicated) computes what it computes on one device;
* the byte-level transformer LM (NNX) of ``qat_lm.py`` trains with a stateful recipe.

optax's Adam does not trace under strict dtype promotion (optax 0.2.8), so the training
loops that use it run under ``jax.numpy_dtype_promotion("standard")``; the checks of the
quantized forward pass run strict.
"""

import functools
import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxquant as jq
from jaxquant.flax import quantize_model, report

ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def _bench(name):
    """Import benchmarks/<name>.py (benchmarks/ is not a package)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location(
        f"benchmarks.{name}", ROOT / "benchmarks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- digits


@functools.cache
def _digits_data():
    return _bench("qat_digits").load_data(n_train=512)


def _train_digits(method, seed=0):
    d = _bench("qat_digits")
    data = _digits_data()
    cfg = {"batch": 64, "epochs": 12, "lr": 3e-3, "steps": 12 * 8, "group_size": 32}
    model = d.MLP((128, 128), 10)
    rules = d.method_rules(method, cfg["group_size"], 3)
    if rules is not None:
        model = quantize_model(model, rules)
    tx = d.method_optimizer(method, cfg)
    x, y = jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"])
    with jax.numpy_dtype_promotion("standard"):
        params, state = d.split_variables(model.init(jax.random.key(seed), x[:1]))
        train = d.make_trainer(model, tx, cfg)
        params, state, _, losses = train(params, state, tx.init(params), x, y, jax.random.key(1))
    logits = jax.jit(model.apply)({"params": params}, jnp.asarray(data["x_test"]))
    acc = jnp.mean(jnp.argmax(logits, axis=-1) == jnp.asarray(data["y_test"]))
    return model, params, logits, float(acc), np.asarray(losses)


@jax.jit
def _manual_w8a8(params, x):
    """The w8a8_int8 MLP by hand: int8 per-token activations, int8 per-output-channel
    weights, fake-quantized, float dots."""
    recipe = jq.recipes.get("w8a8_int8")
    for i in range(3):
        if i:
            x = jax.nn.relu(x)
        k, b = params[f"Dense_{i}"]["kernel"], params[f"Dense_{i}"]["bias"]
        xq, kq = jq.fake_quant(x, recipe.act), jq.fake_quant(k, recipe.weight)
        x = jnp.dot(xq, kq, precision="highest") + b[None, :]
    return x


def test_digits_int8_qat_learns_and_is_quantized():
    _, _, _, acc_f, _ = _train_digits("float")
    qmodel, params, logits, acc_q, losses = _train_digits("w8a8_int8")
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.25 * losses[0], losses
    assert acc_q > 0.85, acc_q  # chance is 0.10
    assert abs(acc_q - acc_f) <= 0.04, (acc_q, acc_f)
    rule = jq.recipes.get("w8a8_int8").rules()[0]
    assert [(m.path, m.module, m.rule) for m in report(qmodel)] == [
        (f"Dense_{i}", "Dense", rule) for i in range(3)
    ]
    # The trained QAT model computes the fake-quantized forward, not the float one.
    x = jnp.asarray(_digits_data()["x_test"])
    np.testing.assert_allclose(
        np.asarray(logits), np.asarray(_manual_w8a8(params, x)), rtol=1e-4, atol=1e-4
    )
    float_logits = qmodel.module.apply({"params": params}, x)
    assert not np.allclose(np.asarray(logits), np.asarray(float_logits), atol=1e-3)


# -------------------------------------------------------------------- data parallel


def _mesh():
    devices = np.array(jax.devices())
    assert devices.size == 8, "tests/conftest.py should give 8 CPU devices"
    return Mesh(devices, ("data",))


@pytest.mark.parametrize("recipe", ["w8a8_int8", "fp8_current"])
def test_data_parallel_step_matches_single_device(recipe):
    d = _bench("qat_digits")
    data = _digits_data()
    model = quantize_model(d.MLP((64,), 10), jq.recipes.get(recipe).rules())
    x = jnp.asarray(data["x_train"][:64])
    y = jnp.asarray(data["y_train"][:64])
    params = model.init(jax.random.key(0), x[:1])["params"]
    opt = optax.sgd(0.1)

    @jax.jit
    def step(params, x, y):
        def loss_fn(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

        (loss, logits), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, _ = opt.update(g, opt.init(params))
        return optax.apply_updates(params, updates), loss, logits

    cpu0 = jax.devices()[0]
    ref = step(*jax.device_put((params, x, y), cpu0))

    mesh = _mesh()
    batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    new_params, loss, logits = step(
        jax.device_put(params, replicated), jax.device_put(x, batch), jax.device_put(y, batch)
    )
    assert logits.sharding.is_equivalent_to(batch, logits.ndim)
    assert loss.sharding.is_fully_replicated
    for leaf in jax.tree.leaves(new_params):
        assert leaf.sharding.is_equivalent_to(replicated, leaf.ndim)
    np.testing.assert_allclose(float(loss), float(ref[1]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref[2]), rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(ref[0]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------- LM


def test_lm_nnx_trains_with_delayed_fp8():
    lm = _bench("qat_lm")
    cfg = lm.config(type("Args", (), {"quick": True, "steps": 40})()) | {"layers": 1}
    corpus = lm.load_corpus(val_every=10, max_files=20)
    model = lm.build("fp8_delayed", 0, cfg)
    assert sorted(m.path for m in report(model)) == [
        f"blocks/{i}/{name}"
        for i in range(1)
        for name in ("attn/k", "attn/o", "attn/q", "attn/v", "mlp/fc1", "mlp/fc2")
    ]
    quant_state = lambda m: jax.tree.leaves(nnx.state(m, nnx.Not(nnx.Param)))
    before = [np.asarray(v) for v in quant_state(model)]
    assert before, "delayed scaling should keep state outside the params"
    with jax.numpy_dtype_promotion("standard"):
        opt = nnx.Optimizer(model, lm.optimizer(cfg), wrt=nnx.Param)
        graphdef, state = nnx.split((model, opt))
        train = lm.make_train_chunk(graphdef, cfg)
        state, losses = train(
            state, jnp.asarray(corpus["train"]), jax.random.key(0), jnp.arange(40)
        )
    losses = np.asarray(losses)
    assert np.all(np.isfinite(losses))
    assert losses[-5:].mean() < losses[:5].mean() - 1.0, losses  # from ~ln(256) = 5.5
    trained, _ = nnx.merge(graphdef, state)
    after = [np.asarray(v) for v in quant_state(trained)]
    assert any(not np.array_equal(a, b) for a, b in zip(after, before, strict=True))
    assert len(report(trained)) == 6  # still quantized after split / merge under jit
