// Umbrella include for the sm_90a PTX wrappers (compile these with
// -gencode=arch=compute_90a,code=sm_90a: wgmma and setmaxnreg exist only on the "a" target).
#pragma once
#include "smem_addr.cuh"
#include "mbarrier.cuh"
#include "cluster.cuh"
#include "fence_proxy.cuh"
#include "named_barrier.cuh"
#include "stmatrix.cuh"
#include "setmaxnreg.cuh"
#include "tma.cuh"
#include "wgmma_desc.cuh"
#include "wgmma_sync.cuh"
#include "wgmma_mma.cuh"
