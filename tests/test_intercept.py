"""Interception: every contraction inside a matched module is quantized, whatever calls it
(issue 12 item 4), Linen and NNX, eager and jit; every contraction is listed with its reason.

The oracle of each quantized product is jq.dot_general / jq.einsum called by hand with the
weight spec on the parameter's operand: the intercepted call must give the same bits.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import jaxquant as jq
from jaxquant.flax import Rule, contractions, quantize_model, report

W8 = jq.QuantSpec("int8", jq.per_channel(-1))
A8 = jq.QuantSpec("int8")
RULE = Rule(".*", weight=W8, act=A8)
X = jax.random.normal(jax.random.key(0), (3, 5, 8))


def _bits(a, b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------ custom Linen layers


class Conv1D(nn.Module):
    """Hugging Face's FlaxConv1D: kernel stored (out, in), transposed, lax.dot_general."""

    features: int = 6

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.5), (self.features, x.shape[-1]))
        kernel = jnp.asarray(kernel.transpose(), x.dtype)
        return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


class LoRADense(nn.Dense):
    """A Dense subclass with its own __call__ (kernel plus a low-rank update)."""

    rank: int = 2

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        a = self.param("lora_a", nn.initializers.normal(0.5), (x.shape[-1], self.rank))
        b = self.param("lora_b", nn.initializers.normal(0.5), (self.rank, self.features))
        return x @ kernel + (x @ a) @ b


class WeightFirst(nn.Module):
    """The weight as the lhs: jnp.einsum('oi,bti->bto', kernel, x)."""

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.5), (6, x.shape[-1]))
        return jnp.einsum("oi,bti->bto", kernel, x)


class Tied(nn.Module):
    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(16, 8)
        return embed.attend(nn.Dense(8)(embed(ids)))


def _init_apply(module, *args, rules=RULE, **kw):
    qmodel = quantize_model(module, rules, **kw)
    variables = qmodel.init(jax.random.key(1), *args)
    return qmodel, variables


@pytest.mark.slow
def test_custom_dot_general_with_transposed_kernel_is_quantized_bitwise():
    qmodel, variables = _init_apply(Conv1D(), X)
    got = qmodel.apply(variables, X)
    kernel = variables["params"]["kernel"].T
    want = jq.dot_general(X, kernel, (((2,), (0,)), ((), ())), lhs_spec=A8, rhs_spec=W8)
    _bits(got, want)
    _bits(jax.jit(qmodel.apply)(variables, X), want)
    (c,) = contractions(qmodel)
    assert (c.path, c.module, c.op, c.weight, c.quantized) == (
        "",
        "Conv1D",
        "dot_general",
        "rhs",
        True,
    )
    assert c.shapes == ((3, 5, 8), (8, 6))
    assert [(m.path, m.module) for m in report(qmodel)] == [("", "Conv1D")]


@pytest.mark.slow
def test_subclass_with_own_call_quantizes_every_product():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return LoRADense(6, name="lora")(x)

    qmodel, variables = _init_apply(Net(), X)
    p = variables["params"]["lora"]
    want = jq.dot_general(X, p["kernel"], (((2,), (0,)), ((), ())), lhs_spec=A8, rhs_spec=W8)
    xa = jq.dot_general(X, p["lora_a"], (((2,), (0,)), ((), ())), lhs_spec=A8, rhs_spec=W8)
    want = want + jq.dot_general(
        xa, p["lora_b"], (((2,), (0,)), ((), ())), lhs_spec=A8, rhs_spec=W8
    )
    _bits(qmodel.apply(variables, X), want)
    found = contractions(qmodel)
    assert [(c.path, c.op, c.quantized) for c in found] == [("lora", "@", True)] * 3
    assert [m.module for m in report(qmodel)] == ["LoRADense"]


@pytest.mark.slow
def test_weight_as_lhs_takes_the_weight_spec():
    qmodel, variables = _init_apply(WeightFirst(), X)
    kernel = variables["params"]["kernel"]
    want = jq.einsum("oi,bti->bto", kernel, X, lhs_spec=W8, rhs_spec=A8)
    _bits(qmodel.apply(variables, X), want)
    assert contractions(qmodel)[0].weight == "lhs"


@pytest.mark.slow
def test_tied_head_through_embed_attend():
    ids = jnp.array([[1, 2, 3], [4, 5, 6]])
    qmodel, variables = _init_apply(Tied(), ids)
    got = qmodel.apply(variables, ids)
    p = variables["params"]
    h = jq.dot_general(
        p["Embed_0"]["embedding"][ids],
        p["Dense_0"]["kernel"],
        (((2,), (0,)), ((), ())),
        lhs_spec=A8,
        rhs_spec=W8,
    ) + p["Dense_0"]["bias"].reshape(1, 1, -1)
    want = jq.dot_general(
        h, p["Embed_0"]["embedding"].T, (((2,), (0,)), ((), ())), lhs_spec=A8, rhs_spec=W8
    )
    _bits(got, want)
    assert [(c.path, c.op, c.quantized) for c in contractions(qmodel)] == [
        ("Dense_0", "dot_general", True),
        ("Embed_0", "dot", True),
    ]


def test_activation_products_stay_float_with_their_reason():
    class Attn(nn.Module):
        @nn.compact
        def __call__(self, x):
            q = nn.Dense(8, name="q")(x)
            return jnp.einsum("bqd,bkd->bqk", q, x)

    qmodel, variables = _init_apply(Attn(), X)
    qmodel.apply(variables, X)
    (dense, attn) = contractions(qmodel)
    assert dense.quantized and dense.path == "q"
    assert (attn.path, attn.weight, attn.quantized) == ("", None, False)
    assert "activations" in attn.reason


@pytest.mark.slow
def test_a_float_rule_keeps_an_intercepted_module_float():
    rules = (Rule("conv"), RULE)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4)(Conv1D(name="conv")(x))

    qmodel, variables = _init_apply(Net(), X, rules=rules)
    got = qmodel.apply(variables, X)
    found = {c.path: c for c in contractions(qmodel)}
    assert not found["conv"].quantized and "keeps it in float" in found["conv"].reason
    assert found["Dense_0"].quantized
    p = variables["params"]
    h = X @ p["conv"]["kernel"].T
    want = jq.dot_general(
        h, p["Dense_0"]["kernel"], (((2,), (0,)), ((), ())), lhs_spec=A8, rhs_spec=W8
    )
    _bits(got, want + p["Dense_0"]["bias"].reshape(1, 1, -1))


def test_a_weight_product_that_cannot_be_quantized_raises_or_warns():
    class ThreeWay(nn.Module):
        @nn.compact
        def __call__(self, x):
            w = self.param("w", nn.initializers.normal(), (8, 4))
            v = self.param("v", nn.initializers.normal(), (4, 2))
            return jnp.einsum("bti,io,op->btp", x, w, v)

    with pytest.raises(ValueError, match=r"stays in float: an einsum of 3 operands"):
        _init_apply(ThreeWay(), X)
    with pytest.warns(UserWarning, match=r"stays in float"):
        qmodel, _ = _init_apply(ThreeWay(), X, strict=False)
    assert contractions(qmodel)[0].quantized is False


@pytest.mark.slow
def test_delayed_scaling_on_an_intercepted_product_matches_a_dense_layer():
    """fp8 with delayed scaling (amax histories in "quant_state") on FlaxConv1D's own
    lax.dot_general: the same outputs and histories, step after step, as nn.Dense running
    the same kernel (transposed) through its QuantOp child."""
    (rule,) = jq.recipes.get("fp8_delayed").rules()
    conv = quantize_model(Conv1D(), rule)
    dense = quantize_model(nn.Dense(6, use_bias=False), rule)
    vc = conv.init(jax.random.key(1), X)
    vd = {
        "params": {"kernel": vc["params"]["kernel"].T},
        "quant_state": {"quant": {"lhs_scaling": vc["quant_state"]["jq0_lhs_scaling"]}},
    }
    vd["quant_state"]["quant"]["rhs_scaling"] = vc["quant_state"]["jq0_rhs_scaling"]
    step_c = jax.jit(lambda v, x: conv.apply(v, x, mutable=["quant_state"]))
    step_d = jax.jit(lambda v, x: dense.apply(v, x, mutable=["quant_state"]))
    for t in range(3):
        x = X * (1.0 + t)  # a growing range: the history matters
        yc, sc = step_c(vc, x)
        yd, sd = step_d(vd, x)
        _bits(yc, yd)
        for op in ("lhs", "rhs"):
            _bits(
                sc["quant_state"][f"jq0_{op}_scaling"].scale,
                sd["quant_state"]["quant"][f"{op}_scaling"].scale,
            )
        vc, vd = {**vc, **sc}, {**vd, **sd}
    assert int(vc["quant_state"]["jq0_rhs_scaling"].count) == 3
    assert contractions(conv)[0].quantized


@pytest.mark.slow
def test_nnx_delayed_scaling_on_intercepted_products_matches_linen():
    """The same delayed fp8 step in NNX (state as the module's attributes, created on the
    first call, carried out of nnx.jit) as in Linen (the module's scope), step by step."""
    (rule,) = jq.recipes.get("fp8_delayed").rules()
    model = NnxConv1D(8, 6, nnx.Rngs(0))
    lin = quantize_model(Conv1D(), rule)
    v = lin.init(jax.random.key(1), X)
    v = {**v, "params": {"kernel": model.kernel[...]}}
    quantize_model(model, rule)
    step = nnx.jit(lambda m, x: m(x))
    lstep = jax.jit(lambda v, x: lin.apply(v, x, mutable=["quant_state"]))
    for t in range(3):
        x = X * (1.0 + t)
        y = step(model, x)
        ly, st = lstep(v, x)
        v = {**v, **st}
        _bits(y, ly)
        _bits(model.jq0_rhs_scaling.get_value().scale, st["quant_state"]["jq0_rhs_scaling"].scale)
    assert int(model.jq0_rhs_scaling.get_value().count) == 3
    model.eval()  # frozen: the history stays
    step(model, X)
    assert int(model.jq0_rhs_scaling.get_value().count) == 3


class ThreeWayEinsum(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(), (8, 4))
        v = self.param("v", nn.initializers.normal(), (4, 2))
        return jnp.einsum("bti,io,op->btp", x, w, v)


def test_the_patches_are_undone_even_after_an_error():
    originals = (lax.dot_general, jnp.einsum, jnp.dot, jnp.matmul, lax.conv_general_dilated)
    with pytest.raises(ValueError):
        _init_apply(ThreeWayEinsum(), X)
    assert (lax.dot_general, jnp.einsum, jnp.dot, jnp.matmul, lax.conv_general_dilated) == originals
    # outside a quantized call, contractions are plain jax (no jaxquant in the jaxpr)
    jaxpr = jax.make_jaxpr(lambda a, b: a @ b)(jnp.ones((2, 3)), jnp.ones((3, 4)))
    assert [e.primitive.name for e in jaxpr.eqns] == ["dot_general"]


@pytest.mark.slow
def test_gradients_flow_through_intercepted_products():
    qmodel, variables = _init_apply(Conv1D(), X)

    def loss(params):
        return jnp.sum(qmodel.apply({"params": params}, X) ** 2)

    g = jax.jit(jax.grad(loss))(variables["params"])
    assert g["kernel"].shape == (6, 8) and bool(jnp.all(jnp.isfinite(g["kernel"])))
    assert float(jnp.abs(g["kernel"]).sum()) > 0


# ------------------------------------------------------------------------------- NNX


class NnxConv1D(nnx.Module):
    def __init__(self, din, dout, rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (dout, din)))

    def __call__(self, x):
        return lax.dot_general(x, self.kernel[...].T, (((x.ndim - 1,), (0,)), ((), ())))


class NnxLoRA(nnx.Linear):
    def __init__(self, din, dout, rngs):
        super().__init__(din, dout, use_bias=False, rngs=rngs)
        self.lora_a = nnx.Param(jax.random.normal(rngs.params(), (din, 2)))
        self.lora_b = nnx.Param(jax.random.normal(rngs.params(), (2, dout)))

    def __call__(self, x):
        return x @ self.kernel[...] + (x @ self.lora_a[...]) @ self.lora_b[...]


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = NnxConv1D(8, 6, rngs)
        self.lora = NnxLoRA(6, 6, rngs)
        self.embed = nnx.Embed(16, 6, rngs=rngs)

    def __call__(self, x):
        return self.embed.attend(self.lora(self.conv(x)))


@pytest.mark.slow
def test_nnx_custom_layers_subclasses_and_attend_are_quantized_bitwise():
    model = NnxNet(nnx.Rngs(0))
    conv_k, a, b = model.conv.kernel[...], model.lora.lora_a[...], model.lora.lora_b[...]
    lora_k, emb = model.lora.kernel[...], model.embed.embedding[...]
    quantize_model(model, RULE)
    dn = (((2,), (0,)), ((), ()))

    def q(x, w):
        return jq.dot_general(x, w, dn, lhs_spec=A8, rhs_spec=W8)

    h = q(X, conv_k.T)
    h = q(h, lora_k) + q(q(h, a), b)
    want = q(h, emb.T)
    _bits(model(X), want)
    _bits(nnx.jit(lambda m, x: m(x))(model, X), want)
    found = contractions(model)
    assert [(c.path, c.op, c.quantized) for c in found] == [
        ("conv", "dot_general", True),
        ("lora", "@", True),
        ("lora", "@", True),
        ("lora", "@", True),
        ("embed", "dot", True),
    ]
    assert sorted(m.path for m in report(model)) == ["conv", "embed", "lora"]
    assert isinstance(model, NnxNet) and type(model).__name__ == "NnxNet"


@pytest.mark.slow
def test_nnx_float_rule_and_split_merge_keep_the_plan():
    model = NnxNet(nnx.Rngs(0))
    quantize_model(model, (Rule("embed"), RULE))
    graphdef, state = nnx.split(model)
    merged = nnx.merge(graphdef, state)
    merged(X)
    found = {c.path: c for c in contractions(merged)}
    assert found["conv"].quantized and not found["embed"].quantized
    assert "keeps it in float" in found["embed"].reason


# ------------------------------------------------------- calibrate -> convert -> serve


class SquareConv1D(nn.Module):
    """FlaxConv1D with a square kernel: only the remembered transpose tells w from w.T."""

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.5), (x.shape[-1], x.shape[-1]))
        return lax.dot_general(x, kernel.transpose(), (((x.ndim - 1,), (0,)), ((), ())))


class TwoConv(nn.Module):
    @nn.compact
    def __call__(self, x):
        return SquareConv1D(name="square")(Conv1D(8, name="wide")(x))


def test_square_kernel_used_transposed_is_known_transposed():
    qmodel, _ = _init_apply(SquareConv1D(), X)
    (c,) = contractions(qmodel)
    assert (c.param, c.transposed) == ("kernel", True)


@pytest.mark.slow
def test_linen_calibrate_convert_serve_intercepted_layers_exactly():
    qmodel, variables = _init_apply(TwoConv(), X)
    res = jq.flax.calibrate(qmodel, [X], variables)
    assert sorted(res.ranges) == ["square", "wide"]  # observed through the interception
    static = quantize_model(TwoConv(), res.rules)
    want = static.apply(variables, X)
    served = jq.flax.convert(static, variables)
    p = served["params"]
    assert isinstance(p["wide"]["kernel"], jq.QArray) and p["wide"]["kernel"].shape == (8, 8)
    # stored in the parameter's own layout (out, in): per_channel(-1) of kernel.T is axis 0
    assert p["wide"]["kernel"].spec.granularity == jq.per_channel(0)
    assert p["square"]["kernel"].spec.granularity == jq.per_channel(0)
    assert p["wide"]["kernel"].values.dtype == np.int8
    _bits(static.apply(served, X), want)
    _bits(jax.jit(static.apply)(served, X), want)


def test_a_computed_weight_has_no_parameter_to_convert():
    class Head(nn.Module):  # Hugging Face GPT-2's tied head: lm_head.apply on embedding.T
        def setup(self):
            self.embed = nn.Embed(16, 8)
            self.head = nn.Dense(16, use_bias=False)

        def __call__(self, ids):
            h = self.embed(ids)
            kernel = self.embed.variables["params"]["embedding"].T
            return self.head.apply({"params": {"kernel": kernel}}, h)

    ids = jnp.array([[1, 2, 3]])
    qmodel, variables = _init_apply(Head(), ids)
    qmodel.apply(variables, ids)
    (c,) = contractions(qmodel)
    assert (c.path, c.quantized, c.param) == ("head", True, None)
    served = jq.flax.convert(qmodel, variables)  # nothing stored: the head is computed
    assert not any(
        isinstance(v, jq.QArray)
        for v in jax.tree.leaves(served, is_leaf=lambda t: isinstance(t, jq.QArray))
    )
    _bits(qmodel.apply(served, ids), qmodel.apply(variables, ids))


class NnxNoTie(nnx.Module):
    def __init__(self, rngs):
        self.conv = NnxConv1D(8, 6, rngs)
        self.lora = NnxLoRA(6, 6, rngs)

    def __call__(self, x):
        return self.lora(self.conv(x))


@pytest.mark.slow
def test_nnx_convert_serves_intercepted_layers_exactly():
    model = NnxNoTie(nnx.Rngs(0))
    quantize_model(model, Rule(".*", weight=W8))
    want = model(X)  # the call finds the intercepted contractions
    jq.flax.convert(model)
    conv_k = model.conv.kernel.get_value()
    assert isinstance(conv_k, jq.QArray) and conv_k.spec.granularity == jq.per_channel(0)
    assert isinstance(model.lora.lora_a.get_value(), jq.QArray)
    # Serving re-quantizes the dequantized kernels: the same codes, a scale that may differ
    # in its last bit (max |q s| / qmax), so the outputs agree to float32 rounding.
    for got in (model(X), nnx.jit(lambda m, x: m(x))(model, X)):
        np.testing.assert_allclose(got, want, rtol=0, atol=4e-7 * float(jnp.max(jnp.abs(want))))
    assert isinstance(model.conv.kernel.get_value(), jq.QArray)  # the state kept the QArray


@pytest.mark.slow
def test_nnx_attend_table_is_stored_quantized_in_its_own_layout():
    model = NnxNet(nnx.Rngs(0))
    quantize_model(model, Rule(".*", weight=W8))
    want = model(X)
    jq.flax.convert(model)
    table = model.embed.embedding.get_value()
    # attend uses embedding.T with per_channel(-1): one scale per table row, axis 0
    assert isinstance(table, jq.QArray) and table.spec.granularity == jq.per_channel(0)
    got = model(X)
    np.testing.assert_allclose(got, want, rtol=0, atol=4e-7 * float(jnp.max(jnp.abs(want))))


@jax.jit
def _jitted_helper(x, w):
    return x @ w


def test_a_product_inside_a_separately_jitted_helper_is_refused():
    """jax caches a jitted function's trace by its arguments: quantized inside the model,
    it would stay quantized when called anywhere else. Refused (strict) or left float."""

    class Helper(nn.Module):
        @nn.compact
        def __call__(self, x):
            return _jitted_helper(x, self.param("w", nn.initializers.normal(1.0), (8, 3)))

    with pytest.raises(ValueError, match=r"inside a jax.jit-compiled function"):
        _init_apply(Helper(), X)
    with pytest.warns(UserWarning, match=r"inside a jax.jit-compiled function"):
        qmodel, variables = _init_apply(Helper(), X, strict=False)
    w = variables["params"]["w"]
    _bits(_jitted_helper(X, w), jnp.matmul(X, w))  # the cached trace is the float one
    assert contractions(qmodel)[0].quantized is False
    # calibrate cannot record an activation from inside a helper's own trace either
    fresh = jax.jit(lambda x, w: x @ w)  # not traced yet (a cached trace is never re-run)

    class Fresh(nn.Module):
        @nn.compact
        def __call__(self, x):
            return fresh(x, self.param("w", nn.initializers.normal(1.0), (8, 3)))

    with pytest.raises(ValueError, match=r"calibrate: .*inside a jax.jit-compiled function"):
        jq.flax.calibrate(Fresh(), [X], variables, rules=RULE)
