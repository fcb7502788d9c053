"""One-pass Pallas block-quantization kernels against jaxquant's jnp path, on a GPU.

For a 16384x16384 float32 matrix and each case (mxfp8 fake_quant / quantize, mxfp4
fake_quant, int8 ``per_block(-1, 32)`` with ``scale_format="e8m0"`` fake_quant / quantize):

1. **Bit identity.** The kernel's outputs against ``jq.fake_quant`` / ``jq.quantize`` traced
   with the kernels disabled (the jnp path): the big matrix (Gaussian rows at magnitudes
   2^-20..2^20) and a small edge-case matrix (NaN/Inf, all-zero and subnormal blocks, amax
   at ``qmax 2^p`` and its float neighbours, every tie of the element grid, tiny and huge
   amax). ``mismatch`` counts values that differ (any NaN equals any NaN), ``nan_bits``
   counts NaNs whose bit patterns differ (informational: the sign/payload of a NaN is not
   specified), and the scales are compared bit for bit.
2. **Timing.** Both paths and an ``x * 2`` copy to a fresh output: compiled ahead of time,
   one warm-up, then ``--reps`` samples of ``--inner`` back-to-back calls each followed by
   ``block_until_ready``; the median sample / inner is reported. ``bw / copy`` counts the
   bytes the algorithm must move: one read of ``x`` plus the true size of ``jq``'s outputs
   (fake_quant: 4 B/elem; quantize: 1 B/elem codes + one e8m0 byte per block); the copy
   moves 8 B/elem. The kernel's quantize writes e8m0 scales directly
   (``scale_dtype=float8_e8m0fnu``), so both paths return the same arrays.

A case whose kernel fails to compile or run is reported with its exception and skipped.

Usage (from the repository root; ~30-60 s on an H100 including compiles)::

  python benchmarks/gpu_kernels.py --out /tmp/gpu_kernels.json

On a machine without a GPU it runs the kernels in Pallas' interpreter (use a small
``--size``; timings then mean nothing).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxquant as jq
from jaxquant._src import kernels

E8M0 = jnp.float8_e8m0fnu


def _cases() -> list[tuple[str, jq.QuantSpec, str]]:
    int8 = jq.QuantSpec("int8", jq.per_block(-1, 32), scale_format="e8m0")
    return [
        ("mxfp8", jq.QuantSpec("mxfp8"), "fake_quant"),
        ("mxfp8", jq.QuantSpec("mxfp8"), "quantize"),
        ("mxfp4", jq.QuantSpec("mxfp4"), "fake_quant"),
        ("int8 per_block(-1,32) e8m0", int8, "fake_quant"),
        ("int8 per_block(-1,32) e8m0", int8, "quantize"),
    ]


# ----------------------------------------------------------------------------- data


def _big_input(n: int) -> jax.Array:
    """Gaussian rows, each at a random power-of-two magnitude in [2^-20, 2^20]."""
    k1, k2 = jax.random.split(jax.random.key(0))

    @jax.jit
    def make(k1, k2):
        mag = jnp.exp2(jax.random.randint(k2, (n, 1), -20, 21).astype(jnp.float32))
        return jax.random.normal(k1, (n, n), jnp.float32) * mag

    return make(k1, k2)


def _edge_input(spec: jq.QuantSpec, cols: int = 1024) -> jax.Array:
    """Blocks that probe the exactness corners (see the module docstring)."""
    rng = np.random.default_rng(1)
    b = spec.granularity.size
    f = spec.element
    qmax = np.float32(spec.qrange[1])
    mag = np.exp2(rng.integers(-126, 126, 256)).astype(np.float32)
    rows = list((rng.standard_normal((256, b)) * mag[:, None]).astype(np.float32))
    rows += [np.zeros(b), np.full(b, np.nan)]
    rows.append(np.resize([np.nan, np.inf, -np.inf, -np.nan, 1.5, -0.25, 0.0, -0.0], b))
    rows.append(np.resize([np.inf, -np.inf], b))
    rows.append(np.resize([1e-40, -3e-42, 0.0], b))  # subnormal-only block
    rows.append(np.resize([1.0, 1e-40, -7e-39, 0.5], b))
    rows.append(np.resize([np.float32(2.0**-120), -np.float32(2.0**-125), 1e-39], b))
    fmax = np.finfo(np.float32).max
    rows.append(np.resize([fmax, -fmax / 3, 1.0], b))
    with np.errstate(over="ignore"):
        for p in range(-130, 128, 3):
            a = np.float32(qmax * np.float32(2.0**p))
            if np.isfinite(a) and a > 0:
                for v in (a, np.nextafter(a, np.float32(0)), np.nextafter(a, np.float32(np.inf))):
                    rows.append(np.resize([v, -v / 3, v / 7, 0.0], b))
    if f.kind == "float":
        grid = jq.formats.finite_values(f).astype(np.float64)
    else:
        grid = np.arange(spec.qrange[0], spec.qrange[1] + 1, dtype=np.float64)
    probe = np.concatenate([grid, (grid[1:] + grid[:-1]) / 2, [f.max * 1.5, -f.max * 3]])
    probe = probe.astype(np.float32)
    for i in range(0, len(probe), b - 1):
        rows.append(np.concatenate([[np.float32(f.max)], np.resize(probe[i : i + b - 1], b - 1)]))
    x = np.stack([np.asarray(r, np.float32) for r in rows])
    per_row = cols // b
    n_rows = -(-len(x) // per_row)
    n_rows = -(-n_rows // 8) * 8
    pad = rng.standard_normal((n_rows * per_row - len(x), b)).astype(np.float32)
    return jnp.asarray(np.concatenate([x, pad]).reshape(n_rows, cols))


# ------------------------------------------------------------------------- compare


def _uint(dtype) -> Any:
    return {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[np.dtype(dtype).itemsize]


@jax.jit
def _diff_counts(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(mismatches, NaN-position mismatches, NaN bit-pattern differences), on device."""
    same_bits = jax.lax.bitcast_convert_type(a, _uint(a.dtype)) == jax.lax.bitcast_convert_type(
        b, _uint(b.dtype)
    )
    if jnp.issubdtype(a.dtype, jnp.floating):
        an = jnp.isnan(a.astype(jnp.float32))
        bn = jnp.isnan(b.astype(jnp.float32))
    else:
        an = bn = jnp.zeros(a.shape, bool)
    value_bad = (~same_bits & ~(an & bn)) | (an != bn)
    return (
        jnp.sum(value_bad, dtype=jnp.int32),
        jnp.sum(an != bn, dtype=jnp.int32),
        jnp.sum(an & bn & ~same_bits, dtype=jnp.int32),
    )


def _compare(kern_out, ref_out) -> dict[str, int]:
    """Counts over every output array (values, then scales for quantize)."""
    kern = kern_out if isinstance(kern_out, tuple) else (kern_out,)
    ref = ref_out if isinstance(ref_out, tuple) else (ref_out,)
    out = {"mismatch": 0, "nan_position": 0, "nan_bits": 0, "scale_mismatch": 0}
    for i, (a, b) in enumerate(zip(kern, ref, strict=True)):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(f"output {i}: kernel {a.dtype}{a.shape} vs jnp {b.dtype}{b.shape}")
        bad, nanpos, nanbits = (int(v) for v in _diff_counts(a, b))
        if i == 0:
            out["mismatch"] += bad
            out["nan_position"] += nanpos
            out["nan_bits"] += nanbits
        else:
            out["scale_mismatch"] += bad
    return out


# -------------------------------------------------------------------------- timing


def _time(fn: Callable, x: jax.Array, reps: int, inner: int) -> float:
    """Median milliseconds per call."""
    jax.block_until_ready(fn(x))  # warm-up
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(x)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / inner * 1e3)
    return statistics.median(samples)


def _compile(f: Callable, x: jax.Array) -> tuple[Callable, float]:
    t0 = time.perf_counter()
    compiled = jax.jit(f).lower(x).compile()
    return compiled, time.perf_counter() - t0


def _paths(
    spec: jq.QuantSpec, op: str, interpret: bool, tile: int = kernels.block_quant.TILE_ELEMS
) -> tuple[Callable, Callable]:
    """(kernel path, jnp path), both returning the same arrays."""
    if op == "fake_quant":
        return (
            lambda x: kernels.block_fake_quant(x, spec, interpret=interpret, tile_elems=tile),
            lambda x: jq.fake_quant(x, spec),
        )

    def ref(x):
        q = jq.quantize(x, spec)
        return q.values, q.scale

    return (
        lambda x: kernels.block_quantize(
            x, spec, interpret=interpret, tile_elems=tile, scale_dtype=spec.scale_format.dtype
        ),
        ref,
    )


def _bytes_per_elem(ref: Callable, x: jax.Array) -> float:
    """One read of x plus the true size of the jnp path's outputs, per element."""
    outs = jax.tree_util.tree_leaves(jax.eval_shape(ref, x))
    written = sum(int(np.prod(o.shape)) * np.dtype(o.dtype).itemsize for o in outs)
    return x.dtype.itemsize + written / x.size


# ---------------------------------------------------------------------------- main


def run_case(name, spec, op, x, copy_ms, args, interpret) -> dict[str, Any]:
    rec: dict[str, Any] = {"case": name, "op": op, "spec": str(spec)}
    kern_f, ref_f = _paths(spec, op, interpret)
    # All tracing of the jnp path happens here, with the kernels disabled, so that it stays
    # the jnp path once quantize.py dispatches to the kernel.
    with kernels.disabled():
        ref, rec["ref_compile_s"] = _compile(ref_f, x)
        edge = _edge_input(spec)
        ref_edge = jax.jit(ref_f)(edge)
        bpe = _bytes_per_elem(ref_f, x)
    rec["bytes_per_elem"] = bpe
    try:
        kern, rec["kernel_compile_s"] = _compile(kern_f, x)
        rec["identity"] = _compare(kern(x), ref(x))
        rec["edge_identity"] = _compare(jax.jit(kern_f)(edge), ref_edge)
        rec["kernel_ms"] = _time(kern, x, args.reps, args.inner)
    except Exception as err:  # report and carry on with the other cases
        rec["error"] = f"{type(err).__name__}: {err}"
        rec["traceback"] = traceback.format_exc(limit=6)
        print(f"[{name} {op}] kernel failed:\n{rec['traceback']}", file=sys.stderr)
    rec["jnp_ms"] = _time(ref, x, args.reps, args.inner)
    for path in ("kernel", "jnp"):
        ms = rec.get(f"{path}_ms")
        if ms is not None:
            rec[f"{path}_gbps"] = bpe * x.size / ms / 1e6
            rec[f"{path}_bw_ratio"] = (bpe / ms) / (8.0 / copy_ms)
    if args.tiles and (name, op) == ("mxfp8", "fake_quant") and "error" not in rec:
        rec["tile_sweep"] = _tile_sweep(spec, op, x, copy_ms, bpe, args, interpret)
    return rec


def _tile_sweep(spec, op, x, copy_ms, bpe, args, interpret) -> list[dict[str, Any]]:
    """Kernel time for other elements-per-program settings (a tuning aid)."""
    out = []
    for tile in args.tiles:
        row: dict[str, Any] = {"tile_elems": tile}
        try:
            kern, _ = _compile(_paths(spec, op, interpret, tile)[0], x)
            row["ms"] = _time(kern, x, args.reps, args.inner)
            row["bw_ratio"] = (bpe / row["ms"]) / (8.0 / copy_ms)
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {err}"[:500]
        print(f"  tile sweep {spec.format.name} {op}: {row}")
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=None, help="N for an N x N input")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--inner", type=int, default=None, help="calls per sample")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument(
        "--tiles",
        type=lambda v: [int(t) for t in v.split(",") if t],
        default=None,
        help="elements per program to sweep on mxfp8 fake_quant (default 2048,4096,16384 "
        "on GPU, none elsewhere; '' for none)",
    )
    args = parser.parse_args(argv)
    backend = jax.default_backend()
    on_gpu = backend == "gpu"
    interpret = not on_gpu
    args.size = args.size or (16384 if on_gpu else 512)
    args.inner = args.inner or (5 if on_gpu else 1)
    if args.tiles is None:
        args.tiles = [2048, 4096, 16384] if on_gpu else []
    dev = jax.devices()[0]
    env = {
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "backend": backend,
        "device": getattr(dev, "device_kind", str(dev)),
        "platform": platform.platform(),
        "size": args.size,
        "reps": args.reps,
        "inner": args.inner,
        "interpret": interpret,
        "tile_elems": kernels.block_quant.TILE_ELEMS,
    }
    print(json.dumps(env))
    t_start = time.perf_counter()
    x = _big_input(args.size)
    copy, _ = _compile(lambda x: x * 2, x)
    copy_ms = _time(copy, x, args.reps, args.inner)
    results = []
    for name, spec, op in _cases():
        try:
            rec = run_case(name, spec, op, x, copy_ms, args, interpret)
        except Exception as err:  # the jnp side failed: still report the rest
            rec = {"case": name, "op": op, "error": f"{type(err).__name__}: {err}"}
            print(f"[{name} {op}] failed:\n{traceback.format_exc(limit=6)}", file=sys.stderr)
        results.append(rec)
    env["wall_s"] = time.perf_counter() - t_start
    _print_table(results, copy_ms, env)
    report = {"env": env, "copy_ms": copy_ms, "results": results}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return report


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def _print_table(results: list[dict[str, Any]], copy_ms: float, env: dict[str, Any]) -> None:
    n = env["size"]
    print(
        f"\n{env['device']} ({env['backend']}), jax {env['jax']}, {n}x{n} float32, "
        f"median of {env['reps']} x {env['inner']} calls, copy x*2 {copy_ms:.3f} ms "
        f"(8 B/elem), wall {env['wall_s']:.1f} s"
    )
    head = (
        "| case | op | B/elem | kernel ms | jnp ms | kernel bw/copy | jnp bw/copy | speedup "
        "| mismatch (big / edge) | scale mismatch (big / edge) | NaN bits differ (edge) |"
    )
    print(head)
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in results:
        ident, edge = r.get("identity", {}), r.get("edge_identity", {})
        k, j = r.get("kernel_ms"), r.get("jnp_ms")
        speed = None if k is None or j is None else j / k
        print(
            f"| {r['case']} | {r['op']} | {_fmt(r.get('bytes_per_elem'))} | {_fmt(k)} | "
            f"{_fmt(j)} | {_fmt(r.get('kernel_bw_ratio'), '.2f')} | "
            f"{_fmt(r.get('jnp_bw_ratio'), '.2f')} | {_fmt(speed, '.2f')} | "
            f"{ident.get('mismatch', '-')} / {edge.get('mismatch', '-')} | "
            f"{ident.get('scale_mismatch', '-')} / {edge.get('scale_mismatch', '-')} | "
            f"{edge.get('nan_bits', '-')} |"
        )
        if "error" in r:
            print(f"|   ^ error: {r['error'][:300]} |")


if __name__ == "__main__":
    main()
