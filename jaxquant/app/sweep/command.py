"""``jaxquant sweep``: the command-line front end of the sweep.

Usage::

    jaxquant sweep                              # the default grid (byte-level LM, 2 seeds)
    jaxquant sweep --quick                      # a tiny grid, one seed (seconds)
    jaxquant sweep --preset digits-mlp            # or digits-cnn (scikit-learn's digits)
    jaxquant sweep --config my.toml --out runs/mine   # re-run the same line to resume
    jaxquant sweep --out gs://bucket/runs/a     # on every host of a slice: one run folder
    jaxquant sweep --coordinator 10.0.0.2:8476 --num-processes 2 --process-id 0 --out /nfs/a
    jaxquant sweep --shard 0/2 --out runs/a    # by hand, no jax.distributed; then:
    jaxquant sweep --merge runs/a runs/b --out runs/ab

A run folder takes one sweep at a time and only its own config's results; an error, a
full disk or Ctrl-C prints one line saying what was kept and the command that resumes.
"""

from __future__ import annotations

import argparse
import errno
import re
import shlex
import sys

from jaxquant.cli import Subcommand
from jaxquant.extras import require_extra

_SHARD = re.compile(r"(\d+)/(\d+)")


def _shard(text: str) -> tuple[int, int]:
    m = _SHARD.fullmatch(text.strip())
    if m is None or not int(m.group(1)) < int(m.group(2)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shard I/N with 0 <= I < N (e.g. 0/2)")
    return int(m.group(1)), int(m.group(2))


def _count(text: str) -> int:
    if not text.strip().isdigit() or not 1 <= int(text) <= 2**20:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of processes from 1 to 2**20")
    return int(text)


def _index(text: str) -> int:
    if not text.strip().isdigit() or int(text) >= 2**20:
        raise argparse.ArgumentTypeError(f"{text!r} is not a process id from 0 to 2**20 - 1")
    return int(text)


MULTIHOST = """\
multi-host: run the same command on every host of a slice, with an --out that every
host sees (gs://bucket/path, or a shared file system). jax.distributed starts by
itself where jax detects the cluster (Slurm, Open MPI, Cloud TPU, GKE, Kubernetes), or
with --coordinator HOST:PORT (process 0's address) --num-processes N --process-id I on
each host. Each cell runs once, on process (cell position %% N); each process appends
its rows to <out>/processes/<i>of<N>.jsonl; process 0 waits for the others and writes
results.jsonl, results.csv, summary.md and the plots. Re-run the same command on every
host to resume. On object storage the folder's lock is a lease (sweep.lock, renewed
every minute; one not renewed for 5 minutes is taken over).

"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from jaxquant.app.sweep.config import FORMAT, PRESETS

    # The TOML format, every key with an example, closes --help (kept as written).
    p.epilog = MULTIHOST.replace("%%", "%") + FORMAT
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument(
        "--config",
        metavar="TOML",
        help="a TOML config: seeds, [task] (a Linen or NNX model, data, call arguments, "
        "loss / metric / output functions by import path), [grid], [qat]; the format is "
        "below",
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="built-in task and grid (default stdlib-lm; under --config, digits-mlp)",
    )
    p.add_argument("--quick", action="store_true", help="a tiny grid and one seed (seconds)")
    p.add_argument(
        "--out",
        metavar="DIR",
        help="run folder, local or gs://... (default runs/<time>-<confighash>; required on "
        "several hosts); reuse it to resume (one sweep at a time; a folder of another "
        "config is refused)",
    )
    p.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="jax.distributed: process 0's address and a free port, the same on every host "
        "(default: detected on Slurm, Open MPI, Cloud TPU, Kubernetes; none on one machine)",
    )
    p.add_argument(
        "--num-processes",
        type=_count,
        metavar="N",
        help="jax.distributed: how many processes (hosts) run the sweep",
    )
    p.add_argument(
        "--process-id",
        type=_index,
        metavar="I",
        help="jax.distributed: this process's number, 0 to N-1 (0 writes the table)",
    )
    p.add_argument(
        "--shard",
        type=_shard,
        metavar="I/N",
        help="by hand, without jax.distributed: run only cells i %% N == I into this --out "
        "(a folder per shard; then --merge them)",
    )
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="DIR",
        help="merge these shard folders into --out (a new folder, or a run folder of the "
        "same config: its rows are kept)",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _resume_command(args: argparse.Namespace, out, shard: tuple[int, int] | None) -> str:
    """The command line that picks this run up where it stopped (always naming --out:
    a default folder has a time in its name; a multi-host sweep's, on every host)."""
    if args.merge:
        argv = ["jaxquant", "sweep", "--merge", *args.merge, "--out", str(out)]
    else:
        argv = ["jaxquant", "sweep"]
        argv += ["--config", args.config] if args.config else []
        argv += ["--preset", args.preset] if args.preset else []
        argv += ["--quick"] if args.quick else []
        argv += ["--out", str(out)]
        if args.shard:
            argv += ["--shard", "{}/{}".format(*args.shard)]
        for flag in ("coordinator", "num_processes", "process_id"):
            if getattr(args, flag, None) is not None:
                argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    argv += ["--no-plots"] if args.no_plots else []
    argv += ["--no-progress"] if args.no_progress else []
    return shlex.join(argv)


_FIXES = {
    errno.ENOSPC: "free some disk space",
    errno.EDQUOT: "free some of your disk quota",
    errno.EACCES: "make it writable or pass another --out",
    errno.EPERM: "make it writable or pass another --out",
    errno.EROFS: "pass an --out on a writable file system",
    errno.ENOTDIR: "pass an --out whose parents are folders",
    errno.ENOENT: "pass an --out whose parent exists",
}


def _stopped(
    what: str,
    args: argparse.Namespace,
    out,
    cfg: dict | None,
    shard: tuple[int, int] | None,
    err: OSError | None = None,
) -> str:
    """One line: what happened, what was kept, how to resume."""
    from jaxquant.app.sweep import run as R

    fix = "" if err is None else _FIXES.get(err.errno or 0, "fix the cause")
    if out is None or (cfg is None and not args.merge):
        return f"{what}; nothing was written" + (f"; {fix}" if fix else "")
    if not out.is_dir():  # the same --out would fail the same way: the fix names another
        return f"{what}; nothing was written ({out} was not created)" + (f"; {fix}" if fix else "")
    if args.merge:
        kept = f"the source folders are unchanged and no row of {out} was lost"
        again = "run it again"
    else:
        assert cfg is not None  # no config and no merge returned above
        n, total = R.kept(out, cfg, shard or (0, 1))
        kept = f"kept {n} of {total} finished cells in {out}"
        again = "resume with"
    then = f"{fix}, then " if fix else ""
    if shard is not None and shard[1] > 1 and not args.shard and not args.merge:
        again += " the same command on every host"
    return f"{what}; {kept}; {then}{again}: {_resume_command(args, out, shard)}"


def _os_error(err: OSError) -> str:
    where = f" ({err.filename})" if err.filename else ""
    return f"sweep: {err.strerror or err}{where}"


def run(args: argparse.Namespace) -> int:
    """Run (or merge) a sweep; print the table. Exit status 1 if any cell failed or a
    file could not be written, 2 for a bad config or run folder, 130 when interrupted
    (each with one line on stderr saying what was kept and how to resume)."""
    from jaxquant.app.sweep import config as C
    from jaxquant.app.sweep import folder as F
    from jaxquant.app.sweep import hosts as H
    from jaxquant.app.sweep import run as R

    cfg = out = shard = None
    distributed = [
        f"--{k.replace('_', '-')}"
        for k in ("coordinator", "num_processes", "process_id")
        if getattr(args, k, None) is not None
    ]
    try:
        if distributed and (args.merge or args.shard):
            raise C.ConfigError(
                f"sweep: {distributed[0]} starts a multi-host sweep, which shares the "
                f"cells itself; drop {'--merge' if args.merge else '--shard'} (or "
                f"{', '.join(distributed)})."
            )
        if args.merge:
            if not args.out:
                raise C.ConfigError("sweep merge: --out DIR is required with --merge")
            out = F.as_path(args.out)
            res = R.merge(list(args.merge), out, plots=not args.no_plots)
            print(res["table"])
            print(
                f"\nmerged {len(args.merge)} folders: {len(res['rows'])} cells, "
                f"{len(res['missing'])} missing or failed -> {args.out}"
            )
            return 1 if res["missing"] else 0
        if args.config:
            cfg = C.load(args.config, preset=args.preset, quick=args.quick)
        else:
            cfg = C.resolve(preset=args.preset, quick=args.quick)
        procs = H.Processes(0, 1)
        if not args.shard:
            try:
                procs = H.initialize(args.coordinator, args.num_processes, args.process_id)
            except ValueError as err:
                raise C.ConfigError(str(err)) from None
        shard = args.shard or tuple(procs)
        if procs.process_count > 1 and not args.out:
            raise C.ConfigError(
                f"sweep: {procs.process_count} processes share one run folder: pass --out on "
                "storage every host sees (gs://bucket/path, or a shared file system)."
            )
        out = F.as_path(args.out) if args.out else R.default_out(cfg, shard)
        progress = None if args.no_progress else sys.stderr
        if procs.process_count > 1:
            res = H.run_processes(cfg, out, procs, progress=progress, plots=not args.no_plots)
            return _report_processes(res, procs, out)
        res = R.run_sweep(cfg, out, shard=shard, progress=progress, plots=not args.no_plots)
    except C.ConfigError as err:
        _line("error", str(err))
        return 2
    except KeyboardInterrupt:
        _line("interrupted", _stopped("sweep stopped", args, out, cfg, shard))
        return 130
    except OSError as err:
        _line("error", _stopped(_os_error(err), args, out, cfg, shard, err))
        return 1
    print(res["table"])
    failed = sum(r["status"] != "ok" for r in res["rows"])
    print(
        f"\n{len(res['rows'])} cells ({res['ran']} run, {res['skipped']} already done, "
        f"{failed} failed) -> {out}"
    )
    return 1 if failed else 0


def _report_processes(res: dict, procs, out) -> int:
    """Process 0 prints the merged table; the others a line on their own cells."""
    failed = sum(r["status"] != "ok" for r in res["rows"])
    if res["table"] is None:
        print(
            f"process {procs.process_index} of {procs.process_count}: {len(res['rows'])} "
            f"cells ({res['ran']} run, {res['skipped']} already done, {failed} failed); "
            f"process 0 writes the table to {out}"
        )
        return 1 if failed else 0
    print(res["table"])
    print(
        f"\n{len(res['rows'])} cells ({res['ran']} run by {procs.process_count} processes, "
        f"{res['skipped']} already done, {failed} failed) -> {out}"
    )
    for j, why in sorted(res["stopped"].items()):
        _line("error", f"sweep: process {j} of {procs.process_count} stopped early: {why}")
    return 1 if failed or res["stopped"] else 0


def _line(kind: str, message: str) -> None:
    print(f"jaxquant: {kind}: {' '.join(message.split())}", file=sys.stderr)


def _run_checked(args: argparse.Namespace) -> int:
    # The sweep's packages are an extra: refuse before training anything, not at the plots.
    require_extra("sweep", "jaxquant sweep")
    return run(args)


SUBCOMMAND = Subcommand(
    "sweep",
    "evaluate a grid of formats x granularity x calibration x rounding x PTQ/QAT",
    add_arguments,
    _run_checked,
)
