"""One stateful-operand step: a quantized contraction whose operands keep state.

Delayed scaling (an amax history per operand), LSQ (a learned step per operand) and
stochastic rounding (a PRNG key per call) make a quantized ``dot_general`` / ``einsum``
stateful. This module is that step as two pure functions, shared by the Linen and NNX
front ends, which only *store* the state (Linen in variables, NNX in attributes)::

    state = init(config, lhs, rhs)                     # a dict of arrays
    out, state = apply(config, state, lhs, rhs, dimension_numbers=dn, key=key)

No Flax here: ``config`` is a :class:`~jaxquant.QuantConfig`, or anything carrying one as
``.config`` (a :class:`~jaxquant.flax.Rule`), or anything with the same fields (``weight``,
``act``, ``grad``, ``mode``, ``scaling``, ``history_len``, ``margin``, ``ste``).

The state is a flat dict whose keys are the variable names the front ends store, per
quantized operand ``op`` (``"lhs"``: the activation, ``"rhs"``: the weight):

* ``{op}_scaling``: a :class:`~jaxquant.ScaleState` (delayed scaling);
* ``{op}_step`` (trained, :func:`trained` is True: Linen ``params``, NNX ``nnx.Param``),
  init 1, and ``{op}_step_base`` (LSQ): the step used is ``step * step_base``, where
  ``step_base`` is LSQ's data-dependent initial step ``2 mean|x| / sqrt(qmax)``, taken from
  the operands given to :func:`init` or, if those were shapes, from the first training
  batch (a zero base means "not set yet").

A :class:`~jaxquant._src.dot.probe.Probe` (``quantize_model(..., delayed_grad=True,
errors=True)``) adds a second state, the one the *backward* pass writes: the output
gradient's amax history and the per-layer errors (:func:`probe_init`). The front ends store
it under the key :data:`~jaxquant._src.dot.probe.OVERWRITE` where ``jax.grad`` reaches it
(Linen ``params``, NNX an ``nnx.Param`` subclass) and hand it to :func:`apply` as ``owg``;
its gradient is its new value (:func:`jaxquant.optax.overwrite_with_gradient`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxquant._src.checks import describe
from jaxquant._src.dot import dot_general, einsum
from jaxquant._src.dot import probe as probe_lib
from jaxquant._src.dot.subscripts import plan as einsum_plan
from jaxquant._src.flax.rules import _at
from jaxquant._src.granularity import PerTensor
from jaxquant._src.lsq import lsq_fake_quant, lsq_init
from jaxquant._src.qarray import QArray
from jaxquant._src.scaling import delayed_scaling
from jaxquant._src.spec import QuantSpec

OPERANDS = (("lhs", "act"), ("rhs", "weight"))  # (contraction operand, config field)
_FIELDS = ("weight", "act", "grad", "mode", "scaling", "history_len", "margin", "ste")


def config_of(config: Any) -> Any:
    """The config a stateful step runs: ``config.config`` when there is one (a Rule carrying
    a QuantConfig), else ``config`` itself; it must have every QuantConfig field."""
    cfg = getattr(config, "config", config)
    missing = [f for f in _FIELDS if not hasattr(cfg, f)]
    if missing:
        raise TypeError(
            f"stateful step: config must be a jq.QuantConfig or a jq.flax.Rule, got "
            f"{describe(config)} (it has no {', '.join(missing)})."
        )
    return cfg


def operand_specs(config: Any) -> list[tuple[str, QuantSpec]]:
    """``[(operand, spec)]`` for the operands ``config`` quantizes (``lhs``: act, ``rhs``:
    weight)."""
    cfg = config_of(config)
    return [(op, getattr(cfg, f)) for op, f in OPERANDS if getattr(cfg, f) is not None]


def needs_key(config: Any) -> bool:
    """Whether a spec of ``config`` rounds stochastically (a PRNG key per call)."""
    cfg = config_of(config)
    return any(s is not None and s.stochastic for s in (cfg.weight, cfg.act, cfg.grad))


def state_names(config: Any) -> tuple[str, ...]:
    """The keys of ``init(config, ...)``'s state, in a fixed order."""
    cfg = config_of(config)
    names: list[str] = []
    for op, _ in operand_specs(cfg):
        if cfg.scaling == "delayed":
            names.append(f"{op}_scaling")
        if cfg.ste == "lsq":
            names += [f"{op}_step_base", f"{op}_step"]
    return tuple(names)


def trained(name: str) -> bool:
    """Whether the state entry ``name`` is a trained parameter (LSQ's ``{op}_step``)."""
    return name.endswith("_step")


def probe_init(config: Any, probe: probe_lib.Probe | None) -> dict[str, Any]:
    """The state the backward pass of a product of ``config`` writes under ``probe``
    (``{}``: none): see :func:`jaxquant._src.dot.probe.init`."""
    if probe is None or not probe.active:
        return {}
    return probe_lib.init(probe, config_of(config))


def _shape_of(x: Any, what: str) -> tuple[int, ...]:
    if hasattr(x, "shape"):
        return tuple(int(d) for d in x.shape)
    if isinstance(x, tuple | list) and all(isinstance(d, int) and d >= 0 for d in x):
        return tuple(x)
    raise TypeError(
        f"stateful.init: {what} must be an array, a jax.ShapeDtypeStruct or a shape (a "
        f"tuple of ints >= 0), got {describe(x)}."
    )


def _scaling(cfg: Any, spec: QuantSpec):
    return delayed_scaling(spec, history_len=cfg.history_len, margin=cfg.margin)


def _step_shape(spec: QuantSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of a learned step: ``()`` per-tensor, else the plan's scale shape."""
    if isinstance(spec.granularity, PerTensor):
        return ()
    return spec.granularity.plan(shape).scale_shape


def _base_from(base: jax.Array, x: jax.Array, spec: QuantSpec) -> jax.Array:
    """LSQ's initial step taken from ``x`` where ``base`` holds none yet (0)."""
    first = lsq_init(x, spec).reshape(base.shape)
    return jax.lax.stop_gradient(jnp.where(base > 0, base, first))


def init(config: Any, lhs: Any, rhs: Any) -> dict[str, Any]:
    """The initial state of a stateful contraction.

    Args:
      config: a QuantConfig or a Rule (see the module docstring).
      lhs, rhs: the operands, or their shapes (tuples or ``jax.ShapeDtypeStruct``).
        Arrays also set LSQ's base steps (from these values); with shapes the bases stay
        0 until the first training :func:`apply`.

    Returns:
      A dict ``{name: array or ScaleState}`` (names in :func:`state_names`); empty for a
      config that only rounds stochastically.

    Example:
      >>> import jaxquant as jq
      >>> from jaxquant._src.flax import stateful
      >>> cfg = jq.QuantConfig(weight=jq.QuantSpec("int8"), act=jq.QuantSpec("int8"),
      ...                      scaling="delayed", history_len=4)
      >>> state = stateful.init(cfg, (2, 8), (8, 3))
      >>> sorted(state), state["lhs_scaling"].amax_history.shape
      (['lhs_scaling', 'rhs_scaling'], (4,))
    """
    cfg = config_of(config)
    out: dict[str, Any] = {}
    for op, spec in operand_specs(cfg):
        x = lhs if op == "lhs" else rhs
        shape = _shape_of(x, op)
        if cfg.scaling == "delayed":
            out[f"{op}_scaling"] = _scaling(cfg, spec).init(shape)
        if cfg.ste == "lsq":
            base = jnp.zeros(_step_shape(spec, shape), jnp.float32)
            if hasattr(x, "dtype") and not isinstance(x, jax.ShapeDtypeStruct):  # values
                base = _base_from(base, jax.lax.stop_gradient(x), spec)
            out[f"{op}_step_base"] = base
            out[f"{op}_step"] = jnp.ones(base.shape, jnp.float32)
    return out


def _deterministic(cfg: Any) -> Any:
    def det(spec: QuantSpec | None) -> QuantSpec | None:
        return spec.replace(rounding="nearest") if spec is not None and spec.stochastic else spec

    return dataclasses.replace(cfg, weight=det(cfg.weight), act=det(cfg.act), grad=det(cfg.grad))


def _check_state(cfg: Any, state: Any) -> None:
    if not isinstance(state, dict):
        raise TypeError(
            f"the stateful step's state must be the dict init(config, lhs, rhs) returns, "
            f"got {describe(state)}."
        )
    want = set(state_names(cfg))
    if set(state) != want:
        raise ValueError(
            f"the stateful step's state has entries {sorted(state)} but the config needs "
            f"{sorted(want)}: it was made for another config (scaling={cfg.scaling!r}, "
            f"ste={cfg.ste!r}). Re-initialise it, or restore a checkpoint made with these "
            "rules."
        )


def apply(
    config: Any,
    state: dict[str, Any],
    lhs: Any,
    rhs: Any,
    *,
    dimension_numbers: Any = None,
    subscripts: str | None = None,
    precision: Any = None,
    preferred_element_type: Any = None,
    out_sharding: Any = None,
    key: jax.Array | None = None,
    training: bool = True,
    where: str = "",
    owg: Any = None,
    probe: probe_lib.Probe | None = None,
) -> tuple[Any, dict[str, Any]]:
    """One quantized contraction with state: ``(out, new_state)``.

    A ``dot_general`` (``dimension_numbers``) or a two-operand ``einsum`` (``subscripts``)
    of ``lhs`` (activation) and ``rhs`` (weight), quantized with ``config`` and this
    step's delayed scales (the scale each :class:`~jaxquant.ScaleState` gives now), LSQ
    steps (``step * step_base``) and ``key``.

    Args:
      config: a QuantConfig or a Rule (see the module docstring).
      state: the dict from :func:`init` (or a previous ``apply``).
      lhs, rhs: the operands.
      dimension_numbers, precision, preferred_element_type, out_sharding: as
        :func:`jax.lax.dot_general` (``out_sharding``: dot_general only).
      subscripts: an explicit two-operand einsum string instead of ``dimension_numbers``.
      key: a PRNG key for stochastic specs (required while training if ``config`` has one).
      training: False freezes the state (``new_state`` is ``state``) and rounds stochastic
        specs to nearest (no key needed). While training, the delayed amax histories move
        on and LSQ bases not set yet are taken from the operands.
      where: the layer's path, prefixed to errors.
      owg, probe: the backward pass's state (from :func:`probe_init`) and the
        :class:`~jaxquant._src.dot.probe.Probe` that made it; while training, the
        product's VJP writes the new state as ``owg``'s cotangent.

    Returns:
      ``(out, new_state)``; the front end stores ``new_state`` (or not, in evaluation).

    Raises:
      ValueError: a state made for another config; a stochastic config while training
        without a key; a served (QArray) weight, which takes stateless rules.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> from jaxquant._src.flax import stateful
      >>> cfg = jq.QuantConfig(weight=jq.QuantSpec("int8"), act=jq.QuantSpec("int8"),
      ...                      scaling="delayed", history_len=4)
      >>> x, w = jnp.ones((2, 8)), jnp.ones((8, 3))
      >>> state = stateful.init(cfg, x, w)
      >>> dn = (((1,), (0,)), ((), ()))
      >>> y, state = stateful.apply(cfg, state, x, w, dimension_numbers=dn)
      >>> y.shape, int(state["lhs_scaling"].count)
      ((2, 3), 1)
    """
    cfg = config_of(config)
    if (dimension_numbers is None) == (subscripts is None):
        raise ValueError(
            "stateful.apply: pass exactly one of dimension_numbers= (dot_general) and "
            f"subscripts= (einsum), got dimension_numbers={dimension_numbers!r}, "
            f"subscripts={subscripts!r}."
        )
    with _at(where):
        _check_state(cfg, state)
        # Not tied to training: the backward pass, if any, writes the state as a gradient.
        probing = probe is not None and bool(owg)
        if probing:
            assert probe is not None
            probe_lib.check(probe, cfg)
        if not training:
            cfg = _deterministic(cfg)
        if isinstance(rhs, QArray):
            raise ValueError(
                f"the weight is a served QArray ({rhs.spec}) but the rule is stateful "
                "(delayed scaling, LSQ or stochastic rounding); serving converted params "
                "takes stateless rules: static activation scales come from "
                "jq.flax.calibrate(...).rules."
            )
        if needs_key(cfg) and key is None:
            raise ValueError(
                "the rule rounds stochastically and needs a PRNG key per call while "
                "training; pass key= (or training=False to round to nearest)."
            )
        new = dict(state)
        scales: dict[str, jax.Array] = {}
        steps: dict[str, jax.Array] = {}
        for op, spec in operand_specs(cfg):
            x = jax.lax.stop_gradient(lhs if op == "lhs" else rhs)
            if cfg.scaling == "delayed":
                scales[op], new[f"{op}_scaling"] = _scaling(cfg, spec).update(
                    state[f"{op}_scaling"], x
                )
            if cfg.ste == "lsq":
                base = _base_from(state[f"{op}_step_base"], x, spec)
                new[f"{op}_step_base"] = base
                steps[op] = state[f"{op}_step"] * base
        out = _contract(
            cfg,
            lhs,
            rhs,
            dimension_numbers,
            subscripts,
            precision,
            preferred_element_type,
            out_sharding,
            scales,
            steps,
            key,
            (probe, owg) if probing else None,
        )
    return out, (new if training else state)


def _contract(
    cfg,
    lhs,
    rhs,
    dimension_numbers,
    subscripts,
    precision,
    preferred_element_type,
    out_sharding,
    scales,
    steps,
    key,
    probed: tuple[Any, Any] | None = None,
) -> Any:
    lhs_spec, rhs_spec, ste = cfg.act, cfg.weight, cfg.ste
    if ste == "lsq":  # the operands are fake-quantized with their learned steps
        kl = kr = None
        if key is not None:  # the same fold_in layout as before the step was shared
            kl, kr, key = (jax.random.fold_in(key, i) for i in range(3))
        if lhs_spec is not None:
            lhs = lsq_fake_quant(
                lhs, lhs_spec, steps["lhs"], key=kl if lhs_spec.stochastic else None
            )
        if rhs_spec is not None:
            rhs = lsq_fake_quant(
                rhs, rhs_spec, steps["rhs"], key=kr if rhs_spec.stochastic else None
            )
        lhs_spec = rhs_spec = None
        ste = "plain"
    if key is not None and not needs_key(cfg):
        key = None  # a key with nothing stochastic left to use it
    kw: dict[str, Any] = dict(
        lhs_spec=lhs_spec,
        rhs_spec=rhs_spec,
        grad_spec=cfg.grad,
        mode=cfg.mode,
        ste=ste,
        backward=cfg.backward,
        hadamard=cfg.hadamard,
    )
    if subscripts is not None and out_sharding is not None:
        raise ValueError("jq.einsum takes no out_sharding; leave it None for a quantized Einsum.")

    def product(a: Any, b: Any, grad_scale: Any, aux: Any) -> Any:
        ls, rs, k = aux
        more = dict(kw, lhs_scale=ls, rhs_scale=rs, grad_scale=grad_scale, key=k)
        if subscripts is not None:
            return einsum(
                subscripts,
                a,
                b,
                precision=precision,
                preferred_element_type=preferred_element_type,
                **more,
            )
        return dot_general(
            a,
            b,
            dimension_numbers,
            precision,
            preferred_element_type,
            out_sharding=out_sharding,
            **more,
        )

    aux = (scales.get("lhs"), scales.get("rhs"), key)
    if probed is None:
        return product(lhs, rhs, None, aux)
    probe, owg = probed

    def reference(a: Any, b: Any) -> Any:  # the float product of the same operands
        if subscripts is not None:
            return jnp.einsum(
                subscripts, a, b, precision=precision, preferred_element_type=preferred_element_type
            )
        return jax.lax.dot_general(a, b, dimension_numbers, precision, preferred_element_type)

    if subscripts is not None:
        dn = einsum_plan(subscripts, tuple(jnp.shape(lhs)), tuple(jnp.shape(rhs)))[0]
    else:
        dn = dimension_numbers
    return probe_lib.probed(probe, cfg, product, reference, lhs, rhs, owg, aux, dn=dn)
