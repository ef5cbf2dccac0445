#!/bin/bash
# One device call: build the CUDA backend + harness, run the correctness suite,
# compute-sanitizer on a small case, then the timing table and the torch peers.
# Usage (on the GPU machine, repo root): bash dev/cuda/device_check.sh [check|bench|all|ab|abprof]
#   abprof: ab + ncu of our backward kernels and FA2's at $PROF ("D S CAUSAL", default 128 8192 0).
# All logs end up in $OUT/call.tgz (the device tool returns at most 8 files).
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
stamp() { cat src/backends/cuda/*.cuh src/backends/cuda/*.cu src/backends/cuda/*.h src/backends/cuda/sm80/generated/*.cu \
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
# Variant trees that must be built here start now, in parallel with the default one.
IFS=';' read -ra VS <<< "${VARIANTS:-}"
if [[ $MODE == ab* ]]; then
  for v in "${VS[@]}"; do
    name=${v%%:*}; flags=${v#*:}
    if [[ -z $(prebuilt $name) ]]; then
      (cmake -S dev/cuda -B build-$name -G Ninja -DORCHARD_CUDA_ARCHS=90 "-DCMAKE_CUDA_FLAGS=$flags" > "$OUT/build-$name.log" 2>&1 &&
        ninja -C build-$name -j16 >> "$OUT/build-$name.log" 2>&1 || tail -30 "$OUT/build-$name.log") &
    fi
  done
fi
BIN=$(prebuilt default)
if [[ -n $BIN ]]; then
  echo "default: prebuilt off-device (stamp $STAMP)"
else
  cmake -S dev/cuda -B build-dev -G Ninja -DORCHARD_CUDA_ARCHS=90 > "$OUT/build.log" 2>&1 &&
    ninja -C build-dev -j16 >> "$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; exit 1; }
  BIN=./build-dev/cuda_check
  echo "build: $(( $(date +%s) - t0 ))s; spill warnings: $(grep -c 'spill' "$OUT/build.log")"
fi
wait; echo "all builds: $(( $(date +%s) - t0 ))s"
if [[ $MODE == check || $MODE == all || $MODE == ab* ]]; then
  t1=$(date +%s)
  timeout 300 $BIN > "$OUT/check.log" 2>&1; echo "cuda_check rc=$? ($(( $(date +%s) - t1 ))s)"
  grep -E "FAIL|MISMATCH|DIFFERENT|unsupported|cases passed|check_support" "$OUT/check.log" | head -40
  for tool in ${SANITIZERS:-memcheck}; do
    timeout 240 compute-sanitizer --tool $tool --error-exitcode 3 $BIN --small > "$OUT/sanitizer_$tool.log" 2>&1
    echo "sanitizer $tool rc=$?"; grep -E "ERROR SUMMARY|=> |passed|FAIL" "$OUT/sanitizer_$tool.log" | head -12
  done
fi
if [[ $MODE == bench || $MODE == all || $MODE == ab* ]]; then
  timeout 200 $BIN --bench > "$OUT/bench.log" 2>&1; echo "bench rc=$?"
  cat "$OUT/bench.log"
fi
if [[ $MODE == ab* ]]; then
  for v in "${VS[@]}"; do
    name=${v%%:*}; flags=${v#*:}
    bin=$(prebuilt $name)
    [[ -n $bin ]] && echo "$name: prebuilt off-device"
    [[ -z $bin ]] && bin=build-$name/cuda_check
    if [[ ${CHECKVAR:-0} == 1 ]]; then
      timeout 300 $bin > "$OUT/check-$name.log" 2>&1; echo "cuda_check $name rc=$?"
      grep -E "FAIL|MISMATCH|DIFFERENT|cases passed" "$OUT/check-$name.log" | head -10
    fi
    timeout 200 $bin --bench > "$OUT/bench-$name.log" 2>&1; echo "bench $name ($flags) rc=$?"
    cat "$OUT/bench-$name.log"
  done
fi
if [[ $MODE == bench || $MODE == all || $MODE == ab* ]]; then
  timeout 150 python3 dev/cuda/bench_torch.py > "$OUT/torch.log" 2>&1; echo "torch rc=$?"
  cat "$OUT/torch.log"
fi
if [[ $MODE == abprof ]]; then
  NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  read -r PD PS PC <<< "${PROF:-128 8192 0}"
  SECS="--section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables --section WarpStateStats --section Occupancy --section LaunchStats"
  MET="--metrics sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,lts__t_requests_srcunit_tex_op_red.sum,lts__t_sectors_srcunit_tex_op_red.sum,l1tex__t_bytes_pipe_lsu_mem_local_op_ld.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum,smsp__inst_executed.sum"
  if [[ -n $NCU ]]; then
    timeout 150 $NCU --kernel-name regex:"dkdv|dq_kernel" --launch-skip 3 --launch-count 3 $SECS $MET $BIN --one $PD $PS $PC > "$OUT/ncu.txt" 2>&1
    echo "ncu ours rc=$?"
    timeout 150 $NCU --kernel-name regex:"flash_bwd_dq_dk_dv" --launch-skip 1 --launch-count 1 $SECS $MET python3 dev/cuda/prof_fa2.py $PD $PS $PC > "$OUT/ncu_fa2.txt" 2>&1
    echo "ncu fa2 rc=$?"
    for f in ncu.txt ncu_fa2.txt; do
      grep -E "^  [a-z_]+.*\(|Duration|Registers Per|Achieved Occupancy|Compute \(SM\) Throughput|Memory Throughput|hmma_cycles|op_red.sum|local_op_ld|wavefronts_mem_shared|bank_conflicts|Stall|Warp Cycles Per Issued|Issued Ipc|L1/TEX Hit|L2 Hit|DRAM Throughput|Shared Memory Configuration Size|Dynamic Shared" "$OUT/$f" | head -90
    done
  else
    echo "no ncu on this machine"
  fi
fi
cd "$OUT" && tar czf call.tgz --remove-files $(ls | grep -v '^call.tgz$') && ls -la "$OUT"
