"""Quantizing whole pytrees: :func:`quantize_tree` and :func:`dequantize_tree`.

:func:`quantize_tree` walks the tree one leaf at a time. A concrete float leaf is quantized
and, with ``delete=True``, its buffer is freed as soon as its QArray exists; an abstract
leaf (``jax.ShapeDtypeStruct``, e.g. from ``jax.eval_shape(model.init, ...)``) is
materialized by ``load(path, leaf)`` (a checkpoint reader, an initializer), quantized and
dropped. Peak memory is therefore the quantized tree plus one float leaf, not float +
quantized models. Under ``jax.jit`` the leaves are traced arrays and it is a plain map.

Which leaves, with which spec (the ``policy``): a :class:`~jaxquant.QuantSpec` (every float
leaf), a function ``(path, leaf) -> QuantSpec | None``, or an ordered list of
``(regex, spec | None)`` pairs matched with :func:`re.fullmatch` against the ``/``-joined
leaf path (first match wins; a pattern that matches no leaf is an error, so a typo cannot
silently leave a model float).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant._src import rounding
from jaxquant._src.checks import check_bool, describe
from jaxquant._src.qarray import QArray
from jaxquant._src.quantize import quantize
from jaxquant._src.spec import QuantSpec
from jaxquant._src.types import KeyPath, PyTree

LeafSpec = Callable[[KeyPath, Any], QuantSpec | None]
# What quantize_tree's ``policy`` accepts (the module docstring).
LeafPolicy = QuantSpec | LeafSpec | Sequence[tuple[str, QuantSpec | None]]


def _path_str(path: KeyPath) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _dtype(leaf: Any) -> np.dtype[Any]:
    """An array leaf's dtype, or a Python number's (quantized as an array, as before)."""
    if hasattr(leaf, "dtype"):
        return np.dtype(leaf.dtype)
    if isinstance(leaf, int | float) and not isinstance(leaf, bool):
        return np.dtype(jnp.result_type(leaf))
    raise TypeError(f"it is not an array or a number: got {describe(leaf)}")


def _spec_for(policy: QuantSpec | LeafSpec, path: KeyPath, leaf: Any) -> QuantSpec | None:
    """The spec ``policy`` gives ``leaf`` (a bare spec: every floating-point leaf)."""
    if isinstance(policy, QuantSpec):
        is_float = hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)
        return policy if is_float else None
    if not callable(policy):
        raise TypeError(
            "quantize_tree: policy must be a QuantSpec, a function (path, leaf) -> "
            "QuantSpec | None or a list of (regex, QuantSpec | None) pairs, got "
            f"{describe(policy)}."
        )
    spec = policy(path, leaf)
    if spec is not None and not isinstance(spec, QuantSpec):
        raise TypeError(
            f"quantize_tree: the policy returned {spec!r} for {_path_str(path)!r}; it must "
            "return a QuantSpec or None."
        )
    return spec


def _pattern_policy(
    pairs: Sequence[tuple[str, QuantSpec | None]],
) -> tuple[Callable[[KeyPath, Any], QuantSpec | None], Callable[[list[str]], None]]:
    compiled = []
    for item in pairs:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(
                "quantize_tree: a pattern policy is a list of (regex, QuantSpec | None) "
                f"pairs, got {item!r}."
            )
        pattern, spec = item
        if spec is not None and not isinstance(spec, QuantSpec):
            raise TypeError(
                f"quantize_tree: pattern {pattern!r} maps to {spec!r}, not a QuantSpec."
            )
        try:
            compiled.append((re.compile(pattern), spec))
        except re.error as e:
            raise ValueError(f"quantize_tree: {pattern!r} is not a valid regex: {e}.") from None
    used: set[int] = set()

    def policy(path: KeyPath, leaf: Any) -> QuantSpec | None:
        name = _path_str(path)
        for i, (rx, spec) in enumerate(compiled):
            if rx.fullmatch(name):
                used.add(i)
                return spec
        return None

    def check(names: list[str]) -> None:
        missed = [compiled[i][0].pattern for i in range(len(compiled)) if i not in used]
        if missed:
            raise ValueError(
                f"quantize_tree: pattern(s) {missed} matched no leaf. Leaf paths (matched with "
                f"re.fullmatch): {names}. Fix the regex ('.*name.*' for a substring)."
            )

    return policy, check


def quantize_tree(
    tree: PyTree,
    policy: LeafPolicy,
    *,
    load: Callable[[KeyPath, jax.ShapeDtypeStruct], jax.typing.ArrayLike] | None = None,
    delete: bool = False,
    key: jax.Array | None = None,
) -> PyTree:
    """Quantize the leaves ``policy`` selects, one leaf at a time; others pass through.

    Args:
      tree: a pytree of arrays and / or ``jax.ShapeDtypeStruct`` leaves (e.g. Flax params).
      policy: a :class:`QuantSpec` (applied to every floating-point leaf), a function
        ``(path, leaf) -> QuantSpec | None`` (None leaves the leaf as it is), or a list of
        ``(regex, QuantSpec | None)`` pairs over ``/``-joined paths.
      load: ``load(path, abstract_leaf) -> array`` for abstract leaves (required if any);
        its result must have the leaf's shape and dtype.
      delete: free each concrete float leaf that was quantized once its QArray is ready
        (the caller's arrays are deleted: use it when the float tree is no longer needed).
      key: PRNG key for stochastic specs (``fold_in(key, leaf_index)`` per leaf).

    Returns:
      The tree with QArrays in place of quantized leaves and loaded arrays in place of
      abstract leaves that stay float. Leaves that are QArrays already are kept as they
      are (a policy function is not asked about them; a pattern that matches one counts
      as used): quantizing a quantized tree again changes nothing. ``dequantize_tree``
      first to requantize with another spec.

    Raises:
      ValueError / TypeError naming the leaf: an abstract leaf without ``load``, a loaded
      array of the wrong shape or dtype, a pattern that matched no leaf, a spec that does
      not fit its leaf. TypeError: ``delete`` that is not a bool, ``load`` that is not a
      function. ValueError: ``delete=True`` under a transformation (traced leaves).

    Example:
      >>> import jax, jax.numpy as jnp, jaxquant as jq
      >>> abstract = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32),
      ...             "b": jax.ShapeDtypeStruct((64,), jnp.float32)}
      >>> qt = jq.quantize_tree({"w": jnp.ones((4, 4)), "step": jnp.array(3)},
      ...                       jq.QuantSpec("int4"))
      >>> type(qt["w"]).__name__, qt["step"].tolist()
      ('QArray', 3)

      Abstract leaves, materialized one at a time, and a pattern policy:

      >>> abstract = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32),
      ...             "b": jax.ShapeDtypeStruct((64,), jnp.float32)}
      >>> q = jq.quantize_tree(abstract, [("w", jq.QuantSpec("int8"))],
      ...                      load=lambda path, leaf: jnp.ones(leaf.shape, leaf.dtype))
      >>> type(q["w"]).__name__, q["w"].nbytes, q["b"].shape
      ('QArray', 4100, (64,))
    """
    # A truthy non-bool (delete="False") would delete the caller's arrays.
    delete = check_bool(delete, "quantize_tree: delete")
    if load is not None and not callable(load):
        raise TypeError(
            "quantize_tree: load must be None or a function (path, abstract_leaf) -> array, got "
            f"{describe(load)}."
        )
    if key is not None:
        rounding.check_key(key, "quantize_tree: key=")
    check = pattern = None
    leaf_policy: QuantSpec | LeafSpec
    if isinstance(policy, list | tuple):
        pattern, check = _pattern_policy(policy)
        leaf_policy = pattern
    else:  # a list / tuple is the only Sequence accepted; _spec_for refuses the rest
        leaf_policy = cast(QuantSpec | LeafSpec, policy)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda a: isinstance(a, QArray)
    )
    if delete and any(isinstance(leaf, jax.core.Tracer) for _, leaf in leaves):
        raise ValueError(
            "quantize_tree: delete=True frees concrete arrays; under jax.jit / grad / vmap "
            "the leaves are traced. Call it outside the transformation, or pass delete=False."
        )
    # First every check, then the conversion: a bad policy never leaves a half-deleted tree.
    specs: list[QuantSpec | None] = []
    for path, leaf in leaves:
        name = _path_str(path)
        if isinstance(leaf, QArray):  # flattened, its float scale would be quantized
            if pattern is not None:
                pattern(path, leaf)  # a pattern that matches it counts as used
            specs.append(None)
            continue
        try:
            spec = _spec_for(leaf_policy, path, leaf)
            if spec is not None:
                dtype = _dtype(leaf)
                if not jnp.issubdtype(dtype, jnp.floating):
                    raise TypeError(f"its dtype {dtype} is not floating point")
                spec.granularity.plan(tuple(np.shape(leaf)))
        except (TypeError, ValueError) as e:
            raise type(e)(f"quantize_tree at {name!r}: {e}") from None
        if isinstance(leaf, jax.ShapeDtypeStruct) and load is None:
            raise ValueError(
                f"quantize_tree: leaf {name!r} is abstract ({leaf.shape}, {leaf.dtype}); pass "
                "load=(path, leaf) -> array to materialize it."
            )
        specs.append(spec)
    if check is not None:
        check([_path_str(p) for p, _ in leaves])
    out: list[jax.Array | QArray] = []
    for i, ((path, leaf), spec) in enumerate(zip(leaves, specs, strict=True)):
        name = _path_str(path)
        abstract = isinstance(leaf, jax.ShapeDtypeStruct)
        if abstract:
            assert load is not None
            x = jnp.asarray(load(path, leaf))
            if x.shape != tuple(leaf.shape) or np.dtype(x.dtype) != np.dtype(leaf.dtype):
                raise ValueError(
                    f"quantize_tree: load returned {x.shape} {x.dtype} for leaf {name!r}, which is "
                    f"{tuple(leaf.shape)} {np.dtype(leaf.dtype)}."
                )
        else:
            x = leaf
        if spec is None:
            out.append(x)
            continue
        k = None if key is None else jax.random.fold_in(key, i)
        try:
            q = quantize(x, spec, key=k)
        except (TypeError, ValueError) as e:
            raise type(e)(f"quantize_tree at {name!r}: {e}") from None
        if delete and not abstract and isinstance(x, jax.Array):
            jax.block_until_ready(q)
            x.delete()  # this leaf's float copy is gone before the next leaf is converted
        out.append(q)  # a loaded float leaf is dropped here (the loader's own copy stays)
    return jax.tree_util.tree_unflatten(treedef, out)


def dequantize_tree(tree: PyTree) -> PyTree:
    """Replace every QArray in ``tree`` by its dequantized array.

    The inverse of :func:`quantize_tree` up to the quantization error: other leaves pass
    through unchanged.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> params = {"w": jnp.array([[1.27, -0.5]]), "b": jnp.array([0.25])}
      >>> policy = lambda path, x: jq.QuantSpec("int8") if x.ndim == 2 else None
      >>> q = jq.quantize_tree(params, policy)
      >>> isinstance(q["w"], jq.QArray), isinstance(q["b"], jq.QArray)
      (True, False)
      >>> out = jq.dequantize_tree(q)
      >>> out["w"].tolist(), out["b"].tolist()
      ([[1.2699999809265137, -0.5]], [0.25])
    """
    return jax.tree_util.tree_map(
        lambda a: a.dequantize() if isinstance(a, QArray) else a,
        tree,
        is_leaf=lambda a: isinstance(a, QArray),
    )
