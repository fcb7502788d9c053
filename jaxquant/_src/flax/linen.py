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
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxquant._src.checks import check_bool, describe
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
    needs_key,
    operand_specs,
    path_str,
    run_stateful,
    scaling_for,
    step_base,
    step_shape,
)
from jaxquant._src.flax.serve import linen_layer
from jaxquant._src.qarray import QArray

_DOTS = (nn.Dense, nn.DenseGeneral)
_QUANTIZABLE = (*_DOTS, nn.Einsum, nn.Conv)
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

    Stochastic specs take a key from the ``"quant"`` PRNG stream.
    """

    rule: Rule
    where: str

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
        update = self.is_mutable_collection(STATE) and not self.is_initializing()
        scales: dict[str, Any] = {}
        steps: dict[str, Any] = {}
        for op, spec in operand_specs(rule):
            x = jax.lax.stop_gradient(lhs if op == "lhs" else rhs)
            if rule.scaling == "delayed":
                sc = scaling_for(rule, spec)
                var = self.variable(STATE, f"{op}_scaling", sc.init, x.shape)
                scales[op], new = sc.update(var.value, x)
                if update:
                    var.value = new
            if rule.ste == "lsq":
                shape = step_shape(spec, tuple(x.shape))
                base_var = self.variable(STATE, f"{op}_step_base", jnp.zeros, shape, jnp.float32)
                base = step_base(base_var.value, x, spec)
                if update or self.is_initializing():
                    base_var.value = base
                step = self.param(f"{op}_step", nn.initializers.ones, shape, jnp.float32)
                steps[op] = step * base
        key = None
        if needs_key(rule):
            if not self.has_rng("quant"):
                raise ValueError(
                    f"quantize_model: the rule for {self.where!r} rounds stochastically and "
                    "needs keys from the 'quant' PRNG stream: pass rngs={'quant': key} to "
                    "init / apply (a fresh key per step)."
                )
            key = self.make_rng("quant")
        return run_stateful(
            rule,
            lhs,
            rhs,
            dimension_numbers=dimension_numbers,
            subscripts=subscripts,
            precision=precision,
            preferred_element_type=preferred_element_type,
            out_sharding=out_sharding,
            scales=scales,
            steps=steps,
            key=key,
            where=self.where,
        )


@dataclasses.dataclass(frozen=True)
class _OpFactory:
    """``dot_general_cls`` for Dense / DenseGeneral: builds the :class:`QuantOp` child."""

    rule: Rule
    path: str

    def __call__(self) -> QuantOp:
        return QuantOp(self.rule, self.path, name="quant")


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
        candidates: list[str] = []

        def interceptor(next_fun, args, kwargs, context):
            m = context.module
            if context.method_name != "__call__" or not isinstance(m, _QUANTIZABLE):
                return next_fun(*args, **kwargs)
            if (
                isinstance(m, _QuantEinsum)
                or (isinstance(m, nn.Conv) and isinstance(m.conv_general_dilated, QuantConv))
                or (
                    isinstance(m, _DOTS)
                    and (
                        isinstance(m.dot_general, QuantDot)
                        or isinstance(m.dot_general_cls, _OpFactory)
                    )
                )
            ):  # our own clone, already quantized
                return next_fun(*args, **kwargs)
            path = _relative_path(m, root)
            if path not in candidates:
                candidates.append(path)
            i = first_match(rules, path)
            served = m.has_variable("params", "kernel") and isinstance(
                m.get_variable("params", "kernel"), QArray
            )
            if i is not None:
                used.add(i)
            if i is None or not rules[i].quantizes:
                if served:
                    raise ValueError(
                        f"quantize_model: the kernel of {path!r} is a QArray (converted "
                        "params) but no quantizing rule matches the layer; apply the params "
                        "with the rules they were converted with."
                    )
                return next_fun(*args, **kwargs)
            rule = rules[i]
            if all(x.path != path for x in matches):
                matches.append(Match(path, type(m).__name__, rule))
            if served:
                return linen_layer(m, rule, path, args, kwargs)
            if isinstance(m, nn.Conv):
                check_conv_rule(rule, path)
                if m.conv_general_dilated_cls is not None or m.conv_general_dilated not in (
                    None,
                    lax.conv_general_dilated,
                ):
                    raise ValueError(
                        f"quantize_model: Conv at {path!r} already has a custom "
                        "conv_general_dilated; jaxquant will not silently replace it."
                    )
                q = m.clone(parent=m.scope, conv_general_dilated=QuantConv(rule, path))
                return q(*args, **kwargs)
            if isinstance(m, nn.Einsum):
                if type(m) is not nn.Einsum:
                    raise ValueError(
                        f"quantize_model: {type(m).__name__} at {path!r} subclasses nn.Einsum; "
                        "jaxquant replaces nn.Einsum's own __call__ and will not guess a "
                        "subclass's. Exclude it with an earlier Rule(pattern) without specs."
                    )
                op = _OpFactory(rule, path) if rule.stateful else QuantEinsum(rule, path)
                fields = {
                    f.name: getattr(m, f.name)
                    for f in dataclasses.fields(nn.Einsum)
                    if f.init and f.name not in ("parent", "name")
                }
                q = _QuantEinsum(**fields, op=op, parent=m.scope)
                return q(*args, **kwargs)
            if m.dot_general_cls is not None or m.dot_general not in (None, lax.dot_general):
                raise ValueError(
                    f"quantize_model: {type(m).__name__} at {path!r} already has a custom "
                    f"dot_general ({m.dot_general or m.dot_general_cls!r}); jaxquant will not "
                    "silently replace it. Exclude it with an earlier Rule(pattern) without "
                    "specs, or remove the custom dot_general."
                )
            if rule.stateful:
                q = m.clone(parent=m.scope, dot_general_cls=_OpFactory(rule, path))
            else:
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
