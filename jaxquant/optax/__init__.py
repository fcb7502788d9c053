"""jaxquant's optax integration: dynamic loss scaling and stochastic-rounded updates.

``import jaxquant.optax as jqo`` (needs optax; the core ``jaxquant`` package does not).
"""

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
    "StochasticRoundState",
    "all_finite",
    "apply_updates_sr",
    "dynamic_loss_scale",
    "scale_loss",
    "stochastic_round_updates",
]
