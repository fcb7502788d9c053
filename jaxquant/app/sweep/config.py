"""The sweep's configuration: presets, TOML loading and validation, the config hash.

A configuration is a plain, JSON-able dict (the *resolved* config, written back as
``config.toml`` in the run folder). :func:`load` validates every key and value before
anything runs; a mistake raises :class:`ConfigError` with one line naming the key::

    sweep config: grid.formats[2] = 'int9' is not a format; known: float32, fp16, ...

The format, every key with an example, is :data:`FORMAT` (``jaxquant sweep --help``
prints it; the README's "Sweeps on your own model" shows a whole file).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import math
import os
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

# ConfigError lives beside toml_value so that recipes.py (which these checks call) need not
# import this module back; the sweep's callers still catch it from here.
from jaxquant.app.sweep.errors import ConfigError
from jaxquant.app.sweep.errors import toml_value as _toml_value

FORMAT = """\
TOML config (jaxquant sweep --config FILE): every key is optional; a preset (digits-mlp
unless `preset` says otherwise; `jaxquant sweep` without --config runs stdlib-lm) fills
the rest. Task functions are named by import path
"module:name"; modules in the current directory and in the config file's directory
import as they are (no PYTHONPATH needed).

  preset = "digits-mlp"        # the base: stdlib-lm | digits-mlp | digits-cnn
  seeds = [0, 1]               # one float model per seed (its init and data order)

  [task]
  name = "resnet"              # letters, digits, '_', '.', '-' (the rows' task column)
  model = "models:resnet"      # a callable, called with model_kwargs (lists as tuples),
                               # plus seed=<seed> and rngs=nnx.Rngs(<seed>) if it takes
                               # parameters so named; it returns a flax.linen.Module
                               # (initialised by the sweep from the seed), a pair
                               # (linen_module, variables) with every collection
                               # (params, batch_stats...), or an nnx.Module (its
                               # nnx.Param variables are the weights; it runs in the mode
                               # the factory leaves it: call model.eval() there)
  model_kwargs = { depth = 2 } # keyword arguments of model (optional)
  data = "models:data"         # (**data_kwargs) -> {x_train, y_train, x_test, y_test};
                               # x: an array, a tuple of arrays (positional arguments)
                               # or a dict of arrays (keyword arguments); y: the labels
                               # the loss and metric read; examples on the leading axis
  data_kwargs = { n = 512 }    # optional
  call_kwargs = { train = false }  # keywords of every evaluation and calibration call
                               # (and of a bare Linen module's init), e.g. train=False,
                               # deterministic=True (optional)
  train_kwargs = { train = true }  # keywords of the training calls (float training
                               # and QAT; default: call_kwargs); Linen collections
                               # besides params (batch_stats) are updated by them
  axis_name = "batch"          # training calls run under jax.vmap(axis_name=...), for
                               # BatchNorm(axis_name=...) in training mode (optional)
  output = "models:logits"     # model output -> the array the loss and metric read,
                               # e.g. def logits(out): return out.logits (optional)
  loss = "models:loss"         # (output, labels) -> the batch's mean loss; training
                               # objective and test_loss (default: softmax
                               # cross-entropy with integer labels)
  metric = "models:top1"       # (output, labels) -> the batch's mean score; the
                               # test_acc / float_acc columns (default: accuracy in %)
  epochs = 0                   # float training: epochs over x_train; 0 (with steps 0):
                               # none, the factory's weights as they are
  steps = 0                    # float training steps instead, when > 0
  lr = 1e-3                    # Adam learning rate of float training (cosine decay)
  batch = 64                   # training batch (also calibration batches)
  eval_batch = 256             # evaluation batch (optional)
  layers = "block.*"           # quantize the layers whose path fullmatches (optional;
                               # default every leaf `kernel` of rank >= 2)

  [grid]                       # PTQ: the product, made canonical; every key needed
  formats = ["int8", "int4"]   # float32 fp16 bf16 fp8_e4m3 fp8_e5m2 int8 int4 int3 int2
                               # nf4 fp6_e2m3 fp6_e3m2 fp4 mxfp8 mxfp6 mxfp4 ternary binary
  granularities = ["channel"]  # tensor | channel | blockN (e.g. block32)
  calibrations = ["absmax"]    # absmax mse kl none percentile:P mean_std:K
  roundings = ["nearest"]      # nearest | stochastic
  modes = ["ptq", "qat"]
  activations = ["none"]       # also quantize layer inputs, static ranges (optional)
  methods = ["rtn", "gptq"]    # post-training methods (optional; default ["rtn"]):
                               # rtn (round to nearest) | gptq | awq | smoothquant |
                               # rotate, or steps joined by '+' applied left to right
                               # (rotate+smoothquant+gptq): transforms (rotate,
                               # smoothquant, awq) first, gptq last; smoothquant needs
                               # quantized activations (no "none" in its product)
  also = [{ formats = ["int8"], activations = ["int4"] }]  # more PTQ products (optional):
                               # each table replaces some of the keys above (not modes)
                               # for one more product; the cells are the union

  [qat]                        # QAT cells: formats x granularities, nearest rounding
  formats = ["int4"]           # [] with recipes: the recipe cells alone
  granularities = ["channel"]
  activations = ["none"]       # dynamic per-batch activation quantization (optional)
  steps = 200                  # QAT steps (train_kwargs, batch) from the float weights
  lr = 3e-4
  recipes = ["nvfp4", { recipe = "nvfp4", hadamard = [] }, "bf16", "float32"]
                               # training recipes, one cell each per seed (optional):
                               # jaxquant.recipes names (fp8_current, mxfp8, nvfp4,
                               # mxfp4...) or tables { recipe = NAME, switch = value }
                               # with its function's switches; "float32" (unquantized)
                               # and "bf16" (bf16 operands and gradients) are baselines
  start = "float"              # "float": QAT fine-tunes the trained float model;
                               # "scratch": trains from the task's init for qat.steps,
                               # and float_acc / float_loss are then those of the float
                               # model trained the same way (same init, batches, steps)
  keep_float = ["head"]        # layers (patterns, fullmatch) every QAT cell keeps in
                               # float, e.g. a head a recipe's blocks do not fit
"""


# Formats the sweep knows by short name -> jaxquant format name.
FORMATS: dict[str, str] = {
    "float32": "float32",
    "fp16": "float16",
    "bf16": "bfloat16",
    "fp8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
    "int8": "int8",
    "int4": "int4",
    "int3": "int3",
    "int2": "int2",
    "nf4": "nf4",
    "fp6_e2m3": "float6_e2m3fn",
    "fp6_e3m2": "float6_e3m2fn",
    "fp4": "float4_e2m1fn",
    "mxfp8": "mxfp8",
    "mxfp6": "mxfp6",
    "mxfp4": "mxfp4",
    "ternary": "ternary",
    "binary": "binary",
}
# Activation formats (per tensor, one static or per-batch scale): "none" keeps them float.
ACTIVATIONS = ("none", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "int8", "int4")
CALIBRATIONS = ("absmax", "mse", "percentile:P", "mean_std:K", "kl", "none")
ROUNDINGS = ("nearest", "stochastic")
MODES = ("ptq", "qat")
# PTQ methods (grid.methods): "rtn", or steps joined by "+" and applied left to right --
# transforms of the float model (each at most once) then, optionally, the GPTQ solver;
# without it the transformed weights are rounded to nearest.
TRANSFORMS = ("rotate", "smoothquant", "awq")
SOLVERS = ("gptq",)
METHOD_EXAMPLES = "rtn, gptq, awq, smoothquant, rotate+gptq, rotate+smoothquant+gptq"
# jax.random.key keeps a seed's low 32 bits (without x64): seed 2**32 would repeat seed 0
# and label its results as another seed's.
MAX_SEED = 2**32 - 1
MAX_COUNT = 2**31 - 1  # epochs, steps, batch: int32 in the jitted training loops
_GRAN_RE = re.compile(r"tensor|channel|block(\d+)")
_CAL_RE = re.compile(r"absmax|mse|kl|none|percentile:([0-9.]+)|mean_std:([0-9.]+)")

PRESETS: dict[str, dict[str, Any]] = {
    "digits-mlp": {
        "seeds": [0, 1],
        "task": {
            "name": "digits-mlp",
            "model": "jaxquant.app.models:MLP",
            "model_kwargs": {"features": [256, 256]},
            "data": "jaxquant.app.datasets:digits",
            "epochs": 30,
            "lr": 1e-3,
            "batch": 64,
        },
        "grid": {
            "formats": [
                "float32",
                "fp16",
                "bf16",
                "fp8_e4m3",
                "fp8_e5m2",
                "int8",
                "int4",
                "nf4",
                "mxfp4",
                "ternary",
                "binary",
            ],
            "granularities": ["channel", "block32"],
            "calibrations": ["absmax", "mse"],
            "roundings": ["nearest", "stochastic"],
            "modes": ["ptq", "qat"],
        },
        "qat": {
            "formats": ["fp8_e4m3", "int4", "ternary", "binary"],
            "granularities": ["channel"],
            "steps": 200,
            "lr": 3e-4,
        },
    },
}
PRESETS["digits-cnn"] = copy.deepcopy(PRESETS["digits-mlp"])
PRESETS["digits-cnn"]["task"] |= {
    "name": "digits-cnn",
    "model": "jaxquant.app.models:CNN",
    "model_kwargs": {"channels": [32, 32], "hidden": 64},
    "epochs": 15,
    "lr": 2e-3,
}
PRESETS["digits-cnn"]["qat"]["steps"] = 100
# The default (`jaxquant sweep`): a small byte-level transformer (the Linen twin of
# benchmarks/qat_lm.py's model, at a quarter of its width) trained on the standard
# library's source. Its Linear layers inside the blocks are quantized; embedding,
# positions, LayerNorms, the attention products and the output head stay in float. It is
# the default because the digits models cannot tell methods apart: there every cell of 4
# bits or more lands within 0.5 points of float, while on this model int4 per tensor /
# channel / block32, absmax / mse, int4 / nf4 / mxfp4, fp8 e4m3 / e5m2 and PTQ / QAT differ
# by several times the seed noise in test loss (the numbers: issue 13, item 8).
PRESETS["stdlib-lm"] = {
    "seeds": [0, 1],
    "task": {
        "name": "stdlib-lm",
        "model": "jaxquant.app.models:ByteLM",
        "model_kwargs": {"seq": 64, "d": 64, "layers": 2, "heads": 4, "hidden": 256},
        "data": "jaxquant.app.datasets:stdlib_bytes",
        "data_kwargs": {"seq": 64, "test_windows": 256},
        "epochs": 1,
        "steps": 400,
        "lr": 3e-3,
        "batch": 32,
        "layers": "block.*",
    },
    "grid": {
        # Where methods differ: 3-4 bit formats x granularity x calibration. (A 99.9th
        # percentile of a channel's 64 weights is nearly its absmax: percentile is
        # measured on activations below.)
        "formats": ["int4", "int3", "nf4", "fp4"],
        "granularities": ["tensor", "channel", "block32"],
        "calibrations": ["absmax", "mse"],
        "roundings": ["nearest"],
        "modes": ["ptq", "qat"],
        "also": [
            # The reference points: float, the 8-bit formats, MX and 1-2 bit weights.
            {
                "formats": [
                    "float32",
                    "bf16",
                    "fp8_e4m3",
                    "fp8_e5m2",
                    "int8",
                    "mxfp4",
                    "ternary",
                    "binary",
                ],
                "granularities": ["channel"],
                "calibrations": ["absmax"],
            },
            # Stochastic rounding (unbiased, noisier: worse for PTQ).
            {
                "formats": ["int4", "int3"],
                "granularities": ["channel"],
                "calibrations": ["absmax"],
                "roundings": ["stochastic"],
            },
            # Activations too (W8A8, W8A4): the static range's calibration matters at 4
            # bits (W8A8 is lossless with any of them).
            {
                "formats": ["int8"],
                "granularities": ["channel"],
                "calibrations": ["absmax"],
                "activations": ["int8"],
            },
            {
                "formats": ["int8"],
                "granularities": ["channel"],
                "calibrations": ["absmax", "mse", "percentile:99.9"],
                "activations": ["int4"],
            },
            {
                "formats": ["fp8_e4m3"],
                "granularities": ["channel"],
                "calibrations": ["absmax"],
                "activations": ["fp8_e4m3", "fp8_e5m2"],
            },
        ],
    },
    "qat": {
        "formats": ["int4", "int3", "ternary"],
        "granularities": ["channel"],
        "steps": 100,
        "lr": 3e-4,
    },
}
# The preset a bare `jaxquant sweep` runs, and the one a config file without `preset`
# builds on (a custom model inherits the digits MLP's schedule -- epochs, not the LM's
# fixed steps -- and grid, as before the LM became the default).
DEFAULT_PRESET = "stdlib-lm"
FILE_PRESET = "digits-mlp"
QUICK_TASK: dict[str, dict[str, Any]] = {  # --quick: each preset's small model
    "digits-mlp": {"model_kwargs": {"features": [64, 64]}, "epochs": 10},
    "digits-cnn": {"epochs": 3},
    "stdlib-lm": {
        "model_kwargs": {"seq": 32, "d": 32, "layers": 1, "heads": 2, "hidden": 64},
        "data_kwargs": {"seq": 32, "test_windows": 32, "max_files": 20},
        "steps": 30,
    },
}
QUICK = {  # --quick: a smoke test of every kind of cell (< 40 s on 2 cores)
    "seeds": [0],
    "grid": {
        "formats": ["float32", "int8", "int4", "ternary"],
        "granularities": ["channel"],
        "calibrations": ["absmax"],
        "roundings": ["nearest"],
        "modes": ["ptq", "qat"],
    },
    "qat": {"formats": ["int4"], "granularities": ["channel"], "steps": 30},
}

_SCHEMA: dict[str, Any] = {
    "preset": str,
    "seeds": list,
    "task": {
        "name": str,
        "model": str,
        "model_kwargs": dict,
        "data": str,
        "data_kwargs": dict,
        "epochs": int,
        "steps": int,
        "lr": float,
        "batch": int,
        "layers": str,
        "call_kwargs": dict,
        "train_kwargs": dict,
        "axis_name": str,
        "output": str,
        "loss": str,
        "metric": str,
        "eval_batch": int,
    },
    "grid": {
        "formats": list,
        "granularities": list,
        "calibrations": list,
        "roundings": list,
        "modes": list,
        "activations": list,
        "methods": list,
        "also": list,
    },
    "qat": {
        "formats": list,
        "granularities": list,
        "steps": int,
        "lr": float,
        "activations": list,
        "recipes": list,
        "start": str,
        "keep_float": list,
    },
}
# qat.start: where QAT cells begin (see FORMAT).
STARTS = ("float", "scratch")


_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    list: "a list",
    dict: "a table",
}


def _fail(key: str, msg: str) -> ConfigError:
    return ConfigError(f"sweep config: {key} {msg}")


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``over``, one level of tables deep (lists are replaced)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not k.endswith("_kwargs"):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _check_schema(raw: dict[str, Any], schema: dict[str, Any], prefix: str = "") -> None:
    for k, v in raw.items():
        key = f"{prefix}{k}"
        if k not in schema:
            raise _fail(key, f"is not a known key; known: {', '.join(schema)}")
        want = schema[k]
        if isinstance(want, dict):
            if not isinstance(v, dict):
                raise _fail(key, f"must be a table ([{key}]), got {type(v).__name__}")
            _check_schema(v, want, key + ".")
            continue
        ok = isinstance(v, want) and not (want is int and isinstance(v, bool))
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            ok = True
        if not ok:
            raise _fail(key, f"= {v!r} must be {_TYPE_NAMES[want]}")


def _check_list(key: str, values: list, check) -> None:
    if not values:
        raise _fail(key, "is empty; give at least one value")
    seen = set()
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise _fail(f"{key}[{i}]", f"= {v!r} must be a string")
        err = check(v)
        if err:
            raise _fail(f"{key}[{i}]", f"= {v!r} {err}")
        if v in seen:
            raise _fail(f"{key}[{i}]", f"= {v!r} is repeated")
        seen.add(v)


def _format_err(v: str) -> str | None:
    return None if v in FORMATS else f"is not a format; known: {', '.join(FORMATS)}"


def _act_err(v: str) -> str | None:
    if v in ACTIVATIONS:
        return None
    return f"is not an activation format; known: {', '.join(ACTIVATIONS)}"


def _gran_err(v: str) -> str | None:
    m = _GRAN_RE.fullmatch(v)
    if m is None or (m.group(1) is not None and int(m.group(1)) < 1):
        return "is not a granularity; use tensor, channel or blockN (e.g. block32)"
    return None


def _cal_err(v: str) -> str | None:
    m = _CAL_RE.fullmatch(v)
    if m is None:
        return f"is not a calibration; known: {', '.join(CALIBRATIONS)}"
    if m.group(1) is not None and not 0 < float(m.group(1)) <= 100:
        return "needs a percentile in (0, 100]"
    return None


def _import_err(v: str) -> str | None:
    if ":" not in v:
        return "must be an import path 'package.module:name'"
    mod, _, name = v.partition(":")
    try:
        obj = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as err:
        return f"cannot be imported ({type(err).__name__}: {err})"
    return None if callable(obj) else "is not callable"


# The keys of one PTQ product, the ones a grid.also table may replace.
_PRODUCT_KEYS = (
    "formats",
    "granularities",
    "calibrations",
    "roundings",
    "activations",
    "methods",
)
ALSO_EXAMPLE = '{ formats = ["int8"], activations = ["int4"] }'


def _rounding_err(v: str) -> str | None:
    return None if v in ROUNDINGS else f"is not a rounding; known: {', '.join(ROUNDINGS)}"


def method_steps(method: str) -> list[str]:
    """The steps of a (valid) method name, in the order they run: ``"rotate+gptq"`` ->
    ``["rotate", "gptq"]``; ``"rtn"`` -> ``[]`` (round to nearest, no method)."""
    return [] if method == "rtn" else method.split("+")


def _method_err(v: str) -> str | None:
    if v == "rtn":
        return None
    steps = v.split("+")
    known = (*TRANSFORMS, *SOLVERS)
    for i, step in enumerate(steps):
        if step == "rtn":
            return (
                "has 'rtn' inside a composition; rtn is round to nearest alone, what a "
                f"composition without gptq ends with: write {'+'.join(steps[:i]) or 'rtn'!r}"
            )
        if step not in known:
            names = ", ".join(known)
            return f"has an unknown step {step!r}; steps: rtn, {names} (e.g. {METHOD_EXAMPLES})"
        if steps.count(step) > 1:
            return f"repeats the step {step!r}; each step runs at most once"
        if step in SOLVERS and i != len(steps) - 1:
            nxt = steps[i + 1]
            return f"has {step!r} before {nxt!r}; gptq quantizes the weights: it comes last"
    return None


def _check_methods(key: str, table: dict[str, Any], where: str) -> None:
    """``smoothquant`` migrates activation outliers into the weights for activation
    quantization: in a product whose activations include ``none`` it has nothing to do."""
    acts = table.get("activations", ["none"])
    for i, m in enumerate(table.get("methods", [])):
        if "smoothquant" in method_steps(m) and "none" in acts:
            raise _fail(
                f"{key}[{i}]",
                f"= {m!r} needs quantized activations, and the activations of its "
                f"product{where} {acts} include 'none'; give smoothquant its own grid.also "
                "table with activations, e.g. "
                '{ methods = ["smoothquant"], activations = ["int8"] }',
            )


def _check_product(prefix: str, table: dict[str, Any]) -> None:
    """Check the product keys present in ``table`` (``[grid]`` or a ``grid.also`` entry)."""
    checks = {
        "formats": _format_err,
        "granularities": _gran_err,
        "calibrations": _cal_err,
        "roundings": _rounding_err,
        "activations": _act_err,
        "methods": _method_err,
    }
    for k, check in checks.items():
        if k in table:
            _check_list(f"{prefix}.{k}", table[k], check)


def validate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Check a resolved config; returns it. Raises :class:`ConfigError` naming the key."""
    _check_schema(cfg, _SCHEMA)
    for key in ("seeds", "task", "grid", "qat"):
        if key not in cfg:
            raise _fail(key, "is missing (set it, or name a preset)")
    seeds = cfg["seeds"]
    if not seeds:
        raise _fail("seeds", "is empty; give at least one seed")
    for i, s in enumerate(seeds):
        if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s <= MAX_SEED:
            raise _fail(f"seeds[{i}]", f"= {s!r} must be an integer in [0, {MAX_SEED}]")
    if len(set(seeds)) != len(seeds):
        raise _fail("seeds", f"= {seeds} has repeated seeds")
    task = cfg["task"]
    for k in ("name", "model", "data", "epochs", "lr", "batch"):
        if k not in task:
            raise _fail(f"task.{k}", "is missing")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", task["name"]):
        raise _fail("task.name", f"= {task['name']!r} must be letters, digits, '_', '.', '-'")
    for k in ("model", "data", "output", "loss", "metric"):
        if k in task:
            err = _import_err(task[k])
            if err:
                raise _fail(f"task.{k}", f"= {task[k]!r} {err}")
    if not 0 <= task["epochs"] <= MAX_COUNT:
        msg = f"= {task['epochs']} must be in [0, {MAX_COUNT}] (0 and steps 0: no float training)"
        raise _fail("task.epochs", msg)
    for k in ("batch", "eval_batch"):
        if k in task and not 1 <= task[k] <= MAX_COUNT:
            raise _fail(f"task.{k}", f"= {task[k]} must be in [1, {MAX_COUNT}]")
    if "axis_name" in task and not task["axis_name"]:
        raise _fail("task.axis_name", "is empty; name the axis (e.g. 'batch') or leave it out")
    if not 0 <= task.get("steps", 0) <= MAX_COUNT:
        msg = f"= {task['steps']} must be in [0, {MAX_COUNT}] (0: use task.epochs)"
        raise _fail("task.steps", msg)
    if "layers" in task:
        try:
            re.compile(task["layers"])
        except re.error as err:
            msg = f"= {task['layers']!r} is not a regular expression ({err})"
            raise _fail("task.layers", msg) from None
    if not (task["lr"] > 0 and math.isfinite(task["lr"])):
        raise _fail("task.lr", f"= {task['lr']} must be a positive number")
    grid, qat = cfg["grid"], cfg["qat"]
    for k in _SCHEMA["grid"]:
        if k not in grid and k not in ("activations", "methods", "also"):
            raise _fail(f"grid.{k}", "is missing")
    _check_product("grid", grid)
    for i, extra in enumerate(grid.get("also", [])):
        key = f"grid.also[{i}]"
        if not isinstance(extra, dict):
            raise _fail(key, f"= {extra!r} must be a table of grid keys, e.g. {ALSO_EXAMPLE}")
        for k, v in extra.items():
            if k not in _PRODUCT_KEYS:
                raise _fail(f"{key}.{k}", f"is not a key here; known: {', '.join(_PRODUCT_KEYS)}")
            if not isinstance(v, list):
                raise _fail(f"{key}.{k}", f"= {v!r} must be a list")
        if not extra:
            raise _fail(key, f"is empty; give the keys it changes, e.g. {ALSO_EXAMPLE}")
        _check_product(key, extra)
    main = {k: v for k, v in grid.items() if k != "also"}
    _check_methods("grid.methods", main, "")
    for i, extra in enumerate(grid.get("also", [])):
        key = f"grid.also[{i}].methods" if "methods" in extra else "grid.methods"
        _check_methods(key, main | extra, f" (with grid.also[{i}]'s keys)")
    _check_list(
        "grid.modes",
        grid["modes"],
        lambda v: None if v in MODES else f"is not a mode; known: {', '.join(MODES)}",
    )
    _check_qat(qat)
    return cfg


def _regex_err(v: str) -> str | None:
    try:
        re.compile(v)
    except re.error as err:
        return f"is not a regular expression ({err})"
    return None


def _check_qat(qat: dict[str, Any]) -> None:
    for k in _SCHEMA["qat"]:
        if k not in qat and k not in ("activations", "recipes", "start", "keep_float"):
            raise _fail(f"qat.{k}", "is missing")
    if "activations" in qat:
        _check_list("qat.activations", qat["activations"], _act_err)
    if qat.get("recipes"):
        from jaxquant.app.sweep import recipes  # builds recipes: imports jaxquant

        recipes.check(qat["recipes"])
    elif "recipes" in qat:
        raise _fail("qat.recipes", "is empty; give at least one recipe, or leave it out")
    # With recipes, the formats axis may be empty: the recipe cells alone.
    if qat["formats"] or not qat.get("recipes"):
        _check_list("qat.formats", qat["formats"], _format_err)
        _check_list("qat.granularities", qat["granularities"], _gran_err)
    start = qat.get("start", "float")
    if start not in STARTS:
        raise _fail("qat.start", f"= {start!r} is not a start; known: {', '.join(STARTS)}")
    if qat.get("keep_float"):
        _check_list("qat.keep_float", qat["keep_float"], _regex_err)
    if not 1 <= qat["steps"] <= MAX_COUNT:
        raise _fail("qat.steps", f"= {qat['steps']} must be in [1, {MAX_COUNT}]")
    if not (qat["lr"] > 0 and math.isfinite(qat["lr"])):
        raise _fail("qat.lr", f"= {qat['lr']} must be a positive number")


def resolve(
    raw: dict[str, Any] | None = None, *, preset: str | None = None, quick: bool = False
) -> dict[str, Any]:
    """The validated config: ``preset`` (or the file's ``preset`` key; default
    :data:`DEFAULT_PRESET` without a file -- ``raw`` None -- and :data:`FILE_PRESET` under
    a file's keys), then ``--quick``'s overrides, then the file's keys."""
    base = DEFAULT_PRESET if raw is None else FILE_PRESET
    raw = dict(raw or {})
    _check_schema(raw, _SCHEMA)
    name = preset or raw.pop("preset", None) or base
    raw.pop("preset", None)
    if name not in PRESETS:
        raise _fail("preset", f"= {name!r} is not a preset; known: {', '.join(PRESETS)}")
    cfg = copy.deepcopy(PRESETS[name])
    if quick:
        cfg = merge(cfg, QUICK | {"task": QUICK_TASK[name]})
        if "also" in cfg["grid"]:  # the quick grid is its one small product; an empty
            cfg["grid"]["also"] = []  # list (not none) so config.toml loads back equal
    raw_task = raw.get("task", {})
    cfg = merge(cfg, raw)
    # The preset's kwargs (and layer pattern) belong to the preset's model and data.
    if "model" in raw_task:
        if "model_kwargs" not in raw_task:
            cfg["task"]["model_kwargs"] = {}
        if "layers" not in raw_task:
            cfg["task"].pop("layers", None)
    if "data" in raw_task and "data_kwargs" not in raw_task:
        cfg["task"].pop("data_kwargs", None)
    cfg["preset"] = name
    return validate(cfg)


def importable(*folders: str | Path) -> None:
    """Put ``folders`` first on ``sys.path`` (those not on it already), as
    ``PYTHONPATH=folder`` would: a config's ``module:name`` paths find modules there."""
    have = {os.path.abspath(p or os.curdir) for p in sys.path}
    for folder in reversed(folders):
        d = os.path.abspath(folder)
        if d not in have:
            sys.path.insert(0, d)
            have.add(d)


def load(path: str | Path, *, preset: str | None = None, quick: bool = False) -> dict[str, Any]:
    """Read and validate a TOML config file.

    The current directory and the file's directory are made importable first
    (:func:`importable`), so the task's modules may sit next to the config or where the
    sweep is started, with no ``PYTHONPATH``."""
    importable(os.getcwd(), Path(path).parent)
    try:
        raw = tomllib.loads(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"sweep config: cannot read {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"sweep config: {path} is not valid TOML: {err}") from None
    return resolve(raw, preset=preset, quick=quick)


def config_hash(cfg: dict[str, Any]) -> str:
    """10 hex digits of the SHA-256 of the canonical JSON of ``cfg``."""
    blob = json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def to_toml(cfg: dict[str, Any]) -> str:
    """``cfg`` as TOML (top-level scalars first, then one ``[table]`` per dict)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in cfg.items() if not isinstance(v, dict)]
    for k, v in cfg.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"
