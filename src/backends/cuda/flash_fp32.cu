// float32 inputs: SIMT kernels, one warp per query row (forward, dQ) or per
// key row (dK/dV). fp32 arithmetic throughout with accurate expf/logf: the
// error vs an fp64 reference is ~1e-6 relative, the same as a naive fp32
// computation. No tensor cores: bf16 operands would lose precision (~4e-3)
// and tf32 (~5e-4) would also be far from fp32; fp32 users want fp32 accuracy,
// and the speed path is bf16/fp16. Throughput is a few TFLOP/s.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "backends/cuda/launch.h"
#include "orchard/params.h"
#include "orchard/philox.h"

namespace orchard::cuda {
namespace {

constexpr int kMaxPerLane = 8;  // d <= 256 = 32 lanes x 8

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ void load_row(float (&r)[kMaxPerLane], const float* p, int d, int lane) {
#pragma unroll
  for (int j = 0; j < kMaxPerLane; ++j) {
    const int e = lane + 32 * j;
    r[j] = e < d ? p[e] : 0.f;
  }
}
// out[lane + 32 j] = r[j] * scale for the columns < d (load_row's inverse).
__device__ __forceinline__ void store_row(float* out, const float (&r)[kMaxPerLane], float scale, int d, int lane) {
#pragma unroll
  for (int j = 0; j < kMaxPerLane; ++j) {
    const int e = lane + 32 * j;
    if (e < d) out[e] = r[j] * scale;
  }
}

// Each of a CTA's 4 warps owns one row of a (batch, heads, rows) problem.
struct WarpRow {
  int64_t index, bh;  // flat row index; batch * heads + head
  int row, b, head;
};
__device__ __forceinline__ bool warp_row(int batch, int heads, int rows, WarpRow& w) {
  w.index = static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x / 32;
  if (w.index >= static_cast<int64_t>(batch) * heads * rows) return false;
  w.bh = w.index / rows;
  w.row = static_cast<int>(w.index % rows);
  w.b = static_cast<int>(w.bh / heads);
  w.head = static_cast<int>(w.bh % heads);
  return true;
}

__device__ __forceinline__ float dot_row(const float (&r)[kMaxPerLane], const float* p, int d, int lane) {
  float acc = 0.f;
#pragma unroll
  for (int j = 0; j < kMaxPerLane; ++j) {
    const int e = lane + 32 * j;
    if (e < d) acc = fmaf(r[j], p[e], acc);
  }
  return warp_sum(acc);
}

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

__global__ void __launch_bounds__(128) fwd_fp32_kernel(const FwdParams p) {
  WarpRow w;
  if (!warp_row(p.b, p.hq, p.sq, w)) return;
  const int i = w.row, b = w.b, h = w.head, lane = threadIdx.x % 32;
  const int hk = h / (p.hq / p.hkv);
  const int d = p.d, dv = value_dim(p);  // q/k and v/out head dims
  const SeqSpan span = seq_span(p, b);
  if (i >= span.len_q) return;  // varlen: past this sequence
  const int64_t qi = span.q_start + i;
  const float* q = static_cast<const float*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + qi * p.q_row_stride;
  const float* k = static_cast<const float*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride +
                   span.k_start * p.k_row_stride;
  const float* v = static_cast<const float*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride +
                   span.k_start * p.v_row_stride;
  const float slope = slope_of(p, b, h);
  const BiasLine bias = bias_line(p, b, h, i, true);
  float qr[kMaxPerLane], o[kMaxPerLane];
  load_row(qr, q, d, lane);
#pragma unroll
  for (int j = 0; j < kMaxPerLane; ++j) o[j] = 0.f;
  const bool dropout = p.dropout_p > 0.f;
  const uint32_t thr = dropout_keep_threshold(p.dropout_p);
  const DropoutKey key = dropout_key(p);  // reads rng_state when set
  float m = -INFINITY, l = 0.f;
  const ColRange range = key_range(p, span, i);
  for (int64_t j = range.begin; j < range.end; ++j) {
    const float s = final_score(p, dot_row(qr, k + j * p.k_row_stride, d, lane), slope, i, j, span.diag, bias, j);
    if (s == -INFINITY) continue;  // masked by attn_bias: P = 0 (and no -inf - -inf below)
    const float m_new = fmaxf(m, s);
    const float corr = expf(m - m_new);  // m = -inf: 0
    const float e = expf(s - m_new);
    l = l * corr + e;
    m = m_new;
    const bool keep = !dropout || dropout_keep(key.seed, key.offset, dropout_batch_head(p, b, h),
                                               static_cast<uint32_t>(i + p.dropout_row_offset),
                                               static_cast<uint32_t>(j + p.dropout_col_offset), thr);
    const float pv = keep ? e : 0.f;
    const float* vr = v + j * p.v_row_stride;
#pragma unroll
    for (int jj = 0; jj < kMaxPerLane; ++jj) {
      const int c = lane + 32 * jj;
      o[jj] = o[jj] * corr + (c < dv ? pv * vr[c] : 0.f);
    }
  }
  const float drop_scale = dropout ? 1.f / (1.f - p.dropout_p) : 1.f;
  float inv = l > 0.f ? drop_scale / l : 0.f;
  float lse = l > 0.f ? m + logf(l) : -INFINITY;
  if (p.sink != nullptr) {  // exp(sink) joins the denominator (params.h)
    const float sink = p.sink[h];
    const float top = fmaxf(m, sink);
    const float a = l > 0.f ? expf(m - top) : 0.f;
    const float lt = l * a + expf(sink - top);
    inv = drop_scale * a / lt;
    lse = top + logf(lt);
  }
  store_row(static_cast<float*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride + qi * p.o_row_stride, o, inv, dv,
            lane);
  if (lane == 0) static_cast<float*>(p.lse)[b * p.lse_batch_stride + h * p.lse_head_stride + qi] = lse;
}

__global__ void __launch_bounds__(128) bwd_dot_fp32_kernel(const BwdParams p, float* dsum) {
  WarpRow w;
  if (!warp_row(p.b, p.hq, p.sq, w)) return;
  const int64_t r = w.index;
  const int i = w.row, b = w.b, h = w.head, lane = threadIdx.x % 32;
  const SeqSpan span = seq_span(p, b);
  const int64_t qi = span.q_start + i;
  const float* o = static_cast<const float*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride + qi * p.o_row_stride;
  const float* dO =
      static_cast<const float*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride + qi * p.do_row_stride;
  float acc = 0.f;
  if (i < span.len_q)  // varlen: rows past the sequence get D = 0
    for (int c = lane, dv = value_dim(p); c < dv; c += 32) acc = fmaf(o[c], dO[c], acc);
  acc = warp_sum(acc);
  if (lane == 0) dsum[r] = acc;
}

__device__ __forceinline__ float lse_or_inf(float l) { return l == -INFINITY ? INFINITY : l; }

__global__ void __launch_bounds__(128) bwd_dq_fp32_kernel(const BwdParams p, const float* dsum) {
  WarpRow w;
  if (!warp_row(p.b, p.hq, p.sq, w)) return;
  const int64_t r = w.index;
  const int i = w.row, b = w.b, h = w.head, lane = threadIdx.x % 32;
  const int hk = h / (p.hq / p.hkv);
  const int d = p.d, dv = value_dim(p);  // q/k and v/dO head dims
  const SeqSpan span = seq_span(p, b);
  if (i >= span.len_q) return;  // varlen: past this sequence
  const int64_t qi = span.q_start + i;
  const float* k = static_cast<const float*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride +
                   span.k_start * p.k_row_stride;
  const float* v = static_cast<const float*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride +
                   span.k_start * p.v_row_stride;
  float qr[kMaxPerLane], dor[kMaxPerLane], dq[kMaxPerLane];
  load_row(qr, static_cast<const float*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + qi * p.q_row_stride, d,
           lane);
  load_row(dor,
           static_cast<const float*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride + qi * p.do_row_stride, dv,
           lane);
#pragma unroll
  for (int j = 0; j < kMaxPerLane; ++j) dq[j] = 0.f;
  const float lse = lse_or_inf(static_cast<const float*>(p.lse)[b * p.lse_batch_stride + h * p.lse_head_stride + qi]);
  const float slope = slope_of(p, b, h);
  const BiasLine bias = bias_line(p, b, h, i, true);
  const float D = dsum[r];
  const bool dropout = p.dropout_p > 0.f;
  const uint32_t thr = dropout_keep_threshold(p.dropout_p);
  const DropoutKey key = dropout_key(p);  // reads rng_state when set
  const float rdrop = dropout ? 1.f / (1.f - p.dropout_p) : 1.f;
  const ColRange range = key_range(p, span, i);
  for (int64_t j = range.begin; j < range.end; ++j) {
    const float* kr = k + j * p.k_row_stride;
    float dt;
    const float pv = expf(final_score(p, dot_row(qr, kr, d, lane), slope, i, j, span.diag, bias, j, &dt) - lse);
    float dp = dot_row(dor, v + j * p.v_row_stride, dv, lane);
    const bool keep = !dropout || dropout_keep(key.seed, key.offset, dropout_batch_head(p, b, h),
                                               static_cast<uint32_t>(i + p.dropout_row_offset),
                                               static_cast<uint32_t>(j + p.dropout_col_offset), thr);
    dp = keep ? dp * rdrop : 0.f;
    const float ds = pv * (dp - D) * dt;
#pragma unroll
    for (int jj = 0; jj < kMaxPerLane; ++jj) {
      const int c = lane + 32 * jj;
      if (c < d) dq[jj] = fmaf(ds, kr[c], dq[jj]);
    }
  }
  store_row(static_cast<float*>(p.dq) + b * p.dq_batch_stride + h * p.dq_head_stride + qi * p.dq_row_stride, dq,
            p.scale, d, lane);
}

// One warp per key row of a kv head; sums over the GQA group's q heads.
__global__ void __launch_bounds__(128) bwd_dkdv_fp32_kernel(const BwdParams p, const float* dsum) {
  WarpRow w;
  if (!warp_row(p.b, p.hkv, p.sk, w)) return;
  const int j = w.row, b = w.b, hk = w.head, lane = threadIdx.x % 32;
  const int group = p.hq / p.hkv;
  const int d = p.d, d_v = value_dim(p);  // q/k and v/dO head dims
  const SeqSpan span = seq_span(p, b);
  if (j >= span.len_k) return;  // varlen: past this sequence
  const int64_t kj = span.k_start + j;
  float kr[kMaxPerLane], vr[kMaxPerLane], dk[kMaxPerLane], dv[kMaxPerLane];
  load_row(kr, static_cast<const float*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride + kj * p.k_row_stride, d,
           lane);
  load_row(vr, static_cast<const float*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride + kj * p.v_row_stride, d_v,
           lane);
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) dk[e] = dv[e] = 0.f;
  const bool dropout = p.dropout_p > 0.f;
  const uint32_t thr = dropout_keep_threshold(p.dropout_p);
  const DropoutKey key = dropout_key(p);  // reads rng_state when set
  const float rdrop = dropout ? 1.f / (1.f - p.dropout_p) : 1.f;
  // Query rows [i_begin, i_end) that see key j: row i sees [i + lo, i + hi].
  int64_t hi = p.window_right >= 0 ? span.diag + p.window_right : (int64_t{1} << 40);
  if (p.causal && hi > span.diag) hi = span.diag;
  const int64_t lo = p.window_left >= 0 ? span.diag - p.window_left : -(int64_t{1} << 40);
  const int64_t i_begin = j - hi < 0 ? 0 : j - hi;
  const int64_t i_end = j - lo + 1 < span.len_q ? j - lo + 1 : span.len_q;
  for (int hh = 0; hh < group; ++hh) {
    const int h = hk * group + hh;
    const int64_t bh = static_cast<int64_t>(b) * p.hq + h;
    const float slope = slope_of(p, b, h);
    const BiasLine bias = bias_line(p, b, h, j, false);
    for (int64_t i = i_begin; i < i_end; ++i) {
      const int64_t qi = span.q_start + i;
      const float* q = static_cast<const float*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + qi * p.q_row_stride;
      const float* dO =
          static_cast<const float*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride + qi * p.do_row_stride;
      const float lse =
          lse_or_inf(static_cast<const float*>(p.lse)[b * p.lse_batch_stride + h * p.lse_head_stride + qi]);
      float dt;
      const float pv = expf(final_score(p, dot_row(kr, q, d, lane), slope, i, j, span.diag, bias, i, &dt) - lse);
      float dp = dot_row(vr, dO, d_v, lane);
      const bool keep = !dropout || dropout_keep(key.seed, key.offset, dropout_batch_head(p, b, h),
                                                 static_cast<uint32_t>(i + p.dropout_row_offset),
                                                 static_cast<uint32_t>(j + p.dropout_col_offset), thr);
      const float pd = keep ? pv * rdrop : 0.f;
      dp = keep ? dp * rdrop : 0.f;
      const float ds = pv * (dp - dsum[bh * p.sq + i]) * dt;
#pragma unroll
      for (int e = 0; e < kMaxPerLane; ++e) {
        const int c = lane + 32 * e;
        if (c < d_v) dv[e] = fmaf(pd, dO[c], dv[e]);
        if (c < d) dk[e] = fmaf(ds, q[c], dk[e]);
      }
    }
  }
  store_row(static_cast<float*>(p.dk) + b * p.dk_batch_stride + hk * p.dk_head_stride + kj * p.dk_row_stride, dk,
            p.scale, d, lane);
  store_row(static_cast<float*>(p.dv) + b * p.dv_batch_stride + hk * p.dv_head_stride + kj * p.dv_row_stride, dv, 1.f,
            d_v, lane);
}

unsigned blocks_for(int64_t warps) { return static_cast<unsigned>((warps + 3) / 4); }

}  // namespace

void run_fwd_fp32(const FwdParams& p) {
  const int64_t rows = static_cast<int64_t>(p.b) * p.hq * p.sq;
  if (rows == 0) return;
  fwd_fp32_kernel<<<blocks_for(rows), 128, 0, static_cast<cudaStream_t>(p.stream)>>>(p);
  check_launch("fwd_fp32_kernel");
}

void run_bwd_fp32(const BwdParams& p) {
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  const BwdWorkspace layout = bwd_workspace_layout(p);
  float* dsum = reinterpret_cast<float*>(static_cast<unsigned char*>(p.workspace) + layout.d_offset);
  const int64_t rows = static_cast<int64_t>(p.b) * p.hq * p.sq;
  const int64_t krows = static_cast<int64_t>(p.b) * p.hkv * p.sk;
  if (rows > 0) {
    bwd_dot_fp32_kernel<<<blocks_for(rows), 128, 0, stream>>>(p, dsum);
    check_launch("bwd_dot_fp32_kernel");
    bwd_dq_fp32_kernel<<<blocks_for(rows), 128, 0, stream>>>(p, dsum);
    check_launch("bwd_dq_fp32_kernel");
  }
  if (p.sink != nullptr && p.dsink != nullptr) run_bwd_dsink(p, dsum);
  if (krows > 0) {
    bwd_dkdv_fp32_kernel<<<blocks_for(krows), 128, 0, stream>>>(p, dsum);
    check_launch("bwd_dkdv_fp32_kernel");
  }
}

}  // namespace orchard::cuda
