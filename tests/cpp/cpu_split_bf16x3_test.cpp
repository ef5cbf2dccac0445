// The fp32-on-AMX building blocks (backends/cpu/split_bf16x3.h): the three-plane split is exact
// (hi + mid + lo == x for every finite fp32 of attention's range, vector and scalar paths bit for
// bit), and gemm_bf16x3_panels' product of split operands is as accurate as an fp32 GEMM (max error
// against an fp64 product within 2x that of a naive fp32 loop), on AMX tiles and their row / K-pair
// remainders, plain and accumulating, with C poisoned where it is overwritten.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "backends/cpu/gemm_bf16.h"
#include "backends/cpu/split_bf16x3.h"
#include "orchard/numeric.h"

namespace orchard::cpu {
namespace {

std::vector<std::uint16_t> split(const std::vector<float>& x, int rows, int n) {
  std::vector<std::uint16_t> planes(3 * x.size());
  split_rows_bf16x3(x.data(), n, rows, n, planes.data(), n, std::int64_t(x.size()));
  return planes;
}

TEST(CpuSplitBf16x3, PlanesSumToTheValueExactly) {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::uniform_int_distribution<int> ex(-60, 60);
  const int rows = 7, n = 48;
  std::vector<float> x(std::size_t(rows) * n);
  for (auto& v : x) v = std::ldexp(nd(rng), ex(rng));
  const float big = std::numeric_limits<float>::max(), inf = std::numeric_limits<float>::infinity();
  x[0] = 0.f, x[1] = -0.f, x[2] = 1.f, x[3] = std::nextafter(1.f, 2.f), x[4] = -big, x[5] = 1e-30f;
  x[6] = 3.3961e38f;  // within half a bf16 ulp of FLT_MAX: rounding hi would overflow
  const float nonfinite[] = {inf, -inf, std::numeric_limits<float>::quiet_NaN()};
  for (int i = 0; i < 3; ++i) x[7 + i] = nonfinite[i];
  const auto planes = split(x, rows, n);
  for (int i = 0; i < 3; ++i) {  // inf and NaN stay themselves in hi, with zero corrections
    const float hi = bf16_to_float(planes[7 + i]);
    EXPECT_TRUE(std::isnan(x[7 + i]) ? std::isnan(hi) : hi == x[7 + i]) << i;
    EXPECT_EQ(planes[x.size() + 7 + i], 0);
    EXPECT_EQ(planes[2 * x.size() + 7 + i], 0);
  }
  for (std::size_t i = 0; i < x.size(); ++i) {
    if (!std::isfinite(x[i])) continue;
    const double sum = double(bf16_to_float(planes[i])) + bf16_to_float(planes[x.size() + i]) +
                       bf16_to_float(planes[2 * x.size() + i]);
    ASSERT_EQ(sum, double(x[i])) << "element " << i;
    // mid is below an ulp of hi (half an ulp where hi was rounded to nearest).
    EXPECT_LE(std::fabs(bf16_to_float(planes[x.size() + i])), std::fabs(bf16_to_float(planes[i])) / 64);
  }
  // The scalar path (no AVX512_BF16, or switched off) gives the same planes.
  g_bf16_dot = false;
  const auto scalar = split(x, rows, n);
  g_bf16_dot = true;
  EXPECT_EQ(scalar, planes);
}

TEST(CpuSplitBf16x3, ProbabilitySplitMatchesTheGeneralOne) {
  std::mt19937 rng(8);
  std::uniform_real_distribution<float> ud(0.f, 1.f);
  const int rows = 5, n = 64;
  std::vector<float> p(std::size_t(rows) * n);
  for (auto& v : p) v = ud(rng) * std::ldexp(1.f, -int(ud(rng) * 40));
  p[0] = 0.f, p[1] = 1.f, p[2] = std::numeric_limits<float>::quiet_NaN(), p[3] = 1e-40f;  // denormal
  for (bool vector_path : {true, false}) {
    g_bf16_dot = vector_path;
    std::vector<std::uint16_t> got(3 * p.size());
    split_probabilities_bf16x3(p.data(), n, rows, n, got.data(), n, std::int64_t(p.size()));
    const auto want = split(p, rows, n);
    g_bf16_dot = true;
    for (std::size_t i = 0; i < got.size(); ++i)
      if (i % p.size() != 2)  // NaN: any NaN planes
        ASSERT_EQ(got[i], want[i]) << "word " << i << " vector " << vector_path;
    EXPECT_TRUE(std::isnan(bf16_to_float(got[2])));
  }
}

// B (k x n, row-major fp32) split and pair-packed in panels of `panel` columns (gemm_bf16.h).
std::vector<std::uint16_t> packed_b_planes(const std::vector<float>& b, int k, int n, int panel,
                                           std::int64_t& plane) {
  const auto flat = split(b, k, n);
  const int kpairs = (k + 1) / 2;
  plane = std::int64_t(kpairs) * 2 * n;
  std::vector<std::uint16_t> out(3 * plane, 0);
  for (int x = 0; x < 3; ++x)
    for (int r = 0; r < k; ++r)
      for (int j = 0; j < n; ++j)
        out[x * plane + std::int64_t(j / panel) * kpairs * 2 * panel + (r / 2) * 2 * panel + 2 * (j % panel) +
            r % 2] = flat[x * b.size() + std::size_t(r) * n + j];
  return out;
}

TEST(CpuSplitBf16x3, GemmIsAsAccurateAsFp32) {
  // gemm_bf16x3_panels runs on gemm_bf16's kernels, which need AVX512_BF16 (cpu_gemm_bf16_test's rule).
  if (!bf16_dot_available()) GTEST_SKIP() << "this CPU has no AVX512_BF16";
  std::mt19937 rng(9);
  std::normal_distribution<float> nd(0.f, 1.f);
  int amx_cases = 0;
  for (int m : {5, 16, 33, 64})
    for (int n : {32, 64, 256})
      for (int kpairs : {8, 16, 40, 64})
        for (bool accumulate : {false, true}) {
          const int k = 2 * kpairs, panel = bf16_b_panel(n);
          std::vector<float> a(std::size_t(m) * k), b(std::size_t(k) * n), c0(std::size_t(m) * n);
          for (auto& v : a) v = nd(rng);
          for (auto& v : b) v = nd(rng);
          for (auto& v : c0) v = nd(rng);
          std::int64_t b_plane = 0;
          const auto bp = packed_b_planes(b, k, n, panel, b_plane);
          const auto ap = split(a, m, k);
          std::vector<float> c = accumulate ? c0 : std::vector<float>(c0.size(), std::numeric_limits<float>::quiet_NaN());
          gemm_bf16x3_panels(m, n, kpairs, ap.data(), k, std::int64_t(a.size()), bp.data(), b_plane, panel, c.data(),
                             n, accumulate);
          amx_cases += amx_available() && panel == 32 && m >= kAmxMinM && kpairs >= kAmxMinKPairs;
          double err = 0, naive_err = 0;
          for (int i = 0; i < m; ++i)
            for (int j = 0; j < n; ++j) {
              double exact = accumulate ? c0[std::size_t(i) * n + j] : 0.0;
              float naive = accumulate ? c0[std::size_t(i) * n + j] : 0.f;
              for (int q = 0; q < k; ++q) {
                exact += double(a[std::size_t(i) * k + q]) * b[std::size_t(q) * n + j];
                naive += a[std::size_t(i) * k + q] * b[std::size_t(q) * n + j];
              }
              err = std::max(err, std::fabs(c[std::size_t(i) * n + j] - exact));
              naive_err = std::max(naive_err, std::fabs(double(naive) - exact));
            }
          ASSERT_LE(err, 2 * naive_err + 1e-6) << m << "x" << n << "x" << k << " accumulate " << accumulate;
        }
  if (amx_available()) EXPECT_GT(amx_cases, 0);
}

}  // namespace
}  // namespace orchard::cpu
