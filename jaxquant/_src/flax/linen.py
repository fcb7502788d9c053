"""Rule-based quantization of a Linen model, without editing its code.

:class:`QuantizedModule` wraps the model and shares its scope (``nn.share_scope``), so the
variables tree is the model's own: existing params and TrainStates keep working. While it
runs, an ``nn.intercept_methods`` interceptor replaces every call of an ``nn.Dense`` /
``nn.DenseGeneral`` / ``nn.Einsum`` whose path matches a rule by a call of a clone of that
module bound to the *same scope* with ``dot_general=QuantDot(rule)`` (an Einsum clone
computes its product with :func:`jaxquant.einsum`). Stateful rules (delayed scaling, LSQ,
stochastic rounding) compute it in a :class:`QuantOp` child named ``quant`` whose
variables live in the ``"quant_state"`` collection (and LSQ steps in ``"params"``).

Linen modules are created while the model runs (``@nn.compact``), so paths are only known
then: the strict check for rules that matched nothing runs at the end of every ``init`` /
``apply`` (once per trace under ``jax.jit``), and :func:`report` reads what the last call found.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.module import InterceptorContext
from jax import lax

from jaxquant._src.checks import check_bool, describe
from jaxquant._src.config import QuantConfig
from jaxquant._src.dot.probe import OVERWRITE, Probe
from jaxquant._src.flax import act_transform, stateful
from jaxquant._src.flax.act_transform import ActTransform
from jaxquant._src.flax.intercept import (
    Call,
    Contraction,
    Frontend,
    Owner,
    intercepting,
    serving,
)
from jaxquant._src.flax.kinds import LINEN_DOTS, LINEN_LAYERS, kernel_layout, linen_kind
from jaxquant._src.flax.rules import (
    Match,
    QuantConv,
    QuantDot,
    QuantEinsum,
    Rule,
    as_rules,
    check_conv_rule,
    check_unmatched,
    first_match,
    path_str,
)
from jaxquant._src.flax.serve import dequantized_own, linen_layer, own_qarrays
from jaxquant._src.qarray import QArray

_DOTS = LINEN_DOTS
_QUANTIZABLE = LINEN_LAYERS
_ORIGINAL_DOT = lax.dot_general  # before any interception patches it
_ORIGINAL_CONV = lax.conv_general_dilated
STATE = "quant_state"  # the variable collection of delayed scales and LSQ base steps


class QuantOp(nn.Module):
    """The quantized product of a stateful rule, as a child module of the layer
    (``dot_general_cls`` of Dense / DenseGeneral; called by the quantized Einsum).

    Variables (created at ``init``, updated by ``apply`` when ``"quant_state"`` is mutable):

    * ``quant_state/{lhs,rhs}_scaling``: the :class:`~jaxquant.ScaleState` of delayed
      scaling (``lhs``: activation, ``rhs``: weight);
    * ``params/{lhs,rhs}_step`` and ``quant_state/{lhs,rhs}_step_base``: LSQ's step is
      ``step * step_base``; ``step`` (init 1) is trained, ``step_base`` is LSQ's initial
      step ``2 mean|x| / sqrt(qmax)`` taken from the first training batch.

    * ``params/_overwrite_with_gradient`` (``quantize_model(..., delayed_grad=True)`` or
      ``errors=True``): what the backward pass writes -- the output gradient's amax
      history and the layer's errors -- as its gradient
      (:func:`jaxquant.optax.overwrite_with_gradient`).

    Stochastic specs take a key from the ``"quant"`` PRNG stream.
    """

    rule: Rule
    where: str
    probe: Probe | None = None

    @nn.compact
    def __call__(
        self,
        lhs: Any,
        rhs: Any,
        dimension_numbers: Any = None,
        precision: Any = None,
        preferred_element_type: Any = None,
        out_sharding: Any = None,
        *,
        subscripts: str | None = None,
    ) -> Any:
        rule = self.rule
        fresh: dict[str, Any] = {}

        def initial(name: str) -> Any:  # the whole initial state, made once, on demand
            if not fresh:
                fresh.update(stateful.init(rule, lhs, rhs))
            return fresh[name]

        state: dict[str, Any] = {}
        for name in stateful.state_names(rule):
            if stateful.trained(name):  # LSQ's step: a parameter
                state[name] = self.param(name, lambda _, n=name: initial(n))
                continue
            if not self.has_variable(STATE, name) and not self.is_mutable_collection(STATE):
                raise ValueError(self._missing_state(name))
            state[name] = self.variable(STATE, name, initial, name).value
        owg = None
        if stateful.probe_init(rule, self.probe):  # the backward pass's state: params
            owg = self.param(OVERWRITE, lambda _: stateful.probe_init(rule, self.probe))
        key = None
        if stateful.needs_key(rule):
            if not self.has_rng("quant"):
                raise ValueError(self._missing_rng())
            key = self.make_rng("quant")
        # Linen has no evaluation mode: stochastic specs always draw keys, and the state is
        # stored only when "quant_state" is mutable (and not at init, which stores init's).
        out, new = stateful.apply(
            rule,
            state,
            lhs,
            rhs,
            dimension_numbers=dimension_numbers,
            subscripts=subscripts,
            precision=precision,
            preferred_element_type=preferred_element_type,
            out_sharding=out_sharding,
            key=key,
            training=True,
            where=self.where,
            owg=owg,
            probe=self.probe,
        )
        if self.is_mutable_collection(STATE) and not self.is_initializing():
            for name, value in new.items():
                if not stateful.trained(name):
                    self.put_variable(STATE, name, value)
        return out

    def _lifted(self) -> str | None:
        """The Linen transform (``scan`` / ``vmap``) whose scope the layer runs in, if any:
        those see only the collections and RNG streams they are told to pass."""
        text = self.scope.path_text if self.scope is not None else ""  # "/remat(scan(A))/B"
        found = re.search(r"(?<![\w.])(scan|vmap)\(", text)
        return found.group(1) if found else None

    def _missing_state(self, name: str) -> str:
        kind = self._lifted()
        if kind == "scan":
            fix = (
                "the nn.scan around it does not pass the 'quant_state' collection: add it to "
                "nn.scan's variable_axes, e.g. nn.scan(Block, variable_axes={'params': 0, "
                "'quant_state': 0}, split_rngs={'params': True}, length=n)"
            )
        elif kind == "vmap":
            fix = (
                "the nn.vmap around it does not pass the 'quant_state' collection: add it to "
                "nn.vmap's variable_axes, e.g. nn.vmap(Block, variable_axes={'params': 0, "
                "'quant_state': 0}, split_rngs={'params': True})"
            )
        else:
            fix = (
                "pass the 'quant_state' collection init returned to apply (variables="
                "{'params': ..., 'quant_state': ...}), mutable=['quant_state'] while training"
            )
        return (
            f"quantize_model: the rule for {self.where!r} keeps state ({name!r} in the "
            f"'quant_state' collection), which is not there and cannot be created here: {fix}."
        )

    def _missing_rng(self) -> str:
        msg = (
            f"quantize_model: the rule for {self.where!r} rounds stochastically and needs "
            "keys from the 'quant' PRNG stream: pass rngs={'quant': key} to init / apply "
            "(a fresh key per step)"
        )
        kind = self._lifted()
        if kind is not None:
            msg += (
                f", and add it to the split_rngs of the nn.{kind} around the layer, e.g. "
                "split_rngs={'params': True, 'quant': True} (a different key per "
                f"{'layer' if kind == 'scan' else 'slice'})"
            )
        return msg + "."


@dataclasses.dataclass(frozen=True)
class _OpFactory:
    """``dot_general_cls`` for Dense / DenseGeneral: builds the :class:`QuantOp` child."""

    rule: Rule
    path: str
    probe: Probe | None = None

    def __call__(self) -> QuantOp:
        return QuantOp(self.rule, self.path, self.probe, name="quant")


class _QuantEinsum(nn.Einsum):
    """``nn.Einsum`` whose product is quantized (``op``: a QuantEinsum for a stateless
    rule, an _OpFactory for a stateful one). Same params as nn.Einsum."""

    op: Any = None

    @nn.compact
    def __call__(self, inputs: Any, einsum_str: str | None = None) -> Any:
        einsum_str = nn.merge_param("einsum_str", self.einsum_str, einsum_str)
        einsum_str = einsum_str.replace(" ", "")
        if "->" not in einsum_str or einsum_str.count(",") != 1:
            raise ValueError(
                f"Einsum: einsum_str must be explicit ('->') with two operands, got {einsum_str!r}."
            )
        kernel = self.param("kernel", self.kernel_init, self.shape, self.param_dtype)
        bias = None
        if self.use_bias:
            bias_shape, broadcasted_bias_shape = self._get_bias_shape(einsum_str, inputs, kernel)
            bias = self.param("bias", self.bias_init, bias_shape, self.param_dtype)
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        if isinstance(self.op, _OpFactory):
            y = self.op()(
                inputs,
                kernel,
                precision=self.precision,
                preferred_element_type=self.preferred_element_type,
                subscripts=einsum_str,
            )
        else:
            y = self.op(
                einsum_str,
                inputs,
                kernel,
                precision=self.precision,
                preferred_element_type=self.preferred_element_type,
            )
        if bias is not None:
            y += jnp.reshape(bias, broadcasted_bias_shape)
        return y


class _Record:
    """Mutable, identity-hashed holder of the last call's matches (shared by clones)."""

    def __init__(self) -> None:
        self.matches: list[Match] = []
        self.contractions: list[Contraction] = []
        self.seen = False

    def __repr__(self) -> str:
        return f"_Record({len(self.matches)} matches)"


def _relative_path(m: nn.Module, root: Any) -> str:
    """``m``'s path below the wrapped model, from module names (scope paths of a shared
    scope still contain the wrapper's field name)."""
    names: list[str | None] = []
    cur: Any = m
    while isinstance(cur, nn.Module) and cur.scope is not root:
        names.append(cur.name)
        cur = cur.parent
    if not isinstance(cur, nn.Module):  # not below the model (built in an outer module)
        return path_str(m.path)
    return path_str(names[::-1])


class QuantizedModule(nn.Module):
    """``module`` with the dots of rule-matched Dense / DenseGeneral layers quantized.

    Same variables as ``module`` (``init`` / ``apply`` give and take the same tree). Build it
    with :func:`jaxquant.flax.quantize_model`; ``method=`` other than ``__call__`` is not
    supported (wrap the method in a module).

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxquant as jq
      >>> from jaxquant.flax import Rule, quantize_model
      >>> model = nn.Sequential([nn.Dense(4), nn.Dense(2)])
      >>> qmodel = quantize_model(model, Rule("layers_0", weight=jq.QuantSpec("int8")))
      >>> type(qmodel).__name__
      'QuantizedModule'
      >>> x = jnp.ones((1, 3))
      >>> variables = model.init(jax.random.key(0), x)  # the float model's variables
      >>> qmodel.apply(variables, x).shape
      (1, 2)
    """

    module: nn.Module
    rules: tuple[Rule, ...]
    strict: bool = True
    probe: Probe | None = None
    record: _Record = dataclasses.field(default_factory=_Record, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.module, nn.Module):
            raise TypeError(
                f"QuantizedModule: module must be a flax.linen.Module, got {describe(self.module)}."
            )
        object.__setattr__(self, "rules", as_rules(self.rules, "QuantizedModule"))
        object.__setattr__(self, "strict", check_bool(self.strict, "QuantizedModule: strict"))
        super().__post_init__()

    def setup(self) -> None:
        nn.share_scope(self, self.module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        root = self.module.scope  # shared with self: the model's own scope
        rules = self.rules
        used: set[int] = set()
        matches: list[Match] = []
        contractions: list[Contraction] = []
        candidates: list[str] = []
        stack: list[tuple[nn.Module, str]] = []  # the module methods running, innermost last

        def note(path: str, module: str, rule: Rule | None) -> None:
            if path not in candidates:
                candidates.append(path)
            i = None if rule is None else first_match(rules, path)
            if i is not None:
                used.add(i)  # the rule's index (equal rules may repeat)

        def record(c: Contraction) -> None:
            contractions.append(c)
            rule = rule_at(c.path) if c.quantized else None  # quantized: a rule matched
            if rule is not None and all(x.path != c.path for x in matches):
                matches.append(Match(c.path, c.module, rule))

        def rule_at(path: str) -> Rule | None:
            i = first_match(rules, path)
            return None if i is None else rules[i]

        front = LinenFront(stack, rule_at, note, record, self.strict, root=root, probe=self.probe)

        # Converted params (serving) only: otherwise no module's own params hold a QArray,
        # and the per-call lookup below is skipped (it runs for every module method).
        served = any(
            isinstance(leaf, QArray)
            for leaf in jax.tree.leaves(
                self.variables.get("params", {}), is_leaf=lambda t: isinstance(t, QArray)
            )
        )

        def interceptor(
            next_fun: Callable[..., Any],
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
            context: InterceptorContext,
        ) -> Any:
            m = context.module
            if served and layer_kind(m) is None and m.scope is not None:
                own = m.variables.get("params", {})
                if own_qarrays(own):  # converted weights of a module's own contractions
                    path = linen_path(m, root, stack)
                    with serving(path):
                        return _serve_own(m, own, context.method_name, args, kwargs)
            path = linen_path(m, root, stack)
            stack.append((m, path))
            front.counts.pop(len(stack), None)  # a module's call numbers its own products
            try:
                kind = layer_kind(m)
                if context.method_name != "__call__" or kind is None:
                    return next_fun(*args, **kwargs)
                stored = stored_in(m, root)
                return _layer(
                    self.rules,
                    m,
                    kind,
                    path,
                    next_fun,
                    args,
                    kwargs,
                    note,
                    record,
                    stored,
                    self.probe,
                )
            finally:
                stack.pop()

        with nn.intercept_methods(interceptor), intercepting(front):
            out = self.module(*args, **kwargs)
        check_unmatched(rules, used, candidates, self.strict, "Linen")
        self.record.matches = matches
        self.record.contractions = contractions
        self.record.seen = True
        return out


def _serve_own(
    m: nn.Module, own: Any, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Run ``m``'s method on its own QArray parameters dequantized: a clone applied on its
    own (whose path is ``m``'s: its parent's path plus its name), so that the module's code
    sees float arrays and the interception re-quantizes them with the rule's spec."""
    variables = {k: v for k, v in m.variables.items() if k != "params"}
    variables["params"] = dequantized_own(own)
    clone = m.clone(parent=None)
    return clone.apply(variables, *args, method=method, **kwargs)


def _layer(
    rules: tuple[Rule, ...],
    m: nn.Module,
    kind: type,
    path: str,
    next_fun: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    note: Callable[[str, str, Rule | None], None],
    record: Callable[[Contraction], None],
    stored: bool,
    probe: Probe | None = None,
) -> Any:
    """One call of a Flax layer (Dense, DenseGeneral, Einsum, Conv; ``kind``, from
    :func:`layer_kind`) that runs its own ``__call__``: quantized by a clone bound to the
    same scope whose product is jaxquant's. (A function, not a method: a Linen method would
    push the wrapper on flax's module stack, and the layer's children would be built under
    it.)"""
    if _is_our_clone(m):
        return next_fun(*args, **kwargs)
    i = first_match(rules, path)
    rule = None if i is None else rules[i]
    served = m.has_variable("params", "kernel") and isinstance(
        m.get_variable("params", "kernel"), QArray
    )
    if rule is None or not rule.quantizes:
        note(path, type(m).__name__, rule)
        if served:
            raise ValueError(
                f"quantize_model: the kernel of {path!r} is a QArray (converted "
                "params) but no quantizing rule matches the layer; apply the params "
                "with the rules they were converted with."
            )
        return next_fun(*args, **kwargs)  # its contraction is intercepted and listed
    note(path, type(m).__name__, rule)
    if served:
        out = linen_layer(m, rule, path, args, kwargs)
    else:
        out = _quantized_clone(m, rule, path, probe)(*args, **kwargs)
    kernel: Any = m.get_variable("params", "kernel")  # an array or a QArray (served)
    x: Any = args[0] if args else next(iter(kwargs.values()), None)  # the layer's input
    op = {nn.Conv: "conv_general_dilated", nn.Einsum: "einsum"}.get(kind, "dot_general")
    record(
        Contraction(
            path,
            type(m).__name__,
            op,
            (tuple(np.shape(x)), tuple(kernel.shape)),
            "rhs",
            True,
            f"rule {rule.pattern!r}",
            "kernel" if stored else None,  # a computed kernel is quantized when used
            False,
            *kernel_layout(kind.__name__, m, np.ndim(x), len(kernel.shape)),
        )
    )
    return out


_COMPUTED = ""  # the parameter name of a weight the model computes (not stored)


def _stateful_product(
    m: nn.Module, path: str, i: int, call: Call, cfg: QuantConfig, probe: Probe | None = None
) -> Any:
    """The ``i``-th product of module ``m``'s call under a stateful config: the shared
    step (:mod:`jaxquant._src.flax.stateful`) with its state in ``m``'s own scope, named
    ``jq{i}_<name>`` ("quant_state"; LSQ steps in "params"), created at ``init`` and updated
    when "quant_state" is mutable, as a Flax layer's QuantOp child does."""
    scope = m.scope
    assert scope is not None  # m is running: bound to its scope
    names = stateful.state_names(cfg)
    mutable = scope.is_mutable_collection(STATE)
    missing = [n for n in names if not scope.has_variable(_collection(n), f"jq{i}_{n}")]
    if missing and not mutable:
        raise ValueError(
            f"quantize_model: the stateful rule's state for {path!r} (product {i}) is not in "
            f"the variables: initialise the model with this rule, and pass "
            f"mutable=[{STATE!r}] to apply while training."
        )
    fresh = stateful.init(cfg, call.lhs, call.rhs) if missing else {}
    state: dict[str, Any] = {}
    for n in names:
        col, full = _collection(n), f"jq{i}_{n}"
        if not scope.has_variable(col, full):
            scope.put_variable(col, full, fresh[n])
        state[n] = scope.get_variable(col, full)
    key = None
    if stateful.needs_key(cfg):
        if not scope.has_rng("quant"):
            raise ValueError(
                f"quantize_model: the rule for {path!r} rounds stochastically and needs keys "
                "from the 'quant' PRNG stream: pass rngs={'quant': key} to init / apply."
            )
        key = scope.make_rng("quant")
    owg = None
    owg_name = f"jq{i}{OVERWRITE}"  # "jq0_overwrite_with_gradient": its key ends with the mark
    if stateful.probe_init(cfg, probe):  # the backward pass's state, in params
        if not scope.has_variable("params", owg_name):
            if not scope.is_mutable_collection("params"):
                raise ValueError(
                    f"quantize_model: the params of {path!r} (product {i}) have no "
                    f"{owg_name!r}, the state delayed_grad / errors keep: initialise the "
                    "model with the same quantize_model arguments."
                )
            scope.put_variable("params", owg_name, stateful.probe_init(cfg, probe))
        owg = scope.get_variable("params", owg_name)
    update = mutable and not m.is_initializing()  # as a layer's QuantOp: init only creates
    assert call.step is not None  # intercept routes only dot_general / einsum calls here
    out, new = stateful.apply(
        cfg,
        state,
        call.lhs,
        call.rhs,
        key=key,
        training=update,
        where=path,
        owg=owg,
        probe=probe,
        **call.step,
    )
    if update:
        for n in names:
            if not stateful.trained(n):
                scope.put_variable(STATE, f"jq{i}_{n}", new[n])
    return out


def _collection(name: str) -> str:
    return "params" if stateful.trained(name) else STATE


class LinenFront(Frontend):
    """Owners of intercepted contractions: the innermost module method running."""

    def __init__(
        self,
        stack: list[tuple[nn.Module, str]],
        rule_at: Callable[[str], Rule | None],
        note: Callable[[str, str, Rule | None], None],
        record: Callable[[Contraction], None],
        strict: bool,
        *,
        layers: bool = True,
        root: Any = None,
        probe: Probe | None = None,
    ) -> None:
        # layers=False: Flax's own layers are someone else's (calibration records them).
        self.stack, self.rule_at, self.note, self.record = stack, rule_at, note, record
        self.strict, self.layers, self.root = strict, layers, root
        self.probe = probe
        self.counts: dict[int, int] = {}  # stack depth -> products of that module call

    def transform_of(self, frame: Any) -> ActTransform | None:
        if not self.stack:
            return None
        m = self.stack[-1][0]
        return None if m.scope is None else act_transform.of_linen(m.variables)

    def owner(self, frame: Any) -> Owner | None:
        if not self.stack:
            return None
        m, path = self.stack[-1]
        if not self.layers and layer_kind(m) is not None:
            if m.scope is None or act_transform.of_linen(m.variables) is None:
                return None
            # A layer someone else observes (calibration) whose weight was changed for an
            # online input transform: its float product must still apply the transform.
            # No rule: _decide runs it in float, recording nothing.
            return Owner(
                path,
                type(m).__name__,
                None,
                lambda: named_leaves(m.variables.get("params", {})),
                self.record,
                self.strict,
                None,
                m,
                lambda: act_transform.of_linen(m.variables),
            )
        rule = self.rule_at(path)
        self.note(path, type(m).__name__, rule)

        def params() -> list[tuple[str, Any]]:
            if m.scope is None:
                return []
            leaves = named_leaves(m.variables.get("params", {}))
            if self.root is not None and not stored_in(m, self.root):
                # computed variables (a nested apply): a weight, but no stored parameter
                return [(_COMPUTED, v) for _, v in leaves]
            return leaves

        depth = len(self.stack)

        def run_stateful(call: Call, cfg: QuantConfig) -> Any:
            i = self.counts.get(depth, 0)
            self.counts[depth] = i + 1
            return _stateful_product(m, path, i, call, cfg, self.probe)

        def transform() -> ActTransform | None:
            return None if m.scope is None else act_transform.of_linen(m.variables)

        return Owner(
            path,
            type(m).__name__,
            rule,
            params,
            self.record,
            self.strict,
            run_stateful,
            m,
            transform,
            self.probe,
        )


def named_leaves(tree: Any) -> list[tuple[str, Any]]:
    """``[(path, leaf)]`` of a variables tree, QArrays as leaves."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda t: isinstance(t, QArray))[0]
    return [(jax.tree_util.keystr(p, simple=True, separator="/"), v) for p, v in flat]


layer_kind = linen_kind  # the one table: jaxquant._src.flax.kinds


def _is_our_clone(m: nn.Module) -> bool:
    return (
        isinstance(m, _QuantEinsum)
        or (isinstance(m, nn.Conv) and isinstance(m.conv_general_dilated, QuantConv))
        or (
            isinstance(m, _DOTS)
            and (isinstance(m.dot_general, QuantDot) or isinstance(m.dot_general_cls, _OpFactory))
        )
    )


def _quantized_clone(m: nn.Module, rule: Rule, path: str, probe: Probe | None = None) -> nn.Module:
    if isinstance(m, nn.Conv):
        check_conv_rule(rule, path)
        if m.conv_general_dilated_cls is not None or m.conv_general_dilated not in (
            None,
            _ORIGINAL_CONV,
        ):
            raise ValueError(
                f"quantize_model: Conv at {path!r} already has a custom "
                "conv_general_dilated; jaxquant will not silently replace it."
            )
        return m.clone(parent=m.scope, conv_general_dilated=QuantConv(rule, path))
    if isinstance(m, nn.Einsum):
        op = _OpFactory(rule, path, probe) if _stateful(rule, probe) else QuantEinsum(rule, path)
        fields = {
            f.name: getattr(m, f.name)
            for f in dataclasses.fields(nn.Einsum)
            if f.init and f.name not in ("parent", "name")
        }
        # flax's type stub for the `parent` field leaves out the Scope its runtime (and
        # Module.clone) accepts: a clone bound to the layer's own scope
        return _QuantEinsum(**fields, op=op, parent=m.scope)  # type: ignore[arg-type]
    if m.dot_general_cls is not None or m.dot_general not in (None, _ORIGINAL_DOT):
        raise ValueError(
            f"quantize_model: {type(m).__name__} at {path!r} already has a custom "
            f"dot_general ({m.dot_general or m.dot_general_cls!r}); jaxquant will not "
            "silently replace it. Exclude it with an earlier Rule(pattern) without "
            "specs, or remove the custom dot_general."
        )
    if _stateful(rule, probe):
        return m.clone(parent=m.scope, dot_general_cls=_OpFactory(rule, path, probe))
    return m.clone(parent=m.scope, dot_general=QuantDot(rule, path))


def _stateful(rule: Rule, probe: Probe | None) -> bool:
    """Whether a layer's product keeps variables: the rule's own, or the probe's."""
    return rule.stateful or bool(stateful.probe_init(rule, probe))


def stored_in(m: nn.Module, root: Any) -> bool:
    """Whether ``m``'s variables are part of the model's (False: a module applied on its
    own inside the model, on variables the model computes, e.g. a tied head's
    ``embedding.T``)."""
    cur: Any = m
    while isinstance(cur, nn.Module) and cur.scope is not None and cur.scope is not root:
        cur = cur.parent
    return isinstance(cur, nn.Module)


def linen_path(m: nn.Module, root: Any, stack: list[tuple[nn.Module, str]]) -> str:
    """``m``'s path below the wrapped model. A module applied on its own inside the model
    (``self.lm_head.apply(...)``, Hugging Face's tied head) has no parent: its path is the
    running module's path plus its name."""
    if stored_in(m, root):
        return _relative_path(m, root)
    outer = stack[-1][1] if stack else ""
    name = m.name or ""
    return f"{outer}/{name}" if outer and name else outer or name


def quantize_linen(
    model: nn.Module, rules: tuple[Rule, ...], strict: bool, probe: Probe | None = None
) -> QuantizedModule:
    if isinstance(model, QuantizedModule):
        raise ValueError(
            "quantize_model: the model is already a QuantizedModule; pass its .module with "
            "the combined rules instead of wrapping twice."
        )
    active = probe if probe is not None and probe.active else None
    return QuantizedModule(model, rules, strict, active)


def report_linen(model: QuantizedModule) -> list[Match]:
    if not model.record.seen:
        raise ValueError(
            "jq.flax.report: a Linen model's modules are only known once it runs; call "
            "model.init(...) or model.apply(...) first."
        )
    return list(model.record.matches)
