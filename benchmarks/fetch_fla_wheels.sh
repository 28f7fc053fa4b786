#!/usr/bin/env bash
# Wheels for the optional fla-core comparison (bench.py --fla), for the GPU
# machine, which has no network: run here, then carry .whl in the device call
# (gpu_session.sh fla installs them). fla-core and einops are pure Python.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl fla-core==0.6.0 einops
ls .whl
