"""papers/: each reproduce.py runs in fast mode and meets its pass criterion.

fp8_formats (arXiv:2209.05433 Table 1), nf4 (arXiv:2305.14314 App. E), mx_formats
(arXiv:2310.10537 Table 1) and sqnr_uniform (6.02b + 1.76 dB). The scripts live outside
the package, so they are loaded by path.
"""

import importlib.util
import math
from pathlib import Path

import pytest

PAPERS = Path(__file__).resolve().parents[1] / "papers"


def _load(name: str):
    path = PAPERS / name / "reproduce.py"
    spec = importlib.util.spec_from_file_location(f"papers_{name}_reproduce", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fp8():
    return _load("fp8_formats").main(fast=True)


@pytest.fixture(scope="module")
def nf4():
    return _load("nf4").main(fast=True)


@pytest.fixture(scope="module")
def mx():
    return _load("mx_formats").main(fast=True)


@pytest.fixture(scope="module")
def sqnr():
    return _load("sqnr_uniform").main(fast=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fp8", "nf4", "mx", "sqnr"])
def test_passed_and_criterion(name, request):
    result = request.getfixturevalue(name)
    assert isinstance(result["criterion"], str) and result["criterion"]
    assert result["passed"] is True


def test_fp8_table1_cells(fp8):
    assert fp8["e4m3_max"] == 448.0
    assert fp8["e5m2_max"] == 57344.0
    assert fp8["e4m3_min_subnormal"] == 2.0**-9
    assert fp8["e5m2_min_subnormal"] == 2.0**-16
    rows = {(r["format"], r["row"]) for r in fp8["rows"]}
    assert len(rows) == 16  # 8 Table 1 rows x 2 formats, every one checked
    assert all(r["ok"] for r in fp8["rows"])


@pytest.mark.slow
def test_nf4_values_and_mse(nf4):
    assert nf4["codebook_equal"]
    assert nf4["derive_max_abs_err"] <= 1e-6
    # Recorded on a 128x4096 N(0,1) matrix, blocks of 64: int4 ~1.37x, fp4 ~1.32x NF4's MSE.
    assert nf4["mse_nf4"] < nf4["mse_fp4"] < nf4["mse_int4"]
    assert 1.25 < nf4["int4_over_nf4"] < 1.50
    assert 1.20 < nf4["fp4_over_nf4"] < 1.45


@pytest.mark.slow
def test_mx_bits_per_element(mx):
    assert mx["bits_per_element"] == {
        "mxfp8_e5m2": 8.25,
        "mxfp8": 8.25,
        "mxfp6_e3m2": 6.25,
        "mxfp6": 6.25,
        "mxfp4": 4.25,
    }
    assert all(s["ok"] for s in mx["scale_checks"])
    assert mx["missing"] == ["MXINT8"]  # not in the registry (see papers/mx_formats/README.md)


@pytest.mark.slow
def test_sqnr_six_db_per_bit(sqnr):
    rows = {(r["format"], r["variant"], r["signal"]): r for r in sqnr["rows"]}
    for b in (4, 6):
        r = rows[(f"int{b}", "textbook", "uniform")]
        assert abs(r["measured_db"] - 6.0206 * b) <= 0.3
        assert r["measured_db"] == pytest.approx(r["reference_db"], abs=0.01)
    r = rows[("int6", "textbook", "sine")]
    assert abs(r["measured_db"] - (6.0206 * 6 + 10 * math.log10(1.5))) <= 0.3
    assert sqnr["max_abs_reference_diff_db"] <= 0.01
