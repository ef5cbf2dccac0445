#!/bin/bash
# One device call: A/B of the working tree's CUDA kernels against a baseline tree.
#   locally:   bash dev/cuda/ab_base.sh --prepare [REV]   (default HEAD: git archive into .ab/base)
#   on device: bash dev/cuda/ab_base.sh [MIN_S]           (carry .ab)
# Builds both harnesses in parallel, runs the current one's correctness suite and
# compute-sanitizer memcheck on --small, then alternates timing runs base, cur, base,
# cur (`--bench MIN_S`; ROUNDS pairs, default 2) so clock drift hits both alike.
# VARIANTS="name:-DFLAG=1 name2:-DX=2" also builds the working tree with those
# extra nvcc flags (build-<name>) and times each variant in the same rotation.
# Logs in $OUT/ab.tgz, re-packed after every step so a call cut off by its time
# limit still returns what ran (the device returns only a few files). A bench
# pass of one tree takes ~40 s on the H100: BUDGET_S (default 540) skips the
# passes that would start after that many seconds.
set -uo pipefail
if [[ ${1:-} == --prepare ]]; then
  rm -rf .ab/base && mkdir -p .ab/base
  git archive "${2:-HEAD}" src include tests/cuda dev/cuda | tar -x -C .ab/base
  git rev-parse --short "${2:-HEAD}" > .ab/base/REV && echo "base: $(cat .ab/base/REV)"
  exit 0
fi
MIN_S=${1:-2048}
OUT=${OUT:-/tmp/orchard-out}
L=/tmp/ab && mkdir -p "$OUT" $L
snap() { (cd $L && tar czf "$OUT/ab.tgz" .); }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $L/gpu.txt
t0=$(date +%s)
build() {  # build <dir> <source dir> [extra nvcc flags]
  cmake -S "$2" -B "$1" -G Ninja -DORCHARD_CUDA_ARCHS=90 "-DCMAKE_CUDA_FLAGS=${3:-}" > $L/$1.log 2>&1 &&
    ninja -C "$1" -j8 >> $L/$1.log 2>&1 || { tail -40 $L/$1.log; return 1; }
}
NAMES=""
for v in ${VARIANTS:-}; do NAMES+="${v%%:*} "; done
build build-base .ab/base/dev/cuda &
for v in ${VARIANTS:-}; do flags=${v#*:}; build "build-${v%%:*}" dev/cuda "${flags//,/ }" & done
build build-dev dev/cuda || exit 1
wait
echo "builds: $(( $(date +%s) - t0 ))s (base $(cat .ab/base/REV))"
for who in dev $NAMES; do
  timeout 300 ./build-$who/cuda_check > $L/check-$who.log 2>&1; echo "cuda_check $who rc=$?"
  grep -E "FAIL|MISMATCH|DIFFERENT|cases passed" $L/check-$who.log | head -20
done
timeout 240 compute-sanitizer --tool memcheck --error-exitcode 3 ./build-dev/cuda_check --small > $L/memcheck.log 2>&1
echo "memcheck rc=$?"; grep -E "ERROR SUMMARY|FAIL" $L/memcheck.log | head -5
snap
for round in $(seq 1 ${ROUNDS:-2}); do
  for who in base dev $NAMES; do
    if (( $(date +%s) - t0 > ${BUDGET_S:-540} )); then echo "== $who round $round skipped (BUDGET_S)"; continue; fi
    timeout 200 ./build-$who/cuda_check --bench $MIN_S > $L/bench-$who-$round.log 2>&1
    echo "== $who round $round rc=$?"; grep -E "^ +[0-9]" $L/bench-$who-$round.log
    snap
  done
done
ls -la "$OUT"
