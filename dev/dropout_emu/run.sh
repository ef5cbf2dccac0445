#!/bin/sh
# CPU emulation check of the sm90 kernels' dropout draws (src/backends/cuda/sm90/dropout_scores.cuh:
# the fragment forms of cuda/dropout_fragment.h, lane pairs sharing calls) against dropout_keep, over the shim of dev/decode_emu.
# Usage: dev/dropout_emu/run.sh [cases] [seed]   (from the repository root; a few seconds)
set -e
B=${EMU_BUILD:-/tmp/dropout_emu}
mkdir -p $B
g++ -std=c++20 -O1 -g -Idev/decode_emu/shim -Iinclude -Isrc -pthread dev/dropout_emu/emu_test.cpp -o $B/emu_test
$B/emu_test "$@"
