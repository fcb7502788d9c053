"""The transformer test bed of the post-training tests: a small byte-level LM
(:class:`jaxquant.app.models.ByteLM`) trained here on the Python standard library's source,
its held-out windows, and the outlier variant (:func:`jaxquant.app.models.inject_outliers`).

Training is deterministic (fixed seeds, one jitted scan), so every test process computes the
same parameters; the first one writes them to the temp directory (atomically) and the others
(and later runs) load them: ~20 s once per machine instead of once per test file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxquant.app.datasets import stdlib_bytes
from jaxquant.app.models import ByteLM, inject_outliers

CONFIG = {"seq": 64, "d": 64, "layers": 2, "heads": 4, "hidden": 256}
TRAIN = {"steps": 300, "batch": 32, "lr": 3e-3, "seed": 0, "max_files": 60}
OUTLIERS = {"channels": [5, 17, 40, 58], "scales": [60.0, 200.0, 500.0, 1000.0]}
MODEL = ByteLM(**CONFIG)


@functools.lru_cache(maxsize=1)
def data() -> dict[str, np.ndarray]:
    """``x_train`` / ``y_train`` / ``x_test`` / ``y_test`` windows of ``seq`` bytes."""
    return stdlib_bytes(CONFIG["seq"], test_windows=64, max_files=TRAIN["max_files"])


def loss(params, x, y) -> jax.Array:
    """Mean next-byte cross-entropy (nats per byte) of ``MODEL`` on ``(x, y)``."""
    logits = MODEL.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _train() -> dict:
    d = data()
    x, y = jnp.asarray(d["x_train"]), jnp.asarray(d["y_train"])
    params = MODEL.init(jax.random.key(TRAIN["seed"]), x[:1])["params"]
    tx = optax.adam(optax.cosine_decay_schedule(TRAIN["lr"], TRAIN["steps"]))

    @jax.jit
    def run(params, key):
        def step(carry, k):
            p, s = carry
            idx = jax.random.randint(k, (TRAIN["batch"],), 0, x.shape[0])
            g = jax.grad(loss)(p, x[idx], y[idx])
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        keys = jax.random.split(key, TRAIN["steps"])
        return jax.lax.scan(step, (params, tx.init(params)), keys)[0][0]

    return run(params, jax.random.key(TRAIN["seed"] + 1))


def _cache_path() -> Path:
    tag = json.dumps([CONFIG, TRAIN, jax.__version__], sort_keys=True).encode()
    return (
        Path(tempfile.gettempdir())
        / f"jaxquant_ptq_testbed_{hashlib.sha1(tag).hexdigest()[:12]}.npz"
    )


@functools.lru_cache(maxsize=1)
def params() -> dict:
    """The trained float params (loaded from the temp-dir cache when present)."""
    path = _cache_path()
    template = jax.eval_shape(
        lambda: MODEL.init(jax.random.key(0), jnp.zeros((1, CONFIG["seq"]), jnp.int32))["params"]
    )
    leaves, treedef = jax.tree_util.tree_flatten(template)
    if path.exists():
        try:
            with np.load(path) as f:
                return jax.tree_util.tree_unflatten(
                    treedef, [jnp.asarray(f[f"a{i}"]) for i in range(len(leaves))]
                )
        except (OSError, KeyError, ValueError):
            pass  # a partial or foreign file: retrain and overwrite
    trained = _train()
    flat = jax.tree_util.tree_leaves(trained)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, **{f"a{i}": np.asarray(a) for i, a in enumerate(flat)})
    os.replace(tmp, path)
    return trained


@functools.lru_cache(maxsize=1)
def outlier_params() -> dict:
    """``params()`` with 4 residual channels 60-1000x the median at every quantized layer's
    input (the same function)."""
    return inject_outliers(params(), OUTLIERS["channels"], OUTLIERS["scales"])


def test_batches(n: int = 4, size: int = 16) -> list[jax.Array]:
    """Held-out token windows (int32 ``(size, seq)``), ``n`` batches: evaluation."""
    x = data()["x_test"]
    return [jnp.asarray(x[i * size : (i + 1) * size]) for i in range(n)]


def calibration_batches(n: int = 4, size: int = 16) -> list[jax.Array]:
    """Training windows (never the evaluation ones), ``n`` batches: calibration."""
    x = data()["x_train"]
    step = max(1, len(x) // (n * size))
    return [jnp.asarray(x[(i * size) * step : (i * size + size) * step : step]) for i in range(n)]


def eval_loss(apply_fn, variables) -> float:
    """Held-out nats per byte of ``apply_fn(variables, x)`` (a model's apply)."""
    d = data()
    x, y = jnp.asarray(d["x_test"]), jnp.asarray(d["y_test"])
    logits = jax.jit(apply_fn)(variables, x)
    return float(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())
