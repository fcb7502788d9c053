"""The custom VJP of :func:`jaxquant.dot_general`: quantized operands forward, a quantized
cotangent backward, both through the one scaled dot (:mod:`.scaled`).

The backward pass (straight-through for the operands' quantizers) quantizes the incoming
gradient with ``grad_spec`` and runs two products, ``dgrad`` (``dlhs``: the gradient times
``rhs``, contracting ``rhs``'s free axes) and ``wgrad`` (``drhs``: the gradient times
``lhs``, contracting ``lhs``'s free axes). :class:`Backward` says where each product's
operands come from:

* ``QuantConfig.backward="saved"`` (the default): ``dlhs = dot(g_q, rhs_q)`` and
  ``drhs = dot(g_q, lhs_q)`` from the quantized operands saved by the forward pass (in their
  low-precision storage, so the residuals are small);
* ``"requantize"``: an operand with 1-D blocks (``per_block``, MX) is quantized again from
  its float value with its blocks moved to that product's contracted axes -- what a
  block-scaled FP4 / MX GEMM needs -- and the gradient likewise, once per product. Other
  operands (per-tensor, per-channel, 2-D tiles) are reused as saved. Only the float
  operands a product requantizes are kept as residuals.
* a product named in ``QuantConfig.hadamard`` rotates both its operands along its
  contracted axis (:class:`~jaxquant.rotations.DotHadamard`) and quantizes them from float.

Each backward dot factors its scales out like the forward one when they are constant along
*its* contracted axes (per-tensor scales always are); when they are not -- a
per-output-channel weight scale lies along the axis ``dlhs`` contracts -- that factor is
dequantized and the dot is a float32 one.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant._src.dot.capabilities import FP8, Capabilities, DimensionNumbers
from jaxquant._src.dot.checks import bind_operand
from jaxquant._src.dot.scaled import ScaledDot, quantize_operand, scaled_dot, transpose_dot
from jaxquant._src.granularity import PerBlock
from jaxquant._src.hadamard import DotHadamard, HadamardRotation
from jaxquant._src.spec import QuantSpec

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Gemm:
    """Where one backward product's operands come from (static).

    ``g_spec``: the gradient's spec in this product (bound to its axes), ``y_spec``: the
    other operand's (``rhs`` for dgrad, ``lhs`` for wgrad) when it is quantized again from
    its float value (``requant``); otherwise the forward's quantized operand is reused.
    ``rot``: the (gradient axis, operand axis) pair rotated by the config's Hadamard
    transform, or None.
    """

    g_spec: QuantSpec | None
    g_store: np.dtype | None
    y_spec: QuantSpec | None
    y_store: np.dtype | None
    requant: bool
    rot: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True)
class Backward:
    """The backward plan of a quantized dot: its two products and the forward's rotation.

    ``fwd_rot``: the (lhs axis, rhs axis) pair rotated in the forward product, or None.
    ``hadamard``: the transform (its signs), or None when nothing is rotated.
    """

    dgrad: Gemm
    wgrad: Gemm
    fwd_rot: tuple[int, int] | None = None
    hadamard: DotHadamard | None = None
    # Why the backward products cannot run (a rotated or re-blocked axis that the block
    # does not divide), raised when the backward pass is traced: a forward-only call
    # (evaluation on a batch of any size) runs, a gradient never silently does.
    error: str | None = None

    @property
    def shared_grad(self) -> bool:
        """Both products multiply the same quantized gradient (quantized once)."""
        d, w = self.dgrad, self.wgrad
        return d.rot is None and w.rot is None and d.g_spec == w.g_spec


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
    # Where the backward products' operands come from; None: the forward's quantized ones
    # (QuantConfig.backward="saved" without Hadamard transforms).
    backward: Backward | None = None

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
        backward: Backward | None = None,
    ) -> DotConfig:
        """The config of a checked call: ``specs`` of (lhs, rhs, grad), ``dtypes`` of
        (lhs, rhs, output); storage and fp8 pairs follow ``mode`` and ``caps``;
        ``backward`` from :func:`plan_backward` (None: the saved operands)."""
        lhs_spec, rhs_spec, grad_spec = specs
        lhs_dtype, rhs_dtype, out_dtype = (np.dtype(d) for d in dtypes)
        return cls(
            dn=dn,
            lhs_spec=lhs_spec,
            rhs_spec=rhs_spec,
            grad_spec=grad_spec,
            lhs_store=store_dtype(lhs_spec, mode, caps),
            rhs_store=store_dtype(rhs_spec, mode, caps),
            grad_store=store_dtype(grad_spec, mode, caps),
            dot=ScaledDot(caps.lowering, caps.fp8_pairs_for(mode), precision),
            out_dtype=out_dtype,
            lhs_dtype=lhs_dtype,
            rhs_dtype=rhs_dtype,
            out_sharding=out_sharding,
            ste=ste,
            backward=backward,
        )


def _free(ndim: int, *taken: tuple[int, ...]) -> tuple[int, ...]:
    skip = {a for t in taken for a in t}
    return tuple(i for i in range(ndim) if i not in skip)


def _rot_axis(
    gemm: str, shapes: dict[str, tuple[int, ...]], axes: dict[str, tuple[int, ...]], block: int
) -> tuple[int, int]:
    """The (first, second) operand axes a ``gemm`` rotates: the innermost pair it contracts,
    each checked to be a multiple of ``block``."""
    (a, ax_a), (b, ax_b) = axes.items()
    if not ax_a:
        raise ValueError(
            f"dot_general: hadamard rotates the {gemm!r} product along its contracted axis, "
            f"but it contracts none ({a} of shape {shapes[a]} has no such axis: an outer "
            f"product). Drop {gemm!r} from DotHadamard.gemms for this layer."
        )
    i = max(range(len(ax_a)), key=lambda j: ax_a[j])
    pair = (ax_a[i], ax_b[i])
    for name, axis in zip((a, b), pair, strict=True):
        n = shapes[name][axis]
        if n % block:
            raise ValueError(
                f"dot_general: hadamard rotates the {gemm!r} product along {name}'s axis "
                f"{axis} (shape {shapes[name]}), of length {n}, which is not a multiple of the "
                f"Hadamard block {block}. Use a smaller block that divides {n} "
                f"(DotHadamard(block=...)), drop {gemm!r} from DotHadamard.gemms, or keep "
                "this layer in high precision."
            )
    return pair


def plan_backward(
    dn: DimensionNumbers,
    shapes: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]],
    specs: tuple[QuantSpec | None, QuantSpec | None, QuantSpec | None],
    *,
    backward: str,
    hadamard: DotHadamard | None,
    mode: str,
    caps: Capabilities,
    scales: tuple[bool, bool, bool],
    fn: str = "dot_general",
) -> Backward | None:
    """The :class:`Backward` plan of a checked call (None: the forward's quantized operands,
    ``backward="saved"`` without Hadamard transforms). ``shapes`` and ``specs`` of (lhs, rhs,
    output gradient), the specs bound to the forward product; ``scales``: whether
    ``lhs_scale`` / ``rhs_scale`` / ``grad_scale`` were given.

    Raises:
      ValueError: the forward product's rotated axis is not a multiple of the Hadamard
        block, or it contracts nothing to rotate. The same faults of a backward product (and
        a given scale of an operand whose blocks move) are recorded in
        :attr:`Backward.error` and raised when the backward pass is traced, so that a
        forward-only call (evaluation on a batch whose size the block does not divide) runs.
    """
    if backward == "saved" and hadamard is None:
        return None
    lhs_shape, rhs_shape, out_shape = shapes
    grad_spec = specs[2]
    (lc, rc), _ = dn
    named = {"lhs": lhs_shape, "rhs": rhs_shape, "the output gradient": out_shape}
    fwd_rot = None
    if hadamard is not None and "fwd" in hadamard.gemms:
        fwd_rot = _rot_axis("fwd", named, {"lhs": lc, "rhs": rc}, hadamard.block)
    try:
        return _plan_products(
            dn, shapes, specs, backward, hadamard, mode, caps, scales, fn, fwd_rot
        )
    except ValueError as e:
        saved = Gemm(grad_spec, store_dtype(grad_spec, mode, caps), None, None, False)
        return Backward(saved, saved, fwd_rot, hadamard, error=str(e))


def _plan_products(
    dn: DimensionNumbers,
    shapes: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]],
    specs: tuple[QuantSpec | None, QuantSpec | None, QuantSpec | None],
    backward: str,
    hadamard: DotHadamard | None,
    mode: str,
    caps: Capabilities,
    scales: tuple[bool, bool, bool],
    fn: str,
    fwd_rot: tuple[int, int] | None,
) -> Backward:
    """:func:`plan_backward`'s two backward products."""
    lhs_shape, rhs_shape, out_shape = shapes
    lhs_spec, rhs_spec, grad_spec = specs
    (lc, rc), (lb, rb) = dn
    lf, rf = _free(len(lhs_shape), lc, lb), _free(len(rhs_shape), rc, rb)
    nb = len(lb)
    out_b = tuple(range(nb))
    out_lf = tuple(range(nb, nb + len(lf)))
    out_rf = tuple(range(nb + len(lf), len(out_shape)))
    gemms = () if hadamard is None else hadamard.gemms
    block = 0 if hadamard is None else hadamard.block
    named = {"lhs": lhs_shape, "rhs": rhs_shape, "the output gradient": out_shape}
    dgrad_rot = wgrad_rot = None
    if "dgrad" in gemms:  # dgrad contracts rhs's free axes (the output's last axes)
        g_rhs = _rot_axis("dgrad", named, {"rhs": rf, "the output gradient": out_rf}, block)
        dgrad_rot = (g_rhs[1], g_rhs[0])
    if "wgrad" in gemms:  # wgrad contracts lhs's free axes (the tokens)
        g_lhs = _rot_axis("wgrad", named, {"lhs": lf, "the output gradient": out_lf}, block)
        wgrad_rot = (g_lhs[1], g_lhs[0])
    requantize = backward == "requantize"
    given = dict(zip(("lhs", "rhs", "grad"), scales, strict=True))

    def moved(spec, shape, contract, batch, name, who):
        """``spec`` with its 1-D blocks along this product's contracted axes (requantize)."""
        if spec is None or not requantize or not isinstance(spec.granularity, PerBlock):
            return spec, False
        if given[who]:
            raise ValueError(
                f"{fn}: backward='requantize' moves the blocks of {name} to the backward "
                f"product's contracted axes, so the given {who}_scale (one per forward block) "
                f"does not fit them. Drop {who}_scale, or use backward='saved'."
            )
        layout = spec.replace(granularity=PerBlock(None, spec.granularity.size))
        return bind_operand(layout, shape, contract, batch, name, fn), True

    g_d, _ = moved(grad_spec, out_shape, out_rf, out_b, "the gradient (dgrad)", "grad")
    g_w, _ = moved(grad_spec, out_shape, out_lf, out_b, "the gradient (wgrad)", "grad")
    y_d, moved_d = moved(rhs_spec, rhs_shape, rf, rb, "rhs (dgrad)", "rhs")
    y_w, moved_w = moved(lhs_spec, lhs_shape, lf, lb, "lhs (wgrad)", "lhs")

    def gemm(g_spec, y_spec, moved_y, rot):
        requant = moved_y or rot is not None
        return Gemm(
            g_spec,
            store_dtype(g_spec, mode, caps),
            y_spec if requant else None,
            store_dtype(y_spec, mode, caps) if requant else None,
            requant,
            rot,
        )

    return Backward(
        gemm(g_d, y_d, moved_d, dgrad_rot),
        gemm(g_w, y_w, moved_w, wgrad_rot),
        fwd_rot,
        hadamard,
    )


def store_dtype(spec: QuantSpec | None, mode: str, caps: Capabilities) -> np.dtype | None:
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


def _rotate(x: Array, axis: int, r: HadamardRotation, inverse: bool = False) -> Array:
    """``x`` rotated blockwise along ``axis`` in float32 (the quantizer's input precision)."""
    x = x.astype(jnp.float32) if x.dtype != jnp.float64 else x
    return r.inverse(x, axis=axis) if inverse else r.apply(x, axis=axis)


def _rotation(cfg: DotConfig) -> HadamardRotation | None:
    b = cfg.backward
    return None if b is None or b.hadamard is None else b.hadamard.rotation()


def _fwd_impl(cfg: DotConfig, lhs, rhs, lhs_scale, rhs_scale, grad_scale, key):
    kl, kr, kg = _keys(key)
    nc = cfg.dot.lowering.native_fp8_cast
    clip = cfg.ste == "clipped"
    b, r = cfg.backward, _rotation(cfg)
    lx, rx = lhs, rhs
    if b is not None and b.fwd_rot is not None and r is not None:
        lx, rx = _rotate(lhs, b.fwd_rot[0], r), _rotate(rhs, b.fwd_rot[1], r)
    lv, ls, lmask = quantize_operand(lx, cfg.lhs_spec, kl, lhs_scale, cfg.lhs_store, nc, clip)
    rv, rs, rmask = quantize_operand(rx, cfg.rhs_spec, kr, rhs_scale, cfg.rhs_store, nc, clip)
    out = scaled_dot(lv, ls, rv, rs, cfg.dn, cfg.dot, cfg.out_sharding, cfg.out_dtype)
    out = out.astype(cfg.out_dtype)
    if b is None:
        saved = (lv, ls, rv, rs, None, None)
    else:
        # Keep what the backward products read: the float operand where one requantizes
        # it, the forward's quantized one where one reuses it.
        lq = (lv, ls) if not b.wgrad.requant else (None, None)
        rq = (rv, rs) if not b.dgrad.requant else (None, None)
        saved = (*lq, *rq, lhs if b.wgrad.requant else None, rhs if b.dgrad.requant else None)
    scales = (lhs_scale, rhs_scale, grad_scale)
    return out, (*saved, scales, (kl, kr, kg), (lmask, rmask))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _qdot(cfg: DotConfig, lhs, rhs, lhs_scale, rhs_scale, grad_scale, key):
    return _fwd_impl(cfg, lhs, rhs, lhs_scale, rhs_scale, grad_scale, key)[0]


def _qdot_fwd(cfg: DotConfig, lhs, rhs, lhs_scale, rhs_scale, grad_scale, key):
    return _fwd_impl(cfg, lhs, rhs, lhs_scale, rhs_scale, grad_scale, key)


def _grad_operand(cfg: DotConfig, g, gemm: Gemm, key, scale, r):
    """The output gradient as one backward product multiplies it (rotated, quantized)."""
    if gemm.rot is not None and r is not None:
        g = _rotate(g, gemm.rot[0], r)
    if gemm.g_spec is None:
        return g, None
    nc = cfg.dot.lowering.native_fp8_cast
    return quantize_operand(g, gemm.g_spec, key, scale, gemm.g_store, nc)[:2]


def _masked(d: Array, mask: Array | None, axis: int | None, r, rotated: bool) -> Array:
    """The cotangent of an operand from that of its (maybe rotated) quantizer input: the
    clipped-STE mask applies where the operand was quantized (the rotated space of a
    rotated forward product), then ``R^T`` brings it back to the operand's own axes."""
    if axis is None or r is None:  # no forward rotation
        return d if mask is None else jnp.where(mask, d, 0.0)
    if mask is not None:
        if not rotated:
            d = _rotate(d, axis, r)
        d = jnp.where(mask, d, 0.0)
        rotated = True
    return _rotate(d, axis, r, inverse=True) if rotated else d


def _qdot_bwd(cfg: DotConfig, res, g):
    lv, ls, rv, rs, lf, rf, (lhs_scale, rhs_scale, grad_scale), (kl, kr, kg), masks = res
    lmask, rmask = masks
    nc = cfg.dot.lowering.native_fp8_cast
    b, r = cfg.backward, _rotation(cfg)
    if b is not None and b.error is not None:
        raise ValueError(b.error)
    if b is None:  # the forward's quantized operands and one quantized gradient
        b = Backward(
            Gemm(cfg.grad_spec, cfg.grad_store, None, None, False),
            Gemm(cfg.grad_spec, cfg.grad_store, None, None, False),
        )
    (lc, rc), (lb, rb) = cfg.dn
    d, w = b.dgrad, b.wgrad
    lhs_ndim = (lv if lv is not None else lf).ndim
    rhs_ndim = (rv if rv is not None else rf).ndim
    gd, gds = _grad_operand(cfg, g, d, kg, grad_scale, r)
    if b.shared_grad:
        gw, gws = gd, gds
    else:
        kw = None if kg is None else jax.random.fold_in(kg, 1)
        gw, gws = _grad_operand(cfg, g, w, kw, grad_scale, r)
    # dgrad: the gradient times rhs (the forward's, or rhs requantized for this product).
    if d.requant:
        y = _rotate(rf, d.rot[1], r) if d.rot is not None and r is not None else rf
        ky = None if kr is None else jax.random.fold_in(kr, 1)
        rv, rs, _ = quantize_operand(y, d.y_spec, ky, rhs_scale, d.y_store, nc)
    dlhs = transpose_dot(
        gd,
        gds,
        rv,
        rs,
        cfg.dn,
        lhs_ndim,
        cfg.dot,
        swap_ans=False,
        out_dtype=cfg.lhs_dtype,
        y_dtype=cfg.rhs_dtype,
        y_spec=d.y_spec if d.requant else cfg.rhs_spec,
    )
    # wgrad: the gradient times lhs.
    if w.requant:
        y = _rotate(lf, w.rot[1], r) if w.rot is not None and r is not None else lf
        kx = None if kl is None else jax.random.fold_in(kl, 1)
        lv, ls, _ = quantize_operand(y, w.y_spec, kx, lhs_scale, w.y_store, nc)
    swapped = ((rc, lc), (rb, lb))
    drhs = transpose_dot(
        gw,
        gws,
        lv,
        ls,
        swapped,
        rhs_ndim,
        cfg.dot,
        swap_ans=True,
        out_dtype=cfg.rhs_dtype,
        y_dtype=cfg.lhs_dtype,
        y_spec=w.y_spec if w.requant else cfg.lhs_spec,
    )
    fl, fr = (None, None) if b.fwd_rot is None else b.fwd_rot
    dlhs = _masked(dlhs, lmask, fl, r, rotated=not d.requant)
    drhs = _masked(drhs, rmask, fr, r, rotated=not w.requant)
    return dlhs.astype(cfg.lhs_dtype), drhs.astype(cfg.rhs_dtype), None, None, None, None


_qdot.defvjp(_qdot_fwd, _qdot_bwd)
# One compiled program for eager and jit callers alike.
qdot_jit = jax.jit(_qdot, static_argnums=0)
