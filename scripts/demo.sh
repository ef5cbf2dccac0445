#!/usr/bin/env bash
# The main job: set up, build, and train the small causal LM with Orchard
# attention (CUDA if present, else CPU). Extra arguments go to the demo.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
bash "$ROOT/scripts/install_package.sh"
cd /tmp  # import the installed package, not the source tree
exec "${ORCHARD_VENV:-$ROOT/.venv}/bin/python" -m orchard demo "$@"
