// Philox4x32-10 against the Random123 known-answer vectors (kat_vectors,
// philox4x32_10 entries), plus the dropout indexing contract of philox.h.
#include <gtest/gtest.h>

#include "orchard/philox.h"

namespace orchard {
namespace {

void expect_kat(Philox4 ctr, std::uint32_t k0, std::uint32_t k1, Philox4 want) {
  const Philox4 got = philox4x32_10(ctr, k0, k1);
  EXPECT_EQ(got.x, want.x);
  EXPECT_EQ(got.y, want.y);
  EXPECT_EQ(got.z, want.z);
  EXPECT_EQ(got.w, want.w);
}

TEST(Philox, Random123KnownAnswers) {
  expect_kat({0, 0, 0, 0}, 0, 0, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u});
  expect_kat({0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, 0xffffffffu, 0xffffffffu,
             {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu});
  expect_kat({0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, 0xa4093822u, 0x299f31d0u,
             {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u});
}

TEST(Philox, DropoutIndexing) {
  const std::uint64_t seed = 0x0123456789abcdefull, offset = 0xfedcba9876543210ull;
  // counter = (col / 4, row, batch_head, lo32(offset) ^ hi32(offset) * golden), key = seed halves.
  const std::uint32_t off = 0x76543210u ^ (0xfedcba98u * 0x9E3779B9u);
  const Philox4 want = philox4x32_10({5, 7, 3, off}, 0x89abcdefu, 0x01234567u);
  const Philox4 got = dropout_draws(seed, offset, 3, 7, 5);
  EXPECT_EQ(got.x, want.x);
  EXPECT_EQ(got.w, want.w);
  const std::uint32_t thr = dropout_keep_threshold(0.3f);
  for (int lane = 0; lane < 4; ++lane)
    EXPECT_EQ(dropout_keep(seed, offset, 3, 7, 20 + lane, thr), philox_lane(want, lane) >= thr);
}

TEST(Philox, KeepThreshold) {
  EXPECT_EQ(dropout_keep_threshold(0.0f), 0u);
  EXPECT_EQ(dropout_keep_threshold(0.5f), 0x80000000u);
  EXPECT_EQ(dropout_keep_threshold(1.0f), 0xffffffffu);
  EXPECT_EQ(dropout_keep_threshold(-0.1f), 0u);
}

}  // namespace
}  // namespace orchard
