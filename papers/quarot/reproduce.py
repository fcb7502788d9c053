"""Ashkboos et al. 2024, "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs"
(arXiv:2404.00456), Tables 1-2: rotating a transformer's residual stream by an orthogonal
(randomized Hadamard) matrix, folded into the weights, removes the outlier channels
without changing the float function, so W4A4 (4-bit weights and activations), which is
unusable without it, comes within a small gap of float; GPTQ on the rotated weights
narrows the gap further than round-to-nearest.

Setup: the byte LM of papers/_ptq_common.py (d=64, 2 blocks) with outlier channels
(``inject_outliers``, 60-1000x), and the plain trained model. W4A4: int4 per-output-channel
weights, dynamic int4 per-token activations, every Dense of the blocks and the head.
Compared: RTN; ``jaxquant.ptq.rotate_residual`` (QuaRot's rotation of the residual, the
heads and fc2's input) then RTN; rotation then ``jaxquant.ptq.gptq``; and, for contrast,
``rotate_inputs`` (an online Hadamard at each layer's input, no residual rotation).

Run: ``python papers/quarot/reproduce.py [--fast]``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # papers/: the shared set-up

import _ptq_common as common
import jax

import jaxquant as jq
from jaxquant.flax import Rule
from jaxquant.ptq import gptq, rotate_inputs, rotate_residual

W4A4 = [
    Rule(
        common.LAYERS,
        weight=jq.QuantSpec("int4", jq.per_channel(-1)),
        act=jq.QuantSpec("int4", jq.per_token()),
    )
]
UNUSABLE = 1.0  # plain W4A4 on the outlier model: > 1 nat/byte above float
RTN_GAP = 0.05  # rotation + RTN: within 5 % of float's loss
GPTQ_GAP = 0.03  # rotation + GPTQ: within 3 %


def main(fast: bool = False) -> dict[str, Any]:
    t0 = time.perf_counter()
    seeds = (0,) if fast else (0, 1)
    beds = ("outliers",) if fast else ("outliers", "base")
    windows = 64 if fast else 256
    lm = common.model(common.SMALL)
    cal = common.calibration_batches()
    runs = common.Runs()
    add = runs.add
    for seed, bed, v, f in common.seeds_and_beds(common.SMALL, seeds, beds, windows, runs):
        add(f"{bed}/rtn", common.rtn_loss(lm, W4A4, v, windows) - f)
        rot = rotate_residual(lm, cal, v, rules=W4A4, key=jax.random.key(seed))
        assert not rot.skipped, rot.skipped
        add(f"{bed}/rotate+rtn", common.rtn_loss(lm, W4A4, rot.variables, windows) - f)
        solved = gptq(lm, cal, rot.variables, rules=W4A4)
        assert not solved.skipped, solved.skipped
        add(f"{bed}/rotate+gptq", common.served_loss(lm, W4A4, solved.variables, windows) - f)
        if not fast:
            smear = rotate_inputs(lm, cal, v, rules=W4A4, key=jax.random.key(seed))
            add(
                f"{bed}/rotate_inputs+rtn",
                common.rtn_loss(lm, W4A4, smear.variables, windows) - f,
            )
    m = runs.means()
    f = m["outliers/float"]
    checks = {
        f"outliers: plain W4A4 > +{UNUSABLE} nats/byte (unusable)": m["outliers/rtn"] > UNUSABLE,
        f"outliers: rotation + RTN within {RTN_GAP:.0%} of float": m["outliers/rotate+rtn"]
        < RTN_GAP * f,
        f"outliers: rotation + GPTQ within {GPTQ_GAP:.0%} of float": m["outliers/rotate+gptq"]
        < GPTQ_GAP * f,
        "outliers: rotation + GPTQ < rotation + RTN": m["outliers/rotate+gptq"]
        < m["outliers/rotate+rtn"],
    }
    if "base" in beds:
        checks["base: rotation + GPTQ < plain W4A4"] = m["base/rotate+gptq"] < m["base/rtn"]
    return common.result(
        t0,
        runs,
        m,
        checks,
        (
            f"on the outlier model (mean over seeds) plain W4A4 is > {UNUSABLE} nats/byte above "
            f"float, rotate_residual + RTN within {RTN_GAP:.0%} and rotate_residual + GPTQ "
            f"within {GPTQ_GAP:.0%} of float's held-out loss, GPTQ below RTN"
        ),
        seeds=list(seeds),
        beds=list(beds),
        test_windows=windows,
    )


def markdown(res: dict[str, Any]) -> str:
    runs = res["runs"]
    methods = [
        k.split("/", 1)[1] for k in runs if k.startswith("outliers/") and k != "outliers/float"
    ]
    lines = [
        f"ByteLM d=64, seeds {res['seeds']}, {res['test_windows']} held-out windows; W4A4 = "
        "int4 per-channel weights, dynamic int4 per-token activations. Loss increase over "
        "float, nats/byte, mean (per seed):",
        "",
        "| model | float | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for bed in res["beds"]:
        cells = [common.seeds_cell(runs[f"{bed}/{k}"]) for k in methods]
        lines.append(
            f"| {bed} | {common.seeds_cell(runs[f'{bed}/float'], '.4f')} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines + common.checks_markdown(res))


if __name__ == "__main__":
    common.cli(main, markdown, __file__)
