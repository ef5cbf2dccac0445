// Register-blocked tile GEMM. One micro-tile is MR rows x 2 vectors of C
// (6 x 16 floats = 12 AVX accumulators + 2 B loads + 1 broadcast = 15 of the
// 16 ymm registers, the BLIS Haswell shape). Column panels of B (K x 16) stay
// in L1 while all rows of A stream past them.
#include "backends/cpu/gemm.h"

#include <cstdlib>

#include "backends/cpu/cpu_features.h"
#include "backends/cpu/simd.h"
#include "backends/cpu/zmm_tile.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define ORCHARD_GEMM_AVX512 1
#define ORCHARD_GEMM_AVX512_TARGET __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl")))
// GCC 12 flags the _mm512_undefined_* inside its own intrinsic headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace orchard::cpu {
namespace {

#ifdef ORCHARD_GEMM_AVX512
// fp32 AVX-512 path: micro-tile 6 rows x 64 columns (24 zmm accumulators, 4 B
// vectors, 1 broadcast), the shape of gemm_bf16.cpp. Zen 4 runs a zmm FMA as
// two 256-bit halves (same FLOP peak as ymm), but each A broadcast now feeds
// 64 columns instead of 16, so A is read once per row group instead of once
// per 16-column panel and there are 2.4x fewer loads per FMA.
template <int MR, int NV, bool kTransA>
ORCHARD_GEMM_AVX512_TARGET inline __attribute__((always_inline)) void micro512(
    int k, const float* a, std::int64_t lda, const float* b, std::int64_t ldb, float* c,
    std::int64_t ldc, bool accumulate) {
  ZmmTile<MR, NV> t;
  t.load(c, ldc, accumulate);
  for (int kk = 0; kk < k; ++kk) {
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(b + kk * ldb + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(kTransA ? a[kk * lda + r] : a[r * lda + kk]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) t.acc[r][v] = _mm512_fmadd_ps(av, bv[v], t.acc[r][v]);
    }
  }
  t.store(c, ldc);
}

template <int NV, bool kTransA>
ORCHARD_GEMM_AVX512_TARGET void panel512(int m, int k, const float* a, std::int64_t lda,
                                         const float* b, std::int64_t ldb, float* c,
                                         std::int64_t ldc, bool accumulate) {
  constexpr int MR = 6;
  auto arow = [&](int i) { return kTransA ? a + i : a + i * lda; };
  int i = 0;
  for (; i + MR <= m; i += MR)
    micro512<MR, NV, kTransA>(k, arow(i), lda, b, ldb, c + i * ldc, ldc, accumulate);
  const float* ai = arow(i);
  float* ci = c + i * ldc;
  switch (m - i) {
    case 5: micro512<5, NV, kTransA>(k, ai, lda, b, ldb, ci, ldc, accumulate); break;
    case 4: micro512<4, NV, kTransA>(k, ai, lda, b, ldb, ci, ldc, accumulate); break;
    case 3: micro512<3, NV, kTransA>(k, ai, lda, b, ldb, ci, ldc, accumulate); break;
    case 2: micro512<2, NV, kTransA>(k, ai, lda, b, ldb, ci, ldc, accumulate); break;
    case 1: micro512<1, NV, kTransA>(k, ai, lda, b, ldb, ci, ldc, accumulate); break;
    default: break;
  }
}

template <bool kTransA>
ORCHARD_GEMM_AVX512_TARGET void gemm512(int m, int n, int k, const float* a, std::int64_t lda,
                                        const float* b, std::int64_t ldb, float* c,
                                        std::int64_t ldc, bool accumulate) {
  int j = 0;
  for (; j + 64 <= n; j += 64) panel512<4, kTransA>(m, k, a, lda, b + j, ldb, c + j, ldc, accumulate);
  switch ((n - j) / 16) {
    case 3: panel512<3, kTransA>(m, k, a, lda, b + j, ldb, c + j, ldc, accumulate); break;
    case 2: panel512<2, kTransA>(m, k, a, lda, b + j, ldb, c + j, ldc, accumulate); break;
    case 1: panel512<1, kTransA>(m, k, a, lda, b + j, ldb, c + j, ldc, accumulate); break;
    default: break;
  }
}

// Switch for A/B timing (ORCHARD_CPU_GEMM512=0 in the environment turns it off).
bool use_avx512() {
  static const bool yes = [] {
    const char* e = std::getenv("ORCHARD_CPU_GEMM512");
    return cpu_has_avx512() && !(e && e[0] == '0');
  }();
  return yes;
}
#endif

// kTransA: a is stored K x M (element (r, kk) at a[kk * lda + r]), so
// C += A^T-stored products need no explicit transpose of the tile.
template <class T, int MR, bool kTransA>
ORCHARD_ALWAYS_INLINE void micro(int k, const T* a, std::int64_t lda, const T* b, std::int64_t ldb,
                                 T* c, std::int64_t ldc, bool accumulate) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::kLanes;
  V c0[MR], c1[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    if (accumulate) {
      c0[r] = vload<V>(c + r * ldc);
      c1[r] = vload<V>(c + r * ldc + L);
    } else {
      c0[r] = V{};
      c1[r] = V{};
    }
  }
  for (int kk = 0; kk < k; ++kk) {
    const V b0 = vload<V>(b + kk * ldb);
    const V b1 = vload<V>(b + kk * ldb + L);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const T av = kTransA ? a[kk * lda + r] : a[r * lda + kk];
      c0[r] += av * b0;
      c1[r] += av * b1;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    vstore(c + r * ldc, c0[r]);
    vstore(c + r * ldc + L, c1[r]);
  }
}

template <class T, bool kTransA>
ORCHARD_ALWAYS_INLINE void gemm_body(int m, int n, int k, const T* a, std::int64_t lda, const T* b,
                                     std::int64_t ldb, T* c, std::int64_t ldc, bool accumulate) {
  constexpr int NR = 2 * Vec<T>::kLanes;
  constexpr int MR = sizeof(T) == 4 ? 6 : 4;  // doubles: 4 x 8 keeps 8 accumulators
  for (int j = 0; j < n; j += NR) {
    int i = 0;
    for (; i + MR <= m; i += MR)
      micro<T, MR, kTransA>(k, kTransA ? a + i : a + i * lda, lda, b + j, ldb, c + i * ldc + j,
                            ldc, accumulate);
    const T* ai = kTransA ? a + i : a + i * lda;
    T* ci = c + i * ldc + j;
    switch (m - i) {
      case 5: micro<T, 5, kTransA>(k, ai, lda, b + j, ldb, ci, ldc, accumulate); break;
      case 4: micro<T, 4, kTransA>(k, ai, lda, b + j, ldb, ci, ldc, accumulate); break;
      case 3: micro<T, 3, kTransA>(k, ai, lda, b + j, ldb, ci, ldc, accumulate); break;
      case 2: micro<T, 2, kTransA>(k, ai, lda, b + j, ldb, ci, ldc, accumulate); break;
      case 1: micro<T, 1, kTransA>(k, ai, lda, b + j, ldb, ci, ldc, accumulate); break;
      default: break;
    }
  }
}

// The one entry body: the AVX-512 kernel for fp32 where it runs (N a multiple
// of 16), else the 8-wide kernel of this clone.
template <class T>
ORCHARD_ALWAYS_INLINE void gemm_any(int m, int n, int k, const T* a, std::int64_t lda, const T* b,
                                    std::int64_t ldb, T* c, std::int64_t ldc, bool accumulate,
                                    bool trans_a) {
#ifdef ORCHARD_GEMM_AVX512
  if constexpr (sizeof(T) == 4)
    if (n % 16 == 0 && use_avx512())
      return trans_a ? gemm512<true>(m, n, k, a, lda, b, ldb, c, ldc, accumulate)
                     : gemm512<false>(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
#endif
  trans_a ? gemm_body<T, true>(m, n, k, a, lda, b, ldb, c, ldc, accumulate)
          : gemm_body<T, false>(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
}

}  // namespace

ORCHARD_CPU_CLONES
void gemm(int m, int n, int k, const float* a, std::int64_t lda, const float* b, std::int64_t ldb,
          float* c, std::int64_t ldc, bool accumulate, bool trans_a) {
  gemm_any(m, n, k, a, lda, b, ldb, c, ldc, accumulate, trans_a);
}

// fp64 (gradcheck only) keeps the same clones, so the 4-wide double vectors use AVX2 where present.
ORCHARD_CPU_CLONES
void gemm(int m, int n, int k, const double* a, std::int64_t lda, const double* b, std::int64_t ldb,
          double* c, std::int64_t ldc, bool accumulate, bool trans_a) {
  gemm_any(m, n, k, a, lda, b, ldb, c, ldc, accumulate, trans_a);
}

}  // namespace orchard::cpu
