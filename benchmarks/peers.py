"""jaxquant beside the libraries a user would pick instead: Qwix, AQT (aqtp), flax's fp8 ops.

One process, one model, one recipe, every library timed in the same interleaved rounds:

* **quantizer throughput**: int8 per-channel quantization of a 4096 x 4096 float32 weight
  (jaxquant ``jq.quantize``, Qwix ``qwix.quantize``), and int4 in groups of 128 along the
  contracted axis; ratio to a plain ``x * 2`` pass over the same array (the bandwidth
  floor), per round;
* **QAT step overhead**: the digits MLP (64-512-512-10, batch 128, Adam) trained with int8
  per-channel weights x int8 per-tensor activations, forward-only quantization with a
  straight-through backward (jaxquant ``quantize_model`` + ``Rule``; Qwix ``QtProvider``
  + ``QtRule(weight_qtype="int8", act_qtype="int8")``; AQT ``config_v4(fwd_bits=8,
  dlhs_bits=None, drhs_bits=None)`` through ``AqtDotGeneral``) and flax's
  ``Fp8DotGeneral`` (e4m3 / e5m2 with delayed scaling: a different recipe, listed for the
  fp8 path); ratio of each step to the float step timed next to it;
* **accuracy of the same recipe**: each library's w8a8 QAT of the same MLP from the same
  init, same data order and steps; test accuracy over ``--seeds``.

The peers are optional: ``pip install -e ".[bench]"`` installs them; a library that does
not import is listed as skipped. Run::

    python3 benchmarks/peers.py --out benchmarks/results/peers_cpu.json
    python3 benchmarks/peers.py --quick          # a smoke run

Numbers on a shared machine are noisy: compare the ratios, not the milliseconds.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxquant as jq
from jaxquant.flax import Rule, quantize_model

HIDDEN = (512, 512)


# ---------------------------------------------------------------------------- peers


def _peers() -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        import qwix

        out["qwix"] = qwix
    except Exception as e:
        out["qwix_error"] = repr(e)
    try:
        from aqt.jax.v2 import config as aqt_config
        from aqt.jax.v2.flax import aqt_flax

        out["aqt"] = (aqt_config, aqt_flax)
    except Exception as e:
        out["aqt_error"] = repr(e)
    return out


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


# ---------------------------------------------------------------------------- models


class MLP(nn.Module):
    """The digits MLP; ``dense`` builds each layer (a peer's quantized Dense, or nn.Dense)."""

    features: tuple[int, ...] = HIDDEN
    dense: Callable[..., nn.Module] = nn.Dense

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for f in self.features:
            x = nn.relu(self.dense(f)(x))
        return self.dense(10)(x)


def _w8a8_rule() -> Rule:
    return Rule(".*", weight=jq.QuantSpec("int8", jq.per_channel(-1)), act=jq.QuantSpec("int8"))


def make_models(peers: dict[str, Any]) -> dict[str, nn.Module]:
    """Models with the same parameter tree (``Dense_0..2/{kernel,bias}``) per library."""
    models: dict[str, nn.Module] = {"float": MLP()}
    models["jaxquant"] = quantize_model(MLP(), _w8a8_rule())
    if "qwix" in peers:
        qwix = peers["qwix"]
        rule = qwix.QtRule(module_path=".*", weight_qtype="int8", act_qtype="int8")
        models["qwix"] = qwix.quantize_model(MLP(), qwix.QtProvider([rule]))
    if "aqt" in peers:
        aqt_config, aqt_flax = peers["aqt"]
        cfg = aqt_config.config_v4(fwd_bits=8, dlhs_bits=None, drhs_bits=None)
        dg = functools.partial(aqt_flax.AqtDotGeneral, cfg, prng_name=None)
        models["aqt"] = MLP(dense=functools.partial(nn.Dense, dot_general_cls=dg))
    models["flax_fp8"] = MLP(dense=functools.partial(nn.Dense, dot_general_cls=nn.Fp8DotGeneral))
    return models


# ------------------------------------------------------------------------------ data


def load_digits_split(seed: int = 0) -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(
        x, d.target, test_size=0.25, stratify=d.target, random_state=seed
    )
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-3
    return {
        "x_train": (xtr - mu) / sd,
        "y_train": ytr.astype(np.int32),
        "x_test": (xte - mu) / sd,
        "y_test": yte.astype(np.int32),
    }


# ----------------------------------------------------------------------------- steps


OWG = "_overwrite_with_gradient"  # flax fp8 ops: scales updated through their "gradient"


def make_step(model: nn.Module, tx: optax.GradientTransformation):
    """One jitted Adam step. Non-param collections (Qwix / AQT state) are threaded through
    as mutable state; flax's fp8 scales and amax histories (``_overwrite_with_gradient``)
    are differentiated and overwritten with their gradients, as flax documents."""

    def loss_fn(params, owg, state, x, y):
        variables = {"params": params, **state, **({OWG: owg} if owg is not None else {})}
        if state:
            out, new_state = model.apply(variables, x, mutable=list(state))
        else:
            out, new_state = model.apply(variables, x), {}
        loss = optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
        return loss, new_state

    @jax.jit
    def step(params, state, opt_state, x, y):
        owg = state.get(OWG)
        rest = {k: v for k, v in state.items() if k != OWG}
        (loss, new_rest), (grads, owg_grads) = jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True
        )(params, owg, rest, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        new_state = {**rest, **new_rest}
        if owg is not None:
            new_state[OWG] = owg_grads
        return optax.apply_updates(params, updates), new_state, opt_state, loss

    return step


def init(model: nn.Module, seed: int, x: jax.Array):
    variables = model.init(jax.random.key(seed), x)
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    return params, state


# ------------------------------------------------------------------------- timings


def _time(f: Callable[[], Any], reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        out = f()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps


def paired_ratios(
    baseline: Callable[[], Any], variants: dict[str, Callable[[], Any]], rounds: int, reps: int
) -> dict[str, dict[str, float]]:
    """Median over rounds of variant time / baseline time (baseline timed right before)."""
    for f in (baseline, *variants.values()):  # warm-up (compile)
        jax.block_until_ready(f())
    ratios: dict[str, list[float]] = {k: [] for k in variants}
    ms: dict[str, list[float]] = {k: [] for k in ("baseline", *variants)}
    names = list(variants)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            tb = _time(baseline, reps)
            tv = _time(variants[name], reps)
            ratios[name].append(tv / tb)
            ms["baseline"].append(tb * 1e3)
            ms[name].append(tv * 1e3)
    return {
        k: {
            "ratio": statistics.median(v),
            "min": min(v),
            "max": max(v),
            "ms": statistics.median(ms[k]),
        }
        for k, v in ratios.items()
    } | {"baseline": {"ratio": 1.0, "ms": statistics.median(ms["baseline"])}}


def quantizer_throughput(peers: dict[str, Any], rounds: int, reps: int, n: int) -> dict:
    x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    base = jax.jit(lambda x: x * 2.0)
    s8 = jq.QuantSpec("int8", jq.per_channel(-1))
    s4 = jq.QuantSpec("int4", jq.per_block(0, 128))
    v: dict[str, Callable[[], Any]] = {
        "jaxquant int8 per-channel": functools.partial(jax.jit(lambda x: jq.quantize(x, s8)), x),
        "jaxquant int4 groups of 128": functools.partial(jax.jit(lambda x: jq.quantize(x, s4)), x),
    }
    if "qwix" in peers:
        qwix = peers["qwix"]
        v["qwix int8 per-channel"] = functools.partial(
            jax.jit(lambda x: qwix.quantize(x, "int8", channelwise_axes=(1,))), x
        )
        v["qwix int4 groups of 128"] = functools.partial(
            jax.jit(lambda x: qwix.quantize(x, "int4", tiled_axes={0: 128}, channelwise_axes=(1,))),
            x,
        )
    return paired_ratios(functools.partial(base, x), v, rounds, reps)


def qat(peers: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    data = load_digits_split()
    models = make_models(peers)
    tx = optax.adam(1e-3)
    n = len(data["y_train"])
    bs = 128
    xb = jnp.asarray(data["x_train"][:bs])
    yb = jnp.asarray(data["y_train"][:bs])
    steps = {name: make_step(m, tx) for name, m in models.items()}
    states = {}
    for name, m in models.items():
        params, state = init(m, 0, xb)
        states[name] = [params, state, tx.init(params)]

    def runner(name):
        def run():
            p, s, o = states[name]
            return steps[name](p, s, o, xb, yb)

        return run

    timing = paired_ratios(
        runner("float"),
        {k: runner(k) for k in models if k != "float"},
        args.rounds,
        args.reps,
    )
    # accuracy of the same recipe: same init seed, same data order and steps
    acc: dict[str, list[float]] = {k: [] for k in models}
    for seed in range(args.seeds):
        order = np.random.default_rng(seed).permutation(n)
        for name, m in models.items():
            params, state = init(m, seed, xb)
            opt = tx.init(params)
            step = steps[name]
            for i in range(args.steps):
                idx = order[(i * bs) % (n - bs) : (i * bs) % (n - bs) + bs]
                params, state, opt, _ = step(
                    params,
                    state,
                    opt,
                    jnp.asarray(data["x_train"][idx]),
                    jnp.asarray(data["y_train"][idx]),
                )
            variables = {"params": params, **state}
            logits = m.apply(variables, jnp.asarray(data["x_test"]), mutable=list(state) or False)
            logits = logits[0] if isinstance(logits, tuple) else logits
            acc[name].append(float(np.mean(np.argmax(np.asarray(logits), -1) == data["y_test"])))
    return {
        "step": timing,
        "accuracy": {
            k: {"mean": float(np.mean(v)) * 100, "std": float(np.std(v)) * 100, "runs": v}
            for k, v in acc.items()
        },
    }


def _git() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except Exception:
        return "unknown"


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        f"{doc['env']['backend']}, jax {doc['env']['jax']}, qwix {doc['env']['qwix']}, "
        f"aqtp {doc['env']['aqtp']}, jaxquant {doc['env']['git']}, "
        f"{doc['config']['rounds']} rounds",
        "",
        "| quantizer | time / (x * 2) | range |",
        "|---|--:|--:|",
    ]
    for k, v in doc["quantizer"].items():
        if k != "baseline":
            lines.append(f"| {k} | {v['ratio']:.2f}x | {v['min']:.2f}-{v['max']:.2f} |")
    lines += [
        "",
        "| QAT w8a8 step (digits MLP, batch 128) | time / float step | range | test accuracy |",
        "|---|--:|--:|--:|",
    ]
    acc = doc["qat"]["accuracy"]
    for k, v in doc["qat"]["step"].items():
        name = "float" if k == "baseline" else k
        rng = "" if k == "baseline" else f"{v['min']:.2f}-{v['max']:.2f}"
        a = acc[name]
        lines.append(
            f"| {name} | {v['ratio']:.2f}x | {rng} | {a['mean']:.2f} +- {a['std']:.2f} % |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--n", type=int, default=4096, help="quantizer benchmark size (n x n)")
    p.add_argument("--markdown", default=None, help="print the table of a saved JSON")
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(json.load(open(args.markdown))))
        return {}
    if args.quick:
        args.rounds, args.reps, args.seeds, args.steps, args.n = 2, 2, 1, 30, 512
    peers = _peers()
    with jax.numpy_dtype_promotion("standard"):
        doc = {
            "config": vars(args),
            "env": {
                "python": platform.python_version(),
                "jax": jax.__version__,
                "backend": jax.default_backend(),
                "devices": [str(d) for d in jax.devices()],
                "cpus": os.cpu_count(),
                "qwix": _version("qwix"),
                "aqtp": _version("aqtp"),
                "flax": _version("flax"),
                "git": _git(),
                "load_average": os.getloadavg(),
                "skipped": {k: v for k, v in peers.items() if k.endswith("_error")},
            },
            "quantizer": quantizer_throughput(peers, args.rounds, args.reps, args.n),
            "qat": qat(peers, args),
        }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
    print(markdown(doc))
    return doc


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
