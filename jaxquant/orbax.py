"""Orbax checkpoints of quantized pytrees (imports orbax; ``import jaxquant`` alone does not).

``save(directory, tree)`` writes a pytree of arrays and :class:`~jaxquant.QArray` s,
``restore(directory, target=None)`` reads it back bit for bit (values, scales and zero
points, whatever their dtype), ``layout(directory)`` returns its manifest.

On-disk layout (format ``"jaxquant.orbax"``, version 1)
-------------------------------------------------------
::

    <directory>/
      jaxquant.json           the manifest (below), written last
      arrays/                 one orbax StandardCheckpointer checkpoint, use_ocdbt=False
        _METADATA, _CHECKPOINT_METADATA, commit_success.txt   orbax's own metadata
        leaf_<i>.<field>/     one zarr v2 array per stored array: .zarray and chunk
                              files (0, 0.0, ...), zstd, C order, little-endian

``arrays/`` is absent when nothing needs storing (an empty tree, or zero-size arrays only).

Leaves are numbered ``i = 0, 1, ...`` in ``jax.tree_util`` flattening order, QArrays being
leaves. A QArray is split into the arrays ``leaf_<i>.values``, ``leaf_<i>.scale`` and,
for asymmetric specs, ``leaf_<i>.zero_point``; any other leaf is ``leaf_<i>.array``. Each
is stored with the shape and bytes it has in memory. ``values`` keeps the byte layout
documented in ``jaxquant/_src/qarray.py``: formats below 8 bits are ``uint8`` bytes
holding an LSB-first bit stream along the last axis (4-bit formats: two codes per byte,
element ``2k`` in the low nibble of byte ``k``), 8/16-bit formats their own dtype.
``scale`` is float32, bfloat16, float16 or float8_e8m0fnu, ``zero_point`` the smallest
integer type holding the format's range. Dtypes outside numpy's own (``bool``,
``int8..64``, ``uint8..64``, ``float16/32/64``, ``complex64/128``) are bitcast to the
unsigned int of the same width: ``bfloat16`` to ``uint16``; every ``float8_*``
(``e8m0`` included), ``float6_*``, ``float4_e2m1fn``, ``int4``, ``uint4``, ``int2``,
``uint2`` (one byte per element in numpy) to ``uint8``. The manifest records both dtypes.
Zero-size arrays are not written (orbax refuses them); the manifest alone describes them.
The stored arrays read back with orbax alone:
``ocp.StandardCheckpointer().restore(directory / "arrays")`` gives
``{"leaf_<i>": {<field>: numpy array in the stored dtype}}``.

``jaxquant.json`` holds::

    {
      "format": "jaxquant.orbax", "version": 1, "jaxquant_version": "0.1.0",
      "checksum": "sha256",
      "files": {"arrays/<relative path>": {"size": <bytes>, "sha256": <hex>}, ...},
      "leaves": [
        {"name": "params/Dense_0/kernel",           # jq.size_report's leaf path
         "path": [["key", "params"], ["key", "Dense_0"], ["key", "kernel"]],
         "kind": "qarray",                          # or "array"
         "shape": [64, 32], "dtype": "float32",     # the QArray's (dequantized) ones
         "spec": {...},                             # e.g. mxfp4, as jaxquant/_src/serialize.py
                                                    # spec_to_dict writes it
         "arrays": {
           "values": {"key": "leaf_0.values", "shape": [64, 16], "dtype": "uint8",
                      "stored_dtype": "uint8", "sha256": <hex>},
           "scale": {... "dtype": "float8_e8m0fnu", "stored_dtype": "uint8" ...},
           "zero_point": null}},                    # null: symmetric
        {"name": "params/Dense_0/bias", "path": [...], "kind": "array",
         "type": "jax",                             # or "numpy": restored as numpy
         "shape": [32], "dtype": "bfloat16",
         "arrays": {"array": {"key": "leaf_1.array", "shape": [32], "dtype": "bfloat16",
                              "stored_dtype": "uint16", "sha256": <hex>}}}]}

Path entries are ``["key", k]`` (dict key, str or int), ``["index", i]`` (list/tuple
position), ``["attr", name]`` (dataclass / namedtuple / flax Variable field) and
``["flat", i]``; without a ``target``, restore builds dicts for the first and the last
two and lists for ``index``. ``key`` is ``null`` for a zero-size array. Each array's
``sha256`` is that of its stored bytes (C order, stored dtype); each file's, of the file.
"""

from jaxquant._src.orbax import layout, restore, save

__all__ = ["layout", "restore", "save"]
