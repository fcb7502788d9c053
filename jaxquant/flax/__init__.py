"""jaxquant's Flax integration (imports flax; ``import jaxquant`` alone does not).

Rule-based quantization-aware training of existing Linen and NNX models::

    from jaxquant.flax import Rule, quantize_model, report
"""

from jaxquant._src.flax import (
    CalibrationResult,
    Match,
    NnxPolicyModule,
    NnxQuantOp,
    Policy,
    PolicyModule,
    QuantizedModule,
    QuantState,
    Rule,
    apply_policy,
    calibrate,
    convert,
    quantize_model,
    report,
)

__all__ = [
    "CalibrationResult",
    "Match",
    "NnxPolicyModule",
    "NnxQuantOp",
    "Policy",
    "PolicyModule",
    "QuantState",
    "QuantizedModule",
    "Rule",
    "apply_policy",
    "calibrate",
    "convert",
    "quantize_model",
    "report",
]
