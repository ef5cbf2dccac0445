// The CPU backend's row keep-mask (backends/cpu/dropout_mask.h: sixteen or eight Philox counters
// per vector step, per the CPU) against orchard/philox.h's scalar dropout_keep, element by
// element, over lengths that leave every remainder, unaligned column offsets, and thresholds
// at and between the extremes. The buffer is poisoned past n: nothing may be written there.
// The vector path tested is the one this CPU takes (ORCHARD_CPU_DROPOUT512=0 forces AVX2).
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "backends/cpu/dropout_mask.h"
#include "orchard/philox.h"

namespace orchard::test {
namespace {

TEST(CpuDropoutMask, MatchesScalarPhilox) {
  const std::uint64_t seeds[] = {0, 1234, 0x9E3779B97F4A7C15ull};
  const std::uint64_t offsets[] = {0, 77, 0x100000003ull};
  const std::uint32_t thresholds[] = {0u, 1u, dropout_keep_threshold(0.1f), dropout_keep_threshold(0.5f),
                                      dropout_keep_threshold(0.9f), 0xFFFFFFFFu};
  const std::int64_t starts[] = {0, 1, 3, 4, 60, 64, (1 << 20) + 2};
  const int lengths[] = {1, 3, 4, 31, 32, 63, 64, 65, 127, 128, 200, 1000};
  int mismatches = 0, cases = 0;
  for (std::uint64_t seed : seeds)
    for (std::uint64_t offset : offsets)
      for (std::uint32_t thr : thresholds)
        for (std::int64_t j0 : starts)
          for (int n : lengths) {
            const std::uint32_t bh = static_cast<std::uint32_t>(seed % 7 + n), row = static_cast<std::uint32_t>(j0 % 5 + 3);
            std::vector<std::uint8_t> keep(n + 64, 0xAB);
            cpu::dropout_keep_row(seed, offset, bh, row, j0, n, thr, keep.data());
            ++cases;
            for (int t = 0; t < n; ++t) {
              const bool want = dropout_keep(seed, offset, bh, row, static_cast<std::uint32_t>(j0 + t), thr);
              if (keep[t] != (want ? 1 : 0) && ++mismatches <= 5)
                ADD_FAILURE() << "seed " << seed << " offset " << offset << " thr " << thr << " j0 " << j0 << " n " << n
                              << " column " << t << ": " << int(keep[t]) << ", want " << want;
            }
            for (int t = n; t < n + 64; ++t)
              if (keep[t] != 0xAB && ++mismatches <= 5) ADD_FAILURE() << "wrote past n = " << n << " at " << t;
          }
  EXPECT_EQ(mismatches, 0) << "of " << cases << " rows";
}

}  // namespace
}  // namespace orchard::test
