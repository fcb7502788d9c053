"""QArray: bit packing layout, true byte sizes, pytree behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant._src import qarray


@pytest.mark.parametrize("bits", range(1, 8))
@pytest.mark.parametrize("n", [1, 7, 8, 9, 33, 64])
def test_pack_unpack_roundtrip(bits, n):
    codes = np.random.default_rng(bits * 100 + n).integers(0, 2**bits, (3, n)).astype(np.uint8)
    packed = jax.jit(qarray.pack, static_argnums=1)(jnp.asarray(codes), bits)
    assert packed.shape == (3, qarray.packed_length(n, bits)) and packed.dtype == jnp.uint8
    back = qarray.unpack(packed, bits, n)
    np.testing.assert_array_equal(np.asarray(back), codes)


@pytest.mark.parametrize("bits", range(1, 8))
def test_pack_layout_is_lsb_first_bitstream(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, (1, 24)).astype(np.uint8)
    packed = np.asarray(qarray.pack(jnp.asarray(codes), bits))[0]
    stream = "".join(format(int(c), f"0{bits}b")[::-1] for c in codes[0])  # LSB first
    expected = [int(stream[i : i + 8][::-1], 2) for i in range(0, len(stream), 8)]
    assert packed.tolist() == expected


@pytest.mark.slow
def test_int4_nibble_order():
    spec = jq.QuantSpec("int4", calibration=jq.fixed(7.0))
    q = jq.quantize(jnp.array([[1.0, -1.0, 7.0, 0.0]]), spec)
    # element 0 -> low nibble of byte 0; -1 is 0xF in two's complement
    assert np.asarray(q.values).tolist() == [[0xF1, 0x07]]


@pytest.mark.parametrize(
    "fmt,bytes_per_value",
    [
        ("int8", 1),
        ("e4m3", 1),
        ("fp16", 2),
        ("bf16", 2),
        ("int4", 0.5),
        ("fp4", 0.5),
        ("nf4", 0.5),
        ("int2", 0.25),
        ("ternary", 0.25),
        ("binary", 0.125),
        ("fp6", 0.75),
        ("int3", 0.375),
    ],
)
def test_nbytes_is_true_packed_size(fmt, bytes_per_value):
    x = jax.random.normal(jax.random.key(0), (64, 256))
    q = jq.quantize(x, jq.QuantSpec(fmt))
    assert q.nbytes == int(x.size * bytes_per_value) + 4  # one fp32 scale
    assert q.values.nbytes + q.scale.nbytes == q.nbytes


@pytest.mark.slow
def test_nbytes_seed_savings_and_scale_overhead():
    # Seed §2: per parameter FP32 4 bytes, FP16 2 (-50%), INT8 1 (-75%), INT4 0.5 (-87.5%)
    x = jnp.ones((1024, 1024))
    fp32 = x.nbytes
    for fmt, saving in [("fp16", 0.5), ("int8", 0.75), ("int4", 0.875)]:
        q = jq.quantize(x, jq.QuantSpec(fmt, calibration=None if fmt == "fp16" else jq.absmax()))
        assert 1 - q.nbytes / fp32 == pytest.approx(saving, abs=1e-5)
    g = jq.quantize(x, jq.QuantSpec("int4", jq.per_block(-1, 32)))
    assert g.nbytes == 1024 * 1024 // 2 + 1024 * 32 * 4  # fp32 scale per 32 values
    mx = jq.quantize(x, jq.QuantSpec("mxfp4"))
    assert mx.nbytes == 1024 * 1024 // 2 + 1024 * 32  # one e8m0 byte per 32 values
    assert mx.bits_per_value == 4.25
    assert mx.scale.dtype == jnp.float8_e8m0fnu


@pytest.mark.slow
def test_qarray_is_a_pytree_through_jit():
    spec = jq.QuantSpec("int4", jq.per_block(-1, 16))
    x = jax.random.normal(jax.random.key(1), (4, 32))
    q = jq.quantize(x, spec)
    leaves = jax.tree_util.tree_leaves(q)
    assert len(leaves) == 2  # values, scale (no zero point)
    q2 = jax.jit(lambda q: q)(q)
    assert q2.spec == spec and q2.shape == q.shape and q2.dtype == q.dtype
    np.testing.assert_array_equal(np.asarray(jq.dequantize(q2)), np.asarray(jq.dequantize(q)))
    mapped = jax.tree_util.tree_map(lambda a: a, q)
    assert isinstance(mapped, jq.QArray)
    qa = jq.quantize(x, jq.QuantSpec("uint8", calibration=jq.minmax(), symmetric=False))
    assert len(jax.tree_util.tree_leaves(qa)) == 3
    assert qa.zero_point.dtype == jnp.uint8


def test_dequantize_inside_jit_and_dtype():
    x = jax.random.normal(jax.random.key(2), (8, 64)).astype(jnp.bfloat16)
    q = jq.quantize(x, jq.QuantSpec("nf4", jq.per_block(-1, 64)))
    d = jax.jit(jq.dequantize)(q)
    assert d.dtype == jnp.bfloat16 and d.shape == x.shape
    assert jq.dequantize(q, jnp.float32).dtype == jnp.float32
    assert "nbytes" in repr(q)


def test_dequantize_rejects_non_qarray():
    with pytest.raises(TypeError, match="QArray"):
        jq.dequantize(jnp.ones(3))


# ------------------------------------------------------------------- static field checks


def test_static_fields_are_checked_at_construction():
    q = jq.quantize(jnp.linspace(-1.0, 1.0, 8), jq.QuantSpec("int8"))

    def build(**kw):
        fields = dict(q.__dict__)
        fields.update(kw)
        return jq.QArray(**fields)

    with pytest.raises(TypeError, match=r"QArray: spec must be the jq.QuantSpec.*'int8' \(str\)"):
        build(spec="int8")
    with pytest.raises(TypeError, match=r"QArray: shape must be a tuple of ints.*'8' \(str\)"):
        build(shape="8")
    with pytest.raises(ValueError, match=r"QArray: shape\[0\] must be an int >= 0, got -1"):
        build(shape=(-1,))
    with pytest.raises(TypeError, match=r"QArray: shape\[0\] must be an int, got 8.0"):
        build(shape=(8.0,))
    with pytest.raises(TypeError, match=r"QArray: dtype must be the floating-point dtype"):
        build(dtype=jnp.int8)
    with pytest.raises(TypeError, match=r"QArray: dtype must be the floating-point dtype"):
        build(dtype="bogus")
    # Numpy / JAX spellings of valid fields are normalized, so treedefs compare equal.
    same = build(shape=[np.int64(8)], dtype=jnp.float32)
    assert same.shape == (8,) and type(same.shape[0]) is int
    assert same.dtype == np.dtype(np.float32) and isinstance(same.dtype, np.dtype)
    assert jax.tree_util.tree_structure(same) == jax.tree_util.tree_structure(q)


@pytest.mark.slow
def test_static_field_checks_leave_data_fields_to_pytree_transforms():
    """Unflattening puts placeholders (object(), None, tracers) in the data fields."""
    q = jq.quantize(jnp.linspace(-1.0, 1.0, 16).reshape(2, 8), jq.QuantSpec("int4"))
    leaves, treedef = jax.tree_util.tree_flatten(q)
    placeholder = treedef.unflatten([object()] * len(leaves))
    assert placeholder.spec == q.spec and placeholder.shape == q.shape
    assert jax.tree.map(lambda _: None, q).spec == q.spec
    np.testing.assert_array_equal(jax.jit(jq.dequantize)(q), jq.dequantize(q))
    rows = jax.vmap(lambda r: jq.quantize(r, jq.QuantSpec("int4")))(jnp.ones((3, 8)))
    assert rows.shape == (8,) and rows.values.shape == (3, 4)
