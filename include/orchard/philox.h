// Counter-based Philox4x32-10 (Salmon et al., "Parallel random numbers: as
// easy as 1, 2, 3", SC'11) and Orchard's dropout indexing.
//
// The keep decision for attention element (batch, head, row, col) depends on
// nothing but (seed, offset) and those four indices, so the forward and the
// backward pass, the CPU and the CUDA backend, and any tiling draw the same mask.
//
//   key     = (lo32(seed), hi32(seed))
//   counter = (col / 4, row, batch * hq + head, lo32(offset) ^ (hi32(offset) * 0x9E3779B9))
//   draw    = philox(counter, key)[col % 4]
//   keep    = draw >= keep_threshold(p)
//
// A call that computes one block of a larger attention (context parallelism) adds
// its global row/column/head offsets to these indices (FwdParams::dropout_*_offset,
// dropout_batch_head in orchard/params.h), so each block draws its part of the
// larger call's mask; a column offset that is not a multiple of 4 makes a run of
// four columns straddle two Philox calls (dropout_draw_pair).
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

// Threshold on the 32-bit draw: p * 2^32, saturated to [0, 2^32 - 1].
ORCHARD_HOST_DEVICE std::uint32_t dropout_keep_threshold(float p) {
  const double t = static_cast<double>(p) * 4294967296.0;
  if (t <= 0.0) return 0u;
  if (t >= 4294967295.0) return 4294967295u;
  return static_cast<std::uint32_t>(t + 0.5);
}

// Four consecutive draws for columns [4*col4, 4*col4 + 4) of one row.
ORCHARD_HOST_DEVICE Philox4 dropout_draws(std::uint64_t seed, std::uint64_t offset,
                                          std::uint32_t batch_head, std::uint32_t row,
                                          std::uint32_t col4) {
  const std::uint32_t off = static_cast<std::uint32_t>(offset) ^
                            (static_cast<std::uint32_t>(offset >> 32) * 0x9E3779B9u);
  return philox4x32_10(Philox4{col4, row, batch_head, off}, static_cast<std::uint32_t>(seed),
                       static_cast<std::uint32_t>(seed >> 32));
}

ORCHARD_HOST_DEVICE std::uint32_t philox_lane(const Philox4& r, int lane) {
  return lane == 0 ? r.x : lane == 1 ? r.y : lane == 2 ? r.z : r.w;
}

// Keep decision for one element; batch_head = batch * hq + head.
ORCHARD_HOST_DEVICE bool dropout_keep(std::uint64_t seed, std::uint64_t offset,
                                      std::uint32_t batch_head, std::uint32_t row,
                                      std::uint32_t col, std::uint32_t keep_threshold) {
  const Philox4 r = dropout_draws(seed, offset, batch_head, row, col >> 2);
  return philox_lane(r, static_cast<int>(col & 3u)) >= keep_threshold;
}

// The draws of columns col and col + 1 of one row. One Philox call when col is
// even (the two share a call: always so without a column offset) or col % 4 == 1;
// the second column's is the next call's first word when col % 4 == 3.
ORCHARD_HOST_DEVICE void dropout_draw_pair(std::uint64_t seed, std::uint64_t offset,
                                           std::uint32_t batch_head, std::uint32_t row,
                                           std::uint32_t col, std::uint32_t& d0, std::uint32_t& d1) {
  const Philox4 r = dropout_draws(seed, offset, batch_head, row, col >> 2);
  const std::uint32_t lane = col & 3u;
  d0 = philox_lane(r, static_cast<int>(lane));
  d1 = lane == 3u ? dropout_draws(seed, offset, batch_head, row, (col >> 2) + 1u).x
                  : philox_lane(r, static_cast<int>(lane + 1u));
}

}  // namespace orchard
