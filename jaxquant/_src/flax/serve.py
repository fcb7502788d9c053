"""Serving converted Flax models: kernels stored as QArrays, products on their values.

:func:`convert` replaces the kernel of every layer a quantized model's rules quantize by a
:class:`~jaxquant.QArray` (int8 values, int4 packed two per byte, ...), keeping nothing
else of it: the converted tree holds no float copy of a quantized kernel. The quantized
model then runs on such params directly:

* **Linen**: :class:`~jaxquant.flax.QuantizedModule`'s interceptor sees a QArray kernel
  and computes the layer itself (Dense, DenseGeneral, Einsum: :func:`jaxquant.dot_general`
  with the QArray, see :mod:`jaxquant._src.serve`; Conv: flax's own Conv on the
  dequantized kernel, which is small) -- Linen's ``param`` would otherwise compare the
  packed values' shape with the float kernel's;
* **NNX**: the layers stay the same objects; their ``kernel`` variable holds the QArray
  and their ``promote_dtype`` is :func:`promote_keep_qarray`, so flax's own ``__call__``
  hands the QArray to the rule's ``dot_general`` / ``einsum_op`` /
  ``conv_general_dilated``.

Weight-only rules (``act=None``) multiply with the activation's dtype (bfloat16
activations: a 16-bit GEMM, "w4a16"); rules with an activation spec quantize the
activation, with the static scale of a :func:`jaxquant.fixed` calibration
(:func:`jaxquant.flax.calibrate` writes those) or the batch's own, and run int8 / fp8
GEMMs where the pair allows.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from jaxquant._src.flax.intercept import Contraction
from jaxquant._src.flax.kinds import NNX_LAYERS, nnx_kind, nnx_layers, nnx_modules
from jaxquant._src.flax.rules import (
    Match,
    QuantConv,
    QuantDot,
    QuantEinsum,
    Rule,
    check_served_weight,
)
from jaxquant._src.granularity import (
    PerBlock,
    PerBlock2D,
    PerChannel,
    PerTensor,
    PerToken,
    follows_layout,
)
from jaxquant._src.layout import bind
from jaxquant._src.qarray import QArray
from jaxquant._src.spec import QuantSpec
from jaxquant._src.tree import quantize_tree

_Args = TypeVar("_Args", bound=tuple[Any, ...])

# ``load(path, abstract_leaf) -> array`` of jq.flax.convert (path: a str in NNX, the key
# path tuple in Linen)
Load = Callable[[Any, jax.ShapeDtypeStruct], Any]


def promote_keep_qarray(
    args: _Args, /, *, dtype: DTypeLike | None = None, inexact: bool = True
) -> _Args:
    """``flax.nnx``'s ``promote_dtype`` that passes QArrays through: arrays are cast to
    ``dtype`` (default: the result type of the arrays and the QArrays' float dtypes)."""
    del inexact
    if dtype is None:
        dts = [a.dtype for a in args if a is not None]
        dtype = jnp.result_type(*dts) if dts else None
    out = tuple(a if a is None or isinstance(a, QArray) else jnp.asarray(a, dtype) for a in args)
    # flax's PromoteDtypeFn is generic in the tuple: one output per input, as here
    return cast(_Args, out)


# ------------------------------------------------------------------------------ Linen


def linen_layer(m: nn.Module, rule: Rule, path: str, args: tuple, kwargs: dict) -> Any:
    """The output of Linen layer ``m`` (Dense / DenseGeneral / Einsum / Conv) whose kernel
    variable is a QArray, computed with ``rule``'s activation spec."""
    kernel: object = m.get_variable("params", "kernel")
    assert isinstance(kernel, QArray)  # the interceptor calls this for QArray kernels only
    if not rule.quantizes:
        raise ValueError(
            f"quantized layer {path!r}: its kernel is a QArray but its rule keeps it float; "
            "convert the params with the same rules the model is quantized with."
        )
    try:
        check_served_weight(rule, kernel)
    except ValueError as e:
        raise ValueError(f"quantized layer {path!r}: {e}") from None
    bias = m.get_variable("params", "bias") if m.has_variable("params", "bias") else None
    if isinstance(m, nn.Conv):  # flax's own Conv on the dequantized (small) kernel
        act_only = rule.replace(weight=None, grad=None)
        conv = m.clone(parent=None, conv_general_dilated=QuantConv(act_only, path))
        w = kernel.dequantize()
        params = {"kernel": w} if bias is None else {"kernel": w, "bias": bias}
        return conv.apply({"params": params}, *args, **kwargs)
    (x,) = args[:1]
    x = jnp.asarray(x)
    dtype = m.dtype
    if dtype is None:
        dtype = jnp.result_type(x.dtype, kernel.dtype, *(() if bias is None else (bias.dtype,)))
    x = x.astype(dtype)
    pet = getattr(m, "preferred_element_type", None)
    if isinstance(m, nn.Einsum):
        subscripts = nn.merge_param("einsum_str", m.einsum_str, kwargs.get("einsum_str"))
        subscripts = subscripts.replace(" ", "")
        y = QuantEinsum(rule, path)(
            subscripts, x, kernel, precision=m.precision, preferred_element_type=pet
        )
        if bias is not None:
            _, shape = m._get_bias_shape(subscripts, x, kernel)
            y = y + jnp.reshape(bias.astype(dtype), shape)
        return y.astype(dtype)
    if kwargs:
        raise TypeError(f"quantized layer {path!r}: unexpected arguments {sorted(kwargs)}.")
    if isinstance(m, nn.DenseGeneral):
        if m.batch_dims:
            raise ValueError(
                f"quantized layer {path!r}: serving a DenseGeneral with batch_dims is not "
                "supported; keep it float (an earlier Rule without specs)."
            )
        axis = m.axis if isinstance(m.axis, tuple | list) else (m.axis,)
        axis = tuple(a % x.ndim for a in axis)
        dn = ((axis, tuple(range(len(axis)))), ((), ()))
    else:  # nn.Dense
        dn = (((x.ndim - 1,), (0,)), ((), ()))
    y = QuantDot(rule, path)(x, kernel, dn, m.precision, pet)
    if bias is not None:
        y = y + jnp.reshape(bias.astype(dtype), (1,) * (y.ndim - bias.ndim) + bias.shape)
    return y.astype(dtype)


def own_qarrays(params: Any) -> bool:
    """Whether a module's own parameters (not its children's) hold a QArray."""
    return isinstance(params, dict | nn.FrozenDict) and any(
        isinstance(v, QArray) for v in params.values()
    )


def dequantized_own(params: Any) -> Any:
    """The module's own QArray parameters dequantized (children's kept: they serve
    themselves)."""
    return {k: v.dequantize() if isinstance(v, QArray) else v for k, v in params.items()}


# ----------------------------------------------------------------------------- convert


def _kernel_policy(targets: dict[str, QuantSpec]) -> Callable[[tuple, Any], Any]:
    def policy(path: tuple, leaf: Any) -> Any:
        return targets.get(jax.tree_util.keystr(path, simple=True, separator="/"))

    return policy


def reversed_spec(spec: QuantSpec, ndim: int, where: str) -> QuantSpec:
    """``spec`` for an array whose axes are those of the operand reversed (a parameter the
    module uses as ``param.T``): each named axis ``a`` becomes ``ndim - 1 - a``."""
    g = spec.granularity

    def rev(a: int) -> int:
        return ndim - 1 - (a % ndim)

    if isinstance(g, PerTensor):
        return spec
    if isinstance(g, PerChannel) and g.axes is not None:
        return spec.replace(granularity=PerChannel(tuple(sorted(rev(a) for a in g.axes))))
    if isinstance(g, PerBlock) and g.axis is not None:
        return spec.replace(granularity=PerBlock(rev(g.axis), g.size))
    if isinstance(g, PerToken):
        return spec.replace(granularity=PerToken(rev(g.axis)))
    if isinstance(g, PerBlock2D):
        return spec.replace(granularity=PerBlock2D((rev(g.axes[0]), rev(g.axes[1])), g.sizes))
    raise ValueError(
        f"jq.flax.convert: {where} is used transposed by its module and its weight spec's "
        f"granularity {g} names no axis of it; give the axes explicitly (e.g. "
        "per_channel(-1)) to convert it."
    )


def weight_targets(
    matches: Sequence[Match], found: Sequence[Contraction]
) -> dict[str, tuple[Rule, QuantSpec]]:
    """``{parameter path: (rule, spec in the stored layout)}`` of a quantized model's
    weights: each quantized contraction's weight parameter (a Flax layer's kernel; a
    parameter an intercepted module uses itself, reversed specs for ``param.T``)."""
    rules = {m.path: m.rule for m in matches}
    out: dict[str, tuple[Rule, QuantSpec]] = {}
    for c in found:
        rule = rules.get(c.path)
        if not c.quantized or c.param is None or rule is None or rule.weight is None:
            continue
        name = f"{c.path}/{c.param}" if c.path else c.param
        shape = c.shapes[0 if c.weight == "lhs" else 1]
        spec = rule.weight
        if follows_layout(spec.granularity):  # per_channel() / per_block(32): this operand's
            if c.contracting is None:
                raise ValueError(
                    f"jq.flax.convert: the weight spec of {name!r} ({spec.granularity}) "
                    "follows its contraction's layout, which is not known for this "
                    f"{c.module}; give the axes explicitly (e.g. per_channel(-1))."
                )
            bound, _ = bind(spec, shape, c.contracting, c.batch)
            assert bound is not None  # bind returns None for a None spec only
            spec = bound
        # transposed None (a square parameter found by shape): stored as used untransposed;
        # serving passes it through as stored rather than re-quantizing it.
        spec = reversed_spec(spec, len(shape), repr(name)) if c.transposed else spec
        if name in out and out[name][1] != spec:
            raise ValueError(
                f"jq.flax.convert: the parameter {name!r} is the weight of two contractions "
                f"that quantize it differently ({out[name][1]} and {spec}); one stored "
                "QArray cannot serve both. Keep one of them in float."
            )
        out[name] = (rule, spec)
    return out


def convert_linen(
    variables: Any,
    matches: Sequence[Match],
    found: Sequence[Contraction],
    *,
    load: Load | None = None,
    delete: bool = False,
) -> Any:
    """Linen: the variables with the quantized weights converted (module docstring)."""
    has_params = isinstance(variables, dict | nn.FrozenDict) and "params" in variables
    params = variables["params"] if has_params else variables
    targets = {k: spec for k, (_, spec) in weight_targets(matches, found).items()}
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda t: isinstance(t, QArray))[
        0
    ]
    kinds = {jax.tree_util.keystr(p, simple=True, separator="/"): v for p, v in leaves}
    for name in targets:
        if name not in kinds:
            raise ValueError(
                f"jq.flax.convert: the model quantizes {name!r} but the params have no such "
                f"leaf (they have {sorted(kinds)}). Pass the variables of this model."
            )
        if isinstance(kinds[name], QArray):
            raise ValueError(
                f"jq.flax.convert: {name!r} is already a QArray; convert the float params once."
            )
    out = quantize_tree(params, _kernel_policy(targets), load=load, delete=delete)
    if has_params:
        return {**variables, "params": out}
    return out


def convert_nnx(
    model: nnx.Module,
    matches: Sequence[Match],
    found: Sequence[Contraction] | None,
    *,
    load: Load | None = None,
) -> nnx.Module:
    """NNX, in place: the quantized weights become QArrays (module docstring). ``found``:
    the contractions of the last call (None before the first: the Flax layers' kernels)."""
    nodes = dict(nnx_modules(model))
    if found is None:
        targets = {
            f"{m.path}/kernel" if m.path else "kernel": (m.rule, m.rule.weight)
            for m in matches
            if m.rule.weight is not None and nnx_kind(nodes[m.path]) is not None
        }
    else:
        targets = weight_targets(matches, found)
    plan = []
    for name, (rule, spec) in targets.items():
        path, _, param = name.rpartition("/")
        node = nodes[path]
        var: Any = node
        for part in param.split("/"):
            var = getattr(var, part)
        k = var[...]
        if isinstance(k, QArray):
            raise ValueError(f"jq.flax.convert: {name!r} is already a QArray; convert once.")
        if isinstance(k, jax.ShapeDtypeStruct) and load is None:
            raise ValueError(
                f"jq.flax.convert: {name!r} is abstract; pass load=(path, leaf) -> array."
            )
        if rule.stateful:
            raise ValueError(
                f"jq.flax.convert: {path!r} has a stateful rule (delayed scaling, LSQ or "
                "stochastic rounding); serving takes stateless rules (jq.flax.calibrate "
                "writes static ones). Re-quantize the model with them first."
            )
        spec.granularity.plan(tuple(k.shape))
        plan.append((path, node, var, k, spec, param == "kernel" and nnx_kind(node)))
    for path, node, var, k, spec, is_layer in plan:
        (q,) = jax.tree_util.tree_leaves(
            quantize_tree([k], spec, load=None if load is None else _load_at(load, path)),
            is_leaf=lambda t: isinstance(t, QArray),
        )
        var.set_value(q)
        # nnx_kind found a Flax layer: an instance of one of NNX_LAYERS (this narrows it)
        if is_layer and isinstance(node, NNX_LAYERS):
            node.promote_dtype = promote_keep_qarray
    return model


def _load_at(load: Load, path: str) -> Callable[[Any, jax.ShapeDtypeStruct], Any]:
    """``load`` for the one parameter at ``path`` (convert's own key path is ``[0]``)."""

    def load_one(_: Any, leaf: jax.ShapeDtypeStruct) -> Any:
        return load(path, leaf)

    return load_one


def _nnx_layers(model: nnx.Module) -> list[tuple[str, Any]]:
    return nnx_layers(model)


def exact_rule(path: str, rule: Rule, **changes: Any) -> Rule:
    """``rule`` restricted to exactly the module at ``path``."""
    return rule.replace(pattern=re.escape(path), **changes)
