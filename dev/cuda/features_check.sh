#!/bin/bash
# Device check of the CUDA feature work (sliding window, softcap, ALiBi, varlen,
# attention sinks + dsink; issue #16), in one device call of <= 600 s.
#
#   locally:   bash dev/cuda/features_check.sh --prepare [REV]   (default aa21885, the
#              tree before the features: git archive into .ab/features_base, for the plain-path A/B)
#   on device: bash dev/cuda/features_check.sh [all|check|sanitize|bench]   (carry .ab)
#
#   check:    build (16 cores), cuda_check (whole suite incl. the feature cases),
#             compute-sanitizer memcheck on `cuda_check --small` (one case per kernel
#             family + 4 feature cases)
#   bench:    plain-path timing, base tree (build-fbase) vs this tree, alternating, two
#             rounds (`--bench MIN_S`, MIN_S default 4096: d64/d128 x causal x s4k..16k,
#             fwd/bwd/det TFLOP/s)
#   sanitize: racecheck and synccheck on `cuda_check --small`
#   all:      check, then bench, then sanitize; a step that would start too close to
#             BUDGET_S (default 520) seconds is skipped (rerun it alone on the warm machine).
# A warm machine reuses build-feat / build-base (ninja rebuilds what changed).
# Logs: $OUT/features.tgz (re-packed after every step, so a call cut off by its time
# limit still returns what ran) plus a summary on stdout.
set -uo pipefail
if [[ ${1:-} == --prepare ]]; then
  rm -rf .ab/features_base && mkdir -p .ab/features_base
  git archive "${2:-aa21885}" src include tests/cuda dev/cuda | tar -x -C .ab/features_base
  git rev-parse --short "${2:-aa21885}" > .ab/features_base/REV && echo "base: $(cat .ab/features_base/REV)"
  exit 0
fi
MODE=${1:-all}
MIN_S=${MIN_S:-4096}
BUDGET_S=${BUDGET_S:-520}
OUT=${OUT:-/tmp/orchard-out}
L=/tmp/features && mkdir -p "$OUT" $L
snap() { (cd $L && tar czf "$OUT/features.tgz" .); }
t0=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - t0) )); }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee $L/gpu.txt
build() {  # build <dir> <source dir> <jobs>
  cmake -S "$2" -B "$1" -G Ninja -DORCHARD_CUDA_ARCHS=90 > $L/$1.log 2>&1 &&
    ninja -C "$1" -j"$3" >> $L/$1.log 2>&1 || { echo "BUILD FAILED: $1"; tail -40 $L/$1.log; return 1; }
}
HAVE_BASE=0
if [[ ($MODE == all || $MODE == bench) && -d .ab/features_base/dev/cuda ]]; then
  HAVE_BASE=1
  build build-fbase .ab/features_base/dev/cuda 8 &
fi
build build-feat dev/cuda 16 || { snap; exit 1; }
echo "build: $(( $(date +%s) - t0 ))s; ptxas spill warnings: $(grep -c 'spill' $L/build-feat.log)"
BIN=./build-feat/cuda_check
rc=0

if [[ $MODE == all || $MODE == check ]]; then
  t1=$(date +%s)
  timeout 300 $BIN > $L/check.log 2>&1; r=$?
  echo "cuda_check rc=$r ($(( $(date +%s) - t1 ))s)"; (( r != 0 )) && rc=1
  grep -E "FAIL|MISMATCH|DIFFERENT|unsupported|cases passed|check_support|CUDA error" $L/check.log | head -40
  # Which case failed, with its lines (the case header precedes its checks).
  grep -B8 "=> FAIL" $L/check.log | grep -E "^\[|FAIL|NaN" | head -40
  snap
  t1=$(date +%s)
  timeout 200 compute-sanitizer --tool memcheck --error-exitcode 3 $BIN --small > $L/memcheck.log 2>&1; r=$?
  echo "memcheck rc=$r ($(( $(date +%s) - t1 ))s): $(grep -E 'ERROR SUMMARY' $L/memcheck.log | tail -1)"
  (( r != 0 )) && rc=1 && grep -E "=> FAIL|Invalid|out of bounds|at 0x" $L/memcheck.log | head -12
  snap
fi
if [[ $MODE == all || $MODE == bench ]]; then
  wait  # the base build
  if [[ $HAVE_BASE == 1 && -x build-fbase/cuda_check ]]; then
    echo "bench: base $(cat .ab/features_base/REV 2>/dev/null) vs this tree, bf16, s >= $MIN_S (TFLOP/s fwd / bwd / bwd-det)"
    for round in 1 2; do
      for who in fbase feat; do
        if (( $(left) < 60 )); then echo "== $who round $round skipped (BUDGET_S)"; continue; fi
        timeout 120 ./build-$who/cuda_check --bench $MIN_S > $L/bench-$who-$round.log 2>&1
        echo "== $who round $round rc=$?"; grep -E "^ +[0-9]" $L/bench-$who-$round.log
        snap
      done
    done
  else
    echo "bench: no base tree (.ab/features_base: run --prepare locally and carry .ab); this tree only"
    timeout 120 $BIN --bench $MIN_S > $L/bench-feat.log 2>&1; echo "bench rc=$?"; grep -E "^ +[0-9]" $L/bench-feat.log
  fi
  snap
fi
if [[ $MODE == all || $MODE == sanitize ]]; then
  for tool in racecheck synccheck; do
    if (( $(left) < 120 )); then echo "$tool skipped (BUDGET_S)"; continue; fi
    t1=$(date +%s)
    timeout 180 compute-sanitizer --tool $tool --error-exitcode 3 $BIN --small > $L/$tool.log 2>&1; r=$?
    echo "$tool rc=$r ($(( $(date +%s) - t1 ))s): $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' $L/$tool.log | tail -1)"
    (( r != 0 )) && rc=1
    snap
  done
fi
echo "total $(( $(date +%s) - t0 ))s"
exit $rc
