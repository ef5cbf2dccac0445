// What the attention benches (sm90_attn_bench.cu, sm90_bwd_bench.cu, ../fp32_tc/fp32_tc_bench.cu)
// share: the library's launch check and shared-memory opt-in (cuda_backend.cu defines them in the
// real build), CK, the 16-bit conversions, the hashed random fill and the warmed-up median timer. Each bench is one
// translation unit that includes this once.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <vector>

#include "backends/cuda/launch.h"

void orchard::cuda::check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    std::printf("CUDA error in %s: %s\n", what, cudaGetErrorString(e));
    std::exit(2);
  }
}

// Cached per kernel like the library's (one device here), so that a timed host path makes no more
// driver calls than the library's does. A failed opt-in shows up in the launch's check_launch.
void orchard::cuda::opt_in_dynamic_smem(const void* kernel, int bytes) {
  static std::map<const void*, int> opted;
  int& have = opted[kernel];
  if (have >= bytes) return;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) == cudaSuccess) have = bytes;
}

// The library's occupancy query (cuda_backend.cu), cached alike; defined inside the namespace, not
// by a qualified name, so that an older tree's launch.h without its declaration builds too (A/B).
namespace orchard::cuda {
int resident_ctas(const void* kernel, int threads, int smem_bytes) {
  static std::map<std::pair<const void*, int>, int> known;  // (kernel, bytes); threads: one count per kernel
  const auto key = std::make_pair(kernel, smem_bytes);
  const auto it = known.find(key);
  if (it != known.end()) return it->second;
  int ctas = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, kernel, threads, static_cast<std::size_t>(smem_bytes)) !=
      cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return known[key] = ctas;
}
}  // namespace orchard::cuda

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

// Median of `reps` CUDA-event timed calls, after warm-up of at least `min_warm_calls` calls and at
// least 50 ms (each synchronized): clocks settle after a shape's host-side set-up. It did not make
// runs repeatable: the same kernel timed twice in one run (session 17, "library" and "overlap" at
// d192) still differed by up to 10 %, either way round, so decide between variants on medians of
// repeated runs of the binary. Each call is timed alone, so the median drops one an outside hiccup
// slowed.
template <typename Call>
double median_ms(Call&& call, int reps, int min_warm_calls = 1) {
  const auto warm_end = std::chrono::steady_clock::now() + std::chrono::milliseconds(50);
  for (int i = 0; i < min_warm_calls || std::chrono::steady_clock::now() < warm_end; ++i) {
    call();
    CK(cudaDeviceSynchronize());
  }
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  std::vector<float> ms;
  for (int i = 0; i < reps; ++i) {
    CK(cudaEventRecord(e0));
    call();
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float t;
    CK(cudaEventElapsedTime(&t, e0, e1));
    ms.push_back(t);
  }
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}
