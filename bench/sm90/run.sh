#!/usr/bin/env bash
# sm90 wgmma/TMA GEMM microbenchmark (issue #11 step 1): build, SASS check, correctness + timing.
# Run from the repository root on an H100/H200:   bash bench/sm90/run.sh
# Writes $OUT/sm90_gemm.md (table), $OUT/build.log, $OUT/sass_check.txt, $OUT/bench.log.
# Env: OUT (default /tmp/sm90_out), NVCC (default nvcc), BENCH_ARGS (extra bench flags),
#      VARIANTS, DTYPES, SIZES, RASTER_GROUPS, DIAG=0|1, PER_RUN_TIMEOUT (see below),
#      SKIP_RUN=1 (build + SASS check only, e.g. on a machine without a GPU).
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${OUT:-/tmp/sm90_out}"
NVCC="${NVCC:-nvcc}"
BUILD="${BUILD_DIR:-$OUT/build}"
mkdir -p "$OUT" "$BUILD"
export OUT
status=0
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step "environment"
command -v nvidia-smi >/dev/null && timeout 20 nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv 2>&1 | tee "$OUT/gpu.txt"
timeout 20 "$NVCC" --version | tail -2

step "build (nvcc -O3, sm_90a)"
BIN="$BUILD/sm90_gemm_bench"
NVFLAGS=(-O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -lineinfo -Xptxas -v)
if ! timeout 300 "$NVCC" "${NVFLAGS[@]}" -o "$BIN" "$HERE/sm90_gemm_bench.cu" -lcublas > "$OUT/build.log" 2>&1; then
  rc=$?
  echo "BUILD FAILED (rc=$rc); tail of $OUT/build.log:"; tail -30 "$OUT/build.log"
  # If only the link failed, try a libcublas shipped in a Python wheel (nvidia-cublas).
  libdir=$(python3 - <<'PY' 2>/dev/null
import glob, os, site
for d in site.getsitepackages():
    for p in glob.glob(os.path.join(d, "nvidia", "**", "libcublas.so*"), recursive=True):
        print(os.path.dirname(p)); raise SystemExit
PY
)
  if [ -n "$libdir" ]; then
    echo "retrying the link against $libdir"
    [ -e "$libdir/libcublas.so" ] || { mkdir -p "$BUILD/lib"; ln -sf "$(ls "$libdir"/libcublas.so.* | head -1)" "$BUILD/lib/libcublas.so"; ln -sf "$(ls "$libdir"/libcublasLt.so.* | head -1)" "$BUILD/lib/libcublasLt.so"; }
    if timeout 300 "$NVCC" "${NVFLAGS[@]}" -o "$BIN" "$HERE/sm90_gemm_bench.cu" -L"$BUILD/lib" -L"$libdir" \
         -Xlinker -rpath -Xlinker "$libdir" -lcublas > "$OUT/build.log" 2>&1; then
      echo "built $BIN (cuBLAS from $libdir)"
    else
      echo "BUILD FAILED again; tail:"; tail -30 "$OUT/build.log"; exit 1
    fi
  else
    exit 1
  fi
else
  echo "built $BIN"
fi

step "ptxas report (gemm kernels): registers, spills, warnings"
grep -A3 "Compiling entry function '_Z14gemm_ws" "$OUT/build.log" \
  | grep -E "Compiling entry|registers|spill" | sed -e "s/ptxas info    : //" | tee "$OUT/ptxas.txt"
spill_lines=$(grep -A2 "Compiling entry function '_Z14gemm_ws" "$OUT/build.log" | grep -E "[1-9][0-9]* bytes spill" || true)
if [ -n "$spill_lines" ]; then echo "WARNING: spills in gemm kernels:"; echo "$spill_lines"; status=1; else echo "gemm kernels: 0 bytes spill stores/loads, 0 stack"; fi
if grep -iE "warning|C7508|C7510|serializ" "$OUT/build.log"; then echo "WARNING: ptxas/nvcc warnings above (setmaxnreg ignored or wgmma serialized?)"; status=1; fi

step "SASS check (cuobjdump)"
CUOBJDUMP="${CUOBJDUMP:-$(command -v cuobjdump || echo "$(dirname "$(command -v "$NVCC")")/cuobjdump")}"
if timeout 120 "$CUOBJDUMP" -sass "$BIN" > "$BUILD/sass.txt" 2>"$BUILD/sass.err"; then
  {
    echo "kernel | HGMMA | HMMA | UTMALDG | LDL/STL (local memory) | SETMAXREG | HGMMA shapes"
    awk '/Function :/{name=$3} {print name "\t" $0}' "$BUILD/sass.txt" | grep "gemm_ws" > "$BUILD/sass_gemm.txt" || true
    for k in $(cut -f1 "$BUILD/sass_gemm.txt" | sort -u); do
      body=$(grep -F "$k" "$BUILD/sass_gemm.txt")
      printf "%s | %s | %s | %s | %s | %s | %s\n" "$k" \
        "$(grep -c 'HGMMA' <<<"$body")" "$(grep -cE ' HMMA' <<<"$body")" "$(grep -c 'UTMALDG' <<<"$body")" \
        "$(grep -cE ' (LDL|STL)' <<<"$body")" "$(grep -c 'SETMAXREG' <<<"$body")" \
        "$(grep -oE 'HGMMA\.[0-9x]+' <<<"$body" | sort | uniq -c | awk '{printf "%s:%s ", $2, $1}')"
    done
  } | tee "$OUT/sass_check.txt"
  if [ "$(grep -c HGMMA "$BUILD/sass_gemm.txt")" -eq 0 ]; then echo "FAIL: no HGMMA in SASS"; status=1; fi
  if grep -qE ' (LDL|STL)' "$BUILD/sass_gemm.txt"; then echo "WARNING: local memory in gemm kernels"; status=1; fi
else
  echo "cuobjdump failed (rc=$?): $(head -3 "$BUILD/sass.err")"
fi

if [ "${SKIP_RUN:-0}" = 1 ]; then echo "SKIP_RUN=1: not running"; exit $status; fi

step "selftest: wgmma ss / rs / MN-major B wrappers, one warpgroup (bench/sm90/wgmma_selftest.cuh)"
: > "$OUT/selftest.log"
for spec in bf16:64 bf16:128 bf16:256 fp16:64 fp16:128 fp16:256; do
  timeout -k 5 30 "$BIN" --selftest "$spec" 2>&1 | tee -a "$OUT/selftest.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "SELFTEST $spec rc=$rc (1 = a case failed; other = crash/timeout)"; status=1; }
done

step "bench: correctness + timing, bf16 and fp16 at 8192^3 and 4096^3"
# One process per (variant, dtype): a hang or a sticky CUDA error in one variant cannot take
# the others' results with it.  Most promising variants first (a budget stops new jobs).
VARIANTS="${VARIANTS:-128x256_s4_ts 128x256_s4_c2_ts 128x256x32_s8_ts 128x256x32_s8_c2_ts 128x256_s4 128x256_s4_c2 128x256_s4_c4_ts 128x256_s4_c2x2_ts 128x256_s4_c4 128x256_s4_c2x2 128x128_s6 128x256_s4_np}"
DTYPES="${DTYPES:-bf16 fp16}"
SIZES="${SIZES:-8192,4096}"
RASTER_GROUPS="${RASTER_GROUPS:-16,8,4,32}"  # raster group sizes timed (first one is also checked)
PER_RUN_TIMEOUT="${PER_RUN_TIMEOUT:-25}"   # a normal job takes ~3-6 s
BUDGET_S="${BUDGET_S:-190}"                # no new job after this many seconds of run.sh
DIAG="${DIAG:-1}"                  # 1: also time the diagnostic variants (bf16), see the .cu header
: > "$OUT/bench.log"
# SM clock / power / temperature every 200 ms while the bench runs: the clock the GEMMs actually
# ran at sets the real peak (132 SMs x 4096 flop/clk x f), cuBLAS and ours alike.
SMI_PID=""
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu \
    --format=csv -lms 200 > "$OUT/clocks.csv" 2>&1 &
  SMI_PID=$!
fi
TABLE="$OUT/sm90_gemm.md"; rm -f "$TABLE"
JOBS=""; nv=0
for v in $VARIANTS; do
  for d in $DTYPES; do JOBS="$JOBS $v:$d"; done
  nv=$((nv + 1))
  # the diagnostics (bf16 only) go after the 6 most promising variants
  [ "$nv" = 6 ] && [ "$DIAG" = 1 ] && JOBS="$JOBS diag_noload,diag_noload_ts,diag_nostore:bf16"
done
[ "$nv" -lt 6 ] && [ "$DIAG" = 1 ] && JOBS="$JOBS diag_noload,diag_noload_ts,diag_nostore:bf16"
hung=" "
for job in $JOBS; do
  v="${job%%:*}"; d="${job##*:}"
  if [ "$SECONDS" -ge "$BUDGET_S" ]; then echo "--- $v $d SKIPPED: run.sh budget of ${BUDGET_S}s used up"; status=1; continue; fi
  if [[ "$hung" == *" $v "* ]]; then echo "--- $v $d SKIPPED: hung or crashed with the other dtype"; continue; fi
  {
    echo "--- $v $d"
    part="$BUILD/part_${v//,/+}_${d}.md"; rm -f "$part"
    timeout -k 5 "$PER_RUN_TIMEOUT" "$BIN" --sizes "$SIZES" --dtypes "$d" --variants "$v" --groups "$RASTER_GROUPS" --out "$part" ${BENCH_ARGS:-} 2>&1 | tee -a "$OUT/bench.log"
    rc=${PIPESTATUS[0]}
    case $rc in
      0) ;;
      1) echo "FAILED CHECK: $v $d (see table)"; status=1 ;;
      124|137) echo "TIMED OUT after ${PER_RUN_TIMEOUT}s: $v $d (hang?)"; status=1; hung="$hung$v "
               echo "| $d | $SIZES | $v | - | - | - | - | - | - | - | TIMEOUT (${PER_RUN_TIMEOUT}s) |" >> "$BUILD/part_timeouts.md" ;;
      *) echo "CRASHED rc=$rc: $v $d"; status=1; hung="$hung$v "
         echo "| $d | $SIZES | $v | - | - | - | - | - | - | - | CRASH rc=$rc |" >> "$BUILD/part_timeouts.md" ;;
    esac
    if [ -s "$part" ]; then
      if [ ! -s "$TABLE" ]; then cat "$part" > "$TABLE"; else grep '^| [bf]' "$part" >> "$TABLE"; fi
    fi
  }
done
[ -s "$BUILD/part_timeouts.md" ] && cat "$BUILD/part_timeouts.md" >> "$TABLE" && rm -f "$BUILD/part_timeouts.md"

if [ -n "$SMI_PID" ]; then kill "$SMI_PID" 2>/dev/null; wait "$SMI_PID" 2>/dev/null; fi
if [ -s "$OUT/clocks.csv" ]; then
  echo "SM clock while running (MHz): $(awk -F', ' 'NR>1 && $2+0>0 {v=$2+0; n++; s+=v; if(min==""||v<min)min=v; if(v>max)max=v} END {if(n) printf "min %d  mean %.0f  max %d over %d samples", min, s/n, max, n}' "$OUT/clocks.csv")"
  echo "power (W): $(awk -F', ' 'NR>1 {v=$4+0; if(v>max)max=v; s+=v; n++} END {if(n) printf "mean %.0f  max %.0f", s/n, max}' "$OUT/clocks.csv")"
fi

step "table ($TABLE)"
cat "$TABLE" 2>/dev/null || echo "(no table written)"
exit $status
