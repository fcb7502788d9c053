"""Flax integration: one rule-based ``quantize_model`` for Linen and NNX models."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar, overload

import flax.linen as nn
import jax
from flax import nnx as flax_nnx  # not `nnx`: the submodule jaxquant._src.flax.nnx

from jaxquant._src.checks import check_bool, check_int, describe
from jaxquant._src.dot.probe import ERRORS, OVERWRITE, Probe
from jaxquant._src.flax.calibrate import CalibrationResult, calibrate
from jaxquant._src.flax.intercept import Contraction
from jaxquant._src.flax.linen import QuantizedModule, quantize_linen, report_linen
from jaxquant._src.flax.nnx import (
    OverwriteWithGradient,
    QuantState,
    contractions_nnx,
    last_contractions,
    quantize_nnx,
    report_nnx,
)
from jaxquant._src.flax.nnx import QuantOp as NnxQuantOp
from jaxquant._src.flax.policy import NnxPolicyModule, Policy, PolicyModule, apply_policy
from jaxquant._src.flax.rules import Match, Rule, as_rules
from jaxquant._src.flax.sensitivity import (
    Assignment,
    LayerSensitivity,
    Sensitivity,
    mixed_precision,
    sensitivity,
)
from jaxquant._src.flax.serve import convert_linen, convert_nnx
from jaxquant._src.flax.statistics import LayerStatistics, Statistics, layer_statistics
from jaxquant._src.types import KeyPath, PyTree

# An NNX model: quantize_model and convert modify it in place and return it, same type.
N = TypeVar("N", bound=flax_nnx.Module)


@overload
def quantize_model(
    model: nn.Module,
    rules: Rule | Iterable[Rule],
    *,
    strict: bool = True,
    rngs: None = None,
    delayed_grad: bool = False,
    errors: bool = False,
) -> QuantizedModule: ...


@overload
def quantize_model(
    model: N,
    rules: Rule | Iterable[Rule],
    *,
    strict: bool = True,
    rngs: flax_nnx.Rngs | None = None,
    delayed_grad: bool = False,
    errors: bool = False,
) -> N: ...


def quantize_model(
    model: nn.Module | flax_nnx.Module,
    rules: Rule | Iterable[Rule],
    *,
    strict: bool = True,
    rngs: flax_nnx.Rngs | None = None,
    delayed_grad: bool = False,
    errors: bool = False,
) -> QuantizedModule | flax_nnx.Module:
    """Quantization-aware training for an existing Flax model, chosen by rules.

    Every contraction inside a module whose path matches a rule (first match wins,
    :func:`re.fullmatch`) is quantized with the rule's :class:`~jaxquant.QuantConfig`,
    whatever computes it: Flax's layers (below), and the ``lax.dot_general`` /
    ``lax.conv_general_dilated`` / ``jnp.einsum`` / ``jnp.dot`` / ``jnp.matmul`` / ``@``
    a module calls itself (Hugging Face's ``FlaxConv1D``, ``Embed.attend``, a subclass
    with its own ``__call__``), intercepted while the model runs; :func:`contractions`
    lists them all, quantized or not and why. Each ``nn.Dense`` / ``nn.DenseGeneral`` /
    ``nn.Einsum`` / ``nn.Conv`` (Linen) or ``nnx.Linear`` / ``nnx.LinearGeneral`` /
    ``nnx.Einsum`` / ``nnx.Conv`` (NNX) that matches computes its product with
    :func:`jaxquant.dot_general` / :func:`jaxquant.einsum` /
    :func:`jaxquant.conv_general_dilated`: ``lhs_spec=rule.act``, ``rhs_spec=rule.weight``,
    ``grad_spec=rule.grad``; real int8 / fp8 compute where the backend has it,
    straight-through gradients. Rules with delayed scaling, learned step sizes (LSQ) or
    stochastic rounding keep their state in the ``"quant_state"`` collection (Linen; LSQ
    steps in ``"params"``) or in :class:`QuantState` / ``nnx.Param`` variables (NNX); see
    :class:`Rule`. Named recipes: :mod:`jaxquant.recipes`.

    * Linen: returns a new module, :class:`QuantizedModule`, with exactly the model's
      variables tree (existing params and TrainStates work); the model is not modified.
    * NNX: modifies ``model`` in place (no copy of any parameter, no forward pass) and
      returns it.

    A rule that matches no quantizable module raises ValueError listing the paths that
    exist (``strict=True``), or warns (``strict=False``); never a silent no-op. For Linen
    the check runs when the model first runs (``init`` / ``apply``), since Linen modules
    only exist then.

    Args:
      model: a ``flax.linen.Module`` or a ``flax.nnx.Module``.
      rules: a :class:`Rule` or a sequence of them.
      strict: raise (True) or warn (False) for rules that match nothing.
      rngs: NNX only: an ``nnx.Rngs`` with a ``quant`` stream, required when a rule rounds
        stochastically (Linen models take ``rngs={"quant": key}`` in ``apply`` instead).
      delayed_grad: rules with ``scaling="delayed"`` and a (per-tensor) ``grad`` spec also
        quantize the output gradient with a delayed scale (Transformer Engine): an amax
        history of the earlier steps' gradients, ``history_len`` / ``margin`` and the rules
        of :func:`jaxquant.delayed_scaling` (the first step uses the gradient's own
        scale). Off: the gradient is scaled per step (current scaling).
      errors: every quantized ``dot_general`` / ``einsum`` product (not convolutions, LSQ
        rules, or a weight on the left of a product) reports, each step, the forward
        output's, the input gradient's (dgrad) and the weight gradient's (wgrad) SQNR in dB
        against float products of the same operands, and the saturation / underflow
        fractions of the activation, weight and gradient (rounded to nearest); read them
        with :func:`layer_errors`. Costs one float reference GEMM per quantized GEMM (three
        per layer and step) and keeps the float operands for the backward pass.

    **What the backward pass writes** (``delayed_grad`` / ``errors``). Flax writes mutable
    collections in the forward pass; the gradient's amax and the backward errors exist only
    in the backward pass. They are carried out as *gradients* of float32 variables kept under
    a key ending with ``"_overwrite_with_gradient"`` (flax's ``OVERWRITE_WITH_GRADIENT``): in
    Linen's ``params`` collection, in NNX :class:`OverwriteWithGradient` (an ``nnx.Param``)
    variables, so the usual ``jax.grad(loss)(params)`` / ``nnx.grad`` returns them. Wrap the
    optimizer with :func:`jaxquant.optax.overwrite_with_gradient`, which writes their
    gradient as their new value and hands every other parameter to the optimizer; the step
    itself does not change. Without the wrapper the optimizer would step them like weights
    (Adam moments on an amax history): the next step finds a count that is not a whole number
    and turns that layer's gradients into NaN, so the loss goes NaN at once. A layer called
    several times in one step gets the sum of its calls' gradients; the wrapper divides by the
    number of calls (the newest amax is then the calls' mean).

    Returns:
      The quantized model; :func:`report` lists what was quantized with which rule.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxquant as jq
      >>> from jaxquant.flax import Rule, quantize_model, report
      >>> rule = Rule("layers_0", weight=jq.QuantSpec("int8", jq.per_channel(-1)),
      ...             act=jq.QuantSpec("int8"))
      >>> qmodel = quantize_model(nn.Sequential([nn.Dense(4), nn.Dense(2)]), [rule])
      >>> params = jax.jit(qmodel.init)(jax.random.key(0), jnp.ones((1, 3)))
      >>> [(m.path, m.module) for m in report(qmodel)]
      [('layers_0', 'Dense')]
    """
    rs = as_rules(rules)
    strict = check_bool(strict, "quantize_model: strict")
    probe = Probe(
        delayed_grad=check_bool(delayed_grad, "quantize_model: delayed_grad"),
        errors=check_bool(errors, "quantize_model: errors"),
    )
    for r in rs:  # configs a probe cannot serve: now, naming the rule
        if r.quantizes:
            from jaxquant._src.dot import probe as probe_lib

            probe_lib.check(probe, r.config, f"quantize_model: rule {r.pattern!r}")
    if isinstance(model, nn.Module):
        if rngs is not None:
            raise TypeError(
                "quantize_model: a Linen model takes its PRNG keys in apply "
                "(rngs={'quant': key}), not rngs= here."
            )
        return quantize_linen(model, rs, strict, probe)
    if isinstance(model, flax_nnx.Module):
        return quantize_nnx(model, rs, strict, rngs, probe)
    raise TypeError(
        f"quantize_model: expected a flax.linen.Module or flax.nnx.Module, got "
        f"{type(model).__name__}."
    )


@overload
def convert(
    model: QuantizedModule,
    variables: PyTree,
    *,
    load: Callable[[KeyPath, jax.ShapeDtypeStruct], jax.typing.ArrayLike] | None = None,
    delete: bool = False,
) -> PyTree: ...


@overload
def convert(
    model: N,
    variables: None = None,
    *,
    load: Callable[[str, jax.ShapeDtypeStruct], jax.typing.ArrayLike] | None = None,
    delete: bool = False,
) -> N: ...


def convert(
    model: QuantizedModule | flax_nnx.Module,
    variables: PyTree = None,
    *,
    load: Callable[[Any, jax.ShapeDtypeStruct], jax.typing.ArrayLike] | None = None,
    delete: bool = False,
) -> PyTree:
    """Convert the kernels a quantized model's rules quantize to QArrays, for serving.

    Each quantized weight becomes a :class:`~jaxquant.QArray` of its rule's weight spec: a
    Flax layer's ``kernel``, and the parameter a module uses in a contraction it computes
    itself (``FlaxConv1D``'s kernel, a tied ``Embed`` table; one used as ``param.T`` is
    stored with the spec's axes reversed). Those modules are served on their dequantized
    parameters, re-quantized by the interception with the same spec: the same codes for
    ``absmax`` weight calibration (the scale may differ in its last bit). Formats: int8
    values, int4 packed two per byte, NF4 codes, fp8, MX...; converted one leaf at a time by
    :func:`jaxquant.quantize_tree`; nothing else is kept of it (no float copy). The quantized
    model then runs on the converted params: weight-only rules multiply in the activation's
    dtype, rules with an activation spec quantize the activation (static scales from
    :func:`calibrate`'s rules) and run int8 / fp8 GEMMs where both operands allow (see
    :mod:`jaxquant._src.serve`).

    Args:
      model: from :func:`quantize_model`. Linen: it must have run once (``init``,
        ``apply`` or ``jax.eval_shape`` of them) so that its layers are known. NNX: it is
        converted in place; the weights of modules that compute their own contractions
        are known once it has run (before, only Flax layers' kernels are converted).
      variables: Linen: the variables (or params) to convert; NNX: None.
      load: for abstract kernels (``jax.eval_shape``): ``load(path, leaf) -> array``.
      delete: Linen: free each float kernel once converted (the caller's arrays).

    Returns:
      Linen: the converted variables (``model.apply(converted, x)`` serves them). NNX:
      the model.

    Raises:
      ValueError: a Linen model that has not run, params without a matched layer's
        kernel, a kernel already converted, a stateful rule (delayed scaling, LSQ or
        stochastic rounding: calibrate static scales first).

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxquant as jq
      >>> from jaxquant.flax import Rule, quantize_model, convert
      >>> rule = Rule(".*", weight=jq.QuantSpec("int4", jq.per_block(0, 32)))
      >>> qmodel = quantize_model(nn.Dense(64), rule)
      >>> variables = jax.jit(qmodel.init)(jax.random.key(0), jnp.ones((2, 64)))
      >>> served = convert(qmodel, variables)
      >>> served["params"]["kernel"].values.shape, served["params"]["kernel"].values.dtype
      ((64, 32), dtype('uint8'))
      >>> jax.jit(qmodel.apply)(served, jnp.ones((2, 64))).shape
      (2, 64)
    """
    delete = check_bool(delete, "jq.flax.convert: delete")
    if load is not None and not callable(load):
        raise TypeError(
            f"jq.flax.convert: load must be a function (path, abstract_leaf) -> array, or "
            f"None, got {describe(load)}."
        )
    if isinstance(model, QuantizedModule):
        if variables is None:
            raise ValueError("jq.flax.convert: a Linen model needs its variables to convert.")
        matches = report_linen(model)
        found = model.record.contractions
        return convert_linen(variables, matches, found, load=load, delete=delete)
    if isinstance(model, flax_nnx.Module):
        if variables is not None:
            raise ValueError(
                "jq.flax.convert: an NNX model is converted in place; pass no variables."
            )
        if delete:
            raise ValueError("jq.flax.convert: delete= is for Linen variables.")
        return convert_nnx(model, report_nnx(model), last_contractions(model), load=load)
    raise TypeError(
        f"jq.flax.convert: expected a model returned by quantize_model, got {type(model).__name__}."
    )


def contractions(model: QuantizedModule | flax_nnx.Module) -> list[Contraction]:
    """Every contraction the last call of a quantized model ran, in call order: where
    (module path and class), what (``dot_general``, ``einsum``, ``dot``, ``matmul``, ``@``,
    ``conv_general_dilated``, with operand shapes), which operand is the weight, and
    whether it was quantized or why not (no rule matches, a rule without specs, two
    activations, an unsupported form).

    :func:`quantize_model` quantizes every contraction inside a matched module, whatever
    calls it: Flax's layers, ``lax.dot_general`` in a custom layer (Hugging Face's
    ``FlaxConv1D``), ``jnp.dot`` in ``Embed.attend`` (tied heads), ``x @ kernel`` in a
    subclass. The weight operand is the one that is a parameter of the module (or has the
    shape of one or of its transpose).

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxquant as jq
      >>> from jaxquant.flax import Rule, contractions, quantize_model
      >>> class Tied(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, ids):
      ...         embed = nn.Embed(16, 8)
      ...         return embed.attend(nn.Dense(8)(embed(ids)))
      >>> qmodel = quantize_model(Tied(), Rule(".*", weight=jq.QuantSpec("int8")))
      >>> variables = jax.jit(qmodel.init)(jax.random.key(0), jnp.zeros((2,), jnp.int32))
      >>> [(c.path, c.op, c.quantized) for c in contractions(qmodel)]
      [('Dense_0', 'dot_general', True), ('Embed_0', 'dot', True)]
    """
    if isinstance(model, QuantizedModule):
        report_linen(model)  # raises if the model has not run yet
        return list(model.record.contractions)
    if isinstance(model, flax_nnx.Module):
        return contractions_nnx(model)
    raise TypeError(
        "jq.flax.contractions: expected a model returned by quantize_model, got "
        f"{type(model).__name__}."
    )


def report(model: QuantizedModule | flax_nnx.Module) -> list[Match]:
    """The quantized modules of a model from :func:`quantize_model`: ``Match(path, module,
    rule)`` per module, in graph order (NNX) or call order (Linen, from the last call).

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> from flax import nnx
      >>> from jaxquant.flax import Rule, quantize_model, report
      >>> class MLP(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.l1, self.l2 = nnx.Linear(3, 4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)
      ...     def __call__(self, x):
      ...         return self.l2(self.l1(x))
      >>> model = quantize_model(MLP(nnx.Rngs(0)), Rule("l1", weight=jq.QuantSpec("int8")))
      >>> [(m.path, m.module) for m in report(model)]
      [('l1', 'Linear')]
    """
    if isinstance(model, QuantizedModule):
        return report_linen(model)
    if isinstance(model, flax_nnx.Module):
        return report_nnx(model)
    raise TypeError(
        f"jq.flax.report: expected a model returned by quantize_model, got {type(model).__name__}."
    )


# Names between a layer's path and its probe state: Linen's QuantOp child, NNX's product
# attributes.
_OPS = ("quant", "dot_general", "einsum_op")
_PRODUCT = re.compile(r"jq(\d+)" + re.escape(OVERWRITE))


def _key_name(k: Any) -> Any:
    return getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))


def _finite_float(x: Any) -> Any:
    a = jax.numpy.asarray(x)
    return float(a) if a.ndim == 0 and not isinstance(a, jax.core.Tracer) else a


def layer_errors(tree: Any) -> dict[str, dict[str, Any]]:
    """The per-layer errors of a model quantized with ``errors=True``, by layer path.

    Pass the gradients of a step (``jax.grad`` of the loss in the parameters: the errors of
    that step) or the params after an optimizer wrapped with
    :func:`jaxquant.optax.overwrite_with_gradient` (the last step's). Linen: the params (or
    the variables, or their gradients); NNX: ``nnx.state(model)`` or ``nnx.grad``'s state.

    Each layer gets ``fwd_sqnr``, ``dgrad_sqnr``, ``wgrad_sqnr`` (dB, capped at +-300:
    an exact product) and ``{act,weight,grad}_{saturation,underflow}`` (fractions), each the
    mean over the layer's calls in the step. A module with several quantized products
    reports them as ``path``, ``path#1``, ...; layers stacked by ``nnx.vmap`` give arrays
    with the stack axes. Jit-safe (values are arrays under a trace, floats otherwise).

    Args:
      tree: a pytree holding the ``"_overwrite_with_gradient"`` variables of
        ``errors=True`` (dicts, ``nnx.State``, FrozenDicts).

    Returns:
      ``{layer_path: {metric: value}}`` in the tree's order.

    Raises:
      ValueError: no errors in ``tree`` (the model was quantized without ``errors=True``).

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxquant as jq
      >>> from jaxquant.flax import Rule, layer_errors, quantize_model
      >>> model = quantize_model(nn.Sequential([nn.Dense(8), nn.Dense(2)]),
      ...                        Rule(".*", weight=jq.QuantSpec("int8")), errors=True)
      >>> x = jnp.ones((4, 3))
      >>> params = jax.jit(model.init)(jax.random.key(0), x)["params"]
      >>> grads = jax.jit(jax.grad(lambda p: model.apply({"params": p}, x).sum()))(params)
      >>> errs = layer_errors(grads)
      >>> list(errs), errs["layers_1"]["fwd_sqnr"] > 30
      (['layers_0', 'layers_1'], True)
    """
    out: dict[str, dict[str, Any]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [_key_name(k) for k in path]
        at = [i for i, n in enumerate(names) if isinstance(n, str) and n.endswith(OVERWRITE)]
        if not at or len(names) < at[0] + 3 or names[at[0] + 1] != "errors":
            continue
        i = at[0]
        mark, metric = names[i], names[i + 2]
        layer = [str(n) for n in names[:i]]
        if layer and layer[0] in ("params", OVERWRITE):  # Linen's collection
            layer = layer[1:]
        found = _PRODUCT.fullmatch(str(mark))
        if found is None and layer and layer[-1] in _OPS:
            layer = layer[:-1]
        key = "/".join(layer)
        if found is not None and int(found.group(1)) > 0:
            key = f"{key}#{found.group(1)}"
        out.setdefault(key, {})[str(metric)] = leaf
    if not out:
        raise ValueError(
            "layer_errors: the tree holds no per-layer errors; quantize the model with "
            "quantize_model(model, rules, errors=True) and pass the gradients of a step (or "
            "the params after jq.optax.overwrite_with_gradient's update)."
        )
    result: dict[str, dict[str, Any]] = {}
    for key, metrics in out.items():
        calls = jax.numpy.maximum(jax.numpy.asarray(metrics.get("calls", 1.0)), 1.0)
        result[key] = {m: _finite_float(metrics[m] / calls) for m in ERRORS if m in metrics}
    return result


def worst_layers(
    errors: Mapping[str, Mapping[str, Any]],
    *,
    k: int | None = None,
    below: float | None = None,
    metric: str = "wgrad_sqnr",
) -> tuple[str, ...]:
    """The layers to keep in high precision: the ``k`` lowest by ``metric`` and / or those
    below a threshold, as patterns for ``jq.recipes.get(name).rules(keep_float=...)``.

    Args:
      errors: from :func:`layer_errors` (concrete values: call it outside ``jax.jit``).
      k: keep the ``k`` worst layers.
      below: keep every layer whose ``metric`` is below this (dB for SQNRs). With both,
        the worst ``k`` among those below.
      metric: an SQNR of :func:`layer_errors` (lower is worse) or a saturation /
        underflow fraction (higher is worse).

    Returns:
      Regular expressions matching each chosen layer's path exactly, worst first (a
      module's several products count once).

    Example:
      >>> from jaxquant.flax import worst_layers
      >>> errs = {"a": {"wgrad_sqnr": 30.0}, "b/c": {"wgrad_sqnr": 12.0}, "d": {"wgrad_sqnr": 25.0}}
      >>> worst_layers(errs, k=1)
      ('b/c',)
      >>> worst_layers(errs, below=26.0)
      ('b/c', 'd')
    """
    if not isinstance(errors, Mapping) or not errors:
        raise TypeError(
            f"worst_layers: errors must be the non-empty dict layer_errors returns, got "
            f"{describe(errors)}."
        )
    if metric not in ERRORS:
        raise ValueError(f"worst_layers: metric must be one of {ERRORS}, got {metric!r}.")
    if k is None and below is None:
        raise ValueError(
            "worst_layers: pass k= (the worst k layers), below= (a threshold), or both."
        )
    if k is not None:
        # k=0 would keep nothing: a silent no-op where the user asked for layers.
        k = check_int(k, "worst_layers: k", lo=1)
    if below is not None and (
        isinstance(below, bool) or not isinstance(below, int | float) or math.isnan(below)
    ):
        raise TypeError(
            f"worst_layers: below must be a number (dB or a fraction), got {describe(below)}."
        )
    higher_worse = not metric.endswith("_sqnr")
    scored: list[tuple[float, str]] = []
    for layer, metrics in errors.items():
        if metric not in metrics:
            raise ValueError(f"worst_layers: layer {layer!r} has no {metric!r}.")
        try:
            v = float(metrics[metric])
        except (TypeError, jax.errors.ConcretizationTypeError):
            raise TypeError(
                f"worst_layers: {layer!r}'s {metric} is not a number "
                f"({describe(metrics[metric])}); call layer_errors outside jax.jit (for a "
                "stacked layer's array, pick a value per layer)."
            ) from None
        if math.isnan(v):
            continue  # a step whose gradient overflowed says nothing
        if below is not None and not ((v > below) if higher_worse else (v < below)):
            continue
        scored.append((-v if higher_worse else v, layer.split("#")[0]))
    scored.sort()
    out: list[str] = []
    for _, layer in scored:
        pattern = re.escape(layer)
        if pattern not in out:
            out.append(pattern)
    return tuple(out if k is None else out[:k])


__all__ = [
    "Assignment",
    "CalibrationResult",
    "Contraction",
    "LayerSensitivity",
    "LayerStatistics",
    "Match",
    "NnxPolicyModule",
    "NnxQuantOp",
    "OverwriteWithGradient",
    "Policy",
    "PolicyModule",
    "QuantState",
    "QuantizedModule",
    "Rule",
    "Sensitivity",
    "Statistics",
    "apply_policy",
    "calibrate",
    "contractions",
    "convert",
    "layer_errors",
    "layer_statistics",
    "mixed_precision",
    "quantize_model",
    "report",
    "sensitivity",
    "worst_layers",
]
