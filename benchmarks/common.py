"""What every benchmark shares: the environment record, timing, the digits MLP, the result
file layout and an HLO reader. One copy here; the scripts import it (``import common``:
each script puts ``benchmarks/`` and the repository root on ``sys.path`` first, so they run
from a checkout as ``python3 benchmarks/<script>.py`` or ``PYTHONPATH=$PWD`` on a device).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
for _p in (str(ROOT), str(ROOT / "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402

# The environment record, the timing helpers and the digits MLP live in the application
# layer (one copy for the sweep, benchmarks, papers and tests); re-exported here so the
# scripts keep writing ``common.environment()``.
from jaxquant.app.env import GIT_AT_IMPORT as GIT_AT_START  # noqa: E402,F401
from jaxquant.app.env import device_slug, environment, git_state  # noqa: E402,F401
from jaxquant.app.models import MLP  # noqa: E402,F401
from jaxquant.app.timing import paired_ratios, sample_ms, seconds_per_call  # noqa: E402,F401

# ------------------------------------------------------------------------------ results
# The accuracy scripts (qat_digits, qat_lm, mixed_precision, ptq_digits) share one JSON
# layout: {benchmark, env..., config, results: {method: {runs, mean, std, n}}}.


def parser(doc: str, name: str, methods: tuple[str, ...]) -> argparse.ArgumentParser:
    """The accuracy scripts' command line (``--seeds --steps --quick --methods --out
    --markdown``)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run")
    p.add_argument("--quick", action="store_true", help="tiny configuration (seconds)")
    p.add_argument("--methods", default="", help=f"comma-separated subset of {','.join(methods)}")
    p.add_argument("--out", default=str(RESULTS / f"{name}.json"))
    p.add_argument(
        "--markdown", default="", metavar="JSON", help="print the table of a result file"
    )
    return p


def select(arg: str, methods: tuple[str, ...]) -> tuple[str, ...]:
    """The methods named in a comma-separated ``arg`` (all when empty)."""
    if not arg:
        return methods
    chosen = tuple(m.strip() for m in arg.split(",") if m.strip())
    unknown = [m for m in chosen if m not in methods]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; known: {', '.join(methods)}")
    return chosen


def summarize(runs: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    """Per-seed runs plus mean and (population) std of ``keys`` over the seeds that ran."""
    ok = [r for r in runs if "error" not in r]
    out: dict[str, Any] = {"runs": runs}
    if not ok:
        out["error"] = runs[0]["error"] if runs else "no runs"
        return out
    out["mean"] = {k: float(np.mean([r[k] for r in ok])) for k in keys}
    out["std"] = {k: float(np.std([r[k] for r in ok])) for k in keys}
    out["n"] = len(ok)
    return out


def document(name: str, cfg: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    """A result file: the benchmark's name, :func:`environment`, config and results."""
    return {"benchmark": name, **environment(), "config": cfg, "results": results}


def write_json(doc: dict[str, Any], path: str | os.PathLike[str]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"wrote {out}", flush=True)


def read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def header(doc: dict[str, Any]) -> str:
    """The one-line provenance printed above a result table."""
    return (
        f"{doc['benchmark']}: jax {doc['jax']}, {doc['backend']} ({doc['device']}), "
        f"{doc['date']}, seeds {doc['config'].get('seeds')}"
    )


def brief(r: dict[str, Any], key: str) -> str:
    if "error" in r:
        return f"FAILED {r['error'][:200]}"
    return f"{key} {r[key]:.4f} ({r['seconds']:.1f} s)"


def downsample(xs: list[float], n: int) -> list[float]:
    """``n`` means of consecutive equal slices of ``xs`` (a short loss curve)."""
    if len(xs) <= n:
        return [float(x) for x in xs]
    return [float(np.mean(c)) for c in np.array_split(np.asarray(xs), n)]


def paired(results: dict[str, Any], method: str, key: str) -> tuple[float, float] | None:
    """Mean and std over seeds of ``method - float`` for ``key``, seed by seed (same
    initialisation and data order: the seed-to-seed variation common to both cancels)."""
    ref = {r["seed"]: r[key] for r in results.get("float", {}).get("runs", []) if key in r}
    d = [r[key] - ref[r["seed"]] for r in results[method]["runs"] if key in r and r["seed"] in ref]
    if method == "float" or not d:
        return None
    return round(float(np.mean(d)), 4) + 0.0, float(np.std(d))  # no "-0.00"


# --------------------------------------------------------------------------------- HLO

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\([^()]*\)|\S+)\s+([a-z][\w\-]*)\((.*)$")
GEMM_TARGETS = ("cublas", "matmul", "gemm")


def _strip_layout(t: str) -> str:
    return re.sub(r"\{[^{}]*\}", "", t)


def _operands(rest: str) -> str:
    depth = 1
    for i, c in enumerate(rest):
        depth += c == "("
        depth -= c == ")"
        if depth == 0:
            return rest[:i]
    return rest


def _called(line: str) -> str:
    m = re.search(r"calls=%?([\w.\-]+)", line)
    return m.group(1) if m else ""


def type_name(t: str) -> str:
    """``s8`` of ``s8[64,128]``."""
    return t.split("[", 1)[0]


def n_elems(t: str) -> int:
    """Elements of an HLO array type such as ``f32[4096,4096]`` (0 for a tuple)."""
    m = re.match(r"^[a-z0-9]+\[([\d,]*)\]", t)
    if not m:
        return 0
    dims = [int(d) for d in m.group(1).split(",") if d]
    return int(np.prod(dims)) if dims else 1


def parse_hlo(text: str) -> dict[str, Any]:
    """Dots, custom calls, ENTRY fusions and ENTRY parameters of an optimized HLO module.

    Operand types are looked up by name (XLA prints ``dot(%p0, %p1)`` without types); a dot
    inside a fusion reports the fusion's kind (CPU ``__ynn_fusion``, GPU ``__triton_gemm``)."""
    types: dict[str, str] = {}
    instrs: list[tuple[str, str, str, str, str, str]] = []  # comp, name, type, op, operands, line
    comp, entry = "", ""
    for line in text.splitlines():
        h = _HEADER.match(line)
        if h:
            comp = h.group(2)
            entry = comp if h.group(1) else entry
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, typ, op, rest = m.groups()
        typ = _strip_layout(typ)
        types[name] = typ
        instrs.append((comp, name, typ, op, _operands(rest), line))
    caller_kind: dict[str, str] = {}
    for _, _, _, op, _, line in instrs:
        if op == "fusion":
            called = re.search(r"calls=%?([\w.\-]+)", line)
            kind = re.search(r'"kind":"(__[\w$]+)"', line) or re.search(r"kind=(k\w+)", line)
            if called:
                caller_kind[called.group(1)] = kind.group(1) if kind else "fusion"

    def operand_types(ops: str) -> list[str]:
        inline = re.findall(r"([a-z][a-z0-9]*\[[\d,]*\])(?:\{[^{}]*\})?\s+%", ops)
        if inline:
            return inline
        return [types.get(n, "?") for n in re.findall(r"%([\w.\-]+)", ops)]

    dots, calls, fusions, params = [], [], [], []
    for c, _name, typ, op, ops, line in instrs:
        where = "entry" if c == entry else caller_kind.get(c, c)
        if op in ("dot", "convolution"):
            dots.append({"op": op, "operands": operand_types(ops), "result": typ, "in": where})
        elif op == "custom-call":
            target = re.search(r'custom_call_target="([^"]+)"', line)
            calls.append(
                {
                    "target": target.group(1) if target else "?",
                    "operands": operand_types(ops),
                    "result": typ,
                }
            )
        if c == entry and op == "fusion":
            fusions.append({"type": typ, "kind": caller_kind.get(_called(line), "fusion")})
        if c == entry and op == "parameter":
            params.append(typ)
    return {"dots": dots, "custom_calls": calls, "entry_fusions": fusions, "entry_params": params}


def gemm_list(parsed: dict[str, Any]) -> list[str]:
    """Every dot and GEMM custom call of :func:`parse_hlo`'s result, one string each:
    ``s8 x s8 -> s32 (__ynn_fusion)``, ``__cublas$lt$matmul$f8: f8e4m3fn x f8e4m3fn -> bf16``."""
    out = []
    for d in parsed["dots"]:
        ops = " x ".join(type_name(t) for t in d["operands"][:2])
        out.append(f"{ops} -> {type_name(d['result'])} ({d['in']})")
    for c in parsed["custom_calls"]:
        if any(t in c["target"] for t in GEMM_TARGETS):
            ops = " x ".join(type_name(t) for t in c["operands"][:2])
            res = c["result"].strip("()").split(",")[0].strip()
            out.append(f"{c['target']}: {ops} -> {type_name(res)}")
    return out


def gemm_counts(hlo_text: str) -> dict[str, int]:
    """The GEMMs of a compiled program (:func:`gemm_list`), counted."""
    counts: dict[str, int] = {}
    for g in gemm_list(parse_hlo(hlo_text)):
        counts[g] = counts.get(g, 0) + 1
    return counts
