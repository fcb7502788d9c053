"""Streaming activation statistics: one static range per tensor from many batches.

A calibration method (:mod:`jaxquant._src.calibration`) picks a range from one array. A
calibration *pass* sees a model's activations one batch at a time, and the range must
describe all of them. :func:`moments` summarizes a batch in a few scalars that merge
exactly (:func:`merge`: count, min, max, mean and sum of squared deviations by Chan et
al.'s pairwise update, mean |x|); methods that need the distribution (percentile, MSE,
KL) take a second pass that fills fixed-range histograms (:func:`histograms`) over the
range the first pass found. :func:`finalize` then gives each method's range:

* ``absmax`` / ``minmax``, ``mean_std``, ``mean_abs``: exact, from the merged moments;
* ``percentile``: the histogram's CDF, linearly interpolated inside the bin (error at
  most one bin width, ``amax / bins``);
* ``mse``: the method's candidate clip ratios, each scored by the quantization error of
  the bin centres weighted by their counts;
* ``kl``: :func:`jaxquant._src.calibration.kl_threshold` on the ``|x|`` histogram;
* ``fixed``: its own range.

Per-batch aggregation (``"ema"``, ``"mean"``) instead runs the method on each batch and
averages the ranges (:func:`batch_range`): TensorFlow's moving-average min / max.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxquant._src import calibration as cal
from jaxquant._src.quantize import qdq_range
from jaxquant._src.spec import QuantSpec

Array = jax.Array


class Moments(NamedTuple):
    """Mergeable per-tensor statistics of the finite values seen so far."""

    # float32 (): finite values (float: no int32 overflow past 2^31). The name shadows
    # tuple.count (mypy: an incompatible override); kept, the field is the statistic's name.
    count: Array  # type: ignore[assignment]
    nonfinite: Array  # float32 (): NaN / Inf values
    lo: Array  # float32 (): min (+inf while empty)
    hi: Array  # float32 (): max (-inf while empty)
    mean: Array  # float32 ()
    m2: Array  # float32 (): sum of squared deviations from the mean
    mean_abs: Array  # float32 ()


def moments(x: Array) -> Moments:
    """Statistics of one batch (all elements of ``x``)."""
    x = x.astype(jnp.float32).reshape(-1)
    fin = jnp.isfinite(x)
    n = jnp.sum(fin).astype(jnp.float32)
    xz = jnp.where(fin, x, 0.0)
    mean = jnp.sum(xz) / jnp.maximum(n, 1.0)
    m2 = jnp.sum(jnp.where(fin, jnp.square(x - mean), 0.0))
    return Moments(
        count=n,
        nonfinite=jnp.float32(x.size) - n,
        lo=jnp.min(jnp.where(fin, x, jnp.inf), initial=jnp.inf),
        hi=jnp.max(jnp.where(fin, x, -jnp.inf), initial=-jnp.inf),
        mean=mean,
        m2=m2,
        mean_abs=jnp.sum(jnp.abs(xz)) / jnp.maximum(n, 1.0),
    )


def merge(a: Moments, b: Moments) -> Moments:
    """The statistics of the union of two disjoint sets of values (exact up to rounding)."""
    n = a.count + b.count
    safe = jnp.maximum(n, 1.0)
    wa, wb = a.count / safe, b.count / safe
    delta = b.mean - a.mean
    return Moments(
        count=n,
        nonfinite=a.nonfinite + b.nonfinite,
        lo=jnp.minimum(a.lo, b.lo),
        hi=jnp.maximum(a.hi, b.hi),
        mean=a.mean * wa + b.mean * wb,
        m2=a.m2 + b.m2 + jnp.square(delta) * a.count * wb,
        mean_abs=a.mean_abs * wa + b.mean_abs * wb,
    )


class Hist(NamedTuple):
    """Fixed-range histograms of one tensor's finite values."""

    abs_counts: Array  # float32 [bins] over [0, amax)
    counts: Array  # float32 [bins] over [lo, hi)
    amax: Array  # float32 ()
    lo: Array  # float32 ()
    hi: Array  # float32 ()


def _empty_range(m: Moments) -> tuple[Array, Array]:
    empty = m.count == 0
    return jnp.where(empty, 0.0, m.lo), jnp.where(empty, 0.0, m.hi)


def hist_range(m: Moments) -> tuple[Array, Array, Array]:
    """(amax, lo, hi) that the second pass's histograms cover."""
    lo, hi = _empty_range(m)
    return jnp.maximum(-lo, hi), lo, hi


def histograms(x: Array, amax: Array, lo: Array, hi: Array, bins: int) -> Hist:
    """Counts of ``|x|`` over ``[0, amax]`` and of ``x`` over ``[lo, hi]`` in ``bins`` bins
    (values beyond the range land in the end bins)."""
    x = x.astype(jnp.float32).reshape(-1)
    fin = jnp.isfinite(x)
    w = fin.astype(jnp.float32)

    def count(v: Array, start: jax.typing.ArrayLike, width: Array) -> Array:
        idx = jnp.clip(jnp.floor((v - start) / width), 0, bins - 1).astype(jnp.int32)
        idx = jnp.where(fin, idx, 0)
        return jnp.zeros((bins,), jnp.float32).at[idx].add(w)

    aw = jnp.where(amax > 0, amax / bins, 1.0)
    sw = jnp.where(hi > lo, (hi - lo) / bins, 1.0)
    return Hist(count(jnp.abs(x), 0.0, aw), count(x, lo, sw), amax, lo, hi)


def add_hist(a: Hist, b: Hist) -> Hist:
    return a._replace(abs_counts=a.abs_counts + b.abs_counts, counts=a.counts + b.counts)


def needs_histogram(spec: QuantSpec) -> bool:
    return isinstance(spec.calibration, cal.Percentile | cal.MSE | cal.KL)


def check_activation_spec(spec: QuantSpec, where: str) -> None:
    """Static activation ranges are per tensor, from an activation calibration method."""
    from jaxquant._src.granularity import PerTensor

    if not isinstance(spec.granularity, PerTensor):
        raise ValueError(
            f"calibrate: the activation spec of {where!r} is {spec}; a static activation "
            "scale is one number per tensor: use jq.per_tensor() for the act spec (dynamic "
            "per-token or per-block scales need no calibration pass)."
        )
    if isinstance(spec.calibration, cal.TWN):
        raise ValueError(
            f"calibrate: {where!r} calibrates its activation with {spec.calibration}, a "
            "method for ternary weights; use absmax, percentile, mean_std, mse or kl."
        )
    if isinstance(spec.calibration, cal.KL) and not spec.symmetric:
        raise ValueError(f"calibrate: kl calibration at {where!r} needs a symmetric act spec.")


def _quantile(counts: Array, start: Array, width: Array, q: Array) -> Array:
    """Value below which a fraction ``q`` of the histogram's mass lies (linear within
    the bin)."""
    total = jnp.sum(counts)
    target = q * total
    cum = jnp.cumsum(counts)
    i = jnp.clip(jnp.searchsorted(cum, target, side="left"), 0, counts.shape[0] - 1)
    before = jnp.where(i > 0, cum[jnp.maximum(i - 1, 0)], 0.0)
    frac = jnp.clip((target - before) / jnp.maximum(counts[i], 1e-30), 0.0, 1.0)
    return start + (i.astype(jnp.float32) + frac) * width


def finalize(spec: QuantSpec, m: Moments, h: Hist | None) -> tuple[Array, Array]:
    """``(lo, hi)`` (float32 scalars) of ``spec``'s calibration method over everything
    ``m`` (and ``h``, for histogram methods) summarize."""
    c = spec.calibration
    sym = spec.symmetric
    lo, hi = _empty_range(m)
    amax = jnp.maximum(-lo, hi)

    def out(lo: Array, hi: Array) -> tuple[Array, Array]:
        if sym:
            a = jnp.maximum(-lo, hi)
            return -a, a
        return lo, hi

    if isinstance(c, cal.Fixed):
        lo_f, hi_f = c(jnp.zeros((1,), jnp.float32), (0,), sym, None)  # type: ignore[arg-type]
        return lo_f.reshape(()), hi_f.reshape(())
    if isinstance(c, cal.MeanStd):
        std = jnp.sqrt(m.m2 / jnp.maximum(m.count, 1.0))
        if sym:
            a = jnp.minimum(amax, jnp.abs(m.mean) + c.k * std)
            return -a, a
        return jnp.maximum(lo, m.mean - c.k * std), jnp.minimum(hi, m.mean + c.k * std)
    if isinstance(c, cal.MeanAbs):
        a = c.k * m.mean_abs
        return -a, a
    if isinstance(c, cal.AbsMax):  # and MinMax
        return out(lo, hi)
    assert h is not None, "histogram methods need the second pass"
    nb = h.abs_counts.shape[0]
    aw = jnp.where(h.amax > 0, h.amax / nb, 1.0)
    sw = jnp.where(h.hi > h.lo, (h.hi - h.lo) / nb, 1.0)
    qdq = qdq_range(spec)
    if isinstance(c, cal.Percentile):
        q = jnp.float32(c.p / 100.0)
        if sym:
            a = jnp.minimum(_quantile(h.abs_counts, jnp.float32(0.0), aw, q), h.amax)
            return -a, a
        lo_p = _quantile(h.counts, h.lo, sw, 1.0 - q)
        hi_p = _quantile(h.counts, h.lo, sw, q)
        return jnp.maximum(lo_p, h.lo), jnp.minimum(hi_p, h.hi)
    if isinstance(c, cal.MSE):
        ratios = jnp.linspace(c.min_ratio, 1.0, c.num, dtype=jnp.float32)
        if sym:
            centers = (jnp.arange(nb, dtype=jnp.float32) + 0.5) * aw
            counts, lo0, hi0 = h.abs_counts, -h.amax, h.amax
        else:
            centers = h.lo + (jnp.arange(nb, dtype=jnp.float32) + 0.5) * sw
            counts, lo0, hi0 = h.counts, h.lo, h.hi

        def err(r: Array) -> Array:
            return jnp.sum(counts * jnp.square(qdq(centers, lo0 * r, hi0 * r) - centers))

        errs = jax.lax.map(err, ratios)
        r = ratios[jnp.argmin(errs)]  # first minimum: the smallest ratio among ties
        return lo0 * r, hi0 * r
    assert isinstance(c, cal.KL)
    lo_k, hi_k = cal.kl_threshold(
        h.abs_counts.reshape(1, nb), aw.reshape(1), h.amax.reshape(1), qdq, c.num
    )
    return lo_k.reshape(()), hi_k.reshape(())


def batch_range(x: Array, spec: QuantSpec) -> tuple[Array, Array]:
    """``spec``'s method run on one batch (per-batch aggregation): float32 scalars."""
    xv = x.astype(jnp.float32).reshape(1, -1)
    lo, hi = spec.calibration(xv, (0, 1), spec.symmetric, qdq_range(spec))  # type: ignore[misc]
    return lo.reshape(()), hi.reshape(())
