"""One-pass block-quantization kernels: bit-identical to the jnp path (Pallas interpret mode).

Every case compares ``block_fake_quant`` / ``block_quantize`` run with ``interpret=True`` on
CPU against ``jq.fake_quant`` / ``jq.quantize``: fake-quant outputs and stored codes bit for
bit (any NaN equals any NaN), scales bit for bit. The data mixes block magnitudes from
2^-110 to float32's max, all-zero and subnormal-only blocks, NaN/Inf, amax equal to
``qmax * 2^p`` and its float neighbours, exact powers of two, and every value and every tie
between neighbouring values of the element format. What the interpreter cannot show is
checked structurally: every supported kernel lowers to Triton IR (no GPU needed), and the
kernel uses no float min/max (NaN-ignoring in Triton).

Compiling is most of this file's time (issue 13): each case runs the kernel, the jnp path
and the casts it compares in one jitted program (the kernel called eagerly: the tile and
scale-rule tests below), and the data goes to the device without a program.
"""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxquant as jq
from jaxquant._src import formats as F
from jaxquant._src.kernels import block_fake_quant, block_quantize, disabled, supported
from jaxquant._src.kernels import block_quant as bq


def _e8m0(fmt, block, **kw):
    return jq.QuantSpec(fmt, jq.per_block(-1, block), scale_format="e8m0", **kw)


# (id, spec, ops, dtypes): the grid; bfloat16 on a subset to keep the file fast.
F32, BOTH = ("float32",), ("float32", "bfloat16")
CASES = [
    ("mxfp8", jq.QuantSpec("mxfp8"), ("fake_quant", "quantize"), BOTH),
    ("mxfp8_e5m2", jq.QuantSpec("mxfp8_e5m2"), ("fake_quant", "quantize"), F32),
    ("mxfp6", jq.QuantSpec("mxfp6"), ("fake_quant",), F32),
    ("mxfp6_e3m2", jq.QuantSpec("mxfp6_e3m2"), ("fake_quant",), F32),
    ("mxfp4", jq.QuantSpec("mxfp4"), ("fake_quant",), BOTH),
    ("int8_b32", _e8m0("int8", 32), ("fake_quant", "quantize"), BOTH),
    ("int8_b64_wide", _e8m0("int8", 64, narrow_range=False), ("fake_quant", "quantize"), F32),
    ("int4_b16", _e8m0("int4", 16), ("fake_quant",), F32),
    ("int16_b32", _e8m0("int16", 32), ("quantize",), F32),
    ("e4m3_b32", _e8m0("e4m3", 32), ("fake_quant", "quantize"), F32),
    ("e5m2_b64", _e8m0("e5m2", 64), ("quantize",), F32),
    ("e3m4_b32", _e8m0("e3m4", 32), ("quantize",), F32),
    ("e2m1_b16", _e8m0("e2m1", 16), ("fake_quant",), F32),
]
GRID = [
    pytest.param(spec, op, dt, id=f"{name}-{op}-{dt}")
    for name, spec, ops, dts in CASES
    for op in ops
    for dt in dts
]


def _block_data(spec, n_blocks, seed):
    """(n_blocks, B) float32 blocks of varied magnitude plus the special blocks."""
    rng = np.random.default_rng(seed)
    b = spec.granularity.size
    f = spec.element
    qmax = np.float32(spec.qrange[1])
    mag = np.exp2(rng.integers(-110, 110, n_blocks)).astype(np.float32)
    x = (rng.standard_normal((n_blocks, b)) * mag[:, None]).astype(np.float32)
    rows = [np.zeros(b), np.full(b, np.nan)]
    special = np.array([np.nan, np.inf, -np.inf, -np.nan, 1.5, -0.25, 0.0, -0.0])
    rows.append(np.resize(special, b))
    rows.append(np.resize([np.inf, -np.inf], b))  # no finite value: amax 0
    rows.append(np.resize([1e-40, -3e-42, 0.0], b))  # subnormal-only block
    rows.append(np.resize([1.0, 1e-40, -7e-39, 0.5], b))  # subnormal elements, normal amax
    with np.errstate(over="ignore"):
        for p in (-100, -20, -1, 0, 3, 40, 100):
            a = np.float32(qmax * np.float32(2.0**p))
            if not np.isfinite(a):
                continue
            for amax in (a, np.nextafter(a, np.float32(0)), np.nextafter(a, np.float32(np.inf))):
                rows.append(np.resize([amax, -amax / 3, amax / 7, 0.0], b))
            rows.append(np.resize([np.float32(2.0**p), -np.float32(2.0**p) / 5], b))
    fmax = np.finfo(np.float32).max
    rows.append(np.resize([fmax, -fmax / 3, 1.0], b))
    rows.append(np.resize([np.float32(3e38), -np.float32(1e38), 7.0], b))
    rows.append(np.resize([np.float32(2.0**-110), np.float32(-(2.0**-112)), 1e-36], b))
    # Ties: every grid value and every midpoint of the element format, in blocks whose
    # scale is 1 (amax = the format's max: MX gives 2^(emax - emax), e8m0 gives qmax/qmax).
    if f.kind == "float":
        grid = F.finite_values(f).astype(np.float64)
    else:
        grid = np.arange(spec.qrange[0], spec.qrange[1] + 1, dtype=np.float64)
    grid = grid[np.abs(grid) <= 2048]  # int16: a sample of its range
    probe = np.concatenate([grid, (grid[1:] + grid[:-1]) / 2, [f.max * 1.5, -f.max * 3]])
    probe = probe.astype(np.float32)
    per = b - 1
    for i in range(0, len(probe), per):
        chunk = probe[i : i + per]
        rows.append(np.concatenate([[np.float32(f.max)], np.resize(chunk, per)]))
    with np.errstate(invalid="ignore"):
        extra = np.stack([np.asarray(r, np.float32) for r in rows])
    return np.concatenate([x, extra])


def _input(spec, dtype, shape_lead=(), seed=0):
    """An array of shape shape_lead + (m, n) holding the block data (m chosen to fit)."""
    b = spec.granularity.size
    blocks = _block_data(spec, 64, seed)
    per_row = max(1, 256 // b)
    n_rows = -(-blocks.shape[0] // per_row)
    unit = 8 * int(np.prod(shape_lead))  # a block count with a power-of-two factor >= 8
    n_rows = -(-n_rows // unit) * unit
    pad = n_rows * per_row - blocks.shape[0]
    filler = np.random.default_rng(seed + 1).standard_normal((pad, b)).astype(np.float32)
    x = np.concatenate([blocks, filler]).reshape(n_rows, per_row * b)
    if shape_lead:
        x = x.reshape(*shape_lead, -1, per_row * b)
    return jax.device_put(x.astype(dtype))  # ml_dtypes' cast; jnp's would compile a program


def _assert_same_float(a, b):
    """Bit for bit, except that any NaN equals any NaN (its sign and payload are not
    specified: XLA:CPU's quantize program stores +NaN as 0xFF in e4m3, fake_quant keeps +)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    an, bn = np.isnan(a.astype(np.float32)), np.isnan(b.astype(np.float32))
    np.testing.assert_array_equal(an, bn)
    uint = {1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize]
    bad = (a.view(uint) != b.view(uint)) & ~an
    assert not bad.any(), f"{bad.sum()} mismatches, e.g. kernel {a[bad][:5]} vs jnp {b[bad][:5]}"


def _assert_same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    uint = {1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize]
    bad = a.view(uint) != b.view(uint)
    assert not bad.any(), (
        f"{bad.sum()} mismatches, e.g. kernel {a.view(uint)[bad][:5]} vs jnp "
        f"{b.view(uint)[bad][:5]}"
    )


def _assert_same_values(a, b):
    """Stored codes: integers bit for bit; float8 codes bit for bit up to the NaN sign."""
    if jnp.issubdtype(a.dtype, jnp.integer):
        _assert_same_bits(a, b)
    else:
        _assert_same_float(a, b)


@pytest.mark.parametrize("spec, op, dtype", GRID)
def test_bit_identical_to_jnp_path(spec, op, dtype):
    x = _input(spec, dtype)
    assert supported(spec, x.shape, x.dtype, "gpu", op=op)
    if op == "fake_quant":
        kernel, ref = jax.jit(
            lambda x: (block_fake_quant(x, spec, interpret=True), jq.fake_quant(x, spec))
        )(x)
        _assert_same_float(kernel, ref)
        return

    @jax.jit  # both kernels, the jnp path and the casts compared: one program
    def run(x):
        q = jq.quantize(x, spec)
        values, scale = block_quantize(x, spec, interpret=True)
        values8, scale8 = block_quantize(x, spec, interpret=True, scale_dtype=q.scale.dtype)
        casts = scale.astype(q.scale.dtype), q.scale.astype(jnp.float32)
        return q, (values, scale), (values8, scale8), casts

    q, (values, scale), (values8, scale8), (scale_cast, q_scale32) = run(x)
    _assert_same_values(values, q.values)
    assert scale.dtype == jnp.float32 and scale.shape == q.scale.shape
    _assert_same_bits(scale_cast, q.scale)
    _assert_same_bits(scale, q_scale32)
    _assert_same_values(values8, q.values)
    _assert_same_bits(scale8, q.scale)


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec, shape_lead, tile",
    [
        (jq.QuantSpec("mxfp8"), (2, 3), bq.TILE_ELEMS),  # N-D input
        (jq.QuantSpec("mxfp8"), (), 256),  # many programs
        (_e8m0("int8", 128), (5,), 1024),  # odd leading dim
    ],
)
def test_shapes_and_tiles(spec, shape_lead, tile):
    x = _input(spec, jnp.float32, shape_lead, seed=3)
    _assert_same_float(
        block_fake_quant(x, spec, interpret=True, tile_elems=tile), jq.fake_quant(x, spec)
    )
    values, scale = block_quantize(x, spec, interpret=True, tile_elems=tile)
    q = jq.quantize(x, spec)
    _assert_same_values(values, q.values)
    _assert_same_bits(scale, q.scale.astype(jnp.float32))


@pytest.mark.slow
def test_e8m0_scale_rule_over_the_float32_range():
    """2^ceil(log2(amax / qmax)) from the bits equals rounding fl(amax / qmax) up, for
    random amax over the whole normal range, qmax * 2^p and its neighbours, and subnormals."""
    rng = np.random.default_rng(7)
    bits = rng.integers(0x00800000, 0x7F800000, 4096, dtype=np.int64).astype(np.uint32)
    amax = [bits.view(np.float32), np.array([0.0, 1e-40, 2.0**-126, 2.0**-127], np.float32)]
    for fmt in ("int8", "int4", "e4m3", "e2m1", "e2m3"):
        spec = _e8m0(fmt, 2)
        q = np.float32(spec.qrange[1])
        with np.errstate(over="ignore"):
            edge = q * np.exp2(np.arange(-140, 128)).astype(np.float32)
        edge = edge[np.isfinite(edge) & (edge > 0)]
        amax += [edge, np.nextafter(edge, np.float32(0)), np.nextafter(edge, np.float32(np.inf))]
    a = np.concatenate(amax).astype(np.float32)
    a = a[np.isfinite(a)]
    a = np.resize(a, 1 << (len(a) - 1).bit_length())  # a power-of-two block count
    x = jax.device_put(np.stack([a, -a / 2], axis=1))
    specs = [_e8m0(fmt, 2) for fmt in ("int8", "int4", "e4m3", "e2m1", "e2m3")]
    # every format, the kernel and the jnp path: one compiled program
    got = jax.jit(
        lambda x: [(block_fake_quant(x, s, interpret=True), jq.fake_quant(x, s)) for s in specs]
    )(x)
    for kernel, ref in got:
        _assert_same_float(kernel, ref)


def test_under_jit_and_vmap():
    spec = jq.QuantSpec("mxfp8")
    x = _input(spec, jnp.float32)
    f = jax.jit(lambda x: block_fake_quant(x, spec, interpret=True))
    _assert_same_float(f(x), jq.fake_quant(x, spec))
    xs = x.reshape(2, -1, x.shape[-1])
    g = jax.vmap(lambda r: block_quantize(r, spec, interpret=True))
    values, scale = g(xs)
    q = jq.quantize(xs, spec)
    _assert_same_values(values, q.values)
    _assert_same_bits(scale, q.scale.astype(jnp.float32))


@pytest.mark.parametrize(
    "spec, shape, dtype, op",
    [
        (jq.QuantSpec("mxfp4"), (8, 256), jnp.float32, "quantize"),  # packed storage
        (_e8m0("int4", 32), (8, 256), jnp.float32, "quantize"),
        (jq.QuantSpec("mxfp8", rounding="stochastic"), (8, 256), jnp.float32, "fake_quant"),
        (jq.QuantSpec("int8", jq.per_block(-1, 32)), (8, 256), jnp.float32, "fake_quant"),
        (jq.QuantSpec("int8", jq.per_block(0, 32)), (64, 256), jnp.float32, "fake_quant"),
        (jq.QuantSpec("int8", jq.per_token()), (8, 256), jnp.float32, "fake_quant"),
        (_e8m0("int8", 48), (8, 240), jnp.float32, "fake_quant"),  # B not a power of two
        (_e8m0("int3", 32), (8, 256), jnp.float32, "fake_quant"),  # qmax < 4
        (_e8m0("uint8", 32), (8, 256), jnp.float32, "fake_quant"),
        (_e8m0("nf4", 32), (8, 256), jnp.float32, "fake_quant"),
        (_e8m0("e4m3fnuz", 32), (8, 256), jnp.float32, "fake_quant"),
        (_e8m0("int8", 32, symmetric=False), (8, 256), jnp.float32, "fake_quant"),
        (
            jq.QuantSpec("mxfp8", calibration=jq.percentile(99.0)),
            (8, 256),
            jnp.float32,
            "fake_quant",
        ),
        (jq.QuantSpec("mxfp8", saturate=False), (8, 256), jnp.float32, "fake_quant"),
        (jq.QuantSpec("mxfp8"), (8, 256), jnp.float16, "fake_quant"),
        (jq.QuantSpec("mxfp8"), (0, 256), jnp.float32, "fake_quant"),
    ],
)
def test_unsupported_cases_are_refused(spec, shape, dtype, op):
    assert not supported(spec, shape, dtype, "gpu", op=op)
    fn = block_fake_quant if op == "fake_quant" else block_quantize
    with pytest.raises(NotImplementedError, match=f"block_{op}"):
        fn(jnp.zeros(shape, dtype), spec, interpret=True)


def test_supported_policy():
    spec = jq.QuantSpec("mxfp8")
    assert supported(spec, (4096, 4096), jnp.float32, "gpu")
    assert supported(spec, (4096, 4096), jnp.bfloat16, "cuda", op="quantize")
    for backend in ("cpu", "tpu", "METAL"):
        assert not supported(spec, (4096, 4096), jnp.float32, backend)
    # Block counts with a small power-of-two factor would give tiny programs: jnp path.
    assert not supported(spec, (1001, 96), jnp.float32, "gpu")
    assert not supported(spec, (1, 96), jnp.float32, "gpu")  # 3 programs of 32 elements
    assert supported(spec, (1, 128), jnp.float32, "gpu")  # one program holds it all
    assert not supported(jq.QuantSpec("mxfp4"), (64, 64), jnp.float32, "gpu", op="quantize")
    with pytest.raises(ValueError, match="power of two"):
        block_fake_quant(jnp.zeros((8, 64)), spec, interpret=True, tile_elems=1000)
    with pytest.raises(ValueError, match="scale_dtype"):
        block_quantize(jnp.zeros((8, 64)), spec, interpret=True, scale_dtype=jnp.bfloat16)
    with disabled():
        assert not supported(spec, (4096, 4096), jnp.float32, "gpu")
        with disabled():
            pass
        assert not supported(spec, (4096, 4096), jnp.float32, "gpu")
    assert supported(spec, (4096, 4096), jnp.float32, "gpu")


@pytest.mark.parametrize(
    "spec, op",
    [
        (jq.QuantSpec("mxfp8"), "quantize"),
        (jq.QuantSpec("mxfp8_e5m2"), "quantize"),
        (jq.QuantSpec("mxfp6_e3m2"), "fake_quant"),
        (jq.QuantSpec("mxfp4"), "fake_quant"),
        (_e8m0("int8", 32), "quantize"),
        (_e8m0("int8", 32), "fake_quant"),
        (_e8m0("int16", 1024), "quantize"),
        (_e8m0("e4m3", 2), "fake_quant"),
    ],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers_to_triton(spec, op, dtype):
    """Every primitive the kernel uses has a Pallas-Triton lowering rule (no GPU needed;
    this stops at Triton IR, before Triton's own compiler)."""
    fns = [block_fake_quant]
    if op == "quantize":
        e8m0 = functools.partial(block_quantize, scale_dtype=jnp.float8_e8m0fnu)
        fns = [block_quantize, e8m0]
    x = jax.ShapeDtypeStruct((256, 2048), dtype)
    for fn in fns:
        lowered = jax.jit(lambda x, fn=fn: fn(x, spec)).trace(x).lower(lowering_platforms=("cuda",))
        assert "triton" in lowered.as_text()


def test_float8_nan_codes_match_ml_dtypes():
    """NaN keeps its sign in float8 storage, as ml_dtypes (and XLA's CPU convert) do."""
    for name in ("e4m3", "e5m2", "e3m4"):
        fmt = F.get(name)
        v = jnp.asarray(np.array([np.nan, -np.nan, 0.0, -0.0], np.float32))
        codes = np.asarray(bq._float8_codes(v, fmt)).astype(np.uint8)
        ref = np.array([np.nan, -np.nan, 0.0, -0.0], np.float32).astype(fmt.dtype)
        np.testing.assert_array_equal(codes, ref.view(np.uint8))
    assert ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max == 448


def _kernel_eqns(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs in its equations' params."""
    for eqn in jaxpr.eqns:
        yield eqn
        for v in eqn.params.values():
            for sub in v if isinstance(v, tuple | list) else (v,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    yield from _kernel_eqns(sub)


@pytest.mark.parametrize("spec", [jq.QuantSpec("mxfp8"), jq.QuantSpec("mxfp4"), _e8m0("int8", 32)])
def test_no_float_min_max_in_kernel(spec):
    """Triton lowers float min/max to NaN-ignoring minnum/maxnum (XLA propagates NaN), and
    the interpreter cannot show the difference: the kernel must saturate with selects."""
    x = jnp.zeros((64, 256), jnp.float32)
    outer = jax.make_jaxpr(lambda x: block_quantize(x, spec, interpret=True))
    if spec.element.bits < 8:
        outer = jax.make_jaxpr(lambda x: block_fake_quant(x, spec, interpret=True))
    calls = [e for e in _kernel_eqns(outer(x).jaxpr) if e.primitive.name == "pallas_call"]
    assert len(calls) == 1
    prims = {"min", "max", "reduce_max", "reduce_min", "clamp"}
    bad = [
        e
        for e in _kernel_eqns(calls[0].params["jaxpr"])
        if e.primitive.name in prims and jnp.issubdtype(e.invars[0].aval.dtype, jnp.floating)
    ]
    assert not bad, bad


@pytest.mark.slow
@pytest.mark.parametrize("op", ["fake_quant", "quantize"])
def test_public_api_dispatches_to_the_kernel_on_gpu(op, monkeypatch):
    """jq.fake_quant / jq.quantize call the Triton kernel when lowered for CUDA and the jnp
    path when lowered for CPU, from the same traced program."""
    from jaxquant._src import kernels as K

    real = K.supported
    jax.clear_caches()  # the dispatch is decided while tracing: no cached trace may hide it
    monkeypatch.setattr(jax, "device_count", lambda *a: 1)  # the kernel is single-device only
    monkeypatch.setattr(
        K,
        "supported",
        lambda spec, shape, dtype, backend, **kw: real(spec, shape, dtype, "gpu", **kw),
    )
    spec = jq.QuantSpec("mxfp8")
    x = jnp.ones((64, 1024), jnp.float32)
    fn = jq.fake_quant if op == "fake_quant" else jq.quantize
    traced = jax.jit(lambda v: fn(v, spec)).trace(x)
    assert "triton" in traced.lower(lowering_platforms=("cuda",)).as_text().lower()
    assert "triton" not in traced.lower(lowering_platforms=("cpu",)).as_text().lower()
    ref = jq.fake_quant(x, spec) if op == "fake_quant" else jq.quantize(x, spec).values
    out = fn(x, spec)
    out = out if op == "fake_quant" else out.values
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))


def test_multi_device_processes_keep_the_jnp_path(monkeypatch):
    """On a mesh the kernel would gather its input (no SPMD rule): never dispatched there."""
    from jaxquant._src import kernels as K
    from jaxquant._src import quantize as Q

    real = K.supported
    monkeypatch.setattr(
        K,
        "supported",
        lambda spec, shape, dtype, backend, **kw: real(spec, shape, dtype, "gpu", **kw),
    )
    x = jnp.ones((64, 1024), jnp.float32)
    assert jax.device_count() == 8  # tests/conftest.py
    assert not Q._use_kernel(x, jq.QuantSpec("mxfp8"), "fake_quant", None, None)
    monkeypatch.setattr(jax, "device_count", lambda *a: 1)
    assert Q._use_kernel(x, jq.QuantSpec("mxfp8"), "fake_quant", None, None)
