"""Argument checks of :func:`jaxquant.dot_general` (and so of :func:`jaxquant.einsum`):
dimension numbers, specs, operands and the output's shape, each error naming the argument."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxquant._src import layout
from jaxquant._src.dot.capabilities import FP8, DimensionNumbers
from jaxquant._src.granularity import PerBlock, follows_layout
from jaxquant._src.qarray import QArray
from jaxquant._src.spec import QuantSpec

Array = jax.Array


def normalize_dn(dn: Any) -> DimensionNumbers:
    try:
        (lc, rc), (lb, rb) = dn
        return (
            (tuple(int(a) for a in lc), tuple(int(a) for a in rc)),
            (tuple(int(a) for a in lb), tuple(int(a) for a in rb)),
        )
    except (TypeError, ValueError):
        raise TypeError(
            "dot_general: dimension_numbers must be ((lhs_contracting, rhs_contracting), "
            f"(lhs_batch, rhs_batch)), tuples of ints, got {dn!r}."
        ) from None


def check_spec(spec: Any, name: str, fn: str) -> QuantSpec | None:
    if spec is None:
        return None
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{fn}: {name} must be a jq.QuantSpec or None, got {spec!r}.")
    if not spec.symmetric:
        raise ValueError(
            f"{fn}: {name} {spec} is asymmetric; a zero point does not factor out of a dot. "
            "Use symmetric=True."
        )
    return spec


def check_operand(
    spec: QuantSpec | None,
    x: Array,
    contract: tuple[int, ...],
    batch: tuple[int, ...],
    name: str,
    mode: str,
) -> None:
    """With ``mode="real"``, the scales of a forward operand must be constant along its
    contracted axes (other modes dequantize such an operand before a float dot)."""
    if spec is None:
        return
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"dot_general: {name}_spec quantizes {name}, which must be floating point; got "
            f"dtype {x.dtype}. Cast it (x.astype(jnp.float32)) or pass {name}_spec=None."
        )
    if mode != "real":
        spec.granularity.plan(tuple(x.shape))  # shape errors now, with the spec's message
        return
    free = [i for i in range(x.ndim) if i not in contract and i not in batch]
    hint = (
        f"Use per_tensor(), or one scale per index of the non-contracted axes "
        f"{tuple(batch) + tuple(free)} of {name}: per_channel({', '.join(map(str, free))})"
        if free
        else "Use per_tensor()"
    )
    if len(contract) == 1:
        hint += f" or per_token({contract[0]})"
    if isinstance(spec.granularity, PerBlock):
        raise ValueError(
            f"dot_general: {name}_spec uses {spec.granularity} (format {spec.format.name}); "
            "block scales change along the contracted axis and cannot be factored out of "
            f"an int8 / fp8 dot (mode='real'). {hint}, or mode='auto' to dequantize the "
            "operand before a float dot."
        )
    plan = spec.granularity.plan(tuple(x.shape))
    bad = tuple(d for d in contract if plan.scale_shape[d] != 1)
    if bad:
        raise ValueError(
            f"dot_general: {name}_spec {spec.granularity} gives {name} (shape "
            f"{tuple(x.shape)}) a different scale at each index of axis "
            f"{bad[0] if len(bad) == 1 else bad}, "
            f"which dimension_numbers contract (contracting axes {contract}). Scales must be "
            f"constant along contracted axes to be factored out of an int8 / fp8 dot "
            f"(mode='real'). {hint}, or mode='auto' to dequantize the operand first."
        )


def real_pair(a: QuantSpec | None, b: QuantSpec | None) -> bool:
    if a is None or b is None:
        return False
    an, bn = a.format.name, b.format.name
    return (an == bn == "int8") or (an in FP8 and bn in FP8)


def operands_error(lhs: Any, rhs: Any, dn: DimensionNumbers, err: Exception, fn: str) -> TypeError:
    """lax's error (shapes that do not fit the dimension numbers, mostly), saying which
    operands and dimension numbers it was about."""
    return TypeError(
        f"{fn}: lax.dot_general refused lhs of shape {tuple(lhs.shape)} and rhs of shape "
        f"{tuple(rhs.shape)} with dimension_numbers {dn}: {err}"
    )


def out_aval(lhs: Array, rhs: Array | QArray, dn: DimensionNumbers, pet: Any, fn: str) -> Any:
    """Shape and dtype of ``lax.dot_general``'s result; its shape errors name the operands."""
    try:
        return jax.eval_shape(
            functools.partial(lax.dot_general, dimension_numbers=dn, preferred_element_type=pet),
            jax.ShapeDtypeStruct(lhs.shape, lhs.dtype),
            jax.ShapeDtypeStruct(rhs.shape, rhs.dtype),
        )
    except TypeError as err:
        raise operands_error(lhs, rhs, dn, err, fn) from None


def hashable(precision: Any) -> Any:
    if isinstance(precision, list):
        return tuple(precision)
    return precision


def bind_operand(
    spec: QuantSpec | None,
    shape: tuple[int, ...],
    contract: tuple[int, ...],
    batch: tuple[int, ...],
    name: str,
    fn: str,
    *,
    block_axis: int | None = None,
) -> QuantSpec | None:
    """``spec`` with a layout-relative granularity (``per_channel()``, ``per_block(size)``)
    bound to this operand's axes (:func:`jaxquant._src.layout.bind`); explicit ones come
    back as they are. A fallback (a block that divides no contraction axis, an outer
    product) is taken, and said, as a UserWarning naming the operand."""
    if spec is None or not follows_layout(spec.granularity):
        return spec
    bound, note = layout.bind(spec, tuple(shape), contract, batch, block_axis=block_axis)
    if note is not None:
        warnings.warn(f"{fn}: {name}_spec {note}.", UserWarning, stacklevel=3)
    return bound
