// orchard::attention_with_kvcache through the public C++ API (CPU): a paged float32
// cache with an append, GQA and causal, against a naive double reference here; the
// split count changes nothing; bad input throws before anything is written.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <memory>
#include <random>
#include <vector>

#include "orchard/kvcache.h"

namespace {

using orchard::DType;
using orchard::TensorView;

TensorView view(void* data, DType dt, std::initializer_list<std::int64_t> shape) {
  return orchard::make_contiguous_view(data, dt, orchard::Device{}, shape);
}

struct Case {
  int b = 2, sq = 2, hq = 4, hkv = 2, d = 16, page = 16, per_seq = 4, s_new = 2, nblocks = 9;
  std::vector<float> q, kc, vc, kn, vn, out, lse;
  std::vector<std::int32_t> seqlens{37, 62}, table;
  Case() {
    std::mt19937 rng(7);
    std::normal_distribution<float> n;
    auto fill = [&](std::vector<float>& v, std::size_t count) {
      v.resize(count);
      for (auto& x : v) x = n(rng);
    };
    fill(q, std::size_t(b) * sq * hq * d);
    fill(kc, std::size_t(nblocks) * page * hkv * d);
    fill(vc, std::size_t(nblocks) * page * hkv * d);
    fill(kn, std::size_t(b) * s_new * hkv * d);
    fill(vn, std::size_t(b) * s_new * hkv * d);
    out.assign(q.size(), 0.f);
    lse.assign(std::size_t(b) * hq * sq, 0.f);
    table = {3, 0, 7, 1, 8, 2, 5, 4};  // (b, per_seq), scattered pages
  }
  orchard::DecodeArgs args() {
    orchard::DecodeArgs a;
    a.q = view(q.data(), DType::kFloat32, {b, sq, hq, d});
    a.k_cache = view(kc.data(), DType::kFloat32, {nblocks, page, hkv, d});
    a.v_cache = view(vc.data(), DType::kFloat32, {nblocks, page, hkv, d});
    a.k = view(kn.data(), DType::kFloat32, {b, s_new, hkv, d});
    a.v = view(vn.data(), DType::kFloat32, {b, s_new, hkv, d});
    a.cache_seqlens = view(seqlens.data(), DType::kInt32, {b});
    a.block_table = view(table.data(), DType::kInt32, {b, per_seq});
    a.out = view(out.data(), DType::kFloat32, {b, sq, hq, d});
    a.lse = view(lse.data(), DType::kFloat32, {b, hq, sq});
    a.options.causal = true;
    return a;
  }
  float* cache_row(std::vector<float>& c, int bi, int row, int h) {
    return &c[((std::size_t(table[bi * per_seq + row / page]) * page + row % page) * hkv + h) * d];
  }
};

TEST(KvcacheApi, PagedAppendGqaCausalMatchesReference) {
  Case c;
  // Reference (double) on a copy of the cache with the append done by hand.
  Case ref = c;
  for (int bi = 0; bi < c.b; ++bi)
    for (int t = 0; t < c.s_new; ++t)
      for (int h = 0; h < c.hkv; ++h)
        for (int x = 0; x < c.d; ++x) {
          ref.cache_row(ref.kc, bi, c.seqlens[bi] + t, h)[x] = c.kn[((bi * c.s_new + t) * c.hkv + h) * c.d + x];
          ref.cache_row(ref.vc, bi, c.seqlens[bi] + t, h)[x] = c.vn[((bi * c.s_new + t) * c.hkv + h) * c.d + x];
        }
  for (int splits : {1, 3, 0}) {
    Case run = c;
    orchard::DecodeArgs a = run.args();
    a.options.num_splits = splits;
    const orchard::DecodePlan plan = orchard::kvcache_plan(a);
    std::vector<unsigned char> ws(plan.workspace_bytes + 16);
    if (plan.workspace_bytes) {
      void* p = ws.data();
      std::size_t space = ws.size();
      std::align(16, plan.workspace_bytes, p, space);
      a.workspace = view(p, DType::kUInt8, {static_cast<std::int64_t>(plan.workspace_bytes)});
    }
    orchard::attention_with_kvcache(a);
    EXPECT_EQ(run.kc, ref.kc) << "append, splits " << splits;
    const double scale = 1.0 / std::sqrt(double(c.d));
    for (int bi = 0; bi < c.b; ++bi) {
      const int n = c.seqlens[bi] + c.s_new;
      for (int i = 0; i < c.sq; ++i)
        for (int h = 0; h < c.hq; ++h) {
          const int hk = h / (c.hq / c.hkv);
          const float* qr = &c.q[((bi * c.sq + i) * c.hq + h) * c.d];
          std::vector<double> s(n);
          double mx = -INFINITY;
          const int last = i + n - c.sq;  // causal, bottom-right
          for (int j = 0; j <= last; ++j) {
            double dot = 0;
            for (int x = 0; x < c.d; ++x) dot += double(qr[x]) * ref.cache_row(ref.kc, bi, j, hk)[x];
            s[j] = dot * scale;
            mx = std::max(mx, s[j]);
          }
          double sum = 0;
          for (int j = 0; j <= last; ++j) sum += std::exp(s[j] - mx);
          EXPECT_NEAR(run.lse[(bi * c.hq + h) * c.sq + i], mx + std::log(sum), 1e-4);
          for (int x = 0; x < c.d; ++x) {
            double o = 0;
            for (int j = 0; j <= last; ++j) o += std::exp(s[j] - mx) / sum * ref.cache_row(ref.vc, bi, j, hk)[x];
            EXPECT_NEAR(run.out[((bi * c.sq + i) * c.hq + h) * c.d + x], o, 2e-5) << "splits " << splits;
          }
        }
    }
  }
}

TEST(KvcacheApi, BadInputThrowsBeforeWriting) {
  auto expect_error = [](Case& c, orchard::DecodeArgs a, const char* what) {
    const std::vector<float> k_before = c.kc;
    try {
      orchard::attention_with_kvcache(a);
      ADD_FAILURE() << "no error for " << what;
    } catch (const orchard::Error& e) {
      const std::string msg = e.what();
      EXPECT_EQ(msg.rfind("orchard.flash_attn_with_kvcache: ", 0), 0u) << msg;
      EXPECT_NE(msg.find(what), std::string::npos) << msg;
    }
    EXPECT_EQ(c.kc, k_before) << what;
  };
  {
    Case c;
    c.table[5] = 9;  // page id past the cache (used: batch 1 needs pages 0..3)
    expect_error(c, c.args(), "block_table[1, 1] = 9");
  }
  {
    Case c;
    c.seqlens[1] = 63;
    expect_error(c, c.args(), "longer than the cache");
  }
  {
    Case c;
    orchard::DecodeArgs a = c.args();
    a.cache_seqlens = TensorView{};
    expect_error(c, a, "need cache_seqlens");
  }
  {
    Case c;
    orchard::DecodeArgs a = c.args();
    a.q.shape[2] = 3;
    a.out.shape[2] = 3;
    expect_error(c, a, "head count mismatch");
  }
  {
    Case c;  // the append would write each page's rows through two page ids (stride 0)
    orchard::DecodeArgs a = c.args();
    a.k_cache.strides[0] = 0;
    expect_error(c, a, "k_cache (9, 16, 2, 16) has overlapping memory");
  }
}

}  // namespace
