// The CUDA backward's dq_accum layout (src/backends/cuda/launch.h), checked on the
// host: every (row, col) of a slab has exactly one slot, each lane's 4 values of a
// 16x8 tile are contiguous, and the constant tile strides the dK/dV kernel adds to
// one per-step pointer reach the same slots as the full offset computation.
#include <gtest/gtest.h>

#include <vector>

#include "backends/cuda/launch.h"

namespace orchard::cuda {
namespace {

TEST(DqAccumLayout, EveryElementHasOneSlot) {
  for (int d : {8, 24, 64, 96, 128, 136, 256})
    for (int sq : {1, 15, 16, 17, 130}) {
      const int rows = dq_accum_rows(sq);
      std::vector<int> hits(static_cast<std::size_t>(rows) * d, 0);
      for (int row16 = 0; row16 < rows; row16 += 16)
        for (int col8 = 0; col8 < d; col8 += 8)
          for (int lane = 0; lane < 32; ++lane) {
            const std::int64_t off = dq_accum_tile_offset(row16, col8, d, lane);
            ASSERT_EQ(off % 4, 0);
            for (int v = 0; v < 4; ++v) {
              ASSERT_LT(off + v, static_cast<std::int64_t>(hits.size()));
              ++hits[static_cast<std::size_t>(off + v)];
            }
          }
      for (int h : hits) ASSERT_EQ(h, 1) << "d=" << d << " sq=" << sq;
    }
}

TEST(DqAccumLayout, TileStridesMatchTheFullOffset) {
  for (int d : {8, 64, 96, 128, 160, 256})
    for (int row16 = 0; row16 < 256; row16 += 16)
      for (int col8 = 0; col8 < d; col8 += 8)
        for (int lane = 0; lane < 32; ++lane) {
          const std::int64_t base = dq_accum_tile_offset(row16, col8, d, lane);
          for (int r = 0; r < 3; ++r)
            for (int c = 0; col8 + 8 * c < d; ++c)
              ASSERT_EQ(dq_accum_tile_offset(row16 + 16 * r, col8 + 8 * c, d, lane),
                        base + r * dq_accum_row_tile_stride(d) + c * kDqAccumColTileStride)
                  << "d=" << d << " row16=" << row16 << " col8=" << col8 << " lane=" << lane;
        }
}

}  // namespace
}  // namespace orchard::cuda
