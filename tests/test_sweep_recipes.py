"""``jaxquant sweep``'s training-recipe cells (issue 15, item 8): ``qat.recipes`` (named
recipes with switches, canonical cell ids), ``qat.start = "scratch"`` with its paired float
baseline, the per-step ``"quant"`` key of stochastic rounding, ``qat.keep_float``, the
config errors, and papers/fp4_training/sweep.toml (loaded, not run: it trains for minutes).
"""

from __future__ import annotations

import csv
import math
import textwrap
from pathlib import Path

import pytest

from jaxquant.app.cli import main
from jaxquant.app.sweep import config as C
from jaxquant.app.sweep import grid as G
from jaxquant.app.sweep import recipes as SR
from jaxquant.app.sweep import run as R

REPO = Path(__file__).resolve().parents[1]


def sweep(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["sweep", "--no-progress", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def write(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# ------------------------------------------------------------------ canonical ids


@pytest.mark.parametrize(
    "entry, want",
    [
        ("nvfp4", "nvfp4"),
        # Switches at their default (a list for the default tuple) are dropped.
        ({"recipe": "nvfp4", "hadamard": ["wgrad"], "weight_2d": True}, "nvfp4"),
        ({"recipe": "nvfp4", "hadamard": []}, "nvfp4(hadamard=[])"),
        # random_hadamard changes nothing without a transform: one recipe, one id.
        ({"recipe": "nvfp4", "hadamard": [], "random_hadamard": False}, "nvfp4(hadamard=[])"),
        ({"recipe": "nvfp4", "random_hadamard": False}, "nvfp4(random_hadamard=false)"),
        # The order of the transformed products does not change the recipe.
        ({"recipe": "mxfp4", "hadamard": ["wgrad", "dgrad"]}, "mxfp4"),
        ({"recipe": "mxfp4", "hadamard": ["wgrad", "fwd"]}, "mxfp4(hadamard=[fwd,wgrad])"),
        (
            {"recipe": "mxfp4", "weight_2d": True, "hadamard": ["wgrad"], "hadamard_block": 16},
            "mxfp4(hadamard=[wgrad],hadamard_block=16,weight_2d=true)",
        ),
        ({"recipe": "nvfp4", "hadamard": "wgrad"}, "nvfp4"),  # one product, as the function
        ({"recipe": "w4a16_int4", "group_size": 32}, "w4a16_int4(group_size=32)"),
        ({"recipe": "ternary", "threshold": 0.5}, "ternary(threshold=0.5)"),
        ("float32", "float32"),
        ({"recipe": "bf16"}, "bf16"),
    ],
)
def test_recipe_ids_are_canonical(entry, want):
    assert SR.parse(entry).id == want


def test_equal_ids_are_equal_recipes():
    # The id is a function of the recipe: entries with one id build equal recipes, and
    # the ids of the ablation's recipes are all different.
    import jaxquant as jq

    a = SR.parse({"recipe": "nvfp4", "hadamard": [], "random_hadamard": False})
    assert a.build() == jq.recipes.nvfp4(hadamard=())
    assert SR.parse(a.id.replace("(hadamard=[])", "")).build() == jq.recipes.nvfp4()
    entries = C.load(REPO / "papers" / "fp4_training" / "sweep.toml")["qat"]["recipes"]
    parsed = SR.check(entries)
    assert len({e.id for e in parsed}) == len(parsed) == 8
    assert SR.parse("float32").build() is None
    bf16 = SR.parse("bf16").build()
    assert {s.format.name for s in (bf16.weight, bf16.act, bf16.grad)} == {"bfloat16"}


# ------------------------------------------------------------------- config


def test_recipe_cells_of_the_grid(tmp_path):
    path = write(
        tmp_path,
        """
        preset = "stdlib-lm"
        seeds = [0, 1]
        [grid]
        modes = ["qat"]
        [qat]
        formats = ["int4"]
        recipes = ["nvfp4", { recipe = "nvfp4", hadamard = [] }, "float32"]
        """,
    )
    cells = G.expand(C.load(path))
    assert [c.id for c in cells if c.seed == 0] == [
        "stdlib-lm/0/int4/channel/absmax/nearest/qat",
        "stdlib-lm/0/recipe=nvfp4/qat",
        "stdlib-lm/0/recipe=nvfp4(hadamard=[])/qat",
        "stdlib-lm/0/recipe=float32/qat",
    ]
    rc = cells[1]
    assert (rc.format, rc.granularity, rc.act, rc.mode, rc.recipe) == (
        "nvfp4",
        "-",
        "-",
        "qat",
        "nvfp4",
    )
    # formats = []: the recipe cells alone.
    cfg = C.load(path)
    cfg["qat"]["formats"] = []
    assert all(c.recipe for c in G.expand(C.validate(cfg)))


def test_default_grid_has_no_recipe_cells():
    # The preset (and --quick) grids, which CI runs, keep their cells and ids.
    for quick in (False, True):
        cells = G.expand(C.resolve(quick=quick))
        assert not any(c.recipe or "recipe=" in c.id for c in cells)
        assert "stdlib-lm/0/int4/channel/absmax/nearest/qat" in {c.id for c in cells}
    cfg = C.resolve(quick=True)
    assert "recipes" not in cfg["qat"] and "start" not in cfg["qat"]


def test_config_with_recipes_round_trips(tmp_path):
    cfg = C.load(REPO / "papers" / "fp4_training" / "sweep.toml")
    back = write(tmp_path, C.to_toml(cfg), "config.toml")
    again = C.load(back)
    assert again == cfg and C.config_hash(again) == C.config_hash(cfg)
    assert cfg["qat"]["start"] == "scratch" and cfg["grid"]["modes"] == ["qat"]
    assert [c.recipe for c in G.expand(cfg) if c.seed == 0][:3] == ["float32", "bf16", "nvfp4"]


@pytest.mark.parametrize(
    "qat, needle",
    [
        ('recipes = ["nvfp5"]', "qat.recipes[0] = \"nvfp5\" names no recipe 'nvfp5'; known:"),
        (
            'recipes = ["nvfp4", { recipe = "nvfp4", hadamrd = [] }]',
            'qat.recipes[1] = { recipe = "nvfp4", hadamrd = [] } has an unknown switch '
            "'hadamrd'; nvfp4's switches: weight_2d, hadamard,",
        ),
        (
            'recipes = [{ recipe = "nvfp4", weight_2d = 1 }]',
            'qat.recipes[0] = { recipe = "nvfp4", weight_2d = 1 } is not a valid recipe: '
            "jq.recipes.nvfp4: weight_2d must be True or False",
        ),
        ('recipes = [{ recipe = "nvfp4", hadamard = ["bwd"] }]', "unknown product(s) ['bwd']"),
        ('recipes = [{ recipe = "nvfp4", hadamard_block = 7 }]', "qat.recipes[0]"),
        ("recipes = [{ hadamard = [] }]", 'qat.recipes[0] = { hadamard = [] } has no "recipe" key'),
        ("recipes = [3]", "qat.recipes[0] = 3 must be a recipe name or a table"),
        ("recipes = [{ recipe = 4 }]", "qat.recipes[0].recipe = 4 must be a recipe name"),
        (
            'recipes = ["nvfp4", { recipe = "nvfp4", hadamard = ["wgrad"] }]',
            'qat.recipes[1] = { recipe = "nvfp4", hadamard = ["wgrad"] } is the same recipe '
            "as qat.recipes[0] (nvfp4); remove one",
        ),
        ('recipes = [{ recipe = "float32", x = 1 }]', "float32 takes no switches"),
        ('recipes = [{ recipe = "nvfp4", weight_2d = { a = 1 } }]', "is not a valid recipe"),
        ("recipes = []", "qat.recipes is empty"),
        ('recipes = "nvfp4"', "qat.recipes = 'nvfp4' must be a list"),
        ("formats = []", "qat.formats is empty"),
        ('start = "scratc"', "qat.start = 'scratc' is not a start; known: float, scratch"),
        ('keep_float = ["head("]', "qat.keep_float[0] = 'head(' is not a regular expression"),
        ('keep_float = ["head", "head"]', "qat.keep_float[1] = 'head' is repeated"),
    ],
)
def test_bad_qat_keys_name_the_key(tmp_path, capsys, qat, needle):
    path = write(tmp_path, f'preset = "stdlib-lm"\n[qat]\n{qat}\n')
    with pytest.raises(C.ConfigError, match=r"^sweep config: ") as got:
        C.load(path)
    assert needle in str(got.value)
    code, out, err = sweep(capsys, "--config", str(path), "--out", str(tmp_path / "never"))
    assert code == 2 and out == "" and needle in err and err.count("\n") == 1
    assert not (tmp_path / "never").exists()  # validated before anything runs


def test_format_documents_the_keys():
    for key in ("recipes = [", "start = ", "keep_float = "):
        assert key in C.FORMAT


# -------------------------------------------------------------- end to end

# The quick digits preset (an MLP 64 -> 64 -> 64 -> 10) from scratch, two recipes: NVFP4
# (stochastic gradients: a "quant" key per step; the wgrad transform needs the batch in
# blocks of 16, which the last evaluation batch, 450 % 256 = 194 images, is not) and the
# baseline.
E2E = """
preset = "digits-mlp"
seeds = [0]
[grid]
modes = ["qat"]
[qat]
formats = []
recipes = ["nvfp4", "float32"]
start = "scratch"
steps = 8
lr = 3e-3
"""


def rows_by_id(folder: Path) -> dict[str, dict]:
    return {r["id"]: r for r in R.read_rows(folder / "results.jsonl")}


@pytest.mark.slow
def test_recipe_sweep_from_scratch(tmp_path, capsys):
    # Without keep_float the 10-wide head does not fit NVFP4's blocks of 16: the cell
    # fails with the layer's name and the config line that keeps it in float.
    bad = write(tmp_path, E2E, "bad.toml")
    # Plots in run b only (a recipe's rows in the four figures): each set is seconds.
    argv = ("--quick", "--no-plots")
    code, out, err = sweep(capsys, "--config", str(bad), *argv, "--out", str(tmp_path / "a"))
    assert code == 1
    got = rows_by_id(tmp_path / "a")
    fail = got["digits-mlp/0/recipe=nvfp4/qat"]
    assert fail["status"] == "error"
    assert "'Dense_2'" in fail["error"] and "keep_float = ['Dense_2']" in fail["error"]
    assert got["digits-mlp/0/recipe=float32/qat"]["status"] == "ok"

    path = write(tmp_path, E2E + 'keep_float = ["Dense_2"]\n')
    run = tmp_path / "b"
    code, out, err = sweep(capsys, "--config", str(path), "--quick", "--out", str(run))
    assert code == 0, err
    assert len(list((run / "plots").glob("*.png"))) == 4
    got = rows_by_id(run)
    assert list(got) == [
        "digits-mlp/0/recipe=nvfp4/qat",
        "digits-mlp/0/recipe=float32/qat",
    ]
    nv, fl = got.values()
    assert nv["status"] == fl["status"] == "ok"
    assert nv["recipe"] == nv["format"] == "nvfp4"
    # From scratch the float baseline is the float32 run itself (same init, batches and
    # steps), every cell's float_loss; there is no float model to report PTQ of.
    assert fl["test_loss"] == fl["float_loss"] == nv["float_loss"]
    assert "ptq_acc" not in nv and "ptq_acc" not in fl
    assert math.isfinite(nv["test_loss"]) and nv["test_loss"] != fl["test_loss"]
    # Two of the three layers in NVFP4 (16x16 weight tiles: 4 bits + 8 / 256), the head in
    # float32 and left out of the weight metrics.
    assert 4.0 < nv["bits_per_weight"] < 4.1 and fl["bits_per_weight"] == 32.0
    assert fl["weight_sqnr_db"] == float("inf") and 5 < nv["weight_sqnr_db"] < 40
    assert nv["model_bytes"] < fl["model_bytes"]
    with open(run / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["recipe"] for r in table] == ["nvfp4", "float32"]
    summary = (run / "summary.md").read_text()
    assert "| recipe |" in summary and "loss vs float" in summary

    # Resuming runs nothing; a config that spells the same recipe otherwise (same cell
    # ids) is another config: its folder is refused, never mixed.
    code, out, err = sweep(capsys, "--config", str(path), *argv, "--out", str(run))
    assert code == 0 and "0 run, 2 already done" in out
    other = write(
        tmp_path,
        (E2E + 'keep_float = ["Dense_2"]\n').replace(
            '"nvfp4",', '{ recipe = "nvfp4", hadamard = ["wgrad"] },'
        ),
        "other.toml",
    )
    assert [c.id for c in G.expand(C.load(other, quick=True))] == list(got)
    code, out, err = sweep(capsys, "--config", str(other), *argv, "--out", str(run))
    assert code == 2 and "another config" in err

    # From the trained float model (the default start): the rows report the quantized
    # model before training (ptq_acc) and the float model's own metrics.
    fine = write(tmp_path, E2E.replace('start = "scratch"', 'keep_float = ["Dense_2"]'), "f.toml")
    code, out, err = sweep(capsys, "--config", str(fine), *argv, "--out", str(tmp_path / "c"))
    assert code == 0, err
    nv2, fl2 = rows_by_id(tmp_path / "c").values()
    assert "ptq_acc" in nv2 and nv2["float_loss"] == fl2["float_loss"]
    assert fl2["test_loss"] != fl2["float_loss"]  # float32: the same steps in float
    assert nv2["float_acc"] > 80  # the trained MLP, not the initialisation
