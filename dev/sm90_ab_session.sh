#!/usr/bin/env bash
# One device call for an sm90 kernel A/B plus a check of the package (issue #11): the package build
# (dev/gpu_session.sh with no step, GPU_ARCHS default 90) runs in the background while the A/B command
# AB runs (e.g. bench/sm90/ab_bwd.sh or ab_fwd.sh with its VARIANTS), then gpu_session.sh's STEPS run on
# the built package (pytest:..., py:..., as there).  The A/B's builds and the package build share
# the 16 cores; the A/B's timing rounds start after its own build, when the package build is mostly done.
#   AB='D=128 VARIANTS="base= new=-DX=1" bash bench/sm90/ab_bwd.sh' bash dev/sm90_ab_session.sh STEP...
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$ROOT/gpu_out}"; mkdir -p "$OUT"
cd "$ROOT"
bash dev/gpu_session.sh > "$OUT/package_build.log" 2>&1 &
build_pid=$!
rc=0
if [ -n "${AB:-}" ]; then
  echo "=== A/B: $AB"
  OUT="$OUT/ab" timeout "${AB_TIMEOUT:-330}" bash -c "$AB" 2>&1 | tail -n "${AB_TAIL:-40}" || rc=1
fi
wait "$build_pid" || { echo "package build failed"; tail -30 "$OUT/package_build.log"; exit 1; }
tail -n 2 "$OUT/package_build.log"
[ $# -gt 0 ] && { bash dev/gpu_session.sh "$@" || rc=1; }
exit $rc
