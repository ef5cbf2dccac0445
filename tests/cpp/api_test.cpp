// Tests of the public API (orchard/attention.h): the bridge's zero-copy and
// staged paths give the same answers as a contiguous call, gradients land in
// strided destination views, bad input raises op-prefixed errors without
// touching any buffer, and the two diagnostics logs work (also under threads).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "orchard/attention.h"

#include <unistd.h>

namespace {

using orchard::DType;
using orchard::TensorView;

const orchard::Device kCpu{orchard::DeviceType::kCPU, 0};

// A float32 buffer with a strided view of logical shape `shape` laid out in
// memory in the order `perm` (perm[0] outermost) with `pad` extra elements
// after each innermost row, and `offset` leading elements.
struct Strided {
  std::vector<float> storage;
  TensorView view;
};

Strided make_strided(std::array<std::int64_t, 4> shape, std::array<int, 4> perm, std::int64_t pad = 0,
                     std::int64_t offset = 0, float fill = NAN) {
  Strided s;
  std::array<std::int64_t, 4> strides{};
  std::int64_t stride = 1;
  for (int i = 3; i >= 0; --i) {
    const int dim = perm[i];
    strides[dim] = stride;
    stride *= shape[dim] + (i == 3 ? pad : 0);
  }
  s.storage.assign(static_cast<std::size_t>(stride + offset), fill);
  s.view.data = s.storage.data() + offset;
  s.view.dtype = DType::kFloat32;
  s.view.device = kCpu;
  s.view.ndim = 4;
  s.view.shape = shape;
  s.view.strides = strides;
  return s;
}

float& at(Strided& s, std::int64_t a, std::int64_t b, std::int64_t c, std::int64_t d) {
  const auto& st = s.view.strides;
  return static_cast<float*>(s.view.data)[a * st[0] + b * st[1] + c * st[2] + d * st[3]];
}

void fill_random(Strided& s, std::mt19937& rng) {
  std::normal_distribution<float> n;
  const auto& sh = s.view.shape;
  for (std::int64_t a = 0; a < sh[0]; ++a)
    for (std::int64_t b = 0; b < sh[1]; ++b)
      for (std::int64_t c = 0; c < sh[2]; ++c)
        for (std::int64_t d = 0; d < sh[3]; ++d) at(s, a, b, c, d) = n(rng);
}

void copy_values(Strided& dst, Strided& src) {
  const auto& sh = src.view.shape;
  for (std::int64_t a = 0; a < sh[0]; ++a)
    for (std::int64_t b = 0; b < sh[1]; ++b)
      for (std::int64_t c = 0; c < sh[2]; ++c)
        for (std::int64_t d = 0; d < sh[3]; ++d) at(dst, a, b, c, d) = at(src, a, b, c, d);
}

float max_diff(Strided& x, Strided& y) {
  float m = 0;
  const auto& sh = x.view.shape;
  for (std::int64_t a = 0; a < sh[0]; ++a)
    for (std::int64_t b = 0; b < sh[1]; ++b)
      for (std::int64_t c = 0; c < sh[2]; ++c)
        for (std::int64_t d = 0; d < sh[3]; ++d) {
          const float diff = std::fabs(at(x, a, b, c, d) - at(y, a, b, c, d));
          if (!(diff <= m)) m = std::isnan(diff) ? INFINITY : diff;
        }
  return m;
}

constexpr std::array<int, 4> kBSHD{0, 1, 2, 3};
constexpr std::array<int, 4> kBHSD{0, 2, 1, 3};
constexpr std::array<int, 4> kDimOuter{3, 0, 1, 2};  // last-dim stride != 1: must be staged

struct Problem {
  std::int64_t b = 2, sq = 37, sk = 53, hq = 4, hkv = 2, d = 24;
};

struct Call {
  Strided q, k, v, out, dout, dq, dk, dv;
  std::vector<float> lse;
};

// Fresh random q, k, v and dout (never zeros: they would hide unwritten outputs).
void fill_inputs(Call& c, std::mt19937& rng) {
  fill_random(c.q, rng);
  fill_random(c.k, rng);
  fill_random(c.v, rng);
  fill_random(c.dout, rng);
}

// The same input values in another layout.
void copy_inputs(Call& dst, Call& src) {
  copy_values(dst.q, src.q);
  copy_values(dst.k, src.k);
  copy_values(dst.v, src.v);
  copy_values(dst.dout, src.dout);
}

Call make_call(const Problem& p, std::array<int, 4> in_layout, std::array<int, 4> grad_layout, std::int64_t pad) {
  Call c;
  c.q = make_strided({p.b, p.sq, p.hq, p.d}, in_layout, pad, 3);
  c.k = make_strided({p.b, p.sk, p.hkv, p.d}, in_layout, pad, 1);
  c.v = make_strided({p.b, p.sk, p.hkv, p.d}, in_layout, pad, 2);
  c.out = make_strided({p.b, p.sq, p.hq, p.d}, in_layout, pad);
  c.dout = make_strided({p.b, p.sq, p.hq, p.d}, in_layout, pad);
  c.dq = make_strided({p.b, p.sq, p.hq, p.d}, grad_layout, pad, 5);
  c.dk = make_strided({p.b, p.sk, p.hkv, p.d}, grad_layout, pad);
  c.dv = make_strided({p.b, p.sk, p.hkv, p.d}, grad_layout, pad, 7);
  c.lse.assign(static_cast<std::size_t>(p.b * p.hq * p.sq), NAN);
  return c;
}

TensorView lse_view(Call& c, const Problem& p) {
  return orchard::make_contiguous_view(c.lse.data(), DType::kFloat32, kCpu, {p.b, p.hq, p.sq});
}

orchard::ForwardArgs forward_args(Call& c, const Problem& p) {
  orchard::ForwardArgs a;
  a.q = c.q.view;
  a.k = c.k.view;
  a.v = c.v.view;
  a.out = c.out.view;
  a.lse = lse_view(c, p);
  return a;
}

orchard::BackwardArgs backward_args(Call& c, const Problem& p) {
  orchard::BackwardArgs g;
  g.q = c.q.view;
  g.k = c.k.view;
  g.v = c.v.view;
  g.out = c.out.view;
  g.dout = c.dout.view;
  g.lse = lse_view(c, p);
  g.dq = c.dq.view;
  g.dk = c.dk.view;
  g.dv = c.dv.view;
  return g;
}

void run_forward(Call& c, const Problem& p, bool causal) {
  orchard::ForwardArgs a = forward_args(c, p);
  a.options.causal = causal;
  orchard::attention_forward(a);
}

void run_backward(Call& c, const Problem& p, bool causal) {
  orchard::BackwardArgs g = backward_args(c, p);
  g.options.causal = causal;
  std::vector<std::uint8_t> ws(orchard::backward_workspace_bytes(g) + 256);
  if (ws.size() > 256) {
    auto addr = reinterpret_cast<std::uintptr_t>(ws.data());
    g.workspace = orchard::make_contiguous_view(reinterpret_cast<void*>((addr + 255) / 256 * 256), DType::kUInt8, kCpu,
                                                {static_cast<std::int64_t>(ws.size() - 256)});
  }
  orchard::attention_backward(g);
}

class LayoutTest : public ::testing::TestWithParam<std::tuple<std::array<int, 4>, std::array<int, 4>, int, bool>> {};

TEST_P(LayoutTest, MatchesContiguousCall) {
  const auto [in_layout, grad_layout, pad, causal] = GetParam();
  const Problem p;
  std::mt19937 rng(1234);
  Call ref = make_call(p, kBSHD, kBSHD, 0);
  fill_inputs(ref, rng);
  run_forward(ref, p, causal);
  run_backward(ref, p, causal);

  Call c = make_call(p, in_layout, grad_layout, pad);
  copy_inputs(c, ref);
  const std::vector<float> q_before = c.q.storage;
  run_forward(c, p, causal);
  run_backward(c, p, causal);
  // Same kernels, same math: layouts must not change a single bit... but
  // staged copies reorder nothing either, so allow only exact agreement.
  EXPECT_EQ(max_diff(c.out, ref.out), 0.0f);
  EXPECT_EQ(max_diff(c.dq, ref.dq), 0.0f);
  EXPECT_EQ(max_diff(c.dk, ref.dk), 0.0f);
  EXPECT_EQ(max_diff(c.dv, ref.dv), 0.0f);
  for (std::size_t i = 0; i < c.lse.size(); ++i) ASSERT_EQ(c.lse[i], ref.lse[i]) << i;
  // Padding elements of strided destinations stay untouched (still NaN).
  std::size_t written = 0;
  for (float x : c.dq.storage) written += !std::isnan(x);
  EXPECT_EQ(written, static_cast<std::size_t>(p.b * p.sq * p.hq * p.d));
  // Inputs are never modified.
  for (std::size_t i = 0; i < q_before.size(); ++i)
    ASSERT_TRUE(q_before[i] == c.q.storage[i] || (std::isnan(q_before[i]) && std::isnan(c.q.storage[i])));
}

INSTANTIATE_TEST_SUITE_P(Layouts, LayoutTest,
                         ::testing::Values(std::make_tuple(kBHSD, kBHSD, 0, false),
                                           std::make_tuple(kBHSD, kBSHD, 3, true),
                                           std::make_tuple(kBSHD, kBHSD, 5, true),
                                           std::make_tuple(kDimOuter, kBSHD, 0, false),
                                           std::make_tuple(kBSHD, kDimOuter, 1, true),
                                           std::make_tuple(kDimOuter, kDimOuter, 2, true)));

// ---- tensor profile --------------------------------------------------------

std::string profile_of_forward(std::array<int, 4> layout) {
  const Problem p;
  std::mt19937 rng(1);
  Call c = make_call(p, layout, kBSHD, 0);
  fill_inputs(c, rng);
  setenv("ORCHARD_TENSOR_PROFILE", "1", 1);
  ::testing::internal::CaptureStderr();
  run_forward(c, p, false);
  std::string text = ::testing::internal::GetCapturedStderr();
  unsetenv("ORCHARD_TENSOR_PROFILE");
  return text;
}

TEST(TensorProfile, BshdAndBhsdAreZeroCopy) {
  for (auto layout : {kBSHD, kBHSD}) {
    const std::string log = profile_of_forward(layout);
    EXPECT_NE(log.find("fwd q: float32[2, 37, 4, 24]"), std::string::npos) << log;
    EXPECT_EQ(log.find("staged"), std::string::npos) << log;
    EXPECT_NE(log.find("zero-copy"), std::string::npos) << log;
  }
}

TEST(TensorProfile, NonUnitLastStrideIsStagedAndSaysWhy) {
  const std::string log = profile_of_forward(kDimOuter);
  EXPECT_NE(log.find("staged (last-dim stride"), std::string::npos) << log;
}

TEST(TensorProfile, SilentWhenOff) {
  unsetenv("ORCHARD_TENSOR_PROFILE");
  const Problem p;
  Call c = make_call(p, kBSHD, kBSHD, 0);
  std::mt19937 rng(2);
  fill_inputs(c, rng);
  ::testing::internal::CaptureStderr();
  run_forward(c, p, false);
  EXPECT_EQ(::testing::internal::GetCapturedStderr(), "");
}

// ---- debug log ---------------------------------------------------------------

std::vector<std::string> read_lines(const std::filesystem::path& path) {
  std::ifstream f(path);
  std::vector<std::string> lines;
  for (std::string line; std::getline(f, line);) lines.push_back(line);
  return lines;
}

TEST(DebugLog, OneWellFormedLinePerCallAcrossThreads) {
  const auto dir = std::filesystem::temp_directory_path() / ("orchard_log_test_" + std::to_string(getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  setenv("ORCHARD_LOG_DIR", dir.c_str(), 1);
  setenv("ORCHARD_DEBUG_FLASH_ATN", "1", 1);
  constexpr int kThreads = 4, kCallsPerThread = 5;
  std::vector<std::thread> threads;
  std::vector<float> errors(kThreads, 0);
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([t, &errors] {
      Problem p;
      p.sq = 16 + t;
      std::mt19937 rng(t);
      for (int i = 0; i < kCallsPerThread; ++i) {
        Call c = make_call(p, kBSHD, kBSHD, 0);
        fill_inputs(c, rng);
        run_forward(c, p, true);
        run_backward(c, p, true);
        Call again = make_call(p, kBHSD, kBHSD, 0);
        copy_inputs(again, c);
        run_forward(again, p, true);
        errors[t] = std::max(errors[t], max_diff(again.out, c.out));
      }
    });
  for (auto& th : threads) th.join();
  unsetenv("ORCHARD_DEBUG_FLASH_ATN");
  unsetenv("ORCHARD_LOG_DIR");
  for (float e : errors) EXPECT_EQ(e, 0.0f);

  std::vector<std::filesystem::path> files;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) files.push_back(entry.path());
  ASSERT_EQ(files.size(), 1u);
  const auto lines = read_lines(files[0]);
  ASSERT_EQ(lines.size(), static_cast<std::size_t>(kThreads * kCallsPerThread * 3));
  int fwd = 0, bwd = 0;
  for (const auto& line : lines) {
    fwd += line.rfind("FWD #", 0) == 0;
    bwd += line.rfind("BWD #", 0) == 0;
    EXPECT_NE(line.find(" backend=cpu variant="), std::string::npos) << line;
    EXPECT_NE(line.find(" elapsed_ms="), std::string::npos) << line;
    EXPECT_NE(line.find(" dtype=float32"), std::string::npos) << line;
  }
  EXPECT_EQ(fwd, kThreads * kCallsPerThread * 2);
  EXPECT_EQ(bwd, kThreads * kCallsPerThread);
  std::filesystem::remove_all(dir);
}

// ---- bad input -----------------------------------------------------------------

struct BadCase {
  const char* name;
  std::function<void(orchard::ForwardArgs&, Call&)> corrupt;
  const char* expected;  // substring of the message
};

TEST(BadInput, ForwardRaisesOpPrefixedErrorAndWritesNothing) {
  const Problem p;
  std::vector<float> other(4096, 1.0f);
  const std::vector<BadCase> cases = {
      {"dtype mismatch", [](auto& a, auto&) { a.k.dtype = DType::kFloat16; }, "dtype float16"},
      {"unsupported dtype", [](auto& a, auto&) { a.q.dtype = a.k.dtype = a.v.dtype = a.out.dtype = DType::kUInt8; },
       "unsupported dtype uint8"},
      {"rank", [](auto& a, auto&) { a.q.ndim = 3; }, "q must have rank 4"},
      {"batch mismatch", [](auto& a, auto&) { a.k.shape[0] = 3; }, "k has shape"},
      // v may have its own head dim (d_v); out must then have it too.
      {"value head dim vs out", [](auto& a, auto&) { a.v.shape[3] = 8; }, "out has shape"},
      {"key head dim mismatch", [](auto& a, auto&) { a.k.shape[3] = 8; }, "k has shape"},
      {"gqa", [](auto& a, auto&) { a.k.shape[2] = a.v.shape[2] = 3; }, "multiple of key/value heads"},
      {"head dim 0", [](auto& a, auto&) { a.q.shape[3] = a.k.shape[3] = a.v.shape[3] = a.out.shape[3] = 0; },
       "head dim 0 is unsupported"},
      {"head dim 512", [](auto& a, auto&) { a.q.shape[3] = a.k.shape[3] = a.v.shape[3] = a.out.shape[3] = 512; },
       "head dim 512 is unsupported"},
      {"dropout negative", [](auto& a, auto&) { a.options.dropout_p = -0.1; }, "dropout_p must be in [0, 1)"},
      {"dropout one", [](auto& a, auto&) { a.options.dropout_p = 1.0; }, "dropout_p must be in [0, 1)"},
      {"dropout nan", [](auto& a, auto&) { a.options.dropout_p = NAN; }, "dropout_p must be in [0, 1)"},
      {"device mismatch",
       [](auto& a, auto&) { a.v.device = orchard::Device{orchard::DeviceType::kCUDA, 0}; }, "device mismatch"},
      {"out aliases q", [](auto& a, auto&) { a.out.data = a.q.data; a.out.strides = a.q.strides; },
       "output out aliases input q"},
      {"out zero stride", [](auto& a, auto&) { a.out.strides[1] = 0; }, "overlapping memory"},
      {"lse dtype", [](auto& a, auto&) { a.lse.dtype = DType::kFloat16; }, "lse must be float32"},
      {"lse shape", [](auto& a, auto&) { a.lse.shape[2] = 1; }, "lse has shape"},
      {"missing v", [](auto& a, auto&) { a.v = TensorView{}; }, "v is required"},
      {"nan scale", [](auto& a, auto&) { a.options.softmax_scale = NAN; }, "softmax_scale must be finite"},
  };
  for (const BadCase& bc : cases) {
    Call c = make_call(p, kBSHD, kBSHD, 0);
    std::mt19937 rng(3);
    fill_inputs(c, rng);
    orchard::ForwardArgs a = forward_args(c, p);
    a.options.op_name = "orchard.test_op";
    bc.corrupt(a, c);
    const auto q_before = c.q.storage, k_before = c.k.storage, v_before = c.v.storage;
    try {
      orchard::attention_forward(a);
      ADD_FAILURE() << bc.name << ": no error raised";
    } catch (const orchard::Error& e) {
      const std::string msg = e.what();
      EXPECT_EQ(msg.rfind("orchard.test_op: ", 0), 0u) << bc.name << ": " << msg;
      EXPECT_NE(msg.find(bc.expected), std::string::npos) << bc.name << ": " << msg;
      EXPECT_EQ(e.kind(), orchard::ErrorKind::kInvalidArgument) << bc.name;
    }
    for (float x : c.out.storage) ASSERT_TRUE(std::isnan(x)) << bc.name << ": out was written";
    for (float x : c.lse) ASSERT_TRUE(std::isnan(x)) << bc.name << ": lse was written";
    EXPECT_EQ(0, std::memcmp(q_before.data(), c.q.storage.data(), q_before.size() * 4)) << bc.name;
    EXPECT_EQ(0, std::memcmp(k_before.data(), c.k.storage.data(), k_before.size() * 4)) << bc.name;
    EXPECT_EQ(0, std::memcmp(v_before.data(), c.v.storage.data(), v_before.size() * 4)) << bc.name;
  }
}

TEST(BadInput, CudaTensorsWithoutCudaBackendOrHostMix) {
  const Problem p;
  Call c = make_call(p, kBSHD, kBSHD, 0);
  orchard::ForwardArgs a = forward_args(c, p);
  a.q.device = orchard::Device{orchard::DeviceType::kCUDA, 0};
  try {
    orchard::attention_forward(a);
    ADD_FAILURE() << "no error";
  } catch (const orchard::Error& e) {
    EXPECT_NE(std::string(e.what()).find("host memory cannot be handed to a CUDA call"), std::string::npos)
        << e.what();
  }
}

TEST(BadInput, BackwardWorkspaceAndGradAliasing) {
  const Problem p;
  Call c = make_call(p, kBSHD, kBSHD, 0);
  std::mt19937 rng(4);
  fill_inputs(c, rng);
  run_forward(c, p, false);
  orchard::BackwardArgs g = backward_args(c, p);
  g.dq = c.q.view;  // gradient written over its own input
  EXPECT_THROW(orchard::attention_backward(g), orchard::Error);
  g.dq = c.dq.view;
  g.dk = c.dv.view;  // two gradients into one buffer
  EXPECT_THROW(orchard::attention_backward(g), orchard::Error);
  for (float x : c.dq.storage) ASSERT_TRUE(std::isnan(x));
}

// ---- empty problems ------------------------------------------------------------

TEST(Empty, ZeroLengthSequences) {
  for (auto [sq, sk] : {std::pair<std::int64_t, std::int64_t>{0, 5}, {5, 0}, {0, 0}}) {
    Problem p;
    p.sq = sq;
    p.sk = sk;
    Call c = make_call(p, kBSHD, kBSHD, 0);
    std::mt19937 rng(5);
    fill_inputs(c, rng);
    run_forward(c, p, false);
    run_backward(c, p, false);
    if (sk == 0) {
      for (std::size_t i = 0; i < c.lse.size(); ++i) EXPECT_TRUE(std::isinf(c.lse[i]) && c.lse[i] < 0);
      for (float x : c.out.storage) EXPECT_EQ(x, 0.0f);
      for (std::int64_t b = 0; b < p.b; ++b)
        for (std::int64_t i = 0; i < p.sq; ++i)
          for (std::int64_t h = 0; h < p.hq; ++h)
            for (std::int64_t d = 0; d < p.d; ++d) EXPECT_EQ(at(c.dq, b, i, h, d), 0.0f);
    }
    if (sq == 0)
      for (float x : c.dk.storage) EXPECT_EQ(x, 0.0f);
  }
}

// ---- varlen padding rows ------------------------------------------------------

// Packed rows outside [cu_seqlens[0], cu_seqlens[b]) belong to no sequence: the core fills them
// (out, dq, dk, dv 0, lse -inf) instead of leaving the caller's memory (NaN here) in them; owned
// rows are computed. Two sequences of 16 packed rows each for q and k.
void check_unowned_rows_filled(std::vector<std::int32_t> cu_q, std::vector<std::int32_t> cu_k) {
  const std::int64_t hq = 2, hkv = 1, d = 16, total_q = 16, total_k = 16;
  std::mt19937 rng(7);
  std::normal_distribution<float> n;
  auto buffer = [&](std::int64_t rows, std::int64_t heads, bool random) {
    std::vector<float> b(static_cast<std::size_t>(rows * heads * d), NAN);
    if (random)
      for (float& x : b) x = n(rng);
    return b;
  };
  std::vector<float> q = buffer(total_q, hq, true), k = buffer(total_k, hkv, true), v = buffer(total_k, hkv, true);
  std::vector<float> out = buffer(total_q, hq, false), dout = buffer(total_q, hq, true);
  std::vector<float> dq = buffer(total_q, hq, false), dk = buffer(total_k, hkv, false), dv = buffer(total_k, hkv, false);
  std::vector<float> lse(static_cast<std::size_t>(hq * total_q), NAN);
  auto view = [&](std::vector<float>& b, std::int64_t rows, std::int64_t heads) {
    return orchard::make_contiguous_view(b.data(), DType::kFloat32, kCpu, {rows, heads, d});
  };
  orchard::AttentionExtras x;
  x.cu_seqlens_q = orchard::make_contiguous_view(cu_q.data(), DType::kInt32, kCpu, {3});
  x.cu_seqlens_k = orchard::make_contiguous_view(cu_k.data(), DType::kInt32, kCpu, {3});
  x.max_seqlen_q = 7;
  x.max_seqlen_k = 7;
  orchard::ForwardArgs a;
  a.q = view(q, total_q, hq);
  a.k = view(k, total_k, hkv);
  a.v = view(v, total_k, hkv);
  a.out = view(out, total_q, hq);
  a.lse = orchard::make_contiguous_view(lse.data(), DType::kFloat32, kCpu, {hq, total_q});
  a.extras = x;
  a.options.causal = true;
  orchard::attention_forward(a);
  orchard::BackwardArgs g;
  g.q = a.q;
  g.k = a.k;
  g.v = a.v;
  g.out = a.out;
  g.dout = view(dout, total_q, hq);
  g.lse = a.lse;
  g.dq = view(dq, total_q, hq);
  g.dk = view(dk, total_k, hkv);
  g.dv = view(dv, total_k, hkv);
  g.extras = x;
  g.options.causal = true;
  ASSERT_EQ(orchard::backward_workspace_bytes(g), 0u);  // the CPU backend needs none
  orchard::attention_backward(g);

  // Each row of `b` (heads x d values) is 0 outside [first, last) and finite inside.
  auto check_rows = [&](const std::vector<float>& b, std::int64_t heads, std::int64_t first, std::int64_t last,
                        const char* what) {
    for (std::int64_t r = 0; r * heads * d < static_cast<std::int64_t>(b.size()); ++r)
      for (std::int64_t i = r * heads * d; i < (r + 1) * heads * d; ++i) {
        const float e = b[static_cast<std::size_t>(i)];
        if (r >= first && r < last) EXPECT_TRUE(std::isfinite(e)) << what << " row " << r;
        else EXPECT_EQ(e, 0.0f) << what << " row " << r;
      }
  };
  check_rows(out, hq, cu_q.front(), cu_q.back(), "out");
  check_rows(dq, hq, cu_q.front(), cu_q.back(), "dq");
  check_rows(dk, hkv, cu_k.front(), cu_k.back(), "dk");
  check_rows(dv, hkv, cu_k.front(), cu_k.back(), "dv");
  for (std::int64_t h = 0; h < hq; ++h)
    for (std::int64_t r = 0; r < total_q; ++r) {
      const float l = lse[static_cast<std::size_t>(h * total_q + r)];
      if (r >= cu_q.front() && r < cu_q.back()) EXPECT_TRUE(std::isfinite(l)) << h << " " << r;
      else EXPECT_TRUE(std::isinf(l) && l < 0) << h << " " << r;
    }
}

// Two sequences (5 x 6 and 7 x 7, causal: every owned row sees a key), then 4 and 3 padding rows.
TEST(Varlen, RowsPastTheLastOffsetAreFilled) { check_unowned_rows_filled({0, 5, 12}, {0, 6, 13}); }

// Offsets that start past row 0 (allowed: cu_seqlens[0] >= 0): the rows before are no sequence's
// either (session 41: the CPU path had left them unwritten, its output there was the caller's memory).
TEST(Varlen, RowsBeforeTheFirstOffsetAreFilled) { check_unowned_rows_filled({2, 7, 14}, {3, 9, 16}); }

}  // namespace
