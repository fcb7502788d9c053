"""jq.explain: bits, fields, derivations and stored values against numpy / ml_dtypes casts.

explain returns Python objects (it is not traceable), so nothing here runs under jit; the
rounding it calls is the library's, which explain itself compiles with jax.jit.
"""

import math

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxquant as jq
from jaxquant._src import explain as ex
from jaxquant._src.explain import Comparison, Explanation

# ml_dtypes types of the registered float formats (numpy's own for fp32 / fp16).
ML_FLOATS = {
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
    "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz,
    "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
    "float8_e4m3b11fnuz": ml_dtypes.float8_e4m3b11fnuz,
    "float8_e3m4": ml_dtypes.float8_e3m4,
    "float8_e4m3": ml_dtypes.float8_e4m3,
    "float6_e2m3fn": ml_dtypes.float6_e2m3fn,
    "float6_e3m2fn": ml_dtypes.float6_e3m2fn,
    "float4_e2m1fn": ml_dtypes.float4_e2m1fn,
}


def cast(v: float, dtype) -> float:
    """ml_dtypes' cast of float32(v) (jaxquant rounds float32 inputs)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.array(v, np.float32).astype(dtype).astype(np.float64))


def same(a: float, b: float) -> bool:
    """Equal, with NaN == NaN and the sign of zero compared too."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


# ---------------------------------------------------------------------- integers (§1.1-1.2)


def test_13_in_uint8_repeated_division_and_powers_of_two():
    e = jq.explain(13, "uint8")
    assert isinstance(e, Explanation)
    assert e.bits == "00001101"
    assert e.stored == 13 and e.exact and e.code == 13
    assert e.division == ((13, 6, 1), (6, 3, 0), (3, 1, 1), (1, 0, 1))
    assert e.powers_sum == "1×2^3 + 1×2^2 + 0×2^1 + 1×2^0 = 8 + 4 + 0 + 1 = 13"
    text = str(e)
    assert "13 ÷ 2 = 6" in text and "1 ÷ 2 = 0" in text
    assert "1101" in text and "00001101" in text


@pytest.mark.parametrize("n", [0, 1, 2, 5, 13, 100, 127, 200, 255])
def test_division_digits_read_back(n):
    e = jq.explain(n, "uint8")
    assert int(e.bits, 2) == n
    digits = "".join(str(r) for *_, r in reversed(e.division))
    assert digits == (bin(n)[2:] if n else "")
    assert e.powers_sum.endswith(f"= {n}")


@pytest.mark.parametrize(
    ("pattern", "fmt", "value"),
    [
        ("0b11111111", "int8", -1),
        ("0b11111111", "uint8", 255),
        ("0b10000000", "int8", -128),
        ("0b01111111", "int8", 127),
        ("0b1000", "int4", -8),
        ("0b1111", "uint4", 15),
        ("0xff", "int8", -1),
    ],
)
def test_bit_pattern_reads(pattern, fmt, value):
    e = jq.explain(pattern, fmt)
    assert e.stored == value
    assert e.input_code is not None
    assert e.powers_sum.endswith(f"= {value}")
    assert jq.explain(code=int(pattern, 0), fmt=fmt).stored == value


def test_11111111_signed_and_unsigned():
    signed = jq.explain("0b11111111", "int8")
    assert signed.stored == -1
    assert signed.powers_sum.startswith("1×(-2^7) + 1×2^6")
    assert "-128 + 64 + 32 + 16 + 8 + 4 + 2 + 1 = -1" in signed.powers_sum
    assert "read as uint8 are 255" in str(signed)
    unsigned = jq.explain(code="11111111", fmt="uint8")
    assert unsigned.stored == 255
    assert "read as int8 are -1" in str(unsigned)
    cmp = jq.explain(code=0b11111111, fmt=["int8", "uint8"])
    assert [c.stored for c in cmp] == [-1, 255]


@pytest.mark.parametrize(
    ("value", "fmt", "bits"),
    [(-1, "int8", "11111111"), (255, "uint8", "11111111"), (-128, "int8", "10000000"),
     (-8, "int4", "1000"), (7, "int4", "0111"), (-3, "int4", "1101")],
)  # fmt: skip
def test_twos_complement(value, fmt, bits):
    e = jq.explain(value, fmt)
    assert e.bits == bits
    assert e.stored == value
    if value < 0:
        mag, inv, result = e.twos_complement
        assert int(mag, 2) == -value
        assert inv == "".join("1" if c == "0" else "0" for c in mag)
        assert result == bits
        assert "invert every bit" in str(e)
    # the bits agree with numpy's own two's complement
    width = len(bits)
    assert e.bits == format(value % 2**width, f"0{width}b")


@pytest.mark.parametrize(
    ("fmt", "lo", "hi"), [("int4", -8, 7), ("uint4", 0, 15), ("int8", -128, 127), ("uint8", 0, 255)]
)
def test_int_ranges_saturate(fmt, lo, hi):
    assert jq.explain(lo, fmt).stored == lo and not jq.explain(lo, fmt).saturated
    assert jq.explain(hi, fmt).stored == hi and not jq.explain(hi, fmt).saturated
    above, below = jq.explain(hi + 1, fmt), jq.explain(lo - 1, fmt)
    assert above.stored == hi and above.saturated
    assert below.stored == lo and below.saturated
    assert "saturated" in str(above)


def test_int_saturation_mentions_wrapping():
    e = jq.explain(300, "int8")
    assert e.stored == 127 and e.saturated
    assert "44" in str(e)  # what a wrapping cast (300 mod 256) would give
    assert jq.explain(float("inf"), "int8").stored == 127
    assert jq.explain(float("-inf"), "uint8").stored == 0


@pytest.mark.parametrize(
    ("value", "stored"), [(2.5, 2), (3.5, 4), (-2.5, -2), (0.5, 0), (13.4, 13), (-0.6, -1)]
)
def test_int_round_half_to_even(value, stored):
    e = jq.explain(value, "int8")
    assert e.stored == stored
    assert e.abs_error == pytest.approx(abs(value - stored))
    if abs(value - math.floor(value) - 0.5) == 0:
        assert "ties go to the even integer" in str(e)


def test_int_nan_is_stored_as_zero():
    e = jq.explain(float("nan"), "int8")
    assert e.stored == 0 and e.bits == "00000000"
    assert "no NaN" in str(e)


# ------------------------------------------------------------------------ floats (§1.2, 4.1)


@pytest.mark.parametrize(
    ("fmt", "dtype", "stored", "fields"),
    [
        ("fp32", np.float32, 0.30000001192092896, (0, 125, 1677722)),
        ("fp16", np.float16, 0.300048828125, (0, 13, 205)),
        ("bf16", ml_dtypes.bfloat16, 0.30078125, (0, 125, 26)),
        ("e4m3", ml_dtypes.float8_e4m3fn, 0.3125, (0, 5, 2)),
    ],
)
def test_0_3_in_floats(fmt, dtype, stored, fields):
    e = jq.explain(0.3, fmt)
    assert e.stored == stored
    assert e.stored == float(np.array(0.3).astype(dtype))  # the direct cast from float64
    assert e.stored == cast(0.3, dtype)
    assert (e.sign, e.exponent, e.mantissa) == fields
    assert e.category == "normal" and e.is_normal
    assert e.abs_error == pytest.approx(abs(stored - 0.3), rel=1e-12)
    assert e.rel_error == pytest.approx(abs(stored - 0.3) / 0.3, rel=1e-12)
    # the bits are the dtype's own bit pattern
    raw = np.array(0.3, np.float32).astype(dtype)
    itemsize = np.dtype(dtype).itemsize
    view = int(raw.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[itemsize]))
    assert int(e.bits, 2) == view == e.code
    assert e.sign_bits + e.exponent_bits + e.mantissa_bits == e.bits


def test_fp32_formula_text():
    e = jq.explain(0.3, "fp32")
    assert e.formula == "(-1)^0 × 2^(125-127) × (1 + 1677722/2^23) = 0.300000011920929"
    assert "0 01111101 00110011001100110011010" in str(e)
    assert "not representable" in str(e)


def test_0_3_comparison_side_by_side():
    cmp = jq.explain(0.3, ["fp32", "fp16", "bf16", "e4m3"])
    assert isinstance(cmp, Comparison) and len(cmp) == 4
    assert [c.format.name for c in cmp] == ["float32", "float16", "bfloat16", "float8_e4m3fn"]
    text = str(cmp)
    for piece in (
        "float32",
        "float16",
        "bfloat16",
        "float8_e4m3fn",
        "0.300048828125",
        "0.30078125",
    ):
        assert piece in text
    # one table row holds all four stored values
    row = next(line for line in text.splitlines() if line.strip().startswith("stored"))
    assert all(v in row for v in ("0.300000011920929", "0.300048828125", "0.30078125", "0.3125"))
    assert cmp[1].stored == float(np.float16(0.3))


def test_e4m3_max_and_overflow():
    e = jq.explain(448, "e4m3")
    assert e.stored == 448 and e.exact and e.bits == "01111110"
    assert not e.overflow and not e.saturated
    # just above max, below the midpoint 464 to the (NaN) next step: rounds down
    assert jq.explain(460, "e4m3").stored == 448
    tie = jq.explain(464, "e4m3")
    assert tie.stored == 448 and "even" in str(tie)
    over = jq.explain(500, "e4m3")
    assert math.isnan(over.stored) and over.is_nan and over.overflow
    assert over.bits == "01111111"
    assert "overflow -> NaN" in str(over)
    for v in (448, 460, 464, 470, 500, -500):
        assert same(jq.explain(v, "e4m3").stored, cast(v, ml_dtypes.float8_e4m3fn))


def test_e5m2_and_fp16_overflow_to_inf():
    assert jq.explain(60000, "e5m2").stored == 57344
    big = jq.explain(1e6, "e5m2")
    assert big.stored == math.inf and big.is_inf and big.overflow
    assert "overflow -> Inf" in str(big)
    assert jq.explain(65519, "fp16").stored == 65504
    neg = jq.explain(-65520, "fp16")  # the midpoint: ties to even overflow
    assert neg.stored == -math.inf and neg.bits == "1111110000000000"
    assert neg.stored == cast(-65520.0, np.float16)


def test_formats_without_inf_or_nan_saturate():
    e = jq.explain(100, "fp4")
    assert e.stored == 6 and e.saturated and not e.overflow
    assert "saturated" in str(e)
    assert jq.explain(-7, "fp4").stored == -6
    assert jq.explain(float("inf"), "fp6").stored == 7.5
    nan = jq.explain(float("nan"), "fp4")
    assert nan.stored == 0 and nan.code == 0 and "no NaN" in str(nan)


@pytest.mark.parametrize(
    ("value", "mantissa"),
    [(2.0**-24, 1), (3 * 2.0**-24, 3), (1e-7, 2), (6e-8, 1), (2.0**-14 - 2.0**-24, 1023)],
)
def test_fp16_subnormals(value, mantissa):
    e = jq.explain(value, "fp16")
    assert e.category == "subnormal" and e.is_subnormal
    assert e.exponent == 0 and e.mantissa == mantissa
    assert e.stored == mantissa * 2.0**-24
    assert e.stored == float(np.float16(value))
    assert e.formula.startswith("(-1)^0 × 2^(1-15) × (0 + ")
    assert "subnormal" in str(e)


@pytest.mark.parametrize(
    ("value", "stored"),
    [(1 + 2.0**-11, 1.0), (1 + 3 * 2.0**-11, 1 + 2.0**-9), (-(1 + 2.0**-11), -1.0)],
)
def test_fp16_ties_to_even(value, stored):
    e = jq.explain(value, "fp16")
    assert e.stored == stored == float(np.float16(value))
    assert "ties go to the even mantissa" in str(e)


def test_fp16_underflow_and_smallest_normal():
    half = jq.explain(2.0**-25, "fp16")  # a tie between 0 and 2^-24: ties to even, 0
    assert half.stored == 0 and half.category == "zero" and "underflow" in str(half)
    assert jq.explain(1.5 * 2.0**-25, "fp16").stored == 2.0**-24
    normal = jq.explain(2.0**-14, "fp16")
    assert normal.category == "normal" and normal.exponent == 1 and normal.mantissa == 0


def test_bf16_subnormal_matches_ml_dtypes():
    for v in (1e-40, -3e-39, 9.2e-41, 2.0**-133):
        e = jq.explain(v, "bf16")
        assert same(e.stored, cast(v, ml_dtypes.bfloat16)), v


@pytest.mark.parametrize("fmt", ["fp32", "fp16", "bf16", "e4m3", "e5m2", "e4m3fnuz", "fp4"])
def test_nan_and_inf(fmt):
    dtype = ML_FLOATS[jq.formats.get(fmt).name]
    for v in (float("nan"), float("inf"), float("-inf")):
        e = jq.explain(v, fmt)
        expect = cast(v, dtype)
        if not jq.formats.get(fmt).has_nan and math.isnan(v):
            expect = 0.0  # jaxquant stores NaN as code 0 where there is no NaN code
        assert same(e.stored, expect) or (e.stored == 0 and expect == 0), (fmt, v)
        if math.isnan(e.stored):
            assert e.is_nan and e.category == "nan"
            assert math.isnan(jq.formats.decode_code(e.element, e.code))
        if math.isinf(e.stored):
            assert e.is_inf and "Inf" in e.formula


def test_nan_bit_patterns():
    assert jq.explain(float("nan"), "fp16").bits == "0111111000000000"  # numpy's quiet NaN
    assert jq.explain(float("nan"), "bf16").bits == "0111111111000000"
    assert jq.explain(float("nan"), "e4m3").bits == "01111111"
    assert jq.explain(float("nan"), "e4m3fnuz").bits == "10000000"
    assert jq.explain(float("inf"), "fp32").bits == "0" + "1" * 8 + "0" * 23


def test_signed_zero():
    assert jq.explain(-0.0, "fp16").bits == "1000000000000000"
    fnuz = jq.explain(-0.0, "e4m3fnuz")  # no negative zero: 1000 0000 is NaN
    assert fnuz.bits == "00000000" and fnuz.stored == 0


@pytest.mark.parametrize("name", sorted(ML_FLOATS))
def test_stored_matches_ml_dtypes(name):
    """explain's stored value equals the ml_dtypes cast over a spread of values."""
    dtype = ML_FLOATS[name]
    fmt = jq.formats.get(name)
    rng = np.random.default_rng(0)
    mags = 2.0 ** rng.uniform(np.log2(fmt.min_subnormal) - 2, np.log2(fmt.max) + 1, size=24)
    values = list(mags * rng.choice([-1.0, 1.0], size=24))
    values += [0.3, -2.1, fmt.max, -fmt.max, fmt.min_normal, fmt.min_subnormal / 2]
    for v in values:
        v = float(np.float32(v))
        e = jq.explain(v, name)
        expect = cast(v, dtype)
        assert same(e.stored + 0.0, expect + 0.0) or (e.stored == 0 and expect == 0), (name, v)
        assert same(jq.formats.decode_code(fmt, e.code), e.stored) or e.stored == 0


@pytest.mark.parametrize("name", [n for n in ML_FLOATS if n != "float32"])
def test_every_code_roundtrips(name):
    """Every bit pattern decodes to a value whose bits explain encodes back to it."""
    fmt = jq.formats.get(name)
    for c in range(fmt.num_codes):
        v = jq.formats.decode_code(fmt, c)
        code = ex._float_code(v, fmt, negative=bool(c >> (fmt.bits - 1)))
        if math.isnan(v):
            assert math.isnan(jq.formats.decode_code(fmt, code))
        else:
            assert code == c, (name, c, v, code)


def test_codes_of_fp16_match_numpy():
    codes = np.arange(2**16, dtype=np.uint16)
    values = codes.view(np.float16).astype(np.float64)
    fmt = jq.formats.get("fp16")
    for c, v in zip(codes[::97], values[::97], strict=True):
        e = jq.explain(code=int(c), fmt=fmt)
        assert same(e.stored, float(v))
        assert e.bits == format(int(c), "016b")


def test_e8m0_scale_format():
    e = jq.explain(0.3, "e8m0")
    assert e.stored == 0.25 and e.sign_bits == "" and e.mantissa_bits == ""
    assert e.formula == "2^(125-127) = 0.25"
    assert e.stored == cast(0.3, ml_dtypes.float8_e8m0fnu)


def test_float_code_input():
    e = jq.explain("0x3c00", "fp16")
    assert e.stored == 1.0 and e.formula.endswith("= 1")
    assert jq.explain(code="0b01111110", fmt="e4m3").stored == 448
    assert jq.explain(code=0x7F, fmt="e4m3").is_nan


# ---------------------------------------------------------------------- codebooks and MX


def test_nf4_nearest_value():
    e = jq.explain(0.3, "nf4")
    assert e.code == e.index == 11 and e.bits == "1011"
    assert e.stored == jq.formats.NF4_VALUES[11]
    assert e.category == "codebook"
    assert "index 11" in str(e)
    clipped = jq.explain(2.0, "nf4")
    assert clipped.stored == 1.0 and clipped.saturated


@pytest.mark.parametrize(
    ("value", "fmt", "stored"),
    [(0.0, "binary", 1.0), (-0.2, "binary", -1.0), (0.5, "ternary", 0.0), (0.51, "ternary", 1.0),
     (-0.7, "ternary", -1.0), (5.0, "ternary", 1.0)],
)  # fmt: skip
def test_binary_and_ternary(value, fmt, stored):
    assert jq.explain(value, fmt).stored == stored


def test_codebook_code_input():
    assert jq.explain(code=2, fmt="ternary").stored == 1.0
    with pytest.raises(ValueError, match=r"codes 0\.\.2"):
        jq.explain(code=3, fmt="ternary")


def test_mx_explains_the_element():
    e = jq.explain(0.3, "mxfp8")
    assert e.format.name == "mxfp8" and e.element.name == "float8_e4m3fn"
    assert e.stored == jq.explain(0.3, "e4m3").stored
    assert "shared" in str(e)
    assert jq.explain(0.3, "mxfp4").stored == 0.5


@pytest.mark.parametrize("fmt", ["int8", "uint4", "fp16", "e4m3", "nf4"])
def test_agrees_with_a_plain_cast_quantizer(fmt):
    """Inside the range, explain stores what jq.fake_quant (no scaling) stores."""
    values = np.array([0.3, -0.7, 1.25, -0.01, 0.0, 0.5], np.float32)
    spec = jq.QuantSpec(fmt, calibration=None)
    expect = np.asarray(jq.fake_quant(jnp.asarray(values), spec))
    got = np.array([jq.explain(float(v), fmt).stored for v in values], np.float32)
    if jq.formats.get(fmt).kind == "int" and not jq.formats.get(fmt).signed:
        got = np.maximum(got, 0)
    np.testing.assert_array_equal(got, expect)


# ------------------------------------------------------------------- rendering and errors


def test_str_and_html():
    e = jq.explain(0.3, "fp16")
    text = str(e)
    assert text.splitlines()[0].startswith("0.3 in float16")
    for piece in ("stored", "0.300048828125", "0 01101 0011001101", "2^(13-15)", "normal"):
        assert piece in text
    assert repr(e) == text
    page = e._repr_html_()
    assert page.startswith("<table") and "0.300048828125" in page and "01101" in page
    cmp_page = jq.explain(0.3, ["fp16", "int8"])._repr_html_()
    assert "<th>float16</th>" in cmp_page and "<th>int8</th>" in cmp_page


def test_inputs_of_many_types():
    assert jq.explain(np.float16(0.5), "fp16").stored == 0.5
    assert jq.explain(jnp.float32(0.3), "bf16").stored == 0.30078125
    assert jq.explain(jnp.array([0.3], jnp.bfloat16), "fp32").value == 0.30078125
    assert jq.explain(np.int64(3), "int8").stored == 3
    assert jq.explain("1e-3", "fp16").value == 0.001
    assert jq.explain(10**400, "fp16").stored == math.inf
    assert jq.explain(0.3, jq.formats.get("fp16")).stored == 0.300048828125


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: jq.explain(0.3, "fp99"), ValueError, "Unknown format 'fp99'"),
        (lambda: jq.explain("abc", "fp16"), ValueError, "'abc' is not a number"),
        (lambda: jq.explain([1.0, 2.0], "fp16"), TypeError, "one real number"),
        (lambda: jq.explain(jnp.ones(3), "fp16"), TypeError, "shape"),
        (lambda: jq.explain(True, "fp16"), TypeError, "bool"),
        (lambda: jq.explain(None, "fp16"), TypeError, "needs a value"),
        (lambda: jq.explain(0.3), TypeError, "no format"),
        (lambda: jq.explain(0.3, []), TypeError, "non-empty list"),
        (lambda: jq.explain(1.0, "int8", code=1), ValueError, "not both"),
        (lambda: jq.explain(code="0b111111111", fmt="int8"), ValueError, "does not fit int8"),
        (lambda: jq.explain(code="0b12", fmt="int8"), ValueError, "not a bit pattern"),
        (lambda: jq.explain(code=-1, fmt="int8"), ValueError, "non-negative"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
