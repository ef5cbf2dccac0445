// Standalone check + timing of the CPU backend's bf16 tile GEMM
// (src/backends/cpu/gemm_bf16.h) at the shapes the attention kernels call,
// AMX vs AVX-512-BF16, one thread; no GoogleTest needed, so it runs on a host
// that has only a compiler:
//   g++ -O2 -std=c++20 -fopenmp -Isrc -Iinclude bench/cpu_gemm_micro.cpp \
//       src/backends/cpu/gemm_bf16.cpp src/backends/cpu/softmax_tile.cpp -o /tmp/gemm_micro
//   /tmp/gemm_micro
// Also times the forward's per-tile softmax (fp32 P + to_bf16_rows, and the
// fused bf16 variant) at 64-row tiles of 64 and 256 columns, d 128.
// Correctness: every (m, n, kpairs, A layout, accumulate) of a grid with odd
// sizes against an fp64 product of the same bf16 values (C poisoned with NaN
// where it is overwritten); exit 1 on a mismatch.
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "backends/cpu/gemm_bf16.h"
#include "backends/cpu/softmax_tile.h"

using orchard::cpu::gemm_bf16;

static std::uint16_t to_bf16(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fff + ((u >> 16) & 1);
  return std::uint16_t(u >> 16);
}
static float from_bf16(std::uint16_t h) {
  const std::uint32_t u = std::uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Problem {
  int m, n, kp;
  bool t, acc;
  std::int64_t a_rs, a_ps, ldb, ldc;
  std::vector<std::uint16_t> a, b;
  std::vector<float> c0;
  Problem(int m_, int n_, int kp_, bool t_, bool acc_, unsigned seed)
      : m(m_), n(n_), kp(kp_), t(t_), acc(acc_) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd;
    const std::uint16_t nan16 = to_bf16(std::numeric_limits<float>::quiet_NaN());
    if (t) { a_rs = 2; a_ps = 2 * m + 6; a.assign(std::size_t(kp) * a_ps + 2 * m, nan16); }
    else { a_rs = 2 * kp + 4; a_ps = 2; a.assign(std::size_t(m) * a_rs, nan16); }
    ldb = 2 * n + 32;
    b.assign(std::size_t(kp) * ldb, nan16);
    ldc = n + 16;
    for (int r = 0; r < m; ++r)
      for (int k = 0; k < 2 * kp; ++k) A(r, k) = to_bf16(nd(rng));
    for (int k = 0; k < 2 * kp; ++k)
      for (int j = 0; j < n; ++j) B(k, j) = to_bf16(nd(rng));
    c0.assign(std::size_t(m) * ldc, -12345.0f);
    for (int r = 0; r < m; ++r)
      for (int j = 0; j < n; ++j)
        c0[r * ldc + j] = acc ? nd(rng) : std::numeric_limits<float>::quiet_NaN();
  }
  std::uint16_t& A(int r, int k) { return a[r * a_rs + (k / 2) * a_ps + k % 2]; }
  std::uint16_t& B(int k, int j) { return b[(k / 2) * ldb + 2 * j + k % 2]; }
  void run(float* c) const { gemm_bf16(m, n, kp, a.data(), a_rs, a_ps, b.data(), ldb, c, ldc, acc); }
  bool check(const std::vector<float>& c) {
    for (int r = 0; r < m; ++r)
      for (int j = 0; j < ldc; ++j) {
        const float got = c[r * ldc + j];
        if (j >= n) {
          if (got != -12345.0f) return report(r, j, got, -12345.0);
          continue;
        }
        double s = acc ? c0[r * ldc + j] : 0.0, abs_s = std::fabs(s);
        for (int k = 0; k < 2 * kp; ++k) {
          const double pr = double(from_bf16(A(r, k))) * from_bf16(B(k, j));
          s += pr;
          abs_s += std::fabs(pr);
        }
        if (!(std::fabs(got - s) <= (2 * kp + 2) * 0x1p-24 * abs_s + 1e-30)) return report(r, j, got, s);
      }
    return true;
  }
  bool report(int r, int j, float got, double want) const {
    std::printf("MISMATCH m %d n %d kpairs %d %s%s: C(%d,%d) = %g want %g\n", m, n, kp,
                t ? "A^T" : "A", acc ? " acc" : "", r, j, got, want);
    return false;
  }
};

int main() {
  const bool amx = orchard::cpu::amx_available();
  std::printf("bf16_dot_available %d amx_available %d\n", orchard::cpu::bf16_dot_available(), amx);
  if (!orchard::cpu::bf16_dot_available()) return 0;
  int bad = 0, cases = 0;
  for (int path = amx ? 0 : 1; path < 2; ++path) {
    orchard::cpu::g_amx = path == 0;
    for (int m : {1, 15, 16, 17, 31, 33, 64, 70})
      for (int n : {16, 48, 64, 80, 128})
        for (int kp : {1, 8, 15, 16, 17, 33, 64, 65})
          for (bool t : {false, true})
            for (bool acc : {false, true}) {
              Problem p(m, n, kp, t, acc, unsigned(m * 7919 + n * 31 + kp * 3 + t + 2 * acc));
              std::vector<float> c = p.c0;
              p.run(c.data());
              ++cases;
              if (!p.check(c) && ++bad > 10) return 1;
            }
    std::printf("%s: %d cases, %d mismatches\n", path == 0 ? "AMX" : "AVX512-BF16", cases, bad);
    cases = 0;
  }
  if (bad) return 1;
  // Timing: the attention kernels' shapes (64-row blocks, 64-column tiles).
  struct Shape { const char* what; int m, n, kp; bool t; bool acc; };
  const Shape shapes[] = {
      {"fwd S=QK^T d64", 64, 64, 32, false, false},  {"fwd S=QK^T d128", 64, 64, 64, false, false},
      {"fwd O+=PV d64", 64, 64, 32, false, true},    {"fwd O+=PV d128", 64, 128, 32, false, true},
      {"bwd dV+=P^T dO d128", 64, 128, 32, true, true}, {"bwd dQ+=dS K d128", 64, 128, 32, false, true},
      {"tail 17x64 k64", 17, 64, 64, false, false},  {"32x64 k32", 32, 64, 32, false, false},
      {"16x64 k16", 16, 64, 16, false, false}};
  std::printf("\n| shape | m x n x k | AVX512-BF16 ns | AMX ns (scoped) | AMX ns (per-call config) |\n|---|---|---|---|---|\n");
  for (const Shape& s : shapes) {
    Problem p(s.m, s.n, s.kp, s.t, s.acc, 1);
    std::vector<float> c(p.c0.size(), 0.0f);
    auto time_ns = [&](int path, bool scoped) {
      orchard::cpu::g_amx = path == 0;
      orchard::cpu::Bf16GemmScope scope(scoped);
      double best = 1e30;
      for (int rep = 0; rep < 7; ++rep) {
        const int iters = 2000;
        const auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < iters; ++i) p.run(c.data());
        const auto t1 = std::chrono::steady_clock::now();
        best = std::min(best, std::chrono::duration<double, std::nano>(t1 - t0).count() / iters);
      }
      return best;
    };
    const double avx = time_ns(1, false);
    const double amx_s = amx ? time_ns(0, true) : NAN, amx_u = amx ? time_ns(0, false) : NAN;
    std::printf("| %s | %dx%dx%d | %.0f | %.0f | %.0f |\n", s.what, s.m, s.n, 2 * s.kp, avx, amx_s, amx_u);
  }
  // The forward's row work per tile: softmax update (+ P to bf16), rows 64, d 128.
  std::printf("\n| softmax tile | fp32 P + to_bf16_rows ns | fused bf16 P ns |\n|---|---|---|\n");
  for (int bc : {64, 128, 256}) {
    const int rows = 64, dp = 128;
    std::mt19937 rng(3);
    std::normal_distribution<float> nd;
    std::vector<float> s0(rows * bc), s(rows * bc), o(rows * dp, 1.0f), m(rows), l(rows);
    for (auto& x : s0) x = nd(rng);
    std::vector<int> nv(rows, bc);
    std::vector<std::uint16_t> p16(rows * bc);
    auto time_ns = [&](bool fused) {
      double best = 1e30;
      for (int rep = 0; rep < 7; ++rep) {
        const int iters = 1000;
        const auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < iters; ++i) {
          // m from a previous tile 0.5 below: every row rescales its output (the common case early on)
          for (int r = 0; r < rows; ++r) { m[r] = 1.0f; l[r] = 1.0f; }
          if (fused) {
            orchard::cpu::softmax_tile_update_bf16(s0.data(), rows, bc, nv.data(), 0.125f, m.data(), l.data(), o.data(), dp, dp, p16.data());
          } else {
            std::memcpy(s.data(), s0.data(), s.size() * 4);
            orchard::cpu::softmax_tile_update(s.data(), rows, bc, nv.data(), 0.125f, m.data(), l.data(), o.data(), dp, dp);
            orchard::cpu::to_bf16_rows(s.data(), bc, rows, bc, p16.data(), bc);
          }
        }
        const auto t1 = std::chrono::steady_clock::now();
        best = std::min(best, std::chrono::duration<double, std::nano>(t1 - t0).count() / iters);
      }
      return best;
    };
    std::printf("| 64x%d (d 128) | %.0f | %.0f |\n", bc, time_ns(false), time_ns(true));
  }
  return 0;
}
