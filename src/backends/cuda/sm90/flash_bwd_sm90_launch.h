// The sm_90a backward's entry points as the CUDA backend sees them (no device code here).
// The main kernels (flash_bwd_sm90.cuh for d <= 128, flash_bwd_sm90_wide.cuh above; their host
// side in flash_bwd_sm90_host.cuh) are defined in flash_bwd_sm90_<dtype>_d<d>.cu, compiled
// only for sm_90a when ORCHARD_CUDA_ARCHS holds 90 (ORCHARD_WITH_SM90=1); the whole backward
// (sm80 pre-pass, main kernel, sm80 dQ convert) is run_flash_bwd_sm90 in
// flash_bwd_sm90_passes.cu, compiled with the backend's own architectures.
#pragma once
#include <cstdint>

#include "orchard/params.h"

// The main kernel and the dQ convert launched as programmatic dependents (pdl.cuh) of the
// kernel before each (flash_bwd_sm90_host.cuh, flash_bwd_sm90_run.cuh).
#ifndef ORCHARD_SM90_BWD_PDL
#define ORCHARD_SM90_BWD_PDL 1
#endif

// The d64 non-causal launches are persistent up to this many queries (flash_bwd_sm90_host.cuh).
#ifndef ORCHARD_SM90_BWD64_PERSISTENT_MAX_SQ
#define ORCHARD_SM90_BWD64_PERSISTENT_MAX_SQ 2048
#endif

namespace orchard::cuda {

// How dQ partials reach dq_accum by default (bench/NOTES.md: measured atomics vs bulk adds).
constexpr bool kSm90BwdBulkDqDefault = true;

// Opaque storage for the call's TMA descriptors (Q, K, V, dO and a dense attn_bias: 128 bytes each).
struct alignas(64) BwdSm90MapsStorage {
  unsigned char bytes[5 * 128];
};

// Encodes the TMA maps; false when the driver refuses them (the caller runs the sm80 backward).
template <typename T, int kD>
bool encode_flash_bwd_sm90(const BwdParams& p, BwdSm90MapsStorage* maps);

// Launches the main kernel on p.stream: dK, dV written, dS K added into dq_accum (fp32, zeroed
// by the caller, launch.h layout) by 16-byte atomicAdds or, bulk_dq, by cp.reduce.async.bulk;
// dsum = D = rowsum(dO * O) from the pre-pass.
template <typename T, int kD>
void launch_flash_bwd_sm90_main(const BwdParams& p, const BwdSm90MapsStorage& maps, const float* dsum,
                                float* dq_accum, bool bulk_dq);

// The whole sm90 backward; false (nothing launched) when the maps cannot be encoded.
// T: __nv_bfloat16 / __half; kD (the head-dim bucket, sm90_head_dim_bucket): 64 / 96 / 128
// (flash_bwd_sm90.cuh; d96 adds dQ by bulk adds whatever bulk_dq says), 192 / 256
// (flash_bwd_sm90_wide.cuh, which adds dQ by atomics whatever bulk_dq says).
template <typename T, int kD>
bool run_flash_bwd_sm90(const BwdParams& p, bool bulk_dq = kSm90BwdBulkDqDefault);

}  // namespace orchard::cuda
