"""``jaxquant sweep``: nothing lost, nothing misattributed.

Merge never overwrites a run folder, resume counts only rows of its own config (with
config.toml gone or damaged too), one sweep per folder (a lock), unique temporary files,
one line (what was kept, how to resume) for a bad ``--out``, a full disk or Ctrl-C,
malformed rows skipped and reported, integer options checked.

The cells are evaluated by a stand-in (:class:`Fake`) so each test runs in a second: what
is tested is the run folder, not the training (tests/test_sweep.py runs real cells).
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from jaxquant._src import cli
from jaxquant.app.cli import main
from jaxquant.app.sweep import command as sweep_command
from jaxquant.app.sweep import config as C
from jaxquant.app.sweep import folder as F
from jaxquant.app.sweep import grid as G
from jaxquant.app.sweep import run as R

QUICK = C.resolve(quick=True)  # the default preset --quick: 5 cells, one seed
CNN = C.resolve(preset="digits-cnn", quick=True)  # another config (another hash)
N_CELLS = len(G.expand(QUICK))


class Fake:
    """Stands in for :class:`run.Evaluator`: returns made-up metrics, records every cell it
    evaluates, and can raise or block at its n-th call."""

    calls: list[str]
    raise_at: dict[int, BaseException]
    before: object = None  # called with the call number before each cell

    def __init__(self, cfg):
        pass

    def __call__(self, cell):
        type(self).calls.append(cell.id)
        n = len(type(self).calls)
        if type(self).before is not None:
            type(self).before(n)
        if n in type(self).raise_at:
            raise type(self).raise_at[n]
        return {
            "test_acc": 90.0 + n,
            "test_loss": 0.1,
            "float_acc": 95.0,
            "float_loss": 0.1,
            "weight_sqnr_db": 30.0,
            "bits_per_weight": 8.0,
            "model_bytes": 100,
            "float32_bytes": 400,
        }


@pytest.fixture
def fake(monkeypatch):
    cls = type("FakeEvaluator", (Fake,), {"calls": [], "raise_at": {}, "before": None})
    monkeypatch.setattr(R, "Evaluator", cls)
    return cls


def sweep(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["sweep", "--no-progress", "--no-plots", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def quick(capsys, out: Path, *argv: str) -> tuple[int, str, str]:
    return sweep(capsys, "--quick", "--out", str(out), *argv)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and err.endswith("\n"), err
    return err


# ------------------------------------------------------------------------ merge


def test_merge_into_a_run_folder_of_the_same_config_keeps_its_rows(tmp_path, capsys, fake):
    dst, src = tmp_path / "dst", tmp_path / "src"
    assert quick(capsys, dst)[0] == 0
    before = (dst / "results.jsonl").read_bytes()
    assert quick(capsys, src, "--shard", "1/2")[0] == 0  # 2 cells, other values
    code, text, err = sweep(capsys, "--merge", str(src), "--out", str(dst))
    assert code == 0 and "0 missing" in text, err
    after = (dst / "results.jsonl").read_bytes()
    assert after.startswith(before)  # every row of dst kept as it was
    assert len(R.read_rows(dst / "results.jsonl")) == N_CELLS + 2
    assert {r["id"] for r in R.read_rows(dst / "results.jsonl")} == {c.id for c in G.expand(QUICK)}
    # merging the same rows again adds nothing
    assert sweep(capsys, "--merge", str(src), "--out", str(dst))[0] == 0
    assert (dst / "results.jsonl").read_bytes() == after
    # the merged folder resumes as a run folder: nothing to run
    code, text, _ = quick(capsys, dst)
    assert code == 0 and f"(0 run, {N_CELLS} already done" in text


@pytest.mark.parametrize("damage", ["none", "config.toml", "config.toml+env.json"])
def test_merge_refuses_a_folder_of_another_config(tmp_path, capsys, fake, damage):
    dst, src = tmp_path / "dst", tmp_path / "src"
    assert sweep(capsys, "--quick", "--preset", "digits-cnn", "--out", str(dst))[0] == 0
    assert quick(capsys, src)[0] == 0
    for name in damage.split("+") if damage != "none" else []:
        (dst / name).unlink()
    before = snapshot(dst)
    code, out, err = sweep(capsys, "--merge", str(src), "--out", str(dst))
    assert code == 2 and out == ""
    assert "another config" in one_line(err) and str(dst) in err and "new --out" in err
    assert snapshot(dst) == before


def test_merge_refuses_a_folder_that_is_not_a_run_folder(tmp_path, capsys, fake):
    src, dst = tmp_path / "src", tmp_path / "mine"
    assert quick(capsys, src)[0] == 0
    dst.mkdir()
    (dst / "results.csv").write_text("my own results\n")
    code, _, err = sweep(capsys, "--merge", str(src), "--out", str(dst))
    assert code == 2 and "not a run folder" in one_line(err)
    assert snapshot(dst) == {"results.csv": b"my own results\n"}


def test_merge_names_a_damaged_source(tmp_path, capsys, fake):
    src = tmp_path / "src"
    assert quick(capsys, src)[0] == 0
    (src / "config.toml").write_text("[grid\n")
    code, _, err = sweep(capsys, "--merge", str(src), "--out", str(tmp_path / "dst"))
    assert code == 2 and "damaged config.toml" in one_line(err) and str(src) in err
    assert not (tmp_path / "dst").exists()


# ----------------------------------------------------------------------- resume


@pytest.mark.parametrize("damage", ["deleted", "corrupt", "empty", "deleted+env", "corrupt+env"])
def test_resume_refuses_another_config_whatever_is_left(tmp_path, capsys, fake, damage):
    out = tmp_path / "run"
    assert quick(capsys, out)[0] == 0
    toml = out / "config.toml"
    if damage.startswith("deleted"):
        toml.unlink()
    elif damage.startswith("corrupt"):
        toml.write_bytes(toml.read_bytes()[:37] + b"\x00\xff[[")
    else:
        toml.write_text("")
    if damage.endswith("+env"):
        (out / "env.json").unlink()
    before = snapshot(out)
    fake.calls.clear()
    code, text, err = sweep(capsys, "--quick", "--preset", "digits-cnn", "--out", str(out))
    assert code == 2 and text == "" and not fake.calls
    assert "another config" in one_line(err) and "already done" not in err
    assert C.config_hash(QUICK) in err and C.config_hash(CNN) in err
    assert snapshot(out) == before


def test_resume_with_damaged_config_toml_trusts_matching_rows(tmp_path, capsys, fake):
    out = tmp_path / "run"
    assert quick(capsys, out)[0] == 0
    (out / "config.toml").write_text("not toml [")
    (out / "env.json").unlink()
    code, text, _ = quick(capsys, out)  # the rows say whose folder it is: this config's
    assert code == 0 and f"(0 run, {N_CELLS} already done" in text
    assert C.config_hash(C.load(out / "config.toml")) == C.config_hash(QUICK)  # rewritten


def test_resume_counts_only_rows_of_this_config(tmp_path, capsys, fake):
    out = tmp_path / "run"
    assert quick(capsys, out)[0] == 0
    rows = R.read_rows(out / "results.jsonl")
    # Rows of another config in a folder whose config.toml is this one's (as an earlier
    # version could leave it): not done.
    for r in rows[1:]:
        r["config_hash"] = "0123456789"
        r["test_acc"] = -77.0
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fake.calls.clear()
    code, text, err = quick(capsys, out)
    assert code == 0 and f"({N_CELLS - 1} run, 1 already done" in text
    assert sorted(fake.calls) == sorted(r["id"] for r in rows[1:])
    assert one_line(err).startswith("jaxquant: warning: sweep: ignored 4 rows of another")
    assert "-77.00" not in (out / "summary.md").read_text()  # nothing misattributed
    with open(out / "results.csv") as f:
        assert "0123456789" not in f.read()


def test_rows_record_the_config_hash(tmp_path, capsys, fake):
    out = tmp_path / "run"
    assert quick(capsys, out)[0] == 0
    rows = R.read_rows(out / "results.jsonl")
    assert len(rows) == N_CELLS and {r["config_hash"] for r in rows} == {C.config_hash(QUICK)}


def test_malformed_rows_are_skipped_and_reported(tmp_path, capsys, fake):
    out = tmp_path / "run"
    assert quick(capsys, out)[0] == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    no_id = json.loads(lines[1])
    del no_id["id"]
    bad_acc = json.loads(lines[2]) | {"test_acc": "high"}
    damaged = [
        lines[0],
        json.dumps(no_id),
        json.dumps(bad_acc),
        "{not json",
        "[1, 2]",
        lines[3],
        lines[4][:25],  # a torn last line
    ]
    (out / "results.jsonl").write_text("\n".join(damaged))
    fake.calls.clear()
    code, text, err = quick(capsys, out)
    assert code == 0 and "(3 run, 2 already done, 0 failed)" in text
    line = one_line(err)
    assert line.startswith("jaxquant: warning: sweep: skipped 5 malformed rows")
    assert 'line 2: no "id"; line 3: an ok row without a number "test_acc"' in line
    assert "line 4: not JSON; and 2 more)" in line
    rows = R.read_rows(out / "results.jsonl")
    assert {r["id"] for r in rows} == {c.id for c in G.expand(QUICK)}
    # the merge of such a folder skips them too, and says so
    code, text, err = sweep(capsys, "--merge", str(out), "--out", str(tmp_path / "m"))
    assert code == 0 and "skipped 4 malformed rows" in one_line(err)


def test_a_complete_last_line_without_newline_is_kept(tmp_path, fake):
    path = tmp_path / "results.jsonl"
    path.write_text('{"a": 1}\n{"b": 2}')
    assert F.repair(path) is False and path.read_text() == '{"a": 1}\n{"b": 2}\n'
    path.write_text('{"a": 1}\n{"b": ')
    assert F.repair(path) is True and path.read_text() == '{"a": 1}\n'


# ------------------------------------------------------------------------- lock


def test_a_locked_folder_is_refused_at_once(tmp_path, capsys, fake):
    out, src = tmp_path / "run", tmp_path / "src"
    assert quick(capsys, src)[0] == 0
    fake.calls.clear()
    out.mkdir()
    with F.RunLock(out):
        code, _, err = quick(capsys, out)
        assert code == 2 and "in use by another sweep" in one_line(err)
        assert f"{os.getpid()} " in err and str(out) in err
        code, _, err = sweep(capsys, "--merge", str(src), "--out", str(out))
        assert code == 2 and "in use" in one_line(err)
    assert not fake.calls and not (out / "results.jsonl").exists()
    assert not (out / F.LOCK_NAME).exists()  # released and removed
    assert quick(capsys, out)[0] == 0


def test_a_stale_lock_is_taken_over(tmp_path, capsys, fake):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(dead.stdout)
    out = tmp_path / "run"
    out.mkdir()
    (out / F.LOCK_NAME).write_text(f"{pid} somehost\n")  # a killed sweep's lock file
    code, _, err = quick(capsys, out)
    assert code == 0 and f"took over the lock of {out} left by {pid} somehost" in one_line(err)
    assert len(fake.calls) == N_CELLS and not (out / F.LOCK_NAME).exists()


RACER = """
import os, sys, time
from pathlib import Path
from jaxquant.app.sweep import run as R
from jaxquant.app.cli import main

flag = Path(sys.argv[1])


class Slow:
    def __init__(self, cfg):
        pass

    def __call__(self, cell):
        (flag / "started").touch()
        for _ in range(6000):  # until the test says go (at most 60 s)
            if (flag / "go").exists():
                break
            time.sleep(0.01)
        return {"test_acc": 1.0, "test_loss": 0.1, "float_acc": 1.0, "float_loss": 0.1,
                "weight_sqnr_db": 1.0, "bits_per_weight": 8.0, "model_bytes": 1,
                "float32_bytes": 4}


R.Evaluator = Slow
sys.exit(main(["sweep", "--quick", "--no-plots", "--no-progress", "--out", sys.argv[2]]))
"""


@pytest.mark.slow
def test_two_processes_on_one_out_do_not_both_run(tmp_path, capsys, fake):
    script, flag, out = tmp_path / "racer.py", tmp_path / "flag", tmp_path / "run"
    script.write_text(RACER)
    flag.mkdir()
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        # The racer imports this checkout's jaxquant, installed or not.
        root = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path}
        argv = [sys.executable, str(script), str(flag), str(out)]
        first = subprocess.Popen(argv, stderr=f, env=env)
    try:
        for _ in range(12000):  # the first one is inside a cell: it holds the lock
            if (flag / "started").exists() or first.poll() is not None:
                break
            threading.Event().wait(0.01)
        assert (flag / "started").exists(), log.read_text()
        code, _, err = quick(capsys, out)  # this process is the second sweep
        assert code == 2 and "in use by another sweep" in one_line(err)
        assert f"{first.pid} " in err and not fake.calls
    finally:
        (flag / "go").touch()
        first.wait(120)
    assert first.returncode == 0, log.read_text()
    ids = [r["id"] for r in R.read_rows(out / "results.jsonl")]
    assert sorted(ids) == sorted(c.id for c in G.expand(QUICK))  # each cell once


def test_two_threads_racing_on_one_out_run_each_cell_once(tmp_path, fake):
    out = tmp_path / "run"
    start = threading.Barrier(2)
    results: list = []

    def go():
        start.wait()
        try:
            results.append(R.run_sweep(QUICK, out, progress=None, plots=False)["ran"])
        except F.FolderBusy as err:
            results.append(err)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ran = [r for r in results if isinstance(r, int)]
    busy = [r for r in results if isinstance(r, F.FolderBusy)]
    # One ran every cell; the other was refused, or came after and found them done.
    assert sorted(ran) in ([N_CELLS], [0, N_CELLS]) and len(ran) + len(busy) == 2
    assert sorted(fake.calls) == sorted(c.id for c in G.expand(QUICK))
    assert len(R.read_rows(out / "results.jsonl")) == N_CELLS


@pytest.mark.slow
def test_concurrent_atomic_writes_never_collide(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # names collide or not; disks aside
    path = tmp_path / "results.csv"
    texts = [f"writer {i}\n" * 8 for i in range(6000)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda t: F.atomic_write(path, t), texts))  # re-raises any error
    assert path.read_text() in set(texts)
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]  # no temporary left


# ----------------------------------------------------- bad --out, full disk, Ctrl-C


def test_out_that_is_a_file(tmp_path, capsys, fake):
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    code, _, err = quick(capsys, path)
    assert code == 2 and "is a file, not a folder" in one_line(err) and str(path) in err
    assert path.read_text() == "keep me"
    code, _, err = sweep(capsys, "--merge", str(tmp_path), "--out", str(path))
    assert code == 2 and path.read_text() == "keep me"


def test_out_whose_parent_is_a_file(tmp_path, capsys, fake):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "run"
    code, _, err = quick(capsys, out)
    line = one_line(err)
    assert code == 1 and "Not a directory" in line and "nothing was written" in line
    assert "whose parents are folders" in line and "Traceback" not in line


def test_out_in_a_folder_that_is_not_a_run_folder(tmp_path, capsys, fake):
    (tmp_path / "summary.md").write_text("my notes")
    code, _, err = quick(capsys, tmp_path)
    assert code == 2 and "not a run folder" in one_line(err)
    assert (tmp_path / "summary.md").read_text() == "my notes"


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes read-only folders"
)
def test_read_only_parent(tmp_path, capsys, fake):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, _, err = quick(capsys, ro / "run")
    finally:
        ro.chmod(0o755)
    assert code == 1 and "Permission denied" in one_line(err) and "nothing was written" in err


def test_read_only_parent_simulated(tmp_path, capsys, fake, monkeypatch):
    """As test_read_only_parent, where root ignores permissions: mkdir is refused."""
    out = tmp_path / "ro" / "run"
    real = Path.mkdir

    def refused(self, *a, **k):
        if self in (out, out.parent):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", refused)
    code, _, err = quick(capsys, out)
    line = one_line(err)
    assert code == 1 and "Permission denied" in line and f"{out} was not created" in line
    assert "make it writable or pass another --out" in line and not fake.calls


def test_read_only_run_folder(tmp_path, capsys, fake, monkeypatch):
    """A finished run folder made read-only (simulated: root ignores permissions)."""
    out = tmp_path / "run"
    assert quick(capsys, out, "--shard", "0/2")[0] == 0
    before = snapshot(out)
    real_open = os.open

    def read_only(path, flags, *a, **k):
        if Path(path).parent == out and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", read_only)
    code, _, err = quick(capsys, out, "--shard", "0/2")
    monkeypatch.setattr(os, "open", real_open)
    line = one_line(err)
    assert code == 1 and "Permission denied" in line and "kept 3 of 3 finished cells" in line
    assert "make it writable or pass another --out, then resume with: jaxquant sweep" in line
    assert snapshot(out) == before


def resume_argv(err: str) -> list[str]:
    argv = shlex.split(err.split("resume with: ", 1)[1])
    assert argv[:2] == ["jaxquant", "sweep"]
    return argv[1:]


def test_full_disk_keeps_the_rows_and_says_how_to_resume(tmp_path, capsys, fake, monkeypatch):
    out = tmp_path / "run"
    real = R.append_row
    written = []

    def disk_fills(path, row):
        if len(written) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        written.append(row["id"])
        real(path, row)

    monkeypatch.setattr(R, "append_row", disk_fills)
    code, text, err = quick(capsys, out)
    line = one_line(err)
    assert code == 1 and "No space left on device" in line
    assert f"kept 2 of {N_CELLS} finished cells in {out}" in line
    assert "free some disk space, then resume with:" in line
    assert R.read_rows(out / "results.jsonl") and not list(out.glob(".*.tmp"))
    monkeypatch.setattr(R, "append_row", real)
    fake.calls.clear()
    code, text, _ = sweep(capsys, *resume_argv(err)[1:])
    assert code == 0 and f"({N_CELLS - 2} run, 2 already done, 0 failed)" in text
    assert sorted(fake.calls) == sorted(c.id for c in G.expand(QUICK) if c.id not in written)


def test_ctrl_c_prints_one_line_and_the_resume_command(tmp_path, capsys, fake, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out: runs/<time>-<hash>
    fake.raise_at = {4: KeyboardInterrupt()}
    code, text, err = sweep(capsys, "--quick")
    line = one_line(err)
    assert code == 130 and line.startswith("jaxquant: interrupted: sweep stopped; kept 3 of")
    argv = resume_argv(err)
    out = Path(argv[argv.index("--out") + 1])
    assert out.parent == Path("runs") and out.name.endswith(C.config_hash(QUICK))
    assert argv[1:] == ["--quick", "--out", str(out), "--no-plots", "--no-progress"]
    fake.raise_at = {}
    code, text, _ = sweep(capsys, *argv[1:])
    assert code == 0 and f"({N_CELLS - 3} run, 3 already done, 0 failed)" in text


def test_ctrl_c_with_progress_bar_and_sigterm_text(tmp_path, capsys, fake):
    fake.raise_at = {1: KeyboardInterrupt("signal 15")}
    code = main(["sweep", "--quick", "--no-plots", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err and "kept 0 of" in err.splitlines()[-1]


def test_ctrl_c_in_another_command_is_one_line(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(
        cli,
        "SUBCOMMANDS",
        [s._replace(run=interrupted) if s.name == "formats" else s for s in cli.SUBCOMMANDS],
    )
    assert main(["formats"]) == 130
    assert capsys.readouterr().err == "jaxquant: interrupted\n"


# ------------------------------------------------------------- integer options


@pytest.mark.parametrize("seed", ["99999999999999999999", "-1", "4294967296", "-99999999999999"])
def test_seed_out_of_range_is_a_usage_error(capsys, seed):
    code = main(["quantize", "1", "2", "--stochastic", "--seed", seed])
    err = capsys.readouterr().err
    assert code == 2 and "argument --seed" in one_line(err) and "0 to 4294967295" in err
    assert str(int(seed)) in err


@pytest.mark.slow
def test_seed_range_ends_are_accepted(capsys):
    for seed in ("0", "4294967295"):
        assert main(["quantize", "1", "2", "--stochastic", "--seed", seed]) == 0
        assert f"seed {seed}" in capsys.readouterr().out


def test_every_integer_option_has_a_range():
    parser = cli.build_parser([sweep_command.SUBCOMMAND])  # the installed script's set
    subparsers = next(a for a in parser._actions if a.choices and a.dest == "command")
    ints = [
        (name, a.dest)
        for name, sub in subparsers.choices.items()
        for a in sub._actions
        if a.type is int
    ]
    assert ints and all(dest in cli.INT_OPTIONS for _, dest in ints), ints


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("seeds = [4294967296]", "seeds[0] = 4294967296 must be an integer in [0, 4294967295]"),
        ("seeds = [99999999999999999999]", "seeds[0] = 99999999999999999999"),
        ("[task]\nbatch = 99999999999", "task.batch = 99999999999 must be in [1, 2147483647]"),
        ("[task]\nepochs = 99999999999", "task.epochs = 99999999999"),
        ("[task]\nsteps = 99999999999", "task.steps = 99999999999"),
        ("[qat]\nsteps = 99999999999", "qat.steps = 99999999999 must be in [1, 2147483647]"),
    ],
)
def test_config_integers_out_of_range(tmp_path, capsys, toml, needle):
    path = tmp_path / "bad.toml"
    path.write_text(toml + "\n")
    code, out, err = sweep(capsys, "--config", str(path), "--out", str(tmp_path / "never"))
    assert code == 2 and out == "" and needle in one_line(err)
    assert not (tmp_path / "never").exists()


def test_shard_with_huge_numbers_is_fine(tmp_path, capsys, fake):
    code, text, _ = quick(
        capsys, tmp_path / "r", "--shard", "99999999999999999998/99999999999999999999"
    )
    assert code == 0 and "0 cells (0 run" in text and not fake.calls
