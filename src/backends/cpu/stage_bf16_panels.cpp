#include "backends/cpu/stage_bf16_panels.h"

#include "backends/cpu/cache_aligned.h"
#include "backends/cpu/cpu_features.h"
#include "backends/cpu/split_bf16x3.h"
#include "backends/cpu/tile_load.h"
#include "backends/cpu/zmm_transpose.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define ORCHARD_STAGE_AVX512 1
#define ORCHARD_STAGE_TARGET __attribute__((target("avx512f,avx512bw,avx512vl")))
// GCC 12 flags the _mm512_undefined_* inside its own intrinsic headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace orchard::cpu {
namespace {

#ifdef ORCHARD_STAGE_AVX512
// Rows in groups of 16 (rows_pad % 16 == 0 as block % 16 == 0), dim pairs in groups of 16:
// a group's 16 x 16 words transposed land as 16 runs of 64 bytes, one per dim pair.
ORCHARD_STAGE_TARGET void stage_kt_avx512(const std::uint16_t* s, std::int64_t row_stride, int rows, int rows_pad,
                                          int d, int block, std::uint16_t* dst, int panel) {
  for (int r0 = 0; r0 < rows_pad; r0 += 16) {
    const int r = r0 % block;
    std::uint16_t* out =
        dst + std::int64_t(r0 / block) * block * d + std::int64_t(r / panel) * panel * d + 2 * (r % panel);
    for (int c0 = 0; c0 < d; c0 += 32) {
      __m512i v[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)
        v[i] = r0 + i < rows ? _mm512_loadu_si512(s + (r0 + i) * row_stride + c0) : _mm512_setzero_si512();
      transpose16x16(v);
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(out + std::int64_t(c0 / 2 + i) * 2 * panel, v[i]);
    }
  }
}

// One row pair per 2 * panel-word run of each panel (panel % 32 == 0): words (s0[c], s1[c])
// for c < panel, written 32 columns (64 words) at a time.
ORCHARD_STAGE_TARGET void stage_v_avx512(const std::uint16_t* s, std::int64_t row_stride, int rows, int rows_pad,
                                         int d, std::uint16_t* dst, int block, int panel) {
  __m512i lo_idx, hi_idx;  // word 2i <- s0[i], 2i + 1 <- s1[i] (index 32 + i): i < 16, then i + 16
  {
    alignas(64) std::uint16_t lo[32], hi[32];
    for (int i = 0; i < 16; ++i) {
      lo[2 * i] = std::uint16_t(i), lo[2 * i + 1] = std::uint16_t(32 + i);
      hi[2 * i] = std::uint16_t(16 + i), hi[2 * i + 1] = std::uint16_t(48 + i);
    }
    lo_idx = _mm512_load_si512(lo);
    hi_idx = _mm512_load_si512(hi);
  }
  for (int row = 0; row < rows_pad; row += 2) {
    std::uint16_t* out =
        dst + std::int64_t(row / block) * block * d + std::int64_t((row % block) / 2) * 2 * panel;
    for (int c0 = 0; c0 < d; c0 += 32) {
      const __m512i a = row < rows ? _mm512_loadu_si512(s + row * row_stride + c0) : _mm512_setzero_si512();
      const __m512i b =
          row + 1 < rows ? _mm512_loadu_si512(s + (row + 1) * row_stride + c0) : _mm512_setzero_si512();
      std::uint16_t* o = out + std::int64_t(c0 / panel) * block * panel + 2 * (c0 % panel);
      _mm512_storeu_si512(o, _mm512_permutex2var_epi16(a, lo_idx, b));
      _mm512_storeu_si512(o + 32, _mm512_permutex2var_epi16(a, hi_idx, b));
    }
  }
}
#endif

}  // namespace

void stage_kt_pairs_bf16(const void* base, std::int64_t elem_offset, std::int64_t row_stride, int rows,
                         int rows_pad, int d, int dpad, int block, std::uint16_t* dst, int panel) {
#ifdef ORCHARD_STAGE_AVX512
  if (cpu_has_avx512() && d % 32 == 0 && dpad == d && panel % 16 == 0 && block % panel == 0) {
    stage_kt_avx512(static_cast<const std::uint16_t*>(base) + elem_offset, row_stride, rows, rows_pad, d, block,
                    dst, panel);
    return;
  }
#endif
  load_pairs_kt_bf16(base, elem_offset, row_stride, rows, rows_pad, d, dpad, block, dst, panel);
}

void stage_v_pairs_bf16(const void* base, std::int64_t elem_offset, std::int64_t row_stride, int rows,
                        int rows_pad, int d, int dpad, std::uint16_t* dst, int block, int panel) {
#ifdef ORCHARD_STAGE_AVX512
  if (cpu_has_avx512() && panel % 32 == 0 && d % 32 == 0 && dpad == d && block % 2 == 0) {
    stage_v_avx512(static_cast<const std::uint16_t*>(base) + elem_offset, row_stride, rows, rows_pad, d, dst,
                   block, panel);
    return;
  }
#endif
  load_pairs_rows_bf16(base, elem_offset, row_stride, rows, rows_pad, d, dpad, dst, block, panel);
}

void stage_split3_panels(const void* base, DType dtype, std::int64_t elem_offset, std::int64_t row_stride,
                         int rows, int rows_pad, int d, int dpad, int block, bool transposed, std::uint16_t* dst,
                         int panel, std::int64_t plane_stride) {
  // Where both AVX-512 stagers take the layout, they write only their own rows' words (no zero fill
  // first), so the split runs 16 rows at a time: the fp32 rows and their planes (8 + 12 KB at d128)
  // stay in L1 from the split to the packing, where a whole block's (128 + 192 KB) went to L2 between
  // the passes. Elsewhere a block at a time (the tile_load.h stagers fill their whole block first).
  bool by16 = false;
#ifdef ORCHARD_STAGE_AVX512
  by16 = cpu_has_avx512() && dpad % 32 == 0 && panel % 32 == 0 && block % panel == 0;
#endif
  const int step = by16 ? 16 : block;
  thread_local CacheAlignedVector<float> f32;
  thread_local CacheAlignedVector<std::uint16_t> planes;
  const std::size_t tile = std::size_t(step) * dpad;
  if (f32.size() < tile) f32.resize(tile), planes.resize(3 * tile);
  for (int r0 = 0; r0 < rows_pad; r0 += step) {
    const int n = std::clamp(rows - r0, 0, step);
    load_rows(base, dtype, elem_offset + r0 * row_stride, row_stride, n, step, d, dpad, f32.data());
    split_rows_bf16x3(f32.data(), dpad, step, dpad, planes.data(), dpad, std::int64_t(tile));
    // Row r0's first word in the staged layout (stage_kt_pairs_bf16's / stage_v_pairs_bf16's): its
    // block, then its panel and lane (K^T) or its row pair (V) in that block.
    const int r = r0 % block;
    const std::int64_t at = std::int64_t(r0 - r) * dpad +
                            (transposed ? std::int64_t(r / panel) * panel * dpad + 2 * (r % panel)
                                        : std::int64_t(r / 2) * 2 * panel);
    for (int x = 0; x < 3; ++x) {
      const std::uint16_t* src = planes.data() + x * tile;
      std::uint16_t* out = dst + x * plane_stride + at;
      if (transposed)
        stage_kt_pairs_bf16(src, 0, dpad, step, step, dpad, dpad, block, out, panel);
      else
        stage_v_pairs_bf16(src, 0, dpad, step, step, dpad, dpad, out, block, panel);
    }
  }
}

}  // namespace orchard::cpu
