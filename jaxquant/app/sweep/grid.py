"""The sweep's cells: one (task, seed, format, granularity, calibration, rounding, mode,
activations, method).

The PTQ grid is the cartesian product of ``[grid]``'s axes, then one more product per
``grid.also`` table (``[grid]`` with that table's keys replaced), made canonical so that no
two cells compute the same thing (then deduplicated, order kept):

* ``float32`` / ``fp16`` / ``bf16`` are plain casts: granularity ``tensor``, calibration
  ``none`` (float32 is the float baseline);
* MX formats carry their own scales: granularity ``block32``, calibration ``absmax``
  (blocks along the input axis, or the output axis when only that one is a multiple of
  32);
* ``binary`` uses ``mean_abs`` (BWN), ``ternary`` uses ``twn`` (TWN);
* QAT cells are ``qat.formats x qat.granularities x qat.activations`` with the format's
  default calibration and nearest rounding.

``grid.activations`` / ``qat.activations`` (optional, default ``["none"]``) also quantize
every quantized layer's input, per tensor: in PTQ cells with a static range calibrated on
training batches by the cell's calibration method (absmax for the ternary / binary /
MX / cast cells, whose weight calibrations don't apply to activations), in QAT cells
dynamically (each batch's absmax). A cell's id ends in ``/act=<format>`` unless ``none``.

``grid.methods`` (optional, default ``["rtn"]``) is the post-training method of PTQ cells:
``rtn`` rounds the float weights to nearest (the sweep without the axis: same cells, ids,
rows), the others (``gptq``, ``awq``, ``smoothquant``, ``rotate`` and compositions
``a+b`` applied left to right, :func:`jaxquant.app.sweep.config.method_steps`) run
:mod:`jaxquant.ptq` on the float model first. A cell's id ends in ``/method=<method>``
unless ``rtn``. Cast cells (``float32`` / ``fp16`` / ``bf16``) are the float references:
their method is always ``rtn`` (a cast has no grid for a method to choose codes on).
QAT cells are ``rtn``.

``qat.recipes`` (optional) adds one QAT cell per recipe and seed
(:mod:`jaxquant.app.sweep.recipes`): the recipe's weight, activation and gradient specs,
Hadamard transforms and backward products on every quantized layer. Its ``format`` is the
recipe's name, its ``granularity`` / ``calibration`` / ``rounding`` / ``act`` are ``-``
(the recipe holds them), its ``recipe`` the canonical id of the entry, and its id
``<task>/<seed>/recipe=<canonical id>/qat``. These cells come after the seed's format
cells; ``qat.formats = []`` leaves the recipe cells alone.

Every quantized layer is a leaf named ``kernel`` of rank >= 2 (Dense ``(in, out)``, Conv
``(kh, kw, in, out)``). ``blockN`` groups N values along the contracted input axis (-2);
a kernel whose input axis is shorter than N gets one scale per output channel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from jaxquant import (
    QuantSpec,
    absmax,
    kl,
    mean_abs,
    mean_std,
    mse,
    per_block,
    per_channel,
    per_tensor,
    percentile,
    twn,
)
from jaxquant.app.sweep import recipes as R
from jaxquant.app.sweep.config import FORMATS

_CASTS = ("float32", "fp16", "bf16")
_MX = ("mxfp8", "mxfp6", "mxfp4")
_MX_BLOCK = 32  # the OCP MX block size


class Cell(NamedTuple):
    """One experiment of the grid (all fields strings but ``seed``)."""

    task: str
    seed: int
    format: str
    granularity: str
    calibration: str
    rounding: str
    mode: str
    act: str = "none"
    method: str = "rtn"  # a grid.methods value: "rtn", "gptq", "rotate+gptq"...
    recipe: str = ""  # a qat.recipes entry's canonical id ("": a format cell)

    @property
    def id(self) -> str:
        if self.recipe:
            return f"{self.task}/{self.seed}/recipe={self.recipe}/{self.mode}"
        base = "/".join(str(v) for v in self[:7])
        if self.act != "none":
            base += f"/act={self.act}"
        return base if self.method == "rtn" else f"{base}/method={self.method}"


def canonical(
    fmt: str, granularity: str, calibration: str, rounding: str
) -> tuple[str, str, str, str]:
    if fmt in _CASTS:
        return fmt, "tensor", "none", rounding
    if fmt in _MX:
        return fmt, "block32", "absmax", rounding
    if fmt == "binary":
        return fmt, granularity, "mean_abs", rounding
    if fmt == "ternary":
        return fmt, granularity, "twn", rounding
    return fmt, granularity, calibration, rounding


def products(grid: dict[str, Any]) -> list[dict[str, Any]]:
    """The PTQ products of a ``[grid]`` table: itself, then itself updated by each
    ``grid.also`` table."""
    main = {k: v for k, v in grid.items() if k != "also"}
    return [main] + [main | extra for extra in grid.get("also", [])]


def expand(cfg: dict[str, Any]) -> list[Cell]:
    """Every cell of ``cfg``, seed-major (one float training per seed), deduplicated."""
    g, q, task = cfg["grid"], cfg["qat"], cfg["task"]["name"]
    entries = R.check(q.get("recipes", []))
    out: dict[str, Cell] = {}
    for seed in cfg["seeds"]:
        if "ptq" in g["modes"]:
            for p in products(g):
                for a in p.get("activations", ["none"]):
                    for f in p["formats"]:
                        for gr in p["granularities"]:
                            for c in p["calibrations"]:
                                for r in p["roundings"]:
                                    canon = canonical(f, gr, c, r)
                                    for m in p.get("methods", ["rtn"]):
                                        m = "rtn" if f in _CASTS else m
                                        cell = Cell(task, seed, *canon, "ptq", a, m)
                                        out.setdefault(cell.id, cell)
        if "qat" in g["modes"]:
            for a in q.get("activations", ["none"]):
                for f in q["formats"]:
                    for gr in q["granularities"]:
                        cell = Cell(task, seed, *canonical(f, gr, "absmax", "nearest"), "qat", a)
                        out.setdefault(cell.id, cell)
            for entry in entries:
                cell = Cell(task, seed, entry.name, "-", "-", "-", "qat", "-", recipe=entry.id)
                out.setdefault(cell.id, cell)
    return list(out.values())


def shard(cells: list[Cell], index: int, count: int) -> list[Cell]:
    """The cells of shard ``index`` of ``count``: those at positions ``i % count == index``
    of the full, deterministic cell list."""
    return [c for i, c in enumerate(cells) if i % count == index]


def _calibration(name: str) -> Any:
    if name == "none":
        return None
    if name.startswith("percentile:"):
        return percentile(float(name.split(":", 1)[1]))
    if name.startswith("mean_std:"):
        return mean_std(float(name.split(":", 1)[1]))
    # Each returns its own calibration class; jaxquant exports no name for their union.
    factories: dict[str, Callable[[], Any]] = {
        "absmax": absmax,
        "mse": mse,
        "kl": kl,
        "mean_abs": mean_abs,
        "twn": twn,
    }
    return factories[name]()


def _granularity(name: str, fmt: str, shape: tuple[int, ...]) -> Any:
    if fmt in _MX:
        for axis in (-2, -1):  # -1: e.g. a first conv with one input channel
            if shape[axis] % _MX_BLOCK == 0:
                return per_block(axis, _MX_BLOCK)
        raise ValueError(
            f"{fmt} needs blocks of {_MX_BLOCK} values along the kernel's input or output "
            f"axis, and neither axis of shape {shape} is a multiple of {_MX_BLOCK}; leave "
            "this layer out with task.layers, or use a format with per-channel scales."
        )
    if name == "tensor":
        return per_tensor()
    if name == "channel":
        return per_channel(-1)
    size = int(name.removeprefix("block"))
    if shape[-2] < size:
        return per_channel(-1)
    return per_block(-2, size)  # raises (the cell fails) when size does not divide the axis


def act_spec(cell: Cell) -> QuantSpec | None:
    """The activation spec of ``cell`` (per tensor; None: float activations). PTQ cells
    carry the calibration method that :func:`jaxquant.flax.calibrate` turns into a static
    range; QAT cells quantize each batch by its absmax."""
    if cell.act == "none":
        return None
    fmt = FORMATS[cell.act]
    if cell.act in _CASTS:
        return QuantSpec(fmt, calibration=None)
    method = cell.calibration if cell.mode == "ptq" else "absmax"
    if method in ("none", "mean_abs", "twn"):  # weight-only methods: absmax instead
        method = "absmax"
    return QuantSpec(fmt, per_tensor(), _calibration(method))


def spec_for(cell: Cell, shape: tuple[int, ...]) -> QuantSpec:
    """The weight spec of ``cell`` for a kernel of ``shape``."""
    return QuantSpec(
        FORMATS[cell.format],
        _granularity(cell.granularity, cell.format, shape),
        _calibration(cell.calibration),
        rounding=cell.rounding,  # type: ignore[arg-type]  # a str that config checked
    )
