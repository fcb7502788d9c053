"""Sphinx configuration: the API reference from the docstrings, and the notebooks.

Build (warnings are errors, as in CI)::

    python3 -m sphinx -W --keep-going -b html docs docs/_build/html

Needs the ``docs`` extra (sphinx, myst-nb, sphinx-book-theme) and jaxquant importable.
"""

import os
import re
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
# Document the checkout this file sits in, not whatever jaxquant is installed.
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS / "_ext"))
# Importing jaxquant must not grab an accelerator or print backend warnings into the build.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from jaxquant._src.version import __version__  # noqa: E402


def _copy_notebooks() -> None:
    # Sphinx reads sources under docs/ only. A symlink to ../notebooks breaks the README's
    # relative links (MyST resolves them against the link's target), so copy the files,
    # keeping their mtimes so that an incremental build rereads only what changed.
    dst = DOCS / "notebooks"
    dst.mkdir(exist_ok=True)
    wanted = {p.name: p for p in (ROOT / "notebooks").iterdir() if p.suffix in (".ipynb", ".md")}
    for stale in dst.iterdir():
        if stale.name not in wanted:
            stale.unlink()
    for name, src in wanted.items():
        out = dst / name
        if not out.exists() or out.stat().st_mtime != src.stat().st_mtime:
            shutil.copy2(src, out)


_copy_notebooks()

project = "jaxquant"
author = "jaxquant developers"
copyright = "jaxquant developers"
version = release = __version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
    "coverage_check",  # docs/_ext: every name of every public __all__ is documented
]

# The notebooks are rendered as stored (without outputs): executing them is the test
# suite's job (tests/test_notebooks.py), and it would make the build take minutes.
nb_execution_mode = "off"
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "jupyter_execute", "**/.ipynb_checkpoints"]
myst_enable_extensions = ["dollarmath"]
# notebooks/README.md links the notebooks by their file names; MyST resolves those.
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# Keep signatures short: `jax.Array`, not `jax._src.basearray.Array`.
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_default_options = {"show-inheritance": False}
# Docstrings are Google style (Args / Returns / Raises / Example / References).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True

# jax.typing.ArrayLike / DTypeLike are unions; autodoc would print them expanded in every
# signature ("Array | ndarray | bool | number | ..."). Print their names instead.
_ALIASES = [
    (
        re.compile(
            r"~?jax[\w.]*\.Array \| ~?numpy\.ndarray \| ~?numpy\.bool \| ~?numpy\.number"
            r" \| bool \| int \| float \| complex"
        ),
        "~jax.typing.ArrayLike",
    ),
    (
        re.compile(
            r"str \| type\[~?(typing\.)?Any\] \| ~?numpy\.dtype \| ~?jax[\w.]*SupportsDType"
        ),
        "~jax.typing.DTypeLike",
    ),
]


def _short_aliases(app, what, name, obj, options, signature, return_annotation):
    for pattern, short in _ALIASES:
        if signature:
            signature = pattern.sub(short, signature)
        if return_annotation:
            return_annotation = pattern.sub(short, return_annotation)
    return signature, return_annotation


def setup(app):
    app.connect("autodoc-process-signature", _short_aliases)


html_theme = "sphinx_book_theme"
html_title = f"jaxquant {release}"
html_theme_options = {"show_toc_level": 2}
