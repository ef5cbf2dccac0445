// Tests of the Metal emulator itself: simdgroup_matrix semantics, and that barrier and
// collective divergence fail loudly instead of running on.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "emulator_runtime.h"
#include "emulator_selftest_kernels.h"

namespace orchard::metal_emu {
namespace {

TEST(MetalEmulator, SimdgroupMatrixLoadTransposeMultiplyStore) {
  std::mt19937 rng(3);
  std::normal_distribution<float> dist;
  std::vector<float> a(64), b(64), c(64, -1.0f);
  for (auto& x : a) x = dist(rng);
  for (auto& x : b) x = dist(rng);
  run_grid(1, 32, [&](const ThreadIds& t) { selftest::matrix_ops(a.data(), b.data(), c.data(), t.thread); });
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) {
      double want = a[i * 8 + j];
      for (int k = 0; k < 8; ++k) want += double(a[i * 8 + k]) * b[j * 8 + k];
      EXPECT_NEAR(c[i * 8 + j], want, 1e-5) << i << "," << j;
    }
}

TEST(MetalEmulator, TanhAndPreciseTanhAreTheLibraryTanh) {
  std::vector<float> x(32), out(64, 0.0f);
  for (int i = 0; i < 32; ++i) x[i] = -4.0f + 0.25f * float(i);
  run_grid(1, 32, [&](const ThreadIds& t) { selftest::math_builtins(x.data(), out.data(), t.thread); });
  for (int i = 0; i < 32; ++i) {
    EXPECT_EQ(out[2 * i], std::tanh(x[i])) << x[i];
    EXPECT_EQ(out[2 * i + 1], std::tanh(x[i])) << x[i];
  }
}

TEST(MetalEmulator, BarrierReachedBySomeThreadsFails) {
  try {
    run_grid(2, 64, [](const ThreadIds& t) { selftest::divergent_barrier(t.thread, 40); });
    FAIL() << "no error";
  } catch (const EmulationError& e) {
    EXPECT_NE(std::string(e.what()).find("barrier divergence"), std::string::npos) << e.what();
  }
  // All threads taking the barrier is fine.
  EXPECT_NO_THROW(run_grid(2, 64, [](const ThreadIds& t) { selftest::divergent_barrier(t.thread, 64); }));
}

TEST(MetalEmulator, NonUniformSimdgroupLoadFails) {
  std::vector<float> src(72, 1.0f);
  try {
    run_grid(1, 64, [&](const ThreadIds& t) { selftest::divergent_collective(src.data(), t.lane); });
    FAIL() << "no error";
  } catch (const EmulationError& e) {
    EXPECT_NE(std::string(e.what()).find("lane 5"), std::string::npos) << e.what();
  }
}

TEST(MetalEmulator, RejectsPartialSimdgroups) {
  EXPECT_THROW(run_grid(1, 48, [](const ThreadIds&) {}), EmulationError);
}

TEST(MetalEmulator, ExceptionInAThreadIsReported) {
  EXPECT_THROW(run_grid(1, 32,
                        [](const ThreadIds& t) {
                          if (t.thread == 3) throw std::runtime_error("boom");
                        }),
               EmulationError);
}

}  // namespace
}  // namespace orchard::metal_emu
