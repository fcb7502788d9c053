"""jaxquant's post-training methods beside Qwix's (``qwix.contrib``): GPTQ, AWQ, SmoothQuant,
Hadamard rotation -- quality, calibration time and peak memory (issue 14 item 11).

The model is the issue's anchor: a byte-level transformer LM (:class:`jaxquant.app.models.
ByteLM`, d 256, 4 blocks, MLP 1024, 3.3M parameters; 24 quantized Dense layers
``block<i>/{attn/{q,k,v,o},fc1,fc2}``, the head in float) trained here on the standard
library's source (:func:`jaxquant.app.datasets.stdlib_bytes`; cached in the temp directory),
and its outlier variant (:func:`jaxquant.app.models.inject_outliers`: four residual channels
50-200x at every LayerNorm reader, the same function). 64 calibration sequences (training
windows), 256 held-out windows for the loss. ``--quick``: d 128, 1 block, 16 sequences.

Per variant (base, outliers), library and method, in a FRESH subprocess each (peak memory is
``VmHWM`` of ``/proc/self/status``: XLA's buffers are invisible to tracemalloc):

* ``quality``: held-out loss increase over the float model (nats/byte);
* ``first_s``: the method's first call (tracing + compilation + run); ``second_s``: a second
  identical call in the same process (run only, jit caches warm) where the first took under
  ``--repeat-under`` seconds; ``compile_s ~ first_s - second_s``;
* ``peak_mb``: VmHWM growth over the method's call, from just before it (model, data loaded,
  nothing compiled) -- beside ``float_mb``, the float parameters' bytes;
* ``int8_dots``: for w8a8, the dot_generals with two int8 operands in the served model's
  jaxpr (whether the activations really are quantized).

Formats: w4 / w3 / w2 int per-channel (GPTQ), w4 in groups of 128 along the input (AWQ),
w8a8 int8 per-channel weights x int8 per-tensor activations (SmoothQuant, alpha 0.5), w4a4
int4 per-channel x int4 per-token activations after rotations. Round-to-nearest (RTN) of
each format from both libraries is the baseline.

Grids: Qwix's symmetric integer grid is always the full one (``s = amax / (qmax + 0.5)``,
all ``2^b`` codes; ``qwix/_src/core/numerics.py`` ``get_symmetric_bound``), at every width.
jaxquant's specs here use the same grid (``int_grid="full"``, ``--jq-grid full``, the
default) so that both libraries quantize to the same format; ``--jq-grid auto`` uses
jaxquant's defaults instead (full at int2 / int3, restricted ``amax / qmax`` from int4 on,
``papers/int_grids``). The jaxquant-only formats ``w4r`` and ``w4g128r`` are w4 and w4g128
on the restricted grid, jaxquant's int4 default, measured beside them.

Calibration: 64 training windows (``--quick``: 16), evenly strided through the training
set (``--calib-seed 0``, the default) or drawn at random without replacement with the seed
(``--calib-seed k``), the same windows for both libraries. Qwix's rotation
(``qwix.contrib.hadamard_rot``) is a function on (activation, weight) pairs, not a model
transform: here it is applied the way its module docstring shows, to every quantized
layer's input (the weight rotated offline with the same matrix, ``_apply_hadamard_rhs``;
the activation online before Qwix's quantized dot, ``_apply_hadamard_lhs``). Qwix's GPTQ
uses its defaults (block 128, damping 1% of mean diag H), as does jaxquant's.

Run::

    python3 benchmarks/peers_ptq.py --out benchmarks/results/peers_ptq_cpu.json
    python3 benchmarks/peers_ptq.py --quick --out /tmp/p.json
    python3 benchmarks/peers_ptq.py --markdown benchmarks/results/peers_ptq_cpu.json
    python3 benchmarks/peers_ptq.py --quick --methods awq --calib-seeds 0,1,2,3,4 --out /tmp/s.json
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import common  # noqa: E402

NAME = "peers_ptq"
PAT = r"block\d+/.*"
CONFIGS = {
    "full": {
        "model": {"seq": 64, "d": 256, "layers": 4, "heads": 4, "hidden": 1024},
        "train": {"steps": 400, "batch": 32, "lr": 2e-3, "seed": 0, "max_files": 120},
        "calib": {"n": 4, "size": 16},
        "test_windows": 256,
    },
    "quick": {
        "model": {"seq": 64, "d": 128, "layers": 1, "heads": 4, "hidden": 256},
        "train": {"steps": 150, "batch": 32, "lr": 3e-3, "seed": 0, "max_files": 40},
        "calib": {"n": 2, "size": 8},
        "test_windows": 64,
    },
}
OUTLIERS = {"channels": [5, 17, 40, 58], "scales": [50.0, 100.0, 150.0, 200.0]}

# (method, format) per library; "rtn" jobs of a library share one process (no calibration).
FORMATS = ("w4", "w3", "w2", "w4g128", "w8a8", "w4a4")
JQ_ONLY_FORMATS = ("w4r", "w4g128r")  # jaxquant's int4 default grid (restricted)
JOBS: list[tuple[str, str, str]] = [
    *[(lib, "rtn", f) for lib in ("jaxquant", "qwix") for f in ("all",)],
    *[(lib, "gptq", f) for f in ("w4", "w3") for lib in ("jaxquant", "qwix")],
    ("jaxquant", "gptq", "w4r"),
    ("jaxquant", "gptq", "w2"),
    ("jaxquant", "awq", "w4g128"),
    ("qwix", "awq", "w4g128"),
    ("jaxquant", "awq", "w4g128r"),
    ("jaxquant", "smoothquant", "w8a8"),
    ("qwix", "smoothquant", "w8a8"),
    ("jaxquant", "rotate_residual+rtn", "w4a4"),
    ("jaxquant", "rotate_residual+gptq", "w4a4"),
    ("qwix", "hadamard+rtn", "w4a4"),
]


# ------------------------------------------------------------------------- model and data


def _cache_path(cfg: dict[str, Any]) -> Path:
    import jax

    tag = json.dumps([cfg["model"], cfg["train"], jax.__version__], sort_keys=True).encode()
    return (
        Path(tempfile.gettempdir()) / f"jaxquant_peers_ptq_{hashlib.sha1(tag).hexdigest()[:12]}.npz"
    )


@functools.lru_cache(maxsize=2)
def _data(cfg_name: str) -> dict[str, Any]:
    from jaxquant.app.datasets import stdlib_bytes

    cfg = CONFIGS[cfg_name]
    return stdlib_bytes(
        cfg["model"]["seq"], test_windows=cfg["test_windows"], max_files=cfg["train"]["max_files"]
    )


def _model(cfg_name: str) -> Any:
    from jaxquant.app.models import ByteLM

    return ByteLM(**CONFIGS[cfg_name]["model"])


def _train(cfg_name: str) -> Any:
    import jax
    import jax.numpy as jnp
    import optax

    cfg, model, d = CONFIGS[cfg_name], _model(cfg_name), _data(cfg_name)
    tr = cfg["train"]
    x, y = jnp.asarray(d["x_train"]), jnp.asarray(d["y_train"])
    params = model.init(jax.random.key(tr["seed"]), x[:1])["params"]
    tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, tr["lr"], 20, tr["steps"]))

    def loss(p, xb, yb):
        logits = model.apply({"params": p}, xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @jax.jit
    def run(p, key):
        def step(carry, k):
            p, s = carry
            idx = jax.random.randint(k, (tr["batch"],), 0, x.shape[0])
            g = jax.grad(loss)(p, x[idx], y[idx])
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(step, (p, tx.init(p)), jax.random.split(key, tr["steps"]))[0][0]

    return run(params, jax.random.key(tr["seed"] + 1))


def params(cfg_name: str, variant: str) -> Any:
    """The trained float params (cached), or their outlier variant."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxquant.app.models import inject_outliers

    cfg = CONFIGS[cfg_name]
    path = _cache_path(cfg)
    model = _model(cfg_name)
    template = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, cfg["model"]["seq"]), jnp.int32))[
            "params"
        ]
    )
    leaves, treedef = jax.tree_util.tree_flatten(template)
    p = None
    if path.exists():
        with np.load(path) as f:
            p = jax.tree_util.tree_unflatten(
                treedef, [jnp.asarray(f[f"a{i}"]) for i in range(len(leaves))]
            )
    if p is None:
        t0 = time.perf_counter()
        p = jax.block_until_ready(_train(cfg_name))
        print(f"trained the float LM in {time.perf_counter() - t0:.0f} s", flush=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **{f"a{i}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(p))})
        os.replace(tmp, path)
    if variant == "outliers":
        d = cfg["model"]["d"]
        p = inject_outliers(p, [c % d for c in OUTLIERS["channels"]], OUTLIERS["scales"])
    return p


def calibration(cfg_name: str, seed: int = 0) -> list[Any]:
    """The calibration batches: ``n`` batches of ``size`` training windows, evenly strided
    through the training set (seed 0) or drawn at random without replacement (seed k)."""
    import jax.numpy as jnp
    import numpy as np

    c, x = CONFIGS[cfg_name]["calib"], _data(cfg_name)["x_train"]
    total = c["n"] * c["size"]
    if seed == 0:
        step = max(1, len(x) // total)
        idx = np.arange(total) * step
    else:
        idx = np.sort(np.random.default_rng(seed).choice(len(x), total, replace=False))
    return [jnp.asarray(x[idx[i * c["size"] : (i + 1) * c["size"]]]) for i in range(c["n"])]


def eval_loss(cfg_name: str, apply_fn: Any, variables: Any) -> float:
    import jax
    import jax.numpy as jnp
    import optax

    d = _data(cfg_name)
    f = jax.jit(apply_fn)
    total = 0.0
    xs, ys = d["x_test"], d["y_test"]
    for i in range(0, len(xs), 64):
        logits = f(variables, jnp.asarray(xs[i : i + 64]))
        total += float(
            optax.softmax_cross_entropy_with_integer_labels(
                logits, jnp.asarray(ys[i : i + 64])
            ).sum()
        )
    return total / ys.size


# ------------------------------------------------------------------------- measurement


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs); False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def int8_dots(fn: Any, *args: Any) -> tuple[int, int]:
    """(dot_generals with two int8 operands, all dot_generals) in ``fn``'s jaxpr."""
    import jax
    import jax.numpy as jnp

    def walk(jaxpr: Any) -> tuple[int, int]:
        n8 = n = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                n += 1
                n8 += all(v.aval.dtype == jnp.int8 for v in eqn.invars[:2])
            for p in eqn.params.values():
                for sub in p if isinstance(p, list | tuple) else (p,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        a, b = walk(inner)
                        n8, n = n8 + a, n + b
        return n8, n

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


# ------------------------------------------------------------------------- jaxquant


def jq_rules(fmt: str, grid: str = "full") -> list[Any]:
    """jaxquant's rules for ``fmt``: every int spec on ``grid`` ("full": Qwix's grid;
    "auto": jaxquant's default per width); the ``...r`` formats on the restricted grid."""
    import jaxquant as jq
    from jaxquant.flax import Rule

    if fmt in JQ_ONLY_FORMATS:
        fmt, grid = fmt[:-1], "restricted"
    g = {"int_grid": grid}
    w = {
        "w4": jq.QuantSpec("int4", jq.per_channel(-1), **g),
        "w3": jq.QuantSpec("int3", jq.per_channel(-1), **g),
        "w2": jq.QuantSpec("int2", jq.per_channel(-1), **g),
        "w4g128": jq.QuantSpec("int4", jq.per_block(0, 128), **g),
        "w8a8": jq.QuantSpec("int8", jq.per_channel(-1), **g),
        "w4a4": jq.QuantSpec("int4", jq.per_channel(-1), **g),
    }[fmt]
    act = {
        "w8a8": jq.QuantSpec("int8", **g),
        "w4a4": jq.QuantSpec("int4", jq.per_token(), **g),
    }.get(fmt)
    return [Rule(PAT, weight=w, act=act)]


def jq_method(
    method: str, fmt: str, model: Any, batches: list[Any], v: dict[str, Any], grid: str = "full"
) -> Any:
    """Variables to serve with ``quantize_model(model, jq_rules(fmt, grid))``."""
    from jaxquant import ptq

    rules = jq_rules(fmt, grid)
    if method == "gptq":
        return ptq.gptq(model, batches, v, rules=rules).variables
    if method == "awq":
        return ptq.awq(model, batches, v, rules=rules).variables
    if method == "smoothquant":
        return ptq.smooth_quant(model, batches, v, rules=rules, alpha=0.5).variables
    if method == "rotate_inputs+rtn":
        return ptq.rotate_inputs(model, batches, v, rules=rules).variables
    if method == "rotate_residual+rtn":
        return ptq.rotate_residual(model, batches, v, rules=rules).variables
    if method == "rotate_residual+gptq":
        r = ptq.rotate_residual(model, batches, v, rules=rules).variables
        return ptq.gptq(model, batches, r, rules=rules).variables
    raise ValueError(method)


# ------------------------------------------------------------------------- Qwix

QWIX_W = {
    "w4": "int4",
    "w3": "int3",
    "w2": "int2",
    "w4g128": "int4",
    "w8a8": "int8",
    "w4a4": "int4",
}


def qwix_rule_kwargs(fmt: str) -> dict[str, Any]:
    kw: dict[str, Any] = {"module_path": PAT, "weight_qtype": QWIX_W[fmt]}
    if fmt == "w4g128":
        kw["tile_size"] = 128
    if fmt == "w8a8":  # per-tensor activations, as jaxquant's
        kw.update(act_qtype="int8", act_batch_axes=())
    if fmt == "w4a4":  # per-token: a scale per (batch, position)
        kw.update(act_qtype="int4", act_batch_axes=(0, 1))
    return kw


def qwix_ptq(model: Any, fmt: str, x: Any) -> tuple[Any, Any]:
    """Qwix's PTQ model for ``fmt`` and its abstract quantized params."""
    import jax
    import qwix

    qm = qwix.quantize_model(model, qwix.PtqProvider([qwix.QtRule(**qwix_rule_kwargs(fmt))]))
    abstract = jax.eval_shape(qm.init, jax.random.key(0), x)["params"]
    return qm, abstract


def qwix_calibrate(model: Any, provider: Any, p: Any, batches: list[Any]) -> Any:
    """Qwix's calibration pass: ``quant_stats`` accumulated over the batches (jitted)."""
    import jax
    import qwix

    cm = qwix.quantize_model(model, provider)

    @jax.jit
    def step(stats: Any, x: Any) -> Any:
        variables = {"params": p, **({"quant_stats": stats} if stats is not None else {})}
        return cm.apply(variables, x, mutable="quant_stats")[1]["quant_stats"]

    stats = None
    for x in batches:
        stats = (
            step(stats, x)
            if stats is not None
            else jax.jit(
                lambda x: cm.apply({"params": p}, x, mutable="quant_stats")[1]["quant_stats"]
            )(x)
        )
    return stats


def qwix_method(method: str, fmt: str, model: Any, batches: list[Any], p: Any) -> tuple[Any, Any]:
    """(apply_fn, variables) of Qwix's method, served with its own inference provider."""
    import qwix
    from qwix.contrib import awq, gptq, smooth_quant

    kw = qwix_rule_kwargs(fmt)
    x0 = batches[0]
    if method == "gptq":
        stats = qwix_calibrate(
            model, gptq.GptqCalibrationProvider([gptq.GptqRule(**kw)]), p, batches
        )
        qm, abstract = qwix_ptq(model, fmt, x0)
        qp = gptq.quantize_params(p, abstract, stats)
        return qm.apply, {"params": qp}
    if method == "awq":
        stats = qwix_calibrate(model, awq.AwqCalibrationProvider([awq.AwqRule(**kw)]), p, batches)
        qm, abstract = qwix_ptq(model, fmt, x0)
        qp = awq.quantize_params(p, abstract, stats)
        im = qwix.quantize_model(model, awq.AwqInferenceProvider([qwix.QtRule(**kw)]))
        return im.apply, {"params": qp}
    if method == "smoothquant":
        stats = qwix_calibrate(
            model,
            smooth_quant.SqCalibrationProvider([smooth_quant.SqRule(alpha=0.5, **kw)]),
            p,
            batches,
        )
        qm, abstract = qwix_ptq(model, fmt, x0)
        qp = smooth_quant.quantize_params(p, abstract, stats)
        im = qwix.quantize_model(model, smooth_quant.SqInferenceProvider([qwix.QtRule(**kw)]))
        return im.apply, {"params": qp}
    if method == "hadamard+rtn":
        return qwix_hadamard(model, fmt, p, x0)
    raise ValueError(method)


def qwix_hadamard(model: Any, fmt: str, p: Any, x0: Any) -> tuple[Any, Any]:
    """Qwix's Hadamard input rotation on every quantized layer, then Qwix's PTQ."""
    import math
    import re

    import flax
    import jax
    import qwix
    from qwix._src.providers import ptq as ptq_provider
    from qwix._src.utils import flax_util
    from qwix.contrib import hadamard_rot as hr

    @functools.cache
    def had(n: int) -> Any:  # one random-sign Hadamard per width, as Qwix builds it
        m, _ = hr._create_hadamard_matrix(
            int(math.log2(n)), jax.random.key(0), row_sign_flip=True, col_sign_flip=True
        )
        return m

    class RotatedPtq(qwix.PtqProvider):
        def dot_general(self, lhs, rhs, dimension_numbers, *args, **kwargs):  # type: ignore[no-untyped-def]
            path = "/".join(map(str, flax_util.get_current_module_path()))
            (lc, _), _ = dimension_numbers
            weight = isinstance(rhs, ptq_provider.WithAux) or flax_util.find_param(rhs)
            if weight and re.fullmatch(PAT, path) and len(lc) == 1:  # not q k^T, att v
                lhs = hr._apply_hadamard_lhs(lhs, had(lhs.shape[lc[0]]), lc[0])
            return super().dot_general(lhs, rhs, dimension_numbers, *args, **kwargs)

    flat = flax.traverse_util.flatten_dict(p)
    for k, w in flat.items():
        if k[-1] == "kernel" and re.fullmatch(PAT, "/".join(k[:-1])):
            flat[k] = hr._apply_hadamard_rhs(w, had(w.shape[0]), 0)  # (had^T W) / n, offline
    rotated = flax.traverse_util.unflatten_dict(flat)
    qm = qwix.quantize_model(model, RotatedPtq([qwix.QtRule(**qwix_rule_kwargs(fmt))]))
    abstract = jax.eval_shape(qm.init, jax.random.key(0), x0)["params"]
    return qm.apply, {"params": qwix.quantize_params(rotated, abstract)}


# ------------------------------------------------------------------------- GPTQ, layer by layer


def gptq_codes(cfg_name: str, variants: list[str]) -> list[dict[str, Any]]:
    """jaxquant's GPTQ solver and Qwix's (``qwix.contrib.gptq_core.quantize_weight``) on the
    same ``(W, H)`` of every quantized layer, int4 per output channel on the same (full)
    grid, both with their defaults (damping 1% of mean diag H, blocks of 128, no act order):
    the fraction of equal codes, the largest code difference and scale difference. Shows
    whether the two compute the same algorithm, apart from float rounding order."""
    import jax.numpy as jnp
    import numpy as np
    from qwix._src.core import qarray
    from qwix.contrib import gptq_core

    import jaxquant as jq
    from jaxquant.flax import Rule, layer_statistics
    from jaxquant.ptq import gptq_solve

    model, batches = _model(cfg_name), calibration(cfg_name)
    spec = jq.QuantSpec("int4", jq.per_channel(1), int_grid="full")
    out = []
    for variant in variants:
        p = params(cfg_name, variant)
        rules = [Rule(PAT, weight=jq.QuantSpec("int4", jq.per_channel(-1), int_grid="full"))]
        stats = layer_statistics(model, batches, {"params": p}, rules=rules)
        for path, st in stats.items():
            leaf = p
            for k in path.split("/"):
                leaf = leaf[k]
            w = jnp.asarray(leaf["kernel"], jnp.float32)  # (in, out)
            h = jnp.asarray(st.hessian, jnp.float32)
            ours = gptq_solve(w, h, spec)
            how = qarray.HowToQuantize(qtype=jnp.int4, channelwise_axes=(0,))
            theirs, _ = gptq_core.quantize_weight(w.T, h, how)  # Qwix: (out, in)
            a = np.asarray(ours.qarray.codes()).astype(np.int32)
            b = np.asarray(theirs.qvalue).astype(np.int32).T
            sa = np.asarray(ours.qarray.scale, np.float64).reshape(-1)
            sb = np.asarray(theirs.scale, np.float64).reshape(-1)
            row = {
                "variant": variant,
                "layer": path,
                "inputs": int(w.shape[0]),
                "equal_codes": float((a == b).mean()),
                "max_code_diff": int(np.abs(a - b).max()),
                "max_scale_rel_diff": float(np.abs(sa / sb - 1).max()),
            }
            print(row, flush=True)
            out.append(row)
    return out


# ------------------------------------------------------------------------- one job


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One (variant, library, method, format) in this process; the RTN jobs do every format."""
    import jax

    cfg_name, variant, lib, method, fmt = (
        job["cfg"],
        job["variant"],
        job["lib"],
        job["method"],
        job["format"],
    )
    grid = job.get("jq_grid", "full")
    model = _model(cfg_name)
    p = params(cfg_name, variant)
    batches = calibration(cfg_name, job.get("calib_seed", 0))
    v = {"params": p}
    out: dict[str, Any] = {**job}
    out["float_mb"] = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(p)) / 2**20
    if method == "rtn":
        import jaxquant as jq

        out["float_loss"] = eval_loss(cfg_name, model.apply, v)
        res = {}
        for f in FORMATS + (JQ_ONLY_FORMATS if lib == "jaxquant" else ()):
            try:
                if lib == "jaxquant":
                    qm = jq.flax.quantize_model(model, jq_rules(f, grid))
                    loss = eval_loss(cfg_name, qm.apply, v)
                else:
                    qm, abstract = qwix_ptq(model, f, batches[0])
                    import qwix

                    loss = eval_loss(
                        cfg_name, qm.apply, {"params": qwix.quantize_params(p, abstract)}
                    )
                res[f] = {"loss": loss, "increase": loss - out["float_loss"]}
            except Exception as e:
                res[f] = {"error": _error(e, f"{lib} rtn {f}")}
        out["formats"] = res
        return out

    reset_ok = reset_hwm()
    hwm0 = vm_hwm_mb()
    times = []
    t0 = time.perf_counter()
    try:
        if lib == "jaxquant":
            served = jq_method(method, fmt, model, batches, v, grid)
            jax.block_until_ready(served)
            apply_fn = None  # set below, outside the timed call
        else:
            apply_fn, served = qwix_method(method, fmt, model, batches, p)
            jax.block_until_ready(served)
    except Exception as e:
        out["error"] = _error(e, f"{lib} {method} {fmt}")
        out["first_s"] = time.perf_counter() - t0
        return out
    times.append(time.perf_counter() - t0)
    out["peak_mb"] = vm_hwm_mb() - hwm0
    out["hwm_reset"] = reset_ok
    out["hwm_mb"] = vm_hwm_mb()
    if times[0] < job["repeat_under"]:
        t0 = time.perf_counter()
        if lib == "jaxquant":
            jax.block_until_ready(jq_method(method, fmt, model, batches, v, grid))
        else:
            jax.block_until_ready(qwix_method(method, fmt, model, batches, p)[1])
        times.append(time.perf_counter() - t0)
    out["first_s"] = times[0]
    out["second_s"] = times[1] if len(times) > 1 else None
    if lib == "jaxquant":
        import jaxquant as jq

        apply_fn = jq.flax.quantize_model(model, jq_rules(fmt, grid)).apply
    out["float_loss"] = eval_loss(cfg_name, model.apply, v)
    out["loss"] = eval_loss(cfg_name, apply_fn, served)
    out["increase"] = out["loss"] - out["float_loss"]
    if fmt == "w8a8":
        out["int8_dots"], out["dots"] = int8_dots(apply_fn, served, batches[0])
    return out


def _error(e: BaseException, what: str) -> str:
    print(f"peers_ptq.py: {what} failed:", file=sys.stderr)
    traceback.print_exception(e, file=sys.stderr)
    return f"{type(e).__name__}: {e}"[:600]


# ------------------------------------------------------------------------- driver


def spawn(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    try:
        r = subprocess.run(
            [sys.executable, __file__, "--job", json.dumps(job)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {**job, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        return {**job, "error": f"exit {r.returncode}: {r.stderr[-600:]}"}
    out = json.loads(lines[-1][7:])
    out["process_s"] = time.perf_counter() - t0
    return out


def table(doc: dict[str, Any]) -> str:
    rows = [
        "| variant | method | format | library | loss increase (nats/byte) | first call s | "
        "second call s | peak MB (float params MB) | int8 dots |",
        "|---|---|---|---|--:|--:|--:|--:|--:|",
    ]
    seeded = len(doc["config"].get("calib_seeds", [0])) > 1
    for variant, rs in doc["results"].items():
        for r in rs:
            if seeded:  # one row per (seed, ...): name the seed in the variant column
                variant = f"{r['variant']} (calibration seed {r.get('calib_seed', 0)})"
            if r["method"] == "rtn":
                for f, x in r.get("formats", {}).items():
                    inc = (
                        f"{x['increase']:+.4f}" if "increase" in x else f"FAILED {x['error'][:60]}"
                    )
                    rows.append(f"| {variant} | rtn | {f} | {r['lib']} | {inc} | | | | |")
                continue
            if "error" in r:
                rows.append(
                    f"| {variant} | {r['method']} | {r['format']} | {r['lib']} | FAILED "
                    f"{r['error'][:80]} | {r.get('first_s', 0):.1f} | | | |"
                )
                continue
            sec = f"{r['second_s']:.1f}" if r.get("second_s") is not None else ""
            dots = f"{r['int8_dots']}/{r['dots']}" if "int8_dots" in r else ""
            rows.append(
                f"| {variant} | {r['method']} | {r['format']} | {r['lib']} | "
                f"{r['increase']:+.4f} | "
                f"{r['first_s']:.1f} | {sec} | {r['peak_mb']:.0f} ({r['float_mb']:.1f}) | {dots} |"
            )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small model, 16 sequences")
    ap.add_argument("--out", default=str(common.RESULTS / f"{NAME}_cpu.json"))
    ap.add_argument("--variants", default="base,outliers")
    ap.add_argument("--libs", default="jaxquant,qwix")
    ap.add_argument("--methods", default="", help="subset of rtn,gptq,awq,smoothquant,...")
    ap.add_argument("--repeat-under", type=float, default=60.0)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per job")
    ap.add_argument(
        "--jq-grid",
        default="full",
        choices=("full", "auto"),
        help="jaxquant's int grid: full (Qwix's, the same format) or auto (jaxquant's default)",
    )
    ap.add_argument(
        "--calib-seeds",
        default="0",
        help="comma-separated calibration seeds (0: evenly strided windows; k: random windows)",
    )
    ap.add_argument(
        "--skip",
        default="",
        help="comma-separated lib:method:format jobs not to run (e.g. qwix:gptq:w4)",
    )
    ap.add_argument(
        "--gptq-codes",
        action="store_true",
        help="only compare the two GPTQ solvers' codes layer by layer (same W, H, grid)",
    )
    ap.add_argument("--markdown", default="", metavar="JSON")
    ap.add_argument("--job", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job:
        res = run_job(json.loads(args.job))
        print("RESULT " + json.dumps(res, default=float), flush=True)
        return
    if args.markdown:
        doc = common.read_json(args.markdown)
        print(
            f"{doc['benchmark']}: jax {doc['jax']}, {doc['backend']} ({doc['device']}), "
            f"{doc['date']}"
        )
        print(table(doc))
        return
    cfg_name = "quick" if args.quick else "full"
    params(cfg_name, "base")  # train once (cached) before the jobs
    if args.gptq_codes:
        rows = gptq_codes(cfg_name, args.variants.split(","))
        cfg = {**CONFIGS[cfg_name], "config": cfg_name, "outliers": OUTLIERS, "pattern": PAT}
        common.write_json(common.document(NAME + "_gptq_codes", cfg, {"layers": rows}), args.out)
        return
    from importlib.metadata import version

    cfg = {
        **CONFIGS[cfg_name],
        "config": cfg_name,
        "outliers": OUTLIERS,
        "pattern": PAT,
        "qwix": version("qwix"),
        "repeat_under": args.repeat_under,
        "jq_grid": args.jq_grid,
    }
    methods = {m.strip() for m in args.methods.split(",") if m.strip()}
    libs = args.libs.split(",")
    seeds = [int(k) for k in args.calib_seeds.split(",")]
    skip = {tuple(j.split(":")) for j in args.skip.split(",") if j}
    cfg["calib_seeds"] = seeds
    if skip:
        cfg["skipped_jobs"] = sorted(":".join(j) for j in skip)
    results: dict[str, list[dict[str, Any]]] = {}
    for variant in args.variants.split(","):
        results[variant] = []
        for seed in seeds:
            for lib, method, fmt in JOBS:
                if lib not in libs or (methods and method not in methods):
                    continue
                if (lib, method, fmt) in skip:
                    continue
                job = {
                    "cfg": cfg_name,
                    "variant": variant,
                    "lib": lib,
                    "method": method,
                    "format": fmt,
                    "repeat_under": args.repeat_under,
                    "jq_grid": args.jq_grid,
                    "calib_seed": seed,
                }
                r = spawn(job, args.timeout)
                results[variant].append(r)
                brief = r.get("error", "")[:120] or (
                    f"+{r.get('increase', 0):.5f} first {r.get('first_s', 0):.1f} s "
                    f"peak {r.get('peak_mb', 0):.0f} MB"
                )
                print(
                    f"{variant} seed {seed} {lib} {method} {fmt}: {brief} "
                    f"[{r.get('process_s', 0):.0f} s]",
                    flush=True,
                )
                common.write_json(common.document(NAME, cfg, results), args.out)
    doc = common.document(NAME, cfg, results)
    if len(seeds) > 1:
        doc["paired"] = paired(doc)
    common.write_json(doc, args.out)
    print(table(doc))
    for line in doc.get("paired", []):
        print(line)


def paired(doc: dict[str, Any]) -> list[str]:
    """Per variant and (method, format) run by both libraries over the calibration seeds:
    the mean paired difference jaxquant - Qwix of the loss increase, with a t interval."""
    import numpy as np
    from scipy import stats

    out = []
    for variant, rs in doc["results"].items():
        by: dict[tuple[str, str, str], dict[int, float]] = {}
        for r in rs:
            if "increase" in r:
                by.setdefault((r["method"], r["format"], r["lib"]), {})[r["calib_seed"]] = r[
                    "increase"
                ]
        for (method, fmt, lib), ours in sorted(by.items()):
            theirs = by.get((method, fmt[:-1] if fmt in JQ_ONLY_FORMATS else fmt, "qwix"))
            if lib != "jaxquant" or not theirs:
                continue
            common_seeds = sorted(set(ours) & set(theirs))
            if len(common_seeds) < 2:
                continue
            a = np.array([ours[k] for k in common_seeds])
            b = np.array([theirs[k] for k in common_seeds])
            d = a - b
            half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
            out.append(
                f"{variant} {method} {fmt}: jaxquant {a.mean():+.5f} vs Qwix {b.mean():+.5f}; "
                "paired difference "
                f"{d.mean():+.5f} (95% t interval {d.mean() - half:+.5f} .. {d.mean() + half:+.5f},"
                f" {len(d)} seeds; {int((d < 0).sum())} of {len(d)} favour jaxquant)"
            )
    return out


if __name__ == "__main__":
    main()
