"""QAT recipes on a small byte-level transformer language model (Flax NNX).

A 2-layer causal transformer (width 128, 4 heads, MLP 512, learned positions, pre-LN) is
trained on the Python standard library's own top-level ``.py`` files, read from
``sysconfig.get_paths()["stdlib"]`` (present offline on every machine; the exact bytes
depend on the Python version, which the JSON records with a hash of the corpus). Files are
sorted by name; every 10th file is held out for validation. Training samples random
windows of ``seq + 1`` bytes (batch 16, seq 128, 300 steps by default); validation is the
mean next-byte negative log-likelihood over 512 evenly spaced windows of the held-out
files, reported as perplexity per byte, ``exp(NLL)``.

Each recipe quantizes the ``nnx.Linear`` layers inside the blocks (attention q/k/v/o and
the two MLP layers, paths ``blocks/<i>/...``); the byte embedding, positions, LayerNorms,
the attention products (q k^T, softmax(.) v) and the output head stay in float. Every
recipe gets the same model, data, optimizer (AdamW, warmup + cosine) and seeds.

Run (8-11 minutes on a 2-core CPU)::

    python3 benchmarks/qat_lm.py                       # -> benchmarks/results/qat_lm.json
    python3 benchmarks/qat_lm.py --markdown benchmarks/results/qat_lm.json
    python3 benchmarks/qat_lm.py --quick --out /tmp/lm.json   # a few seconds
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "benchmarks")):  # run from a checkout, or imported
    if _p not in sys.path:
        sys.path.insert(0, _p)

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import jaxquant as jq  # noqa: E402
from jaxquant.app.datasets import spaced_windows, stdlib_corpus  # noqa: E402
from jaxquant.flax import quantize_model, report  # noqa: E402

NAME = "qat_lm"
METHODS = (
    "float",
    "w8a8_int8",
    "w4a16_int4",
    "fp8_current",
    "fp8_delayed",
    "mxfp8",
    "ternary",
    "binary",
)
QUANTIZED = r"blocks/.*"  # every Linear inside the transformer blocks
VOCAB = 256


# ------------------------------------------------------------------------------- data


load_corpus = stdlib_corpus  # the split and bytes recorded in results/qat_lm.json


def val_windows(val: np.ndarray, seq: int, n: int) -> np.ndarray:
    """``n`` windows of ``seq + 1`` bytes, evenly spaced over the validation bytes."""
    return spaced_windows(val, seq + 1, n)


# ------------------------------------------------------------------------------ model


class Attention(nnx.Module):
    def __init__(self, d: int, heads: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.q = nnx.Linear(d, d, rngs=rngs)
        self.k = nnx.Linear(d, d, rngs=rngs)
        self.v = nnx.Linear(d, d, rngs=rngs)
        self.o = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        h, dh = self.heads, d // self.heads
        q = self.q(x).reshape(b, t, h, dh)
        k = self.k(x).reshape(b, t, h, dh)
        v = self.v(x).reshape(b, t, h, dh)
        att = jnp.einsum("bthd,bshd->bhts", q, k) * (1.0 / math.sqrt(dh))
        causal = jnp.tril(jnp.ones((t, t), jnp.bool_))[None, None]
        att = jnp.where(causal, att, -1e30)
        att = jax.nn.softmax(att, axis=-1)
        y = jnp.einsum("bhts,bshd->bthd", att, v).reshape(b, t, d)
        return self.o(y)


class Mlp(nnx.Module):
    def __init__(self, d: int, hidden: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(d, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, d, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x)))


class Block(nnx.Module):
    def __init__(self, d: int, heads: int, hidden: int, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = Attention(d, heads, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.mlp = Mlp(d, hidden, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ByteLM(nnx.Module):
    """Causal byte-level transformer: embed + positions, pre-LN blocks, LN, Linear head."""

    def __init__(
        self,
        *,
        seq: int = 128,
        d: int = 128,
        layers: int = 2,
        heads: int = 4,
        hidden: int = 512,
        rngs: nnx.Rngs,
    ):
        self.embed = nnx.Embed(VOCAB, d, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq, d), jnp.float32))
        self.blocks = nnx.List([Block(d, heads, hidden, rngs=rngs) for _ in range(layers)])
        self.ln_f = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, VOCAB, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        t = tokens.shape[1]
        x = self.embed(tokens) + self.pos[...][None, :t]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def rules_for(method: str, group_size: int = 32) -> tuple[jq.flax.Rule, ...] | None:
    """The quantize_model rules of a method (None: float)."""
    if method == "float":
        return None
    kw = {"group_size": group_size} if method == "w4a16_int4" else {}
    return jq.recipes.get(method, **kw).rules(QUANTIZED)


def build(method: str, seed: int, cfg: dict[str, Any]) -> ByteLM:
    model = ByteLM(
        seq=cfg["seq"],
        d=cfg["width"],
        layers=cfg["layers"],
        heads=cfg["heads"],
        hidden=cfg["hidden"],
        rngs=nnx.Rngs(seed),
    )
    rules = rules_for(method, cfg["int4_group"])
    if rules is not None:
        quantize_model(model, rules)
    return model


def loss_fn(model: ByteLM, batch: jax.Array) -> jax.Array:
    """Mean next-byte cross-entropy (nats) of ``batch`` (int32 [B, seq + 1])."""
    logits = model(batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def optimizer(cfg: dict[str, Any]) -> optax.GradientTransformation:
    warmup = max(1, cfg["steps"] // 10)
    lr = optax.warmup_cosine_decay_schedule(
        0.0, cfg["lr"], warmup, cfg["steps"], end_value=cfg["lr"] * 0.1
    )
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(lr, b1=0.9, b2=0.99, weight_decay=cfg["weight_decay"]),
    )


def sample_batch(data: jax.Array, key: jax.Array, batch: int, seq: int) -> jax.Array:
    """``batch`` random windows of ``seq + 1`` bytes (int32)."""
    starts = jax.random.randint(key, (batch,), 0, data.shape[0] - seq - 1)
    idx = starts[:, None] + jnp.arange(seq + 1)[None, :]
    return data[idx].astype(jnp.int32)


def make_train_chunk(graphdef: Any, cfg: dict[str, Any]):
    """A jitted function running ``n`` steps with ``lax.scan``:
    ``(state, data, key, step0) -> (state, losses[n])``; ``state`` is
    ``nnx.split((model, opt))[1]``, so every variable (params, optimizer, the
    ``quant_state`` of delayed scaling) is threaded through."""

    def step(state, data, key, i):
        model, opt = nnx.merge(graphdef, state)
        batch = sample_batch(data, jax.random.fold_in(key, i), cfg["batch"], cfg["seq"])
        loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
        opt.update(model, grads)
        return nnx.split((model, opt))[1], loss

    def chunk(state, data, key, steps):
        def body(s, i):
            return step(s, data, key, i)

        return jax.lax.scan(body, state, steps)

    return jax.jit(chunk, donate_argnums=0)


def make_eval(graphdef: Any):
    @jax.jit
    def nll(state, windows):
        model, _ = nnx.merge(graphdef, state)
        return loss_fn(model, windows)

    return nll


def run_method(method: str, seeds: int, cfg: dict[str, Any], corpus: dict[str, Any]) -> list:
    """Train ``method`` for every seed; the train and eval functions compile once (the
    seeds share the graph definition) and are reused."""
    data = jnp.asarray(corpus["train"])
    windows = val_windows(corpus["val"], cfg["seq"], cfg["val_windows"])
    train = nll = None
    runs = []
    for seed in range(seeds):
        t0 = time.perf_counter()
        try:
            model = build(method, seed, cfg)
            quantized = [m.path for m in report(model)]
            opt = nnx.Optimizer(model, optimizer(cfg), wrt=nnx.Param)
            graphdef, state = nnx.split((model, opt))
            del model, opt
            if train is None:
                train, nll = make_train_chunk(graphdef, cfg), make_eval(graphdef)
            key = jax.random.key(10_000 + seed)
            losses: list[float] = []
            for s0 in range(0, cfg["steps"], cfg["chunk"]):
                steps = jnp.arange(s0, min(s0 + cfg["chunk"], cfg["steps"]))
                state, ls = train(state, data, key, steps)
                losses.extend(np.asarray(ls).tolist())
            val = [
                float(nll(state, jnp.asarray(windows[i : i + cfg["eval_batch"]])))
                for i in range(0, len(windows), cfg["eval_batch"])
            ]
            val_nll = float(np.mean(val))  # equal-sized batches: the mean over all bytes
            r = {
                "seed": seed,
                "val_nll": val_nll,
                "val_ppl": math.exp(val_nll),
                "val_bits_per_byte": val_nll / math.log(2),
                "final_train_loss": float(np.mean(losses[-max(1, len(losses) // 20) :])),
                "train_loss_curve": common.downsample(losses, 50),
                "quantized_layers": quantized,
                "state": sorted(
                    {
                        type(v).__name__
                        for v in jax.tree.leaves(
                            nnx.state(nnx.merge(graphdef, state)[0], nnx.Not(nnx.Param)),
                            is_leaf=lambda x: isinstance(x, nnx.Variable),
                        )
                    }
                ),
                "seconds": time.perf_counter() - t0,
            }
            if not math.isfinite(val_nll):
                r["error"] = f"non-finite validation loss {val_nll}"
        except Exception as e:  # report a broken recipe, keep the sweep going
            r = {"seed": seed, "error": f"{type(e).__name__}: {e}"}
        print(f"{method:12s} seed {seed}: " + common.brief(r, "val_ppl"), flush=True)
        runs.append(r)
    return runs


# -------------------------------------------------------------------------------- main


def config(args: argparse.Namespace) -> dict[str, Any]:
    cfg = {
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
        "val_every": 10,
        "val_windows": 512,
        "eval_batch": 128,
        "max_files": None,
        "int4_group": 32,
    }
    if args.quick:
        cfg.update(
            seq=32,
            batch=8,
            width=32,
            heads=2,
            hidden=64,
            steps=20,
            chunk=10,
            val_windows=16,
            eval_batch=16,
            max_files=20,
        )
    if args.steps is not None:
        cfg["steps"] = args.steps
    return cfg


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(__doc__ or "", NAME, METHODS)
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(common.read_json(args.markdown)))
        return {}
    cfg = config(args)
    corpus = load_corpus(cfg["val_every"], cfg["max_files"])
    methods = common.select(args.methods, METHODS)
    print(f"corpus: {corpus['info']}", flush=True)
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    for method in methods:
        runs = run_method(method, args.seeds, cfg, corpus)
        results[method] = common.summarize(runs, ("val_ppl", "val_nll", "val_bits_per_byte"))
    cfg |= {
        "corpus": corpus["info"],
        "seeds": args.seeds,
        "total_seconds": time.perf_counter() - t0,
    }
    out = common.document(NAME, cfg, results)
    common.write_json(out, args.out)
    print(markdown(out))
    return out


def markdown(doc: dict[str, Any]) -> str:
    res = doc["results"]
    lines = [
        common.header(doc),
        "",
        "| method | quantized layers | val ppl / byte (mean ± std) | bits / byte | "
        "vs float, paired (mean ± std) | "
        "per seed | s / run |",
        "|---|---|--:|--:|--:|---|--:|",
    ]
    for method, r in res.items():
        if "mean" not in r:
            lines.append(f"| {method} | - | **failed**: {r.get('error', '')[:120]} | | | | |")
            continue
        m, s = r["mean"]["val_ppl"], r["std"]["val_ppl"]
        bpb = r["mean"]["val_bits_per_byte"]
        pair = common.paired(res, method, "val_ppl")
        delta = "" if pair is None else f"{pair[0]:+.3f} ± {pair[1]:.3f}"
        layers = r["runs"][0].get("quantized_layers", [])
        what = "none (float)" if not layers else f"{len(layers)} Linear"
        per_seed = ", ".join(f"{x['val_ppl']:.3f}" for x in r["runs"] if "val_ppl" in x)
        secs = np.mean([x["seconds"] for x in r["runs"] if "seconds" in x])
        lines.append(
            f"| {method} | {what} | {m:.3f} ± {s:.3f} | {bpb:.3f} | {delta} | {per_seed} | "
            f"{secs:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
