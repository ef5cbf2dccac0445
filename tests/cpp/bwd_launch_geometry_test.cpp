// The backward's launch geometry (src/backends/cuda/launch.h), checked on the
// host. The causal dK/dV kernel's CTA order: every (head, key block) gets exactly
// one CTA, including a last group smaller than the others, every head's key block
// n runs before any block n + 1 of its group, and the group size keeps Q and dO
// within the 16 MB budget. The D kernel's lanes per row cover the row in aligned
// power-of-two groups of a warp.
#include <gtest/gtest.h>

#include <vector>

#include "backends/cuda/launch.h"

namespace orchard::cuda {
namespace {

TEST(CausalCtaOrder, EveryHeadAndKeyBlockExactlyOnce) {
  for (int64_t heads : {1, 2, 5, 7, 16})
    for (int nb : {1, 3, 16})
      for (int group = 1; group <= heads; ++group) {
        std::vector<int> hits(static_cast<std::size_t>(heads * nb), 0);
        for (int64_t cta = 0; cta < heads * nb; ++cta) {
          const CtaCoord c = causal_cta_coord(cta, nb, group, heads);
          ASSERT_GE(c.head, 0);
          ASSERT_LT(c.head, heads);
          ASSERT_GE(c.n_block, 0);
          ASSERT_LT(c.n_block, nb);
          ++hits[static_cast<std::size_t>(c.head * nb + c.n_block)];
        }
        for (int h : hits) ASSERT_EQ(h, 1) << "heads=" << heads << " nb=" << nb << " group=" << group;
      }
}

TEST(CausalCtaOrder, HeavierKeyBlocksFirstWithinEachGroup) {
  const int64_t heads = 7;
  const int nb = 4, group = 3;  // groups of 3, 3 and 1 heads
  int64_t last_group = -1;
  int last_n = 0;
  for (int64_t cta = 0; cta < heads * nb; ++cta) {
    const CtaCoord c = causal_cta_coord(cta, nb, group, heads);
    const int64_t g = c.head / group;
    if (g != last_group) {
      ASSERT_EQ(g, last_group + 1);  // groups run one after another
      ASSERT_EQ(c.n_block, 0);
      last_group = g;
    } else {
      ASSERT_GE(c.n_block, last_n);  // n_block never decreases inside a group
    }
    last_n = c.n_block;
  }
}

TEST(CausalCtaOrder, GroupKeepsQAndDOWithinBudget) {
  BwdParams p;
  p.b = 8;
  p.hq = 16;
  p.hkv = 4;  // GQA: 4 q heads per kv head
  p.d = 128;
  for (int sq : {1, 512, 2048, 16384, 131072}) {
    p.sq = sq;
    const int group = causal_head_group(p);
    const int64_t bytes = int64_t{group} * (p.hq / p.hkv) * sq * p.d * 2 * 2;
    EXPECT_GE(group, 1);
    EXPECT_LE(group, p.b * p.hkv);
    if (group > 1) EXPECT_LE(bytes, int64_t{16} << 20) << "sq=" << sq;
  }
}

TEST(BwdDotLanes, CoverEachRowInAlignedGroups) {
  for (int d = 8; d <= 256; d += 8) {
    const int lanes = bwd_dot_lanes(d);
    EXPECT_GE(lanes * 8, d) << "d=" << d;               // one 16-byte chunk per lane covers the row
    EXPECT_EQ(lanes & (lanes - 1), 0) << "d=" << d;     // power of two: xor shuffles stay in the group
    EXPECT_EQ(32 % lanes, 0) << "d=" << d;              // groups never straddle a warp
    EXPECT_EQ(256 % lanes, 0) << "d=" << d;             // whole rows per 256-thread block
  }
}

}  // namespace
}  // namespace orchard::cuda
