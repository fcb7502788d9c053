"""jaxquant.app.models: the shared models, and the outlier test bed (inject_outliers)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.app.models import CNN, MLP, ByteLM, inject_outliers

LM = ByteLM(seq=16, d=32, layers=2, heads=4, hidden=64)
TOKENS = jax.random.randint(jax.random.key(1), (4, 16), 0, 256, dtype=jnp.int32)
PARAMS = jax.jit(LM.init)(jax.random.key(0), TOKENS)["params"]  # jitted: eager compiles op by op
CHANNELS, SCALES = [3, 17], [100.0, 1000.0]


_apply_capturing = jax.jit(functools.partial(LM.apply, capture_intermediates=True))


def _norm_outputs(params):
    """Every LayerNorm's output (the input of the Dense layers it feeds), by module path."""
    _, state = _apply_capturing({"params": params}, TOKENS)
    inter = state["intermediates"]
    out = {}

    def walk(tree, path):
        for k, v in tree.items():
            if k == "__call__":
                if path and path[-1].startswith("ln"):
                    out["/".join(path)] = np.asarray(v[0])
            else:
                walk(v, (*path, k))

    walk(inter, ())
    return out


@pytest.mark.parametrize("jit", [False, True])
def test_outliers_preserve_the_function(jit):
    apply = jax.jit(LM.apply) if jit else LM.apply
    p2 = inject_outliers(PARAMS, CHANNELS, SCALES)
    a = apply({"params": PARAMS}, TOKENS)
    b = apply({"params": p2}, TOKENS)
    # only the rounding of x * s / s differs: far below the logits' scale
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-4)
    assert jax.tree_util.tree_structure(p2) == jax.tree_util.tree_structure(PARAMS)
    assert not np.array_equal(p2["ln_f"]["scale"], PARAMS["ln_f"]["scale"])
    assert np.array_equal(PARAMS["ln_f"]["scale"], np.ones(32, np.float32))  # input untouched


def test_outlier_channels_reach_every_quantized_layer_input():
    before = _norm_outputs(PARAMS)
    after = _norm_outputs(inject_outliers(PARAMS, CHANNELS, SCALES))
    assert set(after) == {"block0/ln1", "block0/ln2", "block1/ln1", "block1/ln2", "ln_f"}
    for name, y in after.items():
        amax = np.abs(y).reshape(-1, y.shape[-1]).max(axis=0)
        median = np.median(amax)
        for c, s in zip(CHANNELS, SCALES, strict=True):
            ratio = amax[c] / median
            # a LayerNorm output channel is O(1): scaled by s it is ~s times the median
            assert s / 10 < ratio < s * 10, (name, c, ratio)
        np.testing.assert_allclose(
            np.delete(y, CHANNELS, axis=-1), np.delete(before[name], CHANNELS, axis=-1), atol=1e-5
        )


def test_inject_outliers_bad_arguments():
    with pytest.raises(TypeError, match="ByteLM's params"):
        inject_outliers({"w": 1}, [0], [2.0])
    with pytest.raises(ValueError, match="one scale per channel"):
        inject_outliers(PARAMS, [0, 1], [2.0])
    with pytest.raises(ValueError, match="< d=32"):
        inject_outliers(PARAMS, [32], [2.0])
    with pytest.raises(ValueError, match="finite and > 0"):
        inject_outliers(PARAMS, [1], [0.0])
    with pytest.raises(TypeError, match="must be an int"):
        inject_outliers(PARAMS, [1.5], [2.0])


def test_digits_models_shapes():
    x = jnp.ones((2, 64), jnp.float32)
    for net in (MLP(features=(16,)), CNN(channels=(4,), hidden=8)):
        # Traced, not run (the shapes are the property; nothing to compile).
        out = jax.eval_shape(lambda x, net=net: net.apply(net.init(jax.random.key(0), x), x), x)
        assert out.shape == (2, 10) and out.dtype == jnp.float32
