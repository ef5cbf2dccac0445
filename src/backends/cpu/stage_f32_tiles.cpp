#include "backends/cpu/stage_f32_tiles.h"

#include "backends/cpu/cpu_features.h"
#include "backends/cpu/zmm_transpose.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define ORCHARD_STAGE_F32_AVX512 1
#define ORCHARD_STAGE_F32_TARGET __attribute__((target("avx512f")))
// GCC 12 flags the _mm512_undefined_* inside its own intrinsic headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace orchard::cpu {
namespace {

#ifdef ORCHARD_STAGE_F32_AVX512
// Rows in groups of 16 (all in one tile: block % 16 == 0), dims in groups of 16 read with a mask
// past d (zeros: the padding to dpad); a group's transpose lands as 16 runs of 64 bytes, one per dim.
ORCHARD_STAGE_F32_TARGET void stage_kt_f32_avx512(const float* s, std::int64_t row_stride, int rows, int rows_pad,
                                                  int d, int dpad, int block, float* dst) {
  for (int r0 = 0; r0 < rows_pad; r0 += 16) {
    float* out = dst + std::int64_t(r0 / block) * dpad * block + r0 % block;
    for (int c0 = 0; c0 < dpad; c0 += 16) {
      const __mmask16 cols = c0 + 16 <= d ? __mmask16(0xFFFF) : c0 < d ? __mmask16((1u << (d - c0)) - 1) : 0;
      __m512i v[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)
        v[i] = r0 + i < rows ? _mm512_maskz_loadu_epi32(cols, s + (r0 + i) * row_stride + c0) : _mm512_setzero_si512();
      transpose16x16(v);
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(out + std::int64_t(c0 + i) * block, v[i]);
    }
  }
}
#endif

}  // namespace

bool stage_rows_transposed_f32(const void* base, DType dtype, std::int64_t elem_offset, std::int64_t row_stride,
                               int rows, int rows_pad, int d, int dpad, int block, float* dst) {
#ifdef ORCHARD_STAGE_F32_AVX512
  if (dtype == DType::kFloat32 && cpu_has_avx512() && rows_pad % 16 == 0 && block % 16 == 0 && dpad % 16 == 0 &&
      d <= dpad) {
    stage_kt_f32_avx512(static_cast<const float*>(base) + elem_offset, row_stride, rows, rows_pad, d, dpad, block,
                        dst);
    return true;
  }
#endif
  (void)base, (void)dtype, (void)elem_offset, (void)row_stride, (void)rows, (void)rows_pad, (void)d, (void)dpad,
      (void)block, (void)dst;
  return false;
}

}  // namespace orchard::cpu
