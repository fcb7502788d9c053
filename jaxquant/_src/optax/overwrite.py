"""Variables overwritten by their gradient: state the backward pass writes (optax wrapper).

A quantized model's backward pass knows things its forward pass cannot: the output
gradient's amax (delayed gradient scaling) and the errors of the backward products.
``jax.grad`` carries them out as the *gradients* of float32 variables whose path has a key
ending with ``"_overwrite_with_gradient"`` (flax's ``OVERWRITE_WITH_GRADIENT``); the new
value of such a variable is its gradient. :func:`overwrite_with_gradient` wraps an optax
transformation so that those leaves are set to their gradient and every other leaf goes
to the wrapped transformation, which never sees them (no Adam moments, weight decay or
gradient clipping on them).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxquant._src.checks import describe
from jaxquant._src.types import PyTree

MARK = "_overwrite_with_gradient"  # flax.linen.fp8_ops.OVERWRITE_WITH_GRADIENT
_COUNT_MAX = 2.0**24  # probe.py's float32 counter limit


class OverwriteWithGradientState(NamedTuple):
    """State of :func:`overwrite_with_gradient`: the wrapped transformation's, whose tree
    holds ``optax.MaskedNode()`` where the overwritten leaves are.

    Example:
      >>> import jax.numpy as jnp, optax, jaxquant as jq
      >>> params = {"w": jnp.ones(2), "h_overwrite_with_gradient": jnp.zeros(3)}
      >>> state = jq.optax.overwrite_with_gradient(optax.sgd(0.1)).init(params)
      >>> type(state).__name__, type(state.inner_state[0]).__name__
      ('OverwriteWithGradientState', 'EmptyState')
    """

    inner_state: optax.OptState


def _key_name(k: Any) -> Any:
    return getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))


def is_overwritten(path: tuple[Any, ...]) -> bool:
    """Whether the leaf at key ``path`` is one the optimizer overwrites: a key of it is a
    string ending with ``"_overwrite_with_gradient"``."""
    return any(isinstance(n, str) and n.endswith(MARK) for n in map(_key_name, path))


def _masked(tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map_with_path(
        lambda p, x: optax.MaskedNode() if is_overwritten(p) else x, tree
    )


def _groups(tree: PyTree) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Overwritten leaves by their parent path: ``{parent: {name: leaf}}``."""
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if is_overwritten(path):
            names = tuple(map(_key_name, path))
            out.setdefault(names[:-1], {})[str(names[-1])] = leaf
    return out


def _uses(new: dict[str, Any], old: dict[str, Any] | None) -> Any:
    """How many calls summed into this group's gradient (1 unless a layer ran several times
    in the step): ``calls`` of an errors group; ``count / (old count + 1)`` of a gradient
    scaling group; else 1."""
    if "calls" in new:
        return jnp.maximum(new["calls"], 1.0)
    if "count" in new and old is not None:
        want = jnp.minimum(old["count"] + 1.0, _COUNT_MAX)
        return jnp.maximum(jnp.round(new["count"] / jnp.maximum(want, 1.0)), 1.0)
    return 1.0


def overwrite_with_gradient(
    inner: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
    """Set the ``"_overwrite_with_gradient"`` variables to their gradient; ``inner``
    updates every other parameter.

    jaxquant's quantized layers keep what their backward pass learns -- the output
    gradient's delayed-scaling amax history (``quantize_model(..., delayed_grad=True)``)
    and per-layer errors (``errors=True``) -- in float32 variables under a key ending with
    ``"_overwrite_with_gradient"`` (in Linen's ``params``; in NNX ``nnx.Param`` variables),
    so that the usual ``jax.grad(loss)(params)`` / ``nnx.grad`` returns them, as their
    gradient, with their new values. This wrapper makes the usual update
    (``optax.apply_updates``, ``TrainState.apply_gradients``, ``nnx.Optimizer.update``)
    write them: their update is ``gradient - param``; ``inner`` is initialised and updated
    on the other leaves only (its tree has ``optax.MaskedNode()`` in their place). The new
    value ``param + (gradient - param)`` is the gradient up to float32 rounding: counts are
    exact, an amax or SQNR may differ from it by an ulp of the larger of the old and new
    value.

    A layer called ``n`` times in a step receives the sum of its ``n`` cotangents; the
    wrapper divides the group by ``n`` (read from its ``calls`` or ``count`` leaf): the
    newest history entry and the errors are then the mean over the calls.

    Wrap outermost (``overwrite_with_gradient(dynamic_loss_scale(adam))``): a
    transformation outside it would unscale, clip or decay the new values.

    Forgetting the wrapper: ``inner`` steps the state like a weight; the next step's
    forward pass finds a gradient count that is not a whole number and poisons the
    gradients of that layer with NaN (so the loss turns NaN at once rather than training
    on garbage scales), see :func:`jaxquant.flax.quantize_model`.

    Args:
      inner: the optimizer of the model's other parameters.

    Returns:
      An optax transformation; its ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, jaxquant.optax as jqo
      >>> params = {"w": jnp.ones(2), "quant": {"_overwrite_with_gradient": {"x": jnp.zeros(())}}}
      >>> grads = {"w": jnp.ones(2), "quant": {"_overwrite_with_gradient": {"x": jnp.array(7.0)}}}
      >>> tx = jqo.overwrite_with_gradient(optax.sgd(0.5))
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> new = optax.apply_updates(params, updates)
      >>> new["w"].tolist(), float(new["quant"]["_overwrite_with_gradient"]["x"])
      ([0.5, 0.5], 7.0)

    References:
      ``flax.linen.fp8_ops`` (``OVERWRITE_WITH_GRADIENT``) and ``flax.training.train_state``;
      NVIDIA Transformer Engine, delayed scaling.
    """
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(
            "overwrite_with_gradient: inner must be an optax.GradientTransformation (e.g. "
            f"optax.adam(1e-3)), got {describe(inner)}."
        )
    inner_ex = optax.with_extra_args_support(inner)

    def init(params: PyTree) -> OverwriteWithGradientState:
        return OverwriteWithGradientState(inner_ex.init(_masked(params)))

    def update(
        updates: PyTree,
        state: OverwriteWithGradientState,
        params: PyTree | None = None,
        **extra: Any,
    ) -> tuple[PyTree, OverwriteWithGradientState]:
        if params is None:
            raise ValueError(
                "overwrite_with_gradient: update needs params (the overwritten variables' "
                "update is gradient - param): call tx.update(grads, opt_state, params)."
            )
        if not isinstance(state, OverwriteWithGradientState):
            raise TypeError(
                "overwrite_with_gradient: the state must come from this transformation's "
                f"init, got {describe(state)}."
            )
        inner_updates, inner_state = inner_ex.update(
            _masked(updates), state.inner_state, _masked(params), **extra
        )
        new_groups, old_groups = _groups(updates), _groups(params)
        uses = {k: _uses(v, old_groups.get(k)) for k, v in new_groups.items()}
        flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
        flat_params = jax.tree.leaves(params)
        # inner_updates holds MaskedNode() (an empty subtree) at the overwritten leaves, so
        # its leaves are the others, in order.
        rest = iter(jax.tree.leaves(inner_updates))
        out = []
        for (path, g), p in zip(flat, flat_params, strict=True):
            if is_overwritten(path):
                names = tuple(map(_key_name, path))
                new = jnp.asarray(g, jnp.float32) / uses[names[:-1]]
                out.append((new - jnp.asarray(p, jnp.float32)).astype(jnp.result_type(p)))
            else:
                out.append(next(rest))
        return jax.tree.unflatten(treedef, out), OverwriteWithGradientState(inner_state)

    return optax.GradientTransformationExtraArgs(init, update)
