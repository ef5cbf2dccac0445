// The bf16 tile GEMM of the CPU backend (backends/cpu/gemm_bf16.h) on odd
// M / N / K and both A layouts, against an fp64 product of the same bf16
// values, C poisoned where it is overwritten; the AMX path also against the
// AVX-512-BF16 one (skipped, with a message, on CPUs without AMX).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "backends/cpu/gemm_bf16.h"
#include "backends/cpu/kernel_common.h"
#include "test_util.h"

namespace orchard::test {
namespace {

struct GemmCase {
  int m, n, kpairs;
  bool transposed_a;  // A given as a pair-packed A^T (a_rs == 2)
  bool accumulate;
};

struct GemmData {
  GemmCase g;
  std::int64_t a_rs, a_ps, ldb, ldc;
  std::vector<std::uint16_t> a, b;
  std::vector<float> c0;    // C before the call (NaN where it is overwritten without accumulate)
  std::vector<double> ref;  // expected C (m x n), and its error bound
  std::vector<double> bound;

  explicit GemmData(const GemmCase& gc, unsigned seed) : g(gc) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    const int k = 2 * g.kpairs;
    // Padded strides, so reads past the operands' edges would show.
    if (g.transposed_a) {
      a_rs = 2;
      a_ps = 2 * g.m + 6;
      a.resize(std::size_t(g.kpairs) * a_ps + 2 * g.m);
    } else {
      a_rs = k + 4;
      a_ps = 2;
      a.resize(std::size_t(g.m) * a_rs);
    }
    ldb = 2 * g.n + 32;
    b.resize(std::size_t(g.kpairs) * ldb);
    ldc = g.n + 16;
    const std::uint16_t nan16 = float_to_bf16(std::numeric_limits<float>::quiet_NaN());
    for (auto& x : a) x = nan16;  // padding: a NaN read there would reach C
    for (auto& x : b) x = nan16;
    auto a_at = [&](int r, int kk) -> std::uint16_t& {
      return a[std::size_t(r) * a_rs + std::size_t(kk / 2) * a_ps + kk % 2];
    };
    auto b_at = [&](int kk, int j) -> std::uint16_t& {
      return b[std::size_t(kk / 2) * ldb + 2 * j + kk % 2];
    };
    for (int r = 0; r < g.m; ++r)
      for (int kk = 0; kk < k; ++kk) a_at(r, kk) = float_to_bf16(nd(rng));
    for (int kk = 0; kk < k; ++kk)
      for (int j = 0; j < g.n; ++j) b_at(kk, j) = float_to_bf16(nd(rng));
    c0.assign(std::size_t(g.m) * ldc, -12345.0f);  // the padding columns must stay as they are
    ref.assign(std::size_t(g.m) * g.n, 0.0);
    bound.assign(ref.size(), 0.0);
    for (int r = 0; r < g.m; ++r)
      for (int j = 0; j < g.n; ++j) {
        float& c = c0[std::size_t(r) * ldc + j];
        c = g.accumulate ? nd(rng) : std::numeric_limits<float>::quiet_NaN();
        double s = g.accumulate ? c : 0.0, abs_s = std::fabs(g.accumulate ? c : 0.0f);
        for (int kk = 0; kk < k; ++kk) {
          const double prod = double(bf16_to_float(a_at(r, kk))) * bf16_to_float(b_at(kk, j));
          s += prod;
          abs_s += std::fabs(prod);
        }
        ref[std::size_t(r) * g.n + j] = s;
        // fp32 accumulation in any order: <= (k + 1) * 2^-24 * sum |terms|.
        bound[std::size_t(r) * g.n + j] = (k + 2) * 0x1p-24 * abs_s + 1e-30;
      }
  }

  std::vector<float> run() const {
    std::vector<float> c = c0;
    cpu::gemm_bf16(g.m, g.n, g.kpairs, a.data(), a_rs, a_ps, b.data(), ldb, c.data(), ldc,
                   g.accumulate);
    return c;
  }

  // The same product with B copied into column panels of `panel` columns
  // (gemm_bf16_panels' layout), NaN between the panels' used columns; with
  // extra_pairs, each panel holds that many more pair rows (NaN) that the
  // product must not read (panel_kpairs = kpairs + extra_pairs).
  std::vector<float> run_panels(int panel, int extra_pairs = 0) const {
    const std::uint16_t nan16 = float_to_bf16(std::numeric_limits<float>::quiet_NaN());
    const int held = g.kpairs + extra_pairs;
    std::vector<std::uint16_t> bp(std::size_t(g.n) * 2 * held + 64, nan16);
    for (int q = 0; q < g.n / panel; ++q)
      for (int pr = 0; pr < g.kpairs; ++pr)
        for (int jj = 0; jj < panel; ++jj)
          for (int e = 0; e < 2; ++e)
            bp[(std::size_t(q) * held + pr) * 2 * panel + 2 * jj + e] =
                b[std::size_t(pr) * ldb + 2 * (q * panel + jj) + e];
    std::vector<float> c = c0;
    cpu::gemm_bf16_panels(g.m, g.n, g.kpairs, a.data(), a_rs, a_ps, bp.data(), panel, c.data(), ldc,
                          g.accumulate, extra_pairs ? held : 0);
    return c;
  }

  // Empty when c is right, else a description of the first wrong element.
  std::string check(const std::vector<float>& c) const {
    for (int r = 0; r < g.m; ++r)
      for (int j = 0; j < ldc; ++j) {
        const float got = c[std::size_t(r) * ldc + j];
        bool ok;
        double want;
        if (j >= g.n) {
          want = -12345.0;
          ok = got == -12345.0f;
        } else {
          want = ref[std::size_t(r) * g.n + j];
          ok = std::fabs(got - want) <= bound[std::size_t(r) * g.n + j];
        }
        if (!ok)
          return "m " + std::to_string(g.m) + " n " + std::to_string(g.n) + " kpairs " +
                 std::to_string(g.kpairs) + (g.transposed_a ? " A^T" : " A") +
                 (g.accumulate ? " acc" : "") + ": C(" + std::to_string(r) + ", " +
                 std::to_string(j) + ") = " + std::to_string(got) + ", want " +
                 std::to_string(want);
      }
    return "";
  }
};

std::vector<GemmCase> gemm_cases() {
  std::vector<GemmCase> cases;
  for (int m : {1, 15, 16, 17, 33, 64, 70})
    for (int n : {16, 48, 64, 80})
      for (int kpairs : {1, 15, 16, 17, 33, 64})
        for (bool t : {false, true})
          for (bool acc : {false, true}) cases.push_back({m, n, kpairs, t, acc});
  return cases;
}

// Restores the path switches on scope exit.
struct PathGuard {
  bool dot = cpu::g_bf16_dot, amx = cpu::g_amx;
  ~PathGuard() {
    cpu::g_bf16_dot = dot;
    cpu::g_amx = amx;
  }
};

TEST(CpuGemmBf16, Avx512MatchesFp64) {
  PathGuard guard;
  cpu::g_amx = false;
  if (!cpu::bf16_dot_available()) GTEST_SKIP() << "this CPU has no AVX512_BF16";
  unsigned seed = 1;
  for (const GemmCase& gc : gemm_cases()) {
    const GemmData d(gc, seed++);
    const std::string err = d.check(d.run());
    ASSERT_TRUE(err.empty()) << err;
  }
}

TEST(CpuGemmBf16, AmxMatchesFp64AndAvx512) {
  PathGuard guard;
  if (!cpu::amx_available())
    GTEST_SKIP() << "no AMX here (needs amx_tile + amx_bf16 and the OS's XTILEDATA permission); "
                    "the AMX GEMM path is compiled but not taken";
  unsigned seed = 1000;
  for (const GemmCase& gc : gemm_cases()) {
    const GemmData d(gc, seed++);
    cpu::g_amx = true;
    const std::vector<float> amx = d.run();  // outside a scope: configures and releases per call
    std::vector<float> scoped;
    {
      const cpu::Bf16GemmScope scope(true);
      scoped = d.run();
    }
    cpu::g_amx = false;
    const std::vector<float> avx = d.run();
    std::string err = d.check(amx);
    ASSERT_TRUE(err.empty()) << "AMX: " << err;
    err = d.check(scoped);
    ASSERT_TRUE(err.empty()) << "AMX in a scope: " << err;
    err = d.check(avx);
    ASSERT_TRUE(err.empty()) << "AVX-512: " << err;
    ASSERT_EQ(std::memcmp(amx.data(), scoped.data(), amx.size() * sizeof(float)), 0)
        << "scoped and unscoped AMX differ";
  }
}

// 32-column panels (the AMX staging layout) and panel == n (the plain
// layout), on AMX where the CPU has it and on AVX-512-BF16 panel by panel.
TEST(CpuGemmBf16, PanelsMatchFp64) {
  PathGuard guard;
  if (!cpu::bf16_dot_available()) GTEST_SKIP() << "this CPU has no AVX512_BF16";
  unsigned seed = 2000;
  for (bool amx : {false, true}) {
    cpu::g_amx = amx;
    if (amx && !cpu::amx_available()) continue;  // AMX-less CPU: the AVX-512 half ran
    const cpu::Bf16GemmScope scope(true);
    for (int m : {1, 16, 17, 48, 128})
      for (int n : {32, 64, 96, 256})
        for (int kpairs : {1, 16, 17, 64, 128})
          for (bool t : {false, true})
            for (bool acc : {false, true}) {
              const GemmData d({m, n, kpairs, t, acc}, seed++);
              for (int panel : {cpu::kBf16BPanel, cpu::kBf16BPanelAvx512, n}) {
                if (n % panel) continue;
                for (int extra : {0, 5}) {
                  const std::string err = d.check(d.run_panels(panel, extra));
                  ASSERT_TRUE(err.empty()) << (amx ? "AMX" : "AVX-512") << " panel " << panel
                                           << " extra pairs " << extra << ": " << err;
                }
              }
            }
  }
}

TEST(CpuGemmBf16, AmxScopesPerThread) {
  // Every OpenMP thread holds its own tile configuration (a scope per thread,
  // as the kernels' parallel regions do), several problems per thread.
  PathGuard guard;
  if (!cpu::amx_available()) GTEST_SKIP() << "no AMX here; the AMX GEMM path is not taken";
  std::vector<GemmCase> cases;
  for (int i = 0; i < 64; ++i) cases.push_back({16 + i % 3 * 24, 64, 16 + i % 5 * 8, i % 2 == 1, i % 4 < 2});
  std::vector<GemmData> data;
  for (std::size_t i = 0; i < cases.size(); ++i) data.emplace_back(cases[i], 5000u + unsigned(i));
  std::vector<std::string> errs(cases.size());
  ORCHARD_OMP("omp parallel")
  {
    const cpu::Bf16GemmScope scope(true);
    ORCHARD_OMP("omp for schedule(dynamic, 1)")
    for (int i = 0; i < int(cases.size()); ++i) errs[i] = data[i].check(data[i].run());
  }
  for (const std::string& e : errs) ASSERT_TRUE(e.empty()) << e;
}

TEST(CpuGemmBf16, PackARowsMatchesScalar) {
  // The A^T -> row-major pack of the AMX path (AVX-512 16 x 16 transposes
  // where the CPU has them), odd sizes around the 16-word blocks.
  for (int m : {1, 16, 17, 40, 64})
    for (int kpairs : {1, 15, 16, 33, 64})
      for (bool t : {false, true}) {
        const GemmData d({m, 16, kpairs, t, false}, 7u);
        const std::int64_t ldw = kpairs + 3;
        std::vector<std::uint32_t> got(std::size_t(m) * ldw, 0xdeadbeefu);
        cpu::pack_a_pairs_rows(m, kpairs, d.a.data(), d.a_rs, d.a_ps, got.data(), ldw);
        for (int r = 0; r < m; ++r)
          for (int p = 0; p < ldw; ++p) {
            std::uint32_t want = 0xdeadbeefu;
            if (p < kpairs) std::memcpy(&want, d.a.data() + r * d.a_rs + p * d.a_ps, 4);
            ASSERT_EQ(got[std::size_t(r) * ldw + p], want)
                << "m " << m << " kpairs " << kpairs << (t ? " A^T" : " A") << " at (" << r
                << ", " << p << ")";
          }
      }
}

}  // namespace
}  // namespace orchard::test
