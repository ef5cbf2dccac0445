// Dropout's global coordinates (FwdParams::dropout_*_offset / dropout_heads, the
// AttentionOptions of the same names): all 0 draws exactly the mask of before —
// Philox index (batch * hq + head, row, col) — and a call with offsets draws the
// corresponding block of a larger call's mask, for any row and column offset (also ones
// that split a Philox call's 2-row x 8-column set, philox.h). Through the public API on
// the CPU backend (context parallelism builds on this).
#include <gtest/gtest.h>

#include <climits>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "orchard/attention.h"
#include "orchard/philox.h"

namespace {

using orchard::DType;
using orchard::TensorView;

const orchard::Device kCpu{orchard::DeviceType::kCPU, 0};
constexpr std::uint64_t kSeed = 0x0123456789abcdefull, kOffset = 0x5eedull << 33 | 7;

struct Qkv {
  int b, s, h, d;
  std::vector<float> x;
  Qkv(int b_, int s_, int h_, int d_, std::mt19937& rng) : b(b_), s(s_), h(h_), d(d_) {
    std::normal_distribution<float> n;
    x.resize(std::size_t(b) * s * h * d);
    for (float& v : x) v = n(rng);
  }
  // Rows [r0, r0 + n) and heads [h0, h0 + k) as a new contiguous BSHD tensor.
  Qkv slice(int r0, int n, int h0, int k) const {
    Qkv o = *this;
    o.s = n, o.h = k;
    o.x.assign(std::size_t(b) * n * k * d, 0.f);
    for (int bi = 0; bi < b; ++bi)
      for (int i = 0; i < n; ++i)
        for (int hh = 0; hh < k; ++hh)
          for (int e = 0; e < d; ++e)
            o.x[((std::size_t(bi) * n + i) * k + hh) * d + e] =
                x[((std::size_t(bi) * s + r0 + i) * h + h0 + hh) * d + e];
    return o;
  }
  TensorView view() { return orchard::make_contiguous_view(x.data(), DType::kFloat32, kCpu, {b, s, h, d}); }
};

struct Offsets {
  std::int64_t row = 0, col = 0, head = 0, heads = 0;
};

// The uint8 keep-mask (b, hq, sq, sk) of one forward call with dropout p.
std::vector<std::uint8_t> forward_mask(Qkv& q, Qkv& k, Qkv& v, double p, bool causal, Offsets o,
                                       std::vector<float>* out_values = nullptr) {
  std::vector<float> out(q.x.size()), lse(std::size_t(q.b) * q.h * q.s);
  std::vector<std::uint8_t> mask(std::size_t(q.b) * q.h * q.s * k.s, 7);
  orchard::ForwardArgs a;
  a.q = q.view(), a.k = k.view(), a.v = v.view();
  a.out = orchard::make_contiguous_view(out.data(), DType::kFloat32, kCpu, {q.b, q.s, q.h, q.d});
  a.lse = orchard::make_contiguous_view(lse.data(), DType::kFloat32, kCpu, {q.b, q.h, q.s});
  a.dropout_mask = orchard::make_contiguous_view(mask.data(), DType::kUInt8, kCpu, {q.b, q.h, q.s, k.s});
  a.options.dropout_p = p;
  a.options.seed = kSeed;
  a.options.offset = kOffset;
  a.options.causal = causal;
  a.options.dropout_row_offset = o.row;
  a.options.dropout_col_offset = o.col;
  a.options.dropout_head_offset = o.head;
  a.options.dropout_heads = o.heads;
  orchard::attention_forward(a);
  if (out_values) *out_values = out;
  return mask;
}

// Without offsets (and with offsets that say the same: heads = hq) the mask is the
// plain index's, bit for bit, and so is the output.
TEST(DropoutOffsets, DefaultsAreThePlainMask) {
  std::mt19937 rng(3);
  const int b = 2, hq = 4, hkv = 2, sq = 37, sk = 150, d = 16;
  Qkv q(b, sq, hq, d, rng), k(b, sk, hkv, d, rng), v(b, sk, hkv, d, rng);
  const double p = 0.3;
  const std::uint32_t thr = orchard::dropout_keep_threshold(static_cast<float>(p));
  for (bool causal : {false, true}) {
    std::vector<float> out0, out1;
    const auto m0 = forward_mask(q, k, v, p, causal, {}, &out0);
    const auto m1 = forward_mask(q, k, v, p, causal, {0, 0, 0, hq}, &out1);
    std::int64_t mismatches = 0;
    for (int bi = 0; bi < b; ++bi)
      for (int h = 0; h < hq; ++h)
        for (int i = 0; i < sq; ++i)
          for (int j = 0; j < sk; ++j) {
            const std::size_t e = ((std::size_t(bi) * hq + h) * sq + i) * sk + j;
            const bool want = orchard::dropout_keep(kSeed, kOffset, static_cast<std::uint32_t>(bi * hq + h),
                                                    static_cast<std::uint32_t>(i), static_cast<std::uint32_t>(j), thr);
            mismatches += (m0[e] != want) + (m1[e] != want);
          }
    EXPECT_EQ(mismatches, 0);
    EXPECT_EQ(out0, out1);  // bitwise
  }
}

// A call on rows [r0, r0+n), keys [c0, c0+m) and heads [h0, h0+k) of a larger problem
// with the offsets (r0, c0, h0, H) draws that block of the larger call's mask.
TEST(DropoutOffsets, OffsetMaskIsTheBlockOfTheFullMask) {
  std::mt19937 rng(5);
  const int b = 2, H = 6, S = 41, SK = 150, d = 8;
  for (int hkv : {6, 3}) {
    Qkv q(b, S, H, d, rng), k(b, SK, hkv, d, rng), v(b, SK, hkv, d, rng);
    const double p = 0.4;
    const auto full = forward_mask(q, k, v, p, false, {});
    struct Block {
      int r0, n, c0, m, h0, nh;
    };
    const int g = H / hkv;
    std::vector<Block> blocks = {{0, S, 0, SK, 0, H},   {5, 17, 1, 133, 0, H},  {0, 9, 2, 70, g, H - g},
                                 {13, 28, 3, 147, 0, g}, {1, 1, 5, 1, H - g, g}, {40, 1, 7, 143, g, g},
                                 {7, 20, 64, 86, 0, H},  {3, 30, 97, 35, g, g},  {8, 24, 8, 100, 0, H},
                                 {16, 25, 40, 110, g, H - g}, {24, 9, 24, 126, 0, g}};
    for (const Block& bl : blocks) {
      Qkv qs = q.slice(bl.r0, bl.n, bl.h0, bl.nh);
      Qkv ks = k.slice(bl.c0, bl.m, bl.h0 / g, bl.nh / g), vs = v.slice(bl.c0, bl.m, bl.h0 / g, bl.nh / g);
      const auto part = forward_mask(qs, ks, vs, p, false, {bl.r0, bl.c0, bl.h0, H});
      std::int64_t mismatches = 0;
      for (int bi = 0; bi < b; ++bi)
        for (int h = 0; h < bl.nh; ++h)
          for (int i = 0; i < bl.n; ++i)
            for (int j = 0; j < bl.m; ++j)
              mismatches += part[((std::size_t(bi) * bl.nh + h) * bl.n + i) * bl.m + j] !=
                            full[((std::size_t(bi) * H + bl.h0 + h) * S + bl.r0 + i) * SK + bl.c0 + j];
      EXPECT_EQ(mismatches, 0) << "hkv " << hkv << " rows " << bl.r0 << "+" << bl.n << " cols " << bl.c0 << "+"
                               << bl.m << " heads " << bl.h0 << "+" << bl.nh;
    }
  }
}

TEST(DropoutOffsets, BadOffsetsRaise) {
  std::mt19937 rng(7);
  Qkv q(1, 8, 4, 8, rng), k(1, 8, 4, 8, rng), v(1, 8, 4, 8, rng);
  for (Offsets o : {Offsets{-1, 0, 0, 0}, Offsets{0, -2, 0, 0}, Offsets{0, 0, 1, 4}, Offsets{0, 0, 0, 3},
                    Offsets{std::int64_t(1) << 32, 0, 0, 0}, Offsets{0, INT64_MAX, 0, 0},
                    Offsets{0, 0, INT64_MAX, 0}}) {
    try {
      forward_mask(q, k, v, 0.1, false, o);
      ADD_FAILURE() << "no error for offsets " << o.row << " " << o.col << " " << o.head << " " << o.heads;
    } catch (const orchard::Error& e) {
      EXPECT_NE(std::string(e.what()).find("dropout offsets"), std::string::npos) << e.what();
    }
  }
}

}  // namespace
