#!/usr/bin/env bash
# Context-parallel measurements on a 2-GPU machine (issue #14), with the package already
# built into PYTHONPATH (dev/gpu_session.sh does that; run as its step `sh:dev/cp_session.sh`):
# the scaling/correctness/profile bench for the zigzag ring and Ulysses, then the longest
# trainable sequence on 1 and 2 GPUs under a per-GPU memory cap.
#   env: OUT (results), CP_MODES (default "ring-zigzag ulysses"), CP_CAP_GIB (6), CP_LONGEST_S (60)
set -uo pipefail
OUT=${OUT:-/tmp/cp_out}; mkdir -p "$OUT/logs"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
rc=0
timeout 150 torchrun --standalone --nproc-per-node=2 bench/cp_bench.py --modes ${CP_MODES:-ring-zigzag ulysses} \
  --out "$OUT/logs/cp_bench.md" > "$OUT/logs/cp_bench.log" 2>&1 || rc=1
cat "$OUT/logs/cp_bench.md" 2>/dev/null || tail -30 "$OUT/logs/cp_bench.log"
timeout $(( ${CP_LONGEST_S:-60} + 60 )) torchrun --standalone --nproc-per-node=2 bench/cp_longest.py \
  --cap-gib "${CP_CAP_GIB:-6}" --budget-s "${CP_LONGEST_S:-60}" --out "$OUT/logs/cp_longest" \
  > "$OUT/logs/cp_longest.log" 2>&1 || rc=1
cat "$OUT/logs/cp_longest.md" 2>/dev/null || tail -30 "$OUT/logs/cp_longest.log"
exit $rc
