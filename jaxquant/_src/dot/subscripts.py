"""Einsum parsing: two-operand subscripts as ``lax.dot_general`` dimension numbers and the
output's axis order (:func:`jaxquant.einsum` computes the product with
:func:`jaxquant.dot_general`)."""

from __future__ import annotations

import string

from jaxquant._src.dot.capabilities import DimensionNumbers

_LETTERS = string.ascii_letters


def parse(subscripts: str, a_ndim: int, b_ndim: int) -> tuple[str, str, str]:
    """Labels of lhs, rhs and output, ellipses expanded to fresh letters."""
    s = subscripts.replace(" ", "")
    if "->" in s:
        ins, out = s.split("->")
        explicit = True
    else:
        ins, out, explicit = s, "", False
    parts = ins.split(",")
    if len(parts) != 2:
        raise ValueError(
            f"einsum: jq.einsum takes exactly two operands, got {len(parts)} in {subscripts!r}."
        )
    used = set(s) - set(".,->")
    if any(c not in _LETTERS for c in used):
        raise ValueError(f"einsum: labels must be letters, got {subscripts!r}.")
    fresh = [c for c in _LETTERS if c not in used]
    ell_ranks = []
    for p, ndim, name in zip(parts, (a_ndim, b_ndim), "ab", strict=True):
        if p.count("...") > 1 or p.replace("...", "").count(".") or out.count("...") > 1:
            raise ValueError(f"einsum: malformed ellipsis in {subscripts!r}.")
        n = len(p.replace("...", ""))
        if "..." in p:
            if n > ndim:
                raise ValueError(
                    f"einsum: {p!r} has more labels than {name}'s {ndim} axes: {subscripts!r}."
                )
            ell_ranks.append(ndim - n)
        else:
            if n != ndim:
                raise ValueError(
                    f"einsum: {p!r} names {n} axes but {name} has {ndim}: {subscripts!r}."
                )
            ell_ranks.append(0)
    n_ell = max(ell_ranks)
    ell = "".join(fresh[:n_ell])
    la = parts[0].replace("...", ell[n_ell - ell_ranks[0] :])
    lb = parts[1].replace("...", ell[n_ell - ell_ranks[1] :])
    if explicit:
        lo = out.replace("...", ell)
    else:
        counts = {c: (la + lb).count(c) for c in set(la + lb) if c not in ell}
        lo = ell + "".join(sorted(c for c, k in counts.items() if k == 1))
    return la, lb, lo


def plan(
    subscripts: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...]
) -> tuple[DimensionNumbers, tuple[int, ...] | None]:
    """``(dimension_numbers, perm)``: the product ``dot_general(a, b, dimension_numbers)``
    transposed by ``perm`` (None: already in the output's order) is the einsum. Labels in
    both operands and the output are batch axes, in both operands only contracted, in one
    operand and the output free; anything else is a ValueError naming the label."""
    la, lb, lo = parse(subscripts, len(a_shape), len(b_shape))
    for labels, what in ((la, "lhs"), (lb, "rhs"), (lo, "output")):
        if len(set(labels)) != len(labels):
            raise ValueError(
                f"einsum: a label repeats in the {what} of {subscripts!r}; jq.einsum supports "
                "no traces or diagonals. Take them with jnp.einsum / jnp.diagonal first."
            )
    for c in lo:
        if c not in la and c not in lb:
            raise ValueError(f"einsum: output label {c!r} is in no operand of {subscripts!r}.")
    for labels, other, what in ((la, lb, "lhs"), (lb, la, "rhs")):
        for c in labels:
            if c not in other and c not in lo:
                raise ValueError(
                    f"einsum: label {c!r} of {what} in {subscripts!r} is summed within one "
                    f"operand; jq.einsum quantizes whole operands, so sum it first "
                    f"(jnp.sum(x, axis={labels.index(c)}))."
                )
    for c in la:
        if c in lb and a_shape[la.index(c)] != b_shape[lb.index(c)]:
            raise ValueError(
                f"einsum: label {c!r} of {subscripts!r} has size {a_shape[la.index(c)]} in a "
                f"(shape {tuple(a_shape)}) but {b_shape[lb.index(c)]} in b (shape "
                f"{tuple(b_shape)})."
            )
    batch = [c for c in la if c in lb and c in lo]
    contract = [c for c in la if c in lb and c not in lo]
    dn = (
        (tuple(la.index(c) for c in contract), tuple(lb.index(c) for c in contract)),
        (tuple(la.index(c) for c in batch), tuple(lb.index(c) for c in batch)),
    )
    names = batch + [c for c in la if c not in lb] + [c for c in lb if c not in la]
    perm = tuple(names.index(c) for c in lo)
    return dn, (None if perm == tuple(range(len(perm))) else perm)
