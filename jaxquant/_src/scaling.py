"""Scaling over time: current (per-batch), delayed (amax history) and static scales.

A *scaling* decides the scale a quantizer uses at each step of a loop (a training step,
a decoding step). Like an optax ``GradientTransformation`` it is a NamedTuple of pure
functions plus an explicit state pytree that the caller threads through the loop::

    scaling = jq.delayed_scaling(jq.QuantSpec("e4m3"), history_len=16)
    state = scaling.init(x)                      # or a shape, or jax.ShapeDtypeStruct
    for x in batches:
        scale, state = scaling.update(state, x)  # the scale to use *now*, the next state
        q = jq.quantize(x, scaling.spec, scale=scale)

Three scalings share this interface, so callers can swap them:

* :func:`current_scaling` -- the scale of the tensor itself (dynamic / per-batch): exactly
  the scale ``jq.quantize(x, spec)`` computes. Stateless (state ``()``).
* :func:`delayed_scaling` -- NVIDIA Transformer Engine's delayed scaling: the step
  quantizes with a scale computed from the amax history of *previous* steps, then records
  its own amax. Saves the extra pass over the tensor that a current scale needs before the
  cast, at the risk of clipping when the range grows faster than the margin allows.
* :func:`static_scaling` -- a fixed, known range (calibrated offline). Stateless.

All scales are computed by :func:`jaxquant._src.quantize.compute_scale`, so the scale format
(float32, bf16, fp16, e8m0 power of two) and the MX rule apply to every scaling alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, Literal, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant._src.checks import check_int, describe
from jaxquant._src.qarray import QArray
from jaxquant._src.quantize import check_input, compute_scale, fake_quant, qdq_range, quantize
from jaxquant._src.spec import QuantSpec

Array = jax.Array

_INT32_MAX = np.iinfo(np.int32).max


class ScaleState(NamedTuple):
    """State of :func:`delayed_scaling`.

    ``S`` is the scale shape: ``()`` for a per-tensor spec, otherwise the granularity plan's
    ``scale_shape`` (the array's rank, reduced axes of size 1; the blocked view's rank for
    per-block specs), so ``scale`` broadcasts against the array like ``QArray.scale``.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> sc = jq.delayed_scaling(jq.QuantSpec("int8"), history_len=3)
      >>> state = sc.init((2,))
      >>> _, state = jq.fake_quant_with(sc, state, jnp.array([1.27, -0.5]))
      >>> state.amax_history.tolist(), round(float(state.scale), 4), int(state.count)
      ([1.2699999809265137, 0.0, 0.0], 0.01, 1)
    """

    amax_history: Array  # float32 [history_len, *S]; row 0 is the most recent step
    scale: Array  # float32 [*S]; the scale the next update returns (unused while count == 0)
    # int32 []; updates so far, saturating at 2**31 - 1 (never wraps). The name shadows
    # tuple.count, which mypy reports as an incompatible override: public API, kept.
    count: Array  # type: ignore[assignment]


# What a scaling rule's init takes: only the shape is used.
ShapeOrArray = tuple[int, ...] | jax.typing.ArrayLike | jax.ShapeDtypeStruct | QArray
# A rule's state: ScaleState (delayed_scaling) or () (current and static scaling).
S = TypeVar("S")


class Scaling(NamedTuple, Generic[S]):
    """A scaling rule: pure ``init`` / ``update`` functions and the spec they serve.

    Attributes:
      init: ``init(shape_or_x) -> state``. Takes a shape tuple, an array or a
        ``jax.ShapeDtypeStruct`` (only the shape is used).
      update: ``update(state, x) -> (scale, new_state)``. ``scale`` is float32,
        broadcastable to ``spec.granularity.plan(x.shape).scale_shape``: pass it as
        ``jq.quantize(x, spec, scale=scale)``.
      spec: the :class:`QuantSpec` whose scales this rule produces.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> sc = jq.current_scaling(jq.QuantSpec("int8"))
      >>> x = jnp.array([2.54, -1.0])
      >>> scale, state = sc.update(sc.init(x), x)
      >>> round(float(scale), 4), jq.quantize(x, sc.spec, scale=scale).values.tolist()
      (0.02, [127, -50])
    """

    init: Callable[[ShapeOrArray], S]
    update: Callable[[S, jax.typing.ArrayLike], tuple[Array, S]]
    spec: QuantSpec


# ---------------------------------------------------------------------------- helpers


def _check_spec(spec: Any, fn: str, *, calibrated: bool = True) -> QuantSpec:
    if not isinstance(spec, QuantSpec):
        raise TypeError(
            f"{fn}(spec): expected a jq.QuantSpec, got {describe(spec)}. Build one, e.g. "
            "jq.QuantSpec('int8')."
        )
    if calibrated and spec.calibration is None:
        raise ValueError(
            f"{fn}: {spec} has calibration=None (a plain cast with scale 1), so there is no "
            "scale to track. Give the spec a calibration, e.g. jq.absmax()."
        )
    if not spec.symmetric:
        raise ValueError(
            f"{fn}: scalings track symmetric ranges (amax) only; {spec} is asymmetric. Use "
            "symmetric=True, or jq.quantize(x, spec) to calibrate lo/hi per batch."
        )
    return spec


def _shape_of(shape_or_x: ShapeOrArray) -> tuple[int, ...]:
    if isinstance(shape_or_x, QArray):
        return tuple(shape_or_x.shape)
    if hasattr(shape_or_x, "shape"):
        return tuple(int(d) for d in shape_or_x.shape)
    dims = shape_or_x if isinstance(shape_or_x, tuple | list) else (shape_or_x,)
    try:
        return tuple(check_int(d, "init(shape): each dimension", lo=0) for d in dims)
    except (TypeError, ValueError) as e:
        raise type(e)(
            f"{e} init expects a shape (a tuple of ints >= 0), an array or a "
            f"jax.ShapeDtypeStruct, got {describe(shape_or_x)}."
        ) from None


def _state_shape(spec: QuantSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Scale shape kept in the state: () per-tensor, else the plan's scale_shape."""
    scale_shape = spec.granularity.plan(shape).scale_shape
    return () if all(d == 1 for d in scale_shape) else scale_shape


def current_amax(x: jax.typing.ArrayLike, spec: QuantSpec) -> Array:
    """The spec's calibrated amax of ``x`` per scale group, float32 of the state shape.

    With the default :func:`~jaxquant.absmax` calibration this is ``max |x|`` over the
    finite values of each group (0 for a group with none), the statistic delayed scaling
    records. Other symmetric calibrations (percentile, mse...) record their clip value.
    """
    x = jax.lax.stop_gradient(check_input(x, "scaling update"))
    shape = tuple(x.shape)
    plan = spec.granularity.plan(shape)
    out_shape = _state_shape(spec, shape)
    if x.size == 0:
        return jnp.zeros(out_shape, jnp.float32)
    assert spec.calibration is not None
    xv = x.astype(jnp.float32).reshape(plan.view)
    lo, hi = spec.calibration(xv, plan.reduce_axes, True, qdq_range(spec))
    return jnp.maximum(-lo, hi).astype(jnp.float32).reshape(out_shape)


def _scale_from_amax(amax: Array, spec: QuantSpec) -> Array:
    amax = amax.astype(jnp.float32)
    s, _ = compute_scale(-amax, amax, spec)
    return s.astype(jnp.float32)


def _safe_increment(count: Array) -> Array:
    """count + 1, saturating at int32 max (optax numerics.safe_increment)."""
    return jnp.where(count < _INT32_MAX, count + 1, count).astype(jnp.int32)


# ---------------------------------------------------------------------------- rules


def current_scaling(spec: QuantSpec) -> Scaling[tuple[()]]:
    """Dynamic (per-batch) scaling: every step's scale comes from the tensor itself.

    ``update(state, x)`` returns exactly the scale ``jq.quantize(x, spec)`` would compute,
    so ``quantize(x, spec, scale=scale)`` equals ``quantize(x, spec)``. The state is ``()``.

    Args:
      spec: a symmetric :class:`QuantSpec` with a calibration.

    Returns:
      A :class:`Scaling`.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> sc = jq.current_scaling(jq.QuantSpec("int8"))
      >>> scale, state = sc.update(sc.init((3,)), jnp.array([1.0, -2.54, 0.5]))
      >>> round(float(scale), 6), state
      (0.02, ())
    """
    spec = _check_spec(spec, "current_scaling")

    def init(shape_or_x: ShapeOrArray) -> tuple[()]:
        _shape_of(shape_or_x)
        return ()

    def update(state: tuple[()], x: jax.typing.ArrayLike) -> tuple[Array, tuple[()]]:
        if state != ():
            raise TypeError(f"current_scaling: the state is (), got {type(state).__name__}.")
        return _scale_from_amax(current_amax(x, spec), spec), ()

    return Scaling(init, update, spec)


def static_scaling(spec: QuantSpec, amax: jax.typing.ArrayLike) -> Scaling[tuple[()]]:
    """A fixed scale from a known range ``amax`` (offline calibration, a config value).

    Args:
      spec: a symmetric :class:`QuantSpec` (its calibration is not used and may be None;
        its format, scale format and granularity are).
      amax: the clip value, a scalar or an array broadcastable to the plan's scale shape
        (one per channel). ``scale = amax / qmax`` (``spec.scale_divisor``: ``qmax + 0.5``
        for ``int_grid="full"``) rounded to the scale format.

    Returns:
      A :class:`Scaling` whose state is ``()``.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> sc = jq.static_scaling(jq.QuantSpec("int8"), 12.7)
      >>> round(float(sc.update((), jnp.ones(4))[0]), 6)
      0.1
    """
    spec = _check_spec(spec, "static_scaling", calibrated=False)
    if isinstance(amax, QArray | str | bytes) or amax is None:
        raise TypeError(
            f"static_scaling(amax): expected a number or a float array, got {describe(amax)}."
        )
    try:
        amax_np = np.asarray(amax)
    except Exception:  # a tracer: jax.errors.TracerArrayConversionError
        raise TypeError(
            "static_scaling(amax): the range is static configuration and needs concrete "
            f"values, got a traced {describe(amax)}. Compute it outside jax.jit, or use "
            "jq.quantize(x, spec, scale=...) with a traced scale."
        ) from None
    if amax_np.dtype.kind not in "iuf":
        raise TypeError(
            f"static_scaling(amax): expected a number or a float array, got {describe(amax)}."
        )
    amax_np = amax_np.astype(np.float32)
    if not np.all(np.isfinite(amax_np)) or np.any(amax_np < 0):
        raise ValueError(
            f"static_scaling(amax): amax must be finite and >= 0 (in float32), got {amax!r}."
        )
    amax_arr = jnp.asarray(amax_np)

    def init(shape_or_x: ShapeOrArray) -> tuple[()]:
        _shape_of(shape_or_x)
        return ()

    def update(state: tuple[()], x: jax.typing.ArrayLike) -> tuple[Array, tuple[()]]:
        if state != ():
            raise TypeError(f"static_scaling: the state is (), got {type(state).__name__}.")
        del x
        return _scale_from_amax(amax_arr, spec), ()

    return Scaling(init, update, spec)


def delayed_scaling(
    spec: QuantSpec,
    *,
    history_len: int = 16,
    margin: int = 0,
    reduction: Literal["max", "most_recent"] = "max",
) -> Scaling[ScaleState]:
    """Delayed scaling (NVIDIA Transformer Engine): scales from an amax history.

    At step ``t`` (``update(state, x_t)``):

    1. the scale to use now is ``state.scale``, computed from the amaxes of steps
       ``t-H .. t-1``; at the first step (empty history) it is computed in the same way from
       ``amax_t`` alone (the current scale of ``x_t``, with the margin);
    2. ``amax_t`` (the spec's calibration, by default ``max |x_t|`` over finite values) is
       pushed into the history (row 0, older rows roll down, the oldest drops out);
    3. the next scale is ``s = r * 2^margin / qmax`` (``qmax + 0.5`` for
       ``int_grid="full"``: ``spec.scale_divisor``), rounded to the spec's scale format,
       where ``r = max(history)`` (``reduction="max"``) or ``history[0]``
       (``"most_recent"``). A zero amax gives ``s = 1``.

    ``margin`` is TE's: each unit halves the largest representable value, leaving headroom
    for a range that grows between updates (TE's quantize multiplier is
    ``fmax / amax / 2^margin``; jaxquant scales are its reciprocal).

    Args:
      spec: a symmetric :class:`QuantSpec` with a calibration; per-tensor, per-channel,
        per-token and per-block granularities keep one history per scale group.
      history_len: steps of amax kept (>= 1).
      margin: integer power-of-two headroom (TE ``margin``), default 0.
      reduction: ``"max"`` (TE ``amax_compute_algo="max"``) or ``"most_recent"``.

    Returns:
      A :class:`Scaling` whose state is a :class:`ScaleState`.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> sc = jq.delayed_scaling(jq.QuantSpec("int8"), history_len=2)
      >>> state = sc.init((2,))
      >>> for x in ([1.27, 0.0], [2.54, 0.0], [0.127, 0.0], [0.127, 0.0]):
      ...     scale, state = sc.update(state, jnp.array(x))
      ...     print(round(float(scale), 6))
      0.01
      0.01
      0.02
      0.02

    References:
      NVIDIA Transformer Engine, "Using FP8 with Transformer Engine" (delayed scaling);
      Micikevicius et al., "FP8 Formats for Deep Learning", https://arxiv.org/abs/2209.05433
    """
    spec = _check_spec(spec, "delayed_scaling")
    history_len = check_int(history_len, "delayed_scaling: history_len", lo=1, hi=_INT32_MAX)
    # 2^margin multiplies a float32 amax: beyond +-126 it is no longer a normal float32.
    margin = check_int(margin, "delayed_scaling: margin (a power of two of headroom)")
    if not -126 <= margin <= 126:
        raise ValueError(
            f"delayed_scaling: margin must be in -126..126 (2^margin scales a float32 amax), "
            f"got {margin}. Transformer Engine uses 0."
        )
    if not isinstance(reduction, str) or reduction not in ("max", "most_recent"):
        raise ValueError(
            f"delayed_scaling: reduction must be 'max' or 'most_recent', got {reduction!r}."
        )
    headroom = float(2.0**margin)

    def init(shape_or_x: ShapeOrArray) -> ScaleState:
        s_shape = _state_shape(spec, _shape_of(shape_or_x))
        return ScaleState(
            amax_history=jnp.zeros((history_len, *s_shape), jnp.float32),
            scale=jnp.ones(s_shape, jnp.float32),
            count=jnp.zeros((), jnp.int32),
        )

    def update(state: ScaleState, x: jax.typing.ArrayLike) -> tuple[Array, ScaleState]:
        if not isinstance(state, ScaleState) or not all(
            hasattr(v, "shape") and hasattr(v, "dtype") for v in state
        ):
            raise TypeError(
                "delayed_scaling: update expects the ScaleState from init (arrays), got "
                f"{describe(state)}."
            )
        amax = current_amax(x, spec)
        want = (history_len, *amax.shape)
        if tuple(state.amax_history.shape) != want:
            raise ValueError(
                f"delayed_scaling: the state's amax_history has shape "
                f"{tuple(state.amax_history.shape)} but x of shape {tuple(jnp.shape(x))} needs "
                f"{want} for {spec.granularity}. Build the state with init(x.shape) (under "
                "jax.vmap, init per example and stack)."
            )
        first = state.count == 0
        scale_now = jnp.where(first, _scale_from_amax(amax * headroom, spec), state.scale)
        history = jnp.concatenate([amax[None], state.amax_history[:-1]], axis=0)
        r = jnp.max(history, axis=0) if reduction == "max" else history[0]
        new_state = ScaleState(
            amax_history=history,
            scale=_scale_from_amax(r * headroom, spec),
            count=_safe_increment(state.count),
        )
        return scale_now.astype(jnp.float32), new_state

    return Scaling(init, update, spec)


# ---------------------------------------------------------------------------- helpers


def _check_scaling(scaling: Scaling[S], fn: str) -> Scaling[S]:
    if not isinstance(scaling, Scaling):
        raise TypeError(
            f"{fn}(scaling): expected a jq.Scaling (from delayed_scaling, current_scaling or "
            f"static_scaling), got {describe(scaling)}."
        )
    return scaling


def quantize_with(
    scaling: Scaling[S], state: S, x: jax.typing.ArrayLike, *, key: Array | None = None
) -> tuple[QArray, S]:
    """Quantize ``x`` with the scale ``scaling`` gives for this step.

    Returns:
      ``(jq.quantize(x, scaling.spec, key=key, scale=scale), new_state)``.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> sc = jq.delayed_scaling(jq.QuantSpec("int8"))
      >>> q, state = jq.quantize_with(sc, sc.init((2,)), jnp.array([1.27, -0.5]))
      >>> q.values.tolist(), int(state.count)
      ([127, -50], 1)
    """
    scaling = _check_scaling(scaling, "quantize_with")
    scale, new_state = scaling.update(state, x)
    return quantize(x, scaling.spec, key=key, scale=scale), new_state


def fake_quant_with(
    scaling: Scaling[S],
    state: S,
    x: jax.typing.ArrayLike,
    *,
    key: Array | None = None,
    ste: Literal["plain", "clipped"] = "plain",
) -> tuple[Array, S]:
    """Quantize-dequantize ``x`` (straight-through gradient) with this step's scale.

    Args:
      scaling: a :class:`Scaling` (:func:`current_scaling`, :func:`delayed_scaling` or
        :func:`static_scaling`).
      state: its state, from ``scaling.init`` or the previous step.
      x: the array.
      key: PRNG key for a stochastic-rounding spec.
      ste: ``"plain"`` or ``"clipped"`` straight-through estimator (as in
        :func:`fake_quant`).

    Returns:
      ``(jq.fake_quant(x, scaling.spec, key=key, scale=scale, ste=ste), new_state)``.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> sc = jq.delayed_scaling(jq.QuantSpec("int8"), history_len=4)
      >>> state = sc.init((2,))
      >>> y, state = jq.fake_quant_with(sc, state, jnp.array([1.27, -0.5]))
      >>> y, state = jq.fake_quant_with(sc, state, jnp.array([2.54, -0.5]))
      >>> y.tolist()  # this step used the last step's amax 1.27: 2.54 saturates
      [1.2699999809265137, -0.5]
    """
    scaling = _check_scaling(scaling, "fake_quant_with")
    scale, new_state = scaling.update(state, x)
    return fake_quant(x, scaling.spec, key=key, scale=scale, ste=ste), new_state
