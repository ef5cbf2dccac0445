// Per-element semantics and tile bookkeeping shared by the float32 kernels on CUDA: the SIMT
// kernels (flash_fp32.cu) and the 3xTF32 tensor-core kernels (flash_fp32_tc.cu). Which keys a
// query row sees (windows, causal), the final score (scale, softcap, ALiBi, attn_bias / mask), the
// dropout draw, and which (batch, head, rows) a CTA owns: both kernel families read these, so a
// feature behaves the same on either.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "backends/cuda/cp_async.cuh"
#include "backends/cuda/device_attribute.h"
#include "orchard/params.h"
#include "orchard/philox.h"

namespace orchard::cuda::fp32 {

// Visible key range [begin, end) of local query row i of a sequence: window
// (params.h visible_cols) and causal on the sequence's diagonal.
__device__ __forceinline__ ColRange key_range(const FwdParams& p, const SeqSpan& s, int64_t i) {
  ColRange r = visible_cols(p, s, i);
  if (p.causal && i + s.diag + 1 < r.end) r.end = i + s.diag + 1;
  if (r.end < r.begin) r.end = r.begin;
  return r;
}

// attn_bias / attn_mask (params.h) along one row (or one column) of the (b, h)
// slice: element idx at ptr + idx * step bytes; ptr == nullptr: none. A boolean
// (kUInt8) element adds 0 (nonzero) or -inf (0), a float one its value.
struct BiasLine {
  const unsigned char* ptr;
  int64_t step;  // bytes
  DType dtype;
};
// fixed_is_row: the line of local row `fixed` (indexed by column), else of column `fixed`.
__device__ __forceinline__ BiasLine bias_line(const FwdParams& p, int b, int h, int64_t fixed, bool fixed_is_row) {
  if (p.attn_bias == nullptr) return {nullptr, 0, p.attn_bias_dtype};
  const int64_t esz = p.attn_bias_dtype == DType::kUInt8 ? 1 : (p.attn_bias_dtype == DType::kFloat32 ? 4 : 2);
  const int64_t off = b * p.bias_batch_stride + h * p.bias_head_stride +
                      fixed * (fixed_is_row ? p.bias_row_stride : p.bias_col_stride);
  return {static_cast<const unsigned char*>(p.attn_bias) + off * esz,
          (fixed_is_row ? p.bias_col_stride : p.bias_row_stride) * esz, p.attn_bias_dtype};
}
__device__ __forceinline__ float bias_at(const BiasLine& v, int64_t idx) {
  const unsigned char* a = v.ptr + idx * v.step;
  switch (v.dtype) {
    case DType::kUInt8: return __ldg(a) != 0 ? 0.f : -INFINITY;
    case DType::kFloat32: return __ldg(reinterpret_cast<const float*>(a));
    case DType::kBFloat16:
      return __uint_as_float(static_cast<uint32_t>(__ldg(reinterpret_cast<const unsigned short*>(a))) << 16);
    default: return __half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(a))));
  }
}

// The final score from q.k: scale, softcap, ALiBi, attn_bias (params.h). *dtanh (when
// given) receives d score / d (scale q.k): 1 - tanh^2 with softcap, else 1.
__device__ __forceinline__ float final_score(const FwdParams& p, float qk, float slope, int64_t i, int64_t j,
                                             int64_t diag, const BiasLine& bias, int64_t bias_idx,
                                             float* dtanh = nullptr) {
  float s = qk * p.scale;
  float dt = 1.f;
  if (p.softcap > 0.f) {
    const float t = tanhf(s / p.softcap);
    s = p.softcap * t;
    dt = 1.f - t * t;
  }
  if (dtanh) *dtanh = dt;
  s += alibi_bias(slope, i, j, diag);
  if (bias.ptr != nullptr) s += bias_at(bias, bias_idx);
  return s;
}
__device__ __forceinline__ float slope_of(const FwdParams& p, int b, int h) {
  return p.alibi_slopes != nullptr ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.f;
}

// Query rows [begin, end) that see key j (the transpose of key_range): row i sees [i + lo, i + hi].
__device__ __forceinline__ ColRange query_range(const FwdParams& p, const SeqSpan& span, int64_t j) {
  int64_t hi = p.window_right >= 0 ? span.diag + p.window_right : (int64_t{1} << 40);
  if (p.causal && hi > span.diag) hi = span.diag;
  const int64_t lo = p.window_left >= 0 ? span.diag - p.window_left : -(int64_t{1} << 40);
  ColRange r{j - hi < 0 ? 0 : j - hi, j - lo + 1 < span.len_q ? j - lo + 1 : span.len_q};
  if (r.end < r.begin) r.end = r.begin;
  return r;
}

struct KeyRange {
  __device__ ColRange operator()(const FwdParams& p, const SeqSpan& s, int64_t i) const { return key_range(p, s, i); }
};
struct QueryRange {
  __device__ ColRange operator()(const FwdParams& p, const SeqSpan& s, int64_t j) const { return query_range(p, s, j); }
};
// The union of range(p, span, x) over x in [x0, min(x0 + count, limit)) (each empty range skipped;
// {0, 0} when all are): the columns a CTA's tiles must cover. range: key_range or query_range.
template <typename Range>
__device__ __forceinline__ ColRange union_of_ranges(const FwdParams& p, const SeqSpan& span, int x0, int count,
                                                    int limit, Range range) {
  ColRange u{INT64_MAX, 0};
  for (int x = x0; x < x0 + count && x < limit; ++x) {
    const ColRange c = range(p, span, x);
    if (c.begin < c.end) u.begin = min(u.begin, c.begin), u.end = max(u.end, c.end);
  }
  if (u.end <= u.begin) u = ColRange{0, 0};
  return u;
}

// A CTA's block of rows: which (batch, head) and which rows, from the flat block index (row
// blocks vary fastest, so neighbouring CTAs read the same head's tiles through L2).
struct RowBlock {
  int b, head, row0;
};
__device__ __forceinline__ RowBlock row_block(int heads, int row_blocks, int rows_per_cta) {
  const int64_t bh = blockIdx.x / row_blocks;
  return {static_cast<int>(bh / heads), static_cast<int>(bh % heads),
          static_cast<int>(blockIdx.x % row_blocks) * rows_per_cta};
}

__device__ __forceinline__ bool dropout_kept(const FwdParams& p, const DropoutKey& key, uint32_t thr, int b, int h,
                                             int64_t i, int64_t j) {
  return dropout_keep(key.seed, key.offset, dropout_batch_head(p, b, h), static_cast<uint32_t>(i + p.dropout_row_offset),
                      static_cast<uint32_t>(j + p.dropout_col_offset), thr);
}

__device__ __forceinline__ float lse_or_inf(float l) { return l == -INFINITY ? INFINITY : l; }

// A call's dropout, as every kernel reads it: on or off, the keep threshold, the Philox key (read
// from rng_state when set) and the scale 1 / (1 - p) of the kept weights.
struct Dropout {
  bool on;
  uint32_t thr;
  DropoutKey key;
  float rdrop;
};
__device__ __forceinline__ Dropout dropout_of(const FwdParams& p) {
  const bool on = p.dropout_p > 0.f;
  return {on, dropout_keep_threshold(p.dropout_p), dropout_key(p), on ? 1.f / (1.f - p.dropout_p) : 1.f};
}
__device__ __forceinline__ bool kept(const FwdParams& p, const Dropout& drop, int b, int h, int64_t i, int64_t j) {
  return !drop.on || dropout_kept(p, drop.key, drop.thr, b, h, i, j);
}

// The backward's two weights at a visible (query row i, key j) of head (b, h), from the
// recomputed q.k, dP = dO.v, the row's LSE (lse_or_inf'd) and D = rowsum(dO * O):
// P = exp(score - lse); pd = P kept / (1 - p), dV's weight; ds = P (dP kept / (1 - p) - D) tanh',
// the score gradient dQ and dK are summed from (before the scale). bias_idx: the bias line's index
// (j along a query row's line, i along a key's).
struct GradWeights {
  float pd, ds;
};
__device__ __forceinline__ GradWeights grad_weights(const FwdParams& p, const Dropout& drop, int b, int h, float qk,
                                                    float dp, float lse, float D, float slope, int64_t i, int64_t j,
                                                    int64_t diag, const BiasLine& bias, int64_t bias_idx) {
  float dt;
  const float pv = expf(final_score(p, qk, slope, i, j, diag, bias, bias_idx, &dt) - lse);
  const bool keep = kept(p, drop, b, h, i, j);
  return {keep ? pv * drop.rdrop : 0.f, pv * ((keep ? dp * drop.rdrop : 0.f) - D) * dt};
}

// A forward row's end: from its running max m and its (all columns') sum of exp(score - m), the
// output's scale (with dropout's 1 / (1 - p)) and the LSE. sum = 0: the row saw no key (output 0,
// LSE -inf); NaN passes to both, as on the CPU. A sink (params.h) adds exp(sink) to the sum.
struct RowEnd {
  float inv, lse;
};
__device__ __forceinline__ RowEnd row_end(const FwdParams& p, int h, float m, float sum, float drop_scale) {
  const bool any = !(sum <= 0.f);
  RowEnd r{any ? drop_scale / sum : 0.f, any ? m + logf(sum) : -INFINITY};
  if (p.sink != nullptr) {
    const float sink = p.sink[h];
    const float top = fmaxf(m, sink);
    const float a = any ? expf(m - top) : 0.f;
    const float total = sum * a + expf(sink - top);
    r.inv = drop_scale * a / total;
    r.lse = top + logf(total);
  }
  return r;
}

// Warp `warp` of `warps` copies rows warp, warp + warps, ... of [0, rows) from global memory
// (`src_stride` floats apart) into shared rows `dst_stride` apart; rows from `valid` on and the
// columns [width, padded) are zeros (a zero adds nothing to a dot, and a zero weight must not
// meet a NaN left in shared memory).
__device__ __forceinline__ void stage_rows(float* dst, int dst_stride, const float* src, int64_t src_stride, int rows,
                                           int valid, int width, int padded, int warp, int warps, int lane) {
  for (int t = warp; t < rows; t += warps) {
    const float* sr = src + t * src_stride;
    for (int c = lane; c < padded; c += 32) dst[t * dst_stride + c] = t < valid && c < width ? sr[c] : 0.f;
  }
}

// stage_rows as asynchronous copies (cp.async, sm_80+): every copy of a tile is in flight at
// once instead of one L2 round trip per row (the synchronous loop's loads cannot pass its shared
// stores: the compiler cannot prove they do not alias). The caller commits the group
// (cp_async_commit), waits for it (cp_async_wait<0>) and then syncs the CTA before reading.
// 16-byte copies where every row starts 16-byte aligned (the base and src_stride), else 4-byte
// ones; the source is read inside [0, valid) x [0, width) only (cp.async zero-fills the rest of a
// partial chunk; chunks with nothing inside are plain zero stores). dst and dst_stride must be
// 16-byte aligned (multiples of 4 floats) and padded a multiple of 4. Warp `warp` of `warps`
// issues the copies of rows [0, rows) (as stage_rows), spread over the warps' lanes as (row,
// chunk) pairs so that narrow rows keep every lane busy. place(t, c): where column c of row t goes
// in its shared row (a permutation that keeps each aligned 4-column chunk whole; identity unless
// given, e.g. a swizzle).
struct IdentityColumns {
  __device__ __forceinline__ int operator()(int, int c) const { return c; }
};
template <typename Place = IdentityColumns>
__device__ __forceinline__ void stage_rows_async(float* dst, int dst_stride, const float* src, int64_t src_stride,
                                                 int rows, int valid, int width, int padded, int warp, int warps,
                                                 int lane, Place place = {}) {
  const bool vec = (reinterpret_cast<uintptr_t>(src) & 15) == 0 && (src_stride & 3) == 0;
  const int per_row = vec ? padded / 4 : padded;
  const int total = rows * per_row;
  for (int idx = warp * 32 + lane; idx < total; idx += warps * 32) {
    const int t = idx / per_row, c = (idx - t * per_row) * (vec ? 4 : 1);
    const int inside = t < valid ? max(0, min(vec ? 4 : 1, width - c)) : 0;  // source floats
    float* to = dst + t * dst_stride + place(t, c);
    if (inside == 0) {  // a plain store: no source address at all (past the tensor, perhaps)
      if (vec)
        *reinterpret_cast<float4*>(to) = make_float4(0.f, 0.f, 0.f, 0.f);
      else
        *to = 0.f;
    } else if (vec) {
      cp_async16_zfill(to, src + t * src_stride + c, 4 * inside);
    } else {
      cp_async4_zfill(to, src + t * src_stride + c, 4);
    }
  }
}

// The current device's dynamic shared-memory opt-in per CTA (48 KB when unknown: what any device
// gives without one).
inline int smem_optin_bytes() {
  const int limit = smem_optin_limit();
  return limit > 0 ? limit : 48 * 1024;
}

}  // namespace orchard::cuda::fp32
