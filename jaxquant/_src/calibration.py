"""Calibration: choosing the range [lo, hi] that a quantizer maps onto its grid.

Each method reduces a (blocked) float32 view over ``axes`` with ``keepdims=True`` and
returns ``(lo, hi)``; symmetric quantizers use ``amax = max(-lo, hi)``. Non-finite values
are ignored, so one NaN or Inf cannot poison a whole tensor's scale (they are handled
element-wise by the rounding policy instead). An all-zero group gives ``lo = hi = 0``,
which the scale rule maps to a unit scale.

Methods that search (``mse``, ``kl``) need to quantize candidates: they receive ``qdq``, a
function ``(x, lo, hi) -> x_hat`` built by the quantizer for its own format and rounding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxquant._src.checks import check_int, check_real, describe

Array = jax.Array
QDQ = Callable[[Array, Array, Array], Array]


def _finite(x: Array) -> Array:
    return jnp.isfinite(x)


def _masked_max(x: Array, axes: tuple[int, ...]) -> Array:
    return jnp.max(jnp.where(_finite(x), x, -jnp.inf), axis=axes, keepdims=True, initial=-jnp.inf)


def _min_max(x: Array, axes: tuple[int, ...]) -> tuple[Array, Array]:
    hi = _masked_max(x, axes)
    lo = -_masked_max(-x, axes)
    empty = jnp.isinf(hi)  # no finite value in the group
    return jnp.where(empty, 0.0, lo), jnp.where(empty, 0.0, hi)


def _absmax(x: Array, axes: tuple[int, ...]) -> Array:
    """max |x| over the finite elements of each group (0 for an empty group).

    One masked reduction on every backend. (On CPU an unmasked reduction redone masked
    under a ``lax.cond`` when it met a non-finite value ran the quantizer ~20% faster, but
    its conditionals made a quantized training step's XLA compile ~12% slower: issue 12,
    item 10.)
    """
    return jnp.max(jnp.where(_finite(x), jnp.abs(x), 0.0), axis=axes, keepdims=True, initial=0.0)


def _mean_abs(x: Array, axes: tuple[int, ...]) -> Array:
    """mean |x| over the finite elements of each group (0 for an empty group)."""
    fin = _finite(x)
    n = jnp.maximum(jnp.sum(fin, axis=axes, keepdims=True), 1).astype(jnp.float32)
    return jnp.sum(jnp.where(fin, jnp.abs(x), 0.0), axis=axes, keepdims=True) / n


def _sym(lo: Array, hi: Array, symmetric: bool) -> tuple[Array, Array]:
    if symmetric:
        amax = jnp.maximum(-lo, hi)
        return -amax, amax
    return lo, hi


@dataclasses.dataclass(frozen=True)
class AbsMax:
    """``amax = max |x|`` ("max quantization"); asymmetric: ``[min x, max x]``."""

    def __call__(
        self, x: Array, axes: tuple[int, ...], symmetric: bool, qdq: QDQ
    ) -> tuple[Array, Array]:
        if symmetric:
            amax = _absmax(x, axes)
            return -amax, amax
        return _min_max(x, axes)

    def __str__(self) -> str:
        return "absmax"


@dataclasses.dataclass(frozen=True)
class MinMax(AbsMax):
    """Same as :class:`AbsMax`; the name users expect for asymmetric quantization."""

    def __str__(self) -> str:
        return "minmax"


@dataclasses.dataclass(frozen=True)
class MeanStd:
    """Clip to ``mean +- k * std`` (within the data's own range): robust to outliers.

    Symmetric: ``amax = min(max|x|, |mean| + k * std)``.
    """

    k: float = 3.0

    def __post_init__(self) -> None:
        k = check_real(self.k, "mean_std(k)", gt=0, hint="Typical values are 2..4.")
        object.__setattr__(self, "k", k)

    def __call__(
        self, x: Array, axes: tuple[int, ...], symmetric: bool, qdq: QDQ
    ) -> tuple[Array, Array]:
        fin = _finite(x)
        n = jnp.maximum(jnp.sum(fin, axis=axes, keepdims=True), 1).astype(jnp.float32)
        xz = jnp.where(fin, x, 0.0)
        mean = jnp.sum(xz, axis=axes, keepdims=True) / n
        var = jnp.sum(jnp.where(fin, (x - mean) ** 2, 0.0), axis=axes, keepdims=True) / n
        std = jnp.sqrt(var)
        if symmetric:
            amax = jnp.minimum(_absmax(x, axes), jnp.abs(mean) + self.k * std)
            return -amax, amax
        lo, hi = _min_max(x, axes)
        return jnp.maximum(lo, mean - self.k * std), jnp.minimum(hi, mean + self.k * std)

    def __str__(self) -> str:
        return f"mean_std({self.k:g})"


@dataclasses.dataclass(frozen=True)
class Percentile:
    """Clip at the ``p``-th percentile of ``|x|`` (asymmetric: the ``100-p`` and ``p`` ones)."""

    p: float = 99.9

    def __post_init__(self) -> None:
        p = check_real(
            self.p, "percentile(p)", gt=0, le=100, hint="p is in percent, e.g. 99.9 (not 0.999)."
        )
        object.__setattr__(self, "p", p)

    def __call__(
        self, x: Array, axes: tuple[int, ...], symmetric: bool, qdq: QDQ
    ) -> tuple[Array, Array]:
        xn = jnp.where(_finite(x), x, jnp.nan)
        q = self.p / 100.0
        if symmetric:
            amax = jnp.nanquantile(jnp.abs(xn), q, axis=axes, keepdims=True)
            amax = jnp.nan_to_num(amax)
            return -amax, amax
        lo = jnp.nan_to_num(jnp.nanquantile(xn, 1.0 - q, axis=axes, keepdims=True))
        hi = jnp.nan_to_num(jnp.nanquantile(xn, q, axis=axes, keepdims=True))
        return lo, hi

    def __str__(self) -> str:
        return f"percentile({self.p:g})"


@dataclasses.dataclass(frozen=True)
class MSE:
    """Search clip ratios ``r`` in ``[min_ratio, 1]`` of the abs-max range for the lowest
    quantization MSE, per scale group (``num`` candidates, evaluated one at a time with
    ``lax.scan`` so memory stays at one copy of the input).
    """

    num: int = 32
    min_ratio: float = 0.2

    def __post_init__(self) -> None:
        # Ratios are a float32 linspace: beyond 2^24 candidates they repeat.
        num = check_int(self.num, "mse(num)", hi=2**24)
        if num < 2:
            raise ValueError(
                f"mse(num): need num >= 2 candidates (the last is the full range), got {num}."
            )
        ratio = check_real(
            self.min_ratio,
            "mse(min_ratio)",
            gt=0,
            le=1,
            hint="It is the smallest clip ratio tried, a fraction of the abs-max range.",
        )
        object.__setattr__(self, "num", num)
        object.__setattr__(self, "min_ratio", ratio)

    def __call__(
        self, x: Array, axes: tuple[int, ...], symmetric: bool, qdq: QDQ
    ) -> tuple[Array, Array]:
        lo0, hi0 = AbsMax()(x, axes, symmetric, qdq)
        fin = _finite(x)
        xz = jnp.where(fin, x, 0.0)
        ratios = jnp.linspace(self.min_ratio, 1.0, self.num, dtype=jnp.float32)

        def step(best: tuple[Array, Array], r: Array) -> tuple[tuple[Array, Array], None]:
            best_err, best_r = best
            err = jnp.sum(jnp.square(qdq(xz, lo0 * r, hi0 * r) - xz), axis=axes, keepdims=True)
            better = err < best_err
            return (jnp.where(better, err, best_err), jnp.where(better, r, best_r)), None

        init = (jnp.full(lo0.shape, jnp.inf, jnp.float32), jnp.ones(lo0.shape, jnp.float32))
        (_, r), _ = jax.lax.scan(step, init, ratios)
        return lo0 * r, hi0 * r

    def __str__(self) -> str:
        return f"mse({self.num})"


def _histogram(idx: Array, valid: Array, axes: tuple[int, ...], nb: int) -> Array:
    """Counts of ``idx`` in [0, nb) per group (``axes`` reduced, kept as 1) on a new last axis."""
    keep = [i for i in range(idx.ndim) if i not in axes]
    perm = keep + list(axes)
    moved = jnp.transpose(idx, perm)
    vmoved = jnp.transpose(valid, perm)
    gshape = moved.shape[: len(keep)]
    groups = 1
    for d in gshape:
        groups *= d
    flat = moved.reshape(groups, -1)
    ids = (flat + nb * jnp.arange(groups)[:, None]).reshape(-1)
    w = vmoved.reshape(-1).astype(jnp.float32)
    hist = jax.ops.segment_sum(w, ids, groups * nb).reshape(*gshape, nb)
    out_shape = (*(1 if i in axes else d for i, d in enumerate(idx.shape)), nb)
    return hist.reshape(out_shape)


@dataclasses.dataclass(frozen=True)
class KL:
    """Entropy calibration (TensorRT, Migacz 2017): the clip threshold whose quantized
    histogram of ``|x|`` has the smallest KL divergence from the clipped original.

    A ``bins``-bin histogram of ``|x|`` per scale group; ``num`` candidate thresholds between
    ``bins/8`` and ``bins`` bins. For each, the bins are quantized with the real quantizer
    (``qdq``) and merged by the level they land on; each level's mass is spread evenly over
    its non-empty bins. Symmetric only (it calibrates ``|x|``).
    """

    bins: int = 512
    num: int = 64

    def __post_init__(self) -> None:
        # Candidates start at bins // 8 bins: fewer than 8 bins would try a zero threshold.
        # Bin indices and candidates are computed in float32, exact up to 2^24.
        bins = check_int(self.bins, "kl(bins)", lo=8, hi=2**24)
        num = check_int(self.num, "kl(num)", lo=2, hi=2**24)
        object.__setattr__(self, "bins", bins)
        object.__setattr__(self, "num", num)

    def __call__(
        self, x: Array, axes: tuple[int, ...], symmetric: bool, qdq: QDQ
    ) -> tuple[Array, Array]:
        if not symmetric:
            raise ValueError("kl calibration is symmetric only; use symmetric=True or minmax().")
        amax = _absmax(x, axes)
        a = jnp.where(_finite(x), jnp.abs(x), 0.0)
        nb = self.bins
        width = jnp.where(amax > 0, amax / nb, 1.0)
        idx = jnp.clip(jnp.floor(a / width), 0, nb - 1).astype(jnp.int32)
        hist = _histogram(idx, _finite(x), axes, nb)  # [...keepdims..., nb]
        return kl_threshold(hist, width, amax, qdq, self.num)

    def __str__(self) -> str:
        return f"kl({self.bins})"


def kl_threshold(hist: Array, width: Array, amax: Array, qdq: QDQ, num: int) -> tuple[Array, Array]:
    """:class:`KL`'s search on a histogram of ``|x|``: ``hist`` ``[..., nb]`` counts of
    bins of ``width`` (shape ``[...]``) from 0; returns ``(-thr, thr)`` shaped like
    ``amax``. Shared with the streaming calibration pass (jaxquant.flax.calibrate)."""
    nb = hist.shape[-1]
    lead = (1,) * amax.ndim
    bin_ids = jnp.arange(nb).reshape(*lead, nb)
    w = width[..., None]
    centers = (bin_ids.astype(jnp.float32) + 0.5) * w
    ks = jnp.linspace(nb // 8, nb, num).astype(jnp.int32)

    def divergence(k: Array) -> Array:
        thr = k.astype(jnp.float32) * w
        inside = bin_ids < k
        tail = jnp.sum(jnp.where(inside, 0.0, hist), axis=-1, keepdims=True)
        clipped = jnp.where(inside, hist, 0.0)  # Q is built from this, without the tail,
        p = clipped + jnp.where(bin_ids == k - 1, tail, 0.0)  # so clipping costs KL
        levels = qdq(centers, -thr, thr)  # the value each bin centre quantizes to
        levels = jnp.broadcast_to(levels, p.shape)
        # qdq is monotone, so bins sharing a level form contiguous runs: give each run
        # an id, then sum mass and count non-empty bins per run with segment sums.
        change = jnp.concatenate(
            [jnp.ones_like(levels[..., :1], bool), levels[..., 1:] != levels[..., :-1]], -1
        )
        run = jnp.cumsum(change, axis=-1) - 1
        groups = p.size // nb
        offsets = nb * jnp.arange(groups).reshape(*p.shape[:-1], 1)
        ids = (run + offsets).reshape(-1)
        nz = (clipped > 0).astype(jnp.float32)
        seg = groups * nb
        mass = jax.ops.segment_sum(clipped.reshape(-1), ids, seg)[ids].reshape(p.shape)
        count = jax.ops.segment_sum(nz.reshape(-1), ids, seg)[ids].reshape(p.shape)
        q = jnp.where(clipped > 0, mass / jnp.maximum(count, 1.0), 0.0)
        ps = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
        qs = q / jnp.maximum(jnp.sum(q, axis=-1, keepdims=True), 1e-30)
        terms = jnp.where(ps > 0, ps * (jnp.log(ps) - jnp.log(jnp.maximum(qs, 1e-30))), 0.0)
        return jnp.sum(terms, axis=-1, keepdims=True)

    divs = jax.lax.map(divergence, ks)  # [num, ..., 1]
    best = jnp.argmin(divs, axis=0)
    thr = jnp.reshape(ks[best], amax.shape).astype(jnp.float32) * width
    thr = jnp.minimum(thr, amax)
    return -thr, thr


@dataclasses.dataclass(frozen=True)
class Fixed:
    """A fixed range from calibration or a config: ``amax`` (symmetric) or ``(lo, hi)``."""

    amax: float | tuple[float, float]

    def __post_init__(self) -> None:
        object.__setattr__(self, "amax", _fixed_range(self.amax))

    def __call__(
        self, x: Array, axes: tuple[int, ...], symmetric: bool, qdq: QDQ
    ) -> tuple[Array, Array]:
        shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
        if isinstance(self.amax, tuple):
            lo, hi = self.amax
        else:
            lo, hi = -float(self.amax), float(self.amax)
        lo_a = jnp.full(shape, lo, jnp.float32)
        hi_a = jnp.full(shape, hi, jnp.float32)
        return _sym(lo_a, hi_a, symmetric)

    def __str__(self) -> str:
        return f"fixed({self.amax})"


@dataclasses.dataclass(frozen=True)
class MeanAbs:
    """``amax = k * mean|x|`` over the finite elements: the scale of binary-weight
    networks (BWN / XNOR-Net: ``alpha = E|W|`` with a ``{-1, +1}`` grid, ``k = 1``)."""

    k: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", check_real(self.k, "mean_abs(k)", gt=0))

    def __call__(
        self, x: Array, axes: tuple[int, ...], symmetric: bool, qdq: QDQ
    ) -> tuple[Array, Array]:
        amax = self.k * _mean_abs(x, axes)
        return -amax, amax

    def __str__(self) -> str:
        return f"mean_abs({self.k:g})"


@dataclasses.dataclass(frozen=True)
class TWN:
    """Ternary weight networks (Li & Liu 2016): threshold ``delta = t * E|W|``, scale
    ``alpha = E[|W| : |W| > delta]``; ``W`` maps to ``alpha * sign(W)`` where
    ``|W| > delta``, else 0. Only for the ``ternary`` format, whose rounding the quantizer
    does at the threshold (``x / (2 delta)`` to nearest) while storing ``alpha``.
    """

    threshold: float = 0.7

    def __post_init__(self) -> None:
        t = check_real(self.threshold, "twn(threshold)", gt=0, hint="TWN's default is 0.7.")
        object.__setattr__(self, "threshold", t)

    def delta(self, x: Array, axes: tuple[int, ...]) -> Array:
        """``t * mean|x|`` per group (finite elements)."""
        return MeanAbs(self.threshold)(x, axes, True, None)[1]  # type: ignore[arg-type]

    def __call__(
        self, x: Array, axes: tuple[int, ...], symmetric: bool, qdq: QDQ
    ) -> tuple[Array, Array]:
        delta = self.delta(x, axes)
        big = _finite(x) & (jnp.abs(x) > delta)
        n = jnp.sum(big, axis=axes, keepdims=True).astype(jnp.float32)
        total = jnp.sum(jnp.where(big, jnp.abs(x), 0.0), axis=axes, keepdims=True)
        alpha = jnp.where(n > 0, total / jnp.maximum(n, 1.0), 0.0)
        return -alpha, alpha

    def __str__(self) -> str:
        return f"twn({self.threshold:g})"


def _fixed_range(amax: object) -> float | tuple[float, float]:
    """``fixed(amax)``'s argument checked and normalised to floats."""
    if isinstance(amax, tuple | list):
        if len(amax) != 2:
            raise ValueError(
                f"fixed(amax): a range is a pair (lo, hi), got {len(amax)} values {amax!r}."
            )
        lo = check_real(amax[0], "fixed(amax): lo of (lo, hi)")
        hi = check_real(amax[1], "fixed(amax): hi of (lo, hi)")
        if not lo <= hi or lo == hi == 0:
            raise ValueError(
                f"fixed(amax): need lo <= hi and a nonzero range, got ({lo!r}, {hi!r}). Swap "
                "them, or pass the calibrated range."
            )
        return lo, hi
    if getattr(amax, "shape", ()) != ():
        raise TypeError(
            f"fixed(amax): expected a number or a pair (lo, hi), got {describe(amax)}. For "
            "one range per channel, use jq.static_scaling(spec, amax) or quantize(..., scale=)."
        )
    return check_real(
        amax,
        "fixed(amax)",
        gt=0,
        hint="amax is the largest magnitude kept, a positive finite number; for no scaling "
        "use calibration=None.",
    )


Calibration = AbsMax | MinMax | MeanStd | Percentile | MSE | KL | Fixed | MeanAbs | TWN


def absmax() -> AbsMax:
    """``amax = max|x|``: the seed's "max quantization".

    Every finite value is represented without clipping, so one outlier sets the step for
    the whole scale group. Asymmetric specs use ``[min x, max x]`` (as :func:`minmax`).

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> x = jnp.array([0.1, -0.2, 0.3, -0.4, 8.0])
      >>> q = jq.quantize(x, jq.QuantSpec("int8", calibration=jq.absmax()))
      >>> q.values.tolist(), round(float(q.scale[0] * 127), 4)
      ([2, -3, 5, -6, 127], 8.0)
    """
    return AbsMax()


def minmax() -> MinMax:
    """``[min x, max x]``: the natural range for zero-point quantization.

    The same rule as :func:`absmax` (symmetric specs take ``max |x|``); the name says
    what an asymmetric spec (``symmetric=False``) does with it.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> spec = jq.QuantSpec("uint8", calibration=jq.minmax(), symmetric=False)
      >>> q = jq.quantize(jnp.array([-1.0, 0.0, 1.0, 2.0]), spec)
      >>> q.values.tolist(), q.zero_point.tolist()
      ([0, 85, 170, 255], [85])
    """
    return MinMax()


def mean_std(k: float = 3.0) -> MeanStd:
    """Clip to ``mean +- k std``: more robust to outliers than absmax.

    Symmetric specs use ``amax = min(max|x|, |mean| + k * std)``; asymmetric ones
    ``[max(min x, mean - k std), min(max x, mean + k std)]``.

    Args:
      k: the number of standard deviations kept, > 0 (typically 2 to 4).

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> x = jnp.array([0.1, -0.2, 0.3, -0.4, 8.0])
      >>> q = jq.quantize(x, jq.QuantSpec("int8", calibration=jq.mean_std(1.0)))
      >>> round(float(q.scale[0] * 127), 3), q.values.tolist()  # 8.0 is clipped to 4.789
      (4.789, [3, -5, 8, -11, 127])
    """
    return MeanStd(k)


def percentile(p: float = 99.9) -> Percentile:
    """Clip at the ``p``-th percentile of ``|x|``.

    Asymmetric specs clip at the ``100 - p``-th and ``p``-th percentiles of ``x``.

    Args:
      p: the percentile in percent, in ``(0, 100]`` (99.9, not 0.999).

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> x = jnp.array([0.1, -0.2, 0.3, -0.4, 8.0])
      >>> q = jq.quantize(x, jq.QuantSpec("int8", calibration=jq.percentile(75.0)))
      >>> round(float(q.scale[0] * 127), 4), q.values.tolist()  # the outlier saturates
      (0.4, [32, -64, 95, -127, 127])
    """
    return Percentile(p)


def mse(num: int = 32, min_ratio: float = 0.2) -> MSE:
    """Grid-search the clip ratio minimizing the quantization MSE.

    Tries ``num`` clip ratios ``r`` evenly spaced in ``[min_ratio, 1]`` of the abs-max
    range, quantizes with each, and keeps the one with the least squared error, per scale
    group.

    Args:
      num: the number of candidate ratios, >= 2.
      min_ratio: the smallest ratio tried, in ``(0, 1]``.

    Example:
      >>> import jax, jaxquant as jq
      >>> x = jax.random.normal(jax.random.key(0), (4096,))
      >>> def sqnr(calibration):
      ...     x_hat = jq.fake_quant(x, jq.QuantSpec("int4", calibration=calibration))
      ...     return round(float(jq.metrics.sqnr(x, x_hat)), 1)
      >>> sqnr(jq.absmax()), sqnr(jq.mse())  # dB: clipping the tails pays off at 4 bits
      (16.0, 19.0)
    """
    return MSE(num, min_ratio)


def kl(bins: int = 512, num: int = 64) -> KL:
    """KL-divergence (entropy) calibration of the clip threshold.

    TensorRT's entropy calibration: of ``num`` candidate thresholds on a ``bins``-bin
    histogram of ``|x|``, the one whose quantized histogram is closest (in KL divergence)
    to the clipped original. Symmetric specs only.

    Args:
      bins: histogram bins, >= 8.
      num: candidate thresholds, >= 2.

    Example:
      >>> import jax, jaxquant as jq
      >>> x = jax.random.normal(jax.random.key(0), (4096,))
      >>> def sqnr(calibration):
      ...     x_hat = jq.fake_quant(x, jq.QuantSpec("int4", calibration=calibration))
      ...     return round(float(jq.metrics.sqnr(x, x_hat)), 1)
      >>> sqnr(jq.absmax()), sqnr(jq.kl())  # dB
      (16.0, 17.7)

    References:
      Migacz, "8-bit Inference with TensorRT" (GTC 2017),
      https://on-demand.gputechconf.com/gtc/2017/presentation/s7310-8-bit-inference-with-tensorrt.pdf
    """
    return KL(bins, num)


def fixed(amax: float | tuple[float, float]) -> Fixed:
    """A fixed, known range: ``amax`` (symmetric, ``[-amax, amax]``) or ``(lo, hi)``.

    Args:
      amax: a finite number > 0, or a pair of finite numbers ``lo <= hi`` that is not
        ``(0, 0)``. A zero, infinite or NaN range has no scale that means anything (amax 0
        would fall back to a unit scale, Inf to all zeros), so it raises.

    Raises:
      ValueError, TypeError: a range that is empty, not finite or not numbers.

    Example:
      >>> import jaxquant as jq
      >>> jq.fixed(2.5), jq.fixed((-1, 3))
      (Fixed(amax=2.5), Fixed(amax=(-1.0, 3.0)))
    """
    return Fixed(amax)


def mean_abs(k: float = 1.0) -> MeanAbs:
    """``amax = k * mean|x|``: binary-weight scaling (``alpha = E|W|``).

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> spec = jq.QuantSpec("binary", calibration=jq.mean_abs())
      >>> jq.fake_quant(jnp.array([0.5, -1.5, 1.0]), spec).tolist()
      [1.0, -1.0, 1.0]

    References:
      Rastegari et al., "XNOR-Net", https://arxiv.org/abs/1603.05279
    """
    return MeanAbs(k)


def twn(threshold: float = 0.7) -> TWN:
    """Ternary weight networks: zero below ``threshold * E|W|``, else ``+-E[|W| : kept]``.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> spec = jq.QuantSpec("ternary", calibration=jq.twn())
      >>> jq.fake_quant(jnp.array([0.1, -2.0, 1.0, 0.5]), spec).tolist()
      [0.0, -1.5, 1.5, 0.0]

    References:
      Li & Liu, "Ternary Weight Networks", https://arxiv.org/abs/1605.04711
    """
    return TWN(threshold)
