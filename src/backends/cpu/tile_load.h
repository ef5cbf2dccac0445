// Dtype-converting row loads and stores between strided framework tensors
// (logical BSHD, dim stride 1) and the kernels' contiguous fp32/fp64 tiles.
// Inputs are converted once per (batch, kv head) chunk, never per row block.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "backends/cpu/fp16_rows.h"
#include "backends/cpu/store_row_bf16.h"
#include "orchard/dtype.h"
#include "orchard/numeric.h"

namespace orchard::cpu {

// Starts loading `bytes` bytes at p into L2 (prefetcht1). One head's rows of a
// BSHD tensor (or a KV cache) are h * d elements apart, often 2-4 KB, and
// the hardware prefetchers stop at each row: on one Zen 4 core a plain read of
// 512-byte rows 1-4 KB apart ran at 3.6-6.3 GB/s vs 20 GB/s contiguous.
inline void prefetch_bytes(const void* p, std::int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (std::int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 2);
  __builtin_prefetch(c + bytes - 1, 0, 2);  // a row not 64-byte aligned spans one more line
}

// The row loops below prefetch the row this many rows ahead.
inline constexpr int kRowPrefetchAhead = 4;

// Prefetches row r + kRowPrefetchAhead of a strided head (elements of esize
// bytes, d per row) when it is one of the `rows` rows.
inline void prefetch_ahead(const void* base, std::int64_t elem_offset, std::int64_t row_stride, int r,
                           int rows, int d, std::size_t esize) {
  if (r + kRowPrefetchAhead < rows)
    prefetch_bytes(static_cast<const char*>(base) +
                       (elem_offset + (r + kRowPrefetchAhead) * row_stride) * std::int64_t(esize),
                   std::int64_t(d) * esize);
}

// dst[0..d) = src row converted to T; dst[d..dpad) = 0 (padding the GEMMs rely on).
template <class T>
inline void load_row(const void* base, DType dtype, std::int64_t elem_offset, int d, int dpad,
                     T* dst) {
  switch (dtype) {
    case DType::kFloat16: {
      const auto* s = static_cast<const std::uint16_t*>(base) + elem_offset;
      if constexpr (std::is_same_v<T, float>)
        fp16_row_to_float(s, d, dst);  // F16C where the CPU has it
      else
        for (int i = 0; i < d; ++i) dst[i] = static_cast<T>(fp16_to_float(s[i]));
      break;
    }
    case DType::kBFloat16: {
      const auto* s = static_cast<const std::uint16_t*>(base) + elem_offset;
      for (int i = 0; i < d; ++i) dst[i] = static_cast<T>(bf16_to_float(s[i]));
      break;
    }
    case DType::kFloat32: {
      const auto* s = static_cast<const float*>(base) + elem_offset;
      for (int i = 0; i < d; ++i) dst[i] = static_cast<T>(s[i]);
      break;
    }
    case DType::kFloat64: {
      const auto* s = static_cast<const double*>(base) + elem_offset;
      for (int i = 0; i < d; ++i) dst[i] = static_cast<T>(s[i]);
      break;
    }
    default: break;
  }
  std::fill(dst + d, dst + dpad, T(0));
}

// Writes src[0..d) scaled by `mul` into a strided row of dtype `dtype` (bf16 from fp32:
// store_row_bf16, used by the forward's output and the backward's dQ / dK / dV rows).
template <class T>
inline void store_row(const T* src, T mul, int d, DType dtype, void* base,
                      std::int64_t elem_offset) {
  switch (dtype) {
    case DType::kFloat16: {
      auto* o = static_cast<std::uint16_t*>(base) + elem_offset;
      if constexpr (std::is_same_v<T, float>)
        float_row_to_fp16(src, mul, d, o);  // F16C where the CPU has it, the same rounding
      else
        for (int i = 0; i < d; ++i) o[i] = float_to_fp16(static_cast<float>(src[i] * mul));
      break;
    }
    case DType::kBFloat16: {
      auto* o = static_cast<std::uint16_t*>(base) + elem_offset;
      if constexpr (std::is_same_v<T, float>) {
        store_row_bf16(src, mul, d, o);  // the same rounding, 16 lanes at a time where the CPU can
      } else {
        for (int i = 0; i < d; ++i) o[i] = float_to_bf16(static_cast<float>(src[i] * mul));
      }
      break;
    }
    case DType::kFloat32: {
      auto* o = static_cast<float*>(base) + elem_offset;
      for (int i = 0; i < d; ++i) o[i] = static_cast<float>(src[i] * mul);
      break;
    }
    case DType::kFloat64: {
      auto* o = static_cast<double*>(base) + elem_offset;
      for (int i = 0; i < d; ++i) o[i] = static_cast<double>(src[i] * mul);
      break;
    }
    default: break;
  }
}

// Loads rows [0, rows) of one head into `dst` (rows x dpad, row-major), zero
// rows [rows, rows_pad). Row r is at elem_offset + r * row_stride.
template <class T>
inline void load_rows(const void* base, DType dtype, std::int64_t elem_offset,
                      std::int64_t row_stride, int rows, int rows_pad, int d, int dpad, T* dst) {
  for (int r = 0; r < rows; ++r) {
    prefetch_ahead(base, elem_offset, row_stride, r, rows, d, dtype_size(dtype));
    load_row(base, dtype, elem_offset + r * row_stride, d, dpad, dst + std::int64_t(r) * dpad);
  }
  std::fill(dst + std::int64_t(rows) * dpad, dst + std::int64_t(rows_pad) * dpad, T(0));
}

// Same, transposed and tiled for S = Q K^T: dst holds rows_pad / block
// tiles, each dpad x block (tile t, dim c, row r: dst[(t * dpad + c) * block + r]).
// Tiling keeps the GEMM's B panel at a `block`-element stride: a full
// transposed matrix has a stride of sk elements, and at power-of-two sk
// (4 KB for sk = 1024) every panel row maps to the same L1 set.
// rows_pad % block == 0.
template <class T>
inline void load_rows_transposed(const void* base, DType dtype, std::int64_t elem_offset,
                                 std::int64_t row_stride, int rows, int rows_pad, int d, int dpad,
                                 int block, T* dst) {
  constexpr int kStage = 16;  // rows staged row-major, then scattered as columns
  std::vector<T> buf(std::size_t(kStage) * dpad);
  for (int r0 = 0; r0 < rows_pad; r0 += kStage) {
    const int nr = std::min(kStage, rows_pad - r0);
    for (int r = 0; r < nr; ++r) {
      prefetch_ahead(base, elem_offset, row_stride, r0 + r, rows, d, dtype_size(dtype));
      if (r0 + r < rows)
        load_row(base, dtype, elem_offset + (r0 + r) * row_stride, d, dpad, buf.data() + r * dpad);
      else
        std::fill(buf.data() + r * dpad, buf.data() + (r + 1) * dpad, T(0));
    }
    for (int r = 0; r < nr; ++r) {
      const int row = r0 + r;
      T* tile = dst + std::int64_t(row / block) * dpad * block + row % block;
      for (int c = 0; c < dpad; ++c) tile[std::int64_t(c) * block] = buf[r * dpad + c];
    }
  }
}

}  // namespace orchard::cpu

namespace orchard::cpu {

// bf16 staging for the vdpbf16ps path (gemm_bf16.h): bf16 inputs are copied
// as raw 16-bit values, no conversion. All three zero their padding.

// Rows [0, rows) of one head, row-major rows x dpad (dpad even).
inline void load_rows_bf16(const void* base, std::int64_t elem_offset, std::int64_t row_stride,
                           int rows, int d, int dpad, std::uint16_t* dst) {
  const auto* s = static_cast<const std::uint16_t*>(base) + elem_offset;
  for (int r = 0; r < rows; ++r) {
    prefetch_ahead(base, elem_offset, row_stride, r, rows, d, 2);
    std::copy_n(s + r * row_stride, d, dst + std::int64_t(r) * dpad);
    std::fill(dst + std::int64_t(r) * dpad + d, dst + std::int64_t(r + 1) * dpad, std::uint16_t(0));
  }
}

// K for S = Q K^T: tiles of `block` rows, each the B operand of one S tile in
// gemm_bf16_panels' layout with panels of `panel` key rows (panel divides
// block; panel == block, the default: the plain layout, ldb = 2 * block). In
// tile t, panel q, dim pair c / 2, row r: dst[t * block * dpad + q * panel * dpad
// + (c / 2) * 2 * panel + 2 * (r % panel) + c % 2]. rows_pad % block == 0.
inline void load_pairs_kt_bf16(const void* base, std::int64_t elem_offset, std::int64_t row_stride,
                               int rows, int rows_pad, int d, int dpad, int block,
                               std::uint16_t* dst, int panel = 0) {
  if (panel == 0) panel = block;
  const auto* s = static_cast<const std::uint16_t*>(base) + elem_offset;
  std::fill(dst, dst + std::int64_t(rows_pad) * dpad, std::uint16_t(0));
  for (int row = 0; row < rows; ++row) {
    prefetch_ahead(base, elem_offset, row_stride, row, rows, d, 2);
    const std::uint16_t* src = s + row * row_stride;
    const int r = row % block;
    std::uint16_t* out = dst + std::int64_t(row / block) * block * dpad +
                         std::int64_t(r / panel) * panel * dpad + 2 * (r % panel);
    // A dim pair is one 32-bit word in both layouts: copy words (half the stores).
    int c = 0;
    for (; c + 1 < d; c += 2) std::memcpy(out + std::int64_t(c / 2) * 2 * panel, src + c, 4);
    if (c < d) out[std::int64_t(c / 2) * 2 * panel] = src[c];
  }
}

// V for O += P V: pairs of rows; row r, column c at dst[((r / 2) * dpad + c) * 2 + r % 2]
// (ldb = 2 * dpad), rows_pad even. With `block` and `panel` (panel divides dpad,
// block even, rows_pad % block == 0): tiles of `block` rows, each the B operand of one
// O += P V in gemm_bf16_panels' layout with panels of `panel` columns: tile t
// (rows t * block ..), panel q, row r, column c at dst[t * block * dpad + q * block *
// panel + ((r % block) / 2) * 2 * panel + 2 * (c % panel) + r % 2]; panel == dpad
// (the default) is the plain layout above.
inline void load_pairs_rows_bf16(const void* base, std::int64_t elem_offset,
                                 std::int64_t row_stride, int rows, int rows_pad, int d, int dpad,
                                 std::uint16_t* dst, int block = 0, int panel = 0) {
  if (panel == 0) panel = dpad;
  if (block == 0) block = rows_pad;
  const auto* s = static_cast<const std::uint16_t*>(base) + elem_offset;
  std::fill(dst, dst + std::int64_t(rows_pad) * dpad, std::uint16_t(0));
  for (int row = 0; row < rows; row += 2) {  // a pair of rows: one interleaved run per panel
    prefetch_ahead(base, elem_offset, row_stride, row, rows, d, 2);
    if (row + 1 < rows) prefetch_ahead(base, elem_offset, row_stride, row + 1, rows, d, 2);
    const std::uint16_t* s0 = s + row * row_stride;
    const std::uint16_t* s1 = row + 1 < rows ? s0 + row_stride : nullptr;
    std::uint16_t* out = dst + std::int64_t(row / block) * block * dpad + std::int64_t((row % block) / 2) * 2 * panel;
    for (int c0 = 0; c0 < d; c0 += panel) {
      std::uint16_t* o = out + std::int64_t(c0 / panel) * block * panel;
      const int n = std::min(panel, d - c0);
      if (s1) {
        for (int c = 0; c < n; ++c) {
          o[2 * c] = s0[c0 + c];
          o[2 * c + 1] = s1[c0 + c];
        }
      } else {
        for (int c = 0; c < n; ++c) o[2 * c] = s0[c0 + c];
      }
    }
  }
}

}  // namespace orchard::cpu
