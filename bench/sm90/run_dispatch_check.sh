#!/usr/bin/env bash
# The sm90 forward through the library's dispatch (issue #11 step 3), on an H100/H200:
#   1. builds the dev/cuda harness (tests/cuda/cuda_check.cu + the whole CUDA backend) for
#      ORCHARD_CUDA_ARCHS=90 in the background, while bench/sm90/run_attn.sh runs;
#   2. cuda_check --sm90: the reference suite on both paths (sm90 where it applies, then
#      ORCHARD_SM90=0); each case prints the forward variant that ran;
#   3. cuda_check --bench on both paths (same binary, same card, same run; LIB_BENCH=0 skips).
# ATTN_BENCH=0 skips the forward bench; BWD_BENCH=1 runs the backward one (run_bwd.sh).
# Writes $OUT/dispatch.log (+ run_attn.sh's files).  Run from the repository root.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="${OUT:-/tmp/sm90_out}"
BH="${HARNESS_BUILD:-/tmp/build-sm90-harness}"
JOBS="${JOBS:-$(nproc)}"
mkdir -p "$OUT"
LOG="$OUT/dispatch.log"
stamp() { echo "=== $* ($(date -u +%H:%M:%S))" | tee -a "$LOG"; }
stamp "harness build (background, -j$JOBS)"
( t0=$(date +%s)
  cmake -S "$ROOT/dev/cuda" -B "$BH" -G Ninja -DORCHARD_CUDA_ARCHS=90 > "$OUT/harness_build.log" 2>&1 &&
  timeout "${BUILD_TIMEOUT:-300}" ninja -C "$BH" -j"$JOBS" cuda_check >> "$OUT/harness_build.log" 2>&1
  echo "harness build rc=$? in $(( $(date +%s) - t0 )) s" >> "$OUT/harness_build.log" ) &
bpid=$!
if [ "${ATTN_BENCH:-1}" = 1 ]; then OUT="$OUT" bash "$HERE/run_attn.sh" > /dev/null 2>&1; fi
# The backward bench (run_bwd.sh; BWD_BIN = a prebuilt sm90_bwd_bench) while the harness builds.
if [ "${BWD_BENCH:-0}" = 1 ]; then OUT="$OUT" BIN="${BWD_BIN:-}" bash "$HERE/run_bwd.sh" > /dev/null 2>&1; fi
wait $bpid
tail -1 "$OUT/harness_build.log" | tee -a "$LOG"
[ -x "$BH/cuda_check" ] || { grep -E "error" "$OUT/harness_build.log" | head -20 | tee -a "$LOG"; exit 1; }
stamp "cuda_check --sm90"
timeout "${SUITE_TIMEOUT:-150}" "$BH/cuda_check" --sm90 > "$OUT/suite_sm90.log" 2>&1
echo "rc=$?" | tee -a "$LOG"
grep -E "cases passed|FAIL|variant cuda.(fwd|bwd).sm90" "$OUT/suite_sm90.log" | sort | uniq -c | sort -rn | head -40 | tee -a "$LOG"
[ "${LIB_BENCH:-1}" = 1 ] && for sm90 in 1 0; do
  stamp "cuda_check --bench ${BENCH_MIN_S:-512} (ORCHARD_SM90=$sm90)"
  ORCHARD_SM90=$sm90 timeout "${BENCH_TIMEOUT:-45}" "$BH/cuda_check" --bench "${BENCH_MIN_S:-512}" >> "$LOG" 2>&1
done
stamp "done"
