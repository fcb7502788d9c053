"""The transformer test bed of post-training quantization: a small byte-level LM
(:class:`jaxquant.app.models.ByteLM`) trained on the Python standard library's source
(:func:`jaxquant.app.datasets.stdlib_bytes`), its held-out windows and loss, calibration
batches, and the outlier variant (:func:`jaxquant.app.models.inject_outliers`).

The one copy that the PTQ tests (``tests/ptq_testbed.py``), the papers (``papers/gptq``,
``papers/awq``, ``papers/int_grids``, ...) and the benchmarks share. Training is
deterministic (fixed seeds, Adam with cosine decay, one jitted scan), so every process
computes the same parameters; the first one writes them to the temp directory (atomically,
keyed by configuration, training recipe and JAX version) and later ones load them: one
training per machine and configuration instead of one per process.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxquant.app.datasets import stdlib_bytes
from jaxquant.app.models import ByteLM, inject_outliers

__all__ = [
    "CONFIG",
    "LAYERS",
    "OUTLIERS",
    "TRAINING",
    "calibration_batches",
    "data",
    "eval_loss",
    "held_out_batches",
    "outlier_params",
    "quantized",
    "train_byte_lm",
]

#: The PTQ tests' model: 2 pre-LN blocks, d 64 (the papers' "small" model).
CONFIG: dict[str, int] = {"seq": 64, "d": 64, "layers": 2, "heads": 4, "hidden": 256}
#: Adam, cosine decay from ``lr`` over ``steps``; init key ``seed``, batch keys ``seed + 1``;
#: ``max_files`` standard-library files (every 10th held out).
TRAINING: dict[str, Any] = {"steps": 300, "batch": 32, "lr": 3e-3, "seed": 0, "max_files": 60}
#: The layers the PTQ tests, papers and benchmarks quantize: every Dense of the blocks
#: and the head (the embedding stays in float), as a ``Rule`` pattern.
LAYERS = r"block\d+/.*|head"
#: Residual channels made 60-1000x the median at every quantized layer's input.
OUTLIERS: dict[str, list] = {"channels": [5, 17, 40, 58], "scales": [60.0, 200.0, 500.0, 1000.0]}


@functools.lru_cache(maxsize=8)
def data(seq: int = 64, test_windows: int = 64, max_files: int = 60) -> dict[str, np.ndarray]:
    """Training and held-out windows of ``seq`` bytes (held-out files are never trained on).

    :func:`jaxquant.app.datasets.stdlib_bytes` with ``max_files`` files, cached in memory;
    the training windows do not depend on ``test_windows``.

    Returns:
      ``x_train`` / ``y_train`` / ``x_test`` / ``y_test``: int32 ``(n, seq)`` windows.

    Example:
      >>> from jaxquant.app.testbed import data
      >>> d = data(seq=32, test_windows=8, max_files=20)
      >>> d["x_test"].shape, d["y_train"].dtype
      ((8, 32), dtype('int32'))
    """
    return stdlib_bytes(seq, test_windows=test_windows, max_files=max_files)


def _recipe(config: Mapping[str, int] | None, training: Mapping[str, Any] | None) -> str:
    """The canonical JSON of (config, training): the in-memory and on-disk cache key."""
    config = dict(CONFIG if config is None else config)
    unknown = set(config) - set(CONFIG)
    if unknown:
        raise ValueError(
            f"train_byte_lm: config has unknown keys {sorted(unknown)}; use {sorted(CONFIG)}."
        )
    config = {**CONFIG, **config}
    training = dict(TRAINING if training is None else training)
    unknown = set(training) - set(TRAINING)
    if unknown:
        raise ValueError(
            f"train_byte_lm: training has unknown keys {sorted(unknown)}; use {sorted(TRAINING)}."
        )
    training = {**TRAINING, **training}
    return json.dumps({"config": config, "training": training}, sort_keys=True)


def _train(config: dict[str, Any], training: dict[str, Any]) -> Any:
    lm = ByteLM(**config)
    d = data(config["seq"], max_files=training["max_files"])
    x, y = jnp.asarray(d["x_train"]), jnp.asarray(d["y_train"])
    seed, steps, batch = training["seed"], training["steps"], training["batch"]
    params = lm.init(jax.random.key(seed), x[:1])["params"]
    tx = optax.adam(optax.cosine_decay_schedule(training["lr"], steps))

    def loss(p, xb, yb):
        logits = lm.apply({"params": p}, xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @jax.jit
    def run(params, key):
        def step(carry, k):
            p, s = carry
            idx = jax.random.randint(k, (batch,), 0, x.shape[0])
            g = jax.grad(loss)(p, x[idx], y[idx])
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        keys = jax.random.split(key, steps)
        return jax.lax.scan(step, (params, tx.init(params)), keys)[0][0]

    # optax's Adam is not strict-promotion clean; "standard" changes no value, only errors.
    with jax.numpy_dtype_promotion("standard"):
        return run(params, jax.random.key(seed + 1))


@functools.lru_cache(maxsize=16)
def _trained(recipe: str, cache: bool) -> Any:
    r = json.loads(recipe)
    config, training = r["config"], r["training"]
    if not cache:
        return _train(config, training)
    tag = json.dumps([r, jax.__version__], sort_keys=True).encode()
    path = Path(tempfile.gettempdir()) / (
        f"jaxquant_byte_lm_{hashlib.sha1(tag).hexdigest()[:12]}.npz"
    )
    template = jax.eval_shape(
        lambda: ByteLM(**config).init(jax.random.key(0), jnp.zeros((1, config["seq"]), jnp.int32))[
            "params"
        ]
    )
    leaves, treedef = jax.tree_util.tree_flatten(template)
    if path.exists():
        try:
            with np.load(path) as f:
                return jax.tree_util.tree_unflatten(
                    treedef, [jnp.asarray(f[f"a{i}"]) for i in range(len(leaves))]
                )
        except (OSError, KeyError, ValueError):
            pass  # a partial or foreign file: train again and overwrite
    trained = _train(config, training)
    # Write a private file, then rename: readers in other processes never see a partial one.
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
    arrays: dict[str, Any] = {
        f"a{i}": np.asarray(a) for i, a in enumerate(jax.tree_util.tree_leaves(trained))
    }
    with os.fdopen(fd, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return trained


def train_byte_lm(
    config: Mapping[str, int] | None = None,
    training: Mapping[str, Any] | None = None,
    *,
    cache: bool = True,
) -> Any:
    """The trained float ``params`` of ``ByteLM(**config)`` on the standard library's bytes.

    Adam with a cosine-decayed learning rate, ``steps`` steps of ``batch`` random training
    windows, in one jitted ``lax.scan``: deterministic, so the same recipe gives the same
    bits in every process. Results are cached in memory and (``cache=True``) in the temp
    directory, keyed by ``config``, ``training`` and the JAX version.

    Args:
      config: :class:`~jaxquant.app.models.ByteLM` fields (``seq``, ``d``, ``layers``,
        ``heads``, ``hidden``); missing ones from :data:`CONFIG`.
      training: ``steps``, ``batch``, ``lr``, ``seed`` (init key; batch keys ``seed + 1``)
        and ``max_files`` (of :func:`data`); missing ones from :data:`TRAINING`.
      cache: read and write the temp-directory cache.

    Returns:
      The ``params`` collection (call ``ByteLM(**config).apply({"params": p}, x)``).
      Do not modify it in place: calls with the same recipe share it.

    Example:
      >>> import jax
      >>> from jaxquant.app.testbed import train_byte_lm
      >>> cfg = {"seq": 16, "d": 16, "layers": 1, "heads": 2, "hidden": 32}
      >>> p = train_byte_lm(cfg, {"steps": 2, "batch": 4, "max_files": 20}, cache=False)
      >>> p["head"]["kernel"].shape
      (16, 256)
    """
    return _trained(_recipe(config, training), bool(cache))


def outlier_params(params: Any, outliers: Mapping[str, Any] | None = None) -> Any:
    """``params`` with outlier residual channels (the same float function).

    :func:`jaxquant.app.models.inject_outliers` with ``outliers["channels"]`` and
    ``outliers["scales"]`` (default :data:`OUTLIERS`: 4 channels 60-1000x the median at
    every quantized layer's input, the massive activations of large LMs that SmoothQuant
    (https://arxiv.org/abs/2211.10438) and rotations (https://arxiv.org/abs/2404.00456)
    address).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxquant.app.models import ByteLM
      >>> from jaxquant.app.testbed import outlier_params
      >>> lm = ByteLM(seq=8, d=16, layers=1, heads=2, hidden=32)
      >>> p = jax.jit(lm.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
      >>> q = outlier_params(p, {"channels": [3], "scales": [100.0]})
      >>> float(q["block0"]["ln1"]["scale"][3] / p["block0"]["ln1"]["scale"][3])
      100.0
    """
    o = OUTLIERS if outliers is None else outliers
    return inject_outliers(params, o["channels"], o["scales"])


def _batches(x: np.ndarray, n: int, size: int, step: int) -> list[jax.Array]:
    return [jnp.asarray(x[(i * size) * step : (i * size + size) * step : step]) for i in range(n)]


def held_out_batches(x_test: np.ndarray, n: int = 4, size: int = 16) -> list[jax.Array]:
    """``n`` consecutive batches of ``size`` held-out windows (evaluation).

    Example:
      >>> import numpy as np
      >>> from jaxquant.app.testbed import held_out_batches
      >>> [b.shape for b in held_out_batches(np.zeros((64, 8), np.int32), n=2, size=3)]
      [(3, 8), (3, 8)]
    """
    return _batches(x_test, n, size, 1)


def calibration_batches(x_train: np.ndarray, n: int = 4, size: int = 16) -> list[jax.Array]:
    """``n`` batches of ``size`` training windows spread evenly over the training split
    (calibration never sees the held-out windows).

    Example:
      >>> import numpy as np
      >>> from jaxquant.app.testbed import calibration_batches
      >>> x = np.arange(100, dtype=np.int32)[:, None]
      >>> [b[:, 0].tolist() for b in calibration_batches(x, n=2, size=2)]
      [[0, 25], [50, 75]]
    """
    return _batches(x_train, n, size, max(1, len(x_train) // (n * size)))


@functools.lru_cache(maxsize=64)
def quantized(lm: ByteLM, rules: tuple[Any, ...]) -> Any:
    """``jaxquant.flax.quantize_model(lm, rules)``, one per (model, rules), traced once (no
    compute) so that ``convert`` knows its contractions.

    :func:`eval_loss` jits a model's ``apply`` once per ``apply``; a new quantized module at
    every call would trace and compile the whole model again at every evaluation. With this
    one, every evaluation under the same rules (round-to-nearest weights, a PTQ method's
    result) shares one compiled program.

    Example:
      >>> import jaxquant as jq
      >>> from jaxquant.flax import Rule
      >>> from jaxquant.app.models import ByteLM
      >>> from jaxquant.app.testbed import quantized
      >>> lm = ByteLM(seq=8, d=16, layers=1, heads=2, hidden=32)
      >>> rules = (Rule("head", weight=jq.QuantSpec("int8")),)
      >>> qm = quantized(lm, rules)
      >>> qm is quantized(lm, rules), [m.path for m in jq.flax.report(qm)]
      (True, ['head'])
    """
    from jaxquant.flax import quantize_model  # the app layer on the public API

    qm = quantize_model(lm, list(rules))
    jax.eval_shape(qm.init, jax.random.key(0), jnp.zeros((1, lm.seq), jnp.int32))
    return qm


def eval_loss(apply_fn: Callable[..., Any], variables: Any, x: Any, y: Any) -> float:
    """Mean next-byte cross-entropy (nats per byte) of ``apply_fn(variables, x)`` against
    ``y`` (a model's ``apply``, jitted here).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxquant.app.models import ByteLM
      >>> from jaxquant.app.testbed import eval_loss
      >>> lm = ByteLM(seq=8, d=16, layers=1, heads=2, hidden=32)
      >>> x = jnp.zeros((2, 8), jnp.int32)
      >>> v = jax.jit(lm.init)(jax.random.key(0), x)
      >>> 5.0 < eval_loss(lm.apply, v, x, x) < 7.0  # near log(256) = 5.5 at init
      True
    """
    logits = _jitted(apply_fn)(variables, jnp.asarray(x))
    return float(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean())


def _jitted(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``jax.jit(fn)``, one per ``fn``: a model's ``apply`` is a new bound method at every
    access (equal ones hash alike), and a new ``jax.jit`` of it traces and compiles again.
    Evaluating a model (or its quantized variants' variables) twice compiles once."""
    try:
        return _jit_cache(fn)
    except TypeError:  # an unhashable callable (a module with a list field): no reuse
        return jax.jit(fn)


@functools.lru_cache(maxsize=32)
def _jit_cache(fn: Callable[..., Any]) -> Callable[..., Any]:
    return jax.jit(fn)
