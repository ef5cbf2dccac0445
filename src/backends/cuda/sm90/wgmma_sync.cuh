// wgmma ordering primitives (sm_90a).  wgmma.mma_async runs asynchronously to the issuing
// warpgroup; these are the only ways to order it against ordinary register/smem accesses.
//   wgmma_fence()    before the first wgmma that touches accumulators (or A registers) that
//                    ordinary instructions wrote since the last wgmma; cheap, so once per batch.
//   wgmma_commit()   closes the wgmmas issued so far into one group.
//   wgmma_wait<N>()  returns when at most N committed groups are still in flight: only then
//                    may the accumulators be read or the smem operands of older groups be reused.
//   fence_operand()  an empty asm that "uses and redefines" a register, so the compiler cannot
//                    move ordinary accesses to the accumulators across the fence/commit/wait.
#pragma once
#include <cstdint>

namespace orchard::sm90 {

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}

__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void wgmma_wait() {
  static_assert(N >= 0 && N <= 7, "wgmma.wait_group takes 0..7");
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void fence_operand(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }

template <int R>
__device__ __forceinline__ void fence_operands(float (&r)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) fence_operand(r[i]);
}

}  // namespace orchard::sm90
