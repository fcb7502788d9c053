"""Strict JAX for every test (equinox-style): no silent dtype or rank promotion.

Also the things that keep the suite fast (issue 13):

* XLA's CPU backend at LLVM -O0 with its elemental fusion emitters (below, with the
  measurements);
* XLA's persistent compilation cache, in the system's temporary directory: most of a
  test's time is compiling, and an edit-test loop recompiles the same programs. The cache
  key holds the program, the compile options, the jax / jaxlib version and the backend,
  so a hit is the same executable. ``JAX_COMPILATION_CACHE_DIR`` picks another folder;
  ``JAXQUANT_TEST_XLA_CACHE=0`` turns it off (a cold run, as on a fresh CI machine).
* ``-m "not slow"``, the edit-test loop: besides the tests marked ``slow`` by hand (end-to-end
  training, third-party models, notebooks, papers, sweeps), a parametrized test runs its
  first case only; its other cases are marked ``slow``. A test whose grid already marks
  some cases ``slow`` by hand keeps exactly those marks. The docstring examples (doctests
  of jaxquant/, a third of the loop's time: each compiles its own programs) run in the
  whole suite and in the docs build, not in the loop. The whole suite runs every case.
* Python's cyclic garbage collector told that the collected tests, the imported modules
  and jax's caches are long-lived (below).
"""

import gc
import os
import subprocess
import sys
import tempfile

# XLA flags, set before jax initialises (a flag the caller gives is kept):
# * eight fake CPU devices for the sharding tests;
# * LLVM at -O0: compiling 10,000 small programs is most of the suite's time, and
#   unoptimized code generation halves LLVM's share of it. Whole suite, cold, 2 quiet
#   cores, one run after the other (2026-12-07): 5:27 wall and 603 user CPU-s, against
#   7:55 and 895 at -O1, and 10:47 and 1,228 at XLA's defaults (-O3, the new emitters),
#   where it passes too. Two kinds of program need the optimizer and ask for it
#   (tests/xla_options.py): long-running ones (the digits CNN's training ran 20x slower)
#   and checks that XLA's two copies of a value agree bit for bit (unoptimized LLVM
#   contracts a * b + c into an FMA in some fusions, not others). The main job in CI and
#   the docs build run XLA's defaults.
# * XLA:CPU's elemental (pre-MLIR) fusion emitters: 61% of the suite's time is XLA
#   compiling some 3,000 small programs, and these emit them faster. Cold, one process:
#   test_int_grids + test_rounding 81 s instead of 121 (compile 45 s instead of 80); at
#   -O0 the gap is wider (64 quantizer programs: 2.1 CPU-s, 4.7 with the default
#   emitters). Only where this XLA still knows the flag: an unknown XLA flag aborts the
#   process, so a child process tries it first.
_FLAGS = {
    "--xla_force_host_platform_device_count": "8",
    "--xla_backend_optimization_level": "0",
    "--xla_cpu_use_fusion_emitters": "false",
}
_MAY_BE_UNKNOWN = {"--xla_cpu_use_fusion_emitters"}  # newer than the others: tried first
_PROBED = "JAXQUANT_TEST_XLA_FLAGS"  # set once, so pytest-xdist's workers inherit it
_CHILD = "JAXQUANT_TEST_CHILD_XLA_FLAGS"  # XLA_FLAGS for a test's child process


# jaxlib releases checked to know every flag above (the probe below costs 2 s of a
# 90-second edit-test loop; any other release is probed).
_CHECKED_JAXLIB = {(0, 10)}


def _xla_accepts(flag: str) -> bool:
    from importlib.metadata import version  # jaxlib's, without importing it

    if tuple(int(p) for p in version("jaxlib").split(".")[:2]) in _CHECKED_JAXLIB:
        return True
    probe = "import jax, jax.numpy as jnp; jnp.zeros(1).block_until_ready()"
    env = {**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, check=False)
    return done.returncode == 0


if _PROBED not in os.environ:
    given = os.environ.get("XLA_FLAGS", "")
    extra = [
        f"{name}={value}"
        for name, value in _FLAGS.items()
        if name not in given and (name not in _MAY_BE_UNKNOWN or _xla_accepts(f"{name}={value}"))
    ]
    os.environ["XLA_FLAGS"] = " ".join([given, *extra]).strip()
    os.environ[_PROBED] = "1"
    # The same flags, less the 8 fake devices, for the processes tests start (notebook
    # kernels, sweep drivers): the faster compiles, on one CPU device.
    os.environ[_CHILD] = " ".join(
        f
        for f in os.environ["XLA_FLAGS"].split()
        if not f.startswith("--xla_force_host_platform_device_count")
    )

# The imports follow the flags: jax reads XLA_FLAGS when it initialises.
import jax  # noqa: E402
import pytest  # noqa: E402
from _pytest.doctest import DoctestItem  # noqa: E402  # pytest exports no public name for it

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
# The tests bound float32 dots by float32 rounding; GPUs and TPUs would otherwise run them
# in TF32 / bf16 passes (a no-op on CPU, which the suite targets).
jax.config.update("jax_default_matmul_precision", "highest")

if os.environ.get("JAXQUANT_TEST_XLA_CACHE", "1") != "0":
    jax.config.update(
        "jax_compilation_cache_dir",
        os.environ.get("JAX_COMPILATION_CACHE_DIR")
        or os.path.join(tempfile.gettempdir(), "jaxquant-tests-xla-cache"),
    )
    # Cache every program: the suite's are small and each compiles in well under a second.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config, items):
    """Mark every case but the first of an unmarked parametrized test ``slow``, and every
    doctest."""
    del config
    grids: dict[tuple[object, str], list[pytest.Item]] = {}
    for item in items:
        if isinstance(item, DoctestItem):
            item.add_marker(pytest.mark.slow)
        spec = getattr(item, "callspec", None)
        if spec is not None:
            grids.setdefault((item.path, item.originalname), []).append(item)
    for cases in grids.values():
        if any(case.get_closest_marker("slow") for case in cases):
            continue  # a hand-picked fast subset
        for case in cases[1:]:
            case.add_marker(pytest.mark.slow)


def pytest_collection_finish(session):
    """Freeze what collection built and make full collections rare.

    A worker's heap only grows (modules, test items, jax's trace and executable caches),
    and each automatic full (generation-2) collection walks all of it: measured on four
    test files in one process (test_flax_scan, test_sensitivity, test_int_grids,
    test_oracles; 94 s), 27 full collections took 8.3 s. With the collected heap frozen and
    a full collection due only after 1,000 generation-1 ones, 3.3 s (12, the rest
    explicit ``gc.collect()`` calls by pytest and libraries); peak memory the same
    (2.2-2.3 GB). The whole suite, cold on 2 cores: 8:58 wall and 1,010 CPU-s instead of
    10:15 and 1,158 (the workers' heaps are larger still). Young cycles are still
    collected as before.
    """
    del session
    gc.collect()
    gc.freeze()
    gc.set_threshold(700, 10, 1000)


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture
def evaluators(monkeypatch):
    """The evaluators the sweeps of a test build (``jaxquant.app.sweep.run.Evaluator``),
    kept: a test inspects the float model its sweep trained (a fresh Evaluator would train,
    trace and compile it again)."""
    from jaxquant.app.sweep import run

    made: list[run.Evaluator] = []

    class Kept(run.Evaluator):
        def __init__(self, cfg):
            super().__init__(cfg)
            made.append(self)

    monkeypatch.setattr(run, "Evaluator", Kept)
    return made
