"""Number formats: the registry and its constructors (``jq.formats.get("e4m3")``)."""

from jaxquant._src.formats import (
    NF4_VALUES,
    Format,
    all_formats,
    code_table,
    codebook_format,
    decode_code,
    finite_values,
    float_format,
    get,
    int_format,
    mx_format,
    names,
    nvfp4_format,
    register,
)

__all__ = [
    "NF4_VALUES",
    "Format",
    "all_formats",
    "code_table",
    "codebook_format",
    "decode_code",
    "finite_values",
    "float_format",
    "get",
    "int_format",
    "mx_format",
    "names",
    "nvfp4_format",
    "register",
]
