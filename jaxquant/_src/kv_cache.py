"""Quantized key / value caches for autoregressive decoding.

A decoder keeps every past token's keys and values; at long context the cache, not the
weights, dominates memory (and its reads the decode step's time). Storing it in 8 or 4 bits
with a scale per token and head (KIVI, Liu et al. 2024, https://arxiv.org/abs/2402.02750;
KVQuant, Hooper et al. 2024, https://arxiv.org/abs/2401.18079; after a Hadamard rotation of
the head dimension in QuaRot, https://arxiv.org/abs/2404.00456) divides it by 2 to 4.

The cache is a :class:`~jaxquant.QArray` of the full ``(batch, max_len, heads, head_dim)``
(any layout whose token axis is ``axis``): :func:`kv_cache_init` allocates it (zeros),
:func:`kv_cache_update` quantizes new tokens' entries and writes them at a position, and
``jq.dequantize`` reads it back. Each token's groups are quantized on their own, so writing
token ``t`` never changes what is stored for the others (the spec's granularity must keep
the token axis: ``per_token()`` or ``per_channel`` over the leading axes, blocks along the
head dimension). ``QArray.nbytes`` is the cache's true size, scales included.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxquant._src.checks import check_int, describe
from jaxquant._src.qarray import QArray
from jaxquant._src.quantize import check_spec, quantize
from jaxquant._src.spec import QuantSpec


def _check_layout(spec: QuantSpec, shape: tuple[int, ...], axis: int, fn: str) -> None:
    plan = spec.granularity.plan(shape)
    if axis in plan.reduce_axes or plan.view[axis] != shape[axis]:
        raise ValueError(
            f"{fn}: {spec.granularity} shares a scale across tokens (axis {axis} of shape "
            f"{shape}); a cache needs each token quantized on its own so that writing one never "
            "changes another: use per_token() (one scale per token and head) or "
            "per_block(-1, size) along the head dimension."
        )
    if spec.format.bits < 8 and axis == len(shape) - 1:
        raise ValueError(
            f"{fn}: {spec.format.name} is bit-packed along the last axis, which is the token "
            "axis here; put the tokens on another axis (e.g. (batch, tokens, heads, head_dim))."
        )


def kv_cache_init(
    shape: tuple[int, ...], spec: QuantSpec, dtype: Any = jnp.float32, *, axis: int = 1
) -> QArray:
    """An empty (all zero) quantized cache of ``shape`` with tokens along ``axis``.

    Args:
      shape: the full cache, e.g. ``(batch, max_len, heads, head_dim)``.
      spec: how entries are stored (``QuantSpec("int8", jq.per_token())``, ``"fp8"``,
        ``"int4"``...); its granularity must give each token its own scales.
      dtype: what :func:`jaxquant.dequantize` returns.
      axis: the token axis.

    Returns:
      A :class:`~jaxquant.QArray` of zeros (scale 1).

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> cache = jq.kv_cache_init((1, 128, 4, 32), jq.QuantSpec("int4", jq.per_token()))
      >>> cache.nbytes  # 4 bits per entry + one float32 scale per token and head
      10240
    """
    spec = check_spec(spec, "kv_cache_init")
    if not isinstance(shape, tuple) or not all(isinstance(d, int) for d in shape):
        raise TypeError(f"kv_cache_init: shape must be a tuple of ints, got {describe(shape)}.")
    axis = check_int(axis, "kv_cache_init: axis", lo=-len(shape), hi=len(shape) - 1) % len(shape)
    _check_layout(spec, shape, axis, "kv_cache_init")
    # One token's zeros quantized, repeated along the token axis: the codes of 0 (not
    # necessarily code 0: NF4's zero is code 7) without quantizing (or, under jit, constant
    # folding) the whole cache.
    one = quantize(jnp.zeros((*shape[:axis], 1, *shape[axis + 1 :]), dtype), spec)

    def repeat(a: jax.Array) -> jax.Array:
        return jnp.repeat(a, shape[axis], axis=axis)

    zp = None if one.zero_point is None else repeat(one.zero_point)
    return dataclasses.replace(
        one, values=repeat(one.values), scale=repeat(one.scale), zero_point=zp, shape=shape
    )


def kv_cache_update(
    cache: QArray,
    new: jax.typing.ArrayLike,
    index: jax.typing.ArrayLike,
    *,
    axis: int = 1,
    key: jax.Array | None = None,
) -> QArray:
    """``cache`` with the entries of ``new`` quantized and written at token ``index``.

    ``new`` has the cache's shape except along ``axis`` (the tokens written: one for a
    decode step, the prompt for a prefill). Jit-friendly: ``index`` may be traced.

    Args:
      cache: from :func:`kv_cache_init` (or a previous update).
      new: keys or values of the new tokens, floating point.
      index: the first token position written (a scalar, possibly traced).
      axis: the token axis.
      key: PRNG key for a stochastically rounding spec.

    Returns:
      The updated cache (a new QArray; the input is not modified).

    Example:
      >>> import jax, jax.numpy as jnp, jaxquant as jq
      >>> spec = jq.QuantSpec("int8", jq.per_token())
      >>> cache = jq.kv_cache_init((1, 8, 2, 4), spec)
      >>> k = jnp.arange(8.0).reshape(1, 1, 2, 4)
      >>> cache = jax.jit(jq.kv_cache_update)(cache, k, 3)
      >>> [round(float(v), 2) for v in jq.dequantize(cache)[0, 3, 1]]  # int8 steps of 7 / 127
      [4.02, 5.02, 6.01, 7.0]
      >>> float(jnp.abs(jq.dequantize(cache)[0, 2]).max())  # other tokens untouched
      0.0
    """
    if not isinstance(cache, QArray):
        raise TypeError(
            f"kv_cache_update: cache must be a QArray from kv_cache_init, got {describe(cache)}."
        )
    nd = len(cache.shape)
    axis = check_int(axis, "kv_cache_update: axis", lo=-nd, hi=nd - 1) % nd
    new = jnp.asarray(new)
    want = cache.shape[:axis] + cache.shape[axis + 1 :]
    if new.ndim != nd or new.shape[:axis] + new.shape[axis + 1 :] != want:
        raise ValueError(
            f"kv_cache_update: new has shape {new.shape}; the cache {cache.shape} takes "
            f"(..., n, ...) with n tokens along axis {axis} and the other axes equal."
        )
    if new.shape[axis] > cache.shape[axis]:
        raise ValueError(
            f"kv_cache_update: {new.shape[axis]} new tokens exceed the cache's "
            f"{cache.shape[axis]} positions."
        )
    if jnp.ndim(index) != 0:
        raise ValueError(f"kv_cache_update: index must be a scalar, got shape {jnp.shape(index)}.")
    _check_layout(cache.spec, cache.shape, axis, "kv_cache_update")
    q = quantize(new.astype(cache.dtype), cache.spec, key=key)

    def put(old: jax.Array, part: jax.Array) -> jax.Array:
        return lax.dynamic_update_slice_in_dim(old, part.astype(old.dtype), index, axis)

    zp = cache.zero_point
    if zp is not None:
        assert q.zero_point is not None  # the same asymmetric spec
        zp = put(zp, q.zero_point)
    return dataclasses.replace(
        cache, values=put(cache.values, q.values), scale=put(cache.scale, q.scale), zero_point=zp
    )
