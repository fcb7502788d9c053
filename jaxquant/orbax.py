"""Orbax checkpoints of quantized pytrees (imports orbax; ``import jaxquant`` alone does not).

``save(directory, tree)`` writes a pytree of arrays, :class:`~jaxquant.QArray` s and
PRNG keys, ``restore(directory, target=None)`` reads it back bit for bit (values, scales
and zero points, whatever their dtype; without a target, its dicts, lists, tuples and
``None`` s, empty ones included), ``layout(directory)`` returns its manifest.

An NNX model's state round-trips into the model::

    jq.orbax.save(path, nnx.state(model))
    nnx.update(model, jq.orbax.restore(path))   # or restore(path, target=nnx.state(model))

Without a target, each ``nnx.Variable`` comes back as its value (the pure dict
``nnx.to_pure_dict`` gives, which ``nnx.update`` takes); with ``target=nnx.state(model)``
(or its ``jax.eval_shape``) the result is an ``nnx.State`` of the target's variables.

Damage anywhere (one flipped bit of the manifest included) makes ``restore`` raise a
ValueError naming the checkpoint and what is wrong.

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
for asymmetric specs, ``leaf_<i>.zero_point``; an array of typed PRNG keys
(``jax.random.key``) is stored as its ``jax.random.key_data`` (``uint32``, the key shape
plus the implementation's trailing axes) in ``leaf_<i>.array``; any other leaf is
``leaf_<i>.array``. Each
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
      "checksum": "sha256",                         # the algorithm of every digest
      "manifest_sha256": <hex>,                     # this manifest's own (below)
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
                              "stored_dtype": "uint16", "sha256": <hex>}}},
        {"name": "rngs/key/value", "path": [...], "kind": "key",
         "impl": "threefry2x32",                    # jax.random.key_impl
         "shape": [], "dtype": "uint32",            # the keys' shape, their data's dtype
         "arrays": {"array": {"key": "leaf_2.array", "shape": [2], "dtype": "uint32",
                              "stored_dtype": "uint32", "sha256": <hex>}}}],
      "structure": {"dict": [["params", {"dict": [["Dense_0", {"dict": [
                       ["kernel", 0], ["bias", 1]]}]]}]]}}

Path entries are ``["key", k]`` (dict key, str or int), ``["index", i]`` (list/tuple
position), ``["attr", name]`` (dataclass / namedtuple / flax Variable field) and
``["flat", i]``. ``key`` is ``null`` for a zero-size array, else ``leaf_<i>.<field>``
of its own leaf and field (restore refuses entries moved between leaves or fields), and
its shape and dtype follow from the leaf's (for a QArray, from its spec and shape). Each
array's ``sha256`` is that of its stored bytes (C order, stored dtype); each file's, of
the file.

``structure`` describes the tree's containers, so that restore without a target rebuilds
them all: a leaf is its number ``i``, ``None`` is ``null``, a dict
``{"dict": [[key, child], ...]}`` (flattening order), a list ``{"list": [child, ...]}``, a
tuple ``{"tuple": [...]}``, a flax ``nnx.Variable`` ``{"variable": [class name, child]}``
(its child's path entry is ``["attr", "value"]``; restored as the child itself), any other
container ``{"node": [[kind, key, child], ...]}`` with the path entry of each child
(restored as a dict keyed by them, or a list for ``index`` entries). Leaves appear in
their order ``0, 1, ...``, each at its ``path``. Checkpoints saved before ``variable``
nodes existed hold their variables as ``node`` s with the one entry ``["attr", "value"]``:
restore without a target warns about those (they come back as ``{"value": x}``); pass
``target=nnx.state(model)``.

``manifest_sha256`` is the sha256 of the manifest without that key, serialized as
``json.dumps(m, sort_keys=True, separators=(",", ":"), ensure_ascii=True)`` (UTF-8), so it
does not depend on the file's whitespace. A manifest without it (and without
``structure``) was written before jaxquant sealed its manifests: it restores with a
``UserWarning`` (damage to it cannot be detected; without a target, containers holding no
arrays are dropped); ``save(path, restore(path, target), force=True)`` seals it.

A save writes into ``.<name>.tmp-<id>/`` beside ``<directory>`` while holding an
exclusive ``flock`` on ``.<name>.tmp-<id>.lock``, then renames the folder; a killed save
leaves both, never a checkpoint (restore refuses the folder), and the next save to the
same parent removes them once their lock is free (the writer is dead).
"""

from jaxquant._src.orbax import layout, restore, save

__all__ = ["layout", "restore", "save"]
