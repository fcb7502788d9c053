"""The sweep's default grid (what the README says it runs), ``grid.also`` products, the
Pareto fronts, format families and the plots (written, without warnings)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from jaxquant.app.sweep import config as C
from jaxquant.app.sweep import grid as G
from jaxquant.app.sweep import plots as P

REPO = Path(__file__).resolve().parents[1]


def quickstart() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Quickstart") :]
    return section[: section.index("\n## ", 3)]


def test_default_grid_is_what_the_readme_says():
    cfg = C.resolve()
    assert cfg["preset"] == C.DEFAULT_PRESET == "stdlib-lm"
    cells = G.expand(cfg)
    ptq = [c for c in cells if c.mode == "ptq"]
    weights, acts = [c for c in ptq if c.act == "none"], [c for c in ptq if c.act != "none"]
    qat = [c for c in cells if c.mode == "qat"]
    n_seeds = len(cfg["seeds"])
    assert (len(cells), len(weights), len(acts), len(qat), n_seeds) == (86, 68, 12, 6, 2)
    text = " ".join(quickstart().split())
    assert f"{len(cells)} cells" in text and f"{n_seeds} seeds" in text
    assert f"{len(acts) // n_seeds} with quantized activations" in text
    for fmt in sorted({c.format for c in cells} | {c.act for c in acts}):
        assert f"`{fmt}`" in text, fmt
    # The low-bit product: every format x granularity x calibration, per seed.
    main = {(c.format, c.granularity, c.calibration) for c in weights if c.rounding == "nearest"}
    for fmt in ("int4", "int3", "nf4", "fp4"):
        for gran in ("tensor", "channel", "block32"):
            for cal in ("absmax", "mse"):
                assert (fmt, gran, cal) in main
    # The activation cells compare calibrations of a 4-bit static range.
    assert {c.calibration for c in acts if c.act == "int4"} == {
        "absmax",
        "mse",
        "percentile:99.9",
    }
    assert {c.format for c in qat} == {"int4", "int3", "ternary"}


def test_quick_and_file_bases(tmp_path):
    quick = C.resolve(quick=True)
    assert quick["preset"] == "stdlib-lm" and quick["grid"]["also"] == []
    assert len(G.expand(quick)) == 5
    # A resolved config, written as the run folder's config.toml, loads back equal.
    for cfg in (quick, C.resolve()):
        path = tmp_path / "config.toml"
        path.write_text(C.to_toml(cfg))
        assert C.load(path) == cfg
    # A config file without `preset` builds on the digits MLP (its epochs, no fixed steps).
    assert C.resolve({})["preset"] == C.FILE_PRESET == "digits-mlp"
    assert "steps" not in C.resolve({"task": {"name": "mine"}})["task"]


def test_also_products_are_a_deduplicated_union():
    cfg = C.resolve(
        {
            "seeds": [0],
            "grid": {
                "formats": ["int4"],
                "granularities": ["channel"],
                "calibrations": ["absmax"],
                "roundings": ["nearest"],
                "modes": ["ptq"],
                "also": [
                    {"calibrations": ["absmax", "mse"]},  # int4/channel/absmax again
                    {"formats": ["int8"], "activations": ["int4"]},
                ],
            },
        }
    )
    ids = [c.id for c in G.expand(cfg)]
    assert ids == [
        "digits-mlp/0/int4/channel/absmax/nearest/ptq",
        "digits-mlp/0/int4/channel/mse/nearest/ptq",
        "digits-mlp/0/int8/channel/absmax/nearest/ptq/act=int4",
    ]


@pytest.mark.parametrize(
    ("also", "needle"),
    [
        ("x", "grid.also[0] = 'x' must be a table of grid keys"),
        ({}, "grid.also[0] is empty"),
        ({"modes": ["qat"]}, "grid.also[0].modes is not a key here"),
        ({"formats": "int4"}, "grid.also[0].formats = 'int4' must be a list"),
        ({"formats": ["int9"]}, "grid.also[0].formats[0] = 'int9' is not a format"),
        ({"activations": ["int3"]}, "grid.also[0].activations[0] = 'int3' is not an activation"),
    ],
)
def test_bad_also_names_the_key(also, needle):
    with pytest.raises(C.ConfigError, match=re.escape(needle)):
        C.resolve({"grid": {"also": [also]}})


def test_block_and_mx_granularities_fit_the_kernel():
    cell = G.Cell("t", 0, "int4", "block32", "absmax", "nearest", "ptq")
    assert G.spec_for(cell, (64, 10)).granularity == G.per_block(-2, 32)
    # Fewer inputs than a block: one scale per output channel.
    assert G.spec_for(cell, (16, 10)).granularity == G.per_channel(-1)
    mx = cell._replace(format="mxfp4")
    assert G.spec_for(mx, (16, 64)).granularity == G.per_block(-1, 32)
    with pytest.raises(ValueError, match=r"mxfp4 needs blocks of 32 .* shape \(16, 10\)"):
        G.spec_for(mx, (16, 10))


def test_pareto_front():
    # (bits, accuracy): (8, 90) is beaten by (4, 95); (4, 93) by (4, 95) at equal bits.
    x = [2.0, 4.0, 4.0, 8.0, 16.0, 3.0, 3.0]
    y = [50.0, 95.0, 93.0, 90.0, 96.0, 60.0, 60.0]
    assert P.pareto_front(x, y) == [True, True, False, False, True, True, True]
    # Lower is better (a loss): now (2, 50) and (8, 90) ... mirror the roles.
    assert P.pareto_front(x, y, maximize=False) == [True] + [False] * 6
    # Within a relative tolerance, a hair more bits no longer protects a worse point.
    assert P.pareto_front([4.0005, 4.0], [70.0, 60.0]) == [True, True]
    assert P.pareto_front([4.0005, 4.0], [70.0, 60.0], x_tol=0.005) == [True, False]
    with pytest.raises(ValueError, match="x has 2 values, y 1"):
        P.pareto_front([1.0, 2.0], [1.0])


def row(fmt, gran, cal, seed, acc, loss, bits, *, mode="ptq", act="none", rounding="nearest"):
    return {
        "task": "stdlib-lm",
        "seed": seed,
        "format": fmt,
        "granularity": gran,
        "calibration": cal,
        "rounding": rounding,
        "mode": mode,
        "act": act,
        "status": "ok",
        "test_acc": acc,
        "float_acc": 50.0 + seed,
        "test_loss": loss,
        "float_loss": 2.0 - 0.1 * seed,
        "weight_sqnr_db": float("inf") if fmt == "float32" else 4.0 * bits,
        "bits_per_weight": bits,
        "model_bytes": 1024.0 * bits,
    }


# Two seeds; each seed's float model is 50 + seed % / 2 - 0.1 seed nats.
ROWS = [
    r
    for s in (0, 1)
    for r in (
        row("float32", "tensor", "none", s, 50.0 + s, 2.0 - 0.1 * s, 32.0),
        row("int8", "channel", "absmax", s, 49.9 + s, 2.001 - 0.1 * s, 8.2),
        row("int4", "channel", "mse", s, 49.0 + s, 2.02 - 0.1 * s, 4.2),
        # int4 per tensor: fewer bits, much worse -> on the front (nothing smaller beats it)
        row("int4", "tensor", "absmax", s, 47.0 + s + 0.2 * s, 2.10 - 0.1 * s, 4.0),
        # nf4 in blocks: more bits and worse than int4/channel/mse -> dominated
        row("nf4", "block32", "absmax", s, 48.0 + s, 2.05 - 0.1 * s, 5.0),
        row("int8", "channel", "mse", s, 48.5 + s, 2.03 - 0.1 * s, 8.2, act="int4"),
        row("ternary", "channel", "twn", s, 40.0 + s, 2.5 - 0.1 * s, 2.2),
        row("int4", "channel", "absmax", s, 49.5 + s, 2.01 - 0.1 * s, 4.2, mode="qat"),
    )
] + [{"status": "error", "format": "int3", "task": "stdlib-lm"}]


def test_points_pool_seeds_as_changes_against_each_seeds_float():
    pts = {(p.mode, p.format, p.granularity, p.act): p for p in P.points(ROWS)}
    assert len(pts) == 8  # the error row is left out
    t = pts["ptq", "int4", "tensor", "none"]
    assert t.seeds == 2
    mean, lo, hi = t.values["d_acc"]
    assert (lo, hi) == pytest.approx((-3.0, -2.8)) and mean == pytest.approx(-2.9)
    assert t.values["d_loss"] == pytest.approx((0.1, 0.1, 0.1))
    assert "sqnr" not in pts["ptq", "float32", "tensor", "none"].values  # inf: no point
    fronts = {}
    for mode in ("ptq", "qat"):
        sel = [p for p in pts.values() if p.mode == mode]
        on = P.pareto_front([p.values["bits"][0] for p in sel], [p.values["d_acc"][0] for p in sel])
        fronts[mode] = {p.format + "/" + p.granularity for p, f in zip(sel, on, strict=True) if f}
    assert fronts["ptq"] == {
        "float32/tensor",
        "int8/channel",
        "int4/channel",
        "int4/tensor",
        "ternary/channel",
    }
    assert "nf4/block32" not in fronts["ptq"]  # dominated: more bits, lower accuracy
    assert fronts["qat"] == {"int4/channel"}
    labels = {p.label for p in pts.values()}
    assert {"int4 C mse", "int8 C mse +A4", "int4 C QAT", "float32", "ternary C"} <= labels


def test_every_format_has_a_family_and_families_look_different():
    assert set(P.FAMILIES) == set(C.FORMATS)
    assert set(P.FAMILIES.values()) == set(P.FAMILY_STYLES)
    styles = list(P.FAMILY_STYLES.values())
    assert len({s.colour for s in styles}) == len(styles)
    assert len({s.marker for s in styles}) == len(styles)
    # The pairs the old plots confused, and the ones a reader compares.
    for a, b in [("int4", "binary"), ("int4", "nf4"), ("int4", "mxfp4"), ("fp4", "fp8_e4m3")]:
        sa, sb = P.FAMILY_STYLES[P.FAMILIES[a]], P.FAMILY_STYLES[P.FAMILIES[b]]
        assert sa.colour != sb.colour and sa.marker != sb.marker, (a, b)


@pytest.mark.parametrize("seeds", [(0, 1), (0,)])
def test_plots_are_written(tmp_path, seeds):
    rows = [r for r in ROWS if r.get("seed", 0) in seeds]
    paths = P.write_plots(tmp_path / "plots", rows)  # warnings are errors in this suite
    names = ("accuracy_vs_bits", "loss_vs_bits", "sqnr_vs_bits", "size_vs_accuracy")
    assert [p.name for p in paths] == [f"{n}.png" for n in names]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert not list((tmp_path / "plots").glob("*.tmp*"))


def test_plots_of_a_custom_task_and_of_no_rows(tmp_path):
    rows = [r | {"task": "mine"} for r in ROWS[:4]]
    assert len(P.write_plots(tmp_path / "a", rows)) == 4
    assert len(P.write_plots(tmp_path / "b", [])) == 4  # empty axes, still a PNG
