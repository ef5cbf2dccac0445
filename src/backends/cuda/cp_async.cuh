// cp.async (sm_80+) global -> shared copies and their groups, for the kernels that stage tiles
// without TMA (the decode kernel, the float32 kernels). Where cp.async does not exist (the CPU
// emulators' compile of those files, dev/decode_emu) each copy is a plain one, done at issue.
#pragma once

#include <cuda_runtime.h>

#include <cstring>

namespace orchard::cuda {

// A 16-byte copy (both addresses 16-byte aligned).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
#else
  std::memcpy(smem, gmem, 16);
#endif
}

// A 16-byte (4-byte) destination filled from the first `bytes` of the source (0 ..
// 16, 0 .. 4), zeros after: nothing is read past them, nothing at all when 0.
__device__ __forceinline__ void cp_async16_zfill(void* smem, const void* gmem, int bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
#else
  if (bytes > 0) std::memcpy(smem, gmem, bytes);
  std::memset(static_cast<char*>(smem) + bytes, 0, 16 - bytes);
#endif
}
__device__ __forceinline__ void cp_async4_zfill(void* smem, const void* gmem, int bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
#else
  if (bytes > 0) std::memcpy(smem, gmem, bytes);
  std::memset(static_cast<char*>(smem) + bytes, 0, 4 - bytes);
#endif
}

// Closes this thread's group of copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Waits until at most kPending of this thread's most recent groups are in flight (its own copies
// only: a barrier must follow before other threads read them).
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

}  // namespace orchard::cuda
