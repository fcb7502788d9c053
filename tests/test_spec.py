"""QuantSpec (jaxquant/_src/spec.py): defaults, derived properties, validation that names the
field and the fix, replace(), str(), and hashing (a spec is a static jit argument)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq


def test_defaults():
    s = jq.QuantSpec("int8")
    assert s.granularity == jq.per_tensor() and s.calibration == jq.absmax()
    assert s.symmetric and s.narrow_range and s.saturate and not s.stochastic
    assert (s.rounding, s.rng, s.scale_format.name) == ("nearest", "hash", "float32")
    # an MX format brings its block and its e8m0 scale
    mx = jq.QuantSpec("mxfp4")
    assert mx.granularity == jq.per_block(-1, 32)
    assert mx.scale_format.name == "float8_e8m0fnu" and mx.element.name != mx.format.name


@pytest.mark.parametrize(
    ("spec", "qrange"),
    [
        (jq.QuantSpec("int8"), (-127.0, 127.0)),  # restricted: negation is exact
        (jq.QuantSpec("int8", narrow_range=False), (-128.0, 127.0)),
        (jq.QuantSpec("int3", int_grid="full"), (-4.0, 3.0)),  # all 2^b codes
        (jq.QuantSpec("int2", int_grid="full", narrow_range=True), (-2.0, 1.0)),  # n/a: False
        (jq.QuantSpec("int8", calibration=jq.minmax(), symmetric=False), (-128.0, 127.0)),
        (jq.QuantSpec("uint4", calibration=jq.minmax(), symmetric=False), (0.0, 15.0)),
        (jq.QuantSpec("e4m3"), (-448.0, 448.0)),
        (jq.QuantSpec("mxfp4"), (-6.0, 6.0)),  # the element format's (e2m1) range
        (jq.QuantSpec("nf4"), (-1.0, 1.0)),
    ],
    ids=str,
)
def test_qrange(spec, qrange):
    assert spec.qrange == qrange


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"format": "e8m0"}, ValueError, "it is a scale format"),
        ({"format": "int8", "scale_format": "int8"}, ValueError, "not a scale format"),
        ({"format": "mxfp4", "granularity": jq.per_channel(-1)}, ValueError, "per_block"),
        ({"format": "mxfp4", "calibration": None}, ValueError, "needs a calibration"),
        ({"format": "int8", "calibration": jq.twn()}, ValueError, "needs the 'ternary' format"),
        ({"format": "e4m3", "symmetric": False}, ValueError, "needs an integer format"),
        ({"format": "uint8", "calibration": None, "symmetric": False}, ValueError, "minmax"),
        ({"format": "int8", "rounding": "up"}, ValueError, "'nearest' or 'stochastic'"),
        ({"format": "int8", "rng": "philox"}, ValueError, "'hash' or 'threefry'"),
        ({"format": "int8", "saturate": False}, ValueError, "integer formats always saturate"),
        ({"format": "int1"}, ValueError, "use 'binary'"),
        ({"format": "int8", "int_grid": "wide"}, ValueError, "'auto', 'restricted' or 'full'"),
        ({"format": "e4m3", "int_grid": "full"}, ValueError, "signed integer format"),
        ({"format": "uint4", "int_grid": "full"}, ValueError, "unsigned int"),
        ({"format": "mxfp4", "int_grid": "full"}, ValueError, "signed integer format"),
        ({"format": "nf4", "int_grid": "full"}, ValueError, "signed integer format"),
        (
            {"format": "int4", "int_grid": "full", "symmetric": False, "calibration": jq.minmax()},
            ValueError,
            "already use all 2\\^b codes",
        ),
        ({"format": "int1", "int_grid": "full"}, ValueError, "Use 'binary'"),
        ({"format": "int8", "granularity": "per_tensor"}, TypeError, "expected per_tensor"),
        ({"format": "int8", "calibration": "absmax"}, TypeError, "expected absmax"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_invalid_combinations_name_the_field_and_the_fix(kwargs, error, match):
    kwargs = dict(kwargs)
    with pytest.raises(error, match=match):
        jq.QuantSpec(kwargs.pop("format"), **kwargs)


def test_replace_validates_again_and_str_lists_what_differs():
    s = jq.QuantSpec("int8", jq.per_channel(-1))
    assert s.replace(format="int4") == jq.QuantSpec("int4", jq.per_channel(-1))
    assert s.replace(rounding="stochastic").stochastic and not s.stochastic  # s is unchanged
    with pytest.raises(ValueError, match="needs an integer format"):
        s.replace(format="e4m3", symmetric=False)
    assert str(s) == "QuantSpec(int8, per_channel(-1,), absmax)"
    odd = jq.QuantSpec("uint8", calibration=jq.minmax(), symmetric=False, scale_format="bf16")
    assert "asymmetric" in str(odd) and "scale=bfloat16" in str(odd)
    assert "no-scale" in str(jq.QuantSpec("e4m3", calibration=None))


@pytest.mark.slow  # compiles fake_quant under jit
def test_spec_is_hashable_static_argument():
    spec = jq.QuantSpec("int4", jq.per_block(-1, 32), jq.percentile(99.0))
    assert hash(spec) == hash(jq.QuantSpec("int4", jq.per_block(-1, 32), jq.percentile(99.0)))
    f = jax.jit(jq.fake_quant, static_argnames="spec")
    x = jnp.ones((2, 64))
    np.testing.assert_array_equal(np.asarray(f(x, spec=spec)), np.asarray(jq.fake_quant(x, spec)))
    assert spec.replace(rounding="stochastic").stochastic


@pytest.mark.parametrize(
    ("kwargs", "grid"),
    [
        ({"format": "int2"}, "full"),  # papers/int_grids: full halves RTN's int2 loss increase
        ({"format": "int3"}, "full"),
        ({"format": "int4"}, "restricted"),  # no measurable gain at 4 bits
        ({"format": "int8"}, "restricted"),  # within noise; the int8 toolchains' grid
        ({"format": "int3", "granularity": jq.per_block(-1, 32), "calibration": jq.mse()}, "full"),
        ({"format": "int3", "rounding": "stochastic"}, "full"),
        ({"format": "int3", "narrow_range": False}, "restricted"),  # the restricted grid's option
        ({"format": "int3", "calibration": None}, "restricted"),  # a plain cast: no scale
        ({"format": "int3", "symmetric": False, "calibration": jq.minmax()}, "restricted"),
        ({"format": "uint3"}, "restricted"),
        ({"format": "nf4"}, "restricted"),
        ({"format": "mxfp4"}, "restricted"),
        ({"format": "int1", "narrow_range": False}, "restricted"),  # int1's full grid is {-1, 0}
    ],
    ids=str,
)
def test_int_grid_auto_default_follows_the_measured_table(kwargs, grid):
    kwargs = dict(kwargs)
    fmt = kwargs.pop("format")
    spec = jq.QuantSpec(fmt, **kwargs)
    assert spec.int_grid == grid
    assert spec == jq.QuantSpec(fmt, **kwargs, int_grid="auto")  # the default, spelled out
    if grid == "full":  # the stored field is the resolved grid: equal, same hash
        explicit = jq.QuantSpec(fmt, **kwargs, int_grid="full")
        assert spec == explicit and hash(spec) == hash(explicit)
        assert spec.qrange[0] == -(2.0 ** (spec.format.bits - 1)) and not spec.narrow_range


def test_replace_chooses_an_auto_grid_again():
    three = jq.QuantSpec("int3", jq.per_channel(-1))
    assert three.replace(format="int8") == jq.QuantSpec("int8", jq.per_channel(-1))
    assert three.replace(format="int8").qrange == (-127.0, 127.0)
    assert three.replace(format="int2").int_grid == "full"
    # asymmetric / float targets: no error about a full grid the user never asked for
    asym = three.replace(symmetric=False, calibration=jq.minmax())
    assert asym == jq.QuantSpec("int3", jq.per_channel(-1), jq.minmax(), symmetric=False)
    assert three.replace(format="e4m3").int_grid == "restricted"
    assert three.replace(narrow_range=False).int_grid == "restricted"
    assert jq.QuantSpec("int8").replace(format="int3").int_grid == "full"
    # an explicit grid is kept by replace, as every other field
    pinned = jq.QuantSpec("int3", int_grid="restricted")
    assert pinned.replace(format="int2").int_grid == "restricted"
    assert jq.QuantSpec("int4", int_grid="full").replace(format="int8").int_grid == "full"
    assert three.replace(int_grid="restricted").narrow_range  # leaving full: True again


def test_int_grid_default_scale_divisor_replace_and_str():
    # "auto": restricted from 4 bits on (old int4 / int8 specs are unchanged), full below.
    assert jq.QuantSpec("int8").int_grid == "restricted" == jq.QuantSpec("int4").int_grid
    assert jq.QuantSpec("int3").int_grid == "full"
    assert jq.QuantSpec("int8").scale_divisor == 127.0
    assert jq.QuantSpec("int8", narrow_range=False).scale_divisor == 127.0  # scale unchanged
    assert jq.QuantSpec("e4m3").scale_divisor == 448.0
    full = jq.QuantSpec("int4", jq.per_channel(-1), int_grid="full")
    assert full.scale_divisor == 7.5 and not full.narrow_range
    assert str(full) == "QuantSpec(int4, per_channel(-1,), absmax, full-grid)"
    # Leaving the full grid restores the restricted default, not the full grid's False.
    back = full.replace(int_grid="restricted")
    assert back == jq.QuantSpec("int4", jq.per_channel(-1)) and back.narrow_range
    assert full.replace(format="int3") == jq.QuantSpec("int3", jq.per_channel(-1), int_grid="full")
    per_tensor = full.replace(granularity=jq.per_tensor())
    assert jq.QuantSpec("int4").replace(int_grid="full") == per_tensor
    assert full != jq.QuantSpec("int4", jq.per_channel(-1), narrow_range=False)  # scales differ
