// Which calls the sm90 kernels take (src/backends/cuda/sm90/sm90_call_support.h), checked on the
// host: a call the dispatch sends to the sm90 path must be one their kernels cover (else a wrong
// answer or an out-of-bounds read on the GPU), and one they cover should not silently fall back.
// The GPU tests (tests/python/test_cuda.py) check the same rules through the debug log on an
// H100 / H200; these pin them in CI, where no GPU runs.
#include "backends/cuda/sm90/sm90_call_support.h"

#include <gtest/gtest.h>

#include <cstdint>

namespace orchard::cuda {
namespace {

// A contiguous BSHD bf16 call: b 2, sq 300, sk 400, hq 8, hkv 4, d = d_v; pointers 256-byte aligned
// (the values are never read: only the addresses and strides count).
BwdParams plain_call(int d = 128) {
  BwdParams p;
  p.dtype = DType::kBFloat16;
  p.b = 2;
  p.sq = 300;
  p.sk = 400;
  p.hq = 8;
  p.hkv = 4;
  p.d = d;
  p.d_v = d;
  p.scale = 0.125f;
  auto* base = reinterpret_cast<char*>(std::uintptr_t{1} << 20);
  p.q = p.out = base;
  p.k = p.v = base + (1 << 16);
  p.dout = p.dq = p.dk = p.dv = base + (1 << 18);
  p.q_row_stride = p.o_row_stride = p.do_row_stride = p.dq_row_stride = int64_t{p.hq} * d;
  p.k_row_stride = p.v_row_stride = p.dk_row_stride = p.dv_row_stride = int64_t{p.hkv} * d;
  p.q_head_stride = p.o_head_stride = p.do_head_stride = p.dq_head_stride = d;
  p.k_head_stride = p.v_head_stride = p.dk_head_stride = p.dv_head_stride = d;
  p.q_batch_stride = p.o_batch_stride = p.do_batch_stride = p.dq_batch_stride = int64_t{p.sq} * p.hq * d;
  p.k_batch_stride = p.v_batch_stride = p.dk_batch_stride = p.dv_batch_stride = int64_t{p.sk} * p.hkv * d;
  return p;
}

bool fwd(const BwdParams& p) { return sm90_fwd_call_supported(p); }
bool bwd(const BwdParams& p) { return sm90_bwd_call_supported(p); }

TEST(Sm90CallSupport, PlainCallsAndTheirHeadDims) {
  for (int d : {40, 64, 72, 96, 128, 160, 192, 256}) {
    EXPECT_TRUE(fwd(plain_call(d))) << d;
    EXPECT_TRUE(bwd(plain_call(d))) << d;
  }
  for (int d : {8, 32, 36, 100, 264}) EXPECT_FALSE(fwd(plain_call(d))) << d;  // <= 32, not x8, > 256
  BwdParams p = plain_call();
  p.dtype = DType::kFloat32;
  EXPECT_FALSE(fwd(p));
  p = plain_call();
  p.d_v = 64;  // a value head dim of its own
  EXPECT_FALSE(fwd(p));
  p = plain_call();
  p.scale = -0.125f;
  EXPECT_FALSE(fwd(p));
  p = plain_call();
  p.k_row_stride += 4;  // rows not in whole 16-byte chunks (TMA)
  EXPECT_FALSE(fwd(p));
  p = plain_call();
  p.do_row_stride += 4;
  EXPECT_TRUE(fwd(p));
  EXPECT_FALSE(bwd(p));
}

TEST(Sm90CallSupport, ModifiersAndSinks) {
  BwdParams p = plain_call();
  p.causal = true;
  p.window_left = 100;
  p.window_right = 0;
  p.softcap = 5.f;
  static const float slopes[8] = {};
  p.alibi_slopes = slopes;
  static const float sink[8] = {};
  p.sink = sink;
  EXPECT_TRUE(fwd(p));
  EXPECT_TRUE(bwd(p));
  float dsink[8];
  p.dsink = dsink;  // the C++ API's dsink output: the sm80 backward's pass
  EXPECT_TRUE(fwd(p));
  EXPECT_FALSE(bwd(p));
  p = plain_call();
  p.dropout_p = 0.1f;
  EXPECT_TRUE(fwd(p));  // (the dispatch adds ORCHARD_SM90_DROPOUT and sm90_fwd_takes_dropout)
  EXPECT_TRUE(sm90_fwd_takes_dropout(p));
  EXPECT_TRUE(sm90_fwd_takes_dropout(plain_call(64)));
  EXPECT_TRUE(sm90_fwd_takes_dropout(plain_call(80)));  // the d96 bucket
  {
    FwdParams biased = plain_call(64);  // the kBias kernels carry no dropout code
    static const float bias[1] = {};
    biased.attn_bias = bias;
    EXPECT_FALSE(sm90_fwd_takes_dropout(biased));
  }
  // The default (ORCHARD_SM90_DROPOUT unset): the buckets measured faster than the sm80 kernels.
  for (int bucket : {64, 96, 128, 192, 256}) {
    EXPECT_TRUE(sm90_dropout_measured_faster(bucket, true)) << bucket;
    EXPECT_TRUE(sm90_dropout_measured_faster(bucket, false)) << bucket;
  }
  EXPECT_TRUE(bwd(p));   // the d <= 128 kernel's kFeatures instantiations
  p.deterministic = true;  // the ordered-dQ kernels have no dropout
  EXPECT_FALSE(bwd(p));
  p.deterministic = false;
  {
    BwdParams wide = plain_call(192);  // the wide kernel's kFeatures instantiations
    wide.dropout_p = 0.1f;
    EXPECT_TRUE(fwd(wide));
    EXPECT_TRUE(bwd(wide));
  }
  p.dropout_col_offset = 64;  // a context-parallel block on the 32 grid: whole calls in place
  p.dropout_row_offset = 1024;
  EXPECT_TRUE(fwd(p) && sm90_fwd_takes_dropout(p));
  EXPECT_TRUE(bwd(p));
  p.dropout_col_offset = 48;  // on the 16 grid: the backward's lane pairs, not the forward's blocks
  EXPECT_FALSE(sm90_fwd_takes_dropout(p));
  EXPECT_TRUE(bwd(p));
  p.dropout_col_offset = 8;  // a lane's calls would straddle two 32-column blocks' layout
  EXPECT_FALSE(fwd(p));
  p.dropout_col_offset = 0;
  p.dropout_row_offset = 8;  // rows r, r + 8 in two calls
  EXPECT_FALSE(fwd(p));
  p.dropout_row_offset = 0;
  static std::uint8_t mask_out[1];
  p.dropout_mask = mask_out;  // the mask output: written by the sm80 path only
  EXPECT_FALSE(fwd(p));
  p = plain_call();
  static const int32_t cu[3] = {0, 100, 300};
  p.cu_seqlens_q = p.cu_seqlens_k = cu;
  EXPECT_FALSE(fwd(p));
}

TEST(Sm90CallSupport, RowBroadcastAndStageableDenseBiases) {
  alignas(16) static const unsigned char mask[2 * 400 * 400] = {};
  BwdParams p = plain_call();
  p.attn_bias = mask;  // key padding (B, 1, 1, S)
  p.bias_batch_stride = 400;
  p.bias_head_stride = 0;
  p.bias_row_stride = 0;
  p.bias_col_stride = 1;
  EXPECT_TRUE(fwd(p));
  EXPECT_TRUE(bwd(p));
  p.causal = true;
  p.window_right = 0;
  EXPECT_TRUE(bwd(p));
  p.softcap = 5.f;  // softcap with a bias: the forward only
  EXPECT_TRUE(fwd(p));
  EXPECT_FALSE(bwd(p));
  p.softcap = 0.f;
  p.deterministic = true;  // the ordered-dQ kernels have no modifiers
  EXPECT_FALSE(bwd(p));
  p.deterministic = false;
  p.bias_row_stride = 400;  // rows of its own: both sm90 passes stage them by TMA
  p.bias_batch_stride = 400 * 400;
  EXPECT_TRUE(fwd(p));
  EXPECT_TRUE(bwd(p));
  p.deterministic = true;
  EXPECT_FALSE(bwd(p));
  p.deterministic = false;
  p.softcap = 5.f;  // a dense bias starts the scores, so softcap would cap it
  EXPECT_FALSE(fwd(p));
  p.softcap = 0.f;
  p.bias_row_stride = 401;  // rows not of whole 16-byte chunks (TMA)
  EXPECT_FALSE(fwd(p));
  p.sq = 1;  // ... unless there is one query row (then row-broadcast)
  EXPECT_TRUE(fwd(p));
  p.sq = 300;
  p.bias_row_stride = 400;
  p.attn_bias = mask + 1;  // base not 16-byte aligned
  EXPECT_FALSE(fwd(p));
  p.attn_bias = mask;
  p.bias_head_stride = 8;  // a head stride of 8 bytes
  EXPECT_FALSE(fwd(p));
  p.bias_head_stride = 0;
  p.attn_bias_dtype = DType::kFloat32;  // float32 dense: the sm80 kernels (stage too large)
  p.bias_row_stride = 100;
  EXPECT_FALSE(fwd(p));
  p.attn_bias_dtype = DType::kBFloat16;  // a 16-bit float bias of 200 elements (400 bytes) per row
  p.bias_row_stride = 200;
  EXPECT_TRUE(fwd(p));
  p.bias_row_stride = 204;  // 408 bytes
  EXPECT_FALSE(fwd(p));
  p.bias_row_stride = 200;
  auto dense_call = [&](int d) {  // this bias on a call of head dim d
    BwdParams q = plain_call(d);
    q.attn_bias = p.attn_bias, q.attn_bias_dtype = p.attn_bias_dtype;
    q.bias_row_stride = p.bias_row_stride, q.bias_batch_stride = p.bias_batch_stride, q.bias_col_stride = 1;
    return q;
  };
  for (int d : {64, 40, 96, 72, 128, 104}) {  // the d <= 128 buckets, forward and backward
    EXPECT_TRUE(fwd(dense_call(d))) << d;
    EXPECT_TRUE(bwd(dense_call(d))) << d;
  }
  for (int d : {160, 192, 256}) {  // the wide backward reads row-broadcast biases only
    EXPECT_TRUE(fwd(dense_call(d))) << d;
    EXPECT_FALSE(bwd(dense_call(d))) << d;
  }
  p = plain_call();
  p.attn_bias = mask;
  p.bias_col_stride = 2;  // keys not contiguous
  EXPECT_FALSE(fwd(p));
}

TEST(Sm90CallSupport, DeterministicOnlyPlainD64AndD128) {
  for (int d : {64, 128}) {
    BwdParams p = plain_call(d);
    p.deterministic = true;
    EXPECT_TRUE(bwd(p)) << d;
    p.window_left = 50;
    EXPECT_FALSE(bwd(p)) << d;
  }
  for (int d : {96, 192, 256}) {
    BwdParams p = plain_call(d);
    p.deterministic = true;
    EXPECT_FALSE(bwd(p)) << d;
  }
  BwdParams p = plain_call();
  p.deterministic = true;
  p.causal = true;
  p.window_right = 0;  // causal alone is not a modifier (the core's causal form)
  EXPECT_TRUE(bwd(p));
}

// A packed (varlen) form of plain_call: 3 sequences in 700 rows, batch strides 0.
BwdParams varlen_call(int d, const std::int32_t* cu_q, const std::int32_t* cu_k) {
  BwdParams p = plain_call(d);
  p.b = 3;
  p.sq = p.sk = 400;  // the longest sequence
  p.total_q = p.total_k = 700;
  p.cu_seqlens_q = cu_q;
  p.cu_seqlens_k = cu_k;
  p.causal_offset = 7;  // whatever the core put there: the segment form's diagonal is 0
  p.q_batch_stride = p.o_batch_stride = p.do_batch_stride = p.dq_batch_stride = 0;
  p.k_batch_stride = p.v_batch_stride = p.dk_batch_stride = p.dv_batch_stride = 0;
  return p;
}

TEST(Sm90CallSupport, VarlenOnlyInTheSegmentForm) {
  static const std::int32_t cu[4] = {0, 250, 650, 700}, other[4] = {0, 250, 650, 700};
  // One cu_seqlens tensor for q and k: the segment form, one sequence of the packed rows.
  for (int d : {64, 128, 256}) {
    const BwdParams p = varlen_call(d, cu, cu);
    ASSERT_TRUE(sm90_segment_form_applies(p));
    const BwdParams s = sm90_segment_form(p);
    EXPECT_EQ(s.b, 1);
    EXPECT_EQ(s.sq, 700);
    EXPECT_EQ(s.sk, 700);
    EXPECT_EQ(s.causal_offset, 0);
    EXPECT_EQ(s.segment_cu, cu);
    EXPECT_EQ(s.segments, 3);
    EXPECT_EQ(s.cu_seqlens_q, nullptr);
    EXPECT_TRUE(fwd(s)) << d;
    EXPECT_EQ(bwd(s), d <= 128) << d;  // the wide backward has no segment form
    EXPECT_FALSE(fwd(p)) << d;          // the packed call itself is never taken as it is
  }
  BwdParams p = varlen_call(128, cu, other);  // equal values, two tensors: not known to be equal
  EXPECT_FALSE(sm90_segment_form_applies(p));
  EXPECT_EQ(sm90_form(p).cu_seqlens_q, cu);  // the call as it is: the sm80 kernels'
  p = varlen_call(128, cu, cu);
  p.total_q = 0;  // a caller that did not say how many rows the packed tensors hold
  EXPECT_FALSE(sm90_segment_form_applies(p));
  p = varlen_call(128, cu, cu);
  p.alibi_slopes = reinterpret_cast<const float*>(cu);
  p.alibi_batch_stride = 8;  // slopes per (sequence, head): not in packed row numbers
  EXPECT_FALSE(sm90_segment_form_applies(p));
  p.alibi_batch_stride = 0;
  EXPECT_TRUE(fwd(sm90_segment_form(p)));
  p = varlen_call(128, cu, cu);
  p.dropout_p = 0.1f;
  EXPECT_FALSE(fwd(sm90_segment_form(p)));
  p = varlen_call(128, cu, cu);
  p.deterministic = true;
  EXPECT_FALSE(bwd(sm90_segment_form(p)));
  p.deterministic = false;
  p.dq_accum = reinterpret_cast<float*>(std::uintptr_t{1} << 24);  // a caller's accumulator
  EXPECT_FALSE(bwd(sm90_segment_form(p)));
}

// The workspace covers the segment form's layout for every varlen call (the sm90 backward lays its
// D and dQ accumulator over all packed rows): the review's case, one 256-row sequence in 1024
// packed rows, needed 4x the call's own layout. Two offsets tensors get the same size (the
// Python layer caches sizes by shape, not by whether q and k share one tensor).
TEST(Sm90CallSupport, BackwardWorkspaceCoversTheSegmentForm) {
  static const std::int32_t cu[2] = {0, 256}, other[2] = {0, 256};
  BwdParams p = plain_call(128);
  p.b = 1;
  p.sq = p.sk = 256;
  p.total_q = p.total_k = 1024;
  p.cu_seqlens_q = p.cu_seqlens_k = cu;
  ASSERT_TRUE(sm90_segment_form_applies(p));
  const std::size_t segment = bwd_workspace_layout(sm90_segment_form(p)).bytes;
  EXPECT_GT(segment, 3 * bwd_workspace_layout(p).bytes);
  EXPECT_EQ(bwd_workspace_bytes(p), segment);
  p.cu_seqlens_k = other;
  EXPECT_EQ(bwd_workspace_bytes(p), segment);
  const BwdParams plain = plain_call(128);  // not varlen: its own layout
  EXPECT_EQ(bwd_workspace_bytes(plain), bwd_workspace_layout(plain).bytes);
}

TEST(Sm90CallSupport, SegmentFormForwardOnlyWhereItPays) {
  static const std::int32_t cu[4] = {0, 3000, 6000, 9000};
  BwdParams p = varlen_call(128, cu, cu);
  EXPECT_FALSE(sm90_segment_forward_pays(p));  // 700 rows over 3 sequences
  p.total_q = p.total_k = 9000;
  EXPECT_TRUE(sm90_segment_forward_pays(p));
  p.total_q = p.total_k = 3071;  // 1023.7 rows per sequence
  EXPECT_FALSE(sm90_segment_forward_pays(p));
  for (int d : {64, 96, 256}) {
    BwdParams w = varlen_call(d, cu, cu);
    w.total_q = w.total_k = 3072;
    EXPECT_TRUE(sm90_segment_forward_pays(w)) << d;
  }
}

}  // namespace
}  // namespace orchard::cuda
