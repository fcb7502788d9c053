"""Serving forward time: one Dense layer, float vs w8a8 vs fp8 vs weight-only (w8 / w4 / nf4).

``y = x @ W + b`` with a weight quantized once, offline (a :class:`jaxquant.QArray`), and
every variant a jitted forward, compiled ahead of time. The number that matters is
``ratio`` = variant time / baseline time, both from the same round of the same process.

CPU (default): K = N = 4096, batch 1024, float32 baseline. Variants: a raw bf16 dot
(float32 accumulation) and a raw ``int8 x int8 -> int32`` dot (what the hardware gives,
on pre-quantized inputs); jaxquant ``dot_general`` with a QArray weight: w8a8 with a
static activation scale (``calibration=jq.fixed(amax)``) and dynamic (absmax per call,
per tensor and per token), fp8 e4m3 static (no fp8 GEMM on CPU: widened exactly to bf16),
weight-only int8 per channel, int4 and NF4 ``per_block(0, 32)``, each with bfloat16
activations ("a16") and float32 ones; and the same through a Flax Linen model
(``quantize_model`` -> ``calibrate`` -> ``convert`` -> ``apply``).

GPU (``--gpu``): K = N = 8192, batch 8192, bf16 x bf16 baseline; jaxquant w8a8 (static
and dynamic), fp8 e4m3 x e4m3 and e4m3 x e5m2 (static), w8a16, w4a16; raw int8 and fp8
GEMMs on pre-quantized inputs. The HLO facts count the cuBLAS / cuBLASLt custom calls.

Per variant, besides the time: the compiled HLO's dots and custom calls with their operand
dtypes, the weight argument's bytes (and any float array of the weight's size the program
builds), and the max abs error against the float32 output and against the exact fake-quant
reference (``fake_quant(x) @ dequantize(W)`` in float32, ``Precision.HIGHEST``).

    python3 benchmarks/inference.py --out benchmarks/results/inference_cpu.json
    python3 benchmarks/inference.py --quick                  # seconds: a smoke run
    python3 benchmarks/inference.py --gpu --out $OUT/inference_gpu.json --hlo-dir $OUT/hlo
    python3 benchmarks/inference.py --gpu --quick --allow-cpu   # the GPU path, traced on CPU
    python3 benchmarks/inference.py --markdown benchmarks/results/inference_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for common
import common  # puts the repository root on sys.path too

import jaxquant as jq
from jaxquant._src.serve import weight_path
from jaxquant.app.timing import seconds_per_call

DN = (((1,), (0,)), ((), ()))
HIGHEST = lax.Precision.HIGHEST
BF16 = jnp.bfloat16
F32 = jnp.float32

# The issue's measurements (2-core CPU, 4096 x 4096 Dense, batch 1024; H200 at 8192), as
# ratios of time to float32's (CPU) or speed-ups over bf16 (GPU). Not rerun here: Qwix is
# not installed.
ISSUE = {
    "cpu_time_ratio_vs_float32": {
        "qwix_ptq_w8a8": 0.66,
        "raw_int8_dot": 0.65,
        "raw_bf16_dot": 0.50,
        "qwix_weight_only_w8_w4": 1.17,
    },
    "h200_speedup_vs_bf16_gemm": {"cublaslt_int8_gemm": 1.22, "e4m3_x_e5m2_gemm": 1.77},
    "targets": {
        "cpu_w8a8_time_ratio_max": 0.66,
        "cpu_weight_only_time_ratio_max": 1.0,
        "gpu_w8a8_fp8_speedup_min": 1.2,
    },
}


@dataclasses.dataclass
class Variant:
    """One jitted forward. ``args`` are the real arrays; ``weight`` picks the weight out of
    them (for its bytes); ``exact`` / ``float_ref`` build the reference outputs."""

    name: str
    kind: str  # "baseline" | "raw" | "jaxquant" | "flax"
    fn: Callable[..., Any]
    args: tuple
    weight: Callable[[tuple], Any]
    exact: Callable[[], Any] | None
    float_ref: str | None  # "with_bias" | "no_bias" | None
    target: str | None = None  # "w8a8" | "weight_only" | "gpu" | None
    path: str = ""  # jaxquant.serve.weight_path of the product
    note: str = ""
    twin: str | None = None  # a variant that must compute the same output (flax vs functional)
    compiled: Any = None
    facts: dict = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------- HLO facts

parse_hlo = common.parse_hlo
_short = common.type_name
_elems = common.n_elems


def dot_summary(parsed: dict) -> str:
    """``s8 x s8 -> s32 (__ynn_fusion)``; custom calls as ``target: f8e4m3fn x f8e5m2 -> bf16``."""
    return "; ".join(common.gemm_list(parsed))


def hlo_facts(text: str, k: int, n: int, batch: int) -> dict:
    parsed = parse_hlo(text)
    kn = k * n
    floats = ("f32", "bf16", "f16", "f64")

    def weight_sized(t: str) -> bool:
        return _short(t) in floats and _elems(t) == kn

    calls = parsed["custom_calls"]
    facts = {
        "dot": dot_summary(parsed),
        "dots": parsed["dots"],
        "custom_calls": [c for c in calls if "cublas" in c["target"] or "gemm" in c["target"]],
        "n_cublas_gemm": sum(c["target"] == "__cublas$gemm" for c in calls),
        "n_cublaslt_matmul": sum(c["target"] == "__cublas$lt$matmul" for c in calls),
        "n_cublaslt_matmul_f8": sum(c["target"] == "__cublas$lt$matmul$f8" for c in calls),
        "n_triton_gemm": sum("triton_gemm" in f["kind"] for f in parsed["entry_fusions"]),
        "entry_params": parsed["entry_params"],
        # A float array of the weight's size given to the program: a float copy of W.
        "float_weight_param": [t for t in parsed["entry_params"] if weight_sized(t)],
        # ... or built by it on every call (a widened / dequantized weight).
        "float_weight_built": [
            f["type"] for f in parsed["entry_fusions"] if weight_sized(f["type"])
        ],
        "n_entry_fusions": len(parsed["entry_fusions"]),
    }
    if batch * k == kn or batch * n == kn:
        facts["note"] = "batch * K or batch * N == K * N: weight-sized arrays are ambiguous"
    return facts


# --------------------------------------------------------------------------- references


def exact_int_dot(a: Any, b: Any, chunk: int = 4096) -> Any:
    """``a @ b`` for int8 ``a``, ``b``, exactly, in int32, from float32 dots that cannot
    round: ``a = 16 * hi + lo`` (``hi`` in [-8, 7], ``lo`` in [0, 15]) and contraction chunks
    of 4096, so every float32 partial sum stays below 2^24."""
    a32 = a.astype(jnp.int32)
    hi, lo = jnp.floor_divide(a32, 16), jnp.remainder(a32, 16)
    out = jnp.zeros((a.shape[0], b.shape[1]), jnp.int32)
    for s in range(0, a.shape[1], chunk):
        bf = b[s : s + chunk].astype(F32)
        ph = jnp.dot(hi[:, s : s + chunk].astype(F32), bf, precision=HIGHEST)
        pl = jnp.dot(lo[:, s : s + chunk].astype(F32), bf, precision=HIGHEST)
        out = out + 16 * ph.astype(jnp.int32) + pl.astype(jnp.int32)
    return out


def _dot_hi(a: Any, b: Any) -> Any:
    return lax.dot_general(a.astype(F32), b.astype(F32), DN, HIGHEST, preferred_element_type=F32)


def _errors(out: Any, exact: Any, float_ref: Any) -> dict:
    o = jnp.asarray(out)
    res: dict[str, Any] = {"out_dtype": str(o.dtype)}
    if jnp.issubdtype(o.dtype, jnp.integer):
        res["max_abs_err_vs_exact"] = float(jnp.max(jnp.abs(o.astype(jnp.int32) - exact)))
        res["exact_match"] = bool(jnp.all(o == exact))
        return res
    o = o.astype(F32)
    res["finite"] = bool(jnp.all(jnp.isfinite(o)))
    if exact is not None:
        e = jnp.asarray(exact, F32)
        res["max_abs_err_vs_exact"] = float(jnp.max(jnp.abs(o - e)))
        res["rel_err_vs_exact"] = res["max_abs_err_vs_exact"] / float(jnp.max(jnp.abs(e)))
    if float_ref is not None:
        res["max_abs_err_vs_float32"] = float(jnp.max(jnp.abs(o - float_ref)))
        res["rel_err_vs_float32"] = res["max_abs_err_vs_float32"] / float(
            jnp.max(jnp.abs(float_ref))
        )
    return res


# --------------------------------------------------------------------------- variants


def _specs() -> dict[str, jq.QuantSpec]:
    return {
        "w8": jq.QuantSpec("int8", jq.per_channel(-1)),
        "w4": jq.QuantSpec("int4", jq.per_block(0, 32)),
        "nf4": jq.QuantSpec("nf4", jq.per_block(0, 32)),
        "e4m3": jq.QuantSpec("e4m3", jq.per_channel(-1)),
        "e5m2": jq.QuantSpec("e5m2", jq.per_channel(-1)),
    }


def _jq_dense(act_spec: jq.QuantSpec | None, out_dtype: Any = None) -> Callable:
    def f(x, q, b):
        y = jq.dot_general(x, q, DN, lhs_spec=act_spec, preferred_element_type=out_dtype)
        return y + b.astype(y.dtype)

    return f


def _jq_variant(
    name: str,
    act: jq.QuantSpec | None,
    q: jq.QArray,
    x: Any,
    b: Any,
    *,
    out_dtype: Any = None,
    target: str | None = None,
    note: str = "",
) -> Variant:
    """jaxquant ``dot_general(x, q) + b``; the exact reference is
    ``fake_quant(x, act) @ dequantize(q)`` in float32 (for weight-only: ``x`` as given)."""

    def exact():
        xe = x.astype(F32) if act is None else jq.fake_quant(x.astype(F32), act)
        return _dot_hi(xe, jq.dequantize(q, F32)) + b.astype(F32)

    return Variant(
        name=name,
        kind="jaxquant",
        fn=_jq_dense(act, out_dtype),
        args=(x, q, b),
        weight=lambda a: a[1],
        exact=exact,
        float_ref="with_bias",
        target=target,
        path=weight_path(act, q, (0,)),
        note=note,
    )


def _int8_inputs(x: Any, w: Any) -> tuple[Any, Any]:
    xi = jq.quantize(x.astype(F32), jq.QuantSpec("int8")).values
    wi = jq.quantize(w.astype(F32), jq.QuantSpec("int8", jq.per_channel(-1))).values
    return xi, wi


def cpu_variants(x, w, b, x_cal, amax, args) -> list[Variant]:
    sp = _specs()
    q = {k: jq.quantize(w, sp[k]) for k in ("w8", "w4", "nf4", "e4m3")}
    xb = x.astype(BF16)
    a8s = jq.QuantSpec("int8", calibration=jq.fixed(amax))
    a8d = jq.QuantSpec("int8")
    a8t = jq.QuantSpec("int8", jq.per_token(-1))
    f8s = jq.QuantSpec("e4m3", calibration=jq.fixed(amax))
    wb = w.astype(BF16)
    xi, wi = _int8_inputs(x, w)
    a16 = {"out_dtype": F32, "target": "weight_only", "note": "bf16 act, f32 out"}
    vs = [
        Variant(
            "float32",
            "baseline",
            lambda x, w, b: lax.dot_general(x, w, DN) + b,
            (x, w, b),
            lambda a: a[1],
            None,
            "with_bias",
            note="x @ W + b, float32",
        ),
        Variant(
            "raw bf16 dot (f32 acc)",
            "raw",
            lambda x, w: lax.dot_general(x, w, DN, preferred_element_type=F32),
            (xb, wb),
            lambda a: a[1],
            lambda: _dot_hi(xb, wb),
            "no_bias",
            note="bf16 inputs given, no bias",
        ),
        Variant(
            "raw int8 dot (s32 acc)",
            "raw",
            lambda x, w: lax.dot_general(x, w, DN, preferred_element_type=jnp.int32),
            (xi, wi),
            lambda a: a[1],
            lambda: exact_int_dot(xi, wi),
            None,
            note="int8 inputs given, no scales, no bias",
        ),
        _jq_variant("w8a8 static", a8s, q["w8"], x, b, target="w8a8", note="act fixed(amax)"),
        _jq_variant("w8a8 dynamic", a8d, q["w8"], x, b, target="w8a8", note="act absmax per call"),
        _jq_variant(
            "w8a8 dynamic per-token", a8t, q["w8"], x, b, target="w8a8", note="act per_token(-1)"
        ),
        _jq_variant("fp8 e4m3 static", f8s, q["e4m3"], x, b, note="act + weight e4m3"),
        _jq_variant("w8a16", None, q["w8"], xb, b, **a16),
        _jq_variant("w8a32", None, q["w8"], x, b, target="weight_only", note="f32 act"),
        _jq_variant("w4a16", None, q["w4"], xb, b, **a16),
        _jq_variant("w4a32", None, q["w4"], x, b, target="weight_only", note="f32 act"),
        _jq_variant("nf4a16", None, q["nf4"], xb, b, **a16),
        _jq_variant("nf4a32", None, q["nf4"], x, b, target="weight_only", note="f32 act"),
    ]
    if not args.no_flax:
        vs += flax_variants(x, w, b, x_cal, amax)
    return vs


def flax_variants(x, w, b, x_cal, amax) -> list[Variant]:
    """``quantize_model(nn.Dense)`` -> ``calibrate`` -> ``convert`` -> jitted ``apply``."""
    import flax.linen as nn

    from jaxquant.flax import Rule, calibrate, convert, quantize_model

    sp = _specs()
    n = w.shape[1]
    variables = {"params": {"kernel": w, "bias": b}}
    out = []
    for name, dense, rule, xin in (
        (
            "flax w8a8 static",
            nn.Dense(n),
            Rule(".*", weight=sp["w8"], act=jq.QuantSpec("int8")),
            x,
        ),
        ("flax w4a16", nn.Dense(n, dtype=BF16), Rule(".*", weight=sp["w4"]), x.astype(BF16)),
    ):
        qmodel = quantize_model(dense, rule)
        if rule.act is not None:
            cal = calibrate(qmodel, list(x_cal), variables)
            got = cal.ranges[""][1]
            if abs(got - amax) > 1e-6 * amax:
                raise RuntimeError(f"calibrate found amax {got}, the functional variants {amax}")
            qmodel = quantize_model(dense, cal.rules)
        jax.eval_shape(qmodel.init, jax.random.key(0), xin[:1])
        served = convert(qmodel, variables)
        act = None if rule.act is None else qmodel_act(qmodel)
        kernel = served["params"]["kernel"]

        def exact(kernel=kernel, act=act, xin=xin):
            xe = xin.astype(F32) if act is None else jq.fake_quant(xin.astype(F32), act)
            return _dot_hi(xe, jq.dequantize(kernel, F32)) + b.astype(F32)

        out.append(
            Variant(
                name,
                "flax",
                qmodel.apply,
                (served, xin),
                lambda a: a[0]["params"]["kernel"],
                exact,
                "with_bias",
                target="w8a8" if rule.act is not None else "weight_only",
                path=weight_path(act, kernel, (0,)),
                note="Linen nn.Dense" + (", dtype=bf16 (bf16 out)" if dense.dtype == BF16 else ""),
                twin=name.removeprefix("flax "),
            )
        )
    return out


def qmodel_act(qmodel) -> jq.QuantSpec:
    from jaxquant.flax import report

    (m,) = report(qmodel)
    return m.rule.act


def _fp8_name(a: Any) -> str:
    return np.dtype(a.dtype).name.removeprefix("float8_").removesuffix("fn")


def gpu_variants(x, w, b, x_cal, amax, args) -> list[Variant]:
    sp = _specs()
    xb, wb, bb = x.astype(BF16), w.astype(BF16), b.astype(BF16)
    q = {k: jq.quantize(wb, sp[k]) for k in ("w8", "w4", "e4m3", "e5m2")}
    a8s = jq.QuantSpec("int8", calibration=jq.fixed(amax))
    a8d = jq.QuantSpec("int8")
    f8s = jq.QuantSpec("e4m3", calibration=jq.fixed(amax))
    xi, wi = _int8_inputs(xb, wb)
    xf8 = jq.quantize(xb, jq.QuantSpec("e4m3")).values
    wf8 = jq.quantize(wb, jq.QuantSpec("e4m3")).values
    wf8b = jq.quantize(wb, jq.QuantSpec("e5m2")).values

    def raw_fp8(xv, wv):
        return Variant(
            f"raw fp8 {_fp8_name(xv)} x {_fp8_name(wv)} GEMM (bf16 out)",
            "raw",
            lambda x, w: lax.dot_general(x, w, DN, preferred_element_type=BF16),
            (xv, wv),
            lambda a: a[1],
            lambda: _dot_hi(xv, wv),
            None,
            note="fp8 inputs given, no scales, no bias",
        )

    bf16 = Variant(
        "bf16",
        "baseline",
        lambda x, w, b: lax.dot_general(x, w, DN) + b,
        (xb, wb, bb),
        lambda a: a[1],
        lambda: _dot_hi(xb, wb) + bb.astype(F32),
        "with_bias",
        note="x @ W + b, bfloat16",
    )
    raw_int8 = Variant(
        "raw int8 GEMM (s32 out)",
        "raw",
        lambda x, w: lax.dot_general(x, w, DN, preferred_element_type=jnp.int32),
        (xi, wi),
        lambda a: a[1],
        lambda: exact_int_dot(xi, wi),
        None,
        note="int8 inputs given, no scales, no bias",
    )
    # Most important first: with --budget, the tail is what gets skipped.
    return [
        bf16,
        _jq_variant("w8a8 static", a8s, q["w8"], xb, bb, target="gpu", note="act fixed(amax)"),
        _jq_variant("fp8 e4m3 static", f8s, q["e4m3"], xb, bb, target="gpu", note="e4m3 x e4m3"),
        _jq_variant(
            "fp8 e4m3 x e5m2 static", f8s, q["e5m2"], xb, bb, target="gpu", note="weight e5m2"
        ),
        raw_int8,
        raw_fp8(xf8, wf8),
        raw_fp8(xf8, wf8b),
        _jq_variant("w4a16", None, q["w4"], xb, bb, note="bf16 act, int4 per_block(0, 32)"),
        _jq_variant("w8a16", None, q["w8"], xb, bb, note="bf16 act"),
        _jq_variant("w8a8 dynamic", a8d, q["w8"], xb, bb, target="gpu", note="act absmax per call"),
    ]


# --------------------------------------------------------------------------- timing


def _nbytes(tree: Any) -> int:
    return int(
        sum(np.dtype(a.dtype).itemsize * int(np.prod(a.shape)) for a in jax.tree.leaves(tree))
    )


def compile_all(
    variants: list[Variant], k: int, n: int, batch: int, hlo_dir: Path | None, budget: float | None
) -> tuple[list[Variant], list[dict]]:
    """Compile every variant ahead of time and read its HLO facts. A variant that fails to
    compile (a pair the backend lacks), or comes after ``budget`` seconds of compiling, is
    skipped and reported; the baseline must compile."""
    t_start = time.perf_counter()
    ok, skipped = [], []
    for i, v in enumerate(variants):
        if i and budget is not None and time.perf_counter() - t_start > budget:
            skipped.append({"variant": v.name, "reason": f"compile budget of {budget} s spent"})
            print(f"skipped  {v.name}: compile budget spent", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            v.compiled = jax.jit(v.fn).lower(*v.args).compile()
        except Exception as e:  # a pair this backend lacks: report it, go on
            if not i:
                raise
            skipped.append({"variant": v.name, "reason": f"{type(e).__name__}: {e}"[:2000]})
            print(f"FAILED   {v.name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        compile_s = time.perf_counter() - t0
        text = v.compiled.as_text()
        if hlo_dir is not None:
            hlo_dir.mkdir(parents=True, exist_ok=True)
            slug = re.sub(r"[^\w]+", "_", v.name).strip("_")
            (hlo_dir / f"{slug}.txt").write_text(text)
        wt = v.weight(v.args)
        v.facts = {
            "compile_s": compile_s,
            "weight_bytes": _nbytes(wt),
            "weight_leaves": [f"{a.dtype}{list(a.shape)}" for a in jax.tree.leaves(wt)],
            **hlo_facts(text, k, n, batch),
        }
        if isinstance(wt, jq.QArray):
            v.facts["weight_values_bytes"] = _nbytes(wt.values)
            v.facts["weight_scale_bytes"] = _nbytes(wt.scale)
        ok.append(v)
        print(f"compiled {v.name:28s} {compile_s:6.2f} s  {v.facts['dot']}", flush=True)
    return ok, skipped


def time_rounds(variants: list[Variant], rounds: int, reps: int, warmup: int) -> dict:
    """Paired, interleaved timing. Each round visits every variant (in an order rotated by
    one each round) and times the baseline's ``reps`` calls immediately before the
    variant's ``reps`` calls (each block: back-to-back calls, then block): a variant's
    ratio in that round is its time over the baseline's time next to it, so load from
    other processes hits both alike. Returns seconds per call per sample, and the paired
    baseline times.

    The same pairing as :func:`jaxquant.app.timing.paired_ratios`, kept here because the
    tables need every sample (the "ratio of fastest" is min over min, not a median of
    ratios) and a progress line per round; each block is
    :func:`jaxquant.app.timing.seconds_per_call`."""
    for v in variants:
        for _ in range(warmup):
            jax.block_until_ready(v.compiled(*v.args))

    def block(v: Variant) -> float:
        return seconds_per_call(lambda: v.compiled(*v.args), reps)

    base, rest = variants[0], variants[1:]
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    paired: dict[str, list[float]] = {v.name: [] for v in rest}
    for r in range(rounds):
        order = rest[r % len(rest) :] + rest[: r % len(rest)] if rest else []
        for v in order:
            tb = block(base)
            times[base.name].append(tb)
            paired[v.name].append(tb)
            times[v.name].append(block(v))
        print(
            f"round {r + 1}/{rounds}: "
            + ", ".join(f"{v.name} {times[v.name][-1] / paired[v.name][-1]:.2f}" for v in rest),
            flush=True,
        )
    if not rest:
        for _ in range(rounds):
            times[base.name].append(block(base))
    paired[base.name] = times[base.name]
    return {"times": times, "paired_baseline": paired}


def run(args) -> dict:
    gpu = args.gpu
    batch, k, n = args.batch, args.k, args.n
    key = jax.random.split(jax.random.key(args.seed), 4)
    x = jax.random.normal(key[0], (batch, k), F32)
    w = jax.random.normal(key[1], (k, n), F32) / np.sqrt(k)
    b = 0.1 * jax.random.normal(key[2], (n,), F32)
    n_cal = 4
    x_cal = jax.random.normal(key[3], (n_cal, min(batch, 256), k), F32)
    amax = float(jnp.max(jnp.abs(x_cal)))  # what calibrate(absmax) finds on these batches
    build = gpu_variants if gpu else cpu_variants
    variants = build(x, w, b, x_cal, amax, args)
    if args.only:
        keep = [s.strip() for s in args.only.split(",") if s.strip()]
        variants = [variants[0]] + [v for v in variants[1:] if any(s in v.name for s in keep)]
    variants, skipped = compile_all(variants, k, n, batch, args.hlo_dir, args.budget)

    # Numerics, before timing (the outputs are freed again).
    base = variants[0]
    if gpu:
        xr, wr, br = x.astype(BF16), w.astype(BF16), b.astype(BF16)
    else:
        xr, wr, br = x, w, b
    ref_nb = _dot_hi(xr, wr)
    refs = {"no_bias": ref_nb, "with_bias": ref_nb + br.astype(F32)}
    errs = {}
    twins = {v.twin for v in variants if v.twin}
    kept = {}
    for v in variants:
        out = v.compiled(*v.args)
        try:
            exact = v.exact() if v.exact is not None else refs["with_bias"]
            errs[v.name] = _errors(out, exact, refs.get(v.float_ref or ""))
        except Exception as e:  # a failing reference must not stop the timing
            exact = None
            errs[v.name] = {"error_check_failed": f"{type(e).__name__}: {e}"[:500]}
            print(f"numerics check of {v.name} failed: {e}", flush=True)
        if v.name in twins:
            kept[v.name] = out
        if v.twin in kept:  # the module path against the functional one
            other = kept[v.twin]
            errs[v.name]["twin"] = v.twin
            errs[v.name]["max_abs_diff_vs_twin"] = float(
                jnp.max(jnp.abs(out.astype(F32) - other.astype(out.dtype).astype(F32)))
            )
        del out, exact
    del kept
    del refs, ref_nb

    timed = time_rounds(variants, args.rounds, args.reps, args.warmup)
    times, paired = timed["times"], timed["paired_baseline"]
    rows = []
    for v in variants:
        ts = times[v.name]
        ratios = [t / f for t, f in zip(ts, paired[v.name], strict=True)]
        ratio = statistics.median(ratios)
        row = {
            "variant": v.name,
            "kind": v.kind,
            "path": v.path,
            "note": v.note,
            "ms": statistics.median(ts) * 1e3,
            "ms_min": min(ts) * 1e3,
            "ratio": ratio,
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            # fastest sample over fastest baseline sample: load only ever adds time
            "ratio_of_min": min(ts) / min(times[base.name]),
            "speedup": 1.0 / ratio,
            **errs[v.name],
            **v.facts,
        }
        row["meets_target"] = _meets(v.target, ratio)
        row["target"] = v.target
        rows.append(row)
        print(
            f"{v.name:28s} {row['ms']:9.3f} ms  {ratio:5.2f}x {base.name}  "
            f"err {row.get('max_abs_err_vs_exact', float('nan')):.3g}",
            flush=True,
        )
    return {
        "config": {
            "mode": "gpu" if gpu else "cpu",
            "layer": "y = x @ W + b",
            "batch": batch,
            "k": k,
            "n": n,
            "baseline": base.name,
            "rounds": args.rounds,
            "reps": args.reps,
            "warmup": args.warmup,
            "seed": args.seed,
            "x": "N(0, 1)",
            "w": "N(0, 1/K)",
            "b": "0.1 N(0, 1)",
            "static_amax": amax,
            "calibration_batches": f"{n_cal} x ({min(batch, 256)}, {k}), N(0, 1)",
        },
        "issue": ISSUE,
        "rows": rows,
        "skipped": skipped,
        "times_s": times,
        "paired_baseline_s": paired,
    }


def _meets(target: str | None, ratio: float) -> bool | None:
    t = ISSUE["targets"]
    if target == "w8a8":
        return ratio <= t["cpu_w8a8_time_ratio_max"]
    if target == "weight_only":
        return ratio <= t["cpu_weight_only_time_ratio_max"]
    if target == "gpu":
        return 1.0 / ratio >= t["gpu_w8a8_fp8_speedup_min"]
    return None


# --------------------------------------------------------------------------- output


def environment() -> dict:
    """common.environment() plus the keys this script's tables read (older files have them)."""
    env = common.environment()
    return env | {
        "cpu_count": os.cpu_count(),
        "load_average": env["loadavg"],
        "jaxquant_commit": env["git"],
    }


def _fmt_err(r: dict, key: str) -> str:
    """``abs (rel)``: the max abs error and that over max |reference|."""
    if key == "max_abs_err_vs_exact" and "exact_match" in r:
        return "exact" if r["exact_match"] else f"{r[key]:.3g}"
    v = r.get(key)
    if v is None:
        return ""
    rel = r.get(key.replace("max_abs_err", "rel_err"))
    return f"{v:.2e}" + ("" if rel is None else f" ({rel:.1e})")


def markdown(result: dict) -> str:
    env, cfg = result["env"], result["config"]
    base = cfg["baseline"]
    gpu = cfg["mode"] == "gpu"
    lines = [
        f"{env['device']} ({env['backend']}), jax {env['jax']}, jaxquant {env['jaxquant_commit']}, "
        f"{env['cpu_count']} CPUs, batch {cfg['batch']}, K = {cfg['k']}, N = {cfg['n']}, "
        f"{cfg['rounds']} rounds x {cfg['reps']} calls, load average {env['load_average']}",
        "",
        f"| variant | ratio to {base} (median) | range over rounds | ratio of fastest | "
        + ("speedup | " if gpu else "")
        + "ms | HLO dot | weight bytes | float W built per call | max err vs exact | "
        "max err vs float | meets |",
        "|---|--:|--:|--:|--:|" + ("--:|" if gpu else "") + "---|--:|---|--:|--:|---|",
    ]
    for r in result["rows"]:
        built = ", ".join(r["float_weight_built"]) or "-"
        if r["float_weight_param"] and r["kind"] in ("jaxquant", "flax"):
            built = f"**param {', '.join(r['float_weight_param'])}** {built}"
        meets = {True: "yes", False: "**no**", None: ""}[r["meets_target"]]
        lines.append(
            f"| {r['variant']} | {r['ratio']:.2f}x | {r['ratio_min']:.2f}-{r['ratio_max']:.2f} | "
            f"{r['ratio_of_min']:.2f}x | "
            + (f"{r['speedup']:.2f}x | " if gpu else "")
            + f"{r['ms']:.3g} | {r['dot']} | {r['weight_bytes']:,} | {built} | "
            f"{_fmt_err(r, 'max_abs_err_vs_exact')} | {_fmt_err(r, 'max_abs_err_vs_float32')} | "
            f"{meets} |"
        )
    skipped = result.get("skipped", [])
    if skipped:
        lines.append("")
        lines += [f"* skipped {sk['variant']}: {sk['reason'][:200]}" for sk in skipped]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="the GPU benchmark (bf16 baseline, 8192)")
    p.add_argument("--allow-cpu", action="store_true", help="let --gpu run on a CPU backend")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds: a smoke run")
    p.add_argument("--batch", type=int)
    p.add_argument("--k", type=int)
    p.add_argument("--n", type=int)
    p.add_argument("--rounds", type=int, help="timing rounds (default 11 on CPU, 7 on GPU)")
    p.add_argument("--reps", type=int, help="calls per timed block (default 1 on CPU, 20 on GPU)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", help="comma-separated substrings of variant names (+ baseline)")
    p.add_argument("--no-flax", action="store_true", help="skip the Flax Linen variants")
    p.add_argument(
        "--budget",
        type=float,
        help="seconds of compiling after which the "
        "remaining variants are skipped (they are ordered by importance)",
    )
    p.add_argument("--hlo-dir", type=Path, help="write each variant's optimized HLO here")
    p.add_argument("--out", type=Path, help="JSON results")
    p.add_argument(
        "--markdown", type=Path, metavar="JSON", help="print the table of a results file"
    )
    args = p.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return
    if args.gpu and jax.default_backend() != "gpu" and not args.allow_cpu:
        p.error(f"--gpu needs a GPU backend, got {jax.default_backend()!r} (or --allow-cpu)")
    size = (256 if args.gpu else 128) if args.quick else (8192 if args.gpu else 4096)
    args.k = args.k or size
    args.n = args.n or size
    args.batch = args.batch or (64 if args.quick else 8192 if args.gpu else 1024)
    args.reps = args.reps or (20 if args.gpu else 1)
    args.rounds = args.rounds or (7 if args.gpu else 11)
    if args.quick:
        args.rounds = min(args.rounds, 2)
        args.reps = min(args.reps, 2)
    result = run(args)
    result["env"] = environment()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    print(markdown(result))


if __name__ == "__main__":
    main()
