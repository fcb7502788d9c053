"""Rule-based quantization of an NNX model, in place.

Walks the module graph (``nnx.iter_graph``: no forward pass, no copy of any parameter)
and sets ``dot_general`` of matching ``nnx.Linear`` / ``nnx.LinearGeneral`` and
``einsum_op`` of matching ``nnx.Einsum`` to callables that run :func:`jaxquant.dot_general`
/ :func:`jaxquant.einsum` with the rule's specs. Stateful rules (delayed scaling, LSQ,
stochastic rounding) get a :class:`QuantOp` submodule holding their variables instead.
Parameters are untouched (the same ``nnx.Param`` objects and arrays). The stateless
attributes are frozen, hashable dataclasses, so they are static in ``nnx.split`` /
``nnx.jit``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jaxquant._src.checks import check_bool, check_int, describe
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
from jaxquant._src.flax.kinds import (
    NNX_LAYERS,
    NnxLayer,
    kernel_layout,
    nnx_kind,
    nnx_layers,
    nnx_modules,
)
from jaxquant._src.flax.rules import (
    Match,
    QuantConv,
    QuantDot,
    QuantEinsum,
    Rule,
    check_conv_rule,
    check_unmatched,
    first_match,
    needs_key,
    path_str,
)
from jaxquant._src.qarray import QArray
from jaxquant._src.scaling import ScaleState

if TYPE_CHECKING:  # annotations only (Python 3.13's typing.TypeIs)
    from typing_extensions import TypeIs


class QuantState(nnx.Variable[Any]):
    """Quantization state that is not trained: delayed-scaling amax histories, scales and
    counters, LSQ base steps. Filter it like ``nnx.BatchStat`` (``nnx.split(model,
    nnx.Param, QuantState, ...)``).

    Example:
      >>> import jax, jax.numpy as jnp, jaxquant as jq
      >>> from flax import nnx
      >>> from jaxquant.flax import QuantState, Rule, quantize_model
      >>> layer = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
      >>> rule = Rule(".*", weight=jq.QuantSpec("e4m3"), scaling="delayed", history_len=8)
      >>> layer = quantize_model(layer, rule)
      >>> y = layer(jnp.ones((2, 3)))
      >>> state = nnx.state(layer, QuantState)  # the weight's amax history, scale, count
      >>> jax.tree.map(jnp.shape, nnx.to_pure_dict(state))
      {'dot_general': {'rhs_amax_history': (8,), 'rhs_count': (), 'rhs_scale': ()}}
    """


class OverwriteWithGradient(nnx.Param[Any]):
    """A parameter the optimizer overwrites with its gradient: what a quantized layer's
    backward pass writes (``quantize_model(..., delayed_grad=True)``: the output gradient's
    amax history; ``errors=True``: the layer's errors). An ``nnx.Param``, so ``nnx.grad``
    and ``nnx.Optimizer(..., wrt=nnx.Param)`` reach it; the attribute holding it is named
    ``_overwrite_with_gradient`` (or ends with it), which
    :func:`jaxquant.optax.overwrite_with_gradient` recognises. Filter it to read the
    errors: ``nnx.state(model, OverwriteWithGradient)``.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> from flax import nnx
      >>> from jaxquant.flax import OverwriteWithGradient, Rule, quantize_model
      >>> layer = quantize_model(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
      ...                        Rule(".*", weight=jq.QuantSpec("int8")), errors=True)
      >>> state = nnx.to_pure_dict(nnx.state(layer, OverwriteWithGradient))
      >>> sorted(state["dot_general"]["_overwrite_with_gradient"]["errors"])[:3]
      ['act_saturation', 'act_underflow', 'calls']
    """


def probe_variables(owg: dict[str, Any], stack_shape: tuple[int, ...] = ()) -> Any:
    """``{group: {name: OverwriteWithGradient}}`` of a probe's initial state (with leading
    stack axes), held through ``nnx.data`` (a dict attribute of variables)."""
    return nnx.data(
        {
            group: {
                name: OverwriteWithGradient(jnp.broadcast_to(v, (*stack_shape, *v.shape)))
                for name, v in leaves.items()
            }
            for group, leaves in owg.items()
        }
    )


def probe_values(held: Any) -> dict[str, dict[str, Any]]:
    """The arrays of :func:`probe_variables`' dict."""
    return {g: {n: v[...] for n, v in leaves.items()} for g, leaves in held.items()}


class QuantOp(nnx.Module):
    """The quantized product of a stateful rule: the ``dot_general`` of an ``nnx.Linear`` /
    ``nnx.LinearGeneral`` or the ``einsum_op`` of an ``nnx.Einsum``.

    Holds, per quantized operand (``lhs``: activation, ``rhs``: weight),
    ``{op}_amax_history`` / ``{op}_scale`` / ``{op}_count`` (:class:`QuantState`, delayed
    scaling), ``{op}_step`` (``nnx.Param``, LSQ, init 1) and ``{op}_step_base``
    (:class:`QuantState`, LSQ's initial step, set from the first batch), and the ``quant``
    PRNG stream of stochastic specs. ``deterministic=True`` (``model.eval()``) freezes the
    state and rounds to nearest. The step itself is :mod:`jaxquant._src.flax.stateful`'s,
    shared with Linen; this module only stores its state.

    A layer built under ``nnx.vmap`` (a stack of layers for ``nnx.scan``) has a kernel with
    leading stack axes (``stack_shape``): every state array gets the same leading axes (and
    the PRNG stream one key per layer), so ``nnx.scan`` / ``nnx.vmap`` over the stack slice
    the state along with the kernel. :meth:`for_layer` reads them off the layer.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> from flax import nnx
      >>> from jaxquant.flax import NnxQuantOp, Rule, quantize_model
      >>> layer = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
      >>> layer = quantize_model(layer, Rule(".*", weight=jq.QuantSpec("e4m3"), scaling="delayed"))
      >>> isinstance(layer.dot_general, NnxQuantOp)
      True
      >>> y = layer(jnp.ones((2, 3)))
      >>> int(layer.dot_general.rhs_count[...])  # one step of delayed scaling
      1
    """

    def __init__(
        self,
        rule: Rule,
        path: str,
        kernel_shape: tuple[int, ...],
        einsum: bool,
        rngs: nnx.Rngs | None,
        *,
        stack_shape: tuple[int, ...] = (),
        probe: Probe | None = None,
    ) -> None:
        if not isinstance(rule, Rule):
            raise TypeError(
                f"QuantOp: rule must be a jq.flax.Rule, got {describe(rule)}. A QuantSpec goes "
                "inside one: jq.flax.Rule('.*', weight=spec)."
            )
        if not isinstance(path, str):
            raise TypeError(f"QuantOp: path must be a str, got {describe(path)}.")
        shapes = {}
        for name, shape in (("kernel_shape", kernel_shape), ("stack_shape", stack_shape)):
            if not isinstance(shape, tuple | list):
                raise TypeError(f"QuantOp: {name} must be a tuple of ints, got {describe(shape)}.")
            shapes[name] = tuple(
                check_int(d, f"QuantOp: {name} {tuple(shape)!r} entry", lo=0) for d in shape
            )
        kernel_shape, stack_shape = shapes["kernel_shape"], shapes["stack_shape"]
        if kernel_shape[: len(stack_shape)] != stack_shape:
            raise ValueError(
                f"QuantOp: stack_shape {stack_shape} must lead kernel_shape {kernel_shape} "
                "(the axes nnx.vmap stacked the layers along)."
            )
        einsum = check_bool(einsum, "QuantOp: einsum")
        if rngs is not None and not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"QuantOp: rngs must be an nnx.Rngs or None, got {describe(rngs)}.")
        self.rule = rule
        self.path = path
        self.einsum = einsum
        self.deterministic = False
        self.stack_shape = stack_shape
        layer_shape = kernel_shape[len(stack_shape) :]
        # Activation shapes are not known before a call; the checks on delayed / LSQ rules
        # keep the activation per-tensor, so () gives the same state as any shape.
        for name, value in stateful.init(rule, (), layer_shape).items():
            value = jax.tree.map(lambda a: jnp.broadcast_to(a, (*stack_shape, *a.shape)), value)
            if isinstance(value, ScaleState):  # one attribute per field
                op = name.removesuffix("_scaling")
                for field, v in zip(ScaleState._fields, value, strict=True):
                    setattr(self, f"{op}_{field}", QuantState(v))
            elif stateful.trained(name):
                setattr(self, name, nnx.Param(value))
            else:
                setattr(self, name, QuantState(value))
        self.probe = probe
        owg = stateful.probe_init(rule, probe)
        if owg:  # what the backward pass writes, as the gradient of these variables
            setattr(self, OVERWRITE, probe_variables(owg, stack_shape))
        if rngs is not None and stack_shape:  # one key per stacked layer: scan slices it
            rngs = nnx.Rngs(quant=rngs["quant"].split(stack_shape))
        self.rngs = rngs

    @classmethod
    def for_layer(
        cls,
        layer: nnx.Linear | nnx.LinearGeneral | nnx.Einsum,
        rule: Rule,
        path: str,
        rngs: nnx.Rngs | None,
        probe: Probe | None = None,
    ) -> QuantOp:
        """The QuantOp of ``layer`` (an ``nnx.Linear``, ``nnx.LinearGeneral`` or
        ``nnx.Einsum``), its stack axes read off the kernel: leading axes beyond the shape
        the layer's own fields give (``in_features`` / ``out_features`` / ``batch_axis``,
        or ``kernel_shape``) were added by ``nnx.vmap``."""
        kernel_shape = tuple(int(d) for d in layer.kernel[...].shape)
        if isinstance(layer, nnx.Einsum):
            own: tuple[int, ...] | None = tuple(layer.kernel_shape)
        elif isinstance(layer, nnx.LinearGeneral):
            own = (*layer.batch_axis.values(), *layer.in_features, *layer.out_features)
        elif isinstance(layer, nnx.Linear):
            own = (layer.in_features, layer.out_features)
        else:
            own = None
        stack: tuple[int, ...] = ()
        if own is not None and kernel_shape != own:
            n = len(kernel_shape) - len(own)
            if n <= 0 or kernel_shape[n:] != own:
                raise ValueError(
                    f"quantize_model: the kernel of {path!r} has shape {kernel_shape}, which "
                    f"is not the layer's own {own} with stack axes in front. A stateful rule "
                    "keeps state per stacked layer and needs the stack axes first: build "
                    "the layers with nnx.vmap(..., out_axes=0) (and nnx.scan with "
                    "in_axes=0)."
                )
            stack = kernel_shape[:n]
        einsum = isinstance(layer, nnx.Einsum)
        return cls(rule, path, kernel_shape, einsum, rngs, stack_shape=stack, probe=probe)

    def _state(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for name in stateful.state_names(self.rule):
            if name.endswith("_scaling"):
                op = name.removesuffix("_scaling")
                state[name] = ScaleState(
                    *(getattr(self, f"{op}_{field}")[...] for field in ScaleState._fields)
                )
            else:
                state[name] = getattr(self, name)[...]
        return state

    def _run(self, lhs: Any, rhs: Any, **kw: Any) -> Any:
        training = not self.deterministic
        key = None
        if training and stateful.needs_key(self.rule):
            if self.rngs is None:  # quantize_model requires them; a QuantOp made by hand
                raise ValueError(
                    f"QuantOp at {self.path!r}: the rule rounds stochastically and needs keys "
                    "from a 'quant' stream: build it with rngs=nnx.Rngs(quant=seed)."
                )
            key = self.rngs.quant()
        held = getattr(self, OVERWRITE, None)
        out, new = stateful.apply(
            self.rule,
            self._state(),
            lhs,
            rhs,
            key=key,
            training=training,
            where=self.path,
            owg=None if held is None else probe_values(held),
            probe=self.probe,
            **kw,
        )
        if training:
            for name, value in new.items():
                if isinstance(value, ScaleState):
                    op = name.removesuffix("_scaling")
                    for field, v in zip(ScaleState._fields, value, strict=True):
                        getattr(self, f"{op}_{field}")[...] = v
                elif not stateful.trained(name):  # trained steps change by the optimizer
                    getattr(self, name)[...] = value
        return out

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.einsum:  # einsum_op(subscripts, lhs, rhs, *, precision, ...)
            subscripts, lhs, rhs = args
            return self._run(lhs, rhs, subscripts=subscripts, **kwargs)
        lhs, rhs, dn, *rest = args  # dot_general(lhs, rhs, dn, precision, pet, *, ...)
        names = ("precision", "preferred_element_type")
        kwargs.update(zip(names, rest, strict=False))
        return self._run(lhs, rhs, dimension_numbers=dn, **kwargs)


_M = TypeVar("_M", bound=nnx.Module)
layer_kind = nnx_kind  # the one table: jaxquant._src.flax.kinds
_modules = nnx_modules
_quantizable = nnx_layers


def quantize_nnx(
    model: _M,
    rules: tuple[Rule, ...],
    strict: bool,
    rngs: nnx.Rngs | None = None,
    probe: Probe | None = None,
) -> _M:
    found = _quantizable(model)
    modules = _modules(model)
    plan: list[tuple[str, NnxLayer, Rule]] = []
    used: set[int] = set()
    for path, node in modules:
        i = first_match(rules, path)
        transformed = act_transform.of_nnx(node) is not None
        if i is None:
            if transformed and layer_kind(node) is not None:
                # a Flax layer calls the lax.dot_general it captured when built: only a
                # rule's product can apply the transform its kernel was changed for
                raise ValueError(
                    f"quantize_model: the NNX layer {path!r} has an online input transform "
                    "(ptq_smooth / ptq_hadamard from a PTQ method) but no rule matches it; "
                    f"add a rule for it (Rule({path!r}) keeps it in float)."
                )
            continue
        used.add(i)
        # layer_kind: a Flax layer running its own __call__ (so one of NNX_LAYERS); one with
        # an online transform gets the rule's product even in float (the product applies it)
        quantizes = rules[i].quantizes or transformed
        if quantizes and isinstance(node, NNX_LAYERS) and layer_kind(node) is not None:
            plan.append((path, node, rules[i]))
    # Check everything before modifying anything: a failed call leaves the model as it was.
    check_unmatched(rules, used, [p for p, _ in modules], strict, "NNX")
    del found
    if any(needs_key(r) for _, _, r in plan) and (rngs is None or "quant" not in rngs):
        raise ValueError(
            "quantize_model: a rule rounds stochastically and needs a 'quant' PRNG stream: "
            "pass rngs=nnx.Rngs(quant=seed) (each call then draws a fresh key)."
        )
    for path, node, rule in plan:
        if isinstance(node, nnx.Conv):
            check_conv_rule(rule, path)
            op = node.conv_general_dilated
            if not (op is lax.conv_general_dilated or isinstance(op, QuantConv)):
                raise ValueError(
                    f"quantize_model: Conv at {path!r} already has a custom "
                    f"conv_general_dilated ({op!r}); jaxquant will not silently replace it."
                )
        elif isinstance(node, nnx.Einsum):
            op = node.einsum_op
            if not (op is jnp.einsum or isinstance(op, QuantEinsum | QuantOp)):
                raise ValueError(
                    f"quantize_model: Einsum at {path!r} already has a custom einsum_op "
                    f"({op!r}); jaxquant will not silently replace it."
                )
        else:
            dg = node.dot_general
            dg_cls = getattr(node, "dot_general_cls", None)  # Linen's; some NNX layers too
            if dg_cls is not None or not (
                dg is None or dg is lax.dot_general or isinstance(dg, QuantDot | QuantOp)
            ):
                raise ValueError(
                    f"quantize_model: {type(node).__name__} at {path!r} already has a custom "
                    f"dot_general ({dg or dg_cls!r}); jaxquant will not "
                    "silently replace it. Exclude it with an earlier Rule(pattern) without "
                    "specs, or remove the custom dot_general."
                )
    for path, node, rule in plan:
        if isinstance(node, nnx.Conv):
            node.conv_general_dilated = QuantConv(rule, path)
            continue
        is_einsum = isinstance(node, nnx.Einsum)
        if rule.stateful or stateful.probe_init(rule, probe):
            q: Any = QuantOp.for_layer(node, rule, path, rngs if needs_key(rule) else None, probe)
        else:
            q = QuantEinsum(rule, path) if is_einsum else QuantDot(rule, path)
        if isinstance(q, QuantOp):  # a graph node: the attribute must hold data
            q = nnx.data(q)
        if isinstance(node, nnx.Einsum):
            node.einsum_op = q
        else:
            node.dot_general = q
    _intercept(model, modules, rules, strict, probe)
    return model


def _layer_op(node: Any) -> Any:
    if isinstance(node, nnx.Conv):
        return node.conv_general_dilated
    return node.einsum_op if isinstance(node, nnx.Einsum) else node.dot_general


def _class_name(node: Any) -> str:
    return getattr(type(node), "_jq_base", type(node)).__name__


def report_nnx(model: nnx.Module) -> list[Match]:
    """Flax layers whose product is jaxquant's, and modules with a quantized intercepted
    contraction in the last call, in graph order."""
    record = _record_of(model)
    intercepted = {c.path for c in record.contractions if c.quantized} if record else set()
    out = []
    for path, node in _modules(model):
        if layer_kind(node) is not None:
            q = _layer_op(node)
            if isinstance(q, QuantDot | QuantEinsum | QuantOp | QuantConv):
                out.append(Match(path, _class_name(node), q.rule))
        elif path in intercepted and _is_tagged(node) and node._jq_rule is not None:
            out.append(Match(path, _class_name(node), node._jq_rule))
    return out


def contractions_nnx(model: nnx.Module) -> list[Contraction]:
    record = _record_of(model)
    if record is None:
        raise ValueError(
            "jq.flax.contractions: the NNX model was not quantized with this version of "
            "jq.flax.quantize_model (it records its contractions from the first call on)."
        )
    if not record.seen:
        raise ValueError(
            "jq.flax.contractions: the model has not run since it was quantized; call it "
            "once (the contractions are those of the last call)."
        )
    return list(record.contractions)


# --------------------------------------------------------------------- interception
#
# NNX has no method interceptor: the model's class, the Flax layers' and those of modules
# whose rule quantizes are swapped for subclasses whose methods run under `intercepting`
# (same fields, same graph; `type(m).__mro__[1]` is the model's own class). Contractions
# are attributed to the innermost module method on the Python stack, which carries its
# path, rule and the model's record as static attributes (they survive split / merge).


class _Record:
    """Mutable, identity-hashed holder of the last call's contractions."""

    def __init__(self) -> None:
        self.contractions: list[Contraction] = []
        self.seen = False

    def __repr__(self) -> str:
        return f"_Record({len(self.contractions)} contractions)"


if TYPE_CHECKING:

    class _TaggedModule(nnx.Module):
        """A module :func:`_intercept` tagged (for the type checker only: the tags are set
        on the model's own modules at run time, which NNX allows; a plain value is static
        in the graph, so the tags survive split / merge)."""

        _jq_path: str
        _jq_rule: Rule | None  # the first matching rule
        _jq_strict: bool
        _jq_record: _Record  # the model's, shared by its modules


def _is_tagged(m: object) -> TypeIs[_TaggedModule]:
    return hasattr(m, "_jq_path")


def _record_of(model: nnx.Module) -> _Record | None:
    record = getattr(model, "_jq_record", None)
    return record if isinstance(record, _Record) else None


def last_contractions(model: nnx.Module) -> list[Contraction] | None:
    """The contractions of a quantized NNX model's last call; None before its first."""
    record = _record_of(model)
    return record.contractions if record is not None and record.seen else None


def probed_contractions(model: nnx.Module) -> list[Contraction]:
    """The contractions recorded by a model quantized here, run or traced since (those of
    the last call; none before it)."""
    record = _record_of(model)
    return [] if record is None else record.contractions


def given_rules(model: nnx.Module) -> tuple[Rule, ...] | None:
    """The rules ``quantize_model`` was given for an NNX model (None: not quantized here)."""
    rules = getattr(model, "_jq_rules", None)
    return rules if isinstance(rules, tuple) else None


_depth: contextvars.ContextVar[int] = contextvars.ContextVar("jaxquant_nnx_depth", default=0)
_SUBCLASSES: dict[type, type] = {}
_MODULE_NAMES = frozenset(dir(nnx.Module))


class _NnxFront(Frontend):
    def transform_of(self, frame: Any) -> ActTransform | None:
        m = _tagged_self(frame)
        return None if m is None else act_transform.of_nnx(m)

    def owner(self, frame: Any) -> Owner | None:
        m = _tagged_self(frame)
        if m is None:
            return None

        def params() -> list[tuple[str, Any]]:
            return [(path_str(p), v[...]) for p, v in nnx.iter_graph(m) if isinstance(v, nnx.Param)]

        def run_stateful(call: Call, cfg: QuantConfig) -> Any:
            counts = _counts.get()
            assert counts is not None  # set by the method wrapper of every quantized module
            i = counts.get(id(m), 0)
            counts[id(m)] = i + 1
            return _stateful_product(m, i, call, cfg)

        return Owner(
            m._jq_path,
            _class_name(m),
            m._jq_rule,
            params,
            m._jq_record.contractions.append,
            m._jq_strict,
            run_stateful,
            m,
            lambda: act_transform.of_nnx(m),
            getattr(m, "_jq_probe", None),
        )


def _tagged_self(frame: Any) -> _TaggedModule | None:
    """The innermost tagged module whose method is running (``self`` of a frame)."""
    while frame is not None:
        m = frame.f_locals.get("self")
        if isinstance(m, nnx.Module) and _is_tagged(m):
            return m
        frame = frame.f_back
    return None


_FRONT = _NnxFront()
# id(module) -> how many stateful products its running call has made (their state names)
_counts: contextvars.ContextVar[dict[int, int] | None] = contextvars.ContextVar(
    "jaxquant_nnx_counts", default=None
)


def _stateful_product(m: _TaggedModule, i: int, call: Call, cfg: QuantConfig) -> Any:
    """The ``i``-th product of ``m``'s call under a stateful config: the shared step with
    its state as ``m``'s attributes ``jq{i}_<name>`` (QuantState; LSQ steps nnx.Param),
    created on the first call (nnx.jit carries new variables out), updated unless the
    module is in eval mode (``deterministic=True``)."""
    if stateful.needs_key(cfg):
        where = "" if m._jq_rule is None else f" {m._jq_rule.pattern!r}"
        raise ValueError(
            f"the rule{where} rounds stochastically; in NNX a product that "
            f"{_class_name(m)} computes itself takes delayed scaling or LSQ, not stochastic "
            "rounding (no 'quant' stream reaches it). Use nearest rounding for this module."
        )
    names = stateful.state_names(cfg)
    probe = getattr(m, "_jq_probe", None)
    owg_name = f"jq{i}{OVERWRITE}"  # "jq0_overwrite_with_gradient": ends with the mark
    if stateful.probe_init(cfg, probe) and not hasattr(m, owg_name):
        setattr(m, owg_name, probe_variables(stateful.probe_init(cfg, probe)))
    if not all(hasattr(m, f"jq{i}_{n}") for n in names):
        fresh = stateful.init(cfg, call.lhs, call.rhs)
        for n in names:
            kind = nnx.Param if stateful.trained(n) else QuantState
            setattr(m, f"jq{i}_{n}", kind(fresh[n]))
    state = {n: getattr(m, f"jq{i}_{n}").get_value() for n in names}
    training = not getattr(m, "deterministic", False)
    assert call.step is not None  # intercept routes only dot_general / einsum calls here
    held = getattr(m, owg_name, None)
    out, new = stateful.apply(
        cfg,
        state,
        call.lhs,
        call.rhs,
        training=training,
        where=m._jq_path,
        owg=None if held is None else probe_values(held),
        probe=probe,
        **call.step,
    )
    if training:
        for n in names:
            if not stateful.trained(n):
                getattr(m, f"jq{i}_{n}").set_value(new[n])
    return out


def _wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        depth = _depth.get()
        if depth == 0 and hasattr(self, "_jq_record"):
            self._jq_record.contractions = []
        token = _depth.set(depth + 1)
        counted = _counts.set({**(_counts.get() or {}), id(self): 0})  # its products, from 0
        served = _own_qarrays(self) if layer_kind(self) is None else []
        try:
            with intercepting(_FRONT), _dequantized(self, served):
                out = fn(self, *args, **kwargs)
            if fn.__name__ == "__call__" and layer_kind(self) is not None:
                _record_layer(self, args, kwargs)
            if depth == 0 and hasattr(self, "_jq_record"):
                self._jq_record.seen = True
            return out
        finally:
            _counts.reset(counted)
            _depth.reset(token)

    return method


def _own_qarrays(node: Any) -> list[tuple[Any, Any]]:
    """``[(variable, QArray)]``: the module's own parameters that convert made QArrays."""
    out = []
    for v in vars(node).values():
        if isinstance(v, nnx.Param) and isinstance(v.get_value(), QArray):
            out.append((v, v.get_value()))
    return out


@contextlib.contextmanager
def _dequantized(node: Any, served: list[tuple[Any, Any]]) -> Iterator[None]:
    """The module's code sees its QArray parameters dequantized (the interception
    re-quantizes them with the rule's spec); the QArrays are back when it returns, so the
    model's state keeps them (nnx.jit sees no change)."""
    if not served:
        yield
        return
    for v, q in served:
        v.set_value(q.dequantize())
    try:
        with serving(node._jq_path):
            yield
    finally:
        for v, q in served:
            v.set_value(q)


def _record_layer(node: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    q = _layer_op(node)
    kind = layer_kind(node)
    assert kind is not None  # the method wrapper records Flax layers only
    if isinstance(q, QuantDot | QuantEinsum | QuantOp | QuantConv):
        quantized, reason = True, f"rule {q.rule.pattern!r}"
    else:
        own = node._jq_rule
        quantized = False
        reason = (
            "no rule matches the module"
            if own is None
            else f"rule {own.pattern!r} keeps it in float"
        )
    x: Any = args[0] if args else next(iter(kwargs.values()), None)  # the layer's input
    ops: dict[type, str] = {nnx.Conv: "conv_general_dilated", nnx.Einsum: "einsum"}
    op = ops.get(kind, "dot_general")
    shapes = (tuple(np.shape(x)), tuple(np.shape(node.kernel[...])))
    node._jq_record.contractions.append(
        Contraction(
            node._jq_path,
            _class_name(node),
            op,
            shapes,
            "rhs",
            quantized,
            reason,
            "kernel",
            False,
            *kernel_layout(kind.__name__, node, len(shapes[0]), len(shapes[1])),
        )
    )


def _intercepting_type(cls: type) -> type:
    if getattr(cls, "_jq_base", None) is not None:
        return cls
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        ns: dict[str, Any] = {
            "_jq_base": cls,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
        }
        for name in dir(cls):
            if name != "__call__" and (name.startswith("_") or name in _MODULE_NAMES):
                continue
            fn = inspect.getattr_static(cls, name, None)
            if inspect.isfunction(fn):
                ns[name] = _wrap(fn)
        sub = type(cls)(cls.__name__, (cls,), ns)
        _SUBCLASSES[cls] = sub
    return sub


def intercept_nnx(model: nnx.Module, rules: tuple[Rule, ...]) -> None:
    """Set up the interception on ``model`` for ``rules`` (no check, no Flax-layer
    attributes): calibration observes a merged copy's intercepted contractions with it (a
    record of its own: the quantized model's last call stays what report() reads)."""
    _set_attrs(model, _jq_record=_Record())
    _intercept(model, _modules(model), rules, strict=False)


def _set_attrs(node: nnx.Module, **attrs: Any) -> None:
    """Set attributes NNX modules take at run time (plain values: static in the graph);
    :class:`_TaggedModule` and the accessors above give them their types."""
    for name, value in attrs.items():
        setattr(node, name, value)


def _intercept(
    model: nnx.Module,
    modules: list[tuple[str, nnx.Module]],
    rules: tuple[Rule, ...],
    strict: bool,
    probe: Probe | None = None,
) -> None:
    record = _record_of(model) or _Record()
    _set_attrs(model, _jq_rules=rules)  # the plan, for calibrate / convert (static: Rules hash)
    matched: list[Rule | None] = []
    for path, node in modules:
        i = first_match(rules, path)
        matched.append(None if i is None else rules[i])
        _set_attrs(
            node,
            _jq_path=path,
            _jq_rule=matched[-1],
            _jq_strict=strict,
            _jq_record=record,
            _jq_probe=probe if probe is not None and probe.active else None,
        )
    for (_, node), rule in zip(modules, matched, strict=True):
        if rule is not None and rule.stateful and not hasattr(node, "deterministic"):
            # model.eval() / train() set `deterministic` where a module has it: the state of
            # products the module computes itself then freezes in eval mode, as QuantOp's.
            _set_attrs(node, deterministic=False)
        if (
            node is model
            or layer_kind(node) is not None
            or (rule is not None and rule.quantizes)
            or act_transform.of_nnx(node) is not None  # its online transform must run
        ):
            node.__class__ = _intercepting_type(type(node))
