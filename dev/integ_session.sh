#!/bin/bash
# One device call on a 2-GPU machine (nvidia-h200-x2, 32 cores) that checks an
# integrated tree end to end, the two GPUs running two tracks side by side:
#   build:  the kernel harness (dev/cuda) and the Python package (CUDA, sm_90),
#           in parallel, 16 jobs each;
#   GPU 1:  cuda_check (whole suite), compute-sanitizer memcheck on `cuda_check --small`,
#           then the GPU1_STEPS;
#   GPU 0:  the GPU0_STEPS (dev/gpu_session.sh steps: pytest:..., decode_bench, ...);
#   both:   the ALL_STEPS (e.g. the 2-GPU distributed tests) once both tracks are done.
#
#   on device: bash dev/integ_session.sh TREE   (TREE: an archived tree, e.g. .ab/integ; carry .ab)
#   env: FIRST_STEPS (run on both GPUs right after the build), GPU0_STEPS, GPU1_STEPS, ALL_STEPS
#        (space-separated gpu_session.sh steps), BUDGET_S (570), MEMCHECK (1; 0 skips memcheck),
#        CUDA_CHECK_ARGS (e.g. --sm90), CUDA_CHECK_TIMEOUT (240)
# Logs: $OUT/track*.log and $OUT/logs.tgz (every step's log; packed at the end).
# Each step has its own time limit (gpu_session.sh); keep the call's timeout above BUDGET_S.
set -uo pipefail
TREE=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/orchard-out}; mkdir -p "$OUT/logs"
BUDGET_S=${BUDGET_S:-570}
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name,clocks.sm,clocks.max.sm --format=csv,noheader
[ -f "$TREE/COMMIT" ] && export ORCHARD_COMMIT=$(cat "$TREE/COMMIT")
stamp "build $TREE (${ORCHARD_COMMIT:-?})"
( cmake -S "$TREE/dev/cuda" -B /tmp/build-harness -G Ninja -DORCHARD_CUDA_ARCHS=90 > "$OUT/logs/build_harness.log" 2>&1 &&
    ninja -C /tmp/build-harness -j16 >> "$OUT/logs/build_harness.log" 2>&1; echo "harness build rc=$?" ) &
HB=$!
( cd "$TREE" && rm -rf /tmp/orchard_site && ORCHARD_CUDA=ON ORCHARD_CUDA_ARCHS=90 CMAKE_BUILD_PARALLEL_LEVEL=16 \
    python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/orchard_site . > "$OUT/logs/build.log" 2>&1;
  r=$?; [ $r = 0 ] && GPU_ARCHS=90 bash "$ROOT/dev/source_hash.sh" "$TREE" > /tmp/orchard_site/.built; echo "package build rc=$r" ) &
PB=$!
wait $HB $PB
stamp "built; harness ptxas spill warnings: $(grep -c spill "$OUT/logs/build_harness.log")"
[ -f /tmp/orchard_site/.built ] || tail -30 "$OUT/logs/build.log"
[ -x /tmp/build-harness/cuda_check ] || grep -E "error" "$OUT/logs/build_harness.log" | head -20
left() { echo $(( BUDGET_S - ($(date +%s) - t0) )); }
# FIRST_STEPS: steps that need both GPUs and must not be squeezed out by the tracks' time.
if [ -n "${FIRST_STEPS:-}" ] && [ -f /tmp/orchard_site/.built ]; then
  OUT=$OUT bash "$ROOT/dev/gpu_session.sh" SRC="$TREE" $FIRST_STEPS > "$OUT/first.log" 2>&1
  stamp "first steps done"; cat "$OUT/first.log"
fi

track1() {
  export CUDA_VISIBLE_DEVICES=1
  if [ -x /tmp/build-harness/cuda_check ]; then
    timeout "${CUDA_CHECK_TIMEOUT:-240}" /tmp/build-harness/cuda_check ${CUDA_CHECK_ARGS:-} > "$OUT/logs/cuda_check.log" 2>&1
    stamp "cuda_check rc=$?: $(grep -E 'cases passed' "$OUT/logs/cuda_check.log")"
    grep -B8 "=> FAIL" "$OUT/logs/cuda_check.log" | grep -E "^\[|FAIL|NaN" | head -30
    [ "${MEMCHECK:-1}" = 1 ] && (( $(left) > 160 )) && timeout 150 compute-sanitizer --tool memcheck --error-exitcode 3 /tmp/build-harness/cuda_check --small \
      > "$OUT/logs/memcheck_small.log" 2>&1
    stamp "memcheck --small rc=$?: $(grep -E 'ERROR SUMMARY' "$OUT/logs/memcheck_small.log" | tail -1)"
  fi
  [ -n "${GPU1_STEPS:-}" ] && (( $(left) > 60 )) && OUT=$OUT bash "$ROOT/dev/gpu_session.sh" SRC="$TREE" $GPU1_STEPS
}
track0() {
  export CUDA_VISIBLE_DEVICES=0
  [ -n "${GPU0_STEPS:-}" ] && OUT=$OUT bash "$ROOT/dev/gpu_session.sh" SRC="$TREE" $GPU0_STEPS
}
track1 > "$OUT/track1.log" 2>&1 &
T1=$!
track0 > "$OUT/track0.log" 2>&1 &
T0=$!
wait $T0 $T1
stamp "tracks done"
echo "---- track 1 (GPU 1)"; cat "$OUT/track1.log"
echo "---- track 0 (GPU 0)"; cat "$OUT/track0.log"
if [ -n "${ALL_STEPS:-}" ] && (( $(left) > 60 )); then
  OUT=$OUT bash "$ROOT/dev/gpu_session.sh" SRC="$TREE" $ALL_STEPS
fi
# At most 8 files come back from $OUT: the logs travel as one archive.
(cd "$OUT" && tar czf logs.tgz logs && rm -rf logs)
stamp "done"
