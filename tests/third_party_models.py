"""Published Flax models at a tiny size, and a jaxpr count of their quantized contractions.

The test bed of issue 12 item 9 (helpers, not collected as tests: the name does not start
with ``test_``). Four models written elsewhere, built from small configs with random
weights (nothing is downloaded):

* Hugging Face transformers' Flax GPT-2 (``FlaxGPT2LMHeadModule``: ``FlaxConv1D``
  projections that call ``lax.dot_general`` themselves, an ``nn.Dense`` head applied with
  the transposed token embedding as its kernel, attention einsums);
* transformers' Flax BERT (``FlaxBertModule``: ``nn.Dense`` everywhere, a pooler);
* the ResNet of flax's ImageNet example (examples/imagenet/models.py: ``nn.Conv`` +
  ``nn.BatchNorm`` with ``axis_name="batch"``, an ``nn.Dense`` head);
* the NNX decoder of flax's lm1b_nnx example (examples/lm1b_nnx/models.py, last published
  at flax commit 881b8ed4^: ``nnx.Linear`` MLPs, ``nnx.MultiHeadAttention``'s
  ``nnx.LinearGeneral`` projections, logits through ``nnx.Embed.attend``).

Each builder returns a :class:`ThirdPartyModel`: the float model, its variables, a batch
and the call arguments of inference (``train=False`` / ``deterministic=True``).

:func:`count_contractions` traces a call with :func:`jax.make_jaxpr` and classifies every
``dot_general`` / ``conv_general_dilated`` (see its docstring for the criteria).

Third-party code is not clean under the suite's strict promotion (HF adds a ``(192,)``
bias to a ``(1, 1, 192)`` product): :func:`lenient` restores JAX's defaults around it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.extend import core as jcore

# --------------------------------------------------------------------------- the models


class ThirdPartyModel(NamedTuple):
    """One published model at a tiny size.

    ``model``: a ``flax.linen.Module`` (call it as ``model.apply(variables, *args,
    **kwargs)``) or an ``nnx.Module`` (``model(*args, **kwargs)``, ``variables`` None).
    ``output`` picks the main array (logits, hidden states) out of what the model returns;
    ``loss`` maps that array to a scalar training loss (labels of the batch included).
    Training calls take ``train_kwargs``, update the ``mutable`` collections and, where
    the model reduces over a named axis (BatchNorm's ``axis_name``), run under
    ``jax.vmap`` with that ``axis_name`` (:func:`train_step`).
    ``weight_contractions``: the products of an activation with a weight that the
    published architecture has at this size (the count a fully quantized model shows).
    """

    name: str
    model: Any
    variables: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Callable[[Any], jax.Array]
    loss: Callable[[jax.Array], jax.Array]
    weight_contractions: int
    train_kwargs: dict[str, Any] = {}  # noqa: RUF012 (a NamedTuple default, never mutated)
    mutable: tuple[str, ...] = ()
    axis_name: str | None = None


@contextlib.contextmanager
def lenient() -> Iterator[None]:
    """JAX's default promotion rules (the suite's conftest makes them strict)."""
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        yield


def is_nnx(model: Any) -> bool:
    return isinstance(model, nnx.Module)


def call(m: ThirdPartyModel, model: Any = None, variables: Any = None) -> Any:
    """``m``'s call on its own batch, or ``model`` / ``variables`` in place of its own
    (a quantized copy, converted variables); the main array of the output. Jitted: an
    eager call of these models dispatches (and compiles) op by op, ~10x slower."""
    model = m.model if model is None else model
    variables = m.variables if variables is None else variables
    with lenient():
        if is_nnx(model):
            graphdef, state = nnx.split(model)
            run = jax.jit(lambda s, *a: m.output(nnx.merge(graphdef, s)(*a, **m.kwargs)))
            return run(state, *m.args)
        run = jax.jit(lambda v, *a: m.output(model.apply(v, *a, **m.kwargs)))
        return run(variables, *m.args)


def _init_key(seed: int) -> jax.Array:
    """A key for the weights' initialisers. ``rbg`` (XLA's RngBitGenerator): the jitted
    init of these models compiles in ~2 s on CPU against ~11 s with threefry."""
    return jax.random.key(seed, impl="rbg")


def _init(model: nn.Module, seed: int, *args: Any, **kwargs: Any) -> Any:
    """A Linen model's variables, initialised in one compiled call (eagerly, every
    parameter's initialiser would compile on its own)."""
    with lenient():
        return jax.jit(lambda key, *a: model.init(key, *a, **kwargs))(_init_key(seed), *args)


def _tokens(key: jax.Array, batch: int, length: int, vocab: int) -> jax.Array:
    # Tokens from 1: lm1b_nnx treats 0 as padding (masked out of attention).
    return jax.random.randint(key, (batch, length), 1, vocab, dtype=jnp.int32)


def _next_token_loss(ids: jax.Array) -> Callable[[jax.Array], jax.Array]:
    """Cross-entropy of each position's logits against the next token."""

    def loss(logits: jax.Array) -> jax.Array:
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()

    return loss


def _class_loss(labels: jax.Array) -> Callable[[jax.Array], jax.Array]:
    def loss(logits: jax.Array) -> jax.Array:
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(logp, labels[:, None], axis=-1).mean()

    return loss


def _regression_loss(target: jax.Array) -> Callable[[jax.Array], jax.Array]:
    return lambda y: jnp.mean(jnp.square(y.astype(jnp.float32) - target))


# Sizes: two layers, width 64, four heads, vocabulary 256, sequences of 16.
VOCAB, WIDTH, HEADS, LAYERS, LENGTH, BATCH = 256, 64, 4, 2, 16, 2


def _transformers() -> Any:
    # transformers 4.x logs (not warns) that its Flax classes go away in v5; quiet it.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    return transformers


def hf_gpt2(seed: int = 0) -> ThirdPartyModel:
    """transformers' ``FlaxGPT2LMHeadModule`` (tied head), 2 layers of width 64.

    Weight products per layer: ``c_attn`` and ``c_proj`` of attention, ``c_fc`` and
    ``c_proj`` of the MLP (all ``FlaxConv1D``); plus the head: 2 * 4 + 1 = 9. Each layer
    also has two attention einsums (q.k, p.v) of activations only.
    """
    tf = _transformers()
    config = tf.GPT2Config(
        n_layer=LAYERS, n_embd=WIDTH, n_head=HEADS, vocab_size=VOCAB, n_positions=64
    )
    with lenient():  # _do_init=False: the module only; its params come from _init
        module = tf.FlaxGPT2LMHeadModel(config, _do_init=False).module
    ids = _tokens(jax.random.key(seed + 1), BATCH, LENGTH, VOCAB)
    mask = jnp.ones_like(ids)
    positions = jnp.broadcast_to(jnp.arange(LENGTH, dtype=jnp.int32), ids.shape)
    return ThirdPartyModel(
        name="hf_gpt2",
        model=module,
        variables=_init(module, seed, ids, mask, positions),
        args=(ids, mask, positions),
        kwargs={"deterministic": True},
        output=lambda out: out.logits,
        loss=_next_token_loss(ids),
        weight_contractions=4 * LAYERS + 1,
    )


def hf_bert(seed: int = 0) -> ThirdPartyModel:
    """transformers' ``FlaxBertModule`` (with its pooler), 2 layers of width 64.

    Weight products per layer: query, key, value, attention output, intermediate,
    output (all ``nn.Dense``); plus the pooler: 2 * 6 + 1 = 13. Two attention einsums
    per layer.
    """
    tf = _transformers()
    config = tf.BertConfig(
        num_hidden_layers=LAYERS,
        hidden_size=WIDTH,
        num_attention_heads=HEADS,
        intermediate_size=2 * WIDTH,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    with lenient():
        module = tf.FlaxBertModel(config, _do_init=False).module
    ids = _tokens(jax.random.key(seed + 1), BATCH, LENGTH, VOCAB)
    mask = jnp.ones_like(ids)
    token_types = jnp.zeros_like(ids)
    positions = jnp.broadcast_to(jnp.arange(LENGTH, dtype=jnp.int32), ids.shape)
    return ThirdPartyModel(
        name="hf_bert",
        model=module,
        variables=_init(module, seed, ids, mask, token_types, positions),
        args=(ids, mask, token_types, positions),
        kwargs={"deterministic": True},
        output=lambda out: out.last_hidden_state,
        loss=_regression_loss(
            jax.random.normal(jax.random.key(seed + 2), (BATCH, LENGTH, WIDTH), jnp.float32)
        ),
        weight_contractions=6 * LAYERS + 1,
    )


# ----------------------------------------------- flax examples/imagenet/models.py (ResNet)
# Written from the published code (flax, examples/imagenet/models.py, "Flax implementation
# of ResNet V1.5"); unchanged but for the house formatting, the tiny stage sizes below and
# one attribute: ``axis_name`` (the published code hard-codes BatchNorm's "batch", right
# for its pmap training step; None lets a single-device call run in training mode).


class ResNetBlock(nn.Module):
    """ResNet block."""

    filters: int
    conv: Any
    norm: Any
    act: Callable
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides)(x)
        y = self.norm()(y)
        y = self.act(y)
        y = self.conv(self.filters, (3, 3))(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)

        if residual.shape != y.shape:
            residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)

        return self.act(residual + y)


class BottleneckResNetBlock(nn.Module):
    """Bottleneck ResNet block."""

    filters: int
    conv: Any
    norm: Any
    act: Callable
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (1, 1))(x)
        y = self.norm()(y)
        y = self.act(y)
        y = self.conv(self.filters, (3, 3), self.strides)(y)
        y = self.norm()(y)
        y = self.act(y)
        y = self.conv(self.filters * 4, (1, 1))(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)

        if residual.shape != y.shape:
            residual = self.conv(self.filters * 4, (1, 1), self.strides, name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)

        return self.act(residual + y)


class ResNet(nn.Module):
    """ResNetV1.5."""

    stage_sizes: Sequence[int]
    block_cls: Any
    num_classes: int
    num_filters: int = 64
    dtype: Any = jnp.float32
    act: Callable = nn.relu
    conv: Any = nn.Conv
    axis_name: str | None = "batch"  # not in the published code (see above)

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype)
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
            axis_name=self.axis_name,
        )

        x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
        x = norm(name="bn_init")(x)
        x = nn.relu(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = self.block_cls(
                    self.num_filters * 2**i,
                    strides=strides,
                    conv=conv,
                    norm=norm,
                    act=self.act,
                )(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
        x = jnp.asarray(x, self.dtype)
        return x


def flax_resnet(seed: int = 0) -> ThirdPartyModel:
    """flax's ImageNet ResNet (V1.5, basic blocks) with stages (1, 1), 8 filters, 10 classes.

    Weight products: ``conv_init``; two 3x3 convs per block, plus ``conv_proj`` where the
    second stage halves the resolution; the Dense head: 1 + 2 + 3 + 1 = 7 (6 convs).
    ``stage_sizes`` is a tuple (the published ``ResNet18`` passes a list, which a Linen
    module's attribute hash does not accept in every flax entry point).
    """
    model = ResNet(stage_sizes=(1, 1), block_cls=ResNetBlock, num_classes=10, num_filters=8)
    x = jax.random.normal(jax.random.key(seed + 1), (BATCH, 32, 32, 3), jnp.float32)
    variables = _init(model, seed, x, train=False)
    return ThirdPartyModel(
        name="flax_resnet",
        model=model,
        variables=variables,
        args=(x,),
        kwargs={"train": False},
        output=lambda out: out,
        loss=_class_loss(jax.random.randint(jax.random.key(seed + 2), (BATCH,), 0, 10)),
        weight_contractions=7,
        train_kwargs={"train": True},
        mutable=("batch_stats",),
        axis_name="batch",  # the example trains under pmap(axis_name="batch")
    )


# ------------------------------------- flax examples/lm1b_nnx/models.py (NNX TransformerLM)
# Written from the published code (flax, examples/lm1b_nnx/models.py at 881b8ed4^, which
# reused the decoder of examples/wmt). Left out: the decode cache (autoregressive
# sampling) and the sharding annotations (``nnx.with_partitioning`` over the example's
# mesh rules, metadata only without a mesh); the layers, their order and the math are the
# published ones.


_XAVIER = nnx.initializers.xavier_uniform()
_TINY_NORMAL = nnx.initializers.normal(stddev=1e-6)


@dataclasses.dataclass(unsafe_hash=True)
class TransformerConfig:
    """Global hyperparameters used to minimize obnoxious kwarg plumbing."""

    vocab_size: int
    output_vocab_size: int
    logits_via_embedding: bool = False
    dtype: Any = jnp.float32
    emb_dim: int = 512
    num_heads: int = 8
    num_layers: int = 6
    qkv_dim: int = 512
    mlp_dim: int = 2048
    max_len: int = 2048
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    kernel_init: Any = _XAVIER
    bias_init: Any = _TINY_NORMAL
    posemb_init: Any = None


def shift_right(x: jax.Array, axis: int = 1) -> jax.Array:
    """Shift the input to the right by padding and slicing on axis."""
    pad_widths: list[tuple[int, int]] = [(0, 0)] * len(x.shape)
    pad_widths[axis] = (1, 0)
    padded = jnp.pad(x, pad_widths, mode="constant", constant_values=x.dtype.type(0))
    return lax.dynamic_slice_in_dim(padded, 0, padded.shape[axis] - 1, axis)


def shift_inputs(x: jax.Array, segment_ids: Any = None, axis: int = 1) -> jax.Array:
    """Shift inputs and replace EOS by 0 for packed inputs."""
    shifted = shift_right(x, axis=axis)
    if segment_ids is not None:
        shifted *= segment_ids == shift_right(segment_ids, axis=axis)
    return shifted


def sinusoidal_init(max_len: int = 2048, min_scale: float = 1.0, max_scale: float = 10000.0):
    """1D Sinusoidal Position Embedding Initializer."""

    def init(key, shape, dtype=np.float32):
        del key, dtype
        d_feature = shape[-1]
        pe = np.zeros((max_len, d_feature), dtype=np.float32)
        position = np.arange(0, max_len)[:, np.newaxis]
        scale_factor = -np.log(max_scale / min_scale) / (d_feature // 2 - 1)
        div_term = min_scale * np.exp(np.arange(0, d_feature // 2) * scale_factor)
        pe[:, : d_feature // 2] = np.sin(position * div_term)
        pe[:, d_feature // 2 : 2 * (d_feature // 2)] = np.cos(position * div_term)
        pe = pe[np.newaxis, :, :]  # [1, max_len, d_feature]
        return jnp.array(pe)

    return init


class AddPositionEmbs(nnx.Module):
    """Adds (optionally learned) positional embeddings to the inputs."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.pos_emb_shape = (1, config.max_len, config.emb_dim)
        if config.posemb_init is not None:
            self.pos_embedding = nnx.Param(config.posemb_init(rngs(), self.pos_emb_shape))
        else:
            self.pos_embedding = None

    def __call__(self, inputs: jax.Array, inputs_positions: Any = None) -> jax.Array:
        config = self.config
        length = inputs.shape[1]
        if self.pos_embedding is None:
            pos_embedding = sinusoidal_init(max_len=config.max_len)(None, self.pos_emb_shape)
        else:
            pos_embedding = self.pos_embedding[...]
        pos_embedding = pos_embedding[:, :length, :]
        if inputs_positions is None:
            return inputs + pos_embedding
        return inputs + jnp.take(pos_embedding[0], inputs_positions, axis=0)


class MlpBlock(nnx.Module):
    """Transformer MLP / feed-forward block."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.linear1 = nnx.Linear(
            config.emb_dim,
            config.mlp_dim,
            dtype=config.dtype,
            kernel_init=config.kernel_init,
            bias_init=config.bias_init,
            rngs=rngs,
        )
        self.linear2 = nnx.Linear(
            config.mlp_dim,
            config.emb_dim,
            dtype=config.dtype,
            kernel_init=config.kernel_init,
            bias_init=config.bias_init,
            rngs=rngs,
        )
        self.dropout = nnx.Dropout(rate=config.dropout_rate)

    def __call__(self, inputs: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        x = self.linear1(inputs)
        x = nnx.relu(x)
        x = self.dropout(x, rngs=rngs)
        output = self.linear2(x)
        output = self.dropout(output, rngs=rngs)
        return output


class EncoderDecoder1DBlock(nnx.Module):
    """Transformer encoder-decoder layer."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.ln1 = nnx.LayerNorm(num_features=config.emb_dim, dtype=config.dtype, rngs=rngs)
        self.ln2 = nnx.LayerNorm(num_features=config.emb_dim, dtype=config.dtype, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            num_heads=config.num_heads,
            in_features=config.emb_dim,
            qkv_features=config.qkv_dim,
            dtype=config.dtype,
            kernel_init=config.kernel_init,
            bias_init=config.bias_init,
            use_bias=False,
            broadcast_dropout=False,
            decode=False,  # the example's training / eval path (no autoregressive cache)
            dropout_rate=config.attention_dropout_rate,
            rngs=rngs,
            keep_rngs=False,
        )
        self.mlp = MlpBlock(config=config, rngs=rngs)
        self.dropout = nnx.Dropout(rate=config.dropout_rate)

    def __call__(
        self,
        inputs: jax.Array,
        *,
        decoder_mask: jax.Array | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        x = self.ln1(inputs)
        x = self.attention(x, mask=decoder_mask, rngs=rngs)
        x = self.dropout(x, rngs=rngs)
        x = x + inputs
        z = self.ln2(x)
        z = self.mlp(z, rngs=rngs)
        return x + z


class Decoder(nnx.Module):
    """Transformer Model Decoder for sequence to sequence translation."""

    def __init__(
        self,
        config: TransformerConfig,
        shared_embedding: nnx.Embed | None = None,
        *,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.shared_embedding = shared_embedding
        if self.shared_embedding is None:
            self.output_embed = nnx.Embed(
                num_embeddings=config.output_vocab_size,
                features=config.emb_dim,
                embedding_init=nnx.initializers.normal(stddev=1.0),
                rngs=rngs,
            )
        else:
            self.output_embed = self.shared_embedding
        self.posembed_output = AddPositionEmbs(config=config, rngs=rngs)
        self.dropout = nnx.Dropout(rate=config.dropout_rate)
        for idx in range(config.num_layers):
            layer = EncoderDecoder1DBlock(config=config, rngs=rngs)
            setattr(self, f"encoderdecoderblock_{idx}", layer)
        self.encoderdecoder_norm = nnx.LayerNorm(
            num_features=config.emb_dim, dtype=config.dtype, rngs=rngs
        )
        if not config.logits_via_embedding:
            self.logitdense = nnx.Linear(
                in_features=config.emb_dim,
                out_features=config.output_vocab_size,
                dtype=config.dtype,
                kernel_init=config.kernel_init,
                bias_init=config.bias_init,
                rngs=rngs,
            )
        else:
            self.logitdense = None

    def __call__(
        self,
        inputs: jax.Array,
        *,
        inputs_positions: Any = None,
        inputs_segmentation: Any = None,
        decoder_mask: Any = None,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        config = self.config
        y = inputs.astype("int32")
        y = shift_inputs(y, segment_ids=inputs_segmentation)
        y = self.output_embed(y)
        y = self.posembed_output(y, inputs_positions=inputs_positions)
        y = self.dropout(y, rngs=rngs)
        y = y.astype(config.dtype)
        for idx in range(config.num_layers):
            layer: EncoderDecoder1DBlock = getattr(self, f"encoderdecoderblock_{idx}")
            y = layer(y, decoder_mask=decoder_mask, rngs=rngs)
        y = self.encoderdecoder_norm(y)
        if self.logitdense:
            logits = self.logitdense(y)
        else:
            # Use the transpose of embedding matrix for logit transform.
            logits = self.output_embed.attend(y.astype(jnp.float32))
            # Correctly normalize pre-softmax logits for this shared case.
            logits = logits / jnp.sqrt(y.shape[-1])
        return logits


class TransformerLM(nnx.Module):
    """Transformer pure decoder stack for language modelling."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.decoder = Decoder(config=config, shared_embedding=None, rngs=rngs)

    def __call__(
        self,
        inputs: jax.Array,
        *,
        inputs_positions: Any = None,
        inputs_segmentation: Any = None,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        config = self.config
        decoder_mask = nnx.combine_masks(
            nnx.make_attention_mask(inputs > 0, inputs > 0, dtype=config.dtype),
            nnx.make_causal_mask(inputs, dtype=config.dtype),
        )
        if inputs_segmentation is not None:
            decoder_mask = nnx.combine_masks(
                decoder_mask,
                nnx.make_attention_mask(
                    inputs_segmentation, inputs_segmentation, jnp.equal, dtype=config.dtype
                ),
            )
        logits = self.decoder(
            inputs,
            inputs_positions=inputs_positions,
            inputs_segmentation=inputs_segmentation,
            decoder_mask=decoder_mask,
            rngs=rngs,
        )
        return logits.astype(self.config.dtype)


def nnx_lm1b(seed: int = 0, *, logits_via_embedding: bool = True) -> ThirdPartyModel:
    """flax's lm1b_nnx ``TransformerLM``, 2 layers of width 64, logits through
    ``Embed.attend`` (the example's ``logits_via_embedding``), in ``eval()`` mode.

    Weight products per layer: query, key, value, out (``nnx.LinearGeneral``), linear1,
    linear2 (``nnx.Linear``); plus the head (``attend`` or ``logitdense``): 2 * 6 + 1 =
    13. Two attention einsums per layer.
    """
    config = TransformerConfig(
        vocab_size=VOCAB,
        output_vocab_size=VOCAB,
        logits_via_embedding=logits_via_embedding,
        emb_dim=WIDTH,
        num_heads=HEADS,
        num_layers=LAYERS,
        qkv_dim=WIDTH,
        mlp_dim=2 * WIDTH,
        max_len=64,
    )
    # Built in one compiled call (see _init).
    model = nnx.jit(lambda: TransformerLM(config, rngs=nnx.Rngs(params=_init_key(seed))))()
    model.eval()  # dropout off: the example's deterministic eval step
    ids = _tokens(jax.random.key(seed + 1), BATCH, LENGTH, VOCAB)
    return ThirdPartyModel(
        name="nnx_lm1b",
        model=model,
        variables=None,
        args=(ids,),
        kwargs={},
        output=lambda out: out,
        loss=_next_token_loss(ids),
        weight_contractions=6 * LAYERS + 1,
    )


def train_step(m: ThirdPartyModel, model: Any = None, *, lr: float = 0.1) -> Callable:
    """A jitted SGD step of ``model`` (default ``m.model``) on ``m``'s batch and loss.

    Linen: ``step(variables) -> (variables, loss, grads)`` (the ``mutable`` collections
    updated); NNX: ``step(params, rest) -> (params, loss, grads)`` over ``nnx.split(model,
    nnx.Param, ...)``.
    """
    model = m.model if model is None else model
    kwargs = {**m.kwargs, **m.train_kwargs}

    if is_nnx(model):
        graphdef, _, _ = nnx.split(model, nnx.Param, ...)

        @jax.jit
        def nnx_step(params, rest):
            def loss(p):
                with lenient():
                    return m.loss(m.output(nnx.merge(graphdef, p, rest)(*m.args, **kwargs)))

            value, grads = jax.value_and_grad(loss)(params)
            return jax.tree.map(lambda p, g: p - lr * g, params, grads), value, grads

        return nnx_step

    def forward(params, state, args):
        with lenient():
            if m.mutable:
                out, new = model.apply(
                    {"params": params, **state}, *args, mutable=list(m.mutable), **kwargs
                )
                return m.output(out), new
            return m.output(model.apply({"params": params, **state}, *args, **kwargs)), state

    @jax.jit
    def linen_step(variables):
        params = variables["params"]
        state = {k: v for k, v in variables.items() if k != "params"}

        def loss(p):
            if m.axis_name is None:
                y, new = forward(p, state, m.args)
            else:  # one replica of the example's data-parallel step
                batched = jax.tree.map(lambda a: a[None], m.args)
                y, new = jax.vmap(lambda a: forward(p, state, a), axis_name=m.axis_name)(batched)
                y, new = y[0], jax.tree.map(lambda a: a[0], new)
            with lenient():
                return m.loss(y), new

        (value, new), grads = jax.value_and_grad(loss, has_aux=True)(params)
        params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
        return {**variables, **new, "params": params}, value, grads

    return linen_step


BUILDERS: dict[str, Callable[[], ThirdPartyModel]] = {
    "hf_gpt2": hf_gpt2,
    "hf_bert": hf_bert,
    "flax_resnet": flax_resnet,
    "nnx_lm1b": nnx_lm1b,
}


@functools.cache
def get(name: str) -> ThirdPartyModel:
    """``BUILDERS[name]()``, built once per test session (each build compiles an init:
    1-3 s). NNX models are mutable: quantize or convert an ``nnx.clone`` of them."""
    return BUILDERS[name]()


def keyword_args(m: ThirdPartyModel) -> tuple[Any, dict[str, Any]]:
    """``(x, kwargs)``: ``m``'s positional arguments as the first one and keywords by the
    names of its ``__call__`` (for callers that pass one ``x``, as ``sensitivity``)."""
    names = list(inspect.signature(type(m.model).__call__).parameters)[1:]  # no self
    return m.args[0], dict(zip(names[1:], m.args[1:], strict=False))


def trained_like(tree: Any, seed: int) -> Any:
    """Random values of ``tree``'s shapes, as after training: kernels with variance
    1 / fan-in, norm scales and running variances in [0.5, 1.5], biases and running means
    N(0, 0.2^2). The published inits zero each ResNet block's last norm scale (so a fresh
    block's convolutions do not reach the output) and set running statistics to 0 / 1:
    with these values every layer matters. Drawn with numpy (initializing under JAX
    compiles for seconds on a CPU). Leaves other than those raise (say what they are)."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    out = []
    for path, leaf in leaves:
        name = str(getattr(path[-1], "key", getattr(path[-1], "name", "")))
        if name == "value":  # an nnx.State leaf: the variable's name is one level up
            name = str(path[-2].key)
        shape = tuple(leaf.shape)
        if name == "kernel":
            value = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, size=shape)
        elif name in ("bias", "mean"):
            value = 0.2 * rng.normal(size=shape)
        else:
            raise AssertionError(f"unexpected leaf {jax.tree_util.keystr(path)}")
        out.append(jnp.asarray(value, leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


# ------------------------------------------------------------------ counting contractions

CONTRACTIONS = ("dot_general", "conv_general_dilated")

# Primitives through which "this value went through a quantizer" carries on: layout
# changes, casts, the scale arithmetic of (de)quantization, clipping and selects. Any
# other primitive (exp, tanh, rsqrt, reductions, comparisons, gathers, contractions
# themselves) makes a new value that is no longer on a quantization grid.
_TRANSPARENT = frozenset(
    {
        "convert_element_type",
        "reshape",
        "transpose",
        "broadcast_in_dim",
        "squeeze",
        "expand_dims",
        "mul",
        "div",
        "add",
        "sub",
        "neg",
        "max",
        "min",
        "clamp",
        "select_n",
        "copy",
        "copy_p",
        "reduce_precision",
        "slice",
        "dynamic_slice",
        "concatenate",
        "pad",
        "rev",
        "stop_gradient",
        "optimization_barrier",
        "sharding_constraint",
        "bitcast_convert_type",
    }
)


class _Fact(NamedTuple):
    dep: bool  # depends on the call's batch arguments (False: weights, constants)
    quant: bool  # went through a quantizer's rounding, through transparent ops only


_NONE = _Fact(False, False)


def _narrow(dtype: Any) -> bool:
    """int8 / uint8 / int4 / fp8 / fp4 ...: the storage dtypes of quantized codes."""
    d = np.dtype(dtype)
    return d != np.dtype(bool) and d.itemsize <= 1


class Contraction(NamedTuple):
    """One ``dot_general`` / ``conv_general_dilated`` of a traced call.

    ``weight``: an operand does not depend on the batch (a parameter, maybe transposed,
    cast or quantized); ``quantized``: per operand (lhs, rhs), whether it went through a
    quantizer; ``where``: the name stack and the first source line outside jax / flax /
    jaxquant that made it.
    """

    primitive: str
    shapes: tuple[tuple[int, ...], tuple[int, ...]]
    dtypes: tuple[str, str]
    weight: tuple[bool, bool]
    quantized: tuple[bool, bool]
    where: str

    @property
    def is_weight(self) -> bool:
        return any(self.weight)

    @property
    def weight_quantized(self) -> bool:
        """Every weight operand quantized (False for products of activations only)."""
        return self.is_weight and all(
            q for w, q in zip(self.weight, self.quantized, strict=True) if w
        )


class Count(NamedTuple):
    """Totals over the contractions of a call; ``missed``: where the weight products left
    in float were made."""

    contractions: int
    quantized: int  # any operand quantized
    weight: int  # products of an activation with a weight
    weight_quantized: int  # ... whose weight operand is quantized
    missed: tuple[str, ...]

    @classmethod
    def of(cls, found: Sequence[Contraction]) -> Count:
        return cls(
            contractions=len(found),
            quantized=sum(any(c.quantized) for c in found),
            weight=sum(c.is_weight for c in found),
            weight_quantized=sum(c.weight_quantized for c in found),
            missed=tuple(c.where for c in found if c.is_weight and not c.weight_quantized),
        )


_SKIP_FILES = (f"{os.sep}jax{os.sep}", f"{os.sep}jaxlib{os.sep}", f"{os.sep}flax{os.sep}")


def _where(eqn: Any, outer: tuple[str, str]) -> tuple[str, str]:
    """(name stack, first source line outside jax / flax / jaxquant) of ``eqn``, below
    the ``outer`` ones of the call whose sub-jaxpr holds it."""
    stack = str(getattr(eqn.source_info, "name_stack", ""))
    stack = "/".join(s for s in (outer[0], stack) if s)
    line = ""
    tb = getattr(eqn.source_info, "traceback", None)
    for frame in getattr(tb, "frames", ()) or ():
        name = frame.file_name
        if any(s in name for s in _SKIP_FILES) or f"{os.sep}jaxquant{os.sep}" in name:
            continue
        line = f"{os.path.basename(name)}:{frame.line_num} {frame.function_name}"
        break
    return stack, line or outer[1]


def _platform_branch(params: dict[str, Any]) -> int | None:
    """The branch a ``platform_dependent`` cond takes on this backend (None: data cond)."""
    platforms = params.get("branches_platforms")
    if platforms is None:
        return None
    here = jax.default_backend()
    default = None
    for i, names in enumerate(platforms):
        if names is None:
            default = i
        elif here in names:
            return i
    return default


def _sub(j: Any) -> tuple[Any, Sequence[Any]]:
    """(Jaxpr, consts) of a Jaxpr or ClosedJaxpr."""
    if isinstance(j, jcore.ClosedJaxpr):
        return j.jaxpr, j.consts
    return j, ()


def _analyze(
    jaxpr: Any,
    facts: Sequence[_Fact],
    out: list[Contraction] | None,
    outer: tuple[str, str] = ("", ""),
) -> list[_Fact]:
    """Propagate facts through ``jaxpr``; append its contractions to ``out`` (if given)."""
    env: dict[Any, _Fact] = {}

    def read(v: Any) -> _Fact:
        return _NONE if isinstance(v, jcore.Literal) else env.get(v, _NONE)

    for v in jaxpr.constvars:
        env[v] = _NONE
    for v, f in zip(jaxpr.invars, facts, strict=True):
        env[v] = f
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        dep = any(f.dep for f in ins)
        name = eqn.primitive.name
        here = _where(eqn, outer)
        outs: list[_Fact] | None = None
        if name in CONTRACTIONS:
            if out is not None:
                lhs, rhs = eqn.invars[:2]
                q = tuple(ins[i].quant or _narrow(v.aval.dtype) for i, v in enumerate((lhs, rhs)))
                out.append(
                    Contraction(
                        primitive=name,
                        shapes=(tuple(lhs.aval.shape), tuple(rhs.aval.shape)),
                        dtypes=(str(lhs.aval.dtype), str(rhs.aval.dtype)),
                        weight=(not ins[0].dep, not ins[1].dep),
                        quantized=(bool(q[0]), bool(q[1])),
                        where=" @ ".join(w for w in here if w),
                    )
                )
            outs = [_Fact(dep, False)] * len(eqn.outvars)
        elif name == "cond":
            outs = _cond(eqn, ins, out, here)
        elif name == "scan":
            outs = _loop(eqn, ins, out, here)
        elif name == "while":
            outs = _while(eqn, ins, out, here)
        else:
            subs = [
                p for p in eqn.params.values() if isinstance(p, jcore.Jaxpr | jcore.ClosedJaxpr)
            ]
            if len(subs) == 1 and len(_sub(subs[0])[0].invars) == len(ins):
                # jit / pjit, remat, custom_jvp_call, custom_vjp_call, closed_call, shard_map
                outs = _analyze(_sub(subs[0])[0], ins, out, here)
            elif subs:  # unknown structure: every output may depend on every input
                for s in subs:
                    inner = _sub(s)[0]
                    _analyze(inner, [_Fact(dep, False)] * len(inner.invars), out, here)
        if outs is None:
            if name == "round" or (
                name == "convert_element_type"
                and _narrow(eqn.params["new_dtype"])
                and not _narrow(eqn.invars[0].aval.dtype)
                and jnp.issubdtype(eqn.invars[0].aval.dtype, jnp.floating)
            ):
                quant = True
            elif name == "select_n":  # the predicate carries no value
                quant = any(f.quant for f in ins[1:])
            else:
                quant = name in _TRANSPARENT and any(f.quant for f in ins)
            outs = [_Fact(dep, quant)] * len(eqn.outvars)
        for v, f in zip(eqn.outvars, outs, strict=True):
            env[v] = f
    return [read(v) for v in jaxpr.outvars]


def _cond(
    eqn: Any, ins: list[_Fact], out: list[Contraction] | None, here: tuple[str, str]
) -> list[_Fact]:
    branches = eqn.params["branches"]
    operands = ins[1:]
    taken = _platform_branch(eqn.params)
    # A data-dependent cond: every branch is traced (and counted); a platform one: only
    # the branch this backend runs.
    chosen = range(len(branches)) if taken is None else (taken,)
    results = [_analyze(_sub(branches[i])[0], operands, out, here) for i in chosen]
    pred_dep = ins[0].dep
    return [
        _Fact(pred_dep or any(r[k].dep for r in results), any(r[k].quant for r in results))
        for k in range(len(eqn.outvars))
    ]


def _fixpoint(
    body: Any, consts: list[_Fact], carry: list[_Fact], rest: list[_Fact], n_out_carry: int
) -> tuple[list[_Fact], list[_Fact]]:
    for _ in range(len(carry) + 2):  # each pass can only turn facts on
        res = _analyze(body, [*consts, *carry, *rest], None)
        new = [
            _Fact(a.dep or b.dep, a.quant or b.quant)
            for a, b in zip(carry, res[:n_out_carry], strict=True)
        ]
        if new == carry:
            break
        carry = new
    return carry, res


def _loop(
    eqn: Any, ins: list[_Fact], out: list[Contraction] | None, here: tuple[str, str]
) -> list[_Fact]:
    body, nc = _sub(eqn.params["jaxpr"])[0], eqn.params["num_consts"]
    ncarry = eqn.params["num_carry"]
    consts, carry, xs = ins[:nc], ins[nc : nc + ncarry], ins[nc + ncarry :]
    carry, _ = _fixpoint(body, consts, carry, xs, ncarry)
    return _analyze(body, [*consts, *carry, *xs], out, here)  # counted once, not per step


def _while(
    eqn: Any, ins: list[_Fact], out: list[Contraction] | None, here: tuple[str, str]
) -> list[_Fact]:
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, carry = ins[:cn], ins[cn : cn + bn], ins[cn + bn :]
    body = _sub(p["body_jaxpr"])[0]
    carry, _ = _fixpoint(body, bconsts, carry, [], len(carry))
    _analyze(_sub(p["cond_jaxpr"])[0], [*cconsts, *carry], out, here)
    return _analyze(body, [*bconsts, *carry], out, here)


def contractions(fn: Callable[..., Any], weights: Any, *batch: Any) -> list[Contraction]:
    """Every contraction ``fn(weights, *batch)`` runs, in trace order.

    ``weights``: the pytree that does not depend on the data (params, batch statistics,
    an NNX model's state); ``batch``: the call's data arguments.

    Criteria, per operand of each ``dot_general`` / ``conv_general_dilated`` (in the
    call and in every sub-jaxpr: jit, custom_vjp / custom_jvp, remat, scan and while
    bodies counted once, the branch of a platform-dependent cond that this backend
    takes, every branch of a data-dependent cond):

    * **weight**: the operand does not depend on ``batch`` (data dependence followed
      through every primitive);
    * **quantized**: its dtype is a <= 8-bit storage type (int8 / fp8 codes: jaxquant's
      real GEMMs), or it was made from the output of a ``round`` (or of a float -> <= 8-bit
      cast), or from a <= 8-bit leaf of ``weights`` (a converted QArray's codes), through
      layout, cast, scale (mul/div/add/sub), clip and select primitives only
      (jaxquant's emulated path: dequantized grid values). Anything else in between --
      a nonlinearity, a reduction, another contraction -- makes a value that is not on a
      grid, so a float layer after a quantized one is not counted as quantized.

    What this does not see: a quantizer that rounds without ``round`` (bit tricks) to a
    format wider than 8 bits (bf16 / fp16 specs); jaxquant's int / fp8 specs all round or
    cast. Contractions in the backward pass are not traced (``fn`` is the forward call).
    """
    closed = jax.make_jaxpr(fn)(weights, *batch)
    n_w = len(jax.tree_util.tree_leaves(weights))
    # An argument already in a <= 8-bit dtype holds codes (a served QArray's values):
    # dequantizing it (convert, multiply by the scale) keeps it on its grid.
    facts = [
        _Fact(i >= n_w, i < n_w and _narrow(v.aval.dtype))
        for i, v in enumerate(closed.jaxpr.invars)
    ]
    found: list[Contraction] = []
    _analyze(closed.jaxpr, facts, found)
    return found


def model_contractions(
    m: ThirdPartyModel, model: Any = None, variables: Any = None
) -> list[Contraction]:
    """:func:`contractions` of ``m``'s inference call (``model``: a quantized version of
    ``m.model``, by default ``m.model`` itself; ``variables``: Linen variables in place of
    ``m.variables``, e.g. converted ones)."""
    model = m.model if model is None else model
    variables = m.variables if variables is None else variables
    with lenient():
        if is_nnx(model):
            graphdef, state = nnx.split(model)

            def fn(state, *args):
                return m.output(nnx.merge(graphdef, state)(*args, **m.kwargs))

            return contractions(fn, state, *m.args)

        def fn(variables, *args):
            return m.output(model.apply(variables, *args, **m.kwargs))

        return contractions(fn, variables, *m.args)


def count(m: ThirdPartyModel, model: Any = None, variables: Any = None) -> Count:
    return Count.of(model_contractions(m, model, variables))
