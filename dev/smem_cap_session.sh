#!/usr/bin/env bash
# One device call (session 66): the package built (dev/gpu_session.sh), the shared-memory cap tests,
# then bench/sm80_smem_cap_bench.py on the sm80 kernels with no cap, an A100's and sm_86's, each its
# own process (the cap is read once per process). Logs under $OUT/logs.
set -uo pipefail
cd "$(dirname "$0")/.."
# (the parent tests run the capped child suites: test_cuda.py::test_sm80_kernels_with_less_shared_memory)
PYTEST_TIMEOUT=${PYTEST_TIMEOUT:-300} bash dev/gpu_session.sh "pytest:-k,less_shared_memory"
export PYTHONPATH=/tmp/orchard_site:bench
for cap in none 166912 101376; do
  env ORCHARD_SM90=0 $([ $cap != none ] && echo ORCHARD_CUDA_SMEM_OPTIN=$cap) timeout 120 \
    python3 bench/sm80_smem_cap_bench.py ${CAP_BENCH_ARGS:-} > "$OUT/logs/cap_$cap.md" 2>&1
  cat "$OUT/logs/cap_$cap.md"
done
