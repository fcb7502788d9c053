"""Deprecated: the bundled data sets moved to :mod:`jaxquant.app.datasets` (the application
layer). ``jaxquant.datasets.digits`` still works and warns; import from the new home."""

import warnings
from typing import Any

__all__: list[str] = []

_MOVED = ("digits", "stdlib_bytes", "stdlib_corpus")


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(
            f"jaxquant.datasets.{name} moved to jaxquant.app.datasets.{name}; "
            "jaxquant.datasets will be removed.",
            DeprecationWarning,
            stacklevel=2,
        )
        from jaxquant.app import datasets

        return getattr(datasets, name)
    raise AttributeError(f"module 'jaxquant.datasets' has no attribute {name!r}")
