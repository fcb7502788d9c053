"""The installed ``jaxquant`` script: the core's subcommands plus the application's
``sweep`` (``[project.scripts]`` in pyproject.toml points here; ``python3 -m
jaxquant.app.cli`` is the same)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import jaxquant.cli
from jaxquant.app.sweep import command as sweep_command

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``jaxquant`` with every subcommand (``formats``, ``explain``, ``quantize``,
    ``sweep``); returns the exit status.

    Example:
      >>> from jaxquant.app.cli import main
      >>> main(["explain", "0.1", "--format", "bf16"])  # doctest: +ELLIPSIS
      0.1 ...
      0
    """
    return jaxquant.cli.main(argv, commands=[sweep_command.SUBCOMMAND])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
