"""Quantized ``dot_general`` / ``einsum`` with a custom VJP and real int8 / fp8 compute.

For operands ``a`` and ``b`` quantized symmetrically with scales ``s_a``, ``s_b`` that are
constant along the contracted axes::

    dot(a_hat, b_hat) = dot(q_a * s_a, q_b * s_b) = dot(q_a, q_b) * (s_a (x) s_b)

where ``q`` are the values on the format's grid and ``(x)`` is the outer product of the
per-row / per-column scales laid out like the output (batch, lhs free, rhs free). The dot
of the grid values runs in low precision when the hardware has it:

* int8 x int8: ``lax.dot_general(int8, int8, preferred_element_type=int32)`` (exact integer
  accumulation; overflows only past ``2^31 / 127^2 ~ 133 000`` contracted elements);
* fp8 x fp8 (e4m3fn / e5m2, any mix the backend supports):
  ``lax.dot_general(f8, f8, preferred_element_type=float32)``;
* otherwise (other formats, mixed int8/fp8, no hardware support) the grid values are held
  in float32 and multiplied by a float32 dot ("emulated"). Grid values are exact in
  float32 (and in TF32 / bf16, which GPUs and TPUs use for a default-precision float32
  dot, for every format of at most 8 bits but NF4), so only the accumulation order
  differs from the real path.

:func:`dot_capabilities` says which of these the backend runs natively; ``mode="auto"``
follows it, ``mode="real"`` always emits the int8 / fp8 ``dot_general`` (on CPU, XLA then
converts fp8 operands to f32 itself), ``mode="emulate"`` never does.

The backward pass (straight-through for the operands' quantizers) quantizes the incoming
gradient with ``grad_spec`` and computes ``dlhs = dot(g_q, rhs_q)`` and
``drhs = dot(g_q, lhs_q)`` from the quantized operands saved by the forward pass (in their
low-precision storage, so the residuals are small). Each backward dot factors its scales
out like the forward one when they are constant along *its* contracted axes (per-tensor
scales always are); when they are not -- a per-output-channel weight scale lies along the
axis ``dlhs`` contracts -- that factor is dequantized and the dot is a float32 one.

Operands whose scales change along a contracted axis (per-block and MX specs, a
per-channel scale on a contracted axis) cannot be factored out; with ``mode="auto"`` or
``"emulate"`` such an operand is quantized and dequantized (float32) before a float dot --
weight-only int4 groups, MX recipes -- and ``mode="real"`` refuses it.

NaN: the emulated path propagates NaN like ``fake_quant``; int8 storage, having no NaN,
stores it as 0 (as :func:`jaxquant.quantize` does).
"""

from __future__ import annotations

import dataclasses
import functools
import string
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant._src import formats
from jaxquant._src.checks import describe
from jaxquant._src.granularity import PerBlock
from jaxquant._src.qarray import QArray, check_array, encode
from jaxquant._src.quantize import _check_scale, _core, _to_grid, scale_input
from jaxquant._src.serve import dot_qarray
from jaxquant._src.spec import QuantSpec

Array = jax.Array
Mode = Literal["auto", "real", "emulate"]
DimensionNumbers = tuple[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], ...]]

_FP8 = ("float8_e4m3fn", "float8_e5m2")
_ALL_FP8_PAIRS = tuple((a, b) for a in _FP8 for b in _FP8)
# cuBLASLt's fp8 GEMM takes e4m3 x e4m3, e4m3 x e5m2 and e5m2 x e4m3, not e5m2 x e5m2.
_CUBLASLT_FP8_PAIRS = tuple(p for p in _ALL_FP8_PAIRS if p != ("float8_e5m2", "float8_e5m2"))


# --------------------------------------------------------------------- capabilities


def _parse_cc(cc: Any) -> tuple[int, int] | None:
    try:
        major, minor = str(cc).split(".")[:2]
        return int(major), int(minor)
    except (ValueError, TypeError):
        return None


@functools.cache
def _capabilities(backend: str) -> dict[str, Any]:
    device = jax.devices(backend)[0]
    platform = device.platform
    cc_raw = getattr(device, "compute_capability", None)
    cc = _parse_cc(cc_raw)
    caps: dict[str, Any] = {
        "backend": backend,
        "platform": platform,
        "device_kind": device.device_kind,
        "compute_capability": None if cc_raw is None else str(cc_raw),
        "int8": False,
        "fp8": False,
        "fp8_pairs": (),
        "int8_path": "emulated",
        "fp8_path": "emulated",
    }
    if platform == "cpu":
        caps.update(
            int8=True,
            int8_path="real: XLA:CPU compiles s8 x s8 -> s32 dot_general to an s8 dot",
            fp8_path=(
                "emulated: XLA:CPU accepts an fp8 dot_general but converts both operands to "
                "f32 before the dot, so jaxquant multiplies the f32 grid values directly"
            ),
        )
    elif platform == "gpu" and cc is not None:  # CUDA
        int8 = cc >= (6, 1)
        fp8 = cc >= (8, 9)
        caps.update(
            int8=int8,
            fp8=fp8,
            fp8_pairs=_CUBLASLT_FP8_PAIRS if fp8 else (),
            int8_path="real: s8 x s8 -> s32 GEMM" if int8 else "emulated: compute capability < 6.1",
            fp8_path=(
                "real: f8 x f8 -> f32 cuBLASLt GEMM (e5m2 x e5m2 is emulated)"
                if fp8
                else f"emulated: compute capability {cc_raw} < 8.9 has no fp8 tensor cores"
            ),
        )
    elif platform in ("gpu", "rocm"):
        caps.update(
            int8=True,
            int8_path="real: s8 x s8 -> s32 GEMM",
            fp8_path="emulated: ROCm GPUs use the fnuz fp8 variants, not e4m3fn/e5m2",
        )
    elif platform == "tpu":
        caps.update(
            int8=True,
            int8_path="real: s8 x s8 -> s32 on the MXU",
            fp8_path="emulated: fp8 operands are upcast",
        )
    return caps


def dot_capabilities(backend: str | None = None) -> dict[str, Any]:
    """Whether ``backend`` multiplies int8 and fp8 operands natively.

    Decides the path of :func:`dot_general` with ``mode="auto"``: real int8 needs
    ``"int8"``, real fp8 needs ``"fp8"`` and the pair of fp8 formats in ``"fp8_pairs"``.

    * CPU: int8 real (XLA:CPU compiles an s8 x s8 -> s32 dot); fp8 emulated (XLA:CPU runs
      an fp8 dot_general by converting the operands to f32 first).
    * CUDA GPU: int8 real (compute capability >= 6.1); fp8 real from compute capability 8.9
      (Ada, Hopper, Blackwell) for e4m3 x e4m3, e4m3 x e5m2 and e5m2 x e4m3.
    * TPU: int8 real, fp8 emulated. ROCm: int8 real, fp8 emulated.

    Args:
      backend: ``"cpu"``, ``"gpu"``, ``"tpu"``...; default ``jax.default_backend()``.

    Returns:
      A dict with ``backend``, ``platform``, ``device_kind``, ``compute_capability`` (None
      when the device has none), ``int8`` and ``fp8`` (bool), ``fp8_pairs`` (tuple of
      (lhs, rhs) dtype names), ``int8_path`` and ``fp8_path`` (explanations).

    Example:
      >>> import jaxquant as jq
      >>> caps = jq.dot_capabilities("cpu")
      >>> caps["int8"], caps["fp8"]
      (True, False)
    """
    if backend is None:
        return dict(_capabilities(jax.default_backend()))
    if not isinstance(backend, str):
        raise TypeError(
            f"dot_capabilities: backend must be a backend name such as 'cpu', 'gpu' or 'tpu' "
            f"(or None for the default), got {describe(backend)}."
        )
    try:
        jax.devices(backend)
    except RuntimeError as err:  # unknown, or known but not present on this machine
        raise ValueError(
            f"dot_capabilities: backend {backend!r} is not available here ({err}). Pass one of "
            "this process's backends, or None for jax.default_backend()."
        ) from None
    return dict(_capabilities(backend))


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about one quantized dot (hashable: a jit static argument)."""

    dn: DimensionNumbers
    lhs_spec: QuantSpec | None
    rhs_spec: QuantSpec | None
    grad_spec: QuantSpec | None
    lhs_store: np.dtype | None  # low-precision storage of the operand's values, or None
    rhs_store: np.dtype | None  # (None: float32 grid values, the emulated path)
    grad_store: np.dtype | None
    fp8_pairs: tuple[tuple[str, str], ...]
    precision: Any
    out_dtype: np.dtype
    lhs_dtype: np.dtype
    rhs_dtype: np.dtype
    out_sharding: Any
    ste: str = "plain"  # "plain" or "clipped" (zero gradient where an operand saturated)
    fp8_lowering: str = "f32_out"  # "f32_out" | "half_out", see _FP8_LOWERING
    native_cast: bool = False  # see _NATIVE_FP8_CAST
    # fp8 pairs without an fp8 GEMM: widen to bf16 (exact for e4m3 / e5m2) and accumulate
    # in float32 -- the fp8 GEMM's own products and accumulator (serving; see serve.py).
    fp8_via_bf16: bool = False
    # GPU: int8 GEMMs of small shapes and fp8 GEMMs with non-leading batch axes go through
    # float32 (see _GPU_INT8_MIN, _fp8_gemm_ok).
    int8_guard: bool = False
    # CPU: a transposed product keeps the dot's own orientation when that has the wider
    # minor axis (see _keep_orientation).
    cpu_layout: bool = False


# How a real fp8 x fp8 dot is written for XLA (GPU only; CPU never takes these paths):
# * "half_out" (default): dot(f8, f8) -> the output dtype when it is bf16 / f16 (cuBLASLt
#   writes it directly), then times the scales in float32; rounds twice (the GEMM's
#   output, then the scaled value), within one unit of the output dtype's last place;
# * "f32_out": dot(f8, f8) -> float32, then times the scales: one rounding.
# On an H200 (3 x Dense 8192, batch 8192, fwd + bwd + SGD) half_out ran 1.44-1.50x the bf16
# step and f32_out 1.34-1.40x. The "dequantize, then dot" pattern (convert(f8) * s) that
# flax's fp8 ops write was not rewritten into an fp8 GEMM at all by jax 0.11 there
# (0.96-0.99x bf16): benchmarks/README.md.
_FP8_LOWERING = "half_out"
# Round fp8 operands of a real dot with the device's own conversion (after the scale and
# a clip to the format's range) instead of the integer emulation. Both round to nearest
# even -- bit-identical on an H200, edge cases included -- and the conversion is cheaper
# (1.24x -> 1.40x of bf16). Float32 copies of such values are decoded through their bits
# (_to_f32), so XLA cannot fold the rounding conversion away.
_NATIVE_FP8_CAST = True


def _normalize_dn(dn: Any) -> DimensionNumbers:
    try:
        (lc, rc), (lb, rb) = dn
        return (
            (tuple(int(a) for a in lc), tuple(int(a) for a in rc)),
            (tuple(int(a) for a in lb), tuple(int(a) for a in rb)),
        )
    except (TypeError, ValueError):
        raise TypeError(
            "dot_general: dimension_numbers must be ((lhs_contracting, rhs_contracting), "
            f"(lhs_batch, rhs_batch)), tuples of ints, got {dn!r}."
        ) from None


def _check_spec(spec: Any, name: str, fn: str) -> QuantSpec | None:
    if spec is None:
        return None
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{fn}: {name} must be a jq.QuantSpec or None, got {spec!r}.")
    if not spec.symmetric:
        raise ValueError(
            f"{fn}: {name} {spec} is asymmetric; a zero point does not factor out of a dot. "
            "Use symmetric=True."
        )
    return spec


def _check_operand(
    spec: QuantSpec | None,
    x: Array,
    contract: tuple[int, ...],
    batch: tuple[int, ...],
    name: str,
    mode: str,
) -> None:
    """With ``mode="real"``, the scales of a forward operand must be constant along its
    contracted axes (other modes dequantize such an operand before a float dot)."""
    if spec is None:
        return
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"dot_general: {name}_spec quantizes {name}, which must be floating point; got "
            f"dtype {x.dtype}. Cast it (x.astype(jnp.float32)) or pass {name}_spec=None."
        )
    if mode != "real":
        spec.granularity.plan(tuple(x.shape))  # shape errors now, with the spec's message
        return
    free = [i for i in range(x.ndim) if i not in contract and i not in batch]
    hint = (
        f"Use per_tensor(), or one scale per index of the non-contracted axes "
        f"{tuple(batch) + tuple(free)} of {name}: per_channel({', '.join(map(str, free))})"
        if free
        else "Use per_tensor()"
    )
    if len(contract) == 1:
        hint += f" or per_token({contract[0]})"
    if isinstance(spec.granularity, PerBlock):
        raise ValueError(
            f"dot_general: {name}_spec uses {spec.granularity} (format {spec.format.name}); "
            "block scales change along the contracted axis and cannot be factored out of "
            f"an int8 / fp8 dot (mode='real'). {hint}, or mode='auto' to dequantize the "
            "operand before a float dot."
        )
    plan = spec.granularity.plan(tuple(x.shape))
    bad = tuple(d for d in contract if plan.scale_shape[d] != 1)
    if bad:
        raise ValueError(
            f"dot_general: {name}_spec {spec.granularity} gives {name} (shape "
            f"{tuple(x.shape)}) a different scale at each index of axis "
            f"{bad[0] if len(bad) == 1 else bad}, "
            f"which dimension_numbers contract (contracting axes {contract}). Scales must be "
            f"constant along contracted axes to be factored out of an int8 / fp8 dot "
            f"(mode='real'). {hint}, or mode='auto' to dequantize the operand first."
        )


def _store_dtype(spec: QuantSpec | None, mode: str, caps: dict[str, Any]) -> np.dtype | None:
    """int8 / fp8 storage for the real path, None for float32 grid values."""
    if spec is None or mode == "emulate":
        return None
    name = spec.format.name
    if name == "int8":
        return np.dtype(np.int8) if mode == "real" or caps["int8"] else None
    if name in _FP8:
        return spec.format.storage_dtype if mode == "real" or caps["fp8"] else None
    return None


def _real_pair(a: QuantSpec | None, b: QuantSpec | None) -> bool:
    if a is None or b is None:
        return False
    an, bn = a.format.name, b.format.name
    return (an == bn == "int8") or (an in _FP8 and bn in _FP8)


# ---------------------------------------------------------------------- operand math


def _quantize_operand(
    x: Array,
    spec: QuantSpec | None,
    key: Array | None,
    scale: Array | None,
    store,
    native_cast: bool = False,
    clipped: bool = False,
) -> tuple[Array, Array | None, Array | None]:
    """(values, scale, mask): grid values (int8/fp8 storage or float32), the scale laid out
    like ``x`` (size 1 along shared axes) and, with ``clipped``, the clipped-STE mask (where
    ``x`` lies inside the quantizer's range; from the same scale, no second calibration).
    ``(x, None, None)`` for an operand left as it is. Block scales (which change along the
    blocked axis) are applied here: the values come back dequantized, in float32, with
    scale None."""
    if spec is None:
        return x, None, None
    native = (
        native_cast
        and spec.granularity.plan(tuple(x.shape)).view == tuple(x.shape)
        and store is not None
        and np.dtype(store).name in _FP8
        and not spec.stochastic
        and spec.saturate
    )
    r, s, _, plan = _core(x, spec, key, scale, rounded=not native)
    mask = None
    if clipped:
        qmin, qmax = spec.qrange
        t = scale_input(jax.lax.stop_gradient(x).astype(jnp.float32).reshape(plan.view), s, None)
        mask = ((t >= qmin) & (t <= qmax)).reshape(plan.shape)
    if native:  # the GPU's RNE conversion (cvt.rn.satfinite) rounds; values are in range
        return r.astype(store), s, mask
    if plan.view != plan.shape or _wide(spec):
        return (_to_grid(r, spec) * s).reshape(plan.shape), None, mask
    if store is not None:
        return encode(r, spec.format), s, mask
    return _to_grid(r, spec), s, mask


def _wide(spec: QuantSpec) -> bool:
    """Formats with float32's exponent range (bf16): an absmax scale is ~1e-38 and the grid
    values ~1e38, so the scales cannot be factored out of the dot (the product of two
    grid values overflows, that of two scales underflows). Such operands are multiplied
    dequantized."""
    return spec.element.kind == "float" and float(spec.element.max) > 2.0**64


def _scale_constant_along(s: Array | None, axes: tuple[int, ...]) -> bool:
    return s is None or all(s.shape[d] == 1 for d in axes)


def _out_factor(
    s: Array, batch: tuple[int, ...], contract: tuple[int, ...], n_other: int, first: bool
) -> Array:
    """Scale ``s`` (operand layout) laid out like the dot's output (batch, lhs, rhs)."""
    free = tuple(i for i in range(s.ndim) if i not in batch and i not in contract)
    t = jnp.transpose(s, (*batch, *free, *contract))
    t = t.reshape(t.shape[: len(batch) + len(free)])  # the contracted axes are all 1
    nb = len(batch)
    ones = (1,) * n_other
    shape = (*t.shape, *ones) if first else (*t.shape[:nb], *ones, *t.shape[nb:])
    return t.reshape(shape)


def _scaled_dot(
    a: Array,
    sa: Array | None,
    b: Array,
    sb: Array | None,
    dn: DimensionNumbers,
    cfg: _Config,
    out_sharding: Any = None,
    out_dtype: Any = jnp.float32,
    out_perm: tuple[int, ...] | None = None,
    b_dtype: Any = None,
    b_exact: bool = False,
) -> Array:
    """``dot_general(a * sa, b * sb, dn)``, low precision where the pair allows; float32,
    or ``out_dtype`` when a fused fp8 GEMM writes it directly. ``out_perm`` transposes the
    product right after the dot, before the scales are applied (a transpose of the dot
    itself, which XLA folds into the GEMM; the values are the same either way).

    ``b_dtype``: ``b``'s dtype before quantization. When ``b`` must be dequantized (its
    scale changes along the contracted axes) and ``a`` is already in that half-precision
    dtype, the dequantized ``b`` is rounded to it -- the value ``fake_quant`` gives a
    bf16 / f16 operand -- and the dot runs in half precision, as the transpose of a half
    precision dot does (the backward pass's ``g . w_hat``). ``b_exact``: ``b``'s float32
    grid values are exact in ``b_dtype`` (:func:`_grid_exact_in`), so a dot with an ``a``
    in that half-precision dtype runs in it too."""
    (ca, cb), (ba, bb) = dn
    if not _scale_constant_along(sa, ca):
        a, sa = _to_f32(a, cfg) * sa, None
    if not _scale_constant_along(sb, cb):
        b, sb = _to_f32(b, cfg) * sb, None
        if b_dtype is not None and np.dtype(b_dtype) in _HALF and a.dtype == b_dtype:
            b = b.astype(b_dtype)
    pair = (np.dtype(a.dtype).name, np.dtype(b.dtype).name)
    half = _exact_half(pair)
    if half is None and b_exact and sb is not None and a.dtype == b_dtype:
        half = np.dtype(b_dtype)
    # Explicitly DEFAULT for int8 / fp8 operands (a global jax_default_matmul_precision
    # of "highest" must not keep XLA from its int8 / fp8 GEMMs).
    precision: Any = lax.Precision.DEFAULT
    pet: Any = jnp.float32
    if pair == ("int8", "int8") and cfg.int8_guard and not _int8_gemm_ok(a.shape, b.shape, dn):
        # Exact: |products| <= 127^2, so float32 sums are exact up to K = 1040.
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        precision = lax.Precision.HIGHEST
    elif pair == ("int8", "int8"):
        pet = jnp.int32
    elif pair in cfg.fp8_pairs and (not cfg.int8_guard or _fp8_gemm_ok(dn)):
        # bf16 only: the GEMM's output is unscaled (|q| up to 448^2 * K), beyond float16.
        if cfg.fp8_lowering == "half_out" and np.dtype(out_dtype) == np.dtype(jnp.bfloat16):
            pet = out_dtype
    elif cfg.fp8_via_bf16 and pair[0] in _FP8 and pair[1] in _FP8 and not cfg.native_cast:
        a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    elif half is not None:  # exact in ``half``: the same products, accumulated in float32
        a, b = (v if v.dtype == half else _to_f32(v, cfg).astype(half) for v in (a, b))
    else:
        a, b = _to_f32(a, cfg), _to_f32(b, cfg)
        precision = cfg.precision
    kw = {} if out_sharding is None else {"out_sharding": out_sharding}
    out = lax.dot_general(a, b, dn, precision=precision, preferred_element_type=pet, **kw)
    if out_perm is not None:
        if cfg.cpu_layout and _keep_orientation(out.shape, out_perm):
            out = lax.optimization_barrier(out)
        out = jnp.transpose(out, out_perm)
    out = out.astype(jnp.float32)
    if _scalar(sa) and _scalar(sb):  # one scalar multiply (XLA can fuse it into the GEMM)
        scales = [s.reshape(()) for s in (sa, sb) if s is not None]
        if not scales:
            return out
        return out * (scales[0] * scales[1] if len(scales) == 2 else scales[0])
    fa = len([i for i in range(a.ndim) if i not in ca and i not in ba])
    fb = len([i for i in range(b.ndim) if i not in cb and i not in bb])
    perm = (lambda t: t) if out_perm is None else (lambda t: jnp.transpose(t, out_perm))
    if sa is not None:
        out = out * perm(_out_factor(sa, ba, ca, fb, first=True))
    if sb is not None:
        out = out * perm(_out_factor(sb, bb, cb, fa, first=False))
    return out


def _keep_orientation(shape: tuple[int, ...], perm: tuple[int, ...]) -> bool:
    """Whether to compute a transposed product in the dot's own orientation and transpose
    it afterwards (the barrier stops XLA from folding the transpose into the dot).

    XLA:CPU's dot of two operands contracted along their leading axis (the weight
    gradient ``x^T g``) is several times faster when its output's minor axis is the wider
    one: for the digits MLP's 512 x 10 layer, 42 us for ``[10, 512]`` against 200 us for
    ``[512, 10]`` (and the reverse for 64 x 512). A transpose folded into the dot gives it
    the requested layout, which is right for square and wide outputs; for narrow ones
    (fewer output columns than the dot's own minor axis) the dot keeps its orientation and
    the small transposed copy is nearly free. Same values either way (a transpose).
    """
    return shape[-1] > shape[perm[-1]]


# On an H200 (jax 0.11.2) XLA's s8 x s8 -> s32 dot *followed by the scaling epilogue* gave
# wrong results for small shapes -- off by a factor of 2, or garbage: K = 16 with N = 10
# or 4, K = 30, M = 24 with K = 16 / 32 -- while the bare s8 dot was exact on all 252 shapes
# probed (benchmarks/gpu_int8_probe.py, gpu_int8_probe2.py) and 8192-sized GEMMs
# (cuBLASLt) were right. Below these sizes (M, K, N) the product runs in float32 instead:
# exact, and too small to gain from int8; with this guard every int8 test passed there.
_GPU_INT8_MIN = (16, 64, 16)


def _fp8_gemm_ok(dn: DimensionNumbers) -> bool:
    """GPU fp8 GEMMs only with leading batch axes: the one fp8 case that failed on an
    H200 (NaN gradients; tests/test_dot.py, batch axis 1 of the lhs) was the only one whose
    batch axis was not leading. Others are emulated in float32 there."""
    (_, _), (ba, bb) = dn
    lead = tuple(range(len(ba)))
    return tuple(ba) == lead and tuple(bb) == lead


def _int8_gemm_ok(a_shape: tuple, b_shape: tuple, dn: DimensionNumbers) -> bool:
    (ca, cb), (ba, bb) = dn
    m = int(np.prod([d for i, d in enumerate(a_shape) if i not in ca and i not in ba]))
    n = int(np.prod([d for i, d in enumerate(b_shape) if i not in cb and i not in bb]))
    k = int(np.prod([a_shape[i] for i in ca]))
    return m >= _GPU_INT8_MIN[0] and k >= _GPU_INT8_MIN[1] and n >= _GPU_INT8_MIN[2]


def _to_f32(a: Array, cfg: _Config) -> Array:
    """float32 values of an operand. fp8 values rounded by the device's conversion
    (``native_cast``) are decoded through their bits: a ``convert`` back to float32 could
    be folded with the rounding one by XLA (``xla_allow_excess_precision``), which would
    silently skip the quantization."""
    if cfg.native_cast and np.dtype(a.dtype).name in _FP8:
        fmt = formats.get(np.dtype(a.dtype).name)
        table = jnp.asarray(formats.code_table(fmt).astype(np.float32))
        return table[jax.lax.bitcast_convert_type(a, jnp.uint8).astype(jnp.int32)]
    return a.astype(jnp.float32)


_HALF = (np.dtype(jnp.bfloat16), np.dtype(np.float16))
# Storage dtypes whose every value is exact in bfloat16 and float16: |int8| <= 128 needs 8
# significant bits (bf16 has 8, f16 11); fp8's 2-3 mantissa bits and exponents
# (e4m3fn 2^-9..448, e5m2 2^-16..57344) fit both.
_EXACT_IN_HALF = ("int8", *_FP8)


@functools.cache
def _grid_exact_in(spec: QuantSpec, dtype: np.dtype) -> bool:
    """Whether every grid value of ``spec`` (symmetric, at most 8 bits, not a codebook) is
    exact in the half-precision ``dtype``."""
    fmt = spec.element
    if not (spec.symmetric and fmt.kind in ("int", "float") and fmt.bits <= 8):
        return False
    v = formats.finite_values(fmt)
    return bool(np.array_equal(v.astype(dtype).astype(np.float64), v))


def _exact_half(pair: tuple[str, str]) -> np.dtype | None:
    """The half-precision dtype in which a dot of this dtype pair is exact (one operand
    already in it, the other in it or in :data:`_EXACT_IN_HALF`), or None. A bf16 / f16
    cotangent times int8 / fp8 grid values then multiplies in half precision with float32
    accumulation -- the same products as the float32 dot, at half the operand bytes (a
    tensor-core GEMM on GPUs) -- instead of widening both to float32."""
    for h in _HALF:
        if h.name in pair:
            other = pair[1] if pair[0] == h.name else pair[0]
            if other == h.name or other in _EXACT_IN_HALF:
                return h
    return None


def _scalar(s: Array | None) -> bool:
    return s is None or s.size == 1


def _remaining(n: int, *taken: tuple[int, ...]) -> tuple[int, ...]:
    skip = {i for t in taken for i in t}
    return tuple(i for i in range(n) if i not in skip)


def _transpose_dot(
    g: Array,
    gs: Array | None,
    y: Array,
    ys: Array | None,
    dn: DimensionNumbers,
    x_ndim: int,
    cfg: _Config,
    *,
    swap_ans: bool,
    out_dtype: Any,
    y_dtype: Any = None,
    y_spec: QuantSpec | None = None,
) -> Array:
    """Cotangent of ``x`` in ``dot_general(x, y, dn)`` (``swap_ans``: of ``dot(y, x)``),
    as in ``jax.lax``'s transpose rule, with scaled operands (``y_dtype``: ``y``'s dtype
    before quantization, ``y_spec`` its spec; see :func:`_scaled_dot`)."""
    (x_contract, y_contract), (x_batch, y_batch) = dn
    x_kept = _remaining(x_ndim, x_contract, x_batch)
    y_kept = _remaining(y.ndim, y_contract, y_batch)
    nb = len(x_batch)
    ans_batch = tuple(range(nb))
    if swap_ans:
        ans_y = tuple(range(nb, nb + len(y_kept)))
    else:
        ans_y = tuple(range(nb + len(x_kept), nb + len(x_kept) + len(y_kept)))
    dims = ((ans_y, y_kept), (ans_batch, y_batch))
    x_contract_sorted_by_y = [x_contract[i] for i in np.argsort(y_contract)]
    out_axes = tuple(int(i) for i in np.argsort([*x_batch, *x_kept, *x_contract_sorted_by_y]))
    # Transposed before the scales: a transpose straight after the dot folds into it (XLA
    # picks the operand order); after the scale multiply it would be an extra copy.
    exact = (
        y_spec is not None
        and y_dtype is not None
        and np.dtype(y_dtype) in _HALF
        and _grid_exact_in(y_spec, np.dtype(y_dtype))
    )
    return _scaled_dot(
        g,
        gs,
        y,
        ys,
        dims,
        cfg,
        out_dtype=out_dtype,
        out_perm=out_axes,
        b_dtype=y_dtype,
        b_exact=exact,
    )


def _keys(key: Array | None) -> tuple[Array | None, Array | None, Array | None]:
    if key is None:
        return None, None, None
    return tuple(jax.random.fold_in(key, i) for i in range(3))  # type: ignore[return-value]


# ------------------------------------------------------------------------ custom vjp


def _fwd_impl(cfg: _Config, lhs, rhs, lhs_scale, rhs_scale, grad_scale, key):
    kl, kr, kg = _keys(key)
    nc = cfg.native_cast
    clip = cfg.ste == "clipped"
    lv, ls, lmask = _quantize_operand(lhs, cfg.lhs_spec, kl, lhs_scale, cfg.lhs_store, nc, clip)
    rv, rs, rmask = _quantize_operand(rhs, cfg.rhs_spec, kr, rhs_scale, cfg.rhs_store, nc, clip)
    out = _scaled_dot(lv, ls, rv, rs, cfg.dn, cfg, cfg.out_sharding, cfg.out_dtype)
    out = out.astype(cfg.out_dtype)
    return out, (lv, ls, rv, rs, grad_scale, kg, (lmask, rmask))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _qdot(cfg: _Config, lhs, rhs, lhs_scale, rhs_scale, grad_scale, key):
    return _fwd_impl(cfg, lhs, rhs, lhs_scale, rhs_scale, grad_scale, key)[0]


def _qdot_fwd(cfg: _Config, lhs, rhs, lhs_scale, rhs_scale, grad_scale, key):
    return _fwd_impl(cfg, lhs, rhs, lhs_scale, rhs_scale, grad_scale, key)


def _qdot_bwd(cfg: _Config, res, g):
    lv, ls, rv, rs, grad_scale, kg, (lmask, rmask) = res
    if cfg.grad_spec is not None:
        gv, gs, _ = _quantize_operand(
            g, cfg.grad_spec, kg, grad_scale, cfg.grad_store, cfg.native_cast
        )
    else:
        gv, gs = g, None
    (lc, rc), (lb, rb) = cfg.dn
    dlhs = _transpose_dot(
        gv,
        gs,
        rv,
        rs,
        cfg.dn,
        lv.ndim,
        cfg,
        swap_ans=False,
        out_dtype=cfg.lhs_dtype,
        y_dtype=cfg.rhs_dtype,
        y_spec=cfg.rhs_spec,
    )
    swapped = ((rc, lc), (rb, lb))
    drhs = _transpose_dot(
        gv,
        gs,
        lv,
        ls,
        swapped,
        rv.ndim,
        cfg,
        swap_ans=True,
        out_dtype=cfg.rhs_dtype,
        y_dtype=cfg.lhs_dtype,
        y_spec=cfg.lhs_spec,
    )
    if lmask is not None:
        dlhs = jnp.where(lmask, dlhs, 0.0)
    if rmask is not None:
        drhs = jnp.where(rmask, drhs, 0.0)
    return dlhs.astype(cfg.lhs_dtype), drhs.astype(cfg.rhs_dtype), None, None, None, None


_qdot.defvjp(_qdot_fwd, _qdot_bwd)
# One compiled program for eager and jit callers alike.
_qdot_jit = jax.jit(_qdot, static_argnums=0)


# ------------------------------------------------------------------------ public API


def dot_general(
    lhs: jax.typing.ArrayLike,
    rhs: jax.typing.ArrayLike,
    dimension_numbers: Any,
    precision: Any = None,
    preferred_element_type: jax.typing.DTypeLike | None = None,
    *,
    lhs_spec: QuantSpec | None = None,
    rhs_spec: QuantSpec | None = None,
    grad_spec: QuantSpec | None = None,
    lhs_scale: jax.typing.ArrayLike | None = None,
    rhs_scale: jax.typing.ArrayLike | None = None,
    grad_scale: jax.typing.ArrayLike | None = None,
    key: Array | None = None,
    mode: Mode = "auto",
    ste: Literal["plain", "clipped"] = "plain",
    out_sharding: Any = None,
) -> Array:
    """Quantized ``jax.lax.dot_general``: real int8 / fp8 matmuls, quantized gradients.

    Forward: ``dot_general(Q_lhs(lhs), Q_rhs(rhs))`` computed as
    ``dot(q_lhs, q_rhs) * (s_lhs (x) s_rhs)`` (see the module docstring), returned in
    ``preferred_element_type`` (default: ``lax.dot_general``'s result dtype). Backward:
    straight-through for both quantizers; the output gradient is quantized with
    ``grad_spec`` and multiplied with the saved quantized operands.

    A drop-in for ``lax.dot_general`` (same positional arguments, ``out_sharding`` too), so
    ``functools.partial(jq.dot_general, lhs_spec=..., rhs_spec=...)`` can be given to
    ``flax.linen.Dense(dot_general=...)`` or ``flax.nnx.Linear(dot_general=...)``.

    Args:
      lhs, rhs: the operands. A quantized operand must be floating point.
      dimension_numbers: ``((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))``.
      precision, preferred_element_type, out_sharding: as in ``lax.dot_general``
        (``precision`` applies to the float dots; ``out_sharding`` to the forward dot).
      lhs_spec, rhs_spec: symmetric :class:`QuantSpec` per operand, or None to leave it in
        its dtype. Scales must be constant along the contracted axes: ``per_tensor()``,
        ``per_channel`` / ``per_token`` over non-contracted axes (e.g. ``per_token(-1)``
        for activations ``(..., tokens, features)`` and ``per_channel(-1)`` for a
        ``(in, out)`` kernel). Anything else raises ValueError.
      grad_spec: :class:`QuantSpec` for the output gradient (e.g. e5m2, per-tensor,
        optionally ``rounding="stochastic"``), or None to keep it in its dtype.
      lhs_scale, rhs_scale, grad_scale: known scales (static or delayed scaling, see
        :func:`delayed_scaling`), broadcastable to the plan's scale shape; they skip
        calibration and get no gradient.
      key: PRNG key for stochastic specs: ``fold_in(key, 0)`` rounds ``lhs``,
        ``fold_in(key, 1)`` ``rhs`` and ``fold_in(key, 2)`` the gradient.
      mode: ``"auto"`` (real int8 / fp8 dot where :func:`dot_capabilities` of the default
        backend says so), ``"real"`` (always call ``lax.dot_general`` on int8 / fp8 arrays;
        needs both operand specs int8 or both fp8) or ``"emulate"`` (float32 dot of the
        grid values).
      ste: the operands' straight-through estimator: ``"plain"`` passes the gradient
        through the quantizer; ``"clipped"`` zeroes it where the operand saturated.

    Returns:
      The product, shaped like ``lax.dot_general``'s.

    Raises:
      ValueError: scales that vary along a contracted axis (per-block, MX, a per-channel
        axis that is contracted), asymmetric specs, a stochastic spec without ``key``,
        ``mode="real"`` for operand formats without a low-precision dot.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> x, w = jnp.ones((2, 3)), jnp.full((3, 4), 0.5)
      >>> y = jq.dot_general(x, w, (((1,), (0,)), ((), ())),
      ...                    lhs_spec=jq.QuantSpec("int8", jq.per_token(-1)),
      ...                    rhs_spec=jq.QuantSpec("int8", jq.per_channel(-1)))
      >>> y.tolist()
      [[1.5, 1.5, 1.5, 1.5], [1.5, 1.5, 1.5, 1.5]]

    References:
      Micikevicius et al., "FP8 Formats for Deep Learning", https://arxiv.org/abs/2209.05433;
      Jacob et al., "Quantization and Training of Neural Networks for Efficient
      Integer-Arithmetic-Only Inference", https://arxiv.org/abs/1712.05877
    """
    fn = "dot_general"
    dn = _normalize_dn(dimension_numbers)
    if isinstance(lhs, QArray):
        raise TypeError(
            f"{fn}: a QArray must be the rhs (the weight); the lhs is the float activation. "
            "Swap the operands (and the dimension numbers), or dequantize() it."
        )
    lhs = check_array(lhs, f"{fn}: lhs")
    if not isinstance(rhs, QArray):
        rhs = check_array(rhs, f"{fn}: rhs")
    if preferred_element_type is not None:
        try:
            np.dtype(preferred_element_type)
        except TypeError:
            raise TypeError(
                f"{fn}: preferred_element_type must be a dtype such as jnp.float32, or None, "
                f"got {describe(preferred_element_type)}."
            ) from None
    if isinstance(rhs, QArray):
        if rhs_spec is not None or grad_spec is not None or rhs_scale is not None:
            raise ValueError(
                f"{fn}: rhs is a QArray, already quantized with {rhs.spec}; pass no "
                "rhs_spec / rhs_scale / grad_spec (it has no gradient)."
            )
        if lhs_scale is not None or key is not None or mode == "emulate" or ste != "plain":
            raise ValueError(
                f"{fn}: with a QArray rhs (serving), lhs is quantized by lhs_spec alone: a "
                "static scale is lhs_spec.replace(calibration=jq.fixed(amax)); lhs_scale, "
                "key, mode='emulate' and ste do not apply."
            )
        lhs_spec = _check_spec(lhs_spec, "lhs_spec", fn) if lhs_spec is not None else None
        _out_aval(lhs, rhs, dn, preferred_element_type, fn)  # shape errors naming operands
        return dot_qarray(
            lhs,
            rhs,
            dn,
            precision,
            preferred_element_type,
            lhs_spec=lhs_spec,
            out_sharding=out_sharding,
        )
    lhs_spec = _check_spec(lhs_spec, "lhs_spec", fn)
    rhs_spec = _check_spec(rhs_spec, "rhs_spec", fn)
    grad_spec = _check_spec(grad_spec, "grad_spec", fn)
    if mode not in ("auto", "real", "emulate"):
        raise ValueError(f"{fn}: mode must be 'auto', 'real' or 'emulate', got {mode!r}.")
    if ste not in ("plain", "clipped"):
        raise ValueError(
            f"{fn}: ste must be 'plain' or 'clipped', got {ste!r} (learned step sizes: "
            "Rule(ste='lsq') in jaxquant.flax, or jq.lsq_fake_quant on the operand)."
        )
    kw = {} if out_sharding is None else {"out_sharding": out_sharding}
    if lhs_spec is None and rhs_spec is None and grad_spec is None:
        try:
            return lax.dot_general(lhs, rhs, dn, precision, preferred_element_type, **kw)
        except TypeError as err:
            raise _operands_error(lhs, rhs, dn, err, fn) from None
    out_aval = _out_aval(lhs, rhs, dn, preferred_element_type, fn)
    (lc, rc), (lb, rb) = dn
    _check_operand(lhs_spec, lhs, lc, lb, "lhs", mode)
    _check_operand(rhs_spec, rhs, rc, rb, "rhs", mode)
    if grad_spec is not None:
        if not jnp.issubdtype(out_aval.dtype, jnp.floating):
            raise TypeError(f"{fn}: grad_spec needs a floating-point output, got {out_aval.dtype}.")
        try:  # axis errors now, not in the backward pass
            grad_spec.granularity.plan(tuple(out_aval.shape))
        except ValueError as e:
            raise ValueError(
                f"{fn}: grad_spec {grad_spec} does not fit the output gradient, of shape "
                f"{tuple(out_aval.shape)}: {e} For MX / per-block gradients the output's "
                "blocked axis must be a multiple of the block size; keep such a layer in "
                "float or give it a per-tensor grad_spec."
            ) from None
    for name, spec in (("lhs_spec", lhs_spec), ("rhs_spec", rhs_spec), ("grad_spec", grad_spec)):
        if spec is not None and spec.stochastic and key is None:
            raise ValueError(
                f"{fn}: {name} rounds stochastically and needs a PRNG key: pass "
                "key=jax.random.key(seed) (split it per step)."
            )
    if mode == "real" and not _real_pair(lhs_spec, rhs_spec):
        names = [s.format.name if s else "None" for s in (lhs_spec, rhs_spec)]
        raise ValueError(
            f"{fn}: mode='real' needs both operands int8 or both fp8 (e4m3 / e5m2), got "
            f"lhs {names[0]} and rhs {names[1]}. Use mode='auto' or 'emulate'."
        )
    lhs_scale, rhs_scale, grad_scale = (
        _check_scale(x, spec, scale, None, f"{fn}: {name}")[0]
        if spec is not None and scale is not None
        else scale
        for name, x, spec, scale in (
            ("lhs_scale", lhs, lhs_spec, lhs_scale),
            ("rhs_scale", rhs, rhs_spec, rhs_scale),
            ("grad_scale", out_aval, grad_spec, grad_scale),
        )
    )
    caps = dot_capabilities()
    if mode == "real":
        fp8_pairs = _ALL_FP8_PAIRS
    elif mode == "auto":
        fp8_pairs = caps["fp8_pairs"]
    else:
        fp8_pairs = ()
    cfg = _Config(
        dn=dn,
        lhs_spec=lhs_spec,
        rhs_spec=rhs_spec,
        grad_spec=grad_spec,
        lhs_store=_store_dtype(lhs_spec, mode, caps),
        rhs_store=_store_dtype(rhs_spec, mode, caps),
        grad_store=_store_dtype(grad_spec, mode, caps),
        fp8_pairs=tuple(fp8_pairs),
        precision=_hashable(precision),
        out_dtype=np.dtype(out_aval.dtype),
        lhs_dtype=np.dtype(lhs.dtype),
        rhs_dtype=np.dtype(rhs.dtype),
        out_sharding=out_sharding,
        ste=ste,
        fp8_lowering=_FP8_LOWERING if caps["platform"] == "gpu" else "f32_out",
        native_cast=_NATIVE_FP8_CAST and caps["platform"] == "gpu",
        int8_guard=caps["platform"] == "gpu",
        cpu_layout=caps["platform"] == "cpu",
    )

    def opt(s):
        return None if s is None else jnp.asarray(s, jnp.float32)

    return _qdot_jit(cfg, lhs, rhs, opt(lhs_scale), opt(rhs_scale), opt(grad_scale), key)


def _operands_error(lhs: Any, rhs: Any, dn: DimensionNumbers, err: Exception, fn: str) -> TypeError:
    """lax's error (shapes that do not fit the dimension numbers, mostly), saying which
    operands and dimension numbers it was about."""
    return TypeError(
        f"{fn}: lax.dot_general refused lhs of shape {tuple(lhs.shape)} and rhs of shape "
        f"{tuple(rhs.shape)} with dimension_numbers {dn}: {err}"
    )


def _out_aval(lhs: Array, rhs: Array | QArray, dn: DimensionNumbers, pet: Any, fn: str) -> Any:
    """Shape and dtype of ``lax.dot_general``'s result; its shape errors name the operands."""
    try:
        return jax.eval_shape(
            functools.partial(lax.dot_general, dimension_numbers=dn, preferred_element_type=pet),
            jax.ShapeDtypeStruct(lhs.shape, lhs.dtype),
            jax.ShapeDtypeStruct(rhs.shape, rhs.dtype),
        )
    except TypeError as err:
        raise _operands_error(lhs, rhs, dn, err, fn) from None


def _hashable(precision: Any) -> Any:
    if isinstance(precision, list):
        return tuple(precision)
    return precision


# --------------------------------------------------------------------------- einsum

_LETTERS = string.ascii_letters


def _parse_einsum(subscripts: str, a_ndim: int, b_ndim: int) -> tuple[str, str, str]:
    """Labels of lhs, rhs and output, ellipses expanded to fresh letters."""
    s = subscripts.replace(" ", "")
    if "->" in s:
        ins, out = s.split("->")
        explicit = True
    else:
        ins, out, explicit = s, "", False
    parts = ins.split(",")
    if len(parts) != 2:
        raise ValueError(
            f"einsum: jq.einsum takes exactly two operands, got {len(parts)} in {subscripts!r}."
        )
    used = set(s) - set(".,->")
    if any(c not in _LETTERS for c in used):
        raise ValueError(f"einsum: labels must be letters, got {subscripts!r}.")
    fresh = [c for c in _LETTERS if c not in used]
    ell_ranks = []
    for p, ndim, name in zip(parts, (a_ndim, b_ndim), "ab", strict=True):
        if p.count("...") > 1 or p.replace("...", "").count(".") or out.count("...") > 1:
            raise ValueError(f"einsum: malformed ellipsis in {subscripts!r}.")
        n = len(p.replace("...", ""))
        if "..." in p:
            if n > ndim:
                raise ValueError(
                    f"einsum: {p!r} has more labels than {name}'s {ndim} axes: {subscripts!r}."
                )
            ell_ranks.append(ndim - n)
        else:
            if n != ndim:
                raise ValueError(
                    f"einsum: {p!r} names {n} axes but {name} has {ndim}: {subscripts!r}."
                )
            ell_ranks.append(0)
    n_ell = max(ell_ranks)
    ell = "".join(fresh[:n_ell])
    la = parts[0].replace("...", ell[n_ell - ell_ranks[0] :])
    lb = parts[1].replace("...", ell[n_ell - ell_ranks[1] :])
    if explicit:
        lo = out.replace("...", ell)
    else:
        counts = {c: (la + lb).count(c) for c in set(la + lb) if c not in ell}
        lo = ell + "".join(sorted(c for c, k in counts.items() if k == 1))
    return la, lb, lo


def einsum(
    subscripts: str,
    a: jax.typing.ArrayLike,
    b: jax.typing.ArrayLike,
    *,
    lhs_spec: QuantSpec | None = None,
    rhs_spec: QuantSpec | None = None,
    grad_spec: QuantSpec | None = None,
    lhs_scale: jax.typing.ArrayLike | None = None,
    rhs_scale: jax.typing.ArrayLike | None = None,
    grad_scale: jax.typing.ArrayLike | None = None,
    precision: Any = None,
    preferred_element_type: jax.typing.DTypeLike | None = None,
    key: Array | None = None,
    mode: Mode = "auto",
    ste: Literal["plain", "clipped"] = "plain",
) -> Array:
    """Quantized two-operand ``jnp.einsum``, computed by :func:`dot_general`.

    Labels in both operands and the output are batch axes, in both operands only are
    contracted, in one operand and the output are free. ``...`` and implicit outputs work
    as in numpy. Specs refer to the operands' own axes (``per_channel(-1)`` is the last
    axis of that operand). Labels summed within one operand (``"ij,jk->k"``'s ``i``) and
    repeated labels (traces, diagonals) are refused: sum or slice the operand first.

    Args:
      subscripts: e.g. ``"btd,df->btf"``.
      a, b: the operands.
      lhs_spec, rhs_spec, grad_spec, lhs_scale, rhs_scale, grad_scale, precision,
      preferred_element_type, key, mode, ste: as in :func:`dot_general` (``lhs`` is ``a``).

    Returns:
      The product, with the output labels' axis order.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> y = jq.einsum("btd,df->btf", jnp.ones((2, 3, 4)), jnp.ones((4, 5)),
      ...               lhs_spec=jq.QuantSpec("e4m3"), rhs_spec=jq.QuantSpec("e4m3"))
      >>> y.shape, round(float(y[0, 0, 0]), 5)
      ((2, 3, 5), 4.0)
    """
    if not isinstance(subscripts, str):
        raise TypeError(
            f"einsum: subscripts must be a str such as 'btd,df->btf', got {describe(subscripts)}."
        )
    if isinstance(a, QArray):
        raise TypeError(
            "einsum: a QArray must be b (the weight); a is the float activation. Swap the "
            "operands (and their subscripts), or pass jq.dequantize(a)."
        )
    a = check_array(a, "einsum: a")
    b = b if isinstance(b, QArray) else check_array(b, "einsum: b")
    la, lb, lo = _parse_einsum(subscripts, a.ndim, b.ndim)
    for labels, what in ((la, "lhs"), (lb, "rhs"), (lo, "output")):
        if len(set(labels)) != len(labels):
            raise ValueError(
                f"einsum: a label repeats in the {what} of {subscripts!r}; jq.einsum supports "
                "no traces or diagonals. Take them with jnp.einsum / jnp.diagonal first."
            )
    for c in lo:
        if c not in la and c not in lb:
            raise ValueError(f"einsum: output label {c!r} is in no operand of {subscripts!r}.")
    for labels, other, what in ((la, lb, "lhs"), (lb, la, "rhs")):
        for c in labels:
            if c not in other and c not in lo:
                raise ValueError(
                    f"einsum: label {c!r} of {what} in {subscripts!r} is summed within one "
                    f"operand; jq.einsum quantizes whole operands, so sum it first "
                    f"(jnp.sum(x, axis={labels.index(c)}))."
                )
    for c in la:
        if c in lb and a.shape[la.index(c)] != b.shape[lb.index(c)]:
            raise ValueError(
                f"einsum: label {c!r} of {subscripts!r} has size {a.shape[la.index(c)]} in a "
                f"(shape {tuple(a.shape)}) but {b.shape[lb.index(c)]} in b (shape "
                f"{tuple(b.shape)})."
            )
    batch = [c for c in la if c in lb and c in lo]
    contract = [c for c in la if c in lb and c not in lo]
    dn = (
        (tuple(la.index(c) for c in contract), tuple(lb.index(c) for c in contract)),
        (tuple(la.index(c) for c in batch), tuple(lb.index(c) for c in batch)),
    )
    names = batch + [c for c in la if c not in lb] + [c for c in lb if c not in la]
    out = dot_general(
        a,
        b,
        dn,
        precision,
        preferred_element_type,
        lhs_spec=lhs_spec,
        rhs_spec=rhs_spec,
        grad_spec=grad_spec,
        lhs_scale=lhs_scale,
        rhs_scale=rhs_scale,
        grad_scale=grad_scale,
        key=key,
        mode=mode,
        ste=ste,
    )
    perm = tuple(names.index(c) for c in lo)
    return out if perm == tuple(range(len(perm))) else jnp.transpose(out, perm)
