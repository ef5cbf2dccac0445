#!/usr/bin/env bash
# One device call for the sm90 backward's packed dropout (written in session 64, not yet run): the
# package build with ORCHARD_SM90_BWD_DROP_PACKED=1 (gpu_session.sh's, in the background) overlapping
# the kernel-bench A/B's build, then the A/B (bits against packed, SM90_BWD_BENCH_DROPOUT=0.1,
# D=${D:-64}), then on the packed package `pytest -k dropout` and bench/sm90_dropout_bench.py
# (forward + backward against FA2, --dims ${DIMS:-64}). If both pass and the A/B favours packed, flip
# the switch's default in flash_bwd_sm90.cuh.
# From the repository root on an H100 / H200; logs under $OUT.
set -uo pipefail
OUT="${OUT:-/tmp/bwd_drop_out}"; mkdir -p "$OUT/logs"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
# gpu_session.sh with no step: the build alone (CMake takes CUDAFLAGS on a fresh configure; the
# source hash does not see it, so the build is forced).
export CUDAFLAGS="-DORCHARD_SM90_BWD_DROP_PACKED=1"
rm -f /tmp/orchard_site/.built
OUT="$OUT" bash dev/gpu_session.sh > "$OUT/logs/build_session.log" 2>&1 &
build=$!
stamp "A/B D=${D:-64}"
OUT="$OUT/ab" D="${D:-64}" SM90_BWD_BENCH_DROPOUT=0.1 ROUNDS="${ROUNDS:-3}" \
  VARIANTS="bits= packed=-DORCHARD_SM90_BWD_DROP_PACKED=1" timeout "${AB_TIMEOUT:-330}" bash bench/sm90/ab_bwd.sh \
  > /dev/null 2>&1
grep -v '^TIME\|^===' "$OUT/ab/ab_bwd.log" | tail -20
wait $build; stamp "package build rc=$?"; tail -3 "$OUT/logs/build_session.log"
OUT="$OUT" PYTEST_TIMEOUT=150 PY_TIMEOUT=${BENCH_TIMEOUT:-120} bash dev/gpu_session.sh pytest:-k,dropout \
  "py:bench/sm90_dropout_bench.py --reps 15 --dims ${DIMS:-64} --seqs 2048,8192"
stamp done
