// The CPU backend's row keep-mask (backends/cpu/dropout_mask.h: scalar, eight Philox calls per
// AVX2 step, sixteen per AVX-512 step; each implementation this CPU has) against
// orchard/philox.h's scalar dropout_keep, element by element: starts at every residue of the
// 32-column block, lengths that end a step anywhere, rows of both halves of a call (row % 16
// below and from 8), thresholds at and between the extremes (0 keeps all, 256 drops all).
// The buffer is poisoned past n: nothing may be written there.
#include <gtest/gtest.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "backends/cpu/dropout_mask.h"
#include "orchard/philox.h"

namespace orchard::test {
namespace {

using cpu::DropoutMaskIsa;

void check_isa(DropoutMaskIsa isa, const char* name) {
  if (!cpu::dropout_mask_isa_supported(isa)) GTEST_SKIP() << name << " not on this CPU";
  const std::pair<std::uint64_t, std::uint64_t> keys[] = {{0, 0}, {1234, 77}, {0x9E3779B97F4A7C15ull, 0x100000003ull}};
  const std::uint32_t thresholds[] = {0u, 1u, 26u, 128u, 255u, 256u};
  const std::uint32_t rows[] = {0, 7, 8, 15, 21, 1000};
  std::vector<std::int64_t> starts = {(1 << 20) + 2, (1 << 20) + 40, 100, 129};
  for (int s = 0; s < 40; ++s) starts.push_back(s);
  const int lengths[] = {1, 2, 3, 7, 8, 9, 16, 31, 32, 33, 63, 64, 65, 96, 127, 128, 129, 192, 200, 256, 1000};
  int mismatches = 0, cases = 0;
  for (const auto& [seed, offset] : keys)
    for (std::uint32_t thr : thresholds)
      for (std::uint32_t row : rows)
        for (std::int64_t j0 : starts)
          for (int n : lengths) {
            const auto bh = static_cast<std::uint32_t>(seed % 7 + n);
            std::vector<std::uint8_t> keep(n + 64, 0xAB);
            cpu::dropout_keep_row_isa(isa, seed, offset, bh, row, j0, n, thr, keep.data());
            ++cases;
            for (int t = 0; t < n; ++t) {
              const bool want = dropout_keep(seed, offset, bh, row, static_cast<std::uint32_t>(j0 + t), thr);
              if (keep[t] != (want ? 1 : 0) && ++mismatches <= 5)
                ADD_FAILURE() << name << " seed " << seed << " offset " << offset << " thr " << thr << " row "
                              << row << " j0 " << j0 << " n " << n << " column " << t << ": " << int(keep[t])
                              << ", want " << want;
            }
            for (int t = n; t < n + 64; ++t)
              if (keep[t] != 0xAB && ++mismatches <= 5)
                ADD_FAILURE() << name << " wrote past n = " << n << " at " << t;
          }
  EXPECT_EQ(mismatches, 0) << "of " << cases << " rows";
}

TEST(CpuDropoutMask, ScalarMatchesPhilox) { check_isa(DropoutMaskIsa::kScalar, "scalar"); }
TEST(CpuDropoutMask, Avx2MatchesPhilox) { check_isa(DropoutMaskIsa::kAvx2, "AVX2"); }
TEST(CpuDropoutMask, Avx512MatchesPhilox) { check_isa(DropoutMaskIsa::kAvx512, "AVX-512"); }

// The dispatching entry point (the widest this CPU has, ORCHARD_CPU_DROPOUT512 honoured).
TEST(CpuDropoutMask, DispatchMatchesPhilox) {
  const std::uint32_t thr = 77;
  for (std::int64_t j0 : {0, 5, 64, 333})
    for (int n : {1, 50, 64, 128, 300}) {
      std::vector<std::uint8_t> keep(n);
      cpu::dropout_keep_row(42, 9, 3, 13, j0, n, thr, keep.data());
      for (int t = 0; t < n; ++t)
        ASSERT_EQ(keep[t], dropout_keep(42, 9, 3, 13, static_cast<std::uint32_t>(j0 + t), thr) ? 1 : 0)
            << j0 << " " << n << " " << t;
    }
}

}  // namespace
}  // namespace orchard::test
