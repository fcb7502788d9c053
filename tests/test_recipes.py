"""Named recipes (jaxquant/_src/recipes.py): the module table's specs, the three ways a
recipe is used (config, dot_kwargs, Flax rules) and the registry's errors. Training with
them is test_training.py's and test_flax_stateful.py's."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq

# The module docstring's table: (weight, act, grad) as (format, granularity) or None.
TABLE = {
    "fp8_current": (("float8_e4m3fn", jq.per_tensor()),) * 2 + (("float8_e5m2", jq.per_tensor()),),
    "fp8_delayed": (("float8_e4m3fn", jq.per_tensor()),) * 2 + (("float8_e5m2", jq.per_tensor()),),
    "w8a8_int8": (("int8", jq.per_channel(-1)), ("int8", jq.per_token(-1)), None),
    "w4a16_int4": (("int4", jq.per_block(0, 128)), None, None),
    "binary": (("binary", jq.per_channel(-1)), None, None),
    "ternary": (("ternary", jq.per_channel(-1)), None, None),
    "mxfp8": (
        ("mxfp8", jq.per_block(0, 32)),
        ("mxfp8", jq.per_block(-1, 32)),
        ("mxfp8_e5m2", jq.per_block(-1, 32)),
    ),
    "nvfp4": (
        ("nvfp4", jq.per_block_2d(16)),
        ("nvfp4", jq.per_block(16)),
        ("nvfp4", jq.per_block(-1, 16)),  # the output's last axis; requantize moves it
    ),
    "mxfp4": (("mxfp4", jq.per_block(32)),) * 2 + (("mxfp4", jq.per_block(-1, 32)),),
}


def _describe(spec):
    return None if spec is None else (spec.format.name, spec.granularity)


def test_registry_is_the_module_table():
    assert jq.recipes.names() == tuple(TABLE)
    for name, (w, a, g) in TABLE.items():
        r = jq.recipes.get(name)
        assert r.name == name and r.description
        assert (_describe(r.weight), _describe(r.act), _describe(r.grad)) == (w, a, g), name
        assert r.scaling == ("delayed" if name == "fp8_delayed" else "current")
        assert jq.recipes.get(r) is r  # a Recipe passes through


def test_config_holds_every_field():
    r = jq.recipes.fp8_delayed(history_len=4, margin=1)
    c = r.config
    assert (c.weight, c.act, c.grad) == (r.weight, r.act, r.grad)
    assert (c.scaling, c.history_len, c.margin, c.ste, c.mode) == ("delayed", 4, 1, "plain", "auto")
    assert hash(r) == hash(jq.recipes.fp8_delayed(history_len=4, margin=1))


def test_factory_arguments():
    assert jq.recipes.get("w4a16_int4", group_size=32).weight.granularity == jq.per_block(0, 32)
    assert jq.recipes.ternary(0.5).weight.calibration == jq.twn(0.5)
    with pytest.raises(ValueError, match="group_size"):
        jq.recipes.w4a16_int4(group_size=0)


def test_dot_kwargs_run_the_same_product_as_the_config():
    r = jq.recipes.get("w8a8_int8")
    kw = r.dot_kwargs()
    assert kw == {"lhs_spec": r.act, "rhs_spec": r.weight, "grad_spec": None}
    x = jnp.array([[1.0, -2.0, 0.5, 4.0]])
    w = jnp.array([[0.5, -1.0], [0.25, 2.0], [1.0, 0.0], [-0.5, 0.75]])
    dn = (((1,), (0,)), ((), ()))
    np.testing.assert_array_equal(
        np.asarray(jq.dot_general(x, w, dn, **kw)),
        np.asarray(jq.dot_general(x, w, dn, config=r.config)),
    )
    assert r.replace(ste="clipped", mode="emulate").dot_kwargs()["ste"] == "clipped"


@pytest.mark.parametrize(
    "recipe",
    [
        jq.recipes.get("fp8_delayed"),
        jq.recipes.get("w8a8_int8").replace(ste="lsq", act=jq.QuantSpec("int8")),
    ],
    ids=["delayed", "lsq"],
)
def test_stateful_recipes_have_no_dot_kwargs(recipe):
    with pytest.raises(ValueError, match=r"use recipe\.rules\(\)"):
        recipe.dot_kwargs()


def test_rules_put_keep_float_first():
    rules = jq.recipes.get("binary").rules("Dense_.*", keep_float="Dense_0")
    assert [(r.pattern, r.quantizes) for r in rules] == [("Dense_0", False), ("Dense_.*", True)]
    assert rules[1] == jq.flax.Rule("Dense_.*", jq.recipes.get("binary").config)


def test_bad_names_and_fields_are_refused_where_written():
    with pytest.raises(ValueError, match="unknown recipe 'int3'; known: fp8_current"):
        jq.recipes.get("int3")
    with pytest.raises(TypeError, match=r"jq\.recipes\.get\('binary'\)"):
        jq.recipes.get("binary", group_size=32)
    with pytest.raises(TypeError, match=r"Recipe\.name must be a str"):
        jq.recipes.Recipe(3, weight=None, act=None, grad=None)
