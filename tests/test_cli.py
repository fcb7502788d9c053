"""The jaxquant command line, run in-process through main(argv) (plus one real subprocess).

The quantize worked examples are checked against the library: the printed dequantized
values must equal jq.fake_quant, the printed q values jq.quantize.
"""

import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant._src.cli import main, parse_calibration

SEED_X = [-0.5, 0.3, 1.2, -2.1]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def bracket_list(out: str, label: str) -> np.ndarray:
    """The float32 numbers of the ``[...]`` list on the line that starts with ``label``."""
    line = next(ln for ln in out.splitlines() if ln.strip().startswith(label))
    inner = line[line.index("[") + 1 : line.index("]")]
    return np.array([float(t) for t in inner.split(",")], np.float32)


def table_column(out: str, header: str) -> list[str]:
    """One column of the quantize table (cells split on runs of 2+ spaces)."""
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip().startswith("x ") and header in ln)
    head = re.split(r"\s{2,}", lines[start].strip())
    col = head.index(header)
    cells = []
    for ln in lines[start + 1 :]:
        if not ln.strip() or ln.strip().startswith("*"):
            break
        cells.append(re.split(r"\s{2,}", ln.strip())[col])
    return cells


def assert_error(code: int, out: str, err: str, *pieces: str) -> None:
    assert code != 0
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("jaxquant: error: ")
    assert "Traceback" not in err
    for p in pieces:
        assert p in lines[0]


# --------------------------------------------------------------------------- formats


def test_formats_table(capsys):
    code, out, _ = run(capsys, "formats")
    assert code == 0
    header = out.splitlines()[0].split()
    for col in ("name", "kind", "bits", "E", "M", "bias", "max", "eps", "digits", "inf", "nan"):
        assert col in header
    for name in jq.formats.names():
        assert re.search(rf"^{name}\s", out, re.MULTILINE), name
    fp16 = next(ln for ln in out.splitlines() if ln.startswith("float16 "))
    assert fp16.split()[:7] == ["float16", "float", "16", "5", "10", "15", "65504"]
    e4m3 = next(ln for ln in out.splitlines() if ln.startswith("float8_e4m3fn "))
    assert "448" in e4m3.split() and "0.015625" in e4m3.split()


def test_formats_json(capsys):
    code, out, _ = run(capsys, "formats", "--json")
    assert code == 0
    data = json.loads(out)
    assert [d["name"] for d in data] == jq.formats.names()
    by_name = {d["name"]: d for d in data}
    assert by_name["float16"] == jq.formats.get("fp16").properties()
    assert by_name["float16"]["max"] == 65504.0 and by_name["float16"]["inf"] is True
    assert by_name["int8"]["max"] == 127.0 and by_name["int8"]["min_normal"] == 1.0
    assert by_name["float8_e4m3fn"]["inf"] is False


def test_formats_kind_filter(capsys):
    code, out, _ = run(capsys, "formats", "--json", "--kind", "int")
    assert code == 0
    assert {d["kind"] for d in json.loads(out)} == {"int"}


# --------------------------------------------------------------------------- explain


def test_explain_fp16(capsys):
    code, out, _ = run(capsys, "explain", "0.3", "--format", "fp16")
    assert code == 0
    assert out == str(jq.explain(0.3, "fp16")) + "\n"
    assert "0.300048828125" in out and "0 01101 0011001101" in out


def test_explain_comparison(capsys):
    code, out, _ = run(capsys, "explain", "0.3", "--format", "fp32", "fp16", "bf16")
    assert code == 0
    assert out == str(jq.explain(0.3, ["fp32", "fp16", "bf16"])) + "\n"
    stored = next(ln for ln in out.splitlines() if ln.strip().startswith("stored"))
    assert stored.split()[1:] == ["0.300000011920929", "0.300048828125", "0.30078125"]


def test_explain_uint8_division(capsys):
    code, out, _ = run(capsys, "explain", "13", "--format", "uint8")
    assert code == 0
    assert "00001101" in out
    assert "13 ÷ 2 = 6" in out and "6 ÷ 2 = 3" in out and "3 ÷ 2 = 1" in out
    assert "8 + 4 + 0 + 1 = 13" in out


def test_explain_bit_pattern(capsys):
    code, out, _ = run(capsys, "explain", "0b11111111", "--format", "int8")
    assert code == 0
    stored = next(ln for ln in out.splitlines() if ln.strip().startswith("stored"))
    assert stored.split() == ["stored", "-1"]
    code, out, _ = run(capsys, "explain", "0b11111111", "-f", "int8", "uint8")
    stored = next(ln for ln in out.splitlines() if ln.strip().startswith("stored"))
    assert stored.split() == ["stored", "-1", "255"]


@pytest.mark.parametrize("value", ["-0.5", "-1e-3", "-inf", "-2"])
def test_explain_negative_numbers(capsys, value):
    code, out, err = run(capsys, "explain", value, "--format", "fp16")
    assert code == 0, err
    assert out == str(jq.explain(float(value), "fp16")) + "\n"


# -------------------------------------------------------------------------- quantize


@pytest.mark.slow
def test_quantize_int8_worked_example(capsys):
    code, out, _ = run(capsys, "quantize", *map(str, SEED_X), "--format", "int8")
    assert code == 0
    x = jnp.array(SEED_X, jnp.float32)
    spec = jq.QuantSpec("int8")
    q = jq.quantize(x, spec)
    scale = np.asarray(q.scale)[0]
    assert "max|x| = 2.1" in out
    assert f"s = max|x| / qmax = 2.1 / 127 = {scale!s}" in out
    assert scale == np.float32(2.1) / np.float32(127)
    assert "q = clip(round(x / s), -127, 127)" in out
    assert bracket_list(out, "quantized:").tolist() == [-30, 18, 73, -127]
    assert q.values.tolist() == [-30, 18, 73, -127]
    fq = np.asarray(jq.fake_quant(x, spec))
    np.testing.assert_array_equal(bracket_list(out, "dequantized:"), fq)
    np.testing.assert_array_equal(np.array(table_column(out, "x_hat"), np.float32), fq)
    assert table_column(out, "round") == ["-30", "18", "73", "-127"]
    x_over_s = np.array(table_column(out, "x / s"), np.float32)
    np.testing.assert_array_equal(x_over_s, x / q.scale)  # XLA's division, as the quantizer
    sqnr = float(jq.metrics.sqnr(x, fq))
    assert f"= {sqnr:.2f} dB" in out
    assert "4 × 8 bits = 4 bytes" in out


@pytest.mark.slow
def test_quantize_fp16_worked_example(capsys):
    code, out, _ = run(capsys, "quantize", *map(str, SEED_X), "--format", "fp16")
    assert code == 0
    x = jnp.array(SEED_X, jnp.float32)
    spec = jq.QuantSpec("fp16")
    q = jq.quantize(x, spec)
    assert f"2.1 / 65504 = {np.asarray(q.scale)[0]!s}" in out
    assert np.asarray(q.scale)[0] == np.float32(2.1) / np.float32(65504)
    values = np.asarray(q.values).astype(np.float32)
    np.testing.assert_array_equal(bracket_list(out, "quantized:"), values)
    np.testing.assert_array_equal(bracket_list(out, "dequantized:"), jq.fake_quant(x, spec))


@pytest.mark.parametrize(
    ("fmt", "options", "calibration"),
    [
        ("int8", ["--calibration", "mean_std:1"], jq.mean_std(1.0)),
        ("int8", ["--calibration", "percentile:90"], jq.percentile(90.0)),
        ("int4", ["--calibration", "mse"], jq.mse()),
        ("int4", [], jq.absmax()),
        ("e4m3", ["-c", "minmax"], jq.minmax()),
        ("fp4", ["-c", "none"], None),
        ("nf4", [], jq.absmax()),
        ("ternary", [], jq.absmax()),
    ],
)
def test_quantize_matches_fake_quant(capsys, fmt, options, calibration):
    x = SEED_X  # one shape for every case: eager JAX compiles each op once per shape
    code, out, err = run(capsys, "quantize", *map(str, x), "--format", fmt, *options)
    assert code == 0, err
    spec = jq.QuantSpec(fmt, calibration=calibration)
    fq = jq.fake_quant(jnp.array(x, jnp.float32), spec)
    np.testing.assert_array_equal(bracket_list(out, "dequantized:"), fq)
    if calibration in (jq.mean_std(1.0), jq.percentile(90.0)):  # these clip -2.1
        assert " -127 *" in out and "* saturated to [-127, 127]" in out


def test_quantize_asymmetric_shows_zero_point(capsys):
    code, out, _ = run(capsys, "quantize", *map(str, SEED_X), "--format", "int8", "--asymmetric")
    assert code == 0
    x = jnp.array(SEED_X, jnp.float32)
    spec = jq.QuantSpec("int8", symmetric=False)
    q = jq.quantize(x, spec)
    z = int(q.zero_point[0])
    assert f"= {z}" in out and "z = clip(round(qmin - lo / s), -128, 127)" in out
    assert "x_hat = (q - z) × s" in out
    assert bracket_list(out, "quantized:").tolist() == q.values.tolist()
    np.testing.assert_array_equal(bracket_list(out, "dequantized:"), jq.fake_quant(x, spec))


def test_quantize_full_grid_shows_the_half_step_divisor(capsys):
    code, out, err = run(capsys, "quantize", *map(str, SEED_X), "--format", "int4", "--full-grid")
    assert code == 0, err
    assert "full grid" in out.splitlines()[0]
    assert "s = max|x| / (qmax + 0.5) = 2.1 / 7.5 = " in out
    assert "q = clip(round(x / s), -8, 7)" in out
    x = jnp.array(SEED_X, jnp.float32)
    spec = jq.QuantSpec("int4", int_grid="full")
    assert bracket_list(out, "quantized:").tolist() == jq.quantize(x, spec).codes().tolist()
    np.testing.assert_array_equal(bracket_list(out, "dequantized:"), jq.fake_quant(x, spec))
    # the restricted grid keeps its text
    code, out, _ = run(capsys, "quantize", *map(str, SEED_X), "--format", "int4")
    assert code == 0 and "s = max|x| / qmax = 2.1 / 7 = " in out


@pytest.mark.slow
def test_quantize_stochastic_seed(capsys):
    argv = ["quantize", *map(str, SEED_X), "--format", "int4", "--stochastic", "--seed", "7"]
    code, out, _ = run(capsys, *argv)
    assert code == 0
    x = jnp.array(SEED_X, jnp.float32)
    spec = jq.QuantSpec("int4", rounding="stochastic")
    fq = jq.fake_quant(x, spec, key=jax.random.key(7))
    np.testing.assert_array_equal(bracket_list(out, "dequantized:"), fq)
    assert "seed 7" in out
    # the same seed prints the same numbers
    assert run(capsys, *argv)[1] == out


@pytest.mark.parametrize("first", ["-0.5", "-1e-3", "-inf", "-.5"])
def test_quantize_negative_first_value(capsys, first):
    code, out, err = run(capsys, "quantize", first, "0.3", "1.2", "-2.1", "--format", "int8")
    assert code == 0, err
    assert bracket_list(out, "x = ")[0] == np.float32(float(first))


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("argv", "pieces"),
    [
        (["explain", "0.3", "--format", "fp99"], ["Unknown format 'fp99'"]),
        (["quantize", "1", "2", "--format", "fp99"], ["Unknown format 'fp99'"]),
        (["explain", "abc", "--format", "fp16"], ["'abc' is not a number"]),
        (["quantize", "1", "x2"], ["'x2' is not a number"]),
        (["quantize", "1", "2", "--calibration", "foo"], ["unknown calibration 'foo'"]),
        (["quantize", "1", "2", "-c", "percentile:abc"], ["'abc' is not a number"]),
        (["quantize", "1", "2", "-c", "mse:0"], ["need num >= 2"]),
        (["quantize", "1", "2", "-c", "mean_std:-1"], ["mean_std(k) must be", "> 0"]),
        (["quantize", "1", "2", "-c", "absmax:3"], ["takes no parameter"]),
        (["quantize", "1", "2", "--format", "fp16", "--asymmetric"], ["integer format"]),
        (["quantize", "1", "2", "--format", "fp16", "--full-grid"], ["signed int", "int_grid"]),
        (["quantize", "1", "2", "--format", "mxfp8"], ["block size 32"]),
        (["explain", "0b111111111", "--format", "int8"], ["does not fit int8"]),
        (["quantize"], ["required"]),
        (["bogus"], ["invalid choice"]),
    ],
)
def test_errors_are_one_line(capsys, argv, pieces):
    code, out, err = run(capsys, *argv)
    assert_error(code, out, err, *pieces)


def test_help_and_no_command(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "formats" in out and "quantize" in out
    code, out, _ = run(capsys, "quantize", "--help")
    assert code == 0 and "--calibration" in out
    code, out, _ = run(capsys)
    assert code == 2 and "usage" in out


def test_parse_calibration():
    assert parse_calibration("absmax") == jq.absmax()
    assert parse_calibration("mean_std:2.5") == jq.mean_std(2.5)
    assert parse_calibration("Mean-Std") == jq.mean_std()
    assert parse_calibration("percentile:99") == jq.percentile(99.0)
    assert parse_calibration("mse:16") == jq.mse(16)
    assert parse_calibration("none") is None


@pytest.mark.slow
def test_console_script_exit_status():
    """The real process: exit status and a one-line error, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "jaxquant._src.cli", "explain", "0.3", "--format", "fp99"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.startswith("jaxquant: error: ")
    assert "Unknown format 'fp99'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_quantize_refuses_numbers_beyond_float32(capsys):
    code, out, err = run(capsys, "quantize", "1e39", "--format", "int8")
    assert_error(code, out, err, "1e+39", "float32")
