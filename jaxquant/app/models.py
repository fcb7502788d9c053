"""The application layer's models: one digits MLP, one digits CNN and one byte-level
transformer LM, shared by the sweep's built-in tasks, the benchmarks, the papers'
reproductions, the notebooks and the end-to-end tests (plain Flax Linen; nothing here is
quantization-aware: quantize them with :func:`jaxquant.flax.quantize_model`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["CNN", "MLP", "ByteLM"]


class MLP(nn.Module):
    """The digits MLP: ReLU, layers ``Dense_0`` .. ``Dense_{len(features)}``.

    ``dense`` builds each layer: ``nn.Dense`` by default, or a peer library's quantized
    Dense, or a ``functools.partial`` of ``nn.Dense`` with a dtype or a ``dot_general``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxquant.app.models import MLP
      >>> net = MLP(features=(32,))
      >>> x = jnp.ones((4, 64))
      >>> net.apply(net.init(jax.random.key(0), x), x).shape
      (4, 10)
    """

    features: tuple[int, ...] = (256, 256)
    n_out: int = 10
    dense: Callable[..., nn.Module] = nn.Dense

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for f in self.features:
            x = nn.relu(self.dense(f)(x))
        return self.dense(self.n_out)(x)


class CNN(nn.Module):
    """3x3 VALID convolutions then two Dense layers, on 8x8x1 images given flat (64):
    layers ``Conv_0``.., ``Dense_0``, ``Dense_1``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxquant.app.models import CNN
      >>> net = CNN(channels=(8,), hidden=16)
      >>> x = jnp.ones((2, 64))
      >>> net.apply(net.init(jax.random.key(0), x), x).shape
      (2, 10)
    """

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

    The Linen twin of ``benchmarks/qat_lm.py``'s NNX model (same shapes and layout).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxquant.app.models import ByteLM
      >>> lm = ByteLM(seq=16, d=32, layers=1, heads=2, hidden=64)
      >>> tokens = jnp.zeros((2, 16), jnp.int32)
      >>> lm.apply(lm.init(jax.random.key(0), tokens), tokens).shape
      (2, 16, 256)
    """

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
