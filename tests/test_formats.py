"""The format registry: every property and every code against ml_dtypes."""

import math

import ml_dtypes
import numpy as np
import pytest

import jaxquant as jq
from jaxquant._src import formats as F

ML_FLOATS = [f for f in F.all_formats() if f.kind == "float" and f.dtype is not None]
SMALL_FLOATS = [f for f in ML_FLOATS if f.bits <= 16]


def _ml_decode_all(fmt):
    """ml_dtypes' value of every code of fmt (<= 16 bits) as float64."""
    if fmt.bits > 8:
        codes = np.arange(2**fmt.bits, dtype=np.uint16)
    else:
        codes = np.arange(2**fmt.bits, dtype=np.uint8)
    with np.errstate(invalid="ignore"):
        return codes.view(fmt.dtype).astype(np.float64)


@pytest.mark.parametrize("fmt", SMALL_FLOATS, ids=lambda f: f.name)
def test_every_code_decodes_like_ml_dtypes(fmt):
    ours = F.code_table(fmt)
    ref = _ml_decode_all(fmt)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    fin = ~np.isnan(ref)
    np.testing.assert_array_equal(ours[fin], ref[fin])
    np.testing.assert_array_equal(np.signbit(ours[fin]), np.signbit(ref[fin]))


@pytest.mark.parametrize("fmt", ML_FLOATS, ids=lambda f: f.name)
def test_float_properties_match_finfo(fmt):
    fi = ml_dtypes.finfo(fmt.dtype)
    assert fmt.max == float(fi.max)
    assert fmt.min_normal == float(fi.smallest_normal)
    assert fmt.min_subnormal == float(fi.smallest_subnormal)
    assert fmt.eps == float(fi.eps)
    assert fmt.man_bits == int(fi.nmant)
    has_inf = bool(np.isinf(np.array(np.inf, np.float32).astype(fmt.dtype)))
    assert fmt.has_inf == has_inf


@pytest.mark.parametrize("fmt", SMALL_FLOATS, ids=lambda f: f.name)
def test_max_is_largest_finite_code(fmt):
    t = F.code_table(fmt)
    assert fmt.max == np.nanmax(t[np.isfinite(t)])
    assert fmt.num_finite == len(F.finite_values(fmt))


@pytest.mark.parametrize("bits", [*range(1, 9), 16])
@pytest.mark.parametrize("signed", [True, False])
def test_int_ranges(bits, signed):
    if bits == 16 and not signed:
        pytest.skip("uint16 is not registered")
    f = jq.formats.get(f"{'' if signed else 'u'}int{bits}")
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    assert (f.min, f.max) == (lo, hi)
    table = F.code_table(f)
    assert sorted(table) == list(range(lo, hi + 1))


def test_seed_integer_ranges():
    # Seed §1.2: INT4 -8..7 / 0..15, INT8 -128..127 / 0..255; 11111111 = -1 or 255.
    assert (jq.formats.get("int4").min, jq.formats.get("int4").max) == (-8, 7)
    assert jq.formats.get("uint4").max == 15
    assert (jq.formats.get("int8").min, jq.formats.get("uint8").max) == (-128, 255)
    assert F.decode_code(jq.formats.get("int8"), 0b11111111) == -1
    assert F.decode_code(jq.formats.get("uint8"), 0b11111111) == 255


def test_seed_float_layouts():
    # Seed §1.2/4.1: FP32 1+8+23, FP16 1+5+10, BF16 1+8+7 (FP32's range), FP8 E4M3/E5M2.
    layouts = {"fp32": (8, 23), "fp16": (5, 10), "bf16": (8, 7), "e4m3": (4, 3), "e5m2": (5, 2)}
    for name, (e, m) in layouts.items():
        f = jq.formats.get(name)
        assert (f.exp_bits, f.man_bits, f.bits) == (e, m, 1 + e + m)
    assert jq.formats.get("fp16").max == 65504
    assert jq.formats.get("bf16").max == pytest.approx(jq.formats.get("fp32").max, rel=1e-2)
    assert round(jq.formats.get("fp32").decimal_digits) == 7
    assert round(jq.formats.get("fp16").decimal_digits) == 3


@pytest.mark.parametrize(
    "alias,name",
    [
        ("fp8", "float8_e4m3fn"),
        ("E4M3", "float8_e4m3fn"),
        ("bf16", "bfloat16"),
        ("half", "float16"),
        ("fp4", "float4_e2m1fn"),
        ("nf4", "nf4"),
        ("int4", "int4"),
        ("mxfp8", "mxfp8"),
        ("e8m0", "float8_e8m0fnu"),
    ],
)
def test_aliases(alias, name):
    assert jq.formats.get(alias).name == name


def test_emulated_format_attaches_ml_dtype_when_same_layout():
    assert jq.formats.float_format(4, 3, nan_style="fn").dtype == np.dtype(ml_dtypes.float8_e4m3fn)
    assert jq.formats.float_format(5, 2).dtype == np.dtype(ml_dtypes.float8_e5m2)
    assert jq.formats.float_format(3, 3).dtype is None


@pytest.mark.parametrize("e,m", [(2, 2), (3, 3), (5, 3), (4, 4), (6, 1)])
def test_emulated_format_properties_consistent(e, m):
    f = jq.formats.float_format(e, m)
    vals = F.finite_values(f)
    assert f.max == vals.max()
    assert f.min_subnormal == vals[vals > 0].min()
    assert f.min_normal == 2.0 ** (1 - (2 ** (e - 1) - 1))
    assert f.eps == 2.0**-m
    assert math.isclose(f.dynamic_range_db, 20 * math.log10(f.max / f.min_subnormal))
    assert jq.formats.get(f"e{e}m{m}") == f


def test_nf4_values():
    v = np.array(jq.formats.NF4_VALUES)
    assert len(v) == 16 and v[0] == -1 and v[-1] == 1 and 0.0 in v
    assert np.all(np.diff(v) > 0)


def test_mx_formats():
    f = jq.formats.get("mxfp4")
    assert f.kind == "mx" and f.element.name == "float4_e2m1fn" and f.block_size == 32
    assert f.bits_per_value == 4.25
    assert jq.formats.get("mxfp8").max == 448


def test_properties_dict_complete():
    for f in F.all_formats():
        p = f.properties()
        for k in (
            "bits",
            "max",
            "min_normal",
            "min_subnormal",
            "eps",
            "decimal_digits",
            "inf",
            "nan",
            "codes",
            "dynamic_range_db",
        ):
            assert k in p, (f.name, k)


def test_bad_names_and_layouts():
    with pytest.raises(ValueError, match="Unknown format 'fp7'"):
        jq.formats.get("fp7")
    with pytest.raises(TypeError):
        jq.formats.get(8)
    with pytest.raises(ValueError, match="exp_bits"):
        jq.formats.float_format(9, 2)
    with pytest.raises(ValueError, match="man_bits"):
        jq.formats.float_format(4, 24)
    with pytest.raises(ValueError, match="float32"):
        jq.formats.float_format(8, 7, bias=200)
    with pytest.raises(ValueError, match="bits must be"):
        jq.formats.int_format(12)
    with pytest.raises(ValueError, match="strictly increasing"):
        jq.formats.codebook_format("bad", (1.0, 0.0), 1)
