// The sm90 backward as three launches on p.stream: the sm80 path's pre-pass (D = rowsum(dO * O),
// which also clears our own dq_accum), the sm_90a main kernel (flash_bwd_sm90.cuh), the sm80 dQ
// convert (scale, dtype). A caller-owned accumulator (p.dq_accum, the ring's) is zeroed and
// converted by the caller: the main kernel only adds into it.  Included by flash_bwd_sm90_passes.cu (the library, compiled for the
// backend's architectures: the two sm80 kernels must not be instantiated in an sm_90a-only
// object) and by bench/sm90/sm90_bwd_bench.cu.
#pragma once
#include <cuda_runtime.h>

#include "backends/cuda/sm80/flash_bwd_kernel.cuh"
#include "backends/cuda/launch.h"
#include "backends/cuda/pdl.cuh"
#include "backends/cuda/sm90/flash_bwd_sm90_launch.h"

namespace orchard::cuda {

template <typename T, int kD>
bool run_flash_bwd_sm90(const BwdParams& p, bool bulk_dq) {
  BwdSm90MapsStorage maps;
  if (!encode_flash_bwd_sm90<T, kD>(p, &maps)) return false;
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  const BwdWorkspace layout = bwd_workspace_layout(p);
  unsigned char* ws = static_cast<unsigned char*>(p.workspace);
  float* dsum = reinterpret_cast<float*>(ws + layout.d_offset);
  const bool own_dq_accum = p.dq_accum == nullptr;
  float* dq_accum = reinterpret_cast<float*>(ws + layout.dq_accum_offset);  // when own_dq_accum
  const int64_t rows = static_cast<int64_t>(p.b) * p.hq * p.sq;
  const bool vec = true;  // sm90_bwd_applies: 16-byte rows and strides (TMA needs them anyway)
  if (rows > 0) launch_bwd_dot<T>(p, dsum, vec, own_dq_accum ? dq_accum : nullptr, stream);
  if (p.deterministic && rows > 0) {  // the ordered dQ adds' turn counters start at 0
    cudaMemsetAsync(bwd_dq_turns(p), 0, dq_turn_count(p) * sizeof(int), stream);
    check_launch("cudaMemsetAsync (the ordered dQ adds' turns)");
  }
  launch_flash_bwd_sm90_main<T, kD>(p, maps, dsum, dq_accum, bulk_dq);
  if (rows > 0 && own_dq_accum) {
    // With PDL it waits for the main kernel (pdl_wait_primary) before it reads.
    launch_bwd_convert_dq<T>(p, dq_accum, vec, stream, ORCHARD_SM90_BWD_PDL);
  }
  return true;
}

}  // namespace orchard::cuda
