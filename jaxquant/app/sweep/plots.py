"""The sweep's plots (matplotlib, Agg backend), sized for one column of a paper.

Four PNGs, one point per cell configuration (its seeds pooled):

* ``accuracy_vs_bits.png`` / ``loss_vs_bits.png``: the task metric's and the test loss's
  change against the float model (each seed's quantized model against the same seed's
  float model, then the mean over seeds) vs bits per weight (scales included);
* ``sqnr_vs_bits.png``: the weight SQNR vs bits per weight;
* ``size_vs_accuracy.png``: the metric's change vs the model's size.

Every plot marks the **Pareto fronts** of PTQ (solid) and of QAT (dashed; it trains, so
it is a front of its own): the cells no other cell of the same mode beats on both axes
(fewer bits or bytes, and a better metric), joined by the staircase of the best value
reachable at each size, and labelled; dominated cells are drawn faint. Error bars span
the **minimum to maximum over seeds**. Each format **family** (:data:`FAMILIES`) has its
own colour (Okabe-Ito, readable with colour blindness) and marker; PTQ cells are filled,
PTQ cells with quantized activations half filled, QAT cells hollow. A change of the
metric spans orders of magnitude (a 4-bit cell loses a hundredth of a nat, a binary one
most of a nat), so its axis is symmetric-logarithmic: linear within the seed noise (or
the smallest tenth of the changes), then logarithmic. The legend sits below the axes,
clear of the data.

Each PNG is rendered in memory and written with
:func:`~jaxquant.app.sweep.folder.atomic_write` (a uniquely named temporary file renamed,
or one upload on object storage), so an interrupted run never leaves a truncated image.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from jaxquant.app.sweep import folder as F

if TYPE_CHECKING:  # matplotlib is imported only when plots are drawn
    from matplotlib.typing import FillStyleType


class Style(NamedTuple):
    """How a format family is drawn: a matplotlib colour and marker."""

    colour: str
    marker: str


# Format family -> style: every family its own colour and marker, so the plots read in
# grey scale too. Colours: the Okabe-Ito palette.
FAMILY_STYLES: dict[str, Style] = {
    "float": Style("#000000", "*"),
    "int": Style("#0072B2", "o"),
    "fp8": Style("#E69F00", "s"),
    "fp4/fp6": Style("#009E73", "^"),
    "nf4/codebook": Style("#CC79A7", "v"),
    "mx": Style("#56B4E9", "D"),
    "binary/ternary": Style("#D55E00", "X"),
}
# The sweep's format names (config.FORMATS) -> family.
FAMILIES: dict[str, str] = {
    "float32": "float",
    "fp16": "float",
    "bf16": "float",
    "fp8_e4m3": "fp8",
    "fp8_e5m2": "fp8",
    "int8": "int",
    "int4": "int",
    "int3": "int",
    "int2": "int",
    "nf4": "nf4/codebook",
    "fp6_e2m3": "fp4/fp6",
    "fp6_e3m2": "fp4/fp6",
    "fp4": "fp4/fp6",
    "mxfp8": "mx",
    "mxfp6": "mx",
    "mxfp4": "mx",
    "ternary": "binary/ternary",
    "binary": "binary/ternary",
}

# Axis labels of the built-in tasks (by task name); a custom task's metric and loss are
# its own functions, named as such.
_LABELS = {
    "stdlib-lm": ("next-byte accuracy", "pp", "test loss", "nats/byte"),
    "digits-mlp": ("test accuracy", "pp", "test loss", "nats/image"),
    "digits-cnn": ("test accuracy", "pp", "test loss", "nats/image"),
}
_CUSTOM_LABELS = ("task.metric", "", "task.loss", "")
_GRAN = {"tensor": "T", "channel": "C"}
_X_TOL = 0.005  # sizes within 0.5% are one size on the fronts (see pareto_front)
_FONT = 7.0  # points, at the figure's printed width (one column: 3.5 in)


class Point(NamedTuple):
    """One cell configuration, its seeds pooled: mean, min and max of each value."""

    mode: str
    format: str
    granularity: str
    calibration: str
    rounding: str
    act: str
    seeds: int
    values: dict[str, tuple[float, float, float]]  # name -> (mean, min, max)
    method: str = "rtn"  # the PTQ method (grid.methods)
    recipe: str = ""  # a qat.recipes cell's canonical id

    @property
    def family(self) -> str:
        if self.recipe:
            from jaxquant.app.sweep.recipes import family

            return family(self.format)
        return FAMILIES.get(self.format, "float")

    @property
    def label(self) -> str:
        """A short name: ``int4 B32 mse``, ``int8 C +A4``, ``int3 C QAT``,
        ``nvfp4(hadamard=[]) QAT``."""
        if self.recipe:
            return f"{self.recipe} {self.mode.upper()}"
        if self.format in ("float32", "fp16", "bf16"):
            parts = [self.format]
        else:
            gran = _GRAN.get(self.granularity, self.granularity.replace("block", "B"))
            cal = "" if self.calibration in ("absmax", "twn", "mean_abs") else self.calibration
            cal = cal.replace("percentile:", "p")
            parts = [self.format, gran, cal]
        if self.rounding == "stochastic":
            parts.append("SR")
        if self.act != "none":
            parts.append(f"+A{self.act.removeprefix('int')}")
        if self.method != "rtn":
            parts.append(self.method.upper())
        if self.mode == "qat":
            parts.append("QAT")
        return " ".join(p for p in parts if p)


def points(rows: Sequence[dict[str, Any]]) -> list[Point]:
    """The cells of ``rows`` (status ``ok``) grouped over seeds. Values: ``d_acc`` and
    ``d_loss`` (the change against the same seed's float model), ``bits``, ``kib``,
    ``sqnr`` (finite values only; absent when none is)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("status") != "ok":
            continue
        key = (
            r["mode"],
            r["format"],
            r["granularity"],
            r["calibration"],
            r["rounding"],
            r.get("act", "none") or "none",
            r.get("method", "rtn") or "rtn",
            r.get("recipe") or "",
        )
        groups.setdefault(key, []).append(r)
    out = []
    for key, rs in groups.items():
        cols = {
            "d_acc": [r["test_acc"] - r["float_acc"] for r in rs],
            "d_loss": [r["test_loss"] - r["float_loss"] for r in rs],
            "bits": [r["bits_per_weight"] for r in rs],
            "kib": [r["model_bytes"] / 1024 for r in rs],
            "sqnr": [r["weight_sqnr_db"] for r in rs],
        }
        values = {}
        for name, vs in cols.items():
            vs = [float(v) for v in vs if v is not None and math.isfinite(v)]
            if vs:
                values[name] = (float(np.mean(vs)), min(vs), max(vs))
        out.append(Point(*key[:-2], seeds=len(rs), values=values, method=key[-2], recipe=key[-1]))
    return out


def pareto_front(
    x: Sequence[float], y: Sequence[float], *, maximize: bool = True, x_tol: float = 0.0
) -> list[bool]:
    """Which points are on the Pareto front of (small ``x``, large ``y``) -- or small
    ``y`` with ``maximize=False``: no other point is at least as good on both and better
    on one. Equal points are all on the front.

    ``x_tol`` counts sizes within that relative difference as equal: the plots use 0.5%,
    so int4 per tensor (4 bits and one float32 scale per tensor: 4.0005 bits) competes
    with int3 in blocks of 32 (3 + 32/32 = 4 bits) on its metric alone.

    >>> pareto_front([4, 4, 8, 3], [70, 60, 80, 50])
    [True, False, True, True]
    """
    if len(x) != len(y):
        raise ValueError(f"pareto_front: x has {len(x)} values, y {len(y)}; pass one per point.")
    sign = 1.0 if maximize else -1.0
    ys = [sign * v for v in y]

    def beats(xj: float, yj: float, xi: float, yi: float) -> bool:
        if xj <= xi * (1.0 + x_tol):  # no larger (within the tolerance)
            return yj > yi or (yj == yi and xj < xi)
        return False

    return [
        not any(
            beats(xj, yj, xi, yi) for j, (xj, yj) in enumerate(zip(x, ys, strict=True)) if j != i
        )
        for i, (xi, yi) in enumerate(zip(x, ys, strict=True))
    ]


def _linthresh(values: Sequence[float], spreads: Sequence[float]) -> float:
    """The symlog axis's linear half-width, a power of ten: the larger of the one at or
    below the 10th percentile of the nonzero changes and the one nearest the median seed
    spread (half of max - min), so changes within the seed noise stay near 0."""
    mags = [abs(v) for v in values if abs(v) > 0 and math.isfinite(v)]
    if not mags:
        return 1.0
    exp = math.floor(math.log10(float(np.percentile(mags, 10))))
    noise = [s for s in spreads if s > 0 and math.isfinite(s)]
    if noise:
        exp = max(exp, round(math.log10(float(np.median(noise)))))
    return float(10.0**exp)


def _tick(v: float, _pos: Any = None) -> str:
    """A symlog tick as a plain number: -0.1, 0, 0.01, -10."""
    return "0" if v == 0 else f"{v:g}"


def _fill(p: Point) -> dict[str, Any]:
    colour = FAMILY_STYLES[p.family].colour
    if p.mode == "qat":
        return {"markerfacecolor": "white", "fillstyle": "full"}
    if p.act != "none":
        return {"markerfacecolor": colour, "markerfacecoloralt": "white", "fillstyle": "bottom"}
    return {"markerfacecolor": colour, "fillstyle": "full"}


def _bits_axis(ax: Any) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator([1, 2, 3, 4, 5, 6, 8, 16, 32]))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())


def _size_axis(ax: Any) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(_tick))
    ax.xaxis.set_minor_locator(NullLocator())


def _draw(
    ax: Any, pts: list[Point], xk: str, yk: str, *, maximize: bool
) -> list[tuple[float, float, str]]:
    """Draw the points (faint when dominated) and each mode's front; returns the front
    points' ``(x, y, label)``."""
    labels = []
    for mode, line in (("ptq", "-"), ("qat", "--")):
        sel = [p for p in pts if p.mode == mode and xk in p.values and yk in p.values]
        if not sel:
            continue
        xs = [p.values[xk][0] for p in sel]
        ys = [p.values[yk][0] for p in sel]
        front = pareto_front(xs, ys, maximize=maximize, x_tol=_X_TOL)
        for p, x, y, on in zip(sel, xs, ys, front, strict=True):
            _, lo, hi = p.values[yk]
            style = FAMILY_STYLES[p.family]
            ax.errorbar(
                [x],
                [y],
                yerr=[[y - lo], [hi - y]],
                marker=style.marker,
                color=style.colour,
                markeredgecolor=style.colour,
                markersize=4.5 if on else 3.5,
                markeredgewidth=0.8,
                elinewidth=0.7,
                capsize=1.5,
                linestyle="none",
                alpha=1.0 if on else 0.35,
                zorder=3 if on else 2,
                **_fill(p),
            )
        order = sorted(
            ((x, y, p) for x, y, p, on in zip(xs, ys, sel, front, strict=True) if on),
            key=lambda o: (o[0], o[1]),
        )
        fx, fy = [o[0] for o in order], [o[1] for o in order]
        ax.step(fx, fy, where="post", color="0.2", linewidth=0.8, linestyle=line, zorder=1)
        labels += [(x, y, p.label) for x, y, p in order]
    return labels


def _overlap(a: Any, b: Any) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(w, 0.0) * max(h, 0.0)


def _label(ax: Any, x: float, y: float, text: str, taken: list[Any]) -> Any:
    """Label the point (x, y) at the first of a few offsets whose box stays inside the
    axes and overlaps none of the boxes ``taken``; failing that, at the one overlapping
    least. Returns the label's box (display coordinates)."""
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    best: tuple[float, Any, Any] | None = None
    for dy in (2, -2, 9, -9, 16, -16):
        for dx in (3, -3):
            t = ax.annotate(
                text,
                (x, y),
                xytext=(dx, dy),
                textcoords="offset points",
                ha="left" if dx > 0 else "right",
                va="bottom" if dy > 0 else "top",
                fontsize=_FONT - 2,
                color="0.25",
                zorder=4,
            )
            box = t.get_window_extent(renderer)
            outside = box.width * box.height - _overlap(box, frame)
            cost = outside + sum(_overlap(box, b) for b in taken)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, t, box)
            else:
                t.remove()
            if cost == 0:
                return box
    assert best is not None  # the loop ran
    return best[2]


def _legend(fig: Any, pts: list[Point], seeds: int) -> None:
    from matplotlib.lines import Line2D

    families = [f for f in FAMILY_STYLES if any(p.family == f for p in pts)]
    handles = [
        Line2D(
            [],
            [],
            marker=FAMILY_STYLES[f].marker,
            color=FAMILY_STYLES[f].colour,
            linestyle="none",
            markersize=4.5,
            label=f,
        )
        for f in families
    ]

    def grey(
        label: str, face: str, alt: str = "none", fillstyle: FillStyleType | None = None
    ) -> Line2D:
        # One grey circle per kind of cell: its fill tells PTQ, PTQ + activations and QAT
        # apart (Line2D's own defaults for alt and fillstyle where not given).
        return Line2D(
            [],
            [],
            marker="o",
            color="0.35",
            linestyle="none",
            markersize=4.5,
            markerfacecolor=face,
            markerfacecoloralt=alt,
            fillstyle=fillstyle,
            label=label,
        )

    handles += [
        grey("PTQ weights", "0.35"),
        grey("PTQ + activations", "0.35", alt="white", fillstyle="bottom"),
        grey("QAT", "white"),
        Line2D([], [], color="0.2", linewidth=0.8, label="PTQ front"),
        Line2D([], [], color="0.2", linewidth=0.8, linestyle="--", label="QAT front"),
    ]
    bars = f"bars: min-max over {seeds} seeds" if seeds > 1 else "one seed (no bars)"
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=3,
        fontsize=_FONT - 0.5,
        frameon=False,
        title=f"faint: dominated; {bars}",
        title_fontsize=_FONT - 0.5,
        columnspacing=1.0,
        handletextpad=0.3,
    )


def write_plots(folder: F.AnyPath, rows: list[dict[str, Any]]) -> list[F.AnyPath]:
    """Write ``accuracy_vs_bits.png``, ``loss_vs_bits.png``, ``sqnr_vs_bits.png`` and
    ``size_vs_accuracy.png`` into ``folder`` from a sweep's ``rows``; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    pts = points(rows)
    tasks = {r["task"] for r in rows}
    names = _LABELS.get(tasks.pop(), _CUSTOM_LABELS) if len(tasks) == 1 else _CUSTOM_LABELS
    metric, metric_unit, loss, loss_unit = names
    seeds = max((p.seeds for p in pts), default=0)
    bits = "bits per weight (scales included)"

    def delta(name: str, unit: str) -> str:
        return f"{name}: change vs float" + (f" ({unit})" if unit else "")

    plots = (
        ("accuracy_vs_bits.png", "bits", "d_acc", bits, delta(metric, metric_unit), True),
        ("loss_vs_bits.png", "bits", "d_loss", bits, delta(loss, loss_unit), False),
        ("sqnr_vs_bits.png", "bits", "sqnr", bits, "weight SQNR (dB)", True),
        (
            "size_vs_accuracy.png",
            "kib",
            "d_acc",
            "model size (KiB)",
            delta(metric, metric_unit),
            True,
        ),
    )
    written = []
    for name, xk, yk, xl, yl, maximize in plots:
        with plt.rc_context({"font.size": _FONT, "axes.linewidth": 0.6}):
            fig = plt.figure(figsize=(3.5, 3.6))
            # Axes on top, the legend's three rows below them (figure coordinates).
            ax = fig.add_axes((0.17, 0.36, 0.79, 0.6))
            # Scales first: the labels are placed in display coordinates.
            if yk.startswith("d_"):
                from matplotlib.ticker import FuncFormatter

                vs = [p.values[yk] for p in pts if yk in p.values]
                lin = _linthresh([m for m, _, _ in vs], [(hi - lo) / 2 for _, lo, hi in vs])
                ax.set_yscale("symlog", linthresh=lin, linscale=0.5)
                ax.yaxis.set_major_formatter(FuncFormatter(_tick))
                ax.axhline(0.0, color="0.5", linewidth=0.6, linestyle=":", zorder=0)
            if xk == "bits":
                _bits_axis(ax)
            else:
                _size_axis(ax)
            # The weight SQNR of a cell with quantized activations is its weight-only
            # cell's: drawn once.
            shown = [p for p in pts if not (yk == "sqnr" and p.act != "none")]
            labels = _draw(ax, shown, xk, yk, maximize=maximize)
            # Freeze the limits, then place the labels (in display coordinates).
            ax.set_xlim(ax.get_xlim())
            ax.set_ylim(ax.get_ylim())
            # Labels keep off the front's markers (5 pt around each) and off each other.
            from matplotlib.transforms import Bbox

            r = 4 * fig.dpi / 72
            marks = []
            for x, y, _ in labels:
                px, py = ax.transData.transform((x, y))
                marks.append(Bbox([[px - r, py - r], [px + r, py + r]]))
            placed: list[Any] = []
            for i, (x, y, text) in enumerate(labels):
                others = marks[:i] + marks[i + 1 :]
                placed.append(_label(ax, x, y, text, placed + others))
            ax.set_xlabel(xl)
            ax.set_ylabel(yl)
            ax.grid(True, which="major", alpha=0.25, linewidth=0.5)
            ax.tick_params(labelsize=_FONT - 0.5, width=0.6, length=2.5)
            _legend(fig, pts, seeds)
            buf = io.BytesIO()
            try:
                fig.savefig(buf, dpi=300, format="png")
            finally:
                plt.close(fig)
        path = folder / name
        F.atomic_write(path, buf.getvalue())  # local or object storage, whole or not at all
        written.append(path)
    return written
