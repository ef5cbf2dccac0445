#!/bin/bash
# Off-device register/spill report for the generated kernels (no GPU needed):
#   bash dev/cuda/regs.sh [file-glob under src/backends/cuda/sm80/generated] [extra nvcc flags]
# e.g. bash dev/cuda/regs.sh 'flash_fwd_bf16_d128' -DORCHARD_FWD_BN_D128=64
set -uo pipefail
cd "$(dirname "$0")/../.."
GLOB=${1:-flash_*_bf16_d*}; shift || true
for f in src/backends/cuda/sm80/generated/$GLOB.cu; do
  nvcc -std=c++20 -arch=sm_90 -O3 --expt-relaxed-constexpr -Iinclude -Isrc -Xptxas -v "$@" -c "$f" -o /dev/null 2>&1 |
    c++filt | python3 -c '
import re, sys
name = None
for line in sys.stdin:
    m = re.search(r"Compiling entry function .(.*). for", line)
    if m: name = m.group(1).replace("orchard::cuda::", ""); continue
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m: st, ld = m.groups(); continue
    m = re.search(r"Used (\d+) registers", line)
    if m and name: print(f"{m.group(1):>4} regs  spill st/ld {st:>4}/{ld:<4} {name}"); name = None
'
done
