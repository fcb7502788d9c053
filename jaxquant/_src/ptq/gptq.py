"""GPTQ on a whole Flax model: every quantized layer's weight solved on its calibration
Hessian, returned as the converted tree :func:`jaxquant.flax.convert` serves.

The pipeline (Frantar et al. 2022, https://arxiv.org/abs/2210.17323):

1. **Statistics.** :func:`jaxquant.flax.layer_statistics` runs the float model over the
   calibration batches once and accumulates each quantized layer's ``X^T X`` (float32,
   streamed, under jit). It sees the layers' online activation transforms (a SmoothQuant /
   AWQ / rotation step before this one), so the Hessians are of the transformed inputs,
   the space the stored weights are already in.
2. **Targets.** The model quantized with the same rules (:func:`jaxquant.flax.quantize_model`)
   is traced once (``jax.eval_shape``, no compute) to learn every quantized contraction's
   weight parameter and its weight spec in the stored layout, exactly as ``convert`` does.
3. **Solve.** Each layer with a stored weight parameter and a Hessian is quantized by the
   array solver :func:`jaxquant._src.gptq.gptq` (lazy blocks, damping, dead inputs,
   optional activation order, any QuantSpec as the grid), contracting the weight over the
   input axes the statistics found (``LayerStatistics.weight_axes``, so ``DenseGeneral``
   kernels and parameters used transposed work).
4. **Convert.** ``convert`` builds the served tree and GPTQ's QArrays replace its
   round-to-nearest ones: the same leaves, shapes and specs, GPTQ's codes (and, for groups
   along the input axis, GPTQ's group scales). Serving, ``jq.size_report`` and ``jq.orbax``
   see an ordinary converted tree.

``sequential=True`` follows the paper's practice of measuring each layer's Hessian with the
layers before it already quantized. Layers are taken in the order the model first runs them
and grouped by input: layers whose float-pass Hessians are bit-identical read the same
activation (``q``, ``k``, ``v`` of one attention block) and are solved together. Before
each group after the first, the calibration batches are run again with every earlier
group's weights replaced by their dequantized GPTQ values (activations stay float even when
the rules quantize them), and only that group's Hessians are accumulated. Cost: one extra
calibration pass (forward only) per group -- ``4 * blocks + 1`` for a pre-LN transformer
(attention input, attention output, MLP input, MLP output; the head) -- against one pass for
the default; the solves are the same.

Layers GPTQ does not apply to are listed in ``skipped`` with the reason, and ``convert``
rounds them to nearest (or, for a weight the model computes, the interception does at each
call): a weight that is not a stored parameter (a tied head's ``embedding.T`` passed as a
kernel), an ``Embed`` table (its rows also serve lookups, an error GPTQ's output
objective does not see), convolutions, weights with batch axes, layers no calibration batch
reached, and layers the solver refuses (a granularity whose groups are not contiguous along
the input, a Hessian not positive definite after damping), with the solver's message.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant._src import gptq as solver
from jaxquant._src.checks import check_bool, check_int, check_real, describe
from jaxquant._src.flax import quantize_model
from jaxquant._src.flax.calibrate import call_args, check_call_kwargs
from jaxquant._src.flax.intercept import Contraction
from jaxquant._src.flax.kinds import nnx_modules
from jaxquant._src.flax.linen import QuantizedModule, report_linen
from jaxquant._src.flax.nnx import given_rules, last_contractions, report_nnx
from jaxquant._src.flax.rules import Rule, as_rules
from jaxquant._src.flax.serve import convert_linen, convert_nnx, exact_rule, weight_targets
from jaxquant._src.flax.statistics import LayerStatistics, Statistics, layer_statistics
from jaxquant._src.ptq.result import PTQResult
from jaxquant._src.qarray import QArray
from jaxquant._src.spec import QuantSpec
from jaxquant._src.types import PyTree

_FN = "jq.ptq.gptq"
# Classes whose weight parameter also serves lookups (a tied embedding table).
_LOOKUP_TABLES = frozenset({"Embed"})


def gptq(
    model: nn.Module | nnx.Module,
    batches: Iterable[Any],
    variables: PyTree = None,
    *,
    rules: Rule | Iterable[Rule],
    damping: float = 0.01,
    damping_reference: Literal["mean", "median"] = "mean",
    block_size: int = 128,
    act_order: bool = False,
    sequential: bool = False,
    call_kwargs: Mapping[str, Any] | None = None,
) -> PTQResult:
    """Quantize a Flax model's weights with GPTQ, for serving.

    Every layer ``rules`` quantizes is rounded column by column onto its weight spec's grid,
    each input channel's rounding error compensated by the channels not yet rounded through
    the inverse Hessian ``H = X^T X`` of the layer's calibration inputs ``X`` (Frantar et
    al. 2022, Algorithm 1 with lazy batches; see :func:`jaxquant.ptq.gptq_solve` for the
    solver's conventions). The result is the tree :func:`jaxquant.flax.convert` returns for the
    model quantized with ``rules``, with GPTQ's codes instead of round-to-nearest's: serve
    it with ``quantize_model(model, rules).apply(result.variables, x)``.

    Any jaxquant format and granularity is a target grid (int2..int8, full-range int grids,
    nf4, fp4, fp8, MX; per-channel, groups ``per_block(0, g)`` along the input). Activation
    specs in the rules are kept for serving; the Hessians are of the float (or
    online-transformed) activations. Qwix's GPTQ rounds onto the full int grid
    (``int_grid="full"``) at every width; on that grid this solver and Qwix's give the same
    codes up to float rounding order (``benchmarks/peers_ptq.py --gptq-codes``).

    Args:
      model: the float model: a Linen module (with ``variables``) or an NNX module
        (quantized and converted in place).
      batches: calibration inputs as :func:`jaxquant.flax.layer_statistics` takes them
        (arrays, tuples of arguments, dicts of keyword arguments).
      variables: the Linen model's variables (every collection, the ``"ptq"`` transforms
        of an earlier method included); None for NNX.
      rules: the :class:`jaxquant.flax.Rule` s that say which layers are quantized with
        which weight (and activation) specs: the rules you serve the model with.
      damping: fraction of ``mean(diag H)`` added to each Hessian's diagonal (the paper's
        1%). Outlier channels dominate the mean: ``damping_reference="median"`` (or 1e-4)
        is better there.
      damping_reference: ``"mean"`` (the paper's) or ``"median"`` of ``diag H``; on the
        outlier byte LM median cuts int4 GPTQ's loss increase from +0.081 to +0.024
        nats/byte (see :func:`jaxquant.ptq.gptq_solve`).
      block_size: input channels per lazy batch.
      act_order: round each layer's input channels by descending ``diag H``.
      sequential: measure each group of layers' Hessians with the layers before it already
        quantized (one calibration pass per group; see the module docstring). Default: one
        pass over the float model.
      call_kwargs: keyword arguments for every model call (``{"deterministic": True}``).

    Returns:
      :class:`PTQResult`: ``variables`` -- Linen: the converted variables (QArrays for
      every quantized weight; the input is untouched); NNX: the model, quantized and
      converted in place. ``report`` -- per solved layer: ``loss`` and ``rtn_loss`` (the
      proxy output error ``tr((W - Q)^T H (W - Q))`` of GPTQ's and round-to-nearest's
      ``Q``, with ``H`` summed over ``rows`` calibration rows), ``damping`` (the value
      added to ``diag H``), ``dead`` (inputs that were always 0), ``rows``, ``inputs``,
      ``param``, ``group`` (its calibration pass when ``sequential``) and ``seconds``.
      ``skipped`` -- layer path -> why GPTQ did not apply (those layers are rounded to
      nearest).

    Raises:
      ValueError: rules that quantize no weight; Linen ``variables`` missing, NNX
        ``variables`` given; an NNX model already quantized; no batches; arguments out of
        range.
      TypeError: a model that is not a float Flax model; arguments of the wrong type.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxquant as jq
      >>> model = nn.Sequential([nn.Dense(32), nn.relu, nn.Dense(8)])
      >>> keys = jax.random.split(jax.random.key(0), 5)
      >>> mix = jax.random.normal(keys[0], (16, 16))  # correlated inputs
      >>> batches = [jax.random.normal(k, (64, 16)) @ mix for k in keys[1:]]
      >>> variables = model.init(jax.random.key(1), batches[0])
      >>> rules = jq.flax.Rule(".*", weight=jq.QuantSpec("int4", jq.per_channel()))
      >>> result = jq.ptq.gptq(model, batches, variables, rules=rules)
      >>> type(result.variables["params"]["layers_0"]["kernel"]).__name__
      'QArray'
      >>> r = result.report["layers_0"]
      >>> bool(r["loss"] < r["rtn_loss"])  # the layer's output error vs round-to-nearest
      True
      >>> qmodel = jq.flax.quantize_model(model, rules)  # serve with the same rules
      >>> qmodel.apply(result.variables, batches[0]).shape
      (64, 8)

    References:
      Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
      Generative Pre-trained Transformers", https://arxiv.org/abs/2210.17323
    """
    rs = as_rules(rules, _FN)
    if not any(r.weight is not None for r in rs):
        raise ValueError(
            f"{_FN}: no rule quantizes a weight (every rule has weight=None); GPTQ solves "
            "weights: give the layers a weight spec, e.g. Rule('.*', weight=QuantSpec('int4'))."
        )
    damping = check_real(
        damping, f"{_FN}: damping", ge=0.0, hint="It is a fraction of mean(diag H), e.g. 0.01."
    )
    block_size = check_int(block_size, f"{_FN}: block_size", lo=1)
    act_order = check_bool(act_order, f"{_FN}: act_order")
    if damping_reference not in ("mean", "median"):
        raise ValueError(
            f"{_FN}: damping_reference must be 'mean' (the paper's) or 'median', got "
            f"{damping_reference!r}."
        )
    sequential = check_bool(sequential, f"{_FN}: sequential")
    call_kwargs = check_call_kwargs(call_kwargs, _FN)
    if isinstance(batches, jax.Array | np.ndarray):
        raise TypeError(
            f"{_FN}: batches must be an iterable of model inputs, got one array of shape "
            f"{np.shape(batches)}; pass [x]."
        )
    if isinstance(batches, str | bytes) or not isinstance(batches, Iterable):
        raise TypeError(
            f"{_FN}: batches must be an iterable of model inputs, got {describe(batches)}."
        )
    batches = list(batches)
    if not batches:
        raise ValueError(f"{_FN}: no calibration batches; pass a non-empty list of inputs.")
    solve = _Solver(damping, damping_reference, block_size, act_order)

    if isinstance(model, QuantizedModule):
        raise TypeError(
            f"{_FN}: pass the float model and rules=, not a model from quantize_model (GPTQ "
            "reads the float weights and returns the converted tree for those rules)."
        )
    if isinstance(model, nn.Module):
        if variables is None:
            raise ValueError(f"{_FN}: a Linen model needs its variables (model.init(...)).")
        if not isinstance(variables, Mapping) or "params" not in variables:
            raise ValueError(
                f"{_FN}: variables must be the Linen model's variables dict with a 'params' "
                f"collection (model.init(...)), got {describe(variables)}."
            )
        return _linen(model, batches, variables, rs, solve, sequential, call_kwargs)
    if isinstance(model, nnx.Module):
        if variables is not None:
            raise ValueError(f"{_FN}: an NNX model holds its own variables; pass none.")
        if given_rules(model) is not None:
            raise ValueError(
                f"{_FN}: the NNX model is quantized already (quantize_model was applied); "
                "pass the float model and rules=: GPTQ quantizes and converts it in place."
            )
        return _nnx(model, batches, rs, solve, sequential, call_kwargs)
    raise TypeError(f"{_FN}: model must be a float Flax Linen or NNX model, got {describe(model)}.")


# ------------------------------------------------------------------ shared


class _Target:
    """One quantized weight parameter: its layer, parameter name and stored-layout spec."""

    def __init__(self, layer: str, param: str, module: str, spec: QuantSpec) -> None:
        self.layer, self.param, self.module, self.spec = layer, param, module, spec

    @property
    def name(self) -> str:
        return f"{self.layer}/{self.param}" if self.layer else self.param


class _Solver:
    def __init__(
        self, damping: float, reference: Literal["mean", "median"], block_size: int, act_order: bool
    ) -> None:
        self.damping, self.block_size, self.act_order = damping, block_size, act_order
        self.reference = reference

    def __call__(
        self, t: _Target, w: Any, st: LayerStatistics, hessian: Any, group: int
    ) -> tuple[QArray, dict[str, Any]]:
        start = time.perf_counter()
        r = solver.gptq(
            w,
            hessian,
            t.spec,
            block_size=self.block_size,
            damping=self.damping,
            damping_reference=self.reference,
            act_order=self.act_order,
            contract_axis=st.weight_axes,
            name=t.layer or "(the model itself)",
        )
        loss, rtn = float(r.loss), float(r.rtn_loss)
        return r.qarray, {
            "loss": loss,
            "rtn_loss": rtn,
            "damping": float(r.damp),
            "dead": int(r.dead),
            "rows": st.rows,
            "inputs": int(np.prod(st.channels)),
            "param": t.param,
            "group": group,
            "seconds": time.perf_counter() - start,
        }


def _targets(
    found: list[Contraction], weights: dict[str, tuple[Rule, QuantSpec]]
) -> dict[str, _Target]:
    """Layer path -> its quantized weight parameter (``weights``: convert's targets)."""
    out: dict[str, _Target] = {}
    for c in found:
        if not c.quantized or c.param is None:
            continue
        name = f"{c.path}/{c.param}" if c.path else c.param
        if name in weights and c.path not in out:
            out[c.path] = _Target(c.path, c.param, c.module, weights[name][1])
    return out


def _plan(stats: Statistics, targets: dict[str, _Target]) -> tuple[list[list[str]], dict[str, str]]:
    """The layers GPTQ solves, grouped by input in call order, and why the others are not."""
    skipped: dict[str, str] = {}

    def fate(path: str) -> str:  # what serving does with a layer GPTQ does not solve
        if path in targets:
            return "; convert rounds it to nearest"
        return (
            "; convert did not see it run, so it stays float in the tree and the quantized "
            "model rounds it to nearest whenever it runs"
        )

    for path, why in stats.unsupported.items():
        skipped[path] = why + fate(path)
    for path in stats.unreached:
        skipped[path] = (
            "none of its weight contractions ran on the calibration batches (a branch they "
            "did not take, an embedding used only for lookups, or a parameter another module "
            "contracts): no Hessian" + fate(path)
        )
    solvable: list[str] = []
    for path, st in stats.items():
        t = targets.get(path)
        if st.rule.weight is None:
            continue  # an activation-only rule: no weight to solve
        if st.param is None:
            skipped[path] = (
                "its weight is not a stored parameter (the model computes it, e.g. a tied "
                "head's embedding.T passed as a kernel), so there is no stored weight to "
                "replace; the quantized model rounds it to nearest at each call"
            )
        elif t is None or t.param != st.param:
            skipped[path] = (
                f"its statistics are of parameter {st.param!r}, which is not the weight "
                "convert stores for it" + fate(path)
            )
        elif t.module in _LOOKUP_TABLES:
            skipped[path] = (
                f"its {t.param!r} is an {t.module} table that also serves lookups, whose "
                "error GPTQ's output objective does not see" + fate(path)
            )
        else:
            solvable.append(path)
    # Layers reading the same activation have bit-identical Hessians (same rows, same
    # products): one group, one calibration pass in sequential mode.
    groups: dict[tuple[int, str], list[str]] = {}
    for path in solvable:
        h = stats[path].hessian
        assert h is not None  # layer_statistics ran with hessian=True
        key = (stats[path].rows, hashlib.sha256(np.asarray(h).tobytes()).hexdigest())
        groups.setdefault(key, []).append(path)
    return list(groups.values()), skipped


def _group_rules(group: list[str], stats: Statistics, rules: tuple[Rule, ...]) -> list[Rule]:
    """Rules that observe exactly ``group``'s layers; every other layer keeps a rule
    without specs (still matched, so its online transform applies, but not observed)."""
    return [exact_rule(p, stats[p].rule) for p in group] + [Rule(r.pattern) for r in rules]


def _stats(
    model: Any, batches: list[Any], variables: Any, rules: Any, call_kwargs: dict[str, Any]
) -> Statistics:
    try:
        return layer_statistics(
            model, batches, variables, rules=rules, hessian=True, call_kwargs=call_kwargs
        )
    except (ValueError, TypeError) as e:
        raise type(e)(str(e).replace("layer_statistics", _FN, 1)) from None


def _first_call(batch: Any, call_kwargs: dict[str, Any]) -> Callable[[Callable[..., Any]], Any]:
    args, kwargs = call_args(batch)

    def call(fn: Callable[..., Any]) -> Any:
        return fn(*args, **call_kwargs, **kwargs)

    return call


# ------------------------------------------------------------------ Linen


def _linen(
    model: nn.Module,
    batches: list[Any],
    variables: Mapping[str, Any],
    rules: tuple[Rule, ...],
    solve: _Solver,
    sequential: bool,
    call_kwargs: dict[str, Any],
) -> PTQResult:
    qmodel = quantize_model(model, rules)
    call = _first_call(batches[0], call_kwargs)
    # Trace once (no compute) to learn the quantized contractions, as convert needs.
    jax.eval_shape(lambda v: call(lambda *a, **k: qmodel.apply(v, *a, **k)), variables)
    matches, found = report_linen(qmodel), list(qmodel.record.contractions)
    targets = _targets(found, weight_targets(matches, found))
    stats = _stats(model, batches, variables, rules, call_kwargs)
    groups, skipped = _plan(stats, targets)

    params = variables["params"]
    solved: dict[str, QArray] = {}
    dequantized: dict[str, Any] = {}
    report: dict[str, dict[str, Any]] = {}
    for i, group in enumerate(groups):
        current = stats
        if sequential and i:
            now = {**variables, "params": _replace(params, dequantized)}
            current = _stats(model, batches, now, _group_rules(group, stats, rules), call_kwargs)
        for path in group:
            t = targets[path]
            w = _leaf(params, t.name)
            h = current[path].hessian
            try:
                q, report[path] = solve(t, w, stats[path], h, i)
            except ValueError as e:
                skipped[path] = f"GPTQ failed: {e}; convert rounds it to nearest"
                continue
            solved[t.name] = q
            if sequential:
                dequantized[t.name] = q.dequantize().astype(jnp.asarray(w).dtype)
    converted = convert_linen(variables, matches, found)
    converted = {**converted, "params": _replace(converted["params"], solved)}
    return PTQResult(converted, report, skipped)


def _key(path: Any) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _leaf(tree: Any, name: str) -> Any:
    node = tree
    for part in name.split("/"):
        node = node[part]
    return node


def _replace(tree: Any, new: dict[str, Any]) -> Any:
    """``tree`` with the leaves named in ``new`` (``a/b/kernel``) replaced."""
    if not new:
        return tree
    return jax.tree_util.tree_map_with_path(
        lambda p, v: new.get(_key(p), v), tree, is_leaf=lambda v: isinstance(v, QArray)
    )


# ------------------------------------------------------------------ NNX


def _nnx(
    model: nnx.Module,
    batches: list[Any],
    rules: tuple[Rule, ...],
    solve: _Solver,
    sequential: bool,
    call_kwargs: dict[str, Any],
) -> PTQResult:
    stats = _stats(model, batches, None, rules, call_kwargs)
    quantize_model(model, rules)
    # One trace (no compute) records the contractions modules compute themselves: convert
    # converts their weights too.
    graphdef, state = nnx.split(model)
    jax.eval_shape(lambda s: _first_call(batches[0], call_kwargs)(nnx.merge(graphdef, s)), state)
    matches, found = report_nnx(model), last_contractions(model)
    assert found is not None  # the model just ran
    targets = _targets(found, weight_targets(matches, found))
    groups, skipped = _plan(stats, targets)
    nodes = dict(nnx_modules(model))

    def variable(t: _Target) -> Any:
        var: Any = nodes[t.layer]
        for part in t.param.split("/"):
            var = getattr(var, part)
        return var

    solved: dict[str, tuple[Any, QArray]] = {}
    originals: dict[str, tuple[Any, Any]] = {}
    report: dict[str, dict[str, Any]] = {}
    try:
        for i, group in enumerate(groups):
            current = stats
            if sequential and i:
                current = _stats(
                    model, batches, None, _group_rules(group, stats, rules), call_kwargs
                )
            for path in group:
                t = targets[path]
                var = variable(t)
                w = var[...]
                try:
                    q, report[path] = solve(t, w, stats[path], current[path].hessian, i)
                except ValueError as e:
                    skipped[path] = f"GPTQ failed: {e}; convert rounds it to nearest"
                    continue
                solved[path] = (var, q)
                if sequential:  # later groups' statistics see this layer quantized
                    originals[path] = (var, w)
                    var.set_value(q.dequantize().astype(jnp.asarray(w).dtype))
    finally:
        for var, w in originals.values():  # convert quantizes the float weights
            var.set_value(w)
    convert_nnx(model, matches, found)
    for var, q in solved.values():
        var.set_value(q)
    return PTQResult(model, report, skipped)
