"""jaxquant beside Qwix on four published Flax models: what each quantizes, how well, how fast.

The models of issue 12's test bed (tests/third_party_models.py, small configs, random
init): transformers' Flax GPT-2 and BERT, flax's ImageNet ResNet (Conv + BatchNorm) and
the lm1b_nnx NNX transformer. For each, one w8a8 recipe per library:

* **jaxquant**: ``jq.flax.quantize_model(model, [Rule(".*", weight=int8 per-channel,
  act=int8)])`` (intercepts every contraction of a matched module);
* **qwix**: ``qwix.quantize_model(model, QtProvider([QtRule(module_path=".*",
  weight_qtype="int8", act_qtype="int8")]))`` (NNX: with the model's inputs, which Qwix
  runs once).

Per model and library:

* **contractions**: the ``dot_general`` / ``conv_general_dilated`` of the inference jaxpr
  with a quantized operand, and the weight products (activation x weight) whose weight is
  quantized, out of the architecture's (``third_party_models.count``). Qwix's act rule
  also quantizes attention's activation x activation einsums; jaxquant's leaves them in
  float (a weight + act rule quantizes weight products);
* **SQNR**: the QAT model's inference output against the float model's, dB;
* **bytes**: the params tree converted for serving (jaxquant ``jq.flax.convert``; Qwix
  ``PtqProvider`` + ``qwix.quantize_params``, its PTQ storage), against float32;
* **step**: a jitted SGD training step (``third_party_models.train_step``), time per
  call / the float step's, in interleaved rounds (median);
* **compile**: the same step compiled cold (``jax.clear_caches()`` first), split into
  Python tracing (``jit(step).trace``), lowering to StableHLO (``.lower()``) and XLA's
  compile (``.compile()``); the quantized step's time / the float step's, median over
  rounds, each library's measured right after a float one. With the size of what is
  compiled: jaxpr equations (all sub-jaxprs included), StableHLO ops, optimized HLO
  instructions.

Run (from the repository root)::

    python3 benchmarks/peers_models.py --out benchmarks/results/peers_models_cpu.json
    python3 benchmarks/peers_models.py --quick --models nnx_lm1b   # a smoke run
    python3 benchmarks/peers.py --sections models                  # the same, from peers.py

A library that fails on a model (import, quantize, run, convert) has its error recorded
under ``errors`` and the other numbers are kept. Numbers on a shared machine are noisy:
compare the ratios, each measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (_HERE, os.path.join(_HERE, "..", "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import common  # noqa: E402
import third_party_models as tp  # noqa: E402 (tests/ on the path first)
from peers import _error, _version, _write, paired_ratios  # noqa: E402

import jaxquant as jq  # noqa: E402

LIBS = ("jaxquant", "qwix")


# ---------------------------------------------------------------------------- recipes


def jaxquant_model(m: tp.ThirdPartyModel) -> Any:
    rule = jq.flax.Rule(
        ".*", weight=jq.QuantSpec("int8", jq.per_channel(-1)), act=jq.QuantSpec("int8")
    )
    base = nnx.clone(m.model) if tp.is_nnx(m.model) else m.model
    return jq.flax.quantize_model(base, [rule])


def _qwix_rules(qwix: Any) -> list[Any]:
    return [qwix.QtRule(module_path=".*", weight_qtype="int8", act_qtype="int8")]


def qwix_model(m: tp.ThirdPartyModel) -> Any:
    import qwix

    provider = qwix.QtProvider(_qwix_rules(qwix))
    if tp.is_nnx(m.model):  # Qwix runs an NNX model once to set it up
        with tp.lenient():
            return qwix.quantize_model(nnx.clone(m.model), provider, *m.args, **m.kwargs)
    return qwix.quantize_model(m.model, provider)


# ------------------------------------------------------------------------------ bytes


def _bytes(tree: Any) -> int:
    return int(sum(leaf.nbytes for leaf in jax.tree.leaves(tree)))


def _params(m: tp.ThirdPartyModel, model: Any = None) -> Any:
    """The parameters (Linen ``variables["params"]``, NNX ``nnx.Param`` state)."""
    model = m.model if model is None else model
    if tp.is_nnx(model):
        return nnx.state(model, nnx.Param)
    return m.variables["params"]


def jaxquant_bytes(m: tp.ThirdPartyModel, qmodel: Any) -> int:
    """Bytes of the params after ``jq.flax.convert`` (kernels as QArrays: codes + scales)."""
    with tp.lenient():
        if tp.is_nnx(qmodel):
            served = jq.flax.convert(nnx.clone(qmodel))
            return _bytes(nnx.state(served, nnx.Param))
        tp.call(m, qmodel)  # convert needs a Linen model that has run (its layers known)
        return _bytes(jq.flax.convert(qmodel, m.variables)["params"])


def qwix_bytes(m: tp.ThirdPartyModel) -> int:
    """Bytes of the params as Qwix's PTQ stores them (``PtqProvider`` + ``quantize_params``)."""
    import qwix

    provider = qwix.PtqProvider(_qwix_rules(qwix))
    with tp.lenient():
        if tp.is_nnx(m.model):  # the NNX PTQ model quantizes its weights when it first runs
            served = qwix.quantize_model(nnx.clone(m.model), provider, *m.args, **m.kwargs)
            return _bytes(nnx.state(served, nnx.Param))
        ptq = qwix.quantize_model(m.model, provider)
        abstract = jax.eval_shape(lambda k: ptq.init(k, *m.args, **m.kwargs), jax.random.key(0))[
            "params"
        ]
        return _bytes(qwix.quantize_params(m.variables["params"], abstract))


# ---------------------------------------------------------------------- compile size


def _eqns(jaxpr: Any) -> tuple[int, dict[str, int]]:
    """Equations of ``jaxpr`` and of every sub-jaxpr (each body counted once), by primitive."""
    from jax.extend import core as jcore

    by: dict[str, int] = {}

    def walk(j: Any) -> None:
        for e in j.eqns:
            by[e.primitive.name] = by.get(e.primitive.name, 0) + 1
            for p in e.params.values():
                for s in p if isinstance(p, tuple | list) else (p,):
                    if isinstance(s, jcore.ClosedJaxpr):
                        walk(s.jaxpr)
                    elif isinstance(s, jcore.Jaxpr):
                        walk(s)

    walk(jaxpr)
    return sum(by.values()), by


_HLO_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*[^=]*?\b([a-z][\w\-]*)\(", re.M)
_MLIR_OP = re.compile(r"=\s*\"?([a-z_]+\.[\w.]+)\"?[ (<{]", re.M)


def compile_once(step: Callable, args: tuple[Any, ...], sizes: bool = False) -> dict[str, Any]:
    """Cold trace / lower / compile of ``step`` (a ``jax.jit`` function) on ``args``, seconds;
    with ``sizes``: the jaxpr equations, StableHLO ops and optimized HLO instructions."""
    jax.clear_caches()  # every library's inner jits and lowerings traced again
    c0, t0 = time.process_time(), time.perf_counter()
    traced = step.trace(*args)
    c1, t1 = time.process_time(), time.perf_counter()
    lowered = traced.lower()
    c2, t2 = time.process_time(), time.perf_counter()
    compiled = lowered.compile()
    c3, t3 = time.process_time(), time.perf_counter()
    out: dict[str, Any] = {"trace_s": t1 - t0, "lower_s": t2 - t1, "compile_s": t3 - t2}
    out["total_s"] = t3 - t0
    # CPU seconds of this process (all threads): less swayed by other processes' load
    # than the wall clock on a shared machine.
    out |= {"trace_cpu_s": c1 - c0, "lower_cpu_s": c2 - c1, "compile_cpu_s": c3 - c2}
    out["total_cpu_s"] = c3 - c0
    if sizes:
        n, by = _eqns(traced.jaxpr.jaxpr)
        out["jaxpr_eqns"] = n
        out["jaxpr_by_primitive"] = dict(sorted(by.items(), key=lambda kv: -kv[1]))
        out["stablehlo_ops"] = len(_MLIR_OP.findall(lowered.as_text()))
        out["hlo_instructions"] = len(_HLO_OP.findall(compiled.as_text()))
    return out


# ------------------------------------------------------------------------------ one model


def _step_args(m: tp.ThirdPartyModel, model: Any) -> tuple[Any, ...]:
    if tp.is_nnx(model):
        _, params, rest = nnx.split(model, nnx.Param, ...)
        return params, rest
    return (m.variables,)


def _sqnr(ref: jax.Array, got: jax.Array) -> float:
    return float(jq.metrics.sqnr(ref.astype(jnp.float32), got.astype(jnp.float32)))


def one_model(
    name: str, args: argparse.Namespace, errors: dict[str, str], log: Callable[[str], None]
) -> dict[str, Any]:
    m = tp.get(name)
    out: dict[str, Any] = {
        "weight_contractions": m.weight_contractions,
        "float_bytes": _bytes(_params(m)),
        "libs": {},
    }
    builders = {"jaxquant": jaxquant_model, "qwix": qwix_model}
    models: dict[str, Any] = {"float": m.model}
    for lib in args.libs:
        try:
            models[lib] = builders[lib](m)
        except Exception as e:
            errors[f"{name}/{lib}"] = _error(e, f"{lib} quantize_model on {name}")
    ref = tp.call(m)
    out["float"] = tp.count(m)._asdict()
    for lib, model in list(models.items()):
        if lib == "float":
            continue
        row: dict[str, Any] = {}
        try:
            c = tp.count(m, model)
            row |= {
                "contractions": c.contractions,
                "quantized": c.quantized,
                "weight": c.weight,
                "weight_quantized": c.weight_quantized,
                "missed": list(c.missed),
            }
            row["sqnr_db"] = _sqnr(ref, tp.call(m, model))
        except Exception as e:
            errors[f"{name}/{lib}"] = _error(e, f"{lib} on {name}")
            del models[lib]
            continue
        try:
            row["bytes"] = jaxquant_bytes(m, model) if lib == "jaxquant" else qwix_bytes(m)
        except Exception as e:
            errors[f"{name}/{lib} bytes"] = _error(e, f"{lib} bytes on {name}")
        out["libs"][lib] = row
    log(f"{name}: counts, SQNR, bytes done")

    # Compile: cold, every library right after a float compile, rotating the order.
    steps = {lib: tp.train_step(m, None if lib == "float" else mod) for lib, mod in models.items()}
    step_args = {lib: _step_args(m, mod) for lib, mod in models.items()}
    libs = [k for k in models if k != "float"]
    comp: dict[str, list[dict[str, Any]]] = {k: [] for k in models}
    ratios: dict[str, list[float]] = {k: [] for k in libs}
    cpu_ratios: dict[str, list[float]] = {k: [] for k in libs}
    for r in range(args.compile_rounds):
        order = libs[r % len(libs) :] + libs[: r % len(libs)]
        for lib in order:
            try:
                f = compile_once(
                    steps["float"], step_args["float"], sizes=r == 0 and not comp["float"]
                )
                q = compile_once(steps[lib], step_args[lib], sizes=r == 0)
            except Exception as e:
                errors[f"{name}/{lib} compile"] = _error(e, f"{lib} compile on {name}")
                libs.remove(lib)
                continue
            comp["float"].append(f)
            comp[lib].append(q)
            ratios[lib].append(q["total_s"] / f["total_s"])
            cpu_ratios[lib].append(q["total_cpu_s"] / f["total_cpu_s"])
    out["compile"] = {}
    for k, runs in comp.items():
        if not runs:
            continue
        med = {
            key: statistics.median(r[key] for r in runs) for key in runs[0] if key.endswith("_s")
        }
        sizes = next((r for r in runs if "jaxpr_eqns" in r), {})
        med |= {
            key: sizes[key]
            for key in ("jaxpr_eqns", "stablehlo_ops", "hlo_instructions", "jaxpr_by_primitive")
            if key in sizes
        }
        if k != "float":
            med["ratio"] = statistics.median(ratios[k])
            med["ratio_min"], med["ratio_max"] = min(ratios[k]), max(ratios[k])
            med["cpu_ratio"] = statistics.median(cpu_ratios[k])
        out["compile"][k] = med
    log(f"{name}: compile done")

    # Step time: each library's step right after the float one (peers.paired_ratios).
    def runner(lib: str) -> Callable[[], Any]:
        step, a = steps[lib], step_args[lib]
        return lambda: step(*a)

    out["step"] = paired_ratios(
        runner("float"), {k: runner(k) for k in libs}, args.rounds, args.reps, errors
    )
    log(f"{name}: step done")
    return out


# ------------------------------------------------------------------------------ report


def markdown(doc: dict[str, Any]) -> str:
    env = doc["env"]
    lines = [
        f"{env['backend']}, jax {env['jax']}, flax {env['flax']}, qwix {env['qwix']}, "
        f"transformers {env['transformers']}, jaxquant {env.get('jaxquant_git', env.get('git'))}; "
        f"{doc['config']['compile_rounds']} cold compiles, {doc['config']['rounds']} step "
        "rounds (medians; ratios to the float model measured beside each)",
        "",
        "| model | library | weight products quantized | contractions quantized "
        "| output SQNR | bytes (/ float32) | step / float | compile / float (wall, range; CPU s) "
        "| trace + lower + compile, s | jaxpr eqns |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, r in doc.get("models", {}).items():
        fc = r.get("compile", {}).get("float")
        if fc:
            lines.append(
                f"| {name} | float | 0 / {r['weight_contractions']} | "
                f"0 / {r['float']['contractions']} | | {r['float_bytes']:,} | 1.00x | 1.00x "
                f"| {fc['trace_s']:.2f} + {fc['lower_s']:.2f} + {fc['compile_s']:.2f} "
                f"| {fc.get('jaxpr_eqns', '')} |"
            )
        for lib, row in r["libs"].items():
            b = row.get("bytes")
            b_txt = f"{b:,} ({b / r['float_bytes']:.2f})" if b else "failed"
            st = r.get("step", {}).get(lib)
            st_txt = f"{st['ratio']:.2f}x" if st else "failed"
            c = r.get("compile", {}).get(lib)
            c_txt = (
                f"{c['ratio']:.2f}x ({c['ratio_min']:.2f}-{c['ratio_max']:.2f}); "
                f"CPU {c['cpu_ratio']:.2f}x"
                if c
                else "failed"
            )
            split = f"{c['trace_s']:.2f} + {c['lower_s']:.2f} + {c['compile_s']:.2f}" if c else ""
            lines.append(
                f"| | {lib} | {row['weight_quantized']} / {r['weight_contractions']} "
                f"| {row['quantized']} / {row['contractions']} | {row['sqnr_db']:.1f} dB "
                f"| {b_txt} | {st_txt} | {c_txt} | {split} | {(c or {}).get('jaxpr_eqns', '')} |"
            )
    if doc.get("errors"):
        lines += ["", "Errors:"]
        lines += [f"- {k}: {v}" for k, v in doc["errors"].items()]
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    return common.environment(qwix=_version("qwix"), transformers=_version("transformers"))


def run(args: argparse.Namespace, doc: dict[str, Any], out: str | None = None) -> dict[str, Any]:
    """Fill ``doc["models"]`` (and ``doc["errors"]``) model by model; rewrite ``out`` after each."""
    errors: dict[str, str] = doc.setdefault("errors", {})
    doc.setdefault("models", {})

    def log(msg: str) -> None:
        print(f"peers_models.py: {msg}", file=sys.stderr, flush=True)

    for name in args.models:
        t0 = time.perf_counter()
        try:
            doc["models"][name] = one_model(name, args, errors, log)
        except Exception as e:  # the float model failed: keep the other models
            errors[name] = _error(e, name)
        log(f"{name} in {time.perf_counter() - t0:.1f} s")
        if out:
            _write(doc, out)
    if not errors:
        del doc["errors"]
    return doc


def add_arguments(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument(f"--{prefix}models", default=",".join(tp.BUILDERS), help="comma-separated")
    p.add_argument(f"--{prefix}libs", default=",".join(LIBS), help="comma-separated")
    p.add_argument(f"--{prefix}compile-rounds", type=int, default=5, help="cold compiles per lib")
    if not prefix:
        p.add_argument("--rounds", type=int, default=7, help="step timing rounds")
        p.add_argument("--reps", type=int, default=10, help="calls per step timing")


def parse(args: argparse.Namespace, prefix: str = "") -> argparse.Namespace:
    """The options of :func:`add_arguments` as :func:`run` takes them (lists, no prefix)."""
    get = lambda k: getattr(args, f"{prefix.replace('-', '_')}{k}")
    models = [s for s in get("models").split(",") if s]
    libs = [s for s in get("libs").split(",") if s]
    if unknown := set(models) - set(tp.BUILDERS):
        raise SystemExit(
            f"--models: unknown {sorted(unknown)}; expected some of {list(tp.BUILDERS)}"
        )
    if unknown := set(libs) - set(LIBS):
        raise SystemExit(f"--libs: unknown {sorted(unknown)}; expected some of {LIBS}")
    return argparse.Namespace(
        models=models,
        libs=libs,
        compile_rounds=get("compile_rounds"),
        rounds=args.rounds,
        reps=args.reps,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true", help="1 compile, 2 step rounds of 2 calls")
    p.add_argument("--markdown", default=None, help="print the table of a saved JSON")
    add_arguments(p)
    a = p.parse_args(argv)
    if a.markdown:
        import json

        with open(a.markdown) as f:
            saved = json.load(f)
        print(markdown(saved))
        return saved
    if a.quick:
        a.compile_rounds, a.rounds, a.reps = 1, 2, 2
    args = parse(a)
    doc: dict[str, Any] = {"config": vars(args), "env": environment()}
    run(args, doc, a.out)
    print(markdown(doc))
    return doc


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
