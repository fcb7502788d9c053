"""QAT recipes on a small byte-level transformer language model (Flax Linen).

A 2-layer causal transformer (width 128, 4 heads, MLP 512, learned positions, pre-LN) is
trained on the Python standard library's own top-level ``.py`` files, read from
``sysconfig.get_paths()["stdlib"]`` (present offline on every machine; the exact bytes
depend on the Python version, which the JSON records with a hash of the corpus). Files are
sorted by name; every 10th file is held out for validation. Training samples random
windows of ``seq + 1`` bytes (batch 16, seq 128, 300 steps by default); validation is the
mean next-byte negative log-likelihood over 512 evenly spaced windows of the held-out
files, reported as perplexity per byte, ``exp(NLL)``.

The model is the application layer's :class:`jaxquant.app.models.ByteLM` (the one byte LM
of the sweep, benchmarks and tests). Each recipe quantizes, through the Linen path of
``jq.flax.quantize_model``, the ``Dense`` layers inside the blocks (attention q/k/v/o and
the two MLP layers, paths ``block<i>/attn/{q,k,v,o}`` and ``block<i>/{fc1,fc2}``); the
byte embedding, positions, LayerNorms, the attention products (q k^T, softmax(.) v) and
the output head stay in float. Every recipe gets the same model, data, optimizer (AdamW
on the ``params`` collection, warmup + cosine) and seeds; a recipe's other collections
(``quant_state`` of delayed scaling) are threaded through every step.

``results/qat_lm.json`` of 2026-11-27 was measured with an NNX twin of this model: the
same architecture, initializers, data, optimizer and quantized layers, other random draws
of a seed's initial weights.

Run (8-11 minutes on a 2-core CPU)::

    python3 benchmarks/qat_lm.py                       # -> benchmarks/results/qat_lm.json
    python3 benchmarks/qat_lm.py --markdown benchmarks/results/qat_lm.json
    python3 benchmarks/qat_lm.py --quick --out /tmp/lm.json   # a few seconds
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "benchmarks")):  # run from a checkout, or imported
    if _p not in sys.path:
        sys.path.insert(0, _p)

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxquant as jq  # noqa: E402
from jaxquant.app.datasets import spaced_windows, stdlib_corpus  # noqa: E402
from jaxquant.app.models import ByteLM  # noqa: E402
from jaxquant.flax import quantize_model, report  # noqa: E402

NAME = "qat_lm"
METHODS = (
    "float",
    "w8a8_int8",
    "w4a16_int4",
    "fp8_current",
    "fp8_delayed",
    "mxfp8",
    "ternary",
    "binary",
)
QUANTIZED = r"block\d+/.*"  # every Dense inside the transformer blocks


# ------------------------------------------------------------------------------- data


load_corpus = stdlib_corpus  # the split and bytes recorded in results/qat_lm.json


def val_windows(val: np.ndarray, seq: int, n: int) -> np.ndarray:
    """``n`` windows of ``seq + 1`` bytes, evenly spaced over the validation bytes."""
    return spaced_windows(val, seq + 1, n)


# ------------------------------------------------------------------------------ model


def rules_for(method: str, group_size: int = 32) -> tuple[jq.flax.Rule, ...] | None:
    """The quantize_model rules of a method (None: float)."""
    if method == "float":
        return None
    kw = {"group_size": group_size} if method == "w4a16_int4" else {}
    return jq.recipes.get(method, **kw).rules(QUANTIZED)


def build(method: str, cfg: dict[str, Any]) -> Any:
    """The model of a method: :class:`ByteLM`, quantized by the method's rules."""
    model = ByteLM(
        seq=cfg["seq"],
        d=cfg["width"],
        layers=cfg["layers"],
        heads=cfg["heads"],
        hidden=cfg["hidden"],
    )
    rules = rules_for(method, cfg["int4_group"])
    return model if rules is None else quantize_model(model, rules)


def init(model: Any, seed: int, cfg: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """``(params, rest)``: the ``params`` collection (trained) and every other collection
    (the ``quant_state`` of delayed scaling, updated by the training calls)."""
    variables = model.init(jax.random.key(seed), jnp.zeros((1, cfg["seq"]), jnp.int32))
    params = variables["params"]
    return params, {k: v for k, v in variables.items() if k != "params"}


def loss_fn(
    model: Any, params: Any, rest: dict[str, Any], batch: jax.Array
) -> tuple[jax.Array, dict[str, Any]]:
    """Mean next-byte cross-entropy (nats) of ``batch`` (int32 [B, seq + 1]) and the
    updated ``rest`` (a training call: the non-param collections are mutable)."""
    logits, rest = model.apply({"params": params, **rest}, batch[:, :-1], mutable=list(rest))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
    return loss, dict(rest)


def optimizer(cfg: dict[str, Any]) -> optax.GradientTransformation:
    warmup = max(1, cfg["steps"] // 10)
    lr = optax.warmup_cosine_decay_schedule(
        0.0, cfg["lr"], warmup, cfg["steps"], end_value=cfg["lr"] * 0.1
    )
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(lr, b1=0.9, b2=0.99, weight_decay=cfg["weight_decay"]),
    )


def sample_batch(data: jax.Array, key: jax.Array, batch: int, seq: int) -> jax.Array:
    """``batch`` random windows of ``seq + 1`` bytes (int32)."""
    starts = jax.random.randint(key, (batch,), 0, data.shape[0] - seq - 1)
    idx = starts[:, None] + jnp.arange(seq + 1)[None, :]
    return data[idx].astype(jnp.int32)


def make_train_chunk(model: Any, cfg: dict[str, Any]):
    """A jitted function running ``n`` steps with ``lax.scan``:
    ``(state, data, key, steps) -> (state, losses[n])``; ``state`` is
    ``(params, rest, opt_state)``, so every variable (params, optimizer, the
    ``quant_state`` of delayed scaling) is threaded through."""
    tx = optimizer(cfg)

    def step(state, data, key, i):
        params, rest, opt_state = state
        batch = sample_batch(data, jax.random.fold_in(key, i), cfg["batch"], cfg["seq"])
        grad = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)
        (loss, rest), grads = grad(model, params, rest, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), rest, opt_state), loss

    def chunk(state, data, key, steps):
        def body(s, i):
            return step(s, data, key, i)

        return jax.lax.scan(body, state, steps)

    return jax.jit(chunk, donate_argnums=0)


def make_eval(model: Any):
    @jax.jit
    def nll(state, windows):
        params, rest, _ = state
        return loss_fn(model, params, rest, windows)[0]  # the updated state is dropped

    return nll


def run_method(method: str, seeds: int, cfg: dict[str, Any], corpus: dict[str, Any]) -> list:
    """Train ``method`` for every seed; the train and eval functions compile once (the
    seeds share the model) and are reused."""
    data = jnp.asarray(corpus["train"])
    windows = val_windows(corpus["val"], cfg["seq"], cfg["val_windows"])
    model = build(method, cfg)
    train = nll = None
    runs = []
    for seed in range(seeds):
        t0 = time.perf_counter()
        try:
            params, rest = init(model, seed, cfg)
            quantized = [] if method == "float" else [m.path for m in report(model)]
            state = (params, rest, optimizer(cfg).init(params))
            if train is None:
                train, nll = make_train_chunk(model, cfg), make_eval(model)
            key = jax.random.key(10_000 + seed)
            losses: list[float] = []
            for s0 in range(0, cfg["steps"], cfg["chunk"]):
                steps = jnp.arange(s0, min(s0 + cfg["chunk"], cfg["steps"]))
                state, ls = train(state, data, key, steps)
                losses.extend(np.asarray(ls).tolist())
            val = [
                float(nll(state, jnp.asarray(windows[i : i + cfg["eval_batch"]])))
                for i in range(0, len(windows), cfg["eval_batch"])
            ]
            val_nll = float(np.mean(val))  # equal-sized batches: the mean over all bytes
            r = {
                "seed": seed,
                "val_nll": val_nll,
                "val_ppl": math.exp(val_nll),
                "val_bits_per_byte": val_nll / math.log(2),
                "final_train_loss": float(np.mean(losses[-max(1, len(losses) // 20) :])),
                "train_loss_curve": common.downsample(losses, 50),
                "quantized_layers": quantized,
                "state": sorted(rest),  # the variable collections besides params
                "seconds": time.perf_counter() - t0,
            }
            if not math.isfinite(val_nll):
                r["error"] = f"non-finite validation loss {val_nll}"
        except Exception as e:  # report a broken recipe, keep the sweep going
            r = {"seed": seed, "error": f"{type(e).__name__}: {e}"}
        print(f"{method:12s} seed {seed}: " + common.brief(r, "val_ppl"), flush=True)
        runs.append(r)
    return runs


# -------------------------------------------------------------------------------- main


def config(args: argparse.Namespace) -> dict[str, Any]:
    cfg = {
        "seq": 128,
        "batch": 16,
        "width": 128,
        "layers": 2,
        "heads": 4,
        "hidden": 512,
        "steps": 300,
        "lr": 3e-3,
        "weight_decay": 0.01,
        "chunk": 50,
        "val_every": 10,
        "val_windows": 512,
        "eval_batch": 128,
        "max_files": None,
        "int4_group": 32,
    }
    if args.quick:
        cfg.update(
            seq=32,
            batch=8,
            width=32,
            heads=2,
            hidden=64,
            steps=20,
            chunk=10,
            val_windows=16,
            eval_batch=16,
            max_files=20,
        )
    if args.steps is not None:
        cfg["steps"] = args.steps
    return cfg


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(__doc__ or "", NAME, METHODS)
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(common.read_json(args.markdown)))
        return {}
    cfg = config(args)
    corpus = load_corpus(cfg["val_every"], cfg["max_files"])
    methods = common.select(args.methods, METHODS)
    print(f"corpus: {corpus['info']}", flush=True)
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    for method in methods:
        runs = run_method(method, args.seeds, cfg, corpus)
        results[method] = common.summarize(runs, ("val_ppl", "val_nll", "val_bits_per_byte"))
    cfg |= {
        "corpus": corpus["info"],
        "seeds": args.seeds,
        "total_seconds": time.perf_counter() - t0,
    }
    out = common.document(NAME, cfg, results)
    common.write_json(out, args.out)
    print(markdown(out))
    return out


def markdown(doc: dict[str, Any]) -> str:
    res = doc["results"]
    lines = [
        common.header(doc),
        "",
        "| method | quantized layers | val ppl / byte (mean ± std) | bits / byte | "
        "vs float, paired (mean ± std) | "
        "per seed | s / run |",
        "|---|---|--:|--:|--:|---|--:|",
    ]
    for method, r in res.items():
        if "mean" not in r:
            lines.append(f"| {method} | - | **failed**: {r.get('error', '')[:120]} | | | | |")
            continue
        m, s = r["mean"]["val_ppl"], r["std"]["val_ppl"]
        bpb = r["mean"]["val_bits_per_byte"]
        pair = common.paired(res, method, "val_ppl")
        delta = "" if pair is None else f"{pair[0]:+.3f} ± {pair[1]:.3f}"
        layers = r["runs"][0].get("quantized_layers", [])
        what = "none (float)" if not layers else f"{len(layers)} Linear"
        per_seed = ", ".join(f"{x['val_ppl']:.3f}" for x in r["runs"] if "val_ppl" in x)
        secs = np.mean([x["seconds"] for x in r["runs"] if "seconds" in x])
        lines.append(
            f"| {method} | {what} | {m:.3f} ± {s:.3f} | {bpb:.3f} | {delta} | {per_seed} | "
            f"{secs:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
