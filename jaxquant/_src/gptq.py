"""GPTQ: one layer's weight rounded column by column, each column's error compensated by the
columns not yet rounded (Frantar et al. 2022, https://arxiv.org/abs/2210.17323, Algorithm 1).

The layer computes ``y = x @ W`` with ``W`` of shape ``(in, out)`` (more generally: ``W``
contracted over some of its axes, the *input* axes, flattened row-major into ``in`` input
channels, e.g. a ``(heads, head_dim, out)`` kernel over ``(0, 1)``). Given the Hessian of
the layer's squared output error, ``H = 2 X^T X`` over calibration inputs ``X`` of shape
``(samples, in)``, GPTQ rounds the input channels (the rows of ``W``, the "columns" of the
paper's ``W^T``) one at a time onto the target grid and spreads each one's rounding error
over the channels after it, in proportion to the upper Cholesky factor ``U`` of
``H^{-1}`` (``H^{-1} = U^T U``):

    q_i  = round(w_i)                       on the spec's grid, with its scale
    e_i  = (w_i - q_i) / U_ii
    w_j -= U_ij * e_i        for j > i      (the optimal update of the remaining weights)

Lazy batches (the paper's section 3, "Lazy Batch-Updates"): channels are processed in blocks
of ``block_size``; inside a block the update above runs on the block only, and the channels
after the block receive the block's updates at once, ``W[after] -= U[block, after]^T E``,
one matrix product per block. That is the same arithmetic in another order (no
approximation). A group's scale needs the current values of channels that may lie after the
block: those get the block's pending update ``- U[block, j]^T E`` added on the fly, so the
group scales equal a column-by-column run's, not the block-start values the reference code
reads when a group starts inside a block.

Conventions fixed here:

* **Hessian scale.** ``H``'s overall scale does not matter: ``X^T X`` and ``2 X^T X`` (or a
  mean over samples) give the same codes. Damping is relative (``damping * mean(diag H)``),
  ``U`` scales as ``c^-1/2`` for ``H -> c H`` and ``e_i * U_ij`` is unchanged. The losses
  reported scale with ``H``.
* **Damping.** ``damping * mean(diag H)`` is added to the diagonal (the reference's
  ``percdamp``, default 1%); ``damping_reference="median"`` uses ``median(diag H)``
  instead, which a few outlier input channels cannot inflate: on the outlier byte LM
  (``tests/ptq_testbed.py``) int4 per-channel GPTQ's loss increase falls from +0.081 to
  +0.024 nats/byte (+0.010 with act order), int3's from +0.131 to +0.056, and on the plain
  model int4's from +0.0027 to +0.0016 (measured 2026-12-06). A small value follows the
  data more closely but a rank-deficient ``H`` (fewer samples than inputs, or collinear
  inputs) needs enough of it to be positive definite; a Cholesky that fails is a
  ValueError naming the layer.
* **Dead inputs.** An input whose ``H_ii == 0`` never saw a nonzero value: its weights are
  set to 0 and ``H_ii`` to 1, as the reference implementation does (any value is exact for
  an input that is always 0).
* **Activation order** (``act_order=True``): channels are processed by descending
  ``diag H`` (after the dead-input rule, as the reference; a stable sort: ties keep their
  order), so the most active inputs are rounded
  while the most channels remain to absorb their error; the codes are put back in the
  original order at the end. Scale groups stay the *original* contiguous channels (the
  QArray's ``per_block`` layout): a group's scale is computed when the loop reaches the
  first of its channels in processing order, from the current values of all its channels
  (none of which is rounded yet). Without ``act_order`` this is the paper's group rule.
* **Scales.** The spec's own quantizer sets them, so GPTQ's grid is exactly round-to-nearest's:
  a granularity that shares a scale across the input axis (``per_tensor``, ``per_channel``
  of the output axes) takes its scales from the whole original weight first, as RTN does
  (before dead inputs are zeroed, the reference's order); one
  whose groups lie along the input axis (``per_block(input_axis, g)``, MX formats blocked
  along the input axis) computes each group's scale when the loop reaches it, from the
  updated weights; one whose groups lie inside one input channel (``per_block`` along an
  output axis, ``per_channel`` of the input axis) computes them channel by channel, from the
  channel's updated values. Codes are rounded by :func:`quantize.round_scaled` on
  :func:`quantize.scale_input` of the column, the same functions ``jq.quantize`` uses.
  (``QuantSpec("mxfp4")`` blocks the *last* axis by default: on an ``(in, out)`` kernel
  that is the output axis. ``per_block(32)`` binds to the input axis, as MX matmuls block.)
* **Stochastic rounding** (``rounding="stochastic"``, ``key=``): each weight gets its own
  noise when its channel is rounded; the error compensation sees the rounded value.

With a diagonal ``H`` (uncorrelated inputs) every update is exactly 0 and GPTQ returns
``jq.quantize(w, spec)`` bit for bit.

Memory: ``O(in^2 + in * out)`` float32 (``U``, the weight, codes and per-element scales).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant._src import granularity as gran
from jaxquant._src import layout
from jaxquant._src.calibration import TWN
from jaxquant._src.checks import check_bool, check_int, check_real, describe
from jaxquant._src.qarray import QArray, check_array
from jaxquant._src.quantize import (
    check_key,
    check_spec,
    from_codes,
    noise_bits,
    quantize_core,
    round_scaled,
    scale_input,
    scale_input_qmax,
    to_float32,
    to_grid,
)
from jaxquant._src.spec import QuantSpec

Array = jax.Array
_HI = lax.Precision.HIGHEST  # GPU matmuls would otherwise run in TF32: the updates need f32


class GPTQResult(NamedTuple):
    """What :func:`gptq` returns.

    ``loss`` and ``rtn_loss`` are the layer's proxy output error
    ``tr((W - Q)^T H (W - Q))`` with the caller's (undamped) ``H`` -- ``||X W - X Q||^2``
    when ``H = X^T X`` -- for GPTQ's ``Q`` and for round-to-nearest's
    (``jq.quantize(w, spec)`` with nearest rounding); both scale with ``H``.

    Example:
      >>> import jax, jaxquant as jq
      >>> x = jax.random.normal(jax.random.key(0), (256, 32))
      >>> x = x @ jax.random.normal(jax.random.key(1), (32, 32))  # correlated inputs
      >>> w = jax.random.normal(jax.random.key(2), (32, 16))
      >>> r = jq.ptq.gptq_solve(w, x.T @ x, jq.QuantSpec("int3", jq.per_channel(1)))
      >>> bool(r.loss < r.rtn_loss), bool(r.ok)  # GPTQ's output error below RTN's
      (True, True)
    """

    qarray: QArray  # the same kind of QArray as jq.quantize(w, spec)
    loss: Array  # float32 scalar: tr((W - Q)^T H (W - Q)), GPTQ's Q
    rtn_loss: Array  # float32 scalar: the same for round-to-nearest
    damp: Array  # float32 scalar: the value added to diag(H)
    dead: Array  # int32 scalar: inputs with H_ii == 0 (weights set to 0)
    ok: Array  # bool scalar: inputs finite and the damped H positive definite


def _extents(g: gran.Granularity, shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    """How many indices of each contracted axis (in ``axes`` order) one scale group spans:
    the axis length where the granularity shares a scale along it, the block size where it
    blocks it, 1 where every index has its own scale."""
    if isinstance(g, gran.PerBlock2D):
        # A tile's one scale spans several output columns, which GPTQ updates one input
        # row at a time: the scales would move under it. Refused, never approximated.
        raise ValueError(
            f"gptq: {g} (2-D tiles) is not supported; quantize the weight per_block along "
            "its input axis (e.g. per_block(0, 16)) or per_channel for GPTQ, or use "
            "round-to-nearest (jq.quantize) for tiles."
        )
    plan = g.plan(shape)
    b = g.axis % len(shape) if isinstance(g, gran.PerBlock) and g.axis is not None else None
    out = []
    for a in axes:
        if a == b:
            assert isinstance(g, gran.PerBlock)
            out.append(g.size)
            continue
        view_axis = a if b is None or a < b else a + 1  # a blocked view splits axis b in two
        out.append(shape[a] if view_axis in plan.reduce_axes else 1)
    return tuple(out)


def _group_size(extents: tuple[int, ...], lengths: tuple[int, ...]) -> int | None:
    """Input channels per scale group when the groups are contiguous runs of the flattened
    input axis (``X^T X``'s order: the contracted axes row-major), else None. Contiguous:
    whole axes after the first axis a group spans more than one index of."""
    first = next((j for j, e in enumerate(extents) if e > 1), len(extents))
    if any(e != n for e, n in zip(extents[first + 1 :], lengths[first + 1 :], strict=True)):
        return None
    return math.prod(extents)


def _upper_cholesky_of_inverse(h: Array) -> Array:
    """Upper ``U`` with ``h^{-1} = U^T U``, without forming ``h^{-1}``.

    With ``J`` the reversal permutation and ``J h J = L L^T``: ``h^{-1} = U^T U`` for
    ``U = J L^{-1} J``, upper triangular with a positive diagonal (the unique factor the
    reference gets from ``cholesky(inverse(h), upper=True)``). One Cholesky and one
    triangular solve instead of two Choleskys and an inverse.
    """
    n = h.shape[0]
    lower = jnp.linalg.cholesky(h[::-1, ::-1])
    linv = jax.scipy.linalg.solve_triangular(lower, jnp.eye(n, dtype=h.dtype), lower=True)
    return jnp.triu(linv[::-1, ::-1])


def gptq(
    w: jax.typing.ArrayLike,
    hessian: jax.typing.ArrayLike,
    spec: QuantSpec,
    *,
    block_size: int = 128,
    damping: float = 0.01,
    damping_reference: Literal["mean", "median"] = "mean",
    act_order: bool = False,
    contract_axis: int | tuple[int, ...] = 0,
    key: Array | None = None,
    name: str | None = None,
) -> GPTQResult:
    """Quantize one layer's weight with GPTQ onto any jaxquant format.

    Rounds the input channels of ``w`` one at a time onto ``spec``'s grid and compensates
    each channel's rounding error in the channels not yet rounded, weighted by the inverse
    Hessian of the layer's output error (Frantar et al. 2022, Algorithm 1; see this module's
    docstring for the maths and the conventions on damping, dead inputs, activation order
    and scale groups). Everything runs in one compiled program (``lax.fori_loop`` over
    blocks and channels).

    Args:
      w: the weight, contracted with the layer's input over ``contract_axis`` (a Dense
        kernel ``(in, out)``: axis 0). Any floating dtype; computed in float32.
      hessian: ``(in, in)``, ``X^T X`` (or ``2 X^T X``: the scale does not matter) over
        calibration inputs ``X`` of shape ``(samples, in)``, accumulated in float32.
      spec: the target :class:`QuantSpec`: any format (int2..int8 symmetric or asymmetric,
        nf4, fp4, fp8, MX ...) and granularity; ``per_channel()`` / ``per_block(size)`` are
        bound to ``w``'s layout with ``contract_axis`` as the contraction. ``twn()``
        calibration is refused (it does not round to the nearest grid point).
      block_size: channels per lazy batch (any positive int; need not divide ``in``).
      damping: fraction of ``mean(diag H)`` added to ``H``'s diagonal (>= 0).
      damping_reference: ``"mean"`` (the paper's) or ``"median"`` of ``diag H``: what
        ``damping`` is a fraction of (the median resists outlier channels; see above).
      act_order: process channels by descending ``diag H``.
      contract_axis: the input axis of ``w``, or a tuple of them (a ``DenseGeneral``
        kernel ``(heads, head_dim, out)`` contracted over ``(0, 1)``): the Hessian's inputs
        are these axes flattened row-major in the order given. Scale groups along them must
        be contiguous in that order (blocks of the last one, or shared across all of them).
      key: PRNG key, for ``rounding="stochastic"`` specs.
      name: the layer's name, for error messages.

    Returns:
      A :class:`GPTQResult`: ``qarray`` (the same kind of QArray ``jq.quantize(w, spec)``
      returns: scale shape, spec and layout), ``loss`` / ``rtn_loss``
      (``tr((W - Q)^T H (W - Q))`` for GPTQ and round-to-nearest), ``damp``, ``dead``,
      ``ok``.

    Raises:
      ValueError: shapes that do not match, non-finite ``w`` or ``hessian``, an all-zero
        ``hessian`` (no calibration data reached the layer), a negative diagonal, or a
        damped Hessian that is not positive definite (suggesting a larger ``damping``).
        Under an outer ``jax.jit`` or ``vmap`` the values cannot be checked: read
        ``result.ok`` instead.
      TypeError: arguments of the wrong type.

    Example:
      >>> import jax, jax.numpy as jnp, jaxquant as jq
      >>> kx, kw = jax.random.split(jax.random.key(0))
      >>> x = jax.random.normal(kx, (256, 16)) @ jax.random.normal(kx, (16, 16))
      >>> w = jax.random.normal(kw, (16, 8))
      >>> spec = jq.QuantSpec("int4", jq.per_channel(1))
      >>> r = jq.ptq.gptq_solve(w, x.T @ x, spec)
      >>> r.qarray.scale.shape == jq.quantize(w, spec).scale.shape
      True
      >>> bool(r.loss < 0.5 * r.rtn_loss)  # the layer's output error, vs round-to-nearest
      True

    References:
      Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
      Generative Pre-trained Transformers", https://arxiv.org/abs/2210.17323
    """
    if name is not None and not isinstance(name, str):
        raise TypeError(f"gptq: name must be a str or None, got {describe(name)}.")
    fn = "gptq" if name is None else f"gptq (layer {name!r})"
    w = check_array(w, f"{fn}: w", floating=True)
    h = check_array(hessian, f"{fn}: hessian", floating=True)
    spec = check_spec(spec, fn)
    if w.ndim == 0:
        raise ValueError(f"{fn}: w is a scalar; it must have an input axis (a Dense kernel).")
    axes = _contract_axes(contract_axis, w.ndim, fn)
    lengths = tuple(w.shape[a] for a in axes)
    n = math.prod(lengths)
    if w.size == 0:
        raise ValueError(f"{fn}: w of shape {tuple(w.shape)} is empty; nothing to quantize.")
    if h.shape != (n, n):
        order = "" if len(axes) == 1 else f", axes {axes} flattened row-major"
        raise ValueError(
            f"{fn}: hessian has shape {tuple(h.shape)}, expected ({n}, {n}): X^T X over the "
            f"{n} inputs of w (shape {tuple(w.shape)}, contract_axis={contract_axis}{order})."
        )
    block_size = check_int(block_size, f"{fn}: block_size", lo=1)
    damping = check_real(
        damping, f"{fn}: damping", ge=0.0, hint="It is a fraction of mean(diag H), e.g. 0.01."
    )
    if damping_reference not in ("mean", "median"):
        raise ValueError(
            f"{fn}: damping_reference must be 'mean' (the paper's) or 'median', got "
            f"{damping_reference!r}."
        )
    act_order = check_bool(act_order, f"{fn}: act_order")
    if gran.follows_layout(spec.granularity):
        bound, _ = layout.bind(spec, tuple(w.shape), axes)
        assert bound is not None  # bind returns None only for spec=None
        spec = bound
    if isinstance(spec.calibration, TWN):
        raise ValueError(
            f"{fn}: twn() calibration rounds at its own threshold, not to the nearest grid "
            "point that GPTQ's error compensation assumes; use absmax() (the default) or mse()."
        )
    try:
        spec.granularity.plan(tuple(w.shape))
    except ValueError as err:  # e.g. a block size that does not divide the axis
        raise ValueError(f"{fn}: {err}") from None
    if _group_size(_extents(spec.granularity, tuple(w.shape), axes), lengths) is None:
        raise ValueError(
            f"{fn}: {spec.granularity} groups input channels that are not contiguous in the "
            f"Hessian's order (contracted axes {axes} of {tuple(w.shape)}, flattened "
            "row-major), so GPTQ cannot set a group's scale when it reaches the group. Block "
            f"the innermost contracted axis (per_block({axes[-1]}, size)) or share scales "
            "across all of them (per_channel of the other axes)."
        )
    check_key(spec, key, fn)
    concrete = not any(isinstance(a, jax.core.Tracer) for a in (w, h))
    if concrete:
        _check_values(w, h, fn)
    out = _gptq(
        w,
        h,
        jnp.float32(damping),
        key,
        spec=spec,
        axes=axes,
        block_size=block_size,
        act_order=act_order,
        reference=damping_reference,
    )
    if concrete and not bool(out.ok):
        raise ValueError(
            f"{fn}: the damped Hessian is not (numerically) positive definite: its Cholesky "
            f"factor or the updated weights are not finite (damping={damping:g} added "
            f"{float(out.damp):.3g} to the diagonal). "
            "Too few calibration samples or collinear inputs make X^T X singular: increase "
            f"damping (e.g. damping={max(10 * damping, 0.01):g}) or calibrate on more data."
        )
    return out


def _contract_axes(value: Any, ndim: int, fn: str) -> tuple[int, ...]:
    """``contract_axis`` as a tuple of distinct non-negative axes."""
    many = isinstance(value, tuple | list)
    raw = tuple(value) if many else (value,)
    if not raw:
        raise ValueError(f"{fn}: contract_axis is empty; name the input axis (0 for (in, out)).")
    axes = []
    for a in raw:
        a = check_int(a, f"{fn}: contract_axis")
        if not -ndim <= a < ndim:
            raise ValueError(
                f"{fn}: contract_axis {a} is out of range for w of rank {ndim}; it is the "
                "input axis (0 for a Dense kernel (in, out))."
            )
        axes.append(a % ndim)
    if len(set(axes)) != len(axes):
        raise ValueError(f"{fn}: contract_axis {value!r} names an axis twice.")
    if len(axes) == ndim:
        raise ValueError(
            f"{fn}: contract_axis {value!r} contracts every axis of w; a weight has at least "
            "one output axis."
        )
    return tuple(axes)


def _check_values(w: Array, h: Array, fn: str) -> None:
    wv, hv = np.asarray(w, np.float32), np.asarray(h, np.float32)
    for what, v in (("w", wv), ("hessian", hv)):
        bad = ~np.isfinite(v)
        if bad.any():
            raise ValueError(
                f"{fn}: {what} has {int(bad.sum())} non-finite values (first at index "
                f"{tuple(int(i) for i in np.argwhere(bad)[0])}); GPTQ needs finite weights "
                "and statistics. Check the calibration run for overflow."
            )
    d = np.diagonal(hv)
    if not d.any():
        raise ValueError(
            f"{fn}: hessian is all zero on its diagonal: no calibration data reached this "
            "layer (or every input was 0). Calibrate on data that reaches it, or quantize it "
            "with round-to-nearest (jq.quantize) explicitly."
        )
    if (d < 0).any():
        raise ValueError(
            f"{fn}: hessian has negative diagonal entries (first at input "
            f"{int(np.argmax(d < 0))}: {float(d[d < 0][0]):g}); X^T X has none. Pass the "
            "accumulated X^T X of the layer's inputs."
        )


@functools.partial(
    jax.jit, static_argnames=("spec", "axes", "block_size", "act_order", "reference")
)
def _gptq(
    w: Array,
    h: Array,
    damping: Array,
    key: Array | None,
    *,
    spec: QuantSpec,
    axes: tuple[int, ...],
    block_size: int,
    act_order: bool,
    reference: str = "mean",
) -> GPTQResult:
    shape = tuple(w.shape)
    lengths = tuple(shape[a] for a in axes)
    n = math.prod(lengths)
    other = tuple(d for i, d in enumerate(shape) if i not in axes)
    m = math.prod(other)
    lead = tuple(range(len(axes)))
    plan = spec.granularity.plan(shape)
    det = spec.replace(rounding="nearest")  # scales do not depend on the rounding mode
    asym = not spec.symmetric
    unit = spec.calibration is None  # a plain cast: never multiplied by s = 1 (see quantize)
    qabs = scale_input_qmax(spec)

    def to_work(a: Array) -> Array:  # original layout -> (inputs, rest)
        return jnp.moveaxis(a, axes, lead).reshape(-1, m)

    def from_work(a: Array, rows: tuple[int, ...] = lengths) -> Array:  # the inverse
        return jnp.moveaxis(a.reshape((*rows, *other)), lead, axes)

    def per_element(s: Array, p: gran.Plan) -> Array:
        return to_work(jnp.broadcast_to(s, p.view).reshape(p.shape))

    def dequant(r: Array, s: Array, z: Array) -> Array:
        v = to_grid(r, spec)
        if unit:
            return v
        return (v - z) * s if asym else v * s

    w0 = to_work(to_float32(w))
    hf = h.astype(jnp.float32)
    ok = jnp.all(jnp.isfinite(w0)) & jnp.all(jnp.isfinite(hf))

    # Round-to-nearest: the baseline loss, and the scales of groups spanning the input axis.
    rtn_r, rtn_s, rtn_z, _ = quantize_core(w, det, None, None)
    rtn_z0 = jnp.zeros_like(rtn_s) if rtn_z is None else rtn_z
    rtn_q = dequant(
        to_work(rtn_r.reshape(shape)), per_element(rtn_s, plan), per_element(rtn_z0, plan)
    )

    def proxy_loss(q: Array) -> Array:
        d = w0 - q
        return jnp.sum(d * jnp.dot(hf, d, precision=_HI))

    # Dead inputs (the reference's rule), then damping relative to the mean diagonal.
    diag = jnp.diagonal(hf)
    dead = diag == 0
    hd = hf + jnp.diag(dead.astype(jnp.float32))
    wz = jnp.where(dead[:, None], 0.0, w0)
    diag = jnp.diagonal(hd)  # dead inputs count as 1 here, as in the reference
    damp = damping * (jnp.median(diag) if reference == "median" else jnp.mean(diag))
    hd = hd + damp * jnp.eye(n, dtype=jnp.float32)

    if act_order:
        perm = jnp.argsort(-diag, stable=True)  # descending diag H, ties in order
        invperm = jnp.argsort(perm)
        hd = hd[perm][:, perm]
        wz = wz[perm]
    else:
        perm = invperm = jnp.arange(n)

    bsz = min(block_size, n)
    nb = -(-n // bsz)
    npad = nb * bsz - n  # pad channels after the last: zero weights, identity Hessian
    hp = jnp.pad(hd, ((0, npad), (0, npad))) + jnp.diag(
        jnp.concatenate([jnp.zeros(n), jnp.ones(npad)]).astype(jnp.float32)
    )
    u = _upper_cholesky_of_inverse(hp)
    ok = ok & jnp.all(jnp.isfinite(u))
    wp = jnp.pad(wz, ((0, npad), (0, 0)))

    extents = _extents(spec.granularity, shape, axes)
    g = _group_size(extents, lengths)
    assert g is not None  # checked by gptq()
    if g == n:
        g = 0  # one group spans every input: its scales come from the original weight
    ngroups = n // g if g > 1 else 0
    if g == 0:  # scales of the whole original weight, one row per processed channel
        s_p = jnp.pad(per_element(rtn_s, plan)[perm], ((0, npad), (0, 0)), constant_values=1.0)
        z_p = jnp.pad(per_element(rtn_z0, plan)[perm], ((0, npad), (0, 0)))
    # Groups along the input axis (g > 1): one scale row per group, computed once; the
    # padding channels form an extra group that is marked done. gid: each processed
    # channel's group; gpos: where a group's channels sit in processing order.
    gid = jnp.concatenate([perm // max(g, 1), jnp.full((npad,), ngroups)]).astype(jnp.int32)
    gpos = invperm.reshape(ngroups, g) if g > 1 else jnp.zeros((1, 1), jnp.int32)
    groups = (
        jnp.ones((ngroups + 1, m), jnp.float32),
        jnp.zeros((ngroups + 1, m), jnp.float32),
        jnp.arange(ngroups + 1) >= ngroups,
    )
    bits = noise_bits(spec, key, (n + npad, m))

    def group_scale(cur: Array) -> tuple[Array, Array]:
        """Scale and zero point rows ``(rest,)`` of one group from its current values
        ``(g, rest)``: the spec's own quantizer on the group laid out as ``w``."""
        slab = from_work(cur, extents)
        _, s, z, sp = quantize_core(slab, det, None, None)
        se = per_element(s, sp)[0]  # equal over the group's rows
        return se, (jnp.zeros_like(se) if z is None else per_element(z, sp)[0])

    def block(b: Array, carry: tuple[Any, ...]) -> tuple[Any, ...]:
        wp, r_all, s_all, z_all, groups = carry
        i1 = b * bsz
        w1 = lax.dynamic_slice_in_dim(wp, i1, bsz, 0)
        ub = lax.dynamic_slice_in_dim(u, i1, bsz, 0)  # (bsz, in): the block's rows of U
        u1 = lax.dynamic_slice_in_dim(ub, i1, bsz, 1)
        zeros = jnp.zeros((bsz, m), jnp.float32)

        def column(i: Array, c: tuple[Any, ...]) -> tuple[Any, ...]:
            w1, err1, r1, s1, z1, groups = c
            p = i1 + i
            wi = w1[i]
            if g == 0:
                s, z = s_p[p], z_p[p]
            elif g == 1:  # groups inside this channel: from its current values
                s, z = group_scale(wi[None])
            else:
                k = gid[p]

                def new_group(a: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
                    sg, zg, done = a
                    pos = gpos[k]
                    # Current values: the block's own rows are up to date in w1; rows after
                    # the block still owe the block's pending update.
                    inb = (pos >= i1) & (pos < i1 + bsz)
                    later = wp[pos] - jnp.dot(ub[:, pos].T, err1, precision=_HI)
                    cur = jnp.where(inb[:, None], w1[jnp.clip(pos - i1, 0, bsz - 1)], later)
                    se, ze = group_scale(cur)
                    return sg.at[k].set(se), zg.at[k].set(ze), done.at[k].set(True)

                groups = lax.cond(groups[2][k], lambda a: a, new_group, groups)
                s, z = groups[0][k], groups[1][k]
            y = wi if unit else scale_input(wi, s, qmax=qabs)
            ri = round_scaled(y, spec, None if bits is None else bits[p], z if asym else None)
            e = (wi - dequant(ri, s, z)) / u1[i, i]
            # U1[i, j] is 0 for j < i: the rows already rounded are left as they are.
            w1 = w1 - u1[i][:, None] * e[None, :]
            err1, r1 = err1.at[i].set(e), r1.at[i].set(ri)
            if g:
                s1, z1 = s1.at[i].set(s), z1.at[i].set(z)
            return w1, err1, r1, s1, z1, groups

        init = (w1, zeros, zeros, zeros, zeros, groups)
        _, err1, r1, s1, z1, groups = lax.fori_loop(0, bsz, column, init)
        # The lazy batch update of every later row (rows before the block get U = 0).
        wp = wp - jnp.dot(ub.T, err1, precision=_HI)
        r_all = lax.dynamic_update_slice_in_dim(r_all, r1, i1, 0)
        if g:
            s_all = lax.dynamic_update_slice_in_dim(s_all, s1, i1, 0)
            z_all = lax.dynamic_update_slice_in_dim(z_all, z1, i1, 0)
        return wp, r_all, s_all, z_all, groups

    full = jnp.zeros((n + npad, m), jnp.float32)
    init: tuple[Any, ...]
    if g == 0:  # the scales are known: nothing to record
        init = (wp, full, None, None, groups)
    else:
        init = (wp, full, full, full, groups)
    _, r_all, s_all, z_all, _ = lax.fori_loop(0, nb, block, init)
    if g == 0:
        s_all, z_all = s_p, z_p

    r = r_all[:n][invperm]
    s_el, z_el = s_all[:n][invperm], z_all[:n][invperm]
    q = dequant(r, s_el, z_el)
    loss = proxy_loss(q)
    # A Cholesky that "succeeds" on a numerically singular H can still blow the updates up.
    ok = ok & jnp.isfinite(loss)

    if g == 0:
        scale, zero = rtn_s, rtn_z
    else:  # per-element scales back to the plan's scale shape (equal within a group)
        first = tuple(
            slice(0, 1) if i in plan.reduce_axes else slice(None) for i in range(len(plan.view))
        )
        scale = from_work(s_el).reshape(plan.view)[first]
        zero = from_work(z_el).reshape(plan.view)[first] if asym else None
    return GPTQResult(
        qarray=_qarray(r, scale, zero, spec, from_work, w),
        loss=loss,
        rtn_loss=proxy_loss(rtn_q),
        damp=damp,
        dead=jnp.sum(dead).astype(jnp.int32),
        ok=ok,
    )


def _qarray(
    r: Array,
    scale: Array,
    zero: Array | None,
    spec: QuantSpec,
    from_work: Callable[[Array], Array],
    w: Array,
) -> QArray:
    """A QArray from rounded codes, laid out exactly as ``jq.quantize`` lays them out."""
    return from_codes(from_work(r), scale, zero, spec, tuple(w.shape), w.dtype)
