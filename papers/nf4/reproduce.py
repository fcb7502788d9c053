"""Reproduce the NF4 data type of Dettmers et al. 2023, "QLoRA".

arXiv:2305.14314, Section 3 ("4-bit NormalFloat Quantization", the quantile construction
with its offset) and Appendix E (the 16 NF4 values). Three checks:

(a) jaxquant's ``nf4`` codebook equals the Appendix E values as float32, bit for bit;
(b) the values are re-derived from the construction and agree within 1e-6;
(c) on normal weights in blocks of 64 with absmax scaling (QLoRA's setting), NF4's
    reconstruction MSE is below int4's (symmetric absmax, same blocks) and fp4's (e2m1).

The construction (Section 3, as implemented in bitsandbytes ``create_normal_map``): with
``offset = 1 - (1/(2*15) + 1/(2*16)) / 2 = 0.9677083``, take the 8 positive values
``Phi^-1(linspace(offset, 0.5, 9)[:-1])``, the 7 negative values
``-Phi^-1(linspace(offset, 0.5, 8)[:-1])`` and an exact 0, then divide by the largest so
the set spans [-1, 1]. The asymmetry (8 positive, 7 negative) buys an exact zero with all
2^4 codes used.

Run: ``python papers/nf4/reproduce.py [--fast]`` (full: a 4096x4096 matrix as in the
brief; fast: 128x4096).
"""

from __future__ import annotations

import argparse
import sys
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np

try:
    import jaxquant as jq
except ImportError:  # run from a checkout without installing: use the repo's copy
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import jaxquant as jq

CRITERION = (
    "(a) jq nf4 codebook == Appendix E values as float32 (exact); (b) values re-derived "
    "from the quantile construction within 1e-6; (c) on N(0,1) weights, blocks of 64, "
    "absmax: MSE(nf4) < MSE(int4) and MSE(nf4) < MSE(fp4 e2m1)"
)

# QLoRA, arXiv:2305.14314, Appendix E ("NormalFloat 4-bit data type"), in order.
PAPER_NF4 = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
DERIVATION_TOL = 1e-6
BLOCK = 64  # QLoRA's blocksize for the weights


def derive_nf4(offset: float = 1 - 0.5 * (1 / 30 + 1 / 32)) -> np.ndarray:
    """The 16 NF4 values from the construction (float64)."""
    inv = NormalDist().inv_cdf
    pos = [inv(float(p)) for p in np.linspace(offset, 0.5, 9)[:-1]]
    neg = [-inv(float(p)) for p in np.linspace(offset, 0.5, 8)[:-1]]
    vals = np.array(sorted([*pos, 0.0, *neg]))
    return vals / vals.max()


def block_mse(w: jax.Array, fmt: str) -> float:
    """Quantize-dequantize MSE of ``w`` with absmax scales per block of 64 along -1."""
    spec = jq.QuantSpec(fmt, granularity=jq.per_block(-1, BLOCK))
    return float(jq.metrics.mse(w, jq.dequantize(jq.quantize(w, spec))))


def main(fast: bool = False) -> dict:
    ours = np.asarray(jq.formats.get("nf4").codebook, dtype=np.float32)
    paper32 = np.asarray(PAPER_NF4, dtype=np.float32)
    codebook_equal = bool(np.array_equal(ours.view(np.uint32), paper32.view(np.uint32)))

    derived = derive_nf4()
    derive_err = float(np.max(np.abs(derived - np.asarray(PAPER_NF4))))

    rows = 128 if fast else 4096
    w = jax.random.normal(jax.random.key(0), (rows, 4096), jnp.float32)
    mse = {f: block_mse(w, f) for f in ("nf4", "int4", "fp4")}
    result = {
        "codebook_equal": codebook_equal,
        "derived": derived.tolist(),
        "derive_max_abs_err": derive_err,
        "shape": (rows, 4096),
        "mse_nf4": mse["nf4"],
        "mse_int4": mse["int4"],
        "mse_fp4": mse["fp4"],
        "int4_over_nf4": mse["int4"] / mse["nf4"],
        "fp4_over_nf4": mse["fp4"] / mse["nf4"],
        "criterion": CRITERION,
    }
    result["passed"] = bool(
        codebook_equal
        and derive_err <= DERIVATION_TOL
        and mse["nf4"] < mse["int4"]
        and mse["nf4"] < mse["fp4"]
    )
    return result


def markdown(res: dict) -> str:
    lines = [
        "| index | paper (App. E) | jaxquant nf4 | re-derived | derived - paper |",
        "|---|---|---|---|---|",
    ]
    ours = jq.formats.get("nf4").codebook
    for i, (p, o, d) in enumerate(zip(PAPER_NF4, ours, res["derived"], strict=True)):
        lines.append(f"| {i} | {p!r} | {o!r} | {d:.10f} | {d - p:+.2e} |")
    lines += [
        "",
        f"Codebook equal to Appendix E (float32 bits): {res['codebook_equal']}; "
        f"max |derived - paper| = {res['derive_max_abs_err']:.2e} (tolerance {DERIVATION_TOL}).",
        "",
        f"Reconstruction MSE, N(0,1) weights {res['shape'][0]}x{res['shape'][1]}, "
        f"absmax per block of {BLOCK}:",
        "",
        "| format | MSE | MSE / MSE(nf4) |",
        "|---|---|---|",
        f"| nf4 | {res['mse_nf4']:.6f} | 1.000 |",
        f"| int4 (symmetric, levels -7..7) | {res['mse_int4']:.6f} | {res['int4_over_nf4']:.3f} |",
        f"| fp4 (e2m1) | {res['mse_fp4']:.6f} | {res['fp4_over_nf4']:.3f} |",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="128x4096 instead of 4096x4096")
    args = parser.parse_args()
    res = main(fast=args.fast)
    print(markdown(res))
    print(f"\nCriterion: {res['criterion']}\nPassed: {res['passed']}")
    sys.exit(0 if res["passed"] else 1)
