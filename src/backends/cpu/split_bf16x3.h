// fp32 products on bf16 tile hardware (AMX): each fp32 operand is split into three bf16
// planes, x == hi + mid + lo exactly (hi = bf16(x), mid = bf16(x - hi), lo = bf16(x - hi - mid),
// each rounded to nearest: 3 x 8 significant bits cover fp32's 24), and a product A B is the sum of
// the six plane products whose weight is at least 2^-16 of hi·hi:
//   A_hi B_hi + A_hi B_mid + A_mid B_hi + A_mid B_mid + A_hi B_lo + A_lo B_hi,
// each bf16 x bf16 product exact in fp32 and accumulated in fp32 (gemm_bf16x3_panels). The
// three dropped products weigh <= 2^-24 of hi·hi, an fp32 rounding's size: the error stays that of
// an fp32 GEMM (cuBLAS's BF16x9 emulation keeps all nine; NOTES.md session 58 has the
// measurement). On AMX six bf16 products cost less than one fp32 product on the FMA units (tdpbf16ps
// does 1024 multiply-adds a cycle against 2 x 16 zmm FMAs).
//
// Exactness holds down to |x| ~ 2^-110: below, a plane that falls under bf16's normal range (2^-126) may
// be flushed to 0 by vcvtneps2bf16 and is read as 0 by tdpbf16ps anyway; such a value, or its lo,
// is below any fp32 attention result's rounding.
//
// Planes of an operand sit plane_stride elements apart, the same layout in each.
#pragma once

#include <cstdint>

namespace orchard::cpu {

// True where the fp32 and fp16 forwards run their GEMMs on split planes: amx_available(),
// g_fp32_amx (tests and A/B timing) and ORCHARD_CPU_FP32_AMX not "0" in the environment (read once).
bool fp32_on_amx();
inline bool g_fp32_amx = true;
// Tests: the forward takes the split path at every size where fp32_on_amx() (by default only from
// the key counts where it measured faster: forward.cpp's split3_pays).
inline bool g_fp32_amx_any_size = false;

// dst[x * plane_stride + r * ldd + j] = plane x (0 hi, 1 mid, 2 lo) of src[r * lds + j],
// r < rows, j < n (n % 16 == 0). Vectorized where the CPU has AVX512_BF16, scalar elsewhere
// (the same roundings).
void split_rows_bf16x3(const float* src, std::int64_t lds, int rows, int n, std::uint16_t* dst,
                       std::int64_t ldd, std::int64_t plane_stride);

// split_rows_bf16x3 for values within half of FLT_MAX or NaN (the forward's probabilities P, in
// [0, 1]): the same planes without the overflow and non-finite fix-ups (~30 % fewer instructions).
void split_probabilities_bf16x3(const float* src, std::int64_t lds, int rows, int n, std::uint16_t* dst,
                                std::int64_t ldd, std::int64_t plane_stride);

}  // namespace orchard::cpu
