// What the sm90 attention benches (sm90_attn_bench.cu, sm90_bwd_bench.cu) share: the library's
// launch check (cuda_backend.cu defines it in the real build), CK, the 16-bit conversions and
// the hashed random fill. Each bench is one translation unit that includes this once.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "backends/cuda/launch.h"

void orchard::cuda::check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    std::printf("CUDA error in %s: %s\n", what, cudaGetErrorString(e));
    std::exit(2);
  }
}

#define CK(x)                                                                              \
  do {                                                                                     \
    cudaError_t e_ = (x);                                                                  \
    if (e_ != cudaSuccess) {                                                               \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      std::exit(2);                                                                        \
    }                                                                                      \
  } while (0)

template <typename T> __device__ __host__ float to_f(T x);
template <> __device__ __host__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __host__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ T from_f(float x);
template <> __device__ __nv_bfloat16 from_f(float x) { return __float2bfloat16(x); }
template <> __device__ __half from_f(float x) { return __float2half(x); }
// x rounded to T (the naive low-precision reference's intermediates).
template <typename T> __device__ float round_t(float x) { return to_f<T>(from_f<T>(x)); }

__device__ uint32_t hash_u32(uint64_t x) {
  x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL; x ^= x >> 33;
  return static_cast<uint32_t>(x);
}
// Roughly normal values (sum of 4 uniforms), like torch.randn scaled.
template <typename T>
__global__ void fill_kernel(T* x, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    float s = 0.f;
    for (int k = 0; k < 4; ++k) s += (hash_u32(seed * 0x9E3779B97F4A7C15ULL + i * 4 + k) >> 8) * (1.f / 16777216.f);
    x[i] = from_f<T>((s - 2.f) * 1.7320508f);
  }
}
