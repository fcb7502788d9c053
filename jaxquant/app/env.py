"""The environment record: where, when and with what code a result was measured. One
record for the sweep's ``env.json``, the benchmarks' JSON files and the papers' results."""

from __future__ import annotations

import datetime
import os
import platform
import re
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import jax

__all__ = ["device_slug", "environment", "git_state"]

# The checkout this package was imported from (the repository root of an editable
# install; a site-packages copy has no .git and records "unknown").
_ROOT = Path(__file__).resolve().parents[2]
# The packages a record lists, by distribution name.
PACKAGES = (
    "jaxquant",
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "numpy",
    "ml_dtypes",
    "scikit-learn",
    "matplotlib",
)

# jax settings that change what a run computes
_JAX_CONFIG = ("jax_enable_x64", "jax_default_matmul_precision")


def git_state() -> str:
    """The checkout's commit, ``+dirty`` when ``jaxquant/`` has uncommitted changes, or
    ``"unknown"`` (an installed copy, or a tree without ``.git`` as on a device).

    Example:
      >>> from jaxquant.app.env import git_state
      >>> isinstance(git_state(), str)
      True
    """

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", *args], cwd=_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--", "jaxquant")
        return git("rev-parse", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# the code that runs is the code imported now, whatever is edited while it runs
GIT_AT_IMPORT = git_state()


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment(**extra: Any) -> dict[str, Any]:
    """Where and when a result was measured, as a JSON-ready dict.

    Keys: ``date`` (UTC), ``argv``, ``host``, ``python``, ``platform``, ``jax``,
    ``jaxlib``, ``flax`` (flat, for table headers) and ``versions`` (every package of
    :data:`PACKAGES`), ``backend``, ``device`` (kind), ``devices`` (count),
    ``platform_version`` (CUDA and driver on GPUs), ``process`` (index, count),
    ``host_cpus``, ``loadavg``, ``git`` (the jaxquant commit when imported, see
    :func:`git_state`), ``jax_config`` (x64, default matmul precision); then ``extra``.

    Example:
      >>> from jaxquant.app.env import environment
      >>> env = environment(task="demo")
      >>> env["backend"], env["task"]
      ('cpu', 'demo')
    """
    dev = jax.devices()[0]
    try:
        cpus: int | None = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count()
    try:
        load: list[float] | None = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    try:
        platform_version = dev.client.platform_version
    except AttributeError:
        platform_version = None
    versions = {pkg: _version(pkg) for pkg in PACKAGES}
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "argv": list(sys.argv),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "jaxlib": versions["jaxlib"],
        "flax": versions["flax"],
        "versions": versions,
        "backend": jax.default_backend(),
        "device": dev.device_kind,
        "devices": jax.device_count(),
        "platform_version": platform_version,
        "process": [jax.process_index(), jax.process_count()],
        "host_cpus": cpus,
        "loadavg": load,
        "git": GIT_AT_IMPORT,
        # the settings that change numerics (read by name: not every jax version types them)
        "jax_config": {k: getattr(jax.config, k) for k in _JAX_CONFIG},
        **extra,
    }


def device_slug() -> str:
    """A short file-name tag for the device: ``cpu``, ``h100``, ``h200``, ``a100``...

    Example:
      >>> from jaxquant.app.env import device_slug
      >>> device_slug()
      'cpu'
    """
    if jax.default_backend() == "cpu":
        return "cpu"
    kind = jax.devices()[0].device_kind.lower()
    m = re.search(r"\b([a-z]\d{2,4})\b", kind)
    return m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", kind).strip("-")
