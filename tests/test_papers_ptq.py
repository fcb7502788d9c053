"""papers/{gptq, smoothquant, quarot, awq, kv_cache}: each reproduce.py runs in fast mode
(one seed, the d=64 byte LM of papers/_ptq_common.py) and meets its pass criterion; the
numbers the READMEs quote for the fast mode are asserted with a margin.

The scripts live outside the package, so they are loaded by path; the trained byte LM is
cached in the temp directory and shared by all five (trained once per machine).
"""

import importlib.util
from pathlib import Path

import jax
import pytest

PAPERS = Path(__file__).resolve().parents[1] / "papers"


def _run(name: str):
    path = PAPERS / name / "reproduce.py"
    spec = importlib.util.spec_from_file_location(f"papers_{name}_reproduce", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # training uses optax's Adam (not strict-promotion clean); the PTQ code runs either way
    with jax.numpy_dtype_promotion("standard"):
        result = module.main(fast=True)
    assert isinstance(module.markdown(result), str)
    return result


@pytest.fixture(scope="module")
def results():
    return {}


def _get(results, name):
    if name not in results:
        results[name] = _run(name)
    return results[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gptq", "smoothquant", "quarot", "awq", "kv_cache"])
def test_passed_and_criterion(name, results):
    res = _get(results, name)
    assert isinstance(res["criterion"], str) and res["criterion"]
    assert res["checks"] and all(res["checks"].values()), res["checks"]
    assert res["passed"] is True


@pytest.mark.slow
def test_gptq_numbers(results):
    m = _get(results, "gptq")["mean"]
    # measured (fast, CPU): float 2.3266; w4 RTN +0.0153 / GPTQ +0.0027; w3 +0.0967 / +0.0298
    assert 2.2 < m["float"] < 2.45
    assert m["w4 per-channel/gptq"] < 0.35 * m["w4 per-channel/rtn"]
    assert m["w3 per-channel/gptq"] < 0.45 * m["w3 per-channel/rtn"]
    assert m["w3 per-channel/rtn"] > 0.05


@pytest.mark.slow
def test_smoothquant_numbers(results):
    m = _get(results, "smoothquant")["mean"]
    # measured: plain W8A8 +3.106 (per tensor) / +2.908 (per token); SmoothQuant ~0.00 %
    assert m["outliers/per-tensor/rtn"] > 2.0 and m["outliers/per-token/rtn"] > 2.0
    assert abs(m["outliers/per-tensor/smoothquant_rel"]) < 1e-3
    assert abs(m["outliers/per-token/smoothquant_rel"]) < 1e-3


@pytest.mark.slow
def test_quarot_numbers(results):
    m = _get(results, "quarot")["mean"]
    # measured: W4A4 RTN +3.122, rotation + RTN +0.0437, rotation + GPTQ +0.0292
    assert m["outliers/rtn"] > 2.5
    assert m["outliers/rotate+rtn"] < 0.06
    assert m["outliers/rotate+gptq"] < 0.04


@pytest.mark.slow
def test_awq_numbers(results):
    m = _get(results, "awq")["mean"]
    # measured: outliers int4 g32 RTN +0.0759, AWQ + clip +0.0112
    assert m["outliers/w4/rtn"] > 0.05
    assert m["outliers/w4/awq"] < 0.25 * m["outliers/w4/rtn"]


@pytest.mark.slow
def test_kv_cache_numbers(results):
    m = _get(results, "kv_cache")["mean"]
    # measured (32 windows): float32 cache +0, bfloat16 -0.00000, int4 +0.0021, rotated +0.0032
    assert abs(m["float32"]) < 1e-5
    assert abs(m["bfloat16"]) < 1e-3
    assert 0 < m["int4"] < 0.01 and 0 < m["int4 rotated"] < 0.01
