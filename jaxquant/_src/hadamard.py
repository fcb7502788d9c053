"""Hadamard matrices, the fast Walsh-Hadamard transform and Hadamard rotations.

A Hadamard matrix ``H`` of order ``n`` has entries ``+-1`` and ``H H^T = n I``, so
``H / sqrt(n)`` is orthogonal: a rotation that spreads every input coordinate evenly over
all outputs. Applied before quantization it flattens outlier channels (QuaRot,
https://arxiv.org/abs/2404.00456; SpinQuant's random-Hadamard baseline,
https://arxiv.org/abs/2405.16406) and makes the values of a block closer to Gaussian for
4-bit training (NVFP4, https://arxiv.org/abs/2509.25149; MXFP4,
https://arxiv.org/abs/2502.20586). Applied along the contraction axis of both operands of a
product it cancels: ``(x R)(R^T w) = x w``.

Sizes and constructions. Every order here is ``n = m * 2^k`` and ``H_n = kron(H_m, S_{2^k})``:

* ``S_{2^k}``, Sylvester's: ``S_1 = [1]``, ``S_{2t} = [[S_t, S_t], [S_t, -S_t]]``; entry
  ``(i, j)`` is ``(-1)^popcount(i & j)``, the same matrix as ``scipy.linalg.hadamard``.
  Symmetric.
* the base ``H_m`` (``m = 1`` when ``n`` is a power of two), else the smallest order
  ``m = o * 2^j`` (``o`` the odd part of ``n``, ``j >= 2``, ``m <= 1024``) that Paley's
  constructions give over the finite field GF(q), q a prime power:

  - Paley II, order ``2 (q + 1)`` for ``q = 1 mod 4`` (12, 20, 28, 36, 52, 60, 76, 84, ...).
    Symmetric. Preferred where both apply.
  - Paley I, order ``q + 1`` for ``q = 3 mod 4``, where Paley II gives no base (44, 68, 132,
    140, ..., 344 = 7^3 + 1 for the 11008-wide MLP of 7B LLaMAs). Skew type,
    ``H + H^T = 2 I``: not symmetric.

  So 768 = 12 * 64, 2560 = 20 * 128, 3584 = 28 * 128, 5120 = 20 * 256, 11008 = 344 * 32 and
  13824 = 108 * 128 are covered; 92 = 4 * 23 is not (the Hadamard matrix of order 92 exists
  but needs Williamson's construction), nor is any size with an odd factor but fewer than
  two factors of 2 (Hadamard orders above 2 are multiples of 4).

The transform ``x -> x H`` along an axis never builds the ``n x n`` matrix: ``x`` is
reshaped to one axis per Kronecker factor and each factor multiplies its own axis. The
``2^k`` factor is split into Sylvester factors of order at most 64 (``S_{2^(a+b)} =
kron(S_{2^a}, S_{2^b})``), a radix-64 fast Walsh-Hadamard transform: ``ceil(k / 6)`` passes
of at most 64 multiply-adds per element, ``O(n log n)``. The base is one dense ``m x m``
product (``m`` multiply-adds per element). The base matrices are built once in numpy (exact
integers, checked ``H H^T = m I``) and cached.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from jaxquant._src.checks import check_bool, check_int, describe
from jaxquant._src.rounding import check_key

# The largest base order built: a dense m x m product costs m additions per element, and
# every common model width has a base far below this (the largest above is 344).
MAX_BASE_ORDER = 1024
# The largest order built (an array dimension XLA indexes with int32).
_MAX_SIZE = 2**31 - 1


# ---------------------------------------------------------------------- sizes


def _prime_power(q: int) -> tuple[int, int] | None:
    """``(p, e)`` with ``q = p^e``, p prime and e >= 1, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    e = 0
    while q % p == 0:
        q //= p
        e += 1
    return (p, e) if q == 1 else None


@functools.lru_cache(maxsize=4096)
def _plan(n: int) -> tuple[int, str, int] | None:
    """``(m, construction, k)`` with ``n = m * 2^k``, construction one of ``"sylvester"``
    (``m = 1``), ``"paley2"``, ``"paley1"``; None when no construction here covers ``n``."""
    if n < 1:
        return None
    odd, twos = n, 0
    while odd % 2 == 0:
        odd //= 2
        twos += 1
    if odd == 1:
        return 1, "sylvester", twos
    # A base of order m = odd * 2^j needs j >= 2 (orders above 2 are multiples of 4). The
    # smallest base is the cheapest (m additions per element); for j = 2, q = m/2 - 1 is
    # 1 mod 4 (Paley II); m - 1 is always 3 mod 4 (Paley I).
    for j in range(2, twos + 1):
        m = odd << j
        if m > MAX_BASE_ORDER:
            break
        if j == 2 and _prime_power(m // 2 - 1) is not None:
            return m, "paley2", twos - j
        if _prime_power(m - 1) is not None:
            return m, "paley1", twos - j
    return None


def hadamard_supported(n: int) -> bool:
    """Whether :func:`hadamard_matrix`, :func:`walsh_hadamard` and :func:`hadamard_rotation`
    cover size ``n``.

    Covered are the sizes ``n = m * 2^k`` with ``m = 1`` (Sylvester) or ``m <= 1024`` an order
    of Paley's constructions I (``q + 1``, ``q = 3 mod 4`` a prime power) or II
    (``2 (q + 1)``, ``q = 1 mod 4``); see the module's description.

    Args:
      n: a size (a Python int).

    Returns:
      True when a Hadamard matrix of order ``n`` is constructed here, else False (also for
      ``n < 1`` and ``n >= 2^31``).

    Example:
      >>> import jaxquant.rotations as jqr
      >>> [jqr.hadamard_supported(n) for n in (64, 768, 2560, 11008, 92, 96, 6)]
      [True, True, True, True, False, True, False]
    """
    n = check_int(n, "hadamard_supported: n")
    return n <= _MAX_SIZE and _plan(n) is not None


def _nearest_supported(n: int) -> tuple[int | None, int]:
    """The largest covered size below ``n`` (None for none) and the smallest above it."""
    below = next((s for s in range(n - 1, 0, -1) if _plan(s) is not None), None)
    above = next(s for s in itertools.count(n + 1) if _plan(s) is not None)
    return below, above


def _uncovered(n: int, what: str, fix: str) -> ValueError:
    below, above = _nearest_supported(n)
    nearest = f"sizes are {below} and {above}" if below is not None else f"size is {above}"
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    divisor = max((d for d in small + [n // d for d in small] if _plan(d) is not None), default=1)
    return ValueError(
        f"{what} {n}, which no Hadamard construction here covers: the covered sizes are "
        f"m * 2^k with m = 1 or a Paley order up to {MAX_BASE_ORDER} (12, 20, 28, 36, 44, 52, "
        f"60, ...; see jaxquant.rotations.hadamard_supported). The nearest covered {nearest}. "
        + fix.format(above=above, divisor=divisor)
    )


# ---------------------------------------------------------------------- constructions


def _polymod(a: list[int], b: list[int], p: int) -> list[int]:
    """The remainder of polynomial ``a`` by monic ``b`` over GF(p) (coefficients low to high)."""
    r = list(a)
    deg = len(b) - 1
    for i in range(len(r) - 1, deg - 1, -1):
        c = r[i] % p
        if c:
            for j in range(deg + 1):
                r[i - deg + j] -= c * b[j]
    return [c % p for c in r[:deg]]


def _irreducible(p: int, e: int) -> list[int]:
    """The low coefficients ``f_0 .. f_{e-1}`` of a monic irreducible polynomial of degree
    ``e`` over GF(p): the first one (in counting order) no monic polynomial of degree
    1 .. e // 2 divides."""
    for low in itertools.product(range(p), repeat=e):
        if low[0] == 0:
            continue  # divisible by x
        f = [*low, 1]
        if all(
            any(_polymod(f, [*g, 1], p))
            for d in range(1, e // 2 + 1)
            for g in itertools.product(range(p), repeat=d)
        ):
            return list(low)
    raise AssertionError(f"no irreducible polynomial of degree {e} over GF({p})")  # unreachable


def _jacobsthal(q: int) -> np.ndarray:
    """Jacobsthal's matrix of GF(q): ``Q[i, j] = chi(a_i - a_j)`` with ``chi`` the quadratic
    character (0 at 0, 1 on nonzero squares, -1 elsewhere) and ``a_i`` the element whose
    base-p digits are the polynomial coefficients of ``i`` (GF(p^e) = GF(p)[x] / f)."""
    pe = _prime_power(q)
    assert pe is not None
    p, e = pe
    codes = np.arange(q, dtype=np.int64)
    weights = p ** np.arange(e, dtype=np.int64)
    digits = (codes[:, None] // weights) % p  # (q, e)
    # The squares a * a of every element, as codes.
    prod = np.zeros((q, 2 * e - 1), np.int64)
    for i in range(e):
        for j in range(e):
            prod[:, i + j] += digits[:, i] * digits[:, j]
    prod %= p
    if e > 1:
        f = _irreducible(p, e)
        for d in range(2 * e - 2, e - 1, -1):  # x^d = -x^(d-e) * (f_0 + ... + f_{e-1} x^(e-1))
            c = prod[:, d].copy()
            prod[:, d] = 0
            for i in range(e):
                prod[:, d - e + i] -= c * f[i]
            prod %= p
    squares = prod[:, :e] @ weights
    chi = -np.ones(q, np.int64)
    chi[squares[1:]] = 1
    chi[0] = 0
    diff = ((digits[:, None, :] - digits[None, :, :]) % p) @ weights  # (q, q) codes
    return chi[diff]


def _paley1(q: int) -> np.ndarray:
    """Paley's construction I, order ``q + 1`` for a prime power ``q = 3 mod 4``:
    ``I + [[0, 1^T], [-1, Q]]`` with ``Q`` skew-symmetric (``chi(-1) = -1``)."""
    s = np.zeros((q + 1, q + 1), np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return s + np.eye(q + 1, dtype=np.int64)


def _paley2(q: int) -> np.ndarray:
    """Paley's construction II, order ``2 (q + 1)`` for a prime power ``q = 1 mod 4``: the
    symmetric conference matrix ``C = [[0, 1^T], [1, Q]]`` with 0 replaced by
    ``[[1, -1], [-1, -1]]`` and ``+-1`` by ``+-[[1, 1], [1, -1]]``."""
    c = np.zeros((q + 1, q + 1), np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    one = np.array([[1, 1], [1, -1]], np.int64)
    zero = np.array([[1, -1], [-1, -1]], np.int64)
    return np.kron(c, one) + np.kron(np.eye(q + 1, dtype=np.int64), zero)


@functools.cache
def _base(m: int, construction: str) -> np.ndarray:
    """The base matrix of order ``m`` (int8, read-only), checked ``H H^T = m I``."""
    if construction == "sylvester":
        h = np.ones((1, 1), np.int64)
    elif construction == "paley2":
        h = _paley2(m // 2 - 1)
    else:
        h = _paley1(m - 1)
    # Exact in float64 (integers below 2^53); guards the field arithmetic above.
    gram = h.astype(np.float64) @ h.T.astype(np.float64)
    if h.shape != (m, m) or not np.array_equal(gram, m * np.eye(m)):
        raise AssertionError(f"{construction} matrix of order {m} is not Hadamard")  # a bug
    out = h.astype(np.int8)
    out.flags.writeable = False
    return out


def _sylvester(n: int) -> np.ndarray:
    """Sylvester's Hadamard matrix of order ``n`` (a power of two, at most 64 here), int8."""
    i = np.arange(n, dtype=np.uint8)
    parity = np.bitwise_count(i[:, None] & i[None, :]) % 2
    return (1 - 2 * parity.astype(np.int8)).astype(np.int8)


# The largest Sylvester factor, in bits: S_{2^k} is applied as a Kronecker product of
# factors of order <= 64. A radix-2 butterfly (k passes of (a, b) -> (a + b, a - b)) does the
# fewest additions but reads and writes the whole array k times; dense 64-point factors take
# ceil(k / 6) passes that run as small matrix products (matrix units where a backend has
# them). Measured on a shared, loaded 2-core CPU (XLA, jit, float32, 1024 x 4096): about
# 50 ms against 150 ms for the radix-2 butterfly and 700 ms for the dense 4096 x 4096
# product; factors of 16 ... 256 were within the noise of each other.
_RADIX_BITS = 6


@functools.lru_cache(maxsize=256)
def _factors(m: int, construction: str, k: int) -> tuple[np.ndarray, ...]:
    """The factors of ``H = kron(H_m, S_{2^c1}, S_{2^c2}, ...)``, ``c1 + c2 + ... = k`` split
    into near-equal parts of at most ``_RADIX_BITS`` (Sylvester's matrices multiply:
    ``S_{2^(a+b)} = kron(S_{2^a}, S_{2^b})``, entry ``(-1)^popcount(i & j)`` splits by bits)."""
    out = [_base(m, construction)] if m > 1 else []
    parts = -(-k // _RADIX_BITS)
    out += [_sylvester(2 ** (k // parts + (i < k % parts))) for i in range(parts)]
    for f in out:
        f.flags.writeable = False  # shared through the cache
    return tuple(out)


def hadamard_matrix(n: int, dtype: DTypeLike = jnp.float32) -> jax.Array:
    """The Hadamard matrix of order ``n`` that :func:`walsh_hadamard` multiplies by.

    ``H = kron(H_m, S_{2^k})`` for ``n = m * 2^k``: ``S`` Sylvester's matrix (entry ``(i, j)`` is
    ``(-1)^popcount(i & j)``, as in ``scipy.linalg.hadamard``) and ``H_m`` the smallest Paley
    base that fits (none when ``n`` is a power of two). Entries are ``+-1`` and
    ``H H^T = n I``; ``H`` is symmetric unless its base is Paley I (bases 44, 68, 132, 140,
    ..., where ``H_m + H_m^T = 2 I``). Dense, ``n^2`` elements: for the product use
    :func:`walsh_hadamard`, which never builds it.

    Args:
      n: the order, a size :func:`hadamard_supported` covers.
      dtype: the dtype of the result.

    Returns:
      An ``(n, n)`` array of ``+-1`` in ``dtype``.

    Raises:
      ValueError: when no construction here covers ``n``; the message gives the nearest
        covered sizes.

    Example:
      >>> import jax.numpy as jnp, jaxquant.rotations as jqr
      >>> jqr.hadamard_matrix(4, jnp.int8)
      Array([[ 1,  1,  1,  1],
             [ 1, -1,  1, -1],
             [ 1,  1, -1, -1],
             [ 1, -1, -1,  1]], dtype=int8)
      >>> h = jqr.hadamard_matrix(12)
      >>> bool((h @ h.T == 12 * jnp.eye(12)).all())
      True

    References:
      Sylvester 1867; Paley, "On orthogonal matrices", J. Math. Phys. 12 (1933).
      QuaRot (Ashkboos et al. 2024), https://arxiv.org/abs/2404.00456, section 3.
    """
    n = check_int(n, "hadamard_matrix: n", lo=1, hi=_MAX_SIZE)
    try:
        out_dtype = jnp.dtype(dtype) if dtype is not None else None
    except TypeError:
        out_dtype = None
    if out_dtype is None:
        raise TypeError(
            "hadamard_matrix: dtype must be a dtype such as jnp.float32 or jnp.int8, got "
            "an unknown one; the entries are +-1, exact in every dtype."
        )
    plan = _plan(n)
    if plan is None:
        raise _uncovered(n, "hadamard_matrix: n is", "Pick a covered order.")
    h = np.ones((1, 1), np.int8)
    for factor in _factors(*plan):  # int8 throughout: n^2 bytes before the cast
        h = np.kron(h, factor)
    return jnp.asarray(h, dtype=out_dtype)


# ---------------------------------------------------------------------- transforms


def _check_float(x: ArrayLike, what: str) -> jax.Array:
    if not isinstance(x, jax.Array | np.ndarray | np.generic | float | list | tuple):
        raise TypeError(f"{what} must be a floating-point array, got {describe(x)}.")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{what} must be a floating-point array, got dtype {x.dtype}. The transform is "
            "real-valued and returns the input's dtype: cast first, e.g. x.astype(jnp.float32)."
        )
    return x


def _check_axis(axis: Any, x: jax.Array, what: str) -> int:
    axis = check_int(axis, f"{what}: axis")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(
            f"{what}: axis {axis} is out of range for x of shape {x.shape} (ndim {x.ndim}); "
            f"pass an axis in {-x.ndim}..{x.ndim - 1}."
        )
    return axis


# Jitted so that an eager call compiles once per shape instead of dispatching op by op;
# inside a caller's jit it is inlined.
@functools.partial(jax.jit, static_argnames=("axis", "size", "normalize", "transpose"))
def _transform(
    x: jax.Array,
    axis: int,
    size: int,
    *,
    signs: jax.Array | None,
    normalize: bool,
    transpose: bool,
) -> jax.Array:
    """``x M`` (or ``x M^T``) along ``axis`` with ``M = kron(I, D H_size s)`` block-diagonal:
    ``D = diag(signs)`` (identity for None), ``s = 1/sqrt(size)`` if ``normalize`` else 1.
    ``size`` must be covered and divide the axis' length."""
    plan = _plan(size)
    assert plan is not None
    factors = _factors(*plan)
    dtype = x.dtype
    # At least float32 (sums of up to n terms), float64 stays float64; the caller's dtype back.
    compute = dtype if jnp.dtype(dtype).itemsize >= 4 else jnp.dtype(jnp.float32)
    y = jnp.moveaxis(x.astype(compute), axis, -1)
    lead, n = y.shape[:-1], y.shape[-1]
    # One axis per Kronecker factor: index i = (i_1, i_2, ...) row-major, so x kron(A, B)
    # multiplies axis 1 by A and axis 2 by B.
    orders = tuple(f.shape[0] for f in factors)
    y = y.reshape(*lead, n // size, *orders)
    first = len(lead) + 1
    if signs is not None:
        d = signs.astype(compute).reshape((1,) * first + orders)
        if not transpose:  # (x D) H
            y = y * d
    for i, factor in enumerate(factors):
        f = (factor.T if transpose else factor).astype(np.float64)
        if normalize and i == 0:
            # 1/sqrt(size) folded into the first factor: no pass of its own (exact for
            # size = 4^j; otherwise each term carries the one rounding of the scale).
            f = f / math.sqrt(size)
        # HIGHEST keeps TPUs / GPUs from rounding y to bf16 / TF32 in the product.
        y = jnp.tensordot(
            y, jnp.asarray(f, compute), axes=[[first + i], [0]], precision=lax.Precision.HIGHEST
        )
        y = jnp.moveaxis(y, -1, first + i)
    if signs is not None and transpose:  # (x H^T) D: D is its own transpose
        y = y * d
    y = y.reshape(*lead, n)
    return jnp.moveaxis(y, -1, axis).astype(dtype)


def walsh_hadamard(
    x: ArrayLike, *, axis: int = -1, normalize: bool = True, transpose: bool = False
) -> jax.Array:
    """The fast Walsh-Hadamard transform ``y = x H`` along ``axis``, in ``O(n log n)``.

    ``H`` is :func:`hadamard_matrix` of order ``n = x.shape[axis] = m * 2^k``:
    ``y[..., j] = sum_i x[..., i] H[i, j]`` along ``axis``. The ``2^k`` factor runs as
    ``ceil(k / 6)`` Sylvester factors of order <= 64 (``O(n log n)``), the Paley base
    (``m > 1``) as one dense ``m x m`` product; no ``n x n`` matrix is built. With
    ``normalize`` the result is divided by ``sqrt(n)``: the transform is orthonormal (norms
    are preserved) and its inverse is its transpose. For symmetric ``H`` (Sylvester and
    Paley II bases; every power of two) it is its own inverse; in all cases
    ``transpose=True`` gives ``x H^T``, the inverse of the orthonormal transform.
    Without ``normalize`` the inverse is ``walsh_hadamard(y, normalize=False,
    transpose=True) / n``.

    Computed in float32 (float64 input stays float64) and returned in ``x``'s dtype; linear,
    so it works under ``jax.jit``, ``jax.vmap`` and ``jax.grad`` (whose transpose is
    ``transpose=True``).

    Args:
      x: a floating-point array.
      axis: the axis to transform; its length must be covered (:func:`hadamard_supported`).
      normalize: divide by ``sqrt(n)`` (orthonormal) when True, else the plain ``x H``.
      transpose: multiply by ``H^T`` instead of ``H``.

    Returns:
      ``x H`` (or ``x H^T``, divided by ``sqrt(n)`` with ``normalize``) along ``axis``, with
      ``x``'s shape and dtype.

    Raises:
      TypeError: for a non-float ``x``.
      ValueError: when the axis' length is not covered; the message names the size and the
        nearest covered sizes.

    Example:
      >>> import jax.numpy as jnp, jaxquant.rotations as jqr
      >>> x = jnp.array([1.0, 0.0, 0.0, 0.0])
      >>> jqr.walsh_hadamard(x, normalize=False)  # the first row of H
      Array([1., 1., 1., 1.], dtype=float32)
      >>> x = jnp.ones((2, 768))  # 768 = 12 * 64: a Paley II base and S_64; orthonormal:
      >>> y = jqr.walsh_hadamard(x)
      >>> round(float(jnp.linalg.norm(y[0])), 4), round(float(jnp.linalg.norm(x[0])), 4)
      (27.7128, 27.7128)
      >>> float(jnp.abs(jqr.walsh_hadamard(y, transpose=True) - x).max()) < 1e-5
      True

    References:
      QuaRot (Ashkboos et al. 2024), https://arxiv.org/abs/2404.00456;
      SpinQuant (Liu et al. 2024), https://arxiv.org/abs/2405.16406.
    """
    x = _check_float(x, "walsh_hadamard: x")
    axis = _check_axis(axis, x, "walsh_hadamard")
    normalize = check_bool(normalize, "walsh_hadamard: normalize")
    transpose = check_bool(transpose, "walsh_hadamard: transpose")
    n = x.shape[axis]
    if _plan(n) is None:
        raise _uncovered(
            n,
            f"walsh_hadamard: axis {axis} of x (shape {x.shape}) has size",
            "Pad that axis with zeros to {above}, or rotate blocks of a covered size that "
            "divides it with hadamard_rotation (the largest is {divisor}).",
        )
    return _transform(x, axis, n, signs=None, normalize=normalize, transpose=transpose)


class HadamardRotation(NamedTuple):
    """An orthonormal Hadamard rotation ``R = D H / sqrt(size)``, applied blockwise.

    ``D = diag(signs)``; ``H`` is :func:`hadamard_matrix` of order ``size``. On an axis of
    length ``L`` (a multiple of ``size``), :meth:`apply` multiplies each of the ``L / size``
    consecutive blocks by ``R``: ``x -> x kron(I, R)``. With ``size = L`` that is one full
    rotation (QuaRot, SpinQuant); with ``size = 16`` the 16 x 16 block transform of NVFP4
    training. :meth:`inverse` multiplies by ``R^T``, so ``inverse(apply(x)) = x``, and the
    rotation cancels in a product when both operands are rotated along the contracted axis:
    ``apply(x, axis=-1) @ apply(w, axis=0) = x @ w``.

    A pytree (a NamedTuple) whose one leaf is ``signs``; ``size`` is its static length, so a
    rotation can be passed through ``jax.jit`` and stacked under ``jax.vmap``. Made by
    :func:`hadamard_rotation`.

    Example:
      >>> import jax, jax.numpy as jnp, jaxquant.rotations as jqr
      >>> r = jqr.hadamard_rotation(16, key=jax.random.key(0))  # NVFP4's 16 x 16 blocks
      >>> x = jnp.zeros((2, 64)).at[:, 0].set(4.0)  # one outlier per row
      >>> y = r.apply(x)  # spread over its block of 16: +-1 each, the other blocks stay 0
      >>> jnp.abs(y[0, :16]).tolist() == [1.0] * 16, bool((y[:, 16:] == 0).all())
      (True, True)
      >>> bool((r.inverse(y) == x).all())
      True
    """

    signs: jax.Array  # float32 (size,), each +1 or -1; all +1 for a deterministic rotation

    @property
    def size(self) -> int:
        """The order of ``R``: the block length along the rotated axis."""
        return int(self.signs.shape[-1])

    def _run(self, x: ArrayLike, axis: int, transpose: bool, what: str) -> jax.Array:
        x = _check_float(x, f"{what}: x")
        axis = _check_axis(axis, x, what)
        if not isinstance(self.signs, jax.Array | np.ndarray) or not jnp.issubdtype(
            self.signs.dtype, jnp.floating
        ):
            raise TypeError(
                f"{what}: signs must be a float array of +-1, got {describe(self.signs)}; "
                "build the rotation with hadamard_rotation(size, key=...)."
            )
        if self.signs.ndim != 1:
            raise ValueError(
                f"{what}: signs must be a vector (size,), got shape {self.signs.shape}; "
                "build the rotation with hadamard_rotation(size, key=...)."
            )
        size = self.size
        if _plan(size) is None:
            raise _uncovered(size, f"{what}: the rotation has size", "Build one of a covered size.")
        length = x.shape[axis]
        if length % size:
            raise ValueError(
                f"{what}: axis {axis} of x (shape {x.shape}) has length {length}, not a multiple "
                f"of the rotation's size {size}. Pad that axis to a multiple of {size} (e.g. "
                f"{-(-length // size) * size}), or build the rotation with a size that divides "
                f"{length}."
            )
        return _transform(x, axis, size, signs=self.signs, normalize=True, transpose=transpose)

    def apply(self, x: ArrayLike, *, axis: int = -1) -> jax.Array:
        """``x kron(I, R)`` along ``axis``: ``(x_block * signs) H / sqrt(size)`` per block.

        Args:
          x: a floating-point array whose ``axis`` has a length that is a multiple of
            ``size``.
          axis: the axis to rotate.

        Returns:
          The rotated array, ``x``'s shape and dtype (computed in float32 or wider).

        Example:
          >>> import jax, jax.numpy as jnp, jaxquant.rotations as jqr
          >>> r = jqr.hadamard_rotation(16, key=jax.random.key(0))
          >>> x = jax.random.normal(jax.random.key(1), (8, 64))
          >>> w = jax.random.normal(jax.random.key(2), (64, 32))
          >>> y = r.apply(x) @ r.apply(w, axis=0)  # 4 blocks of 16 along the contraction
          >>> bool(jnp.allclose(y, x @ w, atol=1e-4))
          True
        """
        return self._run(x, axis, False, "HadamardRotation.apply")

    def inverse(self, x: ArrayLike, *, axis: int = -1) -> jax.Array:
        """``x kron(I, R^T)`` along ``axis``: undoes :meth:`apply`.

        Args:
          x: a floating-point array whose ``axis`` has a length that is a multiple of
            ``size``.
          axis: the axis to rotate back.

        Returns:
          ``x`` rotated by ``R^T`` blockwise, ``x``'s shape and dtype.

        Example:
          >>> import jax, jax.numpy as jnp, jaxquant.rotations as jqr
          >>> r = jqr.hadamard_rotation(768, key=jax.random.key(0))
          >>> x = jax.random.normal(jax.random.key(1), (4, 768))
          >>> float(jnp.abs(r.inverse(r.apply(x)) - x).max()) < 1e-5
          True
        """
        return self._run(x, axis, True, "HadamardRotation.inverse")


def hadamard_rotation(size: int, *, key: ArrayLike | None = None) -> HadamardRotation:
    """A Hadamard rotation ``R = D H / sqrt(size)``: random signs from ``key``, or none.

    With a key, ``D`` holds independent uniform random signs (Rademacher), the random
    Hadamard transform of QuaRot / SpinQuant (``size`` = the hidden width) and of NVFP4 and
    MXFP4 training (``size = 16``, applied blockwise to the inputs of the weight-gradient
    product). The same key gives the same signs. Without a key ``D = I``: the deterministic
    (plain, orthonormal) Hadamard rotation, which a 2026 study on FP4 hardware found to
    stabilize quantized weight gradients where random ones did not
    (https://arxiv.org/abs/2605.09825); the switch is this one argument.

    Args:
      size: the order of ``R`` (a size :func:`hadamard_supported` covers). The rotation
        applies to any axis whose length is a multiple of it, block by block.
      key: a PRNG key (``jax.random.key``) for random signs, or None for ``D = I``.

    Returns:
      A :class:`HadamardRotation` (``signs`` float32 of shape ``(size,)``).

    Raises:
      ValueError: when ``size`` is not covered; the message gives the nearest covered sizes.
      TypeError: when ``key`` is not a PRNG key.

    Example:
      >>> import jax, jax.numpy as jnp, jaxquant.rotations as jqr
      >>> r = jqr.hadamard_rotation(4, key=jax.random.key(0))
      >>> r.size, r.signs.dtype
      (4, dtype('float32'))
      >>> bool((r.signs == jqr.hadamard_rotation(4, key=jax.random.key(0)).signs).all())
      True
      >>> plain = jqr.hadamard_rotation(4)  # deterministic: x H / 2
      >>> plain.apply(jnp.array([1.0, 0.0, 0.0, 0.0]))
      Array([0.5, 0.5, 0.5, 0.5], dtype=float32)

    References:
      QuaRot (Ashkboos et al. 2024), https://arxiv.org/abs/2404.00456;
      SpinQuant (Liu et al. 2024), https://arxiv.org/abs/2405.16406;
      NVFP4 training (NVIDIA 2025), https://arxiv.org/abs/2509.25149, section 4.2;
      MXFP4 training (Tseng et al. 2025), https://arxiv.org/abs/2502.20586.
    """
    size = check_int(size, "hadamard_rotation: size", lo=1, hi=_MAX_SIZE)
    if _plan(size) is None:
        raise _uncovered(
            size,
            "hadamard_rotation: size is",
            "Use a covered size: {above}, or a covered block that divides it ({divisor}).",
        )
    if key is None:
        return HadamardRotation(jnp.ones((size,), jnp.float32))
    check_key(key, "hadamard_rotation: key")
    return HadamardRotation(jax.random.rademacher(key, (size,), dtype=jnp.float32))


GEMMS = ("fwd", "dgrad", "wgrad")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DotHadamard:
    """Random (or deterministic) Hadamard transforms inside a quantized product.

    The ``hadamard`` field of :class:`~jaxquant.QuantConfig`. On each product named in
    ``gemms`` both operands are multiplied along that product's contracted axis by the same
    block-diagonal rotation ``R = kron(I, D H_block / sqrt(block))`` (:class:`HadamardRotation`,
    ``D = diag(signs)``) *before* they are quantized; ``(x R)(R^T w) = x w`` in exact
    arithmetic, so only the quantization sees the rotation: it spreads an outlier over its
    block and makes the block's values closer to Gaussian, which 4-bit block formats
    represent better.

    The three products of a layer ``y = x w`` (``x``: ``(tokens, K)``, ``w``: ``(K, N)``):

    * ``"fwd"``: ``y = x w`` contracts ``K``; ``x`` and ``w`` are rotated along ``K``;
    * ``"dgrad"``: ``dx = dy w^T`` contracts ``N``; ``dy`` and ``w`` are rotated along ``N``;
    * ``"wgrad"``: ``dw = x^T dy`` contracts the tokens; ``x`` and ``dy`` are rotated along
      them. NVFP4 training rotates this product only (https://arxiv.org/abs/2509.25149,
      section 4.2): its operands, the activations and the gradient, have the outliers.

    Where an operand has several such axes the innermost one is rotated (for ``dot_general``
    with dimension numbers: the innermost contracted axis of ``lhs`` and the ``rhs`` axis it
    pairs with; the innermost free axis of ``rhs`` for ``dgrad``, of ``lhs`` for ``wgrad``).
    A rotated backward product quantizes both its operands from their float values (a
    rotated quantized operand would be quantized twice); an unrotated one follows
    ``QuantConfig.backward``. The gradient of a rotated forward product is rotated back
    (``R^T``), so every gradient is that of ``x w``.

    The signs are fixed by ``seed``: the same transform at every call, every layer and every
    step, and in evaluation, as Transformer Engine's NVFP4 recipe uses one fixed random sign
    vector. A fixed sign vector needs no PRNG key, so a config whose specs all round to
    nearest stays stateless (:attr:`QuantConfig.stateful`), and a run is reproduced by its
    config alone. ``random=False`` uses no signs (``D = I``): the deterministic Hadamard
    transform that a 2026 study on FP4 hardware found to stabilize quantized weight
    gradients where random rotations did not (https://arxiv.org/abs/2605.09825).

    Args:
      gemms: the products to transform, a non-empty subset of ``("fwd", "dgrad", "wgrad")``.
      block: the order of ``H``, 16 by default (a size :func:`hadamard_supported` covers);
        each rotated axis must have a length that is a multiple of it.
      random: random signs (``D`` from ``seed``) or none (``D = I``).
      seed: the signs' seed, an int in ``[0, 2^32)``.

    Raises:
      TypeError / ValueError: a field of the wrong type or value, naming it and the fix.

    Example:
      >>> import jax, jax.numpy as jnp, jaxquant as jq
      >>> h = jq.rotations.DotHadamard(gemms=("wgrad",))  # the NVFP4 paper's choice
      >>> h.rotation().size, h.rotation().signs.tolist() == h.rotation().signs.tolist()
      (16, True)
      >>> mx = jq.QuantSpec("mxfp4", jq.per_block(32))  # blocks along the contraction
      >>> cfg = jq.QuantConfig(act=mx, weight=mx,
      ...                      hadamard=jq.rotations.DotHadamard(gemms=("fwd",)))
      >>> x = jax.random.normal(jax.random.key(0), (4, 64))
      >>> w = jax.random.normal(jax.random.key(1), (64, 8))
      >>> jq.dot_general(x, w, (((1,), (0,)), ((), ())), config=cfg).shape
      (4, 8)

    References:
      NVIDIA, "Pretraining Large Language Models with NVFP4",
      https://arxiv.org/abs/2509.25149; Tseng et al., "Training LLMs with MXFP4",
      https://arxiv.org/abs/2502.20586; deterministic rotations on FP4 hardware,
      https://arxiv.org/abs/2605.09825.
    """

    gemms: tuple[str, ...] = ("wgrad",)
    block: int = 16
    random: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        gemms = self.gemms
        if isinstance(gemms, str):
            gemms = (gemms,)
        if not isinstance(gemms, tuple | list) or not all(isinstance(g, str) for g in gemms):
            raise TypeError(
                f"DotHadamard.gemms must be a tuple of names from {GEMMS}, got "
                f"{describe(self.gemms)}; e.g. gemms=('wgrad',)."
            )
        bad = [g for g in gemms if g not in GEMMS]
        if bad or not gemms or len(set(gemms)) != len(gemms):
            raise ValueError(
                f"DotHadamard.gemms must name each of {GEMMS} at most once, and at least one, "
                f"got {tuple(gemms)}. For no transform at all pass hadamard=None."
            )
        block = check_int(self.block, "DotHadamard.block", lo=1, hi=_MAX_SIZE)
        if _plan(block) is None:
            raise _uncovered(
                block,
                "DotHadamard.block is",
                "Use a covered size such as 16 (NVFP4) or 32 (MX): {above} is the next one.",
            )
        object.__setattr__(self, "gemms", tuple(g for g in GEMMS if g in gemms))
        object.__setattr__(self, "block", block)
        object.__setattr__(self, "random", check_bool(self.random, "DotHadamard.random"))
        object.__setattr__(
            self, "seed", check_int(self.seed, "DotHadamard.seed", lo=0, hi=2**32 - 1)
        )

    def rotation(self) -> HadamardRotation:
        """The :class:`HadamardRotation` every rotated product uses (signs from ``seed``, or
        none), computed eagerly even inside a trace (a constant of the program)."""
        with jax.ensure_compile_time_eval():
            key = jax.random.key(self.seed) if self.random else None
            return hadamard_rotation(self.block, key=key)
