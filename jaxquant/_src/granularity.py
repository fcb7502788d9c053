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
    """One scale per index along ``axes``; every other axis is reduced."""

    axes: tuple[int, ...]

    def __post_init__(self) -> None:
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
        keep = {_norm_axis(a, len(shape), "per_channel") for a in self.axes}
        if len(keep) != len(self.axes):
            raise ValueError(
                f"per_channel(axes): {self.axes} names the same axis twice for an array of "
                f"rank {len(shape)} (negative axes count from the end); name each axis once."
            )
        return _plan(shape, shape, tuple(i for i in range(len(shape)) if i not in keep))

    def __str__(self) -> str:
        return f"per_channel{self.axes}"


@dataclasses.dataclass(frozen=True)
class PerBlock:
    """One scale per contiguous block of ``size`` elements along ``axis``."""

    axis: int
    size: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "axis", check_int(self.axis, "per_block(axis)"))
        size = check_int(self.size, "per_block(size)")
        if size < 1:
            raise ValueError(
                f"per_block(size): size must be a positive int, got {size}; it is the number "
                "of elements sharing one scale, e.g. 32."
            )
        object.__setattr__(self, "size", size)

    def plan(self, shape: tuple[int, ...]) -> Plan:
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


def per_tensor() -> PerTensor:
    """One scale for the whole array."""
    return PerTensor()


def per_channel(*axes: int) -> PerChannel:
    """One scale per index along ``axes`` (e.g. ``per_channel(-1)`` for output channels)."""
    if len(axes) == 1 and isinstance(axes[0], tuple | list):
        axes = tuple(axes[0])
    return PerChannel(tuple(axes))


def per_block(axis: int, size: int) -> PerBlock:
    """One scale per block of ``size`` contiguous elements along ``axis`` (per-group)."""
    return PerBlock(axis, size)


def per_token(axis: int = -1) -> PerToken:
    """One scale per token, reducing the feature ``axis`` (default last)."""
    return PerToken(axis)
