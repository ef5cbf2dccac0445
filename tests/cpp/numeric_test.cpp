// float16 / bfloat16 conversions of orchard/numeric.h: exhaustive round
// trips, round-to-nearest-even ties, subnormals, infinities and NaN.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "orchard/numeric.h"

namespace orchard {
namespace {

TEST(Numeric, Fp16RoundTripsEveryPattern) {
  for (std::uint32_t h = 0; h < 0x10000u; ++h) {
    const float f = fp16_to_float(static_cast<std::uint16_t>(h));
    if ((h & 0x7c00u) == 0x7c00u && (h & 0x3ffu)) {
      EXPECT_TRUE(std::isnan(f)) << std::hex << h;
      EXPECT_TRUE(std::isnan(fp16_to_float(float_to_fp16(f))));
    } else {
      EXPECT_EQ(float_to_fp16(f), h) << std::hex << h;
    }
  }
}

TEST(Numeric, Bf16RoundTripsEveryPattern) {
  for (std::uint32_t h = 0; h < 0x10000u; ++h) {
    const float f = bf16_to_float(static_cast<std::uint16_t>(h));
    EXPECT_EQ(float_to_bits(f), h << 16);
    if ((h & 0x7f80u) == 0x7f80u && (h & 0x7fu)) {
      EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(f))));
    } else {
      EXPECT_EQ(float_to_bf16(f), h) << std::hex << h;
    }
  }
}

TEST(Numeric, Fp16SpecialValues) {
  EXPECT_EQ(float_to_fp16(0.0f), 0x0000);
  EXPECT_EQ(float_to_fp16(-0.0f), 0x8000);
  EXPECT_EQ(float_to_fp16(std::numeric_limits<float>::infinity()), 0x7c00);
  EXPECT_EQ(float_to_fp16(-std::numeric_limits<float>::infinity()), 0xfc00);
  EXPECT_TRUE(std::isnan(fp16_to_float(float_to_fp16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_EQ(float_to_fp16(65504.0f), 0x7bff);           // max finite
  EXPECT_EQ(float_to_fp16(65519.0f), 0x7bff);           // below the halfway point
  EXPECT_EQ(float_to_fp16(65520.0f), 0x7c00);           // halfway to 2^16 rounds to even = inf
  EXPECT_EQ(float_to_fp16(1e30f), 0x7c00);
  EXPECT_EQ(float_to_fp16(1.0f + 0x1p-11f), 0x3c00);    // tie -> even (down)
  EXPECT_EQ(float_to_fp16(1.0f + 3 * 0x1p-11f), 0x3c02);  // tie -> even (up)
  EXPECT_EQ(float_to_fp16(1.0f + 0x1p-11f + 0x1p-20f), 0x3c01);  // above the tie
}

TEST(Numeric, Fp16Subnormals) {
  EXPECT_EQ(fp16_to_float(0x0001), 0x1p-24f);
  EXPECT_EQ(fp16_to_float(0x03ff), 1023 * 0x1p-24f);
  EXPECT_EQ(fp16_to_float(0x8001), -0x1p-24f);
  EXPECT_EQ(float_to_fp16(0x1p-24f), 0x0001);
  EXPECT_EQ(float_to_fp16(0x1p-25f), 0x0000);            // tie -> even (0)
  EXPECT_EQ(float_to_fp16(0x1p-25f + 0x1p-40f), 0x0001); // just above the tie
  EXPECT_EQ(float_to_fp16(3 * 0x1p-25f), 0x0002);        // tie -> even (2)
  EXPECT_EQ(float_to_fp16(0x1p-14f - 0x1p-25f), 0x0400); // rounds up into the normals
  EXPECT_EQ(float_to_fp16(0x1p-30f), 0x0000);
  EXPECT_EQ(float_to_fp16(-0x1p-24f), 0x8001);
}

#if defined(__FLT16_MAX__)
// Cross-check against the compiler's own float -> _Float16 conversion on a
// dense sample of all float bit patterns.
TEST(Numeric, Fp16MatchesCompilerConversion) {
  for (std::uint64_t bits = 0; bits < 0x100000000ull; bits += 997) {
    const float f = bits_to_float(static_cast<std::uint32_t>(bits));
    const _Float16 h = static_cast<_Float16>(f);
    std::uint16_t want;
    std::memcpy(&want, &h, 2);
    const std::uint16_t got = float_to_fp16(f);
    if (std::isnan(f)) {
      ASSERT_TRUE(std::isnan(fp16_to_float(got)));
    } else {
      ASSERT_EQ(got, want) << std::hex << bits;
    }
  }
}
#endif

TEST(Numeric, Bf16RoundToNearestEven) {
  EXPECT_EQ(float_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(float_to_bf16(1.0f + 0x1p-8f), 0x3f80);      // tie -> even (down)
  EXPECT_EQ(float_to_bf16(1.0f + 3 * 0x1p-8f), 0x3f82);  // tie -> even (up)
  EXPECT_EQ(float_to_bf16(1.0f + 0x1p-8f + 0x1p-20f), 0x3f81);
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::infinity()), 0x7f80);
  EXPECT_EQ(float_to_bf16(-std::numeric_limits<float>::infinity()), 0xff80);
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::max()), 0x7f80);  // rounds up to inf
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  // A signalling-NaN payload that truncation would turn into inf stays NaN.
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(bits_to_float(0x7f800001u)))));
  // Subnormals.
  EXPECT_EQ(float_to_bf16(bits_to_float(0x00010000u)), 0x0001);
  EXPECT_EQ(float_to_bf16(bits_to_float(0x00008000u)), 0x0000);  // tie -> even
  EXPECT_EQ(float_to_bf16(bits_to_float(0x00018000u)), 0x0002);  // tie -> even
  EXPECT_EQ(bf16_to_float(0x0001), bits_to_float(0x00010000u));
}

// Independent RNE: pick the nearer of the two bf16 neighbours in double.
TEST(Numeric, Bf16MatchesDoubleReference) {
  for (std::uint64_t bits = 0; bits < 0x100000000ull; bits += 1009) {
    const float f = bits_to_float(static_cast<std::uint32_t>(bits));
    if (!std::isfinite(f)) continue;
    const std::uint32_t lo = static_cast<std::uint32_t>(bits) & 0xffff0000u;
    const double a = bits_to_float(lo);
    // The upper neighbour of the largest finite bf16 is 2^128 (which rounds to inf).
    const std::uint32_t up = lo + 0x10000u;
    const double b = (up & 0x7f800000u) == 0x7f800000u ? std::copysign(0x1p128, a)
                                                        : double(bits_to_float(up));
    const double da = std::fabs(double(f) - a), db = std::fabs(double(f) - b);
    std::uint16_t want = static_cast<std::uint16_t>(lo >> 16);
    if (db < da || (db == da && (want & 1u))) want = static_cast<std::uint16_t>((lo + 0x10000u) >> 16);
    ASSERT_EQ(float_to_bf16(f), want) << std::hex << bits;
  }
}

}  // namespace
}  // namespace orchard
