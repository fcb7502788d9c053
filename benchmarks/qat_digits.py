"""QAT recipes and 8-bit Adam on scikit-learn's digits (Flax Linen MLP 64-512-512-10).

The 1797 8x8 digit images bundled with scikit-learn (``sklearn.datasets.load_digits``, no
download) are split 75 / 25 (stratified, ``random_state=0``) and standardized with the
training set's per-pixel mean and std. An MLP 64-512-512-10 (ReLU, Linen ``nn.Dense``
layers ``Dense_0``, ``Dense_1``, ``Dense_2``) is trained with Adam (peak learning rate 1e-3,
cosine decay) on mini-batches of 64 for ``--epochs`` epochs; the test accuracy of the last
step is reported (no early stopping). Every method gets the same data, initialisation,
batches, optimizer and step count for a given seed:

* ``float``: the float32 model, ``optax.adam``;
* ``adam_8bit``: the float32 model, ``jq.optax.adam_8bit`` (moments of tensors with
  >= 4096 elements in 8 bits, block 2048; smaller ones, the biases, in float32);
* one row per ``jq.recipes`` recipe, through ``jaxquant.flax.quantize_model``: every
  ``Dense`` quantized, except ``binary`` / ``ternary`` (first and last layer kept in float,
  as is usual; ``binary_all`` / ``ternary_all`` quantize all three) and ``mxfp8`` (the
  10-unit head kept in float: the recipe's gradient blocks of 32 along the output's last
  axis do not divide 10); ``w4a16_int4`` uses groups of ``--group-size`` input rows;
* ``w8a8_int8_lsq``: ``w8a8_int8`` with learned step sizes (``ste="lsq"``), the
  activation per-tensor (LSQ keeps one step per group across steps, so not per-token).

Run (a couple of minutes on a 2-core CPU)::

    python3 benchmarks/qat_digits.py                      # -> benchmarks/results/qat_digits.json
    python3 benchmarks/qat_digits.py --markdown benchmarks/results/qat_digits.json
    python3 benchmarks/qat_digits.py --quick --out /tmp/d.json   # a few seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "benchmarks")):  # run from a checkout, or imported
    if _p not in sys.path:
        sys.path.insert(0, _p)

import common  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxquant as jq  # noqa: E402
import jaxquant.optax as jqo  # noqa: E402
from jaxquant.app.datasets import digits  # noqa: E402
from jaxquant.flax import quantize_model, report  # noqa: E402

NAME = "qat_digits"
METHODS = (
    "float",
    "adam_8bit",
    "fp8_current",
    "fp8_delayed",
    "w8a8_int8",
    "w8a8_int8_lsq",
    "w4a16_int4",
    "mxfp8",
    "ternary",
    "binary",
    "ternary_all",
    "binary_all",
)


# ------------------------------------------------------------------------------ model


MLP = common.MLP  # the one digits MLP (benchmarks/common.py)


def method_rules(method: str, group_size: int, n_layers: int) -> tuple[Any, ...] | None:
    """The ``quantize_model`` rules of ``method`` (None: the float model)."""
    if method in ("float", "adam_8bit"):
        return None
    first_last = ("Dense_0", f"Dense_{n_layers - 1}")
    if method == "w8a8_int8_lsq":
        recipe = jq.recipes.get("w8a8_int8").replace(ste="lsq", act=jq.QuantSpec("int8"))
        return recipe.rules()
    if method in ("binary_all", "ternary_all"):
        return jq.recipes.get(method.removesuffix("_all")).rules()
    kw = {"group_size": group_size} if method == "w4a16_int4" else {}
    recipe = jq.recipes.get(method, **kw)
    keep: tuple[str, ...] = ()
    if method in ("binary", "ternary"):
        keep = first_last
    elif method == "mxfp8":
        keep = (first_last[1],)  # 10 outputs: no MX gradient blocks of 32
    return recipe.rules(keep_float=keep)


def method_optimizer(method: str, cfg: dict[str, Any]) -> optax.GradientTransformation:
    lr = optax.cosine_decay_schedule(cfg["lr"], cfg["steps"], alpha=0.0)
    if method == "adam_8bit":
        return jqo.adam_8bit(lr)
    return optax.adam(lr)


def split_variables(variables: Any) -> tuple[Any, dict[str, Any]]:
    """``(params, state)``: everything but ``"params"`` (e.g. delayed scaling's
    ``"quant_state"``) is state that ``apply`` updates (``mutable=list(state)``)."""
    variables = dict(variables)
    params = variables.pop("params")
    return params, variables


def apply_model(model: nn.Module, params: Any, state: dict[str, Any], x: jax.Array):
    """``(logits, new_state)``, with the state collections mutable when there are any."""
    if state:
        logits, new_state = model.apply({"params": params, **state}, x, mutable=list(state))
        return logits, dict(new_state)
    return model.apply({"params": params}, x), state


def make_trainer(model: nn.Module, tx: optax.GradientTransformation, cfg: dict[str, Any]):
    """A jitted ``train(params, state, opt_state, x, y, key) -> (params, state, opt_state,
    epoch_losses)`` running every epoch (``lax.scan`` over epochs, and over the
    mini-batches of a fresh permutation in each; the last partial batch is dropped)."""
    batch = cfg["batch"]

    def loss_fn(params, state, x, y):
        logits, new_state = apply_model(model, params, state, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, new_state

    def train(params, state, opt_state, x, y, key):
        n_batches = x.shape[0] // batch

        def step(carry, idx):
            params, state, opt_state = carry
            (loss, state), g = jax.value_and_grad(loss_fn, has_aux=True)(
                params, state, x[idx], y[idx]
            )
            updates, opt_state = tx.update(g, opt_state, params)
            return (optax.apply_updates(params, updates), state, opt_state), loss

        def epoch(carry, ekey):
            perm = jax.random.permutation(ekey, x.shape[0])[: n_batches * batch]
            carry, losses = jax.lax.scan(step, carry, perm.reshape(n_batches, batch))
            return carry, losses.mean()

        keys = jax.random.split(key, cfg["epochs"])
        (params, state, opt_state), losses = jax.lax.scan(epoch, (params, state, opt_state), keys)
        return params, state, opt_state, losses

    return jax.jit(train)


def make_eval(model: nn.Module):
    """``accuracy(params, state, x, y)``: the percentage of correct predictions (exact:
    from the jitted integer count)."""

    @jax.jit
    def correct(params, state, x, y):
        logits, _ = apply_model(model, params, state, x)  # state updates are discarded
        return jnp.sum(jnp.argmax(logits, axis=-1) == y)

    def accuracy(params, state, x, y) -> float:
        return 100.0 * int(correct(params, state, x, y)) / int(y.shape[0])

    return accuracy


def make_nll(model: nn.Module):
    """A jitted mean cross-entropy ``nll(params, state, x, y)``."""

    @jax.jit
    def nll(params, state, x, y):
        logits, _ = apply_model(model, params, state, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return nll


def run_method(
    method: str,
    seeds: int,
    cfg: dict[str, Any],
    data: dict[str, Any],
    float_params: dict[int, Any],
) -> list:
    """Train ``method`` for every seed (one compile, reused). The float method stores its
    trained parameters in ``float_params[seed]``; a stateless quantized method with the
    same parameter tree also reports ``ptq_test_acc``, the float model's accuracy through
    its quantized forward (post-training quantization, before any QAT)."""
    float_model = MLP(tuple(cfg["hidden"]), 10)
    rules = method_rules(method, cfg["group_size"], len(cfg["hidden"]) + 1)
    model = float_model if rules is None else quantize_model(float_model, rules)
    tx = method_optimizer(method, cfg)
    train, accuracy, nll = make_trainer(model, tx, cfg), make_eval(model), make_nll(model)
    x, y = jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"])
    xt, yt = jnp.asarray(data["x_test"]), jnp.asarray(data["y_test"])
    runs = []
    for seed in range(seeds):
        t0 = time.perf_counter()
        try:
            init_key, data_key = jax.random.split(jax.random.key(seed))
            params, state = split_variables(model.init(init_key, x[:1]))
            quantized = [m.path for m in report(model)] if rules is not None else []
            params, state, _, losses = train(params, state, tx.init(params), x, y, data_key)
            test_acc = accuracy(params, state, xt, yt)
            train_acc = accuracy(params, state, x, y)
            losses = np.asarray(losses)
            if method == "float":
                float_params[seed] = params
            ptq = None
            fp = float_params.get(seed)
            if (
                rules is not None
                and not state
                and fp is not None
                and (jax.tree.structure(fp) == jax.tree.structure(params))
            ):
                ptq = accuracy(fp, state, xt, yt)
            r = {
                "seed": seed,
                "test_acc": test_acc,
                "test_nll": float(nll(params, state, xt, yt)),
                "ptq_test_acc": ptq,
                "train_acc": train_acc,
                "final_train_loss": float(losses[-1]),
                "epoch_losses": [float(v) for v in losses],
                "quantized_layers": quantized,
                "state_collections": sorted(state),
                "seconds": time.perf_counter() - t0,
            }
            if not np.isfinite(losses[-1]):
                r["error"] = f"non-finite training loss {losses[-1]}"
        except Exception as e:  # report a broken method, keep the sweep going
            r = {"seed": seed, "error": f"{type(e).__name__}: {e}"}
        print(f"{method:14s} seed {seed}: " + common.brief(r, "test_acc"), flush=True)
        runs.append(r)
    return runs


# -------------------------------------------------------------------------------- main


def config(args: argparse.Namespace) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "hidden": [512, 512],
        "batch": 64,
        "epochs": 40,
        "lr": 1e-3,
        "group_size": args.group_size,
        "n_train": None,
        "split": "train_test_split(test_size=0.25, stratify=y, random_state=0)",
    }
    if args.quick:
        cfg.update(hidden=[64, 64], epochs=10, n_train=256)
    if args.epochs is not None:
        cfg["epochs"] = args.epochs
    n = 1347 if cfg["n_train"] is None else cfg["n_train"]
    cfg["steps"] = cfg["epochs"] * (n // cfg["batch"])
    return cfg


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(__doc__ or "", NAME, METHODS)
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 40)")
    p.add_argument("--group-size", type=int, default=32, help="w4a16_int4 group size")
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(common.read_json(args.markdown)))
        return {}
    if args.steps is not None:  # --steps is rounded to whole epochs
        n = 256 if args.quick else 1347
        args.epochs = max(1, round(args.steps / (n // 64)))
    cfg = config(args)
    data = digits(cfg["n_train"])  # jaxquant.app.datasets: the split of every digits script
    cfg |= {"n_train_used": len(data["y_train"]), "n_test": len(data["y_test"])}
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    float_params: dict[int, Any] = {}
    for method in common.select(args.methods, METHODS):
        runs = run_method(method, args.seeds, cfg, data, float_params)
        keys = ("test_acc", "test_nll", "train_acc", "final_train_loss")
        results[method] = common.summarize(runs, keys)
        ptq = [r["ptq_test_acc"] for r in runs if r.get("ptq_test_acc") is not None]
        if len(ptq) == len(runs):
            results[method]["ptq_test_acc"] = {
                "mean": float(np.mean(ptq)),
                "std": float(np.std(ptq)),
            }
    cfg |= {"seeds": args.seeds, "total_seconds": time.perf_counter() - t0}
    doc = common.document(NAME, cfg, results)
    doc["criteria"] = criteria(results)
    common.write_json(doc, args.out)
    print(markdown(doc))
    return doc


def criteria(res: dict[str, Any]) -> dict[str, Any]:
    """The issue's acceptance criteria, evaluated on the means (None: not measured)."""

    def mean(m: str, key: str = "test_acc") -> float | None:
        return res.get(m, {}).get("mean", {}).get(key)

    f = mean("float")

    def gap(m: str, limit: float) -> dict[str, Any] | None:
        v = mean(m)
        if f is None or v is None:
            return None
        return {"gap_points": f - v, "limit": limit, "met": f - v <= limit}

    out = {
        "w8a8_int8 within 1 point of float": gap("w8a8_int8", 1.0),
        "w4a16_int4 within 2 points of float": gap("w4a16_int4", 2.0),
        "adam_8bit within 0.5 point of float (fp32 Adam)": gap("adam_8bit", 0.5),
    }
    for suffix in ("", "_all"):
        t, b = mean("ternary" + suffix), mean("binary" + suffix)
        out[f"ternary{suffix} better than binary{suffix}"] = (
            None
            if t is None or b is None
            else {
                "ternary": t,
                "binary": b,
                "met": t > b,
                "test_nll": {
                    "ternary": mean("ternary" + suffix, "test_nll"),
                    "binary": mean("binary" + suffix, "test_nll"),
                },
            }
        )
    return out


def markdown(doc: dict[str, Any]) -> str:
    res = doc["results"]
    lines = [
        common.header(doc),
        "",
        "| method | quantized layers | test acc % (mean ± std) | vs float, paired (points) "
        "| per seed "
        "| test NLL | PTQ test acc % | s / run |",
        "|---|---|--:|--:|---|--:|--:|--:|",
    ]
    for method, r in res.items():
        if "mean" not in r:
            lines.append(f"| {method} | | **failed**: {r.get('error', '')[:160]} | | | | | |")
            continue
        m, s = r["mean"]["test_acc"], r["std"]["test_acc"]
        pair = common.paired(res, method, "test_acc")
        delta = "" if pair is None else f"{pair[0]:+.2f} ± {pair[1]:.2f}"
        layers = r["runs"][0].get("quantized_layers") or ["none"]
        per_seed = ", ".join(f"{x['test_acc']:.2f}" for x in r["runs"] if "test_acc" in x)
        secs = np.mean([x["seconds"] for x in r["runs"] if "seconds" in x])
        ptq = r.get("ptq_test_acc")
        ptq_s = "" if ptq is None else f"{ptq['mean']:.2f} ± {ptq['std']:.2f}"
        lines.append(
            f"| {method} | {', '.join(layers)} | {m:.2f} ± {s:.2f} | {delta} | {per_seed} | "
            f"{r['mean']['test_nll']:.4f} ± {r['std']['test_nll']:.4f} | {ptq_s} | {secs:.1f} |"
        )
    crit = doc.get("criteria", {})
    if crit:
        lines += ["", "| criterion | result | met |", "|---|---|---|"]
        for name, c in crit.items():
            if c is None:
                lines.append(f"| {name} | not measured | |")
            elif "gap_points" in c:
                lines.append(
                    f"| {name} | {c['gap_points']:.2f} points below float | "
                    f"{'yes' if c['met'] else '**no**'} |"
                )
            else:
                nll = c["test_nll"]
                lines.append(
                    f"| {name} | test acc {c['ternary']:.2f} vs {c['binary']:.2f} % (test NLL "
                    f"{nll['ternary']:.4f} vs {nll['binary']:.4f}) | "
                    f"{'yes' if c['met'] else '**no**'} |"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
