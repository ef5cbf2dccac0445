// sm_90a forward instantiation (causal and not); compiled only with
// -gencode=arch=compute_90a,code=sm_90a (CMakeLists.txt: orchard_sm90).
#include "backends/cuda/sm90/flash_fwd_sm90.cuh"

namespace orchard::cuda {
template bool run_flash_fwd_sm90<__half, 96>(const FwdParams&);
}  // namespace orchard::cuda
