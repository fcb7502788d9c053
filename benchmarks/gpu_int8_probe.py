"""Probe: is XLA's s8 x s8 -> s32 dot exact on this GPU, for which shapes? (prints a table)

Run on the device machine: python3 benchmarks/gpu_int8_probe.py [--out FILE]
"""

import itertools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

rows = []
t0 = time.time()
rng = np.random.default_rng(0)
for m, k, n in itertools.product(
    [1, 8, 16, 24, 32, 64, 128], [16, 32, 48, 64, 128, 256], [4, 10, 16, 32, 64, 128]
):
    a = rng.integers(-127, 128, (m, k), dtype=np.int8)
    b = rng.integers(-127, 128, (k, n), dtype=np.int8)
    f = jax.jit(
        lambda a, b: lax.dot_general(
            a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32
        )
    )
    hlo = f.lower(a, b).compile().as_text()
    kind = "cublas" if "cublas" in hlo else ("triton" if "triton" in hlo else "other")
    y = np.asarray(f(a, b)).astype(np.int64)
    ref = a.astype(np.int64) @ b.astype(np.int64)
    ok = bool(np.array_equal(y, ref))
    ratio = float(np.median(y[ref != 0] / ref[ref != 0])) if not ok else 1.0
    rows.append({"m": m, "k": k, "n": n, "ok": ok, "kernel": kind, "median_ratio": ratio})
    if time.time() - t0 > 90:
        break
bad = [r for r in rows if not r["ok"]]
print(f"{len(rows)} shapes, {len(bad)} wrong, {time.time() - t0:.0f} s")
for r in bad[:80]:
    print(r)
print(
    "ok kernels:",
    sorted({r["kernel"] for r in rows if r["ok"]}),
    "bad kernels:",
    sorted({r["kernel"] for r in bad}),
)
if len(sys.argv) > 2:
    json.dump(rows, open(sys.argv[2], "w"))
