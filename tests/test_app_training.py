"""jaxquant.app.training: the byte-LM training loop and the paired statistics."""

import numpy as np
import pytest
from scipy import stats

import jaxquant as jq
from jaxquant.app.datasets import stdlib_corpus
from jaxquant.app.training import DEFAULTS, build, paired_difference, train

TINY = {
    **DEFAULTS,
    "seq": 16,
    "batch": 8,
    "width": 16,
    "heads": 2,
    "hidden": 32,
    "layers": 1,
    "steps": 30,
    "chunk": 15,
    "val_windows": 8,
    "eval_batch": 8,
}


def test_paired_difference_matches_scipy_paired_t_interval():
    rng = np.random.default_rng(0)
    base = rng.normal(2.0, 0.3, 7)
    var = base + rng.normal(0.01, 0.004, 7)
    runs = [{"seed": s, "val_nll": float(v)} for s, v in enumerate(var)]
    ref = [{"seed": s, "val_nll": float(v)} for s, v in enumerate(base)]
    ref.append({"seed": 99, "val_nll": 0.0})  # a seed the variant did not run: ignored
    d = paired_difference(runs, ref)
    ci = stats.ttest_rel(var, base).confidence_interval(0.95)
    assert d["n"] == 7
    np.testing.assert_allclose([d["low"], d["high"]], [ci.low, ci.high], rtol=1e-10)
    assert d["resolved"] == ("above" if ci.low > 0 else "no")
    # Reversed, the same interval mirrored; an error run is left out.
    rev = paired_difference([*ref[:7], {"seed": 3, "error": "x"}], runs)
    np.testing.assert_allclose([rev["low"], rev["high"]], [-ci.high, -ci.low], rtol=1e-10)


def test_paired_difference_unresolved_and_single_seed():
    a = [{"seed": 0, "val_nll": 1.0}, {"seed": 1, "val_nll": 2.0}]
    b = [{"seed": 0, "val_nll": 1.1}, {"seed": 1, "val_nll": 1.8}]
    assert paired_difference(a, b)["resolved"] == "no"
    one = paired_difference(a[:1], b)
    assert one["n"] == 1 and one["resolved"] == "no" and one["low"] == -np.inf


@pytest.mark.slow
def test_train_is_deterministic_per_seed_and_learns():
    corpus = stdlib_corpus(max_files=20)
    model = build(TINY, jq.recipes.get("fp8_current").rules(r"block\d+/.*"))
    r0, r1, r0b = train(model, TINY, corpus, (0, 1, 0))
    assert "error" not in r0 and r0["val_nll"] == r0b["val_nll"]  # same seed, same bits
    assert r0["val_nll"] != r1["val_nll"]
    curve = r0["train_loss_curve"]
    assert curve[-1] < curve[0] - 0.5  # ln 256 = 5.55 at init; it learns byte statistics
