"""Quantized training of the byte-level LM, and paired statistics over seeds.

The one training loop of the QAT benchmark (``benchmarks/qat_lm.py``) and the 4-bit
training reproductions (``papers/fp4_training``): :class:`jaxquant.app.models.ByteLM`
quantized by a list of :class:`jaxquant.flax.Rule` (``None``: float), trained with AdamW
(warmup + cosine, global-norm clipping) on random windows of the Python standard
library's bytes, and evaluated on evenly spaced held-out windows.

Every variable collection besides ``params`` (the ``quant_state`` of delayed scaling,
PRNG keys) is threaded through every step. The optimizer is wrapped by ``wrap_tx`` when
given (e.g. a wrapper that writes gradient-carried quantization state into its variables
instead of stepping it).

Small-scale quantized training differs from float by less than one seed's noise, so
:func:`paired_difference` compares two variants *seed by seed* (same initialisation, same
batches) and gives a t-interval of the mean difference: a claim is resolved only when the
interval excludes zero.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxquant.app.datasets import spaced_windows
from jaxquant.app.models import ByteLM
from jaxquant.flax import quantize_model

__all__ = [
    "DEFAULTS",
    "build",
    "paired_difference",
    "sample_batch",
    "train",
]

#: The run's configuration: model (``seq``, ``width``, ``layers``, ``heads``, ``hidden``),
#: optimizer (``steps``, ``lr``, ``weight_decay``, ``batch``), ``chunk`` steps per jitted
#: scan, validation (``val_windows`` windows in batches of ``eval_batch``).
DEFAULTS: dict[str, Any] = {
    "seq": 128,
    "batch": 16,
    "width": 128,
    "layers": 2,
    "heads": 4,
    "hidden": 512,
    "steps": 300,
    "lr": 3e-3,
    "weight_decay": 0.01,
    "chunk": 50,
    "val_windows": 512,
    "eval_batch": 128,
}


def build(cfg: dict[str, Any], rules: Sequence[Any] | None) -> Any:
    """``ByteLM`` of ``cfg``, quantized by ``rules`` (``None``: the float model).

    Example:
      >>> import jaxquant as jq
      >>> from jaxquant.app.training import DEFAULTS, build
      >>> model = build(DEFAULTS, jq.recipes.get("fp8_current").rules(r"block\\d+/.*"))
      >>> type(model).__name__
      'QuantizedModule'
    """
    model = ByteLM(
        seq=cfg["seq"],
        d=cfg["width"],
        layers=cfg["layers"],
        heads=cfg["heads"],
        hidden=cfg["hidden"],
    )
    return model if rules is None else quantize_model(model, tuple(rules))


def sample_batch(data: jax.Array, key: jax.Array, batch: int, seq: int) -> jax.Array:
    """``batch`` random windows of ``seq + 1`` bytes of ``data`` (int32).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxquant.app.training import sample_batch
      >>> sample_batch(jnp.arange(50), jax.random.key(0), 2, 8).shape
      (2, 9)
    """
    starts = jax.random.randint(key, (batch,), 0, data.shape[0] - seq - 1)
    idx = starts[:, None] + jnp.arange(seq + 1)[None, :]
    return data[idx].astype(jnp.int32)


def _loss(model: Any, params: Any, rest: dict[str, Any], batch: jax.Array, key: jax.Array) -> Any:
    # The "quant" stream: the keys of stochastic rounding (unused by other models).
    logits, rest = model.apply(
        {"params": params, **rest}, batch[:, :-1], mutable=list(rest), rngs={"quant": key}
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
    return loss, dict(rest)


def _optimizer(cfg: dict[str, Any]) -> optax.GradientTransformation:
    warmup = max(1, cfg["steps"] // 10)
    lr = optax.warmup_cosine_decay_schedule(
        0.0, cfg["lr"], warmup, cfg["steps"], end_value=cfg["lr"] * 0.1
    )
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(lr, b1=0.9, b2=0.99, weight_decay=cfg["weight_decay"]),
    )


def _compile(model: Any, cfg: dict[str, Any], tx: optax.GradientTransformation) -> tuple:
    """The jitted ``chunk`` (``steps`` training steps in one scan) and ``nll`` functions."""

    def step(state, data, key, i):
        params, rest, opt_state = state
        k = jax.random.fold_in(key, i)
        batch = sample_batch(data, k, cfg["batch"], cfg["seq"])
        grad = jax.value_and_grad(_loss, argnums=1, has_aux=True)
        (loss, rest), grads = grad(model, params, rest, batch, jax.random.fold_in(k, 1))
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), rest, opt_state), loss

    def chunk(state, data, key, steps):
        return jax.lax.scan(lambda s, i: step(s, data, key, i), state, steps)

    def nll(state, windows):
        params, rest, _ = state
        # Evaluation rounds stochastic specs with a fixed key: the same number every call.
        return _loss(model, params, rest, windows, jax.random.key(0))[0]

    return jax.jit(chunk, donate_argnums=0), jax.jit(nll)


def train(
    model: Any,
    cfg: dict[str, Any],
    corpus: dict[str, Any],
    seeds: Sequence[int] = (0,),
    *,
    wrap_tx: Callable[[optax.GradientTransformation], optax.GradientTransformation] | None = None,
    inspect: Callable[[Any], dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` (from :func:`build`) once per seed on ``corpus``
    (:func:`jaxquant.app.datasets.stdlib_corpus`) and evaluate each run; the seeds share
    one compiled program.

    A seed's initialisation key is ``seed``, its batch keys ``10_000 + seed``: two models
    trained with the same seed see the same batches in the same order (and the same
    initial weights where their parameters agree), which :func:`paired_difference` uses.

    Args:
      model: the model (float or quantized).
      cfg: :data:`DEFAULTS` with changes.
      corpus: ``{"train": uint8 array, "val": uint8 array}``.
      seeds: one run each.
      wrap_tx: wraps the AdamW chain (``None``: it as is).
      inspect: called with a run's final ``(params, rest, opt_state)``; its dict joins the
        run's result (e.g. per-layer quantization errors).

    Returns:
      Per seed: ``seed``, ``val_nll`` (nats per byte), ``val_bits_per_byte``,
      ``final_train_loss`` (mean of the last 5% of steps), ``train_loss_curve`` (at most
      50 means), ``seconds`` (the first seed's include compiling); or ``seed`` and
      ``error`` when the run raised or its validation loss is not finite.

    Example:
      >>> from jaxquant.app.datasets import stdlib_corpus
      >>> from jaxquant.app.training import DEFAULTS, build, train
      >>> cfg = {**DEFAULTS, "seq": 16, "batch": 4, "width": 16, "heads": 2, "hidden": 32,
      ...        "layers": 1, "steps": 4, "chunk": 2, "val_windows": 4, "eval_batch": 4}
      >>> [r] = train(build(cfg, None), cfg, stdlib_corpus(max_files=20))
      >>> sorted(k for k in r if k.startswith("val_"))
      ['val_bits_per_byte', 'val_nll']
    """
    tx = _optimizer(cfg)
    if wrap_tx is not None:
        tx = wrap_tx(tx)
    chunk, nll = _compile(model, cfg, tx)
    data = jnp.asarray(corpus["train"])
    windows = spaced_windows(corpus["val"], cfg["seq"] + 1, cfg["val_windows"])
    runs = []
    for seed in seeds:
        t0 = time.perf_counter()
        try:
            keys = {"params": jax.random.key(seed), "quant": jax.random.key(20_000 + seed)}
            variables = model.init(keys, jnp.zeros((1, cfg["seq"]), jnp.int32))
            params = variables["params"]
            rest = {k: v for k, v in variables.items() if k != "params"}
            state = (params, rest, tx.init(params))
            key = jax.random.key(10_000 + seed)
            losses: list[float] = []
            # optax's Adam is not strict-promotion clean; "standard" changes no value.
            with jax.numpy_dtype_promotion("standard"):
                for s0 in range(0, cfg["steps"], cfg["chunk"]):
                    steps = jnp.arange(s0, min(s0 + cfg["chunk"], cfg["steps"]))
                    state, ls = chunk(state, data, key, steps)
                    losses.extend(np.asarray(ls).tolist())
                val = [
                    float(nll(state, jnp.asarray(windows[i : i + cfg["eval_batch"]])))
                    for i in range(0, len(windows), cfg["eval_batch"])
                ]
            val_nll = float(np.mean(val))  # equal-sized batches: the mean over every byte
            curve = np.array_split(np.asarray(losses), min(50, len(losses)))
            r: dict[str, Any] = {
                "seed": seed,
                "val_nll": val_nll,
                "val_bits_per_byte": val_nll / math.log(2),
                "final_train_loss": float(np.mean(losses[-max(1, len(losses) // 20) :])),
                "train_loss_curve": [float(np.mean(c)) for c in curve],
                "seconds": time.perf_counter() - t0,
            }
            if inspect is not None:
                r.update(inspect(state))
            if not math.isfinite(val_nll):
                r["error"] = f"non-finite validation loss {val_nll}"
        except Exception as e:  # a broken variant is a result: report it, keep going
            r = {"seed": seed, "error": f"{type(e).__name__}: {e}"}
        runs.append(r)
    return runs


def paired_difference(
    runs: Sequence[dict[str, Any]],
    baseline: Sequence[dict[str, Any]],
    key: str = "val_nll",
    confidence: float = 0.95,
) -> dict[str, Any]:
    """The mean of ``run[key] - baseline[key]`` over the seeds both ran, with a Student-t
    ``confidence`` interval (the per-seed differences' spread; the seed-to-seed variation
    common to both variants cancels).

    Returns:
      ``{"n", "mean", "std", "low", "high", "resolved"}``: ``resolved`` is ``"above"`` or
      ``"below"`` when the interval excludes 0 on that side, else ``"no"``; with fewer
      than 2 seeds the interval is infinite.

    Example:
      >>> from jaxquant.app.training import paired_difference
      >>> a = [{"seed": s, "val_nll": 1.0 + 0.1 * s + 0.02} for s in range(4)]
      >>> b = [{"seed": s, "val_nll": 1.0 + 0.1 * s} for s in range(4)]
      >>> d = paired_difference(a, b)
      >>> round(d["mean"], 4), d["resolved"]
      (0.02, 'above')
    """
    from scipy import stats  # the sweep extra (scikit-learn's dependency)

    base = {r["seed"]: r[key] for r in baseline if "error" not in r and key in r}
    diffs = np.asarray(
        [r[key] - base[r["seed"]] for r in runs if "error" not in r and r.get("seed") in base],
        np.float64,
    )
    n = len(diffs)
    if n == 0:
        return {
            "n": 0,
            "mean": math.nan,
            "std": math.nan,
            "low": -math.inf,
            "high": math.inf,
            "resolved": "no",
        }
    mean = float(diffs.mean())
    std = float(diffs.std(ddof=1)) if n > 1 else math.inf
    if n > 1:
        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
        # Equal differences (std 0) are exact: the interval is that point.
        low, high = mean - half, mean + half
    else:
        low, high = -math.inf, math.inf
    resolved = "above" if low > 0 else "below" if high < 0 else "no"
    return {"n": n, "mean": mean, "std": std, "low": low, "high": high, "resolved": resolved}
