#!/usr/bin/env bash
# Dense attn_bias / masks on the sm90 kernels (#16): feature_bench's bias / dmask sections at s1k and
# s4k, with the sm90 kernels and with ORCHARD_SM90=0 (the sm80 kernels), each against SDPA
# efficient / cuDNN in the same process. Run from gpu_session.sh (sh: step), writes $OUT/logs/dense_*.
# DENSE_RUNS: which of the quick (s1k) / full (s4k) grids, DENSE_SM90: which of the two paths.
set -uo pipefail
out="${OUT:-.}/logs"
sections="${DENSE_SECTIONS:-bias,bias64,dmask,dmask64,mask,mask64}"
for run in ${DENSE_RUNS:-quick full}; do
  quick=$([ "$run" = quick ] && echo --quick)
  for sm90 in ${DENSE_SM90:-1 0}; do
    tag="dense_sm90${sm90}${quick:+_quick}"
    mkdir -p "$out/$tag"
    ORCHARD_SM90=$sm90 python3 bench/feature_bench.py --out "$out/$tag" --only "$sections" $quick > "$out/$tag.log" 2>&1
    echo "== $tag rc=$?"; cat "$out/$tag/feature_bench.md"
  done
done
