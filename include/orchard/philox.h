// Counter-based Philox4x32-10 (Salmon et al., "Parallel random numbers: as
// easy as 1, 2, 3", SC'11) and Orchard's dropout indexing.
//
// The keep decision for attention element (batch, head, row, col) depends on
// nothing but (seed, offset) and those four indices, so the forward and the
// backward pass, every backend and any tiling draw the same mask.
//
// Each element draws 8 bits, as flash-attn's kernels do; one Philox call gives
// the 16 draws of a 2-row x 8-column set laid out like an mma.sync / wgmma
// accumulator fragment's lane, so a GPU lane that holds rows r, r + 8 and column
// pairs 2t, 2t + 1 of four 8-column blocks makes one call for its 16 elements:
//
//   key     = (lo32(seed), hi32(seed))
//   counter = (4 * (col / 32) + (col / 2) % 4,  8 * (row / 16) + row % 8,
//              batch * hq + head,  lo32(offset) ^ (hi32(offset) * 0x9E3779B9))
//   word    = 2 * ((row / 8) % 2) + (col / 16) % 2        (of the call's x, y, z, w)
//   byte    = 2 * ((col / 8) % 2) + col % 2               (little-endian, of that word)
//   keep    = draw >= keep_threshold(p) = round(256 p)
//
// So the keep probability is 1 - round(256 p) / 256 (p = 0.1: 0.8984), the kept
// values are scaled by 1 / (1 - p) as flash-attn does. (Until session 61 each
// element drew 32 bits, four per call: 4x the Philox work, 0.46-0.55x flash-attn's
// dropout speed on an H100.)
//
// A call that computes one block of a larger attention (context parallelism) adds
// its global row/column/head offsets to these indices (FwdParams::dropout_*_offset,
// dropout_batch_head in orchard/params.h), so each block draws its part of the
// larger call's mask; the CUDA kernels take their one-call-per-fragment path only
// when both offsets are multiples of 16 (backends/cuda/dropout_fragment.h) and
// draw per element otherwise.
#pragma once

#include <cstdint>

#include "orchard/config.h"

namespace orchard {

struct Philox4 {
  std::uint32_t x, y, z, w;
};

ORCHARD_HOST_DEVICE void philox_mulhilo(std::uint32_t a, std::uint32_t b, std::uint32_t& hi,
                                        std::uint32_t& lo) {
  const std::uint64_t product = static_cast<std::uint64_t>(a) * b;
  hi = static_cast<std::uint32_t>(product >> 32);
  lo = static_cast<std::uint32_t>(product);
}

ORCHARD_HOST_DEVICE Philox4 philox4x32_10(Philox4 ctr, std::uint32_t key0, std::uint32_t key1) {
  constexpr std::uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr std::uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    std::uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kMul0, ctr.x, hi0, lo0);
    philox_mulhilo(kMul1, ctr.z, hi1, lo1);
    ctr = Philox4{hi1 ^ ctr.y ^ key0, lo1, hi0 ^ ctr.w ^ key1, lo0};
    key0 += kWeyl0;
    key1 += kWeyl1;
  }
  return ctr;
}

// Threshold on the 8-bit draw: round(256 p), saturated to [0, 256] (256 drops all).
ORCHARD_HOST_DEVICE std::uint32_t dropout_keep_threshold(float p) {
  const double t = static_cast<double>(p) * 256.0;
  if (!(t > 0.0)) return 0u;
  if (t >= 256.0) return 256u;
  return static_cast<std::uint32_t>(t + 0.5);
}

// The counter words of the call that holds row `row`, column `col` (x: columns, y: rows).
ORCHARD_HOST_DEVICE std::uint32_t dropout_counter_x(std::uint32_t col) { return ((col >> 5) << 2) | ((col >> 1) & 3u); }
ORCHARD_HOST_DEVICE std::uint32_t dropout_counter_y(std::uint32_t row) { return ((row >> 4) << 3) | (row & 7u); }

// The counter's last word, from the call's 64-bit offset.
ORCHARD_HOST_DEVICE std::uint32_t dropout_counter_w(std::uint64_t offset) {
  return static_cast<std::uint32_t>(offset) ^ (static_cast<std::uint32_t>(offset >> 32) * 0x9E3779B9u);
}

// The call at counter words (x, y): y + 8 is the call of the rows 16 further down.
ORCHARD_HOST_DEVICE Philox4 dropout_call_xy(std::uint64_t seed, std::uint64_t offset, std::uint32_t batch_head,
                                            std::uint32_t x, std::uint32_t y) {
  return philox4x32_10(Philox4{x, y, batch_head, dropout_counter_w(offset)}, static_cast<std::uint32_t>(seed),
                       static_cast<std::uint32_t>(seed >> 32));
}

// The Philox call that holds element (row, col)'s draw.
ORCHARD_HOST_DEVICE Philox4 dropout_call(std::uint64_t seed, std::uint64_t offset, std::uint32_t batch_head,
                                         std::uint32_t row, std::uint32_t col) {
  return dropout_call_xy(seed, offset, batch_head, dropout_counter_x(col), dropout_counter_y(row));
}

ORCHARD_HOST_DEVICE std::uint32_t philox_lane(const Philox4& r, int lane) {
  return lane == 0 ? r.x : lane == 1 ? r.y : lane == 2 ? r.z : r.w;
}

// The word of (row, col)'s call that holds its draw, and the draw's bit shift in it.
ORCHARD_HOST_DEVICE int dropout_word(std::uint32_t row, std::uint32_t col) {
  return static_cast<int>(((row >> 3) & 1u) * 2u + ((col >> 4) & 1u));
}
ORCHARD_HOST_DEVICE std::uint32_t dropout_shift(std::uint32_t col) { return ((col >> 3) & 1u) * 16u + (col & 1u) * 8u; }

// (row, col)'s 8-bit draw, from its call r (dropout_call of the same row and column).
ORCHARD_HOST_DEVICE std::uint32_t dropout_draw(const Philox4& r, std::uint32_t row, std::uint32_t col) {
  return (philox_lane(r, dropout_word(row, col)) >> dropout_shift(col)) & 0xFFu;
}

// Keep decision for one element; batch_head = batch * hq + head.
ORCHARD_HOST_DEVICE bool dropout_keep(std::uint64_t seed, std::uint64_t offset, std::uint32_t batch_head,
                                      std::uint32_t row, std::uint32_t col, std::uint32_t keep_threshold) {
  return dropout_draw(dropout_call(seed, offset, batch_head, row, col), row, col) >= keep_threshold;
}

}  // namespace orchard
