"""Micikevicius et al. 2018, "Mixed Precision Training" (arXiv:1710.03740), Fig. 3 and
Section 3.2: activation-gradient values below fp16's smallest subnormal (2^-24) flush to
zero; scaling the loss by 2^k shifts them into range, and fp16 training with loss scaling
matches float32.

Setup: a digits MLP 64-128-128-10 (scikit-learn's bundled digits, 75/25 stratified split,
standardized), Adam 1e-3, mini-batches of 64. The objective is ``C * cross_entropy`` with a
small constant ``C = 2^-20`` (standing for a loss normalised by a large count, as in
benchmarks/results/accuracy.md's fp16 experiment): Adam is invariant to ``C`` in float32,
but every gradient is ``C`` times smaller, so underflow becomes visible on a network whose
natural gradients would fit fp16.

1. Histogram. A float32 model is trained for ``HIST_STEPS`` (200) steps; then the activation
   gradients ``dL/dz`` (``z`` = each layer's pre-activation, collected with zero
   perturbations added to ``z``) of one training batch of 512 are taken in float32 and the
   distribution of ``log2|g|`` over the non-zero values is reported, with the fractions
   that become zero in fp16 (``|g| < 2^-24``), that are fp16 subnormal
   (``2^-24 <= |g| < 2^-14``) and that overflow (``|g| > 65504``) when the loss is scaled
   by ``2^k``.
2. Training. The same MLP trained from the same initialisation and batches in three arms:
   ``fp32``; ``fp16`` (parameters and inputs cast to fp16 for the forward and backward,
   the loss in float32 from the fp16 logits, float32 master weights and Adam state, no
   scaling); ``fp16_loss_scale``: ``jq.optax.dynamic_loss_scale(adam)`` differentiating
   ``jq.optax.scale_loss``.

Run: ``python papers/loss_scaling/reproduce.py [--fast]``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as `python papers/<name>/reproduce.py`
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxquant.optax as jqo  # noqa: E402
from jaxquant.app.datasets import digits  # noqa: E402

COEF_LOG2 = -20
SIZES = (64, 128, 128, 10)
BATCH = 64
LR = 1e-3
SCALES_LOG2 = (0, 3, 8, 12, 16, 20, 24, 28)
HIST_STEPS = 200  # the histogram is taken during training, after this many fp32 steps
FP16_TINY = 2.0**-24  # smallest subnormal
FP16_MIN_NORMAL = 2.0**-14
FP16_MAX = 65504.0
ARMS = ("fp32", "fp16", "fp16_loss_scale")


def init_mlp(key: jax.Array) -> list[dict[str, jax.Array]]:
    params = []
    for k, a, b in zip(jax.random.split(key, len(SIZES) - 1), SIZES[:-1], SIZES[1:], strict=False):
        w = jax.random.normal(k, (a, b), jnp.float32) / np.float32(np.sqrt(a))
        params.append({"w": w, "b": jnp.zeros((b,), jnp.float32)})
    return params


def mlp(params, x, perturb=None):
    """The MLP; ``perturb[i]`` (zeros) is added to layer ``i``'s pre-activation so that its
    gradient is the activation gradient ``dL/dz_i``."""
    for i, layer in enumerate(params):
        x = x @ layer["w"] + layer["b"][None]
        if perturb is not None:
            x = x + perturb[i]
        if i < len(params) - 1:
            x = jax.nn.relu(x)
    return x


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def make_run(arm: str, steps: int, coef: float):
    dtype = jnp.float32 if arm == "fp32" else jnp.float16
    adam = optax.adam(LR)
    tx = (
        jqo.dynamic_loss_scale(adam, initial_scale=2.0**15, growth_interval=100)
        if arm == "fp16_loss_scale"
        else adam
    )

    def run(params, x, y, key):
        opt_state = tx.init(params)
        idx = jax.vmap(lambda k: jax.random.permutation(k, x.shape[0])[:BATCH])(
            jax.random.split(key, steps)
        )

        def step(carry, ib):
            params, opt_state = carry

            def loss_fn(p):
                p = jax.tree.map(lambda a: a.astype(dtype), p)
                loss = jnp.float32(coef) * cross_entropy(mlp(p, x[ib].astype(dtype)), y[ib])
                if arm == "fp16_loss_scale":
                    loss = jqo.scale_loss(loss, opt_state)
                return loss

            g = jax.grad(loss_fn)(params)
            zeros = sum(jnp.sum(a == 0) for a in jax.tree.leaves(g))
            updates, opt_state = tx.update(g, opt_state, params)
            params = optax.apply_updates(params, updates)
            scale = opt_state.scale if arm == "fp16_loss_scale" else jnp.float32(1.0)
            return (params, opt_state), (zeros, scale)

        (params, _), (zeros, scale) = jax.lax.scan(step, (params, opt_state), idx)
        return params, zeros, scale

    return jax.jit(run)


def activation_gradients(params, x, y, coef: float) -> np.ndarray:
    """float32 ``dL/dz`` of every layer for ``L = coef * CE``, concatenated."""
    perturb = [jnp.zeros((x.shape[0], n), jnp.float32) for n in SIZES[1:]]
    g = jax.grad(lambda e: jnp.float32(coef) * cross_entropy(mlp(params, x, e), y))(perturb)
    return np.concatenate([np.asarray(a).ravel() for a in g])


def underflow_table(g: np.ndarray) -> dict[int, dict[str, float]]:
    a = np.abs(g[g != 0]).astype(np.float64)
    out = {}
    for k in SCALES_LOG2:
        s = a * 2.0**k
        out[k] = {
            "zero_in_fp16": float(np.mean(s < FP16_TINY)),
            "subnormal": float(np.mean((s >= FP16_TINY) & (s < FP16_MIN_NORMAL))),
            "overflow": float(np.mean(s > FP16_MAX)),
        }
    return out


def main(fast: bool = False) -> dict[str, Any]:
    seeds = 1 if fast else 3
    steps = 200 if fast else 1500
    coef = 2.0**COEF_LOG2
    t0 = time.perf_counter()
    data = digits()
    x, y = jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"])
    xt, yt = jnp.asarray(data["x_test"]), jnp.asarray(data["y_test"])
    n_params = sum(a * b + b for a, b in itertools.pairwise(SIZES))
    acc_fn = jax.jit(lambda p, x, y: jnp.mean((jnp.argmax(mlp(p, x), -1) == y).astype(jnp.float32)))
    res: dict[str, Any] = {"seeds": seeds, "steps": steps, "coef_log2": COEF_LOG2}
    trained = {}
    for arm in ARMS:
        run = make_run(arm, steps, coef)
        accs, zero_frac, scales = [], [], []
        for seed in range(seeds):
            pkey, dkey = jax.random.split(jax.random.key(seed))
            params, zeros, scale = run(init_mlp(pkey), x, y, dkey)
            accs.append(100.0 * float(acc_fn(params, xt, yt)))
            zero_frac.append(float(np.mean(np.asarray(zeros))) / n_params)
            scales.append(float(np.asarray(scale)[-1]))
            if arm == "fp32" and seed == 0:
                trained = (
                    params
                    if steps == HIST_STEPS
                    else make_run("fp32", HIST_STEPS, coef)(init_mlp(pkey), x, y, dkey)[0]
                )
        res[arm] = {
            "test_acc": float(np.mean(accs)),
            "test_acc_seeds": accs,
            "zero_weight_grad_fraction": float(np.mean(zero_frac)),
            "final_loss_scale": scales,
        }
    # Histogram of the float32 model's activation gradients after HIST_STEPS steps
    # (seed 0, one batch of 512 training images).
    ib = np.random.default_rng(0).permutation(x.shape[0])[:512]
    g = activation_gradients(trained, x[ib], y[ib], coef)
    nz = np.abs(g[g != 0])
    res["act_grad_nonzero"] = int(nz.size)
    res["act_grad_exact_zero_fraction"] = float(np.mean(g == 0))  # ReLU-killed
    hist, edges = np.histogram(np.log2(nz), bins=np.arange(-60, 1, 4))
    res["log2_hist"] = {
        f"[{int(a)},{int(b)})": int(h)
        for a, b, h in zip(edges[:-1], edges[1:], hist, strict=True)
        if h
    }
    res["underflow"] = underflow_table(g)
    # The natural objective (C = 1) of the same model: the paper's regime.
    g1 = activation_gradients(trained, x[ib], y[ib], 1.0)
    res["underflow_c1"] = underflow_table(g1)
    ok = [
        k for k, v in res["underflow"].items() if v["zero_in_fp16"] < 0.01 and v["overflow"] == 0.0
    ]
    res["chosen_scale_log2"] = ok[0] if ok else None
    u0 = res["underflow"][0]["zero_in_fp16"]
    uk = res["underflow"][ok[0]]["zero_in_fp16"] if ok else 1.0
    gap = res["fp32"]["test_acc"] - res["fp16_loss_scale"]["test_acc"]
    nogap = res["fp32"]["test_acc"] - res["fp16"]["test_acc"]
    res["ls_gap"], res["fp16_gap"] = gap, nogap
    res["criterion"] = (
        f"C=2^{COEF_LOG2}: fraction of non-zero activation gradients that flush to zero in "
        "fp16 > 50% unscaled and < 1% (no overflow) at some scale 2^k in "
        f"{list(SCALES_LOG2)}; fp32 - fp16_loss_scale test acc <= 1 point; "
        "fp32 - fp16 (unscaled) >= 10 points"
    )
    res["passed"] = bool(u0 > 0.5 and uk < 0.01 and gap <= 1.0 and nogap >= 10.0)
    res["seconds"] = time.perf_counter() - t0
    return res


def markdown(res: dict[str, Any]) -> str:
    n = res["act_grad_nonzero"]
    lines = [
        f"Digits MLP {'-'.join(map(str, SIZES))}, objective 2^{res['coef_log2']} x CE, "
        f"Adam {LR}, batch {BATCH}, {res['steps']} steps, {res['seeds']} seed(s).",
        "",
        f"Activation gradients of the fp32 model after {HIST_STEPS} steps "
        f"(one batch of 512; {n} non-zero "
        f"values, {100 * res['act_grad_exact_zero_fraction']:.1f}% exact zeros from ReLU "
        "excluded), fractions of the non-zero values:",
        "",
        "| loss scale | zero in fp16 (< 2^-24) | fp16 subnormal | overflow (> 65504) |",
        "|---|---|---|---|",
    ]
    for k, v in res["underflow"].items():
        lines.append(
            f"| 2^{k} | {100 * v['zero_in_fp16']:.2f}% | {100 * v['subnormal']:.2f}% "
            f"| {100 * v['overflow']:.2f}% |"
        )
    lines += [
        "",
        "The same model's natural objective (C = 1):",
        "",
        "| loss scale | zero in fp16 | fp16 subnormal | overflow |",
        "|---|---|---|---|",
    ]
    for k, v in res["underflow_c1"].items():
        lines.append(
            f"| 2^{k} | {100 * v['zero_in_fp16']:.2f}% | {100 * v['subnormal']:.2f}% "
            f"| {100 * v['overflow']:.2f}% |"
        )
    lines += [
        "",
        "log2|g| histogram, C = 2^-20 (bins of 4): "
        + ", ".join(f"{k}: {v}" for k, v in res["log2_hist"].items()),
        "",
        "| arm | test acc % (mean) | per seed | zero weight-grad fraction | final loss scale |",
        "|---|---|---|---|---|",
    ]
    for arm in ARMS:
        r = res[arm]
        sc = (
            ", ".join(f"2^{int(np.log2(s))}" for s in r["final_loss_scale"])
            if arm == "fp16_loss_scale"
            else ""
        )
        lines.append(
            f"| {arm} | {r['test_acc']:.2f} | "
            f"{', '.join(f'{a:.2f}' for a in r['test_acc_seeds'])} | "
            f"{r['zero_weight_grad_fraction']:.3f} | {sc} |"
        )
    lines += [
        "",
        f"Criterion: {res['criterion']}; chosen scale 2^{res['chosen_scale_log2']}, "
        f"fp32 - fp16_loss_scale {res['ls_gap']:+.2f}, fp32 - fp16 "
        f"{res['fp16_gap']:+.2f} -> **{'pass' if res['passed'] else 'FAIL'}** "
        f"({res['seconds']:.1f} s)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--fast", action="store_true")
    args = ap.parse_args()
    with jax.numpy_dtype_promotion("standard"):
        out = main(fast=args.fast)
    print(markdown(out))
    sys.exit(0 if out["passed"] else 1)
