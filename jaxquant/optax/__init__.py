"""jaxquant's optax integration: loss scaling, stochastic-rounded updates, 8-bit Adam.

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

__all__ = [
    "LossScaleState",
    "QuantizedMoment",
    "ScaleByAdam8bitState",
    "StochasticRoundState",
    "adam_8bit",
    "all_finite",
    "apply_updates_sr",
    "dynamic_loss_scale",
    "scale_by_adam_8bit",
    "scale_loss",
    "state_nbytes",
    "stochastic_round_updates",
]
