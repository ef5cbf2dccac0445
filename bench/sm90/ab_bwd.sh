#!/usr/bin/env bash
# A/B of sm90 backward variants in one device call (issue #11): builds sm90_bwd_bench once per
# variant in parallel (one bucket, SM90_BWD_BENCH_D), runs each variant's correctness checks, then
# ROUNDS alternating rounds of the bench's "bulk" mode (the library's default form, FA grid) and
# prints, per shape, the median over the rounds of each variant's TFLOP/s and its ratio to the
# first variant.  Run from the repository root on an H100/H200:
#   D=64 VARIANTS="base=@.ab/head new= pipe1=-DORCHARD_SM90_BWD64_PIPE=1" bash bench/sm90/ab_bwd.sh
# A variant is NAME=FLAGS (nvcc -D flags, spaces as commas) or NAME=@TREE (the bench built from
# another tree's src/ and include/, e.g. `git archive REV | tar -x -C .ab/head`, carried along).
# Writes $OUT/ab_bwd.log (+ $OUT/build_<NAME>.log).
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="${OUT:-/tmp/sm90_out}"
NVCC="${NVCC:-nvcc}"
D="${D:-64}"
ROUNDS="${ROUNDS:-3}"
mkdir -p "$OUT/ab_build"
LOG="$OUT/ab_bwd.log"
read -r -a variants <<< "${VARIANTS:?VARIANTS=\"name=flags ...\"}"
names=()
echo "=== build $(date -u +%H:%M:%S) D=$D" | tee -a "$LOG"
for v in "${variants[@]}"; do
  name=${v%%=*} spec=${v#*=}
  names+=("$name")
  tree=$ROOT flags=()
  if [[ $spec == @* ]]; then tree=$ROOT/${spec#@}; else IFS=, read -r -a flags <<< "$spec"; fi
  ( timeout 500 "$NVCC" -O3 -std=c++20 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -lineinfo \
      -Xptxas -v -DSM90_BWD_BENCH_D="$D" "${flags[@]}" -I"$tree/include" -I"$tree/src" -I"$HERE" \
      -o "$OUT/ab_build/$name" "$HERE/sm90_bwd_bench.cu" > "$OUT/build_$name.log" 2>&1 \
    || echo "BUILD FAILED $name" | tee -a "$LOG" ) &
done
wait
echo "=== built $(date -u +%H:%M:%S)" | tee -a "$LOG"
built=()
for name in "${names[@]}"; do
  [ -x "$OUT/ab_build/$name" ] || { echo "no binary for $name: left out" | tee -a "$LOG"; continue; }
  built+=("$name")
  grep -A2 "flash_bwd_sm90_kernel" "$OUT/build_$name.log" | grep -E "[1-9][0-9]* bytes spill" | sort | uniq -c \
    | sed "s/^/spills $name: /" | tee -a "$LOG"
  timeout 120 "$OUT/ab_build/$name" checks > "$OUT/checks_$name.log" 2>&1
  echo "checks $name rc=$? $(grep -c PASS "$OUT/checks_$name.log") pass $(grep -c FAIL "$OUT/checks_$name.log") fail" | tee -a "$LOG"
done
names=("${built[@]}")
[ ${#names[@]} -gt 0 ] || exit 1
for r in $(seq "$ROUNDS"); do
  for name in "${names[@]}"; do
    echo "=== round $r $name $(date -u +%H:%M:%S)" >> "$LOG"
    timeout 120 "$OUT/ab_build/$name" bulk | sed "s/^TIME /TIME $name /" >> "$LOG" 2>&1
  done
done
python3 - "$LOG" "${names[@]}" <<'PY' | tee -a "$LOG"
import re, statistics, sys
log, names = sys.argv[1], sys.argv[2:]
runs = {}
for line in open(log):
    m = re.match(r"TIME (\S+) (.+?)\s+bulk\s+[\d.]+ ms\s+([\d.]+) TFLOP/s", line)
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
