"""Quantized key / value caches (jaxquant/_src/kv_cache.py) and the decode loop of the app's
ByteLM that uses them (jaxquant.app.models.decode_logits)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxquant as jq
from jaxquant.app.models import ByteLM, decode_logits

SHAPE = (2, 8, 3, 16)  # batch, tokens, heads, head_dim
SPECS = {
    "int8": jq.QuantSpec("int8", jq.per_token()),
    "fp8": jq.QuantSpec("fp8", jq.per_token()),
    "int4": jq.QuantSpec("int4", jq.per_token()),
    "int4_g8": jq.QuantSpec("int4", jq.per_block(-1, 8)),
    "nf4": jq.QuantSpec("nf4", jq.per_token()),
    "int4_asym": jq.QuantSpec("int4", jq.per_token(), jq.minmax(), symmetric=False),
}


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("jit", [False, True])
def test_update_writes_only_its_tokens(name, jit):
    spec = SPECS[name]
    cache = jq.kv_cache_init(SHAPE, spec)
    np.testing.assert_array_equal(np.asarray(jq.dequantize(cache)), np.zeros(SHAPE, np.float32))
    new = jax.random.normal(jax.random.key(0), (2, 3, 3, 16), jnp.float32)
    update = jax.jit(jq.kv_cache_update) if jit else jq.kv_cache_update
    out = update(cache, new, jnp.int32(4))
    got = np.asarray(jq.dequantize(out))
    # the written tokens hold exactly what jq.quantize stores for them (one token's groups
    # never depend on another's), the others stay zero
    want = np.asarray(jq.dequantize(jq.quantize(new, spec)))
    np.testing.assert_array_equal(got[:, 4:7], want)
    np.testing.assert_array_equal(got[:, :4], 0.0)
    np.testing.assert_array_equal(got[:, 7:], 0.0)
    assert out.nbytes == cache.nbytes and out.values.dtype == cache.values.dtype


def test_true_bytes():
    b, t, h, d = SHAPE
    groups = b * t * h
    assert jq.kv_cache_init(SHAPE, SPECS["int8"]).nbytes == groups * d + 4 * groups
    assert jq.kv_cache_init(SHAPE, SPECS["int4"]).nbytes == groups * d // 2 + 4 * groups
    assert jq.kv_cache_init(SHAPE, SPECS["int4_g8"]).nbytes == groups * d // 2 + 4 * groups * 2


def test_layouts_that_share_scales_across_tokens_are_refused():
    with pytest.raises(ValueError, match=r"shares a scale across tokens.*per_token"):
        jq.kv_cache_init(SHAPE, jq.QuantSpec("int8"))
    with pytest.raises(ValueError, match="shares a scale across tokens"):
        jq.kv_cache_init(SHAPE, jq.QuantSpec("int8", jq.per_block(1, 4)))
    with pytest.raises(ValueError, match="bit-packed along the last axis"):
        jq.kv_cache_init((2, 3, 8), jq.QuantSpec("int4", jq.per_channel((0, 2))), axis=2)


@pytest.mark.slow  # two compiles of the whole decode loop (~4 s): not in the edit-test loop
def test_decode_with_a_float_cache_equals_the_full_forward():
    lm = ByteLM(seq=12, d=32, layers=2, heads=4, hidden=64)
    tok = jax.random.randint(jax.random.key(1), (3, 12), 0, 256, dtype=jnp.int32)
    # jitted: an eager init / apply of the model compiles op by op
    params = jax.jit(lm.init)(jax.random.key(0), tok)["params"]
    full = jax.jit(lm.apply)({"params": params}, tok)
    for rotate in (False, True):  # the rotation is orthogonal: exact in float
        step = jax.jit(
            lambda p, t, r=rotate: decode_logits(lm.clone(decode=True, kv_rotate=r), p, t)
        )
        np.testing.assert_allclose(np.asarray(step(params, tok)), np.asarray(full), atol=2e-5)


@pytest.mark.slow
def test_quantized_cache_on_the_trained_byte_lm():
    """The decode loop's held-out loss with the cache stored in 8 / 4 bits (per token and
    head), and 4 bits after QuaRot's Hadamard rotation of the head dimension: measured on
    the PTQ test bed (32 windows of 64 bytes), float cache +0 by construction."""
    import _ptq_beds as beds
    import ptq_testbed as tb

    p = tb.params()
    x = jnp.asarray(tb.data()["x_test"][:32])
    y = jnp.asarray(tb.data()["y_test"][:32])
    # the full-sequence model's loss, once (jitted, shared with the other PTQ files)
    ref = optax.softmax_cross_entropy_with_integer_labels(beds.float_apply({"params": p}, x), y)

    def gap(spec, rotate=False):
        lm = tb.MODEL.clone(decode=True, kv_spec=spec, kv_rotate=rotate)
        logits = jax.jit(lambda p, x: decode_logits(lm, p, x))(p, x)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        # the cache's shapes and dtypes (an eager init would compute every parameter)
        cache = jax.eval_shape(lm.init, jax.random.key(0), x[:, :1])["cache"]
        nbytes = sum(
            leaf.nbytes if isinstance(leaf, jq.QArray) else leaf.size * leaf.dtype.itemsize
            for leaf in jax.tree_util.tree_leaves(cache, is_leaf=lambda a: isinstance(a, jq.QArray))
        )
        return float(nll - ref.mean()), nbytes

    float_gap, float_bytes = gap(None)
    int8, int8_bytes = gap(SPECS["int8"])
    int4, int4_bytes = gap(SPECS["int4"])
    int4_rot, _ = gap(SPECS["int4"], rotate=True)
    assert abs(float_gap) < 1e-5
    # measured 2026-12-06: int8 +0.00014, int4 +0.0074, int4 after rotation +0.0038 nats/byte
    assert 0 <= int8 < 0.001
    assert int8 < int4 < 0.02
    assert int4_rot < 0.75 * int4
    # bytes: 1 (int8) or 0.5 (int4) per entry + a float32 scale per 16-entry head
    assert int8_bytes / float_bytes == pytest.approx((1 + 4 / 16) / 4, rel=1e-3)
    assert int4_bytes / float_bytes == pytest.approx((0.5 + 4 / 16) / 4, rel=1e-3)
