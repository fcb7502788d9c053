"""Rule-based quantization of a Linen model, without editing its code.

:class:`QuantizedModule` wraps the model and shares its scope (``nn.share_scope``), so the
variables tree is the model's own: existing params and TrainStates keep working. While it
runs, an ``nn.intercept_methods`` interceptor replaces every call of an ``nn.Dense`` /
``nn.DenseGeneral`` whose path matches a rule by a call of a clone of that module bound to
the *same scope* with ``dot_general=QuantDot(rule)``. Linen modules are created while the
model runs (``@nn.compact``), so paths are only known then: the strict check for rules
that matched nothing runs at the end of every ``init`` / ``apply`` (once per trace under
``jax.jit``), and :func:`report` reads what the last call found.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
from jax import lax

from jaxquant._src.flax.rules import (
    Match,
    QuantDot,
    Rule,
    check_unmatched,
    first_match,
    path_str,
)

_QUANTIZABLE = (nn.Dense, nn.DenseGeneral)


class _Record:
    """Mutable, identity-hashed holder of the last call's matches (shared by clones)."""

    def __init__(self) -> None:
        self.matches: list[Match] = []
        self.seen = False

    def __repr__(self) -> str:
        return f"_Record({len(self.matches)} matches)"


def _relative_path(m: nn.Module, root: Any) -> str:
    """``m``'s path below the wrapped model, from module names (scope paths of a shared
    scope still contain the wrapper's field name)."""
    names = []
    cur: Any = m
    while isinstance(cur, nn.Module) and cur.scope is not root:
        names.append(cur.name)
        cur = cur.parent
    if not isinstance(cur, nn.Module):  # not below the model (built in an outer module)
        return path_str(m.path)
    return path_str(reversed(names))


class QuantizedModule(nn.Module):
    """``module`` with the dots of rule-matched Dense / DenseGeneral layers quantized.

    Same variables as ``module`` (``init`` / ``apply`` give and take the same tree). Build it
    with :func:`jaxquant.flax.quantize_model`; ``method=`` other than ``__call__`` is not
    supported (wrap the method in a module).
    """

    module: nn.Module
    rules: tuple[Rule, ...]
    strict: bool = True
    record: _Record = dataclasses.field(default_factory=_Record, compare=False)

    def setup(self) -> None:
        nn.share_scope(self, self.module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        root = self.module.scope  # shared with self: the model's own scope
        rules = self.rules
        used: set[int] = set()
        matches: list[Match] = []
        candidates: list[str] = []

        def interceptor(next_fun, args, kwargs, context):
            m = context.module
            if context.method_name != "__call__" or not isinstance(m, _QUANTIZABLE):
                return next_fun(*args, **kwargs)
            if isinstance(m.dot_general, QuantDot):  # our own clone, already quantized
                return next_fun(*args, **kwargs)
            path = _relative_path(m, root)
            if path not in candidates:
                candidates.append(path)
            i = first_match(rules, path)
            if i is None:
                return next_fun(*args, **kwargs)
            used.add(i)
            rule = rules[i]
            if not rule.quantizes:
                return next_fun(*args, **kwargs)
            if m.dot_general_cls is not None or m.dot_general not in (None, lax.dot_general):
                raise ValueError(
                    f"quantize_model: {type(m).__name__} at {path!r} already has a custom "
                    f"dot_general ({m.dot_general or m.dot_general_cls!r}); jaxquant will not "
                    "silently replace it. Exclude it with an earlier Rule(pattern) without "
                    "specs, or remove the custom dot_general."
                )
            if all(x.path != path for x in matches):
                matches.append(Match(path, type(m).__name__, rule))
            q = m.clone(parent=m.scope, dot_general=QuantDot(rule, path))
            return q(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            out = self.module(*args, **kwargs)
        check_unmatched(rules, used, candidates, self.strict, "Linen")
        self.record.matches = matches
        self.record.seen = True
        return out


def quantize_linen(model: nn.Module, rules: tuple[Rule, ...], strict: bool) -> QuantizedModule:
    if isinstance(model, QuantizedModule):
        raise ValueError(
            "quantize_model: the model is already a QuantizedModule; pass its .module with "
            "the combined rules instead of wrapping twice."
        )
    return QuantizedModule(model, rules, strict)


def report_linen(model: QuantizedModule) -> list[Match]:
    if not model.record.seen:
        raise ValueError(
            "jq.flax.report: a Linen model's modules are only known once it runs; call "
            "model.init(...) or model.apply(...) first."
        )
    return list(model.record.matches)
