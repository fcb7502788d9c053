"""The ``jaxquant`` command line as a library: its core subcommands (``formats``,
``explain``, ``quantize``) and :func:`main`, which an application extends with its own
:class:`Subcommand` entries (the installed script, :func:`jaxquant.app.cli.main`, adds
``sweep``)."""

from jaxquant._src.cli import Subcommand, main

__all__ = ["Subcommand", "main"]
