#!/usr/bin/env bash
# Issue #15, on the GPU machine's 16-core host (a step: dev/gpu_session.sh sh:dev/cpu_stage_probe.sh):
# why the CPU forward's K / V staging region does not speed up from 4 to 16 threads (session 60's
# region trace). The host's topology and memory policy, then bench/cpu_region_probe.py on the
# staging-heavy points (PROBE_POINTS) with torch's own copy of the same bytes, under each of
# PROBE_ENVS (NAME=VALUE[:NAME=VALUE...], one process each; "-" = none).
set -uo pipefail
lscpu | grep -E "Model name|^CPU\(s\)|Thread|Core|Socket|NUMA|L1d|L2|L3"
for f in /proc/sys/kernel/numa_balancing /sys/kernel/mm/transparent_hugepage/enabled; do
  echo "$f: $(cat $f 2>/dev/null)"
done
for e in ${PROBE_ENVS:--}; do
  echo "## env: $e"
  env $( [ "$e" = - ] || echo "${e//:/ }") OMP_NUM_THREADS=${PROBE_THREADS:-16} python3 bench/cpu_region_probe.py --copy \
    --points "${PROBE_POINTS:-2,7,10}" --reps ${PROBE_REPS:-20} 2>&1 | grep -v "^$" | grep -v "^###"
done
