"""Dynamic loss scaling as an optax wrapper (Micikevicius et al. 2017).

Every configuration value is a static closure constant of the transformation; every array
lives in the :class:`LossScaleState` NamedTuple, so nothing is lost through ``jax.jit``,
``jax.tree_util.tree_map`` or ``flax.serialization`` (unlike a hand-written
``tree_flatten``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

_INT32_MAX = int(np.iinfo(np.int32).max)


class LossScaleState(NamedTuple):
    """State of :func:`dynamic_loss_scale`."""

    scale: jax.Array  # float32[], the current loss scale, in [min_scale, max_scale]
    good_steps: jax.Array  # int32[], consecutive finite steps since the last change; saturates
    inner_state: optax.OptState  # the wrapped transformation's state


def all_finite(tree: Any) -> jax.Array:
    """``True`` (a bool[] array) iff every element of every leaf of ``tree`` is finite.

    Integer and boolean leaves count as finite; an empty tree is finite.

    Example:
      >>> import jax.numpy as jnp
      >>> bool(all_finite({"a": jnp.ones(3), "b": jnp.array([1.0, jnp.inf])}))
      False
    """
    leaves = jax.tree_util.tree_leaves(tree)
    ok = [
        jnp.all(jnp.isfinite(x)) for x in leaves if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    if not ok:
        return jnp.array(True)
    return jnp.all(jnp.stack(ok))


def scale_loss(loss: jax.typing.ArrayLike, state: LossScaleState) -> jax.Array:
    """``loss * scale``, computed in float32 and returned in ``loss``'s dtype.

    Differentiate this (not ``loss``) and pass the gradients to the update of
    :func:`dynamic_loss_scale`. A scaled loss too large for its dtype becomes Inf, its
    gradients are not finite, and the update backs off.
    """
    loss = jnp.asarray(loss)
    if not jnp.issubdtype(loss.dtype, jnp.floating):
        raise TypeError(f"scale_loss: expected a floating-point loss, got dtype {loss.dtype}.")
    if not isinstance(state, LossScaleState):
        raise TypeError(
            "scale_loss: expected the LossScaleState of dynamic_loss_scale (the outermost "
            f"transformation), got {type(state).__name__}."
        )
    return (loss.astype(jnp.float32) * state.scale.astype(jnp.float32)).astype(loss.dtype)


def _check_config(
    initial_scale: float,
    growth_interval: int,
    growth_factor: float,
    backoff_factor: float,
    min_scale: float,
    max_scale: float,
) -> None:
    if not 0.0 < min_scale <= initial_scale <= max_scale < float(np.finfo(np.float32).max):
        raise ValueError(
            "dynamic_loss_scale: need 0 < min_scale <= initial_scale <= max_scale < float32 "
            f"max, got min_scale={min_scale}, initial_scale={initial_scale}, "
            f"max_scale={max_scale}."
        )
    if isinstance(growth_interval, bool) or not isinstance(growth_interval, int | np.integer):
        raise TypeError(
            f"dynamic_loss_scale: growth_interval must be an int, got {growth_interval!r}."
        )
    if growth_interval < 1:
        raise ValueError(
            f"dynamic_loss_scale: growth_interval must be >= 1, got {growth_interval}."
        )
    if not growth_factor >= 1.0:
        raise ValueError(f"dynamic_loss_scale: growth_factor must be >= 1, got {growth_factor}.")
    if not 0.0 < backoff_factor <= 1.0:
        raise ValueError(
            f"dynamic_loss_scale: backoff_factor must be in (0, 1], got {backoff_factor}."
        )


def dynamic_loss_scale(
    inner: optax.GradientTransformation,
    *,
    initial_scale: float = 2.0**15,
    growth_interval: int = 2000,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    min_scale: float = 1.0,
    max_scale: float = 2.0**24,
    unscale_dtype: jax.typing.DTypeLike | None = jnp.float32,
) -> optax.GradientTransformationExtraArgs:
    """Wrap ``inner`` with dynamic loss scaling.

    The caller differentiates ``scale_loss(loss, state)`` = ``S * loss``; ``update`` gets
    the scaled gradients ``g_s = S * g`` and:

    * if every ``g_s`` is finite: passes ``g = g_s / S`` (in ``unscale_dtype``) to ``inner``,
      returns its updates and state, and counts a good step ``n <- n + 1``; when
      ``n == growth_interval``: ``S <- min(S * growth_factor, max_scale)``, ``n <- 0``;
    * otherwise: returns zero updates, keeps ``inner``'s state unchanged,
      ``S <- max(S * backoff_factor, min_scale)``, ``n <- 0``.

    ``inner``'s new state is cast back to the dtypes of its previous state (adam's bf16
    moments for bf16 parameters stay bf16 although the unscaled gradients are float32), so
    the state's shapes and dtypes never change from step to step: a ``jax.lax.scan`` over
    steps compiles, and a checkpoint restores with ``init``'s state as its target.

    ``S`` is never below ``min_scale > 0``, so the unscaling never divides by zero.
    ``growth_interval > 2**31 - 1`` disables growth (the counter saturates there).
    Use it as the outermost transformation so that its state is the one :func:`scale_loss`
    reads.

    Args:
      inner: the optimizer to wrap (e.g. ``optax.adam(1e-3)``).
      initial_scale: the first loss scale ``S``.
      growth_interval: consecutive finite steps before ``S`` grows.
      growth_factor: ``S``'s growth factor (>= 1).
      backoff_factor: ``S``'s factor after a non-finite step, in (0, 1].
      min_scale: floor of ``S`` (> 0).
      max_scale: cap of ``S``.
      unscale_dtype: the dtype of the unscaled gradients handed to ``inner`` (float32
        default, as the fp32 master gradients of mixed-precision training: fp16 gradients
        unscaled back into fp16 would underflow again); ``None`` keeps each gradient's dtype.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`LossScaleState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> opt = dynamic_loss_scale(optax.sgd(0.1), initial_scale=4.0)
      >>> params = jnp.array([1.0]); state = opt.init(params)
      >>> loss = lambda p: jnp.sum(p**2)
      >>> grads = jax.grad(lambda p: scale_loss(loss(p), state))(params)
      >>> updates, state = opt.update(grads, state, params)
      >>> round(float(optax.apply_updates(params, updates)[0]), 6), float(state.scale)
      (0.8, 4.0)

    References:
      Micikevicius et al., 2017, Mixed Precision Training, https://arxiv.org/abs/1710.03740
    """
    _check_config(
        initial_scale, growth_interval, growth_factor, backoff_factor, min_scale, max_scale
    )
    initial_scale, growth_factor, backoff_factor = (
        float(initial_scale),
        float(growth_factor),
        float(backoff_factor),
    )
    min_scale, max_scale = float(min_scale), float(max_scale)
    growth_interval = int(growth_interval)
    out_dtype = None if unscale_dtype is None else jnp.dtype(unscale_dtype)

    def init_fn(params: optax.Params) -> LossScaleState:
        return LossScaleState(
            scale=jnp.asarray(initial_scale, jnp.float32),
            good_steps=jnp.asarray(0, jnp.int32),
            inner_state=inner.init(params),
        )

    def update_fn(
        updates: optax.Updates,
        state: LossScaleState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, LossScaleState]:
        scale = state.scale.astype(jnp.float32)
        finite = all_finite(updates)

        def unscale(g):
            if g is None:
                return None
            g = jnp.asarray(g)
            if not jnp.issubdtype(g.dtype, jnp.floating):
                return g
            dtype = g.dtype if out_dtype is None else out_dtype
            # Zeros instead of Inf/NaN keep the (discarded) inner update quiet.
            g32 = jnp.where(finite, g.astype(jnp.float32), jnp.zeros((), jnp.float32))
            return (g32 / scale).astype(dtype)

        grads = jax.tree_util.tree_map(unscale, updates, is_leaf=lambda x: x is None)
        new_updates, new_inner = optax.with_extra_args_support(inner).update(
            grads, state.inner_state, params, **extra_args
        )

        def select(new, old):
            # The unscaled gradients are float32 (unscale_dtype), so an inner state kept in
            # the parameters' dtype (adam's bf16 moments for bf16 params) would come back
            # float32: cast it back, or the state's type changes after one step (lax.scan
            # over steps fails, a restore with the initial state as target refuses).
            new, old = jnp.asarray(new), jnp.asarray(old)
            return jnp.where(finite, new.astype(old.dtype), old)

        def zero(u):
            return None if u is None else jnp.zeros_like(u)

        out_updates = jax.tree_util.tree_map(
            lambda u: None if u is None else jnp.where(finite, u, zero(u)),
            new_updates,
            is_leaf=lambda x: x is None,
        )
        inner_state = jax.tree_util.tree_map(select, new_inner, state.inner_state)

        good = state.good_steps.astype(jnp.int32)
        good = jnp.where(good < _INT32_MAX, good + 1, good)  # saturating increment
        if growth_interval <= _INT32_MAX:
            grow = good >= growth_interval
        else:
            grow = jnp.array(False)
        grown = jnp.minimum(scale * growth_factor, max_scale)
        shrunk = jnp.maximum(scale * backoff_factor, min_scale)
        new_scale = jnp.where(finite, jnp.where(grow, grown, scale), shrunk)
        zero_i = jnp.zeros((), jnp.int32)
        new_good = jnp.where(finite & ~grow, good, zero_i)
        return out_updates, LossScaleState(
            scale=new_scale.astype(jnp.float32),
            good_steps=new_good,
            inner_state=inner_state,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
