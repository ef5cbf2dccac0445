#!/usr/bin/env bash
# The JAX CUDA check, one device call: build what orchard.jax needs, then run
# tests/python/test_jax.py and test_jax_features.py (the CPU tests and the `cuda`-marked GPU tests) under
# faulthandler, so that a crash inside a custom call names its test and frame.
#
#   bash dev/jax_cuda_check.sh [CORE_LIB]        (repo root, on the GPU machine)
#
# CORE_LIB: a liborchard.a built with ORCHARD_CUDA=ON for the GPU's arch by the same
# nvcc (e.g. `cmake -S . -B build-cuda90 -G Ninja -DORCHARD_CUDA=ON -DORCHARD_CUDA_ARCHS=90
# -DORCHARD_BUILD_TESTS=OFF && ninja -C build-cuda90 orchard`, ~14 min on 2 cores). Given
# one, only orchard._C and orchard._jax_ffi are compiled here, against it
# (dev/jax_cuda_check/CMakeLists.txt: seconds). Without one, the project's own CMake
# builds the two targets, CUDA kernels included (minutes even on 16 cores).
# Env: OUT (where jax_logs.tgz goes; default build-jaxcheck/out), JAX_CHECK_PYTEST_TIMEOUT (s, default
# 300 per pytest run), JAX_CHECK_SANITIZE=1 adds compute-sanitizer
# memcheck on one small forward+backward.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
BUILD="$ROOT/build-jaxcheck"
OUT="${OUT:-$BUILD/out}"                # gets jax_logs.tgz only (a device call returns few files)
LOGS="$BUILD/jax_logs"
mkdir -p "$LOGS" "$OUT"
PY="${PYTHON:-python3}"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
pack() { tar czf "$OUT/jax_logs.tgz" -C "$BUILD" jax_logs; }
trap pack EXIT
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

"$PY" -c "import jax, jaxlib, sys; print('python', sys.version.split()[0], 'jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())" 2>&1 | tee "$LOGS/versions.txt"

# ---- build ---------------------------------------------------------------------
stamp "build (core: ${1:-project CMake})"
if [ -n "${1:-}" ]; then
  cmake -S dev/jax_cuda_check -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DORCHARD_CORE_LIB="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")" -DPython_EXECUTABLE="$(command -v "$PY")" \
    > "$LOGS/build.log" 2>&1 && ninja -C "$BUILD" _C _jax_ffi >> "$LOGS/build.log" 2>&1
else
  ORCHARD_CUDA=ON cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DORCHARD_BUILD_PYTHON=ON \
    -DORCHARD_CUDA_ARCHS=90 -DORCHARD_PY_TORCH_OPS=OFF -DORCHARD_PY_METAL_EMULATOR=OFF \
    -DPython_EXECUTABLE="$(command -v "$PY")" > "$LOGS/build.log" 2>&1 \
    && ninja -C "$BUILD" _C _jax_ffi >> "$LOGS/build.log" 2>&1
fi
rc=$?
if (( rc != 0 )); then tail -40 "$LOGS/build.log"; stamp "build failed"; exit 1; fi
# The modules next to the package's Python sources (a throwaway copy of the tree).
SITE="$BUILD/site"; rm -rf "$SITE"; mkdir -p "$SITE"
cp -r python/orchard "$SITE/"
find "$BUILD" -maxdepth 3 -path "$SITE" -prune -o \( -name "_C*.so" -o -name "_jax_ffi*.so" \) -print \
  | xargs -r cp -t "$SITE/orchard/"
export PYTHONPATH="$SITE"
"$PY" -c "import orchard, orchard.jax as oj; print(orchard.build_info(), 'handlers enabled:', oj.CUDA_HANDLERS_ENABLED)" \
  2>&1 | tee -a "$LOGS/versions.txt"
stamp "built"

# ---- tests: a crash is logged with its test id, then the rest runs without it --------
deselect=()
for attempt in 1 2 3 4; do
  log="$LOGS/pytest_$attempt.log"
  stamp "pytest test_jax*.py (attempt $attempt, $(( ${#deselect[@]} / 2 )) deselected)"
  timeout "${JAX_CHECK_PYTEST_TIMEOUT:-300}" "$PY" -X faulthandler -m pytest -v -p no:cacheprovider -o faulthandler_timeout=120 \
    tests/python/test_jax.py tests/python/test_jax_features.py tests/python/test_jax_kvcache.py "${deselect[@]}" > "$log" 2>&1
  rc=$?
  grep -E "^(FAILED|ERROR)|passed|failed" "$log" | tail -25
  if (( rc == 0 || rc == 1 )); then break; fi  # finished (1: some tests failed)
  crashed=$(grep -oE "tests/python/test_jax(_features|_kvcache)?.py::[^ ]+" "$log" | tail -1)
  echo "pytest rc=$rc: crash in ${crashed:-?}; its trace:"
  grep -A25 "Fatal Python error" "$log" | head -40
  [ -z "$crashed" ] && break
  deselect+=(--deselect "$crashed")
done
stamp "pytest done (rc=$rc)"

# ---- optional: compute-sanitizer memcheck on one small forward + backward -------------
if [ "${JAX_CHECK_SANITIZE:-0}" = 1 ]; then
  cat > "$BUILD/sanitize_case.py" <<'PYEOF'
import jax, jax.numpy as jnp, orchard.jax as oj
q, k, v = (jax.random.normal(jax.random.PRNGKey(i), s, jnp.bfloat16)
           for i, s in enumerate([(1, 40, 4, 64), (1, 56, 2, 64), (1, 56, 2, 64)]))
f = lambda q, k, v: jnp.sum(oj.flash_attention(q, k, v, causal=True).astype(jnp.float32))
print(jax.block_until_ready(jax.grad(f, argnums=(0, 1, 2))(q, k, v))[0].shape)
PYEOF
  stamp "compute-sanitizer memcheck"
  timeout 240 compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" "$BUILD/sanitize_case.py" \
    > "$LOGS/memcheck.log" 2>&1
  echo "memcheck rc=$?: $(grep -E 'ERROR SUMMARY' "$LOGS/memcheck.log" | tail -1)"
fi
stamp "done"
