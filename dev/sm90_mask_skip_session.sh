#!/usr/bin/env bash
# One device call for the sm90 kernels' skip of key tiles a boolean mask hides (issue #16, session
# 38): package build, the sm90 mask / bool-mask / sink tests, compute-sanitizer memcheck on
# bench/sanitizer_sm90_mask.py (d64 / d128 / d256), then bench/mask_padding_bench.py, eager and from CUDA graphs.
set -u
export SANITIZE_DIMS=${SANITIZE_DIMS:-64,128,256}
mkdir -p "$OUT/s"
OUT=$OUT/s bash dev/gpu_session.sh "pytest:-k,sm90_attn_mask or bool_mask_hiding or sink" \
  "cs:memcheck,bench/sanitizer_sm90_mask.py" 2>&1 | tail -8
export PYTHONPATH=/tmp/orchard_site
timeout 150 python3 bench/mask_padding_bench.py ${PAD_ARGS:-} 2>&1 | tee "$OUT/s/padding.log"
timeout 150 python3 bench/mask_padding_bench.py --graph ${PAD_ARGS:-} 2>&1 | tee "$OUT/s/padding_graph.log"
