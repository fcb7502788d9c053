"""Training-step time of a float MLP against the same MLP under each quantized recipe.

CPU (default): the digits MLP 64-512-512-10, batch 128, Adam; float32 baseline; every
recipe in ``jq.recipes`` through ``jaxquant.flax.quantize_model``. The number that matters
is ``ratio`` = recipe step time / float step time, both measured in this run (lower is
faster; the issue's target for int8 QAT is <= 1.0x).

GPU (``--gpu``): 3 Dense layers of width 8192, batch 8192, bfloat16 parameters and
compute, SGD; bf16 baseline; jaxquant's fp8_current recipe under each fp8 lowering
(see ``jaxquant._src.dot._FP8_LOWERING``) and a hand-written current-scaling fp8 step
with ``custom_vjp`` as a reference. Reports ``speedup`` = bf16 time / variant time, the
number of cuBLASLt fp8 GEMMs in the compiled step, and the loss after 100 steps against
bf16's.

    python3 benchmarks/train_step.py [--markdown] [--out results/train_step_cpu.json]
    python3 benchmarks/train_step.py --gpu --out results/train_step_gpu.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for common
import common  # puts the repository root on sys.path too

import jaxquant as jq
from jaxquant._src import dot as _dot
from jaxquant.app.timing import sample_ms
from jaxquant.flax import quantize_model


def mlp(widths: tuple[int, ...], dtype=jnp.float32, dot_general=None) -> common.MLP:
    """The digits MLP of ``widths`` (the last is the output) with ``dtype`` parameters and
    compute, and optionally another ``dot_general`` in every layer."""
    kw = {} if dot_general is None else {"dot_general": dot_general}
    dense = functools.partial(nn.Dense, dtype=dtype, param_dtype=dtype, **kw)
    return common.MLP(features=tuple(widths[:-1]), n_out=widths[-1], dense=dense)


def _time(step, carry, batch, *, iters: int, repeats: int) -> tuple[float, object]:
    """Median seconds per step (:func:`jaxquant.app.timing.sample_ms`: 2 warm-up steps,
    then ``repeats`` samples of ``iters`` steps each) and the last carry.

    Each call consumes the previous call's carry, as a training loop does (the optimizer
    state advances, and a donated buffer is never read twice)."""
    box = [carry]

    def call():
        box[0] = step(box[0], batch)
        return box[0]

    t = sample_ms(call, samples=repeats, inner=iters, warmup=2)
    return t["ms"] / 1e3, box[0]


def _make_step(model, tx, loss_kind: str):
    def loss_fn(params, rest, x, y):
        variables = {"params": params, **rest}
        if rest:
            out, new_rest = model.apply(variables, x, mutable=list(rest))
        else:
            out, new_rest = model.apply(variables, x), rest
        out = out.astype(jnp.float32)
        if loss_kind == "xent":
            loss = optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
        else:
            loss = jnp.mean(jnp.square(out - y))
        return loss, new_rest

    @jax.jit
    def step(carry, batch):
        params, rest, opt_state, _ = carry
        x, y = batch
        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state, loss

    return step


def _init(model, tx, x):
    variables = model.init(jax.random.key(0), x)
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}
    return params, rest, tx.init(params), jnp.zeros((), jnp.float32)


# --------------------------------------------------------------------------- CPU


def run_cpu(args) -> dict:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((128, 64)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 128), jnp.int32)
    base = mlp((512, 512, 10))
    tx = optax.adam(1e-3)
    variants = [("float", None)] + [(n, jq.recipes.get(n)) for n in jq.recipes.names()]
    variants.append(
        (
            "w8a8_int8 + lsq",
            jq.recipes.get("w8a8_int8").replace(ste="lsq", act=jq.QuantSpec("int8")),
        )
    )
    variants.append(("w8a8_int8 (mode=emulate)", jq.recipes.get("w8a8_int8")))
    variants.append(("float + adam_8bit", None))
    # errors=True: per-layer SQNR of every product (a float GEMM beside each quantized
    # one) and operand saturation / underflow, carried out as gradients that
    # overwrite_with_gradient writes (README: "2-3x the CPU step").
    variants += [(f"{n} + errors", jq.recipes.get(n)) for n in ("w8a8_int8", "fp8_current")]
    if args.only:
        keep = {"float", *args.only}
        unknown = set(args.only) - {n for n, _ in variants}
        if unknown:
            raise SystemExit(f"--only: no variants {sorted(unknown)}; see the script's list")
        variants = [(n, r) for n, r in variants if n in keep]
    steps = {}
    for name, recipe in variants:
        opt = jq.optax.adam_8bit(1e-3) if "adam_8bit" in name else tx
        errors = name.endswith("+ errors")
        if errors:  # the errors ride in the params as gradients to write, not to step on
            opt = jq.optax.overwrite_with_gradient(opt)
        if name == "w4a16_int4":
            recipe = jq.recipes.get(name, group_size=64)
        # MX blocks of 32 need the output width to divide: the 10-class head stays float.
        keep = ("Dense_2",) if name == "mxfp8" else ()
        rules = () if recipe is None else recipe.rules(keep_float=keep)
        if "emulate" in name:  # the same numbers from a float32 dot of the int8 grid values
            rules = tuple(r.replace(mode="emulate") for r in rules)
        model = base if recipe is None else quantize_model(base, rules, errors=errors)
        step = _make_step(model, opt, "xent")
        steps[name] = (step, _time(step, _init(model, opt, x), (x, y), iters=1, repeats=1)[1])
    # Interleaved rounds: every variant once per round, ratios taken within a round, so
    # that load from other processes on a shared machine hits all variants alike.
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, (step, carry) in steps.items():
            t, carry = _time(step, carry, (x, y), iters=args.iters, repeats=1)
            steps[name] = (step, carry)
            times[name].append(t)
    rows = []
    for name, ts in times.items():
        ratios = [t / f for t, f in zip(ts, times["float"], strict=True)]
        row = {
            "variant": name,
            "ms_per_step": statistics.median(ts) * 1e3,
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }
        rows.append(row)
        print(f"{name:18s} {row['ms_per_step']:8.3f} ms  {row['ratio']:5.2f}x float", flush=True)
    return {
        "config": {"model": "MLP 64-512-512-10", "batch": 128, "optimizer": "adam"},
        "rows": rows,
    }


# --------------------------------------------------------------------------- GPU


def _q8(x, dtype, fmax):
    amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
    s = jnp.where(amax > 0, amax / fmax, 1.0)
    return jnp.clip(x.astype(jnp.float32) / s, -fmax, fmax).astype(dtype), s


def _dq(q, s, dtype):
    return q.astype(dtype) * s.astype(dtype)


@jax.custom_vjp
def _ref_fp8_matmul(x, w):
    return _ref_fwd(x, w)[0]


def _ref_fwd(x, w):
    qx, sx = _q8(x, jnp.float8_e4m3fn, 448.0)
    qw, sw = _q8(w, jnp.float8_e4m3fn, 448.0)
    y = jnp.dot(_dq(qx, sx, x.dtype), _dq(qw, sw, x.dtype), preferred_element_type=x.dtype)
    return y, (qx, sx, qw, sw)


def _ref_bwd(res, g):
    qx, sx, qw, sw = res
    qg, sg = _q8(g, jnp.float8_e5m2, 57344.0)
    dt = g.dtype
    dx = jnp.dot(_dq(qg, sg, dt), _dq(qw, sw, dt).T, preferred_element_type=dt)
    dw = jnp.dot(_dq(qx, sx, dt).T, _dq(qg, sg, dt), preferred_element_type=dt)
    return dx, dw


_ref_fp8_matmul.defvjp(_ref_fwd, _ref_bwd)


def _ref_dot_general(lhs, rhs, dn, precision=None, preferred_element_type=None):
    assert dn == (((lhs.ndim - 1,), (0,)), ((), ())), dn
    return _ref_fp8_matmul(lhs, rhs)


def run_gpu(args) -> dict:
    width, batch, n_layers = args.width, args.batch, 3
    bf = jnp.bfloat16
    kx, kt = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (batch, width), bf)
    teacher = jax.random.normal(kt, (width, width), jnp.float32) / np.sqrt(width)
    y = jnp.tanh(x.astype(jnp.float32) @ teacher).astype(bf)
    tx = optax.sgd(args.lr)
    base = mlp((width,) * n_layers, dtype=bf)
    fp8 = jq.recipes.get("fp8_current")
    variants = [
        ("bf16", base, None),
    ]
    if args.reference:
        ref = mlp((width,) * n_layers, bf, _ref_dot_general)
        variants.append(("hand-written fp8, dequantize-then-dot (flax-style)", ref, None))
    for lowering in args.lowerings:
        for native in args.native:
            label = f"jaxquant fp8_current [{lowering}{', native cast' if native else ''}]"
            variants.append((label, quantize_model(base, fp8.rules()), (lowering, native)))
    rows = []
    base_t = None
    losses = {}
    defaults = _dot._FP8_LOWERING, _dot._NATIVE_FP8_CAST
    for name, model, knobs in variants:
        if knobs is not None:
            _dot._FP8_LOWERING, _dot._NATIVE_FP8_CAST = knobs
        step = _make_step(model, tx, "mse")
        carry = _init(model, tx, x)
        t0 = time.perf_counter()
        compiled = step.lower(carry, (x, y)).compile()
        compile_s = time.perf_counter() - t0
        hlo = compiled.as_text()
        n_f8 = hlo.count("__cublas$lt$matmul$f8")
        t, _ = _time(step, carry, (x, y), iters=args.iters, repeats=args.repeats)
        base_t = t if base_t is None else base_t
        row = {
            "variant": name,
            "ms_per_step": t * 1e3,
            "speedup_vs_bf16": base_t / t,
            "cublaslt_fp8_gemms": n_f8,
            "compile_s": compile_s,
        }
        if name == "bf16" or (knobs is not None and knobs == tuple(args.loss_check)):
            c = carry
            for _ in range(args.loss_steps):
                c = step(c, (x, y))
            losses[name] = float(c[3])
            row[f"loss_after_{args.loss_steps}"] = losses[name]
        rows.append(row)
        print(json.dumps(row), flush=True)
    _dot._FP8_LOWERING, _dot._NATIVE_FP8_CAST = defaults
    return {
        "config": {
            "model": f"{n_layers} x Dense {width}",
            "batch": batch,
            "dtype": "bfloat16",
            "optimizer": f"sgd({args.lr})",
            "loss": "mse to a tanh teacher",
        },
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="the GPU benchmark (width 8192)")
    p.add_argument("--width", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loss-steps", type=int, default=100)
    p.add_argument("--lowerings", nargs="+", default=["f32_out", "half_out"])
    p.add_argument("--native", nargs="+", type=int, default=[0, 1])
    p.add_argument("--loss-check", nargs=2, default=["half_out", "1"])
    p.add_argument("--reference", type=int, default=1, help="time the hand-written step")
    p.add_argument("--out", type=Path)
    p.add_argument(
        "--only", nargs="+", help="CPU: time only these variants (and the float baseline)"
    )
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny sizes, few steps: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.iters, args.repeats, args.loss_steps = 2, 2, 3
        args.width, args.batch = 256, 512
    args.native = [bool(n) for n in args.native]
    args.loss_check = [args.loss_check[0], bool(int(args.loss_check[1]))]
    result = run_gpu(args) if args.gpu else run_cpu(args)
    result.update(common.environment())
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    if args.markdown:
        keys = list(dict.fromkeys(k for r in result["rows"] for k in r if k != "variant"))
        print("| variant | " + " | ".join(keys) + " |")
        print("|---" * (len(keys) + 1) + "|")
        for r in result["rows"]:
            vals = [
                f"{r[k]:.3f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys
            ]
            print(f"| {r['variant']} | " + " | ".join(vals) + " |")


if __name__ == "__main__":
    main()
