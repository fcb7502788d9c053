"""Checks for the static arguments of public constructors (QuantSpec, calibrations,
granularities, formats, scalings), so every bad value gets one kind of message: the
argument, what was received, what is expected and how to fix it.

Python's own conversions are too lenient for configuration: ``bool("False")`` is True,
``int(2.5)`` is 2 and ``float("3")`` is 3.0, so these checks accept only values that are
already of the right kind (numpy scalars included) and never convert strings.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np


def describe(value: Any) -> str:
    """``value!r (type)``, shortened, for error messages."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def check_bool(value: Any, what: str) -> bool:
    """``value`` as a bool; a TypeError for anything but True/False (numpy bools included).

    Args:
      value: the argument.
      what: how the user spells it, e.g. ``"QuantSpec.symmetric"``.
    """
    if isinstance(value, bool | np.bool_):
        return bool(value)
    raise TypeError(
        f"{what} must be True or False, got {describe(value)}. Pass a bool: a string such as "
        "'False' is truthy, and a number is ambiguous."
    )


def check_int(value: Any, what: str, *, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int in ``[lo, hi]``: TypeError for non-integers (bools, floats, strings,
    arrays), ValueError outside the range."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        example = f" such as {lo}" if lo is not None else ""
        raise TypeError(
            f"{what} must be an int, got {describe(value)}. Pass a Python int{example}."
        )
    v = int(value)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        if hi is None:
            expected = f">= {lo}"
        elif lo is None:
            expected = f"<= {hi}"
        else:
            expected = f"in {lo}..{hi}"
        raise ValueError(f"{what} must be an int {expected}, got {v}.")
    return v


def check_real(
    value: Any,
    what: str,
    *,
    gt: float | None = None,
    ge: float | None = None,
    le: float | None = None,
    hint: str = "",
) -> float:
    """``value`` as a finite float with ``value > gt``, ``>= ge``, ``<= le`` (those given).

    Accepts Python and numpy reals and concrete 0-d arrays; TypeError for bools, strings,
    None, traced values and arrays of other shapes; ValueError for NaN, Inf and values out
    of range. ``hint`` is appended to the ValueError (the fix).
    """
    if isinstance(value, bool | np.bool_ | str | bytes) or value is None:
        raise TypeError(f"{what} must be a number, got {describe(value)}.")
    if isinstance(value, numbers.Real):
        try:
            v = float(value)
        except OverflowError:  # an int beyond float's range
            v = -math.inf if value < 0 else math.inf
    elif (
        getattr(value, "shape", None) == ()
        and np.dtype(getattr(value, "dtype", object)).kind in "iuf"
    ):
        try:
            v = float(value)
        except Exception:  # a tracer: jax.errors.ConcretizationTypeError
            raise TypeError(
                f"{what} is static configuration: it needs a concrete number, got a traced "
                f"value {describe(value)}. Compute it outside jax.jit, or pass it as a "
                "static argument."
            ) from None
    else:
        raise TypeError(f"{what} must be a number, got {describe(value)}.")
    bounds = []
    if gt is not None:
        bounds.append(f"> {gt:g}")
    if ge is not None:
        bounds.append(f">= {ge:g}")
    if le is not None:
        bounds.append(f"<= {le:g}")
    ok = (
        math.isfinite(v)
        and (gt is None or v > gt)
        and (ge is None or v >= ge)
        and (le is None or v <= le)
    )
    if not ok:
        expected = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
        raise ValueError(f"{what} must be {expected}, got {v!r}.{' ' + hint if hint else ''}")
    return v
