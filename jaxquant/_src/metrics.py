"""Quantization error metrics: jit-safe, each returns a float32 scalar array.

All take the reference ``x`` and its approximation ``x_hat`` (an array or a QArray, which
is dequantized). Non-finite reference elements are excluded from error sums and counted
separately by :func:`nan_count` / :func:`inf_count`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant._src.qarray import QArray, check_array
from jaxquant._src.quantize import ste_bounds
from jaxquant._src.types import PyTree

Array = jax.Array


def _reference(x: Any, fn: str) -> Array:
    """The reference ``x`` as float32 (a QArray is refused: it is the approximation)."""
    if isinstance(x, QArray):
        raise TypeError(
            f"{fn}: x is a QArray; x is the float reference and the QArray its approximation. "
            "Pass the original array as x (and the QArray as x_hat)."
        )
    return check_array(x, f"{fn}: x").astype(jnp.float32)


def _operands(x: Any, x_hat: Any, fn: str) -> tuple[Array, Array | QArray]:
    """(x as float32, x_hat as a float32 array or the QArray), shapes checked."""
    x = _reference(x, fn)
    if not isinstance(x_hat, QArray):
        x_hat = check_array(x_hat, f"{fn}: x_hat").astype(jnp.float32)
    if tuple(x.shape) != tuple(x_hat.shape):
        raise ValueError(
            f"{fn}: shapes differ: x has shape {tuple(x.shape)} but x_hat "
            f"{tuple(x_hat.shape)}; pass an array and its approximation (e.g. "
            "fake_quant(x, spec) or quantize(x, spec))."
        )
    return x, x_hat


def _pair(x: Any, x_hat: Any, fn: str) -> tuple[Array, Array, Array]:
    x, x_hat = _operands(x, x_hat, fn)
    if isinstance(x_hat, QArray):
        x_hat = x_hat.dequantize().astype(jnp.float32)
    return x, x_hat, jnp.isfinite(x)


def _against(x: Any, q: Any, fn: str) -> tuple[Array, QArray]:
    """(x as float32, q) for the metrics that need the QArray of ``x``."""
    if not isinstance(q, QArray):
        raise TypeError(
            f"{fn}: q must be the QArray of x (it knows the representable range and the scale "
            f"format), got {type(q).__name__}. Pass jq.quantize(x, spec)."
        )
    x = _reference(x, fn)
    if tuple(x.shape) != tuple(q.shape):
        raise ValueError(
            f"{fn}: x has shape {tuple(x.shape)} but q was quantized from shape {q.shape}; "
            "pass the array q was quantized from."
        )
    return x, q


def mse(x: jax.typing.ArrayLike, x_hat: jax.typing.ArrayLike | QArray) -> Array:
    """Mean squared error over finite elements of ``x``.

    Args:
      x: the reference array.
      x_hat: its approximation: an array of the same shape, or the :class:`QArray` of ``x``.

    Returns:
      A float32 scalar array.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> x = jnp.array([1.0, 2.0, jnp.inf])
      >>> float(jq.metrics.mse(x, jnp.array([1.5, 2.0, 0.0])))  # the Inf is left out
      0.125
    """
    x, x_hat, fin = _pair(x, x_hat, "mse")
    n = jnp.maximum(jnp.sum(fin), 1).astype(jnp.float32)
    return jnp.sum(jnp.where(fin, (x - x_hat) ** 2, 0.0)) / n


def max_abs_error(x: jax.typing.ArrayLike, x_hat: jax.typing.ArrayLike | QArray) -> Array:
    """``max |x - x_hat|`` over finite elements of ``x`` (0 for an empty array).

    ``x_hat`` is an array of ``x``'s shape or the :class:`QArray` of ``x``.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> x = jnp.array([-0.5, 0.3, 1.2, -2.1])
      >>> q = jq.quantize(x, jq.QuantSpec("int8"))
      >>> round(float(jq.metrics.max_abs_error(x, q)), 5)  # at most half a step, 2.1/254
      0.00709
    """
    x, x_hat, fin = _pair(x, x_hat, "max_abs_error")
    return jnp.max(jnp.where(fin, jnp.abs(x - x_hat), 0.0), initial=0.0)


def sqnr(x: jax.typing.ArrayLike, x_hat: jax.typing.ArrayLike | QArray) -> Array:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum x^2 / sum (x - x_hat)^2)``.

    ``+inf`` when the approximation is exact (including an all-zero ``x``). Sums run over
    the finite elements of ``x``; ``x_hat`` is an array of ``x``'s shape or its QArray.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> x = jnp.array([-0.5, 0.3, 1.2, -2.1])
      >>> round(float(jq.metrics.sqnr(x, jq.quantize(x, jq.QuantSpec("int8")))), 2)
      49.39
      >>> float(jq.metrics.sqnr(x, x))  # no error
      inf
    """
    x, x_hat, fin = _pair(x, x_hat, "sqnr")
    sig = jnp.sum(jnp.where(fin, x * x, 0.0))
    noise = jnp.sum(jnp.where(fin, (x - x_hat) ** 2, 0.0))
    safe = jnp.where(noise > 0, noise, 1.0)
    db = jnp.where(noise > 0, 10.0 * jnp.log10(jnp.maximum(sig, 1e-45) / safe), jnp.inf)
    return jnp.where(jnp.isnan(noise), jnp.nan, db)  # a NaN in x_hat is not "exact"


def saturation_rate(x: jax.typing.ArrayLike, q: QArray) -> Array:
    """Fraction of finite elements of ``x`` outside the range ``q`` can represent (clipped).

    The range is where the clipped straight-through estimator passes the gradient: for
    ``int_grid="full"`` the calibrated ``[-amax, amax]`` (``+amax`` scales to ``qmax + 0.5``
    and rounds to ``qmax``, as any value within half a step does).

    Args:
      x: the array ``q`` was quantized from.
      q: its :class:`QArray` (it knows the representable range).

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> x = jnp.array([1.0, 2.0, 100.0, 0.001])
      >>> q = jq.quantize(x, jq.QuantSpec("int8", calibration=jq.fixed(10.0)))
      >>> float(jq.metrics.saturation_rate(x, q))  # 100 is clipped to 10
      0.25
    """
    x, q = _against(x, q, "saturation_rate")
    spec = q.spec
    plan = spec.granularity.plan(q.shape)
    # The clipped STE's bounds: the full grid's +amax scales to qmax + 0.5 (rounded to
    # qmax within half a step, as any value), so it is not a clipped value.
    lq, hq = ste_bounds(spec)
    s = q.scale.astype(jnp.float32)
    z = 0.0 if q.zero_point is None else q.zero_point.astype(jnp.float32)
    xv = x.reshape(plan.view)
    lo, hi = (lq - z) * s, (hq - z) * s
    fin = jnp.isfinite(xv)
    out = fin & ((xv < lo) | (xv > hi))
    return jnp.sum(out) / jnp.maximum(jnp.sum(fin), 1)


def scale_clamp_rate(x: jax.typing.ArrayLike, q: QArray) -> Array:
    """Fraction of scale groups whose range needs a scale outside what the quantizer stores.

    A group's abs-max scale ``amax / qmax`` (``amax / (qmax + 0.5)`` for
    ``int_grid="full"``) must lie in ``[2^-126, max]`` for float32 (and
    bfloat16 / e8m0) scales, ``[2^-24, 65504]`` for float16 scales; outside it the scale is
    clamped (see :mod:`jaxquant.quantize`'s range limits): too small (a group of float32
    subnormals, or of values below ``qmax * 2^-126``) and its values lose resolution or
    round to 0; too large (float16 scales) and they saturate. Groups of zeros do not count.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> x = jnp.array([[1e-40, 2e-40], [1.0, 2.0]])
      >>> q = jq.quantize(x, jq.QuantSpec("int8", jq.per_channel(0)))
      >>> float(jq.metrics.scale_clamp_rate(x, q))
      0.5
    """
    x, q = _against(x, q, "scale_clamp_rate")
    spec = q.spec
    plan = spec.granularity.plan(q.shape)
    xv = x.reshape(plan.view)
    if spec.calibration is None or xv.size == 0:
        return jnp.float32(0.0)
    fin = jnp.isfinite(xv)
    axes = plan.reduce_axes
    # Integer-bit abs-max: XLA's CPU backend flushes subnormals in max / abs.
    mag = jax.lax.bitcast_convert_type(xv, jnp.int32) & 0x7FFFFFFF
    mag = jnp.max(jnp.where(fin, mag, 0), axis=axes, keepdims=True)
    qmin, qmax = spec.qrange
    # What compute_scale divides amax by: qmax + 0.5 for the full int grid.
    qmax = spec.scale_divisor if spec.symmetric else qmax - qmin
    big = jax.lax.bitcast_convert_type(mag, jnp.float32) / jnp.float32(qmax)
    sfmt = spec.scale_format
    lo_amax = float(qmax) * (2.0**-24 if sfmt.name == "float16" else 2.0**-126)
    lo_bits = np.float32(lo_amax).view(np.int32)
    low = (mag > 0) & (mag < lo_bits)
    high = big > jnp.float32(min(float(sfmt.max), float(np.finfo(np.float32).max)))
    return jnp.mean((low | high).astype(jnp.float32))


def underflow_rate(x: jax.typing.ArrayLike, x_hat: jax.typing.ArrayLike | QArray) -> Array:
    """Fraction of non-zero finite elements of ``x`` that became exactly 0.

    ``x_hat`` is an array of ``x``'s shape or the :class:`QArray` of ``x``.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> x = jnp.array([1.0, 2.0, 100.0, 0.001])
      >>> q = jq.quantize(x, jq.QuantSpec("int8", calibration=jq.fixed(10.0)))
      >>> float(jq.metrics.underflow_rate(x, q))  # 0.001 is below half a step (10/254)
      0.25
    """
    x, x_hat, fin = _pair(x, x_hat, "underflow_rate")
    nz = fin & (x != 0)
    return jnp.sum(nz & (x_hat == 0)) / jnp.maximum(jnp.sum(nz), 1)


def nan_count(x: jax.typing.ArrayLike | QArray) -> Array:
    """Number of NaN elements (of an array or a dequantized QArray).

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> int(jq.metrics.nan_count(jnp.array([1.0, jnp.nan, jnp.inf])))
      1
    """
    if isinstance(x, QArray):
        x = x.dequantize()
    return jnp.sum(jnp.isnan(check_array(x, "nan_count: x")))


def inf_count(x: jax.typing.ArrayLike | QArray) -> Array:
    """Number of +-Inf elements (of an array or a dequantized QArray).

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> x = jnp.array([1e5, -7e4, 10.0]).astype(jnp.float16)  # float16's max is 65504
      >>> int(jq.metrics.inf_count(x))
      2
    """
    if isinstance(x, QArray):
        x = x.dequantize()
    return jnp.sum(jnp.isinf(check_array(x, "inf_count: x")))


def summary(x: jax.typing.ArrayLike, x_hat: jax.typing.ArrayLike | QArray) -> dict[str, Array]:
    """Every metric for one pair (saturation only when ``x_hat`` is a QArray).

    Returns:
      A dict of float32 scalar arrays: ``sqnr_db``, ``mse``, ``max_abs_error``,
      ``underflow_rate``, ``nan_in``, ``nan_out``, and for a QArray also
      ``saturation_rate``, ``scale_clamp_rate`` and ``bits_per_value``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxquant as jq
      >>> x = jnp.array([-0.5, 0.3, 1.2, -2.1])
      >>> s = jax.jit(jq.metrics.summary)(x, jq.quantize(x, jq.QuantSpec("int8")))
      >>> round(float(s["sqnr_db"]), 2), float(s["saturation_rate"]), float(s["bits_per_value"])
      (49.39, 0.0, 16.0)
    """
    _operands(x, x_hat, "summary")  # errors name summary, not the metric that met them first
    out = {
        "sqnr_db": sqnr(x, x_hat),
        "mse": mse(x, x_hat),
        "max_abs_error": max_abs_error(x, x_hat),
        "underflow_rate": underflow_rate(x, x_hat),
        "nan_in": nan_count(x),
        "nan_out": nan_count(x_hat),
    }
    if isinstance(x_hat, QArray):
        out["saturation_rate"] = saturation_rate(x, x_hat)
        out["scale_clamp_rate"] = scale_clamp_rate(x, x_hat)
        out["bits_per_value"] = jnp.float32(x_hat.bits_per_value)
    return out


def _is_qarray(a: Any) -> bool:
    return isinstance(a, QArray)


def report(tree: PyTree, qtree: PyTree) -> dict[str, dict[str, Array]]:
    """Per-leaf :func:`summary` over two pytrees of the same structure.

    Keys are ``jax.tree_util.keystr`` paths; leaves of ``qtree`` that are not QArrays and
    equal their original are reported too (SQNR inf). Returns arrays, so it runs under jit.

    Args:
      tree: the float pytree.
      qtree: ``tree`` after :func:`jaxquant.quantize_tree` (QArrays where it quantized).

    Returns:
      ``{path: summary(leaf, qleaf)}`` for every floating-point leaf.

    Example:
      >>> import jax, jax.numpy as jnp, jaxquant as jq
      >>> params = {"w": jnp.array([[0.5, -1.0], [0.25, 2.0]]), "b": jnp.array([0.1, 0.2])}
      >>> policy = lambda path, x: jq.QuantSpec("int4") if x.ndim == 2 else None
      >>> r = jax.jit(jq.metrics.report)(params, jq.quantize_tree(params, policy))
      >>> {path: round(float(m["sqnr_db"]), 1) for path, m in r.items()}
      {"['b']": inf, "['w']": 23.0}
    """
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_qarray)[0]
    qflat = jax.tree_util.tree_flatten_with_path(qtree, is_leaf=_is_qarray)[0]
    paths = [jax.tree_util.keystr(p) for p, _ in flat]
    qpaths = [jax.tree_util.keystr(p) for p, _ in qflat]
    if paths != qpaths:
        # Leaves are paired by position: trees with other keys would pair unrelated arrays.
        diff = next(
            (
                f"leaf {i}: {a or '(root)'} in tree, {b or '(root)'} in qtree"
                for i, (a, b) in enumerate(zip(paths, qpaths, strict=False))
                if a != b
            ),
            f"{len(paths)} leaves in tree, {len(qpaths)} in qtree",
        )
        raise ValueError(
            f"report: the trees differ ({diff}). Pass the tree that was quantized as tree "
            "and the result of quantize_tree on it as qtree."
        )
    out = {}
    for (path, leaf), (_, qleaf) in zip(flat, qflat, strict=True):
        # A QArray in tree was quantized before (quantize_tree keeps it): no float original.
        if _is_qarray(leaf):
            continue
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating):
            out[jax.tree_util.keystr(path)] = summary(leaf, qleaf)
    return out
