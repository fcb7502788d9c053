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
import numpy as np  # noqa: E402

import jaxquant as jq  # noqa: E402
from jaxquant.app import training  # noqa: E402
from jaxquant.app.datasets import stdlib_corpus  # noqa: E402
from jaxquant.flax import report  # noqa: E402

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


def rules_for(method: str, group_size: int = 32) -> tuple[jq.flax.Rule, ...] | None:
    """The quantize_model rules of a method (None: float)."""
    if method == "float":
        return None
    kw = {"group_size": group_size} if method == "w4a16_int4" else {}
    return jq.recipes.get(method, **kw).rules(QUANTIZED)


def run_method(method: str, seeds: int, cfg: dict[str, Any], corpus: dict[str, Any]) -> list:
    """Train ``method`` for every seed (:func:`jaxquant.app.training.train`: one compile
    for all seeds)."""
    try:
        model = training.build(cfg, rules_for(method, cfg["int4_group"]))
        runs = training.train(model, cfg, corpus, range(seeds))  # report() needs a run
        quantized = [] if method == "float" else [m.path for m in report(model)]
    except Exception as e:  # report a broken recipe, keep the sweep going
        runs = [{"seed": s, "error": f"{type(e).__name__}: {e}"} for s in range(seeds)]
        quantized = []
    for r in runs:
        if "error" not in r:
            r["val_ppl"] = math.exp(r["val_nll"])
            r["quantized_layers"] = quantized
        print(f"{method:12s} seed {r['seed']}: " + common.brief(r, "val_ppl"), flush=True)
    return runs


# -------------------------------------------------------------------------------- main


def config(args: argparse.Namespace) -> dict[str, Any]:
    cfg = {**training.DEFAULTS, "val_every": 10, "max_files": None, "int4_group": 32}
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
