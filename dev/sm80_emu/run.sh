#!/bin/sh
# CPU emulation check of the sm80-class bf16 / fp16 kernels (src/backends/cuda/sm80/flash_fwd_kernel.cuh,
# flash_bwd_kernel.cuh, every head-dim bucket) against fp64 math: the harness of dev/fp32_emu compiled
# with -DEMU_SM80, the kernels through the shim and transform of dev/decode_emu, one object per
# (bucket, dtype) (dev/sm80_emu/kernels.cpp). Devices with an H100's, an A100's and an sm_86's shared
# memory, so the smaller GPUs' tile choices run too (none of those GPUs is at hand).
# Usage: dev/sm80_emu/run.sh [random cases] [seed]   (from the repository root; EMU_JOBS parallel compiles)
set -e
B=${EMU_BUILD:-/tmp/sm80_emu}
mkdir -p $B/inc/backends/cuda/sm80
for h in flash_fwd_kernel:1 flash_bwd_kernel:6; do  # (the launches each header holds)
  python3 dev/decode_emu/transform.py src/backends/cuda/sm80/${h%:*}.cuh $B/inc/backends/cuda/sm80/${h%:*}.cuh ${h#*:}
done
F="-std=c++20 -O1 -I$B/inc -Idev/decode_emu/shim -Iinclude -Isrc -pthread -Wno-unknown-pragmas"
objs=""
: > $B/compile.txt
for t in __nv_bfloat16:bf16 __half:fp16; do
  for d in 32 64 96 128 160 192 256; do
    o=$B/k_${t#*:}_$d.o
    extra=""
    [ ${t#*:} = bf16 ] && extra="-DEMU_SMEM_BYTES"
    echo "g++ $F -DEMU_T=${t%:*} -DEMU_D=$d $extra -c dev/sm80_emu/kernels.cpp -o $o" >> $B/compile.txt
    objs="$objs $o"
  done
done
echo "g++ $F -DEMU_SM80 -c dev/fp32_emu/emu_test.cpp -o $B/t.o" >> $B/compile.txt
# 15 compiles of ~10-25 s each (-O1).
xargs -P ${EMU_JOBS:-2} -I{} sh -c '{}' < $B/compile.txt
g++ -pthread $objs $B/t.o -o $B/emu_test
$B/emu_test "$@"
