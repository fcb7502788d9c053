"""jq.convert: leaf-by-leaf conversion, abstract trees, deletion, strict pattern policies."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq

INT8 = jq.QuantSpec("int8", jq.per_channel(-1))
INT4 = jq.QuantSpec("int4", jq.per_block(0, 32))


def _params():
    k = jax.random.split(jax.random.key(0), 3)
    return {
        "dense": {"kernel": jax.random.normal(k[0], (64, 32)), "bias": jnp.zeros((32,))},
        "head": {"kernel": jax.random.normal(k[1], (32, 10))},
        "step": jnp.array(7),
    }


@pytest.mark.slow
def test_matches_quantize_tree_and_deletes_float_leaves_when_asked():
    params = _params()
    policy = [("dense/kernel", INT8), (".*kernel", INT4)]
    want = jq.quantize_tree(
        params,
        lambda p, x: (
            None
            if x.ndim < 2
            else (
                INT8
                if jax.tree_util.keystr(p, simple=True, separator="/") == "dense/kernel"
                else INT4
            )
        ),
    )
    got = jq.convert(params, policy, delete=True)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert params["dense"]["kernel"].is_deleted() and params["head"]["kernel"].is_deleted()
    assert not params["dense"]["bias"].is_deleted()  # kept float: untouched
    assert got["step"].tolist() == 7


@pytest.mark.slow
def test_abstract_tree_is_loaded_one_leaf_at_a_time():
    params = _params()
    abstract = jax.eval_shape(lambda: params)
    live = []

    def load(path, leaf):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        a, b = name.split("/") if "/" in name else (name, None)
        x = params[a] if b is None else params[a][b]
        live.append(name)
        return x + 0  # a fresh array, as a checkpoint reader would return

    got = jq.convert(abstract, [(".*kernel", INT8)], load=load)
    assert live == ["dense/bias", "dense/kernel", "head/kernel", "step"]
    np.testing.assert_array_equal(
        np.asarray(got["head"]["kernel"].values),
        np.asarray(jq.quantize(params["head"]["kernel"], INT8).values),
    )
    assert jq.size_report(got).nbytes < jq.size_report(params).nbytes / 3


def test_errors_leave_the_tree_untouched():
    params = _params()
    with pytest.raises(ValueError, match=r"\['dense/kernal'\] matched no leaf.*dense/kernel"):
        jq.convert(params, [("dense/kernal", INT8)], delete=True)
    with pytest.raises(ValueError, match=r"'dense/kernel'.*does not divide"):
        jq.convert(params, [(".*kernel", jq.QuantSpec("int4", jq.per_block(-1, 7)))], delete=True)
    with pytest.raises(TypeError, match=r"'step'.*not floating"):
        jq.convert(params, [("step", INT8)], delete=True)
    assert not any(x.is_deleted() for x in jax.tree.leaves(params))  # nothing was lost
    abstract = jax.eval_shape(lambda: params)
    with pytest.raises(ValueError, match="load="):
        jq.convert(abstract, INT8)
    with pytest.raises(ValueError, match=r"load returned \(3,\)"):
        jq.convert(abstract, INT8, load=lambda p, leaf: jnp.zeros((3,)))
    with pytest.raises(TypeError, match="pairs"):
        jq.convert(params, [".*"])


def test_qarray_leaves_are_kept_as_they_are_and_converting_twice_changes_nothing():
    """Like quantize_tree: a QArray leaf used to be flattened and its float scale quantized."""
    once = jq.convert(_params(), [("dense/kernel", INT8), (".*kernel", INT4)])
    calls = []

    def policy(path, leaf):
        calls.append(jax.tree_util.keystr(path))
        return INT8 if jnp.issubdtype(leaf.dtype, jnp.floating) else None

    twice = jq.convert(once, policy)
    assert twice["dense"]["kernel"] is once["dense"]["kernel"]
    assert twice["head"]["kernel"] is once["head"]["kernel"]
    assert calls == ["['dense']['bias']", "['step']"]  # the policy is not asked about QArrays
    assert isinstance(twice["dense"]["bias"], jq.QArray)
    # A pattern that matches only QArrays counts as used (no "matched no leaf" error).
    again = jq.convert(once, [("dense/kernel", INT8), (".*kernel", INT4)])
    assert again["head"]["kernel"] is once["head"]["kernel"]
    assert jq.convert(once, jq.QuantSpec("int8"))["dense"]["kernel"] is once["dense"]["kernel"]


@pytest.mark.parametrize("delete", ["False", 1, None, np.int64(0)])
def test_delete_must_be_a_bool_and_nothing_is_deleted_otherwise(delete):
    params = _params()
    with pytest.raises(TypeError, match=r"convert: delete must be True or False"):
        jq.convert(params, INT8, delete=delete)
    assert not params["dense"]["kernel"].is_deleted()
    with pytest.raises(TypeError, match=r"convert: load must be None or a function"):
        jq.convert(params, INT8, load="x")
