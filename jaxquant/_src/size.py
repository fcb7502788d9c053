"""Storage size of a (partly) quantized pytree: bytes per leaf and in total, against float32.

Sizes are computed from shapes and dtypes only, so the report works on real arrays and on
abstract trees alike (``jax.eval_shape(lambda p: jq.quantize_tree(p, policy), params)``:
the size of a conversion before doing it). A :class:`~jaxquant.QArray` counts its stored
values (packed sub-byte codes at their true size), its scales and its zero points; other
array leaves count their own bytes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from jaxquant._src.checks import describe
from jaxquant._src.qarray import QArray
from jaxquant._src.types import PyTree


def _bytes(a: Any) -> int:
    return int(math.prod(a.shape)) * np.dtype(a.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class LeafSize:
    """One leaf: ``path``, element count, format name, and bytes of its stored values,
    scales (with zero points) and in total; ``float32`` is 4 bytes per element."""

    path: str
    size: int
    format: str
    value_bytes: int
    scale_bytes: int

    @property
    def nbytes(self) -> int:
        return self.value_bytes + self.scale_bytes

    @property
    def float32_bytes(self) -> int:
        return 4 * self.size

    @property
    def bits_per_value(self) -> float:
        return 8.0 * self.nbytes / max(self.size, 1)


@dataclasses.dataclass(frozen=True)
class SizeReport:
    """Per-leaf sizes and totals; ``str(report)`` is a markdown table.

    Made by :func:`size_report`. ``leaves`` holds one ``LeafSize`` per leaf (``path``,
    ``size``, ``format``, ``value_bytes``, ``scale_bytes``, ``nbytes``); ``nbytes``,
    ``float32_bytes`` and ``saving`` (``1 - nbytes / float32_bytes``) are the totals.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> tree = {"w": jq.quantize(jnp.ones((4, 64)), jq.QuantSpec("int8")), "b": jnp.ones(4)}
      >>> report = jq.size_report(tree)
      >>> report.nbytes, report.float32_bytes
      (276, 1040)
      >>> print(report)
      | leaf | format | elements | values B | scales B | total B | bits/value | vs fp32 |
      |---|---|--:|--:|--:|--:|--:|--:|
      | b | float32 | 4 | 16 | 0 | 16 | 32 | +0.0% |
      | w | int8 | 256 | 256 | 4 | 260 | 8.12 | -74.6% |
      | **total** |  | 260 | 272 | 4 | 276 | 8.49 | -73.5% |
    """

    leaves: tuple[LeafSize, ...]

    def __post_init__(self) -> None:
        leaves = self.leaves
        if not isinstance(leaves, tuple | list) or not all(
            isinstance(leaf, LeafSize) for leaf in leaves
        ):
            raise TypeError(
                f"SizeReport: leaves must be a tuple of LeafSize, got {describe(leaves)}. "
                "Build reports with jq.size_report(tree)."
            )
        object.__setattr__(self, "leaves", tuple(leaves))

    @property
    def nbytes(self) -> int:
        return sum(leaf.nbytes for leaf in self.leaves)

    @property
    def value_bytes(self) -> int:
        return sum(leaf.value_bytes for leaf in self.leaves)

    @property
    def scale_bytes(self) -> int:
        return sum(leaf.scale_bytes for leaf in self.leaves)

    @property
    def float32_bytes(self) -> int:
        return sum(leaf.float32_bytes for leaf in self.leaves)

    @property
    def saving(self) -> float:
        """``1 - nbytes / float32_bytes``: 0.75 for int8 values without scales."""
        return 1.0 - self.nbytes / max(self.float32_bytes, 1)

    def __str__(self) -> str:
        rows = [
            "| leaf | format | elements | values B | scales B | total B | bits/value | vs fp32 |",
            "|---|---|--:|--:|--:|--:|--:|--:|",
        ]
        for x in (*self.leaves, None):
            if x is None:
                name, fmt, n = "**total**", "", sum(leaf.size for leaf in self.leaves)
                vb, sb, tb, f32 = (
                    self.value_bytes,
                    self.scale_bytes,
                    self.nbytes,
                    self.float32_bytes,
                )
            else:
                name, fmt, n = x.path, x.format, x.size
                vb, sb, tb, f32 = x.value_bytes, x.scale_bytes, x.nbytes, x.float32_bytes
            bits = 8.0 * tb / max(n, 1)
            rows.append(
                f"| {name} | {fmt} | {n} | {vb} | {sb} | {tb} | {bits:.3g} | "
                f"{(tb / max(f32, 1) - 1) * 100:+.1f}% |"
            )
        return "\n".join(rows)


def size_report(tree: PyTree) -> SizeReport:
    """Bytes of every leaf of ``tree`` (arrays, QArrays, or their abstract shapes).

    Returns:
      A :class:`SizeReport`: ``.leaves`` (path, elements, format, value / scale bytes),
      ``.nbytes``, ``.float32_bytes``, ``.saving``; ``print(report)`` gives a table.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> params = {"w": jnp.ones((256, 256)), "b": jnp.ones((256,))}
      >>> spec = jq.QuantSpec("int4", jq.per_block(-1, 64))
      >>> q = jq.quantize_tree(params, lambda path, x: spec if x.ndim == 2 else None)
      >>> r = jq.size_report(q)
      >>> [(leaf.path, leaf.value_bytes, leaf.scale_bytes) for leaf in r.leaves]
      [('b', 1024, 0), ('w', 32768, 4096)]
      >>> round(r.saving, 4)
      0.856
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, QArray))[0]
    out = []
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        if isinstance(leaf, QArray):
            scale = _bytes(leaf.scale) + (0 if leaf.zero_point is None else _bytes(leaf.zero_point))
            scale += 0 if leaf.tensor_scale is None else _bytes(leaf.tensor_scale)  # NVFP4
            out.append(
                LeafSize(
                    name,
                    int(math.prod(leaf.shape)),
                    leaf.spec.format.name,
                    _bytes(leaf.values),
                    scale,
                )
            )
        elif hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            out.append(
                LeafSize(
                    name, int(math.prod(leaf.shape)), np.dtype(leaf.dtype).name, _bytes(leaf), 0
                )
            )
        else:
            raise TypeError(
                f"size_report: leaf {name!r} is a {type(leaf).__name__}, not an array, "
                "QArray or jax.ShapeDtypeStruct."
            )
    return SizeReport(tuple(out))
