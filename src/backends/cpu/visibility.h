// Which key columns each query row may see under causal / sliding-window
// masking, at the granularity the tiled kernels need: per tile row (first and
// end column inside a tile) and per block (the column tiles a row block visits,
// the rows a column block is seen by). All indices are local to one sequence
// (SeqSpan); the attn_bias mask is not part of this (see score_mods.h).
#pragma once

#include <algorithm>
#include <cstdint>

#include "orchard/params.h"

namespace orchard::cpu {

// The params the kernels work from: `causal` folded into the window's right
// bound (the core keeps them equal, but older callers set only `causal`), and
// d_v defaulted to d when the caller left it 0.
template <class Params>
Params normalized(Params p) {
  if (p.causal) p.window_right = 0;
  if (p.d_v <= 0) p.d_v = p.d;
  return p;
}

// Per tile row r (query row i0 + r), columns [j0 + first[r], j0 + end[r]) are
// visible, both clamped to [0, bc]. Returns whether any row masks leading
// columns (first > 0), which needs the masked score path for this tile.
inline bool tile_col_bounds(const FwdParams& p, const SeqSpan& s, std::int64_t i0, int rows,
                            std::int64_t j0, int bc, int* first, int* end) {
  bool left_masked = false;
  for (int r = 0; r < rows; ++r) {
    const ColRange c = visible_cols(p, s, i0 + r);
    first[r] = static_cast<int>(std::clamp<std::int64_t>(c.begin - j0, 0, bc));
    end[r] = static_cast<int>(std::clamp<std::int64_t>(c.end - j0, 0, bc));
    if (first[r] >= end[r]) first[r] = end[r] = 0;  // nothing visible in this tile
    left_masked |= first[r] > 0;
  }
  return left_masked;
}

// Column range any of rows [i0, i0 + rows) sees, begin rounded down to a
// multiple of bc (the staged K/V tiles). Both bounds grow with the row, so
// the first and last rows decide it.
inline ColRange block_visible_cols(const FwdParams& p, const SeqSpan& s, std::int64_t i0, int rows,
                                   int bc) {
  const ColRange lo = visible_cols(p, s, i0), hi = visible_cols(p, s, i0 + rows - 1);
  const std::int64_t begin = std::min(lo.begin, hi.end);
  return {begin / bc * bc, hi.end};
}

// Rows [begin, end) of the sequence that see any of columns [j0, j0 + bc).
struct RowRange {
  std::int64_t begin, end;
};
inline RowRange block_visible_rows(const FwdParams& p, const SeqSpan& s, std::int64_t j0, int bc) {
  std::int64_t begin = 0, end = s.len_q;
  // Row i's last column is i + diag + window_right: it reaches j0 from i = j0 - diag - right.
  if (p.window_right >= 0) begin = std::clamp<std::int64_t>(j0 - s.diag - p.window_right, 0, s.len_q);
  // Row i's first column is i + diag - window_left: below j0 + bc up to i = j0 + bc + left - diag.
  if (p.window_left >= 0)
    end = std::clamp<std::int64_t>(j0 + bc + p.window_left - s.diag, 0, s.len_q);
  return {begin, std::max(begin, end)};
}

}  // namespace orchard::cpu
