"""Built-in tasks (scikit-learn digits: an MLP and a CNN; a byte-level transformer LM on
the Python standard library's source), custom tasks by import path, and the float
training / QAT fine-tuning loops.

Data: :func:`jaxquant.app.datasets.digits` (bundled with scikit-learn, no download): split
75 / 25 (stratified, ``random_state=0``: 1347 train, 450 test images), standardized with
the training split's per-pixel statistics -- the split of ``benchmarks/qat_digits.py``.
:func:`jaxquant.app.datasets.stdlib_bytes`: next-byte prediction, the corpus and held-out
files of ``benchmarks/qat_lm.py``. A task's labels may have any shape the logits have
but the last axis (one label per image, or one per byte position).

Custom models (:func:`build`): a Linen module, a ``(module, variables)`` pair or an NNX
module from a factory, all run through one :class:`Net` -- weights as ``(params,
rest)``, the task's call arguments (``call_kwargs`` / ``train_kwargs`` / ``axis_name``),
its ``output`` adapter, ``loss`` and ``metric``. Inputs may be tuples or dicts of arrays.

Training: Adam with cosine decay on mini-batches, the whole run one jitted ``lax.scan``.
optax does not trace under strict dtype promotion, and published models rely on rank
promotion, so the task's code runs under JAX's default rules (:func:`lenient`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import json
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


def import_object(path: str) -> Any:
    """``"pkg.module:name"`` -> the object."""
    mod, _, name = path.partition(":")
    return getattr(importlib.import_module(mod), name)


@contextlib.contextmanager
def lenient() -> Iterator[None]:
    """JAX's default promotion rules around the task's own code: optax does not trace under
    strict dtype promotion, and published models (Hugging Face's Flax classes) add a
    ``(d,)`` bias to a ``(1, 1, d)`` product, which strict rank promotion refuses."""
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        yield


# ------------------------------------------------------------------------ batches
# A task's inputs are an array, a tuple of arrays (positional arguments of the model) or a
# dict of arrays (keyword arguments), every leaf with the examples on its leading axis;
# labels are an array (or any pytree the loss and metric read) the same way.


def num_examples(x: Any) -> int:
    """The length of the leading (example) axis of ``x``'s leaves."""
    return int(jax.tree.leaves(x)[0].shape[0])


def take(x: Any, idx: Any) -> Any:
    """The examples ``idx`` (an index array or a slice) of every leaf of ``x``."""
    return jax.tree.map(lambda a: a[idx], x)


def call_args(x: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a model call on inputs ``x``: a tuple (or list) is positional,
    a dict is keywords, anything else is the one argument (the convention of
    :func:`jaxquant.flax.calibrate`'s batches)."""
    if isinstance(x, tuple | list):
        return tuple(x), {}
    if isinstance(x, dict):
        return (), dict(x)
    return (x,), {}


def check_examples(tree: Any, what: str) -> Any:
    """``tree``'s leaves as numpy arrays, checked to share one leading (example) axis."""
    try:
        tree = jax.tree.map(np.asarray, tree)
    except Exception as err:
        raise ValueError(f"{what} is not arrays: {err}") from None
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError(f"{what} holds no arrays.")
    sizes = {a.shape[0] if a.ndim else None for a in leaves}
    if None in sizes or len(sizes) != 1:
        shapes = ", ".join(str(a.shape) for a in leaves[:4])
        raise ValueError(
            f"{what}: every array needs the examples on its leading axis, one length for "
            f"all; got shapes {shapes}."
        )
    return tree


# -------------------------------------------------------------- losses and metrics


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The default ``task.loss``: mean softmax cross-entropy (nats) with integer labels,
    over every label (one per example, or one per position)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The default ``task.metric``: the percentage of labels the argmax predicts."""
    return 100.0 * jnp.mean(jnp.argmax(logits, axis=-1) == labels)


class Calls(NamedTuple):
    """How a task's model is called: ``task.call_kwargs`` (evaluation, calibration, init),
    ``task.train_kwargs`` (training: float and QAT), ``task.axis_name`` (training under
    ``jax.vmap`` with this axis name), and the ``task.output`` / ``task.loss`` /
    ``task.metric`` functions."""

    call_kwargs: dict[str, Any]
    train_kwargs: dict[str, Any]
    axis_name: str | None
    output: Callable[[Any], Any] | None
    loss: Callable[[Any, Any], Any]
    metric: Callable[[Any, Any], Any]

    def key(self) -> tuple:
        """A hashable key (the kwargs as canonical JSON: TOML values)."""
        kw = json.dumps([self.call_kwargs, self.train_kwargs], sort_keys=True, default=repr)
        return (kw, self.axis_name, self.output, self.loss, self.metric)


def calls(task: dict[str, Any]) -> Calls:
    """The task's :class:`Calls` (functions imported by path; defaults: the model's output
    as it is, :func:`cross_entropy`, :func:`accuracy`)."""
    call_kwargs = dict(task.get("call_kwargs", {}))
    return Calls(
        call_kwargs=call_kwargs,
        train_kwargs=dict(task.get("train_kwargs", call_kwargs)),
        axis_name=task.get("axis_name"),
        output=import_object(task["output"]) if "output" in task else None,
        loss=import_object(task["loss"]) if "loss" in task else cross_entropy,
        metric=import_object(task["metric"]) if "metric" in task else accuracy,
    )


def _scalar(v: Any, what: str) -> jax.Array:
    v = jnp.asarray(v)
    if v.shape != ():
        raise TypeError(
            f"{what} returned an array of shape {v.shape}; it must return one number per "
            "batch (the mean over the batch's examples)."
        )
    return v.astype(jnp.float32)


# -------------------------------------------------------------------------- models


def _freeze(v: Any) -> Any:
    """A hashable stand-in for a Linen module (or attribute) that is equal exactly when
    the values are: the published ResNet18 has a list attribute, which Linen's own hash
    refuses (lists and dicts are tagged, so ``[1]`` and ``(1,)`` stay apart). Raises
    TypeError for a value with no hashable form (an array)."""
    if isinstance(v, nn.Module):
        fields = dataclasses.fields(v)
        return (
            type(v),
            tuple(
                (f.name, _freeze(getattr(v, f.name)))
                for f in fields
                if f.compare and f.name not in ("parent", "name")
            ),
            v.name,
        )
    if isinstance(v, list | tuple):
        return (type(v).__name__, tuple(_freeze(x) for x in v))
    if isinstance(v, dict):
        return ("dict", tuple(sorted((k, _freeze(x)) for k, x in v.items())))
    hash(v)
    return v


def _split_nnx(model: nnx.Module) -> tuple[nnx.GraphDef[nnx.Module], nnx.State, nnx.State]:
    """``(graphdef, params, rest)``: ``nnx.split(model, nnx.Param, ...)``, its parameters
    and every other variable (two filters give two states; nnx.split's annotation allows
    any number)."""
    graphdef, params, *others = nnx.split(model, nnx.Param, ...)
    (rest,) = others
    return graphdef, params, rest


class Net:
    """A task's model, Linen or NNX, called one way by the sweep.

    Its weights live outside it, as ``(params, rest)``: Linen ``variables["params"]`` and
    the other collections (``batch_stats``...); NNX ``nnx.split(model, nnx.Param, ...)``.
    :meth:`apply` runs it; :meth:`quantize` and :meth:`calibrate` go through
    :func:`jaxquant.flax.quantize_model` and :func:`jaxquant.flax.calibrate` with the
    task's call arguments. Nets are compared and hashed by what they run (a Linen module's
    list attributes included, which Linen's own hash refuses), or by identity when an
    attribute has no hashable form: the jit caches then stay per object.
    """

    def __init__(
        self, calls: Calls, *, module: Any = None, graphdef: Any = None, rules: tuple = ()
    ):
        self.calls, self.module, self.graphdef, self.rules = calls, module, graphdef, rules
        key: tuple[object, ...]
        try:
            key = (_freeze(module), graphdef, calls.key())
            hash(key)
        except TypeError:  # an attribute with no value semantics (an array)
            key = ("id", id(self))
        self._key = key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Net) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    @property
    def is_nnx(self) -> bool:
        return self.graphdef is not None

    @property
    def needs_key(self) -> bool:
        """Whether a rule rounds stochastically: a Linen call then takes a key of the
        ``"quant"`` PRNG stream (:meth:`apply`'s ``rng``); an NNX model draws from the
        ``nnx.Rngs`` that :meth:`quantize` gave it."""
        return any(r.config.needs_key for r in self.rules)

    def _output(self, out: Any) -> jax.Array:
        if self.calls.output is not None:
            out = self.calls.output(out)
        if not isinstance(out, jax.Array):
            fix = "" if self.calls.output is None else " (what task.output returned)"
            raise TypeError(
                f"the model's output{fix} is {type(out).__name__}, not an array: set "
                "task.output to a function 'module:function' that picks the array the loss "
                "and metric read (e.g. lambda out: out.logits)."
            )
        return out

    def _call(
        self, params: Any, rest: Any, x: Any, train: bool, rng: jax.Array | None = None
    ) -> tuple[jax.Array, Any]:
        kw = self.calls.train_kwargs if train else self.calls.call_kwargs
        args, xkw = call_args(x)
        if self.is_nnx:
            model = nnx.merge(self.graphdef, params, rest)
            out = model(*args, **xkw, **kw)
            if train:  # e.g. an NNX BatchNorm's running statistics
                rest = _split_nnx(model)[2]
            return self._output(out), rest
        variables = {"params": params, **rest}
        if rng is not None:  # stochastic rounding's keys (only then: the programs of the
            kw = {**kw, "rngs": {"quant": rng}}  # other cells stay as they were)
        try:
            if train and rest:
                out, new = self.module.apply(variables, *args, **xkw, **kw, mutable=list(rest))
                return self._output(out), {**rest, **new}
            return self._output(self.module.apply(variables, *args, **xkw, **kw)), rest
        except flax.errors.ModifyScopeVariableError as err:
            raise ValueError(
                f"{err} The model updates a collection in evaluation calls (a BatchNorm in "
                "training mode): set task.call_kwargs, e.g. { train = false }."
            ) from None
        except NameError as err:
            if "unbound axis name" not in str(err):
                raise
            # A BatchNorm(axis_name=...) in training mode, reached by the wrong call.
            fix = (
                "set task.axis_name to that axis (training calls then run under jax.vmap)"
                if train
                else "set task.call_kwargs, e.g. { train = false } (evaluation mode)"
            )
            call = "a training" if train else "an evaluation"
            raise ValueError(
                f"{err} The model reduces over a named axis in {call} call: {fix}."
            ) from None

    def apply(
        self, params: Any, rest: Any, x: Any, *, train: bool = False, rng: jax.Array | None = None
    ) -> tuple[Any, Any]:
        """``(output array, rest)`` of a call on inputs ``x``: evaluation calls take
        ``call_kwargs``; training calls take ``train_kwargs``, return the updated
        collections and run under ``jax.vmap(axis_name=...)`` when the task names one.
        ``rng``: the ``"quant"`` stream's key of a Linen model whose rules round
        stochastically (:attr:`needs_key`; ignored by NNX, which holds its own)."""
        rng = rng if self.needs_key and not self.is_nnx else None
        name = self.calls.axis_name
        if not (train and name):
            return self._call(params, rest, x, train, rng)
        one = jax.tree.map(lambda a: a[None], x)  # one replica of a data-parallel step
        call = lambda a: self._call(params, rest, a, True, rng)
        out, rest = jax.vmap(call, axis_name=name)(one)
        return out[0], jax.tree.map(lambda a: a[0], rest)

    def quantize(self, rules: Any, params: Any, rest: Any, *, seed: int = 0) -> tuple[Net, Any]:
        """``(quantized net, its rest)``: :func:`jaxquant.flax.quantize_model` with
        ``rules``; it takes the same ``params``. An NNX model whose rules round
        stochastically gets ``nnx.Rngs(quant=seed)`` (a fresh key per call, its state in
        ``rest``)."""
        from jaxquant.flax import quantize_model

        rules = tuple(rules)
        if not self.is_nnx:
            return Net(self.calls, module=quantize_model(self.module, rules), rules=rules), rest
        model = nnx.merge(self.graphdef, params, rest)  # a copy: quantized in place
        if any(r.config.needs_key for r in rules):
            quantize_model(model, rules, rngs=nnx.Rngs(quant=seed))
        else:
            quantize_model(model, rules)
        graphdef, qparams, qrest = _split_nnx(model)
        # objects: jaxlib ships no stub for PyTreeDef (it compares by structure at run time).
        before: object = jax.tree.structure(params)
        after: object = jax.tree.structure(qparams)
        if after != before:
            raise ValueError(
                "the quantized NNX model has other parameters than the float one; the "
                "sweep's rules add none (stateless weight and activation specs)."
            )
        return Net(self.calls, graphdef=graphdef, rules=rules), qrest

    def with_state(self, params: Any, rest: Any, x: Any, seed: int = 0) -> Any:
        """``rest`` with the collections a quantized Linen model's stateful rules add
        (``"quant_state"``: delayed scaling's amax history), from an ``init`` of the
        quantized module on one example of ``x``; ``rest`` itself for other nets."""
        if self.is_nnx or not any(
            r.config.scaling == "delayed" or r.config.ste == "lsq" for r in self.rules
        ):
            return rest
        args, xkw = call_args(take(x, slice(0, 1)))
        keys = {"params": jax.random.key(seed), "quant": jax.random.key(seed)}
        with lenient():
            variables = jax.jit(
                lambda a, b: self.module.init(keys, *a, **b, **self.calls.call_kwargs)
            )(args, xkw)
        before: object = jax.tree.structure(params)
        after: object = jax.tree.structure(variables["params"])
        if after != before:
            raise ValueError(
                "the quantized model has other parameters than the float one (learned step "
                "sizes: ste='lsq'); the sweep trains the float model's parameters: use a "
                "recipe without them."
            )
        new = {k: v for k, v in variables.items() if k != "params" and k not in rest}
        return {**rest, **new}

    def calibrate(self, rules: Any, params: Any, rest: Any, batches: list) -> tuple:
        """:func:`jaxquant.flax.calibrate`'s rules (static activation ranges) for ``rules``
        on the float model with ``params``."""
        from jaxquant.flax import calibrate

        kw = self.calls.call_kwargs
        with lenient():
            if self.is_nnx:
                model = nnx.merge(self.graphdef, params, rest)
                return calibrate(model, batches, rules=rules, call_kwargs=kw).rules
            variables = {"params": params, **rest}
            return calibrate(self.module, batches, variables, rules=rules, call_kwargs=kw).rules


def _parameters(fn: Any) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # a builtin without a signature
        return set()


def build(task: dict[str, Any], seed: int, x: Any) -> tuple[Net, Any, Any]:
    """``(net, params, rest)``: the task's model for ``seed``, with its weights.

    ``task.model`` names a callable, called with ``task.model_kwargs`` (lists as tuples)
    plus ``seed=seed`` and ``rngs=nnx.Rngs(seed)`` when it takes parameters so named. It
    returns a ``flax.linen.Module`` (initialised here from ``seed`` on one example of
    ``x``, with ``task.call_kwargs``), a pair ``(linen_module, variables)`` (every
    collection, as ``model.init`` returns them), or an ``nnx.Module``.
    """
    fn = import_object(task["model"])
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in task["model_kwargs"].items()}
    extra: dict[str, Any] = {}
    names = _parameters(fn)
    if "seed" in names:
        extra["seed"] = seed
    if "rngs" in names:
        extra["rngs"] = nnx.Rngs(seed)
    clash = sorted(set(extra) & set(kwargs))
    if clash:
        raise ValueError(
            f"task.model_kwargs sets {clash[0]!r}, which the sweep passes itself (from each "
            "of the config's seeds); remove it from task.model_kwargs."
        )
    got = fn(**kwargs, **extra)
    c = calls(task)
    if isinstance(got, nnx.Module):
        graphdef, params, state = _split_nnx(got)
        return Net(c, graphdef=graphdef), params, state
    if isinstance(got, nn.Module):
        net = Net(c, module=got)
        init_key = jax.random.split(jax.random.key(seed))[0]
        args, xkw = call_args(take(x, slice(0, 1)))
        with lenient():
            variables = jax.jit(lambda k, a, b: got.init(k, *a, **b, **c.call_kwargs))(
                init_key, args, xkw
            )
    elif (
        isinstance(got, tuple)
        and len(got) == 2
        and isinstance(got[0], nn.Module)
        and isinstance(got[1], Mapping)
    ):
        net, variables = Net(c, module=got[0]), got[1]
    else:
        raise TypeError(
            f"task.model {task['model']!r} returned {type(got).__name__}; it must return a "
            "flax.linen.Module, a pair (linen_module, variables) or an nnx.Module."
        )
    if "params" not in variables:
        raise ValueError(
            f"task.model {task['model']!r}: the variables have no 'params' collection "
            f"(collections: {', '.join(map(str, variables)) or 'none'})."
        )
    rest = {k: v for k, v in variables.items() if k != "params"}
    return net, variables["params"], rest


def load_data(task: dict[str, Any]) -> dict[str, Any]:
    """The task's data dict, checked: ``x_train, y_train, x_test, y_test`` (each an array,
    a tuple or a dict of arrays with the examples on the leading axis)."""
    data = import_object(task["data"])(**task.get("data_kwargs", {}))
    if not isinstance(data, Mapping):
        raise TypeError(f"task.data {task['data']!r} returned {type(data).__name__}, not a dict.")
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in data]
    if missing:
        raise ValueError(f"task.data {task['data']!r} returned no {', '.join(missing)}.")
    out = {}
    for split in ("train", "test"):
        x = check_examples(data[f"x_{split}"], f"task.data's x_{split}")
        y = check_examples(data[f"y_{split}"], f"task.data's y_{split}")
        if num_examples(x) != num_examples(y):
            raise ValueError(
                f"task.data {task['data']!r}: x_{split} has {num_examples(x)} examples, "
                f"y_{split} {num_examples(y)}."
            )
        out[f"x_{split}"], out[f"y_{split}"] = x, y
    return out


# Mini-batches of up to this many examples are drawn without replacement (a permutation
# of all n per step: microseconds for digits' 1347 images); a larger set (the byte LM's
# 67k windows, where the permutation took 34 of a 90 ms step on 2 CPU cores) with
# replacement: a repeat within a batch of 64 has probability < 64^2 / 2n = 3%.
_EXACT_SAMPLE = 8192


@functools.lru_cache(maxsize=64)
def make_trainer(net: Net, batch: int, steps: int, lr: float):
    """A jitted ``train(params, rest, x, y, key) -> (params, rest, losses)``: ``steps``
    Adam steps (cosine decay from ``lr``) on random mini-batches of ``batch``, each a
    training call of ``net`` (cached: one compile per net and schedule in a process)."""
    tx = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.0))

    def loss_fn(params, rest, x, y, rng):
        out, rest = net.apply(params, rest, x, train=True, rng=rng)
        return _scalar(net.calls.loss(out, y), "task.loss"), rest

    @jax.jit
    def train(params, rest, x, y, key):
        n = num_examples(x)
        b = min(batch, n)

        def step(carry, k):
            params, rest, opt_state = carry
            if n <= _EXACT_SAMPLE:
                idx = jax.random.choice(k, n, (b,), replace=False)
            else:  # choice without replacement permutes all n: a third of an LM step
                idx = jax.random.randint(k, (b,), 0, n)
            grad = jax.value_and_grad(loss_fn, has_aux=True)
            # A fresh "quant" key per step for stochastic rounding (net.needs_key).
            rng = jax.random.fold_in(k, 1) if net.needs_key else None
            (loss, rest), g = grad(params, rest, take(x, idx), take(y, idx), rng)
            updates, opt_state = tx.update(g, opt_state, params)
            return (optax.apply_updates(params, updates), rest, opt_state), loss

        (params, rest, _), losses = jax.lax.scan(
            step, (params, rest, tx.init(params)), jax.random.split(key, steps)
        )
        return params, rest, losses

    def run(params, rest, x, y, key):
        with lenient():
            return train(params, rest, x, y, key)

    return run


def train_steps(task: dict[str, Any], n_train: int) -> int:
    """``task.steps`` when given (> 0), else ``task.epochs`` passes over ``n_train``
    examples in mini-batches of ``task.batch`` (0 epochs: no float training)."""
    if task.get("steps", 0) > 0:
        return task["steps"]
    if task["epochs"] == 0:
        return 0
    return task["epochs"] * max(n_train // task["batch"], 1)


def train_float(task: dict[str, Any], data: dict[str, Any], seed: int):
    """``(net, params, rest, final_loss)``: the task's model for ``seed``, trained
    :func:`train_steps` Adam steps on mini-batches of ``task.batch`` (none: the weights
    the model factory returns, and ``final_loss`` None)."""
    x, y = data["x_train"], data["y_train"]
    net, params, rest = build(task, seed, x)
    steps = train_steps(task, num_examples(x))
    if steps == 0:
        return net, params, rest, None
    data_key = jax.random.split(jax.random.key(seed))[1]
    trainer = make_trainer(net, task["batch"], steps, task["lr"])
    params, rest, losses = trainer(params, rest, x, y, data_key)
    loss = float(losses[-1])
    if not np.isfinite(loss):
        raise FloatingPointError(f"seed {seed}: non-finite float training loss {loss}")
    return net, params, rest, loss


@functools.lru_cache(maxsize=64)
def make_eval(net: Net, batch: int = 256):
    """A jitted ``evaluate(params, rest, x, y) -> (metric, loss)``: the task's metric and
    loss averaged over every example, in mini-batches of ``batch`` examples (each
    batch's mean weighted by its size; cached: one compile per net)."""

    def part(params, rest, x, y):
        # Stochastic specs round with one fixed key: the same number at every evaluation.
        rng = jax.random.key(0) if net.needs_key else None
        out, _ = net.apply(params, rest, x, rng=rng)
        out = out.astype(jnp.float32)
        metric = _scalar(net.calls.metric(out, y), "task.metric")
        return metric, _scalar(net.calls.loss(out, y), "task.loss")

    @jax.jit
    def evaluate(params, rest, x, y):
        n = num_examples(x)
        full = n // batch * batch
        metric, loss = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
        if full:

            def split(a):
                return a[:full].reshape(-1, batch, *a.shape[1:])

            xs, ys = jax.tree.map(split, x), jax.tree.map(split, y)
            ms, ls = jax.lax.map(lambda xy: part(params, rest, *xy), (xs, ys))
            metric, loss = jnp.sum(ms) * batch, jnp.sum(ls) * batch
        if full < n:
            rows = slice(full, n)
            m, ll = part(params, rest, take(x, rows), take(y, rows))
            metric, loss = metric + m * (n - full), loss + ll * (n - full)
        return metric / n, loss / n

    def run(params, rest, x, y):
        with lenient():
            return evaluate(params, rest, x, y)

    return run


def leaf_path(path: Any) -> str:
    """A pytree path as ``"a/b/kernel"`` (Linen dicts, NNX states: the ``.value`` of an
    ``nnx.Variable`` is left out), the layer paths of :mod:`jaxquant.flax`'s rules."""
    names = []
    for p in path:
        if isinstance(p, jax.tree_util.GetAttrKey):
            names.append(p.name)
        elif isinstance(p, jax.tree_util.SequenceKey):
            names.append(str(p.idx))
        else:
            names.append(str(getattr(p, "key", p)))
    if names and names[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
        names.pop()
    return "/".join(names)


def kernels(params: Any, layers: str = ".*") -> dict[str, tuple[int, ...]]:
    """The quantized layers: module path -> kernel shape, for leaves ``kernel`` of rank
    >= 2 whose module path ``re.fullmatch``-es ``layers``."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        layer, _, name = leaf_path(path).rpartition("/")
        if name == "kernel" and leaf.ndim >= 2 and re.fullmatch(layers, layer):
            out[layer] = tuple(leaf.shape)
    return out
