"""Quantized matmul on one GPU: does it run in fp8 / int8, and is it faster than bf16?

Run from the repository root (about a minute on an H100, compiles included):

    python benchmarks/gpu_dot.py --out /some/dir

For M = N = K = 8192 (``--size``) it

(a) compiles the jitted forward of ``jq.dot_general`` for e4m3 x e4m3 and int8 x int8
    (per-tensor current scaling) and the fp8 training step, reports whether the optimized
    HLO holds an fp8 GEMM (a ``__cublas$lt$matmul$f8`` custom call or a dot on f8e4m3fn
    operands) / an int8 GEMM (a dot or GEMM custom call on s8 operands), and saves the HLO
    text under ``--out/hlo/``;
(b) times, median of ``--reps`` calls after warm-up, each ratio against bf16 measured in
    the same run: bf16 ``jnp.dot`` vs fp8 and int8 ``jq.dot_general`` (forward only), and a
    training step (forward + backward of ``sum(dot(x, w)**2)`` wrt both) in bf16 vs fp8
    (e4m3 operands, e5m2 gradient);

prints a table and writes ``--out/gpu_dot.json``. Every case catches its own exceptions and
the run carries on; a case that would start after ``--budget`` seconds is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jaxquant as jq

try:  # public names once exported
    from jaxquant import dot_capabilities, dot_general  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    from jaxquant._src.dot import dot_capabilities, dot_general

MATMUL = (((1,), (0,)), ((), ()))


# ----------------------------------------------------------------------------- HLO


def _operand_types(text: str) -> dict[str, str]:
    """name -> element type of every instruction and parameter in an HLO module."""
    types: dict[str, str] = {}
    for m in re.finditer(r"%([\w.\-]+) = \(?(\w+)\[", text):
        types[m.group(1)] = m.group(2)
    for m in re.finditer(r"([\w.\-]+): (\w+)\[", text):  # computation parameters
        types.setdefault(m.group(1), m.group(2))
    return types


def _args(arglist: str, types: dict[str, str]) -> list[str | None]:
    out: list[str | None] = []
    for op in arglist.split(", "):
        inline = re.match(r"\s*(\w+)\[", op)
        name = re.search(r"%([\w.\-]+)", op)
        out.append(inline.group(1) if inline else types.get(name.group(1)) if name else None)
    return out


def inspect_hlo(text: str) -> dict:
    """Dots and GEMM custom calls of an optimized HLO module, with operand element types."""
    dots, gemms = [], []
    for comp in re.split(r"\n\s*\n", text):
        types = _operand_types(comp)
        for m in re.finditer(r"= (\w+)\[[^\n]*? dot\((.*?)\), ", comp):
            dots.append({"result": m.group(1), "operands": _args(m.group(2), types)[:2]})
        for m in re.finditer(
            r"= \(?(\w+)\[[^\n]*? custom-call\((.*?)\), [^\n]*custom_call_target=\"([^\"]+)\"",
            comp,
        ):
            target = m.group(3)
            if "gemm" in target or "matmul" in target:
                gemms.append(
                    {
                        "target": target,
                        "result": m.group(1),
                        "operands": _args(m.group(2), types)[:2],
                    }
                )
    f8 = ("f8e4m3fn", "f8e5m2")
    return {
        "cublaslt_f8": "__cublas$lt$matmul$f8" in text,
        "f8_dot": any(d["operands"] and all(o in f8 for o in d["operands"]) for d in dots),
        "f8_gemm": any(g["operands"] and all(o in f8 for o in g["operands"]) for g in gemms),
        "s8_dot": any(d["operands"] and all(o == "s8" for o in d["operands"]) for d in dots),
        "s8_gemm": any(g["operands"] and all(o == "s8" for o in g["operands"]) for g in gemms),
        "dots": dots,
        "gemm_custom_calls": gemms,
    }


# --------------------------------------------------------------------------- timing


def _time(fn, args, reps: int, warmup: int) -> dict:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "ms_min": min(times), "ms_all": times}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/jaxquant_gpu_dot", help="output directory")
    p.add_argument("--size", type=int, default=8192, help="M = N = K")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget", type=float, default=80.0, help="skip cases after this (s)")
    p.add_argument(
        "--xla-autotune-level",
        type=int,
        default=None,
        help="set --xla_gpu_autotune_level (e.g. 0 for faster compiles); default: XLA's",
    )
    args = p.parse_args(argv)
    if args.xla_autotune_level is not None:  # before the backend starts
        flag = f"--xla_gpu_autotune_level={args.xla_autotune_level}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    t_start = time.perf_counter()
    out = Path(args.out)
    (out / "hlo").mkdir(parents=True, exist_ok=True)
    n = args.size

    dev = jax.devices()[0]
    caps = dot_capabilities()
    result: dict = {
        "benchmark": "gpu_dot",
        "M=N=K": n,
        "reps": args.reps,
        "device": str(dev),
        "device_kind": dev.device_kind,
        "backend": jax.default_backend(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "capabilities": caps,
        "hlo": {},
        "cases": {},
        "errors": {},
    }
    print(f"{dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, M=N=K={n}")
    print(f"capabilities: int8={caps['int8']} ({caps['int8_path']})")
    print(f"              fp8={caps['fp8']} ({caps['fp8_path']})")

    def save():
        (out / "gpu_dot.json").write_text(json.dumps(result, indent=1, default=str))

    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (n, n), jnp.bfloat16)
    w = (jax.random.normal(kw, (n, n), jnp.float32) / n**0.5).astype(jnp.bfloat16)

    e4m3, e5m2, int8 = jq.QuantSpec("e4m3"), jq.QuantSpec("e5m2"), jq.QuantSpec("int8")

    def fwd(lhs_spec, rhs_spec):
        def f(a, b):
            return dot_general(a, b, MATMUL, lhs_spec=lhs_spec, rhs_spec=rhs_spec)

        return f

    def train(dot):
        def loss(a, b):
            return jnp.sum(jnp.square(dot(a, b).astype(jnp.float32)))

        return jax.grad(loss, (0, 1))

    def fp8_dot(a, b):
        return dot_general(a, b, MATMUL, lhs_spec=e4m3, rhs_spec=e4m3, grad_spec=e5m2)

    cases = [
        # name, function, HLO key (None: not inspected), baseline name
        ("bf16 jnp.dot", jnp.dot, "bf16_forward", None),
        ("fp8 e4m3 dot_general", fwd(e4m3, e4m3), "fp8_forward", "bf16 jnp.dot"),
        ("int8 dot_general", fwd(int8, int8), "int8_forward", "bf16 jnp.dot"),
        ("bf16 train step", train(jnp.dot), "bf16_train", None),
        ("fp8 train step (e4m3/e5m2)", train(fp8_dot), "fp8_train", "bf16 train step"),
        (
            "int8 per-row x per-col",
            fwd(jq.QuantSpec("int8", jq.per_token(-1)), jq.QuantSpec("int8", jq.per_channel(-1))),
            "int8_per_channel_forward",
            "bf16 jnp.dot",
        ),
    ]
    flops_fwd = 2.0 * n**3
    for name, fn, hlo_key, base in cases:
        if time.perf_counter() - t_start > args.budget:
            result["errors"][name] = f"skipped: over the {args.budget:.0f} s budget"
            print(f"{name}: skipped (budget)")
            continue
        try:
            t0 = time.perf_counter()
            compiled = jax.jit(fn).lower(x, w).compile()
            compile_s = time.perf_counter() - t0
            text = compiled.as_text()
            (out / "hlo" / f"{hlo_key}.hlo.txt").write_text(text)
            info = inspect_hlo(text)
            result["hlo"][hlo_key] = info
            timing = _time(compiled, (x, w), args.reps, args.warmup)
            flops = flops_fwd * (3 if "train" in name else 1)
            entry = {
                **{k: v for k, v in timing.items()},
                "compile_s": compile_s,
                "tflops": flops / (timing["ms"] * 1e-3) / 1e12,
                "baseline": base,
            }
            result["cases"][name] = entry
            print(
                f"{name}: {timing['ms']:.3f} ms (min {timing['ms_min']:.3f}), "
                f"compile {compile_s:.1f} s; HLO: cublasLt f8 {info['cublaslt_f8']}, f8 dot "
                f"{info['f8_dot'] or info['f8_gemm']}, s8 dot {info['s8_dot'] or info['s8_gemm']}"
            )
        except Exception as err:  # one failing case must not stop the others
            result["errors"][name] = "".join(traceback.format_exception_only(err)).strip()
            print(f"{name}: FAILED {result['errors'][name][:300]}")
        save()

    # ratios against the bf16 baseline of the same run
    for entry in result["cases"].values():
        base = result["cases"].get(entry["baseline"] or "")
        entry["speedup_vs_bf16"] = base["ms"] / entry["ms"] if base else None
    print()
    print("| case | ms (median) | ms (min) | TFLOP/s | speed-up vs bf16 |")
    print("|---|--:|--:|--:|--:|")
    for name, e in result["cases"].items():
        ratio = "1 (baseline)" if e["baseline"] is None else f"{e['speedup_vs_bf16']:.2f}x"
        print(f"| {name} | {e['ms']:.3f} | {e['ms_min']:.3f} | {e['tflops']:.1f} | {ratio} |")
    print()
    checks = {
        "fp8_forward": ("fp8 forward runs as an fp8 GEMM", ("cublaslt_f8", "f8_dot", "f8_gemm")),
        "fp8_train": ("fp8 train step has fp8 GEMMs", ("cublaslt_f8", "f8_dot", "f8_gemm")),
        "int8_forward": ("int8 forward runs as an s8 GEMM", ("s8_dot", "s8_gemm")),
        "int8_per_channel_forward": ("int8 per-channel forward is s8", ("s8_dot", "s8_gemm")),
    }
    for key, (label, flags) in checks.items():
        info = result["hlo"].get(key)
        if info is None:
            print(f"{label}: not checked")
            continue
        hits = [f for f in flags if info[f]]
        print(f"{label}: {'YES' if hits else 'NO'} ({', '.join(hits) or 'none of ' + str(flags)})")
    if "fp8_train" in result["hlo"]:
        text = (out / "hlo" / "fp8_train.hlo.txt").read_text()
        n_f8 = len(re.findall(r"custom_call_target=\"__cublas\$lt\$matmul\$f8\"", text))
        result["hlo"]["fp8_train"]["cublaslt_f8_calls"] = n_f8
        print(f"fp8 train step: {n_f8} __cublas$lt$matmul$f8 calls (forward, dlhs, drhs: 3)")
    result["wall_s"] = time.perf_counter() - t_start
    save()
    print(f"wrote {out / 'gpu_dot.json'} and {out / 'hlo'}/ in {result['wall_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
