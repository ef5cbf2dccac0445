// Scalar Philox costs ~45 cycles per call (four columns), which made a
// dropout forward ~2x slower than one without (fp32, b1 h8 s1024 d64, one
// core: 78 ms vs 40 ms). Eight counters per AVX2 step plus a vector
// apply step bring it to ~1.35x (50 ms vs 36 ms). The 32x32->64 multiplies
// use vpmuludq on even and odd lanes and a blend, cheaper than vpmulld plus
// a separate high half. With AVX-512, sixteen counters per step (keep_avx512):
// the AVX2 step's instructions at twice the width, 0.56 against 0.98 ns per
// element on one core of a 2-core AMX Xeon (session 55); its dropout forwards
// (b1 h4 s2048, 2 threads) 1.04-1.20x and forward + backward 1.05-1.18x faster.
#include "backends/cpu/dropout_mask.h"

#include "backends/cpu/cpu_features.h"

#include <cstdlib>

#include "orchard/philox.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define ORCHARD_DROPOUT_AVX2 1
#endif

namespace orchard::cpu {
namespace {

void keep_scalar(std::uint64_t seed, std::uint64_t offset, std::uint32_t batch_head,
                 std::uint32_t row, std::int64_t j0, int n, std::uint32_t threshold,
                 std::uint8_t* keep) {
  for (int t = 0; t < n; t += 4) {
    const Philox4 r = dropout_draws(seed, offset, batch_head, row,
                                    static_cast<std::uint32_t>((j0 + t) >> 2));
    keep[t] = r.x >= threshold;
    if (t + 1 < n) keep[t + 1] = r.y >= threshold;
    if (t + 2 < n) keep[t + 2] = r.z >= threshold;
    if (t + 3 < n) keep[t + 3] = r.w >= threshold;
  }
}

#ifdef ORCHARD_DROPOUT_AVX2
__attribute__((target("avx2"))) inline void mulhilo8(__m256i a, __m256i m, __m256i& hi,
                                                     __m256i& lo) {
  const __m256i pe = _mm256_mul_epu32(a, m);                         // lanes 0,2,4,6
  const __m256i po = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1,3,5,7
  hi = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
  lo = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
}

// Unsigned a >= b per lane as 0 / -1.
__attribute__((target("avx2"))) inline __m256i ge_u32(__m256i a, __m256i b) {
  return _mm256_cmpeq_epi32(_mm256_max_epu32(a, b), a);
}

__attribute__((target("avx2"))) void keep_avx2(std::uint64_t seed, std::uint64_t offset,
                                               std::uint32_t batch_head, std::uint32_t row,
                                               std::int64_t j0, int n, std::uint32_t threshold,
                                               std::uint8_t* keep) {
  const std::uint32_t off = static_cast<std::uint32_t>(offset) ^
                            (static_cast<std::uint32_t>(offset >> 32) * 0x9E3779B9u);
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i thr = _mm256_set1_epi32(static_cast<int>(threshold));
  int t = 0;
  for (; t + 32 <= n; t += 32) {
    const auto col4 = static_cast<std::uint32_t>((j0 + t) >> 2);
    __m256i x = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(col4)), lane);
    __m256i y = _mm256_set1_epi32(static_cast<int>(row));
    __m256i z = _mm256_set1_epi32(static_cast<int>(batch_head));
    __m256i w = _mm256_set1_epi32(static_cast<int>(off));
    std::uint32_t k0 = static_cast<std::uint32_t>(seed), k1 = static_cast<std::uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo8(x, m0, hi0, lo0);
      mulhilo8(z, m1, hi1, lo1);
      x = _mm256_xor_si256(_mm256_xor_si256(hi1, y), _mm256_set1_epi32(static_cast<int>(k0)));
      y = lo1;
      z = _mm256_xor_si256(_mm256_xor_si256(hi0, w), _mm256_set1_epi32(static_cast<int>(k1)));
      w = lo0;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    // Lane i of output word l is column 4 * i + l: compare, narrow the four
    // 0/-1 masks to bytes (packs keeps them per 128-bit half) and transpose
    // each 4x4 byte block into column order.
    const __m256i xy = _mm256_packs_epi32(ge_u32(x, thr), ge_u32(y, thr));
    const __m256i zw = _mm256_packs_epi32(ge_u32(z, thr), ge_u32(w, thr));
    __m256i bytes = _mm256_packs_epi16(xy, zw);
    const __m256i order = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                           0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    bytes = _mm256_and_si256(_mm256_shuffle_epi8(bytes, order), _mm256_set1_epi8(1));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(keep + t), bytes);
  }
  if (t < n) keep_scalar(seed, offset, batch_head, row, j0 + t, n - t, threshold, keep + t);
}

// Sixteen counters (64 columns) per step: keep_avx2 at 512 bits. vpackssdw / vpacksswb and
// vpshufb work within 128-bit lanes, so lane block j of the result holds columns
// 16 j .. 16 j + 15 in order, as the AVX2 step's two halves do.
#define ORCHARD_DROPOUT_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512dq")))
ORCHARD_DROPOUT_AVX512_TARGET inline void mulhilo16(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i pe = _mm512_mul_epu32(a, m);                         // even lanes
  const __m512i po = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);  // odd lanes
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe, 32), po);
  lo = _mm512_mask_blend_epi32(0xAAAA, pe, _mm512_slli_epi64(po, 32));
}

// Unsigned a >= b per lane as 0 / -1.
ORCHARD_DROPOUT_AVX512_TARGET inline __m512i ge_u32_16(__m512i a, __m512i b) {
  return _mm512_movm_epi32(_mm512_cmpge_epu32_mask(a, b));
}

ORCHARD_DROPOUT_AVX512_TARGET void keep_avx512(std::uint64_t seed, std::uint64_t offset,
                                               std::uint32_t batch_head, std::uint32_t row,
                                               std::int64_t j0, int n, std::uint32_t threshold,
                                               std::uint8_t* keep) {
  const std::uint32_t off = static_cast<std::uint32_t>(offset) ^
                            (static_cast<std::uint32_t>(offset >> 32) * 0x9E3779B9u);
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i thr = _mm512_set1_epi32(static_cast<int>(threshold));
  const __m512i order = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
  int t = 0;
  for (; t + 64 <= n; t += 64) {
    const auto col4 = static_cast<std::uint32_t>((j0 + t) >> 2);
    __m512i x = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(col4)), lane);
    __m512i y = _mm512_set1_epi32(static_cast<int>(row));
    __m512i z = _mm512_set1_epi32(static_cast<int>(batch_head));
    __m512i w = _mm512_set1_epi32(static_cast<int>(off));
    std::uint32_t k0 = static_cast<std::uint32_t>(seed), k1 = static_cast<std::uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      __m512i hi0, lo0, hi1, lo1;
      mulhilo16(x, m0, hi0, lo0);
      mulhilo16(z, m1, hi1, lo1);
      x = _mm512_ternarylogic_epi32(hi1, y, _mm512_set1_epi32(static_cast<int>(k0)), 0x96);  // a ^ b ^ c
      y = lo1;
      z = _mm512_ternarylogic_epi32(hi0, w, _mm512_set1_epi32(static_cast<int>(k1)), 0x96);
      w = lo0;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const __m512i xy = _mm512_packs_epi32(ge_u32_16(x, thr), ge_u32_16(y, thr));
    const __m512i zw = _mm512_packs_epi32(ge_u32_16(z, thr), ge_u32_16(w, thr));
    const __m512i bytes = _mm512_and_si512(_mm512_shuffle_epi8(_mm512_packs_epi16(xy, zw), order),
                                           _mm512_set1_epi8(1));
    _mm512_storeu_si512(keep + t, bytes);
  }
  if (t < n) keep_avx2(seed, offset, batch_head, row, j0 + t, n - t, threshold, keep + t);
}

bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}

// ORCHARD_CPU_DROPOUT512=0 in the environment keeps the AVX2 step (A/B timing, tests).
bool dropout_avx512() {
  static const bool yes = [] {
    const char* e = std::getenv("ORCHARD_CPU_DROPOUT512");
    return cpu_has_avx512() && !(e && e[0] == '0');
  }();
  return yes;
}
#endif

}  // namespace

void dropout_keep_row(std::uint64_t seed, std::uint64_t offset, std::uint32_t batch_head,
                      std::uint32_t row, std::int64_t j0, int n, std::uint32_t threshold,
                      std::uint8_t* keep) {
  // Columns before the first multiple of 4 (only with a dropout column offset).
  for (; (j0 & 3) != 0 && n > 0; ++j0, --n, ++keep)
    *keep = dropout_keep(seed, offset, batch_head, row, static_cast<std::uint32_t>(j0), threshold);
  if (n <= 0) return;
#ifdef ORCHARD_DROPOUT_AVX2
  if (dropout_avx512()) return keep_avx512(seed, offset, batch_head, row, j0, n, threshold, keep);
  if (has_avx2()) return keep_avx2(seed, offset, batch_head, row, j0, n, threshold, keep);
#endif
  keep_scalar(seed, offset, batch_head, row, j0, n, threshold, keep);
}

}  // namespace orchard::cpu
