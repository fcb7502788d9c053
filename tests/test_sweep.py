"""``jaxquant sweep``: end to end, resume, shards + merge, failing cells, config errors,
custom tasks by import path."""

from __future__ import annotations

import csv
import json
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxquant.app.cli import main
from jaxquant.app.models import ByteLM
from jaxquant.app.sweep import config as C
from jaxquant.app.sweep import grid as G
from jaxquant.app.sweep import run as R

TINY_MODULE = """
import flax.linen as nn
import numpy as np


class Tiny(nn.Module):
    features: tuple = (16,)

    @nn.compact
    def __call__(self, x):
        for f in self.features:
            x = nn.relu(nn.Dense(f)(x))
        return nn.Dense(3)(x)


def data(n=240):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 8)).astype(np.float32) * 3
    y = rng.integers(0, 3, n).astype(np.int32)
    x = (centers[y] + rng.normal(size=(n, 8))).astype(np.float32)
    k = n * 2 // 3
    return {"x_train": x[:k], "y_train": y[:k], "x_test": x[k:], "y_test": y[k:]}
"""


def tiny_toml(
    tmp_path: Path,
    *,
    granularities=("tensor", "channel"),
    extra: str = "",
    task_extra: str = "",
    grid_extra: str = "",
    seeds: str = "[0]",
) -> Path:
    """A custom task (model and data by import path) with a small grid; one seed (sweeps
    over several seeds: test_sweep_multihost's in-process run, test_sweep_config's NNX)."""
    path = tmp_path / "tiny.toml"
    grans = ", ".join(f'"{g}"' for g in granularities)
    path.write_text(
        textwrap.dedent(
            f"""
            seeds = {seeds}
            [task]
            name = "tiny"
            model = "sweep_tiny_task:Tiny"
            model_kwargs = {{ features = [16] }}
            data = "sweep_tiny_task:data"
            epochs = 3
            lr = 0.01
            batch = 32
            {task_extra}
            [grid]
            formats = ["float32", "int8", "int4", "ternary"]
            granularities = [{grans}]
            calibrations = ["absmax"]
            roundings = ["nearest"]
            modes = ["ptq", "qat"]
            {grid_extra}
            [qat]
            formats = ["int4"]
            granularities = ["channel"]
            steps = 5
            lr = 0.001
            """
        )
        + extra
    )
    return path


@pytest.fixture(scope="module")
def tiny_module(tmp_path_factory):
    """A module ``sweep_tiny_task`` on sys.path (kept for the module: the jitted trainers
    of its model are reused across tests)."""
    mod_dir = tmp_path_factory.mktemp("mods")
    (mod_dir / "sweep_tiny_task.py").write_text(TINY_MODULE)
    sys.path.insert(0, str(mod_dir))
    yield
    sys.path.remove(str(mod_dir))
    sys.modules.pop("sweep_tiny_task", None)


@pytest.fixture
def tiny(tmp_path, tiny_module):
    return tmp_path


def sweep(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["sweep", "--no-progress", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def ids(folder: Path) -> list[str]:
    return [r["id"] for r in R.read_rows(folder / "results.jsonl")]


@pytest.mark.slow
def test_quick_digits_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ("--preset", "digits-mlp", "--quick", "--out", str(out), "--shard", "0/1")
    code, text, err = sweep(capsys, *argv)
    assert code == 0, err
    cfg = C.resolve(preset="digits-mlp", quick=True)
    cells = G.expand(cfg)
    rows = R.read_rows(out / "results.jsonl")
    assert sorted(r["id"] for r in rows) == sorted(c.id for c in cells)
    assert all(r["status"] == "ok" for r in rows)
    assert {"ptq", "qat"} == {r["mode"] for r in rows}
    by = {(r["format"], r["granularity"], r["mode"]): r for r in rows}
    f32 = by["float32", "tensor", "ptq"]
    assert f32["test_acc"] == f32["float_acc"] > 80.0  # the float model learned the digits
    assert f32["weight_sqnr_db"] == float("inf")
    int8 = by["int8", "channel", "ptq"]
    assert 8.0 < int8["bits_per_weight"] < 9.0 and int8["weight_sqnr_db"] > 35.0
    assert abs(int8["test_acc"] - int8["float_acc"]) <= 2.0
    assert by["int4", "channel", "ptq"]["model_bytes"] < int8["model_bytes"]
    assert "ptq_acc" in by["int4", "channel", "qat"]
    # env, csv, summary, plots
    env = json.loads((out / "env.json").read_text())
    for k in ("versions", "backend", "device", "git", "config_hash", "seeds", "shard"):
        assert k in env
    assert env["config_hash"] == C.config_hash(cfg) == rows[0]["config_hash"]
    assert C.config_hash(C.load(out / "config.toml")) == env["config_hash"]
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(cells)
    for name in ("accuracy_vs_bits", "sqnr_vs_bits", "size_vs_accuracy"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert "| int4 | none | channel |" in text and (out / "summary.md").read_text().strip() in text
    assert not list(out.rglob("*.tmp*"))


@pytest.mark.slow
def test_resume_skips_finished_cells(tiny, capsys):
    toml = tiny_toml(tiny)
    out = tiny / "run"
    cells = G.expand(C.load(toml))
    assert sweep(capsys, "--config", str(toml), "--out", str(out), "--no-plots")[0] == 0
    assert len(ids(out)) == len(cells)
    # Simulate an interruption: drop the last two rows and tear the line before them.
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:-3]) + "\n" + lines[-3][:20])
    code, text, _ = sweep(capsys, "--config", str(toml), "--out", str(out), "--no-plots")
    assert code == 0
    assert f"(3 run, {len(cells) - 3} already done, 0 failed)" in text
    assert sorted(set(ids(out))) == sorted(c.id for c in cells)
    code, text, _ = sweep(capsys, "--config", str(toml), "--out", str(out), "--no-plots")
    assert f"(0 run, {len(cells)} already done" in text


@pytest.mark.slow
def test_resume_refuses_another_config(tiny, capsys):
    out = tiny / "run"
    assert sweep(capsys, "--config", str(tiny_toml(tiny)), "--out", str(out), "--no-plots")[0] == 0
    other = tiny_toml(tiny, granularities=("tensor",))
    code, _, err = sweep(capsys, "--config", str(other), "--out", str(out))
    assert code == 2 and "another config" in err and err.count("\n") == 1


@pytest.mark.slow
def test_shards_merge_to_the_full_sweep(tiny, capsys):
    toml = tiny_toml(tiny)
    cells = G.expand(C.load(toml))
    for i in range(2):
        code, _, _ = sweep(
            capsys,
            "--config",
            str(toml),
            "--out",
            str(tiny / f"s{i}"),
            "--shard",
            f"{i}/2",
            "--no-plots",
        )
        assert code == 0
    s0, s1 = ids(tiny / "s0"), ids(tiny / "s1")
    assert s0 and s1 and not set(s0) & set(s1)
    code, text, _ = sweep(
        capsys, "--merge", str(tiny / "s0"), str(tiny / "s1"), "--out", str(tiny / "all")
    )
    assert code == 0 and "0 missing" in text
    assert sorted(ids(tiny / "all")) == sorted(c.id for c in cells)
    assert (tiny / "all" / "plots" / "accuracy_vs_bits.png").exists()
    # an incomplete merge says so
    code, text, _ = sweep(
        capsys, "--merge", str(tiny / "s0"), "--out", str(tiny / "half"), "--no-plots"
    )
    assert code == 1 and f"{len(s1)} missing" in text


@pytest.mark.slow
def test_failing_cell_is_recorded_and_sweep_goes_on(tiny, capsys):
    # block7 does not divide the 8 inputs of Dense_0: those cells raise.
    toml = tiny_toml(tiny, granularities=("block7", "channel"))
    out = tiny / "run"
    code, text, _ = sweep(capsys, "--config", str(toml), "--out", str(out), "--no-plots")
    assert code == 1
    rows = R.latest(R.read_rows(out / "results.jsonl"))
    bad = [r for r in rows.values() if r["status"] == "error"]
    good = [r for r in rows.values() if r["status"] == "ok"]
    assert bad and all(r["granularity"] == "block7" for r in bad)
    assert all("does not divide" in r["error"] for r in bad)
    assert any(r["granularity"] == "channel" and r["format"] == "int4" for r in good)
    assert "failed" in text and "does not divide" in text


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ('[grid]\nformats = ["int8", "int4", "int9"]', "grid.formats[2] = 'int9' is not a format"),
        ('[grid]\nformatz = ["int8"]', "grid.formatz is not a known key"),
        ('[grid]\ngranularities = ["row"]', "grid.granularities[0] = 'row'"),
        ('[grid]\ncalibrations = ["percentile:200"]', "grid.calibrations[0]"),
        ('[grid]\nroundings = ["up"]', "grid.roundings[0] = 'up' is not a rounding"),
        ("[grid]\nmodes = []", "grid.modes is empty"),
        ("seeds = [0, -1]", "seeds[1] = -1"),
        ('seeds = "0"', "seeds = '0' must be a list"),
        ("[task]\nepochs = -1", "task.epochs = -1 must be in [0, 2147483647]"),
        ('[task]\nloss = "no_such_module_xyz:f"', "task.loss = 'no_such_module_xyz:f' cannot"),
        ('[task]\noutput = "math:pi"', "task.output = 'math:pi' is not callable"),
        ('[task]\nmetric = "math"', "task.metric = 'math' must be an import path"),
        ("[task]\ncall_kwargs = true", "task.call_kwargs = True must be a table"),
        ("[task]\neval_batch = 0", "task.eval_batch = 0 must be in [1, 2147483647]"),
        ('[task]\naxis_name = ""', "task.axis_name is empty"),
        ('[task]\nmodel = "no_such_module_xyz:M"', "task.model = 'no_such_module_xyz:M' cannot"),
        ('[task]\ndata = "json"', "task.data = 'json' must be an import path"),
        ('preset = "digits-rnn"', "preset = 'digits-rnn' is not a preset"),
        ("[qat]\nsteps = 1.5", "qat.steps = 1.5 must be an integer"),
        ("[grid", "is not valid TOML"),
        ('[task]\nlayers = "Dense_(0"', "task.layers = 'Dense_(0' is not a regular expression"),
        ("[task]\nsteps = -1", "task.steps = -1 must be in [0, 2147483647]"),
        ('[grid]\nactivations = ["mxfp4"]', "grid.activations[0] = 'mxfp4' is not an activation"),
        ('[qat]\nactivations = ["int8", "int8"]', "qat.activations[1] = 'int8' is repeated"),
        ("[task]\ndata_kwargs = 3", "task.data_kwargs = 3 must be a table"),
    ],
)
def test_bad_config_names_the_key(tmp_path, capsys, toml, needle):
    path = tmp_path / "bad.toml"
    path.write_text(toml + "\n")
    with pytest.raises(C.ConfigError, match=r"^sweep config: "):
        C.load(path)
    code, out, err = sweep(capsys, "--config", str(path), "--out", str(tmp_path / "never"))
    assert code == 2 and out == ""
    assert err.startswith("jaxquant: error: sweep config:") and err.count("\n") == 1
    assert needle in err
    assert not (tmp_path / "never").exists()  # validated before anything runs


def test_bad_shard_is_a_usage_error(capsys):
    assert main(["sweep", "--shard", "2/2"]) == 2
    assert "not a shard" in capsys.readouterr().err


def test_grid_is_canonical_and_shards_partition():
    cfg = C.resolve()
    cells = G.expand(cfg)
    assert len({c.id for c in cells}) == len(cells)
    casts = [c for c in cells if c.format in ("float32", "fp16", "bf16")]
    assert {(c.granularity, c.calibration) for c in casts} == {("tensor", "none")}
    assert {c.granularity for c in cells if c.format == "mxfp4"} == {"block32"}
    parts = [G.shard(cells, i, 3) for i in range(3)]
    assert sorted(c.id for p in parts for c in p) == sorted(c.id for c in cells)
    qat = [c for c in cells if c.mode == "qat"]
    assert len(qat) == len(cfg["seeds"]) * len(cfg["qat"]["formats"])


def test_config_toml_round_trip(tmp_path):
    cfg = C.resolve(preset="digits-cnn")
    path = tmp_path / "c.toml"
    path.write_text(C.to_toml(cfg))
    assert C.load(path) == cfg


@pytest.mark.slow
def test_interrupt_keeps_finished_rows(tiny, capsys, monkeypatch):
    toml = tiny_toml(tiny)
    out = tiny / "run"
    cells = G.expand(C.load(toml))
    real = R.Evaluator.__call__
    calls = []

    def flaky(self, cell):
        calls.append(cell.id)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, cell)

    monkeypatch.setattr(R.Evaluator, "__call__", flaky)
    code, _, err = sweep(capsys, "--no-plots", "--config", str(toml), "--out", str(out))
    assert code == 130 and err.count("\n") == 1  # one line: what was kept, how to resume
    assert f"kept 3 of {len(cells)} finished cells in {out}" in err
    assert ids(out) == [c.id for c in cells[:3]]
    with open(out / "results.csv") as f:  # the csv of what finished was written on the way out
        assert [r["id"] for r in csv.DictReader(f)] == ids(out)
    monkeypatch.setattr(R.Evaluator, "__call__", real)
    code, text, _ = sweep(capsys, "--config", str(toml), "--out", str(out), "--no-plots")
    assert code == 0 and f"({len(cells) - 3} run, 3 already done, 0 failed)" in text


@pytest.mark.slow
def test_quick_lm_end_to_end(tmp_path, capsys):
    """The byte-level transformer preset: per-position labels, only the blocks quantized."""
    out = tmp_path / "lm"
    # Not CI's main job (the default preset's --quick): its grid, a third of the QAT steps.
    toml = tmp_path / "lm.toml"
    toml.write_text('preset = "stdlib-lm"\n[qat]\nsteps = 10\n')
    # No plots: test_sweep_default draws this task's rows (its labels), test_quick_digits
    # a whole sweep's.
    argv = ("--config", str(toml), "--quick", "--no-plots", "--out", str(out))
    code, text, err = sweep(capsys, *argv)
    assert code == 0, err
    cfg = C.load(toml, quick=True)
    assert cfg["qat"]["steps"] == 10 and cfg["task"]["steps"] == C.QUICK_TASK["stdlib-lm"]["steps"]
    rows = {(r["format"], r["mode"]): r for r in R.read_rows(out / "results.jsonl")}
    assert len(rows) == len(G.expand(cfg)) and all(r["status"] == "ok" for r in rows.values())
    f32 = rows["float32", "ptq"]
    # The float model learned something: below the uniform byte's log(256) = 5.55 nats.
    assert f32["test_loss"] == f32["float_loss"] < 4.6
    assert f32["test_acc"] == f32["float_acc"] > 10.0
    int8 = rows["int8", "ptq"]
    assert abs(int8["test_loss"] - f32["test_loss"]) < 0.02
    assert rows["ternary", "ptq"]["test_loss"] > int8["test_loss"]
    qat = rows["int4", "qat"]
    assert qat["test_loss"] < 5.0 and "ptq_acc" in qat
    # Only the 6 Linear layers inside each block are quantized: the head and embedding stay
    # float32, so int8 saves 3 of 4 bytes of the blocks' weights, less a float32 scale per
    # output channel (the float32 cell may hold one scale per kernel).
    m = cfg["task"]["model_kwargs"]
    d, h, n = m["d"], m["hidden"], m["layers"]
    block_w, channels = n * (4 * d * d + 2 * d * h), n * (5 * d + h)
    saved = f32["model_bytes"] - int8["model_bytes"]
    assert 0 <= saved - (3 * block_w - 4 * channels) <= 4 * 6 * n
    assert "| stdlib-lm | qat | int4 |" in text


@pytest.mark.slow
def test_lm_data_and_model_shapes():
    from jaxquant.app.datasets import stdlib_bytes
    from jaxquant.app.sweep import tasks

    d = stdlib_bytes(seq=16, test_windows=4, max_files=20)
    assert d["x_train"].shape[1:] == d["y_train"].shape[1:] == (16,)
    assert (d["x_train"][:, 1:] == d["y_train"][:, :-1]).all()  # targets: the next byte
    assert (d["x_train"][1:, 0] == d["y_train"][:-1, -1]).all()  # windows tile the bytes
    model = ByteLM(seq=16, d=16, layers=2, heads=2, hidden=32)

    # Jitted: an eager Flax init compiles op by op.
    params = jax.jit(model.init)(jax.random.key(0), d["x_test"][:1])["params"]
    assert sorted(tasks.kernels(params, "block.*")) == sorted(
        f"block{i}/{n}"
        for i in range(2)
        for n in ("attn/q", "attn/k", "attn/v", "attn/o", "fc1", "fc2")
    )
    assert "head" in tasks.kernels(params)
    with pytest.raises(ValueError, match="exceed seq=16"):
        jax.jit(model.apply)({"params": params}, np.zeros((1, 17), np.int32))


@pytest.mark.slow
def test_task_layers_steps_and_data_kwargs(tiny, capsys):
    toml = tiny_toml(
        tiny,
        task_extra='layers = "Dense_1"\nsteps = 7\ndata_kwargs = { n = 300 }',
    )
    cfg = C.load(toml)
    assert cfg["task"]["layers"] == "Dense_1" and cfg["task"]["data_kwargs"] == {"n": 300}
    out = tiny / "run"
    assert sweep(capsys, "--config", str(toml), "--out", str(out), "--no-plots")[0] == 0
    rows = {(r["format"], r["granularity"]): r for r in R.read_rows(out / "results.jsonl")}
    # Only Dense_1 (16 x 3) is quantized: per tensor, int8 saves 3/4 of its 192 bytes (one
    # float32 scale each); per channel, less the two more scales.
    f32 = rows["float32", "tensor"]["model_bytes"]
    assert f32 - rows["int8", "tensor"]["model_bytes"] == 144
    assert f32 - rows["int8", "channel"]["model_bytes"] == 144 - 2 * 4
    ev = R.Evaluator(cfg)
    assert ev.yt.shape[0] == 100  # data_kwargs reached the data function
    from jaxquant.app.sweep.tasks import train_steps

    assert train_steps(cfg["task"], 200) == 7  # task.steps wins over epochs ...
    assert train_steps({"epochs": 3, "batch": 32, "steps": 0}, 200) == 3 * 6  # ... when > 0
    # A pattern that matches nothing fails every cell, naming the key.
    bad = tiny / "bad.toml"
    bad.write_text(toml.read_text().replace('layers = "Dense_1"', 'layers = "Conv.*"'))
    code, text, _ = sweep(capsys, "--config", str(bad), "--out", str(tiny / "bad"), "--no-plots")
    assert code == 1 and "task.layers = 'Conv.*' matches no" in text


@pytest.mark.slow
def test_activation_cells(tiny, capsys, evaluators):
    """grid.activations: static ranges calibrated on the weight-quantized model (PTQ);
    qat.activations: per-batch absmax in QAT. Ids of float-activation cells are unchanged."""
    toml = tiny_toml(
        tiny,
        granularities=("channel",),
        grid_extra='activations = ["none", "int8", "int4"]',
        extra='activations = ["none", "int8"]\n',  # lands in [qat]
    )
    cfg = C.load(toml)
    cells = G.expand(cfg)
    assert {c.act for c in cells if c.mode == "ptq"} == {"none", "int8", "int4"}
    assert {c.act for c in cells if c.mode == "qat"} == {"none", "int8"}
    plain = [c for c in cells if c.act == "none"]
    assert all("act=" not in c.id for c in plain)  # the ids of runs before activations
    assert all(c.id.endswith(f"/act={c.act}") for c in cells if c.act != "none")
    out = tiny / "run"
    code, text, _ = sweep(capsys, "--config", str(toml), "--out", str(out), "--no-plots")
    assert code == 0
    all_rows = R.read_rows(out / "results.jsonl")
    assert len(all_rows) == len(cells) and all(r["status"] == "ok" for r in all_rows)
    rows = {(r["format"], r["mode"], r["act"]): r for r in all_rows if r["seed"] == 0}
    for fmt in ("float32", "int8"):
        assert abs(rows[fmt, "ptq", "int8"]["test_acc"] - rows[fmt, "ptq", "none"]["test_acc"]) <= 3
    # int4 activations differ from int8 ones: the activation spec is really applied.
    assert rows["int8", "ptq", "int4"]["test_loss"] != rows["int8", "ptq", "int8"]["test_loss"]
    assert rows["int4", "qat", "int8"]["status"] == "ok"
    with open(out / "results.csv") as f:
        assert {r["act"] for r in csv.DictReader(f)} == {"none", "int8", "int4"}
    assert "| tiny | ptq | int8 | int4 | channel |" in text
    # The PTQ activation model has static (Fixed) ranges, one per quantized layer.
    import jaxquant as jq

    [ev] = evaluators  # the sweep's own, with the float model it trained
    assert ev.cfg == cfg
    fl = ev.float_model(0)
    cell = next(c for c in cells if c.act == "int8" and c.mode == "ptq" and c.format == "int8")
    net, _ = ev._static_act_model(cell, fl, fl.params)
    acts = [r.act for r in net.rules]
    assert len(acts) == 2 and all(isinstance(a.calibration, type(jq.fixed(1.0))) for a in acts)
    assert all(a.format.name == "int8" for a in acts)
