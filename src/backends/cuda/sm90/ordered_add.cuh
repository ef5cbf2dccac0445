// Turn counters for ordered (deterministic) dQ adds across CTAs (sm_90).  A counter in global
// memory (zeroed before the launch) says how many adders have finished with one dQ region;
// the adder whose turn is n waits until it reads n, adds, waits until its bulk add has
// completed (tma_store_wait_all), then passes the turn.  fp32 adds into a region then happen
// in the same order on every run, so dQ is bitwise reproducible.
//
// The bulk add runs in the async proxy while the counter is read and written by ordinary
// (generic-proxy) accesses: fence.proxy.async.global on both sides orders the two.
#pragma once
#include <cstdint>

namespace orchard::sm90 {

__device__ __forceinline__ void fence_proxy_async_global() {
  asm volatile("fence.proxy.async.global;\n" ::: "memory");
}

// Spins until *turn >= n (acquire: the previous adders' writes are visible after it), then
// fences so that bulk operations issued next are ordered after the read.
__device__ __forceinline__ void wait_turn(const int* turn, int n) {
  int seen;
  do {
    asm volatile("ld.acquire.gpu.global.s32 %0, [%1];\n" : "=r"(seen) : "l"(turn) : "memory");
  } while (seen < n);
  fence_proxy_async_global();
}

// Hands the turn on: call after this thread's bulk adds have completed (tma_store_wait_all).
__device__ __forceinline__ void pass_turn(int* turn) {
  fence_proxy_async_global();
  asm volatile("red.release.gpu.global.add.s32 [%0], 1;\n" ::"l"(turn) : "memory");
}

}  // namespace orchard::sm90
