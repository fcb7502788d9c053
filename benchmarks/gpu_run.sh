#!/usr/bin/env bash
# Quantizer throughput on one GPU. Run from the repository root:
#
#   OUT=/some/dir bash benchmarks/gpu_run.sh
#
# Writes to $OUT (default /tmp/jaxquant_gpu_bench; copy the JSON into benchmarks/results/):
#   quantize_throughput_gpu.json  the results (16384x16384 float32, 20 x 5 calls per case)
#   quantize_throughput_gpu.txt   the printed table
#   hlo/*.hlo.txt                 optimized HLO of every case (compiled.as_text())
#   xla_dump/                     XLA's dump (optimized HLO, thunk sequence) of the
#                                 int8 per-block-32 and mxfp8 cases only
#   hlo.tar.gz                    hlo/ and xla_dump/ in one file
# Budget: 20-25 s wall on an H200 including compiles (measured; the benchmark itself ~12 s),
# so well under 3 minutes on an H100. Each step has a hard timeout (140 s + 30 s).
set -euo pipefail

OUT="${OUT:-/tmp/jaxquant_gpu_bench}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Keep JAX from grabbing 75% of GPU memory up front; 3 x 1 GiB inputs are plenty.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.memory --format=csv || true
python3 -c "import sys, jax; print(sys.version.split()[0], 'jax', jax.__version__, jax.devices())"

timeout 140 python3 benchmarks/quantize_throughput.py \
  --out "$OUT/quantize_throughput_gpu.json" --hlo-dir "$OUT/hlo" "$@" \
  2>&1 | tee "$OUT/quantize_throughput_gpu.txt"

# The two block-scaled cases again, compiled once with XLA's dump on (timing not used).
XLA_FLAGS="${XLA_FLAGS:-} --xla_dump_to=$OUT/xla_dump --xla_dump_hlo_as_text" \
  timeout 30 python3 benchmarks/quantize_throughput.py \
  --only "int8 per-block-32,mxfp8" --reps 1 --inner 1 --buffers 1 >/dev/null 2>&1 \
  || echo "xla dump step failed or timed out (results above are unaffected)"
# Keep only the optimized modules of the benchmarked functions, and pack the HLO into one
# archive (hlo.tar.gz) next to the loose files.
find "$OUT/xla_dump" -type f ! -name '*jit_f*after_optimizations.txt' \
  ! -name '*jit_f*thunk_sequence.txt' -delete 2>/dev/null || true
find "$OUT/xla_dump" -mindepth 1 -type d -empty -delete 2>/dev/null || true
tar -czf "$OUT/hlo.tar.gz" -C "$OUT" hlo xla_dump 2>/dev/null || tar -czf "$OUT/hlo.tar.gz" -C "$OUT" hlo
ls -l "$OUT"
