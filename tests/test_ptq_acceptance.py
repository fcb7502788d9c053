"""Post-training quantization acceptance on digits: trained float models through the real
serving pipeline, with the issue's acceptance criteria on the means over seeds.

Per seed a float MLP and a float CNN (tests/digits_models.py) are trained, then every method
runs ``quantize_model`` -> ``calibrate`` on training batches -> ``quantize_model(cal.rules)``
-> ``convert`` -> ``apply`` on the converted params. Checked (benchmarks/ptq_digits.py runs
the full sweep; its numbers are in benchmarks/results/):

* w8a8 (int8 per-channel weights, static int8 activations) within 0.5 point of float (MLP
  and CNN);
* int4 weight-only in groups of 32 within 2 points of float (MLP and CNN);
* int4 per channel beats per tensor in weight reconstruction error (every seed) and in
  the SQNR of the logits (mean; MLP);
* percentile / MSE calibration of int4 and int6 static activations at least as good as
  absmax (MLP; the CNN at int4), and far ahead at int4 (absmax spends the grid on a few
  outlier pixels);
* NF4 beats int4 (groups of 32) on normally distributed weights.

Not asserted, because on these models they do not hold: NF4 beating int4 on the *trained*
weights (flatter than normal: Flax's default init is a normal truncated at 2 std, and short
training keeps that shape), and int4 per-channel accuracy beating per-tensor (at int4 the
task saturates: both are within one or two test images of float).

The PTQ pipeline runs under the suite's strict dtype promotion; training runs under
``jax.numpy_dtype_promotion("standard")`` (optax's Adam is not strict-clean).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from digits_models import CNN, MLP, accuracy, data, train

import jaxquant as jq
from jaxquant.flax import Rule, calibrate, convert, quantize_model, report

# The criteria are on means over seeds (one test image is 0.22 points). Two seeds: each
# margin is wider than the spread between seeds (measured over 3 seeds, MLP / CNN: w8a8
# 0.0 / -0.1 points from float against 0.5 allowed, w4_g32 0.1 / -0.1 against 2; int4 per
# channel's logit SQNR above per tensor's on every seed, by 0.3 to 1.6 dB; clipped int4
# activations 75 / 81 points above absmax against 10); a third seed compiled every
# quantized model again for no margin.
SEEDS = 2
GROUP = 32
ACT_CALS = {"absmax": jq.absmax(), "p99.9": jq.percentile(99.9), "mse": jq.mse()}
# int5 activations lie between int4 and int6; the CNN checks the served conv path (int8
# weights and activations, groups of 32, static int4 conv activations).
METHODS = {
    "mlp": (
        "w8a8",
        "w4_g32",
        "int4_channel",
        "int4_tensor",
        *(f"a{b}_{c}" for b in (4, 6) for c in ACT_CALS),
    ),
    "cnn": ("w8a8", "w4_g32", "a4_absmax", "a4_p99.9"),
}
MODELS = {
    # (model, epochs, learning rate): the accuracy benchmark's quick configuration
    "mlp": (MLP((256, 256)), 15, 2e-3),
    "cnn": (CNN((32, 32), 64), 5, 3e-3),
}
EVERY = r"(Conv|Dense)_\d+"


def _group_spec(fmt, layer, shape):
    """``fmt`` in groups of 32 along the kernel's contracted input axis (Dense ``(in, out)``:
    0, Conv ``(kh, kw, in, out)``: -2); a layer whose whole contraction has <= 32 values
    (Conv_0: 9) gets one group per output channel."""
    if int(np.prod(shape[:-1])) <= GROUP:
        return jq.QuantSpec(fmt, jq.per_channel(-1))
    return jq.QuantSpec(fmt, jq.per_block(0 if layer.startswith("Dense") else -2, GROUP))


def _rules(method, shapes):
    int8_pc = jq.QuantSpec("int8", jq.per_channel(-1))
    if method == "w8a8":
        return [Rule(EVERY, weight=int8_pc, act=jq.QuantSpec("int8"))]
    if method == "w4_g32":
        return [Rule(name, weight=_group_spec("int4", name, s)) for name, s in shapes.items()]
    if method.startswith("int4_"):
        g = jq.per_channel(-1) if method == "int4_channel" else jq.per_tensor()
        return [Rule(EVERY, weight=jq.QuantSpec("int4", g))]
    bits, cal = method[1:].split("_", 1)
    act = jq.QuantSpec(f"int{bits}", jq.per_tensor(), ACT_CALS[cal])
    return [Rule(EVERY, weight=int8_pc, act=act)]


def _sqnr_db(ref, x):
    ref, x = np.asarray(ref, np.float64), np.asarray(x, np.float64)
    return 10.0 * np.log10(np.sum(ref**2) / np.sum((x - ref) ** 2))


def _weight_err(variables, served):
    """``sum ||W - deq(Q)||^2 / sum ||W||^2`` over every converted kernel."""
    num = den = 0.0
    layers = []
    for name, layer in served["params"].items():
        k = layer.get("kernel")
        if isinstance(k, jq.QArray):
            w = np.asarray(variables["params"][name]["kernel"], np.float64)
            wq = np.asarray(jq.dequantize(k, jnp.float32), np.float64)
            num, den = num + np.sum((wq - w) ** 2), den + np.sum(w**2)
            layers.append(name)
    return num / den, layers


@functools.cache
def _results(kind):
    """Per method: the runs over seeds (test accuracy, logit SQNR, weight error, the
    quantized and converted layers)."""
    model, epochs, lr = MODELS[kind]
    d = data()
    batches = [jnp.asarray(d["x_train"][i * 128 : (i + 1) * 128]) for i in range(2)]
    xt = jnp.asarray(d["x_test"])
    runs = {m: [] for m in ("float", *METHODS[kind])}
    for seed in range(SEEDS):
        variables, losses = train(model, d, seed=seed, epochs=epochs, lr=lr)
        assert np.isfinite(losses).all(), losses
        ref = jax.jit(model.apply)(variables, xt)
        runs["float"].append({"test_acc": accuracy(ref, d["y_test"])})
        shapes = {k: v["kernel"].shape for k, v in variables["params"].items()}
        for method in METHODS[kind]:
            qm = quantize_model(model, _rules(method, shapes))
            cal = calibrate(qm, batches, variables)
            sm = quantize_model(model, cal.rules)
            jax.eval_shape(sm.init, jax.random.key(0), xt[:1])  # report() needs a first call
            served = convert(sm, variables)
            # Eagerly: the quantizer core is one cached jitted call per (spec, shape), so the
            # seeds after the first reuse it, where a jit of the model (static scales are
            # constants) would compile again for every seed and method.
            logits = sm.apply(served, xt)
            werr, converted = _weight_err(variables, served)
            runs[method].append(
                {
                    "test_acc": accuracy(logits, d["y_test"]),
                    "sqnr": _sqnr_db(ref, logits),
                    "weight_rel_err": werr,
                    "quantized": [m.path for m in report(sm)],
                    "converted": converted,
                }
            )
    return runs


def _mean(runs, key="test_acc"):
    return float(np.mean([r[key] for r in runs]))


@pytest.mark.slow  # trains SEEDS float models and serves ~10 quantized ones per seed
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_ptq_acceptance(kind):
    res = _results(kind)
    layers = list(_results(kind)["w8a8"][0]["converted"])
    # every Conv / Dense of the model was quantized and converted to a QArray
    expect = {"mlp": ["Dense_0", "Dense_1", "Dense_2"]}.get(
        kind, ["Conv_0", "Conv_1", "Dense_0", "Dense_1"]
    )
    assert sorted(layers) == expect
    for m in METHODS[kind]:
        for run in res[m]:
            assert run["quantized"] == expect and sorted(run["converted"]) == expect, (m, run)
    f = _mean(res["float"])
    assert f > 90.0, f  # chance is 10 %
    assert f - _mean(res["w8a8"]) <= 0.5, (f, res["w8a8"])
    assert f - _mean(res["w4_g32"]) <= 2.0, (f, res["w4_g32"])
    if kind == "mlp":
        # int4 per channel vs per tensor: the weights on every seed, the logits on average
        for ch, te in zip(res["int4_channel"], res["int4_tensor"], strict=True):
            assert ch["weight_rel_err"] < 0.9 * te["weight_rel_err"], (ch, te)
        assert _mean(res["int4_channel"], "sqnr") > _mean(res["int4_tensor"], "sqnr")
    # static activation calibration at <= 6 bits: percentile or MSE >= absmax (mean acc)
    for bits in (4, 6):
        acc = {c: _mean(res[f"a{bits}_{c}"]) for c in ACT_CALS if f"a{bits}_{c}" in res}
        if acc:
            assert max(v for c, v in acc.items() if c != "absmax") >= acc["absmax"], acc
    # at int4 clipping is far ahead: absmax spends the grid on a few outlier pixels
    a4 = {c: _mean(res[f"a4_{c}"]) for c in ACT_CALS if f"a4_{c}" in res}
    assert min(v for c, v in a4.items() if c != "absmax") > a4["absmax"] + 10.0, a4


def _truncated_normal(rng, shape, bound):
    out = rng.standard_normal(shape)
    while (bad := np.abs(out) > bound).any():
        out[bad] = rng.standard_normal(int(bad.sum()))
    return out


def _kurtosis(w):
    c = w.reshape(-1) - w.mean()
    return float(np.mean(c**4) / np.mean(c**2) ** 2 - 3.0)


@pytest.mark.parametrize(
    ("dist", "winner"),
    [("normal", "nf4"), ("laplace", "nf4"), ("uniform", "int4"), ("truncated_2std", None)],
)
def test_nf4_beats_int4_on_normal_weights(dist, winner):
    """The NF4 grid (quantiles of a normal) beats the uniform int4 grid, groups of 32, by
    10 % in relative error on normal and heavier-tailed weights; the uniform grid wins on
    flat distributions; a normal truncated at 2 std (Flax's init) sits between."""
    rng = np.random.default_rng(0)
    w = {
        "normal": lambda: rng.standard_normal((256, 256)),
        "laplace": lambda: rng.laplace(size=(256, 256)),
        "uniform": lambda: rng.uniform(-1.0, 1.0, (256, 256)),
        "truncated_2std": lambda: _truncated_normal(rng, (256, 256), 2.0),
    }[dist]()
    kurt = {"normal": 0.0, "laplace": 3.0, "uniform": -1.2, "truncated_2std": -0.64}[dist]
    assert abs(_kurtosis(w) - kurt) < 0.2, _kurtosis(w)  # the sample has its distribution's shape
    x = jnp.asarray(w, jnp.float32)
    err = {}
    for fmt in ("int4", "nf4"):
        xh = jq.dequantize(jq.quantize(x, jq.QuantSpec(fmt, jq.per_block(0, GROUP))))
        err[fmt] = float(jnp.sum(jnp.square(xh - x)) / jnp.sum(jnp.square(x)))
    if winner is not None:
        loser = "int4" if winner == "nf4" else "nf4"
        assert err[winner] < 0.9 * err[loser], err
    else:
        assert 0.9 < err["nf4"] / err["int4"] < 1.1 / 0.9, err
