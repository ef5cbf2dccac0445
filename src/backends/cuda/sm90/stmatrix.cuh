// stmatrix (sm_90): a warp stores four 8x8 b16 matrices to shared memory in one instruction.
// Register i of every lane holds row lane/4, columns 2*(lane%4)..+1 of matrix i -- exactly the
// layout of an fp32 accumulator pair after packing to bf16x2/f16x2 -- and lane l supplies the
// 16-byte row address of row l%8 of matrix l/8.  4x fewer instructions than 4-byte st.shared
// and, with a 128B-swizzled destination, free of bank conflicts.  Data written this way and
// read next by TMA (a store) needs fence_proxy_async_smem() in each writing thread first.
#pragma once
#include <cstdint>

namespace orchard::sm90 {

__device__ __forceinline__ void stmatrix_x4(uint32_t smem_row_addr, uint32_t r0, uint32_t r1,
                                            uint32_t r2, uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(
                   smem_row_addr),
               "r"(r0), "r"(r1), "r"(r2), "r"(r3)
               : "memory");
}

}  // namespace orchard::sm90
