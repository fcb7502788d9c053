"""Gupta et al. 2015, "Deep Learning with Limited Numerical Precision" (arXiv:1502.02551),
Fig. 2: training with 16-bit fixed-point parameters (word length 16, FL fractional bits)
stalls with round-to-nearest and matches float32 with stochastic rounding.

A digits MLP 64-128-10 (scikit-learn's bundled digits, 75/25 stratified split,
standardized) is trained with plain SGD (mini-batches of 32, learning rate ``LR``). In the
fixed-point arms every weight and bias is held in int16 fixed point with a *fixed* scale
2^-FL (``jq.QuantSpec("int16", calibration=None, rounding=...)`` with ``scale=2**-FL``;
range +-2^(15-FL)): after every SGD update the float32 sum ``w - lr * g`` is rounded
back to the fixed-point grid, either to nearest (``rounding="nearest"``) or stochastically
(``rounding="stochastic"``, a fresh key every step). The pass criterion uses FL = 8
(<IL=8, FL=8>, LSB 2^-8): with SGD at lr 0.01 on digits most updates are below half of
that LSB, so round-to-nearest returns the old weight while stochastic rounding keeps them
in expectation -- the regime of the paper's FL = 14 on MNIST (what matters is the update
size relative to the LSB, not FL itself). The full mode also sweeps FL = 10, 12, 14.

Run: ``python papers/stochastic_rounding/reproduce.py [--fast]``.
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

import jaxquant as jq  # noqa: E402
from jaxquant.app.datasets import digits  # noqa: E402

FL = 8  # fractional bits of the pass criterion: <IL=8, FL=8>, LSB = 2^-8
SWEEP_FL = (10, 12, 14)  # full mode: also these (RN gap shrinks as the LSB does)
LR = 0.01
BATCH = 32
HIDDEN = 128
ARMS = ("float32", "fixed16_nearest", "fixed16_stochastic")
PAPER = {  # Fig. 2 (MNIST, fully connected DNN), qualitative: curves, no table
    "float32": "float32 baseline",
    "fixed16_nearest": "<16, 14> round to nearest: stalls, error far above float",
    "fixed16_stochastic": "<16, 14> stochastic rounding: matches float",
}


def init_mlp(key: jax.Array, sizes: tuple[int, ...]) -> list[dict[str, jax.Array]]:
    params = []
    keys = jax.random.split(key, len(sizes) - 1)
    for k, (a, b) in zip(keys, itertools.pairwise(sizes), strict=True):
        w = jax.random.normal(k, (a, b), jnp.float32) / np.float32(np.sqrt(a))
        params.append({"w": w, "b": jnp.zeros((b,), jnp.float32)})
    return params


def mlp(params: list[dict[str, jax.Array]], x: jax.Array) -> jax.Array:
    for i, layer in enumerate(params):
        x = x @ layer["w"] + layer["b"][None]
        if i < len(params) - 1:
            x = jax.nn.relu(x)
    return x


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def make_run(arm: str, steps: int, fl: int = FL):
    spec = None
    if arm != "float32":
        rounding = "stochastic" if arm.endswith("stochastic") else "nearest"
        spec = jq.QuantSpec("int16", calibration=None, rounding=rounding)
    scale = jnp.float32(2.0**-fl)

    def to_fixed(tree, key):
        if spec is None:
            return tree
        leaves, treedef = jax.tree.flatten(tree)
        out = [
            jq.fake_quant(
                p, spec, scale=scale, key=jax.random.fold_in(key, i) if spec.stochastic else None
            )
            for i, p in enumerate(leaves)
        ]
        return jax.tree.unflatten(treedef, out)

    def run(params, x, y, key):
        batch_key, round_key = jax.random.split(key)
        params = to_fixed(params, jax.random.fold_in(round_key, steps))
        idx = jax.vmap(lambda k: jax.random.permutation(k, x.shape[0])[:BATCH])(
            jax.random.split(batch_key, steps)
        )

        def step(params, inp):
            i, ib = inp
            g = jax.grad(lambda p: cross_entropy(mlp(p, x[ib]), y[ib]))(params)
            new = jax.tree.map(lambda p, g: p - jnp.float32(LR) * g, params, g)
            new = to_fixed(new, jax.random.fold_in(round_key, i))
            changed = sum(
                jnp.sum(a != b)
                for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params), strict=True)
            )
            return new, changed

        params, changed = jax.lax.scan(step, params, (jnp.arange(steps), idx))
        return params, changed

    return jax.jit(run)


def main(fast: bool = False) -> dict[str, Any]:
    seeds = 1 if fast else 3
    steps = 500 if fast else 3000
    data = digits()
    x, y = jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"])
    xt, yt = jnp.asarray(data["x_test"]), jnp.asarray(data["y_test"])
    sizes = (64, HIDDEN, 10)
    n_params = sum(a * b + b for a, b in itertools.pairwise(sizes))
    acc_fn = jax.jit(lambda p, x, y: jnp.mean((jnp.argmax(mlp(p, x), -1) == y).astype(jnp.float32)))
    t0 = time.perf_counter()
    res: dict[str, Any] = {"seeds": seeds, "steps": steps, "lr": LR, "fl": FL}

    def arm_result(arm: str, fl: int) -> dict[str, Any]:
        run = make_run(arm, steps, fl)
        accs, frozen = [], []
        for seed in range(seeds):
            pkey, dkey = jax.random.split(jax.random.key(seed))
            params, changed = run(init_mlp(pkey, sizes), x, y, dkey)
            accs.append(100.0 * float(acc_fn(params, xt, yt)))
            # fraction of parameters left unchanged per step, over the last 10% of steps
            tail = np.asarray(changed)[-max(1, steps // 10) :]
            frozen.append(1.0 - float(tail.mean()) / n_params)
        return {
            "test_acc": float(np.mean(accs)),
            "test_acc_seeds": accs,
            "unchanged_per_step": float(np.mean(frozen)),
        }

    for arm in ARMS:
        res[arm] = arm_result(arm, FL)
    res["sweep"] = {}
    for fl in () if fast else SWEEP_FL:
        res["sweep"][fl] = {arm: arm_result(arm, fl)["test_acc"] for arm in ARMS[1:]}
    f32 = res["float32"]["test_acc"]
    sr = res["fixed16_stochastic"]["test_acc"]
    rn = res["fixed16_nearest"]["test_acc"]
    res["sr_gap"] = f32 - sr
    res["rn_gap"] = f32 - rn
    res["criterion"] = (
        "mean over seeds: float32 - SR <= 1.5 points and float32 - RN >= 10 points "
        f"(<IL={16 - FL}, FL={FL}> int16 weights and biases, SGD lr={LR})"
    )
    res["passed"] = bool(res["sr_gap"] <= 1.5 and res["rn_gap"] >= 10.0)
    res["seconds"] = time.perf_counter() - t0
    return res


def markdown(res: dict[str, Any]) -> str:
    lines = [
        f"Digits MLP 64-{HIDDEN}-10, SGD lr={res['lr']}, batch {BATCH}, {res['steps']} steps, "
        f"{res['seeds']} seeds; fixed point <IL={16 - res['fl']}, FL={res['fl']}> "
        f"(int16, scale 2^-{res['fl']})",
        "",
        "| arm | test acc % (mean) | per seed | params unchanged per step (last 10%) "
        "| paper (Fig. 2, MNIST FC) |",
        "|---|---|---|---|---|",
    ]
    for arm in ARMS:
        r = res[arm]
        seeds = ", ".join(f"{a:.2f}" for a in r["test_acc_seeds"])
        lines.append(
            f"| {arm} | {r['test_acc']:.2f} | {seeds} | {r['unchanged_per_step']:.3f} "
            f"| {PAPER[arm]} |"
        )
    if res["sweep"]:
        lines += [
            "",
            f"Other FL (same seeds and steps; float32 {res['float32']['test_acc']:.2f}):",
            "",
            "| FL | LSB | nearest | stochastic |",
            "|---|---|---|---|",
        ]
        for fl, r in res["sweep"].items():
            lines.append(
                f"| {fl} | 2^-{fl} | {r['fixed16_nearest']:.2f} | {r['fixed16_stochastic']:.2f} |"
            )
    lines += [
        "",
        f"Criterion: {res['criterion']}; SR gap {res['sr_gap']:+.2f}, RN gap "
        f"{res['rn_gap']:+.2f} -> **{'pass' if res['passed'] else 'FAIL'}** "
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
