// TMA (cp.async.bulk.tensor) device side: 2D tile loads from global memory into shared memory
// that complete on an mbarrier (complete_tx::bytes), and 2D tile stores back (bulk groups).  One thread issues; the copy engine moves
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

// 4D box at (c0 = innermost, c1, c2, c3) -> smem `dst`: attention's (dim, row, head, batch)
// view of a BSHD tensor, so one map serves every (batch, head) and rows past the sequence
// end read as zeros (the copy engine clips at the dims, never into the next batch entry).
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, uint32_t bar,
                                            int32_t c0, int32_t c1, int32_t c2, int32_t c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5, %6}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
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

// ---- stores: smem -> global (bulk-group completion, no mbarrier) ----
// Box at (c0, c1) of `map` <- smem `src`.  Issue after every writing thread has done
// fence_proxy_async_smem() and a barrier; then commit.  The smem source may be overwritten
// only after tma_store_wait_read<N>() (in the issuing thread) and a barrier.
__device__ __forceinline__ void tma_store_2d(const CUtensorMap* map, uint32_t src, int32_t c0,
                                             int32_t c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];\n" ::"l"(
          reinterpret_cast<uint64_t>(map)),
      "r"(src), "r"(c0), "r"(c1)
      : "memory");
}

// 4D box at (c0, c1, c2, c3) of `map` <- smem `src` (tma_load_4d's view; the copy engine clips
// the box at the map's dims: rows past the sequence end and columns past d are not written).
__device__ __forceinline__ void tma_store_4d(const CUtensorMap* map, uint32_t src, int32_t c0, int32_t c1,
                                             int32_t c2, int32_t c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%2, %3, %4, %5}], [%1];\n" ::"l"(
          reinterpret_cast<uint64_t>(map)),
      "r"(src), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}

// Closes the stores issued so far by this thread into one bulk group.
__device__ __forceinline__ void tma_store_commit() {
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}

// Returns when at most N of this thread's bulk groups still READ their smem source
// (the buffer can be reused; the global writes may still be in flight).
template <int N>
__device__ __forceinline__ void tma_store_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}

// Returns when at most N of this thread's bulk groups are still incomplete (writes done).
template <int N>
__device__ __forceinline__ void tma_store_wait_all() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}

}  // namespace orchard::sm90
