"""Post-training quantization acceptance on digits, with ``benchmarks/ptq_digits.py``'s code.

A fast version of the benchmark (3 seeds, smaller training, fewer methods; the full sweep
and its numbers are in ``benchmarks/results/ptq_digits.json`` and ``accuracy.md``). Float
models are trained, then every method runs the real serving pipeline (``quantize_model``
-> ``calibrate`` on training batches -> ``quantize_model(cal.rules)`` -> ``convert`` ->
``apply`` on the converted params) and the issue's acceptance criteria are checked on the
means over seeds, with the benchmark's own ``criteria``:

* w8a8 (int8 per-channel weights, static int8 activations) within 0.5 point of float (MLP
  and CNN);
* int4 weight-only in groups of 32 within 2 points of float (MLP and CNN);
* int4 per channel beats per tensor in weight reconstruction error (every seed) and in
  the SQNR of the logits (mean; MLP);
* percentile / MSE calibration of int4 and int6 static activations at least as good as
  absmax (MLP; the CNN at int4);
* NF4 beats int4 (groups of 32) on normally distributed weights.

Not asserted, because on these models they do not hold (benchmarks/results/accuracy.md):
NF4 beating int4 in reconstruction error on the *trained* weights (flatter than normal:
Flax's default init is a normal truncated at 2 std, and the short training keeps that
shape), and int4 per-channel accuracy beating (or matching) per-tensor (at int4 the task
saturates: both are within one or two test images of float).

The PTQ pipeline runs under the suite's strict dtype promotion; the benchmark trains under
``jax.numpy_dtype_promotion("standard")`` (optax's Adam is not strict-clean).
"""

import functools
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SEEDS = 3
ACT_CALS = ("absmax", "p99.9", "mse")


@functools.cache
def _bench():
    """Import benchmarks/ptq_digits.py (benchmarks/ is not a package)."""
    for p in (ROOT, ROOT / "benchmarks"):
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))
    spec = importlib.util.spec_from_file_location(
        "benchmarks.ptq_digits", ROOT / "benchmarks" / "ptq_digits.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _config():
    b = _bench()
    cfg = b.config(b.qd._parser("", b.NAME, b.METHODS).parse_args(["--quick"]))
    cfg.update(
        mlp_hidden=[256, 256],
        mlp_epochs=15,
        mlp_lr=2e-3,
        cnn_channels=[32, 32],
        cnn_epochs=5,
        cnn_lr=3e-3,
        n_train=None,
        calib_batches=2,
        calib_batch=128,
    )
    return cfg


# Fewer methods than the benchmark (time): int5 activations lie between int4 and int6, and
# the CNN checks the served conv path (int8 weights and activations, groups of 32, static
# int4 conv activations).
_METHODS = {
    "mlp": (
        "float",
        "w8a8",
        "w4_g32",
        "int4_channel",
        "int4_tensor",
        *(f"a{b}_{c}" for b in (4, 6) for c in ACT_CALS),
    ),
    "cnn": ("float", "w8a8", "w4_g32", "a4_absmax", "a4_p99.9"),
}


@functools.cache
def _results(kind):
    b = _bench()
    cfg = _config()
    data = b.qd.load_data(cfg["n_train"])
    return b.run_model(kind, SEEDS, _METHODS[kind], cfg, data, check_fake=False)


def _criterion(crit, name):
    c = crit[name]
    assert c is not None, f"{name}: not measured"
    return c


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_ptq_acceptance(kind):
    b = _bench()
    res = _results(kind)
    for m, r in res.items():
        assert "mean" in r, f"{kind} {m} failed: {r.get('error')}"
        assert r["n"] == SEEDS
    # every Conv / Dense of the model was quantized and converted
    layers = b.layer_names(kind, _config())
    for m, r in res.items():
        if m == "float":
            continue
        for run in r["runs"]:
            assert [q.split(" ")[0] for q in run["quantized_layers"]] == layers, (m, run)
            assert set(run["weight_rel_err_layers"]) == set(layers), (m, run)
    assert res["float"]["mean"]["test_acc"] > 90.0  # chance is 10 %
    crit = b.criteria({kind: res})[kind]
    msg = f"{kind}: {{}}"
    for name in ("w8a8 within 0.5 point of float", "w4 groups of 32 within 2 points of float"):
        c = _criterion(crit, name)
        assert c["met"], msg.format(f"{name}: {c}")
    # int4 per channel vs per tensor: the weights on every seed, the logits on average
    if "int4_channel" in res:
        pairs = zip(res["int4_channel"]["runs"], res["int4_tensor"]["runs"], strict=True)
        for ch, te in pairs:
            assert ch["weight_rel_err"] < 0.9 * te["weight_rel_err"], (ch, te)
        c = _criterion(crit, "int4 per channel better than per tensor (logit SQNR)")
        assert c["met"], msg.format(c)
    # static activation calibration at <= 6 bits: percentile or MSE >= absmax (mean acc)
    for bits in (4, 5, 6):
        name = f"percentile or mse >= absmax at int{bits} activations (test acc)"
        if f"a{bits}_absmax" not in res:
            continue
        c = _criterion(crit, name)
        assert c["met"], msg.format(f"{name}: {c}")
    # at int4 clipping is far ahead: absmax spends the grid on a few outlier pixels
    a4 = {c: res[f"a4_{c}"]["mean"]["test_acc"] for c in ACT_CALS if f"a4_{c}" in res}
    assert min(v for c, v in a4.items() if c != "absmax") > a4["absmax"] + 10.0, a4


def test_nf4_beats_int4_on_normal_weights():
    """The NF4 grid (quantiles of a normal) beats the uniform int4 grid, groups of 32, on
    normal and heavier-tailed weights; the uniform grid wins on flat distributions."""
    ctrl = _bench().grid_control((256, 256), seed=0)
    err = {k: v["weight_rel_err"] for k, v in ctrl.items()}
    assert err["normal"]["nf4"] < 0.9 * err["normal"]["int4"], err
    assert err["laplace"]["nf4"] < 0.9 * err["laplace"]["int4"], err
    assert err["uniform"]["int4"] < 0.9 * err["uniform"]["nf4"], err
    assert abs(ctrl["normal"]["excess_kurtosis"]) < 0.1, ctrl
    assert np.isclose(ctrl["uniform"]["excess_kurtosis"], -1.2, atol=0.05), ctrl
