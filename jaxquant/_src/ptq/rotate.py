"""Hadamard rotations for post-training quantization: QuaRot (Ashkboos et al. 2024,
https://arxiv.org/abs/2404.00456) and SpinQuant's random-Hadamard baseline (Liu et al. 2024,
https://arxiv.org/abs/2405.16406).

An orthogonal ``Q`` inserted on both sides of a product leaves it unchanged,
``x W = (x Q)(Q^T W)``, and a random Hadamard ``Q`` spreads every input channel evenly over
all of them: an activation channel hundreds of times the others no longer sets the
quantization scale of its row alone. Two ways to use it:

* :func:`rotate_inputs` (any Linen or NNX model): every quantized layer rotates its own
  input online (the ``"hadamard"`` activation transform of
  :mod:`jaxquant._src.flax.act_transform`, ``x -> (x * signs) H / sqrt(n)``, ``O(n log n)``
  per row) and its weight offline (``W' = H^T D W / sqrt(n)``). It smears outlier channels
  over the others rather than removing them.
* :func:`rotate_residual` (pre-LN transformers of :class:`jaxquant.app.models.ByteLM`'s
  structure): QuaRot's full recipe. Each LayerNorm's scale and bias are folded into the
  layers reading it, the residual writers are centered, and the residual stream is rotated
  by one orthogonal ``Q`` entirely offline -- the outliers a LayerNorm scale creates are
  gone, not smeared. Only the MLP's down projection rotates its input online (``gelu``
  does not commute with a rotation); the attention value / output pair is rotated per head
  offline.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant._src.checks import describe
from jaxquant._src.flax import quantize_model
from jaxquant._src.flax.act_transform import COLLECTION, PTQVariable, of_nnx
from jaxquant._src.flax.calibrate import call_args, check_call_kwargs
from jaxquant._src.flax.kinds import nnx_modules
from jaxquant._src.flax.rules import Rule, as_rules, first_match
from jaxquant._src.flax.statistics import LayerStatistics, layer_statistics
from jaxquant._src.hadamard import _nearest_supported, hadamard_supported, walsh_hadamard
from jaxquant._src.ptq.result import PTQResult
from jaxquant._src.rounding import check_key
from jaxquant._src.types import PyTree

__all__ = ["rotate_inputs", "rotate_residual"]


def _key(key: Any, fn: str) -> jax.Array:
    if key is None:
        return jax.random.key(0)
    check_key(key, f"{fn}: key")
    return key


def _signs(key: jax.Array, name: str, shape: tuple[int, ...]) -> jax.Array:
    """Random +-1 signs (float32) for the rotation called ``name``: one key per name, so a
    layer's rotation does not depend on which other layers were rotated."""
    k = jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)
    return jax.random.rademacher(k, shape, dtype=jnp.float32)


def _rotate_rows(w: Any, signs: jax.Array, axis: int) -> jax.Array:
    """``R^T W`` along ``axis`` of ``w`` for ``R = D H / sqrt(n)``, the inverse of the online
    transform ``x -> (x * signs) H / sqrt(n)``: ``(x R)(R^T W) = x W``. Computed in float32
    (or wider), returned in ``w``'s dtype."""
    w = jnp.asarray(w)
    shape = [1] * w.ndim
    shape[axis] = signs.shape[0]
    wide = w.astype(jnp.promote_types(w.dtype, jnp.float32))
    # walsh_hadamard along `axis` multiplies every vector along it by H^T: R^T W = H^T D W.
    out = walsh_hadamard(wide * jnp.reshape(signs, shape).astype(wide.dtype), axis=axis)
    return out.astype(w.dtype)


def _why_not(n: int) -> str:
    below, above = _nearest_supported(n)
    near = ", ".join(str(s) for s in (below, above) if s)
    return (
        f"no Hadamard construction covers its width {n} (covered: m * 2^k with m = 1 or a "
        f"Paley order 12, 20, 28, ...; nearest covered: {near})"
    )


# ----------------------------------------------------------------------- rotate_inputs


def _layer_problem(st: LayerStatistics, has_rotation: bool) -> str | None:
    """Why the online rotation cannot apply to a layer, or None."""
    if len(st.channels) != 1:
        return (
            f"it contracts {len(st.channels)} input axes {st.channels}; the online rotation "
            "acts on one contracted axis"
        )
    if st.param is None:
        return "its weight is computed by the model (no stored parameter to rotate offline)"
    if st.transposed is None:
        return (
            "its square weight was found by shape, so whether it is used transposed is "
            "unknown (the offline rotation would pick an axis by guess)"
        )
    if st.param.split("/")[-1] == "embedding":
        return (
            "its weight is an embedding table: the lookups read the same rows, which "
            "rotating them for the attend product would change"
        )
    if has_rotation:
        return "it already rotates its input (a 'hadamard' transform)"
    if not hadamard_supported(st.channels[0]):
        return _why_not(st.channels[0])
    return None


def _linen_get(tree: Mapping[str, Any], keys: Sequence[str]) -> Any:
    for k in keys:
        if not isinstance(tree, Mapping) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _linen_put(tree: dict[str, Any], keys: Sequence[str], value: Any) -> None:
    """Set ``tree[k0][k1]...`` to ``value``, copying the containers on the way (the
    caller's tree is never modified)."""
    for k in keys[:-1]:
        tree[k] = dict(tree.get(k) or {})
        tree = tree[k]
    tree[keys[-1]] = value


def _copy(variables: Mapping[str, Any]) -> dict[str, Any]:
    """New containers, the same leaves."""
    return jax.tree_util.tree_map(lambda a: a, _as_dict(variables))


def _as_dict(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _as_dict(v) for k, v in tree.items()}
    return tree


def rotate_inputs(
    model: nn.Module | nnx.Module,
    batches: Iterable[Any],
    variables: PyTree = None,
    *,
    rules: Rule | Iterable[Rule],
    layers: Sequence[str] | None = None,
    key: jax.Array | None = None,
    call_kwargs: Mapping[str, Any] | None = None,
) -> PTQResult:
    """Rotate every quantized layer's input by a random Hadamard matrix, online.

    For a layer ``y = x W`` with ``n`` input channels, ``R = D H / sqrt(n)`` (``H`` the
    Hadamard matrix of :func:`jaxquant.rotations.hadamard_matrix`, ``D`` random signs, one
    draw per layer) is orthogonal, so

    .. math::  x W = (x R) (R^\\top W).

    The weight becomes ``R^T W`` (offline, in the stored parameter) and the layer applies
    ``x -> x R`` to its input before the (quantized) contraction: the ``"hadamard"``
    online transform (Linen: ``variables["ptq"][<layer path>]["hadamard"] = signs``; NNX:
    ``layer.ptq_hadamard``), which runs when the model runs under
    :func:`jaxquant.flax.quantize_model` with rules matching the layer, in ``O(n log n)``
    per row (:func:`jaxquant.rotations.walsh_hadamard`). A layer's existing ``"smooth"``
    transform stays (it runs first; the rotation is composed after it).

    This is the generic, per-layer rotation: it works on any model, and spreads each
    outlier channel's magnitude over all channels of the row (SpinQuant, arXiv
    2405.16406, section 3). Where the outliers come from a normalization's scale,
    :func:`rotate_residual` removes them instead (QuaRot's folding).

    The layers are found by one calibration pass (:func:`jaxquant.flax.layer_statistics`
    without the Hessian): which layers run which weight contraction, and on which axis.

    Args:
      model: the float Linen or NNX model (or one from :func:`jaxquant.flax.quantize_model`).
      batches: calibration inputs, as :func:`jaxquant.flax.layer_statistics` takes them.
      variables: the Linen model's variables (every collection); None for NNX.
      rules: the rules that say which layers are quantized (those the user passes to
        ``quantize_model``).
      layers: the layer paths to rotate (default: every quantized layer, skipping those it
        cannot apply to, each listed in ``skipped`` with the reason). A layer named here
        that cannot be rotated raises.
      key: PRNG key of the random signs (default ``jax.random.key(0)``); each layer's signs
        come from the key folded with its path.
      call_kwargs: keyword arguments for every call of the model.

    Returns:
      A :class:`PTQResult`: ``variables`` (Linen: new variables with the rotated weights
      and the ``"ptq"`` collection; the input is not modified. NNX: the model, modified in
      place); ``report``: path -> ``{"size": n, "absmax_ratio": r}`` with ``r`` the
      max / median channel absmax of the layer's input before the rotation; ``skipped``:
      path -> why (a contraction over several axes, a weight the model computes, an
      embedding table, a width no Hadamard construction covers, a layer no batch reached).

    Raises:
      ValueError: a layer in ``layers`` that is not quantized or cannot be rotated (naming
        it and why); the errors of :func:`jaxquant.flax.layer_statistics`.
      TypeError: ``layers`` not a sequence of strings, ``key`` not a PRNG key.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, numpy as np, jaxquant as jq
      >>> from jaxquant._src.ptq.rotate import rotate_inputs
      >>> from jaxquant.flax import Rule, quantize_model
      >>> model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(4)])
      >>> x = jax.random.normal(jax.random.key(1), (8, 12))
      >>> variables = jax.jit(model.init)(jax.random.key(0), x)
      >>> rules = [Rule(".*", weight=jq.QuantSpec("int8"))]
      >>> out = rotate_inputs(model, [x], variables, rules=rules)
      >>> sorted(out.report), out.report["layers_0"]["size"]  # 12 = a Paley II order
      (['layers_0', 'layers_2'], 12)
      >>> ref = jax.jit(model.apply)(variables, x)
      >>> rot = jax.jit(quantize_model(model, Rule(".*")).apply)(out.variables, x)  # float rules
      >>> bool(np.allclose(rot, ref, atol=1e-5))
      True

    References:
      QuaRot (Ashkboos et al. 2024), https://arxiv.org/abs/2404.00456;
      SpinQuant (Liu et al. 2024), https://arxiv.org/abs/2405.16406.
    """
    fn = "rotate_inputs"
    key = _key(key, fn)
    if layers is not None:
        if isinstance(layers, str) or not all(isinstance(p, str) for p in layers):
            raise TypeError(
                f"{fn}: layers must be a sequence of layer paths (e.g. ['block0/fc2']) or "
                f"None for every quantized layer; got {describe(layers)}."
            )
        layers = list(layers)
    stats = layer_statistics(
        model, batches, variables, rules=rules, hessian=False, call_kwargs=call_kwargs
    )
    is_nnx = isinstance(model, nnx.Module)
    modules = dict(nnx_modules(model)) if isinstance(model, nnx.Module) else {}
    new = None if is_nnx else _copy(variables)
    ptq_in = {} if is_nnx else (_as_dict(variables).get(COLLECTION) or {})

    skipped: dict[str, str] = {}
    for path in stats.unreached:
        skipped[path] = "no calibration batch reached it"
    for path, why in stats.unsupported.items():
        skipped[path] = f"unsupported by the statistics pass: {why}"
    wanted = layers if layers is not None else list(stats)
    if layers is not None:
        for path in layers:
            if path in skipped or path not in stats:
                why = skipped.get(path) or (
                    f"no quantized layer has that path (the quantized layers: {list(stats)})"
                )
                raise ValueError(f"{fn}: cannot rotate the input of {path!r}: {why}.")
        skipped = {}  # the user named the layers: the others are not the method's to skip

    report: dict[str, dict[str, Any]] = {}
    for path in wanted:
        st = stats[path]
        keys = path.split("/") if path else []
        if is_nnx:
            has = (t := of_nnx(modules[path])) is not None and t.hadamard is not None
        else:
            has = _linen_get(ptq_in, [*keys, "hadamard"]) is not None
        problem = _layer_problem(st, has)
        if problem is not None:
            if layers is not None:
                raise ValueError(f"{fn}: cannot rotate the input of {path!r}: {problem}.")
            skipped[path] = problem
            continue
        n, param = st.channels[0], st.param
        assert param is not None  # _layer_problem refused a computed weight
        signs = _signs(key, path, (n,))
        axis = st.weight_axes[0]
        if is_nnx:
            owner = modules[path]
            *parents, leaf = param.split("/")
            for p in parents:
                owner = getattr(owner, p)
            var = getattr(owner, leaf)
            var[...] = _rotate_rows(var[...], signs, axis)
            modules[path].ptq_hadamard = PTQVariable(signs)  # type: ignore[attr-defined]
        else:
            assert new is not None
            pkeys = [*keys, *param.split("/")]
            w = _linen_get(new["params"], pkeys)
            _linen_put(new["params"], pkeys, _rotate_rows(w, signs, axis))
            _linen_put(new.setdefault(COLLECTION, {}), [*keys, "hadamard"], signs)
        absmax = np.asarray(st.absmax, np.float64)
        report[path] = {"size": n, "absmax_ratio": _ratio(absmax)}
    return PTQResult(model if is_nnx else new, report, skipped)


def _ratio(absmax: np.ndarray) -> float:
    """max / median of the channel absmax (the outlier measure; inf for a zero median)."""
    med = float(np.median(absmax))
    top = float(absmax.max()) if absmax.size else 0.0
    return top / med if med > 0 else (math.inf if top > 0 else 1.0)


# --------------------------------------------------------------------- rotate_residual

_BLOCK = re.compile(r"block\d+")
_BLOCK_LAYOUT = {
    "ln1": ("scale", "bias"),
    "ln2": ("scale", "bias"),
    "fc1": ("kernel", "bias"),
    "fc2": ("kernel", "bias"),
}
_ATTN = ("q", "k", "v", "o")


def _check_layout(params: Any, fn: str) -> list[str]:
    """The block names of a ByteLM-shaped params tree; a ValueError naming what differs."""

    def bad(what: str) -> ValueError:
        return ValueError(
            f"{fn}: the model does not have ByteLM's structure ({what}). rotate_residual "
            "rotates pre-LN transformers laid out as jaxquant.app.models.ByteLM (embed, pos, "
            "block<i>/{ln1, attn/{q,k,v,o}, ln2, fc1, fc2}, ln_f, head); for any other model "
            "rotate each layer's input online with rotate_inputs."
        )

    if not isinstance(params, Mapping):
        raise bad(f"params is {describe(params)}")
    blocks = sorted((k for k in params if _BLOCK.fullmatch(k)), key=lambda k: int(k[5:]))
    expected = {"embed", "pos", "ln_f", "head", *blocks}
    if set(params) != expected or not blocks:
        raise bad(f"its params hold {sorted(params)}")
    if blocks != [f"block{i}" for i in range(len(blocks))]:
        raise bad(f"its blocks are {blocks}")
    for b in blocks:
        blk = params[b]
        if not isinstance(blk, Mapping) or set(blk) != {*_BLOCK_LAYOUT, "attn"}:
            raise bad(f"{b} holds {sorted(blk) if isinstance(blk, Mapping) else blk}")
        for name, leaves in _BLOCK_LAYOUT.items():
            if set(blk[name]) != set(leaves):
                raise bad(f"{b}/{name} holds {sorted(blk[name])}, expected {list(leaves)}")
        if set(blk["attn"]) != set(_ATTN) or any(
            set(blk["attn"][p]) != {"kernel", "bias"} for p in _ATTN
        ):
            raise bad(f"{b}/attn holds {sorted(blk['attn'])}")
    if set(params["ln_f"]) != {"scale", "bias"} or set(params["head"]) != {"kernel", "bias"}:
        raise bad("ln_f or head lacks its scale / bias or kernel / bias")
    if set(params["embed"]) != {"embedding"}:
        raise bad(f"embed holds {sorted(params['embed'])}")
    return blocks


def _residual_rotation(d: int, key: jax.Array) -> Any:
    """``x -> x Q`` along an axis for ``Q = P^T D P``, ``P = H diag(r) / sqrt(d)`` with
    ``r`` the first row of ``H`` (so ``P 1 = sqrt(d) e_0``) and ``D`` random signs.

    ``Q`` is orthogonal and maps the ones vector to ``+-1``: a residual with zero mean keeps
    zero mean, so a LayerNorm (which subtracts the mean) of the rotated residual is the
    rotated LayerNorm, exactly. ``x -> x R`` for a plain random Hadamard ``R = D H``
    would not (it sends the ones direction to a coordinate axis).
    """
    h0 = walsh_hadamard(jnp.eye(1, d, dtype=jnp.float32), normalize=False)[0]  # row 0 of H
    signs = _signs(key, "residual", (d,))

    def rot(a: Any, axis: int) -> jax.Array:
        a = jnp.asarray(a)
        wide = jnp.moveaxis(a.astype(jnp.promote_types(a.dtype, jnp.float32)), axis, -1)
        r, dd = (
            jnp.reshape(v, (1,) * (wide.ndim - 1) + (d,)).astype(wide.dtype) for v in (h0, signs)
        )
        # x P^T = (x * r) H^T / sqrt(d); then * D; then (.) P = ((.) H / sqrt(d)) * r
        y = walsh_hadamard(wide * r, transpose=True)
        y = walsh_hadamard(y * dd) * r
        return jnp.moveaxis(y, -1, axis).astype(a.dtype)

    return rot


def _center(a: Any) -> jax.Array:
    """``a`` minus its mean over the last (residual) axis: a residual writer whose outputs
    have zero mean."""
    a = jnp.asarray(a)
    wide = a.astype(jnp.promote_types(a.dtype, jnp.float32))
    return (wide - wide.mean(axis=-1, keepdims=True)).astype(a.dtype)


def _fold(ln: Mapping[str, Any], layer: Mapping[str, Any]) -> dict[str, Any]:
    """A Dense layer reading ``LayerNorm(x) = n(x) * scale + bias`` with the scale and bias
    folded in: ``kernel' = diag(scale) kernel``, ``bias' = bias_layer + bias_ln kernel``."""
    k = jnp.asarray(layer["kernel"])
    wide = k.astype(jnp.promote_types(k.dtype, jnp.float32))
    scale = jnp.asarray(ln["scale"]).astype(wide.dtype)
    shift = jnp.asarray(ln["bias"]).astype(wide.dtype)
    b = jnp.asarray(layer["bias"])
    new_b = b.astype(wide.dtype) + jnp.dot(shift, wide, precision=jax.lax.Precision.HIGHEST)
    return {"kernel": (scale[:, None] * wide).astype(k.dtype), "bias": new_b.astype(b.dtype)}


def rotate_residual(
    model: nn.Module,
    batches: Iterable[Any],
    variables: PyTree = None,
    *,
    rules: Rule | Iterable[Rule],
    key: jax.Array | None = None,
    call_kwargs: Mapping[str, Any] | None = None,
    check_tolerance: float = 1e-3,
) -> PTQResult:
    """QuaRot's rotation of a pre-LN transformer: outlier channels removed, not smeared.

    For Linen models with the structure of :class:`jaxquant.app.models.ByteLM` (checked by
    name on the params: ``embed``, ``pos``, ``block<i>/{ln1, attn/{q,k,v,o}, ln2, fc1,
    fc2}``, ``ln_f``, ``head``), whose computation is assumed to be

    * ``x = embed[tokens] + pos``; per block ``x += o(attention(ln1(x)))`` with
      ``q, k, v`` reading ``ln1(x)`` and the heads laid out head-major on ``q, k, v``'s
      outputs (``reshape(b, t, heads, d / heads)``), then ``x += fc2(act(fc1(ln2(x))))``;
      ``logits = head(ln_f(x))``;
    * every LayerNorm is Flax's ``nn.LayerNorm`` over the last axis, and nothing else reads
      or writes the residual stream,

    and checked by running the model: the rotated float model's outputs on the first batch
    must equal the original's (relative max error ``check_tolerance``), else ValueError.

    Steps (Ashkboos et al. 2024, section 4; Ashkboos et al. 2024, SliceGPT, arXiv
    2401.15024, for the LayerNorm folding):

    1. Fold each LayerNorm's ``scale`` and ``bias`` into the Dense layers that read it
       (``W' = diag(scale) W``, ``b' = b + bias W``; ``q, k, v`` for ``ln1``, ``fc1`` for
       ``ln2``, ``head`` for ``ln_f``); the LayerNorm keeps ``scale = 1``, ``bias = 0``.
       Outlier channels a LayerNorm's scale creates move into the weights.
    2. Center the residual writers (``embed``, ``pos``, ``o``'s and ``fc2``'s output
       columns and biases): the residual then has zero mean at every position, which
       LayerNorm subtracts anyway, so the function is unchanged and LayerNorm acts as
       RMSNorm.
    3. Rotate the residual stream by one orthogonal ``Q = P^T D P`` (``P`` the normalized
       Hadamard matrix of order ``d`` with its first row made all ones, ``D`` random
       signs): writers ``W <- W Q``, readers ``W <- Q^T W``. ``Q`` maps the ones vector to
       itself (up to sign), so a zero-mean residual stays zero-mean and LayerNorm of the
       rotated residual is the rotated LayerNorm, exactly -- with the model's code
       unchanged. (QuaRot's plain random Hadamard ``D H`` does not preserve the ones vector;
       with it LayerNorm would have to become RMSNorm in the code.)
    4. Rotate each attention head's values and the matching rows of ``o`` by a random
       Hadamard of order ``d / heads`` (offline: attention mixes positions, not features,
       so it cancels).
    5. The MLP's down projection ``fc2`` rotates its input online (the ``"hadamard"``
       transform, order ``hidden``), since the activation between ``fc1`` and ``fc2``
       does not commute with a rotation -- only when a rule matches ``fc2`` (the transform
       runs only in layers ``quantize_model``'s rules match), else it is in ``skipped``.

    Queries and keys are not rotated online (a KV cache would want that; no cache here).

    Args:
      model: the float ``ByteLM`` (Linen). NNX models are refused (TypeError).
      batches: calibration inputs; the first one checks that the rotation kept the function.
      variables: the model's variables; ``"params"`` is rotated, the input not modified. A
        ``"ptq"`` collection from an earlier method is refused (rotate first, then smooth).
      rules: the rules that will quantize the model (which layers get the online
        rotation).
      key: PRNG key of the random signs (default ``jax.random.key(0)``).
      call_kwargs: keyword arguments for every call of the model.
      check_tolerance: largest allowed ``max |y' - y| / max |y|`` over the first batch's
        outputs.

    Returns:
      A :class:`PTQResult`: new ``variables`` (rotated params plus a ``"ptq"`` collection
      with ``fc2``'s signs); ``report``: every rotated layer path -> what was done to it
      (``{"input": "residual" | "heads" | "online", "size": n}``), and ``"residual"`` ->
      ``{"size": d, "check_error": e}`` (the relative output difference measured);
      ``skipped``: layers the rules quantize whose online rotation could not be added.

    Raises:
      TypeError: an NNX model, or a model whose parameter tree is not ByteLM's.
      ValueError: a params layout other than ByteLM's, a width or head size no Hadamard
        construction covers, an existing ``"ptq"`` collection, or outputs that changed
        beyond ``check_tolerance`` (a model that computes something else than assumed).

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, jaxquant as jq
      >>> from jaxquant._src.ptq.rotate import rotate_residual
      >>> from jaxquant.app.models import ByteLM
      >>> from jaxquant.flax import Rule, quantize_model
      >>> lm = ByteLM(seq=8, d=16, layers=1, heads=2, hidden=32)
      >>> tok = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) * 7
      >>> variables = jax.jit(lm.init)(jax.random.key(0), tok)
      >>> rules = [Rule(r"block\\d+/.*|head", weight=jq.QuantSpec("int8"))]
      >>> out = rotate_residual(lm, [tok], variables, rules=rules)
      >>> out.report["block0/fc2"], out.report["residual"]["check_error"] < 1e-5
      ({'input': 'online', 'size': 32}, True)
      >>> rot = jax.jit(quantize_model(lm, Rule(".*")).apply)(out.variables, tok)  # float rules
      >>> bool(np.allclose(rot, jax.jit(lm.apply)(variables, tok), atol=1e-4))
      True

    References:
      QuaRot (Ashkboos et al. 2024), https://arxiv.org/abs/2404.00456;
      SliceGPT (Ashkboos et al. 2024), https://arxiv.org/abs/2401.15024;
      SpinQuant (Liu et al. 2024), https://arxiv.org/abs/2405.16406.
    """
    fn = "rotate_residual"
    if isinstance(model, nnx.Module) or not isinstance(model, nn.Module):
        raise TypeError(
            f"{fn}: model must be a Linen module with jaxquant.app.models.ByteLM's structure, "
            f"got {type(model).__name__}; for NNX models (or any other structure) rotate each "
            "layer's input online with rotate_inputs."
        )
    key = _key(key, fn)
    call_kwargs = check_call_kwargs(call_kwargs, fn)
    rules_t = as_rules(rules)
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise TypeError(
            f"{fn}: variables must be the model's variables (a dict with 'params', what "
            f"model.init returned), got {describe(variables)}."
        )
    if variables.get(COLLECTION):
        raise ValueError(
            f"{fn}: the variables already hold online transforms ({COLLECTION!r} collection, "
            "from an earlier method); the residual rotation would invalidate them. Rotate "
            "first, then smooth / GPTQ."
        )
    batch_list = list(batches)
    if not batch_list:
        raise ValueError(f"{fn}: batches is empty; give at least one model input to check on.")
    params = _as_dict(variables["params"])
    blocks = _check_layout(params, fn)
    d = int(np.shape(params["ln_f"]["scale"])[0])
    heads = getattr(model, "heads", None)
    if not isinstance(heads, int) or heads < 1 or d % heads:
        raise ValueError(
            f"{fn}: the model's heads ({heads!r}) must be an int dividing d={d} (ByteLM's field)."
        )
    dh = d // heads
    hidden = int(np.shape(params[blocks[0]]["fc1"]["kernel"])[1])
    for size, what in ((d, "the residual width d"), (dh, "the head size d / heads")):
        if not hadamard_supported(size):
            raise ValueError(f"{fn}: {what} is {size}: {_why_not(size)}.")

    rot = _residual_rotation(d, key)
    new = _copy(variables)
    p = new["params"]
    report: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}

    def reader(ln: Mapping[str, Any], layer: Mapping[str, Any]) -> dict[str, Any]:
        folded = _fold(ln, layer)
        return {"kernel": rot(folded["kernel"], 0), "bias": folded["bias"]}

    def writer(layer: Mapping[str, Any]) -> dict[str, Any]:
        return {"kernel": rot(_center(layer["kernel"]), 1), "bias": rot(_center(layer["bias"]), 0)}

    def unit_norm(ln: Mapping[str, Any]) -> dict[str, Any]:
        return {"scale": jnp.ones_like(ln["scale"]), "bias": jnp.zeros_like(ln["bias"])}

    p["embed"] = {"embedding": rot(_center(params["embed"]["embedding"]), 1)}
    p["pos"] = rot(_center(params["pos"]), 1)
    ptq: dict[str, Any] = {}
    for b in blocks:
        src, blk = params[b], p[b]
        attn = dict(blk["attn"])
        for name in ("q", "k", "v"):
            attn[name] = reader(src["ln1"], src["attn"][name])
            report[f"{b}/attn/{name}"] = {"input": "residual", "size": d}
        # per head: v's output columns x R_h, o's input rows R_h^T x (attention mixes
        # positions only, so the pair cancels)
        hsigns = _signs(key, f"{b}/heads", (heads, dh))
        v = attn["v"]
        vk = jnp.asarray(v["kernel"]).reshape(d, heads, dh)
        vk = walsh_hadamard(vk * hsigns[None].astype(vk.dtype), axis=-1)
        vb = jnp.asarray(v["bias"]).reshape(heads, dh)
        vb = walsh_hadamard(vb * hsigns.astype(vb.dtype), axis=-1)
        attn["v"] = {"kernel": vk.reshape(d, d), "bias": vb.reshape(d)}
        o = writer(src["attn"]["o"])
        ok = jnp.asarray(o["kernel"]).reshape(heads, dh, d)
        ok = walsh_hadamard(ok * hsigns[:, :, None].astype(ok.dtype), axis=1)
        attn["o"] = {"kernel": ok.reshape(d, d), "bias": o["bias"]}
        report[f"{b}/attn/o"] = {"input": "heads", "size": dh}
        blk["attn"] = attn
        blk["ln1"], blk["ln2"] = unit_norm(src["ln1"]), unit_norm(src["ln2"])
        blk["fc1"] = reader(src["ln2"], src["fc1"])
        report[f"{b}/fc1"] = {"input": "residual", "size": d}
        fc2 = writer(src["fc2"])
        path = f"{b}/fc2"
        if first_match(rules_t, path) is None:
            skipped[path] = (
                "no rule matches it, and its online input rotation runs only in layers "
                "quantize_model's rules match (add Rule(...) for it to rotate it in float)"
            )
        elif not hadamard_supported(hidden):
            skipped[path] = _why_not(hidden)
        else:
            signs = _signs(key, path, (hidden,))
            fc2 = {"kernel": _rotate_rows(fc2["kernel"], signs, 0), "bias": fc2["bias"]}
            ptq[b] = {"fc2": {"hadamard": signs}}
            report[path] = {"input": "online", "size": hidden}
        blk["fc2"] = fc2
    p["head"] = reader(params["ln_f"], params["head"])
    report["head"] = {"input": "residual", "size": d}
    p["ln_f"] = unit_norm(params["ln_f"])
    if ptq:
        new[COLLECTION] = ptq

    # The structural assumptions, checked: the rotated float model computes the same.
    args, kwargs = call_args(batch_list[0])
    kwargs = {**kwargs, **call_kwargs}
    # one compiled program each (the batch a constant of it): eager applies dispatch op by op
    ref = jax.jit(lambda v: model.apply(v, *args, **kwargs))(variables)
    floats = quantize_model(model, Rule(".*"))  # no specs: float, online transforms applied
    got = jax.jit(lambda v: floats.apply(v, *args, **kwargs))(new)
    ref_a, got_a = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    if ref_a.shape != got_a.shape:
        raise ValueError(f"{fn}: the rotated model's outputs have another shape.")
    err = float(np.abs(got_a - ref_a).max() / max(np.abs(ref_a).max(), 1e-30))
    if not err <= check_tolerance:
        raise ValueError(
            f"{fn}: the rotated float model's outputs differ from the original's by {err:.3g} "
            f"(relative max), more than check_tolerance={check_tolerance}: the model does "
            "not compute what ByteLM's structure assumes (see the docstring), or its "
            "weights are too far from float32's range. Rotate its layers' inputs online "
            "with rotate_inputs instead."
        )
    report["residual"] = {"size": d, "check_error": err}
    return PTQResult(new, report, skipped)
