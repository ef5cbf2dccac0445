// Kernel-level tests of the CPU backend's flash-attn feature set (params.h):
// sliding windows, softcap, ALiBi, sinks (+ dsink), attn_bias / boolean mask,
// varlen and d_v != d, alone and combined, with GQA, dropout and every dtype.
// Hand-built FwdParams / BwdParams, outputs NaN-poisoned before each run,
// compared against the dense reference of feature_reference.h (itself checked
// by finite differences below).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "backends/cpu/kernel_common.h"
#include "core/backend.h"
#include "feature_reference.h"
#include "orchard/numeric.h"
#include "test_util.h"

namespace orchard::test {
namespace {

const detail::BackendOps& cpu() { return detail::cpu_backend(); }

enum class Bias { kNone, kMask, kAdditive };

struct FeatCase {
  std::string label;
  int b = 2, sq = 100, sk = 140, hq = 2, hkv = 1, d = 24, dv = 0;  // dv 0 = d
  DType dt = DType::kFloat64;
  bool causal = false;
  bool top_left = false;  // diagonal offset 0 instead of len_k - len_q
  std::int64_t wl = -1, wr = -1;
  double softcap = 0;
  int alibi = 0;  // 1: slopes (hq,), 2: slopes (b, hq)
  bool sink = false;
  Bias bias = Bias::kNone;
  DType bias_dt = DType::kFloat32;
  bool bias_broadcast = false;  // stride-0 batch and head, column stride 2
  std::vector<int> lens_q, lens_k;  // varlen when set
  float dropout = 0;
  Layout layout = Layout::kBSHD;
  std::uint32_t seed = 1;

  bool varlen() const { return !lens_q.empty(); }
  int value_dim() const { return dv > 0 ? dv : d; }
  std::string name() const { return label + "_" + dtype_name(dt); }
};
void PrintTo(const FeatCase& c, std::ostream* os) { *os << c.name(); }

// A float bias or boolean mask, logical (b, hq, sq, sk), in its own strided storage.
struct BiasBuffer {
  DType dt = DType::kUInt8;
  std::int64_t sb = 0, sh = 0, sr = 0, sc = 1;
  std::vector<unsigned char> bytes;

  double get(int bi, int h, int i, int j) const {
    const std::size_t e = std::size_t(bi * sb + h * sh + i * sr + j * sc);
    const unsigned char* p = bytes.data() + e * dtype_size(dt);
    std::uint16_t u; float f; double x;
    switch (dt) {
      case DType::kUInt8: return *p ? 0.0 : -INFINITY;
      case DType::kFloat16: std::memcpy(&u, p, 2); return fp16_to_float(u);
      case DType::kBFloat16: std::memcpy(&u, p, 2); return bf16_to_float(u);
      case DType::kFloat32: std::memcpy(&f, p, 4); return f;
      default: std::memcpy(&x, p, 8); return x;
    }
  }
  void set(std::size_t e, double v) {
    unsigned char* p = bytes.data() + e * dtype_size(dt);
    std::uint16_t u; float f;
    switch (dt) {
      case DType::kUInt8: *p = v != 0.0; break;
      case DType::kFloat16: u = float_to_fp16(float(v)); std::memcpy(p, &u, 2); break;
      case DType::kBFloat16: u = float_to_bf16(float(v)); std::memcpy(p, &u, 2); break;
      case DType::kFloat32: f = float(v); std::memcpy(p, &f, 4); break;
      default: std::memcpy(p, &v, 8); break;
    }
  }
};

struct FeatRun {
  FeatCase c;
  FeatureProblem prob;
  Tensor4 q, k, v, out, dout, dq, dk, dv;
  std::vector<std::int32_t> cu_q, cu_k;
  std::vector<unsigned char> lse_bytes;
  std::int64_t lse_batch_stride = 0, lse_head_stride = 0;
  std::vector<float> slopes, sink, dsink;
  BiasBuffer bias;
  std::vector<std::uint8_t> mask;
  int nseq = 0, max_q = 0, max_k = 0;

  explicit FeatRun(const FeatCase& cs) : c(cs) {
    std::mt19937 rng(cs.seed * 7919u + 101u);
    std::vector<int> lq = c.lens_q, lk = c.lens_k;
    if (!c.varlen()) {
      lq.assign(c.b, c.sq);
      lk.assign(c.b, c.sk);
    }
    prob.set_lengths(lq, lk);
    nseq = prob.b;
    max_q = *std::max_element(lq.begin(), lq.end());
    max_k = *std::max_element(lk.begin(), lk.end());
    const int tb = c.varlen() ? 1 : c.b;  // tensors: (b, s, h, d), varlen (1, total, h, d)
    const int tq = c.varlen() ? prob.total_q : c.sq, tk = c.varlen() ? prob.total_k : c.sk;
    const int dvv = c.value_dim();
    q = Tensor4(c.dt, tb, tq, c.hq, c.d, c.layout);
    k = Tensor4(c.dt, tb, tk, c.hkv, c.d, c.layout);
    v = Tensor4(c.dt, tb, tk, c.hkv, dvv, c.layout);
    out = Tensor4(c.dt, tb, tq, c.hq, dvv, c.layout);
    dout = Tensor4(c.dt, tb, tq, c.hq, dvv, c.layout);
    const Layout gl = c.layout == Layout::kBSHD ? Layout::kSliced : Layout::kBSHD;
    dq = Tensor4(c.dt, tb, tq, c.hq, c.d, gl);
    dk = Tensor4(c.dt, tb, tk, c.hkv, c.d, gl);
    dv = Tensor4(c.dt, tb, tk, c.hkv, dvv, gl);
    for (Tensor4* t : {&q, &k, &v, &dout}) t->fill_normal(rng);
    if (c.varlen()) {
      cu_q.push_back(0);
      cu_k.push_back(0);
      for (int i = 0; i < nseq; ++i) {
        cu_q.push_back(cu_q.back() + lq[i]);
        cu_k.push_back(cu_k.back() + lk[i]);
      }
      lse_head_stride = prob.total_q + 2;  // (hq, total_q), padded
    } else {
      lse_head_stride = c.sq + 3;
      lse_batch_stride = lse_head_stride * c.hq + 1;
    }
    const std::size_t lse_elems = c.varlen() ? std::size_t(lse_head_stride * c.hq)
                                             : std::size_t(lse_batch_stride * c.b);
    lse_bytes.assign(std::max<std::size_t>(lse_elems, 1) * lse_size(), 0);
    for (std::size_t e = 0; e * lse_size() < lse_bytes.size(); ++e) {  // poisoned
      if (lse_size() == 8) { double x = NAN; std::memcpy(lse_bytes.data() + 8 * e, &x, 8); }
      else { float x = NAN; std::memcpy(lse_bytes.data() + 4 * e, &x, 4); }
    }

    prob.hq = c.hq; prob.hkv = c.hkv; prob.d = c.d; prob.dv = dvv;
    prob.scale = static_cast<float>(1.0 / std::sqrt(double(c.d)));  // the kernel gets a float
    prob.softcap = c.softcap;
    prob.window_left = c.wl;
    prob.window_right = c.causal ? 0 : c.wr;
    prob.diag.resize(nseq);
    for (int i = 0; i < nseq; ++i) prob.diag[i] = c.top_left ? 0 : lk[i] - lq[i];
    prob.dropout_p = c.dropout;
    prob.seed = 0x9e3779b97f4a7c15ull + cs.seed;
    prob.offset = 7 + cs.seed;
    std::uniform_real_distribution<double> uni(0.05, 0.6);
    if (c.alibi) {
      slopes.resize(std::size_t(c.alibi == 2 ? nseq : 1) * c.hq);
      for (float& s : slopes) s = static_cast<float>(uni(rng));
      for (int bi = 0; bi < nseq; ++bi)
        for (int h = 0; h < c.hq; ++h)
          prob.alibi_slope.push_back(slopes[(c.alibi == 2 ? bi * c.hq : 0) + h]);
    }
    if (c.sink) {
      std::normal_distribution<double> nd(1.0, 1.5);
      for (int h = 0; h < c.hq; ++h) sink.push_back(static_cast<float>(nd(rng)));
      for (float s : sink) prob.sink.push_back(s);
    }
    if (c.bias != Bias::kNone) make_bias(rng);
  }

  void make_bias(std::mt19937& rng) {
    bias.dt = c.bias == Bias::kMask ? DType::kUInt8 : c.bias_dt;
    bias.sc = c.bias_broadcast ? 2 : 1;
    bias.sr = max_k * bias.sc + 1;
    const std::int64_t plane = max_q * bias.sr;
    bias.sh = c.bias_broadcast ? 0 : plane;
    bias.sb = c.bias_broadcast ? 0 : plane * c.hq;
    const std::size_t elems = std::size_t(c.bias_broadcast ? plane : plane * c.hq * nseq);
    bias.bytes.assign(elems * dtype_size(bias.dt), 0);
    std::normal_distribution<double> nd(0.0, 1.0);
    std::uniform_real_distribution<double> u(0.0, 1.0);
    for (std::size_t e = 0; e < elems; ++e) {
      const std::int64_t row = (std::int64_t(e) % plane) / bias.sr;
      if (c.bias == Bias::kMask)  // a quarter masked, and every 7th row entirely
        bias.set(e, row % 7 == 3 || u(rng) < 0.25 ? 0.0 : 1.0);
      else  // a tenth -inf: a float bias can mask too
        bias.set(e, u(rng) < 0.1 ? -INFINITY : nd(rng));
    }
    const BiasBuffer* b = &bias;
    prob.bias = [b](int bi, int h, int i, int j) { return b->get(bi, h, i, j); };
  }

  std::size_t lse_elem(int bi, int h, int i) const {
    if (c.varlen()) return std::size_t(h * lse_head_stride + cu_q[bi] + i);
    return std::size_t(bi * lse_batch_stride + h * lse_head_stride + i);
  }
  std::size_t lse_size() const { return c.dt == DType::kFloat64 ? 8 : 4; }
  double lse_at(std::size_t e) const {
    if (lse_size() == 8) { double x; std::memcpy(&x, lse_bytes.data() + 8 * e, 8); return x; }
    float f; std::memcpy(&f, lse_bytes.data() + 4 * e, 4); return f;
  }
  // Kernel lse in the reference's order (packed row, head).
  std::vector<double> lse_vec() const {
    std::vector<double> r(std::size_t(prob.total_q) * c.hq);
    for (int bi = 0; bi < nseq; ++bi)
      for (int i = 0; i < prob.len_q[bi]; ++i)
        for (int h = 0; h < c.hq; ++h) r[std::size_t(prob.q_start[bi] + i) * c.hq + h] = lse_at(lse_elem(bi, h, i));
    return r;
  }

  FwdParams fwd_params() {
    FwdParams p;
    p.q = q.data(); p.k = k.data(); p.v = v.data(); p.out = out.data();
    p.lse = lse_bytes.data();
    const bool vl = c.varlen();
    p.q_batch_stride = vl ? 0 : q.sb; p.q_row_stride = q.ss; p.q_head_stride = q.sh;
    p.k_batch_stride = vl ? 0 : k.sb; p.k_row_stride = k.ss; p.k_head_stride = k.sh;
    p.v_batch_stride = vl ? 0 : v.sb; p.v_row_stride = v.ss; p.v_head_stride = v.sh;
    p.o_batch_stride = vl ? 0 : out.sb; p.o_row_stride = out.ss; p.o_head_stride = out.sh;
    p.lse_batch_stride = lse_batch_stride; p.lse_head_stride = lse_head_stride;
    p.b = nseq; p.sq = max_q; p.sk = max_k; p.hq = c.hq; p.hkv = c.hkv; p.d = c.d; p.d_v = c.value_dim();
    if (vl) {
      p.cu_seqlens_q = cu_q.data();
      p.cu_seqlens_k = cu_k.data();
      p.causal_top_left = c.top_left;
    }
    p.scale = static_cast<float>(prob.scale);
    p.scale_f64 = prob.scale;
    p.causal = c.causal || c.wr == 0;  // the core keeps causal == (window_right == 0)
    p.causal_offset = vl || c.top_left ? 0 : c.sk - c.sq;
    p.window_left = c.wl;
    p.window_right = c.causal ? 0 : c.wr;
    p.softcap = static_cast<float>(c.softcap);
    p.softcap_f64 = c.softcap;
    if (c.alibi) {
      p.alibi_slopes = slopes.data();
      p.alibi_batch_stride = c.alibi == 2 ? c.hq : 0;
    }
    if (c.sink) p.sink = sink.data();
    if (c.bias != Bias::kNone) {
      p.attn_bias = bias.bytes.data();
      p.attn_bias_dtype = bias.dt;
      p.bias_batch_stride = bias.sb; p.bias_head_stride = bias.sh;
      p.bias_row_stride = bias.sr; p.bias_col_stride = bias.sc;
    }
    p.dropout_p = c.dropout;
    p.dropout_p_f64 = static_cast<float>(c.dropout);
    p.seed = prob.seed; p.offset = prob.offset;
    p.dtype = c.dt;
    if (c.dropout > 0) {
      mask.assign(std::size_t(nseq) * c.hq * max_q * max_k, 0xAB);
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
    const bool vl = c.varlen();
    p.do_batch_stride = vl ? 0 : dout.sb; p.do_row_stride = dout.ss; p.do_head_stride = dout.sh;
    p.dq_batch_stride = vl ? 0 : dq.sb; p.dq_row_stride = dq.ss; p.dq_head_stride = dq.sh;
    p.dk_batch_stride = vl ? 0 : dk.sb; p.dk_row_stride = dk.ss; p.dk_head_stride = dk.sh;
    p.dv_batch_stride = vl ? 0 : dv.sb; p.dv_row_stride = dv.ss; p.dv_head_stride = dv.sh;
    if (c.sink) {
      dsink.assign(c.hq, NAN);
      p.dsink = dsink.data();
    }
    return p;
  }
};

double atol_for(DType dt) {
  switch (dt) {
    case DType::kFloat64: return 1e-10;
    case DType::kFloat32: return 5e-6;
    default: return 2e-4;
  }
}

double max_abs(const std::vector<double>& a) {
  double m = 0;
  for (double x : a)
    if (std::isfinite(x)) m = std::max(m, std::fabs(x));
  return m;
}

// float64: err <= 1e-10 relative to the magnitude; else flash-attn's rule,
// err <= 2 x (naive same-precision err) + atol.
void expect_close(const char* what, const FeatCase& c, const std::vector<double>& got,
                  const std::vector<double>& exact, const std::vector<double>& naive) {
  ASSERT_EQ(got.size(), exact.size()) << what;
  const double err = max_abs_diff(got, exact);
  const double naive_err = c.dt == DType::kFloat64 ? 0.0 : max_abs_diff(naive, exact);
  const double tol = c.dt == DType::kFloat64 ? 1e-10 * std::max(1.0, max_abs(exact))
                                             : 2.0 * naive_err + atol_for(c.dt);
  if (std::getenv("ORCHARD_TEST_VERBOSE"))
    std::printf("%-6s %-40s err %.3g naive %.3g tol %.3g\n", what, c.name().c_str(), err, naive_err, tol);
  EXPECT_LE(err, tol) << what << " " << c.name() << ": err " << err << " naive err " << naive_err;
}

void check_case(const FeatCase& c) {
  SCOPED_TRACE(c.name());
  FeatRun r(c);
  const FwdParams fp = r.fwd_params();
  ASSERT_EQ(cpu().check_support(fp), "");
  cpu().forward(fp);

  const auto qd = r.q.to_double(), kd = r.k.to_double(), vd = r.v.to_double(), dod = r.dout.to_double();
  auto rnd = [dt = c.dt](double x) { return round_to(dt, x); };
  const LowPrecision<decltype(rnd)> R{rnd};
  const bool lowp = c.dt != DType::kFloat64;
  const FeatureForward ref = feature_forward(r.prob, qd, kd, vd);
  const FeatureForward naive = lowp ? feature_forward(r.prob, qd, kd, vd, R) : ref;

  EXPECT_EQ(r.out.count_nan(), 0u) << "unwritten out elements";
  EXPECT_EQ(r.out.count_outside_written(), 0u);
  expect_close("out", c, r.out.to_double(), ref.out, naive.out);
  const auto lse = r.lse_vec();
  for (std::size_t e = 0; e < lse.size(); ++e) {
    ASSERT_FALSE(std::isnan(lse[e])) << "lse " << e << " unwritten";
    if (std::isinf(ref.lse[e])) {
      ASSERT_EQ(lse[e], ref.lse[e]) << "lse " << e;
    } else {
      const double tol = c.dt == DType::kFloat64 ? 1e-10 : 2e-5 * std::max(1.0, std::fabs(ref.lse[e]));
      ASSERT_NEAR(lse[e], ref.lse[e], tol) << "lse " << e;
    }
  }
  if (c.dropout > 0)  // every element of every sequence; varlen padding 0
    for (int bi = 0; bi < r.nseq; ++bi)
      for (int h = 0; h < c.hq; ++h)
        for (int i = 0; i < r.max_q; ++i)
          for (int j = 0; j < r.max_k; ++j) {
            const bool inside = i < r.prob.len_q[bi] && j < r.prob.len_k[bi];
            ASSERT_EQ(r.mask[((std::size_t(bi) * c.hq + h) * r.max_q + i) * r.max_k + j],
                      inside && r.prob.keep(bi, h, i, j) ? 1 : 0)
                << "mask at " << bi << "," << h << "," << i << "," << j;
          }

  const BwdParams bp = r.bwd_params();
  ASSERT_EQ(cpu().check_support(bp), "");
  ASSERT_EQ(cpu().backward_workspace_bytes(bp), 0u);
  cpu().backward(bp);
  const FeatureBackward gref = feature_backward(r.prob, qd, kd, vd, dod);
  const FeatureBackward gnaive = lowp ? feature_backward(r.prob, qd, kd, vd, dod, R) : gref;
  for (Tensor4* t : {&r.dq, &r.dk, &r.dv}) {
    EXPECT_EQ(t->count_nan(), 0u) << "unwritten gradient elements";
    EXPECT_EQ(t->count_outside_written(), 0u);
  }
  expect_close("dq", c, r.dq.to_double(), gref.dq, gnaive.dq);
  expect_close("dk", c, r.dk.to_double(), gref.dk, gnaive.dk);
  expect_close("dv", c, r.dv.to_double(), gref.dv, gnaive.dv);
  if (c.sink) {
    // dsink = -sum_i P_sink,i D_i with D_i = rowsum(dO * O) from the stored O,
    // as in flash-attn: rounding O to the dtype moves D_i by up to
    // u * sum |dO * O| (u = the dtype's unit roundoff), which the naive
    // reference (D = sum P dP, never rounded) does not see; add that bound.
    // dsink itself is float32 (float64 inputs included).
    const double u = c.dt == DType::kBFloat16 ? 0x1p-8 : c.dt == DType::kFloat16 ? 0x1p-11 : 0x1p-24;
    const auto o = r.out.to_double();
    std::vector<double> bound(c.hq, 0.0);
    for (int row = 0; row < r.prob.total_q; ++row)
      for (int h = 0; h < c.hq; ++h) {
        const double l = ref.lse[std::size_t(row) * c.hq + h];
        double mag = 0;
        for (int x = 0; x < c.value_dim(); ++x) {
          const std::size_t e = r.prob.q_index(row, h, x, c.value_dim());
          mag += std::fabs(dod[e] * o[e]);
        }
        bound[h] += std::exp(r.prob.sink[h] - l) * mag * u;
      }
    const double naive_err = lowp ? max_abs_diff(gnaive.dsink, gref.dsink) : 0.0;
    for (int h = 0; h < c.hq; ++h) {
      const double tol = 2 * naive_err + bound[h] + 2e-6 * std::max(1.0, std::fabs(gref.dsink[h]));
      EXPECT_NEAR(r.dsink[h], gref.dsink[h], tol) << "dsink[" << h << "] " << c.name();
    }
  }
}

// ---- the cases -------------------------------------------------------------

FeatCase make(const std::string& label) {
  FeatCase c;
  c.label = label;
  return c;
}

std::vector<FeatCase> feature_cases() {
  std::vector<FeatCase> base;
  FeatCase c;
  // Windows (bottom-right diagonal unless noted).
  c = make("window_20_10"); c.wl = 20; c.wr = 10; base.push_back(c);
  c = make("window_left_only"); c.wl = 30; base.push_back(c);
  c = make("window_right_only"); c.wr = 5; c.layout = Layout::kBHSD; base.push_back(c);
  c = make("causal_window_16"); c.causal = true; c.wl = 16; c.layout = Layout::kSliced; base.push_back(c);
  // Top-left diagonal, sq > sk + left: rows past sk + 10 see nothing.
  c = make("window_empty_rows_TL"); c.sq = 150; c.sk = 60; c.top_left = true; c.wl = 10; c.wr = 10;
  base.push_back(c);
  // Bottom-right causal with sq > sk: the first sq - sk rows see nothing.
  c = make("causal_window_empty_rows_BR"); c.sq = 140; c.sk = 60; c.causal = true; c.wl = 3; base.push_back(c);
  // More than kDqSlots key blocks (10): the backward's dQ slots 0 and 1 take two column blocks
  // each, and with this window the second one's first row block (rows 472-535 of key block 8)
  // starts inside rows the first one (rows 0-543 of key block 0) wrote: the partly written block
  // DqSlotRows zeroes before it accumulates.
  c = make("wide_window_many_key_blocks"); c.b = 1; c.sq = 600; c.sk = 640; c.wl = 520; c.wr = 0; c.d = 16;
  base.push_back(c);
  // Softcap, ALiBi, sinks.
  c = make("softcap"); c.softcap = 2.5; base.push_back(c);
  c = make("softcap_causal"); c.softcap = 1.5; c.causal = true; c.layout = Layout::kBHSD; base.push_back(c);
  c = make("alibi_heads"); c.alibi = 1; base.push_back(c);
  c = make("alibi_batch_causal"); c.alibi = 2; c.causal = true; base.push_back(c);
  c = make("sink"); c.sink = true; base.push_back(c);
  c = make("sink_window_empty_rows"); c.sink = true; c.sq = 150; c.sk = 60; c.top_left = true; c.wl = 10;
  c.wr = 0; base.push_back(c);
  // attn_bias.
  c = make("mask_bool"); c.bias = Bias::kMask; base.push_back(c);
  c = make("mask_bool_broadcast_causal"); c.bias = Bias::kMask; c.bias_broadcast = true; c.causal = true;
  c.top_left = true; base.push_back(c);
  c = make("bias_f32"); c.bias = Bias::kAdditive; base.push_back(c);
  c = make("bias_f16_broadcast"); c.bias = Bias::kAdditive; c.bias_dt = DType::kFloat16;
  c.bias_broadcast = true; base.push_back(c);
  c = make("bias_bf16"); c.bias = Bias::kAdditive; c.bias_dt = DType::kBFloat16; base.push_back(c);
  c = make("bias_f64_broadcast"); c.bias = Bias::kAdditive; c.bias_dt = DType::kFloat64;
  c.bias_broadcast = true; base.push_back(c);
  // Varlen, empty sequences included.
  c = make("varlen"); c.lens_q = {37, 0, 70, 5, 130}; c.lens_k = {50, 13, 70, 0, 90}; base.push_back(c);
  c = make("varlen_causal_BR"); c.lens_q = {37, 0, 70, 5, 130}; c.lens_k = {50, 13, 70, 0, 90};
  c.causal = true; c.layout = Layout::kSliced; base.push_back(c);
  c = make("varlen_causal_TL"); c.lens_q = {37, 70, 130}; c.lens_k = {50, 70, 90}; c.causal = true;
  c.top_left = true; base.push_back(c);
  c = make("varlen_window"); c.lens_q = {100, 3, 66}; c.lens_k = {140, 80, 20}; c.wl = 17; c.wr = 4;
  base.push_back(c);
  // Value head dim.
  c = make("dv_smaller"); c.d = 40; c.dv = 24; base.push_back(c);
  c = make("dv_larger_causal"); c.d = 16; c.dv = 48; c.causal = true; c.layout = Layout::kBHSD; base.push_back(c);
  // Dropout with the new features.
  c = make("dropout_window"); c.dropout = 0.2f; c.wl = 25; c.wr = 7; base.push_back(c);
  c = make("dropout_varlen_sink"); c.dropout = 0.3f; c.sink = true; c.lens_q = {37, 0, 70}; c.lens_k = {50, 13, 70};
  base.push_back(c);
  // Everything at once, MQA / GQA.
  c = make("all_features"); c.lens_q = {37, 0, 90, 5}; c.lens_k = {70, 13, 100, 0}; c.wl = 30; c.wr = 9;
  c.softcap = 3.0; c.alibi = 2; c.sink = true; c.bias = Bias::kAdditive; c.bias_dt = DType::kBFloat16;
  c.bias_broadcast = true; c.d = 40; c.dv = 24; c.dropout = 0.15f; c.layout = Layout::kSliced;
  c.hq = 4; c.hkv = 2;
  base.push_back(c);
  c = make("all_features_mask_mqa_causal"); c.hq = 3; c.hkv = 1; c.causal = true; c.wl = 40; c.softcap = 2.0;
  c.alibi = 1; c.sink = true; c.bias = Bias::kMask; c.d = 16; c.dv = 32; c.layout = Layout::kBHSD;
  base.push_back(c);

  // Every case in float64 (tight), the float32 / bfloat16 / float16 rule on a spread.
  std::vector<FeatCase> cases;
  std::uint32_t seed = 1;
  int i = 0;
  for (const FeatCase& b : base) {
    FeatCase f = b;
    f.seed = seed++;
    cases.push_back(f);
    f.dt = (i % 3 == 0) ? DType::kFloat32 : (i % 3 == 1) ? DType::kBFloat16 : DType::kFloat16;
    f.seed = seed++;
    cases.push_back(f);
    ++i;
  }
  const std::pair<const char*, DType> extra[] = {
      {"all_features", DType::kFloat32}, {"softcap", DType::kFloat32}, {"sink", DType::kFloat32},
      {"wide_window_many_key_blocks", DType::kFloat32}, {"wide_window_many_key_blocks", DType::kBFloat16}};
  for (const auto& [lbl, dt] : extra)
    for (const FeatCase& b : base)
      if (b.label == lbl) {
        FeatCase f = b;
        f.dt = dt;
        f.label += dt == DType::kFloat32 ? "_f32" : "_bf16";
        f.seed = seed++;
        cases.push_back(f);
      }
  return cases;
}

class CpuFeatures : public ::testing::TestWithParam<FeatCase> {};
TEST_P(CpuFeatures, MatchesReference) { check_case(GetParam()); }
INSTANTIATE_TEST_SUITE_P(Features, CpuFeatures, ::testing::ValuesIn(feature_cases()),
                         [](const auto& info) { return info.param.name(); });

// Rows that see nothing: out 0, lse -inf (or the sink's logit), zero dq.
TEST(CpuFeaturesEdge, EmptyRowsAreZero) {
  for (bool with_sink : {false, true}) {
    FeatCase c = make("empty");
    c.sq = 90; c.sk = 30; c.top_left = true; c.wl = 5; c.wr = 5;  // rows >= 36 see nothing
    c.sink = with_sink;
    c.dt = DType::kFloat32;
    FeatRun r(c);
    cpu().forward(r.fwd_params());
    cpu().backward(r.bwd_params());
    for (int bi = 0; bi < c.b; ++bi)
      for (int h = 0; h < c.hq; ++h)
        for (int i = 36; i < c.sq; ++i) {
          const double lse = r.lse_at(r.lse_elem(bi, h, i));
          if (with_sink)  // computed as (sink * log2 e + log2 1) * ln 2: a rounding away
            EXPECT_NEAR(lse, r.sink[h], 1e-6 * std::max(1.0f, std::fabs(r.sink[h])));
          else
            EXPECT_EQ(lse, -INFINITY);
          for (int x = 0; x < c.d; ++x) {
            EXPECT_EQ(r.out.get(bi, i, h, x), 0.0);
            EXPECT_EQ(r.dq.get(bi, i, h, x), 0.0);
          }
        }
  }
}

TEST(CpuFeaturesEdge, BackwardIsDeterministic) {
  FeatCase c = make("determinism");
  c.lens_q = {70, 130}; c.lens_k = {90, 120}; c.wl = 40; c.softcap = 2.0; c.alibi = 1; c.sink = true;
  c.bias = Bias::kAdditive; c.dropout = 0.1f; c.dt = DType::kBFloat16; c.hkv = 1;
  FeatRun r(c);
  cpu().forward(r.fwd_params());
  cpu().backward(r.bwd_params());
  const auto dq = r.dq.bytes, dk = r.dk.bytes, dv = r.dv.bytes;
  const auto dsink = r.dsink;
  for (int rep = 0; rep < 2; ++rep) {
    r.dq.poison(); r.dk.poison(); r.dv.poison();
    cpu().backward(r.bwd_params());
    EXPECT_EQ(r.dq.bytes, dq);
    EXPECT_EQ(r.dk.bytes, dk);
    EXPECT_EQ(r.dv.bytes, dv);
    EXPECT_EQ(0, std::memcmp(r.dsink.data(), dsink.data(), dsink.size() * sizeof(float)));
  }
}

FeatCase all_features_case() {
  FeatCase c = make("chunks");
  c.lens_q = {37, 0, 90, 5}; c.lens_k = {70, 13, 100, 0}; c.wl = 30; c.wr = 9; c.softcap = 3.0;
  c.alibi = 2; c.sink = true; c.bias = Bias::kAdditive; c.bias_broadcast = true; c.d = 40; c.dv = 24;
  c.dropout = 0.15f; c.hkv = 1;
  return c;
}

TEST(CpuFeaturesEdge, MultiChunkStagingMatchesReference) {
  // One (sequence, kv head) pair per staging chunk.
  const std::size_t saved = cpu::g_stage_budget_bytes;
  cpu::g_stage_budget_bytes = 1;
  FeatCase c = all_features_case();
  check_case(c);
  c.dt = DType::kBFloat16;
  c.layout = Layout::kBHSD;
  check_case(c);
  cpu::g_stage_budget_bytes = saved;
}

#ifdef ORCHARD_WITH_OPENMP
// Tasks never share accumulators and dsink is summed in a fixed order, so the
// thread count cannot change a bit.
TEST(CpuFeaturesEdge, ResultsIndependentOfThreadCount) {
  FeatCase c = all_features_case();
  c.dt = DType::kFloat32;
  FeatRun r(c);
  const int saved = omp_get_max_threads();
  std::vector<std::vector<unsigned char>> ref;
  for (int threads : {1, 3}) {
    omp_set_num_threads(threads);
    r.out.poison(); r.dq.poison(); r.dk.poison(); r.dv.poison();
    cpu().forward(r.fwd_params());
    cpu().backward(r.bwd_params());
    std::vector<std::vector<unsigned char>> now = {r.out.bytes, r.dq.bytes, r.dk.bytes, r.dv.bytes, r.lse_bytes,
                                                   std::vector<unsigned char>(r.mask.begin(), r.mask.end())};
    now.emplace_back(reinterpret_cast<const unsigned char*>(r.dsink.data()),
                     reinterpret_cast<const unsigned char*>(r.dsink.data() + r.dsink.size()));
    if (threads == 1) ref = now;
    else
      for (std::size_t t = 0; t < now.size(); ++t) EXPECT_EQ(now[t], ref[t]) << "output " << t;
  }
  omp_set_num_threads(saved);
}
#endif

TEST(CpuFeaturesEdge, CheckSupportAcceptsEveryFeature) {
  FeatCase c = make("support");
  c.lens_q = {3, 4}; c.lens_k = {5, 6}; c.wl = 2; c.wr = 1; c.softcap = 1; c.alibi = 2; c.sink = true;
  c.bias = Bias::kMask; c.d = 8; c.dv = 16; c.dropout = 0.1f;
  FeatRun r(c);
  const BwdParams p = r.bwd_params();
  EXPECT_EQ(cpu().check_support(p), "");
  const std::string name = cpu().variant_name(p, true);
  for (const char* part : {"_window", "_softcap", "_alibi", "_sink", "_mask", "_varlen", "_dv16", "_dropout"})
    EXPECT_NE(name.find(part), std::string::npos) << name << " lacks " << part;
  BwdParams bad = p;
  bad.cu_seqlens_k = nullptr;
  EXPECT_NE(cpu().check_support(bad), "");
  bad = p;
  bad.attn_bias_dtype = DType::kInt32;
  EXPECT_NE(cpu().check_support(bad), "");
}

// ---- the reference checked by finite differences ---------------------------

// L = sum(out * dout); central differences of L against feature_backward's
// analytic gradients, in float64, for the features whose derivative the
// reference writes by hand (softcap, ALiBi, sink, bias, window, d_v).
TEST(FeatureReference, GradientsMatchFiniteDifferences) {
  FeatureProblem p;
  p.set_lengths({5, 4}, {7, 3});
  p.hq = 2; p.hkv = 1; p.d = 3; p.dv = 4;
  p.diag = {2, -1};
  p.scale = 0.7;
  p.softcap = 1.3;
  p.window_left = 3; p.window_right = 1;
  p.alibi_slope = {0.3, 0.1, 0.25, 0.05};
  p.sink = {0.4, -0.7};
  p.bias = [](int bi, int h, int i, int j) {
    return (i + j + h) % 5 == 0 ? -INFINITY : 0.1 * std::sin(1.0 + bi + 2 * h + 3 * i + 5 * j);
  };
  std::mt19937 rng(5);
  std::normal_distribution<double> nd(0.0, 1.0);
  auto rand_vec = [&](std::size_t n) {
    std::vector<double> x(n);
    for (double& e : x) e = nd(rng);
    return x;
  };
  std::vector<double> q = rand_vec(std::size_t(p.total_q) * p.hq * p.d);
  std::vector<double> k = rand_vec(std::size_t(p.total_k) * p.hkv * p.d);
  std::vector<double> v = rand_vec(std::size_t(p.total_k) * p.hkv * p.dv);
  const std::vector<double> dout = rand_vec(std::size_t(p.total_q) * p.hq * p.dv);
  auto loss = [&] {
    const FeatureForward f = feature_forward(p, q, k, v);
    double l = 0;
    for (std::size_t i = 0; i < f.out.size(); ++i) l += f.out[i] * dout[i];
    return l;
  };
  const FeatureBackward g = feature_backward(p, q, k, v, dout);
  const double h = 1e-6;
  auto check = [&](std::vector<double>& x, const std::vector<double>& grad, const char* what) {
    for (std::size_t i = 0; i < x.size(); ++i) {
      const double saved = x[i];
      x[i] = saved + h;
      const double lp = loss();
      x[i] = saved - h;
      const double lm = loss();
      x[i] = saved;
      EXPECT_NEAR((lp - lm) / (2 * h), grad[i], 1e-7 * std::max(1.0, std::fabs(grad[i]))) << what << "[" << i << "]";
    }
  };
  check(q, g.dq, "dq");
  check(k, g.dk, "dk");
  check(v, g.dv, "dv");
  check(p.sink, g.dsink, "dsink");
}

}  // namespace
}  // namespace orchard::test
