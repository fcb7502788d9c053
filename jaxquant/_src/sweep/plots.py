"""The sweep's plots (matplotlib, Agg backend): accuracy vs bits per weight, weight SQNR vs
bits, model size vs accuracy -- one marker per cell configuration (mean over seeds),
coloured by format, PTQ filled, QAT hollow. Each PNG is rendered in memory and written
with :func:`~jaxquant._src.sweep.folder.atomic_write` (a uniquely named temporary file
renamed, or one upload on object storage), so an interrupted run never leaves a truncated
image."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from jaxquant._src.sweep import folder as F


def _points(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("status") != "ok":
            continue
        act = r.get("act", "none")
        fmt = r["format"] if act == "none" else f"{r['format']} / act {act}"
        key = (r["mode"], fmt, r["granularity"], r["calibration"], r["rounding"])
        groups.setdefault(key, []).append(r)
    pts = []
    for (mode, fmt, *_), rs in groups.items():
        sq = [r["weight_sqnr_db"] for r in rs if np.isfinite(r["weight_sqnr_db"])]
        pts.append(
            {
                "mode": mode,
                "format": fmt,
                "bits": float(np.mean([r["bits_per_weight"] for r in rs])),
                "acc": float(np.mean([r["test_acc"] for r in rs])),
                "sqnr": float(np.mean(sq)) if sq else None,
                "kib": float(np.mean([r["model_bytes"] for r in rs])) / 1024,
            }
        )
    return pts


def write_plots(folder: F.AnyPath, rows: list[dict[str, Any]]) -> list[F.AnyPath]:
    """Write ``accuracy_vs_bits.png``, ``sqnr_vs_bits.png``, ``size_vs_accuracy.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    pts = _points(rows)
    formats = list(dict.fromkeys(p["format"] for p in pts))
    cmap = plt.get_cmap("tab20")
    colour = {f: cmap(i % 20) for i, f in enumerate(formats)}
    plots = (
        ("accuracy_vs_bits.png", "bits", "acc", "bits per weight", "test accuracy (%)", True),
        ("sqnr_vs_bits.png", "bits", "sqnr", "bits per weight", "weight SQNR (dB)", True),
        ("size_vs_accuracy.png", "kib", "acc", "model size (KiB)", "test accuracy (%)", True),
    )
    written = []
    for name, xk, yk, xl, yl, logx in plots:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for f in formats:
            for mode, fill in (("ptq", True), ("qat", False)):
                sel = [
                    p for p in pts if p["format"] == f and p["mode"] == mode and p[yk] is not None
                ]
                if not sel:
                    continue
                c = colour[f]
                ax.scatter(
                    [p[xk] for p in sel],
                    [p[yk] for p in sel],
                    label=f"{f} ({mode})",
                    color=c if fill else "none",
                    edgecolors=c,
                    s=36,
                )
        if logx:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2, loc="best")
        fig.tight_layout()
        path = folder / name
        buf = io.BytesIO()
        try:
            fig.savefig(buf, dpi=90, format="png")
        finally:
            plt.close(fig)
        F.atomic_write(path, buf.getvalue())  # local or object storage, whole or not at all
        written.append(path)
    return written
