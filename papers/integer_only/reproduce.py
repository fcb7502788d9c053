"""Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference" (arXiv:1712.05877), Sections 2.2-2.4: the real
multiplier ``M = S1 S2 / S3`` of a quantized matmul is a normalised fixed-point number
``M = 2^-n M0`` with ``M0`` in [0.5, 1) held as an int32; with zero points, an int32 bias
at scale ``S1 S2`` and a fixed-point requantization, the whole layer runs in integer
arithmetic and reproduces the float-simulated quantized layer.

Setup: a digits MLP 64-128-128-10 (scikit-learn's bundled digits, 75/25 stratified split,
standardized) trained in float32 (Adam). Post-training quantization:

* every activation (the input and each layer's output, the logits included) as uint8 with
  a zero point, range = min / max over the training set
  (``jq.QuantSpec("uint8", calibration=jq.minmax(), symmetric=False)``);
* weights int8, symmetric, one scale per output channel
  (``jq.QuantSpec("int8", jq.per_channel(-1))``); biases int32 at ``S1 * S2``.

Integer path: ``jaxquant.integer.dense`` (int8 x int8 -> int32 dot, zero-point column-sum
correction, int32 bias, ``multiply_by_quantized_multiplier`` with
``quantize_multiplier(S1 S2 / S3)``, output zero point, clamp; fused ReLU on the hidden
layers). Simulated path: the same quantized operands dequantized to float32, a float32
matmul plus the dequantized bias, then the output quantizer ``jq.quantize`` with the same
``S3, Z3`` (what quantization-aware training simulates). Compared per layer (both paths fed
the same uint8 input) and end to end (each path fed its own previous output).

Run: ``python papers/integer_only/reproduce.py [--fast]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as `python papers/<name>/reproduce.py`
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxquant as jq  # noqa: E402
import jaxquant.integer as jqi  # noqa: E402
from jaxquant.app.datasets import digits  # noqa: E402

SIZES = (64, 128, 128, 10)
ACT = jq.QuantSpec("uint8", calibration=jq.minmax(), symmetric=False)
WEIGHT = jq.QuantSpec("int8", jq.per_channel(-1))
MULTIPLIERS = (0.3, 0.999, 0.5, 1e-4, 7.3e-7, 2.5)


def init_mlp(key: jax.Array) -> list[dict[str, jax.Array]]:
    params = []
    for k, a, b in zip(jax.random.split(key, len(SIZES) - 1), SIZES[:-1], SIZES[1:], strict=False):
        w = jax.random.normal(k, (a, b), jnp.float32) / np.float32(np.sqrt(a))
        params.append({"w": w, "b": jnp.zeros((b,), jnp.float32)})
    return params


def mlp_layers(params, x) -> list[jax.Array]:
    """The input and every layer's output (post-ReLU; the last: the logits)."""
    outs = [x]
    for i, layer in enumerate(params):
        x = jnp.dot(x, layer["w"], precision="highest") + layer["b"][None]
        if i < len(params) - 1:
            x = jax.nn.relu(x)
        outs.append(x)
    return outs


def train(key: jax.Array, x, y, steps: int):
    tx = optax.adam(1e-3)
    params = init_mlp(key)

    def loss(p, xb, yb):
        logits = mlp_layers(p, xb)[-1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @jax.jit
    def run(params, key):
        idx = jax.vmap(lambda k: jax.random.permutation(k, x.shape[0])[:64])(
            jax.random.split(key, steps)
        )

        def step(carry, ib):
            p, s = carry
            g = jax.grad(loss)(p, x[ib], y[ib])
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(step, (params, tx.init(params)), idx)[0][0]

    return run(params, jax.random.fold_in(key, 1))


@jax.jit
def _act_ranges(params, x_calib):
    aq = [jq.quantize(a, ACT) for a in mlp_layers(params, x_calib)]  # minmax ranges
    return (
        [q.scale.reshape(()) for q in aq],
        [q.zero_point.reshape(()).astype(jnp.int32) for q in aq],
    )


def quantize_model(params, x_calib):
    """Per layer: the int8 kernel and its scales, the int32 bias, the activation scales
    and zero points, and the fixed-point multiplier."""
    s_act, z_act = _act_ranges(params, x_calib)
    layers = []
    for i, layer in enumerate(params):
        qw = jq.quantize(layer["w"], WEIGHT)
        s1, s2, s3 = s_act[i], qw.scale.reshape(-1), s_act[i + 1]
        bias = jnp.round(layer["b"] / (s1 * s2)).astype(jnp.int32)
        m0, shift = jqi.quantize_multiplier(s1 * s2 / s3)
        layers.append(
            {
                "w": qw.values,
                "s2": s2,
                "bias": bias,
                "m0": m0,
                "shift": shift,
                "s1": s1,
                "z1": z_act[i],
                "s3": s3,
                "z3": z_act[i + 1],
                "relu": i < len(params) - 1,
                "m": s1 * s2 / s3,
            }
        )
    return layers, s_act, z_act


_dense = jax.jit(jqi.dense, static_argnames=("relu",))


def integer_layer(L, xq):
    return _dense(xq, L["z1"], L["w"], L["bias"], L["m0"], L["shift"], L["z3"], relu=L["relu"])


def simulated_layer(L, xq):
    arrays = {k: v for k, v in L.items() if k != "relu"}
    return _simulated(arrays, xq, relu=L["relu"])


@jax.jit
def _quantize_input(x, s, z):
    return jq.quantize(x, ACT, scale=s, zero_point=z).values


def _simulated_impl(L, xq, *, relu: bool):
    xr = (xq.astype(jnp.float32) - L["z1"].astype(jnp.float32)) * L["s1"]
    wr = L["w"].astype(jnp.float32) * L["s2"][None]
    r = (
        jnp.dot(xr, wr, precision="highest")
        + (L["bias"].astype(jnp.float32) * (L["s1"] * L["s2"]))[None]
    )
    if relu:
        r = jax.nn.relu(r)
    return jq.quantize(r, ACT, scale=L["s3"], zero_point=L["z3"].astype(jnp.float32)).values


_simulated = jax.jit(_simulated_impl, static_argnames=("relu",))


def multiplier_table() -> list[dict[str, Any]]:
    m = np.asarray(MULTIPLIERS, np.float32)
    m0, shift = (np.asarray(a) for a in jqi.quantize_multiplier(m))
    xs = np.random.default_rng(0).integers(-(1 << 20), 1 << 20, 4096).astype(np.int32)
    rows = []
    for mm, a, n in zip(m, m0, shift, strict=False):
        got = np.asarray(jqi.multiply_by_quantized_multiplier(xs, a, n)).astype(np.int64)
        ref = np.round(xs.astype(np.float64) * np.float64(mm))
        rows.append(
            {
                "M": float(mm),
                "M0_int32": int(a),
                "M0_real": int(a) / 2.0**31,
                "n": int(n),
                "rel_err": abs(int(a) * 2.0 ** (-31 - int(n)) / float(mm) - 1),
                "max_diff_vs_round": int(np.max(np.abs(got - ref))),
            }
        )
    return rows


def main(fast: bool = False) -> dict[str, Any]:
    seeds = 1 if fast else 3
    steps = 300 if fast else 1500
    t0 = time.perf_counter()
    data = digits()
    x, y = jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"])
    xt, yt = jnp.asarray(data["x_test"]), np.asarray(data["y_test"])
    runs = []
    for seed in range(seeds):
        params = train(jax.random.key(seed), x, y, steps)
        layers, s_act, z_act = quantize_model(params, x)
        xq = _quantize_input(xt, s_act[0], z_act[0].astype(jnp.float32))
        per_layer, e2e = [], []
        hi, hs = xq, xq  # end to end: integer / simulated chains
        ref = xq  # per layer: both fed the simulated chain's input
        for L in layers:
            a = np.asarray(integer_layer(L, ref), np.int64)
            b = np.asarray(simulated_layer(L, ref), np.int64)
            per_layer.append(
                {"max_lsb": int(np.max(np.abs(a - b))), "exact": float(np.mean(a == b))}
            )
            hi, hs = integer_layer(L, hi), simulated_layer(L, hs)
            d = np.abs(np.asarray(hi, np.int64) - np.asarray(hs, np.int64))
            e2e.append({"max_lsb": int(d.max()), "exact": float(np.mean(d == 0))})
            ref = b.astype(np.uint8)
        logits_f = np.asarray(mlp_layers(params, xt)[-1])
        acc = {
            "float32": 100.0 * float(np.mean(logits_f.argmax(-1) == yt)),
            "integer": 100.0 * float(np.mean(np.asarray(hi).argmax(-1) == yt)),
            "simulated": 100.0 * float(np.mean(np.asarray(hs).argmax(-1) == yt)),
        }
        runs.append(
            {
                "per_layer": per_layer,
                "end_to_end": e2e,
                "acc": acc,
                "multipliers": [float(np.max(np.asarray(L["m"]))) for L in layers],
                "m0_in_range": bool(
                    all(
                        np.all(
                            (np.asarray(L["m0"]) >= 1 << 30)
                            & (np.asarray(L["m0"]).astype(np.int64) < 1 << 31)
                        )
                        for L in layers
                    )
                ),
            }
        )
    res: dict[str, Any] = {
        "seeds": seeds,
        "steps": steps,
        "runs": runs,
        "multiplier_table": multiplier_table(),
    }
    res["max_lsb_per_layer"] = max(p["max_lsb"] for r in runs for p in r["per_layer"])
    res["exact_fraction_per_layer"] = float(
        np.mean([p["exact"] for r in runs for p in r["per_layer"]])
    )
    res["max_lsb_end_to_end"] = max(p["max_lsb"] for r in runs for p in r["end_to_end"])
    res["acc_diff"] = max(abs(r["acc"]["integer"] - r["acc"]["simulated"]) for r in runs)
    mt_ok = all(
        r["max_diff_vs_round"] <= 1 and 0.5 <= r["M0_real"] < 1 for r in res["multiplier_table"]
    )
    res["criterion"] = (
        "every layer, every output, every seed: |integer - simulated| <= 1 "
        "LSB (uint8 output code) with both paths fed the same input; "
        "test accuracy integer vs simulated (end to end) within 0.1 point; "
        "M0/2^31 in [0.5, 1) and |x*M0*2^-(31+n) - round(x*M)| <= 1 for "
        "every multiplier in the table"
    )
    res["passed"] = bool(
        res["max_lsb_per_layer"] <= 1
        and res["acc_diff"] <= 0.1
        and mt_ok
        and all(r["m0_in_range"] for r in runs)
    )
    res["seconds"] = time.perf_counter() - t0
    return res


def markdown(res: dict[str, Any]) -> str:
    lines = [
        f"Digits MLP {'-'.join(map(str, SIZES))}, float Adam {res['steps']} steps, "
        f"{res['seeds']} seed(s); uint8 activations (minmax), int8 per-channel weights.",
        "",
        "| seed | layer | per-layer max LSB | per-layer exact | end-to-end max LSB "
        "| end-to-end exact | M (max over channels) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s, r in enumerate(res["runs"]):
        for i, (p, e) in enumerate(zip(r["per_layer"], r["end_to_end"], strict=False)):
            lines.append(
                f"| {s} | Dense_{i} | {p['max_lsb']} | {100 * p['exact']:.2f}% | "
                f"{e['max_lsb']} | {100 * e['exact']:.2f}% | "
                f"{r['multipliers'][i]:.3g} |"
            )
    lines += [
        "",
        "| seed | float32 acc % | simulated (fake-quant) acc % | integer-only acc % |",
        "|---|---|---|---|",
    ]
    for s, r in enumerate(res["runs"]):
        a = r["acc"]
        lines.append(f"| {s} | {a['float32']:.2f} | {a['simulated']:.2f} | {a['integer']:.2f} |")
    lines += [
        "",
        "| M | M0 (int32) | M0 / 2^31 | n | rel. error of 2^-n M0 | "
        "max |fixed-point - round(x M)| |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["multiplier_table"]:
        lines.append(
            f"| {r['M']:.3g} | {r['M0_int32']} | {r['M0_real']:.6f} | {r['n']} | "
            f"{r['rel_err']:.1e} | {r['max_diff_vs_round']} |"
        )
    lines += [
        "",
        f"Criterion: {res['criterion']}. Measured: max {res['max_lsb_per_layer']} LSB "
        f"per layer ({100 * res['exact_fraction_per_layer']:.2f}% exactly equal), "
        f"accuracy difference {res['acc_diff']:.2f} -> "
        f"**{'pass' if res['passed'] else 'FAIL'}** ({res['seconds']:.1f} s)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--fast", action="store_true")
    args = ap.parse_args()
    with jax.numpy_dtype_promotion("standard"):
        out = main(fast=args.fast)
    print(markdown(out))
    sys.exit(0 if out["passed"] else 1)
