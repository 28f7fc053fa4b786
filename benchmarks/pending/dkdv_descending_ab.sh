# The A/B of benchmarks/pending/dkdv_descending.patch on the GPU machine (NOTES v30, v31):
# bash .device/run bash benchmarks/pending/dkdv_descending_ab.sh, carrying [".device", ".flash_nsa"].
# It applies the patch, times both sweeps twice at 64k and 16k, makes a winner the plan default,
# runs the bf16 backward tests on it, then the side-by-side bench; results under $OUT.
nvidia-smi --query-gpu=name --format=csv,noheader
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -o "H[12]00" | head -1 | tr H h)
patch -p1 < benchmarks/pending/dkdv_descending.patch | tail -n 3
A='{}'; S='{"CMP_BWD_DKDV_DESCENDING": 1, "SWA_BWD_DKDV_DESCENDING": 1}'
for T in 65536 16384; do
timeout 150 python3 benchmarks/stage_times.py examples/bench_paper128.nsa --length $T --tuned-base --backward --wall --calls 10 --config "$A" --config "$S" --config "$A" --config "$S" 2>&1 | grep -E "^T=|Error|error" | tee -a $OUT/desc_ab.log | cut -c1-330
done
python3 - <<'PY'
import os, re
rows = {}
for line in open(os.environ["OUT"] + "/desc_ab.log"):
    m = re.match(r"T=(\d+) (\{.*\}): total [\d.]+ ms wall ([\d.]+) ms \| (.*)", line)
    if not m: continue
    kern = dict((k, float(v)) for k, v in re.findall(r"(\w+)=([\d.]+)", m[4]))
    rows.setdefault((m[1], m[2]), []).append((float(m[3]), kern))
def mean(key, T, cfg):
    vals = [w if key == "wall" else k[key] for w, k in rows[(T, cfg)]]
    return sum(vals) / len(vals)
A = "{}"; S = '{"CMP_BWD_DKDV_DESCENDING": 1, "SWA_BWD_DKDV_DESCENDING": 1}'
Ts = [T for T in ("65536", "16384") if (T, A) in rows and (T, S) in rows]
for T in Ts:
    print(T, {k: (round(mean(k, T, A), 3), round(mean(k, T, S), 3)) for k in ("wall", "cmp_bwd_dkdv", "swa_bwd_dkdv")})
cmp_win = bool(Ts) and all(mean("cmp_bwd_dkdv", T, S) < 0.98 * mean("cmp_bwd_dkdv", T, A) for T in Ts)
swa_win = bool(Ts) and all(mean("swa_bwd_dkdv", T, S) < 0.99 * mean("swa_bwd_dkdv", T, A) for T in Ts)
print("cmp descending wins:", cmp_win, "swa descending wins:", swa_win)
open(os.environ["OUT"] + "/decision.txt", "w").write(f"cmp {int(cmp_win)} swa {int(swa_win)}\n")
PY
read _ cw _ sw < $OUT/decision.txt
[ "$cw" = 1 ] && sed -i 's/("CMP_BWD_DKDV_DESCENDING", 0)/("CMP_BWD_DKDV_DESCENDING", 1)/' nsa_dsl/plan.py
[ "$sw" = 1 ] && sed -i 's/("SWA_BWD_DKDV_DESCENDING", 0)/("SWA_BWD_DKDV_DESCENDING", 1)/' nsa_dsl/plan.py
grep -n 'DKDV_DESCENDING", ' nsa_dsl/plan.py
if [ "$cw" = 1 ] || [ "$sw" = 1 ]; then
  timeout 100 python3 -m pytest tests/test_gpu.py -q -p timeout --timeout 90 -rf -x -k "gradients_match_reference_bf16 or deterministic or (dkdv_tiles and plan)" 2>&1 | tee $OUT/pytest_bwd_desc.log | tail -n 3
fi
timeout 170 python3 benchmarks/bench.py --out $OUT/c --name "${CARD}_flash_nsa_v31" --patterns examples/bench_paper128.nsa --lengths 16384,65536,131072 --no-flex --no-cold-start --tuned --flash-nsa .flash_nsa --budget-s 150 2>&1 | tail -n 24
if [ "$cw" = 1 ]; then
timeout 60 /usr/local/cuda/bin/ncu --profile-from-start off -k "regex:cmp_bwd_dkdv" --section SpeedOfLight --section MemoryWorkloadAnalysis python3 benchmarks/ncu_forward.py examples/bench_paper128.nsa --length 65536 --tuned-base --backward > $OUT/ncu_cmp_desc.txt 2>&1; grep -E "Duration|L2 Hit|DRAM Through|Memory Through" $OUT/ncu_cmp_desc.txt | head
fi
