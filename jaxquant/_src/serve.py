"""Products with already-quantized weights: the QArray branch of :func:`jaxquant.dot_general`.

The code lives in :mod:`jaxquant._src.dot.serving`, beside the scaled dot it shares with
training (an import of the ``dot`` package from outside it would be a cycle); this module
keeps the names it always had.
"""

from jaxquant._src.dot.serving import dot_qarray, grid_values_exact, weight_path

__all__ = ["dot_qarray", "grid_values_exact", "weight_path"]
