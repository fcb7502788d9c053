"""XLA compile options for the few programs of the suite that need LLVM's optimizer.

The suite compiles at ``--xla_backend_optimization_level=0`` (tests/conftest.py: most of its
time is compiling small programs). Pass :data:`OPTIMIZED` as ``jax.jit(...,
compiler_options=OPTIMIZED)`` to a program that either

* runs long: XLA:CPU's loops for a convolution's gradients are ~20x slower unoptimized
  (the digits CNN's training: 43 CPU-s a seed instead of 2); or
* is checked for agreement between values that XLA computes twice. XLA may recompute a
  cheap expression inside each fusion that reads it, and unoptimized LLVM contracts
  ``a * b + c`` into a fused multiply-add in some of those fusions and not in others, so
  the copies can differ by an ulp (mean_std's ``|mean| + k * std``). Optimized, every copy
  is contracted alike.
"""

OPTIMIZED = {"xla_backend_optimization_level": 1}
