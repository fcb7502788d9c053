"""Timing: seconds per call of a jitted function, samples, and ratios against a baseline
timed in the same round (the machines are shared; only paired ratios are trustworthy)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax

__all__ = ["paired_ratios", "sample_ms", "seconds_per_call"]


def seconds_per_call(f: Callable[[], Any], reps: int) -> float:
    """Seconds per call of ``reps`` calls dispatched back to back, blocked on the last
    result: one device stream runs them in order, so the last done means all done.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxquant.app.timing import seconds_per_call
      >>> f = jax.jit(lambda: jnp.ones(8).sum())
      >>> seconds_per_call(f, reps=3) > 0
      True
    """
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
    every sample.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxquant.app.timing import sample_ms
      >>> r = sample_ms(jax.jit(lambda: jnp.ones(8).sum()), samples=3)
      >>> sorted(r), len(r["ms_all"])
      (['ms', 'ms_all', 'ms_min'], 3)
    """
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
    milliseconds per call of the variant; ``"baseline"``: the baseline's median ms.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxquant.app.timing import paired_ratios
      >>> base = jax.jit(lambda: jnp.ones(64).sum())
      >>> r = paired_ratios(base, {"same": base}, rounds=2, reps=2)
      >>> sorted(r["same"]), r["same"]["ratio"] > 0
      (['max', 'min', 'ms', 'ratio'], True)
    """
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
    out: dict[str, dict[str, Any]] = {
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
