"""``jaxquant sweep --config`` on published models (issue 12 item 8): flax's ImageNet
ResNet (Conv + BatchNorm, a list attribute, ``train=False``, ``batch_stats``), an NNX
transformer (lm1b_nnx), Hugging Face's GPT-2 returning a structure (``.logits`` through
``task.output``), modules found in the current directory and next to the config, and the
TOML format documented in ``--help`` and the README.

The models come from ``third_party_models`` (tiny sizes, random init); each sweep is a
handful of cells with a few training steps.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxquant.app.cli import main
from jaxquant.app.sweep import config as C
from jaxquant.app.sweep import grid as G
from jaxquant.app.sweep import run as R

REPO = Path(__file__).resolve().parents[1]

# The task module of these tests: model factories, data and an output adapter.
MODELS = '''
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import third_party_models as tp


def _resnet():
    return tp.ResNet(stage_sizes=[1, 1], block_cls=tp.ResNetBlock, num_classes=4, num_filters=8)


# One jitted init for every call (a fresh jax.jit per call traces and compiles it again).
_resnet_init = jax.jit(
    lambda k: _resnet().init(k, jnp.zeros((1, 16, 16, 3), jnp.float32), train=False)
)


def resnet(seed):
    """flax's ImageNet ResNet as the published ResNet18 builds it: stage_sizes a list
    (an unhashable Linen attribute); returns (module, variables) with batch_stats."""
    with tp.lenient():
        variables = _resnet_init(jax.random.key(seed))
    return _resnet(), variables  # a new module each call, as a factory builds it


def images(n=192):
    """Four classes of 16x16 colour images: a class's own colour plus noise."""
    rng = np.random.default_rng(0)
    colours = rng.normal(size=(4, 1, 1, 3)).astype(np.float32) * 2
    y = rng.integers(0, 4, n).astype(np.int32)
    x = (colours[y] + rng.normal(size=(n, 16, 16, 3))).astype(np.float32)
    k = n * 3 // 4
    return {"x_train": x[:k], "y_train": y[:k], "x_test": x[k:], "y_test": y[k:]}


_LM_CONFIG = tp.TransformerConfig(
    vocab_size=64, output_vocab_size=64, logits_via_embedding=True, emb_dim=32,
    num_heads=2, num_layers=1, qkv_dim=32, mlp_dim=64, max_len=16,
)
# One compiled constructor for every seed (the seed's key an argument, not a constant).
_lm_new = nnx.jit(lambda key: tp.TransformerLM(_LM_CONFIG, rngs=nnx.Rngs(params=key)))


def lm(seed):
    """lm1b_nnx's TransformerLM (an nnx.Module), weights from the seed, in eval mode."""
    model = _lm_new(jax.random.key(seed))
    model.eval()
    return model


def tokens(n=48):
    """Token windows of a repeating sequence; the label of a position is its own token
    (the decoder shifts its inputs right: position t predicts token t)."""
    rng = np.random.default_rng(1)
    start = rng.integers(0, 60, n)
    x = (1 + (start[:, None] + np.arange(12)[None]) % 63).astype(np.int32)
    return {"x_train": x[:32], "y_train": x[:32], "x_test": x[32:], "y_test": x[32:]}


def gpt2():
    """transformers' FlaxGPT2LMHeadModule (a bare Linen module: the sweep initialises it);
    it returns a FlaxCausalLMOutputWithCrossAttentions."""
    tf = tp._transformers()
    config = tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    with tp.lenient():
        return tf.FlaxGPT2LMHeadModel(config, _do_init=False).module


def windows(n=64):
    """Keyword inputs (a dict of arrays) over windows of a repeating token sequence; the
    label of a position is the next token."""
    rng = np.random.default_rng(2)
    start = rng.integers(0, 60, n)
    seq = (1 + (start[:, None] + 3 * np.arange(9)[None]) % 63).astype(np.int32)
    ids, y = seq[:, :8], seq[:, 1:]
    x = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "position_ids": np.broadcast_to(np.arange(8, dtype=np.int32), ids.shape).copy(),
    }
    half = n // 2
    split = lambda d, s: {k: v[s] for k, v in d.items()}
    return {"x_train": split(x, slice(0, half)), "y_train": y[:half],
            "x_test": split(x, slice(half, n)), "y_test": y[half:]}


def logits(out):
    return out.logits


def mean_token_accuracy(logits, labels):
    return jnp.mean(jnp.argmax(logits, -1) == labels)
'''

GRID = """
[grid]
formats = {formats}
granularities = ["channel"]
calibrations = ["absmax"]
roundings = ["nearest"]
modes = ["ptq", "qat"]
{grid_extra}
[qat]
formats = ["int8"]
granularities = ["channel"]
steps = 4
lr = 0.0005
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The module ``sweep_cfg_models`` on sys.path for this file's tests."""
    folder = tmp_path_factory.mktemp("cfgmods")
    (folder / "sweep_cfg_models.py").write_text(MODELS)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop("sweep_cfg_models", None)


def write(
    path: Path,
    task: str,
    grid_extra: str = "",
    seeds: str = "[0]",
    formats: str = '["float32", "int8", "int4"]',
) -> Path:
    path.write_text(
        f"seeds = {seeds}\n[task]\n"
        + textwrap.dedent(task)
        + GRID.format(formats=formats, grid_extra=textwrap.dedent(grid_extra))
    )
    return path


def sweep(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["sweep", "--no-progress", "--no-plots", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def rows_by(out: Path) -> dict[tuple, dict]:
    rows = R.read_rows(out / "results.jsonl")
    return {(r["format"], r["mode"], r.get("act", "none")): r for r in rows}


RESNET = """
name = "resnet"
model = "sweep_cfg_models:resnet"
data = "sweep_cfg_models:images"
call_kwargs = { train = false }
train_kwargs = { train = true }
axis_name = "batch"
steps = 30
lr = 0.01
batch = 32
eval_batch = 24
"""


@pytest.mark.slow
def test_resnet_batchnorm_train_flag_and_list_attribute(models, tmp_path, capsys, evaluators):
    """The published ResNet: list stage_sizes, every collection (batch_stats), train=False
    to evaluate, train=True (under vmap with axis "batch") to train; PTQ, static int8
    activations and QAT. A second run resumes; a changed config is refused."""
    acts = 'activations = ["none", "int8"]'
    toml = write(tmp_path / "resnet.toml", RESNET, grid_extra=acts, formats='["float32", "int8"]')
    cfg = C.load(toml)
    out = tmp_path / "run"
    code, text, err = sweep(capsys, "--config", str(toml), "--out", str(out))
    assert code == 0, text + err
    rows = rows_by(out)
    assert len(rows) == len(G.expand(cfg)) == 5 and all(r["status"] == "ok" for r in rows.values())
    f32 = rows["float32", "ptq", "none"]
    assert f32["test_acc"] == f32["float_acc"] > 60.0  # it learned the colours (chance: 25)
    int8 = rows["int8", "ptq", "none"]
    assert 8.0 < int8["bits_per_weight"] < 9.0 and int8["weight_sqnr_db"] > 35.0
    assert abs(int8["test_loss"] - f32["test_loss"]) < 0.05
    assert rows["int8", "ptq", "int8"]["test_loss"] != int8["test_loss"]  # activations too
    assert int8["model_bytes"] < 0.3 * f32["model_bytes"]  # the BatchNorms' params too
    assert "ptq_acc" in rows["int8", "qat", "none"]
    # Float training ran in training mode: the BatchNorm statistics moved.
    [ev] = evaluators  # the sweep's own, with the float model it trained
    assert ev.cfg == cfg
    fl = ev.float_model(0)
    import sweep_cfg_models

    start = sweep_cfg_models.resnet(0)[1]["batch_stats"]
    moved = jax.tree.map(
        lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
        fl.rest["batch_stats"],
        start,
    )
    assert max(jax.tree.leaves(moved)) > 1e-3
    # Seven kernels: conv_init, two convs per block, conv_proj, the Dense head.
    assert len(ev.tasks.kernels(fl.params)) == 7
    # Saved results are never overwritten: the same config resumes, another is refused.
    before = (out / "results.jsonl").read_bytes()
    code, text, _ = sweep(capsys, "--config", str(toml), "--out", str(out))
    assert code == 0 and "(0 run, 5 already done, 0 failed)" in text
    assert (out / "results.jsonl").read_bytes() == before
    other = write(
        tmp_path / "other.toml",
        RESNET.replace("eval_batch = 24", "eval_batch = 48"),
        grid_extra=acts,
        formats='["float32", "int8"]',
    )
    code, _, err = sweep(capsys, "--config", str(other), "--out", str(out))
    assert code == 2 and "another config" in err
    assert (out / "results.jsonl").read_bytes() == before


@pytest.mark.slow
def test_resnet_without_call_kwargs_says_what_to_set(models, tmp_path, capsys):
    """Called with its default train=True, the ResNet would update batch_stats in an
    evaluation call: every cell fails with the key to set."""
    task = RESNET.replace("call_kwargs = { train = false }\n", "").replace("train_kwargs", "#")
    toml = write(tmp_path / "r.toml", task.replace("steps = 30", "epochs = 0"))
    code, _, _ = sweep(capsys, "--config", str(toml), "--out", str(tmp_path / "run"))
    assert code == 1
    rows = R.read_rows(tmp_path / "run" / "results.jsonl")
    assert rows and all(r["status"] == "error" for r in rows)
    fix = "in an evaluation call: set task.call_kwargs, e.g. { train = false }"
    assert all(fix in r["error"] for r in rows), rows[0]["error"]
    # Training in training mode without the axis: the error names task.axis_name.
    task = RESNET.replace('axis_name = "batch"\n', "").replace("steps = 30", "steps = 1")
    toml = write(tmp_path / "r2.toml", task)
    code, _, _ = sweep(capsys, "--config", str(toml), "--out", str(tmp_path / "run2"))
    rows = R.read_rows(tmp_path / "run2" / "results.jsonl")
    assert code == 1 and rows
    assert all("in a training call: set task.axis_name" in r["error"] for r in rows)


LM = """
name = "lm1b"
model = "sweep_cfg_models:lm"
data = "sweep_cfg_models:tokens"
metric = "sweep_cfg_models:mean_token_accuracy"
epochs = 0
batch = 16
"""


@pytest.mark.slow
def test_nnx_transformer(models, tmp_path, capsys, evaluators):
    """An NNX model from a factory taking the seed: its nnx.Param kernels (Linear and the
    attention's rank-3 LinearGeneral) are quantized; epochs = 0 evaluates the factory's
    weights as they are; a custom metric fills the accuracy columns."""
    toml = write(tmp_path / "lm.toml", LM, seeds="[0, 1]")
    cfg = C.load(toml)
    out = tmp_path / "run"
    code, text, err = sweep(capsys, "--config", str(toml), "--out", str(out))
    assert code == 0, text + err
    rows = R.read_rows(out / "results.jsonl")
    assert len(rows) == len(G.expand(cfg)) == 8 and all(r["status"] == "ok" for r in rows)
    by = {(r["seed"], r["format"], r["mode"]): r for r in rows}
    # The two seeds are two models (the factory got the seed), untrained by the sweep.
    assert by[0, "float32", "ptq"]["float_loss"] != by[1, "float32", "ptq"]["float_loss"]
    assert 3.0 < by[0, "float32", "ptq"]["float_loss"] < 6.0  # ~log(64) = 4.16: random init
    for seed in (0, 1):
        f32, int8 = by[seed, "float32", "ptq"], by[seed, "int8", "ptq"]
        assert 0.0 <= f32["test_acc"] <= 1.0  # the metric is a fraction, not a percentage
        assert f32["test_acc"] == f32["float_acc"]
        assert abs(int8["test_loss"] - f32["test_loss"]) < 0.01
        assert 8.0 < int8["bits_per_weight"] < 9.0
        qat = by[seed, "int8", "qat"]
        assert qat["test_loss"] < qat["float_loss"]  # 4 QAT steps already lower the loss
    [ev] = evaluators  # the sweep's own
    assert ev.cfg == cfg
    shapes = ev.tasks.kernels(ev.float_model(0).params)
    assert sorted(shapes) == sorted(
        f"decoder/encoderdecoderblock_0/{p}"
        for p in (
            *("attention/query", "attention/key", "attention/value", "attention/out"),
            *("mlp/linear1", "mlp/linear2"),
        )
    )
    assert shapes["decoder/encoderdecoderblock_0/attention/query"] == (32, 2, 16)


GPT2 = """
name = "gpt2"
model = "sweep_cfg_models:gpt2"
data = "sweep_cfg_models:windows"
call_kwargs = { deterministic = true }
output = "sweep_cfg_models:logits"
steps = 30
lr = 0.01
batch = 16
"""


@pytest.mark.slow
def test_model_returning_a_structure_with_an_output_adapter(models, tmp_path, capsys):
    """transformers' Flax GPT-2 returns a FlaxCausalLMOutputWithCrossAttentions;
    task.output picks .logits. Inputs are a dict of arrays (keyword arguments); the bare
    Linen module is initialised by the sweep with call_kwargs. QAT too: its FlaxConv1D
    projections compute their own lax.dot_general, which the interception quantizes."""
    toml = write(tmp_path / "gpt2.toml", GPT2)
    out = tmp_path / "run"
    code, text, err = sweep(capsys, "--config", str(toml), "--out", str(out))
    assert code == 0, text + err
    rows = rows_by(out)
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows.values()), rows
    qat8 = rows["int8", "qat", "none"]
    assert abs(qat8["test_loss"] - qat8["float_loss"]) < 0.1
    f32, int8 = rows["float32", "ptq", "none"], rows["int8", "ptq", "none"]
    assert f32["float_loss"] < 0.5 * float(np.log(64.0))  # trained: well below uniform
    assert abs(int8["test_loss"] - f32["test_loss"]) < 0.05
    assert 8.0 < int8["bits_per_weight"] < 9.0  # the 4 FlaxConv1D kernels of the layer
    assert rows["int4", "ptq", "none"]["test_loss"] != int8["test_loss"]
    # Without the adapter every cell fails, saying which key to set.
    bad = write(tmp_path / "bad.toml", GPT2.replace('output = "sweep_cfg_models:logits"\n', ""))
    bad.write_text(bad.read_text().replace('modes = ["ptq", "qat"]', 'modes = ["ptq"]'))
    code, text, _ = sweep(capsys, "--config", str(bad), "--out", str(tmp_path / "bad"))
    assert code == 1
    errors = [r["error"] for r in R.read_rows(tmp_path / "bad" / "results.jsonl")]
    assert errors and all("set task.output" in e and "FlaxCausalLMOutput" in e for e in errors)


# The runner of the current-directory test: like the installed `jaxquant` script, its
# sys.path starts with its own folder, not the current directory.
RUNNER = """
import sys
from jaxquant.app.cli import main
sys.exit(main(sys.argv[1:]))
"""

HERE_MODULE = """
import flax.linen as nn
import numpy as np


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))
"""

NEXT_TO_CONFIG = """
import numpy as np


def data(n=120):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, n).astype(np.int32)
    x = (np.eye(3, 6, dtype=np.float32)[y] * 3 + rng.normal(size=(n, 6))).astype(np.float32)
    return {"x_train": x[:80], "y_train": y[:80], "x_test": x[80:], "y_test": y[80:]}
"""


@pytest.mark.slow  # a fresh Python process importing jax: ~5 s
def test_modules_in_the_current_directory_and_next_to_the_config(tmp_path, capsys, monkeypatch):
    """`jaxquant sweep --config ../conf/x.toml` run from a project folder: the model's module
    sits in the current directory, the data's next to the config; no PYTHONPATH names
    either (it names only where jaxquant itself is, as an installed package would be)."""
    project, conf, bin_ = tmp_path / "project", tmp_path / "conf", tmp_path / "bin"
    for d in (project, conf, bin_):
        d.mkdir()
    (project / "here_model_mod.py").write_text(HERE_MODULE)
    (conf / "beside_data_mod.py").write_text(NEXT_TO_CONFIG)
    (bin_ / "jaxquant_cli.py").write_text(RUNNER)
    (conf / "x.toml").write_text(
        textwrap.dedent(
            """
            seeds = [0]
            [task]
            name = "here"
            model = "here_model_mod:Tiny"
            data = "beside_data_mod:data"
            epochs = 2
            lr = 0.01
            batch = 16
            [grid]
            formats = ["float32", "int8"]
            granularities = ["channel"]
            calibrations = ["absmax"]
            roundings = ["nearest"]
            modes = ["ptq"]
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(REPO)  # jaxquant itself (the install here is not importable)
    argv = [sys.executable, str(bin_ / "jaxquant_cli.py"), "sweep", "--no-progress"]
    argv += ["--no-plots", "--config", "../conf/x.toml", "--out", "run"]
    done = subprocess.run(argv, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = R.read_rows(project / "run" / "results.jsonl")
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    # The same run with the model's module nowhere to be found names the key and the
    # module. In this process (no second interpreter importing jax): the folders the
    # sweep puts on sys.path are the same, and the module was never imported here.
    (project / "here_model_mod.py").rename(tmp_path / "moved.py")
    monkeypatch.chdir(project)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the sweep adds the two folders
    code, _, err = sweep(capsys, "--config", "../conf/x.toml", "--out", "run2")
    assert code == 2 and "here_model_mod" not in sys.modules
    assert "task.model = 'here_model_mod:Tiny' cannot be imported" in err
    assert not (project / "run2").exists()


def test_importable_puts_folders_first_once(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", ["", "/usr/lib/python3"])
    monkeypatch.chdir(tmp_path)
    C.importable(os.getcwd(), tmp_path / "conf")
    # "" already is the current directory: only the config's folder is added, first.
    assert sys.path == [str(tmp_path / "conf"), "", "/usr/lib/python3"]
    C.importable(tmp_path / "conf")
    assert sys.path.count(str(tmp_path / "conf")) == 1


@pytest.mark.slow
def test_model_factory_errors_name_the_key(models, tmp_path, capsys, monkeypatch):
    import sweep_cfg_models as mod

    monkeypatch.setattr(mod, "not_a_model", lambda: 3, raising=False)
    monkeypatch.setattr(mod, "no_params", lambda: (mod.gpt2(), {"batch_stats": {}}), raising=False)
    for model, needle in [
        ("not_a_model", "task.model 'sweep_cfg_models:not_a_model' returned int; it must"),
        ("no_params", "the variables have no 'params' collection"),
        ("lm", "task.model_kwargs sets 'seed', which the sweep passes itself"),
    ]:
        kwargs = "model_kwargs = { seed = 3 }\n" if model == "lm" else ""
        task = LM.replace('"sweep_cfg_models:lm"', f'"sweep_cfg_models:{model}"') + kwargs
        out = tmp_path / model
        code, _, _ = sweep(
            capsys, "--config", str(write(tmp_path / "e.toml", task)), "--out", str(out)
        )
        assert code == 1
        errors = [r["error"] for r in R.read_rows(out / "results.jsonl")]
        assert errors and all(needle in e for e in errors), errors[0]


def test_every_key_is_documented_in_help_and_readme(capsys):
    assert main(["sweep", "--help"]) == 0
    help_text = capsys.readouterr().out
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Sweeps on your own model") :]
    section = section[: section.index("\n## ", 3)]
    for table, keys in C._SCHEMA.items():
        names = [table] if not isinstance(keys, dict) else [table, *keys]
        for name in names:
            assert f"{name} =" in help_text or f"[{name}]" in help_text, name
    for key in ("call_kwargs", "train_kwargs", "axis_name", "output", "loss", "metric"):
        assert key in section, key
    # The README's example file is a valid config (its modules aside).
    example = section[
        section.index("```toml") + 7 : section.index("```", section.index("```toml") + 7)
    ]
    raw = tomllib.loads(example)
    C._check_schema(raw, C._SCHEMA)
