"""jq.conv_general_dilated and quantized Flax convolutions."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import jaxquant as jq
from jaxquant.flax import Rule, quantize_model, report

X = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
K = jax.random.normal(jax.random.key(1), (3, 3, 3, 8)) * 0.2
DN = ("NHWC", "HWIO", "NHWC")
A8 = jq.QuantSpec("int8")
W8 = jq.QuantSpec("int8", jq.per_channel(-1))
G8 = jq.QuantSpec("e5m2")


def _conv(a, b):
    return lax.conv_general_dilated(
        a,
        b,
        (2, 1),
        "SAME",
        rhs_dilation=(1, 2),
        dimension_numbers=DN,
        precision="highest",
    )


def _qconv(a, b, **kw):
    return jq.conv_general_dilated(
        a,
        b,
        (2, 1),
        "SAME",
        rhs_dilation=(1, 2),
        dimension_numbers=DN,
        precision="highest",
        **kw,
    )


def test_forward_is_the_conv_of_the_fake_quantized_operands():
    got = jax.jit(lambda a, b: _qconv(a, b, lhs_spec=A8, rhs_spec=W8))(X, K)
    want = _conv(jq.fake_quant(X, A8), jq.fake_quant(K, W8))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, _conv(X, K), atol=1e-4)  # it did quantize


@pytest.mark.slow
def test_backward_quantizes_the_gradient_and_is_straight_through():
    g = jax.random.normal(jax.random.key(2), _conv(X, K).shape)
    f = lambda a, b: jnp.sum(_qconv(a, b, lhs_spec=A8, rhs_spec=W8, grad_spec=G8) * g)
    got = jax.jit(jax.grad(f, argnums=(0, 1)))(X, K)
    _, vjp = jax.vjp(_conv, jq.fake_quant(X, A8), jq.fake_quant(K, W8))
    want = vjp(jq.fake_quant(g, G8))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_clipped_ste_and_errors():
    spec = jq.QuantSpec("int8", calibration=jq.fixed(0.5))
    gx = jax.grad(lambda a: jnp.sum(_qconv(a, K, lhs_spec=spec, ste="clipped")))(X)
    assert bool(jnp.all(jnp.where(jnp.abs(X) > 0.51, gx == 0, True)))
    assert float(jnp.abs(gx).sum()) > 0
    with pytest.raises(ValueError, match="key"):
        _qconv(X, K, lhs_spec=jq.QuantSpec("int8", rounding="stochastic"))
    with pytest.raises(ValueError, match="ste"):
        _qconv(X, K, lhs_spec=A8, ste="lsq")
    np.testing.assert_array_equal(_qconv(X, K), _conv(X, K))  # no specs: plain conv


@pytest.mark.slow
def test_linen_and_nnx_convs_are_quantized_by_rules():
    rule = Rule(".*", weight=W8, act=A8)
    lin = quantize_model(nn.Conv(8, (3, 3)), rule)
    v = lin.init(jax.random.key(3), X)
    want = (
        lax.conv_general_dilated(
            jq.fake_quant(X, A8),
            jq.fake_quant(v["params"]["kernel"], W8),
            (1, 1),
            "SAME",
            dimension_numbers=DN,
        )
        + v["params"]["bias"][None, None, None]
    )
    np.testing.assert_allclose(lin.apply(v, X), want, rtol=1e-5, atol=1e-5)
    assert [m.module for m in report(lin)] == ["Conv"]
    m = nnx.Conv(3, 8, (3, 3), rngs=nnx.Rngs(0))
    m.kernel[...] = v["params"]["kernel"]
    m.bias[...] = v["params"]["bias"]
    quantize_model(m, rule)
    np.testing.assert_allclose(m(X), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="stateless rules"):
        quantize_model(
            nnx.Conv(3, 8, (3, 3), rngs=nnx.Rngs(0)), Rule(".*", weight=W8, scaling="delayed")
        )


def test_argument_errors_name_the_argument():
    def bad(match, err=ValueError, **kw):
        args = {"lhs": X, "rhs": K, "window_strides": (1, 1), "padding": "SAME", **kw}
        with pytest.raises(err, match=match):
            jq.conv_general_dilated(**args, dimension_numbers=DN, rhs_spec=W8)

    bad(r"conv_general_dilated: lhs must be an array, got None", TypeError, lhs=None)
    bad(r"conv_general_dilated: rhs is a QArray", TypeError, rhs=jq.quantize(K, W8))
    bad(r"window_strides must be a sequence of 2 positive ints", TypeError, window_strides="x")
    bad(r"window_strides\[0\] must be an int >= 1, got -1", window_strides=(-1, 1))
    bad(r"window_strides must be a sequence of 2", TypeError, window_strides=(1,))
    bad(r"padding must be 'VALID', 'SAME', 'SAME_LOWER'.*got 'bogus'", padding="bogus")
    bad(r"padding\[1\] must be a \(low, high\) pair", TypeError, padding=((1, 1), 2))
    bad(r"rhs_dilation\[1\] must be an int >= 1, got 0", rhs_dilation=(1, 0))
    bad(r"feature_group_count must be an int >= 1", feature_group_count=0)
    bad(r"rhs_scale: scale= has shape \(5,\), which does not broadcast", rhs_scale=jnp.ones(5))
    bad(
        r"lhs of shape \(2, 9, 9, 3\) and rhs of shape \(3, 3, 4, 8\).*3 // 1 != 4",
        rhs=K[:, :, :1].repeat(4, 2),
    )


def test_argument_spellings_lax_accepts_still_work():
    want = _conv(X, K)
    for strides, padding in (([2, 1], "same"), ((np.int64(2), 1), ((1, 1), (2, 2)))):
        got = jq.conv_general_dilated(
            X, K, strides, padding, rhs_dilation=[1, 2], dimension_numbers=DN, precision="highest"
        )
        np.testing.assert_array_equal(got, want)
    # a per-output-channel kernel scale of the scale shape is taken as given
    s = jnp.full((1, 1, 1, 8), 0.01)
    got = _qconv(X, K, rhs_spec=W8, rhs_scale=s)
    np.testing.assert_allclose(got, _conv(X, jq.fake_quant(K, W8, scale=s)), rtol=1e-6, atol=1e-6)
