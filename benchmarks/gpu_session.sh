#!/usr/bin/env bash
# Everything that needs a GPU, in one call (the device lease is short):
#   1. the numerics tests on the GPU backend (XLA:GPU converts, the Triton kernel via the
#      public API, bit-identity against numpy/ml_dtypes expectations);
#   2. the Pallas kernels against the jnp path (identity + speed);
#   3. quantizer throughput against a copy;
#   4. fp8 / int8 dots: HLO check and step times (when benchmarks/gpu_dot.py exists).
# Usage from the repository root:  OUT=/tmp/jq_gpu bash benchmarks/gpu_session.sh
set -u
OUT="${OUT:-/tmp/jq_gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi -L || true
python3 -c "import sys, jax; print(sys.version.split()[0], 'jax', jax.__version__, jax.devices())"

step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  timeout "$secs" "$@" >"$OUT/$name.txt" 2>&1
  echo "== $name: exit $? in $((SECONDS - t0)) s"
  tail -n 25 "$OUT/$name.txt"
}

step gpu_tests 140 python3 -m pytest -q -n 8 \
  tests/test_rounding.py tests/test_quantize.py tests/test_qarray.py tests/test_kernels.py
step gpu_kernels 80 python3 benchmarks/gpu_kernels.py --out "$OUT/gpu_kernels.json"
step quantize_throughput 60 python3 benchmarks/quantize_throughput.py \
  --out "$OUT/quantize_throughput_gpu.json"
if [ -f benchmarks/gpu_dot.py ] && [ -z "${SKIP_DOT:-}" ]; then
  step gpu_dot 90 python3 benchmarks/gpu_dot.py --out "$OUT" --budget 65
fi
# At most 8 files come back from the device: pack the HLO folder into one archive.
if [ -d "$OUT/hlo" ]; then tar -czf "$OUT/hlo.tar.gz" -C "$OUT" hlo && rm -rf "$OUT/hlo"; fi
ls -l "$OUT"
