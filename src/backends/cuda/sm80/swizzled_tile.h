// XOR-swizzled shared-memory layout for the tiles the kernels stream in with
// cp.async every step (the forward's K and V tiles, the backward's Q and dO
// tiles). Plain constexpr so the host tests check it
// (tests/cpp/swizzled_tile_test.cpp).
//
// Why not the padded layout (row stride kD + 8) the other tiles use: it makes
// ldmatrix conflict-free, but rows are then not 128-byte aligned and every
// 16-byte cp.async of such a tile cost 10.5 shared-memory wavefronts per warp
// instead of 4 (ncu source page, H100, backward at d64 and d128: 110M excess
// wavefronts, ~7% of all, and 5% of the warp-stall samples on the LDGSTS
// waiting for the MIO queue); FA2's swizzled tiles take exactly 4. Measured
// with this layout (H100, same call, b*s = 16k, s >= 2k): backward d64 +2-4%,
// d128 causal +3-5%, d128 non-causal +0-1%; forward +1-6% (dev/cuda/NOTES.md,
// call 11).
//
// Layout (kD % 64 == 0): column blocks of 64 elements, each [kRows][128 bytes];
// the 16-byte chunk c (8 elements) of row r sits in block c / 8 at chunk
// (c ^ r) % 8 of its 128-byte row. The 8 rows one ldmatrix phase reads
// (r % 8 = 0..7, same logical chunk) hit 8 distinct chunks: conflict-free.
#pragma once

#include <cstdint>

namespace orchard::cuda {

template <int kRows, int kD>
struct SwizzledTile {
  static_assert(kD % 64 == 0 && kRows % 8 == 0, "swizzled tiles take 64-column blocks of 8-row groups");
  static constexpr int kBlockBytes = kRows * 128;  // one 64-column block
  static constexpr int kBytes = kRows * kD * 2;
  // Byte offset of the 16-byte chunk c of row r.
  static constexpr uint32_t offset(int r, int c) {
    return static_cast<uint32_t>((c >> 3) * kBlockBytes + r * 128 + (((c ^ r) & 7) << 4));
  }
  // A lane's byte offset for the two ldmatrix fragment patterns the kernels
  // read (TileOperand): [n][k] storage as a B operand (e.g. K in Q K^T), lane
  // row (lane % 8) + (lane / 16) * 8 and chunk (lane / 8) % 2, at tile row row0;
  // [k][n] storage as a transposed B operand (e.g. V in P V), lane row
  // (lane % 8) + ((lane / 8) % 2) * 8 and chunk lane / 16, at tile column col0.
  // row0 and col0 are multiples of 8.
  static constexpr uint32_t nk_lane_offset(int lane, int row0) {
    return static_cast<uint32_t>(row0 * 128) + offset((lane % 8) + (lane / 16) * 8, (lane / 8) % 2);
  }
  static constexpr uint32_t kn_lane_offset(int lane, int col0) {
    return offset((lane % 8) + ((lane / 8) % 2) * 8, col0 / 8 + lane / 16);
  }
  // The same chunk reached from a lane's offset at the fragment origin
  // (lane_off = offset(r, c)) for a fragment row offset `row` (a multiple of 8)
  // and a 16-column step j: the chunk bits depend only on j % 4 as long as
  // c % 8 + 2 * (j % 4) does not carry (c % 8 in {0, 1, 4, 5} with j % 4 < 2,
  // or c % 8 in {0, 1} with any j): offset(r + row, c + 2 j).
  // The two parts: an XOR that depends on j % 4 only, and a constant step.
  static constexpr uint32_t fragment(uint32_t lane_off, int row, int j) {
    return (lane_off ^ fragment_xor(j)) + fragment_step(row, j);
  }
  static constexpr uint32_t fragment_xor(int j) { return static_cast<uint32_t>((j & 3) << 5); }
  static constexpr uint32_t fragment_step(int row, int j) {
    return static_cast<uint32_t>((j >> 2) * kBlockBytes + row * 128);
  }
};

// Whether a transposed-B ([k][n]) read of a swizzled tile by warps that start at columns
// w * cols_per_warp (w < warps) and step over cols_per_warp / 16 fragments keeps
// fragment()'s no-carry rule: each warp's first chunk is 0 mod 8, or 4 mod 8 with at
// most two steps. The d192 backward's dK / dV columns (48 per warp) break it: with
// ORCHARD_SM80_SWIZZLE_WIDE its outputs differed from the padded kernel's (bench/sm80_kernel_ab.sh,
// session 54), so it keeps padded Q / dO tiles.
constexpr bool swizzled_kn_columns_ok(int cols_per_warp, int warps) {
  for (int w = 0; w < warps; ++w) {
    const int chunk = w * cols_per_warp / 8 % 8;
    const int steps = (cols_per_warp / 8 + 1) / 2;
    if (!(chunk == 0 || (chunk == 4 && steps <= 2))) return false;
  }
  return true;
}

}  // namespace orchard::cuda
