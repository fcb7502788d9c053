"""Sharding: quantizers keep their input's sharding under jit and compute the same numbers
as on one device.

Eight fake CPU devices (tests/conftest.py), as a (2, 4) ("data", "model") mesh and an (8,)
mesh (sharding columns or rows). Every format x granularity pair is tested once; rounding
and layout rotate so that every format and every granularity meets both roundings and all
three layouts. (A pairwise design: the full product compiles ~5x as many programs on two
CPU cores and adds no new pair.) The reference is the same jitted function on one device.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxquant as jq

SHAPE = (16, 256)  # 256 = 8 devices x one 32-block, or 4 devices x two blocks


@functools.cache
def _layouts():
    devices = np.array(jax.devices())
    assert devices.size == 8, "tests/conftest.py should give 8 CPU devices"
    return {
        "mesh2x4": NamedSharding(
            Mesh(devices.reshape(2, 4), ("data", "model")), P("data", "model")
        ),
        "mesh8": NamedSharding(Mesh(devices, ("x",)), P(None, "x")),
        "mesh8_rows": NamedSharding(Mesh(devices, ("x",)), P("x", None)),
    }


GRANULARITIES = {
    "per_tensor": jq.per_tensor(),
    "per_channel(-1)": jq.per_channel(-1),
    "per_channel(0)": jq.per_channel(0),
    "per_block(-1,32)": jq.per_block(-1, 32),
    "per_token": jq.per_token(),
}
FORMATS = ["int8", "e4m3", "int4", "nf4"]
LAYOUTS = ["mesh2x4", "mesh8", "mesh8_rows"]


def _cases():
    """(format, granularity, rounding, layout): every format x granularity pair once, the
    rounding alternating so each format and each granularity gets both, layouts rotating."""
    cases = []
    for fi, fmt in enumerate(FORMATS):
        for gi, gran in enumerate(GRANULARITIES):
            rounding = "stochastic" if (fi + gi) % 2 else "nearest"
            cases.append((fmt, gran, rounding, LAYOUTS[(fi + gi) % len(LAYOUTS)]))
    cases += [
        ("mxfp8", "per_block(-1,32)", "nearest", "mesh2x4"),
        ("mxfp8", "per_block(-1,32)", "stochastic", "mesh8"),
    ]
    return cases


def _spec(fmt, gran, rounding, rng="hash"):
    return jq.QuantSpec(fmt, GRANULARITIES[gran], rounding=rounding, rng=rng)


@functools.cache
def _x():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPE) * np.exp(rng.uniform(-2, 2, SHAPE[1]))
    return x.astype(np.float32)


@functools.cache
def _jit_fake_quant(spec):
    return jax.jit(lambda x, key: jq.fake_quant(x, spec, key=key if spec.stochastic else None))


def _reference_specs():
    specs = [_spec(f, g, r) for f, g, r, _ in _cases()]
    specs += [_spec(f, g, "nearest") for f, g, _ in QUANTIZE_CASES]
    return [*specs, _spec("int8", "per_block(-1,32)", "stochastic", rng="threefry")]


@functools.cache
def _unsharded():
    """The references: every quantizer of this module on one device, compiled together as
    one program (one compile instead of ~30; a quantizer's numbers must not depend on
    what else is in the program, see test_many_quantizers_in_one_jit_same_values)."""
    specs = _reference_specs()
    run = jax.jit(
        lambda x, key: [jq.fake_quant(x, s, key=key if s.stochastic else None) for s in specs]
    )
    out = run(jnp.asarray(_x()), jax.random.key(42))
    return {s: np.asarray(o) for s, o in zip(specs, out, strict=True)}


def _unsharded_fake_quant(spec):
    return _unsharded()[spec]


def _assert_same_sharding(out, sharding):
    assert out.sharding.is_equivalent_to(sharding, out.ndim), (out.sharding, sharding)


@pytest.mark.parametrize(("fmt", "gran", "rounding", "layout"), _cases())
def test_fake_quant_keeps_sharding_and_values(fmt, gran, rounding, layout):
    spec = _spec(fmt, gran, rounding)
    sharding = _layouts()[layout]
    x = jax.device_put(_x(), sharding)
    out = _jit_fake_quant(spec)(x, jax.random.key(42))
    _assert_same_sharding(out, sharding)
    assert out.dtype == jnp.float32 and out.shape == SHAPE
    np.testing.assert_array_equal(np.asarray(out), _unsharded_fake_quant(spec))


@pytest.mark.slow
def test_stochastic_threefry_keeps_sharding_and_values():
    """jax.random.bits noise (partitionable threefry) is the same sharded and unsharded."""
    spec = _spec("int8", "per_block(-1,32)", "stochastic", rng="threefry")
    sharding = _layouts()["mesh2x4"]
    out = _jit_fake_quant(spec)(jax.device_put(_x(), sharding), jax.random.key(42))
    _assert_same_sharding(out, sharding)
    np.testing.assert_array_equal(np.asarray(out), _unsharded_fake_quant(spec))
    # and the noise is really used: a different key changes some roundings
    other = _jit_fake_quant(spec)(jax.device_put(_x(), sharding), jax.random.key(7))
    assert np.any(np.asarray(other) != np.asarray(out))


@pytest.mark.slow
def test_fake_quant_without_jit_on_sharded_input():
    """Eager fake_quant of a sharded array: the same numbers, still sharded."""
    spec = _spec("int8", "per_channel(-1)", "nearest")
    sharding = _layouts()["mesh2x4"]
    out = jq.fake_quant(jax.device_put(_x(), sharding), spec)
    _assert_same_sharding(out, sharding)
    np.testing.assert_array_equal(np.asarray(out), _unsharded_fake_quant(spec))


# ----------------------------------------------------------------------- quantize

QUANTIZE_CASES = [
    ("int8", "per_tensor", "mesh2x4"),
    ("int8", "per_channel(-1)", "mesh8"),
    ("int8", "per_block(-1,32)", "mesh2x4"),
    ("e4m3", "per_channel(0)", "mesh2x4"),
    ("e4m3", "per_token", "mesh8_rows"),
    ("e4m3", "per_block(-1,32)", "mesh8"),
    ("int4", "per_channel(-1)", "mesh8_rows"),  # packed along the last axis only
]


@functools.cache
def _jit_quantize(spec):
    return jax.jit(lambda x: jq.quantize(x, spec))


_jit_dequantize = jax.jit(jq.dequantize)


@pytest.mark.slow
@pytest.mark.parametrize(("fmt", "gran", "layout"), QUANTIZE_CASES)
def test_quantize_keeps_sharding_of_values_and_dequantize(fmt, gran, layout):
    """>= 8-bit formats store values in the input's shape, so they keep its sharding (packed
    sub-byte formats keep it along the leading axes); so does dequantize (a separate jit
    taking the sharded QArray)."""
    spec = _spec(fmt, gran, "nearest")
    sharding = _layouts()[layout]
    q = _jit_quantize(spec)(jax.device_put(_x(), sharding))
    assert q.values.dtype == spec.format.storage_dtype
    _assert_same_sharding(q.values, sharding)
    x_hat = _jit_dequantize(q)
    _assert_same_sharding(x_hat, sharding)
    ref = _jit_quantize(spec)(jnp.asarray(_x()))
    np.testing.assert_array_equal(np.asarray(q.values), np.asarray(ref.values))
    np.testing.assert_array_equal(np.asarray(q.scale), np.asarray(ref.scale))
    np.testing.assert_array_equal(np.asarray(x_hat), _unsharded_fake_quant(spec))


# ------------------------------------------------------------ many quantizers, one jit


MANY_SPECS = [_spec("int8", g, r) for g in GRANULARITIES for r in ("nearest", "stochastic")]


@functools.cache
def _many_in_one_jit():
    """A model-like step: ten quantizers in one jitted function, sharded and on one device."""
    step = jax.jit(lambda x, key: [jq.fake_quant(x, s, key=key) for s in MANY_SPECS])
    out = step(jax.device_put(_x(), _layouts()["mesh2x4"]), jax.random.key(3))
    ref = step(jnp.asarray(_x()), jax.random.key(3))
    return out, [np.asarray(r) for r in ref]


@pytest.mark.slow
def test_many_quantizers_in_one_jit_keep_sharding():
    out, _ = _many_in_one_jit()
    for o in out:
        _assert_same_sharding(o, _layouts()["mesh2x4"])


@pytest.mark.slow
def test_many_quantizers_in_one_jit_same_values():
    """Fusion differs between the sharded and the one-device program; the numbers must not
    (a division by a broadcast scale compiled as a reciprocal multiply in one and not the
    other gave 1-ulp different scales)."""
    out, ref = _many_in_one_jit()
    for spec, o, r in zip(MANY_SPECS, out, ref, strict=True):
        np.testing.assert_array_equal(np.asarray(o), r, err_msg=str(spec))
