// float32 inputs: SIMT kernels on shared-memory tiles, for the calls the 3xTF32 tensor-core
// kernels (flash_fp32_tc.cu) do not take (shared memory past the device's opt-in, the backward at
// head dims above 128, ORCHARD_CUDA_FP32_TC=0). fp32 arithmetic throughout with accurate
// expf/logf: the error vs an fp64 reference is ~1e-6 relative, the same as a naive fp32
// computation. (Plain bf16 or tf32 operands would lose precision: ~4e-3 and ~5e-4.)
//
// Every kernel pairs a block of "rows" (kRowsPerWarp per warp, in shared memory, read by
// broadcast) with tiles of kTileCols "columns" (one per lane, rows of a padded shared-memory
// tile): the forward and dQ take 16 query rows against key tiles, dK / dV 16 key rows against
// query tiles, so each K / V (or Q / dO) row is read from global memory once per 16 rows, not
// once per row as in the first kernels (one warp per row, one key at a time: 3 ms for one
// decode step over 4k keys). A lane computes its column's dot products with the warp's rows
// (tile_dots), the per-element score (final_score: masks, windows, softcap, ALiBi, bias,
// dropout) and a weight per (row, column), which goes through shared memory to the warp's
// accumulators, lane c owning the output columns c, c + 32, ... (tile_accumulate). Rows and
// columns are summed in a fixed order: the backward stays deterministic (no atomics).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <type_traits>

#include "backends/cuda/fp32_attention_common.cuh"
#include "backends/cuda/launch.h"
#include "orchard/params.h"
#include "orchard/philox.h"

namespace orchard::cuda {
namespace {
using namespace fp32;

constexpr int kMaxPerLane = 8;  // d <= 256 = 32 lanes x 8

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// out[lane + 32 j] = r[j] * scale for the columns < d (a row of a warp's accumulators).
__device__ __forceinline__ void store_row(float* out, const float (&r)[kMaxPerLane], float scale, int d, int lane) {
#pragma unroll
  for (int j = 0; j < kMaxPerLane; ++j) {
    const int e = lane + 32 * j;
    if (e < d) out[e] = r[j] * scale;
  }
}

// One warp per row of a (batch, heads, rows) problem, 4 per CTA (the D = rowsum(dO * O) pre-pass).
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


// ---- the tiles ----------------------------------------------------------------------------
constexpr int kRowsPerWarp = 4;
constexpr int kTileCols = 32;  // one column per lane

// Shared-memory row strides (floats). Broadcast rows: the width rounded up to a float4. Column
// tiles: further to 32 floats plus 4, so that the 8 lanes of each quarter-warp phase of a float4
// read (lane j reads row j) start on distinct 16-byte bank groups.
__host__ __device__ __forceinline__ int row_stride(int width) { return (width + 3) / 4 * 4; }
__host__ __device__ __forceinline__ int col_stride(int width) { return (width + 31) / 32 * 32 + 4; }

// fp32::stage_rows with the columns up to the float4-rounded stride zeroed.
__device__ __forceinline__ void stage_rows(float* dst, int dst_stride, const float* src, int64_t src_stride, int rows,
                                           int valid, int width, int warp, int warps, int lane) {
  fp32::stage_rows(dst, dst_stride, src, src_stride, rows, valid, width, row_stride(width), warp, warps, lane);
}

// dot[r] = (row r of rows_s) . (row `lane` of cols_s), over `width4` (a multiple of 4) floats.
__device__ __forceinline__ void tile_dots(const float* rows_s, int rows_stride, const float* cols_s, int cols_stride,
                                          int width4, int lane, float (&dot)[kRowsPerWarp]) {
  const float* col = cols_s + lane * cols_stride;
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) dot[r] = 0.f;
  for (int e = 0; e < width4; e += 4) {
    const float4 c = *reinterpret_cast<const float4*>(col + e);
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const float4 x = *reinterpret_cast<const float4*>(rows_s + r * rows_stride + e);  // one address: a broadcast
      dot[r] = fmaf(x.x, c.x, fmaf(x.y, c.y, fmaf(x.z, c.z, fmaf(x.w, c.w, dot[r]))));
    }
  }
}

// acc[r][jj] += sum over t < n of w_s[r][t] * vals_s[t][lane + 32 jj], for the columns < width.
// w_s: the warp's kRowsPerWarp x kTileCols weights; t runs to n rounded up to 4, whose weights
// and value rows are zeros.
__device__ __forceinline__ void tile_accumulate(float (&acc)[kRowsPerWarp][kMaxPerLane], const float* w_s,
                                                const float* vals_s, int vals_stride, int n, int width, int lane) {
  for (int t = 0; t < n; t += 4) {
    float4 w[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) w[r] = *reinterpret_cast<const float4*>(w_s + r * kTileCols + t);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const float* vr = vals_s + (t + u) * vals_stride;
#pragma unroll
      for (int jj = 0; jj < kMaxPerLane; ++jj) {
        if (32 * jj >= width) break;
        const int c = lane + 32 * jj;
        const float x = c < width ? vr[c] : 0.f;
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          const float wu = u == 0 ? w[r].x : u == 1 ? w[r].y : u == 2 ? w[r].z : w[r].w;
          acc[r][jj] = fmaf(wu, x, acc[r][jj]);
        }
      }
    }
  }
}

__device__ __forceinline__ void zero(float (&acc)[kRowsPerWarp][kMaxPerLane]) {
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
    for (int jj = 0; jj < kMaxPerLane; ++jj) acc[r][jj] = 0.f;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}


// ---- forward -------------------------------------------------------------------------------
// Shared memory: Q rows, the K tile, the V tile, the warps' P.
std::size_t fwd_smem_bytes(int warps, int d, int dv) {
  const int rows = warps * kRowsPerWarp;
  return sizeof(float) * (static_cast<std::size_t>(rows) * row_stride(d) + kTileCols * col_stride(d) +
                          kTileCols * col_stride(dv) + rows * kTileCols);
}

__global__ void __launch_bounds__(128) fwd_fp32_kernel(const FwdParams p, int row_blocks) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const RowBlock blk = row_block(p.hq, row_blocks, warps * kRowsPerWarp);
  const int b = blk.b, h = blk.head, row0 = blk.row0;
  const SeqSpan span = seq_span(p, b);
  if (row0 >= span.len_q) return;  // varlen: past this sequence (the whole CTA)
  const int hk = h / (p.hq / p.hkv);
  const int d = p.d, dv = value_dim(p);  // q/k and v/out head dims
  const int rs = row_stride(d), ks = col_stride(d), vs = col_stride(dv);
  float* q_s = reinterpret_cast<float*>(smem);
  float* k_s = q_s + warps * kRowsPerWarp * rs;
  float* v_s = k_s + kTileCols * ks;
  float* p_s = v_s + kTileCols * vs + warp * kRowsPerWarp * kTileCols;  // this warp's P
  const float* q = static_cast<const float*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
                   span.q_start * p.q_row_stride;
  const float* k = static_cast<const float*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride +
                   span.k_start * p.k_row_stride;
  const float* v = static_cast<const float*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride +
                   span.k_start * p.v_row_stride;
  const int warp_row0 = row0 + warp * kRowsPerWarp;
  float* q_w = q_s + warp * kRowsPerWarp * rs;
  stage_rows(q_w, rs, q + warp_row0 * p.q_row_stride, p.q_row_stride, kRowsPerWarp, span.len_q - warp_row0, d, 0, 1,
             lane);
  // The keys any row of the CTA sees; each of this warp's rows' own (empty past the sequence).
  const ColRange cta_keys = union_of_ranges(p, span, row0, warps * kRowsPerWarp, span.len_q, KeyRange{});
  ColRange visible[kRowsPerWarp];
  BiasLine bias[kRowsPerWarp];
  float o[kRowsPerWarp][kMaxPerLane], m[kRowsPerWarp], l[kRowsPerWarp];  // l: this lane's columns only
  zero(o);
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int i = warp_row0 + r;
    visible[r] = i < span.len_q ? key_range(p, span, i) : ColRange{0, 0};
    bias[r] = bias_line(p, b, h, i < span.len_q ? i : 0, true);
    m[r] = -INFINITY;
    l[r] = 0.f;
  }
  const float slope = slope_of(p, b, h);
  const Dropout drop = dropout_of(p);
  for (int64_t tile = cta_keys.begin; tile < cta_keys.end; tile += kTileCols) {
    const int n = static_cast<int>(min(static_cast<int64_t>(kTileCols), cta_keys.end - tile));
    __syncthreads();  // the previous tile's K / V reads are done
    stage_rows(k_s, ks, k + tile * p.k_row_stride, p.k_row_stride, kTileCols, n, d, warp, warps, lane);
    stage_rows(v_s, vs, v + tile * p.v_row_stride, p.v_row_stride, kTileCols, n, dv, warp, warps, lane);
    __syncthreads();
    float dot[kRowsPerWarp];
    tile_dots(q_w, rs, k_s, ks, row_stride(d), lane, dot);
    const int64_t j = tile + lane;
    float corr[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int64_t i = warp_row0 + r;
      const bool seen = lane < n && j >= visible[r].begin && j < visible[r].end;
      const float s = seen ? final_score(p, dot[r], slope, i, j, span.diag, bias[r], j) : -INFINITY;
      const float m_new = fmaxf(m[r], warp_max(s));  // fmaxf skips NaN: a NaN score reaches l and O below
      float e;
      corr[r] = 1.f;
      if (m_new == -INFINITY) {
        e = s != s ? s : 0.f;  // nothing seen yet (-inf - -inf would be NaN)
      } else {
        corr[r] = expf(m[r] - m_new);  // m = -inf: 0
        e = expf(s - m_new);
      }
      m[r] = m_new;
      l[r] = l[r] * corr[r] + e;
      p_s[r * kTileCols + lane] = !seen || kept(p, drop, b, h, i, j) ? e : 0.f;
    }
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
      for (int jj = 0; jj < kMaxPerLane; ++jj) o[r][jj] *= corr[r];
    __syncwarp();
    tile_accumulate(o, p_s, v_s, vs, n, dv, lane);
    __syncwarp();  // P is rewritten by the next tile
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const float sum = warp_sum(l[r]);
    const int64_t i = warp_row0 + r;
    if (i >= span.len_q) continue;
    const RowEnd end = row_end(p, h, m[r], sum, drop.rdrop);
    const int64_t qi = span.q_start + i;
    store_row(static_cast<float*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride + qi * p.o_row_stride, o[r],
              end.inv, dv, lane);
    if (lane == 0) static_cast<float*>(p.lse)[b * p.lse_batch_stride + h * p.lse_head_stride + qi] = end.lse;
  }
}

// ---- backward ------------------------------------------------------------------------------
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

// dQ: Q and dO rows against K / V tiles. Shared memory: Q rows, dO rows, the K tile, the V
// tile, the warps' dS.
std::size_t dq_smem_bytes(int warps, int d, int dv) {
  const int rows = warps * kRowsPerWarp;
  return sizeof(float) * (static_cast<std::size_t>(rows) * (row_stride(d) + row_stride(dv)) +
                          kTileCols * (col_stride(d) + col_stride(dv)) + rows * kTileCols);
}

__global__ void __launch_bounds__(128) bwd_dq_fp32_kernel(const BwdParams p, const float* dsum, int row_blocks) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const RowBlock blk = row_block(p.hq, row_blocks, warps * kRowsPerWarp);
  const int b = blk.b, h = blk.head, row0 = blk.row0;
  const SeqSpan span = seq_span(p, b);
  if (row0 >= span.len_q) return;  // varlen: past this sequence (the whole CTA)
  const int hk = h / (p.hq / p.hkv);
  const int d = p.d, dv = value_dim(p);  // q/k and v/dO head dims
  const int qs = row_stride(d), os = row_stride(dv), ks = col_stride(d), vs = col_stride(dv);
  float* q_w = reinterpret_cast<float*>(smem) + warp * kRowsPerWarp * qs;
  float* do_w = reinterpret_cast<float*>(smem) + warps * kRowsPerWarp * qs + warp * kRowsPerWarp * os;
  float* k_s = reinterpret_cast<float*>(smem) + warps * kRowsPerWarp * (qs + os);
  float* v_s = k_s + kTileCols * ks;
  float* ds_s = v_s + kTileCols * vs + warp * kRowsPerWarp * kTileCols;  // this warp's dS
  const int warp_row0 = row0 + warp * kRowsPerWarp;
  const int64_t bh = static_cast<int64_t>(b) * p.hq + h;
  stage_rows(q_w, qs,
             static_cast<const float*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
                 (span.q_start + warp_row0) * p.q_row_stride,
             p.q_row_stride, kRowsPerWarp, span.len_q - warp_row0, d, 0, 1, lane);
  stage_rows(do_w, os,
             static_cast<const float*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride +
                 (span.q_start + warp_row0) * p.do_row_stride,
             p.do_row_stride, kRowsPerWarp, span.len_q - warp_row0, dv, 0, 1, lane);
  const float* k = static_cast<const float*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride +
                   span.k_start * p.k_row_stride;
  const float* v = static_cast<const float*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride +
                   span.k_start * p.v_row_stride;
  const ColRange cta_keys = union_of_ranges(p, span, row0, warps * kRowsPerWarp, span.len_q, KeyRange{});
  ColRange visible[kRowsPerWarp];
  BiasLine bias[kRowsPerWarp];
  float lse[kRowsPerWarp], D[kRowsPerWarp], dq[kRowsPerWarp][kMaxPerLane];
  zero(dq);
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int i = warp_row0 + r;
    const bool in = i < span.len_q;
    visible[r] = in ? key_range(p, span, i) : ColRange{0, 0};
    bias[r] = bias_line(p, b, h, in ? i : 0, true);
    lse[r] = in ? lse_or_inf(static_cast<const float*>(p.lse)[b * p.lse_batch_stride + h * p.lse_head_stride +
                                                              span.q_start + i])
                : INFINITY;
    D[r] = in ? dsum[bh * p.sq + i] : 0.f;
  }
  const float slope = slope_of(p, b, h);
  const Dropout drop = dropout_of(p);
  for (int64_t tile = cta_keys.begin; tile < cta_keys.end; tile += kTileCols) {
    const int n = static_cast<int>(min(static_cast<int64_t>(kTileCols), cta_keys.end - tile));
    __syncthreads();  // the previous tile's K / V reads are done
    stage_rows(k_s, ks, k + tile * p.k_row_stride, p.k_row_stride, kTileCols, n, d, warp, warps, lane);
    stage_rows(v_s, vs, v + tile * p.v_row_stride, p.v_row_stride, kTileCols, n, dv, warp, warps, lane);
    __syncthreads();
    float qk[kRowsPerWarp], dp[kRowsPerWarp];
    tile_dots(q_w, qs, k_s, ks, row_stride(d), lane, qk);
    tile_dots(do_w, os, v_s, vs, row_stride(dv), lane, dp);
    const int64_t j = tile + lane;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int64_t i = warp_row0 + r;
      const bool seen = lane < n && j >= visible[r].begin && j < visible[r].end;
      ds_s[r * kTileCols + lane] =
          seen ? grad_weights(p, drop, b, h, qk[r], dp[r], lse[r], D[r], slope, i, j, span.diag, bias[r], j).ds : 0.f;
    }
    __syncwarp();
    tile_accumulate(dq, ds_s, k_s, ks, n, d, lane);
    __syncwarp();  // dS is rewritten by the next tile
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = warp_row0 + r;
    if (i < span.len_q)
      store_row(static_cast<float*>(p.dq) + b * p.dq_batch_stride + h * p.dq_head_stride +
                    (span.q_start + i) * p.dq_row_stride,
                dq[r], p.scale, d, lane);
  }
}

// dK / dV: K and V rows of one kv head against Q / dO tiles of each query head of its group
// (summed in the kernel, in order). Shared memory: K rows, V rows, the Q tile, the dO tile, the
// warps' P (dropped) and dS.
std::size_t dkdv_smem_bytes(int warps, int d, int dv) {
  const int rows = warps * kRowsPerWarp;
  return sizeof(float) * (static_cast<std::size_t>(rows) * (row_stride(d) + row_stride(dv)) +
                          kTileCols * (col_stride(d) + col_stride(dv)) + 2 * rows * kTileCols);
}

__global__ void __launch_bounds__(128) bwd_dkdv_fp32_kernel(const BwdParams p, const float* dsum, int row_blocks) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const RowBlock blk = row_block(p.hkv, row_blocks, warps * kRowsPerWarp);
  const int b = blk.b, hk = blk.head, key0 = blk.row0;
  const SeqSpan span = seq_span(p, b);
  if (key0 >= span.len_k) return;  // varlen: past this sequence (the whole CTA)
  const int group = p.hq / p.hkv;
  const int d = p.d, dv = value_dim(p);  // q/k and v/dO head dims
  const int kr = row_stride(d), vr = row_stride(dv), qs = col_stride(d), os = col_stride(dv);
  float* k_w = reinterpret_cast<float*>(smem) + warp * kRowsPerWarp * kr;
  float* v_w = reinterpret_cast<float*>(smem) + warps * kRowsPerWarp * kr + warp * kRowsPerWarp * vr;
  float* q_s = reinterpret_cast<float*>(smem) + warps * kRowsPerWarp * (kr + vr);
  float* do_s = q_s + kTileCols * qs;
  float* pd_s = do_s + kTileCols * os + warp * kRowsPerWarp * kTileCols;  // this warp's dropped P
  float* ds_s = pd_s + warps * kRowsPerWarp * kTileCols;                    // and dS
  const int warp_key0 = key0 + warp * kRowsPerWarp;
  stage_rows(k_w, kr,
             static_cast<const float*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride +
                 (span.k_start + warp_key0) * p.k_row_stride,
             p.k_row_stride, kRowsPerWarp, span.len_k - warp_key0, d, 0, 1, lane);
  stage_rows(v_w, vr,
             static_cast<const float*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride +
                 (span.k_start + warp_key0) * p.v_row_stride,
             p.v_row_stride, kRowsPerWarp, span.len_k - warp_key0, dv, 0, 1, lane);
  // The query rows any key of the CTA is seen by; each of this warp's keys' own.
  const ColRange cta_rows = union_of_ranges(p, span, key0, warps * kRowsPerWarp, span.len_k, QueryRange{});
  ColRange seen_by[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r)
    seen_by[r] = warp_key0 + r < span.len_k ? query_range(p, span, warp_key0 + r) : ColRange{0, 0};
  float dk[kRowsPerWarp][kMaxPerLane], dvacc[kRowsPerWarp][kMaxPerLane];
  zero(dk);
  zero(dvacc);
  const Dropout drop = dropout_of(p);
  for (int hh = 0; hh < group; ++hh) {
    const int h = hk * group + hh;
    const int64_t bh = static_cast<int64_t>(b) * p.hq + h;
    const float slope = slope_of(p, b, h);
    BiasLine bias[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r)
      bias[r] = bias_line(p, b, h, warp_key0 + r < span.len_k ? warp_key0 + r : 0, false);
    const float* q = static_cast<const float*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
                     span.q_start * p.q_row_stride;
    const float* dO = static_cast<const float*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride +
                      span.q_start * p.do_row_stride;
    const float* lse_row = static_cast<const float*>(p.lse) + b * p.lse_batch_stride + h * p.lse_head_stride +
                           span.q_start;
    for (int64_t tile = cta_rows.begin; tile < cta_rows.end; tile += kTileCols) {
      const int n = static_cast<int>(min(static_cast<int64_t>(kTileCols), cta_rows.end - tile));
      __syncthreads();  // the previous tile's Q / dO reads are done
      stage_rows(q_s, qs, q + tile * p.q_row_stride, p.q_row_stride, kTileCols, n, d, warp, warps, lane);
      stage_rows(do_s, os, dO + tile * p.do_row_stride, p.do_row_stride, kTileCols, n, dv, warp, warps, lane);
      __syncthreads();
      const int64_t i = tile + lane;  // this lane's query row
      const float lse = lane < n ? lse_or_inf(lse_row[i]) : INFINITY;
      const float D = lane < n ? dsum[bh * p.sq + i] : 0.f;
      float qk[kRowsPerWarp], dp[kRowsPerWarp];
      tile_dots(k_w, kr, q_s, qs, row_stride(d), lane, qk);
      tile_dots(v_w, vr, do_s, os, row_stride(dv), lane, dp);
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int64_t j = warp_key0 + r;
        const bool seen = lane < n && i >= seen_by[r].begin && i < seen_by[r].end;
        const GradWeights w =
            seen ? grad_weights(p, drop, b, h, qk[r], dp[r], lse, D, slope, i, j, span.diag, bias[r], i) : GradWeights{};
        pd_s[r * kTileCols + lane] = w.pd;
        ds_s[r * kTileCols + lane] = w.ds;
      }
      __syncwarp();
      tile_accumulate(dvacc, pd_s, do_s, os, n, dv, lane);
      tile_accumulate(dk, ds_s, q_s, qs, n, d, lane);
      __syncwarp();  // P and dS are rewritten by the next tile
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t kj = span.k_start + warp_key0 + r;
    if (warp_key0 + r >= span.len_k) continue;
    store_row(static_cast<float*>(p.dk) + b * p.dk_batch_stride + hk * p.dk_head_stride + kj * p.dk_row_stride, dk[r],
              p.scale, d, lane);
    store_row(static_cast<float*>(p.dv) + b * p.dv_batch_stride + hk * p.dv_head_stride + kj * p.dv_row_stride,
              dvacc[r], 1.f, dv, lane);
  }
}

// Warps per CTA: 4, or 2 where the device's shared-memory opt-in cannot hold 4 warps' rows next
// to the tiles (head dims near 256 on GPUs with 99 KB, e.g. sm_86 / sm_89).
template <typename Bytes>
int warps_that_fit(Bytes bytes, int d, int dv) {
  return bytes(4, d, dv) <= static_cast<std::size_t>(fp32::smem_optin_bytes()) ? 4 : 2;
}

// Launches `kernel` over (batch x heads x row blocks) CTAs of the warps that fit.
template <typename Kernel, typename Bytes, typename Params>
void launch_tiled(Kernel kernel, Bytes bytes, const Params& p, int heads, int rows, const float* dsum,
                  const char* name) {
  const int d = p.d, dv = value_dim(p);
  const int warps = warps_that_fit(bytes, d, dv);
  const int row_blocks = (rows + warps * kRowsPerWarp - 1) / (warps * kRowsPerWarp);
  const int64_t ctas = static_cast<int64_t>(p.b) * heads * row_blocks;
  if (ctas == 0) return;
  const std::size_t smem = bytes(warps, d, dv);
  set_max_dynamic_smem(kernel, static_cast<int>(smem));
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  if constexpr (std::is_same_v<Params, FwdParams>) {
    (void)dsum;
    kernel<<<static_cast<unsigned>(ctas), warps * 32, smem, stream>>>(p, row_blocks);
  } else {
    kernel<<<static_cast<unsigned>(ctas), warps * 32, smem, stream>>>(p, dsum, row_blocks);
  }
  check_launch(name);
}

unsigned blocks_for(int64_t warps) { return static_cast<unsigned>((warps + 3) / 4); }

}  // namespace

void run_fwd_fp32(const FwdParams& p) {
  if (fp32_fwd_takes_tensor_cores(p)) return run_fwd_fp32_tc(p);
  launch_tiled(fwd_fp32_kernel, fwd_smem_bytes, p, p.hq, p.sq, nullptr, "fwd_fp32_kernel");
}

void run_bwd_fp32(const BwdParams& p) {
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  const BwdWorkspace layout = bwd_workspace_layout(p);
  float* dsum = reinterpret_cast<float*>(static_cast<unsigned char*>(p.workspace) + layout.d_offset);
  const int64_t rows = static_cast<int64_t>(p.b) * p.hq * p.sq;
  if (rows > 0) {
    bwd_dot_fp32_kernel<<<blocks_for(rows), 128, 0, stream>>>(p, dsum);
    check_launch("bwd_dot_fp32_kernel");
  }
  if (p.sink != nullptr && p.dsink != nullptr) run_bwd_dsink(p, dsum);
  if (fp32_bwd_takes_tensor_cores(p)) return run_bwd_fp32_tc(p, dsum);
  if (rows > 0) launch_tiled(bwd_dq_fp32_kernel, dq_smem_bytes, p, p.hq, p.sq, dsum, "bwd_dq_fp32_kernel");
  launch_tiled(bwd_dkdv_fp32_kernel, dkdv_smem_bytes, p, p.hkv, p.sk, dsum, "bwd_dkdv_fp32_kernel");
}

}  // namespace orchard::cuda
