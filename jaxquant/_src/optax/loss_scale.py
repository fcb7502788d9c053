"""Dynamic loss scaling as an optax wrapper (Micikevicius et al. 2017).

Every configuration value is a static closure constant of the transformation; every array
lives in the :class:`LossScaleState` NamedTuple, so nothing is lost through ``jax.jit``,
``jax.tree_util.tree_map`` or ``flax.serialization`` (unlike a hand-written
``tree_flatten``).
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxquant._src.checks import check_int, check_real, describe
from jaxquant._src.qarray import QArray
from jaxquant._src.types import PyTree

_INT32_MAX = int(np.iinfo(np.int32).max)


class LossScaleState(NamedTuple):
    """State of :func:`dynamic_loss_scale`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jaxquant.optax as jqo
      >>> opt = jqo.dynamic_loss_scale(optax.sgd(0.1), initial_scale=2.0**15)
      >>> params = jnp.ones(2, jnp.float16)
      >>> state = opt.init(params)
      >>> float(state.scale), int(state.good_steps)
      (32768.0, 0)
      >>> grads = jnp.array([jnp.inf, 1.0], jnp.float16)  # the scaled gradient overflowed
      >>> updates, state = jax.jit(opt.update)(grads, state, params)
      >>> updates.tolist(), float(state.scale)  # step skipped, scale halved
      ([0.0, 0.0], 16384.0)
    """

    scale: jax.Array  # float32[], the current loss scale, in [min_scale, max_scale]
    good_steps: jax.Array  # int32[], consecutive finite steps since the last change; saturates
    inner_state: optax.OptState  # the wrapped transformation's state


def all_finite(tree: PyTree) -> jax.Array:
    """``True`` (a bool[] array) iff every element of every leaf of ``tree`` is finite.

    Integer and boolean leaves count as finite; an empty tree is finite.

    Example:
      >>> import jax.numpy as jnp
      >>> bool(all_finite({"a": jnp.ones(3), "b": jnp.array([1.0, jnp.inf])}))
      False
    """
    leaves_with_path = jax.tree_util.tree_flatten_with_path(tree)[0]
    for path, x in leaves_with_path:
        if not _is_array_like(x):
            raise TypeError(
                f"all_finite: the leaf of tree at {jax.tree_util.keystr(path)} is "
                f"{describe(x)}, not an array or a number."
            )
    leaves = [x for _, x in leaves_with_path]
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

    Args:
      loss: the loss, a floating-point scalar (or array).
      state: the :class:`LossScaleState` of :func:`dynamic_loss_scale` (its ``scale``).

    Example:
      >>> import jax.numpy as jnp, optax, jaxquant.optax as jqo
      >>> state = jqo.dynamic_loss_scale(optax.sgd(0.1), initial_scale=2.0**15).init(jnp.ones(2))
      >>> float(jqo.scale_loss(jnp.float32(3.0), state))
      98304.0
      >>> jqo.scale_loss(jnp.float16(3.0), state)  # beyond float16's 65504: the step backs off
      Array(inf, dtype=float16)
    """
    if not _is_array_like(loss) or isinstance(loss, bool | QArray):
        raise TypeError(
            f"scale_loss: loss must be a floating-point scalar or array, got {describe(loss)}."
        )
    loss = jnp.asarray(loss)
    if not jnp.issubdtype(loss.dtype, jnp.floating):
        raise TypeError(f"scale_loss: expected a floating-point loss, got dtype {loss.dtype}.")
    if not isinstance(state, LossScaleState):
        raise TypeError(
            "scale_loss: expected the LossScaleState of dynamic_loss_scale (the outermost "
            f"transformation), got {type(state).__name__}."
        )
    scale = state.scale
    if not (hasattr(scale, "dtype") and jnp.issubdtype(scale.dtype, jnp.floating)):
        raise TypeError(
            "scale_loss: LossScaleState.scale must be a float32 scalar array, got "
            f"{describe(scale)}; take the state from dynamic_loss_scale's init / update."
        )
    return (loss.astype(jnp.float32) * scale.astype(jnp.float32)).astype(loss.dtype)


def _is_array_like(x: Any) -> bool:
    """An array, a tracer, a ShapeDtypeStruct or a number (what jnp can take as data)."""
    if isinstance(x, str | bytes) or x is None:
        return False
    return hasattr(x, "dtype") or isinstance(x, numbers.Number)


def _check_config(
    initial_scale: Any,
    growth_interval: Any,
    growth_factor: Any,
    backoff_factor: Any,
    min_scale: Any,
    max_scale: Any,
) -> tuple[float, int, float, float, float, float]:
    """The static configuration, checked (types first) and as Python numbers."""
    f32_max = float(np.finfo(np.float32).max)
    fn = "dynamic_loss_scale"
    min_scale = check_real(min_scale, f"{fn}: min_scale", gt=0.0)
    max_scale = check_real(max_scale, f"{fn}: max_scale", gt=0.0)
    initial_scale = check_real(initial_scale, f"{fn}: initial_scale", gt=0.0)
    if not min_scale <= initial_scale <= max_scale < f32_max:
        raise ValueError(
            f"{fn}: need 0 < min_scale <= initial_scale <= max_scale < float32 max, got "
            f"min_scale={min_scale}, initial_scale={initial_scale}, max_scale={max_scale}."
        )
    # Above 2**31 - 1 the int32 counter saturates first: growth is off. Larger than any
    # 64-bit count is a mistake, not a setting.
    growth_interval = check_int(growth_interval, f"{fn}: growth_interval", lo=1, hi=2**63 - 1)
    growth_factor = check_real(growth_factor, f"{fn}: growth_factor", ge=1.0)
    backoff_factor = check_real(backoff_factor, f"{fn}: backoff_factor", gt=0.0, le=1.0)
    return initial_scale, growth_interval, growth_factor, backoff_factor, min_scale, max_scale


def _float_dtype(unscale_dtype: Any) -> np.dtype:
    try:
        dtype = np.dtype(unscale_dtype)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            "dynamic_loss_scale: unscale_dtype must be a floating dtype (jnp.float32, the "
            f"default) or None (keep each gradient's dtype), got {describe(unscale_dtype)}."
        )
    return dtype


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
    if not (callable(getattr(inner, "init", None)) and callable(getattr(inner, "update", None))):
        raise TypeError(
            "dynamic_loss_scale: inner must be an optax GradientTransformation (with init and "
            f"update), got {describe(inner)}. Pass e.g. optax.adam(1e-3)."
        )
    initial_scale, growth_interval, growth_factor, backoff_factor, min_scale, max_scale = (
        _check_config(
            initial_scale, growth_interval, growth_factor, backoff_factor, min_scale, max_scale
        )
    )
    out_dtype = None if unscale_dtype is None else _float_dtype(unscale_dtype)

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

        def unscale(g: jax.typing.ArrayLike | None) -> jax.Array | None:
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

        def select(new: jax.typing.ArrayLike, old: jax.typing.ArrayLike) -> jax.Array:
            # The unscaled gradients are float32 (unscale_dtype), so an inner state kept in
            # the parameters' dtype (adam's bf16 moments for bf16 params) would come back
            # float32: cast it back, or the state's type changes after one step (lax.scan
            # over steps fails, a restore with the initial state as target refuses).
            new, old = jnp.asarray(new), jnp.asarray(old)
            return jnp.where(finite, new.astype(old.dtype), old)

        def zero(u: jax.Array) -> jax.Array:
            return jnp.zeros_like(u)

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
