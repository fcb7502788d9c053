"""Low-precision parameters updated with stochastic rounding.

Round-to-nearest ``bf16(p + u)`` returns ``p`` whenever ``|u|`` is below half an ulp of
``p``, so small steps are lost and training stalls. Stochastic rounding rounds ``p + u``
(computed in float32) up with probability equal to its distance from the lower neighbour,
so ``E[new] = p + u`` exactly and the parameters follow the float32 trajectory in
expectation.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxquant._src import formats
from jaxquant._src.checks import check_int
from jaxquant._src.quantize import fake_quant
from jaxquant._src.spec import QuantSpec


def _leaf_spec(dtype: jnp.dtype, spec: QuantSpec | None) -> QuantSpec | None:
    """The rounding spec for a floating leaf of ``dtype``; None: exact float32 add."""
    if spec is not None:
        return spec
    if jnp.finfo(dtype).bits >= 32:
        return None
    return QuantSpec(formats.get(jnp.dtype(dtype).name), calibration=None, rounding="stochastic")


def _check_spec(spec: QuantSpec | None, fn: str) -> None:
    if spec is None:
        return
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{fn}: spec must be a QuantSpec or None, got {spec!r}.")
    if not spec.stochastic:
        raise ValueError(
            f"{fn}: spec.rounding is {spec.rounding!r}; stochastic-rounded updates need "
            "rounding='stochastic' (for round-to-nearest use optax.apply_updates)."
        )


def _sr_add(p: Any, u: Any, key: jax.Array, spec: QuantSpec | None) -> jax.Array:
    p = jnp.asarray(p)
    if not jnp.issubdtype(p.dtype, jnp.floating):
        return jnp.asarray(p + u).astype(p.dtype)
    x = p.astype(jnp.float32) + jnp.asarray(u).astype(jnp.float32)
    leaf_spec = _leaf_spec(p.dtype, spec)
    if leaf_spec is None:
        return x.astype(p.dtype)
    return fake_quant(x, leaf_spec, key=key).astype(p.dtype)


def apply_updates_sr(
    params: optax.Params,
    updates: optax.Updates,
    key: jax.Array,
    *,
    spec: QuantSpec | None = None,
) -> optax.Params:
    """``optax.apply_updates`` with a stochastically rounded sum.

    For every floating leaf ``i``: ``new = SR(float32(p) + float32(u))`` with key
    ``fold_in(key, i)``, returned in ``p``'s dtype, so ``E[new] = p + u`` (exactly, up to
    the float32 addition). Non-floating leaves are added as ``optax.apply_updates`` does;
    ``None`` leaves are kept.

    Args:
      params: the parameters (e.g. bfloat16).
      updates: the updates, same structure (any floating dtype).
      key: a PRNG key; use a fresh one every step (e.g. ``fold_in(key, step)``).
      spec: the stochastic-rounding cast. ``None`` (default): a stochastic cast to each
        leaf's own dtype, ``QuantSpec(dtype, calibration=None, rounding="stochastic")``
        (float32 and wider leaves are plainly added). A given spec applies to every floating
        leaf, e.g. ``QuantSpec("bf16", calibration=None, rounding="stochastic")`` to keep
        float32 storage with bfloat16 values.

    Returns:
      The new parameters, with ``params``' structure and dtypes.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> p = jnp.ones(4096, jnp.bfloat16)
      >>> new = apply_updates_sr(p, jnp.full(4096, 1e-3, jnp.float32), jax.random.key(0))
      >>> new.dtype, abs(float(new.astype(jnp.float32).mean()) - 1.001) < 1e-3
      (dtype(bfloat16), True)

    References:
      Gupta et al., 2015, Deep Learning with Limited Numerical Precision,
      https://arxiv.org/abs/1502.02551
      Zamirai et al., 2020, Revisiting BFloat16 Training, https://arxiv.org/abs/2010.06192
    """
    _check_spec(spec, "apply_updates_sr")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: x is None)
    try:
        # jaxlib's PyTreeDef stub lacks flatten_up_to (a public method at run time).
        u_leaves = treedef.flatten_up_to(updates)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as e:
        raise ValueError(
            "apply_updates_sr: updates must have the tree structure of params (the gradients "
            f"of these params, through the optimizer), but they differ: {e}"
        ) from None
    for (path, p), u in zip(leaves, u_leaves, strict=True):
        if p is None or u is None:
            continue
        p_shape, u_shape = jnp.shape(p), jnp.shape(u)
        try:
            fits = jnp.broadcast_shapes(p_shape, u_shape) == tuple(p_shape)
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(
                f"apply_updates_sr: the update at {jax.tree_util.keystr(path)} has shape "
                f"{tuple(u_shape)}, which does not fit the params' {tuple(p_shape)} there; "
                "updates must match params leaf by leaf."
            )
    leaves = [p for _, p in leaves]
    out = [
        None if p is None else _sr_add(p, u, jax.random.fold_in(key, i), spec)
        for i, (p, u) in enumerate(zip(leaves, u_leaves, strict=True))
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


class StochasticRoundState(NamedTuple):
    """State of :func:`stochastic_round_updates`.

    Example:
      >>> import jax.numpy as jnp, jaxquant.optax as jqo
      >>> state = jqo.stochastic_round_updates(seed=3).init(jnp.ones(2, jnp.bfloat16))
      >>> state.key.dtype, state.key.tolist()
      (dtype('uint32'), [0, 3])
    """

    key: jax.Array  # uint32[2], a raw PRNG key (serializable), split every step


def stochastic_round_updates(
    spec: QuantSpec | None = None, *, seed: int = 0
) -> optax.GradientTransformation:
    """The last transformation of a chain, making ``optax.apply_updates`` stochastic.

    Returns ``u' = SR(p + u) - p`` in ``p``'s dtype, so that
    ``optax.apply_updates(p, u') == apply_updates_sr(p, u, key)`` whenever ``SR(p + u) - p``
    is exact in ``p``'s dtype -- always when ``|u|`` is small next to ``|p|`` (the case
    stochastic rounding is for). A large step can round a second time, to nearest;
    :func:`apply_updates_sr` never does, and is preferred.

    Args:
      spec: as in :func:`apply_updates_sr`.
      seed: seed of the key kept in :class:`StochasticRoundState`, an int in
        ``0 .. 2**32 - 1``.

    Returns:
      An ``optax.GradientTransformation``; its ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> opt = optax.chain(optax.sgd(1e-3), stochastic_round_updates())
      >>> p = jnp.ones(8, jnp.bfloat16); state = opt.init(p)
      >>> u, state = opt.update(jnp.ones(8, jnp.float32), state, p)
      >>> optax.apply_updates(p, u).dtype
      dtype(bfloat16)
    """
    _check_spec(spec, "stochastic_round_updates")
    # jax.random.PRNGKey keeps a seed's low 32 bits without x64 (2**32 would repeat seed 0)
    # and overflows past 2**63: the range the CLI's --seed takes.
    seed = check_int(seed, "stochastic_round_updates: seed", lo=0, hi=2**32 - 1)

    def init_fn(params: optax.Params) -> StochasticRoundState:
        del params
        return StochasticRoundState(key=jax.random.PRNGKey(seed))

    def update_fn(
        updates: optax.Updates, state: StochasticRoundState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, StochasticRoundState]:
        if params is None:
            raise ValueError(
                "stochastic_round_updates: update needs params: call "
                "opt.update(grads, state, params)."
            )
        key, sub = jax.random.split(state.key)
        new = apply_updates_sr(params, updates, sub, spec=spec)

        # n is None exactly where p is: apply_updates_sr keeps params' structure.
        def delta(n: jax.Array, p: jax.typing.ArrayLike | None) -> jax.Array | None:
            if p is None:
                return None
            p = jnp.asarray(p)
            if not jnp.issubdtype(p.dtype, jnp.floating):
                return (n - p).astype(p.dtype)
            return (n.astype(jnp.float32) - p.astype(jnp.float32)).astype(p.dtype)

        out = jax.tree_util.tree_map(delta, new, params, is_leaf=lambda x: x is None)
        return out, StochasticRoundState(key=key)

    return optax.GradientTransformation(init_fn, update_fn)
