#!/usr/bin/env bash
# Runs Orchard's whole test suite: sets up the environment, builds the C++
# library (+ CUDA backend when nvcc is found), runs the GoogleTest suite with
# ctest, builds and installs the Python package, and runs pytest.
#
#   ORCHARD_CUDA=AUTO|ON|OFF      CUDA backend in the C++ build (default AUTO)
#   ORCHARD_PY_CUDA=AUTO|ON|OFF   CUDA backend in the Python package (default: ORCHARD_CUDA,
#                                 else built only when a GPU is visible)
#   ORCHARD_SANITIZE=1            also build and run the C++ tests under ASan+UBSan
#   PYTEST_ARGS="..."             extra pytest arguments
#   PYTEST_WORKERS=N              pytest processes (pytest-xdist; default 2, 0 = in this process)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ORCHARD_VENV:-$ROOT/.venv}"
JOBS="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
cd "$ROOT"

step() { echo; echo "=== $* ($(date +%H:%M:%S))"; }

# The venv (pip downloads, mostly waiting on the network) is set up in the background while the
# C++ build, which does not need it, runs. On a fresh 2-core CI machine setup and build took
# 2.2 + 19.2 minutes one after the other and 21.3 together: the install's own CPU work (unpacking,
# byte-compiling) competes with the build, so this saves little there, more on a slow network.
# Its log is printed when the Python steps wait for it.
bash scripts/setup_env.sh --system
mkdir -p build
SETUP_LOG=build/setup_python.log
bash scripts/setup_env.sh --python > "$SETUP_LOG" 2>&1 &
SETUP_PID=$!
trap 'kill "$SETUP_PID" 2>/dev/null || true' EXIT  # a failed build stops the downloads too
wait_for_venv() {
  step "Python environment (set up in the background)"
  local rc=0
  wait "$SETUP_PID" || rc=$?
  cat "$SETUP_LOG"
  if [ "$rc" -ne 0 ]; then echo "scripts/setup_env.sh --python failed (rc=$rc)" >&2; exit "$rc"; fi
}

step "C++ build (CUDA: ${ORCHARD_CUDA:-AUTO})"
cmake -S . -B build/cpp -G Ninja -DCMAKE_BUILD_TYPE=Release -DORCHARD_CUDA="${ORCHARD_CUDA:-AUTO}" \
  -DORCHARD_BUILD_TESTS=ON -DORCHARD_BUILD_BENCH=ON >/dev/null
cmake --build build/cpp -j "$JOBS"

step "C++ tests (ctest)"
ctest --test-dir build/cpp --output-on-failure -j "$JOBS"

if [ "${ORCHARD_SANITIZE:-0}" = "1" ]; then
  step "C++ tests under AddressSanitizer + UndefinedBehaviorSanitizer"
  cmake -S . -B build/asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DORCHARD_CUDA=OFF -DORCHARD_SANITIZE=ON \
    -DORCHARD_BUILD_TESTS=ON >/dev/null
  cmake --build build/asan -j "$JOBS"
  ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 ctest --test-dir build/asan --output-on-failure -j "$JOBS"
fi

step "CUDA decode kernels on the CPU emulator, against the CPU backend"
# dev/decode_emu: decode_kernel.cu compiled as C++ over a CUDA shim (threads, barriers, shuffles)
# and checked case by case against the CPU decode kernel, NaN rows included: the only run those
# kernels get without a GPU (about a minute on 2 cores).
EMU_BUILD=build/decode_emu sh dev/decode_emu/run.sh 40 1234 | tail -3

step "CUDA float32 kernels on the CPU emulator, against float64 references"
# dev/fp32_emu: flash_fp32_tc.cu (the 3xTF32 tensor-core kernels) and flash_fp32.cu (the SIMT
# kernels, for the calls the tensor-core ones do not take) over the same shim, every feature
# combination against float64 math, outputs poisoned (about 4 minutes on 2 cores); then the fixed
# cases again with ORCHARD_CUDA_FP32_TC=0, every call on the SIMT kernels (under a minute).
EMU_BUILD=build/fp32_emu sh dev/fp32_emu/run.sh | tail -3
ORCHARD_CUDA_FP32_TC=0 build/fp32_emu/emu_test 0 | tail -1

step "sm80-class bf16 / fp16 kernels on the CPU emulator, against float64 references"
# dev/sm80_emu: sm80/flash_fwd_kernel.cuh and flash_bwd_kernel.cuh (every head-dim bucket) over the
# same shim, on devices with an H100's, an A100's and an sm_86's shared memory (the smaller GPUs'
# tiles: the compact backward, one bias / Q-dO / K-V stage), outputs poisoned; the 27 fixed cases,
# which cover every bucket and both dtypes (about 3.5 minutes on 2 cores: 15 compiles, then ~3 s a
# case; `run.sh 60` adds random cases).
EMU_BUILD=build/sm80_emu sh dev/sm80_emu/run.sh 0 | tail -3

step "sm90 dropout draws on the CPU emulator, against dropout_keep"
# dev/dropout_emu: the Hopper kernels' dropout draws in their fragment forms (lane pairs sharing calls)
# (sm90/dropout_scores.cuh) over the same shim, every element against the scalar mask (seconds).
EMU_BUILD=build/dropout_emu sh dev/dropout_emu/run.sh 60 | tail -1

step "C++ package: install + find_package(orchard) consumer"
rm -rf build/install
cmake --install build/cpp --prefix build/install >/dev/null
cmake -S examples/cpp_consumer -B build/consumer -G Ninja -DCMAKE_PREFIX_PATH="$ROOT/build/install" >/dev/null
cmake --build build/consumer -j "$JOBS" >/dev/null
./build/consumer/orchard_consumer

wait_for_venv

PY_CUDA="${ORCHARD_PY_CUDA:-${ORCHARD_CUDA:-}}"
step "Python package (CUDA: ${PY_CUDA:-when a GPU is visible})"
if [ -n "$PY_CUDA" ]; then
  ORCHARD_CUDA="$PY_CUDA" bash scripts/install_package.sh
else
  env -u ORCHARD_CUDA bash scripts/install_package.sh
fi

step "Python tests (pytest)"
cd "$ROOT/tests/python"
# shellcheck disable=SC2086
# Two processes by default: on the 2-core CI machine the suite took 243 s in one and 163 s in
# two (many tests are small and spend their time in Python, not in the kernels' threads).
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -n "${PYTEST_WORKERS:-2}" ${PYTEST_ARGS:-} .
