"""jq.lsq_init / jq.lsq_fake_quant: argument checks (numerics: tests/test_flax_stateful.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq

X = jnp.linspace(-1.0, 1.0, 32).reshape(4, 8)
PER_ROW = jq.QuantSpec("int4", jq.per_channel(0))


def test_lsq_init_checks_x_and_spec():
    with pytest.raises(TypeError, match=r"lsq_init expects a floating-point array, got dtype"):
        jq.lsq_init(jnp.arange(8), PER_ROW)
    with pytest.raises(TypeError, match=r"lsq_init: x is a QArray"):
        jq.lsq_init(jq.quantize(X, PER_ROW), PER_ROW)
    with pytest.raises(TypeError, match=r"lsq_init: spec must be a QuantSpec, got str 'int4'"):
        jq.lsq_init(X, "int4")


@pytest.mark.slow
def test_lsq_step_must_have_the_scale_shape():
    step = jq.lsq_init(X, PER_ROW)
    assert step.shape == (4, 1)
    # (4, 8) broadcasts against (4, 1) but is one step per element, not per group
    with pytest.raises(ValueError, match=r"step of shape \(4, 8\) does not broadcast to the scale"):
        jq.lsq_fake_quant(X, PER_ROW, jnp.ones((4, 8)))
    with pytest.raises(ValueError, match=r"step of shape \(3,\) does not broadcast"):
        jq.lsq_fake_quant(X[0], jq.QuantSpec("int4"), jnp.ones(3))
    with pytest.raises(TypeError, match=r"lsq_fake_quant: step is a QArray"):
        jq.lsq_fake_quant(X, PER_ROW, jq.quantize(step, jq.QuantSpec("int8")))
    with pytest.raises(TypeError, match=r"lsq_fake_quant: step must be a floating-point array"):
        jq.lsq_fake_quant(X, PER_ROW, None)
    with pytest.raises(TypeError, match=r"lsq_fake_quant: step must be a floating-point array"):
        jq.lsq_fake_quant(X, PER_ROW, jnp.ones((4, 1), jnp.int32))
    # the steps of lsq_init, a scalar and the per-tensor (1,) shape are accepted, gradients too
    for s in (step, jnp.float32(0.1), jnp.full((1,), 0.1)):
        g = jax.grad(lambda s: jq.lsq_fake_quant(X, PER_ROW, s).sum())(s)
        assert g.shape == jnp.shape(s) and bool(jnp.all(jnp.isfinite(g)))
    np.testing.assert_array_equal(
        jq.lsq_fake_quant(X, PER_ROW, jnp.float32(0.25)),
        jq.lsq_fake_quant(X, PER_ROW, jnp.full((4, 1), 0.25)),
    )
