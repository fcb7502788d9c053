"""Per-layer quantization sensitivity and mixed-precision assignment under a size budget.

:func:`sensitivity` quantizes one layer of a Linen or NNX model at a time with each
candidate :class:`~jaxquant.flax.Rule` (everything else stays float), evaluates a metric
on the given batches and records, per (layer, option), the metric, its *damage* against
the float model and the layer's exact weight bytes. :func:`mixed_precision` then picks
one option per layer minimizing the summed damage under a total byte budget (an exact
multiple-choice knapsack) and returns the :class:`~jaxquant.flax.Rule` objects that
:func:`~jaxquant.flax.quantize_model` takes.

Damage (larger is worse, 0 for float; it can be negative when quantizing a layer helps):

=============  ==========================================================================
metric         damage of an option with metric value ``m``, float model's value ``m0``
=============  ==========================================================================
accuracy       ``m0 - m`` (a fraction: 0.01 is one point of accuracy)
loss           ``m - m0`` (mean softmax cross-entropy)
sqnr           the output noise-to-signal power ratio ``sum (y - y_q)^2 / sum y^2`` over
               all batches, ``= 10^(-m / 10)`` (``m`` in dB; the float model's SQNR
               against itself is ``+inf``, so a difference of dB would be ``-inf``)
callable       ``m0 - m``, or ``m - m0`` with ``higher_is_better=False``
=============  ==========================================================================

A trial whose outputs contain NaN or Inf (or whose metric is NaN) is recorded, not
raised: metric ``nan``, damage ``+inf``; :func:`mixed_precision` never chooses it.

Noise: each damage of accuracy, loss and callables comes with a noise level, twice its
standard error across the evaluation's parts (the two halves of every batch for accuracy
and loss, the batches for callables: at least two parts needed, else 0). A negative
damage no larger than its noise level says nothing about the option, and
:func:`mixed_precision` counts it as 0: otherwise the knapsack would prefer a lower
precision because it came out slightly better than float on these examples, and use that
fake gain to pay for real damage elsewhere. SQNR damages are never negative (noise 0).

The assignment assumes that damages add up across layers (each layer's damage is measured
with every other layer in float). That is a first-order approximation: for SQNR it is
exact when the layers' output noises are uncorrelated and small; for accuracy it tends to
underestimate the damage of quantizing many layers at once. Measure the returned plan
(``quantize_model(model, plan)``) before relying on it.

Weight bytes count each layer's ``kernel`` only (biases, norms and embeddings stay as they
are): the packed values, scales and zero points of ``jq.quantize(kernel, rule.weight)``,
or 4 bytes per element for float and for rules that leave the weight in float.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import numbers
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx as flax_nnx

from jaxquant._src.checks import describe
from jaxquant._src.flax import act_transform
from jaxquant._src.flax.calibrate import (
    Static,
    check_call_kwargs,
    explain_collections,
    is_traced,
    join_call,
    split_call,
)
from jaxquant._src.flax.intercept import Contraction
from jaxquant._src.flax.linen import quantize_linen, report_linen
from jaxquant._src.flax.nnx import probed_contractions, quantize_nnx
from jaxquant._src.flax.rules import (
    Rule,
    as_rules,
    deterministic_rule,
    layer_gates,
    path_str,
)
from jaxquant._src.quantize import quantize
from jaxquant._src.spec import QuantSpec
from jaxquant._src.types import PyTree

FLOAT = "float"  # the implicit option: the layer keeps its float32 kernel
_METRICS = ("accuracy", "loss", "sqnr")


# ------------------------------------------------------------------------------ results


@dataclasses.dataclass(frozen=True)
class LayerSensitivity:
    """One layer's sensitivity: per option (``"float"`` and each candidate name).

    Attributes:
      path: the module path, as :func:`~jaxquant.flax.report` gives it.
      module: the module's class name (``"Dense"``, ``"Linear"``...).
      shape: the kernel's shape.
      metric: the metric with only this layer quantized with the option (``"float"``: the
        float model's); ``nan`` where the outputs were not finite.
      damage: see the module docstring; ``0.0`` for ``"float"``, ``inf`` where the outputs
        were not finite.
      nbytes: the kernel's storage bytes under the option (``"float"``: 4 per element).
      noise: the damage's noise level per option (module docstring): twice its standard
        error across the evaluation's parts; 0.0 for ``"float"``, SQNR and a single part.
        Options missing here have noise 0.

    Example:
      >>> from jaxquant.flax import LayerSensitivity
      >>> layer = LayerSensitivity(
      ...     "Dense_0", "Dense", (64, 64), metric={"float": 0.9, "int4": 0.85},
      ...     damage={"float": 0.0, "int4": 0.05}, nbytes={"float": 16384, "int4": 2304})
      >>> layer.damage["int4"], layer.nbytes["int4"] / layer.nbytes["float"]
      (0.05, 0.140625)
    """

    path: str
    module: str
    shape: tuple[int, ...]
    metric: dict[str, float]
    damage: dict[str, float]
    nbytes: dict[str, int]
    noise: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Sensitivity:
    """The result of :func:`sensitivity`: plain Python data; ``str()`` is a table.

    Damage, per (layer, option), larger is worse: ``baseline - metric`` for accuracy and
    callables (``metric - baseline`` for the loss and callables with
    ``higher_is_better=False``); for SQNR the output noise-to-signal power ratio
    ``sum (y - y_q)^2 / sum y^2 = 10^(-sqnr_dB / 10)``, since the float model's SQNR is
    ``+inf``. It is 0.0 for ``"float"``, can be negative (quantizing helped), and is
    ``+inf`` (metric ``nan``) where the outputs were not finite.

    Attributes:
      metric: ``"accuracy"``, ``"loss"``, ``"sqnr"``, or the callable's name.
      higher_is_better: the metric's direction (True for accuracy and SQNR).
      baseline: the float model's metric (``inf`` for SQNR: the float model is exact).
      candidates: the rule templates by name (their ``pattern`` is not used).
      layers: one :class:`LayerSensitivity` per layer considered, in model order.
      all_layers: per candidate, the metric with every considered layer quantized with it.
      all_layers_damage: the damage of those, measured (not summed per layer).

    Invariants: every layer's dicts have the keys :attr:`options`, ``damage["float"]`` is
    0.0 and ``nbytes["float"]`` is 4 bytes per kernel element.

    Example:
      Usually made by :func:`sensitivity`; here by hand, for two layers:

      >>> import jaxquant as jq
      >>> from jaxquant.flax import LayerSensitivity, Rule, Sensitivity
      >>> def layer(path, damage):
      ...     return LayerSensitivity(path, "Dense", (64, 64),
      ...                             {"float": 0.9, "int4": 0.9 - damage},
      ...                             {"float": 0.0, "int4": damage},
      ...                             {"float": 16384, "int4": 2304})
      >>> int4 = Rule(".*", weight=jq.QuantSpec("int4", jq.per_channel(-1)))
      >>> sens = Sensitivity("accuracy", True, 0.9, {"int4": int4},
      ...                    (layer("a", 0.05), layer("b", 0.01)), {"int4": 0.85},
      ...                    {"int4": 0.05})
      >>> sens.options, sens.paths
      (('float', 'int4'), ('a', 'b'))
      >>> print(sens)  # doctest: +NORMALIZE_WHITESPACE
      sensitivity: accuracy (higher is better), float model 0.9; cells: metric with only
      that layer quantized (damage, kernel bytes)
      <BLANKLINE>
      | layer | module | kernel | float | int4 |
      |---|---|---|--:|--:|
      | a | Dense | 64x64 | 0.9 (0, 16384 B) | 0.85 (0.05, 2304 B) |
      | b | Dense | 64x64 | 0.9 (0, 16384 B) | 0.89 (0.01, 2304 B) |
      | **all layers** | | | 0.9 (0, 32768 B) | 0.85 (0.05, 4608 B) |
    """

    metric: str
    higher_is_better: bool
    baseline: float
    candidates: dict[str, Rule]
    layers: tuple[LayerSensitivity, ...]
    all_layers: dict[str, float]
    all_layers_damage: dict[str, float]

    @property
    def options(self) -> tuple[str, ...]:
        """``("float", *candidates)``."""
        return (FLOAT, *self.candidates)

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(layer.path for layer in self.layers)

    @property
    def float32_bytes(self) -> int:
        """Total kernel bytes of the considered layers in float32."""
        return sum(layer.nbytes[FLOAT] for layer in self.layers)

    def layer(self, path: str) -> LayerSensitivity:
        """The :class:`LayerSensitivity` of ``path``."""
        for layer in self.layers:
            if layer.path == path:
                return layer
        raise KeyError(f"Sensitivity: no layer {path!r}; layers: {list(self.paths)}.")

    def total_bytes(self, option: str) -> int:
        """Total kernel bytes with every considered layer in ``option``."""
        if option not in self.options:
            raise KeyError(f"Sensitivity: no option {option!r}; options: {list(self.options)}.")
        return sum(layer.nbytes[option] for layer in self.layers)

    def table(self) -> str:
        """A markdown table: per layer and option, ``metric (damage, bytes)``."""
        direction = "higher" if self.higher_is_better else "lower"
        head = (
            f"sensitivity: {self.metric} ({direction} is better), float model "
            f"{_fmt(self.baseline)}; cells: metric with only that layer quantized "
            "(damage, kernel bytes)"
        )
        opts = self.options
        rows = [
            head,
            "",
            "| layer | module | kernel | " + " | ".join(opts) + " |",
            "|---|---|---|" + "--:|" * len(opts),
        ]
        for layer in self.layers:
            cells = [
                f"{_fmt(layer.metric[o])} ({_fmt(layer.damage[o])}, {layer.nbytes[o]} B)"
                for o in opts
            ]
            shape = "x".join(str(d) for d in layer.shape)
            rows.append(f"| {layer.path} | {layer.module} | {shape} | " + " | ".join(cells) + " |")
        cells = [f"{_fmt(self.baseline)} (0, {self.float32_bytes} B)"]
        cells += [
            f"{_fmt(self.all_layers[o])} ({_fmt(self.all_layers_damage[o])}, "
            f"{self.total_bytes(o)} B)"
            for o in self.candidates
        ]
        rows.append("| **all layers** | | | " + " | ".join(cells) + " |")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


@dataclasses.dataclass(frozen=True)
class Assignment:
    """A mixed-precision plan from :func:`mixed_precision`.

    Iterating over it yields its :attr:`rules`, so ``quantize_model(model, assignment)``
    works directly.

    Attributes:
      rules: one rule per layer, pattern ``re.escape(path)``: the chosen candidate's
        template, or a rule without specs for layers kept in float.
      choice: the option name per layer path (``"float"`` or a candidate name).
      nbytes: total kernel bytes of the choice (``<= budget``).
      damage: the predicted damage: the sum of the chosen per-layer damages (negative
        ones within their noise level as 0; see :func:`mixed_precision`).
      budget: the budget in bytes.
      float32_bytes: total kernel bytes of the layers in float32.

    Example:
      >>> import jaxquant as jq
      >>> from jaxquant.flax import LayerSensitivity, Rule, Sensitivity, mixed_precision
      >>> def layer(path, damage):
      ...     return LayerSensitivity(path, "Dense", (64, 64), {}, {"float": 0.0, "int4": damage},
      ...                             {"float": 16384, "int4": 2304})
      >>> int4 = Rule(".*", weight=jq.QuantSpec("int4", jq.per_channel(-1)))
      >>> sens = Sensitivity("accuracy", True, 0.9, {"int4": int4},
      ...                    (layer("a", 0.05), layer("b", 0.01)), {}, {})
      >>> plan = mixed_precision(sens, budget=0.6)
      >>> print(plan)  # quantize_model(model, plan) applies it
      | layer | option |
      |---|---|
      | a | float |
      | b | int4 |
      | **total** | 18688 B of budget 19660 B (57.0% of float32), predicted damage 0.01 |
    """

    rules: tuple[Rule, ...]
    choice: dict[str, str]
    nbytes: int
    damage: float
    budget: int
    float32_bytes: int

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def __str__(self) -> str:
        rows = ["| layer | option |", "|---|---|"]
        rows += [f"| {p} | {o} |" for p, o in self.choice.items()]
        rows.append(
            f"| **total** | {self.nbytes} B of budget {self.budget} B "
            f"({self.nbytes / max(self.float32_bytes, 1):.1%} of float32), predicted damage "
            f"{_fmt(self.damage)} |"
        )
        return "\n".join(rows)


def _fmt(v: float) -> str:
    return f"{v:.4g}"


# --------------------------------------------------------------------------- sensitivity


def sensitivity(
    model: nn.Module | flax_nnx.Module,
    variables: PyTree,
    candidates: Mapping[str, Rule],
    data: Any,
    *,
    metric: str | Callable[[Any, Any], Any] = "accuracy",
    layers: str | Sequence[str] | None = None,
    higher_is_better: bool | None = None,
    call_kwargs: Mapping[str, Any] | None = None,
) -> Sensitivity:
    """How much each layer suffers from each quantization candidate, on its own.

    For every considered layer ``l`` and candidate ``c``, the model runs (jitted) on
    ``data`` with only ``l`` quantized by ``c`` (the rule ``Rule(re.escape(l), **c)``, see
    :func:`~jaxquant.flax.quantize_model`); the metric is compared with the float
    model's. Each candidate is also measured with every considered layer quantized. The
    model is never modified (NNX: each trial runs on ``nnx.clone(model)``).

    Compiled once per candidate, not once per layer and candidate: the model is traced with
    every considered layer quantized, and each layer's product takes the quantized or the
    float result by a traced flag, so a trial is a call with other flags (each product is
    computed both ways, which costs little beside a compilation of the whole model). The
    values are those of a model quantized at that layer alone (bit for bit on the tested
    models at XLA's default optimization; a float op XLA fuses differently in the two
    programs may round differently under other settings). Models whose layers
    apply online activation transforms (``variables["ptq"]``, NNX ``ptq_*`` variables) are
    compiled per trial instead.

    Candidates are evaluated as post-training quantization: stochastic rounding is
    replaced by round-to-nearest; rules with state (``scaling="delayed"``,
    ``ste="lsq"``) are rejected. The model is called as ``model.apply(variables, x,
    **call_kwargs, **kwargs)`` (Linen) or ``model(x, **call_kwargs, **kwargs)`` (NNX), with
    ``kwargs`` the batch's own (see ``data``): pass evaluation flags such as
    ``call_kwargs={"train": False}`` or ``{"deterministic": True}`` (or put an NNX model
    in ``eval()`` mode first).

    Args:
      model: a ``flax.linen.Module`` or a ``flax.nnx.Module``.
      variables: the Linen model's variables, every collection (``{"params": ...,
        "batch_stats": ...}``: what ``model.init`` returned); None for NNX.
      candidates: name -> :class:`~jaxquant.flax.Rule` template (its ``pattern`` is
        ignored), e.g. ``{"int8": Rule(".*", weight=jq.QuantSpec("int8",
        jq.per_channel(-1)))}``. ``"float"`` (keep the layer in float32) is always an
        option and cannot be a candidate name.
      data: the evaluation batches: a sequence or iterable of ``(x, y)`` pairs or
        ``(x, y, kwargs)`` triples (``kwargs``: this batch's keyword arguments, e.g.
        ``{"mask": mask}``), a single ``(x, y)`` pair of arrays, or a function returning
        any of these (called once; the batches are kept for every trial). ``y`` may be
        None for ``"sqnr"``. Arrays in ``x`` and ``kwargs`` are traced; their other leaves
        (Python bools, ints, strings) are passed as they are, one compilation per value.
      metric: ``"accuracy"`` (``argmax(outputs, -1) == y``, over all examples),
        ``"loss"`` (mean softmax cross-entropy with integer labels), ``"sqnr"`` (dB of
        the outputs against the float model's, pooled over batches; see
        :func:`jaxquant.metrics.sqnr`), or ``f(outputs, y) -> float``, averaged over
        batches weighted by their size (``len(y)``, or ``len(x)`` when ``y`` is None).
      layers: None for every quantizable layer the model calls (Linen: found by tracing
        it once; NNX: every Linear / LinearGeneral / Einsum / Conv in its graph), a list
        of exact paths, or a regex (:func:`re.fullmatch`) selecting among those.
      higher_is_better: the direction of a callable metric (default True); fixed for the
        named metrics.
      call_kwargs: keyword arguments for every call of the model, passed as they are
        (never traced): ``{"train": False}``, ``{"deterministic": True}``... Linen:
        ``apply``'s ``rngs``, ``mutable`` (the outputs are then ``apply``'s first result)
        and ``method`` go here too.

    Returns:
      A :class:`Sensitivity`: ``.layers[i].metric / .damage / .nbytes`` per option,
      ``.baseline``, ``.all_layers``; ``print(sens)`` gives a table. Damage: 0 for float,
      larger is worse, ``inf`` for non-finite outputs (see :class:`Sensitivity`).

    Raises:
      ValueError: for no candidates, the name ``"float"``, a stateful candidate, an
        unknown metric, no batches, a ``layers`` entry that is not a quantizable layer, a
        float model whose outputs or metric are not finite, a keyword in both a batch and
        ``call_kwargs``, or Linen ``variables`` missing a collection the model reads (or
        a call that would update one: a BatchNorm in training mode).
      TypeError: a batch that is not an ``(x, y)`` pair or ``(x, y, kwargs)`` triple, or
        ``call_kwargs`` that is not a dict.

    Example:
      >>> import jax, flax.linen as nn, jaxquant as jq
      >>> from jaxquant.flax import Rule, sensitivity
      >>> model = nn.Sequential([nn.Dense(32), nn.relu, nn.Dense(4)])
      >>> x = jax.random.normal(jax.random.key(0), (64, 16))
      >>> variables = jax.jit(model.init)(jax.random.key(1), x)
      >>> cands = {b: Rule(".*", weight=jq.QuantSpec(b, jq.per_channel(-1)))
      ...          for b in ("int8", "int4")}
      >>> sens = sensitivity(model, variables, cands, [(x, None)], metric="sqnr")
      >>> [(s.path, s.nbytes["float"], s.nbytes["int8"], s.nbytes["int4"]) for s in sens.layers]
      [('layers_0', 2048, 640, 384), ('layers_2', 512, 144, 80)]
      >>> all(s.damage["int8"] < s.damage["int4"] for s in sens.layers)
      True

      A model with BatchNorm, evaluated as ``model.apply(variables, x, train=False)``:

      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train: bool = True):
      ...         x = nn.BatchNorm(use_running_average=not train)(nn.Dense(32)(x))
      ...         return nn.Dense(4)(nn.relu(x))
      >>> init = jax.jit(Net().init, static_argnames="train")
      >>> variables = init(jax.random.key(1), x, train=False)
      >>> sens = sensitivity(Net(), variables, {"int8": cands["int8"]}, [(x, None)],
      ...                    metric="sqnr", call_kwargs={"train": False})
      >>> sens.paths
      ('Dense_0', 'Dense_1')
    """
    templates = _check_candidates(candidates)
    name, higher, stats_fn = _metric(metric, higher_is_better)
    call_kwargs = check_call_kwargs(call_kwargs, "sensitivity")
    batches = _batches(data, call_kwargs)
    if isinstance(model, nn.Module):
        if variables is None:
            raise ValueError(
                "sensitivity: a Linen model needs its variables (model.init(...) or trained "
                "{'params': ...}); got None."
            )
        runner: _LinenRunner | _NnxRunner = _LinenRunner(model, variables, call_kwargs)
    elif isinstance(model, flax_nnx.Module):
        if variables is not None:
            raise ValueError(
                "sensitivity: an NNX model holds its own parameters; pass variables=None."
            )
        runner = _NnxRunner(model, call_kwargs)
    else:
        raise TypeError(
            f"sensitivity: expected a flax.linen.Module or flax.nnx.Module, got "
            f"{type(model).__name__}."
        )
    found = runner.discover(batches[0])
    paths = _select(layers, [p for p, _ in found])
    modules = dict(found)

    ev = _Evaluator(
        runner, batches, stats_fn, higher, metric if callable(metric) else None, tuple(paths)
    )
    # One compilation per candidate: every considered layer quantized, each trial choosing
    # by traced gates which layers take the quantized product (rules.layer_gates). Not
    # where layers carry online activation transforms (a layer no rule matches would run
    # without them, a gated one with them).
    gate = runner.gateable()
    every = {cname: tuple(_at(t, p) for p in paths) for cname, t in templates.items()}

    def trial(cname: str, on: tuple[str, ...]) -> tuple[float, float, float]:
        if gate:
            return ev.trial(every[cname], frozenset(on))
        return ev.trial(tuple(_at(templates[cname], p) for p in on))

    out_layers = []
    for path in paths:
        kernel = runner.kernel(path)
        nbytes = {FLOAT: 4 * math.prod(kernel.shape)}
        metrics = {FLOAT: ev.baseline}
        damages = {FLOAT: 0.0}
        noise = {FLOAT: 0.0}
        for cname, t in templates.items():
            nbytes[cname] = _weight_bytes(kernel, t.weight, cname, path)
            metrics[cname], damages[cname], noise[cname] = trial(cname, (path,))
        out_layers.append(
            LayerSensitivity(
                path, modules[path], tuple(kernel.shape), metrics, damages, nbytes, noise
            )
        )
    all_metric, all_damage = {}, {}
    for cname in templates:
        all_metric[cname], all_damage[cname], _ = trial(cname, tuple(paths))
    return Sensitivity(
        metric=name,
        higher_is_better=higher,
        baseline=ev.baseline,
        candidates=dict(candidates),
        layers=tuple(out_layers),
        all_layers=all_metric,
        all_layers_damage=all_damage,
    )


def _at(template: Rule, path: str) -> Rule:
    return dataclasses.replace(template, pattern=re.escape(path))


def _check_candidates(candidates: Any) -> dict[str, Rule]:
    """The templates for evaluation (stochastic rounding -> nearest), checked."""
    if not isinstance(candidates, Mapping):
        raise TypeError(
            "sensitivity: candidates must be a mapping name -> Rule, e.g. "
            f"{{'int8': Rule('.*', weight=...)}}; got {type(candidates).__name__}."
        )
    if not candidates:
        raise ValueError(
            "sensitivity: candidates is empty; give at least one name -> Rule ('float' is "
            "always an option on its own)."
        )
    out = {}
    for cname, t in candidates.items():
        if not isinstance(cname, str):
            raise TypeError(f"sensitivity: candidate names must be str, got {cname!r}.")
        if cname == FLOAT:
            raise ValueError(
                "sensitivity: 'float' is the implicit keep-in-float option; give the "
                "candidate another name."
            )
        if not isinstance(t, Rule):
            raise TypeError(f"sensitivity: candidate {cname!r} must be a jq.flax.Rule, got {t!r}.")
        if not t.quantizes:
            raise ValueError(
                f"sensitivity: candidate {cname!r} has no weight / act / grad spec, so it "
                "is the same as 'float'; drop it."
            )
        if t.scaling == "delayed" or t.ste == "lsq":
            raise ValueError(
                f"sensitivity: candidate {cname!r} has scaling={t.scaling!r}, "
                f"ste={t.ste!r}: its scales are state learned in training, which a "
                "post-training measurement does not have. Use current scaling and the "
                "plain or clipped STE."
            )
        out[cname] = deterministic_rule(t)
    return out


def _weight_bytes(
    kernel: jax.ShapeDtypeStruct, spec: QuantSpec | None, cname: str, path: str
) -> int:
    if spec is None:
        return 4 * math.prod(kernel.shape)
    try:
        return int(jax.eval_shape(lambda k: quantize(k, spec), kernel).nbytes)
    except (ValueError, TypeError) as e:
        raise type(e)(
            f"sensitivity: candidate {cname!r} cannot quantize the kernel of layer {path!r} "
            f"(shape {tuple(kernel.shape)}): {e}"
        ) from None


def _select(layers: Any, found: list[str]) -> list[str]:
    listing = ", ".join(repr(p) for p in found) or "(none)"
    if not found:
        raise ValueError("sensitivity: the model has no quantizable layer (Dense, Linear, ...).")
    if layers is None:
        return found
    if isinstance(layers, str):
        chosen = [p for p in found if re.fullmatch(layers, p)]
        if not chosen:
            raise ValueError(
                f"sensitivity: layers={layers!r} matches none of the quantizable layers "
                f"{listing} (matched with re.fullmatch)."
            )
        return chosen
    if not isinstance(layers, Iterable):
        raise TypeError(
            "sensitivity: layers must be None (every layer), a regex string or a sequence of "
            f"layer paths, got {describe(layers)}. The paths: {listing}."
        )
    chosen = list(layers)
    for p in chosen:
        if not isinstance(p, str):
            raise TypeError(f"sensitivity: layers must hold path strings, got {p!r}.")
    missing = [p for p in chosen if p not in found]
    if missing:
        raise ValueError(
            f"sensitivity: layers {missing} are not quantizable layers of the model; "
            f"these are: {listing}. Give exact paths, or a regex string."
        )
    if not chosen:
        raise ValueError("sensitivity: layers is empty; pass None for every layer.")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"sensitivity: layers lists a path twice: {chosen}.")
    return chosen


class _Batch(NamedTuple):
    """One evaluation batch: the call's arguments ``(x, kwargs)`` as :func:`split_call`'s
    ``arrays`` (on the device) and ``static``, the labels, and the batch size."""

    arrays: list[Any]
    static: Static
    y: Any
    size: int


def _batches(data: Any, call_kwargs: Mapping[str, Any]) -> list[_Batch]:
    if callable(data):
        data = data()
    if isinstance(data, tuple) and len(data) == 2 and hasattr(data[0], "shape"):
        if data[1] is None or hasattr(data[1], "shape"):
            data = [data]  # one (x, y) batch
    try:
        batches = list(data)
    except TypeError:
        raise TypeError(
            f"sensitivity: data must be an iterable of (x, y) batches, got {type(data).__name__}."
        ) from None
    out = []
    for i, b in enumerate(batches):
        if not (isinstance(b, tuple | list) and len(b) in (2, 3)):
            raise TypeError(
                "sensitivity: every batch must be an (x, y) pair or an (x, y, kwargs) "
                f"triple, got {describe(b)} at data[{i}]."
            )
        x, y, kwargs = (*b, {}) if len(b) == 2 else b
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise TypeError(
                f"sensitivity: the kwargs of data[{i}] (its third item) must be a dict of "
                f"keyword arguments, got {describe(kwargs)}."
            )
        if both := sorted(set(kwargs) & set(call_kwargs)):
            raise ValueError(
                f"sensitivity: data[{i}] and call_kwargs both give the keyword argument(s) "
                f"{both}; give each in one place (call_kwargs for what every call shares)."
            )
        arrays, static = split_call((x, kwargs), f"sensitivity: data[{i}]")
        y = None if y is None else jnp.asarray(y)
        # On the device once, not once per trial.
        out.append(_Batch(jax.device_put(arrays), static, y, _batch_size(x, y)))
    if not out:
        raise ValueError("sensitivity: data holds no batches.")
    return out


# ---------------------------------------------------------------------------- metrics

_Stats = Callable[[Any, Any, Any], dict[str, Any]]  # (outputs, y, ref) -> sums
# one batch's run of a compiled model: (batch, the float model's outputs or None, and
# optionally gates=) -> post's
_Forward = Callable[..., dict[str, Any]]


def _metric(metric: Any, higher_is_better: bool | None) -> tuple[str, bool, _Stats]:
    if callable(metric):
        higher = True if higher_is_better is None else bool(higher_is_better)
        return getattr(metric, "__name__", "metric"), higher, _callable_stats
    if higher_is_better is not None:
        raise ValueError(
            f"sensitivity: higher_is_better is for callable metrics; {metric!r} has a fixed "
            "direction."
        )
    stats = {"accuracy": _accuracy_stats, "loss": _loss_stats, "sqnr": _sqnr_stats}
    if metric not in stats:
        raise ValueError(
            f"sensitivity: unknown metric {metric!r}; use one of {_METRICS} or a function "
            "(outputs, y) -> float."
        )
    return metric, metric != "loss", stats[metric]


def _nonfinite(out: Any) -> jax.Array:
    leaves = [jnp.sum(~jnp.isfinite(a)) for a in jax.tree.leaves(out)]
    return sum(leaves, jnp.int32(0))


def _logits(out: Any, y: Any, what: str) -> jax.Array:
    if not hasattr(out, "shape") or y is None:
        raise ValueError(
            f"sensitivity: metric {what!r} needs array outputs (logits) and integer labels "
            f"y; got outputs {type(out).__name__} and y {type(y).__name__}."
        )
    if out.shape[:-1] != y.shape or not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(
            f"sensitivity: metric {what!r} needs logits (..., classes) and integer labels "
            f"(...); got outputs {out.shape} and y {y.shape} {y.dtype}."
        )
    return out.astype(jnp.float32)


def _halves(per_example: jax.Array) -> dict[str, Any]:
    """The sum and count of the whole batch, and of its two halves along the first axis
    (``part_sum`` / ``part_count``: the units of the damage's noise estimate)."""
    v = per_example.astype(jnp.float32)
    if v.ndim == 0 or v.shape[0] < 2:  # one example: a single part
        parts, counts = jnp.sum(v)[None], jnp.float32(v.size)[None]
    else:
        h = v.shape[0] // 2
        parts = jnp.stack([jnp.sum(v[:h]), jnp.sum(v[h:])])
        counts = jnp.array([v[:h].size, v[h:].size], jnp.float32)
    return {
        "sum": jnp.sum(v),
        "count": jnp.float32(v.size),
        "part_sum": parts,
        "part_count": counts,
    }


def _accuracy_stats(out: Any, y: Any, ref: Any) -> dict[str, Any]:
    del ref
    logits = _logits(out, y, "accuracy")
    return _halves(jnp.argmax(logits, axis=-1) == y)


def _loss_stats(out: Any, y: Any, ref: Any) -> dict[str, Any]:
    del ref
    return _halves(optax.softmax_cross_entropy_with_integer_labels(_logits(out, y, "loss"), y))


def _sqnr_stats(out: Any, y: Any, ref: Any) -> dict[str, Any]:
    del y
    sig, noise = jnp.float32(0.0), jnp.float32(0.0)
    for a, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
        a, r = a.astype(jnp.float32), r.astype(jnp.float32)
        sig = sig + jnp.sum(r * r)
        noise = noise + jnp.sum((r - a) ** 2)
    return {"signal": sig, "noise": noise}


def _callable_stats(out: Any, y: Any, ref: Any) -> dict[str, Any]:
    del y, ref
    return {"outputs": out}


class _Evaluator:
    """Runs trials (a tuple of rules, or None for float) and turns them into metrics."""

    def __init__(
        self,
        runner: _LinenRunner | _NnxRunner,
        batches: list[_Batch],
        stats_fn: _Stats,
        higher: bool,
        metric_fn: Callable[[Any, Any], Any] | None,
        paths: tuple[str, ...] = (),
    ) -> None:
        self.runner, self.batches, self.higher = runner, batches, higher
        self.paths = paths  # the considered layers: the gates of a gated trial
        self.stats_fn, self.metric_fn = stats_fn, metric_fn
        self.needs_ref = stats_fn is _sqnr_stats
        self.refs: list[Any] = [None] * len(batches)
        self.cache: dict[Any, tuple[float, float, float]] = {}
        self.compiled: dict[tuple[Rule, ...], _Forward] = {}  # gated: one per rule set
        if self.needs_ref:
            fwd = runner.compile(None, lambda out, y, ref: {"out": out, "bad": _nonfinite(out)})
            got = [fwd(b, None) for b in batches]
            if any(int(g["bad"]) for g in got):
                raise ValueError(
                    "sensitivity: the float model's outputs are not finite on the data; "
                    "nothing to compare quantized models with."
                )
            self.refs = [g["out"] for g in got]
            self.baseline = math.inf
            return
        self.base, bad = self._run(None)
        value = self.base["sum"] / self.base["count"]
        if bad or not math.isfinite(value):
            raise ValueError(
                f"sensitivity: the float model's metric is {value} (outputs "
                f"{'not ' if bad else ''}finite); check the model, the data and the metric."
            )
        self.baseline = value

    def _run(
        self, rules: tuple[Rule, ...] | None, on: frozenset[str] | None = None
    ) -> tuple[dict[str, Any], bool]:
        """The metric's sums over all batches (``parts``: per part, ``(sum, count)``), and
        whether any output was not finite. ``on``: the model of ``rules`` compiled once with
        gates, only the layers in ``on`` quantized."""
        stats_fn = self.stats_fn

        def post(out: Any, y: Any, ref: Any) -> dict[str, Any]:
            return {"stats": stats_fn(out, y, ref), "bad": _nonfinite(out)}

        if on is None:
            fwd = self.runner.compile(rules, post)
        else:
            assert rules is not None
            if rules not in self.compiled:
                self.compiled[rules] = self.runner.compile(rules, post)
            gates = {p: np.bool_(p in on) for p in self.paths}  # traced: no recompilation
            fwd = functools.partial(self.compiled[rules], gates=gates)
        totals: dict[str, Any] = {}
        parts: list[tuple[float, float]] = []
        bad = False
        metric_fn = self.metric_fn  # set exactly when stats_fn is _callable_stats
        for b, ref in zip(self.batches, self.refs, strict=True):
            got = fwd(b, ref)
            bad = bad or bool(int(got["bad"]))
            st = dict(got["stats"])
            if metric_fn is not None:  # a callable metric: its stats are the outputs
                n = float(b.size)
                st = {"sum": n * float(metric_fn(st["outputs"], b.y)), "count": n}
                parts.append((st["sum"], n))
            elif "part_sum" in st:
                ps, pc = st.pop("part_sum"), st.pop("part_count")
                parts += [(float(a), float(c)) for a, c in zip(ps, pc, strict=True)]
            for k, v in st.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        totals["parts"] = parts
        return totals, bad

    def trial(
        self, rules: tuple[Rule, ...], on: frozenset[str] | None = None
    ) -> tuple[float, float, float]:
        """(metric, damage, noise) of the model quantized by ``rules`` (each set run once);
        ``on``: only those layers of ``rules``' model quantized, through gates."""
        if (rules, on) not in self.cache:
            self.cache[rules, on] = self._trial(rules, on)
        return self.cache[rules, on]

    def _trial(
        self, rules: tuple[Rule, ...], on: frozenset[str] | None = None
    ) -> tuple[float, float, float]:
        t, bad = self._run(rules, on)
        if self.needs_ref:
            sig, noise = t["signal"], t["noise"]
            if bad or math.isnan(noise):
                return math.nan, math.inf, 0.0
            value = math.inf if noise == 0 else 10.0 * math.log10(max(sig, 1e-45) / noise)
            return value, (noise / sig if sig > 0 else (0.0 if noise == 0 else math.inf)), 0.0
        value = t["sum"] / t["count"]
        if bad or math.isnan(value):
            return math.nan, math.inf, 0.0
        # From the sums, so that equal counts give exactly opposite damages (accuracy).
        base = self.base["sum"]
        drop = (base - t["sum"]) if self.higher else (t["sum"] - base)
        damage = drop / t["count"]
        return value, damage, _noise_level(self.base["parts"], t["parts"], self.higher)


_NOISE_Z = 2.0  # noise level = this many standard errors (~98% one-sided for a normal)


def _noise_level(
    base: Sequence[tuple[float, float]], trial: Sequence[tuple[float, float]], higher: bool
) -> float:
    """``_NOISE_Z`` standard errors of the damage, from its spread across parts.

    Per part ``u`` (the same examples in both runs), the damage ``d_u`` of its ``n_u``
    examples; the damage is their weighted mean ``d = sum w_u d_u`` (``w_u = n_u / N``),
    whose variance is estimated as ``U / (U - 1) * sum w_u^2 (d_u - d)^2``. 0 with fewer
    than two parts (nothing to estimate the spread from).
    """
    if len(base) < 2 or len(base) != len(trial):
        return 0.0
    total = sum(c for _, c in base)
    d = [((b - t) if higher else (t - b)) / c for (b, c), (t, _) in zip(base, trial, strict=True)]
    w = [c / total for _, c in base]
    mean = sum(wi * di for wi, di in zip(w, d, strict=True))
    var = sum(wi * wi * (di - mean) ** 2 for wi, di in zip(w, d, strict=True))
    var *= len(d) / (len(d) - 1)
    return _NOISE_Z * math.sqrt(var) if math.isfinite(var) else 0.0


def _batch_size(x: Any, y: Any) -> int:
    arrays = [a for a in jax.tree.leaves(x) if is_traced(a)]
    lead = y if y is not None else (arrays[0] if arrays else None)
    return int(lead.shape[0]) if lead is not None and lead.ndim else 1


# ---------------------------------------------------------------------------- runners


def _discovery_rule() -> Rule:
    return Rule(".*", weight=QuantSpec("int8"))


class _LinenRunner:
    def __init__(self, model: nn.Module, variables: Any, call_kwargs: dict[str, Any]) -> None:
        self.model, self.variables, self.call_kwargs = model, variables, call_kwargs

    def _apply(self, model: nn.Module, variables: PyTree, arrays: Any, static: Static) -> Any:
        x, kwargs = join_call(arrays, static)
        kwargs = {**self.call_kwargs, **kwargs}
        out = model.apply(variables, x, **kwargs)
        # apply returns (outputs, updated collections) when a collection is mutable
        return out[0] if kwargs.get("mutable", False) is not False else out

    def discover(self, batch: _Batch) -> list[tuple[str, str]]:
        probe = quantize_linen(self.model, (_discovery_rule(),), False)
        with warnings.catch_warnings(), explain_collections("sensitivity"):
            # "rule '.*' matched no module": _select raises its own error for that
            warnings.filterwarnings("ignore", "quantize_model", UserWarning)
            jax.eval_shape(
                lambda v, a: self._apply(probe, v, a, batch.static), self.variables, batch.arrays
            )
        self.weights = _weights(probe.record.contractions)
        return [(m.path, m.module) for m in report_linen(probe)]

    def kernel(self, path: str) -> jax.ShapeDtypeStruct:
        param, shape = getattr(self, "weights", {}).get(path, ("kernel", None))
        if param is None:  # a weight the model computes (a tied head): the operand's shape
            return jax.ShapeDtypeStruct(shape, jnp.float32)
        # walked down the variables tree (dicts or FrozenDicts) to the weight's array
        node: Any = self.variables.get("params", {}) if hasattr(self.variables, "get") else {}
        try:
            for name in [*(path.split("/") if path else ()), *param.split("/")]:
                node = node[name]
            k = node
        except (KeyError, TypeError):
            raise ValueError(
                f"sensitivity: no variables['params'] entry {path!r}/{param} for the layer "
                f"{path!r}; sensitivity needs each quantized layer's weight under its path."
            ) from None
        return jax.ShapeDtypeStruct(tuple(k.shape), k.dtype)

    def gateable(self) -> bool:
        """Whether trials may share one compilation through gates (no layer applies an
        online activation transform)."""
        get = getattr(self.variables, "get", None)
        return get is None or not get(act_transform.COLLECTION)

    def compile(self, rules: tuple[Rule, ...] | None, post: _Stats) -> _Forward:
        """The jitted forward and ``post`` of the model quantized by ``rules``:
        ``fwd(batch, ref, gates=None)``, ``gates`` as :func:`layer_gates` takes them."""
        m = self.model if rules is None else quantize_linen(self.model, as_rules(rules), True)

        def run(v: PyTree, a: Any, static: Static, y: Any, ref: Any, gates: Any) -> Any:
            with _gates(gates):
                return post(self._apply(m, v, a, static), y, ref)

        jitted = jax.jit(run, static_argnums=2)
        variables = self.variables

        def fwd(b: _Batch, ref: Any, gates: Any = None) -> Any:
            with explain_collections("sensitivity"):
                return jitted(variables, b.arrays, b.static, b.y, ref, gates)

        return fwd


def _gates(gates: Any) -> Any:
    """:func:`~jaxquant._src.flax.rules.layer_gates` for a gated trial, else nothing."""
    return contextlib.nullcontext() if gates is None else layer_gates(gates)


def _weights(found: Sequence[Contraction]) -> dict[str, tuple[str | None, tuple[int, ...]]]:
    """``{path: (weight parameter name or None if computed, weight operand shape)}`` of each
    module's first quantized weight contraction."""
    out: dict[str, tuple[str | None, tuple[int, ...]]] = {}
    for c in found:
        if c.quantized and c.weight in ("lhs", "rhs") and c.path not in out:
            out[c.path] = (c.param, c.shapes[0 if c.weight == "lhs" else 1])
    return out


class _NnxRunner:
    def __init__(self, model: flax_nnx.Module, call_kwargs: dict[str, Any]) -> None:
        self.model, self.call_kwargs = model, call_kwargs

    def discover(self, batch: _Batch) -> list[tuple[str, str]]:
        """Every module with a weight contraction: one abstract call of a probe copy that
        quantizes everything (Flax layers and the products modules compute themselves)."""
        probe = flax_nnx.clone(self.model)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "quantize_model", UserWarning)
            quantize_nnx(probe, (_discovery_rule(),), False)
        graphdef, state = flax_nnx.split(probe)
        call_kwargs = self.call_kwargs

        def probe_call(st: PyTree, arrays: list[Any]) -> Any:
            x, kwargs = join_call(arrays, batch.static)
            return flax_nnx.merge(graphdef, st)(x, **call_kwargs, **kwargs)

        jax.eval_shape(probe_call, state, batch.arrays)
        found = probed_contractions(probe)
        self.weights = _weights(found)
        out: dict[str, str] = {}
        for c in found:
            if c.quantized:
                out.setdefault(c.path, c.module)
        order = {path_str(p): i for i, (p, _) in enumerate(flax_nnx.iter_graph(self.model))}
        return sorted(out.items(), key=lambda t: order.get(t[0], len(order)))  # graph order

    def kernel(self, path: str) -> jax.ShapeDtypeStruct:
        param, shape = getattr(self, "weights", {}).get(path, ("kernel", None))
        if param is None and shape is not None:
            return jax.ShapeDtypeStruct(shape, jnp.float32)
        for p, node in flax_nnx.iter_graph(self.model):
            if path_str(p) == path and isinstance(node, flax_nnx.Module):
                var: Any = node
                for part in (param or "kernel").split("/"):
                    var = getattr(var, part)
                k = var[...]
                return jax.ShapeDtypeStruct(tuple(k.shape), k.dtype)
        raise ValueError(f"sensitivity: no quantizable layer {path!r} in the NNX model.")

    def gateable(self) -> bool:
        """Whether trials may share one compilation through gates (no layer applies an
        online activation transform)."""
        return all(
            act_transform.of_nnx(node) is None for _, node in flax_nnx.iter_graph(self.model)
        )

    def compile(self, rules: tuple[Rule, ...] | None, post: _Stats) -> _Forward:
        """As :meth:`_LinenRunner.compile`."""
        m = flax_nnx.clone(self.model)  # never touch the caller's model
        if rules is not None:
            quantize_nnx(m, as_rules(rules), True)
        graphdef, state = flax_nnx.split(m)
        call_kwargs = self.call_kwargs

        def run(st: PyTree, arrays: list[Any], static: Static, y: Any, ref: Any, gates: Any) -> Any:
            x, kwargs = join_call(arrays, static)
            with _gates(gates):
                out = flax_nnx.merge(graphdef, st)(x, **call_kwargs, **kwargs)
            return post(out, y, ref)

        jitted = jax.jit(run, static_argnums=2)
        return lambda b, ref, gates=None: jitted(state, b.arrays, b.static, b.y, ref, gates)


# ---------------------------------------------------------------------- mixed precision


def mixed_precision(
    sens: Sensitivity,
    *,
    budget: int | float,
    objective: Callable[[LayerSensitivity, str], float] | None = None,
    noise: float | None = None,
) -> Assignment:
    """One option per layer minimizing the summed damage within a weight-byte budget.

    Solves the multiple-choice knapsack exactly: ``min sum_l cost(l, o_l)`` subject to
    ``sum_l nbytes(l, o_l) <= budget``, over the options ``"float"`` and every candidate,
    by dynamic programming over the layers on the Pareto frontier of (bytes, damage)
    partial sums (dominated partial assignments dropped; bytes are exact integers, no
    discretization). Options with infinite cost (non-finite outputs) are never chosen.
    A negative damage within its noise level counts as 0 (``noise``; module docstring).
    Ties go to fewer bytes. The predicted damage assumes that per-layer damages, each
    measured with every other layer in float, add up: a first-order approximation (for
    SQNR exact when the layers' output noises are small and uncorrelated; for accuracy it
    tends to underestimate quantizing many layers at once). Measure the result.

    Args:
      sens: the :class:`Sensitivity` of :func:`sensitivity`.
      budget: total kernel bytes of the considered layers (an int), or a float in
        ``(0, 1]``: that fraction of their float32 bytes (rounded down).
      objective: ``cost(layer, option) -> float`` to minimize instead of the damage
        (e.g. a weighted damage), taken as it is (no noise rule); ``inf`` forbids an
        option.
      noise: the noise level under which a negative damage counts as 0 (see the module
        docstring): None for each damage's own, measured one (``layer.noise``), or a
        number >= 0 for every option (0.0: take negative damages as measured).

    Returns:
      An :class:`Assignment`: ``.rules`` (one exact-path rule per layer, float layers with
      a rule without specs; the assignment iterates over them, so
      ``quantize_model(model, assignment)`` works), ``.choice`` (path -> option),
      ``.nbytes``, ``.damage`` (the summed costs: noise-level negative damages as 0).

    The rules carry the candidate templates as given to :func:`sensitivity` (stochastic
    rounding included, which the measurement replaced by round-to-nearest).

    Raises:
      ValueError: if even the smallest allowed option of every layer exceeds the budget
        (the message gives the minimum), or for a budget that is not a positive int or a
        float in ``(0, 1]``.

    Example:
      >>> import jaxquant as jq
      >>> from jaxquant.flax import LayerSensitivity, Rule, Sensitivity, mixed_precision
      >>> int4 = Rule(".*", weight=jq.QuantSpec("int4", jq.per_channel(-1)))
      >>> def layer(path, damage):
      ...     return LayerSensitivity(path, "Dense", (64, 64), {}, {"float": 0.0, "int4": damage},
      ...                             {"float": 16384, "int4": 2304})
      >>> sens = Sensitivity("accuracy", True, 0.9, {"int4": int4},
      ...                    (layer("a", 0.05), layer("b", 0.01)), {}, {})
      >>> plan = mixed_precision(sens, budget=0.6)
      >>> plan.choice, plan.nbytes, plan.damage
      ({'a': 'float', 'b': 'int4'}, 18688, 0.01)
      >>> [(r.pattern, r.quantizes) for r in plan.rules]
      [('a', False), ('b', True)]

    References:
      Dong et al., "HAWQ: Hessian AWare Quantization of Neural Networks with Mixed
      Precision", https://arxiv.org/abs/1905.03696; Yao et al., "HAWQ-V3: Dyadic Neural
      Network Quantization" (bit allocation as an integer program under a size budget),
      https://arxiv.org/abs/2011.10680
    """
    if not isinstance(sens, Sensitivity):
        raise TypeError(
            f"mixed_precision: expected the Sensitivity of jq.flax.sensitivity, got "
            f"{type(sens).__name__}."
        )
    if not sens.layers:
        raise ValueError("mixed_precision: the Sensitivity has no layers.")
    if objective is not None and not callable(objective):
        raise TypeError(
            "mixed_precision: objective must be None or a function (layer, option) -> cost, "
            f"got {describe(objective)}."
        )
    if noise is not None and (
        isinstance(noise, bool)
        or not isinstance(noise, numbers.Real)
        or not math.isfinite(noise)
        or noise < 0
    ):
        raise ValueError(
            f"mixed_precision: noise must be None (each damage's measured noise level) or a "
            f"finite number >= 0, got {describe(noise)}."
        )
    total_f32 = sens.float32_bytes
    limit = _budget(budget, total_f32)
    options = sens.options
    costs: list[list[tuple[int, float]]] = []
    for layer in sens.layers:
        row = []
        for o in options:
            if objective is None:
                value = _denoised(layer, o, noise)
            else:
                value = objective(layer, o)
            try:
                if isinstance(value, str | bytes):  # float("1") would parse it
                    raise TypeError
                c = float(value)
            except (TypeError, ValueError):
                raise TypeError(
                    f"mixed_precision: the cost of {o!r} at layer {layer.path!r} is "
                    f"{describe(value)}; the objective must return a real number."
                ) from None
            if math.isnan(c) or c == -math.inf:
                raise ValueError(
                    f"mixed_precision: the cost of {o!r} at layer {layer.path!r} is {c}; "
                    "costs must be numbers, not NaN or -inf (+inf forbids an option)."
                )
            row.append((int(layer.nbytes[o]), c))
        costs.append(row)
    solved = solve_knapsack(costs, limit)
    if solved is None:
        allowed = [[b for b, c in row if c != math.inf] for row in costs]
        if any(not a for a in allowed):
            bad = [sens.layers[i].path for i, a in enumerate(allowed) if not a]
            raise ValueError(f"mixed_precision: every option of layer(s) {bad} has infinite cost.")
        smallest = sum(min(a) for a in allowed)
        raise ValueError(
            f"mixed_precision: the budget of {limit} bytes is below the smallest achievable "
            f"total, {smallest} bytes ({smallest / max(total_f32, 1):.3f} of the float32 "
            f"{total_f32} bytes; every layer in its smallest allowed option). Raise the "
            "budget or add smaller candidates."
        )
    idx, nbytes, damage = solved
    choice, rules = {}, []
    for layer, k in zip(sens.layers, idx, strict=True):
        o = options[k]
        choice[layer.path] = o
        pattern = re.escape(layer.path)
        rules.append(Rule(pattern) if o == FLOAT else _at(sens.candidates[o], layer.path))
    return Assignment(tuple(rules), choice, nbytes, damage, limit, total_f32)


def _denoised(layer: LayerSensitivity, option: str, noise: float | None) -> float:
    """The damage, or 0 for a negative one within the noise level: a lower precision
    that measured slightly better than float is no better, only unresolved."""
    d = layer.damage[option]
    level = layer.noise.get(option, 0.0) if noise is None else float(noise)
    return 0.0 if d < 0 and -d <= level else d


def _budget(budget: Any, total: int) -> int:
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(
            f"mixed_precision: budget must be an int (bytes) or a float in (0, 1] (fraction "
            f"of float32), got {budget!r}."
        )
    if isinstance(budget, numbers.Integral):
        if budget <= 0:
            raise ValueError(f"mixed_precision: budget must be > 0 bytes, got {budget}.")
        return int(budget)
    if not 0.0 < float(budget) <= 1.0:
        raise ValueError(
            f"mixed_precision: a float budget is a fraction of the float32 bytes in (0, 1], "
            f"got {budget!r}; pass an int for a number of bytes."
        )
    return math.floor(float(budget) * total)


def solve_knapsack(
    costs: Sequence[Sequence[tuple[int, float]]], budget: int
) -> tuple[list[int], int, float] | None:
    """Exact multiple-choice knapsack: one ``(bytes, cost)`` option per group.

    Minimizes the total cost (summed left to right, as floats) subject to total bytes
    ``<= budget``; ties go to fewer bytes, then to the first found. Options with cost
    ``inf`` are skipped. Returns ``(option index per group, bytes, cost)``, or None when
    nothing fits.

    The frontier after each group holds the partial sums not dominated by another (fewer
    or equal bytes and lower or equal cost); a dominated partial sum stays dominated after
    the same completion (float addition is monotone), so dropping it is exact.
    """
    groups = [[(int(b), float(c)) for b, c in row] for row in costs]
    # rest[i]: the fewest bytes groups i.. can still take: prunes partial sums that cannot fit
    rest = [0] * (len(groups) + 1)
    for i in range(len(groups) - 1, -1, -1):
        allowed = [b for b, c in groups[i] if c != math.inf]
        if not allowed:
            return None
        rest[i] = rest[i + 1] + min(allowed)
    # (bytes, cost, back-pointer (previous pointer, option index))
    frontier: list[tuple[int, float, Any]] = [(0, 0.0, None)]
    for i, row in enumerate(groups):
        new = [
            (b + ob, c + oc, (ptr, k))
            for b, c, ptr in frontier
            for k, (ob, oc) in enumerate(row)
            if oc != math.inf and b + ob + rest[i + 1] <= budget
        ]
        new.sort(key=lambda t: (t[0], t[1]))
        frontier = []
        for t in new:
            if not frontier or t[1] < frontier[-1][1]:
                frontier.append(t)
        if not frontier:
            return None
    best = min(frontier, key=lambda t: (t[1], t[0]))
    idx: list[int] = []
    ptr = best[2]
    while ptr is not None:
        ptr, k = ptr
        idx.append(k)
    return idx[::-1], best[0], best[1]


__all__ = [
    "Assignment",
    "LayerSensitivity",
    "Sensitivity",
    "mixed_precision",
    "sensitivity",
]
