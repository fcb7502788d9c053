#!/usr/bin/env bash
# One prepared GPU session for the training-step benchmark (issue 3):
#   1. native fp8 conversion == jaxquant's integer rounding, bit for bit, on this GPU;
#   2. benchmarks/train_step.py --gpu (bf16 vs fp8 step, HLO GEMM count, loss after 100).
# Usage on the device machine, from the repo root:  OUT=/some/dir bash benchmarks/gpu_train_session.sh
set -u
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 - <<'PY' 2>&1 | tee "$OUT/native_cast_check.txt"
import jax, jax.numpy as jnp, numpy as np, jaxquant as jq
from jaxquant._src import dot as D
k = jax.random.split(jax.random.key(0), 3)
x = jax.random.normal(k[0], (512, 1024), jnp.float32) * jnp.exp(jax.random.normal(k[1], (512, 1024)) * 3)
x = x.at[0, :8].set(jnp.array([0.0, -0.0, 1e-30, -1e-30, 3e38, -3e38, jnp.inf, -jnp.inf]))
w = jax.random.normal(k[2], (1024, 256), jnp.float32)
kw = jq.recipes.get("fp8_current").dot_kwargs()
for spec in (jq.QuantSpec("e4m3"), jq.QuantSpec("e5m2")):
    _, s, _, plan = jq._src.quantize._core(x, spec, None, None)
    emu = D._quantize_operand(x, spec, None, None, spec.format.storage_dtype, False)[0]
    nat = D._quantize_operand(x, spec, None, None, spec.format.storage_dtype, True)[0]
    f = jax.jit(lambda x: D._quantize_operand(x, spec, None, None, spec.format.storage_dtype, True)[0])
    nat_jit = f(x)
    bits = lambda a: np.asarray(jax.lax.bitcast_convert_type(a, jnp.uint8))
    print(spec.format.name, "mismatches eager:", int((bits(emu) != bits(nat)).sum()),
          "jit:", int((bits(emu) != bits(nat_jit)).sum()), "of", x.size)
outs = {}
for low, nat in (("f32_out", False), ("f32_out", True), ("half_out", True)):
    D._FP8_LOWERING, D._NATIVE_FP8_CAST = low, nat
    lhs, rhs = jnp.tanh(x).astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    out = jq.dot_general(lhs, rhs, (((1,), (0,)), ((), ())), **kw)
    outs[(low, nat)] = np.asarray(out.astype(jnp.float32))
ref = outs[("f32_out", False)]
for key, o in outs.items():
    print(key, "max rel diff vs f32_out:", float(np.max(np.abs(o - ref)) / np.max(np.abs(ref))))
PY
timeout 480 python3 benchmarks/train_step.py --gpu --lowerings f32_out half_out --native 1 \
  --reference 0 --loss-check f32_out 1 --out "$OUT/train_step_gpu.json" --markdown 2>&1 | tee "$OUT/train_step_gpu.log"
