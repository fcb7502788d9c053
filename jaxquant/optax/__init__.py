"""jaxquant's optax integration: loss scaling, stochastic-rounded updates, 8-bit Adam,
variables overwritten by their gradient (the state a quantized backward pass writes).

``import jaxquant.optax as jqo`` (needs optax; the core ``jaxquant`` package does not).
"""

from jaxquant._src.optax.adam8bit import (
    QuantizedMoment,
    ScaleByAdam8bitState,
    adam_8bit,
    scale_by_adam_8bit,
    state_nbytes,
)
from jaxquant._src.optax.loss_scale import (
    LossScaleState,
    all_finite,
    dynamic_loss_scale,
    scale_loss,
)
from jaxquant._src.optax.low_precision import (
    StochasticRoundState,
    apply_updates_sr,
    stochastic_round_updates,
)
from jaxquant._src.optax.overwrite import (
    OverwriteWithGradientState,
    overwrite_with_gradient,
)

__all__ = [
    "LossScaleState",
    "OverwriteWithGradientState",
    "QuantizedMoment",
    "ScaleByAdam8bitState",
    "StochasticRoundState",
    "adam_8bit",
    "all_finite",
    "apply_updates_sr",
    "dynamic_loss_scale",
    "overwrite_with_gradient",
    "scale_by_adam_8bit",
    "scale_loss",
    "state_nbytes",
    "stochastic_round_updates",
]
