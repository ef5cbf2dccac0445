// The lane exchanges of src/backends/cuda/sm80/shared_dropout_draws.h replayed on the host: every
// lane of a pair (the forward's C fragment) and of a quad (the dK / dV kernel's S^T fragment) ends
// with the draws that dropout_draws gives its own elements, for random seeds, offsets and indices.
#include <gtest/gtest.h>

#include <random>

#include "backends/cuda/sm80/shared_dropout_draws.h"
#include "orchard/philox.h"

namespace orchard::cuda {
namespace {

TEST(SharedDropoutDraws, PairsGiveEachLaneItsColumns) {
  std::mt19937_64 rng(54);
  for (int trial = 0; trial < 200; ++trial) {
    const std::uint64_t seed = rng(), offset = rng();
    const std::uint32_t bh = rng() % 4096, row0 = rng() % 100000, col0 = (rng() % 100000) * 8;  // a tile's column origin
    const std::uint32_t col_offset = (rng() % 1000) * 4;                                          // a multiple of 4
    for (int half = 0; half < 2; ++half) {  // lanes t = 2 half, 2 half + 1
      Philox4 mine[2];
      std::uint32_t sent[2][2];
      for (int b = 0; b < 2; ++b) {  // lane t = 2 half + b computes row b's call of its group
        mine[b] = dropout_draws(seed, offset, bh, row0 + 8 * b, (col0 + 4 * half + col_offset) >> 2);
        pair_send(mine[b], b, sent[b][0], sent[b][1]);
      }
      for (int b = 0; b < 2; ++b) {
        const int t = 2 * half + b;
        for (int r = 0; r < 2; ++r) {
          std::uint32_t d0, d1, want0, want1;
          pair_row_draws(mine[b], b, sent[1 - b][0], sent[1 - b][1], r, d0, d1);
          dropout_draw_pair(seed, offset, bh, row0 + 8 * r, col0 + 2 * t + col_offset, want0, want1);
          ASSERT_EQ(d0, want0) << "t " << t << " r " << r;
          ASSERT_EQ(d1, want1) << "t " << t << " r " << r;
        }
      }
    }
  }
}

TEST(SharedDropoutDraws, QuadsGiveEachLaneItsKey) {
  std::mt19937_64 rng(5454);
  for (int trial = 0; trial < 200; ++trial) {
    const std::uint64_t seed = rng(), offset = rng();
    const std::uint32_t bh = rng() % 4096, col_offset = (rng() % 1000) * 4;
    // Four combos: (query row, first key of the lanes' group), the key a multiple of 4.
    std::uint32_t query[4], key[4];
    for (int j = 0; j < 4; ++j) query[j] = rng() % 100000, key[j] = (rng() % 100000) * 4;
    Philox4 v[4];
    std::uint32_t s1[4][2], s2[4][2];
    for (int i = 0; i < 4; ++i) {  // lane i computes combo i's call
      v[i] = dropout_draws(seed, offset, bh, query[i], (key[i] + col_offset) >> 2);
      quad_step1_send(v[i], i, s1[i][0], s1[i][1]);
    }
    for (int i = 0; i < 4; ++i) quad_step2_send(v[i], i, s1[i ^ 1][0], s1[i ^ 1][1], s2[i][0], s2[i][1]);
    for (int i = 0; i < 4; ++i)    // lane i holds key key[j] + i of every combo j
      for (int j = 0; j < 4; ++j) {
        const std::uint32_t got = quad_draw(v[i], i, s1[i ^ 1][0], s1[i ^ 1][1], s2[i ^ 2][0], s2[i ^ 2][1], j);
        const Philox4 want = dropout_draws(seed, offset, bh, query[j], (key[j] + i + col_offset) >> 2);
        ASSERT_EQ(got, philox_lane(want, static_cast<int>((key[j] + i + col_offset) & 3u))) << "lane " << i << " combo " << j;
      }
  }
}

}  // namespace
}  // namespace orchard::cuda
