"""Small bundled data sets (no download): ``digits()`` (scikit-learn's 8x8 digits) and
``stdlib_bytes()`` (next-byte prediction on the Python standard library's source)."""

from jaxquant._src.datasets import digits, stdlib_bytes, stdlib_corpus

__all__ = ["digits", "stdlib_bytes", "stdlib_corpus"]
