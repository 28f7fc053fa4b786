#!/usr/bin/env bash
# The GPU evidence, in device calls of under 10 minutes each:
#   bash .device/run bash benchmarks/gpu_session.sh tests
#       compiled kernels vs the float64 reference at 1k..32k, gradients,
#       determinism, 64k memory -> $OUT/gpu_log.jsonl, $OUT/pytest.log
#   bash .device/run bash benchmarks/gpu_session.sh varlen
#       packed documents (issue 21): paper128 and deepseek_nsa packs of ~8
#       and ~64 documents summing to 64k against each document alone, then
#       benchmarks/bench_varlen.py -> $OUT/varlen.log, $OUT/varlen_bench.json
#   bash .device/run bash benchmarks/gpu_session.sh decode
#       the cache on the GPU (issue 22): the CUDA-graph decode test, then
#       benchmarks/bench_decode.py (decode step vs SDPA, eager and graphed,
#       8k..128k, batch 1 and a 4 GB cache; flash_nsa's decode beside it when
#       .flash_nsa is carried: benchmarks/fetch_flash_nsa.sh; DECODE_PAGED=256: rows
#       on a paged cache too; DECODE_PREFILL=4096: chunked prefill against
#       the training forward) -> $OUT/decode.log,
#       $OUT/decode_bench.json, $OUT/pytest_decode.log
#   bash .device/run bash benchmarks/gpu_session.sh decode-variants
#       the default-off decode flags (NOTES v23): the decode GPU tests (both
#       scorings, dependent launch bitwise plain), profile_decode at 64k x 29,
#       128k x 14 and 32k x 1 with DEC_BLOCK_SUMS=1 and DEC_PDL_MAX_BATCH=0 each, then
#       bench_decode at 32k..128k with both as the variant rows
#       -> $OUT/pytest_decode.log, $OUT/profile.log, $OUT/decode_bench.json
#   bash .device/run bash benchmarks/gpu_session.sh compile
#       torch.compile (inductor, fullgraph) against eager on a two-layer bf16
#       model at 8k and 32k: graph breaks, errors, step times
#       -> $OUT/compile_bench.json, $OUT/compile.log
#   bash .device/run bash benchmarks/gpu_session.sh bench
#       paper128, deepseek_nsa, small_group at 8k..64k vs SDPA flash and
#       FlexAttention -> $OUT/h200.json, $OUT/h200.png, $OUT/bench.log
#   bash .device/run bash benchmarks/gpu_session.sh tune
#       nsa-dsl tune for paper128 (TUNE_PATTERN=examples/deepseek_nsa.nsa for
#       another) at 64k then 8k, slowest stages first (stops starting
#       candidates after TUNE_BUDGET_S, 500 s) -> $OUT/tuned/*.json
#       (commit those into nsa_dsl/tuned/: compile(tuned=True) ships them);
#       TUNE_LENGTHS=8192 for other lengths; the log is $OUT/tune_<pattern>.log;
#       TUNE_OBJECTIVE=kernels times the pass's kernels (profiler) instead of
#       the whole pass (here and in retune)
#   bash .device/run bash benchmarks/gpu_session.sh train
#       examples/train_tiny.py at T=4096 (one run at a time: side by side they
#       slowed each other 5x): nsa and dense with the default length
#       curriculum -> $OUT/train_tiny.{json,png,log}
#   bash .device/run bash benchmarks/gpu_session.sh bench-tuned
#       the benchmark with the tuned configurations (rows record them)
#   bash .device/run bash benchmarks/gpu_session.sh retune
#       after a change to one kernel, in ~8 minutes: the GPU tests that cover
#       it (RETUNE_TESTS, a pytest -k expression), a re-tune of that kernel
#       alone (RETUNE_KERNELS, from the tuned configuration, RETUNE_BUDGET_S),
#       and paper128 benchmarked with the result (unless RETUNE_BENCH=0) -> $OUT/h200_paper128.{json,png},
#       $OUT/retune.log, $OUT/tuned/*.json
#   bash .device/run bash benchmarks/gpu_session.sh loop-orders
#       the GPU tests of both selection forward loop orders, then both orders'
#       forward kernel times and wall time per pattern and length
#       (stage_times.py --wall, tuned base; LOOP_ORDER_SPECS pattern:T,T ...,
#       LOOP_ORDER_EXTRA one more config) -> $OUT/loop_orders.log; with
#       LOOP_ORDER_BENCH=examples/X.nsa that pattern's tuned benchmark too
#   bash .device/run bash benchmarks/gpu_session.sh fla
#       fla-core's parallel_nsa beside nsa_dsl (examples/bench_fla_like_nowindow.nsa:
#       fla's window branch needs flash-attn; FLA_PATTERNS for another);
#       needs benchmarks/fetch_fla_wheels.sh first and carry [".device", ".whl"]
#   bash .device/run bash benchmarks/gpu_session.sh tma
#       the descriptor (TMA) paths: their GPU tests, then paper128's forward
#       with each flag not yet timed on top of the tuned record, at 64k
#       (SLC_TMA, BC_FORCED_TMA) and 8k (SLC_TMA)
#       -> $OUT/pytest_tma.log, $OUT/tma.log (~4 minutes)
#   FLAG_TESTS=<pytest -k> FLAG_SPECS="pattern:T ..." FLAG_CONFIGS='{"A": 1};{"B": 1}' \
#     bash .device/run bash benchmarks/gpu_session.sh flags
#       those GPU tests, then the forward's stage times with each config on
#       top of the tuned record (FLAG_BACKWARD=1: the training pass's too;
#       FLAG_BACKWARD=only: the training pass's alone)
#       -> $OUT/pytest_flags.log, $OUT/flags.log
# (carry [".device"]), then copy $OUT's files to benchmarks/results/ and commit.
set -uo pipefail
OUT=${OUT:-/tmp/nsa_out}
mkdir -p "$OUT"
export NSA_DSL_GPU_LOG=$OUT/gpu_log.jsonl NSA_DSL_HYPOTHESIS_PROFILE=gpu PYTHONUNBUFFERED=1
export NSA_DSL_CACHE_DIR=${NSA_DSL_CACHE_DIR:-/tmp/nsa_dsl_cache}
case "${1:-}" in
  varlen)
    # issue 21 on the GPU: packs against each document alone (bf16, output and
    # every gradient), then the packed-documents benchmark -> $OUT/varlen.log,
    # $OUT/varlen_bench.json
    {
      for pattern in examples/bench_paper128.nsa examples/deepseek_nsa.nsa; do
        for range in ${VARLEN_RANGES:-4096:12288 768:1280}; do  # ~8 documents summing to 64k; ~64 of ~1k
          lengths=$(python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from bench_varlen import document_lengths as d; print(','.join(map(str, d(65536, ${range%%:*}, ${range##*:}, 1))))")
          timeout 120 python3 benchmarks/varlen_gpu.py --pattern "$pattern" --lengths "$lengths" 2>&1 | grep -v Warning
        done
      done
      timeout "${VARLEN_BENCH_TIMEOUT_S:-400}" python3 benchmarks/bench_varlen.py --out "$OUT"
    } 2>&1 | tee "$OUT/varlen.log" | tail -n 40 ;;
  decode)
    {
      timeout 200 python3 -m pytest tests/test_gpu.py -q -p timeout --timeout 150 -k "decode or graph or alignment" -rf 2>&1 \
        | tee "$OUT/pytest_decode.log" | tail -n 5
      timeout "${DECODE_BENCH_TIMEOUT_S:-380}" python3 benchmarks/bench_decode.py --out "$OUT" ${DECODE_PATTERNS:+--patterns "$DECODE_PATTERNS"} \
        ${DECODE_CONTEXTS:+--contexts "$DECODE_CONTEXTS"} $([ -d .flash_nsa ] && echo --flash-nsa .flash_nsa) \
        ${DECODE_PAGED:+--paged "$DECODE_PAGED"} ${DECODE_PREFILL:+--prefill-chunk "$DECODE_PREFILL"}
    } 2>&1 | tee "$OUT/decode.log" | tail -n 40 ;;
  decode-variants)
    {
      timeout 150 python3 -m pytest tests/test_gpu.py -q -p timeout --timeout 120 -rf \
        -k "decode_kernels or dependent or replays or last_positions" 2>&1 | tee "$OUT/pytest_decode.log" | tail -n 5
      timeout 150 python3 benchmarks/profile_decode.py --top 0 --steps 30 \
        --specs examples/bench_paper128.nsa:65536:29,examples/bench_paper128.nsa:131072:14,examples/bench_paper128.nsa:32768:1 \
        --variant DEC_BLOCK_SUMS=1 --variant DEC_PDL_MAX_BATCH=0 --variant DEC_BLOCK_SUMS=1,DEC_PDL_MAX_BATCH=0 \
        > "$OUT/profile.log" 2>&1
      grep -E "^==|dec_|all kernels" "$OUT/profile.log"
      timeout 200 python3 benchmarks/bench_decode.py --out "$OUT" --patterns examples/bench_paper128.nsa \
        --contexts 32768,65536,131072 $([ -d .flash_nsa ] && echo --flash-nsa .flash_nsa) \
        --variant DEC_BLOCK_SUMS=1 --variant DEC_PDL_MAX_BATCH=0
    } 2>&1 | tee "$OUT/decode.log" | tail -n 60 ;;
  tests)
    timeout "${TESTS_TIMEOUT_S:-560}" python3 -m pytest tests/test_gpu.py tests/test_module.py -q -p timeout --timeout 200 -rf 2>&1 \
      | tee "$OUT/pytest.log" | tail -n 20 ;;
  compile)
    # issue 23: a two-layer bf16 model with NSAttention, eager against
    # torch.compile(fullgraph=True, inductor) -> $OUT/compile_bench.json
    timeout "${COMPILE_TIMEOUT_S:-300}" python3 benchmarks/bench_compile.py --out "$OUT" \
      --lengths "${COMPILE_LENGTHS:-8k,32k}" 2>&1 | tee "$OUT/compile.log" | grep -v Warning | tail -n 8 ;;
  bench)
    timeout 570 python3 benchmarks/bench.py --out "$OUT" --budget-s 480 2>&1 | tee "$OUT/bench.log" | tail -n 40 ;;
  tune)
    # The slowest stages first (NOTES.md v3, paper128 at 64k), 64k before 8k;
    # a candidate compiles only the kernel it changes (~2-4 s each).
    timeout 560 python3 -m nsa_dsl.cli tune "${TUNE_PATTERN:-examples/bench_paper128.nsa}" --lengths "${TUNE_LENGTHS:-65536,8192}" -v \
      --kernels cmp_bwd,slc_bwd,slc_fwd,slc_fwd_bc,slc_topk,swa_bwd,cmp_fwd,swa_fwd --budget-s "${TUNE_BUDGET_S:-500}" --from-tuned \
      --objective "${TUNE_OBJECTIVE:-wall}" \
      --export "$OUT/tuned" 2>&1 | tee "$OUT/tune_$(basename "${TUNE_PATTERN:-bench_paper128}" .nsa).log" \
      | grep -v "^T=" | tail -n 20 ;;
  train)
    # The example's defaults: NSA then dense, 7000 steps with the auto length
    # curriculum (512, 1024, 2048, then 4096); ~5 + ~2.5 minutes.
    timeout 560 python3 examples/train_tiny.py --log-every 250 --eval-seqs 256 --out "$OUT/train_tiny" \
      > "$OUT/train_tiny.log" 2>&1
    grep -h "accuracy" "$OUT/train_tiny.log" ;;
  fla)
    # fla-core's parallel_nsa beside nsa_dsl on the pattern both compute
    # (carry [".device", ".whl"]; benchmarks/fetch_fla_wheels.sh makes .whl)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fla_site .whl/*.whl || exit 1
    PYTHONPATH=/tmp/fla_site:$PYTHONPATH timeout "${FLA_TIMEOUT_S:-500}" python3 benchmarks/bench.py --out "$OUT" --name h200_fla --fla \
      --patterns "${FLA_PATTERNS:-examples/bench_fla_like_nowindow.nsa}" --no-flex --no-cold-start ${FLA_LENGTHS:+--lengths "$FLA_LENGTHS"} 2>&1 | tee "$OUT/bench_fla.log" | tail -n 30 ;;
  retune)
    timeout "${RETUNE_TESTS_TIMEOUT_S:-100}" python3 -m pytest tests/test_gpu.py -q -p timeout --timeout 90 -rf \
      -k "${RETUNE_TESTS:-forward_matches_reference and 8192 or topk_heads or union_list}" 2>&1 \
      | tee "$OUT/pytest_retune.log" | tail -n 5
    timeout $(( ${RETUNE_BUDGET_S:-140} + 40 )) python3 -m nsa_dsl.cli tune examples/bench_paper128.nsa --lengths 65536,8192 -v \
      --kernels "${RETUNE_KERNELS:-slc_topk}" --budget-s "${RETUNE_BUDGET_S:-140}" --from-tuned --export "$OUT/tuned" \
      --objective "${TUNE_OBJECTIVE:-wall}" 2>&1 \
      | tee "$OUT/retune.log" | grep -v "^T=" | tail -n 5
    # the device tool returns a limited number of files: the configuration
    # also goes into the log, so it survives if the JSON is left out
    cat "$OUT"/tuned/*.json >> "$OUT/retune.log" 2>/dev/null
    # the machine's cache now holds the new configuration: --tuned runs it
    # (RETUNE_BENCH=0: not here, the full bench-tuned follows)
    [ "${RETUNE_BENCH:-1}" = 0 ] && exit 0
    timeout 230 python3 benchmarks/bench.py --out "$OUT" --name h200_paper128 --tuned --budget-s 180 \
      --patterns examples/bench_paper128.nsa 2>&1 | tee "$OUT/bench_paper128.log" | tail -n 14 ;;
  loop-orders)
    timeout 150 python3 -m pytest tests/test_gpu.py -q -p timeout --timeout 90 -rf \
      -k "loop_orders or block_centric" 2>&1 | tee "$OUT/pytest_loop_orders.log" | tail -n 5
    for spec in ${LOOP_ORDER_SPECS:-bench_small_group:8192,16384,32768,65536 bench_paper128:8192,65536 deepseek_nsa:8192,65536}; do
      for T in $(echo "${spec#*:}" | tr , ' '); do
        timeout 120 python3 benchmarks/stage_times.py "examples/${spec%%:*}.nsa" --length "$T" --tuned-base --wall \
          --calls 10 --config '{"slc_fwd": "group-centric"}' --config '{"slc_fwd": "block-centric"}' \
          ${LOOP_ORDER_EXTRA:+--config "$LOOP_ORDER_EXTRA"} 2>&1 | grep -v "UserWarning\|_warn_once" \
          | sed "s/^/${spec%%:*} /" | tee -a "$OUT/loop_orders.log"
      done
    done
    # LOOP_ORDER_BENCH=<pattern file>: that pattern's rows of the tuned benchmark
    [ -n "${LOOP_ORDER_BENCH:-}" ] && timeout 200 python3 benchmarks/bench.py --out "$OUT" --tuned --budget-s 170 \
      --no-cold-start --patterns "$LOOP_ORDER_BENCH" --name "h200_$(basename "$LOOP_ORDER_BENCH" .nsa)" 2>&1 \
      | tee "$OUT/bench_loop_orders.log" | tail -n 12 ;;
  bench-tuned)
    timeout 570 python3 benchmarks/bench.py --out "$OUT" --budget-s 480 --tuned 2>&1 | tee "$OUT/bench.log" \
      | tail -n 40 ;;
  tma)
    timeout 200 python3 -m pytest tests/test_gpu.py -q -p timeout --timeout 90 -rf -k "tensor_descriptors" 2>&1 \
      | tee "$OUT/pytest_tma.log" | tail -n 5
    S="python3 benchmarks/stage_times.py examples/bench_paper128.nsa --tuned-base --wall"
    timeout 120 $S --length 65536 --config '{}' --config '{"SLC_TMA": 1}' --config '{"BC_FORCED_TMA": 1}' \
      --config '{"SLC_TMA": 1, "BC_FORCED_TMA": 1}' 2>&1 | grep "^T=" | tee "$OUT/tma.log"
    timeout 60 $S --length 8192 --config '{}' --config '{"SLC_TMA": 1}' 2>&1 | grep "^T=" \
      | tee -a "$OUT/tma.log" ;;
  flags)
    # GPU tests (FLAG_TESTS, a pytest -k expression), then the forward's
    # stage times with each FLAG_CONFIGS config (';'-separated JSON) on top
    # of the tuned record, per FLAG_SPECS pattern:T ... (wall, 10+ calls)
    [ -n "${FLAG_TESTS:-}" ] && timeout "${FLAG_TESTS_TIMEOUT_S:-240}" python3 -m pytest tests/test_gpu.py -q -p timeout \
      --timeout 90 -rf -k "$FLAG_TESTS" 2>&1 | tee "$OUT/pytest_flags.log" | tail -n 5
    IFS=';' read -r -a configs <<< "${FLAG_CONFIGS:-}"
    args=(--config '{}')
    for c in "${configs[@]}"; do args+=(--config "$c"); done
    # FLAG_BACKWARD=1: each spec's training pass (forward + backward) too;
    # FLAG_BACKWARD=only: the training pass alone
    passes=("")
    [ -n "${FLAG_BACKWARD:-}" ] && passes=("" --backward)
    [ "${FLAG_BACKWARD:-}" = only ] && passes=(--backward)
    for spec in ${FLAG_SPECS:-bench_paper128:65536}; do
      for pass in "${passes[@]}"; do
        timeout "${FLAG_STAGE_TIMEOUT_S:-150}" python3 benchmarks/stage_times.py "examples/${spec%%:*}.nsa" \
          --length "${spec#*:}" --tuned-base --wall $pass "${args[@]}" 2>&1 | grep "^T=" \
          | sed "s/^/${spec%%:*} ${pass:+(fwd+bwd) }/" | tee -a "$OUT/flags.log"
      done
    done ;;
  *)
    echo "usage: gpu_session.sh tests|bench|tune|train|retune|bench-tuned|loop-orders|fla|tma|flags" >&2; exit 2 ;;
esac
