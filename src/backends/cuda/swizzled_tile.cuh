// One lane's ldmatrix addresses into a Q / dO tile of the backward, padded or
// swizzled (layout and rationale: swizzled_tile.h).
#pragma once

#include <cstdint>

#include "backends/cuda/swizzled_tile.h"

namespace orchard::cuda {

// `lane_off` is the byte offset of the lane's row and chunk at the fragment
// origin; at(row, j) is the fragment at row offset `row` (a multiple of 8) and
// 16-column step j. Swizzled, the four XOR variants of SwizzledTile::fragment
// are formed once per tile, so every fragment address is one of them plus an
// immediate.
template <int kRows, int kD, int kS, bool kSwizzle>
struct TileOperand {
  uint32_t v[kSwizzle ? 4 : 1];
  __device__ __forceinline__ TileOperand(uint32_t tile_base, uint32_t lane_off) {
    if constexpr (kSwizzle) {
#pragma unroll
      for (int j = 0; j < 4; ++j) v[j] = tile_base + (lane_off ^ static_cast<uint32_t>(j << 5));
    } else {
      v[0] = tile_base + lane_off;
    }
  }
  __device__ __forceinline__ uint32_t at(int row, int j) const {
    if constexpr (kSwizzle) {
      return v[j & 3] + (j >> 2) * SwizzledTile<kRows, kD>::kBlockBytes + row * 128;
    } else {
      return v[0] + 2 * (row * kS + j * 16);
    }
  }
};

}  // namespace orchard::cuda
