#!/usr/bin/env bash
# A/B of sm90 forward variants in one device call (issue #11), the forward's ab_bwd.sh: builds
# sm90_attn_bench's library entry (SM90_BENCH_LIBRARY_ONLY) once per variant in parallel, runs
# each variant's correctness checks, then ROUNDS alternating rounds of the bench's MODES (e.g.
# "d128 d256 causal": sm90_attn_bench.cu's modes) and prints, per shape, the median over the
# rounds of each variant's TFLOP/s and its ratio to the first variant.  From the repository root
# on an H100/H200:
#   VARIANTS="base=-DORCHARD_SM90_FWD_PINGPONG_MAX_D=0 pp=-DORCHARD_SM90_FWD_PINGPONG_MAX_D=128" \
#     MODES="d128 causal" bash bench/sm90/ab_fwd.sh
# A variant is NAME=FLAGS (nvcc -D flags, spaces as commas) or NAME=@TREE (built from another
# tree's src/ and include/, e.g. `git archive REV | tar -x -C .ab/head`, carried along).
# BUCKET=<64|128|192|256> builds one head-dim bucket only (0, the default: all).
# Writes $OUT/ab_fwd.log (+ $OUT/build_<NAME>.log, $OUT/checks_<NAME>.log).
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="${OUT:-/tmp/sm90_out}"
NVCC="${NVCC:-nvcc}"
ROUNDS="${ROUNDS:-3}"
MODES="${MODES:-d128}"
mkdir -p "$OUT/ab_build"
LOG="$OUT/ab_fwd.log"
read -r -a variants <<< "${VARIANTS:?VARIANTS=\"name=flags ...\"}"
read -r -a modes <<< "$MODES"
names=()
echo "=== build $(date -u +%H:%M:%S) BUCKET=${BUCKET:-0} MODES=$MODES" | tee -a "$LOG"
for v in "${variants[@]}"; do
  name=${v%%=*} spec=${v#*=}
  names+=("$name")
  tree=$ROOT flags=()
  if [[ $spec == @* ]]; then tree=$ROOT/${spec#@}; else IFS=, read -r -a flags <<< "$spec"; fi
  ( timeout 500 "$NVCC" -O3 -std=c++20 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -lineinfo \
      -Xptxas -v -DSM90_BENCH_LIBRARY_ONLY -DSM90_BENCH_BUCKET="${BUCKET:-0}" "${flags[@]}" -I"$tree/include" \
      -I"$tree/src" -I"$HERE" -o "$OUT/ab_build/$name" "$HERE/sm90_attn_bench.cu" > "$OUT/build_$name.log" 2>&1 \
    || echo "BUILD FAILED $name" | tee -a "$LOG" ) &
done
wait
echo "=== built $(date -u +%H:%M:%S)" | tee -a "$LOG"
built=()
for name in "${names[@]}"; do
  [ -x "$OUT/ab_build/$name" ] || { echo "no binary for $name: left out" | tee -a "$LOG"; continue; }
  grep -A2 "flash_fwd_sm90_kernel" "$OUT/build_$name.log" | grep -E "[1-9][0-9]* bytes spill" | sort | uniq -c \
    | sed "s/^/spills $name: /" | tee -a "$LOG"
  timeout 120 "$OUT/ab_build/$name" checks > "$OUT/checks_$name.log" 2>&1
  rc=$?
  echo "checks $name rc=$rc $(grep -c PASS "$OUT/checks_$name.log") pass $(grep -c FAIL "$OUT/checks_$name.log") fail" \
    | tee -a "$LOG"
  # A variant that fails a check or hangs is not timed: its speed would mean nothing.
  [ $rc -eq 0 ] && built+=("$name")
done
names=("${built[@]}")
[ ${#names[@]} -gt 0 ] || exit 1
for r in $(seq "$ROUNDS"); do
  for name in "${names[@]}"; do
    for mode in "${modes[@]}"; do
      echo "=== round $r $name $mode $(date -u +%H:%M:%S)" >> "$LOG"
      timeout 150 "$OUT/ab_build/$name" "$mode" | grep TIME | sed "s/^TIME /TIME $name /" >> "$LOG" 2>&1
    done
  done
done
python3 - "$LOG" "${names[@]}" <<'PY' | tee -a "$LOG"
import re, statistics, sys
log, names = sys.argv[1], sys.argv[2:]
runs = {}
for line in open(log):
    m = re.match(r"TIME (\S+) (.+?)\s+library\s+[\d.]+ ms\s+([\d.]+) TFLOP/s", line)
    if m: runs.setdefault(m.group(2), {}).setdefault(m.group(1), []).append(float(m.group(3)))
print("median TFLOP/s over the rounds, ratio to", names[0])
for shape, per in runs.items():
    base = statistics.median(per.get(names[0], [float("nan")]))
    cells = []
    for n in names:
        med = statistics.median(per.get(n, [float("nan")]))
        cells.append(f"{n} {med:6.1f} ({med / base:.3f}x)")
    print(f"{shape:44s} " + " | ".join(cells))
PY
