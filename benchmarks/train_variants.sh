#!/usr/bin/env bash
# Kept as the provenance of results/train_tiny/v2/side_by_side/. Outcome: the
# runs did NOT barely slow each other -- each ran ~5x slower and all hit their
# time limit -- so run training one at a time (gpu_session.sh train).
#
# Which change lets NSA learn the 4k recall task? Training runs of
# examples/train_tiny.py launched side by side on one GPU (each is bound by
# kernel launches at this model size, so they barely slow each other), then
# a short benchmark of paper128 alone on the idle GPU.
#   bash .device/run bash benchmarks/train_variants.sh     (carry [".device"])
set -u
OUT=${OUT:-/tmp/nsa_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NSA_DSL_CACHE_DIR=${NSA_DSL_CACHE_DIR:-/tmp/nsa_dsl_cache}
T="timeout 330 python3 examples/train_tiny.py --log-every 250 --eval-seqs 256"
# Compile once before the side-by-side runs share the cache.
$T --attn nsa --pattern-name train_tiny_mean --steps 2 --out /tmp/warm >/dev/null 2>&1
$T --attn both --pattern-name train_tiny_mean --no-separate-kv --steps 2000 --out $OUT/R1_mean_shared_T4096 > $OUT/R1.log 2>&1 &
$T --attn nsa --pattern-name train_tiny_mean --no-separate-kv --steps 4000 --out $OUT/R2_mean_shared_T4096_4k > $OUT/R2.log 2>&1 &
$T --attn nsa --pattern-name train_tiny_mean --no-separate-kv --seq-len 1024 --steps 2000 --out $OUT/R3_mean_shared_T1024 > $OUT/R3.log 2>&1 &
$T --attn nsa --pattern-name train_tiny --no-separate-kv --steps 2000 --out $OUT/R4_mlp_shared_T4096 > $OUT/R4.log 2>&1 &
$T --attn nsa --pattern-name train_tiny_mean --lr 3e-3 --steps 2000 --out $OUT/R5_mean_sep_lr3e-3_T4096 > $OUT/R5.log 2>&1 &
$T --attn nsa --pattern-name train_tiny_mean --no-separate-kv --seq-len 2048 --steps 2000 --out $OUT/R6_mean_shared_T2048 > $OUT/R6.log 2>&1 &
wait
grep -H "accuracy" $OUT/R*.log
timeout 170 python3 benchmarks/bench.py --patterns examples/bench_paper128.nsa --lengths 8192,65536 \
  --no-cold-start --no-flex --budget-s 150 --out "$OUT" --name paper128_v3 2>&1 | tee "$OUT/paper128_v3.log" | tail -n 12
