#include "backends/cpu/fp16_rows.h"

#include "orchard/numeric.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define ORCHARD_FP16_ROWS_F16C 1
#endif

namespace orchard::cpu {
namespace {

#ifdef ORCHARD_FP16_ROWS_F16C
bool cpu_has_f16c() {
  static const bool yes = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return yes;
}

__attribute__((target("avx,f16c"))) void fp16_row_to_float_f16c(const std::uint16_t* src, int n, float* dst) {
  int i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = fp16_to_float(src[i]);
}

__attribute__((target("avx,f16c"))) void float_row_to_fp16_f16c(const float* src, float mul, int n,
                                                                 std::uint16_t* dst) {
  const __m256 m = _mm256_set1_ps(mul);
  int i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_mul_ps(_mm256_loadu_ps(src + i), m), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) dst[i] = float_to_fp16(src[i] * mul);
}
#endif

}  // namespace

bool fp16_rows_use_f16c() {
#ifdef ORCHARD_FP16_ROWS_F16C
  return cpu_has_f16c();
#else
  return false;
#endif
}

void fp16_row_to_float(const std::uint16_t* src, int n, float* dst) {
#ifdef ORCHARD_FP16_ROWS_F16C
  if (cpu_has_f16c()) return fp16_row_to_float_f16c(src, n, dst);
#endif
  for (int i = 0; i < n; ++i) dst[i] = fp16_to_float(src[i]);
}

void float_row_to_fp16(const float* src, float mul, int n, std::uint16_t* dst) {
#ifdef ORCHARD_FP16_ROWS_F16C
  if (cpu_has_f16c()) return float_row_to_fp16_f16c(src, mul, n, dst);
#endif
  for (int i = 0; i < n; ++i) dst[i] = float_to_fp16(src[i] * mul);
}

}  // namespace orchard::cpu
