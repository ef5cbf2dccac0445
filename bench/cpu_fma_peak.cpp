// This core's fp32 FMA peak, and how close the CPU backend's fp32 tile GEMM
// (src/backends/cpu/gemm.h) gets to it at the forward's shapes; one thread,
// hot L1, no GoogleTest, so it builds on any host with a compiler:
//   g++ -O2 -std=c++20 -ffp-contract=fast -Isrc -Iinclude bench/cpu_fma_peak.cpp \
//       src/backends/cpu/gemm.cpp -o /tmp/fma_peak && /tmp/fma_peak
// Peak: 12 independent FMA chains (more than latency x throughput on any
// x86 core), zmm and ymm, min of 7 runs; check the loop is vfmadd (objdump)
// if the compiler flags change. The GEMM lines time the calls the
// fp32 forward makes per 64 x 64 tile: S = Q K^T (64 x 64 x d) and O += P V
// (64 x d x 64), FLOPs = 2 m n k.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "backends/cpu/gemm.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define FMA_PEAK_X86 1
#endif

namespace {

using Clock = std::chrono::steady_clock;

template <class F>
double best_seconds(F&& f, int runs = 7) {
  double best = 1e30;
  for (int r = 0; r < runs; ++r) {
    const auto t0 = Clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return best;
}

#ifdef FMA_PEAK_X86
constexpr int kChains = 12;
constexpr long kIters = 20'000'000;

typedef float v16f __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));

// kChains independent acc = acc * a + b chains of Lanes-wide vectors V (one
// FMA each under -ffp-contract=fast); inlined into the target-specific loops.
template <class V, int Lanes>
__attribute__((always_inline)) inline float fma_chains(float seed) {
  V acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = V{} + (seed + i);
  const V a = V{} + 0.999999f, b = V{} + 1e-7f;
  for (long it = 0; it < kIters; ++it)
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) acc[i] = acc[i] * a + b;
  float s = 0.f;
  for (int i = 0; i < kChains; ++i) s += acc[i][0] + acc[i][Lanes - 1];
  return s;
}

__attribute__((target("avx512f"), noinline)) float zmm_loop(float seed) { return fma_chains<v16f, 16>(seed); }
__attribute__((target("avx2,fma"), noinline)) float ymm_loop(float seed) { return fma_chains<v8f, 8>(seed); }
#endif

void time_gemm(const char* what, int m, int n, int k, bool accumulate) {
  std::mt19937 rng(1);
  std::normal_distribution<float> nd;
  std::vector<float> a(std::size_t(m) * k), b(std::size_t(k) * n), c(std::size_t(m) * n, 0.f);
  for (auto& x : a) x = nd(rng);
  for (auto& x : b) x = nd(rng);
  constexpr int kCalls = 2000;
  const double s = best_seconds([&] {
    for (int i = 0; i < kCalls; ++i)
      orchard::cpu::gemm(m, n, k, a.data(), k, b.data(), n, c.data(), n, accumulate);
  });
  const double flops = 2.0 * m * n * k * kCalls;
  std::printf("gemm %-22s %3d x %3d x %3d: %7.1f GFLOP/s (%.0f ns per call)\n", what, m, n, k,
              flops / s * 1e-9, s / kCalls * 1e9);
}

}  // namespace

int main() {
#ifdef FMA_PEAK_X86
  volatile float sink = 0.f;
  const double flops_z = 2.0 * 16 * kChains * kIters, flops_y = 2.0 * 8 * kChains * kIters;
  if (__builtin_cpu_supports("avx512f")) {
    const double s = best_seconds([&] { sink = sink + zmm_loop(1.f); });
    std::printf("zmm FMA loop: %7.1f GFLOP/s (%.2f G FMA instr/s)\n", flops_z / s * 1e-9,
                kChains * kIters / s * 1e-9);
  }
  if (__builtin_cpu_supports("fma")) {
    const double s = best_seconds([&] { sink = sink + ymm_loop(1.f); });
    std::printf("ymm FMA loop: %7.1f GFLOP/s (%.2f G FMA instr/s)\n", flops_y / s * 1e-9,
                kChains * kIters / s * 1e-9);
  }
#endif
  for (int d : {64, 128}) {
    time_gemm("S = Q K^T", 64, 64, d, false);
    time_gemm("O += P V", 64, d, 64, true);
  }
  return 0;
}
