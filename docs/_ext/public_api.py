"""What jaxquant's public API is: one definition for the Sphinx coverage check
(``coverage_check.py``) and the fast tests (``tests/test_docs.py``). No Sphinx import.

A module is public when no part of its dotted name starts with an underscore, at any
depth (``jaxquant.formats``, ``jaxquant.app.models``). Its public names are its
``__all__``; a public module must declare one (empty when it exports nothing), so that
what is public is written down rather than inferred. The one exception is
:data:`COMMAND_MODULES`.
"""

from __future__ import annotations

import importlib
import pkgutil

# The `jaxquant sweep` command's implementation: its interface is the command line (the
# README and ``jaxquant sweep --help``), not Python names, so its modules are not walked.
COMMAND_MODULES = ("jaxquant.app.sweep",)


def _is_command(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in COMMAND_MODULES)


def public_modules() -> list[str]:
    """``jaxquant`` and every public module below it, at any depth, sorted (less
    :data:`COMMAND_MODULES`)."""
    found = []

    def walk(name: str) -> None:
        found.append(name)
        mod = importlib.import_module(name)
        for info in pkgutil.iter_modules(getattr(mod, "__path__", [])):
            sub = f"{name}.{info.name}"
            # private and command packages are pruned before being imported
            if not info.name.startswith("_") and not _is_command(sub):
                walk(sub)

    walk("jaxquant")
    return sorted(found)


def public_names(mod_name: str) -> list[str]:
    """``mod_name.__all__``; a ValueError naming the module if it has none."""
    mod = importlib.import_module(mod_name)
    names = getattr(mod, "__all__", None)
    if names is None:
        raise ValueError(
            f"public module {mod_name} has no __all__: declare its public names (an empty "
            "list if it exports none), or give it a leading underscore if it is private"
        )
    return list(names)
