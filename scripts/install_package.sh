#!/usr/bin/env bash
# Builds and installs the orchard Python package into the venv (pip install .).
# ORCHARD_CUDA=AUTO|ON|OFF chooses whether the CUDA backend is built (AUTO:
# when nvcc is found).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ORCHARD_VENV:-$ROOT/.venv}"
cd "$ROOT"
# Without a visible GPU the CUDA backend could not run anyway: skip its ~10 min
# compile unless asked for (ORCHARD_CUDA=ON builds it regardless).
if [ -z "${ORCHARD_CUDA:-}" ] && ! nvidia-smi -L >/dev/null 2>&1; then
  export ORCHARD_CUDA=OFF
  echo "[install] no GPU visible (nvidia-smi): building without the CUDA backend (set ORCHARD_CUDA=ON to force)"
fi
echo "[install] pip install . (ORCHARD_CUDA=${ORCHARD_CUDA:-AUTO})"
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
  "$VENV/bin/python" -m pip install -q --no-cache-dir --no-build-isolation .
