// The CPU backend's row keep-mask (backends/cpu/dropout_mask.h: scalar, eight Philox calls per
// AVX2 step, sixteen per AVX-512 step; each implementation this CPU has) against
// orchard/philox.h's scalar dropout_keep, element by element: starts at every residue of the
// 32-column block, lengths that end a step anywhere, rows of both halves of a call (row % 16
// below and from 8), thresholds at and between the extremes (0 keeps all, 256 drops all).
// The buffer is poisoned past n: nothing may be written there. The same for the two-row variant
// (dropout_keep_row_pair: rows r and r + 8, from the same calls when r % 16 < 8) and the row
// walk that pairs a block's rows (for_dropout_rows), and the block form (dropout_keep_block:
// two row pairs per AVX-512 step where a tile is at most 64 columns wide).
#include <gtest/gtest.h>

#include <cstdint>
#include <initializer_list>
#include <utility>
#include <vector>

#include "backends/cpu/dropout_mask.h"
#include "orchard/philox.h"

namespace orchard::test {
namespace {

using cpu::DropoutMaskIsa;

// Every (key, threshold, row, start, length) of the grid through `draw(seed, offset, bh, row, j0,
// n, thr)`, which returns how many rows did not match dropout_keep (or were written past n).
template <class Draw>
void over_grid(const char* name, const char* what, std::initializer_list<std::uint32_t> rows, Draw draw) {
  const std::pair<std::uint64_t, std::uint64_t> keys[] = {{0, 0}, {1234, 77}, {0x9E3779B97F4A7C15ull, 0x100000003ull}};
  const std::uint32_t thresholds[] = {0u, 1u, 26u, 128u, 255u, 256u};
  std::vector<std::int64_t> starts = {(1 << 20) + 2, (1 << 20) + 40, 100, 129};
  for (int s = 0; s < 40; ++s) starts.push_back(s);
  const int lengths[] = {1, 2, 3, 7, 8, 9, 16, 31, 32, 33, 63, 64, 65, 96, 127, 128, 129, 192, 200, 256, 1000};
  int mismatches = 0, cases = 0;
  [&] {
    for (const auto& [seed, offset] : keys)
      for (std::uint32_t thr : thresholds)
        for (std::uint32_t row : rows)
          for (std::int64_t j0 : starts)
            for (int n : lengths) {
              ++cases;
              mismatches += draw(seed, offset, static_cast<std::uint32_t>(seed % 7 + n), row, j0, n, thr);
              if (mismatches >= 5) return;  // the first five are reported
            }
  }();
  EXPECT_EQ(mismatches, 0) << name << ": " << mismatches << " wrong of the first " << cases << " " << what;
}

// Whether keep[0, n) is row `row`'s mask from column j0 and keep[n, n + 64) still holds `poison`;
// reports the first mismatch.
bool row_matches(const char* name, const std::vector<std::uint8_t>& keep, std::uint8_t poison, std::uint64_t seed,
                 std::uint64_t offset, std::uint32_t bh, std::uint32_t row, std::int64_t j0, int n, std::uint32_t thr) {
  for (int t = 0; t < n; ++t) {
    const bool want = dropout_keep(seed, offset, bh, row, static_cast<std::uint32_t>(j0 + t), thr);
    if (keep[t] != (want ? 1 : 0)) {
      ADD_FAILURE() << name << " seed " << seed << " offset " << offset << " thr " << thr << " row " << row
                    << " j0 " << j0 << " n " << n << " column " << t << ": " << int(keep[t]) << ", want " << want;
      return false;
    }
  }
  for (int t = n; t < n + 64; ++t)
    if (keep[t] != poison) {
      ADD_FAILURE() << name << " row " << row << " wrote past n = " << n << " at " << t;
      return false;
    }
  return true;
}

void check_isa(DropoutMaskIsa isa, const char* name) {
  if (!cpu::dropout_mask_isa_supported(isa)) GTEST_SKIP() << name << " not on this CPU";
  over_grid(name, "rows", {0, 7, 8, 15, 21, 1000},
            [&](std::uint64_t seed, std::uint64_t offset, std::uint32_t bh, std::uint32_t row, std::int64_t j0, int n,
                std::uint32_t thr) {
              std::vector<std::uint8_t> keep(n + 64, 0xAB);
              cpu::dropout_keep_row_isa(isa, seed, offset, bh, row, j0, n, thr, keep.data());
              return row_matches(name, keep, 0xAB, seed, offset, bh, row, j0, n, thr) ? 0 : 1;
            });
}

// Rows row_lo and row_lo + 8 at once, both against dropout_keep. Rows with row_lo % 16 < 8 (one
// set of calls) in both 16-row groups' low halves, near the 32-bit end too, and a few from 8 (the
// one-row-at-a-time path); both outputs poisoned past n.
void check_pair_isa(DropoutMaskIsa isa, const char* name) {
  if (!cpu::dropout_mask_isa_supported(isa)) GTEST_SKIP() << name << " not on this CPU";
  over_grid(name, "row pairs", {0, 3, 7, 16, 23, 992, 0xFFFFFFF7u, 8, 1000},
            [&](std::uint64_t seed, std::uint64_t offset, std::uint32_t bh, std::uint32_t row, std::int64_t j0, int n,
                std::uint32_t thr) {
              std::vector<std::uint8_t> lo(n + 64, 0xAB), hi(n + 64, 0xCD);
              cpu::dropout_keep_row_pair_isa(isa, seed, offset, bh, row, j0, n, thr, lo.data(), hi.data());
              const bool ok = row_matches(name, lo, 0xAB, seed, offset, bh, row, j0, n, thr) &&
                              row_matches(name, hi, 0xCD, seed, offset, bh, row + 8u, j0, n, thr);
              return ok ? 0 : 1;
            });
}

TEST(CpuDropoutMask, ScalarMatchesPhilox) { check_isa(DropoutMaskIsa::kScalar, "scalar"); }
TEST(CpuDropoutMask, Avx2MatchesPhilox) { check_isa(DropoutMaskIsa::kAvx2, "AVX2"); }
TEST(CpuDropoutMask, Avx512MatchesPhilox) { check_isa(DropoutMaskIsa::kAvx512, "AVX-512"); }

TEST(CpuDropoutMask, ScalarPairMatchesPhilox) { check_pair_isa(DropoutMaskIsa::kScalar, "scalar"); }
TEST(CpuDropoutMask, Avx2PairMatchesPhilox) { check_pair_isa(DropoutMaskIsa::kAvx2, "AVX2"); }
TEST(CpuDropoutMask, Avx512PairMatchesPhilox) { check_pair_isa(DropoutMaskIsa::kAvx512, "AVX-512"); }

// for_dropout_rows visits every row of a block once, pairing r with r + 8 exactly when
// (row0 + r) % 16 < 8 and r + 8 is in the block.
TEST(CpuDropoutMask, RowWalkCoversEachRowOnce) {
  for (std::uint32_t row0 : {0u, 1u, 5u, 8u, 13u, 16u, 100u, 0xFFFFFFF9u})
    for (int rows : {1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 64, 100}) {
      std::vector<int> seen(rows, 0);
      int last = -1;
      cpu::for_dropout_rows(row0, rows, [&](int r, bool paired) {
        ASSERT_GT(r, last) << row0 << " " << rows;
        last = r;
        const bool low = ((row0 + static_cast<std::uint32_t>(r)) % 16u) < 8u;
        EXPECT_EQ(paired, low && r + 8 < rows) << row0 << " " << rows << " " << r;
        ++seen[r];
        if (paired) ++seen[r + 8];
      });
      for (int r = 0; r < rows; ++r) EXPECT_EQ(seen[r], 1) << row0 << " " << rows << " " << r;
    }
}

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

TEST(CpuDropoutMask, DispatchPairMatchesPhilox) {
  const std::uint32_t thr = 77;
  for (std::uint32_t row : {5u, 13u})
    for (std::int64_t j0 : {0, 5, 64, 333})
      for (int n : {1, 50, 64, 128, 300}) {
        std::vector<std::uint8_t> lo(n), hi(n);
        cpu::dropout_keep_row_pair(42, 9, 3, row, j0, n, thr, lo.data(), hi.data());
        for (int t = 0; t < n; ++t) {
          const auto col = static_cast<std::uint32_t>(j0 + t);
          ASSERT_EQ(lo[t], dropout_keep(42, 9, 3, row, col, thr) ? 1 : 0) << row << " " << j0 << " " << n << " " << t;
          ASSERT_EQ(hi[t], dropout_keep(42, 9, 3, row + 8, col, thr) ? 1 : 0) << row << " " << j0 << " " << n << " " << t;
        }
      }
}

// dropout_keep_block (rows [0, rows) from dropout row row0, keep[r * ld + t]) against dropout_keep:
// blocks on and off the 16-row grid (odd pair counts leave a pair to draw alone), column spans
// inside one 64-column span from j0's 32-column block (two pairs per AVX-512 step) and past it;
// every byte outside the rows x n rectangle keeps its poison.
void check_block_isa(DropoutMaskIsa isa, const char* name) {
  if (!cpu::dropout_mask_isa_supported(isa)) GTEST_SKIP() << name << " not on this CPU";
  constexpr std::uint8_t kPoison = 0xAB;
  int bad = 0;
  for (auto [seed, offset] : {std::pair<std::uint64_t, std::uint64_t>{1234, 77}, {0x9E3779B97F4A7C15ull, 5}})
    for (std::uint32_t thr : {0u, 1u, 26u, 200u, 256u})
      for (std::uint32_t row0 : {0u, 3u, 8u, 16u, 37u, 0xFFFFFFC0u})
        for (int rows : {1, 8, 9, 16, 24, 32, 40, 64})
          for (std::int64_t j0 : {0, 1, 5, 31, 32, 64, 96, 1000})
            for (int n : {1, 7, 27, 32, 33, 63, 64, 65, 100, 128}) {
              const std::int64_t ld = n + 13;
              std::vector<std::uint8_t> keep(static_cast<std::size_t>(ld * rows + 64), kPoison);
              const auto bh = static_cast<std::uint32_t>(rows + n);
              cpu::dropout_keep_block_isa(isa, seed, offset, bh, row0, rows, j0, n, thr, keep.data(), ld);
              for (std::int64_t e = 0; e < std::int64_t(keep.size()) && bad < 5; ++e) {
                const std::int64_t r = e / ld, t = e % ld;
                std::uint8_t want = kPoison;
                if (r < rows && t < n)
                  want = dropout_keep(seed, offset, bh, row0 + static_cast<std::uint32_t>(r),
                                      static_cast<std::uint32_t>(j0 + t), thr) ? 1 : 0;
                if (keep[e] == want) continue;
                ++bad;
                ADD_FAILURE() << name << ": seed " << seed << " thr " << thr << " row0 "
                              << row0 << " rows " << rows << " j0 " << j0 << " n " << n << " at row " << r
                              << " column " << t << ": " << int(keep[e]) << ", want " << int(want);
              }
              if (bad >= 5) return;
            }
}

TEST(CpuDropoutMask, ScalarBlockMatchesPhilox) { check_block_isa(DropoutMaskIsa::kScalar, "scalar"); }
TEST(CpuDropoutMask, Avx2BlockMatchesPhilox) { check_block_isa(DropoutMaskIsa::kAvx2, "AVX2"); }
TEST(CpuDropoutMask, Avx512BlockMatchesPhilox) { check_block_isa(DropoutMaskIsa::kAvx512, "AVX-512"); }

}  // namespace
}  // namespace orchard::test
