"""Per-layer input statistics (jaxquant/_src/flax/statistics.py) against numpy.

The oracle runs the float model's layer inputs by hand in float64 numpy (the first layer
of an MLP sees the data, the second ``relu(x W1 + b1)``) or captures them with Flax's own
method interceptor (third-party models), then computes ``X^T X``, the channel absmax, the
mean ``|x|`` and the row count from first principles. The library accumulates in float32:
Hessians are compared with a tolerance relative to their largest entry.

Compiling is most of this file's time (issue 13): models are initialised by one jitted
``init`` each (eagerly, every initialiser compiles on its own), the MLP once for the file,
and the third-party models' layer inputs are captured inside one jitted call.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import jaxquant as jq
from jaxquant.flax import (
    LayerStatistics,
    Rule,
    Statistics,
    contractions,
    layer_statistics,
    quantize_model,
)

RULE = Rule(".*", weight=jq.QuantSpec("int4"))
IN, HIDDEN, OUT, ROWS = 4, 8, 2, 16


def _batches(n=3, rows=ROWS, seed=0):
    rng = np.random.default_rng(seed)
    # channels of different scales, so per-channel statistics differ
    scale = np.array([0.5, 1.0, 3.0, 10.0], np.float32)
    return [(rng.standard_normal((rows, IN)) * scale).astype(np.float32) for _ in range(n)]


def _init(model, *args, **kwargs):
    """``model.init(key(0), *args, **kwargs)`` as one compiled program."""
    return jax.jit(functools.partial(model.init, **kwargs))(jax.random.key(0), *args)


@functools.cache
def _mlp():
    """(model, variables), shared by the tests (none changes them)."""
    model = nn.Sequential([nn.Dense(HIDDEN), nn.relu, nn.Dense(OUT)])
    return model, _init(model, np.zeros((1, IN), np.float32))


def _mlp_inputs(variables, x):
    """The two Dense layers' inputs, by hand in float64."""
    p = variables["params"]
    w1, b1 = (np.asarray(p["layers_0"][k], np.float64) for k in ("kernel", "bias"))
    x = np.asarray(x, np.float64)
    return {"layers_0": x, "layers_2": np.maximum(x @ w1 + b1, 0.0)}


def _check(st, x, *, rtol=2e-6):
    """``st`` against the rows ``x`` (float64 numpy)."""
    assert isinstance(st, LayerStatistics)
    assert st.rows == x.shape[0]
    h = x.T @ x
    assert st.hessian.dtype == jnp.float32 and st.hessian.shape == h.shape
    np.testing.assert_allclose(st.hessian, h, rtol=0, atol=rtol * np.abs(h).max())
    np.testing.assert_allclose(st.absmax, np.abs(x).max(0), rtol=1e-6)
    np.testing.assert_allclose(st.mean_abs, np.abs(x).mean(0), rtol=1e-5)
    assert st.absmax.dtype == st.mean_abs.dtype == jnp.float32


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_mlp_statistics_equal_numpy_on_the_layer_inputs(jit):
    model, variables = _mlp()
    batches = _batches()
    if jit:
        stats = layer_statistics(model, batches, variables, rules=RULE)
    else:
        with jax.disable_jit():  # every step runs op by op
            stats = layer_statistics(model, batches, variables, rules=RULE)
    assert isinstance(stats, Statistics)
    assert list(stats) == ["layers_0", "layers_2"]  # call order
    assert stats.unreached == () and stats.unsupported == {} and stats.num_batches == 3
    ins = _mlp_inputs(variables, np.concatenate(batches))
    for path, x in ins.items():
        _check(stats[path], x)
        st = stats[path]
        assert (st.param, st.weight_axes, st.transposed, st.op, st.uses) == (
            "kernel",
            (0,),
            False,
            "dot_general",
            1,
        )
        assert st.channels == (x.shape[1],) and st.rule == RULE and st.samples is None


def test_streaming_over_three_batches_equals_one_big_batch():
    model, variables = _mlp()
    batches = _batches()
    qmodel = quantize_model(model, RULE)  # its rules are used
    streamed = layer_statistics(qmodel, batches, variables)
    whole = layer_statistics(qmodel, [np.concatenate(batches)], variables)
    for path in streamed:
        a, b = streamed[path], whole[path]
        assert a.rows == b.rows == 3 * ROWS
        np.testing.assert_array_equal(a.absmax, b.absmax)
        np.testing.assert_allclose(a.mean_abs, b.mean_abs, rtol=1e-6)
        np.testing.assert_allclose(
            a.hessian, b.hessian, rtol=0, atol=1e-6 * np.abs(b.hessian).max()
        )


class _NnxMlp(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(IN, HIDDEN, rngs=rngs)
        self.fc2 = nnx.Linear(HIDDEN, OUT, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.fc1(x)))


def test_linen_and_nnx_give_the_same_numbers_for_the_same_weights():
    model, variables = _mlp()
    nmodel = _NnxMlp(nnx.Rngs(1))
    for lin, nx in (("layers_0", nmodel.fc1), ("layers_2", nmodel.fc2)):
        nx.kernel.set_value(variables["params"][lin]["kernel"])
        nx.bias.set_value(variables["params"][lin]["bias"])
    batches = _batches()
    lin = layer_statistics(model, batches, variables, rules=RULE, max_samples=7)
    nn_ = layer_statistics(nmodel, batches, rules=RULE, max_samples=7)
    assert list(nn_) == ["fc1", "fc2"]
    for a, b in zip(lin.values(), nn_.values(), strict=True):
        assert a.rows == b.rows and a.channels == b.channels
        assert (a.param, a.weight_axes) == (b.param, b.weight_axes)
        np.testing.assert_allclose(a.hessian, b.hessian, rtol=1e-6)
        np.testing.assert_allclose(a.absmax, b.absmax, rtol=1e-6)
        np.testing.assert_allclose(a.mean_abs, b.mean_abs, rtol=1e-6)
        assert a.samples.shape == b.samples.shape == (7, a.channels[0])
    # the quantized NNX model's own rules are used
    _check(layer_statistics(quantize_model(nmodel, RULE), batches)["fc1"], np.concatenate(batches))


class _WithBatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.BatchNorm(use_running_average=not train)(nn.Dense(HIDDEN)(x))
        return nn.Dense(OUT)(x)


def test_every_collection_call_kwargs_and_keyword_batches():
    """A BatchNorm model called as ``apply(variables, x=..., train=False)``: the batch is a
    dict of keyword arguments, the flag a call keyword, the variables every collection."""
    model = _WithBatchNorm()
    x = _batches(1)[0]
    variables = _init(model, x, train=False)
    stats = layer_statistics(model, [{"x": x}], variables, rules=RULE, call_kwargs={"train": False})
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    bs = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["batch_stats"])
    h = np.asarray(x, np.float64) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    bn, st = p["BatchNorm_0"], bs["BatchNorm_0"]
    h = (h - st["mean"]) / np.sqrt(st["var"] + 1e-5) * bn["scale"] + bn["bias"]
    assert list(stats) == ["Dense_0", "Dense_1"]
    _check(stats["Dense_0"], np.asarray(x, np.float64))
    _check(stats["Dense_1"], h, rtol=1e-5)
    with pytest.raises(ValueError, match=r"updates that collection.*train"):
        layer_statistics(model, [x], variables, rules=RULE)  # train=True by default


# ------------------------------------------------------------ contractions modules compute


class _LinenOwnProducts(nn.Module):
    """Contractions written by hand: lax.dot_general, ``@`` with a transposed parameter,
    an einsum over two axes paired in the other order, and Embed.attend."""

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal(1.0)
        k = self.param("kernel", init, (IN, 6))
        h = Sub(name="proj")(lax.dot_general(x, k, (((1,), (0,)), ((), ()))))
        h3 = nn.Embed(10, 3, name="embed")
        return h3.attend(Head(name="head")(h.reshape(-1, 2, 3)))


class Sub(nn.Module):
    @nn.compact
    def __call__(self, h):
        w = self.param("w", nn.initializers.normal(1.0), (6, 6))  # (out, in): used as w.T
        b = self.param("b", nn.initializers.normal(1.0), (6, 6 + 1))
        del b  # a second rank-2 parameter that is never contracted
        return jnp.tanh(h @ w.T)


class Head(nn.Module):
    @nn.compact
    def __call__(self, h):  # h (n, 2, 3); the weight stores the pair as (3, 2, out)
        w = self.param("w", nn.initializers.normal(1.0), (3, 2, 3))
        return jnp.einsum("nab,bao->no", h, w)


def test_contractions_modules_compute_themselves_linen():
    model = _LinenOwnProducts()
    x = _batches(1, rows=5)[0]
    variables = _init(model, x)
    stats = layer_statistics(model, [x], variables, rules=RULE)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    x0 = np.asarray(x, np.float64)
    h = x0 @ p["kernel"]
    h2 = np.tanh(h @ p["proj"]["w"].T)
    n3 = h2.reshape(-1, 2, 3)
    h3 = np.einsum("nab,bao->no", n3, p["head"]["w"])
    assert list(stats) == ["", "proj", "head", "embed"]
    _check(stats[""], x0)
    assert (stats[""].param, stats[""].weight_axes, stats[""].op) == ("kernel", (0,), "dot_general")
    _check(stats["proj"], h, rtol=1e-5)
    assert (stats["proj"].param, stats["proj"].weight_axes, stats["proj"].transposed) == (
        "w",
        (1,),
        True,
    )
    assert stats["proj"].op == "@"
    # einsum: channels are (a, b) of the activation, paired with the weight's (1, 0)
    _check(stats["head"], n3.reshape(-1, 6), rtol=1e-5)
    assert stats["head"].channels == (2, 3) and stats["head"].weight_axes == (1, 0)
    _check(stats["embed"], h3, rtol=1e-5)
    assert (stats["embed"].param, stats["embed"].weight_axes, stats["embed"].transposed) == (
        "embedding",
        (1,),
        True,
    )


class _NnxOwnProduct(nnx.Module):
    def __init__(self, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (IN, 3)))

    def __call__(self, x):
        return lax.dot_general(x, self.w[...], (((1,), (0,)), ((), ())))


def test_a_layer_calling_lax_dot_general_itself_nnx():
    x = _batches(1)[0]
    stats = layer_statistics(_NnxOwnProduct(nnx.Rngs(0)), [x], rules=RULE)
    _check(stats[""], np.asarray(x, np.float64))
    assert (stats[""].param, stats[""].weight_axes) == ("w", (0,))


class _Tied(nn.Module):
    @nn.compact
    def __call__(self, x):
        d = nn.Dense(IN, name="shared")
        return d(jnp.tanh(d(x)))


def test_a_layer_used_twice_accumulates_both_uses():
    model = _Tied()
    x = _batches(1)[0]
    variables = _init(model, x)
    st = layer_statistics(model, [x], variables, rules=RULE)["shared"]
    p = variables["params"]["shared"]
    x0 = np.asarray(x, np.float64)
    x1 = np.tanh(x0 @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64))
    assert st.uses == 2
    _check(st, np.concatenate([x0, x1]), rtol=1e-5)


# ------------------------------------------------------------ jit, samples


_TRACES = []


class _Counted(nn.Module):
    @nn.compact
    def __call__(self, x):
        _TRACES.append(x.shape)
        return nn.Dense(2)(x)


def test_one_trace_per_batch_shape():
    model = _Counted()
    batches = _batches(3)
    variables = _init(model, batches[0])
    _TRACES.clear()
    stats = layer_statistics(model, batches, variables, rules=RULE)
    assert _TRACES == [(ROWS, IN)]  # three batches, one trace
    _TRACES.clear()
    stats = layer_statistics(model, [*batches, batches[0][:5]], variables, rules=RULE)
    # The same model and rules again: the traced step is reused, only the new shape traces.
    assert _TRACES == [(5, IN)]
    assert stats["Dense_0"].rows == 3 * ROWS + 5


def test_samples_are_distinct_rows_of_the_input():
    model, variables = _mlp()
    batches = _batches()
    x = np.concatenate(batches)
    st = layer_statistics(model, batches, variables, rules=RULE, max_samples=10)["layers_0"]
    assert st.samples.shape == (10, IN)
    rows = {r.tobytes(): i for i, r in enumerate(x)}
    picked = [rows[np.asarray(r).tobytes()] for r in st.samples]
    assert len(set(picked)) == 10
    # more slots than rows: every row, once
    all_rows = layer_statistics(model, batches, variables, rules=RULE, max_samples=100)
    got = np.asarray(all_rows["layers_0"].samples)
    assert got.shape == x.shape
    assert sorted(r.tobytes() for r in got) == sorted(r.tobytes() for r in x)
    # the key decides the sample
    other = layer_statistics(
        model, batches, variables, rules=RULE, max_samples=10, key=jax.random.key(7)
    )
    assert not np.array_equal(other["layers_0"].samples, st.samples)
    # hessian=False leaves the Hessian out, nothing else
    light = layer_statistics(model, batches, variables, rules=RULE, hessian=False)
    assert light["layers_0"].hessian is None
    np.testing.assert_array_equal(light["layers_0"].absmax, st.absmax)


def test_the_streamed_sample_is_uniform_over_rows():
    """Every row of three streamed batches is kept with probability k / n: the in-batch
    bottom-k and the merge across batches, vmapped over 4000 keys (the estimate's standard
    deviation is sqrt(p (1 - p) / 4000) = 0.006; the bound is 5 of them)."""
    from jaxquant._src.flax import statistics as S

    n_batch, rows, k, trials = 3, 10, 5, 4000
    x = jnp.arange(n_batch * rows * 2, dtype=jnp.float32).reshape(n_batch, rows, 2)

    def kept(key):
        acc = None
        for b in range(n_batch):
            new = S._use_stats(x[b], False, k, jax.random.fold_in(key, b))
            acc = new if acc is None else S._merge(acc, new, k)
        ids = (acc.samples[:, 0] / 2).astype(jnp.int32)
        return jnp.zeros(n_batch * rows, jnp.int32).at[ids].add(1)

    counts = jax.jit(jax.vmap(kept))(jax.random.split(jax.random.key(0), trials))
    assert int(counts.max()) == 1 and bool(jnp.all(counts.sum(1) == k))  # k distinct rows
    freq = np.asarray(counts.mean(0))
    p = k / (n_batch * rows)
    assert np.abs(freq - p).max() < 5 * np.sqrt(p * (1 - p) / trials)


# ------------------------------------------------------------ what has no statistics


class _Branchy(nn.Module):
    @nn.compact
    def __call__(self, x, head: bool = False):
        x = nn.Conv(4, (3,), name="conv")(x)
        x = nn.Dense(4, name="body")(x)
        return nn.Dense(2, name="head")(x) if head else x


def test_unreached_and_unsupported_layers_are_reported_by_name():
    model = _Branchy()
    x = np.ones((2, 5, 3), np.float32)
    variables = _init(model, x, head=True)
    stats = layer_statistics(model, [x], variables, rules=RULE)
    assert list(stats) == ["body"]
    assert stats.unreached == ("head",)
    assert list(stats.unsupported) == ["conv"] and "convolution" in stats.unsupported["conv"]
    with pytest.raises(KeyError, match="no batch reached it"):
        stats["head"]
    with pytest.raises(KeyError, match="unsupported: a convolution"):
        stats["conv"]
    # a batch that takes the branch reaches it; its static flag is one more compilation
    both = layer_statistics(model, [x, (x, True)], variables, rules=RULE)
    assert list(both) == ["body", "head"] and both.unreached == ()
    assert both["body"].rows == 2 * 2 * 5 and both["head"].rows == 2 * 5


class _Batched(nn.Module):
    @nn.compact
    def __call__(self, x):  # per-head weights: the weight has a batch axis
        w = self.param("w", nn.initializers.normal(1.0), (2, 3, 4))
        return jnp.einsum("bhd,hdk->bhk", x, w)


class _TwoWeights(nn.Module):
    @nn.compact
    def __call__(self, x):
        a = self.param("a", nn.initializers.normal(1.0), (IN, IN))
        b = self.param("b", nn.initializers.normal(1.0), (IN, 3))
        return (x @ a) @ b


@pytest.mark.parametrize(
    ("model", "x", "why"),
    [
        (_Batched(), np.ones((5, 2, 3), np.float32), "batch axes on the weight"),
        (_TwoWeights(), np.ones((5, IN), np.float32), "weight contractions differ"),
    ],
    ids=["batched", "two-weights"],
)
def test_unsupported_contractions_are_reported(model, x, why):
    variables = _init(model, x)
    stats = layer_statistics(model, [x], variables, rules=RULE)
    assert len(stats) == 0 and why in stats.unsupported[""]


def test_a_scanned_layer_is_refused_with_the_fix():
    scanned = nn.scan(
        lambda mdl, c, _: (nn.Dense(IN, name="d")(c), None),
        variable_axes={"params": 0},
        split_rngs={"params": True},
        length=2,
    )

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return scanned(self, x, None)[0]

    x = np.ones((2, IN), np.float32)
    variables = _init(Net(), x)
    with pytest.raises(ValueError, match=r"'d' runs inside a jax transformation.*unrolled"):
        layer_statistics(Net(), [x], variables, rules=RULE)


def test_non_finite_activations_name_the_batch_and_layer():
    model, variables = _mlp()
    batches = _batches()
    batches[1][3, 2] = np.nan
    with pytest.raises(ValueError, match=r"batch 1 gives 1 non-finite.*'layers_0'"):
        layer_statistics(model, batches, variables, rules=RULE)


# ------------------------------------------------------------ bad arguments


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batches": []}, ValueError, "no calibration batches"),
        ({"batches": 3}, TypeError, "batches must be an iterable"),
        ({"batches": np.ones((4, IN), np.float32)}, TypeError, r"one array.*pass \[x\]"),
        ({"batches": [object()]}, TypeError, r"batches\[0\] holds"),
        ({"hessian": "yes"}, TypeError, "hessian must be True or False"),
        ({"max_samples": -1}, ValueError, "max_samples must be an int >= 0"),
        ({"max_samples": 2.0}, TypeError, "max_samples must be an int"),
        ({"key": 3}, TypeError, "key must be a PRNG key"),
        ({"call_kwargs": [1]}, TypeError, "call_kwargs must be a dict"),
        ({"variables": None}, ValueError, "needs its variables"),
        ({"rules": None}, ValueError, "rules= with a plain model"),
        ({"model": "mlp"}, TypeError, "model must be a Flax Linen or NNX model"),
        ({"rules": Rule("nothing", weight=jq.QuantSpec("int4"))}, ValueError, "no weight"),
        (
            {"variables": {"batch_stats": {}}},
            ValueError,
            "Pass every collection",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_arguments_raise_naming_the_argument(kwargs, error, match):
    model, variables = _mlp()
    args = {"model": model, "batches": _batches(1), "variables": variables, "rules": RULE}
    args.update(kwargs)
    with pytest.raises(error, match=match) as info:
        layer_statistics(args.pop("model"), args.pop("batches"), **args)
    assert "layer_statistics" in str(info.value)


def test_model_and_variables_that_do_not_fit_together():
    model = _NnxMlp(nnx.Rngs(0))
    with pytest.raises(ValueError, match="NNX model holds its own variables"):
        layer_statistics(model, _batches(1), {"params": {}}, rules=RULE)
    with pytest.raises(ValueError, match="quantizes nothing"):
        layer_statistics(model, _batches(1))
    with pytest.raises(ValueError, match="quantized already; pass no rules"):
        layer_statistics(quantize_model(*_mlp()[:1], RULE), _batches(1), {}, rules=RULE)


# ------------------------------------------------------------ third-party models


def _gpt2():
    pytest.importorskip("transformers")
    import third_party_models as tp

    return tp, tp.get("hf_gpt2")


@pytest.mark.slow
def test_hf_gpt2_statistics_of_every_flaxconv1d_equal_the_captured_inputs():
    """transformers' FlaxGPT2 (random init): its FlaxConv1D projections call
    lax.dot_general with a stored (out, in) kernel. Their inputs, captured with Flax's own
    method interceptor, give the Hessians; the paths are the quantized contractions'."""
    tp, m = _gpt2()

    @jax.jit  # the float model's call, its FlaxConv1D inputs as the outputs
    def layer_inputs(variables, *args):
        captured: dict[str, list] = {}

        def capture(next_fun, args, kwargs, context):
            if type(context.module).__name__ == "FlaxConv1D" and context.method_name == "__call__":
                captured.setdefault("/".join(context.module.scope.path), []).append(args[0])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(capture):
            m.model.apply(variables, *args, **m.kwargs)
        return captured

    with tp.lenient():
        stats = layer_statistics(m.model, [m.args], m.variables, rules=RULE, call_kwargs=m.kwargs)
        captured = jax.tree.map(
            lambda a: np.asarray(a, np.float64), layer_inputs(m.variables, *m.args)
        )
        qmodel = quantize_model(m.model, RULE)
        # contractions() knows a Linen model's layers once it has run: an abstract call
        jax.eval_shape(lambda v: qmodel.apply(v, *m.args, **m.kwargs), m.variables)
    quantized = [c.path for c in contractions(qmodel) if c.quantized]
    assert sorted(stats) == sorted(quantized) and len(stats) == m.weight_contractions
    assert stats.unreached == ("transformer/wpe", "transformer/wte")  # lookups only
    assert stats["lm_head"].param is None  # the tied head's kernel is computed (wte.T)
    n = tp.BATCH * tp.LENGTH
    for path, (x,) in captured.items():
        st = stats[path]
        _check(st, x.reshape(n, -1), rtol=1e-5)
        assert (st.param, st.weight_axes, st.transposed) == ("kernel", (1,), True)


@pytest.mark.slow
def test_nnx_lm1b_statistics_cover_every_quantized_contraction():
    import third_party_models as tp

    m = tp.get("nnx_lm1b")
    with tp.lenient():
        stats = layer_statistics(m.model, [m.args], rules=RULE)
        qmodel = quantize_model(nnx.clone(m.model), RULE)
        graphdef, state = nnx.split(qmodel)  # contractions() knows them once it has run
        jax.eval_shape(lambda s: nnx.merge(graphdef, s)(*m.args), state)
    quantized = [c.path for c in contractions(qmodel) if c.quantized]
    assert sorted(stats) == sorted(quantized) and len(stats) == m.weight_contractions
    n = tp.BATCH * tp.LENGTH
    for st in stats.values():
        assert st.rows == n and st.hessian.shape == (np.prod(st.channels),) * 2
        h = np.asarray(st.hessian, np.float64)
        np.testing.assert_allclose(h, h.T, rtol=0, atol=1e-6 * np.abs(h).max())
        # mean(x^2) >= mean(|x|)^2 per channel (Jensen)
        assert np.all(np.diag(h) / n >= (1 - 1e-5) * np.asarray(st.mean_abs, np.float64) ** 2)
    out = stats["decoder/encoderdecoderblock_0/attention/out"]
    assert out.channels == (tp.HEADS, tp.WIDTH // tp.HEADS) and out.weight_axes == (0, 1)
    head = stats["decoder/output_embed"]
    assert (head.param, head.weight_axes, head.transposed, head.op) == (
        "embedding",
        (1,),
        True,
        "dot",
    )
