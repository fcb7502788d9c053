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

import contextlib
import contextvars
import dataclasses
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxquant._src.checks import describe
from jaxquant._src.config import Mode, QuantConfig, Scaling, Ste
from jaxquant._src.conv import conv_general_dilated
from jaxquant._src.dot import dot_general, einsum
from jaxquant._src.dot.subscripts import parse as parse_subscripts
from jaxquant._src.flax import act_transform
from jaxquant._src.granularity import follows_layout
from jaxquant._src.qarray import QArray
from jaxquant._src.spec import QuantSpec

_UNSET: Any = object()
_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(QuantConfig))


@dataclasses.dataclass(frozen=True, init=False)
class Rule:
    """Quantize the contractions of the modules whose path matches ``pattern``.

    A Rule is a path pattern plus a :class:`~jaxquant.QuantConfig`: ``Rule(pattern, config)``,
    or, equivalently, the config's fields as keywords (``Rule(pattern, weight=..., act=...)``).

    Args:
      pattern: a regular expression, matched with :func:`re.fullmatch` against the module
        path (names joined by ``"/"``, e.g. ``"Dense_0"``, ``"layers/0/linear"``).
      config: how each contraction of a matched module is quantized; None (and no field
        keywords) keeps the module in float (a way to exclude layers from a later rule).
      weight: :class:`~jaxquant.QuantSpec` of the weight (the operand computed from the
        module's parameters: a Dense kernel, ``kernel.T``, a tied embedding), e.g. int8
        ``per_channel(-1)``; None keeps it in float.
      act: spec of the activation operands (the dot's other operand).
      grad: spec of the output gradient in the backward pass (e.g. e5m2).
      mode: passed to :func:`jaxquant.dot_general`: ``"auto"``, ``"real"`` or ``"emulate"``.
      scaling: ``"current"`` (each step's own amax) or ``"delayed"``: the weight and
        activation scales come from an amax history (:func:`jaxquant.delayed_scaling`)
        kept in the ``"quant_state"`` collection (Linen: pass ``mutable=["quant_state"]``
        to ``apply`` while training; NNX: :class:`QuantState` variables updated in place
        unless the model is in ``eval()`` mode). Delayed specs must be per-tensor or
        per-channel over the kernel's output axes (one history per scale).
      history_len, margin: of the delayed scaling.
      ste: the operands' straight-through estimator: ``"plain"``, ``"clipped"`` (zero
        gradient where an operand saturated) or ``"lsq"`` (learned step size, Esser et al.
        2019: each quantized operand's step is a trained parameter, ``params`` in Linen,
        ``nnx.Param`` in NNX, with LSQ's gradient; the product is then a float dot).

    Stochastic specs (``rounding="stochastic"``) draw their keys from the ``"quant"`` PRNG
    stream: ``apply(..., rngs={"quant": key})`` in Linen, ``quantize_model(model, rules,
    rngs=nnx.Rngs(quant=seed))`` in NNX.

    Raises:
      ValueError: for an invalid regex, or an unknown mode, scaling or ste.

    Example:
      >>> import jaxquant as jq
      >>> from jaxquant.flax import Rule
      >>> rule = Rule(r"Dense_\\d+", weight=jq.QuantSpec("int8", jq.per_channel(-1)))
      >>> rule.matches("Dense_0"), rule.matches("Dense_0/sub")
      (True, False)
      >>> rule == Rule(r"Dense_\\d+", jq.QuantConfig(weight=rule.weight))
      True

    References:
      Esser et al., "Learned Step Size Quantization" (``ste="lsq"``),
      https://arxiv.org/abs/1902.08153
    """

    pattern: str
    config: QuantConfig

    def __init__(
        self,
        pattern: str,
        config: QuantConfig | None = None,
        *,
        weight: QuantSpec | None = _UNSET,
        act: QuantSpec | None = _UNSET,
        grad: QuantSpec | None = _UNSET,
        mode: Mode = _UNSET,
        scaling: Scaling = _UNSET,
        history_len: int = _UNSET,
        margin: int = _UNSET,
        ste: Ste = _UNSET,
    ) -> None:
        if not isinstance(pattern, str):
            raise TypeError(f"Rule.pattern must be a str regex, got {pattern!r}.")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"Rule.pattern {pattern!r} is not a valid regex: {e}.") from None
        # the config fields given as keywords: a heterogeneous keyword bag for QuantConfig
        loose: dict[str, Any] = {
            k: v
            for k, v in dict(
                weight=weight,
                act=act,
                grad=grad,
                mode=mode,
                scaling=scaling,
                history_len=history_len,
                margin=margin,
                ste=ste,
            ).items()
            if v is not _UNSET
        }
        if config is not None and not isinstance(config, QuantConfig):
            fix = (
                f"Rule({pattern!r}, weight=spec) or Rule({pattern!r}, jq.QuantConfig(weight=spec))"
                if isinstance(config, QuantSpec)
                else f"Rule({pattern!r}, jq.QuantConfig(weight=..., act=...))"
            )
            raise TypeError(
                f"Rule.config must be a jq.QuantConfig or None, got {describe(config)}. "
                f"Write {fix}."
            )
        if config is not None and loose:
            raise ValueError(
                f"Rule({pattern!r}): got a config and the config fields {sorted(loose)} as "
                "keywords; give one or the other (config.replace(...) changes fields)."
            )
        if config is None:
            try:
                config = QuantConfig(**loose)
            except (TypeError, ValueError) as e:
                raise type(e)(str(e).replace("QuantConfig.", "Rule.", 1)) from None
        object.__setattr__(self, "pattern", pattern)
        object.__setattr__(self, "config", config)

    # The config's fields, read through the rule (rule.weight, rule.scaling...): one name each.
    @property
    def weight(self) -> QuantSpec | None:
        return self.config.weight

    @property
    def act(self) -> QuantSpec | None:
        return self.config.act

    @property
    def grad(self) -> QuantSpec | None:
        return self.config.grad

    @property
    def mode(self) -> Mode:
        return self.config.mode

    @property
    def scaling(self) -> Scaling:
        return self.config.scaling

    @property
    def history_len(self) -> int:
        return self.config.history_len

    @property
    def margin(self) -> int:
        return self.config.margin

    @property
    def ste(self) -> Ste:
        return self.config.ste

    def __repr__(self) -> str:
        return f"Rule({self.pattern!r}, {self.config!r})"

    def replace(self, **changes: Any) -> Rule:
        """A copy with the pattern and / or config fields changed."""
        pattern = changes.pop("pattern", self.pattern)
        config = changes.pop("config", self.config)
        return Rule(pattern, config.replace(**changes) if changes else config)

    @property
    def stateful(self) -> bool:
        """Whether the rule keeps variables (delayed scales, learned steps) or PRNG keys."""
        return self.config.stateful

    @property
    def quantizes(self) -> bool:
        """Whether the rule quantizes anything (a rule without specs keeps float)."""
        return self.config.quantizes

    def matches(self, path: str) -> bool:
        return re.fullmatch(self.pattern, path) is not None


@contextlib.contextmanager
def _at(path: str) -> Iterator[None]:
    """Prefix a ValueError / TypeError raised inside with the layer's path."""
    try:
        yield
    except (ValueError, TypeError) as e:
        where = repr(path) if path else "(the model itself)"
        msg = f"quantized layer {where}: {e}"
        if path and any(s in str(e) for s in _SHAPE_MISFITS):
            # A layer whose shape does not fit the blocks is never left in float quietly;
            # the user keeps it there by name.
            msg += (
                f" To keep this layer in high precision, put Rule({path!r}) (no config) "
                f"before the rule that matched it, e.g. recipe.rules(keep_float=[{path!r}])."
            )
        raise type(e)(msg) from None


# Phrases of the block / Hadamard size errors (granularity, hadamard, dot checks).
_SHAPE_MISFITS = ("does not divide", "multiple of", "not a multiple")


# ---------------------------------------------------------------- gated layers
#
# Sensitivity analysis measures one layer quantized at a time. Rather than one model (and
# one compilation) per layer, it quantizes every layer and passes, as traced booleans,
# which layers' products take the quantized result: one compilation per candidate, each
# trial a call with other gates. Each gated product computes both results and selects one,
# exactly the float product (the layer unquantized) or the quantized one.

_GATES: contextvars.ContextVar[tuple[Mapping[str, Any], set[str]] | None] = contextvars.ContextVar(
    "jaxquant_layer_gates", default=None
)


@contextlib.contextmanager
def layer_gates(gates: Mapping[str, Any]) -> Iterator[None]:
    """While tracing inside: the product of a layer at a path in ``gates`` (a traced or
    concrete boolean scalar per path) is the quantized one where its gate is true and the
    float one where it is false; other layers are as their rules say.

    Raises:
      ValueError: on exit, a gated path none of whose products took its gate (a product
        that bypasses :func:`gated` would be quantized in every trial, silently).
    """
    used: set[str] = set()
    token = _GATES.set((gates, used))
    try:
        yield
    finally:
        _GATES.reset(token)
    missed = sorted(set(gates) - used)
    if missed:
        raise ValueError(
            f"layer gates {missed} were never applied: no quantized product of those layers "
            "was traced through jaxquant's gate."
        )


def gated(path: str, quantized: Callable[[], Any], original: Callable[[], Any]) -> Any:
    """``quantized()``, or ``where(gate, quantized(), original())`` for a gated ``path``."""
    state = _GATES.get()
    if state is None or path not in state[0]:
        return quantized()
    gates, used = state
    used.add(path)
    on = gates[path]
    return jax.tree.map(lambda q, f: jnp.where(on, q, f), quantized(), original())


def _spec_kwargs(r: Rule, rhs: Any = None) -> dict[str, Any]:
    """The keyword arguments every quantized op of a stateless rule takes. A QArray
    ``rhs`` (converted params, serving) is already quantized: only the activation's spec
    applies, and the QArray must have been made with the rule's weight spec."""
    if isinstance(rhs, QArray):
        check_served_weight(r, rhs)
        return {"lhs_spec": r.act}
    c = r.config
    return {
        "lhs_spec": r.act,
        "rhs_spec": r.weight,
        "grad_spec": r.grad,
        "ste": r.ste,
        "backward": c.backward,
        "hadamard": c.hadamard,
    }


def check_served_weight(r: Rule, w: QArray) -> None:
    """A converted kernel must come from the rule's own weight spec (no silent mix-up)."""
    same = r.weight == w.spec or (
        # a layout-relative rule spec (per_channel()) was bound to the kernel's axes
        r.weight is not None
        and follows_layout(r.weight.granularity)
        and r.weight.replace(granularity=w.spec.granularity) == w.spec
    )
    if not same:
        raise ValueError(
            f"the kernel is a QArray quantized with {w.spec}, but the rule {r.pattern!r} "
            f"says weight={r.weight}. Convert the params with the same rules "
            "(jq.flax.convert) or fix the rule."
        )
    if r.stateful:
        raise ValueError(
            f"rule {r.pattern!r} is stateful (delayed scaling, LSQ or stochastic rounding); "
            "serving converted params takes stateless rules: static activation scales "
            "come from jq.flax.calibrate(...).rules."
        )


def _mode_kwargs(r: Rule, rhs: Any) -> dict[str, Any]:
    return {} if isinstance(rhs, QArray) else {"mode": r.mode}


class Match(NamedTuple):
    """One quantized module: its path, its class name and the rule that matched it.

    :func:`~jaxquant.flax.report` lists them.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxquant as jq
      >>> from jaxquant.flax import Rule, quantize_model, report
      >>> qmodel = quantize_model(nn.Dense(4), Rule(".*", weight=jq.QuantSpec("int8")))
      >>> variables = qmodel.init(jax.random.key(0), jnp.ones((1, 3)))
      >>> match = report(qmodel)[0]
      >>> match.path, match.module, match.rule.pattern, match.rule.weight.format.name
      ('', 'Dense', '.*', 'int8')
    """

    path: str
    module: str
    rule: Rule


def as_rules(rules: Rule | Iterable[Rule], where: str = "quantize_model") -> tuple[Rule, ...]:
    """``rules`` as a non-empty tuple of Rules; ``where`` names the caller in errors."""
    if isinstance(rules, Rule):
        return (rules,)
    if isinstance(rules, str | bytes):  # iterable, but of characters
        raise TypeError(
            f"{where}: rules must be a jq.flax.Rule or a sequence of Rules, got "
            f"{describe(rules)}. Wrap a pattern: jq.flax.Rule({rules!r}, weight=...)."
        )
    try:
        out = tuple(rules)
    except TypeError:
        raise TypeError(
            f"{where}: rules must be a jq.flax.Rule or a sequence of Rules, got {describe(rules)}."
        ) from None
    for r in out:
        if not isinstance(r, Rule):
            raise TypeError(
                f"{where}: rules must be jq.flax.Rule objects, got {describe(r)} among them. "
                "A QuantSpec goes inside one: jq.flax.Rule('.*', weight=spec)."
            )
    if not out:
        raise ValueError(f"{where}: got no rules; pass at least one jq.flax.Rule.")
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
        x = lhs
        lhs = act_transform.apply_to_lhs(
            lhs, dimension_numbers[0][0], sys._getframe(1), f"layer {self.path!r}"
        )

        def original() -> Any:  # the layer unquantized (sensitivity's gates)
            kw = {} if out_sharding is None else {"out_sharding": out_sharding}
            return jax.lax.dot_general(
                x, rhs, dimension_numbers, precision, preferred_element_type, **kw
            )

        with _at(self.path):
            return gated(
                self.path,
                lambda: dot_general(
                    lhs,
                    rhs,
                    dimension_numbers,
                    precision,
                    preferred_element_type,
                    **_mode_kwargs(r, rhs),
                    **_spec_kwargs(r, rhs),
                    out_sharding=out_sharding,
                ),
                original,
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
        la, lb, lo = parse_subscripts(subscripts, len(lhs.shape), len(rhs.shape))
        contracting = [i for i, c in enumerate(la) if c in lb and c not in lo]
        x = lhs
        lhs = act_transform.apply_to_lhs(lhs, contracting, sys._getframe(1), f"layer {self.path!r}")

        def original() -> Any:  # the layer unquantized (sensitivity's gates)
            pet = preferred_element_type
            return jnp.einsum(subscripts, x, rhs, precision=precision, preferred_element_type=pet)

        with _at(self.path):
            return gated(
                self.path,
                lambda: einsum(
                    subscripts,
                    lhs,
                    rhs,
                    precision=precision,
                    preferred_element_type=preferred_element_type,
                    **_mode_kwargs(r, rhs),
                    **_spec_kwargs(r, rhs),
                ),
                original,
            )


# ------------------------------------------------------------ stateful rules (shared)
#
# A stateful rule (delayed scaling, LSQ, stochastic rounding) needs variables and keys;
# the Linen and NNX front ends keep them and run jaxquant._src.flax.stateful's step.


def deterministic_rule(rule: Rule) -> Rule:
    """The rule with stochastic specs rounding to nearest (evaluation)."""
    return Rule(rule.pattern, rule.config.deterministic())


def needs_key(rule: Rule) -> bool:
    return rule.config.needs_key


@dataclasses.dataclass(frozen=True)
class QuantConv:
    """A ``lax.conv_general_dilated`` drop-in (``nn.Conv`` / ``nnx.Conv``) that calls
    :func:`jaxquant.conv_general_dilated` with a stateless rule's specs."""

    rule: Rule
    path: str

    def __call__(
        self,
        lhs: Any,
        rhs: Any,
        window_strides: Sequence[int],
        padding: str | Sequence[tuple[int, int]],
        lhs_dilation: Sequence[int] | None = None,
        rhs_dilation: Sequence[int] | None = None,
        dimension_numbers: Any = None,
        feature_group_count: int = 1,
        batch_group_count: int = 1,
        precision: Any = None,
        preferred_element_type: Any = None,
        *,
        out_sharding: Any = None,
    ) -> Any:
        # lax.conv_general_dilated's signature, named (not *args / **kw) so that a rule's
        # spec keywords can never collide with a positional argument
        if out_sharding is not None:
            raise ValueError(f"{self.path}: a quantized Conv takes no out_sharding.")
        r = self.rule
        with _at(self.path):
            if isinstance(rhs, QArray):  # served: conv kernels are small, dequantize it
                check_served_weight(r, rhs)
                rhs, r = rhs.dequantize(), r.replace(weight=None, grad=None)
            args = (
                lhs,
                rhs,
                window_strides,
                padding,
                lhs_dilation,
                rhs_dilation,
                dimension_numbers,
                feature_group_count,
                batch_group_count,
                precision,
                preferred_element_type,
            )
            return gated(
                self.path,
                # conv rules are stateless: ste is plain or clipped
                lambda: conv_general_dilated(*args, **_spec_kwargs(r)),
                lambda: jax.lax.conv_general_dilated(*args),  # unquantized (sensitivity)
            )


def check_conv_rule(rule: Rule, path: str) -> None:
    if rule.stateful:
        raise ValueError(
            f"quantize_model: the Conv at {path!r} matched a rule with delayed scaling, LSQ "
            "or stochastic rounding; jaxquant quantizes convolutions with stateless rules "
            "only (current scaling, nearest rounding, plain / clipped STE). Give the conv "
            "layers their own rule, listed before this one."
        )
