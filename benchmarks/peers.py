"""jaxquant beside the libraries a user would pick instead: Qwix, AQT (aqtp), flax's fp8 ops.

One process, one model, one recipe, every library timed in the same interleaved rounds:

* **quantizer throughput**: int8 per-channel quantization of a 4096 x 4096 float32 weight
  (``--n``; 16384 with ``--preset gpu``) (jaxquant ``jq.quantize``, Qwix
  ``qwix.quantize``), and int4 in groups of 128 along the contracted axis; ratio to a plain
  ``x * 2`` pass over the same array (the bandwidth floor), per round;
* **QAT step overhead**: the digits MLP (64-512-512-10, batch 128, Adam) trained with int8
  per-channel weights x int8 per-tensor activations, forward-only quantization with a
  straight-through backward (jaxquant ``quantize_model`` + ``Rule``; Qwix ``QtProvider``
  + ``QtRule(weight_qtype="int8", act_qtype="int8")``; AQT ``config_v4(fwd_bits=8,
  dlhs_bits=None, drhs_bits=None)`` through ``AqtDotGeneral``) and flax's
  ``Fp8DotGeneral`` (e4m3 / e5m2 with delayed scaling: a different recipe, listed for the
  fp8 path); ratio of each step to the float step timed next to it;
* **accuracy of the same recipe**: each library's w8a8 QAT of the same MLP from the same
  init, same data order and steps; test accuracy over ``--seeds``;
* **large QAT step** (section ``large``, on by default with ``--preset gpu``): the same
  w8a8 recipe on an MLP of ``--width`` (4096-4096-4096-4096, batch 8192, bfloat16
  compute over float32 parameters, random data), where the GEMMs rather than the launches
  set the time and an int8 / fp8 GEMM can pay; ratio to the float step, the loss after a
  few steps on one batch (each peer trains), and the GEMMs each compiled step holds (its
  dots and cuBLAS custom calls with their operand dtypes; ``--hlo-dir`` saves the HLO);
* **published models** (section ``models``, not in a preset's default): jaxquant beside
  Qwix on the four third-party models of tests/third_party_models.py (GPT-2, BERT,
  ResNet, lm1b NNX): contractions quantized, output SQNR, bytes, step and cold-compile
  time ratios to float (benchmarks/peers_models.py, which also runs on its own; its
  options here are ``--models-models``, ``--models-libs``, ``--models-compile-rounds``).

A peer that fails (import, init, compile or run) is dropped from that section and its error
recorded under ``errors`` in the JSON; the other peers' results are kept. With ``--out``
the JSON is rewritten after each section, so a run cut short keeps the finished sections.

The peers are optional: ``pip install -e ".[bench]"`` installs them; a library that does
not import is listed as skipped. Run::

    python3 benchmarks/peers.py --out benchmarks/results/peers_cpu.json
    python3 benchmarks/peers.py --quick          # a smoke run
    python3 benchmarks/peers.py --preset gpu     # GPU sizes; benchmarks/gpu.py --sections peers

Numbers on a shared machine are noisy: compare the ratios, not the milliseconds.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import common
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxquant as jq
from jaxquant.app.datasets import digits
from jaxquant.flax import Rule, quantize_model

HIDDEN = (512, 512)
SECTIONS = ("quantizer", "qat", "large", "models")
# Per preset: the defaults of the options left unset. "gpu": a 16384 x 16384 quantizer input
# (a 4096 one is ~30 us on an H100: launch-bound), 50 calls per timing of the digits step
# (~0.3 ms, launch-bound there too), and the large step where GEMMs set the time.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"rounds": 7, "reps": 10, "n": 4096, "sections": "quantizer,qat"},
    "gpu": {"rounds": 7, "reps": 50, "n": 16384, "sections": "quantizer,qat,large"},
}


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


def _error(e: BaseException, what: str) -> str:
    """``TypeName: message`` (first 600 characters) for the JSON; the traceback to stderr."""
    print(f"peers.py: {what} failed:", file=sys.stderr)
    traceback.print_exception(e, file=sys.stderr)
    return f"{type(e).__name__}: {e}"[:600]


# ---------------------------------------------------------------------------- models


def _w8a8_rule() -> Rule:
    return Rule(".*", weight=jq.QuantSpec("int8", jq.per_channel(-1)), act=jq.QuantSpec("int8"))


def make_models(
    peers: dict[str, Any],
    *,
    features: tuple[int, ...] = HIDDEN,
    classes: int = 10,
    dtype: Any = None,
    errors: dict[str, str] | None = None,
) -> dict[str, nn.Module]:
    """Models with the same parameter tree (``Dense_0..2/{kernel,bias}``) per library.

    ``dtype``: the layers' compute dtype (``nn.Dense(dtype=...)``; parameters stay float32).
    A peer whose model cannot be built is left out, its error in ``errors`` (raised if None).
    """
    dense: Callable[..., nn.Module] = (
        nn.Dense if dtype is None else functools.partial(nn.Dense, dtype=dtype)
    )

    def mlp(layer: Callable[..., nn.Module] = dense) -> common.MLP:
        return common.MLP(features=features, n_out=classes, dense=layer)

    def qwix_model() -> nn.Module:
        qwix = peers["qwix"]
        rule = qwix.QtRule(module_path=".*", weight_qtype="int8", act_qtype="int8")
        return qwix.quantize_model(mlp(), qwix.QtProvider([rule]))

    def aqt_model() -> nn.Module:
        aqt_config, aqt_flax = peers["aqt"]
        cfg = aqt_config.config_v4(fwd_bits=8, dlhs_bits=None, drhs_bits=None)
        dg = functools.partial(aqt_flax.AqtDotGeneral, cfg, prng_name=None)
        return mlp(functools.partial(dense, dot_general_cls=dg))

    builders: dict[str, Callable[[], nn.Module]] = {
        "float": mlp,
        "jaxquant": lambda: quantize_model(mlp(), _w8a8_rule()),
    }
    if "qwix" in peers:
        builders["qwix"] = qwix_model
    if "aqt" in peers:
        builders["aqt"] = aqt_model
    builders["flax_fp8"] = lambda: mlp(functools.partial(dense, dot_general_cls=nn.Fp8DotGeneral))
    models: dict[str, nn.Module] = {}
    for name, build in builders.items():
        try:
            models[name] = build()
        except Exception as e:
            if errors is None or name == "float":
                raise
            errors[name] = _error(e, f"building the {name} model")
    return models


# ------------------------------------------------------------------------------ data


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
        out = out.astype(jnp.float32)  # a no-op for the float32 digits MLP
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


def paired_ratios(
    baseline: Callable[[], Any],
    variants: dict[str, Callable[[], Any]],
    rounds: int,
    reps: int,
    errors: dict[str, str] | None = None,
) -> dict[str, dict[str, float]]:
    """Median over rounds of variant time / baseline time (baseline timed right before).

    A variant whose warm-up (compile and first call) raises is left out, its error in
    ``errors`` (raised if None)."""
    jax.block_until_ready(baseline())  # warm-up (compile)
    live: dict[str, Callable[[], Any]] = {}
    for name, f in variants.items():
        try:
            jax.block_until_ready(f())
            live[name] = f
        except Exception as e:
            if errors is None:
                raise
            errors[name] = _error(e, f"{name} (warm-up)")
    out = common.paired_ratios(baseline, live, rounds, reps)
    out["baseline"]["ratio"] = 1.0
    return out


def quantizer_throughput(
    peers: dict[str, Any], rounds: int, reps: int, n: int, errors: dict[str, str] | None = None
) -> dict:
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
    return paired_ratios(functools.partial(base, x), v, rounds, reps, errors)


def _init_all(
    models: dict[str, nn.Module],
    tx: optax.GradientTransformation,
    x: jax.Array,
    errors: dict[str, str] | None,
) -> dict[str, list[Any]]:
    """``[params, state, opt_state]`` per model from seed 0; a model whose init raises is
    removed from ``models`` (in place), its error in ``errors`` (raised if None)."""
    states = {}
    for name, m in list(models.items()):
        try:
            params, state = init(m, 0, x)
            states[name] = [params, state, tx.init(params)]
        except Exception as e:
            if errors is None or name == "float":
                raise
            errors[name] = _error(e, f"{name} init")
            del models[name]
    return states


def _time_steps(models, tx, x, y, rounds: int, reps: int, errors: dict[str, str] | None):
    """Compile every model's training step on ``(x, y)`` and time it against the float
    step (:func:`paired_ratios`). Returns ``(steps, states, timing)``; a model that fails
    to initialize is dropped (``errors``)."""
    steps = {name: make_step(m, tx) for name, m in models.items()}
    states = _init_all(models, tx, x, errors)

    def runner(name):
        def run():
            p, s, o = states[name]
            return steps[name](p, s, o, x, y)

        return run

    others = {k: runner(k) for k in models if k != "float"}
    return steps, states, paired_ratios(runner("float"), others, rounds, reps, errors)


def qat(
    peers: dict[str, Any], args: argparse.Namespace, errors: dict[str, str] | None = None
) -> dict[str, Any]:
    data = digits()  # jaxquant.app.datasets: the split every digits benchmark uses
    models = make_models(peers, errors=errors)
    tx = optax.adam(1e-3)
    n = len(data["y_train"])
    bs = 128
    xb = jnp.asarray(data["x_train"][:bs])
    yb = jnp.asarray(data["y_train"][:bs])
    steps, _, timing = _time_steps(models, tx, xb, yb, args.rounds, args.reps, errors)
    # accuracy of the same recipe: same init seed, same data order and steps
    acc: dict[str, list[float]] = {k: [] for k in models if k == "float" or k in timing}
    for seed in range(args.seeds):
        order = np.random.default_rng(seed).permutation(n)
        for name in list(acc):
            m = models[name]
            try:
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
                logits = m.apply(
                    variables, jnp.asarray(data["x_test"]), mutable=list(state) or False
                )
                logits = logits[0] if isinstance(logits, tuple) else logits
                acc[name].append(
                    float(np.mean(np.argmax(np.asarray(logits), -1) == data["y_test"]))
                )
            except Exception as e:
                if errors is None or name == "float":
                    raise
                errors[f"{name} accuracy"] = _error(e, f"{name} accuracy (seed {seed})")
                del acc[name]
    return {
        "step": timing,
        "accuracy": {
            k: {"mean": float(np.mean(v)) * 100, "std": float(np.std(v)) * 100, "runs": v}
            for k, v in acc.items()
        },
    }


def large(
    peers: dict[str, Any], args: argparse.Namespace, errors: dict[str, str] | None = None
) -> dict[str, Any]:
    """The w8a8 QAT step on a ``width``-wide MLP (3 layers of width x width, ``batch`` rows,
    ``large_dtype`` compute), random data: time / float step, the loss after
    ``large_steps`` steps on that batch, and each compiled step's GEMMs."""
    w, b = args.width, args.batch
    dtype = jnp.dtype(args.large_dtype)
    models = make_models(peers, features=(w, w), classes=w, dtype=dtype, errors=errors)
    tx = optax.adam(1e-3)
    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (b, w), jnp.float32).astype(dtype)
    y = jax.random.randint(ky, (b,), 0, w)
    steps, states, timing = _time_steps(models, tx, x, y, args.rounds, args.large_reps, errors)
    out: dict[str, Any] = {
        "model": f"MLP {w}-{w}-{w}-{w}, batch {b}, {dtype.name} compute, float32 params, Adam",
        # 8 GEMMs of 2 b w^2 flop: 3 forward, 3 weight gradients, 2 input gradients
        "tflop_per_step": 16 * b * w * w / 1e12,
        "step": timing,
        "loss": {},
        "gemms": {},
    }
    for name in ("float", *(k for k in timing if k != "baseline")):
        try:
            p, s, o = states[name]
            text = steps[name].lower(p, s, o, x, y).compile().as_text()  # cached compile
            try:
                out["gemms"][name] = common.gemm_counts(text)
            except Exception as e:
                out["gemms"][name] = {"error": _error(e, f"{name} HLO facts")}
            if args.hlo_dir:
                os.makedirs(args.hlo_dir, exist_ok=True)
                with open(os.path.join(args.hlo_dir, f"large_{name}.hlo.txt"), "w") as f:
                    f.write(text)
            losses = []
            for _ in range(args.large_steps):
                p, s, o, loss = steps[name](p, s, o, x, y)
                losses.append(loss)
            losses = [float(v) for v in losses]
            out["loss"][name] = {"first": losses[0], "last": losses[-1]} if losses else {}
        except Exception as e:
            if errors is None:
                raise
            errors[f"{name} loss/HLO"] = _error(e, f"{name} loss/HLO")
    return out


def markdown(doc: dict[str, Any]) -> str:
    env = doc["env"]
    where = env["backend"]
    kind = env.get("device_kind") or env.get("device")  # older files: device_kind
    if where != "cpu" and kind:
        where = f"{where} ({kind})"
    lines = [
        f"{where}, jax {env['jax']}, qwix {env['qwix']}, "
        f"aqtp {env['aqtp']}, jaxquant {env.get('jaxquant_git', env.get('git'))}, "
        f"{doc['config']['rounds']} rounds",
    ]
    if "quantizer" in doc:
        lines += [
            "",
            "| quantizer | time / (x * 2) | range |",
            "|---|--:|--:|",
        ]
        for k, v in doc["quantizer"].items():
            if k != "baseline":
                lines.append(f"| {k} | {v['ratio']:.2f}x | {v['min']:.2f}-{v['max']:.2f} |")
    if "qat" in doc:
        lines += [
            "",
            "| QAT w8a8 step (digits MLP, batch 128) | time / float step | range | test accuracy |",
            "|---|--:|--:|--:|",
        ]
        acc = doc["qat"]["accuracy"]
        for k, v in doc["qat"]["step"].items():
            name = "float" if k == "baseline" else k
            rng = "" if k == "baseline" else f"{v['min']:.2f}-{v['max']:.2f}"
            a = acc.get(name)
            a_txt = f"{a['mean']:.2f} +- {a['std']:.2f} %" if a else "failed"
            lines.append(f"| {name} | {v['ratio']:.2f}x | {rng} | {a_txt} |")
    for big in (v for k, v in doc.items() if k.startswith("large")):  # large, large_f32, ...
        lines += [
            "",
            f"| QAT w8a8 step ({big['model']}) | time / float step | range | ms | TFLOP/s "
            "| loss first / last | GEMMs in the compiled step |",
            "|---|--:|--:|--:|--:|--:|---|",
        ]
        for k, v in big["step"].items():
            name = "float" if k == "baseline" else k
            rng = "" if k == "baseline" else f"{v['min']:.2f}-{v['max']:.2f}"
            tflops = big["tflop_per_step"] / (v["ms"] / 1e3)  # the float step's GEMM flop
            loss = big["loss"].get(name) or {}
            loss_txt = f"{loss['first']:.3f} / {loss['last']:.3f}" if loss else ""
            g = big["gemms"].get(name, {})
            g_txt = g["error"] if "error" in g else "; ".join(f"{c} x {t}" for t, c in g.items())
            lines.append(
                f"| {name} | {v['ratio']:.2f}x | {rng} | {v['ms']:.3f} | {tflops:.0f} "
                f"| {loss_txt} | {g_txt} |"
            )
    if "models" in doc:
        import peers_models

        lines += ["", peers_models.markdown(doc["models"])]
    if doc.get("errors"):
        lines += ["", "Errors (peer left out of that section):"]
        lines += [f"- {k}: {v}" for k, v in doc["errors"].items()]
    return "\n".join(lines)


def _models(args: argparse.Namespace, errors: dict[str, str]) -> dict[str, Any]:
    """The ``models`` section: benchmarks/peers_models.py's document (its own env)."""
    import peers_models

    margs = peers_models.parse(args, prefix="models_")
    sub: dict[str, Any] = {"config": vars(margs), "env": peers_models.environment()}
    peers_models.run(margs, sub)
    errors |= sub.pop("errors", {})
    return sub


def _write(doc: dict[str, Any], path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="cpu",
        help="defaults of --rounds/--reps/--n/--sections (gpu: larger sizes)",
    )
    p.add_argument(
        "--sections",
        default=None,
        help=f"comma-separated, of {','.join(SECTIONS)} (default: the preset's)",
    )
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (7)")
    p.add_argument("--reps", type=int, default=None, help="calls per timing (10; gpu 50)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--n", type=int, default=None, help="quantizer size, n x n (4096; gpu 16384)")
    p.add_argument("--width", type=int, default=4096, help="large: MLP width")
    p.add_argument("--batch", type=int, default=8192, help="large: batch (!= width)")
    p.add_argument("--large-dtype", default="bfloat16", help="large: compute dtype")
    p.add_argument("--large-reps", type=int, default=10, help="large: calls per timing")
    p.add_argument("--large-steps", type=int, default=20, help="large: steps for the loss")
    p.add_argument("--hlo-dir", default=None, help="large: save each compiled step's HLO")
    p.add_argument("--markdown", default=None, help="print the table of a saved JSON")
    import peers_models  # here: it imports this module's helpers

    peers_models.add_arguments(p, prefix="models-")
    args = p.parse_args(argv)
    if args.markdown:
        with open(args.markdown) as f:
            saved = json.load(f)
        print(markdown(saved))
        return saved
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    sections = [s for s in args.sections.split(",") if s]
    if unknown := set(sections) - set(SECTIONS):
        p.error(f"--sections: unknown {sorted(unknown)}; expected some of {SECTIONS}")
    if args.quick:
        args.rounds, args.reps, args.seeds, args.steps, args.n = 2, 2, 1, 30, 512
        args.width, args.batch, args.large_reps, args.large_steps = 256, 512, 2, 3
    if "large" in sections and args.batch == args.width:
        p.error(
            f"--batch {args.batch} == --width {args.width}: Qwix tells weights from activations "
            "partly by shape and would take an activation for a weight; give another --batch"
        )
    peers = _peers()
    config = vars(args)
    if args.preset == "cpu" and args.sections == PRESETS["cpu"]["sections"]:
        # the default run's config keys as before the presets (results/peers_cpu.json)
        keys = ("out", "quick", "rounds", "reps", "seeds", "steps", "n", "markdown")
        config = {k: v for k, v in config.items() if k in keys}
    env = common.environment(
        qwix=_version("qwix"),
        aqtp=_version("aqtp"),
        skipped={k: v for k, v in peers.items() if k.endswith("_error")},
    )
    doc: dict[str, Any] = {"config": config, "env": env}
    if args.out:
        _write(doc, args.out)
    errors: dict[str, str] = {}
    runs: dict[str, Callable[[dict[str, str]], Any]] = {
        "quantizer": lambda e: quantizer_throughput(peers, args.rounds, args.reps, args.n, e),
        "qat": lambda e: qat(peers, args, e),
        "large": lambda e: large(peers, args, e),
        "models": lambda e: _models(args, e),
    }
    with jax.numpy_dtype_promotion("standard"):
        for section in sections:
            section_errors: dict[str, str] = {}
            t0 = time.perf_counter()
            try:
                doc[section] = runs[section](section_errors)
            except Exception as e:  # the section's float baseline failed: keep the others
                section_errors["section"] = _error(e, section)
            print(f"peers.py: {section} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            errors |= {f"{section}/{k}": v for k, v in section_errors.items()}
            if errors:
                doc["errors"] = errors
            if args.out:
                _write(doc, args.out)
    print(markdown(doc))
    return doc


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
