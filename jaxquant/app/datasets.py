"""Small data sets that ship with a dependency (no download): for the sweep, the papers'
reproductions, the notebooks and the benchmarks."""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxquant.app._checks import check_int
from jaxquant.extras import missing_extra

__all__ = ["digits", "stdlib_bytes", "stdlib_corpus"]


def digits(n_train: int | None = None) -> dict[str, np.ndarray]:
    """scikit-learn's 8x8 digits, split 75 / 25 (stratified, ``random_state=0``) and
    standardized with the training split's per-pixel mean and std (constant pixels: std 1).

    Args:
      n_train: keep only the first ``n_train`` training images (quick runs); the
        standardization then uses their statistics.

    Returns:
      ``x_train`` / ``x_test``: float32 ``(n, 64)``; ``y_train`` / ``y_test``: int32 labels
      0..9 (1347 training and 450 test images).

    Example:
      >>> from jaxquant.app.datasets import digits
      >>> d = digits()
      >>> d["x_train"].shape, d["x_test"].shape, d["y_train"].dtype
      ((1347, 64), (450, 64), dtype('int32'))
    """
    if n_train is not None:
        n_train = check_int(n_train, "digits: n_train", lo=1)
    try:  # an extra: only digits() needs it
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise missing_extra("sweep", "jaxquant.app.datasets.digits", ("scikit-learn",)) from err

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(
        x.astype(np.float32), y.astype(np.int32), test_size=0.25, stratify=y, random_state=0
    )
    if n_train is not None:
        xtr, ytr = xtr[:n_train], ytr[:n_train]
    mean, std = xtr.mean(axis=0), xtr.std(axis=0)
    std = np.where(std > 1e-6, std, 1.0).astype(np.float32)
    return {
        "x_train": (xtr - mean) / std,
        "y_train": ytr,
        "x_test": (xte - mean) / std,
        "y_test": yte,
    }


def stdlib_corpus(val_every: int = 10, max_files: int | None = None) -> dict[str, Any]:
    """The Python standard library's own top-level ``.py`` files as bytes: present
    offline on every machine (the exact bytes depend on the Python version: ``info``
    records it with a sha256).

    Files are sorted by name; every ``val_every``-th one (indices ``val_every - 1``,
    ``2 val_every - 1``, ...) is held out for validation; each split is its files joined
    by a newline. ``max_files`` keeps the first files only (quick runs).

    Returns:
      ``{"train": uint8 array, "val": uint8 array, "info": {stdlib, python, files_train,
      files_val, bytes_train, bytes_val, sha256}}``.

    Example:
      >>> from jaxquant.app.datasets import stdlib_corpus
      >>> c = stdlib_corpus(max_files=20)  # files 10 and 20 are held out
      >>> c["train"].dtype, c["info"]["files_train"], c["info"]["files_val"]
      (dtype('uint8'), 18, 2)
    """
    import hashlib
    import sys
    import sysconfig
    from pathlib import Path

    val_every = check_int(val_every, "stdlib_corpus: val_every", lo=2)
    if max_files is not None:
        max_files = check_int(max_files, "stdlib_corpus: max_files", lo=1)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file())
    if max_files is not None:
        files = files[:max_files]
    if len(files) < val_every:  # no validation file: the arguments ask for too much
        raise ValueError(
            f"stdlib_corpus: val_every={val_every} holds out every {val_every}-th file, but "
            f"only {len(files)} .py files are used (max_files={max_files}, {stdlib}); "
            "lower val_every or raise max_files."
        )
    train: list[bytes] = []
    val: list[bytes] = []
    for i, f in enumerate(files):
        (val if i % val_every == val_every - 1 else train).append(f.read_bytes())
    tr, va = b"\n".join(train), b"\n".join(val)
    return {
        "train": np.frombuffer(tr, np.uint8),
        "val": np.frombuffer(va, np.uint8),
        "info": {
            "stdlib": str(stdlib),
            "python": sys.version.split()[0],
            "files_train": len(train),
            "files_val": len(val),
            "bytes_train": len(tr),
            "bytes_val": len(va),
            "sha256": hashlib.sha256(tr + b"\0" + va).hexdigest(),
        },
    }


def spaced_windows(data: np.ndarray, length: int, n: int) -> np.ndarray:
    """``n`` windows of ``length`` bytes, evenly spaced over ``data`` (int32 ``(n, length)``)."""
    if len(data) < length + 1:
        raise ValueError(f"spaced_windows: {len(data)} bytes hold no window of {length}.")
    starts = np.linspace(0, len(data) - length, n).astype(np.int64)
    return np.stack([data[s : s + length] for s in starts]).astype(np.int32)


def stdlib_bytes(
    seq: int = 128,
    *,
    test_windows: int = 512,
    val_every: int = 10,
    max_files: int | None = None,
) -> dict[str, np.ndarray]:
    """Next-byte prediction on :func:`stdlib_corpus`, as a supervised data set.

    Training windows tile the training bytes (stride ``seq``, no overlap); the test set is
    ``test_windows`` windows evenly spaced over the held-out files. Inputs are a window's
    first ``seq`` bytes, targets the same window shifted by one.

    Returns:
      ``x_train`` / ``x_test``: int32 ``(n, seq)`` byte values; ``y_train`` / ``y_test``:
      int32 ``(n, seq)``, the next byte at every position.

    Example:
      >>> from jaxquant.app.datasets import stdlib_bytes
      >>> d = stdlib_bytes(seq=32, test_windows=8, max_files=20)
      >>> d["x_test"].shape, d["y_test"].dtype
      ((8, 32), dtype('int32'))
    """
    seq = check_int(seq, "stdlib_bytes: seq", lo=1)
    test_windows = check_int(test_windows, "stdlib_bytes: test_windows", lo=1)
    corpus = stdlib_corpus(val_every, max_files)
    tr = corpus["train"]
    n = (len(tr) - 1) // seq
    if n < 1:
        raise ValueError(f"stdlib_bytes: {len(tr)} training bytes hold no window of {seq + 1}.")
    idx = np.arange(n)[:, None] * seq + np.arange(seq + 1)[None, :]
    train = tr[idx].astype(np.int32)
    test = spaced_windows(corpus["val"], seq + 1, test_windows)
    return {
        "x_train": train[:, :-1],
        "y_train": train[:, 1:],
        "x_test": test[:, :-1],
        "y_test": test[:, 1:],
    }
