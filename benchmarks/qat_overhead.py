"""Where a w8a8 QAT step spends its time, one Dense layer at a time.

For each layer of the digits MLP (64x512, 512x512, 512x10; batch 128) one jitted training
step of that layer alone -- forward, backward, and an Adam update of the weight, so the
weight gradient's memory layout matters as it does in a real step -- under:

* ``float``: ``lax.dot_general`` on float32 operands (the baseline);
* ``jq``: ``jq.dot_general`` with ``lhs_spec=int8`` (per tensor) and
  ``rhs_spec=int8 per_channel(-1)``, ``mode="auto"`` (an s8 x s8 -> s32 dot on CPU);
* ``jq_emulate``: the same in ``mode="emulate"`` (a float32 dot of the grid values);
* ``minimal_fq``: a minimal fake-quant on both operands (absmax, round, clip, STE) and a
  float32 dot: the backward multiplies the *quantized* operands, like jaxquant's;
* ``ste_float_bwd``: an int8 forward dot whose backward multiplies the *float* operands
  (straight through the whole dot), which is what Qwix's and AQT's QAT steps compute when
  the gradient dots are not quantized (``benchmarks/peers.py``). It does fewer passes
  than jaxquant's recipe by construction: no dequantized weight for ``dlhs`` and no grid
  values of the activation for ``drhs``.

Every round times each variant right after the float baseline (``--reps`` calls per
timing); the reported ``ratio`` is the median over rounds of variant / float, with its
quartiles; ``ms`` is the median time per call. The compiled program's fusion, convert,
conditional and copy/transpose counts come with each variant. Numbers on a shared machine
are noisy: compare ratios taken in the same run.

    python3 benchmarks/qat_overhead.py --out benchmarks/results/qat_overhead_cpu.json
    python3 benchmarks/qat_overhead.py --quick
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for common
import common  # puts the repository root on sys.path too

import jaxquant as jq

BATCH = 128
LAYERS = ((64, 512), (512, 512), (512, 10))
DN = (((1,), (0,)), ((), ()))
Dot = Callable[[jax.Array, jax.Array], jax.Array]


# ------------------------------------------------------------------------- variants


def _jq(mode: str) -> Dot:
    lhs = jq.QuantSpec("int8")
    rhs = jq.QuantSpec("int8", jq.per_channel(-1))
    return lambda x, w: jq.dot_general(x, w, DN, lhs_spec=lhs, rhs_spec=rhs, mode=mode)


@jax.custom_vjp
def _ste(x: jax.Array, y: jax.Array) -> jax.Array:
    del x
    return y


_ste.defvjp(lambda x, y: (y, None), lambda _, g: (g, jnp.zeros_like(g)))


def _absmax_int8(x: jax.Array, axes: tuple[int, ...] | None) -> tuple[jax.Array, jax.Array]:
    """(int8 grid values as float32, scale): the minimal symmetric absmax quantizer."""
    amax = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
    s = jnp.where(amax > 0, amax / 127.0, 1.0)
    return jnp.clip(jnp.round(x / s), -127.0, 127.0), s


def _minimal_fq(x: jax.Array, w: jax.Array) -> jax.Array:
    def fq(a, axes):
        q, s = _absmax_int8(jax.lax.stop_gradient(a), axes)
        return _ste(a, q * s)

    return jnp.dot(fq(x, None), fq(w, (0,)))


@jax.custom_vjp
def _ste_float_bwd(x: jax.Array, w: jax.Array) -> jax.Array:
    qx, sx = _absmax_int8(x, None)
    qw, sw = _absmax_int8(w, (0,))
    acc = jax.lax.dot_general(
        qx.astype(jnp.int8), qw.astype(jnp.int8), DN, preferred_element_type=jnp.int32
    )
    return acc.astype(jnp.float32) * (sx * sw)


_ste_float_bwd.defvjp(
    lambda x, w: (_ste_float_bwd(x, w), (x, w)),
    lambda res, g: (g @ res[1].T, res[0].T @ g),
)

VARIANTS: dict[str, Dot] = {
    "jq": _jq("auto"),
    "jq_emulate": _jq("emulate"),
    "minimal_fq": _minimal_fq,
    "ste_float_bwd": _ste_float_bwd,
}


def make_step(dot: Dot, tx: optax.GradientTransformation):
    """One layer's training step: a loss of ``dot(x, w)`` (returned, so the forward dot is
    part of the program), its gradients, an Adam update of ``w``."""

    def loss(w, x, c):
        return 0.5 * jnp.sum(jnp.square(dot(x, w) - c))

    def step(w, opt, x, c):
        value, (gw, gx) = jax.value_and_grad(loss, argnums=(0, 1))(w, x, c)
        updates, opt = tx.update(gw, opt, w)
        return optax.apply_updates(w, updates), opt, gx, value

    return jax.jit(step)


# --------------------------------------------------------------------------- timing


def _hlo_counts(compiled: Any) -> dict[str, int]:
    text = compiled.as_text()
    entry = text[text.index("ENTRY") :]
    return {
        "fusions": len(re.findall(r"= \S+ fusion\(", text)),
        "converts": len(re.findall(r" convert\(", text)),
        "conditionals": len(re.findall(r" conditional\(", entry)),
        "copies_transposes": len(re.findall(r" (?:copy|transpose)\(", entry)),
    }


_time = common.seconds_per_call


def _quartiles(v: list[float]) -> tuple[float, float]:
    s = sorted(v)
    return s[len(s) // 4], s[(3 * len(s)) // 4]


def bench_layer(k: int, n: int, rounds: int, reps: int, seed: int = 0) -> dict[str, Any]:
    kx, kw, kc = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (BATCH, k), jnp.float32)
    w = jax.random.normal(kw, (k, n), jnp.float32) * k**-0.5
    c = jax.random.normal(kc, (BATCH, n), jnp.float32)
    tx = optax.adam(1e-3)
    opt = tx.init(w)
    calls: dict[str, Callable[[], Any]] = {}
    counts: dict[str, dict[str, int]] = {}
    for name, dot in {"float": lambda x, w: jax.lax.dot_general(x, w, DN), **VARIANTS}.items():
        compiled = make_step(dot, tx).lower(w, opt, x, c).compile()
        counts[name] = _hlo_counts(compiled)
        calls[name] = lambda compiled=compiled: compiled(w, opt, x, c)
        jax.block_until_ready(calls[name]())  # warm-up
    # jaxquant.app.timing.paired_ratios' loop, written out because the table reports the
    # quartiles of the per-round ratios, which paired_ratios does not return.
    ratios: dict[str, list[float]] = {name: [] for name in VARIANTS}
    ms: dict[str, list[float]] = {name: [] for name in calls}
    names = list(VARIANTS)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            tb = _time(calls["float"], reps)
            tv = _time(calls[name], reps)
            ratios[name].append(tv / tb)
            ms["float"].append(tb * 1e3)
            ms[name].append(tv * 1e3)
    out: dict[str, Any] = {"float": {"ms": statistics.median(ms["float"]), **counts["float"]}}
    for name, v in ratios.items():
        lo, hi = _quartiles(v)
        out[name] = {
            "ratio": statistics.median(v),
            "ratio_p25": lo,
            "ratio_p75": hi,
            "ms": statistics.median(ms[name]),
            **counts[name],
        }
    return out


# ----------------------------------------------------------------------------- main


def markdown(doc: dict[str, Any]) -> str:
    names = ["float", *VARIANTS]
    env = doc["env"]
    git = env.get("jaxquant_git", env.get("git"))  # older files: "git"
    lines = [
        f"{env['backend']}, jax {env['jax']}, jaxquant {git}, "
        f"{doc['config']['rounds']} rounds x {doc['config']['reps']} calls, batch {BATCH}",
        "",
        "| layer | " + " | ".join(names) + " |",
        "|---|" + "--:|" * len(names),
    ]
    for layer, res in doc["layers"].items():
        cells = [f"{res['float']['ms']:.3f} ms ({res['float']['fusions']}f)"]
        for name in VARIANTS:
            v = res[name]
            cells.append(
                f"{v['ratio']:.2f}x [{v['ratio_p25']:.2f}-{v['ratio_p75']:.2f}] ({v['fusions']}f)"
            )
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--rounds", type=int, default=31)
    p.add_argument("--reps", type=int, default=20, help="calls per timing")
    p.add_argument("--quick", action="store_true", help="3 rounds of 3 calls (a smoke run)")
    p.add_argument("--markdown", default=None, help="print the table of a saved JSON")
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(json.load(open(args.markdown))))
        return {}
    if args.quick:
        args.rounds, args.reps = 3, 3
    doc: dict[str, Any] = {
        "config": {"rounds": args.rounds, "reps": args.reps, "batch": BATCH},
        "env": common.environment(),
        "layers": {f"{k}x{n}": bench_layer(k, n, args.rounds, args.reps) for k, n in LAYERS},
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
    print(markdown(doc))
    return doc


if __name__ == "__main__":
    main()
