#!/usr/bin/env bash
# One device call: ncu per-instruction profile (SASS with executed counts and warp-stall
# samples) of the sm90 backward kernel at one FA-grid shape (bf16, bulk dQ).  Run from the
# repository root on an H100/H200:
#   D=128 S=8192 CAUSAL=0 OUT=$OUT bash bench/sm90/prof_bwd.sh
# Writes $OUT/prof_d<D>_s<S>_c<CAUSAL>.details.txt (ncu details page) and .sass.csv (source page,
# one row per SASS instruction); summarise with bench/sm90/prof_summary.py.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="${OUT:-/tmp/sm90_out}"
D="${D:-128}" S="${S:-8192}" CAUSAL="${CAUSAL:-0}"
mkdir -p "$OUT"
tag=d${D}_s${S}_c${CAUSAL}
t0=$(date +%s)
nvcc -O3 -std=c++20 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -lineinfo -DSM90_BWD_BENCH_D="$D" \
  -I"$ROOT/include" -I"$ROOT/src" -I"$HERE" -o /tmp/sm90_bwd_prof "$HERE/sm90_bwd_bench.cu" > "$OUT/prof_build.log" 2>&1 \
  || { tail -30 "$OUT/prof_build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 ))s"
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[[ -n $NCU ]] || { echo "no ncu on this machine"; exit 1; }
/tmp/sm90_bwd_prof one "$S" "$CAUSAL"
timeout 300 "$NCU" --kernel-name regex:flash_bwd_sm90_kernel --launch-skip 3 --launch-count 1 --set full \
  --import-source no -f -o /tmp/prof_$tag /tmp/sm90_bwd_prof one "$S" "$CAUSAL" > "$OUT/prof_$tag.log" 2>&1
echo "ncu rc=$?"
"$NCU" -i /tmp/prof_$tag.ncu-rep --page details > "$OUT/prof_$tag.details.txt" 2>&1
"$NCU" -i /tmp/prof_$tag.ncu-rep --page source --csv --print-source sass > "$OUT/prof_$tag.sass.csv" 2> "$OUT/prof_$tag.sass.err"
grep -E "Duration|Warp Cycles Per Issued|Issued Ipc Active|Registers Per Thread|Compute \(SM\) Throughput|L2 Cache Throughput" \
  "$OUT/prof_$tag.details.txt" | head -10
echo "sass rows: $(wc -l < "$OUT/prof_$tag.sass.csv")"
