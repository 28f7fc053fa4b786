#!/usr/bin/env bash
# Issue 20's measurements after the plan's new defaults (NOTES v17), in two
# device calls of under 10 minutes (carry [".device", ".baseline"]):
#   bash .device/run bash benchmarks/untuned/session15.sh check
#       the GPU suite, then paper128 without its window at 64k, forward+backward: the plan's
#       defaults now, the defaults before (as overrides), and paper128's
#       64k record as overrides (the best configuration known for it)
#   bash .device/run bash benchmarks/untuned/session15.sh measure
#       the packed sequences in bf16 (varlen_gpu.py), the other two untuned patterns (defaults now vs before), deepseek_nsa
#       without its record in both selection orders at 64k (the cost model's
#       new weight), then the shipped patterns with their records before
#       issue 20 (.baseline/) and now, at 64k
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export NSA_DSL_CACHE_DIR=/tmp/nsa_dsl_cache PYTHONUNBUFFERED=1
U=benchmarks/untuned
# The plan's defaults before NOTES v17, for a G=16 pattern at d=128
OLD16='{"SLC_FWD_ORDER":0,"CMP_BWD_DKDV_BLOCK_N":64,"CMP_BWD_DKDV_WARPS":4,"SLC_BWD_KEYS_MAJOR":0,"SLC_BWD_TOKENS":2,"SLC_BWD_DQ_TOKENS":2}'
RECORD='{"BC_REDUCE_ROWS":16,"BC_REDUCE_STAGES":3,"SLC_FWD_LIST":1,"SLC_FWD_ORDER":1,"TOPK_BLOCK_M":64,"cmp_fwd.num_stages":3,"slc_fwd.num_stages":3,"slc_fwd_bc.num_stages":3,"CMP_BWD_BLOCK_M":64,"CMP_BWD_BLOCK_N":64,"CMP_BWD_DKDV_BLOCK_N":128,"CMP_BWD_DKDV_WARPS":8,"SLC_BWD_CHUNK":2048,"SLC_BWD_DQ_TOKENS":4,"SLC_BWD_KEYS_MAJOR":1,"SLC_BWD_TOKENS":4,"cmp_bwd.num_warps":4,"slc_bwd.num_warps":4}'
times() {  # pattern file, length, stage_times options..., labelled lines
  local f=$1 T=$2; shift 2
  python3 benchmarks/stage_times.py "$f" --length "$T" --wall "$@" 2>&1 | grep "^T=" | sed "s|^|$(basename "$f" .nsa) |"
}
case "${1:-}" in
  check)
    TESTS_TIMEOUT_S=${TESTS_TIMEOUT_S:-270} bash benchmarks/gpu_session.sh tests
    cp "$OUT/pytest.log" "$OUT/gpu_pytest.log" 2>/dev/null
    # the selection dK/dV tile of 4 positions spills on 4 warps (sm90_report:
    # 64 B of stack), so also 8 warps and 2 positions
    timeout 230 bash -c "$(declare -f times); times $U/paper128_nowindow.nsa 65536 --backward --calls 8 \
      --config '{}' --config '{\"slc_bwd.num_warps\":8}' --config '{\"SLC_BWD_TOKENS\":2}' --config '$OLD16' \
      --config '$RECORD'" | tee "$OUT/untuned.log" ;;
  measure)
    timeout 90 python3 benchmarks/varlen_gpu.py 2>&1 | grep -v Warning | tee "$OUT/varlen_gpu.log"
    {
      # group4_d64 (G=4, d=64) and group8_d192 (G=8, qk 192): only the dq
      # tile (64 rows) and the compressed dK/dV tile changed for them
      timeout 90 bash -c "$(declare -f times); times $U/group4_d64.nsa 65536 --backward --calls 8 --config '{}' \
        --config '{\"CMP_BWD_DKDV_BLOCK_N\":64,\"CMP_BWD_DKDV_WARPS\":4,\"SLC_BWD_KEYS_MAJOR\":0,\"SLC_BWD_DQ_TOKENS\":8}'"
      timeout 90 bash -c "$(declare -f times); times $U/group8_d192.nsa 65536 --backward --calls 8 --config '{}' \
        --config '{\"CMP_BWD_DKDV_BLOCK_N\":32,\"CMP_BWD_DKDV_WARPS\":4,\"SLC_BWD_KEYS_MAJOR\":0}'"
      timeout 70 bash -c "$(declare -f times); times examples/deepseek_nsa.nsa 65536 --calls 10 --config '{}' \
        --config '{\"SLC_FWD_ORDER\":0}'"
    } | tee "$OUT/untuned_more.log"
    SHIPPED_LENGTHS=65536 SHIPPED_ROUNDS=1 OUT=$OUT timeout 270 bash $U/shipped.sh ;;
  *) echo "usage: session15.sh check|measure" >&2; exit 2 ;;
esac
