"""Layout-relative granularity (issue 12 item 5): per_channel() / per_block(size) bound to
each operand's contraction by jaxquant._src.layout.bind, dot_layout and conv_layout.

Compiling is most of this file's time (issue 13): the test data goes to the device without
a program (``jax.device_put`` of numpy), and a bound spec and its hand-written twin are
quantized in one jitted program per case (plus the eager ``fake_quant`` they are both
compared with), not in a program per call.
"""

import itertools
import json
import re

import jax
import numpy as np
import pytest
from jax import lax

import jaxquant as jq
from jaxquant._src import granularity as gran
from jaxquant._src.layout import bind, conv_layout, dot_layout
from jaxquant._src.serialize import spec_from_dict, spec_to_dict

CH = jq.QuantSpec("int8", jq.per_channel())
BLK32 = jq.QuantSpec("int4", jq.per_block(32))


def _x(shape, seed=0):
    # Heavy-tailed values with a spread of magnitudes across every axis, so a scale shared
    # over the wrong axes gives different codes.
    rng = np.random.default_rng(seed)
    x = rng.standard_t(3, size=shape) * np.exp(rng.normal(size=shape))
    return jax.device_put(x.astype(np.float32))  # jnp.asarray would compile a program


def _same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


def _assert_quantizes_like(bound, hand, shape, eager=True):
    """bound and hand-written specs give bitwise-identical codes, scales and fake_quant
    (under jit, one program for both), and (eager) the same bits as the eager path."""
    x = _x(shape)

    @jax.jit
    def both(v):
        qa, qb = jq.quantize(v, bound), jq.quantize(v, hand)
        deq = jq.dequantize(qa), jq.dequantize(qb)
        return qa, qb, deq, (jq.fake_quant(v, bound), jq.fake_quant(v, hand))

    qa, qb, (da, db), (fa, fb) = both(x)
    _same_bits(qa.values, qb.values)
    _same_bits(qa.scale, qb.scale)
    _same_bits(da, db)
    _same_bits(fa, fb)
    if eager:
        _same_bits(fa, jq.fake_quant(x, hand))


# ------------------------------------------------------------------ the forms themselves


def test_forms_print_hash_and_compare():
    assert str(jq.per_channel()) == "per_channel()"
    assert str(jq.per_block(32)) == "per_block(32)"
    assert str(jq.per_block(-1, 32)) == "per_block(-1,32)"  # explicit form unchanged
    assert str(jq.per_channel(-1)) == "per_channel(-1,)"
    assert jq.per_channel() == gran.PerChannel() == gran.PerChannel(None)
    assert jq.per_block(32) == jq.per_block(size=32) == gran.PerBlock(None, 32)
    assert jq.per_block(0, 32) == jq.per_block(axis=0, size=32) == jq.per_block(0, size=32)
    assert jq.per_block(32) != jq.per_block(-1, 32)
    assert jq.per_channel() != jq.per_channel(-1)
    table = {jq.per_channel(): "c", jq.per_block(32): "b", jq.per_block(-1, 32): "e"}
    assert table[gran.PerChannel(None)] == "c" and table[gran.PerBlock(None, 32)] == "b"
    assert str(CH) == "QuantSpec(int8, per_channel(), absmax)"
    assert hash(CH) == hash(jq.QuantSpec("int8", jq.per_channel()))
    assert gran.follows_layout(jq.per_channel()) and gran.follows_layout(jq.per_block(8))
    for g in (jq.per_tensor(), jq.per_token(), jq.per_channel(0), jq.per_block(0, 8)):
        assert not gran.follows_layout(g)


def test_quantspec_accepts_them_mx_included_and_they_serialize():
    mx = jq.QuantSpec("mxfp4", jq.per_block(32))
    assert mx.granularity == gran.PerBlock(None, 32) and mx.scale_format.name == "float8_e8m0fnu"
    with pytest.raises(ValueError, match="per_block"):
        jq.QuantSpec("mxfp4", jq.per_channel())  # MX formats stay per-block
    for spec in (CH, BLK32, mx):
        d = spec_to_dict(spec)
        assert spec_from_dict(json.loads(json.dumps(d))) == spec
    assert spec_to_dict(CH)["granularity"] == {"type": "per_channel", "axes": None}
    assert spec_to_dict(BLK32)["granularity"] == {"type": "per_block", "axis": None, "size": 32}


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: jq.per_block(), TypeError, r"missing the block size"),
        (lambda: jq.per_block(axis=0), TypeError, r"missing the block size"),
        (lambda: jq.per_block(0, 32, 1), TypeError, r"3 positional"),
        (lambda: jq.per_block(0, 32, size=8), TypeError, r"both by position and by keyword"),
        (lambda: jq.per_block(32, axis=0), TypeError, r"together with axis="),
        (lambda: jq.per_block(None, 32), TypeError, r"per_block\(axis\)"),
        (lambda: jq.per_block(0), ValueError, r"per_block\(size\).*positive"),
        (lambda: jq.per_block(2.0), TypeError, r"per_block\(size\)"),
        (lambda: jq.per_channel(()), ValueError, r"empty list of axes.*per_channel\(\)"),
        (lambda: jq.per_channel([]), ValueError, r"empty list of axes"),
        (lambda: jq.per_channel(None), TypeError, r"per_channel\(axes\)"),
    ],
)
def test_bad_factory_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_explicit_forms_keep_their_plans():
    # The explicit forms' plans, written out: the layout forms must not have changed them.
    shape = (4, 16, 64)
    assert jq.per_channel(-1).plan(shape) == gran.Plan(shape, shape, (0, 1), (1, 1, 64))
    assert jq.per_channel(0, 2).plan(shape) == gran.Plan(shape, shape, (1,), (4, 1, 64))
    assert jq.per_block(1, 8).plan(shape) == gran.Plan(shape, (4, 2, 8, 64), (2,), (4, 2, 1, 64))
    assert jq.per_block(-1, 32).plan(shape) == gran.Plan(shape, (4, 16, 2, 32), (3,), (4, 16, 2, 1))


# ------------------------------------------------------- unbound where no layout is known

CH_MSG = (
    re.escape("per_channel() without axes follows a contraction's layout; here there is none")
    + r".*give the axes, e.g\. per_channel\(-1\)"
)
BLK_MSG = (
    re.escape("per_block(32) without an axis follows a contraction's layout; here there is none")
    + r".*give the axis, e.g\. per_block\(-1, 32\)"
)


@pytest.mark.parametrize("spec, match", [(CH, CH_MSG), (BLK32, BLK_MSG)])
@pytest.mark.parametrize(
    "use",
    [
        lambda x, s: jq.quantize(x, s),
        lambda x, s: jq.fake_quant(x, s),
        lambda x, s: jax.jit(lambda v: jq.fake_quant(v, s))(x),
        lambda x, s: jq.quantize_tree({"w": x}, s),
        lambda x, s: jq.quantize(x, s, scale=jax.device_put(np.ones((1, 64), np.float32))),
        lambda x, s: jq.lsq_init(x, s),
        lambda x, s: jq.delayed_scaling(s).init(x),
        lambda x, s: s.granularity.plan(x.shape),
    ],
    ids=["quantize", "fake_quant", "jit", "quantize_tree", "scale=", "lsq_init", "delayed", "plan"],
)
def test_unbound_use_without_a_layout_is_a_clear_error(use, spec, match):
    with pytest.raises(ValueError, match=match):
        use(_x((8, 64)), spec)


# ----------------------------------------------------------------------- dot_layout


def test_dot_layout():
    dense = (((2,), (0,)), ((), ()))  # x (batch, seq, in) @ kernel (in, out)
    assert dot_layout(dense, "lhs", 3) == ((2,), ())
    assert dot_layout(dense, "rhs", 2) == ((0,), ())
    # 'bthd,bshd->bhts' (q @ k^T): contract d, batch b and h.
    qk = (((3,), (3,)), ((0, 2), (0, 2)))
    assert dot_layout(qk, "lhs", 4) == ((3,), (0, 2)) == dot_layout(qk, "rhs", 4)
    # negative axes normalised, order of the dimension numbers kept (lhs/rhs pair up)
    assert dot_layout((((-1, 1), (1, 0)), ((), ())), "lhs", 3) == ((2, 1), ())
    assert dot_layout((((-1, 1), (1, 0)), ((), ())), "rhs", 3) == ((1, 0), ())
    assert dot_layout([[[0], [1]], [[], []]], "rhs", 2) == ((1,), ())


@pytest.mark.parametrize(
    "args, exc, match",
    [
        (((((0,), (0,)), ((), ())), "out", 2), ValueError, r"'lhs' or 'rhs'"),
        ((((0,), (0,)), "lhs", 2), TypeError, r"\(\(lhs_contracting"),
        ((None, "lhs", 2), TypeError, r"dimension_numbers"),
        (((((2,), (0,)), ((), ())), "lhs", 2), ValueError, r"axis 2 is out of range.*rank 2"),
        (((((0, 0), (0, 1)), ((), ())), "lhs", 2), ValueError, r"repeated"),
        (((((0,), (0,)), ((0,), (1,))), "lhs", 2), ValueError, r"both contracted and batched"),
        (((((0,), (0,)), ((), ())), "lhs", 1.0), TypeError, r"ndim"),
    ],
)
def test_dot_layout_errors(args, exc, match):
    with pytest.raises(exc, match=match):
        dot_layout(*args)


# ----------------------------------------------------------------------- conv_layout


def test_conv_layout_strings_and_dimension_numbers():
    assert conv_layout("HWIO", 4) == ((0, 1, 2), (3,))
    assert conv_layout("OIHW", 4) == ((2, 3, 1), (0,))
    assert conv_layout("NHWC", 4) == ((1, 2, 3), (0,))
    assert conv_layout("NCHW", 4, "lhs") == ((2, 3, 1), (0,))
    assert conv_layout("WIO", 3) == ((0, 1), (2,))  # 1-D conv
    assert conv_layout("DHWIO", 5) == ((0, 1, 2, 3), (4,))  # 3-D conv
    strings = ("NHWC", "HWIO", "NHWC")
    dn = lax.conv_dimension_numbers((1, 8, 8, 3), (3, 3, 3, 16), strings)
    for op, one in (("lhs", "NHWC"), ("rhs", "HWIO")):
        assert conv_layout(dn, 4, op) == conv_layout(strings, 4, op) == conv_layout(one, 4)
    dn = lax.conv_dimension_numbers((1, 3, 8, 8), (16, 3, 3, 3), None)  # lax's default
    assert conv_layout(dn, 4, "rhs") == conv_layout(None, 4, "rhs") == conv_layout("OIHW", 4)
    assert conv_layout(dn, 4, "lhs") == conv_layout(None, 4, "lhs") == conv_layout("NCHW", 4)


@pytest.mark.parametrize(
    "args, exc, match",
    [
        (("HWIO", 3), ValueError, r"names 4 axes but the operand has rank 3"),
        (("HWIO", 4, "lhs"), ValueError, r"rhs layout, but operand='lhs'"),
        (("HWXY", 4), ValueError, r"neither a kernel layout"),
        (("HHIO", 4), ValueError, r"repeats a letter"),
        ((None, 4), ValueError, r"operand='lhs' or 'rhs' is needed"),
        ((("NHWC", "HWIO", "NHWC"), 4, "rhs2"), ValueError, r"'lhs' or 'rhs'"),
        ((("HWIO", "NHWC", "NHWC"), 4, "lhs"), ValueError, r"letters of an rhs layout"),
        ((3, 4, "rhs"), TypeError, r"layout string such as 'HWIO'"),
        ((None, 0, "rhs"), ValueError, r"ndim"),
    ],
)
def test_conv_layout_errors(args, exc, match):
    with pytest.raises(exc, match=match):
        conv_layout(*args)


# ------------------------------------------------------------------------------ bind

# (name, spec, shape, contracting, batch, kwargs, hand-written explicit granularity, note?)
CASES = [
    # Dense kernel (in, out) and its input (batch, seq, in)
    ("dense-kernel/ch", CH, (64, 48), (0,), (), {}, jq.per_channel(-1), False),
    ("dense-kernel/blk", BLK32, (64, 48), (0,), (), {}, jq.per_block(0, 32), False),
    ("dense-input/ch", CH, (2, 8, 64), (2,), (), {}, jq.per_channel(0, 1), False),
    ("dense-input/blk", BLK32, (2, 8, 64), (2,), (), {}, jq.per_block(-1, 32), False),
    # DenseGeneral / LinearGeneral kernels: (in, heads, head_dim) and (heads, head_dim, out)
    ("qkv-kernel/ch", CH, (64, 4, 16), (0,), (), {}, jq.per_channel(1, 2), False),
    ("out-kernel/ch", CH, (4, 16, 64), (0, 1), (), {}, jq.per_channel(-1), False),
    (
        "out-kernel/blk8",
        jq.QuantSpec("int4", jq.per_block(8)),
        (4, 16, 64),
        (0, 1),
        (),
        {},
        jq.per_block(1, 8),
        False,
    ),
    # 16 is not a multiple of 32 (nor is 4): one block over the whole innermost axis
    ("out-kernel/blk32", BLK32, (4, 16, 64), (0, 1), (), {}, jq.per_block(1, 16), True),
    # innermost (48) is not a multiple of 32 but the heads axis (32) is: blocks there
    ("out-kernel/blk-moved", BLK32, (32, 48, 64), (0, 1), (), {}, jq.per_block(0, 32), True),
    # Conv kernels: HWIO blocks the innermost contraction axis I; OIHW's I via block_axis
    ("conv-hwio/ch", CH, (3, 3, 64, 32), (0, 1, 2), (), {}, jq.per_channel(3), False),
    ("conv-hwio/blk", BLK32, (3, 3, 64, 32), (0, 1, 2), (), {}, jq.per_block(2, 32), False),
    ("conv-oihw/ch", CH, (32, 64, 3, 3), (2, 3, 1), (), {}, jq.per_channel(0), False),
    (
        "conv-oihw/blk",
        BLK32,
        (32, 64, 3, 3),
        (2, 3, 1),
        (),
        {"block_axis": 1},
        jq.per_block(1, 32),
        False,
    ),
    ("conv-oihw/blk-auto", BLK32, (32, 64, 3, 3), (2, 3, 1), (), {}, jq.per_block(1, 32), True),
    ("conv-nhwc/ch", CH, (2, 8, 8, 64), (1, 2, 3), (), {}, jq.per_channel(0), False),
    # attention 'bthd,bshd->bhts': q and k contract d, batch b and h (kept: own scales)
    ("attn-q/ch", CH, (2, 8, 4, 32), (3,), (0, 2), {}, jq.per_channel(0, 1, 2), False),
    ("attn-q/blk", BLK32, (2, 8, 4, 32), (3,), (0, 2), {}, jq.per_block(3, 32), False),
    # 'bhts,bshd->bthd': probs contract s (axis 3), v contracts s (axis 1)
    ("attn-p/ch", CH, (2, 4, 8, 64), (3,), (0, 1), {}, jq.per_channel(0, 1, 2), False),
    ("attn-v/ch", CH, (2, 64, 4, 16), (1,), (0, 2), {}, jq.per_channel(0, 2, 3), False),
    ("attn-v/blk", BLK32, (2, 64, 4, 16), (1,), (0, 2), {}, jq.per_block(1, 32), False),
    # MoE weights (experts, in, out): per expert and output channel
    ("moe/ch", CH, (4, 64, 16), (1,), (0,), {}, jq.per_channel(0, 2), False),
    # negative contracting axes
    ("neg-axes/ch", CH, (4, 16, 64), (-3, -2), (), {}, jq.per_channel(2), False),
    # a vector fully contracted: one scale per index of no axis is one scale
    ("vector/ch", CH, (64,), (0,), (), {}, jq.per_tensor(), False),
    ("vector/blk-whole", BLK32, (48,), (0,), (), {}, jq.per_block(0, 48), True),
    # outer product: no contraction axis
    ("outer/ch", CH, (8, 16), (), (), {}, jq.per_tensor(), True),
    (
        "outer/blk",
        jq.QuantSpec("int4", jq.per_block(8)),
        (4, 16),
        (),
        (),
        {},
        jq.per_block(1, 8),
        True,
    ),
    ("outer/blk-whole", BLK32, (4, 16), (), (), {}, jq.per_block(1, 16), True),
    # MX formats: per_block(32) binds like any block size and stays per-block in a fallback
    (
        "mx/blk",
        jq.QuantSpec("mxfp4", jq.per_block(32)),
        (64, 48),
        (0,),
        (),
        {},
        jq.per_block(0, 32),
        False,
    ),
    (
        "mx/blk-whole",
        jq.QuantSpec("mxfp8", jq.per_block(32)),
        (4, 16, 64),
        (0, 1),
        (),
        {},
        jq.per_block(1, 16),
        True,
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bind_matches_the_hand_written_spec_bitwise(case):
    """Plans, specs, codes, scales and fake_quant of the bound spec equal the hand-written
    one's (under jit); every third case also against the eager path (a program of its own
    per case; a bound spec is an explicit spec like any other, and eager against jit per
    format is tests/test_exactness.py's)."""
    _, spec, shape, contracting, batch, kw, hand_gran, has_note = case
    bound, note = bind(spec, shape, contracting, batch, **kw)
    hand = spec.replace(granularity=hand_gran)
    assert (note is not None) == has_note, note
    # Same plan as the hand-written granularity (the axes may be spelled non-negative).
    assert bound.granularity.plan(shape) == hand.granularity.plan(shape)
    assert bound.replace(granularity=hand_gran) == hand  # nothing else changed
    assert not gran.follows_layout(bound.granularity)
    _assert_quantizes_like(bound, hand, shape, eager=CASES.index(case) % 3 == 0)


def test_bind_notes_say_what_was_done():
    _, note = bind(BLK32, (4, 16, 64), (0, 1))
    assert note == (
        "per_block(32) on (4, 16, 64): no contraction axis of (0, 1) has a length that is a "
        "multiple of 32 (lengths 4, 16); one block over the whole innermost contraction axis 1 "
        "(16 elements; one scale per index of axes (0, 2))"
    )
    _, note = bind(BLK32, (32, 48, 64), (0, 1))
    assert note == (
        "per_block(32) on (32, 48, 64): the innermost contraction axis 1 (length 48) is not a "
        "multiple of 32; blocks along contraction axis 0 (length 32) instead"
    )
    _, note = bind(BLK32, (32, 64, 3, 3), (2, 3, 1), block_axis=1)
    assert note is None
    _, note = bind(BLK32, (3, 3, 48, 32), (0, 1, 2), block_axis=2)
    assert note == (
        "per_block(32) on (3, 3, 48, 32): axis 2 has length 48, not a multiple of 32; one "
        "block over the whole axis 2 (48 elements; one scale per index of axes (0, 1, 3))"
    )
    _, note = bind(BLK32, (48,), (0,))
    assert note.endswith("one block over the whole axis 0 (48 elements; one scale)")
    _, note = bind(CH, (8, 16), ())
    assert note.startswith("per_channel() on (8, 16): no axis is contracted")
    assert note.endswith("one scale for the whole operand (per_tensor)")
    _, note = bind(BLK32, (4, 16), ())
    assert note.startswith("per_block(32) on (4, 16): no axis is contracted and the last axis")
    assert "\n" not in note


def test_fallback_quantizes_like_per_channel_over_the_other_axes():
    # "one block over the whole axis" is per_channel over every other axis: same values.
    shape = (4, 16, 64)
    bound, _ = bind(BLK32, shape, (0, 1))
    x = _x(shape)
    hand = BLK32.replace(granularity=jq.per_channel(0, 2))
    _same_bits(jq.fake_quant(x, bound), jq.fake_quant(x, hand))
    qa, qb = jq.quantize(x, bound), jq.quantize(x, hand)
    _same_bits(qa.values, qb.values)
    _same_bits(qa.scale.reshape(qb.scale.shape), qb.scale)


def test_one_rule_fits_every_layer_kind():
    # The point of the layout forms: one spec, every layer's own correct axes, and scales
    # constant along exactly the contracted axes (so they factor out of the product).
    layers = {
        "Dense": ((64, 48), (0,), ()),
        "DenseGeneral": ((64, 4, 16), (0,), ()),
        "LinearGeneral": ((4, 16, 64), (0, 1), ()),
        "Conv HWIO": ((3, 3, 64, 32), conv_layout("HWIO", 4)[0], ()),
        "Conv OIHW": ((32, 64, 3, 3), conv_layout("OIHW", 4)[0], ()),
        "einsum q": ((2, 8, 4, 32), *dot_layout((((3,), (3,)), ((0, 2), (0, 2))), "lhs", 4)),
        "einsum v": ((2, 64, 4, 16), *dot_layout((((3,), (1,)), ((0, 1), (0, 2))), "rhs", 4)),
    }
    for name, (shape, contracting, batch) in layers.items():
        bound, note = bind(CH, shape, contracting, batch)
        assert note is None, name
        scale_shape = bound.granularity.plan(shape).scale_shape
        want = tuple(1 if i in contracting else d for i, d in enumerate(shape))
        assert scale_shape == want, name
        bound, _ = bind(BLK32, shape, contracting, batch, block_axis=contracting[-1])
        assert bound.granularity.axis in contracting, name
        # a valid spec for the shape (the values: test_bind_matches_the_hand_written_spec_...)
        assert jax.eval_shape(lambda v, s=bound: jq.fake_quant(v, s), _x(shape)).shape == shape


@pytest.mark.parametrize("seed", range(6))
def test_bind_invariants_on_random_layouts(seed):
    # For any shape / contracting / batch split: per_channel() shares a scale over exactly the
    # contracted axes; per_block(b) blocks a contracted axis, in blocks that tile it.
    rng = np.random.default_rng(seed)
    for _ in range(40):
        ndim = int(rng.integers(1, 5))
        shape = tuple(int(rng.choice([1, 3, 4, 8, 16, 24, 32, 64])) for _ in range(ndim))
        perm = [int(a) for a in rng.permutation(ndim)]
        nc = int(rng.integers(1, ndim + 1))
        nb = int(rng.integers(0, ndim - nc + 1))
        contracting, batch = tuple(perm[:nc]), tuple(perm[nc : nc + nb])
        bound, note = bind(CH, shape, contracting, batch)
        want = tuple(1 if i in contracting else d for i, d in enumerate(shape))
        assert bound.granularity.plan(shape).scale_shape == want
        assert note is None
        size = int(rng.choice([2, 4, 8, 32]))
        spec = jq.QuantSpec("int4", jq.per_block(size))
        bound, note = bind(spec, shape, contracting, batch)
        g = bound.granularity
        assert g.axis in contracting and shape[g.axis] % g.size == 0
        innermost = max(contracting)
        if note is None:
            assert (g.axis, g.size) == (innermost, size)
        elif g.size == size:  # moved to an outer contraction axis that size divides
            assert g.axis < innermost and shape[innermost] % size
        else:  # no contraction axis divides: the whole innermost axis
            assert (g.axis, g.size) == (innermost, shape[innermost])
            assert all(shape[a] % size for a in contracting)
        g.plan(shape)  # a valid plan


def test_explicit_and_none_pass_through_unchanged():
    for g in (jq.per_tensor(), jq.per_channel(-1), jq.per_block(0, 32), jq.per_token()):
        spec = jq.QuantSpec("int8", g)
        bound, note = bind(spec, (64, 48), (0,))
        assert bound is spec and note is None
    mx = jq.QuantSpec("mxfp4")  # default per_block(-1, 32) stays explicit
    assert bind(mx, (64, 48), (0,)) == (mx, None)
    assert bind(None, (64, 48), (0,)) == (None, None)


def test_bind_is_static_under_jit():
    shape = (4, 16, 64)
    x = _x(shape)

    @jax.jit
    def f(v):
        spec, _ = bind(CH, v.shape, (0, 1))
        return jq.fake_quant(v, spec)

    _same_bits(f(x), jq.fake_quant(x, CH.replace(granularity=jq.per_channel(-1))))


@pytest.mark.parametrize(
    "args, kw, exc, match",
    [
        (("int8", (4, 4), (0,)), {}, TypeError, r"bind\(spec\): expected a QuantSpec"),
        ((CH, (4, 4.0), (0,)), {}, TypeError, r"bind\(shape\)"),
        ((CH, (4, -1), (0,)), {}, TypeError, r"bind\(shape\)"),
        ((CH, (4, 4), (2,)), {}, ValueError, r"bind\(contracting\): axis 2 is out of range"),
        ((CH, (4, 4), (0, -2)), {}, ValueError, r"bind\(contracting\): axis repeated"),
        ((CH, (4, 4), (0,), (0,)), {}, ValueError, r"both contracted and batched"),
        ((CH, (4, 4), "0"), {}, TypeError, r"bind\(contracting\)"),
        ((BLK32, (64, 64), (0,)), {"block_axis": 1}, ValueError, r"not among the contracting"),
        ((BLK32, (), ()), {}, ValueError, r"scalar operand has no axis to block"),
    ],
)
def test_bind_errors(args, kw, exc, match):
    with pytest.raises(exc, match=match):
        bind(*args, **kw)


@pytest.mark.slow
def test_every_contracting_subset_of_a_rank3_kernel():
    # Exhaustive over a small kernel: the bound per_channel() equals per_channel(other axes)
    # bitwise (the hand-written rule one would otherwise write per layer).
    shape = (4, 8, 32)
    pairs = []
    for k in range(1, 4):
        for contracting in itertools.combinations(range(3), k):
            kept = tuple(i for i in range(3) if i not in contracting)
            hand = CH.replace(granularity=jq.per_channel(*kept) if kept else jq.per_tensor())
            bound, note = bind(CH, shape, contracting)
            assert note is None
            # plans equal, and fake_quant agrees (codes and scales: the CASES above)
            assert bound.granularity.plan(shape) == hand.granularity.plan(shape)
            pairs.append((k, bound, hand))
    xs = {k: _x(shape, seed=k) for k in range(1, 4)}
    # every pair in one compiled program
    got = jax.jit(
        lambda xs: [(jq.fake_quant(xs[k], b), jq.fake_quant(xs[k], h)) for k, b, h in pairs]
    )(xs)
    for a, b in got:
        _same_bits(a, b)
