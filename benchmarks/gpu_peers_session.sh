#!/usr/bin/env bash
# One prepared GPU session for benchmarks/peers.py: jaxquant beside Qwix 0.1.8, AQT (aqtp
# 0.9.0) and flax's Fp8DotGeneral on one GPU, at GPU sizes (peers.py --preset gpu):
#   1. installs the peer wheels from .whl/ into $SITE (the device has no package index;
#      make them here first with `bash benchmarks/fetch_peer_wheels.sh`, ~1.1 MB);
#   2. prints the GPU, Python and library versions, and checks the peers import;
#   3. peers.py, one process per section, each under its own timeout, most wanted first:
#      large     w8a8 QAT step, MLP 4096-4096-4096-4096, batch 8192, bf16 compute, vs the
#                float step; loss after 20 steps; GEMMs of each compiled step (int8 /
#                cuBLASLt fp8 custom calls or not) and its HLO;
#      qat       the digits MLP step (launch-bound here, 50 calls per timing) and the test
#                accuracy of the same recipe (3 seeds x 400 steps);
#      quantizer int8 per-channel / int4 groups of 128, 16384 x 16384 float32, vs x * 2;
#      large_f32 the large step again with float32 compute (--large-dtype float32);
#   4. merges the sections into $OUT/peers_gpu.json and prints its tables.
# A peer that fails is left out of its section (error in the JSON, traceback in the log);
# a section that fails or times out loses that section only. Every step's timeout is also
# cut to what is left of PEERS_BUDGET_S (420 s) from the start less 30 s kept for the
# merge, so the script ends inside ~7.3 minutes whatever happens (the last step gets 10 s
# after its SIGTERM before a SIGKILL, the merge 30 s). Expected on an H100: ~2-4 minutes,
# mostly compiling (estimated, not yet measured: checked on CPU with PEERS_QUICK=1 only).
#
# Usage, from the repo root (on the device the `run` call carries .whl):
#   OUT=/some/dir bash benchmarks/gpu_peers_session.sh
# Env: OUT (default /tmp/peers_gpu_out), SITE (wheel target, default /tmp/site), PYTHON
# (default python3), PEERS_QUICK=1 (tiny sizes, --quick: a CPU check of every step),
# PEERS_BUDGET_S (seconds for the whole script, default 420).
# Results in $OUT (at most 8 files, the device's limit): session.log (everything printed),
# peers_gpu_{large,qat,quantizer,large_f32}.json (one per section), peers_gpu.json (the
# sections merged), hlo.tar.gz (the large steps' optimized HLO).
set -u -o pipefail
OUT=${OUT:-/tmp/peers_gpu_out}
SITE=${SITE:-/tmp/site}
PY=${PYTHON:-python3}
BUDGET=${PEERS_BUDGET_S:-420}
QUICK=()
[ "${PEERS_QUICK:-0}" = 1 ] && QUICK=(--quick)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
DEADLINE=$((SECONDS + BUDGET - 30)) # the last 30 s for the merge

step() { # step NAME SECONDS CMD...: run CMD under min(SECONDS, time left), report its exit
  local name=$1 secs=$2 left=$((DEADLINE - SECONDS)) t0=$SECONDS rc
  shift 2
  if [ "$left" -lt 20 ]; then
    echo "== $name: skipped, ${left} s left of the ${BUDGET} s budget"
    return 0
  fi
  [ "$secs" -gt "$left" ] && secs=$left
  echo "== $name (timeout ${secs} s): $*"
  timeout -k 10 "$secs" "$@"
  rc=$?
  echo "== $name: exit $rc in $((SECONDS - t0)) s$([ $rc = 124 ] && echo ' (timed out)')"
}

section() { # section NAME SECONDS PEERS_ARGS...
  local name=$1 secs=$2
  shift 2
  step "$name" "$secs" "$PY" benchmarks/peers.py --preset gpu "$@" "${QUICK[@]}" \
    --out "$OUT/peers_gpu_$name.json"
}

main() {
  if ls .whl/*.whl >/dev/null 2>&1; then
    step install_wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  else
    echo "== no .whl/*.whl: run benchmarks/fetch_peer_wheels.sh here and carry .whl;" \
      "Qwix and AQT will be listed as skipped"
  fi
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  step versions 90 "$PY" - <<'PY'
import sys, importlib.metadata as md
import jax
print("python", sys.version.split()[0], "| devices", jax.devices(), "|", jax.devices()[0].device_kind)
for name in ("jax", "jaxlib", "flax", "optax", "ml_dtypes", "numpy", "scikit-learn", "qwix", "aqtp"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} not installed")
for what in ("import qwix", "from aqt.jax.v2 import config; from aqt.jax.v2.flax import aqt_flax",
             "import jaxquant; from jaxquant.flax import quantize_model"):
    try:
        exec(what)
        print("  ok:", what)
    except Exception as e:
        print("  FAILED:", what, "->", repr(e))
PY
  section large 150 --sections large --hlo-dir "$OUT/hlo"
  section qat 120 --sections qat
  section quantizer 90 --sections quantizer
  section large_f32 120 --sections large --large-dtype float32 --hlo-dir "$OUT/hlo_f32"
  # Few files come back from the device: the HLO folders as one archive.
  local dirs=()
  for d in hlo hlo_f32; do [ -d "$OUT/$d" ] && dirs+=("$d"); done
  if [ ${#dirs[@]} -gt 0 ]; then
    tar -czf "$OUT/hlo.tar.gz" -C "$OUT" "${dirs[@]}" && (cd "$OUT" && rm -rf "${dirs[@]}")
  fi
  echo "== merge"
  timeout -k 5 30 "$PY" - "$OUT" <<'PY'
import json, os, subprocess, sys
out = sys.argv[1]
merged, configs, errors = {}, {}, {}
for name in ("large", "qat", "quantizer", "large_f32"):
    path = os.path.join(out, f"peers_gpu_{name}.json")
    if not os.path.exists(path):
        errors[name] = "no JSON: the section failed before its first write or was skipped"
        continue
    with open(path) as f:
        doc = json.load(f)
    merged.setdefault("env", doc["env"])
    configs[name] = doc["config"]
    section = "large" if name == "large_f32" else name
    if section in doc:
        merged[name] = doc[section]
    elif name not in errors:
        errors[name] = "not in its JSON: cut short (timeout or crash); see session.log"
    for k, v in doc.get("errors", {}).items():
        errors[f"{name}/{k.split('/', 1)[-1]}"] = v
merged["config"] = configs.get("qat") or next(iter(configs.values()), {"rounds": "?"})
merged["configs"] = configs
if errors:
    merged["errors"] = errors
merged.setdefault("env", {"backend": "?", "jax": "?", "qwix": "?", "aqtp": "?", "git": "?"})
path = os.path.join(out, "peers_gpu.json")
with open(path, "w") as f:
    json.dump(merged, f, indent=1)
subprocess.run([sys.executable, "benchmarks/peers.py", "--markdown", path], check=True)
PY
  ls -l "$OUT"
}

main 2>&1 | tee "$OUT/session.log"
