#!/bin/sh
# CPU emulation check of the CUDA float32 forward and backward (src/backends/cuda/flash_fp32.cu,
# and flash_fp32_tc.cu's tensor-core kernels unless ORCHARD_CUDA_FP32_TC=0) against an fp64
# reference (the shim and transform of dev/decode_emu).
# Usage: [EMU_FLAGS="-DNAME=VALUE ..."] dev/fp32_emu/run.sh [--fwd | --bwd] [random cases] [seed]
#   (from the repository root; --fwd: forward only, --bwd: only the cases that check the backward)
set -e
B=${EMU_BUILD:-/tmp/fp32_emu}
mkdir -p $B
# (3 launches in flash_fp32.cu: the backward's D pre-pass and launch_tiled's two, one per Params
# type; 1 in flash_fp32_tc.cu, its launch template.)
python3 dev/decode_emu/transform.py src/backends/cuda/flash_fp32.cu $B/flash_fp32_emu.cpp 3
python3 dev/decode_emu/transform.py src/backends/cuda/flash_fp32_tc.cu $B/flash_fp32_tc_emu.cpp 1
F="-std=c++20 -O1 -g -Idev/decode_emu/shim -Iinclude -Isrc -pthread ${EMU_FLAGS:-}"
g++ $F -c $B/flash_fp32_emu.cpp -o $B/k.o &
K=$!
g++ $F -c $B/flash_fp32_tc_emu.cpp -o $B/tc.o &
TC=$!
g++ $F -c dev/fp32_emu/emu_test.cpp -o $B/t.o
wait $K  # (their status: set -e stops on a failed kernel compile)
wait $TC
g++ -pthread $B/k.o $B/tc.o $B/t.o -o $B/emu_test
$B/emu_test "$@"
