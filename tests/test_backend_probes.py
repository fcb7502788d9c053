"""Probes of the backend facts and bugs that jaxquant/_src/dot/capabilities.py works around.

Each test runs its probe on the current backend. On CPU (the suite's backend) it checks the
facts ``jq.dot_capabilities`` states and that each workaround's path computes the right
numbers; on a GPU (``python3 benchmarks/gpu.py --sections probes``) the same tests check
that the workarounds still give the right numbers there, and the GPU-only probes check
whether the XLA:GPU bug a workaround exists for is still there. The probes were first run
as scripts on an H200 (jax 0.11.2); their raw result is benchmarks/results/int8_probe_h200.json.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax import lax

import jaxquant as jq
from jaxquant._src import dot as D
from jaxquant._src.dot import capabilities, scaled

BACKEND = jax.default_backend()
on_gpu = pytest.mark.skipif(BACKEND != "gpu", reason="probes an XLA:GPU bug; needs a GPU")
on_cpu = pytest.mark.skipif(BACKEND != "cpu", reason="probes what XLA:CPU compiles")
MATMUL = (((1,), (0,)), ((), ()))
# (M, K, N) of products that came out wrong on the H200 when XLA fused the s8 x s8 -> s32
# GEMM with the scaling epilogue (off by 2x, or garbage) -- K = 16 with N = 10 or 4, K = 30,
# M = 24 with K = 16 / 32 -- and one large enough to run as an int8 GEMM everywhere.
SMALL_INT8 = ((8, 16, 4), (8, 16, 10), (24, 16, 10), (24, 32, 32), (16, 30, 16))
LARGE_INT8 = (64, 256, 128)


def _dot_lines(fn, *args) -> list[str]:
    """``"s8 x s8 -> s32"`` for every ``dot`` of the compiled HLO (operand types looked up
    by name within the dot's own computation)."""
    hlo = jax.jit(fn).lower(*args).compile().as_text()
    out = []
    for comp in re.split(r"\n\s*\n", hlo):
        types = dict(re.findall(r"(%[\w.\-]+) = (\w+)\[", comp))
        for result, operands in re.findall(r"= (\w+)\[[^\n]*? dot\(([^)]*)\)", comp):
            names = [o.strip() for o in operands.split(",")]
            out.append(" x ".join(types.get(n, "?") for n in names) + f" -> {result}")
    return out


def _int8_product(m: int, k: int, n: int) -> tuple[jax.Array, jax.Array]:
    """jaxquant's int8 product (per-tensor lhs, per-channel rhs) under jit, and the exact
    reference: the dot of the fake-quantized operands at HIGHEST precision."""
    rng = np.random.default_rng(m * 10_000 + k * 100 + n)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
    ls, rs = jq.QuantSpec("int8"), jq.QuantSpec("int8", jq.per_channel(-1))
    y = jax.jit(lambda x, w: jq.dot_general(x, w, MATMUL, lhs_spec=ls, rhs_spec=rs))(x, w)
    ref = jnp.dot(jq.fake_quant(x, ls), jq.fake_quant(w, rs), precision="highest")
    return y, ref


def _rel_err(y: jax.Array, ref: jax.Array) -> float:
    return float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref)))


# ------------------------------------------------------------- what each backend runs


@on_cpu
def test_cpu_fp8_dot_is_an_f32_dot():
    """dot_capabilities: fp8 is emulated on CPU. XLA:CPU has no fp8 GEMM: an e4m3 x e4m3
    ``dot_general`` compiles to an f32 x f32 dot, with mode="auto" and with mode="real"
    (where XLA widens the fp8 operands itself)."""
    assert jq.dot_capabilities()["fp8"] is False
    a, b = jnp.ones((64, 128), jnp.float32), jnp.ones((128, 32), jnp.float32)
    e4m3 = jq.QuantSpec("e4m3")
    for mode in ("auto", "real"):
        f = lambda a, b, mode=mode: jq.dot_general(
            a, b, MATMUL, lhs_spec=e4m3, rhs_spec=e4m3, mode=mode
        )
        assert _dot_lines(f, a, b) == ["f32 x f32 -> f32"], mode


@on_cpu
def test_cpu_int8_dot_is_an_s8_dot():
    """dot_capabilities: int8 is real on CPU (an s8 x s8 -> s32 dot), and the CPU lowering
    has no small-shape guard (``int8_min`` is the GPU's)."""
    assert jq.dot_capabilities()["int8"] is True
    assert capabilities.lowering_for("cpu").int8_min is None
    a, b = jnp.ones((64, 128), jnp.float32), jnp.ones((128, 32), jnp.float32)
    int8 = jq.QuantSpec("int8")
    f = lambda a, b: jq.dot_general(a, b, MATMUL, lhs_spec=int8, rhs_spec=int8)
    assert _dot_lines(f, a, b) == ["s8 x s8 -> s32"]


# ------------------------------------------- int8 GEMMs of small shapes (GPU_INT8_MIN)


@pytest.mark.parametrize("shape", [*SMALL_INT8, LARGE_INT8], ids=str)
def test_int8_product_exact(shape):
    """The int8 product as jaxquant lowers it here (on GPU: small shapes in float32 below
    GPU_INT8_MIN) equals the exact fake-quant product to float32 rounding."""
    y, ref = _int8_product(*shape)
    assert _rel_err(y, ref) < 1e-5


@on_gpu
def test_gpu_int8_small_shape_bug_still_there(monkeypatch):
    """With the guard off, every product is an s8 GEMM fused with its scaling epilogue. If
    XLA:GPU now gets all of them right, GPU_INT8_MIN is no longer needed: this test fails
    to say so (and the large shape must be right either way)."""
    monkeypatch.setattr(D, "_GPU_INT8_MIN", (0, 0, 0))
    assert _rel_err(*_int8_product(*LARGE_INT8)) < 1e-5
    wrong = [s for s in SMALL_INT8 if not _rel_err(*_int8_product(*s)) < 1e-5]
    if not wrong:
        pytest.fail(
            f"XLA:GPU's int8 GEMMs of {SMALL_INT8} are all exact now ({jax.__version__}, "
            f"{jax.devices()[0].device_kind}): GPU_INT8_MIN in capabilities.py may go"
        )


# --------------------------------------------- fp8 rounding by the device's conversion


def _fp8_edge_input() -> jax.Array:
    k = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(k[0], (64, 256), jnp.float32)
    x = x * jnp.exp(jax.random.normal(k[1], (64, 256)) * 3)  # 2^-40 .. 2^40: subnormals too
    edge = jnp.array([0.0, -0.0, 1e-30, -1e-30, 3e38, -3e38, jnp.inf, -jnp.inf])
    return x.at[0, :8].set(edge)


@pytest.mark.slow  # seconds: subprocesses or many compiles (the fast loop skips it)
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_native_fp8_cast_matches_integer_rounding(fmt):
    """NATIVE_FP8_CAST: the device's f32 -> fp8 conversion (after the scale and the clip to
    the format's range) rounds exactly as jaxquant's integer emulation, bit for bit,
    eagerly and under jit (on an H200: 0 of 524 288 values differed)."""
    x = _fp8_edge_input()
    spec = jq.QuantSpec(fmt)
    store = spec.format.storage_dtype

    def values(x, native):
        return scaled.quantize_operand(x, spec, None, None, store, native)[0]

    emulated = np.asarray(lax.bitcast_convert_type(values(x, False), jnp.uint8))
    for native in (values(x, True), jax.jit(lambda x: values(x, True))(x)):
        assert native.dtype == store
        assert np.array_equal(np.asarray(lax.bitcast_convert_type(native, jnp.uint8)), emulated)


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2], ids=["e4m3", "e5m2"])
def test_fp8_values_decoded_through_their_bits(dtype):
    """scaled.to_f32 with the native-cast lowering decodes fp8 values through their bits,
    so XLA cannot fold the rounding conversion with the one back to float32
    (``xla_allow_excess_precision``: on the H200 that silently skipped the quantization of a
    dequantize-then-dot, 3.4% off). Rounding and decoding in one jit must give the values
    ml_dtypes gives."""
    cfg = scaled.ScaledDot(lowering=capabilities.Lowering(native_fp8_cast=True), fp8_pairs=())
    x = jax.random.normal(jax.random.key(1), (32, 128), jnp.float32) * 3.0
    got = jax.jit(lambda x: scaled.to_f32(x.astype(dtype), cfg))(x)
    want = np.asarray(x).astype(ml_dtypes.finfo(dtype).dtype).astype(np.float32)
    assert got.dtype == jnp.float32
    assert np.array_equal(np.asarray(got), want)
    assert not np.array_equal(want, np.asarray(x))  # the rounding did something


# -------------------------------------------- fp8 products with a non-leading batch axis


@pytest.mark.slow  # seconds: subprocesses or many compiles (the fast loop skips it)
def test_fp8_batch_axis_not_leading():
    """fp8_leading_batch_only: on the H200 the one fp8 product whose batch axis was not
    leading gave NaN gradients as an fp8 GEMM; jaxquant emulates such products on GPUs.
    Forward equals the fake-quant product and both gradients are finite."""
    rng = np.random.default_rng(0)
    lhs = jnp.asarray(rng.standard_normal((8, 2, 16)), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal((2, 16, 4)), jnp.float32)
    dn = (((2,), (1,)), ((1,), (0,)))  # lhs batch axis 1
    a_s, b_s = jq.QuantSpec("e4m3", jq.per_channel(1)), jq.QuantSpec("e4m3")
    g_s = jq.QuantSpec("e5m2")
    f = lambda a, b: jq.dot_general(a, b, dn, lhs_spec=a_s, rhs_spec=b_s, grad_spec=g_s)
    y = jax.jit(f)(lhs, rhs)
    ref = lax.dot_general(
        jq.fake_quant(lhs, a_s), jq.fake_quant(rhs, b_s), dn, precision=lax.Precision.HIGHEST
    )
    assert _rel_err(y, ref) < 1e-5
    grads = jax.jit(jax.grad(lambda a, b: jnp.sum(f(a, b) ** 2), argnums=(0, 1)))(lhs, rhs)
    for g in grads:
        assert bool(jnp.all(jnp.isfinite(g)))
        assert float(jnp.max(jnp.abs(g))) > 0
    assert not capabilities.lowering_for("gpu").fp8_gemm_ok(dn)
    assert capabilities.lowering_for("gpu").fp8_gemm_ok((((2,), (1,)), ((0,), (0,))))
