// cp.reduce.async.bulk (sm_90): the copy engine adds a contiguous fp32 block from shared memory
// into global memory (element-wise .add.f32), completing as a bulk group of the issuing thread
// (the same groups as TMA stores: tma_store_commit / tma_store_wait_read / _wait_all).  The
// writing threads fence_proxy_async_smem() before the barrier that precedes the issue; the
// smem source may be rewritten after tma_store_wait_read<0>() in the issuing thread.
#pragma once
#include <cstdint>

namespace orchard::sm90 {

// global[dst .. dst + bytes) += smem[src .. src + bytes) as fp32; bytes a multiple of 16, both
// addresses 16-byte aligned.
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, uint32_t src, uint32_t bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst), "r"(src),
               "r"(bytes)
               : "memory");
}

}  // namespace orchard::sm90
