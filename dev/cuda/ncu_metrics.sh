#!/bin/bash
# One device call, after ab_base.sh built build-<name>: a few ncu metrics of the dK/dV
# kernel per build at one shape (shared-memory wavefronts, duration).
#   BUILDS="dev l2pf128" SHAPE="128 8192 0" bash dev/cuda/ncu_metrics.sh
set -uo pipefail
OUT=${OUT:-/tmp/orchard-out}
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
M=gpu__time_duration.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum,smsp__inst_executed.sum,smsp__average_warp_latency_issue_stalled_mio_throttle.ratio,smsp__average_warp_latency_issue_stalled_math_pipe_throttle.ratio
for who in ${BUILDS:-dev}; do
  timeout 120 $NCU --kernel-name regex:"dkdv2" --launch-skip 1 --launch-count 1 --metrics $M \
    ./build-$who/cuda_check --one ${SHAPE:-128 8192 0} > $OUT/ncu-$who.txt 2>&1
  echo "== ncu $who rc=$?"; grep -E "^\s+(gpu__|l1tex__|smsp__)" $OUT/ncu-$who.txt
done
