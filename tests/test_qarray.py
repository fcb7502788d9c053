"""QArray: bit packing layout, true byte sizes, pytree behaviour."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant._src import qarray

BITS = range(1, 8)


def _lsb_first(codes: np.ndarray, bits: int) -> list[int]:
    """numpy oracle: the codes as one LSB-first bit stream, cut into bytes (zero-padded)."""
    stream = "".join(format(int(c), f"0{bits}b")[::-1] for c in codes)  # LSB first
    stream += "0" * (-len(stream) % 8)
    return [int(stream[i : i + 8][::-1], 2) for i in range(0, len(stream), 8)]


@functools.cache
def _pack_unpack_all(n: int):
    """One jitted program per length: every width packed and unpacked (not 7 programs)."""

    def run(codes):
        packed = tuple(qarray.pack(c, b) for b, c in zip(BITS, codes, strict=True))
        back = tuple(qarray.unpack(p, b, n) for b, p in zip(BITS, packed, strict=True))
        return packed, back

    return jax.jit(run)


EAGER_UNPACK = {9: 5, 33: 2}  # length -> the width also unpacked eagerly


@pytest.mark.parametrize("n", [1, 7, 8, 9, 33, 64])
def test_pack_unpack_roundtrip(n):
    codes = [
        np.random.default_rng(bits * 100 + n).integers(0, 2**bits, (3, n)).astype(np.uint8)
        for bits in BITS
    ]
    packed, back = _pack_unpack_all(n)(tuple(jnp.asarray(c) for c in codes))
    for bits, c, p, b in zip(BITS, codes, packed, back, strict=True):
        assert p.shape == (3, qarray.packed_length(n, bits)) and p.dtype == jnp.uint8
        assert np.asarray(p).tolist() == [_lsb_first(row, bits) for row in c]
        np.testing.assert_array_equal(np.asarray(b), c)
    # Eagerly too, on two lengths (a whole-lanes width and a bit-stream one): the eager
    # unpack compiles each of its operations per width and length. (QArray.codes() and
    # every eager dequantize of a sub-byte format unpack eagerly in other tests.)
    if n in EAGER_UNPACK:
        bits = EAGER_UNPACK[n]
        eager = qarray.unpack(packed[bits - 1], bits, n)
        np.testing.assert_array_equal(np.asarray(eager), codes[bits - 1])


@pytest.mark.parametrize("bits", BITS)
def test_pack_layout_is_lsb_first_bitstream(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, (1, 24)).astype(np.uint8)
    packed = np.asarray(qarray.pack(jnp.asarray(codes), bits))[0]  # eager
    assert packed.tolist() == _lsb_first(codes[0], bits)


@pytest.mark.slow
def test_int4_nibble_order():
    spec = jq.QuantSpec("int4", calibration=jq.fixed(7.0))
    q = jq.quantize(jnp.array([[1.0, -1.0, 7.0, 0.0]]), spec)
    # element 0 -> low nibble of byte 0; -1 is 0xF in two's complement
    assert np.asarray(q.values).tolist() == [[0xF1, 0x07]]


BYTES_PER_VALUE = {
    "int8": 1,
    "e4m3": 1,
    "fp16": 2,
    "bf16": 2,
    "int4": 0.5,
    "fp4": 0.5,
    "nf4": 0.5,
    "int2": 0.25,
    "ternary": 0.25,
    "binary": 0.125,
    "fp6": 0.75,
    "int3": 0.375,
}


@functools.cache
def _quantized_in_every_format():
    """x quantized to every format above by one jitted program (one compile, not twelve;
    the formats share x's absmax)."""
    x = jax.random.normal(jax.random.key(0), (64, 256))
    specs = [jq.QuantSpec(fmt) for fmt in BYTES_PER_VALUE]
    qs = jax.jit(lambda v: [jq.quantize(v, spec) for spec in specs])(x)
    return x, dict(zip(BYTES_PER_VALUE, qs, strict=True))


@pytest.mark.parametrize(("fmt", "bytes_per_value"), list(BYTES_PER_VALUE.items()))
def test_nbytes_is_true_packed_size(fmt, bytes_per_value):
    x, qs = _quantized_in_every_format()
    q = qs[fmt]
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
