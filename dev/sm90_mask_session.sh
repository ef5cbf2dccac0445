#!/usr/bin/env bash
# One device call for the sm90 kernels' row-broadcast attn_bias (issue #16, session 37): package
# build, compute-sanitizer memcheck (all buckets) and racecheck (d64 / d128) on
# bench/sanitizer_sm90_mask.py, then the masked SDPA bench (quick: b4 s1024) in two alternating
# rounds with the sm90 path on and off (ORCHARD_SM90=0: the sm80 kernels), each against cuDNN in
# the same process.  Results under $OUT/s.
set -u
mkdir -p "$OUT/s"
OUT=$OUT/s bash dev/gpu_session.sh "cs:memcheck,bench/sanitizer_sm90_mask.py" 2>&1 | tail -5
export PYTHONPATH=/tmp/orchard_site
SANITIZE_DIMS=64,128 timeout 200 compute-sanitizer --tool racecheck --error-exitcode 3 \
  python3 bench/sanitizer_sm90_mask.py > "$OUT/s/racecheck.log" 2>&1
echo "racecheck rc=$? $(grep -E 'RACECHECK SUMMARY' "$OUT/s/racecheck.log" | tail -1)"
tail -3 "$OUT/s/racecheck.log"
for r in 1 2; do
  for m in 1 0; do
    mkdir -p "$OUT/s/q$m$r"
    ORCHARD_SM90=$m timeout 100 python3 bench/feature_bench.py --out "$OUT/s/q$m$r" --quick --only mask,bias,mask64 \
      > "$OUT/s/q$m$r/log" 2>&1
    echo "sm90=$m round $r rc=$?"
  done
done
