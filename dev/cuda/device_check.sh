#!/bin/bash
# One device call: build the CUDA backend + harness, run the correctness suite,
# compute-sanitizer on a small case, then the timing table and the torch peers.
# Usage (on the GPU machine, repo root): bash dev/cuda/device_check.sh [check|bench|all]
set -uo pipefail
MODE=${1:-all}
OUT=${OUT:-/tmp/orchard-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
t0=$(date +%s)
cmake -S dev/cuda -B build-dev -G Ninja -DORCHARD_CUDA_ARCHS=90 > "$OUT/build.log" 2>&1 &&
  ninja -C build-dev -j16 >> "$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 ))s; spill warnings: $(grep -c 'spill' "$OUT/build.log")"
if [[ $MODE == check || $MODE == all || $MODE == check-bench2 ]]; then
  timeout 300 ./build-dev/cuda_check > "$OUT/check.log" 2>&1; echo "cuda_check rc=$?"
  grep -E "^\[|FAIL|MISMATCH|DIFFERENT|unsupported|cases passed|check_support" "$OUT/check.log" | grep -E "FAIL|MISMATCH|DIFFERENT|unsupported|passed|check_support" | head -40
  timeout 200 compute-sanitizer --tool memcheck ./build-dev/cuda_check --small > "$OUT/sanitizer.log" 2>&1
  echo "sanitizer rc=$?"; grep -E "ERROR SUMMARY|=> " "$OUT/sanitizer.log" | head
fi
if [[ $MODE == bench || $MODE == all || $MODE == check-bench2 ]]; then
  timeout 200 ./build-dev/cuda_check --bench > "$OUT/bench.log" 2>&1; echo "bench rc=$?"
  cat "$OUT/bench.log"
fi
if [[ $MODE == check-bench2 ]]; then  # A/B: the forward variant of call 1 (8 warps x 16 rows)
  cmake -S dev/cuda -B build-mw1 -G Ninja -DORCHARD_CUDA_ARCHS=90 -DCMAKE_CUDA_FLAGS=-DORCHARD_FWD_MW=1 > "$OUT/build-mw1.log" 2>&1 &&
    ninja -C build-mw1 -j16 >> "$OUT/build-mw1.log" 2>&1 || tail -30 "$OUT/build-mw1.log"
  timeout 200 ./build-mw1/cuda_check --bench > "$OUT/bench-mw1.log" 2>&1; echo "bench mw1 rc=$?"
  cat "$OUT/bench-mw1.log"
fi
if [[ $MODE == bench || $MODE == all ]]; then
  timeout 150 python3 dev/cuda/bench_torch.py > "$OUT/torch.log" 2>&1; echo "torch rc=$?"
  cat "$OUT/torch.log"
fi
