#!/usr/bin/env bash
# sm90 attention forward bench (issue #11): build (one nvcc), ptxas/SASS check, correctness on
# ragged/GQA/causal shapes, timing grid, torch SDPA peers (cuDNN, FA2) in the same run.
# Run from the repository root on an H100/H200:  bash bench/sm90/run_attn.sh
# Writes $OUT/attn_build.log, $OUT/attn_sass.txt, $OUT/attn_bench.log (checks, timing, peers).
# An experiment on one bucket: BUCKET=192 MODE=d192 (builds that bucket only; the bench's modes:
# all, checks, grid, quick, causal, d<head dim>) with PEER_GRID=d192 (attn_peers.py's shapes).
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="${OUT:-/tmp/sm90_out}"
NVCC="${NVCC:-nvcc}"
BIN="${BUILD_DIR:-$OUT/build}/sm90_attn_bench"
mkdir -p "$OUT" "$(dirname "$BIN")"
LOG="$OUT/attn_bench.log"
status=0
echo "=== build $(date -u +%H:%M:%S)" | tee -a "$LOG"
t0=$(date +%s.%N)
if ! timeout 400 "$NVCC" -O3 -std=c++20 -gencode=arch=compute_90a,code=sm_90a -lineinfo -Xptxas -v \
    -DSM90_BENCH_BUCKET="${BUCKET:-0}" -I"$ROOT/include" -I"$ROOT/src" -o "$BIN" "$HERE/sm90_attn_bench.cu" > "$OUT/attn_build.log" 2>&1; then
  echo "BUILD FAILED"; tail -30 "$OUT/attn_build.log"; exit 1
fi
echo "build took $(awk "BEGIN{print $(date +%s.%N) - $t0}") s" | tee -a "$LOG"
grep -A3 "Compiling entry function '_ZN7orchard4sm9021flash_fwd_sm90" "$OUT/attn_build.log" \
  | grep -E "spill|Used" | sort | uniq -c | tee -a "$LOG"
if grep -A2 "flash_fwd_sm90" "$OUT/attn_build.log" | grep -qE "[1-9][0-9]* bytes spill"; then echo "WARNING: spills" | tee -a "$LOG"; status=1; fi
grep -E "C7508|C7510|serializ" "$OUT/attn_build.log" | tee -a "$LOG"
CUOBJDUMP="${CUOBJDUMP:-$(command -v cuobjdump || echo "$(dirname "$(command -v "$NVCC")")/cuobjdump")}"
timeout 120 "$CUOBJDUMP" -sass "$BIN" > "$OUT/full.sass" 2>/dev/null
{
  echo "HGMMA count (all kernels): $(grep -c HGMMA "$OUT/full.sass")"
  echo "LDL/STL count (all kernels, incl. reference): $(grep -cE '\bLDL|\bSTL' "$OUT/full.sass")"
} | tee -a "$LOG" > "$OUT/attn_sass.txt"
rm -f "$OUT/full.sass"
if [ -n "${MODE:-}" ]; then
  echo "=== $MODE $(date -u +%H:%M:%S)" | tee -a "$LOG"
  timeout 240 "$BIN" "$MODE" >> "$LOG" 2>&1 || { echo "$MODE rc=$?" | tee -a "$LOG"; status=1; }
else
  echo "=== checks $(date -u +%H:%M:%S)" | tee -a "$LOG"
  timeout 90 "$BIN" checks >> "$LOG" 2>&1 || { echo "checks rc=$?" | tee -a "$LOG"; status=1; }
  echo "=== grid $(date -u +%H:%M:%S)" | tee -a "$LOG"
  timeout 200 "$BIN" grid >> "$LOG" 2>&1 || { echo "grid rc=$?" | tee -a "$LOG"; status=1; }
fi
if [ "${PEERS:-1}" = 1 ]; then
  echo "=== peers (torch SDPA) $(date -u +%H:%M:%S)" | tee -a "$LOG"
  timeout 150 python3 "$HERE/attn_peers.py" >> "$LOG" 2>&1 || echo "peers rc=$?" | tee -a "$LOG"
fi
grep -E "CHECK|TIME|PEER|failing" "$LOG"
exit $status
