"""Run a sweep: evaluate cells, write each result as it comes, resume, shard, merge.

Run folder (``runs/<timestamp>-<confighash>/`` or ``--out``)::

    config.toml     the resolved config (a re-run with another config is refused)
    env.json        package versions, backend, device, git commit, config hash, seeds, shard
    results.jsonl   one JSON object per finished cell, appended, flushed and fsynced; each
                    row carries its config's hash
    results.csv     the latest row of every cell (rewritten atomically at the end)
    summary.md      the printed table (means over seeds)
    plots/*.png     accuracy vs bits, SQNR vs bits, size vs accuracy
    sweep.lock      while a sweep or merge writes here: its pid and host
    processes/      a multi-host sweep's: <i>of<n>.jsonl, the rows process i appended
                    (process 0 folds them into results.jsonl; :mod:`hosts`)

Re-running with the same ``--out`` skips cells whose latest row of this config (by hash)
has status ``ok`` (failed cells are retried; malformed rows and rows of other configs are
reported and not counted). A folder of another config is refused, even with its
config.toml missing or damaged (its env.json or rows say whose it is), and one folder
takes one sweep at a time (:class:`~jaxquant.app.sweep.folder.RunLock`). ``--shard i/n``
runs the cells at positions ``i % n`` of the full list; :func:`merge` combines shard
folders, into a new folder or a run folder of the same config. What keeps every file
whole is in :mod:`jaxquant.app.sweep.folder`, local or on object storage (``gs://``...);
the processes of a multi-host sweep sharing one folder are :mod:`jaxquant.app.sweep.hosts`.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import io
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import jax
import numpy as np

from jaxquant.app.env import environment as env_record
from jaxquant.app.sweep import config as C
from jaxquant.app.sweep import folder as F
from jaxquant.app.sweep import grid as G
from jaxquant.app.sweep import recipes as R
from jaxquant.app.sweep.folder import FolderBusy, FolderError, append_row, latest, read_rows

__all__ = ["FolderBusy", "FolderError", "merge", "read_rows", "run_sweep"]

COLUMNS = (
    "id",
    "task",
    "seed",
    "format",
    "granularity",
    "calibration",
    "rounding",
    "mode",
    "act",
    "status",
    "test_acc",
    "float_acc",
    "ptq_acc",
    "test_loss",
    "float_loss",
    "weight_sqnr_db",
    "bits_per_weight",
    "model_bytes",
    "float32_bytes",
    "seconds",
    "error",
)
# Columns of sweeps with a grid.methods axis (rows of "rtn" cells carry neither: a sweep
# without the axis writes the files it wrote before the axis existed).
METHOD_COLUMNS = ("method", "method_skipped", "method_note")
# The column of sweeps with qat.recipes (after "mode"; rows of format cells carry none).
RECIPE_COLUMNS = ("recipe",)
# Calibration batches (of task.batch examples, from the training split) that PTQ methods
# and static activation ranges read.
CALIBRATION_BATCHES = 8


def columns(rows: list[dict[str, Any]]) -> tuple[str, ...]:
    """:data:`COLUMNS`, with :data:`METHOD_COLUMNS` after ``act`` when a row has a method
    and :data:`RECIPE_COLUMNS` after ``mode`` when a row has a recipe."""
    cols: tuple[str, ...] = COLUMNS
    if any(r.get("method", "rtn") != "rtn" for r in rows):
        i = cols.index("act") + 1
        cols = cols[:i] + METHOD_COLUMNS + cols[i:]
    if any(r.get("recipe") for r in rows):
        i = cols.index("mode") + 1
        cols = cols[:i] + RECIPE_COLUMNS + cols[i:]
    return cols


# ------------------------------------------------------------------------ files


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    cols = columns(rows)
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "rtn" if k == "method" else "") for k in cols})
    F.atomic_write(path, buf.getvalue())


# -------------------------------------------------------------------------- env


def environment(cfg: dict[str, Any], shard: tuple[int, int]) -> dict[str, Any]:
    """What a row needs to be reproduced: the environment record
    (:func:`jaxquant.app.env.environment`: versions, backend, device, git) with the
    config's hash, its seeds and the shard."""
    return env_record(config_hash=C.config_hash(cfg), seeds=cfg["seeds"], shard=list(shard))


# -------------------------------------------------------------------- progress


class Progress:
    """``\\r[#####.....] 12/40 cells  eta 1m10s`` on a stream (stderr)."""

    def __init__(self, total: int, stream: TextIO | None, width: int = 30):
        self.total, self.stream, self.width = total, stream, width
        self.t0 = time.perf_counter()

    def update(self, done: int, note: str = "") -> None:
        if self.stream is None:
            return
        frac = done / self.total if self.total else 1.0
        bar = "#" * round(frac * self.width) + "." * (self.width - round(frac * self.width))
        el = time.perf_counter() - self.t0
        eta = _dur(el / done * (self.total - done)) if done else "?"
        line = f"\r[{bar}] {done}/{self.total} cells  eta {eta}  {note[:40]:<40}"
        self.stream.write(line)
        self.stream.flush()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.write("\n")
            self.stream.flush()


def _dur(s: float) -> str:
    s = round(s)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


# ------------------------------------------------------------------ evaluation


def _weight_metrics(
    flat: dict[str, Any], quantized: dict[str, Any], stored: dict[str, Any]
) -> dict[str, float]:
    """A cell's weight metrics: SQNR of the quantized kernels (``quantized``: layer -> its
    fake-quantized / dequantized kernel) against the float ones in ``flat``, bits per weight
    of their storage (``stored``: ``"<layer>/kernel"`` -> QArray or its abstract shape) and
    the model's bytes with them."""
    from jaxquant import size_report

    sig = noise = 0.0
    kbytes = kcount = 0
    for layer, wq in quantized.items():
        w64 = np.asarray(flat[f"{layer}/kernel"], np.float64)
        q64 = np.asarray(wq, np.float64)
        sig += float(np.sum(w64**2))
        noise += float(np.sum((w64 - q64) ** 2))
        kbytes += size_report({"k": stored[f"{layer}/kernel"]}).nbytes
        kcount += w64.size
    if not np.isfinite(noise):
        raise FloatingPointError("quantized weights are not finite")
    rep = size_report(flat | stored)
    return {
        "weight_sqnr_db": float("inf") if noise == 0 else 10.0 * math.log10(sig / noise),
        "bits_per_weight": 8.0 * kbytes / max(kcount, 1),
        "model_bytes": rep.nbytes,
        "float32_bytes": rep.float32_bytes,
    }


def _replace_kernels(params: Any, new: dict[str, Any]) -> Any:
    """``params`` (a Linen dict or an NNX state) with the kernels of the layers in ``new``
    (layer path -> value) replaced."""
    from jaxquant.app.sweep.tasks import leaf_path

    def swap(path, leaf):
        layer, _, name = leaf_path(path).rpartition("/")
        return new[layer] if name == "kernel" and layer in new else leaf

    return jax.tree_util.tree_map_with_path(swap, params)


def _flat(params: Any) -> dict[str, Any]:
    """``params`` as ``{"a/b/kernel": array}`` (what size reports read)."""
    from jaxquant.app.sweep.tasks import leaf_path

    return {leaf_path(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


class Float(NamedTuple):
    """One seed's float model: its net, weights and metrics."""

    net: Any  # tasks.Net
    params: Any
    rest: Any  # the other collections (batch_stats...) or NNX state
    metrics: dict[str, float]


class Evaluator:
    """Evaluates cells of one task; the float model is built (and trained) once per seed
    and the jitted forward passes and QAT trainers are compiled once and reused."""

    def __init__(self, cfg: dict[str, Any]):
        from jaxquant.app.sweep import tasks

        self.cfg, self.task = cfg, cfg["task"]
        self.tasks = tasks
        self.data = tasks.load_data(self.task)
        self.x, self.y = self.data["x_train"], self.data["y_train"]
        self.xt, self.yt = self.data["x_test"], self.data["y_test"]
        self.layers = self.task.get("layers", ".*")
        self.eval_batch = self.task.get("eval_batch", 256)
        self.float: dict[int, Float | Exception] = {}
        self._qat: dict[Any, Any] = {}
        q = cfg["qat"]
        self.recipes = {e.id: e for e in R.check(q.get("recipes", []))}
        self.scratch = q.get("start", "float") == "scratch"
        self.keep_float = list(q.get("keep_float", []))
        self._init: dict[int, Float | Exception] = {}
        self._baseline: dict[int, Float | Exception] = {}

    def evaluate(self, net: Any, params: Any, rest: Any) -> tuple[float, float]:
        """``(metric, loss)`` on the test split: the task's metric (default: accuracy in
        %) and loss (default: cross-entropy in nats), averaged over every example."""
        metric, loss = self.tasks.make_eval(net, self.eval_batch)(params, rest, self.xt, self.yt)
        return float(metric), float(loss)

    def _check_layers(self, params: Any) -> None:
        if not self.tasks.kernels(params, self.layers):
            found = ", ".join(self.tasks.kernels(params)) or "none"
            raise ValueError(
                f"task.layers = {self.layers!r} matches no Dense / Conv kernel of "
                f"the model; its layers: {found}."
            )

    def float_model(self, seed: int) -> Float:
        if seed not in self.float:
            try:
                net, params, rest, _ = self.tasks.train_float(self.task, self.data, seed)
                self._check_layers(params)
                acc, loss = self.evaluate(net, params, rest)
                self.float[seed] = Float(net, params, rest, {"float_acc": acc, "float_loss": loss})
            except Exception as err:  # every cell of the seed fails with this error
                self.float[seed] = err
        got = self.float[seed]
        if isinstance(got, Exception):
            raise got
        return got

    def initial_model(self, seed: int) -> Float:
        """The task's model for ``seed`` as initialised (``qat.start = "scratch"``): the
        weights :meth:`float_model` starts its training from; no metrics."""
        if seed not in self._init:
            try:
                net, params, rest = self.tasks.build(self.task, seed, self.x)
                self._check_layers(params)
                self._init[seed] = Float(net, params, rest, {})
            except Exception as err:  # every QAT cell of the seed fails with this error
                self._init[seed] = err
        got = self._init[seed]
        if isinstance(got, Exception):
            raise got
        return got

    def baseline(self, seed: int) -> Float:
        """``qat.start = "scratch"``: the float model trained from :meth:`initial_model`
        as the QAT cells train theirs (``qat.steps`` at ``qat.lr``, the same batches, no
        quantization). Its metrics are the ``float_acc`` / ``float_loss`` of the seed's
        QAT cells: each quantized run is compared with the float run it pairs with."""
        if seed not in self._baseline:
            try:
                init = self.initial_model(seed)
                params, rest = self._train(init.net, init.params, init.rest, seed)
                acc, loss = self.evaluate(init.net, params, rest)
                metrics = {"float_acc": acc, "float_loss": loss}
                self._baseline[seed] = Float(init.net, params, rest, metrics)
            except Exception as err:  # every QAT cell of the seed fails with this error
                self._baseline[seed] = err
        got = self._baseline[seed]
        if isinstance(got, Exception):
            raise got
        return got

    def _train(self, net: Any, params: Any, rest: Any, seed: int) -> tuple[Any, Any]:
        """``(params, rest)`` after ``qat.steps`` Adam steps at ``qat.lr`` on the seed's
        batches (one key per seed: every QAT cell of a seed sees the same batches)."""
        q = self.cfg["qat"]
        trainer = self.tasks.make_trainer(net, self.task["batch"], q["steps"], q["lr"])
        key = jax.random.fold_in(jax.random.key(seed), 1)
        params, rest, losses = trainer(params, rest, self.x, self.y, key)
        if not np.isfinite(float(losses[-1])):
            raise FloatingPointError(f"QAT: non-finite loss {float(losses[-1])}")
        return params, rest

    def qat_layers(self, params: Any) -> dict[str, tuple[int, ...]]:
        """The layers QAT cells quantize (layer -> kernel shape): ``task.layers``'s, less
        those a ``qat.keep_float`` pattern fullmatches (each must match one)."""
        layers = self.tasks.kernels(params, self.layers)
        for i, p in enumerate(self.keep_float):
            if not any(re.fullmatch(p, layer) for layer in layers):
                raise ValueError(
                    f"qat.keep_float[{i}] = {p!r} matches none of the quantized layers "
                    f"({', '.join(layers)}); fix the pattern (a fullmatch of a layer path) "
                    "or remove it."
                )
        kept = {
            k: v for k, v in layers.items() if not any(re.fullmatch(p, k) for p in self.keep_float)
        }
        if not kept:
            raise ValueError(
                f"qat.keep_float = {self.keep_float} keeps every quantized layer in float; "
                "leave at least one layer to quantize."
            )
        return kept

    def _weights(
        self,
        cell: G.Cell,
        params: Any,
        key: jax.Array | None,
        layers: dict[str, tuple[int, ...]] | None = None,
    ) -> tuple[Any, dict]:
        """Fake-quantized params and the size / SQNR metrics of ``cell``'s weights (of
        ``layers``: default every quantized layer)."""
        from jaxquant import fake_quant, quantize

        flat = _flat(params)
        fq, abstract = {}, {}
        if layers is None:
            layers = self.tasks.kernels(params, self.layers)
        for i, (layer, shape) in enumerate(layers.items()):
            spec = G.spec_for(cell, shape)
            w = flat[f"{layer}/kernel"]
            k = None if key is None else jax.random.fold_in(key, i)
            fq[layer] = fake_quant(w, spec, key=k)
            abstract[f"{layer}/kernel"] = jax.eval_shape(
                lambda a, s=spec, k=k: quantize(a, s, key=k), w
            )
        return _replace_kernels(params, fq), _weight_metrics(flat, fq, abstract)

    def __call__(self, cell: G.Cell) -> dict[str, Any]:
        if cell.mode == "qat":  # from scratch, it needs no trained float model
            return self._qat_cell(cell)
        fl = self.float_model(cell.seed)
        key = jax.random.key(cell.seed) if cell.rounding == "stochastic" else None
        if cell.method != "rtn":
            return self._method_cell(cell, fl, key)
        qparams, m = self._weights(cell, fl.params, key)
        net, rest = self._static_act_model(cell, fl, qparams)
        acc, loss = self.evaluate(net, qparams, rest)
        return {"test_acc": acc, "test_loss": loss, **fl.metrics, **m}

    def calibration_batches(self) -> list[Any]:
        """The first :data:`CALIBRATION_BATCHES` training batches of ``task.batch``
        examples (fewer when the split is smaller)."""
        b = self.task["batch"]
        n = min(CALIBRATION_BATCHES * b, self.tasks.num_examples(self.x))
        batches = [self.tasks.take(self.x, slice(i, i + b)) for i in range(0, n, b)]
        return [tuple(x) if isinstance(x, list) else x for x in batches]

    def _static_act_model(
        self, cell: G.Cell, fl: Float, qparams: Any, rest: Any = None
    ) -> tuple[Any, Any]:
        """``(net, rest)``: the float model, or (``cell.act``) the model whose layer inputs
        are quantized with static ranges: :func:`jaxquant.flax.calibrate` on the
        :meth:`calibration_batches`, run on the weight-quantized model (weights first, then
        activations). ``rest``: the other collections (default: the float model's); one
        with a method's online transforms (``"ptq"``) runs under
        :func:`jaxquant.flax.quantize_model` even without activations, which applies them."""
        from jaxquant.flax import Rule

        rest = fl.rest if rest is None else rest
        spec = G.act_spec(cell)
        layers = self.tasks.kernels(qparams, self.layers)
        if spec is None:
            if "ptq" not in rest:
                return fl.net, rest
            # Rules that quantize nothing: the layers only apply their transforms.
            return fl.net.quantize([Rule(re.escape(k), weight=None) for k in layers], qparams, rest)
        rules = [Rule(re.escape(k), act=spec) for k in layers]
        calibrated = fl.net.calibrate(rules, qparams, rest, self.calibration_batches())
        return fl.net.quantize(calibrated, qparams, rest)

    def _method_cell(self, cell: G.Cell, fl: Float, key: jax.Array | None) -> dict[str, Any]:
        """A PTQ cell with a method: its steps (:func:`jaxquant.app.sweep.config.method_steps`)
        run in turn on the float Linen model with one :class:`jaxquant.flax.Rule` per
        quantized kernel (the cell's weight spec, and activation spec when ``cell.act``),
        each on the previous step's variables, calibrated on the :meth:`calibration_batches`;
        then round to nearest, or GPTQ's codes when it is the last step. The test metrics are
        of the dequantized weights with the methods' online transforms and (``cell.act``)
        static activation ranges calibrated on the result. Layers a step could not apply to
        are listed in ``method_skipped`` (``step layer: reason; ...``)."""
        from jaxquant import ptq
        from jaxquant.app.models import ByteLM
        from jaxquant.flax import Rule

        steps = C.method_steps(cell.method)
        if fl.net.is_nnx:
            raise ValueError(
                f"method {cell.method!r}: the sweep runs PTQ methods on Linen task models; "
                "this task's model is NNX. Use method 'rtn' for it, or call jaxquant.ptq on "
                "the model directly."
            )
        if "gptq" in steps and cell.rounding == "stochastic":
            raise ValueError(
                f"method {cell.method!r} with rounding 'stochastic': GPTQ rounds to nearest "
                "(its error feedback assumes it); give stochastic rounding its own product "
                "(grid.also) without gptq."
            )
        module = fl.net.module
        act = G.act_spec(cell)
        layers = self.tasks.kernels(fl.params, self.layers)
        rules = [
            Rule(re.escape(k), weight=G.spec_for(cell, shape), act=act)
            for k, shape in layers.items()
        ]
        batches = self.calibration_batches()
        kw = fl.net.calls.call_kwargs or None
        variables = {"params": fl.params, **fl.rest}
        skipped: list[str] = []
        served = None
        for step in steps:
            common: dict[str, Any] = {"rules": rules, "call_kwargs": kw}
            if step == "rotate":
                # QuaRot's residual rotation where the model is the built-in ByteLM; any
                # other model rotates each quantized layer's input online.
                rotate = ptq.rotate_residual if isinstance(module, ByteLM) else ptq.rotate_inputs
                res = rotate(module, batches, variables, key=jax.random.key(cell.seed), **common)
            elif step == "smoothquant":
                res = ptq.smooth_quant(module, batches, variables, **common)
            elif step == "awq":
                res = ptq.awq(module, batches, variables, clip_search=True, **common)
            else:  # gptq, last (config checked)
                res = ptq.gptq(module, batches, variables, **common)
                served = res.variables["params"]
            skipped += [f"{step} {layer}: {why}" for layer, why in res.skipped.items()]
            if served is None:
                variables = res.variables
        params = variables["params"]  # the transformed float weights
        rest = {k: v for k, v in variables.items() if k != "params"}
        if served is None:
            qparams, m = self._weights(cell, params, key)
        else:
            qparams, m = self._served(params, served)
        if "ptq" in rest:  # the online transforms are stored (served) with the model
            online = sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(rest["ptq"]))
            m["model_bytes"] += online
            m["float32_bytes"] += online
        net, rest = self._static_act_model(cell, fl, qparams, rest)
        acc, loss = self.evaluate(net, qparams, rest)
        return {
            "test_acc": acc,
            "test_loss": loss,
            **fl.metrics,
            **m,
            "method_skipped": "; ".join(skipped),
            "method_note": "",
        }

    def _served(self, params: Any, served: Any) -> tuple[Any, dict[str, Any]]:
        """The dequantized weights of a converted tree ``served`` (QArrays where
        :func:`_weights` would fake-quantize) and the same metrics, against the float
        ``params`` it was solved from."""
        from jaxquant import QArray, dequantize

        flat = _flat(params)
        qflat = {
            self.tasks.leaf_path(p): v
            for p, v in jax.tree_util.tree_flatten_with_path(
                served, is_leaf=lambda x: isinstance(x, QArray)
            )[0]
        }
        deq, abstract = {}, {}
        for layer in self.tasks.kernels(params, self.layers):
            q = qflat[f"{layer}/kernel"]
            if not isinstance(q, QArray):
                raise TypeError(f"GPTQ left {layer}/kernel unquantized ({type(q).__name__})")
            deq[layer] = dequantize(q).astype(flat[f"{layer}/kernel"].dtype)
            abstract[f"{layer}/kernel"] = q
        return _replace_kernels(params, deq), _weight_metrics(flat, deq, abstract)

    def _qat_rules(self, cell: G.Cell, layers: dict[str, tuple[int, ...]]) -> list[Any]:
        """One :class:`jaxquant.flax.Rule` per quantized layer: the recipe's config, or
        the format cell's weight spec (and dynamic activation spec); none for the
        ``float32`` recipe."""
        from jaxquant.flax import Rule

        if cell.recipe:
            recipe = self.recipes[cell.recipe].build()
            if recipe is None:
                return []
            return [Rule(re.escape(layer), recipe.config) for layer in layers]
        act = G.act_spec(cell)
        return [
            Rule(re.escape(layer), weight=G.spec_for(cell, shape), act=act)
            for layer, shape in layers.items()
        ]

    def _recipe_weights(
        self, cell: G.Cell, params: Any, layers: dict[str, tuple[int, ...]]
    ) -> dict[str, float]:
        """The size / SQNR metrics of a recipe cell's weights: each kernel quantized with
        the recipe's weight spec as the forward product sees it (blocks that follow the
        contraction along the kernel's input axis; before any forward Hadamard
        transform); float32's weights as they are."""
        from jaxquant import fake_quant, per_block, quantize

        recipe = self.recipes[cell.recipe].build()
        spec = None if recipe is None else recipe.weight
        if spec is not None and getattr(spec.granularity, "axis", 0) is None:  # per_block(n)
            size = spec.granularity.size  # a PerBlock here
            spec = dataclasses.replace(spec, granularity=per_block(-2, size))
        flat = _flat(params)
        fq, stored = {}, {}
        for layer in layers:
            w = flat[f"{layer}/kernel"]
            fq[layer] = w if spec is None else fake_quant(w, spec)
            stored[f"{layer}/kernel"] = (
                w if spec is None else jax.eval_shape(lambda a, s=spec: quantize(a, s), w)
            )
        return _weight_metrics(flat, fq, stored)

    def _qat_cell(self, cell: G.Cell) -> dict[str, Any]:
        """A QAT cell: the float model (``qat.start = "float"``) or the initial weights
        (``"scratch"``) trained ``qat.steps`` with the cell's rules. A layer a recipe's
        blocks do not fit fails the cell with the error naming it, and the
        ``qat.keep_float`` line that keeps it in float."""
        try:
            return self._qat_run(cell)
        except ValueError as err:
            m = re.search(r"quantized layer '([^']+)'", str(err))
            if m is None:
                raise
            raise ValueError(
                f"{err} In the sweep config: [qat] keep_float = [{re.escape(m.group(1))!r}]."
            ) from None

    def _qat_run(self, cell: G.Cell) -> dict[str, Any]:
        fl = self.initial_model(cell.seed) if self.scratch else self.float_model(cell.seed)
        layers = self.qat_layers(fl.params)
        name = cell._replace(seed=-1)
        if name not in self._qat:
            rules = self._qat_rules(cell, layers)
            self._qat[name] = fl.net.quantize(rules, fl.params, fl.rest)[0] if rules else None
        qnet = self._qat[name]
        base = self.baseline(cell.seed) if self.scratch else fl
        ptq: dict[str, Any] = {}
        if qnet is None and self.scratch:  # float32 from scratch: the baseline itself
            net, tuned, rest = base.net, base.params, base.rest
        else:
            net, rest = fl.net, fl.rest
            if qnet is not None:
                # The quantized net's own collections, from this seed's weights: the float
                # model's for stateless rules, plus stateful rules' state and NNX's keys.
                _, rest = fl.net.quantize(qnet.rules, fl.params, fl.rest, seed=cell.seed)
                net, rest = qnet, qnet.with_state(fl.params, rest, self.x, cell.seed)
            if not self.scratch:  # the quantized model before training (PTQ of the float)
                ptq = {"ptq_acc": self.evaluate(net, fl.params, rest)[0]}
            tuned, rest = self._train(net, fl.params, rest, cell.seed)
        if cell.recipe:
            m = self._recipe_weights(cell, tuned, layers)
        else:
            m = self._weights(cell, tuned, None, layers)[1]
        acc, loss = self.evaluate(net, tuned, rest)
        return {"test_acc": acc, "test_loss": loss, **base.metrics, **ptq, **m}


# ------------------------------------------------------------------------- run


def default_out(cfg: dict[str, Any], shard: tuple[int, int] = (0, 1)) -> Path:
    """``runs/<time>-<confighash>``, and ``-shard<i>of<n>`` for one shard of several: the
    hosts of a slice starting in the same second get a folder each (a folder takes one
    sweep at a time), then :func:`merge` them."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    part = f"-shard{shard[0]}of{shard[1]}" if shard[1] > 1 else ""
    return Path("runs") / f"{stamp}-{C.config_hash(cfg)}{part}"


def warn(message: str) -> None:
    """One warning line on stderr (not ``warnings.warn``: the CLI's user reads it)."""
    print(f"jaxquant: warning: {' '.join(message.split())}", file=sys.stderr)


def own_rows(loaded: F.Rows, path: Path, want: str) -> list[dict[str, Any]]:
    """The rows of ``loaded`` (read from ``path``) made by config hash ``want``; the
    others are reported in one warning line each (malformed; other configs)."""
    if loaded.bad:
        warn(F.bad_rows_note(path, loaded.bad))
    rows = [r for r in loaded.rows if r["config_hash"] == want]
    others = sorted({r["config_hash"] for r in loaded.rows} - {want})
    if others:
        n = len(loaded.rows) - len(rows)
        warn(
            f"sweep: ignored {n} row{'s' if n > 1 else ''} of another config (hash "
            f"{', '.join(others)}) in {path}; they are not counted as done"
        )
    return rows


def folder_rows(out: F.AnyPath, want: str) -> list[dict[str, Any]]:
    """The rows of config hash ``want`` in every rows file of ``out`` (results.jsonl and a
    multi-host sweep's processes/*.jsonl); the others are reported by :func:`own_rows`."""
    return [r for path, loaded in F.all_rows(out) for r in own_rows(loaded, path, want)]


def kept(out: F.AnyPath, cfg: dict[str, Any], shard: tuple[int, int] = (0, 1)) -> tuple[int, int]:
    """``(cells of this shard with an ok row of this config in out, cells of the shard)``;
    never raises (it is what an error message reports)."""
    cells = {c.id for c in G.shard(G.expand(cfg), *shard)}
    try:
        rows = [r for _, loaded in F.all_rows(F.as_path(out)) for r in loaded.rows]
    except OSError:
        return 0, len(cells)
    want = C.config_hash(cfg)
    ok = {r["id"] for r in rows if r["config_hash"] == want and r["status"] == "ok"}
    return len(ok & cells), len(cells)


def record_env(out: F.AnyPath, env: dict[str, Any], **extra: Any) -> None:
    """Write env.json: ``env`` (and ``extra``) with the list of the sessions that wrote to
    the folder (date, host, shard, git), this one appended."""
    path = out / "env.json"
    sessions: list = []
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        old = json.loads(path.read_text())["sessions"]
        sessions = old if isinstance(old, list) else []
    session = {k: env[k] for k in ("date", "host", "shard", "git")}
    doc = {**env, **extra, "sessions": [*sessions, session]}
    F.atomic_write(path, json.dumps(doc, indent=1) + "\n")


def run_sweep(
    cfg: dict[str, Any],
    out: Path,
    *,
    shard: tuple[int, int] = (0, 1),
    progress: TextIO | None = sys.stderr,
    plots: bool = True,
) -> dict[str, Any]:
    """Evaluate this shard's cells of ``cfg`` into ``out``, skipping finished ones.

    Returns ``{"rows": latest rows of the shard's cells, "ran": n, "skipped": n,
    "table": markdown}``. A cell that raises is recorded with ``status="error"``;
    KeyboardInterrupt (or SIGTERM) and OSError (a full disk) stop the sweep after the
    finished cells' rows are written (then re-raised).

    Only rows of ``cfg`` (by config hash) count as done. Raises :class:`FolderError`
    (one line, before anything is written) when ``out`` is a file, a non-empty folder
    that is not a run folder, or a run folder of another config (by its config.toml,
    else its env.json, else its rows), and :class:`FolderBusy` when another sweep holds
    its lock.
    """
    out = F.as_path(out)
    cells = G.shard(G.expand(cfg), *shard)
    want = C.config_hash(cfg)
    with prepared(out, cfg) as done:
        jsonl = out / "results.jsonl"
        F.repair(jsonl)
        env = environment(cfg, shard)
        record_env(out, env)
        todo = [c for c in cells if c.id not in done]
        bar = Progress(len(cells), progress)
        n_done = len(cells) - len(todo)
        bar.update(n_done, "training" if todo else "")
        ids = {c.id for c in cells}

        def finish() -> tuple[list[dict[str, Any]], str]:
            F.consolidate(out, want)  # a multi-host sweep's rows, if it ran here before
            rows = [r for r in F.read_rows(jsonl) if r["config_hash"] == want]
            rows = [r for r in latest(rows).values() if r["id"] in ids]
            return rows, finalize(out, rows, cfg, plots=plots)

        if F.is_local(jsonl):
            # Looked up when called, so a test can stand in for append_row.
            def write(row: dict[str, Any]) -> None:
                append_row(jsonl, row)
        else:
            write = F.ObjectRows(jsonl).append
        try:
            with sigterm_as_interrupt():
                run_cells(todo, cfg, env, shard, write, bar, n_done)
        except BaseException:
            # The rows are safe already; the csv / summary / plots of what is done are a
            # best effort that must not hide why the sweep stopped.
            with contextlib.suppress(Exception):
                finish()
            raise
        rows, table = finish()
    return {"rows": rows, "ran": len(todo), "skipped": len(cells) - len(todo), "table": table}


@contextlib.contextmanager
def prepared(out: F.AnyPath, cfg: dict[str, Any]) -> Iterator[set[str]]:
    """Hold ``out``'s lock for ``cfg``: refuse a folder that is not a run folder or is of
    another config (before anything is written), write config.toml, and give the ids of
    the cells that have an ``ok`` row of this config in any of its rows files."""
    want = C.config_hash(cfg)
    F.check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    with F.lock(out) as lock:
        if lock.stale:
            warn(f"sweep: took over the lock of {out} left by {lock.stale} (no longer running)")
        F.check_out(out)  # again, now that no other sweep can be making it a run folder
        files = F.all_rows(out)
        F.claim(out, want, [r for _, loaded in files for r in loaded.rows])
        own = [r for path, loaded in files for r in own_rows(loaded, path, want)]
        F.atomic_write(out / "config.toml", C.to_toml(cfg))
        yield {i for i, r in latest(own).items() if r["status"] == "ok"}


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a killed job) raises KeyboardInterrupt, so the finished rows get their
    csv / summary written on the way out (main thread only)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run_cells(
    todo: list[G.Cell],
    cfg: dict[str, Any],
    env: dict[str, Any],
    shard: tuple[int, int],
    write: Callable[[dict[str, Any]], None],
    bar: Progress,
    n_done: int,
) -> None:
    """Evaluate ``todo`` in order, ``write`` each cell's row as it finishes (a cell that
    raises gets an ``error`` row), and advance ``bar`` from ``n_done``."""
    evaluator: Evaluator | Exception | None = None
    try:
        for cell in todo:
            t0 = time.perf_counter()
            row: dict[str, Any] = {"id": cell.id, **cell._asdict()}
            if cell.method == "rtn":  # rows as before the method axis (readers default it)
                del row["method"]
            if not cell.recipe:  # rows as before the recipe axis
                del row["recipe"]
            try:
                if evaluator is None:
                    try:
                        evaluator = Evaluator(cfg)
                    except Exception as err:
                        evaluator = err  # the task cannot load: every cell fails with it
                if isinstance(evaluator, Exception):
                    raise evaluator
                row |= {"status": "ok", **evaluator(cell)}
            except Exception as err:  # one broken cell must not stop the sweep
                msg = " ".join(f"{type(err).__name__}: {err}".split())
                row |= {"status": "error", "error": msg[:500]}
            row |= {
                "seconds": round(time.perf_counter() - t0, 3),
                "config_hash": env["config_hash"],
                "git": env["git"],
                "shard": list(shard),
            }
            write(row)
            n_done += 1
            bar.update(n_done, cell.id)
    finally:
        bar.close()


def finalize(
    out: F.AnyPath, rows: list[dict[str, Any]], cfg: dict[str, Any], *, plots: bool
) -> str:
    """Write results.csv, summary.md and the plots (each atomically); returns the table."""
    order = {c.id: i for i, c in enumerate(G.expand(cfg))}
    rows = sorted(rows, key=lambda r: order.get(r["id"], len(order)))
    write_csv(out / "results.csv", rows)
    table = summary_table(rows)
    F.atomic_write(out / "summary.md", table + "\n")
    if plots and rows:
        from jaxquant.app.sweep import plots as P

        P.write_plots(out / "plots", rows)
    return table


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def summary_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per cell configuration, means (and std of accuracy) over seeds."""
    cols = columns(rows)
    methods = "method" in cols  # a method column only when a row has one
    recipes = "recipe" in cols  # a recipe column (and the loss change) only with recipes
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        key = (
            r["task"],
            r["mode"],
            *((r.get("recipe") or "-",) if recipes else ()),
            r["format"],
            r.get("act", "none"),
            *((r.get("method", "rtn"),) if methods else ()),
            r["granularity"],
            r["calibration"],
            r["rounding"],
        )
        groups.setdefault(key, []).append(r)
    lines = [
        f"| task | mode |{' recipe |' if recipes else ''} format | act |"
        f"{' method |' if methods else ''} granularity "
        "| calibration | rounding | seeds ok | bits/w | KiB | SQNR dB | acc % | vs float "
        f"| loss |{' loss vs float |' if recipes else ''} error |",
        f"|---|---|{'---|' if recipes else ''}---|---|{'---|' if methods else ''}"
        f"---|---|---|--:|--:|--:|--:|--:|--:|--:|{'--:|' if recipes else ''}---|",
    ]
    for key, rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        err = next((str(r.get("error", "")) for r in rs if r["status"] != "ok"), "")

        def mean(k: str, ok: list = ok) -> float | None:
            vals = [r[k] for r in ok if r.get(k) is not None]
            return float(np.mean(vals)) if vals else None

        acc = mean("test_acc")
        std = float(np.std([r["test_acc"] for r in ok])) if len(ok) > 1 else None
        delta = None if acc is None else acc - (mean("float_acc") or 0.0)
        kib = mean("model_bytes")
        acc_s = _fmt(acc, ".2f") + ("" if std is None else f" ± {std:.2f}")
        dloss = ""
        if recipes:  # training comparisons are read in loss: mean ± std of the paired change
            d = [r["test_loss"] - r["float_loss"] for r in ok if r.get("float_loss") is not None]
            dloss = _fmt(float(np.mean(d)) if d else None, "+.4f")
            dloss = f" | {dloss}" + (f" ± {float(np.std(d)):.4f}" if len(d) > 1 else "")
        lines.append(
            "| "
            + " | ".join(str(k) for k in key)
            + f" | {len(ok)}/{len(rs)} | {_fmt(mean('bits_per_weight'), '.2f')}"
            f" | {_fmt(None if kib is None else kib / 1024, '.1f')}"
            f" | {_fmt(mean('weight_sqnr_db'), '.1f')} | {acc_s} | {_fmt(delta, '+.2f')}"
            f" | {_fmt(mean('test_loss'), '.3f')}{dloss}"
            f" | {err[:60].replace('|', '/')} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------ merge


def _source(d: Path) -> tuple[dict[str, Any], list[dict[str, Any]], Any]:
    """A shard folder's config, its rows of that config, and its env.json (or None)."""
    d = F.as_path(d)
    if not d.is_dir():
        raise C.ConfigError(f"sweep merge: {d} is not a folder; pass run folders to --merge")
    cfg = F.read_config(d)
    if cfg is None:
        why = "a damaged config.toml" if (d / "config.toml").exists() else "no config.toml"
        raise C.ConfigError(
            f"sweep merge: {d} has {why} (not a run folder, or damaged); merge only run "
            "folders of one config."
        )
    env = None
    with contextlib.suppress(OSError, ValueError):
        env = json.loads((d / "env.json").read_text())
    return cfg, folder_rows(d, C.config_hash(cfg)), env


def merge(dirs: list[Path], out: Path, *, plots: bool = True) -> dict[str, Any]:
    """Combine shard folders (same config) into ``out``: results.jsonl, csv, summary,
    plots; env.json lists every shard's environment.

    ``out`` may be new, or a run folder of the same config (one of ``dirs`` included):
    its rows stay as they are and the sources' rows it lacks are appended. A folder of
    another config, or one that is not a run folder, is refused (:class:`FolderError`),
    and ``out`` is locked while it is written (:class:`FolderBusy`).

    Returns ``{"rows": latest row per cell, "missing": ids without an ok row, "added":
    rows appended, "table": markdown}``.
    """
    if not dirs:
        raise C.ConfigError("sweep merge: no folders given")
    cfgs, envs, rows = [], [], []
    for d in map(F.as_path, dirs):
        cfg, got, env = _source(d)
        cfgs.append(cfg)
        rows += got
        if env is not None:
            envs.append(env)
    hashes = {C.config_hash(c) for c in cfgs}
    if len(hashes) != 1:
        raise C.ConfigError(f"sweep merge: the folders hold different configs {sorted(hashes)}")
    cfg, want = cfgs[0], hashes.pop()
    out = F.as_path(out)
    F.check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    with F.lock(out):
        F.check_out(out)  # again, now that no other sweep can be making it a run folder
        jsonl = out / "results.jsonl"
        files = F.all_rows(out)
        F.claim(out, want, [r for _, loaded in files for r in loaded.rows])
        F.repair(jsonl)
        F.consolidate(out, want)  # a multi-host sweep's rows, if one ran here
        have = own_rows(F.load_rows(jsonl), jsonl, want)
        seen = {json.dumps(r, sort_keys=True) for r in have}
        new = []
        for r in latest(rows).values():
            key = json.dumps(r, sort_keys=True)
            if key not in seen:
                seen.add(key)
                new.append(r)
        old = jsonl.read_bytes() if jsonl.exists() else b""
        added = "".join(json.dumps(r) + "\n" for r in new).encode()
        F.atomic_write(jsonl, old + added)
        if F.read_config(out) is None:
            F.atomic_write(out / "config.toml", C.to_toml(cfg))
        prior: list = []
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads((out / "env.json").read_text())
            prior = doc.get("merged_from", [doc]) if isinstance(doc, dict) else []
        env = {"config_hash": want, "merged_from": [*prior, *envs]}
        F.atomic_write(out / "env.json", json.dumps(env, indent=1) + "\n")
        merged = list(latest(have + new).values())
        expected = {c.id for c in G.expand(cfg)}
        missing = sorted(expected - {r["id"] for r in merged if r["status"] == "ok"})
        table = finalize(out, merged, cfg, plots=plots)
    return {"rows": merged, "missing": missing, "added": len(new), "table": table}
