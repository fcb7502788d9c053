"""``jq.explain``: how one number is stored in a format, bit by bit.

For a value and a format, :func:`explain` rounds the value exactly as jaxquant does
(round-to-nearest-even through :mod:`jaxquant._src.rounding`) and shows the stored value,
the rounding error, the bit pattern, and how the bits decode back into the value:

* floats: the sign, exponent and mantissa fields, the class (normal, subnormal, zero, Inf,
  NaN) and the decoding formula with its numbers, e.g. for 0.3 in float32
  ``(-1)^0 × 2^(125-127) × (1 + 1677722/2^23) = 0.300000011920929``;
* integers: the binary digits, derived by repeated division by 2 (13 -> 1101), summed back
  by powers of two, and two's complement for negative values (-1 in int8 is 11111111);
* codebooks (nf4, binary, ternary): the nearest value and its index;
* MX formats: their element format (the shared power-of-two block scale is left out).

A bit pattern (``"0b11111111"``, ``"0x3c00"`` or ``code=255``) is decoded instead of a
value, so the same bits can be read in several formats. Pass a list of formats to compare
them side by side (a :class:`Comparison`).

Casting rules (those of ml_dtypes casts, not of ``jq.quantize``, which saturates by
default): the value is first converted to float32, jaxquant's compute type, then rounded to
the nearest representable value, ties to even. Float overflow gives Inf where the format has
it, else NaN, and saturates to +-max in formats with neither (fp6, fp4); integers and
codebooks saturate.
"""

from __future__ import annotations

import dataclasses
import decimal
import html
import math
import numbers
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant._src import formats, rounding
from jaxquant._src.formats import Format

FormatLike = str | Format

# The library's rounding rules, compiled once per format (a scalar at a time).
_round_float_jit = jax.jit(rounding.round_float, static_argnames=("fmt", "saturate"))
_round_int_jit = jax.jit(rounding.round_int, static_argnames=("qmin", "qmax"))
_round_codebook_jit = jax.jit(rounding.round_codebook, static_argnames=("values",))


@dataclasses.dataclass(frozen=True, repr=False)
class Explanation:
    """How one number is stored in one format.

    Invariants: ``stored`` is exactly representable in ``element`` and its bit pattern is
    ``code`` (``bits`` in binary, ``element.bits`` digits; for codebooks the index); the
    float fields satisfy ``code = sign << (E + M) | exponent << M | mantissa``.

    Attributes:
      format: the format asked for (an MX format stays an MX format here).
      element: the format whose bits are shown (``format``, or its MX element format).
      value: the input number (for a bit-pattern input: the value the pattern decodes to).
      stored: the value actually stored (rounded, saturated or overflowed).
      abs_error: ``|stored - value|`` (0 when they are equal, Inf included; NaN for NaN).
      rel_error: ``abs_error / |value|`` (0 when both are 0; Inf for a zero value stored
        as non-zero; NaN for non-finite values).
      code: the bit pattern as an unsigned integer (codebooks: the value's index).
      bits: ``code`` in binary, ``element.bits`` digits.
      category: ``"normal"``, ``"subnormal"``, ``"zero"``, ``"inf"``, ``"nan"`` (floats),
        ``"integer"`` or ``"codebook"``.
      sign_bits, exponent_bits, mantissa_bits: the float fields as bit strings ("" where a
        format has no sign bit); None for non-floats.
      sign, exponent, mantissa: the float fields' integer values; None for non-floats.
      formula: how the bits decode into ``stored``, with the numbers filled in.
      division: integers >= 0: the repeated division by 2, as ``(n, n // 2, n % 2)`` rows.
      twos_complement: negative integers: ``(|v| in binary, bits inverted, plus one)``.
      powers_sum: integers: the bits summed back by powers of two, e.g.
        ``"1×2^3 + 1×2^2 + 0×2^1 + 1×2^0 = 8 + 4 + 0 + 1 = 13"``.
      saturated: the value was out of range and clipped to the nearest end of the range.
      overflow: a finite value became Inf or NaN because it exceeds the format's range.
      input_code: the bit pattern given as input (``"0b11111111"``), else None.
      steps: the derivation, one line each (what the terminal rendering shows).
      notes: remarks on rounding, saturation, overflow and the format.
    """

    format: Format
    element: Format
    value: float
    stored: float
    abs_error: float
    rel_error: float
    code: int
    bits: str
    category: str
    sign_bits: str | None = None
    exponent_bits: str | None = None
    mantissa_bits: str | None = None
    sign: int | None = None
    exponent: int | None = None
    mantissa: int | None = None
    formula: str = ""
    division: tuple[tuple[int, int, int], ...] = ()
    twos_complement: tuple[str, str, str] | None = None
    powers_sum: str | None = None
    saturated: bool = False
    overflow: bool = False
    input_code: str | None = None
    steps: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    # ------------------------------------------------------------------ derived
    @property
    def is_normal(self) -> bool:
        return self.category == "normal"

    @property
    def is_subnormal(self) -> bool:
        return self.category == "subnormal"

    @property
    def is_zero(self) -> bool:
        return self.stored == 0

    @property
    def is_inf(self) -> bool:
        return self.category == "inf"

    @property
    def is_nan(self) -> bool:
        return self.category == "nan"

    @property
    def index(self) -> int | None:
        """Codebooks: the index of the stored value (``code``); None for other formats."""
        return self.code if self.category == "codebook" else None

    @property
    def exact(self) -> bool:
        """Whether the value is stored without any error."""
        return self.abs_error == 0

    @property
    def grouped_bits(self) -> str:
        """``bits`` with spaces between the sign, exponent and mantissa fields (floats)."""
        if self.exponent_bits is None:
            return self.bits
        parts = (self.sign_bits, self.exponent_bits, self.mantissa_bits)
        return " ".join(p for p in parts if p)

    # ----------------------------------------------------------------- rendering
    def _rows(self) -> list[tuple[str, str]]:
        e = self.element
        rows: list[tuple[str, str]] = []
        if self.input_code is not None:
            rows.append(("input", f"bit pattern {self.input_code}"))
        else:
            text = _num(self.value)
            with np.errstate(over="ignore"):
                x32 = float(np.float32(self.value))
            if math.isfinite(self.value) and x32 != self.value and self.element.bits < 32:
                text += f"  (as float32, jaxquant's compute type: {_num(x32)})"
            rows.append(("input", text))
        stored = _num(self.stored)
        exact = _exact_decimal(self.stored)
        if exact is not None and exact != stored:
            stored += f"  (exactly {exact})"
        rows.append(("stored", stored))
        if self.input_code is None:
            rows.append(("error", _error_text(self)))
        rows.append(("bits", self.grouped_bits))
        if e.kind == "float":
            assert self.exponent is not None and self.mantissa is not None
            if self.sign_bits:
                rows.append(("sign", f"{self.sign_bits} -> {'-' if self.sign else '+'}"))
            if self.category in ("inf", "nan") and e.nan_style == "ieee":
                rows.append(("exponent", f"{self.exponent_bits} = {self.exponent} (all ones)"))
                rows.append(("mantissa", f"{self.mantissa_bits} = {self.mantissa}"))
            elif self.category == "nan":
                rows.append(("exponent", f"{self.exponent_bits} = {self.exponent}"))
                rows.append(("mantissa", f"{self.mantissa_bits} = {self.mantissa}"))
            else:
                unb = _unbiased(e, self.exponent, self.category)
                rows.append(
                    (
                        "exponent",
                        f"{self.exponent_bits} = {self.exponent} -> "
                        f"2^({unb[0]}-{e.bias}) = 2^{unb[1]}",
                    )
                )
                if e.man_bits:
                    lead = 0 if self.category in ("subnormal", "zero") else 1
                    frac = lead + self.mantissa / 2**e.man_bits
                    rows.append(
                        (
                            "mantissa",
                            f"{self.mantissa_bits} = {self.mantissa} -> "
                            f"{lead} + {self.mantissa}/2^{e.man_bits} = {_num(frac)}",
                        )
                    )
            rows.append(("class", self.category))
            rows.append(("value", self.formula))
        elif e.kind == "codebook":
            rows.append(("index", f"{self.code} (of {e.num_codes} values)"))
            rows.append(("value", self.formula))
        for i, line in enumerate(self.steps):
            rows.append(("derivation" if i == 0 else "", line))
        for i, line in enumerate(self.notes):
            rows.append(("note" if i == 0 else "", line))
        return rows

    def title(self) -> str:
        """One line: what is explained in which format."""
        what = self.input_code if self.input_code is not None else _num(self.value)
        name = self.format.name
        if self.element is not self.format:
            name += f" (element {self.element.name})"
        return f"{what} in {name}: {describe_format(self.format)}"

    def __str__(self) -> str:
        rows = self._rows()
        width = max(len(k) for k, _ in rows)
        lines = [self.title()]
        lines += [f"  {k:<{width}}  {v}".rstrip() for k, v in rows]
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        cells = []
        for k, v in self._rows():
            if k == "bits":
                v_html = _bits_html(self)
            else:
                v_html = html.escape(v)
            cells.append(
                f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
                f"<td style='text-align:left;font-family:monospace'>{v_html}</td></tr>"
            )
        return (
            f"<table><caption style='text-align:left'><b>{html.escape(self.title())}</b>"
            f"</caption>{''.join(cells)}</table>"
        )


@dataclasses.dataclass(frozen=True, repr=False)
class Comparison:
    """The same input explained in several formats, shown side by side.

    Iterable and indexable: ``cmp[0]`` is the :class:`Explanation` for the first format.
    """

    explanations: tuple[Explanation, ...]

    def __iter__(self) -> Iterator[Explanation]:
        return iter(self.explanations)

    def __len__(self) -> int:
        return len(self.explanations)

    def __getitem__(self, i: int) -> Explanation:
        return self.explanations[i]

    def _table(self) -> tuple[list[str], list[tuple[str, list[str]]]]:
        ex = self.explanations
        header = [e.format.name for e in ex]
        rows: list[tuple[str, list[str]]] = [
            ("layout", [_layout(e.element) for e in ex]),
            ("stored", [_num(e.stored) for e in ex]),
        ]
        if any(e.input_code is None for e in ex):
            rows.append(("abs error", [_num(e.abs_error, 6) for e in ex]))
            rows.append(("rel error", [_pct(e.rel_error) for e in ex]))
        rows.append(("bits", [e.grouped_bits for e in ex]))
        if any(e.element.kind == "float" for e in ex):
            rows.append(("exponent", [_field(e.exponent) for e in ex]))
            rows.append(("mantissa", [_field(e.mantissa) for e in ex]))
        rows.append(("class", [e.category for e in ex]))
        rows.append(("digits", [f"{e.element.decimal_digits:.1f}" for e in ex]))
        return header, rows

    def __str__(self) -> str:
        ex = self.explanations
        if not ex:
            return "Comparison()"
        header, rows = self._table()
        first = ex[0]
        what = first.input_code if first.input_code is not None else _num(first.value)
        table = [["", *header], *[[k, *v] for k, v in rows]]
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        lines = [f"{what} in {len(ex)} formats"]
        for r in table:
            cells = [f"{r[0]:<{widths[0]}}"] + [
                f"{c:>{w}}" for c, w in zip(r[1:], widths[1:], strict=True)
            ]
            lines.append("  " + "  ".join(cells).rstrip())
        lines.append("")
        for e in ex:
            if e.formula:
                lines.append(f"  {e.format.name}: {e.formula}")
            for n in e.notes:
                lines.append(f"  {e.format.name}: {n}")
        return "\n".join(lines).rstrip()

    __repr__ = __str__

    def _repr_html_(self) -> str:
        header, rows = self._table()
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join(
            f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
            + "".join(f"<td style='font-family:monospace'>{html.escape(c)}</td>" for c in v)
            + "</tr>"
            for k, v in rows
        )
        body += (
            "<tr><th style='text-align:left'>value</th>"
            + "".join(
                f"<td style='font-family:monospace'>{html.escape(e.formula)}</td>"
                for e in self.explanations
            )
            + "</tr>"
        )
        return f"<table><tr><th></th>{head}</tr>{body}</table>"


# --------------------------------------------------------------------------- public API


def explain(
    value: float | str | None = None,
    fmt: FormatLike | Sequence[FormatLike] | None = None,
    *,
    code: int | str | None = None,
) -> Explanation | Comparison:
    """Explain how ``value`` (or the bit pattern ``code``) is stored in ``fmt``.

    The value is converted to float32 (jaxquant's compute type), then rounded to the
    format's nearest representable value, ties to even, with the cast semantics described
    in the module docstring (float overflow -> Inf/NaN, integers saturate).

    Args:
      value: a number (``0.3``, ``-1``, ``float("nan")``, a numeric string), or a bit
        pattern string ``"0b11111111"`` / ``"0x3c00"``.
      fmt: a format name, a :class:`~jaxquant.formats.Format`, or a list of them to compare.
      code: a bit pattern to decode instead of a value: an int (``255``) or a string
        (``"0b11111111"``, ``"0xff"``, or plain binary digits ``"11111111"``).

    Returns:
      An :class:`Explanation` (a list of formats gives a :class:`Comparison`). ``str()``
      renders it for a terminal, ``_repr_html_()`` for a notebook.

    Raises:
      ValueError: unknown format name, a string that is not a number, a bit pattern wider
        than the format.
      TypeError: a value that is not a single real number.

    Example:
      >>> import jaxquant as jq
      >>> e = jq.explain(0.3, "fp16")
      >>> e.bits, e.stored
      ('0011010011001101', 0.300048828125)
      >>> jq.explain(13, "uint8").bits
      '00001101'
      >>> jq.explain("0b11111111", "int8").stored, jq.explain(code=255, fmt="uint8").stored
      (-1.0, 255.0)
    """
    if fmt is None:
        raise TypeError(
            "explain: no format given; pass one, e.g. jq.explain(0.3, 'fp16'), or a list "
            "to compare, e.g. jq.explain(0.3, ['fp32', 'fp16', 'bf16'])."
        )
    if value is not None and code is not None:
        raise ValueError(f"explain: pass a value or code=, not both (got {value!r} and {code!r}).")
    if value is None and code is None:
        raise TypeError("explain: needs a value (e.g. 0.3) or a bit pattern code= (e.g. 255).")
    if code is not None:
        pattern = _parse_code(code)
    elif isinstance(value, str) and value.strip().lower().startswith(("0b", "0x")):
        pattern = _parse_code(value)
    else:
        pattern = None
    x = None if pattern is not None else _parse_value(value)
    if isinstance(fmt, Format | str):
        return _explain_one(x, pattern, formats.get(fmt))
    if not isinstance(fmt, Sequence) or not fmt:
        raise TypeError(
            "explain: fmt must be a format name, a Format, or a non-empty list of them, got "
            f"{fmt!r}."
        )
    return Comparison(tuple(_explain_one(x, pattern, formats.get(f)) for f in fmt))


def describe_format(fmt: Format) -> str:
    """A one-line description of a format's layout and special values."""
    if fmt.kind == "mx" and fmt.tensor_scale:
        assert fmt.element is not None and fmt.block_scale is not None
        return (
            f"blocks of {fmt.block_size} {fmt.element.name} elements sharing one "
            f"{fmt.block_scale.name} scale, plus one float32 scale per tensor "
            f"({fmt.bits_per_value:g} bits per value + 4 bytes per tensor)"
        )
    if fmt.kind == "mx":
        assert fmt.element is not None
        return (
            f"blocks of {fmt.block_size} {fmt.element.name} elements sharing one "
            f"power-of-two e8m0 scale ({fmt.bits_per_value:g} bits per value)"
        )
    if fmt.kind == "int":
        if fmt.signed:
            return (
                f"signed {fmt.bits}-bit integer, two's complement, range "
                f"{int(fmt.min)}..{int(fmt.max)}"
            )
        return f"unsigned {fmt.bits}-bit integer, range 0..{int(fmt.max)}"
    if fmt.kind == "codebook":
        assert fmt.codebook is not None
        return f"codebook of {fmt.num_codes} values stored as {fmt.bits}-bit indices"
    special = {
        "ieee": "Inf and NaN",
        "fn": "no Inf, NaN = all ones",
        "fnuz": "no Inf, no -0, NaN = sign bit only",
        "none": "finite only: no Inf, no NaN",
    }[fmt.nan_style]
    return f"{_layout(fmt)} bits, bias {fmt.bias}, {special}"


# ----------------------------------------------------------------------- input parsing


def _parse_value(value: object) -> float:
    if isinstance(value, str):
        try:
            return float(value.strip().replace("_", ""))
        except ValueError:
            raise ValueError(
                f"explain: {value!r} is not a number. Pass a number such as 0.3, -2.1, 1e-8, "
                "inf or nan, or a bit pattern such as '0b11111111' or '0x3c00'."
            ) from None
    if isinstance(value, bool | np.bool_):
        raise TypeError(f"explain: expected a number, got the bool {value!r}.")
    if isinstance(value, numbers.Integral):
        n = int(value)
        try:
            return float(n)
        except OverflowError:  # a Python int beyond float64
            return math.inf if n > 0 else -math.inf
    if isinstance(value, numbers.Real):
        return float(value)
    if not hasattr(value, "dtype"):
        raise TypeError(f"explain: expected one real number, got {type(value).__name__} {value!r}.")
    arr = np.asarray(value)
    if not (arr.dtype.kind in "iuf" or str(arr.dtype).startswith(("float", "bfloat"))):
        raise TypeError(f"explain: expected one real number, got an array of dtype {arr.dtype}.")
    if arr.size != 1:
        raise TypeError(
            f"explain: expected one number, got an array of shape {arr.shape}. Explain one "
            "element at a time, or use `jaxquant quantize` / jq.quantize for arrays."
        )
    return float(arr.reshape(()).astype(np.float64))


def _parse_code(code: object) -> str:
    """Normalise a bit pattern to a '0b...' string (keeping the digits given)."""
    if isinstance(code, bool | np.bool_):
        raise TypeError(f"explain: code must be an int or a bit string, got {code!r}.")
    if isinstance(code, numbers.Integral):
        if int(code) < 0:
            raise ValueError(
                f"explain: code is a bit pattern, a non-negative int; got {code}. For the "
                "bits of a negative value, pass it as the value: jq.explain(-1, 'int8')."
            )
        return bin(int(code))
    if not isinstance(code, str):
        raise TypeError(f"explain: code must be an int or a bit string, got {code!r}.")
    s = code.strip().lower().replace("_", "").replace(" ", "")
    try:
        if s.startswith("0x"):
            n = int(s[2:], 16)
            return "0b" + format(n, f"0{4 * len(s[2:])}b")
        digits = s[2:] if s.startswith("0b") else s
        if not digits or set(digits) - {"0", "1"}:
            raise ValueError
        return "0b" + digits
    except ValueError:
        raise ValueError(
            f"explain: {code!r} is not a bit pattern; write '0b' and binary digits "
            "('0b11111111') or '0x' and hex digits ('0x3c00')."
        ) from None


# --------------------------------------------------------------------------- the core


def _explain_one(x: float | None, pattern: str | None, fmt: Format) -> Explanation:
    elem = fmt
    notes: list[str] = []
    if fmt.kind == "mx":
        assert fmt.element is not None
        elem = fmt.element
        if fmt.tensor_scale:
            notes.append(
                f"{fmt.name} stores blocks of {fmt.block_size} {elem.name} values with one "
                f"e4m3 scale b per block and one float32 scale S per tensor; this is the "
                f"element alone, at b / S = 1 (the stored value is element × b / S)."
            )
        elif elem.kind == "int":
            notes.append(
                f"{fmt.name} stores blocks of {fmt.block_size} {elem.name} codes c with one "
                f"shared scale 2^k (e8m0); OCP reads c as c / 64 (an implied 2^-6) and "
                f"jaxquant folds the 2^-6 into the stored scale; this is the code alone, "
                f"at scale 1 (the block's value is c × 2^k / 64)."
            )
        else:
            notes.append(
                f"{fmt.name} stores blocks of {fmt.block_size} {elem.name} values with one "
                f"shared scale 2^k (e8m0); this is the element alone, at scale 2^0 = 1 (the "
                f"block's value is element × 2^k)."
            )
    if pattern is not None:
        code = int(pattern, 2)
        if code >= elem.num_codes:
            have = (
                f"codes 0..{elem.num_codes - 1}" if elem.kind == "codebook" else f"{elem.bits} bits"
            )
            raise ValueError(
                f"explain: bit pattern {pattern} does not fit {elem.name}, which has {have}."
            )
        value = _decode(elem, code)
        return _build(fmt, elem, value, value, code, notes, input_code=pattern)
    assert x is not None
    with np.errstate(over="ignore", invalid="ignore"):
        x32 = float(np.array(x, np.float64).astype(np.float32))
    if elem.kind == "float":
        return _explain_float(fmt, elem, x, x32, notes)
    if elem.kind == "int":
        return _explain_int(fmt, elem, x, x32, notes)
    return _explain_codebook(fmt, elem, x, x32, notes)


def _decode(elem: Format, code: int) -> float:
    return float(formats.decode_code(elem, code))


def _explain_float(
    fmt: Format, elem: Format, x: float, x32: float, notes: list[str]
) -> Explanation:
    stored = _round_float(x32, elem)
    saturated = overflow = False
    if math.isnan(x):
        if elem.has_nan:
            notes.append("NaN stays NaN.")
        else:
            stored = 0.0
            notes.append(
                f"{elem.name} has no NaN code: NaN is stored as code 0 (the value 0), as "
                "jq.quantize does. Count NaNs with jq.metrics.nan_count before quantizing."
            )
    elif math.isinf(x):
        if elem.has_inf:
            notes.append("Inf stays Inf.")
        elif math.isnan(stored):
            overflow = True
            notes.append(f"{elem.name} has no Inf: Inf becomes NaN (cast semantics).")
        else:
            saturated = True
            notes.append(f"{elem.name} has neither Inf nor NaN: Inf saturates to {_num(stored)}.")
    elif not math.isfinite(stored):
        overflow = True
        to = ("-Inf" if stored < 0 else "Inf") if elem.has_inf else "NaN"
        notes.append(
            f"overflow -> {to}: |{_num(x)}| is beyond the largest finite {elem.name} value "
            f"{_num(elem.max)} (cast semantics, as ml_dtypes; jq.quantize saturates to "
            f"±{_num(elem.max)} by default, saturate=True)."
        )
    elif abs(x32) > elem.max:
        step = 2.0 ** (elem.emax - elem.man_bits)
        mid = elem.max + step / 2
        if elem.nan_style == "none":
            saturated = True
            notes.append(
                f"{_num(x)} is beyond the largest {elem.name} value {_num(elem.max)}: "
                f"saturated to {_num(stored)} ({elem.name} has neither Inf nor NaN)."
            )
        else:
            how = "exactly at" if abs(x32) == mid else "below"
            tie = " (a tie: it goes to the even mantissa)" if abs(x32) == mid else ""
            notes.append(
                f"{_num(x)} is above the largest finite {elem.name} value {_num(elem.max)}, "
                f"but {how} the midpoint {_num(mid)} between it and the next step "
                f"{_num(elem.max + step)}: it rounds to {_num(stored)}{tie}, no overflow."
            )
    elif not elem.signed and x32 < 0 and stored >= 0:
        saturated = True
        notes.append(f"{elem.name} is unsigned: negative values clip to {_num(stored)}.")
    code = _float_code(stored, elem, negative=bool(np.signbit(np.float64(x))))
    stored = _decode(elem, code) if not math.isnan(stored) else math.nan
    if math.isfinite(x) and math.isfinite(stored) and stored != x and abs(x32) <= elem.max:
        notes.insert(0, _float_rounding_note(x, x32, stored, elem, code))
    elif math.isfinite(x) and stored == x and stored != 0:
        notes.insert(0, f"{_num(x)} is exactly representable in {elem.name}: no rounding error.")
    if stored == 0 and math.isfinite(x) and x != 0:
        half = elem.min_subnormal / 2
        how = "below" if abs(x32) < half else "exactly"
        notes.append(
            f"underflow: |{_num(x)}| is {how} half the smallest positive {elem.name} value "
            f"{_num(elem.min_subnormal)}, so it becomes 0."
        )
    return _build(fmt, elem, x, stored, code, notes, saturated=saturated, overflow=overflow)


def _round_float(x32: float, elem: Format) -> float:
    if not elem.signed and elem.dtype is not None:
        # e8m0 has no zero and no sign: use the ml_dtypes cast (round_float assumes a
        # signed grid that contains 0).
        with np.errstate(over="ignore", invalid="ignore"):
            return float(np.array(x32, np.float32).astype(elem.dtype).astype(np.float64))
    r = float(_round_float_jit(jnp.asarray(x32, jnp.float32), fmt=elem, saturate=False))
    if not elem.signed and (r < 0 or (r == 0 and math.copysign(1.0, r) < 0)):
        r = 0.0
    return r


def _float_rounding_note(x: float, x32: float, stored: float, elem: Format, code: int) -> str:
    """Where x lies between two neighbours of the grid, and which one it rounds to."""
    other = _neighbour(elem, stored, x, code)
    if other is None or not math.isfinite(other):
        return f"{_num(x)} is not representable in {elem.name}: rounded to {_num(stored)}."
    lo, hi = sorted((stored, other))
    text = (
        f"{_num(x)} is not representable in {elem.name}: it lies between {_num(lo)} and "
        f"{_num(hi)}; round to nearest gives {_num(stored)}"
    )
    src = x if elem.man_bits >= 23 else x32  # where the rounding happened
    if abs(src - stored) == abs(other - src):
        text += " (exactly halfway: ties go to the even mantissa)"
    return text + "."


def _neighbour(elem: Format, stored: float, x: float, code: int) -> float | None:
    """The grid value next to ``stored`` on the side of ``x``."""
    if not math.isfinite(stored):
        return None
    sign_bit = 1 << (elem.bits - 1) if elem.signed else 0
    mag = code & ~sign_bit if elem.signed else code
    if stored == 0:
        nb = 1 | (sign_bit if x < 0 and elem.signed else 0)
        return _decode(elem, nb)
    away = abs(x) > abs(stored)
    mag2 = mag + 1 if away else mag - 1
    if mag2 < 0 or mag2 >= 2 ** (elem.bits - (1 if elem.signed else 0)):
        return None
    return _decode(elem, (code & sign_bit) | mag2)


def _float_code(v: float, elem: Format, *, negative: bool) -> int:
    """The bit pattern of a value on ``elem``'s grid (NaN: the format's NaN code)."""
    e, m, bias = elem.exp_bits, elem.man_bits, elem.bias
    top = 2**e - 1
    sign = 1 if elem.signed and (negative if math.isnan(v) else math.copysign(1.0, v) < 0) else 0
    if math.isnan(v):
        if elem.nan_style == "fnuz":
            return 1 << (e + m)
        if elem.nan_style == "fn":
            ef, mf = top, 2**m - 1
        else:  # ieee: the quiet NaN (top mantissa bit set), as numpy and ml_dtypes use
            ef, mf = top, (1 << (m - 1)) if m else 0
    elif math.isinf(v):
        ef, mf = top, 0
    elif v == 0:
        ef, mf = 0, 0
        if elem.nan_style == "fnuz":
            sign = 0
    else:
        a = abs(v)
        ex = math.frexp(a)[1] - 1  # a = 2^ex × [1, 2)
        if m == 0:
            ef, mf = ex + bias, 0
        elif ex < elem.emin:
            ef, mf = 0, int(math.ldexp(a, m - elem.emin))
        else:
            ef, mf = ex + bias, int((math.ldexp(a, -ex) - 1) * 2**m)
    s = sign << (e + m) if elem.signed else 0
    return s | (ef << m) | mf


def _explain_int(fmt: Format, elem: Format, x: float, x32: float, notes: list[str]) -> Explanation:
    saturated = False
    if math.isnan(x):
        stored = 0.0
        notes.append(
            f"{elem.name} has no NaN: NaN is stored as 0, as jq.quantize does. Count NaNs "
            "with jq.metrics.nan_count before quantizing."
        )
    else:
        r = _round_int_jit(jnp.asarray(x32, jnp.float32), qmin=elem.min, qmax=elem.max)
        stored = float(r) + 0.0
        unclipped = float(rounding.round_to_integer(jnp.asarray(x32, jnp.float32), None))
        if math.isfinite(x) and unclipped != x32:
            text = f"{_num(x)} is not an integer: rounded to the nearest, {_num(unclipped)}"
            if abs(x32 - math.floor(x32) - 0.5) == 0:
                text += " (exactly halfway: ties go to the even integer)"
            notes.append(text + ".")
        if unclipped > elem.max or unclipped < elem.min:
            saturated = True
            end = "max" if unclipped > elem.max else "min"
            text = (
                f"{_num(x)} is out of {elem.name}'s range {int(elem.min)}..{int(elem.max)}: "
                f"saturated to the {end}, {int(stored)} (integers have no Inf; jaxquant "
                "clips instead of wrapping around"
            )
            if math.isfinite(unclipped) and abs(unclipped) < 2**53:
                wrapped = _decode(elem, int(unclipped) % 2**elem.bits)
                text += f", which would give {int(wrapped)}"
            notes.append(text + ").")
    code = int(stored) % 2**elem.bits
    return _build(fmt, elem, x, stored, code, notes, saturated=saturated)


def _explain_codebook(
    fmt: Format, elem: Format, x: float, x32: float, notes: list[str]
) -> Explanation:
    assert elem.codebook is not None
    book = elem.codebook
    idx = int(_round_codebook_jit(jnp.asarray(x32, jnp.float32), values=book))
    stored = float(book[idx])
    saturated = False
    if math.isnan(x):
        notes.append(
            f"NaN has no code in {elem.name}: stored as the value nearest 0, as jq.quantize does."
        )
    elif x32 > book[-1] or x32 < book[0]:
        saturated = True
        notes.append(
            f"{_num(x)} is outside [{_num(book[0])}, {_num(book[-1])}]: clipped to {_num(stored)} "
            f"(codebook values are usually multiplied by a per-block absmax scale first)."
        )
    elif stored != x32:
        j = int(np.searchsorted(np.asarray(book), x32))
        lo, hi = book[j - 1], book[j]
        text = (
            f"{_num(x)} lies between {_num(lo)} (index {j - 1}) and {_num(hi)} (index {j}); "
            f"the nearest is {_num(stored)}, index {idx}"
        )
        if abs(x32 - lo) == abs(hi - x32):
            rule = "+1" if abs(lo) == abs(hi) else "the value of smaller magnitude"
            text += f" (a tie: ties go to {rule})"
        notes.append(text + ".")
    else:
        notes.append(f"{_num(x)} is in the codebook (index {idx}): no rounding error.")
    return _build(fmt, elem, x, stored, idx, notes, saturated=saturated)


# ----------------------------------------------------------------------- assembling


def _build(
    fmt: Format,
    elem: Format,
    value: float,
    stored: float,
    code: int,
    notes: list[str],
    *,
    saturated: bool = False,
    overflow: bool = False,
    input_code: str | None = None,
) -> Explanation:
    bits = format(code, f"0{elem.bits}b")
    abs_err, rel_err = _errors(value, stored)
    kw: dict[str, object] = {}
    steps: list[str] = []
    if elem.kind == "float":
        e, m = elem.exp_bits, elem.man_bits
        s = 1 if elem.signed else 0
        sign_bits, exp_bits, man_bits = bits[:s], bits[s : s + e], bits[s + e :]
        sign = int(sign_bits) if s else 0
        ef = int(exp_bits, 2)
        mf = int(man_bits, 2) if m else 0
        category = _float_category(elem, stored)
        kw.update(
            sign_bits=sign_bits,
            exponent_bits=exp_bits,
            mantissa_bits=man_bits,
            sign=sign,
            exponent=ef,
            mantissa=mf,
            formula=_float_formula(elem, stored, sign, ef, mf, category),
        )
        if category == "subnormal":
            notes.append(
                f"subnormal: exponent field 0 means exponent 1-{elem.bias} = {elem.emin} with no "
                f"implicit leading 1, so values below {_num(elem.min_normal)} keep fewer "
                "significant bits."
            )
    elif elem.kind == "int":
        category = "integer"
        n = int(stored)
        if n >= 0:
            div = _division(n)
            kw["division"] = div
            steps += _division_lines(div, bits)
        else:
            tc = _twos_complement(n, elem.bits)
            kw["twos_complement"] = tc
            steps += [
                f"two's complement of {n} in {elem.bits} bits:",
                f"  |{n}| = {-n} = {tc[0]}",
                f"  invert every bit:  {tc[1]}",
                f"  add 1:             {tc[2]}",
                f"  (the same as 2^{elem.bits} - {-n} = {2**elem.bits + n} in binary)",
            ]
        ps = _powers_sum(bits, elem.signed)
        kw["powers_sum"] = ps
        steps.append(f"back to decimal: {ps}")
        if bits[0] == "1" and elem.bits > 1:
            other = formats.int_format(elem.bits, signed=not elem.signed)
            if other.name in formats.names():
                other = formats.get(other.name)
            reading = _decode(other, code)
            if elem.signed:
                why = f"the top bit weighs -2^{elem.bits - 1} here, +2^{elem.bits - 1} there"
            else:
                why = f"the top bit weighs +2^{elem.bits - 1} here, -2^{elem.bits - 1} there"
            notes.append(f"the same bits {bits} read as {other.name} are {int(reading)} ({why}).")
        kw["formula"] = f"{bits} -> {ps.split(' = ')[-1]}"
    else:
        category = "codebook"
        assert elem.codebook is not None
        kw["formula"] = f"index {code} ({bits}) -> {elem.name}[{code}] = {_num(stored)}"
    return Explanation(
        format=fmt,
        element=elem,
        value=value,
        stored=stored,
        abs_error=abs_err,
        rel_error=rel_err,
        code=code,
        bits=bits,
        category=category,
        saturated=saturated,
        overflow=overflow,
        input_code=input_code,
        steps=tuple(steps),
        notes=tuple(notes),
        **kw,  # type: ignore[arg-type]
    )


def _errors(value: float, stored: float) -> tuple[float, float]:
    if math.isnan(value) or math.isnan(stored):
        return math.nan, math.nan
    if value == stored:
        return 0.0, 0.0
    abs_err = abs(stored - value)
    if math.isinf(value):
        return abs_err, math.nan
    if value == 0:
        return abs_err, math.inf
    return abs_err, abs_err / abs(value)


def _float_category(elem: Format, stored: float) -> str:
    if math.isnan(stored):
        return "nan"
    if math.isinf(stored):
        return "inf"
    if stored == 0:
        return "zero"
    if elem.man_bits and abs(stored) < elem.min_normal:
        return "subnormal"
    return "normal"


def _float_formula(elem: Format, v: float, sign: int, ef: int, mf: int, category: str) -> str:
    m, bias = elem.man_bits, elem.bias
    all_e = "1" * elem.exp_bits
    if category == "nan":
        if elem.nan_style == "fnuz":
            return "sign 1 with every other bit 0 (the pattern of -0) -> NaN"
        if elem.nan_style == "fn":
            return f"exponent {all_e} and mantissa all ones -> NaN"
        return f"exponent {all_e} and mantissa ≠ 0 -> NaN"
    if category == "inf":
        return f"exponent {all_e} and mantissa 0 -> {'-' if sign else '+'}Inf"
    sgn = f"(-1)^{sign} × " if elem.signed else ""
    val = _num(v)
    if m == 0:
        return f"{sgn}2^({ef}-{bias}) = {val}"
    if category in ("subnormal", "zero"):
        return f"{sgn}2^(1-{bias}) × (0 + {mf}/2^{m}) = {val}"
    return f"{sgn}2^({ef}-{bias}) × (1 + {mf}/2^{m}) = {val}"


def _unbiased(elem: Format, ef: int, category: str) -> tuple[str, int]:
    if category in ("subnormal", "zero") and elem.man_bits:
        return "1", 1 - elem.bias
    return str(ef), ef - elem.bias


def _division(n: int) -> tuple[tuple[int, int, int], ...]:
    rows = []
    while n > 0:
        rows.append((n, n // 2, n % 2))
        n //= 2
    return tuple(rows)


def _division_lines(div: tuple[tuple[int, int, int], ...], bits: str) -> list[str]:
    if not div:
        return [f"0 is all zero bits: {bits}"]
    w = len(str(div[0][0]))
    lines = []
    for i, (n, q, r) in enumerate(div):
        tag = ""
        if i == 0:
            tag = "   (lowest bit)"
        if i == len(div) - 1:
            tag = "   (highest bit)" if i else "   (the only bit)"
        lines.append(f"{n:>{w}} ÷ 2 = {q:<{w}} remainder {r}{tag}")
    digits = "".join(str(r) for *_, r in reversed(div))
    tail = f", padded to {len(bits)} bits: {bits}" if len(digits) < len(bits) else ""
    lines.append(f"remainders read from the last to the first: {digits}{tail}")
    return lines


def _twos_complement(n: int, bits: int) -> tuple[str, str, str]:
    mag = format(-n, f"0{bits}b")
    inv = "".join("1" if c == "0" else "0" for c in mag)
    return mag, inv, format((int(inv, 2) + 1) % 2**bits, f"0{bits}b")


def _powers_sum(bits: str, signed: bool) -> str:
    n = len(bits)
    negative = signed and bits[0] == "1"
    start = 0 if negative else bits.find("1")
    if start < 0:
        return "all bits 0 = 0"
    terms, vals = [], []
    total = 0
    for i in range(start, n):
        p = n - 1 - i
        b = int(bits[i])
        w = -(2**p) if (signed and i == 0) else 2**p
        terms.append(f"{b}×(-2^{p})" if w < 0 else f"{b}×2^{p}")
        vals.append(b * w)
        total += b * w
    sums = " + ".join(str(v) for v in vals).replace("+ -", "- ")
    return f"{' + '.join(terms)} = {sums} = {total}"


# ------------------------------------------------------------------------- formatting


def _num(v: float | None, digits: int = 15) -> str:
    """Up to ``digits`` significant digits (15 tell float32 values apart), no '+' sign."""
    if v is None:
        return "-"
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "Inf" if v > 0 else "-Inf"
    if v == int(v) and abs(v) < 1e16:
        return str(int(v)) if v != 0 or math.copysign(1.0, v) > 0 else "-0"
    return f"{v:.{digits}g}"


def _exact_decimal(v: float) -> str | None:
    if not math.isfinite(v) or v == int(v):
        return None
    d = decimal.Decimal(v)
    text = format(d, "f")
    return text if len(text) <= 60 else None


def _pct(r: float) -> str:
    if math.isnan(r):
        return "-"
    if math.isinf(r):
        return "Inf"
    return f"{100 * r:.3g}%"


def _field(v: int | None) -> str:
    return "-" if v is None else str(v)


def _error_text(ex: Explanation) -> str:
    if math.isnan(ex.abs_error):
        return "- (NaN)"
    if ex.abs_error == 0:
        return "0 (exact)"
    return f"{_num(ex.abs_error, 6)} absolute, {_pct(ex.rel_error)} relative"


def _layout(fmt: Format) -> str:
    if fmt.kind == "float":
        s = "1+" if fmt.signed else ""
        return f"{s}{fmt.exp_bits}+{fmt.man_bits}"
    if fmt.kind == "int":
        return f"{fmt.bits}-bit {'signed' if fmt.signed else 'unsigned'}"
    if fmt.kind == "mx":
        assert fmt.element is not None
        return f"mx({_layout(fmt.element)})"
    return f"{fmt.num_codes} values"


def _bits_html(ex: Explanation) -> str:
    if ex.exponent_bits is None:
        return html.escape(ex.bits)
    colours = (
        ("#d62728", ex.sign_bits),
        ("#1f77b4", ex.exponent_bits),
        ("#2ca02c", ex.mantissa_bits),
    )
    return " ".join(
        f"<span style='color:{c}' title='{t}'>{b}</span>"
        for (c, b), t in zip(colours, ("sign", "exponent", "mantissa"), strict=True)
        if b
    )
