// One lane's ldmatrix addresses into a streamed tile (forward K / V, backward
// Q / dO), padded or swizzled (layout and rationale: swizzled_tile.h).
#pragma once

#include <cstdint>

#include "backends/cuda/sm80/mma_utils.cuh"
#include "backends/cuda/sm80/swizzled_tile.h"

namespace orchard::cuda {

// Head dims whose streamed tiles are swizzled: d64 and d128, and since session 55 d192 / d256
// (their tiles take the per-chunk copy where a thread's chunks do not keep one swizzle,
// TileStream; the d192 backward's dK / dV split is excluded, swizzled_kn_columns_ok). H100,
// bench/sm80_kernel_ab.sh, same bytes: forward +5-8 % at d192 / d256, d256 backward +2-7 %.
// ORCHARD_SM80_SWIZZLE_WIDE=0 pads them again (an A/B knob).
#ifndef ORCHARD_SM80_SWIZZLE_WIDE
#define ORCHARD_SM80_SWIZZLE_WIDE 1
#endif
constexpr bool swizzle_streamed_tiles(int d) {
  return d == 64 || d == 128 || (ORCHARD_SM80_SWIZZLE_WIDE && d > 128 && d % 64 == 0);
}

// from_lane: `lane_addr` is the shared-state-space byte address of the lane's
// row and chunk at the fragment origin of stage 0 (loop-invariant), `stage_off`
// the byte offset of the current stage. from_tile: the current stage's tile
// address and the lane's byte offset in it. at(row, j) is the fragment at row offset
// `row` (a multiple of 8) and 16-column step j. Swizzled, the four XOR variants
// of SwizzledTile::fragment are formed once per tile, so every fragment address
// is one of them plus an immediate; XOR on the address equals XOR on the lane's
// offset because the tile base and stage offsets are 128-byte aligned (the
// kernel checks the base).
template <int kRows, int kD, int kS, bool kSwizzle>
struct TileOperand {
  // Bytes of one stage of the tile (padded rows: kS elements).
  static constexpr int tile_bytes() {
    if constexpr (kSwizzle) return SwizzledTile<kRows, kD>::kBytes;
    else return kRows * kS * 2;
  }
  uint32_t v[kSwizzle ? 4 : 1];
  // Two algebraically equal ways to form the addresses; ptxas allocates
  // registers differently for them (dev/cuda/NOTES.md, call 11: the backward at
  // d128 kept its loop free of spill reloads with the first form non-causal and
  // with the second causal).
  static __device__ __forceinline__ TileOperand from_lane(uint32_t lane_addr, uint32_t stage_off) {
    TileOperand op;
    if constexpr (kSwizzle) {
#pragma unroll
      for (int j = 0; j < 4; ++j) op.v[j] = (lane_addr ^ SwizzledTile<kRows, kD>::fragment_xor(j)) + stage_off;
    } else {
      op.v[0] = lane_addr + stage_off;
    }
    return op;
  }
  static __device__ __forceinline__ TileOperand from_tile(uint32_t tile_base, uint32_t lane_off) {
    TileOperand op;
    if constexpr (kSwizzle) {
#pragma unroll
      for (int j = 0; j < 4; ++j) op.v[j] = tile_base + (lane_off ^ SwizzledTile<kRows, kD>::fragment_xor(j));
    } else {
      op.v[0] = tile_base + lane_off;
    }
    return op;
  }
  // The lane's byte offset in the tile for the [n][k] (B operand) and [k][n]
  // (transposed B operand) fragment patterns at tile row row0 / column col0
  // (multiples of 8): SwizzledTile's lane maps, or mma_utils' padded ones.
  static __device__ __forceinline__ uint32_t nk_lane_offset(int lane, int row0) {
    if constexpr (kSwizzle) {
      return SwizzledTile<kRows, kD>::nk_lane_offset(lane, row0);
    } else {
      return 2 * (row0 * kS + b_nk_lane_off<kS>(lane));
    }
  }
  static __device__ __forceinline__ uint32_t kn_lane_offset(int lane, int col0) {
    if constexpr (kSwizzle) {
      return SwizzledTile<kRows, kD>::kn_lane_offset(lane, col0);
    } else {
      return 2 * (col0 + b_kn_lane_off<kS>(lane));
    }
  }
  __device__ __forceinline__ uint32_t at(int row, int j) const {
    if constexpr (kSwizzle) {
      return v[j & 3] + SwizzledTile<kRows, kD>::fragment_step(row, j);
    } else {
      return v[0] + 2 * (row * kS + j * 16);
    }
  }
};

}  // namespace orchard::cuda
