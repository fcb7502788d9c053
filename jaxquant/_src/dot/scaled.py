"""The scaled dot: ``dot(a * sa, b * sb) = dot(a, b) * (sa (x) sb)``, one for training and serving.

:func:`quantize_operand` turns an operand into grid values (int8 / fp8 storage, or float32
"emulated" ones) and a scale laid out like the operand; :func:`scaled_dot` multiplies two
such operands in the lowest precision their pair and the backend's
:class:`~jaxquant._src.dot.capabilities.Lowering` allow and applies the scales to the
output; :func:`transpose_dot` is the same product for a cotangent (``jax.lax``'s transpose
rule). The custom VJP of :func:`jaxquant.dot_general` (:mod:`.vjp`) and the QArray products of
serving (:mod:`.serving`) both call these, so their numerics are the same by construction.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant._src import formats
from jaxquant._src.dot.capabilities import FP8, DimensionNumbers, Lowering
from jaxquant._src.qarray import encode
from jaxquant._src.quantize import quantize_core, scale_input, ste_bounds, to_grid
from jaxquant._src.spec import QuantSpec

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ScaledDot:
    """How one scaled dot lowers (hashable: part of a jit static argument).

    Attributes:
      lowering: the backend's :class:`~jaxquant._src.dot.capabilities.Lowering`.
      fp8_pairs: the fp8 dtype pairs multiplied by an fp8 ``dot_general``; others are
        widened.
      precision: of the float32 dots (the low-precision ones use ``DEFAULT``).
      fp8_via_bf16: fp8 pairs without an fp8 GEMM are widened to bf16 (exact for e4m3 /
        e5m2) and accumulated in float32 -- the fp8 GEMM's own products and accumulator
        (serving) -- rather than decoded to float32.
    """

    lowering: Lowering
    fp8_pairs: tuple[tuple[str, str], ...]
    precision: Any = None
    fp8_via_bf16: bool = False


# ---------------------------------------------------------------------- operand math


def quantize_operand(
    x: Array,
    spec: QuantSpec | None,
    key: Array | None,
    scale: Array | None,
    store,
    native_cast: bool = False,
    clipped: bool = False,
) -> tuple[Array, Array | None, Array | None]:
    """(values, scale, mask): grid values (int8/fp8 storage or float32), the scale laid out
    like ``x`` (size 1 along shared axes) and, with ``clipped``, the clipped-STE mask (where
    ``x`` lies inside the quantizer's range; from the same scale, no second calibration).
    ``(x, None, None)`` for an operand left as it is. Block scales (which change along the
    blocked axis) are applied here: the values come back dequantized, in float32, with
    scale None."""
    if spec is None:
        return x, None, None
    native = (
        native_cast
        and spec.granularity.plan(tuple(x.shape)).view == tuple(x.shape)
        and store is not None
        and np.dtype(store).name in FP8
        and not spec.stochastic
        and spec.saturate
    )
    r, s, _, plan = quantize_core(x, spec, key, scale, rounded=not native)
    mask = None
    if clipped:
        # fake_quant's bounds: the full grid's +amax scales to qmax + 0.5, not a clipped value.
        lo, hi = ste_bounds(spec)
        t = scale_input(jax.lax.stop_gradient(x).astype(jnp.float32).reshape(plan.view), s, None)
        mask = ((t >= lo) & (t <= hi)).reshape(plan.shape)
    if native:  # the GPU's RNE conversion (cvt.rn.satfinite) rounds; values are in range
        return r.astype(store), s, mask
    if plan.view != plan.shape or _wide(spec):
        return (to_grid(r, spec) * s).reshape(plan.shape), None, mask
    if store is not None:
        return encode(r, spec.format), s, mask
    return to_grid(r, spec), s, mask


def _wide(spec: QuantSpec) -> bool:
    """Formats with float32's exponent range (bf16): an absmax scale is ~1e-38 and the grid
    values ~1e38, so the scales cannot be factored out of the dot (the product of two
    grid values overflows, that of two scales underflows). Such operands are multiplied
    dequantized."""
    return spec.element.kind == "float" and float(spec.element.max) > 2.0**64


def _scale_constant_along(s: Array | None, axes: tuple[int, ...]) -> bool:
    return s is None or all(s.shape[d] == 1 for d in axes)


def _out_factor(
    s: Array, batch: tuple[int, ...], contract: tuple[int, ...], n_other: int, first: bool
) -> Array:
    """Scale ``s`` (operand layout) laid out like the dot's output (batch, lhs, rhs)."""
    free = tuple(i for i in range(s.ndim) if i not in batch and i not in contract)
    t = jnp.transpose(s, (*batch, *free, *contract))
    t = t.reshape(t.shape[: len(batch) + len(free)])  # the contracted axes are all 1
    nb = len(batch)
    ones = (1,) * n_other
    shape = (*t.shape, *ones) if first else (*t.shape[:nb], *ones, *t.shape[nb:])
    return t.reshape(shape)


def scaled_dot(
    a: Array,
    sa: Array | None,
    b: Array,
    sb: Array | None,
    dn: DimensionNumbers,
    cfg: ScaledDot,
    out_sharding: Any = None,
    out_dtype: Any = jnp.float32,
    out_perm: tuple[int, ...] | None = None,
    b_dtype: Any = None,
    b_exact: bool = False,
) -> Array:
    """``dot_general(a * sa, b * sb, dn)``, low precision where the pair allows; float32,
    or ``out_dtype`` when a fused fp8 GEMM writes it directly. ``out_perm`` transposes the
    product right after the dot, before the scales are applied (a transpose of the dot
    itself, which XLA folds into the GEMM; the values are the same either way).

    ``b_dtype``: ``b``'s dtype before quantization. When ``b`` must be dequantized (its
    scale changes along the contracted axes) and ``a`` is already in that half-precision
    dtype, the dequantized ``b`` is rounded to it -- the value ``fake_quant`` gives a
    bf16 / f16 operand -- and the dot runs in half precision, as the transpose of a half
    precision dot does (the backward pass's ``g . w_hat``). ``b_exact``: ``b``'s float32
    grid values are exact in ``b_dtype`` (:func:`grid_exact_in`), so a dot with an ``a``
    in that half-precision dtype runs in it too."""
    (ca, cb), (ba, bb) = dn
    low = cfg.lowering
    if sa is not None and not _scale_constant_along(sa, ca):
        a, sa = to_f32(a, cfg) * sa, None
    if sb is not None and not _scale_constant_along(sb, cb):
        b, sb = to_f32(b, cfg) * sb, None
        if b_dtype is not None and np.dtype(b_dtype) in HALF and a.dtype == b_dtype:
            b = b.astype(b_dtype)
    pair = (np.dtype(a.dtype).name, np.dtype(b.dtype).name)
    half = _exact_half(pair)
    if half is None and b_exact and sb is not None and a.dtype == b_dtype:
        half = np.dtype(b_dtype)
    # Explicitly DEFAULT for int8 / fp8 operands (a global jax_default_matmul_precision
    # of "highest" must not keep XLA from its int8 / fp8 GEMMs).
    precision: Any = lax.Precision.DEFAULT
    pet: Any = jnp.float32
    if pair == ("int8", "int8") and not low.int8_gemm_ok(a.shape, b.shape, dn):
        # Exact: |products| <= 127^2, so float32 sums are exact up to K = 1040.
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        precision = lax.Precision.HIGHEST
    elif pair == ("int8", "int8"):
        pet = jnp.int32
    elif pair in cfg.fp8_pairs and low.fp8_gemm_ok(dn):
        # bf16 only: the GEMM's output is unscaled (|q| up to 448^2 * K), beyond float16.
        if low.fp8_output == "half_out" and np.dtype(out_dtype) == np.dtype(jnp.bfloat16):
            pet = out_dtype
    elif cfg.fp8_via_bf16 and pair[0] in FP8 and pair[1] in FP8 and not low.native_fp8_cast:
        a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    elif half is not None:  # exact in ``half``: the same products, accumulated in float32
        a, b = (v if v.dtype == half else to_f32(v, cfg).astype(half) for v in (a, b))
    else:
        a, b = to_f32(a, cfg), to_f32(b, cfg)
        precision = cfg.precision
    kw = {} if out_sharding is None else {"out_sharding": out_sharding}
    out = lax.dot_general(a, b, dn, precision=precision, preferred_element_type=pet, **kw)
    if out_perm is not None:
        if low.keeps_orientation(out.shape, out_perm):
            out = lax.optimization_barrier(out)
        out = jnp.transpose(out, out_perm)
    out = out.astype(jnp.float32)
    if _scalar(sa) and _scalar(sb):  # one scalar multiply (XLA can fuse it into the GEMM)
        scales = [s.reshape(()) for s in (sa, sb) if s is not None]
        if not scales:
            return out
        return out * (scales[0] * scales[1] if len(scales) == 2 else scales[0])
    fa = len([i for i in range(a.ndim) if i not in ca and i not in ba])
    fb = len([i for i in range(b.ndim) if i not in cb and i not in bb])
    perm = (lambda t: t) if out_perm is None else (lambda t: jnp.transpose(t, out_perm))
    if sa is not None:
        out = out * perm(_out_factor(sa, ba, ca, fb, first=True))
    if sb is not None:
        out = out * perm(_out_factor(sb, bb, cb, fa, first=False))
    return out


def to_f32(a: Array, cfg: ScaledDot) -> Array:
    """float32 values of an operand. fp8 values rounded by the device's conversion
    (``native_cast``) are decoded through their bits: a ``convert`` back to float32 could
    be folded with the rounding one by XLA (``xla_allow_excess_precision``), which would
    silently skip the quantization."""
    if cfg.lowering.native_fp8_cast and np.dtype(a.dtype).name in FP8:
        fmt = formats.get(np.dtype(a.dtype).name)
        table = jnp.asarray(formats.code_table(fmt).astype(np.float32))
        return table[jax.lax.bitcast_convert_type(a, jnp.uint8).astype(jnp.int32)]
    return a.astype(jnp.float32)


HALF = (np.dtype(jnp.bfloat16), np.dtype(np.float16))
# Storage dtypes whose every value is exact in bfloat16 and float16: |int8| <= 128 needs 8
# significant bits (bf16 has 8, f16 11); fp8's 2-3 mantissa bits and exponents
# (e4m3fn 2^-9..448, e5m2 2^-16..57344) fit both.
EXACT_INHALF = ("int8", *FP8)


@functools.cache
def grid_exact_in(spec: QuantSpec, dtype: np.dtype) -> bool:
    """Whether every grid value of ``spec`` (symmetric, at most 8 bits, not a codebook) is
    exact in the half-precision ``dtype``."""
    fmt = spec.element
    if not (spec.symmetric and fmt.kind in ("int", "float") and fmt.bits <= 8):
        return False
    v = formats.finite_values(fmt)
    return bool(np.array_equal(v.astype(dtype).astype(np.float64), v))


def _exact_half(pair: tuple[str, str]) -> np.dtype | None:
    """The half-precision dtype in which a dot of this dtype pair is exact (one operand
    already in it, the other in it or in :data:`EXACT_INHALF`), or None. A bf16 / f16
    cotangent times int8 / fp8 grid values then multiplies in half precision with float32
    accumulation -- the same products as the float32 dot, at half the operand bytes (a
    tensor-core GEMM on GPUs) -- instead of widening both to float32."""
    for h in HALF:
        if h.name in pair:
            other = pair[1] if pair[0] == h.name else pair[0]
            if other == h.name or other in EXACT_INHALF:
                return h
    return None


def _scalar(s: Array | None) -> bool:
    return s is None or s.size == 1


def _remaining(n: int, *taken: tuple[int, ...]) -> tuple[int, ...]:
    skip = {i for t in taken for i in t}
    return tuple(i for i in range(n) if i not in skip)


def transpose_dot(
    g: Array,
    gs: Array | None,
    y: Array,
    ys: Array | None,
    dn: DimensionNumbers,
    x_ndim: int,
    cfg: ScaledDot,
    *,
    swap_ans: bool,
    out_dtype: Any,
    y_dtype: Any = None,
    y_spec: QuantSpec | None = None,
) -> Array:
    """Cotangent of ``x`` in ``dot_general(x, y, dn)`` (``swap_ans``: of ``dot(y, x)``),
    as in ``jax.lax``'s transpose rule, with scaled operands (``y_dtype``: ``y``'s dtype
    before quantization, ``y_spec`` its spec; see :func:`scaled_dot`)."""
    (x_contract, y_contract), (x_batch, y_batch) = dn
    x_kept = _remaining(x_ndim, x_contract, x_batch)
    y_kept = _remaining(y.ndim, y_contract, y_batch)
    nb = len(x_batch)
    ans_batch = tuple(range(nb))
    if swap_ans:
        ans_y = tuple(range(nb, nb + len(y_kept)))
    else:
        ans_y = tuple(range(nb + len(x_kept), nb + len(x_kept) + len(y_kept)))
    dims = ((ans_y, y_kept), (ans_batch, y_batch))
    x_contract_sorted_by_y = [x_contract[i] for i in np.argsort(y_contract)]
    out_axes = tuple(int(i) for i in np.argsort([*x_batch, *x_kept, *x_contract_sorted_by_y]))
    # Transposed before the scales: a transpose straight after the dot folds into it (XLA
    # picks the operand order); after the scale multiply it would be an extra copy.
    exact = (
        y_spec is not None
        and y_dtype is not None
        and np.dtype(y_dtype) in HALF
        and grid_exact_in(y_spec, np.dtype(y_dtype))
    )
    return scaled_dot(
        g,
        gs,
        y,
        ys,
        dims,
        cfg,
        out_dtype=out_dtype,
        out_perm=out_axes,
        b_dtype=y_dtype,
        b_exact=exact,
    )
