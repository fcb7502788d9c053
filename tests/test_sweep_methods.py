"""The sweep's PTQ method axis (grid.methods): cells, ids, config hashes, validation and
the evaluation of gptq / awq / smoothquant / rotate cells on a small digits MLP."""

from __future__ import annotations

import pytest

from jaxquant.app.sweep import config as C
from jaxquant.app.sweep import grid as G
from jaxquant.app.sweep import run as R

_GRID = {
    "formats": ["float32", "int3"],
    "granularities": ["channel"],
    "calibrations": ["absmax"],
    "roundings": ["nearest"],
    "modes": ["ptq"],
}
_TASK = {"model_kwargs": {"features": [64, 64]}, "epochs": 10}


def _cfg(**grid):
    return C.resolve({"seeds": [0], "task": _TASK, "grid": _GRID | grid})


def test_rtn_only_config_is_unchanged_by_the_axis():
    # The axis absent: no key in the resolved config (same hash as before it existed),
    # cells without a method suffix; ["rtn"] gives the same cells and ids.
    plain = _cfg()
    assert "methods" not in plain["grid"]
    with_rtn = _cfg(methods=["rtn"])
    assert [c.id for c in G.expand(plain)] == [c.id for c in G.expand(with_rtn)]
    assert [c.id for c in G.expand(plain)] == [
        "digits-mlp/0/float32/tensor/none/nearest/ptq",
        "digits-mlp/0/int3/channel/absmax/nearest/ptq",
    ]
    # The built-in presets carry no methods key: their hashes are those of before.
    for name in C.PRESETS:
        assert "methods" not in C.resolve(None, preset=name)["grid"]
    # An rtn row keeps the columns and the summary header of a sweep without the axis.
    assert R.columns([{"method": "rtn"}, {}]) == R.COLUMNS
    assert "method" not in R.summary_table([])


def test_method_cells_ids_and_order():
    cfg = _cfg(methods=["rtn", "gptq", "rotate+gptq"])
    ids = [c.id for c in G.expand(cfg)]
    assert ids == [
        # a cast is the float reference: its method is always rtn
        "digits-mlp/0/float32/tensor/none/nearest/ptq",
        "digits-mlp/0/int3/channel/absmax/nearest/ptq",
        "digits-mlp/0/int3/channel/absmax/nearest/ptq/method=gptq",
        "digits-mlp/0/int3/channel/absmax/nearest/ptq/method=rotate+gptq",
    ]
    # The composition order is the method name's, left to right.
    assert C.method_steps("rotate+smoothquant+gptq") == ["rotate", "smoothquant", "gptq"]
    assert C.method_steps("rtn") == []
    assert R.columns([{"method": "gptq"}])[9:12] == R.METHOD_COLUMNS
    # Round trip through config.toml.
    assert C.resolve(__import__("tomllib").loads(C.to_toml(cfg))) == cfg


@pytest.mark.parametrize(
    ("methods", "key", "needle"),
    [
        (["gptq", "bogus"], "grid.methods[1]", "unknown step 'bogus'"),
        (["gptq+awq"], "grid.methods[0]", "comes last"),
        (["awq+rtn"], "grid.methods[0]", "write 'awq'"),
        (["awq+awq"], "grid.methods[0]", "repeats"),
        (["gptq", "gptq"], "grid.methods[1]", "repeated"),
        (["smoothquant"], "grid.methods[0]", "needs quantized activations"),
        ([], "grid.methods", "is empty"),
    ],
)
def test_bad_methods_name_the_key(methods, key, needle):
    with pytest.raises(C.ConfigError, match=r"sweep config: ") as err:
        _cfg(methods=methods)
    assert key in str(err.value) and needle in str(err.value)


def test_smoothquant_in_an_also_table_with_activations():
    cfg = _cfg(also=[{"formats": ["int8"], "activations": ["int8"], "methods": ["smoothquant"]}])
    assert G.expand(cfg)[-1].id.endswith("/act=int8/method=smoothquant")
    with pytest.raises(C.ConfigError, match=r"grid\.also\[0\]\.methods\[0\]"):
        _cfg(also=[{"formats": ["int8"], "methods": ["smoothquant"]}])


@pytest.mark.slow
def test_gptq_beats_rtn_at_int3(tmp_path):
    # The digits MLP (64-64, 10 epochs), int3 per channel, 8 calibration batches of 64:
    # measured test loss float 0.329, rtn 0.368, gptq 0.353, rotate+gptq 0.340.
    cfg = _cfg(methods=["rtn", "gptq", "rotate+gptq"])
    got = R.run_sweep(cfg, tmp_path / "r", progress=None, plots=False)
    rows = {r["id"].rpartition("/")[2]: r for r in got["rows"]}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    rtn, gptq = rows["ptq"], rows["method=gptq"]
    assert "method" not in rtn  # rows of rtn cells as before the axis
    assert gptq["method"] == "gptq" and gptq["method_skipped"] == ""
    assert gptq["test_loss"] <= rtn["test_loss"]
    assert rows["method=rotate+gptq"]["test_loss"] <= rtn["test_loss"]
    assert gptq["bits_per_weight"] == rtn["bits_per_weight"]
    assert "| method |" in got["table"] and "rotate+gptq" in got["table"]
    header = (tmp_path / "r" / "results.csv").read_text().splitlines()[0].split(",")
    assert header[8:12] == ["act", "method", "method_skipped", "method_note"]


@pytest.mark.slow
def test_transforms_keep_the_function_and_record_skips():
    # awq (scales online, clip search), smoothquant (int8 activations, online scales) and
    # rotate+smoothquant (smoothing refused after an online rotation: listed per layer).
    cfg = _cfg(
        methods=["awq"],
        also=[
            {
                "formats": ["int8"],
                "activations": ["int8"],
                "methods": ["rtn", "smoothquant", "rotate+smoothquant"],
            }
        ],
    )
    ev = R.Evaluator(cfg)
    out = {c.id.partition("/ptq")[2]: ev(c) for c in G.expand(cfg) if c.format != "float32"}
    fl = out["/method=awq"]["float_loss"]
    assert out["/method=awq"]["test_loss"] < fl + 0.1
    # Measured: float 0.329, w8a8 static ranges 0.333, smoothquant static ranges 0.328.
    sq = out["/act=int8/method=smoothquant"]
    # static activation ranges calibrated on the transformed inputs (jq.flax.calibrate)
    assert sq["test_loss"] < fl + 0.05 and sq["method_note"] == ""
    skips = out["/act=int8/method=rotate+smoothquant"]["method_skipped"]
    assert "smoothquant Dense_0:" in skips and "smooth before rotating" in skips


def test_stochastic_gptq_cell_is_an_error_row_not_rtn(tmp_path):
    cfg = _cfg(formats=["int3"], roundings=["stochastic"], methods=["gptq"])
    ev = R.Evaluator.__new__(R.Evaluator)  # no training: the check comes first
    ev.float = {}
    cell = G.expand(cfg)[0]
    fl = R.Float(net=type("N", (), {"is_nnx": False})(), params=None, rest={}, metrics={})
    with pytest.raises(ValueError, match="GPTQ rounds to nearest"):
        ev._method_cell(cell, fl, None)
