"""A sweep over the processes of a multi-host slice: one command on every host, each cell
run once, one run folder on storage every host sees.

``jaxquant sweep --out gs://bucket/runs/a`` (or a shared file system path) runs on every
host of the slice. Process ``i`` of ``n``:

1. starts ``jax.distributed`` (:func:`initialize`): where jax detects a cluster of more
   than one process (Slurm, Open MPI, a Cloud TPU slice, GKE, Kubernetes), or as told by
   ``--coordinator HOST:PORT --num-processes N --process-id I``; never on a plain machine;
2. waits while process 0 prepares the folder under its lock (what a single-host sweep
   checks: not another config's, not a folder of other files) and reads which cells are
   done, in every rows file of the folder; process 0 sends the verdict through
   jax.distributed's key-value store (the done cells, or the error every process raises);
3. runs its cells -- those at positions ``i % n`` of the full, deterministic cell list,
   so a resumed run assigns the same cells -- that are not done, appending each row to
   its own file ``processes/<i>of<n>.jsonl`` (no two processes write one file; a local one
   is ``flock``-ed by its process);
4. reports how it ended (cells run, or the error that stopped it, and its environment) in
   the key-value store and waits at a barrier for the others;
5. process 0 then checks that the rows of every process that ran cells are in the folder
   (else the folder is not on shared storage, and it says so), folds them into
   ``results.jsonl``, writes ``results.csv``, ``summary.md``, the plots and ``env.json``
   (every process's environment), and lets the folder's lock go.

A process that dies (SIGKILL, a lost host) takes the others with it: jax.distributed's
heartbeat (100 s) ends them. Every finished cell's row is already durable, so running the
same command again on every host resumes, without redoing a finished cell.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import sys
from typing import Any, NamedTuple, TextIO

import jax

from jaxquant.app.sweep import config as C
from jaxquant.app.sweep import folder as F
from jaxquant.app.sweep import grid as G
from jaxquant.app.sweep import run as R

_ADDRESS = re.compile(r"\[?[A-Za-z0-9_.:-]+\]?:\d{1,5}")
# How long the others wait for process 0 to prepare the folder (listing a large folder on
# object storage can take a while), and for each other at the end: as long as the slowest
# process's cells take. A dead process is noticed sooner, by jax.distributed's heartbeat.
PREPARE_TIMEOUT_S = 900
FINISH_TIMEOUT_S = 7 * 24 * 3600
_RUNS = itertools.count()  # one key prefix per sweep of this job (called in the same order)


class Processes(NamedTuple):
    """This process's place in the sweep: ``process_index`` of ``process_count``
    (``(0, 1)`` alone). Not ``index`` / ``count``: those are tuple's own methods."""

    process_index: int
    process_count: int


def cluster() -> str | None:
    """The cluster environment jax.distributed would detect here (``"SlurmCluster"``,
    ``"GceTpuCluster"``...), or None: a plain machine. Opt-in methods (mpi4py) are not
    tried, as jax does not try them unasked."""
    try:
        from jax._src import clusters  # private: no public probe exists
    except ImportError:  # pragma: no cover - a jax that moved it: no auto-detection
        return None
    for env in getattr(clusters.ClusterEnv, "_cluster_types", ()):
        if getattr(env, "opt_in_only_method", False):
            continue
        try:
            if env.is_env_present():
                return env.__name__
        except Exception:  # a broken probe (no metadata server...) is not a cluster
            continue
    return None


def _cluster_size(name: str) -> int | None:
    """How many processes the detected cluster ``name`` has (None: unknown)."""
    from jax._src import clusters

    for env in getattr(clusters.ClusterEnv, "_cluster_types", ()):
        if env.__name__ == name:
            with contextlib.suppress(Exception):
                return int(env.get_process_count())
    return None


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> Processes:
    """Start ``jax.distributed`` for a sweep over several processes; this process's place.

    With no argument it starts where jax detects a cluster of more than one process
    (:func:`cluster`), and does nothing on a plain machine or a one-host cluster (a
    single TPU VM). ``coordinator`` (``HOST:PORT`` of process 0), ``num_processes`` and
    ``process_id`` are passed on; outside a detected cluster all three are needed. If the
    caller started jax.distributed already, its processes are used.

    Raises:
      ValueError: an incomplete or inconsistent set of arguments, or JAX already running
        (jax.distributed must start before any computation), naming the fix.
    """
    given = {
        "--coordinator": coordinator,
        "--num-processes": num_processes,
        "--process-id": process_id,
    }
    named = [k for k, v in given.items() if v is not None]
    if jax.distributed.is_initialized():
        if named:
            raise ValueError(
                f"sweep: jax.distributed is already initialized in this process; drop "
                f"{', '.join(named)} (the running processes are used)."
            )
        return Processes(jax.process_index(), jax.process_count())
    if coordinator is not None and not _ADDRESS.fullmatch(coordinator):
        raise ValueError(
            f"sweep: --coordinator {coordinator!r} is not HOST:PORT; pass process 0's "
            "address and a free port, e.g. --coordinator 10.0.0.2:8476."
        )
    if num_processes is not None and process_id is not None and process_id >= num_processes:
        raise ValueError(
            f"sweep: --process-id {process_id} is not below --num-processes "
            f"{num_processes}; number the processes 0 to {num_processes - 1}."
        )
    found = cluster()
    if named and found is None and len(named) < 3:
        missing = [k for k, v in given.items() if v is None]
        raise ValueError(
            f"sweep: {', '.join(named)} without {' and '.join(missing)}: outside a cluster "
            "jax detects (Slurm, Open MPI, Cloud TPU, Kubernetes), pass all of "
            "--coordinator HOST:PORT, --num-processes N and --process-id I."
        )
    if not named and (found is None or (_cluster_size(found) or 2) <= 1):
        return Processes(0, 1)
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise ValueError(
            "sweep: JAX already ran a computation in this process, so jax.distributed can "
            "no longer start; run the sweep in a fresh process (the jaxquant command)."
        )
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )
    return Processes(jax.process_index(), jax.process_count())


class Coordinator:
    """jax.distributed's key-value store and barriers, under one sweep's key prefix."""

    def __init__(self, prefix: str):
        from jax._src.distributed import global_state  # orbax reaches it the same way

        if global_state.client is None:
            raise ValueError("sweep: jax.distributed is not initialized; call initialize()")
        self.client, self.prefix = global_state.client, prefix

    def set(self, key: str, value: Any) -> None:
        self.client.key_value_set(f"{self.prefix}/{key}", json.dumps(value))

    def get(self, key: str, timeout_s: float) -> Any:
        return json.loads(
            self.client.blocking_key_value_get(f"{self.prefix}/{key}", int(timeout_s * 1000))
        )

    def try_get(self, key: str) -> Any:
        """The value, or None if it is not set (yet)."""
        try:
            return json.loads(self.client.key_value_try_get(f"{self.prefix}/{key}"))
        except Exception:  # NOT_FOUND comes as an XlaRuntimeError
            return None

    def barrier(self, name: str, timeout_s: float) -> None:
        self.client.wait_at_barrier(f"{self.prefix}/{name}", int(timeout_s * 1000))


def _error_doc(err: BaseException) -> dict[str, Any]:
    kind = "folder" if isinstance(err, C.ConfigError) else "os"
    if isinstance(err, KeyboardInterrupt):
        kind = "interrupted"
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, OSError) and err.strerror:
        text = err.strerror + (f" ({err.filename})" if err.filename else "")
    return {"kind": kind, "text": text, "errno": getattr(err, "errno", None)}


def _raise(doc: dict[str, Any], who: str) -> None:
    """Raise what process ``who`` reported (a folder error as such, else an OSError)."""
    if doc["kind"] == "folder":
        raise F.FolderError(doc["text"])
    raise OSError(doc.get("errno") or 0, f"{who}: {doc['text']}")


def run_processes(
    cfg: dict[str, Any],
    out: F.AnyPath,
    procs: Processes,
    *,
    progress: TextIO | None = sys.stderr,
    plots: bool = True,
    coordinator: Coordinator | None = None,
) -> dict[str, Any]:
    """Run this process's share of ``cfg`` into the shared run folder ``out`` (the module
    docstring has the protocol); every process of the sweep calls it.

    Returns ``{"rows", "ran", "skipped", "table", "stopped"}``: on process 0 the latest
    row of every cell, the cells run by all processes, those already done, the merged
    table and ``{process: why}`` for processes that stopped early; on the others their
    own cells' rows and counts, ``table`` None.

    Raises :class:`~jaxquant.app.sweep.folder.FolderError` /
    :class:`~jaxquant.app.sweep.folder.FolderBusy` on every process when process 0
    cannot use ``out``; KeyboardInterrupt or OSError where this process was stopped (after
    the others were told, and process 0 wrote the table of what is done).
    """
    i, n = procs
    coord = coordinator or Coordinator(f"jaxquant/sweep/{next(_RUNS)}")
    out = F.as_path(out)
    want = C.config_hash(cfg)
    cells = G.shard(G.expand(cfg), i, n)
    if i == 0:
        return _process_zero(cfg, out, procs, coord, cells, progress, plots)
    try:
        verdict = coord.get("prepared", PREPARE_TIMEOUT_S)
    except Exception as err:  # a timeout comes as an XlaRuntimeError
        raise OSError(
            0,
            f"sweep: process 0 did not prepare {out} within {PREPARE_TIMEOUT_S} s "
            f"({' '.join(str(err).split())[:200]}); see process 0's output",
        ) from None
    if "error" in verdict:
        _raise(verdict["error"], "process 0")
    done = set(verdict["done"])
    ran, stopped = _own_share(cfg, out, procs, coord, cells, done, progress)
    _wait_for_all(coord, n, out)
    if stopped is not None:
        raise stopped
    rows = [r for r in F.read_rows(F.process_rows_path(out, i, n)) if r["config_hash"] == want]
    ids = {c.id for c in cells}
    rows = [r for r in F.latest(rows).values() if r["id"] in ids]
    return {"rows": rows, "ran": ran, "skipped": len(cells) - ran, "table": None, "stopped": {}}


def _process_zero(cfg, out, procs, coord, cells, progress, plots) -> dict[str, Any]:
    try:
        with R.prepared(out, cfg) as done:
            coord.set("prepared", {"done": sorted(done)})
            _, stopped = _own_share(cfg, out, procs, coord, cells, done, progress)
            _wait_for_all(coord, procs.process_count, out)
            reports = [coord.try_get(f"ended/{j}") for j in range(procs.process_count)]
            res = _merge_processes(cfg, out, procs, reports, plots)
    except BaseException as err:
        # Failed before the others were told to start: they raise the same error.
        if coord.try_get("prepared") is None:
            coord.set("prepared", {"error": _error_doc(err)})
        raise
    if stopped is not None:
        raise stopped
    res["skipped"] = len(G.expand(cfg)) - res["ran"]
    return res


def _wait_for_all(coord: Coordinator, count: int, out: F.AnyPath) -> None:
    """The barrier at the end; when it fails (a timeout), an OSError naming the processes
    that did not finish."""
    try:
        coord.barrier("finished", FINISH_TIMEOUT_S)
    except Exception as err:
        missing = [j for j in range(count) if coord.try_get(f"ended/{j}") is None]
        raise OSError(
            0,
            f"sweep: process{'es' if len(missing) > 1 else ''} "
            f"{', '.join(map(str, missing)) or '?'} of {count} did not finish their cells "
            f"({' '.join(str(err).split())[:200]}); their finished rows are in {out}",
        ) from None


def _own_share(cfg, out, procs, coord, cells, done, progress) -> tuple[int, BaseException | None]:
    """Run this process's cells that are not done into its rows file; report how it ended
    (``ended/<i>``). Returns (cells run, the exception that stopped it or None)."""
    i, n = procs
    env = R.environment(cfg, procs)
    todo = [c for c in cells if c.id not in done]
    bar = R.Progress(len(cells), progress)
    ran = 0
    stopped: BaseException | None = None
    try:
        path = F.process_rows_path(out, i, n)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Locally, its own flock: a process of an earlier job not yet ended by the
        # heartbeat cannot append to the same file. (Object storage: process 0's lease.)
        own = F.RunLock(path.parent, name=f"{i}of{n}.lock") if F.is_local(path) else None
        with own or contextlib.nullcontext():
            F.repair(path)
            if F.is_local(path):

                def write(row: dict[str, Any]) -> None:
                    nonlocal ran
                    F.append_row(path, row)
                    ran += 1
            else:
                rows = F.ObjectRows(path)

                def write(row: dict[str, Any]) -> None:
                    nonlocal ran
                    rows.append(row)
                    ran += 1

            bar.update(len(cells) - len(todo), "training" if todo else "")
            with R.sigterm_as_interrupt():
                R.run_cells(todo, cfg, env, procs, write, bar, len(cells) - len(todo))
    except BaseException as err:  # told to the others first, then raised by the caller
        stopped = err
    report = {"ran": ran, "todo": len(todo), "env": env}
    if stopped is not None:
        report["error"] = _error_doc(stopped)
    coord.set(f"ended/{i}", report)
    return ran, stopped


def _merge_processes(cfg, out, procs, reports, plots) -> dict[str, Any]:
    """Process 0, after the barrier: every process's rows into the run folder's table."""
    want = C.config_hash(cfg)
    n = procs.process_count
    lost = [
        j
        for j, rep in enumerate(reports)
        if rep and rep["ran"] and not F.process_rows_path(out, j, n).exists()
    ]
    if lost:
        raise F.FolderError(
            f"sweep: the rows of process{'es' if len(lost) > 1 else ''} "
            f"{', '.join(map(str, lost))} are not in {out} as process 0 sees it: --out must "
            "be on storage every host shares (a shared file system, or gs://bucket/...), "
            "not a local disk of each host; their rows are on their own hosts."
        )
    F.consolidate(out, want)
    rows = [r for r in F.read_rows(out / "results.jsonl") if r["config_hash"] == want]
    ids = {c.id for c in G.expand(cfg)}
    rows = [r for r in F.latest(rows).values() if r["id"] in ids]
    table = R.finalize(out, rows, cfg, plots=plots)
    envs = [rep["env"] if rep else None for rep in reports]
    R.record_env(out, envs[0] or R.environment(cfg, procs), processes=envs)
    stopped = {
        j: (rep["error"]["text"] if rep else "no report (the process died)")
        for j, rep in enumerate(reports)
        if rep is None or "error" in rep
    }
    ran = sum(rep["ran"] for rep in reports if rep)
    return {"rows": rows, "ran": ran, "skipped": 0, "table": table, "stopped": stopped}
