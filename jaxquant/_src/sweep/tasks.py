"""Built-in tasks (scikit-learn digits: an MLP and a CNN), custom tasks by import path,
and the float training / QAT fine-tuning loops.

Data: :func:`jaxquant.datasets.digits` (bundled with scikit-learn, no download): split
75 / 25 (stratified, ``random_state=0``: 1347 train, 450 test images), standardized with
the training split's per-pixel statistics -- the split of ``benchmarks/qat_digits.py``.

Training: Adam with cosine decay on mini-batches, the whole run one jitted ``lax.scan``.
optax does not trace under strict dtype promotion, so training runs under
``jax.numpy_dtype_promotion("standard")``.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


class MLP(nn.Module):
    """ReLU MLP; layers ``Dense_0`` .. ``Dense_{len(features)}``."""

    features: tuple[int, ...] = (256, 256)
    n_out: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for f in self.features:
            x = nn.relu(nn.Dense(f)(x))
        return nn.Dense(self.n_out)(x)


class CNN(nn.Module):
    """3x3 VALID convolutions then two Dense layers, on 8x8x1 images given flat (64)."""

    channels: tuple[int, ...] = (32, 32)
    hidden: int = 64
    n_out: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], 8, 8, 1)
        for c in self.channels:
            x = nn.relu(nn.Conv(c, (3, 3), padding="VALID")(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.n_out)(x)


def import_object(path: str) -> Any:
    """``"pkg.module:name"`` -> the object."""
    mod, _, name = path.partition(":")
    return getattr(importlib.import_module(mod), name)


def build_model(task: dict[str, Any]) -> nn.Module:
    """The task's model: ``model(**model_kwargs)`` (lists become tuples: Linen fields are
    hashable)."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in task["model_kwargs"].items()}
    model = import_object(task["model"])(**kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"task.model {task['model']!r} returned {type(model).__name__}, not a "
            "flax.linen.Module."
        )
    return model


def load_data(task: dict[str, Any]) -> dict[str, np.ndarray]:
    """The task's data dict, checked: ``x_train, y_train, x_test, y_test``."""
    data = import_object(task["data"])()
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in data]
    if missing:
        raise ValueError(f"task.data {task['data']!r} returned no {', '.join(missing)}.")
    return {k: np.asarray(data[k]) for k in ("x_train", "y_train", "x_test", "y_test")}


@functools.lru_cache(maxsize=64)
def make_trainer(model: nn.Module, batch: int, steps: int, lr: float):
    """A jitted ``train(params, x, y, key) -> (params, losses)``: ``steps`` Adam steps
    (cosine decay from ``lr``) on random mini-batches of ``batch`` (cached: one compile
    per model and schedule in a process)."""
    tx = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.0))

    def loss_fn(params, x, y):
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def train(params, x, y, key):
        n = x.shape[0]
        b = min(batch, n)

        def step(carry, k):
            params, opt_state = carry
            idx = jax.random.choice(k, n, (b,), replace=False)
            loss, g = jax.value_and_grad(loss_fn)(params, x[idx], y[idx])
            updates, opt_state = tx.update(g, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, _), losses = jax.lax.scan(
            step, (params, tx.init(params)), jax.random.split(key, steps)
        )
        return params, losses

    def run(params, x, y, key):
        with jax.numpy_dtype_promotion("standard"):
            return train(params, x, y, key)

    return run


def train_float(model: nn.Module, task: dict[str, Any], data: dict[str, Any], seed: int):
    """``(params, final_loss)``: the float model trained from ``seed``
    (``task.epochs`` passes over the training split, in steps of ``task.batch``)."""
    x, y = jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"])
    steps = task["epochs"] * max(x.shape[0] // task["batch"], 1)
    init_key, data_key = jax.random.split(jax.random.key(seed))
    with jax.numpy_dtype_promotion("standard"):
        params = model.init(init_key, x[:1])["params"]
    params, losses = make_trainer(model, task["batch"], steps, task["lr"])(params, x, y, data_key)
    loss = float(losses[-1])
    if not np.isfinite(loss):
        raise FloatingPointError(f"seed {seed}: non-finite float training loss {loss}")
    return params, loss


@functools.lru_cache(maxsize=64)
def make_correct(model: nn.Module):
    """A jitted ``correct(params, x, y)``: the number of correct predictions (cached)."""

    @jax.jit
    def correct(params, x, y):
        logits = model.apply({"params": params}, x)
        return jnp.sum(jnp.argmax(logits, axis=-1) == y)

    return correct


def kernels(params: Any) -> dict[str, tuple[int, ...]]:
    """The quantized layers: module path -> kernel shape (leaves ``kernel`` of rank >= 2)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [str(getattr(p, "key", p)) for p in path]
        if names and names[-1] == "kernel" and leaf.ndim >= 2:
            out["/".join(names[:-1])] = tuple(leaf.shape)
    return out
