"""The sweep configuration's error type and how it shows a value (TOML), shared by
:mod:`~jaxquant.app.sweep.config` and :mod:`~jaxquant.app.sweep.recipes` (which the config
checks call: a module of its own, so that neither imports the other back)."""

from __future__ import annotations

import json
from typing import Any


class ConfigError(ValueError):
    """A bad sweep configuration; the message is one line naming the key."""


def toml_value(v: Any) -> str:
    """``v`` written as a TOML value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")
