"""Hadamard rotations: Hadamard matrices, the fast Walsh-Hadamard transform and random or
deterministic (blockwise) Hadamard rotations, for rotation-based PTQ (QuaRot, SpinQuant) and
4-bit training (NVFP4, MXFP4).

``jq.rotations.walsh_hadamard(x)`` multiplies by a Hadamard matrix along an axis in
``O(n log n)``; ``jq.rotations.hadamard_rotation(16, key=key).apply(x)`` applies a random
16 x 16 Hadamard rotation to each block of 16. ``jq.rotations.DotHadamard(gemms=("wgrad",))``,
given as ``jq.QuantConfig(hadamard=...)``, rotates the operands of chosen products of a
quantized ``dot_general`` / ``einsum`` (the random Hadamard transform of NVFP4 / MXFP4
training). Sizes ``m * 2^k`` with ``m = 1`` or a Paley order (12, 20, 28, ...) are covered
(``hadamard_supported``).
"""

from jaxquant._src.hadamard import (
    DotHadamard,
    HadamardRotation,
    hadamard_matrix,
    hadamard_rotation,
    hadamard_supported,
    walsh_hadamard,
)

__all__ = [
    "DotHadamard",
    "HadamardRotation",
    "hadamard_matrix",
    "hadamard_rotation",
    "hadamard_supported",
    "walsh_hadamard",
]
