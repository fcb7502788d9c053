"""Every public callable, called with bad arguments (issue 11, "Bad arguments").

Each public function and constructor of ``jaxquant`` and its public submodules has a
:class:`Target` below: a call with good defaults for every argument, and for each argument
a table of bad values (wrong types, strings for bools, NaN / Inf / negative / zero numbers,
huge ints, wrong shapes, a QArray where an array is expected, None where one is
required). Replacing one argument at a time, the call must raise a ``ValueError`` or
``TypeError`` whose message names the argument (a word-boundary match of its name, or the
target's stated alias), or give the documented result recorded in ``DOCUMENTED``.

``test_every_public_callable_has_a_target`` enumerates ``__all__`` of every public module,
so new API fails the suite until it is added here. Cases that fail because of code this
change does not touch are ``xfail(strict=True)`` in ``XFAIL`` with the reason: fixing one
makes its xfail fail, so the table stays true.
"""

# Lambda and function defaults are the targets' good arguments, built once on purpose.
# ruff: noqa: B008

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import re
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq

flax_linen = pytest.importorskip("flax.linen")
optax = pytest.importorskip("optax")
jqf = importlib.import_module("jaxquant.flax")
jqo = importlib.import_module("jaxquant.optax")
jqorbax = importlib.import_module("jaxquant.orbax")
jqdata = importlib.import_module("jaxquant.app.datasets")

PUBLIC_MODULES = {
    "jq": jq,
    "jq.formats": jq.formats,
    "jq.metrics": jq.metrics,
    "jq.recipes": jq.recipes,
    "jq.integer": jq.integer,
    "jq.rotations": jq.rotations,
    "jq.optax": jqo,
    "jq.flax": jqf,
    "jq.orbax": jqorbax,
    "jaxquant.app.datasets": jqdata,
}

# ------------------------------------------------------------------------ good values

X = jnp.linspace(-1.0, 1.0, 8, dtype=jnp.float32)
X2 = jnp.linspace(-1.0, 1.0, 32, dtype=jnp.float32).reshape(4, 8)
SPEC = jq.QuantSpec("int8")
QX = jq.quantize(X, SPEC)
KEY = jax.random.key(0)
DENSE = flax_linen.Dense(3)
DENSE_VARS = DENSE.init(KEY, jnp.ones((1, 4)))
RULE = jqf.Rule(".*", weight=jq.QuantSpec("int8", jq.per_channel(-1)))
QDENSE = jqf.quantize_model(DENSE, RULE)
QDENSE_VARS = QDENSE.init(KEY, jnp.ones((1, 4)))
POLICY = jqf.Policy()
LAYER = jqf.LayerSensitivity(
    "Dense_0", "Dense", (4, 3), {"w8": 30.0}, {"w8": 1.0}, {"float": 48, "w8": 12}
)
SENS = jqf.Sensitivity("sqnr", True, math.inf, {"w8": RULE}, (LAYER,), {"w8": 30.0}, {"w8": 1.0})

# ------------------------------------------------------------------------ bad values

NAN, INF = float("nan"), float("inf")
HUGE_INT = 2**100
HUGE_REAL = 10**400  # an int no float can hold: float() raises OverflowError

BOOL = {"str_False": "False", "int_1": 1, "none": None}
POS = {
    "nan": NAN,
    "inf": INF,
    "neg": -1.0,
    "zero": 0.0,
    "str": "1",
    "none": None,
    "bool": True,
    "huge": HUGE_REAL,
}
INT = {"float": 2.5, "str": "3", "bool": True, "none": None, "huge": HUGE_INT, "neg": -1}
CHOICE = {"bogus": "bogus", "none": None, "int": 3}
ARRAY = {"none": None, "str": "abc", "qarray": QX}
SPEC_BAD = {"str": "int8", "int": 8, "class": jq.QuantSpec}
KEY_BAD = {"int": 3, "str": "key"}


def only(table: dict[str, Any], *labels: str) -> dict[str, Any]:
    return {k: table[k] for k in labels}


def but(table: dict[str, Any], *labels: str) -> dict[str, Any]:
    return {k: v for k, v in table.items() if k not in labels}


@dataclasses.dataclass(frozen=True)
class Target:
    """``call(**{arg: bad})`` must raise naming ``arg`` (or ``aka[arg]``, a regex)."""

    call: Callable[..., Any]
    bad: dict[str, dict[str, Any]]
    aka: dict[str, str] = dataclasses.field(default_factory=dict)


def _tmpdir() -> str:
    return tempfile.mkdtemp(prefix="jq-bad-args-")


TARGETS: dict[str, Target] = {}


def target(qualname: str, call: Callable[..., Any], /, aka: dict[str, str] | None = None, **bad):
    TARGETS[qualname] = Target(call, bad, aka or {})


# ------------------------------------------------------------------------ jaxquant


def _qarray(
    values=QX.values,
    scale=QX.scale,
    zero_point=None,
    spec=SPEC,
    shape=(8,),
    dtype=np.dtype(np.float32),
):
    return jq.dequantize(jq.QArray(values, scale, zero_point, spec, shape, dtype))


target(
    "jq.QArray",
    _qarray,
    spec={"str": "int8", "none": None},
    shape={"wrong": (3,), "str": "8"},
    dtype={"bogus": "bogus"},
)
target(
    "jq.QuantSpec",
    lambda format="int8", granularity=None, calibration=jq.absmax(), **kw: jq.QuantSpec(
        format, granularity, calibration, **kw
    ),
    format={"int": 3, "none": None, "unknown": "int9x", "class": jq.formats.Format},
    granularity={"str": "per_tensor", "factory": jq.per_channel},
    calibration={"str": "absmax", "factory": jq.absmax},
    symmetric=BOOL,
    narrow_range=BOOL,
    saturate=BOOL,
    rounding=CHOICE,
    scale_format={"int": 3, "none": None, "int8": "int8"},
    rng=CHOICE,
    int_grid={"bogus": "wide", "int": 1},
)
target(
    "jq.ScaleState",
    lambda amax_history=jnp.zeros((16,)), scale=jnp.ones(()), count=jnp.zeros((), jnp.int32): (
        jq.delayed_scaling(SPEC).update(jq.ScaleState(amax_history, scale, count), X)
    ),
    aka={"amax_history": "amax_history|ScaleState"},
    amax_history={"str": "x", "wrong_shape": jnp.zeros((3, 2))},
)
target(
    "jq.Scaling",
    lambda spec=SPEC: jq.quantize_with(
        jq.Scaling(lambda s: (), lambda s, x: (1.0, ()), spec), (), X
    ),
    spec=SPEC_BAD,
)
target("jq.SizeReport", lambda leaves=(): jq.SizeReport(leaves).nbytes, leaves={"str": "abc"})
for _name in ("absmax", "minmax", "per_tensor"):
    target(
        f"jq.{_name}",
        lambda extra=None, _f=getattr(jq, _name): _f() if extra is None else _f(extra),
        aka={"extra": "positional argument"},
        extra={"int": 3},
    )


def _conv(
    lhs=jnp.ones((1, 4, 4, 2)),
    rhs=jnp.ones((3, 3, 2, 2)),
    window_strides=(1, 1),
    padding="SAME",
    **kw,
):
    dn = ("NHWC", "HWIO", "NHWC")
    kw = {"rhs_spec": SPEC, **kw}
    return jq.conv_general_dilated(lhs, rhs, window_strides, padding, dimension_numbers=dn, **kw)


target(
    "jq.conv_general_dilated",
    _conv,
    aka={"lhs": r"\blhs\b|floating-point", "rhs": r"\brhs\b|floating-point"},
    lhs=ARRAY,
    rhs=ARRAY,
    window_strides={"str": "x", "neg": (-1, 1)},
    padding={"bogus": "bogus", "int": 3},
    lhs_spec=SPEC_BAD,
    rhs_spec=SPEC_BAD,
    rhs_scale={"wrong_shape": jnp.ones((5,)), "str": "x"},
    key=KEY_BAD,
    ste=CHOICE,
)
target(
    "jq.current_scaling",
    lambda spec=SPEC: jq.current_scaling(spec),
    spec={**SPEC_BAD, "none": None, "asymmetric": jq.QuantSpec("uint8", symmetric=False)},
)
target(
    "jq.delayed_scaling",
    lambda spec=SPEC, **kw: jq.delayed_scaling(spec, **kw),
    spec={**SPEC_BAD, "none": None},
    history_len=INT,
    margin={**but(INT, "neg"), "out_of_range": 1000},
    reduction=CHOICE,
)
target(
    "jq.dequantize",
    lambda q=QX, dtype=None: jq.dequantize(q, dtype),
    aka={"q": r"\bq\b|QArray"},
    q={"array": X, "none": None, "str": "x"},
    dtype={"bogus": "bogus", "int": jnp.int8},
)
target(
    "jq.dequantize_tree",
    lambda tree=None: jq.dequantize_tree({"w": QX} if tree is None else tree),
    tree={"str": "abc", "none_leaf": {"w": None}},
)
target(
    "jq.dot_capabilities",
    lambda backend=None: jq.dot_capabilities(backend),
    backend={"bogus": "bogus", "int": 3},
)
_DN = (((1,), (0,)), ((), ()))
target(
    "jq.dot_general",
    lambda lhs=X2, rhs=jnp.ones((8, 3)), dimension_numbers=_DN, **kw: jq.dot_general(
        lhs, rhs, dimension_numbers, **{"lhs_spec": SPEC, "rhs_spec": SPEC, **kw}
    ),
    aka={
        "lhs": r"\blhs\b|floating-point",
        "rhs": r"\brhs\b|floating-point",
        "dimension_numbers": r"dimension.numbers",
    },
    lhs={**ARRAY, "wrong_shape": jnp.ones((4, 5))},
    rhs=ARRAY,
    dimension_numbers={"str": "x", "bad_axis": (((5,), (0,)), ((), ()))},
    lhs_spec=SPEC_BAD,
    rhs_spec=SPEC_BAD,
    grad_spec=SPEC_BAD,
    lhs_scale={"wrong_shape": jnp.ones((7,)), "str": "x", "qarray": QX},
    key=KEY_BAD,
    mode=CHOICE,
    ste=CHOICE,
    preferred_element_type={"bogus": "bogus"},
)
target(
    "jq.einsum",
    lambda subscripts="ij,jk->ik", a=X2, b=jnp.ones((8, 3)), **kw: jq.einsum(
        subscripts, a, b, **{"lhs_spec": SPEC, "rhs_spec": SPEC, **kw}
    ),
    aka={
        "a": r"\ba\b|\blhs\b|floating-point",
        "b": r"\bb\b|\brhs\b|floating-point",
        "subscripts": r"subscripts|label",
    },
    subscripts={"int": 3, "bad": "ij,kl->q", "none": None},
    a=ARRAY,
    b={**ARRAY, "wrong_shape": jnp.ones((5, 3))},
    lhs_spec=SPEC_BAD,
    rhs_spec=SPEC_BAD,
    lhs_scale={"wrong_shape": jnp.ones((7,))},
    key=KEY_BAD,
    mode=CHOICE,
    ste=CHOICE,
)
target(
    "jq.explain",
    lambda value=0.3, fmt="int8", **kw: jq.explain(value, fmt, **kw),
    aka={"value": r"\bvalue\b|is not a number|one real number"},
    value={"str": "abc", "list": [1.0]},
    fmt={"int": 3, "unknown": "int9x"},
    code={"neg": -1, "bad_str": "0xzz", "float": 2.5, "huge": HUGE_INT},
)
target(
    "jq.fake_quant",
    lambda x=X, spec=SPEC, **kw: jq.fake_quant(x, spec, **kw),
    aka={"x": r"\bx\b|floating-point|QArray"},
    x={**ARRAY, "ints": jnp.arange(8)},
    spec={**SPEC_BAD, "none": None},
    key=KEY_BAD,
    scale={"wrong_shape": jnp.ones((3,)), "str": "x", "qarray": QX},
    zero_point={"symmetric_spec": 5.0},
    ste=CHOICE,
)
target(
    "jq.fake_quant_with",
    lambda scaling=None, state=(), x=X, **kw: jq.fake_quant_with(
        jq.current_scaling(SPEC) if scaling is None else scaling, state, x, **kw
    ),
    aka={"x": r"\bx\b|floating-point|QArray"},
    scaling={"spec": SPEC, "str": "x"},
    state={"str": "x", "scale_state": jq.delayed_scaling(SPEC).init((8,))},
    x={**ARRAY, "ints": jnp.arange(8)},
    ste=CHOICE,
)
target(
    "jq.fixed",
    lambda amax=1.0: jq.fixed(amax),
    amax={
        **POS,
        "neg_inf": -INF,
        "pair_inf": (0.0, INF),
        "pair_nan": (NAN, 1.0),
        "pair_swapped": (2.0, 1.0),
        "pair_zero": (0.0, 0.0),
        "triple": (0.0, 1.0, 2.0),
        "pair_str": ("0", "1"),
        "array": np.ones(3),
    },
)
target(
    "jq.kl",
    lambda bins=512, num=64: jq.kl(bins, num),
    bins={**INT, "zero": 0, "seven": 7},
    num={**but(INT, "huge"), "zero": 0, "one": 1},
)
target(
    "jq.lsq_fake_quant",
    lambda x=X, spec=SPEC, step=0.1, **kw: jq.lsq_fake_quant(x, spec, step, **kw),
    aka={"x": r"\bx\b|floating-point|QArray"},
    x={**ARRAY, "ints": jnp.arange(8)},
    spec={**SPEC_BAD, "none": None},
    step={"str": "x", "none": None, "wrong_shape": jnp.ones((3,)), "qarray": QX},
    key=KEY_BAD,
)
target(
    "jq.lsq_init",
    lambda x=X, spec=SPEC: jq.lsq_init(x, spec),
    aka={"x": r"\bx\b|floating-point|QArray"},
    x={**ARRAY, "ints": jnp.arange(8)},
    spec={**SPEC_BAD, "none": None},
)
target("jq.mean_abs", lambda k=1.0: jq.mean_abs(k), k=POS)
target("jq.mean_std", lambda k=3.0: jq.mean_std(k), k=POS)
target(
    "jq.mse",
    lambda num=32, min_ratio=0.2: jq.mse(num, min_ratio),
    num={**INT, "zero": 0, "one": 1},
    min_ratio={**POS, "above_one": 1.5},
)
target(
    "jq.per_block",
    lambda axis=-1, size=4: jq.per_block(axis, size),
    axis=but(INT, "neg"),
    size={**INT, "zero": 0},
)
target(
    "jq.per_channel",
    lambda axes=(-1,): jq.per_channel(*axes),
    axes={
        "str": ("a",),
        "float": (1.0,),
        "bool": (True,),
        "none": (None,),
        "duplicate": (0, 0),
        "empty": (),
        "nested": ((0,), 1),
    },
)
target("jq.per_token", lambda axis=-1: jq.per_token(axis), axis=but(INT, "neg", "huge"))
target(
    "jq.percentile",
    lambda p=99.9: jq.percentile(p),
    p={**POS, "above_100": 100.5},
)
target(
    "jq.quantize",
    lambda x=X, spec=SPEC, **kw: jq.quantize(x, spec, **kw),
    aka={"x": r"\bx\b|floating-point|QArray"},
    x={**ARRAY, "ints": jnp.arange(8), "list_of_str": ["a", "b"]},
    spec={**SPEC_BAD, "none": None},
    key=KEY_BAD,
    scale={"wrong_shape": jnp.ones((3,)), "str": "x", "qarray": QX, "2d": jnp.ones((8, 8))},
    zero_point={"symmetric_spec": 5.0},
)
target(
    "jq.quantize_tree",
    # A fresh leaf every call: delete= (when a bad value is taken as True) deletes it.
    lambda tree=None, policy=SPEC, **kw: jq.quantize_tree(
        {"w": jnp.array(X)} if tree is None else tree, policy, **kw
    ),
    policy={"str": "int8", "int": 8, "none": None},
    delete=BOOL,
    key=KEY_BAD,
    load={"str": "x"},
    tree={"qarray_leaf": {"w": QX}},
)
target(
    "jq.quantize_with",
    lambda scaling=None, state=(), x=X, **kw: jq.quantize_with(
        jq.current_scaling(SPEC) if scaling is None else scaling, state, x, **kw
    ),
    aka={"x": r"\bx\b|floating-point|QArray"},
    scaling={"spec": SPEC, "str": "x"},
    state={"str": "x"},
    x={**ARRAY, "ints": jnp.arange(8)},
    key=KEY_BAD,
)
target(
    "jq.random_bits",
    lambda key=KEY, shape=(4,), **kw: jq.random_bits(key, shape, **kw),
    key={**KEY_BAD, "none": None},
    shape={"str": "x", "neg": (-1,), "float": (2.5,)},
    impl=CHOICE,
)
target(
    "jq.size_report",
    lambda tree=None: jq.size_report({"w": X} if tree is None else tree),
    aka={"tree": r"\btree\b|leaf '"},
    tree={"object_leaf": {"w": object()}, "str_leaf": {"w": "abc"}},
)
target(
    "jq.rotations.hadamard_matrix",
    lambda n=12: jq.rotations.hadamard_matrix(n),
    n={**but(INT, "neg", "huge"), "uncovered": 92, "zero": 0},
)
target(
    "jq.rotations.hadamard_supported",
    lambda n=12: jq.rotations.hadamard_supported(n),
    n={"float": 2.5, "str": "3", "none": None},
)
target(
    "jq.rotations.walsh_hadamard",
    lambda x=None, **kw: jq.rotations.walsh_hadamard(X if x is None else x, **kw),
    x={"int": jnp.arange(8), "uncovered": jnp.ones(92), "str": "abc"},
    axis={**but(INT, "neg"), "out": 3},
    normalize={"str": "yes", "none": None},
    transpose={"str": "yes", "none": None},
)
target(
    "jq.rotations.hadamard_rotation",
    lambda size=16, **kw: jq.rotations.hadamard_rotation(size, **kw),
    size={**but(INT, "neg", "huge"), "uncovered": 92, "zero": 0},
    key={"str": "x", "int": 3},
)
target(
    "jq.rotations.DotHadamard",
    lambda **kw: jq.rotations.DotHadamard(**kw),
    gemms={"unknown": ("bwd",), "empty": (), "int": 3},
    block={"odd": 7, "zero": 0, "str": "16"},
    random={"int": 1},
    seed={"neg": -1, "str": "0"},
)
target(
    "jq.per_block_2d",
    lambda size=16, **kw: jq.per_block_2d(size, **kw),
    size={"zero": 0, "str": "16", "neg": -1},
    axes={"same": (0, 0), "one": (0,), "str": "ab"},
)
target(
    "jq.rotations.HadamardRotation",
    # a record hadamard_rotation builds: it holds what it is given (documented below)
    lambda signs=None: jq.rotations.HadamardRotation(jnp.ones(16) if signs is None else signs),
    signs={"int": 12345},
)
target(
    "jq.kv_cache_init",
    lambda shape=(1, 4, 2, 8), spec=jq.QuantSpec("int8", jq.per_token()), **kw: jq.kv_cache_init(
        shape, spec, **kw
    ),
    aka={"spec": r"\bspec\b|per_tensor|shares a scale across tokens"},
    shape={"list": [1, 4, 2, 8], "str": "x", "none": None},
    spec={**SPEC_BAD, "per_tensor": jq.QuantSpec("int8")},
    axis={**but(INT, "neg"), "out": 4},
)
target(
    "jq.kv_cache_update",
    lambda cache=None, new=None, index=0, **kw: jq.kv_cache_update(
        jq.kv_cache_init((1, 4, 2, 8), jq.QuantSpec("int8", jq.per_token()))
        if cache is None
        else cache,
        jnp.ones((1, 1, 2, 8)) if new is None else new,
        index,
        **kw,
    ),
    aka={"cache": r"\bcache\b", "new": r"\bnew\b", "index": r"\bindex\b"},
    cache={"array": X, "str": "x"},
    new={"wrong_shape": jnp.ones((1, 1, 3, 8)), "too_many": jnp.ones((1, 5, 2, 8))},
    index={"vector": jnp.zeros(2, jnp.int32)},
    axis={**but(INT, "neg"), "out": 4},
)
target(
    "jq.static_scaling",
    lambda spec=SPEC, amax=1.0: jq.static_scaling(spec, amax),
    spec={**SPEC_BAD, "none": None},
    amax=but(POS, "zero"),
)
target("jq.twn", lambda threshold=0.7: jq.twn(threshold), threshold=POS)

# ------------------------------------------------------------------------ jq.formats

F = jq.formats
target(
    "jq.formats.Format",
    lambda name="x", kind="int", bits=8, **kw: F.Format(name, kind, bits, **kw),
    name={"int": 3, "empty": ""},
    kind={"bogus": "bogus", "none": None},
    bits={**but(INT, "neg"), "zero": 0},
    signed=BOOL,
)
target(
    "jq.formats.all_formats",
    lambda extra=None: F.all_formats(extra),
    aka={"extra": "positional"},
    extra={"int": 3},
)
target(
    "jq.formats.names",
    lambda extra=None: F.names(extra),
    aka={"extra": "positional"},
    extra={"int": 3},
)
target(
    "jq.formats.code_table",
    lambda fmt="int8": F.code_table(fmt),
    fmt={"int": 3, "list": ["int8"], "unknown": "int9x"},
)
target(
    "jq.formats.finite_values",
    lambda fmt="int8": F.finite_values(fmt),
    fmt={"int": 3, "list": ["int8"], "unknown": "int9x"},
)
target(
    "jq.formats.codebook_format",
    lambda name="cb", values=(-1.0, 0.0, 1.0), bits=2: F.codebook_format(name, values, bits),
    name={"int": 3, "none": None},
    values={
        "str": "abc",
        "one": (1.0,),
        "nan": (0.0, NAN),
        "inf": (0.0, INF),
        "unsorted": (1.0, 0.0),
        "strs": ("a", "b"),
        "none": None,
    },
    bits={**INT, "zero": 0, "too_few": 1},
)
target(
    "jq.formats.decode_code",
    lambda fmt="int8", code=3: F.decode_code(fmt, code),
    fmt={"int": 3, "none": None},
    code={**but(INT, "none"), "too_big": 256},
)
target(
    "jq.formats.float_format",
    lambda exp_bits=4, man_bits=3, **kw: F.float_format(exp_bits, man_bits, **kw),
    exp_bits={**INT, "zero": 0, "nine": 9},
    man_bits={**INT, "24": 24},
    bias={"float": 7.5, "str": "7", "huge": HUGE_INT},
    nan_style=CHOICE,
    signed=BOOL,
    name={"int": 3, "empty": ""},
)
target(
    "jq.formats.get",
    lambda fmt="int8": F.get(fmt),
    fmt={"int": 3, "none": None, "unknown": "int9x", "empty": ""},
)
target(
    "jq.formats.int_format",
    lambda bits=8, **kw: F.int_format(bits, **kw),
    bits={**INT, "zero": 0, "12": 12},
    signed=BOOL,
)
target(
    "jq.formats.nvfp4_format",
    lambda name="nv", block_size=16, scale_floor=0.0: F.nvfp4_format(
        name, block_size=block_size, scale_floor=scale_floor
    ),
    name={"int": 3, "none": None},
    block_size={**but(INT, "neg", "huge"), "zero": 0},
    scale_floor={"neg": -1.0, "str": "x", "above": 449.0},
)
target(
    "jq.formats.mx_format",
    lambda name="mx", element=F.get("e4m3"), block_size=32: F.mx_format(name, element, block_size),
    name={"int": 3, "none": None},
    element={
        "int4": F.get("int4"),
        "nf4": F.get("nf4"),
        "e3m4": F.get("e3m4"),
        "fp16": F.get("fp16"),
        "mx": F.get("mxfp8"),
        "int": 3,
    },
    block_size={**INT, "zero": 0},
)
target(
    "jq.formats.register",
    lambda fmt=F.get("int8"), aliases=("x",): F.register(fmt, *aliases),
    fmt={"str": "int8", "none": None},
    aliases={"int": (3,), "none": (None,), "empty": ("",)},
)

# ------------------------------------------------------------------------ jq.metrics

M = jq.metrics
for _name in ("mse", "sqnr", "max_abs_error", "summary", "underflow_rate"):
    target(
        f"jq.metrics.{_name}",
        lambda x=X, x_hat=X, _f=getattr(M, _name): _f(x, x_hat),
        x={"none": None, "str": "abc", "wrong_shape": jnp.ones(3)},
        x_hat={"none": None, "str": "abc", "wrong_shape": jnp.ones(3)},
    )
for _name in ("inf_count", "nan_count"):
    target(
        f"jq.metrics.{_name}",
        lambda x=X, _f=getattr(M, _name): _f(x),
        x={"none": None, "str": "abc"},
    )
target(
    "jq.metrics.scale_clamp_rate",
    lambda x=X, q=QX: M.scale_clamp_rate(x, q),
    aka={"q": r"\bq\b|QArray"},
    x={"none": None, "wrong_shape": jnp.ones(3), "str": "abc"},
    q={"array": X, "none": None},
)
target(
    "jq.metrics.saturation_rate",
    lambda x=X, q=QX: M.saturation_rate(x, q),
    aka={"q": r"\bq\b|QArray"},
    x={"none": None, "wrong_shape": jnp.ones(3), "str": "abc"},
    q={"array": X, "none": None},
)
target(
    "jq.metrics.report",
    lambda tree=None, qtree=None: M.report(
        {"w": X} if tree is None else tree, {"w": QX} if qtree is None else qtree
    ),
    tree={"other_keys": {"v": X}, "str": "abc"},
    qtree={"other_keys": {"v": QX}, "str": "abc"},
)

# ------------------------------------------------------------------------ jq.recipes

R = jq.recipes
target(
    "jq.recipes.Recipe",
    lambda name="r", weight=SPEC, act=None, grad=None, **kw: R.Recipe(
        name, weight, act, grad, **kw
    ),
    name={"int": 3},
    weight=SPEC_BAD,
    act=SPEC_BAD,
    scaling=CHOICE,
    history_len=INT,
    margin=but(INT, "neg"),
    ste=CHOICE,
)
for _name in ("binary", "fp8_current", "mxfp8", "w8a8_int8"):
    target(
        f"jq.recipes.{_name}",
        lambda extra=None, _f=getattr(R, _name): _f() if extra is None else _f(extra),
        aka={"extra": "positional argument"},
        extra={"int": 3},
    )
target(
    "jq.recipes.names",
    lambda extra=None: R.names(extra),
    aka={"extra": "positional"},
    extra={"int": 3},
)
target(
    "jq.recipes.fp8_delayed",
    lambda history_len=16, margin=0: R.fp8_delayed(history_len, margin),
    history_len=INT,
    margin=but(INT, "neg"),
)
target("jq.recipes.ternary", lambda threshold=0.7: R.ternary(threshold), threshold=POS)
for _fp4 in ("nvfp4", "mxfp4"):
    target(
        f"jq.recipes.{_fp4}",
        lambda _f=_fp4, **kw: getattr(R, _f)(**kw),
        weight_2d={"str": "yes", "int": 1},
        hadamard={"unknown": ("bwd",), "int": 3},
        random_hadamard={"int": 1},
        hadamard_block={"odd": 7, "zero": 0, "str": "16"},
        stochastic_grad={"int": 1},
        requantize={"none": None},
    )
target(
    "jq.recipes.w4a16_int4",
    lambda group_size=128: R.w4a16_int4(group_size),
    group_size={**INT, "zero": 0},
)
target(
    "jq.recipes.get",
    lambda name="w8a8_int8", **kw: R.get(name, **kw),
    aka={"name": r"\bname\b|recipe"},
    name={"int": 3, "none": None, "unknown": "w3a3"},
    bogus_kwarg={"int": 3},
)

# ------------------------------------------------------------------------ jq.integer

I8 = jnp.arange(-4, 4, dtype=jnp.int32)
integer = jq.integer
target(
    "jq.integer.quantize_multiplier",
    lambda m=0.5: integer.quantize_multiplier(m),
    m={"nan": NAN, "inf": INF, "neg": -0.5, "str": "x", "none": None},
)
target(
    "jq.integer.multiply_by_quantized_multiplier",
    lambda x=I8, m0=jnp.int32(2**30), shift=jnp.int32(-1): integer.multiply_by_quantized_multiplier(
        x, m0, shift
    ),
    x={"floats": X, "none": None, "str": "x"},
    m0={"float": 0.5, "none": None},
    shift={"float": 0.5, "too_big": 40},
)
target(
    "jq.integer.rounding_divide_by_pot",
    lambda x=I8, exponent=1: integer.rounding_divide_by_pot(x, exponent),
    x={"floats": X, "none": None},
    exponent={"neg": -1, "too_big": 40, "float": 0.5},
)
target(
    "jq.integer.saturating_rounding_doubling_high_mul",
    lambda a=I8, b=I8: integer.saturating_rounding_doubling_high_mul(a, b),
    a={"floats": X, "none": None},
    b={"floats": X, "none": None},
)


def _dense(
    x=jnp.ones((2, 4), jnp.uint8),
    x_zero_point=0,
    w=jnp.ones((4, 3), jnp.int8),
    bias=None,
    m0=jnp.int32(2**30),
    shift=jnp.int32(-1),
    out_zero_point=0,
    **kw,
):
    return integer.dense(x, x_zero_point, w, bias, m0, shift, out_zero_point, **kw)


target(
    "jq.integer.dense",
    _dense,
    x={"floats": jnp.ones((2, 4)), "wrong_shape": jnp.ones((2, 5), jnp.uint8), "none": None},
    w={"floats": jnp.ones((4, 3)), "none": None},
    x_zero_point={"out_of_range": 300},
    out_zero_point={"out_of_range": 300},
    relu=BOOL,
    out_dtype={"float": jnp.float32, "bogus": "bogus"},
)

# ------------------------------------------------------------------------ jq.optax

_P = {"w": jnp.ones(4, jnp.bfloat16)}
target(
    "jq.optax.overwrite_with_gradient",
    lambda inner=None: jqo.overwrite_with_gradient(optax.sgd(0.1) if inner is None else inner),
    inner={"function": len, "str": "adam", "int": 3},
)
target(
    "jq.optax.OverwriteWithGradientState",
    # optax-style NamedTuple state: holds what it is given (documented below)
    lambda inner_state=(): jqo.OverwriteWithGradientState(inner_state),
    inner_state={"int": 12345},
)
target(
    "jq.optax.adam_8bit",
    lambda learning_rate=1e-3, **kw: jqo.adam_8bit(learning_rate, **kw),
    learning_rate={"str": "x", "none": None},
    b1={"nan": NAN, "neg": -0.1, "one": 1.0, "str": "x"},
    b2={"nan": NAN, "above_one": 1.5},
    eps={"neg": -1.0, "nan": NAN},
    block_size={**INT, "zero": 0},
    min_size={"float": 2.5, "neg": -1, "str": "x"},
)
target(
    "jq.optax.scale_by_adam_8bit",
    lambda **kw: jqo.scale_by_adam_8bit(**kw),
    b1={"nan": NAN, "neg": -0.1, "str": "x"},
    eps={"neg": -1.0},
    block_size={**INT, "zero": 0},
)
target(
    "jq.optax.all_finite",
    lambda tree=None: jqo.all_finite({"w": X} if tree is None else tree),
    tree={"str_leaf": {"w": "abc"}, "qarray_leaf": {"w": QX}},
)
target(
    "jq.optax.apply_updates_sr",
    lambda params=_P, updates=_P, key=KEY, **kw: jqo.apply_updates_sr(params, updates, key, **kw),
    params={"none": None, "mismatched": {"v": jnp.ones(4)}},
    updates={"mismatched": {"v": jnp.ones(4)}, "wrong_shape": {"w": jnp.ones(3)}},
    key={**KEY_BAD, "none": None},
    spec=SPEC_BAD,
)
target(
    "jq.optax.dynamic_loss_scale",
    lambda inner=None, **kw: jqo.dynamic_loss_scale(
        optax.sgd(0.1) if inner is None else inner, **kw
    ),
    inner={"str": "sgd", "none_obj": 3},
    initial_scale=POS,
    growth_interval={**INT, "zero": 0},
    growth_factor={"nan": NAN, "half": 0.5, "str": "x"},
    backoff_factor={"nan": NAN, "two": 2.0, "zero": 0.0},
    min_scale={"neg": -1.0, "nan": NAN},
    max_scale={"inf": INF, "below_min": 0.5},
    unscale_dtype={"int": jnp.int32, "bogus": "bogus"},
)
target(
    "jq.optax.scale_loss",
    lambda loss=jnp.float32(1.0), state=None: jqo.scale_loss(
        loss,
        jqo.dynamic_loss_scale(optax.sgd(0.1)).init(_P) if state is None else state,
    ),
    aka={"state": r"\bstate\b|LossScaleState"},
    loss={"str": "x", "qarray": QX, "none": None},
    state={"str": "x", "none_obj": 3},
)
target(
    "jq.optax.state_nbytes",
    lambda state=None: jqo.state_nbytes({"w": X} if state is None else state),
    state={"str_leaf": {"w": "abc"}, "object_leaf": {"w": object()}},
)
target(
    "jq.optax.stochastic_round_updates",
    lambda spec=None, **kw: jqo.stochastic_round_updates(spec, **kw),
    spec=SPEC_BAD,
    seed={"float": 2.5, "str": "3", "none": None, "huge": HUGE_INT},
)
target(
    "jq.optax.QuantizedMoment",
    lambda codes=jnp.zeros((1, 8), jnp.uint8), absmax=jnp.ones(1), shape=(8,), signed=True: (
        jqo.state_nbytes(jqo.QuantizedMoment(codes, absmax, shape, signed))
    ),
    codes={"floats": jnp.zeros((1, 8)), "str": "x"},
    shape={"str": "x", "neg": (-1,)},
    signed=BOOL,
)
target(
    "jq.optax.LossScaleState",
    lambda scale=jnp.float32(2.0), good_steps=jnp.int32(0), inner_state=(): jqo.scale_loss(
        jnp.float32(1.0), jqo.LossScaleState(scale, good_steps, inner_state)
    ),
    scale={"str": "x", "none": None},
)
target(
    "jq.optax.ScaleByAdam8bitState",
    lambda count=jnp.int32(0), mu=None, nu=None: jqo.scale_by_adam_8bit().update(
        {"w": X},
        jqo.ScaleByAdam8bitState(
            count, {"w": X} if mu is None else mu, {"w": X} if nu is None else nu
        ),
    ),
    count={"str": "x"},
    mu={"str": "x", "wrong_shape": {"w": jnp.ones(3)}},
)
target(
    "jq.optax.StochasticRoundState",
    lambda key=KEY: jqo.stochastic_round_updates().update(_P, jqo.StochasticRoundState(key), _P),
    key={"str": "x", "none": None, "int": 3},
)

# ------------------------------------------------------------------------ jq.flax

for _name, _args in (
    ("Assignment", ((), {}, 0, 0.0, 0, 0)),
    ("CalibrationResult", ((), {}, {}, {}, 0, "global")),
    ("LayerSensitivity", ("a", "b", (1,), {}, {}, {})),
    ("LayerStatistics", (1, X, X, None, None, "kernel", (0,), False, (1,), "dot", 1, RULE)),
    ("Match", ("a", "b", RULE)),
    ("Contraction", ("a", "b", "dot", ((1,), (1,)), "rhs", True, "r")),
    ("Sensitivity", ("sqnr", True, 0.0, {}, (), {}, {})),
    ("Statistics", ({}, (), {}, 0)),
):
    # Records the library returns; constructing one checks nothing (documented below).
    target(
        f"jq.flax.{_name}",
        lambda first=None, _c=getattr(jqf, _name), _a=_args: _c(first, *_a[1:]),
        first={"int": 12345},
    )
target(
    "jq.flax.layer_statistics",
    lambda model=DENSE, batches=(jnp.ones((2, 4)),), variables=DENSE_VARS, **kw: (
        jqf.layer_statistics(model, batches, variables, **{"rules": jqf.Rule(".*"), **kw})
    ),
    aka={"rules": r"\brules?\b"},
    model={"str": "x"},
    batches={"empty": (), "str": "abc"},
    max_samples={**but(INT, "huge", "none")},
    rules={"str": "x", "spec": SPEC},
    call_kwargs={"str": "train=False", "list": ["train"]},
)
target(
    "jq.flax.Rule",
    lambda pattern=".*", config=None, **kw: jqf.Rule(pattern, config, **kw),
    pattern={"int": 3, "bad_regex": "(", "none": None},
    config={"spec": jq.QuantSpec("int8"), "str": "int8", "dict": {"weight": None}},
    weight=SPEC_BAD,
    act=SPEC_BAD,
    grad=SPEC_BAD,
    mode=CHOICE,
    scaling=CHOICE,
    history_len=INT,
    margin=but(INT, "neg"),
    ste=CHOICE,
)
target(
    "jq.QuantConfig",
    lambda **kw: jq.QuantConfig(**kw),
    weight=SPEC_BAD,
    act=SPEC_BAD,
    grad=SPEC_BAD,
    mode=CHOICE,
    scaling=CHOICE,
    history_len=INT,
    margin=but(INT, "neg"),
    ste=CHOICE,
)
target(
    "jq.flax.Policy",
    lambda **kw: jqf.Policy(**kw),
    param_dtype={"bogus": "bogus", "int": jnp.int8, "none": None},
    compute_dtype={"bogus": "bogus", "int": jnp.int8},
    output_dtype={"bogus": "bogus"},
)
target(
    "jq.flax.PolicyModule",
    lambda inner=DENSE, policy=POLICY: jqf.PolicyModule(inner, policy).init(KEY, jnp.ones((1, 4))),
    inner={"str": "x", "none": None},
    policy={"str": "x", "dtype": jnp.bfloat16},
)
target(
    "jq.flax.QuantizedModule",
    lambda module=DENSE, rules=(RULE,), **kw: jqf.QuantizedModule(module, rules, **kw).init(
        KEY, jnp.ones((1, 4))
    ),
    module={"str": "x", "none": None},
    rules={"str": "x", "spec": (SPEC,)},
    strict=BOOL,
)
target(
    "jq.flax.NnxPolicyModule",
    lambda module=None, policy=POLICY: jqf.NnxPolicyModule(
        importlib.import_module("flax.nnx").Linear(
            4, 3, rngs=importlib.import_module("flax.nnx").Rngs(0)
        )
        if module is None
        else module,
        policy,
    ),
    module={"str": "x", "linen": DENSE},
    policy={"str": "x"},
)
target(
    "jq.flax.NnxQuantOp",
    lambda rule=RULE, path="l", kernel_shape=(4, 3), einsum=False, rngs=None: jqf.NnxQuantOp(
        rule, path, kernel_shape, einsum, rngs
    ),
    rule={"str": "x", "spec": SPEC},
    kernel_shape={"str": "x", "neg": (-1, 3)},
    einsum=BOOL,
)
target(
    "jq.flax.OverwriteWithGradient",
    lambda value=jnp.zeros(3): jqf.OverwriteWithGradient(value).get_value(),
    value={"str": "x"},
)
target(
    "jq.flax.layer_errors",
    lambda tree=None: jqf.layer_errors({"w": jnp.ones(2)} if tree is None else tree),
    aka={"tree": r"errors=True"},
    tree={"no errors": {"kernel": jnp.ones(2)}, "int": 3},
)
target(
    "jq.flax.worst_layers",
    lambda errors=None, **kw: jqf.worst_layers(
        {"a": {"wgrad_sqnr": 10.0}, "b": {"wgrad_sqnr": 20.0}} if errors is None else errors,
        **({"k": 1} | kw),
    ),
    k={"zero": 0, "str": "1", "neg": -1},
    metric={"unknown": "sqnr", "int": 3},
    below={"str": "10"},
)
target(
    "jq.flax.QuantState",
    lambda value=jnp.zeros(3): jqf.QuantState(value).get_value(),
    value={"str": "x"},
)
target(
    "jq.flax.apply_policy",
    lambda model=DENSE, policy=POLICY: jqf.apply_policy(model, policy),
    aka={"model": r"\bmodel\b|Module", "policy": r"\bpolicy\b|Policy"},
    model={"str": "x", "none": None},
    policy={"str": "x", "dtype": jnp.bfloat16, "none": None},
)
target(
    "jq.flax.quantize_model",
    lambda model=DENSE, rules=RULE, **kw: jqf.quantize_model(model, rules, **kw),
    aka={"model": r"\bmodel\b|Module", "rules": r"\brules?\b"},
    model={"str": "x", "none": None},
    rules={"str": "x", "spec": SPEC, "none": None},
    strict=BOOL,
)
target(
    "jq.flax.report",
    lambda model=QDENSE: jqf.report(model),
    model={"str": "x", "plain_dense": DENSE},
)
target(
    "jq.flax.contractions",
    lambda model=QDENSE: jqf.contractions(model),
    model={"str": "x", "plain_dense": DENSE},
)
target(
    "jq.flax.convert",
    # Fresh variables every call: delete= (a bad value taken as True) deletes them.
    lambda model=QDENSE, variables=None, **kw: jqf.convert(
        model, jax.tree.map(jnp.array, QDENSE_VARS) if variables is None else variables, **kw
    ),
    model={"str": "x", "plain_dense": DENSE},
    variables={"str": "x"},
    delete=BOOL,
)
target(
    "jq.flax.calibrate",
    lambda model=DENSE, batches=(jnp.ones((2, 4)),), variables=DENSE_VARS, **kw: jqf.calibrate(
        model, batches, variables, **{"rules": jqf.Rule(".*", act=SPEC), **kw}
    ),
    aka={"rules": r"\brules?\b"},
    model={"str": "x"},
    batches={"empty": (), "str": "abc"},
    aggregate=CHOICE,
    momentum={"nan": NAN, "neg": -0.5, "above_one": 1.5, "str": "x"},
    bins={**but(INT, "huge"), "zero": 0},
    rules={"str": "x", "spec": SPEC},
    call_kwargs={"str": "train=False", "list": ["train"], "int_keys": {1: False}},
)


def _sensitivity(model=DENSE, variables=DENSE_VARS, candidates=None, data=None, **kw):
    candidates = {"w8": RULE} if candidates is None else candidates
    data = (jnp.ones((2, 4)), None) if data is None else data
    return jqf.sensitivity(model, variables, candidates, data, **{"metric": "sqnr", **kw})


target(
    "jq.flax.sensitivity",
    _sensitivity,
    aka={"candidates": "candidate"},
    candidates={"str": "x", "spec": {"w8": SPEC}},
    metric={"bogus": "bogus", "int": 3},
    layers={"int": 3, "unknown": "Nope"},
    higher_is_better=but(BOOL, "none"),
    call_kwargs={"str": "train=False", "list": ["train"], "int_keys": {1: False}},
)
target(
    "jq.flax.mixed_precision",
    lambda sens=SENS, budget=100, **kw: jqf.mixed_precision(sens, budget=budget, **kw),
    aka={"sens": r"\bsens\b|Sensitivity"},
    sens={"str": "x", "none": None},
    budget={"nan": NAN, "neg": -1, "str": "x", "none": None},
    objective={"str": "x"},
)

# ------------------------------------------------------------------------ jq.orbax

target(
    "jq.orbax.save",
    lambda directory=None, tree=None, **kw: jqorbax.save(
        _tmpdir() + "/c" if directory is None else directory,
        {"w": X} if tree is None else tree,
        **kw,
    ),
    directory={"int": 3, "none_obj": 3.5},
    tree={"object_leaf": {"w": object()}, "str_leaf": {"w": "abc"}},
    force=BOOL,
)
target(
    "jq.orbax.restore",
    lambda directory=None, target=None: jqorbax.restore(
        _tmpdir() if directory is None else directory, target
    ),
    directory={"int": 3, "missing": "/nonexistent/jq-bad-args"},
)
target(
    "jq.orbax.layout",
    lambda directory="/nonexistent/jq-bad-args": jqorbax.layout(directory),
    directory={"int": 3, "missing": "/nonexistent/jq-bad-args"},
)

# ------------------------------------------------------------------------ jq.datasets

target(
    "jaxquant.app.datasets.stdlib_corpus",
    lambda val_every=10, max_files=30: jqdata.stdlib_corpus(val_every, max_files),
    val_every={**INT, "one": 1},
    max_files={"float": 2.5, "str": "3", "zero": 0, "neg": -1},
)
target(
    "jaxquant.app.datasets.stdlib_bytes",
    lambda seq=8, **kw: jqdata.stdlib_bytes(seq, **{"max_files": 30, "test_windows": 2, **kw}),
    seq={**but(INT, "huge"), "zero": 0},
    test_windows={"float": 2.5, "neg": -1, "str": "3"},
)
target(
    "jaxquant.app.datasets.digits",
    lambda n_train=None: jqdata.digits(n_train),
    n_train={"float": 2.5, "str": "3", "zero": 0, "neg": -1},
)

# ------------------------------------------------------------------------ expectations


def _raises_on_use(make_spec: Callable[[Any], Any], pattern: str) -> Callable[[Any], bool]:
    """A check that the returned object, once used, raises ValueError matching pattern."""

    def check(result: Any) -> bool:
        try:
            jq.quantize(X2, make_spec(result))
        except ValueError as e:
            return re.search(pattern, str(e)) is not None
        return False

    return check


# Documented results: "target/arg/label" -> a check of what the call returns.
DOCUMENTED: dict[str, Callable[[Any], bool]] = {
    # per_channel() is the layout form (axes follow the contraction); used on an array it
    # raises, naming the axes to give.
    "jq.per_channel/axes/empty": _raises_on_use(
        lambda g: jq.QuantSpec("int8", g), r"per_channel\(\) without axes follows"
    ),
    # A granularity does not know the rank or length of the arrays it will meet: an axis
    # or block size that no array has is refused by plan(), naming it, when first used.
    "jq.per_block/axis/huge": _raises_on_use(
        lambda g: jq.QuantSpec("int8", g), r"axis .* out of range"
    ),
    "jq.per_block/size/huge": _raises_on_use(
        lambda g: jq.QuantSpec("int8", g), r"block size .* does not divide"
    ),
    "jq.formats.mx_format/block_size/huge": _raises_on_use(
        jq.QuantSpec, r"block size .* does not divide"
    ),
    # "Replace every QArray in tree by its dequantized array": other leaves are kept.
    "jq.dequantize_tree/tree/str": lambda r: r == "abc",
    "jq.dequantize_tree/tree/none_leaf": lambda r: r == {"w": None},
    # "Leaves that are QArrays already are kept as they are".
    "jq.quantize_tree/tree/qarray_leaf": lambda r: r["w"] is QX,
    # "the sum over its array leaves": other leaves occupy nothing.
    "jq.optax.state_nbytes/state/str_leaf": lambda r: r == 0,
    "jq.optax.state_nbytes/state/object_leaf": lambda r: r == 0,
    # A QArray is a pytree of arrays: all_finite checks its values and scale.
    "jq.optax.all_finite/tree/qarray_leaf": lambda r: bool(r),
    # "None leaves are kept".
    "jq.optax.apply_updates_sr/params/none": lambda r: r is None,
    # nnx.Variable holds any value (flax's contract), QuantState included.
    "jq.flax.QuantState/value/str": lambda r: r == "x",
    "jq.rotations.HadamardRotation/signs/int": lambda r: r[0] == 12345,
    "jq.flax.OverwriteWithGradient/value/str": lambda r: r == "x",
    "jq.optax.OverwriteWithGradientState/inner_state/int": lambda r: r[0] == 12345,
    # Result records the library builds and returns: like optax's NamedTuple states they
    # hold what they are given and check nothing.
    **{
        f"jq.flax.{n}/first/int": (lambda r: r[0] == 12345)
        if n in ("Match", "Contraction", "LayerStatistics")
        else (lambda r: dataclasses.astuple(r)[0] == 12345)
        for n in (
            "Assignment",
            "CalibrationResult",
            "Contraction",
            "LayerSensitivity",
            "LayerStatistics",
            "Match",
            "Sensitivity",
            "Statistics",
        )
    },
}

# Cases that fail today because of code outside the argument-validation layer of
# QuantSpec, calibrations, granularities, format builders and scalings:
# "target/arg" -> ("label label...", why). Each must fail (strict), so a fix shows up here: delete
# its labels then.
WHY = {
    "dequantize_dtype": (
        "quantize.py: dequantize(q, dtype) passes dtype on unchecked (numpy's 'data type not "
        "understood')"
    ),
    "fake_quant_x": (
        "quantize.py _check_input: jnp.asarray's own error for None / strings, not naming x"
    ),
    "fake_quant_scale": (
        "quantize.py _check_scale: a scale that broadcasts the scale shape up ((3,) against "
        "(1,)) passes (need broadcast_shapes(a, want) == want); a str gets JAX's message"
    ),
    "fake_quant_with_x": (
        "quantize.py _check_input (via scaling update): jnp.asarray's own error, not naming x"
    ),
    "quantize_x": (
        "quantize.py _check_input: jnp.asarray's own error for None / strings, not naming x"
    ),
    "quantize_scale": (
        "quantize.py _check_scale: a scale that broadcasts the scale shape up ((3,) against "
        "(1,)) passes (need broadcast_shapes(a, want) == want); a str gets JAX's message"
    ),
    "quantize_with_x": (
        "quantize.py _check_input (via scaling update): jnp.asarray's own error, not naming x"
    ),
}

XFAIL_GROUPS: dict[str, tuple[str, str]] = {}
XFAIL = {f"{k}/{lab}": why for k, (labels, why) in XFAIL_GROUPS.items() for lab in labels.split()}


def _case_ids() -> list[str]:
    return [
        f"{n}/{a}/{lab}" for n, t in TARGETS.items() for a, vals in t.bad.items() for lab in vals
    ]


def _params():
    for cid in _case_ids():
        marks = [pytest.mark.xfail(strict=True, reason=XFAIL[cid])] if cid in XFAIL else []
        yield pytest.param(cid, id=cid, marks=marks)


def run_case(cid: str) -> tuple[str, str]:
    """("ok" | "bad", detail): whether case ``cid`` behaves as required."""
    name, arg, label = cid.rsplit("/", 2)
    t = TARGETS[name]
    value = t.bad[arg][label]
    try:
        result = t.call(**{arg: value})
    except (TypeError, ValueError) as e:
        if cid in DOCUMENTED:
            return "bad", f"documented result expected, raised {type(e).__name__}: {e}"
        pattern = t.aka.get(arg, rf"\b{re.escape(arg)}\b")
        if re.search(pattern, str(e)):
            return "ok", f"{type(e).__name__}: {e}"
        return "bad", f"{type(e).__name__} not naming {arg!r}: {e}"
    except Exception as e:  # any other exception is a failure to report
        return "bad", f"{type(e).__name__}: {e}"
    if cid in DOCUMENTED:
        if DOCUMENTED[cid](result):
            return "ok", "documented result"
        return "bad", f"documented check failed on {result!r:.200}"
    return "bad", f"accepted, returned {type(result).__name__} {result!r:.200}"


@pytest.mark.parametrize("cid", list(_params()))
def test_bad_argument(cid):
    status, detail = run_case(cid)
    assert status == "ok", f"{cid}: {detail}"


def _public_callables() -> set[str]:
    out = set()
    for prefix, mod in PUBLIC_MODULES.items():
        for sym in mod.__all__:
            obj = getattr(mod, sym)
            if inspect.ismodule(obj) or not callable(obj):
                continue
            out.add(f"{prefix}.{sym}")
    return out


def test_every_public_callable_has_a_target():
    """New public API must get a row in TARGETS (with its bad arguments)."""
    missing = sorted(_public_callables() - set(TARGETS))
    assert not missing, f"public callables without a bad-argument target: {missing}"
    stale = sorted(set(TARGETS) - _public_callables())
    assert not stale, f"targets that are no longer public: {stale}"
    for name, t in TARGETS.items():
        assert t.bad and all(t.bad.values()), f"{name} has no bad-argument cases"


def test_tables_name_real_cases():
    ids = set(_case_ids())
    assert not (set(XFAIL) - ids), sorted(set(XFAIL) - ids)
    assert not (set(DOCUMENTED) - ids), sorted(set(DOCUMENTED) - ids)


# ------------------------------------------------------------------------ good arguments
# The checks above must not refuse what was always valid, spelled in numpy or JAX.


def test_valid_arguments_in_numpy_and_jax_spellings_are_accepted():
    spec = jq.QuantSpec("int8", symmetric=np.bool_(True), saturate=np.True_, narrow_range=False)
    assert spec.symmetric is True and spec.saturate is True and spec.narrow_range is False
    assert jq.per_channel(np.int64(0), 2).axes == (0, 2) == jq.per_channel([0, 2]).axes
    assert type(jq.per_channel(np.int64(0)).axes[0]) is int
    assert jq.per_block(np.int32(-1), np.int64(32)) == jq.per_block(-1, 32)
    assert jq.fixed(np.float32(2.5)) == jq.fixed(jnp.float32(2.5)) == jq.fixed(2.5)
    assert jq.fixed([-1, 3]).amax == (-1.0, 3.0)
    assert jq.fixed((0.5, 0.5)).amax == (0.5, 0.5)  # asymmetric: the range is extended to 0
    assert jq.mean_std(3) == jq.mean_std(3.0) and jq.percentile(100).p == 100.0
    assert jq.kl(np.int64(8), 2) == jq.kl(8, 2)
    assert jq.mse(2, 1).min_ratio == 1.0


def test_static_arguments_under_jit_say_they_must_be_concrete():
    with pytest.raises(TypeError, match=r"fixed\(amax\).*concrete"):
        jax.jit(jq.fixed)(1.0)


@pytest.mark.parametrize("element", ["e4m3", "e5m2", "e2m3", "e3m2", "e2m1"])
def test_mx_format_accepts_every_ocp_element(element):
    fmt = jq.formats.mx_format(f"my_mx_{element}", element, 16)
    assert fmt.element == jq.formats.get(element) and fmt.block_size == 16
    ocp = jq.formats.get(
        {
            "e4m3": "mxfp8",
            "e5m2": "mxfp8_e5m2",
            "e2m3": "mxfp6",
            "e3m2": "mxfp6_e3m2",
            "e2m1": "mxfp4",
        }[element]
    )
    x = jnp.linspace(-3.0, 3.0, 64, dtype=jnp.float32)
    same = jq.fake_quant(x, jq.QuantSpec(dataclasses.replace(fmt, block_size=32)))
    np.testing.assert_array_equal(same, jq.fake_quant(x, jq.QuantSpec(ocp)))


def test_mx_format_refusal_lists_the_ocp_elements():
    # int8 is an OCP MX element (MXINT8); other integer widths are not.
    with pytest.raises(
        ValueError, match=r"int4 is not an OCP MX element.*e4m3.*e5m2.*e2m3.*e3m2.*e2m1.*int8"
    ):
        jq.formats.mx_format("mx_int4", jq.formats.get("int4"))


def test_float_format_wider_than_16_bits_is_built_not_refused():
    assert jq.formats.float_format(5, 12, nan_style="none").bits == 18
    assert jq.formats.float_format(8, 23).bits == 32
    with pytest.raises(ValueError, match=r"exp_bits must be in 1..8"):
        jq.formats.float_format(9, 3)
    with pytest.raises(ValueError, match=r"man_bits must be in 0..23"):
        jq.formats.float_format(8, 24)
    with pytest.raises(ValueError, match=r"nan_style must be 'ieee', 'fn', 'fnuz' or 'none'"):
        jq.formats.float_format(4, 3, nan_style="IEEE")


def test_quantspec_symmetric_string_is_refused_not_truthy():
    """The issue's example: symmetric="False" became True."""
    with pytest.raises(TypeError, match=r"QuantSpec.symmetric must be True or False, got 'False'"):
        jq.QuantSpec("uint8", calibration=jq.minmax(), symmetric="False")


if __name__ == "__main__":  # python tests/test_bad_arguments.py: every case's outcome
    import sys
    import time

    only_bad = "--bad" in sys.argv
    t0 = time.perf_counter()
    for cid in _case_ids():
        status, detail = run_case(cid)
        xf = cid in XFAIL
        if only_bad and status == "ok" and not xf:
            continue
        tag = {
            ("ok", False): "ok  ",
            ("bad", False): "BAD ",
            ("ok", True): "XPASS",
            ("bad", True): "xf  ",
        }
        print(f"{tag[status, xf]} {cid}: {detail[:230]}".replace("\n", " "))
    print(f"{len(_case_ids())} cases in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
