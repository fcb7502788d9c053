"""Products with already-quantized weights: :func:`jaxquant.dot_general` with a QArray.

Serving a converted model multiplies float activations by a :class:`QArray` weight
``W = (q - z) * s`` that was quantized once, offline. Nothing here re-quantizes the weight
or materializes a float copy of it where the maths lets us avoid one:

* **w8a8 / fp8** (the activation spec and the weight are both int8, or both fp8, the
  weight's scales are constant along the contracted axes and it has no zero point): the
  activation is quantized (a static scale when its calibration is :func:`jaxquant.fixed`,
  the batch's own otherwise) and the dot runs on the stored values --
  ``int8 x int8 -> int32`` or ``fp8 x fp8 -> float32`` GEMMs -- with the scales applied
  to the output, ``dot(q_x, q_w) * (s_x (x) s_w)``. Where the backend has no fp8 GEMM
  (CPU), both operands are widened to bfloat16, which holds every e4m3 / e5m2 value
  exactly, and multiplied with float32 accumulation: the same products and accumulator
  as the fp8 GEMM, at bf16 GEMM speed.
* **weight-only** (no activation spec): with per-output-channel scales (constant along
  the contracted axes), the stored values are widened to the activation's dtype -- exact
  for every integer format of at most 8 bits and every fp8 / fp6 / fp4 value in bfloat16,
  float16 and float32 -- multiplied with float32 accumulation, and the scale is applied to
  the output. With per-group scales along the contracted axis (int4 groups of 32, NF4)
  the weight is dequantized in float32 and rounded once to the activation's dtype. A
  bfloat16 / float16 activation ("a16") gives a 16-bit GEMM, float32 a float32 one.
* anything else (mixed formats, block-scaled activations, a weight zero point) is
  emulated: the activation is fake-quantized, the weight dequantized, a float dot.

There is no gradient with respect to a QArray (it holds integers); gradients with respect
to the activation are straight-through.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant._src import formats
from jaxquant._src.dot.capabilities import FP8, Capabilities
from jaxquant._src.dot.scaled import HALF, ScaledDot, quantize_operand, scaled_dot
from jaxquant._src.qarray import QArray, decode, dequantize, unpack
from jaxquant._src.quantize import fake_quant
from jaxquant._src.spec import QuantSpec

Array = jax.Array


def weight_path(lhs_spec: QuantSpec | None, w: QArray, contract: tuple[int, ...]) -> str:
    """Which product :func:`dot_qarray` computes: ``"int8"``, ``"fp8"``, ``"weight_only"``
    (per-channel scales out of the dot), ``"weight_only_dequant"`` or ``"emulate"``."""
    plan = w.spec.granularity.plan(w.shape)
    factored = (
        plan.view == tuple(w.shape)
        and w.zero_point is None
        and all(w.scale.shape[d] == 1 for d in contract)
        and w.spec.format.kind != "mx"
    )
    if lhs_spec is None:
        return "weight_only" if factored else "weight_only_dequant"
    if not factored or not lhs_spec.symmetric or lhs_spec.stochastic:
        return "emulate"
    a, b = lhs_spec.format.name, w.spec.format.name
    if a == b == "int8":
        return "int8"
    if a in FP8 and b in FP8:
        return "fp8"
    return "emulate"


def _grid(w: QArray) -> Array:
    """The weight's stored values on its grid, in the narrowest exact dtype: int8 / fp8 /
    bf16-or-f32 values of sub-byte formats (no scale applied)."""
    spec = w.spec
    values = w.values
    if spec.element.packed:
        values = unpack(values, spec.element.bits, w.shape[-1] if w.shape else 1)
        values = values.reshape(w.shape)
    if values.dtype in (jnp.int8, jnp.int16) or np.dtype(values.dtype).name in FP8:
        return values
    v = decode(values, spec.element)  # float32 grid values (codes through the table)
    exact_bf16 = spec.element.kind in ("int", "float") and spec.element.bits <= 8
    return v.astype(jnp.bfloat16) if exact_bf16 else v


def _out_scale(s: Array, dn: Any, lhs_ndim: int) -> Array:
    """The weight's scale (operand layout, size 1 along contracted axes) laid out like the
    dot's output: batch axes, then lhs free axes (size 1), then rhs free axes."""
    (_, rc), (_, rb) = dn
    free = tuple(i for i in range(s.ndim) if i not in rb and i not in rc)
    t = jnp.transpose(s, (*rb, *free, *rc))
    t = t.reshape(t.shape[: len(rb) + len(free)])
    n_lhs_free = lhs_ndim - len(dn[0][0]) - len(rb)
    return t.reshape((*t.shape[: len(rb)], *(1,) * n_lhs_free, *t.shape[len(rb) :]))


def _compute_dtype(x: Array) -> np.dtype:
    return np.dtype(x.dtype) if np.dtype(x.dtype) in HALF else np.dtype(jnp.float32)


def dot_qarray(
    lhs: Array,
    w: QArray,
    dn: Any,
    precision: Any = None,
    preferred_element_type: Any = None,
    *,
    lhs_spec: QuantSpec | None = None,
    out_sharding: Any = None,
    caps: Capabilities,
) -> Array:
    """``dot_general(Q(lhs), W, dn)`` for a pre-quantized weight ``W`` (module docstring).

    The gradient with respect to ``lhs`` is straight-through (that of ``dot(lhs, W)``
    with the dequantized weight); ``W`` gets none. ``caps``: the backend's capabilities
    (:func:`jaxquant.dot_general` passes its own, so serving lowers like training).
    """
    if not isinstance(lhs, jax.Array | np.ndarray) or not jnp.issubdtype(lhs.dtype, jnp.floating):
        raise TypeError(
            "dot_general: the activation multiplying a QArray must be a floating-point array, "
            f"got {getattr(lhs, 'dtype', type(lhs).__name__)}."
        )
    if lhs_spec is not None and lhs_spec.stochastic:
        raise ValueError(
            "dot_general: a stochastic activation spec needs a key per call; serving uses "
            "rounding='nearest' (spec.replace(rounding='nearest'))."
        )
    if len(dn[0][1]) != len(dn[0][0]):
        raise ValueError(f"dot_general: bad dimension_numbers {dn} for a QArray of {w.shape}.")
    out_dtype = np.dtype(preferred_element_type or lhs.dtype)  # the caller's dtype
    lhs = jnp.asarray(lhs)
    cfg = _Serve(dn, precision, lhs_spec, out_sharding, tuple(lhs.shape), np.dtype(lhs.dtype), caps)
    return _serve_jit(lhs, w, cfg).astype(out_dtype)


class _Serve(NamedTuple):
    dn: Any
    precision: Any
    lhs_spec: QuantSpec | None
    out_sharding: Any
    lhs_shape: tuple[int, ...]
    lhs_dtype: np.dtype
    caps: Capabilities


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _serve(lhs: Array, w: QArray, cfg: _Serve) -> Array:
    return _forward(lhs, w, cfg)


def _serve_fwd(lhs: Array, w: QArray, cfg: _Serve):
    return _forward(lhs, w, cfg), w


def _serve_bwd(cfg: _Serve, w, g):
    wd = dequantize(w, jnp.float32)
    f = lambda x: lax.dot_general(x, wd, cfg.dn, cfg.precision)
    (dx,) = jax.linear_transpose(f, jax.ShapeDtypeStruct(cfg.lhs_shape, jnp.float32))(
        g.astype(jnp.float32)
    )
    return dx.astype(cfg.lhs_dtype), None


_serve.defvjp(_serve_fwd, _serve_bwd)
# One compiled program for eager and jit callers alike: same fusion, same numerics.
_serve_jit = jax.jit(_serve, static_argnums=2)


def _forward(lhs: Array, w: QArray, cfg: _Serve) -> Array:
    dn, precision, lhs_spec = cfg.dn, cfg.precision, cfg.lhs_spec
    kw = {} if cfg.out_sharding is None else {"out_sharding": cfg.out_sharding}
    path = weight_path(lhs_spec, w, dn[0][1])
    if path in ("int8", "fp8"):
        assert lhs_spec is not None
        return _low_precision_dot(lhs, lhs_spec, w, dn, path, cfg.caps, kw)
    cd = _compute_dtype(lhs)
    p = precision if cd == np.float32 else lax.Precision.DEFAULT
    if path == "weight_only":
        out = lax.dot_general(
            lhs.astype(cd), _grid(w).astype(cd), dn, p, preferred_element_type=jnp.float32, **kw
        )
        return out * _out_scale(w.scale.astype(jnp.float32), dn, lhs.ndim)
    if path == "weight_only_dequant":
        wd = dequantize(w, cd)
        return lax.dot_general(lhs.astype(cd), wd, dn, p, preferred_element_type=jnp.float32, **kw)
    assert lhs_spec is not None
    xq = fake_quant(lhs.astype(jnp.float32), lhs_spec)
    wd = dequantize(w, jnp.float32)
    return lax.dot_general(xq, wd, dn, precision, preferred_element_type=jnp.float32, **kw)


def _low_precision_dot(
    x: Array, lhs_spec: QuantSpec, w: QArray, dn: Any, path: str, caps: Capabilities, kw: dict
) -> Array:
    """The int8 / fp8 product of an activation and the stored weight: the scaled dot of
    training (:func:`jaxquant._src.dot.scaled.scaled_dot`) on the weight's own values."""
    wv = w.values
    if path == "int8":
        store: Any = np.dtype(np.int8)
        real = caps.int8
    else:
        store = lhs_spec.format.storage_dtype
        real = (np.dtype(store).name, np.dtype(wv.dtype).name) in caps.fp8_pairs
    # The device's fp8 rounding only where the pair is a real fp8 GEMM; otherwise the
    # widened pair below needs the integer-emulated rounding's float32 values.
    lowering = dataclasses.replace(
        caps.lowering, native_fp8_cast=caps.lowering.native_fp8_cast and real
    )
    a, sa, _ = quantize_operand(x, lhs_spec, None, None, store, lowering.native_fp8_cast)
    cfg = ScaledDot(lowering, caps.fp8_pairs, precision=None, fp8_via_bf16=True)
    # A bf16 / f16 activation lets cuBLASLt write the fp8 GEMM's output in that dtype.
    out_dtype = x.dtype if np.dtype(x.dtype) in HALF else jnp.float32
    return scaled_dot(a, sa, wv, w.scale.astype(jnp.float32), dn, cfg, out_dtype=out_dtype, **kw)


def grid_values_exact(fmt_name: str, dtype: Any) -> bool:
    """Whether every value of format ``fmt_name`` is exact in ``dtype`` (tests, docs)."""
    table = formats.code_table(formats.get(fmt_name)).astype(np.float64)
    table = table[np.isfinite(table)]
    return bool(np.all(table.astype(dtype).astype(np.float64) == table))
