#!/bin/bash
# ONE device call (nvidia-h200, 16 cores) that verifies and times branch sm90feat: sliding
# window, softcap and ALiBi on the sm90 (Hopper) forward / backward, written without a GPU
# (session 10, helper "hopper"). Run from a checkout of the branch:
#   run(command="bash dev/sm90feat_session.sh", timeout_s=560)
# Steps (each with its own limit; BUDGET_S, default 540, bounds the whole):
#   1. build the Python package with the CUDA backend (sm_90 + sm_90a) by pip, 16 jobs, and
#      link tests/cuda/cuda_check.cu against the static library that build leaves in build/
#      (one CUDA build serves both; fallback: dev/cuda's CMake harness build);
#   2. in the background, dev/cuda/sm90feat_bench.py compiles FlexAttention and warms every
#      call (recording kernel variants and sm90-vs-sm80 differences), then waits;
#   3. cuda_check --sm90feat: every harness case of an sm90 shape (plain + window / softcap /
#      ALiBi), ORCHARD_SM90=1 then 0, with the count of cases that ran the sm90 kernels;
#   4. compute-sanitizer memcheck on cuda_check --sm90small (one small window case per path);
#   5. pytest: test_cuda.py -k sm90_shape (asserts the sm90 variant on this card) and the
#      CUDA feature cases of test_features.py, if time is left;
#   6. the timing table (nothing else on the GPU meanwhile): window / softcap / ALiBi / plain,
#      fwd and fwd+bwd, orchard sm90 vs orchard sm80 (ORCHARD_SM90=0) vs FlexAttention vs SDPA.
# Results in $OUT: summary.txt, sm90feat_bench.md / .json, logs.tgz (every log).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-/tmp/sm90feat-out}
L="$OUT/logs"
mkdir -p "$L"
BUDGET_S=${BUDGET_S:-540}
t0=$(date +%s)
left() { echo $((BUDGET_S - ($(date +%s) - t0))); }
lim() { local x=$(($(left) - $1)); ((x < 20)) && x=20; echo $x; }  # a step's limit: what is left minus a reserve
stamp() { echo "[$(($(date +%s) - t0))s] $*" | tee -a "$OUT/summary.txt"; }
snap() { (cd "$OUT" && tar czf logs.tgz logs); }
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$L/gpu.txt"
stamp "commit $(git rev-parse --short HEAD 2>/dev/null || cat COMMIT 2>/dev/null || echo '?')"

# ---- 1. build ----
rm -rf build/cp3* /tmp/orchard_site
ORCHARD_CUDA=ON ORCHARD_CUDA_ARCHS=90 CMAKE_BUILD_PARALLEL_LEVEL=16 timeout 330 \
  python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/orchard_site . > "$L/build.log" 2>&1
r=$?
stamp "package build rc=$r"
if ((r != 0)); then tail -40 "$L/build.log"; snap; exit 1; fi
export PYTHONPATH=/tmp/orchard_site
python3 -c "import orchard, json; print(json.dumps(orchard.build_info()))" | tee -a "$OUT/summary.txt"
LIB=$(find build -name liborchard.a | head -1)
CC=/tmp/cuda_check
nvcc -std=c++20 -O2 -Isrc -Iinclude -gencode=arch=compute_90,code=sm_90 -Xcompiler=-fopenmp \
  tests/cuda/cuda_check.cu "$LIB" -o $CC -lgomp -lpthread -ldl -lrt > "$L/cuda_check_build.log" 2>&1
r=$?
stamp "cuda_check linked against $LIB rc=$r"
if ((r != 0)); then  # fallback: the standalone harness build (compiles the CUDA sources again)
  tail -20 "$L/cuda_check_build.log"
  cmake -S dev/cuda -B /tmp/build-dev -G Ninja -DORCHARD_CUDA_ARCHS=90 > "$L/harness_build.log" 2>&1 &&
    timeout $(lim 200) ninja -C /tmp/build-dev -j16 cuda_check >> "$L/harness_build.log" 2>&1
  CC=/tmp/build-dev/cuda_check
  stamp "harness fallback build rc=$?"
fi

# ---- 2. bench warm-up in the background (FlexAttention compiles; waits for /tmp/sm90feat_go) ----
rm -f /tmp/sm90feat_go
timeout $(lim 10) python3 dev/cuda/sm90feat_bench.py --out "$OUT" --go /tmp/sm90feat_go > "$L/bench.log" 2>&1 &
BENCH=$!

# ---- 3. correctness: the harness on sm90 shapes, sm90 then sm80 ----
if [[ -x $CC ]]; then
  timeout 200 $CC --sm90feat > "$L/check.log" 2>&1
  r=$?
  stamp "cuda_check --sm90feat rc=$r"
  grep -E "^ORCHARD_SM90=|cases passed" "$L/check.log" | tee -a "$OUT/summary.txt"
  grep -B12 "=> FAIL" "$L/check.log" | grep -E "^\[|variant|FAIL|NaN" | head -40 | tee -a "$OUT/summary.txt"
  snap
  # ---- 4. memcheck on one small window case per path (sm90 where it applies) ----
  if (($(left) > 150)); then
    timeout 120 compute-sanitizer --tool memcheck --error-exitcode 3 $CC --sm90small > "$L/memcheck.log" 2>&1
    r=$?
    stamp "memcheck --sm90small rc=$r: $(grep -E 'ERROR SUMMARY' "$L/memcheck.log" | tail -1) $(grep -E 'sm90 forward on' "$L/memcheck.log")"
    ((r != 0)) && grep -E "=> FAIL|Invalid|out of bounds|at 0x" "$L/memcheck.log" | head -12 | tee -a "$OUT/summary.txt"
  fi
else
  stamp "no cuda_check binary: correctness steps skipped"
fi
snap

# ---- 5. pytest (only with time to spare: the timing table comes first) ----
if (($(left) > 200)); then
  (cd tests/python && timeout $(lim 170) python3 -m pytest -q -p no:cacheprovider -x \
    test_cuda.py -k "sm90_shape" > "$L/pytest_sm90_shape.log" 2>&1)
  stamp "pytest test_cuda.py -k sm90_shape rc=$?: $(tail -1 "$L/pytest_sm90_shape.log")"
fi
if (($(left) > 170)); then
  (cd tests/python && timeout $(lim 150) python3 -m pytest -q -p no:cacheprovider \
    test_features.py -k "fwd_bwd_vs_reference and cuda" > "$L/pytest_features.log" 2>&1)
  stamp "pytest test_features.py (cuda) rc=$?: $(tail -1 "$L/pytest_features.log")"
fi
snap

# ---- 6. timings (alone on the GPU) ----
for i in $(seq 1 200); do grep -q "^ready" "$L/bench.log" && break; kill -0 $BENCH 2>/dev/null || break; sleep 1; done
stamp "bench warm: $(grep -c '^\[warm\]' "$L/bench.log") cases"
grep "^\[warm\]" "$L/bench.log" | tee -a "$OUT/summary.txt"
touch /tmp/sm90feat_go
wait $BENCH
stamp "bench rc=$?"
if [[ -f $OUT/sm90feat_bench.md ]]; then cat "$OUT/sm90feat_bench.md" | tee -a "$OUT/summary.txt"; else tail -30 "$L/bench.log"; fi
snap
stamp done
