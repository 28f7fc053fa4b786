#!/usr/bin/env bash
# Issue 20's measurement on the GPU: patterns without a tuned record, each at
# 64k, forward+backward wall time (stage_times.py --wall --backward) with
#   {}      the plan's defaults now (the scoring's switches, CMP_TMA and
#           SWA_TMA on wherever legal),
#   old     the defaults before (every one of those switches off),
# and, for paper128 without its window, paper128's 64k record less its
# window flags (what tuning reached for the pattern beside it). Then
# `nsa-dsl verify` of each pattern's default path in bf16 against the
# float64 reference. Usage (device): bash .device/run bash benchmarks/untuned/run.sh
set -uo pipefail
OUT=${OUT:-/tmp/untuned_out}; mkdir -p "$OUT"
export NSA_DSL_CACHE_DIR=/tmp/nsa_dsl_cache PYTHONUNBUFFERED=1
U=benchmarks/untuned
SCORING_OFF='"TOPK_HEAD_ROWS":0,"TOPK_KEYS_MAJOR":0,"TOPK_HEADS_IN_THREAD":0,"TOPK_TMA":0,"TOPK_STRIDED_OVERLAP":0,"TOPK_SORT_MERGE":0,"TOPK_KEY32":0,"slc_topk.num_stages":1'
OLD_NOWINDOW="{\"CMP_TMA\":0,$SCORING_OFF}"
OLD="{\"CMP_TMA\":0,\"SWA_TMA\":0,$SCORING_OFF}"
RECORD='{"BC_REDUCE_ROWS":16,"BC_REDUCE_STAGES":3,"SLC_FWD_LIST":1,"SLC_FWD_ORDER":1,"TOPK_BLOCK_M":64,"cmp_fwd.num_stages":3,"slc_fwd.num_stages":3,"slc_fwd_bc.num_stages":3,"CMP_BWD_BLOCK_M":64,"CMP_BWD_BLOCK_N":64,"CMP_BWD_DKDV_BLOCK_N":128,"CMP_BWD_DKDV_WARPS":8,"SLC_BWD_CHUNK":2048,"SLC_BWD_DQ_TOKENS":4,"SLC_BWD_KEYS_MAJOR":1,"SLC_BWD_TOKENS":4,"cmp_bwd.num_warps":4,"slc_bwd.num_warps":4}'
T=${UNTUNED_LENGTH:-65536}
{
  python3 benchmarks/stage_times.py $U/paper128_nowindow.nsa --length $T --wall --backward \
    --config '{}' --config "$OLD_NOWINDOW" --config "$RECORD"
  python3 benchmarks/stage_times.py $U/group4_d64.nsa --length $T --wall --backward --config '{}' --config "$OLD"
  python3 benchmarks/stage_times.py $U/group8_d192.nsa --length $T --wall --backward --config '{}' --config "$OLD"
} 2>&1 | tee "$OUT/untuned_times.log" | grep -v "^ "
for f in $U/*.nsa; do
  python3 -m nsa_dsl.cli verify "$f" --grad --examples 4 2>&1 | tail -n 3
done | tee "$OUT/untuned_verify.log"
