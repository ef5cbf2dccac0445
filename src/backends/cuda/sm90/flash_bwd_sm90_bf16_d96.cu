// sm_90a backward main kernel instantiation (causal and not); compiled only with
// -gencode=arch=compute_90a,code=sm_90a (sources.cmake: orchard_add_sm90).
#include "backends/cuda/sm90/flash_bwd_sm90_host.cuh"

namespace orchard::cuda {
template bool encode_flash_bwd_sm90<__nv_bfloat16, 96>(const BwdParams&, BwdSm90MapsStorage*);
template void launch_flash_bwd_sm90_main<__nv_bfloat16, 96>(const BwdParams&, const BwdSm90MapsStorage&, const float*,
                                                        float*, bool);
}  // namespace orchard::cuda
