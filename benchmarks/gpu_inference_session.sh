#!/usr/bin/env bash
# One prepared GPU session for the serving benchmark (benchmarks/inference.py --gpu):
#   1. a smoke run at tiny sizes (every variant compiles and runs on this GPU);
#   2. the benchmark: Dense 8192 x 8192, batch 8192, bf16 baseline vs jaxquant w8a8 / fp8
#      (e4m3 x e4m3, e4m3 x e5m2) / w4a16 / w8a16 and raw int8 / fp8 GEMMs; HLO facts
#      (cuBLAS / cuBLASLt custom calls and their operand types), errors, speed-ups.
# About 2-3 minutes, most of it compiling (cuBLASLt autotuning of the fp8 / int8 GEMMs).
# Usage on the device machine, from the repo root:
#   OUT=/some/dir bash benchmarks/gpu_inference_session.sh
# Results: $OUT/inference_gpu.json, $OUT/inference_gpu.log (with the README table),
#          $OUT/inference_gpu_quick.log, $OUT/hlo.tar.gz (every variant's optimized HLO),
#          $OUT/gpu.txt.
set -u
OUT="${OUT:-/tmp/jq_inference}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  python3 -c "import sys, jax; print(sys.version.split()[0], 'jax', jax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/gpu.txt"

step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  timeout "$secs" "$@" >"$OUT/$name.log" 2>&1
  echo "== $name: exit $? in $((SECONDS - t0)) s"
  tail -n 30 "$OUT/$name.log"
}

step inference_gpu_quick 50 python3 benchmarks/inference.py --gpu --quick --rounds 1
# --budget: variants still uncompiled after 110 s of compiling are skipped (listed in the
# JSON), so the timing and the JSON always happen inside the step's timeout.
step inference_gpu 180 python3 benchmarks/inference.py --gpu --budget 110 \
  --out "$OUT/inference_gpu.json" --hlo-dir "$OUT/hlo"
# Few files come back from the device: pack the HLO folder into one archive.
if [ -d "$OUT/hlo" ]; then tar -czf "$OUT/hlo.tar.gz" -C "$OUT" hlo && rm -rf "$OUT/hlo"; fi
ls -l "$OUT"
