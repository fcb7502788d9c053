"""The sweep's training recipes: the ``qat.recipes`` axis.

An entry of ``qat.recipes`` is a recipe name, or a table naming the recipe and the
switches of its function (:mod:`jaxquant.recipes`)::

    [qat]
    recipes = [
      "nvfp4",                                  # the paper's full recipe
      { recipe = "nvfp4", hadamard = [] },      # without the random Hadamard transform
      { recipe = "mxfp4", weight_2d = true, hadamard = ["wgrad"], hadamard_block = 16 },
      "bf16",                                   # bf16 operands and gradients
      "float32",                                # no quantization: the baseline
    ]

The names are :func:`jaxquant.recipes.names` and two of the sweep's own, which take no
switches: ``float32`` (the model trained in float, every product unquantized: the baseline
of a training comparison) and ``bf16`` (weights, activations and output gradients of the
quantized layers cast to bfloat16, round to nearest, float32 accumulation).

Every entry is built when the config is loaded, so an unknown recipe or switch, or a
value of the wrong type, is a :class:`~jaxquant.app.sweep.errors.ConfigError` naming
``qat.recipes[i]``. An entry's **canonical id** (:func:`parse`) is the recipe's name and the
switches that change the recipe, in name order: a switch at its default, or one that
changes nothing (``random_hadamard`` with ``hadamard = []``), is dropped:
``"nvfp4"`` and ``{ recipe = "nvfp4", hadamard = ["wgrad"] }`` are one recipe, ``nvfp4``,
and ``{ recipe = "nvfp4", hadamard = [], random_hadamard = false }`` is
``nvfp4(hadamard=[])``. Two entries that build equal recipes are refused as a repeat. The id is
part of the cell's id (``stdlib-lm/0/recipe=nvfp4(hadamard=[])/qat``), so a result is only
ever credited to the recipe that made it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

from jaxquant.app.sweep.errors import ConfigError
from jaxquant.app.sweep.errors import toml_value as _toml_value

#: The sweep's own recipe names (no switches) and what they train.
EXTRA = {
    "float32": "no quantization (the float baseline)",
    "bf16": "bf16 weights, activations and gradients (round to nearest), float32 accumulation",
}
EXAMPLE = '{ recipe = "nvfp4", hadamard = [] }'


class Entry(NamedTuple):
    """A parsed ``qat.recipes`` entry: the recipe's name and its canonical switches
    (name-sorted ``(switch, value)`` pairs, lists as tuples)."""

    name: str
    switches: tuple[tuple[str, Any], ...] = ()

    @property
    def id(self) -> str:
        """``name`` or ``name(switch=value,...)`` (TOML spelling: ``true``, ``[a,b]``)."""
        if not self.switches:
            return self.name
        return f"{self.name}({','.join(f'{k}={_text(v)}' for k, v in self.switches)})"

    def build(self) -> Any:
        """The :class:`jaxquant.recipes.Recipe` (None for ``float32``)."""
        return _build(self.name, dict(self.switches))


def _text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, tuple):
        return "[" + ",".join(_text(x) for x in v) + "]"
    return str(v)


def names() -> tuple[str, ...]:
    """Every recipe name ``qat.recipes`` takes: :func:`jaxquant.recipes.names`, then
    :data:`EXTRA`'s."""
    from jaxquant import recipes

    return (*recipes.names(), *EXTRA)


def _factory(name: str) -> Callable[..., Any]:
    from jaxquant import recipes

    return getattr(recipes, name)


def switches(name: str) -> dict[str, Any]:
    """The switches of recipe ``name`` and their defaults (none for :data:`EXTRA`)."""
    if name in EXTRA:
        return {}
    params = inspect.signature(_factory(name)).parameters
    return {k: p.default for k, p in params.items()}


def _make(name: str, switches: dict[str, Any]) -> Any:
    from jaxquant import QuantSpec, per_tensor, recipes

    if name == "float32":
        return None
    if name == "bf16":
        bf16 = QuantSpec("bfloat16", per_tensor(), calibration=None)
        return recipes.Recipe("bf16", weight=bf16, act=bf16, grad=bf16, description=EXTRA["bf16"])
    return _factory(name)(**switches)


# Built recipes by name and switches. The key holds each value's repr: 1 == True (and
# 1 == 1.0) in a plain key would hand ``weight_2d = 1`` the recipe of ``true``.
_BUILT: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}


def _build(name: str, switches: dict[str, Any]) -> Any:
    key = (name, tuple(sorted((k, repr(v)) for k, v in switches.items())))
    if key not in _BUILT:
        _BUILT[key] = _make(name, switches)
    return _BUILT[key]


def _fail(key: str, entry: Any, msg: str) -> ConfigError:
    try:
        shown = _toml_value(entry)
    except TypeError:  # a TOML date or time
        shown = repr(entry)
    return ConfigError(f"sweep config: {key} = {shown} {msg}")


def _value(v: Any) -> Any:
    """A TOML value as a recipe function takes it (lists as tuples), or raises TypeError."""
    if isinstance(v, list):
        return tuple(_value(x) for x in v)
    if isinstance(v, bool | int | float | str):
        return v
    raise TypeError(f"{type(v).__name__} is not a switch value (a boolean, number, string or list)")


def parse(entry: Any, key: str = "qat.recipes[0]") -> Entry:
    """The :class:`Entry` of one ``qat.recipes`` value (a name, or a table with ``recipe``
    and switches), built once to check it; raises ConfigError naming ``key``."""
    known = names()
    if isinstance(entry, str):
        name, given = entry, {}
    elif isinstance(entry, dict):
        if "recipe" not in entry:
            raise _fail(key, entry, f'has no "recipe" key naming the recipe, e.g. {EXAMPLE}')
        name, given = entry["recipe"], {k: v for k, v in entry.items() if k != "recipe"}
        if not isinstance(name, str):
            raise _fail(f"{key}.recipe", name, f"must be a recipe name; known: {', '.join(known)}")
    else:
        raise _fail(key, entry, f"must be a recipe name or a table, e.g. {EXAMPLE}")
    if name not in known:
        raise _fail(key, entry, f"names no recipe {name!r}; known: {', '.join(known)}")
    defaults = switches(name)
    for k in given:
        if k not in defaults:
            have = (
                f"{name}'s switches: {', '.join(defaults)}"
                if defaults
                else (f"{name} takes no switches")
            )
            raise _fail(key, entry, f"has an unknown switch {k!r}; {have}")
    try:
        kwargs = {k: _value(v) for k, v in given.items()}
        full = _build(name, kwargs)
    except (TypeError, ValueError) as err:
        raise _fail(key, entry, f"is not a valid recipe: {err}") from None
    # Canonical: drop each switch whose default builds the same recipe (the defaults, and
    # switches that change nothing), then sort list values where that changes nothing.
    for k in sorted(kwargs):
        trial = {kk: v for kk, v in kwargs.items() if kk != k}
        if _build(name, trial) == full:
            kwargs = trial
    for k, v in kwargs.items():
        if isinstance(v, tuple) and all(isinstance(x, str) for x in v):
            ordered = tuple(sorted(set(v)))
            if ordered != v and _build(name, kwargs | {k: ordered}) == full:
                kwargs[k] = ordered
    return Entry(name, tuple(sorted(kwargs.items())))


def check(entries: Any, key: str = "qat.recipes") -> list[Entry]:
    """Parse every entry of ``qat.recipes``; two entries of equal recipes are a repeat."""
    out: list[Entry] = []
    for i, entry in enumerate(entries):
        parsed = parse(entry, f"{key}[{i}]")
        for j, other in enumerate(out):
            if other == parsed or (other.name == parsed.name and other.build() == parsed.build()):
                raise _fail(
                    f"{key}[{i}]",
                    entry,
                    f"is the same recipe as {key}[{j}] ({other.id}); remove one",
                )
        out.append(parsed)
    return out


def family(name: str) -> str:
    """The plots' format family of recipe ``name``."""
    return {
        "float32": "float",
        "bf16": "float",
        "fp8_current": "fp8",
        "fp8_delayed": "fp8",
        "w8a8_int8": "int",
        "w4a16_int4": "int",
        "binary": "binary/ternary",
        "ternary": "binary/ternary",
        "mxfp8": "mx",
        "mxfp4": "mx",
        "nvfp4": "fp4/fp6",
    }.get(name, "float")
