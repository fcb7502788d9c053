"""Where per-input-channel scales go: the norm -> layers pairs that a scaling method
(SmoothQuant, AWQ) folds its scales into, and the Linen / NNX variable stores that read a
layer's weight, rescale it, record an online scale, and divide a norm's scale and bias.

The two methods differ in how they choose the scales and in how they judge a norm (AWQ
raises, SmoothQuant keeps the layer's scale online), not in where the scales go: that is
this module, once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant._src.checks import describe
from jaxquant._src.flax.act_transform import COLLECTION, PTQVariable
from jaxquant._src.flax.kinds import nnx_modules


def check_pairs(pairs: Any, fn: str) -> dict[str, tuple[str, ...]] | None:
    """``pairs`` ({norm path: layer path or paths}) as {norm: (layer, ...)}; None stays None.
    ``fn`` names the caller in the error."""
    if pairs is None:
        return None
    if not isinstance(pairs, Mapping):
        raise TypeError(
            f"{fn}: pairs must be a dict {{norm path: [layer paths]}} or None, got "
            f"{describe(pairs)}."
        )
    out = {}
    for norm, layers in pairs.items():
        if isinstance(layers, str):
            layers = (layers,)
        if (
            not isinstance(norm, str)
            or not isinstance(layers, Sequence)
            or not layers
            or not all(isinstance(p, str) for p in layers)
        ):
            raise TypeError(
                f"{fn}: pairs must map a norm path (str) to a non-empty list of layer paths "
                f"(str), got {norm!r}: {describe(layers)}."
            )
        out[norm] = tuple(layers)
    return out


def parts(path: str) -> list[str]:
    """A module or parameter path's keys (``"a/b"`` -> ``["a", "b"]``; empty keys dropped)."""
    return [k for k in path.split("/") if k]


def copy_tree(tree: Any) -> Any:
    """New containers (plain dicts, FrozenDicts unfrozen), the same leaves."""
    if isinstance(tree, Mapping):
        return {k: copy_tree(v) for k, v in tree.items()}
    return tree


def _divided(v: Any, s: jax.Array) -> jax.Array:
    """``v / s`` in float32, back in ``v``'s dtype (``s`` laid out as ``v``)."""
    return (jnp.asarray(v, jnp.float32) / s.reshape(np.shape(v))).astype(jnp.asarray(v).dtype)


class LinenStore:
    """New Linen variables (the caller's untouched): copied containers, replaced leaves."""

    def __init__(self, variables: Mapping[str, Any]) -> None:
        self.vars: dict[str, Any] = copy_tree(variables)

    def _node(self, collection: str, path: str, create: bool = False) -> Any:
        tree: Any = self.vars.setdefault(collection, {}) if create else self.vars.get(collection)
        for k in parts(path):
            if create:
                tree = tree.setdefault(k, {})
            elif not isinstance(tree, Mapping) or k not in tree:
                return None
            else:
                tree = tree[k]
        return tree

    def weight(self, path: str, param: str | None) -> Any:
        node = self._node("params", path)
        for k in parts(param or ""):
            node = node[k]
        return node

    def set_weight(self, path: str, param: str | None, w: jax.Array) -> None:
        *parents, name = parts(param or "")
        node = self._node("params", path)
        for k in parents:
            node = node[k]
        node[name] = w.astype(jnp.asarray(node[name]).dtype)

    def transform(self, path: str) -> tuple[Any, Any]:
        """The layer's (smooth, hadamard) online transforms, None where absent."""
        node = self._node(COLLECTION, path)
        if not isinstance(node, Mapping):
            return None, None
        return node.get("smooth"), node.get("hadamard")

    def set_smooth(self, path: str, smooth: jax.Array) -> None:
        old = self.transform(path)[0]  # an earlier method's scale: the two multiply
        new = smooth if old is None else jnp.asarray(old, jnp.float32) * smooth
        self._node(COLLECTION, path, create=True)["smooth"] = new

    def norm_params(self, norm: str) -> dict[str, Any] | None:
        """The norm module's parameters by name; None when no module there holds any."""
        node = self._node("params", norm)
        return dict(node) if isinstance(node, Mapping) else None

    def fold_norm(self, norm: str, s: jax.Array) -> None:
        """Divide the norm's scale and bias by ``s`` (its readers' rows carry ``s``)."""
        node = self._node("params", norm)
        for name in ("scale", "bias"):
            if name in node:
                node[name] = _divided(node[name], s)

    def result(self) -> Any:
        return self.vars


class NnxStore:
    """The NNX model, changed in place."""

    def __init__(self, model: nnx.Module) -> None:
        self.model = model
        self.nodes = dict(nnx_modules(model))

    def _var(self, path: str, param: str | None) -> Any:
        var: Any = self.nodes[path]
        for k in parts(param or ""):
            var = getattr(var, k)
        return var

    def weight(self, path: str, param: str | None) -> Any:
        return self._var(path, param)[...]

    def set_weight(self, path: str, param: str | None, w: jax.Array) -> None:
        var = self._var(path, param)
        var[...] = w.astype(var[...].dtype)

    def transform(self, path: str) -> tuple[Any, Any]:
        """The layer's (smooth, hadamard) online transforms, None where absent."""
        node = self.nodes.get(path)
        smooth = getattr(node, "ptq_smooth", None)
        signs = getattr(node, "ptq_hadamard", None)
        return (None if smooth is None else smooth[...], None if signs is None else signs[...])

    def set_smooth(self, path: str, smooth: jax.Array) -> None:
        node = self.nodes[path]
        old = getattr(node, "ptq_smooth", None)
        if old is None:
            setattr(node, "ptq_smooth", PTQVariable(smooth))  # noqa: B010 (any NNX module)
        else:
            old[...] = jnp.asarray(old[...], jnp.float32) * smooth

    def _norm_vars(self, norm: str) -> dict[str, Any] | None:
        node = self.nodes.get(norm)
        if node is None:
            return None
        # A norm built with use_scale / use_bias False holds None there: nothing to divide.
        return {
            name: getattr(node, name)
            for name in ("scale", "bias")
            if isinstance(getattr(node, name, None), nnx.Variable)
        }

    def norm_params(self, norm: str) -> dict[str, Any] | None:
        """The norm module's scale and bias values by name; None when there is no module."""
        got = self._norm_vars(norm)
        return None if got is None else {k: v[...] for k, v in got.items()}

    def fold_norm(self, norm: str, s: jax.Array) -> None:
        """Divide the norm's scale and bias by ``s`` (its readers' rows carry ``s``)."""
        for var in (self._norm_vars(norm) or {}).values():
            var[...] = _divided(var[...], s)

    def result(self) -> Any:
        return self.model
