"""Per-layer errors during training (issue 15 item 6): quantize_model(..., errors=True).

Oracle: numpy recomputes the quantized MLP's forward and backward products from first
principles (int8 per-tensor absmax: codes = round-half-even(x / s), s = amax / 127) and
the SQNR of each product against the float product of the same operands. A layer with an
injected weight outlier has the lowest SQNR and is the one worst_layers picks.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxquant as jq
import jaxquant.optax as jqo
from jaxquant.flax import Rule, layer_errors, quantize_model, report, worst_layers

INT8 = jq.QuantSpec("int8")
RULE = Rule(".*", weight=INT8, act=INT8, grad=INT8)
X = jax.random.normal(jax.random.key(0), (32, 12))
C = jax.random.normal(jax.random.key(1), (32, 4))  # loss = sum(y * C): the last g is C


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16)(x))  # Dense_0
        x = nn.relu(nn.Dense(16)(x))  # Dense_1
        return nn.Dense(4)(x)  # Dense_2


def _q(x: np.ndarray) -> np.ndarray:
    s = np.abs(x).max() / 127.0
    return np.clip(np.round(x / s), -127, 127) * s


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref**2) / np.sum((ref - got) ** 2)))


def _underflow(x: np.ndarray) -> float:
    nz = x != 0
    return float(np.sum(nz & (_q(x) == 0)) / max(np.sum(nz), 1))


def _numpy_errors(kernels, biases, x, c):
    """Each layer's errors, recomputed: the quantized forward, then the backward."""
    xs, hs = [], []
    a = np.asarray(x, np.float64)
    for i, (w, b) in enumerate(zip(kernels, biases, strict=True)):
        xs.append(a)
        h = _q(a) @ _q(w) + b
        hs.append(h)
        a = np.maximum(h, 0) if i < len(kernels) - 1 else h
    out = {}
    g = np.asarray(c, np.float64)
    for i in reversed(range(len(kernels))):
        w, xi = kernels[i], xs[i]
        dgrad = _q(g) @ _q(w).T
        wgrad = _q(xi).T @ _q(g)
        out[f"Dense_{i}"] = {
            "fwd_sqnr": _sqnr(xi @ w, _q(xi) @ _q(w)),
            "dgrad_sqnr": _sqnr(g @ w.T, dgrad),
            "wgrad_sqnr": _sqnr(xi.T @ g, wgrad),
            "act_underflow": _underflow(xi),
            "weight_underflow": _underflow(w),
            "grad_underflow": _underflow(g),
        }
        if i > 0:
            g = dgrad * (hs[i - 1] > 0)
    return out


def _check_against_numpy(errs, kernels, biases):
    want = _numpy_errors(kernels, biases, np.asarray(X), np.asarray(C))
    assert set(errs) == set(want)
    for layer, metrics in want.items():
        for name, value in metrics.items():
            np.testing.assert_allclose(errs[layer][name], value, rtol=2e-3, atol=1e-6)
        for role in ("act", "weight", "grad"):  # absmax scales clip nothing
            assert errs[layer][f"{role}_saturation"] == 0.0


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_linen_errors_match_numpy(jit):
    qmodel = quantize_model(MLP(), RULE, errors=True)
    # The init jitted in both cases (eagerly, each op compiles a program): "eager" is the
    # gradient computation whose errors are read.
    params = jax.jit(qmodel.init)(jax.random.key(2), X)["params"]

    def grads(p):
        return jax.grad(lambda p: jnp.sum(qmodel.apply({"params": p}, X) * C))(p)

    g = (jax.jit(grads) if jit else grads)(params)
    errs = layer_errors(g)
    kernels = [np.asarray(params[f"Dense_{i}"]["kernel"], np.float64) for i in range(3)]
    biases = [np.asarray(params[f"Dense_{i}"]["bias"], np.float64) for i in range(3)]
    _check_against_numpy(errs, kernels, biases)


def test_errors_do_not_change_the_gradients():
    plain = quantize_model(MLP(), RULE)
    probed = quantize_model(MLP(), RULE, errors=True)
    params = jax.jit(probed.init)(jax.random.key(2), X)["params"]
    weights = {
        k: {n: v for n, v in d.items() if n in ("kernel", "bias")} for k, d in params.items()
    }

    def grads(model, p):
        return jax.grad(lambda p: jnp.sum(model.apply({"params": p}, X) * C))(p)

    g_plain = jax.jit(functools.partial(grads, plain))(weights)
    g_probed = jax.jit(functools.partial(grads, probed))(params)
    for layer in g_plain:
        for name in ("kernel", "bias"):
            np.testing.assert_allclose(g_probed[layer][name], g_plain[layer][name], rtol=1e-6)


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List(
            [
                nnx.Linear(12, 16, rngs=rngs),
                nnx.Linear(16, 16, rngs=rngs),
                nnx.Linear(16, 4, rngs=rngs),
            ]
        )

    def __call__(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            x = nnx.relu(x) if i < 2 else x
        return x


@pytest.mark.slow
def test_nnx_errors_match_numpy_under_jit():
    model = quantize_model(nnx.jit(lambda: NnxMLP(nnx.Rngs(3)))(), RULE, errors=True)

    @nnx.jit
    def errors_of_a_step(model):
        grads = nnx.grad(lambda m: jnp.sum(m(X) * C))(model)
        return layer_errors(grads)  # jit-safe: arrays under the trace

    errs = errors_of_a_step(model)
    assert set(errs) == {"layers/0", "layers/1", "layers/2"}
    errs = {f"Dense_{k[-1]}": {m: float(v) for m, v in d.items()} for k, d in errs.items()}
    kernels = [np.asarray(model.layers[i].kernel[...], np.float64) for i in range(3)]
    biases = [np.asarray(model.layers[i].bias[...], np.float64) for i in range(3)]
    _check_against_numpy(errs, kernels, biases)


def _with_outlier(params):
    """Dense_1's kernel gets an outlier in a row its input never uses (Dense_0's unit 0 is
    dead: relu of -1): the product's signal does not see it, its int8 scale crushes the
    other weights."""
    params = jax.tree.map(lambda a: a, params)
    d0, d1 = dict(params["Dense_0"]), dict(params["Dense_1"])
    # Edited on the host: eager .at[].set ops would each compile a program.
    k0, b0, k = (np.array(a) for a in (d0["kernel"], d0["bias"], d1["kernel"]))
    k0[:, 0] = 0.0
    b0[0] = -1.0
    k[0, 0] = 1000.0 * np.max(np.abs(k))
    d0["kernel"], d0["bias"], d1["kernel"] = (jnp.asarray(a) for a in (k0, b0, k))
    params["Dense_0"], params["Dense_1"] = d0, d1
    return params


@pytest.mark.slow
def test_an_outlier_layer_is_the_worst_and_is_kept_in_float():
    qmodel = quantize_model(MLP(), RULE, errors=True)
    params = _with_outlier(jax.jit(qmodel.init)(jax.random.key(2), X)["params"])
    tx = jqo.overwrite_with_gradient(optax.sgd(1e-4))
    opt_state = jax.jit(tx.init)(params)

    @jax.jit
    def step(params, opt_state):
        g = jax.grad(lambda p: jnp.sum(qmodel.apply({"params": p}, X) * C))(params)
        u, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, u), opt_state

    for _ in range(2):
        params, opt_state = step(params, opt_state)
    errs = layer_errors(params)  # the last step's, read off the params
    assert min(errs, key=lambda k: errs[k]["fwd_sqnr"]) == "Dense_1"
    assert worst_layers(errs, k=1, metric="fwd_sqnr") == ("Dense_1",)
    assert errs["Dense_1"]["weight_underflow"] > 0.9  # the outlier's scale flushes the rest
    others = min(errs["Dense_0"]["fwd_sqnr"], errs["Dense_2"]["fwd_sqnr"])
    assert errs["Dense_1"]["fwd_sqnr"] < others - 10.0
    assert worst_layers(errs, below=others - 1.0, metric="fwd_sqnr") == ("Dense_1",)
    assert worst_layers(errs, k=3, metric="weight_underflow")[0] == "Dense_1"
    # the patterns keep it in float through a recipe
    keep = worst_layers(errs, k=1, metric="fwd_sqnr")
    kept = quantize_model(MLP(), jq.recipes.get("fp8_current").rules(keep_float=keep))
    jax.eval_shape(kept.init, jax.random.key(2), X)  # traced: report() lists its layers
    assert [m.path for m in report(kept)] == ["Dense_0", "Dense_2"]


def test_intercepted_products_report_errors():
    class Conv1D(nn.Module):
        @nn.compact
        def __call__(self, x):
            w = self.param("weight", nn.initializers.normal(0.5), (x.shape[-1], 4))
            b = self.param("bias", nn.initializers.zeros, (4,))
            return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ()))) + b[None, :]

    qmodel = quantize_model(Conv1D(), RULE, errors=True)
    params = jax.jit(qmodel.init)(jax.random.key(2), X)["params"]
    assert "jq0_overwrite_with_gradient" in params
    g = jax.jit(jax.grad(lambda p: jnp.sum(qmodel.apply({"params": p}, X) * C)))(params)
    errs = layer_errors(g)
    assert list(errs) == [""]  # the model itself
    w = np.asarray(params["weight"], np.float64)
    x = np.asarray(X, np.float64)
    np.testing.assert_allclose(errs[""]["fwd_sqnr"], _sqnr(x @ w, _q(x) @ _q(w)), rtol=2e-3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="errors=True"):
        layer_errors({"params": {"kernel": jnp.ones(2)}})
    errs = {"a": {"wgrad_sqnr": 3.0}}
    with pytest.raises(ValueError, match=r"k=.*below="):
        worst_layers(errs)
    with pytest.raises(ValueError, match="metric must be one of"):
        worst_layers(errs, k=1, metric="loss")
    with pytest.raises(TypeError, match="non-empty dict"):
        worst_layers({}, k=1)
    with pytest.raises(ValueError, match="has no 'fwd_sqnr'"):
        worst_layers(errs, k=1, metric="fwd_sqnr")
    with pytest.raises(TypeError, match="errors"):
        quantize_model(MLP(), RULE, errors=1)
