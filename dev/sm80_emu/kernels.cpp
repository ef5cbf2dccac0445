// One (dtype, head-dim bucket) of the sm80-class kernels for the CPU emulator (dev/sm80_emu/run.sh
// compiles this file once per bucket and dtype, with EMU_T / EMU_D set, against the transformed
// kernel headers and the shim of dev/decode_emu).
#include "backends/cuda/sm80/flash_bwd_kernel.cuh"
#include "backends/cuda/sm80/flash_fwd_kernel.cuh"

namespace orchard::cuda {
template void run_flash_fwd<EMU_T, EMU_D>(const FwdParams&);
template void run_flash_bwd<EMU_T, EMU_D>(const BwdParams&);
#if defined(EMU_SMEM_BYTES)  // once per bucket (the bf16 object), as the generated bf16 files do
template int sm80_fwd_smem_bytes<EMU_D>(bool);
#endif
}  // namespace orchard::cuda
