"""The transformer test bed of the post-training tests: :mod:`jaxquant.app.testbed`'s byte
LM (:class:`jaxquant.app.models.ByteLM`, trained on the Python standard library's source)
at its default configuration, its held-out windows, and the outlier variant.

Training is deterministic and cached in the temp directory by the app module (~20 s once
per machine instead of once per test file); these names are what the tests import.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from jaxquant.app import testbed
from jaxquant.app.models import ByteLM

CONFIG = testbed.CONFIG
TRAIN = testbed.TRAINING
OUTLIERS = testbed.OUTLIERS
MODEL = ByteLM(**CONFIG)


def data() -> dict[str, np.ndarray]:
    """``x_train`` / ``y_train`` / ``x_test`` / ``y_test`` windows of ``seq`` bytes."""
    return testbed.data(CONFIG["seq"], test_windows=64, max_files=TRAIN["max_files"])


@functools.lru_cache(maxsize=1)
def params() -> dict:
    """The trained float params (loaded from the temp-dir cache when present)."""
    return testbed.train_byte_lm(CONFIG, TRAIN)


@functools.lru_cache(maxsize=1)
def outlier_params() -> dict:
    """``params()`` with 4 residual channels 60-1000x the median at every quantized layer's
    input (the same function)."""
    return testbed.outlier_params(params(), OUTLIERS)


def test_batches(n: int = 4, size: int = 16) -> list[jax.Array]:
    """Held-out token windows (int32 ``(size, seq)``), ``n`` batches: evaluation."""
    return testbed.held_out_batches(data()["x_test"], n, size)


def calibration_batches(n: int = 4, size: int = 16) -> list[jax.Array]:
    """Training windows (never the evaluation ones), ``n`` batches: calibration."""
    return testbed.calibration_batches(data()["x_train"], n, size)


def eval_loss(apply_fn, variables) -> float:
    """Held-out nats per byte of ``apply_fn(variables, x)`` (a model's apply)."""
    d = data()
    return testbed.eval_loss(apply_fn, variables, d["x_test"], d["y_test"])
