"""jq.size_report: bytes per leaf from shapes and dtypes, real and abstract trees."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import jaxquant as jq

PARAMS = {
    "dense": {"kernel": jnp.ones((128, 96)), "bias": jnp.zeros((96,))},
    "emb": jnp.ones((10, 64)),
}


@pytest.mark.parametrize(
    "spec, value_bytes",
    [
        (jq.QuantSpec("bf16", calibration=None), 2 * 128 * 96),
        (jq.QuantSpec("int8", jq.per_channel(-1)), 128 * 96),
        (jq.QuantSpec("int4", jq.per_block(0, 32)), 128 * 96 // 2),
        (jq.QuantSpec("nf4", jq.per_block(0, 64)), 128 * 96 // 2),
        (jq.QuantSpec("e3m2"), 128 * 96 * 3 // 4),
    ],
)
def test_sizes_are_the_stored_bytes_real_and_abstract(spec, value_bytes):
    def policy(path, x):
        return spec if x.ndim == 2 and x.shape[0] == 128 else None

    q = jq.quantize_tree(PARAMS, policy)
    r = jq.size_report(q)
    kernel = next(leaf for leaf in r.leaves if leaf.path == "dense/kernel")
    assert kernel.value_bytes == value_bytes
    assert kernel.nbytes == q["dense"]["kernel"].nbytes  # QArray's own count
    assert r.nbytes == sum(
        x.nbytes for x in jax.tree.leaves(q, is_leaf=lambda x: isinstance(x, jq.QArray))
    )
    abstract = jq.size_report(jax.eval_shape(lambda p: jq.quantize_tree(p, policy), PARAMS))
    assert abstract == r
    assert r.float32_bytes == 4 * (128 * 96 + 96 + 640)
    assert "**total**" in str(r) and "dense/kernel" in str(r)


@pytest.mark.slow
def test_the_seeds_savings():
    """fp16 -50 %, int8 -75 %, int4 -87.5 % of the values (scales counted separately)."""
    x = {"w": jnp.ones((512, 512))}
    for fmt, saving in (("fp16", 0.5), ("int8", 0.75), ("int4", 0.875)):
        spec = jq.QuantSpec(fmt, calibration=None if fmt == "fp16" else jq.absmax())
        r = jq.size_report(jq.quantize_tree(x, spec))
        assert 1 - r.value_bytes / r.float32_bytes == saving
        assert r.scale_bytes <= 4


def test_bad_leaves():
    with pytest.raises(TypeError, match=r"'a'.*str"):
        jq.size_report({"a": "text"})


def test_size_report_checks_its_leaves():
    with pytest.raises(TypeError, match=r"SizeReport: leaves must be a tuple of LeafSize"):
        jq.SizeReport("abc")
    with pytest.raises(TypeError, match=r"SizeReport: leaves must be a tuple of LeafSize"):
        jq.SizeReport((1, 2))
    r = jq.size_report(PARAMS)
    assert jq.SizeReport(list(r.leaves)) == r
