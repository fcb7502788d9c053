"""Quantization rules: which layers of a Flax model get which quantizers.

A :class:`Rule` pairs a regular expression over module paths with the specs of the
activation (the dot's ``lhs``), the weight (``rhs``) and the output gradient. The path of a
module is its names joined by ``/``: ``"Dense_0"`` in Linen, ``"layers/0/linear"`` in NNX
(list indices are path components). Patterns are matched with :func:`re.fullmatch`, so
``"Dense_1"`` does not also match ``"Dense_10"``; write ``".*attn.*"`` to match a substring.
Rules are tried in order and the first match wins; a rule without any spec matches and
leaves the layer in float (a way to exclude, e.g., the output head from a later catch-all).

This module imports no Flax: the Linen and NNX front ends share it.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from jaxquant._src.dot import dot_general, einsum
from jaxquant._src.spec import QuantSpec

_MODES = ("auto", "real", "emulate")


@dataclasses.dataclass(frozen=True)
class Rule:
    """Quantize the dots of the modules whose path matches ``pattern``.

    Args:
      pattern: a regular expression, matched with :func:`re.fullmatch` against the module
        path (names joined by ``"/"``, e.g. ``"Dense_0"``, ``"layers/0/linear"``).
      weight: :class:`~jaxquant.QuantSpec` of the kernel (the dot's ``rhs``), e.g. int8
        ``per_channel(-1)``; None keeps it in float.
      act: spec of the input activation (the dot's ``lhs``), e.g. int8 per-tensor.
      grad: spec of the output gradient in the backward pass (e.g. e5m2).
      mode: passed to :func:`jaxquant.dot_general`: ``"auto"``, ``"real"`` or ``"emulate"``.

    Raises:
      ValueError: for an invalid regex, an unknown mode, or a stochastic spec (the model
        rewrite has no PRNG key to give it).

    Example:
      >>> import jaxquant as jq
      >>> from jaxquant.flax import Rule
      >>> rule = Rule(r"Dense_\\d+", weight=jq.QuantSpec("int8", jq.per_channel(-1)))
      >>> rule.matches("Dense_0"), rule.matches("Dense_0/sub")
      (True, False)
    """

    pattern: str
    weight: QuantSpec | None = None
    act: QuantSpec | None = None
    grad: QuantSpec | None = None
    mode: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str):
            raise TypeError(f"Rule.pattern must be a str regex, got {self.pattern!r}.")
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"Rule.pattern {self.pattern!r} is not a valid regex: {e}.") from None
        for name in ("weight", "act", "grad"):
            spec = getattr(self, name)
            if spec is None:
                continue
            if not isinstance(spec, QuantSpec):
                raise TypeError(f"Rule.{name} must be a jq.QuantSpec or None, got {spec!r}.")
            if spec.stochastic:
                raise ValueError(
                    f"Rule.{name}: {spec} uses stochastic rounding, which needs a PRNG key "
                    "per step; quantize_model has none to give. Use rounding='nearest', or "
                    "call jq.dot_general(..., key=...) yourself."
                )
        if self.mode not in _MODES:
            raise ValueError(f"Rule.mode must be one of {_MODES}, got {self.mode!r}.")

    @property
    def quantizes(self) -> bool:
        """Whether the rule quantizes anything (a rule without specs keeps float)."""
        return any(s is not None for s in (self.weight, self.act, self.grad))

    def matches(self, path: str) -> bool:
        return re.fullmatch(self.pattern, path) is not None


class Match(NamedTuple):
    """One quantized module: its path, its class name and the rule that matched it."""

    path: str
    module: str
    rule: Rule


def as_rules(rules: Rule | Iterable[Rule]) -> tuple[Rule, ...]:
    if isinstance(rules, Rule):
        return (rules,)
    try:
        out = tuple(rules)
    except TypeError:
        raise TypeError(
            f"quantize_model: rules must be a Rule or a sequence of Rules, got {rules!r}."
        ) from None
    for r in out:
        if not isinstance(r, Rule):
            raise TypeError(f"quantize_model: every rule must be a jq.flax.Rule, got {r!r}.")
    if not out:
        raise ValueError("quantize_model: got no rules; pass at least one jq.flax.Rule.")
    return out


def path_str(path: Sequence[Any]) -> str:
    return "/".join(str(p) for p in path)


def first_match(rules: Sequence[Rule], path: str) -> int | None:
    for i, r in enumerate(rules):
        if r.matches(path):
            return i
    return None


def check_unmatched(
    rules: Sequence[Rule], used: set[int], candidates: Sequence[str], strict: bool, where: str
) -> None:
    """Raise (strict) or warn for every rule that matched no quantizable module."""
    missed = [r for i, r in enumerate(rules) if i not in used]
    if not missed:
        return
    listing = ", ".join(repr(p) for p in candidates) or "(none)"
    msg = (
        f"quantize_model ({where}): rule pattern(s) "
        f"{', '.join(repr(r.pattern) for r in missed)} matched no module. Patterns are "
        f"matched with re.fullmatch against these quantizable module paths: {listing}. Fix "
        "the regex (use '.*name.*' for a substring), or pass strict=False to only warn."
    )
    if strict:
        raise ValueError(msg)
    warnings.warn(msg, UserWarning, stacklevel=3)


@dataclasses.dataclass(frozen=True)
class QuantDot:
    """A ``lax.dot_general`` drop-in that calls :func:`jaxquant.dot_general` with a rule's
    specs (activation = lhs, weight = rhs). Frozen and hashable: a static module attribute."""

    rule: Rule
    path: str

    def __call__(
        self,
        lhs: Any,
        rhs: Any,
        dimension_numbers: Any,
        precision: Any = None,
        preferred_element_type: Any = None,
        *,
        out_sharding: Any = None,
    ) -> Any:
        r = self.rule
        return dot_general(
            lhs,
            rhs,
            dimension_numbers,
            precision,
            preferred_element_type,
            lhs_spec=r.act,
            rhs_spec=r.weight,
            grad_spec=r.grad,
            mode=r.mode,  # type: ignore[arg-type]
            out_sharding=out_sharding,
        )


@dataclasses.dataclass(frozen=True)
class QuantEinsum:
    """A ``jnp.einsum`` drop-in (two operands: input, kernel) for ``nnx.Einsum``."""

    rule: Rule
    path: str

    def __call__(
        self,
        subscripts: str,
        lhs: Any,
        rhs: Any,
        *,
        precision: Any = None,
        preferred_element_type: Any = None,
        out_sharding: Any = None,
    ) -> Any:
        if out_sharding is not None:
            raise ValueError(
                f"{self.path}: jq.einsum takes no out_sharding; got {out_sharding!r}. Leave "
                "out_sharding=None for a quantized Einsum (jit keeps the input's sharding)."
            )
        r = self.rule
        return einsum(
            subscripts,
            lhs,
            rhs,
            lhs_spec=r.act,
            rhs_spec=r.weight,
            grad_spec=r.grad,
            precision=precision,
            preferred_element_type=preferred_element_type,
            mode=r.mode,  # type: ignore[arg-type]
        )
