#!/usr/bin/env bash
# One device call for a decode-kernel change (issue #12): the kernel A/B (bench/decode/ab.sh,
# VARIANTS "<candidate macros> base"), then the package built with the candidate's macros if it
# beat the base at the first point (GQA b64 128k) by more than 1 % in both rounds, else as is;
# then the decode tests, compute-sanitizer on the decode kernels and the eager grid against SDPA.
#   CANDIDATE=NAME=VALUE[,NAME=VALUE] bash dev/decode_session.sh   (macros of decode_kernel.cu,
#   e.g. session 22's ORCHARD_DECODE_SWIZZLE=1, since reverted)
set -uo pipefail
OUT=${OUT:-/tmp/orchard-out}; mkdir -p "$OUT"
CAND=${CANDIDATE:?CANDIDATE=NAME=VALUE[,NAME=VALUE]}
VARIANTS="$CAND base" ROUNDS=${ROUNDS:-2} bash bench/decode/ab.sh > "$OUT/ab.log" 2>&1
grep -v "^|---" "$OUT/ab.log" | grep -E "^== |gqa b64 L128k|gqa b8 L32k d256|mha b8 L8k|gqa b8 L128k \||failed|FAIL"
first() { grep -h "gqa b64 L128k" "$OUT"/round*_v$1.md | awk -F'|' '{print $4}'; }
read -ra C <<< "$(first 0 | tr '\n' ' ')"; read -ra B <<< "$(first 1 | tr '\n' ' ')"
win=1  # a failed or partial A/B (no rounds to compare) is no win
(( ${#C[@]} > 0 && ${#C[@]} == ${#B[@]} )) || win=0
for i in "${!C[@]}"; do awk -v c="${C[$i]}" -v b="${B[$i]}" 'BEGIN{exit !(c < 0.99 * b)}' || win=0; done
flags=""
if [ "$win" = 1 ]; then flags=$(echo "$CAND" | tr ',' '\n' | sed 's/^/-D/' | tr '\n' ' '); fi
echo "candidate won: $win; package CUDAFLAGS='$flags'"
CUDAFLAGS="$flags" GPU_ARCHS=90 PYTEST_TIMEOUT=200 DB_TIMEOUT=${DB_TIMEOUT:-150} DB_ARGS="${DB_ARGS:-}" \
  bash dev/gpu_session.sh pytest:test_kvcache.py cs:memcheck,bench/sanitizer_decode.py \
  cs:racecheck,bench/sanitizer_decode.py decode_bench
