"""Granularity: which elements share one scale.

A granularity turns an array shape into a *plan*: a (possibly blocked) view of the array
and the axes of that view to reduce over when computing one scale. Scales have the view's
shape with the reduced axes kept as size 1, so they broadcast against the view.

* :func:`per_tensor` -- one scale for the whole array.
* :func:`per_channel` ``(axes)`` -- one scale per index along ``axes`` (e.g. ``-1``: one per
  output channel of a ``(in, out)`` kernel), reduced over every other axis.
* :func:`per_block` ``(axis, size)`` -- ``axis`` is split into contiguous blocks of ``size``;
  one scale per block (and per index of every other axis). Also called per-group.
  ``size`` must divide the axis length: a partial last block is refused with a clear
  error rather than padded, so the layout of values and scales never changes silently.
* :func:`per_token` ``(axis=-1)`` -- one scale per token: reduced over the feature ``axis``
  only (activations of shape ``(..., tokens, features)``).

Layout-relative forms name no axis; they follow the operand's role in a contraction, so one
spec fits a Dense kernel ``(in, out)``, a LinearGeneral kernel ``(heads, head_dim, out)``, a
Conv kernel ``HWIO`` and both operands of an attention einsum:

* ``per_channel()`` -- one scale per index of every axis that is *not contracted*: the output
  axes of a weight, the token axes of an activation, and the batch axes of a batched
  contraction (each head / expert gets its own scales: a batch axis is a set of independent
  products, and a scale along it still factors out of each of them). Only the contracted
  axes share a scale.
* ``per_block(size)`` -- blocks of ``size`` along a contraction axis: the innermost (last in
  the operand's layout) that ``size`` divides. If none does, one block spans the whole
  innermost contraction axis. Either departure from "the innermost axis" is reported.

A contraction binds them to explicit axes (:func:`jaxquant._src.layout.bind`); where no
contraction is known (``jq.quantize``, ``quantize_tree``, ``fake_quant`` ...) ``plan()``
refuses them with a ValueError that says which axes to give.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from jaxquant._src.checks import check_int, describe


class Plan(NamedTuple):
    """How to view an array of ``shape`` for one granularity."""

    shape: tuple[int, ...]  # original shape
    view: tuple[int, ...]  # shape of the blocked view (== shape unless per_block)
    reduce_axes: tuple[int, ...]  # axes of the view that share a scale
    scale_shape: tuple[int, ...]  # view with reduce axes set to 1


def _norm_axis(axis: int, ndim: int, what: str) -> int:
    axis = check_int(axis, f"{what}: axis")
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"{what}: axis {axis} is out of range for an array of rank {ndim} "
            f"(valid: {-ndim}..{ndim - 1}). Pick an axis the array has, or use per_tensor()."
        )
    return axis % ndim


def _plan(shape: tuple[int, ...], view: tuple[int, ...], reduce_axes: tuple[int, ...]) -> Plan:
    scale_shape = tuple(1 if i in reduce_axes else d for i, d in enumerate(view))
    return Plan(tuple(shape), tuple(view), tuple(sorted(reduce_axes)), scale_shape)


@dataclasses.dataclass(frozen=True)
class PerTensor:
    """One scale for the whole array."""

    def plan(self, shape: tuple[int, ...]) -> Plan:
        return _plan(shape, shape, tuple(range(len(shape))))

    def __str__(self) -> str:
        return "per_tensor"


@dataclasses.dataclass(frozen=True)
class PerChannel:
    """One scale per index along ``axes``; every other axis is reduced.

    ``axes=None``: layout-relative, one scale per index of every non-contracted axis of an
    operand; a contraction binds it to explicit axes.
    """

    axes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.axes is None:
            return
        if not isinstance(self.axes, tuple | list):
            raise TypeError(
                f"per_channel(axes): expected a tuple of ints, got {describe(self.axes)}. "
                "Write per_channel(-1) or per_channel(0, 2)."
            )
        axes = tuple(check_int(a, "per_channel(axes): each axis") for a in self.axes)
        if not axes:
            raise ValueError("per_channel(axes): needs at least one axis, e.g. per_channel(-1).")
        if len(set(axes)) != len(axes):
            raise ValueError(
                f"per_channel(axes): axis repeated in {axes}; name each kept axis once."
            )
        object.__setattr__(self, "axes", axes)

    def plan(self, shape: tuple[int, ...]) -> Plan:
        if self.axes is None:
            raise ValueError(
                "per_channel() without axes follows a contraction's layout; here there is "
                f"none (an array of shape {tuple(shape)} on its own): give the axes, e.g. "
                "per_channel(-1) (one scale per output channel of an (in, out) kernel). "
                "Only a contraction (dot_general, einsum, conv) knows which axes it contracts."
            )
        keep = {_norm_axis(a, len(shape), "per_channel") for a in self.axes}
        if len(keep) != len(self.axes):
            raise ValueError(
                f"per_channel(axes): {self.axes} names the same axis twice for an array of "
                f"rank {len(shape)} (negative axes count from the end); name each axis once."
            )
        return _plan(shape, shape, tuple(i for i in range(len(shape)) if i not in keep))

    def __str__(self) -> str:
        if self.axes is None:
            return "per_channel()"
        return f"per_channel{self.axes}"


@dataclasses.dataclass(frozen=True)
class PerBlock:
    """One scale per contiguous block of ``size`` elements along ``axis``.

    ``axis=None``: layout-relative, blocks along an operand's contraction axis; a contraction
    binds it to an explicit axis.
    """

    axis: int | None
    size: int

    def __post_init__(self) -> None:
        if self.axis is not None:
            object.__setattr__(self, "axis", check_int(self.axis, "per_block(axis)"))
        size = check_int(self.size, "per_block(size)")
        if size < 1:
            raise ValueError(
                f"per_block(size): size must be a positive int, got {size}; it is the number "
                "of elements sharing one scale, e.g. 32."
            )
        object.__setattr__(self, "size", size)

    def plan(self, shape: tuple[int, ...]) -> Plan:
        if self.axis is None:
            raise ValueError(
                f"per_block({self.size}) without an axis follows a contraction's layout; here "
                f"there is none (an array of shape {tuple(shape)} on its own): give the axis, "
                f"e.g. per_block(-1, {self.size}). Only a contraction (dot_general, einsum, "
                "conv) knows which axes it contracts."
            )
        ax = _norm_axis(self.axis, len(shape), "per_block")
        n = shape[ax]
        if n % self.size:
            divisors = [d for d in (8, 16, 32, 64, 128, 256) if n % d == 0]
            hint = f" Block sizes that divide it: {divisors}." if divisors else ""
            raise ValueError(
                f"per_block: block size {self.size} does not divide axis {self.axis} of length "
                f"{n} (shape {tuple(shape)}).{hint} Pad the array to a multiple of {self.size}, "
                "or choose another size."
            )
        view = (*shape[:ax], n // self.size, self.size, *shape[ax + 1 :])
        return _plan(shape, view, (ax + 1,))

    def __str__(self) -> str:
        if self.axis is None:
            return f"per_block({self.size})"
        return f"per_block({self.axis},{self.size})"


@dataclasses.dataclass(frozen=True)
class PerToken:
    """One scale per token: reduce over the feature ``axis`` only."""

    axis: int = -1

    def __post_init__(self) -> None:
        object.__setattr__(self, "axis", check_int(self.axis, "per_token(axis)"))

    def plan(self, shape: tuple[int, ...]) -> Plan:
        ax = _norm_axis(self.axis, len(shape), "per_token")
        return _plan(shape, shape, (ax,))

    def __str__(self) -> str:
        return "per_token"


Granularity = PerTensor | PerChannel | PerBlock | PerToken


def follows_layout(granularity: Granularity) -> bool:
    """True for the layout-relative forms, ``per_channel()`` and ``per_block(size)``.

    Example:
      >>> follows_layout(per_channel()), follows_layout(per_channel(-1))
      (True, False)
      >>> follows_layout(per_block(32)), follows_layout(per_block(-1, 32))
      (True, False)
    """
    return (isinstance(granularity, PerChannel) and granularity.axes is None) or (
        isinstance(granularity, PerBlock) and granularity.axis is None
    )


def per_tensor() -> PerTensor:
    """One scale for the whole array.

    Example:
      >>> print(per_tensor())
      per_tensor
    """
    return PerTensor()


def per_channel(*axes: int) -> PerChannel:
    """One scale per index along ``axes`` (e.g. ``per_channel(-1)`` for output channels).

    With no axes, ``per_channel()`` follows the operand's layout in a contraction: one scale
    per index of every axis that is not contracted (a weight's output axes, an activation's
    token axes, the batch axes of a batched product), so one rule fits Dense, DenseGeneral,
    Conv and einsum operands. It needs a contraction to bind it: ``jq.quantize`` and the
    other array-level functions refuse it with a ValueError asking for explicit axes.

    Example:
      >>> print(per_channel(-1), per_channel(0, 2), per_channel())
      per_channel(-1,) per_channel(0, 2) per_channel()
    """
    if len(axes) == 1 and isinstance(axes[0], tuple | list):
        if not axes[0]:
            # per_channel(()) names an empty set of axes: a mistake, not the layout form.
            raise ValueError(
                "per_channel(axes): got an empty list of axes; name at least one, e.g. "
                "per_channel(-1), or call per_channel() with no argument to follow the "
                "contraction's layout."
            )
        axes = tuple(axes[0])
    return PerChannel(tuple(axes) if axes else None)


_UNSET = object()


def per_block(*args: int, axis: int = _UNSET, size: int = _UNSET) -> PerBlock:  # type: ignore[assignment]
    """One scale per block of ``size`` contiguous elements along ``axis`` (per-group).

    ``per_block(axis, size)`` names the axis. ``per_block(size)`` follows the operand's
    layout in a contraction: blocks of ``size`` along its contraction axis (the innermost
    one ``size`` divides; if none, one block over the innermost), so one rule fits Dense,
    DenseGeneral, Conv and einsum operands. It needs a contraction to bind it:
    ``jq.quantize`` and the other array-level functions refuse it with a ValueError asking
    for an explicit axis.

    Example:
      >>> print(per_block(-1, 32), per_block(32), per_block(axis=0, size=16))
      per_block(-1,32) per_block(32) per_block(0,16)
    """
    given = {"axis": axis is not _UNSET, "size": size is not _UNSET}
    if len(args) > 2:
        raise TypeError(
            f"per_block: takes (axis, size) or (size), got {len(args)} positional arguments."
        )
    if len(args) == 2:
        if given["axis"] or given["size"]:
            raise TypeError("per_block: axis/size given both by position and by keyword.")
        # None is the layout form's internal axis; as an argument it is a mistake.
        return PerBlock(check_int(args[0], "per_block(axis)"), args[1])
    if len(args) == 1:
        if given["axis"]:
            raise TypeError(
                "per_block: one positional argument is the block size (per_block(32)) or, "
                "with size=, the axis; got it together with axis=. Write "
                "per_block(axis, size)."
            )
        if given["size"]:
            return PerBlock(check_int(args[0], "per_block(axis)"), size)
        return PerBlock(None, args[0])
    if not given["size"]:
        raise TypeError(
            "per_block: missing the block size; write per_block(32) (blocks along the "
            "contraction axis) or per_block(-1, 32) (along a given axis)."
        )
    return PerBlock(check_int(axis, "per_block(axis)") if given["axis"] else None, size)


def per_token(axis: int = -1) -> PerToken:
    """One scale per token, reducing the feature ``axis`` (default last).

    Example:
      >>> print(per_token())
      per_token
    """
    return PerToken(axis)
