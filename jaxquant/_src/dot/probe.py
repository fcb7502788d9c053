"""Quantities only the backward pass knows, carried out of it as cotangents.

Two things a quantized training step learns only in its backward pass:

* **delayed scaling of the output gradient** (Transformer Engine): the scale the gradient is
  quantized with comes from an amax history of earlier steps' gradients, and this step's
  gradient amax must be pushed into it;
* **per-layer errors** of the quantized products: the forward output's, the input
  gradient's (dgrad) and the weight gradient's (wgrad) SQNR against float products of the
  same operands, and the saturation / underflow fractions of each quantized operand.

Flax writes mutable collections in the forward pass, too early for both. The established JAX
answer (``flax.linen.fp8_ops``' ``OVERWRITE_WITH_GRADIENT``) is used instead: the state is an
*input* of a custom VJP whose cotangent is the *new* state, and the optimizer writes that
"gradient" into the variable instead of stepping it
(:func:`jaxquant.optax.overwrite_with_gradient`). :func:`probed` is that custom VJP around
any quantized contraction: its forward calls the product (``jax.vjp`` of it, so the
quantized operands the product saves are its residuals); its backward reads the gradient
``g``, updates the history, and runs the product's own VJP with the delayed scale.

The product quantizes its gradient with the scale fixed in the forward (``grad_scale``, the
history's scale), while at the first step (an empty history) the delayed rule uses the
gradient's current scale, known only now. Both are served by one VJP: quantizing ``g``
with scale ``s_now`` gives the codes that quantizing ``g * (s_fwd / s_now)`` with scale
``s_fwd`` gives, so the backward feeds that rescaled gradient and multiplies the
product's cotangents by ``s_now / s_fwd``. After the first step ``s_now = s_fwd`` and both
factors are exactly 1.

State layout (all float32, so that ``jax.grad`` differentiates it; under the key
:data:`OVERWRITE` of the owning module):

* ``"grad"``: ``amax_history`` (``history_len``,), ``scale`` (), ``count`` () -- the fields
  of a :class:`~jaxquant.ScaleState`, the count a whole number;
* ``"errors"``: one float32 scalar per name in :data:`ERRORS`, and ``calls`` (1 per call:
  a layer called ``n`` times a step gets ``n`` times its cotangents, summed by autodiff).

Nothing here imports Flax or optax.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxquant._src.checks import check_bool
from jaxquant._src.dot.checks import bind_operand
from jaxquant._src.granularity import PerTensor
from jaxquant._src.metrics import saturation_rate, sqnr, underflow_rate
from jaxquant._src.quantize import quantize
from jaxquant._src.scaling import ScaleState, delayed_scaling
from jaxquant._src.spec import QuantSpec

Array = jax.Array

# flax.linen.fp8_ops.OVERWRITE_WITH_GRADIENT: a variable whose path has a key ending with it
# is overwritten by its gradient (jaxquant.optax.overwrite_with_gradient, flax's TrainState).
OVERWRITE = "_overwrite_with_gradient"
ERRORS = (
    "fwd_sqnr",  # dB: the quantized product against the float product of the same operands
    "dgrad_sqnr",  # dB: the input gradient against g . w in float
    "wgrad_sqnr",  # dB: the weight gradient against x . g in float
    "act_saturation",  # fractions of finite elements clipped / non-zeros flushed to 0
    "act_underflow",
    "weight_saturation",
    "weight_underflow",
    "grad_saturation",
    "grad_underflow",
)
# An exact product's SQNR is +inf; stored finite, so that a loss scaler's all_finite(grads)
# (which sees these cotangents) is not fooled. 300 dB is far beyond float32's ~150.
SQNR_CAP = 300.0
_COUNT_MAX = 2.0**24  # float32 counts are whole numbers up to here; they saturate


@dataclasses.dataclass(frozen=True)
class Probe:
    """What a quantized model carries out of its backward pass (hashable, static).

    Attributes:
      delayed_grad: rules with ``scaling="delayed"`` and a ``grad`` spec also scale the
        output gradient from an amax history.
      errors: every quantized product reports its per-layer errors.
    """

    delayed_grad: bool = False
    errors: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "delayed_grad", check_bool(self.delayed_grad, "delayed_grad"))
        object.__setattr__(self, "errors", check_bool(self.errors, "errors"))

    @property
    def active(self) -> bool:
        return self.delayed_grad or self.errors


def delays_grad(probe: Probe, cfg: Any) -> bool:
    """Whether ``cfg`` (a QuantConfig) gets a delayed gradient scale under ``probe``."""
    return probe.delayed_grad and cfg.scaling == "delayed" and cfg.grad is not None


def measures(probe: Probe, cfg: Any) -> bool:
    """Whether products of ``cfg`` report errors under ``probe``."""
    return probe.errors and cfg.quantizes


def check(probe: Probe, cfg: Any, where: str = "") -> None:
    """Errors for configs a probe cannot serve, naming the fix."""
    at = f"{where}: " if where else ""
    if delays_grad(probe, cfg) and not isinstance(cfg.grad.granularity, PerTensor):
        raise ValueError(
            f"{at}delayed_grad=True keeps one amax history per layer for the output "
            f"gradient, whose shape follows the batch; its spec must be per-tensor, got "
            f"{cfg.grad}. Use grad=QuantSpec(..., per_tensor()), or scaling='current'."
        )
    if measures(probe, cfg) and cfg.ste == "lsq":
        raise ValueError(
            f"{at}errors=True measures jaxquant's quantized products; an LSQ rule "
            "(ste='lsq') fake-quantizes its operands with learned steps instead. Measure "
            "it with scaling rules, or quantize it without errors=True."
        )


def init(probe: Probe, cfg: Any) -> dict[str, Any]:
    """The initial state a product of ``cfg`` carries (empty: nothing to carry).

    Example:
      >>> import jaxquant as jq
      >>> from jaxquant._src.dot import probe
      >>> cfg = jq.QuantConfig(weight=jq.QuantSpec("e4m3"), grad=jq.QuantSpec("e5m2"),
      ...                      scaling="delayed", history_len=4)
      >>> st = probe.init(probe.Probe(delayed_grad=True), cfg)
      >>> {k: v.shape for k, v in st["grad"].items()}
      {'amax_history': (4,), 'count': (), 'scale': ()}
    """
    check(probe, cfg)
    out: dict[str, Any] = {}
    if delays_grad(probe, cfg):
        out["grad"] = {
            "amax_history": jnp.zeros((cfg.history_len,), jnp.float32),
            "count": jnp.zeros((), jnp.float32),
            "scale": jnp.ones((), jnp.float32),
        }
    if measures(probe, cfg):
        out["errors"] = {name: jnp.zeros((), jnp.float32) for name in (*ERRORS, "calls")}
    return out


def valid_grad_state(state: dict[str, Array]) -> Array:
    """Whether a gradient state is one the backward pass wrote: a whole, non-negative count,
    a finite non-negative history and a finite positive scale. An optimizer that stepped it
    like a weight (Adam, SGD, weight decay) breaks the count's wholeness at its first
    update."""
    c, h, s = state["count"], state["amax_history"], state["scale"]
    ok = (c >= 0) & (c == jnp.round(c)) & jnp.isfinite(c)
    ok &= jnp.all(jnp.isfinite(h) & (h >= 0), axis=-1)
    return ok & jnp.isfinite(s) & (s > 0)


def _stats(x: Array, spec: QuantSpec | None, scale: Array | None) -> tuple[Array, Array]:
    """(saturation, underflow) of ``x`` quantized by ``spec`` with ``scale`` (None: its own
    calibration), rounded to nearest (a stochastic spec's underflow is a probability; the
    nearest-rounding one is its expectation's best single estimate)."""
    if spec is None:
        zero = jnp.zeros((), jnp.float32)
        return zero, zero
    if spec.stochastic:
        spec = spec.replace(rounding="nearest")
    x = jax.lax.stop_gradient(x)
    q = quantize(x, spec, scale=scale)
    return saturation_rate(x, q), underflow_rate(x, q)


def _sqnr(ref: Array, got: Array) -> Array:
    return jnp.clip(sqnr(ref, got), -SQNR_CAP, SQNR_CAP)  # NaN (a non-finite g) stays NaN


def probed(
    probe: Probe,
    cfg: Any,
    product: Callable[[Array, Array, Array | None, Any], Array],
    reference: Callable[[Array, Array], Array],
    lhs: Array,
    rhs: Array,
    state: Any,
    aux: Any,
    *,
    dn: Any,
) -> Array:
    """``product(lhs, rhs, grad_scale, aux)`` whose backward also writes ``state``'s
    cotangent: the new gradient state (``"grad"``) and this step's errors (``"errors"``).

    Args:
      probe: what to carry (:class:`Probe`).
      cfg: the product's QuantConfig (``act`` quantizes ``lhs``, ``weight`` ``rhs``,
        ``grad`` the output gradient; delayed specs already bound to the operands).
      product: the quantized contraction; ``grad_scale`` is None unless the gradient scale
        is delayed; ``aux`` are its non-differentiated inputs (operand scales, a key).
      reference: the same contraction in float (errors only).
      lhs, rhs: the operands (activation, weight).
      state: the pytree :func:`init` made (a Flax variable: its leaves' container types are
        kept in the cotangent).
      aux: ``(lhs_scale, rhs_scale, key)``, each an array or None.
      dn: the dimension numbers of ``product`` as a ``dot_general`` (layout-relative specs
        bind to them for the operands' statistics).

    Returns:
      The product's output.
    """
    delayed = "grad" in state
    errors = "errors" in state
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    paths = [tuple(getattr(k, "key", getattr(k, "name", k)) for k in p) for p, _ in leaves]

    def as_dict(tree: Any) -> dict[str, dict[str, Array]]:
        out: dict[str, dict[str, Array]] = {}
        for path, leaf in zip(paths, jax.tree.leaves(tree), strict=True):
            out.setdefault(str(path[0]), {})[str(path[1])] = leaf
        return out

    def cotangent(new: dict[str, dict[str, Array]]) -> Any:
        return jax.tree.unflatten(treedef, [new[str(p[0])][str(p[1])] for p in paths])

    def fwd_scale(st: dict[str, dict[str, Array]]) -> Array | None:
        if not delayed:
            return None
        g = st["grad"]
        # A stepped (not overwritten) state poisons the gradient: NaN everywhere, loudly.
        return jnp.where(valid_grad_state(g), g["scale"], jnp.nan)

    @jax.custom_vjp
    def run(lhs: Array, rhs: Array, state: Any, aux: Any) -> Array:
        return product(lhs, rhs, fwd_scale(as_dict(state)), aux)

    def run_fwd(lhs: Array, rhs: Array, state: Any, aux: Any) -> tuple[Array, Any]:
        st = as_dict(state)
        s_fwd = fwd_scale(st)
        out, vjp_q = jax.vjp(lambda a, b: product(a, b, s_fwd, aux), lhs, rhs)
        measured: Any = None
        if errors:
            ref, vjp_f = jax.vjp(reference, lhs, rhs)
            ls, rs, _ = aux
            (lc, rc), (lb, rb) = dn
            with warnings.catch_warnings():  # the product's own bind said it already
                warnings.simplefilter("ignore")
                act = bind_operand(cfg.act, tuple(lhs.shape), lc, lb, "lhs", "errors")
                weight = bind_operand(cfg.weight, tuple(rhs.shape), rc, rb, "rhs", "errors")
            measured = (
                vjp_f,
                _sqnr(ref, out),
                *_stats(lhs, act, ls),
                *_stats(rhs, weight, rs),
            )
        return out, (vjp_q, st.get("grad"), s_fwd, measured)

    def run_bwd(res: Any, g: Array) -> tuple[Any, ...]:
        vjp_q, gstate, s_fwd, measured = res
        new: dict[str, dict[str, Array]] = {}
        s_now = None
        if delayed:
            sc = delayed_scaling(cfg.grad, history_len=cfg.history_len, margin=cfg.margin)
            count = gstate["count"]
            old = ScaleState(
                gstate["amax_history"],
                gstate["scale"],
                jnp.clip(count, 0, _COUNT_MAX).astype(jnp.int32),
            )
            s_now, nxt = sc.update(old, g)
            s_now = jnp.where(jnp.isnan(s_fwd), jnp.nan, s_now)
            new["grad"] = {
                "amax_history": nxt.amax_history,
                "count": jnp.minimum(count + 1.0, _COUNT_MAX),
                "scale": nxt.scale,
            }
            # Codes of g at scale s_now == codes of g * (s_fwd / s_now) at scale s_fwd.
            gq = (g.astype(jnp.float32) * (s_fwd / s_now)).astype(g.dtype)
            dl, dr = vjp_q(gq)
            back = s_now / s_fwd
            dl = (dl.astype(jnp.float32) * back).astype(dl.dtype)
            dr = (dr.astype(jnp.float32) * back).astype(dr.dtype)
        else:
            dl, dr = vjp_q(g)
        if errors:
            vjp_f, fwd, a_sat, a_und, w_sat, w_und = measured
            dl_f, dr_f = vjp_f(g)
            g_sat, g_und = _stats(g, cfg.grad, s_now)
            values = (
                fwd,
                _sqnr(dl_f, dl),
                _sqnr(dr_f, dr),
                a_sat,
                a_und,
                w_sat,
                w_und,
                g_sat,
                g_und,
            )
            new["errors"] = {n: v.astype(jnp.float32) for n, v in zip(ERRORS, values, strict=True)}
            new["errors"]["calls"] = jnp.ones((), jnp.float32)
        return dl, dr, cotangent(new), jax.tree.map(lambda _: None, aux)

    run.defvjp(run_fwd, run_bwd)
    return run(lhs, rhs, state, aux)
