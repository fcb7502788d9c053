"""Interception: every contraction inside a matched module, whatever code calls it.

Flax's own layers take their product as an attribute (``Dense(dot_general=...)``,
``nnx.Linear.dot_general``, ``Conv.conv_general_dilated``), and the front ends set it. Code
written elsewhere does not: Hugging Face's ``FlaxConv1D`` calls ``lax.dot_general`` itself,
``Embed.attend`` calls ``jnp.dot``, a LoRA subclass of ``nn.Dense`` writes ``x @ kernel``.
While a quantized model runs, :func:`intercepting` replaces the public contraction functions
(``jax.lax.dot_general``, ``jax.lax.conv_general_dilated``, ``jnp.einsum``, ``jnp.dot``,
``jnp.matmul`` and the ``@`` operator of arrays and tracers) by versions that ask the front
end which module is running (:class:`Owner`) and quantize the product with that module's
rule; calls made by jaxquant itself, and calls outside any model module, run the original.

Operand roles: the *weight* is the operand that is one of the running module's parameters,
or has the shape of one or of its transpose (``kernel.T``, a dtype cast of it); every other
operand is an *activation*. A contraction of two activations (attention's ``q @ k``) and a
product of two parameters stay in float, listed with that reason; a weight contraction that
cannot be quantized (a three-operand einsum, a broadcasting batched matmul, a stateful rule)
is listed too, and raises (``strict=True``) or warns.

Patching module attributes is process-global; it is reference-counted and the functions
consult a context variable, so nested and concurrent quantized calls each see their own
front end, and code running outside them sees the originals.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant._src.config import QuantConfig
from jaxquant._src.conv import conv_general_dilated as jq_conv
from jaxquant._src.dot import dot_general as jq_dot_general
from jaxquant._src.dot import einsum as jq_einsum
from jaxquant._src.dot import probe as probe_lib
from jaxquant._src.dot.subscripts import parse as parse_subscripts
from jaxquant._src.flax import act_transform
from jaxquant._src.flax.act_transform import ActTransform
from jaxquant._src.flax.rules import Rule, _at, gated
from jaxquant._src.granularity import follows_layout
from jaxquant._src.layout import bind, conv_layout, dot_layout
from jaxquant._src.qarray import QArray
from jaxquant._src.spec import QuantSpec

# The operand a weight is; the roles _roles also finds: both operands parameters, or both
# shaped like one
Side = Literal["lhs", "rhs"]
Role = Literal["lhs", "rhs", "both", "ambiguous"]
# (contracting, batch) axes of one operand
Axes = tuple[tuple[int, ...], tuple[int, ...]]
# (lhs_spec, rhs_spec, config) -> the quantized product
Quantized = Callable[[QuantSpec | None, QuantSpec | None, QuantConfig], Any]
# a replaced function (or descriptor) -> its intercepting replacement
Maker = Callable[[Any], Any]


class Contraction(NamedTuple):
    """One contraction a quantized model ran (its last call): where, what, and whether it
    was quantized.

    Attributes:
      path: the module that computed it (the innermost one running).
      module: that module's class name.
      op: the function called: ``"dot_general"``, ``"einsum"``, ``"dot"``, ``"matmul"``,
        ``"@"`` or ``"conv_general_dilated"``.
      shapes: the two operands' shapes.
      weight: which operand is the weight (``"lhs"`` / ``"rhs"``), ``None`` for two
        activations, ``"both"`` for a product of two parameters.
      quantized: whether it ran quantized.
      reason: the rule that quantized it, or why it stayed in float.
      param: the module parameter the weight operand is (``"kernel"``,
        ``"embedding"``, ``"lora_a"``, ``"Dense_0/kernel"`` for a child's), or None.
      transposed: whether the operand is that parameter with its axes reversed
        (``kernel.T``): :func:`jaxquant.flax.convert` quantizes the stored parameter with the
        weight spec's axes reversed, so serving re-quantizes it to the same codes. None: a
        square parameter found by its shape, ``w`` or ``w.T`` (convert groups it as ``w``;
        serving then uses the stored values as they are, without re-quantizing).
      contracting, batch: the weight operand's contracted and batch axes (in its own
        layout): what layout-relative specs (``per_channel()``, ``per_block(32)``) bind to.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxquant as jq
      >>> from jaxquant.flax import Rule, contractions, quantize_model
      >>> qmodel = quantize_model(nn.Dense(4), Rule(".*", weight=jq.QuantSpec("int8")))
      >>> variables = qmodel.init(jax.random.key(0), jnp.ones((2, 3)))
      >>> c = contractions(qmodel)[0]
      >>> c.op, c.shapes, c.weight, c.param, c.quantized, c.contracting
      ('dot_general', ((2, 3), (3, 4)), 'rhs', 'kernel', True, (0,))
    """

    path: str
    module: str
    op: str
    shapes: tuple[tuple[int, ...], tuple[int, ...]]
    weight: str | None
    quantized: bool
    reason: str
    param: str | None = None
    transposed: bool | None = False
    contracting: tuple[int, ...] | None = None
    batch: tuple[int, ...] = ()


@dataclasses.dataclass
class Owner:
    """The module a contraction belongs to, as the front end sees it."""

    path: str
    module: str  # class name
    rule: Rule | None  # the first matching rule (None: no rule matches)
    # the module's parameters as (name below the module, array or QArray): operand roles
    params: Callable[[], list[tuple[str, Any]]]
    record: Callable[[Contraction], None]
    strict: bool
    # (call, bound config) -> product, for stateful rules (delayed scaling, LSQ,
    # stochastic rounding): the front end keeps their state; None: not supported there
    stateful: Callable[[Call, QuantConfig], Any] | None = None
    instance: Any = None  # the running module object (its method's `self`)
    # the module's online input transform (a PTQ method's smoothing / rotation), or None
    transform: Callable[[], ActTransform | None] | None = None
    # what the backward pass carries out (quantize_model's delayed_grad / errors), or None:
    # a probed product takes the stateful path, which keeps the probe's variables
    probe: probe_lib.Probe | None = None


class Frontend:
    """What a front end (Linen, NNX) tells the interception: who owns a call."""

    def owner(self, frame: Any) -> Owner | None:  # pragma: no cover - interface
        raise NotImplementedError

    def transform_of(self, frame: Any) -> ActTransform | None:  # pragma: no cover
        """The online input transform of the module running at ``frame`` (no side effect:
        a layer product asks it, the module's contraction is already recorded)."""
        raise NotImplementedError


_active: contextvars.ContextVar[tuple[Frontend, ...]] = contextvars.ContextVar(
    "jaxquant_intercept", default=()
)
# Set by calibration: (path, rule, activation, site) -> None. While set, weight contractions
# are observed (their activation operand handed to it) and computed in float.
_observer: contextvars.ContextVar[Callable[[str, Rule, Any, Site], None] | None] = (
    contextvars.ContextVar("jaxquant_observer", default=None)
)
# Paths of modules running on their own dequantized QArray parameters (serving): a weight
# whose layout is uncertain passes through as stored instead of being re-quantized.
_serving: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "jaxquant_serving", default=frozenset()
)
_lock = threading.Lock()
_installed = 0
_originals: dict[tuple[Any, str], Any] = {}
_MISSING = object()


def _from_jaxquant(frame: Any) -> bool:
    """Whether the first caller outside jax is jaxquant's own code: its quantized ops call
    ``lax.dot_general`` themselves, directly or through jax (``jax.eval_shape``...)."""
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not (name == "jax" or name.startswith(("jax.", "jaxlib"))):
            return name.startswith("jaxquant.")
        frame = frame.f_back
    return False


class Call(NamedTuple):
    """One intercepted contraction: its operands, the float computation and how to
    quantize it."""

    op: str
    lhs: Any
    rhs: Any
    original: Callable[[], Any]  # the float computation, as called
    # (lhs_spec, rhs_spec, config) -> quantized product; None: this form cannot be quantized
    quantized: Quantized | None
    why_not: str  # when quantized is None
    # "lhs" / "rhs" -> (contracting, batch) axes of that operand; None: unknown
    layout: Callable[[Side], Axes] | None = None
    # keywords of the contraction for the stateful step (dimension_numbers or subscripts,
    # precision, preferred_element_type): None where it cannot take it (a convolution)
    step: dict[str, Any] | None = None
    # the same contraction of other operands (an online input transform's output)
    rebuild: Callable[[Any, Any], Call] | None = None


class Site(NamedTuple):
    """Where an observed activation comes from (:func:`observing` with ``site=True``)."""

    call: Call  # the contraction: its op, operands and dimension numbers / subscripts
    weight: Side  # the operand that is the weight
    param: str | None  # the module parameter it is (None: computed by the model)
    transposed: bool | None  # as Contraction.transposed


def _route(call: Call, frame: Any) -> Any:
    fronts = _active.get()
    if not fronts or _from_jaxquant(frame):
        return call.original()
    owner = fronts[-1].owner(frame)
    if owner is None:
        return call.original()
    transform = owner.transform() if owner.transform is not None else None
    if transform is not None:
        call = _transformed(call, owner, transform)
    return _decide(call, owner, _inner_jit(frame, owner.instance))


def _current_transform(frame: Any) -> ActTransform | None:
    fronts = _active.get()
    if not fronts:
        return None
    return fronts[-1].transform_of(frame)


act_transform.register_lookup(_current_transform)


def _transformed(call: Call, owner: Owner, transform: ActTransform) -> Call:
    """``call`` with its activation operand transformed (see
    :mod:`jaxquant._src.flax.act_transform`); a contraction it cannot apply to is an error
    naming the layer: its weight was changed offline, so running it as is would be wrong."""
    where = f"layer {owner.path or '(the model itself)'!r} ({owner.module})"
    side = _roles(call.lhs, call.rhs, owner.params())[0]
    if side != "lhs" and side != "rhs":
        raise ValueError(
            f"{where}: it has an online input transform (a PTQ method's smoothing or "
            f"rotation) but its {call.op} of shapes {_shape(call.lhs)} x {_shape(call.rhs)} "
            "has no single weight operand to pair it with; remove the layer from the method."
        )
    act: Side = "rhs" if side == "lhs" else "lhs"
    axes = call.layout(act)[0] if call.layout is not None else None
    if call.rebuild is None or axes is None or len(axes) != 1:
        raise ValueError(
            f"{where}: it has an online input transform, which needs a dot_general / "
            f"einsum / matmul with one contracted activation axis; this {call.op} "
            + ("contracts several axes" if axes else "cannot take one")
            + ". Remove the layer from the method."
        )
    x = call.lhs if act == "lhs" else call.rhs
    y = act_transform.apply(transform, x, axes[0] % np.ndim(x), where)
    return call.rebuild(y, call.rhs) if act == "lhs" else call.rebuild(call.lhs, y)


def _inner_jit(frame: Any, module: Any) -> bool:
    """Whether a ``jax.jit``-compiled function lies between the contraction and the module
    method running it: jax caches that function's trace by its arguments, so a quantized
    trace would be reused wherever else it is called (outside the model too)."""
    if module is None:
        return False
    while frame is not None:
        if frame.f_locals.get("self") is module:
            return False
        if frame.f_globals.get("__name__", "") == "jax._src.pjit":
            return True
        frame = frame.f_back
    return False


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x))


def _floating(x: Any) -> bool:
    dt = getattr(x, "dtype", None)
    return dt is not None and jnp.issubdtype(dt, jnp.floating)


_SIDES: tuple[Side, Side] = ("lhs", "rhs")


def _roles(
    lhs: Any, rhs: Any, params: list[tuple[str, Any]]
) -> tuple[Role | None, str | None, bool | None]:
    """``(side, parameter name, transposed)``. ``side``: ``"lhs"`` / ``"rhs"``, the operand
    that is a parameter (or its full transpose, or has the shape of one or of its
    transpose); None: neither; ``"both"``: a product of parameters; ``"ambiguous"``: both
    only have a parameter's shape. ``transposed`` is None for a square parameter matched by
    shape (``w`` and ``w.T`` look alike)."""
    for i, x in enumerate((lhs, rhs)):
        src, flipped = _source(x)
        for name, p in params:
            if src is p:
                other = _source((rhs, lhs)[i])[0]
                if any(other is q for _, q in params):
                    return "both", None, False
                return _SIDES[i], name, flipped
    found: list[tuple[str, bool | None] | None] = []
    for x in (lhs, rhs):
        hit: tuple[str, bool | None] | None = None
        if _floating(x) and np.ndim(x) >= 1:
            for name, p in params:
                if np.ndim(p) < 1 or not (_floating(p) or isinstance(p, QArray)):
                    continue
                if _shape(x) == _shape(p)[::-1] == _shape(p):
                    hit = (name, None)  # a square parameter: w or w.T, shape cannot tell
                    break
                if _shape(x) == _shape(p):
                    hit = (name, False)
                    break
                if _shape(x) == _shape(p)[::-1]:
                    hit = (name, True)
                    break
        found.append(hit)
    if found[0] and found[1]:
        return "ambiguous", None, False
    for i, hit in enumerate(found):
        if hit is not None:
            return _SIDES[i], hit[0], hit[1]
    return None, None, False


def _decide(call: Call, owner: Owner, inner_jit: bool = False) -> Any:
    rule = owner.rule
    side, param, transposed = _roles(call.lhs, call.rhs, owner.params())
    param = param or None  # "": a weight the model computes (convert has nothing to store)
    shapes = (_shape(call.lhs), _shape(call.rhs))
    dims: tuple[tuple[int, ...] | None, tuple[int, ...]] = (None, ())
    if (side == "lhs" or side == "rhs") and call.layout is not None:
        try:
            dims = call.layout(side)
        except (ValueError, TypeError):  # a malformed call: the op itself will say so
            dims = (None, ())

    def record(quantized: bool, reason: str) -> None:
        owner.record(
            Contraction(
                owner.path,
                owner.module,
                call.op,
                shapes,
                None if side == "ambiguous" else side,
                quantized,
                reason,
                param,
                transposed,
                *dims,
            )
        )

    if rule is None:
        record(False, "no rule matches the module")
        return call.original()
    if not rule.quantizes:
        record(False, f"rule {rule.pattern!r} keeps it in float")
        return call.original()
    if side is None:
        record(False, "both operands are activations (rules quantize weight contractions)")
        return call.original()
    if side == "both":
        record(False, "both operands are parameters (the product of weights is a weight)")
        return call.original()
    problem = None
    if inner_jit:
        problem = (
            "it runs inside a jax.jit-compiled function the module calls, and jax caches "
            "that function's trace: a quantized trace would be reused wherever else it is "
            "called (and calibration cannot see out of it). Call the function without its "
            "own jit inside the module (the model's jit compiles it anyway)"
        )
    elif side == "ambiguous":
        problem = (
            f"both operands have the shape of a parameter of the module ({shapes[0]}, "
            f"{shapes[1]}); jaxquant cannot tell which one is the weight"
        )
    elif rule.stateful and owner.stateful is None:
        problem = (
            f"rule {rule.pattern!r} is stateful (delayed scaling, LSQ or stochastic rounding), "
            f"and this front end keeps no state for a contraction that {owner.module} "
            "computes itself; give this module a stateless rule listed before it"
        )
    elif rule.stateful and (side != "rhs" or call.step is None):
        problem = (
            f"rule {rule.pattern!r} is stateful, and its step takes a dot_general / einsum "
            "whose weight is the second operand"
            + ("; here it is the first" if side == "lhs" else f"; this is a {call.op}")
        )
    elif call.quantized is None:
        problem = call.why_not
    observe = _observer.get()
    if observe is not None:  # calibration: the float model, its activations recorded
        if inner_jit:
            raise ValueError(f"calibrate: {owner.path or '(the model itself)'!r}: {problem}.")
        if side == "lhs" or side == "rhs":
            x = call.rhs if side == "lhs" else call.lhs
            observe(owner.path, rule, x, Site(call, side, param, transposed))
        return call.original()
    if problem is not None:
        msg = (
            f"quantize_model: a weight contraction ({call.op}, operands {shapes[0]} x "
            f"{shapes[1]}) in {owner.module} at {owner.path or '(the model itself)'!r} stays in "
            f"float: {problem}. Exclude the module with an earlier Rule(pattern) without specs "
            "to keep it in float on purpose, or pass strict=False to only warn."
        )
        record(False, problem)
        if owner.strict:
            raise ValueError(msg)
        warnings.warn(msg, UserWarning, stacklevel=4)
        return call.original()
    cfg = rule.config
    weight_first = side == "lhs"
    weight_spec = cfg.weight
    if transposed is None and owner.path in _serving.get():
        weight_spec = None  # stored values as they are: re-quantizing needs the layout
    lhs_spec, rhs_spec = (weight_spec, cfg.act) if weight_first else (cfg.act, weight_spec)
    record(True, f"rule {rule.pattern!r}")
    probed = (
        owner.probe is not None
        and owner.stateful is not None
        and side == "rhs"
        and call.step is not None
        and (probe_lib.delays_grad(owner.probe, cfg) or probe_lib.measures(owner.probe, cfg))
    )  # a product the probe cannot reach (a conv, a weight on the left) runs unprobed
    with _at(owner.path):
        if rule.stateful or probed:
            assert owner.stateful is not None
            bound = cfg.replace(
                weight=_bind(cfg.weight, call.rhs, dims), act=_bind(cfg.act, call.lhs, None)
            )
            return owner.stateful(call, bound)
        assert call.quantized is not None  # else `problem` was set and returned above
        product = call.quantized
        return gated(owner.path, lambda: product(lhs_spec, rhs_spec, cfg), call.original)


def _bind(
    spec: QuantSpec | None, x: Any, dims: tuple[tuple[int, ...] | None, tuple[int, ...]] | None
) -> QuantSpec | None:
    """A layout-relative spec bound to operand ``x``'s axes (a stateful step keeps one
    scale per group across calls, so its groups must be explicit)."""
    if spec is None or not follows_layout(spec.granularity):
        return spec
    if dims is None or dims[0] is None:
        raise ValueError(
            f"{spec.granularity} follows a contraction's layout, unknown for this operand; "
            "give the axes explicitly (e.g. per_channel(-1))"
        )
    return bind(spec, _shape(x), dims[0], dims[1])[0]


# ----------------------------------------------------------- the replaced functions


def _kw(cfg: QuantConfig) -> dict[str, Any]:
    return {
        "grad_spec": cfg.grad,
        "mode": cfg.mode,
        "ste": cfg.ste,
        "backward": cfg.backward,
        "hadamard": cfg.hadamard,
    }


def _conv_backward(cfg: QuantConfig) -> dict[str, Any]:
    """The config's ``backward`` / ``hadamard`` for jq.conv_general_dilated, which takes
    ``"saved"`` / None only and refuses the others by name at run time (never silently
    saved): typed loosely here for that reason."""
    return {"backward": cfg.backward, "hadamard": cfg.hadamard}


def _dot_general_call(
    op: str,
    lhs: Any,
    rhs: Any,
    dn: Any,
    precision: Any,
    pet: Any,
    original: Callable[[], Any],
    out_sharding: Any = None,
) -> Call:
    def quantized(ls: QuantSpec | None, rs: QuantSpec | None, cfg: QuantConfig) -> Any:
        return jq_dot_general(
            lhs,
            rhs,
            dn,
            precision,
            pet,
            lhs_spec=ls,
            rhs_spec=rs,
            out_sharding=out_sharding,
            **_kw(cfg),
        )

    why = ""
    product: Quantized | None = quantized
    if getattr(lhs, "dtype", None) != getattr(rhs, "dtype", None):
        product, why = None, "the operands' dtypes differ (cast them to one dtype)"

    def layout(side: Side) -> Axes:
        return dot_layout(dn, side, np.ndim(lhs if side == "lhs" else rhs))

    step = {
        "dimension_numbers": dn,
        "precision": precision,
        "preferred_element_type": pet,
        "out_sharding": out_sharding,
    }

    def rebuild(a: Any, b: Any) -> Call:
        # jaxquant's own call of lax.dot_general is not intercepted (_from_jaxquant)
        kw = {} if out_sharding is None else {"out_sharding": out_sharding}

        def float_product() -> Any:
            return jax.lax.dot_general(a, b, dn, precision, pet, **kw)

        return _dot_general_call(op, a, b, dn, precision, pet, float_product, out_sharding)

    return Call(op, lhs, rhs, original, product, why, layout, step, rebuild)


def _make_dot_general(orig: Callable[..., Any]) -> Callable[..., Any]:
    def dot_general(
        lhs: Any,
        rhs: Any,
        dimension_numbers: Any,
        precision: Any = None,
        preferred_element_type: Any = None,
        **kw: Any,
    ) -> Any:
        frame = sys._getframe(1)

        def original() -> Any:
            return orig(lhs, rhs, dimension_numbers, precision, preferred_element_type, **kw)

        extra = set(kw) - {"out_sharding"}
        if extra:
            call = Call("dot_general", lhs, rhs, original, None, f"unsupported arguments {extra}")
        else:
            call = _dot_general_call(
                "dot_general",
                lhs,
                rhs,
                dimension_numbers,
                precision,
                preferred_element_type,
                original,
                kw.get("out_sharding"),
            )
        return _route(call, frame)

    return dot_general


def _matmul_dn(a: Any, b: Any, op: str) -> tuple[tuple[Axes, Axes] | None, str]:
    """``lax.dot_general`` dimension numbers of ``jnp.dot`` / ``jnp.matmul`` (or a reason)."""
    na, nb = np.ndim(a), np.ndim(b)
    none: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
    if na == 0 or nb == 0:
        return None, "a scalar operand (an elementwise product, not a contraction)"
    if op == "dot":  # numpy.dot: a's last axis with b's second-to-last (or only) axis
        return (((na - 1,), (max(nb - 2, 0),)), none), ""
    if nb <= 2:  # (..., k) @ (k,) and (..., m, k) @ (k, n)
        return (((na - 1,), (0,)), none), ""
    if na == 1:  # (k,) @ (..., k, n)
        return (((0,), (nb - 2,)), none), ""
    if na == nb and _shape(a)[:-2] == _shape(b)[:-2]:
        batch = tuple(range(na - 2))
        return (((na - 1,), (nb - 2,)), (batch, batch)), ""
    return None, (
        f"a broadcasting batched matmul ({_shape(a)} @ {_shape(b)}); write it as "
        "jnp.einsum or lax.dot_general with matching batch axes"
    )


def _make_matmul(orig: Callable[..., Any], op: str) -> Callable[..., Any]:
    def matmul(
        a: Any, b: Any, precision: Any = None, preferred_element_type: Any = None, **kw: Any
    ) -> Any:
        frame = sys._getframe(1)
        pet = preferred_element_type

        def original() -> Any:
            return orig(a, b, precision=precision, preferred_element_type=pet, **kw)

        dn, why = _matmul_dn(a, b, op)
        if dn is None or set(kw) - {"out_sharding"}:
            return _route(Call(op, a, b, original, None, why or f"arguments {set(kw)}"), frame)
        call = _dot_general_call(op, a, b, dn, precision, pet, original, kw.get("out_sharding"))
        return _route(call, frame)

    return matmul


def _operator_call(a: Any, b: Any, original: Callable[[], Any]) -> Call | None:
    if not hasattr(a, "shape") or not hasattr(b, "shape"):
        return None  # a Python scalar / list: jax's own rules
    dn, why = _matmul_dn(a, b, "matmul")
    if dn is None:
        return Call("@", a, b, original, None, why)
    return _dot_general_call("@", a, b, dn, None, None, original)


def _make_operator(orig: Callable[[Any, Any], Any], reverse: bool) -> Callable[[Any, Any], Any]:
    # ArrayImpl.__matmul__ / __rmatmul__ (concrete arrays, eager).
    def op(self: Any, other: Any) -> Any:
        frame = sys._getframe(1)
        a, b = (other, self) if reverse else (self, other)
        call = _operator_call(a, b, lambda: orig(self, other))
        return orig(self, other) if call is None else _route(call, frame)

    return op


def _make_aval_op(orig: Callable[[Any, Any], Any], reverse: bool) -> Callable[[Any, Any], Any]:
    # ShapedArray._matmul(tracer, other), a staticmethod: the `@` of tracers, reached
    # through Tracer.__matmul__ (one jax frame between the caller and here).
    def op(tracer: Any, other: Any) -> Any:
        frame = sys._getframe(2)
        a, b = (other, tracer) if reverse else (tracer, other)
        call = _operator_call(a, b, lambda: orig(tracer, other))
        return orig(tracer, other) if call is None else _route(call, frame)

    return op


def _einsum_call(
    subscripts: str, a: Any, b: Any, kw: dict[str, Any], original: Callable[[], Any] | None
) -> Call:
    """A two-operand einsum as a :class:`Call` (``original=None``: jaxquant's own float
    einsum of these operands, which the interception lets through)."""

    def own_float() -> Any:
        return jnp.einsum(subscripts, a, b, **kw)

    def quantized(ls: QuantSpec | None, rs: QuantSpec | None, cfg: QuantConfig) -> Any:
        return jq_einsum(
            subscripts,
            a,
            b,
            lhs_spec=ls,
            rhs_spec=rs,
            precision=kw.get("precision"),
            preferred_element_type=kw.get("preferred_element_type"),
            **_kw(cfg),
        )

    why = ""
    product: Quantized | None = quantized
    if getattr(a, "dtype", None) != getattr(b, "dtype", None):
        product, why = None, "the operands' dtypes differ (cast them to one dtype)"

    def layout(side: Side) -> Axes:
        la, lb, lo = parse_subscripts(subscripts, np.ndim(a), np.ndim(b))
        mine, other = (la, lb) if side == "lhs" else (lb, la)
        contracting = tuple(i for i, c in enumerate(mine) if c in other and c not in lo)
        batch = tuple(i for i, c in enumerate(mine) if c in other and c in lo)
        return contracting, batch

    step = {
        "subscripts": subscripts,
        "precision": kw.get("precision"),
        "preferred_element_type": kw.get("preferred_element_type"),
    }

    def rebuild(x: Any, y: Any) -> Call:
        return _einsum_call(subscripts, x, y, kw, None)

    return Call("einsum", a, b, original or own_float, product, why, layout, step, rebuild)


def _make_einsum(orig: Callable[..., Any]) -> Callable[..., Any]:
    def einsum(subscripts: Any, *operands: Any, **kw: Any) -> Any:
        frame = sys._getframe(1)

        def original() -> Any:
            return orig(subscripts, *operands, **kw)

        if len(operands) != 2 or not isinstance(subscripts, str):
            why = f"an einsum of {len(operands)} operands (jq.einsum takes two)"
            if len(operands) < 2:
                return original()
            lhs, rhs = operands[:2]
            return _route(Call("einsum", lhs, rhs, original, None, why), frame)
        a, b = operands
        extra = set(kw) - {"precision", "preferred_element_type", "optimize"}
        if kw.get("out") is not None or extra - {"out"}:
            why = f"unsupported einsum arguments {sorted(extra)}"
            return _route(Call("einsum", a, b, original, None, why), frame)

        return _route(_einsum_call(subscripts, a, b, kw, original), frame)

    return einsum


def _make_conv(orig: Callable[..., Any]) -> Callable[..., Any]:
    def conv_general_dilated(lhs: Any, rhs: Any, *args: Any, **kw: Any) -> Any:
        frame = sys._getframe(1)

        def original() -> Any:
            return orig(lhs, rhs, *args, **kw)

        def quantized(ls: QuantSpec | None, rs: QuantSpec | None, cfg: QuantConfig) -> Any:
            if ls is not None and rs is None and cfg.weight is not None:
                raise ValueError("the conv's weight must be its rhs (kernel) operand")
            kwargs = dict(kw)
            if kwargs.pop("out_sharding", None) is not None:
                raise ValueError("a quantized conv takes no out_sharding")
            ste = cfg.ste
            if ste == "lsq":  # stateful: _decide routes LSQ to the front end's step, not here
                raise ValueError("a quantized conv takes no LSQ rule (ste='lsq')")
            kwargs.update(_conv_backward(cfg))
            return jq_conv(
                lhs,
                rhs,
                *args,
                lhs_spec=ls,
                rhs_spec=rs,
                grad_spec=cfg.grad,
                ste=ste,
                **kwargs,
            )

        def layout(side: Side) -> Axes:
            dn = kw.get("dimension_numbers", args[4] if len(args) > 4 else None)
            x = lhs if side == "lhs" else rhs
            return conv_layout(dn, np.ndim(x), side)[0], ()

        call = Call("conv_general_dilated", lhs, rhs, original, quantized, "", layout)
        return _route(call, frame)

    return conv_general_dilated


def _targets() -> list[tuple[Any, str, Maker]]:
    from jax._src import core  # the `@` of tracers goes through their aval's _matmul

    out: list[tuple[Any, str, Maker]] = [
        (jax.lax, "dot_general", _make_dot_general),
        (jax.lax, "conv_general_dilated", _make_conv),
        (jnp, "einsum", _make_einsum),
        (jnp, "dot", lambda f: _make_matmul(f, "dot")),
        (jnp, "matmul", lambda f: _make_matmul(f, "matmul")),
    ]
    array_type = type(jnp.zeros(()))
    for cls in (array_type,):
        out.append((cls, "__matmul__", lambda f: _make_operator(f, False)))
        out.append((cls, "__rmatmul__", lambda f: _make_operator(f, True)))
    # Full transposes (`w.T`, `w.transpose()`, `jnp.transpose(w)`) are remembered, so a
    # square parameter used transposed is known as such (its shape cannot tell).
    out.append((jnp, "transpose", _make_transpose))
    holders: tuple[type | None, ...] = (array_type, getattr(core, "ShapedArray", None))
    for holder in holders:
        for name in ("T", "transpose"):
            d = None if holder is None else holder.__dict__.get(name)
            inner = getattr(d, "fun", None) or getattr(d, "fget", None)
            if holder is not None and (isinstance(d, property) or callable(d) or inner):
                out.append((holder, name, _descriptor_wrapper(holder.__dict__[name])))
    aval = getattr(core, "ShapedArray", None)
    if aval is not None and isinstance(aval.__dict__.get("_matmul"), staticmethod):
        out.append((aval, "_matmul", lambda f: staticmethod(_make_aval_op(f, False))))
        out.append((aval, "_rmatmul", lambda f: staticmethod(_make_aval_op(f, True))))
    return out


_transposes: contextvars.ContextVar[dict[int, tuple[Any, Any]] | None] = contextvars.ContextVar(
    "jaxquant_transposes", default=None
)


def _remember(out: Any, src: Any, args: tuple[Any, ...]) -> Any:
    seen = _transposes.get()
    ndim = np.ndim(src)
    axes = args[0] if len(args) == 1 and isinstance(args[0], tuple | list) else args
    if seen is not None and (not axes or tuple(axes) == tuple(range(ndim))[::-1]):
        seen[id(out)] = (out, src)
    return out


def _make_transpose(orig: Callable[..., Any]) -> Callable[..., Any]:
    def transpose(a: Any, axes: Any = None, **kw: Any) -> Any:
        return _remember(orig(a, axes, **kw), a, () if axes is None else (axes,))

    return transpose


def _descriptor_wrapper(d: Any) -> Maker:
    """A maker for the tracked version of ``T`` / ``transpose`` of arrays and avals: a
    property, a plain function, or jax's aval_method / aval_property wrappers."""

    def track(fn: Callable[..., Any]) -> Callable[..., Any]:
        def tracked(a: Any, *args: Any, **kw: Any) -> Any:
            return _remember(fn(a, *args, **kw), a, args)

        return tracked

    def make(_current: Any) -> Any:
        if isinstance(d, property) and d.fget is not None:
            return property(track(d.fget))
        if hasattr(d, "fun"):
            return type(d)(track(d.fun))
        if hasattr(d, "fget"):
            return type(d)(track(d.fget))
        return track(d)

    return make


def _source(x: Any) -> tuple[Any, bool]:
    """``(array, transposed)``: what ``x`` is a (repeated) full transpose of."""
    seen = _transposes.get() or {}
    flips = False
    while id(x) in seen and seen[id(x)][0] is x:
        x, flips = seen[id(x)][1], not flips
    return x, flips


def _install() -> None:
    global _installed
    with _lock:
        if _installed == 0:
            for owner, name, make in _targets():
                # The descriptor itself (a staticmethod), or _MISSING where the class
                # inherits it (the patch then shadows it, and uninstall deletes it).
                raw = owner.__dict__.get(name, _MISSING) if isinstance(owner, type) else None
                _originals[(owner, name)] = getattr(owner, name) if raw is None else raw
                setattr(owner, name, make(getattr(owner, name)))
        _installed += 1


def _uninstall() -> None:
    global _installed
    with _lock:
        _installed -= 1
        if _installed == 0:
            for (owner, name), orig in _originals.items():
                if orig is _MISSING:
                    delattr(owner, name)
                else:
                    setattr(owner, name, orig)
            _originals.clear()


@contextlib.contextmanager
def serving(path: str) -> Iterator[None]:
    """Run the body with the module at ``path`` on its own dequantized QArray parameters."""
    token = _serving.set(_serving.get() | {path})
    try:
        yield
    finally:
        _serving.reset(token)


@contextlib.contextmanager
def observing(fn: Callable[..., None], *, site: bool = False) -> Iterator[None]:
    """Run the body with weight contractions in float, their activations passed to ``fn``
    as ``fn(path, rule, x)`` (calibration), or ``fn(path, rule, x, site)`` with
    ``site=True``: a :class:`Site`, for statistics that need the contracted axes
    (:mod:`jaxquant._src.flax.statistics`). Nest inside :func:`intercepting`."""

    def observe(path: str, rule: Rule, x: Any, where: Site) -> None:
        if site:
            fn(path, rule, x, where)
        else:
            fn(path, rule, x)

    token = _observer.set(observe)
    try:
        yield
    finally:
        _observer.reset(token)


@contextlib.contextmanager
def intercepting(front: Frontend) -> Iterator[None]:
    """Run the body with every contraction routed through ``front`` (see the module)."""
    token = _active.set((*_active.get(), front))
    seen = _transposes.set(_transposes.get() if _transposes.get() is not None else {})
    _install()
    try:
        yield
    finally:
        _uninstall()
        _transposes.reset(seen)
        _active.reset(token)
