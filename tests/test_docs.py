"""The API reference covers the public API, and every public function and class has an example.

Fast checks that need no Sphinx: they read ``docs/api/*.rst`` as text. The Sphinx build
(``python3 -m sphinx -W --keep-going -b html docs docs/_build/html``) makes the same
coverage check (``docs/_ext/coverage_check.py``) against what autodoc really rendered.
The examples themselves run as doctests (``--doctest-modules`` over ``jaxquant/``).
"""

import doctest
import importlib
import importlib.util
import inspect
import re
import types
from pathlib import Path

import pytest

API = Path(__file__).resolve().parents[1] / "docs" / "api"
DOCS_EXT = API.parent / "_ext"

# `.. currentmodule:: m` / `.. module:: m` / `.. automodule:: m`, and `.. autoX:: name`.
_MODULE = re.compile(r"^\.\. (?:currentmodule|module|automodule):: *(\S+)", re.M)
_OBJECT = re.compile(r"^\.\. auto(?:function|class|data|attribute|exception):: *(\S+)", re.M)
_DIRECTIVE = re.compile(
    r"^\.\. (currentmodule|module|automodule|autofunction|autoclass|autodata|autoattribute"
    r"|autoexception):: *(\S+)",
    re.M,
)


@pytest.mark.parametrize("page", sorted(API.glob("*.rst")), ids=lambda p: p.stem)
def test_examples_on_the_pages_run(page):
    # Examples written on the pages themselves (a constant's, which has no docstring).
    result = doctest.testfile(str(page), module_relative=False, verbose=False)
    assert result.failed == 0, f"{page.name}: {result.failed} of {result.attempted} failed"


def _public_api():
    # docs/_ext/public_api.py says what the public API is, for this file and the Sphinx
    # coverage check alike (loaded by path: docs/ is not a package).
    spec = importlib.util.spec_from_file_location("public_api", DOCS_EXT / "public_api.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


public_api = _public_api()
public_names = public_api.public_names


def documented() -> tuple[set[str], set[str]]:
    """(the modules, the fully qualified objects) the API pages document."""
    modules, objects = set(), set()
    for page in sorted(API.glob("*.rst")):
        current = None
        for kind, name in _DIRECTIVE.findall(page.read_text()):
            if kind in ("currentmodule", "module", "automodule"):
                current = name
                if kind != "currentmodule":
                    modules.add(name)
            else:
                full = name if "." in name or current is None else f"{current}.{name}"
                objects.add(full)
    return modules, objects


MODULES = public_api.public_modules()


def test_the_pages_parse():
    # Guards the regexes above: if the pages stopped matching them, every check below
    # would pass vacuously.
    modules, objects = documented()
    assert "jaxquant" in modules and "jaxquant.formats" in modules
    assert "jaxquant.quantize" in objects and "jaxquant.formats.Format" in objects
    assert len(objects) > 100


def test_public_modules_are_the_known_namespaces():
    # Discovery finds the namespaces at every depth (a check that it still works), and each
    # top-level public module, a new one included, has its own page and an entry in
    # docs/api/index.rst; a module below one (jaxquant.app.models) is documented on its
    # top-level module's page (test_every_public_name_is_documented checks the directive).
    assert set(MODULES) >= {"jaxquant", "jaxquant.formats", "jaxquant.flax", "jaxquant.app.models"}
    assert not any(m.startswith("jaxquant.app.sweep") for m in MODULES)  # COMMAND_MODULES
    assert not any("._" in m for m in MODULES)
    index = (API / "index.rst").read_text()
    for mod_name in MODULES:
        page = "jaxquant" if mod_name == "jaxquant" else mod_name.split(".")[1]
        assert (API / f"{page}.rst").exists(), f"no page docs/api/{page}.rst for {mod_name}"
        assert re.search(rf"^\s+{page}$", index, re.M), f"docs/api/index.rst lacks {page}"
        if mod_name.count(".") > 1:
            text = (API / f"{page}.rst").read_text()
            assert f"automodule:: {mod_name}\n" in text, f"docs/api/{page}.rst lacks {mod_name}"


def test_a_public_module_without_all_is_named(tmp_path, monkeypatch):
    # The discovery refuses to guess a module's public names.
    (tmp_path / "jq_no_all.py").write_text("def f():\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="jq_no_all has no __all__"):
        public_names("jq_no_all")


@pytest.mark.parametrize("mod_name", MODULES)
def test_every_public_name_is_documented(mod_name):
    modules, objects = documented()
    assert mod_name in modules, f"no `.. automodule:: {mod_name}` in docs/api/"
    missing = []
    for name in public_names(mod_name):
        obj = getattr(importlib.import_module(mod_name), name)
        if isinstance(obj, types.ModuleType):
            ok = obj.__name__ in modules  # a re-exported submodule: documented by its page
        else:
            ok = f"{mod_name}.{name}" in objects
        if not ok:
            missing.append(name)
    assert not missing, (
        f"{mod_name}: {missing} are public (in __all__) but not in docs/api/: add "
        f"`.. autofunction::` / `.. autoclass::` / `.. autodata::` lines for them"
    )


@pytest.mark.parametrize("mod_name", MODULES)
def test_every_public_function_and_class_has_an_example(mod_name):
    mod = importlib.import_module(mod_name)
    without = []
    for name in public_names(mod_name):
        obj = getattr(mod, name)
        if not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue  # modules have pages; constants (NF4_VALUES) have no docstring
        # The object's own docstring (not an inherited one): the one its page renders and
        # --doctest-modules runs.
        doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
        if not doc or ">>>" not in doc:
            without.append(name)
    assert not without, (
        f"{mod_name}: {without} have no example: add an `Example:` section with a short "
        "doctest (`>>> ...`) to their docstrings"
    )


_PAPER = re.compile(r"\bet al\b|arXiv", re.I)


@pytest.mark.parametrize("mod_name", MODULES)
def test_papers_are_cited_with_links(mod_name):
    # A docstring that names a paper ("Jacob et al. 2018") links it, so that a reader can
    # open it from the API reference.
    mod = importlib.import_module(mod_name)
    unlinked = []
    for name in ["", *public_names(mod_name)]:
        obj = getattr(mod, name) if name else mod
        doc = inspect.getdoc(obj) or ""
        if _PAPER.search(doc) and "https://" not in doc:
            unlinked.append(name or mod_name)
    assert not unlinked, f"{unlinked} cite a paper without a link (https://arxiv.org/abs/...)"
