#!/usr/bin/env bash
# A short GPU check of the numerics tests (exact reproducibility on XLA:GPU), for a lease
# with little time left. Usage from the repository root: bash benchmarks/gpu_verify.sh
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" XLA_PYTHON_CLIENT_PREALLOCATE=false
timeout 110 python3 -m pytest -q -n 12 tests/test_quantize.py tests/test_kernels.py \
  tests/test_rounding.py tests/test_calibration.py tests/test_scaling.py 2>&1 | tail -n 30
