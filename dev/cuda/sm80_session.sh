#!/bin/bash
# One device call for issue #16's sm80-path goals: correctness of this tree's
# kernels (cuda_check, compute-sanitizer memcheck on --small, both with the sm80
# forward: ORCHARD_SM90=0), then timings of this tree (new), of a base tree
# (BASE_BIN, optional) and of the peers (dev/cuda/sm80_peers.py: FA2 = SDPA flash,
# FlexAttention), all in this one call. FlexAttention compiles while the
# correctness runs; no timing overlaps another GPU job.
#   bash dev/cuda/sm80_session.sh BIN_DIR [BASE_BIN_DIR]
# BIN_DIR holds cuda_check and sm80_bench (built off-device from this tree, .xz
# accepted; else they are built here). Logs: $OUT/logs, packed into $OUT/sm80.tgz.
set -uo pipefail
BIN=${1:-build-dev}
BASE=${2:-}
OUT=${OUT:-/tmp/orchard-out}
L="$OUT/logs" && mkdir -p "$L"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
snap() { (cd "$OUT" && tar czf sm80.tgz logs); }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$L/gpu.txt"
unpack() {  # unpack DIR: .xz -> executables in /tmp/bin-<basename>
  local d=/tmp/bin-$(basename "$1"); mkdir -p "$d"
  for f in "$1"/cuda_check "$1"/sm80_bench "$1"/*.xz; do
    [[ -f $f ]] || continue
    case $f in
      *.xz) python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" "$f" "$d/$(basename "${f%.xz}")" ;;
      *) cp "$f" "$d/" ;;
    esac
  done
  chmod +x "$d"/*; echo "$d"
}
# Objects built off-device (objs.tar.xz, the heavy backward TUs: the whole binary is
# over the device tool's 64 MiB) plus dev_build_cmds.txt (`ninja -t commands` of an
# off-device build-dev with the tree's root as @ROOT@, minus the carried objects'
# compiles): the rest is compiled here in parallel, then archived and linked.
if [[ -f objs.tar.xz && -f dev_build_cmds.txt ]]; then
  ROOT=$PWD; mkdir -p bobj && tar -xJf objs.tar.xz -C bobj
  rm -f /tmp/cc_*
  [[ -f bobj/CMakeFiles/orchard_cuda_backend.dir/work/wt-sm80/src/backends/cuda/sm80/generated/flash_fwd_fp16_d256.cu.o ]] || grep -- "-c @ROOT@" dev_build_cmds.txt | sed "s|@ROOT@|$ROOT|g" | split -l1 - /tmp/cc_
  (cd bobj && ls /tmp/cc_* 2>/dev/null | xargs -r -P16 -n1 bash > "$L/devbuild.log" 2>&1)
  stamp "device compiles rc=$? ($(ls /tmp/cc_* | wc -l) TUs)"
  grep -v -- "-c @ROOT@" dev_build_cmds.txt | sed "s|@ROOT@|$ROOT|g" > /tmp/link.sh
  CRT=$(ls /usr/local/cuda/lib/libcudart_static.a 2>/dev/null || find /usr/local/cuda/ -name libcudart_static.a | head -1)
  sed -i "s|/usr/local/cuda/lib/libcudart_static.a|$CRT|g; s|/usr/bin/cmake -E rm -f|rm -f|g" /tmp/link.sh
  [[ -f /usr/lib/x86_64-linux-gnu/librt.a ]] || sed -i "s|/usr/lib/x86_64-linux-gnu/librt.a|-lrt|g" /tmp/link.sh
  (cd bobj && bash -e /tmp/link.sh >> "$L/devbuild.log" 2>&1) || { tail -30 "$L/devbuild.log"; exit 1; }
  BIN=bobj; stamp "linked"
fi
if [[ -d $BIN ]]; then NEW=$(unpack "$BIN"); else NEW=""; fi
if [[ -z $NEW || ! -x $NEW/cuda_check || ! -x $NEW/sm80_bench ]] || ldd "$NEW/cuda_check" "$NEW/sm80_bench" | grep -q "not found"; then
  stamp "building here"
  cmake -S dev/cuda -B build-dev -G Ninja -DORCHARD_CUDA_ARCHS=90 > "$L/build.log" 2>&1 &&
    ninja -C build-dev -j16 cuda_check sm80_bench >> "$L/build.log" 2>&1 || { tail -40 "$L/build.log"; exit 1; }
  NEW=build-dev
fi
[[ -n $BASE && -d $BASE ]] && BASEB=$(unpack "$BASE") || BASEB=""
stamp "binaries: new $NEW base ${BASEB:-none}"
rm -f /tmp/go
PYTHONUNBUFFERED=1 timeout 400 python3 dev/cuda/sm80_peers.py --go /tmp/go > "$L/peers.log" 2>&1 &
PEERS=$!
export ORCHARD_SM90=0
if [[ ${SKIP_CHECK:-0} != 1 ]]; then  # SKIP_CHECK=1: timings only (same kernels already checked)
timeout 240 "$NEW/cuda_check" > "$L/check.log" 2>&1; r=$?
stamp "cuda_check rc=$r: $(grep -E 'cases passed' "$L/check.log")"
grep -B8 "=> FAIL" "$L/check.log" | grep -E "^\[|FAIL|NaN" | head -30
# The two-pass d > 128 fallback (A100 / Ada run it; the H200 only with this flag).
ORCHARD_BWD_TWO_PASS=1 timeout 240 "$NEW/cuda_check" > "$L/check-twopass.log" 2>&1; r=$?
stamp "cuda_check two-pass rc=$r: $(grep -E 'cases passed' "$L/check-twopass.log")"
timeout 150 compute-sanitizer --tool memcheck --error-exitcode 3 "$NEW/cuda_check" --small > "$L/memcheck.log" 2>&1; r=$?
stamp "memcheck rc=$r: $(grep -E 'ERROR SUMMARY' "$L/memcheck.log" | tail -1)"
(( r != 0 )) && grep -E "=> FAIL|Invalid|out of bounds|at 0x" "$L/memcheck.log" | head -12
fi
snap
for i in $(seq 1 240); do grep -qE "flex compiled|unavailable" "$L/peers.log" && break; sleep 1; done
stamp "peers ready: $(head -2 "$L/peers.log" | tail -1)"
# Timings: new, base, new again (drift), then the peers.
# d > 128 first (one-pass vs two-pass backward, alternating), then the rest.
timeout 100 "$NEW/sm80_bench" grid 160 192 256 > "$L/bench-new.log" 2>&1; stamp "bench new rc=$?"
ORCHARD_BWD_TWO_PASS=1 timeout 100 "$NEW/sm80_bench" grid 160 192 256 > "$L/bench-twopass.log" 2>&1
stamp "bench two-pass rc=$?"
timeout 100 "$NEW/sm80_bench" grid 160 192 256 > "$L/bench-new2.log" 2>&1; stamp "bench new (2) rc=$?"
timeout 100 "$NEW/sm80_bench" grid 64 96 128 > "$L/bench-new-low.log" 2>&1; stamp "bench new d<=128 rc=$?"
timeout 60 "$NEW/sm80_bench" feat > "$L/feat-new.log" 2>&1; stamp "feat new rc=$?"
if [[ -n $BASEB ]]; then
  timeout 100 "$BASEB/sm80_bench" grid 96 128 > "$L/bench-base.log" 2>&1; stamp "bench base rc=$?"
  timeout 60 "$BASEB/sm80_bench" feat > "$L/feat-base.log" 2>&1; stamp "feat base rc=$?"
  timeout 60 "$NEW/sm80_bench" feat > "$L/feat-new2.log" 2>&1; stamp "feat new (2) rc=$?"
fi
snap
touch /tmp/go
wait $PEERS; stamp "peers rc=$?"
for f in bench-new bench-twopass bench-new2 bench-new-low bench-base feat-new feat-base feat-new2 peers; do
  [[ -f $L/$f.log ]] && { echo "== $f"; cat "$L/$f.log"; }
done
snap
stamp done
