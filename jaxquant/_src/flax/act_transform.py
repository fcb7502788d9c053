"""Online activation transforms: what a post-training method leaves for a layer to do to its
input before the (quantized) contraction.

Methods that equalize or rotate a layer's input channels -- SmoothQuant's migration
(Xiao et al. 2022, https://arxiv.org/abs/2211.10438), AWQ's activation-aware scales (Lin et
al. 2023, https://arxiv.org/abs/2306.00978), QuaRot's online Hadamard rotation (Ashkboos et
al. 2024, https://arxiv.org/abs/2404.00456) -- change the weight offline and the activation
online, ``x @ W = (x T) (T^-1 W)``. Where the change cannot be folded into the layer that
produces ``x`` (a normalization's scale, the previous linear layer), the layer must apply
``T`` itself. The transform is stored with the model's variables, so it is traced, saved in
checkpoints and served like a parameter:

* Linen: the ``"ptq"`` collection, at the layer's own path: ``variables["ptq"][...layer...]
  = {"smooth": s, "hadamard": signs}``;
* NNX: attributes of the layer, ``layer.ptq_smooth = PTQVariable(s)``,
  ``layer.ptq_hadamard = PTQVariable(signs)``.

``smooth`` (shape ``(in,)``) multiplies the input channels; ``hadamard`` (shape ``(in,)``,
entries +-1) then applies the random Hadamard rotation ``x -> (x * signs) H / sqrt(in)``
along the contracted axis (:func:`jaxquant.rotations.walsh_hadamard`). Both act on the
activation's single contracted axis; the offline inverse on the weight is the method's
job. The interception applies them before quantizing (and before observing: statistics
for a method stacked after this one see the transformed input).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant._src.hadamard import walsh_hadamard

COLLECTION = "ptq"
NAMES = ("smooth", "hadamard")


class PTQVariable(nnx.Variable):
    """An NNX variable holding a layer's online activation transform (``ptq_smooth``,
    ``ptq_hadamard``): state of the model, not a trainable parameter."""


class ActTransform(NamedTuple):
    """A layer's online input transform (each part None when absent)."""

    smooth: jax.Array | None  # (in,) multiplier of the input channels
    hadamard: jax.Array | None  # (in,) signs of a random Hadamard rotation after it


def of_linen(variables: Any) -> ActTransform | None:
    """The transform in a Linen module's own variables (``module.variables``), or None."""
    got = variables.get(COLLECTION) if hasattr(variables, "get") else None
    if not got:
        return None
    smooth, signs = got.get("smooth"), got.get("hadamard")
    if smooth is None and signs is None:
        return None
    return ActTransform(smooth, signs)


def of_nnx(module: Any) -> ActTransform | None:
    """The transform of an NNX layer (its ``ptq_*`` attributes), or None."""
    smooth = getattr(module, "ptq_smooth", None)
    signs = getattr(module, "ptq_hadamard", None)
    if smooth is None and signs is None:
        return None
    return ActTransform(
        None if smooth is None else smooth[...], None if signs is None else signs[...]
    )


def apply(t: ActTransform, x: Any, axis: int, where: str) -> jax.Array:
    """``x`` transformed along its contracted ``axis`` (computed in float32 at least,
    returned in ``x``'s dtype)."""
    x = jnp.asarray(x)
    n = x.shape[axis]
    out = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    for name, v in (("smooth", t.smooth), ("hadamard", t.hadamard)):
        if v is not None and tuple(jnp.shape(v)) != (n,):
            raise ValueError(
                f"{where}: its ptq {name!r} has shape {tuple(jnp.shape(v))}, but the layer's "
                f"input has {n} channels on the contracted axis; the transform must have "
                f"shape ({n},) (was it made for another layer or model width?)."
            )
    shape = [1] * x.ndim
    shape[axis] = n
    if t.smooth is not None:
        out = out * jnp.reshape(t.smooth, shape).astype(out.dtype)
    if t.hadamard is not None:
        out = out * jnp.reshape(t.hadamard, shape).astype(out.dtype)
        out = walsh_hadamard(out, axis=axis)
    return out.astype(x.dtype)


# frame -> the transform of the module running there. Set by the interception
# (jaxquant._src.flax.intercept registers its front-end lookup when imported): the layer
# products Flax's own layers call (jaxquant._src.flax.rules.QuantDot) find their module's
# transform through it without importing the interception (which imports them).
_lookup: list[Callable[[Any], ActTransform | None]] = []


def register_lookup(fn: Callable[[Any], ActTransform | None]) -> None:
    """Install the function that finds the running module's transform (once)."""
    if not _lookup:
        _lookup.append(fn)


def current(frame: Any) -> ActTransform | None:
    """The online input transform of the module whose code runs at ``frame`` (None when
    no quantized model runs, or its module has none)."""
    return _lookup[0](frame) if _lookup else None


def apply_to_lhs(x: Any, contracting: Any, frame: Any, where: str) -> Any:
    """A layer product's activation ``x`` (the lhs, contracted over the axes
    ``contracting``), transformed when its module has a transform."""
    t = current(frame)
    if t is None:
        return x
    return apply_to_axes(t, x, contracting, where)


def apply_to_layer_input(t: ActTransform, module: Any, x: Any, where: str) -> Any:
    """A Flax layer's input transformed along the axes its kernel contracts (``Dense``: the
    last; ``DenseGeneral``: its ``axis``); other layers cannot take a transform."""
    axis = getattr(module, "axis", -1)
    if not isinstance(module, nn.Dense | nn.DenseGeneral):  # Conv, Einsum: refused
        raise ValueError(
            f"{where}: it has an online input transform, which a {type(module).__name__} "
            "cannot apply; remove the layer from the method."
        )
    return apply_to_axes(t, x, axis if isinstance(axis, tuple | list) else (axis,), where)


def apply_to_axes(t: ActTransform, x: Any, contracting: Any, where: str) -> Any:
    """``x`` transformed along its one contracted axis (an error for several)."""
    axes = tuple(contracting)
    if len(axes) != 1:
        raise ValueError(
            f"{where}: it has an online input transform (a PTQ method's smoothing or "
            f"rotation), which needs one contracted input axis; it contracts {len(axes)}. "
            "Remove the layer from the method."
        )
    return apply(t, x, axes[0] % jnp.ndim(x), where)
