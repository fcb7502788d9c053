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
* :func:`per_block_2d` ``(size, axes=(-2, -1))`` -- two-dimensional blocks: both ``axes`` are
  split into contiguous blocks (16 x 16 by default) and each tile shares one scale. A tile's
  scale does not depend on which of its two axes a product contracts, so a weight quantized
  with 2-D blocks has the same values in the forward product (contracting its input axis)
  and in the transposed backward one (contracting its output axis): NVFP4 training's weights
  (https://arxiv.org/abs/2509.25149, section 4.3). ``quantize(w.T)`` with the transposed
  axes gives exactly ``quantize(w).T``.

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
class PerBlock2D:
    """One scale per ``sizes[0] x sizes[1]`` tile of the two ``axes`` (2-D block scaling).

    Invariants: ``axes`` two distinct ints (negative ones count from the end), ``sizes`` two
    positive ints, ``sizes[i]`` the block length along ``axes[i]``. Every other axis keeps
    one scale per index. Each size must divide its axis' length (a partial tile is refused,
    as :class:`PerBlock` refuses a partial block).
    """

    axes: tuple[int, int] = (-2, -1)
    sizes: tuple[int, int] = (16, 16)

    def __post_init__(self) -> None:
        for name in ("axes", "sizes"):
            v = getattr(self, name)
            if not isinstance(v, tuple | list) or len(v) != 2:
                raise TypeError(
                    f"per_block_2d({name}): expected two ints, got {describe(v)}; e.g. "
                    "per_block_2d(16, axes=(0, 1)) for 16 x 16 tiles of an (in, out) kernel."
                )
        axes = tuple(check_int(a, "per_block_2d(axes): each axis") for a in self.axes)
        sizes = tuple(check_int(n, "per_block_2d(size): each size") for n in self.sizes)
        if min(sizes) < 1:
            raise ValueError(
                f"per_block_2d(size): block sizes must be positive ints, got {sizes}; they "
                "are the tile's extent along each axis, e.g. 16 (16 x 16 tiles)."
            )
        if axes[0] == axes[1]:
            raise ValueError(
                f"per_block_2d(axes): the two axes must differ, got {axes}; for blocks "
                f"along one axis use per_block({axes[0]}, size)."
            )
        object.__setattr__(self, "axes", axes)
        object.__setattr__(self, "sizes", sizes)

    def plan(self, shape: tuple[int, ...]) -> Plan:
        ndim = len(shape)
        if ndim < 2:
            raise ValueError(
                f"per_block_2d: an array of shape {tuple(shape)} has fewer than two axes to "
                "tile; use per_block(axis, size) or per_tensor() for it."
            )
        axes = [_norm_axis(a, ndim, "per_block_2d") for a in self.axes]
        if axes[0] == axes[1]:
            raise ValueError(
                f"per_block_2d(axes): {self.axes} name the same axis of an array of rank "
                f"{ndim} (negative axes count from the end); name two different axes."
            )
        for a, size, given in zip(axes, self.sizes, self.axes, strict=True):
            if shape[a] % size:
                divisors = [d for d in (8, 16, 32, 64, 128) if shape[a] % d == 0]
                hint = f" Block sizes that divide it: {divisors}." if divisors else ""
                raise ValueError(
                    f"per_block_2d: block size {size} does not divide axis {given} of length "
                    f"{shape[a]} (shape {tuple(shape)}).{hint} Pad that axis to a multiple "
                    f"of {size}, choose another size, or keep the array in higher precision."
                )
        # Split each tiled axis a into (a_blocks, a_in_block); the second is reduced.
        order = sorted(zip(axes, self.sizes, strict=True))
        view: list[int] = []
        reduce: list[int] = []
        tiled = dict(order)
        for i, n in enumerate(shape):
            if i in tiled:
                view += [n // tiled[i], tiled[i]]
                reduce.append(len(view) - 1)
            else:
                view.append(n)
        return _plan(shape, tuple(view), tuple(reduce))

    def __str__(self) -> str:
        size = self.sizes[0] if self.sizes[0] == self.sizes[1] else self.sizes
        return f"per_block_2d({size}, axes={self.axes})"


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


Granularity = PerTensor | PerChannel | PerBlock | PerBlock2D | PerToken


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


def per_block_2d(
    size: int | tuple[int, int] = 16, *, axes: tuple[int, int] = (-2, -1)
) -> PerBlock2D:
    """One scale per 2-D tile: ``axes`` split into blocks of ``size`` (16 x 16 by default).

    ``size`` is one int (square tiles) or a pair, the block length along ``axes[0]`` and
    ``axes[1]``. The default axes are the last two, the matrix of a Dense kernel
    ``(in, out)``, a LinearGeneral kernel's ``(head_dim, out)`` or an activation's
    ``(tokens, features)``. Because a tile's one scale covers both axes, a product that
    contracts either axis sees the same quantized values: NVFP4 training quantizes weights
    with 16 x 16 tiles so that the forward product (contracting the input axis) and the
    backward ``dgrad`` product (contracting the output axis) use the same weight (NVIDIA,
    https://arxiv.org/abs/2509.25149). ``quantize(w.T, spec with axes reversed)`` equals
    ``quantize(w).T`` exactly. Works with every format, including MX (one e8m0 scale per
    tile) and NVFP4 (an e4m3 scale per tile and the float32 per-tensor scale).

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> print(jq.per_block_2d(), jq.per_block_2d((16, 32), axes=(0, 1)))
      per_block_2d(16, axes=(-2, -1)) per_block_2d((16, 32), axes=(0, 1))
      >>> w = jnp.arange(32 * 48, dtype=jnp.float32).reshape(32, 48)
      >>> q = jq.quantize(w, jq.QuantSpec("int8", jq.per_block_2d(16)))
      >>> q.scale.shape  # one scale per 16 x 16 tile: 2 x 3 tiles
      (2, 1, 3, 1)
      >>> qt = jq.quantize(w.T, jq.QuantSpec("int8", jq.per_block_2d(16)))
      >>> bool((jq.dequantize(qt) == jq.dequantize(q).T).all())
      True

    References:
      NVIDIA, "Pretraining Large Language Models with NVFP4",
      https://arxiv.org/abs/2509.25149
    """
    pair = size if isinstance(size, tuple | list) else (size, size)
    return PerBlock2D(tuple(axes), tuple(pair))  # type: ignore[arg-type]


def per_token(axis: int = -1) -> PerToken:
    """One scale per token, reducing the feature ``axis`` (default last).

    Example:
      >>> print(per_token())
      per_token
    """
    return PerToken(axis)
