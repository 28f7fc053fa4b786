#!/usr/bin/env bash
# Everything the GPU machine must prove, in one device call (< 10 minutes):
#   1. GPU tests (compiled kernels vs the float64 reference, 1k..32k, grads,
#      determinism, 64k memory) -> $OUT/gpu_log.jsonl, $OUT/pytest.log
#   2. the benchmark (paper128, deepseek_nsa, small_group at 8k..64k)
#      -> $OUT/h200.json, $OUT/h200.png, $OUT/bench.log
# Run through the device tool with carry [".device"]:
#   bash .device/run bash benchmarks/gpu_session.sh
# then copy $OUT's files to benchmarks/results/ and commit them.
set -uo pipefail
OUT=${OUT:-/tmp/nsa_out}
mkdir -p "$OUT"
export NSA_DSL_GPU_LOG=$OUT/gpu_log.jsonl NSA_DSL_HYPOTHESIS_PROFILE=gpu PYTHONUNBUFFERED=1
export NSA_DSL_CACHE_DIR=${NSA_DSL_CACHE_DIR:-/tmp/nsa_dsl_cache}
start=$(date +%s)
timeout 240 python3 -m pytest tests/test_gpu.py -q -p timeout --timeout 120 -rf 2>&1 | tee "$OUT/pytest.log" | tail -n 15
echo "tests took $(( $(date +%s) - start )) s"
left=$(( 560 - ($(date +%s) - start) ))
timeout "$left" python3 benchmarks/bench.py --out "$OUT" --budget-s $(( left - 90 )) 2>&1 | tee "$OUT/bench.log" | tail -n 40
