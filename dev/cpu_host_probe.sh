#!/usr/bin/env bash
# Issue #15, on the GPU machine's 16-core host (CPU timing only). Run as a step:
#   dev/gpu_session.sh sh:dev/cpu_host_probe.sh      (ORCHARD_CUDA=OFF: a 30 s build)
# 1. The core's fp32 FMA peak (bench/cpu_fma_peak.cpp) alone and with all 16 cores
#    running it at once (the all-core clock); PROBE_PEAK=0 skips it.
# 2. The forward-only grid at PROBE_THREADS (default 1 4 16), Orchard and torch interleaved.
# 3. PROBE_ENVS: one more 16-thread forward grid per NAME=VALUE (each in its own process:
#    the AMX tile knobs are read once per process), PROBE_DTYPES (default bfloat16).
set -uo pipefail
which perf >/dev/null 2>&1 && echo "perf: $(perf --version)" || echo "perf: not installed"
if [ "${PROBE_PEAK:-1}" != 0 ] && g++ -O2 -std=c++20 -ffp-contract=fast -march=native -Isrc -Iinclude \
    bench/cpu_fma_peak.cpp src/backends/cpu/gemm.cpp -o /tmp/fma_peak; then
  echo "## FMA peak, 1 thread"; /tmp/fma_peak
  echo "## FMA peak, 16 copies at once (core 0's copy shown, then every copy's zmm line)"
  for c in $(seq 0 15); do taskset -c $c /tmp/fma_peak > /tmp/fma_peak.$c 2>&1 & done; wait
  cat /tmp/fma_peak.0; grep -h -i "zmm" /tmp/fma_peak.* | head -16
fi
for t in ${PROBE_THREADS:-1 4 16}; do
  OMP_NUM_THREADS=$t python3 bench/cpu_bench.py --grid full --clock wall --reps ${PROBE_REPS:-5} --no-bwd
done
for e in ${PROBE_ENVS:-}; do
  echo "## $e"
  env "$e" OMP_NUM_THREADS=16 python3 bench/cpu_bench.py --grid full --clock wall --reps ${PROBE_REPS:-5} \
    --no-bwd --dtypes ${PROBE_DTYPES:-bfloat16}
done
