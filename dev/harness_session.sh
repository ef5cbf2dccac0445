#!/bin/bash
# One device call that checks several source trees' CUDA kernels side by side with
# the kernel harness (tests/cuda/cuda_check.cu, built from dev/cuda/CMakeLists.txt):
# every tree is built in parallel (16 cores shared), then for each tree the full
# correctness suite and compute-sanitizer memcheck on `cuda_check --small`, then the
# plain-path TFLOP/s of every tree, alternating, two rounds (A/B against the first
# tree, normally main's).
#
#   locally:   git archive <rev> | tar -x -C .ab/<name>  (one folder per tree; carry .ab)
#   on device: bash dev/harness_session.sh [--bench MIN_S] [--pre CMD] .ab/main .ab/width ...
#
# --pre CMD runs CMD (e.g. another tree's standalone benchmark script) in the
# background while the harnesses build; its output lands in $OUT/logs/pre.log.
# Logs: $OUT/logs/*.log, packed into $OUT/harness.tgz after every step.
set -uo pipefail
MIN_S=""
PRE=""
while [[ ${1:-} == --* ]]; do
  case "$1" in
    --bench) MIN_S=$2; shift 2 ;;
    --pre) PRE=$2; shift 2 ;;
    *) echo "unknown option $1"; exit 2 ;;
  esac
done
OUT=${OUT:-/tmp/orchard-out}
L="$OUT/logs" && mkdir -p "$L"
snap() { (cd "$OUT" && tar czf harness.tgz logs); }
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$L/gpu.txt"
name_of() { basename "$1"; }
if [[ -n $PRE ]]; then (bash -c "$PRE" > "$L/pre.log" 2>&1; echo "pre rc=$?" >> "$L/pre.log") & PRE_PID=$!; fi
jobs_each=$(( 16 / $# )); (( jobs_each < 2 )) && jobs_each=2
BUILD_PIDS=()
for tree in "$@"; do
  n=$(name_of "$tree")
  ( cmake -S "$tree/dev/cuda" -B "build-h-$n" -G Ninja -DORCHARD_CUDA_ARCHS=90 > "$L/build-$n.log" 2>&1 &&
      ninja -C "build-h-$n" -j"$jobs_each" >> "$L/build-$n.log" 2>&1; echo $? > "build-h-$n.rc" ) &
  BUILD_PIDS+=($!)
done
wait "${BUILD_PIDS[@]}"
for tree in "$@"; do
  n=$(name_of "$tree")
  rc=$(cat "build-h-$n.rc" 2>/dev/null || echo 1)
  stamp "build $n rc=$rc, spill warnings: $(grep -c 'spill' "$L/build-$n.log")"
  [[ $rc != 0 ]] && grep -E "error|Error" "$L/build-$n.log" | head -20
done
snap
rc_all=0
for tree in "$@"; do
  n=$(name_of "$tree")
  BIN=./build-h-$n/cuda_check
  [[ -x $BIN ]] || { rc_all=1; continue; }
  timeout 240 $BIN > "$L/check-$n.log" 2>&1; r=$?
  stamp "$n cuda_check rc=$r: $(grep -E 'cases passed' "$L/check-$n.log")"; (( r != 0 )) && rc_all=1
  grep -B8 "=> FAIL" "$L/check-$n.log" | grep -E "^\[|FAIL|NaN" | head -30
  timeout 150 compute-sanitizer --tool memcheck --error-exitcode 3 $BIN --small > "$L/memcheck-$n.log" 2>&1; r=$?
  stamp "$n memcheck rc=$r: $(grep -E 'ERROR SUMMARY' "$L/memcheck-$n.log" | tail -1)"; (( r != 0 )) && rc_all=1
  (( r != 0 )) && grep -E "=> FAIL|Invalid|out of bounds|at 0x" "$L/memcheck-$n.log" | head -12
  snap
done
if [[ -n $MIN_S ]]; then
  stamp "plain-path bench, bf16, s >= $MIN_S (TFLOP/s fwd / bwd / bwd-det)"
  for round in 1 2; do
    for tree in "$@"; do
      n=$(name_of "$tree")
      [[ -x ./build-h-$n/cuda_check ]] || continue
      timeout 100 ./build-h-$n/cuda_check --bench "$MIN_S" > "$L/bench-$n-$round.log" 2>&1
      echo "== $n round $round rc=$?"; grep -E "^ +[0-9]" "$L/bench-$n-$round.log"
      snap
    done
  done
fi
if [[ -n $PRE ]]; then wait "$PRE_PID"; stamp "pre:"; cat "$L/pre.log" | tail -40; fi
snap
stamp "done rc=$rc_all"
exit $rc_all
