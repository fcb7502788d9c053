"""Shared set-up of the transformer post-training papers (papers/{gptq, smoothquant, quarot,
awq, kv_cache}/): a small byte-level LM (:class:`jaxquant.app.models.ByteLM`) trained on the
Python standard library's source (:func:`jaxquant.app.datasets.stdlib_bytes`), its held-out
loss, and the outlier variant (:func:`jaxquant.app.models.inject_outliers`).

Training is :mod:`jaxquant.app.testbed`'s (deterministic, cached in the temp directory by
configuration), so the five papers (and their --fast tests) train each model once per
machine. Uses ``jaxquant.app`` and the public API only.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxquant.app import testbed  # noqa: E402
from jaxquant.app.models import ByteLM  # noqa: E402
from jaxquant.flax import Rule, convert  # noqa: E402

# Every Dense of the blocks and the head is quantized; the embedding stays in float.
LAYERS = testbed.LAYERS
# The small model (d=64) and the wider one (d=128: groups of 128 fit every layer).
SMALL = {"seq": 64, "d": 64, "layers": 2, "heads": 4, "hidden": 256}
WIDE = {"seq": 64, "d": 128, "layers": 2, "heads": 4, "hidden": 512}
# Residual channels made 60-1000x larger at every quantized layer's input (same function).
OUTLIERS = testbed.OUTLIERS
MAX_FILES = 60


def data(seq: int = 64, test_windows: int = 64) -> dict[str, np.ndarray]:
    """Training and held-out windows of ``seq`` bytes (held-out files never trained on)."""
    return testbed.data(seq, test_windows, MAX_FILES)


def model(config: dict[str, int]) -> ByteLM:
    return ByteLM(**config)


def train(
    config: dict[str, int], *, steps: int = 300, seed: int = 0, lr: float = 3e-3, batch: int = 32
) -> Any:
    """The trained float ``params`` of ``ByteLM(**config)`` (Adam, cosine decay; cached)."""
    recipe = {"steps": steps, "seed": seed, "lr": lr, "batch": batch, "max_files": MAX_FILES}
    return testbed.train_byte_lm(config, recipe)


def outliers(params: Any) -> Any:
    """``params`` with 4 residual channels 60-1000x the median at every quantized layer's
    input: the same float function (large LMs' massive activations, built in)."""
    return testbed.outlier_params(params, OUTLIERS)


def calibration_batches(seq: int = 64, n: int = 4, size: int = 16) -> list[jax.Array]:
    """Training windows spread over the training split (never the held-out ones)."""
    return testbed.calibration_batches(data(seq)["x_train"], n, size)


def eval_loss(apply_fn: Any, variables: Any, seq: int = 64, test_windows: int = 64) -> float:
    """Held-out nats per byte of ``apply_fn(variables, x)``."""
    d = data(seq, test_windows)
    return testbed.eval_loss(apply_fn, variables, d["x_test"], d["y_test"])


def rtn_loss(lm: ByteLM, rules: list[Rule], variables: Any, test_windows: int = 64) -> float:
    """Held-out loss served with round-to-nearest weights (``convert``) and ``rules``' acts;
    ``variables`` may carry a method's folded params and its ``"ptq"`` transforms."""
    qm = testbed.quantized(lm, tuple(rules))
    return eval_loss(qm.apply, convert(qm, variables), lm.seq, test_windows)


def served_loss(lm: ByteLM, rules: list[Rule], served: Any, test_windows: int = 64) -> float:
    """Held-out loss of an already converted tree (e.g. GPTQ's result)."""
    return eval_loss(testbed.quantized(lm, tuple(rules)).apply, served, lm.seq, test_windows)


def float_loss(lm: ByteLM, variables: Any, test_windows: int = 64) -> float:
    return eval_loss(lm.apply, variables, lm.seq, test_windows)


def ppl(nats: float) -> float:
    """Perplexity per byte, ``exp(nats per byte)``."""
    return math.exp(nats)


def mean(xs: list[float]) -> float:
    return float(np.mean(xs))


class Runs(dict[str, list[float]]):
    """Per-seed numbers by key (``"outliers/w4/rtn"``), in run order."""

    def add(self, key: str, value: float) -> None:
        self.setdefault(key, []).append(value)

    def means(self) -> dict[str, float]:
        return {k: mean(x) for k, x in self.items()}


def seeds_and_beds(
    config: dict[str, int], seeds: tuple[int, ...], beds: tuple[str, ...], windows: int, runs: Runs
) -> Iterator[tuple[int, str, dict[str, Any], float]]:
    """``(seed, bed, variables, float loss)`` for every trained seed and test bed (``"base"``
    or ``"outliers"``: :func:`outliers` of it), recording ``runs["<bed>/float"]``."""
    lm = model(config)
    for seed in seeds:
        base = train(config, seed=seed)
        for bed in beds:
            v = {"params": outliers(base) if bed == "outliers" else base}
            f = float_loss(lm, v, windows)
            runs.add(f"{bed}/float", f)
            yield seed, bed, v, f


def result(
    t0: float,
    runs: Runs,
    m: dict[str, float],
    checks: dict[str, bool],
    criterion: str,
    **fields: Any,
) -> dict[str, Any]:
    """A paper's result: its own ``fields``, the runs and their means, the checks and
    whether all hold, and the seconds since ``t0``."""
    return {
        **fields,
        "runs": dict(runs),
        "mean": m,
        "checks": checks,
        "criterion": criterion,
        "passed": bool(all(checks.values())),
        "seconds": time.perf_counter() - t0,
    }


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.write_text(json.dumps(result, indent=1, sort_keys=True, default=float) + "\n")


def seeds_cell(xs: list[float], fmt: str = "+.4f") -> str:
    """``mean (seed values)`` of a list of per-seed numbers."""
    return f"{np.mean(xs):{fmt}} ({', '.join(f'{x:{fmt}}' for x in xs)})"


def checks_markdown(res: dict[str, Any]) -> list[str]:
    lines = ["", "| check | holds |", "|---|---|"]
    lines += [f"| {k} | {'yes' if v else '**no**'} |" for k, v in res["checks"].items()]
    lines += [
        "",
        f"Criterion: {res['criterion']} -> **{'pass' if res['passed'] else 'FAIL'}** "
        f"({res['seconds']:.1f} s)",
    ]
    return lines


def cli(main: Any, markdown: Any, file: str) -> None:
    """``python reproduce.py [--fast]``: print the markdown; the full run also writes
    ``results.json`` next to the script; exit status 1 when the criterion fails."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--fast", action="store_true")
    args = ap.parse_args()
    out = main(fast=args.fast)
    if not args.fast:
        write_json(Path(file).with_name("results.json"), out)
    print(markdown(out))
    sys.exit(0 if out["passed"] else 1)
