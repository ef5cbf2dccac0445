#!/usr/bin/env bash
# Issue #15: A/B of two CPU-only package builds on the GPU machine's 16-core host, in one device call
# (no dev/gpu_session.sh build: each tree gets its own site dir). Trees: AB_TREES="name=dir ..."
# (default: old=.ab/old new=.); each round runs bench/cpu_region_probe.py (PROBE_POINTS, PROBE_THREADS)
# on every tree in turn, AB_ROUNDS rounds; AB_GRID=N rounds of the full cpu_bench grid on every tree;
# AB_ENVS: the probe on the last tree under each environment setting.
#   run: OUT=$OUT bash dev/cpu_ab_probe.sh     (logs under $OUT/logs)
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$ROOT/gpu_out}"; mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1
for spec in ${AB_TREES:-old=.ab/old new=.}; do
  name=${spec%%=*}; dir=$(cd "$ROOT/${spec#*=}" && pwd)
  (cd "$dir" && rm -rf build/cp3* && ORCHARD_CUDA=OFF CMAKE_BUILD_PARALLEL_LEVEL=16 \
    python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/site_$name . > "$OUT/logs/build_$name.log" 2>&1) \
    || { echo "build $name failed"; tail -30 "$OUT/logs/build_$name.log"; exit 1; }
  echo "built $name from $dir ($(cat "$dir/COMMIT" 2>/dev/null || echo working tree))"
done
for r in $(seq 1 "${AB_ROUNDS:-2}"); do
  for spec in ${AB_TREES:-old=.ab/old new=.}; do
    name=${spec%%=*}
    echo "## round $r: $name"
    PYTHONPATH=/tmp/site_$name OMP_NUM_THREADS=${PROBE_THREADS:-16} python3 "$ROOT/bench/cpu_region_probe.py" \
      --points "${PROBE_POINTS:-0,1,2,3,4,5}" --reps "${PROBE_REPS:-20}" 2>&1 | grep -E "^\| [0-9]" | tee -a "$OUT/logs/ab_$name.md"
  done
done
# AB_GRID=N: N rounds of the full cpu_bench grid on every tree in turn.
for r in $(seq 1 "${AB_GRID:-0}"); do
  for spec in ${AB_TREES:-old=.ab/old new=.}; do
    name=${spec%%=*}
    echo "## grid round $r: $name, ${PROBE_THREADS:-16} threads"
    PYTHONPATH=/tmp/site_$name OMP_NUM_THREADS=${PROBE_THREADS:-16} timeout "${GRID_TIMEOUT:-300}" python3 \
      "$ROOT/bench/cpu_bench.py" --grid full --clock wall --reps 3 --min-time 0.5 | tee "$OUT/logs/grid_${name}_$r.md"
  done
done
# AB_ENVS="NAME=VALUE[:NAME=VALUE] ...": the probe once more on the last tree under each (one process each).
last=${AB_TREES:-old=.ab/old new=.}; last=${last##* }; last=${last%%=*}
for e in ${AB_ENVS:-}; do
  echo "## env $e on $last"
  env ${e//:/ } PYTHONPATH=/tmp/site_$last OMP_NUM_THREADS=${PROBE_THREADS:-16} python3 "$ROOT/bench/cpu_region_probe.py" \
    --points "${PROBE_POINTS:-0,1,2,3,4,5}" --reps "${PROBE_REPS:-20}" 2>&1 | grep -E "^\| [0-9]"
done
