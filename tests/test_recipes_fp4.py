"""The 4-bit training recipes (jq.recipes.nvfp4 / mxfp4): every technique a switch, the
shape errors that name the layer and the rule that keeps it in float, and training a Linen
MLP on digits under jit."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxquant as jq
from jaxquant.app.datasets import digits


def test_nvfp4_defaults_are_the_papers_recipe():
    r = jq.recipes.nvfp4()
    assert r.weight == jq.QuantSpec("nvfp4", jq.per_block_2d(16))
    assert r.act == jq.QuantSpec("nvfp4", jq.per_block(16))
    assert r.grad == jq.QuantSpec("nvfp4", jq.per_block(-1, 16), rounding="stochastic")
    assert (r.backward, r.hadamard) == ("requantize", jq.rotations.DotHadamard(gemms=("wgrad",)))
    assert r.config.needs_key  # stochastic gradients draw keys


@pytest.mark.parametrize("factory", [jq.recipes.nvfp4, jq.recipes.mxfp4])
def test_each_switch_changes_its_technique_only(factory):
    base = factory()
    fields = ("weight", "act", "grad", "backward", "hadamard")
    changed = {
        "weight_2d": {"weight"},
        "hadamard": {"hadamard"},
        "random_hadamard": {"hadamard"},
        "stochastic_grad": {"grad"},
        "requantize": {"backward"},
    }
    flips = {
        "weight_2d": not (base.weight.granularity == jq.per_block_2d(16)),
        "hadamard": (),
        "random_hadamard": False,
        "stochastic_grad": False,
        "requantize": False,
    }
    for switch, want in changed.items():
        r = factory(**{switch: flips[switch]})
        diff = {f for f in fields if getattr(r, f) != getattr(base, f)}
        assert diff == want, switch
    assert factory(hadamard=()).hadamard is None
    assert factory(random_hadamard=False).hadamard.random is False
    assert factory(stochastic_grad=False).grad.rounding == "nearest"
    assert factory(requantize=False).backward == "saved"


def test_equal_recipe_differs_in_the_format_only():
    nv = jq.recipes.nvfp4()
    mx = jq.recipes.mxfp4(weight_2d=True, hadamard=("wgrad",), hadamard_block=16)
    assert (mx.backward, mx.hadamard) == (nv.backward, nv.hadamard)
    for role in ("weight", "act", "grad"):
        a, b = getattr(nv, role), getattr(mx, role)
        assert (a.rounding, type(a.granularity)) == (b.rounding, type(b.granularity)), role
        assert a.format.name == "nvfp4" and b.format.name == "mxfp4"


def test_bad_switches_are_refused_by_name():
    with pytest.raises(ValueError, match=r"nvfp4: hadamard.*'bwd'"):
        jq.recipes.nvfp4(hadamard=("bwd",))
    with pytest.raises(TypeError, match="weight_2d must be True or False"):
        jq.recipes.nvfp4(weight_2d="yes")
    with pytest.raises(TypeError, match="mxfp4: stochastic_grad"):
        jq.recipes.mxfp4(stochastic_grad=1)
    with pytest.raises(ValueError, match="block"):
        jq.recipes.nvfp4(hadamard_block=7)


class _MLP(nn.Module):
    out: int = 10
    mid: int = 128

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(128, name="inp")(x))
        x = nn.relu(nn.Dense(self.mid, name="mid")(x))
        return nn.Dense(self.out, name="out")(x)


def _rngs(seed):
    return {"params": jax.random.key(seed), "quant": jax.random.key(seed + 1)}


def test_a_layer_that_does_not_fit_the_blocks_is_named_with_its_rule():
    model = jq.flax.quantize_model(_MLP(mid=20), jq.recipes.nvfp4().rules())
    x = jnp.ones((32, 64))
    with pytest.raises(ValueError, match=r"layer 'mid'.*recipe\.rules\(keep_float=\['mid'\]\)"):
        jax.eval_shape(model.init, _rngs(0), x)  # the error is a trace's
    # Kept in float by name, it runs, and the report says which layers are quantized.
    kept = jq.flax.quantize_model(_MLP(mid=20), jq.recipes.nvfp4().rules(keep_float=["mid", "out"]))

    @jax.jit  # one compiled program (eagerly, each op of init and apply compiles its own)
    def init_and_apply(rngs, key):
        return kept.apply(kept.init(rngs, x), x, rngs={"quant": key})

    assert init_and_apply(_rngs(0), jax.random.key(5)).shape == (32, 10)
    assert [m.path for m in jq.flax.report(kept)] == ["inp"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
def test_recipe_trains_a_linen_mlp_on_digits_under_jit(name):
    d = digits()
    x, y = jnp.asarray(d["x_train"]), jnp.asarray(d["y_train"])
    # The paper keeps the last layers in high precision; the head's 10 outputs also fit no
    # 16 x 16 tile.
    model = jq.flax.quantize_model(_MLP(), jq.recipes.get(name).rules(keep_float=["out"]))
    params = jax.jit(model.init)(_rngs(0), x[:64])["params"]
    tx = optax.adam(3e-3)

    def loss(p, xb, yb, k):
        logits = model.apply({"params": p}, xb, rngs={"quant": k})
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @jax.jit
    def run(p, key):
        def step(carry, k):
            p, s = carry
            idx = jax.random.randint(k, (64,), 0, x.shape[0])
            val, g = jax.value_and_grad(loss)(p, x[idx], y[idx], jax.random.fold_in(k, 1))
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), val

        return jax.lax.scan(step, (p, tx.init(p)), jax.random.split(key, 60))

    with jax.numpy_dtype_promotion("standard"):
        (params, _), losses = run(params, jax.random.key(1))
    losses = np.asarray(losses)
    assert np.isfinite(losses).all()
    assert losses[-10:].mean() < 0.5 * losses[:5].mean()
    assert [m.path for m in jq.flax.report(model)] == ["inp", "mid"]
    xt = jnp.asarray(d["x_test"][:448])
    apply = jax.jit(lambda p, x, k: model.apply({"params": p}, x, rngs={"quant": k}))
    logits = np.asarray(apply(params, xt, jax.random.key(9)))
    acc = float((logits.argmax(-1) == d["y_test"][:448]).mean())
    assert acc > 0.85, acc


@pytest.mark.parametrize("hadamard", [("wgrad",), ()])
def test_quantize_model_runs_the_recipes_product(hadamard):
    # Every field of the recipe reaches the layer's product (a dropped `hadamard` or
    # `backward` once left Flax models on the saved, unrotated backward without a word):
    # the Dense layer's gradients equal jq.dot_general's with the recipe's config.
    recipe = jq.recipes.nvfp4(hadamard=hadamard, stochastic_grad=False)
    model = jq.flax.quantize_model(nn.Dense(32, name="d"), recipe.rules())
    x = jax.random.normal(jax.random.key(0), (32, 64)) * jnp.exp(
        jax.random.normal(jax.random.key(1), (1, 64))
    )
    params = jax.jit(model.init)(jax.random.key(2), x)["params"]
    probe = jax.random.normal(jax.random.key(3), (32, 32))

    def via_flax(p):
        return (model.apply({"params": p}, x) * probe).sum()

    def direct(p):
        dn = (((1,), (0,)), ((), ()))
        y = jq.dot_general(x, p["kernel"], dn, config=recipe.config) + p["bias"][None]
        return (y * probe).sum()

    got, want = jax.jit(jax.grad(via_flax))(params), jax.jit(jax.grad(direct))(params)
    np.testing.assert_array_equal(np.asarray(got["kernel"]), np.asarray(want["kernel"]))
    if hadamard:  # the transform changes the quantized weight gradient
        saved = jq.recipes.nvfp4(hadamard=(), stochastic_grad=False).config
        dn = (((1,), (0,)), ((), ()))
        other = jax.jit(
            jax.grad(lambda p: (jq.dot_general(x, p["kernel"], dn, config=saved) * probe).sum())
        )
        assert not np.array_equal(np.asarray(other(params)["kernel"]), np.asarray(want["kernel"]))
