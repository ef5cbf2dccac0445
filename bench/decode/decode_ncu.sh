#!/bin/bash
# One device step, run as a step of dev/gpu_session.sh (which builds the package and sets
# PYTHONPATH), e.g. `bash dev/gpu_session.sh sh:bench/decode/decode_ncu.sh`: ncu sections of the decode
# kernel and SDPA's kernels at one point (bench/decode/decode_prof.py), the details to $OUT.
#   PROF_ARGS="--b 64 --hkv 8 --hq 32 --L 131072" bash bench/decode/decode_ncu.sh
set -uo pipefail
OUT=${OUT:-/tmp/orchard-out}
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
tag=$(echo "${PROF_ARGS:-default}" | tr -c 'a-zA-Z0-9' '_' | cut -c1-40)
M=dram__bytes_read.sum,dram__bytes_read.sum.per_second,dram__throughput.avg.pct_of_peak_sustained_elapsed,gpu__time_duration.sum,lts__t_sector_hit_rate.pct,sm__warps_active.avg.pct_of_peak_sustained_active,launch__grid_size,launch__occupancy_limit_shared_mem,launch__occupancy_limit_registers
timeout 300 $NCU --profile-from-start off --metrics $M \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
  --section LaunchStats --section SchedulerStats \
  python3 bench/decode/decode_prof.py ${PROF_ARGS:-} > "$OUT/ncu_decode_$tag.txt" 2>&1
echo "ncu rc=$?"
grep -E "^  [a-zA-Z_].*\(|Duration|DRAM Throughput|dram__|Memory Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Shared Memory Config|Block Limit|Grid Size|Stall|Warp Cycles Per Issued|Eligible Warps|Issued Warp|No Eligible|lts__t_sector_hit|L2 Hit|Mem Busy|Max Bandwidth" "$OUT/ncu_decode_$tag.txt" | head -150
