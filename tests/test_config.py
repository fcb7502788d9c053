"""``config=`` (a whole QuantConfig) in jq.dot_general / jq.einsum / jq.conv_general_dilated:
bit-identical to the loose keywords it replaces, never mixed with them, never silently
stateless; a Recipe is a named config."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq

S = jq.QuantSpec
MATMUL = (((1,), (0,)), ((), ()))

CONFIGS = {
    "int8": jq.QuantConfig(act=S("int8", jq.per_token(-1)), weight=S("int8", jq.per_channel(-1))),
    "fp8_grad": jq.QuantConfig(act=S("e4m3"), weight=S("e4m3"), grad=S("e5m2")),
    "clipped": jq.QuantConfig(act=S("int8"), weight=S("int8"), grad=S("int8"), ste="clipped"),
    "emulate": jq.QuantConfig(act=S("int8"), weight=S("int8"), mode="emulate"),
    "real": jq.QuantConfig(act=S("int8"), weight=S("int8", jq.per_channel(-1)), mode="real"),
    "weight_only_block": jq.QuantConfig(weight=S("int4", jq.per_block(0, 16))),
    "grad_only": jq.QuantConfig(grad=S("e5m2")),
}


def _loose(cfg: jq.QuantConfig) -> dict:
    return dict(
        lhs_spec=cfg.act, rhs_spec=cfg.weight, grad_spec=cfg.grad, mode=cfg.mode, ste=cfg.ste
    )


def _bits(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a, jnp.float32)).view(np.uint32)


def _same(a, b) -> None:
    np.testing.assert_array_equal(_bits(a), _bits(b))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_dot_general_config_is_bitwise_the_loose_keywords(name):
    cfg = CONFIGS[name]
    x = jax.random.normal(jax.random.key(0), (8, 64)) * 3.0
    w = jax.random.normal(jax.random.key(1), (64, 16))

    def by_config(a, b):
        return jq.dot_general(a, b, MATMUL, config=cfg)

    def by_keywords(a, b):
        return jq.dot_general(a, b, MATMUL, **_loose(cfg))

    def value_and_grads(dot):  # the product and both gradients of sum(product ** 2)
        def run(a, b):
            y, vjp = jax.vjp(dot, a, b)
            return (y, *vjp(2.0 * y))

        return run

    # Eager on every other config, under jit on the rest (the mode is orthogonal to
    # config= versus keywords; each mode compiles its own programs), one program per path.
    f = (lambda g: g) if sorted(CONFIGS).index(name) % 2 == 0 else jax.jit
    for a, b in zip(
        f(value_and_grads(by_config))(x, w), f(value_and_grads(by_keywords))(x, w), strict=True
    ):
        _same(a, b)
    # and it quantizes: a config is not ignored
    if cfg.act is not None or cfg.weight is not None:
        assert not np.array_equal(_bits(by_config(x, w)), _bits(x @ w))


@pytest.mark.slow
def test_einsum_and_conv_config_are_bitwise_the_loose_keywords():
    cfg = CONFIGS["fp8_grad"]
    a = jax.random.normal(jax.random.key(2), (2, 3, 64))
    b = jax.random.normal(jax.random.key(3), (64, 5))
    e1 = lambda a, b: jq.einsum("btd,df->bft", a, b, config=cfg)
    e2 = lambda a, b: jq.einsum("btd,df->bft", a, b, **_loose(cfg))
    _same(e1(a, b), e2(a, b))
    _same(jax.jit(e1)(a, b), jax.jit(e2)(a, b))
    _same(
        jax.grad(lambda a: jnp.sum(e1(a, b) ** 2))(a), jax.grad(lambda a: jnp.sum(e2(a, b) ** 2))(a)
    )

    x = jax.random.normal(jax.random.key(4), (2, 8, 8, 3))
    k = jax.random.normal(jax.random.key(5), (3, 3, 3, 4))
    conv_cfg = jq.QuantConfig(
        act=S("int8"), weight=S("int8", jq.per_channel(-1)), grad=S("e5m2"), ste="clipped"
    )
    dn = ("NHWC", "HWIO", "NHWC")

    def c1(x, k):
        return jq.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=dn, config=conv_cfg)

    def c2(x, k):
        return jq.conv_general_dilated(
            x,
            k,
            (1, 1),
            "SAME",
            dimension_numbers=dn,
            lhs_spec=conv_cfg.act,
            rhs_spec=conv_cfg.weight,
            grad_spec=conv_cfg.grad,
            ste="clipped",
        )

    # Under jit, the product and both gradients in one program per path (the einsum
    # above ran eagerly and under jit).
    @jax.jit
    def conv_and_grads(x, k):
        out = []
        for conv in (c1, c2):
            y, vjp = jax.vjp(conv, x, k)
            out.append((y, *vjp(2.0 * y)))
        return out

    for a, b in zip(*conv_and_grads(x, k), strict=True):
        _same(a, b)


def test_serving_a_qarray_takes_the_activation_spec_from_config():
    x = jax.random.normal(jax.random.key(6), (8, 64))
    q = jq.quantize(jax.random.normal(jax.random.key(7), (64, 16)), S("int8", jq.per_channel(-1)))
    act = S("int8", jq.per_token(-1))
    _same(
        jq.dot_general(x, q, MATMUL, config=jq.QuantConfig(act=act)),
        jq.dot_general(x, q, MATMUL, lhs_spec=act),
    )
    with pytest.raises(ValueError, match=r"rhs is a QArray.*config with a weight"):
        jq.dot_general(x, q, MATMUL, config=jq.QuantConfig(act=act, weight=S("int8")))


@pytest.mark.parametrize(
    "keyword, value",
    [
        ("lhs_spec", S("int8")),
        ("rhs_spec", None),  # None (float) is a choice too: not silently overridden
        ("grad_spec", S("e5m2")),
        ("mode", "auto"),  # the default value, passed explicitly
        ("ste", "clipped"),
    ],
)
def test_config_and_a_loose_keyword_is_an_error_naming_both(keyword, value):
    x, w = jnp.ones((4, 8)), jnp.ones((8, 3))
    cfg = CONFIGS["int8"]
    pattern = rf"got config= and {keyword}= \(config\.\w+\)"
    with pytest.raises(ValueError, match="dot_general: " + pattern):
        jq.dot_general(x, w, MATMUL, config=cfg, **{keyword: value})
    with pytest.raises(ValueError, match="einsum: " + pattern):
        jq.einsum("ij,jk->ik", x, w, config=cfg, **{keyword: value})
    if keyword != "mode":
        with pytest.raises(ValueError, match=rf"conv_general_dilated: got config= and {keyword}="):
            jq.conv_general_dilated(
                x[None], w.T[:, :, None], (1,), "VALID", config=cfg, **{keyword: value}
            )


def test_stateful_configs_are_refused_with_the_fix():
    x, w = jnp.ones((4, 8)), jnp.ones((8, 3))
    delayed = jq.QuantConfig(act=S("e4m3"), weight=S("e4m3"), scaling="delayed")
    lsq = jq.QuantConfig(act=S("int8"), weight=S("int8"), ste="lsq")
    for cfg, what in ((delayed, "scaling='delayed'"), (lsq, "ste='lsq'")):
        with pytest.raises(ValueError, match=rf"config has {what}.*lhs_scale=.*quantize_model"):
            jq.dot_general(x, w, MATMUL, config=cfg)
        with pytest.raises(ValueError, match=rf"einsum: config has {what}"):
            jq.einsum("ij,jk->ik", x, w, config=cfg)
        with pytest.raises(ValueError, match=rf"conv_general_dilated: config has {what}"):
            jq.conv_general_dilated(x[None], w.T[:, :, None], (1,), "VALID", config=cfg)
    # the fix the message gives works: current scaling with the scales passed in
    fixed = delayed.replace(scaling="current")
    y = jq.dot_general(x, w, MATMUL, config=fixed, lhs_scale=2.0**-6, rhs_scale=2.0**-6)
    np.testing.assert_array_equal(y, jnp.full((4, 3), 8.0))


def test_bad_configs_name_the_argument():
    x, w = jnp.ones((4, 8)), jnp.ones((8, 3))
    with pytest.raises(TypeError, match=r"dot_general: config must be a jq.QuantConfig"):
        jq.dot_general(x, w, MATMUL, config=S("int8"))
    with pytest.raises(TypeError, match=r"conv_general_dilated: config must be a jq.QuantConfig"):
        jq.conv_general_dilated(x[None], w.T[:, :, None], (1,), "VALID", config={"act": 1})
    with pytest.raises(ValueError, match=r"conv_general_dilated: config.mode='real'"):
        jq.conv_general_dilated(
            x[None], w.T[:, :, None], (1,), "VALID", config=jq.QuantConfig(mode="real")
        )


def test_loose_keywords_keep_their_documented_defaults():
    for fn in (jq.dot_general, jq.einsum, jq.conv_general_dilated):
        params = inspect.signature(fn).parameters
        assert params["config"].default is None
        assert repr(params["lhs_spec"].default) == "None"
        assert repr(params["ste"].default) == "'plain'"
    assert repr(inspect.signature(jq.dot_general).parameters["mode"].default) == "'auto'"


# ------------------------------------------------------------------ recipes are configs


@pytest.mark.slow
@pytest.mark.parametrize("name", jq.recipes.names())
def test_a_recipe_is_a_named_config(name):
    r = jq.recipes.get(name)
    cfg = r.config
    assert isinstance(cfg, jq.QuantConfig)
    assert (cfg.weight, cfg.act, cfg.grad) == (r.weight, r.act, r.grad)
    assert (cfg.scaling, cfg.history_len, cfg.margin, cfg.ste, cfg.mode) == (
        r.scaling,
        r.history_len,
        r.margin,
        r.ste,
        r.mode,
    )
    pytest.importorskip("flax")
    assert r.rules()[-1].config == cfg
    if cfg.scaling != "current" or cfg.ste == "lsq":  # state across steps: Flax rules only
        with pytest.raises(ValueError, match="keeps state"):
            r.dot_kwargs()
        return
    # Stochastic recipes (nvfp4 / mxfp4 gradients) take a key per call, nothing else.
    key = {"key": jax.random.key(3)} if cfg.needs_key else {}
    x = jax.random.normal(jax.random.key(8), (4, 128))
    w = jax.random.normal(jax.random.key(9), (128, 32))
    _same(
        jq.dot_general(x, w, MATMUL, config=cfg, **key),
        jq.dot_general(x, w, MATMUL, **r.dot_kwargs(), **key),
    )


def test_recipe_fields_are_checked_like_a_config():
    with pytest.raises(ValueError, match=r"Recipe.mode must be one of"):
        jq.recipes.fp8_current().replace(mode="fast")
    with pytest.raises(ValueError, match=r"Recipe.act: ste='lsq' keeps one scale per group"):
        jq.recipes.w8a8_int8().replace(ste="lsq")  # a per-token activation has no fixed groups
    lsq = jq.recipes.w8a8_int8().replace(ste="lsq", act=S("int8"))
    assert lsq.config.ste == "lsq" and lsq.config.stateful
    emulated = jq.recipes.w8a8_int8().replace(mode="emulate")
    assert emulated.dot_kwargs()["mode"] == "emulate" and emulated.config.mode == "emulate"
