// The sm90 backward's driver (flash_bwd_sm90_run.cuh), compiled with the backend's own
// architectures: it instantiates the sm80 pre-pass and dQ convert kernels, which must not
// come from an sm_90a-only object (a template kernel's host stub is shared across objects).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "backends/cuda/sm90/flash_bwd_sm90_run.cuh"

namespace orchard::cuda {
template bool run_flash_bwd_sm90<__nv_bfloat16, 64>(const BwdParams&, bool);
template bool run_flash_bwd_sm90<__nv_bfloat16, 96>(const BwdParams&, bool);
template bool run_flash_bwd_sm90<__nv_bfloat16, 128>(const BwdParams&, bool);
template bool run_flash_bwd_sm90<__half, 64>(const BwdParams&, bool);
template bool run_flash_bwd_sm90<__half, 96>(const BwdParams&, bool);
template bool run_flash_bwd_sm90<__half, 128>(const BwdParams&, bool);
template bool run_flash_bwd_sm90<__nv_bfloat16, 192>(const BwdParams&, bool);
template bool run_flash_bwd_sm90<__nv_bfloat16, 256>(const BwdParams&, bool);
template bool run_flash_bwd_sm90<__half, 192>(const BwdParams&, bool);
template bool run_flash_bwd_sm90<__half, 256>(const BwdParams&, bool);
}  // namespace orchard::cuda
