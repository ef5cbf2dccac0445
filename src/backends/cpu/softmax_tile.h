// Element-wise tile steps of the attention kernels (everything between the
// GEMMs): masking, the online-softmax update of the forward, and the
// P / dS recomputation of the backward. Scores are in base 2: callers pass
// c = softmax_scale * log2(e) and lse2 = lse * log2(e), so exp becomes exp2.
//
// `nv[r]` is the number of leading valid columns in tile row r (the rest are
// past sk or causally masked); tiles are `bc` columns wide, bc % 16 == 0.
#pragma once

#include <cstdint>

namespace orchard::cpu {

// The fp32 steps come in three implementations: generic 8-lane vectors (any x86-64 or other
// CPU), AVX2 + FMA intrinsics, and AVX-512 (tiles with bc and dp % 16 == 0). By default each
// call takes the widest the CPU has, or the one ORCHARD_CPU_SOFTMAX=generic|avx2|avx512 names
// (read at the first call; benches A/B them across processes); force_softmax_path pins one for
// the whole process (tests run every path the CPU supports; kAuto goes back to the default),
// false if the CPU lacks it. kAvx512 still runs kAvx2 on tiles it cannot take.
enum class SoftmaxPath { kAuto, kGeneric, kAvx2, kAvx512 };
bool softmax_path_supported(SoftmaxPath path);
bool force_softmax_path(SoftmaxPath path);

// Forward: s (rows x bc, ld bc) holds raw q.k scores; on return it holds the
// unnormalised probabilities exp2(c*s - m_new) (0 where masked). Updates the
// running max m[r] and sum l[r] and rescales the output accumulator rows
// o[r * ldo + 0..dp) by exp2(m_old - m_new). A row whose scores hold a NaN ends with
// l = NaN (so out and lse are NaN); on the AVX-512 path (c > 0) its m and its other P stay
// finite (the max skips NaN: session 19), on the others they are NaN too.
void softmax_tile_update(float* s, int rows, int bc, const int* nv, float c, float* m, float* l,
                         float* o, std::int64_t ldo, int dp);
void softmax_tile_update(double* s, int rows, int bc, const int* nv, double c, double* m,
                         double* l, double* o, std::int64_t ldo, int dp);

// The same update for the bf16 forward, writing the probabilities rounded to
// bf16 (nearest even) to p16 (rows x bc, ld bc) and leaving s as it was; false
// (nothing done) where the CPU lacks AVX-512-BF16, the AVX-512 path is not the one
// picked, c <= 0 or bc % 32 != 0: run softmax_tile_update and to_bf16_rows instead.
// A row whose scores hold a NaN gets l = NaN (so out and lse are NaN) but a finite m and
// finite P in its other columns, as the fp32 update's AVX-512 path (c > 0) since session 19.
bool softmax_tile_update_bf16(const float* s, int rows, int bc, const int* nv, float c, float* m,
                              float* l, float* o, std::int64_t ldo, int dp, std::uint16_t* p16);

// Backward: in: s = raw q.k scores, dp = dO.v^T (both rows x bc, ld bc);
// keep (rows x bc bytes) or nullptr without dropout, rp = 1/(1-p).
// out: s = P * keep * rp (the dropped probabilities that multiply dO into dV),
//      dp = dS = P * (dP * keep * rp - D).
// Rows with lse2 == -inf produce zeros.
void backward_tile(float* s, float* dp, int rows, int bc, const int* nv, float c,
                   const float* lse2, const float* dsum, const std::uint8_t* keep, float rp);
void backward_tile(double* s, double* dp, int rows, int bc, const int* nv, double c,
                   const double* lse2, const double* dsum, const std::uint8_t* keep, double rp);

// p[j] = 0 where keep[j] == 0, j < n (the forward's dropout: 1 / (1 - p) scales O at the end).
void zero_dropped(float* p, const std::uint8_t* keep, int n);
void zero_dropped(double* p, const std::uint8_t* keep, int n);
void zero_dropped(std::uint16_t* p16, const std::uint8_t* keep, int n);

}  // namespace orchard::cpu
