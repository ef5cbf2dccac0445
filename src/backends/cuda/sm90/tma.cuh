// TMA (cp.async.bulk.tensor) device side: 2D tile loads from global memory into shared memory
// that complete on an mbarrier (complete_tx::bytes).  One thread issues; the copy engine moves
// the whole box, applying the swizzle named in the tensor map, so smem tiles come out in the
// layout wgmma_desc.cuh describes.  The CUtensorMap is built on the host (tma_host.h) and must
// reach the kernel as a `const __grid_constant__ CUtensorMap` parameter (its address is then a
// param-space address the TMA unit can read; a copy in local memory would not work).
#pragma once
#include <cstdint>
#include <cuda.h>  // CUtensorMap (type only; no libcuda link)

namespace orchard::sm90 {

// Pulls the 128-byte descriptor into the TMA unit's cache before the first copy uses it.
__device__ __forceinline__ void tma_prefetch_desc(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// Box at (c0 = innermost coordinate, c1 = row) of `map` -> smem `dst`; counts its bytes on `bar`.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, uint32_t bar,
                                            int32_t c0, int32_t c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
}

// Same, with an L2 cache-policy hint (a createpolicy value, e.g. evict_last for a reused operand).
__device__ __forceinline__ void tma_load_2d_hint(uint32_t dst, const CUtensorMap* map,
                                                 uint32_t bar, int32_t c0, int32_t c1,
                                                 uint64_t policy) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, {%3, %4}], [%2], %5;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "l"(policy)
      : "memory");
}

// Multicast form: the box lands at the same smem offset in every CTA of the cluster whose bit
// is set in `cta_mask`, and completes on the mbarrier at the same offset in each of them.
__device__ __forceinline__ void tma_load_2d_multicast(uint32_t dst, const CUtensorMap* map,
                                                      uint32_t bar, int32_t c0, int32_t c1,
                                                      uint16_t cta_mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%3, %4}], [%2], %5;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "h"(cta_mask)
      : "memory");
}

}  // namespace orchard::sm90
