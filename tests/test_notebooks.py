"""The notebooks in notebooks/: stored without outputs, and each one runs without errors.

Every notebook asserts its own key facts (the worked example's int8 values, stochastic
rounding's unbiasedness, the loss scale backing off, ...), so executing it is a test. The
kernel is this interpreter (``sys.executable``), on CPU, with matplotlib's Agg backend, in
a temporary working directory per notebook.

One kernel per test process runs the notebooks one after the other (starting a kernel and
importing jax, flax and scikit-learn is seconds of CPU each time, and the notebooks share
jaxquant's compiled quantizers): before each notebook, ``%reset -f`` empties its namespace
(a notebook that forgets an import still fails) and the figures are closed. The kernel
uses the suite's persistent XLA cache (tests/conftest.py), so a warm run compiles nothing.
"""

import gc
import json
import os
import sys
from pathlib import Path

import jax
import nbformat
import pytest

nbclient = pytest.importorskip("nbclient")
jupyter_client = pytest.importorskip("jupyter_client")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = [
    "01_number_formats_and_bits.ipynb",
    "02_quantization_basics.ipynb",
    "03_granularity_and_calibration.ipynb",
    "04_qat_and_stochastic_rounding.ipynb",
    "05_mixed_precision_and_loss_scaling.ipynb",
    "06_ptq_size_and_mixed_precision.ipynb",
]
CELL_TIMEOUT_S = 120

pytestmark = [
    # jupyter_client leaves its channels' zmq sockets to the garbage collector, where pyzmq
    # warns about them (seen with jupyter_client 8.10, pyzmq 26/27).
    pytest.mark.filterwarnings("ignore:Unclosed socket <zmq:ResourceWarning"),
    pytest.mark.filterwarnings("ignore:Unclosed context <zmq:ResourceWarning"),
]


def _ids(paths):
    return [p.stem for p in paths]


def test_every_notebook_is_there():
    assert [p.name for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code cells"
    for i, cell in enumerate(code):
        assert cell.outputs == [], f"{path.name}: code cell {i} was stored with outputs"
        assert cell.execution_count is None, f"{path.name}: code cell {i} has an execution count"
    assert any(c.cell_type == "markdown" for c in nb.cells)


def _kernel_manager(tmp_path):
    """A kernel manager for a "python3" kernel that runs this very interpreter.

    The spec lives in a temporary directory, so the test does not depend on which kernel
    specs (if any) the machine has installed.
    """
    kernel_dir = tmp_path / "kernels" / "python3"
    kernel_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (jaxquant tests)",
        "language": "python",
    }
    (kernel_dir / "kernel.json").write_text(json.dumps(spec))
    ksm = jupyter_client.kernelspec.KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    return jupyter_client.KernelManager(kernel_name="python3", kernel_spec_manager=ksm)


def _kernel_env():
    env = dict(os.environ)
    # The suite's XLA flags (tests/conftest.py: LLVM -O0, the elemental fusion emitters; most
    # of a notebook's time is compiling) less its 8 fake CPU devices: the notebooks want 1.
    env.pop("XLA_FLAGS", None)
    if env.get("JAXQUANT_TEST_CHILD_XLA_FLAGS"):
        env["XLA_FLAGS"] = env["JAXQUANT_TEST_CHILD_XLA_FLAGS"]
    env["JAX_PLATFORMS"] = "cpu"
    env["MPLBACKEND"] = "Agg"
    # jaxquant from this checkout, whether or not it is installed
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cache = jax.config.jax_compilation_cache_dir  # set by conftest unless turned off
    if cache:
        env["JAX_COMPILATION_CACHE_DIR"] = cache
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """A started kernel manager, shared by this process's notebooks."""
    tmp = tmp_path_factory.mktemp("kernel")
    km = _kernel_manager(tmp)
    km.start_kernel(env=_kernel_env(), cwd=str(tmp))
    yield km
    km.shutdown_kernel(now=True)


def _setup_cell(workdir):
    """The notebook's first cell here: a fresh namespace, no figures, its own folder."""
    code = f"""%reset -f
import os as _os, sys as _sys
if "matplotlib.pyplot" in _sys.modules:
    _sys.modules["matplotlib.pyplot"].close("all")
_os.chdir({str(workdir)!r})
del _os, _sys"""
    return nbformat.v4.new_code_cell(code)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs(path, tmp_path, kernel):
    nb = nbformat.read(path, as_version=4)
    workdir = tmp_path / "work"
    workdir.mkdir()
    if not kernel.is_alive():  # an earlier notebook killed it
        kernel.restart_kernel(now=True)
    nb.cells.insert(0, _setup_cell(workdir))
    client = nbclient.NotebookClient(
        nb,
        km=kernel,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(workdir)}},
    )
    try:
        # A failing cell (an assert in the notebook included) raises CellExecutionError.
        client.execute()
    finally:
        if client.kc is not None:  # the kernel is not ours to stop: only this client
            client.kc.stop_channels()
        # Collect the kernel client's sockets now, while this test's warning filters apply.
        del client
        gc.collect()
    assert nb.cells[0].outputs == [], nb.cells[0].outputs  # the setup cell: silent
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: {errors[0].ename}: {errors[0].evalue}"
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, f"{path.name} made no plot (no image/png output)"
