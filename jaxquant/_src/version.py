"""The jaxquant version: one home, read by ``jaxquant.__version__`` and by the modules of
``_src`` that record it (checkpoint manifests), which must not import the public package.
Keep it equal to ``version`` in pyproject.toml (tests/test_checkpoint.py checks)."""

__version__ = "0.1.0"
