"""Every GPU benchmark in one prepared call, section by section, each writing one JSON file.

    python3 benchmarks/gpu.py                                   # every section, on a GPU
    python3 benchmarks/gpu.py --sections probes,dot,kernels     # some of them
    python3 benchmarks/gpu.py --quick                           # a smoke run (CPU too)

Sections (each in its own process under its own timeout, so a hang or a crash loses only
that section; the whole call stays inside ``--budget`` seconds):

  probes      tests/test_backend_probes.py: the backend bugs jaxquant works around
              (capabilities.py) -- still there? workaround still right?
  dot         ``jq.dot_general`` int8 / fp8 forward and an fp8 train step at M = N = K = 8192
              against bf16 ``jnp.dot``: the compiled GEMMs (cuBLASLt fp8 / s8) and times
  kernels     the one-pass Pallas block-quantization kernels against the jnp path, 16384^2:
              bit identity (random and edge-case inputs) and time (GPU only)
  throughput  benchmarks/quantize_throughput.py at 16384^2 (quantizers vs a copy)
  train       benchmarks/train_step.py --gpu: 3 x Dense 8192 fp8 step vs bf16
  inference   benchmarks/inference.py --gpu: Dense 8192 serving, w8a8 / fp8 / w4a16 vs bf16
  peers       benchmarks/peers.py --preset gpu: jaxquant beside Qwix / AQT / flax fp8
              (Qwix and AQT travel as wheels in .whl/: benchmarks/fetch_peer_wheels.sh)

Each section writes ``<out-dir>/gpu_<section>_<device>.json`` (``<device>``: ``h100``,
``h200``, ``cpu``; ``--quick`` adds ``_quick``) and the call writes
``gpu_session_<device>.json``: per section its exit code, seconds and last output lines.
That is at most 8 files, what a device call brings back. On a device machine (a copy of
the repository, no package index), from the repository root::

    PYTHONPATH=$PWD python3 benchmarks/gpu.py --out-dir $OUT --sections probes,dot,kernels

then copy ``$OUT/*.json`` into benchmarks/results/. Without a GPU, only ``--quick`` runs
(tiny sizes; GPU-only sections are skipped with the reason); its default ``--out-dir`` is a
temporary folder, so a smoke run never overwrites a result.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SECTIONS = ("probes", "dot", "kernels", "throughput", "train", "inference", "peers")
GPU_ONLY = {"kernels": "the Pallas kernels lower through Triton, which needs a CUDA GPU "
            "(tests/test_kernels.py checks them in Pallas' interpreter on CPU)"}  # fmt: skip
# Seconds per section on a GPU (measured on an H200 where noted, else estimated): the
# section is cut to what is left of --budget.
TIMEOUT = {
    "probes": 90,  # estimated: a few small compiles
    "dot": 120,  # ~60-90 s, most of it cuBLASLt autotuning of the fp8 GEMMs (H200)
    "kernels": 90,  # 30-60 s (H200)
    "throughput": 140,  # 20-25 s (H200)
    "train": 480,  # fp8 steps compile in 72-77 s each (H200), 5 variants
    "inference": 180,  # ~95 s of compiling (H200)
    "peers": 420,  # estimated 2-4 min, not yet measured on a GPU
}
SITE = "/tmp/jaxquant_site"  # where .whl/*.whl are installed on the device


# ------------------------------------------------------------------------- the driver


def _command(section: str, out: Path, quick: bool, on_gpu: bool) -> list[str]:
    py = sys.executable
    q = ["--quick"] if quick else []
    if section == "probes":
        return [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "no:xdist",
                str(ROOT / "tests" / "test_backend_probes.py")]  # fmt: skip
    if section in ("dot", "kernels"):
        return [py, __file__, "--child", section, "--out", str(out), *q]
    if section == "throughput":
        return [py, str(HERE / "quantize_throughput.py"), "--out", str(out), *q]
    if section == "train":
        cmd = [py, str(HERE / "train_step.py"), "--gpu", "--out", str(out), *q]
        # The default lowering (half_out, native cast) and the f32_out alternative; the
        # hand-written reference step and the integer-emulated rounding were measured once
        # (results/gpu_train_h200.json) and are left out to fit the budget.
        return [*cmd, "--lowerings", "f32_out", "half_out", "--native", "1", "--reference", "0"]
    if section == "inference":
        cmd = [py, str(HERE / "inference.py"), "--gpu", "--out", str(out), *q]
        return cmd + ([] if on_gpu else ["--allow-cpu"]) + ([] if quick else ["--budget", "110"])
    if section == "peers":
        return [py, str(HERE / "peers.py"), "--preset", "gpu", "--out", str(out), *q]
    raise ValueError(f"unknown section {section!r}")


def _device(env: dict[str, str]) -> tuple[str, str, str]:
    """(backend, device kind, file tag) from a child process: the driver itself never
    initialises the GPU, so every section gets all of its memory."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import jax, common; "
        "print(jax.default_backend()); print(jax.devices()[0].device_kind); "
        "print(common.device_slug())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(HERE)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if out.returncode:
        raise SystemExit(f"gpu.py: could not start jax:\n{out.stderr[-2000:]}")
    backend, kind, slug = out.stdout.strip().splitlines()[-3:]
    return backend, kind, slug


def _install_wheels(env: dict[str, str]) -> str:
    """Install .whl/*.whl (the peers) into SITE with no index; say what happened."""
    wheels = sorted(glob.glob(str(ROOT / ".whl" / "*.whl")))
    if not wheels:
        return "no .whl/*.whl: the peers section runs without Qwix / AQT (fetch_peer_wheels.sh)"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
           "--no-compile", "--no-cache-dir", "--upgrade", "--target", SITE, *wheels]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    if r.returncode:
        return f"installing the wheels failed: {r.stderr[-500:]}"
    env["PYTHONPATH"] = f"{SITE}:{env['PYTHONPATH']}"
    return f"installed {', '.join(Path(w).name for w in wheels)} into {SITE}"


def drive(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.monotonic()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")
    backend, kind, slug = _device(env)
    on_gpu = backend == "gpu"
    if not on_gpu and not args.quick:
        raise SystemExit(
            f"gpu.py: no GPU here (backend {backend}); the sections are sized for one. "
            "Run with --quick for the smoke run of every section at tiny sizes."
        )
    tag = slug + ("_quick" if args.quick else "")
    out_dir = Path(
        args.out_dir or (tempfile.mkdtemp(prefix="jq_gpu_") if args.quick else HERE / "results")
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    session: dict[str, Any] = {
        "device": kind,
        "backend": backend,
        "quick": args.quick,
        "budget_s": args.budget,
        "sections": {},
    }
    print(
        f"gpu.py: {kind} ({backend}), sections {','.join(args.sections)} -> {out_dir}", flush=True
    )
    for section in args.sections:
        rec: dict[str, Any] = {}
        session["sections"][section] = rec
        left = args.budget - (time.monotonic() - t_start) - 10  # 10 s for the session file
        if section in GPU_ONLY and not on_gpu:
            rec["skipped"] = f"GPU only: {GPU_ONLY[section]}"
        elif left < 20:
            rec["skipped"] = f"{left:.0f} s left of the {args.budget:.0f} s budget"
        if "skipped" in rec:
            print(f"== {section}: skipped ({rec['skipped']})", flush=True)
            continue
        if section == "peers":
            rec["wheels"] = _install_wheels(env)
        timeout = min(TIMEOUT[section] if on_gpu and not args.quick else 300, left)
        out = out_dir / f"gpu_{section}_{tag}.json"
        cmd = _command(section, out, args.quick, on_gpu)
        print(f"== {section} (timeout {timeout:.0f} s): {' '.join(cmd[1:])}", flush=True)
        t0 = time.monotonic()
        try:
            r = subprocess.run(
                cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
            )
            rec["exit"], text = r.returncode, r.stdout + r.stderr
        except subprocess.TimeoutExpired as e:
            rec["exit"] = "timeout"
            text = "".join(
                (b.decode(errors="replace") if isinstance(b, bytes) else b or "")
                for b in (e.stdout, e.stderr)
            )
        rec["seconds"] = round(time.monotonic() - t0, 1)
        rec["json"] = out.name if out.exists() else None
        rec["output_tail"] = text.splitlines()[-40:]
        if section == "probes":  # pytest writes no JSON: its summary is the result
            out.write_text(json.dumps({"section": "probes", **rec}, indent=1) + "\n")
            rec["json"] = out.name
        print("\n".join(rec["output_tail"][-15:]), flush=True)
        print(f"== {section}: exit {rec['exit']} in {rec['seconds']} s", flush=True)
        (out_dir / f"gpu_session_{tag}.json").write_text(json.dumps(session, indent=1) + "\n")
    session["wall_s"] = round(time.monotonic() - t_start, 1)
    (out_dir / f"gpu_session_{tag}.json").write_text(json.dumps(session, indent=1) + "\n")
    print(f"gpu.py: done in {session['wall_s']} s; files in {out_dir}", flush=True)
    return session


# --------------------------------------------------------------------- section: dot


def dot_section(quick: bool) -> dict[str, Any]:
    """int8 / fp8 ``jq.dot_general`` forward and an fp8 train step against bf16."""
    import common  # noqa: F401  (the repository root on sys.path)
    import jax
    import jax.numpy as jnp
    from common import gemm_list, parse_hlo, sample_ms

    import jaxquant as jq

    n, reps = (256, 3) if quick else (8192, 20)
    mm = (((1,), (0,)), ((), ()))
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (n, n), jnp.bfloat16)
    w = (jax.random.normal(kw, (n, n), jnp.float32) / n**0.5).astype(jnp.bfloat16)
    e4m3, e5m2, int8 = jq.QuantSpec("e4m3"), jq.QuantSpec("e5m2"), jq.QuantSpec("int8")

    def fwd(ls, rs):
        return lambda a, b: jq.dot_general(a, b, mm, lhs_spec=ls, rhs_spec=rs)

    def train(dot):
        return jax.grad(lambda a, b: jnp.sum(jnp.square(dot(a, b).astype(jnp.float32))), (0, 1))

    def fp8_dot(a, b):
        return jq.dot_general(a, b, mm, lhs_spec=e4m3, rhs_spec=e4m3, grad_spec=e5m2)

    per_row = jq.QuantSpec("int8", jq.per_token(-1))
    per_col = jq.QuantSpec("int8", jq.per_channel(-1))
    cases = [  # name, function, baseline, flops per call
        ("bf16 jnp.dot", jnp.dot, None, 2 * n**3),
        ("fp8 e4m3 dot_general", fwd(e4m3, e4m3), "bf16 jnp.dot", 2 * n**3),
        ("int8 dot_general", fwd(int8, int8), "bf16 jnp.dot", 2 * n**3),
        ("int8 per-row x per-column", fwd(per_row, per_col), "bf16 jnp.dot", 2 * n**3),
        ("bf16 train step", train(jnp.dot), None, 6 * n**3),
        ("fp8 train step (e4m3 / e5m2)", train(fp8_dot), "bf16 train step", 6 * n**3),
    ]
    doc: dict[str, Any] = {"M=N=K": n, "reps": reps, "cases": {}, "errors": {}}
    doc["capabilities"] = jq.dot_capabilities()
    for name, fn, base, flops in cases:
        try:
            t0 = time.perf_counter()
            compiled = jax.jit(fn).lower(x, w).compile()
            compile_s = time.perf_counter() - t0
            gemms = gemm_list(parse_hlo(compiled.as_text()))
            t = sample_ms(lambda c=compiled: c(x, w), samples=reps, warmup=3)
            doc["cases"][name] = {
                "ms": t["ms"],
                "ms_min": t["ms_min"],
                "compile_s": compile_s,
                "tflops": flops / (t["ms"] * 1e-3) / 1e12,
                "gemms": gemms,
                # A real fp8 GEMM: cuBLASLt's f8 call or a dot of f8 operands; int8: s8 x s8.
                "fp8_gemms": sum("$f8" in g or g.startswith("f8") for g in gemms),
                "s8_gemms": sum("s8 x s8" in g for g in gemms),
                "baseline": base,
            }
            print(f"{name}: {t['ms']:.3f} ms, compile {compile_s:.1f} s, GEMMs {gemms}", flush=True)
        except Exception as err:  # one failing case must not stop the others
            doc["errors"][name] = "".join(traceback.format_exception_only(err)).strip()[:600]
            print(f"{name}: FAILED {doc['errors'][name]}", flush=True)
    for e in doc["cases"].values():
        b = doc["cases"].get(e["baseline"] or "")
        e["speedup_vs_bf16"] = b["ms"] / e["ms"] if b else None
    return doc


# ----------------------------------------------------------------- section: kernels


def kernels_section(quick: bool) -> dict[str, Any]:
    """The one-pass Pallas kernels (jaxquant/_src/kernels) against the jnp path: bit
    identity on a random and an edge-case input (NaN / Inf, zero and subnormal blocks,
    amax at and next to ``qmax 2^p``, every tie of the grid), and time against a copy.
    ``bw / copy`` counts one read of x plus the true size of the outputs."""
    import common  # noqa: F401
    import jax
    import jax.numpy as jnp
    import numpy as np
    from common import sample_ms

    import jaxquant as jq
    from jaxquant._src import kernels

    n, reps, inner = (256, 2, 1) if quick else (16384, 20, 5)
    int8 = jq.QuantSpec("int8", jq.per_block(-1, 32), scale_format="e8m0")
    cases = [
        ("mxfp8", jq.QuantSpec("mxfp8"), "fake_quant"),
        ("mxfp8", jq.QuantSpec("mxfp8"), "quantize"),
        ("mxfp4", jq.QuantSpec("mxfp4"), "fake_quant"),
        ("int8 per_block(-1,32) e8m0", int8, "fake_quant"),
        ("int8 per_block(-1,32) e8m0", int8, "quantize"),
    ]

    @jax.jit
    def big(k1, k2):  # Gaussian rows at random power-of-two magnitudes 2^-20..2^20
        mag = jnp.exp2(jax.random.randint(k2, (n, 1), -20, 21).astype(jnp.float32))
        return jax.random.normal(k1, (n, n), jnp.float32) * mag

    x = big(*jax.random.split(jax.random.key(0)))

    def edge(spec: jq.QuantSpec, cols: int = 1024) -> jax.Array:
        rng = np.random.default_rng(1)
        b, f = spec.granularity.size, spec.element
        qmax = np.float32(spec.qrange[1])
        mag = np.exp2(rng.integers(-126, 126, 256)).astype(np.float32)
        rows = list((rng.standard_normal((256, b)) * mag[:, None]).astype(np.float32))
        rows += [np.zeros(b), np.full(b, np.nan), np.resize([np.inf, -np.inf], b)]
        rows.append(np.resize([np.nan, np.inf, -np.inf, -np.nan, 1.5, -0.25, 0.0, -0.0], b))
        rows.append(np.resize([1e-40, -3e-42, 0.0], b))  # a subnormal-only block
        rows.append(np.resize([1.0, 1e-40, -7e-39, 0.5], b))
        fmax = np.finfo(np.float32).max
        rows.append(np.resize([fmax, -fmax / 3, 1.0], b))
        with np.errstate(over="ignore"):
            for p in range(-130, 128, 3):
                a = np.float32(qmax * np.float32(2.0**p))
                if np.isfinite(a) and a > 0:
                    for v in (
                        a,
                        np.nextafter(a, np.float32(0)),
                        np.nextafter(a, np.float32(np.inf)),
                    ):
                        rows.append(np.resize([v, -v / 3, v / 7, 0.0], b))
        if f.kind == "float":
            grid = jq.formats.finite_values(f).astype(np.float64)
        else:
            grid = np.arange(spec.qrange[0], spec.qrange[1] + 1, dtype=np.float64)
        probe = np.concatenate([grid, (grid[1:] + grid[:-1]) / 2, [f.max * 1.5, -f.max * 3]])
        probe = probe.astype(np.float32)
        for i in range(0, len(probe), b - 1):
            rows.append(
                np.concatenate([[np.float32(f.max)], np.resize(probe[i : i + b - 1], b - 1)])
            )
        arr = np.stack([np.asarray(r, np.float32) for r in rows])
        per_row = cols // b
        n_rows = -(-len(arr) // per_row)
        n_rows = -(-n_rows // 8) * 8  # a multiple of 8 rows
        pad = rng.standard_normal((n_rows * per_row - len(arr), b)).astype(np.float32)
        return jnp.asarray(np.concatenate([arr, pad]).reshape(n_rows, cols))

    def differ(a: jax.Array, b: jax.Array) -> tuple[int, int]:
        """(values that differ, NaNs whose bits differ); any NaN equals any NaN."""
        u = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[np.dtype(a.dtype).itemsize]
        same = jax.lax.bitcast_convert_type(a, u) == jax.lax.bitcast_convert_type(b, u)
        floating = jnp.issubdtype(a.dtype, jnp.floating)
        an = jnp.isnan(a.astype(jnp.float32)) if floating else jnp.zeros(a.shape, bool)
        bn = jnp.isnan(b.astype(jnp.float32)) if floating else jnp.zeros(a.shape, bool)
        bad = (~same & ~(an & bn)) | (an != bn)
        return int(jnp.sum(bad)), int(jnp.sum(an & bn & ~same))

    def compare(kern_out: Any, ref_out: Any) -> dict[str, int]:
        kern, ref = jax.tree_util.tree_leaves(kern_out), jax.tree_util.tree_leaves(ref_out)
        out = {"mismatch": 0, "nan_bits": 0, "scale_mismatch": 0}
        for i, (a, b) in enumerate(zip(kern, ref, strict=True)):
            if a.shape != b.shape or a.dtype != b.dtype:
                raise ValueError(f"output {i}: kernel {a.dtype}{a.shape} vs jnp {b.dtype}{b.shape}")
            bad, nanbits = differ(a, b)
            out["scale_mismatch" if i else "mismatch"] += bad
            out["nan_bits"] += nanbits if i == 0 else 0
        return out

    def paths(spec: jq.QuantSpec, op: str) -> tuple[Any, Any]:
        """(kernel path, jnp path), returning the same arrays."""
        if op == "fake_quant":
            return (lambda x: kernels.block_fake_quant(x, spec)), (lambda x: jq.fake_quant(x, spec))

        def ref(x: jax.Array) -> tuple[jax.Array, jax.Array]:
            q = jq.quantize(x, spec)
            return q.values, q.scale

        dtype = spec.scale_format.dtype  # e8m0 scales written by the kernel directly
        return (lambda x: kernels.block_quantize(x, spec, scale_dtype=dtype)), ref

    copy = jax.jit(lambda x: x * 2).lower(x).compile()
    copy_ms = sample_ms(lambda: copy(x), samples=reps, inner=inner)["ms"]
    doc: dict[str, Any] = {"size": n, "reps": reps, "inner": inner, "copy_ms": copy_ms, "cases": []}
    for name, spec, op in cases:
        rec: dict[str, Any] = {"case": name, "op": op}
        try:
            kern_f, ref_f = paths(spec, op)
            with kernels.disabled():  # the jnp path, traced while the kernels are off
                ref = jax.jit(ref_f).lower(x).compile()
                e = edge(spec)
                ref_edge = jax.jit(ref_f)(e)
                outs = jax.tree_util.tree_leaves(jax.eval_shape(ref_f, x))
            written = sum(int(np.prod(o.shape)) * np.dtype(o.dtype).itemsize for o in outs)
            bpe = 4 + written / x.size
            kern = jax.jit(kern_f).lower(x).compile()
            rec["identity"] = compare(kern(x), ref(x))
            rec["edge_identity"] = compare(jax.jit(kern_f)(e), ref_edge)
            rec["bytes_per_elem"] = bpe
            for path, f in (("kernel", kern), ("jnp", ref)):
                ms = sample_ms(lambda f=f: f(x), samples=reps, inner=inner)["ms"]
                rec[f"{path}_ms"] = ms
                rec[f"{path}_bw_vs_copy"] = (bpe / ms) / (8.0 / copy_ms)
            print(f"{name} {op}: {rec}", flush=True)
        except Exception as err:  # report and carry on with the other cases
            rec["error"] = f"{type(err).__name__}: {err}"[:600]
            print(f"{name} {op}: FAILED {rec['error']}", flush=True)
        doc["cases"].append(rec)
    return doc


# ------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, in order")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run (CPU too)")
    p.add_argument(
        "--out-dir", default=None, help="default benchmarks/results (--quick: a temp dir)"
    )
    p.add_argument("--budget", type=float, default=560.0, help="seconds for the whole call")
    p.add_argument("--child", choices=("dot", "kernels"), help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:  # one in-process section, run by the driver in a process of its own
        sys.path.insert(0, str(HERE))
        import common

        t0 = time.perf_counter()
        body = (dot_section if args.child == "dot" else kernels_section)(args.quick)
        doc = {"section": args.child, **common.environment(), "quick": args.quick, **body}
        doc["wall_s"] = round(time.perf_counter() - t0, 1)
        common.write_json(doc, args.out)
        return 0
    args.sections = [s for s in args.sections.split(",") if s]
    if unknown := [s for s in args.sections if s not in SECTIONS]:
        p.error(f"--sections: unknown {unknown}; expected some of {','.join(SECTIONS)}")
    session = drive(args)
    failed = [s for s, r in session["sections"].items() if r.get("exit") not in (None, 0)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
