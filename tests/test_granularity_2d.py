"""2-D block scaling (``jq.per_block_2d``): one scale per tile of two axes.

Oracles: a numpy first-principles per-tile quantizer (int8 absmax, OCP MX e8m0), Transformer
Engine's NVFP4 recipe applied to each tile (``test_nvfp4.te_nvfp4`` on the tiles laid out as
rows), and the point of 2-D tiles: quantizing ``w.T`` with the transposed tiles gives
exactly the transposed values.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_nvfp4 import te_nvfp4

import jaxquant as jq
from jaxquant._src.serialize import spec_from_dict, spec_to_dict


def _heavy(seed: int, shape: tuple[int, int]) -> np.ndarray:
    """Gaussian values, tile-to-tile magnitudes over 6 decades, one large outlier."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    mags = 10.0 ** rng.uniform(-3, 3, size=(shape[0] // 16, 1, shape[1] // 16, 1))
    x = (x.reshape(shape[0] // 16, 16, shape[1] // 16, 16) * mags).reshape(shape)
    x = x.astype(np.float32)
    x[0, 0] = 40.0 * np.abs(x).max()
    return x


def _tiles(x: np.ndarray, b0: int, b1: int) -> np.ndarray:
    """(R, C) -> (R / b0, C / b1, b0 * b1): each tile as one row."""
    r, c = x.shape
    return x.reshape(r // b0, b0, c // b1, b1).transpose(0, 2, 1, 3).reshape(r // b0, c // b1, -1)


def _untile(t: np.ndarray, b0: int, b1: int) -> np.ndarray:
    r0, c0, _ = t.shape
    return t.reshape(r0, c0, b0, b1).transpose(0, 2, 1, 3).reshape(r0 * b0, c0 * b1)


def _int8_oracle(x: np.ndarray, b0: int, b1: int) -> np.ndarray:
    t = _tiles(x, b0, b1).astype(np.float64)
    amax = np.abs(t).max(-1, keepdims=True)
    s = np.where(amax > 0, (amax / 127).astype(np.float32), 1.0).astype(np.float64)
    q = np.clip(np.round(t / s), -127, 127)
    return _untile((q * s).astype(np.float32), b0, b1)


def _mx_oracle(x: np.ndarray, emax: int, b0: int, b1: int, elem) -> np.ndarray:
    """OCP MX v1.0: X = 2^(floor(log2 amax) - emax) per tile, elements cast (RNE, saturated)."""
    t = _tiles(x, b0, b1).astype(np.float64)
    amax = np.abs(t).max(-1, keepdims=True)
    e = np.floor(np.log2(np.where(amax > 0, amax, 1.0)))
    scale = np.where(amax > 0, 2.0 ** (e - emax), 1.0)
    fmax = float(np.finfo(elem).max)
    v = np.clip(t / scale, -fmax, fmax).astype(elem).astype(np.float64)
    return _untile((v * scale).astype(np.float32), b0, b1)


# Square tiles eagerly, non-square under jit (each mode compiles its own programs).
@pytest.mark.parametrize(("sizes", "jit"), [((16, 16), False), ((8, 32), True)])
def test_int8_tiles_match_numpy(jit: bool, sizes: tuple[int, int]) -> None:
    x = _heavy(0, (32, 64))
    spec = jq.QuantSpec("int8", jq.per_block_2d(sizes, axes=(0, 1)))
    fq = jax.jit(jq.fake_quant, static_argnums=1) if jit else jq.fake_quant
    got = np.asarray(fq(jnp.asarray(x), spec))
    np.testing.assert_allclose(got, _int8_oracle(x, *sizes), rtol=2e-7, atol=0)
    q = jq.quantize(jnp.asarray(x), spec)
    assert q.scale.shape == (32 // sizes[0], 1, 64 // sizes[1], 1)
    np.testing.assert_array_equal(np.asarray(jq.dequantize(q)), got)


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8", "mxfp6_e3m2"])
def test_mx_tiles_match_ocp(fmt: str) -> None:
    import ml_dtypes

    elem, emax = {
        "mxfp4": (ml_dtypes.float4_e2m1fn, 2),
        "mxfp8": (ml_dtypes.float8_e4m3fn, 8),
        "mxfp6_e3m2": (ml_dtypes.float6_e3m2fn, 4),
    }[fmt]
    x = _heavy(1, (64, 64))
    spec = jq.QuantSpec(fmt, jq.per_block_2d(32))
    got = np.asarray(jq.fake_quant(jnp.asarray(x), spec))
    np.testing.assert_array_equal(got, _mx_oracle(x, emax, 32, 32, elem))
    q = jq.quantize(jnp.asarray(x), spec)
    assert q.scale.dtype == jnp.float8_e8m0fnu and q.scale.size == 4


@pytest.mark.parametrize("jit", [False, True])
def test_nvfp4_tiles_match_transformer_engine(jit: bool) -> None:
    # TE's NVFP4 rule on each 16 x 16 tile: the tiles laid out as rows of 256 values, one
    # block per row; the per-tensor scale is the same (one amax for the whole tensor).
    x = _heavy(2, (48, 64))
    spec = jq.QuantSpec("nvfp4", jq.per_block_2d(16))
    ref = te_nvfp4(_tiles(x, 16, 16), block=256)
    quant = jax.jit(jq.quantize, static_argnums=1) if jit else jq.quantize
    q = quant(jnp.asarray(x), spec)
    assert np.float32(q.tensor_scale) == ref["tensor"]
    np.testing.assert_array_equal(
        np.asarray(q.scale).view(np.uint8).reshape(3, 4), ref["block"].reshape(3, 4)
    )
    np.testing.assert_array_equal(np.asarray(jq.dequantize(q)), _untile(ref["dec"], 16, 16))
    np.testing.assert_array_equal(
        np.asarray(jq.fake_quant(jnp.asarray(x), spec)), _untile(ref["dec"], 16, 16)
    )
    # True size: 0.5 B per value, 1 B per tile (e4m3), 4 B of per-tensor scale.
    assert q.nbytes == x.size // 2 + x.size // 256 + 4


TILE_FORMATS = ["int8", "int4", "e4m3", "mxfp4", "mxfp8", "nvfp4"]


@pytest.mark.parametrize("fmt", TILE_FORMATS)
def test_transposed_tiles_give_transposed_values(fmt: str) -> None:
    # The point of 2-D blocks: the same quantized weight whichever axis a product contracts.
    w = jnp.asarray(_heavy(3, (32, 96)))
    spec = jq.QuantSpec(fmt, jq.per_block_2d(16, axes=(0, 1)))
    # Square tiles: the axes' order does not matter (checked on every other format), and
    # fake_quant gives the same transposed values (on the others): each extra
    # quantization of the transpose adds to the one compiled program per format.
    if TILE_FORMATS.index(fmt) % 2 == 0:
        spec_t = jq.QuantSpec(fmt, jq.per_block_2d(16, axes=(1, 0)))
        extra = lambda v: jq.dequantize(jq.quantize(v, spec_t))
    else:
        extra = lambda v: jq.fake_quant(v, spec)
    # Non-square tiles: (16, 32) on (0, 1) is (32, 16) on the transpose.
    r = jq.QuantSpec(fmt, jq.per_block_2d((16, 32), axes=(0, 1)))
    rt = jq.QuantSpec(fmt, jq.per_block_2d((32, 16), axes=(0, 1)))
    # 1-D blocks do not have this property (the reason for 2-D weights).
    one = jq.QuantSpec(fmt, jq.per_block(-1, 16 if fmt == "nvfp4" else 32))

    @jax.jit  # every quantization of this format in one program (eagerly: the tests above)
    def run(w):
        rq = lambda v, s: jq.dequantize(jq.quantize(v, s))
        return (
            rq(w, spec),
            rq(w.T, spec),
            extra(w.T),
            jq.fake_quant(w.T, rt),
            jq.fake_quant(w, r),
            *(
                (jq.fake_quant(w, one), jq.fake_quant(w.T, one))
                if fmt in ("mxfp4", "nvfp4")
                else ()
            ),
        )

    a, a_t, e_t, n_t, n, *one_d = (np.asarray(v) for v in run(w))
    np.testing.assert_array_equal(a_t, a.T)
    np.testing.assert_array_equal(e_t, a.T)
    np.testing.assert_array_equal(n_t, n.T)
    if one_d:
        assert not np.array_equal(one_d[1], one_d[0].T)


def test_batched_axes_vmap_and_stochastic() -> None:
    # Leading axes keep their own tiles; vmap over them gives the same values.
    x = jnp.asarray(np.stack([_heavy(s, (32, 32)) for s in range(3)]))
    spec = jq.QuantSpec("nvfp4", jq.per_block_2d(16))
    mx = jq.QuantSpec("mxfp4", jq.per_block_2d(16))
    np.testing.assert_array_equal(
        np.asarray(jax.vmap(lambda a: jq.fake_quant(a, mx))(x)),
        np.asarray(jq.fake_quant(x, mx)),  # per-tile scales: no cross-example coupling
    )
    per = np.stack([np.asarray(jq.fake_quant(x[i], spec)) for i in range(3)])
    np.testing.assert_array_equal(np.asarray(jax.vmap(lambda a: jq.fake_quant(a, spec))(x)), per)
    # Stochastic rounding with 2-D tiles: unbiased (mean of 2000 draws within 4 sigma).
    sr = jq.QuantSpec("int4", jq.per_block_2d(16), rounding="stochastic")
    v = jnp.asarray(_heavy(7, (16, 16))) * 0 + jnp.linspace(-1, 1, 256).reshape(16, 16)
    keys = jax.random.split(jax.random.key(0), 2000)
    draws = jax.vmap(lambda k: jq.fake_quant(v, sr, key=k))(keys)
    step = 1.0 / 7
    err = np.asarray(draws.mean(0) - v)
    assert np.abs(err).max() < 4 * (step / 2) / np.sqrt(2000)


def test_gradient_is_straight_through() -> None:
    x = jnp.asarray(_heavy(4, (32, 32)))
    spec = jq.QuantSpec("nvfp4", jq.per_block_2d(16))
    g = jax.grad(lambda a: jnp.sum(jq.fake_quant(a, spec) * 3.0))(x)
    np.testing.assert_array_equal(np.asarray(g), np.full(x.shape, 3.0, np.float32))


def test_serialization_round_trip() -> None:
    for spec in (
        jq.QuantSpec("int4", jq.per_block_2d((16, 32), axes=(0, 2))),
        jq.QuantSpec("nvfp4", jq.per_block_2d(16)),
    ):
        d = spec_to_dict(spec)
        assert d["granularity"]["type"] == "per_block_2d"
        assert spec_from_dict(json.loads(json.dumps(d))) == spec


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="must differ"):
        jq.per_block_2d(16, axes=(1, 1))
    with pytest.raises(ValueError, match="positive"):
        jq.per_block_2d(0)
    with pytest.raises(TypeError, match="two ints"):
        jq.per_block_2d(16, axes=(0, 1, 2))  # type: ignore[arg-type]
    spec = jq.QuantSpec("int8", jq.per_block_2d(16))
    with pytest.raises(ValueError, match=r"block size 16 does not divide axis -1 of length 24"):
        jq.quantize(jnp.ones((32, 24)), spec)
    with pytest.raises(ValueError, match="fewer than two axes"):
        jq.quantize(jnp.ones((32,)), spec)
    with pytest.raises(ValueError, match="same axis"):
        jq.quantize(jnp.ones((32, 32)), jq.QuantSpec("int8", jq.per_block_2d(16, axes=(1, -1))))


def test_gptq_refuses_tiles_by_name():
    x = jax.random.normal(jax.random.key(0), (64, 32))
    w = jax.random.normal(jax.random.key(1), (32, 32))
    with pytest.raises(ValueError, match=r"gptq: per_block_2d.*not supported"):
        jq.ptq.gptq_solve(w, x.T @ x, jq.QuantSpec("int4", jq.per_block_2d(16)))


def test_a_transposed_use_reverses_both_tile_axes():
    from jaxquant._src.flax.serve import reversed_spec

    spec = jq.QuantSpec("nvfp4", jq.per_block_2d((16, 32), axes=(0, 1)))
    got = reversed_spec(spec, 2, "kernel")
    # 16 rows per tile along w's axis 0 become 16 along w.T's axis 1.
    assert got.granularity == jq.per_block_2d((16, 32), axes=(1, 0))
    w = jax.random.normal(jax.random.key(2), (32, 64))
    # Quantizing w.T with the reversed spec gives the transposed values of w's.
    np.testing.assert_array_equal(
        np.asarray(jq.fake_quant(w.T, got)), np.asarray(jq.fake_quant(w, spec)).T
    )
