// The sm_90a forward's entry points as the CUDA backend's dispatch sees them (no CUDA
// device code here: cuda_backend.cu includes this whatever the target architectures).
// Defined in flash_fwd_sm90_<dtype>_d<d>.cu, compiled only when ORCHARD_CUDA_ARCHS holds 90
// (ORCHARD_WITH_SM90=1).
#pragma once
#include "orchard/params.h"

namespace orchard::cuda {

// The sm90 kernels' head-dim bucket for a d in 33..256 that is a multiple of 8: the smallest of
// 64 / 96 / 128 / 192 / 256 that holds it (96 since session 28: the d128 bucket did 128 columns of
// GEMM work for d96; the d96 kernels run 64B-swizzled 32-column chunks).  The kernels read and
// write the true d; TMA zero-fills the tile columns past it.
constexpr int sm90_head_dim_bucket(int d) {
  return d <= 64 ? 64 : d <= 96 ? 96 : d <= 128 ? 128 : d <= 192 ? 192 : 256;
}

// The bytes of one swizzle row of a bucket's Q / K / V / dO tiles (the forward's and the backward's
// tiles and TMA boxes): 128 (64 columns, 128B swizzle), or 64 (32 columns, 64B swizzle) at d96,
// whose 96 columns are then 3 whole chunks, so every GEMM runs over exactly 96 columns (a 96-wide
// MN-major operand in 128B-swizzled chunks would be 1.5 swizzle atoms; CUTLASS picks 64B there too).
constexpr int sm90_tile_swizzle_bytes(int bucket) { return bucket == 96 ? 64 : 128; }

// Runs the forward on the sm90 kernel; false when the TMA descriptors could not be
// encoded (the caller then runs the sm80 kernels).  T: __nv_bfloat16 / __half; kD: the head-dim
// bucket 64/96/128/192/256 (any d <= kD, d % 8 == 0, d == d_v).
template <typename T, int kD>
bool run_flash_fwd_sm90(const FwdParams& p);

}  // namespace orchard::cuda
