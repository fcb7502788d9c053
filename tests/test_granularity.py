"""Granularities (jaxquant/_src/granularity.py): which axes share a scale (the plan every
quantizer follows), the constructors' argument forms, the layout-relative forms and the
errors that name the fix. Pure Python: no array is quantized here (test_quantize.py and
test_oracles.py check the numerics of each granularity)."""

import numpy as np
import pytest

import jaxquant as jq
from jaxquant._src.granularity import Plan, follows_layout


@pytest.mark.parametrize(
    ("granularity", "shape", "plan"),
    [
        (jq.per_tensor(), (4, 6), Plan((4, 6), (4, 6), (0, 1), (1, 1))),
        (jq.per_channel(-1), (4, 6), Plan((4, 6), (4, 6), (0,), (1, 6))),
        (jq.per_channel(0, 2), (2, 3, 5), Plan((2, 3, 5), (2, 3, 5), (1,), (2, 1, 5))),
        (jq.per_token(), (2, 3, 8), Plan((2, 3, 8), (2, 3, 8), (2,), (2, 3, 1))),
        (jq.per_token(0), (8, 3), Plan((8, 3), (8, 3), (0,), (1, 3))),
        # blocks of 4 along the last axis: a (4, 3, 4) view, one scale per (row, block)
        (jq.per_block(-1, 4), (4, 12), Plan((4, 12), (4, 3, 4), (2,), (4, 3, 1))),
        (jq.per_block(0, 2), (4, 3), Plan((4, 3), (2, 2, 3), (1,), (2, 1, 3))),
    ],
    ids=str,
)
def test_plan_names_the_axes_that_share_a_scale(granularity, shape, plan):
    got = granularity.plan(shape)
    assert got == plan
    # the view holds the array's elements; one scale per element of scale_shape
    assert np.prod(got.view) == np.prod(shape)
    assert all(got.scale_shape[a] == 1 for a in got.reduce_axes)


def test_constructor_forms_are_equal():
    assert jq.per_channel([0, 2]) == jq.per_channel(0, 2) == jq.per_channel((0, 2))
    assert jq.per_block(-1, 32) == jq.per_block(axis=-1, size=32) == jq.per_block(-1, size=32)
    assert jq.per_block(32) == jq.per_block(size=32)
    assert str(jq.per_block(-1, 32)) == "per_block(-1,32)" and str(jq.per_block(32)) == (
        "per_block(32)"
    )
    assert str(jq.per_channel(0, 2)) == "per_channel(0, 2)"
    # frozen and hashable: usable as static jit arguments and dict keys
    assert len({jq.per_channel(-1), jq.per_channel(-1), jq.per_tensor()}) == 2


def test_layout_forms_follow_a_contraction_and_refuse_a_bare_array():
    assert follows_layout(jq.per_channel()) and follows_layout(jq.per_block(32))
    assert not follows_layout(jq.per_channel(-1)) and not follows_layout(jq.per_block(0, 32))
    assert not follows_layout(jq.per_tensor()) and not follows_layout(jq.per_token())
    with pytest.raises(ValueError, match=r"give the axes, e\.g\. per_channel\(-1\)"):
        jq.per_channel().plan((4, 4))
    with pytest.raises(ValueError, match=r"give the axis, e\.g\. per_block\(-1, 32\)"):
        jq.per_block(32).plan((4, 64))


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: jq.per_channel(()), ValueError, "empty list of axes"),
        (lambda: jq.per_channel(1, 1), ValueError, "axis repeated"),
        (lambda: jq.per_block(-1, 0), ValueError, "size must be a positive int"),
        (lambda: jq.per_block(), TypeError, "missing the block size"),
        (lambda: jq.per_block(0, 1, 2), TypeError, "takes \\(axis, size\\) or \\(size\\)"),
        (lambda: jq.per_block(0, 32, axis=1), TypeError, "both by position and by keyword"),
        (lambda: jq.per_block(32, axis=1), TypeError, "Write per_block\\(axis, size\\)"),
    ],
    ids=["empty_axes", "repeated", "size0", "no_size", "three", "twice", "size_and_axis"],
)
def test_bad_constructor_arguments_say_how_to_write_it(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_plan_errors_name_the_shape_and_the_fix():
    with pytest.raises(ValueError, match=r"axis 2 is out of range for an array of rank 2"):
        jq.per_channel(2).plan((4, 4))
    # -1 and 1 are the same axis of a rank-2 array
    with pytest.raises(ValueError, match="names the same axis twice"):
        jq.per_channel(-1, 1).plan((4, 4))
    with pytest.raises(ValueError, match=r"Block sizes that divide it: \[8, 16\]"):
        jq.per_block(-1, 32).plan((4, 48))
