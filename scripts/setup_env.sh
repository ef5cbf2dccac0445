#!/usr/bin/env bash
# Installs everything Orchard's build, tests and demo need on a fresh Debian
# machine: system packages (compiler, CMake, Ninja, GoogleTest, Google
# Benchmark) and a Python venv with the pinned packages of requirements-dev.txt.
# Idempotent: re-running only installs what is missing.
#
#   bash scripts/setup_env.sh [--system | --python]
#   --system: only the system packages (what the C++ build needs); --python: only the venv
#   (scripts/test.sh runs the venv's downloads in the background, beside the C++ build).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ORCHARD_VENV:-$ROOT/.venv}"
PART="${1:-all}"
case "$PART" in all | --system | --python) ;; *) echo "setup_env.sh: unknown option '$PART'" >&2; exit 2 ;; esac

if [ "$PART" != --python ]; then
  need_apt=()
  command -v g++ >/dev/null || need_apt+=(g++)
  command -v cmake >/dev/null || need_apt+=(cmake)
  command -v ninja >/dev/null || need_apt+=(ninja-build)
  [ -f /usr/include/gtest/gtest.h ] || need_apt+=(libgtest-dev)
  [ -f /usr/include/benchmark/benchmark.h ] || need_apt+=(libbenchmark-dev)
  python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
  if [ ${#need_apt[@]} -gt 0 ]; then
    echo "[setup] apt-get install ${need_apt[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
  fi
  echo "[setup] system packages ready"
fi
[ "$PART" = --system ] && exit 0

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating venv $VENV"
  python3 -m venv "$VENV"
fi
stamp="$VENV/.orchard-requirements"
if ! cmp -s "$ROOT/requirements-dev.txt" "$stamp"; then
  echo "[setup] pip install -r requirements-dev.txt (first time: torch with its CUDA libraries, several GB of downloads)"
  # --no-cache-dir: torch's CUDA wheels are ~3 GB; caching them as well doubles the peak disk
  # use, and a CI run failed with "No space left on device" (ENOSPC) during this install.
  free_kib=$(df -Pk "$VENV" | awk 'NR==2 {print $4}')
  if [ "${free_kib:-0}" -lt $((8 * 1024 * 1024)) ]; then
    echo "[setup] warning: $((free_kib / 1024)) MiB free under $VENV; the pinned packages need ~7 GiB" >&2
  fi
  "$VENV/bin/python" -m pip install -q --no-cache-dir --upgrade pip
  "$VENV/bin/python" -m pip install -q --no-cache-dir -r "$ROOT/requirements-dev.txt"
  cp "$ROOT/requirements-dev.txt" "$stamp"
fi
# The package was renamed from the distribution "orchard" (an unrelated project's name on
# the index) to "orchard-attn": drop this project's copy under the old name, if a venv
# still has one, so the two do not both claim the same files.
if "$VENV/bin/python" -m pip show orchard 2>/dev/null | grep -q "^Summary: Fused FlashAttention"; then
  echo "[setup] uninstalling this project's old distribution name 'orchard' (now 'orchard-attn')"
  "$VENV/bin/python" -m pip uninstall -q -y orchard
fi
echo "[setup] environment ready: $VENV"
