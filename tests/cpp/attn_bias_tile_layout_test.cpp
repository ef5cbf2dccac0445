// The sm90 kernels' dense attn_bias tiles (src/backends/cuda/sm90/attn_bias_tile_layout.h),
// replayed on the host: the TMA boxes fill a stage from a bias tile of distinct values, then each
// lane's reads (ldmatrix.x4 for 16-bit kinds, 2-byte loads for booleans) must hand every score
// register s[i] the element of its own (row, key) in the wgmma accumulator layout.  Every tile
// shape the kBias kernels use (rows 128 / 192, keys 64 / 96 / 128) and both element widths.
#include "backends/cuda/sm90/attn_bias_tile_layout.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

namespace orchard::sm90 {
namespace {

// The value stored for (row, key): distinct for every element of the tile, per element byte.
uint16_t element(int row, int key) { return static_cast<uint16_t>(row * 257 + key + 1); }

template <int kRows, int kKeys>
void check_tile(int elem_bytes) {
  // The stage as the boxes leave it: box x holds keys [x * 32 / e, (x + 1) * 32 / e) of every row.
  std::vector<uint8_t> stage(kRows * kKeys * 2, 0xEE);
  for (int x = 0; x < bias_boxes<kKeys>(elem_bytes); ++x)
    for (int r = 0; r < kRows; ++r)
      for (int b = 0; b < kBiasBoxBytes; ++b) {
        const int key = (x * kBiasBoxBytes + b) / elem_bytes;
        const uint16_t v = element(r, key);
        stage[x * kRows * kBiasBoxBytes + r * kBiasBoxBytes + b] =
            elem_bytes == 1 ? static_cast<uint8_t>(v) : static_cast<uint8_t>(v >> (8 * (b % 2)));
      }
  auto at = [&](int offset, int e) {  // one element of e bytes at a stage offset (little endian)
    return e == 1 ? uint16_t{stage[offset]} : static_cast<uint16_t>(stage[offset] | stage[offset + 1] << 8);
  };
  auto want = [&](int row, int key) {
    const uint16_t v = element(row, key);
    return elem_bytes == 1 ? static_cast<uint16_t>(v & 0xff) : v;
  };
  for (int row_w = 0; row_w < kRows; row_w += 16)  // each warp's 16 rows
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane / 4, t = lane % 4;
      // s[i] <- (row_w + g + 8 ((i / 2) % 2), 8 (i / 4) + 2t + (i % 2))
      std::vector<int> got(kKeys / 2, -1);
      if (elem_bytes == 1) {
        for (int j = 0; j < kKeys / 8; ++j)
          for (int r = 0; r < 2; ++r) {
            const int off = bias_stage_offset<kRows>(row_w + g + 8 * r, 8 * j + 2 * t);
            got[4 * j + 2 * r] = at(off, 1);
            got[4 * j + 2 * r + 1] = at(off + 1, 1);
          }
      } else {
        for (int j = 0; j < kKeys / 8; j += 2)
          for (int m = 0; m < 4; ++m) {
            // ldmatrix.x4: matrix m's row (lane / 4) comes from the address lane 8 m + lane / 4 gave;
            // this lane receives its bytes 4 t .. 4 t + 3.
            const int src = 8 * m + lane / 4;
            const int off = bias_stage_offset<kRows>(row_w + bias_ldmatrix_row(src), bias_ldmatrix_byte_col(src, j));
            const int i = bias_ldmatrix_score(j, m);
            got[i] = at(off + 4 * t, 2);
            got[i + 1] = at(off + 4 * t + 2, 2);
          }
      }
      for (int i = 0; i < kKeys / 2; ++i) {
        const int row = row_w + g + 8 * ((i / 2) % 2), key = 8 * (i / 4) + 2 * t + (i % 2);
        ASSERT_EQ(got[i], want(row, key)) << "rows " << kRows << " keys " << kKeys << " e " << elem_bytes
                                          << " lane " << lane << " s[" << i << "]";
      }
    }
}

// The backward's S^T (rows = keys): a stage of 64 queries x kKeys keys; warp kw's lanes (16 keys
// from kw) read s[i] = (query 8 (i / 4) + 2t + (i % 2), key kw + g + 8 ((i / 2) % 2)).
template <int kKeys>
void check_transposed_tile(int elem_bytes) {
  constexpr int kRows = 64;
  std::vector<uint8_t> stage(kRows * kKeys * 2, 0xEE);
  for (int x = 0; x < bias_boxes<kKeys>(elem_bytes); ++x)
    for (int r = 0; r < kRows; ++r)
      for (int b = 0; b < kBiasBoxBytes; ++b) {
        const uint16_t v = element(r, (x * kBiasBoxBytes + b) / elem_bytes);
        stage[x * kRows * kBiasBoxBytes + r * kBiasBoxBytes + b] =
            elem_bytes == 1 ? static_cast<uint8_t>(v) : static_cast<uint8_t>(v >> (8 * (b % 2)));
      }
  for (int kw = 0; kw < kKeys; kw += 16)
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane / 4, t = lane % 4;
      std::vector<int> got(32, -1);
      if (elem_bytes == 1) {
        for (int i = 0; i < 32; ++i)
          got[i] = stage[bias_stage_offset<kRows>(8 * (i / 4) + 2 * t + (i % 2), kw + g + 8 * ((i / 2) % 2))];
      } else {
        for (int j = 0; j < 8; j += 2)
          for (int m = 0; m < 4; ++m) {
            // ldmatrix.x4.trans: matrix m's rows come from lanes 8 m .. 8 m + 7; this lane receives
            // column g of rows 2t and 2t + 1 (the 2-byte elements at byte g * 2 of those rows).
            const int i = bias_ldmatrix_score(j, m);
            for (int e = 0; e < 2; ++e) {
              const int src = 8 * m + 2 * t + e;
              const int off = bias_stage_offset<kRows>(bias_trans_ldmatrix_row(src, j),
                                                       bias_trans_ldmatrix_byte_col(src, kw)) + 2 * g;
              got[i + e] = stage[off] | stage[off + 1] << 8;
            }
          }
      }
      for (int i = 0; i < 32; ++i) {
        const int query = 8 * (i / 4) + 2 * t + (i % 2), key = kw + g + 8 * ((i / 2) % 2);
        const uint16_t v = element(query, key);
        ASSERT_EQ(got[i], elem_bytes == 1 ? (v & 0xff) : v)
            << "keys " << kKeys << " e " << elem_bytes << " kw " << kw << " lane " << lane << " s[" << i << "]";
      }
    }
}

TEST(AttnBiasTileLayout, BackwardLanesGetTheirTransposedElements) {
  for (int e : {1, 2}) check_transposed_tile<128>(e);  // the d64 / d128 backward: 64 queries x 128 keys
}

TEST(AttnBiasTileLayout, EveryLaneGetsItsOwnElements) {
  for (int e : {1, 2}) {
    check_tile<192, 128>(e);  // d64: 3 WGs x 128 keys
    check_tile<192, 96>(e);   // d96: 3 WGs x 96 keys
    check_tile<128, 128>(e);  // d128
    check_tile<128, 96>(e);   // d192 causal
    check_tile<128, 64>(e);   // d192 non-causal, d256
  }
}

TEST(AttnBiasTileLayout, BoxesCoverTheTile) {
  EXPECT_EQ(bias_boxes<128>(2), 8);
  EXPECT_EQ(bias_boxes<128>(1), 4);
  EXPECT_EQ(bias_boxes<96>(2), 6);
  EXPECT_EQ(bias_boxes<96>(1), 3);
  EXPECT_EQ(bias_boxes<64>(1), 2);
  // The last box's last byte is the stage's last byte.
  EXPECT_EQ(bias_stage_offset<192>(191, 128 * 2 - 1), 192 * 128 * 2 - 1);
}

}  // namespace
}  // namespace orchard::sm90
