"""Post-training quantization methods for transformers: rotations, smoothing, activation-aware
scales and GPTQ, composable on Linen and NNX models.

Each method takes the float model, calibration batches, its variables and the
:class:`jaxquant.flax.Rule` list that says which layers are quantized how, and returns a
:class:`PTQResult`: the new variables (Linen; NNX models change in place), a per-layer
report, and the layers it could not apply to with the reason (never silently). They chain:
``rotate_residual`` or ``rotate_inputs`` -> ``smooth_quant`` or ``awq`` -> ``gptq`` (or
:func:`jaxquant.flax.convert` for round-to-nearest), each on the previous result's
variables; the last gives the same tree of QArrays ``convert`` does, so serving,
:func:`jaxquant.size_report` and :mod:`jaxquant.orbax` work unchanged. Transforms that
cannot be folded into a normalization run online in the layer
(:mod:`jaxquant._src.flax.act_transform`), stored in the ``"ptq"`` collection.

References: GPTQ (https://arxiv.org/abs/2210.17323), SmoothQuant
(https://arxiv.org/abs/2211.10438), AWQ (https://arxiv.org/abs/2306.00978), QuaRot
(https://arxiv.org/abs/2404.00456), SpinQuant (https://arxiv.org/abs/2405.16406).
"""

from jaxquant._src.gptq import GPTQResult
from jaxquant._src.gptq import gptq as gptq_solve
from jaxquant._src.ptq.awq import awq
from jaxquant._src.ptq.gptq import gptq
from jaxquant._src.ptq.result import PTQResult
from jaxquant._src.ptq.rotate import rotate_inputs, rotate_residual
from jaxquant._src.ptq.smoothquant import smooth_quant, smoothing_scales

__all__ = [
    "GPTQResult",
    "PTQResult",
    "awq",
    "gptq",
    "gptq_solve",
    "rotate_inputs",
    "rotate_residual",
    "smooth_quant",
    "smoothing_scales",
]
