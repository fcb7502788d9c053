"""Integer-only inference arithmetic (gemmlowp / TFLite semantics).

The fixed-point requantization of Jacob et al. 2018, "Quantization and Training of Neural
Networks for Efficient Integer-Arithmetic-Only Inference"
(https://arxiv.org/abs/1712.05877)::

    import jaxquant.integer as jqi
    m0, shift = jqi.quantize_multiplier(s_x * s_w / s_out)
    y = jqi.dense(x_u8, z_x, w_i8, bias_i32, m0, shift, z_out)
"""

from jaxquant._src.integer import (
    dense,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
)

__all__ = [
    "dense",
    "multiply_by_quantized_multiplier",
    "quantize_multiplier",
    "rounding_divide_by_pot",
    "saturating_rounding_doubling_high_mul",
]
