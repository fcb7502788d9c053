"""The application layer's models: one digits MLP, one digits CNN and one byte-level
transformer LM, shared by the sweep's built-in tasks, the benchmarks, the papers'
reproductions, the notebooks and the end-to-end tests (plain Flax Linen; nothing here is
quantization-aware: quantize them with :func:`jaxquant.flax.quantize_model`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxquant as jq
import jaxquant.rotations as jqr
from jaxquant import QuantSpec
from jaxquant.app._checks import check_int

__all__ = ["CNN", "MLP", "ByteLM", "decode_logits", "inject_outliers"]


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
      >>> variables = jax.jit(net.init)(jax.random.key(0), x)
      >>> jax.jit(net.apply)(variables, x).shape
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
    decode: bool = False
    max_len: int = 0
    kv_spec: QuantSpec | None = None
    kv_rotate: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        h, dh = self.heads, d // self.heads
        q, k, v = (nn.Dense(d, name=n)(x).reshape(b, t, h, dh) for n in ("q", "k", "v"))
        if self.decode:
            y = self._cached(q, k, v)
        else:
            att = jnp.einsum("bthd,bshd->bhts", q, k) * (1.0 / math.sqrt(dh))
            causal = jnp.tril(jnp.ones((t, t), jnp.bool_))[None, None]
            att = jax.nn.softmax(jnp.where(causal, att, -1e30), axis=-1)
            y = jnp.einsum("bhts,bshd->bthd", att, v)
        return nn.Dense(d, name="o")(y.reshape(b, t, d))

    def _cached(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """Attention of ``t`` new positions over every cached one (keys and values kept in
        the ``"cache"`` collection, quantized with ``kv_spec`` when given)."""
        b, t, h, dh = q.shape
        shape = (b, self.max_len, h, dh)
        spec = self.kv_spec

        def empty() -> Any:
            if spec is None:
                return jnp.zeros(shape, k.dtype)
            return jq.kv_cache_init(shape, spec, k.dtype)

        initialized = self.has_variable("cache", "key")
        ck = self.variable("cache", "key", empty)
        cv = self.variable("cache", "value", empty)
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        if not initialized:  # init: shapes only
            return v
        i = index.value
        if self.kv_rotate:  # q.k is unchanged by an orthogonal H; v's is undone below
            q, k, v = (jqr.walsh_hadamard(a, axis=-1) for a in (q, k, v))
        if spec is None:
            ck.value = lax.dynamic_update_slice_in_dim(ck.value, k, i, 1)
            cv.value = lax.dynamic_update_slice_in_dim(cv.value, v, i, 1)
            keys, values = ck.value, cv.value
        else:
            ck.value = jq.kv_cache_update(ck.value, k, i)
            cv.value = jq.kv_cache_update(cv.value, v, i)
            keys, values = jq.dequantize(ck.value), jq.dequantize(cv.value)
        index.value = i + t
        att = jnp.einsum("bthd,bshd->bhts", q, keys) * (1.0 / math.sqrt(dh))
        seen = jnp.arange(self.max_len)[None, :] <= (i + jnp.arange(t))[:, None]
        att = jax.nn.softmax(jnp.where(seen[None, None], att, -1e30), axis=-1)
        y = jnp.einsum("bhts,bshd->bthd", att, values)
        return jqr.walsh_hadamard(y, axis=-1, transpose=True) if self.kv_rotate else y


class _Block(nn.Module):
    heads: int
    hidden: int
    decode: bool = False
    max_len: int = 0
    kv_spec: QuantSpec | None = None
    kv_rotate: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        attn = _Attention(
            self.heads, self.decode, self.max_len, self.kv_spec, self.kv_rotate, name="attn"
        )
        x = x + attn(nn.LayerNorm(name="ln1")(x))
        y = nn.LayerNorm(name="ln2")(x)
        y = nn.Dense(self.hidden, name="fc1")(y)
        return x + nn.Dense(x.shape[-1], name="fc2")(jax.nn.gelu(y))


class ByteLM(nn.Module):
    """Causal byte-level transformer (pre-LN): byte embedding + learned positions,
    ``layers`` blocks (attention ``block<i>/attn/{q,k,v,o}``, MLP ``block<i>/{fc1,fc2}``),
    a final LayerNorm and a Dense ``head`` to 256 logits per position.

    The LM of ``benchmarks/qat_lm.py``, the sweep's ``stdlib-lm`` task and the PTQ test bed.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxquant.app.models import ByteLM
      >>> lm = ByteLM(seq=16, d=32, layers=1, heads=2, hidden=64)
      >>> tokens = jnp.zeros((2, 16), jnp.int32)
      >>> variables = jax.jit(lm.init)(jax.random.key(0), tokens)
      >>> jax.jit(lm.apply)(variables, tokens).shape
      (2, 16, 256)
    """

    seq: int = 128
    d: int = 128
    layers: int = 2
    heads: int = 4
    hidden: int = 512
    # Autoregressive decoding: each call takes the next tokens and attends over a key / value
    # cache (the "cache" collection, mutable), stored with kv_spec (None: float) after an
    # orthogonal Hadamard rotation of the head dimension with kv_rotate (QuaRot's).
    decode: bool = False
    kv_spec: QuantSpec | None = None
    kv_rotate: bool = False

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        if self.d % self.heads:
            raise ValueError(f"ByteLM: d={self.d} is not a multiple of heads={self.heads}.")
        t = tokens.shape[1]
        if t > self.seq:
            raise ValueError(f"ByteLM: {t} tokens exceed seq={self.seq} positions.")
        pos = self.param("pos", nn.initializers.normal(0.02), (self.seq, self.d))
        if self.decode:
            initialized = self.has_variable("cache", "position")  # False inside init
            start = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
            at = lax.dynamic_slice_in_dim(pos, start.value, t, 0)
            if initialized:
                start.value = start.value + t
        else:
            at = pos[:t]
        x = nn.Embed(256, self.d, name="embed")(tokens) + at[None]
        for i in range(self.layers):
            block = _Block(
                self.heads,
                self.hidden,
                self.decode,
                self.seq,
                self.kv_spec,
                self.kv_rotate,
                name=f"block{i}",
            )
            x = block(x)
        return nn.Dense(256, name="head")(nn.LayerNorm(name="ln_f")(x))


def decode_logits(lm: ByteLM, params: Any, tokens: jax.Array) -> jax.Array:
    """Logits of ``tokens`` computed the autoregressive way: one token per step through
    ``lm``'s key / value cache (``lm.decode`` must be True), the whole loop one
    ``lax.scan``. With a float cache they equal ``lm.clone(decode=False).apply(...)`` on
    the whole sequence; with ``kv_spec`` they measure the quantized cache's effect.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, jaxquant as jq
      >>> from jaxquant.app.models import ByteLM, decode_logits
      >>> lm = ByteLM(seq=8, d=16, layers=1, heads=2, hidden=32)
      >>> tok = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
      >>> p = lm.init(jax.random.key(0), tok)["params"]
      >>> full = lm.apply({"params": p}, tok)
      >>> step = decode_logits(lm.clone(decode=True), p, tok)
      >>> bool(np.allclose(full, step, atol=1e-5))
      True
    """
    if not lm.decode:
        raise ValueError("decode_logits: the model must have decode=True (lm.clone(decode=True)).")
    cache = lm.init(jax.random.key(0), tokens[:, :1])["cache"]

    def step(cache: Any, tok: jax.Array) -> tuple[Any, jax.Array]:
        logits, new = lm.apply({"params": params, "cache": cache}, tok[:, None], mutable=["cache"])
        return new["cache"], logits[:, 0]

    cache, logits = lax.scan(step, cache, tokens.T)
    return jnp.swapaxes(logits, 0, 1)


Path = tuple[str, ...]  # keys from the params root to a module


# Each LayerNorm of ByteLM and the Dense layers that read its output.
def _norm_consumers(params: Mapping[str, Any]) -> list[tuple[Path, list[Path]]]:
    out: list[tuple[Path, list[Path]]] = []
    for name in sorted(params):
        if name.startswith("block"):
            out.append(((name, "ln1"), [(name, "attn", p) for p in ("q", "k", "v")]))
            out.append(((name, "ln2"), [(name, "fc1")]))
    out.append((("ln_f",), [("head",)]))
    return out


def inject_outliers(
    params: Mapping[str, Any], channels: Sequence[int], scales: Sequence[float]
) -> dict[str, Any]:
    """A :class:`ByteLM` whose quantized layers see outlier activation channels, computing
    the same function.

    Small models trained here do not grow the massive activations of large LMs (Sun et al.
    2024, https://arxiv.org/abs/2402.17762), whose few channels hundreds to thousands of
    times the median make per-tensor activation quantization fail and motivate SmoothQuant
    and rotations. This builds them in by a reparametrization: for every LayerNorm
    (``block<i>/ln1``, ``block<i>/ln2``, ``ln_f``) the scale and bias of channel ``c`` are
    multiplied by ``s_c`` and row ``c`` of every Dense kernel reading that LayerNorm
    (``attn/{q,k,v}``, ``fc1``, ``head``) is divided by ``s_c``. The float model's outputs
    are unchanged (to float32 rounding); the inputs of those Dense layers carry channel
    ``c`` ``s_c`` times larger -- the structure SmoothQuant's migration
    (https://arxiv.org/abs/2211.10438) exactly undoes, and that large LMs show (LayerNorm
    weights concentrated in a few channels; Dettmers et al. 2022,
    https://arxiv.org/abs/2208.07339).

    Args:
      params: a ByteLM's ``params`` collection (``variables["params"]``).
      channels: residual channels (indices ``< d``) to make outliers.
      scales: one factor per channel (e.g. ``100.0``); each > 0.

    Returns:
      New params (the input is not modified).

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from jaxquant.app.models import ByteLM, inject_outliers
      >>> lm = ByteLM(seq=8, d=16, layers=1, heads=2, hidden=32)
      >>> tok = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
      >>> p = jax.jit(lm.init)(jax.random.key(0), tok)["params"]
      >>> p2 = inject_outliers(p, channels=[3], scales=[300.0])
      >>> apply = jax.jit(lm.apply)
      >>> a, b = apply({"params": p}, tok), apply({"params": p2}, tok)
      >>> bool(np.allclose(a, b, rtol=1e-4, atol=1e-4))
      True
    """
    if not isinstance(params, Mapping) or "ln_f" not in params or "head" not in params:
        raise TypeError(
            "inject_outliers: params must be a ByteLM's params collection "
            "(variables['params'], with 'ln_f' and 'head'), got "
            f"{type(params).__name__}."
        )
    channels = [check_int(c, "inject_outliers: channels[i]", lo=0) for c in channels]
    scales = [float(s) for s in scales]
    d = int(np.shape(params["ln_f"]["scale"])[0])
    if len(channels) != len(scales):
        raise ValueError(
            f"inject_outliers: {len(channels)} channels but {len(scales)} scales; give one "
            "scale per channel."
        )
    if any(c >= d for c in channels) or len(set(channels)) != len(channels):
        raise ValueError(f"inject_outliers: channels must be distinct and < d={d}, got {channels}.")
    if not all(math.isfinite(s) and s > 0 for s in scales):
        raise ValueError(f"inject_outliers: scales must be finite and > 0, got {scales}.")
    gain = np.ones(d, np.float32)
    gain[channels] = scales
    out = jax.tree_util.tree_map(lambda a: a, dict(params))  # new containers, same leaves

    def get(tree: Any, path: tuple[str, ...]) -> Any:
        for k in path:
            tree = tree[k]
        return tree

    def put(tree: dict[str, Any], path: tuple[str, ...], name: str, value: Any) -> None:
        for k in path:
            tree[k] = dict(tree[k])
            tree = tree[k]
        tree[name] = value

    for norm, consumers in _norm_consumers(params):
        ln = get(params, norm)
        put(out, norm, "scale", ln["scale"] * gain.astype(ln["scale"].dtype))
        if "bias" in ln:
            put(out, norm, "bias", ln["bias"] * gain.astype(ln["bias"].dtype))
        for layer in consumers:
            k = get(params, layer)["kernel"]
            put(out, layer, "kernel", k / gain.astype(k.dtype)[:, None])
    return out
