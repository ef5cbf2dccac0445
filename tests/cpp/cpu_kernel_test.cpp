// Kernel-level tests of the CPU backend: hand-built FwdParams/BwdParams,
// compared against the naive double reference (reference.h).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "backends/cpu/gemm_bf16.h"
#include "backends/cpu/split_bf16x3.h"
#include "backends/cpu/kernel_common.h"
#include "core/backend.h"
#include "reference.h"
#include "test_util.h"

namespace orchard::test {
namespace {

// Tolerance rule: err(kernel vs exact) <= 2 * err(naive same-precision vs exact) + atol.
double atol_for(DType dt) {
  switch (dt) {
    case DType::kFloat64: return 1e-12;
    case DType::kFloat32: return 2e-6;
    default: return 1e-4;
  }
}

struct KernelRun {
  Case c;
  RefProblem prob;
  Tensor4 q, k, v, out, dout, dq, dk, dv;
  std::vector<unsigned char> lse_bytes;  // (b, hq, sq) with a padded head stride
  std::int64_t lse_head_stride = 0, lse_batch_stride = 0;
  std::vector<std::uint8_t> mask;

  explicit KernelRun(const Case& cs) : c(cs) {
    std::mt19937 rng(cs.seed * 7919u + 17u);
    q = Tensor4(c.dt, c.b, c.sq, c.hq, c.d, c.layout);
    k = Tensor4(c.dt, c.b, c.sk, c.hkv, c.d, c.layout);
    v = Tensor4(c.dt, c.b, c.sk, c.hkv, c.d, c.layout);
    out = Tensor4(c.dt, c.b, c.sq, c.hq, c.d, c.layout);
    dout = Tensor4(c.dt, c.b, c.sq, c.hq, c.d, c.layout);
    // Gradients in a different layout than the inputs: destinations may be any view.
    const Layout gl = c.layout == Layout::kBSHD ? Layout::kSliced : Layout::kBSHD;
    dq = Tensor4(c.dt, c.b, c.sq, c.hq, c.d, gl);
    dk = Tensor4(c.dt, c.b, c.sk, c.hkv, c.d, gl);
    dv = Tensor4(c.dt, c.b, c.sk, c.hkv, c.d, gl);
    q.fill_normal(rng);
    k.fill_normal(rng);
    v.fill_normal(rng);
    dout.fill_normal(rng);
    lse_head_stride = c.sq + (c.layout == Layout::kSliced ? 3 : 0);
    lse_batch_stride = lse_head_stride * c.hq + (c.layout == Layout::kSliced ? 1 : 0);
    const std::size_t lse_elems = std::size_t(std::max<std::int64_t>(1, lse_batch_stride * c.b));
    lse_bytes.assign(lse_elems * lse_size(), 0);
    for (std::size_t i = 0; i < lse_elems; ++i) set_lse_raw(i, NAN);

    prob.b = c.b; prob.sq = c.sq; prob.sk = c.sk; prob.hq = c.hq; prob.hkv = c.hkv; prob.d = c.d;
    prob.scale = 1.0 / std::sqrt(double(c.d));
    prob.scale = static_cast<float>(prob.scale);  // the kernel receives a float
    prob.causal = c.causal != Causal::kNone;
    prob.causal_offset = c.causal == Causal::kBottomRight ? c.sk - c.sq : 0;
    prob.dropout_p = c.dropout;
    prob.seed = 0x1234567890abcdefull + cs.seed;
    prob.offset = 42 + cs.seed;
    prob.drop_row = cs.drop_row, prob.drop_col = cs.drop_col, prob.drop_head = cs.drop_head;
    prob.drop_heads = cs.drop_heads;
  }
  std::size_t lse_size() const { return c.dt == DType::kFloat64 ? 8 : 4; }
  void set_lse_raw(std::size_t i, double x) {
    if (lse_size() == 8) std::memcpy(lse_bytes.data() + 8 * i, &x, 8);
    else { float f = float(x); std::memcpy(lse_bytes.data() + 4 * i, &f, 4); }
  }
  double lse_at(int bi, int h, int i) const {
    const std::size_t e = std::size_t(bi * lse_batch_stride + h * lse_head_stride + i);
    if (lse_size() == 8) { double x; std::memcpy(&x, lse_bytes.data() + 8 * e, 8); return x; }
    float f; std::memcpy(&f, lse_bytes.data() + 4 * e, 4); return f;
  }
  std::vector<double> lse_vec() const {
    std::vector<double> r;
    for (int bi = 0; bi < c.b; ++bi)
      for (int h = 0; h < c.hq; ++h)
        for (int i = 0; i < c.sq; ++i) r.push_back(lse_at(bi, h, i));
    return r;
  }

  FwdParams fwd_params() {
    FwdParams p;
    p.q = q.data(); p.k = k.data(); p.v = v.data(); p.out = out.data();
    p.lse = lse_bytes.data();
    p.q_batch_stride = q.sb; p.q_row_stride = q.ss; p.q_head_stride = q.sh;
    p.k_batch_stride = k.sb; p.k_row_stride = k.ss; p.k_head_stride = k.sh;
    p.v_batch_stride = v.sb; p.v_row_stride = v.ss; p.v_head_stride = v.sh;
    p.o_batch_stride = out.sb; p.o_row_stride = out.ss; p.o_head_stride = out.sh;
    p.lse_batch_stride = lse_batch_stride; p.lse_head_stride = lse_head_stride;
    p.b = c.b; p.sq = c.sq; p.sk = c.sk; p.hq = c.hq; p.hkv = c.hkv; p.d = c.d;
    p.scale = static_cast<float>(prob.scale);
    p.scale_f64 = prob.scale;  // already float-rounded: the reference uses the same value
    p.causal = prob.causal;
    p.causal_offset = prob.causal_offset;
    p.dropout_p = c.dropout;
    p.dropout_p_f64 = static_cast<float>(c.dropout);
    p.seed = prob.seed; p.offset = prob.offset;
    p.dropout_row_offset = c.drop_row; p.dropout_col_offset = c.drop_col;
    p.dropout_head_offset = c.drop_head; p.dropout_heads = c.drop_heads;
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
    p.dq = dq.data(); p.dk = dk.data(); p.dv = dv.data();
    p.do_batch_stride = dout.sb; p.do_row_stride = dout.ss; p.do_head_stride = dout.sh;
    p.dq_batch_stride = dq.sb; p.dq_row_stride = dq.ss; p.dq_head_stride = dq.sh;
    p.dk_batch_stride = dk.sb; p.dk_row_stride = dk.ss; p.dk_head_stride = dk.sh;
    p.dv_batch_stride = dv.sb; p.dv_row_stride = dv.ss; p.dv_head_stride = dv.sh;
    return p;
  }
};

const detail::BackendOps& cpu() { return detail::cpu_backend(); }

void expect_close(const char* what, const Case& c, const std::vector<double>& got,
                  const std::vector<double>& exact_ref, const std::vector<double>& naive) {
  const double err = max_abs_diff(got, exact_ref);
  const double naive_err = c.dt == DType::kFloat64 ? 0.0 : max_abs_diff(naive, exact_ref);
  const double tol = 2.0 * naive_err + atol_for(c.dt);
  if (std::getenv("ORCHARD_TEST_VERBOSE"))
    std::printf("%-4s %-70s err %.3g naive %.3g tol %.3g\n", what, c.name().c_str(), err, naive_err, tol);
  EXPECT_LE(err, tol) << what << " " << c.name() << ": err " << err << " naive err " << naive_err;
}

// Forward + backward against the reference, every element written, no stray writes.
void check_case(const Case& c) {
  SCOPED_TRACE(c.name());
  KernelRun r(c);
  const FwdParams fp = r.fwd_params();
  ASSERT_EQ(cpu().check_support(fp), "");
  cpu().forward(fp);

  const auto qd = r.q.to_double(), kd = r.k.to_double(), vd = r.v.to_double(), dod = r.dout.to_double();
  const RefForward ref = ref_forward(r.prob, qd, kd, vd);
  auto rnd = [dt = c.dt](double x) { return round_to(dt, x); };
  const LowPrecision<decltype(rnd)> R{rnd};
  const bool lowp = c.dt != DType::kFloat64;
  const RefForward naive = lowp ? ref_forward(r.prob, qd, kd, vd, R) : ref;

  EXPECT_EQ(r.out.count_nan(), 0u) << "unwritten out elements";
  EXPECT_EQ(r.out.count_outside_written(), 0u);
  const auto out = r.out.to_double();
  expect_close("out", c, out, ref.out, naive.out);
  const auto lse = r.lse_vec();
  for (std::size_t i = 0; i < lse.size(); ++i) {
    ASSERT_FALSE(std::isnan(lse[i])) << "lse[" << i << "] unwritten";
    if (std::isinf(ref.lse[i])) {
      ASSERT_EQ(lse[i], ref.lse[i]) << "lse[" << i << "]";
    } else {
      ASSERT_NEAR(lse[i], ref.lse[i], c.dt == DType::kFloat64 ? 1e-12 : 2e-5) << "lse[" << i << "]";
    }
  }
  if (c.dropout > 0) {
    for (int bi = 0; bi < c.b; ++bi)
      for (int h = 0; h < c.hq; ++h)
        for (int i = 0; i < c.sq; ++i)
          for (int j = 0; j < c.sk; ++j)
            ASSERT_EQ(r.mask[((std::size_t(bi) * c.hq + h) * c.sq + i) * c.sk + j],
                      r.prob.keep(bi, h, i, j) ? 1 : 0)
                << "mask at " << bi << "," << h << "," << i << "," << j;
  }

  const BwdParams bp = r.bwd_params();
  ASSERT_EQ(cpu().backward_workspace_bytes(bp), 0u);
  cpu().backward(bp);
  // The reference backward sees the kernel's own (rounded) O only through
  // D in the kernel; it uses its own P, which is the right oracle.
  const RefBackward gref = ref_backward(r.prob, qd, kd, vd, dod);
  const RefBackward gnaive = lowp ? ref_backward(r.prob, qd, kd, vd, dod, R) : gref;
  for (Tensor4* t : {&r.dq, &r.dk, &r.dv}) {
    EXPECT_EQ(t->count_nan(), 0u) << "unwritten gradient elements";
    EXPECT_EQ(t->count_outside_written(), 0u);
  }
  expect_close("dq", c, r.dq.to_double(), gref.dq, gnaive.dq);
  expect_close("dk", c, r.dk.to_double(), gref.dk, gnaive.dk);
  expect_close("dv", c, r.dv.to_double(), gref.dv, gnaive.dv);
}

struct Shape {
  int b, sq, sk, hq, hkv, d;
};

// Odd sizes, sq != sk both ways, 1x1 / 1xN / Nx1, GQA and MQA, d not a power of two.
const Shape kShapes[] = {
    {1, 1, 1, 1, 1, 1},      {1, 1, 37, 2, 1, 3},     {2, 37, 1, 2, 2, 8},
    {1, 113, 203, 4, 2, 40}, {1, 203, 113, 2, 1, 80}, {2, 64, 64, 4, 4, 64},
    {1, 65, 129, 3, 1, 96},  {1, 17, 33, 2, 2, 160}, {1, 40, 72, 2, 1, 256},
    {1, 130, 97, 4, 2, 128},
};
const DType kDTypes[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16, DType::kFloat64};

std::vector<Case> grid_cases() {
  std::vector<Case> cases;
  std::uint32_t seed = 1;
  int li = 0;
  for (const Shape& s : kShapes)
    for (DType dt : kDTypes)
      for (Causal cm : {Causal::kNone, Causal::kBottomRight, Causal::kTopLeft}) {
        Case c{s.b, s.sq, s.sk, s.hq, s.hkv, s.d};
        c.dt = dt;
        c.causal = cm;
        c.layout = static_cast<Layout>(li++ % 3);
        c.seed = seed++;
        cases.push_back(c);
      }
  return cases;
}

class CpuKernelGrid : public ::testing::TestWithParam<Case> {};
TEST_P(CpuKernelGrid, MatchesReference) { check_case(GetParam()); }
INSTANTIATE_TEST_SUITE_P(Grid, CpuKernelGrid, ::testing::ValuesIn(grid_cases()),
                         [](const auto& info) { return info.param.name(); });

std::vector<Case> dropout_cases() {
  std::vector<Case> cases;
  std::uint32_t seed = 1000;
  const Shape shapes[] = {{1, 67, 93, 2, 1, 40}, {2, 33, 33, 2, 2, 64}, {1, 90, 50, 4, 2, 24}};
  int li = 0;
  for (const Shape& s : shapes)
    for (DType dt : kDTypes)
      for (Causal cm : {Causal::kNone, Causal::kBottomRight}) {
        Case c{s.b, s.sq, s.sk, s.hq, s.hkv, s.d};
        c.dt = dt;
        c.causal = cm;
        c.layout = static_cast<Layout>(li++ % 3);
        c.dropout = li % 2 ? 0.17f : 0.5f;
        c.seed = seed++;
        cases.push_back(c);
      }
  // With dropout's global coordinates (context parallelism): column offsets in every
  // residue mod 4 (a run of four columns then spans two Philox calls), head offsets.
  const int at[][4] = {{0, 1, 0, 0}, {130, 2, 1, 5}, {7, 67, 3, 8}, {1 << 20, 4096 + 3, 2, 4}};
  for (int i = 0; i < 4; ++i) {
    Case c{2, 45, 101, 2, 1, 24};
    c.dt = i % 2 ? DType::kFloat32 : DType::kBFloat16;
    c.causal = i % 2 ? Causal::kTopLeft : Causal::kNone;
    c.dropout = 0.3f;
    c.seed = seed++;
    c.drop_row = at[i][0], c.drop_col = at[i][1], c.drop_head = at[i][2], c.drop_heads = at[i][3];
    cases.push_back(c);
  }
  return cases;
}

class CpuKernelDropout : public ::testing::TestWithParam<Case> {};
TEST_P(CpuKernelDropout, MatchesReferenceWithSameMask) { check_case(GetParam()); }
INSTANTIATE_TEST_SUITE_P(Dropout, CpuKernelDropout, ::testing::ValuesIn(dropout_cases()),
                         [](const auto& info) { return info.param.name(); });

TEST(CpuKernel, DropoutFractionMatchesP) {
  for (float p : {0.1f, 0.5f, 0.9f}) {
    Case c{2, 256, 512, 4, 2, 16};
    c.dropout = p;
    c.causal = Causal::kBottomRight;  // hidden elements still get their mask bit
    KernelRun r(c);
    cpu().forward(r.fwd_params());
    std::size_t dropped = 0;
    for (std::uint8_t m : r.mask) {
      ASSERT_LE(m, 1);
      dropped += m == 0;
    }
    EXPECT_NEAR(double(dropped) / r.mask.size(), p, 0.01) << "p=" << p;
  }
}

TEST(CpuKernel, RngStateReplacesSeedAndOffset) {
  // FwdParams::rng_state (read when the kernel runs) keys the same mask as the
  // same (seed, offset) in the params, and the params' own pair is then ignored.
  Case c{2, 33, 47, 4, 2, 16};
  c.dropout = 0.3f;
  KernelRun by_value(c), by_pointer(c);
  cpu().forward(by_value.fwd_params());
  FwdParams p = by_pointer.fwd_params();
  const std::uint64_t state[2] = {p.seed, p.offset};
  p.seed = ~p.seed;
  p.offset += 1;
  p.rng_state = state;
  cpu().forward(p);
  EXPECT_EQ(by_value.mask, by_pointer.mask);
  EXPECT_EQ(by_value.out.bytes, by_pointer.out.bytes);
}

TEST(CpuKernel, FullyMaskedRowsAreZeroWithInfLse) {
  // causal bottom-right with sk < sq: the first sq - sk rows see nothing.
  for (DType dt : kDTypes) {
    Case c{1, 50, 20, 2, 1, 32};
    c.dt = dt;
    c.causal = Causal::kBottomRight;
    KernelRun r(c);
    cpu().forward(r.fwd_params());
    cpu().backward(r.bwd_params());
    for (int h = 0; h < c.hq; ++h)
      for (int i = 0; i < c.sq - c.sk; ++i) {
        EXPECT_EQ(r.lse_at(0, h, i), -INFINITY);
        for (int x = 0; x < c.d; ++x) {
          EXPECT_EQ(r.out.get(0, i, h, x), 0.0);
          EXPECT_EQ(r.dq.get(0, i, h, x), 0.0);
        }
      }
    EXPECT_EQ(r.dk.count_nan() + r.dv.count_nan() + r.dq.count_nan() + r.out.count_nan(), 0u);
  }
}

TEST(CpuKernel, EmptySequences) {
  for (DType dt : kDTypes) {
    {  // sk == 0: out = 0, lse = -inf, dq = 0
      Case c{2, 5, 0, 2, 1, 16};
      c.dt = dt;
      KernelRun r(c);
      cpu().forward(r.fwd_params());
      for (double x : r.out.to_double()) EXPECT_EQ(x, 0.0);
      for (double x : r.lse_vec()) EXPECT_EQ(x, -INFINITY);
      cpu().backward(r.bwd_params());
      for (double x : r.dq.to_double()) EXPECT_EQ(x, 0.0);
    }
    {  // sq == 0: dk = dv = 0
      Case c{2, 0, 7, 2, 2, 16};
      c.dt = dt;
      KernelRun r(c);
      cpu().forward(r.fwd_params());
      cpu().backward(r.bwd_params());
      for (double x : r.dk.to_double()) EXPECT_EQ(x, 0.0);
      for (double x : r.dv.to_double()) EXPECT_EQ(x, 0.0);
    }
    {  // b == 0: nothing to do, nothing to crash on
      Case c{0, 5, 7, 2, 2, 16};
      c.dt = dt;
      KernelRun r(c);
      cpu().forward(r.fwd_params());
      cpu().backward(r.bwd_params());
    }
  }
}

TEST(CpuKernel, BackwardIsDeterministic) {
  Case c{2, 150, 170, 4, 1, 48};
  c.dt = DType::kBFloat16;
  c.causal = Causal::kBottomRight;
  c.dropout = 0.2f;
  KernelRun r(c);
  cpu().forward(r.fwd_params());
  cpu().backward(r.bwd_params());
  const auto dq = r.dq.bytes, dk = r.dk.bytes, dv = r.dv.bytes;
  for (int rep = 0; rep < 2; ++rep) {
    r.dq.poison(); r.dk.poison(); r.dv.poison();
    cpu().backward(r.bwd_params());
    EXPECT_EQ(r.dq.bytes, dq);
    EXPECT_EQ(r.dk.bytes, dk);
    EXPECT_EQ(r.dv.bytes, dv);
  }
}

#ifdef ORCHARD_WITH_OPENMP
// Tasks never share accumulators, so the thread count cannot change a bit.
TEST(CpuKernel, ResultsIndependentOfThreadCount) {
  Case c{2, 100, 130, 4, 2, 40};
  c.causal = Causal::kBottomRight;
  c.dropout = 0.1f;
  KernelRun r(c);
  const int saved = omp_get_max_threads();
  std::vector<unsigned char> ref[4];
  for (int threads : {1, 3}) {
    omp_set_num_threads(threads);
    r.out.poison(); r.dq.poison(); r.dk.poison(); r.dv.poison();
    cpu().forward(r.fwd_params());
    cpu().backward(r.bwd_params());
    const std::vector<unsigned char>* now[4] = {&r.out.bytes, &r.dq.bytes, &r.dk.bytes, &r.dv.bytes};
    for (int t = 0; t < 4; ++t) {
      if (threads == 1) ref[t] = *now[t];
      else EXPECT_EQ(*now[t], ref[t]) << "tensor " << t;
    }
  }
  omp_set_num_threads(saved);
}
#endif

TEST(CpuKernel, MultiChunkStagingMatchesSingleChunk) {
  // Force one (batch, kv head) pair per staging chunk.
  const std::size_t saved = cpu::g_stage_budget_bytes;
  cpu::g_stage_budget_bytes = 1;
  Case c{3, 40, 70, 4, 2, 24};
  c.causal = Causal::kBottomRight;
  c.dropout = 0.1f;
  check_case(c);
  c.dt = DType::kFloat64;
  c.layout = Layout::kBHSD;
  check_case(c);
  cpu::g_stage_budget_bytes = saved;
}

TEST(CpuKernel, Fp32ForwardTileWidthsMatchReference) {
  // The fp32-compute forward's key tile width (kFp32FwdBlockNAvx512 on AVX-512,
  // kBlockN elsewhere) forced to 48 and 128 on any CPU: tiles wider than the
  // backward's, several of them per row block, a last one cut by sk, under both
  // causal alignments and dropout (whose returned mask is written per tile).
  for (int bn : {0, 48, 128}) {
    cpu::g_fp32_fwd_block_n = bn;
    for (Causal cm : {Causal::kNone, Causal::kBottomRight, Causal::kTopLeft}) {
      Case c{2, 157, 203, 4, 2, 72};
      c.causal = cm;
      c.layout = Layout::kBHSD;
      check_case(c);
      Case c2{1, 131, 331, 2, 2, 128};
      c2.causal = cm;
      c2.dropout = 0.2f;
      check_case(c2);
    }
  }
  cpu::g_fp32_fwd_block_n = 0;
}

TEST(CpuKernel, Fp32OnAmxMatchesReference) {
  // fp32 / fp16 forwards on AMX (split_bf16x3.h: three bf16 planes per operand, six products) at
  // every size rather than from 512 / 1024 keys on: the grid's shapes in both dtypes (d 1..256,
  // GQA, sq != sk, rows and K pairs past the AMX tiles) under each causal mode, dropout, and the
  // bf16 path's tiles forced to 48 x 80 (K / V in plain layout: six gemm_bf16_panels calls) and
  // 128 x 256.
  if (!cpu::fp32_on_amx()) GTEST_SKIP() << "no AMX";
  cpu::g_fp32_amx_any_size = true;
  for (auto [bm, bn] : {std::pair{0, 0}, std::pair{48, 80}, std::pair{128, 256}}) {
    cpu::g_bf16_fwd_block_m = bm;
    cpu::g_bf16_fwd_block_n = bn;
    std::uint32_t seed = 7000;
    for (const Shape& s : kShapes)
      for (Causal cm : {Causal::kNone, Causal::kBottomRight, Causal::kTopLeft}) {
        Case c{s.b, s.sq, s.sk, s.hq, s.hkv, s.d};
        c.dt = seed % 2 ? DType::kFloat16 : DType::kFloat32;  // float16 takes the split path too
        c.causal = cm;
        c.layout = static_cast<Layout>(seed % 3);
        c.seed = seed++;
        check_case(c);
      }
    Case c{1, 131, 331, 2, 2, 128};
    c.dropout = 0.2f;
    c.causal = Causal::kBottomRight;
    check_case(c);
  }
  cpu::g_fp32_amx_any_size = false;
  cpu::g_bf16_fwd_block_m = 0;
  cpu::g_bf16_fwd_block_n = 0;
}

TEST(CpuKernel, Bf16BothPathsMatchReference) {
  // bf16 inputs take the AMX path where the CPU has AMX, the vdpbf16ps path
  // where it has AVX512_BF16 and the fp32-converting path elsewhere: check
  // each this machine has. Odd row counts, sq != sk, GQA, several row and
  // column blocks, d not a multiple of 16. The bf16 forward's tiles
  // (bf16_fwd_block_m x bf16_fwd_block_n: larger on AMX) are also forced to
  // 48 x 80 and 128 x 256 on any CPU, and K / V staged in the AMX path's
  // 32-column panels and the AVX512_BF16 path's 64-column ones (gemm_bf16_panels)
  // on either path.
  const bool saved = cpu::g_bf16_dot, saved_amx = cpu::g_amx;
  // AMX (where present), AVX512_BF16 only (3 / 4: 32- / 64-column panels), fp32
  for (int path : {0, 1, 3, 4, 2}) {
    cpu::g_amx = path == 0;
    cpu::g_bf16_dot = path != 2;
    cpu::g_bf16_b_panels = path == 3 ? 32 : path == 4 ? 64 : 0;
    if (path == 0 && !cpu::amx_available()) continue;  // the same as path 1 here
    // (rows, columns) of the bf16 forward's tiles; 0: the path's default
    for (auto [bm, bn] : {std::pair{0, 0}, std::pair{48, 80}, std::pair{128, 256}}) {
      if (bn && path == 2) continue;
      cpu::g_bf16_fwd_block_m = bm;
      cpu::g_bf16_fwd_block_n = bn;
      for (Causal cm : {Causal::kNone, Causal::kBottomRight, Causal::kTopLeft}) {
        Case c{2, 157, 203, 4, 2, 72};
        c.dt = DType::kBFloat16;
        c.causal = cm;
        c.layout = Layout::kBHSD;
        check_case(c);
        Case c2{1, 131, 131, 2, 2, 128};
        c2.dt = DType::kBFloat16;
        c2.causal = cm;
        c2.dropout = 0.2f;
        check_case(c2);
      }
    }
  }
  cpu::g_bf16_dot = saved;
  cpu::g_amx = saved_amx;
  cpu::g_bf16_b_panels = 0;
  cpu::g_bf16_fwd_block_m = 0;
  cpu::g_bf16_fwd_block_n = 0;
}

TEST(CpuBackend, TableIsComplete) {
  const auto& ops = cpu();
  EXPECT_STREQ(ops.name, "cpu");
  EXPECT_TRUE(ops.check_support && ops.variant_name && ops.forward && ops.backward &&
              ops.backward_workspace_bytes && ops.required_alignment && ops.allocate &&
              ops.release && ops.copy_strided && ops.synchronize);
  FwdParams p;
  p.b = 1; p.sq = 4; p.sk = 4; p.hq = 4; p.hkv = 2; p.d = 64;
  EXPECT_EQ(ops.check_support(p), "");
  EXPECT_FALSE(ops.variant_name(p, false).empty());
  EXPECT_EQ(ops.required_alignment(p), 1u);
  p.hkv = 3;
  EXPECT_NE(ops.check_support(p), "");
  p.hkv = 2; p.d = 0;
  EXPECT_NE(ops.check_support(p), "");
  p.d = 256; p.dropout_p = 1.0f;
  EXPECT_NE(ops.check_support(p), "");
  EXPECT_TRUE(ops.synchronize(nullptr));
  void* mem = ops.allocate(1000, nullptr);
  ASSERT_NE(mem, nullptr);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(mem) % 64, 0u);
  ops.release(mem, nullptr);
}

TEST(CpuBackend, CopyStrided) {
  for (std::size_t es : {1u, 2u, 4u, 8u}) {
    // src: (2, 3, 4, 5) contiguous; dst: permuted (BHSD-like) with a padded last stride.
    const std::int64_t n[4] = {2, 3, 4, 5};
    std::vector<unsigned char> src(2 * 3 * 4 * 5 * es), dst(2 * 4 * 3 * 10 * es, 0);
    for (std::size_t i = 0; i < src.size(); ++i) src[i] = static_cast<unsigned char>(i * 31 + 7);
    detail::StridedCopy c;
    c.src = src.data(); c.dst = dst.data(); c.element_size = es;
    for (int i = 0; i < 4; ++i) c.shape[i] = n[i];
    c.src_strides[0] = 60; c.src_strides[1] = 20; c.src_strides[2] = 5; c.src_strides[3] = 1;
    c.dst_strides[0] = 120; c.dst_strides[1] = 10; c.dst_strides[2] = 30; c.dst_strides[3] = 2;
    cpu().copy_strided(c, nullptr);
    for (int a = 0; a < 2; ++a)
      for (int b = 0; b < 3; ++b)
        for (int s = 0; s < 4; ++s)
          for (int d = 0; d < 5; ++d) {
            const std::size_t si = (a * 60 + b * 20 + s * 5 + d) * es;
            const std::size_t di = (a * 120 + b * 10 + s * 30 + d * 2) * es;
            ASSERT_EQ(std::memcmp(&src[si], &dst[di], es), 0);
          }
  }
}

}  // namespace
}  // namespace orchard::test
