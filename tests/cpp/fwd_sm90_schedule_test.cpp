// The persistent sm90 forward's tile schedule (src/backends/cuda/sm90/fwd_sm90_schedule.h),
// checked on the host: over all the CTAs' strides every (m block, (b, h)) runs exactly once,
// phantom indices only stand in for the missing half of an odd m-block count, and in the
// causal (paired) order each stride unit is one head's long and short m block whose lengths
// add up to the same total for every full pair.  Also the per-WG causal skip's tile count.
#include "backends/cuda/sm90/fwd_sm90_schedule.h"

#include <gtest/gtest.h>

#include <utility>
#include <vector>

namespace orchard::sm90 {
namespace {

struct TileRun {
  int m_block, hb, cta;
};

std::vector<TileRun> walk(const FwdSm90Sched& sc, int grid, bool causal, bool paired) {
  std::vector<TileRun> runs;
  for (int cta = 0; cta < grid; ++cta)
    for (int idx = fwd_sm90_first(paired, cta); idx < sc.total; idx = fwd_sm90_next(paired, idx, grid)) {
      const FwdSm90Coord c = fwd_sm90_decode(idx, sc.num_m_blocks, sc.num_hb, sc.section, paired, causal);
      runs.push_back({c.m_block, c.hb, cta});
    }
  return runs;
}

TEST(FwdSm90Schedule, EveryTileExactlyOnce) {
  // (causal, paired): not causal, causal in the plain order, causal in the paired order
  for (auto [causal, paired] : {std::pair{false, false}, std::pair{true, false}, std::pair{true, true}})
    for (int nm : {1, 2, 3, 7, 8, 43})
      for (int num_hb : {1, 5, 16, 64})
        for (int section : {1, 3, 8, 64})
          for (int grid : {1, 7, 132}) {
            if (section > num_hb) continue;
            FwdSm90Sched sc{nm, num_hb, section, 0};
            sc.total = static_cast<int>(fwd_sm90_total(nm, num_hb, paired));
            std::vector<int> hits(static_cast<std::size_t>(nm * num_hb), 0);
            int phantoms = 0;
            for (const TileRun& r : walk(sc, grid, causal, paired)) {
              ASSERT_GE(r.hb, 0);
              ASSERT_LT(r.hb, num_hb);
              if (r.m_block < 0) {
                ++phantoms;
                continue;
              }
              ASSERT_LT(r.m_block, nm);
              ++hits[static_cast<std::size_t>(r.hb * nm + r.m_block)];
            }
            for (int h : hits)
              ASSERT_EQ(h, 1) << "causal=" << causal << " paired=" << paired << " nm=" << nm << " hb=" << num_hb
                              << " section=" << section << " grid=" << grid;
            ASSERT_EQ(phantoms, paired && nm % 2 == 1 ? num_hb : 0);
          }
}

TEST(FwdSm90Schedule, CausalUnitsPairALongAndAShortTileOfOneHead) {
  for (int nm : {2, 6, 9, 43}) {
    const int num_hb = 12, section = 4;
    for (int u = 0; 2 * u < static_cast<int>(fwd_sm90_total(nm, num_hb, true)); ++u) {
      const FwdSm90Coord a = fwd_sm90_decode(2 * u, nm, num_hb, section, true, true);
      const FwdSm90Coord b = fwd_sm90_decode(2 * u + 1, nm, num_hb, section, true, true);
      ASSERT_EQ(a.hb, b.hb);
      if (b.m_block < 0) {
        ASSERT_EQ(nm % 2, 1);
        ASSERT_EQ(a.m_block, 0);  // an odd count's cheapest block runs alone
        continue;
      }
      // The m blocks' lengths (m + 1 key blocks when sq == sk) add up to the same for every pair.
      ASSERT_EQ(a.m_block + b.m_block, nm - 1 + nm % 2) << "nm=" << nm << " u=" << u;
      ASSERT_GT(a.m_block, b.m_block);  // the long tile first
    }
  }
}

TEST(FwdSm90Schedule, NotCausalKeepsTheHeadMajorStride) {
  FwdSm90Sched sc{5, 3, 1, 15};
  for (int idx = 0; idx < sc.total; ++idx) {
    const FwdSm90Coord c = fwd_sm90_decode(idx, sc.num_m_blocks, sc.num_hb, sc.section, false, false);
    ASSERT_EQ(c.m_block, idx % 5);
    ASSERT_EQ(c.hb, idx / 5);
  }
  ASSERT_EQ(fwd_sm90_next(false, 4, 132), 136);
}

// The per-WG skip (fwd_sm90_wg_hidden_tiles) against the mask itself: over tile shapes, causal
// and not, diagonal offsets (sq < sk, sq > sk), ragged key ends, windows' first key tiles and the
// call's row count (rows past it are phantoms that see nothing), the count is exactly the run of
// leading key tiles (from n_end - 1 down) in which no element of the WG's real rows is visible,
// capped so that one tile runs; and no skipped tile holds a visible element.
TEST(FwdSm90Schedule, WgHiddenTilesAreExactlyTheLeadingInvisibleOnes) {
  constexpr long long kNoRowEnd = INT64_MAX;
  for (bool causal : {true, false})
    for (int block_m : {128, 192})
      for (int block_n : {64, 80, 96, 128, 192})
        for (long long coff : {-500LL, -130LL, -64LL, -1LL, 0LL, 1LL, 63LL, 77LL, 300LL})
          for (int sk : {1, 100, 777, 2048})
            for (long long rows_end : {kNoRowEnd, 1LL, 64LL, 100LL, 777LL, 1000LL, 1152LL})
              for (int m_block = 0; m_block < 12; ++m_block)
                for (int n_begin : {0, 1, 3})
                  for (int wg = 0; wg < block_m / 64; ++wg) {
                    // The tile's key tiles as the kernel decodes them (fwd_sm90_tile).
                    const long long last = static_cast<long long>(m_block) * block_m + block_m - 1 + coff + 1;
                    const int key_end = !causal ? sk : last < 0 ? 0 : (last < sk ? static_cast<int>(last) : sk);
                    const int n_end = (key_end + block_n - 1) / block_n;
                    if (n_begin >= n_end) continue;
                    const long long r_lo = static_cast<long long>(m_block) * block_m + 64 * wg;
                    const long long r_hi = r_lo + 64 < rows_end ? r_lo + 64 : rows_end;
                    auto visible = [&](int n) {  // some (real row, key) of the WG's in key tile n
                      for (long long r = r_lo; r < r_hi; ++r)
                        for (int c = n * block_n; c < (n + 1) * block_n && c < sk; ++c)
                          if (!causal || c <= r + coff) return true;
                      return false;
                    };
                    int expect = 0;
                    while (expect < n_end - n_begin - 1 && !visible(n_end - 1 - expect)) ++expect;
                    const int got =
                        fwd_sm90_wg_hidden_tiles(m_block, block_m, wg, block_n, causal, coff, rows_end, n_begin, n_end);
                    ASSERT_EQ(got, expect) << (causal ? "causal " : "full ") << "block " << block_m << "x" << block_n
                                           << " coff " << coff << " sk " << sk << " rows " << rows_end << " m "
                                           << m_block << " n [" << n_begin << ", " << n_end << ") wg " << wg;
                  }
}

}  // namespace
}  // namespace orchard::sm90
