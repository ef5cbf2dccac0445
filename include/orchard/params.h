// The plain parameter structs that kernels see. Nothing else crosses from the
// core into a backend: no framework types, no TensorView, no allocation.
//
// Layout convention: every tensor is addressed as logical (batch, row, head, dim)
// — BSHD — through element strides, so BSHD and BHSD storage (and any other
// view whose last-dim stride is 1) are read in place. The last dimension is
// always contiguous (stride 1); the bridge stages anything else.
#pragma once

#include <cstdint>

#include "orchard/config.h"
#include "orchard/dtype.h"

namespace orchard {

struct FwdParams {
  // Inputs, dtype `dtype`.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  // Outputs: out has dtype `dtype`; lse is (b, hq, sq) with row stride 1,
  // float32 — or float64 when dtype is kFloat64.
  void* out = nullptr;
  void* lse = nullptr;
  // Optional dropout keep-mask output, uint8 (b, hq, sq, sk) contiguous:
  // 1 = kept, 0 = dropped. nullptr = do not write it.
  std::uint8_t* dropout_mask = nullptr;

  // Element strides (batch, row, head); the dim stride is 1. Varlen: batch strides 0.
  std::int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  std::int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  std::int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  std::int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  std::int64_t lse_batch_stride = 0, lse_head_stride = 0;

  int b = 0;    // batch (number of sequences when varlen)
  int sq = 0;   // query rows (the longest sequence's when varlen)
  int sk = 0;   // key/value rows (likewise)
  int hq = 0;   // query heads
  int hkv = 0;  // key/value heads; hq % hkv == 0 (GQA/MQA)
  int d = 0;    // head dim of q and k
  int d_v = 0;  // head dim of v and out (== d unless the value head dim differs)

  // Varlen (packed sequences, flash-attn's varlen API). When cu_seqlens_q is set,
  // sequence bi owns query rows [cu_seqlens_q[bi], cu_seqlens_q[bi + 1]) and key rows
  // [cu_seqlens_k[bi], cu_seqlens_k[bi + 1]) of (total, heads, dim) tensors whose
  // batch strides are 0; its own lengths replace sq/sk (which are the maxima), its
  // causal/window diagonal offset is len_k - len_q (bottom-right) or 0 (top-left,
  // see causal_top_left), and lse is (hq, total_q): row r of sequence bi is at
  // h * lse_head_stride + cu_seqlens_q[bi] + r (lse_batch_stride is 0). Dropout is
  // indexed by (bi, head, local row, local col). int32, memory of the tensors' device.
  const std::int32_t* cu_seqlens_q = nullptr;
  const std::int32_t* cu_seqlens_k = nullptr;
  bool causal_top_left = false;  // the diagonal offset rule varlen applies per sequence
  // Varlen: the rows of the packed q and k tensors (0: unknown; the core sets them).
  std::int64_t total_q = 0, total_k = 0;
  // The segment form of a varlen call whose q and k share one cu_seqlens (the CUDA backend
  // builds it for its sm90 kernels, sm90_call_support.h; callers leave it null): b = 1, sq / sk
  // the packed tensors' rows, and row i sees key j only when both lie in one segment
  // [segment_cu[s], segment_cu[s + 1]), s < segments (rows past segment_cu[segments] see none).
  const std::int32_t* segment_cu = nullptr;
  int segments = 0;

  float scale = 1.0f;  // softmax scale (1/sqrt(d) by default), rounded to float
  // The same scale and dropout probability unrounded, for float64 compute
  // (so float64 results, e.g. under gradcheck, carry no float32 rounding).
  double scale_f64 = 1.0;
  double dropout_p_f64 = 0.0;

  // Causal masking: row i may attend to column j iff j <= i + causal_offset.
  // Bottom-right alignment (flash-attn) uses causal_offset = sk - sq;
  // top-left (torch SDPA) uses 0.
  bool causal = false;
  std::int64_t causal_offset = 0;

  // Sliding window (flash-attn's window_size = (left, right)), on the same diagonal:
  // row i sees column j iff  i + causal_offset - window_left <= j <= i + causal_offset
  // + window_right, a negative bound being unbounded. The core keeps causal ==
  // (window_right == 0), so a causal kernel already applies the right bound; the
  // core sets causal_offset (sk - sq bottom-right, 0 top-left) whenever a window,
  // causal or ALiBi needs the diagonal. No window: both -1.
  std::int64_t window_left = -1;
  std::int64_t window_right = -1;

  // Softcapping (Gemma 2): when softcap > 0 the score scale * q.k becomes
  // softcap * tanh(scale * q.k / softcap) before bias and softmax.
  float softcap = 0.0f;
  double softcap_f64 = 0.0;

  // ALiBi: float32 slopes, slope(b, h) = alibi_slopes[b * alibi_batch_stride + h]
  // (stride 0 for per-head slopes). Added to the (capped) score:
  // -slope * |i + causal_offset - j|, causal or not. (flash-attn's causal kernel adds
  // slope * j instead: the same softmax, an LSE larger by slope * (i + offset).)
  const float* alibi_slopes = nullptr;
  std::int64_t alibi_batch_stride = 0;

  // Attention sinks (gpt-oss): float32 per-head logit sink[h], in the units of the
  // final scores, that joins every row's softmax denominator with no value:
  // P_ij = exp(s_ij - lse_i), lse_i = log(exp(sink_h) + sum_j exp(s_ij)). A row that
  // sees no key then outputs 0 with lse = sink_h.
  const float* sink = nullptr;

  // Additive bias or boolean mask (torch SDPA's attn_mask), logical (b, hq, sq, sk)
  // with element strides (0 = broadcast dim; the column stride may be anything).
  // attn_bias_dtype: kUInt8 = boolean (nonzero = may attend; a masked element is
  // -inf), else a float dtype added to the (capped) score. nullptr = none.
  const void* attn_bias = nullptr;
  DType attn_bias_dtype = DType::kUInt8;
  std::int64_t bias_batch_stride = 0, bias_head_stride = 0, bias_row_stride = 0, bias_col_stride = 0;

  // Dropout on the attention probabilities. The keep decision for element
  // (batch, head, row, col) comes from Philox4x32-10 keyed by (seed, offset);
  // see orchard/philox.h. keep_threshold = round(256 p) saturated to [0, 256]; an
  // element is kept iff its 8-bit draw is >= keep_threshold (keep probability
  // 1 - round(256 p) / 256), kept values scaled by 1 / (1 - p).
  float dropout_p = 0.0f;
  std::uint64_t seed = 0;
  std::uint64_t offset = 0;
  // When set, (seed, offset) are read at run time from rng_state[0..1] instead:
  // memory of the tensors' device (a CUDA pointer for CUDA), so a seed drawn on the
  // device by the framework (e.g. torch.randint inside a CUDA graph or a compiled
  // graph) is fresh on every replay. Read through dropout_key().
  const std::uint64_t* rng_state = nullptr;
  // Dropout's global coordinates, for a call that computes one block of a larger
  // attention (context parallelism: a sequence or the heads split across devices).
  // Element (bi, h, i, j) of this call keeps or drops as element
  // (bi, dropout_head_offset + h, dropout_row_offset + i, dropout_col_offset + j)
  // of a call with dropout_heads query heads (0: hq) does, i.e. its Philox index is
  // batch_head = bi * heads + dropout_head_offset + h, row + dropout_row_offset,
  // col + dropout_col_offset (varlen: added to each sequence's local row/col). Read by
  // nothing but the dropout index (see dropout_batch_head); all 0 is a plain call's mask.
  std::int64_t dropout_row_offset = 0, dropout_col_offset = 0;
  int dropout_head_offset = 0, dropout_heads = 0;

  DType dtype = DType::kFloat32;
  void* stream = nullptr;  // cudaStream_t on CUDA; unused on the CPU
};

struct BwdParams : FwdParams {
  // out / lse (from FwdParams) are inputs here.
  const void* dout = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  std::int64_t do_batch_stride = 0, do_row_stride = 0, do_head_stride = 0;
  std::int64_t dq_batch_stride = 0, dq_row_stride = 0, dq_head_stride = 0;
  std::int64_t dk_batch_stride = 0, dk_row_stride = 0, dk_head_stride = 0;
  std::int64_t dv_batch_stride = 0, dv_row_stride = 0, dv_head_stride = 0;

  // Caller-provided scratch of `workspace_bytes` bytes (the size the backend
  // asked for via backward_workspace_bytes), 256-byte aligned.
  void* workspace = nullptr;
  std::size_t workspace_bytes = 0;

  bool deterministic = false;  // bitwise-reproducible dq/dk/dv

  // The caller's fp32 dQ accumulator (BackwardArgs::dq_accum), nullptr = none: the call
  // adds dQ / scale into the slab of (sequence bi, q head h) at dq_accum +
  // bi * dq_accum_batch_stride + h * dq_accum_head_stride (floats; rows of
  // (d + 7) / 8 * 8 floats, 16-row tiles) and does not write dq.
  float* dq_accum = nullptr;
  std::int64_t dq_accum_batch_stride = 0, dq_accum_head_stride = 0;

  // With `sink`, optional (nullptr = not wanted): its gradient, float32 (hq,), overwritten:
  // dsink[h] = -sum over (batch, row) of exp(sink[h] - lse) * rowsum(dO * O).
  float* dsink = nullptr;
};

// The (seed, offset) that key this call's dropout mask (orchard/philox.h). Kernels
// read it once at the start: rng_state is dereferenced on the device for CUDA.
struct DropoutKey {
  std::uint64_t seed = 0, offset = 0;
};
ORCHARD_HOST_DEVICE DropoutKey dropout_key(const FwdParams& p) {
  return p.rng_state ? DropoutKey{p.rng_state[0], p.rng_state[1]} : DropoutKey{p.seed, p.offset};
}

// The Philox batch_head index of (batch bi, head h) under the dropout offsets above
// (bi * hq + h without them, as philox.h documents).
ORCHARD_HOST_DEVICE std::uint32_t dropout_batch_head(const FwdParams& p, std::int64_t bi, std::int64_t h) {
  const std::uint32_t heads = static_cast<std::uint32_t>(p.dropout_heads > 0 ? p.dropout_heads : p.hq);
  return static_cast<std::uint32_t>(bi) * heads + static_cast<std::uint32_t>(p.dropout_head_offset) +
         static_cast<std::uint32_t>(h);
}

// One sequence of a call: where its rows start (beyond the batch stride) and how
// many it has. Without varlen every batch entry has sq/sk rows starting at 0.
struct SeqSpan {
  std::int64_t q_start = 0, k_start = 0;  // first row in q/out/lse and in k/v
  int len_q = 0, len_k = 0;
  std::int64_t diag = 0;  // the causal/window diagonal offset of this sequence
};
ORCHARD_HOST_DEVICE SeqSpan seq_span(const FwdParams& p, int bi) {
  SeqSpan s;
  if (p.cu_seqlens_q == nullptr) {
    s.len_q = p.sq;
    s.len_k = p.sk;
    s.diag = p.causal_offset;
  } else {
    s.q_start = p.cu_seqlens_q[bi];
    s.k_start = p.cu_seqlens_k[bi];
    s.len_q = p.cu_seqlens_q[bi + 1] - p.cu_seqlens_q[bi];
    s.len_k = p.cu_seqlens_k[bi + 1] - p.cu_seqlens_k[bi];
    s.diag = p.causal_top_left ? 0 : std::int64_t(s.len_k) - s.len_q;
  }
  return s;
}

// Columns [begin, end) that row i of a sequence may see under causal / window
// masking (not the attn_bias mask), clipped to [0, len_k); empty when begin >= end.
struct ColRange {
  std::int64_t begin, end;
};
ORCHARD_HOST_DEVICE ColRange visible_cols(const FwdParams& p, const SeqSpan& s, std::int64_t i) {
  std::int64_t lo = 0, hi = s.len_k;
  if (p.window_left >= 0 && i + s.diag - p.window_left > lo) lo = i + s.diag - p.window_left;
  if (p.window_right >= 0 && i + s.diag + p.window_right + 1 < hi) hi = i + s.diag + p.window_right + 1;
  // Both ends inside [0, len_k] even for rows that see nothing (hi < 0 or lo > len_k).
  if (hi < 0) hi = 0;
  if (lo > s.len_k) lo = s.len_k;
  return {lo, hi};
}

// The ALiBi bias of (row i, column j), to add to the score; 0 without ALiBi.
ORCHARD_HOST_DEVICE float alibi_bias(float slope, std::int64_t i, std::int64_t j, std::int64_t diag) {
  const std::int64_t dist = i + diag - j;
  return -slope * static_cast<float>(dist < 0 ? -dist : dist);
}

}  // namespace orchard
