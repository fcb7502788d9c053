"""The calibration pass: static activation ranges for every quantized layer of a model.

:func:`calibrate` runs the *float* model over calibration batches and watches the input of
every layer whose rule quantizes its activation (the dot's ``lhs``). Per layer it keeps
mergeable statistics (:mod:`jaxquant._src.observe`): exact min / max / mean / std /
``mean |x|`` from one pass, and, for percentile, MSE and KL calibration, fixed-range
histograms from a second pass over the same batches. The rule's own calibration method
then turns them into one range per layer, and :attr:`CalibrationResult.rules` are the
model's rules with ``act`` calibrated by :func:`jaxquant.fixed` at that range: a static
scale, the same for every batch, ready for :func:`jaxquant.flax.quantize_model` and
serving (:func:`jaxquant.flax.convert`).

``aggregate="ema"`` / ``"mean"`` run the method on each batch instead and average the
ranges (exponential moving average with ``momentum``, or the plain mean), as
TensorFlow's moving-average min / max quantizers do.

Real models take more than one array: flags (``train=False``, ``deterministic=True``),
masks, positions, and variables beyond ``params`` (``batch_stats``, caches). A batch's
arrays are traced, its other leaves (Python bools, ints, strings) are static
(:func:`split_call`), and ``call_kwargs`` are passed to every call as they are; Linen
models get every collection of ``variables``. :mod:`jaxquant._src.flax.sensitivity` calls
models the same way.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import math
import warnings
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from typing import Any, TypeAlias

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.linen.module import InterceptorContext
from jax import lax

from jaxquant._src import observe
from jaxquant._src.calibration import KL, Fixed, fixed
from jaxquant._src.checks import check_int, check_real, describe
from jaxquant._src.flax import act_transform
from jaxquant._src.flax.act_transform import ActTransform
from jaxquant._src.flax.intercept import intercepting, observing
from jaxquant._src.flax.kinds import nnx_layers
from jaxquant._src.flax.linen import LinenFront, QuantizedModule, linen_path
from jaxquant._src.flax.linen import layer_kind as linen_layer_kind
from jaxquant._src.flax.nnx import given_rules, intercept_nnx, report_nnx
from jaxquant._src.flax.rules import Rule, as_rules, first_match
from jaxquant._src.flax.serve import exact_rule
from jaxquant._src.spec import QuantSpec
from jaxquant._src.types import PyTree

# split_call's static half: the call's tree structure and, per leaf, None (an array,
# traced) or (type, value) of a Python bool / number / string / enum. Hashable.
Static: TypeAlias = tuple[jax.tree_util.PyTreeDef, tuple[tuple[type, Any] | None, ...]]
# layer path -> its observed activation operands (one per call of the layer)
Acts: TypeAlias = dict[str, list[jax.Array]]
# layer path -> the rule it matched, in call order (filled while tracing)
Found: TypeAlias = dict[str, Rule]
# fn(payload, arrays, static, found) -> the activations of the watched layers
Run: TypeAlias = Callable[[PyTree, list[Any], Static, Found], Acts]

_AGGREGATES = ("global", "ema", "mean")


@dataclasses.dataclass(frozen=True)
class CalibrationResult:
    """What :func:`calibrate` measured.

    Attributes:
      rules: one exact-path :class:`~jaxquant.flax.Rule` per quantized layer, in the order
        the model calls them: the rule it matched, with ``act`` calibrated by
        :func:`jaxquant.fixed` at the measured range (layers whose activation is not
        quantized keep their rule as it was).
      ranges: layer path -> ``(lo, hi)`` of its activation spec (``lo = -hi`` when
        symmetric).
      stats: layer path -> ``count``, ``nonfinite``, ``min``, ``max``, ``mean``, ``std``,
        ``mean_abs`` of its input over all batches.
      methods: layer path -> the calibration method that chose its range.
      num_batches: how many batches were seen.
      aggregate: ``"global"``, ``"ema"`` or ``"mean"``.
      kept_float: layer path -> why its activation stays in float: the range measured
        there is empty (every activation was 0, or the method chose 0) or not finite, so
        no scale would mean anything. Its rule in ``rules`` has ``act=None`` (the weight
        is still quantized); ``calibrate`` also warns. Calibrate with batches that
        exercise the layer, or keep it float on purpose with a rule without ``act``.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxquant as jq
      >>> from jaxquant.flax import Rule, calibrate, quantize_model
      >>> rule = Rule(".*", weight=jq.QuantSpec("int8"), act=jq.QuantSpec("int8"))
      >>> qmodel = quantize_model(nn.Dense(4), rule)
      >>> x = jnp.linspace(-2.0, 2.0, 12).reshape(3, 4)
      >>> variables = jax.jit(qmodel.init)(jax.random.key(0), x)
      >>> result = calibrate(qmodel, [x, 0.5 * x], variables)  # two batches
      >>> result.num_batches, result.ranges, result.methods
      (2, {'': (-2.0, 2.0)}, {'': 'absmax'})
      >>> result.stats[""]["count"], result.stats[""]["max"]
      (24.0, 2.0)
    """

    rules: tuple[Rule, ...]
    ranges: Mapping[str, tuple[float, float]]
    stats: Mapping[str, Mapping[str, float]]
    methods: Mapping[str, str]
    num_batches: int
    aggregate: str
    kept_float: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{'layer':<28} {'method':<18} {'range':>22} {'max |x|':>10}"]
        for path, (lo, hi) in self.ranges.items():
            st = self.stats[path]
            method = self.methods[path] + (" (kept float)" if path in self.kept_float else "")
            lines.append(
                f"{path:<28} {method:<18} {f'[{lo:.4g}, {hi:.4g}]':>22} "
                f"{max(-st['min'], st['max']):>10.4g}"
            )
        return "\n".join(lines)


def _wants_range(rule: Rule) -> bool:
    act = rule.act
    return (
        act is not None and act.calibration is not None and not isinstance(act.calibration, Fixed)
    )


def calibrate(
    model: nn.Module | nnx.Module,
    batches: Iterable[Any],
    variables: PyTree = None,
    *,
    rules: Rule | Iterable[Rule] | None = None,
    aggregate: str = "global",
    momentum: float = 0.9,
    bins: int = 2048,
    call_kwargs: Mapping[str, Any] | None = None,
) -> CalibrationResult:
    """Static activation ranges for a model's quantized layers, from calibration batches.

    Args:
      model: a model from :func:`jaxquant.flax.quantize_model` (Linen
        :class:`QuantizedModule` or a quantized NNX module: its rules are used), or a
        plain Linen / NNX model together with ``rules=``. The float model is what runs:
        activations are observed unquantized.
      batches: the calibration inputs: arrays (``model(x)``), tuples (``model(*args)``)
        or dicts (keyword arguments). Their arrays are traced; any other leaf (a Python
        bool, int or string, e.g. ``(x, False)`` for ``model(x, train)``) is passed as
        the Python value it is, one compilation per distinct value. Read into a list
        first (percentile / MSE / KL methods read them twice).
      variables: the Linen model's variables, every collection (``params``,
        ``batch_stats``...: what ``model.init`` returned); None for NNX.
      rules: the rules, when ``model`` is not already quantized.
      aggregate: ``"global"`` (one range over all batches' values), ``"ema"`` or
        ``"mean"`` (the method per batch, then an exponential moving average with
        ``momentum`` / the mean of the per-batch ranges).
      momentum: of ``"ema"``: ``range = momentum * range + (1 - momentum) * batch_range``.
      bins: histogram bins of the percentile and MSE methods (KL uses its own ``bins``).
      call_kwargs: keyword arguments for every call of the model, passed as they are
        (never traced): evaluation flags such as ``{"train": False}`` or
        ``{"deterministic": True}``, constant masks. Linen: ``apply``'s own ``rngs``,
        ``mutable`` and ``method`` go here too. A batch that is a dict must not repeat
        them.

    Returns:
      A :class:`CalibrationResult`; its ``rules`` give the quantized model static
      activation scales. A layer whose measured range is empty (every activation 0) or
      not finite has no meaningful scale: its activation stays float, it is listed in
      ``kept_float`` with the reason, and a ``UserWarning`` names it.

    Raises:
      ValueError: no batches; a batch whose activations at a quantized layer are NaN or
        Inf (naming the batch and the layer); an activation spec that is not per tensor;
        an unknown ``aggregate``; ``momentum`` or ``bins`` out of range; a keyword in
        both a batch and ``call_kwargs``; Linen ``variables`` missing a collection the
        model reads, or a call that would update one (a BatchNorm in training mode).
      TypeError: ``batches`` that are not an iterable of arrays, tuples or dicts, or that
        hold a leaf that is neither an array nor a Python bool, number or string (pass
        such values in ``call_kwargs``); ``momentum``, ``bins`` or ``call_kwargs`` of the
        wrong type.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxquant as jq
      >>> from jaxquant.flax import Rule, quantize_model, calibrate
      >>> qmodel = quantize_model(nn.Dense(4), Rule(".*", weight=jq.QuantSpec("int8"),
      ...                                           act=jq.QuantSpec("int8")))
      >>> x = jnp.linspace(-2.0, 2.0, 12).reshape(3, 4)
      >>> variables = jax.jit(qmodel.init)(jax.random.key(0), x)
      >>> result = calibrate(qmodel, [x], variables)
      >>> result.ranges[""], result.rules[0].act.calibration
      ((-2.0, 2.0), Fixed(amax=2.0))

      A model with BatchNorm and a ``train`` flag, called as ``model.apply(variables,
      x, train=False)``: every collection, and the flag in ``call_kwargs``.

      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train: bool = True):
      ...         x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
      ...         return nn.Dense(2)(nn.relu(x))
      >>> init = jax.jit(Net().init, static_argnames="train")
      >>> variables = init(jax.random.key(1), x, train=False)
      >>> sorted(variables)
      ['batch_stats', 'params']
      >>> rule = Rule(".*", weight=jq.QuantSpec("int8"), act=jq.QuantSpec("int8"))
      >>> result = calibrate(quantize_model(Net(), rule), [x], variables,
      ...                    call_kwargs={"train": False})
      >>> list(result.ranges)
      ['Dense_0', 'Dense_1']
    """
    if not isinstance(aggregate, str) or aggregate not in _AGGREGATES:
        raise ValueError(
            f"calibrate: aggregate must be one of {_AGGREGATES}, got {describe(aggregate)}."
        )
    momentum = check_real(momentum, "calibrate: momentum", ge=0.0, le=1.0)
    if momentum == 1.0:
        raise ValueError(
            "calibrate: momentum must be in [0, 1), got 1.0: the EMA would never move from "
            "the first batch's range. Use aggregate='global' for one range over all batches."
        )
    bins = check_int(bins, "calibrate: bins", lo=8)
    call_kwargs = check_call_kwargs(call_kwargs, "calibrate")
    batches = check_batches(batches, call_kwargs, "calibrate")
    run, payload, key = _runner(model, variables, rules, call_kwargs)
    step1, found_by_static = cached_step(
        None if key is None else ("calibrate", key, aggregate != "global"),
        lambda: _observe_step(run, aggregate),
    )
    moments: dict[str, observe.Moments] = {}
    ranges: dict[str, tuple[Any, Any]] = {}
    for b, (arrays, static) in enumerate(batches):
        with explain_collections("calibrate"):
            out = step1(payload, arrays, static)
        for path, (m, r) in out.items():
            bad = float(m.nonfinite)
            if bad:
                raise ValueError(
                    f"calibrate: batch {b} gives {int(bad)} non-finite activation values "
                    f"(NaN / Inf) at the input of {path!r}; a range from them would be "
                    "meaningless. Check that batch (and, if it is the first layer, the "
                    "data itself) or the float model's params."
                )
            moments[path] = m if path not in moments else observe.merge(moments[path], m)
            if r is not None:
                if path not in ranges:
                    ranges[path] = r
                elif aggregate == "ema":
                    lo, hi = ranges[path]
                    ranges[path] = (
                        momentum * lo + (1 - momentum) * r[0],
                        momentum * hi + (1 - momentum) * r[1],
                    )
                else:
                    lo, hi = ranges[path]
                    ranges[path] = (lo + r[0], hi + r[1])
    # path -> matched rule, in the order the model first called them (batches in order)
    found: Found = {}
    for _, static in batches:
        for path, rule in found_by_static[static].items():
            found.setdefault(path, rule)
    if aggregate == "mean":
        ranges = {p: (lo / len(batches), hi / len(batches)) for p, (lo, hi) in ranges.items()}
    if aggregate == "global":
        hist_paths = [p for p in moments if observe.needs_histogram(_act_of(found, p))]
        hists = _histograms(run, key, payload, batches, found, moments, hist_paths, bins)
        for path, m in moments.items():
            ranges[path] = observe.finalize(_act_of(found, path), m, hists.get(path))
    out_ranges = {p: (float(lo), float(hi)) for p, (lo, hi) in ranges.items()}
    stats = {p: _summary(m) for p, m in moments.items()}
    methods = {p: str(_act_of(found, p).calibration) for p in out_ranges}
    new_rules: list[Rule] = []
    kept_float: dict[str, str] = {}
    for path, rule in found.items():
        if path not in out_ranges:
            new_rules.append(exact_rule(path, rule))
            continue
        act = _act_of(found, path)
        why = _unusable_range(out_ranges[path], act.symmetric, stats[path], methods[path])
        if why is not None:
            kept_float[path] = why
            new_rules.append(exact_rule(path, rule, act=None))
            continue
        lo, hi = out_ranges[path]
        cal = fixed(max(-lo, hi)) if act.symmetric else fixed((lo, hi))
        new_rules.append(exact_rule(path, rule, act=act.replace(calibration=cal)))
    if kept_float:
        listing = "; ".join(f"{p!r}: {why}" for p, why in kept_float.items())
        warnings.warn(
            f"calibrate: {len(kept_float)} layer(s) keep float activations (their weights are "
            f"still quantized): {listing}. See CalibrationResult.kept_float; calibrate with "
            "batches that exercise these layers, or give them a rule without act.",
            UserWarning,
            stacklevel=2,
        )
    return CalibrationResult(
        tuple(new_rules), out_ranges, stats, methods, len(batches), aggregate, kept_float
    )


def _observe_step(run: Run, aggregate: str) -> tuple[Callable[..., Any], dict[Static, Found]]:
    """calibrate's first pass over one batch, jitted: per watched layer its moments and,
    unless ``aggregate`` is ``"global"``, its per-batch range. The rules the layers matched
    are recorded while tracing, per call structure (``static``), in the returned dict."""
    found_by_static: dict[Static, Found] = {}

    def observe_batch(
        payload: PyTree, arrays: list[Any], static: Static
    ) -> dict[str, tuple[observe.Moments, tuple[jax.Array, jax.Array] | None]]:
        found = found_by_static.setdefault(static, {})
        acts = run(payload, arrays, static, found)
        out = {}
        for path, xs in acts.items():
            spec = _act_of(found, path)
            m = observe.moments(xs[0])
            for x in xs[1:]:
                m = observe.merge(m, observe.moments(x))
            r = None
            if aggregate != "global":  # a layer called twice: the union of its ranges
                los, his = zip(*(observe.batch_range(x, spec) for x in xs), strict=True)
                r = (jnp.min(jnp.stack(los)), jnp.max(jnp.stack(his)))
            out[path] = (m, r)
        return out

    return jax.jit(observe_batch, static_argnums=2), found_by_static


# Jitted passes over a model, reused by later calls on the same model: a fresh jax.jit of
# a fresh closure traces and compiles again, which is most of a calibration's time on small
# models (and of the tests' and the sweeps' repeated calibrations of one model). Bounded:
# each entry holds its model and compiled programs.
_STEPS: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
_STEPS_MAX = 32


def cached_step(key: Hashable | None, build: Callable[[], Any]) -> Any:
    """``build()``, kept under ``key`` (least recently used out after 32); None: no reuse.

    ``key`` must say everything the built function depends on besides its arguments: the
    float model (a Linen module or an NNX graph definition: equal ones compute alike), the
    rules, ``call_kwargs`` and the pass's own static options (:func:`run_key`).
    """
    if key is None:
        return build()
    try:
        value = _STEPS.pop(key)
    except KeyError:
        value = build()
    except TypeError:  # a key that hashes but cannot be compared: no reuse
        return build()
    _STEPS[key] = value
    while len(_STEPS) > _STEPS_MAX:
        _STEPS.popitem(last=False)
    return value


def run_key(
    model: nn.Module | nnx.GraphDef[Any], rules: tuple[Rule, ...], call_kwargs: dict[str, Any]
) -> Hashable | None:
    """What a model run (:func:`_runner`) depends on besides its arguments, hashable; None
    when some part is not (a module field or a ``call_kwargs`` value that is an array or a
    list): such runs are not reused."""
    key = (type(model), model, rules, tuple(sorted(call_kwargs.items())))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _act_of(found: Found, path: str) -> QuantSpec:
    """The activation spec of a layer whose activations were observed (:func:`_record`
    observes only rules with one)."""
    act = found[path].act
    assert act is not None, path
    return act


def _unusable_range(
    lo_hi: tuple[float, float], symmetric: bool, stats: Mapping[str, float], method: str
) -> str | None:
    """Why ``(lo, hi)`` can give no static scale (``jq.fixed`` refuses it), or None.

    An empty range has no scale that means anything: a unit scale would be silently wrong
    for the first nonzero activation served, the smallest normal one would flush it.
    """
    lo, hi = lo_hi
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{method} gave the range ({lo:g}, {hi:g}), which is not finite"
    empty = max(-lo, hi) <= 0.0 if symmetric else lo == hi == 0.0
    if not empty:
        return None
    if stats["count"] == 0:
        return "it saw no activation values (an empty input)"
    if stats["min"] == stats["max"] == 0.0:
        return f"all {int(stats['count'])} activation values it saw were 0"
    return f"{method} chose the empty range ({lo:g}, {hi:g})"


def check_batches(
    batches: Any, call_kwargs: Mapping[str, Any], fn: str
) -> list[tuple[list[Any], Static]]:
    """``batches`` as a non-empty list of :func:`split_call` pairs; ``fn`` names the caller
    in the errors."""
    if isinstance(batches, str | bytes) or not isinstance(batches, Iterable):
        raise TypeError(
            f"{fn}: batches must be an iterable of model inputs (arrays, tuples of "
            f"arguments or dicts of keyword arguments), got {describe(batches)}."
        )
    batches = list(batches)
    if not batches:
        raise ValueError(f"{fn}: no calibration batches; pass a non-empty list of inputs.")
    out = []
    for b, batch in enumerate(batches):
        if isinstance(batch, dict) and (both := sorted(set(batch) & set(call_kwargs))):
            raise ValueError(
                f"{fn}: batches[{b}] and call_kwargs both give the keyword argument(s) "
                f"{both}; give each in one place (call_kwargs for what every call shares)."
            )
        out.append(split_call(batch, f"{fn}: batches[{b}]"))
    return out


def _summary(m: observe.Moments) -> dict[str, float]:
    n = float(m.count)
    return {
        "count": n,
        "nonfinite": float(m.nonfinite),
        "min": float(m.lo) if n else 0.0,
        "max": float(m.hi) if n else 0.0,
        "mean": float(m.mean),
        "std": float(jnp.sqrt(m.m2 / max(n, 1.0))),
        "mean_abs": float(m.mean_abs),
    }


def _histograms(
    run: Run,
    key: Hashable | None,
    payload: PyTree,
    batches: list[tuple[list[Any], Static]],
    found: Found,
    moments: Mapping[str, observe.Moments],
    paths: list[str],
    bins: int,
) -> dict[str, observe.Hist]:
    if not paths:
        return {}
    spans = {p: observe.hist_range(moments[p]) for p in paths}

    def nbins(p: str) -> int:
        c = _act_of(found, p).calibration
        return c.bins if isinstance(c, KL) else bins  # KL has its own histogram size

    sizes = tuple(nbins(p) for p in paths)
    step2 = cached_step(
        None if key is None else ("calibrate.hist", key, tuple(paths), sizes),
        lambda: _hist_step(run, paths, sizes),
    )
    total: dict[str, observe.Hist] = {}
    for arrays, static in batches:
        for p, h in step2(payload, arrays, static, spans).items():
            total[p] = h if p not in total else observe.add_hist(total[p], h)
    return total


def _hist_step(run: Run, paths: list[str], sizes: tuple[int, ...]) -> Callable[..., Any]:
    """calibrate's second pass over one batch, jitted: the histograms of ``paths``' inputs
    with ``sizes`` bins over the given spans."""

    def hist_batch(
        payload: PyTree,
        arrays: list[Any],
        static: Static,
        spans: Mapping[str, tuple[jax.Array, jax.Array, jax.Array]],
    ) -> dict[str, observe.Hist]:
        acts = run(payload, arrays, static, {})
        out = {}
        for p, n in zip(paths, sizes, strict=True):
            hs = [observe.histograms(x, *spans[p], n) for x in acts[p]]
            h = hs[0]
            for other in hs[1:]:
                h = observe.add_hist(h, other)
            out[p] = h
        return out

    return jax.jit(hist_batch, static_argnums=2)


# ------------------------------------------------------------------ call arguments


def check_call_kwargs(call_kwargs: Any, fn: str) -> dict[str, Any]:
    """``call_kwargs`` as a dict (``{}`` for None); a TypeError naming it otherwise."""
    if call_kwargs is None:
        return {}
    if not isinstance(call_kwargs, Mapping) or not all(isinstance(k, str) for k in call_kwargs):
        raise TypeError(
            f"{fn}: call_kwargs must be a dict of keyword arguments passed to every call of "
            f"the model, e.g. {{'train': False}}, or None; got {describe(call_kwargs)}."
        )
    return dict(call_kwargs)


def is_traced(leaf: Any) -> bool:
    """Whether a leaf of a model call's arguments is traced (an array) or static."""
    return isinstance(leaf, jax.Array | np.ndarray | np.generic)


# Leaves a batch may hold besides arrays: the flags and options of a model call.
_STATIC_LEAVES = (bool, int, float, complex, str, bytes, enum.Enum)


def split_call(tree: Any, what: str) -> tuple[list[Any], Static]:
    """A model call's arguments, split for ``jax.jit``: ``(arrays, static)``.

    ``arrays`` are the array leaves of ``tree`` (``jax`` / ``numpy`` arrays and numpy
    scalars), traced. ``static`` is hashable and holds the rest: the tree's structure and
    its other leaves (Python bools, numbers, strings, enum members), passed to the model
    as they are -- ``train=False`` stays a Python bool that ``if not train:`` can read.
    Each leaf is kept with its type, so ``True`` and ``1`` compile separately.
    :func:`join_call` puts the two back together.

    Raises:
      TypeError: a leaf of another kind (``what`` names the argument); such values go in
        ``call_kwargs``, which is passed as it is.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    arrays: list[Any] = []
    static: list[tuple[type, Any] | None] = []
    for leaf in leaves:
        if is_traced(leaf):
            arrays.append(leaf)
            static.append(None)  # a static entry is never None: it is a (type, value) pair
            continue
        if not isinstance(leaf, _STATIC_LEAVES):
            raise TypeError(
                f"{what} holds {describe(leaf)}, which is neither an array (traced) nor a "
                "Python bool, number or string (static, e.g. train=False). Pass other "
                "values through call_kwargs, which reach the model as they are."
            )
        static.append((type(leaf), leaf))
    return arrays, (treedef, tuple(static))


def join_call(arrays: Iterable[Any], static: Static) -> Any:
    """The tree :func:`split_call` split into ``(arrays, static)``."""
    treedef, entries = static
    it = iter(arrays)
    return jax.tree_util.tree_unflatten(treedef, [next(it) if e is None else e[1] for e in entries])


@contextlib.contextmanager
def explain_collections(fn: str) -> Iterator[None]:
    """Flax's errors about variable collections, as ValueErrors that say what to pass."""
    try:
        yield
    except flax.errors.ScopeCollectionNotFound as e:
        raise ValueError(
            f"{fn}: {e} Pass every collection the model was initialized with (e.g. "
            "variables={'params': ..., 'batch_stats': ...}, all of what model.init returned), "
            "not only 'params'."
        ) from e
    except flax.errors.ModifyScopeVariableError as e:
        raise ValueError(
            f"{fn}: {e} Called this way the model updates that collection (a BatchNorm in "
            "training mode): pass its evaluation flag, e.g. call_kwargs={'train': False}."
        ) from e


def call_args(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of one calibration batch: an array is ``model(x)``, a tuple
    ``model(*batch)``, a dict ``model(**batch)``."""
    if isinstance(batch, tuple):
        return batch, {}
    if isinstance(batch, dict):
        return (), batch
    return (batch,), {}


# ------------------------------------------------------------------ running the model


def _runner(
    model: nn.Module | nnx.Module,
    variables: PyTree,
    rules: Rule | Iterable[Rule] | None,
    call_kwargs: dict[str, Any],
) -> tuple[Run, PyTree, Hashable | None]:
    """``(fn, payload, key)``: ``fn(payload, arrays, static, found)`` runs the float model
    on one batch (:func:`split_call`'s halves) and returns the inputs of the watched layers;
    ``payload`` is its variables; ``key`` what ``fn`` depends on (:func:`run_key`)."""
    if not isinstance(model, nn.Module | nnx.Module):
        raise TypeError(
            f"calibrate: expected a Flax Linen or NNX model, got {type(model).__name__}."
        )
    rs, inner = resolve_rules(model, variables, rules, "calibrate")
    if isinstance(inner, nn.Module):
        return _linen_fn(inner, rs, call_kwargs), variables, run_key(inner, rs, call_kwargs)
    graphdef, state = nnx.split(inner)
    return _nnx_fn(graphdef, rs, call_kwargs), state, run_key(graphdef, rs, call_kwargs)


def resolve_rules(
    model: nn.Module | nnx.Module,
    variables: PyTree,
    rules: Rule | Iterable[Rule] | None,
    fn: str,
) -> tuple[tuple[Rule, ...], nn.Module | nnx.Module]:
    """``(rules, float model)`` of a calibration pass over a Linen or NNX ``model``.

    Linen: a :class:`QuantizedModule` brings its rules (and its inner float module), a plain
    module needs ``rules``; both need ``variables``. NNX: the model holds its variables;
    without ``rules``, those ``quantize_model`` was given, else the quantized layers found
    in it. ``fn`` names the caller in the errors."""
    if isinstance(model, nn.Module):
        if variables is None:
            raise ValueError(f"{fn}: a Linen model needs its variables (model.init(...)).")
        if isinstance(model, QuantizedModule):
            if rules is not None:
                raise ValueError(f"{fn}: the model is quantized already; pass no rules=.")
            return model.rules, model.module
        if rules is None:
            raise ValueError(
                f"{fn}: pass a model from jq.flax.quantize_model, or rules= with a plain model."
            )
        return as_rules(rules, fn), model
    if variables is not None:
        raise ValueError(f"{fn}: an NNX model holds its own variables; pass none.")
    if rules is not None:
        return as_rules(rules, fn), model
    given = given_rules(model)  # the rules quantize_model was given
    if given is not None and any(r.quantizes for r in given):
        return given, model
    matches = report_nnx(model)
    if not matches:
        raise ValueError(
            f"{fn}: the NNX model quantizes nothing; pass a model from "
            "jq.flax.quantize_model or rules=."
        )
    return tuple(exact_rule(m.path, m.rule) for m in matches), model


def _record(path: str, rule: Rule | None, x: Any, acts: Acts, found: Found) -> None:
    if rule is None or not rule.quantizes:
        return
    if path not in found:
        found[path] = rule
    if _wants_range(rule):
        assert rule.act is not None
        observe.check_activation_spec(rule.act, path)
        acts.setdefault(path, []).append(jnp.asarray(x))


def _linen_fn(model: nn.Module, rules: tuple[Rule, ...], call_kwargs: dict[str, Any]) -> Run:
    def fn(variables: PyTree, arrays: list[Any], static: Static, found: Found) -> Acts:
        args, kwargs = call_args(join_call(arrays, static))
        acts: Acts = {}
        stack: list[tuple[nn.Module, str]] = []  # the module methods running, innermost last
        roots: list[Any] = []

        def rule_at(path: str) -> Rule | None:
            i = first_match(rules, path)
            return None if i is None else rules[i]

        def interceptor(
            next_fun: Callable[..., Any],
            a: tuple[Any, ...],
            kw: dict[str, Any],
            context: InterceptorContext,
        ) -> Any:
            m = context.module
            if not roots:
                roots.append(m.scope)
            path = linen_path(m, roots[0], stack)
            if context.method_name == "__call__" and linen_layer_kind(m) is not None:
                x = a[0]
                transform = None if m.scope is None else act_transform.of_linen(m.variables)
                if transform is not None:  # the layer's product sees its transformed input
                    x = act_transform.apply_to_layer_input(transform, m, x, f"layer {path!r}")
                _record(path, rule_at(path), x, acts, found)
            stack.append((m, path))
            try:
                return next_fun(*a, **kw)
            finally:
                stack.pop()

        def seen(path: str, rule: Rule, x: Any) -> None:
            _record(path, rule, x, acts, found)

        # Contractions that modules compute themselves (FlaxConv1D, Embed.attend): their
        # activations are observed through the interception, the products stay float.
        front = LinenFront(stack, rule_at, lambda *_: None, lambda _: None, False, layers=False)
        with nn.intercept_methods(interceptor), intercepting(front), observing(seen):
            model.apply(variables, *args, **call_kwargs, **kwargs)
        return acts

    return fn


class _Recorder:
    """Stands in for a layer's product op: records the activation, computes in float."""

    def __init__(
        self,
        op: Callable[..., Any],
        position: int,
        path: str,
        rule: Rule | None,
        acts: Acts,
        found: Found,
    ) -> None:
        self.op, self.position, self.path, self.rule = op, position, path, rule
        self.acts, self.found = acts, found

    transform: ActTransform | None = None  # a dot_general's online input transform

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.transform is not None:  # lhs, contracted over dimension_numbers[0][0]
            lhs = act_transform.apply_to_axes(
                self.transform, args[0], args[2][0][0], f"layer {self.path!r}"
            )
            args = (lhs, *args[1:])
        _record(self.path, self.rule, args[self.position], self.acts, self.found)
        return self.op(*args, **kwargs)


def _nnx_fn(
    graphdef: nnx.GraphDef[Any], rules: tuple[Rule, ...], call_kwargs: dict[str, Any]
) -> Run:
    def fn(state: PyTree, arrays: list[Any], static: Static, found: Found) -> Acts:
        args, kwargs = call_args(join_call(arrays, static))
        model = nnx.merge(graphdef, state)
        acts: Acts = {}
        # Modules that compute their contractions themselves are observed through the
        # interception (on this merged copy: its classes and attributes are its own).
        intercept_nnx(model, rules)
        for path, node in nnx_layers(model):
            i = first_match(rules, path)
            rule = None if i is None else rules[i]
            if isinstance(node, nnx.Conv):
                rec = _Recorder(lax.conv_general_dilated, 0, path, rule, acts, found)
                node.conv_general_dilated = rec
            elif isinstance(node, nnx.Einsum):
                node.einsum_op = _Recorder(jnp.einsum, 1, path, rule, acts, found)
            else:
                rec = _Recorder(lax.dot_general, 0, path, rule, acts, found)
                rec.transform = act_transform.of_nnx(node)
                node.dot_general = rec
        with observing(lambda path, rule, x: _record(path, rule, x, acts, found)):
            model(*args, **call_kwargs, **kwargs)
        return acts

    return fn
