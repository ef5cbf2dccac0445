#!/usr/bin/env bash
# One device call: where the float32 tensor-core kernels' instructions go, per SASS opcode (ncu's
# source page: executed instructions and stall samples of each SASS instruction of one launch; the
# page's CUDA view carries no counters on ncu 2025.3, so it is not asked for), for the
# question prof.sh leaves open (session 47: the forward d128 executes ~14 warp instructions per HMMA,
# its products ~5 of them). From the repository root on an H100/H200:
#   SHAPES="fwd:128:2048:0 bwd:128:2048:0" OUT=$OUT bash bench/fp32_tc/sass_counts.sh
# Writes $OUT/src_<tag>_<kernel>.csv.gz (ncu's raw page; -lineinfo build) and prints the opcode
# histogram weighted by executed instructions.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="${OUT:-/tmp/fp32_out}"
mkdir -p "$OUT"
read -r -a flags <<< "${FLAGS:-}"
nvcc -O3 -std=c++20 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -lineinfo \
  "${flags[@]}" -I"$ROOT/include" -I"$ROOT/src" -I"$HERE/../sm90" -o /tmp/fp32_tc_src "$HERE/fp32_tc_bench.cu" \
  > "$OUT/src_build.log" 2>&1 || { tail -30 "$OUT/src_build.log"; exit 1; }
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[[ -n $NCU ]] || { echo "no ncu on this machine"; exit 1; }
for shape in ${SHAPES:-fwd:128:2048:0 bwd:128:2048:0}; do
  IFS=: read -r dir d s c <<< "$shape"
  kernels=fwd_tc_kernel
  [[ $dir == bwd ]] && kernels="bwd_dq_tc_kernel bwd_dkdv_tc_kernel"
  for kernel in $kernels; do
    f="$OUT/src_${dir}_d${d}_s${s}_c${c}_${kernel}.csv"
    timeout 200 "$NCU" --kernel-name regex:"$kernel" --launch-skip 3 --launch-count 1 --section SourceCounters \
      --page source --print-source sass --csv /tmp/fp32_tc_src one "$dir" "$d" "$s" "$c" > "$f" 2> "$f.err"
    echo "== $dir d$d s$s c$c $kernel: ncu rc=$? ($(wc -l < "$f") lines)"
    python3 "$HERE/sass_counts.py" "$f" | head -32
    gzip -f "$f"
  done
done
