#!/usr/bin/env bash
# The sm90 forward's head-dim buckets through the package (issues #11 / #16): gpu_bench's grid at
# DIMS (default 96,160,192: run in the 128 / 192 buckets), Orchard vs SDPA flash (FA2) vs SDPA
# cuDNN in one process, then Orchard alone with ORCHARD_SM90=0 (the sm80 kernels, in a process of
# its own: the backend reads the switch once), same shapes and seeds. Needs the package importable
# (e.g. PYTHONPATH=/tmp/orchard_site after dev/gpu_session.sh's build).
#   bash bench/sm90/run_dims.sh     (OUT, DIMS, SEQLENS from the environment)
set -uo pipefail
OUT=${OUT:-/tmp/dims_out}
DIMS=${DIMS:-96,160,192}
SEQLENS=${SEQLENS:-2048,4096,8192}
rc=0
python3 bench/gpu_bench.py --out "$OUT/sm90" --dims "$DIMS" --seqlens "$SEQLENS" --no-extras \
  --impls orchard,sdpa_flash,sdpa_cudnn || rc=1
ORCHARD_SM90=0 python3 bench/gpu_bench.py --out "$OUT/sm80" --dims "$DIMS" --seqlens "$SEQLENS" --no-extras \
  --impls orchard || rc=1
exit $rc
