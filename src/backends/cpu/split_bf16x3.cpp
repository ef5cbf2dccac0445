// fp32 -> three bf16 planes (split_bf16x3.h).
#include "backends/cpu/split_bf16x3.h"

#include <cstdlib>

#include "backends/cpu/gemm_bf16.h"
#include "orchard/numeric.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define ORCHARD_SPLIT_AVX512 1
#define ORCHARD_SPLIT_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
// GCC 12 flags the _mm512_undefined_* inside its own intrinsic headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace orchard::cpu {
namespace {

// hi of x: bf16(x) rounded to nearest, truncated where that would overflow to inf (|x| within half
// a bf16 ulp of FLT_MAX), so that mid and lo stay finite. Non-finite x: hi is x (NaN quieted), mid
// and lo are 0, so that inf and NaN reach the products as themselves.
constexpr std::uint32_t kRoundsToInf = 0x7f7f8000u, kInf = 0x7f800000u;

// Rounds as vcvtneps2bf16 does (float_to_bf16: nearest even, NaN quieted).
void split_scalar(const float* src, std::int64_t lds, int rows, int n, std::uint16_t* dst,
                  std::int64_t ldd, std::int64_t plane_stride) {
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < n; ++j) {
      const float x = src[r * lds + j];
      const std::uint32_t u = float_to_bits(x);
      const std::uint32_t mag = u & 0x7fffffffu;
      const bool overflows = mag >= kRoundsToInf && mag < kInf;
      const std::uint16_t hi = overflows ? static_cast<std::uint16_t>(u >> 16) : float_to_bf16(x);
      std::uint16_t mid = 0, lo = 0;
      if (mag < kInf) {
        const float rest = x - bf16_to_float(hi);
        mid = float_to_bf16(rest);
        lo = float_to_bf16(rest - bf16_to_float(mid));
      }
      std::uint16_t* o = dst + r * ldd + j;
      o[0] = hi, o[plane_stride] = mid, o[2 * plane_stride] = lo;
    }
}

#ifdef ORCHARD_SPLIT_AVX512
ORCHARD_SPLIT_TARGET inline __m512 widen(__m256bh h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16));
}

// The three planes of 16 values to o, o + plane, o + 2 * plane. kBounded: the values are within half
// of FLT_MAX or NaN (softmax probabilities), so hi needs no overflow fix-up and no lane is inf.
template <bool kBounded>
ORCHARD_SPLIT_TARGET inline __attribute__((always_inline)) void split16(__m512 x, std::uint16_t* o,
                                                                       std::int64_t plane) {
  __m256i hi = (__m256i)_mm512_cvtneps_pbh(x);
  __mmask16 finite = 0xFFFF;
  if constexpr (!kBounded) {
    const __m512i mag = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7fffffff));
    finite = _mm512_cmplt_epu32_mask(mag, _mm512_set1_epi32(int(kInf)));
    const __mmask16 overflows = finite & _mm512_cmpge_epu32_mask(mag, _mm512_set1_epi32(int(kRoundsToInf)));
    const __m256i truncated = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(x), 16));
    hi = _mm256_mask_blend_epi16(overflows, hi, truncated);
  }
  const __m512 rest = _mm512_sub_ps(x, widen((__m256bh)hi));
  __m256i mid = (__m256i)_mm512_cvtneps_pbh(rest);
  __m256i lo = (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(rest, widen((__m256bh)mid)));
  if constexpr (!kBounded) mid = _mm256_maskz_mov_epi16(finite, mid), lo = _mm256_maskz_mov_epi16(finite, lo);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), hi);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + plane), mid);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 2 * plane), lo);
}

template <bool kBounded>
ORCHARD_SPLIT_TARGET void split_avx512(const float* src, std::int64_t lds, int rows, int n,
                                       std::uint16_t* dst, std::int64_t ldd, std::int64_t plane_stride) {
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < n; j += 16)
      split16<kBounded>(_mm512_loadu_ps(src + r * lds + j), dst + r * ldd + j, plane_stride);
}
#endif

template <bool kBounded>
void split_rows(const float* src, std::int64_t lds, int rows, int n, std::uint16_t* dst, std::int64_t ldd,
                std::int64_t plane_stride) {
#ifdef ORCHARD_SPLIT_AVX512
  if (bf16_dot_available()) {
    split_avx512<kBounded>(src, lds, rows, n, dst, ldd, plane_stride);
    return;
  }
#endif
  split_scalar(src, lds, rows, n, dst, ldd, plane_stride);
}

}  // namespace

bool fp32_on_amx() {
  static const bool env_on = [] {
    const char* env = std::getenv("ORCHARD_CPU_FP32_AMX");
    return !(env && env[0] == '0');
  }();
  return env_on && g_fp32_amx && amx_available();
}

void split_rows_bf16x3(const float* src, std::int64_t lds, int rows, int n, std::uint16_t* dst,
                       std::int64_t ldd, std::int64_t plane_stride) {
  split_rows<false>(src, lds, rows, n, dst, ldd, plane_stride);
}

void split_probabilities_bf16x3(const float* src, std::int64_t lds, int rows, int n, std::uint16_t* dst,
                                std::int64_t ldd, std::int64_t plane_stride) {
  split_rows<true>(src, lds, rows, n, dst, ldd, plane_stride);
}

}  // namespace orchard::cpu
