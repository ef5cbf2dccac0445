#!/usr/bin/env bash
# compute-sanitizer on the sm90 forward kernel bench's checks for one head-dim bucket (issue #11):
# the checks cover the tile shapes the package's tests may not reach (e.g. d64 causal 2-WG tiles
# below 2k keys, d192's shared O buffer).  From the repository root on an H100/H200:
#   BUCKET=64 TOOLS="racecheck memcheck" OUT=$OUT bash bench/sm90/sanitize_bucket.sh
# Writes $OUT/sanitize_<tool>_d<BUCKET>.log; prints each tool's summary line.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="${OUT:-/tmp/sm90_out}"
BUCKET="${BUCKET:-64}"
mkdir -p "$OUT"
bin=/tmp/sm90_sanitize_d$BUCKET
nvcc -O3 -std=c++20 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -lineinfo \
  -DSM90_BENCH_LIBRARY_ONLY -DSM90_BENCH_BUCKET="$BUCKET" -I"$ROOT/include" -I"$ROOT/src" -I"$HERE" \
  -o "$bin" "$HERE/sm90_attn_bench.cu" > "$OUT/sanitize_build_d$BUCKET.log" 2>&1 \
  || { tail -30 "$OUT/sanitize_build_d$BUCKET.log"; exit 1; }
rc=0
for tool in ${TOOLS:-racecheck}; do
  log="$OUT/sanitize_${tool}_d$BUCKET.log"
  timeout "${SANITIZE_TIMEOUT:-240}" compute-sanitizer --tool "$tool" "$bin" checks > "$log" 2>&1 || rc=1
  echo "$tool d$BUCKET: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|hazard' "$log" | tail -1)"
  grep -ciE 'fail' "$log" | sed "s/^/$tool d$BUCKET lines with 'fail': /"
done
exit $rc
