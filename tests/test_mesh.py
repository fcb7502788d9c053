"""Quantized ops and models on an 8-device CPU mesh (issue 12, item 7).

A small transformer block (self-attention through DenseGeneral / LinearGeneral
projections, a ReLU MLP), written for Linen and for NNX, runs under ``jax.jit`` with its
parameters laid out three ways on the (2, 4) ("data", "model") mesh of tests/conftest.py's
eight fake CPU devices:

* ``dp``: the batch split over all eight devices, parameters replicated;
* ``fsdp``: the batch split the same way and every kernel split along its first axis over
  all eight devices (ZeRO-3 style; XLA gathers each kernel for its product);
* ``tp``: Megatron-style tensor parallelism on "model" (query/key/value and the MLP's up
  projection split by columns, the attention output and down projections by rows, so
  each row-parallel product ends in an all-reduce), the batch split over "data".

For each layout, the block quantized by :func:`jaxquant.flax.quantize_model` with
``Rule(".*", weight=int8 per-channel, act=int8)`` (and an e4m3 one) must

(a) give its output (and its gradients) the float model's shardings: the output
    sharding is left to XLA's propagation (no ``out_shardings``) so that this can fail;
(b) compute what the same quantized model computes on one device. Not bitwise: the
    block's float parts (attention einsums, softmax, bias adds, float32 backward dots)
    sum in a different order when XLA partitions them, so outputs differ by a few ulp
    (measured <= 1.3e-6 for the float model itself). The tolerance, 1e-5, is far below
    what one activation or weight code rounded differently would change (~1e-3), and
    scales computed per shard instead of over the whole tensor would change many codes;
    the integer products themselves are exact, and the direct ops below are bitwise;
(c) move, in the compiled program's collectives, no more bytes than the float model.

Bytes are read from ``jitted.lower(...).compile().as_text()``: the operand sizes of every
all-gather, all-reduce, reduce-scatter, all-to-all and collective-permute (for a
conditional, its largest branch). They fall in two kinds:

* *data*: the tensors the layout itself moves (gathered kernels, row-parallel partial
  sums, gradient all-reduces). Quantized <= float, and with FSDP the forward pass gathers
  int8 codes: 1/4 of the float bytes.
* *statistics*: max / and reductions of the quantizers' scales (a per-tensor activation
  amax over a batch that is split, a per-channel weight amax over a kernel axis that is
  split). The float model has none, so quantized <= float cannot hold literally for a
  layout that moves no float bytes at all (``dp``'s forward pass) or the same float bytes
  (``tp``): computing the scales per shard instead would break (b). They are bounded by
  the scales' own size: one reduction (jaxquant's masked absmax, see
  jaxquant/_src/calibration.py) of 4 bytes per scale element. The literal total <= float
  is asserted where the layout gathers weights (``fsdp``).

Measured on this block (batch 8 x 16 tokens x 64 features, heads 8 x 8, MLP 256), bytes
per device, data + statistics (the same for the NNX block):

==========  =========  ==================  ===================================
program     float      int8 (w8a8)         e4m3 (emulated on CPU)
==========  =========  ==================  ===================================
dp fwd      0          0 + 24              0 + 24
fsdp fwd    24 576     6 144 + 2 328 (s8)  24 576 + 2 328 (f32 grid values)
tp fwd      32 768     32 768 + 544        32 768 + 544
dp train    198 916    198 916 + 24        198 916 + 24
fsdp train  243 972    235 780 + 2 328     254 212 + 2 328
tp train    99 268     99 268 + 544        99 268 + 544
==========  =========  ==================  ===================================

(tp's row-parallel int8 partial sums are all-reduced as s32: as many bytes as f32.) The
two e4m3 FSDP rows, and the int8 train step's backward (which gathers two kernels again,
dequantized to float32), are strict xfails below, with what would fix them.

The direct ops (:func:`jaxquant.dot_general`, :func:`jaxquant.einsum`,
:func:`jaxquant.conv_general_dilated`) with a batch-split lhs and a column-split rhs keep
``lax``'s output shardings and are bitwise equal to one device.
"""

from __future__ import annotations

import functools
import re
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxquant as jq

B, T, D, H, DH, F = 8, 16, 64, 8, 8, 256  # every kernel's first axis divides by 8
ATOL = RTOL = 1e-5  # see (b) in the module docstring

CONFIGS = {
    "int8": jq.QuantConfig(weight=jq.QuantSpec("int8", jq.per_channel()), act=jq.QuantSpec("int8")),
    "e4m3": jq.QuantConfig(weight=jq.QuantSpec("e4m3", jq.per_channel()), act=jq.QuantSpec("e4m3")),
}
LAYOUTS = ("dp", "fsdp", "tp")


# ------------------------------------------------------------------------ the models


class LinenBlock(nn.Module):
    """Self-attention (no mask) and a ReLU MLP, each with a residual connection."""

    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((H, DH), name="query")(x)
        k = nn.DenseGeneral((H, DH), name="key")(x)
        v = nn.DenseGeneral((H, DH), name="value")(x)
        a = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.float32(np.sqrt(DH)))
        o = jnp.einsum("bhqk,bkhd->bqhd", a, v)
        x = x + nn.DenseGeneral(D, axis=(-2, -1), name="out")(o)
        return x + nn.Dense(D, name="down")(nn.relu(nn.Dense(F, name="up")(x)))


class NnxBlock(nnx.Module):
    """LinenBlock in NNX (the same parameter names and shapes)."""

    def __init__(self, rngs: nnx.Rngs):
        self.query = nnx.LinearGeneral(D, (H, DH), rngs=rngs)
        self.key = nnx.LinearGeneral(D, (H, DH), rngs=rngs)
        self.value = nnx.LinearGeneral(D, (H, DH), rngs=rngs)
        self.out = nnx.LinearGeneral((H, DH), D, axis=(-2, -1), rngs=rngs)
        self.up = nnx.Linear(D, F, rngs=rngs)
        self.down = nnx.Linear(F, D, rngs=rngs)

    def __call__(self, x):
        q, k, v = self.query(x), self.key(x), self.value(x)
        a = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.float32(np.sqrt(DH)))
        o = jnp.einsum("bhqk,bkhd->bqhd", a, v)
        x = x + self.out(o)
        return x + self.down(nnx.relu(self.up(x)))


# Megatron tensor parallelism: (kernel, bias) specs per layer
_TP = {
    "query": (P(None, "model", None), P("model", None)),
    "key": (P(None, "model", None), P("model", None)),
    "value": (P(None, "model", None), P("model", None)),
    "out": (P("model", None, None), P()),
    "up": (P(None, "model"), P("model")),
    "down": (P("model", None), P()),
}


@functools.cache
def _mesh() -> Mesh:
    devices = np.array(jax.devices())
    assert devices.size == 8, "tests/conftest.py should give 8 CPU devices"
    return Mesh(devices.reshape(2, 4), ("data", "model"))


def _param_spec(layout: str, layer: str, name: str, ndim: int) -> P:
    if layout == "dp":
        return P()
    if layout == "fsdp":  # kernels split along their first axis, biases replicated
        return P(("data", "model")) if name == "kernel" else P()
    return _TP[layer][0 if name == "kernel" else 1]


def _batch_spec(layout: str) -> P:
    return P("data") if layout == "tp" else P(("data", "model"))


def _layer_and_name(path) -> tuple[str, str]:
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return keys[-2], keys[-1]


def _shardings(tree: Any, layout: str) -> Any:
    mesh = _mesh()

    def one(path, leaf):
        layer, name = _layer_and_name(path)
        return NamedSharding(mesh, _param_spec(layout, layer, name, leaf.ndim))

    return jax.tree_util.tree_map_with_path(one, tree)


@functools.cache
def _x() -> np.ndarray:
    return np.asarray(jax.random.normal(jax.random.key(1), (B, T, D), jnp.float32))


class Model(NamedTuple):
    """A model as a pure function of (params, x), its params and its quantized contractions."""

    apply: Any
    params: Any
    quantized: tuple[str, ...]


@functools.cache
def _model(frontend: str, config: str | None) -> Model:
    x = jnp.asarray(_x())
    rules = None if config is None else jq.flax.Rule(".*", CONFIGS[config])
    if frontend == "linen":
        model = LinenBlock()
        params = jax.jit(model.init)(jax.random.key(0), x)["params"]  # one program
        if rules is not None:
            model = jq.flax.quantize_model(model, rules)
            # an abstract call (no program): the model has run, its layers are known
            jax.eval_shape(model.init, jax.random.key(0), x)
        quantized = () if rules is None else tuple(m.path for m in jq.flax.report(model))
        return Model(lambda p, x: model.apply({"params": p}, x), params, quantized)
    model = NnxBlock(nnx.Rngs(0))
    if rules is not None:
        jq.flax.quantize_model(model, rules)
    graphdef, state = nnx.split(model)
    quantized = () if rules is None else tuple(m.path for m in jq.flax.report(model))
    params = jax.tree.map(jnp.asarray, nnx.to_pure_dict(state))

    def apply(p, x):
        st = nnx.State(state)
        nnx.replace_by_pure_dict(st, p)
        return nnx.merge(graphdef, st)(x)

    return Model(apply, params, quantized)


def _loss_and_grad(apply):
    return jax.value_and_grad(lambda p, x: jnp.mean(apply(p, x) ** 2))


# ------------------------------------------------------------- collectives in the HLO

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4}
_BYTES |= {"u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
# Reductions that combine statistics (amax, min, all-finite), not data.
STATISTICS = ("maximum", "minimum", "and", "or")


def _type_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        size = 1 if dtype.startswith(("f8", "f4", "s4", "u4")) else _BYTES.get(dtype)
        if size is None:
            continue
        total += size * int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64))
    return total


class Collective(NamedTuple):
    op: str  # "all-gather", ...
    nbytes: int  # operand bytes (per device)
    dtype: str  # the result's element type(s), e.g. "s8"
    reduction: str | None  # an all-reduce's / reduce-scatter's combiner root op


class Traffic(NamedTuple):
    """Bytes moved by the collectives of one compiled program (a conditional counts its
    largest branch; no loops in these programs)."""

    collectives: tuple[Collective, ...]

    @property
    def data(self) -> int:
        return sum(c.nbytes for c in self.collectives if c.reduction not in STATISTICS)

    @property
    def statistics(self) -> int:
        return sum(c.nbytes for c in self.collectives if c.reduction in STATISTICS)

    @property
    def total(self) -> int:
        return self.data + self.statistics

    def gathered(self) -> list[Collective]:
        return [c for c in self.collectives if c.op == "all-gather"]


def collective_traffic(hlo: str) -> Traffic:
    """Parse an HLO module's text: the collectives the entry computation runs."""
    sizes: dict[str, int] = {}
    roots: dict[str, str] = {}
    own: dict[str, list] = {}
    branches: dict[str, list[list[str]]] = {}
    calls: dict[str, list[str]] = {}
    entry = comp = None
    for line in hlo.splitlines():
        m = _INSTR.match(line)
        if m is None:
            c = _COMPUTATION.match(line)
            if c is not None:
                comp = c.group(1)
                entry = comp if line.lstrip().startswith("ENTRY") else entry
            continue
        name, typ, op, rest = m.groups()
        sizes[name] = _type_bytes(typ)
        if line.lstrip().startswith("ROOT"):
            roots[comp] = op
        base = op.removesuffix("-start")
        if base in COLLECTIVES:
            own.setdefault(comp, []).append((name, typ, base, rest))
        elif op == "conditional":
            b = re.search(r"branch_computations=\{([^}]*)\}", rest)
            names = (
                re.findall(r"%?([\w.\-]+)", b.group(1))
                if b
                else re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", rest)
            )
            branches.setdefault(comp, []).append(names)
        elif op in ("call", "while", "async-start"):
            calls.setdefault(comp, []).extend(
                re.findall(r"(?:to_apply|body|calls)=%?([\w.\-]+)", rest)
            )
    assert entry is not None, "no ENTRY computation in the HLO text"

    def collect(comp: str) -> list[Collective]:
        found = []
        for _, typ, op, rest in own.get(comp, []):
            args = rest.split(")")[0]
            if _SHAPE.search(args):  # operands printed with their types
                nbytes = _type_bytes(args)
            else:
                nbytes = sum(sizes[a] for a in re.findall(r"%([\w.\-]+)", args))
            reducer = re.search(r"to_apply=%?([\w.\-]+)", rest)
            dtypes = "/".join(sorted({d for d, _ in _SHAPE.findall(typ)}))
            found.append(
                Collective(op, nbytes, dtypes, roots.get(reducer.group(1)) if reducer else None)
            )
        for callee in calls.get(comp, []):
            found += collect(callee)
        for names in branches.get(comp, []):
            found += max((collect(n) for n in names), key=lambda cs: sum(c.nbytes for c in cs))
        return found

    return Traffic(tuple(collect(entry)))


def test_collective_traffic_parses_a_known_program():
    """The parser itself: an all-gather of an int8 (8, 16) array split in 8 moves 16
    bytes per device; a float sum over a split axis all-reduces one float."""
    mesh = Mesh(np.array(jax.devices()), ("x",))
    s = NamedSharding(mesh, P("x"))
    f = jax.jit(lambda a: jnp.sum(a.astype(jnp.float32)), in_shardings=s)
    t = collective_traffic(f.lower(jnp.ones((8, 16), jnp.float32)).compile().as_text())
    assert [(c.op, c.nbytes, c.dtype, c.reduction) for c in t.collectives] == [
        ("all-reduce", 4, "f32", "add")
    ]
    g = jax.jit(lambda a: a + 1, in_shardings=s, out_shardings=NamedSharding(mesh, P()))
    t = collective_traffic(g.lower(jnp.ones((8, 16), jnp.int8)).compile().as_text())
    assert [(c.op, c.nbytes, c.dtype) for c in t.collectives] == [("all-gather", 16, "s8")]


# ------------------------------------------------------------------- compiled programs


class Run(NamedTuple):
    out: Any  # forward: the output; train: (loss, grads)
    traffic: Traffic


def _compile(fn, params, x, layout: str) -> Run:
    psh = _shardings(params, layout)
    xsh = NamedSharding(_mesh(), _batch_spec(layout))
    jitted = jax.jit(fn, in_shardings=(psh, xsh))  # out shardings: XLA's propagation
    p, xs = jax.device_put(params, psh), jax.device_put(_x(), xsh)
    compiled = jitted.lower(p, xs).compile()
    return Run(compiled(p, xs), collective_traffic(compiled.as_text()))


@functools.cache
def _run(frontend: str, config: str | None, layout: str, step: str) -> Run:
    m = _model(frontend, config)
    fn = m.apply if step == "forward" else _loss_and_grad(m.apply)
    return _compile(fn, m.params, _x(), layout)


@functools.cache
def _one_device_runs(frontend: str, config: str) -> dict[str, Any]:
    """The quantized model's forward output and (loss, grads) on one device, from one
    compiled program (a reference: how it is compiled does not matter)."""
    m = _model(frontend, config)
    fn = jax.jit(lambda p, x: {"forward": m.apply(p, x), "train": _loss_and_grad(m.apply)(p, x)})
    device = jax.devices()[0]
    return fn(jax.device_put(m.params, device), jax.device_put(_x(), device))


def _one_device(frontend: str, config: str, step: str) -> Any:
    """The quantized model's forward output or (loss, grads) on one device."""
    return _one_device_runs(frontend, config)[step]


def _assert_same_shardings(tree, ref):
    leaves, ref_leaves = jax.tree.leaves(tree), jax.tree.leaves(ref)
    assert jax.tree.structure(tree) == jax.tree.structure(ref)
    for a, r in zip(leaves, ref_leaves, strict=True):
        assert a.sharding.is_equivalent_to(r.sharding, a.ndim), (a.sharding, r.sharding)


def _assert_close(tree, ref):
    for a, r in zip(jax.tree.leaves(tree), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=RTOL, atol=ATOL)


def _scale_elements(frontend: str, config: str) -> int:
    """Elements of every scale the quantized model computes: per-tensor activations (1
    each), per-channel weights (one per output feature)."""
    m = _model(frontend, config)
    flat = {_layer_and_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(m.params)}
    total = 0
    for layer in m.quantized:
        kernel = flat[(layer, "kernel")]
        contracted = 2 if layer == "out" else 1
        total += 1 + int(np.prod(kernel.shape[contracted:]))
    return total


def _check(frontend: str, config: str, layout: str, step: str) -> Run:
    """(a), (b) and the data / statistics bounds of (c) for one compiled program."""
    q = _run(frontend, config, layout, step)
    f = _run(frontend, None, layout, step)
    m = _model(frontend, config)
    assert set(m.quantized) == set(_TP), m.quantized  # every projection is quantized
    _assert_same_shardings(q.out, f.out)  # (a)
    _assert_close(q.out, _one_device(frontend, config, step))  # (b)
    assert q.traffic.data <= f.traffic.data, (q.traffic, f.traffic)  # (c)
    bound = 4 * _scale_elements(frontend, config)  # one float32 reduction per scale
    assert q.traffic.statistics <= bound, (q.traffic.statistics, bound, q.traffic)
    return q


# ------------------------------------------------------------------ Linen and NNX


_E4M3_FSDP_TRAIN = pytest.mark.xfail(
    strict=True,
    reason="e4m3 on CPU (emulated, float32 grid values) with FSDP: the train step's "
    "collectives move 254 212 data bytes vs the float step's 243 972 (f32 kernels gathered "
    "for the forward and again, dequantized, for the backward; see "
    "test_fsdp_gathers_kernels_as_codes)",
)


# e4m3 (emulated on CPU: float32 grid values) moves other bytes than int8 only where the
# layout gathers kernels (FSDP: both steps below); with dp and tp the two formats move the
# same bytes (the table above), so e4m3 runs dp's forward and tp's train step, not both
# steps of each (every program is a second or more of compiling).


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "layout"),
    [("int8", "dp"), ("int8", "fsdp"), ("int8", "tp"), ("e4m3", "dp"), ("e4m3", "fsdp")],
)
def test_linen_forward(config, layout):
    _check("linen", config, layout, "forward")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "layout"),
    [
        ("int8", "dp"),
        ("int8", "fsdp"),
        ("int8", "tp"),
        pytest.param("e4m3", "fsdp", marks=_E4M3_FSDP_TRAIN),
        ("e4m3", "tp"),
    ],
)
def test_linen_train_step(config, layout):
    _check("linen", config, layout, "train")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "step"),
    [
        ("int8", "forward"),
        pytest.param("int8", "train", marks=pytest.mark.slow),
        pytest.param(
            "e4m3",
            "forward",
            marks=pytest.mark.xfail(
                strict=True,
                reason="e4m3 on CPU gathers float32 grid values with FSDP: 24 576 data "
                "bytes, as many as the float model, plus 2 328 of scale reductions",
            ),
        ),
        pytest.param("e4m3", "train", marks=[pytest.mark.slow, _E4M3_FSDP_TRAIN]),
    ],
)
def test_fsdp_total_bytes_at_most_float(config, step):
    """The literal claim, where the layout gathers weights: data and scale reductions
    together move no more bytes than the float model (int8 codes gathered: a quarter
    of the float kernels' bytes leaves room for the amax all-reduces)."""
    q, f = _run("linen", config, "fsdp", step), _run("linen", None, "fsdp", step)
    assert q.traffic.total <= f.traffic.total, (q.traffic.total, f.traffic.total)
    if step == "forward":
        assert q.traffic.data <= f.traffic.data // 2, (q.traffic.data, f.traffic.data)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["fsdp", "tp"])  # the layouts that split kernels
def test_nnx_forward(layout):
    """The NNX block: its quantizers are jaxquant's dots as Linen's are (the frontend
    differs in how the layers are intercepted and hold state, not in how a product is
    partitioned), on the two layouts that split its kernels; dp: the Linen tests."""
    _check("nnx", "int8", layout, "forward")


@pytest.mark.slow
def test_nnx_train_step_fsdp():
    _check("nnx", "int8", "fsdp", "train")


# ------------------------------------------------------- FSDP: kernels gathered as codes


def _kernel_gathers(traffic: Traffic, frontend: str) -> list[Collective]:
    """The all-gathers of whole kernels (the activations some backward passes gather are
    not kernel-shaped here)."""
    shapes = {tuple(leaf.shape) for leaf in jax.tree.leaves(_model(frontend, None).params)}
    shapes = {s for s in shapes if len(s) > 1}
    sizes = {int(np.prod(s)) for s in shapes}
    return [c for c in traffic.gathered() if c.nbytes * 8 // _BYTES.get(c.dtype, 1) in sizes]


_GATHERS_FLOAT = (
    "XLA gathers float32 {what} of {layers} ({nbytes} of the {total} kernel bytes gathered "
    "per device are f32; codes would move 1 byte per element). Fix: {fix}"
)
_FIX_BACKWARD = (
    "jaxquant/_src/dot/scaled.py transpose_dot (called by dot/vjp.py _qdot_bwd) multiplies "
    "the cotangent by the weight dequantized (codes * per-output-channel scale, a scale "
    "along dlhs's contracted axis) in a float32 dot, so XLA gathers that f32 tensor; "
    "folding the scale into the cotangent (g * s) leaves the codes as the dot operand, but "
    "XLA:CPU still widens them before the gather unless the dot is s8 x s8 (a quantized "
    "gradient, grad_spec int8, factored per row of g * s)"
)
_FIX_FP8 = (
    "jaxquant/_src/dot/vjp.py _store_dtype returns None (float32 grid values) where the "
    "backend emulates fp8; storing the e4m3 codes (exact) and widening them inside "
    "scaled.scaled_dot would let XLA gather them (with mode='real' XLA:CPU gathers them "
    "as f16: 12 288 bytes, half the float model's)"
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "step"),
    [
        ("int8", "forward"),
        pytest.param(
            "int8",
            "train",
            marks=[
                pytest.mark.slow,
                pytest.mark.xfail(
                    strict=True,
                    reason=_GATHERS_FLOAT.format(
                        what="dequantized kernels in the backward pass",
                        layers="'out' and 'up'",
                        nbytes="2 048 (out) + 8 192 (up) = 10 240",
                        total="16 384",
                        fix=_FIX_BACKWARD,
                    ),
                ),
            ],
        ),
        pytest.param(
            "e4m3",
            "forward",
            marks=pytest.mark.xfail(
                strict=True,
                reason=_GATHERS_FLOAT.format(
                    what="e4m3 grid values (CPU emulates fp8: float32 storage)",
                    layers="every kernel",
                    nbytes="24 576",
                    total="24 576",
                    fix=_FIX_FP8,
                ),
            ),
        ),
    ],
)
def test_fsdp_gathers_kernels_as_codes(config, step):
    """With FSDP every kernel is split; XLA gathers it for its product. A quantized kernel
    should be gathered as its codes (int8 / fp8: one byte per element), quantized on each
    shard (its scale from an all-reduced amax), not as float32."""
    run = _run("linen", config, "fsdp", step)
    gathers = _kernel_gathers(run.traffic, "linen")
    assert len(gathers) >= len(_TP), run.traffic
    wide = [c for c in gathers if c.dtype not in ("s8", "u8") and not c.dtype.startswith("f8")]
    assert not wide, (sum(c.nbytes for c in wide), sum(c.nbytes for c in gathers), wide)


# ------------------------------------------------------------------------ the direct ops


@functools.cache
def _operands(kind: str) -> tuple[np.ndarray, np.ndarray, Any]:
    """(lhs, rhs, lax op) with lhs split by batch over "data", rhs by columns over "model"."""
    rng = np.random.default_rng(0)
    if kind == "dot_general":
        lhs, rhs = rng.standard_normal((16, 64)), rng.standard_normal((64, 32))
        op = functools.partial(lax.dot_general, dimension_numbers=(((1,), (0,)), ((), ())))
    elif kind == "einsum":
        lhs, rhs = rng.standard_normal((8, 4, 64)), rng.standard_normal((64, 32))
        op = functools.partial(jnp.einsum, "btd,df->btf")
    else:
        lhs, rhs = rng.standard_normal((8, 6, 6, 16)), rng.standard_normal((3, 3, 16, 32))
        op = functools.partial(
            lax.conv_general_dilated,
            window_strides=(1, 1),
            padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
    return lhs.astype(np.float32), rhs.astype(np.float32), op


_QUANTIZED_OPS = {
    "dot_general": lambda lhs, rhs, config: jq.dot_general(
        lhs, rhs, (((1,), (0,)), ((), ())), config=config
    ),
    "einsum": lambda lhs, rhs, config: jq.einsum("btd,df->btf", lhs, rhs, config=config),
    "conv_general_dilated": lambda lhs, rhs, config: jq.conv_general_dilated(
        lhs, rhs, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), config=config
    ),
}


def _operand_shardings(lhs: np.ndarray, rhs: np.ndarray):
    mesh = _mesh()
    return (
        NamedSharding(mesh, P("data", *[None] * (lhs.ndim - 1))),
        NamedSharding(mesh, P(*[None] * (rhs.ndim - 1), "model")),
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("op", "config"),
    # einsum is dot_general with its axes named (jaxquant/_src/dot/subscripts.py): e4m3's
    # emulated product is partitioned as dot_general's, which runs it
    [(op, c) for op in _QUANTIZED_OPS for c in ("int8", "e4m3") if (op, c) != ("einsum", "e4m3")],
)
def test_direct_op_keeps_lax_sharding_and_values(op, config):
    """Under jit with a batch-split lhs and a column-split rhs, the quantized op's output
    has lax's output sharding, its gradients lax's gradients' shardings, and its values
    are those of one device: bitwise for the int8 products (an s8 x s8 -> s32 dot is an
    exact integer sum, whatever the partition, and the scales come from whole-tensor
    amaxes), to 1e-5 relative for the float32 ones (the e4m3 products, which CPU
    emulates with a float32 dot of grid values, and the emulated conv: XLA sums a
    partition in another order; measured <= 1.7e-5 absolute on outputs up to 20, where
    one code rounded differently would change an output by ~1e-2)."""
    lhs, rhs, lax_op = _operands(op)
    shardings = _operand_shardings(lhs, rhs)
    cfg = CONFIGS[config]

    def quantized(a, b):
        return _QUANTIZED_OPS[op](a, b, cfg)

    def loss(fn):
        return jax.grad(lambda a, b: jnp.sum(fn(a, b) ** 2), argnums=(0, 1))

    args = [jax.device_put(v, s) for v, s in zip((lhs, rhs), shardings, strict=True)]
    ref_out = jax.jit(lax_op, in_shardings=shardings)(*args)
    out = jax.jit(quantized, in_shardings=shardings)(*args)
    assert ref_out.sharding.spec != P(), "the float op should keep the split axes"
    _assert_same_shardings(out, ref_out)
    grads = jax.jit(loss(quantized), in_shardings=shardings)(*args)
    _assert_same_shardings(grads, jax.jit(loss(lax_op), in_shardings=shardings)(*args))
    device = jax.devices()[0]
    one = [jax.device_put(v, device) for v in (lhs, rhs)]
    ref = np.asarray(jax.jit(quantized)(*one))
    if config == "int8" and op != "conv_general_dilated":
        np.testing.assert_array_equal(np.asarray(out), ref)
    else:
        scale = float(np.max(np.abs(ref)))
        np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5 * scale)
    # and the quantizer ran: the output is not the float product
    assert not np.allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-4, atol=1e-4)


def test_direct_op_eager_keeps_sharding():
    """Called eagerly (its own compiled program) on sharded operands, too."""
    lhs, rhs, lax_op = _operands("dot_general")
    shardings = _operand_shardings(lhs, rhs)
    args = [jax.device_put(v, s) for v, s in zip((lhs, rhs), shardings, strict=True)]
    out = _QUANTIZED_OPS["dot_general"](*args, CONFIGS["int8"])
    _assert_same_shardings(out, lax_op(*args))
