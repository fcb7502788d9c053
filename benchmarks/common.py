"""What every benchmark shares: the environment record, timing, the digits MLP, the result
file layout and an HLO reader. One copy here; the scripts import it (``import common``:
each script puts ``benchmarks/`` and the repository root on ``sys.path`` first, so they run
from a checkout as ``python3 benchmarks/<script>.py`` or ``PYTHONPATH=$PWD`` on a device).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
for _p in (str(ROOT), str(ROOT / "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

# ------------------------------------------------------------------------- environment


def git_state() -> str:
    """The checkout's commit, ``+dirty`` when ``jaxquant/`` has uncommitted changes, or
    ``"unknown"`` (no git, or a copy of the tree without ``.git`` as on a device)."""

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--", "jaxquant")
        return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


GIT_AT_START = git_state()  # the code that runs is the code imported now


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def environment(**extra: Any) -> dict[str, Any]:
    """Where and when a result was measured: date (UTC), Python, jax / jaxlib / flax
    versions, backend, device kind and count, the device's platform version (CUDA and
    driver on GPUs), host CPUs and load average, the jaxquant commit; plus ``extra``."""
    dev = jax.devices()[0]
    try:
        cpus: int | None = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count()
    try:
        load: list[float] | None = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    try:
        platform_version = dev.client.platform_version
    except AttributeError:
        platform_version = None
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "flax": _version("flax"),
        "backend": jax.default_backend(),
        "device": dev.device_kind,
        "devices": jax.device_count(),
        "platform_version": platform_version,
        "host_cpus": cpus,
        "loadavg": load,
        "jaxquant_git": GIT_AT_START,
        **extra,
    }


def device_slug() -> str:
    """A short file-name tag for the device: ``cpu``, ``h100``, ``h200``, ``a100``..."""
    if jax.default_backend() == "cpu":
        return "cpu"
    kind = jax.devices()[0].device_kind.lower()
    m = re.search(r"\b([a-z]\d{2,4})\b", kind)
    return m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", kind).strip("-")


# ------------------------------------------------------------------------------ timing


def seconds_per_call(f: Callable[[], Any], reps: int) -> float:
    """Seconds per call of ``reps`` calls dispatched back to back, blocked on the last
    result: one device stream runs them in order, so the last done means all done."""
    out = None
    t0 = time.perf_counter()
    for _ in range(reps):
        out = f()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps


def sample_ms(
    f: Callable[[], Any], *, samples: int, inner: int = 1, warmup: int = 1
) -> dict[str, Any]:
    """``warmup`` calls, then ``samples`` timings of ``inner`` back-to-back calls each:
    ``ms`` (median per call), ``ms_min`` (fastest sample: load only ever adds time) and
    every sample."""
    for _ in range(warmup):
        jax.block_until_ready(f())
    times = [seconds_per_call(f, inner) * 1e3 for _ in range(samples)]
    return {"ms": statistics.median(times), "ms_min": min(times), "ms_all": times}


def paired_ratios(
    baseline: Callable[[], Any],
    variants: dict[str, Callable[[], Any]],
    rounds: int,
    reps: int,
) -> dict[str, dict[str, Any]]:
    """Each variant's time over the baseline's, timed right before it, ``rounds`` times
    (the variant order rotates each round), so load from other processes hits both sides
    of a ratio alike. Per variant: median ratio, its min / max over rounds, and the median
    milliseconds per call of the variant and of the baseline."""
    names = list(variants)
    ratios: dict[str, list[float]] = {n: [] for n in names}
    ms: dict[str, list[float]] = {n: [] for n in names}
    base_ms: list[float] = []
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            b = seconds_per_call(baseline, reps)
            v = seconds_per_call(variants[n], reps)
            base_ms.append(b * 1e3)
            ms[n].append(v * 1e3)
            ratios[n].append(v / b)
    out = {
        n: {
            "ratio": statistics.median(ratios[n]),
            "min": min(ratios[n]),
            "max": max(ratios[n]),
            "ms": statistics.median(ms[n]),
        }
        for n in names
    }
    out["baseline"] = {"ms": statistics.median(base_ms) if base_ms else None}
    return out


# ------------------------------------------------------------------------------- model


class MLP(nn.Module):
    """The digits MLP (ReLU; layers ``Dense_0`` .. ``Dense_{len(features)}``).

    ``dense`` builds each layer: ``nn.Dense`` by default, or a peer's quantized Dense, or a
    ``functools.partial`` of ``nn.Dense`` with a dtype or a ``dot_general``."""

    features: tuple[int, ...] = (512, 512)
    n_out: int = 10
    dense: Callable[..., nn.Module] = nn.Dense

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for f in self.features:
            x = nn.relu(self.dense(f)(x))
        return self.dense(self.n_out)(x)


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
