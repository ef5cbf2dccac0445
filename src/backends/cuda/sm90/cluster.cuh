// Thread-block clusters (sm_90): CTA rank, cluster-wide barrier, and arrivals on a peer CTA's
// mbarrier.  Used when two CTAs share one operand through TMA multicast: each consumer must
// then tell BOTH producers that a stage is free, since either may write into it next.
#pragma once
#include <cstdint>

namespace orchard::sm90 {

__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}

// All threads of all CTAs in the cluster; release/acquire orders prior smem writes
// (e.g. mbarrier.init) before any peer's use of them.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

// Arrive on the mbarrier at local smem address `bar` as mapped into CTA `cta_rank` of the
// cluster (the own rank works too).  Default semantics (release at CTA scope), on purpose:
// `.release.cluster` makes ptxas put MEMBAR.ALL.GPU + ERRBAR before every arrive (seen in
// SASS), and a consumer releasing a stage has no ordinary memory accesses to order -- its
// reads of the stage were wgmma (async proxy) reads, complete at wgmma.wait_group.
__device__ __forceinline__ void mbarrier_arrive_cluster(uint32_t bar, uint32_t cta_rank) {
  asm volatile(
      "{\n.reg .b32 remote;\n"
      "mapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [remote];\n}\n" ::"r"(bar),
      "r"(cta_rank)
      : "memory");
}

}  // namespace orchard::sm90
