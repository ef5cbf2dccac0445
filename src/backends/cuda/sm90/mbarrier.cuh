// mbarrier: the shared-memory barrier that TMA copies complete on and that producer and
// consumer warps hand pipeline stages back and forth with.
//
// Phase protocol (one bit per barrier): a barrier starts in phase 0; it flips each time the
// expected arrivals AND the expected transaction bytes have all come in.  A waiter passes
// try_wait.parity(P) once phase P has completed.  A fresh barrier counts the phase before
// phase 0 (parity 1) as complete, so a producer that waits "empty" with parity (phase ^ 1)
// passes on the first lap without a separate priming step.
#pragma once
#include <cstdint>

namespace orchard::sm90 {

// One thread initializes; make it visible to the async proxy (TMA) and to the other threads
// before anyone uses it (mbarrier_init_fence + __syncthreads).
__device__ __forceinline__ void mbarrier_init(uint32_t bar, uint32_t arrive_count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrive_count) : "memory");
}

// Makes mbarrier.init visible to the TMA unit (which writes complete_tx to it).
__device__ __forceinline__ void mbarrier_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// Plain arrival (consumer releasing a stage).
__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
  asm volatile(
      "{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar)
      : "memory");
}

// `count` arrivals at once (one thread releasing a stage on behalf of several warps).
__device__ __forceinline__ void mbarrier_arrive_cnt(uint32_t bar, uint32_t count) {
  asm volatile(
      "{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(bar), "r"(count)
      : "memory");
}

// Arrival that also announces `bytes` of TMA traffic the phase must wait for (producer, once
// per stage, before or after issuing the copies: the count may go transiently negative).
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile(
      "{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(bar),
      "r"(bytes)
      : "memory");
}

// One probe; true once phase `parity` has completed.  try_wait (not test_wait) lets the
// hardware suspend the thread for a while inside the instruction instead of spinning hot.
__device__ __forceinline__ bool mbarrier_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t ok;
  asm volatile(
      "{\n.reg .pred p;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(ok)
      : "r"(bar), "r"(parity)
      : "memory");
  return ok != 0;
}

// Blocks until phase `parity` has completed.  The loop lives in PTX so ptxas sees one tight
// branch (no C++ loop for it to unroll or hoist across).
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra WAIT_%=;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

}  // namespace orchard::sm90
