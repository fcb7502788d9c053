"""AWQ: activation-aware per-channel weight scales (Lin et al. 2023, arXiv 2306.00978).

A layer computes ``y = X W`` (``X``: rows x ``in`` input channels, ``W``: ``in`` x ``out``
in its matrix view). Weight-only quantization errs most where ``X`` is large, so AWQ scales
the salient input channels up before rounding and the activation down by the same amount:

.. math::

   y \\approx (X \\operatorname{diag}(s)^{-1}) \\, Q(\\operatorname{diag}(s) W),
   \\qquad s_j = \\bar{x}_j^{\\,\\alpha} / \\sqrt{\\max_k \\bar{x}_k^{\\,\\alpha}
   \\min_k \\bar{x}_k^{\\,\\alpha}}

with ``xbar_j = mean_rows |X_j|`` (the channel's mean magnitude over the calibration rows)
and ``alpha`` searched on a grid in ``[0, 1)`` per layer: the one that minimizes the *real*
output error ``|| X W - X diag(s)^-1 Q(diag(s) W) ||^2`` on a sample of the layer's own
inputs (``alpha = 0`` is ``s = 1``: round-to-nearest, so the search never does worse than
RTN on its sample). All alphas of a layer run in one jitted ``vmap``. The optional second
step of the paper (``clip_search``) then shrinks each scale group's clipping range
(``max |w|`` times ``1, 1 - 1/grid, ... , 0.5``) to the value with the least output error of
that group.

Where ``s`` is stored:

* folded into the normalization layer that produces ``X`` (a LayerNorm's / RMSNorm's scale
  and bias divided by ``s``) when every reader of that normalization's output is a layer
  AWQ scales (found by one trace of a Linen model, or given as ``pairs={norm_path: [layer
  paths]}``). Those layers share one ``s``, searched on the sum of their output errors
  (the paper's q / k / v). No cost at inference.
* otherwise as the layer's online input transform (:mod:`jaxquant._src.flax.act_transform`):
  Linen ``variables["ptq"][...layer...]["smooth"] = 1 / s``, NNX ``layer.ptq_smooth``: one
  multiply of the input per call.

Either way the stored float weight becomes ``diag(s) W`` (clipped, with ``clip_search``): the
model computes the same function in float (to float32 rounding; clipping changes it
slightly), and the quantization itself is what follows: round-to-nearest by
:func:`jaxquant.flax.convert`, or GPTQ chained on the result.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jaxquant._src.checks import check_bool, check_int, describe
from jaxquant._src.flax.linen import QuantizedModule
from jaxquant._src.flax.rules import Rule
from jaxquant._src.flax.serve import reversed_spec
from jaxquant._src.flax.statistics import LayerStatistics, layer_statistics
from jaxquant._src.granularity import PerBlock, PerChannel, follows_layout
from jaxquant._src.layout import bind
from jaxquant._src.ptq.fold import LinenStore, NnxStore, check_pairs
from jaxquant._src.ptq.result import PTQResult
from jaxquant._src.ptq.smoothquant import norm_readers
from jaxquant._src.quantize import fake_quant
from jaxquant._src.spec import QuantSpec
from jaxquant._src.types import PyTree

_FN = "awq"
_HI = lax.Precision.HIGHEST  # float32 products on GPU / TPU would otherwise use bf16 passes
# Channels that (almost) never fire get at least this fraction of the largest mean |x|:
# s stays finite and their weights are not scaled to nothing.
_FLOOR = 1e-6
_SHRINK = 0.5  # clip_search tries clipping ranges down to this fraction of max |w|


class _Geom(NamedTuple):
    """How one layer's stored weight maps to its ``(in, out)`` matrix (static)."""

    spec: QuantSpec  # the weight spec in the stored layout (as jq.flax.convert quantizes)
    axes: tuple[int, ...]  # the stored weight's input axes, paired with the channels
    channels: tuple[int, ...]  # their sizes (``in`` is the product)


def awq(
    model: nn.Module | nnx.Module,
    batches: Iterable[Any],
    variables: PyTree = None,
    *,
    rules: Rule | Iterable[Rule] | None = None,
    grid: int = 20,
    max_samples: int = 512,
    clip_search: bool = True,
    fold: bool = True,
    pairs: Mapping[str, Sequence[str]] | None = None,
    call_kwargs: Mapping[str, Any] | None = None,
) -> PTQResult:
    """Activation-aware weight scales (AWQ) for every weight-quantized layer.

    Per layer (or per group of layers reading one normalization's output), with ``X`` a
    uniform sample of ``max_samples`` of its input rows and ``xbar`` its channels' mean
    ``|x|`` over all calibration rows (:func:`jaxquant.flax.layer_statistics`):

    .. math::

       \\alpha^* = \\arg\\min_{\\alpha \\in \\{0, 1/g, \\dots, (g-1)/g\\}}
       \\sum_{\\text{layers}} \\| X W - (X / s_\\alpha) \\, Q(s_\\alpha W) \\|^2,
       \\qquad s_\\alpha = \\bar{x}^\\alpha / \\sqrt{\\max \\bar{x}^\\alpha \\,
       \\min \\bar{x}^\\alpha}

    where ``Q`` is the layer's rule's weight spec, exactly as :func:`jaxquant.flax.convert`
    applies it (any format and granularity: int4 in groups along the input axis is AWQ's
    setting), and ``X / s`` is quantized too when the rule has an activation spec. The
    stored weight becomes ``s W`` and the input ``X / s`` (folded into a normalization layer
    or applied online; see :mod:`jaxquant._src.ptq.awq`), so the float model is unchanged.
    ``clip_search`` then clips each scale group of ``s W`` to the range (``max |w|`` times
    ``1 - i / grid`` for ``i < grid / 2``) with the least output error of that group.
    Qwix's AWQ (``qwix.contrib.awq``) searches the same scale family on an
    activation-weighted weight error, without clipping, and rounds onto the full int grid:
    compare on that grid (``int_grid="full"``; ``benchmarks/README.md``, peers_ptq).

    Args:
      model: the float Linen module (or one from :func:`jaxquant.flax.quantize_model`) or
        NNX module (modified in place).
      batches: calibration inputs, as :func:`jaxquant.flax.layer_statistics` takes them.
      variables: the Linen model's variables (every collection); None for NNX.
      rules: the :class:`jaxquant.flax.Rule` s that quantize the model (the ones given to
        ``quantize_model`` afterwards); only layers with a weight spec are scaled.
      grid: the number of alphas, ``i / grid`` for ``i < grid`` (the paper's 20); also
        sets the clipping grid.
      max_samples: input rows per layer the search evaluates the output error on.
      clip_search: also search each scale group's clipping range (the paper's second
        step, on by default: the scales alone do not beat round-to-nearest on the plain
        byte LM, the clipping search does); for 2-D weights quantized in groups along the
        input axis or per output channel (other layers list why in their report's
        ``"clip"``). ``False`` keeps the float function unchanged by the scales alone.
      fold: fold scales into normalization layers where the graph allows: Linen models
        are traced once (SmoothQuant's ``norm_readers``) and a LayerNorm / RMSNorm whose
        every reader is a layer AWQ scales takes their shared ``s`` (ByteLM: ``ln1`` ->
        ``attn/{q,k,v}``, ``ln2`` -> ``fc1``, ``ln_f`` -> ``head``); the other layers get
        the online transform (their report's ``online_why`` says why). NNX: only the norms
        in ``pairs``. False: every layer gets the online transform.
      pairs: ``{norm_path: [layer paths]}``, instead of the detection: the LayerNorm /
        RMSNorm (with a ``scale`` parameter, and optionally ``bias``) whose output is read
        by exactly those layers and nothing else (ByteLM: ``{"block0/ln1":
        ["block0/attn/q", "block0/attn/k", "block0/attn/v"], "block0/ln2":
        ["block0/fc1"], ...}``); the other layers get the online transform.
      call_kwargs: keyword arguments for every call of the model.

    Returns:
      A :class:`PTQResult`. ``variables``: Linen: new variables (``params`` with the scaled
      weights and folded norms, a ``"ptq"`` collection with the online ``smooth = 1 / s``;
      the input untouched); NNX: the model. ``report[path]``: ``alpha`` (the chosen one),
      ``loss`` (the mean squared output error at it, after clipping) and ``loss_rtn``
      (at ``alpha = 0``, round-to-nearest), both on the sample; ``folded_into`` (the norm
      path or None: online); ``clip`` (``"searched"`` or why not, with ``clip_search``).
      ``skipped[path]``: why a layer the rules quantize was left alone (no weight spec,
      a weight that is not a stored parameter, an existing online Hadamard rotation, no
      calibration row reached it ...).

    Raises:
      ValueError: ``pairs`` naming a layer that is not a scaled layer, a norm without a
        ``scale`` parameter, layers of one pair that do not read the same input, or a layer
        in two pairs; the errors of :func:`~jaxquant.flax.layer_statistics`.
      TypeError: arguments of the wrong type.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxquant as jq
      >>> from jaxquant.flax import Rule, convert, quantize_model
      >>> from jaxquant.ptq import awq
      >>> model = nn.Sequential([nn.Dense(32), nn.relu, nn.Dense(4)])
      >>> x = jax.random.normal(jax.random.key(0), (64, 16)) * jnp.linspace(0.1, 10, 16)[None]
      >>> variables = jax.jit(model.init)(jax.random.key(1), x)
      >>> rules = Rule(".*", weight=jq.QuantSpec("int4", jq.per_block(0, 8)))
      >>> res = awq(model, [x], variables, rules=rules)
      >>> r = res.report["layers_0"]
      >>> 0 <= r["alpha"] < 1, r["loss"] <= r["loss_rtn"]
      (True, True)
      >>> sorted(res.variables["ptq"])  # online transforms: no norm to fold into
      ['layers_0', 'layers_2']
      >>> qmodel = quantize_model(model, rules)
      >>> _ = jax.eval_shape(qmodel.init, jax.random.key(1), x)  # its layers known
      >>> y = jax.jit(qmodel.apply)(convert(qmodel, res.variables), x)  # served: RTN of s W

    References:
      Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and
      Acceleration", https://arxiv.org/abs/2306.00978
    """
    grid = check_int(grid, f"{_FN}: grid", lo=1)
    max_samples = check_int(max_samples, f"{_FN}: max_samples", lo=1)
    clip_search = check_bool(clip_search, f"{_FN}: clip_search")
    fold = check_bool(fold, f"{_FN}: fold")
    given = pairs is not None
    pairs = check_pairs(pairs, _FN) or {}
    if isinstance(batches, Iterable) and not isinstance(
        batches, str | bytes | np.ndarray | jax.Array
    ):
        batches = list(batches)  # used twice: statistics, and the trace that finds the norms
    is_nnx = isinstance(model, nnx.Module)
    if not is_nnx and not isinstance(model, nn.Module):
        raise TypeError(
            f"{_FN}: model must be a Flax Linen or NNX model, got {describe(model)}; pass the "
            "float model (a Linen module with its variables, or an nnx.Module)."
        )
    if rules is None and not isinstance(model, QuantizedModule) and not is_nnx:
        raise ValueError(
            f"{_FN}: pass rules= (the jq.flax.Rule s that quantize the model's weights), or a "
            "model from jq.flax.quantize_model."
        )
    stats = layer_statistics(
        model,
        batches,
        variables,
        rules=rules,
        hessian=False,
        max_samples=max_samples,
        call_kwargs=call_kwargs,
    )
    store = NnxStore(model) if isinstance(model, nnx.Module) else LinenStore(variables)
    if isinstance(store, LinenStore):
        store.vars.setdefault("params", {})  # the result always carries a params collection

    skipped: dict[str, str] = {}
    for path in stats.unreached:
        skipped[path] = "no calibration batch reached its weight contraction"
    for path, why in stats.unsupported.items():
        skipped[path] = f"no input statistics: {why}"
    geoms: dict[str, _Geom] = {}
    for path, st in stats.items():
        problem = _why_not(st, store.transform(path))
        if problem is None:
            geoms[path] = _geom(st, store.weight(path, st.param))
        else:
            skipped[path] = problem

    online_why: dict[str, str] = {}
    if fold and not given:
        if is_nnx:
            online_why = dict.fromkeys(geoms, "NNX: norms are folded only when given in pairs=")
        else:
            inner = model.module if isinstance(model, QuantizedModule) else model
            assert isinstance(inner, nn.Module) and isinstance(batches, list)
            found = norm_readers(inner, variables, batches[0], call_kwargs=call_kwargs)
            pairs, online_why = _detected(found, geoms, stats, store)
    groups = _groups(pairs if fold else {}, geoms, stats, skipped, store)
    alphas = jnp.arange(grid, dtype=jnp.float32) / grid
    ratios = 1.0 - jnp.arange(max(1, int(_SHRINK * grid)), dtype=jnp.float32) / grid
    report: dict[str, dict[str, Any]] = {}
    for norm, members in groups:
        first = stats[members[0]]
        assert first.samples is not None  # max_samples >= 1
        xs = first.samples
        ws = tuple(store.weight(p, stats[p].param) for p in members)
        acts = tuple(_act_spec(stats[p].rule, xs.shape) for p in members)
        gs = tuple(geoms[p] for p in members)
        losses = np.asarray(_alpha_losses(xs, first.mean_abs, ws, alphas, gs, acts))
        best = int(np.argmin(losses.sum(axis=1)))  # ties: the smallest alpha (RTN first)
        alpha = float(alphas[best])
        s = _scales(first.mean_abs, alphas[best])
        for i, p in enumerate(members):
            w = _scale_rows(jnp.asarray(ws[i], jnp.float32), s, gs[i])
            entry: dict[str, Any] = {
                "alpha": alpha,
                "loss": float(losses[best, i]),
                "loss_rtn": float(losses[0, i]),
                "folded_into": norm,
            }
            if norm is None and fold:
                entry["online_why"] = online_why.get(p, "no normalization layer feeds it")
            if clip_search:
                no_clip = _clip_why_not(gs[i], w.ndim)
                if no_clip is None:
                    w, clip_loss = _clip(xs / s[None], w, gs[i], acts[i], ratios)
                    entry["loss"] = float(clip_loss)
                    entry["clip"] = "searched"
                else:
                    entry["clip"] = no_clip
            store.set_weight(p, stats[p].param, w)
            report[p] = entry
        if norm is None:
            store.set_smooth(members[0], 1.0 / s)
        else:
            store.fold_norm(norm, s)
    return PTQResult(store.result(), report, skipped)


# ------------------------------------------------------------------ the search


def _scales(mean_abs: jax.Array, alpha: jax.Array) -> jax.Array:
    """AWQ's ``s = xbar^alpha``, normalized by ``sqrt(max s * min s)``."""
    m = jnp.asarray(mean_abs, jnp.float32)
    top = jnp.max(m)
    # a layer whose input is all zeros: s = 1 (any scale is exact)
    m = jnp.where(top > 0, jnp.maximum(m, _FLOOR * top), 1.0)
    s = m**alpha
    return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


def _matrix(w: jax.Array, g: _Geom) -> jax.Array:
    """The stored weight as its ``(in, out)`` matrix (channel ``j`` is row ``j``)."""
    k = len(g.axes)
    return jnp.moveaxis(w, g.axes, tuple(range(k))).reshape(int(np.prod(g.channels)), -1)


def _scale_rows(w: jax.Array, s: jax.Array, g: _Geom) -> jax.Array:
    """``diag(s) W`` in the stored layout (input channel ``j`` multiplied by ``s_j``)."""
    k = len(g.axes)
    moved = jnp.moveaxis(w, g.axes, tuple(range(k)))
    moved = moved * s.reshape(g.channels + (1,) * (w.ndim - k))
    return jnp.moveaxis(moved, tuple(range(k)), g.axes)


def _act(x: jax.Array, spec: QuantSpec | None) -> jax.Array:
    return x if spec is None else fake_quant(x, spec)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _alpha_losses(
    xs: jax.Array,
    mean_abs: jax.Array,
    ws: tuple[jax.Array, ...],
    alphas: jax.Array,
    geoms: tuple[_Geom, ...],
    acts: tuple[QuantSpec | None, ...],
) -> jax.Array:
    """``(len(alphas), len(ws))`` mean squared output errors, every alpha in one vmap."""
    ws = tuple(jnp.asarray(w, jnp.float32) for w in ws)
    refs = [jnp.matmul(xs, _matrix(w, g), precision=_HI) for w, g in zip(ws, geoms, strict=True)]

    def one(alpha: jax.Array) -> jax.Array:
        s = _scales(mean_abs, alpha)
        out = []
        for w, g, a, ref in zip(ws, geoms, acts, refs, strict=True):
            q = _matrix(fake_quant(_scale_rows(w, s, g), g.spec), g)
            y = jnp.matmul(_act(xs / s[None], a), q, precision=_HI)
            out.append(jnp.mean(jnp.square(y - ref)))
        return jnp.stack(out)

    return jax.vmap(one)(alphas)


def _clip_why_not(g: _Geom, ndim: int) -> str | None:
    """None when clip_search applies to the layer, else why not."""
    gran = g.spec.granularity
    if ndim != 2 or len(g.axes) != 1:
        return "not searched: the weight is not a 2-D (in, out) matrix"
    in_axis = g.axes[0] % 2
    if isinstance(gran, PerBlock) and gran.axis is not None and gran.axis % 2 == in_axis:
        return None
    if isinstance(gran, PerChannel) and gran.axes is not None:
        if tuple(a % 2 for a in gran.axes) == (1 - in_axis,):
            return None
    return (
        f"not searched: its scales ({gran}) are not groups along the input axis of each "
        "output channel"
    )


@functools.partial(jax.jit, static_argnums=(2, 3))
def _clip(
    xs: jax.Array, w: jax.Array, g: _Geom, act: QuantSpec | None, ratios: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``w`` (stored layout, already scaled) with each scale group clipped to its best range,
    and the mean squared output error after it (inputs ``xs``, already divided by s)."""
    in_axis = g.axes[0] % 2
    m = w if in_axis == 0 else w.T  # (in, out)
    n_in, n_out = m.shape
    gran = g.spec.granularity
    size = gran.size if isinstance(gran, PerBlock) else n_in
    groups = n_in // size
    xg = _act(xs, act).reshape(xs.shape[0], groups, size)
    mg = m.reshape(groups, size, n_out)
    amax = jnp.max(jnp.abs(mg), axis=1, keepdims=True)  # (groups, 1, out)
    ref = jnp.einsum("ngk,gko->ngo", xg, mg, precision=_HI)

    def stored(mat: jax.Array) -> jax.Array:
        return mat if in_axis == 0 else mat.T

    def err(r: jax.Array) -> jax.Array:  # (groups, out): each group's own output error
        t = r * amax
        q = fake_quant(stored(jnp.clip(mg, -t, t).reshape(n_in, n_out)), g.spec)
        qg = (q if in_axis == 0 else q.T).reshape(groups, size, n_out)
        y = jnp.einsum("ngk,gko->ngo", xg, qg, precision=_HI)
        return jnp.sum(jnp.square(y - ref), axis=0)

    # lax.map, not vmap: one (rows, groups, out) product at a time bounds the memory
    errs = lax.map(err, ratios)  # (ratios, groups, out)
    best = jnp.argmin(errs, axis=0)  # ties: the first ratio, 1 (no clipping)
    t = ratios[best][:, None, :] * amax
    clipped = jnp.clip(mg, -t, t).reshape(n_in, n_out)
    # the error of the whole layer after clipping (groups' errors do not simply add: their
    # outputs sum before squaring)
    q = _matrix(fake_quant(stored(clipped), g.spec), g)
    y = jnp.matmul(_act(xs, act), q, precision=_HI)
    loss = jnp.mean(jnp.square(y - jnp.matmul(xs, m, precision=_HI)))
    return stored(clipped).astype(w.dtype), loss


# ------------------------------------------------------------------ layers


def _geom(st: LayerStatistics, w: Any) -> _Geom:
    """The layer's weight spec in the stored layout, as jq.flax.convert binds it."""
    spec = st.rule.weight
    assert spec is not None  # _why_not said so
    shape = tuple(np.shape(w))
    ndim = len(shape)
    if st.transposed:  # the contraction's operand is w.T: its axes reversed
        op_shape = shape[::-1]
        contracting = tuple(ndim - 1 - a for a in st.weight_axes)
    else:
        op_shape, contracting = shape, st.weight_axes
    if follows_layout(spec.granularity):
        bound, _ = bind(spec, op_shape, contracting)
        assert bound is not None
        spec = bound
    if st.transposed:
        spec = reversed_spec(spec, ndim, repr(st.param))
    return _Geom(spec, tuple(a % ndim for a in st.weight_axes), tuple(st.channels))


def _why_not(st: LayerStatistics, transform: tuple[Any, Any]) -> str | None:
    """None when AWQ applies to the layer, else why not (for ``skipped``)."""
    spec = st.rule.weight
    if spec is None:
        return "its rule does not quantize the weight (AWQ scales weight-quantized layers)"
    if spec.rounding == "stochastic":
        return "its weight spec rounds stochastically; the search compares deterministic roundings"
    if st.param is None:
        return (
            "its weight is computed by the model (a tied head's embedding.T), not a stored "
            "parameter that could hold s W"
        )
    if st.param.rpartition("/")[2] == "embedding":
        return (
            "its weight is an embedding table also used for lookups; scaling it would change "
            "the embeddings"
        )
    if st.uses != 1:
        return (
            f"its weight is contracted {st.uses} times per call; one input scale cannot serve all"
        )
    if st.rows == 0:
        return "no calibration row reached it"
    if transform[1] is not None:
        return (
            "it has an online Hadamard rotation, which acts after the online scale; AWQ's "
            "scale would have to act after the rotation (fold the rotation first)"
        )
    return None


def _act_spec(rule: Rule, shape: tuple[int, ...]) -> QuantSpec | None:
    """The rule's activation spec bound to the ``(rows, in)`` sample."""
    if rule.act is None:
        return None
    return bind(rule.act, shape, (1,))[0]


def _groups(
    pairs: dict[str, tuple[str, ...]],
    geoms: dict[str, _Geom],
    stats: Mapping[str, LayerStatistics],
    skipped: dict[str, str],
    store: LinenStore | NnxStore,
) -> list[tuple[str | None, tuple[str, ...]]]:
    """``(norm path or None, layers)`` sharing one ``s``: the pairs, then every other
    layer alone (online)."""
    out: list[tuple[str | None, tuple[str, ...]]] = []
    owned: set[str] = set()
    for norm, layers in pairs.items():
        for p in layers:
            if p not in geoms:
                why = skipped.get(p, "the rules do not quantize it")
                raise ValueError(
                    f"{_FN}: pairs[{norm!r}] names {p!r}, which AWQ cannot scale ({why}); the "
                    f"layers it can scale are {sorted(geoms)}. Remove it from pairs (and do "
                    "not fold that norm: all of its readers must take the scale)."
                )
            if p in owned:
                raise ValueError(f"{_FN}: {p!r} is in two pairs; each layer reads one norm.")
            owned.add(p)
        first = stats[layers[0]]
        for p in layers[1:]:
            other = stats[p]
            if (
                other.rows != first.rows
                or other.channels != first.channels
                or not np.allclose(
                    np.asarray(other.mean_abs), np.asarray(first.mean_abs), rtol=1e-4, atol=1e-6
                )
            ):
                raise ValueError(
                    f"{_FN}: pairs[{norm!r}]: {layers[0]!r} and {p!r} do not read the same "
                    "input (their input statistics differ); a norm's readers share one input."
                )
        _check_norm_params(norm, store.norm_params(norm), first.channels)
        out.append((norm, layers))
    for p in geoms:
        if p not in owned:
            if len(geoms[p].channels) != 1:
                skipped[p] = (
                    f"it contracts {len(geoms[p].channels)} input axes; the online scale needs "
                    "one (fold it into its norm with pairs=)"
                )
                continue
            out.append((None, (p,)))
    return out


def _detected(
    found: dict[str, tuple[dict[str, int], str | None]],
    geoms: dict[str, _Geom],
    stats: Mapping[str, LayerStatistics],
    store: LinenStore | NnxStore,
) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """The norms (from SmoothQuant's ``norm_readers``) every reader of which AWQ scales,
    and why the other readers of norms keep their scale online."""
    by_param = {
        "/".join(["params", *[k for k in p.split("/") if k], *(stats[p].param or "").split("/")]): p
        for p in geoms
    }
    groups: dict[str, tuple[str, ...]] = {}
    why_online: dict[str, str] = {}
    for norm, (readers, why_not) in found.items():
        members = [by_param[k] for k in readers if k in by_param]
        if not members:
            continue
        why = why_not
        for k, axis in readers.items():
            if why is not None:
                break
            p = by_param.get(k)
            if p is None:
                why = f"it also feeds {k}, which AWQ does not scale"
            elif geoms[p].axes != (axis,):
                why = f"{p} reads it along another weight axis than its statistics say"
        if why is None:
            try:
                _check_norm_params(norm, store.norm_params(norm), stats[members[0]].channels)
            except ValueError as e:
                why = str(e)
        if why is None:
            groups[norm] = tuple(p for p in geoms if p in members)
        else:
            for p in members:
                why_online[p] = f"{norm!r} cannot take the scale: {why}"
    return groups, why_online


# ------------------------------------------------------------------ where the scales go


def _check_norm_params(norm: str, params: dict[str, Any] | None, channels: tuple[int, ...]) -> None:
    if params is None:
        raise ValueError(f"{_FN}: pairs names the norm {norm!r}, but the model has no such module.")
    n = int(np.prod(channels))
    if "scale" not in params:
        raise ValueError(
            f"{_FN}: pairs[{norm!r}]: that module has no 'scale' parameter (it has "
            f"{sorted(params)}) to fold the scales into; leave it out of pairs (online scales)."
        )
    for name, v in params.items():
        if name in ("scale", "bias") and int(np.size(v)) != n:
            raise ValueError(
                f"{_FN}: pairs[{norm!r}]: its {name} has shape {np.shape(v)}, but its layers "
                f"read {n} channels; is it the norm that feeds them?"
            )
