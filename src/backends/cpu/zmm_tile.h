// The block of C that the AVX-512 micro-kernels (gemm.cpp fp32 FMA,
// gemm_bf16.cpp vdpbf16ps) keep in registers: MR rows x NV zmm vectors of 16
// fp32 columns, loaded from C (accumulate) or zeroed before the K loop and
// stored back after it. Only for translation units that compile AVX-512
// functions (x86-64 GCC / Clang); callers have avx512f in their target.
#pragma once

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>

#include <cstdint>

namespace orchard::cpu {

template <int MR, int NV>
struct ZmmTile {
  __m512 acc[MR][NV];

  __attribute__((target("avx512f"), always_inline)) inline void load(const float* c, std::int64_t ldc,
                                                                      bool accumulate) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v)
        acc[r][v] = accumulate ? _mm512_loadu_ps(c + r * ldc + 16 * v) : _mm512_setzero_ps();
  }

  __attribute__((target("avx512f"), always_inline)) inline void store(float* c, std::int64_t ldc) const {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + r * ldc + 16 * v, acc[r][v]);
  }
};

}  // namespace orchard::cpu
#endif
