// CPU emulation of the CUDA subset decode_kernel.cu and flash_fp32.cu use (expf, logf, tanhf,
// fmaf, fmaxf are the C library's): one std::thread per CUDA thread, CTAs run one after
// another, __syncthreads / __syncwarp / shuffles / ldmatrix / mma.sync as barrier-synchronized
// exchanges (mma and ldmatrix follow the PTX ISA's fragment layouts, written independently of
// the kernel). cp.async is a plain copy.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "orchard/numeric.h"

#define ORCHARD_DECODE_EMU 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3() = default;
  dim3(unsigned a, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint4 { unsigned x, y, z, w; };
struct float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline float2 make_float2(float a, float b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }

template <class A, class B>
inline auto min(A a, B b) -> std::common_type_t<A, B> { return a < b ? a : b; }
template <class A, class B>
inline auto max(A a, B b) -> std::common_type_t<A, B> { return a < b ? b : a; }
inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
template <class T>
inline T __ldg(const T* p) { return *p; }

typedef int cudaError_t;
typedef void* cudaStream_t;
constexpr cudaError_t cudaSuccess = 0;
enum { cudaFuncAttributePreferredSharedMemoryCarveout = 9, cudaSharedmemCarveoutMaxShared = 100, cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97
};
inline const char* cudaGetErrorName(cudaError_t) { return "emu"; }
inline const char* cudaGetErrorString(cudaError_t) { return "emu"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
// Emulated devices: emu_device is the current one, emu_smem_optin[device] its dynamic shared-
// memory opt-in (sm_90's 227 KB unless a test sets another, so that kernels which size their
// CTAs by it take their other shapes). Every other attribute reads 132 (an H100's SM count,
// and a compute capability >= 9).
inline int emu_device = 0;
inline int emu_smem_optin[4] = {227 * 1024, 227 * 1024, 227 * 1024, 227 * 1024};
inline cudaError_t cudaGetDevice(int* d) { *d = emu_device; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int d) {
  *v = a == cudaDevAttrMaxSharedMemoryPerBlockOptin ? emu_smem_optin[d] : 132;
  return cudaSuccess;
}
template <class K>
cudaError_t cudaFuncSetAttribute(K, int, int v) {
  return v <= emu_smem_optin[emu_device] ? cudaSuccess : 1;  // the opt-in limit (and any carveout)
}

// ---- per-thread / per-CTA state -------------------------------------------------------
struct EmuWarp {
  std::barrier<> bar{32};
  float f[32];
  std::uint32_t u[32][6];
  const void* ptr[32];
};
struct EmuBlock {
  explicit EmuBlock(int n) : bar(n), warps(n / 32) {}
  std::barrier<> bar;
  std::vector<EmuWarp> warps;
  std::vector<unsigned char> smem;
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline thread_local EmuBlock* emu_block = nullptr;
inline unsigned char* emu_dyn_smem() { return emu_block->smem.data(); }
inline EmuWarp& emu_warp() { return emu_block->warps[threadIdx.x / 32]; }
inline int emu_lane() { return threadIdx.x % 32; }
inline void __syncthreads() { emu_block->bar.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_warp().bar.arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int o) {
  EmuWarp& w = emu_warp();
  const int l = emu_lane();
  w.f[l] = v;
  w.bar.arrive_and_wait();
  const float r = w.f[l ^ o];
  w.bar.arrive_and_wait();
  return r;
}

template <class V>
inline V __shfl_sync(unsigned, V v, int src) {
  static_assert(sizeof(V) <= 8);
  EmuWarp& w = emu_warp();
  const int l = emu_lane();
  std::memcpy(&w.u[l][0], &v, sizeof(V));
  w.bar.arrive_and_wait();
  V r;
  std::memcpy(&r, &w.u[src & 31][0], sizeof(V));
  w.bar.arrive_and_wait();
  return r;
}
inline int __any_sync(unsigned, int pred) {
  EmuWarp& w = emu_warp();
  const int l = emu_lane();
  w.f[l] = pred ? 1.f : 0.f;
  w.bar.arrive_and_wait();
  int any = 0;
  for (int t = 0; t < 32; ++t) any |= w.f[t] != 0.f;
  w.bar.arrive_and_wait();
  return any;
}

template <class K, class... A>
void emu_launch(K kernel, dim3 grid, dim3 block, std::size_t smem, cudaStream_t, const A&... args) {
  gridDim = grid;
  blockDim = block;
  const int n = block.x;
  const unsigned ctas = grid.x * grid.y * grid.z;
  if (ctas == 0) return;
  // One std::thread per CUDA thread of a CTA, started once per launch and reused by every CTA in
  // turn: the CTAs run one after another, each on a fresh EmuBlock (barrier, shared memory).
  std::unique_ptr<EmuBlock> b;
  std::barrier<> gate(n);
  auto worker = [&](int t) {
    threadIdx = dim3(t);
    for (unsigned c = 0; c < ctas; ++c) {
      if (t == 0) {
        b = std::make_unique<EmuBlock>(n);
        b->smem.assign(smem + 16, 0xff);  // 0xff bytes: NaN-ish garbage to catch reads of unwritten smem
      }
      gate.arrive_and_wait();  // the block is ready
      blockIdx = dim3(c % grid.x, c / grid.x % grid.y, c / grid.x / grid.y);
      emu_block = b.get();
      kernel(args...);
      gate.arrive_and_wait();  // every thread is done with it
    }
  };
  std::vector<std::thread> th;
  for (int t = 1; t < n; ++t) th.emplace_back(worker, t);
  worker(0);
  for (auto& t : th) t.join();
}
