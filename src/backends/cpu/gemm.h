// Small dense products for attention tiles: C (M x N) (+)= A (M x K) * B (K x N),
// all row-major with leading dimensions. N must be a multiple of kGemmNMultiple
// (the kernels pad head dims and column blocks to it); M and K are arbitrary.
#pragma once

#include <cstdint>

namespace orchard::cpu {

inline constexpr int kGemmNMultiple = 16;

// trans_a: A is stored transposed, a is K x M row-major (lda >= M), C = the
// product with A^T of that storage: lets the backward form dV += P^T dO and
// dK += dS^T Q straight from the row-major P / dS tiles (gemm_tn).
void gemm(int m, int n, int k, const float* a, std::int64_t lda, const float* b, std::int64_t ldb,
          float* c, std::int64_t ldc, bool accumulate, bool trans_a = false);
void gemm(int m, int n, int k, const double* a, std::int64_t lda, const double* b,
          std::int64_t ldb, double* c, std::int64_t ldc, bool accumulate, bool trans_a = false);

template <class T>
inline void gemm_tn(int m, int n, int k, const T* a, std::int64_t lda, const T* b, std::int64_t ldb,
                    T* c, std::int64_t ldc, bool accumulate) {
  gemm(m, n, k, a, lda, b, ldb, c, ldc, accumulate, /*trans_a=*/true);
}

}  // namespace orchard::cpu
