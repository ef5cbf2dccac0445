#!/usr/bin/env bash
# Issue #15: A/B of CPU-only package builds on the GPU machine's 16-core host, in one device call
# (no dev/gpu_session.sh build: each tree gets its own site dir, ~25 s). Prints the host's topology
# and memory policy first. Trees: AB_TREES="name=dir ..." (default: old=.ab/old new=.);
# - AB_ROUNDS (default 2) rounds of bench/cpu_region_probe.py on every tree in turn (PROBE_POINTS,
#   PROBE_THREADS, PROBE_REPS, PROBE_ARGS: more probe options, e.g. --copy);
# - AB_GRID=N rounds of the full cpu_bench grid on every tree in turn;
# - AB_ENVS="NAME=VALUE[:NAME=VALUE] ..." ("-": none): the probe once more on the last tree under each,
#   one process each (the AMX tile knobs are read once per process).
#   run: OUT=$OUT bash dev/cpu_ab_probe.sh     (logs under $OUT/logs)
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$ROOT/gpu_out}"; mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1
TREES="${AB_TREES:-old=.ab/old new=.}"
lscpu | grep -E "Model name|^CPU\(s\)|Thread|Core|Socket|NUMA|L1d|L2|L3"
for f in /proc/sys/kernel/numa_balancing /sys/kernel/mm/transparent_hugepage/enabled; do
  echo "$f: $(cat $f 2>/dev/null)"
done
# probe SITE [ENV...]: the region probe on one build, under the given environment settings.
probe() {
  local site=$1; shift
  env "$@" PYTHONPATH=/tmp/site_$site OMP_NUM_THREADS=${PROBE_THREADS:-16} python3 "$ROOT/bench/cpu_region_probe.py" \
    --points "${PROBE_POINTS:-0,1,2,3,4,5}" --reps "${PROBE_REPS:-20}" ${PROBE_ARGS:-} 2>&1 | grep -E "^\| [0-9]|^\(torch copy"
}
for spec in $TREES; do
  name=${spec%%=*}; dir=$(cd "$ROOT/${spec#*=}" && pwd)
  (cd "$dir" && rm -rf build/cp3* && ORCHARD_CUDA=OFF CMAKE_BUILD_PARALLEL_LEVEL=16 \
    python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/site_$name . > "$OUT/logs/build_$name.log" 2>&1) \
    || { echo "build $name failed"; tail -30 "$OUT/logs/build_$name.log"; exit 1; }
  echo "built $name from $dir ($(cat "$dir/COMMIT" 2>/dev/null || echo working tree))"
done
for r in $(seq 1 "${AB_ROUNDS:-2}"); do
  for spec in $TREES; do
    name=${spec%%=*}
    echo "## round $r: $name"
    probe "$name" | tee -a "$OUT/logs/ab_$name.md"
  done
done
for r in $(seq 1 "${AB_GRID:-0}"); do
  for spec in $TREES; do
    name=${spec%%=*}
    echo "## grid round $r: $name, ${PROBE_THREADS:-16} threads"
    PYTHONPATH=/tmp/site_$name OMP_NUM_THREADS=${PROBE_THREADS:-16} timeout "${GRID_TIMEOUT:-300}" python3 \
      "$ROOT/bench/cpu_bench.py" --grid full --clock wall --reps 3 --min-time 0.5 | tee "$OUT/logs/grid_${name}_$r.md"
  done
done
last=${TREES##* }; last=${last%%=*}
for e in ${AB_ENVS:-}; do
  echo "## env $e on $last"
  if [ "$e" = - ]; then probe "$last"; else probe "$last" ${e//:/ }; fi
done
