// fp32 versions use explicit 8-lane vectors and a polynomial exp2 (libm's
// expf does not vectorise without -ffast-math); fp64 versions are plain
// loops with std::exp2 — fp64 exists for gradcheck, not speed.
#include "backends/cpu/softmax_tile.h"

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <limits>

#include "backends/cpu/cpu_features.h"
#include "backends/cpu/simd.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define ORCHARD_SOFTMAX_AVX512 1
#define ORCHARD_AVX512_TARGET __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl")))
#define ORCHARD_SOFTMAX_AVX2 1
#define ORCHARD_AVX2_TARGET __attribute__((target("avx2,fma")))
// GCC 12 flags the _mm512_undefined_* inside its own intrinsic headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace orchard::cpu {

#if defined(ORCHARD_SOFTMAX_AVX512) || defined(ORCHARD_SOFTMAX_AVX2)
namespace {
// 2^f on f in [-0.5, 0.5], highest power first, for exp2_16 and exp2_8: a degree-5
// relative-error fit with 2^0 == 1 exact, |rel err| 1.9e-7 in fp32 Horner (1.6 ulp).
constexpr float kExp2Poly5[6] = {1.3264714507386088e-03f, 9.6715139225125313e-03f, 5.5507339537143707e-02f,
                                 2.4022242426872253e-01f, 6.9314700365066528e-01f, 1.0f};
}  // namespace
#endif

#ifdef ORCHARD_SOFTMAX_AVX512
// AVX-512 versions of the fp32 tile steps. Measured (perf, bf16 fwd s1024 d64,
// one Zen 4 core): the 8-wide softmax_tile_update took 42% of the forward,
// as much as the GEMMs — its per-row scalar NaN-propagating max and the
// spilled constants of the 8-wide exp2 cost more than the exp itself. Here:
// 16 lanes, plain vmaxps plus a separate unordered-compare mask for NaN, and
// exp2 with vscalefps for the 2^n step.
namespace {

// 2^x: x < -126 gives exactly 0, NaN stays NaN, -inf gives 0. 2^f by kExp2Poly5,
// as exp2_8; it was simd.h's degree-7 Taylor (~1e-7), two FMAs more per 16 lanes
// (session 18, AVX-512 box, 2 threads: fp32 forward 1.02-1.05x, backward 1.02-1.03x).
ORCHARD_AVX512_TARGET inline __attribute__((always_inline)) __m512 exp2_16(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ);
  x = _mm512_max_ps(_mm512_set1_ps(-127.0f), x);  // vmaxps returns its second operand for NaN
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(kExp2Poly5[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly5[i]));
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}

// Columns [0, n) of a 16-column group starting at j.
inline __mmask16 cols_mask(int n, int j) {
  const int k = n - j;
  return k >= 16 ? __mmask16(0xFFFF) : k <= 0 ? __mmask16(0) : __mmask16((1u << k) - 1);
}

// The row's running max after its visible scores c·s[0, n): NaN if one of them
// is NaN (so a NaN input reaches the output as torch's does).
ORCHARD_AVX512_TARGET inline __attribute__((always_inline)) float running_row_max(const float* sr, int bc,
                                                                                   int n, __m512 vc,
                                                                                   float m_old) {
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 nan = 0;
  for (int j = 0; j < bc; j += 16) {
    const __mmask16 k = cols_mask(n, j);
    const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, sr + j), vc);
    nan |= _mm512_mask_cmp_ps_mask(k, x, x, _CMP_UNORD_Q);
    vmax = _mm512_mask_max_ps(vmax, k, vmax, x);
  }
  const float tile_max = nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(vmax);
  return (tile_max > m_old || tile_max != tile_max) ? tile_max : m_old;
}

// Folds a tile's P row sum into the running (m, l) and rescales O's row by
// 2^(m_old - m_new) when the max moved.
ORCHARD_AVX512_TARGET inline __attribute__((always_inline)) void rescale_row_state(
    float m_old, float m_new, float p_sum, float* m, float* l, float* orow, int dp) {
  // exp2_16 on one lane rather than std::exp2: a libm call here made the compiler spill the
  // exp polynomial's constants and reload them every row (session 19).
  const float alpha = m_old == -std::numeric_limits<float>::infinity()
                          ? 0.0f
                          : _mm512_cvtss_f32(exp2_16(_mm512_set1_ps(m_old - m_new)));
  *l = *l * alpha + p_sum;
  *m = m_new;
  if (alpha != 1.0f) {
    const __m512 va = _mm512_set1_ps(alpha);
    for (int j = 0; j < dp; j += 16) _mm512_storeu_ps(orow + j, _mm512_mul_ps(_mm512_loadu_ps(orow + j), va));
  }
}

// Max of a row's raw scores sr[0, n) (NaN ignored: vmaxps returns its second operand, the
// running max, when the score is NaN), 4 chains for vmaxps' latency.
ORCHARD_AVX512_TARGET inline __attribute__((always_inline)) float raw_row_max(const float* sr, int n) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 v0 = ninf, v1 = ninf, v2 = ninf, v3 = ninf;
  int j = 0;
  for (; j + 64 <= n; j += 64) {
    v0 = _mm512_max_ps(_mm512_loadu_ps(sr + j), v0);
    v1 = _mm512_max_ps(_mm512_loadu_ps(sr + j + 16), v1);
    v2 = _mm512_max_ps(_mm512_loadu_ps(sr + j + 32), v2);
    v3 = _mm512_max_ps(_mm512_loadu_ps(sr + j + 48), v3);
  }
  for (; j < n; j += 16) v0 = _mm512_max_ps(_mm512_mask_loadu_ps(ninf, cols_mask(n, j), sr + j), v0);
  return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(v0, v1), _mm512_max_ps(v2, v3)));
}

// The row's running max after a tile whose raw-score max (raw_row_max) is raw_max, for c > 0
// (c * max(s) is exactly max(c * s): rounding is monotonic). -inf: nothing visible yet. A row
// whose visible scores are all NaN (the max skips NaN) gets NaN, so it reaches out and lse.
inline float running_max_from_raw(float raw_max, float c, float m_old, const float* sr, int n) {
  const float tile_max = c * raw_max;
  const float m_new = tile_max > m_old ? tile_max : m_old;
  if (m_new == -std::numeric_limits<float>::infinity())
    for (int j = 0; j < n; ++j)
      if (sr[j] != sr[j]) return std::numeric_limits<float>::quiet_NaN();
  return m_new;
}

ORCHARD_AVX512_TARGET void softmax_tile_update_avx512(float* s, int rows, int bc, const int* nv,
                                                      float c, float* m, float* l, float* o,
                                                      std::int64_t ldo, int dp) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const __m512 vc = _mm512_set1_ps(c);
  // c > 0 (the usual scale): the row max over raw scores (raw_row_max, as the bf16 update), the
  // next row's taken before this row's P pass. Session 19, 2 threads, fp32 forward s512 / s1k d64,
  // s2k d128: 1.074 / 1.076 / 1.081x over the masked, c-scaled max pass with a NaN compare.
  float next_raw_max = rows > 0 && c > 0.0f ? raw_row_max(s, nv[0]) : 0.0f;
  for (int r = 0; r < rows; ++r) {
    float* sr = s + std::int64_t(r) * bc;
    const int n = nv[r];
    const float m_old = m[r];
    float m_new;
    if (c > 0.0f) {
      m_new = running_max_from_raw(next_raw_max, c, m_old, sr, n);
      if (r + 1 < rows) next_raw_max = raw_row_max(sr + bc, nv[r + 1]);
    } else {
      m_new = running_row_max(sr, bc, n, vc, m_old);
    }
    if (m_new == ninf) {  // nothing visible yet in this row
      for (int j = 0; j < bc; j += 16) _mm512_storeu_ps(sr + j, _mm512_setzero_ps());
      continue;
    }
    const __m512 vm = _mm512_set1_ps(m_new);
    __m512 vsum = _mm512_setzero_ps(), vsum1 = _mm512_setzero_ps();
    int j = 0;
    // Whole 32-column steps before n without column masks (cols_mask's compares and branches
    // per vector), two sums so the adds do not chain; then the masked rest.
    for (; j + 32 <= n; j += 32) {
      const __m512 p0 = exp2_16(_mm512_fmsub_ps(_mm512_loadu_ps(sr + j), vc, vm));
      const __m512 p1 = exp2_16(_mm512_fmsub_ps(_mm512_loadu_ps(sr + j + 16), vc, vm));
      _mm512_storeu_ps(sr + j, p0);
      _mm512_storeu_ps(sr + j + 16, p1);
      vsum = _mm512_add_ps(vsum, p0);
      vsum1 = _mm512_add_ps(vsum1, p1);
    }
    for (; j < bc; j += 16) {
      const __mmask16 k = cols_mask(n, j);
      const __m512 p = _mm512_maskz_mov_ps(k, exp2_16(_mm512_fmsub_ps(_mm512_loadu_ps(sr + j), vc, vm)));
      _mm512_storeu_ps(sr + j, p);
      vsum = _mm512_add_ps(vsum, p);
    }
    rescale_row_state(m_old, m_new, _mm512_reduce_add_ps(_mm512_add_ps(vsum, vsum1)), &m[r], &l[r],
                      o + r * ldo, dp);
  }
}

#define ORCHARD_AVX512_BF16_TARGET __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16")))

// 2^x for P that is rounded to bf16 right after (the bf16 forward), x <= ~0: vreduceps
// gives f = x - floor(x) in [0, 1) in one instruction and vscalefps takes 2^floor(x) from x
// itself, so no integer part is formed. Degree 4 on [0, 1) (p(0) = 1 exact, fitted for
// minimax relative error): |rel err| 3.0e-6 in fp32 Horner, 650x under bf16's 2^-9 rounding
// step. No clamp: vreduceps gives 0 for -inf (and for any x so negative that it is an
// integer), so P = 1 * 2^x underflows to 0; NaN stays NaN. x in (-150, -126) gives fp32
// denormals where exp2_16 gives 0; vcvtne2ps2bf16 flushes them to 0 in P, and in l they are
// below its ulp.
ORCHARD_AVX512_TARGET inline __attribute__((always_inline)) __m512 exp2_16_for_bf16(__m512 x) {
  const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 p = _mm512_set1_ps(0.013426647521555424f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.05224253237247467f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2412801831960678f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6930448412895203f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, x);
}

// P (exp2(c s - m), zero from column n on) for columns j .. j + 31 of a row, stored as 32
// bf16 with one vcvtne2ps2bf16; returns the unrounded sum's two halves added to vsum.
template <bool kMasked>
ORCHARD_AVX512_BF16_TARGET inline __attribute__((always_inline)) __m512 p_pair_bf16(
    const float* sr, std::uint16_t* pr, int j, int n, __m512 vc, __m512 vm, __m512 vsum) {
  __m512 p0 = exp2_16_for_bf16(_mm512_fmsub_ps(_mm512_loadu_ps(sr + j), vc, vm));
  __m512 p1 = exp2_16_for_bf16(_mm512_fmsub_ps(_mm512_loadu_ps(sr + j + 16), vc, vm));
  if constexpr (kMasked) {
    p0 = _mm512_maskz_mov_ps(cols_mask(n, j), p0);
    p1 = _mm512_maskz_mov_ps(cols_mask(n, j + 16), p1);
  }
  _mm512_storeu_si512(pr + j, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
  return _mm512_add_ps(vsum, _mm512_add_ps(p0, p1));
}

// The forward's row update writing P as bf16 (nearest even) to p16 and leaving s as it
// was: the bf16 forward's P V operand without a separate conversion pass; l sums the
// unrounded P. One pass over the row for its max (raw scores: c > 0 keeps the order, and
// rounding is monotonic, so c * max(s) is exactly max(c * s)), one for P, columns from n on
// only stored as zeros. Measured (session 19, 128 x 256 tiles on the AMX box) against the
// former version (masked, c-scaled max pass with a NaN compare per vector, exp2 by
// vrndscaleps with a live-lane mask, vcvtneps2bf16 per 16 lanes, std::exp2 for alpha): see
// bench/NOTES.md. c <= 0 (a negative softmax scale) or bc % 32 != 0 take the fp32 update.
ORCHARD_AVX512_BF16_TARGET void softmax_tile_update_bf16_avx512(const float* s, int rows, int bc,
                                                                 const int* nv, float c, float* m,
                                                                 float* l, float* o, std::int64_t ldo,
                                                                 int dp, std::uint16_t* p16) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const __m512 vc = _mm512_set1_ps(c);
  // The max of row r + 1 is taken before row r's P pass: P waits on its row's max (a
  // reduction tree), and with the max first in program order the out-of-order core overlaps
  // it with the previous row's P instead of filling its scheduler with P's waiting uops.
  // Measured (one core, 128 x 256 tile, d64): 6.5 -> 5.3 us (with no max pass at all: 4.3).
  float next_raw_max = rows > 0 ? raw_row_max(s, nv[0]) : 0.0f;
  for (int r = 0; r < rows; ++r) {
    const float* sr = s + std::int64_t(r) * bc;
    std::uint16_t* pr = p16 + std::int64_t(r) * bc;
    const int n = nv[r];
    const float m_old = m[r];
    const float m_new = running_max_from_raw(next_raw_max, c, m_old, sr, n);
    if (r + 1 < rows) next_raw_max = raw_row_max(sr + bc, nv[r + 1]);
    if (m_new == ninf) {  // nothing visible yet in this row (all-NaN rows got m = NaN: P NaN below)
      for (int j = 0; j < bc; j += 32) _mm512_storeu_si512(pr + j, _mm512_setzero_si512());
      continue;
    }
    const __m512 vm = _mm512_set1_ps(m_new);
    __m512 vsum = _mm512_setzero_ps();
    const int full = n / 32 * 32;
    int j = 0;
    for (; j < full; j += 32) vsum = p_pair_bf16<false>(sr, pr, j, n, vc, vm, vsum);
    if (j < n) {
      vsum = p_pair_bf16<true>(sr, pr, j, n, vc, vm, vsum);
      j += 32;
    }
    for (; j < bc; j += 32) _mm512_storeu_si512(pr + j, _mm512_setzero_si512());
    rescale_row_state(m_old, m_new, _mm512_reduce_add_ps(vsum), &m[r], &l[r], o + r * ldo, dp);
  }
}

ORCHARD_AVX512_TARGET void backward_tile_avx512(float* s, float* dp, int rows, int bc, const int* nv,
                                                float c, const float* lse2, const float* dsum,
                                                const std::uint8_t* keep, float rp) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const __m512 vc = _mm512_set1_ps(c);
  for (int r = 0; r < rows; ++r) {
    float* sr = s + std::int64_t(r) * bc;
    float* dr = dp + std::int64_t(r) * bc;
    const int n = lse2[r] == ninf ? 0 : nv[r];
    const __m512 lr = _mm512_set1_ps(lse2[r] == ninf ? 0.0f : lse2[r]);
    const __m512 ds = _mm512_set1_ps(dsum[r]);
    const std::uint8_t* kr = keep ? keep + std::int64_t(r) * bc : nullptr;
    for (int j = 0; j < bc; j += 16) {
      const __mmask16 k = cols_mask(n, j);
      const __m512 p = _mm512_maskz_mov_ps(k, exp2_16(_mm512_fmsub_ps(_mm512_loadu_ps(sr + j), vc, lr)));
      __m512 d = _mm512_loadu_ps(dr + j);
      __m512 pd = p;
      if (kr) {
        const __m512 km = _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kr + j)))),
            _mm512_set1_ps(rp));  // keep is 0/1
        pd = _mm512_mul_ps(p, km);
        d = _mm512_mul_ps(d, km);
      }
      _mm512_storeu_ps(sr + j, pd);
      _mm512_storeu_ps(dr + j, _mm512_mul_ps(p, _mm512_sub_ps(d, ds)));
    }
  }
}

}  // namespace
#endif

#ifdef ORCHARD_SOFTMAX_AVX2
// AVX2 + FMA versions of the fp32 tile steps, for CPUs without AVX-512 (Zen 2 / 3, client Intel).
// Measured (perf, fp32 fwd b1 h8 s1k d64, one Zen 3 core, session 16): the generic 8-wide
// softmax took 28 % of the forward, ~3x torch's: its degree-7 exp2 with compare-and-select
// clamps needs more than the 16 ymm registers (a constant reloaded from the stack each
// vector). Here: a degree-5 polynomial, vroundps, vmax/vmin clamps, and a separate NaN mask
// for the row max, as the AVX-512 path.
namespace {

// 2^x on 8 lanes: x < -126 gives exactly 0 (so -inf gives 0), x > 127 gives 2^127, NaN stays NaN
// (simd.h's exp2_f32's edges). 2^f by kExp2Poly5 (exp2_f32's degree-7 Taylor: ~1e-7), 2^n
// by building its exponent bits.
ORCHARD_AVX2_TARGET inline __attribute__((always_inline)) __m256 exp2_8(__m256 x) {
  const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-126.0f), _CMP_NLT_UQ);
  // vmaxps / vminps return their second operand when one is NaN: x second keeps NaN.
  x = _mm256_min_ps(_mm256_set1_ps(127.0f), _mm256_max_ps(_mm256_set1_ps(-126.0f), x));
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 p = _mm256_set1_ps(kExp2Poly5[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly5[i]));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(live, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}

// Lanes j .. j + 7 that are columns below n (all ones / zero per lane).
ORCHARD_AVX2_TARGET inline __attribute__((always_inline)) __m256 cols_below(int n, int j) {
  const __m256 col = _mm256_add_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_ps(static_cast<float>(j)));
  return _mm256_cmp_ps(col, _mm256_set1_ps(static_cast<float>(n)), _CMP_LT_OQ);
}

ORCHARD_AVX2_TARGET inline __attribute__((always_inline)) float reduce_max8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

ORCHARD_AVX2_TARGET inline __attribute__((always_inline)) float reduce_add8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The row's running max after its visible scores c·s[0, n): NaN if one of them is NaN.
ORCHARD_AVX2_TARGET inline __attribute__((always_inline)) float running_row_max8(const float* sr, int bc, int n,
                                                                                __m256 vc, float m_old) {
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 vmax = ninf, nan = _mm256_setzero_ps();
  if (n == bc) {  // interior tiles (the common case): no column mask
    for (int j = 0; j < bc; j += 8) {
      const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(sr + j), vc);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
      vmax = _mm256_max_ps(vmax, x);
    }
  } else {
    for (int j = 0; j < bc; j += 8) {
      const __m256 x = _mm256_blendv_ps(ninf, _mm256_mul_ps(_mm256_loadu_ps(sr + j), vc), cols_below(n, j));
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
      vmax = _mm256_max_ps(vmax, x);
    }
  }
  const float tile_max = _mm256_movemask_ps(nan) ? std::numeric_limits<float>::quiet_NaN() : reduce_max8(vmax);
  return (tile_max > m_old || tile_max != tile_max) ? tile_max : m_old;
}

ORCHARD_AVX2_TARGET void softmax_tile_update_avx2(float* s, int rows, int bc, const int* nv, float c, float* m,
                                                  float* l, float* o, std::int64_t ldo, int dp) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const __m256 vc = _mm256_set1_ps(c);
  for (int r = 0; r < rows; ++r) {
    float* sr = s + std::int64_t(r) * bc;
    const int n = nv[r];
    const float m_old = m[r];
    const float m_new = running_row_max8(sr, bc, n, vc, m_old);
    if (m_new == ninf) {  // nothing visible yet in this row
      for (int j = 0; j < bc; j += 8) _mm256_storeu_ps(sr + j, _mm256_setzero_ps());
      continue;
    }
    const __m256 vm = _mm256_set1_ps(m_new);
    __m256 vsum = _mm256_setzero_ps();
    if (n == bc) {
      for (int j = 0; j < bc; j += 8) {
        const __m256 p = exp2_8(_mm256_fmsub_ps(_mm256_loadu_ps(sr + j), vc, vm));
        _mm256_storeu_ps(sr + j, p);
        vsum = _mm256_add_ps(vsum, p);
      }
    } else {
      for (int j = 0; j < bc; j += 8) {
        const __m256 p = _mm256_and_ps(cols_below(n, j), exp2_8(_mm256_fmsub_ps(_mm256_loadu_ps(sr + j), vc, vm)));
        _mm256_storeu_ps(sr + j, p);
        vsum = _mm256_add_ps(vsum, p);
      }
    }
    const float alpha = m_old == ninf ? 0.0f : std::exp2(m_old - m_new);
    l[r] = l[r] * alpha + reduce_add8(vsum);
    m[r] = m_new;
    if (alpha != 1.0f) {
      float* orow = o + r * ldo;
      const __m256 va = _mm256_set1_ps(alpha);
      for (int j = 0; j < dp; j += 8) _mm256_storeu_ps(orow + j, _mm256_mul_ps(_mm256_loadu_ps(orow + j), va));
    }
  }
}

ORCHARD_AVX2_TARGET void backward_tile_avx2(float* s, float* dp, int rows, int bc, const int* nv, float c,
                                            const float* lse2, const float* dsum, const std::uint8_t* keep,
                                            float rp) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const __m256 vc = _mm256_set1_ps(c);
  for (int r = 0; r < rows; ++r) {
    float* sr = s + std::int64_t(r) * bc;
    float* dr = dp + std::int64_t(r) * bc;
    const int n = lse2[r] == ninf ? 0 : nv[r];
    const __m256 lr = _mm256_set1_ps(lse2[r] == ninf ? 0.0f : lse2[r]);
    const __m256 ds = _mm256_set1_ps(dsum[r]);
    const std::uint8_t* kr = keep ? keep + std::int64_t(r) * bc : nullptr;
    for (int j = 0; j < bc; j += 8) {
      __m256 p = exp2_8(_mm256_fmsub_ps(_mm256_loadu_ps(sr + j), vc, lr));
      if (n < bc) p = _mm256_and_ps(cols_below(n, j), p);
      __m256 d = _mm256_loadu_ps(dr + j);
      __m256 pd = p;
      if (kr) {
        std::int64_t k8;
        std::memcpy(&k8, kr + j, sizeof k8);
        const __m256 km = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(k8))),
                                        _mm256_set1_ps(rp));  // keep is 0/1
        pd = _mm256_mul_ps(p, km);
        d = _mm256_mul_ps(d, km);
      }
      _mm256_storeu_ps(sr + j, pd);
      _mm256_storeu_ps(dr + j, _mm256_mul_ps(p, _mm256_sub_ps(d, ds)));
    }
  }
}

}  // namespace
#endif

namespace {
// ORCHARD_CPU_SOFTMAX=generic|avx2|avx512 in the environment (read once, at the first call)
// pins a path for the process, for A/B timing across processes; force_softmax_path overrides it.
SoftmaxPath env_path() {
  static const SoftmaxPath path = [] {
    const char* e = std::getenv("ORCHARD_CPU_SOFTMAX");
    const std::string v = e ? e : "";
    const SoftmaxPath p = v == "generic"  ? SoftmaxPath::kGeneric
                          : v == "avx2"   ? SoftmaxPath::kAvx2
                          : v == "avx512" ? SoftmaxPath::kAvx512
                                          : SoftmaxPath::kAuto;
    return softmax_path_supported(p) ? p : SoftmaxPath::kAuto;
  }();
  return path;
}
std::atomic<int> g_forced_path{static_cast<int>(SoftmaxPath::kAuto)};

// The fp32 steps' implementation for this call: the forced one, else the widest the CPU has.
// wide16: the tile meets the 16-lane paths' shape condition (8-lane paths need % 8, always met).
SoftmaxPath pick_path(bool wide16) {
  auto forced = static_cast<SoftmaxPath>(g_forced_path.load(std::memory_order_relaxed));
  if (forced == SoftmaxPath::kAuto) forced = env_path();
  if (forced != SoftmaxPath::kAuto) return forced == SoftmaxPath::kAvx512 && !wide16 ? SoftmaxPath::kAvx2 : forced;
  if (softmax_path_supported(SoftmaxPath::kAvx512) && wide16) return SoftmaxPath::kAvx512;
  if (softmax_path_supported(SoftmaxPath::kAvx2)) return SoftmaxPath::kAvx2;
  return SoftmaxPath::kGeneric;
}
}  // namespace

bool softmax_path_supported(SoftmaxPath path) {
  switch (path) {
    case SoftmaxPath::kAuto:
    case SoftmaxPath::kGeneric: return true;
#ifdef ORCHARD_SOFTMAX_AVX2
    case SoftmaxPath::kAvx2: return cpu_has_avx2_fma();
#endif
#ifdef ORCHARD_SOFTMAX_AVX512
    case SoftmaxPath::kAvx512: return cpu_has_avx512();
#endif
    default: return false;
  }
}

bool force_softmax_path(SoftmaxPath path) {
  if (!softmax_path_supported(path)) return false;
  g_forced_path.store(static_cast<int>(path), std::memory_order_relaxed);
  return true;
}

bool softmax_tile_update_bf16(const float* s, int rows, int bc, const int* nv, float c, float* m,
                              float* l, float* o, std::int64_t ldo, int dp, std::uint16_t* p16) {
#ifdef ORCHARD_SOFTMAX_AVX512
  static const bool bf16 = __builtin_cpu_supports("avx512bf16");
  if (bf16 && c > 0.0f && pick_path(bc % 32 == 0 && dp % 16 == 0) == SoftmaxPath::kAvx512) {
    softmax_tile_update_bf16_avx512(s, rows, bc, nv, c, m, l, o, ldo, dp, p16);
    return true;
  }
#else
  (void)s; (void)rows; (void)bc; (void)nv; (void)c; (void)m; (void)l; (void)o; (void)ldo; (void)dp;
  (void)p16;
#endif
  return false;
}

ORCHARD_CPU_CLONES
void softmax_tile_update(float* s, int rows, int bc, const int* nv, float c, float* m, float* l,
                         float* o, std::int64_t ldo, int dp) {
  const SoftmaxPath path = pick_path(bc % 16 == 0 && dp % 16 == 0);
#ifdef ORCHARD_SOFTMAX_AVX512
  if (path == SoftmaxPath::kAvx512) return softmax_tile_update_avx512(s, rows, bc, nv, c, m, l, o, ldo, dp);
#endif
#ifdef ORCHARD_SOFTMAX_AVX2
  if (path == SoftmaxPath::kAvx2) return softmax_tile_update_avx2(s, rows, bc, nv, c, m, l, o, ldo, dp);
#endif
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int r = 0; r < rows; ++r) {
    float* sr = s + std::int64_t(r) * bc;
    const int n = nv[r];
    const float nvf = static_cast<float>(n);
    // Row max of c*s over the valid columns. Interior tiles (n == bc, the
    // common case) skip the column mask: that pass was ~1/4 of this function.
    vf32 vmax = vf32{} + ninf;
    if (n == bc) {
      for (int j = 0; j < bc; j += 8) {
        const vf32 x = vload<vf32>(sr + j) * c;
        vmax = (x > vmax) | (x != x) ? x : vmax;  // NaN-propagating
      }
    } else {
      for (int j = 0; j < bc; j += 8) {
        const vf32 col = iota_f32() + static_cast<float>(j);
        const vf32 x = col < nvf ? vload<vf32>(sr + j) * c : vf32{} + ninf;
        vmax = (x > vmax) | (x != x) ? x : vmax;  // NaN-propagating
      }
    }
    const float m_old = m[r];
    const float tile_max = hmax(vmax);
    const float m_new = (tile_max > m_old || tile_max != tile_max) ? tile_max : m_old;
    if (m_new == ninf) {  // nothing visible yet in this row
      for (int j = 0; j < bc; ++j) sr[j] = 0.0f;
      continue;
    }
    vf32 vsum = vf32{};
    if (n == bc) {
      for (int j = 0; j < bc; j += 8) {
        const vf32 p = exp2_f32(vload<vf32>(sr + j) * c - m_new);
        vstore(sr + j, p);
        vsum += p;
      }
    } else {
      for (int j = 0; j < bc; j += 8) {
        const vf32 col = iota_f32() + static_cast<float>(j);
        vf32 p = exp2_f32(vload<vf32>(sr + j) * c - m_new);
        p = col < nvf ? p : vf32{};
        vstore(sr + j, p);
        vsum += p;
      }
    }
    const float alpha = m_old == ninf ? 0.0f : std::exp2(m_old - m_new);
    l[r] = l[r] * alpha + hsum(vsum);
    m[r] = m_new;
    if (alpha != 1.0f) {
      float* orow = o + r * ldo;
      for (int j = 0; j < dp; j += 8) vstore(orow + j, vload<vf32>(orow + j) * alpha);
    }
  }
}

void softmax_tile_update(double* s, int rows, int bc, const int* nv, double c, double* m,
                         double* l, double* o, std::int64_t ldo, int dp) {
  const double ninf = -std::numeric_limits<double>::infinity();
  for (int r = 0; r < rows; ++r) {
    double* sr = s + std::int64_t(r) * bc;
    const int n = nv[r];
    double tile_max = ninf;
    for (int j = 0; j < bc; ++j) {
      sr[j] = j < n ? sr[j] * c : ninf;
      if (sr[j] > tile_max || std::isnan(sr[j])) tile_max = sr[j];  // NaN-propagating
    }
    const double m_old = m[r];
    const double m_new = (tile_max > m_old || std::isnan(tile_max)) ? tile_max : m_old;
    if (m_new == ninf) {
      for (int j = 0; j < bc; ++j) sr[j] = 0.0;
      continue;
    }
    double sum = 0.0;
    for (int j = 0; j < bc; ++j) {
      sr[j] = j < n ? std::exp2(sr[j] - m_new) : 0.0;
      sum += sr[j];
    }
    const double alpha = m_old == ninf ? 0.0 : std::exp2(m_old - m_new);
    l[r] = l[r] * alpha + sum;
    m[r] = m_new;
    double* orow = o + r * ldo;
    for (int j = 0; j < dp; ++j) orow[j] *= alpha;
  }
}

ORCHARD_CPU_CLONES
void backward_tile(float* s, float* dp, int rows, int bc, const int* nv, float c,
                   const float* lse2, const float* dsum, const std::uint8_t* keep, float rp) {
  const SoftmaxPath path = pick_path(bc % 16 == 0);
#ifdef ORCHARD_SOFTMAX_AVX512
  if (path == SoftmaxPath::kAvx512) return backward_tile_avx512(s, dp, rows, bc, nv, c, lse2, dsum, keep, rp);
#endif
#ifdef ORCHARD_SOFTMAX_AVX2
  if (path == SoftmaxPath::kAvx2) return backward_tile_avx2(s, dp, rows, bc, nv, c, lse2, dsum, keep, rp);
#endif
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int r = 0; r < rows; ++r) {
    float* sr = s + std::int64_t(r) * bc;
    float* dr = dp + std::int64_t(r) * bc;
    const float nvf = static_cast<float>(lse2[r] == ninf ? 0 : nv[r]);
    const float lr = lse2[r] == ninf ? 0.0f : lse2[r];
    const float dr_sum = dsum[r];
    const std::uint8_t* kr = keep ? keep + std::int64_t(r) * bc : nullptr;
    for (int j = 0; j < bc; j += 8) {
      const vf32 col = iota_f32() + static_cast<float>(j);
      const vi32 valid = col < nvf;
      vf32 p = exp2_f32(vload<vf32>(sr + j) * c - lr);
      p = valid ? p : vf32{};
      vf32 d = vload<vf32>(dr + j);
      vf32 pd = p;
      if (kr) {
        typedef std::uint8_t u8x8 __attribute__((vector_size(8)));
        const vf32 km = __builtin_convertvector(vload<u8x8>(kr + j), vf32) * rp;  // keep is 0/1
        pd = p * km;
        d = d * km;
      }
      vstore(sr + j, pd);
      vstore(dr + j, p * (d - dr_sum));
    }
  }
}

void backward_tile(double* s, double* dp, int rows, int bc, const int* nv, double c,
                   const double* lse2, const double* dsum, const std::uint8_t* keep, double rp) {
  const double ninf = -std::numeric_limits<double>::infinity();
  for (int r = 0; r < rows; ++r) {
    double* sr = s + std::int64_t(r) * bc;
    double* dr = dp + std::int64_t(r) * bc;
    const int n = lse2[r] == ninf ? 0 : nv[r];
    const std::uint8_t* kr = keep ? keep + std::int64_t(r) * bc : nullptr;
    for (int j = 0; j < bc; ++j) {
      const double p = j < n ? std::exp2(sr[j] * c - lse2[r]) : 0.0;
      double d = dr[j];
      double pd = p;
      if (kr) {
        const double k = kr[j] ? rp : 0.0;
        pd = p * k;
        d = d * k;
      }
      sr[j] = pd;
      dr[j] = p * (d - dsum[r]);
    }
  }
}

// A select, not a multiply by keep: a dropped element is exactly 0 whatever P holds (a NaN
// row still reaches O through its NaN l).
template <class E>
ORCHARD_ALWAYS_INLINE void zero_dropped_any(E* p, const std::uint8_t* keep, int n) {
  for (int j = 0; j < n; ++j) p[j] = keep[j] ? p[j] : E(0);
}
ORCHARD_CPU_CLONES
void zero_dropped(float* p, const std::uint8_t* keep, int n) { zero_dropped_any(p, keep, n); }
void zero_dropped(double* p, const std::uint8_t* keep, int n) { zero_dropped_any(p, keep, n); }
ORCHARD_CPU_CLONES
void zero_dropped(std::uint16_t* p16, const std::uint8_t* keep, int n) { zero_dropped_any(p16, keep, n); }

}  // namespace orchard::cpu
