#!/usr/bin/env bash
# The training ladder of results/train_tiny/v2/ (runs A-D): one pattern family
# from T=256 to 4096, to tell a kernel error (A: kernels vs the reference's
# 0.653 at T=256) from difficulty that grows with length (B-D).
#   bash .device/run bash benchmarks/train_ladder.sh     (carry [".device"])
set -u
P=benchmarks/results/train_tiny/cpu/patterns.nsa
T="python3 examples/train_tiny.py --log-every 250 --eval-seqs 256"
S="--pattern-file $P --pattern-name mean16 --pairs 8 --queries 8 --n-keys 64 --n-values 32 --n-filler 64 --layers 2 --hidden 64"
$T --attn nsa $S --seq-len 256 --gap 32 --steps 600 --out $OUT/A_mean16_T256 2>&1 | tail -2
$T --attn both $S --seq-len 1024 --gap 32 --steps 1500 --out $OUT/B_mean16_T1024 2>&1 | grep -E "accuracy"
$T --attn both --pattern-name train_tiny_mean --seq-len 1024 --steps 2000 --out $OUT/C_mean_T1024 2>&1 | grep -E "accuracy|step  (1000|1999)"
$T --attn nsa --pattern-name train_tiny_mean --seq-len 4096 --pairs 4 --queries 4 --steps 2000 --out $OUT/D_mean_T4096_p4 2>&1 | grep -E "accuracy|step  (1000|1999)"
