"""``jaxquant sweep`` across processes: two processes on localhost (CPU) started with
``--coordinator localhost:<port> --num-processes 2 --process-id i`` share one run folder,
run every cell once and write the table a single process writes; a run whose processes
were killed resumes without redoing a finished cell; a run folder on object storage
(``gs://``, through etils.epath, redirected to a local folder here) keeps the run folder's
guarantees with whole-object writes and a lease instead of ``flock``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from jaxquant.app.cli import main
from jaxquant.app.sweep import command
from jaxquant.app.sweep import config as C
from jaxquant.app.sweep import folder as F
from jaxquant.app.sweep import grid as G
from jaxquant.app.sweep import hosts as H
from jaxquant.app.sweep import run as R

ROOT = Path(__file__).resolve().parents[1]
QUICK = C.resolve(quick=True)  # digits-mlp --quick: 5 cells, one seed

# gs://bucket/... redirected to a local folder (GS_ROOT) through etils.epath's test mock:
# the sweep goes through epath's cloud code path, the bytes land on this disk.
GS = textwrap.dedent(
    """
    import contextlib, os
    from etils.epath import testing as _epath_testing

    def _local(root, path):
        text = os.fspath(path)
        return root + text[len("gs://bucket"):] if text.startswith("gs://bucket") else text

    @contextlib.contextmanager
    def redirect_gs(root):
        def fn(orig, path, *args, **kwargs):
            args = [_local(root, a) if isinstance(a, str) else a for a in args]
            return orig(_local(root, path), *args, **kwargs)
        names = ("open exists isdir listdir makedirs mkdir remove rename replace rmtree "
                 "stat copy").split()
        with _epath_testing.mock_epath(**{n: fn for n in names}):
            yield
    """
)

# One process of a sweep: the tiny task (or, with FAKE_CELLS, made-up metrics that depend
# only on the cell, recorded in CALLS/<process>.txt; BLOCK_AT=k blocks process 1 in its
# k-th cell), an --out that may be gs://bucket/... (redirected to GS_ROOT).
DRIVER = GS + textwrap.dedent(
    """
    import hashlib, sys, time
    from pathlib import Path
    from jaxquant.app.cli import main
    from jaxquant.app.sweep import run as R

    calls_dir = os.environ.get("CALLS")
    block_at = int(os.environ.get("BLOCK_AT", "0"))

    class Fake:
        def __init__(self, cfg):
            self.n = 0

        def __call__(self, cell):
            self.n += 1
            argv = sys.argv
            me = argv[argv.index("--process-id") + 1] if "--process-id" in argv else "0"
            with open(Path(calls_dir) / f"{me}.txt", "a") as f:
                f.write(cell.id + "\\n")
            if me == "1" and self.n == block_at:
                Path(calls_dir, "blocked").touch()
                time.sleep(600)  # until killed
            h = int(hashlib.sha256(cell.id.encode()).hexdigest()[:6], 16) / 2**24
            return {"test_acc": 50 + 40 * h, "test_loss": h, "float_acc": 95.0,
                    "float_loss": 0.1, "weight_sqnr_db": 30 * h, "bits_per_weight": 8.0,
                    "model_bytes": 100, "float32_bytes": 400}

    if calls_dir:
        R.Evaluator = Fake
    with redirect_gs(os.environ.get("GS_ROOT", "/nonexistent")):
        code = main(["sweep", "--no-progress", *sys.argv[1:]])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no atexit: jax.distributed's shutdown barrier is not what is tested
    """
)

TINY = textwrap.dedent(
    """
    import flax.linen as nn
    import numpy as np

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.relu(nn.Dense(16)(x)))

    def data(n=240):
        rng = np.random.default_rng(0)
        centers = rng.normal(size=(3, 8)).astype(np.float32) * 3
        y = rng.integers(0, 3, n).astype(np.int32)
        x = (centers[y] + rng.normal(size=(n, 8))).astype(np.float32)
        k = n * 2 // 3
        return {"x_train": x[:k], "y_train": y[:k], "x_test": x[k:], "y_test": y[k:]}
    """
)

TINY_TOML = textwrap.dedent(
    """
    seeds = [0, 1]
    [task]
    name = "tiny"
    model = "multihost_tiny:Tiny"
    data = "multihost_tiny:data"
    epochs = 2
    lr = 0.01
    batch = 32
    [grid]
    formats = ["float32", "int8", "int4"]
    granularities = ["tensor", "channel"]
    calibrations = ["absmax"]
    roundings = ["nearest"]
    modes = ["ptq"]
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(tmp: Path, argv: list[str], log: str, **env: str) -> subprocess.Popen:
    """A driver process; its stdout and stderr go to tmp/<log>.out / .err."""
    path = os.pathsep.join(filter(None, [str(ROOT), str(tmp), os.environ.get("PYTHONPATH")]))
    # The suite's XLA flags (tests/conftest.py: LLVM -O0, the elemental fusion emitters,
    # which compile the drivers' programs faster), every driver the same ones, less the 8
    # fake devices: one CPU device each (the cells run on one device; start-up is quicker).
    flags = os.environ.get("JAXQUANT_TEST_CHILD_XLA_FLAGS", "").split()
    full = {
        **os.environ,
        "PYTHONPATH": path,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": " ".join([*flags, "--xla_force_host_platform_device_count=1"]),
        **env,
    }
    script = tmp / "driver.py"
    if not script.exists():
        script.write_text(DRIVER)
    out, err = open(tmp / f"{log}.out", "w"), open(tmp / f"{log}.err", "w")
    with out, err:
        return subprocess.Popen(
            [sys.executable, str(script), *argv], stdout=out, stderr=err, env=full, cwd=tmp
        )


def two_processes(tmp: Path, out: str, argv: list[str], log: str, **env: str) -> list:
    port = free_port()
    procs = ["--num-processes", "2", "--process-id"]
    return [
        launch(
            tmp,
            [*argv, "--out", out, "--coordinator", f"localhost:{port}", *procs, str(i)],
            f"{log}{i}",
            **env,
        )
        for i in range(2)
    ]


def finish(tmp: Path, procs: list, logs: list[str], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, (tmp / f"{log}.err").read_text()[-3000:]


def metrics(row: dict) -> dict:
    """A row without what differs between runs of the same cell (time, shard, git)."""
    return {k: v for k, v in row.items() if k not in ("seconds", "shard", "git")}


@pytest.fixture
def tiny(tmp_path):
    (tmp_path / "multihost_tiny.py").write_text(TINY)
    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    (tmp_path / "gs").mkdir()
    return tmp_path


@pytest.mark.slow  # two processes training the tiny task, and this one: ~25 s on 2 busy cores
def test_two_processes_run_every_cell_once_and_match_one_process(tiny, capsys, monkeypatch):
    """The merged table of a 2-process run (its folder on gs://, through etils.epath) is
    the table of a 1-process run (a local folder) on the same grid: same rows, same
    metrics, the same summary.md byte for byte."""
    cfg = C.load(str(tiny / "tiny.toml"))
    cells = [c.id for c in G.expand(cfg)]
    argv = ["--config", "tiny.toml"]
    gs = {"GS_ROOT": str(tiny / "gs")}
    procs = two_processes(tiny, "gs://bucket/two", argv, "two", **gs)
    # The 1-process run: in this process, while the two drivers run (a process fewer to
    # start). Its XLA flags are the drivers' but for its 8 fake devices; a cell runs on one.
    monkeypatch.chdir(tiny)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the config's folder goes first
    try:
        code = main(["sweep", "--no-progress", *argv, "--no-plots", "--out", "one"])
    finally:
        sys.modules.pop("multihost_tiny", None)
        finish(tiny, procs, ["two0", "two1"])
    assert code == 0, capsys.readouterr().err

    one, two = tiny / "one", tiny / "gs" / "two"
    rows = R.read_rows(two / "results.jsonl")
    assert Counter(r["id"] for r in rows) == Counter(cells)  # every cell exactly once
    assert {tuple(r["shard"]) for r in rows} == {(0, 2), (1, 2)}
    by_process = {i: R.read_rows(F.process_rows_path(two, i, 2)) for i in range(2)}
    assert [r["id"] for r in by_process[0]] == cells[0::2]  # cell i on process i % 2
    assert [r["id"] for r in by_process[1]] == cells[1::2]
    assert all(r["status"] == "ok" for r in rows)
    ref = {r["id"]: metrics(r) for r in R.read_rows(one / "results.jsonl")}
    assert {r["id"]: metrics(r) for r in rows} == ref
    assert (two / "summary.md").read_text() == (one / "summary.md").read_text()
    assert sorted(p.name for p in (two / "plots").iterdir()) == [
        "accuracy_vs_bits.png",
        "loss_vs_bits.png",
        "size_vs_accuracy.png",
        "sqnr_vs_bits.png",
    ]
    env = json.loads((two / "env.json").read_text())
    assert [e["shard"] for e in env["processes"]] == [[0, 2], [1, 2]]
    assert not (two / F.LOCK_NAME).exists()  # the lease was let go
    assert not list(two.rglob("*.tmp"))
    text = (tiny / "two0.out").read_text()
    assert "10 cells (10 run by 2 processes, 0 already done, 0 failed)" in text
    assert "process 0 writes the table" in (tiny / "two1.out").read_text()


@pytest.mark.slow  # seconds: subprocesses or many compiles (the fast loop skips it)
def test_a_killed_run_resumes_without_redoing_finished_cells(tmp_path):
    """Process 1 is killed in its second cell (and process 0, waiting for it, with it, as
    jax.distributed's heartbeat would); the same command resumes: only the killed cell
    runs again, and every cell has one row."""
    calls = tmp_path / "calls"
    calls.mkdir()
    cells = [c.id for c in G.expand(QUICK)]
    out = str(tmp_path / "run")
    procs = two_processes(tmp_path, out, ["--quick"], "a", CALLS=str(calls), BLOCK_AT="2")
    try:
        deadline = time.monotonic() + 120
        rows0 = F.process_rows_path(Path(out), 0, 2)
        while not ((calls / "blocked").exists() and len(R.read_rows(rows0)) == 3):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), (
                tmp_path / "a0.err"
            ).read_text() + (tmp_path / "a1.err").read_text()
            time.sleep(0.1)
        for p in reversed(procs):
            p.send_signal(signal.SIGKILL)
    finally:
        for p in procs:
            with contextlib.suppress(OSError):
                p.kill()
            p.wait()
    first = {i: (calls / f"{i}.txt").read_text().split() for i in range(2)}
    assert first == {0: cells[0::2], 1: cells[1::2]}  # process 1 died in cells[3]
    assert not (Path(out) / "results.jsonl").exists()  # process 0 never merged

    for i in range(2):
        (calls / f"{i}.txt").unlink()
    procs = two_processes(tmp_path, out, ["--quick"], "b", CALLS=str(calls))
    finish(tmp_path, procs, ["b0", "b1"])
    assert not (calls / "0.txt").exists()  # process 0's cells were all done
    assert (calls / "1.txt").read_text().split() == [cells[3]]  # only the killed cell
    rows = R.read_rows(Path(out) / "results.jsonl")
    assert Counter(r["id"] for r in rows) == Counter(cells)
    assert "took over the lock" in (tmp_path / "b0.err").read_text()
    assert "5 cells (1 run by 2 processes, 4 already done, 0 failed)" in (
        (tmp_path / "b0.out").read_text()
    )


# -------------------------------------------------------------- object storage, in process


@pytest.fixture
def gs(tmp_path, monkeypatch):
    """gs://bucket/... is tmp_path/gs/...; the evaluator is a stand-in; the lease settles
    at once."""
    ns: dict = {}
    exec(GS, ns)
    root = tmp_path / "gs"
    root.mkdir()
    calls: list[str] = []

    class Fake:
        def __init__(self, cfg):
            pass

        def __call__(self, cell):
            calls.append(cell.id)
            return {
                "test_acc": 90.0,
                "test_loss": 0.1,
                "float_acc": 95.0,
                "float_loss": 0.1,
                "weight_sqnr_db": 30.0,
                "bits_per_weight": 8.0,
                "model_bytes": 100,
                "float32_bytes": 400,
            }

    monkeypatch.setattr(R, "Evaluator", Fake)
    monkeypatch.setattr(F.LeaseLock, "settle", 0.0)
    with ns["redirect_gs"](str(root)):
        yield root, calls


def sweep(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["sweep", "--no-progress", "--no-plots", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_as_path_keeps_local_paths_local():
    assert isinstance(F.as_path("runs/a"), Path) and F.is_local(F.as_path("runs/a"))
    assert F.as_path("file:///tmp/a") == Path("/tmp/a")
    gs = F.as_path("gs://bucket/runs/a")
    assert not F.is_local(gs) and os.fspath(gs) == "gs://bucket/runs/a"
    assert F.as_path(gs) is gs and os.fspath(gs / "results.jsonl").startswith("gs://bucket/")


def test_object_storage_run_folder_resumes_and_is_leased(gs, capsys, monkeypatch):
    root, calls = gs
    url = "gs://bucket/runs/a"
    assert sweep(capsys, "--quick", "--out", url, "--shard", "0/2")[0] == 0
    assert len(calls) == 3 and not (root / "runs/a" / F.LOCK_NAME).exists()
    # Nothing is appended on object storage: every upload is the whole file.
    appended = []
    monkeypatch.setattr(F, "append_row", lambda *a: appended.append(a))
    monkeypatch.setattr(R, "append_row", lambda *a: appended.append(a))
    code, out, _ = sweep(capsys, "--quick", "--out", url)
    assert code == 0 and "5 cells (2 run, 3 already done, 0 failed)" in out
    assert len(calls) == 5 and not appended
    rows = R.read_rows(root / "runs/a/results.jsonl")
    assert Counter(r["id"] for r in rows) == Counter(c.id for c in G.expand(QUICK))
    assert not list((root / "runs/a").rglob("*.tmp"))

    lease = F.LeaseLock(F.as_path(url))
    with lease:  # a live lease (another sweep's) refuses at once, naming its owner
        doc = json.loads((root / "runs/a" / F.LOCK_NAME).read_text())
        assert doc["token"] == lease.token
        code, _, err = sweep(capsys, "--quick", "--out", url)
        assert code == 2 and "in use by another sweep" in err and str(os.getpid()) in err
    assert not (root / "runs/a" / F.LOCK_NAME).exists()
    # A lease not renewed for longer than the lease is a dead sweep's: taken over.
    (root / "runs/a" / F.LOCK_NAME).write_text(
        json.dumps({"owner": "123 deadhost", "token": "x", "renewed": time.time() - 1e4})
    )
    code, _, err = sweep(capsys, "--quick", "--out", url)
    assert code == 0 and "took over the lock" in err and "123 deadhost" in err


def test_lease_lost_to_a_racing_sweep_backs_off(gs, monkeypatch):
    root, _ = gs
    folder = F.as_path("gs://bucket/race")
    (root / "race").mkdir()
    lock = F.LeaseLock(folder)
    real = F.LeaseLock._write

    def then_another(self):  # another sweep uploads its lock right after ours
        real(self)
        (root / "race" / F.LOCK_NAME).write_text(
            json.dumps({"owner": "7 otherhost", "token": "theirs", "renewed": time.time()})
        )

    monkeypatch.setattr(F.LeaseLock, "_write", then_another)
    with pytest.raises(F.FolderBusy, match="7 otherhost"):
        lock.acquire()


# ----------------------------------------------------------------- arguments, in process


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--num-processes", "2"], "without --coordinator and --process-id"),
        (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
        (
            ["--coordinator", "localhost:1", "--num-processes", "2", "--process-id", "2"],
            "--process-id 2 is not below --num-processes 2",
        ),
        (["--coordinator", "localhost:1", "--shard", "0/2"], "drop --shard"),
        (["--process-id", "0", "--merge", "a"], "drop --merge"),
    ],
)
def test_bad_multihost_arguments_are_usage_errors(tmp_path, capsys, argv, needle):
    code, out, err = sweep(capsys, "--quick", "--out", str(tmp_path / "never"), *argv)
    assert code == 2 and out == "" and needle in err and err.count("\n") == 1
    assert not (tmp_path / "never").exists()


def test_no_cluster_no_distributed(monkeypatch):
    """On a plain machine nothing starts (the suite's own process runs alone)."""
    monkeypatch.setattr(H, "cluster", lambda: None)
    started = []
    monkeypatch.setattr(H.jax.distributed, "initialize", lambda *a, **k: started.append(a))
    assert H.initialize() == H.Processes(0, 1) and not started


def test_help_says_how_to_run_on_a_slice(capsys):
    assert main(["sweep", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("--coordinator HOST:PORT", "--num-processes N", "--process-id I"):
        assert needle in text
    assert "same command on every host" in text and "gs://" in text
    assert command.MULTIHOST.split()[0] == "multi-host:"


# ------------------------------------------------------- checkpoints take the same paths


def test_checkpoint_paths_may_be_cloud_uris():
    from jaxquant._src.orbax import checkpoint as ck

    gs = ck._directory("gs://bucket/ckpt", "save")
    assert not isinstance(gs, Path) and os.fspath(gs) == "gs://bucket/ckpt"
    assert ck._directory("file:///tmp/ckpt", "save") == Path("/tmp/ckpt")


def test_checkpoint_on_object_storage_is_written_in_place_manifest_last(tmp_path, monkeypatch):
    """The object-storage branch of jq.orbax.save / restore (no rename, no flock: in place,
    manifest last), run on a local folder through an etils.epath path."""
    import jax.numpy as jnp
    from etils import epath

    import jaxquant as jq
    from jaxquant._src.orbax import checkpoint as ck

    real = ck._directory
    monkeypatch.setattr(ck, "_directory", lambda d, fn: epath.Path(os.fspath(real(d, fn))))
    spec = jq.QuantSpec("int4", jq.per_block(-1, 32))
    tree = jq.quantize_tree({"w": jnp.linspace(-1, 1, 64 * 64).reshape(64, 64)}, [("w", spec)])
    path = tmp_path / "ckpt"
    ck.save(path, tree)
    assert not [p for p in tmp_path.iterdir() if p.name != "ckpt"]  # no temporary beside
    back = ck.restore(path)
    assert bool((back["w"].values == tree["w"].values).all()) and back["w"].spec == spec
    with pytest.raises(FileExistsError, match="force=True"):
        ck.save(path, tree)
    with pytest.raises(TypeError):  # a bad tree raises before the old one is touched
        ck.save(path, {"w": "not an array"}, force=True)
    assert (path / ck.MANIFEST).exists()
    ck.save(path, {"w": tree["w"], "b": jnp.ones(3)}, force=True)
    assert sorted(ck.restore(path)) == ["b", "w"]
    files = json.loads((path / ck.MANIFEST).read_text())["files"]
    first = path / sorted(files)[0]
    first.write_bytes(first.read_bytes()[:-1])  # truncated: its size says so
    with pytest.raises(ValueError, match="instead of"):
        ck.restore(path)
    (path / ck.MANIFEST).unlink()  # a save that stopped before its manifest: no checkpoint
    with pytest.raises(ValueError, match="is missing"):
        ck.restore(path)
