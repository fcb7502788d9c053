"""Hand-written kernels for cases XLA compiles to more passes over memory than needed.

Each kernel is bit-identical to the jnp path it replaces and says, through a
``supported(spec, shape, dtype, backend)`` predicate, when it applies; the dispatcher in
:mod:`jaxquant._src.quantize` uses it only then and keeps the jnp path otherwise.
"""

from jaxquant._src.kernels.block_quant import (
    block_fake_quant,
    block_quantize,
    disabled,
    supported,
)

__all__ = ["block_fake_quant", "block_quantize", "disabled", "supported"]
