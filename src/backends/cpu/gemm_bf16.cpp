// AVX-512-BF16 tile GEMM (see gemm_bf16.h). Micro-tile: MR = 6 rows x NV
// zmm columns (NV <= 4: 64 fp32 columns) = 24 accumulators + 4 B vectors +
// 1 broadcast of 32 zmm registers. Per K pair: NV loads of B (16 columns x 2
// bf16 each), MR 32-bit broadcasts of A, MR * NV vdpbf16ps.
#include "backends/cpu/gemm_bf16.h"

#include <cstring>

// GCC 12 flags the _mm512_undefined_* inside its own intrinsic headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define ORCHARD_BF16_DOT 1
#define ORCHARD_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#endif

namespace orchard::cpu {

#ifdef ORCHARD_BF16_DOT
namespace {

// A's pair (row r, pair p) is the 32-bit word at a + r * a_rs + p * a_ps.
template <int MR, int NV>
ORCHARD_BF16_TARGET inline __attribute__((always_inline)) void micro(
    int kpairs, const std::uint16_t* a, std::int64_t a_rs, std::int64_t a_ps,
    const std::uint16_t* b, std::int64_t ldb, float* c, std::int64_t ldc, bool accumulate) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[r][v] = accumulate ? _mm512_loadu_ps(c + r * ldc + 16 * v) : _mm512_setzero_ps();
  for (int p = 0; p < kpairs; ++p) {
    __m512bh bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      bv[v] = (__m512bh)_mm512_loadu_si512(b + p * ldb + 32 * v);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      std::int32_t w;
      std::memcpy(&w, a + r * a_rs + p * a_ps, 4);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(w);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + r * ldc + 16 * v, acc[r][v]);
}

template <int NV>
ORCHARD_BF16_TARGET void column_panel(int m, int kpairs, const std::uint16_t* a, std::int64_t a_rs,
                                      std::int64_t a_ps, const std::uint16_t* b, std::int64_t ldb,
                                      float* c, std::int64_t ldc, bool accumulate) {
  constexpr int MR = 6;
  int i = 0;
  for (; i + MR <= m; i += MR)
    micro<MR, NV>(kpairs, a + i * a_rs, a_rs, a_ps, b, ldb, c + i * ldc, ldc, accumulate);
  const std::uint16_t* ai = a + i * a_rs;
  float* ci = c + i * ldc;
  switch (m - i) {
    case 5: micro<5, NV>(kpairs, ai, a_rs, a_ps, b, ldb, ci, ldc, accumulate); break;
    case 4: micro<4, NV>(kpairs, ai, a_rs, a_ps, b, ldb, ci, ldc, accumulate); break;
    case 3: micro<3, NV>(kpairs, ai, a_rs, a_ps, b, ldb, ci, ldc, accumulate); break;
    case 2: micro<2, NV>(kpairs, ai, a_rs, a_ps, b, ldb, ci, ldc, accumulate); break;
    case 1: micro<1, NV>(kpairs, ai, a_rs, a_ps, b, ldb, ci, ldc, accumulate); break;
    default: break;
  }
}

ORCHARD_BF16_TARGET void gemm_bf16_avx512(int m, int n, int kpairs, const std::uint16_t* a,
                                          std::int64_t a_rs, std::int64_t a_ps,
                                          const std::uint16_t* b, std::int64_t ldb, float* c,
                                          std::int64_t ldc, bool accumulate) {
  int j = 0;
  for (; j + 64 <= n; j += 64)
    column_panel<4>(m, kpairs, a, a_rs, a_ps, b + 2 * j, ldb, c + j, ldc, accumulate);
  switch ((n - j) / 16) {
    case 3: column_panel<3>(m, kpairs, a, a_rs, a_ps, b + 2 * j, ldb, c + j, ldc, accumulate); break;
    case 2: column_panel<2>(m, kpairs, a, a_rs, a_ps, b + 2 * j, ldb, c + j, ldc, accumulate); break;
    case 1: column_panel<1>(m, kpairs, a, a_rs, a_ps, b + 2 * j, ldb, c + j, ldc, accumulate); break;
    default: break;
  }
}

ORCHARD_BF16_TARGET void to_bf16_avx512(const float* src, std::int64_t lds, int rows, int n,
                                        std::uint16_t* dst, std::int64_t ldd) {
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < n; j += 16) {
      const __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + r * lds + j));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + r * ldd + j), (__m256i)h);
    }
}

ORCHARD_BF16_TARGET void to_bf16_pairs_t_avx512(const float* src, std::int64_t lds, int rows, int n,
                                                std::uint16_t* dst, std::int64_t ldd) {
  for (int p = 0; 2 * p < rows; ++p) {
    const float* r0 = src + 2 * p * lds;
    const bool has1 = 2 * p + 1 < rows;
    for (int j = 0; j < n; j += 16) {
      const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(r0 + j)));
      __m512i w = lo;
      if (has1) {
        const __m512i hi =
            _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(r0 + lds + j)));
        w = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
      }
      _mm512_storeu_si512(dst + p * ldd + 2 * j, w);
    }
  }
}

}  // namespace
#endif

bool bf16_dot_available() {
#ifdef ORCHARD_BF16_DOT
  static const bool yes = __builtin_cpu_supports("avx512bf16") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return yes && g_bf16_dot;
#else
  return false;
#endif
}

void gemm_bf16(int m, int n, int kpairs, const std::uint16_t* a, std::int64_t a_rs,
               std::int64_t a_ps, const std::uint16_t* b, std::int64_t ldb, float* c,
               std::int64_t ldc, bool accumulate) {
#ifdef ORCHARD_BF16_DOT
  gemm_bf16_avx512(m, n, kpairs, a, a_rs, a_ps, b, ldb, c, ldc, accumulate);
#else
  (void)m; (void)n; (void)kpairs; (void)a; (void)a_rs; (void)a_ps; (void)b; (void)ldb; (void)c;
  (void)ldc; (void)accumulate;
#endif
}

void to_bf16_pairs_t(const float* src, std::int64_t lds, int rows, int n, std::uint16_t* dst,
                     std::int64_t ldd) {
#ifdef ORCHARD_BF16_DOT
  to_bf16_pairs_t_avx512(src, lds, rows, n, dst, ldd);
#else
  (void)src; (void)lds; (void)rows; (void)n; (void)dst; (void)ldd;
#endif
}

void to_bf16_rows(const float* src, std::int64_t lds, int rows, int n, std::uint16_t* dst,
                  std::int64_t ldd) {
#ifdef ORCHARD_BF16_DOT
  to_bf16_avx512(src, lds, rows, n, dst, ldd);
#else
  (void)src; (void)lds; (void)rows; (void)n; (void)dst; (void)ldd;
#endif
}

}  // namespace orchard::cpu
