"""Optional dependencies: which feature needs which pip extra, and the error that says so.

``import jaxquant`` needs only the core dependencies (pyproject.toml's ``dependencies``).
A feature built on an extra's packages imports them when first used and, when they are
missing, raises :class:`MissingExtraError` naming the extra and the command that installs
it, instead of a bare ``ModuleNotFoundError`` deep inside the feature.
"""

from __future__ import annotations

import importlib.util

# extra -> the packages it installs, as (import name, pip name); pyproject.toml's
# [project.optional-dependencies] is the source of truth, tests/test_packaging.py checks
# that the two agree.
EXTRAS: dict[str, tuple[tuple[str, str], ...]] = {
    "checkpoint": (("orbax.checkpoint", "orbax-checkpoint"),),
    "sweep": (
        ("matplotlib", "matplotlib"),
        ("sklearn", "scikit-learn"),
        ("etils.epath", "etils[epath]"),
    ),
}


class MissingExtraError(ImportError):
    """A feature's optional dependency is not installed; the message names the extra.

    Example:
      >>> from jaxquant.extras import MissingExtraError
      >>> issubclass(MissingExtraError, ImportError)  # ``except ImportError`` still catches it
      True
    """


def missing_extra(extra: str, feature: str, packages: tuple[str, ...] = ()) -> MissingExtraError:
    """The error for ``feature`` used without ``extra`` installed (raise it ``from`` the
    ImportError that revealed it, so the original cause stays in the traceback).

    ``packages`` are the pip names found missing; by default every package of the extra.

    Example:
      >>> from jaxquant.extras import missing_extra
      >>> print(missing_extra("checkpoint", "jaxquant.orbax"))  # doctest: +ELLIPSIS
      jaxquant.orbax needs orbax-checkpoint, ... pip install "jaxquant[checkpoint]"
    """
    if extra not in EXTRAS:
        raise ValueError(f"missing_extra: extra must be one of {sorted(EXTRAS)}, got {extra!r}")
    names = packages or tuple(pip for _, pip in EXTRAS[extra])
    return MissingExtraError(
        f"{feature} needs {', '.join(names)}, which jaxquant installs with its {extra!r} "
        f'extra: pip install "jaxquant[{extra}]"'
    )


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package, or a broken install
        return False


def require_extra(extra: str, feature: str) -> None:
    """Raise :class:`MissingExtraError` unless every package of ``extra`` is importable.

    Checks without importing (``importlib.util.find_spec``), so a command can refuse at
    its start instead of failing after its work, when it first imports the package.

    Example:
      >>> from jaxquant.extras import require_extra
      >>> require_extra("checkpoint", "jaxquant.orbax")  # returns None when installed
    """
    if extra not in EXTRAS:
        raise ValueError(f"require_extra: extra must be one of {sorted(EXTRAS)}, got {extra!r}")
    missing = tuple(pip for module, pip in EXTRAS[extra] if not _importable(module))
    if missing:
        raise missing_extra(extra, feature, missing)
