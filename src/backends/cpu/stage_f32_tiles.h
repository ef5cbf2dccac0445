// The fp32 kernels' transposed K (and, in the backward, V) staging: tile_load.h's
// load_rows_transposed, same arguments and layout (rows_pad / block tiles of dpad x block),
// through in-register 16 x 16 transposes where the source is float32 and the CPU has AVX-512.
// load_rows_transposed stages 16 rows row-major and scatters them one 4-byte element at a time,
// a column `block` elements apart; perf put that scalar scatter at ~40 % of the staging phase and
// the staging at ~18 % of a b1 h8 s64 d64 fp32 forward on 2 threads (session 57).
// Elsewhere (float16 / bfloat16 sources, no AVX-512, rows_pad or block not a multiple of 16)
// load_rows_transposed runs. Every element of dst, padding included, is written.
#pragma once

#include <cstdint>
#include <type_traits>

#include "backends/cpu/tile_load.h"
#include "orchard/dtype.h"

namespace orchard::cpu {

// True when stage_rows_transposed_f32 took the call (the AVX-512 path); false: nothing written.
bool stage_rows_transposed_f32(const void* base, DType dtype, std::int64_t elem_offset, std::int64_t row_stride,
                               int rows, int rows_pad, int d, int dpad, int block, float* dst);

template <class T>
inline void stage_rows_transposed(const void* base, DType dtype, std::int64_t elem_offset, std::int64_t row_stride,
                                  int rows, int rows_pad, int d, int dpad, int block, T* dst) {
  if constexpr (std::is_same_v<T, float>) {
    if (stage_rows_transposed_f32(base, dtype, elem_offset, row_stride, rows, rows_pad, d, dpad, block, dst))
      return;
  }
  load_rows_transposed(base, dtype, elem_offset, row_stride, rows, rows_pad, d, dpad, block, dst);
}

}  // namespace orchard::cpu
