"""Implementation of :mod:`jaxquant.orbax`, whose docstring specifies the on-disk layout.

``save`` flattens the tree (QArrays as leaves), turns every array into a host ``numpy``
array in a dtype any zarr reader knows (ml_dtypes types bitcast to same-width unsigned
ints), writes them as one orbax ``StandardCheckpointer`` checkpoint and describes the rest
(paths, specs, shapes, dtypes, checksums, the container structure) in a JSON manifest
sealed by its own sha256. ``restore`` checks the manifest's checksum, then that every
array entry belongs to its leaf (key, shape and dtype agree with the leaf's spec, shape
and dtype), then every file before orbax reads a byte, then every array after, so a
damaged checkpoint raises a ValueError naming the path and the leaf instead of returning
wrong values.

A checkpoint path may be a URI on object storage (``gs://bucket/ckpt``, ``s3://``...),
read and written through ``etils.epath`` (orbax's own path library). Object storage has
no rename and no ``flock``, so there a save writes in place, its manifest last: until the
manifest is uploaded the directory is not a checkpoint, and ``restore`` refuses it
(:func:`_save_in_place`).

A save writes into a hidden ``.<name>.tmp-<id>`` folder beside the checkpoint and holds
an exclusive ``flock`` on ``.<name>.tmp-<id>.lock`` while it runs. The kernel drops the
lock when the writer dies however it dies (SIGKILL included), so the next save to the same
parent removes the folders whose lock it can take: those of dead writers, never a running
save's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import sys
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import jax
import ml_dtypes
import numpy as np

from jaxquant._src.checks import check_bool, describe
from jaxquant._src.extras import missing_extra
from jaxquant._src.qarray import QArray, packed_length
from jaxquant._src.serialize import spec_from_dict, spec_to_dict
from jaxquant._src.spec import QuantSpec
from jaxquant._src.types import KeyPath, PyTree
from jaxquant._src.version import __version__

if TYPE_CHECKING:  # imported when a URI is given (_directory)
    from etils import epath

# Where a checkpoint is: a local pathlib.Path, or an etils.epath.Path for a URI (gs://...).
# Both have pathlib's interface (/, name, parent, exists, is_dir, open, read_bytes...);
# etils ships no type information, so mypy sees the second as Any.
CkptPath: TypeAlias = "Path | epath.Path"
# A manifest's description of one leaf, and of one of its arrays (see jaxquant.orbax)
Entry: TypeAlias = dict[str, Any]

try:  # an extra: `import jaxquant` works without it, `jaxquant.orbax` says how to get it
    import orbax.checkpoint as ocp
except ImportError as err:
    raise missing_extra("checkpoint", "jaxquant.orbax") from err

try:
    import fcntl
except ImportError:  # not POSIX: no locks, so temporaries of killed saves are never cleaned
    fcntl = None  # type: ignore[assignment]

FORMAT = "jaxquant.orbax"
VERSION = 1
MANIFEST = "jaxquant.json"
ARRAYS = "arrays"
SEAL = "manifest_sha256"  # the manifest's own checksum, over its canonical JSON

# A manifest without SEAL was written before manifests were sealed (and had no
# "structure"); it must have exactly these keys, so that damage to SEAL's own name (which
# also removes it) is not taken for an old checkpoint.
_UNSEALED_KEYS = frozenset({"format", "version", "jaxquant_version", "checksum", "files", "leaves"})
_TMP_DIR = re.compile(r"\..+\.tmp-[0-9a-f]+")
_TMP_LOCK = re.compile(r"(\..+\.tmp-[0-9a-f]+)\.lock")

# Dtypes every zarr reader knows; anything else (ml_dtypes) is bitcast to uint<width>.
_NATIVE = frozenset(
    np.dtype(t)
    for t in (
        *(np.bool_, np.int8, np.int16, np.int32, np.int64),
        *(np.uint8, np.uint16, np.uint32, np.uint64),
        *(np.float16, np.float32, np.float64, np.complex64, np.complex128),
    )
)
_UINT: dict[int, np.dtype] = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16), 4: np.dtype(np.uint32)}
_UINT[8] = np.dtype(np.uint64)
_PATH_KEYS = (
    (jax.tree_util.DictKey, "key", "key"),
    (jax.tree_util.SequenceKey, "index", "idx"),
    (jax.tree_util.GetAttrKey, "attr", "name"),
    (jax.tree_util.FlattenedIndexKey, "flat", "key"),
)
_QARRAY_FIELDS = ("values", "scale", "zero_point", "tensor_scale")
_VALUE = jax.tree_util.GetAttrKey("value")  # where an nnx.Variable keeps its value


def _is_qarray(x: Any) -> bool:
    return isinstance(x, QArray)


def _is_key_dtype(dtype: Any) -> bool:
    try:
        return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    except TypeError:
        return False


def _is_key(x: Any) -> bool:
    """A concrete array of typed PRNG keys (``jax.random.key``; an NNX model's RNG state)."""
    return isinstance(x, jax.Array) and _is_key_dtype(x.dtype)


def _one_key(impl: str) -> tuple[Any, jax.ShapeDtypeStruct]:
    """(key dtype, its key data's shape and dtype) of one PRNG key of implementation
    ``impl``; a ValueError if this JAX has no such implementation."""
    try:
        key = jax.eval_shape(lambda: jax.random.key(0, impl=impl))
        return key.dtype, jax.eval_shape(jax.random.key_data, key)
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"PRNG key implementation {impl!r} unknown to this JAX ({e})") from None


def _variable_type(x: Any) -> str | None:
    """The class name of a flax ``nnx.Variable`` (an ``nnx.State``'s leaves hold their value
    under the attribute ``value``), or None. flax is only looked at if it is imported."""
    lib = sys.modules.get("flax.nnx.variablelib")
    if lib is None:
        return None
    # vars(), not getattr: flax >= 0.12 aliases VariableState to Variable with a warning.
    kinds = tuple(t for t in map(vars(lib).get, ("Variable", "VariableState")) if t)
    return type(x).__name__ if isinstance(x, kinds) else None


_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def _directory(directory: Any, fn: str) -> CkptPath:
    """``directory`` as an absolute ``pathlib.Path``, or an ``etils.epath.Path`` for a
    URI (``gs://...``); a TypeError for what is not a path."""
    if not isinstance(directory, str | os.PathLike):
        raise TypeError(
            f"jq.orbax.{fn}: directory must be a path (a str or os.PathLike such as "
            f"pathlib.Path), got {describe(directory)}."
        )
    path = os.fspath(directory)
    if not isinstance(path, str) or not path:
        # A PathLike of bytes, or "" (the current directory: never meant as a checkpoint).
        raise ValueError(
            f"jq.orbax.{fn}: directory must be a non-empty str path, got {directory!r}."
        )
    if _URI.match(path) and not path.startswith("file://"):
        from etils import epath  # an orbax dependency

        return epath.Path(path)
    return Path(path.removeprefix("file://")).expanduser().absolute()


def _size(path: CkptPath) -> int:
    """A file's size in bytes (``etils.epath`` calls ``st_size`` ``length``)."""
    if isinstance(path, Path):
        return path.stat().st_size
    return path.stat().length


def _name(path: KeyPath) -> str:  # a leaf's name, as in jq.size_report
    return jax.tree_util.keystr(path, simple=True, separator="/")


# --------------------------------------------------------------------------------- save


def save(directory: str | os.PathLike[str], tree: PyTree, *, force: bool = False) -> None:
    """Save a pytree of arrays and :class:`~jaxquant.QArray` s as an orbax checkpoint.

    Everything is written to a hidden sibling directory ``.<name>.tmp-<id>`` first; only
    a complete checkpoint is renamed to ``directory``. With ``force=True`` an existing
    checkpoint there is renamed aside, the new one renamed in, and only then is the old
    one deleted, so an interrupted save never loses what was saved before (after a crash
    between the two renames it is at ``.<name>.old-<id>`` next to ``directory``, and
    :func:`restore` says so). A killed save leaves its ``.tmp-<id>`` folder behind (it is
    never a checkpoint: :func:`restore` refuses it); every save first removes those of
    dead writers in the same parent directory (a running save holds a lock on its own).
    Folders of a jaxquant without these locks are left alone: remove them by hand.

    The manifest records the tree's containers too, so :func:`restore` without a target
    gives back ``None``, ``()``, ``{}``, ``[]``, tuples and lists as they were.

    Args:
      directory: where the checkpoint goes (a local path, or a URI such as
        ``gs://bucket/ckpt``, written in place); must not exist unless ``force``.
      tree: a pytree (dicts, lists, tuples, flax ``FrozenDict`` / ``nnx.State``...) whose
        leaves are ``jax.Array`` / ``numpy`` arrays (typed PRNG keys included: an NNX
        model's RNG state) and QArrays.
      force: replace an existing checkpoint at ``directory`` (only a jaxquant checkpoint
        or an empty directory is ever replaced).

    Raises:
      FileExistsError: ``directory`` exists and ``force`` is False.
      ValueError: ``force`` would replace something that is not a jaxquant checkpoint.
      TypeError: a leaf that is not a concrete array or QArray (named in the message).

    Example:
      >>> import os, tempfile, jax.numpy as jnp, jaxquant as jq
      >>> import jaxquant.orbax
      >>> params = {"w": jnp.linspace(-1, 1, 64 * 64).reshape(64, 64), "b": jnp.zeros(64)}
      >>> q = jq.quantize_tree(params, [("w", jq.QuantSpec("int4", jq.per_block(-1, 32)))])
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     jq.orbax.save(os.path.join(tmp, "ckpt"), q)
      ...     r = jq.orbax.restore(os.path.join(tmp, "ckpt"))
      >>> r["w"].spec == q["w"].spec, bool((r["w"].values == q["w"].values).all())
      (True, True)
    """
    directory = _directory(directory, "save")
    force = check_bool(force, "save: force")
    if not isinstance(directory, Path):
        _save_in_place(directory, tree, force)
        return
    if directory.exists() or directory.is_symlink():
        if not force:
            raise FileExistsError(
                f"save: {directory} already exists. Pass force=True to replace it (the old "
                "checkpoint is kept until the new one is complete), or choose another path."
            )
        is_ckpt = (directory / MANIFEST).is_file()
        if not directory.is_dir() or not (is_ckpt or not any(directory.iterdir())):
            raise ValueError(
                f"save(force=True): {directory} is neither a jaxquant checkpoint (no "
                f"{MANIFEST}) nor an empty directory; refusing to replace it. Remove it "
                "yourself or choose another path."
            )
    leaves, stored = _flatten(tree)
    structure = _structure(tree)
    directory.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temporaries(directory.parent)
    tmp, lock = _start_temporary(directory)
    try:
        if stored:
            with _quiet_orbax_merge_notice(), ocp.StandardCheckpointer(use_ocdbt=False) as ck:
                ck.save(tmp / ARRAYS, stored)
                ck.wait_until_finished()
        manifest = _new_manifest(_file_digests(tmp), leaves, structure)
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _swap_in(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:  # after tmp is renamed or removed: a folder without its lock is never live
        _end_temporary(tmp, lock)


def _new_manifest(files: dict[str, Entry], leaves: list[Entry], structure: Any) -> dict[str, Any]:
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "jaxquant_version": __version__,
        "checksum": "sha256",
        "files": files,
        "leaves": leaves,
        "structure": structure,
    }
    manifest[SEAL] = _seal(manifest)
    return manifest


def _save_in_place(directory: epath.Path, tree: PyTree, force: bool) -> None:
    """:func:`save` to object storage (an ``etils.epath`` path), which has no rename and
    no ``flock``: the checkpoint is written where it goes and its manifest, uploaded last
    in one piece, is what makes it a checkpoint (restore refuses a directory without
    one). ``force`` deletes an old checkpoint's manifest first and then its arrays, so an
    interrupted replacement leaves no checkpoint rather than a mix of two; unlike a local
    save, the old checkpoint is then lost."""
    if directory.exists():
        if not force:
            raise FileExistsError(
                f"save: {directory} already exists. Pass force=True to replace it, or "
                "choose another path."
            )
        is_ckpt = (directory / MANIFEST).exists()
        if not directory.is_dir() or not (is_ckpt or not any(directory.iterdir())):
            raise ValueError(
                f"save(force=True): {directory} is neither a jaxquant checkpoint (no "
                f"{MANIFEST}) nor an empty directory; refusing to replace it. Remove it "
                "yourself or choose another path."
            )
    leaves, stored = _flatten(tree)  # before anything is deleted: a bad tree raises here
    structure = _structure(tree)
    if directory.exists():
        with contextlib.suppress(FileNotFoundError):
            (directory / MANIFEST).unlink()
        if (directory / ARRAYS).exists():
            (directory / ARRAYS).rmtree()
    directory.mkdir(parents=True, exist_ok=True)
    if stored:
        with _quiet_orbax_merge_notice(), ocp.StandardCheckpointer(use_ocdbt=False) as ck:
            ck.save(directory / ARRAYS, stored)
            ck.wait_until_finished()
    files: dict[str, Entry] = {}
    root = os.fspath(directory).rstrip("/")
    todo = [directory / ARRAYS] if (directory / ARRAYS).exists() else []
    while todo:  # epath refuses a recursive glob on object storage: walk it level by level
        for p in sorted(todo.pop().iterdir(), key=os.fspath):
            if p.is_dir():
                todo.append(p)
                continue
            with p.open("rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            files[os.fspath(p)[len(root) + 1 :]] = {"size": _size(p), "sha256": digest}
    manifest = _new_manifest(files, leaves, structure)
    (directory / MANIFEST).write_bytes(json.dumps(manifest, indent=1).encode())


def _flatten(tree: PyTree) -> tuple[list[Entry], dict[str, dict[str, np.ndarray]]]:
    """(manifest leaf entries, orbax tree ``{"leaf_<i>": {field: host array}}``)."""
    entries: list[Entry] = []
    stored: dict[str, dict[str, np.ndarray]] = {}
    for i, (path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(tree, _is_qarray)[0]):
        name = _name(path)
        entry: dict[str, Any] = {"name": name, "path": _encode_path(path, name, "save")}
        fields: dict[str, Any]
        if isinstance(leaf, QArray):
            entry.update(
                kind="qarray",
                shape=list(leaf.shape),
                dtype=np.dtype(leaf.dtype).name,
                spec=spec_to_dict(leaf.spec),
            )
            # tensor_scale (NVFP4's per-tensor scale) only where the format has one: the
            # manifests of every other format stay as they were
            fields = {
                f: getattr(leaf, f)
                for f in _QARRAY_FIELDS
                if f != "tensor_scale" or leaf.tensor_scale is not None
            }
        elif _is_key(leaf):
            data = _to_host(jax.random.key_data(leaf), repr(name))
            entry.update(
                kind="key",
                impl=str(jax.random.key_impl(leaf)),
                shape=list(leaf.shape),
                dtype=data.dtype.name,
            )
            fields = {"array": data}
        else:
            host = _to_host(leaf, repr(name))
            numpy = isinstance(leaf, np.ndarray | np.generic)
            entry.update(
                kind="array",
                type="numpy" if numpy else "jax",
                shape=list(host.shape),
                dtype=host.dtype.name,
            )
            fields = {"array": host}
        entry["arrays"] = {}
        for field, x in fields.items():
            info: Entry | None = None
            if x is not None:
                host = _to_host(x, f"{name!r} ({field})")
                info, disk = _stored_info(host, f"leaf_{i}.{field}")
                if info["key"] is not None:
                    stored.setdefault(f"leaf_{i}", {})[field] = disk
            entry["arrays"][field] = info
        entries.append(entry)
    return entries, stored


def _structure(tree: PyTree) -> Any:
    """The tree's containers as JSON: a leaf is its index in flattening order, ``None`` is
    ``null``, a dict ``{"dict": [[key, child], ...]}``, a list or tuple ``{"list": [...]}``
    or ``{"tuple": [...]}``, any other node ``{"node": [[kind, key, child], ...]}`` with
    the path entry of each child (:mod:`jaxquant.orbax` docstring)."""
    count = itertools.count()

    def walk(x: Any, path: KeyPath) -> Any:
        if x is None:
            return None
        # One level: x's children, each with its one path entry (x itself if a leaf).
        children = jax.tree_util.tree_flatten_with_path(
            x, is_leaf=lambda y: y is not x or _is_qarray(y)
        )[0]
        if len(children) == 1 and not children[0][0]:
            return next(count)
        variable = _variable_type(x)
        if variable is not None and [p for p, _ in children] == [(_VALUE,)]:
            return {"variable": [variable, walk(children[0][1], (*path, _VALUE))]}
        kids = [walk(c, (*path, *p)) for p, c in children]
        if type(x) in (list, tuple):
            return {type(x).__name__: kids}
        keys = [_encode_path(p, _name((*path, *p)), "save")[0] for p, _ in children]
        if type(x) is dict:
            return {"dict": [[key, kid] for (_, key), kid in zip(keys, kids, strict=True)]}
        return {"node": [[*k, kid] for k, kid in zip(keys, kids, strict=True)]}

    return walk(tree, ())


def _canonical(manifest: dict[str, Any]) -> bytes:
    """The bytes ``SEAL`` is the sha256 of: the manifest without ``SEAL``, sorted keys, no
    whitespace, ASCII (so the seal does not depend on how the file is indented)."""
    body = {k: v for k, v in manifest.items() if k != SEAL}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _seal(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(manifest)).hexdigest()


def _encode_path(path: KeyPath, name: str, fn: str) -> list[list[Any]]:
    out: list[list[Any]] = []
    for k in path:
        found = [(kind, getattr(k, attr)) for cls, kind, attr in _PATH_KEYS if isinstance(k, cls)]
        if not found:
            raise TypeError(f"{fn}: leaf {name!r} has a path entry {k!r} of unknown type.")
        kind, key = found[0]
        if not isinstance(key, str | int):
            raise TypeError(
                f"{fn}: leaf {name!r} sits under the key {key!r} ({type(key).__name__}); only "
                "str and int keys can be saved. Use str keys."
            )
        out.append([kind, key])
    return out


def _to_host(x: Any, what: str) -> np.ndarray:
    abstract = TypeError(
        f"save: leaf {what} is abstract ({type(x).__name__}); save needs concrete arrays, "
        "outside jax.jit."
    )
    if isinstance(x, jax.ShapeDtypeStruct):
        raise abstract
    if not isinstance(x, jax.Array | np.ndarray | np.generic):
        raise TypeError(
            f"save: leaf {what} is a {type(x).__name__}, not an array or QArray. Wrap it with "
            "jnp.asarray, or keep it out of the saved tree."
        )
    try:
        host = np.asarray(x)
    except jax.errors.TracerArrayConversionError:
        raise abstract from None
    except Exception as e:  # e.g. PRNG key arrays, arrays spread over several hosts
        raise TypeError(f"save: leaf {what} cannot be copied to the host: {e}") from None
    if not host.dtype.isnative:
        host = host.astype(host.dtype.newbyteorder("="))
    return np.asarray(host, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)


def _stored_info(x: np.ndarray, key: str) -> tuple[Entry, np.ndarray]:
    """Manifest entry of one array and the array as written (bitcast if needed)."""
    if x.dtype in _NATIVE:
        disk = x
    elif x.dtype.itemsize in _UINT and not x.dtype.hasobject and x.dtype.names is None:
        disk = x.view(_UINT[x.dtype.itemsize])
    else:
        raise TypeError(f"save: {key}: dtype {x.dtype} cannot be stored.")
    info = {
        "key": key if disk.size else None,  # orbax refuses zero-size arrays
        "shape": list(x.shape),
        "dtype": x.dtype.name,
        "stored_dtype": disk.dtype.name,
        "sha256": _sha256(disk),
    }
    return info, disk


def _sha256(x: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(x, order="C").reshape(-1).view(np.uint8).data).hexdigest()


def _file_digests(root: Path) -> dict[str, Entry]:
    """Size and sha256 of every file under ``root/arrays``, each flushed to disk."""
    out: dict[str, Entry] = {}
    for dirpath, _, names in sorted(os.walk(root / ARRAYS)):
        for n in sorted(names):
            p = Path(dirpath) / n
            with open(p, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
                os.fsync(f.fileno())
            out[p.relative_to(root).as_posix()] = {"size": p.stat().st_size, "sha256": digest}
        _fsync_dir(Path(dirpath))
    return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _start_temporary(directory: Path) -> tuple[Path, int]:
    """A new ``.<name>.tmp-<id>`` folder beside ``directory`` and the descriptor of its
    lock file, held (``flock``) until :func:`_end_temporary`. The lock exists before the
    folder and outlives it, so a folder whose lock can be taken has no live writer."""
    while True:
        tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            fd = os.open(_lock_of(tmp), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:  # another writer drew the same id
            continue
    try:
        if fcntl is not None:
            # No locks on this filesystem: the folder will never count as dead.
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        tmp.mkdir()
    except BaseException:
        _end_temporary(tmp, fd)
        raise
    return tmp, fd


def _end_temporary(tmp: Path, fd: int) -> None:
    try:
        _lock_of(tmp).unlink(missing_ok=True)
    finally:
        os.close(fd)  # releases the lock


def _lock_of(tmp: Path) -> Path:
    return tmp.parent / f"{tmp.name}.lock"


def _remove_dead_temporaries(parent: Path) -> None:
    """Remove the ``.<name>.tmp-<id>`` folders (and lock files) of dead writers in
    ``parent``: those whose lock can be taken. A folder without a lock file (written by a
    jaxquant before these locks) cannot be told from a running save and is kept."""
    if fcntl is None:
        return
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for n in sorted(names):
        m = _TMP_LOCK.fullmatch(n)
        if m is None:
            continue
        try:
            fd = os.open(parent / n, os.O_RDWR)
        except OSError:  # its writer just finished
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held by a running save, or no locks on this filesystem
                continue
            tmp = parent / m.group(1)
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            if not tmp.exists():
                (parent / n).unlink(missing_ok=True)
        finally:
            os.close(fd)


def _swap_in(tmp: Path, directory: Path) -> None:
    """Rename the finished ``tmp`` to ``directory``; an old checkpoint there is renamed
    aside first and deleted last, so one complete checkpoint exists at every moment."""
    _fsync_dir(tmp)
    if not (directory.exists() or directory.is_symlink()):
        os.rename(tmp, directory)
        _fsync_dir(directory.parent)
        return
    old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(directory, old)
    try:
        os.rename(tmp, directory)
    except BaseException:
        os.rename(old, directory)
        raise
    _fsync_dir(directory.parent)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()


class _DropMergeNotice(logging.Filter):
    # orbax 0.12 tries to merge OCDBT files after every save and, with use_ocdbt=False,
    # logs a WARNING that there are none to merge; the save itself is complete.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Skipping merge of OCDBT checkpoints" not in str(record.msg)


@contextlib.contextmanager
def _quiet_orbax_merge_notice() -> Iterator[None]:
    logger, drop = logging.getLogger("absl"), _DropMergeNotice()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


# ------------------------------------------------------------------------------ restore


@dataclasses.dataclass(frozen=True)
class _Stored:
    key: str | None
    shape: tuple[int, ...]
    dtype: np.dtype
    stored_dtype: np.dtype
    sha256: str


@dataclasses.dataclass(frozen=True)
class _Leaf:
    name: str
    path: list[list[Any]]  # [[kind, key], ...] (_encode_path)
    kind: str  # "qarray" | "array" | "key"
    shape: tuple[int, ...]
    dtype: np.dtype  # of a key leaf: its key data's (uint32)
    spec: QuantSpec | None  # a qarray's
    numpy: bool  # an array leaf saved from numpy
    arrays: dict[str, _Stored | None]
    impl: str | None = None  # PRNG implementation of a key leaf, e.g. "threefry2x32"


def layout(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest (``jaxquant.json``) of the checkpoint at ``directory``, as a dict.

    Its fields are specified in the docstring of :mod:`jaxquant.orbax`. The format name,
    version and the manifest's checksum are checked; the arrays are not read.

    Raises:
      ValueError: no directory, no or unreadable manifest, another format or version, a
        manifest whose checksum does not match.

    Example:
      >>> import os, tempfile, jax.numpy as jnp, jaxquant as jq
      >>> import jaxquant.orbax
      >>> w = jq.quantize(jnp.linspace(-1, 1, 64).reshape(2, 32), jq.QuantSpec("int4"))
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     jq.orbax.save(os.path.join(tmp, "ckpt"), {"w": w, "b": jnp.zeros(2)})
      ...     manifest = jq.orbax.layout(os.path.join(tmp, "ckpt"))
      >>> manifest["format"], manifest["version"]
      ('jaxquant.orbax', 1)
      >>> [(leaf["name"], leaf["kind"], leaf["shape"]) for leaf in manifest["leaves"]]
      [('b', 'array', [2]), ('w', 'qarray', [2, 32])]
      >>> manifest["leaves"][1]["arrays"]["values"]["shape"]  # two int4 codes per byte
      [2, 16]
    """
    return _manifest(_directory(directory, "layout"), "layout")


def _manifest(directory: CkptPath, fn: str) -> dict[str, Any]:
    """The manifest, its checksum verified (warning, in restore, if it predates them)."""
    if _TMP_DIR.fullmatch(directory.name):
        raise ValueError(
            f"{fn}: {directory} is the temporary folder of a save that did not finish (it was "
            "killed, or is still running), not a checkpoint. The next save to "
            f"{directory.parent} removes it once its writer is gone."
        )
    if not directory.is_dir():
        hint = ""
        olds = sorted(directory.parent.glob(f".{directory.name}.old-*"))
        tmps = sorted(directory.parent.glob(f".{directory.name}.tmp-*"))
        if olds and not directory.exists():
            hint = (
                f" A save(force=True) was interrupted: the previous checkpoint is at {olds[-1]}; "
                f"rename it to {directory}."
            )
        elif any(t.is_dir() for t in tmps) and not directory.exists():
            hint = " A save to it did not finish (killed, or still running): nothing was saved."
        raise ValueError(f"{fn}: no checkpoint at {directory} (not a directory).{hint}")
    path = directory / MANIFEST
    if not path.is_file():
        raise ValueError(
            f"{fn}: {path} is missing, so {directory} is not a checkpoint written by "
            "jaxquant.orbax.save (a plain orbax checkpoint is read with orbax.checkpoint)."
        )
    damaged = f"Restore the checkpoint at {directory} from a copy, or save it again."
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_unique_keys)
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError included
        raise ValueError(f"{fn}: cannot read {path}: {e}. The checkpoint is damaged.") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{fn}: {path} is not a {FORMAT} manifest (not a JSON object).")
    sealed = None if SEAL not in manifest else manifest[SEAL] == _seal(manifest)
    or_damaged = "" if sealed is not False else " (or it is damaged: its checksum does not match)"
    if manifest.get("format") != FORMAT:
        raise ValueError(
            f"{fn}: {path} is not a {FORMAT} manifest (no 'format': '{FORMAT}'){or_damaged}."
        )
    if manifest.get("version") != VERSION:
        raise ValueError(
            f"{fn}: {path} has format version {manifest.get('version')!r} (written by jaxquant "
            f"{manifest.get('jaxquant_version')}){or_damaged}; this jaxquant "
            f"{__version__} reads version {VERSION}. Restore with the jaxquant that "
            "wrote it, then save again."
        )
    if sealed is False:
        raise ValueError(f"{fn}: {path} is damaged: it does not match its checksum. {damaged}")
    if sealed is None:
        if set(manifest) != _UNSEALED_KEYS:
            extra = sorted(set(manifest) ^ _UNSEALED_KEYS)
            raise ValueError(
                f"{fn}: {path} is damaged: it has no {SEAL!r} but unexpected or missing keys "
                f"{extra}. {damaged}"
            )
        if fn == "restore":
            warnings.warn(
                f"restore: {path} has no checksum (written by jaxquant "
                f"{manifest.get('jaxquant_version')}, before manifests had one), so damage to "
                "it cannot be detected, and containers holding no arrays (None, (), {}, []) "
                "are not restored without a target. Save it again to add both: "
                "jq.orbax.save(directory, jq.orbax.restore(directory, target), force=True), "
                "with the target you restore it with (keeps tuples, FrozenDicts, ...).",
                UserWarning,
                stacklevel=3,
            )
    return manifest


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        dup = sorted({k for k, _ in pairs if sum(1 for q, _ in pairs if q == k) > 1})
        raise ValueError(f"duplicate keys {dup}")
    return out


def restore(directory: str | os.PathLike[str], target: PyTree = None) -> PyTree:
    """Restore a tree written by :func:`save`, QArrays rebuilt bit for bit.

    Before orbax reads anything, the manifest is checked against its own sha256
    (``manifest_sha256``) and validated: every leaf's array entries must be the ones saved
    for that leaf (their keys, shapes and dtypes follow from its position, spec, shape and
    dtype), and every file must have its recorded size and sha256; after reading, every
    array must match its own sha256. Damage anywhere (a single flipped bit of the manifest
    included) raises, naming the checkpoint path and the leaf, rather than returning wrong
    values.

    A checkpoint written by a jaxquant whose manifests had no checksum (and no
    ``structure``) still restores, with a ``UserWarning``: damage to its manifest cannot be
    detected, and without a target its empty containers are dropped, as they were then.
    Save it again to add both: ``save(path, restore(path, target), force=True)``.

    Args:
      directory: the checkpoint directory (a local path, or a URI such as
        ``gs://bucket/ckpt``).
      target: optional tree of the same structure, concrete or abstract (e.g.
        ``jax.eval_shape(lambda p: jq.quantize_tree(p, policy), params)``). Its container types
        (``FrozenDict``, ``nnx.State``, tuples...) are used for the result, its leaves
        must match the checkpoint's (QArray spec, shape and dtype; array shape and dtype),
        and a leaf with a ``sharding`` is placed with it. Without ``target`` the result has
        the saved tree's dicts, lists, tuples and ``None`` s (empty ones included); other
        containers (namedtuples, dataclasses, ``FrozenDict``...) become dicts keyed by
        their field names or keys; ``nnx.Variable`` s become their values, the pure dict
        that ``nnx.update(model, ...)`` takes (pass ``target=nnx.state(model)`` for an
        ``nnx.State``).

    Returns:
      The tree: QArrays with ``jax.Array`` fields, ``jax.Array`` leaves (typed PRNG keys
      for keys), and ``numpy`` arrays for leaves that were numpy arrays when saved (or are
      in ``target``).

    Raises:
      ValueError: a missing directory or manifest, another format version, a damaged
        manifest (checksum or contents), a damaged or truncated file, an array whose
        checksum does not match, the temporary folder of an unfinished save, or a
        ``target`` that does not match (the first differing leaf path is named).

    Example:
      An NNX model's state (parameters, BatchNorm statistics, RNG keys) into a model:

      >>> import os, tempfile, jax.numpy as jnp, jaxquant as jq
      >>> import jaxquant.orbax
      >>> from flax import nnx
      >>> def make(seed):
      ...     rngs = nnx.Rngs(seed)
      ...     return nnx.Sequential(nnx.Linear(4, 8, rngs=rngs), nnx.BatchNorm(8, rngs=rngs),
      ...                           nnx.Dropout(0.5, rngs=rngs))
      >>> model, other = make(0), make(1)
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     jq.orbax.save(os.path.join(tmp, "ckpt"), nnx.state(model))
      ...     nnx.update(other, jq.orbax.restore(os.path.join(tmp, "ckpt")))
      >>> x = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)
      >>> bool((other(x) == model(x)).all())  # same weights, statistics and dropout keys
      True
    """
    where = _directory(directory, "restore")
    manifest = _manifest(where, "restore")
    leaves, files = _parse(manifest, where / MANIFEST)
    targets: list[Any] = [None] * len(leaves)
    if target is not None:
        targets, treedef = _match_target(target, leaves)
    _check_files(where, files, leaves)
    raw = _read(where, leaves)
    out = []
    for leaf, t in zip(leaves, targets, strict=True):
        host = {
            f: None if s is None else _from_disk(where, leaf, f, s, raw)
            for f, s in leaf.arrays.items()
        }
        if leaf.kind == "qarray":
            fields = {
                f: None if x is None else _place(x, getattr(t, f, None), False)
                for f, x in host.items()
            }
            assert leaf.spec is not None  # _parse_leaf gives every qarray its spec
            values, scale, zp, ts = (fields[f] for f in _QARRAY_FIELDS)
            assert values is not None and scale is not None  # _parse_leaf checks both
            out.append(
                QArray(
                    values,
                    scale,
                    zp,
                    spec=leaf.spec,
                    shape=leaf.shape,
                    dtype=leaf.dtype,
                    tensor_scale=ts,
                )
            )
            continue
        array = host["array"]
        assert array is not None  # _parse_leaf refuses an array or key leaf without one
        if leaf.kind == "key":
            key = jax.random.wrap_key_data(jax.device_put(array), impl=leaf.impl)
            sharding = getattr(t, "sharding", None)
            out.append(key if sharding is None else jax.device_put(key, sharding))
        else:
            as_numpy = leaf.numpy if target is None else isinstance(t, np.ndarray | np.generic)
            out.append(_place(array, t, as_numpy))
    if target is not None:
        return jax.tree_util.tree_unflatten(treedef, out)
    if "structure" in manifest:
        _warn_value_boxes(manifest["structure"], where)
        return _unflatten(manifest["structure"], out)
    return _nest([(leaf.path, x) for leaf, x in zip(leaves, out, strict=True)])


def _dtype(name: Any) -> np.dtype:
    if not isinstance(name, str):
        raise TypeError(f"a dtype name is a str, got {name!r}")
    try:
        return np.dtype(getattr(ml_dtypes, name)) if hasattr(ml_dtypes, name) else np.dtype(name)
    except TypeError:
        raise ValueError(f"unknown dtype {name!r}") from None


def _parse(
    manifest: dict[str, Any], where: CkptPath
) -> tuple[list[_Leaf], dict[str, tuple[int, str]]]:
    """The manifest's leaves and ``{file: (size, sha256)}``; ValueError if malformed."""
    errors = (KeyError, TypeError, ValueError, AttributeError)
    try:
        files = {str(k): (int(v["size"]), str(v["sha256"])) for k, v in manifest["files"].items()}
        entries = list(manifest["leaves"])
    except errors as e:
        raise ValueError(f"restore: {where} is malformed ({type(e).__name__}: {e}).") from None
    leaves = []
    for i, entry in enumerate(entries):
        try:
            leaves.append(_parse_leaf(entry, i))
        except errors as err:
            name = entry.get("name") if isinstance(entry, dict) else None
            raise ValueError(
                f"restore: {where} is malformed at leaf {i} ({name!r}): "
                f"{type(err).__name__}: {err}."
            ) from None
    if "structure" in manifest:
        try:
            _check_structure(manifest["structure"], leaves)
        except errors as e:
            raise ValueError(
                f"restore: {where} is malformed: its structure {type(e).__name__}: {e}."
            ) from None
    return leaves, files


def _parse_leaf(e: Entry, i: int) -> _Leaf:
    arrays: dict[str, _Stored | None] = {}
    for field, s in e["arrays"].items():
        arrays[field] = None
        if s is not None:
            stored = _Stored(
                None if s["key"] is None else str(s["key"]),
                tuple(int(d) for d in s["shape"]),
                _dtype(s["dtype"]),
                _dtype(s["stored_dtype"]),
                str(s["sha256"]),
            )
            if stored.dtype.itemsize != stored.stored_dtype.itemsize:
                raise ValueError(f"{field} is stored in a dtype of another width")
            # Ties the array to this leaf and field: entries swapped between leaves or
            # fields (by a damaged or hand-edited manifest) do not pass.
            key = f"leaf_{i}.{field}" if np.prod(stored.shape, dtype=np.int64) else None
            if stored.key != key:
                raise ValueError(f"{field} has the key {stored.key!r}, expected {key!r}")
            arrays[field] = stored
    kind = e["kind"]
    if kind == "qarray":
        arrays.setdefault("tensor_scale", None)  # written only for formats that have one
    names = set(_QARRAY_FIELDS) if kind == "qarray" else {"array"}
    if kind not in ("qarray", "array", "key") or set(arrays) != names:
        raise ValueError(f"kind {kind!r} with arrays {sorted(arrays)}")
    if kind != "qarray" and arrays["array"] is None:  # save writes every array leaf's
        raise ValueError("its array is null")
    leaf = _Leaf(
        name=str(e["name"]),
        path=[[str(k), v] for k, v in e["path"]],
        kind=kind,
        shape=tuple(int(d) for d in e["shape"]),
        dtype=_dtype(e["dtype"]),
        spec=spec_from_dict(e["spec"]) if kind == "qarray" else None,
        numpy=kind == "array" and e["type"] == "numpy",
        arrays=arrays,
        impl=str(e["impl"]) if kind == "key" else None,
    )
    expected: dict[str, tuple[tuple[int, ...], np.dtype]]
    if leaf.spec is not None:  # a qarray
        scale = arrays["scale"]
        want = leaf.spec.granularity.plan(leaf.shape).scale_shape
        if arrays["values"] is None or scale is None or scale.shape != want:
            raise ValueError(f"its scale shape is not {want}")
        if (arrays["zero_point"] is None) != leaf.spec.symmetric:
            raise ValueError("zero_point does not match symmetric")
        if (arrays["tensor_scale"] is None) == bool(leaf.spec.format.tensor_scale):
            raise ValueError(f"tensor_scale does not match the format {leaf.spec.format.name}")
        zp = arrays["zero_point"]
        if zp is not None and (zp.shape != want or zp.dtype.kind not in "iu"):
            raise ValueError(f"zero_point is {zp.shape} {zp.dtype.name}, not integers of {want}")
        expected = _qarray_arrays(leaf.spec, leaf.shape)
    elif kind == "key":
        assert leaf.impl is not None
        data = _one_key(leaf.impl)[1]
        if leaf.dtype != data.dtype:
            raise ValueError(f"its key data is {leaf.dtype.name}, not {data.dtype.name}")
        expected = {"array": ((*leaf.shape, *data.shape), leaf.dtype)}
    else:
        expected = {"array": (leaf.shape, leaf.dtype)}
    for field, (shape, dtype) in expected.items():
        s = arrays[field]
        if s is not None and (s.shape, s.dtype) != (shape, dtype):
            made_by = {"qarray": "spec and shape", "key": "implementation and shape"}.get(
                kind, "shape and dtype"
            )
            raise ValueError(
                f"{field} is {s.shape} {s.dtype.name}, but the leaf's {made_by} make it "
                f"{shape} {dtype.name}"
            )
    return leaf


def _qarray_arrays(
    spec: QuantSpec, shape: tuple[int, ...]
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The (shape, dtype) of a QArray's values and scale (layout in jaxquant/_src/qarray.py)."""
    element = spec.element
    if element.packed:
        *lead, n = shape or (1,)
        values = ((*lead, packed_length(n, element.bits)), np.dtype(np.uint8))
    else:
        values = (tuple(shape), np.dtype(element.storage_dtype))
    scale = (spec.granularity.plan(shape).scale_shape, np.dtype(spec.scale_format.dtype))
    out = {"values": values, "scale": scale}
    if spec.format.tensor_scale:  # NVFP4's float32 scale per tensor
        out["tensor_scale"] = ((), np.dtype(np.float32))
    return out


def _check_structure(structure: Any, leaves: list[_Leaf]) -> None:
    """ValueError unless ``structure`` holds leaves 0, 1, ... in order, each at the path
    its manifest entry records."""
    count = itertools.count()

    def walk(node: Any, path: list[list[Any]]) -> None:
        for child, entry in _children(node):
            walk(child, [*path, entry])
        if _is_leaf_index(node):
            i = next(count)
            if node != i or i >= len(leaves):
                raise ValueError(f"leaf {node} where leaf {i} belongs")
            if leaves[i].path != path:
                raise ValueError(f"leaf {i} ({leaves[i].name!r}) sits at {path}")

    walk(structure, [])
    if (n := next(count)) != len(leaves):
        raise ValueError(f"{n} leaves instead of {len(leaves)}")


def _is_leaf_index(node: Any) -> bool:
    return isinstance(node, int) and not isinstance(node, bool)


def _children(node: Any) -> list[tuple[Any, list[Any]]]:
    """``[(child, its path entry)]`` of a structure node (none for a leaf or None)."""
    if node is None or _is_leaf_index(node):
        return []
    if not isinstance(node, dict) or len(node) != 1:
        raise ValueError(f"unknown node {node!r:.80}")
    ((kind, kids),) = node.items()
    if kind in ("list", "tuple"):
        return [(c, ["index", i]) for i, c in enumerate(kids)]
    if kind == "variable":
        variable, child = kids
        if not isinstance(variable, str):
            raise ValueError(f"variable node of type {variable!r:.80}")
        return [(child, ["attr", "value"])]
    if kind == "dict":
        out = [(c, ["key", k]) for k, c in kids]
    elif kind == "node":
        out = [(c, [t, k]) for t, k, c in kids]
    else:
        raise ValueError(f"unknown node kind {kind!r}")
    for _, (t, k) in out:  # what save writes (_encode_path): hashable dict keys
        if t not in ("key", "index", "attr", "flat") or not isinstance(k, str | int):
            raise ValueError(f"unknown path entry {[t, k]!r:.80}")
    return out


def _warn_value_boxes(structure: Any, directory: CkptPath) -> None:
    """Warn about containers whose only child is the attribute ``value``: ``nnx.Variable`` s
    saved before save recorded them as such, which restore can only give back as
    ``{"value": x}`` dicts (``nnx.update`` stores those as the variables' values, and the
    model then fails with ``KeyError: Ellipsis``)."""
    found: list[str] = []

    def walk(node: Any, path: list[list[Any]]) -> None:
        kids = _children(node)
        if (
            isinstance(node, dict)
            and "node" in node
            and [e for _, e in kids] == [["attr", "value"]]
        ):
            found.append("/".join(str(k) for _, k in path) or "(root)")
        for child, entry in kids:
            walk(child, [*path, entry])

    walk(structure, [])
    if found:
        shown = ", ".join(repr(p) for p in found[:3]) + (" ..." if len(found) > 3 else "")
        warnings.warn(
            f"restore: {directory} holds {len(found)} container(s) whose only field is "
            f"'value' ({shown}), restored as {{'value': array}} dicts. If they are "
            "nnx.Variables (an nnx.State saved by an older jaxquant), nnx.update would store "
            "those dicts as the values; pass target=nnx.state(model) instead, and save again "
            "to record them as variables: save(path, restore(path, target), force=True).",
            UserWarning,
            stacklevel=3,
        )


def _unflatten(node: Any, out: list[Any]) -> Any:
    """The tree ``structure`` (checked by :func:`_check_structure`) describes."""
    if node is None:
        return None
    if _is_leaf_index(node):
        return out[node]
    ((kind, _),) = node.items()
    kids = [(entry, _unflatten(c, out)) for c, entry in _children(node)]
    if kind == "variable":  # its value: nnx.update takes these pure dicts
        return kids[0][1]
    if kind == "list":
        return [x for _, x in kids]
    if kind == "tuple":
        return tuple(x for _, x in kids)
    if kind == "node" and kids and all(t == "index" for (t, _), _ in kids):
        return [x for _, x in kids]
    return {k: x for (_, k), x in kids}


def _match_target(target: PyTree, leaves: list[_Leaf]) -> tuple[list[Any], jax.tree_util.PyTreeDef]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(target, _is_qarray)
    for i in range(max(len(flat), len(leaves))):
        tpath = None
        if i < len(flat):
            tpath = _encode_path(flat[i][0], _name(flat[i][0]), "restore (target)")
        if tpath != (None if i >= len(leaves) else leaves[i].path):
            have = "nothing" if tpath is None else repr(_name(flat[i][0]))
            saved = "nothing" if i >= len(leaves) else repr(leaves[i].name)
            raise ValueError(
                f"restore: target does not match the checkpoint at leaf {i}: the target has "
                f"{have}, the checkpoint has {saved}. Pass a target of the saved structure "
                "(e.g. jax.eval_shape of what was saved), or no target."
            )
    for (path, t), leaf in zip(flat, leaves, strict=True):
        name = _name(path)
        is_key = hasattr(t, "shape") and _is_key_dtype(getattr(t, "dtype", None))
        # (spec, shape, dtype) of a QArray, (shape, dtype) of the rest; None: not one
        got: tuple[Any, ...] | None
        want: tuple[Any, ...]
        if leaf.kind == "qarray":
            got = (t.spec, t.shape, np.dtype(t.dtype)) if isinstance(t, QArray) else None
            want = (leaf.spec, leaf.shape, leaf.dtype)
        elif leaf.kind == "key":
            assert leaf.impl is not None
            got = (tuple(t.shape), t.dtype) if is_key else None
            want = (leaf.shape, _one_key(leaf.impl)[0])
        else:
            has = (
                hasattr(t, "shape")
                and hasattr(t, "dtype")
                and not isinstance(t, QArray)
                and not is_key
            )
            got = (tuple(t.shape), np.dtype(t.dtype)) if has else None
            want = (leaf.shape, leaf.dtype)
        if got != want:
            kind = {"qarray": "a QArray", "key": "PRNG keys"}.get(leaf.kind, "an array")
            raise ValueError(
                f"restore: target leaf {name!r} does not match the checkpoint, which holds "
                f"{kind} {_describe(want)}; the target has {_describe(got, t)}."
            )
    return [t for _, t in flat], treedef


def _describe(fields: tuple[Any, ...] | None, t: Any = None) -> str:
    if fields is None:
        return f"a {type(t).__name__}"
    *spec, shape, dtype = fields
    return f"{shape} {dtype.name}" + (f" {spec[0]}" if spec else "")


def _check_files(
    directory: CkptPath, files: dict[str, tuple[int, str]], leaves: list[_Leaf]
) -> None:
    for rel, (size, digest) in files.items():
        p = directory / rel
        problem: str | None
        if not p.is_file():
            problem = "missing"
        elif _size(p) != size:
            problem = f"{_size(p)} bytes instead of {size} (truncated or overwritten)"
        else:
            with p.open("rb") as f:
                ok = hashlib.file_digest(f, "sha256").hexdigest() == digest
            problem = None if ok else "corrupted (its sha256 does not match the manifest)"
        if problem:
            raise ValueError(
                f"restore: {p} is {problem}; it holds {_owner(rel, leaves)}. The checkpoint at "
                f"{directory} is damaged: restore it from a copy, or save again."
            )


def _owner(rel: str, leaves: list[_Leaf]) -> str:
    parts = rel.split("/")
    for leaf in leaves:
        for field, s in leaf.arrays.items():
            if s is not None and len(parts) > 2 and parts[1] == s.key:
                return f"leaf {leaf.name!r}" + ("" if field == "array" else f" ({field})")
    return "orbax's metadata of all arrays"


def _read(directory: CkptPath, leaves: list[_Leaf]) -> dict[str, np.ndarray]:
    abstract: dict[str, dict[str, jax.ShapeDtypeStruct]] = {}
    for leaf in leaves:
        for s in leaf.arrays.values():
            if s is not None and s.key is not None:
                group, field = s.key.split(".")
                abstract.setdefault(group, {})[field] = jax.ShapeDtypeStruct(
                    s.shape, s.stored_dtype
                )
    if not abstract:
        return {}
    try:
        with ocp.StandardCheckpointer(use_ocdbt=False) as ck:
            tree = ck.restore(directory / ARRAYS, abstract)
    except Exception as e:
        raise ValueError(
            f"restore: orbax could not read the arrays of {directory}: {e}. The files match "
            "their checksums, so check the installed orbax-checkpoint / tensorstore."
        ) from e
    return {f"{g}.{f}": np.asarray(x) for g, fields in tree.items() for f, x in fields.items()}


def _from_disk(
    directory: CkptPath, leaf: _Leaf, field: str, s: _Stored, raw: dict[str, np.ndarray]
) -> np.ndarray:
    what = f"leaf {leaf.name!r}" + ("" if field == "array" else f" ({field})")
    if s.key is None:
        x = np.zeros(s.shape, s.stored_dtype)
    else:
        x = raw[s.key]
    if x.shape != s.shape or x.dtype != s.stored_dtype or _sha256(x) != s.sha256:
        raise ValueError(
            f"restore: {what} read back as {x.shape} {x.dtype} with another checksum than it "
            f"was saved with ({s.shape} {s.stored_dtype.name}). The checkpoint at {directory} "
            "is damaged: restore it from a copy, or save again."
        )
    return x.view(s.dtype) if s.dtype != s.stored_dtype else x


def _place(x: np.ndarray, t: Any, as_numpy: bool) -> Any:
    if as_numpy:
        return x
    sharding = getattr(t, "sharding", None)
    return jax.device_put(x, sharding) if sharding is not None else jax.device_put(x)


def _nest(items: list[tuple[list[list[Any]], Any]]) -> Any:
    """Nested dicts (and lists, for sequence keys) from ``(path, value)`` pairs."""
    if not items:
        return {}
    if len(items) == 1 and not items[0][0]:
        return items[0][1]
    groups: dict[Any, list[tuple[list[list[Any]], Any]]] = {}
    kinds = set()
    for path, x in items:
        (kind, key), rest = path[0], path[1:]
        kinds.add(kind)
        groups.setdefault(key, []).append((rest, x))
    if kinds == {"index"}:
        out: list[Any] = [None] * (max(groups) + 1)
        for i, sub in groups.items():
            out[i] = _nest(sub)
        return out
    return {key: _nest(sub) for key, sub in groups.items()}
