"""jaxquant.orbax save / restore (bit-exact, damage detected); QuantSpec <-> dict is
test_serialize.py's."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from flax.core import FrozenDict
from test_serialize import SPECS  # every kind of spec; the round trips are tested there

import jaxquant as jq
import jaxquant.orbax as jqo
from jaxquant._src.orbax import checkpoint as ckpt_impl
from jaxquant._src.serialize import spec_from_dict, spec_to_dict


def _is_q(x):
    return isinstance(x, jq.QArray)


def _bits(x) -> np.ndarray:
    """The raw bytes of an array (bit patterns, whatever the dtype)."""
    x = np.ascontiguousarray(np.asarray(x))
    return x.reshape(-1).view(np.uint8)


def assert_identical(got, want):
    """Same tree structure (QArray specs, shapes, dtypes included) and the same bits."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert np.dtype(g.dtype) == np.dtype(w.dtype) and g.shape == w.shape
        np.testing.assert_array_equal(_bits(g), _bits(w))


def _np_ramp(shape, lo=-3.0, hi=5.0, dtype=np.float32) -> np.ndarray:
    # Made on the host: eager jnp ops would compile a program per op and shape.
    n = int(np.prod(shape))
    x = np.linspace(lo, hi, n, dtype=np.float32) * np.cos(np.arange(n, dtype=np.float32))
    return x.reshape(shape).astype(dtype)


def _ramp(shape, lo=-3.0, hi=5.0, dtype=jnp.float32):
    return jnp.asarray(_np_ramp(shape, lo, hi, dtype))


# ---------------------------------------------------------------- bit-exact round trips

CASES = [
    ("int8 per-channel", jq.QuantSpec("int8", jq.per_channel(-1)), (64, 48)),
    ("int4 per-group", jq.QuantSpec("int4", jq.per_block(-1, 32)), (16, 64)),
    ("int3 odd row", jq.QuantSpec("int3", jq.per_channel(0)), (5, 7)),  # 21 bits per row
    ("nf4", jq.QuantSpec("nf4", jq.per_block(-1, 64)), (8, 128)),
    ("fp8 e4m3fn", jq.QuantSpec("fp8", jq.per_channel(-1)), (32, 32)),
    ("fp8 e5m2 no-saturate", jq.QuantSpec("e5m2", calibration=None, saturate=False), (9, 8)),
    ("fp4", jq.QuantSpec("fp4", jq.per_block(-1, 16)), (8, 32)),
    ("fp6 e2m3", jq.QuantSpec("fp6"), (4, 20)),
    ("fp6 e3m2", jq.QuantSpec("e3m2", jq.per_channel(0)), (4, 20)),
    ("mxfp4", jq.QuantSpec("mxfp4"), (8, 64)),
    ("mxfp8", jq.QuantSpec("mxfp8"), (4, 96)),
    ("mxfp6", jq.QuantSpec("mxfp6"), (2, 64)),
    (
        "uint8 asymmetric",
        jq.QuantSpec("uint8", jq.per_channel(0), jq.minmax(), symmetric=False),
        (6, 40),
    ),
    (
        "uint4 asymmetric",
        jq.QuantSpec("uint4", jq.per_block(-1, 8), jq.minmax(), symmetric=False),
        (3, 16),
    ),
    ("binary", jq.QuantSpec("binary", jq.per_channel(-1), jq.mean_abs()), (10, 12)),
    ("ternary", jq.QuantSpec("ternary", calibration=jq.twn()), (7, 9)),
    ("int8 bf16 scale", jq.QuantSpec("int8", jq.per_channel(-1), scale_format="bf16"), (16, 8)),
    ("int8 fp16 scale", jq.QuantSpec("int8", jq.per_channel(0), scale_format="fp16"), (16, 8)),
    ("int4 e8m0 scale", jq.QuantSpec("int4", jq.per_block(-1, 32), scale_format="e8m0"), (4, 64)),
    ("bf16 cast", jq.QuantSpec("bf16", calibration=None), (5, 3)),
    ("int8 scalar", jq.QuantSpec("int8"), ()),
]


def _tree_for(spec, shape, dtype=jnp.float32):
    x = _np_ramp(shape, dtype=dtype)
    if not spec.saturate:  # non-finite values stay Inf / NaN in the stored codes
        x[0, :3] = [np.inf, -np.inf, np.nan]
    x = jnp.asarray(x)
    nan_payloads = np.array([0x7FC00001, 0xFFFFFFFF, 0x3F800000, 0x80000000], np.uint32)
    return {
        "q": jq.quantize(x, spec),
        "float": {"bf16": _ramp((3, 5), dtype=jnp.bfloat16), "f32": _ramp((7,))},
        "int": jnp.arange(-4, 5, dtype=jnp.int32),
        "numpy": [nan_payloads.view(np.float32), np.arange(6, dtype=np.int16).reshape(2, 3)],
        "fp8": jnp.asarray(_np_ramp((4, 4), dtype=jnp.float8_e4m3fn)),
        "scalar": jnp.float32(2.5),
        "empty": jnp.zeros((0, 3), jnp.bfloat16),
        "none": None,
    }


@pytest.mark.parametrize("name, spec, shape", CASES, ids=[c[0] for c in CASES])
def test_round_trip_is_bit_exact(tmp_path, name, spec, shape):
    tree = _tree_for(spec, shape, jnp.bfloat16 if "scalar" in name else jnp.float32)
    jqo.save(tmp_path / "ckpt", tree)
    # Without a target: the same tree, None included.
    got = jqo.restore(tmp_path / "ckpt")
    assert_identical(got, tree)
    assert isinstance(got["numpy"][0], np.ndarray) and isinstance(got["int"], jax.Array)
    q = got["q"]
    assert q.spec == spec and q.shape == tuple(shape) and q.nbytes == tree["q"].nbytes
    np.testing.assert_array_equal(_bits(jq.dequantize(q)), _bits(jq.dequantize(tree["q"])))
    np.testing.assert_array_equal(_bits(jax.jit(jq.dequantize)(q)), _bits(tree["q"].dequantize()))
    # With an abstract target: the exact structure again, None included.
    assert_identical(jqo.restore(tmp_path / "ckpt", jax.eval_shape(lambda: tree)), tree)


def test_stored_dtypes_are_plain_and_of_the_same_width(tmp_path):
    tree = _tree_for(jq.QuantSpec("mxfp8"), (4, 64))
    jqo.save(tmp_path / "c", tree)
    leaves = {e["name"]: e for e in jqo.layout(tmp_path / "c")["leaves"]}
    want = {
        "q": {"values": ("float8_e4m3fn", "uint8"), "scale": ("float8_e8m0fnu", "uint8")},
        "float/bf16": {"array": ("bfloat16", "uint16")},
        "float/f32": {"array": ("float32", "float32")},
        "int": {"array": ("int32", "int32")},
        "fp8": {"array": ("float8_e4m3fn", "uint8")},
    }
    for name, fields in want.items():
        for field, dtypes in fields.items():
            a = leaves[name]["arrays"][field]
            assert (a["dtype"], a["stored_dtype"]) == dtypes
    assert leaves["q"]["arrays"]["zero_point"] is None
    assert leaves["empty"]["arrays"]["array"]["key"] is None  # zero-size: manifest only
    assert leaves["numpy/0"]["type"] == "numpy" and leaves["int"]["type"] == "jax"
    raw = _raw_arrays(tmp_path / "c")
    assert {np.dtype(x.dtype).name for x in raw.values()} <= {
        "uint8",
        "uint16",
        "float32",
        "int32",
        "int16",
    }


def _raw_arrays(directory: Path) -> dict[str, np.ndarray]:
    """The arrays as orbax stored them, read with orbax alone (no jaxquant)."""
    with ocp.StandardCheckpointer() as ck:
        tree = ck.restore(directory / "arrays")
    return {f"{g}.{f}": np.asarray(x) for g, fs in tree.items() for f, x in fs.items()}


@pytest.mark.slow
def test_size_report_matches_the_arrays_orbax_saved(tmp_path):
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(128)(x))
            x = nn.relu(nn.Dense(96)(x))
            return nn.Dense(10)(x)

    params = jax.jit(MLP().init)(jax.random.key(0), jnp.ones((1, 64)))
    policy = [
        (r".*Dense_0/kernel", jq.QuantSpec("int4", jq.per_block(0, 32))),
        (r".*Dense_1/kernel", jq.QuantSpec("int8", jq.per_channel(-1))),
        (
            r".*Dense_2/kernel",
            jq.QuantSpec("uint8", jq.per_channel(-1), jq.minmax(), symmetric=False),
        ),
    ]
    q = jq.quantize_tree(params, policy)
    jqo.save(tmp_path / "mlp", q)
    raw = _raw_arrays(tmp_path / "mlp")
    report = {leaf.path: leaf for leaf in jq.size_report(q).leaves}
    entries = jqo.layout(tmp_path / "mlp")["leaves"]
    assert [e["name"] for e in entries] == list(report)
    qleaves = dict(
        (jax.tree_util.keystr(p, simple=True, separator="/"), x)
        for p, x in jax.tree_util.tree_flatten_with_path(q, is_leaf=_is_q)[0]
    )

    def saved(entry, *fields):
        arrays = [entry["arrays"][f] for f in fields if entry["arrays"].get(f) is not None]
        return sum(raw[a["key"]].nbytes for a in arrays)

    for e in entries:
        leaf = report[e["name"]]
        if e["kind"] == "qarray":
            assert saved(e, "values") == leaf.value_bytes
            assert saved(e, "scale", "zero_point") == leaf.scale_bytes
            assert saved(e, "values", "scale", "zero_point") == qleaves[e["name"]].nbytes
        else:
            assert saved(e, "array") == leaf.value_bytes and leaf.scale_bytes == 0
    assert sum(x.nbytes for x in raw.values()) == jq.size_report(q).nbytes
    dense0 = report["params/Dense_0/kernel"]
    assert dense0.value_bytes == 64 * 128 // 2  # two int4 codes per byte on disk too
    assert_identical(jqo.restore(tmp_path / "mlp", jax.eval_shape(lambda: q)), q)


def test_flax_containers_with_a_target(tmp_path):
    frozen = FrozenDict(
        {"a": {"w": jq.quantize(_ramp((8, 32)), jq.QuantSpec("int4", jq.per_block(-1, 16)))}}
    )
    jqo.save(tmp_path / "frozen", frozen)
    got = jqo.restore(tmp_path / "frozen", frozen)
    assert isinstance(got, FrozenDict)
    assert_identical(got, frozen)
    assert type(jqo.restore(tmp_path / "frozen")) is dict  # no target: plain dicts

    state = nnx.state(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
    jqo.save(tmp_path / "nnx", state)
    got = jqo.restore(tmp_path / "nnx", state)
    assert isinstance(got, nnx.State)
    assert_identical(got, state)
    assert set(jqo.restore(tmp_path / "nnx")) == {"bias", "kernel"}


def test_restore_places_leaves_with_the_target_sharding(tmp_path):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("x",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    w = jq.quantize(_ramp((8, 64)), jq.QuantSpec("int4", jq.per_block(-1, 32)))
    tree = {"w": w, "b": _ramp((8,))}
    jqo.save(tmp_path / "c", tree)
    sharded = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rows)
    target = {"w": jax.tree.map(sharded, w), "b": sharded(tree["b"])}
    got = jqo.restore(tmp_path / "c", target)
    assert_identical(got, tree)
    assert got["w"].values.sharding == rows and got["w"].scale.sharding == rows
    assert got["b"].sharding == rows


EMPTIES = {
    "none": None,
    "tuple": (),
    "dict": {},
    "list": [],
    "nested empties": {"a": [(), {}, None, [[]]], "b": ({"c": ()},), "d": {"e": {"f": {}}}},
    "mixed": {
        "none": None,
        "t": (jnp.ones(2), None, (jnp.arange(3), ()), []),
        "l": [None, {"x": jnp.zeros((0, 2))}, ({},)],
        "q": (jq.quantize(_ramp((4, 32)), jq.QuantSpec("int4", jq.per_block(-1, 32))), None),
    },
    "int keys": {3: {"x": ()}, 5: jnp.ones(1), 7: None},
    "bare tuple of leaves": (jnp.ones(1), np.arange(2)),
}


@pytest.mark.parametrize("tree", EMPTIES.values(), ids=EMPTIES.keys())
def test_restore_without_a_target_keeps_every_container(tmp_path, tree):
    jqo.save(tmp_path / "c", tree)
    got = jqo.restore(tmp_path / "c")
    assert_identical(got, tree)  # the same treedef: None, (), {}, [] and tuples included


def test_restore_without_a_target_turns_other_containers_into_dicts(tmp_path):
    import optax

    state = optax.adam(1e-3).init({"w": jnp.ones(3)})  # (ScaleByAdamState, EmptyState())
    jqo.save(tmp_path / "c", state)
    got = jqo.restore(tmp_path / "c")
    assert isinstance(got, tuple) and got[1] == {}
    assert set(got[0]) == {"count", "mu", "nu"} and isinstance(got[0]["mu"], dict)
    assert_identical(jqo.restore(tmp_path / "c", state), state)


def test_empty_and_zero_size_trees(tmp_path):
    jqo.save(tmp_path / "empty", {})
    assert jqo.restore(tmp_path / "empty") == {}
    tree = {"z": jnp.zeros((0, 4), jnp.bfloat16), "l": [jnp.zeros((3, 0), jnp.int8)]}
    jqo.save(tmp_path / "zero", tree)
    assert not (tmp_path / "zero" / "arrays").exists()
    assert_identical(jqo.restore(tmp_path / "zero"), tree)
    jqo.save(tmp_path / "leaf", jnp.arange(3))  # a bare array is a tree too
    assert_identical(jqo.restore(tmp_path / "leaf"), jnp.arange(3))


def test_save_is_quiet(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        jqo.save(tmp_path / "c", {"a": jnp.ones(3)})
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.slow
def test_core_jaxquant_does_not_import_orbax():
    code = "import sys, jaxquant; assert 'orbax' not in sys.modules; import jaxquant.orbax"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_the_manifest_records_the_package_version_from_one_home(tmp_path):
    """_src never imports the public package: the version lives in _src/version.py, equal
    to pyproject's, and the manifest records it."""
    import tomllib

    from jaxquant._src import version

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert jq.__version__ == version.__version__ == pyproject["project"]["version"]
    jqo.save(tmp_path / "c", {"a": jnp.ones(2)})
    assert jqo.layout(tmp_path / "c")["jaxquant_version"] == jq.__version__
    source = Path(ckpt_impl.__file__).read_text()
    assert "import jaxquant\n" not in source and "jaxquant.__version__" not in source


# ------------------------------------------------------------- a quantized NNX model


class _QuantNet(nnx.Module):
    def __init__(self, seed: int) -> None:
        rngs = nnx.Rngs(seed)
        self.delayed = nnx.Linear(12, 16, rngs=rngs)
        self.lsq = nnx.Linear(16, 16, rngs=rngs)
        self.sr = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.sr(jax.nn.relu(self.lsq(jax.nn.relu(self.delayed(x)))))


def _quantized_net(seed: int):
    from jaxquant.flax import Rule, quantize_model

    int8 = jq.QuantSpec("int8")
    rules = [
        Rule("delayed", weight=int8, act=int8, scaling="delayed", history_len=4),
        Rule("lsq", weight=int8, act=int8, ste="lsq"),
        Rule("sr", weight=jq.QuantSpec("int4", rounding="stochastic")),
    ]
    net = nnx.jit(lambda: _QuantNet(seed))()  # built in one compiled call, not op by op
    return quantize_model(net, rules, rngs=nnx.Rngs(quant=100 + seed))


@pytest.mark.slow
@pytest.mark.parametrize("with_target", [False, True])
def test_a_quantized_nnx_model_round_trips_into_nnx_update_then_runs(tmp_path, with_target):
    """Issue 12: nnx.update(model, restore(path)) then a call, for a quantized model whose
    state holds QuantState (amax histories, LSQ bases), nnx.Param LSQ steps and the
    'quant' stream's PRNG key and count."""
    from jaxquant.flax import QuantState

    model = _quantized_net(0)
    x = jax.random.normal(jax.random.key(1), (8, 12))
    step = nnx.jit(lambda m, x: m(x))
    for i in range(3):  # training calls: histories, bases and the key count move
        step(model, x * (1.0 + i))
    assert int(model.delayed.dot_general.lhs_count[...]) == 3
    assert float(model.lsq.dot_general.lhs_step_base[...]) > 0
    jqo.save(tmp_path / "c", nnx.state(model))
    other = _quantized_net(1)
    if with_target:
        restored = jqo.restore(tmp_path / "c", nnx.state(other))
        assert isinstance(restored["delayed"]["dot_general"]["lhs_count"], QuantState)
    else:
        restored = jqo.restore(tmp_path / "c")
        assert isinstance(restored["delayed"]["dot_general"]["lhs_count"], jax.Array)
    nnx.update(other, restored)
    got, want = nnx.state(other), nnx.state(model)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(a, b)
    # The next training call of both draws the same key and uses the same delayed scales.
    np.testing.assert_array_equal(step(other, x), step(model, x))
    assert int(other.delayed.dot_general.lhs_count[...]) == 4
    other.eval()
    model.eval()
    np.testing.assert_array_equal(step(other, x), step(model, x))  # jitted: one compile


# ------------------------------------------------------------------ overwrite & crashes


def test_refuses_to_overwrite_without_force(tmp_path):
    path = tmp_path / "c"
    jqo.save(path, {"a": jnp.ones(3)})
    with pytest.raises(FileExistsError, match="force=True"):
        jqo.save(path, {"a": jnp.zeros(3)})
    assert_identical(jqo.restore(path), {"a": jnp.ones(3)})
    jqo.save(path, {"b": jnp.zeros(2)}, force=True)
    assert_identical(jqo.restore(path), {"b": jnp.zeros(2)})
    assert sorted(os.listdir(tmp_path)) == ["c"]  # no temporary or old copies left


def test_force_only_replaces_checkpoints_or_empty_directories(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"neither a jaxquant checkpoint.*refusing"):
        jqo.save(tmp_path / "mine", {"a": jnp.ones(3)}, force=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    jqo.save(tmp_path / "empty", {"a": jnp.ones(3)}, force=True)
    assert_identical(jqo.restore(tmp_path / "empty"), {"a": jnp.ones(3)})


def test_a_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c"
    jqo.save(path, {"a": jnp.ones(3)})

    def crash(root):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt_impl, "_file_digests", crash)  # after orbax wrote, before swap
    with pytest.raises(RuntimeError, match="disk full"):
        jqo.save(path, {"a": jnp.zeros(3)}, force=True)
    assert sorted(os.listdir(tmp_path)) == ["c"]
    assert_identical(jqo.restore(path), {"a": jnp.ones(3)})


def test_an_interrupted_swap_is_explained(tmp_path):
    path = tmp_path / "c"
    jqo.save(path, {"a": jnp.ones(3)})
    os.rename(path, tmp_path / ".c.old-1234abcd")  # where save(force=True) parks it
    with pytest.raises(ValueError, match=r"interrupted.*\.c\.old-1234abcd; rename it"):
        jqo.restore(path)


def _kill_a_save(parent: Path, name: str) -> Path:
    """The temporary folder a save of ``parent / name`` leaves when its process dies while
    writing: a complete-looking checkpoint there, and the lock file, no longer held."""
    tmp, fd = ckpt_impl._start_temporary(parent / name)
    jqo.save(parent / "scratch", {"a": jnp.ones(3)})
    for f in os.listdir(parent / "scratch"):
        os.rename(parent / "scratch" / f, tmp / f)
    os.rmdir(parent / "scratch")
    os.close(fd)  # what the kernel does to a killed process's descriptors (and flocks)
    return tmp


def test_a_killed_save_is_no_checkpoint_and_the_next_save_cleans_it(tmp_path):
    dead = _kill_a_save(tmp_path, "c")
    live, live_fd = ckpt_impl._start_temporary(tmp_path / "d")  # a save still running
    old = tmp_path / ".e.tmp-1234abcd"  # a jaxquant without locks left it: kept
    old.mkdir()
    assert dead.is_dir() and (tmp_path / f"{dead.name}.lock").is_file()
    with pytest.raises(ValueError, match=r"no checkpoint at .*/c .*did not finish"):
        jqo.restore(tmp_path / "c")
    with pytest.raises(ValueError, match=r"temporary folder of a save that did not finish"):
        jqo.restore(dead)
    with pytest.raises(ValueError, match=r"temporary folder"):
        jqo.layout(dead)

    jqo.save(tmp_path / "f", {"a": jnp.ones(3)})  # any save to the same parent
    left = sorted(os.listdir(tmp_path))
    assert left == sorted([live.name, f"{live.name}.lock", old.name, "f"])
    ckpt_impl._end_temporary(live, live_fd)  # what a finished save does
    os.rmdir(live)
    jqo.save(tmp_path / "c", {"b": jnp.zeros(2)})
    assert sorted(os.listdir(tmp_path)) == sorted([old.name, "c", "f"])
    assert_identical(jqo.restore(tmp_path / "c"), {"b": jnp.zeros(2)})


@pytest.mark.slow
def test_a_sigkilled_save_is_cleaned_by_the_next_one(tmp_path):
    """A real SIGKILL in the middle of a save (after orbax wrote the arrays)."""
    code = f"""
import os, signal, jax.numpy as jnp, jaxquant.orbax as jqo
from jaxquant._src.orbax import checkpoint as impl
impl._file_digests = lambda root: os.kill(os.getpid(), signal.SIGKILL)
jqo.save({str(tmp_path / "c")!r}, {{"a": jnp.ones(3)}})
"""
    run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1])
    assert run.returncode == -9
    (tmp,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert tmp.name.startswith(".c.tmp-") and (tmp / "arrays").is_dir()
    with pytest.raises(ValueError, match=r"no checkpoint at .*did not finish"):
        jqo.restore(tmp_path / "c")
    jqo.save(tmp_path / "c", {"a": jnp.zeros(3)})
    assert os.listdir(tmp_path) == ["c"]
    assert_identical(jqo.restore(tmp_path / "c"), {"a": jnp.zeros(3)})


def test_save_rejects_what_it_cannot_store(tmp_path):
    with pytest.raises(TypeError, match=r"'a/b'.*float.*jnp.asarray"):
        jqo.save(tmp_path / "c", {"a": {"b": 1.0}})
    with pytest.raises(TypeError, match=r"'x'.*abstract"):
        jqo.save(tmp_path / "c", {"x": jax.ShapeDtypeStruct((2,), jnp.float32)})

    @jax.jit
    def under_jit(x):
        jqo.save(tmp_path / "c", {"x": x})
        return x

    with pytest.raises(TypeError, match=r"'x'.*abstract.*jax.jit"):
        under_jit(jnp.ones(2))
    assert os.listdir(tmp_path) == []  # nothing written, no temporary left
    # PRNG keys are stored (key data + impl): nnx.state(model) holds them (Dropout, Rngs).
    jqo.save(tmp_path / "k", {"k": jax.random.key(0)})
    assert jqo.restore(tmp_path / "k")["k"].dtype == jax.random.key(0).dtype


# ------------------------------------------------------------------------ damage & errors


@pytest.fixture
def saved(tmp_path):
    """A checkpoint with a packed QArray leaf 'model/w' (leaf 1) and a float leaf."""
    tree = {
        "model": {
            "b": _ramp((32,)),
            "w": jq.quantize(_ramp((64, 64)), jq.QuantSpec("int4", jq.per_block(-1, 32))),
        }
    }
    jqo.save(tmp_path / "c", tree)
    return tmp_path / "c", tree


def _chunk(directory: Path, key: str) -> Path:
    files = [f for f in jqo.layout(directory)["files"] if f.startswith(f"arrays/{key}/")]
    (chunk,) = [f for f in files if not f.endswith(".zarray")]
    return directory / chunk


@pytest.mark.parametrize(
    "damage, match",
    [
        ("flip", "corrupted"),
        ("truncate", r"\d+ bytes instead of \d+ \(truncated"),
        ("delete", "missing"),
    ],
)
def test_damaged_array_files_raise_naming_the_leaf(saved, damage, match):
    path, _ = saved
    chunk = _chunk(path, "leaf_1.values")
    data = bytearray(chunk.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x10
        chunk.write_bytes(bytes(data))
    elif damage == "truncate":
        chunk.write_bytes(bytes(data[: len(data) - 7]))
    else:
        chunk.unlink()
    with pytest.raises(ValueError, match=match + r".*leaf 'model/w' \(values\).*damaged"):
        jqo.restore(path)


def test_damaged_orbax_metadata_raises(saved):
    path, _ = saved
    meta = path / "arrays" / "_METADATA"
    meta.write_bytes(meta.read_bytes()[:-1] + b" ")
    with pytest.raises(ValueError, match=r"_METADATA is corrupted.*orbax's metadata"):
        jqo.restore(path)


def _seal(manifest: dict) -> str:
    """manifest_sha256 as jaxquant.orbax documents it (written independently here)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _edit_manifest(path: Path, edit, *, reseal: bool) -> None:
    """Edit the manifest; with ``reseal``, as a buggy writer would: checksum recomputed."""
    manifest = json.loads((path / "jaxquant.json").read_text())
    edit(manifest)
    if reseal:
        manifest["manifest_sha256"] = _seal(manifest)
    (path / "jaxquant.json").write_text(json.dumps(manifest, indent=1))


def test_the_manifest_checksum_is_documented_canonical_json(saved):
    path, _ = saved
    manifest = jqo.layout(path)
    assert manifest["manifest_sha256"] == _seal(manifest)
    assert "manifest_sha256" in (jqo.__doc__ or "") and "sort_keys" in (jqo.__doc__ or "")


def test_array_checksums_catch_what_the_file_check_cannot(saved):
    """Bytes that differ from what was saved once read back (e.g. written by a buggy
    copy that also rewrote the file digests): the per-array sha256 catches them."""
    path, _ = saved
    scale = lambda m: m["leaves"][1]["arrays"]["scale"].update(sha256="0" * 64)
    _edit_manifest(path, scale, reseal=True)
    with pytest.raises(
        ValueError, match=rf"leaf 'model/w' \(scale\).*another checksum.*{path}.*damaged"
    ):
        jqo.restore(path)


BAD_MANIFESTS = [
    (lambda m: m.update(version=2), r"format version 2.*reads version 1"),
    (lambda m: m.update(format="other"), "not a jaxquant.orbax manifest"),
    (
        lambda m: m["leaves"][1].pop("spec"),
        r"malformed at leaf 1 \('model/w'\): KeyError: 'spec'",
    ),
    (lambda m: m["leaves"][1].update(dtype="float99"), "malformed.*float99"),
    (lambda m: m["leaves"][1]["spec"].update(symmetric=1), "malformed.*symmetric"),
    (lambda m: m["leaves"][1].update(shape=[64, 32]), "malformed.*scale shape"),
    (
        lambda m: m["structure"]["dict"][0][1]["dict"].reverse(),
        r"malformed: its structure.*leaf 1 where leaf 0 belongs",
    ),
    (lambda m: m["structure"]["dict"].append([[1], None]), r"malformed: its structure"),
    (lambda m: m.update(structure={"set": []}), r"malformed: its structure.*'set'"),
]


@pytest.mark.parametrize("edit, match", BAD_MANIFESTS)
def test_bad_manifests_with_a_valid_checksum(saved, edit, match):
    """What a buggy writer could produce (its checksum recomputed): refused as malformed."""
    path, _ = saved
    _edit_manifest(path, edit, reseal=True)
    with pytest.raises(ValueError, match=match):
        jqo.restore(path)


@pytest.mark.parametrize("edit, match", BAD_MANIFESTS)
def test_bad_manifests_fail_their_checksum(saved, edit, match):
    path, _ = saved
    _edit_manifest(path, edit, reseal=False)
    if "version" in match or "not a" in match:  # reported as such, damage suspected
        match = r"or it is damaged: its checksum does not match"
    else:
        match = r"damaged: it does not match its checksum"
    with pytest.raises(ValueError, match=rf"{path}.*{match}"):
        jqo.restore(path)


@pytest.fixture
def rich(tmp_path):
    """A checkpoint with two same-shape float leaves ('a', 'b'), an int4 QArray ('w'), an
    asymmetric uint8 QArray ('u'), numpy and bf16 leaves, and empty containers."""
    tree = {
        "a": _ramp((32,)),
        "b": _ramp((32,), lo=1.0),
        "e": {"none": None, "tuple": (), "list": [], "dict": {}},
        "n": np.arange(6, dtype=np.int16).reshape(2, 3),
        "t": (_ramp((3, 5), dtype=jnp.bfloat16), None),
        "u": jq.quantize(
            _ramp((6, 40)), jq.QuantSpec("uint8", jq.per_channel(0), jq.minmax(), symmetric=False)
        ),
        "w": jq.quantize(_ramp((64, 64)), jq.QuantSpec("int4", jq.per_block(-1, 32))),
    }
    jqo.save(tmp_path / "c", tree)
    return tmp_path / "c", tree


def _leaf(m: dict, name: str) -> dict:
    (entry,) = [e for e in m["leaves"] if e["name"] == name]
    return entry


def _swap_arrays(m, x="a", y="b"):
    ex, ey = _leaf(m, x), _leaf(m, y)
    ex["arrays"], ey["arrays"] = ey["arrays"], ex["arrays"]


def _set_spec(name, **fields):
    return lambda m: _leaf(m, name)["spec"].update(fields)


def _int8(m):
    _leaf(m, "w")["spec"]["format"] = spec_to_dict(jq.QuantSpec("int8"))["format"]


# (edit, what the error says when the manifest is resealed; None: a consistent edit that
# only the checksum can catch)
EDITS = {
    "swap two leaves' arrays": (_swap_arrays, r"leaf \d+ \('a'\).*key 'leaf_\d+.array'"),
    "swap values and scale": (
        lambda m: _leaf(m, "w")["arrays"].update(
            values=_leaf(m, "w")["arrays"]["scale"], scale=_leaf(m, "w")["arrays"]["values"]
        ),
        r"\('w'\).*(key|scale shape)",
    ),
    "spec format int4 -> int8": (_int8, r"\('w'\).*values is \(64, 32\) uint8.*\(64, 64\) int8"),
    "spec format int4 -> uint4": (
        lambda m: _leaf(m, "w")["spec"]["format"].update(name="uint4", signed=False),
        None,
    ),
    "spec block size": (
        lambda m: _leaf(m, "w")["spec"]["granularity"].update(size=16),
        r"\('w'\).*scale shape",
    ),
    "spec calibration": (_set_spec("w", calibration={"type": "minmax"}), None),
    "spec symmetric": (_set_spec("u", symmetric=True), r"\('u'\).*zero_point"),
    "array shape": (lambda m: _leaf(m, "a").update(shape=[2, 16]), r"\('a'\).*\(2, 16\)"),
    "array dtype": (lambda m: _leaf(m, "a").update(dtype="int32"), r"\('a'\).*int32"),
    "numpy type": (lambda m: _leaf(m, "n").update(type="jax"), None),
    "qarray shape": (lambda m: _leaf(m, "w").update(shape=[32, 64]), r"\('w'\).*\(32, "),
    "qarray dtype": (lambda m: _leaf(m, "w").update(dtype="bfloat16"), None),
    "a leaf's path": (lambda m: _leaf(m, "b")["path"][0].__setitem__(1, "c"), "structure"),
    "an empty container": (
        lambda m: m["structure"]["dict"][2][1]["dict"][3].__setitem__(1, None),
        None,
    ),
}


@pytest.mark.parametrize("edit, tied", EDITS.values(), ids=EDITS.keys())
def test_manifest_edits_raise(rich, edit, tied):
    """Every edit of a spec, shape, dtype or array entry fails the manifest's checksum;
    those that make the arrays disagree with their leaf also fail when it is resealed."""
    path, tree = rich
    original = (path / "jaxquant.json").read_bytes()
    _edit_manifest(path, edit, reseal=False)
    assert (path / "jaxquant.json").read_bytes() != original
    with pytest.raises(ValueError, match=rf"{path}.*damaged: it does not match its checksum"):
        jqo.restore(path)
    with pytest.raises(ValueError, match="does not match its checksum"):
        jqo.layout(path)
    (path / "jaxquant.json").write_bytes(original)
    _edit_manifest(path, edit, reseal=True)
    if tied is not None:
        with pytest.raises(ValueError, match=rf"{path}.*malformed.*{tied}"):
            jqo.restore(path)
    (path / "jaxquant.json").write_bytes(original)
    assert_identical(jqo.restore(path), tree)


def test_random_bit_flips_in_the_manifest_all_raise(rich):
    """1,500 single-bit flips (seeded) anywhere in the manifest: each raises a ValueError
    naming the checkpoint, or restores exactly what was saved. (Before manifests had a
    checksum, an audit found 15 of 1,500 flips restoring other values without an error.)"""
    path, tree = rich
    manifest = path / "jaxquant.json"
    original = manifest.read_bytes()
    rng = np.random.default_rng(11)
    raised = 0
    for bit in rng.integers(0, 8 * len(original), size=1500):
        data = bytearray(original)
        data[bit // 8] ^= 1 << (bit % 8)
        manifest.write_bytes(bytes(data))
        try:
            got = jqo.restore(path)
        except ValueError as e:
            assert str(path) in str(e), str(e)
            raised += 1
        else:
            assert json.loads(bytes(data)) == json.loads(original), f"bit {bit}: no error"
            assert_identical(got, tree)
    # The canonical JSON is sealed, and the file holds no byte whose flip keeps its meaning.
    assert raised == 1500
    manifest.write_bytes(original)
    assert_identical(jqo.restore(path), tree)


def test_old_checkpoints_without_a_checksum_restore_with_a_warning(rich):
    path, tree = rich

    def unseal(m):
        del m["manifest_sha256"], m["structure"]

    _edit_manifest(path, unseal, reseal=False)
    with pytest.warns(UserWarning, match=r"no checksum.*cannot be detected.*Save it again"):
        got = jqo.restore(path)
    # As then: without a target, containers holding no arrays are dropped.
    want = {k: v for k, v in tree.items() if k != "e"}
    assert_identical(got, {**want, "t": [tree["t"][0]]})
    with pytest.warns(UserWarning, match="no checksum"):
        assert_identical(jqo.restore(path, tree), tree)
    with pytest.warns(UserWarning, match="no checksum"):
        jqo.save(path, jqo.restore(path, tree), force=True)  # as the warning says
    assert_identical(jqo.restore(path), tree)  # sealed again, no warning

    # Damage that removes the checksum's own name is not taken for an old checkpoint.
    _edit_manifest(path, lambda m: m.update(manifest_sha257=m.pop("manifest_sha256")), reseal=False)
    with pytest.raises(ValueError, match=r"damaged: it has no 'manifest_sha256'.*sha257"):
        jqo.restore(path)


@pytest.mark.slow
def test_the_qarray_layout_restore_expects_is_what_quantize_makes():
    """The shapes and dtypes restore expects of a QArray's arrays (from its spec and shape)
    are those quantize produces, for every spec here: valid checkpoints always restore."""
    for spec in SPECS:
        for shape in [(64, 64)]:
            try:
                spec.granularity.plan(shape)
            except ValueError:  # e.g. per_channel(0, 2) of a matrix
                continue
            key = jax.random.key(0) if spec.rounding == "stochastic" else None
            x = jax.ShapeDtypeStruct(shape, jnp.float32)
            q = jax.eval_shape(lambda x, spec=spec, key=key: jq.quantize(x, spec, key=key), x)
            want = {
                f: (tuple(getattr(q, f).shape), np.dtype(getattr(q, f).dtype))
                for f in ("values", "scale", "tensor_scale")
                if getattr(q, f) is not None
            }
            assert ckpt_impl._qarray_arrays(spec, shape) == want, (spec, shape)


def test_missing_directory_and_manifest(tmp_path, saved):
    with pytest.raises(ValueError, match=r"no checkpoint at .*nowhere"):
        jqo.restore(tmp_path / "nowhere")
    path, _ = saved
    (path / "jaxquant.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"cannot read .*jaxquant.json.*damaged"):
        jqo.restore(path)
    (path / "jaxquant.json").unlink()
    with pytest.raises(ValueError, match=r"jaxquant.json is missing.*not a checkpoint"):
        jqo.restore(path)


def test_target_mismatches_name_the_first_differing_path(saved):
    path, tree = saved
    w, b = tree["model"]["w"], tree["model"]["b"]
    with pytest.raises(
        ValueError, match=r"leaf 1: the target has 'model/x', the checkpoint has 'model/w'"
    ):
        jqo.restore(path, {"model": {"b": b, "x": w}})
    with pytest.raises(ValueError, match=r"leaf 2: the target has 'z', the checkpoint has nothing"):
        jqo.restore(path, {"model": {"b": b, "w": w}, "z": b})
    with pytest.raises(ValueError, match=r"leaf 1: the target has nothing"):
        jqo.restore(path, {"model": {"b": b}})
    int8 = jq.quantize(_ramp((64, 64)), jq.QuantSpec("int8"))
    with pytest.raises(ValueError, match=r"'model/w'.*holds a QArray.*int4.*target has .*int8"):
        jqo.restore(path, {"model": {"b": b, "w": int8}})
    with pytest.raises(ValueError, match=r"'model/w'.*holds a QArray.*target has a ArrayImpl"):
        jqo.restore(path, {"model": {"b": b, "w": b}})
    with pytest.raises(
        ValueError, match=r"'model/b'.*holds an array \(32,\) float32.*\(32,\) bfloat16"
    ):
        jqo.restore(path, {"model": {"b": b.astype(jnp.bfloat16), "w": w}})
    assert_identical(jqo.restore(path, tree), tree)


def test_layout_is_the_manifest(saved):
    path, _ = saved
    m = jqo.layout(path)
    assert m["format"] == "jaxquant.orbax" and m["version"] == 1 and m["checksum"] == "sha256"
    assert m["jaxquant_version"] == jq.__version__
    assert [e["name"] for e in m["leaves"]] == ["model/b", "model/w"]
    w = m["leaves"][1]
    assert w["path"] == [["key", "model"], ["key", "w"]] and w["shape"] == [64, 64]
    assert spec_from_dict(w["spec"]) == jq.QuantSpec("int4", jq.per_block(-1, 32))
    assert w["arrays"]["values"]["shape"] == [64, 32]  # packed: 64 codes -> 32 bytes
    assert w["arrays"]["scale"]["shape"] == [64, 2, 1]
    for rel, info in m["files"].items():
        assert (path / rel).stat().st_size == info["size"]
    assert all(rel.startswith("arrays/") for rel in m["files"])


def test_a_loss_scaled_bf16_optimizer_state_restores_into_its_init_state(tmp_path):
    """dynamic_loss_scale used to turn adam's bf16 moments float32 after one step, so a
    restore with ``opt.init(params)`` as the target refused the checkpoint."""
    import optax

    import jaxquant.optax as jq_optax

    params = {"w": _ramp((4, 8), dtype=jnp.bfloat16)}
    opt = jq_optax.dynamic_loss_scale(optax.adam(1e-2), initial_scale=4.0)
    state = opt.init(params)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes f32 gradients, bf16 moments
        for _ in range(2):
            _, state = jax.jit(opt.update)(jax.tree.map(jnp.ones_like, params), state, params)
    jqo.save(tmp_path / "c", state)
    assert_identical(jqo.restore(tmp_path / "c", opt.init(params)), state)


def test_directory_and_force_are_checked_before_anything_is_written(tmp_path):
    """force='False' was truthy (it replaced the checkpoint); an int path got os.fspath's
    message, not one naming directory."""
    tree = {"w": jnp.arange(4.0)}
    path = tmp_path / "ckpt"
    jqo.save(path, tree)  # a pathlib.Path is a path
    for force in ("False", 1, None):
        with pytest.raises(TypeError, match=r"save: force must be True or False"):
            jqo.save(path, {"w": jnp.zeros(4)}, force=force)
    np.testing.assert_array_equal(jqo.restore(str(path))["w"], tree["w"])  # untouched
    jqo.save(path, {"w": jnp.zeros(4)}, force=np.True_)
    np.testing.assert_array_equal(jqo.restore(path)["w"], np.zeros(4))
    for fn, args in ((jqo.save, (tree,)), (jqo.restore, ()), (jqo.layout, ())):
        with pytest.raises(TypeError, match=rf"jq.orbax.{fn.__name__}: directory must be a path"):
            fn(3, *args)
    with pytest.raises(ValueError, match=r"jq.orbax.save: directory must be a non-empty str"):
        jqo.save("", tree)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("fmt", ["nvfp4", "mxint8"])
def test_two_level_and_mxint8_formats_round_trip(tmp_path, fmt):
    """NVFP4's float32 per-tensor scale is saved and restored with its block scales (it was
    dropped before: restore succeeded, dequantize failed); MXINT8 like every MX format."""
    x = jax.random.normal(jax.random.key(0), (4, 64), jnp.float32) * 3.0
    q = jq.quantize(x, jq.QuantSpec(fmt))
    jqo.save(tmp_path / "c", {"w": q})
    back = jqo.restore(tmp_path / "c")["w"]
    assert (back.tensor_scale is None) == (q.tensor_scale is None)
    for f in ("values", "scale", "tensor_scale"):
        a, b = getattr(q, f), getattr(back, f)
        if a is not None:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(jq.dequantize(back)), np.asarray(jq.dequantize(q)))
    manifest = json.loads((tmp_path / "c" / "jaxquant.json").read_text())
    fields = next(e for e in manifest["leaves"] if e["kind"] == "qarray")["arrays"]
    assert ("tensor_scale" in fields) == (fmt == "nvfp4")
