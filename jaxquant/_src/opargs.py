"""How a quantized op (dot_general, einsum, conv_general_dilated) is told what to quantize:
a whole :class:`~jaxquant.QuantConfig` (``config=``) or the loose keywords it replaces
(``lhs_spec``, ``rhs_spec``, ``grad_spec``, ``mode``, ``ste``), never both."""

from __future__ import annotations

from typing import Any

from jaxquant._src.config import check_config


class Unset:
    """The default of a loose keyword. It shows as its value (signatures, ``help()``) and
    tells "not passed" from "passed", so that a keyword given next to ``config=`` is an
    error rather than silently ignored (or silently winning)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


NONE: Any = Unset(None)
AUTO: Any = Unset("auto")
PLAIN: Any = Unset("plain")

# Loose keyword <- QuantConfig field: the activation is the lhs, the weight the rhs.
_FIELDS = {
    "lhs_spec": "act",
    "rhs_spec": "weight",
    "grad_spec": "grad",
    "mode": "mode",
    "ste": "ste",
}


def resolve(fn: str, config: Any, **loose: Any) -> dict[str, Any]:
    """The loose keywords' values: from ``config`` (a QuantConfig) when given, else the
    keywords themselves (their defaults where not passed).

    Raises:
      TypeError: ``config`` is not a QuantConfig or None.
      ValueError: ``config`` together with a loose keyword (naming both), or a config
        that keeps state across calls (delayed scaling, learned step sizes).
    """
    config = check_config(config, fn)
    values = {k: v.value if isinstance(v, Unset) else v for k, v in loose.items()}
    if config is None:
        return values
    given = [k for k, v in loose.items() if not isinstance(v, Unset)]
    if given:
        pairs = ", ".join(f"{k}= (config.{_FIELDS[k]})" for k in given)
        raise ValueError(
            f"{fn}: got config= and {pairs}; both say how the operands are quantized. Pass "
            f"one: drop {', '.join(k + '=' for k in given)}, or change the config with "
            f"config.replace({_FIELDS[given[0]]}=...)."
        )
    if config.scaling == "delayed" or config.ste == "lsq":
        what = "scaling='delayed'" if config.scaling == "delayed" else "ste='lsq'"
        raise ValueError(
            f"{fn}: config has {what}, which keeps state across calls (amax histories, "
            "learned step sizes) that a function call cannot hold. Either pass the scales "
            "yourself: config.replace(scaling='current', ste='plain') with lhs_scale= / "
            "rhs_scale= (jq.delayed_scaling keeps such a state), or use "
            "jq.flax.quantize_model(model, [jq.flax.Rule(pattern, config)])."
        )
    return {k: getattr(config, _FIELDS[k]) for k in loose}
