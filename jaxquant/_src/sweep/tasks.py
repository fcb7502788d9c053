"""Built-in tasks (scikit-learn digits: an MLP and a CNN; a byte-level transformer LM on
the Python standard library's source), custom tasks by import path, and the float
training / QAT fine-tuning loops.

Data: :func:`jaxquant.datasets.digits` (bundled with scikit-learn, no download): split
75 / 25 (stratified, ``random_state=0``: 1347 train, 450 test images), standardized with
the training split's per-pixel statistics -- the split of ``benchmarks/qat_digits.py``.
:func:`jaxquant.datasets.stdlib_bytes`: next-byte prediction, the corpus and held-out
files of ``benchmarks/qat_lm.py``. A task's labels may have any shape the logits have
but the last axis (one label per image, or one per byte position).

Training: Adam with cosine decay on mini-batches, the whole run one jitted ``lax.scan``.
optax does not trace under strict dtype promotion, so training runs under
``jax.numpy_dtype_promotion("standard")``.
"""

from __future__ import annotations

import functools
import importlib
import math
import re
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


class _Attention(nn.Module):
    heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        h, dh = self.heads, d // self.heads
        q, k, v = (nn.Dense(d, name=n)(x).reshape(b, t, h, dh) for n in ("q", "k", "v"))
        att = jnp.einsum("bthd,bshd->bhts", q, k) * (1.0 / math.sqrt(dh))
        causal = jnp.tril(jnp.ones((t, t), jnp.bool_))[None, None]
        att = jax.nn.softmax(jnp.where(causal, att, -1e30), axis=-1)
        y = jnp.einsum("bhts,bshd->bthd", att, v).reshape(b, t, d)
        return nn.Dense(d, name="o")(y)


class _Block(nn.Module):
    heads: int
    hidden: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + _Attention(self.heads, name="attn")(nn.LayerNorm(name="ln1")(x))
        y = nn.LayerNorm(name="ln2")(x)
        y = nn.Dense(self.hidden, name="fc1")(y)
        return x + nn.Dense(x.shape[-1], name="fc2")(jax.nn.gelu(y))


class ByteLM(nn.Module):
    """Causal byte-level transformer (pre-LN): byte embedding + learned positions,
    ``layers`` blocks (attention ``block<i>/attn/{q,k,v,o}``, MLP ``block<i>/{fc1,fc2}``),
    a final LayerNorm and a Dense ``head`` to 256 logits per position.

    The Linen twin of ``benchmarks/qat_lm.py``'s NNX model (same shapes and layout)."""

    seq: int = 128
    d: int = 128
    layers: int = 2
    heads: int = 4
    hidden: int = 512

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        if self.d % self.heads:
            raise ValueError(f"ByteLM: d={self.d} is not a multiple of heads={self.heads}.")
        t = tokens.shape[1]
        if t > self.seq:
            raise ValueError(f"ByteLM: {t} tokens exceed seq={self.seq} positions.")
        pos = self.param("pos", nn.initializers.normal(0.02), (self.seq, self.d))
        x = nn.Embed(256, self.d, name="embed")(tokens) + pos[None, :t]
        for i in range(self.layers):
            x = _Block(self.heads, self.hidden, name=f"block{i}")(x)
        return nn.Dense(256, name="head")(nn.LayerNorm(name="ln_f")(x))


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
    data = import_object(task["data"])(**task.get("data_kwargs", {}))
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


def train_steps(task: dict[str, Any], n_train: int) -> int:
    """``task.steps`` when given (> 0), else ``task.epochs`` passes over ``n_train``
    examples in mini-batches of ``task.batch``."""
    if task.get("steps", 0) > 0:
        return task["steps"]
    return task["epochs"] * max(n_train // task["batch"], 1)


def train_float(model: nn.Module, task: dict[str, Any], data: dict[str, Any], seed: int):
    """``(params, final_loss)``: the float model trained from ``seed``
    (:func:`train_steps` Adam steps on mini-batches of ``task.batch``)."""
    x, y = jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"])
    steps = train_steps(task, x.shape[0])
    init_key, data_key = jax.random.split(jax.random.key(seed))
    with jax.numpy_dtype_promotion("standard"):
        params = model.init(init_key, x[:1])["params"]
    params, losses = make_trainer(model, task["batch"], steps, task["lr"])(params, x, y, data_key)
    loss = float(losses[-1])
    if not np.isfinite(loss):
        raise FloatingPointError(f"seed {seed}: non-finite float training loss {loss}")
    return params, loss


@functools.lru_cache(maxsize=64)
def make_eval(model: nn.Module, batch: int = 256):
    """A jitted ``evaluate(params, x, y) -> (correct, nll_sum)``: the number of correct
    predictions and the summed cross-entropy (nats) over every label, in mini-batches of
    ``batch`` examples (cached: one compile per model)."""

    def part(params, x, y):
        logits = model.apply({"params": params}, x).astype(jnp.float32)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum(jnp.argmax(logits, axis=-1) == y), jnp.sum(nll)

    @jax.jit
    def evaluate(params, x, y):
        n = x.shape[0]
        full = n // batch * batch
        correct, nll = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32)
        if full:
            xs = x[:full].reshape(-1, batch, *x.shape[1:])
            ys = y[:full].reshape(-1, batch, *y.shape[1:])
            cs, ls = jax.lax.map(lambda xy: part(params, *xy), (xs, ys))
            correct, nll = jnp.sum(cs), jnp.sum(ls)
        if full < n:
            c, ll = part(params, x[full:], y[full:])
            correct, nll = correct + c, nll + ll
        return correct, nll

    def run(params, x, y):
        with jax.numpy_dtype_promotion("standard"):
            return evaluate(params, x, y)

    return run


def kernels(params: Any, layers: str = ".*") -> dict[str, tuple[int, ...]]:
    """The quantized layers: module path -> kernel shape, for leaves ``kernel`` of rank
    >= 2 whose module path ``re.fullmatch``-es ``layers``."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [str(getattr(p, "key", p)) for p in path]
        if names and names[-1] == "kernel" and leaf.ndim >= 2:
            layer = "/".join(names[:-1])
            if re.fullmatch(layers, layer):
                out[layer] = tuple(leaf.shape)
    return out
