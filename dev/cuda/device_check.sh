#!/bin/bash
# One device call: build the CUDA backend + harness, run the correctness suite,
# compute-sanitizer on a small case, then the timing table and the torch peers.
# Usage (on the GPU machine, repo root): bash dev/cuda/device_check.sh [check|bench|all|ab]
#   ab: all + A/B benches of the variants in $VARIANTS ("name:-DFLAG=V -DFLAG2=V ..."
#       separated by ';'); a prebuilt dev/cuda/.bin/cuda_check_<name>.xz (built with
#       the same flags and sources, carried) is used if present, else it is built here.
set -uo pipefail
MODE=${1:-all}
OUT=${OUT:-/tmp/orchard-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
# Prebuilt binaries (dev/cuda/.bin/cuda_check_<name>.xz, built off-device with the same
# sources) are used only if their stamp matches the sources here.
stamp() { cat src/backends/cuda/*.cuh src/backends/cuda/*.cu src/backends/cuda/*.h src/backends/cuda/generated/*.cu \
  tests/cuda/cuda_check.cu include/orchard/*.h dev/cuda/CMakeLists.txt | sha256sum | cut -c1-16; }
STAMP=$(stamp)
prebuilt() {  # prebuilt NAME -> path of the unpacked binary, or nothing
  local f=dev/cuda/.bin/cuda_check_$1.xz
  if [[ -f $f && "$(cat dev/cuda/.bin/stamp_$1 2>/dev/null)" == "$STAMP" ]]; then
    python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" $f /tmp/cuda_check_$1 &&
      chmod +x /tmp/cuda_check_$1 && echo /tmp/cuda_check_$1
  fi
}
t0=$(date +%s)
BIN=$(prebuilt default)
if [[ -n $BIN ]]; then
  echo "default: prebuilt off-device (stamp $STAMP)"
else
  cmake -S dev/cuda -B build-dev -G Ninja -DORCHARD_CUDA_ARCHS=90 > "$OUT/build.log" 2>&1 &&
    ninja -C build-dev -j16 >> "$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; exit 1; }
  BIN=./build-dev/cuda_check
  echo "build: $(( $(date +%s) - t0 ))s; spill warnings: $(grep -c 'spill' "$OUT/build.log")"
fi
if [[ $MODE == check || $MODE == all || $MODE == ab ]]; then
  t1=$(date +%s)
  timeout 300 $BIN > "$OUT/check.log" 2>&1; echo "cuda_check rc=$? ($(( $(date +%s) - t1 ))s)"
  grep -E "FAIL|MISMATCH|DIFFERENT|unsupported|cases passed|check_support" "$OUT/check.log" | head -40
  timeout 200 compute-sanitizer --tool memcheck $BIN --small > "$OUT/sanitizer.log" 2>&1
  echo "sanitizer rc=$?"; grep -E "ERROR SUMMARY|=> " "$OUT/sanitizer.log" | head
fi
if [[ $MODE == bench || $MODE == all || $MODE == ab ]]; then
  timeout 200 $BIN --bench > "$OUT/bench.log" 2>&1; echo "bench rc=$?"
  cat "$OUT/bench.log"
fi
if [[ $MODE == ab ]]; then
  IFS=';' read -ra VS <<< "${VARIANTS:-}"
  for v in "${VS[@]}"; do
    name=${v%%:*}; flags=${v#*:}
    bin=$(prebuilt $name)
    [[ -n $bin ]] && echo "$name: prebuilt off-device"
    if [[ -z $bin ]]; then
      t1=$(date +%s)
      cmake -S dev/cuda -B build-$name -G Ninja -DORCHARD_CUDA_ARCHS=90 "-DCMAKE_CUDA_FLAGS=$flags" > "$OUT/build-$name.log" 2>&1 &&
        ninja -C build-$name -j16 >> "$OUT/build-$name.log" 2>&1 || tail -30 "$OUT/build-$name.log"
      bin=build-$name/cuda_check; echo "build $name: $(( $(date +%s) - t1 ))s"
    fi
    timeout 200 $bin --bench > "$OUT/bench-$name.log" 2>&1; echo "bench $name ($flags) rc=$?"
    cat "$OUT/bench-$name.log"
  done
fi
if [[ $MODE == bench || $MODE == all || $MODE == ab ]]; then
  timeout 150 python3 dev/cuda/bench_torch.py > "$OUT/torch.log" 2>&1; echo "torch rc=$?"
  cat "$OUT/torch.log"
fi
