"""Layout-relative granularities in the ops: ``per_channel()`` and ``per_block(size)`` given to
jq.dot_general / jq.einsum / jq.conv_general_dilated follow each operand's own contraction
(:func:`jaxquant._src.layout.bind`), bit for bit the explicit spec a user would have written,
with a UserWarning when a fallback is taken."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq

S = jq.QuantSpec


def _bits(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a, jnp.float32)).view(np.uint32)


def _same(f, g, *args) -> None:
    """Same values, eager and jit, and the same gradients."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback note on these layouts
        for wrap in (lambda h: h, jax.jit):
            np.testing.assert_array_equal(_bits(wrap(f)(*args)), _bits(wrap(g)(*args)))
        n = tuple(range(len(args)))
        gf = jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=n)(*args)
        gg = jax.grad(lambda *a: jnp.sum(g(*a) ** 2), argnums=n)(*args)
        for a, b in zip(gf, gg, strict=True):
            np.testing.assert_array_equal(_bits(a), _bits(b))


def _normal(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.slow
def test_dense_and_linear_general_kernels_take_one_layout_spec():
    x, w = _normal(0, (8, 64)), _normal(1, (64, 32))
    dense = (((1,), (0,)), ((), ()))
    per_ch, block = S("int8", jq.per_channel()), S("int4", jq.per_block(32))
    _same(
        lambda x, w: jq.dot_general(x, w, dense, lhs_spec=per_ch, rhs_spec=per_ch),
        lambda x, w: jq.dot_general(
            x,
            w,
            dense,
            lhs_spec=S("int8", jq.per_channel(0)),
            rhs_spec=S("int8", jq.per_channel(1)),
        ),
        x,
        w,
    )
    _same(
        lambda x, w: jq.dot_general(x, w, dense, rhs_spec=block),
        lambda x, w: jq.dot_general(x, w, dense, rhs_spec=S("int4", jq.per_block(0, 32))),
        x,
        w,
    )
    # LinearGeneral: x (batch, heads, head_dim) . kernel (heads, head_dim, out)
    x3, k3 = _normal(2, (8, 4, 32)), _normal(3, (4, 32, 16))
    lg = (((1, 2), (0, 1)), ((), ()))
    _same(
        lambda x, w: jq.dot_general(x, w, lg, rhs_spec=per_ch, config=None),
        lambda x, w: jq.dot_general(x, w, lg, rhs_spec=S("int8", jq.per_channel(2))),
        x3,
        k3,
    )
    _same(
        lambda x, w: jq.dot_general(x, w, lg, config=jq.QuantConfig(weight=block)),
        lambda x, w: jq.dot_general(x, w, lg, rhs_spec=S("int4", jq.per_block(1, 32))),
        x3,
        k3,
    )


@pytest.mark.slow
def test_attention_einsum_operands_keep_their_batch_axes():
    q, k = _normal(4, (2, 8, 4, 32)), _normal(5, (2, 8, 4, 32))  # (b, t, h, d)
    spec = S("int8", jq.per_channel())
    _same(
        lambda q, k: jq.einsum("bthd,bshd->bhts", q, k, lhs_spec=spec, rhs_spec=spec),
        lambda q, k: jq.einsum(
            "bthd,bshd->bhts",
            q,
            k,
            lhs_spec=S("int8", jq.per_channel(0, 1, 2)),
            rhs_spec=S("int8", jq.per_channel(0, 1, 2)),
        ),
        q,
        k,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "dn, kshape, explicit_ch, explicit_block",
    [
        (("NHWC", "HWIO", "NHWC"), (3, 3, 64, 16), jq.per_channel(3), jq.per_block(2, 32)),
        (("NHWC", "OIHW", "NHWC"), (16, 64, 3, 3), jq.per_channel(0), jq.per_block(1, 32)),
    ],
)
def test_conv_kernels_follow_their_layout(dn, kshape, explicit_ch, explicit_block):
    x, k = _normal(6, (2, 6, 6, 64)), _normal(7, kshape)

    def conv(rhs_spec, lhs_spec=None):
        return lambda x, k: jq.conv_general_dilated(
            x, k, (1, 1), "SAME", dimension_numbers=dn, lhs_spec=lhs_spec, rhs_spec=rhs_spec
        )

    _same(
        conv(S("int8", jq.per_channel()), S("int8", jq.per_channel())),
        conv(S("int8", explicit_ch), S("int8", jq.per_channel(0))),
        x,
        k,
    )
    _same(conv(S("int4", jq.per_block(32))), conv(S("int4", explicit_block)), x, k)


@pytest.mark.slow
def test_a_fallback_is_a_warning_naming_the_operand():
    x, k = _normal(8, (8, 4, 16)), _normal(9, (4, 16, 32))
    lg = (((1, 2), (0, 1)), ((), ()))
    with pytest.warns(UserWarning, match=r"dot_general: rhs_spec per_block\(32\) on \(4, 16, 32\)"):
        y = jq.dot_general(x, k, lg, rhs_spec=S("int4", jq.per_block(32)))
    # the fallback is one block over the whole innermost contraction axis (16 long)
    ref = jq.dot_general(x, k, lg, rhs_spec=S("int4", jq.per_block(1, 16)))
    np.testing.assert_array_equal(_bits(y), _bits(ref))
    xc, kc = _normal(10, (1, 5, 5, 24)), _normal(11, (3, 3, 24, 8))
    with pytest.warns(UserWarning, match=r"conv_general_dilated: rhs_spec per_block\(32\)"):
        jq.conv_general_dilated(
            xc,
            kc,
            (1, 1),
            "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            rhs_spec=S("int4", jq.per_block(32)),
        )


def test_serving_binds_the_activation_spec():
    x = _normal(12, (2, 8, 64))
    q = jq.quantize(_normal(13, (64, 16)), S("int8", jq.per_channel(-1)))
    dn = (((2,), (0,)), ((), ()))
    np.testing.assert_array_equal(
        _bits(jq.dot_general(x, q, dn, lhs_spec=S("int8", jq.per_channel()))),
        _bits(jq.dot_general(x, q, dn, lhs_spec=S("int8", jq.per_channel(0, 1)))),
    )
