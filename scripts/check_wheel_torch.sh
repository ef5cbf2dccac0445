#!/usr/bin/env bash
# One wheel, any torch: builds the orchard-attn wheel ONCE, then installs that same
# file into a fresh venv next to a different torch (a CPU wheel from the PyTorch
# index) and runs the torch-facing tests against the installed wheel, not the
# source tree. The extension links no libtorch (tensors cross as DLPack), so
# nothing is rebuilt for the other torch.
#
#   bash scripts/check_wheel_torch.sh [TORCH_VERSION ...]     (default: 2.6.0)
#
# The version `current` means the build interpreter's own torch: a fresh venv with only
# the wheel, plus a .pth that appends that interpreter's site-packages (as
# tests/python/test_wheel.py does) — the baseline the other versions compare with.
#
# Environment:
#   PYTHON       interpreter that builds the wheel (default: .venv/bin/python; it needs
#                nanobind and scikit-build-core, as `pip install --no-build-isolation` does).
#                The test venvs use the same Python version.
#   WORK         scratch directory (default: build/wheel-torch)
#   WHEEL        an already built wheel to test instead of building one
#   ORCHARD_CUDA the wheel's CUDA backend, as for `pip install .` (default here: OFF)
#   TORCH_INDEX  where torch comes from (default: https://download.pytorch.org/whl/cpu, the
#                CPU-only wheels; when that host cannot be reached, the default index, PyPI,
#                whose Linux torch wheels bring their CUDA libraries: GBs, but the tests
#                still run on the CPU). TORCH_INDEX= (empty) forces the default index.
#   TESTS        pytest files under tests/python (default below)
# Prints one summary line per torch version; exits non-zero if any run failed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
WORK="${WORK:-$ROOT/build/wheel-torch}"
if [ -z "${TORCH_INDEX+set}" ]; then
  TORCH_INDEX=https://download.pytorch.org/whl/cpu
  if ! "$PY" -c "import urllib.request as u; u.urlopen('$TORCH_INDEX/torch/', timeout=20)" 2>/dev/null; then
    echo "[torch] $TORCH_INDEX unreachable: torch from the default index (PyPI; Linux wheels with CUDA libraries)"
    TORCH_INDEX=""
  fi
fi
torch_index=()
[ -n "$TORCH_INDEX" ] && torch_index=(--index-url "$TORCH_INDEX")
TESTS="${TESTS:-test_numerics.py test_gradcheck.py test_opcheck_compile.py test_dropins.py test_layouts.py test_numpy.py test_amp.py}"
VERSIONS=("$@")
[ ${#VERSIONS[@]} -eq 0 ] && VERSIONS=(2.6.0)
mkdir -p "$WORK"

# 1. The wheel, built once.
if [ -z "${WHEEL:-}" ]; then
  rm -rf "$WORK/wheelhouse" && mkdir -p "$WORK/wheelhouse"
  echo "[wheel] pip wheel . with $("$PY" -V) (ORCHARD_CUDA=${ORCHARD_CUDA:-OFF}; torch there: $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo none))"
  t0=$(date +%s)
  ORCHARD_CUDA="${ORCHARD_CUDA:-OFF}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
    "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/wheelhouse" "$ROOT"
  WHEEL="$(ls "$WORK"/wheelhouse/orchard_attn-*.whl)"
  echo "[wheel] built $(basename "$WHEEL") in $(( $(date +%s) - t0 )) s"
fi
echo "[wheel] sha256 $(sha256sum "$WHEEL" | cut -c1-16)…  $(basename "$WHEEL")"

# Test-tool pins from requirements-dev.txt (torch excluded: that is the variable).
pins=()
for pkg in numpy pytest hypothesis tqdm; do
  line="$(grep -E "^$pkg==" "$ROOT/requirements-dev.txt" || true)"
  pins+=("${line:-$pkg}")
done

status=0
summary=()
for v in "${VERSIONS[@]}"; do
  venv="$WORK/venv-torch-$v"
  if [ "$v" = current ]; then
    rm -rf "$venv"
    "$PY" -m venv --without-pip "$venv"
    purelib="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    "$venv/bin/python" -c 'import sysconfig, sys; open(sysconfig.get_paths()["purelib"] + "/outer_env.pth", "w").write(sys.argv[1] + "\n")' "$purelib"
    "$PY" -m pip --python "$venv/bin/python" install -q --no-deps --no-index "$WHEEL"
  elif [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$v')" 2>/dev/null; then
    echo "[torch $v] fresh venv $venv"
    rm -rf "$venv"
    "$PY" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --no-cache-dir --upgrade pip
    "$venv/bin/python" -m pip install -q --no-cache-dir "torch==$v" "${torch_index[@]}"
    "$venv/bin/python" -m pip install -q --no-cache-dir "${pins[@]}"
  fi
  # The same wheel file, reinstalled each time (no compiler, no index, no dependencies).
  [ "$v" = current ] || "$venv/bin/python" -m pip install -q --no-cache-dir --force-reinstall --no-deps --no-index "$WHEEL"
  env -u PYTHONPATH -u PYTHONHOME "$venv/bin/python" - "$venv" <<'EOF'
import sys, torch, orchard
assert orchard.__file__.startswith(sys.argv[1]), orchard.__file__  # the wheel's copy, not the tree's
import orchard._ops as ops
print(f"[torch {torch.__version__}] orchard {orchard.__version__} from {orchard.__file__}; "
      f"build_info {orchard.build_info()}; "
      f"stable-ABI torch ops: {getattr(ops, 'STABLE_OPS_STATUS', 'not in this version')}")
EOF
  log="$WORK/pytest-torch-$v.log"
  echo "[torch $v] pytest $TESTS (log: $log)"
  set +e
  (cd "$ROOT/tests/python" && env -u PYTHONPATH -u PYTHONHOME "$venv/bin/python" -m pytest -q \
     -p no:cacheprovider $TESTS) > "$log" 2>&1
  rc=$?
  set -e
  result="$(grep -E "^(=+ )?[0-9]+ (passed|failed)|^(=+ )?.*(passed|failed|error).* in [0-9.]+s" "$log" | tail -1)"
  tv="$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
  summary+=("torch $tv: pytest rc=$rc: $result")
  [ $rc -eq 0 ] || { status=1; tail -30 "$log"; }
done

echo "== one wheel ($(basename "$WHEEL")), $("$PY" -V)"
for s in "${summary[@]}"; do echo "   $s"; done
exit $status
