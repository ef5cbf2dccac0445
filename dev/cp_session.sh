#!/usr/bin/env bash
# Context-parallel checks and measurements on a 2-GPU machine (issue #14), with the package
# already built into PYTHONPATH (dev/gpu_session.sh does that; run as its step
# `sh:dev/cp_session.sh`, from the repository root), in this order:
#   1. cp_bench.py: correctness of every mode vs single-GPU Orchard (bf16, incl. the ring
#      with and without its fp32 dQ accumulator), the E table (zigzag ring; the ring
#      without the accumulator and without the kept K/V as A/Bs; Ulysses; 16k and 32k
#      tokens/GPU) and the
#      torch.profiler breakdown of one zigzag step;
#   2. cp_longest.py: the longest trainable sequence on 1 GPU and on 2 (ring zigzag,
#      Ulysses; CP_LONGEST_MODES adds e.g. ring-zigzag-no-accum) under a per-GPU cap;
#   3. pytest -m cuda tests/python/test_distributed.py -k "nccl_two_gpus or dq_accum": the
#      2-GPU NCCL suite (every mode/layout/causal/dropout case, the bf16 accumulator and
#      kept-K/V cases; the test spawns 2 ranks over NCCL itself) and the backward op's
#      dq_accum on CUDA (the kernels' reductions into a caller's buffer, its tile order).
# Each step is bounded by `timeout` (a hung collective kills the step, not the call) and
# writes its log and results under $OUT/logs; worst case (every timeout) 180 + 120 + 180 s; expected well under half.
#   env: OUT (results), CP_MODES (default "ring-zigzag ring-zigzag-no-accum ring-zigzag-no-keep-kv ulysses"),
#        CP_CAP_GIB (6), CP_LONGEST_S (search budget, 75), CP_LONGEST_MODES ("ring-zigzag ulysses"),
#        CP_BENCH_TIMEOUT (180), CP_PYTEST_TIMEOUT (180), CP_STEPS (default "bench longest pytest")
set -uo pipefail
OUT=${OUT:-/tmp/cp_out}; mkdir -p "$OUT/logs"
# NVLink multicast stays off (it can take the host's GPUs out of service).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
rc=0
t0=$(date +%s)
stamp() { echo "[cp_session $(( $(date +%s) - t0 ))s] $*"; }
steps=${CP_STEPS:-bench longest pytest}
for step in $steps; do
  case "$step" in
    bench)
      stamp "cp_bench"
      timeout -k 10 "${CP_BENCH_TIMEOUT:-180}" torchrun --standalone --nproc-per-node=2 bench/cp_bench.py \
        --modes ${CP_MODES:-ring-zigzag ring-zigzag-no-accum ring-zigzag-no-keep-kv ulysses} \
        --out "$OUT/logs/cp_bench.md" > "$OUT/logs/cp_bench.log" 2>&1 || { echo "cp_bench rc=$?"; rc=1; }
      cat "$OUT/logs/cp_bench.md" 2>/dev/null || tail -30 "$OUT/logs/cp_bench.log" ;;
    longest)
      stamp "cp_longest"
      timeout -k 10 $(( ${CP_LONGEST_S:-75} + 45 )) torchrun --standalone --nproc-per-node=2 bench/cp_longest.py \
        --cap-gib "${CP_CAP_GIB:-6}" --budget-s "${CP_LONGEST_S:-75}" --modes ${CP_LONGEST_MODES:-ring-zigzag ulysses} \
        --out "$OUT/logs/cp_longest" > "$OUT/logs/cp_longest.log" 2>&1 || { echo "cp_longest rc=$?"; rc=1; }
      cat "$OUT/logs/cp_longest.md" 2>/dev/null || tail -30 "$OUT/logs/cp_longest.log" ;;
    pytest)
      stamp "pytest test_distributed.py -m cuda -k 'nccl_two_gpus or dq_accum'"
      (cd tests/python && timeout -k 10 "${CP_PYTEST_TIMEOUT:-180}" python3 -m pytest -q -p no:cacheprovider -m cuda \
         -rfEs --durations=3 test_distributed.py -k "nccl_two_gpus or dq_accum" > "$OUT/logs/cp_pytest_nccl.log" 2>&1) \
        || { echo "cp pytest rc=$?"; rc=1; }
      # the NCCL suite + 4 CUDA cases of the op's dq_accum; a skip (no second GPU, no NCCL)
      # exits 0: on this machine it is a failure
      grep -qE "(^| )5 passed" "$OUT/logs/cp_pytest_nccl.log" || { echo "cp pytest: not all 5 passed"; rc=1; }
      tail -n 40 "$OUT/logs/cp_pytest_nccl.log" | grep -E "passed|failed|skipped|error|FAILED|SKIPPED|rank " | tail -n 15 ;;
    *) echo "cp_session: unknown step $step"; rc=1 ;;
  esac
done
stamp "done rc=$rc"
exit $rc
