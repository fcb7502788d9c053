"""The one table of layer kinds: Flax's layers whose product jaxquant sets as an attribute.

A Flax layer runs its product through an attribute jaxquant replaces: Linen's ``Dense`` /
``DenseGeneral`` take ``dot_general`` (or ``dot_general_cls``), ``Einsum`` is rebuilt,
``Conv`` takes ``conv_general_dilated``; NNX's ``Linear`` / ``LinearGeneral`` /
``Einsum`` / ``Conv`` the same attributes. Anything else (a subclass that overrides
``__call__`` included) computes its products itself, and the interception
(:mod:`jaxquant._src.flax.intercept`) quantizes them. Both front ends, calibration,
sensitivity and serving read the kinds from here.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
from flax import nnx

from jaxquant._src.flax.rules import path_str

LINEN_DOTS = (nn.Dense, nn.DenseGeneral)
LINEN_LAYERS = (*LINEN_DOTS, nn.Einsum, nn.Conv)
NNX_DOTS = (nnx.Linear, nnx.LinearGeneral)
NNX_LAYERS = (*NNX_DOTS, nnx.Einsum, nnx.Conv)
# one of NNX_LAYERS, as a type
NnxLayer = nnx.Linear | nnx.LinearGeneral | nnx.Einsum | nnx.Conv


def _own_call_kind(cls: type, kinds: tuple[type, ...]) -> type | None:
    for kind in kinds:
        if issubclass(cls, kind):
            return kind if cls.__call__ is kind.__call__ else None
    return None


def linen_kind(m: Any) -> type | None:
    """The Linen layer class whose own ``__call__`` ``m`` runs, or None."""
    return _own_call_kind(type(m), LINEN_LAYERS)


def nnx_kind(node: Any) -> type | None:
    """The NNX layer class whose own ``__call__`` ``node`` runs, or None. (A module whose
    class jaxquant swapped for an intercepting subclass answers for its own class.)"""
    return _own_call_kind(getattr(type(node), "_jq_base", type(node)), NNX_LAYERS)


def nnx_modules(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    """Every module of an NNX graph with its (first) path, parents before children."""
    out, seen = [], set()
    for p, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and id(node) not in seen:
            seen.add(id(node))
            out.append((path_str(p), node))
    return sorted(out, key=lambda t: (t[0].count("/"), t[0]))


def nnx_layers(model: nnx.Module) -> list[tuple[str, NnxLayer]]:
    """The Flax layers of an NNX graph, in graph order."""
    # nnx_kind: the layer runs its own __call__ (so it is one of NNX_LAYERS, which narrows)
    return [
        (path_str(p), node)
        for p, node in nnx.iter_graph(model)
        if isinstance(node, NNX_LAYERS) and nnx_kind(node)
    ]


def kernel_layout(kind: str, m: Any, x_ndim: int, k_ndim: int) -> tuple[Any, tuple[int, ...]]:
    """``(contracting, batch)`` axes of a Flax layer's kernel (``kind``: the layer class
    name: Dense / Linear, DenseGeneral / LinearGeneral, Conv, Einsum); ``(None, ())`` where
    the layout is not known here."""
    if kind in ("Dense", "Linear"):
        return (0,), ()
    if kind in ("DenseGeneral", "LinearGeneral"):
        if getattr(m, "batch_dims", ()):
            return None, ()
        axis = m.axis
        n = len(axis) if isinstance(axis, tuple | list) else 1
        return tuple(range(n)), ()
    if kind == "Conv":
        return tuple(range(k_ndim - 1)), ()  # HWIO: spatial and input features
    if kind == "Einsum" and isinstance(getattr(m, "einsum_str", None), str):
        from jaxquant._src.dot.subscripts import parse

        la, lb, lo = parse(m.einsum_str.replace(" ", ""), x_ndim, k_ndim)
        return (
            tuple(i for i, c in enumerate(lb) if c in la and c not in lo),
            tuple(i for i, c in enumerate(lb) if c in la and c in lo),
        )
    return None, ()
