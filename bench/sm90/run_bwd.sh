#!/usr/bin/env bash
# sm90 attention backward bench (issue #11): build (one nvcc, unless BIN names a prebuilt
# binary), correctness on ragged / GQA / causal (both alignments) shapes for the sm90 and the
# sm80 backward, timing grid (sm90 vs sm80 interleaved), torch SDPA peers (cuDNN, FA2) in the
# same run.  Run from the repository root on an H100/H200:  bash bench/sm90/run_bwd.sh
# Writes $OUT/bwd_bench.log (+ $OUT/bwd_build.log when it builds).
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="${OUT:-/tmp/sm90_out}"
NVCC="${NVCC:-nvcc}"
mkdir -p "$OUT"
LOG="$OUT/bwd_bench.log"
status=0
# A prebuilt binary that does not start here (other glibc, ...) is rebuilt.
if [ -n "${BIN:-}" ] && ! "$BIN" none > /dev/null 2>&1; then echo "prebuilt $BIN does not run: building" | tee -a "$LOG"; BIN=""; fi
if [ -z "${BIN:-}" ]; then
  BIN="${BUILD_DIR:-$OUT/build}/sm90_bwd_bench"
  mkdir -p "$(dirname "$BIN")"
  echo "=== build $(date -u +%H:%M:%S)" | tee -a "$LOG"
  if ! timeout 500 "$NVCC" -O3 -std=c++20 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -lineinfo \
      -Xptxas -v -I"$ROOT/include" -I"$ROOT/src" -o "$BIN" "$HERE/sm90_bwd_bench.cu" > "$OUT/bwd_build.log" 2>&1; then
    echo "BUILD FAILED"; tail -30 "$OUT/bwd_build.log"; exit 1
  fi
fi
echo "=== checks $(date -u +%H:%M:%S)" | tee -a "$LOG"
timeout "${CHECK_TIMEOUT:-120}" "$BIN" checks >> "$LOG" 2>&1 || { echo "checks rc=$?" | tee -a "$LOG"; status=1; }
echo "=== grid $(date -u +%H:%M:%S)" | tee -a "$LOG"
if [ $status = 0 ] || [ "${GRID_ANYWAY:-0}" = 1 ]; then
  timeout "${GRID_TIMEOUT:-120}" "$BIN" grid >> "$LOG" 2>&1 || { echo "grid rc=$?" | tee -a "$LOG"; status=1; }
else
  echo "grid skipped: checks failed" | tee -a "$LOG"
fi
if [ "${PEERS:-1}" = 1 ]; then
  echo "=== peers (torch SDPA) $(date -u +%H:%M:%S)" | tee -a "$LOG"
  timeout "${PEER_TIMEOUT:-120}" python3 "$HERE/bwd_peers.py" >> "$LOG" 2>&1 || echo "peers rc=$?" | tee -a "$LOG"
fi
echo "=== done $(date -u +%H:%M:%S)" | tee -a "$LOG"
grep -E "CHECK|TIME|PEER|error|rc=" "$LOG"
exit $status
