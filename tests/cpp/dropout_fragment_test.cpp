// The fragment forms of src/backends/cuda/dropout_fragment.h replayed on the host: every lane
// reads, from its calls and its partner's bytes, the draw philox.h gives each of its elements,
// for random seeds, offsets and (aligned) tile positions.
#include <gtest/gtest.h>

#include <random>

#include "backends/cuda/dropout_fragment.h"
#include "orchard/philox.h"

namespace orchard::cuda {
namespace {

std::uint32_t draw(std::uint64_t seed, std::uint64_t offset, std::uint32_t bh, std::uint32_t row, std::uint32_t col) {
  return dropout_draw(dropout_call(seed, offset, bh, row, col), row, col);
}

TEST(DropoutFragment, QueryRowsOneCallPer32Columns) {
  std::mt19937_64 rng(61);
  for (int trial = 0; trial < 200; ++trial) {
    const std::uint64_t seed = rng(), offset = rng();
    const std::uint32_t bh = rng() % 4096;
    const std::uint32_t row16 = (rng() % 100000) * 16, col32 = (rng() % 100000) * 32;  // aligned tile corners
    for (int g = 0; g < 8; ++g)
      for (int t = 0; t < 4; ++t) {
        const std::uint32_t r = row16 + g;
        // Twelve 8-column blocks from col32 (a 96-column tile): a call per 32-column block.
        Philox4 call{};
        for (int j = 0; j < 12; ++j) {
          const std::uint32_t cb = col32 + 8 * static_cast<std::uint32_t>(j);
          if (query_rows_new_call(j)) call = dropout_call(seed, offset, bh, r, cb + 2 * t);
          for (int h = 0; h < 2; ++h) {
            const std::uint32_t pair = query_rows_pair(call, h, j);
            ASSERT_EQ(pair & 0xFFu, draw(seed, offset, bh, r + 8 * h, cb + 2 * t)) << g << " " << t << " " << j;
            ASSERT_EQ(pair >> 8, draw(seed, offset, bh, r + 8 * h, cb + 2 * t + 1)) << g << " " << t << " " << j;
          }
        }
      }
  }
}

// query_rows_drop_packed: a lane's packed 16-bit pairs of a 64-column tile (a[kk][q]: block
// 2 kk + q / 2, row half q % 2) keep exactly the halves whose draw is >= the threshold, at every
// threshold 0..256 (the add of 0x8000 - threshold must not carry between halves).
TEST(DropoutFragment, QueryRowsPackedDropKeepsTheDrawsAtOrAboveTheThreshold) {
  std::mt19937_64 rng(63);
  for (int trial = 0; trial < 40; ++trial) {
    const std::uint64_t seed = rng(), offset = rng();
    const std::uint32_t bh = rng() % 4096;
    const std::uint32_t row16 = (rng() % 100000) * 16, col32 = (rng() % 100000) * 32;
    for (std::uint32_t thr = 0; thr <= 256; thr += trial % 2 ? 1 : 37)
      for (int g = 0; g < 8; ++g)
        for (int t = 0; t < 4; ++t) {
          std::uint32_t a[4][4];
          for (auto& kk : a)
            for (auto& pair : kk) pair = 0xA5C3'5A3Cu;
          Philox4 calls[2];
          query_rows_calls<64>(calls, seed, offset, bh, row16 + g, col32, t);
          query_rows_drop_packed<64>(a, calls, thr);
          for (int j = 0; j < 8; ++j)
            for (int h = 0; h < 2; ++h)
              for (int c = 0; c < 2; ++c) {
                const std::uint32_t col = col32 + 8 * static_cast<std::uint32_t>(j) + 2 * t + c;
                const bool keep = draw(seed, offset, bh, row16 + g + 8 * h, col) >= thr;
                const std::uint32_t half = (a[j / 2][2 * (j % 2) + h] >> (16 * c)) & 0xFFFFu;
                ASSERT_EQ(half, keep ? (c ? 0xA5C3u : 0x5A3Cu) : 0u) << thr << " " << g << " " << t << " " << j;
              }
        }
  }
}

// prmt's sign mode, which the packed drop uses: nibble bit 3 replicates the selected byte's top bit.
TEST(DropoutFragment, BytePermSignMode) {
  EXPECT_EQ(byte_perm(0x0080'7F00u, 0u, 0xBB99u), 0x0000'0000u);
  EXPECT_EQ(byte_perm(0x8000'8000u, 0u, 0xBB99u), 0xFFFF'FFFFu);
  EXPECT_EQ(byte_perm(0x0000'8000u, 0u, 0xBB99u), 0x0000'FFFFu);
  EXPECT_EQ(byte_perm(0x1234'5678u, 0x9ABC'DEF0u, 0x7531u), 0x9ADE'1256u);  // plain selection unchanged
}

// The rows = keys words of the lane pair g = 2 gh + e (keys k0 + e, k0 even) at query q: each lane's own
// bytes and the bytes it sends its partner.
void lane_pair_bytes(std::uint64_t seed, std::uint64_t offset, std::uint32_t bh, std::uint32_t q, std::uint32_t k0,
                     std::uint32_t (&own)[2], std::uint32_t (&sent)[2]) {
  for (int e = 0; e < 2; ++e) {
    const std::uint32_t k = k0 + e;
    const Philox4 call = dropout_call(seed, offset, bh, q + e, k);
    own[e] = key_rows_bytes(call, k, e);
    sent[e] = key_rows_bytes(call, k, e ^ 1);
  }
}

TEST(DropoutFragment, KeyRowsPairsExchangeFourBytes) {
  std::mt19937_64 rng(6161);
  for (int trial = 0; trial < 200; ++trial) {
    const std::uint64_t seed = rng(), offset = rng();
    const std::uint32_t bh = rng() % 4096;
    const std::uint32_t key16 = (rng() % 100000) * 16, query16 = (rng() % 100000) * 16;
    for (int gh = 0; gh < 4; ++gh)  // the pair g = 2 gh, 2 gh + 1
      for (int t = 0; t < 4; ++t) {
        const std::uint32_t q = query16 + 2 * t;
        std::uint32_t own[2], sent[2];
        lane_pair_bytes(seed, offset, bh, q, key16 + 2 * gh, own, sent);
        for (int e = 0; e < 2; ++e) {
          const std::uint32_t k = key16 + 2 * gh + e;
          for (int f = 0; f < 2; ++f)
            for (int rh = 0; rh < 2; ++rh)
              for (int h = 0; h < 2; ++h)
                ASSERT_EQ(key_rows_draw(own[e], sent[e ^ 1], e, f, rh, h),
                          draw(seed, offset, bh, q + f + 8 * rh, k + 8 * h))
                    << "gh " << gh << " t " << t << " e " << e << " f " << f << " rh " << rh << " h " << h;
        }
      }
  }
}

// The packed rows = keys form (key_rows_pair_mask / key_rows_element_mask): pair q of a call's 8
// elements (row half q / 2, key half q % 2) masks query column f in its 16-bit half f, and element f's
// 32-bit mask is all ones or zero, each exactly when that draw is >= the threshold, for both lanes
// of a pair (e = 0, 1) at every threshold 0..256.
TEST(DropoutFragment, KeyRowsPackedMasksKeepTheDrawsAtOrAboveTheThreshold) {
  std::mt19937_64 rng(6464);
  for (int trial = 0; trial < 60; ++trial) {
    const std::uint64_t seed = rng(), offset = rng();
    const std::uint32_t bh = rng() % 4096;
    const std::uint32_t key16 = (rng() % 100000) * 16, query16 = (rng() % 100000) * 16;
    const int gh = trial % 4, t = (trial / 4) % 4;
    const std::uint32_t q = query16 + 2 * t;
    std::uint32_t own[2], sent[2];
    lane_pair_bytes(seed, offset, bh, q, key16 + 2 * gh, own, sent);
    for (std::uint32_t thr = 0; thr <= 256; thr += trial % 2 ? 1 : 29) {
      const std::uint32_t bias = query_rows_pair_bias(thr);
      for (int e = 0; e < 2; ++e) {
        const std::uint32_t k = key16 + 2 * gh + e;
        for (int qq = 0; qq < 4; ++qq) {
          const int rh = qq / 2, h = qq % 2;
          const std::uint32_t pair = key_rows_pair_mask(own[e], sent[e ^ 1], e, qq, bias);
          for (int f = 0; f < 2; ++f) {
            const bool keep = draw(seed, offset, bh, q + f + 8 * rh, k + 8 * h) >= thr;
            ASSERT_EQ((pair >> (16 * f)) & 0xFFFFu, keep ? 0xFFFFu : 0u) << thr << " e " << e << " q " << qq << " f " << f;
            ASSERT_EQ(key_rows_element_mask(pair, f), keep ? 0xFFFF'FFFFu : 0u) << thr << " e " << e << " q " << qq;
          }
        }
      }
    }
  }
}

TEST(DropoutFragment, AlignedOffsets) {
  EXPECT_TRUE(dropout_fragment_aligned(0, 0));
  EXPECT_TRUE(dropout_fragment_aligned(4096, 32));
  EXPECT_FALSE(dropout_fragment_aligned(8, 0));
  EXPECT_FALSE(dropout_fragment_aligned(0, 4));
  EXPECT_TRUE(query_rows_aligned(0, 0));
  EXPECT_TRUE(query_rows_aligned(4112, 64));
  EXPECT_FALSE(query_rows_aligned(0, 16));  // rows = keys' grid, not rows = queries'
  EXPECT_FALSE(query_rows_aligned(8, 32));
}

}  // namespace
}  // namespace orchard::cuda
