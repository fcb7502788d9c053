"""jq.dot_general / jq.einsum with a QArray weight (serving)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant._src.serve import weight_path

CPU_ONLY = pytest.mark.skipif(jax.default_backend() != "cpu", reason="asserts XLA:CPU's HLO")
DN = (((1,), (0,)), ((), ()))
PC = jq.per_channel(-1)


def _static(fmt, amax=4.0):
    return jq.QuantSpec(fmt, calibration=jq.fixed(amax))


def _data(k=256, n=96, b=32):
    x = jax.random.normal(jax.random.key(0), (b, k))
    w = jax.random.normal(jax.random.key(1), (k, n)) * 0.05
    return x, w


CASES = [
    ("int8", jq.QuantSpec("int8", PC), _static("int8")),
    ("fp8", jq.QuantSpec("e4m3", PC), _static("e4m3")),
    ("fp8", jq.QuantSpec("e5m2", PC), _static("e4m3")),
    ("weight_only", jq.QuantSpec("int8", PC), None),
    ("weight_only", jq.QuantSpec("int4", PC), None),
    ("weight_only", jq.QuantSpec("e4m3", PC), None),
    ("weight_only_dequant", jq.QuantSpec("int4", jq.per_block(0, 32)), None),
    ("weight_only_dequant", jq.QuantSpec("nf4", jq.per_block(0, 32)), None),
    ("weight_only_dequant", jq.QuantSpec("mxfp4"), None),
    ("emulate", jq.QuantSpec("int4", jq.per_block(0, 32)), _static("int8")),
    ("emulate", jq.QuantSpec("int8", PC), _static("e4m3")),
    ("int8", jq.QuantSpec("int8", PC), jq.QuantSpec("int8")),  # dynamic act scale
]


@pytest.mark.parametrize("path,wspec,aspec", CASES, ids=lambda c: str(c))
def test_matches_exact_reference(path, wspec, aspec):
    """Every path equals fake-quant(act) x dequantized weight up to float32 accumulation."""
    x, w = _data()
    if wspec.format.kind == "mx":
        w = w.T  # MX blocks run along the last axis: contract it
    dn = (((1,), (1,)), ((), ())) if wspec.format.kind == "mx" else DN
    q = jq.quantize(w, wspec)
    assert weight_path(aspec, q, dn[0][1]) == path
    y = jax.jit(lambda x, q: jq.dot_general(x, q, dn, lhs_spec=aspec))(x, q)
    y_eager = jq.dot_general(x, q, dn, lhs_spec=aspec)
    xr = x if aspec is None else jq.fake_quant(x, aspec)
    ref = jax.lax.dot_general(xr, q.dequantize(), dn, precision="highest")
    scale = float(jnp.max(jnp.abs(ref)))
    assert y.dtype == jnp.float32 and y.shape == ref.shape
    # Hopper's fp8 tensor cores accumulate with fewer than float32's 24 bits.
    tol = 2e-3 if path == "fp8" and jax.default_backend() == "gpu" else 3.2e-5
    np.testing.assert_allclose(y, ref, atol=tol * scale)
    np.testing.assert_array_equal(y, y_eager)


def test_int8_path_is_exact_integer_accumulation():
    """int8 x int8 -> int32: the result is exactly (sum q_x q_w) * s_x * s_w."""
    x, w = _data()
    aspec = _static("int8", 3.0)
    q = jq.quantize(w, jq.QuantSpec("int8", PC))
    y = jq.dot_general(x, q, DN, lhs_spec=aspec)
    qx = jq.quantize(x, aspec)
    acc = np.asarray(qx.values, np.int64) @ np.asarray(q.values, np.int64)
    sx = np.float32(qx.scale.reshape(()))
    ref = (acc.astype(np.float32) * sx) * np.asarray(q.scale, np.float32)
    np.testing.assert_allclose(y, ref, rtol=2e-7, atol=0)


def test_fp8_on_cpu_is_exact_in_bf16():
    """Every e4m3 / e5m2 value widens exactly to bfloat16 (why the CPU path may use it)."""
    from jaxquant._src.serve import grid_values_exact

    for name in ("e4m3", "e5m2", "int8", "int4", "fp4", "fp6_e2m3", "fp6_e3m2"):
        assert grid_values_exact(name, jnp.bfloat16), name
    assert not grid_values_exact("nf4", jnp.bfloat16)  # why NF4 dequantizes in float32


@pytest.mark.slow
def test_bf16_activation_runs_a_16_bit_gemm():
    x, w = _data()
    for spec in (jq.QuantSpec("int4", PC), jq.QuantSpec("int4", jq.per_block(0, 32))):
        q = jq.quantize(w, spec)
        f = jax.jit(lambda x, q: jq.dot_general(x, q, DN))
        if jax.default_backend() == "cpu":
            hlo = f.lower(x.astype(jnp.bfloat16), q).compile().as_text()
            assert _dot_operands(hlo, "f32[32,96]") == ["bf16[32,256]", "bf16[256,96]"]
        y = f(x.astype(jnp.bfloat16), q)
        assert y.dtype == jnp.bfloat16
        ref = jnp.dot(
            x.astype(jnp.bfloat16).astype(jnp.float32), q.dequantize(), precision="highest"
        )
        # a16: the activation and (for groups) the weight are rounded to bf16 once
        np.testing.assert_allclose(
            y.astype(jnp.float32), ref, atol=8e-3 * float(jnp.max(jnp.abs(ref)))
        )


def _dot_operands(hlo: str, result: str) -> list[str]:
    """Operand types of the dot producing ``result`` (looked up in its computation)."""
    for block in hlo.split("\n\n"):
        m = re.search(re.escape(result) + r"\{[^}]*\} dot\((%[\w.]+), (%[\w.]+)\)", block)
        if m:
            types = []
            for name in m.groups():
                d = re.search(re.escape(name) + r" = (\w+\[[\d,]*\])", block)
                types.append(d.group(1) if d else name)
            return types
    return []


@CPU_ONLY
def test_cpu_hlo_int8_dot_and_packed_weight():
    """w8a8 compiles to an s8 x s8 -> s32 dot; int4 weights enter as packed bytes."""
    x, w = _data()
    q8 = jq.quantize(w, jq.QuantSpec("int8", PC))
    f = jax.jit(lambda x, q: jq.dot_general(x, q, DN, lhs_spec=_static("int8")))
    hlo = f.lower(x, q8).compile().as_text()
    assert _dot_operands(hlo, "s32[32,96]") == ["s8[32,256]", "s8[256,96]"]
    q4 = jq.quantize(w, jq.QuantSpec("int4", jq.per_block(0, 32)))
    assert q4.values.shape == (256, 48) and q4.values.dtype == jnp.uint8
    g = jax.jit(lambda x, q: jq.dot_general(x, q, DN))
    entry = g.lower(x, q4).compile().as_text().split("ENTRY")[1].split("\n")[0]
    assert "u8[256,48]" in entry and "f32[256,96]" not in entry


@pytest.mark.slow
@pytest.mark.parametrize(
    "wfmt,aspec", [("int8", None), ("int8", _static("int8")), ("e4m3", _static("e4m3"))]
)
def test_gradient_is_straight_through(wfmt, aspec):
    x, w = _data()
    q = jq.quantize(w, jq.QuantSpec(wfmt, PC))
    g = jax.grad(lambda x: jnp.sum(jnp.sin(jq.dot_general(x, q, DN, lhs_spec=aspec))))(x)
    y = jq.dot_general(x, q, DN, lhs_spec=aspec)
    ref = jnp.dot(jnp.cos(y), q.dequantize().T, precision="highest")
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_einsum_with_qarray():
    x = jax.random.normal(jax.random.key(0), (2, 5, 64))
    w = jax.random.normal(jax.random.key(1), (64, 3, 8))
    q = jq.quantize(w, jq.QuantSpec("int8", jq.per_channel(1, 2)))
    y = jq.einsum("btd,dhf->bthf", x, q, lhs_spec=_static("int8", 3.0))
    ref = jnp.einsum(
        "btd,dhf->bthf", jq.fake_quant(x, _static("int8", 3.0)), q.dequantize(), precision="highest"
    )
    np.testing.assert_allclose(y, ref, atol=1e-4)


def test_errors():
    x, w = _data()
    q = jq.quantize(w, jq.QuantSpec("int8", PC))
    with pytest.raises(TypeError, match="must be the rhs"):
        jq.dot_general(q, x, DN)
    with pytest.raises(ValueError, match="already quantized"):
        jq.dot_general(x, q, DN, rhs_spec=jq.QuantSpec("int8"))
    with pytest.raises(ValueError, match="lhs_spec alone"):
        jq.dot_general(x, q, DN, lhs_spec=jq.QuantSpec("int8"), mode="emulate")
    with pytest.raises(ValueError, match="rounding='nearest'"):
        jq.dot_general(x, q, DN, lhs_spec=jq.QuantSpec("int8", rounding="stochastic"))
    with pytest.raises(TypeError, match="floating-point"):
        jq.dot_general(x.astype(jnp.int32), q, DN)
    with pytest.raises(TypeError, match="does not support indexing"):
        q[0]
    assert q[...] is q
