// Small MSL-style kernels (compiled through the shim, like the real ones) that check the
// emulator itself: simdgroup_matrix semantics and that faults are reported.
#include "emulator_selftest_kernels.h"

#include <metal_stdlib>
using namespace metal;

namespace orchard::metal_emu::selftest {

// C = A * B^T + A (A, B 8x8 row-major), exercising load, transposed load,
// multiply_accumulate, multiply and store.
void matrix_ops(const float* a, const float* b, float* c, uint tid) {
  threadgroup float tile[128];
  for (int e = int(tid); e < 64; e += 32) {
    tile[e] = a[e];
    tile[64 + e] = b[e];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_float8x8 ma, mbt, acc, ident;
  simdgroup_load(ma, tile, 8);
  simdgroup_load(mbt, tile + 64, 8, ulong2(0, 0), true);
  ident = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  threadgroup_barrier(mem_flags::mem_threadgroup);  // every lane has read B before it is overwritten
  for (int e = int(tid); e < 64; e += 32) tile[64 + e] = (e % 9 == 0) ? 1.0f : 0.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_load(ident, tile + 64, 8);
  simdgroup_multiply(acc, ma, ident);              // acc = A
  simdgroup_multiply_accumulate(acc, ma, mbt, acc);  // acc = A B^T + A
  threadgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_store(acc, tile, 8);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int e = int(tid); e < 64; e += 32) c[e] = tile[e];
}

// Threads with tid >= `early` return before the barrier the others wait at.
void divergent_barrier(uint tid, uint early) {
  if (tid >= early) return;
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

// The shim's math builtins the kernels use beyond exp / log (softcap: tanh and precise::tanh).
void math_builtins(const float* x, float* out, uint tid) {
  out[2 * tid] = tanh(x[tid]);
  out[2 * tid + 1] = precise::tanh(x[tid]);
}

// Lane 5 loads from a different address than the rest of its simdgroup.
void divergent_collective(const float* src, uint lane) {
  threadgroup float tile[72];
  for (int e = 0; e < 72; ++e) tile[e] = src[e];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_float8x8 m;
  simdgroup_load(m, tile + (lane == 5 ? 8 : 0), 8);
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

}  // namespace orchard::metal_emu::selftest
