"""Issue 11's numerics defects, each against a reference jaxquant did not compute (ml_dtypes,
numpy float64 first principles, exact bit patterns), in eager, jit and vmap alike."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxquant as jq
from jaxquant._src import cli, formats, qarray

F32 = np.float32


def _modes(fn):
    """fn evaluated eagerly, under jit and under vmap (as a batch of one row)."""
    return {
        "eager": fn,
        "jit": jax.jit(fn),
        "vmap": lambda x: jax.vmap(fn)(x[None])[0],
    }


def _bits(a) -> np.ndarray:
    return np.asarray(a, np.float32).view(np.uint32)


# ----------------------------------------------------------------- 1. bf16 subnormals


@pytest.mark.parametrize("mode", ["eager", "jit", "vmap"])
def test_plain_bf16_cast_keeps_float32_subnormals(mode):
    x = np.array([9.1835496e-41, -3.0e-39, 1e-45, 1.0, -0.0], F32)
    want = x.astype(ml_dtypes.bfloat16).astype(F32)
    spec = jq.QuantSpec("bf16", calibration=None)
    deq = _modes(lambda v: jq.dequantize(jq.quantize(v, spec)))[mode]
    fq = _modes(lambda v: jq.fake_quant(v, spec))[mode]
    np.testing.assert_array_equal(_bits(deq(jnp.asarray(x))), _bits(want))
    np.testing.assert_array_equal(_bits(fq(jnp.asarray(x))), _bits(want))


# ------------------------------------------- 2. 8-exponent-bit ExMy subnormal codes


def _ref_code(v: float, e: int, m: int) -> int:
    """The IEEE-style code of a value on an (e, m) grid with the default bias (float64)."""
    bias = 2 ** (e - 1) - 1
    sign = 1 if np.signbit(v) else 0
    a = abs(v)
    if a == 0:
        return sign << (e + m)
    ex = int(np.floor(np.log2(a)))
    if ex < 1 - bias:  # subnormal: mantissa = a / 2^(1 - bias - m)
        return (sign << (e + m)) | round(a / 2.0 ** (1 - bias - m))
    man = round((a / 2.0**ex - 1) * 2**m)
    return (sign << (e + m)) | ((ex + bias) << m) | man


# Every width in some mode and every mode on some width (all one float family, one code
# path): the full 3 x 3 product compiled nine programs for three checks' worth of cases.
@pytest.mark.parametrize(
    ("m", "mode"), [(1, "eager"), (3, "jit"), (6, "vmap"), (1, "jit"), (6, "eager")]
)
def test_float32_subnormals_get_subnormal_codes_in_e8_formats(mode, m):
    fmt = formats.float_format(8, m)
    grid = [2.0**-127, -(2.0**-127), 2.0**-126, 3 * 2.0 ** (-127 - 1)]
    vals = [v for v in grid if v == np.round(v / 2.0 ** (-126 - m)) * 2.0 ** (-126 - m)]
    x = np.array(vals, F32)
    spec = jq.QuantSpec(fmt, calibration=None)
    codes = _modes(lambda v: jq.quantize(v, spec).values)[mode](jnp.asarray(x))
    want = [_ref_code(float(v), 8, m) for v in x]
    assert np.asarray(codes).tolist() == want
    assert [hex(c) for c in want[:2]] == [hex(1 << (m - 1)), hex((1 << (8 + m)) | (1 << (m - 1)))]
    back = jq.dequantize(jq.quantize(jnp.asarray(x), spec))
    np.testing.assert_array_equal(_bits(back), _bits(x))


# ------------------------------------------------------- 3. formats wider than 16 bits


@pytest.mark.parametrize(
    ("e", "m", "style"), [(5, 12, "none"), (8, 10, "ieee"), (6, 14, "fn"), (8, 15, "ieee")]
)
def test_wide_float_formats_store_uint32_codes(e, m, style):
    fmt = formats.float_format(e, m, nan_style=style)
    assert fmt.bits > 16
    x = np.array([-3.5, 1.0 / 3, 2.0**-20, 1e4, -0.0], F32)
    spec = jq.QuantSpec(fmt, calibration=None)
    q = jq.quantize(jnp.asarray(x), spec)
    assert q.values.dtype == np.uint32
    fq = np.asarray(jq.fake_quant(jnp.asarray(x), spec))
    want = [_ref_code(float(v), e, m) for v in fq]
    assert np.asarray(q.values).tolist() == want
    np.testing.assert_array_equal(_bits(jq.dequantize(q)), _bits(fq))
    if (e, m, style) == (5, 12, "none"):
        assert int(q.values[0]) == 0x30C00  # the example (was truncated to 0xc00)


@pytest.mark.slow
def test_float_values_inverts_every_code_of_16_bit_and_smaller_formats():
    """The bit-built decoder used for > 16-bit formats equals the code table (pure Python
    decode) on every code of every <= 16-bit layout."""
    # Every format decodes the same 2^16 codes (modulo its own code count): one shape, so
    # the eager operations compile once for all 150 formats instead of once per format.
    all_codes = np.arange(2**16, dtype=np.uint32)
    checked = 0
    for e in range(2, 9):
        for m in range(1, 8):
            for style in ("ieee", "fn", "fnuz", "none"):
                if e + m + 1 > 16:
                    continue
                try:
                    fmt = formats.float_format(e, m, nan_style=style)
                except ValueError:
                    continue
                table = formats.code_table(fmt).astype(F32)
                codes = all_codes % np.uint32(fmt.num_codes)
                got = np.asarray(qarray.float_values(jnp.asarray(codes), fmt))
                np.testing.assert_array_equal(got, table[codes], err_msg=fmt.name)
                checked += 1
    assert checked >= 4 * 7 * 7 // 2


# ---------------------------------------------------------------- 4. NaN, codebooks


# Each codebook in some mode, each mode on some codebook (one code path: the codebook's
# NaN mask), not the 3 x 3 product.
@pytest.mark.parametrize(
    ("name", "mode"), [("nf4", "eager"), ("ternary", "jit"), ("binary", "vmap"), ("nf4", "vmap")]
)
def test_nan_propagates_through_fake_quant_for_codebooks(mode, name):
    x = jnp.array([1.0, np.nan, -0.5, 0.25])
    spec = jq.QuantSpec(name)
    out = np.asarray(_modes(lambda v: jq.fake_quant(v, spec))[mode](x))
    assert np.isnan(out[1]) and np.isfinite(out[[0, 2, 3]]).all()
    ref = np.asarray(jq.fake_quant(x.at[1].set(0.0), spec))
    np.testing.assert_array_equal(out[[0, 2, 3]], ref[[0, 2, 3]])


def test_binary_stores_nan_as_what_zero_rounds_to():
    q = jq.quantize(jnp.array([np.nan, 0.0, -1.0]), jq.QuantSpec("binary"))
    assert jq.dequantize(q).tolist() == [1.0, 1.0, -1.0]


# --------------------------------------------------------- 5. asymmetric ties


@pytest.mark.parametrize("mode", ["eager", "jit", "vmap"])
def test_asymmetric_rounds_before_adding_the_zero_point(mode):
    x = np.array([-1.015625, 2.96875, 0.0078125, 0.0078124995], F32)
    spec = jq.QuantSpec("uint8", calibration=jq.minmax(), symmetric=False)
    q = _modes(lambda v: jq.quantize(v, spec).values)[mode](jnp.asarray(x))
    # numpy first principles: s = (hi - lo) / 255, z = round(-lo / s), q = round(x/s) + z
    s = (np.float64(2.96875) + 1.015625) / 255
    z = np.round(1.015625 / s)
    want = np.clip(np.round(x.astype(np.float64) / s) + z, 0, 255)
    assert np.asarray(q).tolist() == want.tolist() == [0, 255, 65, 65]


@pytest.mark.slow
def test_asymmetric_ties_every_odd_zero_point():
    """Exact ties x/s = k + 1/2 round to even *before* z is added, for odd and even z."""
    s = 2.0**-4
    for z in range(1, 12):
        lo = -z * s
        # The ties repeated to one length for every z: one compiled program, not eleven.
        ties = np.resize([(k + 0.5) * s for k in range(-z, 8)], 20)
        x = np.array([lo, lo + 255 * s, *ties], F32)
        spec = jq.QuantSpec("uint8", calibration=jq.minmax(), symmetric=False)
        q = jq.quantize(jnp.asarray(x), spec)
        assert float(q.scale.reshape(())) == s and int(q.zero_point.reshape(())) == z
        want = np.clip(np.round(x.astype(np.float64) / s) + z, 0, 255)
        np.testing.assert_array_equal(np.asarray(q.values), want)


# ------------------------------------------------------------ 6. extreme ranges


# Every format once, the modes rotated so each family (codebooks, ints) runs in every
# mode: nf4 / binary / ternary and int2 / int3 / uint2 get eager / jit / vmap.
@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("nf4", "eager"),
        ("binary", "jit"),
        ("ternary", "vmap"),
        ("int2", "eager"),
        ("int3", "jit"),
        ("uint2", "vmap"),
    ],
)
def test_huge_ranges_do_not_collapse(mode, name):
    """amax > 2^126 with qmax < 4: the scale's reciprocal is a float32 subnormal; the
    result must be the same grid as the data scaled down by 2^100 (then scaled back)."""
    x = np.array([2e38, -1.5e38, 3e37, 0.0, 2.5e38], F32)
    spec = jq.QuantSpec(name)
    out = np.asarray(_modes(lambda v: jq.fake_quant(v, spec))[mode](jnp.asarray(x)), np.float64)
    small = np.asarray(jq.fake_quant(jnp.asarray(x * F32(2.0**-100)), spec), np.float64)
    np.testing.assert_array_equal(out, small * 2.0**100)
    assert np.sign(out[0]) == 1 and (spec.qrange[0] == 0 or np.sign(out[1]) == -1)


def test_asymmetric_range_wider_than_float32_max():
    x = jnp.array([2e38, -2e38, 0.0, 1e38])
    spec = jq.QuantSpec("uint8", calibration=jq.minmax(), symmetric=False)
    q = jq.quantize(x, spec)
    s = (2e38 + 2e38) / 255  # float64 reference
    assert float(q.scale.reshape(())) == pytest.approx(s, rel=2**-23)
    z = np.round(2e38 / np.float64(np.float32(s)))
    assert int(q.zero_point.reshape(())) == z
    np.testing.assert_allclose(np.asarray(jq.dequantize(q)), np.asarray(x), rtol=0, atol=s)


@pytest.mark.slow
def test_subnormal_tensors_are_counted_as_clamped_scales():
    x = jnp.full((4, 32), 1e-40, jnp.float32).at[0].set(1.0)
    rate = jax.jit(jq.metrics.scale_clamp_rate)  # one program per spec, not per operation
    for name in ("int8", "e4m3", "mxfp8"):
        spec = jq.QuantSpec(name, jq.per_channel(0)) if name != "mxfp8" else jq.QuantSpec(name)
        q = jq.quantize(x, spec)
        assert float(rate(x, q)) == pytest.approx(0.75), name
    q = jq.quantize(x, jq.QuantSpec("int8", jq.per_channel(0)))
    assert float(rate(jnp.ones((4, 32)), q)) == 0.0


@pytest.mark.slow
def test_float16_scale_limits_are_counted():
    x = jnp.array([[1e7, -2e7], [1e-9, 1e-9], [1.0, 2.0]])
    q = jq.quantize(x, jq.QuantSpec("int8", jq.per_channel(0), scale_format="float16"))
    assert float(jq.metrics.scale_clamp_rate(x, q)) == pytest.approx(2 / 3)
    assert "scale_clamp_rate" in jax.jit(jq.metrics.summary)(x, q)  # one program


# ------------------------------------------------------------ 7. vmap and scales


@pytest.mark.parametrize("name", ["int8", "e4m3", "int4", "uint8"])
def test_vmap_scales_are_correctly_rounded(name):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((128, 16)) * np.exp(rng.uniform(-8, 8, (128, 1)))).astype(F32)
    x[0, 0], x[1] = 40.307384, 1.0
    spec = jq.QuantSpec(name)
    batched = np.asarray(jax.vmap(lambda r: jq.quantize(r, spec).scale)(jnp.asarray(x)))
    rows = np.stack([np.asarray(jq.quantize(jnp.asarray(r), spec).scale) for r in x])
    _, qmax = spec.qrange
    amax = np.max(np.abs(x), axis=1)
    ref = (amax.astype(np.float64) / qmax).astype(F32)  # one correctly rounded division
    np.testing.assert_array_equal(_bits(batched.reshape(-1)), _bits(ref))
    np.testing.assert_array_equal(_bits(rows.reshape(-1)), _bits(ref))


# ------------------------------------------------------------ 8. float64 inputs


@pytest.fixture
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


F64_FORMATS = ["e4m3", "e5m2", "bf16", "fp16", "e2m1", "e3m2"]


@pytest.mark.parametrize("name", F64_FORMATS)
def test_float64_inputs_round_once(x64, name):
    fmt = formats.get(name)
    dt = fmt.dtype
    rng = np.random.default_rng(3)
    # Midpoints between neighbouring grid values, nudged by far less than a float32 ulp:
    # rounding through float32 first lands on the tie and picks the even neighbour.
    grid = formats.finite_values(fmt)
    grid = grid[(grid > 0) & (grid < fmt.max)]
    mids = (grid[:-1] + grid[1:]) / 2
    eps = np.abs(mids) * 2.0**-40
    x = np.concatenate([mids + eps, mids - eps, -(mids + eps), rng.standard_normal(64)])
    spec = jq.QuantSpec(name, calibration=None)
    # fake_quant eagerly on every other format, under jit on the rest (each mode meets
    # fp8, 16-bit and sub-byte formats); quantize / dequantize eagerly on all.
    eager = F64_FORMATS.index(name) % 2 == 0
    fn = (lambda v: jq.fake_quant(v, spec)) if eager else jax.jit(lambda v: jq.fake_quant(v, spec))
    got = np.asarray(fn(jnp.asarray(x, jnp.float64)))
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, x.astype(dt).astype(np.float64))
    q = jq.quantize(jnp.asarray(x, jnp.float64), spec)
    np.testing.assert_array_equal(np.asarray(jq.dequantize(q)), x.astype(dt).astype(np.float64))
    if name == "e4m3":
        one = jnp.asarray([1.0625000000009095], jnp.float64)
        assert float(jq.fake_quant(one, spec)[0]) == 1.125


# ------------------------------------------------------------ 9. one implementation


CLI_CASES = [(name, jq.mse()) for name in ("ternary", "int4", "nf4", "e2m1", "int8")] + [
    ("int4", cal) for cal in (jq.absmax(), jq.percentile(99.0), jq.mean_std(2.0), jq.kl(), None)
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "cal"), CLI_CASES)
def test_cli_steps_are_the_library(cal, name):
    # One length per case, 2 and 33 alternating (each length compiles its own programs):
    # int4 meets both, under mse() and under the other calibrations.
    i = CLI_CASES.index((name, cal))
    n = (2, 33)[i % 2]
    x = jnp.asarray((np.random.default_rng(11 + i).standard_normal(n) * 3).astype(F32))
    spec = jq.QuantSpec(name, calibration=cal)
    st = cli.quantize_steps(x, spec)
    # The library's fake_quant and quantize in one jitted program: they share one
    # calibration (a search for mse() and kl()) instead of compiling it twice.
    q, x_hat = jax.jit(lambda v: (jq.quantize(v, spec), jq.fake_quant(v, spec)))(x)
    np.testing.assert_array_equal(_bits(st.x_hat), _bits(x_hat))
    np.testing.assert_array_equal(_bits(st.scale), _bits(np.asarray(q.scale).reshape(-1)))
    if i == 0:  # the command itself, once
        assert cli.main(["quantize", "1", "2", "--format", "ternary", "--calibration", "mse"]) == 0


# ------------------------------------------------------------ QArray.codes()


def _ref_int_codes(x, bits, signed):
    """numpy first principles: absmax int quantization, restricted symmetric range."""
    qmax = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    s = np.float32(np.max(np.abs(x)) / np.float32(qmax))
    inv = np.float32(1) / s
    lo = -qmax if signed else 0
    return np.clip(np.round(x * inv), lo, qmax)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 7, 8])
def test_codes_unpack_ints_to_signed_values(bits):
    rng = np.random.default_rng(bits)
    x = rng.standard_normal((3, 13)).astype(F32)
    # The oracle is the restricted grid's (int2 / int3 default to the full one).
    signed = jq.QuantSpec(f"int{bits}", int_grid="restricted")
    unsigned = jq.QuantSpec(f"uint{bits}")

    # One program per width (codes() unpacks eagerly elsewhere in this file).
    @jax.jit
    def both(v):
        return jq.quantize(v, signed).codes(), jq.quantize(jnp.abs(v), unsigned).codes()

    c, u = (np.asarray(a) for a in both(jnp.asarray(x)))
    assert c.shape == x.shape and np.issubdtype(c.dtype, np.signedinteger)
    np.testing.assert_array_equal(c, _ref_int_codes(x, bits, True))
    np.testing.assert_array_equal(u, _ref_int_codes(np.abs(x), bits, False))


@pytest.mark.slow
def test_codes_of_the_articles_int4_example_and_of_floats_and_codebooks():
    x = jnp.array([-0.5, 0.3, 1.2, -2.1])
    q = jq.quantize(x, jq.QuantSpec("int4"))
    assert q.codes().tolist() == [-2, 1, 4, -7]
    # Floats: the format's own bit patterns (ml_dtypes views), for byte and sub-byte formats.
    for name, dt in (("e4m3", ml_dtypes.float8_e4m3fn), ("e2m1", ml_dtypes.float4_e2m1fn)):
        spec = jq.QuantSpec(name, calibration=None)
        y = np.asarray(jq.fake_quant(x, spec)).astype(dt)
        want = y.view(np.uint8) & (0xFF if name == "e4m3" else 0x0F)
        np.testing.assert_array_equal(np.asarray(jq.quantize(x, spec).codes()), want)
    bf = jq.quantize(x, jq.QuantSpec("bf16", calibration=None)).codes()
    assert bf.dtype == np.uint16
    np.testing.assert_array_equal(
        np.asarray(bf), np.asarray(x).astype(ml_dtypes.bfloat16).view(np.uint16)
    )
    # Codebooks: indices into the sorted value table.
    for name in ("nf4", "ternary", "binary"):
        spec = jq.QuantSpec(name)
        q = jq.quantize(x, spec)
        table = np.asarray(spec.format.codebook, F32)
        np.testing.assert_array_equal(
            table[np.asarray(q.codes())] * np.asarray(q.scale).reshape(()),
            np.asarray(jq.dequantize(q)),
        )
