// The sm90 backward as three launches on p.stream: the sm80 path's pre-pass (D = rowsum(dO * O)),
// the dq_accum memset, the sm_90a main kernel (flash_bwd_sm90.cuh), the sm80 dQ convert
// (scale, dtype).  Included by flash_bwd_sm90_passes.cu (the library, compiled for the
// backend's architectures: the two sm80 kernels must not be instantiated in an sm_90a-only
// object) and by bench/sm90/sm90_bwd_bench.cu.
#pragma once
#include <cuda_runtime.h>

#include "backends/cuda/flash_bwd_kernel.cuh"
#include "backends/cuda/launch.h"
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
  float* dq_accum = reinterpret_cast<float*>(ws + layout.dq_accum_offset);
  const int64_t rows = static_cast<int64_t>(p.b) * p.hq * p.sq;
  const bool vec = true;  // sm90_bwd_applies: 16-byte rows and strides (TMA needs them anyway)
  if (rows > 0) {
    const int rows_per_block = 256 / bwd_dot_lanes(value_dim(p));
    bwd_dot_kernel<T><<<static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block), 256, 0, stream>>>(
        p, dsum, vec);
    check_launch("bwd_dot_kernel");
    const size_t acc_floats = static_cast<size_t>(p.b) * p.hq * dq_accum_rows(p.sq) * dq_accum_cols(p.d);
    if (cudaMemsetAsync(dq_accum, 0, acc_floats * sizeof(float), stream) != cudaSuccess)
      check_launch("cudaMemsetAsync(dq_accum)");
  }
  launch_flash_bwd_sm90_main<T, kD>(p, maps, dsum, dq_accum, bulk_dq);
  if (rows > 0) {
    const int64_t n4 = static_cast<int64_t>(p.b) * p.hq * dq_accum_rows(p.sq) * (dq_accum_cols(p.d) / 4);
    bwd_convert_dq_kernel<T><<<static_cast<unsigned>((n4 + 255) / 256), 256, 0, stream>>>(p, dq_accum, vec);
    check_launch("bwd_convert_dq_kernel");
  }
  return true;
}

}  // namespace orchard::cuda
