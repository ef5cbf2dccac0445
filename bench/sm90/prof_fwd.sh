#!/usr/bin/env bash
# One device call: where the sm90 forward's time goes at a short and a long sequence (issue #11:
# the s2k forward runs ~13 % below s16k).  ncu on the library entry's kernel (sm90_attn_bench
# `one`), per shape: duration, SM active cycles avg / max (max / avg - 1 = the wave tail and
# imbalance across SMs), the SpeedOfLight, ComputeWorkloadAnalysis (tensor pipe use) and
# WarpStateStats (stall reasons) sections.  From the repository root on an H100/H200:
#   D=128 SHAPES="2048:0 16384:0 2048:1" OUT=$OUT bash bench/sm90/prof_fwd.sh
# Writes $OUT/prof_fwd_d<D>_s<S>_c<C>.txt per shape; prints the comparison lines.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="${OUT:-/tmp/sm90_out}"
D="${D:-128}"
mkdir -p "$OUT"
bucket=$(( D <= 64 ? 64 : D <= 96 ? 96 : D <= 128 ? 128 : D <= 192 ? 192 : 256 ))
nvcc -O3 -std=c++20 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -lineinfo \
  -DSM90_BENCH_LIBRARY_ONLY -DSM90_BENCH_BUCKET=$bucket -I"$ROOT/include" -I"$ROOT/src" -I"$HERE" \
  -o /tmp/sm90_fwd_prof "$HERE/sm90_attn_bench.cu" > "$OUT/prof_fwd_build.log" 2>&1 \
  || { tail -30 "$OUT/prof_fwd_build.log"; exit 1; }
grep -c C7520 "$OUT/prof_fwd_build.log" | sed 's/^/C7520 (serialized wgmma) warnings: /'
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[[ -n $NCU ]] || { echo "no ncu on this machine"; exit 1; }
M=gpu__time_duration.sum,sm__cycles_active.avg,sm__cycles_active.max,sm__cycles_active.min,sm__cycles_elapsed.max
# STALLS=1: also each stall reason's warps per issue-active cycle (the WarpStateStats section's
# breakdown) and the SourceCounters section (the sampled stalls' top SASS locations).
extra=()
if [[ ${STALLS:-0} == 1 ]]; then
  M="$M,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio"
  extra=(--section SourceCounters)
fi
for shape in ${SHAPES:-2048:0 16384:0 2048:1}; do
  s=${shape%%:*} c=${shape##*:}
  tag=d${D}_s${s}_c${c}
  /tmp/sm90_fwd_prof one "$D" "$s" "$c" | grep TIME
  timeout 240 "$NCU" --kernel-name regex:flash_fwd_sm90_kernel --launch-skip 2 --launch-count 1 --metrics "$M" \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats "${extra[@]}" \
    /tmp/sm90_fwd_prof one "$D" "$s" "$c" > "$OUT/prof_fwd_$tag.txt" 2>&1
  echo "== $tag ncu rc=$?"
  grep -E "gpu__time_duration|sm__cycles_active|sm__cycles_elapsed|Compute \(SM\) Throughput|Issue Slots Busy|Warp Cycles Per Issued|Executed Ipc Active|Stall|Tensor" \
    "$OUT/prof_fwd_$tag.txt" | head -24
  if [[ ${STALLS:-0} == 1 ]]; then  # the stall reasons, largest first
    grep -E "smsp__average_warps_issue_stalled_" "$OUT/prof_fwd_$tag.txt" | awk '{print $NF, $1}' | sort -gr | head -12
  fi
done
