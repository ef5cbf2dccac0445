// Named barriers (bar.sync id, count): synchronize a subset of the CTA, e.g. the 128 threads
// of one consumer warpgroup, without stalling the producer or the other warpgroup.
// Id 0 is __syncthreads(); give each group its own id in 1..15.  count is a multiple of 32.
#pragma once
#include <cstdint>

namespace orchard::sm90 {

__device__ __forceinline__ void named_barrier_sync(uint32_t id, uint32_t count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

// Arrives at barrier id without waiting (a producer's half of a bar.sync by its consumers,
// count = both sides' threads).
__device__ __forceinline__ void named_barrier_arrive(uint32_t id, uint32_t count) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

}  // namespace orchard::sm90
