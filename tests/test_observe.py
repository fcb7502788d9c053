"""Streaming activation statistics (jaxquant/_src/observe.py): moments that merge exactly,
histograms over a fixed range, and each calibration method's range from them."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant._src import observe


def _chunks(seed=0, heavy=False):
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((37, 11)).astype(np.float32) * (1 + i) + 0.3 * i for i in range(4)]
    if heavy:
        xs[2][0, 0] = 40.0
    return xs


@pytest.mark.slow
def test_moments_merge_exactly():
    xs = _chunks()
    m = observe.moments(jnp.asarray(xs[0]))
    for x in xs[1:]:
        m = observe.merge(m, observe.moments(jnp.asarray(x)))
    allx = np.concatenate([x.reshape(-1) for x in xs]).astype(np.float64)
    assert float(m.count) == allx.size
    np.testing.assert_allclose(float(m.mean), allx.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(m.m2) / allx.size, allx.var(), rtol=1e-5)
    np.testing.assert_allclose(float(m.mean_abs), np.abs(allx).mean(), rtol=1e-6)
    assert float(m.lo) == allx.min() and float(m.hi) == allx.max()


@pytest.mark.slow
@pytest.mark.parametrize(
    "calibration",
    [jq.absmax(), jq.mean_std(2.0), jq.mean_abs(2.0), jq.percentile(99.0), jq.mse(), jq.kl()],
    ids=str,
)
@pytest.mark.parametrize("symmetric", [True, False])
def test_streaming_range_matches_method_on_all_data(calibration, symmetric):
    """The range from merged statistics equals (histogram methods: is within a couple of
    bins of) the method run on all batches concatenated."""
    if isinstance(calibration, type(jq.kl())) and not symmetric:
        pytest.skip("kl is symmetric only")
    spec = jq.QuantSpec(
        "int8" if symmetric else "uint8", calibration=calibration, symmetric=symmetric
    )
    if isinstance(calibration, type(jq.mean_abs())) and not symmetric:
        pytest.skip("mean_abs is symmetric")
    xs = _chunks(heavy=True)
    m = observe.moments(jnp.asarray(xs[0]))
    for x in xs[1:]:
        m = observe.merge(m, observe.moments(jnp.asarray(x)))
    h = None
    if observe.needs_histogram(spec):
        nb = getattr(calibration, "bins", 2048)
        span = observe.hist_range(m)
        hs = [observe.histograms(jnp.asarray(x), *span, nb) for x in xs]
        h = hs[0]
        for o in hs[1:]:
            h = observe.add_hist(h, o)
    lo, hi = observe.finalize(spec, m, h)
    allx = jnp.asarray(np.concatenate([x.reshape(-1) for x in xs]))
    rlo, rhi = observe.batch_range(allx, spec)
    amax = float(jnp.max(jnp.abs(allx)))
    tol = 1e-6 * amax if h is None else 2.5 * amax / 2048
    if isinstance(calibration, type(jq.mse())):
        tol = 0.8 / 31 * amax  # a neighbouring candidate ratio when errors are close
    if isinstance(calibration, type(jq.kl())):
        tol = 2 * amax / 512 * 8  # candidate thresholds are bins/8 apart... within one step
    np.testing.assert_allclose([float(lo), float(hi)], [float(rlo), float(rhi)], atol=tol)


def test_moments_count_non_finite_values_apart_and_empty_is_a_zero_range():
    m = observe.moments(jnp.asarray([1.0, -3.0, jnp.nan, jnp.inf, 2.0]))
    assert float(m.count) == 3 and float(m.nonfinite) == 2
    assert (float(m.lo), float(m.hi)) == (-3.0, 2.0)
    assert float(m.mean) == 0.0 and float(m.mean_abs) == 2.0
    empty = observe.moments(jnp.asarray([jnp.nan]))
    assert float(empty.count) == 0 and float(empty.nonfinite) == 1
    # no finite value: the histograms' range is (0, 0), not (+inf, -inf)
    assert [float(v) for v in observe.hist_range(empty)] == [0.0, 0.0, 0.0]
    # merging with an empty batch changes nothing
    merged = observe.merge(m, empty)
    assert float(merged.count) == 3 and float(merged.mean) == float(m.mean)
    assert float(merged.lo) == -3.0 and float(merged.nonfinite) == 3


def test_histograms_put_out_of_range_values_in_the_end_bins():
    x = jnp.asarray([-5.0, -1.0, 0.0, 0.5, 1.0, 5.0, jnp.nan])
    h = observe.histograms(x, jnp.float32(1.0), jnp.float32(-1.0), jnp.float32(1.0), 4)
    # |x| over [0, 1) in bins of 0.25: 0 -> bin 0, 0.5 -> bin 2, 1 and 5 -> the last bin
    np.testing.assert_array_equal(np.asarray(h.abs_counts), [1, 0, 1, 4])
    # x over [-1, 1) in bins of 0.5: -5 and -1 -> bin 0, 0 -> bin 2, 0.5, 1, 5 -> bin 3
    np.testing.assert_array_equal(np.asarray(h.counts), [2, 0, 1, 3])
    both = observe.add_hist(h, h)
    assert float(jnp.sum(both.counts)) == 12  # the NaN is counted nowhere


def test_only_histogram_methods_need_the_second_pass():
    assert observe.needs_histogram(jq.QuantSpec("int8", calibration=jq.percentile(99.0)))
    assert observe.needs_histogram(jq.QuantSpec("int8", calibration=jq.mse()))
    assert observe.needs_histogram(jq.QuantSpec("int8", calibration=jq.kl()))
    assert not observe.needs_histogram(jq.QuantSpec("int8"))
    assert not observe.needs_histogram(jq.QuantSpec("int8", calibration=jq.mean_std(3.0)))


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (jq.QuantSpec("int8", jq.per_channel(-1)), "use jq.per_tensor"),
        (jq.QuantSpec("ternary", calibration=jq.twn()), "a method for ternary weights"),
    ],
    ids=["per_channel", "twn"],
)
def test_activation_specs_that_cannot_be_static_are_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        observe.check_activation_spec(spec, "Dense_0")
    observe.check_activation_spec(jq.QuantSpec("int8"), "Dense_0")  # per tensor, absmax


def test_fixed_range_needs_no_statistics():
    m = observe.moments(jnp.asarray([100.0, -100.0]))
    lo, hi = observe.finalize(jq.QuantSpec("int8", calibration=jq.fixed(3.5)), m, None)
    assert (float(lo), float(hi)) == (-3.5, 3.5)
