"""jq.quantize_tree / dequantize_tree (jaxquant/_src/tree.py): leaf-by-leaf quantization,
abstract trees, deletion, strict pattern policies, jit; jq.convert is its deprecated alias."""

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
def test_pattern_policy_matches_a_function_policy_and_deletes_float_leaves_when_asked():
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
    got = jq.quantize_tree(params, policy, delete=True)
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

    got = jq.quantize_tree(abstract, [(".*kernel", INT8)], load=load)
    assert live == ["dense/bias", "dense/kernel", "head/kernel", "step"]
    np.testing.assert_array_equal(
        np.asarray(got["head"]["kernel"].values),
        np.asarray(jq.quantize(params["head"]["kernel"], INT8).values),
    )
    assert jq.size_report(got).nbytes < jq.size_report(params).nbytes / 3


def test_errors_leave_the_tree_untouched():
    params = _params()
    with pytest.raises(ValueError, match=r"\['dense/kernal'\] matched no leaf.*dense/kernel"):
        jq.quantize_tree(params, [("dense/kernal", INT8)], delete=True)
    with pytest.raises(ValueError, match=r"'dense/kernel'.*does not divide"):
        jq.quantize_tree(
            params, [(".*kernel", jq.QuantSpec("int4", jq.per_block(-1, 7)))], delete=True
        )
    with pytest.raises(TypeError, match=r"'step'.*not floating"):
        jq.quantize_tree(params, [("step", INT8)], delete=True)
    assert not any(x.is_deleted() for x in jax.tree.leaves(params))  # nothing was lost
    abstract = jax.eval_shape(lambda: params)
    with pytest.raises(ValueError, match="load="):
        jq.quantize_tree(abstract, INT8)
    with pytest.raises(ValueError, match=r"load returned \(3,\)"):
        jq.quantize_tree(abstract, INT8, load=lambda p, leaf: jnp.zeros((3,)))
    with pytest.raises(TypeError, match="pairs"):
        jq.quantize_tree(params, [".*"])


def test_qarray_leaves_are_kept_as_they_are_and_converting_twice_changes_nothing():
    """A QArray leaf used to be flattened and its float scale quantized."""
    once = jq.quantize_tree(_params(), [("dense/kernel", INT8), (".*kernel", INT4)])
    calls = []

    def policy(path, leaf):
        calls.append(jax.tree_util.keystr(path))
        return INT8 if jnp.issubdtype(leaf.dtype, jnp.floating) else None

    twice = jq.quantize_tree(once, policy)
    assert twice["dense"]["kernel"] is once["dense"]["kernel"]
    assert twice["head"]["kernel"] is once["head"]["kernel"]
    assert calls == ["['dense']['bias']", "['step']"]  # the policy is not asked about QArrays
    assert isinstance(twice["dense"]["bias"], jq.QArray)
    # A pattern that matches only QArrays counts as used (no "matched no leaf" error).
    again = jq.quantize_tree(once, [("dense/kernel", INT8), (".*kernel", INT4)])
    assert again["head"]["kernel"] is once["head"]["kernel"]
    assert (
        jq.quantize_tree(once, jq.QuantSpec("int8"))["dense"]["kernel"] is once["dense"]["kernel"]
    )


@pytest.mark.parametrize("delete", ["False", 1, None, np.int64(0)])
def test_delete_must_be_a_bool_and_nothing_is_deleted_otherwise(delete):
    params = _params()
    with pytest.raises(TypeError, match=r"quantize_tree: delete must be True or False"):
        jq.quantize_tree(params, INT8, delete=delete)
    assert not params["dense"]["kernel"].is_deleted()
    with pytest.raises(TypeError, match=r"quantize_tree: load must be None or a function"):
        jq.quantize_tree(params, INT8, load="x")


def test_under_jit_it_is_a_plain_map_and_delete_is_refused():
    params = _params()
    policy = [("dense/kernel", INT8), (".*kernel", INT4)]
    eager = jq.quantize_tree(params, policy)
    jitted = jax.jit(lambda p: jq.quantize_tree(p, policy))(params)
    for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match=r"delete=True .* traced"):
        jax.jit(lambda p: jq.quantize_tree(p, INT8, delete=True))(params)
    assert not any(x.is_deleted() for x in jax.tree.leaves(params))


def test_convert_is_a_deprecated_alias_of_quantize_tree():
    with pytest.warns(
        DeprecationWarning, match=r"jq.convert is deprecated: it is jq.quantize_tree"
    ):
        convert = jq.convert
    assert convert is jq.quantize_tree
    assert "convert" not in jq.__all__  # "convert" is jq.flax.convert only
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        jq.nope  # noqa: B018


@pytest.mark.slow
def test_quantize_tree_policies():
    params = {
        "dense": {"kernel": jnp.ones((8, 16)), "bias": jnp.zeros(16)},
        "step": jnp.array(3, jnp.int32),
    }

    def policy(path, leaf):
        name = jax.tree_util.keystr(path)
        return jq.QuantSpec("int4", jq.per_channel(-1)) if "kernel" in name else None

    qt = jq.quantize_tree(params, policy)
    assert isinstance(qt["dense"]["kernel"], jq.QArray)
    assert qt["dense"]["bias"] is params["dense"]["bias"] and qt["step"] is params["step"]
    back = jq.dequantize_tree(qt)
    np.testing.assert_array_equal(np.asarray(back["dense"]["kernel"]), np.ones((8, 16)))
    jitted = jax.jit(lambda p: jq.quantize_tree(p, jq.QuantSpec("e4m3")))(params)
    assert isinstance(jitted["dense"]["bias"], jq.QArray) and jitted["step"].dtype == jnp.int32
    with pytest.raises(ValueError, match=r"'dense/kernel'.*does not divide"):
        jq.quantize_tree(
            params,
            lambda p, leaf: jq.QuantSpec("int4", jq.per_block(-1, 5)) if leaf.ndim == 2 else None,
        )
    with pytest.raises(TypeError, match="must return a QuantSpec"):
        jq.quantize_tree(params, lambda p, leaf: "int8")


def test_quantize_tree_stochastic_keys_differ_per_leaf():
    x = jnp.full((64,), 0.5)
    spec = jq.QuantSpec("int8", calibration=jq.fixed(127.0), rounding="stochastic")
    qt = jq.quantize_tree({"a": x, "b": x}, spec, key=jax.random.key(0))
    assert not np.array_equal(np.asarray(qt["a"].values), np.asarray(qt["b"].values))


@pytest.mark.slow
def test_quantize_tree_keeps_qarrays_as_they_are():
    """A tree that already holds QArrays: they pass through untouched (their scales are
    never quantized again), other leaves are quantized."""
    tree = {"w": jnp.ones((4, 8)), "b": jnp.full((8,), 0.5)}
    once = jq.quantize_tree(tree, jq.QuantSpec("int8"))
    twice = jq.quantize_tree({**once, "c": jnp.ones(3)}, jq.QuantSpec("int4"))
    assert twice["w"] is once["w"] and twice["b"] is once["b"]
    assert twice["c"].spec.format.name == "int4"
    seen = []
    jq.quantize_tree(once, lambda path, leaf: seen.append(path) or jq.QuantSpec("int4"))
    assert seen == []


def test_non_array_leaves_a_policy_selects():
    """A Python number is quantized as a 0-d array (as quantize_tree always did); anything
    else is a TypeError naming the leaf, not an AttributeError from inside."""
    any_leaf = lambda path, leaf: jq.QuantSpec("int8")
    q = jq.quantize_tree({"a": 1.0}, any_leaf)
    assert isinstance(q["a"], jq.QArray) and q["a"].shape == ()
    with pytest.raises(TypeError, match=r"quantize_tree at 'b': it is not an array or a number"):
        jq.quantize_tree({"b": "abc"}, any_leaf)
    with pytest.raises(TypeError, match=r"quantize_tree at 'c': it is not an array or a number"):
        jq.quantize_tree({"c": True}, any_leaf)
