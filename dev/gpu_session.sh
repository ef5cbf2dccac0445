#!/usr/bin/env bash
# One device call (run through the device tool on the lent H200): build the
# package with the CUDA backend (sm_90, or GPU_ARCHS such as "80;90", as shipped; 16
# cores) from SRC (default: the repo),
# then the steps named on the command line, each with its own time limit,
# writing logs under $OUT (re-packed into $OUT/logs.tgz after every step, so a
# call cut off still returns what ran).
#
#   bash dev/gpu_session.sh [SRC=dir] STEP...
#   (archive a commit for a run: git archive HEAD | tar -x -C .ab/head && git rev-parse --short HEAD > .ab/head/COMMIT;
#    for the working tree itself pass ORCHARD_COMMIT=<rev>: the device copy's git metadata may
#    name an older commit, as session 24's first grid found)
#   steps: pytest:<files, comma-separated> or pytest:-k,<one -k expression>  bench_quick  bench_full
#          feature_bench  sanitize  decode_bench  cp_bench  cpu_bench  smi
#          py:<script>,<args>  sh:<script>,<args>  cs:<sanitizer tool>,<script>
#          (py: / sh: quoted with spaces, "py:<script> --impls a,b", keep their commas)
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SRC="$ROOT"
if [[ ${1:-} == SRC=* ]]; then SRC="$(cd "${1#SRC=}" && pwd)"; shift; fi
OUT="${OUT:-$ROOT/gpu_out}"; mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1
# NVLink multicast stays off on multi-GPU machines (it can take the host's GPUs out of service).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
t0=$(date +%s)
snap() { (cd "$OUT" && tar czf logs.tgz logs); }
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
# A py: / sh: step's words: commas for spaces, unless the step was quoted with spaces.
step_args() { if [[ $1 == *" "* ]]; then echo "$1"; else echo "${1//,/ }"; fi; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/logs/card.txt"
stamp "build from $SRC"
cd "$SRC"
# An archived tree (git archive into .ab/...) carries its commit in COMMIT: the device
# copy's git metadata would name another one.
[ -f COMMIT ] && export ORCHARD_COMMIT="$(cat COMMIT)"
# A warm machine keeps /tmp/orchard_site between calls: rebuild when the sources differ from the
# build's (session 63 ran one call on the previous call's build after a change).
src_hash=$(bash "$ROOT/dev/source_hash.sh" .)
if [ "$(cat /tmp/orchard_site/.built 2>/dev/null)" != "$src_hash" ]; then
  rm -rf build/cp3* /tmp/orchard_site
  ORCHARD_CUDA=${ORCHARD_CUDA:-ON} ORCHARD_CUDA_ARCHS="${GPU_ARCHS:-90}" CMAKE_BUILD_PARALLEL_LEVEL=16 \
    python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/orchard_site . > "$OUT/logs/build.log" 2>&1 \
    || { tail -60 "$OUT/logs/build.log"; snap; exit 1; }
  echo "$src_hash" > /tmp/orchard_site/.built
fi
export PYTHONPATH=/tmp/orchard_site
python3 -c "import orchard, json; print(json.dumps(orchard.build_info()))"
stamp "built"
rc=0
for step in "$@"; do
  case "$step" in
    pytest:*)
      args="${step#pytest:}"; args="${args//,/ }"
      # "pytest:-k,<expr>": the rest is one -k expression (it may hold spaces: "192 or 160").
      if [[ $args == "-k "* ]]; then pyargs=(-k "${args#-k }"); else read -ra pyargs <<< "$args"; fi
      log="$OUT/logs/pytest_$(echo "$args" | tr -c 'a-zA-Z0-9' '_' | cut -c1-40).log"
      stamp "pytest $args"
      # A hung kernel never returns: pytest-timeout (on the device image) fails that test after
      # PYTEST_CASE_TIMEOUT s and names it (session 52 lost two calls to one that printed nothing).
      case_timeout=()
      python3 -c "import pytest_timeout" 2>/dev/null && case_timeout=(--timeout "${PYTEST_CASE_TIMEOUT:-120}" --timeout-method thread)
      (cd tests/python && timeout "${PYTEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -m cuda --maxfail=25 --durations=5 "${case_timeout[@]}" "${pyargs[@]}" \
        > "$log" 2>&1; r=$?; echo "pytest rc=$r"; exit $r) || rc=1
      tail -n 15 "$log" | grep -E "passed|failed|error|FAILED" | tail -n 8 ;;
    bench_quick)
      stamp "gpu_bench --quick"
      timeout 240 python3 bench/gpu_bench.py --out "$OUT/logs" --quick --impls orchard,sdpa_flash,sdpa_cudnn > "$OUT/logs/bench_quick.log" 2>&1 || rc=1
      tail -30 "$OUT/logs/bench_quick.log" ;;
    bench_full)
      stamp "gpu_bench"
      timeout 420 python3 bench/gpu_bench.py --out "$OUT/logs" > "$OUT/logs/bench_full.log" 2>&1 || rc=1
      tail -40 "$OUT/logs/bench_full.log" ;;
    feature_bench)
      stamp "feature_bench"
      timeout "${FB_TIMEOUT:-300}" python3 bench/feature_bench.py --out "$OUT/logs" ${FB_ARGS:-} > "$OUT/logs/feature_bench.log" 2>&1 || rc=1
      cat "$OUT/logs/feature_bench.md" 2>/dev/null || tail -30 "$OUT/logs/feature_bench.log" ;;
    decode_bench)
      stamp "decode_bench"
      timeout "${DB_TIMEOUT:-240}" python3 bench/decode_bench.py ${DB_ARGS:-} --out "$OUT/logs/decode_bench.md" > "$OUT/logs/decode_bench.log" 2>&1 || rc=1
      tail -40 "$OUT/logs/decode_bench.log" ;;
    sanitize)
      for tool in memcheck racecheck; do
        stamp "compute-sanitizer $tool"
        timeout 180 compute-sanitizer --tool $tool --error-exitcode 3 python3 bench/sanitizer_case.py \
          > "$OUT/logs/sanitizer_$tool.log" 2>&1; r=$?; (( r != 0 )) && rc=1
        echo "$tool rc=$r: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/logs/sanitizer_$tool.log" | tail -1)"
      done ;;
    cp_bench)  # context parallelism on a 2-GPU machine (multicast off: it can take the host's GPUs down)
      stamp "cp_bench (torchrun, 2 GPUs)"
      NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        timeout "${CP_TIMEOUT:-300}" torchrun --standalone --nproc-per-node=2 bench/cp_bench.py \
        --out "$OUT/logs/cp_bench.md" > "$OUT/logs/cp_bench.log" 2>&1 || rc=1
      cat "$OUT/logs/cp_bench.md" 2>/dev/null || tail -40 "$OUT/logs/cp_bench.log" ;;
    cpu_bench)  # issue 15: the host's CPUs (CPU timing only), same thread count for both
      stamp "cpu_bench (${CPU_THREADS:-16} threads, wall clock)"
      lscpu | grep -E "Model name|^CPU\(s\)|Thread|Socket|L1d|L2|L3" > "$OUT/logs/cpu.txt"
      grep -m1 -o -E "avx512_bf16|amx_bf16|amx_tile|avx512f" /proc/cpuinfo | sort -u | tr "\n" " " >> "$OUT/logs/cpu.txt"
      cat "$OUT/logs/cpu.txt"
      OMP_NUM_THREADS=${CPU_THREADS:-16} timeout "${CPU_TIMEOUT:-240}" python3 bench/cpu_bench.py --grid "${CPU_GRID:-full}" \
        --clock wall --reps 3 --min-time "${CPU_MIN_TIME:-0.5}" > "$OUT/logs/cpu_bench.md" 2>&1 || rc=1
      cat "$OUT/logs/cpu_bench.md" ;;
    py:*)  # py:<script>,<args...>: any script of the tree (e.g. a bench), its own log (step_args)
      args=$(step_args "${step#py:}"); name=$(basename "${args%% *}" .py)
      stamp "python3 $args"
      timeout "${PY_TIMEOUT:-180}" python3 $args > "$OUT/logs/py_$name.log" 2>&1; r=$?; (( r != 0 )) && rc=1
      echo "$name rc=$r"; tail -${PY_TAIL:-25} "$OUT/logs/py_$name.log" ;;
    sh:*)  # sh:<script>,<args>: a shell script of the tree (e.g. bench/sm90/run.sh), its own log (step_args)
      args=$(step_args "${step#sh:}"); name=$(basename "${args%% *}" .sh)
      stamp "bash $args"
      timeout "${SH_TIMEOUT:-180}" bash $args > "$OUT/logs/sh_$name.log" 2>&1; r=$?; (( r != 0 )) && rc=1
      echo "$name rc=$r"; tail -${SH_TAIL:-25} "$OUT/logs/sh_$name.log" ;;
    cs:*)  # cs:<tool>,<script>: compute-sanitizer <tool> on python3 <script>
      args="${step#cs:}"; tool="${args%%,*}"; script="${args#*,}"
      stamp "compute-sanitizer $tool $script"
      timeout 180 compute-sanitizer --tool "$tool" --error-exitcode 3 python3 "$script" \
        > "$OUT/logs/cs_${tool}_$(basename "$script" .py).log" 2>&1; r=$?; (( r != 0 )) && rc=1
      echo "$tool $script rc=$r: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/logs/cs_${tool}_$(basename "$script" .py).log" | tail -1)" ;;
    smi) nvidia-smi ;;
    *) echo "unknown step $step"; rc=1 ;;
  esac
  snap
done
stamp "done rc=$rc"
exit $rc
