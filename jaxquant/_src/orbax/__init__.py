"""Orbax checkpoints of quantized pytrees (the only jaxquant module importing orbax)."""

from jaxquant._src.orbax.checkpoint import layout, restore, save

__all__ = ["layout", "restore", "save"]
