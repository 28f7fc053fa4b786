#!/usr/bin/env bash
# One device call for issue 20 (session 14): the GPU suite on the production
# paths, then the untuned patterns (benchmarks/untuned/run.sh, short tuning
# budget) as far as the call's time allows.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TESTS_TIMEOUT_S=${TESTS_TIMEOUT_S:-270} bash benchmarks/gpu_session.sh tests
cp "$OUT/pytest.log" "$OUT/gpu_pytest.log" 2>/dev/null
UNTUNED_BUDGET_S=${UNTUNED_BUDGET_S:-30} timeout "${UNTUNED_TIMEOUT_S:-280}" bash benchmarks/untuned/run.sh
