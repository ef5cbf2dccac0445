// store_row_bf16 (the bf16 forward's output rows) against float_to_bf16 bit for bit: random
// values, rounding ties, NaN (quieted), +-inf, denormals (kept), overflow to inf, and row
// lengths that leave a partial 16-lane group (the store must not write past d).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "backends/cpu/store_row_bf16.h"
#include "orchard/numeric.h"

namespace orchard::cpu {
namespace {

TEST(CpuStoreRowBf16, MatchesFloatToBf16BitForBit) {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.f, 3.f);
  std::vector<float> src;
  for (int i = 0; i < 200; ++i) src.push_back(nd(rng));
  for (std::uint32_t bits : {0x3f808000u, 0x3f818000u, 0xbf808000u, 0x3f807fffu, 0x7fc00001u, 0x7f800001u,
                             0xffa00000u, 0x7f800000u, 0xff800000u, 0x00000001u, 0x80400000u, 0x007fffffu,
                             0x7f7fffffu, 0x00000000u, 0x80000000u})
    src.push_back(bits_to_float(bits));
  for (float mul : {1.f, 0.37f, 3.0e38f}) {
    for (int d : {1, 15, 16, 17, 64, 72, 100, int(src.size())}) {
      std::vector<std::uint16_t> got(d + 8, 0xABCD);
      store_row_bf16(src.data() + src.size() - d, mul, d, got.data());
      for (int i = 0; i < d; ++i) {
        const float x = src[src.size() - d + i];
        ASSERT_EQ(got[i], float_to_bf16(x * mul)) << "d " << d << " i " << i << " x " << x << " mul " << mul;
      }
      for (int i = d; i < d + 8; ++i) ASSERT_EQ(got[i], 0xABCD) << "wrote past d = " << d;
    }
  }
}

}  // namespace
}  // namespace orchard::cpu
