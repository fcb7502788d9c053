"""QuantSpec <-> JSON-able dict (jaxquant/_src/serialize.py): exact both ways for every
format, granularity and calibration; bad dicts and undecodable specs are refused by name.
Checkpoints store specs this way (test_checkpoint.py)."""

import dataclasses
import json

import pytest

import jaxquant as jq
from jaxquant._src import formats
from jaxquant._src.serialize import spec_from_dict, spec_to_dict

SPECS = [
    *(jq.QuantSpec(n) for n in formats.names() if n not in ("float8_e8m0fnu", "int1")),
    jq.QuantSpec("int1", narrow_range=False),
    jq.QuantSpec("int8", jq.per_channel(-1)),
    jq.QuantSpec("int8", jq.per_channel(0, 2), jq.percentile(99.5)),
    jq.QuantSpec("int4", jq.per_block(-1, 32), jq.mse(16, 0.5)),
    jq.QuantSpec("int8", jq.per_token(), jq.mean_std(2.5)),
    jq.QuantSpec("int8", jq.per_token(0), jq.kl(256, 32)),
    jq.QuantSpec("int8", calibration=jq.fixed(3.5)),
    jq.QuantSpec("uint8", calibration=jq.fixed((-1.0, 2.0)), symmetric=False),
    jq.QuantSpec("uint4", jq.per_block(0, 16), jq.minmax(), symmetric=False),
    jq.QuantSpec("int8", narrow_range=False, rounding="stochastic", rng="threefry"),
    jq.QuantSpec("binary", calibration=jq.mean_abs(0.8)),
    jq.QuantSpec("ternary", calibration=jq.twn(0.6)),
    jq.QuantSpec("fp8", calibration=None, saturate=False),
    jq.QuantSpec("e5m2", scale_format="bf16"),
    jq.QuantSpec("int8", scale_format="fp16"),
    jq.QuantSpec("int4", jq.per_block(-1, 32), scale_format="e8m0"),
    jq.QuantSpec("mxfp4", jq.per_block(0, 32)),
    jq.QuantSpec("e3m3"),  # emulated, parsed from its name
    jq.QuantSpec(formats.float_format(5, 4, bias=10, nan_style="fnuz", name="my_e5m4")),
    jq.QuantSpec(formats.float_format(4, 3, nan_style="fn", name="my_fp8")),  # ml_dtypes layout
    jq.QuantSpec(formats.codebook_format("my_cb", (-2.0, -0.5, 0.0, 0.5, 2.0), 3)),
    jq.QuantSpec(formats.mx_format("my_mx", formats.get("e3m2"), 16)),
    jq.QuantSpec(formats.int_format(16)),
    jq.QuantSpec("int3", jq.per_channel(-1), int_grid="full"),
    jq.QuantSpec("int2", jq.per_block(-1, 32), jq.mse(), int_grid="full", rounding="stochastic"),
]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_spec_dict_round_trip(spec):
    d = spec_to_dict(spec)
    assert set(d) == {f.name for f in dataclasses.fields(jq.QuantSpec)}
    back = spec_from_dict(json.loads(json.dumps(d, allow_nan=False)))
    assert back == spec and hash(back) == hash(spec)
    assert back.format.dtype == spec.format.dtype  # Format equality ignores dtype
    assert back.element.storage_dtype == spec.element.storage_dtype


def test_spec_dict_covers_every_format_name():
    named = {spec_to_dict(s)["format"]["name"] for s in SPECS}
    assert set(formats.names()) - named == {"float8_e8m0fnu"}  # a scale format only
    assert "float8_e8m0fnu" in {spec_to_dict(s)["scale_format"] for s in SPECS}


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda d: d.pop("rng"), r"missing field\(s\) \['rng'\]"),
        (lambda d: d.update(extra=1), r"unknown field\(s\) \['extra'\]"),
        (lambda d: d.update(symmetric="yes"), "'symmetric' must be a bool"),
        (lambda d: d.update(granularity={"type": "per_row"}), "granularity must be a dict"),
        (lambda d: d.update(calibration={"type": "mse", "bins": 3}), "mse"),
        (lambda d: d.update(format={"name": "x", "kind": "posit"}), "unknown kind 'posit'"),
        (lambda d: d["format"].update(bits=3), "describe 'int3'"),
        (lambda d: d.update(scale_format="int8"), "not a scale format"),
        (lambda d: d.update(int_grid=1), "'int_grid' must be a str"),
        (lambda d: d.update(int_grid="half"), "'restricted' or 'full'"),
    ],
)
def test_spec_from_dict_errors(change, match):
    d = spec_to_dict(jq.QuantSpec("int8", jq.per_channel(-1), jq.mse()))
    change(d)
    with pytest.raises(ValueError, match=match):
        spec_from_dict(d)


def test_spec_to_dict_refuses_what_would_not_decode_to_itself():
    odd = dataclasses.replace(formats.get("int8"), bits=7)  # not built by a constructor
    with pytest.raises(ValueError, match="does not survive a round trip"):
        spec_to_dict(jq.QuantSpec(odd))
    with pytest.raises(TypeError, match="expected a QuantSpec"):
        spec_to_dict("int8")


def test_layout_is_plain_json_with_the_documented_keys():
    """The module docstring's layout: a format's full description, factory-named
    granularity / calibration with their fields, tuples as lists, non-finite floats as
    strings."""
    d = spec_to_dict(jq.QuantSpec("int4", jq.per_block(-1, 32), jq.mse(16, 0.5)))
    assert d["format"] == {"name": "int4", "kind": "int", "bits": 4, "signed": True}
    assert d["granularity"] == {"type": "per_block", "axis": -1, "size": 32}
    assert d["calibration"] == {"type": "mse", "num": 16, "min_ratio": 0.5}
    assert d["scale_format"] == "float32"
    json.dumps(d, allow_nan=False)  # plain JSON: no NaN / Inf literals
    fixed = spec_to_dict(jq.QuantSpec("uint8", calibration=jq.fixed((-1.0, 2.0)), symmetric=False))
    assert fixed["calibration"]["type"] == "fixed"
    assert spec_to_dict(jq.QuantSpec("fp8", calibration=None))["calibration"] is None


def test_spec_dict_written_before_int_grid_reads_as_the_restricted_grid():
    # Checkpoints written before the field existed keep their meaning and their numerics.
    old = (jq.QuantSpec("int4", jq.per_channel(-1)), jq.QuantSpec("int8", narrow_range=False))
    for spec in old:
        d = spec_to_dict(spec)
        assert d.pop("int_grid") == "restricted"
        assert spec_from_dict(d) == spec
