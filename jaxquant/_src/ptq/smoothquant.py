"""SmoothQuant: migrate activation outliers into the weights (Xiao et al. 2022,
arXiv 2211.10438).

A layer computes ``y = X W`` (``X``: rows x ``in`` input channels, ``W``: ``in`` x ``out`` in
its matrix view). Per-tensor or per-token activation quantization fails when a few input
channels of ``X`` are hundreds of times larger than the rest (the massive activations of
large LMs): the grid step follows them and the other channels round to zero. Weights have
no such outliers, so SmoothQuant divides each channel of ``X`` by ``s_j`` and multiplies row
``j`` of ``W`` by it, an exact identity in float:

.. math::

   y = (X \\operatorname{diag}(s)^{-1}) (\\operatorname{diag}(s) W), \\qquad
   s_j = \\frac{\\max_i |X_{ij}|^{\\alpha}}{\\max_k |W_{jk}|^{1-\\alpha}}

with ``max_i |X_ij|`` the channel's absmax over the calibration rows
(:func:`jaxquant.flax.layer_statistics`) and ``alpha`` the migration strength (0.5 in the
paper; 1 moves all of the range into the weights). Channels no calibration row reached keep
``s = 1``; ``s`` is clipped to ``[1e-5, 1e5]``.

Where ``s`` goes:

* **folded** into the normalization that produces ``X``: a LayerNorm's / RMSNorm's scale
  and bias divided by ``s``, every layer reading that output multiplied (they share one
  ``s``, from the max over their weights: q, k, v after ``ln1``). No cost at inference.
  Linen models are traced once (:func:`norm_readers`) to find these groups: every reader
  of the normalization's output must be a smoothed layer whose weight is a parameter used
  nowhere else, or the group is not folded (a residual connection reading it, a tied
  weight). ``pairs={norm path: [layer paths]}`` names the groups instead (NNX models too).
* otherwise **online**, as the layer's input transform
  (:mod:`jaxquant._src.flax.act_transform`): Linen ``variables["ptq"][...layer...]["smooth"]
  = 1 / s``, NNX ``layer.ptq_smooth``: one multiply of the input per call, before the
  activation is quantized.

The activations are then really quantized by the rules' activation specs (int8 ``X / s``
against int8 ``diag(s) W``: integer ``dot_general`` where the backend has it), which is what
SmoothQuant is for.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.linen.module import InterceptorContext
from jax import lax
from jax.extend import core as jcore

from jaxquant._src.checks import check_bool, check_int, check_real, describe
from jaxquant._src.flax.calibrate import call_args, check_call_kwargs, join_call, split_call
from jaxquant._src.flax.linen import QuantizedModule
from jaxquant._src.flax.rules import Rule
from jaxquant._src.flax.serve import reversed_spec
from jaxquant._src.flax.statistics import LayerStatistics, layer_statistics
from jaxquant._src.granularity import follows_layout
from jaxquant._src.layout import bind
from jaxquant._src.ptq.fold import LinenStore, NnxStore, check_pairs, parts
from jaxquant._src.ptq.result import PTQResult
from jaxquant._src.quantize import fake_quant
from jaxquant._src.spec import QuantSpec
from jaxquant._src.types import PyTree

__all__ = ["norm_readers", "smooth_quant"]

_FN = "smooth_quant"
_HI = lax.Precision.HIGHEST  # float32 products on GPU / TPU would otherwise use bf16 passes
_S_MIN, _S_MAX = 1e-5, 1e5  # s stays finite and invertible in float32
# A weight row of zeros has no range to take; its channel is scaled down as far as allowed.
_W_FLOOR = 1e-8
ALPHAS = tuple(float(a) for a in np.round(np.linspace(0.0, 1.0, 21), 2))


def smooth_quant(
    model: nn.Module | nnx.Module,
    batches: Iterable[Any],
    variables: PyTree = None,
    *,
    rules: Rule | Iterable[Rule] | None = None,
    alpha: float = 0.5,
    fold: bool = True,
    pairs: Mapping[str, Sequence[str]] | None = None,
    search: bool = False,
    alphas: Sequence[float] | None = None,
    max_samples: int = 512,
    call_kwargs: Mapping[str, Any] | None = None,
) -> PTQResult:
    """SmoothQuant (Xiao et al. 2022): per-channel scales that move activation outliers
    into the weights of every layer whose rule quantizes its activations.

    For each such layer (``X`` its input, rows x channels; ``W`` its weight, ``in`` x
    ``out``), with ``alpha`` the migration strength:

    .. math::

       s_j = \\frac{\\max_i |X_{ij}|^{\\alpha}}{\\max_k |W_{jk}|^{1-\\alpha}}, \\qquad
       X' = X \\operatorname{diag}(s)^{-1}, \\quad W' = \\operatorname{diag}(s) W

    so ``X' W' = X W`` in float, and ``X'``'s channels span a range per-tensor / per-token
    quantization can hold. ``s`` is folded into the LayerNorm / RMSNorm producing ``X``
    where every reader of that normalization takes it (found by tracing a Linen model, or
    given as ``pairs``), else stored as the layer's online input transform (see
    :mod:`jaxquant.ptq`). Quantize the result with the same rules
    (:func:`jaxquant.flax.quantize_model`, :func:`jaxquant.flax.convert`) or chain GPTQ.

    Args:
      model: the float Linen or NNX model (or one from :func:`jaxquant.flax.quantize_model`,
        whose rules are then used).
      batches: calibration inputs, as :func:`jaxquant.flax.layer_statistics` takes them.
      variables: the Linen model's variables (every collection); None for NNX.
      rules: which layers are quantized with which specs (the rules you quantize with).
        Layers whose rule has an activation spec are smoothed; the others are listed in
        ``skipped``.
      alpha: the migration strength in ``[0, 1]`` (0.5: the paper's default).
      fold: fold into normalization layers where the graph allows (Linen: detected by
        tracing; NNX: only the ``pairs`` given). False: every layer online.
      pairs: ``{norm path: [layer paths]}``: the groups to fold, in place of the detection
        (trusted: list *every* layer that reads the normalization's output). ``{}`` folds
        nothing.
      search: choose ``alpha`` per group / layer from ``alphas``: the one with the least
        quantized output error ``||Q(X') Q(W') - X W||^2 / ||X W||^2`` (summed over a
        group's layers) on a sample of the layer's own calibration inputs, with the rules'
        weight and activation specs (dynamic scales over the sample).
      alphas: the grid of the search (default ``0, 0.05, ..., 1``); requires ``search``.
      max_samples: calibration rows per layer kept for the search.
      call_kwargs: keyword arguments of every model call (``{"deterministic": True}``).

    Returns:
      A :class:`~jaxquant.ptq.PTQResult`: ``variables`` (Linen: new variables, the input
      untouched: changed ``params`` and a ``"ptq"`` collection with the online scales;
      NNX: the model, changed in place), ``report`` (layer path -> ``alpha``,
      ``folded_into`` (the norm's path or None), ``why_online`` (why not folded, or None),
      ``act_absmax`` / ``act_absmax_smoothed`` (the largest channel absmax of ``X`` / ``X'``),
      ``weight_absmax`` / ``weight_absmax_smoothed``, ``smooth_min`` / ``smooth_max``; with
      ``search``, ``error`` and ``error_unsmoothed`` (``s = 1``) on the sample) and
      ``skipped`` (layer path -> why SmoothQuant does not apply to it: no activation spec,
      no batch reached it, a tied or computed weight ...).

    Raises:
      ValueError: ``alpha`` / ``alphas`` outside ``[0, 1]``; ``alphas`` without ``search``;
        ``pairs`` naming a layer SmoothQuant cannot smooth, a layer twice, or a norm
        without a scale of the layers' width; as :func:`jaxquant.flax.layer_statistics`.
      TypeError: arguments of the wrong type.

    Example:
      A LayerNorm whose channel 0 is 100x the others feeds a Dense layer: ``s`` is folded
      into the norm, the float function is unchanged, channel 0's range is migrated.

      >>> import jax, jax.numpy as jnp, numpy as np, flax.linen as nn, jaxquant as jq
      >>> from jaxquant.flax import Rule
      >>> from jaxquant._src.ptq.smoothquant import smooth_quant
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         return nn.Dense(4, name="fc")(nn.LayerNorm(name="ln")(x))
      >>> x = jax.random.normal(jax.random.key(0), (32, 8))
      >>> v = jax.jit(Net().init)(jax.random.key(1), x)
      >>> v["params"]["ln"]["scale"] = v["params"]["ln"]["scale"].at[0].set(100.0)
      >>> rules = Rule("fc", weight=jq.QuantSpec("int8", jq.per_channel()),
      ...              act=jq.QuantSpec("int8"))
      >>> result = smooth_quant(Net(), [x], v, rules=rules)
      >>> result.report["fc"]["folded_into"]
      'ln'
      >>> apply = jax.jit(Net().apply)
      >>> bool(np.allclose(apply(result.variables, x), apply(v, x), atol=1e-4))
      True
      >>> r = result.report["fc"]
      >>> r["act_absmax_smoothed"] < r["act_absmax"] / 5
      True

    References:
      Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for
      Large Language Models", https://arxiv.org/abs/2211.10438
    """
    alpha = _check_alpha(alpha, f"{_FN}: alpha")
    fold = check_bool(fold, f"{_FN}: fold")
    search = check_bool(search, f"{_FN}: search")
    if alphas is not None and not search:
        raise ValueError(f"{_FN}: alphas is the grid of the search; pass search=True with it.")
    grid = _check_alphas(alphas) if search else ()
    max_samples = check_int(max_samples, f"{_FN}: max_samples", lo=1)
    given_pairs = check_pairs(pairs, _FN)
    call_kwargs = check_call_kwargs(call_kwargs, _FN)
    if isinstance(model, nn.Module):
        if not isinstance(variables, Mapping):
            raise TypeError(
                f"{_FN}: a Linen model needs its variables (model.init(...)), got "
                f"{describe(variables)}."
            )
        store: LinenStore | NnxStore = LinenStore(variables)
    elif isinstance(model, nnx.Module):
        store = NnxStore(model)
    else:
        raise TypeError(
            f"{_FN}: model must be a Flax Linen or NNX model, got {describe(model)}; pass the "
            "model object (a Linen module with its variables, or an nnx.Module)."
        )
    if isinstance(batches, jax.Array | np.ndarray) or not isinstance(batches, Iterable):
        raise TypeError(
            f"{_FN}: batches must be an iterable of model inputs (e.g. [x]), got "
            f"{describe(batches)}."
        )
    batches = list(batches)
    stats = layer_statistics(
        model,
        batches,
        variables,
        rules=rules,
        hessian=False,
        max_samples=max_samples if search else 0,
        call_kwargs=call_kwargs,
    )

    skipped: dict[str, str] = {p: "no calibration batch reached it" for p in stats.unreached}
    skipped.update(stats.unsupported)
    targets: dict[str, LayerStatistics] = {}
    for path, st in stats.items():
        why = _why_not(st, store.transform(path))
        if why is None:
            targets[path] = st
        else:
            skipped[path] = why

    # the groups folded into a normalization, and why each other target is online
    why_online: dict[str, str] = {}
    if given_pairs is not None:
        groups = _given_groups(given_pairs, targets, skipped, store)
        default = "pairs= does not fold it"
    elif not fold:
        groups, default = {}, "fold=False"
    elif isinstance(store, NnxStore):
        groups, default = {}, "NNX models fold only the groups given as pairs="
    else:
        inner = model.module if isinstance(model, QuantizedModule) else model
        assert isinstance(inner, nn.Module)
        found = norm_readers(inner, variables, batches[0], call_kwargs=call_kwargs)
        groups, why_online = _detected_groups(found, targets, store)
        default = "its input is not the output of a LayerNorm / RMSNorm"

    units: list[tuple[str | None, tuple[str, ...]]] = list(groups.items())
    grouped = {p for members in groups.values() for p in members}
    for path, st in targets.items():
        if path in grouped:
            continue
        if len(st.channels) != 1:
            skipped[path] = (
                f"it contracts {len(st.channels)} input axes; the online scale needs one "
                "(fold it into its normalization with pairs=)"
            )
            continue
        units.append((None, (path,)))

    report: dict[str, dict[str, Any]] = {}
    for norm, members in units:
        sts = [targets[p] for p in members]
        weights = [jnp.asarray(store.weight(p, targets[p].param), jnp.float32) for p in members]
        x_max = functools.reduce(jnp.maximum, [st.absmax for st in sts])
        w_max = functools.reduce(
            jnp.maximum, [_row_absmax(w, st) for w, st in zip(weights, sts, strict=True)]
        )
        chosen, errors = alpha, None
        if search:
            chosen, errors = _search(grid, x_max, w_max, weights, sts)
        s = smoothing_scales(x_max, w_max, chosen)
        for p, w, st in zip(members, weights, sts, strict=True):
            store.set_weight(p, st.param, _scale_rows(w, st, s))
        if norm is not None:
            store.fold_norm(norm, s)
        else:
            store.set_smooth(members[0], 1.0 / s)
        for p, w, st in zip(members, weights, sts, strict=True):
            entry: dict[str, Any] = {
                "alpha": chosen,
                "folded_into": norm,
                "why_online": None if norm is not None else why_online.get(p, default),
                "act_absmax": float(jnp.max(st.absmax)),
                "act_absmax_smoothed": float(jnp.max(st.absmax / s)),
                "weight_absmax": float(jnp.max(jnp.abs(w))),
                "weight_absmax_smoothed": float(jnp.max(jnp.abs(_scale_rows(w, st, s)))),
                "smooth_min": float(jnp.min(s)),
                "smooth_max": float(jnp.max(s)),
            }
            if errors is not None:
                entry["error"], entry["error_unsmoothed"] = errors
            report[p] = entry
    order = list(stats)  # the order the model ran its layers
    report = {p: report[p] for p in order if p in report}
    return PTQResult(store.result(), report, skipped)


def smoothing_scales(x_absmax: jax.Array, w_absmax: jax.Array, alpha: float) -> jax.Array:
    """SmoothQuant's per-channel scales ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``
    (float32): 1 where the channel never fired, clipped to ``[1e-5, 1e5]``.

    Args:
      x_absmax: ``max_rows |X[:, j]|``, shape ``(in,)``.
      w_absmax: ``max_k |W[j, k]|`` over the weight's row ``j`` (the max over every layer
        sharing the input), shape ``(in,)``.
      alpha: the migration strength in ``[0, 1]``.

    Returns:
      ``s``, float32 ``(in,)``: divide the activation by it, multiply the weight rows.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxquant._src.ptq.smoothquant import smoothing_scales
      >>> smoothing_scales(jnp.array([100.0, 1.0, 0.0]), jnp.array([1.0, 4.0, 2.0]), 0.5)
      Array([10. ,  0.5,  1. ], dtype=float32)
    """
    x = jnp.asarray(x_absmax, jnp.float32)
    w = jnp.maximum(jnp.asarray(w_absmax, jnp.float32), _W_FLOOR)
    safe_x = jnp.where(x > 0, x, 1.0)  # the double where: no log(0) on the unused branch
    s = jnp.where(x > 0, safe_x**alpha / w ** (1.0 - alpha), 1.0)
    return jnp.clip(s, _S_MIN, _S_MAX)


# ------------------------------------------------------------------ finding the folds


def _mark_abstract(x: Any, *, index: int) -> Any:
    return x


# An identity that exists only in the traced graph: it marks the outputs of the
# normalization layers so their readers can be found in the jaxpr (a jit'd identity would
# be forwarded away by jit's input-output forwarding).
_MARK = jcore.Primitive("jaxquant_norm_output")
_MARK.def_abstract_eval(_mark_abstract)
_MARK.def_impl(_mark_abstract)

_NORMS = (nn.LayerNorm, nn.RMSNorm)


def norm_readers(
    model: nn.Module,
    variables: PyTree,
    batch: Any,
    *,
    call_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, tuple[dict[str, int], str | None]]:
    """Which weights read each LayerNorm / RMSNorm output of a Linen model (one trace).

    The model is traced with :func:`jax.make_jaxpr` on ``batch``, the outputs of its
    ``nn.LayerNorm`` / ``nn.RMSNorm`` calls marked; then every use of each output in the
    top-level graph is followed (through dtype casts). A normalization can take a
    per-channel scale in place of its readers (SmoothQuant, AWQ) only when each reader
    contracts the normalized axis with a stored parameter that nothing else uses.

    Args:
      model: a Linen module (float, not wrapped by quantize_model).
      variables: its variables.
      batch: one model input (an array, a tuple of arguments or a dict of keyword
        arguments, as :func:`jaxquant.flax.layer_statistics` takes them).
      call_kwargs: keyword arguments of the call.

    Returns:
      ``{norm path: (readers, why_not)}``: ``readers`` maps each parameter read (its path
      in ``variables``, ``"params/block0/attn/q/kernel"``) to the parameter's axis the
      normalized channels contract with; ``why_not`` is None when every use is such a
      contraction, else the first use that is not (and ``readers`` the ones found).

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from jaxquant._src.ptq.smoothquant import norm_readers
      >>> class Block(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         h = nn.LayerNorm(name="ln")(x)
      ...         y = nn.Dense(4, name="a")(h) + nn.Dense(4, name="b")(h)
      ...         return y + nn.Dense(4, name="c")(nn.RMSNorm(name="rms")(x)) + x
      >>> x = jnp.ones((2, 4))
      >>> found = norm_readers(Block(), jax.jit(Block().init)(jax.random.key(0), x), x)
      >>> found["ln"]
      ({'params/a/kernel': 0, 'params/b/kernel': 0}, None)
      >>> found["rms"]
      ({'params/c/kernel': 0}, None)
    """
    kwargs = dict(check_call_kwargs(call_kwargs, "norm_readers"))
    arrays, static = split_call(batch, "norm_readers: batch")
    names: list[str] = []

    def interceptor(
        next_fun: Callable[..., Any],
        args: tuple[Any, ...],
        kw: dict[str, Any],
        context: InterceptorContext,
    ) -> Any:
        out = next_fun(*args, **kw)
        m = context.module
        if context.method_name == "__call__" and isinstance(m, _NORMS) and hasattr(out, "shape"):
            names.append("/".join(m.path))
            out = _MARK.bind(out, index=len(names) - 1)
        return out

    def run(variables: PyTree, arrays: list[Any]) -> Any:
        args, kw = call_args(join_call(arrays, static))
        with nn.intercept_methods(interceptor):
            return model.apply(variables, *args, **kwargs, **kw)

    closed = jax.make_jaxpr(run)(variables, arrays)
    leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
    leaf_names = {
        v: "/".join(str(getattr(k, "key", k)) for k in path)
        for v, (path, _) in zip(closed.jaxpr.invars, leaves, strict=False)
    }
    return _readers(closed.jaxpr, names, leaf_names)


def _readers(
    jaxpr: Any, names: list[str], leaf_names: dict[Any, str]
) -> dict[str, tuple[dict[str, int], str | None]]:
    uses: dict[Any, list[Any]] = {}
    producer: dict[Any, Any] = {}
    for e in jaxpr.eqns:
        for v in e.invars:
            if isinstance(v, jcore.Var):
                uses.setdefault(v, []).append(e)
        for v in e.outvars:
            producer[v] = e
    outs = {v for v in jaxpr.outvars if isinstance(v, jcore.Var)}

    def only_use(v: Any) -> bool:
        return v not in outs and len(uses.get(v, [])) == 1

    def weight_of(v: Any, axis: int) -> tuple[str, int] | str:
        """The parameter ``v`` is (through casts and transposes), and its contracted axis."""
        while v not in leaf_names:
            if not only_use(v):
                return "a weight computed once and used several times"
            e = producer.get(v)
            if e is None:
                return "a product with a constant"
            if e.primitive.name == "transpose":
                axis = e.params["permutation"][axis]
            elif e.primitive.name != "convert_element_type":
                return f"a product with a weight computed by {e.primitive.name}"
            v = e.invars[0]
        if not only_use(v):
            return f"the parameter {leaf_names[v]} is used elsewhere too (a tied weight)"
        return leaf_names[v], axis

    out: dict[str, tuple[dict[str, int], str | None]] = {}
    for e in jaxpr.eqns:
        if e.primitive is not _MARK:
            continue
        norm = names[e.params["index"]]
        readers, why = out.get(norm, ({}, None))
        frontier = [e.outvars[0]]
        while frontier and why is None:
            y = frontier.pop()
            if y in outs:
                why = "the model returns it"
                break
            for user in uses.get(y, []):
                name = user.primitive.name
                if name == "convert_element_type":
                    frontier.append(user.outvars[0])
                    continue
                if name != "dot_general" or sum(v is y for v in user.invars) != 1:
                    why = f"{name} reads it"
                    break
                (lc, rc), (lb, rb) = user.params["dimension_numbers"]
                mine, theirs = (lc, rc) if user.invars[0] is y else (rc, lc)
                other = user.invars[1] if user.invars[0] is y else user.invars[0]
                ndim = len(y.aval.shape)
                if lb or rb or tuple(mine) != (ndim - 1,):
                    why = "a product that does not contract its channel axis alone reads it"
                    break
                got = weight_of(other, theirs[0])
                if isinstance(got, str):
                    why = got
                    break
                readers[got[0]] = got[1]
        out[norm] = (readers, why)
    return out


def _detected_groups(
    found: dict[str, tuple[dict[str, int], str | None]],
    targets: dict[str, LayerStatistics],
    store: LinenStore,
) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """The norms every reader of which is a smoothed layer, and why the other readers of
    norms are online."""
    by_param = {
        "/".join(["params", *parts(p), *parts(st.param or "")]): p for p, st in targets.items()
    }
    groups: dict[str, tuple[str, ...]] = {}
    why_online: dict[str, str] = {}
    for norm, (readers, why_not) in found.items():
        why: str | None = why_not
        members = [by_param[k] for k in readers if k in by_param]
        if not members:
            continue
        if why is None:
            for k, axis in readers.items():
                p = by_param.get(k)
                if p is None:
                    why = f"it also feeds {k}, which is not smoothed here"
                elif targets[p].weight_axes != (axis,):
                    why = f"{p} reads it along another weight axis than its statistics say"
                if why:
                    break
        if why is None:
            why = _norm_params_problem(norm, store.norm_params(norm), targets[members[0]].channels)
        if why is None:
            groups[norm] = tuple(p for p in targets if p in members)
        else:
            for p in members:
                why_online[p] = f"{norm!r} cannot take the scale: {why}"
    return groups, why_online


def _given_groups(
    pairs: dict[str, tuple[str, ...]],
    targets: dict[str, LayerStatistics],
    skipped: dict[str, str],
    store: LinenStore | NnxStore,
) -> dict[str, tuple[str, ...]]:
    owned: set[str] = set()
    for norm, layers in pairs.items():
        for p in layers:
            if p not in targets:
                why = skipped.get(p, "the rules do not quantize it")
                raise ValueError(
                    f"{_FN}: pairs[{norm!r}] names {p!r}, which SmoothQuant cannot smooth "
                    f"({why}); the layers it smooths are {sorted(targets)}. A norm can take "
                    "the scale only if all of its readers do: remove the norm from pairs."
                )
            if p in owned:
                raise ValueError(f"{_FN}: pairs names {p!r} twice; each layer reads one norm.")
            owned.add(p)
        channels = {targets[p].channels for p in layers}
        if len(channels) != 1:
            raise ValueError(
                f"{_FN}: pairs[{norm!r}]: its layers have different input widths "
                f"{sorted(channels)}; the readers of one norm share its width."
            )
        problem = _norm_params_problem(norm, store.norm_params(norm), targets[layers[0]].channels)
        if problem is not None:
            raise ValueError(f"{_FN}: pairs[{norm!r}]: {problem}.")
    return dict(pairs)


# ------------------------------------------------------------------ the scales


def _why_not(st: LayerStatistics, transform: tuple[Any, Any]) -> str | None:
    """None when SmoothQuant applies to the layer, else why not (for ``skipped``)."""
    if st.rule.act is None:
        return "its rule does not quantize the activation (SmoothQuant is for w8a8-style rules)"
    if st.param is None:
        return (
            "its weight is computed by the model (a tied head's embedding.T), not a stored "
            "parameter that could hold diag(s) W"
        )
    if st.param.rpartition("/")[2] == "embedding":
        return (
            "its weight is an embedding table also used for lookups; scaling it would change them"
        )
    if st.rows == 0:
        return "no calibration row reached it"
    if transform[1] is not None:
        return (
            "it has an online Hadamard rotation, which acts after the online scale; smooth "
            "before rotating"
        )
    return None


def _row_absmax(w: jax.Array, st: LayerStatistics) -> jax.Array:
    """``max_k |W[j, k]|`` per input channel ``j`` of the stored weight."""
    return jnp.max(jnp.abs(_matrix(w, st)), axis=1)


def _matrix(w: jax.Array, st: LayerStatistics) -> jax.Array:
    """The stored weight as its ``(in, out)`` matrix (input channels in statistics order)."""
    k = len(st.weight_axes)
    moved = jnp.moveaxis(w, st.weight_axes, tuple(range(k)))
    return moved.reshape(int(np.prod(st.channels)), -1)


def _scale_rows(w: jax.Array, st: LayerStatistics, s: jax.Array) -> jax.Array:
    return _rows_times(w, st.weight_axes, tuple(st.channels), s)


def _rows_times(
    w: jax.Array, weight_axes: tuple[int, ...], channels: tuple[int, ...], s: jax.Array
) -> jax.Array:
    """``diag(s) W`` in the stored layout: the input channels (the ``weight_axes`` of ``w``,
    of sizes ``channels``, flattened in that order) multiplied by ``s`` (shape ``(in,)``)."""
    k = len(weight_axes)
    moved = jnp.moveaxis(w, weight_axes, tuple(range(k)))
    scaled = moved * s.reshape(tuple(channels) + (1,) * (w.ndim - k))
    return jnp.moveaxis(scaled, tuple(range(k)), weight_axes)


def _weight_spec(st: LayerStatistics, shape: tuple[int, ...]) -> QuantSpec | None:
    """The rule's weight spec in the stored layout, as jq.flax.convert binds it."""
    spec = st.rule.weight
    if spec is None:
        return None
    ndim = len(shape)
    if st.transposed:  # the contraction's operand is w.T: its axes reversed
        op_shape, contracting = shape[::-1], tuple(ndim - 1 - a for a in st.weight_axes)
    else:
        op_shape, contracting = shape, st.weight_axes
    if follows_layout(spec.granularity):
        bound = bind(spec, op_shape, contracting)[0]
        assert bound is not None
        spec = bound
    if st.transposed:
        spec = reversed_spec(spec, ndim, repr(st.param))
    return _nearest(spec)


def _nearest(spec: QuantSpec) -> QuantSpec:
    # The search compares deterministic roundings (stochastic noise would pick alphas at random).
    return spec.replace(rounding="nearest") if spec.stochastic else spec


def _search(
    grid: tuple[float, ...],
    x_max: jax.Array,
    w_max: jax.Array,
    weights: list[jax.Array],
    sts: list[LayerStatistics],
) -> tuple[float, tuple[float, float]]:
    """The alpha of ``grid`` with the least summed relative output error, and ``(its
    error, the error without smoothing)``."""
    scales = jnp.stack([smoothing_scales(x_max, w_max, a) for a in grid] + [jnp.ones_like(x_max)])
    total = jnp.zeros(len(grid) + 1, jnp.float32)
    for w, st in zip(weights, sts, strict=True):
        assert st.samples is not None  # search runs statistics with max_samples
        xs = st.samples
        act = bind(st.rule.act, tuple(xs.shape), (1,))[0]
        total = total + _errors(
            xs,
            w,
            scales,
            None if act is None else _nearest(act),
            _weight_spec(st, tuple(w.shape)),
            st.weight_axes,
            tuple(st.channels),
        )
    errs = np.asarray(total)
    best = int(np.argmin(errs[:-1]))
    return grid[best], (float(errs[best]), float(errs[-1]))


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _errors(
    xs: jax.Array,
    w: jax.Array,
    scales: jax.Array,
    act: QuantSpec | None,
    wspec: QuantSpec | None,
    weight_axes: tuple[int, ...],
    channels: tuple[int, ...],
) -> jax.Array:
    """``||Q(X / s) Q(diag(s) W) - X W||^2 / ||X W||^2`` for every row ``s`` of ``scales``."""
    k = len(weight_axes)

    def matrix(a: jax.Array) -> jax.Array:
        return jnp.moveaxis(a, weight_axes, tuple(range(k))).reshape(xs.shape[1], -1)

    ref = jnp.matmul(xs, matrix(w), precision=_HI)

    def one(s: jax.Array) -> jax.Array:
        x = xs / s[None]
        if act is not None:
            x = fake_quant(x, act)
        moved = jnp.moveaxis(w, weight_axes, tuple(range(k)))
        ws = jnp.moveaxis(
            moved * s.reshape(channels + (1,) * (w.ndim - k)), tuple(range(k)), weight_axes
        )
        if wspec is not None:
            ws = fake_quant(ws, wspec)
        y = jnp.matmul(x, matrix(ws), precision=_HI)
        return jnp.sum(jnp.square(y - ref)) / jnp.maximum(jnp.sum(jnp.square(ref)), 1e-30)

    return jax.vmap(one)(scales)


# ------------------------------------------------------------------ arguments


def _check_alpha(value: Any, what: str) -> float:
    return check_real(value, what, ge=0.0, le=1.0, hint=" (the migration strength)")


def _check_alphas(alphas: Any) -> tuple[float, ...]:
    if alphas is None:
        return ALPHAS
    if isinstance(alphas, str | bytes) or not isinstance(alphas, Iterable):
        raise TypeError(
            f"{_FN}: alphas must be a sequence of numbers in [0, 1], got {describe(alphas)}."
        )
    out = tuple(_check_alpha(a, f"{_FN}: alphas[{i}]") for i, a in enumerate(alphas))
    if not out:
        raise ValueError(f"{_FN}: alphas is empty; give the grid (e.g. (0.3, 0.5, 0.7)).")
    return out


# ------------------------------------------------------------------ where the scales go


def _norm_params_problem(norm: str, node: Any, channels: tuple[int, ...]) -> str | None:
    if node is None:
        return f"no module {norm!r} holds parameters"
    scale = node.get("scale")
    if scale is None:
        return f"{norm!r} has no scale to divide (use_scale=False)"
    for name in ("scale", "bias"):
        v = node.get(name)
        if v is not None and tuple(np.shape(v)) != tuple(channels):
            return (
                f"{norm!r}'s {name} has shape {tuple(np.shape(v))}, not the layers' input "
                f"channels {tuple(channels)}"
            )
    return None
