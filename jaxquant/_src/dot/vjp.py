"""The custom VJP of :func:`jaxquant.dot_general`: quantized operands forward, a quantized
cotangent backward, both through the one scaled dot (:mod:`.scaled`).

The backward pass (straight-through for the operands' quantizers) quantizes the incoming
gradient with ``grad_spec`` and computes ``dlhs = dot(g_q, rhs_q)`` and
``drhs = dot(g_q, lhs_q)`` from the quantized operands saved by the forward pass (in their
low-precision storage, so the residuals are small). Each backward dot factors its scales
out like the forward one when they are constant along *its* contracted axes (per-tensor
scales always are); when they are not -- a per-output-channel weight scale lies along the
axis ``dlhs`` contracts -- that factor is dequantized and the dot is a float32 one.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant._src.dot.capabilities import FP8, Capabilities, DimensionNumbers
from jaxquant._src.dot.scaled import ScaledDot, quantize_operand, scaled_dot, transpose_dot
from jaxquant._src.spec import QuantSpec

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DotConfig:
    """Everything static about one quantized dot (hashable: a jit static argument)."""

    dn: DimensionNumbers
    lhs_spec: QuantSpec | None
    rhs_spec: QuantSpec | None
    grad_spec: QuantSpec | None
    lhs_store: np.dtype | None  # low-precision storage of the operand's values, or None
    rhs_store: np.dtype | None  # (None: float32 grid values, the emulated path)
    grad_store: np.dtype | None
    dot: ScaledDot
    out_dtype: np.dtype
    lhs_dtype: np.dtype
    rhs_dtype: np.dtype
    out_sharding: Any
    ste: str = "plain"  # "plain" or "clipped" (zero gradient where an operand saturated)

    @classmethod
    def build(
        cls,
        dn: DimensionNumbers,
        specs: tuple[QuantSpec | None, QuantSpec | None, QuantSpec | None],
        *,
        mode: str,
        caps: Capabilities,
        precision: Any,
        dtypes: tuple[Any, Any, Any],
        out_sharding: Any,
        ste: str,
    ) -> DotConfig:
        """The config of a checked call: ``specs`` of (lhs, rhs, grad), ``dtypes`` of
        (lhs, rhs, output); storage and fp8 pairs follow ``mode`` and ``caps``."""
        lhs_spec, rhs_spec, grad_spec = specs
        lhs_dtype, rhs_dtype, out_dtype = (np.dtype(d) for d in dtypes)
        return cls(
            dn=dn,
            lhs_spec=lhs_spec,
            rhs_spec=rhs_spec,
            grad_spec=grad_spec,
            lhs_store=_store_dtype(lhs_spec, mode, caps),
            rhs_store=_store_dtype(rhs_spec, mode, caps),
            grad_store=_store_dtype(grad_spec, mode, caps),
            dot=ScaledDot(caps.lowering, caps.fp8_pairs_for(mode), precision),
            out_dtype=out_dtype,
            lhs_dtype=lhs_dtype,
            rhs_dtype=rhs_dtype,
            out_sharding=out_sharding,
            ste=ste,
        )


def _store_dtype(spec: QuantSpec | None, mode: str, caps: Capabilities) -> np.dtype | None:
    """int8 / fp8 storage for the real path, None for float32 grid values."""
    if spec is None or mode == "emulate":
        return None
    name = spec.format.name
    if name == "int8":
        return np.dtype(np.int8) if mode == "real" or caps.int8 else None
    if name in FP8:
        return spec.format.storage_dtype if mode == "real" or caps.fp8 else None
    return None


def _keys(key: Array | None) -> tuple[Array | None, Array | None, Array | None]:
    if key is None:
        return None, None, None
    return tuple(jax.random.fold_in(key, i) for i in range(3))  # type: ignore[return-value]


# ------------------------------------------------------------------------ custom vjp


def _fwd_impl(cfg: DotConfig, lhs, rhs, lhs_scale, rhs_scale, grad_scale, key):
    kl, kr, kg = _keys(key)
    nc = cfg.dot.lowering.native_fp8_cast
    clip = cfg.ste == "clipped"
    lv, ls, lmask = quantize_operand(lhs, cfg.lhs_spec, kl, lhs_scale, cfg.lhs_store, nc, clip)
    rv, rs, rmask = quantize_operand(rhs, cfg.rhs_spec, kr, rhs_scale, cfg.rhs_store, nc, clip)
    out = scaled_dot(lv, ls, rv, rs, cfg.dn, cfg.dot, cfg.out_sharding, cfg.out_dtype)
    out = out.astype(cfg.out_dtype)
    return out, (lv, ls, rv, rs, grad_scale, kg, (lmask, rmask))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _qdot(cfg: DotConfig, lhs, rhs, lhs_scale, rhs_scale, grad_scale, key):
    return _fwd_impl(cfg, lhs, rhs, lhs_scale, rhs_scale, grad_scale, key)[0]


def _qdot_fwd(cfg: DotConfig, lhs, rhs, lhs_scale, rhs_scale, grad_scale, key):
    return _fwd_impl(cfg, lhs, rhs, lhs_scale, rhs_scale, grad_scale, key)


def _qdot_bwd(cfg: DotConfig, res, g):
    lv, ls, rv, rs, grad_scale, kg, (lmask, rmask) = res
    if cfg.grad_spec is not None:
        gv, gs, _ = quantize_operand(
            g, cfg.grad_spec, kg, grad_scale, cfg.grad_store, cfg.dot.lowering.native_fp8_cast
        )
    else:
        gv, gs = g, None
    (lc, rc), (lb, rb) = cfg.dn
    dlhs = transpose_dot(
        gv,
        gs,
        rv,
        rs,
        cfg.dn,
        lv.ndim,
        cfg.dot,
        swap_ans=False,
        out_dtype=cfg.lhs_dtype,
        y_dtype=cfg.rhs_dtype,
        y_spec=cfg.rhs_spec,
    )
    swapped = ((rc, lc), (rb, lb))
    drhs = transpose_dot(
        gv,
        gs,
        lv,
        ls,
        swapped,
        rv.ndim,
        cfg.dot,
        swap_ans=True,
        out_dtype=cfg.rhs_dtype,
        y_dtype=cfg.lhs_dtype,
        y_spec=cfg.lhs_spec,
    )
    if lmask is not None:
        dlhs = jnp.where(lmask, dlhs, 0.0)
    if rmask is not None:
        drhs = jnp.where(rmask, drhs, 0.0)
    return dlhs.astype(cfg.lhs_dtype), drhs.astype(cfg.rhs_dtype), None, None, None, None


_qdot.defvjp(_qdot_fwd, _qdot_bwd)
# One compiled program for eager and jit callers alike.
qdot_jit = jax.jit(_qdot, static_argnums=0)
