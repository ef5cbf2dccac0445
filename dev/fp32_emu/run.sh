#!/bin/sh
# CPU emulation check of src/backends/cuda/flash_fp32.cu's forward and backward against an fp64
# reference (the shim and transform of dev/decode_emu).
# Usage: [EMU_FLAGS="-DNAME=VALUE ..."] dev/fp32_emu/run.sh [--fwd | --bwd] [random cases] [seed]
#   (from the repository root; --fwd: forward only, --bwd: only the cases that check the backward)
set -e
B=${EMU_BUILD:-/tmp/fp32_emu}
mkdir -p $B
# (3 launches: the backward's D pre-pass and launch_tiled's two, one per Params type.)
python3 dev/decode_emu/transform.py src/backends/cuda/flash_fp32.cu $B/flash_fp32_emu.cpp 3
F="-std=c++20 -O1 -g -Idev/decode_emu/shim -Iinclude -Isrc -pthread ${EMU_FLAGS:-}"
g++ $F -c $B/flash_fp32_emu.cpp -o $B/k.o &
K=$!
g++ $F -c dev/fp32_emu/emu_test.cpp -o $B/t.o
wait $K  # (its status: set -e stops on a failed kernel compile)
g++ -pthread $B/k.o $B/t.o -o $B/emu_test
$B/emu_test "$@"
