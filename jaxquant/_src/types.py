"""Type aliases shared by the public signatures (annotations only; nothing at run time).

``PyTree`` is ``Any`` on purpose, as in jax's own signatures: a pytree is any nesting of
containers ``jax.tree_util`` knows (dicts, lists, tuples, None, NamedTuples, registered
dataclasses, flax ``State``) around leaves, and a precise recursive type would reject the
registered classes. The alias says what the argument is; the library checks the leaves.
"""

from __future__ import annotations

from typing import Any, TypeAlias

PyTree: TypeAlias = Any
# A jax.tree_util key path: a tuple of DictKey / SequenceKey / GetAttrKey / FlattenedIndexKey.
KeyPath: TypeAlias = tuple[Any, ...]
