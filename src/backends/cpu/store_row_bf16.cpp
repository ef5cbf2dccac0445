#include "backends/cpu/store_row_bf16.h"

#include "backends/cpu/cpu_features.h"
#include "orchard/numeric.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define ORCHARD_STORE_ROW_AVX512 1
// GCC 12 flags the _mm512_undefined_* inside its own intrinsic headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace orchard::cpu {
namespace {

#ifdef ORCHARD_STORE_ROW_AVX512
// float_to_bf16's steps on 16 lanes: bits + 0x7fff + (bit 16), top half; NaN: top half | 0x40.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void store_row_bf16_avx512(const float* src, float mul,
                                                                                int d, std::uint16_t* dst) {
  const __m512 vm = _mm512_set1_ps(mul);
  const __m512i bias = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1);
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff), inf_bits = _mm512_set1_epi32(0x7f800000);
  const __m512i quiet = _mm512_set1_epi32(0x40);
  for (int i = 0; i < d; i += 16) {
    const __mmask16 k = d - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (d - i)) - 1);
    const __m512i v = _mm512_castps_si512(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, src + i), vm));
    const __m512i top = _mm512_srli_epi32(v, 16);
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(v, _mm512_add_epi32(bias, _mm512_and_si512(top, one))), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(v, abs_mask), inf_bits);
    r = _mm512_mask_or_epi32(r, nan, top, quiet);
    _mm256_mask_storeu_epi16(dst + i, k, _mm512_cvtepi32_epi16(r));
  }
}
#endif

}  // namespace

void store_row_bf16(const float* src, float mul, int d, std::uint16_t* dst) {
#ifdef ORCHARD_STORE_ROW_AVX512
  if (cpu_has_avx512()) {
    store_row_bf16_avx512(src, mul, d, dst);
    return;
  }
#endif
  for (int i = 0; i < d; ++i) dst[i] = float_to_bf16(src[i] * mul);
}

}  // namespace orchard::cpu
