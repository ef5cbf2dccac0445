#!/bin/bash
# ONE device call (nvidia-h200, 16 cores) that verifies and times branch sm90feat: sliding
# window, softcap and ALiBi on the sm90 (Hopper) forward / backward, written without a GPU
# (session 10, helper "hopper"). Run from a checkout of the branch:
#   run(command="bash dev/sm90feat_session.sh", timeout_s=560)
# Steps (each with its own limit; BUDGET_S, default 540, bounds the whole):
#   1. build the Python package with the CUDA backend (sm_90 + sm_90a) by pip, 16 jobs, and
#      link tests/cuda/cuda_check.cu against the static library that build leaves in build/
#      (one CUDA build serves both; fallback: dev/cuda's CMake harness build);
#   2. (none: the bench once warmed up in the background here; FlexAttention's compile then
#      failed in Triton's temporary build directories, so it now runs alone in step 6);
#   3. cuda_check --sm90feat: every harness case of an sm90 shape (plain + window / softcap /
#      ALiBi), ORCHARD_SM90=1 then 0 (a child process each: the backend reads it once), with
#      the count of cases that ran the sm90 kernels;
#   4. compute-sanitizer memcheck on cuda_check --sm90small (one small window case per path);
#   5. pytest: test_cuda.py -k sm90_shape (asserts the sm90 variant on this card) and the
#      CUDA feature cases of test_features.py, if time is left (SKIP_PYTEST=1: skipped;
#      SKIP_CHECK=1 skips steps 3 and 4: a timing-only call after a verified one; SKIP_BENCH=1
#      skips step 6; BG_CMD runs a GPU job of its own during the build, waited for before step 3;
#      CHECK_MODE=--sm90feat-pass runs step 3's default-dispatch pass only; AB_ROUNDS: step 7's, 2;
#      AB_S: step 7's sequence length, 8192);
#   6. the timing table (nothing else on the GPU meanwhile): window / softcap / ALiBi / plain,
#      fwd and fwd+bwd, orchard sm90 vs FlexAttention vs SDPA, then orchard sm80
#      (ORCHARD_SM90=0) in a child process;
#   7. optional, with the base tree carried: the plain sm90 path of this branch vs the base's,
#      same run (cuda_check --bench-s 8192, alternating new / base): prepare it before the call
#        rm -rf .ab/sm90base && mkdir -p .ab/sm90base && git archive BASE src include | tar -x -C .ab/sm90base
#      (BASE: the commit this tree is compared with, e.g. the merge base 7486155 or the main it is
#      merged onto; its params.h / launch headers must equal this tree's, else the A/B is skipped)
#      and pass carry=[".ab/sm90base"]; the base binary is this build's library with the 10 sm_90a
#      kernel objects recompiled from the base sources (everything else is unchanged by the branch
#      except the dispatch, which treats plain calls alike).
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

# ---- 0. BG_CMD (optional): a GPU job of its own (e.g. bash bench/sm90/run_attn.sh, the kernel-level
#      checks and timings) that runs while step 1 compiles on the host; waited for before step 3 ----
BG_PID=""
if [[ -n ${BG_CMD:-} ]]; then
  (timeout 330 bash -c "$BG_CMD" > "$L/bg.log" 2>&1; echo "bg rc=$?" >> "$L/bg.log") &
  BG_PID=$!
  stamp "background: $BG_CMD"
fi

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
BASE_SRC=${BASE_SRC:-.ab/sm90base}
# The base kernels must see the same parameter structs and launch declarations as this build.
abi_same() {
  local f
  for f in include/orchard/params.h src/backends/cuda/launch.h src/backends/cuda/sm90/flash_fwd_sm90_launch.h \
    src/backends/cuda/sm90/flash_bwd_sm90_launch.h; do
    cmp -s "$f" "$BASE_SRC/$f" || { stamp "plain A/B skipped: $f differs from $BASE_SRC's"; return 1; }
  done
}
BASE_PIDS=()
if [[ -d $BASE_SRC/src/backends/cuda/sm90 && -n $LIB ]] && abi_same; then  # base sm_90a kernel objects, in parallel
  mkdir -p /tmp/sm90base
  for f in "$BASE_SRC"/src/backends/cuda/sm90/flash_*_sm90_*_d*.cu; do
    nvcc -std=c++20 -I"$BASE_SRC/src" -I"$BASE_SRC/include" -DORCHARD_WITH_SM90=1 -gencode=arch=compute_90a,code=sm_90a \
      --expt-relaxed-constexpr -O3 -lineinfo -Xcompiler=-fPIC -c "$f" -o "/tmp/sm90base/$(basename "$f").o" \
      > "/tmp/sm90base/$(basename "$f").log" 2>&1 &
    BASE_PIDS+=($!)
  done
fi
nvcc -std=c++20 -O2 -Isrc -Iinclude -gencode=arch=compute_90,code=sm_90 -Xcompiler=-fopenmp \
  -c tests/cuda/cuda_check.cu -o /tmp/cuda_check.o > "$L/cuda_check_build.log" 2>&1 &&
  nvcc /tmp/cuda_check.o "$LIB" -o $CC -Xcompiler=-fopenmp -lgomp -lpthread -ldl -lrt >> "$L/cuda_check_build.log" 2>&1
r=$?
stamp "cuda_check linked against $LIB rc=$r"
((${#BASE_PIDS[@]})) && wait "${BASE_PIDS[@]}"  # the base objects, if any (not BG_CMD)
CCB=""
if ls /tmp/sm90base/*.o > /dev/null 2>&1 && [[ -f /tmp/cuda_check.o ]]; then
  # Same library, the 10 sm_90a kernel members replaced (ar r replaces members of the same name).
  cp "$LIB" /tmp/liborchard_base.a
  ar t /tmp/liborchard_base.a | grep -c sm90 > "$L/base_lib.log"
  ar r /tmp/liborchard_base.a /tmp/sm90base/*.o >> "$L/base_lib.log" 2>&1
  ar t /tmp/liborchard_base.a | grep -c sm90 >> "$L/base_lib.log"
  # The member count must not change (else the names did not match and both versions are in).
  if [[ $(sed -n 1p "$L/base_lib.log") == $(tail -1 "$L/base_lib.log") ]]; then
    nvcc /tmp/cuda_check.o /tmp/liborchard_base.a -o /tmp/cuda_check_base -Xcompiler=-fopenmp -lgomp -lpthread -ldl -lrt \
      >> "$L/base_lib.log" 2>&1 && CCB=/tmp/cuda_check_base
  fi
  stamp "base binary (sm90 kernels from $BASE_SRC): ${CCB:-failed} ($(ls /tmp/sm90base/*.o | wc -l) objects; sm90 members before/after: $(grep -E '^[0-9]+$' "$L/base_lib.log" | tr '\n' ' '))"
fi
if ((r != 0)); then  # fallback: the standalone harness build (compiles the CUDA sources again)
  tail -20 "$L/cuda_check_build.log"
  cmake -S dev/cuda -B /tmp/build-dev -G Ninja -DORCHARD_CUDA_ARCHS=90 > "$L/harness_build.log" 2>&1 &&
    timeout $(lim 200) ninja -C /tmp/build-dev -j16 cuda_check >> "$L/harness_build.log" 2>&1
  CC=/tmp/build-dev/cuda_check
  stamp "harness fallback build rc=$?"
fi

if [[ -n $BG_PID ]]; then
  wait "$BG_PID"
  stamp "background done: $(tail -1 "$L/bg.log")"
  grep -E "CHECK.*FAIL|TIME|PEER|failing|spill|WARNING" "$L/bg.log" > "$OUT/bg_summary.txt"
  snap
fi

# ---- 3. correctness: the harness on sm90 shapes, sm90 then sm80 ----
if [[ -n ${SKIP_CHECK:-} ]]; then
  stamp "correctness steps skipped (SKIP_CHECK)"
elif [[ -x $CC ]]; then
  timeout 200 $CC ${CHECK_MODE:---sm90feat} > "$L/check.log" 2>&1
  r=$?
  stamp "cuda_check ${CHECK_MODE:---sm90feat} rc=$r"
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
if [[ -z ${SKIP_PYTEST:-} ]] && (($(left) > 200)); then
  (cd tests/python && timeout $(lim 170) python3 -m pytest -q -p no:cacheprovider -x \
    test_cuda.py -k "sm90_shape" > "$L/pytest_sm90_shape.log" 2>&1)
  stamp "pytest test_cuda.py -k sm90_shape rc=$?: $(tail -1 "$L/pytest_sm90_shape.log")"
fi
if [[ -z ${SKIP_PYTEST:-} ]] && (($(left) > 170)); then
  (cd tests/python && timeout $(lim 150) python3 -m pytest -q -p no:cacheprovider \
    test_features.py -k "fwd_bwd_vs_reference and cuda" > "$L/pytest_features.log" 2>&1)
  stamp "pytest test_features.py (cuda) rc=$?: $(tail -1 "$L/pytest_features.log")"
fi
snap

# ---- 6. timings (alone on the GPU: FlexAttention compiles, then every impl is timed, then the
#      sm80 A/B in a child process) ----
if [[ -z ${SKIP_BENCH:-} ]]; then
  timeout $(lim 70) python3 dev/cuda/sm90feat_bench.py --out "$OUT" ${BENCH_ARGS:-} > "$L/bench.log" 2>&1
  stamp "bench rc=$?"
  if [[ -f $OUT/sm90feat_bench.md ]]; then cat "$OUT/sm90feat_bench.md" | tee -a "$OUT/summary.txt"; else tail -30 "$L/bench.log"; fi
  snap
fi

# ---- 7. plain sm90 path: this branch vs the base tree, same run, alternating ----
if [[ -n $CCB && -x $CC ]]; then
  for round in $(seq 1 "${AB_ROUNDS:-2}"); do
    for who in new base; do
      (($(left) > 40)) || break 2
      bin=$CC; [[ $who == base ]] && bin=$CCB
      timeout 60 $bin --bench-s "${AB_S:-8192}" > "$L/plain_ab_${who}_$round.log" 2>&1
      stamp "plain A/B $who round $round rc=$?"
      grep -E "^ +(64|128) " "$L/plain_ab_${who}_$round.log" | tee -a "$OUT/summary.txt"
    done
  done
fi
snap
stamp done
