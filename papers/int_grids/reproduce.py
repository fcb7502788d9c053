"""Which integer grid for weight-only RTN: restricted, full or asymmetric, at 2, 3, 4, 8 bits.

Three grids for a b-bit integer weight, ``qmax = 2^(b-1) - 1`` (jaxquant's ``QuantSpec``):

* restricted (``int_grid="restricted"``, the default from int4 on): ``s = amax / qmax``, codes
  ``[-qmax, qmax]``, 2^b - 1 levels (the grid of Jacob et al. 2018, arXiv:1712.05877, and
  of most int8 toolchains);
* full (``int_grid="full"``, Qwix's, the default at int2 / int3): ``s = amax / (qmax + 0.5)``,
  codes ``[-2^(b-1), qmax]``, all 2^b levels;
* asymmetric (``symmetric=False``): ``s = (max - min) / (2^b - 1)`` and a zero point, the
  grid of GPTQ / AWQ's group-wise int4 (arXiv:2210.17323, arXiv:2306.00978).

The test bed is the PTQ tests' byte LM (``tests/ptq_testbed.py``'s configuration, trained
by ``jaxquant.app.testbed``): a 2-block pre-LN transformer, d 64, trained 300 steps on the
Python standard library's source. Every Dense kernel of ``block<i>/...`` and ``head`` is
quantized round-to-nearest (absmax / min-max calibration) per output channel or per group of
32 input channels, the rest stays float, and the score is the held-out loss increase over
float in nats per byte, with its paired standard error over held-out windows.

Run: ``python papers/int_grids/reproduce.py [--fast]`` (full: 5 training seeds, 512
held-out windows; fast: seed 0, 128 windows). Trained parameters are cached in the temp
directory.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

try:
    import jaxquant as jq
except ImportError:  # run from a checkout without installing: use the repo's copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import jaxquant as jq

from jaxquant.app import testbed
from jaxquant.app.models import ByteLM

# The PTQ tests' model and training (tests/ptq_testbed.py), from jaxquant.app.testbed.
CONFIG = testbed.CONFIG
MODEL = ByteLM(**CONFIG)
QUANTIZED = re.compile(testbed.LAYERS)  # every Dense of the blocks and the head
GROUP = 32  # input channels per scale for per-group
BITS = (2, 3, 4, 8)
GRIDS = ("restricted", "full", "asymmetric")
GRANULARITIES = ("per-channel", "per-group")
NOISE_SE = 3.0  # "within noise": |full - restricted| <= 3 standard errors

CRITERION = (
    "weight-only RTN on the byte LM, held-out loss increase over float (mean over seeds): "
    "full < restricted at 2, 3 and 4 bits, per channel and per group of 32; at 8 bits "
    f"|full - restricted| <= {NOISE_SE:g} standard errors (of the paired difference: over "
    "training seeds, or over held-out windows with one seed)"
)


def spec_for(grid: str, bits: int, granularity: str) -> jq.QuantSpec:
    """The weight spec: per output channel (the kernel's last axis) or per group of 32
    input channels (blocks along the kernel's first, contracted, axis)."""
    g = jq.per_channel(-1) if granularity == "per-channel" else jq.per_block(0, GROUP)
    if grid == "asymmetric":
        return jq.QuantSpec(f"int{bits}", g, symmetric=False)
    return jq.QuantSpec(f"int{bits}", g, int_grid=grid)


def train(seed: int) -> dict:
    """The test bed's trained params for ``seed`` (cached in the temp directory)."""
    return testbed.train_byte_lm(CONFIG, {**testbed.TRAINING, "seed": seed})


def rtn(params: dict, spec: jq.QuantSpec) -> tuple[dict, float]:
    """(params with every quantized kernel round-to-nearest on ``spec``, the kernels'
    relative squared error ``sum |W - Q(W)|^2 / sum |W|^2``)."""
    err, ref = [], []

    def one(path, leaf):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if not (name.endswith("/kernel") and QUANTIZED.fullmatch(name[: -len("/kernel")])):
            return leaf
        w_hat = jq.fake_quant(leaf, spec)
        err.append(jnp.sum((leaf - w_hat) ** 2))
        ref.append(jnp.sum(leaf**2))
        return w_hat

    out = jax.tree_util.tree_map_with_path(one, params)
    if len(err) != 6 * CONFIG["layers"] + 1:  # q k v o fc1 fc2 per block, and the head
        raise RuntimeError(f"expected {6 * CONFIG['layers'] + 1} quantized kernels, got {len(err)}")
    return out, float(sum(err) / sum(ref))


def main(fast: bool = False) -> dict:
    seeds = (0,) if fast else (0, 1, 2, 3, 4)
    windows = 128 if fast else 512
    data = testbed.data(CONFIG["seq"], windows, testbed.TRAINING["max_files"])
    xt, yt = jnp.asarray(data["x_test"]), jnp.asarray(data["y_test"])

    @jax.jit
    def window_loss(params):  # mean nats per byte of each held-out window
        logits = MODEL.apply({"params": params}, xt)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yt).mean(axis=1)

    cells: dict[tuple[str, int, str], dict] = {}
    floats = []
    for seed in seeds:
        params = train(seed)
        base = np.asarray(window_loss(params), np.float64)
        floats.append(float(base.mean()))
        for gran in GRANULARITIES:
            for bits in BITS:
                per_grid = {}
                for grid in GRIDS:
                    qp, werr = rtn(params, spec_for(grid, bits, gran))
                    per_grid[grid] = np.asarray(window_loss(qp), np.float64) - base
                    c = cells.setdefault((gran, bits, grid), {"delta": [], "werr": [], "se": []})
                    d = per_grid[grid]
                    c["delta"].append(float(d.mean()))
                    c["werr"].append(werr)
                    c["se"].append(float(d.std(ddof=1) / np.sqrt(d.size)))
                # the paired difference full - restricted, window by window
                diff = per_grid["full"] - per_grid["restricted"]
                c = cells.setdefault((gran, bits, "full-restricted"), {"delta": [], "se": []})
                c["delta"].append(float(diff.mean()))
                c["se"].append(float(diff.std(ddof=1) / np.sqrt(diff.size)))

    def mean(key, field="delta"):
        return float(np.mean(cells[key][field]))

    def pooled_se(key):
        """The standard error of the mean over seeds: from the spread of the seeds' means
        (the rounding luck of each trained model and the windows' noise) with 2 or more
        seeds, from the held-out windows alone (the paired standard error) with one."""
        d = np.asarray(cells[key]["delta"])
        if d.size >= 2:
            return float(d.std(ddof=1) / np.sqrt(d.size))
        return float(cells[key]["se"][0])

    rows = []
    ok = True
    default = {}
    for gran in GRANULARITIES:
        for bits in BITS:
            d_full = mean((gran, bits, "full-restricted"))
            se = pooled_se((gran, bits, "full-restricted"))
            if bits < 8:
                cell_ok = mean((gran, bits, "full")) < mean((gran, bits, "restricted"))
            else:
                cell_ok = abs(d_full) <= NOISE_SE * se
            ok = ok and cell_ok
            row = {
                "granularity": gran,
                "bits": bits,
                "full_minus_restricted": d_full,
                "paired_se": se,
                "ok": cell_ok,
            }
            for grid in GRIDS:
                row[grid] = mean((gran, bits, grid))
                row[f"{grid}_se"] = pooled_se((gran, bits, grid))
                row[f"{grid}_werr"] = mean((gran, bits, grid), "werr")
                row[f"{grid}_seeds"] = list(cells[(gran, bits, grid)]["delta"])
            rows.append(row)
    for bits in BITS:  # the symmetric grid with the lower loss, both granularities
        picks = {
            ("full" if r["full"] < r["restricted"] else "restricted")
            for r in rows
            if r["bits"] == bits
        }
        if bits == 8 and all(r["ok"] for r in rows if r["bits"] == 8):
            # within noise: keep the grid every int8 toolchain shares (and the serialized
            # models and recorded numbers of the library)
            default[bits] = "restricted"
        else:
            default[bits] = picks.pop() if len(picks) == 1 else "mixed"
    return {
        "seeds": list(seeds),
        "windows": windows,
        "float_loss": float(np.mean(floats)),
        "float_loss_seeds": floats,
        "rows": rows,
        "default": default,
        # what QuantSpec's int_grid="auto" picks: it should be this table's default
        "library_default": {b: jq.QuantSpec(f"int{b}").int_grid for b in BITS},
        "criterion": CRITERION,
        "passed": bool(ok),
    }


def markdown(res: dict) -> str:
    lines = [
        f"Float held-out loss {res['float_loss']:.4f} nats/byte (seeds "
        + ", ".join(f"{v:.4f}" for v in res["float_loss_seeds"])
        + f"), {res['windows']} windows of {CONFIG['seq']} bytes.",
        "",
        "Held-out loss increase over float (nats/byte, mean over seeds ± standard error), "
        "and the kernels' relative squared error:",
        "",
        "| weights | restricted | full | asymmetric | full − restricted | rel. weight error "
        "(r / f / a) | ok |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        cells = [f"{r[g]:+.4f} ± {r[g + '_se']:.4f}" for g in GRIDS]
        best = min(GRIDS, key=lambda g: r[g])
        cells = [f"**{c}**" if g == best else c for g, c in zip(GRIDS, cells, strict=True)]
        werr = " / ".join(f"{r[g + '_werr']:.2e}" for g in GRIDS)
        lines.append(
            f"| int{r['bits']} {r['granularity']} | {' | '.join(cells)} | "
            f"{r['full_minus_restricted']:+.4f} ± {r['paired_se']:.4f} | {werr} | "
            f"{'yes' if r['ok'] else 'NO'} |"
        )
    lines += [
        "",
        "Default symmetric grid per bit width (this table): "
        + ", ".join(f"int{b}: {g}" for b, g in res["default"].items()),
        "",
        "jq.QuantSpec's default (int_grid='auto'): "
        + ", ".join(f"int{b}: {g}" for b, g in res["library_default"].items()),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="1 seed, 128 held-out windows")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()
    res = main(fast=args.fast)
    print(markdown(res))
    print(f"\nCriterion: {res['criterion']}\nPassed: {res['passed']}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    sys.exit(0 if res["passed"] else 1)
