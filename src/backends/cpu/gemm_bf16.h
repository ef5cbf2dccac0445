// bf16 x bf16 -> fp32 tile products with AVX-512-BF16 (vdpbf16ps: 32 bf16
// multiply-adds into 16 fp32 lanes per instruction, twice the fp32 FMA rate
// on Zen 4). Used for bf16 inputs only, where the kernels may round to bf16
// what they multiply (the inputs already are; P is rounded the way torch's
// bf16 kernels round it).
//
// Layout ("pair-packed", the VNNI layout): the reduction dimension K is taken
// two at a time. A's pair (row r, K pair p) is the 32-bit word at
// a + r * a_rs + p * a_ps (uint16 units): row-major A (element (r, k) at
// a[r * lda + k], lda even) is a_rs = lda, a_ps = 2; a pair-packed A^T (as
// written by to_bf16_pairs_t) is a_rs = 2, a_ps = its ldd. B is stored as pairs:
// element (k, j) at b[(k / 2) * ldb + 2 * j + k % 2]. C (M x N fp32, ldc)
// (+)= A B over kpairs * 2 values of K. N % 16 == 0; M arbitrary.
#pragma once

#include <cstdint>

namespace orchard::cpu {

// True when the CPU runs vdpbf16ps (AVX512_BF16 + AVX512BW/VL) and the
// bf16 path is enabled (g_bf16_dot).
bool bf16_dot_available();
// Tests and A/B timing switch it off to run the fp32 path on bf16 inputs.
inline bool g_bf16_dot = true;

void gemm_bf16(int m, int n, int kpairs, const std::uint16_t* a, std::int64_t a_rs,
               std::int64_t a_ps, const std::uint16_t* b, std::int64_t ldb, float* c,
               std::int64_t ldc, bool accumulate);

// dst[r * ldd + j] = bf16(src[r * lds + j]) for j < n (n % 16 == 0), round to nearest even.
void to_bf16_rows(const float* src, std::int64_t lds, int rows, int n, std::uint16_t* dst,
                  std::int64_t ldd);

// Pair-packs a fp32 tile (rows x n, lds; n % 16 == 0) along its rows:
// dst[(r / 2) * ldd + 2 * j + r % 2] = bf16(src[r * lds + j]); an odd last row
// gets a zero partner. As the A operand this is src^T (a_rs = 2, a_ps = ldd),
// as the B operand src itself (ldb = ldd).
void to_bf16_pairs_t(const float* src, std::int64_t lds, int rows, int n, std::uint16_t* dst,
                     std::int64_t ldd);

}  // namespace orchard::cpu
