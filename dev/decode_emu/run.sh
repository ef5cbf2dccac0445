#!/bin/sh
# CPU emulation check of src/backends/cuda/decode_kernel.cu against the CPU backend.
# Usage: [EMU_FLAGS="-DNAME=VALUE ..."] dev/decode_emu/run.sh [random cases] [seed]   (from the repository root)
set -e
B=${EMU_BUILD:-/tmp/decode_emu}
mkdir -p $B
python3 dev/decode_emu/transform.py src/backends/cuda/decode_kernel.cu $B/decode_kernel_emu.cpp
F="-std=c++20 -O1 -g -Idev/decode_emu/shim -Iinclude -Isrc -pthread ${EMU_FLAGS:-}"
g++ $F -c $B/decode_kernel_emu.cpp -o $B/k.o &
g++ $F -c src/backends/cpu/decode.cpp -o $B/cpu.o
# decode.cpp's own dependencies in the CPU backend (task pool, tile GEMM, fp16 rows).
for f in task_pool gemm fp16_rows; do g++ $F -c src/backends/cpu/$f.cpp -o $B/cpu_$f.o; done
g++ $F -c dev/decode_emu/emu_test.cpp -o $B/t.o
wait
g++ -pthread $B/k.o $B/cpu.o $B/cpu_task_pool.o $B/cpu_gemm.o $B/cpu_fp16_rows.o $B/t.o -o $B/emu_test
$B/emu_test "$@"
