"""Rule-based quantization of an NNX model, in place.

Walks the module graph (``nnx.iter_graph``: no forward pass, no copy of any parameter)
and sets ``dot_general`` of matching ``nnx.Linear`` / ``nnx.LinearGeneral`` and
``einsum_op`` of matching ``nnx.Einsum`` to callables that run :func:`jaxquant.dot_general`
/ :func:`jaxquant.einsum` with the rule's specs. Parameters are untouched (the same
``nnx.Param`` objects and arrays). The attributes are frozen, hashable dataclasses, so they
are static in ``nnx.split`` / ``nnx.jit``.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxquant._src.flax.rules import (
    Match,
    QuantDot,
    QuantEinsum,
    Rule,
    check_unmatched,
    first_match,
    path_str,
)

_DOT = (nnx.Linear, nnx.LinearGeneral)


def _quantizable(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    return [
        (path_str(p), node)
        for p, node in nnx.iter_graph(model)
        if isinstance(node, (*_DOT, nnx.Einsum))
    ]


def quantize_nnx(model: nnx.Module, rules: tuple[Rule, ...], strict: bool) -> nnx.Module:
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
    for path, node, _ in plan:
        if isinstance(node, nnx.Einsum):
            op = node.einsum_op
            if not (op is jnp.einsum or isinstance(op, QuantEinsum)):
                raise ValueError(
                    f"quantize_model: Einsum at {path!r} already has a custom einsum_op "
                    f"({op!r}); jaxquant will not silently replace it."
                )
        else:
            dg = node.dot_general
            if getattr(node, "dot_general_cls", None) is not None or not (
                dg is None or dg is lax.dot_general or isinstance(dg, QuantDot)
            ):
                raise ValueError(
                    f"quantize_model: {type(node).__name__} at {path!r} already has a custom "
                    f"dot_general ({dg or node.dot_general_cls!r}); jaxquant will not "
                    "silently replace it. Exclude it with an earlier Rule(pattern) without "
                    "specs, or remove the custom dot_general."
                )
    for path, node, rule in plan:
        if isinstance(node, nnx.Einsum):
            node.einsum_op = QuantEinsum(rule, path)
        else:
            node.dot_general = QuantDot(rule, path)
    return model


def report_nnx(model: nnx.Module) -> list[Match]:
    out = []
    for path, node in _quantizable(model):
        q = node.einsum_op if isinstance(node, nnx.Einsum) else node.dot_general
        if isinstance(q, QuantDot | QuantEinsum):
            out.append(Match(path, type(node).__name__, q.rule))
    return out
