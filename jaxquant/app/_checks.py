"""Argument checks of the application layer (it builds on the public API only, so it keeps
its own small copy of the core's integer check)."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np


def check_int(value: Any, what: str, *, lo: int | None = None) -> int:
    """``value`` as an int ``>= lo``: TypeError for non-integers (bools, floats, strings,
    arrays), ValueError below ``lo``."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        example = f" such as {lo}" if lo is not None else ""
        raise TypeError(
            f"{what} must be an int, got {type(value).__name__} {value!r:.40}. "
            f"Pass a Python int{example}."
        )
    v = int(value)
    if lo is not None and v < lo:
        raise ValueError(f"{what} must be an int >= {lo}, got {v}.")
    return v
