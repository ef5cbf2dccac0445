#!/bin/bash
# One device call: build decode_kernel_bench once per variant (VARIANTS: space-separated, each a
# comma-separated list of NAME=VALUE macros for decode_kernel.cu, or "base"; in parallel), then
# run them in ROUNDS alternating rounds; tables to $OUT. Variant i is binary /tmp/dkb<i>.
#   VARIANTS="ORCHARD_DECODE_SWIZZLE=0 base" ROUNDS=2 NCU="0 1" NCU_SDPA=1 bash bench/decode/ab.sh
set -uo pipefail
OUT=${OUT:-/tmp/orchard-out}; mkdir -p "$OUT"
ARCH=${ARCH:-90a}
pids=()
read -ra VS <<< "${VARIANTS:-base}"
IDX=$(seq 0 $(( ${#VS[@]} - 1 )))
for v in $IDX; do
  # A token INC=<dir> puts <dir> first on the include path (e.g. an older decode_kernel.cu in
  # <dir>/backends/cuda/); the others are -D macros.
  defs=""; [ "${VS[$v]}" != base ] && defs=$(echo "${VS[$v]}" | tr ',' '\n' | sed 's/^INC=/-I/; /^-I/!s/^/-D/' | tr '\n' ' ')
  nvcc -O3 -std=c++20 -gencode=arch=compute_$ARCH,code=sm_$ARCH --expt-relaxed-constexpr $defs \
    -DDECODE_BENCH_VARIANT="\"${VS[$v]}\"" -Iinclude -Isrc -o /tmp/dkb$v bench/decode/decode_kernel_bench.cu > "$OUT/build_$v.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || { echo "build failed"; cat "$OUT"/build_*.log | grep -v Warning | head -30; exit 1; }; done
echo "built"
for r in $(seq 1 "${ROUNDS:-2}"); do
  for v in $IDX; do
    /tmp/dkb$v "${REPS:-20}" > "$OUT/round${r}_v$v.md" 2>&1; echo "round $r variant $v rc=$?"
  done
done
for v in $IDX; do echo "== variant $v: ${VS[$v]}"; cat "$OUT"/round*_v$v.md | grep -v "^|---" ; done
NCU_M=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,lts__t_sector_hit_rate.pct,lts__t_sectors_srcunit_tex_op_read.sum,lts__t_requests_srcunit_tex_op_read.sum,lts__t_sectors_srcunit_tex_op_read_lookup_hit.sum,dram__sectors_read.sum,lts__t_sectors_srcunit_ltcfabric.sum,lts__t_sectors.sum,l1tex__m_xbar2l1tex_read_sectors.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed
# NCU="0 1" (variant indices): L2 / DRAM counters of the first decode launch (the gqa b64 L128k
# check) of each named variant.
NCUB=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
for v in ${NCU:-}; do
  timeout 120 $NCUB --kernel-name regex:decode_mma --launch-count 1 \
    --metrics $NCU_M \
    /tmp/dkb$v 1 > "$OUT/ncu_v$v.txt" 2>&1
  echo "== ncu variant $v"; grep -E "^\s+(gpu__|dram__|lts__|l1tex__|sm__)" "$OUT/ncu_v$v.txt"
done
# NCU_SDPA=1: the same counters for SDPA's kernel at that point (torch only).
if [ -n "${NCU_SDPA:-}" ]; then
  timeout 120 $NCUB --profile-from-start off --metrics $NCU_M python3 bench/decode/sdpa_probe.py > "$OUT/ncu_sdpa.txt" 2>&1
  echo "== ncu sdpa"; grep -E "^  [a-z_]|^\s+(gpu__|dram__|lts__|l1tex__|sm__)" "$OUT/ncu_sdpa.txt" | cut -c1-120
fi
