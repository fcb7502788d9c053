"""No import cycles inside jaxquant, and the private ``_src`` never imports the public API.

Every module under ``jaxquant/`` is parsed (no import runs): every ``import`` statement at any
level counts -- module level, inside functions (lazy imports), inside ``if``/``try`` -- with
relative imports resolved. An edge ``a -> b`` means running ``a`` may run ``b``:

* ``import p.q.m`` / ``from p.q import m`` (``m`` a module) reach ``p.q.m``;
* ``from p.q import name`` (an attribute) reaches ``p.q``;
* importing ``p.q.m`` also runs the package ``p.q``'s ``__init__`` first -- an edge to ``p.q``
  too, unless ``p.q`` is a package that contains ``a`` (it is already initialised when ``a``
  runs, so that is no cycle: a package's ``__init__`` importing its own modules).

``jaxquant.__getattr__``'s ``importlib.import_module`` (the lazy ``jaxquant.flax`` /
``optax`` / ``orbax``) is not an import statement and is not an edge; imports of other
packages (``flax``, ``orbax``) are not jaxquant modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "jaxquant"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every import statement of module ``name`` (only
    jaxquant modules; ``from p import x`` gives ``p.x`` when that is a module, else ``p``)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if _is_package(name) else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                found.append((sub if sub in MODULES else mod, node.lineno))
    return [(m, line) for m, line in found if m == "jaxquant" or m.startswith("jaxquant.")]


def _edges(name: str) -> dict[str, int]:
    """Modules that running ``name`` may run directly, with the line that does it."""
    out: dict[str, int] = {}
    for target, line in _imports(name):
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            mod = ".".join(parts[:i])
            if mod not in MODULES:
                continue
            ancestor = name == mod or name.startswith(mod + ".")
            if mod == target or not ancestor:  # an enclosing package is already running
                out.setdefault(mod, line)
    out.pop(name, None)
    return out


GRAPH = {name: _edges(name) for name in MODULES}


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (as a path a -> ... -> a) per strongly connected component (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            strong(v)
    cycles = []
    for comp in comps:  # a shortest path back to the start, inside the component
        members, start = set(comp), min(comp)
        paths, seen = {start: [start]}, {start}
        queue = [start]
        while queue:
            v = queue.pop(0)
            for w in sorted(graph[v]):
                if w == start:
                    cycles.append(paths[v] + [start])
                    queue = []
                    break
                if w in members and w not in seen:
                    seen.add(w)
                    paths[w] = paths[v] + [w]
                    queue.append(w)
    return cycles


def _describe(cycle: list[str]) -> str:
    return " -> ".join(
        f"{a} (line {GRAPH[a][b]})" if b else a
        for a, b in zip(cycle, [*cycle[1:], None], strict=True)
    )


def test_the_parser_sees_every_kind_of_import():
    """Module-level, relative and function-level imports all count (a test that finds
    nothing proves nothing)."""
    assert len(MODULES) > 40 and "jaxquant._src.dot" in MODULES
    dot = GRAPH["jaxquant._src.dot"]
    assert {"jaxquant._src.dot.serving", "jaxquant._src.quantize"} <= set(dot)
    # serve.py re-exports the dot package's serving module: the package runs first.
    assert "jaxquant._src.dot" in GRAPH["jaxquant._src.serve"]
    # function-level imports: recipes' Rule, the sweep's run -> tasks.
    assert "jaxquant._src.flax.rules" in GRAPH["jaxquant._src.recipes"]
    assert "jaxquant.app.sweep.tasks" in GRAPH["jaxquant.app.sweep.run"]
    # a package's own modules are no edge back to it; another package's are
    assert "jaxquant._src.flax" not in GRAPH["jaxquant._src.flax.calibrate"]
    assert "jaxquant._src.flax" in GRAPH["jaxquant._src.recipes"]


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b": 1}, "b": {}}) == []


# Cycles in modules whose owners are fixing them: (members) -> why. Any other cycle fails
# test_no_import_cycles_inside_jaxquant; these fail the strict xfail below once fixed.
_KNOWN_CYCLES: dict[frozenset[str], str] = {}  # none left (issue 12: flax/kinds.py)


def test_no_import_cycles_inside_jaxquant():
    cycles = [c for c in _cycles(GRAPH) if frozenset(c) not in _KNOWN_CYCLES]
    assert not cycles, "import cycles:\n" + "\n".join(_describe(c) for c in cycles)


SRC = sorted(m for m in MODULES if m.startswith("jaxquant._src"))
# Modules that still import the public package, each with what must change. strict: the
# mark fails as soon as the module is fixed, so that it is removed.
_PUBLIC_IMPORTERS: dict[str, str] = {}  # none left


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            m,
            marks=pytest.mark.xfail(strict=True, reason=_PUBLIC_IMPORTERS[m]),
        )
        if m in _PUBLIC_IMPORTERS
        else m
        for m in SRC
    ],
)
def test_src_never_imports_the_public_package(name):
    """``jaxquant._src`` is what the public modules are made of: importing ``jaxquant``
    (or ``jaxquant.flax``...) from it runs the whole public package, and is a cycle
    waiting for the next public import to reach back."""
    public = {
        m: line
        for m, line in _imports(name)
        if m == "jaxquant" or not m.startswith("jaxquant._src")
    }
    assert not public, f"{name} imports the public package: " + ", ".join(
        f"{m} (line {line})" for m, line in sorted(public.items())
    )


APP = sorted(m for m in MODULES if m == "jaxquant.app" or m.startswith("jaxquant.app."))
PUBLIC = sorted(m for m in MODULES if not m.startswith(("jaxquant._src", "jaxquant.app")))


def test_the_app_layer_exists():
    assert {"jaxquant.app.sweep.run", "jaxquant.app.models", "jaxquant.app.env"} <= set(APP)


@pytest.mark.parametrize("name", APP)
def test_the_app_layer_uses_only_the_public_api(name):
    """``jaxquant.app`` (sweep, data sets, models, timing) is built on what users get:
    an app module importing ``jaxquant._src`` would depend on what the library may change."""
    private = {m: line for m, line in _imports(name) if m.startswith("jaxquant._src")}
    assert not private, f"{name} imports private modules: " + ", ".join(
        f"{m} (line {line})" for m, line in sorted(private.items())
    )


@pytest.mark.parametrize("name", SRC + PUBLIC)
def test_the_library_never_imports_the_app_layer(name):
    """The library does not depend on its applications (the deprecated ``jaxquant.datasets``
    alias reaches ``jaxquant.app.datasets`` only when an old name is used)."""
    app = {
        m: line
        for m, line in _imports(name)
        if m.startswith("jaxquant.app") and name != "jaxquant.datasets"
    }
    assert not app, f"{name} imports the application layer: " + ", ".join(
        f"{m} (line {line})" for m, line in sorted(app.items())
    )
