// Programmatic dependent launch (sm_90+): a kernel launched with the
// ProgrammaticStreamSerialization attribute may start (its launch, its prologue) while the
// kernel before it in the stream is still finishing; it must call pdl_wait_primary() before it
// reads anything that kernel writes (the wait returns once that grid has completed and its
// memory is visible; without the attribute, or before sm_90, it is a no-op).
#pragma once
#include <cuda_runtime.h>

#include <utility>

namespace orchard::cuda {

// This grid's dependents may be scheduled from now on (they still wait for its completion).
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Waits for the grid this one depends on (completion and memory flush).
__device__ __forceinline__ void pdl_wait_primary() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

#if !defined(ORCHARD_DECODE_EMU)  // (the CPU emulators, dev/decode_emu and dev/sm80_emu)
// kernel<<<grid, block, smem, stream>>>(args...) with programmatic stream serialization, or
// a plain launch where the runtime refuses the attribute.  Host side; the caller checks the
// launch (check_launch) as for <<<>>>.
template <typename... KernelArgs, typename... Args>
void launch_pdl(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  if (cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...) == cudaSuccess) return;
  cudaGetLastError();  // not supported here: the plain launch
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
}
#else  // the sm80-class kernels' CPU emulation (dev/sm80_emu): a plain launch
template <typename... KernelArgs, typename... Args>
void launch_pdl(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                Args&&... args) {
  emu_launch(kernel, grid, block, smem, stream, std::forward<Args>(args)...);
}
#endif

}  // namespace orchard::cuda
