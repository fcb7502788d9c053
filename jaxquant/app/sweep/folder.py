"""The run folder: atomic files, durable rows, one writer at a time, no mixed configs.

What keeps a result from being lost or attributed to the wrong run:

* every file but ``results.jsonl`` is replaced whole (:func:`atomic_write`: a uniquely
  named temporary file in the same folder, fsynced, then ``os.replace``), so a reader or
  an interrupted writer sees the old file or the new one, and concurrent writers of one
  path never share a temporary file;
* ``results.jsonl`` is only appended to, one fsynced line per finished cell
  (:func:`append_row`); a line torn by a crash is dropped before the next append
  (:func:`repair`);
* every row carries its config's hash; :func:`load_rows` skips (and reports) rows that
  are not well-formed, and callers count only rows of their own config;
* :class:`RunLock` holds ``sweep.lock`` (an ``flock`` on a file holding the owner's pid
  and host) while a sweep or a merge writes to the folder: a second one fails at once,
  and a lock left by a dead process is free again (the kernel drops a dead process's
  ``flock``);
* :func:`claim` refuses a folder that belongs to another config, whichever of
  ``config.toml``, ``env.json`` or the rows says so, and a non-empty folder that is not
  a run folder.

A run folder may be on object storage (``gs://``, ``s3://``, ``az://``: :func:`as_path`
gives an ``etils.epath`` path for a URI, a ``pathlib.Path`` for anything else). There, an
object is replaced whole by one upload (readers see the old object or the new one), so
:func:`atomic_write` uploads it directly; nothing can be appended, so a rows file is
rewritten whole after each cell (:class:`ObjectRows`; never torn, so never repaired); and
``flock`` does not exist, so :class:`LeaseLock` replaces :class:`RunLock`: ``sweep.lock``
names its owner and is renewed every minute, a lock renewed within the last
:attr:`LeaseLock.lease` seconds refuses a second sweep, an older one is a dead sweep's and
is taken over (it assumes the hosts' clocks agree to well within the lease).

The processes of a multi-host sweep share one run folder: each appends to its own rows
file ``processes/<i>of<n>.jsonl`` (no two processes write one file) and process 0 folds
them into ``results.jsonl`` (:func:`consolidate`); :func:`all_rows` reads both.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import re
import socket
import tempfile
import threading
import time
import tomllib
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple, TypeAlias

from jaxquant.app.sweep import config as C

LOCK_NAME = "sweep.lock"
# The files a sweep writes; a folder holding none of the first three is not a run folder.
RUN_FILES = ("config.toml", "results.jsonl", "env.json", "results.csv", "summary.md", "plots")
# Where the processes of a multi-host sweep keep their own rows (and local locks).
PROCESSES = "processes"

# A local path, or an etils.epath path on object storage (the type is only annotated: the
# import of etils waits until a URI is given, so a local sweep never needs it).
AnyPath: TypeAlias = "Path | Any"
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def as_path(text: str | os.PathLike) -> AnyPath:
    """``text`` as a path: a URI (``gs://bucket/runs/a``, ``s3://...``) as an
    ``etils.epath.Path``, which reads and writes it through the cloud's client; anything
    else as a local ``pathlib.Path``."""
    if isinstance(text, pathlib.PurePath) and not isinstance(text, Path):
        return text  # an epath.Path already (it derives from PurePath, not Path)
    raw = os.fspath(text)
    if isinstance(raw, str) and _URI.match(raw) and not raw.startswith("file://"):
        from etils import epath

        return epath.Path(raw)
    return Path(raw.removeprefix("file://") if isinstance(raw, str) else os.fsdecode(raw))


def is_local(path: AnyPath) -> bool:
    """Whether ``path`` is on a local (or mounted) file system: rename, append, fsync and
    flock work there; on object storage they do not."""
    return isinstance(path, Path)


class FolderError(C.ConfigError):
    """A run folder that cannot be used as asked (another config's results, not a run
    folder, a file); the message is one line with the fix."""


class FolderBusy(FolderError):
    """Another sweep or merge holds the run folder's lock."""


# ------------------------------------------------------------------------ files


def atomic_write(path: Path, text: str | bytes) -> None:
    """Replace ``path`` whole: readers see the old file or the new one.

    The data goes to a temporary file with a unique name in the same folder (so
    ``os.replace`` is a rename on one file system, and concurrent writers never collide),
    is fsynced, then renamed over ``path``.
    """
    data = text.encode() if isinstance(text, str) else text
    if not is_local(path):  # one upload replaces an object whole; there is no rename
        path.write_bytes(data)
        return
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line and make it durable (flush + fsync)."""
    line = json.dumps(row, allow_nan=True) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def repair(path: Path) -> bool:
    """End ``path`` on a line break so the next append starts a fresh line: a last line
    cut short by a crash (not JSON) is dropped, a complete one gets its newline. Returns
    whether a torn line was dropped. (An object is written whole: never torn.)"""
    if not is_local(path) or not path.exists():
        return False
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    start = data.rfind(b"\n") + 1
    try:
        json.loads(data[start:])
        torn = False
    except ValueError:
        torn = True
    with open(path, "r+b") as f:
        if torn:
            f.truncate(start)
        else:
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
        f.flush()
        os.fsync(f.fileno())
    return torn


# -------------------------------------------------------------------------- rows

_TEXT_FIELDS = (
    "id",
    "status",
    "task",
    "format",
    "granularity",
    "calibration",
    "rounding",
    "mode",
    "config_hash",
)
# What the summary and the plots read from an ``ok`` row.
_OK_NUMBERS = ("test_acc", "weight_sqnr_db", "bits_per_weight", "model_bytes")


def row_problem(row: Any) -> str | None:
    """Why ``row`` is not a well-formed results row (None: it is)."""
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object"
    for k in _TEXT_FIELDS:
        if not isinstance(row.get(k), str):
            return f'no "{k}"' if k not in row else f'"{k}" is not a string'
    if not isinstance(row.get("act", "none"), str):
        return '"act" is not a string'
    if row["status"] == "ok":
        for k in _OK_NUMBERS:
            v = row.get(k)
            if not isinstance(v, int | float) or isinstance(v, bool):
                return f'an ok row without a number "{k}"'
    return None


class Rows(NamedTuple):
    """The rows of a results.jsonl."""

    rows: list[dict[str, Any]]  # the well-formed rows, in file order
    bad: list[tuple[int, str]]  # (1-based line number, what is wrong) of the others


def load_rows(path: Path) -> Rows:
    """Read ``path`` (a results.jsonl; missing: no rows), keeping the well-formed rows and
    noting the others: not JSON (a torn last line, an edit), or missing a field."""
    path = as_path(path)
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return Rows([], [])
    rows, bad = [], []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad.append((n, "not JSON"))
            continue
        problem = row_problem(row)
        if problem is None:
            rows.append(row)
        else:
            bad.append((n, problem))
    return Rows(rows, bad)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The well-formed rows of a results.jsonl (malformed lines skipped)."""
    return load_rows(path).rows


def process_rows_path(folder: AnyPath, index: int, count: int) -> AnyPath:
    """The rows file of process ``index`` of ``count`` in a shared run folder."""
    return folder / PROCESSES / f"{index}of{count}.jsonl"


def rows_files(folder: AnyPath) -> list[AnyPath]:
    """``results.jsonl`` and the processes' rows files of ``folder`` (those that exist
    after ``results.jsonl``, in name order)."""
    files = [folder / "results.jsonl"]
    procs = folder / PROCESSES
    if procs.is_dir():
        files += sorted(
            (p for p in procs.iterdir() if p.name.endswith(".jsonl")), key=lambda p: p.name
        )
    return files


def all_rows(folder: AnyPath) -> list[tuple[AnyPath, Rows]]:
    """Every rows file of ``folder`` (:func:`rows_files`) with its rows."""
    return [(path, load_rows(path)) for path in rows_files(folder)]


class ObjectRows:
    """Appends rows to a rows file on object storage, where nothing can be appended: the
    file is uploaded whole after each row (its earlier rows are read once, at the start).
    A row is durable when :meth:`append` returns, as ``append_row``'s fsynced line is."""

    def __init__(self, path: AnyPath):
        self.path = path
        try:
            self.data = path.read_bytes()
        except FileNotFoundError:
            self.data = b""
        if self.data and not self.data.endswith(b"\n"):
            self.data += b"\n"

    def append(self, row: dict[str, Any]) -> None:
        data = self.data + (json.dumps(row, allow_nan=True) + "\n").encode()
        self.path.write_bytes(data)
        self.data = data


def consolidate(folder: AnyPath, want: str) -> int:
    """Fold the rows of config hash ``want`` that the processes' rows files hold and
    ``results.jsonl`` lacks into ``results.jsonl`` (rewritten whole, atomically; its own
    rows stay as they are). The processes' files are kept (they say which process ran
    what). Returns how many rows were added."""
    procs = [(p, r) for p, r in all_rows(folder)[1:]]
    if not procs:
        return 0
    jsonl = folder / "results.jsonl"
    try:
        old = jsonl.read_bytes()
    except FileNotFoundError:
        old = b""
    if old and not old.endswith(b"\n"):
        # A torn last line: the results.jsonl writer (this process, holding the lock) is
        # not writing, so it is a killed writer's; drop it as repair() would.
        start = old.rfind(b"\n") + 1
        try:
            json.loads(old[start:])
            old += b"\n"
        except ValueError:
            old = old[:start]
    seen = {json.dumps(r, sort_keys=True) for r in load_rows(jsonl).rows}
    new = []
    for _, loaded in procs:
        for r in loaded.rows:
            key = json.dumps(r, sort_keys=True)
            if r["config_hash"] == want and key not in seen:
                seen.add(key)
                new.append(r)
    if new:
        atomic_write(jsonl, old + "".join(json.dumps(r) + "\n" for r in new).encode())
    return len(new)


def bad_rows_note(path: Path, bad: list[tuple[int, str]]) -> str:
    """One line naming the malformed lines of ``path`` (the first few, with why)."""
    shown = "; ".join(f"line {n}: {why}" for n, why in bad[:3])
    more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
    return (
        f"sweep: skipped {len(bad)} malformed row{'s' if len(bad) > 1 else ''} of {path} "
        f"({shown}{more}); they are not counted"
    )


def latest(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per cell id its latest row, except that an ``ok`` row is never replaced by an error."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        old = out.get(r["id"])
        if old is not None and old["status"] == "ok" and r["status"] != "ok":
            continue
        out[r["id"]] = r
    return out


# ------------------------------------------------------------------------ config


def _looks_like_config(cfg: Any) -> bool:
    return isinstance(cfg, dict) and all(k in cfg for k in ("seeds", "task", "grid", "qat"))


def read_config(folder: Path) -> dict[str, Any] | None:
    """The folder's config.toml as a config dict; None if missing, unreadable or not a
    config (damaged)."""
    try:
        cfg = tomllib.loads((folder / "config.toml").read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    return cfg if _looks_like_config(cfg) else None


def _env_hash(folder: Path) -> str | None:
    try:
        env = json.loads((folder / "env.json").read_text())
    except (OSError, ValueError):
        return None
    h = env.get("config_hash") if isinstance(env, dict) else None
    return h if isinstance(h, str) else None


def folder_hash(folder: Path, rows: list[dict[str, Any]]) -> tuple[str | None, str]:
    """The config hash a run folder belongs to and what says so: its config.toml, else
    its env.json, else its rows (when they agree); ``(None, why)`` when nothing does."""
    cfg = read_config(folder)
    if cfg is not None:
        return C.config_hash(cfg), "config.toml"
    damaged = "damaged" if (folder / "config.toml").exists() else "missing"
    h = _env_hash(folder)
    if h is not None:
        return h, f"env.json (config.toml {damaged})"
    hashes = sorted({r["config_hash"] for r in rows})
    if len(hashes) == 1:
        return hashes[0], f"results.jsonl (config.toml {damaged})"
    if hashes:
        return ",".join(hashes), f"results.jsonl (config.toml {damaged}, rows of several configs)"
    return None, f"config.toml {damaged}"


# What makes a folder a run folder (a multi-host sweep's processes/ included).
_MARKS = (*RUN_FILES[:3], PROCESSES)


def is_run_folder(folder: Path) -> bool:
    return any((folder / name).exists() for name in _MARKS)


def _ours(name: str) -> bool:
    return name == LOCK_NAME or (name.startswith(".") and name.endswith(".tmp"))


def check_out(folder: Path, flag: str = "--out") -> None:
    """Refuse a ``--out`` that is a file, or a non-empty folder that is not a run folder
    (its files would be overwritten)."""
    if folder.exists() and not folder.is_dir():
        raise FolderError(
            f"sweep: {flag} {folder} is a file, not a folder; pass a folder (a new one, "
            "or a run folder to resume)."
        )
    if folder.is_dir() and not is_run_folder(folder):
        # Another sweep's lock and temporaries: it is making this a run folder right now.
        # (So are run files that appeared since is_run_folder looked: a racing sweep.)
        others = [p.name for p in folder.iterdir() if not _ours(p.name) and p.name not in _MARKS]
        if others:
            raise FolderError(
                f"sweep: {flag} {folder} is not a run folder (it holds {others[0]!r} and no "
                "config.toml, results.jsonl or env.json); pass a new or empty folder."
            )


def claim(folder: Path, want: str, rows: list[dict[str, Any]], flag: str = "--out") -> str:
    """Refuse ``folder`` (holding ``rows``) unless it is new or belongs to config hash
    ``want``; returns what vouched for it ("" for a new folder)."""
    have, where = folder_hash(folder, rows)
    if have is None:
        return ""
    if have != want:
        raise FolderError(
            f"sweep: {flag} {folder} holds results of another config (hash {have}, from "
            f"its {where}; this config's hash is {want}); pass a new {flag} to start a "
            "new run, or the config that made it to resume."
        )
    return where


# -------------------------------------------------------------------------- lock

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def _try_lock(fd: int) -> bool:
    """Take an exclusive lock on ``fd`` without waiting; False if another holds it."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # pragma: no cover - Windows: a byte-range lock, also dropped at exit
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK, errno.EDEADLK):
            return False
        raise
    return True


class RunLock:
    """An exclusive lock on a run folder (``with RunLock(folder): ...``).

    ``sweep.lock`` holds ``"<pid> <host>"`` of its owner and an ``flock`` on it: a second
    lock on the folder (another process, or another thread) raises :class:`FolderBusy`
    at once, naming the owner. The kernel drops the lock of a process that dies, so a
    lock file left by a killed sweep is taken over (``stale`` then names its old owner).
    The file is removed on release.
    """

    def __init__(self, folder: Path, flag: str = "--out", name: str = LOCK_NAME):
        self.folder, self.flag = Path(folder), flag
        self.path = self.folder / name
        self.fd: int | None = None
        self.stale = ""

    def acquire(self) -> RunLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd):
                owner = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise FolderBusy(
                    f"sweep: {self.flag} {self.folder} is in use by another sweep (pid and "
                    f"host: {owner}); wait for it to finish, or pass another {self.flag}."
                )
            # The owner before us may have removed the file after we opened it: then our
            # lock is on a deleted file, and we try again on the path's current file.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.stale = os.read(fd, 200).decode(errors="replace").strip()
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        # Removed while still held, so no one can lock the old file and think it current.
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class LeaseLock:
    """:class:`RunLock` on object storage, which has no ``flock``: a lease.

    ``sweep.lock`` holds JSON ``{"owner": "<pid> <host>", "token", "renewed": unix time}``,
    rewritten every :attr:`renew` seconds by a daemon thread while held. A lock renewed
    within the last :attr:`lease` seconds is live: a second sweep raises
    :class:`FolderBusy` at once, naming its owner. An older one was left by a sweep that
    died (``stale`` names it) and is taken over. Two sweeps that take a free lock at the
    same moment both write it; the store keeps the last upload, and after :attr:`settle`
    seconds each reads it back and the one whose token is gone backs off
    (:class:`FolderBusy`). The lease outlasts jax.distributed's heartbeat timeout (100 s),
    so a multi-host sweep whose process 0 died has lost its other processes too before
    another sweep can take the folder. The lock is deleted on release.
    """

    lease = 300.0  # s: a lock renewed more recently than this is held
    renew = 60.0  # s: how often the holder renews it
    settle = 2.0  # s: how long to wait before checking that the lock is still ours

    def __init__(self, folder: AnyPath, flag: str = "--out", name: str = LOCK_NAME):
        self.folder, self.flag = folder, flag
        self.path = folder / name
        self.token = ""
        self.stale = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict[str, Any] | None:
        try:
            doc = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # damaged: the owner cannot be named; treat as live
            return {"owner": "unknown (a damaged sweep.lock)", "token": "", "renewed": time.time()}
        if not isinstance(doc, dict) or not isinstance(doc.get("renewed"), int | float):
            return {"owner": "unknown (a damaged sweep.lock)", "token": "", "renewed": time.time()}
        return doc

    def _write(self) -> None:
        doc = {
            "owner": f"{os.getpid()} {socket.gethostname()}",
            "token": self.token,
            "renewed": time.time(),
        }
        self.path.write_bytes((json.dumps(doc) + "\n").encode())

    def _busy(self, doc: dict[str, Any]) -> FolderBusy:
        age = max(0.0, time.time() - float(doc["renewed"]))
        return FolderBusy(
            f"sweep: {self.flag} {self.folder} is in use by another sweep (owner: "
            f"{doc.get('owner', 'unknown')}, lock renewed {age:.0f} s ago); wait for it to "
            f"finish (a lock not renewed for {self.lease:.0f} s is taken over), or pass "
            f"another {self.flag}."
        )

    def acquire(self) -> LeaseLock:
        old = self._read()
        if old is not None and time.time() - float(old["renewed"]) < self.lease:
            raise self._busy(old)
        self.stale = "" if old is None else str(old.get("owner", "unknown"))
        self.token = uuid.uuid4().hex
        self._write()
        time.sleep(self.settle)
        now = self._read()
        if now is None or now.get("token") != self.token:
            raise self._busy(now or {"owner": "unknown", "renewed": time.time()})
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew, name="sweep-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.renew):
            # A failed upload is retried at the next renewal; the lease covers a few.
            with contextlib.suppress(Exception):
                self._write()

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        with contextlib.suppress(Exception):
            doc = self._read()
            if doc is not None and doc.get("token") == self.token:
                self.path.unlink()

    def __enter__(self) -> LeaseLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock(folder: AnyPath, flag: str = "--out", name: str = LOCK_NAME) -> RunLock | LeaseLock:
    """The folder's lock: an ``flock`` (:class:`RunLock`) on a local or mounted file
    system, a lease (:class:`LeaseLock`) on object storage."""
    return RunLock(folder, flag, name) if is_local(folder) else LeaseLock(folder, flag, name)
