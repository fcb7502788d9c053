"""Quantization error metrics (``jq.metrics.sqnr(x, x_hat)``...)."""

from jaxquant._src.metrics import (
    inf_count,
    max_abs_error,
    mse,
    nan_count,
    report,
    saturation_rate,
    scale_clamp_rate,
    sqnr,
    summary,
    underflow_rate,
)

__all__ = [
    "inf_count",
    "max_abs_error",
    "mse",
    "nan_count",
    "report",
    "saturation_rate",
    "scale_clamp_rate",
    "sqnr",
    "summary",
    "underflow_rate",
]
