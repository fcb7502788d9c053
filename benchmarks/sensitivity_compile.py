"""Sensitivity analysis on a transformer: one compilation per candidate against one per
layer and candidate.

``jaxquant.flax.sensitivity`` compiles the model once per candidate, every considered layer
quantized and gated by traced flags; before, it compiled a model per (layer, candidate)
trial, which is still its path for models with online activation transforms. Both are timed
here on the byte LM (``jaxquant.app.models.ByteLM``, random init: timing only), every
Dense layer considered, the SQNR metric on ``--batches`` batches, with ``--candidates``
int8 per-channel and int4 in groups of 32 weight rules. Reports CPU seconds (user + system
of this process, the whole call: tracing, compiling and running), the models traced, and
whether the two give the same numbers.

    python3 benchmarks/sensitivity_compile.py --out benchmarks/results/sensitivity_compile_cpu.json
    python3 benchmarks/sensitivity_compile.py --quick
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for common
import common  # puts the repository root on sys.path too

import jaxquant as jq
from jaxquant.app.models import ByteLM
from jaxquant.flax import Rule, sensitivity

# the runners (private): the per-trial path is taken by making gating unavailable
_sens = importlib.import_module("jaxquant._src.flax.sensitivity")


def _traced(fn):
    """(fn's result, CPU seconds, models sensitivity traced)."""
    names: list[str] = []

    def listen(event, duration, **kw):
        del duration
        if event == "/jax/core/compile/jaxpr_trace_duration":
            names.append(kw.get("fun_name", ""))

    jax.monitoring.register_event_duration_secs_listener(listen)
    t = time.process_time()
    try:
        out = fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    return out, time.process_time() - t, sum(n == "run" for n in names)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="transformer blocks (6 Dense each)")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="1 block, width 32")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.width = 1, 32
    model = ByteLM(seq=64, d=args.width, layers=args.layers, heads=4, hidden=4 * args.width)
    keys = jax.random.split(jax.random.key(0), args.batches + 1)
    data = [(jax.random.randint(k, (16, 64), 0, 256, jnp.int32), None) for k in keys[1:]]
    variables = jax.jit(model.init)(keys[0], data[0][0])
    cands = {
        "int8": Rule(".*", weight=jq.QuantSpec("int8", jq.per_channel(-1))),
        "int4_g32": Rule(".*", weight=jq.QuantSpec("int4", jq.per_block(0, 32))),
    }

    def run():
        return sensitivity(model, variables, cands, data, metric="sqnr")

    gated, gated_s, gated_n = _traced(run)
    _sens._LinenRunner.gateable = lambda self: False
    per_trial, trial_s, trial_n = _traced(run)
    result = {
        "config": {
            "model": f"ByteLM {args.layers} blocks, width {args.width}, seq 64",
            "layers_considered": len(gated.paths),
            "candidates": list(cands),
            "batches": f"{args.batches} x 16 sequences",
            "metric": "sqnr",
        },
        "rows": [
            {"variant": "gated (one model per candidate)", "cpu_s": gated_s, "models": gated_n},
            {"variant": "a model per trial", "cpu_s": trial_s, "models": trial_n},
        ],
        "speedup": trial_s / gated_s,
        "same_values": gated == per_trial,
    }
    result.update(common.environment())
    for row in result["rows"]:
        print(f"{row['variant']:32s} {row['cpu_s']:7.1f} CPU-s  {row['models']:4d} models")
    print(f"speed-up {result['speedup']:.1f}x, same values: {result['same_values']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
