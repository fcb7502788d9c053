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

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxquant._src.checks import check_bool, check_int, describe
from jaxquant._src.flax.rules import (
    Match,
    QuantConv,
    QuantDot,
    QuantEinsum,
    Rule,
    check_conv_rule,
    check_unmatched,
    deterministic_rule,
    first_match,
    needs_key,
    operand_specs,
    path_str,
    run_stateful,
    scaling_for,
    step_base,
    step_shape,
)
from jaxquant._src.scaling import ScaleState

_DOT = (nnx.Linear, nnx.LinearGeneral)


class QuantState(nnx.Variable):
    """Quantization state that is not trained: delayed-scaling amax histories, scales and
    counters, LSQ base steps. Filter it like ``nnx.BatchStat`` (``nnx.split(model,
    nnx.Param, QuantState, ...)``)."""


class QuantOp(nnx.Module):
    """The quantized product of a stateful rule: the ``dot_general`` of an ``nnx.Linear`` /
    ``nnx.LinearGeneral`` or the ``einsum_op`` of an ``nnx.Einsum``.

    Holds, per quantized operand (``lhs``: activation, ``rhs``: weight),
    ``{op}_amax_history`` / ``{op}_scale`` / ``{op}_count`` (:class:`QuantState`, delayed
    scaling), ``{op}_step`` (``nnx.Param``, LSQ, init 1) and ``{op}_step_base``
    (:class:`QuantState`, LSQ's initial step, set from the first batch), and the ``quant``
    PRNG stream of stochastic specs. ``deterministic=True`` (``model.eval()``) freezes the
    state and rounds to nearest.
    """

    def __init__(
        self, rule: Rule, path: str, kernel_shape: tuple[int, ...], einsum: bool, rngs: Any
    ) -> None:
        if not isinstance(rule, Rule):
            raise TypeError(
                f"QuantOp: rule must be a jq.flax.Rule, got {describe(rule)}. A QuantSpec goes "
                "inside one: jq.flax.Rule('.*', weight=spec)."
            )
        if not isinstance(path, str):
            raise TypeError(f"QuantOp: path must be a str, got {describe(path)}.")
        if not isinstance(kernel_shape, tuple | list):
            raise TypeError(
                f"QuantOp: kernel_shape must be a tuple of ints, got {describe(kernel_shape)}."
            )
        kernel_shape = tuple(
            check_int(d, f"QuantOp: kernel_shape {tuple(kernel_shape)!r} entry", lo=0)
            for d in kernel_shape
        )
        einsum = check_bool(einsum, "QuantOp: einsum")
        if rngs is not None and not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"QuantOp: rngs must be an nnx.Rngs or None, got {describe(rngs)}.")
        self.rule = rule
        self.path = path
        self.einsum = einsum
        self.deterministic = False
        for op, spec in operand_specs(rule):
            shape = kernel_shape if op == "rhs" else ()
            if rule.scaling == "delayed":
                st = scaling_for(rule, spec).init(shape)
                setattr(self, f"{op}_amax_history", QuantState(st.amax_history))
                setattr(self, f"{op}_scale", QuantState(st.scale))
                setattr(self, f"{op}_count", QuantState(st.count))
            if rule.ste == "lsq":
                sshape = step_shape(spec, shape)
                setattr(self, f"{op}_step", nnx.Param(jnp.ones(sshape, jnp.float32)))
                setattr(self, f"{op}_step_base", QuantState(jnp.zeros(sshape, jnp.float32)))
        self.rngs = rngs

    def _state(self, op: str) -> ScaleState:
        return ScaleState(
            getattr(self, f"{op}_amax_history")[...],
            getattr(self, f"{op}_scale")[...],
            getattr(self, f"{op}_count")[...],
        )

    def _run(self, lhs: Any, rhs: Any, **kw: Any) -> Any:
        rule = deterministic_rule(self.rule) if self.deterministic else self.rule
        update = not self.deterministic
        scales: dict[str, Any] = {}
        steps: dict[str, Any] = {}
        for op, spec in operand_specs(rule):
            x = jax.lax.stop_gradient(lhs if op == "lhs" else rhs)
            if rule.scaling == "delayed":
                scales[op], new = scaling_for(rule, spec).update(self._state(op), x)
                if update:
                    for field, value in zip(("amax_history", "scale", "count"), new, strict=True):
                        getattr(self, f"{op}_{field}")[...] = value
            if rule.ste == "lsq":
                base_var = getattr(self, f"{op}_step_base")
                base = step_base(base_var[...], x, spec)
                if update:
                    base_var[...] = base
                steps[op] = getattr(self, f"{op}_step")[...] * base
        key = self.rngs.quant() if needs_key(rule) else None
        return run_stateful(
            rule, lhs, rhs, scales=scales, steps=steps, key=key, where=self.path, **kw
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.einsum:  # einsum_op(subscripts, lhs, rhs, *, precision, ...)
            subscripts, lhs, rhs = args
            return self._run(lhs, rhs, subscripts=subscripts, **kwargs)
        lhs, rhs, dn, *rest = args  # dot_general(lhs, rhs, dn, precision, pet, *, ...)
        names = ("precision", "preferred_element_type")
        kwargs.update(zip(names, rest, strict=False))
        return self._run(lhs, rhs, dimension_numbers=dn, **kwargs)


def _quantizable(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    return [
        (path_str(p), node)
        for p, node in nnx.iter_graph(model)
        if isinstance(node, (*_DOT, nnx.Einsum, nnx.Conv))
    ]


def quantize_nnx(
    model: nnx.Module, rules: tuple[Rule, ...], strict: bool, rngs: nnx.Rngs | None = None
) -> nnx.Module:
    found = _quantizable(model)
    plan: list[tuple[str, nnx.Module, Rule]] = []
    used: set[int] = set()
    for path, node in found:
        i = first_match(rules, path)
        if i is None:
            continue
        used.add(i)
        if rules[i].quantizes:
            plan.append((path, node, rules[i]))
    # Check everything before modifying anything: a failed call leaves the model as it was.
    check_unmatched(rules, used, [p for p, _ in found], strict, "NNX")
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
            if getattr(node, "dot_general_cls", None) is not None or not (
                dg is None or dg is lax.dot_general or isinstance(dg, QuantDot | QuantOp)
            ):
                raise ValueError(
                    f"quantize_model: {type(node).__name__} at {path!r} already has a custom "
                    f"dot_general ({dg or node.dot_general_cls!r}); jaxquant will not "
                    "silently replace it. Exclude it with an earlier Rule(pattern) without "
                    "specs, or remove the custom dot_general."
                )
    for path, node, rule in plan:
        if isinstance(node, nnx.Conv):
            node.conv_general_dilated = QuantConv(rule, path)
            continue
        is_einsum = isinstance(node, nnx.Einsum)
        if rule.stateful:
            shape = tuple(node.kernel[...].shape)
            q: Any = QuantOp(rule, path, shape, is_einsum, rngs if needs_key(rule) else None)
        else:
            q = QuantEinsum(rule, path) if is_einsum else QuantDot(rule, path)
        if isinstance(q, QuantOp):  # a graph node: the attribute must hold data
            q = nnx.data(q)
        if is_einsum:
            node.einsum_op = q
        else:
            node.dot_general = q
    return model


def report_nnx(model: nnx.Module) -> list[Match]:
    out = []
    for path, node in _quantizable(model):
        if isinstance(node, nnx.Conv):
            q = node.conv_general_dilated
        else:
            q = node.einsum_op if isinstance(node, nnx.Einsum) else node.dot_general
        if isinstance(q, QuantDot | QuantEinsum | QuantOp | QuantConv):
            out.append(Match(path, type(node).__name__, q.rule))
    return out
