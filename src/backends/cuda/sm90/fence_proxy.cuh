// fence.proxy.async: orders this thread's ordinary (generic-proxy) shared-memory accesses
// against the async proxy (TMA engine, wgmma operand reads).  Needed when threads write smem
// with st.shared / stmatrix and the tensor cores or a TMA store read it next (each writing
// thread fences, then the barrier), and when smem read by wgmma/TMA is overwritten by threads.
// Not needed between a TMA load and wgmma: the mbarrier completion already orders those.
#pragma once

namespace orchard::sm90 {

__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

}  // namespace orchard::sm90
