"""One-pass Pallas (Triton) kernels for per-block quantization with power-of-two scales.

XLA compiles a quantizer with block-local scales (``per_block`` along the last axis, MX
formats) into two passes over the input: a reduce kernel for each block's absmax, then an
elementwise kernel that reads ``x`` again. Each program here loads a tile of whole blocks,
reduces every block in registers, scales, rounds and writes it: one read of ``x``, one write
of the output.

The kernels cover exactly the cases whose result does not depend on how a division, a
reciprocal or a transcendental function is rounded, so they are bit-identical to the jnp
path of :func:`jaxquant.fake_quant` / :func:`jaxquant.quantize` on every backend:

* MX formats: ``s = 2^clip(floor(log2 amax) - emax_elem, -126, 127)`` (OCP MX v1.0, as
  jaxquant clamps it to float32's normal range), ``floor(log2 amax)`` read from amax's
  exponent bits; ``s = 1`` for an all-zero block.
* ``per_block`` specs with ``scale_format="e8m0"``: jaxquant rounds ``fl(amax / qmax)`` up
  to a power of two. That equals ``2^ceil(log2(amax / qmax))`` of the exact quotient, which
  the kernel reads off the bits. Proof: write ``q = qmax = c 2^j`` with ``c`` odd, ``c < 2^24``.
  For ``c = 1`` the quotient is exact. Otherwise round-to-nearest-even gives
  ``fl(a/q) <= 2^p`` iff ``a/q <= 2^p (1 + 2^-24)`` (a tie goes to the even ``2^p``), i.e.
  ``a / 2^(p+j) <= c + c 2^-24``. The left side has a 24-bit significand, and the next such
  number after ``c`` is ``c + 2^(t-23)`` with ``t = floor(log2 c)``, which exceeds
  ``c + c 2^-24``; so the condition is ``a <= q 2^p``, the rounding never matters, and with
  ``a = ma 2^ea``, ``q = mq 2^eq`` (``ma, mq`` in ``[1, 2)``),
  ``ceil(log2(a/q)) = ea - eq + [ma > mq]``. Quotients below ``2^-126`` (including a
  subnormal amax) give ``2^-126`` on both paths, as jaxquant clamps the scale there.
* In both, ``1/s`` is an exact power of two in float32's normal range (e8m0 specs need
  ``qmax >= 4``, so ``s <= 2^126``), ``x * (1/s)`` and ``v * s`` are the same single
  multiplies as the jnp path, and rounding uses integer exponent arithmetic and ``floor``
  (Triton has no ``round``): round-half-to-even is ``floor(t) + [frac > 1/2 or
  (frac = 1/2 and floor(t) odd)]`` on ``t = |y|``, all exact.

The float operations that a backend flushing float32 subnormals (XLA:CPU, which also runs
``interpret=True``) treats differently are the jnp path's own: ``amax > 0``, ``x * (1/s)``,
``v * s``; so such a backend flushes them alike on both paths. Triton's float
``min``/``max`` ignore NaN, so the kernels saturate with selects and reduce the absmax on
the integer bits of ``|x|`` (non-finite values masked to 0).

NaN/Inf policy (as jaxquant's): the absmax ignores non-finite values; ``+-Inf`` saturates to
``+-max``; NaN stays NaN in ``fake_quant`` (compare NaNs by position: their payload is not
specified), becomes the format's NaN code (sign kept, as ml_dtypes casts do) in float8
storage and 0 in integer storage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from jaxquant._src.calibration import AbsMax, MinMax
from jaxquant._src.formats import Format
from jaxquant._src.granularity import PerBlock
from jaxquant._src.spec import QuantSpec

try:  # the Triton compiler parameters (jax >= 0.4.36 spells them CompilerParams)
    from jax.experimental.pallas import triton as _plgpu

    # TritonCompilerParams: jax < 0.4.36's name, absent from newer jax's stubs.
    _CompilerParams = getattr(_plgpu, "CompilerParams", None) or _plgpu.TritonCompilerParams  # type: ignore[attr-defined]
except (ImportError, AttributeError):  # pragma: no cover - a jax without Pallas-Triton
    _CompilerParams = None

Array = jax.Array

TILE_ELEMS = 8192  # elements per program (a power of two); 32 KiB of float32 input
MIN_TILE_ELEMS = 1024  # supported() declines shapes that only allow smaller tiles
MAX_BLOCK = 8192  # largest block size (the whole block is one program's registers)
_SCALE_EXP_MIN = -126  # jaxquant keeps power-of-two scales in float32's normal range
_SCALE_EXP_MAX = 127
_SIGN = -(2**31)  # int32 0x80000000
_ABS = 0x7FFFFFFF
_INF_BITS = 0x7F800000
_GPU_BACKENDS = ("gpu", "cuda")
_E8M0 = np.dtype(jnp.float8_e8m0fnu)
_disabled = False


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Make :func:`supported` return False inside the block, e.g. to trace the jnp path on a
    GPU for comparison. It acts when a dispatcher *traces*: a function jit-compiled earlier
    keeps the path it was traced with.
    """
    global _disabled
    before, _disabled = _disabled, True
    try:
        yield
    finally:
        _disabled = before


# ------------------------------------------------------------------------ static plan


@dataclasses.dataclass(frozen=True)
class _Params:
    """Everything static the kernel needs (hashable: a jit static argument)."""

    block: int  # B, elements per scale
    tile_blocks: int  # blocks per program (a power of two dividing the block count)
    mx: bool  # MX scale rule; else e8m0 rounding up of amax / qmax
    emax: int  # MX: the element format's emax
    q_exp: int  # e8m0: floor(log2 qmax)
    q_mant: int  # e8m0: qmax's 23 mantissa bits
    is_float: bool  # element kind: float (else int)
    man_bits: int
    emin: int
    fmax: float  # float: largest finite element value
    qmin: float  # int: the clip range
    qmax: float


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _float_ok(f: Format) -> bool:
    return (
        f.kind == "float"
        and f.signed
        and f.man_bits >= 1
        and f.bits <= 8
        and f.nan_style != "fnuz"
        and f.emin - f.man_bits >= -126
    )


def _reason(spec: QuantSpec, shape: tuple[int, ...], dtype, op: str) -> str | None:
    """Why the kernel does not apply (None if it does). ``op``: "fake_quant"/"quantize"."""
    if not isinstance(spec, QuantSpec):
        return f"spec must be a QuantSpec, got {type(spec).__name__}"
    if np.dtype(dtype) not in (np.dtype(np.float32), np.dtype(jnp.bfloat16)):
        return f"input dtype must be float32 or bfloat16, got {np.dtype(dtype)}"
    g = spec.granularity
    if not isinstance(g, PerBlock):
        return f"granularity must be per_block(-1, B), got {g}"
    if len(shape) == 0 or g.axis not in (-1, len(shape) - 1):
        return f"per_block must be along the last axis, got {g} for shape {tuple(shape)}"
    b, n = g.size, shape[-1]
    if not (_pow2(b) and 2 <= b <= MAX_BLOCK):
        return f"block size must be a power of two in [2, {MAX_BLOCK}], got {b}"
    if n % b or math.prod(shape) == 0:
        return f"the last axis ({n}) must be a non-zero multiple of the block size {b}"
    if type(spec.calibration) not in (AbsMax, MinMax):
        return f"calibration must be absmax(), got {spec.calibration}"
    if not spec.symmetric:
        return "only symmetric specs"
    if spec.rounding != "nearest":
        return "only rounding='nearest' (stochastic rounding stays on the jnp path)"
    if not spec.saturate:
        return "only saturate=True"
    f = spec.element
    if spec.format.kind == "mx":
        if not _float_ok(f) or f.emax < 2:
            return f"unsupported MX element format {f.name}"
    elif spec.scale_format.name != "float8_e8m0fnu":
        return f"non-MX specs need scale_format='e8m0', got {spec.scale_format.name}"
    elif spec.int_grid == "full":
        return "int_grid='full' (s = amax / (qmax + 0.5)) stays on the jnp path"
    elif spec.qrange[1] < 4:  # else s = 2^127 can occur and 1/s is subnormal
        return f"e8m0 scales need qmax >= 4, {f.name} has {spec.qrange[1]}"
    elif f.kind == "int":
        if not f.signed or f.bits not in (4, 5, 6, 7, 8, 16):
            return f"integer element format {f.name}: need signed int4..int8 or int16"
    elif not _float_ok(f):
        return f"element format {f.name} is not a signed 4..8-bit float with a mantissa"
    if op == "quantize":
        if f.kind == "int" and f.bits not in (8, 16):
            return f"quantize packs {f.name} codes; only int8/int16 storage is written here"
        if f.kind == "float" and (f.bits != 8 or f.dtype is None):
            return f"quantize packs {f.name} codes; only float8 storage is written here"
    elif op != "fake_quant":
        return f"op must be 'fake_quant' or 'quantize', got {op!r}"
    return None


def _tile_blocks(n_blocks: int, block: int, tile_elems: int) -> int:
    """Blocks per program: the largest power of two dividing n_blocks, <= tile_elems / B."""
    cap = max(1, tile_elems // block)
    return min(n_blocks & -n_blocks, 1 << (cap.bit_length() - 1))


def _params(spec: QuantSpec, shape: tuple[int, ...], tile_elems: int) -> _Params:
    f = spec.element
    assert isinstance(spec.granularity, PerBlock)  # _reason refused the other granularities
    b = spec.granularity.size
    qmin, qmax = spec.qrange
    q_exp = q_mant = 0
    if spec.format.kind != "mx":
        q = np.float32(qmax)
        q_exp = int(np.frexp(q)[1]) - 1
        q_mant = int(np.asarray(q).view(np.int32)) & 0x7FFFFF
    return _Params(
        block=b,
        tile_blocks=_tile_blocks(math.prod(shape) // b, b, tile_elems),
        mx=spec.format.kind == "mx",
        emax=f.emax,
        q_exp=q_exp,
        q_mant=q_mant,
        is_float=f.kind == "float",
        man_bits=f.man_bits,
        emin=f.emin,
        fmax=float(f.max) if f.kind == "float" else 0.0,
        qmin=float(qmin),
        qmax=float(qmax),
    )


def supported(
    spec: QuantSpec,
    shape: tuple[int, ...],
    dtype: jax.typing.DTypeLike,
    backend: str,
    *,
    op: str = "fake_quant",
) -> bool:
    """Whether :func:`block_fake_quant` / :func:`block_quantize` should handle this call.

    True on a GPU backend (``"gpu"``/``"cuda"``) for float32/bfloat16 inputs, symmetric
    absmax ``per_block(-1, B)`` specs with ``B`` a power of two in ``[2, 8192]`` dividing the
    last axis, round-to-nearest, saturating, and either an MX format or
    ``scale_format="e8m0"`` with a signed int4..int8/int16 or 4..8-bit float element
    (``quantize``: int8/int16/float8 storage only), and when the block count lets a program
    hold at least ``min(size, 1024)`` elements. Everything else (and every other backend)
    uses the jnp path.
    """
    if _disabled or backend not in _GPU_BACKENDS:
        return False
    shape = tuple(int(d) for d in shape)
    if _reason(spec, shape, dtype, op) is not None:
        return False
    total = math.prod(shape)
    assert isinstance(spec.granularity, PerBlock)  # _reason refused the other granularities
    b = spec.granularity.size
    tile = _tile_blocks(total // b, b, TILE_ELEMS) * b
    return tile >= min(total, MIN_TILE_ELEMS)


# ------------------------------------------------------------------- kernel maths


def _f32(bits: Array) -> Array:
    return lax.bitcast_convert_type(bits, jnp.float32)


def _i32(x: Array) -> Array:
    return lax.bitcast_convert_type(x, jnp.int32)


def _exp2i(k: Array) -> Array:
    """Exact float32 2^k for int32 k in [-126, 127]."""
    return _f32((k + 127) << 23)


def _round_half_even(t: Array) -> Array:
    """Round non-negative float32 ``t`` to the nearest integer, ties to even (Inf, NaN stay).

    ``t - floor(t)`` is exact for ``t >= 0``, and so is ``floor(t) / 2``: ``floor(t)`` is odd
    iff halving it leaves a fraction. (Pallas-Triton has no lowering for ``lax.round``; the
    ``(t + 2^23) - 2^23`` trick is not safe: XLA:CPU folds it away.)
    """
    lo = jnp.floor(t)
    frac = t - lo
    half = lo * 0.5
    odd = jnp.floor(half) != half
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    return jnp.where(up, lo + 1.0, lo)


def _with_sign(mag: Array, like_bits: Array) -> Array:
    """``copysign(mag, like)``: the magnitude bits of ``mag`` with the sign bit of ``like``."""
    return _f32((_i32(mag) & _ABS) | (like_bits & _SIGN))


def _round_float(y: Array, p: _Params) -> Array:
    """``rounding.round_float(y, fmt)`` (nearest, saturating) in Triton-lowerable ops.

    The quantum of ``|y|`` is ``2^(max(e, emin) - m)`` (``e``: its float32 exponent);
    ``|y| / quantum`` and back are single exact multiplies by normal powers of two (the jnp
    path splits them in two halves; both are exact, so the results agree).
    """
    yb = _i32(y)
    mag = yb & _ABS
    neg_qe = p.man_bits + 127 - jnp.maximum(mag >> 23, p.emin + 127)  # >= m - 128
    neg_qe = jnp.maximum(neg_qe, -126)  # only Inf/NaN (e = 128) with m = 1 go below
    t = _f32(mag) * _exp2i(neg_qe)  # |y| / quantum, exact
    out = _round_half_even(t) * _exp2i(-neg_qe)
    out = jnp.where(out > p.fmax, jnp.float32(p.fmax), out)  # Inf -> max; NaN stays
    return _with_sign(out, yb)


def _round_int(y: Array, p: _Params) -> Array:
    """``clip(round(y), qmin, qmax)`` with rounding half to even (NaN stays NaN)."""
    yb = _i32(y)
    r = _round_half_even(_f32(yb & _ABS))
    lim = jnp.where(yb < 0, jnp.float32(-p.qmin), jnp.float32(p.qmax))
    r = jnp.where(r > lim, lim, r)
    return _with_sign(r, yb)


def _scale_exponent(amax_bits: Array, p: _Params) -> Array:
    """int32 k with s = 2^k, from the bits of each block's finite absmax (>= 0)."""
    e = (amax_bits >> 23) - 127  # floor(log2 amax); -127 for a subnormal amax
    if p.mx:
        k = e - p.emax
    else:  # ceil(log2(amax / qmax)), see the module docstring
        k = e - p.q_exp + ((amax_bits & 0x7FFFFF) > p.q_mant).astype(jnp.int32)
        k = jnp.where(amax_bits >= 0x00800000, k, _SCALE_EXP_MIN)
    k = jnp.clip(k, _SCALE_EXP_MIN, _SCALE_EXP_MAX)
    # A float compare, as the jnp path's ``amax > 0`` (a flushing backend flushes both).
    return jnp.where(_f32(amax_bits) > 0.0, k, 0)


def _quantize_tile(x: Array, p: _Params) -> tuple[Array, Array]:
    """(values on the element grid, signed, float32; scale exponents (tile_blocks,))."""
    x = x.astype(jnp.float32)
    mag = _i32(x) & _ABS
    amax_bits = jnp.max(jnp.where(mag < _INF_BITS, mag, 0), axis=1)
    k = _scale_exponent(amax_bits, p)
    y = x * _exp2i(-k)[:, None]  # x * (1/s), exact reciprocal
    v = _round_float(y, p) if p.is_float else _round_int(y, p)
    return v, k


def _float8_codes(v: Array, f: Format) -> Array:
    """Bit patterns (int32) of float32 values ``v`` already on float8 format ``f``'s grid."""
    m = f.man_bits
    vb = _i32(v)
    mag = vb & _ABS
    normal = (((mag >> 23) - 127 + f.bias) << m) | ((mag >> (23 - m)) & ((1 << m) - 1))
    sub = (_f32(mag) * jnp.float32(2.0 ** (m - f.emin))).astype(jnp.int32)  # exact, < 2^m
    code = jnp.where(mag < ((f.emin + 127) << 23), sub, normal)
    top = (1 << (f.bits - 1)) - 1
    nan_code = top if f.nan_style == "fn" else top & ~((1 << (m - 1)) - 1)  # quiet NaN
    code = jnp.where(mag > _INF_BITS, nan_code, code)
    return code | jnp.where(vb < 0, 1 << (f.bits - 1), 0)


# ---------------------------------------------------------------------- pallas calls


def _fake_kernel(x_ref, o_ref, *, p: _Params):
    v, k = _quantize_tile(x_ref[...], p)
    o_ref[...] = (v * _exp2i(k)[:, None]).astype(o_ref.dtype)


def _quant_kernel(x_ref, v_ref, s_ref, *, p: _Params, fmt: Format):
    v, k = _quantize_tile(x_ref[...], p)
    if fmt.kind == "float":
        v_ref[...] = _float8_codes(v, fmt).astype(v_ref.dtype)
    else:
        v_ref[...] = jnp.where(v != v, 0.0, v).astype(v_ref.dtype)  # NaN stores as 0
    if s_ref.dtype == jnp.uint8:  # e8m0 codes: the biased exponent
        s_ref[...] = (k + 127).astype(jnp.uint8)
    else:
        s_ref[...] = _exp2i(k)


def _compiler_params(p: _Params):
    """Triton launch parameters: 8 warps for 8192-element tiles, no software pipelining."""
    if _CompilerParams is None:
        return None
    warps = 8 if p.tile_blocks * p.block >= 8192 else 4
    try:
        return _CompilerParams(num_warps=warps, num_stages=1)
    except TypeError:  # a jax whose CompilerParams changed fields: Triton's defaults
        return None


def _call(x: Array, p: _Params, outs, kernel, interpret: bool):
    """Run ``kernel`` over tiles of ``tile_blocks`` blocks of the ``(n_blocks, B)`` view.

    ``outs``: ``(per_block, dtype)`` per output: ``per_block`` is ``(B,)`` for an
    element-wise output (a ``(tile_blocks, B)`` tile) or ``()`` for one value per block.
    """
    n_blocks = x.size // p.block
    tb = p.tile_blocks
    tile = pl.BlockSpec((tb, p.block), lambda i: (i, 0))
    per_block = pl.BlockSpec((tb,), lambda i: (i,))
    return pl.pallas_call(
        kernel,
        out_shape=tuple(jax.ShapeDtypeStruct((n_blocks, *sh), dt) for sh, dt in outs),
        grid=(n_blocks // tb,),
        in_specs=[tile],
        out_specs=tuple(tile if sh else per_block for sh, _ in outs),
        interpret=interpret,
        compiler_params=None if interpret else _compiler_params(p),
        name="jaxquant_block_quant",
    )(x.reshape(n_blocks, p.block))


def _check(x: jax.typing.ArrayLike, spec: QuantSpec, op: str) -> Array:
    x = jnp.asarray(x)
    why = _reason(spec, tuple(x.shape), x.dtype, op)
    if why is not None:
        raise NotImplementedError(
            f"block_{op}: the one-pass kernel does not handle {spec} on {x.dtype}"
            f"{list(x.shape)}: {why}. Use jq.{op}, which covers every spec."
        )
    return x


@functools.partial(jax.jit, static_argnames=("spec", "interpret", "tile_elems"))
def _fake_quant_impl(x: Array, spec: QuantSpec, interpret: bool, tile_elems: int) -> Array:
    p = _params(spec, tuple(x.shape), tile_elems)
    kernel = functools.partial(_fake_kernel, p=p)
    (out,) = _call(x, p, [((p.block,), x.dtype)], kernel, interpret)
    return out.reshape(x.shape)


@functools.partial(jax.jit, static_argnames=("spec", "interpret", "tile_elems", "scale_dtype"))
def _quantize_impl(
    x: Array, spec: QuantSpec, interpret: bool, tile_elems: int, scale_dtype: np.dtype
) -> tuple[Array, Array]:
    p = _params(spec, tuple(x.shape), tile_elems)
    fmt = spec.element
    code_dtype = jnp.uint8 if fmt.kind == "float" else fmt.storage_dtype
    s_dtype = jnp.uint8 if scale_dtype == _E8M0 else jnp.float32
    kernel = functools.partial(_quant_kernel, p=p, fmt=fmt)
    codes, s = _call(x, p, [((p.block,), code_dtype), ((), s_dtype)], kernel, interpret)
    values = codes.reshape(x.shape)
    if fmt.kind == "float":
        values = lax.bitcast_convert_type(values, fmt.storage_dtype)
    if scale_dtype == _E8M0:
        s = lax.bitcast_convert_type(s, _E8M0)
    return values, s.reshape(*x.shape[:-1], x.shape[-1] // p.block, 1)


def block_fake_quant(
    x: jax.typing.ArrayLike,
    spec: QuantSpec,
    *,
    interpret: bool = False,
    tile_elems: int = TILE_ELEMS,
) -> Array:
    """Quantize-dequantize ``x`` with power-of-two block scales in one pass over memory.

    The forward value of ``jq.fake_quant(x, spec)`` (bit for bit; NaN where it has NaN) for
    the specs :func:`supported` accepts: per block ``i`` of ``B`` contiguous elements of the
    last axis, ``amax_i = max |x|`` over its finite values, ``s_i = 2^k_i`` (module
    docstring), ``y = round(x * 2^-k_i)`` saturated onto the element grid, ``out = y s_i``.
    No gradient rule: callers pass ``stop_gradient(x)`` and attach the straight-through
    estimator themselves, as ``jq.fake_quant`` does.

    Args:
      x: float32 or bfloat16 array whose last axis is a multiple of ``B``.
      spec: an MX spec, or a ``per_block(-1, B)`` spec with ``scale_format="e8m0"``.
      interpret: run the kernel in Pallas' interpreter (any backend; for tests).
      tile_elems: elements per program (a power of two); a tuning knob.

    Returns:
      An array of ``x``'s shape and dtype.

    Raises:
      NotImplementedError: for a spec/shape/dtype the kernel does not cover (the message
        says which condition failed); use ``jq.fake_quant`` for those.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> from jaxquant._src.kernels import block_fake_quant
      >>> x = jnp.linspace(-1.0, 1.0, 64, dtype=jnp.float32).reshape(2, 32)
      >>> y = block_fake_quant(x, jq.QuantSpec("mxfp4"), interpret=True)
      >>> bool((y == jq.fake_quant(x, jq.QuantSpec("mxfp4"))).all())
      True
    """
    x = _check(x, spec, "fake_quant")
    return _fake_quant_impl(x, spec, bool(interpret), _tile_arg(tile_elems))


def block_quantize(
    x: jax.typing.ArrayLike,
    spec: QuantSpec,
    *,
    interpret: bool = False,
    tile_elems: int = TILE_ELEMS,
    scale_dtype: jax.typing.DTypeLike = jnp.float32,
) -> tuple[Array, Array]:
    """``(values, scale)`` of ``jq.quantize(x, spec)`` in one pass, for 8/16-bit elements.

    Args:
      x, spec, interpret, tile_elems: as in :func:`block_fake_quant`; the element format
        must be stored unpacked (int8, int16, float8 e4m3/e5m2/...).
      scale_dtype: ``float32`` (default) or ``float8_e8m0fnu``: the scales written as e8m0
        codes directly (what ``QArray.scale`` stores; saves the cast).

    Returns:
      ``values``: the codes in jaxquant's storage layout (``x``'s shape; float8 dtypes for
      float8 elements, int8/int16 for integers). ``scale``: the powers of two ``s`` of shape
      ``x.shape[:-1] + (x.shape[-1] // B, 1)`` (the plan's ``scale_shape``) in
      ``scale_dtype``; casting float32 scales to e8m0 is exact.

    Raises:
      NotImplementedError: as in :func:`block_fake_quant`.
      ValueError: for another ``scale_dtype``.
    """
    x = _check(x, spec, "quantize")
    sdt = np.dtype(scale_dtype)
    if sdt not in (np.dtype(np.float32), _E8M0):
        raise ValueError(f"scale_dtype must be float32 or float8_e8m0fnu, got {sdt}.")
    return _quantize_impl(x, spec, bool(interpret), _tile_arg(tile_elems), sdt)


def _tile_arg(tile_elems: int) -> int:
    if not (isinstance(tile_elems, int) and _pow2(tile_elems)):
        raise ValueError(f"tile_elems must be a power of two, got {tile_elems!r}.")
    return tile_elems
