// The swizzled tile layout of the streamed tiles (src/backends/cuda/sm80/swizzled_tile.h),
// checked on the host: every chunk of a tile has its own 16-byte slot, the 8 rows
// one ldmatrix phase reads land in 8 distinct bank groups, a warp's cp.async rows
// fill whole 128-byte lines, and the per-lane XOR shortcut the kernel uses reaches
// the same slot as the full offset for each fragment pattern it reads.
#include <gtest/gtest.h>

#include <set>
#include <vector>

#include "backends/cuda/sm80/swizzled_tile.h"

namespace orchard::cuda {
namespace {

template <int kRows, int kD>
void check_bijection() {
  using Tile = SwizzledTile<kRows, kD>;
  std::vector<int> hits(Tile::kBytes / 16, 0);
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kD / 8; ++c) {
      const uint32_t off = Tile::offset(r, c);
      ASSERT_EQ(off % 16, 0u);
      ASSERT_LT(off, static_cast<uint32_t>(Tile::kBytes));
      ++hits[off / 16];
    }
  for (int h : hits) ASSERT_EQ(h, 1);
}

TEST(SwizzledTile, EveryChunkHasItsOwnSlot) {
  check_bijection<64, 128>();
  check_bijection<128, 64>();
  check_bijection<64, 64>();
}

template <int kRows, int kD>
void check_ldmatrix_phases_conflict_free() {
  using Tile = SwizzledTile<kRows, kD>;
  for (int r0 = 0; r0 < kRows; r0 += 8)
    for (int c = 0; c < kD / 8; ++c) {
      std::set<uint32_t> groups;  // 16-byte bank group = bits 4-6 of the byte address
      for (int i = 0; i < 8; ++i) groups.insert((Tile::offset(r0 + i, c) >> 4) & 7);
      ASSERT_EQ(groups.size(), 8u) << "rows " << r0 << "+, chunk " << c;
    }
}

TEST(SwizzledTile, LdmatrixPhasesAreConflictFree) {
  check_ldmatrix_phases_conflict_free<64, 128>();
  check_ldmatrix_phases_conflict_free<128, 64>();
}

// 8 consecutive threads copy the 8 chunks of one row's 64-column block: they must
// fill exactly one 128-byte-aligned line (the point of the layout).
TEST(SwizzledTile, EachRowBlockIsOneAlignedLine) {
  using Tile = SwizzledTile<64, 128>;
  for (int r = 0; r < 64; ++r)
    for (int blk = 0; blk < 2; ++blk) {
      std::set<uint32_t> lines, slots;
      for (int c = 8 * blk; c < 8 * blk + 8; ++c) {
        lines.insert(Tile::offset(r, c) / 128);
        slots.insert(Tile::offset(r, c));
      }
      ASSERT_EQ(lines.size(), 1u);
      ASSERT_EQ(slots.size(), 8u);
    }
}

// The fragment patterns the kernels read (TileOperand): the lane offsets the
// kernels use (nk_lane_offset / kn_lane_offset) against ldmatrix's lane rows and
// chunks written out here, at the origin, then rows + 16 m and chunks + 2 j.
template <int kRows, int kD>
void check_fragment_shortcut(int origin_chunk, int max_j, bool nk_pattern) {
  using Tile = SwizzledTile<kRows, kD>;
  for (int lane = 0; lane < 32; ++lane) {
    const int row = nk_pattern ? (lane % 8) + (lane / 16) * 8 : (lane % 8) + ((lane / 8) % 2) * 8;
    const int chunk = origin_chunk + (nk_pattern ? (lane / 8) % 2 : lane / 16);
    for (int row0 = 0; row0 + 16 <= kRows; row0 += 16) {
      // kn_lane_offset takes a column origin; rows add 128 bytes each.
      const uint32_t lane_off = nk_pattern ? Tile::nk_lane_offset(lane, row0)
                                           : Tile::kn_lane_offset(lane, 8 * origin_chunk) + 128 * row0;
      ASSERT_EQ(lane_off, Tile::offset(row0 + row, chunk)) << "lane " << lane << " row0 " << row0;
      for (int m = 0; row0 + 16 * m + 16 <= kRows; ++m)
        for (int j = 0; j < max_j; ++j)
          ASSERT_EQ(Tile::fragment(lane_off, 16 * m, j), Tile::offset(row0 + 16 * m + row, chunk + 2 * j))
              << "lane " << lane << " row0 " << row0 << " m " << m << " j " << j;
    }
  }
}

// Whether the shortcut holds for every lane of warps reading [k][n] from columns w * cols (w < warps)
// over (cols / 8 + 1) / 2 steps: brute force, for swizzled_kn_columns_ok to be checked against.
template <int kRows, int kD>
bool kn_shortcut_holds(int cols, int warps) {
  using Tile = SwizzledTile<kRows, kD>;
  for (int w = 0; w < warps; ++w)
    for (int lane = 0; lane < 32; ++lane) {
      const int origin_chunk = w * cols / 8;
      const uint32_t lane_off = Tile::kn_lane_offset(lane, 8 * origin_chunk);
      const int row = (lane % 8) + ((lane / 8) % 2) * 8, chunk = origin_chunk + lane / 16;
      for (int j = 0; j < (cols / 8 + 1) / 2; ++j)
        if (Tile::fragment(lane_off, 0, j) != Tile::offset(row, chunk + 2 * j)) return false;
    }
  return true;
}

TEST(SwizzledTile, KnColumnRuleMatchesBruteForce) {
  // The one-pass backward's dV / dK column split (BwdConfig2: kD / kWQ columns over kWQ warps):
  // d64 32 x 2, d128 64 x 2, d192 48 x 4 (the rule fails: session 54's knob gave other bytes), d256 64 x 4.
  EXPECT_EQ((kn_shortcut_holds<64, 64>(32, 2)), swizzled_kn_columns_ok(32, 2));
  EXPECT_EQ((kn_shortcut_holds<64, 128>(64, 2)), swizzled_kn_columns_ok(64, 2));
  EXPECT_EQ((kn_shortcut_holds<64, 192>(48, 4)), swizzled_kn_columns_ok(48, 4));
  EXPECT_EQ((kn_shortcut_holds<64, 256>(64, 4)), swizzled_kn_columns_ok(64, 4));
  EXPECT_TRUE(swizzled_kn_columns_ok(32, 2) && swizzled_kn_columns_ok(64, 2) && swizzled_kn_columns_ok(64, 4));
  EXPECT_FALSE(swizzled_kn_columns_ok(48, 4));
}

TEST(SwizzledTile, FragmentShortcutMatchesTheOffset) {
  // S / dP GEMMs read Q / dO as [n][k]: chunk 0 origin, j = k-step over the head dim.
  check_fragment_shortcut<64, 128>(0, 128 / 16, true);
  check_fragment_shortcut<128, 64>(0, 64 / 16, true);
  // dV / dK GEMMs read them as [k][n] from column dcol = 0 or kD / 2, j = 0 .. kD / 32 - 1.
  for (int half : {0, 1}) {
    check_fragment_shortcut<64, 128>(half * 128 / 16, 128 / 32, false);
    check_fragment_shortcut<128, 64>(half * 64 / 16, 64 / 32, false);
  }
  // The forward reads 32-row (d128) / 64-row (d64) K tiles as [n][k] and V tiles
  // as [k][n] from column 0 over the whole head dim (j = 0 .. kD / 16 - 1).
  check_fragment_shortcut<32, 128>(0, 128 / 16, true);
  check_fragment_shortcut<32, 128>(0, 128 / 16, false);
  check_fragment_shortcut<64, 64>(0, 64 / 16, true);
  check_fragment_shortcut<64, 64>(0, 64 / 16, false);
  // ORCHARD_SM80_SWIZZLE_WIDE: the d192 forward's 64-row K / V tiles, the d256 forward's 32-row
  // ones and the d256 backward's 64-row Q / dO tiles (dV / dK from columns 0, 64, 128, 192).
  check_fragment_shortcut<64, 192>(0, 192 / 16, true);
  check_fragment_shortcut<64, 192>(0, 192 / 16, false);
  check_fragment_shortcut<32, 256>(0, 256 / 16, true);
  check_fragment_shortcut<32, 256>(0, 256 / 16, false);
  check_fragment_shortcut<64, 256>(0, 256 / 16, true);
  for (int quarter = 0; quarter < 4; ++quarter) check_fragment_shortcut<64, 256>(quarter * 64 / 8, 64 / 16, false);
}

}  // namespace
}  // namespace orchard::cuda
