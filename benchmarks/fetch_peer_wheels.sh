#!/usr/bin/env bash
# Download the peers that benchmarks/peers.py compares against, Qwix and AQT (aqtp), as
# wheels into .whl/ (git-ignored through .git/info/exclude), for a GPU machine that has no
# package index: benchmarks/gpu.py (section peers) installs them there with --no-index.
# Both are pure Python (py3-none-any, ~1.1 MB together). Their requirements (jax, jaxlib,
# flax>=0.12, numpy, opt-einsum, absl-py) are on the device image already, so --no-deps is
# complete; the Requires-Dist lines are printed to check that against the image's list.
# Run from the repo root, where pip reaches PyPI:
#   bash benchmarks/fetch_peer_wheels.sh
set -euo pipefail
QWIX_VERSION=${QWIX_VERSION:-0.1.8}
AQTP_VERSION=${AQTP_VERSION:-0.9.0}
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF /.whl/ "$exclude" 2>/dev/null || echo /.whl/ >>"$exclude"
mkdir -p .whl
rm -f .whl/qwix-*.whl .whl/aqtp-*.whl # one version of each, or the install stops
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl "qwix==$QWIX_VERSION" "aqtp==$AQTP_VERSION"
for w in .whl/*.whl; do
  echo "$w requires: $(unzip -p "$w" '*.dist-info/METADATA' | grep ^Requires-Dist \
    | grep -v extra | sed 's/Requires-Dist: //' | paste -sd, -)"
done
du -sh .whl
