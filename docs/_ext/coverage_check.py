"""A Sphinx extension that fails the build when a public name is not documented.

The model is optax's ``docs/ext/coverage_check.py``: the public API is every name in the
``__all__`` of ``jaxquant`` and of each public module below it, at any depth (``public_api.py``
says which those are); each must be an object of the Python domain (an ``auto*`` directive
in ``docs/api/``), and each public module a documented module.
Missing names are reported as warnings, which ``sphinx -W`` turns into a failed build.
"""

import importlib
import types

from public_api import public_modules
from public_api import public_names as module_names
from sphinx.application import Sphinx
from sphinx.util import logging

logger = logging.getLogger(__name__)


def public_names() -> dict[str, object]:
    """Every public name (``module.name``) and its object."""
    out = {}
    for mod_name in public_modules():
        mod = importlib.import_module(mod_name)
        for name in module_names(mod_name):
            out[f"{mod_name}.{name}"] = getattr(mod, name)
    return out


def check_coverage(app: Sphinx, env) -> None:
    py = env.get_domain("py")
    documented = {name for name, *_ in py.get_objects()}
    modules = set(py.modules)
    for mod_name in public_modules():
        if mod_name not in modules:
            logger.warning(
                f"public module {mod_name} has no page: add `.. module:: {mod_name}` "
                "(or automodule) to a page under docs/api/"
            )
    missing = []
    for full, obj in public_names().items():
        # A submodule re-exported by name (jaxquant.formats) is documented by its page.
        target = obj.__name__ if isinstance(obj, types.ModuleType) else full
        if target not in documented and target not in modules:
            missing.append(full)
    for full in missing:
        mod_name, name = full.rsplit(".", 1)
        logger.warning(
            f"public name {full} is not documented: add `.. autofunction:: {name}` "
            f"(or autoclass / autodata) under `.. currentmodule:: {mod_name}` in docs/api/"
        )


def setup(app: Sphinx) -> dict:
    # After every page is read, before writing: the Python domain then holds every object.
    app.connect("env-check-consistency", check_coverage)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
