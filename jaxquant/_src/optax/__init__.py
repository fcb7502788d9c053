"""optax integration (the only part of jaxquant's core tree that imports optax)."""
