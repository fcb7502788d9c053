"""Throughput of jaxquant's quantizers against a plain copy, counted by the bytes they must move.

For a large float32 matrix (4096^2 on CPU, 16384^2 on GPU), every case is compiled once with
``jax.jit`` (ahead of time: lower, compile) and timed after a warm-up call. Each timing
sample is ``--inner`` back-to-back calls on rotating input buffers followed by
``block_until_ready``; the reported time is the median sample divided by ``--inner``. The
optimized HLO's ENTRY computation is parsed for its fusion count (one fusion = one kernel /
one loop nest over memory); ``--hlo-dir`` writes the HLO text of every case.

Bytes counted per case (what the algorithm must move, not what XLA happens to move):

* reads: ``1 x input`` when the scale is known (static/delayed scaling, a plain cast) or
  block-local along the contiguous axis (per-block, MX, per-row); ``2 x input`` when a
  dynamic scale needs a reduction over the strided axis (per-tensor, per-column), since the
  whole reduction has to finish before the first element can be written.
* writes: the true size of the outputs (``jax.eval_shape``): int8 codes 1 B/elem, packed
  int4 0.5 B/elem, fake_quant 4 B/elem (float32), plus the scales ``quantize`` returns.

The baseline is ``x * 2`` under ``jax.jit`` writing a fresh (not donated) output:
4 + 4 bytes per element. It is timed interleaved with every case (each sample runs the copy,
then the case), so both see the same machine load. ``GB/s`` is counted bytes / time
(1 GB = 1e9 B); ``bw_ratio`` is a case's GB/s over the interleaved copy's; ``time_ratio`` is
its time over the interleaved copy's. The targets: ``bw_ratio >= 0.85`` for every quantizer,
and stochastic rounding at most 15% slower than the same quantizer with round-to-nearest.

Usage::

  python benchmarks/quantize_throughput.py [--size 4096] [--reps 10] [--out path.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for common
import common  # puts the repository root on sys.path too

import jaxquant as jq
from jaxquant.app.timing import seconds_per_call

try:
    import resource
except ImportError:  # not on Windows
    resource = None  # type: ignore[assignment]


@dataclasses.dataclass(frozen=True)
class Case:
    """One timed function of ``(x, scale, key)``."""

    name: str
    op: str  # "quantize", "fake_quant", "copy" or "ref"
    fn: Callable[[jax.Array, jax.Array, jax.Array], Any]
    read_passes: int  # 1: scale known or block-local along the contiguous axis; 2: strided
    target: bool = True  # held to the bandwidth target (False for the baseline/references)
    rtn_pair: str | None = None  # the round-to-nearest case an SR case is compared with
    donate: bool = False  # reference only: the output reuses the (donated) input buffer


def _specs() -> list[tuple[str, jq.QuantSpec, int, bool]]:
    """(name, spec, read passes, static scale) for every quantizer measured."""
    sr = dict(rounding="stochastic")
    return [
        ("int8 per-tensor", jq.QuantSpec("int8"), 2, False),
        ("int8 per-row (per_token)", jq.QuantSpec("int8", jq.per_token()), 1, False),
        ("int8 per-column (per_channel(-1))", jq.QuantSpec("int8", jq.per_channel(-1)), 2, False),
        ("int8 per-block-32", jq.QuantSpec("int8", jq.per_block(-1, 32)), 1, False),
        ("int4 per-block-32", jq.QuantSpec("int4", jq.per_block(-1, 32)), 1, False),
        ("mxfp8 (block 32)", jq.QuantSpec("mxfp8"), 1, False),
        ("int8 static scale", jq.QuantSpec("int8"), 1, True),
        ("e4m3 static scale", jq.QuantSpec("e4m3"), 1, True),
        ("e4m3 per-tensor", jq.QuantSpec("e4m3"), 2, False),
        ("int8 per-tensor SR hash", jq.QuantSpec("int8", **sr, rng="hash"), 2, False),
        ("int8 per-tensor SR threefry", jq.QuantSpec("int8", **sr, rng="threefry"), 2, False),
        ("e4m3 per-tensor SR hash", jq.QuantSpec("e4m3", **sr, rng="hash"), 2, False),
        ("e4m3 per-tensor SR threefry", jq.QuantSpec("e4m3", **sr, rng="threefry"), 2, False),
        ("bf16 cast RNE", jq.QuantSpec("bf16", calibration=None), 1, False),
        ("bf16 cast SR hash", jq.QuantSpec("bf16", calibration=None, **sr), 1, False),
    ]


_RTN_PAIR = {
    "int8 per-tensor SR hash": "int8 per-tensor",
    "int8 per-tensor SR threefry": "int8 per-tensor",
    "e4m3 per-tensor SR hash": "e4m3 per-tensor",
    "e4m3 per-tensor SR threefry": "e4m3 per-tensor",
    "bf16 cast SR hash": "bf16 cast RNE",
}


def _make(spec: jq.QuantSpec, op: str, static: bool) -> Callable:
    quant = jq.quantize if op == "quantize" else jq.fake_quant

    def f(x, scale, key):
        return quant(
            x,
            spec,
            key=key if spec.stochastic else None,
            scale=scale if static else None,
        )

    return f


def build_cases(ops: tuple[str, ...]) -> list[Case]:
    cases = [Case("copy x*2 (fresh output)", "copy", lambda x, s, k: x * 2, 1, target=False)]
    for name, spec, passes, static in _specs():
        for op in ops:
            pair = _RTN_PAIR.get(name)
            cases.append(Case(name, op, _make(spec, op, static), passes, rtn_pair=pair))
    # References only (no target): XLA's own float32 -> bfloat16 convert, to compare with
    # jaxquant's cast; and the copy with its input donated, which shows what a fresh output
    # costs on this machine (on CPU: first-touch page faults of the new buffer).
    cases.append(
        Case(
            "x.astype(bf16) (XLA convert)",
            "ref",
            lambda x, s, k: x.astype(jnp.bfloat16),
            1,
            target=False,
        )
    )
    cases.append(
        Case("copy x*2 (donated input)", "ref", lambda x, s, k: x * 2, 1, target=False, donate=True)
    )
    return cases


# --------------------------------------------------------------------------- measuring


def _nbytes(tree: Any) -> int:
    return sum(
        math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(tree)
    )


_SKIP_OPS = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}
_OP_RE = re.compile(r"=\s*[^=]*?\s([a-z][a-z0-9\-]*)\(")


def hlo_kernels(hlo: str) -> tuple[int, list[str]]:
    """(fusion count, op names) of the optimized HLO's ENTRY computation.

    Each listed op is one kernel launch / one loop nest over memory (parameters, constants,
    tuples and bitcasts excluded). ``fusion`` ops are XLA's fused kernels.
    """
    m = re.search(r"^ENTRY [^\n]*\{\n(.*?)^\}", hlo, re.S | re.M)
    if m is None:
        return 0, []
    ops = []
    for line in m.group(1).splitlines():
        om = _OP_RE.search(line)
        if om is None:
            continue
        op = om.group(1)
        if op in _SKIP_OPS:
            continue
        kind = re.search(r"kind=(k\w+)", line)
        ops.append(f"{op}:{kind.group(1)}" if kind else op)
    return sum(o.startswith("fusion") for o in ops), ops


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def _run_block(compiled: Callable, args: Callable[[int], tuple], inner: int, start: int) -> float:
    """Seconds per call of ``inner`` back-to-back calls on inputs ``args(start)``,
    ``args(start + 1)``, ... (:func:`jaxquant.app.timing.seconds_per_call`; the inputs
    rotate so that no call reads a buffer the previous one left in cache)."""
    i = iter(range(start, start + inner))
    return seconds_per_call(lambda: compiled(*args(next(i))), inner)


class Timing(NamedTuple):
    median: float  # seconds per call
    min: float
    base_median: list[float]  # per interleaved baseline (copy, RTN pair), same order
    base_min: list[float]
    faults: float  # minor page faults per call of the case


def time_case(
    compiled: Callable,
    baselines: list[Callable],
    xs: list[jax.Array],
    scale: jax.Array,
    key: jax.Array,
    reps: int,
    inner: int,
    donate: bool = False,
) -> Timing:
    """Median and min seconds per call of ``compiled`` and of each baseline; page faults.

    Each of ``reps`` samples runs ``inner`` calls of every baseline (the copy; for a
    stochastic-rounding case also its round-to-nearest twin), then ``inner`` calls of
    ``compiled``, so all of them see the same machine load. Inputs rotate over ``xs``; a
    donating function is fed its own output instead.
    """
    n = len(xs)
    state = {"y": jax.block_until_ready(xs[0] * 1)} if donate else {}

    def case_args(i: int) -> tuple:
        if donate:
            return (state["y"], scale, key)
        return (xs[i % n], scale, key)

    def base_args(i: int) -> tuple:
        return (xs[i % n], scale, key)

    def donated() -> Any:
        state["y"] = compiled(*case_args(0))
        return state["y"]

    if donate:
        state["y"] = jax.block_until_ready(compiled(*case_args(0)))  # warm-up
    else:
        jax.block_until_ready(compiled(*case_args(0)))
    samples: list[float] = []
    base_samples: list[list[float]] = [[] for _ in baselines]
    faults = 0
    i = 0
    for _ in range(reps):
        for fn, acc in zip(baselines, base_samples, strict=True):
            acc.append(_run_block(fn, base_args, inner, i))
        f0 = _minor_faults()
        if donate:  # each call must consume the previous output
            samples.append(seconds_per_call(donated, inner))
        else:
            samples.append(_run_block(compiled, case_args, inner, i))
        faults += _minor_faults() - f0
        i += inner
    return Timing(
        statistics.median(samples),
        min(samples),
        [statistics.median(b) for b in base_samples],
        [min(b) for b in base_samples],
        faults / (reps * inner),
    )


def main(argv: list[str] | None = None) -> int:
    backend = jax.default_backend()
    on_cpu = backend == "cpu"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=4096 if on_cpu else 16384, help="N of the NxN input")
    p.add_argument("--reps", type=int, default=10 if on_cpu else 20, help="timing samples")
    p.add_argument("--inner", type=int, default=1 if on_cpu else 5, help="calls per sample")
    p.add_argument("--buffers", type=int, default=2 if on_cpu else 3, help="rotating inputs")
    p.add_argument("--ops", default="quantize,fake_quant", help="comma-separated ops")
    p.add_argument(
        "--only", default="", help="comma-separated substrings of case names to run (copy always)"
    )
    p.add_argument("--hlo-dir", default="", help="write the optimized HLO of every case here")
    p.add_argument("--out", default="", help="write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="512x512, 2 samples: a smoke run")
    p.add_argument(
        "--markdown", default="", help="print a results JSON as a Markdown table and exit"
    )
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown_table(json.loads(Path(args.markdown).read_text())))
        return 0
    if args.quick:
        args.size, args.reps, args.inner, args.buffers = 512, 2, 1, 1

    n = args.size
    ops = tuple(o.strip() for o in args.ops.split(",") if o.strip())
    only = [o.strip() for o in args.only.split(",") if o.strip()]
    dev = jax.devices()[0]
    xs = [
        jax.random.normal(jax.random.key(i), (n, n), jnp.float32) * 3.0 for i in range(args.buffers)
    ]
    jax.block_until_ready(xs)
    amax = float(jnp.max(jnp.abs(xs[0])))
    scale = jnp.float32(amax / 127.0)  # a known (delayed) scale, passed as a runtime arg
    key = jax.random.key(0)
    hlo_dir = Path(args.hlo_dir) if args.hlo_dir else None
    if hlo_dir:
        hlo_dir.mkdir(parents=True, exist_ok=True)

    env: dict[str, Any] = {
        **common.environment(),
        "git_commit": common.GIT_AT_START,  # the key markdown_table reads (older files too)
        "device_kind": dev.device_kind,
        "loadavg_start": common.environment()["loadavg"],
        "size": [n, n],
        "dtype": "float32",
        "reps": args.reps,
        "inner": args.inner,
        "buffers": args.buffers,
    }
    print(
        f"jax {env['jax']} | {backend} | {dev.device_kind} | {n}x{n} float32 | "
        f"reps={args.reps} inner={args.inner} buffers={args.buffers} | "
        f"load {env['loadavg_start']}",
        flush=True,
    )

    elems = n * n
    in_bytes = elems * 4
    results: list[dict[str, Any]] = []
    copy_ms = copy_gbs = copy_min_ms = None
    copy_fn: Callable | None = None
    compiled_by_case: dict[tuple[str | None, str], Callable] = {}
    copy_bytes = 8 * elems  # x * 2: read 4 + write 4 bytes per element
    t_start = time.perf_counter()
    for case in build_cases(ops):
        if only and case.op != "copy" and not any(o in case.name for o in only):
            continue
        t0 = time.perf_counter()
        jitted = jax.jit(case.fn, donate_argnums=0 if case.donate else ())
        compiled = jitted.lower(xs[0], scale, key).compile()
        compile_s = time.perf_counter() - t0
        hlo = compiled.as_text()
        fusions, kernels = hlo_kernels(hlo)
        if hlo_dir:
            fname = re.sub(r"[^A-Za-z0-9]+", "_", f"{case.name}_{case.op}").strip("_")
            (hlo_dir / f"{fname}.hlo.txt").write_text(hlo)
        out_bytes = _nbytes(jax.eval_shape(case.fn, xs[0], scale, key))
        counted = case.read_passes * in_bytes + out_bytes
        if case.op == "copy":
            copy_fn = compiled
        baselines = [] if case.op == "copy" or copy_fn is None else [copy_fn]
        rtn_fn = compiled_by_case.get((case.rtn_pair, case.op)) if case.rtn_pair else None
        if rtn_fn is not None:
            baselines.append(rtn_fn)
        tm = time_case(compiled, baselines, xs, scale, key, args.reps, args.inner, case.donate)
        compiled_by_case[(case.name, case.op)] = compiled
        ms = tm.median * 1e3
        gbs = counted / tm.median / 1e9
        if case.op == "copy":
            copy_ms, copy_gbs, copy_min_ms = ms, gbs, tm.min * 1e3
        assert copy_ms is not None and copy_gbs is not None and copy_min_ms is not None
        # Ratios against the copy timed interleaved with this case (same machine load).
        local_ms = tm.base_median[0] * 1e3 if baselines else copy_ms
        local_min_ms = tm.base_min[0] * 1e3 if baselines else copy_min_ms
        local_gbs = copy_bytes / (local_ms / 1e3) / 1e9
        min_ms = tm.min * 1e3
        # Fastest sample over fastest copy sample: less sensitive to other load on the host.
        bw_ratio_min = (counted / min_ms) / (copy_bytes / local_min_ms)
        row: dict[str, Any] = {
            "name": case.name,
            "op": case.op,
            "ms": round(ms, 4),
            "read_passes": case.read_passes,
            "counted_bytes": counted,
            "bytes_per_elem": counted / elems,
            "gb_per_s": round(gbs, 2),
            "ms_min": round(min_ms, 4),
            "copy_ms_interleaved": round(local_ms, 4),
            "copy_ms_min_interleaved": round(local_min_ms, 4),
            "bw_ratio": round(gbs / local_gbs, 3),
            "time_ratio": round(ms / local_ms, 3),
            "bw_ratio_min": round(bw_ratio_min, 3),
            "fusions": fusions,
            "kernels": len(kernels),
            "entry_ops": kernels,
            "minor_faults_per_call": round(tm.faults),
            "compile_s": round(compile_s, 2),
            "meets_bw_target": (gbs / local_gbs >= 0.85) if case.target else None,
        }
        if case.rtn_pair and rtn_fn is not None:
            # SR against its round-to-nearest twin, timed interleaved in the same samples.
            rtn_ms, rtn_min_ms = tm.base_median[-1] * 1e3, tm.base_min[-1] * 1e3
            row["rtn_pair"] = case.rtn_pair
            row["rtn_ms_interleaved"] = round(rtn_ms, 4)
            row["sr_slowdown"] = round(ms / rtn_ms, 3)
            row["sr_slowdown_min"] = round(min_ms / rtn_min_ms, 3)
            row["meets_sr_target"] = ms / rtn_ms <= 1.15
        results.append(row)
        print(_fmt_row(row), flush=True)

    total_s = time.perf_counter() - t_start
    env["loadavg_end"] = common.environment()["loadavg"]
    env["total_s"] = round(total_s, 1)
    print(f"total {total_s:.1f} s | load {env['loadavg_end']}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"environment": env, "copy_gb_per_s": copy_gbs, "results": results}
        out.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


def markdown_table(payload: dict[str, Any]) -> str:
    """The README table of one results JSON."""
    env = payload["environment"]
    lines = [
        f"{env['device_kind']} ({env['backend']}), jax {env['jax']}, "
        f"jaxquant {env.get('git_commit')}, "
        f"{env['size'][0]}x{env['size'][1]} float32, median of {env['reps']} x "
        f"{env['inner']} calls, load average {env.get('loadavg_start')}",
        "",
        "| case | op | ms | copy ms | bytes/elem | GB/s | bw / copy | time / copy "
        "| bw / copy (min) | fusions | SR / RTN (min) | meets |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in payload["results"]:
        meets = []
        if r["meets_bw_target"] is not None:
            meets.append("yes" if r["meets_bw_target"] else "**no**")
        if "meets_sr_target" in r:
            meets.append("SR yes" if r["meets_sr_target"] else "SR **no**")
        sr = ""
        if "sr_slowdown" in r:
            sr = f"{r['sr_slowdown']:.2f} ({r['sr_slowdown_min']:.2f})"
        lines.append(
            f"| {r['name']} | {r['op']} | {r['ms']:.3f} | {r['copy_ms_interleaved']:.3f} "
            f"| {r['bytes_per_elem']:.2f} | {r['gb_per_s']:.1f} | {r['bw_ratio']:.2f} "
            f"| {r['time_ratio']:.2f} | {r['bw_ratio_min']:.2f} | {r['fusions']} | {sr} "
            f"| {', '.join(meets) or '-'} |"
        )
    return "\n".join(lines)


_HEADER = (
    f"{'case':<34} {'op':<10} {'ms':>9} {'copy ms':>8} {'B/elem':>6} {'GB/s':>7} "
    f"{'bw/copy':>7} {'t/copy':>6} {'min bw/c':>8} {'fus':>3} {'faults':>6}  notes"
)


def _fmt_row(r: dict[str, Any]) -> str:
    if r["op"] == "copy":
        print(_HEADER)
    notes = []
    if r["meets_bw_target"] is False:
        notes.append("<0.85")
    if "sr_slowdown" in r:
        notes.append(f"SR/RTN {r['sr_slowdown']:.2f} (min {r['sr_slowdown_min']:.2f})")
    return (
        f"{r['name']:<34} {r['op']:<10} {r['ms']:>9.3f} {r['copy_ms_interleaved']:>8.3f} "
        f"{r['bytes_per_elem']:>6.2f} "
        f"{r['gb_per_s']:>7.1f} {r['bw_ratio']:>7.2f} {r['time_ratio']:>6.2f} "
        f"{r['bw_ratio_min']:>8.2f} "
        f"{r['fusions']:>3} {r['minor_faults_per_call']:>6}  {' '.join(notes)}"
    )


if __name__ == "__main__":
    sys.exit(main())
