"""Xiao et al. 2022, "SmoothQuant: Accurate and Efficient Post-Training Quantization for
Large Language Models" (arXiv:2211.10438), Section 3 / Table 3-4: a few activation
channels of LLMs are 100x larger than the rest, so W8A8 with per-tensor (or per-token)
activation scales breaks; migrating the difficulty into the weights with per-channel
scales ``s_j = max|X_j|^a / max|W_j|^(1-a)`` (a = 0.5), folded into the preceding
LayerNorm, recovers float accuracy.

Setup: the byte LM of papers/_ptq_common.py (d=64, 2 blocks) and its outlier variant
(``inject_outliers``: 4 residual channels 60-1000x at every LayerNorm's output, the same
float function). W8A8: int8 per-output-channel weights, dynamic int8 activations per
tensor or per token, every Dense of the blocks and the head. Plain RTN vs
``jaxquant.ptq.smooth_quant`` (alpha 0.5, folded) then RTN.

Run: ``python papers/smoothquant/reproduce.py [--fast]``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # papers/: the shared set-up

import _ptq_common as common

import jaxquant as jq
from jaxquant.flax import Rule
from jaxquant.ptq import smooth_quant

W8 = jq.QuantSpec("int8", jq.per_channel())
ACTS = {"per-tensor": jq.QuantSpec("int8"), "per-token": jq.QuantSpec("int8", jq.per_token())}
WITHIN = 0.01  # SmoothQuant's loss within 1 % of float's
BROKEN = 0.5  # plain W8A8 on the outlier model: > 0.5 nats/byte above float


def main(fast: bool = False) -> dict[str, Any]:
    t0 = time.perf_counter()
    seeds = (0,) if fast else (0, 1)
    beds = ("outliers",) if fast else ("base", "outliers")
    windows = 64 if fast else 256
    lm = common.model(common.SMALL)
    cal = common.calibration_batches()
    runs = common.Runs()
    add = runs.add
    for _, bed, v, f in common.seeds_and_beds(common.SMALL, seeds, beds, windows, runs):
        for act, spec in ACTS.items():
            rules = [Rule(common.LAYERS, weight=W8, act=spec)]
            add(f"{bed}/{act}/rtn", common.rtn_loss(lm, rules, v, windows) - f)
            res = smooth_quant(lm, cal, v, rules=rules, alpha=0.5)
            assert not res.skipped, res.skipped
            sq = common.rtn_loss(lm, rules, res.variables, windows)
            add(f"{bed}/{act}/smoothquant", sq - f)
            add(f"{bed}/{act}/smoothquant_rel", (sq - f) / f)
    m = runs.means()
    checks = {}
    for act in ACTS:
        checks[f"outliers {act}: plain W8A8 > +{BROKEN} nats/byte"] = (
            m[f"outliers/{act}/rtn"] > BROKEN
        )
        checks[f"outliers {act}: SmoothQuant within {WITHIN:.0%} of float (every seed)"] = all(
            abs(r) < WITHIN for r in runs[f"outliers/{act}/smoothquant_rel"]
        )
    if "base" in beds:
        checks[f"base: SmoothQuant within {WITHIN:.0%} of float (every seed, both acts)"] = all(
            abs(r) < WITHIN for act in ACTS for r in runs[f"base/{act}/smoothquant_rel"]
        )
    return common.result(
        t0,
        runs,
        m,
        checks,
        (
            f"on the outlier model plain W8A8 is > {BROKEN} nats/byte above float and "
            f"SmoothQuant W8A8 is within {WITHIN:.0%} of float's held-out loss (per-tensor "
            "and per-token activations, every seed)"
        ),
        seeds=list(seeds),
        beds=list(beds),
        test_windows=windows,
    )


def markdown(res: dict[str, Any]) -> str:
    runs = res["runs"]
    lines = [
        f"ByteLM d=64, seeds {res['seeds']}, {res['test_windows']} held-out windows; W8A8 = "
        "int8 per-channel weights, dynamic int8 activations. Loss increase over float, "
        "nats/byte, mean (per seed):",
        "",
        "| model | float | activations | plain W8A8 | SmoothQuant W8A8 | SmoothQuant / float |",
        "|---|---|---|---|---|---|",
    ]
    for bed in res["beds"]:
        for act in ACTS:
            rel = runs[f"{bed}/{act}/smoothquant_rel"]
            lines.append(
                f"| {bed} | {common.seeds_cell(runs[f'{bed}/float'], '.4f')} | {act} "
                f"| {common.seeds_cell(runs[f'{bed}/{act}/rtn'])} "
                f"| {common.seeds_cell(runs[f'{bed}/{act}/smoothquant'])} "
                f"| {common.seeds_cell([100 * r for r in rel], '+.3f')} % |"
            )
    return "\n".join(lines + common.checks_markdown(res))


if __name__ == "__main__":
    common.cli(main, markdown, __file__)
