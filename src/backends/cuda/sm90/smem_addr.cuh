// Shared-memory addresses as the 32-bit values that PTX's .shared::cta operands take.
// Every sm90 wrapper (mbarrier, TMA, wgmma descriptors) speaks in these, not in generic
// pointers: a generic pointer would cost a cvta per use and hide the address space from ptxas.
#pragma once
#include <cstdint>

namespace orchard::sm90 {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// One lane of the warp returns true (elect.sync, sm_90): the lane that issues a TMA or an
// mbarrier arrive on behalf of its warp, without a lane==0 compare the compiler can't see is uniform.
__device__ __forceinline__ bool elect_one_sync() {
  uint32_t pred = 0;
  asm volatile(
      "{\n.reg .pred p;\n.reg .b32 l;\n"
      "elect.sync l|p, 0xffffffff;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(pred));
  return pred != 0;
}

// Warp index made warp-uniform for the compiler (role branches on it then stay uniform).
__device__ __forceinline__ int warp_idx_uniform() {
  return __shfl_sync(0xffffffff, static_cast<int>(threadIdx.x) / 32, 0);
}

}  // namespace orchard::sm90
