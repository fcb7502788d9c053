"""Quantized ``dot_general`` / ``einsum`` with a custom VJP and real int8 / fp8 compute.

The package, one concept per module: :mod:`.capabilities` (what each backend multiplies
natively, and the one lowering chosen for it: every backend workaround), :mod:`.scaled`
(the scaled dot shared by training and serving), :mod:`.vjp` (the custom VJP),
:mod:`.serving` (products with a pre-quantized :class:`~jaxquant.QArray` weight),
:mod:`.subscripts` (einsum parsing) and :mod:`.checks` (argument checks). This module holds
the public entry points.

For operands ``a`` and ``b`` quantized symmetrically with scales ``s_a``, ``s_b`` that are
constant along the contracted axes::

    dot(a_hat, b_hat) = dot(q_a * s_a, q_b * s_b) = dot(q_a, q_b) * (s_a (x) s_b)

where ``q`` are the values on the format's grid and ``(x)`` is the outer product of the
per-row / per-column scales laid out like the output (batch, lhs free, rhs free). The dot
of the grid values runs in low precision when the hardware has it:

* int8 x int8: ``lax.dot_general(int8, int8, preferred_element_type=int32)`` (exact integer
  accumulation; overflows only past ``2^31 / 127^2 ~ 133 000`` contracted elements, or
  ``2^31 / 128^2 ~ 131 000`` for ``int_grid="full"`` operands, whose code ``-128`` times
  ``-128`` is the largest product);
* fp8 x fp8 (e4m3fn / e5m2, any mix the backend supports):
  ``lax.dot_general(f8, f8, preferred_element_type=float32)``;
* otherwise (other formats, mixed int8/fp8, no hardware support) the grid values are held
  in float32 and multiplied by a float32 dot ("emulated"). Grid values are exact in
  float32 (and in TF32 / bf16, which GPUs and TPUs use for a default-precision float32
  dot, for every format of at most 8 bits but NF4), so only the accumulation order
  differs from the real path.

:func:`dot_capabilities` says which of these the backend runs natively; ``mode="auto"``
follows it, ``mode="real"`` always emits the int8 / fp8 ``dot_general`` (on CPU, XLA then
converts fp8 operands to f32 itself), ``mode="emulate"`` never does.

Operands whose scales change along a contracted axis (per-block and MX specs, a
per-channel scale on a contracted axis) cannot be factored out; with ``mode="auto"`` or
``"emulate"`` such an operand is quantized and dequantized (float32) before a float dot --
weight-only int4 groups, MX recipes -- and ``mode="real"`` refuses it.

NaN: the emulated path propagates NaN like ``fake_quant``; int8 storage, having no NaN,
stores it as 0 (as :func:`jaxquant.quantize` does).
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant._src import opargs
from jaxquant._src.checks import describe
from jaxquant._src.config import Backward as BackwardMode
from jaxquant._src.config import QuantConfig
from jaxquant._src.dot.capabilities import CUBLASLT_FP8_PAIRS as _CUBLASLT_FP8_PAIRS  # noqa: F401
from jaxquant._src.dot.capabilities import FP8_LOWERING as _FP8_LOWERING
from jaxquant._src.dot.capabilities import GPU_INT8_MIN as _GPU_INT8_MIN
from jaxquant._src.dot.capabilities import NATIVE_FP8_CAST as _NATIVE_FP8_CAST
from jaxquant._src.dot.capabilities import Capabilities
from jaxquant._src.dot.capabilities import probe as _capabilities
from jaxquant._src.dot.checks import (
    bind_operand,
    check_operand,
    check_spec,
    hashable,
    normalize_dn,
    operands_error,
    out_aval,
    real_pair,
)
from jaxquant._src.dot.serving import dot_qarray
from jaxquant._src.dot.subscripts import plan as einsum_plan
from jaxquant._src.dot.vjp import DotConfig, plan_backward, qdot_jit
from jaxquant._src.granularity import PerBlock
from jaxquant._src.hadamard import DotHadamard
from jaxquant._src.qarray import QArray, check_array
from jaxquant._src.quantize import check_operand_scale
from jaxquant._src.spec import QuantSpec

__all__ = ["Capabilities", "dot_capabilities", "dot_general", "einsum"]

Array = jax.Array
Mode = Literal["auto", "real", "emulate"]
SAVED: Any = opargs.Unset("saved")


def resolve_backward(
    fn: str, config: QuantConfig | None, backward: Any, hadamard: Any
) -> tuple[BackwardMode, DotHadamard | None]:
    """``backward`` and ``hadamard`` from ``config`` or from the loose keywords (never both),
    checked like :class:`QuantConfig`'s fields."""
    loose = {"backward": backward, "hadamard": hadamard}
    given = [k for k, v in loose.items() if not isinstance(v, opargs.Unset)]
    if config is not None:
        if given:
            raise ValueError(
                f"{fn}: got config= and {', '.join(k + '=' for k in given)}; the config "
                f"says how the products are quantized. Drop {given[0]}=, or change the "
                f"config with config.replace({given[0]}=...)."
            )
        return config.backward, config.hadamard
    values = {k: v.value if isinstance(v, opargs.Unset) else v for k, v in loose.items()}
    # The checks of QuantConfig's fields, naming the keyword.
    QuantConfig(**values)
    return values["backward"], values["hadamard"]


def backend_capabilities() -> Capabilities:
    """The default backend's :class:`Capabilities`. The backend probe and the GPU switches
    are read from this package's names at each call (``_capabilities``, ``_FP8_LOWERING``,
    ``_NATIVE_FP8_CAST``, ``_GPU_INT8_MIN``): tests and benchmarks set them on
    ``jaxquant._src.dot`` to force a path (tests/test_dot.py, benchmarks/train_step.py)."""
    return Capabilities.from_dict(
        _capabilities(jax.default_backend()),
        fp8_output=_FP8_LOWERING,
        native_fp8_cast=_NATIVE_FP8_CAST,
        gpu_int8_min=_GPU_INT8_MIN,
    )


def dot_capabilities(backend: str | None = None) -> dict[str, Any]:
    """Whether ``backend`` multiplies int8 and fp8 operands natively.

    Decides the path of :func:`dot_general` with ``mode="auto"``: real int8 needs
    ``"int8"``, real fp8 needs ``"fp8"`` and the pair of fp8 formats in ``"fp8_pairs"``.

    * CPU: int8 real (XLA:CPU compiles an s8 x s8 -> s32 dot); fp8 emulated (XLA:CPU runs
      an fp8 dot_general by converting the operands to f32 first).
    * CUDA GPU: int8 real (compute capability >= 6.1); fp8 real from compute capability 8.9
      (Ada, Hopper, Blackwell) for e4m3 x e4m3, e4m3 x e5m2 and e5m2 x e4m3.
    * TPU: int8 real, fp8 emulated. ROCm: int8 real, fp8 emulated.

    Args:
      backend: ``"cpu"``, ``"gpu"``, ``"tpu"``...; default ``jax.default_backend()``.

    Returns:
      A dict with ``backend``, ``platform``, ``device_kind``, ``compute_capability`` (None
      when the device has none), ``int8`` and ``fp8`` (bool), ``fp8_pairs`` (tuple of
      (lhs, rhs) dtype names), ``int8_path`` and ``fp8_path`` (explanations).

    Example:
      >>> import jaxquant as jq
      >>> caps = jq.dot_capabilities("cpu")
      >>> caps["int8"], caps["fp8"]
      (True, False)
    """
    if backend is None:
        return dict(_capabilities(jax.default_backend()))
    if not isinstance(backend, str):
        raise TypeError(
            f"dot_capabilities: backend must be a backend name such as 'cpu', 'gpu' or 'tpu' "
            f"(or None for the default), got {describe(backend)}."
        )
    try:
        jax.devices(backend)
    except RuntimeError as err:  # unknown, or known but not present on this machine
        raise ValueError(
            f"dot_capabilities: backend {backend!r} is not available here ({err}). Pass one of "
            "this process's backends, or None for jax.default_backend()."
        ) from None
    return dict(_capabilities(backend))


def dot_general(
    lhs: jax.typing.ArrayLike,
    rhs: jax.typing.ArrayLike,
    dimension_numbers: Any,
    precision: Any = None,
    preferred_element_type: jax.typing.DTypeLike | None = None,
    *,
    config: QuantConfig | None = None,
    lhs_spec: QuantSpec | None = opargs.NONE,
    rhs_spec: QuantSpec | None = opargs.NONE,
    grad_spec: QuantSpec | None = opargs.NONE,
    lhs_scale: jax.typing.ArrayLike | None = None,
    rhs_scale: jax.typing.ArrayLike | None = None,
    grad_scale: jax.typing.ArrayLike | None = None,
    key: Array | None = None,
    mode: Mode = opargs.AUTO,
    ste: Literal["plain", "clipped"] = opargs.PLAIN,
    out_sharding: Any = None,
    backward: Literal["saved", "requantize"] = SAVED,
    hadamard: DotHadamard | None = opargs.NONE,
) -> Array:
    """Quantized ``jax.lax.dot_general``: real int8 / fp8 matmuls, quantized gradients.

    Forward: ``dot_general(Q_lhs(lhs), Q_rhs(rhs))`` computed as
    ``dot(q_lhs, q_rhs) * (s_lhs (x) s_rhs)`` (see the module docstring), returned in
    ``preferred_element_type`` (default: ``lax.dot_general``'s result dtype). Backward:
    straight-through for both quantizers; the output gradient is quantized with
    ``grad_spec`` and multiplied with the saved quantized operands.

    A drop-in for ``lax.dot_general`` (same positional arguments, ``out_sharding`` too), so
    ``functools.partial(jq.dot_general, config=cfg)`` can be given to
    ``flax.linen.Dense(dot_general=...)`` or ``flax.nnx.Linear(dot_general=...)``.

    What is quantized comes either whole from ``config`` (a :class:`QuantConfig`: ``act``
    quantizes ``lhs``, ``weight`` quantizes ``rhs``, ``grad`` the output gradient, with its
    ``mode``, ``ste``, ``backward`` and ``hadamard``) or from the loose keywords
    ``lhs_spec``, ``rhs_spec``, ``grad_spec``, ``mode``, ``ste``, ``backward`` and
    ``hadamard``; the two give bit-identical results, and passing both is a ValueError.

    Args:
      lhs, rhs: the operands. A quantized operand must be floating point.
      dimension_numbers: ``((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))``.
      config: a :class:`QuantConfig` with ``scaling="current"`` and ``ste`` ``"plain"`` or
        ``"clipped"`` (delayed scales and learned steps are state: pass ``lhs_scale`` /
        ``rhs_scale`` yourself, or use :func:`jaxquant.flax.quantize_model`), or None.
      precision, preferred_element_type, out_sharding: as in ``lax.dot_general``
        (``precision`` applies to the float dots; ``out_sharding`` to the forward dot).
      lhs_spec, rhs_spec: symmetric :class:`QuantSpec` per operand, or None to leave it in
        its dtype. Scales must be constant along the contracted axes: ``per_tensor()``,
        ``per_channel`` / ``per_token`` over non-contracted axes (e.g. ``per_token(-1)``
        for activations ``(..., tokens, features)`` and ``per_channel(-1)`` for a
        ``(in, out)`` kernel). Anything else raises ValueError with ``mode="real"``.
        ``per_channel()`` and ``per_block(size)`` (no axis) follow the operand's layout in
        this product: one scale per index of every axis it does not contract, blocks along
        its innermost contraction axis that ``size`` divides (a fallback, when none does,
        is a UserWarning).
      grad_spec: :class:`QuantSpec` for the output gradient (e.g. e5m2, per-tensor,
        optionally ``rounding="stochastic"``), or None to keep it in its dtype. With
        ``backward="requantize"`` a per-block gradient spec (``per_block(16)``, MX, NVFP4)
        gets its blocks along each backward product's contracted axes.
      lhs_scale, rhs_scale, grad_scale: known scales (static or delayed scaling, see
        :func:`delayed_scaling`), broadcastable to the plan's scale shape; they skip
        calibration and get no gradient.
      key: PRNG key for stochastic specs: ``fold_in(key, 0)`` rounds ``lhs``,
        ``fold_in(key, 1)`` ``rhs`` and ``fold_in(key, 2)`` the gradient.
      mode: ``"auto"`` (real int8 / fp8 dot where :func:`dot_capabilities` of the default
        backend says so), ``"real"`` (always call ``lax.dot_general`` on int8 / fp8 arrays;
        needs both operand specs int8 or both fp8) or ``"emulate"`` (float32 dot of the
        grid values).
      ste: the operands' straight-through estimator: ``"plain"`` passes the gradient
        through the quantizer; ``"clipped"`` zeroes it where the operand saturated.
      backward: ``"saved"`` (the backward products multiply the forward's quantized
        operands) or ``"requantize"`` (each backward product quantizes its block-scaled
        operands again from float, blocks along its own contracted axes: what an FP4 / MX
        GEMM runs); see :class:`QuantConfig`.
      hadamard: a :class:`~jaxquant.rotations.DotHadamard` (Hadamard transforms of both
        operands of chosen products along their contracted axis before quantization), or
        None.

    Returns:
      The product, shaped like ``lax.dot_general``'s.

    Raises:
      ValueError: scales that vary along a contracted axis (per-block, MX, a per-channel
        axis that is contracted) with ``mode="real"``, a Hadamard-rotated axis whose length
        is not a multiple of the block, asymmetric specs, a stochastic spec without ``key``,
        ``mode="real"`` for operand formats without a low-precision dot, ``config`` with
        a loose keyword or with state.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> x, w = jnp.ones((2, 3)), jnp.full((3, 4), 0.5)
      >>> y = jq.dot_general(x, w, (((1,), (0,)), ((), ())),
      ...                    lhs_spec=jq.QuantSpec("int8", jq.per_token(-1)),
      ...                    rhs_spec=jq.QuantSpec("int8", jq.per_channel(-1)))
      >>> y.tolist()
      [[1.5, 1.5, 1.5, 1.5], [1.5, 1.5, 1.5, 1.5]]
      >>> cfg = jq.QuantConfig(act=jq.QuantSpec("int8", jq.per_token(-1)),
      ...                      weight=jq.QuantSpec("int8", jq.per_channel(-1)))
      >>> bool((jq.dot_general(x, w, (((1,), (0,)), ((), ())), config=cfg) == y).all())
      True
      >>> w3 = jnp.full((2, 3, 4), 0.5)    # per_channel() follows the layout: axis 2 here
      >>> y3 = jq.dot_general(x, w3, (((1,), (1,)), ((), ())),
      ...                     rhs_spec=jq.QuantSpec("int8", jq.per_channel()))
      >>> y3.shape
      (2, 2, 4)

    References:
      Micikevicius et al., "FP8 Formats for Deep Learning", https://arxiv.org/abs/2209.05433;
      Jacob et al., "Quantization and Training of Neural Networks for Efficient
      Integer-Arithmetic-Only Inference", https://arxiv.org/abs/1712.05877
    """
    fn = "dot_general"
    q = opargs.resolve(
        fn, config, lhs_spec=lhs_spec, rhs_spec=rhs_spec, grad_spec=grad_spec, mode=mode, ste=ste
    )
    lhs_spec, rhs_spec, grad_spec = q["lhs_spec"], q["rhs_spec"], q["grad_spec"]
    mode, ste = q["mode"], q["ste"]
    backward, hadamard = resolve_backward(fn, config, backward, hadamard)
    dn = normalize_dn(dimension_numbers)
    if isinstance(lhs, QArray):
        raise TypeError(
            f"{fn}: a QArray must be the rhs (the weight); the lhs is the float activation. "
            "Swap the operands (and the dimension numbers), or dequantize() it."
        )
    lhs = check_array(lhs, f"{fn}: lhs")
    if not isinstance(rhs, QArray):
        rhs = check_array(rhs, f"{fn}: rhs")
    if preferred_element_type is not None:
        try:
            np.dtype(preferred_element_type)
        except TypeError:
            raise TypeError(
                f"{fn}: preferred_element_type must be a dtype such as jnp.float32, or None, "
                f"got {describe(preferred_element_type)}."
            ) from None
    if isinstance(rhs, QArray):
        if rhs_spec is not None or grad_spec is not None or rhs_scale is not None:
            raise ValueError(
                f"{fn}: rhs is a QArray, already quantized with {rhs.spec}; pass no "
                "rhs_spec / rhs_scale / grad_spec, nor a config with a weight or grad spec "
                "(it has no gradient)."
            )
        if hadamard is not None and "fwd" in hadamard.gemms:
            raise ValueError(
                f"{fn}: rhs is a QArray, quantized without a Hadamard transform; "
                "hadamard with 'fwd' would rotate only lhs. Drop 'fwd' from "
                "DotHadamard.gemms, or quantize the float weight in the product."
            )
        if lhs_scale is not None or key is not None or mode == "emulate" or ste != "plain":
            raise ValueError(
                f"{fn}: with a QArray rhs (serving), lhs is quantized by lhs_spec alone: a "
                "static scale is lhs_spec.replace(calibration=jq.fixed(amax)); lhs_scale, "
                "key, mode='emulate' and ste do not apply."
            )
        lhs_spec = check_spec(lhs_spec, "lhs_spec", fn) if lhs_spec is not None else None
        out_aval(lhs, rhs, dn, preferred_element_type, fn)  # shape errors naming operands
        lhs_spec = bind_operand(lhs_spec, lhs.shape, dn[0][0], dn[1][0], "lhs", fn)
        return dot_qarray(
            lhs,
            rhs,
            dn,
            precision,
            preferred_element_type,
            lhs_spec=lhs_spec,
            out_sharding=out_sharding,
            caps=backend_capabilities(),
        )
    lhs_spec = check_spec(lhs_spec, "lhs_spec", fn)
    rhs_spec = check_spec(rhs_spec, "rhs_spec", fn)
    grad_spec = check_spec(grad_spec, "grad_spec", fn)
    if mode not in ("auto", "real", "emulate"):
        raise ValueError(f"{fn}: mode must be 'auto', 'real' or 'emulate', got {mode!r}.")
    if ste not in ("plain", "clipped"):
        raise ValueError(
            f"{fn}: ste must be 'plain' or 'clipped', got {ste!r} (learned step sizes: "
            "Rule(ste='lsq') in jaxquant.flax, or jq.lsq_fake_quant on the operand)."
        )
    kw = {} if out_sharding is None else {"out_sharding": out_sharding}
    if lhs_spec is None and rhs_spec is None and grad_spec is None:
        try:
            return lax.dot_general(lhs, rhs, dn, precision, preferred_element_type, **kw)
        except TypeError as err:
            raise operands_error(lhs, rhs, dn, err, fn) from None
    out = out_aval(lhs, rhs, dn, preferred_element_type, fn)  # dimension numbers checked
    (lc, rc), (lb, rb) = dn
    # per_channel() / per_block(size) follow each operand's own contraction and batch axes.
    lhs_spec = bind_operand(lhs_spec, lhs.shape, lc, lb, "lhs", fn)
    rhs_spec = bind_operand(rhs_spec, rhs.shape, rc, rb, "rhs", fn)
    check_operand(lhs_spec, lhs, lc, lb, "lhs", mode)
    check_operand(rhs_spec, rhs, rc, rb, "rhs", mode)
    # backward="requantize" places a per-block gradient's blocks itself (each backward
    # product's contracted axes), so per_block(size) needs no axis there.
    moves = backward == "requantize" and isinstance(
        getattr(grad_spec, "granularity", None), PerBlock
    )
    if grad_spec is not None and not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"{fn}: grad_spec needs a floating-point output, got {out.dtype}.")
    if grad_spec is not None and not moves:
        try:  # axis errors now, not in the backward pass
            grad_spec.granularity.plan(tuple(out.shape))
        except ValueError as e:
            raise ValueError(
                f"{fn}: grad_spec {grad_spec} does not fit the output gradient, of shape "
                f"{tuple(out.shape)}: {e} For MX / per-block gradients the output's "
                "blocked axis must be a multiple of the block size; keep such a layer in "
                "float or give it a per-tensor grad_spec."
            ) from None
    for name, spec in (("lhs_spec", lhs_spec), ("rhs_spec", rhs_spec), ("grad_spec", grad_spec)):
        if spec is not None and spec.stochastic and key is None:
            raise ValueError(
                f"{fn}: {name} rounds stochastically and needs a PRNG key: pass "
                "key=jax.random.key(seed) (split it per step)."
            )
    if mode == "real" and not real_pair(lhs_spec, rhs_spec):
        names = [s.format.name if s else "None" for s in (lhs_spec, rhs_spec)]
        raise ValueError(
            f"{fn}: mode='real' needs both operands int8 or both fp8 (e4m3 / e5m2), got "
            f"lhs {names[0]} and rhs {names[1]}. Use mode='auto' or 'emulate'."
        )
    lhs_scale, rhs_scale, grad_scale = (
        check_operand_scale(x, spec, scale, name=f"{fn}: {name}")
        for name, x, spec, scale in (
            ("lhs_scale", lhs, lhs_spec, lhs_scale),
            ("rhs_scale", rhs, rhs_spec, rhs_scale),
            ("grad_scale", out, grad_spec, grad_scale),
        )
    )
    caps = backend_capabilities()
    plan = plan_backward(
        dn,
        (tuple(lhs.shape), tuple(rhs.shape), tuple(out.shape)),
        (lhs_spec, rhs_spec, grad_spec),
        backward=backward,
        hadamard=hadamard,
        mode=mode,
        caps=caps,
        scales=(lhs_scale is not None, rhs_scale is not None, grad_scale is not None),
        fn=fn,
    )
    cfg = DotConfig.build(
        dn,
        (lhs_spec, rhs_spec, grad_spec),
        mode=mode,
        caps=caps,
        precision=hashable(precision),
        dtypes=(lhs.dtype, rhs.dtype, out.dtype),
        out_sharding=out_sharding,
        ste=ste,
        backward=plan,
    )

    def opt(s: jax.typing.ArrayLike | None) -> Array | None:
        return None if s is None else jnp.asarray(s, jnp.float32)

    return qdot_jit(cfg, lhs, rhs, opt(lhs_scale), opt(rhs_scale), opt(grad_scale), key)


def einsum(
    subscripts: str,
    a: jax.typing.ArrayLike,
    b: jax.typing.ArrayLike,
    *,
    config: QuantConfig | None = None,
    lhs_spec: QuantSpec | None = opargs.NONE,
    rhs_spec: QuantSpec | None = opargs.NONE,
    grad_spec: QuantSpec | None = opargs.NONE,
    lhs_scale: jax.typing.ArrayLike | None = None,
    rhs_scale: jax.typing.ArrayLike | None = None,
    grad_scale: jax.typing.ArrayLike | None = None,
    precision: Any = None,
    preferred_element_type: jax.typing.DTypeLike | None = None,
    key: Array | None = None,
    mode: Mode = opargs.AUTO,
    ste: Literal["plain", "clipped"] = opargs.PLAIN,
    backward: Literal["saved", "requantize"] = SAVED,
    hadamard: DotHadamard | None = opargs.NONE,
) -> Array:
    """Quantized two-operand ``jnp.einsum``, computed by :func:`dot_general`.

    Labels in both operands and the output are batch axes, in both operands only are
    contracted, in one operand and the output are free. ``...`` and implicit outputs work
    as in numpy. Specs refer to the operands' own axes (``per_channel(-1)`` is the last
    axis of that operand). Labels summed within one operand (``"ij,jk->k"``'s ``i``) and
    repeated labels (traces, diagonals) are refused: sum or slice the operand first.

    Args:
      subscripts: e.g. ``"btd,df->btf"``.
      a, b: the operands.
      config, lhs_spec, rhs_spec, grad_spec, lhs_scale, rhs_scale, grad_scale: as in
        :func:`dot_general` (``lhs`` is ``a``: ``config.act`` quantizes ``a``,
        ``config.weight`` quantizes ``b``).
      precision, preferred_element_type, key, mode, ste, backward, hadamard: as in
        :func:`dot_general`.

    Returns:
      The product, with the output labels' axis order.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> y = jq.einsum("btd,df->btf", jnp.ones((2, 3, 4)), jnp.ones((4, 5)),
      ...               lhs_spec=jq.QuantSpec("e4m3"), rhs_spec=jq.QuantSpec("e4m3"))
      >>> y.shape, round(float(y[0, 0, 0]), 5)
      ((2, 3, 5), 4.0)
      >>> cfg = jq.QuantConfig(act=jq.QuantSpec("e4m3"), weight=jq.QuantSpec("e4m3"))
      >>> y2 = jq.einsum("btd,df->btf", jnp.ones((2, 3, 4)), jnp.ones((4, 5)), config=cfg)
      >>> bool((y2 == y).all())
      True
    """
    if not isinstance(subscripts, str):
        raise TypeError(
            f"einsum: subscripts must be a str such as 'btd,df->btf', got {describe(subscripts)}."
        )
    if isinstance(a, QArray):
        raise TypeError(
            "einsum: a QArray must be b (the weight); a is the float activation. Swap the "
            "operands (and their subscripts), or pass jq.dequantize(a)."
        )
    a = check_array(a, "einsum: a")
    b = b if isinstance(b, QArray) else check_array(b, "einsum: b")
    dn, perm = einsum_plan(subscripts, tuple(a.shape), tuple(b.shape))
    q = opargs.resolve(
        "einsum",
        config,
        lhs_spec=lhs_spec,
        rhs_spec=rhs_spec,
        grad_spec=grad_spec,
        mode=mode,
        ste=ste,
    )
    backward, hadamard = resolve_backward("einsum", config, backward, hadamard)
    out = dot_general(
        a,
        b,
        dn,
        precision,
        preferred_element_type,
        lhs_scale=lhs_scale,
        rhs_scale=rhs_scale,
        grad_scale=grad_scale,
        key=key,
        backward=backward,
        hadamard=hadamard,
        **q,
    )
    return out if perm is None else jnp.transpose(out, perm)
