#!/usr/bin/env bash
# Issue 20, session 14: candidate plan defaults for the backward and the
# selection forward, taken from what the shipped 64k records agree on,
# timed as overrides (the same constants the plan would derive) on the
# untuned patterns at 64k, forward+backward, one process per pattern.
#   A  the plan's defaults now
#   C  dK/dV of the compressed branch on 8 warps, 128-key tiles (64 at d=192)
#   D  C + the selection backward keys-major over 2048-position chunks
#      (paper128: 4 positions a dK/dV and dq tile, as its records)
#   E  D + the block-centric selection forward as paper128's 64k record runs it
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export NSA_DSL_CACHE_DIR=/tmp/nsa_dsl_cache PYTHONUNBUFFERED=1
U=benchmarks/untuned
BCF='"SLC_FWD_ORDER":1,"SLC_FWD_LIST":1,"BC_REDUCE_ROWS":16,"BC_REDUCE_STAGES":3,"slc_fwd_bc.num_stages":3,"slc_fwd.num_stages":3,"cmp_fwd.num_stages":3'
run() {  # pattern, dkdv tile, extra backward
  local f=$1 C="{\"CMP_BWD_DKDV_WARPS\":8,\"CMP_BWD_DKDV_BLOCK_N\":$2}"
  local D="{\"CMP_BWD_DKDV_WARPS\":8,\"CMP_BWD_DKDV_BLOCK_N\":$2,\"SLC_BWD_KEYS_MAJOR\":1,\"SLC_BWD_CHUNK\":2048$3}"
  local E="{\"CMP_BWD_DKDV_WARPS\":8,\"CMP_BWD_DKDV_BLOCK_N\":$2,\"SLC_BWD_KEYS_MAJOR\":1,\"SLC_BWD_CHUNK\":2048$3,$BCF}"
  timeout 150 python3 benchmarks/stage_times.py "$f" --length 65536 --wall --backward --calls 8 \
    --config '{}' --config "$C" --config "$D" --config "$E" 2>&1 | grep "^T=" | sed "s|^|$(basename "$f" .nsa) |"
}
{
  run $U/paper128_nowindow.nsa 128 ',"SLC_BWD_TOKENS":4,"SLC_BWD_DQ_TOKENS":4'
  run $U/group4_d64.nsa 128 ''
  run $U/group8_d192.nsa 64 ''
} | tee "$OUT/candidates.log"
