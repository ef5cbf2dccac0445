// wgmma_selftest.cuh -- one-warpgroup unit tests of the sm90 wrappers the attention kernels
// will use beyond what the GEMM exercises (included by sm90_gemm_bench.cu, run by --selftest):
//   mode 0 "ss":      D[64xN] = A[64x64] * B[Nx64]^T, A and B K-major in smem (TMA, 128B swizzle)
//   mode 1 "rs":      same, A from registers (mma.sync-style fragment, as P is in P*V)
//   mode 2 "ss_tnB":  B given as Bt[64(K) x N] row-major (N contiguous = MN-major, as V is in
//                     P*V), loaded as N/64 TMA boxes of 64x64 with 128B swizzle and read with
//                     imm-trans-b = 1, descriptor make_desc_mnmajor_sw128 (LBO = 8 KB chunk
//                     stride, SBO = 1 KB).  H200, 14:55 run: N=64 exact; the swapped encoding
//                     (LBO 1 KB, SBO 8 KB) read out of bounds (illegal address), so only the
//                     canonical one is run now.
//   mode 3 "rs_tnB":  A from registers and MN-major B: exactly P*V in attention.
// N in {64, 128, 256}; bf16 and fp16.  Reference: fp64 on the host.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "../../src/backends/cuda/sm90/sm90.cuh"
#include "../../src/backends/cuda/sm90/tma_host.h"

namespace selftest {
using namespace orchard::sm90;

template <typename T> __device__ __forceinline__ uint32_t pack2(T lo, T hi) {
  uint16_t l, h;
  memcpy(&l, &lo, 2);
  memcpy(&h, &hi, 2);
  return static_cast<uint32_t>(l) | (static_cast<uint32_t>(h) << 16);
}

// smem: [A 64x64: 8 KB][B: N/64 chunks of 8 KB][mbarrier]
template <typename T, int N, int kMode>
__global__ void __launch_bounds__(128, 1)
    wgmma_unit_kernel(const __grid_constant__ CUtensorMap tm_a, const __grid_constant__ CUtensorMap tm_b,
                      const T* __restrict__ A, float* __restrict__ D, uint32_t lbo, uint32_t sbo) {
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t sA = base, sB = base + 8192, bar = sB + N * 128;
  constexpr uint32_t kBytes = 8192 + N * 128;
  if (threadIdx.x == 0) {
    mbarrier_init(bar, 1);
    mbarrier_init_fence();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    mbarrier_arrive_expect_tx(bar, kBytes);
    tma_load_2d(sA, &tm_a, bar, 0, 0);
    if constexpr (kMode >= 2) {
#pragma unroll
      for (int c = 0; c < N / 64; ++c) tma_load_2d(sB + c * 8192, &tm_b, bar, c * 64, 0);
    } else {
      tma_load_2d(sB, &tm_b, bar, 0, 0);
    }
  }
  mbarrier_wait(bar, 0);

  float acc[N / 2];
  const int lane = threadIdx.x & 31, w = threadIdx.x / 32, g = lane >> 2, t = lane & 3;
  uint32_t afrag[4][4];
  if constexpr (kMode == 1 || kMode == 3) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const T* r0 = A + (16 * w + g) * 64 + 16 * kk + 2 * t;
      const T* r1 = r0 + 8 * 64;
      afrag[kk][0] = pack2(r0[0], r0[1]);
      afrag[kk][1] = pack2(r1[0], r1[1]);
      afrag[kk][2] = pack2(r0[8], r0[9]);
      afrag[kk][3] = pack2(r1[8], r1[9]);
    }
  }
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    if constexpr (kMode == 0) {
      Wgmma<N, T>::template ss<0, 0>(acc, make_desc_kmajor_sw128(sA + 32 * kk),
                                     make_desc_kmajor_sw128(sB + 32 * kk), kk > 0);
    } else if constexpr (kMode == 1) {
      Wgmma<N, T>::template rs<0>(acc, afrag[kk], make_desc_kmajor_sw128(sB + 32 * kk), kk > 0);
    } else if constexpr (kMode == 2) {
      // MN-major B: k16 slice kk = 16 K-rows of 128 bytes further into each 64-wide N chunk.
      Wgmma<N, T>::template ss<0, 1>(acc, make_desc_kmajor_sw128(sA + 32 * kk),
                                     make_wgmma_desc(sB + 2048 * kk, lbo, sbo, WgmmaSwizzle::k128B),
                                     kk > 0);   // == make_desc_mnmajor_sw128(sB + 2048*kk, 8192)
    } else {
      Wgmma<N, T>::template rs<1>(acc, afrag[kk],
                                  make_wgmma_desc(sB + 2048 * kk, lbo, sbo, WgmmaSwizzle::k128B),
                                  kk > 0);
    }
  }
  wgmma_commit();
  wgmma_wait<0>();
  fence_operands(acc);
#pragma unroll
  for (int i = 0; i < N / 2; ++i) {
    const int row = 16 * w + g + 8 * ((i / 2) % 2);
    const int col = 8 * (i / 4) + 2 * t + (i % 2);
    D[row * N + col] = acc[i];
  }
}

template <typename T> struct TmaT;
template <> struct TmaT<__nv_bfloat16> { static constexpr CUtensorMapDataType v = CU_TENSOR_MAP_DATA_TYPE_BFLOAT16; static constexpr const char* name = "bf16"; };
template <> struct TmaT<__half> { static constexpr CUtensorMapDataType v = CU_TENSOR_MAP_DATA_TYPE_FLOAT16; static constexpr const char* name = "fp16"; };

// Returns max |D - ref| / max|ref| (inf on launch error), printing one line.
template <typename T, int N, int kMode>
double run_one(uint32_t lbo, uint32_t sbo, const char* label) {
  const int M = 64, K = 64;
  std::vector<T> hA(M * K), hB(N * K);   // mode 2: hB is Bt[K][N]
  uint32_t x = 12345u + N * 7 + kMode;
  auto rnd = [&]() { x = x * 1664525u + 1013904223u; return ((x >> 9) & 0xFF) / 128.0f - 1.0f; };
  for (auto& v : hA) v = (T)rnd();
  for (auto& v : hB) v = (T)rnd();
  T *dA, *dB; float* dD;
  cudaMalloc(&dA, hA.size() * sizeof(T));
  cudaMalloc(&dB, hB.size() * sizeof(T));
  cudaMalloc(&dD, M * N * sizeof(float));
  cudaMemcpy(dA, hA.data(), hA.size() * sizeof(T), cudaMemcpyHostToDevice);
  cudaMemcpy(dB, hB.data(), hB.size() * sizeof(T), cudaMemcpyHostToDevice);
  cudaMemset(dD, 0xFF, M * N * sizeof(float));
  CUtensorMap ta{}, tb{};
  bool ok = make_tma_2d(&ta, TmaT<T>::v, dA, M, K, K, 64, 64);
  if (kMode >= 2) ok = ok && make_tma_2d(&tb, TmaT<T>::v, dB, K, N, N, 64, 64);   // rows = K
  else ok = ok && make_tma_2d(&tb, TmaT<T>::v, dB, N, K, K, N, 64);
  double err = INFINITY;
  if (ok) {
    const int smem = 1024 + 8192 + N * 128 + 8;
    auto kern = wgmma_unit_kernel<T, N, kMode>;
    cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    kern<<<1, 128, smem>>>(ta, tb, dA, dD, lbo, sbo);
    cudaError_t e = cudaDeviceSynchronize();
    if (e == cudaSuccess) {
      std::vector<float> hD(M * N);
      cudaMemcpy(hD.data(), dD, hD.size() * sizeof(float), cudaMemcpyDeviceToHost);
      double m = 0, mref = 0;
      for (int i = 0; i < M; ++i)
        for (int j = 0; j < N; ++j) {
          double r = 0;
          for (int k = 0; k < K; ++k) {
            const double b = kMode >= 2 ? (double)(float)hB[k * N + j] : (double)(float)hB[j * K + k];
            r += (double)(float)hA[i * K + k] * b;
          }
          const double d = std::fabs((double)hD[i * N + j] - r);
          m = (d > m || std::isnan(d)) ? (std::isnan(d) ? INFINITY : d) : m;
          mref = std::max(mref, std::fabs(r));
        }
      err = m / std::max(mref, 1e-30);
    } else {
      std::printf("  launch error: %s\n", cudaGetErrorString(e));
    }
  }
  cudaFree(dA); cudaFree(dB); cudaFree(dD);
  const bool pass = err <= 1e-5;   // exact products, fp32 sums of 64 terms
  std::printf("selftest %-4s %-7s N=%3d %-22s max|err|/max|ref| = %.2e  %s\n", TmaT<T>::name,
              kMode == 0 ? "ss" : kMode == 1 ? "rs" : kMode == 2 ? "ss_tnB" : "rs_tnB", N, label, err, pass ? "PASS" : "FAIL");
  return err;
}

template <typename T, int N>
int run_n() {
  int fails = 0;
  fails += run_one<T, N, 0>(16, 1024, "K-major") > 1e-5;
  fails += run_one<T, N, 1>(16, 1024, "K-major B") > 1e-5;
  // MN-major B, 128B swizzle: N chunks (64 wide) are 8 KB apart, 8-row K groups 1 KB apart.
  fails += run_one<T, N, 2>(8192, 1024, "LBO=8192(N) SBO=1024(K)") > 1e-5;
  fails += run_one<T, N, 3>(8192, 1024, "LBO=8192(N) SBO=1024(K)") > 1e-5;
  return fails;
}

// spec: "all" or "<bf16|fp16>:<64|128|256>" (run.sh runs one spec per process, so an illegal
// address in one case -- it kills the CUDA context -- cannot fail the others).
// Returns the number of failed cases.
inline int run_all(const std::string& spec) {
  int f = 0;
  auto want = [&](const char* x) { return spec == "all" || spec == x; };
  if (want("bf16:64")) f += run_n<__nv_bfloat16, 64>();
  if (want("bf16:128")) f += run_n<__nv_bfloat16, 128>();
  if (want("bf16:256")) f += run_n<__nv_bfloat16, 256>();
  if (want("fp16:64")) f += run_n<__half, 64>();
  if (want("fp16:128")) f += run_n<__half, 128>();
  if (want("fp16:256")) f += run_n<__half, 256>();
  std::printf("selftest %s: %d failing case(s)\n", spec.c_str(), f);
  return f;
}

}  // namespace selftest
