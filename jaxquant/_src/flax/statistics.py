"""Per-layer input statistics in one calibration pass: channel absmax, mean ``|x|`` and ``X^T X``.

The post-training methods of issue 14 each need a statistic of every quantized layer's
input ``X`` (rows: the positions the layer sees; columns: its input channels):

* GPTQ (Frantar et al. 2022, https://arxiv.org/abs/2210.17323) the Hessian of the layer's
  squared output error, ``H = 2 X^T X`` (the factor does not matter to the solver);
* SmoothQuant (Xiao et al. 2022, https://arxiv.org/abs/2211.10438) the absmax of each
  input channel, ``max_rows |X[:, j]|``;
* AWQ (Lin et al. 2023, https://arxiv.org/abs/2306.00978) the mean magnitude of each input
  channel, ``mean_rows |X[:, j]|``, and a sample of the layer's inputs to search its
  scales on the real output error.

:func:`layer_statistics` runs the *float* model over calibration batches and watches the
activation operand of every weight contraction whose rule quantizes, through the same
interception that QAT and :func:`jaxquant.flax.calibrate` use: Flax's layers (Linen and
NNX ``Dense`` / ``Linear``, ``DenseGeneral`` / ``LinearGeneral``, ``Einsum``) and the
contractions modules compute themselves (``lax.dot_general``, ``jnp.dot``, ``jnp.matmul``,
``jnp.einsum``, ``@``: Hugging Face's ``FlaxConv1D``, ``Embed.attend``, a LoRA layer's
``x @ kernel``). Batches, ``call_kwargs`` and Linen variable collections are handled as
:func:`~jaxquant.flax.calibrate` handles them.

Rows and channels: the channels of an activation are its contracted axes, in the order the
contraction pairs them with the weight's (a Dense layer's last axis; a ``DenseGeneral``
with ``axis=(-2, -1)`` contracts ``h * d`` channels, ``h`` major); its rows are every other
position (batch, sequence ...), flattened. A layer that runs several contractions of the
same weight per call (a tied embedding used twice, a layer called in a Python loop)
contributes the rows of every use.

Streaming: each batch runs one compiled step (one compilation per batch shape and static
arguments) that returns that batch's statistics; a second compiled step adds them to the
running ones (donated), in float32. Memory is bounded by the layer widths (per layer, the
running ``in^2`` Hessian and one batch's while they are added, ``max_samples * in`` for the
sample) and one batch's activations, never by the number of batches.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple, TypeAlias

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.linen.module import InterceptorContext
from jax import lax

from jaxquant._src.checks import check_bool, check_int, describe
from jaxquant._src.dot.subscripts import parse as parse_subscripts
from jaxquant._src.flax.calibrate import (
    Static,
    cached_step,
    call_args,
    check_batches,
    check_call_kwargs,
    explain_collections,
    join_call,
    resolve_rules,
    run_key,
)
from jaxquant._src.flax.intercept import Call, Side, Site, intercepting, observing
from jaxquant._src.flax.kinds import nnx_layers
from jaxquant._src.flax.linen import LinenFront, linen_path
from jaxquant._src.flax.nnx import intercept_nnx
from jaxquant._src.flax.rules import Rule, first_match, path_str
from jaxquant._src.layout import dot_layout
from jaxquant._src.types import PyTree

_FN = "layer_statistics"
# A parameter jaxquant's stateful rules add to a layer (LSQ step sizes): not a weight.
_OWN_PARAM = re.compile(r"jq\d+_")


class LayerStatistics(NamedTuple):
    """The input statistics of one quantized layer, over every calibration row.

    ``X`` is the layer's input as a ``(rows, in)`` matrix: rows are the positions it saw
    (batch, sequence ... flattened, over all batches and all uses per call), columns its
    input channels (the contracted axes of the activation, flattened in the order the
    contraction pairs them with the weight's ``weight_axes``).

    Attributes:
      rows: how many rows it saw, ``X.shape[0]`` (a Python int).
      absmax: ``max_rows |X[:, j]|``, float32 ``(in,)``.
      mean_abs: ``mean_rows |X[:, j]|``, float32 ``(in,)`` (zeros when ``rows`` is 0).
      hessian: ``X^T X`` summed over the rows, float32 ``(in, in)`` (divide by ``rows``
        for the mean; GPTQ's ``2 X^T X`` scale does not matter to its solver); None when
        :func:`layer_statistics` ran with ``hessian=False``.
      samples: up to ``max_samples`` rows of ``X``, float32 ``(min(rows, max_samples),
        in)``: a uniform random sample without replacement (as reservoir sampling gives:
        every row equally likely, see :func:`layer_statistics`); None when
        ``max_samples=0``.
      param: the module parameter that is the weight (``"kernel"``, ``"embedding"``,
        ``"Dense_0/kernel"`` for a child's), or None for a weight the model computes
        (a tied head's ``embedding.T`` passed as a kernel).
      weight_axes: the weight's input axes in the *stored* parameter's layout, paired in
        order with the channels: channel ``j`` is row ``j`` of
        ``jnp.moveaxis(w, weight_axes, range(len(weight_axes))).reshape(in, -1)``. A
        Dense kernel ``(in, out)`` has ``(0,)``; ``Embed.attend``'s ``embedding.T``,
        stored ``(vocab, features)``, has ``(1,)``.
      transposed: whether the contraction used the parameter transposed (``w.T``), as
        :attr:`jaxquant.flax.Contraction.transposed`; None for a square parameter found by
        its shape (``w`` and ``w.T`` look alike): ``weight_axes`` are then the operand's.
      channels: the shape of the activation's contracted axes (``in`` is their product).
      op: the function that computed the contraction (``"dot_general"``, ``"einsum"``,
        ``"dot"``, ``"matmul"``, ``"@"``).
      uses: the layer's weight contractions per model call (2 for a tied embedding used
        twice); every use adds its rows.
      rule: the rule that quantizes the layer.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxquant as jq
      >>> from jaxquant.flax import Rule, layer_statistics
      >>> model = nn.Dense(2)
      >>> x = jnp.array([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]])
      >>> variables = jax.jit(model.init)(jax.random.key(0), x)
      >>> st = layer_statistics(model, [x], variables,
      ...                       rules=Rule(".*", weight=jq.QuantSpec("int4")))[""]
      >>> st.rows, st.absmax.tolist(), st.mean_abs.tolist()
      (2, [3.0, 2.0, 1.0], [2.0, 1.0, 0.75])
      >>> st.hessian.tolist()  # X^T X
      [[10.0, -2.0, -2.5], [-2.0, 4.0, -1.0], [-2.5, -1.0, 1.25]]
      >>> st.param, st.weight_axes
      ('kernel', (0,))
    """

    rows: int
    absmax: jax.Array
    mean_abs: jax.Array
    hessian: jax.Array | None
    samples: jax.Array | None
    param: str | None
    weight_axes: tuple[int, ...]
    transposed: bool | None
    channels: tuple[int, ...]
    op: str
    uses: int
    rule: Rule


@dataclasses.dataclass(frozen=True, eq=False)
class Statistics(Mapping[str, LayerStatistics]):
    """What :func:`layer_statistics` measured: a read-only mapping from layer path (the
    path :func:`jaxquant.flax.report` and :func:`jaxquant.flax.contractions` give) to its
    :class:`LayerStatistics`, in the order the model first ran them.

    Attributes:
      layers: the mapping itself, as a dict.
      unreached: paths of layers the rules quantize, holding a weight (a parameter of rank
        >= 2), none of whose contractions ran in any batch (a branch the batches did not
        take, an embedding used only for lookups, a weight used in a product jaxquant
        cannot tell from an activation product): no statistics, never silently.
      unsupported: path -> why the layer ran a weight contraction that has no statistics
        here: a convolution (its input channels would be im2col patches, not collected), a
        contraction with batch axes on the weight (one Hessian per batch index), an
        einsum summing activation axes the weight lacks, or a layer contracting several
        different weights.
      num_batches: how many batches were seen.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxquant as jq
      >>> from jaxquant.flax import Rule, layer_statistics
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, head=False):
      ...         x = nn.Conv(4, (3,))(x)
      ...         return nn.Dense(2)(x) if head else x
      >>> x = jnp.ones((2, 5, 3))
      >>> variables = Net().init(jax.random.key(0), x, True)
      >>> stats = layer_statistics(Net(), [x], variables,
      ...                          rules=Rule(".*", weight=jq.QuantSpec("int8")))
      >>> list(stats), stats.unreached, list(stats.unsupported)
      ([], ('Dense_0',), ['Conv_0'])
    """

    layers: dict[str, LayerStatistics]
    unreached: tuple[str, ...]
    unsupported: dict[str, str]
    num_batches: int

    def __getitem__(self, path: str) -> LayerStatistics:
        try:
            return self.layers[path]
        except KeyError:
            why = (
                f"it is unsupported: {self.unsupported[path]}"
                if path in self.unsupported
                else "no batch reached it (see .unreached)"
                if path in self.unreached
                else f"no quantized layer has that path; the layers are {list(self.layers)}"
            )
            raise KeyError(f"{_FN}: no statistics for {path!r}: {why}.") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return (
            f"Statistics({len(self.layers)} layers, unreached={list(self.unreached)}, "
            f"unsupported={list(self.unsupported)}, num_batches={self.num_batches})"
        )


def layer_statistics(
    model: nn.Module | nnx.Module,
    batches: Iterable[Any],
    variables: PyTree = None,
    *,
    rules: Rule | Iterable[Rule] | None = None,
    hessian: bool = True,
    max_samples: int = 0,
    key: jax.Array | None = None,
    call_kwargs: Mapping[str, Any] | None = None,
) -> Statistics:
    """Input statistics of every quantized layer, streamed over calibration batches.

    For each layer whose rule quantizes (the same layers, paths and rules as
    :func:`jaxquant.flax.calibrate`, weight-only rules included), with ``X`` its input as
    rows x channels (see :class:`LayerStatistics`):

    .. math::

       \\mathrm{absmax}_j = \\max_i |X_{ij}|, \\quad
       \\mathrm{mean\\_abs}_j = \\frac{1}{n} \\sum_i |X_{ij}|, \\quad
       H = X^\\top X = \\sum_{\\text{batches}} X_b^\\top X_b

    accumulated in float32 (each batch's product at ``Precision.HIGHEST``) under
    ``jax.jit``: one compilation per batch shape, memory bounded by the layer widths.

    Args:
      model: a model from :func:`jaxquant.flax.quantize_model` (its rules are used), or a
        plain Linen / NNX model with ``rules=``. The float model runs.
      batches: the calibration inputs, as :func:`~jaxquant.flax.calibrate` takes them:
        arrays (``model(x)``), tuples (``model(*args)``) or dicts (keyword arguments);
        their non-array leaves (Python bools, numbers, strings) are static.
      variables: the Linen model's variables, every collection; None for NNX.
      rules: the rules, when ``model`` is not already quantized.
      hessian: whether to accumulate ``X^T X`` (``in^2`` floats per layer); False for
        SmoothQuant / AWQ, which need only the channel statistics.
      max_samples: keep up to this many input rows per layer (0: none). The sample is
        uniform without replacement over all rows of all batches: every row draws a
        uniform priority from ``key`` and the ``max_samples`` lowest are kept (bottom-k,
        which streams exactly and gives every subset of that size the same chance, as
        reservoir sampling does); rows come out in priority order, so the first ``m`` of
        them are a uniform sample of ``m``.
      key: the PRNG key of the sample (default ``jax.random.key(0)``: reproducible).
      call_kwargs: keyword arguments for every call of the model, passed as they are
        (``{"train": False}``, ``{"deterministic": True}``; Linen ``apply``'s ``rngs``).

    Returns:
      A :class:`Statistics`: path -> :class:`LayerStatistics`, plus the layers the rules
      quantize that no batch reached (``unreached``) and those whose contraction has no
      statistics here (``unsupported``: convolutions, batched weights), each by name.

    Raises:
      ValueError: no batches; a batch whose activations at a quantized layer are NaN or
        Inf (naming the batch and the layer); a layer inside ``nn.scan`` / ``nnx.scan`` /
        ``vmap`` / ``remat`` (its inputs cannot leave that transformation: unroll it);
        no quantized layer at all; Linen ``variables`` missing or missing a collection;
        NNX ``variables`` given; ``max_samples`` negative.
      TypeError: ``model`` not a Flax model; ``batches`` not an iterable of inputs, or
        holding a leaf that is neither an array nor a Python scalar; ``hessian``,
        ``max_samples``, ``key`` or ``call_kwargs`` of the wrong type.

    Example:
      Two Dense layers of an MLP: the first sees the data, the second ``relu(x W1 + b1)``.

      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxquant as jq
      >>> from jaxquant.flax import Rule, layer_statistics, quantize_model
      >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
      >>> qmodel = quantize_model(model, Rule(".*", weight=jq.QuantSpec("int4")))
      >>> batches = [jax.random.normal(jax.random.key(i), (16, 4)) for i in range(3)]
      >>> variables = jax.jit(model.init)(jax.random.key(0), batches[0])
      >>> stats = layer_statistics(qmodel, batches, variables, max_samples=10)
      >>> list(stats), stats["layers_0"].rows, stats["layers_0"].hessian.shape
      (['layers_0', 'layers_2'], 48, (4, 4))
      >>> x = jnp.concatenate(batches)
      >>> bool(jnp.allclose(stats["layers_0"].hessian, x.T @ x, rtol=1e-5))
      True
      >>> stats["layers_2"].absmax.shape, stats["layers_2"].samples.shape
      ((8,), (10, 8))
    """
    hessian = check_bool(hessian, f"{_FN}: hessian")
    max_samples = check_int(max_samples, f"{_FN}: max_samples", lo=0)
    key = _check_key(key)
    call_kwargs = check_call_kwargs(call_kwargs, _FN)
    batches = _check_batches(batches, call_kwargs)
    run, payload, candidates, key_ = _runner(model, variables, rules, call_kwargs)
    step, traced = cached_step(
        None if key_ is None else (_FN, key_, hessian, max_samples),
        lambda: _batch_step(run, hessian, max_samples),
    )
    # The running totals are donated: a layer holds two Hessians at a time, not three.
    merge = jax.jit(_merge_all, static_argnums=2, donate_argnums=0)
    total: dict[str, _Acc] = {}
    counts: dict[str, int] = {}
    for b, (arrays, static) in enumerate(batches):
        with explain_collections(_FN):
            out = step(payload, arrays, static, jax.random.fold_in(key, b))
        host = jax.device_get({p: (acc.rows, acc.nonfinite) for p, acc in out.items()})
        for path, (rows, nonfinite) in host.items():
            bad = int(nonfinite)
            if bad:
                raise ValueError(
                    f"{_FN}: batch {b} gives {bad} non-finite activation values (NaN / Inf) "
                    f"at the input of {path!r}; statistics of them would be meaningless. "
                    "Check that batch (and, if it is the first layer, the data itself) or "
                    "the float model's params."
                )
            counts[path] = counts.get(path, 0) + int(rows)
        both = {p: total[p] for p in out if p in total}
        merged = merge(both, {p: out[p] for p in both}, max_samples) if both else {}
        for path, acc in out.items():
            total[path] = merged.get(path, acc)
    # What tracing learned, over the batches' call structures in order.
    layouts: dict[str, _Layout] = {}
    unsupported: dict[str, str] = {}
    for _, static in batches:
        layouts.update(traced[static][0])
        unsupported.update(traced[static][1])
    layers = {}
    for path in layouts:  # the order the model first ran them (jit returns dicts sorted)
        if path not in total:
            continue
        acc, lay, n = total[path], layouts[path], counts[path]
        layers[path] = LayerStatistics(
            rows=n,
            absmax=acc.absmax,
            mean_abs=acc.sum_abs / max(n, 1),
            hessian=acc.hessian,
            samples=None if acc.samples is None else acc.samples[: min(n, max_samples)],
            param=lay.param,
            weight_axes=lay.weight_axes,
            transposed=lay.transposed,
            channels=lay.channels,
            op=lay.op,
            uses=lay.uses,
            rule=lay.rule,
        )
    unreached = tuple(p for p in candidates if p not in layers and p not in unsupported)
    if not layers and not unsupported:
        where = f" (the layers the rules quantize: {list(candidates)})" if candidates else ""
        raise ValueError(
            f"{_FN}: no weight contraction of a layer the rules quantize ran in any batch"
            f"{where}. Check the rules' patterns against jq.flax.report / "
            "jq.flax.contractions, and that the batches reach those layers."
        )
    return Statistics(layers, unreached, dict(unsupported), len(batches))


def _batch_step(
    run: Run, hessian: bool, max_samples: int
) -> tuple[Callable[..., Any], dict[Static, tuple[dict[str, _Layout], dict[str, str]]]]:
    """layer_statistics' pass over one batch, jitted. What tracing learns about the layers
    (each observed layer's layout, the unsupported ones and why) is recorded per call
    structure (``static``) in the returned dict."""
    traced: dict[Static, tuple[dict[str, _Layout], dict[str, str]]] = {}

    def batch_step(
        payload: PyTree, arrays: list[Any], static: Static, key: jax.Array
    ) -> dict[str, _Acc]:
        layouts, unsupported = traced.setdefault(static, ({}, {}))
        seen = run(payload, arrays, static)
        out: dict[str, _Acc] = {}
        for path, uses in seen.items():
            layout = _one_layout(path, uses, unsupported)
            if layout is None:
                continue
            layouts[path] = layout
            try:
                # every use has a layout here (_one_layout said so); its own act_axes
                xs = [_rows(x, lay) for x, lay in uses if not isinstance(lay, str)]
                accs = [
                    _use_stats(x, hessian, max_samples, _use_key(key, path, u))
                    for u, x in enumerate(xs)
                ]
            except jax.errors.UnexpectedTracerError as e:
                raise ValueError(
                    f"{_FN}: the layer {path!r} runs inside a jax transformation of the "
                    "model (nn.scan / nnx.scan, vmap or remat): its inputs cannot leave it. "
                    "Compute statistics on the unrolled model (a Python loop over the layers)."
                ) from e
            acc = accs[0]
            for other in accs[1:]:
                acc = _merge(acc, other, max_samples)
            out[path] = acc
        return out

    return jax.jit(batch_step, static_argnums=2), traced


# ------------------------------------------------------------------ the statistics


class _Acc(NamedTuple):
    """Running statistics of one layer (a pytree: None fields are empty subtrees)."""

    rows: jax.Array  # int32 (), rows of one batch (the host sums them as Python ints)
    nonfinite: jax.Array  # int32 (), NaN / Inf values of one batch
    absmax: jax.Array  # float32 (in,)
    sum_abs: jax.Array  # float32 (in,)
    hessian: jax.Array | None  # float32 (in, in)
    samples: jax.Array | None  # float32 (max_samples, in), lowest priority first
    priority: jax.Array | None  # float32 (max_samples,), inf where no row is kept yet


class _Layout(NamedTuple):
    """How one layer's activation is read as rows x channels (static, from tracing)."""

    act_axes: tuple[int, ...]  # the activation's contracted axes, paired with weight_axes
    weight_axes: tuple[int, ...]  # in the stored parameter's layout
    channels: tuple[int, ...]
    param: str | None
    transposed: bool | None
    op: str
    uses: int
    rule: Rule


def _rows(x: Any, layout: _Layout) -> jax.Array:
    """``x`` as float32 ``(rows, in)``: contracted axes last (in pairing order), flattened."""
    x = jnp.asarray(x, jnp.float32)
    k = len(layout.act_axes)
    x = jnp.moveaxis(x, layout.act_axes, tuple(range(x.ndim - k, x.ndim)))
    return x.reshape(-1, int(np.prod(layout.channels, dtype=np.int64)))


def _use_key(key: jax.Array, path: str, use: int) -> jax.Array:
    # One stream per (batch, layer, use): crc32 is stable across processes (hash() is not).
    return jax.random.fold_in(jax.random.fold_in(key, zlib.crc32(path.encode())), use)


def _use_stats(x: jax.Array, hessian: bool, k: int, key: jax.Array) -> _Acc:
    n, width = x.shape
    ax = jnp.abs(x)
    h = None
    if hessian:
        # HIGHEST: GPUs / TPUs would otherwise run a float32 product in bf16 / TF32 passes.
        h = lax.dot_general(
            x,
            x,
            (((0,), (0,)), ((), ())),
            precision=lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32,
        )
    samples = priority = None
    if k:
        priority = jax.random.uniform(key, (n,), jnp.float32)
        samples = x
        if n < k:  # empty slots: rank after every real row
            samples = jnp.concatenate([x, jnp.zeros((k - n, width), jnp.float32)])
            priority = jnp.concatenate([priority, jnp.full((k - n,), jnp.inf, jnp.float32)])
        samples, priority = _lowest(samples, priority, k)
    return _Acc(
        rows=jnp.asarray(n, jnp.int32),
        nonfinite=jnp.sum(~jnp.isfinite(x), dtype=jnp.int32),
        absmax=jnp.max(ax, axis=0, initial=0.0),
        sum_abs=jnp.sum(ax, axis=0),
        hessian=h,
        samples=samples,
        priority=priority,
    )


def _lowest(rows: jax.Array, priority: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The ``k`` rows of lowest priority, lowest first."""
    neg, idx = lax.top_k(-priority, k)
    return rows[idx], -neg


def _merge(a: _Acc, b: _Acc, k: int) -> _Acc:
    samples, priority = a.samples, a.priority
    if k and a.samples is not None and b.samples is not None:
        assert a.priority is not None and b.priority is not None
        samples, priority = _lowest(
            jnp.concatenate([a.samples, b.samples]), jnp.concatenate([a.priority, b.priority]), k
        )
    return _Acc(
        rows=a.rows + b.rows,
        nonfinite=a.nonfinite + b.nonfinite,
        absmax=jnp.maximum(a.absmax, b.absmax),
        sum_abs=a.sum_abs + b.sum_abs,
        hessian=None if a.hessian is None or b.hessian is None else a.hessian + b.hessian,
        samples=samples,
        priority=priority,
    )


def _merge_all(total: dict[str, _Acc], new: dict[str, _Acc], k: int) -> dict[str, _Acc]:
    return {p: _merge(total[p], new[p], k) for p in total}


# ------------------------------------------------------------------ layouts


def _one_layout(
    path: str, uses: list[tuple[Any, _Layout | str]], unsupported: dict[str, str]
) -> _Layout | None:
    """The layer's layout, the same for every use; None (and the reason in
    ``unsupported``) where there is none."""
    if path in unsupported:
        return None
    for _, lay in uses:
        if isinstance(lay, str):
            unsupported[path] = lay
            return None
    lays = [lay for _, lay in uses if not isinstance(lay, str)]
    first = lays[0]
    for lay in lays[1:]:
        if (lay.param, lay.weight_axes, lay.channels) != (
            first.param,
            first.weight_axes,
            first.channels,
        ):
            unsupported[path] = (
                "its weight contractions differ (parameter / input axes / channels "
                f"{(first.param, first.weight_axes, first.channels)} and "
                f"{(lay.param, lay.weight_axes, lay.channels)}): statistics are per weight, "
                "give each weight its own module"
            )
            return None
    return first._replace(uses=len(lays))


def _layout(site: Site, x: Any, rule: Rule) -> _Layout | str:
    """How the activation ``x`` of ``site`` is read as rows x channels, or why it cannot."""
    call = site.call
    act_side: Side = "rhs" if site.weight == "lhs" else "lhs"
    w = call.lhs if site.weight == "lhs" else call.rhs
    step = call.step
    if step is None:
        if call.op == "conv_general_dilated":
            return (
                "a convolution: its input channels are im2col patches, which layer_statistics "
                "does not collect"
            )
        return f"a {call.op} whose layout is unknown"
    if "subscripts" in step:
        la, lb, lo = parse_subscripts(step["subscripts"], np.ndim(call.lhs), np.ndim(call.rhs))
        mine, theirs = (la, lb) if act_side == "lhs" else (lb, la)
        if len(set(mine)) != len(mine) or len(set(theirs)) != len(theirs):
            return f"an einsum with a repeated label ({step['subscripts']!r})"
        act_axes = tuple(i for i, c in enumerate(mine) if c in theirs and c not in lo)
        w_axes = tuple(theirs.index(mine[i]) for i in act_axes)
        batched = [theirs.index(c) for c in theirs if c in mine and c in lo]
        summed = [c for c in mine if c not in theirs and c not in lo]
        if summed:
            return (
                f"an einsum ({step['subscripts']!r}) that sums activation axes the weight "
                "lacks: its output error is not a function of X^T X"
            )
    else:
        dn = step["dimension_numbers"]
        act_axes, act_batch = dot_layout(dn, act_side, np.ndim(x))
        w_axes, batched_axes = dot_layout(dn, site.weight, np.ndim(w))
        batched = list(batched_axes) + list(act_batch)
    if batched:
        return (
            f"a {call.op} with batch axes on the weight (shapes {np.shape(call.lhs)} x "
            f"{np.shape(call.rhs)}): it would need one Hessian per batch index"
        )
    if site.transposed:  # the operand is the stored parameter with its axes reversed
        w_axes = tuple(np.ndim(w) - 1 - a for a in w_axes)
    return _Layout(
        act_axes=act_axes,
        weight_axes=w_axes,
        channels=tuple(np.shape(x)[a] for a in act_axes),
        param=site.param or None,
        transposed=site.transposed,
        op=call.op,
        uses=1,
        rule=rule,
    )


# ------------------------------------------------------------------ running the model

# layer path -> (activation, its layout or why it has none), one per use
Seen: TypeAlias = dict[str, list[tuple[Any, "_Layout | str"]]]
# fn(payload, arrays, static) -> the watched layers' activations
Run: TypeAlias = Callable[[PyTree, list[Any], Static], Seen]


def _see(seen: Seen) -> Callable[[str, Rule | None, Any, Site], None]:
    def see(path: str, rule: Rule | None, x: Any, site: Site) -> None:
        if rule is not None and rule.quantizes:
            seen.setdefault(path, []).append((x, _layout(site, x, rule)))

    return see


def _runner(
    model: nn.Module | nnx.Module,
    variables: PyTree,
    rules: Rule | Iterable[Rule] | None,
    call_kwargs: dict[str, Any],
) -> tuple[Run, PyTree, tuple[str, ...], Hashable | None]:
    """``(fn, payload, candidates, key)``: ``fn(payload, arrays, static)`` runs the float
    model on one batch and returns the watched layers' activations; ``payload`` is its
    variables; ``candidates`` the paths of the layers the rules quantize that hold a
    weight (a parameter of rank >= 2), in parameter order; ``key`` what ``fn`` depends on
    (:func:`~jaxquant._src.flax.calibrate.run_key`)."""
    if not isinstance(model, nn.Module | nnx.Module):
        raise TypeError(
            f"{_FN}: model must be a Flax Linen or NNX model, got {describe(model)}; pass the "
            "model object (a Linen module with its variables, or an nnx.Module)."
        )
    rs, inner = resolve_rules(model, variables, rules, _FN)
    if isinstance(inner, nn.Module):
        params = variables.get("params", {}) if isinstance(variables, Mapping) else {}
        weights = jax.tree_util.tree_flatten_with_path(params)[0]
        paths = [
            path_str([getattr(k, "key", k) for k in p[:-1]])
            for p, v in weights
            if np.ndim(v) >= 2 and not _OWN_PARAM.match(str(getattr(p[-1], "key", "")))
        ]
        run = _linen_fn(inner, rs, call_kwargs)
        return run, variables, _quantized(rs, paths), run_key(inner, rs, call_kwargs)
    paths = [
        path_str(p[:-1])
        for p, v in nnx.iter_graph(inner)
        if isinstance(v, nnx.Param)
        and np.ndim(v.get_value()) >= 2
        and not _OWN_PARAM.match(str(p[-1]))
    ]
    graphdef, state = nnx.split(inner)
    run = _nnx_fn(graphdef, rs, call_kwargs)
    return run, state, _quantized(rs, paths), run_key(graphdef, rs, call_kwargs)


def _quantized(rules: tuple[Rule, ...], paths: list[str]) -> tuple[str, ...]:
    out: list[str] = []
    for p in paths:
        i = first_match(rules, p)
        if i is not None and rules[i].quantizes and p not in out:
            out.append(p)
    return tuple(out)


def _linen_fn(model: nn.Module, rules: tuple[Rule, ...], call_kwargs: dict[str, Any]) -> Run:
    def rule_at(path: str) -> Rule | None:
        i = first_match(rules, path)
        return None if i is None else rules[i]

    def fn(variables: PyTree, arrays: list[Any], static: Static) -> Seen:
        args, kwargs = call_args(join_call(arrays, static))
        seen: Seen = {}
        stack: list[tuple[nn.Module, str]] = []  # the module methods running, innermost last
        # Every contraction, Flax's layers' included (layers=True), reaches the observer
        # with its dimension numbers; none is quantized while observing.
        front = LinenFront(stack, rule_at, lambda *_: None, lambda _: None, False)

        def interceptor(
            next_fun: Callable[..., Any],
            a: tuple[Any, ...],
            kw: dict[str, Any],
            context: InterceptorContext,
        ) -> Any:
            m = context.module
            if front.root is None:  # the model's own scope: a tied head's kernel is computed
                front.root = m.scope
            stack.append((m, linen_path(m, front.root, stack)))
            try:
                return next_fun(*a, **kw)
            finally:
                stack.pop()

        with (
            nn.intercept_methods(interceptor),
            intercepting(front),
            observing(_see(seen), site=True),
        ):
            model.apply(variables, *args, **call_kwargs, **kwargs)
        return seen

    return fn


class _LayerOp:
    """Stands in for an NNX layer's product op: reports the activation with its layout,
    computes in float."""

    def __init__(
        self,
        op: str,
        fn: Callable[..., Any],
        path: str,
        rule: Rule | None,
        see: Callable[[str, Rule | None, Any, Site], None],
    ) -> None:
        self.op, self.fn, self.path, self.rule, self.see = op, fn, path, rule, see

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.op == "einsum":  # einsum_op(subscripts, inputs, kernel, ...)
            step: dict[str, Any] | None = {"subscripts": args[0]}
            x, w = args[1], args[2]
        else:  # dot_general(inputs, kernel, dimension_numbers, ...), conv(inputs, kernel, ...)
            x, w = args[0], args[1]
            dn = args[2] if len(args) > 2 else kwargs.get("dimension_numbers")
            step = {"dimension_numbers": dn} if self.op == "dot_general" else None
        call = Call(self.op, x, w, lambda: None, None, "", None, step)
        self.see(self.path, self.rule, x, Site(call, "rhs", "kernel", False))
        return self.fn(*args, **kwargs)


def _nnx_fn(
    graphdef: nnx.GraphDef[Any], rules: tuple[Rule, ...], call_kwargs: dict[str, Any]
) -> Run:
    def fn(state: PyTree, arrays: list[Any], static: Static) -> Seen:
        args, kwargs = call_args(join_call(arrays, static))
        model = nnx.merge(graphdef, state)
        seen: Seen = {}
        see = _see(seen)
        # Contractions modules compute themselves reach the observer through the
        # interception (on this merged copy); Flax's layers through their product op.
        intercept_nnx(model, rules)
        for path, node in nnx_layers(model):
            i = first_match(rules, path)
            rule = None if i is None else rules[i]
            if isinstance(node, nnx.Conv):
                node.conv_general_dilated = _LayerOp(
                    "conv_general_dilated", lax.conv_general_dilated, path, rule, see
                )
            elif isinstance(node, nnx.Einsum):
                node.einsum_op = _LayerOp("einsum", jnp.einsum, path, rule, see)
            else:
                node.dot_general = _LayerOp("dot_general", lax.dot_general, path, rule, see)
        with observing(see, site=True):
            model(*args, **call_kwargs, **kwargs)
        return seen

    return fn


# ------------------------------------------------------------------ arguments


def _check_key(key: Any) -> jax.Array:
    if key is None:
        return jax.random.key(0)
    if isinstance(key, jax.Array) and (
        jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        or (key.dtype == jnp.uint32 and key.shape == (2,))
    ):
        return key
    raise TypeError(
        f"{_FN}: key must be a PRNG key (jax.random.key(seed)) or None, got {describe(key)}."
    )


def _check_batches(batches: Any, call_kwargs: Mapping[str, Any]) -> list[tuple[list[Any], Static]]:
    """``batches`` as a non-empty list of :func:`split_call` pairs."""
    if isinstance(batches, jax.Array | np.ndarray):
        raise TypeError(
            f"{_FN}: batches must be an iterable of model inputs, got one array of shape "
            f"{np.shape(batches)} (iterating it would make each row a batch); pass [x]."
        )
    return check_batches(batches, call_kwargs, _FN)
