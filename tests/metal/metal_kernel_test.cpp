// The Metal kernels, run on the emulated execution model, against the naive double
// reference (tests/cpp/reference.h) with the suite's tolerance rule: error vs exact <=
// 2 x the error of the naive computation in the same precision + a small atol.
// Covers every head-dim bucket in all three dtypes, causal in both alignments, GQA/MQA,
// dropout (mask identical to the CPU backend's), tails, and strided/sliced views.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "backends/metal/metal_kernels.h"
#include "core/backend.h"
#include "metal_launch.h"
#include "reference.h"
#include "test_util.h"

namespace orchard::test {
namespace {

double atol_for(DType dt) { return dt == DType::kFloat32 ? 2e-6 : 1e-4; }

// Inputs in `layout`, gradients in another one (destinations may be any view), LSE
// with padded strides.
struct KernelRun {
  Case c;
  RefProblem prob;
  Tensor4 q, k, v, out, dout, dq, dk, dv;
  std::vector<float> lse;
  std::int64_t lse_head_stride = 0, lse_batch_stride = 0;
  std::vector<std::uint8_t> mask;

  explicit KernelRun(const Case& cs) : c(cs) {
    std::mt19937 rng(cs.seed * 7919u + 17u);
    q = Tensor4(c.dt, c.b, c.sq, c.hq, c.d, c.layout);
    k = Tensor4(c.dt, c.b, c.sk, c.hkv, c.d, c.layout);
    v = Tensor4(c.dt, c.b, c.sk, c.hkv, c.d, c.layout);
    out = Tensor4(c.dt, c.b, c.sq, c.hq, c.d, c.layout);
    dout = Tensor4(c.dt, c.b, c.sq, c.hq, c.d, c.layout);
    const Layout gl = c.layout == Layout::kBSHD ? Layout::kSliced : Layout::kBSHD;
    dq = Tensor4(c.dt, c.b, c.sq, c.hq, c.d, gl);
    dk = Tensor4(c.dt, c.b, c.sk, c.hkv, c.d, gl);
    dv = Tensor4(c.dt, c.b, c.sk, c.hkv, c.d, gl);
    for (Tensor4* t : {&q, &k, &v, &dout}) t->fill_normal(rng);
    lse_head_stride = c.sq + 3;
    lse_batch_stride = lse_head_stride * c.hq + 1;
    lse.assign(std::size_t(lse_batch_stride * c.b + 1), NAN);
    prob.b = c.b, prob.sq = c.sq, prob.sk = c.sk, prob.hq = c.hq, prob.hkv = c.hkv, prob.d = c.d;
    prob.scale = static_cast<float>(1.0 / std::sqrt(double(c.d)));
    prob.causal = c.causal != Causal::kNone;
    prob.causal_offset = c.causal == Causal::kBottomRight ? c.sk - c.sq : 0;
    prob.dropout_p = c.dropout;
    prob.seed = 0x1234567890abcdefull + cs.seed;
    prob.offset = 0x0000000500000042ull + cs.seed;  // a high half too: it enters the counter
    prob.drop_row = cs.drop_row, prob.drop_col = cs.drop_col, prob.drop_head = cs.drop_head;
    prob.drop_heads = cs.drop_heads;
  }
  std::vector<double> lse_vec() const {
    std::vector<double> r;
    for (int bi = 0; bi < c.b; ++bi)
      for (int h = 0; h < c.hq; ++h)
        for (int i = 0; i < c.sq; ++i) r.push_back(lse[std::size_t(bi * lse_batch_stride + h * lse_head_stride + i)]);
    return r;
  }
  FwdParams fwd_params() {
    FwdParams p;
    p.q = q.data(), p.k = k.data(), p.v = v.data(), p.out = out.data(), p.lse = lse.data();
    p.q_batch_stride = q.sb, p.q_row_stride = q.ss, p.q_head_stride = q.sh;
    p.k_batch_stride = k.sb, p.k_row_stride = k.ss, p.k_head_stride = k.sh;
    p.v_batch_stride = v.sb, p.v_row_stride = v.ss, p.v_head_stride = v.sh;
    p.o_batch_stride = out.sb, p.o_row_stride = out.ss, p.o_head_stride = out.sh;
    p.lse_batch_stride = lse_batch_stride, p.lse_head_stride = lse_head_stride;
    p.b = c.b, p.sq = c.sq, p.sk = c.sk, p.hq = c.hq, p.hkv = c.hkv, p.d = c.d;
    p.scale = static_cast<float>(prob.scale);
    p.scale_f64 = prob.scale;
    p.causal = prob.causal;
    p.causal_offset = prob.causal_offset;
    p.dropout_p = c.dropout;
    p.dropout_p_f64 = c.dropout;
    p.seed = prob.seed, p.offset = prob.offset;
    p.dropout_row_offset = c.drop_row, p.dropout_col_offset = c.drop_col;
    p.dropout_head_offset = c.drop_head, p.dropout_heads = c.drop_heads;
    p.dtype = c.dt;
    if (c.dropout > 0) {
      mask.assign(std::size_t(c.b) * c.hq * c.sq * c.sk, 0xAB);
      p.dropout_mask = mask.data();
    }
    return p;
  }
  BwdParams bwd_params() {
    BwdParams p;
    static_cast<FwdParams&>(p) = fwd_params();
    p.dropout_mask = nullptr;
    p.dout = dout.data();
    p.dq = dq.data(), p.dk = dk.data(), p.dv = dv.data();
    p.do_batch_stride = dout.sb, p.do_row_stride = dout.ss, p.do_head_stride = dout.sh;
    p.dq_batch_stride = dq.sb, p.dq_row_stride = dq.ss, p.dq_head_stride = dq.sh;
    p.dk_batch_stride = dk.sb, p.dk_row_stride = dk.ss, p.dk_head_stride = dk.sh;
    p.dv_batch_stride = dv.sb, p.dv_row_stride = dv.ss, p.dv_head_stride = dv.sh;
    return p;
  }
};

void expect_close(const char* what, const Case& c, const std::vector<double>& got, const std::vector<double>& exact,
                  const std::vector<double>& naive) {
  const double err = max_abs_diff(got, exact);
  const double naive_err = max_abs_diff(naive, exact);
  const double tol = 2.0 * naive_err + atol_for(c.dt);
  if (std::getenv("ORCHARD_TEST_VERBOSE"))
    std::printf("%-4s %-60s err %.3g naive %.3g tol %.3g\n", what, c.name().c_str(), err, naive_err, tol);
  EXPECT_LE(err, tol) << what << " " << c.name() << ": err " << err << " naive err " << naive_err;
}

void check_case(const Case& c) {
  SCOPED_TRACE(c.name());
  KernelRun r(c);
  const FwdParams fp = r.fwd_params();
  ASSERT_EQ(metal::check_support(fp), "");
  metal_emu::emulate_forward(fp);

  const auto qd = r.q.to_double(), kd = r.k.to_double(), vd = r.v.to_double(), dod = r.dout.to_double();
  const RefForward ref = ref_forward(r.prob, qd, kd, vd);
  auto rnd = [dt = c.dt](double x) { return round_to(dt, x); };
  const LowPrecision<decltype(rnd)> R{rnd};
  const RefForward naive = ref_forward(r.prob, qd, kd, vd, R);
  EXPECT_EQ(r.out.count_nan(), 0u) << "unwritten out elements";
  EXPECT_EQ(r.out.count_outside_written(), 0u);
  expect_close("out", c, r.out.to_double(), ref.out, naive.out);
  const auto lse = r.lse_vec();
  for (std::size_t i = 0; i < lse.size(); ++i) {
    ASSERT_FALSE(std::isnan(lse[i])) << "lse[" << i << "] unwritten";
    if (std::isinf(ref.lse[i]))
      ASSERT_EQ(lse[i], ref.lse[i]) << "lse[" << i << "]";
    else
      ASSERT_NEAR(lse[i], ref.lse[i], 2e-5 * std::max(1.0, std::fabs(ref.lse[i]))) << "lse[" << i << "]";
  }
  if (c.dropout > 0) {
    // The same mask as the CPU backend (and philox.h), causally hidden elements included.
    KernelRun cpu_run(c);
    detail::cpu_backend().forward(cpu_run.fwd_params());
    ASSERT_EQ(r.mask, cpu_run.mask);
    for (int bi = 0; bi < c.b; ++bi)
      for (int h = 0; h < c.hq; ++h)
        for (int i = 0; i < c.sq; ++i)
          for (int j = 0; j < c.sk; ++j)
            ASSERT_EQ(r.mask[((std::size_t(bi) * c.hq + h) * c.sq + i) * c.sk + j], r.prob.keep(bi, h, i, j) ? 1 : 0);
  }

  metal_emu::emulate_backward(r.bwd_params());
  const RefBackward gref = ref_backward(r.prob, qd, kd, vd, dod);
  const RefBackward gnaive = ref_backward(r.prob, qd, kd, vd, dod, R);
  for (Tensor4* t : {&r.dq, &r.dk, &r.dv}) {
    EXPECT_EQ(t->count_nan(), 0u) << "unwritten gradient elements";
    EXPECT_EQ(t->count_outside_written(), 0u);
  }
  expect_close("dq", c, r.dq.to_double(), gref.dq, gnaive.dq);
  expect_close("dk", c, r.dk.to_double(), gref.dk, gnaive.dk);
  expect_close("dv", c, r.dv.to_double(), gref.dv, gnaive.dv);
}

const DType kDTypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};

// One shape per head-dim bucket (d at and below the bucket size), lengths that are not
// multiples of any tile, sq < sk and sq > sk, GQA and MQA; each in all three dtypes with
// the causal mode and layout rotating.
std::vector<Case> grid_cases() {
  struct Shape {
    int b, sq, sk, hq, hkv, d;
  };
  const Shape shapes[] = {
      {2, 37, 21, 2, 1, 3},  {1, 33, 45, 3, 3, 64}, {1, 19, 40, 2, 1, 80},  {1, 41, 17, 4, 2, 128},
      {1, 13, 27, 2, 2, 136}, {1, 25, 18, 2, 1, 192}, {1, 21, 23, 2, 1, 256}, {1, 9, 7, 1, 1, 32},
  };
  std::vector<Case> cases;
  std::uint32_t seed = 1;
  int rot = 0;
  for (const Shape& s : shapes)
    for (DType dt : kDTypes) {
      Case c{s.b, s.sq, s.sk, s.hq, s.hkv, s.d};
      c.dt = dt;
      c.causal = static_cast<Causal>(rot % 3);
      c.layout = static_cast<Layout>((rot / 3 + rot) % 3);
      c.seed = seed++;
      ++rot;
      cases.push_back(c);
    }
  return cases;
}

class MetalKernelGrid : public ::testing::TestWithParam<Case> {};
TEST_P(MetalKernelGrid, MatchesReference) { check_case(GetParam()); }
INSTANTIATE_TEST_SUITE_P(Grid, MetalKernelGrid, ::testing::ValuesIn(grid_cases()),
                         [](const auto& info) { return info.param.name(); });

// Dropout (with causal in both alignments and GQA); fully masked rows (causal
// bottom-right with sq > sk) must give O = 0, LSE = -inf and zero gradients.
std::vector<Case> feature_cases() {
  std::vector<Case> cases;
  std::uint32_t seed = 100;
  int rot = 0;
  for (DType dt : kDTypes) {
    Case drop{1, 35, 29, 4, 2, 40};
    drop.dt = dt, drop.dropout = 0.17f, drop.causal = static_cast<Causal>(rot++ % 3), drop.seed = seed++;
    drop.layout = Layout::kBHSD;
    cases.push_back(drop);
    Case masked{1, 30, 12, 2, 1, 24};
    masked.dt = dt, masked.causal = Causal::kBottomRight, masked.seed = seed++;
    masked.dropout = dt == DType::kFloat32 ? 0.5f : 0.0f;
    cases.push_back(masked);
    // Dropout's global coordinates (context parallelism): the mask is the CPU backend's
    // and the reference's with the same offsets (an odd column offset included).
    Case at{2, 21, 30, 4, 2, 32};
    at.dt = dt, at.dropout = 0.25f, at.causal = static_cast<Causal>(rot++ % 3), at.seed = seed++;
    at.drop_row = 17 + rot, at.drop_col = 2 * rot + 1, at.drop_head = 2, at.drop_heads = 8;
    cases.push_back(at);
  }
  return cases;
}

class MetalKernelFeatures : public ::testing::TestWithParam<Case> {};
TEST_P(MetalKernelFeatures, MatchesReference) { check_case(GetParam()); }
INSTANTIATE_TEST_SUITE_P(Features, MetalKernelFeatures, ::testing::ValuesIn(feature_cases()),
                         [](const auto& info) { return info.param.name(); });

TEST(MetalKernel, DropoutFractionMatchesP) {
  Case c{1, 64, 256, 2, 1, 8};
  c.dropout = 0.3f;
  KernelRun r(c);
  metal_emu::emulate_forward(r.fwd_params());
  std::size_t dropped = 0;
  for (std::uint8_t m : r.mask) dropped += m == 0;
  EXPECT_NEAR(double(dropped) / r.mask.size(), 0.3, 0.01);
}

TEST(MetalKernel, RngStateReplacesSeedAndOffset) {
  Case c{1, 9, 13, 2, 1, 8};
  c.dropout = 0.4f;
  KernelRun by_value(c), by_pointer(c);
  metal_emu::emulate_forward(by_value.fwd_params());
  FwdParams p = by_pointer.fwd_params();
  const std::uint64_t state[2] = {p.seed, p.offset};
  p.seed = ~p.seed;
  p.rng_state = state;
  metal_emu::emulate_forward(p);
  EXPECT_EQ(by_value.mask, by_pointer.mask);
}

}  // namespace
}  // namespace orchard::test
