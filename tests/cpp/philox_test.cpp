// Philox4x32-10 against the Random123 known-answer vectors (kat_vectors,
// philox4x32_10 entries), plus the dropout indexing contract of philox.h (8-bit draws, one
// call per 2 rows x 8 columns).
#include <gtest/gtest.h>

#include <map>
#include <set>
#include <tuple>
#include <utility>

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

// Counter, word and byte of (row, col) per philox.h, the Philox call computed here by hand.
TEST(Philox, DropoutIndexing) {
  const std::uint64_t seed = 0x0123456789abcdefull, offset = 0xfedcba9876543210ull;
  const std::uint32_t off = 0x76543210u ^ (0xfedcba98u * 0x9E3779B9u);
  struct Case {
    std::uint32_t row, col, x, y;  // x = 4 (col / 32) + (col / 2) % 4, y = 8 (row / 16) + row % 8
    int word, shift;               // word = 2 ((row / 8) % 2) + (col / 16) % 2, byte = 2 ((col / 8) % 2) + col % 2
  };
  const Case cases[] = {
      {0, 0, 0, 0, 0, 0},         {0, 1, 0, 0, 0, 8},          {0, 2, 1, 0, 0, 0},
      {7, 9, 0, 7, 0, 24},        {8, 0, 0, 0, 2, 0},          {9, 16, 0, 1, 3, 0},
      {15, 31, 3, 7, 3, 24},      {16, 32, 4, 8, 0, 0},        {23, 45, 6, 15, 0, 24},
      {24, 57, 4, 8, 3, 24},      {37, 70, 11, 21, 0, 0},      {1000, 1001, 124, 496, 2, 24},
      {65535, 4097, 512, 32767, 2, 8},
  };
  for (const Case& c : cases) {
    const Philox4 want = philox4x32_10({c.x, c.y, 3, off}, 0x89abcdefu, 0x01234567u);
    const Philox4 got = dropout_call(seed, offset, 3, c.row, c.col);
    EXPECT_EQ(got.x, want.x) << c.row << " " << c.col;
    EXPECT_EQ(got.y, want.y) << c.row << " " << c.col;
    EXPECT_EQ(got.z, want.z) << c.row << " " << c.col;
    EXPECT_EQ(got.w, want.w) << c.row << " " << c.col;
    EXPECT_EQ(dropout_word(c.row, c.col), c.word) << c.row << " " << c.col;
    EXPECT_EQ(dropout_shift(c.col), static_cast<std::uint32_t>(c.shift)) << c.col;
    const std::uint32_t draw = (philox_lane(want, c.word) >> c.shift) & 0xFFu;
    EXPECT_EQ(dropout_draw(got, c.row, c.col), draw) << c.row << " " << c.col;
    for (std::uint32_t thr : {0u, 1u, 26u, 128u, 255u, 256u})
      EXPECT_EQ(dropout_keep(seed, offset, 3, c.row, c.col, thr), draw >= thr) << c.row << " " << c.col;
  }
}

// Every element of a 32 x 64 block has its own (call, word, byte), and each call holds
// exactly rows {r, r + 8} (r % 16 < 8) x columns {32 C + 8 n + 2 t + e: n < 4, e < 2}.
TEST(Philox, DropoutCallsCoverTwoRowsByEightColumns) {
  std::map<std::pair<std::uint32_t, std::uint32_t>, std::set<std::pair<std::uint32_t, std::uint32_t>>> calls;
  std::set<std::tuple<std::uint32_t, std::uint32_t, int, std::uint32_t>> slots;
  for (std::uint32_t row = 0; row < 32; ++row)
    for (std::uint32_t col = 0; col < 64; ++col) {
      const std::uint32_t x = ((col >> 5) << 2) | ((col >> 1) & 3u), y = ((row >> 4) << 3) | (row & 7u);
      calls[{x, y}].insert({row, col});
      EXPECT_TRUE(slots.insert({x, y, dropout_word(row, col), dropout_shift(col)}).second) << row << " " << col;
    }
  EXPECT_EQ(slots.size(), 32u * 64u);
  EXPECT_EQ(calls.size(), 32u * 64u / 16u);
  for (const auto& [call, elements] : calls) {
    const std::uint32_t C = call.first >> 2, t = call.first & 3u;
    const std::uint32_t r = (call.second >> 3) * 16 + (call.second & 7u);
    std::set<std::pair<std::uint32_t, std::uint32_t>> want;
    for (std::uint32_t rr : {r, r + 8})
      for (std::uint32_t n = 0; n < 4; ++n)
        for (std::uint32_t e = 0; e < 2; ++e) want.insert({rr, 32 * C + 8 * n + 2 * t + e});
    EXPECT_EQ(elements, want) << "call x " << call.first << " y " << call.second;
  }
  // The same with the draws themselves: one call's 16 bytes are its elements' draws.
  const std::uint64_t seed = 99, offset = 5;
  const Philox4 r = dropout_call(seed, offset, 1, 18, 37);  // x = 4 + 2, y = 8 + 2: rows 18, 26
  for (std::uint32_t rr : {18u, 26u})
    for (std::uint32_t n = 0; n < 4; ++n)
      for (std::uint32_t e = 0; e < 2; ++e) {
        const std::uint32_t col = 32 + 8 * n + 4 + e;
        const int word = (rr == 26u ? 2 : 0) + (n >= 2 ? 1 : 0);
        const std::uint32_t byte = 2 * (n % 2) + e;
        EXPECT_EQ(dropout_draw(dropout_call(seed, offset, 1, rr, col), rr, col),
                  (philox_lane(r, word) >> (8 * byte)) & 0xFFu)
            << rr << " " << col;
      }
}

TEST(Philox, KeepThreshold) {
  EXPECT_EQ(dropout_keep_threshold(0.0f), 0u);
  EXPECT_EQ(dropout_keep_threshold(0.5f), 128u);
  EXPECT_EQ(dropout_keep_threshold(0.1f), 26u);  // 25.6
  EXPECT_EQ(dropout_keep_threshold(1.0f), 256u);
  EXPECT_EQ(dropout_keep_threshold(-0.1f), 0u);
  EXPECT_EQ(dropout_keep_threshold(0.999f), 256u);  // round(255.74)
  EXPECT_EQ(dropout_keep_threshold(1.0f / 512), 1u);  // 0.5 rounds up
  EXPECT_EQ(dropout_keep_threshold(0.998f), 255u);    // 255.49
}

}  // namespace
}  // namespace orchard
