"""Hadamard matrices, the fast Walsh-Hadamard transform and Hadamard rotations
(jaxquant/_src/hadamard.py, public as jaxquant.rotations).

Oracles: the defining property H H^T = n I in exact integer numpy arithmetic,
scipy.linalg.hadamard (Sylvester) for powers of two, and dense float64 numpy products
x @ H for the fast transform.
"""

import math
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import scipy.linalg

import jaxquant.rotations as jqr
from jaxquant._src import hadamard as hd

F32_EPS = float(np.finfo(np.float32).eps)

# One base of each construction and several field kinds: Paley II over a prime (12 = 2(5+1),
# 28, 36), over GF(9) (20) and GF(25) (52); Paley I over a prime (44, 68) and over GF(7^3)
# (344, the base of 11008).
BASES = [(12, "paley2"), (20, "paley2"), (28, "paley2"), (36, "paley2"), (44, "paley1")]
BASES += [(52, "paley2"), (60, "paley2"), (68, "paley1"), (108, "paley2"), (344, "paley1")]


def _rng(seed=0):
    return np.random.default_rng(seed)


def _dense(n):
    return np.asarray(jqr.hadamard_matrix(n, jnp.int32), np.int64)


def _gram(h):
    # Exact: float64 holds every integer below 2^53 (BLAS, unlike numpy's int64 matmul).
    f = h.astype(np.float64)
    return f @ f.T


# ---------------------------------------------------------------------- matrices


@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize(("m", "construction"), BASES, ids=[str(m) for m, _ in BASES])
def test_bases_times_powers_of_two_are_hadamard(m, construction, k):
    n = m * 2**k
    assert hd._plan(n) == (m, construction, k)
    h = _dense(n)
    assert set(np.unique(h).tolist()) == {-1, 1}
    np.testing.assert_array_equal(_gram(h), n * np.eye(n))


def test_fast_loop_bases_are_hadamard():
    # The edit-test loop's copy of the grid above (which it runs only the first case of).
    for m, _ in BASES:
        h = _dense(m)
        np.testing.assert_array_equal(_gram(h), m * np.eye(m))


@pytest.mark.slow
def test_every_base_up_to_the_limit_is_hadamard():
    bases = {hd._plan(n)[:2] for n in range(4, hd.MAX_BASE_ORDER + 1, 4) if hd._plan(n)}
    assert len(bases) > 80
    for m, construction in bases:
        h = hd._base(m, construction).astype(np.int64)  # checked when built; check again
        np.testing.assert_array_equal(_gram(h), m * np.eye(m))


@pytest.mark.parametrize("k", range(11))
def test_powers_of_two_are_scipys_sylvester(k):
    np.testing.assert_array_equal(_dense(2**k), scipy.linalg.hadamard(2**k))


def test_symmetry_of_the_constructions():
    # Sylvester and Paley II are symmetric; Paley I is of skew type, H + H^T = 2 I.
    for n in (16, 12, 20, 28, 52, 12 * 8):
        h = _dense(n)
        np.testing.assert_array_equal(h, h.T)
    h = _dense(44)
    np.testing.assert_array_equal(h + h.T, 2 * np.eye(44, dtype=np.int64))


def test_dtype_of_the_matrix():
    assert jqr.hadamard_matrix(8).dtype == jnp.float32
    assert jqr.hadamard_matrix(8, jnp.bfloat16).dtype == jnp.bfloat16
    assert jqr.hadamard_matrix(12, jnp.int8).dtype == jnp.int8


def test_common_model_widths_are_supported():
    widths = [768, 1024, 2048, 2560, 3072, 3584, 4096, 5120, 8192, 11008, 13824, 14336, 18944]
    assert all(jqr.hadamard_supported(n) for n in widths)
    assert hd._plan(768) == (12, "paley2", 6)
    assert hd._plan(2560) == (20, "paley2", 7)
    assert hd._plan(3584) == (28, "paley2", 7)
    assert hd._plan(5120) == (20, "paley2", 8)
    assert hd._plan(11008) == (344, "paley1", 5)
    # Not covered: an odd factor without two factors of 2, and 92 (needs Williamson's).
    assert not any(jqr.hadamard_supported(n) for n in (0, 3, 6, 10, 92, 4 * 23))
    assert jqr.hadamard_supported(1) and jqr.hadamard_supported(2)


# ---------------------------------------------------------------------- the fast transform

SIZES = [1, 2, 16, 12 * 4, 20 * 8, 28 * 4, 768, 44, 68 * 2]


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("n", SIZES)
def test_fast_transform_is_the_dense_product(n, transpose):
    x = _rng(n).standard_normal((3, n)).astype(np.float32)
    h = _dense(n).astype(np.float64)
    want = x.astype(np.float64) @ (h.T if transpose else h)
    got = np.asarray(jqr.walsh_hadamard(x, normalize=False, transpose=transpose))
    # float32 sums: each factor's pass sums `order` terms per output (error <= order * eps
    # of the sum of their magnitudes), and every partial result is bounded by sum |x|.
    orders = sum(f.shape[0] for f in hd._factors(*hd._plan(n)))
    bound = orders * F32_EPS * np.abs(x).sum(-1, keepdims=True)
    assert np.all(np.abs(got - want) <= bound)
    scaled = np.asarray(jqr.walsh_hadamard(x, transpose=transpose))
    assert np.all(np.abs(scaled - want / math.sqrt(n)) <= bound / math.sqrt(n) + F32_EPS)


def test_fast_transform_along_other_axes():
    x = _rng(1).standard_normal((5, 12, 3)).astype(np.float32)
    h = _dense(12).astype(np.float64)
    want = np.einsum("aic,ij->ajc", x.astype(np.float64), h) / math.sqrt(12)
    for axis in (1, -2):
        got = jqr.walsh_hadamard(x, axis=axis)
        assert got.shape == x.shape
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)


def test_orthonormal_transform_preserves_norms():
    for n in (4096, 768, 44):
        x = _rng(n).standard_normal((4, n)).astype(np.float32)
        y = np.asarray(jqr.walsh_hadamard(x), np.float64)
        np.testing.assert_allclose(
            np.linalg.norm(y, axis=-1), np.linalg.norm(x.astype(np.float64), axis=-1), rtol=1e-5
        )


@pytest.mark.parametrize("n", [64, 768, 44])
def test_inverse_round_trip(n):
    x = _rng(n).standard_normal((3, n)).astype(np.float32)
    y = jqr.walsh_hadamard(x)
    np.testing.assert_allclose(jqr.walsh_hadamard(y, transpose=True), x, rtol=0, atol=1e-5)
    # Unnormalized: the inverse is the transpose divided by n.
    z = jqr.walsh_hadamard(jqr.walsh_hadamard(x, normalize=False), normalize=False, transpose=True)
    np.testing.assert_allclose(np.asarray(z) / n, x, rtol=0, atol=1e-5)
    twice = np.asarray(jqr.walsh_hadamard(y))
    if n == 44:  # Paley I: not symmetric, so not an involution
        assert not np.allclose(twice, x, atol=1e-2)
    else:
        np.testing.assert_allclose(twice, x, rtol=0, atol=1e-5)


def test_jit_equals_eager():
    x = _rng(2).standard_normal((4, 768)).astype(np.float32)
    for transpose in (False, True):
        f = lambda v, t=transpose: jqr.walsh_hadamard(v, transpose=t)
        np.testing.assert_array_equal(np.asarray(jax.jit(f)(x)), np.asarray(f(x)))


def test_vmap():
    x = _rng(3).standard_normal((5, 2, 48)).astype(np.float32)
    got = jax.vmap(lambda v: jqr.walsh_hadamard(v, axis=-1))(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(jqr.walsh_hadamard(x)), atol=1e-6)
    # The transformed axis first inside the vmapped function, the batch axis last outside.
    xt = np.transpose(x, (2, 0, 1))  # (48, 5, 2)
    got0 = jax.vmap(lambda v: jqr.walsh_hadamard(v, axis=0), in_axes=2, out_axes=2)(xt)
    want = np.transpose(np.asarray(jqr.walsh_hadamard(x)), (2, 0, 1))
    np.testing.assert_allclose(np.asarray(got0), want, atol=1e-6)


@pytest.mark.parametrize("n", [44, 64])
def test_grad_is_the_transpose(n):
    # d/dx sum(c * (x H)) = c H^T: the gradient uses the transposed transform. Paley I (44)
    # is not symmetric, so this tells H from H^T.
    x = _rng(4).standard_normal((2, n)).astype(np.float32)
    c = _rng(5).standard_normal((2, n)).astype(np.float32)
    g = jax.grad(lambda v: jnp.sum(jqr.walsh_hadamard(v) * c))(x)
    want = c.astype(np.float64) @ _dense(n).T / math.sqrt(n)
    np.testing.assert_allclose(np.asarray(g), want, rtol=0, atol=1e-5)
    g_jit = jax.jit(jax.grad(lambda v: jnp.sum(jqr.walsh_hadamard(v) * c)))(x)
    np.testing.assert_allclose(np.asarray(g_jit), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, ml_dtypes.float8_e4m3fn])
def test_low_precision_input_returns_its_dtype(dtype):
    x = jnp.asarray(_rng(6).standard_normal((3, 48)), dtype)
    y = jqr.walsh_hadamard(x)
    assert y.dtype == x.dtype
    # Computed in float32 and rounded once at the end.
    want = jqr.walsh_hadamard(x.astype(jnp.float32)).astype(dtype)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(want, np.float32))


def test_no_dense_matrix_in_the_program():
    # The O(n log n) claim: the program for n = 4096 = 64 * 64 holds no 4096 x 4096 (or any
    # quadratic) constant, only the 64 x 64 Sylvester factor; for 768 = 12 * 64 the 12 x 12
    # Paley base and the 64 x 64 factor. Read from the lowered StableHLO's constants.
    for n, want in ((4096, {(64, 64)}), (768, {(12, 12), (64, 64)})):
        hlo = jax.jit(jqr.walsh_hadamard).lower(jnp.zeros((2, n), jnp.float32)).as_text()
        shapes = re.findall(r"stablehlo\.constant [^\n]*: tensor<((?:\d+x)*)\w+>", hlo)
        assert shapes  # the regex still matches (the scale at least)
        dims = {tuple(int(d) for d in s.split("x") if d) for s in shapes}
        assert {d for d in dims if math.prod(d) > 1} == want
        assert f"{n}x{n}" not in hlo


# ---------------------------------------------------------------------- rotations


def _rotation_matrix(r):
    signs = np.asarray(r.signs, np.float64)
    return signs[:, None] * _dense(r.size) / math.sqrt(r.size)


@pytest.mark.parametrize("random", [True, False])
def test_block_rotation_is_kron_identity_rotation(random):
    key = jax.random.key(3) if random else None
    r = jqr.hadamard_rotation(16, key=key)
    x = _rng(7).standard_normal((5, 64)).astype(np.float32)
    dense = np.kron(np.eye(4), _rotation_matrix(r))
    want = x.astype(np.float64) @ dense
    np.testing.assert_allclose(np.asarray(r.apply(x)), want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(r.inverse(x)), x @ dense.T, rtol=0, atol=1e-5)
    if not random:
        np.testing.assert_array_equal(np.asarray(r.signs), np.ones(16, np.float32))
        wh = jqr.walsh_hadamard(x.reshape(5, 4, 16)).reshape(5, 64)
        np.testing.assert_allclose(np.asarray(r.apply(x)), np.asarray(wh), atol=1e-6)


def test_random_signs_are_reproducible_and_differ_across_keys():
    a = jqr.hadamard_rotation(4096, key=jax.random.key(0)).signs
    b = jqr.hadamard_rotation(4096, key=jax.random.key(0)).signs
    c = jqr.hadamard_rotation(4096, key=jax.random.key(1)).signs
    legacy = jqr.hadamard_rotation(4096, key=jax.random.PRNGKey(0)).signs
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert set(np.unique(np.asarray(a)).tolist()) == {-1.0, 1.0}
    assert a.dtype == jnp.float32
    # Independent fair signs agree on Binomial(4096, 1/2) positions: mean 2048, sd 32.
    # 8 sd from the mean: a false failure has probability < 1e-14.
    agree = int(np.sum(np.asarray(a) == np.asarray(c)))
    assert abs(agree - 2048) < 8 * 32
    plus = int(np.sum(np.asarray(a) > 0))
    assert abs(plus - 2048) < 8 * 32
    assert legacy.shape == (4096,)


@pytest.mark.parametrize("size", [16, 768, 44])
def test_rotation_round_trip_and_product(size):
    r = jqr.hadamard_rotation(size, key=jax.random.key(size))
    x = _rng(8).standard_normal((3, 2 * size)).astype(np.float32)
    w = _rng(9).standard_normal((2 * size, 7)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(r.inverse(r.apply(x))), x, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(r.apply(r.inverse(x))), x, rtol=0, atol=1e-5)
    # Rotating both operands along the contraction leaves the product unchanged.
    y = r.apply(x) @ r.apply(w, axis=0)
    np.testing.assert_allclose(np.asarray(y), x @ w, rtol=0, atol=2e-4 * math.sqrt(size))


def test_rotation_under_jit_and_vmap():
    r = jqr.hadamard_rotation(16, key=jax.random.key(0))
    x = _rng(10).standard_normal((4, 32)).astype(np.float32)
    eager = r.apply(x)
    jitted = jax.jit(lambda rot, v: rot.apply(v))(r, x)
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(eager))
    # One rotation per layer: stack the rotations of several keys and vmap over them.
    keys = jax.random.split(jax.random.key(1), 3)
    stacked = jax.vmap(lambda k: jqr.hadamard_rotation(16, key=k))(keys)
    assert stacked.signs.shape == (3, 16)
    got = jax.vmap(lambda rot: rot.apply(x))(stacked)
    for i in range(3):
        one = jqr.hadamard_rotation(16, key=keys[i])
        np.testing.assert_allclose(np.asarray(got[i]), np.asarray(one.apply(x)), atol=1e-6)


def test_rotation_grad_and_dtype():
    r = jqr.hadamard_rotation(16, key=jax.random.key(2))
    x = jnp.asarray(_rng(11).standard_normal((2, 16)), jnp.bfloat16)
    assert r.apply(x).dtype == jnp.bfloat16 and r.inverse(x).dtype == jnp.bfloat16
    c = _rng(12).standard_normal((2, 16)).astype(np.float32)
    g = jax.grad(lambda v: jnp.sum(r.apply(v) * c))(np.zeros((2, 16), np.float32))
    np.testing.assert_allclose(np.asarray(g), np.asarray(r.inverse(c)), atol=1e-6)


# ---------------------------------------------------------------------- errors


def test_uncovered_size_names_the_size_axis_and_nearest_sizes():
    with pytest.raises(ValueError, match=r"axis -1 .*size 92.*nearest covered sizes are 88 and 96"):
        jqr.walsh_hadamard(jnp.zeros((3, 92)))
    with pytest.raises(ValueError, match=r"axis 0 .*size 6.*4 and 8.*largest is 2"):
        jqr.walsh_hadamard(jnp.zeros((6, 4)), axis=0)
    with pytest.raises(ValueError, match=r"n is 92.*88 and 96"):
        jqr.hadamard_matrix(92)
    with pytest.raises(ValueError, match=r"size is 6.*4 and 8"):
        jqr.hadamard_rotation(6)
    with pytest.raises(ValueError, match=r"rotation has size 6"):
        jqr.HadamardRotation(jnp.ones(6)).apply(jnp.zeros(12))


def test_bad_arguments():
    with pytest.raises(TypeError, match=r"x must be a floating-point array, got dtype int32"):
        jqr.walsh_hadamard(jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(TypeError, match=r"x must be a floating-point array"):
        jqr.hadamard_rotation(4).apply(jnp.zeros(4, jnp.int8))
    with pytest.raises(TypeError, match=r"x must be a floating-point array"):
        jqr.walsh_hadamard("abc")
    with pytest.raises(ValueError, match=r"axis 2 is out of range"):
        jqr.walsh_hadamard(jnp.zeros((2, 4)), axis=2)
    with pytest.raises(TypeError, match=r"axis must be an int"):
        jqr.walsh_hadamard(jnp.zeros((2, 4)), axis=1.0)
    with pytest.raises(TypeError, match=r"normalize must be True or False"):
        jqr.walsh_hadamard(jnp.zeros(4), normalize="yes")
    with pytest.raises(ValueError, match=r"length 40, not a multiple of the rotation's size 16"):
        jqr.hadamard_rotation(16).apply(jnp.zeros((2, 40)))
    with pytest.raises(TypeError, match=r"key must be a PRNG key"):
        jqr.hadamard_rotation(16, key=0)
    with pytest.raises(ValueError, match=r"n must be an int in 1\.\.2147483647, got 0"):
        jqr.hadamard_matrix(0)
    with pytest.raises(TypeError, match=r"n must be an int"):
        jqr.hadamard_matrix(True)
    with pytest.raises(TypeError, match=r"size must be an int"):
        jqr.hadamard_rotation(16.0)
    with pytest.raises(ValueError, match=r"signs must be a vector"):
        jqr.HadamardRotation(jnp.ones((2, 16))).apply(jnp.zeros(16))
    with pytest.raises(TypeError, match=r"signs must be a float array"):
        jqr.HadamardRotation(None).apply(jnp.zeros(16))
    with pytest.raises(TypeError, match=r"dtype must be a dtype"):
        jqr.hadamard_matrix(4, "bogus")
    with pytest.raises(ValueError, match=r"size must be an int in 1\.\.2147483647"):
        jqr.hadamard_rotation(2**40)
    with pytest.raises(ValueError, match=r"size 0.*nearest covered size is 1\."):
        jqr.walsh_hadamard(jnp.zeros((2, 0)))
    assert not jqr.hadamard_supported(2**40) and not jqr.hadamard_supported(-4)
