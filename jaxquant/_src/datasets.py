"""Small data sets that ship with a dependency (no download): for the sweep, the papers'
reproductions, the notebooks and the benchmarks."""

from __future__ import annotations

import numpy as np


def digits() -> dict[str, np.ndarray]:
    """scikit-learn's 8x8 digits, split 75 / 25 (stratified, ``random_state=0``) and
    standardized with the training split's per-pixel mean and std (constant pixels: std 1).

    Returns:
      ``x_train`` / ``x_test``: float32 ``(n, 64)``; ``y_train`` / ``y_test``: int32 labels
      0..9 (1347 training and 450 test images).

    Example:
      >>> from jaxquant.datasets import digits
      >>> d = digits()
      >>> d["x_train"].shape, d["x_test"].shape, d["y_train"].dtype
      ((1347, 64), (450, 64), dtype('int32'))
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(
        x.astype(np.float32), y.astype(np.int32), test_size=0.25, stratify=y, random_state=0
    )
    mean, std = xtr.mean(axis=0), xtr.std(axis=0)
    std = np.where(std > 1e-6, std, 1.0).astype(np.float32)
    return {
        "x_train": (xtr - mean) / std,
        "y_train": ytr,
        "x_test": (xte - mean) / std,
        "y_test": yte,
    }
