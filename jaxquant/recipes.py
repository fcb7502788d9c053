"""Named quantized-training recipes (fp8, int8, int4, binary, ternary, MX, NVFP4, MXFP4).

Each is a :class:`Recipe`: rules for :func:`jaxquant.flax.quantize_model`, or the config
of one quantized product::

    import jaxquant as jq
    rules = jq.recipes.get("w8a8_int8").rules()      # for jaxquant.flax.quantize_model
    cfg = jq.recipes.get("fp8_current").config      # jq.dot_general(x, w, dn, config=cfg)
    kw = jq.recipes.get("fp8_current").dot_kwargs()  # the same as loose keywords
"""

from jaxquant._src.recipes import (
    Recipe,
    binary,
    fp8_current,
    fp8_delayed,
    get,
    mxfp4,
    mxfp8,
    names,
    nvfp4,
    ternary,
    w4a16_int4,
    w8a8_int8,
)

__all__ = [
    "Recipe",
    "binary",
    "fp8_current",
    "fp8_delayed",
    "get",
    "mxfp4",
    "mxfp8",
    "names",
    "nvfp4",
    "ternary",
    "w4a16_int4",
    "w8a8_int8",
]
