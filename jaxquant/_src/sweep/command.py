"""``jaxquant sweep``: the command-line front end of the sweep.

Usage::

    jaxquant sweep                              # the default grid (digits MLP, 2 seeds)
    jaxquant sweep --quick                      # a tiny grid, one seed (seconds)
    jaxquant sweep --preset digits-cnn            # or stdlib-lm (a byte-level transformer)
    jaxquant sweep --config my.toml --out runs/mine   # re-run the same line to resume
    jaxquant sweep --shard 0/2 --out runs/a          # on host 0; host 1 runs --shard 1/2
    jaxquant sweep --merge runs/a runs/b --out runs/ab
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

_SHARD = re.compile(r"(\d+)/(\d+)")


def _shard(text: str) -> tuple[int, int]:
    m = _SHARD.fullmatch(text.strip())
    if m is None or not int(m.group(1)) < int(m.group(2)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shard I/N with 0 <= I < N (e.g. 0/2)")
    return int(m.group(1)), int(m.group(2))


def add_arguments(p: argparse.ArgumentParser) -> None:
    from jaxquant._src.sweep.config import PRESETS

    p.add_argument(
        "--config",
        metavar="TOML",
        help="a TOML config: seeds, [task] model/data by import path, [grid], [qat]",
    )
    p.add_argument(
        "--preset", choices=sorted(PRESETS), help="built-in task and grid (default digits-mlp)"
    )
    p.add_argument("--quick", action="store_true", help="a tiny grid and one seed (seconds)")
    p.add_argument(
        "--out",
        metavar="DIR",
        help="run folder (default runs/<time>-<confighash>); reuse it to resume",
    )
    p.add_argument(
        "--shard",
        type=_shard,
        metavar="I/N",
        help="run only cells i %% N == I (default: jax.process_index()/process_count())",
    )
    p.add_argument("--merge", nargs="+", metavar="DIR", help="merge these shard folders into --out")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args: argparse.Namespace) -> int:
    """Run (or merge) a sweep; print the table. Exit status 1 if any cell failed, 2 for a
    bad config."""
    from jaxquant._src.sweep import config as C
    from jaxquant._src.sweep import run as R

    try:
        if args.merge:
            if not args.out:
                raise C.ConfigError("sweep merge: --out DIR is required with --merge")
            res = R.merge([Path(d) for d in args.merge], Path(args.out), plots=not args.no_plots)
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
        out = Path(args.out) if args.out else R.default_out(cfg)
        shard = args.shard or R.default_shard()
        res = R.run_sweep(
            cfg,
            out,
            shard=shard,
            progress=None if args.no_progress else sys.stderr,
            plots=not args.no_plots,
        )
    except C.ConfigError as err:
        print(f"jaxquant: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(res["table"])
    failed = sum(r["status"] != "ok" for r in res["rows"])
    print(
        f"\n{len(res['rows'])} cells ({res['ran']} run, {res['skipped']} already done, "
        f"{failed} failed) -> {out}"
    )
    return 1 if failed else 0
