"""What each backend multiplies natively, and how jaxquant writes its products for XLA there.

:class:`Capabilities` is one frozen, typed object per backend: the facts
(:func:`jaxquant.dot_capabilities` returns them as its documented dict) and ONE
:class:`Lowering`, chosen here by :func:`lowering_for`. Every backend workaround -- the GPU's
fp8 GEMM output dtype, its native fp8 rounding, its small-shape int8 bug, its fp8 batch-axis
bug, the CPU's transposed-product layout -- is a field of that lowering, and nothing else in
:mod:`jaxquant._src.dot` asks which backend it runs on.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import jax
import numpy as np

# ((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch)), normalized to int tuples.
_Pair = tuple[tuple[int, ...], tuple[int, ...]]
DimensionNumbers = tuple[_Pair, _Pair]

FP8 = ("float8_e4m3fn", "float8_e5m2")
ALL_FP8_PAIRS = tuple((a, b) for a in FP8 for b in FP8)
# cuBLASLt's fp8 GEMM takes e4m3 x e4m3, e4m3 x e5m2 and e5m2 x e4m3, not e5m2 x e5m2.
CUBLASLT_FP8_PAIRS = tuple(p for p in ALL_FP8_PAIRS if p != ("float8_e5m2", "float8_e5m2"))

# How a real fp8 x fp8 dot is written for XLA (GPU only; CPU never takes these paths):
# * "half_out" (default): dot(f8, f8) -> the output dtype when it is bf16 / f16 (cuBLASLt
#   writes it directly), then times the scales in float32; rounds twice (the GEMM's
#   output, then the scaled value), within one unit of the output dtype's last place;
# * "f32_out": dot(f8, f8) -> float32, then times the scales: one rounding.
# On an H200 (3 x Dense 8192, batch 8192, fwd + bwd + SGD) half_out ran 1.44-1.50x the bf16
# step and f32_out 1.34-1.40x. The "dequantize, then dot" pattern (convert(f8) * s) that
# flax's fp8 ops write was not rewritten into an fp8 GEMM at all by jax 0.11 there
# (0.96-0.99x bf16): benchmarks/README.md.
FP8_LOWERING: Literal["f32_out", "half_out"] = "half_out"
# Round fp8 operands of a real dot with the device's own conversion (after the scale and
# a clip to the format's range) instead of the integer emulation. Both round to nearest
# even -- bit-identical on an H200, edge cases included -- and the conversion is cheaper
# (1.24x -> 1.40x of bf16). Float32 copies of such values are decoded through their bits
# (scaled.to_f32), so XLA cannot fold the rounding conversion away.
NATIVE_FP8_CAST = True
# On an H200 (jax 0.11.2) XLA's s8 x s8 -> s32 dot *followed by the scaling epilogue* gave
# wrong results for small shapes -- off by a factor of 2, or garbage: K = 16 with N = 10
# or 4, K = 30, M = 24 with K = 16 / 32 -- while the bare s8 dot was exact on all 252 shapes
# probed (benchmarks/results/int8_probe_h200.json; tests/test_backend_probes.py probes
# again) and 8192-sized GEMMs
# (cuBLASLt) were right. Below these sizes (M, K, N) the product runs in float32 instead:
# exact, and too small to gain from int8; with this guard every int8 test passed there.
GPU_INT8_MIN = (16, 64, 16)


@dataclasses.dataclass(frozen=True)
class Lowering:
    """How real int8 / fp8 products are written for XLA on one backend (hashable: part of
    a jit static argument). The defaults are the plain lowering; :func:`lowering_for`
    sets the workarounds a backend needs.

    Attributes:
      fp8_output: ``"half_out"`` (an fp8 GEMM writes a bf16 output directly) or
        ``"f32_out"`` (always float32); see :data:`FP8_LOWERING`.
      native_fp8_cast: round fp8 operands with the device's conversion
        (:data:`NATIVE_FP8_CAST`).
      int8_min: ``(M, K, N)`` below which an int8 GEMM runs in float32 instead (exact;
        :data:`GPU_INT8_MIN`), or None.
      fp8_leading_batch_only: fp8 GEMMs only with leading batch axes (:meth:`fp8_gemm_ok`).
      keep_orientation: a transposed product may keep the dot's own orientation
        (:meth:`keeps_orientation`).
    """

    fp8_output: Literal["f32_out", "half_out"] = "f32_out"
    native_fp8_cast: bool = False
    int8_min: tuple[int, int, int] | None = None
    fp8_leading_batch_only: bool = False
    keep_orientation: bool = False

    def int8_gemm_ok(self, a_shape: tuple, b_shape: tuple, dn: DimensionNumbers) -> bool:
        """Whether an int8 GEMM of these shapes runs as one (else: float32, exact)."""
        if self.int8_min is None:
            return True
        (ca, cb), (ba, bb) = dn
        m = int(np.prod([d for i, d in enumerate(a_shape) if i not in ca and i not in ba]))
        n = int(np.prod([d for i, d in enumerate(b_shape) if i not in cb and i not in bb]))
        k = int(np.prod([a_shape[i] for i in ca]))
        return m >= self.int8_min[0] and k >= self.int8_min[1] and n >= self.int8_min[2]

    def fp8_gemm_ok(self, dn: DimensionNumbers) -> bool:
        """GPU fp8 GEMMs only with leading batch axes: the one fp8 case that failed on an
        H200 (NaN gradients; tests/test_dot.py, batch axis 1 of the lhs) was the only one
        whose batch axis was not leading. Others are emulated in float32 there."""
        if not self.fp8_leading_batch_only:
            return True
        (_, _), (ba, bb) = dn
        lead = tuple(range(len(ba)))
        return tuple(ba) == lead and tuple(bb) == lead

    def keeps_orientation(self, shape: tuple[int, ...], perm: tuple[int, ...]) -> bool:
        """Whether to compute a transposed product in the dot's own orientation and
        transpose it afterwards (an optimization barrier stops XLA from folding the
        transpose into the dot).

        XLA:CPU's dot of two operands contracted along their leading axis (the weight
        gradient ``x^T g``) is several times faster when its output's minor axis is the
        wider one: for the digits MLP's 512 x 10 layer, 42 us for ``[10, 512]`` against
        200 us for ``[512, 10]`` (and the reverse for 64 x 512). A transpose folded into the
        dot gives it the requested layout, which is right for square and wide outputs; for
        narrow ones (fewer output columns than the dot's own minor axis) the dot keeps its
        orientation and the small transposed copy is nearly free. Same values either way.
        """
        return self.keep_orientation and shape[-1] > shape[perm[-1]]


def lowering_for(
    platform: str,
    *,
    fp8_output: Literal["f32_out", "half_out"] = FP8_LOWERING,
    native_fp8_cast: bool = NATIVE_FP8_CAST,
    gpu_int8_min: tuple[int, int, int] = GPU_INT8_MIN,
) -> Lowering:
    """The one lowering of a platform (keywords: the GPU switches, which benchmarks vary)."""
    if platform == "gpu":
        return Lowering(
            fp8_output=fp8_output,
            native_fp8_cast=native_fp8_cast,
            int8_min=tuple(gpu_int8_min),  # type: ignore[arg-type]
            fp8_leading_batch_only=True,
        )
    if platform == "cpu":
        return Lowering(keep_orientation=True)
    return Lowering()


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What one backend multiplies natively, and how (see the module docstring).

    The fields before ``lowering`` are :func:`jaxquant.dot_capabilities`'s documented
    keys (:meth:`as_dict`).
    """

    backend: str
    platform: str
    device_kind: str
    compute_capability: str | None
    int8: bool
    fp8: bool
    fp8_pairs: tuple[tuple[str, str], ...]
    int8_path: str
    fp8_path: str
    lowering: Lowering

    def as_dict(self) -> dict[str, Any]:
        """The documented dict of :func:`jaxquant.dot_capabilities` (no lowering)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del d["lowering"]
        return d

    @classmethod
    def from_dict(cls, caps: dict[str, Any], **switches: Any) -> Capabilities:
        """A Capabilities from :meth:`as_dict`'s keys, with the lowering of its platform
        (``switches``: :func:`lowering_for`'s keywords)."""
        fields = {k: caps[k] for k in caps if k != "lowering"}
        fields["fp8_pairs"] = tuple(tuple(p) for p in fields["fp8_pairs"])
        return cls(**fields, lowering=lowering_for(fields["platform"], **switches))

    def fp8_pairs_for(self, mode: str) -> tuple[tuple[str, str], ...]:
        """The fp8 dtype pairs a dot of ``mode`` multiplies as fp8 (``"real"``: all of
        them; XLA converts where the backend has no fp8 GEMM)."""
        if mode == "real":
            return ALL_FP8_PAIRS
        return self.fp8_pairs if mode == "auto" else ()


def _parse_cc(cc: Any) -> tuple[int, int] | None:
    try:
        major, minor = str(cc).split(".")[:2]
        return int(major), int(minor)
    except (ValueError, TypeError):
        return None


@functools.cache
def probe(backend: str) -> dict[str, Any]:
    """:func:`jaxquant.dot_capabilities`'s dict for ``backend`` (once per process)."""
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
            fp8_pairs=CUBLASLT_FP8_PAIRS if fp8 else (),
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
