"""Strict JAX for every test (equinox-style): no silent dtype or rank promotion."""

import os

# Eight fake CPU devices for the sharding tests; must be set before jax initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
# The tests bound float32 dots by float32 rounding; GPUs and TPUs would otherwise run them
# in TF32 / bf16 passes (a no-op on CPU, which the suite targets).
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def key():
    return jax.random.key(0)
