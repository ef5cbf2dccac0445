#!/usr/bin/env bash
# One device call: where the float32 3xTF32 kernels' time goes (issue #16's fp32 gap: 0.22-0.34x
# SDPA efficient on an H100 in session 45).  ncu on fp32_tc_bench's `one` mode (b2 h16, the shape
# given), per kernel: duration, the SpeedOfLight, ComputeWorkloadAnalysis (tensor pipe use),
# Occupancy, SchedulerStats and WarpStateStats (stall reasons) sections, and each stall reason's
# warps per issue-active cycle, largest first.  From the repository root on an H100/H200:
#   SHAPES="fwd:128:4096:0 bwd:128:4096:0" OUT=$OUT bash bench/fp32_tc/prof.sh
# (FLAGS: nvcc -D flags for the build, e.g. FLAGS="-DORCHARD_FP32_TC_STAGES=1".)
# Writes $OUT/prof_fp32_<dir>_d<D>_s<S>_c<C>.txt per shape; prints the lines compared.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="${OUT:-/tmp/fp32_out}"
mkdir -p "$OUT"
read -r -a flags <<< "${FLAGS:-}"
nvcc -O3 -std=c++20 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -lineinfo -Xptxas -v \
  "${flags[@]}" -I"$ROOT/include" -I"$ROOT/src" -I"$HERE/../sm90" -o /tmp/fp32_tc_prof "$HERE/fp32_tc_bench.cu" \
  > "$OUT/prof_fp32_build.log" 2>&1 || { tail -30 "$OUT/prof_fp32_build.log"; exit 1; }
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[[ -n $NCU ]] || { echo "no ncu on this machine"; exit 1; }
M="gpu__time_duration.sum,sm__cycles_active.avg,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_tensor_op_hmma.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio"
for shape in ${SHAPES:-fwd:128:4096:0 bwd:128:4096:0}; do
  IFS=: read -r dir d s c <<< "$shape"
  tag=${dir}_d${d}_s${s}_c${c}
  /tmp/fp32_tc_prof one "$dir" "$d" "$s" "$c" | grep TIME
  kernels=fwd_tc_kernel
  [[ $dir == bwd ]] && kernels="bwd_dq_tc_kernel bwd_dkdv_tc_kernel"
  for kernel in $kernels; do
    # (--launch-skip 3: past the warm-up calls; the backward mode runs one forward first.)
    timeout 240 "$NCU" --kernel-name regex:"$kernel" --launch-skip 3 --launch-count 1 --metrics "$M" \
      --section SpeedOfLight --section ComputeWorkloadAnalysis --section Occupancy --section SchedulerStats \
      --section WarpStateStats --section LaunchStats --section InstructionStats /tmp/fp32_tc_prof one "$dir" "$d" "$s" "$c" \
      > "$OUT/prof_fp32_${tag}_$kernel.txt" 2>&1
    echo "== $tag $kernel ncu rc=$?"
    grep -E "gpu__time_duration|pipe_tensor|inst_executed.sum|Compute \(SM\) Throughput|Memory Throughput|Issue Slots Busy|Warp Cycles Per Issued|Executed Ipc Active|Achieved Occupancy|Theoretical Occupancy|Registers Per|Block Limit|Tensor|No Eligible" \
      "$OUT/prof_fp32_${tag}_$kernel.txt" | head -24
    grep -E "smsp__average_warps_issue_stalled_" "$OUT/prof_fp32_${tag}_$kernel.txt" | awk '{print $NF, $1}' \
      | sort -gr | head -8
  done
done
