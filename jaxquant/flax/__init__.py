"""jaxquant's Flax integration (imports flax; ``import jaxquant`` alone does not).

Rule-based quantization-aware training of existing Linen and NNX models::

    from jaxquant.flax import Rule, quantize_model, report
"""

from jaxquant._src.flax import (
    Assignment,
    CalibrationResult,
    Contraction,
    LayerSensitivity,
    LayerStatistics,
    Match,
    NnxPolicyModule,
    NnxQuantOp,
    Policy,
    PolicyModule,
    QuantizedModule,
    QuantState,
    Rule,
    Sensitivity,
    Statistics,
    apply_policy,
    calibrate,
    contractions,
    convert,
    layer_statistics,
    mixed_precision,
    quantize_model,
    report,
    sensitivity,
)

__all__ = [
    "Assignment",
    "CalibrationResult",
    "Contraction",
    "LayerSensitivity",
    "LayerStatistics",
    "Match",
    "NnxPolicyModule",
    "NnxQuantOp",
    "Policy",
    "PolicyModule",
    "QuantState",
    "QuantizedModule",
    "Rule",
    "Sensitivity",
    "Statistics",
    "apply_policy",
    "calibrate",
    "contractions",
    "convert",
    "layer_statistics",
    "mixed_precision",
    "quantize_model",
    "report",
    "sensitivity",
]
