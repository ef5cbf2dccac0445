#!/usr/bin/env bash
# Device script (run on the lent H100 through the device tool):
# build the package with the CUDA backend on all cores, run the GPU test suite,
# compute-sanitizer on small fwd/bwd cases, then the benchmark grid.
#
#   bash bench/gpu_check.sh [tests|bench|all|none] [extra pytest args]
# Env: ORCHARD_FUZZ_EXAMPLES (GPU fuzz factor), PROFILE=D,S,CAUSAL (torch.profiler
# kernel table of orchard vs FA2 at one point), BENCH_ARGS (for gpu_bench.py).
# Writes logs and results under $OUT (default ./gpu_out).
set -uo pipefail
MODE="${1:-all}"; shift || true
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$ROOT/gpu_out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$ROOT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/card.txt"

# A second call on the same warm machine reuses the build of the same tree.
TREE=$(git rev-parse HEAD 2>/dev/null)-$(git status --porcelain 2>/dev/null | sha256sum | cut -c1-12)
if [ "$(cat /tmp/orchard_site/.tree 2>/dev/null)" = "$TREE" ]; then
  echo "=== build: reusing /tmp/orchard_site ($TREE)"
else
  echo "=== build ($(date +%T))"
  rm -rf build/cp3* /tmp/orchard_site  # a wheel build dir carried from another machine must not be reused
  export ORCHARD_CUDA=ON ORCHARD_CUDA_ARCHS="${ORCHARD_CUDA_ARCHS:-90}" CMAKE_BUILD_PARALLEL_LEVEL=16
  python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/orchard_site . > "$OUT/build.log" 2>&1 \
    || { tail -50 "$OUT/build.log"; exit 1; }
  echo "$TREE" > /tmp/orchard_site/.tree
fi
export PYTHONPATH=/tmp/orchard_site
python3 -c "import orchard, json; print(json.dumps(orchard.build_info()))"

rc=0
if [ "$MODE" = tests ] || [ "$MODE" = all ]; then
  echo "=== GPU tests ($(date +%T))"
  # ORCHARD_FUZZ_EXAMPLES (default 1 = 360 GPU differential cases) scales the sweep.
  (cd tests/python && timeout "${PYTEST_TIMEOUT:-420}" python3 -m pytest -q -p no:cacheprovider -m cuda --durations=8 "$@" . 2>&1 |
    tee "$OUT/pytest_gpu.log"; exit "${PIPESTATUS[0]}") || rc=1
fi
# compute-sanitizer on bench/sanitizer_case.py: by default all three tools in
# tests/all mode; SANITIZERS="..." picks the tools in any mode ("" = none).
case "$MODE" in tests|all) : "${SANITIZERS=memcheck racecheck synccheck}" ;; *) : "${SANITIZERS=}" ;; esac
if [ -n "$SANITIZERS" ]; then
  echo "=== compute-sanitizer ($(date +%T))"
  for tool in $SANITIZERS; do
    timeout "${SANITIZER_TIMEOUT:-150}" compute-sanitizer --tool $tool --error-exitcode 3 python3 bench/sanitizer_case.py \
      > "$OUT/sanitizer_$tool.log" 2>&1
    echo "$tool rc=$? : $(tail -1 "$OUT/sanitizer_$tool.log")"
  done
fi
if [ -n "${PROFILE:-}" ]; then
  echo "=== profile $PROFILE ($(date +%T))"
  python3 bench/gpu_bench.py --out "$OUT" --profile "$PROFILE" || rc=1
fi
if [ "$MODE" = bench ] || [ "$MODE" = all ]; then
  echo "=== benchmark ($(date +%T))"
  python3 bench/gpu_bench.py --out "$OUT" ${BENCH_ARGS:-} || rc=1
fi
exit $rc
