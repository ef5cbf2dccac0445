// The CPU kernels' fp32 tile steps (softmax_tile.h) against their fp64 versions, on every
// implementation this CPU supports (generic 8-lane, AVX2 + FMA, AVX-512): random scores, partial
// rows, masked (-inf) and NaN scores, rows with nothing visible, exp2 arguments below -126, two
// tiles in a row (the rescale of O), and the backward's dropout keep mask.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "backends/cpu/softmax_tile.h"

namespace orchard::cpu {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int kRows = 10, kBc = 64, kDp = 48;
// Valid leading columns per row: full, partial (not a multiple of 8), one, none.
constexpr int kValid[kRows] = {64, 64, 37, 0, 1, 64, 17, 64, 63, 64};

const char* path_name(SoftmaxPath p) {
  switch (p) {
    case SoftmaxPath::kGeneric: return "generic";
    case SoftmaxPath::kAvx2: return "avx2";
    case SoftmaxPath::kAvx512: return "avx512";
    default: return "auto";
  }
}

// Forces each supported path in turn, restoring the default afterwards.
template <class Body>
void for_each_path(Body&& body) {
  int ran = 0;
  for (SoftmaxPath p : {SoftmaxPath::kGeneric, SoftmaxPath::kAvx2, SoftmaxPath::kAvx512}) {
    if (!force_softmax_path(p)) continue;
    SCOPED_TRACE(path_name(p));
    body();
    ++ran;
  }
  force_softmax_path(SoftmaxPath::kAuto);
  EXPECT_GE(ran, 1);
}

// |got - want| <= atol + rtol |want|, or both NaN.
void expect_near(double got, double want, double rtol, double atol, const std::string& what) {
  if (std::isnan(want)) {
    EXPECT_TRUE(std::isnan(got)) << what << ": got " << got << ", want NaN";
    return;
  }
  if (std::isinf(want)) {
    EXPECT_EQ(got, want) << what;
    return;
  }
  EXPECT_LE(std::fabs(got - want), atol + rtol * std::fabs(want)) << what << ": got " << got << ", want " << want;
}

std::vector<float> random_scores(std::mt19937& rng, float sd) {
  std::normal_distribution<float> nd(0.f, sd);
  std::vector<float> s(kRows * kBc);
  for (float& x : s) x = nd(rng);
  s[1 * kBc + 5] = -kInf;            // a masked score inside the visible columns
  s[5 * kBc + 9] = std::nanf("");    // NaN reaches the row's output
  s[7 * kBc + 3] = 60.f;             // the others fall below 2^-126 after subtracting the max
  for (int j = 0; j < kBc; ++j) s[9 * kBc + j] = -kInf;  // visible but all masked
  return s;
}

// One tile's row states against the fp64 update's: a row whose reference is NaN (a NaN score)
// only needs l NaN, so out = O / l and lse are NaN (the AVX-512 and bf16 updates' max skips NaN,
// so their m and the row's other P stay finite); every other row P (p_at(r, j)) within p_rtol,
// then m, l and O.
template <class PAt>
void expect_rows_match_fp64(int tile, PAt p_at, double p_rtol, const std::vector<double>& sd,
                            const std::vector<float>& m, const std::vector<float>& l, const std::vector<float>& o,
                            const std::vector<double>& md, const std::vector<double>& ld,
                            const std::vector<double>& od) {
  for (int r = 0; r < kRows; ++r) {
    const std::string at = "tile " + std::to_string(tile) + " row " + std::to_string(r);
    if (std::isnan(ld[r])) {
      EXPECT_TRUE(std::isnan(l[r])) << at << ": l " << l[r] << ", want NaN";
      continue;
    }
    for (int j = 0; j < kBc; ++j) expect_near(p_at(r, j), sd[r * kBc + j], p_rtol, 1e-30, at + " P col " + std::to_string(j));
    expect_near(m[r], md[r], 1e-6, 0, at + " m");
    expect_near(l[r], ld[r], 1e-5, 1e-30, at + " l");
    for (int j = 0; j < kDp; ++j) expect_near(o[r * kDp + j], od[r * kDp + j], 1e-5, 1e-30, at + " O");
  }
}

TEST(CpuSoftmaxTile, ForwardUpdateMatchesFp64OnEveryPath) {
  for_each_path([] {
    std::mt19937 rng(1234);
    const float c = 0.125f * 1.4426950408889634f;
    // Row state and O after two tiles, fp32 vs fp64 from the same inputs.
    std::vector<float> m(kRows, -kInf), l(kRows, 0.f), o(kRows * kDp);
    std::vector<double> md(kRows, -INFINITY), ld(kRows, 0.0), od(kRows * kDp);
    std::uniform_real_distribution<float> ud(-1.f, 1.f);
    for (int i = 0; i < kRows * kDp; ++i) od[i] = o[i] = ud(rng);
    for (int tile = 0; tile < 2; ++tile) {
      std::vector<float> s = random_scores(rng, tile == 0 ? 4.f : 12.f);
      std::vector<double> sd(s.begin(), s.end());
      softmax_tile_update(s.data(), kRows, kBc, kValid, c, m.data(), l.data(), o.data(), kDp, kDp);
      softmax_tile_update(sd.data(), kRows, kBc, kValid, static_cast<double>(c), md.data(), ld.data(), od.data(),
                          kDp, kDp);
      // P's argument c*s - m is formed in fp32: its rounding (|arg| up to ~60, 2^-24 relative)
      // dominates the 1.9e-7 of the polynomial.
      expect_rows_match_fp64(tile, [&](int r, int j) { return s[r * kBc + j]; }, 3e-6, sd, m, l, o, md, ld, od);
    }
    // Masked columns are exactly 0, and so is a row with nothing visible.
    EXPECT_EQ(l[3], 0.f);
    EXPECT_EQ(m[9], -kInf);
  });
}

TEST(CpuSoftmaxTile, Exp2EdgesOnEveryPath) {
  // One row, m_old = 0 (so P = exp2(c * s) for c = 1): arguments below -126 give exactly 0,
  // -inf gives 0, 0 gives 1, and integers give exact powers of two.
  for_each_path([] {
    std::vector<float> s(kBc, 0.f);
    const float args[] = {-126.5f, -130.f, -kInf, 0.f, -1.f, -10.f, -125.f, -0.5f, -3.25f};
    for (int j = 0; j < 9; ++j) s[j] = args[j];
    float m = 0.f, l = 0.f, o[kDp] = {};
    const int nv[1] = {kBc};
    softmax_tile_update(s.data(), 1, kBc, nv, 1.f, &m, &l, o, kDp, kDp);
    EXPECT_EQ(s[0], 0.f);
    EXPECT_EQ(s[1], 0.f);
    EXPECT_EQ(s[2], 0.f);
    EXPECT_EQ(s[3], 1.f);
    EXPECT_EQ(s[4], 0.5f);
    EXPECT_FLOAT_EQ(s[5], std::ldexp(1.f, -10));
    EXPECT_FLOAT_EQ(s[6], std::ldexp(1.f, -125));
    expect_near(s[7], std::exp2(-0.5), 4e-7, 0, "exp2(-0.5)");
    expect_near(s[8], std::exp2(-3.25), 4e-7, 0, "exp2(-3.25)");
  });
}

float bf16_to_float(std::uint16_t h) {
  const std::uint32_t u = std::uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The bf16 forward's update (P rounded to bf16 into p16) against the fp64 update, two tiles:
// P within bf16's rounding (2^-9 relative) plus the exp2's 3e-6, m / l / O as the fp32 path.
// Rows with a NaN score only need l NaN (so out = O / l and lse are NaN): the bf16 update's
// max skips NaN, so its m, O and the row's other P stay finite. Row 0 is all NaN in the
// first tile (the max finds nothing there: the NaN must still reach l).
TEST(CpuSoftmaxTile, ForwardUpdateBf16MatchesFp64) {
  std::mt19937 rng(4321);
  const float c = 0.125f * 1.4426950408889634f;
  std::vector<float> m(kRows, -kInf), l(kRows, 0.f), o(kRows * kDp);
  std::vector<double> md(kRows, -INFINITY), ld(kRows, 0.0), od(kRows * kDp);
  std::uniform_real_distribution<float> ud(-1.f, 1.f);
  for (int i = 0; i < kRows * kDp; ++i) od[i] = o[i] = ud(rng);
  std::vector<std::uint16_t> p16(kRows * kBc);
  for (int tile = 0; tile < 2; ++tile) {
    std::vector<float> s = random_scores(rng, tile == 0 ? 4.f : 12.f);
    if (tile == 0)
      for (int j = 0; j < kBc; ++j) s[j] = std::nanf("");
    std::vector<double> sd(s.begin(), s.end());
    if (!softmax_tile_update_bf16(s.data(), kRows, kBc, kValid, c, m.data(), l.data(), o.data(), kDp, kDp,
                                  p16.data()))
      GTEST_SKIP() << "no AVX-512-BF16 here";
    softmax_tile_update(sd.data(), kRows, kBc, kValid, static_cast<double>(c), md.data(), ld.data(), od.data(),
                        kDp, kDp);
    expect_rows_match_fp64(tile, [&](int r, int j) { return bf16_to_float(p16[r * kBc + j]); }, 1.0 / 256, sd, m, l,
                           o, md, ld, od);
  }
  EXPECT_EQ(l[3], 0.f);
  EXPECT_EQ(m[9], -kInf);
}

// Exp2EdgesOnEveryPath for the bf16 update: arguments below -126 and -inf give 0 in P, 0 gives
// 1, integers give exact powers of two.
TEST(CpuSoftmaxTile, Exp2EdgesBf16) {
  std::vector<float> s(kBc, 0.f);
  const float args[] = {-126.5f, -130.f, -kInf, 0.f, -1.f, -10.f, -125.f, -0.5f, -3.25f, -1000.f};
  for (int j = 0; j < 10; ++j) s[j] = args[j];
  float m = 0.f, l = 0.f, o[kDp] = {};
  const int nv[1] = {kBc};
  std::vector<std::uint16_t> p16(kBc);
  if (!softmax_tile_update_bf16(s.data(), 1, kBc, nv, 1.f, &m, &l, o, kDp, kDp, p16.data()))
    GTEST_SKIP() << "no AVX-512-BF16 here";
  std::vector<float> p(kBc);
  for (int j = 0; j < kBc; ++j) p[j] = bf16_to_float(p16[j]);
  EXPECT_EQ(p[0], 0.f);
  EXPECT_EQ(p[1], 0.f);
  EXPECT_EQ(p[2], 0.f);
  EXPECT_EQ(p[3], 1.f);
  EXPECT_EQ(p[4], 0.5f);
  EXPECT_EQ(p[5], std::ldexp(1.f, -10));
  EXPECT_EQ(p[6], std::ldexp(1.f, -125));
  expect_near(p[7], std::exp2(-0.5), 1.0 / 256, 0, "exp2(-0.5)");
  expect_near(p[8], std::exp2(-3.25), 1.0 / 256, 0, "exp2(-3.25)");
  EXPECT_EQ(p[9], 0.f);
}

TEST(CpuSoftmaxTile, BackwardTileMatchesFp64OnEveryPath) {
  for_each_path([] {
    for (bool dropout : {false, true}) {
      SCOPED_TRACE(dropout ? "dropout" : "no dropout");
      std::mt19937 rng(99);
      const float c = 0.125f * 1.4426950408889634f, rp = 1.f / 0.75f;
      std::vector<float> s = random_scores(rng, 4.f);
      std::normal_distribution<float> nd(0.f, 1.f);
      std::vector<float> dp(kRows * kBc), lse2(kRows), dsum(kRows);
      for (float& x : dp) x = nd(rng);
      for (int r = 0; r < kRows; ++r) {
        float mx = -kInf;  // lse2 at least the row's max, as a forward would leave it
        for (int j = 0; j < kValid[r]; ++j) mx = std::fmax(mx, c * s[r * kBc + j]);
        lse2[r] = mx == -kInf ? -kInf : mx + 3.f;
        dsum[r] = nd(rng);
      }
      std::vector<std::uint8_t> keep(kRows * kBc);
      for (auto& k : keep) k = (rng() % 4) != 0;
      std::vector<double> sd(s.begin(), s.end()), dpd(dp.begin(), dp.end()), lse2d(lse2.begin(), lse2.end()),
          dsumd(dsum.begin(), dsum.end());
      const std::uint8_t* kp = dropout ? keep.data() : nullptr;
      backward_tile(s.data(), dp.data(), kRows, kBc, kValid, c, lse2.data(), dsum.data(), kp, rp);
      backward_tile(sd.data(), dpd.data(), kRows, kBc, kValid, static_cast<double>(c), lse2d.data(), dsumd.data(),
                    kp, static_cast<double>(rp));
      for (int i = 0; i < kRows * kBc; ++i) {
        const std::string at = "row " + std::to_string(i / kBc) + " col " + std::to_string(i % kBc);
        expect_near(s[i], sd[i], 3e-6, 1e-30, at + " P");
        expect_near(dp[i], dpd[i], 1e-5, 1e-6, at + " dS");
      }
    }
  });
}

}  // namespace
}  // namespace orchard::cpu
