"""QuantSpec <-> JSON-able dict, exact both ways.

``spec_to_dict(spec)`` gives plain ``dict`` / ``list`` / ``str`` / ``int`` / ``float`` /
``bool`` / ``None`` values that :func:`json.dumps` accepts, and
``spec_from_dict(spec_to_dict(spec)) == spec`` for every spec. The dict holds every
:class:`~jaxquant.QuantSpec` field:

* ``format``: the format's full description, not only its name, so a checkpoint keeps its
  meaning if the registry changes and custom formats survive: ``{"name", "kind": "float",
  "exp_bits", "man_bits", "bias", "nan_style", "signed"}``, ``{"name", "kind": "int",
  "bits", "signed"}``, ``{"name", "kind": "codebook", "bits", "values"}`` or ``{"name",
  "kind": "mx", "element": <format>, "block_size"}``; a two-level format (NVFP4) adds
  ``"block_scale": <format>, "tensor_scale": true, "scale_floor"`` (other MX dicts are
  unchanged).
* ``granularity`` and ``calibration``: ``{"type": <factory name>, <field>: <value>...}``,
  e.g. ``{"type": "per_block", "axis": -1, "size": 32}``, ``{"type": "mse", "num": 32,
  "min_ratio": 0.2}``; ``calibration`` is ``None`` for a plain cast. Tuples become lists;
  non-finite floats become the strings ``"inf"``, ``"-inf"``, ``"nan"``.
* ``scale_format``: the scale format's name (``"float32"``, ``"bfloat16"``, ``"float16"``,
  ``"float8_e8m0fnu"``).
* ``symmetric``, ``rounding``, ``narrow_range``, ``saturate``, ``rng``, ``int_grid``: as
  they are. A dict written before ``int_grid`` existed has no such key and reads as
  ``"restricted"``, the only grid there was (its numerics unchanged).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jaxquant._src import calibration as cal
from jaxquant._src import formats
from jaxquant._src import granularity as gran
from jaxquant._src.spec import QuantSpec

_GRANULARITIES: dict[str, type] = {
    "per_tensor": gran.PerTensor,
    "per_channel": gran.PerChannel,
    "per_block": gran.PerBlock,
    "per_block_2d": gran.PerBlock2D,
    "per_token": gran.PerToken,
}
_CALIBRATIONS: dict[str, type] = {
    "absmax": cal.AbsMax,
    "minmax": cal.MinMax,
    "mean_std": cal.MeanStd,
    "percentile": cal.Percentile,
    "mse": cal.MSE,
    "kl": cal.KL,
    "fixed": cal.Fixed,
    "mean_abs": cal.MeanAbs,
    "twn": cal.TWN,
}
_BOOL_FIELDS = ("symmetric", "narrow_range", "saturate")
_STR_FIELDS = ("rounding", "rng", "int_grid")
# Fields added after the format was first written, and the value a dict without them meant.
_ADDED_FIELDS = {"int_grid": "restricted"}
_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def spec_to_dict(spec: QuantSpec) -> dict[str, Any]:
    """A JSON-able dict holding every field of ``spec`` (layout in the module docstring).

    Raises:
      TypeError: ``spec`` is not a QuantSpec, or has a field this module cannot encode.
      ValueError: ``spec`` holds a hand-built object that would not decode back to itself.

    Example:
      >>> import json, jaxquant as jq
      >>> from jaxquant._src.serialize import spec_from_dict, spec_to_dict
      >>> spec = jq.QuantSpec("int4", jq.per_block(-1, 32), jq.mse())
      >>> d = spec_to_dict(spec)
      >>> d["granularity"], d["calibration"]
      ({'type': 'per_block', 'axis': -1, 'size': 32}, {'type': 'mse', 'num': 32, 'min_ratio': 0.2})
      >>> spec_from_dict(json.loads(json.dumps(d))) == spec
      True
    """
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec_to_dict: expected a QuantSpec, got {type(spec).__name__}.")
    encoders = {
        "format": _format_to_dict,
        "granularity": lambda g: _object_to_dict(g, _GRANULARITIES, "granularity"),
        "calibration": lambda c: (
            None if c is None else _object_to_dict(c, _CALIBRATIONS, "calibration")
        ),
        "scale_format": lambda f: f.name,
        **{name: lambda v: v for name in (*_BOOL_FIELDS, *_STR_FIELDS)},
    }
    out = {}
    for field in dataclasses.fields(QuantSpec):
        if field.name not in encoders:  # a new QuantSpec field must be added here
            raise TypeError(f"spec_to_dict: QuantSpec field {field.name!r} has no encoder.")
        out[field.name] = encoders[field.name](getattr(spec, field.name))
    try:
        same = spec_from_dict(out) == spec
    except ValueError:
        same = False
    if not same:
        raise ValueError(
            f"spec_to_dict: {spec} does not survive a round trip (a Format or granularity "
            "built by hand?). Build formats with jq.formats.float_format / int_format / "
            "codebook_format / mx_format."
        )
    return out


def spec_from_dict(d: dict[str, Any]) -> QuantSpec:
    """The :class:`QuantSpec` that :func:`spec_to_dict` encoded as ``d``.

    Raises:
      ValueError: a missing, unknown or invalid field, named in the message.
    """
    if not isinstance(d, dict):
        raise ValueError(f"spec_from_dict: expected a dict, got {type(d).__name__}.")
    expected = {f.name for f in dataclasses.fields(QuantSpec)}
    d = {**{k: v for k, v in _ADDED_FIELDS.items() if k not in d}, **d}
    if set(d) != expected:
        missing, unknown = sorted(expected - set(d)), sorted(set(d) - expected)
        raise ValueError(
            f"spec_from_dict: missing field(s) {missing}, unknown field(s) {unknown}. The dict "
            "must come from spec_to_dict of this jaxquant version."
        )
    for name in _BOOL_FIELDS:
        if not isinstance(d[name], bool):
            raise ValueError(f"spec_from_dict: {name!r} must be a bool, got {d[name]!r}.")
    for name in _STR_FIELDS:
        if not isinstance(d[name], str):
            raise ValueError(f"spec_from_dict: {name!r} must be a str, got {d[name]!r}.")
    if not isinstance(d["scale_format"], str):
        raise ValueError(
            f"spec_from_dict: 'scale_format' must be a name, got {d['scale_format']!r}."
        )
    calibration = d["calibration"]
    try:
        return QuantSpec(
            _format_from_dict(d["format"]),
            _object_from_dict(d["granularity"], _GRANULARITIES, "granularity"),
            None
            if calibration is None
            else _object_from_dict(calibration, _CALIBRATIONS, "calibration"),
            symmetric=d["symmetric"],
            rounding=d["rounding"],
            scale_format=d["scale_format"],
            narrow_range=d["narrow_range"],
            saturate=d["saturate"],
            rng=d["rng"],
            int_grid=d["int_grid"],
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"spec_from_dict: {e}") from None


# ------------------------------------------------------------------------------ formats


def _format_to_dict(fmt: formats.Format) -> dict[str, Any]:
    d: dict[str, Any] = {"name": fmt.name, "kind": fmt.kind}
    if fmt.kind == "float":
        d.update(
            exp_bits=fmt.exp_bits,
            man_bits=fmt.man_bits,
            bias=fmt.bias,
            nan_style=fmt.nan_style,
            signed=fmt.signed,
        )
    elif fmt.kind == "int":
        d.update(bits=fmt.bits, signed=fmt.signed)
    elif fmt.kind == "codebook":
        d.update(bits=fmt.bits, values=list(fmt.codebook or ()))
    elif fmt.kind == "mx":
        assert fmt.element is not None
        d.update(element=_format_to_dict(fmt.element), block_size=fmt.block_size)
        if fmt.tensor_scale:
            assert fmt.block_scale is not None
            d.update(
                block_scale=_format_to_dict(fmt.block_scale),
                tensor_scale=True,
                scale_floor=fmt.scale_floor,
            )
    else:
        raise TypeError(f"spec_to_dict: format {fmt.name!r} has unknown kind {fmt.kind!r}.")
    return d


def _format_from_dict(d: Any) -> formats.Format:
    if not isinstance(d, dict) or "kind" not in d or "name" not in d:
        raise ValueError(f"a format is a dict with 'name' and 'kind', got {d!r}.")
    kind, rest = d["kind"], {k: v for k, v in d.items() if k not in ("kind", "name")}
    try:
        if kind == "float":
            fmt = formats.float_format(name=d["name"], **rest)
        elif kind == "int":
            fmt = formats.int_format(**rest)
        elif kind == "codebook":
            fmt = formats.codebook_format(d["name"], tuple(rest.pop("values")), **rest)
        elif kind == "mx" and rest.get("tensor_scale", False):
            # Two-level (NVFP4): the builder fixes the element and block scale formats.
            element = _format_from_dict(rest.pop("element"))
            block_scale = _format_from_dict(rest.pop("block_scale"))
            rest.pop("tensor_scale")
            fmt = formats.nvfp4_format(d["name"], **rest)
            if (element, block_scale) != (fmt.element, fmt.block_scale):
                raise ValueError(
                    f"format {d['name']!r}: a two-level format has e2m1 elements and e4m3 "
                    f"block scales, got {element.name} and {block_scale.name}."
                )
        elif kind == "mx":
            element = _format_from_dict(rest.pop("element"))
            fmt = formats.mx_format(d["name"], element, **rest)
        else:
            raise ValueError(f"unknown kind {kind!r} (float, int, codebook, mx)")
    except (KeyError, TypeError) as e:
        raise ValueError(f"format {d.get('name')!r}: bad or missing field ({e}).") from None
    if fmt.name != d["name"]:
        raise ValueError(f"format {d['name']!r}: its fields describe {fmt.name!r}.")
    return fmt


# ------------------------------------------------------------ granularity, calibration


def _object_to_dict(obj: Any, table: dict[str, type], what: str) -> dict[str, Any]:
    names = [name for name, cls in table.items() if type(obj) is cls]
    if not names:
        raise TypeError(f"spec_to_dict: unknown {what} {obj!r} ({type(obj).__name__}).")
    fields = {f.name: _to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    return {"type": names[0], **fields}


def _object_from_dict(d: Any, table: dict[str, type], what: str) -> Any:
    if not isinstance(d, dict) or d.get("type") not in table:
        raise ValueError(f"{what} must be a dict with 'type' in {sorted(table)}, got {d!r}.")
    cls = table[d["type"]]
    fields = {k: _from_json(v) for k, v in d.items() if k != "type"}
    try:
        return cls(**fields)
    except TypeError as e:
        raise ValueError(f"{what} {d['type']!r}: {e}.") from None


def _to_json(v: Any) -> Any:
    if isinstance(v, tuple | list):
        return [_to_json(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def _from_json(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_from_json(x) for x in v)
    if isinstance(v, str) and v in _NONFINITE:
        return _NONFINITE[v]
    return v
