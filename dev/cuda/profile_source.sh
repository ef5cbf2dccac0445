#!/bin/bash
# One device call: ncu per-instruction profile (SASS with executed counts and warp-stall
# samples) of our dK/dV backward kernel and FA2's (torch SDPA flash) at the same shapes.
# Usage (on the GPU machine, repo root): PROFS="64 8192 0;128 8192 0" bash dev/cuda/profile_source.sh
# SKIP_FA2=1 profiles only our kernel.
# Writes $OUT/prof.tgz: <tag>.details.txt (ncu details page) and <tag>.sass.csv (source page).
set -uo pipefail
OUT=${OUT:-/tmp/orchard-out}
P=/tmp/prof && mkdir -p "$OUT" $P
nvidia-smi --query-gpu=name,driver_version --format=csv | tee $P/gpu.txt
t0=$(date +%s)
cmake -S dev/cuda -B build-dev -G Ninja -DORCHARD_CUDA_ARCHS=90 > $P/build.log 2>&1 &&
  ninja -C build-dev -j16 >> $P/build.log 2>&1 || { tail -40 $P/build.log; exit 1; }
echo "build: $(( $(date +%s) - t0 ))s"
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[[ -z $NCU ]] && { echo "no ncu on this machine"; exit 1; }
$NCU --version | tail -1
IFS=';' read -ra PS_LIST <<< "${PROFS:-64 8192 0}"
for prof in "${PS_LIST[@]}"; do
  read -r PD PSQ PC <<< "$prof"
  tag=d${PD}_s${PSQ}_c${PC}
  timeout 200 $NCU --kernel-name regex:"dkdv2" --launch-skip 1 --launch-count 1 --set full --import-source no \
    -f -o $P/ours_$tag ./build-dev/cuda_check --one $PD $PSQ $PC > $P/ours_$tag.log 2>&1
  echo "ncu ours $tag rc=$?"
  [[ -n ${SKIP_FA2:-} ]] || timeout 200 $NCU --kernel-name regex:"flash_bwd_dq_dk_dv" --launch-skip 1 --launch-count 1 --set full \
    --import-source no -f -o $P/fa2_$tag python3 dev/cuda/prof_fa2.py $PD $PSQ $PC > $P/fa2_$tag.log 2>&1
  echo "ncu fa2 $tag rc=$?"
  for who in ours fa2; do
    rep=$P/${who}_$tag.ncu-rep
    [[ -f $rep ]] || continue
    $NCU -i $rep --page details > $P/${who}_$tag.details.txt 2>&1
    $NCU -i $rep --page source --csv --print-source sass > $P/${who}_$tag.sass.csv 2> $P/${who}_$tag.sass.err
    echo "$who $tag: details $(wc -l < $P/${who}_$tag.details.txt) lines, sass $(wc -l < $P/${who}_$tag.sass.csv) lines"
    grep -E "Duration|Executed Instructions  |Warp Cycles Per Issued|Issued Ipc Active|Registers Per Thread" \
      $P/${who}_$tag.details.txt | head -8
    rm -f $rep
  done
done
for f in $P/*.sass.err; do [[ -s $f ]] && head -5 "$f"; done
$NCU --help 2>&1 | grep -A2 -E "print-source|--page" | head -20 > $P/ncu_help.txt
cd $P && tar czf "$OUT/prof.tgz" . && ls -la "$OUT"
