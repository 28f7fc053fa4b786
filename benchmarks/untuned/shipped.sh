#!/usr/bin/env bash
# Issue 20's other measurement: the shipped patterns with their tuned records
# lose nothing. Each pattern's forward+backward at 8k and 64k
# (stage_times.py --tuned-base --wall --backward) under the tree before
# issue 20 (.baseline/: `git archive 006066e`, carried, ignored) and this
# tree, alternating (before, now, before, now) on one GPU in one call.
# Usage (device): bash .device/run bash benchmarks/untuned/shipped.sh
set -uo pipefail
OUT=${OUT:-/tmp/untuned_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LENGTHS=${SHIPPED_LENGTHS:-"65536 8192"}
PATTERNS=${SHIPPED_PATTERNS:-"bench_paper128 deepseek_nsa bench_small_group"}
HERE=$PWD; PYTHONPATH=${PYTHONPATH:-}
for name in $PATTERNS; do
  for T in $LENGTHS; do
    for round in $(seq "${SHIPPED_ROUNDS:-2}"); do
      for tree in .baseline .; do
        label=$([ "$tree" = . ] && echo now || echo before)
        (cd "$tree" && NSA_DSL_CACHE_DIR=/tmp/nsa_cache_$label PYTHONPATH="$PWD:${PYTHONPATH#$HERE:}" \
          python3 benchmarks/stage_times.py "examples/$name.nsa" --length "$T" --wall --backward --tuned-base \
          --calls 10 2>&1 | grep -v "^ " | sed "s|^|$name $label round$round |")
      done
    done
  done
done 2>&1 | tee "$OUT/shipped_times.log"
