"""NVFP4 (two-level e2m1 / e4m3 / float32 scaling) and MXINT8 against independent oracles.

The NVFP4 oracle is a numpy first-principles implementation of Transformer Engine's recipe
(arXiv 2509.25149; see jaxquant.formats.nvfp4_format) in float32 arithmetic, with ml_dtypes
doing the E4M3 and e2m1 round-to-nearest-even casts. MXINT8 is checked against gfloat's
OCP MX implementation when installed, else a numpy version of OCP MX v1.0 section 6.3.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxquant as jq
from jaxquant._src.formats import nvfp4_format
from jaxquant._src.serialize import spec_from_dict, spec_to_dict

F32_MAX = np.float32(np.finfo(np.float32).max)
TINY = np.float32(2.0**-126)


def _ftz(a: np.ndarray) -> np.ndarray:
    # XLA flushes float32 subnormal results (jaxquant's correctly rounded divisions too).
    return np.where(np.abs(a) < TINY, a * np.float32(0), a).astype(np.float32)  # signed 0


def te_nvfp4(x: np.ndarray, block: int = 16, floor: float = 0.0) -> dict[str, np.ndarray]:
    """Transformer Engine's NVFP4 quantization of ``x`` (blocks along the last axis)."""
    x = np.asarray(x, np.float32)
    xv = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    a = np.abs(xv)
    a = np.where(np.isnan(a), np.float32(0), a)
    bamax = a.max(-1, keepdims=True)
    amax = np.float32(bamax.max()) if bamax.size else np.float32(0)
    with np.errstate(over="ignore", divide="ignore"):
        if amax == 0 or np.isinf(amax):
            s_enc = np.float32(1)
        else:
            s_enc = np.minimum(np.float32(6 * 448) / amax, F32_MAX)
    # Transformer Engine's core_nvfp4.cuh: S_dec_b = block_amax * (S_enc * (1 / 6)),
    # scale_rcp = min(1 / (S_dec_b_fp8 * (1 / S_enc)), f32max).
    raw = bamax * (s_enc * np.float32(1 / 6))
    raw = np.maximum(raw, np.float32(floor))
    b = np.minimum(raw, np.float32(448)).astype(ml_dtypes.float8_e4m3fn)  # RNE, saturated
    bf = b.astype(np.float32)
    s_eff = _ftz(bf / s_enc)
    s_dec = _ftz(np.float32(1) / s_enc)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = np.minimum(np.float32(1) / _ftz(bf * s_dec), F32_MAX).astype(np.float32)
        y = _ftz(xv * inv)
    e = np.clip(y, -6, 6).astype(ml_dtypes.float4_e2m1fn)  # RNE onto e2m1
    codes = e.view(np.uint8) & 0xF
    dec = _ftz(e.astype(np.float32) * s_eff)
    return {
        "codes": codes.reshape(x.shape),
        "block": b.view(np.uint8),
        "tensor": s_enc,
        "y": y,
        "dec": dec.reshape(x.shape),
    }


def _mixed(seed: int, rows: int = 8, cols: int = 256) -> np.ndarray:
    """Blocks of log-uniform magnitude over 12 decades (subnormal E4M3 scales and flushed
    ones), an all-zero block, exact ties of the e2m1 grid."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    mags = 10.0 ** rng.uniform(-9, 3, size=(rows, cols // 16, 1))
    x = (x.reshape(rows, cols // 16, 16) * mags).reshape(rows, cols).astype(np.float32)
    x[0, :16] = 0.0
    x[1, :16] = np.arange(16, dtype=np.float32) * 0.25 - 2.0
    return x


def _check(q: jq.QArray, ref: dict[str, np.ndarray], out: np.ndarray, codes=None, deq=None) -> None:
    """q against the oracle; ``codes`` / ``deq`` computed already, else eagerly here."""
    codes = q.codes() if codes is None else codes
    np.testing.assert_array_equal(np.asarray(codes), ref["codes"])
    np.testing.assert_array_equal(
        np.asarray(q.scale).view(np.uint8).reshape(ref["block"].shape), ref["block"]
    )
    assert np.float32(q.tensor_scale) == ref["tensor"]
    deq = jq.dequantize(q) if deq is None else deq
    np.testing.assert_array_equal(np.asarray(deq), ref["dec"])
    np.testing.assert_array_equal(out, ref["dec"])


@functools.cache
def _jit_all(spec: jq.QuantSpec):
    """quantize, fake_quant, dequantize and codes of one input in one jitted program: the
    two quantizations share one computation, and codes() (eager: one program per
    operation) compiles with them. Eager runs: test_nvfp4_matches_transformer_engine_recipe,
    test_nvfp4_all_zero_and_inf_tensors, test_nvfp4_narrow_input_dtypes."""

    def run(x):
        q = jq.quantize(x, spec)
        return q, jq.fake_quant(x, spec), q.codes(), jq.dequantize(q)

    return jax.jit(run)


def _check_jit(x: np.ndarray, spec: jq.QuantSpec, ref: dict[str, np.ndarray]) -> jq.QArray:
    q, out, codes, deq = _jit_all(spec)(jnp.asarray(x))
    _check(q, ref, np.asarray(out), codes, deq)
    return q


SPEC = jq.QuantSpec("nvfp4")


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("jit", [False, True])
def test_nvfp4_matches_transformer_engine_recipe(seed: int, jit: bool) -> None:
    x = _mixed(seed)
    ref = te_nvfp4(x)
    quantize = jax.jit(jq.quantize, static_argnums=1) if jit else jq.quantize
    fq = jax.jit(jq.fake_quant, static_argnums=1) if jit else jq.fake_quant
    q = quantize(jnp.asarray(x), SPEC)
    _check(q, ref, np.asarray(fq(jnp.asarray(x), SPEC)))
    # The grid covers the interesting cases (else this test could pass vacuously).
    b = ref["block"].view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    nz = np.abs(x.reshape((*b.shape[:-1], 16))).max(-1, keepdims=True) > 0
    assert ((b > 0) & (b < 2.0**-6)).any(), "no subnormal E4M3 block scale"
    assert ((b == 0) & nz).any(), "no flushed block scale"
    assert (np.abs(ref["y"]) > 6).any(), "no saturated element"


def test_nvfp4_dense_grid_and_ties() -> None:
    # Blocks whose amax is 6 get S = 448, b = 448 and S / b = 1: the scaled values are x
    # itself, so every quarter in [-6, 6] (all e2m1 values and every tie) is rounded as it
    # is. Four blocks of 15 grid points (zero-padded) and a 6.
    g = np.concatenate([np.arange(-24, 25, dtype=np.float32) / 4, np.zeros(11, np.float32)])
    x = np.concatenate([g.reshape(4, 15), np.full((4, 1), 6.0, np.float32)], 1).reshape(1, 64)
    ref = te_nvfp4(x)
    assert ref["tensor"] == 448 and np.all(ref["block"].view(ml_dtypes.float8_e4m3fn) == 448)
    _check_jit(x, SPEC, ref)
    # Half to even at the ties: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2,
    # 3.5 -> 4, 5 -> 4; 5.5 -> 6 is not a tie.
    out = np.asarray(_jit_all(SPEC)(jnp.asarray(x))[1])[0]
    got = dict(zip(x[0].tolist(), out.tolist(), strict=True))
    ties = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.5, -0.25, -2.5, -5.0)
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -0.0, -2.0, -4.0]
    assert [got[v] for v in ties] == want


def test_nvfp4_all_zero_and_inf_tensors() -> None:
    z = jnp.zeros((2, 32), jnp.float32)
    q = jq.quantize(z, SPEC)
    assert float(q.tensor_scale) == 1.0  # TE: S = 1 when amax is 0 (torchao: NaN)
    assert not np.asarray(jq.dequantize(q)).any() and not np.asarray(q.codes()).any()
    x = _mixed(7, rows=2, cols=32)
    x[0, 3], x[1, 20] = np.inf, -np.inf
    ref = te_nvfp4(x)
    assert ref["tensor"] == 1.0
    q = jq.quantize(jnp.asarray(x), SPEC)
    _check(q, ref, np.asarray(jq.fake_quant(jnp.asarray(x), SPEC)))
    assert np.asarray(q.codes())[0, 3] == 0b0111 and np.asarray(q.codes())[1, 20] == 0b1111


def test_nvfp4_nan_and_tiny_amax() -> None:
    x = np.full((1, 16), 1e-37, np.float32)  # S capped at float32's max
    x[0, 0] = 3e-37
    ref = te_nvfp4(x)
    assert ref["tensor"] == F32_MAX
    _check_jit(x, SPEC, ref)
    y = np.ones((1, 16), np.float32)
    y[0, 5] = np.nan
    out = np.asarray(_jit_all(SPEC)(jnp.asarray(y))[1])
    assert np.isnan(out[0, 5]) and np.all(out[0, np.arange(16) != 5] == 1.0)


def test_nvfp4_vmap_is_per_example() -> None:
    x = _mixed(3, rows=4, cols=64)
    qs = jax.vmap(lambda r: jq.quantize(r, SPEC))(jnp.asarray(x))
    assert qs.tensor_scale.shape == (4,)
    codes = np.asarray(jax.vmap(lambda q: q.codes())(qs))
    deq = np.asarray(jax.vmap(jq.dequantize)(qs))
    for i in range(4):
        ref = te_nvfp4(x[i])
        assert np.float32(qs.tensor_scale[i]) == ref["tensor"]
        np.testing.assert_array_equal(codes[i], ref["codes"])
        np.testing.assert_array_equal(deq[i], ref["dec"])
    fq = jax.vmap(lambda r: jq.fake_quant(r, SPEC))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(fq), np.stack([te_nvfp4(r)["dec"] for r in x]))


@pytest.mark.parametrize("shape", [(16,), (4, 64), (3, 2, 128)])
def test_nvfp4_nbytes(shape: tuple[int, ...]) -> None:
    n = int(np.prod(shape))
    q = jq.quantize(jnp.ones(shape, jnp.float32), SPEC)
    assert q.nbytes == n // 2 + n // 16 + 4  # 0.5 B per value, 1 B per 16, 4 B per tensor
    assert q.values.dtype == jnp.uint8 and q.scale.dtype == jnp.float8_e4m3fn
    assert q.tensor_scale.dtype == jnp.float32 and q.tensor_scale.shape == ()
    assert jq.formats.get("nvfp4").bits_per_value == 4.5


def test_nvfp4_other_formats_pytree_unchanged() -> None:
    q = jq.quantize(jnp.ones((4, 32)), jq.QuantSpec("mxfp4"))
    assert q.tensor_scale is None and len(jax.tree_util.tree_leaves(q)) == 2
    qn = jq.quantize(jnp.ones((4, 32)), SPEC)
    assert len(jax.tree_util.tree_leaves(qn)) == 3
    back = jax.jit(lambda q: q)(qn)
    np.testing.assert_array_equal(np.asarray(back.dequantize()), np.asarray(qn.dequantize()))


def test_nvfp4_stochastic_rounding_unbiased() -> None:
    # One block with amax 6 (S / b = 1): values in (-6, 6), none saturate. n = 4000 draws
    # per element; each draw is within one grid step d (<= 2) of x, so the mean's standard
    # deviation is at most d / (2 sqrt(n)); the bound is 5 of those.
    rng = np.random.default_rng(0)
    x = rng.uniform(-5.9, 5.9, 16).astype(np.float32)
    x[0] = 6.0
    spec = jq.QuantSpec("nvfp4", rounding="stochastic")
    n = 4000
    keys = jax.random.split(jax.random.key(0), n)
    draws = np.asarray(
        jax.jit(jax.vmap(lambda k: jq.fake_quant(jnp.asarray(x), spec, key=k)))(keys)
    )
    grid = jq.formats.finite_values("e2m1")
    assert np.isin(draws, grid).all()
    step = np.array([np.diff(grid)[min(np.searchsorted(grid, abs(v)), 14) - 1] for v in x])
    bound = 5 * step / (2 * np.sqrt(n))
    assert np.all(np.abs(draws.mean(0) - x) <= bound + 1e-7), (draws.mean(0) - x, bound)
    # Every draw is one of the two neighbours (not a nearest-rounding copy).
    assert len(np.unique(draws[:, 1])) == 2 or x[1] in grid


def test_nvfp4_scale_floor_option() -> None:
    for floor in (2.0**-6, 2.0**-9):  # torchao, ModelOpt
        spec = jq.QuantSpec(nvfp4_format("nvfp4_floor", scale_floor=floor))
        x = _mixed(11)
        ref = te_nvfp4(x, floor=floor)
        q = _check_jit(x, spec, ref)
        b = np.asarray(q.scale).astype(np.float32)
        assert b.min() >= floor


def test_nvfp4_spec_errors_and_serialization() -> None:
    with pytest.raises(ValueError, match="absmax"):
        jq.QuantSpec("nvfp4", calibration=jq.percentile(99.9))
    with pytest.raises(ValueError, match="scale="):
        jq.quantize(jnp.ones((16,)), SPEC, scale=1.0)
    with pytest.raises(ValueError, match="per_block"):
        jq.QuantSpec("nvfp4", jq.per_tensor())
    for spec in (
        SPEC,
        jq.QuantSpec(nvfp4_format("nvt", scale_floor=2.0**-6)),
        jq.QuantSpec("mxint8"),
    ):
        assert spec_from_dict(json.loads(json.dumps(spec_to_dict(spec)))) == spec


def test_nvfp4_clipped_ste_and_grad() -> None:
    x = jnp.asarray(_mixed(5, rows=2, cols=64))
    g = jax.grad(lambda x: jq.fake_quant(x, SPEC).sum())(x)
    np.testing.assert_array_equal(np.asarray(g), np.ones(x.shape, np.float32))
    gc = jax.grad(lambda x: jq.fake_quant(x, SPEC, ste="clipped").sum())(x)
    y = te_nvfp4(np.asarray(x))["y"].reshape(x.shape)
    np.testing.assert_array_equal(np.asarray(gc), (np.abs(y) <= 6).astype(np.float32))


def test_nvfp4_dot_general_is_dequantize_and_dot() -> None:
    # Emulated: H100/H200 have no FP4 tensor cores; the operands are dequantized.
    rng = np.random.default_rng(2)
    a = jnp.asarray(rng.standard_normal((8, 64)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((64, 16)).astype(np.float32))
    dn = (((1,), (0,)), ((), ()))
    out = jq.dot_general(
        a, w, dn, lhs_spec=SPEC, rhs_spec=jq.QuantSpec("nvfp4", jq.per_block(0, 16))
    )
    wq = jq.fake_quant(w, jq.QuantSpec("nvfp4", jq.per_block(0, 16)))
    ref = np.asarray(jq.fake_quant(a, SPEC), np.float64) @ np.asarray(wq, np.float64)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- MXINT8


def _mxint8_oracle(x: np.ndarray) -> np.ndarray:
    try:
        import gfloat
        from gfloat.formats import format_info_mxint8
    except ImportError:  # numpy: OCP MX v1.0 section 6.3, X = 2^floor(log2 amax), int8 / 64
        xb = x.reshape(-1, 32).astype(np.float64)
        amax = np.abs(xb).max(-1, keepdims=True)
        e = np.floor(np.log2(np.where(amax > 0, amax, 1.0)))
        scale = np.where(amax > 0, 2.0**e, 1.0)
        q = np.clip(np.round(xb / scale * 64), -127, 127) / 64
        return (q * scale).reshape(x.shape)
    blocks = x.reshape(-1, 32).astype(np.float64)
    return np.stack(
        [gfloat.quantize_block(format_info_mxint8, b, gfloat.compute_scale_amax) for b in blocks]
    ).reshape(x.shape)


@pytest.mark.parametrize("jit", [False, True])
def test_mxint8_matches_ocp(jit: bool) -> None:
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((16, 128)) * 10.0 ** rng.uniform(-3, 3, (16, 1))).astype(np.float32)
    x[0, :32] = 0.0
    x[1, :32] = np.linspace(-1.99, 1.99, 32, dtype=np.float32)  # near +-2: saturation
    spec = jq.QuantSpec("mxint8")
    fq = jax.jit(jq.fake_quant, static_argnums=1) if jit else jq.fake_quant
    got = np.asarray(fq(jnp.asarray(x), spec))
    np.testing.assert_array_equal(got, _mxint8_oracle(x).astype(np.float32))
    q = jq.quantize(jnp.asarray(x), spec)
    assert q.values.dtype == jnp.int8 and q.scale.dtype == jnp.float8_e8m0fnu
    assert q.nbytes == x.size + x.size // 32
    np.testing.assert_array_equal(np.asarray(jq.dequantize(q)), got)
    assert np.abs(np.asarray(q.codes())).max() <= 127


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_nvfp4_narrow_input_dtypes(dtype) -> None:
    x = jnp.asarray(_mixed(9, rows=2, cols=64) * 1e3).astype(dtype)
    ref = te_nvfp4(np.asarray(x.astype(jnp.float32)))
    out = jq.fake_quant(x, SPEC)
    assert out.dtype == dtype
    np.testing.assert_array_equal(np.asarray(out), ref["dec"].astype(dtype))
    q = jq.quantize(x, SPEC)
    np.testing.assert_array_equal(np.asarray(q.codes()), ref["codes"])
    assert jq.dequantize(q).dtype == dtype


def test_nvfp4_and_mxint8_in_listing_and_explain(capsys) -> None:
    from jaxquant._src import cli, explain

    assert {"nvfp4", "mxint8"} <= set(jq.formats.names())
    assert cli.main(["formats", "--kind", "mx", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["nvfp4"]["bits"] == 4.5 and rows["mxint8"]["bits"] == 8.25
    assert "float32 scale per tensor" in explain.describe_format(jq.formats.get("nvfp4"))
    assert cli.main(["explain", "-f", "nvfp4", "mxint8", "--", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "e4m3 scale b per block" in out and "c / 64" in out


def test_nvfp4_dot_general_backward() -> None:
    # Straight-through: d/dx sum(q(x) @ q(w)) = 1 @ q(w)^T; with an NVFP4 gradient spec
    # and stochastic rounding the step still runs under jit and is finite.
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((8, 64)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((64, 32)).astype(np.float32))
    dn = (((1,), (0,)), ((), ()))
    wspec = jq.QuantSpec("nvfp4", jq.per_block(0, 16))

    def loss(x, w, key=None, grad_spec=None):
        kw = {} if grad_spec is None else {"grad_spec": grad_spec, "key": key}
        return jq.dot_general(x, w, dn, lhs_spec=SPEC, rhs_spec=wspec, **kw).sum()

    gx = jax.jit(jax.grad(loss))(x, w)
    want = np.ones((8, 32), np.float64) @ np.asarray(jq.fake_quant(w, wspec), np.float64).T
    np.testing.assert_allclose(np.asarray(gx), want, rtol=1e-5, atol=1e-5)
    sr = jq.QuantSpec("nvfp4", rounding="stochastic")
    g = jax.jit(jax.grad(lambda x, w, k: loss(x, w, k, sr), argnums=(0, 1)))(
        x, w, jax.random.key(0)
    )
    assert all(np.isfinite(np.asarray(t)).all() for t in g)


def test_size_report_counts_the_per_tensor_scale():
    q = jq.quantize(jnp.ones((4, 64), jnp.float32), jq.QuantSpec("nvfp4"))
    leaf = jq.size_report({"w": q}).leaves[0]
    # 0.5 B per value, 1 B per 16 values (E4M3 block scales), 4 B per tensor
    assert (leaf.value_bytes, leaf.scale_bytes) == (128, 16 + 4)
    assert leaf.value_bytes + leaf.scale_bytes == q.nbytes
