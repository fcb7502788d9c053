"""Small digits models and a jitted trainer shared by the end-to-end tests.

The tests own these (they used to import benchmarks/, which is not part of the package):
a ReLU MLP, a 3x3 VALID CNN and a training loop that runs every epoch in one
``jax.jit`` (``lax.scan`` over epochs and mini-batches), compiled once per model.
Data: ``jaxquant.app.datasets.digits`` (scikit-learn's 8x8 digits, 1347 train / 450 test).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from xla_options import OPTIMIZED

from jaxquant.app.datasets import digits


class MLP(nn.Module):
    """ReLU MLP; layers ``Dense_0`` .. ``Dense_{len(features)}``."""

    features: tuple[int, ...] = (128, 128)
    n_out: int = 10

    @nn.compact
    def __call__(self, x):
        for f in self.features:
            x = nn.relu(nn.Dense(f)(x))
        return nn.Dense(self.n_out)(x)


class CNN(nn.Module):
    """8x8x1 images given flat: 3x3 VALID convolutions, then two Dense layers
    (``Conv_0..``, ``Dense_0``, ``Dense_1``)."""

    channels: tuple[int, ...] = (32, 32)
    hidden: int = 64
    n_out: int = 10

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], 8, 8, 1)
        for c in self.channels:
            x = nn.relu(nn.Conv(c, (3, 3), padding="VALID")(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.n_out)(x)


@functools.cache
def data(n_train: int | None = None) -> dict[str, np.ndarray]:
    """The digits split, loaded once per test process."""
    return digits(n_train)


def make_trainer(model: nn.Module, tx: optax.GradientTransformation, *, batch: int, epochs: int):
    """A jitted ``train(params, state, opt_state, x, y, key) -> (params, state, opt_state,
    epoch_losses)``: every epoch a fresh permutation, the last partial batch dropped.
    ``state`` holds the non-parameter collections (delayed scaling's ``quant_state``), made
    mutable in ``apply`` when there are any.

    optax's Adam does not trace under the suite's strict dtype promotion: call ``train``
    under ``jax.numpy_dtype_promotion("standard")``."""

    def loss_fn(params, state, x, y):
        if state:
            logits, new_state = model.apply({"params": params, **state}, x, mutable=list(state))
            new_state = dict(new_state)
        else:
            logits, new_state = model.apply({"params": params}, x), state
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_state

    def train(params, state, opt_state, x, y, key):
        n_batches = x.shape[0] // batch

        def step(carry, idx):
            params, state, opt_state = carry
            (loss, state), g = jax.value_and_grad(loss_fn, has_aux=True)(
                params, state, x[idx], y[idx]
            )
            updates, opt_state = tx.update(g, opt_state, params)
            return (optax.apply_updates(params, updates), state, opt_state), loss

        def epoch(carry, ekey):
            perm = jax.random.permutation(ekey, x.shape[0])[: n_batches * batch]
            carry, losses = jax.lax.scan(step, carry, perm.reshape(n_batches, batch))
            return carry, losses.mean()

        keys = jax.random.split(key, epochs)
        (params, state, opt_state), losses = jax.lax.scan(epoch, (params, state, opt_state), keys)
        return params, state, opt_state, losses

    return jax.jit(train, compiler_options=OPTIMIZED)  # long-running: xla_options.py


def train(model: nn.Module, d, *, seed: int, epochs: int, lr: float, batch: int = 64):
    """``(variables, epoch_losses)``: ``model`` trained on ``d``'s training split with Adam
    (cosine decay to 0) from ``seed``; ``variables`` holds every collection ``init`` made."""
    x, y = jnp.asarray(d["x_train"]), jnp.asarray(d["y_train"])
    tx, run = _adam_trainer(model, epochs, lr, batch, x.shape[0])
    init_key, data_key = jax.random.split(jax.random.key(seed))
    with jax.numpy_dtype_promotion("standard"):
        # Jitted: eagerly each initializer op would compile its own program (same values).
        variables = dict(jax.jit(model.init)(init_key, x[:1]))
        params = variables.pop("params")
        opt_state = jax.jit(tx.init)(params)
        params, state, _, losses = run(params, variables, opt_state, x, y, data_key)
    return {"params": params, **state}, np.asarray(losses)


@functools.cache
def _adam_trainer(model: nn.Module, epochs: int, lr: float, batch: int, n_train: int):
    """``train``'s optimizer and jitted loop, made once per configuration: the seeds of a
    test share one compilation (a new ``jax.jit`` per call would compile again)."""
    steps = epochs * (n_train // batch)
    tx = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.0))
    return tx, make_trainer(model, tx, batch=batch, epochs=epochs)


def accuracy(logits, y) -> float:
    """Percentage of correct predictions (an exact integer count over ``len(y)``)."""
    return 100.0 * int(jnp.sum(jnp.argmax(logits, -1) == jnp.asarray(y))) / len(y)
