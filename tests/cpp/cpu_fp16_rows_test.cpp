// fp16_rows (the CPU kernels' fp16 loads and stores) against numeric.h's scalar conversions:
// every fp16 bit pattern widened exactly; fp32 -> fp16 bit for bit on random values, rounding
// ties, fp16 subnormals, overflow to inf and +-inf, a NaN staying a NaN; row lengths that leave
// a partial 8-lane group (nothing written past n).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "backends/cpu/fp16_rows.h"
#include "orchard/numeric.h"

namespace orchard::cpu {
namespace {

TEST(CpuFp16Rows, WidensEveryFp16Value) {
  std::vector<std::uint16_t> src(65536);
  for (int i = 0; i < 65536; ++i) src[i] = static_cast<std::uint16_t>(i);
  std::vector<float> got(65536 + 8, 123.f);
  fp16_row_to_float(src.data(), 65536 - 3, got.data());  // a partial last group
  for (int i = 0; i < 65536 - 3; ++i) {
    const float want = fp16_to_float(src[i]);
    if (std::isnan(want))
      ASSERT_TRUE(std::isnan(got[i])) << "bits " << i;
    else
      ASSERT_EQ(float_to_bits(got[i]), float_to_bits(want)) << "bits " << i;
  }
  for (int i = 65536 - 3; i < 65536 + 8; ++i) ASSERT_EQ(got[i], 123.f) << "wrote past n";
}

TEST(CpuFp16Rows, NarrowsAsFloatToFp16) {
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.f, 4.f);
  std::uniform_int_distribution<std::uint32_t> bits(0, 0xffffffffu);
  std::vector<float> src;
  for (int i = 0; i < 300; ++i) src.push_back(nd(rng));
  for (int i = 0; i < 300; ++i) src.push_back(bits_to_float(bits(rng)));  // every exponent, NaNs included
  // Ties (fp16 has 10 mantissa bits: bit 12 of an fp32 mantissa is the half), fp16 subnormal
  // ties, the overflow edge 65520, +-inf, +-0, fp32 subnormals, a NaN with payload.
  for (std::uint32_t b : {0x3f801000u, 0x3f803000u, 0xbf801000u, 0x33800000u, 0x33c00000u, 0x34200000u,
                          0x477fe000u, 0x477ff000u, 0x477fefffu, 0x7f800000u, 0xff800000u, 0x00000000u,
                          0x80000000u, 0x00000001u, 0x7fc00000u, 0x7fa00001u, 0x387fe000u, 0x38800000u})
    src.push_back(bits_to_float(b));
  for (float mul : {1.f, 0.37f, 1.0e5f}) {
    for (int n : {1, 7, 8, 9, 64, 100, int(src.size())}) {
      std::vector<std::uint16_t> got(n + 8, 0xABCD);
      const float* s = src.data() + src.size() - n;
      float_row_to_fp16(s, mul, n, got.data());
      for (int i = 0; i < n; ++i) {
        const std::uint16_t want = float_to_fp16(s[i] * mul);
        const bool nan = (want & 0x7c00u) == 0x7c00u && (want & 0x3ffu) != 0;
        if (nan)
          ASSERT_TRUE((got[i] & 0x7c00u) == 0x7c00u && (got[i] & 0x3ffu) != 0) << "n " << n << " i " << i;
        else
          ASSERT_EQ(got[i], want) << "n " << n << " i " << i << " x " << s[i] << " mul " << mul;
      }
      for (int i = n; i < n + 8; ++i) ASSERT_EQ(got[i], 0xABCD) << "wrote past n = " << n;
    }
  }
}

}  // namespace
}  // namespace orchard::cpu
