// Dropout keep-mask generation for a run of columns of one attention row, or
// of the two rows r, r + 8 that share their Philox calls (Philox4x32-10 per
// orchard/philox.h): eight (AVX2) or sixteen (AVX-512) Philox calls side by
// side when the CPU has them, scalar philox.h otherwise.
#pragma once

#include <cstdint>

namespace orchard::cpu {

// keep[t] = 1 if element (batch_head, row, j0 + t) survives dropout, t < n.
// Any j0 >= 0 (a dropout column offset can make it unaligned) and any
// threshold (dropout_keep_threshold: 0 keeps all, 256 drops all). Each Philox
// call holds 8 columns of this row (and 8 of row ^ 8, unused here: see
// dropout_keep_row_pair): 4 calls per 32-column block.
void dropout_keep_row(std::uint64_t seed, std::uint64_t offset, std::uint32_t batch_head,
                      std::uint32_t row, std::int64_t j0, int n, std::uint32_t threshold,
                      std::uint8_t* keep);

// Rows row_lo and row_lo + 8 at once: keep_lo[t], keep_hi[t] as dropout_keep_row
// gives them. When row_lo % 16 < 8 the two rows' draws are the two halves of the
// same calls (x, y and z, w), so this costs about what one row does; otherwise the
// rows are drawn one at a time.
void dropout_keep_row_pair(std::uint64_t seed, std::uint64_t offset, std::uint32_t batch_head,
                           std::uint32_t row_lo, std::int64_t j0, int n, std::uint32_t threshold,
                           std::uint8_t* keep_lo, std::uint8_t* keep_hi);

// Rows [0, rows) of a block whose row 0 is dropout row row0 (its offsets added), columns
// [j0, j0 + n): keep[r * ld + t] as dropout_keep_row gives them (ld >= n; nothing else written).
// Rows are paired as for_dropout_rows pairs them; with AVX-512 and at most 64 columns from j0's
// 32-column block (the backward's tiles), two row pairs share each sixteen-call step.
void dropout_keep_block(std::uint64_t seed, std::uint64_t offset, std::uint32_t batch_head, std::uint32_t row0,
                        int rows, std::int64_t j0, int n, std::uint32_t threshold, std::uint8_t* keep,
                        std::int64_t ld);

// Visits rows [0, rows) of a block whose row 0 is dropout row row0 (its offsets added)
// as fn(r, paired), every row once, in ascending order of r: paired means rows r and
// r + 8 together (dropout_keep_row_pair), for (row0 + r) % 16 < 8 when r + 8 < rows.
template <class Fn>
inline void for_dropout_rows(std::uint32_t row0, int rows, Fn&& fn) {
  for (int r = 0; r < rows; ++r) {
    const bool upper = ((row0 + static_cast<std::uint32_t>(r)) >> 3) & 1u;
    if (upper && r >= 8) continue;  // the pair of row r - 8 drew it
    fn(r, !upper && r + 8 < rows);
  }
}

// The implementations dropout_keep_row picks from (it takes the widest this CPU
// has; ORCHARD_CPU_DROPOUT512=0 leaves out AVX-512), and dropout_keep_row_pair and
// dropout_keep_block likewise: tests run each one.
enum class DropoutMaskIsa { kScalar, kAvx2, kAvx512 };
bool dropout_mask_isa_supported(DropoutMaskIsa isa);
void dropout_keep_row_isa(DropoutMaskIsa isa, std::uint64_t seed, std::uint64_t offset,
                          std::uint32_t batch_head, std::uint32_t row, std::int64_t j0, int n,
                          std::uint32_t threshold, std::uint8_t* keep);
void dropout_keep_row_pair_isa(DropoutMaskIsa isa, std::uint64_t seed, std::uint64_t offset,
                               std::uint32_t batch_head, std::uint32_t row_lo, std::int64_t j0, int n,
                               std::uint32_t threshold, std::uint8_t* keep_lo, std::uint8_t* keep_hi);
void dropout_keep_block_isa(DropoutMaskIsa isa, std::uint64_t seed, std::uint64_t offset, std::uint32_t batch_head,
                            std::uint32_t row0, int rows, std::int64_t j0, int n, std::uint32_t threshold,
                            std::uint8_t* keep, std::int64_t ld);

}  // namespace orchard::cpu
