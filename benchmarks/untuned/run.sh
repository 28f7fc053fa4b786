#!/usr/bin/env bash
# Issue 20's measurement on the GPU: patterns without a tuned record, at 64k,
# forward+backward (stage_times.py --wall --backward, one process, one set of
# inputs per pattern) with
#   {}      the plan's defaults (what compile(pattern) runs, no tuning),
#   tuned   what `nsa-dsl tune --lengths 64k --budget-s $UNTUNED_BUDGET_S`
#           then reached for that pattern, from the defaults,
# and, for paper128 without its window, paper128's 64k record less its
# window flags. (The defaults before issue 20, the scoring's switches and
# CMP_TMA / SWA_TMA off, can no longer be expressed: they are the plan's.)
# UNTUNED_PATTERNS picks the files (default: all three); UNTUNED_VERIFY=1
# also runs `nsa-dsl verify --grad` of each default path.
# Usage (device): bash .device/run bash benchmarks/untuned/run.sh
set -uo pipefail
OUT=${OUT:-/tmp/untuned_out}; mkdir -p "$OUT"
export NSA_DSL_CACHE_DIR=/tmp/nsa_dsl_cache PYTHONUNBUFFERED=1
U=benchmarks/untuned
T=${UNTUNED_LENGTH:-65536}
BUDGET=${UNTUNED_BUDGET_S:-150}
PATTERNS=${UNTUNED_PATTERNS:-"$U/paper128_nowindow.nsa $U/group4_d64.nsa $U/group8_d192.nsa"}
RECORD='{"BC_REDUCE_ROWS":16,"BC_REDUCE_STAGES":3,"SLC_FWD_LIST":1,"SLC_FWD_ORDER":1,"TOPK_BLOCK_M":64,"cmp_fwd.num_stages":3,"slc_fwd.num_stages":3,"slc_fwd_bc.num_stages":3,"CMP_BWD_BLOCK_M":64,"CMP_BWD_BLOCK_N":64,"CMP_BWD_DKDV_BLOCK_N":128,"CMP_BWD_DKDV_WARPS":8,"SLC_BWD_CHUNK":2048,"SLC_BWD_DQ_TOKENS":4,"SLC_BWD_KEYS_MAJOR":1,"SLC_BWD_TOKENS":4,"cmp_bwd.num_warps":4,"slc_bwd.num_warps":4}'
for f in $PATTERNS; do
  name=$(basename "$f" .nsa)
  echo "== $name: tune at T=$T, budget ${BUDGET}s"
  timeout $((BUDGET + 120)) python3 -m nsa_dsl.cli tune "$f" --lengths "$T" --budget-s "$BUDGET" \
    --export "$OUT/tuned" > "$OUT/tune_$name.log" 2>&1
  tail -n 4 "$OUT/tune_$name.log"
  TUNED=$(python3 - "$OUT/tuned" "$name" "$T" <<'PY'
import json, sys
from pathlib import Path
from nsa_dsl.records import bucket_of
for path in Path(sys.argv[1]).glob(sys.argv[2] + "-*.json"):
    print(json.dumps(json.loads(path.read_text())["buckets"][str(bucket_of(int(sys.argv[3])))]["overrides"]))
    break
else:
    print("{}")
PY
)
  echo "tuned config: $TUNED"
  if [ "$name" = paper128_nowindow ]; then
    set -- --config '{}' --config "$TUNED" --config "$RECORD"
  else
    set -- --config '{}' --config "$TUNED"
  fi
  python3 benchmarks/stage_times.py "$f" --length "$T" --wall --backward "$@" 2>&1 | grep -v "^ "
done 2>&1 | tee "$OUT/untuned_times.log"
if [ "${UNTUNED_VERIFY:-0}" = 1 ]; then
  for f in $PATTERNS; do
    python3 -m nsa_dsl.cli verify "$f" --grad --examples 4 2>&1 | tail -n 3
  done | tee "$OUT/untuned_verify.log"
fi
