"""jaxquant: low-precision number formats and quantization for JAX.

Functional, jit-compiled quantizers over pytrees: FP8 / BF16 / FP6 / FP4 / INT8 / INT4 /
NF4 / MX / binary / ternary, with per-tensor, per-channel, per-block and per-token scales,
several calibrations, round-to-nearest-even and stochastic rounding, saturating casts.
"""

from typing import Any as _Any

from jaxquant import formats, integer, metrics, recipes, rotations
from jaxquant._src.calibration import (
    absmax,
    fixed,
    kl,
    mean_abs,
    mean_std,
    minmax,
    mse,
    percentile,
    twn,
)
from jaxquant._src.config import QuantConfig
from jaxquant._src.conv import conv_general_dilated
from jaxquant._src.dot import dot_capabilities, dot_general, einsum
from jaxquant._src.explain import explain
from jaxquant._src.granularity import (
    per_block,
    per_block_2d,
    per_channel,
    per_tensor,
    per_token,
)
from jaxquant._src.kv_cache import kv_cache_init, kv_cache_update
from jaxquant._src.lsq import lsq_fake_quant, lsq_init
from jaxquant._src.qarray import QArray
from jaxquant._src.quantize import dequantize, fake_quant, quantize
from jaxquant._src.rounding import random_bits
from jaxquant._src.scaling import (
    ScaleState,
    Scaling,
    current_scaling,
    delayed_scaling,
    fake_quant_with,
    quantize_with,
    static_scaling,
)
from jaxquant._src.size import SizeReport, size_report
from jaxquant._src.spec import QuantSpec
from jaxquant._src.tree import dequantize_tree, quantize_tree
from jaxquant._src.version import __version__ as __version__


def __getattr__(name: str) -> _Any:
    # The integrations import flax / optax / orbax; load them on first use (jq.flax,
    # jq.optax, jq.orbax, and jq.ptq, built on jq.flax).
    if name in ("flax", "optax", "orbax", "ptq"):
        import importlib

        return importlib.import_module(f"jaxquant.{name}")
    if name == "convert":  # "convert" is jq.flax.convert (a model for serving) only
        import warnings

        warnings.warn(
            "jq.convert is deprecated: it is jq.quantize_tree, which now takes the same "
            "arguments (pattern lists, load=, delete=). jq.convert will be removed.",
            DeprecationWarning,
            stacklevel=2,
        )
        return quantize_tree
    raise AttributeError(f"module 'jaxquant' has no attribute {name!r}")


__all__ = [
    "QArray",
    "QuantConfig",
    "QuantSpec",
    "ScaleState",
    "Scaling",
    "SizeReport",
    "absmax",
    "conv_general_dilated",
    "current_scaling",
    "delayed_scaling",
    "dequantize",
    "dequantize_tree",
    "dot_capabilities",
    "dot_general",
    "einsum",
    "explain",
    "fake_quant",
    "fake_quant_with",
    "fixed",
    "formats",
    "integer",
    "kl",
    "kv_cache_init",
    "kv_cache_update",
    "lsq_fake_quant",
    "lsq_init",
    "mean_abs",
    "mean_std",
    "metrics",
    "minmax",
    "mse",
    "per_block",
    "per_block_2d",
    "per_channel",
    "per_tensor",
    "per_token",
    "percentile",
    "quantize",
    "quantize_tree",
    "quantize_with",
    "random_bits",
    "recipes",
    "rotations",
    "size_report",
    "static_scaling",
    "twn",
]
