"""Stateful Flax rules (delayed scaling, LSQ, stochastic rounding), Linen nn.Einsum,
recipes, TWN / mean-abs calibration and the precision policy."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, serialization

import jaxquant as jq
from jaxquant.flax import Policy, QuantState, Rule, apply_policy, quantize_model, report

MATMUL = (((1,), (0,)), ((), ()))
X = jax.random.normal(jax.random.key(0), (8, 12))
DELAYED = jq.recipes.get("fp8_delayed", history_len=4)


def _linen_step(qmodel, variables, x):
    state = {k: v for k, v in variables.items() if k != "params"}
    y, new = qmodel.apply(variables, x, mutable=list(state))
    return y, {"params": variables["params"], **new}


# ------------------------------------------------------------------ delayed scaling


@pytest.mark.slow
def test_linen_delayed_scaling_threads_the_amax_history():
    qmodel = quantize_model(nn.Dense(5), DELAYED.rules())
    v = qmodel.init(jax.random.key(1), X)
    st = v["quant_state"]["quant"]
    assert isinstance(st["lhs_scaling"], jq.ScaleState)
    assert st["lhs_scaling"].amax_history.shape == (4,) and int(st["lhs_scaling"].count) == 0
    scaling = jq.delayed_scaling(DELAYED.act, history_len=4)
    ref_state = scaling.init(X.shape)
    kernel = v["params"]["kernel"]
    wscaling = jq.delayed_scaling(DELAYED.weight, history_len=4)
    wstate = wscaling.init(kernel.shape)
    step = jax.jit(lambda v, x: _linen_step(qmodel, v, x))
    for i in range(3):
        x = X * (1.0 + i)  # a growing range: delayed scales lag behind it
        y, v = step(v, x)
        s_act, ref_state = scaling.update(ref_state, x)
        s_w, wstate = wscaling.update(wstate, kernel)
        want = (
            jq.dot_general(
                x,
                kernel,
                MATMUL,
                lhs_spec=DELAYED.act,
                rhs_spec=DELAYED.weight,
                lhs_scale=s_act,
                rhs_scale=s_w,
            )
            + v["params"]["bias"][None]
        )
        np.testing.assert_allclose(y, want, rtol=1e-6)
    got = v["quant_state"]["quant"]["lhs_scaling"]
    np.testing.assert_array_equal(got.amax_history, ref_state.amax_history)
    assert int(got.count) == 3
    # Not mutable (evaluation): the stored scale is used and nothing changes.
    y_eval = qmodel.apply(v, X)
    want = (
        jq.dot_general(
            X,
            kernel,
            MATMUL,
            lhs_spec=DELAYED.act,
            rhs_spec=DELAYED.weight,
            lhs_scale=got.scale,
            rhs_scale=v["quant_state"]["quant"]["rhs_scaling"].scale,
        )
        + v["params"]["bias"][None]
    )
    np.testing.assert_allclose(y_eval, want, rtol=1e-6)


@pytest.mark.slow
def test_delayed_state_survives_tree_map_jit_and_checkpointing():
    qmodel = quantize_model(nn.Dense(5), DELAYED.rules())
    v = qmodel.init(jax.random.key(1), X)
    _, v = _linen_step(qmodel, v, X)
    same = jax.jit(lambda t: jax.tree.map(lambda a: a, t))(v)
    assert isinstance(same["quant_state"]["quant"]["lhs_scaling"], jq.ScaleState)
    restored = serialization.from_bytes(v, serialization.to_bytes(v))
    for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(jax.tree.leaves(v["quant_state"])) == 6  # 3 fields x 2 operands, none lost


@pytest.mark.slow
def test_nnx_delayed_scaling_matches_linen_and_freezes_in_eval():
    lin = quantize_model(nn.Dense(5), DELAYED.rules())
    v = lin.init(jax.random.key(1), X)
    m = nnx.Linear(12, 5, rngs=nnx.Rngs(0))
    m.kernel[...] = v["params"]["kernel"]
    m.bias[...] = v["params"]["bias"]
    quantize_model(m, DELAYED.rules())  # no sample input: shapes come from the kernel
    op = m.dot_general
    assert isinstance(op.lhs_count, QuantState)

    @nnx.jit
    def fwd(m, x):
        return m(x)

    for i in range(3):
        x = X * (1.0 + i)
        y_lin, v = _linen_step(lin, v, x)
        np.testing.assert_allclose(fwd(m, x), y_lin, rtol=1e-6)
    assert int(op.lhs_count[...]) == 3
    m.eval()
    history = op.lhs_amax_history[...]
    fwd(m, X * 10.0)
    np.testing.assert_array_equal(op.lhs_amax_history[...], history)
    assert int(op.lhs_count[...]) == 3


# ---------------------------------------------------------------------------- LSQ


@pytest.mark.slow
def test_lsq_gradients_follow_the_paper():
    spec = jq.QuantSpec("int4", jq.per_channel(-1))
    x = jnp.array([[0.3, -2.0], [9.0, 0.26], [-0.1, 1.1]])
    step = jnp.array([[0.5, 0.25]])
    out = jq.lsq_fake_quant(x, spec, step)
    y = x / step
    q = jnp.clip(jnp.round(y), -7, 7)
    np.testing.assert_allclose(out, q * step, rtol=1e-6)
    gx, gs = jax.grad(lambda x, s: jnp.sum(jq.lsq_fake_quant(x, spec, s) * x), (0, 1))(x, step)
    inside = (y >= -7) & (y <= 7)
    np.testing.assert_allclose(gx, jnp.where(inside, x, 0.0) + q * step, rtol=1e-6)
    want = jnp.sum(x * jnp.where(inside, q - y, q), axis=0, keepdims=True) / np.sqrt(3 * 7)
    np.testing.assert_allclose(gs, want, rtol=1e-5)
    with pytest.raises(ValueError, match="does not broadcast"):
        jq.lsq_fake_quant(x, spec, jnp.ones((3,)))
    with pytest.raises(ValueError, match="symmetric"):
        jq.lsq_fake_quant(x, jq.QuantSpec("uint8", calibration=jq.minmax(), symmetric=False), 1.0)


LSQ = jq.recipes.get("w8a8_int8").replace(ste="lsq", act=jq.QuantSpec("int8"))


@pytest.mark.slow
def test_linen_lsq_steps_are_trained_parameters():
    qmodel = quantize_model(nn.Dense(5), LSQ.rules())
    v = qmodel.init(jax.random.key(1), X)
    q = v["params"]["quant"]
    assert q["lhs_step"].shape == () and q["rhs_step"].shape == (1, 5)
    base = v["quant_state"]["quant"]["rhs_step_base"]
    np.testing.assert_allclose(base, jq.lsq_init(v["params"]["kernel"], LSQ.weight), rtol=1e-6)

    def loss(params, state):
        y, new = qmodel.apply({"params": params, **state}, X, mutable=["quant_state"])
        return jnp.mean(y**2), new

    grads, _ = jax.grad(loss, has_aux=True)(v["params"], {"quant_state": v["quant_state"]})
    assert float(jnp.abs(grads["quant"]["lhs_step"])) > 0
    assert float(jnp.min(jnp.abs(grads["quant"]["rhs_step"]))) > 0


@pytest.mark.slow
def test_nnx_lsq_trains_the_step_and_sets_the_base_from_the_first_batch():
    m = nnx.Linear(12, 5, rngs=nnx.Rngs(0))
    quantize_model(m, LSQ.rules())
    op = m.dot_general
    assert float(op.lhs_step_base[...]) == 0.0
    with jax.numpy_dtype_promotion("standard"):
        opt = nnx.Optimizer(m, optax.sgd(0.1), wrt=nnx.Param)

        @nnx.jit
        def step(m, opt):
            loss, g = nnx.value_and_grad(lambda m: jnp.mean(m(X) ** 2))(m)
            opt.update(m, g)
            return loss

        step(m, opt)
    np.testing.assert_allclose(
        op.lhs_step_base[...], jq.lsq_init(X, LSQ.act).reshape(()), rtol=1e-6
    )
    assert float(op.lhs_step[...]) != 1.0


# ------------------------------------------------------------- stochastic rounding

SR = Rule(".*", weight=jq.QuantSpec("int4", rounding="stochastic"))


def test_linen_stochastic_rules_draw_from_the_quant_stream():
    qmodel = quantize_model(nn.Dense(5), SR)
    v = qmodel.init({"params": jax.random.key(1), "quant": jax.random.key(2)}, X)
    a = qmodel.apply(v, X, rngs={"quant": jax.random.key(3)})
    b = qmodel.apply(v, X, rngs={"quant": jax.random.key(4)})
    c = qmodel.apply(v, X, rngs={"quant": jax.random.key(3)})
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, c)
    with pytest.raises(ValueError, match=r"rngs=\{'quant': key\}"):
        qmodel.apply(v, X)


def test_nnx_stochastic_rules_need_rngs_and_round_to_nearest_in_eval():
    m = nnx.Linear(12, 5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"nnx.Rngs\(quant=seed\)"):
        quantize_model(m, SR)
    assert report(m) == []  # the failed call changed nothing
    quantize_model(m, SR, rngs=nnx.Rngs(quant=0))
    a, b = m(X), m(X)
    assert not np.allclose(a, b)  # fresh key per call
    m.eval()
    nearest = (
        jq.dot_general(X, m.kernel[...], MATMUL, rhs_spec=SR.weight.replace(rounding="nearest"))
        + m.bias[...][None]
    )
    np.testing.assert_allclose(m(X), nearest, rtol=1e-6)


# ---------------------------------------------------------------- Linen nn.Einsum


@pytest.mark.parametrize("recipe", ["w8a8_int8", "fp8_delayed"])
def test_linen_einsum_is_quantized(recipe):
    rules = jq.recipes.get(recipe).rules()
    model = nn.Einsum((12, 5), "bi,io->bo")
    qmodel = quantize_model(model, rules)
    v = qmodel.init(jax.random.key(1), X)
    assert jax.tree.structure(v["params"]) == jax.tree.structure(
        model.init(jax.random.key(1), X)["params"]
    )
    assert [m.module for m in report(qmodel)] == ["Einsum"]
    r = jq.recipes.get(recipe)
    y = qmodel.apply(v, X, mutable=["quant_state"])[0] if "quant_state" in v else qmodel.apply(v, X)
    want = jq.einsum("bi,io->bo", X, v["params"]["kernel"], lhs_spec=r.act, rhs_spec=r.weight)
    np.testing.assert_allclose(y, want + v["params"]["bias"][None], rtol=1e-6)


# -------------------------------------------------------------------- rule checks


def test_rule_validation_of_stateful_options():
    with pytest.raises(ValueError, match="per_tensor"):
        Rule(".*", act=jq.QuantSpec("int8", jq.per_token(-1)), scaling="delayed")
    with pytest.raises(ValueError, match="pick one"):
        Rule(".*", weight=jq.QuantSpec("int8"), scaling="delayed", ste="lsq")
    with pytest.raises(ValueError, match="ste must be"):
        Rule(".*", ste="magic")
    with pytest.raises(ValueError, match="scaling must be"):
        Rule(".*", scaling="lazy")
    assert Rule(".*", weight=jq.QuantSpec("int8", jq.per_channel(-1)), scaling="delayed").stateful


# ------------------------------------------------------------------------ recipes


def test_recipes_registry_and_conversions():
    assert set(jq.recipes.names()) == {
        "fp8_current",
        "fp8_delayed",
        "w8a8_int8",
        "w4a16_int4",
        "binary",
        "ternary",
        "mxfp8",
        "nvfp4",
        "mxfp4",
    }
    with pytest.raises(ValueError, match=r"unknown recipe 'int3'.*w8a8_int8"):
        jq.recipes.get("int3")
    with pytest.raises(TypeError, match="group_size"):
        jq.recipes.get("w8a8_int8", group_size=3)
    assert jq.recipes.get("w4a16_int4", group_size=32).weight.granularity == jq.per_block(0, 32)
    with pytest.raises(ValueError, match="keeps state"):
        jq.recipes.get("fp8_delayed").dot_kwargs()
    rules = jq.recipes.get("binary").rules("Dense_.*", keep_float=["Dense_0"])
    assert [r.pattern for r in rules] == ["Dense_0", "Dense_.*"] and not rules[0].quantizes


def test_recipe_and_rule_fields_are_checked_where_written():
    """A Recipe used to hold anything (weight="int8", history_len=-1) until rules() ran."""
    with pytest.raises(TypeError, match=r"Recipe.weight must be a jq.QuantSpec or None"):
        jq.recipes.Recipe("r", "int8", None, None)
    with pytest.raises(ValueError, match=r"Recipe.history_len must be an int in 1\.\."):
        jq.recipes.fp8_delayed(history_len=0)
    with pytest.raises(ValueError, match=r"Recipe.margin must be in -126..126, got 200"):
        jq.recipes.fp8_delayed().replace(margin=200)
    with pytest.raises(TypeError, match=r"w4a16_int4: group_size must be an int, got 2.5"):
        jq.recipes.w4a16_int4(2.5)  # was int(2.5) = 2
    recipe = jq.recipes.fp8_delayed(np.int64(4), np.int32(1))
    assert (recipe.history_len, recipe.margin) == (4, 1) and type(recipe.margin) is int
    assert jq.recipes.w4a16_int4(np.int64(32)).weight.granularity == jq.per_block(0, 32)
    rule = recipe.rules()[0]
    assert (rule.history_len, rule.margin) == (4, 1)
    with pytest.raises(TypeError, match=r"Rule.margin \(powers of two of headroom\) must be"):
        Rule(".*", margin=0.5)
    with pytest.raises(TypeError, match=r"Rule.history_len must be an int, got True"):
        Rule(".*", history_len=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["fp8_current", "w8a8_int8", "w4a16_int4", "binary", "ternary", "mxfp8"]
)
def test_every_recipe_runs_in_plain_jax_under_jit_and_grad(name):
    kw = jq.recipes.get(name, **({"group_size": 32} if name == "w4a16_int4" else {})).dot_kwargs()
    x = jax.random.normal(jax.random.key(1), (4, 64))
    w = jax.random.normal(jax.random.key(2), (64, 32))
    f = jax.jit(jax.grad(lambda w: jnp.sum(jq.dot_general(x, w, MATMUL, **kw) ** 2)))
    g = f(w)
    assert g.shape == w.shape and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0


# -------------------------------------------------------------- binary / ternary


def test_twn_thresholds_and_scales_per_channel():
    w = jnp.array([[0.1, 4.0], [-1.0, -0.2], [2.0, 0.3], [0.05, -0.1]])
    spec = jq.QuantSpec("ternary", jq.per_channel(-1), jq.twn())
    out = np.asarray(jq.fake_quant(w, spec))
    for c in range(2):
        col = np.asarray(w[:, c])
        delta = 0.7 * np.mean(np.abs(col))
        kept = np.abs(col) > delta
        alpha = np.abs(col[kept]).mean()
        np.testing.assert_allclose(out[:, c], np.where(kept, np.sign(col) * alpha, 0), rtol=1e-6)
    q = jq.quantize(w, spec)
    np.testing.assert_allclose(jq.dequantize(q), out, rtol=1e-6)
    with pytest.raises(ValueError, match="ternary"):
        jq.QuantSpec("int2", calibration=jq.twn())


@pytest.mark.slow
def test_binary_mean_abs_is_sign_times_mean():
    w = jax.random.normal(jax.random.key(5), (16, 3))
    out = jq.fake_quant(w, jq.QuantSpec("binary", jq.per_channel(-1), jq.mean_abs()))
    want = jnp.where(w >= 0, 1.0, -1.0) * jnp.mean(jnp.abs(w), axis=0, keepdims=True)
    np.testing.assert_allclose(out, want, rtol=1e-6)


# ------------------------------------------------------------------------- policy


@pytest.mark.slow
def test_linen_policy_dtypes():
    seen = []

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(8)(x)
            seen.append(h.dtype)
            return nn.Dense(2)(h)

    model = apply_policy(M(), Policy(compute_dtype=jnp.bfloat16, output_dtype=jnp.float32))
    v = model.init(jax.random.key(0), X)
    assert {a.dtype for a in jax.tree.leaves(v)} == {np.dtype("float32")}
    y = model.apply(v, X)
    assert y.dtype == np.float32 and seen[-1] == jnp.bfloat16
    q = quantize_model(model, jq.recipes.get("fp8_current").rules())
    assert q.apply(v, X).dtype == np.float32
    with pytest.raises(ValueError, match="floating"):
        Policy(compute_dtype=jnp.int8)


def test_nnx_policy_casts_params_in_place():
    m = nnx.Linear(12, 5, rngs=nnx.Rngs(0))
    kernel = m.kernel
    pm = apply_policy(m, Policy(param_dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16))
    assert m.kernel is kernel and m.kernel[...].dtype == jnp.bfloat16 and m.dtype == jnp.bfloat16
    assert pm(X).dtype == np.float32


@pytest.mark.slow
def test_delayed_state_in_a_train_state_loop():
    """The BatchNorm pattern: a TrainState with the extra collection, updated each step."""
    from flax.training import train_state

    class State(train_state.TrainState):
        quant_state: dict

    qmodel = quantize_model(nn.Dense(5), DELAYED.rules())
    v = qmodel.init(jax.random.key(1), X)
    with jax.numpy_dtype_promotion("standard"):
        st = State.create(
            apply_fn=qmodel.apply,
            params=v["params"],
            tx=optax.sgd(0.1),
            quant_state=v["quant_state"],
        )

        @jax.jit
        def step(st, x):
            def loss(p):
                y, new = st.apply_fn(
                    {"params": p, "quant_state": st.quant_state}, x, mutable=["quant_state"]
                )
                return jnp.mean(y**2), new["quant_state"]

            (val, qs), g = jax.value_and_grad(loss, has_aux=True)(st.params)
            return st.apply_gradients(grads=g, quant_state=qs), val

        losses = []
        for _ in range(5):
            st, val = step(st, X)
            losses.append(float(val))
    assert int(st.quant_state["quant"]["lhs_scaling"].count) == 5
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_errors_name_the_layer():
    model = nn.Sequential([nn.Dense(64), nn.Dense(10)])
    qmodel = quantize_model(model, jq.recipes.get("mxfp8").rules())
    with pytest.raises(ValueError, match=r"layer 'layers_1'.*grad_spec.*\(4, 10\).*in float"):
        qmodel.init(jax.random.key(0), jnp.ones((4, 64)))
    m = nnx.Linear(64, 10, rngs=nnx.Rngs(0))
    quantize_model(
        m, jq.recipes.get("fp8_delayed").replace(grad=jq.recipes.get("mxfp8").grad).rules()
    )
    with pytest.raises(ValueError, match=r"the model itself.*grad_spec"):
        m(jnp.ones((4, 64)))


# ------------------------------------------------ the shared step (flax/stateful.py)


@pytest.mark.slow
def test_stateful_step_is_pure_and_takes_a_config_or_a_rule():
    from jaxquant._src.flax import stateful

    int8 = jq.QuantSpec("int8")
    cfg = jq.QuantConfig(weight=int8, act=int8, scaling="delayed", history_len=4)
    w = jax.random.normal(jax.random.key(2), (12, 5))
    state = stateful.init(cfg, X, w)
    assert set(state) == set(stateful.state_names(cfg)) == {"lhs_scaling", "rhs_scaling"}
    _close_tree(
        state, stateful.init(Rule(".*", cfg), X.shape, jax.ShapeDtypeStruct(w.shape, w.dtype))
    )
    sc = jq.delayed_scaling(int8, history_len=4)
    ref_l, ref_r = sc.init(X.shape), sc.init(w.shape)
    apply = jax.jit(lambda s, x: stateful.apply(cfg, s, x, w, dimension_numbers=MATMUL))
    for i in range(3):
        x = X * (1.0 + i)
        y, new = apply(state, x)
        s_l, ref_l = sc.update(ref_l, x)
        s_r, ref_r = sc.update(ref_r, w)
        want = jq.dot_general(
            x, w, MATMUL, lhs_spec=int8, rhs_spec=int8, lhs_scale=s_l, rhs_scale=s_r
        )
        np.testing.assert_array_equal(y, want)
        assert int(state["lhs_scaling"].count) == i  # the input state is not changed
        state = new
    _close_tree(state, {"lhs_scaling": ref_l, "rhs_scaling": ref_r})
    # Evaluation: the stored scale, the state returned as it was.
    y, same = stateful.apply(cfg, state, X * 9.0, w, dimension_numbers=MATMUL, training=False)
    assert same is state
    want = jq.dot_general(
        X * 9.0,
        w,
        MATMUL,
        lhs_spec=int8,
        rhs_spec=int8,
        lhs_scale=state["lhs_scaling"].scale,
        rhs_scale=state["rhs_scaling"].scale,
    )
    np.testing.assert_array_equal(y, want)
    # The einsum form gives the same product.
    y_e, _ = stateful.apply(cfg, state, X, w, subscripts="bi,io->bo", training=False)
    y_d, _ = stateful.apply(cfg, state, X, w, dimension_numbers=MATMUL, training=False)
    np.testing.assert_allclose(y_e, y_d, rtol=1e-6)


def _close_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-6)


@pytest.mark.slow
def test_stateful_lsq_bases_come_from_init_arrays_or_the_first_training_call():
    from jaxquant._src.flax import stateful

    lsq = LSQ.rules()[0]
    w = jax.random.normal(jax.random.key(2), (12, 5))
    from_data = stateful.init(lsq, X, w)
    np.testing.assert_allclose(from_data["lhs_step_base"], jq.lsq_init(X, LSQ.act).reshape(()))
    assert stateful.trained("lhs_step") and not stateful.trained("lhs_step_base")
    from_shapes = stateful.init(lsq, X.shape, w.shape)
    assert float(from_shapes["lhs_step_base"]) == 0.0
    _, frozen = stateful.apply(lsq, from_shapes, X, w, dimension_numbers=MATMUL, training=False)
    assert float(frozen["lhs_step_base"]) == 0.0
    y, new = stateful.apply(lsq, from_shapes, X, w, dimension_numbers=MATMUL)
    _close_tree(new, from_data)
    y_data, _ = stateful.apply(lsq, from_data, X, w, dimension_numbers=MATMUL)
    np.testing.assert_array_equal(y, y_data)


def test_stateful_step_refuses_what_it_cannot_run():
    from jaxquant._src.flax import stateful

    w = jnp.ones((12, 5))
    delayed = DELAYED.rules()[0]
    state = stateful.init(delayed, X, w)
    with pytest.raises(ValueError, match=r"layer 'a/b'.*\['lhs_step'.*made for another config"):
        stateful.apply(LSQ.rules()[0], state, X, w, dimension_numbers=MATMUL, where="a/b")
    with pytest.raises(ValueError, match="exactly one of dimension_numbers"):
        stateful.apply(delayed, state, X, w)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        stateful.apply(SR, {}, X, w, dimension_numbers=MATMUL)
    y, _ = stateful.apply(SR, {}, X, w, dimension_numbers=MATMUL, training=False)  # nearest
    want = jq.dot_general(X, w, MATMUL, rhs_spec=SR.weight.replace(rounding="nearest"))
    np.testing.assert_array_equal(y, want)
    served = jq.quantize(w, delayed.weight)
    with pytest.raises(ValueError, match=r"served QArray.*stateless rules"):
        stateful.apply(delayed, state, X, served, dimension_numbers=MATMUL)
    with pytest.raises(TypeError, match=r"jq.QuantConfig or a jq.flax.Rule.*no weight"):
        stateful.init(object(), X, w)
    with pytest.raises(TypeError, match="rhs must be an array"):
        stateful.init(delayed, X, "shape")
