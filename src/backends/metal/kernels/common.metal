// Shared pieces of Orchard's Metal kernels. The C++ core (metal_variant.cpp) prepends a
// prelude that fixes the variant: elem_t (half, bfloat or float), kBlockD (the head-dim
// bucket: rows of every threadgroup tile are kBlockD floats, columns >= d zero-filled),
// the tile sizes of each kernel and the kMeta* indices below. compile_shader offers no
// function constants and no dynamic threadgroup memory, so all of it is baked into the
// source text and each variant is compiled once.
#include <metal_stdlib>
using namespace metal;

// Every integer parameter (sizes, element strides, causal/dropout settings) arrives in
// one int64 buffer, `meta`, indexed by kMeta*: Metal has 31 buffer slots per kernel and
// the backward needs over 40 scalars. Floats travel as their bit patterns.
inline float meta_float(device const long* meta, int index) { return as_type<float>(uint(meta[index])); }

// Copies rows [row0, row0 + rows) of one head of a strided tensor into a threadgroup
// tile of rows x kBlockD floats (row-major), zero-filling rows >= nrows and columns >= d,
// so tails and head dims below the bucket need no special cases in the products.
template <typename TgFloatPtr>
inline void load_tile(TgFloatPtr dst, device const elem_t* src, long row_stride, int row0, int rows, int nrows, int d,
                      uint tid, uint nthreads) {
  for (int e = int(tid); e < rows * kBlockD; e += int(nthreads)) {
    const int r = e / kBlockD, c = e % kBlockD;
    float x = 0.0f;
    if (row0 + r < nrows && c < d) x = float(src[long(row0 + r) * row_stride + c]);
    dst[e] = x;
  }
}

// Writes rows [row0, min(row0 + rows, nrows)) and columns [0, d) of a threadgroup tile,
// multiplied by `scale`, to a strided tensor in elem_t.
template <typename TgFloatPtr>
inline void store_tile(device elem_t* dst, TgFloatPtr src, long row_stride, int row0, int rows, int nrows, int d,
                       float scale, uint tid, uint nthreads) {
  for (int e = int(tid); e < rows * kBlockD; e += int(nthreads)) {
    const int r = e / kBlockD, c = e % kBlockD;
    if (row0 + r < nrows && c < d) dst[long(row0 + r) * row_stride + c] = elem_t(src[e] * scale);
  }
}

// The rows of batch entry bi: with varlen (meta's kMetaVarlen) sequence bi of the packed
// tensors, rows [cu_q[bi], cu_q[bi + 1]) of q / out / dO and [cu_k[bi], cu_k[bi + 1]) of k / v,
// on its own diagonal (len_k - len_q, or 0 top-left); else the whole padded batch entry.
struct SeqSpan {
  int q_start, len_q, k_start, len_k;
  long diag;
};

inline SeqSpan seq_span(device const long* meta, device const int* cu_q, device const int* cu_k, int bi) {
  SeqSpan s;
  if (meta[kMetaVarlen] != 0) {
    s.q_start = cu_q[bi], s.len_q = cu_q[bi + 1] - s.q_start;
    s.k_start = cu_k[bi], s.len_k = cu_k[bi + 1] - s.k_start;
    s.diag = meta[kMetaTopLeft] != 0 ? 0 : long(s.len_k) - long(s.len_q);
  } else {
    s.q_start = 0, s.len_q = int(meta[kMetaSq]);
    s.k_start = 0, s.len_k = int(meta[kMetaSk]);
    s.diag = meta[kMetaCausalOffset];
  }
  return s;
}

// What decides a score (orchard/params.h): on the diagonal `diag` (sk - sq bottom-right, 0
// top-left), row i sees column j iff j <= i + diag when causal and
// i + diag - left <= j <= i + diag + right for a window (a negative bound is unbounded);
// the scaled score x = scale * q.k becomes softcap * tanh(x / softcap) when softcap > 0,
// then gets the ALiBi bias -slope * |i + diag - j| and SDPA's attn_mask: a boolean mask
// (false hides the element) or a float bias (elem_t or fp32) added to the score, read through
// its element strides (0 for broadcast dims).
constant constexpr int kMaskNone = 0, kMaskBool = 1, kMaskElem = 2, kMaskFloat = 3;
struct ScoreMods {
  bool causal;
  long diag, left, right;
  float softcap;
  bool alibi;
  float slope;
  int mask_kind;
  long mask_row, mask_col;
  device const uchar* mask_bool;  // this (batch, head)'s plane of the mask, by kind
  device const elem_t* mask_elem;
  device const float* mask_float;
};

// The modifiers of (batch bi, query head h); `alibi` holds the fp32 slopes when meta says so,
// the mask_* buffers SDPA's attn_mask in the form meta's kMetaMaskKind names (the others are
// stand-ins nothing reads).
inline ScoreMods score_mods(device const long* meta, thread const SeqSpan& span, device const float* alibi,
                            device const uchar* mask_bool, device const elem_t* mask_elem,
                            device const float* mask_float, int bi, int h) {
  ScoreMods m;
  m.mask_kind = int(meta[kMetaMaskKind]);
  const long plane = long(bi) * meta[kMetaMaskBatch] + long(h) * meta[kMetaMaskHead];
  m.mask_row = meta[kMetaMaskRow], m.mask_col = meta[kMetaMaskCol];
  m.mask_bool = mask_bool + (m.mask_kind == kMaskBool ? plane : 0);
  m.mask_elem = mask_elem + (m.mask_kind == kMaskElem ? plane : 0);
  m.mask_float = mask_float + (m.mask_kind == kMaskFloat ? plane : 0);
  m.causal = meta[kMetaCausal] != 0;
  m.diag = span.diag;
  m.left = meta[kMetaWindowLeft];
  m.right = meta[kMetaWindowRight];
  m.softcap = meta_float(meta, kMetaSoftcapBits);
  m.alibi = meta[kMetaAlibi] != 0;
  m.slope = m.alibi ? alibi[long(bi) * meta[kMetaAlibiBatch] + h] : 0.0f;
  return m;
}

inline bool visible(thread const ScoreMods& m, int row, int col) {
  const long rel = long(col) - (long(row) + m.diag);  // j - (i + diag)
  return !(m.causal && rel > 0) && !(m.right >= 0 && rel > m.right) && !(m.left >= 0 && rel < -m.left) &&
         !(m.mask_kind == kMaskBool && m.mask_bool[long(row) * m.mask_row + long(col) * m.mask_col] == 0);
}

// The final score of the scaled score x at (row, col).
inline float final_score(thread const ScoreMods& m, float x, int row, int col) {
  if (m.softcap > 0.0f) x = m.softcap * precise::tanh(x / m.softcap);
  if (m.alibi) {
    const long dist = long(row) + m.diag - long(col);
    x -= m.slope * float(dist < 0 ? -dist : dist);
  }
  const long at = long(row) * m.mask_row + long(col) * m.mask_col;
  if (m.mask_kind == kMaskElem) x += float(m.mask_elem[at]);
  if (m.mask_kind == kMaskFloat) x += m.mask_float[at];
  return x;
}

// exp(score - lse), 0 for a row whose LSE is -inf (it saw no key: only a float mask of -inf
// can leave such a row visible elements, whose score - lse would be -inf + inf).
inline float prob_of(float score, float row_lse) { return row_lse < -1.0e30f ? 0.0f : exp(score - row_lse); }

// d(final score) / dx: 1 - tanh^2 under softcap, else 1 (the bias does not depend on x).
inline float final_score_grad(thread const ScoreMods& m, float x) {
  if (m.softcap <= 0.0f) return 1.0f;
  const float t = precise::tanh(x / m.softcap);
  return 1.0f - t * t;
}

// Key columns [begin, end) that rows [row0, row0 + rows) may see, begin rounded down to a
// multiple of `block` (the key tiles' start); empty (begin >= end) when none.
inline void visible_key_range(thread const ScoreMods& m, int row0, int rows, int sk, int block, thread int& begin,
                              thread int& end) {
  // (Plain comparisons: MSL's max / min do not take 64-bit integers everywhere.)
  long lo = 0, hi = sk;
  if (m.left >= 0 && long(row0) + m.diag - m.left > lo) lo = long(row0) + m.diag - m.left;
  long reach = m.causal ? 0 : -1;
  if (m.right >= 0 && (reach < 0 || m.right < reach)) reach = m.right;
  if (reach >= 0 && long(row0 + rows - 1) + m.diag + reach + 1 < hi) hi = long(row0 + rows - 1) + m.diag + reach + 1;
  if (lo > long(sk)) lo = sk;
  begin = int(lo) / block * block;
  end = hi < lo ? begin : int(hi);
}

// Query rows [begin, end) that may see key columns [col0, col0 + cols), begin rounded down to
// a multiple of `block`; empty when none.
inline void visible_query_range(thread const ScoreMods& m, int col0, int cols, int sq, int block, thread int& begin,
                                thread int& end) {
  // Row i sees column j only if j - (i + diag) <= reach (causal / right bound), i.e.
  // i >= j - diag - reach, and j - (i + diag) >= -left, i.e. i <= j - diag + left.
  long lo = 0, hi = sq;
  long reach = m.causal ? 0 : -1;
  if (m.right >= 0 && (reach < 0 || m.right < reach)) reach = m.right;
  if (reach >= 0 && long(col0) - m.diag - reach > lo) lo = long(col0) - m.diag - reach;
  if (m.left >= 0 && long(col0 + cols - 1) - m.diag + m.left + 1 < hi) hi = long(col0 + cols - 1) - m.diag + m.left + 1;
  if (lo > long(sq)) lo = sq;
  begin = int(lo) / block * block;
  end = hi < lo ? begin : int(hi);
}
