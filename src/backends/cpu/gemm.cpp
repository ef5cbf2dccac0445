// Register-blocked tile GEMM. One micro-tile is MR rows x 2 vectors of C
// (6 x 16 floats = 12 AVX accumulators + 2 B loads + 1 broadcast = 15 of the
// 16 ymm registers, the BLIS Haswell shape). Column panels of B (K x 16) stay
// in L1 while all rows of A stream past them.
#include "backends/cpu/gemm.h"

#include "backends/cpu/simd.h"

namespace orchard::cpu {
namespace {

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

}  // namespace

ORCHARD_CPU_CLONES
void gemm(int m, int n, int k, const float* a, std::int64_t lda, const float* b, std::int64_t ldb,
          float* c, std::int64_t ldc, bool accumulate) {
  gemm_body<float, false>(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
}

ORCHARD_CPU_CLONES
void gemm_tn(int m, int n, int k, const float* a, std::int64_t lda, const float* b,
             std::int64_t ldb, float* c, std::int64_t ldc, bool accumulate) {
  gemm_body<float, true>(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
}

ORCHARD_CPU_CLONES
void gemm(int m, int n, int k, const double* a, std::int64_t lda, const double* b,
          std::int64_t ldb, double* c, std::int64_t ldc, bool accumulate) {
  gemm_body<double, false>(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
}

ORCHARD_CPU_CLONES
void gemm_tn(int m, int n, int k, const double* a, std::int64_t lda, const double* b,
             std::int64_t ldb, double* c, std::int64_t ldc, bool accumulate) {
  gemm_body<double, true>(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
}

}  // namespace orchard::cpu
