"""Mixed-precision training: fp16 with dynamic loss scaling, bf16 parameters with
stochastic-rounded updates (``jaxquant.optax``), on the digits MLP of ``qat_digits.py``.

Both experiments train the Linen MLP 64-512-512-10 on scikit-learn's digits (same split
and standardization as ``qat_digits.py``) with Adam on random mini-batches of 64, jitted
(``lax.scan`` over the steps), for ``--seeds`` seeds; every arm of an experiment gets the
same initialisation, batches and optimizer.

**1. fp16 and loss scaling** (``loss_scale``). The forward and backward passes run in
float16 (parameters and inputs cast to fp16; the loss is computed in float32 from the fp16
logits, so the backward enters fp16 at the logits, as in mixed-precision training); float32
master weights and Adam state. The construction: the objective is the mean cross-entropy
times a small constant ``c`` (``--coefs``). Adam is invariant to ``c`` in float32 (up to its
``eps``), as it is to any rescaling of the loss, but every gradient element is ``c`` times
smaller: the fp16 cotangents fall below fp16's smallest subnormal (2^-24 ~ 6e-8) and flush
to zero. ``c = 1`` is the control; ``c`` = 2^-20 stands for a loss normalised by a large
count (tokens, pixels) or a lightly weighted term. Arms: ``fp32``; ``fp16`` (no scaling);
``fp16_loss_scale``: ``jq.optax.dynamic_loss_scale(adam)`` (initial scale 2^15, growth
every 200 finite steps) differentiating ``jq.optax.scale_loss``.

**2. bf16 parameters and stochastic rounding** (``stochastic_rounding``). The parameters
are *stored* in bfloat16 (the forward and backward run in float32 from them, the Adam
moments are float32), and Adam runs with a small learning rate (``--sr-lrs``), so most
updates are below half a bf16 ulp of their parameter. Arms: ``fp32`` (float32
parameters); ``bf16_rne``: ``bf16(p + u)`` rounded to nearest, as ``optax.apply_updates``
does; ``bf16_sr``: ``jq.optax.apply_updates_sr(p, u, key)``, stochastically rounded.
``changed_last_100`` is the fraction of parameters that changed over the last 100 steps.

Run (a few minutes on a 2-core CPU)::

    python3 benchmarks/mixed_precision.py       # -> benchmarks/results/mixed_precision.json
    python3 benchmarks/mixed_precision.py --markdown benchmarks/results/mixed_precision.json
    python3 benchmarks/mixed_precision.py --quick --out /tmp/mp.json   # a few seconds
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "benchmarks")):  # run from a checkout, or imported
    if _p not in sys.path:
        sys.path.insert(0, _p)

import common  # noqa: E402  (the digits MLP and the JSON / table helpers)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxquant.optax as jqo  # noqa: E402
from jaxquant.app.datasets import digits  # noqa: E402

NAME = "mixed_precision"
EXPERIMENTS = ("loss_scale", "stochastic_rounding")
LS_ARMS = ("fp32", "fp16", "fp16_loss_scale")
SR_ARMS = ("fp32", "bf16_rne", "bf16_sr")


def _f32(tree: Any) -> Any:
    return jax.tree.map(lambda a: a.astype(jnp.float32), tree)


def _zero_fraction(tree: Any) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    zeros = sum(jnp.sum(a == 0).astype(jnp.float32) for a in leaves)
    return zeros / float(sum(a.size for a in leaves))


def _batches(key: jax.Array, n: int, steps: int, batch: int) -> jax.Array:
    """int32[steps, batch]: each step a random batch without replacement."""
    keys = jax.random.split(key, steps)
    return jax.vmap(lambda k: jax.random.permutation(k, n)[:batch])(keys)


def _ce(logits: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# --------------------------------------------------------------- 1. fp16 + loss scaling


def make_loss_scale_run(model, arm: str, coef: float, cfg: dict[str, Any]):
    """A jitted ``run(params, x, y, key) -> dict`` for one arm of the loss-scaling
    experiment (``params`` float32 masters)."""
    dtype = jnp.float32 if arm == "fp32" else jnp.float16
    adam = optax.adam(cfg["ls_lr"])
    if arm == "fp16_loss_scale":
        tx = jqo.dynamic_loss_scale(adam, initial_scale=2.0**15, growth_interval=200)
    else:
        tx = adam

    def objective(params, xb, yb):
        p = jax.tree.map(lambda a: a.astype(dtype), params)
        logits = model.apply({"params": p}, xb.astype(dtype)).astype(jnp.float32)
        ce = _ce(logits, yb)
        return coef * ce, ce

    def run(params, x, y, key):
        opt_state = tx.init(params)

        def step(carry, idx):
            params, opt_state = carry
            xb, yb = x[idx], y[idx]

            def loss_fn(p):
                loss, ce = objective(p, xb, yb)
                if arm == "fp16_loss_scale":  # differentiate S * loss
                    loss = jqo.scale_loss(loss, opt_state)
                return loss, ce

            (_, ce), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
            finite = jqo.all_finite(g)
            zeros = _zero_fraction(g)
            updates, opt_state = tx.update(g, opt_state, params)
            params = optax.apply_updates(params, updates)
            scale = opt_state.scale if arm == "fp16_loss_scale" else jnp.float32(1.0)
            return (params, opt_state), (ce, zeros, finite, scale)

        idx = _batches(key, x.shape[0], cfg["ls_steps"], cfg["batch"])
        (params, opt_state), (ce, zeros, finite, scale) = jax.lax.scan(
            step, (params, opt_state), idx
        )
        return params, {"ce": ce, "zeros": zeros, "finite": finite, "scale": scale}

    return jax.jit(run)


def loss_scale_experiment(seeds: int, cfg: dict[str, Any], data: dict[str, Any]) -> dict:
    model = common.MLP(tuple(cfg["hidden"]), 10)
    x, y = jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"])
    xt, yt = jnp.asarray(data["x_test"]), jnp.asarray(data["y_test"])
    evaluate = jax.jit(
        lambda p, x, y: (_ce(model.apply({"params": p}, x), y), _accuracy(model, p, x, y))
    )
    out: dict[str, Any] = {}
    for coef_log2 in cfg["coefs_log2"]:
        coef = 2.0**coef_log2
        for arm in LS_ARMS:
            run = make_loss_scale_run(model, arm, coef, cfg)
            runs = []
            for seed in range(seeds):
                t0 = time.perf_counter()
                init_key, data_key = jax.random.split(jax.random.key(seed))
                params = model.init(init_key, x[:1])["params"]
                params, tr = run(params, x, y, data_key)
                train_loss, _ = evaluate(params, x, y)
                _, test_acc = evaluate(params, xt, yt)
                tr = jax.tree.map(np.asarray, tr)
                tail = max(1, cfg["ls_steps"] // 10)
                r = {
                    "seed": seed,
                    "train_loss": float(train_loss),
                    "test_acc": 100.0 * int(test_acc) / int(yt.shape[0]),
                    "zero_grad_fraction_first": float(tr["zeros"][0]),
                    "zero_grad_fraction_last10pct": float(tr["zeros"][-tail:].mean()),
                    "nonfinite_steps": int((~tr["finite"]).sum()),
                    "final_loss_scale": float(tr["scale"][-1]),
                    "batch_ce_curve": common.downsample(tr["ce"].tolist(), 24),
                    "seconds": time.perf_counter() - t0,
                }
                if not math.isfinite(r["train_loss"]):
                    r["diverged"] = True
                runs.append(r)
                print(
                    f"loss_scale c=2^{coef_log2} {arm:16s} seed {seed}: train loss "
                    f"{r['train_loss']:.4g}, test {r['test_acc']:.2f}%, zero grads "
                    f"{r['zero_grad_fraction_last10pct']:.3f} ({r['seconds']:.1f} s)",
                    flush=True,
                )
            keys = ("train_loss", "test_acc", "zero_grad_fraction_last10pct")
            out[f"c=2^{coef_log2}/{arm}"] = common.summarize(runs, keys) | {
                "coef_log2": coef_log2,
                "arm": arm,
            }
    return out


def _accuracy(model, params, x, y) -> jax.Array:
    """The number of correct predictions (int32)."""
    return jnp.sum(jnp.argmax(model.apply({"params": params}, x), axis=-1) == y)


# ------------------------------------------------- 2. bf16 params + stochastic rounding


def make_sr_run(model, arm: str, lr: float, cfg: dict[str, Any]):
    """A jitted ``run(params, x, y, key) -> (params, info)`` for one arm of the
    stochastic-rounding experiment; ``params`` are bf16 except in the fp32 arm."""
    tx = optax.adam(lr)
    steps, last = cfg["sr_steps"], min(100, cfg["sr_steps"])

    def loss(p32, xb, yb):
        return _ce(model.apply({"params": p32}, xb), yb)

    def run(params, x, y, key):
        opt_state = tx.init(_f32(params))  # float32 moments in every arm
        batch_key, sr_key = jax.random.split(key)

        def step(carry, inp):
            params, opt_state = carry
            i, idx = inp
            p32 = _f32(params)
            ce, g = jax.value_and_grad(loss)(p32, x[idx], y[idx])
            updates, opt_state = tx.update(g, opt_state, p32)
            if arm == "bf16_sr":
                params = jqo.apply_updates_sr(params, updates, jax.random.fold_in(sr_key, i))
            else:  # round to nearest into the parameters' dtype (optax.apply_updates)
                params = jax.tree.map(
                    lambda p, u: (p.astype(jnp.float32) + u).astype(p.dtype), params, updates
                )
            return (params, opt_state), ce

        idx = _batches(batch_key, x.shape[0], steps, cfg["batch"])
        carry = (params, opt_state)
        carry, ce1 = jax.lax.scan(step, carry, (jnp.arange(steps - last), idx[: steps - last]))
        before = carry[0]
        carry, ce2 = jax.lax.scan(step, carry, (jnp.arange(steps - last, steps), idx[-last:]))
        params = carry[0]
        changed = sum(
            jnp.sum(a != b).astype(jnp.float32)
            for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(before), strict=True)
        ) / float(sum(a.size for a in jax.tree.leaves(params)))
        return params, {"ce": jnp.concatenate([ce1, ce2]), "changed_last": changed}

    return jax.jit(run)


def sr_experiment(seeds: int, cfg: dict[str, Any], data: dict[str, Any]) -> dict:
    model = common.MLP(tuple(cfg["hidden"]), 10)
    x, y = jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"])
    xt, yt = jnp.asarray(data["x_test"]), jnp.asarray(data["y_test"])
    evaluate = jax.jit(
        lambda p, x, y: (
            _ce(model.apply({"params": _f32(p)}, x), y),
            _accuracy(model, _f32(p), x, y),
        )
    )
    out: dict[str, Any] = {}
    for lr in cfg["sr_lrs"]:
        for arm in SR_ARMS:
            run = make_sr_run(model, arm, lr, cfg)
            runs = []
            for seed in range(seeds):
                t0 = time.perf_counter()
                init_key, data_key = jax.random.split(jax.random.key(seed))
                params = model.init(init_key, x[:1])["params"]
                if arm != "fp32":
                    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
                params, tr = run(params, x, y, data_key)
                train_loss, _ = evaluate(params, x, y)
                _, test_acc = evaluate(params, xt, yt)
                r = {
                    "seed": seed,
                    "train_loss": float(train_loss),
                    "test_acc": 100.0 * int(test_acc) / int(yt.shape[0]),
                    "changed_last_100": float(tr["changed_last"]),
                    "param_dtype": str(jax.tree.leaves(params)[0].dtype),
                    "batch_ce_curve": common.downsample(np.asarray(tr["ce"]).tolist(), 25),
                    "seconds": time.perf_counter() - t0,
                }
                runs.append(r)
                print(
                    f"sr lr={lr:g} {arm:9s} seed {seed}: train loss {r['train_loss']:.4g}, "
                    f"test {r['test_acc']:.2f}%, changed(last 100) "
                    f"{r['changed_last_100']:.3f} ({r['seconds']:.1f} s)",
                    flush=True,
                )
            keys = ("train_loss", "test_acc", "changed_last_100")
            out[f"lr={lr:g}/{arm}"] = common.summarize(runs, keys) | {"lr": lr, "arm": arm}
    return out


# -------------------------------------------------------------------------------- main


def config(args: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "hidden": [512, 512],
        "batch": 64,
        "ls_steps": 600,
        "ls_lr": 1e-3,
        "coefs_log2": [0, -17, -20],
        "sr_steps": 1000,
        "sr_lrs": [1e-4, 3e-5],
        "n_train": None,
    }
    if args.quick:
        cfg.update(
            hidden=[64, 64], ls_steps=60, sr_steps=150, n_train=256, coefs_log2=[-20], sr_lrs=[3e-5]
        )
    if args.steps is not None:
        cfg["ls_steps"] = cfg["sr_steps"] = args.steps
    return cfg


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(__doc__ or "", NAME, EXPERIMENTS)
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(common.read_json(args.markdown)))
        return {}
    cfg = config(args)
    data = digits(cfg["n_train"])
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    chosen = common.select(args.methods, EXPERIMENTS)
    if "loss_scale" in chosen:
        results["loss_scale"] = loss_scale_experiment(args.seeds, cfg, data)
    if "stochastic_rounding" in chosen:
        results["stochastic_rounding"] = sr_experiment(args.seeds, cfg, data)
    cfg |= {"seeds": args.seeds, "total_seconds": time.perf_counter() - t0}
    doc = common.document(NAME, cfg, results)
    _save_criteria(doc)
    common.write_json(doc, args.out)
    print(markdown(doc))
    return doc


def _save_criteria(doc: dict[str, Any]) -> None:
    """The issue's criteria on the means: fp16 without scaling stalls where fp32 trains
    and loss scaling recovers (train loss within 10% of fp32, test accuracy within 1
    point); bf16 with round-to-nearest stalls and SR tracks fp32 (same bounds)."""
    crit: dict[str, Any] = {}
    res = doc["results"]

    def close(a: dict, b: dict) -> bool:
        return (
            abs(a["train_loss"] - b["train_loss"]) <= 0.1 * b["train_loss"]
            and abs(a["test_acc"] - b["test_acc"]) <= 1.0
        )

    for coef_log2 in doc["config"]["coefs_log2"] if "loss_scale" in res else []:
        m = {a: res["loss_scale"][f"c=2^{coef_log2}/{a}"].get("mean") for a in LS_ARMS}
        if all(m.values()):
            name = f"loss_scale c=2^{coef_log2}" + (" (control)" if coef_log2 == 0 else "")
            crit[name] = {
                "fp16_stalls": not close(m["fp16"], m["fp32"]),
                "loss_scale_recovers": close(m["fp16_loss_scale"], m["fp32"]),
            }
    for lr in doc["config"]["sr_lrs"] if "stochastic_rounding" in res else []:
        m = {a: res["stochastic_rounding"][f"lr={lr:g}/{a}"].get("mean") for a in SR_ARMS}
        if all(m.values()):
            crit[f"stochastic_rounding lr={lr:g}"] = {
                "rne_stalls": not close(m["bf16_rne"], m["fp32"]),
                "sr_tracks_fp32": close(m["bf16_sr"], m["fp32"]),
            }
    doc["criteria"] = crit


def _pm(r: dict[str, Any], key: str, fmt: str) -> str:
    return f"{r['mean'][key]:{fmt}} ± {r['std'][key]:{fmt}}"


def markdown(doc: dict[str, Any]) -> str:
    res = doc["results"]
    lines = [common.header(doc)]
    if "loss_scale" in res:
        lines += [
            "",
            "fp16 forward/backward vs float32, objective = c x mean cross-entropy "
            f"(Adam {doc['config']['ls_lr']:g}, {doc['config']['ls_steps']} steps):",
            "",
            "| c | arm | train loss (CE) | test acc % | zero grads (last 10%) | non-finite steps "
            "| final loss scale |",
            "|---|---|--:|--:|--:|--:|--:|",
        ]
        for r in res["loss_scale"].values():
            runs = r["runs"]
            lines.append(
                f"| 2^{r['coef_log2']} | {r['arm']} | {_pm(r, 'train_loss', '.4f')} | "
                f"{_pm(r, 'test_acc', '.2f')} | {_pm(r, 'zero_grad_fraction_last10pct', '.3f')} "
                f"| {np.mean([x['nonfinite_steps'] for x in runs]):.1f} | "
                f"{'' if r['arm'] != 'fp16_loss_scale' else _scales(runs)} |"
            )
    if "stochastic_rounding" in res:
        lines += [
            "",
            "bfloat16-stored parameters, float32 compute and Adam moments "
            f"({doc['config']['sr_steps']} steps):",
            "",
            "| Adam lr | arm | train loss (CE) | test acc % | params changed (last 100 steps) |",
            "|---|---|--:|--:|--:|",
        ]
        for r in res["stochastic_rounding"].values():
            lines.append(
                f"| {r['lr']:g} | {r['arm']} | {_pm(r, 'train_loss', '.4f')} | "
                f"{_pm(r, 'test_acc', '.2f')} | {_pm(r, 'changed_last_100', '.3f')} |"
            )
    if "loss_scale" in res:
        lines += ["", "Mean training cross-entropy of the batches (mean over seeds):", ""]
        lines += _curves(res["loss_scale"], doc["config"]["ls_steps"], "c", "coef_log2", "2^")
    if "stochastic_rounding" in res:
        lines += ["", "Mean training cross-entropy of the batches (mean over seeds):", ""]
        lines += _curves(res["stochastic_rounding"], doc["config"]["sr_steps"], "Adam lr", "lr", "")
    crit = doc.get("criteria", {})
    if crit:
        lines += ["", "| criterion | result |", "|---|---|"]
        for name, c in crit.items():
            lines.append(f"| {name} | {', '.join(f'{k}: {v}' for k, v in c.items())} |")
    return "\n".join(lines)


def _curves(res: dict[str, Any], steps: int, label: str, key: str, prefix: str) -> list[str]:
    """A loss-curve table: the mean batch CE of each arm at 7 points of training (each
    point is the mean over the slice of steps that ends at the column's step)."""
    first = next(iter(res.values()))["runs"][0]["batch_ce_curve"]
    n = len(first)
    idx = sorted({round(float(i)) for i in np.linspace(0, n - 1, 7)})
    ends = [round((i + 1) * steps / n) for i in idx]
    lines = [
        f"| {label} | arm | " + " | ".join(f"step {e}" for e in ends) + " |",
        "|---|---|" + "--:|" * len(ends),
    ]
    for r in res.values():
        curves = np.mean([x["batch_ce_curve"] for x in r["runs"]], axis=0)
        cells = " | ".join(f"{curves[i]:.4g}" for i in idx)
        lines.append(f"| {prefix}{r[key]:g} | {r['arm']} | {cells} |")
    return lines


def _scales(runs: list[dict[str, Any]]) -> str:
    return ", ".join(f"2^{math.log2(x['final_loss_scale']):g}" for x in runs)


if __name__ == "__main__":
    main()
