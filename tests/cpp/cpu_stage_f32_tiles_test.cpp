// stage_rows_transposed (the fp32 kernels' K^T / V^T staging, backends/cpu/stage_f32_tiles.h) against
// tile_load.h's load_rows_transposed bit for bit: float32 sources with NaN payloads, +-inf and -0,
// head dims that leave a partial 16-lane group, fewer rows than rows_pad (zero rows), strided
// rows, both tile widths the kernels use, and a destination poisoned first so an element the
// staging skips shows. Also that the AVX-512 path takes the call where it should (on CPUs with
// AVX-512) and that float16 / bfloat16 sources fall back.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "backends/cpu/cpu_features.h"
#include "backends/cpu/stage_f32_tiles.h"
#include "orchard/numeric.h"

namespace orchard::cpu {
namespace {

std::vector<std::uint32_t> bits_of(const std::vector<float>& v) {
  std::vector<std::uint32_t> b(v.size());
  std::memcpy(b.data(), v.data(), v.size() * sizeof(float));
  return b;
}

TEST(CpuStageF32Tiles, MatchesLoadRowsTransposedBitForBit) {
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.f, 2.f);
  const float specials[] = {bits_to_float(0x7fc00123u), bits_to_float(0xffc00001u),
                            std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                            -0.0f, bits_to_float(0x00000001u)};
  for (int block : {64, 128})
    for (int d : {1, 8, 15, 16, 17, 40, 64, 72, 100, 128, 130})
      for (int rows_pad : {block, 2 * block})
        for (int rows : {rows_pad, rows_pad - 1, rows_pad - 17, 1, 0}) {
          const int dpad = (d + 15) / 16 * 16;
          const std::int64_t row_stride = d + 5, offset = 3;
          std::vector<float> src(offset + std::size_t(std::max(rows, 1)) * row_stride + 16);
          for (auto& x : src) x = nd(rng);
          for (std::size_t i = 0; i < src.size(); i += 37) src[i] = specials[(i / 37) % 6];
          const std::size_t n = std::size_t(rows_pad) * dpad;
          std::vector<float> want(n, bits_to_float(0x7fbadbadu)), got(n, bits_to_float(0x7fc0ffeeu));
          load_rows_transposed(src.data(), DType::kFloat32, offset, row_stride, rows, rows_pad, d, dpad, block,
                               want.data());
          const bool took = stage_rows_transposed_f32(src.data(), DType::kFloat32, offset, row_stride, rows,
                                                      rows_pad, d, dpad, block, got.data());
          EXPECT_EQ(took, cpu_has_avx512());
          stage_rows_transposed(src.data(), DType::kFloat32, offset, row_stride, rows, rows_pad, d, dpad, block,
                                got.data());
          ASSERT_EQ(bits_of(got), bits_of(want))
              << "block " << block << " d " << d << " rows " << rows << " / " << rows_pad;
        }
}

TEST(CpuStageF32Tiles, SixteenBitSourcesFallBack) {
  std::vector<std::uint16_t> src(64 * 64, 0x3c00);
  std::vector<float> dst(64 * 64, 0.f);
  for (DType dt : {DType::kFloat16, DType::kBFloat16})
    EXPECT_FALSE(stage_rows_transposed_f32(src.data(), dt, 0, 64, 64, 64, 64, 64, 64, dst.data()));
  std::vector<float> want(64 * 64), got(64 * 64, -1.f);
  load_rows_transposed(src.data(), DType::kFloat16, 0, 64, 60, 64, 64, 64, 64, want.data());
  stage_rows_transposed(src.data(), DType::kFloat16, 0, 64, 60, 64, 64, 64, 64, got.data());
  EXPECT_EQ(bits_of(got), bits_of(want));
}

}  // namespace
}  // namespace orchard::cpu
