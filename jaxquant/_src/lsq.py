"""Learned step size quantization (LSQ): a fake quantizer whose scale is a parameter.

Esser et al. (2019, https://arxiv.org/abs/1902.08153) train the step ``s`` of
``x_hat = s * clip(round(x / s), qmin, qmax)`` with the straight-through estimator for
``round`` and the exact derivative elsewhere::

    d x_hat / d x = 1                    where qmin <= x / s <= qmax, else 0
    d x_hat / d s = Q(x / s) - x / s     inside the range
                  = qmin or qmax         outside (the clipped grid value)

and scale the step's gradient by ``g = 1 / sqrt(N * qmax)`` (``N``: elements sharing the
step) so that steps and weights learn at comparable rates. ``Q`` is the spec's rounding
onto its grid (integers, any float format, codebooks), nearest or stochastic.

The spec's granularity gives the step's shape (``plan.scale_shape``: per-tensor ``()``
broadcast, per-channel one per channel); the spec's calibration is used only by
:func:`lsq_init`, LSQ's initial step ``2 * mean|x| / sqrt(qmax)``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant._src.qarray import check_array
from jaxquant._src.quantize import (
    check_input,
    check_key,
    check_spec,
    noise_bits,
    round_scaled,
    to_grid,
)
from jaxquant._src.spec import QuantSpec

Array = jax.Array
_TINY = 2.0**-100  # a step is kept above this: it divides


def lsq_init(x: jax.typing.ArrayLike, spec: QuantSpec) -> Array:
    """LSQ's initial step per scale group: ``2 * mean|x| / sqrt(qmax)`` (float32,
    ``spec.granularity.plan(x.shape).scale_shape``; 1 for an all-zero group).

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> step = jq.lsq_init(jnp.array([1.0, -3.0]), jq.QuantSpec("int4"))
      >>> step.shape, round(float(step[0]), 4)
      ((1,), 1.5119)
    """
    x = check_input(x, "lsq_init")
    spec = check_spec(spec, "lsq_init")
    plan = spec.granularity.plan(tuple(x.shape))
    xv = jax.lax.stop_gradient(x).astype(jnp.float32).reshape(plan.view)
    fin = jnp.isfinite(xv)
    n = jnp.maximum(jnp.sum(fin, axis=plan.reduce_axes, keepdims=True), 1).astype(jnp.float32)
    mean = jnp.sum(jnp.where(fin, jnp.abs(xv), 0.0), axis=plan.reduce_axes, keepdims=True) / n
    step = 2.0 * mean / math.sqrt(spec.qrange[1])
    return jnp.where(step > 0, step, 1.0).reshape(plan.scale_shape)


def lsq_fake_quant(
    x: jax.typing.ArrayLike,
    spec: QuantSpec,
    step: jax.typing.ArrayLike,
    *,
    key: Array | None = None,
) -> Array:
    """Quantize-dequantize ``x`` with a learned step: differentiable in ``x`` and ``step``.

    Args:
      x: floating-point array.
      spec: a symmetric :class:`QuantSpec` (its granularity sets the step groups).
      step: positive step(s), broadcastable to ``spec.granularity.plan(x.shape).scale_shape``
        (initialize with :func:`lsq_init`). Its absolute value is used, kept >= 2^-100.
      key: PRNG key for ``rounding="stochastic"``.

    Returns:
      ``step * clip(round(x / step))`` in ``x``'s dtype; gradients as in the module
      docstring (LSQ's, with the ``1 / sqrt(N * qmax)`` step-gradient scale). Below:
      ``y = x / 0.5 = (0.6, -4, 18)`` rounds to ``(1, -4, 7)`` (18 clips), so
      ``d/ds = ((1 - 0.6) + 0 + 7) / sqrt(3 * 7)``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxquant as jq
      >>> spec = jq.QuantSpec("int4")
      >>> x = jnp.array([0.3, -2.0, 9.0])
      >>> jq.lsq_fake_quant(x, spec, 0.5).tolist()
      [0.5, -2.0, 3.5]
      >>> round(float(jax.grad(lambda s: jq.lsq_fake_quant(x, spec, s).sum())(0.5)), 4)
      1.6148

    References:
      Esser et al., "Learned Step Size Quantization", https://arxiv.org/abs/1902.08153
    """
    x = check_input(x, "lsq_fake_quant")
    spec = check_spec(spec, "lsq_fake_quant")
    if not spec.symmetric or spec.format.kind == "mx":
        raise ValueError(
            f"lsq_fake_quant: LSQ learns one symmetric step per group; got {spec}. Use a "
            "symmetric int / float / codebook spec (MX scales are powers of two, not learned)."
        )
    check_key(spec, key, "lsq_fake_quant")
    plan = spec.granularity.plan(tuple(x.shape))
    step = check_array(step, "lsq_fake_quant: step", floating=True)
    try:
        # The step's gradient is summed back to its own shape: a step that broadcasts the
        # scale shape up (3 steps for 1 group) would quantize with the wrong groups.
        ok = np.broadcast_shapes(step.shape, plan.scale_shape) == tuple(plan.scale_shape)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"lsq_fake_quant: step of shape {step.shape} does not broadcast to the scale "
            f"shape {plan.scale_shape} of {spec.granularity} for x of shape {x.shape}; "
            "build it with jq.lsq_init(x, spec)."
        )
    return _lsq(spec, x, step, key)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lsq(spec: QuantSpec, x: Array, step: Array, key: Array | None) -> Array:
    return _lsq_fwd(spec, x, step, key)[0]


# The forward pass's residuals: in-range mask, grid values, scaled input, step, sign(step).
_Res = tuple[Array, Array, Array, Array, Array]


def _lsq_fwd(spec: QuantSpec, x: Array, step: Array, key: Array | None) -> tuple[Array, _Res]:
    plan = spec.granularity.plan(tuple(x.shape))
    s = jnp.maximum(jnp.abs(step.astype(jnp.float32)), _TINY)
    sv = jnp.broadcast_to(s, plan.scale_shape)
    y = x.astype(jnp.float32).reshape(plan.view) / sv
    v = to_grid(round_scaled(y, spec, noise_bits(spec, key, plan.view)), spec)
    out = (v * sv).reshape(x.shape).astype(x.dtype)
    qmin, qmax = spec.qrange
    inside = (y >= qmin) & (y <= qmax)
    return out, (inside, v, y, step, jnp.sign(step.astype(jnp.float32)))


def _lsq_bwd(spec: QuantSpec, res: _Res, g: Array) -> tuple[Array, Array, None]:
    inside, v, y, step, sign = res
    plan = spec.granularity.plan(tuple(g.shape))
    gv = g.astype(jnp.float32).reshape(plan.view)
    dx = jnp.where(inside, gv, 0.0).reshape(g.shape).astype(g.dtype)
    per_group = math.prod(plan.view) // max(math.prod(plan.scale_shape), 1)
    gscale = 1.0 / math.sqrt(per_group * spec.qrange[1])
    ds = jnp.sum(gv * jnp.where(inside, v - y, v), axis=plan.reduce_axes, keepdims=True) * gscale
    # Sum over the axes along which `step` was broadcast, back to its own shape.
    extra = ds.ndim - step.ndim
    ds = jnp.sum(ds, axis=tuple(range(extra))) if extra > 0 else ds
    axes = tuple(i for i, d in enumerate(step.shape) if d == 1 and ds.shape[i] != 1)
    ds = jnp.sum(ds, axis=axes, keepdims=True) if axes else ds
    ds = (ds.reshape(step.shape) * sign).astype(step.dtype)
    return dx, ds, None


_lsq.defvjp(_lsq_fwd, _lsq_bwd)
