"""Quantized ``lax.conv_general_dilated`` with a straight-through custom VJP (emulated).

Forward: ``conv(Q_lhs(lhs), Q_rhs(rhs))`` where each ``Q`` quantizes and dequantizes its
operand (any granularity: per-tensor, per-output-channel kernels, per-block...), and the
convolution runs in float32 on the dequantized values. Backward: the output gradient is
quantized with ``grad_spec`` and pushed through the convolution's own transpose at the
quantized operands; the operands' quantizers are straight-through (``ste="plain"``) or
zero the gradient where they saturated (``"clipped"``).

This is the QAT / research path: the numbers are those of an int8 / fp8 convolution with
float32 accumulation, but no int8 / fp8 convolution kernel is called (XLA's are backend-
specific); :func:`jaxquant.dot_general` is the one with real low-precision compute.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant._src import opargs
from jaxquant._src.checks import check_int, describe
from jaxquant._src.config import QuantConfig
from jaxquant._src.granularity import follows_layout
from jaxquant._src.layout import bind, conv_layout
from jaxquant._src.qarray import check_array
from jaxquant._src.quantize import (
    check_operand_scale,
    quantize_core,
    scale_input,
    ste_bounds,
    to_grid,
)
from jaxquant._src.spec import QuantSpec

Array = jax.Array


def _hashable(x: Any) -> Any:
    """Lists -> tuples, recursively (jit static arguments); NamedTuples kept as they are."""
    if isinstance(x, list) or type(x) is tuple:
        return tuple(_hashable(v) for v in x)
    return x


@dataclasses.dataclass(frozen=True)
class _ConvConfig:
    conv: tuple[tuple[str, Any], ...]  # keyword arguments of lax.conv_general_dilated
    lhs_spec: QuantSpec | None
    rhs_spec: QuantSpec | None
    grad_spec: QuantSpec | None
    ste: str
    out_dtype: np.dtype
    lhs_dtype: np.dtype
    rhs_dtype: np.dtype


_FN = "conv_general_dilated"


def _check_ints(value: Any, name: str, n: int, *, optional: bool = False) -> Any:
    """``n`` positive ints (one per spatial axis) for ``name``, or None when ``optional``."""
    if value is None and optional:
        return None
    if not isinstance(value, tuple | list) or len(value) != n:
        raise TypeError(
            f"{_FN}: {name} must be a sequence of {n} positive ints (one per spatial axis of "
            f"lhs){', or None' if optional else ''}, got {describe(value)}."
        )
    return tuple(check_int(v, f"{_FN}: {name}[{i}]", lo=1) for i, v in enumerate(value))


def _check_padding(padding: Any, n: int) -> Any:
    """lax's padding: 'VALID', 'SAME' or 'SAME_LOWER' (any case), or n (low, high) pairs."""
    if isinstance(padding, str):
        if padding.upper() not in ("VALID", "SAME", "SAME_LOWER"):
            raise ValueError(
                f"{_FN}: padding must be 'VALID', 'SAME', 'SAME_LOWER' or a sequence of {n} "
                f"(low, high) int pairs, got {padding!r}."
            )
        return padding
    if not isinstance(padding, tuple | list) or len(padding) != n:
        raise TypeError(
            f"{_FN}: padding must be 'VALID', 'SAME', 'SAME_LOWER' or a sequence of {n} "
            f"(low, high) int pairs (one per spatial axis of lhs), got {describe(padding)}."
        )
    out = []
    for i, pair in enumerate(padding):
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise TypeError(
                f"{_FN}: padding[{i}] must be a (low, high) pair of ints, got {describe(pair)}."
            )
        out.append(tuple(check_int(v, f"{_FN}: padding[{i}]") for v in pair))
    return tuple(out)


def _fq(
    x: Array,
    spec: QuantSpec | None,
    key: Array | None,
    scale: Array | None,
    clipped: bool = False,
) -> tuple[Array, Array | None]:
    """(float32 quantize-dequantized x, clipped-STE mask if ``clipped`` else None)."""
    if spec is None:
        return x.astype(jnp.float32), None
    r, s, _, plan = quantize_core(x, spec, key, scale)
    out = (to_grid(r, spec) * s).reshape(plan.shape)
    if not clipped:
        return out, None
    # fake_quant's bounds: the full grid's +amax scales to qmax + 0.5, not a clipped value.
    lo, hi = ste_bounds(spec)
    t = scale_input(x.astype(jnp.float32).reshape(plan.view), s, None)
    return out, ((t >= lo) & (t <= hi)).reshape(plan.shape)


def _bind(
    spec: QuantSpec,
    x: Array,
    name: Literal["lhs", "rhs"],
    dimension_numbers: lax.ConvGeneralDilatedDimensionNumbers,
) -> QuantSpec:
    """``per_channel()`` / ``per_block(size)`` bound to this operand's layout: the kernel's
    output-feature axis (the input's batch axis) keeps its scales, blocks run along the
    feature axis it contracts (:func:`jaxquant._src.layout.bind`); explicit granularities
    pass. A fallback is a UserWarning naming the operand."""
    if not follows_layout(spec.granularity):
        return spec  # no layout to read (dimension_numbers may even be malformed: lax says)
    contracting, _ = conv_layout(dimension_numbers, x.ndim, name)
    bound, note = bind(spec, tuple(x.shape), contracting, block_axis=contracting[-1])
    assert bound is not None  # bind returns None for a None spec only
    if note is not None:
        warnings.warn(f"{_FN}: {name}_spec {note}.", UserWarning, stacklevel=3)
    return bound


_Keys = tuple[Array, Array, Array] | tuple[None, None, None]
# The forward pass's residuals: quantized operands, clipped-STE masks, grad scale and key.
_Res = tuple[Array, Array, tuple[Array | None, Array | None], Array | None, Array | None]


def _keys(key: Array | None) -> _Keys:
    if key is None:
        return None, None, None
    return jax.random.fold_in(key, 0), jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)


def _conv(cfg: _ConvConfig, a: Array, b: Array) -> Array:
    return lax.conv_general_dilated(a, b, **dict(cfg.conv))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _qconv(
    cfg: _ConvConfig,
    lhs: Array,
    rhs: Array,
    lhs_scale: Array | None,
    rhs_scale: Array | None,
    grad_scale: Array | None,
    key: Array | None,
) -> Array:
    return _qconv_fwd(cfg, lhs, rhs, lhs_scale, rhs_scale, grad_scale, key)[0]


def _qconv_fwd(
    cfg: _ConvConfig,
    lhs: Array,
    rhs: Array,
    lhs_scale: Array | None,
    rhs_scale: Array | None,
    grad_scale: Array | None,
    key: Array | None,
) -> tuple[Array, _Res]:
    kl, kr, kg = _keys(key)
    clip = cfg.ste == "clipped"
    lq, lm = _fq(lhs, cfg.lhs_spec, kl, lhs_scale, clip)
    rq, rm = _fq(rhs, cfg.rhs_spec, kr, rhs_scale, clip)
    out = _conv(cfg, lq, rq).astype(cfg.out_dtype)
    return out, (lq, rq, (lm, rm), grad_scale, kg)


def _qconv_bwd(
    cfg: _ConvConfig, res: _Res, g: Array
) -> tuple[Array, Array, None, None, None, None]:
    lq, rq, (lm, rm), grad_scale, kg = res
    gq = g.astype(jnp.float32)
    if cfg.grad_spec is not None:
        gq, _ = _fq(g, cfg.grad_spec, kg, grad_scale)
    _, vjp = jax.vjp(functools.partial(_conv, cfg), lq, rq)
    dl, dr = vjp(gq)
    if lm is not None:
        dl = jnp.where(lm, dl, 0.0)
    if rm is not None:
        dr = jnp.where(rm, dr, 0.0)
    return dl.astype(cfg.lhs_dtype), dr.astype(cfg.rhs_dtype), None, None, None, None


_qconv.defvjp(_qconv_fwd, _qconv_bwd)
_qconv_jit = jax.jit(_qconv, static_argnums=0)


def conv_general_dilated(
    lhs: jax.typing.ArrayLike,
    rhs: jax.typing.ArrayLike,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: lax.ConvGeneralDilatedDimensionNumbers = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: lax.PrecisionLike = None,
    preferred_element_type: jax.typing.DTypeLike | None = None,
    *,
    config: QuantConfig | None = None,
    lhs_spec: QuantSpec | None = opargs.NONE,
    rhs_spec: QuantSpec | None = opargs.NONE,
    grad_spec: QuantSpec | None = opargs.NONE,
    lhs_scale: jax.typing.ArrayLike | None = None,
    rhs_scale: jax.typing.ArrayLike | None = None,
    grad_scale: jax.typing.ArrayLike | None = None,
    key: Array | None = None,
    ste: Literal["plain", "clipped"] = opargs.PLAIN,
    backward: Literal["saved"] = "saved",
    hadamard: None = None,
) -> Array:
    """Quantized ``jax.lax.conv_general_dilated`` (emulated; see the module docstring).

    A drop-in for ``lax.conv_general_dilated`` (same positional arguments), so
    ``functools.partial(jq.conv_general_dilated, config=cfg)`` can be given to
    ``flax.linen.Conv(conv_general_dilated=...)`` / ``flax.nnx.Conv``; rule-based QAT
    (:func:`jaxquant.flax.quantize_model`) does that for you.

    What is quantized comes either whole from ``config`` (a :class:`QuantConfig`: ``act``
    quantizes the input ``lhs``, ``weight`` the kernel ``rhs``, ``grad`` the output
    gradient, with its ``ste``) or from the loose keywords ``lhs_spec``, ``rhs_spec``,
    ``grad_spec`` and ``ste``; passing both is a ValueError.

    Args:
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation: as in
        ``lax.conv_general_dilated``.
      dimension_numbers, feature_group_count, batch_group_count, precision: likewise.
      preferred_element_type: likewise.
      config: a :class:`QuantConfig` with ``scaling="current"``, ``ste`` ``"plain"`` or
        ``"clipped"``, ``mode`` ``"auto"`` or ``"emulate"`` (the convolution is always
        emulated), ``backward="saved"`` and no ``hadamard`` (those are for
        :func:`jaxquant.dot_general`), or None.
      lhs_spec, rhs_spec, grad_spec: :class:`QuantSpec` of the input, the kernel and the
        output gradient, or None (float). Any granularity (the kernel's output-channel axis
        is its last in Flax's HWIO layout: ``per_channel(-1)``). ``per_channel()`` and
        ``per_block(size)`` (no axis) follow ``dimension_numbers``: one scale per output
        channel of the kernel (per example of the input), blocks along the contracted
        feature axis (a fallback, when ``size`` does not divide it, is a UserWarning).
      lhs_scale, rhs_scale, grad_scale: known scales (static / delayed scaling).
      key: PRNG key for stochastic specs (``fold_in(key, 0/1/2)`` for lhs / rhs / grad).
      ste: ``"plain"`` or ``"clipped"`` straight-through estimator for the operands.
      backward, hadamard: ``"saved"`` and None only, the keywords of
        :func:`jaxquant.dot_general` that convolutions do not implement (taken so that one
        set of keywords fits every quantized op; anything else is a ValueError).

    Returns:
      The convolution, in ``lax.conv_general_dilated``'s result dtype.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> x, k = jnp.ones((1, 1, 5)), jnp.full((1, 1, 3), 0.5)
      >>> jq.conv_general_dilated(x, k, (1,), "VALID", rhs_spec=jq.QuantSpec("int8")).tolist()
      [[[1.5, 1.5, 1.5]]]
      >>> cfg = jq.QuantConfig(weight=jq.QuantSpec("int8"))
      >>> jq.conv_general_dilated(x, k, (1,), "VALID", config=cfg).tolist()
      [[[1.5, 1.5, 1.5]]]
    """
    q = opargs.resolve(
        _FN, config, lhs_spec=lhs_spec, rhs_spec=rhs_spec, grad_spec=grad_spec, ste=ste
    )
    lhs_spec, rhs_spec, grad_spec, ste = q["lhs_spec"], q["rhs_spec"], q["grad_spec"], q["ste"]
    asked: list[tuple[Any, Any]] = [(backward, hadamard)]
    if config is not None:
        asked.append((config.backward, config.hadamard))
    for backward, hadamard in asked:
        if backward == "saved" and hadamard is None:
            continue
        # The backward convolutions contract other axes (the batch and spatial ones for the
        # kernel's gradient) than a per-block layout or a rotation of the forward names.
        raise ValueError(
            f"{_FN}: backward={backward!r} / hadamard={hadamard!r} are implemented for "
            "dot_general and einsum only, not for convolutions. Use "
            "config.replace(backward='saved', hadamard=None) for conv layers (a Flax "
            "Rule that matches only the Dense layers, or one for the convs), or keep "
            "them in high precision."
        )
    if config is not None and config.mode == "real":
        raise ValueError(
            f"{_FN}: config.mode='real' asks for an int8 / fp8 convolution, which jaxquant "
            "does not call (it emulates: quantized operands, a float32 convolution). Use "
            "config.replace(mode='auto')."
        )
    lhs, rhs = check_array(lhs, f"{_FN}: lhs"), check_array(rhs, f"{_FN}: rhs")
    if lhs.ndim < 2 or rhs.ndim != lhs.ndim:
        raise ValueError(
            f"{_FN}: lhs and rhs need the same rank, at least 2 (batch and feature axes, then "
            f"the spatial ones), got lhs of shape {tuple(lhs.shape)} and rhs of shape "
            f"{tuple(rhs.shape)}."
        )
    n = lhs.ndim - 2  # spatial axes
    window_strides = _check_ints(window_strides, "window_strides", n)
    padding = _check_padding(padding, n)
    lhs_dilation = _check_ints(lhs_dilation, "lhs_dilation", n, optional=True)
    rhs_dilation = _check_ints(rhs_dilation, "rhs_dilation", n, optional=True)
    feature_group_count = check_int(feature_group_count, f"{_FN}: feature_group_count", lo=1)
    batch_group_count = check_int(batch_group_count, f"{_FN}: batch_group_count", lo=1)
    if preferred_element_type is not None:
        try:
            np.dtype(preferred_element_type)
        except TypeError:
            raise TypeError(
                f"{_FN}: preferred_element_type must be a dtype such as jnp.float32, or None, "
                f"got {describe(preferred_element_type)}."
            ) from None
    bound = []
    operands: tuple[tuple[Literal["lhs", "rhs"], QuantSpec | None, Array], ...] = (
        ("lhs", lhs_spec, lhs),
        ("rhs", rhs_spec, rhs),
    )
    for name, spec, x in operands:
        if spec is not None:
            if not isinstance(spec, QuantSpec):
                raise TypeError(
                    f"{_FN}: {name}_spec must be a jq.QuantSpec or None, got {describe(spec)}."
                )
            if not jnp.issubdtype(x.dtype, jnp.floating):
                raise TypeError(f"conv_general_dilated: {name}_spec quantizes a {x.dtype} operand.")
            spec = _bind(spec, x, name, dimension_numbers)
            spec.granularity.plan(tuple(x.shape))
        bound.append(spec)
    lhs_spec, rhs_spec = bound
    if grad_spec is not None and not isinstance(grad_spec, QuantSpec):
        raise TypeError(
            f"{_FN}: grad_spec must be a jq.QuantSpec or None, got {describe(grad_spec)}."
        )
    if ste not in ("plain", "clipped"):
        raise ValueError(f"conv_general_dilated: ste must be 'plain' or 'clipped', got {ste!r}.")
    for arg, spec in (("lhs_spec", lhs_spec), ("rhs_spec", rhs_spec), ("grad_spec", grad_spec)):
        if spec is not None and spec.stochastic and key is None:
            raise ValueError(f"conv_general_dilated: {arg} rounds stochastically and needs key=.")
    conv = dict(
        window_strides=_hashable(window_strides),
        padding=_hashable(padding),
        lhs_dilation=_hashable(lhs_dilation),
        rhs_dilation=_hashable(rhs_dilation),
        dimension_numbers=_hashable(dimension_numbers),
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=_hashable(precision),
    )
    try:
        out_aval = jax.eval_shape(
            functools.partial(
                lax.conv_general_dilated, **conv, preferred_element_type=preferred_element_type
            ),
            jax.ShapeDtypeStruct(lhs.shape, lhs.dtype),
            jax.ShapeDtypeStruct(rhs.shape, rhs.dtype),
        )
    except (TypeError, ValueError) as err:  # lax's messages name neither operand
        raise (TypeError if isinstance(err, TypeError) else ValueError)(
            f"{_FN}: lax.conv_general_dilated refused lhs of shape {tuple(lhs.shape)} and rhs "
            f"of shape {tuple(rhs.shape)} with dimension_numbers {dimension_numbers!r}: {err}"
        ) from None
    if lhs_spec is None and rhs_spec is None and grad_spec is None:
        return lax.conv_general_dilated(
            lhs, rhs, **conv, preferred_element_type=preferred_element_type
        )
    if grad_spec is not None:
        grad_spec.granularity.plan(tuple(out_aval.shape))
    lhs_scale, rhs_scale, grad_scale = (
        check_operand_scale(x, spec, scale, name=f"{_FN}: {name}")
        for name, x, spec, scale in (
            ("lhs_scale", lhs, lhs_spec, lhs_scale),
            ("rhs_scale", rhs, rhs_spec, rhs_scale),
            ("grad_scale", out_aval, grad_spec, grad_scale),
        )
    )
    cfg = _ConvConfig(
        conv=tuple(conv.items()),
        lhs_spec=lhs_spec,
        rhs_spec=rhs_spec,
        grad_spec=grad_spec,
        ste=ste,
        out_dtype=np.dtype(out_aval.dtype),
        lhs_dtype=np.dtype(lhs.dtype),
        rhs_dtype=np.dtype(rhs.dtype),
    )

    def opt(s: jax.typing.ArrayLike | None) -> Array | None:
        return None if s is None else jnp.asarray(s, jnp.float32)

    return _qconv_jit(cfg, lhs, rhs, opt(lhs_scale), opt(rhs_scale), opt(grad_scale), key)
