// Small dense products for attention tiles: C (M x N) (+)= A (M x K) * B (K x N),
// all row-major with leading dimensions. N must be a multiple of kGemmNMultiple
// (the kernels pad head dims and column blocks to it); M and K are arbitrary.
#pragma once

#include <cstdint>

namespace orchard::cpu {

inline constexpr int kGemmNMultiple = 16;

void gemm(int m, int n, int k, const float* a, std::int64_t lda, const float* b, std::int64_t ldb,
          float* c, std::int64_t ldc, bool accumulate);
void gemm(int m, int n, int k, const double* a, std::int64_t lda, const double* b,
          std::int64_t ldb, double* c, std::int64_t ldc, bool accumulate);

// Same with A stored transposed: a is K x M row-major (lda >= M), C = A^T-of-
// storage times B. Lets the backward form dV += P^T dO and dK += dS^T Q
// straight from the row-major P / dS tiles.
void gemm_tn(int m, int n, int k, const float* a, std::int64_t lda, const float* b,
             std::int64_t ldb, float* c, std::int64_t ldc, bool accumulate);
void gemm_tn(int m, int n, int k, const double* a, std::int64_t lda, const double* b,
             std::int64_t ldb, double* c, std::int64_t ldc, bool accumulate);

}  // namespace orchard::cpu
