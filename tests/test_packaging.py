"""Packaging: the core imports without the extras, a feature without its extra says which
to install, pyproject.toml's extras match jaxquant/_src/extras.py, and the type checker's
strict list covers the public API."""

import importlib
import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from jaxquant._src import extras

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PUBLIC = (
    "jaxquant",
    "jaxquant.cli",
    "jaxquant.extras",
    "jaxquant.flax",
    "jaxquant.formats",
    "jaxquant.integer",
    "jaxquant.metrics",
    "jaxquant.optax",
    "jaxquant.orbax",
    "jaxquant.ptq",
    "jaxquant.recipes",
    "jaxquant.rotations",
)

# Runs in a fresh interpreter: a meta-path finder, installed before jaxquant is imported,
# makes the extras' packages unimportable as if they were not installed.
WITHOUT_EXTRAS = textwrap.dedent(
    """
    import contextlib, io, json, sys

    BLOCKED = {"orbax", "sklearn", "matplotlib"}

    class Uninstalled:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Uninstalled())

    import chex
    import jax.numpy as jnp
    import jaxquant as jq
    import jaxquant.app.datasets
    import jaxquant.flax
    import jaxquant.optax
    from jaxquant.app import cli

    out = {}
    tree = {"w": jnp.linspace(-1.0, 1.0, 32).reshape(4, 8), "b": [jnp.ones(3, jnp.float32)]}
    q = jq.quantize_tree(tree, jq.QuantSpec("int8"))
    back = jq.dequantize_tree(q)
    chex.assert_trees_all_equal_shapes_and_dtypes(back, tree)
    # int8 absmax per tensor: the error is at most half a step, max|x| / 127 / 2.
    chex.assert_trees_all_close(back, tree, atol=1.0 / 254 + 1e-7, rtol=0)
    out["quantized"] = True

    def error_of(fn):
        try:
            fn()
        except ImportError as err:
            return [type(err).__name__, str(err)]
        return None

    out["orbax"] = error_of(lambda: jq.orbax)
    out["digits"] = error_of(lambda: jaxquant.app.datasets.digits())
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(["sweep", "--quick", "--no-progress", "--out", "never-written"])
    out["sweep"] = [rc, err.getvalue()]
    out["loaded"] = sorted({m.partition(".")[0] for m in sys.modules} & BLOCKED)
    print(json.dumps(out))
    """
)


@pytest.mark.slow  # seconds: subprocesses or many compiles (the fast loop skips it)
def test_core_works_without_extras(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_EXTRAS],
        cwd=tmp_path,  # the sweep must refuse before it writes anything here
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["quantized"] and out["loaded"] == []
    assert out["orbax"][0] == "MissingExtraError"
    assert 'pip install "jaxquant[checkpoint]"' in out["orbax"][1]
    assert "orbax-checkpoint" in out["orbax"][1]
    assert out["digits"][0] == "MissingExtraError"
    assert 'pip install "jaxquant[sweep]"' in out["digits"][1]
    assert "scikit-learn" in out["digits"][1]
    rc, stderr = out["sweep"]
    assert rc == 1
    assert stderr.startswith("jaxquant: error: jaxquant sweep needs matplotlib, scikit-learn,")
    assert 'pip install "jaxquant[sweep]"' in stderr
    assert stderr.count("\n") == 1  # one line, no traceback
    assert list(tmp_path.iterdir()) == []


def _project(requirement: str) -> str:
    """The distribution name of a requirement string ("etils[epath]>=1.15" -> "etils")."""
    name = requirement.split(";")[0]
    for stop in "[<>=!~ ":
        name = name.split(stop)[0]
    return name.strip().lower().replace("_", "-")


def test_core_dependencies():
    core = {_project(r) for r in PYPROJECT["project"]["dependencies"]}
    assert core == {"jax", "numpy", "ml-dtypes", "flax", "optax"}


@pytest.mark.parametrize("extra", sorted(extras.EXTRAS))
def test_extras_match_pyproject(extra):
    declared = {_project(r) for r in PYPROJECT["project"]["optional-dependencies"][extra]}
    checked = {_project(pip) for _, pip in extras.EXTRAS[extra]}
    assert checked == declared


def test_dev_extra_installs_every_other_extra_but_the_peers():
    optional = PYPROJECT["project"]["optional-dependencies"]
    dev = optional["dev"]
    (self_ref,) = [r for r in dev if _project(r) == "jaxquant"]
    included = set(self_ref.partition("[")[2].partition("]")[0].split(","))
    # bench (qwix, aqtp) is for benchmarks/peers.py only; the tests never import it.
    assert included == set(optional) - {"dev", "bench"}
    assert {"pytest", "pytest-xdist", "chex", "mypy", "ruff"} <= {_project(r) for r in dev}


def test_missing_extra_rejects_an_unknown_extra():
    with pytest.raises(ValueError, match="extra must be one of"):
        extras.missing_extra("plots", "x")
    with pytest.raises(ValueError, match="extra must be one of"):
        extras.require_extra("plots", "x")


def test_require_extra_passes_when_installed():
    extras.require_extra("sweep", "jaxquant sweep")  # the dev install has every extra
    extras.require_extra("checkpoint", "jaxquant.orbax")


def test_mypy_is_strict_on_every_module_behind_the_public_api():
    strict = next(
        o["module"]
        for o in PYPROJECT["tool"]["mypy"]["overrides"]
        if o.get("disallow_untyped_defs")
    )
    defining = set(PUBLIC)
    for name in PUBLIC:
        module = importlib.import_module(name)
        for symbol in module.__all__:
            home = getattr(getattr(module, symbol), "__module__", None)
            if home is not None and home.startswith("jaxquant"):
                defining.add(home)
    assert defining <= set(strict), sorted(defining - set(strict))


def test_the_old_datasets_module_warns_and_forwards():
    import jaxquant.app.datasets
    import jaxquant.datasets

    with pytest.warns(DeprecationWarning, match="moved to jaxquant.app.datasets.stdlib_bytes"):
        fn = jaxquant.datasets.stdlib_bytes
    assert fn is jaxquant.app.datasets.stdlib_bytes
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = jaxquant.datasets.nope
