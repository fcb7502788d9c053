"""quantize / dequantize / fake_quant / quantize_tree.

The pipeline for one array ``x`` and a :class:`QuantSpec`:

1. view ``x`` (float32) through the granularity plan (blocks for per-block);
2. calibrate ``[lo, hi]`` per group (non-finite values ignored);
3. scale ``s`` (and zero point ``z``) from the range and the format's ``qmax``, rounded to
   the scale format; a zero range gives ``s = 1`` (never a division by zero);
4. ``y = x * (1/s) + z`` rounded onto the format's grid (nearest-even or stochastic) and
   saturated to ``[qmin, qmax]``. The scale ``s = amax / qmax`` (``amax / (qmax + 0.5)``
   for ``int_grid="full"``: :attr:`QuantSpec.scale_divisor`) and the reciprocal ``1/s``
   are correctly rounded divisions, one per group, done in integer arithmetic
   (:func:`rounding.div_rn`) because XLA's own f32 division is not IEEE on every backend;
   the per-element work is a multiply. So CPU, GPU, jit and eager agree bit for bit. ``y``
   can differ from ``x / s`` by one ulp before rounding (exact for power-of-two scales);
5. ``quantize`` encodes ``y`` into storage (packing sub-byte codes), ``fake_quant`` returns
   ``(y - z) * s`` in the caller's dtype with a straight-through gradient.

NaN/Inf policy: calibration ignores non-finite values. ``+-Inf`` saturates to ``+-qmax``
(with ``saturate=False``, float formats with Inf keep it). NaN stays NaN in ``fake_quant``
(every format) and in float formats that have a NaN code; formats without one (ints,
codebooks, fp6, fp4) store it as the code of 0 (binary, which has no 0: +1) -- use
:func:`jaxquant.metrics.nan_count` on the input to detect it.

Range limits: scales are float32 normal numbers, clamped to ``[2^-126, max]`` (XLA flushes
float32 subnormals on CPU, so a smaller scale could not be applied exactly). A group whose
ideal scale ``amax / qmax`` is below ``2^-126`` (amax below ``qmax * 2^-126``, e.g. a tensor
of float32 subnormals) keeps the floor scale and loses resolution; values below ``2^-127``
round to 0 there. :func:`jaxquant.metrics.scale_clamp_rate` counts such groups. Scales of
``scale_format="float16"`` are limited the same way to float16's range ``[2^-14, 65504]``.
float64 inputs (x64) are rounded to float32 to odd, so a plain cast onto any format with at
most 22 significand bits is the correctly rounded result of the float64 value; scales are
float32 and ``fake_quant`` / ``dequantize`` return float64 products.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant._src import kernels, rounding
from jaxquant._src.calibration import TWN
from jaxquant._src.granularity import Plan
from jaxquant._src.qarray import QArray, encode, pack, widen

# dequantize lives with the QArray it reads; jaxquant.dequantize is imported from here.
from jaxquant._src.qarray import dequantize as dequantize
from jaxquant._src.spec import QuantSpec

Array = jax.Array


# ---------------------------------------------------------------------------- checks


def check_input(x: Any, fn: str) -> Array:
    if isinstance(x, QArray):
        raise TypeError(f"{fn}: x is a QArray; call jq.dequantize(q) first.")
    if x is None or isinstance(x, str | bytes):
        raise TypeError(f"{fn}: x must be a floating-point array, got {type(x).__name__}.")
    try:
        with warnings.catch_warnings():  # numpy's dtype-alias warning for a list of strings
            warnings.simplefilter("ignore", DeprecationWarning)
            x = jnp.asarray(x)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{fn}: x must be a floating-point array ({err}).") from None
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{fn} expects a floating-point array, got dtype {x.dtype}. Cast it first, e.g. "
            "x.astype(jnp.float32)."
        )
    return x


def check_spec(spec: Any, fn: str) -> QuantSpec:
    if not isinstance(spec, QuantSpec):
        hint = f"jq.QuantSpec({spec!r})" if isinstance(spec, str) else "jq.QuantSpec('int8')"
        raise TypeError(
            f"{fn}: spec must be a QuantSpec, got {type(spec).__name__} {spec!r}. Build one, "
            f"e.g. {hint}."
        )
    return spec


def check_scale(
    x: Array, spec: QuantSpec, scale: Any, zero_point: Any, fn: str
) -> tuple[Array | None, Array | None]:
    """Given ``scale=`` / ``zero_point=`` as float32 arrays, checked against the plan."""
    if zero_point is not None and scale is None:
        raise ValueError(f"{fn}: zero_point= needs scale= too (a known range has both).")
    if scale is None:
        return None, None
    if spec.format.tensor_scale:
        raise ValueError(
            f"{fn}: scale= is not supported for {spec.format.name}: its per-tensor and "
            "per-block scales are computed together from the tensor. Drop scale=."
        )
    if zero_point is not None and spec.symmetric:
        raise ValueError(
            f"{fn}: zero_point= is for asymmetric specs; this spec is symmetric (z = 0). Drop "
            "zero_point=, or use QuantSpec(..., symmetric=False)."
        )
    if zero_point is None and not spec.symmetric:
        raise ValueError(f"{fn}: an asymmetric spec with a given scale= also needs zero_point=.")
    want = spec.granularity.plan(tuple(x.shape)).scale_shape
    out: list[Array | None] = []
    for name, v in (("scale", scale), ("zero_point", zero_point)):
        if v is None:
            out.append(None)
            continue
        if isinstance(v, QArray):
            raise TypeError(f"{fn}: {name}= got a QArray; pass its float values.")
        if isinstance(v, str | bytes):
            raise TypeError(f"{fn}: {name}= must be a number or an array, got {v!r}.")
        a = jnp.asarray(v)
        if not (jnp.issubdtype(a.dtype, jnp.floating) or jnp.issubdtype(a.dtype, jnp.integer)):
            raise TypeError(f"{fn}: {name}= must be a real number or array, got dtype {a.dtype}.")
        try:
            ok = np.broadcast_shapes(a.shape, want) == tuple(want)
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"{fn}: {name}= has shape {a.shape}, which does not broadcast to the scale "
                f"shape {want} of {spec.granularity} on an input of shape {tuple(x.shape)}. "
                f"Pass one value per scale group (e.g. q.{name} of a QArray with this spec)."
            )
        if not isinstance(a, jax.core.Tracer):  # a concrete value: check what it holds
            v = np.asarray(a, np.float64)
            if name == "scale" and not (np.isfinite(v) & (v > 0)).all():
                raise ValueError(
                    f"{fn}: scale= must be finite and > 0 in every group, got "
                    f"{v.reshape(-1)[~(np.isfinite(v) & (v > 0)).reshape(-1)][:3].tolist()}. "
                    "A group of zeros takes scale 1."
                )
            qmin, qmax = spec.qrange
            zr = np.round(v)  # a given zero point is rounded to its integer grid point
            if name == "zero_point" and not (np.isfinite(v) & (zr >= qmin) & (zr <= qmax)).all():
                raise ValueError(
                    f"{fn}: zero_point= must be integers in [{qmin:g}, {qmax:g}] (the "
                    f"format's range), got {np.unique(v)[:4].tolist()}."
                )
        out.append(a)
    return out[0], out[1]


def check_operand_scale(x: Any, spec: QuantSpec | None, scale: Any, *, name: str) -> Any:
    """A known symmetric scale of one operand of a contraction (``dot_general`` /
    ``conv_general_dilated``'s ``lhs_scale`` / ``rhs_scale`` / ``grad_scale``), checked
    against ``spec``'s plan on ``x`` (an array or its shape and dtype); errors start with
    ``name`` (e.g. ``"dot_general: lhs_scale"``). Passed through as it is when there is no
    scale or no spec (an operand left in float ignores it)."""
    if spec is None or scale is None:
        return scale
    return check_scale(x, spec, scale, None, name)[0]


def check_key(spec: QuantSpec, key: Array | None, fn: str) -> None:
    if key is not None:
        rounding.check_key(key, f"{fn}: key=")
    if spec.stochastic and key is None:
        raise ValueError(
            f"{fn}: rounding='stochastic' needs a PRNG key: pass key=jax.random.key(seed) "
            "(split it per call so steps get fresh noise)."
        )


# ------------------------------------------------------------------------ scale rules


def _div_const(num: Array, c: float) -> Array:
    """``num / c``, correctly rounded on every backend (see :func:`rounding.divide`)."""
    return rounding.divide(num, jnp.float32(c))


def _guard_scale(s: Array, nonzero: Array) -> Array:
    """1 for empty/zero groups; otherwise clamp to float32's normal range, so that XLA's
    flush-to-zero of subnormals can never turn ``x / s`` into a division by zero."""
    s = jnp.clip(s, jnp.float32(2.0**-126), jnp.float32(np.finfo(np.float32).max))
    return jnp.where(nonzero & jnp.isfinite(s), s, 1.0)


def _exponent(a: Array) -> Array:
    """floor(log2(a)) for positive normal float32 ``a``, from its exponent bits (exact)."""
    bits = jax.lax.bitcast_convert_type(a, jnp.uint32)
    return ((bits >> 23) & 0xFF).astype(jnp.int32) - 127


def _pow2(e: Array) -> Array:
    """Exact float32 2^e for int32 e, clamped to the normal range [-126, 127]."""
    e = jnp.clip(e, -126, 127)
    return jax.lax.bitcast_convert_type((e + 127) << 23, jnp.float32)


def _round_scale(s: Array, spec: QuantSpec) -> Array:
    """Round positive float32 scales to the scale format (e8m0: up to a power of two).

    Power-of-two scales stay within float32's normal range (e8m0's 2^-127 is not used:
    XLA flushes float32 subnormals on CPU).
    """
    name = spec.scale_format.name
    if name == "float32":
        return s
    if name in ("bfloat16", "float16"):  # integer rounding: a convert pair could be elided
        t = rounding.round_float(s, spec.scale_format)
        return jnp.where(t > 0, t, jnp.float32(spec.scale_format.min_normal))
    bits = jax.lax.bitcast_convert_type(s, jnp.uint32)
    ceil = _exponent(s) + ((bits & 0x7FFFFF) != 0).astype(jnp.int32)  # ceil(log2 s)
    return _pow2(ceil)


def _mx_scale(amax: Array, spec: QuantSpec) -> Array:
    """OCP MX v1.0: X = 2^(floor(log2(amax)) - emax_elem); 1 for an all-zero block.

    MXINT8's int8 element has an implied scale of 2^-6 and ``emax_elem = 0``; the stored
    scale takes the 2^-6 in (``X * 2^-6``) so that the elements are the int8 codes.
    """
    f = spec.element
    shift = f.bits - 2 if f.kind == "int" else f.emax
    return jnp.where(amax > 0, _pow2(_exponent(amax) - shift), 1.0)


# float32's largest finite value: the cap of NVFP4's per-tensor and per-block factors.
_F32_MAX = float(np.finfo(np.float32).max)


class NVFP4Scales(NamedTuple):
    """NVFP4's two-level scales of one tensor (float32, in the plan's blocked view).

    ``amax``: each block's largest ``|x|`` (Inf counts, NaN doesn't); ``tensor``: the
    encode scale ``S`` (shape ``()``); ``block``: the E4M3 block scales ``b`` (on E4M3's
    grid); ``scale``: the effective block scale ``b / S`` that decodes; ``inv``: about
    ``S / b`` (see :func:`nvfp4_scales`), what the elements are multiplied by before
    rounding.
    """

    amax: Array
    tensor: Array
    block: Array
    scale: Array
    inv: Array


def nvfp4_scales(xv: Array, plan: Plan, spec: QuantSpec) -> NVFP4Scales:
    """Transformer Engine's NVFP4 scales (see :func:`jaxquant.formats.nvfp4_format`).

    The operations of Transformer Engine's kernels (``core_nvfp4.cuh``), in the same order,
    every division correctly rounded (:func:`rounding.divide`, so the same on every backend
    and under jit): ``S = min(2688 / amax, f32max)`` (1 when ``amax`` is 0 or Inf),
    ``b = e4m3_rne_sat(block_amax * (S * fl(1/6)))`` (after ``max(., floor)`` when the
    format has a ``scale_floor``), ``inv = min(1 / (b * (1 / S)), f32max)`` (``f32max``
    where ``b = 0``: such a block's elements decode to 0 whatever their codes), and the
    decoding scale ``scale = b / S``. Float32 subnormal intermediates are flushed to 0 (as
    XLA does), which matters only for ``amax`` below about 3e-35.
    """
    fmt = spec.format
    a = jnp.abs(xv)
    a = jnp.where(jnp.isnan(a), jnp.float32(0.0), a)  # TE's fmaxf skips NaN
    block_amax = jnp.max(a, axis=plan.reduce_axes, keepdims=True, initial=0.0)
    amax = jnp.max(block_amax, initial=0.0)
    e_max, b_max = float(spec.element.max), float(fmt.block_scale.max)  # type: ignore[union-attr]
    ok = (amax > 0) & jnp.isfinite(amax)
    t = rounding.divide(jnp.float32(e_max * b_max), jnp.where(ok, amax, 1.0))
    t = jnp.where(ok, jnp.minimum(t, _F32_MAX), 1.0)
    raw = block_amax * (t * jnp.float32(1.0 / e_max))
    if fmt.scale_floor > 0:
        raw = jnp.maximum(raw, jnp.float32(fmt.scale_floor))
    b = rounding.round_float(raw, fmt.block_scale, None, saturate=True)  # type: ignore[arg-type]
    tb = jnp.broadcast_to(t, b.shape)
    s = rounding.divide(b, tb)
    s_dec = rounding.divide(jnp.ones_like(tb), tb)
    inv = jnp.minimum(rounding.divide(jnp.ones_like(b), b * s_dec), _F32_MAX)
    return NVFP4Scales(block_amax, t, b, s, inv)


def compute_scale(lo: Array, hi: Array, spec: QuantSpec) -> tuple[Array, Array | None]:
    """(scale, zero_point) for the calibrated range ``[lo, hi]`` of each group."""
    qmin, qmax = spec.qrange
    if spec.format.kind == "mx":
        if spec.format.tensor_scale:
            raise ValueError(
                f"{spec.format.name}: its two-level scales come from the whole tensor "
                "(nvfp4_scales), not from a range per group."
            )
        return _mx_scale(jnp.maximum(-lo, hi), spec), None
    if spec.symmetric:
        amax = jnp.maximum(-lo, hi) if qmin < 0 else jnp.maximum(hi, 0.0)
        # amax / qmax, or amax / (qmax + 0.5) for the full integer grid (all 2^b codes).
        s = _guard_scale(_div_const(amax, spec.scale_divisor), amax > 0)
        return _round_scale(s, spec), None
    lo = jnp.minimum(lo, 0.0)  # the range must contain 0 so that 0 is exact
    hi = jnp.maximum(hi, 0.0)
    # hi - lo overflows float32 when both ends are beyond max / 2: halve both first (exact
    # for numbers that large) and double the quotient, the same correctly rounded value.
    width = hi - lo
    big = jnp.isinf(width)
    s = jnp.where(
        big,
        2.0 * _div_const(0.5 * hi - 0.5 * lo, qmax - qmin),
        _div_const(jnp.where(big, 0.0, width), qmax - qmin),
    )
    s = _guard_scale(s, hi > lo)
    s = _round_scale(s, spec)
    # qmin - round(lo / s) (PyTorch): rounding the float expression qmin - lo / s instead
    # can land on a false tie (-121.4999995 -> -121.5 -> -122).
    z = jnp.clip(qmin - jnp.round(rounding.divide(lo, s)), qmin, qmax)
    return s, z


# ------------------------------------------------------------------------ the core


def scale_input(x: Array, s: Array, z: Array | None = None, *, qmax: float = 4.0) -> Array:
    """The scaled value ``x * (1/s)`` that gets rounded (see the module docstring).

    ``z`` (asymmetric) is added *after* rounding (``round(x/s) + z``, as TFLite and PyTorch
    do); it is accepted here only for range tests such as the clipped STE's, which get
    ``x * (1/s) + z``.

    ``qmax`` is the grid's largest magnitude: below 4, a scale can exceed 2^126 (amax near
    float32's max), whose reciprocal would be a float32 subnormal that XLA flushes to 0. Such
    groups are scaled in two exact steps, ``(x * 2^-k) * (1/(s * 2^-k))``.
    """
    if qmax < 4.0:
        k = jnp.maximum(_exponent(s) - 125, 0)  # 0 (exact no-op) for every usual scale
        down = _pow2(-k)
        x = x * down
        s = s * down
    # One division per group, kept out of the per-element loop: the barrier and
    # reciprocal()'s division-last form (XLA would otherwise redo the per-group work for
    # every element).
    inv = jax.lax.optimization_barrier(rounding.reciprocal(s))
    y = x * inv
    return y if z is None else y + z


def noise_bits(spec: QuantSpec, key: Array | None, shape: tuple[int, ...]) -> Array | None:
    """uint32 random bits for stochastic rounding (None for nearest)."""
    if not spec.stochastic:
        return None
    assert key is not None
    return rounding.random_bits(key, shape, impl=spec.rng)


def round_scaled(y: Array, spec: QuantSpec, bits: Array | None, z: Array | None = None) -> Array:
    """Round scaled values onto the element grid (float32 out; codebooks: indices).

    An asymmetric zero point is added to the rounded integer: ``clip(round(y) + z)``.
    """
    f = spec.element
    qmin, qmax = spec.qrange
    if rounding.is_float32_prefix(f):  # bf16: integer add-and-truncate, RNE or SR
        return rounding.round_float32_prefix(y, f, bits, saturate=spec.saturate)
    u = None if bits is None else rounding.uniform_from_bits(bits)
    if f.kind == "float":
        # Never `x.astype(fp8).astype(f32)`: XLA (xla_allow_excess_precision, on by default)
        # may delete such a round trip -- it did on an H200 -- leaving x unrounded. The
        # integer emulation cannot be elided and is exact on every backend.
        r = rounding.round_float(y, f, u, saturate=spec.saturate)
        return r if f.signed else jnp.maximum(r, 0.0)
    if f.kind == "int":
        if z is None:
            return rounding.round_int(y, qmin, qmax, u)
        return jnp.clip(rounding.round_to_integer(y, u) + z, qmin, qmax)
    assert f.codebook is not None
    return rounding.round_codebook(y, f.codebook, u).astype(jnp.float32)


def to_grid(y: Array, spec: QuantSpec) -> Array:
    """Map rounded values to the numbers they stand for (codebook index -> value)."""
    if spec.element.kind == "codebook":
        return rounding.table_lookup(y.astype(jnp.int32), np.asarray(spec.element.codebook))
    return y


def qdq_range(spec: QuantSpec) -> Callable[[Array, Array, Array], Array]:
    """qdq(x, lo, hi) for calibration searches (nearest rounding, no noise)."""
    det = spec.replace(rounding="nearest")

    def qdq(x: Array, lo: Array, hi: Array) -> Array:
        s, z = compute_scale(lo, hi, det)
        y = scale_input(x, s, qmax=scale_input_qmax(det))
        v = to_grid(round_scaled(y, det, None, z), det)
        return v * s if z is None else (v - z) * s

    return qdq


class Steps(NamedTuple):
    """Every intermediate of one quantizer call (float32, in the plan's blocked view).

    ``lo`` / ``hi``: the calibrated range per group (None for a plain cast or a given
    scale); ``s`` / ``z``: scale and zero point; ``y``: the scaled values ``x * (1/s)``
    before rounding; ``r``: the rounded values (zero point included; codebooks: indices).
    """

    lo: Array | None
    hi: Array | None
    s: Array
    z: Array | None
    y: Array
    r: Array
    plan: Plan


def ste_bounds(spec: QuantSpec) -> tuple[float, float]:
    """The scaled values ``x * (1/s) + z`` where the clipped straight-through estimator
    passes the gradient: ``[qmin, qmax]``; for ``int_grid="full"`` its calibrated range
    ``[-(qmax + 0.5), qmax + 0.5]``, so the largest ``+amax`` (scaled to ``qmax + 0.5``,
    rounded to ``qmax`` like any value within half a step) keeps its gradient."""
    qmin, qmax = spec.qrange
    if spec.int_grid == "full":
        return -spec.scale_divisor, spec.scale_divisor
    return float(qmin), float(qmax)


def scale_input_qmax(spec: QuantSpec) -> float:
    """The ``qmax=`` to give :func:`scale_input` for ``spec``: the smallest number its
    calibrated scale divides amax by, which decides whether a scale can exceed 2^126.

    ``max(|qmin|, qmax)`` except for symmetric integer grids, whose scale is
    ``amax / scale_divisor``: int3's full grid divides by 3.5 although it reaches -4.
    Every caller of :func:`scale_input` with a calibrated scale passes this.
    """
    qmin, qmax = spec.qrange
    if spec.symmetric and spec.element.kind == "int" and spec.format.kind != "mx":
        return spec.scale_divisor
    return float(max(-qmin, qmax))


def to_float32(x: Array) -> Array:
    """The float32 values the quantizer works on: narrower inputs exactly, float64 (x64)
    rounded to odd (see :func:`rounding.float64_to_float32_odd`)."""
    if x.dtype == jnp.float64:
        return rounding.float64_to_float32_odd(x)
    return x.astype(jnp.float32)


def _steps(
    x: Array,
    spec: QuantSpec,
    key: Array | None,
    scale: Array | None,
    zero_point: Array | None = None,
    *,
    rounded: bool = True,
) -> Steps:
    """The quantizer: calibrate, scale, round. ``rounded=False``: see :func:`quantize_core`."""
    if spec.format.tensor_scale:
        return _nvfp4_steps(x, spec, key, rounded=rounded)[0]
    plan = spec.granularity.plan(tuple(x.shape))
    xv = to_float32(x).reshape(plan.view)
    lo = hi = None
    if scale is not None:
        s = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), plan.scale_shape)
        z = None
        if zero_point is not None:
            # An integer grid point (a given half-integer would be stored truncated).
            z = jnp.round(jnp.broadcast_to(jnp.asarray(zero_point, jnp.float32), plan.scale_shape))
        elif not spec.symmetric:
            raise ValueError("an asymmetric spec with a given scale also needs zero_point=.")
    elif spec.calibration is None:
        s = jnp.ones(plan.scale_shape, jnp.float32)
        z = None
    elif x.size == 0:
        s = jnp.ones(plan.scale_shape, jnp.float32)
        z = None if spec.symmetric else jnp.zeros(plan.scale_shape, jnp.float32)
    else:
        lo, hi = spec.calibration(xv, plan.reduce_axes, spec.symmetric, qdq_range(spec))
        lo, hi = jax.lax.stop_gradient(lo), jax.lax.stop_gradient(hi)
        s, z = compute_scale(lo, hi, spec)
    # A plain cast (no calibration, no given scale) must not multiply by s = 1: XLA's CPU
    # backend flushes float32 subnormals in multiplies, and bf16 has subnormals there.
    if _unit_scale(spec, scale):
        y = xv
    elif isinstance(spec.calibration, TWN) and scale is None:
        # Ternary weight networks round at the threshold delta, not at alpha / 2.
        delta = jax.lax.stop_gradient(spec.calibration.delta(xv, plan.reduce_axes))
        y = scale_input(xv, _guard_scale(2.0 * delta, delta > 0), qmax=scale_input_qmax(spec))
    else:
        y = scale_input(xv, s, qmax=scale_input_qmax(spec))
    if not rounded:
        assert spec.element.kind == "float" and not spec.stochastic and spec.saturate
        fmax = float(spec.element.max)
        return Steps(lo, hi, s, z, y, jnp.clip(y, -fmax, fmax), plan)
    r = round_scaled(y, spec, noise_bits(spec, key, plan.view), z)
    return Steps(lo, hi, s, z, y, r, plan)


def _nvfp4_steps(
    x: Array, spec: QuantSpec, key: Array | None, *, rounded: bool = True
) -> tuple[Steps, NVFP4Scales]:
    """NVFP4's quantizer: two-level scales from the tensor, then the elements rounded
    (nearest-even or stochastic, saturating at the element's max). ``Steps.s`` is the
    effective block scale ``b / S``."""
    plan = spec.granularity.plan(tuple(x.shape))
    xv = to_float32(x).reshape(plan.view)
    sc = nvfp4_scales(xv, plan, spec)
    # Per-block factors, kept out of the per-element loop (as in scale_input).
    y = xv * jax.lax.optimization_barrier(sc.inv)
    amax = jax.lax.stop_gradient(sc.amax)
    if rounded:
        r = round_scaled(y, spec, noise_bits(spec, key, plan.view))
    else:
        fmax = float(spec.element.max)
        r = jnp.clip(y, -fmax, fmax)
    return Steps(-amax, amax, sc.scale, None, y, r, plan), sc


def quantize_core(
    x: Array,
    spec: QuantSpec,
    key: Array | None,
    scale: Array | None,
    zero_point: Array | None = None,
    *,
    rounded: bool = True,
) -> tuple[Array, Array, Array | None, Plan]:
    """(rounded values in the blocked view, scale, zero point, plan); all float32.

    ``rounded=False`` (nearest, saturating float specs only) returns the scaled values
    clipped to the format's range instead, for a caller that rounds them with the
    hardware's own round-to-nearest-even conversion into the format's dtype.
    """
    r, s, z = _core(x, spec, key, scale, zero_point, rounded)
    return r, s, z, spec.granularity.plan(tuple(x.shape))


@functools.partial(jax.jit, static_argnums=(1, 5))
def _core(
    x: Array,
    spec: QuantSpec,
    key: Array | None,
    scale: Array | None,
    zero_point: Array | None,
    rounded: bool,
) -> tuple[Array, Array, Array | None]:
    # One jitted call per (spec, shapes): a quantized product's operands are traced once,
    # not once for custom_vjp's primal and again for its forward pass, and equal layers
    # share one trace (issue 12 item 10: tracing was most of the compile time overhead).
    st = _steps(x, spec, key, scale, zero_point, rounded=rounded)
    return st.r, st.s, st.z


def trace(x: Array, spec: QuantSpec, key: Array | None = None) -> tuple[Steps, Array]:
    """Every intermediate of ``fake_quant(x, spec, key=key)`` and its result, from the same
    quantizer core in one compiled call (``jaxquant quantize`` prints these)."""
    st, out = _trace(x, spec, key)
    return st._replace(plan=spec.granularity.plan(tuple(x.shape))), out


@functools.partial(jax.jit, static_argnums=1)
def _trace(x: Array, spec: QuantSpec, key: Array | None) -> tuple[Steps, Array]:
    st = _steps(x, spec, key, None)
    out = _steps_output(st, spec, unit_scale=_unit_scale(spec, None), dtype=x.dtype)
    # The plan's ints must not become traced outputs: None here (the one Steps without a
    # plan; its callers read only the arrays), hence the ignore.
    return st._replace(plan=None), out  # type: ignore[arg-type]


def _unit_scale(spec: QuantSpec, scale: Array | None) -> bool:
    return spec.calibration is None and scale is None


# ---------------------------------------------------------------------- public API


def quantize(
    x: jax.typing.ArrayLike,
    spec: QuantSpec,
    *,
    key: Array | None = None,
    scale: jax.typing.ArrayLike | None = None,
    zero_point: jax.typing.ArrayLike | None = None,
) -> QArray:
    """Quantize ``x`` to a :class:`QArray`: ``q = clip(round(x * (1/s)) + z, qmin, qmax)``.

    Args:
      x: floating-point array (float32, bfloat16, float16, float64).
      spec: the :class:`QuantSpec`.
      key: PRNG key, required when ``spec.rounding == "stochastic"``.
      scale: a known scale (static or delayed scaling) broadcastable to the plan's
        ``scale_shape``; skips calibration.
      zero_point: the known zero point that goes with ``scale`` (asymmetric only).

    Returns:
      A QArray whose ``values`` are real low-precision storage (see
      :mod:`jaxquant._src.qarray` for the byte layout).

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> q = jq.quantize(jnp.array([-0.5, 0.3, 1.2, -2.1]), jq.QuantSpec("int8"))
      >>> q.values.tolist()
      [-30, 18, 73, -127]
    """
    x = check_input(x, "quantize")
    spec = check_spec(spec, "quantize")
    check_key(spec, key, "quantize")
    scale, zero_point = check_scale(x, spec, scale, zero_point, "quantize")
    return _quantize(x, key, scale, zero_point, spec)


@functools.partial(jax.jit, static_argnums=4)
def _quantize(
    x: Array, key: Array | None, scale: Array | None, zero_point: Array | None, spec: QuantSpec
) -> QArray:
    # One compiled program for eager and jit callers alike: same fusion, same numerics.
    if _use_kernel(x, spec, "quantize", scale, zero_point):
        return _quantize_one_pass(x, spec)
    if spec.format.tensor_scale:
        return _quantize_nvfp4(x, key, spec)
    r, s, z, plan = quantize_core(x, spec, key, scale, zero_point)
    return from_codes(r.reshape(plan.shape), s, z, spec, x.shape, x.dtype)


def from_codes(
    codes: Array,
    scale: Array,
    zero_point: Array | None,
    spec: QuantSpec,
    shape: tuple[int, ...],
    dtype: Any,
    tensor_scale: Array | None = None,
) -> QArray:
    """The QArray of rounded ``codes`` (on the spec's grid, in the array's own ``shape``):
    encoded to the format's storage, bit-packed along the last axis below 8 bits, scales and
    zero points cast to their storage dtypes (the byte layout of
    :mod:`jaxquant._src.qarray`). Every quantizer that rounds by itself (GPTQ) builds its
    result here, so its QArray is laid out exactly as :func:`quantize`'s."""
    values = encode(codes, spec.format)
    if spec.element.packed:
        if values.ndim == 0:
            values = values.reshape(1)
        values = pack(values, spec.element.bits)
    s_store = scale.astype(spec.scale_format.dtype)
    z_store = None if zero_point is None else zero_point.astype(zero_point_dtype(spec))
    return QArray(
        values,
        s_store,
        z_store,
        spec,
        tuple(shape),
        np.dtype(dtype),
        tensor_scale=tensor_scale,
    )


def _quantize_nvfp4(x: Array, key: Array | None, spec: QuantSpec) -> QArray:
    st, sc = _nvfp4_steps(x, spec, key)
    # b is on E4M3's grid, so its cast is exact; S is stored as it is (float32, shape ()).
    codes = st.r.reshape(st.plan.shape)
    return from_codes(codes, sc.block, None, spec, x.shape, x.dtype, tensor_scale=sc.tensor)


def _use_kernel(
    x: Array, spec: QuantSpec, op: str, scale: Array | None, zero_point: Array | None
) -> bool:
    """Whether the one-pass Pallas kernel computes this quantizer (GPU, block-local
    power-of-two scales: bit-identical to the jnp path, which stays the reference).

    Only MX formats for now: they matched the jnp path bit for bit on an H200, including
    the edge cases. The kernel also handles ``scale_format="e8m0"`` integer specs, but on
    blocks of float32 subnormals it disagreed with XLA:GPU (which flushes them), so those
    stay on the jnp path until that is settled.

    Single-device processes only: a ``pallas_call`` has no SPMD partitioning rule, so on a
    device mesh it would gather its input; the jnp path keeps the input's sharding.
    """
    return (
        spec.format.kind == "mx"
        # OCP MX float elements only: MXINT8 and NVFP4 are not in the kernel (yet).
        and spec.element.kind == "float"
        and not spec.format.tensor_scale
        and jax.device_count() == 1
        and scale is None
        and zero_point is None
        and kernels.supported(spec, tuple(x.shape), x.dtype, jax.default_backend(), op=op)
    )


def _quantize_one_pass(x: Array, spec: QuantSpec) -> QArray:
    scale_dtype = spec.scale_format.dtype
    assert scale_dtype is not None  # scale formats are floats: they all have a dtype

    def jnp_path(x: Array) -> tuple[Array, Array]:
        r, s, _, plan = quantize_core(x, spec, None, None, None)
        return encode(r.reshape(plan.shape), spec.format), s.astype(scale_dtype)

    def kernel(x: Array) -> tuple[Array, Array]:
        return kernels.block_quantize(x, spec, scale_dtype=scale_dtype)

    # platform_dependent: a GPU host lowering for CPU never sees the Triton call.
    values, s = jax.lax.platform_dependent(x, cuda=kernel, default=jnp_path)
    return QArray(values, s, None, spec, tuple(x.shape), np.dtype(x.dtype))


def zero_point_dtype(spec: QuantSpec) -> np.dtype:
    """dtype of a QArray's stored zero points: the smallest integer type holding the range."""
    qmin, qmax = spec.qrange
    for dt in (np.int8, np.uint8, np.int16):
        if np.iinfo(dt).min <= qmin and qmax <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.int32)


def fake_quant(
    x: jax.typing.ArrayLike,
    spec: QuantSpec,
    *,
    key: Array | None = None,
    scale: jax.typing.ArrayLike | None = None,
    zero_point: jax.typing.ArrayLike | None = None,
    ste: Literal["plain", "clipped"] = "plain",
) -> Array:
    """Quantize-dequantize ``x`` in its own dtype, with a straight-through gradient.

    Forward: ``dequantize(quantize(x))`` computed without materializing storage. Backward:
    the straight-through estimator (Bengio et al. 2013; References): ``ste="plain"``
    passes the gradient unchanged; ``ste="clipped"`` zeroes it where ``x`` was clipped
    (outside ``[qmin, qmax] * s``). The scale gets no gradient.

    Args:
      x, spec, key, scale, zero_point: as in :func:`quantize`.
      ste: ``"plain"`` or ``"clipped"``.

    Returns:
      An array of ``x``'s shape and dtype.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> y = jq.fake_quant(jnp.array([-0.5, 0.3, 1.2, -2.1]), jq.QuantSpec("int8"))
      >>> [round(v, 5) for v in y.tolist()]
      [-0.49606, 0.29764, 1.20709, -2.1]

    References:
      Bengio et al., "Estimating or Propagating Gradients Through Stochastic Neurons for
      Conditional Computation", https://arxiv.org/abs/1308.3432
    """
    x = check_input(x, "fake_quant")
    spec = check_spec(spec, "fake_quant")
    check_key(spec, key, "fake_quant")
    if ste not in ("plain", "clipped"):
        raise ValueError(f"fake_quant: ste must be 'plain' or 'clipped', got {ste!r}.")
    scale, zero_point = check_scale(x, spec, scale, zero_point, "fake_quant")
    return _fake_quant(x, key, scale, zero_point, spec, ste)


def _qdq(
    x: Array, key: Array | None, scale: Array | None, zero_point: Array | None, spec: QuantSpec
) -> tuple[Array, Array, Array | None]:
    st = _steps(x, spec, key, scale, zero_point)
    out = _steps_output(st, spec, unit_scale=_unit_scale(spec, scale), dtype=x.dtype)
    return out, st.s, st.z


def _steps_output(st: Steps, spec: QuantSpec, *, unit_scale: bool, dtype: Any) -> Array:
    """``(q - z) * s`` in ``dtype`` from the quantizer's steps (fake_quant's forward)."""
    # float64 callers get the product in float64 (exact: grid values and scales are float32).
    v, s = widen(to_grid(st.r, spec), dtype), widen(st.s, dtype)
    z = None if st.z is None else widen(st.z, dtype)
    out = v if unit_scale else (v * s if z is None else (v - z) * s)
    if spec.element.kind == "codebook":
        # A codebook has no NaN code; storage maps NaN to a value, but fake_quant keeps it.
        out = jnp.where(jnp.isnan(st.y), jnp.asarray(np.nan, out.dtype), out)
    return out.reshape(st.plan.shape).astype(dtype)


@jax.custom_vjp
def _ste_identity(x: Array, y: Array, mask: Array | None) -> Array:
    del x, mask
    return y


def _ste_fwd(x: Array, y: Array, mask: Array | None) -> tuple[Array, Array | None]:
    return y, mask


def _ste_bwd(mask: Array | None, g: Array) -> tuple[Array, Array, None]:
    gx = g if mask is None else jnp.where(mask, g, jnp.zeros_like(g))
    return gx, jnp.zeros_like(g), None


_ste_identity.defvjp(_ste_fwd, _ste_bwd)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _fake_quant(
    x: Array,
    key: Array | None,
    scale: Array | None,
    zero_point: Array | None,
    spec: QuantSpec,
    ste: str,
) -> Array:
    if ste == "plain" and _use_kernel(x, spec, "fake_quant", scale, zero_point):
        xs = jax.lax.stop_gradient(x)
        y = jax.lax.platform_dependent(
            xs,
            cuda=lambda xs: kernels.block_fake_quant(xs, spec),
            default=lambda xs: _qdq(xs, None, None, None, spec)[0],
        )
        return _ste_identity(x, y, None)
    y, s, z = _qdq(jax.lax.stop_gradient(x), key, scale, zero_point, spec)
    mask = None
    if ste == "clipped" and spec.format.tensor_scale:
        # NVFP4's scaled values are x * (S / b); the clipped ones lie outside +-6.
        st, _ = _nvfp4_steps(jax.lax.stop_gradient(x), spec, None, rounded=False)
        fmax = float(spec.element.max)
        mask = ((st.y >= -fmax) & (st.y <= fmax)).reshape(x.shape)
    elif ste == "clipped":
        plan = spec.granularity.plan(tuple(x.shape))
        lo, hi = ste_bounds(spec)
        xv = to_float32(jax.lax.stop_gradient(x)).reshape(plan.view)
        t = scale_input(xv, s, z, qmax=scale_input_qmax(spec))
        mask = ((t >= lo) & (t <= hi)).reshape(x.shape)
    return _ste_identity(x, y, mask)
