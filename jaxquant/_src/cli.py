"""The ``jaxquant`` command line: look at formats, numbers and quantization step by step.

Subcommands::

    jaxquant formats [--json] [--kind float|int|codebook|mx]
    jaxquant explain 0.3 --format fp32 fp16 bf16
    jaxquant explain 0b11111111 --format int8 uint8
    jaxquant quantize -0.5 0.3 1.2 -2.1 --format int8 [--calibration absmax|mean_std:K|
        percentile:P|mse|minmax|kl|none] [--asymmetric] [--stochastic --seed N]

Each subcommand is a :class:`Subcommand` ``(name, help, add_arguments, run)``: the core's
are :data:`SUBCOMMANDS`, an application passes its own to :func:`main` (the installed
``jaxquant`` script is :func:`jaxquant.app.cli.main`, which adds ``sweep``). ``run(args)``
prints to stdout and returns the exit status. Errors (unknown format, a bad number, a bad
calibration) print one line ``jaxquant: error: ...`` on stderr and exit with status 2
(usage) or 1 (library).

``quantize`` prints numbers computed by the library itself -- the calibration object, the
``compute_scale`` rule, the quantizer core and :func:`jaxquant.fake_quant` -- never a
re-implementation that could disagree with it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant._src import calibration as cal
from jaxquant._src import formats, rounding
from jaxquant._src import metrics as qmetrics
from jaxquant._src import quantize as qz
from jaxquant._src.explain import explain
from jaxquant._src.extras import MissingExtraError
from jaxquant._src.spec import QuantSpec

PROG = "jaxquant"


class Subcommand(NamedTuple):
    """One ``jaxquant NAME`` subcommand: ``add_arguments(parser)`` declares its options,
    ``run(args)`` prints to stdout and returns the exit status.

    The core defines ``formats``, ``explain`` and ``quantize``; an application adds its own
    (the ``jaxquant`` console script adds :mod:`jaxquant.app`'s ``sweep``) by passing them to
    :func:`main`.

    Example:
      >>> import jaxquant.cli
      >>> hello = jaxquant.cli.Subcommand(
      ...     "hello", "say hello", lambda p: None, lambda args: print("hello") or 0
      ... )
      >>> jaxquant.cli.main(["hello"], commands=[hello])
      hello
      0
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """A command-line usage error (bad option, bad number): exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


# --------------------------------------------------------------------- argument types


def _number(text: str) -> float:
    try:
        return float(text.strip().replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text.strip()!r} is not a number (examples: 0.3, -2.1, 1e-3, inf)"
        ) from None


def _value_or_pattern(text: str) -> str:
    """explain's VALUE: a number or a bit pattern (0b..., 0x...), checked here."""
    t = text.strip()
    if t.lower().startswith(("0b", "0x")):
        return t
    _number(t)
    return t


_CALIBRATIONS = "absmax, minmax, mean_std[:K], percentile[:P], mse[:N], kl or none"


def parse_calibration(text: str) -> cal.Calibration | None:
    """``absmax`` / ``minmax`` / ``mean_std:K`` / ``percentile:P`` / ``mse:N`` / ``kl`` /
    ``none`` (no scaling: a plain cast, ``s = 1``)."""
    name, _, arg = text.strip().lower().partition(":")
    name = name.replace("-", "_")
    makers: dict[str, tuple[Callable[..., cal.Calibration], Callable[[str], object] | None]] = {
        "absmax": (cal.absmax, None),
        "max": (cal.absmax, None),
        "minmax": (cal.minmax, None),
        "mean_std": (cal.mean_std, float),
        "meanstd": (cal.mean_std, float),
        "percentile": (cal.percentile, float),
        "mse": (cal.mse, int),
        "kl": (cal.kl, None),
    }
    if name == "none" and not arg:
        return None
    if name not in makers:
        raise argparse.ArgumentTypeError(
            f"unknown calibration {text!r}; use {_CALIBRATIONS} (e.g. mean_std:3, percentile:99.9)"
        )
    make, conv = makers[name]
    if not arg:
        return make()
    if conv is None:
        raise argparse.ArgumentTypeError(f"calibration {name!r} takes no parameter, got {text!r}")
    try:
        param = conv(arg)
    except ValueError:
        kind = "an integer" if conv is int else "a number"
        raise argparse.ArgumentTypeError(
            f"bad calibration {text!r}: {arg!r} is not {kind}"
        ) from None
    try:
        return make(param)
    except ValueError as err:  # out of range, e.g. mean_std:-1
        raise argparse.ArgumentTypeError(f"bad calibration {text!r}: {err}") from None


def _protect_negative_numbers(argv: Sequence[str]) -> list[str]:
    """Keep negative numbers (``-2.1``, ``-1e-3``, ``-inf``) positional, not options.

    argparse already treats ``-2.1`` as a value, but not ``-1e-3`` or ``-inf``; a leading
    space makes any token positional, and ``float`` ignores it.
    """
    out = []
    for a in argv:
        if re.fullmatch(r"-(\d|\.\d|inf|nan|infinity).*", a, flags=re.IGNORECASE):
            try:
                float(a)
            except ValueError:
                pass
            else:
                a = " " + a
        out.append(a)
    return out


# --------------------------------------------------------------------------- formats


_FORMAT_COLUMNS = (
    ("name", "name"),
    ("kind", "kind"),
    ("bits", "bits"),
    ("E", "exp_bits"),
    ("M", "man_bits"),
    ("bias", "bias"),
    ("max", "max"),
    ("min normal", "min_normal"),
    ("min subnormal", "min_subnormal"),
    ("eps", "eps"),
    ("digits", "decimal_digits"),
    ("inf", "inf"),
    ("nan", "nan"),
    ("codes", "codes"),
    ("range dB", "dynamic_range_db"),
)


def _cell(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v == int(v) and abs(v) < 1e7:
            return str(int(v))
        return f"{v:.6g}"
    return str(v)


def _add_formats(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--kind",
        choices=("float", "int", "codebook", "mx"),
        help="only formats of this kind",
    )


def _run_formats(args: argparse.Namespace) -> int:
    fmts = [f for f in formats.all_formats() if args.kind is None or f.kind == args.kind]
    props = [f.properties() for f in fmts]
    if args.json:
        print(json.dumps(props, indent=2))
        return 0
    rows = [[h for h, _ in _FORMAT_COLUMNS]]
    rows += [[_cell(p[k]) for _, k in _FORMAT_COLUMNS] for p in props]
    print(_table(rows, left=2))
    print()
    print(
        "bits: storage bits per value (MX, NVFP4: with the block scales; NVFP4 adds "
        "4 bytes per tensor). E/M: exponent/mantissa "
        "bits. eps: the gap above 1. digits: significant decimal digits. range dB: "
        "20·log10(max / min subnormal)."
    )
    return 0


def _table(rows: list[list[str]], left: int = 1) -> str:
    """Columns padded to width: the first ``left`` left-aligned, the rest right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [
            f"{c:<{w}}" if i < left else f"{c:>{w}}"
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


# --------------------------------------------------------------------------- explain


def _add_explain(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "value",
        type=_value_or_pattern,
        help="a number (0.3, -2.1, 1e-8, inf, nan) or a bit pattern (0b11111111, 0x3c00)",
    )
    p.add_argument(
        "-f",
        "--format",
        nargs="+",
        default=["float32"],
        metavar="FORMAT",
        help="one format, or several to compare side by side (default: float32)",
    )


def _run_explain(args: argparse.Namespace) -> int:
    fmts = [formats.get(f) for f in args.format]  # unknown names fail before any work
    value = args.value.strip()
    print(explain(value, fmts[0] if len(fmts) == 1 else fmts))
    return 0


# -------------------------------------------------------------------------- quantize


def _add_quantize(p: argparse.ArgumentParser) -> None:
    p.add_argument("values", nargs="+", type=_number, metavar="X", help="the numbers to quantize")
    p.add_argument("-f", "--format", default="int8", help="target format (default: int8)")
    p.add_argument(
        "-c",
        "--calibration",
        type=parse_calibration,
        default=cal.absmax(),
        metavar="CAL",
        help=f"how the range is chosen: {_CALIBRATIONS} (default: absmax)",
    )
    p.add_argument(
        "--asymmetric",
        action="store_true",
        help="zero-point quantization (integer formats): q = clip(round(x / s) + z)",
    )
    p.add_argument(
        "--full-grid",
        action="store_true",
        help="symmetric signed ints: all 2^b codes, s = amax / (qmax + 0.5) (int_grid='full'; "
        "the default already is for int2 / int3, papers/int_grids)",
    )
    p.add_argument(
        "--stochastic", action="store_true", help="stochastic rounding instead of nearest-even"
    )
    p.add_argument("--seed", type=int, default=0, help="PRNG seed for --stochastic (default 0)")


class Steps(NamedTuple):
    """Every intermediate of one quantization, each computed by the library (float32)."""

    spec: QuantSpec
    x: np.ndarray  # the input
    lo: np.ndarray  # calibrated range, per scale group
    hi: np.ndarray
    scale: np.ndarray  # per scale group
    zero_point: np.ndarray | None
    y: np.ndarray  # x / s, per element
    rounded: np.ndarray  # y rounded, before saturation (codebooks: y clipped)
    q: np.ndarray  # the quantized values (the numbers they stand for; codebooks: values)
    indices: np.ndarray | None  # codebook indices
    x_hat: np.ndarray  # jq.fake_quant(x, spec)


def quantize_steps(x: jax.Array, spec: QuantSpec, key: jax.Array | None = None) -> Steps:
    """Run the library's quantizer on a 1-D ``x`` and keep every intermediate.

    One implementation: the calibrated range, scale, zero point, scaled and rounded values
    and ``x_hat`` all come from one compiled call of the quantizer core that
    :func:`jaxquant.fake_quant` and :func:`jaxquant.quantize` run (``quantize.trace``).
    """
    st, x_hat = qz.trace(x, spec, key)
    plan = st.plan
    z = st.z
    u = None
    if spec.stochastic:
        bits = qz.noise_bits(spec, key, plan.view)
        assert bits is not None  # a stochastic spec always draws bits
        u = rounding.uniform_from_bits(bits)
    elem = spec.element
    index = None
    if elem.kind == "int":
        pre = rounding.round_to_integer(st.y, u)
        if z is not None:
            pre = pre + z
    elif u is not None and rounding.is_float32_prefix(elem):
        bits = qz.noise_bits(spec, key, plan.view)
        pre = rounding.round_float32_prefix(st.y, elem, bits, saturate=False)
    elif elem.kind == "float":
        pre = rounding.round_float(st.y, elem, u, saturate=False)
        if not elem.signed:
            pre = jnp.maximum(pre, 0.0)
    else:
        assert elem.codebook is not None
        pre = jnp.clip(st.y, elem.codebook[0], elem.codebook[-1])
        index = np.asarray(st.r, np.int32).reshape(-1)
    q = qz.to_grid(st.r, spec)
    zeros = jnp.zeros(plan.scale_shape, jnp.float32)
    lo = zeros if st.lo is None else st.lo
    hi = zeros if st.hi is None else st.hi

    def flat(a: jax.Array) -> np.ndarray:
        return np.asarray(jnp.broadcast_to(a, plan.view), np.float32).reshape(-1)

    return Steps(
        spec=spec,
        x=np.asarray(x, np.float32),
        lo=np.asarray(lo, np.float32).reshape(-1),
        hi=np.asarray(hi, np.float32).reshape(-1),
        scale=np.asarray(st.s, np.float32).reshape(-1),
        zero_point=None if z is None else np.asarray(z, np.float32).reshape(-1),
        y=flat(st.y),
        rounded=flat(pre),
        q=flat(q),
        indices=index,
        x_hat=np.asarray(x_hat, np.float32),
    )


def _f(v: float | np.floating) -> str:
    """The shortest text that reads back as the same float32."""
    v = np.float32(v)
    if np.isnan(v):
        return "NaN"
    if np.isinf(v):
        return "inf" if v > 0 else "-inf"
    return str(v)


def _q(v: float | np.floating, integer: bool) -> str:
    if integer and np.isfinite(v):
        return str(int(v))
    return _f(v)


def _list(a: np.ndarray, integer: bool = False) -> str:
    return "[" + ", ".join(_q(v, integer) for v in a) + "]"


def _run_quantize(args: argparse.Namespace) -> int:
    spec = QuantSpec(
        args.format,
        calibration=args.calibration,
        symmetric=not args.asymmetric,
        rounding="stochastic" if args.stochastic else "nearest",
        int_grid="full" if args.full_grid else "auto",
    )
    key = jax.random.key(args.seed) if args.stochastic else None
    big = [v for v in args.values if np.isfinite(v) and abs(v) > float(np.finfo(np.float32).max)]
    if big:
        raise UsageError(
            f"argument X: {big[0]!r} is beyond float32's range (max 3.4028235e+38), which the "
            "quantizer works in; pass a smaller number, or inf to see how infinity is handled."
        )
    x = jnp.asarray(np.asarray(args.values, np.float32))
    print(render_steps(quantize_steps(x, spec, key), seed=args.seed if key is not None else None))
    return 0


def render_steps(st: Steps, seed: int | None = None) -> str:
    """The worked example: every step of ``st`` with its numbers."""
    spec = st.spec
    fmt, elem = spec.format, spec.element
    qmin, qmax = spec.qrange
    is_int = elem.kind == "int"
    sym = spec.symmetric
    one = st.scale.size == 1
    rnd = (
        f"stochastic rounding, seed {seed}" if spec.stochastic else "round to nearest, ties to even"
    )
    calib = f"{spec.calibration} calibration" if spec.calibration is not None else "no scaling"
    kind = "symmetric" if sym else "asymmetric with a zero point"
    if spec.int_grid == "full":
        kind += ", full grid: all 2^b codes"
    n = st.x.size
    out = [
        f"Quantize {n} value{'s' if n != 1 else ''} to {fmt.name} ({kind}, {calib}, {rnd})",
        "",
        f"  x = {_list(st.x)}",
        "",
    ]
    out.append(f"1. range:       {_range_text(st)}")
    out.append(f"2. scale:       {_scale_text(st)}")
    ys = "x / s"
    lo_q, hi_q = _q(qmin, True), _q(qmax, True)
    if elem.kind == "int":
        rounded = "round(x / s)" if sym else "round(x / s) + z"
        rule = f"q = clip({rounded}, {lo_q}, {hi_q})"
        if spec.stochastic:
            rule += ", rounding up with probability frac(x / s)"
    elif elem.kind == "float":
        how = "a random neighbour (the nearer one more often) of" if spec.stochastic else "nearest"
        rule = f"q = the {elem.name} value {how} {ys}, saturated to ±{hi_q}"
    else:
        rule = f"q = the {elem.name} value nearest to clip({ys}, {lo_q}, {hi_q})"
    out.append(f"3. quantize:    {rule}")
    out.append(f"4. dequantize:  {'x_hat = q × s' if sym else 'x_hat = (q - z) × s'}")
    out.append("")
    out += ["  " + line for line in _steps_table(st).splitlines()]
    out.append("")
    xj, xh = jnp.asarray(st.x), jnp.asarray(st.x_hat)
    sqnr = float(qmetrics.sqnr(xj, xh))
    mae = float(qmetrics.max_abs_error(xj, xh))
    mse = float(qmetrics.mse(xj, xh))
    sq = "inf (exact)" if math.isinf(sqnr) else f"{sqnr:.2f} dB"
    out.append(f"5. error:       max|x - x_hat| = {_f(mae)}, MSE = {mse:.4g}")
    out.append(f"                SQNR = 10·log10(Σx² / Σ(x - x_hat)²) = {sq}")
    out.append("")
    out.append(f"quantized:     q = {_list(st.q, is_int)}  ({elem.name})")
    if st.indices is not None:
        out.append(f"indices:       {_list(st.indices.astype(np.float32), True)}")
    out.append(f"dequantized:   x_hat = {_list(st.x_hat)}")
    vbytes = math.ceil(n * elem.bits / 8)
    sbytes = st.scale.size * spec.scale_format.bits // 8
    plural = "s" if st.scale.size > 1 else ""
    storage = (
        f"{n} × {elem.bits} bits = {vbytes} byte{'s' if vbytes != 1 else ''} + "
        f"{st.scale.size} {spec.scale_format.name} scale{plural} ({sbytes} bytes)"
    )
    if st.zero_point is not None:
        storage += f" + {st.zero_point.size} zero point{plural}"
    if fmt.tensor_scale:
        storage += " + 1 float32 scale per tensor (4 bytes)"
    out.append(f"storage:       {storage}; as float32: {4 * n} bytes")
    if not one:
        out.append(f"               (one scale per block of {fmt.block_size or n} values)")
    return "\n".join(out)


def _range_text(st: Steps) -> str:
    spec = st.spec
    fmt = spec.format
    one = st.scale.size == 1
    if spec.calibration is None:
        return "none: no scaling, s = 1 (a plain cast to the format)"
    if not spec.symmetric and fmt.kind != "mx":
        if not one:
            return f"[lo, hi] per group: lo = {_list(st.lo)}, hi = {_list(st.hi)}"
        text = f"[lo, hi] = [{_f(st.lo[0])}, {_f(st.hi[0])}]"
        lo0, hi0 = min(float(st.lo[0]), 0.0), max(float(st.hi[0]), 0.0)
        if (lo0, hi0) != (float(st.lo[0]), float(st.hi[0])):
            text += f", widened to contain 0: [{_f(lo0)}, {_f(hi0)}]"
        return text
    amax = _amax(st)
    val = _f(amax[0]) if one else _list(amax)
    name = _amax_name(st)
    if isinstance(spec.calibration, cal.AbsMax):
        return f"{name} = {val}"
    finite = st.x[np.isfinite(st.x)]
    true_max = float(np.max(np.abs(finite), initial=0.0))
    return f"{name} = {val}  ({spec.calibration} clips the range; max|x| = {_f(true_max)})"


def _amax(st: Steps) -> np.ndarray:
    qmin = st.spec.qrange[0]
    if qmin >= 0 and st.spec.format.kind != "mx":  # unsigned: only the positive side counts
        return np.maximum(st.hi, 0.0)
    return np.maximum(-st.lo, st.hi)


def _amax_name(st: Steps) -> str:
    if not isinstance(st.spec.calibration, cal.AbsMax):
        return "amax"
    unsigned = st.spec.qrange[0] >= 0 and st.spec.format.kind != "mx"
    return "max(x, 0)" if unsigned else "max|x|"


def _scale_text(st: Steps) -> str:
    spec = st.spec
    fmt, elem = spec.format, spec.element
    qmin, qmax = spec.qrange
    one = st.scale.size == 1
    s_val = _f(st.scale[0]) if one else _list(st.scale)
    if spec.calibration is None:
        return "s = 1"
    if fmt.kind == "mx" and fmt.tensor_scale:
        return (
            f"s = b / S = {s_val}  (NVFP4: S = 2688 / max|x| per tensor, "
            "b = e4m3(block max|x| * S / 6) per block)"
        )
    if fmt.kind == "mx" and elem.kind == "int":
        return f"s = 2^(floor(log2 max|x|) - 6) = {s_val}  (OCP MXINT8: int8 codes, implied 2^-6)"
    if fmt.kind == "mx":
        return (
            f"s = 2^(floor(log2 max|x|) - {elem.emax}) = {s_val}  (OCP MX: a power of two, "
            f"{elem.emax} being the exponent of {elem.name}'s largest value)"
        )
    if not spec.symmetric:
        assert st.zero_point is not None
        if not one:
            return f"s = (hi - lo) / (qmax - qmin) = {s_val}; z = {_list(st.zero_point, True)}"
        span = max(float(st.hi[0]), 0.0) - min(float(st.lo[0]), 0.0)
        return (
            f"s = (hi - lo) / (qmax - qmin) = {_f(span)} / {_q(qmax - qmin, True)} = {s_val};"
            f"  z = clip(round(qmin - lo / s), {_q(qmin, True)}, {_q(qmax, True)}) = "
            f"{_q(st.zero_point[0], True)}"
        )
    top = {"int": "qmax", "float": "fmax", "codebook": "max|codebook|"}[elem.kind]
    if spec.int_grid == "full":  # all 2^b codes: amax maps half a step past qmax
        top = "(qmax + 0.5)"
    amax = _amax(st)
    if not one:
        return f"s = {_amax_name(st)} / {top} = {s_val}"
    if amax[0] <= 0:
        return "s = 1 (the range is 0: nothing to scale)"
    div = _f(spec.scale_divisor) if spec.int_grid == "full" else _q(qmax, True)
    text = f"s = {_amax_name(st)} / {top} = {_f(amax[0])} / {div} = {s_val}"
    if spec.scale_format.name != "float32":
        text += f" (rounded to {spec.scale_format.name})"
    return text


def _steps_table(st: Steps) -> str:
    spec = st.spec
    elem = spec.element
    is_int = elem.kind == "int"
    ys = "x / s"
    err = st.x - st.x_hat
    if elem.kind == "codebook":
        assert st.indices is not None
        rows = [["x", ys, "clip", "q (nearest)", "index", "x_hat", "x - x_hat"]]
        for i in range(st.x.size):
            rows.append(
                [
                    _f(st.x[i]),
                    _f(st.y[i]),
                    _f(st.rounded[i]),
                    _f(st.q[i]),
                    str(st.indices[i]),
                    _f(st.x_hat[i]),
                    _f(err[i]),
                ]
            )
        return _table(rows, left=0)
    rname = "random round" if spec.stochastic else "round"
    if not spec.symmetric:
        rname += "(x / s) + z"
    rows = [["x", ys, rname, "q = clip", "x_hat", "x - x_hat"]]
    clipped = False
    for i in range(st.x.size):
        r, q = st.rounded[i], st.q[i]
        mark = ""
        if not (r == q or (np.isnan(r) and np.isnan(q))):
            mark, clipped = " *", True
        rows.append(
            [
                _f(st.x[i]),
                _f(st.y[i]),
                _q(r, is_int),
                _q(q, is_int) + mark,
                _f(st.x_hat[i]),
                _f(err[i]),
            ]
        )
    text = _table(rows, left=0)
    if clipped:
        qmin, qmax = spec.qrange
        text += f"\n* saturated to [{_q(qmin, True)}, {_q(qmax, True)}]"
    return text


# ---------------------------------------------------------------------------- main

SUBCOMMANDS: list[Subcommand] = [
    Subcommand(
        "formats", "list every number format and its properties", _add_formats, _run_formats
    ),
    Subcommand(
        "explain",
        "show how a number (or a bit pattern) is stored in one or more formats",
        _add_explain,
        _run_explain,
    ),
    Subcommand(
        "quantize",
        "quantize a few numbers, printing every step (scale, rounding, clipping, error)",
        _add_quantize,
        _run_quantize,
    ),
]


def build_parser(commands: Sequence[Subcommand] = ()) -> argparse.ArgumentParser:
    """The argparse parser with one subparser per entry of :data:`SUBCOMMANDS` and of
    ``commands``."""
    parser = _Parser(
        prog=PROG,
        description="jaxquant: low-precision number formats and quantization, explained.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    names = [c.name for c in [*SUBCOMMANDS, *commands]]
    if len(set(names)) != len(names):
        raise ValueError(f"main: commands repeat a subcommand name: {names}")
    for cmd in [*SUBCOMMANDS, *commands]:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(run=cmd.run)
    return parser


# Every integer option and the values it accepts, checked after parsing (a usage error
# naming the option, never a traceback). jax.random.key keeps a seed's low 32 bits (2**32
# would repeat seed 0) and raises OverflowError past 2**63.
INT_OPTIONS: dict[str, tuple[str, int, int]] = {"seed": ("--seed", 0, 2**32 - 1)}


def _check_int_options(args: argparse.Namespace) -> None:
    for dest, (flag, lo, hi) in INT_OPTIONS.items():
        v = getattr(args, dest, None)
        if isinstance(v, int) and not isinstance(v, bool) and not lo <= v <= hi:
            raise UsageError(
                f"argument {flag}: {v} is out of range; use an integer from {lo} to {hi} "
                f"(see '{PROG} {args.command} --help')"
            )


def main(argv: Sequence[str] | None = None, *, commands: Sequence[Subcommand] = ()) -> int:
    """Run the ``jaxquant`` command line; returns the exit status (0 ok, 1 an error of the
    library or the system, 2 a usage error, 130 interrupted), with one line on stderr.

    Args:
      argv: the arguments after the program name (default ``sys.argv[1:]``).
      commands: :class:`Subcommand` entries added to the core's ``formats``, ``explain``
        and ``quantize``.

    Example:
      >>> import jaxquant.cli
      >>> jaxquant.cli.main(["formats", "--kind", "mx", "--json"]) # doctest: +ELLIPSIS
      [...
      0
    """
    args_in = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(commands)
    try:
        args = parser.parse_args(_protect_negative_numbers(args_in))
        if args.command is None:
            parser.print_help()
            return 2
        _check_int_options(args)
        return int(args.run(args))
    except UsageError as err:
        _error(str(err))
        return 2
    except MissingExtraError as err:  # names the pip extra to install
        _error(str(err))
        return 1
    except (ValueError, TypeError, OverflowError) as err:
        _error(str(err))
        return 1
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except BrokenPipeError:  # `jaxquant formats | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as err:
        _error(f"{err.strerror or err}" + (f" ({err.filename})" if err.filename else ""))
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _error(message: str) -> None:
    one_line = " ".join(message.split())
    print(f"{PROG}: error: {one_line}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
