"""Small bundled data sets (no download): ``digits()``."""

from jaxquant._src.datasets import digits

__all__ = ["digits"]
