// stage_kt_pairs_bf16 / stage_v_pairs_bf16 (the bf16 forward's and, for K^T / V^T, the bf16
// backward's staging, backends/cpu/stage_bf16_panels.h) against tile_load.h's load_pairs_kt_bf16 /
// load_pairs_rows_bf16 bit for bit: the panel widths the kernels use (32 on AMX, 64 on
// vdpbf16ps, the whole tile in the backward), head dims on and off the AVX-512 paths' multiple of
// 32, fewer rows than rows_pad, strided rows, and a destination poisoned first.
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <vector>

#include "backends/cpu/stage_bf16_panels.h"
#include "backends/cpu/tile_load.h"

namespace orchard::cpu {
namespace {

std::vector<std::uint16_t> random_rows(int rows, std::int64_t row_stride, std::int64_t offset, unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<std::uint16_t> v(offset + std::size_t(std::max(rows, 1)) * row_stride + 32);
  for (auto& x : v) x = static_cast<std::uint16_t>(rng());
  return v;
}

TEST(CpuStageBf16Panels, KtMatchesLoadPairsKtBitForBit) {
  for (int block : {64, 256})
    for (int panel : {32, 64, block})
      for (int d : {16, 32, 40, 64, 128})
        for (int rows : {block, block - 1, block - 17, 1, 0}) {
          if (block % panel != 0) continue;
          const int dpad = (d + 15) / 16 * 16, rows_pad = block;
          const std::int64_t row_stride = d + 6, offset = 5;
          const auto src = random_rows(rows, row_stride, offset, static_cast<unsigned>(block + panel + d + rows));
          std::vector<std::uint16_t> want(std::size_t(rows_pad) * dpad, 0xBADD), got(want.size(), 0xF00D);
          load_pairs_kt_bf16(src.data(), offset, row_stride, rows, rows_pad, d, dpad, block, want.data(), panel);
          stage_kt_pairs_bf16(src.data(), offset, row_stride, rows, rows_pad, d, dpad, block, got.data(), panel);
          ASSERT_EQ(got, want) << "block " << block << " panel " << panel << " d " << d << " rows " << rows;
        }
}

TEST(CpuStageBf16Panels, VMatchesLoadPairsRowsBitForBit) {
  for (int block : {64, 256})
    for (int d : {16, 32, 40, 64, 128})
      for (int panel : {32, 64, 0})  // 0: the whole row, the plain layout
        for (int rows : {2 * block, 2 * block - 1, block + 3, 1, 0}) {
          const int dpad = (d + 15) / 16 * 16, rows_pad = 2 * block;
          const int p = panel == 0 ? dpad : panel;
          if (dpad % p != 0) continue;
          const std::int64_t row_stride = d + 3, offset = 2;
          const auto src = random_rows(rows, row_stride, offset, static_cast<unsigned>(7 * block + d + rows));
          std::vector<std::uint16_t> want(std::size_t(rows_pad) * dpad, 0xBADD), got(want.size(), 0xF00D);
          load_pairs_rows_bf16(src.data(), offset, row_stride, rows, rows_pad, d, dpad, want.data(), block, p);
          stage_v_pairs_bf16(src.data(), offset, row_stride, rows, rows_pad, d, dpad, got.data(), block, p);
          ASSERT_EQ(got, want) << "block " << block << " panel " << p << " d " << d << " rows " << rows;
        }
}

}  // namespace
}  // namespace orchard::cpu
