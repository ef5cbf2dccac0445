// The bf16 forward's K / V staging (tile_load.h's load_pairs_kt_bf16 and load_pairs_rows_bf16,
// same arguments, same layouts) with AVX-512 where the layout is in panels of a multiple of 32
// columns (32 on AMX, 64 on vdpbf16ps: gemm_bf16.h), d a multiple of 32 (d == dpad). K^T goes through in-register 16 x 16 transposes of
// 32-bit dim pairs, V's row pairs are interleaved by vpermt2w, and every element of the
// destination, padding rows included, is written once (no zero fill first). Elsewhere the
// tile_load.h versions run. perf put the staging at ~6-8 % of the bf16 forward at s1k, most of
// it load_pairs_kt_bf16's 4-byte scattered stores (session 19).
#pragma once

#include <cstdint>

#include "orchard/dtype.h"

namespace orchard::cpu {

void stage_kt_pairs_bf16(const void* base, std::int64_t elem_offset, std::int64_t row_stride, int rows,
                         int rows_pad, int d, int dpad, int block, std::uint16_t* dst, int panel);
void stage_v_pairs_bf16(const void* base, std::int64_t elem_offset, std::int64_t row_stride, int rows,
                        int rows_pad, int d, int dpad, std::uint16_t* dst, int block, int panel);

// The fp32 path on AMX (split_bf16x3.h): rows [0, rows) of K (transposed: K^T in stage_kt_pairs_bf16's
// layout) or V (stage_v_pairs_bf16's) of any dtype, zero rows to rows_pad (a multiple of block), each
// of the three bf16 planes of the split at dst + x * plane_stride. Goes through an fp32 tile and its
// planes, thread-local: 16 rows at a time where the AVX-512 stagers take the layout, else a block.
void stage_split3_panels(const void* base, DType dtype, std::int64_t elem_offset, std::int64_t row_stride,
                         int rows, int rows_pad, int d, int dpad, int block, bool transposed, std::uint16_t* dst,
                         int panel, std::int64_t plane_stride);

}  // namespace orchard::cpu
