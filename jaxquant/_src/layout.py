"""Layouts: bind a layout-relative granularity to one operand of a contraction.

``per_channel()`` and ``per_block(size)`` name no axis (see :mod:`granularity`). A contraction
knows, for each operand, which axes it contracts and which it batches; :func:`bind` turns the
spec into one with explicit axes for that operand's shape, so one rule fits a Dense kernel
``(in, out)``, a LinearGeneral kernel ``(heads, head_dim, out)``, a Conv kernel ``HWIO`` and
both operands of an attention einsum. :func:`dot_layout` and :func:`conv_layout` read an
operand's axes from ``lax.dot_general`` / ``lax.conv_general_dilated`` dimension numbers.

The binding rules (also in :func:`bind`):

* ``per_channel()`` keeps every axis that is not contracted -- the free (output) axes and the
  batch axes -- and shares a scale over the contracted ones. Batch axes keep their own scales
  because each batch index is an independent product (an attention head, an expert): its
  scale still factors out of that product, and one scale across heads or experts would let
  the largest one set the step of all.
* ``per_block(size)`` blocks a contraction axis: the innermost one (highest index, i.e. last
  in the operand's layout) whose length ``size`` divides, or ``block_axis=`` if given. If no
  contraction axis is a multiple of ``size``, one block spans the whole innermost contraction
  axis (one scale per index of every other axis): blocks never straddle an axis and are never
  padded, so the stored layout stays the operand's own.
* An operand with no contracted axis (an outer product): ``per_channel()`` becomes
  ``per_tensor()`` (one scale per element would just store the array again), ``per_block``
  blocks the last axis.

Every departure from the plain rule (a block moved to another axis, widened to the whole
axis, a per-tensor scale) comes back as a one-line note for the caller to report per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from jax import lax

from jaxquant._src import granularity as gran
from jaxquant._src.checks import check_int, describe
from jaxquant._src.spec import QuantSpec

Operand = Literal["lhs", "rhs"]


def _axes(value: Any, ndim: int, what: str) -> tuple[int, ...]:
    """``value`` as a tuple of distinct non-negative axes of a rank-``ndim`` operand."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, tuple | list):
        raise TypeError(f"{what}: expected a tuple of axes, got {describe(value)}.")
    out = []
    for a in value:
        a = check_int(a, f"{what}: each axis")
        if not -ndim <= a < ndim:
            raise ValueError(
                f"{what}: axis {a} is out of range for an operand of rank {ndim} "
                f"(valid: {-ndim}..{ndim - 1})."
            )
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{what}: axis repeated in {tuple(value)} (rank {ndim}).")
    return tuple(out)


def _check_operand(operand: Any, fn: str) -> Operand:
    if operand not in ("lhs", "rhs"):
        raise ValueError(f"{fn}: operand must be 'lhs' or 'rhs', got {describe(operand)}.")
    return operand


def dot_layout(
    dimension_numbers: Any, operand: Operand, ndim: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(contracting, batch)`` axes of one operand of ``lax.dot_general``.

    Args:
      dimension_numbers: ``((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))``,
        as ``lax.dot_general`` takes them.
      operand: ``"lhs"`` or ``"rhs"``.
      ndim: the operand's rank.

    Returns:
      The operand's contracting and batch axes, non-negative, in the order the dimension
      numbers give them (so lhs and rhs still pair up index by index).

    Raises:
      TypeError / ValueError: malformed dimension numbers, an axis out of range or
      repeated, or an axis both contracted and batched.

    Example:
      >>> dn = (((2,), (0,)), ((), ()))   # x (batch, seq, in) @ kernel (in, out)
      >>> dot_layout(dn, "lhs", 3), dot_layout(dn, "rhs", 2)
      (((2,), ()), ((0,), ()))
      >>> dot_layout((((0, 1), (-1,)), ((), ())), "lhs", 3)
      ((0, 1), ())
    """
    operand = _check_operand(operand, "dot_layout")
    ndim = check_int(ndim, "dot_layout(ndim)", lo=0)
    try:
        (lc, rc), (lb, rb) = dimension_numbers
    except (TypeError, ValueError):
        raise TypeError(
            "dot_layout(dimension_numbers): expected ((lhs_contracting, rhs_contracting), "
            f"(lhs_batch, rhs_batch)) as lax.dot_general takes, got {describe(dimension_numbers)}."
        ) from None
    c, b = (lc, lb) if operand == "lhs" else (rc, rb)
    contracting = _axes(c, ndim, f"dot_layout: {operand} contracting axes")
    batch = _axes(b, ndim, f"dot_layout: {operand} batch axes")
    both = set(contracting) & set(batch)
    if both:
        raise ValueError(
            f"dot_layout: {operand} axes {sorted(both)} are both contracted and batched."
        )
    return contracting, batch


def _conv_letters(layout: str, ndim: int | None) -> tuple[Operand, tuple[int, ...]]:
    """A one-operand conv layout string ('HWIO', 'NHWC', 'OIHW', 'NCHW' ...) as
    (operand, (free axis, feature axis, *spatial axes)) in lax's spec order."""
    up = layout.upper()
    if len(set(up)) != len(up):
        raise ValueError(f"conv_layout: {layout!r} repeats a letter; name each axis once.")
    if "O" in up and "I" in up:
        operand: Operand = "rhs"
        free, feature = up.index("O"), up.index("I")
    elif "N" in up and "C" in up:
        operand = "lhs"
        free, feature = up.index("N"), up.index("C")
    else:
        raise ValueError(
            f"conv_layout: {layout!r} is neither a kernel layout (with 'O' and 'I', e.g. "
            "'HWIO') nor an input layout (with 'N' and 'C', e.g. 'NHWC')."
        )
    if ndim is not None and len(up) != ndim:
        raise ValueError(
            f"conv_layout: {layout!r} names {len(up)} axes but the operand has rank {ndim}."
        )
    spatial = tuple(i for i in range(len(up)) if i not in (free, feature))
    return operand, (free, feature, *spatial)


def conv_layout(
    dimension_numbers: Any, ndim: int, operand: Operand | None = None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(contracting, free)`` axes of the kernel or input of ``lax.conv_general_dilated``.

    A convolution contracts the kernel's input-feature and spatial axes (``I`` and ``HW`` of
    ``HWIO``) and the input's feature and spatial axes (``C`` and ``HW`` of ``NHWC``): a
    scale that varied along a spatial axis would not factor out of the windowed sum. The
    free axis is the kernel's ``O`` or the input's ``N``.

    Args:
      dimension_numbers: one operand's layout string (``"HWIO"``, ``"OIHW"``, ``"NHWC"``,
        ``"NCHW"`` ...; the operand follows from its letters), a ``(lhs, rhs, out)`` tuple of
        such strings, a ``lax.ConvDimensionNumbers``, or ``None`` (lax's default,
        ``NC...`` / ``OI...``).
      ndim: the operand's rank.
      operand: ``"lhs"`` (input) or ``"rhs"`` (kernel); needed unless a single layout
        string says which.

    Returns:
      ``contracting``: the spatial axes in layout order, then the feature axis (``I`` or
      ``C``) last, so ``contracting[-1]`` is the axis blocks should run along
      (``bind(..., block_axis=contracting[-1])``); ``free``: the ``O`` or ``N`` axis.

    Example:
      >>> conv_layout("HWIO", 4), conv_layout("OIHW", 4)
      (((0, 1, 2), (3,)), ((2, 3, 1), (0,)))
      >>> conv_layout(("NHWC", "HWIO", "NHWC"), 4, "lhs")
      ((1, 2, 3), (0,))
      >>> conv_layout(None, 4, "rhs")   # lax's default: OIHW
      ((2, 3, 1), (0,))
    """
    ndim = check_int(ndim, "conv_layout(ndim)", lo=1)
    if operand is not None:
        operand = _check_operand(operand, "conv_layout")
    if isinstance(dimension_numbers, str):
        found, spec = _conv_letters(dimension_numbers, ndim)
        if operand is not None and operand != found:
            raise ValueError(
                f"conv_layout: {dimension_numbers!r} is an {found} layout, but operand={operand!r}."
            )
    else:
        if operand is None:
            raise ValueError(
                "conv_layout: operand='lhs' or 'rhs' is needed with "
                f"{describe(dimension_numbers)}; only a single layout string names its operand."
            )
        idx = 0 if operand == "lhs" else 1
        if dimension_numbers is None:
            spec = tuple(range(ndim))
        elif isinstance(dimension_numbers, lax.ConvDimensionNumbers):
            spec = tuple(dimension_numbers[idx])
        elif (
            isinstance(dimension_numbers, tuple | list)
            and len(dimension_numbers) == 3
            and all(isinstance(s, str) for s in dimension_numbers)
        ):
            found, spec = _conv_letters(dimension_numbers[idx], ndim)
            if found != operand:
                raise ValueError(
                    f"conv_layout: the {operand} layout {dimension_numbers[idx]!r} has the "
                    f"letters of an {found} layout."
                )
        else:
            raise TypeError(
                "conv_layout(dimension_numbers): expected a layout string such as 'HWIO', a "
                "(lhs, rhs, out) tuple of them, a lax.ConvDimensionNumbers or None, got "
                f"{describe(dimension_numbers)}."
            )
        spec = _axes(spec, ndim, f"conv_layout: {operand} dimension numbers")
        if len(spec) != ndim:
            raise ValueError(
                f"conv_layout: the {operand} dimension numbers {spec} name {len(spec)} axes "
                f"but the operand has rank {ndim}."
            )
    free, feature, *spatial = spec
    return (*sorted(spatial), feature), (free,)


def _fmt_axes(axes: Sequence[int]) -> str:
    return "(" + ", ".join(map(str, axes)) + ")"


def bind(
    spec: QuantSpec | None,
    shape: tuple[int, ...],
    contracting: tuple[int, ...],
    batch: tuple[int, ...] = (),
    *,
    block_axis: int | None = None,
) -> tuple[QuantSpec | None, str | None]:
    """``spec`` with explicit axes for an operand of ``shape`` in a contraction.

    ``per_channel()`` becomes ``per_channel(*kept)`` with ``kept`` every axis not in
    ``contracting`` (free and batch axes alike); ``per_block(size)`` becomes
    ``per_block(axis, size)`` along the innermost contraction axis ``size`` divides (see the
    module docstring for the rules and their fallbacks). Explicit granularities, and
    ``spec=None``, come back unchanged.

    Args:
      spec: the operand's QuantSpec, or None (an operand left in float).
      shape: the operand's shape.
      contracting: its contracted axes (negative axes count from the end).
      batch: its batch axes (they keep their own scales, like free axes).
      block_axis: for ``per_block(size)``, the contraction axis to block instead of the
        innermost one ``size`` divides (a conv's feature axis, ``conv_layout(...)[0][-1]``).

    Returns:
      ``(bound_spec, note)``: ``note`` is None when the rule applied as stated, else one line
      saying which fallback was taken, for the caller to report with the layer.

    Raises:
      TypeError / ValueError: a spec that is not a QuantSpec, axes out of range, repeated,
      both contracted and batched, or a ``block_axis`` that is not contracted.

    Example:
      >>> import jaxquant as jq
      >>> w8 = jq.QuantSpec("int8", jq.per_channel())
      >>> print(bind(w8, (64, 128), (0,))[0].granularity)       # Dense kernel (in, out)
      per_channel(1,)
      >>> print(bind(w8, (4, 16, 64), (0, 1))[0].granularity)   # LinearGeneral kernel
      per_channel(2,)
      >>> w4 = jq.QuantSpec("int4", jq.per_block(32))
      >>> print(bind(w4, (3, 3, 64, 128), (0, 1, 2))[0].granularity)  # Conv kernel HWIO
      per_block(2,32)
      >>> bound, note = bind(w4, (4, 16, 64), (0, 1))
      >>> print(bound.granularity); print(note)  # doctest: +ELLIPSIS
      per_block(1,16)
      per_block(32) on (4, 16, 64): no contraction axis ... one block over the whole innermost...
    """
    if spec is None:
        return None, None
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"bind(spec): expected a QuantSpec or None, got {describe(spec)}.")
    if not isinstance(shape, tuple | list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise TypeError(f"bind(shape): expected a tuple of non-negative ints, got {shape!r}.")
    shape = tuple(shape)
    ndim = len(shape)
    contracting = _axes(contracting, ndim, "bind(contracting)")
    batch = _axes(batch, ndim, "bind(batch)")
    if set(contracting) & set(batch):
        raise ValueError(
            f"bind: axes {sorted(set(contracting) & set(batch))} are both contracted and batched."
        )
    if block_axis is not None:
        block_axis = _axes(block_axis, ndim, "bind(block_axis)")[0]
        if block_axis not in contracting:
            raise ValueError(
                f"bind(block_axis): axis {block_axis} is not among the contracting axes "
                f"{contracting} of {shape}; blocks run along a contracted axis."
            )
    g = spec.granularity
    if not gran.follows_layout(g):
        return spec, None
    if isinstance(g, gran.PerChannel):
        if not contracting:
            return spec.replace(granularity=gran.PerTensor()), (
                f"per_channel() on {shape}: no axis is contracted (an outer product), so one "
                "scale per element would store the array again; one scale for the whole "
                "operand (per_tensor)"
            )
        kept = tuple(i for i in range(ndim) if i not in contracting)
        if not kept:  # every axis contracted: one scale per index of no axis, exactly
            return spec.replace(granularity=gran.PerTensor()), None
        return spec.replace(granularity=gran.PerChannel(kept)), None

    assert isinstance(g, gran.PerBlock)  # follows_layout: per_channel() or per_block(size)
    size = g.size
    where = f"per_block({size}) on {shape}"
    if ndim == 0:
        raise ValueError(
            f"{where}: a scalar operand has no axis to block; use per_tensor() for it."
        )
    note = None
    if not contracting:
        axis = ndim - 1
        note = f"{where}: no axis is contracted (an outer product); blocks along the last axis"
        cands: tuple[int, ...] = (axis,)
    elif block_axis is not None:
        axis, cands = block_axis, (block_axis,)
    else:
        cands = tuple(sorted(contracting, reverse=True))
        axis = next((a for a in cands if shape[a] % size == 0), cands[0])
        if axis != cands[0] and shape[axis] % size == 0:
            note = (
                f"{where}: the innermost contraction axis {cands[0]} (length "
                f"{shape[cands[0]]}) is not a multiple of {size}; blocks along contraction "
                f"axis {axis} (length {shape[axis]}) instead"
            )
    if shape[axis] % size:
        axis = cands[0]
        rest = [i for i in range(ndim) if i != axis]
        others = f"one scale per index of axes {_fmt_axes(rest)}" if rest else "one scale"
        if len(cands) == 1:
            what = f"axis {axis} has length {shape[axis]}, not a multiple of {size}"
            if note:  # the outer-product note, continued
                what = f"no axis is contracted and the last {what}"
        else:
            lengths = ", ".join(str(shape[a]) for a in sorted(cands))
            what = (
                f"no contraction axis of {_fmt_axes(sorted(cands))} has a length that is a "
                f"multiple of {size} (lengths {lengths})"
            )
        note = (
            f"{where}: {what}; one block over the whole "
            f"{'innermost contraction ' if len(cands) > 1 else ''}axis {axis} "
            f"({shape[axis]} elements; {others})"
        )
        size = shape[axis]
    return spec.replace(granularity=gran.PerBlock(axis, size)), note
