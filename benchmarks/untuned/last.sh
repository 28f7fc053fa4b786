#!/usr/bin/env bash
# Session 14's last device call: packed sequences in bf16 on the GPU, then
# paper128 without its window: defaults vs the candidate defaults.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export NSA_DSL_CACHE_DIR=/tmp/nsa_dsl_cache PYTHONUNBUFFERED=1
timeout 110 python3 benchmarks/varlen_gpu.py 2>&1 | grep -v Warning | tee "$OUT/varlen_gpu.log"
D='{"CMP_BWD_DKDV_WARPS":8,"CMP_BWD_DKDV_BLOCK_N":128,"SLC_BWD_KEYS_MAJOR":1,"SLC_BWD_CHUNK":2048,"SLC_BWD_TOKENS":4,"SLC_BWD_DQ_TOKENS":4}'
timeout 90 python3 benchmarks/stage_times.py benchmarks/untuned/paper128_nowindow.nsa --length 65536 --wall --backward \
  --calls 6 --config '{}' --config "$D" 2>&1 | grep "^T=" | tee "$OUT/candidates.log"
