// FlashAttention-2 style backward (tensor cores, mma.sync m16n8k16).
//
//   1. dot kernel:   D = rowsum(dO * O) in fp32 (workspace).
//   2. dK/dV kernel: one CTA per (kBN key rows, batch, kv head). Each warp owns
//      16 key rows and keeps their dK / dV accumulators in registers for the
//      whole kernel. The CTA loops over the q heads of its GQA group and over
//      the query tiles (Q, dO, LSE, D double-buffered with cp.async), computing
//      everything transposed so that the key dimension is the MMA's M:
//        S^T  = K Q^T            P^T = exp2(S^T*scale*log2e - LSE*log2e)
//        dV  += P_drop^T dO      dP^T = V dO^T
//        dS^T = P^T * (dP_drop^T - D)      dK += dS^T Q
//      so P^T / dS^T go from accumulators straight into the A operand of the
//      next MMA. GQA sums over the group inside the CTA: deterministic, no
//      dK/dV atomics.
//      Non-deterministic mode also does dQ += dS K here: dS^T goes to shared
//      memory, all warps split the (kBM x d) product and fp32-atomicAdd it into
//      a workspace, converted to dtype by 3. (convert kernel).
//   3'. deterministic mode instead runs a dQ kernel parallel over query tiles
//      that recomputes S and dP (two more GEMMs, no atomics: bitwise
//      reproducible). Measured on H100 (bf16, s8k, 16k tokens): atomics vs the
//      separate pass are within +-4% (d128: 197 vs 205 TFLOP/s, the separate pass
//      faster; d64: 206 vs 200; d128 causal 181 vs 182): the extra S/dP GEMMs
//      cost about what the fp32 atomics, the dq_accum memset and the convert
//      pass cost. Both stay; `deterministic` picks. dev/cuda/NOTES.md.
//
// flash_bwd_dkdv2_kernel (FA2 layout, P^T / dS^T through shared memory, 2 m16
// tiles per warp in every GEMM, float4 dQ reductions into a permuted dq_accum on
// sm_90) runs every head dim whose shared memory the device gives a block: d <= 128
// with 128-key CTAs, d > 128 with 64-key CTAs, with two Q / dO stages (d256: 217 KB, so
// H100/H200) or, where those do not fit, one (plan_flash_bwd: an A100's 163 KB takes every
// head dim so); see its comment and dev/cuda/NOTES.md calls 3-6.
//
// The kernel above (flash_bwd_dkdv_kernel) is the d > 128 fallback where neither fits
// (sm_86 / sm_89 at d160) or ORCHARD_BWD_TWO_PASS=1: 4 warps x 16 key rows would need 2 x d/2
// accumulator registers per thread for dK and dV together (256 at d=256), so it
// runs twice: once for dV only and once for dK (+ dQ), recomputing S. It measured
// 0.46x FA2 at d256 s4k on an H200 (issue #16).
//
// Features (params.h), run-time branches in every kernel: varlen (per-sequence
// rows; D and dq_accum keep one slab of p.sq rows per (sequence, head)), the
// sliding window (dK/dV kernels: per key block the range of query tiles; dQ
// kernel: per query tile the range of key tiles; per-element masks on boundary
// tiles only), softcap and ALiBi (S recomputed through the same apply_score_mods as the
// forward; softcap multiplies dS by 1 - tanh^2, tanh recovered from P and the
// LSE so no extra register array lives across the dP GEMM), sinks (LSE already
// holds them; dsink by bwd_dsink_kernel from D and the LSE). attn_bias / attn_mask:
// template parameter kBias of each kernel (see flash_bwd_dkdv2_kernel; never with
// kCausal: launch.h, causal_runs_as_window), its tile
// staged in shared memory per step (attention_tiles.cuh) and added after softcap /
// ALiBi; with softcap, tanh is recovered from P with the bias subtracted too.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdlib>

#include "backends/cuda/sm80/attention_tiles.cuh"
#include "backends/cuda/device_attribute.h"
#include "backends/cuda/launch.h"
#include "backends/cuda/pdl.cuh"
#include "backends/cuda/sm80/mma_utils.cuh"
#include "backends/cuda/dropout_fragment.h"
#include "backends/cuda/sm80/swizzled_tile.cuh"
#include "orchard/params.h"
#include "orchard/philox.h"

namespace orchard::cuda {


enum BwdMode : int { kModeBoth = 0, kModeDV = 1, kModeDK = 2 };

template <int kD>
struct BwdConfig {
  static constexpr int kNWarps = kD <= 128 ? 8 : 4;
  static constexpr int kBN = 16 * kNWarps;  // key rows per CTA (16 per warp)
  static constexpr int kBM = kD <= 64 ? 64 : 32;  // query rows per step
  static constexpr bool kSplit = kD > 128;
  static constexpr int kS = kD + 8;
  static constexpr int kSdS = kBM + 8;
  static constexpr int kSmemBytes = (2 * kBN * kS + 4 * kBM * kS + kBN * kSdS) * 2 + 4 * kBM * 4;
  static constexpr int kQdOStageBytes = 2 * kBM * kS * 2;  // one Q and one dO tile (one_stage: without)
  // dQ split among warps for the in-kernel dS K product.
  static constexpr int kWM = kBM / 16;
  static constexpr int kWN = kNWarps / kWM;
  static constexpr int kDTw = kD / 8 / kWN;
  // Deterministic dQ kernel: 4 warps x 16 query rows.
  static constexpr int kDqNWarps = 4;
  static constexpr int kDqBM = 64;
  static constexpr int kDqBN = kD <= 128 ? 64 : 32;
  static constexpr int kDqSmemBytes = (2 * kDqBM * kS + 4 * kDqBN * kS) * 2;
  static constexpr int kDqKvStageBytes = 2 * kDqBN * kS * 2;  // one K and one V tile (one_stage: without)
  // attn_bias (launched with these bytes only with a bias), after the rest: the
  // step's bias tile as stored, double-buffered like the streamed tiles
  // (attention_tiles.cuh). The dK/dV kernel's is [kBM queries][kBN keys], read
  // transposed; the dQ kernel's [kDqBM queries][kDqBN keys].
  static constexpr int kBiasRawBytes = bias_tile_bytes<kBM, kBN>();
  static constexpr int kBiasBytes = 2 * kBiasRawBytes;
  static constexpr int kDqBiasRawBytes = bias_tile_bytes<kDqBM, kDqBN>();
  static constexpr int kDqBiasBytes = 2 * kDqBiasRawBytes;
  static_assert(kSmemBytes % 16 == 0 && kBiasRawBytes % 16 == 0 && kDqSmemBytes % 16 == 0 &&
                    kDqBiasRawBytes % 16 == 0,
                "bias tiles: 16-byte aligned (bool_region_vote)");
};

// Adds a lane's 4 C-fragment values of one 16 x 8 dQ tile into dq_accum (layout
// in launch.h): one 16-byte vector reduction on sm_90, so a warp instruction
// covers 512 contiguous bytes.
// The softmax scale is applied once, by the convert kernel.
__device__ __forceinline__ void dq_accum_add(float* dst, const float (&c)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(dst), make_float4(c[0], c[1], c[2], c[3]));
#else
#pragma unroll
  for (int i = 0; i < 4; ++i) atomicAdd(dst + i, c[i]);
#endif
}

// D[bh, row] = sum_c dO[b,row,h,c] * O[b,row,h,c]: bwd_dot_lanes(d) lanes per
// row, one 16-byte chunk of O and of dO each, so every lane loads (one warp per
// row left 24 of 32 lanes idle at d64, 16 at d128). d is the value head dim;
// !vec (rows_vec16): lane `sub` takes the elements sub, sub + lanes, ... instead.
// zero_acc (optional, 16-byte aligned, zero_float4 float4 slots): the fp32 dQ
// accumulator, cleared here (grid-stride) so that the atomic-dQ backward is 3 GPU
// ops, not 4 with a cudaMemsetAsync (a launch's host time and a GPU op per
// backward, which small problems pay on every call: issue 12). Defaulted, so
// callers that zero their accumulator another way (or have none) are unchanged.
template <typename T>
__global__ void __launch_bounds__(256) bwd_dot_kernel(const BwdParams p, float* dsum, bool vec,
                                                      float* zero_acc = nullptr, int64_t zero_float4 = 0) {
  if (zero_acc != nullptr) {
    float4* acc4 = reinterpret_cast<float4*>(zero_acc);
    const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < zero_float4; i += step)
      acc4[i] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  const int width = p.d_v;
  const int lanes = bwd_dot_lanes(width);
  const int sub = threadIdx.x % lanes;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (256 / lanes) + threadIdx.x / lanes;
  const int64_t total = static_cast<int64_t>(p.b) * p.hq * p.sq;
  float acc = 0.f;
  if (r < total && (!vec || sub * 8 < width)) {
    const int64_t bh = r / p.sq;
    const int i = static_cast<int>(r % p.sq);
    const int b = static_cast<int>(bh / p.hq), h = static_cast<int>(bh % p.hq);
    int64_t row = i;  // varlen: local row i of sequence b (rows past its length get D = 0)
    bool valid = true;
    if (p.cu_seqlens_q != nullptr) {
      const SeqSpan span = seq_span(p, b);
      valid = i < span.len_q;
      row = span.q_start + i;
    }
    if (valid) {
      const T* o = static_cast<const T*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride + row * p.o_row_stride;
      const T* dO =
          static_cast<const T*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride + row * p.do_row_stride;
      if (vec) {
        const uint4 ov = *reinterpret_cast<const uint4*>(o + sub * 8);
        const uint4 dv = *reinterpret_cast<const uint4*>(dO + sub * 8);
        const uint32_t* ow = reinterpret_cast<const uint32_t*>(&ov);
        const uint32_t* dw = reinterpret_cast<const uint32_t*>(&dv);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float2 a = MmaType<T>::unpack(ow[j]), c = MmaType<T>::unpack(dw[j]);
          acc += a.x * c.x + a.y * c.y;
        }
      } else {
        for (int c = sub; c < width; c += lanes) acc += MmaType<T>::to_float(o[c]) * MmaType<T>::to_float(dO[c]);
      }
    }
  }
  // Every lane takes part (no early return): the groups are aligned, so xor
  // offsets below `lanes` stay inside a row's group.
  for (int o = lanes / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (r < total && sub == 0) dsum[r] = acc;
}

// Where dQ row 0 of (batch, q head) slab bh starts (at column col0) and how many rows its
// sequence has (varlen: its span of the packed rows): both dQ converts' output side.
template <typename T>
struct DqRows {
  T* base;
  int sq;
};
template <typename T>
__device__ __forceinline__ DqRows<T> dq_rows_of(const BwdParams& p, int64_t bh, int col0) {
  const int b = static_cast<int>(bh / p.hq), h = static_cast<int>(bh % p.hq);
  DqRows<T> r{static_cast<T*>(p.dq) + b * p.dq_batch_stride + h * p.dq_head_stride + col0, p.sq};
  if (p.cu_seqlens_q != nullptr) {
    const SeqSpan span = seq_span(p, b);
    r.sq = span.len_q;
    r.base += span.q_start * p.dq_row_stride;
  }
  return r;
}

// dq[b,row,h,:] = dtype(scale * dq_accum): one thread per lane-slot of the permuted
// layout (its float4 is rows r, r+8 x columns c, c+1 of a 16 x 8 tile), so the
// reads are fully coalesced; a warp writes one 16-row x 16-byte tile.
template <typename T>
__global__ void __launch_bounds__(256) bwd_convert_dq_kernel(const BwdParams p, const float* acc, bool vec) {
  pdl_wait_primary();  // the sm90 backward launches it as the main kernel's dependent (pdl.cuh)
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  const int col_tiles = dq_accum_cols(p.d) / 8;
  const int row_tiles = dq_accum_rows(p.sq) / 16;
  const int64_t tiles_per_slab = static_cast<int64_t>(row_tiles) * col_tiles;
  const int64_t tile = idx / 32;
  if (tile >= static_cast<int64_t>(p.b) * p.hq * tiles_per_slab) return;
  const int lane = static_cast<int>(idx % 32), g = lane / 4, t = lane % 4;
  const int64_t bh = tile / tiles_per_slab;
  const int in_slab = static_cast<int>(tile % tiles_per_slab);
  const int row = (in_slab / col_tiles) * 16 + g, col = (in_slab % col_tiles) * 8 + 2 * t;
  const float4 v = *reinterpret_cast<const float4*>(acc + idx * 4);
  const DqRows<T> rows = dq_rows_of<T>(p, bh, col);
  T* dq = rows.base;
  const int sq = rows.sq;
  const float sc = p.scale;
  if (vec) {
    if (row < sq) *reinterpret_cast<uint32_t*>(dq + row * p.dq_row_stride) = MmaType<T>::pack(v.x * sc, v.y * sc);
    if (row + 8 < sq)
      *reinterpret_cast<uint32_t*>(dq + (row + 8) * p.dq_row_stride) = MmaType<T>::pack(v.z * sc, v.w * sc);
  } else {  // element-wise (rows_vec16): columns past d (dq_accum's padding) are not written
    const int n = p.d - col;  // this lane's columns inside d: n >= 2 both, 1 the first, <= 0 none
    auto put = [&](int rr, float x, float y) {
      if (rr >= sq || n <= 0) return;
      const uint32_t w = MmaType<T>::pack(x * sc, y * sc);
      uint16_t* out = reinterpret_cast<uint16_t*>(dq + rr * p.dq_row_stride);
      out[0] = static_cast<uint16_t>(w & 0xffffu);
      if (n > 1) out[1] = static_cast<uint16_t>(w >> 16);
    };
    put(row, v.x, v.y);
    put(row + 8, v.z, v.w);
  }
}

// The same conversion on the 16-byte path (rows_vec16): each warp takes 16 rows x up to 64
// columns (8 consecutive 16 x 8 tiles of dq_accum: eight 512-byte reads in flight per warp),
// stages them as 16-bit rows in shared memory and writes whole 128-byte row segments, where the
// tile-per-warp kernel above wrote 16 bytes of a row per store.  ORCHARD_DQ_CONVERT_ROWS=0: that
// kernel on every path (an A/B switch).
#ifndef ORCHARD_DQ_CONVERT_ROWS
#define ORCHARD_DQ_CONVERT_ROWS 1
#endif
constexpr int kConvertRowsWarps = 8;
template <typename T>
__global__ void __launch_bounds__(256) bwd_convert_dq_rows_kernel(const BwdParams p, const float* acc) {
  pdl_wait_primary();  // as bwd_convert_dq_kernel
  constexpr int kPitch = 36;  // words per staged row: 32 (64 columns) + 4 (conflict-free writes, 16-byte rows)
  __shared__ __align__(16) uint32_t stage[kConvertRowsWarps][16][kPitch];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int col_tiles = p.d / 8;  // d % 8 == 0 on this path
  const int col_groups = (col_tiles + 7) / 8;
  const int row_tiles = dq_accum_rows(p.sq) / 16;
  const int64_t per_slab = static_cast<int64_t>(row_tiles) * col_groups;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * kConvertRowsWarps + warp;
  if (chunk >= static_cast<int64_t>(p.b) * p.hq * per_slab) return;  // warp-uniform; only __syncwarp below
  const int64_t bh = chunk / per_slab;
  const int in_slab = static_cast<int>(chunk % per_slab);
  const int rt = in_slab / col_groups, ct0 = (in_slab % col_groups) * 8;
  const int n_tiles = min(8, col_tiles - ct0);
  const float* src = acc + bh * row_tiles * 16 * (col_tiles * 8) + (static_cast<int64_t>(rt) * col_tiles + ct0) * 128 + lane * 4;
  float4 v[8];
#pragma unroll
  for (int j = 0; j < 8; ++j)
    if (j < n_tiles) v[j] = *reinterpret_cast<const float4*>(src + j * 128);
  const int g = lane / 4, t = lane % 4;
  const float sc = p.scale;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    if (j < n_tiles) {  // lane (g, t) of tile j: rows g and g + 8, columns 8 j + 2 t, + 1
      stage[warp][g][4 * j + t] = MmaType<T>::pack(v[j].x * sc, v[j].y * sc);
      stage[warp][g + 8][4 * j + t] = MmaType<T>::pack(v[j].z * sc, v[j].w * sc);
    }
  }
  __syncwarp();
  const DqRows<T> rows = dq_rows_of<T>(p, bh, ct0 * 8);
  T* dq = rows.base;
  const int sq = rows.sq;
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // 16 rows x 8 tiles of 16 bytes: 4 rows (4 full 128-byte segments) per pass
    const int r = 4 * i + lane / 8, j = lane % 8;
    const int row = rt * 16 + r;
    if (j < n_tiles && row < sq)
      *reinterpret_cast<uint4*>(dq + static_cast<int64_t>(row) * p.dq_row_stride + 8 * j) =
          *reinterpret_cast<const uint4*>(&stage[warp][r][4 * j]);
  }
}

// dQ = scale * dq_accum in T for every (batch, q head): the rows kernel on the 16-byte path, the
// tile kernel otherwise.  pdl: launched as the previous kernel's programmatic dependent (both
// kernels wait for it before reading).
template <typename T>
void launch_bwd_convert_dq(const BwdParams& p, const float* acc, bool vec, cudaStream_t stream, bool pdl) {
  dim3 grid;
  if (ORCHARD_DQ_CONVERT_ROWS && vec) {
    const int64_t chunks =
        static_cast<int64_t>(p.b) * p.hq * (dq_accum_rows(p.sq) / 16) * ((p.d / 8 + 7) / 8);
    grid = dim3(static_cast<unsigned>((chunks + kConvertRowsWarps - 1) / kConvertRowsWarps));
    if (pdl) launch_pdl(bwd_convert_dq_rows_kernel<T>, grid, dim3(256), 0, stream, p, acc);
    else bwd_convert_dq_rows_kernel<T><<<grid, 256, 0, stream>>>(p, acc);
    check_launch("bwd_convert_dq_rows_kernel");
    return;
  }
  const int64_t n4 = static_cast<int64_t>(p.b) * p.hq * dq_accum_rows(p.sq) * (dq_accum_cols(p.d) / 4);  // float4 slots
  grid = dim3(static_cast<unsigned>((n4 + 255) / 256));
  if (pdl) launch_pdl(bwd_convert_dq_kernel<T>, grid, dim3(256), 0, stream, p, acc, vec);
  else bwd_convert_dq_kernel<T><<<grid, 256, 0, stream>>>(p, acc, vec);
  check_launch("bwd_convert_dq_kernel");
}

// Launches bwd_dot_kernel over every (batch, q head, row) of p, and, when dq_accum
// is given, clears that fp32 accumulator (bwd_workspace_layout's dq_accum region:
// b * hq * dq_accum_rows(sq) * dq_accum_cols(d) floats) in the same kernel. The grid
// is sized for the larger job - the clear's one float4 per thread (d / 4 float4s per
// row against the dot's 256 / bwd_dot_lanes rows per block: twice the dot's blocks at
// d 64 and 128) - so the extra blocks only store zeros, and past 65,536 blocks the
// clear's loop strides over the grid.
template <typename T>
void launch_bwd_dot(const BwdParams& p, float* dsum, bool vec, float* dq_accum, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.b) * p.hq * p.sq;
  const int rows_per_block = 256 / bwd_dot_lanes(value_dim(p));
  int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  int64_t acc_float4 = 0;
  if (dq_accum != nullptr) {
    acc_float4 = static_cast<int64_t>(p.b) * p.hq * dq_accum_rows(p.sq) * (dq_accum_cols(p.d) / 4);
    const int64_t acc_blocks = (acc_float4 + 255) / 256;
    // Past ~a few waves a grid-stride loop is as good as more blocks.
    const int64_t cap = int64_t{1} << 16;
    if (acc_blocks > blocks) blocks = acc_blocks < cap ? acc_blocks : (blocks > cap ? blocks : cap);
  }
  if (blocks <= 0) return;
  bwd_dot_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(p, dsum, vec, dq_accum, acc_float4);
  check_launch("bwd_dot_kernel");
}

// LSE (log2 units) and D = rowsum(dO * O) of query row `row` of head h; rows
// past sq (the sequence's length; p.sq is the row stride of D) get LSE = +inf
// (so P = 0) and D = 0. lse_batch: the sequence's LSE at (head 0, row 0).
__device__ __forceinline__ float2 load_row_stats(const BwdParams& p, const float* lse_batch, const float* dsum, int b,
                                                 int h, int row, int sq) {
  float2 v = make_float2(INFINITY, 0.f);
  if (row < sq) {
    v.x = lse_log2(lse_batch[h * p.lse_head_stride + row]);
    v.y = dsum[(static_cast<int64_t>(b) * p.hq + h) * p.sq + row];
  }
  return v;
}

// Stages those of query rows m0 .. m0 + kBM - 1 into shared memory for the
// dK/dV kernels.
template <int kBM>
__device__ __forceinline__ void stage_row_stats(const BwdParams& p, const float* lse_batch, const float* dsum, int b,
                                                int h, int m0, int tid, float* s_lse, float* s_d, int sq) {
  if (tid < kBM) {
    const float2 v = load_row_stats(p, lse_batch, dsum, b, h, m0 + tid, sq);
    s_lse[tid] = v.x;
    s_d[tid] = v.y;
  }
}

// Query tiles [m_begin, m_end) (of kBM rows) with a row that sees some key of
// [n0, n0 + kBN): causal and the sliding window on the diagonal `diag`.
template <bool kCausal, int kBM, int kBN>
__device__ __forceinline__ void query_tile_range(int n0, int sq, int64_t diag, bool has_window, int64_t window_left,
                                                 int64_t window_right, int& m_begin, int& m_end) {
  m_end = (sq + kBM - 1) / kBM;
  m_begin = first_visible_query_tile<kCausal, kBM>(n0, m_end, sq, diag);
  if (has_window) {
    const WindowOffsets w = window_offsets(kCausal, window_left, window_right, diag);
    const int64_t first = static_cast<int64_t>(n0) - w.hi, last = static_cast<int64_t>(n0) + kBN - 1 - w.lo + 1;
    const int64_t r0 = first < 0 ? 0 : (first > sq ? sq : first), r1 = last < 0 ? 0 : (last > sq ? sq : last);
    m_begin = static_cast<int>(r0 / kBM);
    m_end = r0 < r1 ? static_cast<int>((r1 + kBM - 1) / kBM) : m_begin;
  }
}

// Key tiles [n_begin, n_end) (of kBN rows) that some row of [m0, m0 + kBM) sees.
template <bool kCausal, int kBM, int kBN>
__device__ __forceinline__ void key_tile_range(int m0, int sk, int64_t diag, bool has_window, int64_t window_left,
                                               int64_t window_right, int& n_begin, int& n_end) {
  n_begin = 0;
  n_end = (visible_key_end<kCausal>(m0, kBM, sk, diag) + kBN - 1) / kBN;
  if (has_window) {
    const WindowOffsets w = window_offsets(kCausal, window_left, window_right, diag);
    const int64_t lo = static_cast<int64_t>(m0) + w.lo, hi = static_cast<int64_t>(m0) + kBM - 1 + w.hi + 1;
    const int64_t k0 = lo < 0 ? 0 : (lo > sk ? sk : lo), k1 = hi < 0 ? 0 : (hi > sk ? sk : hi);
    n_begin = static_cast<int>(k0 / kBN);
    n_end = k0 < k1 ? static_cast<int>((k1 + kBN - 1) / kBN) : n_begin;
  }
}

// What both dK/dV kernels (flash_bwd_dkdv_kernel, flash_bwd_dkdv2_kernel) derive from their
// (batch * kv head, key block) before the loop; each kernel binds the fields to its own names.
struct DkdvBlock {
  int b, hk, group, n0;
  int d, dv;     // q/k and v/dO head dims (d_v set: cuda_backend.cu)
  SeqSpan span;  // varlen: this sequence
  int sq, sk;
  int64_t diag;
};
template <int kBN>
__device__ __forceinline__ DkdvBlock dkdv_block(const BwdParams& p, int64_t bhk, int n_block) {
  DkdvBlock k;
  k.b = static_cast<int>(bhk / p.hkv), k.hk = static_cast<int>(bhk % p.hkv);
  k.group = p.hq / p.hkv;
  k.n0 = n_block * kBN;
  k.d = p.d, k.dv = p.d_v;
  k.span = seq_span(p, k.b);
  k.sq = k.span.len_q, k.sk = k.span.len_k;
  k.diag = k.span.diag;
  return k;
}

// The block's K tile (and with load_v its V tile) into shared memory: cp.async, or
// element-wise where the rows are not 16-byte vectors (rows_vec16).
template <typename T, int kBN, int kD, int kThreads>
__device__ __forceinline__ void load_dkdv_kv_tiles(const BwdParams& p, const DkdvBlock& k, T* sK, T* sV, bool load_v,
                                                   bool vec, int tid) {
  const T* kg = static_cast<const T*>(p.k) + k.b * p.k_batch_stride + k.hk * p.k_head_stride +
                (k.span.k_start + k.n0) * p.k_row_stride;
  const T* vg = static_cast<const T*>(p.v) + k.b * p.v_batch_stride + k.hk * p.v_head_stride +
                (k.span.k_start + k.n0) * p.v_row_stride;
  if (vec) {
    load_tile_async<T, kBN, kD, kThreads>(smem_u32(sK), kg, p.k_row_stride, k.sk - k.n0, k.d, tid);
    if (load_v) load_tile_async<T, kBN, kD, kThreads>(smem_u32(sV), vg, p.v_row_stride, k.sk - k.n0, k.dv, tid);
  } else {
    load_tile_elems<T, kBN, kD, kThreads>(smem_u32(sK), kg, p.k_row_stride, k.sk - k.n0, k.d, tid);
    if (load_v) load_tile_elems<T, kBN, kD, kThreads>(smem_u32(sV), vg, p.v_row_stride, k.sk - k.n0, k.dv, tid);
  }
}

// Sequence b's row statistics (D = rowsum(dO * O) from the pre-pass, LSE from its first
// row) and dQ accumulator slabs.
struct DkdvRowInputs {
  const float* dsum;
  DqAccumSlabs dq_acc;
  const float* lse_g;
};
__device__ __forceinline__ DkdvRowInputs dkdv_row_inputs(const BwdParams& p, const DkdvBlock& k) {
  const unsigned char* ws = static_cast<const unsigned char*>(p.workspace);
  const BwdWorkspace layout = bwd_workspace_layout(p);
  const float* dsum = reinterpret_cast<const float*>(ws + layout.d_offset);
  const DqAccumSlabs dq_acc = bwd_dq_accum_slabs(p, k.b);
  const float* lse_g = static_cast<const float*>(p.lse) + k.b * p.lse_batch_stride + k.span.q_start;
  return {dsum, dq_acc, lse_g};
}

// kBias: p.attn_bias is set (a template parameter for the reason at flash_bwd_dkdv2_kernel).
// one_stage: one Q / dO stage instead of two (Cfg::kQdOStageBytes less shared memory: d192 on
// sm_86 / sm_89): step it's tiles are copied once every warp is done with step it - 1's, not overlapped.
template <typename T, int kD, bool kCausal, bool kDropout, int kMode, bool kDq, bool kBias = false>
__global__ void __launch_bounds__(BwdConfig<kD>::kNWarps * 32)
    flash_bwd_dkdv_kernel(const BwdParams p, int num_n_blocks, bool vec, bool one_stage) {
  using Cfg = BwdConfig<kD>;
  constexpr int kBM = Cfg::kBM, kBN = Cfg::kBN, kS = Cfg::kS, kSdS = Cfg::kSdS;
  constexpr int kThreads = Cfg::kNWarps * 32;
  constexpr int kKSteps = kD / 16;
  constexpr int kMT = kBM / 8;  // n8 tiles of S^T (query columns)
  constexpr int kDT = kD / 8;
  constexpr bool kWantDV = kMode != kModeDK;
  constexpr bool kWantDK = kMode != kModeDV;

  // K, V, dS^T, the row stats, the bias tiles [2] (kBias), then the Q / dO stages interleaved (Q0 dO0
  // Q1 dO1), so that one_stage uses the first two only and every offset is a constant.
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kBN * kS;
  T* sdS = sV + kBN * kS;  // [kBN][kSdS]
  float* sLse = reinterpret_cast<float*>(sdS + kBN * kSdS);  // [2][kBM], log2 units
  float* sDs = sLse + 2 * kBM;                               // [2][kBM]
  unsigned char* sBias = reinterpret_cast<unsigned char*>(sDs + 2 * kBM);  // [2][kBiasRawBytes]
  T* sQ = reinterpret_cast<T*>(sBias + (kBias ? Cfg::kBiasBytes : 0));
  T* sdO = sQ + kBM * kS;
  constexpr int kQdOStride = 2 * kBM * kS;  // from a Q / dO stage to the next

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t bhk = blockIdx.x / num_n_blocks;
  const int n_block = blockIdx.x % num_n_blocks;
  const DkdvBlock blk = dkdv_block<kBN>(p, bhk, n_block);
  const auto& [b, hk, group, n0, d, dv, span, sq, sk, diag] = blk;
  if (n0 >= sk) return;  // only with varlen
  const bool has_window = window_active(kCausal, p.window_left, p.window_right);
  const bool has_mod = p.softcap > 0.f || p.alibi_slopes != nullptr;

  load_dkdv_kv_tiles<T, kBN, kD, kThreads>(p, blk, sK, sV, kWantDK, vec, tid);

  int m_begin, m_end;
  query_tile_range<kCausal, kBM, kBN>(n0, sq, diag, has_window, p.window_left, p.window_right, m_begin, m_end);
  const int nm = m_end - m_begin;
  const int total = group * nm;

  const auto [dsum, dq_acc, lse_g] = dkdv_row_inputs(p, blk);

  auto prefetch = [&](int it, int stage) {
    const int h = hk * group + it / nm;
    const int m0 = (m_begin + it % nm) * kBM;
    const int64_t r0 = span.q_start + m0;
    const T* qg = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + r0 * p.q_row_stride;
    const T* dog = static_cast<const T*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride + r0 * p.do_row_stride;
    if (vec) {
      load_tile_async<T, kBM, kD, kThreads>(smem_u32(sQ + stage * kQdOStride), qg, p.q_row_stride, sq - m0, d, tid);
      load_tile_async<T, kBM, kD, kThreads>(smem_u32(sdO + stage * kQdOStride), dog, p.do_row_stride, sq - m0, dv, tid);
    } else {  // p.* / threadIdx as in the forward's loop
      const int tx = threadIdx.x;
      load_tile_elems<T, kBM, kD, kThreads>(smem_u32(sQ + stage * kQdOStride), qg, p.q_row_stride, sq - m0, p.d, tx);
      load_tile_elems<T, kBM, kD, kThreads>(smem_u32(sdO + stage * kQdOStride), dog, p.do_row_stride, sq - m0, p.d_v, tx);
    }
    stage_row_stats<kBM>(p, lse_g, dsum, b, h, m0, tid, sLse + stage * kBM, sDs + stage * kBM, sq);
  };
  if (total > 0) prefetch(0, 0);
  if (kBias && total > 0)  // step 0's bias tile joins its group
    issue_bias_tile<kBM, kBN, kThreads>(sBias, p.attn_bias, bias_kind(p.attn_bias_dtype),
                                        p.bias_batch_stride, p.bias_head_stride, p.bias_row_stride, p.bias_col_stride,
                                        b, hk * group, m_begin * kBM, n0, sq - m_begin * kBM, sk - n0, tid);
  cp_async_commit();

  float acc_dk[kWantDK ? kDT : 1][4];
  float acc_dv[kWantDV ? kDT : 1][4];
#pragma unroll
  for (int i = 0; i < kDT; ++i)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      if (kWantDK) acc_dk[i][c] = 0.f;
      if (kWantDV) acc_dv[i][c] = 0.f;
    }

  const float scale_log2 = p.scale * kLog2e;
  const uint32_t keep_threshold = kDropout ? dropout_keep_threshold(p.dropout_p) : 0u;
  const DropoutKey key = dropout_key(p);  // reads rng_state when set
  const uint32_t drop_bh0 = dropout_batch_head(p, b, 0);  // Philox index of head 0: the dropout offsets added
  const float rdrop = kDropout ? 1.f / (1.f - p.dropout_p) : 1.f;
  const bool fragment_calls = kDropout && dropout_fragment_aligned(p.dropout_row_offset, p.dropout_col_offset);
  const int kv_base = n0 + warp * 16 + g;  // this thread's key rows: kv_base, kv_base + 8

  // kBias: how issue_bias_tile stages (own_bool_chunks_masked reads what this thread staged).
  const bool bias_async = kBias && bias_tile_async(p.attn_bias, bias_kind(p.attn_bias_dtype), p.bias_batch_stride,
                                                   p.bias_head_stride, p.bias_row_stride, p.bias_col_stride);
  for (int it = 0; it < total; ++it) {
    const int stage = it & 1;  // the bias tile's; Q / dO's unless one_stage
    const int qdo_stage = one_stage ? 0 : stage;
    if (one_stage && it > 0) {  // every warp is done with step it - 1's Q / dO
      __syncthreads();
      prefetch(it, 0);
      cp_async_commit();
    }
    cp_async_wait<0>();
    // Boolean mask (attention_tiles.cuh): the barrier also votes - a step whose whole
    // tile is masked adds nothing (skipped once the next step's loads are issued).
    bool skip_step = false;
    if constexpr (kBias) {
      skip_step = __syncthreads_and(p.attn_bias_dtype == DType::kUInt8 &&
                                    own_bool_chunks_masked<kBM, kBN, kThreads>(
                                        sBias + stage * Cfg::kBiasRawBytes, bias_async, tid));
    } else {
      __syncthreads();
    }
    if (kBias && it + 1 < total)  // the next step's bias tile joins its group
      issue_bias_tile<kBM, kBN, kThreads>(
          sBias + (stage ^ 1) * Cfg::kBiasRawBytes, p.attn_bias, bias_kind(p.attn_bias_dtype),
          p.bias_batch_stride, p.bias_head_stride, p.bias_row_stride, p.bias_col_stride, b, hk * group + (it + 1) / nm,
          (m_begin + (it + 1) % nm) * kBM, n0, sq - (m_begin + (it + 1) % nm) * kBM, sk - n0, tid);
    if (!one_stage && it + 1 < total) prefetch(it + 1, stage ^ 1);
    cp_async_commit();
    if constexpr (kBias) {
      if (skip_step) continue;  // CTA-uniform: P = 0 everywhere, nothing to accumulate
    }
    const int h = hk * group + it / nm;
    const int m0 = (m_begin + it % nm) * kBM;
    const T* sQs = sQ + qdo_stage * kQdOStride;
    const T* sdOs = sdO + qdo_stage * kQdOStride;
    const float* sLs = sLse + qdo_stage * kBM;
    const float* sDv = sDs + qdo_stage * kBM;

    // S^T = K Q^T for this warp's 16 key rows x kBM query columns.
    float st[kMT][4];
    warp_gemm_nt<T, kS, kMT, kKSteps>(st, sK, warp * 16, sQs, lane);
    const bool need_mask = tile_needs_mask<kCausal>(n0, kBN, m0, sk, diag);
    if (has_window || has_mod || kBias) {  // features: scores modified / window bounds masked (-inf)
      const WindowOffsets w = window_offsets(kCausal, p.window_left, p.window_right, diag);
      // Element (key kv_base + dk, query m0 + 2t + dq): col - row = key - query.
      auto each = [&](auto&& g) {
#pragma unroll
        for (int nt = 0; nt < kMT; ++nt)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int dk = (c >> 1) * 8, dq = nt * 8 + (c & 1);
            g(st[nt][c], dk - dq, dk);
          }
      };
      apply_score_mods(each, p.scale, p.softcap, alibi_slope_ptr(p.alibi_slopes, p.alibi_batch_stride, b, h), diag, w,
                       tile_needs_mask_window(n0, kBN, m0, kBM, sk, w), kv_base - m0 - 2 * t, sk - kv_base);
      if constexpr (kBias) {  // + bias / scale (element: query 2t + dq, key warp * 16 + g + dk)
        const unsigned char* tile = sBias + stage * Cfg::kBiasRawBytes;
        const float inv_scale = 1.f / p.scale;
        // Boolean mask: this warp's keys all visible in this step -> the pass adds 0.
        const bool bias_pass = !(p.attn_bias_dtype == DType::kUInt8 &&
                                 bool_region_vote<kBN, kBM, 16>(tile, 0, warp * 16, lane).all);
        if (bias_pass) bias_dispatch(bias_kind(p.attn_bias_dtype), [&](auto kind) {
          constexpr int kKind = decltype(kind)::value;
#pragma unroll
          for (int nt = 0; nt < kMT; ++nt)
#pragma unroll
            for (int c = 0; c < 4; ++c)
              st[nt][c] +=
                  bias_smem<kKind, kBN>(tile, nt * 8 + 2 * t + (c & 1), warp * 16 + g + (c >> 1) * 8) * inv_scale;
        });
      }
    }
    uint32_t keep_bits = 0xffffffffu;
#pragma unroll
    for (int nt = 0; nt < kMT; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int ql = nt * 8 + 2 * t + (c & 1);
        float pv = fast_exp2(fmaf(st[nt][c], scale_log2, -sLs[ql]));
        if (need_mask) {
          const int kv = kv_base + (c >> 1) * 8;
          const int64_t q = m0 + ql;
          if (kv >= sk || (kCausal && kv > q + diag)) pv = 0.f;
        }
        st[nt][c] = pv;
      }
    if constexpr (kDropout) {
      // The thread holds keys kv_base, kv_base + 8 of query columns nt * 8 + 2t + (0, 1).
      const uint32_t bh = drop_bh0 + static_cast<uint32_t>(h);
      const uint32_t q2t = static_cast<uint32_t>(m0 + 2 * t) + static_cast<uint32_t>(p.dropout_row_offset);
      const uint32_t k = static_cast<uint32_t>(kv_base) + static_cast<uint32_t>(p.dropout_col_offset);
      if (fragment_calls) {
        keep_bits = ~key_rows_dropped<kMT>(key.seed, key.offset, bh, q2t, k, g & 1, keep_threshold);
      } else {  // offsets off the 16 grid: per element
#pragma unroll 1
        for (int e = 0; e < kMT * 4; ++e)
          if (!dropout_keep(key.seed, key.offset, bh, q2t + static_cast<uint32_t>(e / 4 * 8 + (e & 1)),
                            k + static_cast<uint32_t>((e >> 1 & 1) * 8), keep_threshold))
            keep_bits &= ~(1u << e);
      }
    }
    auto kept = [&](int nt, int c) { return !kDropout || ((keep_bits >> (nt * 4 + c)) & 1u); };

    if constexpr (kWantDV) {
      // dV += P_drop^T dO
#pragma unroll
      for (int kk = 0; kk < kBM / 16; ++kk) {
        float pd[2][4];
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c) pd[j][c] = kept(2 * kk + j, c) ? st[2 * kk + j][c] * rdrop : 0.f;
        uint32_t a[4];
        pack_a_fragment<T>(a, pd[0], pd[1]);
#pragma unroll
        for (int dp = 0; dp < kDT / 2; ++dp) {
          uint32_t bfr[4];
          ldmatrix_x4_trans(bfr, b_addr_kn<kS>(sdOs, kk * 16, dp * 16, lane));
          mma16816<T>(acc_dv[2 * dp], a, bfr[0], bfr[1]);
          mma16816<T>(acc_dv[2 * dp + 1], a, bfr[2], bfr[3]);
        }
      }
    }

    if constexpr (kWantDK) {
      // dP^T = V dO^T
      float dpt[kMT][4];
      warp_gemm_nt<T, kS, kMT, kKSteps>(dpt, sV, warp * 16, sdOs, lane);
      if (p.softcap > 0.f) {  // softcap: dS *= 1 - tanh^2 (tanh recovered from P)
        const float slope = alibi_slope(p.alibi_slopes, p.alibi_batch_stride, b, h), inv_cap = 1.f / p.softcap;
        const int rel0 = kv_base - m0 - 2 * t, diag32 = clamp_i32(diag);
        const unsigned char* tile = sBias + stage * Cfg::kBiasRawBytes;
        // kBiasKind >= 0: attn_bias of that kind, staged in `tile` (compiled once per kind).
        auto pass = [&](auto bias_kind_c) {
          constexpr int kBiasKind = decltype(bias_kind_c)::value;
#pragma unroll
          for (int nt = 0; nt < kMT; ++nt)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              const int ql = nt * 8 + 2 * t + (c & 1);
              const int rel = rel0 + (c >> 1) * 8 - nt * 8 - (c & 1);
              float mod = alibi_term(slope, diag32, rel);
              if constexpr (kBiasKind >= 0)  // the staged bias of (query ql, key warp * 16 + g + dk)
                mod += bias_smem<kBiasKind, kBN>(tile, ql, warp * 16 + g + (c >> 1) * 8);
              st[nt][c] *= softcap_dtanh(st[nt][c], sLs[ql], mod, inv_cap);
            }
        };
        if constexpr (kBias) {
          bias_dispatch(bias_kind(p.attn_bias_dtype), pass);
        } else {  // (the loop as written before attn_bias)
#pragma unroll
          for (int nt = 0; nt < kMT; ++nt)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              const int ql = nt * 8 + 2 * t + (c & 1);
              const int rel = rel0 + (c >> 1) * 8 - nt * 8 - (c & 1);
              st[nt][c] *= softcap_dtanh(st[nt][c], sLs[ql], alibi_term(slope, diag32, rel), inv_cap);
            }
        }
      }
      // dS^T = P^T * (dP_drop^T - D), reusing st.
#pragma unroll
      for (int nt = 0; nt < kMT; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const float dpv = kept(nt, c) ? dpt[nt][c] * rdrop : 0.f;
          st[nt][c] = st[nt][c] * (dpv - sDv[nt * 8 + 2 * t + (c & 1)]);
        }
      // dK += dS^T Q
#pragma unroll
      for (int kk = 0; kk < kBM / 16; ++kk) {
        uint32_t a[4];
        pack_a_fragment<T>(a, st[2 * kk], st[2 * kk + 1]);
        if constexpr (kDq) {
          // Stage dS^T (key rows x query cols) for the dQ product below.
          T* row0 = sdS + (warp * 16 + g) * kSdS + kk * 16 + 2 * t;
          *reinterpret_cast<uint32_t*>(row0) = a[0];
          *reinterpret_cast<uint32_t*>(row0 + 8 * kSdS) = a[1];
          *reinterpret_cast<uint32_t*>(row0 + 8) = a[2];
          *reinterpret_cast<uint32_t*>(row0 + 8 * kSdS + 8) = a[3];
        }
#pragma unroll
        for (int dp = 0; dp < kDT / 2; ++dp) {
          uint32_t bfr[4];
          ldmatrix_x4_trans(bfr, b_addr_kn<kS>(sQs, kk * 16, dp * 16, lane));
          mma16816<T>(acc_dk[2 * dp], a, bfr[0], bfr[1]);
          mma16816<T>(acc_dk[2 * dp + 1], a, bfr[2], bfr[3]);
        }
      }
      if constexpr (kDq) {
        __syncthreads();
        // dQ (kBM x d) += dS (kBM x kBN) K (kBN x d); warps tile (kWM x kWN).
        const int wm = warp % Cfg::kWM, wn = warp / Cfg::kWM;
        constexpr int kDTw = Cfg::kDTw;
        float acc[kDTw][4];
#pragma unroll
        for (int i = 0; i < kDTw; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < kBN / 16; ++kk) {
          uint32_t a[4];
          ldmatrix_x4_trans(a, a_addr_km<kSdS>(sdS, wm * 16, kk * 16, lane));
#pragma unroll
          for (int dp = 0; dp < (kDTw + 1) / 2; ++dp) {
            uint32_t bfr[4];
            // For odd kDTw the last x4 also reads the next 8 columns (inside the
            // padded row) and ignores them.
            ldmatrix_x4_trans(bfr, b_addr_kn<kS>(sK, kk * 16, (wn * kDTw + 2 * dp) * 8, lane));
            mma16816<T>(acc[2 * dp], a, bfr[0], bfr[1]);
            if (2 * dp + 1 < kDTw) mma16816<T>(acc[2 * dp + 1], a, bfr[2], bfr[3]);
          }
        }
        const int dqc = dq_accum_cols(d);
        float* dqa = dq_acc.base + h * dq_acc.head_stride;
        const int row16 = m0 + wm * 16;  // kBM % 16 == 0: a tile boundary
#pragma unroll
        for (int i = 0; i < kDTw; ++i) {
          const int col8 = (wn * kDTw + i) * 8;
          if (row16 < sq && col8 < d) dq_accum_add(dqa + dq_accum_tile_offset(row16, col8, dqc, lane), acc[i]);
        }
      }
    }
  }
  cp_async_wait<0>();

  // Epilogue: write this warp's 16 key rows of dK (scaled) and dV.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int kv = kv_base + r * 8;
    if (kv >= sk) continue;
    const int64_t kr = span.k_start + kv;
    T* dv_row = static_cast<T*>(p.dv) + b * p.dv_batch_stride + hk * p.dv_head_stride + kr * p.dv_row_stride;
    T* dk_row = static_cast<T*>(p.dk) + b * p.dk_batch_stride + hk * p.dk_head_stride + kr * p.dk_row_stride;
    if (vec) {
      if constexpr (kWantDV) store_accumulator_row<T>(dv_row, acc_dv, r, 0, t, dv, 1.f);
      if constexpr (kWantDK) store_accumulator_row<T>(dk_row, acc_dk, r, 0, t, d, p.scale);
    } else {
      if constexpr (kWantDV) store_accumulator_row_elems<T>(dv_row, acc_dv, r, 0, t, dv, 1.f);
      if constexpr (kWantDK) store_accumulator_row_elems<T>(dk_row, acc_dk, r, 0, t, d, p.scale);
    }
  }
}

// ---------------------------------------------------------------------------
// dK/dV kernel, FA2 layout. One CTA = kBN key rows (128 for d <= 128, 64 above),
// 8 warps; per step kBM query rows (128 for d <= 64, else 64). P^T and dS^T are
// staged through shared memory so that every GEMM is a full-width warp tile
// fed by ldmatrix, with two m16 tiles per warp (each B fragment feeds >= 2 MMAs):
//   1. S^T  = K Q^T     (kBN x kBM), warps kWK (keys) x kWQ (queries): 4 x 2 for
//      d <= 128, 2 x 4 above; 32 x kBM/kWQ each
//      P^T = exp2(...) -> sP (dropout applied: P_drop^T)
//   2. dP^T = V dO^T    (same tiling), dS^T = P^T (dP_drop^T - D) -> sdS
//   3. dV += P_drop^T dO, 4. dK += dS^T Q   (kBN x kD), warps kWK (keys) x kWQ (d)
//   5. dQ += dS K       (kBM x kD), warps kBM/32 (queries) x rest (d), fp32
//      atomics (non-deterministic) - deterministic mode runs flash_bwd_dq_kernel.
// ldmatrix.x4 per MMA: 0.45 (d64, d128) vs 0.65 for the 16-rows-per-warp kernel
// above (d128) - but smem bandwidth was not the limit. What was (dev/cuda/NOTES.md,
// calls 3-6): the dQ reductions (scalar REDs in the C layout -> float2: +18-22%;
// -> float4 into the permuted layout), spill reloads (ncu: 3.2 GB of local loads;
// 32-bit smem addresses and TileStream loads took d128 from 52 B to none) and
// instruction count (ncu: +25% vs FA2; per-element mask selects, the scale
// multiply on dQ and per-step divisions removed). Call 6: 0.91-1.17x FA2.
//
// kCompact (d <= 128 only): 64 key rows x 64 query rows, the d > 128 tiling, for GPUs whose
// shared memory the tiles above exceed (sm_86 / sm_89 allow a block 99 KB; an A100's 163 KB
// takes attn_bias at d64 only so). Two / one Q / dO stages, without attn_bias: d32 49 / 39 KB,
// d64 73 / 55, d96 97 / 71, d128 117 / 85 (the tiles above: 113-170 / 110-138); attn_bias adds 8.
template <int kD, bool kCompact = false>
struct BwdConfig2 {
  static_assert(!kCompact || kD <= 128, "the compact tiling is the d > 128 one already");
  static constexpr int kNWarps = 8;
  // d > 128: 64 key rows, so that dK + dV stay at 128 accumulator registers per
  // thread (kBN * kD * 2 / 256 threads) - the same budget as d128 with 128 keys.
  static constexpr int kBN = kD <= 128 && !kCompact ? 128 : 64;
  static constexpr int kBM = kD <= 64 && !kCompact ? 128 : 64;  // d64: 128 measured faster than 64 (calls 3, 13)
  // Warps: kWK along keys (32 key rows each) x kWQ along queries (phases 1-2) or
  // along d (phases 3-4): 4 x 2 for d <= 128, 2 x 4 for d > 128.
  static constexpr int kWK = kBN / 32;
  static constexpr int kWQ = kNWarps / kWK;
  static constexpr int kS = kD + 8;
  static constexpr int kSP = kBM + 8;  // sP / sdS row stride (key-major rows)
  // Q and dO tiles (streamed every step) swizzled where the head dim allows
  // (swizzled_tile.h); K, V (loaded once) and sP / sdS stay padded.
  static constexpr bool kSwizzleQdO = swizzle_streamed_tiles(kD) && swizzled_kn_columns_ok(kD / kWQ, kWQ);
  static constexpr int kQdOTileBytes = TileOperand<kBM, kD, kS, kSwizzleQdO>::tile_bytes();
  static constexpr int kSmemBytes = (2 * kBN * kS + 2 * kBN * kSP) * 2 + 4 * kQdOTileBytes + 4 * kBM * 4;
  static constexpr int kMT = kBM / kWQ / 8;  // n8 tiles of S^T per warp (kBM/kWQ query columns)
  static constexpr int kDTw = kD / kWQ / 8;  // n8 tiles of dK/dV per warp (kD/kWQ columns; odd at d160)
  static constexpr int kQM = kBM / 32;      // dQ: warps along query rows (32 rows each)
  static constexpr int kQN = kNWarps / kQM; // dQ: warps along d
  static constexpr int kDqT = kD / 8 / kQN; // dQ n8 tiles per warp (may be odd: d96, d160)
  // dQ columns per pass: at d256 one pass would hold 64 more accumulators next to
  // dK / dV's 128, so the product runs in two column halves (dS fragments re-read).
  static constexpr int kDqChunk = kDqT > 6 ? kDqT / 2 : kDqT;
  static_assert(kMT % 2 == 0 && kDqT % kDqChunk == 0, "BwdConfig2 tiling");
  // attn_bias: the step's [kBM queries][kBN keys] bias tile as stored lives in sdS
  // and past its end, before the Q / dO stages (sdS is free from the step's top barrier until
  // dS is stored; a second barrier guards that store), so the launch adds kBiasExtraBytes only
  // (d64, float32 bias: 205 KB in all; a separate tile would not fit).
  // (Rounded up to 128 bytes: the Q / dO stages that follow are swizzled tiles.)
  static constexpr int kBiasExtraBytes =
      bias_tile_bytes<kBM, kBN>() > kBN * kSP * 2 ? (bias_tile_bytes<kBM, kBN>() - kBN * kSP * 2 + 127) / 128 * 128 : 0;
};

// kBias: p.attn_bias is set. A template parameter here (like the forward's): with
// run-time bias branches ptxas spilled the plain dropout kernels on the merged tree
// (d128 causal dropout: 32 -> 420 B spill stores); kBias = false is the pre-bias code.
// one_stage: one Q / dO stage instead of two (2 * kQdOTileBytes less shared memory, for GPUs whose
// opt-in the two stages exceed: A100's 163 KB at d64 / d128, and d192 / d256): the next step's tiles
// are copied after this step's last read of them (dV / dK), overlapping the dQ product only.
// kCompact: BwdConfig2's smaller tiles.
template <typename T, int kD, bool kCausal, bool kDropout, bool kDq, bool kBias = false, bool kCompact = false>
__global__ void __launch_bounds__(256)
    flash_bwd_dkdv2_kernel(const BwdParams p, int num_n_blocks, int head_group, bool vec, bool one_stage) {
  using Cfg = BwdConfig2<kD, kCompact>;
  constexpr int kBM = Cfg::kBM, kBN = Cfg::kBN, kS = Cfg::kS, kSP = Cfg::kSP;
  constexpr int kThreads = 256;
  constexpr int kKSteps = kD / 16;
  constexpr int kMT = Cfg::kMT;
  constexpr int kDTw = Cfg::kDTw;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kBN * kS;
  constexpr bool kSwz = Cfg::kSwizzleQdO;
  constexpr int kStageBytes = Cfg::kQdOTileBytes;  // one Q or dO stage
  float* sLse = reinterpret_cast<float*>(sV + kBN * kS);  // [2][kBM], log2 units
  float* sDs = sLse + 2 * kBM;                            // [2][kBM]
  T* sP = reinterpret_cast<T*>(sDs + 2 * kBM);            // [kBN][kSP]  P_drop^T
  T* sdS = sP + kBN * kSP;                                // [kBN][kSP]  dS^T (kBias: the bias tile, past its end too)
  // The Q / dO stages last and interleaved (Q0 dO0 Q1 dO1), so that one_stage needs the first two
  // only and no buffer's place depends on it (run-time offsets cost the bias and dropout kernels
  // up to 370 B more spill, ptxas sm_90).
  T* sQ = reinterpret_cast<T*>(reinterpret_cast<unsigned char*>(sdS + kBN * kSP) + (kBias ? Cfg::kBiasExtraBytes : 0));
  T* sdO = sQ + kStageBytes / static_cast<int>(sizeof(T));
  constexpr int kStageStride = 2 * kStageBytes;  // from a buffer's stage 0 to its stage 1

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  constexpr int kWK = Cfg::kWK, kWQ = Cfg::kWQ;
  const int wk = warp % kWK, wq = warp / kWK;  // phases 1-4: key-row group, column group
  // Causal: heaviest key blocks first within groups of heads (launch.h).
  int64_t bhk;
  int n_block;
  if constexpr (kCausal) {
    const CtaCoord c = causal_cta_coord(blockIdx.x, num_n_blocks, head_group, static_cast<int64_t>(p.b) * p.hkv);
    bhk = c.head;
    n_block = c.n_block;
  } else {
    bhk = blockIdx.x / num_n_blocks;
    n_block = blockIdx.x % num_n_blocks;
  }
  const DkdvBlock blk = dkdv_block<kBN>(p, bhk, n_block);
  const auto& [b, hk, group, n0, d, dv, span, sq, sk, diag] = blk;
  if (n0 >= sk) return;  // only with varlen
  const bool has_window = window_active(kCausal, p.window_left, p.window_right);
  const bool has_mod = p.softcap > 0.f || p.alibi_slopes != nullptr;

  load_dkdv_kv_tiles<T, kBN, kD, kThreads>(p, blk, sK, sV, true, vec, tid);

  int m_begin, num_m_total;  // query tiles [m_begin, num_m_total) see this key block
  query_tile_range<kCausal, kBM, kBN>(n0, sq, diag, has_window, p.window_left, p.window_right, m_begin, num_m_total);
  const int nm = num_m_total - m_begin;
  const int total = group * nm;

  const auto [dsum, dq_acc, lse_g] = dkdv_row_inputs(p, blk);

  TileStream<T, kBM, kD, kThreads, kSwz> q_stream(static_cast<const T*>(p.q), p.q_row_stride, d, tid);
  TileStream<T, kBM, kD, kThreads, kSwz> do_stream(static_cast<const T*>(p.dout), p.do_row_stride, dv, tid);
  // Steps run over (q head of the group, query tile): counters, not divisions.
  // The streams' tile origins move by one tile per step and are recomputed only
  // when the step crosses to the next q head (the full 64-bit origin took ~30
  // uniform instructions per step, d128).
  auto seek = [&](int h, int mi) {
    const int64_t m0 = span.q_start + mi * kBM;
    q_stream.tile = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + m0 * p.q_row_stride;
    do_stream.tile = static_cast<const T*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride + m0 * p.do_row_stride;
  };
  // The next step's LSE / D: the non-causal kernels load them into registers
  // with the prefetch and store them at the end of the step, so the store does
  // not wait for the load at the top of the step; the causal kernels store them
  // at once. H100 A/B (call 16, one round): non-causal d128 +3%, d64 +0.5%;
  // the same for causal: d64 -2 to -3%, d128 -1%.
  constexpr bool kStatsInRegs = !kCausal;
  float2 next_stats = make_float2(INFINITY, 0.f);
  auto prefetch = [&](int h, int mi, int stage, bool defer_stats) {
    const int m0 = mi * kBM;
    const uint32_t sq_stage = smem_u32(sQ) + stage * kStageStride, sdo_stage = smem_u32(sdO) + stage * kStageStride;
    // Measured (H100 A/B, call 11): non-causal d64 +1-2%, d128 within noise;
    // causal within noise (call 12; before the swizzled tiles ptxas spilled the
    // d128 causal kernel 8 -> 48 B and s16k lost 3%, now no spill reloads).
    constexpr bool kFullLoads = decltype(q_stream)::kFixedColumn;
    // Any d, d_v: the streams' columns past the width are copies (TileStream).
    // The element-wise branch last: first, it cost the d64 deterministic kernel 4 B.
    if (kFullLoads && vec && m0 + kBM <= sq) {  // warp-uniform: all but the last tile
      if constexpr (kFullLoads) {
        q_stream.load_full(sq_stage);
        do_stream.load_full(sdo_stage);
      }
    } else if (vec) {
      q_stream.load(sq_stage, sq - m0);
      do_stream.load(sdo_stage, sq - m0);
    } else {  // element-wise (rows_vec16); p.* / threadIdx as in the forward's loop
      const int tx = threadIdx.x;
      load_tile_elems<T, kBM, kD, kThreads, kSwz>(sq_stage, q_stream.tile, p.q_row_stride, sq - m0, p.d, tx);
      load_tile_elems<T, kBM, kD, kThreads, kSwz>(sdo_stage, do_stream.tile, p.do_row_stride, sq - m0, p.d_v, tx);
    }
    if (kStatsInRegs && defer_stats) {
      if (tid < kBM) next_stats = load_row_stats(p, lse_g, dsum, b, h, m0 + tid, sq);
    } else {
      stage_row_stats<kBM>(p, lse_g, dsum, b, h, m0, tid, sLse + stage * kBM, sDs + stage * kBM, sq);
    }
  };
  int h = hk * group, mi = m_begin;  // the current step
  if (total > 0) {
    seek(h, mi);
    prefetch(h, mi, 0, false);
  }
  cp_async_commit();

  float acc_dk[2][kDTw][4], acc_dv[2][kDTw][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int i = 0; i < kDTw; ++i)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc_dk[mt][i][c] = acc_dv[mt][i][c] = 0.f;

  const float scale_log2 = p.scale * kLog2e;
  const uint32_t keep_threshold = kDropout ? dropout_keep_threshold(p.dropout_p) : 0u;
  const DropoutKey key = dropout_key(p);  // reads rng_state when set
  const uint32_t drop_bh0 = dropout_batch_head(p, b, 0);  // Philox index of head 0: the dropout offsets added
  const float rdrop = kDropout ? 1.f / (1.f - p.dropout_p) : 1.f;
  const bool fragment_calls = kDropout && dropout_fragment_aligned(p.dropout_row_offset, p.dropout_col_offset);
  const int krow = wk * 32;            // this warp's first key row (local) in phases 1-4
  const int qcol = wq * (kBM / kWQ);   // this warp's first query column (local) in phases 1-2
  const int kv_base = n0 + krow + g;   // key rows kv_base + 16 mt + 8 r
  const int dcol = wq * (kD / kWQ);    // this warp's first d column in phases 3-4
  // Shared-memory byte addresses of this lane's ldmatrix rows at each warp tile's
  // origin; tile offsets are added as compile-time constants.
  const uint32_t k_a = smem_u32(sK) + 2 * (krow * kS + a_lane_off<kS>(lane));
  const uint32_t v_a = smem_u32(sV) + 2 * (krow * kS + a_lane_off<kS>(lane));
  // Q / dO: the lane's byte offsets for the [n][k] (S, dP: B operand) and the
  // [k][n] (dV, dK: transposed B operand) fragment patterns.
  using QdO = TileOperand<kBM, kD, kS, kSwz>;
  const uint32_t nk_off = QdO::nk_lane_offset(lane, qcol), kn_off = QdO::kn_lane_offset(lane, dcol);
  if (kSwz && ((smem_u32(sQ) | smem_u32(sdO)) & 127)) __trap();  // TileOperand's XOR needs 128-byte aligned tiles
  const uint32_t q_nk0 = smem_u32(sQ) + nk_off, do_nk0 = smem_u32(sdO) + nk_off;
  const uint32_t q_kn0 = smem_u32(sQ) + kn_off, do_kn0 = smem_u32(sdO) + kn_off;
  const uint32_t p_a = smem_u32(sP) + 2 * (krow * kSP + a_lane_off<kSP>(lane));
  const uint32_t ds_a = smem_u32(sdS) + 2 * (krow * kSP + a_lane_off<kSP>(lane));
  // kBias: how issue_bias_tile stages (own_bool_chunks_masked reads what this thread staged).
  const bool bias_async = kBias && bias_tile_async(p.attn_bias, bias_kind(p.attn_bias_dtype), p.bias_batch_stride,
                                                   p.bias_head_stride, p.bias_row_stride, p.bias_col_stride);

  for (int it = 0; it < total; ++it) {
    const int stage = one_stage ? 0 : it & 1;
    cp_async_wait<0>();
    __syncthreads();
    if constexpr (kBias) {  // this step's bias tile -> sdS.., a group of its own (waited for after S)
      issue_bias_tile<kBM, kBN, kThreads>(reinterpret_cast<unsigned char*>(sdS), p.attn_bias,
                                          bias_kind(p.attn_bias_dtype), p.bias_batch_stride, p.bias_head_stride,
                                          p.bias_row_stride, p.bias_col_stride, b, h, mi * kBM, n0, sq - mi * kBM,
                                          sk - n0, tid);
      cp_async_commit();
    }
    const bool last_tile = mi + 1 == num_m_total;
    const int h_next = last_tile ? h + 1 : h, mi_next = last_tile ? m_begin : mi + 1;
    if (it + 1 < total) {
      if (last_tile) {
        seek(h_next, mi_next);
      } else {
        q_stream.advance();
        do_stream.advance();
      }
      if (!one_stage) prefetch(h_next, mi_next, stage ^ 1, true);
    }
    cp_async_commit();
    // one_stage: the next step's tiles into this step's stage, once every warp is done reading it.
    // The predicated copies only (no full-tile or deferred-stats forms): a second copy of
    // `prefetch` in the loop cost the dropout / bias kernels 100-300 B more spill (ptxas sm_90).
    auto late_prefetch = [&] {
      if (one_stage && it + 1 < total) {
        __syncthreads();
        const int m0n = mi_next * kBM;
        if (vec) {
          q_stream.load(smem_u32(sQ), sq - m0n);
          do_stream.load(smem_u32(sdO), sq - m0n);
        } else {
          const int tx = threadIdx.x;
          load_tile_elems<T, kBM, kD, kThreads, kSwz>(smem_u32(sQ), q_stream.tile, p.q_row_stride, sq - m0n, p.d, tx);
          load_tile_elems<T, kBM, kD, kThreads, kSwz>(smem_u32(sdO), do_stream.tile, p.do_row_stride, sq - m0n, p.d_v,
                                                      tx);
        }
        stage_row_stats<kBM>(p, lse_g, dsum, b, h_next, m0n, tid, sLse, sDs, sq);
        cp_async_commit();
      }
    };
    const int m0 = mi * kBM;
    const uint32_t stage_off = stage * kStageStride;
    // The same addresses either way (TileOperand): the form is what kept the
    // d128 loop free of spill reloads (ptxas), measured in call 11.
    auto operand = [&](uint32_t lane0, uint32_t tile0, uint32_t lane_off) {
      return kCausal ? QdO::from_tile(tile0 + stage_off, lane_off) : QdO::from_lane(lane0, stage_off);
    };
    const float* sLs = sLse + stage * kBM;
    const float* sDv = sDs + stage * kBM;

    // (32 key rows) x (kBM/2 query columns) per warp, over the head dim: A rows
    // from a key-major tile (K or V), B columns from a query-major one (Q or dO).
    auto gemm_keys_by_queries = [&](float (&acc)[2][kMT][4], uint32_t a_base, const QdO& b) {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int i = 0; i < kMT; ++i) acc[mt][i][0] = acc[mt][i][1] = acc[mt][i][2] = acc[mt][i][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
        uint32_t a[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) ldmatrix_x4(a[mt], a_base + 2 * (mt * 16 * kS + ks * 16));
#pragma unroll
        for (int np = 0; np < kMT / 2; ++np) {
          uint32_t bfr[4];
          ldmatrix_x4(bfr, b.at(np * 16, ks));
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            mma16816<T>(acc[mt][2 * np], a[mt], bfr[0], bfr[1]);
            mma16816<T>(acc[mt][2 * np + 1], a[mt], bfr[2], bfr[3]);
          }
        }
      }
    };

    // 1. S^T = K Q^T.
    float st[2][kMT][4];
    gemm_keys_by_queries(st, k_a, operand(q_nk0, smem_u32(sQ), nk_off));
    const bool need_mask = tile_needs_mask<kCausal>(n0, kBN, m0, sk, diag);
    bool skip_step = false;  // kBias: a boolean tile with nothing visible
    // Masking only on tail / diagonal tiles (a warp-uniform branch, so the
    // common path carries no per-element compares): masked S -> -inf -> P = 0.
    // Element (key kv_base + kl, query m0 + qcol + 2t + ql) is masked iff
    // kl >= key_lim or kl - ql > diag_lim, with kl, ql unrolled constants.
    // Features (window / softcap / ALiBi) take the general per-element path:
    // on every tile with softcap / ALiBi, else on tiles crossing a window bound.
    if (has_window || has_mod || kBias) {
      const WindowOffsets w = window_offsets(kCausal, p.window_left, p.window_right, diag);
      // Element (key kv_base + dk, query m0 + qcol + 2t + dq): col - row = key - query.
      auto each = [&](auto&& g) {
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int nt = 0; nt < kMT; ++nt)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              const int dk = mt * 16 + (c >> 1) * 8, dq = nt * 8 + (c & 1);
              g(st[mt][nt][c], dk - dq, dk);
            }
      };
      apply_score_mods<-8 * kMT, 32>(each, p.scale, p.softcap,
                                     alibi_slope_ptr(p.alibi_slopes, p.alibi_batch_stride, b, h), diag, w,
                                     tile_needs_mask_window(n0, kBN, m0, kBM, sk, w), kv_base - m0 - qcol - 2 * t,
                                     sk - kv_base);
      if constexpr (kBias) {  // + bias / scale (element: query qcol + 2t + dq, key krow + g + dk)
        cp_async_wait<1>();          // the bias group (the prefetch may still fly)
        const unsigned char* tile = reinterpret_cast<const unsigned char*>(sdS);
        // Boolean mask (attention_tiles.cuh): the barrier also votes - a step whose
        // whole tile is masked adds nothing (skipped below); a warp whose part is
        // all visible skips the bias pass.
        const bool is_bool = p.attn_bias_dtype == DType::kUInt8;
        skip_step = __syncthreads_and(is_bool && own_bool_chunks_masked<kBM, kBN, kThreads>(tile, bias_async, tid));
        const bool bias_pass =
            !skip_step && !(is_bool && bool_region_vote<kBN, kBM / kWQ, 32>(tile, qcol, krow, lane).all);
        const float inv_scale = 1.f / p.scale;
        if (bias_pass) bias_dispatch(bias_kind(p.attn_bias_dtype), [&](auto kind) {
          constexpr int kKind = decltype(kind)::value;
#pragma unroll
          for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int nt = 0; nt < kMT; ++nt)
#pragma unroll
              for (int c = 0; c < 4; ++c)
                st[mt][nt][c] +=
                    bias_smem<kKind, kBN>(tile, qcol + nt * 8 + 2 * t + (c & 1), krow + mt * 16 + g + (c >> 1) * 8) *
                    inv_scale;
        });
      }
    } else if (need_mask) {
      const int key_lim = sk - kv_base;
      int diag_lim = 0;
      if (kCausal) {
        const int64_t lim = static_cast<int64_t>(m0) + diag - kv_base + qcol + 2 * t;
        diag_lim = static_cast<int>(lim < -(1 << 30) ? -(1 << 30) : (lim > (1 << 30) ? (1 << 30) : lim));
      }
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < kMT; ++nt)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int kl = mt * 16 + (c >> 1) * 8, ql = nt * 8 + (c & 1);
            if (kl >= key_lim || (kCausal && kl - ql > diag_lim)) st[mt][nt][c] = -INFINITY;
          }
    }
    // The step's end: the next step's LSE / D to shared memory (read from the next
    // step on, after its top barrier), then on to it.
    auto end_step = [&] {
      if (kStatsInRegs && !one_stage && tid < kBM) {
        sLse[(stage ^ 1) * kBM + tid] = next_stats.x;
        sDs[(stage ^ 1) * kBM + tid] = next_stats.y;
      }
      h = h_next;
      mi = mi_next;
    };
    if constexpr (kBias) {
      if (skip_step) {  // CTA-uniform: P = 0 everywhere, nothing to accumulate
        late_prefetch();
        end_step();
        continue;
      }
    }
    uint64_t keep_bits = ~0ull;
    if constexpr (kDropout) {
      // Keys kv_base + 16 mt + 8 (c >> 1), query columns qcol + nt * 8 + 2t + (c & 1): per 16-key
      // block the pairs of lanes g, g ^ 1 share calls (dropout_fragment.h, rows = keys). Rolled
      // loops: inlined into the unrolled exp loop below, per-element calls had cost every dropout
      // kernel spill stores (ptxas sm_90, atomic-dQ d64 / d128 non-causal 172 -> 12 / 160 -> 92 B).
      // One loop over both 16-key blocks rather than key_rows_dropped per block (session 61, ptxas
      // sm_90: with attn_bias d64 424 -> 152 B, d128 420 -> 384; plain d128 104 -> 120).
      const uint32_t bh = drop_bh0 + static_cast<uint32_t>(h);
      const uint32_t q2t = static_cast<uint32_t>(m0 + qcol + 2 * t) + static_cast<uint32_t>(p.dropout_row_offset);
      const uint32_t k0 = static_cast<uint32_t>(kv_base) + static_cast<uint32_t>(p.dropout_col_offset);
      if (fragment_calls) {
        static_assert(2 * kMT * 4 <= 64 && kMT % 2 == 0, "one keep bit per element of the warp's tile");
#pragma unroll 1
        for (int step = 0; step < kMT; ++step) {  // (16-key block mt, query block pair jj)
          const int mt = step / (kMT / 2), jj = step % (kMT / 2);
          const uint32_t k = k0 + 16u * mt;
          const uint32_t dropped = key_rows_call_dropped(
              dropout_call(key.seed, key.offset, bh, q2t + 16u * jj + (g & 1), k), k, g & 1, keep_threshold);
          keep_bits &= ~(static_cast<uint64_t>(dropped) << (mt * kMT * 4 + 8 * jj));
        }
      } else {  // offsets off the 16 grid: per element
#pragma unroll 1
        for (int e = 0; e < 2 * kMT * 4; ++e) {  // e = (mt * kMT + nt) * 4 + c, as kept() reads it
          const int mt = e / (4 * kMT), nt = e / 4 % kMT, c = e % 4;
          if (!dropout_keep(key.seed, key.offset, bh, q2t + static_cast<uint32_t>(nt * 8 + (c & 1)),
                            k0 + static_cast<uint32_t>(mt * 16 + (c >> 1) * 8), keep_threshold))
            keep_bits &= ~(1ull << e);
        }
      }
    }
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < kMT; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int ql = qcol + nt * 8 + 2 * t + (c & 1);
          // sLs is +inf for rows past sq and fully masked rows: P = 0 there too.
          const float pv = fast_exp2(fmaf(st[mt][nt][c], scale_log2, -sLs[ql]));
          st[mt][nt][c] = pv;
        }
    auto kept = [&](int mt, int nt, int c) {
      return !kDropout || ((keep_bits >> ((mt * kMT + nt) * 4 + c)) & 1ull);
    };
    // Two adjacent 16 x 8 tiles (query tiles 2np, 2np + 1) of this warp's
    // [32 keys][kBM/kWQ queries] block, v[2h + r] = rows g + 8r of tile h packed,
    // into sP / sdS. (One stmatrix.x4 per pair instead, sm_90: no faster at d128,
    // 2-4% slower at d64 causal - H100 calls 13-14.)
    auto store_tile_pair = [&](T* tile, int mt, int np, const uint32_t(&v)[4]) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh)
#pragma unroll
        for (int r = 0; r < 2; ++r)
          *reinterpret_cast<uint32_t*>(tile + (krow + mt * 16 + g + 8 * r) * kSP + qcol + (2 * np + hh) * 8 + 2 * t) =
              v[2 * hh + r];
    };
    // P_drop^T -> sP (bf16/fp16).
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int np = 0; np < kMT / 2; ++np) {
        uint32_t v[4];
#pragma unroll
        for (int hh = 0; hh < 2; ++hh)
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int nt = 2 * np + hh;
            const float p0 = kept(mt, nt, 2 * r) ? st[mt][nt][2 * r] * rdrop : 0.f;
            const float p1 = kept(mt, nt, 2 * r + 1) ? st[mt][nt][2 * r + 1] * rdrop : 0.f;
            v[2 * hh + r] = MmaType<T>::pack(p0, p1);
          }
        store_tile_pair(sP, mt, np, v);
      }

    if (p.softcap > 0.f) {  // softcap: dS^T = P^T (1 - tanh^2) (dP^T - D), tanh recovered from P
      const float slope = alibi_slope(p.alibi_slopes, p.alibi_batch_stride, b, h), inv_cap = 1.f / p.softcap;
      const int rel0 = kv_base - m0 - qcol - 2 * t, diag32 = clamp_i32(diag);
      // kBiasKind >= 0: attn_bias of that kind, staged in sdS (compiled once per kind).
      auto pass = [&](auto bias_kind_c) {
        constexpr int kBiasKind = decltype(bias_kind_c)::value;
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int nt = 0; nt < kMT; ++nt)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              const int ql = qcol + nt * 8 + 2 * t + (c & 1);
              const int rel = rel0 + mt * 16 + (c >> 1) * 8 - nt * 8 - (c & 1);
              float mod = alibi_term(slope, diag32, rel);
              if constexpr (kBiasKind >= 0)  // the staged bias of (query ql, key krow + g + dk)
                mod += bias_smem<kBiasKind, kBN>(reinterpret_cast<const unsigned char*>(sdS), ql,
                                                 krow + mt * 16 + g + (c >> 1) * 8);
              st[mt][nt][c] *= softcap_dtanh(st[mt][nt][c], sLs[ql], mod, inv_cap);
            }
      };
      if constexpr (kBias)
        bias_dispatch(bias_kind(p.attn_bias_dtype), pass);
      else
        pass(std::integral_constant<int, -1>{});
    }

    // 2. dP^T = V dO^T, dS^T = P^T (dP_drop^T - D) -> sdS.
    {
      float dpt[2][kMT][4];
      gemm_keys_by_queries(dpt, v_a, operand(do_nk0, smem_u32(sdO), nk_off));
      if constexpr (kBias) __syncthreads();  // every warp is done with the bias tile in sdS
      // Query tiles outermost, each D pair read once: with the sdS stores in
      // between, ptxas re-read it for every (mt, r) - it cannot tell the float
      // loads from the packed-half stores - so each load waited behind a store
      // (d64: 32 of 40 LDS.64 a step). H100, calls 13-14: backward d64 +10-14%,
      // d128 +3-5%.
#pragma unroll
      for (int np = 0; np < kMT / 2; ++np) {
        float2 dd[2];
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) dd[hh] = *reinterpret_cast<const float2*>(sDv + qcol + (2 * np + hh) * 8 + 2 * t);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          uint32_t v[4];
#pragma unroll
          for (int hh = 0; hh < 2; ++hh)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              const int nt = 2 * np + hh;
              float ds[2];
#pragma unroll
              for (int j = 0; j < 2; ++j) {
                const int c = 2 * r + j;
                const float dpv = kept(mt, nt, c) ? dpt[mt][nt][c] * rdrop : 0.f;
                ds[j] = st[mt][nt][c] * (dpv - (j == 0 ? dd[hh].x : dd[hh].y));
              }
              v[2 * hh + r] = MmaType<T>::pack(ds[0], ds[1]);
            }
          store_tile_pair(sdS, mt, np, v);
        }
      }
    }
    __syncthreads();  // sP / sdS complete

    // 3./4. dV += P_drop^T dO, dK += dS^T Q: 32 key rows x kD/kWQ columns per warp.
    auto gemm_acc = [&](float (&acc)[2][kDTw][4], uint32_t a_base, const QdO& b) {
#pragma unroll
      for (int kk = 0; kk < kBM / 16; ++kk) {
        uint32_t a[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) ldmatrix_x4(a[mt], a_base + 2 * (mt * 16 * kSP + kk * 16));
#pragma unroll
        for (int dp = 0; dp < (kDTw + 1) / 2; ++dp) {
          uint32_t bfr[4];
          // Odd kDTw (d160, padded tiles): the last x4 also reads the next 8
          // columns (the row padding or the next warp's) and ignores them.
          ldmatrix_x4_trans(bfr, b.at(kk * 16, dp));
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            mma16816<T>(acc[mt][2 * dp], a[mt], bfr[0], bfr[1]);
            if (2 * dp + 1 < kDTw) mma16816<T>(acc[mt][2 * dp + 1], a[mt], bfr[2], bfr[3]);
          }
        }
      }
    };
    gemm_acc(acc_dv, p_a, operand(do_kn0, smem_u32(sdO), kn_off));
    gemm_acc(acc_dk, ds_a, operand(q_kn0, smem_u32(sQ), kn_off));
    late_prefetch();

    // 5. dQ (kBM x kD) += dS (kBM x kBN) K (kBN x kD), fp32 atomics.
    if constexpr (kDq) {
      constexpr int kDqT = Cfg::kDqT, kChunk = Cfg::kDqChunk;
      const int wm = warp % Cfg::kQM, wn = warp / Cfg::kQM;
      const uint32_t ds_km = smem_u32(sdS) + 2 * (wm * 32 + b_nk_lane_off<kSP>(lane));  // same lane map as [n][k]
      // This warp's tiles: rows row16 + 16 mt (kBM % 32 == 0: tile boundaries),
      // columns col8 + 8 i. One pointer per step and constant strides (launch.h):
      // recomputing the full tile offset per reduction cost ~150 integer
      // instructions per step (ncu source page, d128), ~15% of the loop.
      const int row16 = m0 + wm * 32;
      const int dqc = dq_accum_cols(d);
      const int row_stride = dq_accum_row_tile_stride(dqc);
      float* slab = dq_acc.base + h * dq_acc.head_stride;
#pragma unroll
      for (int ch = 0; ch < kDqT / kChunk; ++ch) {
        const int col8 = (wn * kDqT + ch * kChunk) * 8;
        const uint32_t k_kn = smem_u32(sK) + 2 * (col8 + b_kn_lane_off<kS>(lane));
        float acc[2][kChunk][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int i = 0; i < kChunk; ++i) acc[mt][i][0] = acc[mt][i][1] = acc[mt][i][2] = acc[mt][i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < kBN / 16; ++kk) {
          uint32_t a[2][4];
#pragma unroll
          for (int mt = 0; mt < 2; ++mt)
            ldmatrix_x4_trans(a[mt], ds_km + 2 * (kk * 16 * kSP + mt * 16));
#pragma unroll
          for (int dp = 0; dp < (kChunk + 1) / 2; ++dp) {
            uint32_t bfr[4];
            // Odd kChunk (d96, d160): the last x4 also reads the next 8 columns
            // (inside the padded row) and ignores them.
            ldmatrix_x4_trans(bfr, k_kn + 2 * (kk * 16 * kS + dp * 16));
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
              mma16816<T>(acc[mt][2 * dp], a[mt], bfr[0], bfr[1]);
              if (2 * dp + 1 < kChunk) mma16816<T>(acc[mt][2 * dp + 1], a[mt], bfr[2], bfr[3]);
            }
          }
        }
        float* dqa = slab + static_cast<int64_t>(row16 / 16) * row_stride + dq_accum_tile_offset(0, col8, dqc, lane);
        if (d == kD && row16 + 32 <= sq) {  // warp-uniform: all but tail tiles and padded head dims
          constexpr int kRowStride = kD / 8 * 128;  // dq_accum_row_tile_stride(kD): immediate offsets
#pragma unroll
          for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int i = 0; i < kChunk; ++i) dq_accum_add(dqa + mt * kRowStride + i * kDqAccumColTileStride, acc[mt][i]);
        } else {
          auto add = [&](int mt, int i) { dq_accum_add(dqa + mt * row_stride + i * kDqAccumColTileStride, acc[mt][i]); };
#pragma unroll
          for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int i = 0; i < kChunk; ++i)
              if (row16 + mt * 16 < sq && col8 + i * 8 < d) add(mt, i);
        }
      }
    }
    end_step();
  }
  cp_async_wait<0>();

  // Epilogue: this warp's 32 key rows x kD/2 columns of dK (scaled) and dV.
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int kv = kv_base + mt * 16 + r * 8;
      if (kv >= sk) continue;
      const int64_t kr = span.k_start + kv;
      T* dv_row = static_cast<T*>(p.dv) + b * p.dv_batch_stride + hk * p.dv_head_stride + kr * p.dv_row_stride;
      T* dk_row = static_cast<T*>(p.dk) + b * p.dk_batch_stride + hk * p.dk_head_stride + kr * p.dk_row_stride;
      // 2-byte stores on every path (any width, any alignment): a second, 4-byte
      // copy of these stores behind `vec` cost the d64 kernels 4-44 B of spill
      // (ptxas sm_90); this epilogue runs once per CTA.
      store_accumulator_row_elems<T>(dv_row, acc_dv[mt], r, dcol, t, dv, 1.f);
      store_accumulator_row_elems<T>(dk_row, acc_dk[mt], r, dcol, t, d, p.scale);
    }
}

// Deterministic dQ: one CTA per (64 query rows, batch, q head), warps own 16
// rows each (like the forward); recomputes S and dP per key tile.
// kBias: p.attn_bias is set (a template parameter for the reason at flash_bwd_dkdv2_kernel).
// one_stage: one K / V stage instead of two (Cfg::kDqKvStageBytes less shared memory: d128 on
// sm_86 / sm_89): tile n's copy is issued once every warp is done with tile n - 1, not overlapped.
template <typename T, int kD, bool kCausal, bool kDropout, bool kBias = false>
__global__ void __launch_bounds__(BwdConfig<kD>::kDqNWarps * 32)
    flash_bwd_dq_kernel(const BwdParams p, int num_m_blocks, bool vec, bool one_stage) {
  using Cfg = BwdConfig<kD>;
  constexpr int kBM = Cfg::kDqBM, kBN = Cfg::kDqBN, kS = Cfg::kS, kThreads = Cfg::kDqNWarps * 32;
  constexpr int kKSteps = kD / 16;
  constexpr int kNT = kBN / 8;
  constexpr int kDT = kD / 8;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  // Q, dO, the bias tiles [2] (kBias), then the K / V stages interleaved (K0 V0 K1 V1), so that
  // one_stage uses the first two only and every offset is a constant.
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + kBM * kS;
  unsigned char* sBias = reinterpret_cast<unsigned char*>(sdO + kBM * kS);  // [2][kDqBiasRawBytes]
  T* sK = reinterpret_cast<T*>(sBias + (kBias ? Cfg::kDqBiasBytes : 0));
  T* sV = sK + kBN * kS;
  constexpr int kKvStride = 2 * kBN * kS;  // from a K / V stage to the next

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t bh = blockIdx.x / num_m_blocks;
  int m_block = blockIdx.x % num_m_blocks;
  if (kCausal) m_block = num_m_blocks - 1 - m_block;
  const int b = static_cast<int>(bh / p.hq), h = static_cast<int>(bh % p.hq);
  const int hk = h / (p.hq / p.hkv);
  const int m0 = m_block * kBM;
  const int d = p.d, dv = p.d_v;  // q/k and v/dO head dims (d_v set: cuda_backend.cu)
  const SeqSpan span = seq_span(p, b);  // varlen: this sequence
  const int sq = span.len_q, sk = span.len_k;
  const int64_t diag = span.diag;
  if (m0 >= sq) return;  // only with varlen
  const bool has_window = window_active(kCausal, p.window_left, p.window_right);
  const bool has_mod = p.softcap > 0.f || p.alibi_slopes != nullptr;

  const T* qg = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
                (span.q_start + m0) * p.q_row_stride;
  const T* dog = static_cast<const T*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride +
                 (span.q_start + m0) * p.do_row_stride;
  int n_begin, n_end;
  key_tile_range<kCausal, kBM, kBN>(m0, sk, diag, has_window, p.window_left, p.window_right, n_begin, n_end);
  const T* kg = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride +
                (span.k_start + static_cast<int64_t>(n_begin) * kBN) * p.k_row_stride;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride +
                (span.k_start + static_cast<int64_t>(n_begin) * kBN) * p.v_row_stride;

  if (kBias && n_begin < n_end)  // its bias tile joins the K/V group
    issue_bias_tile<kBM, kBN, kThreads>(sBias, p.attn_bias, bias_kind(p.attn_bias_dtype),
                                        p.bias_batch_stride, p.bias_head_stride, p.bias_row_stride, p.bias_col_stride,
                                        b, h, m0, n_begin * kBN, sq - m0, sk - n_begin * kBN, tid);
  if (vec) {
    load_tile_async<T, kBM, kD, kThreads>(smem_u32(sQ), qg, p.q_row_stride, sq - m0, d, tid);
    load_tile_async<T, kBM, kD, kThreads>(smem_u32(sdO), dog, p.do_row_stride, sq - m0, dv, tid);
    if (n_begin < n_end) {
      load_tile_async<T, kBN, kD, kThreads>(smem_u32(sK), kg, p.k_row_stride, sk - n_begin * kBN, d, tid);
      load_tile_async<T, kBN, kD, kThreads>(smem_u32(sV), vg, p.v_row_stride, sk - n_begin * kBN, dv, tid);
    }
  } else {  // element-wise (rows_vec16)
    load_tile_elems<T, kBM, kD, kThreads>(smem_u32(sQ), qg, p.q_row_stride, sq - m0, d, tid);
    load_tile_elems<T, kBM, kD, kThreads>(smem_u32(sdO), dog, p.do_row_stride, sq - m0, dv, tid);
    if (n_begin < n_end) {
      load_tile_elems<T, kBN, kD, kThreads>(smem_u32(sK), kg, p.k_row_stride, sk - n_begin * kBN, d, tid);
      load_tile_elems<T, kBN, kD, kThreads>(smem_u32(sV), vg, p.v_row_stride, sk - n_begin * kBN, dv, tid);
    }
  }
  cp_async_commit();

  const int row_base = m0 + warp * 16 + g;
  const float* lse_g =
      static_cast<const float*>(p.lse) + b * p.lse_batch_stride + h * p.lse_head_stride + span.q_start;
  const BwdWorkspace layout = bwd_workspace_layout(p);
  const float* dsum = reinterpret_cast<const float*>(static_cast<const unsigned char*>(p.workspace) + layout.d_offset) +
                      bh * p.sq;
  float lse_l2[2], dsv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row_base + r * 8;
    lse_l2[r] = INFINITY;
    dsv[r] = 0.f;
    if (row < sq) {
      lse_l2[r] = lse_log2(lse_g[row]);
      dsv[r] = dsum[row];
    }
  }
  const float scale_log2 = p.scale * kLog2e;
  const uint32_t keep_threshold = kDropout ? dropout_keep_threshold(p.dropout_p) : 0u;
  const DropoutKey key = dropout_key(p);  // reads rng_state when set
  const uint32_t drop_bh = dropout_batch_head(p, b, h);  // Philox index: the dropout offsets added
  const bool fragment_calls = kDropout && query_rows_aligned(p.dropout_row_offset, p.dropout_col_offset);
  const float rdrop = kDropout ? 1.f / (1.f - p.dropout_p) : 1.f;

  float acc_dq[kDT][4];
#pragma unroll
  for (int i = 0; i < kDT; ++i) acc_dq[i][0] = acc_dq[i][1] = acc_dq[i][2] = acc_dq[i][3] = 0.f;

  // Tile n's K / V into K / V stage kv_stage (kg / vg start at tile n_begin).
  auto load_kv = [&](int n, int kv_stage) {
    const int nn = n * kBN;
    const int64_t rel = static_cast<int64_t>(n - n_begin) * kBN;
    if (vec) {
      load_tile_async<T, kBN, kD, kThreads>(smem_u32(sK + kv_stage * kKvStride), kg + rel * p.k_row_stride,
                                            p.k_row_stride, sk - nn, d, tid);
      load_tile_async<T, kBN, kD, kThreads>(smem_u32(sV + kv_stage * kKvStride), vg + rel * p.v_row_stride,
                                            p.v_row_stride, sk - nn, dv, tid);
    } else {  // p.* / threadIdx as in the forward's loop
      const int tx = threadIdx.x;
      load_tile_elems<T, kBN, kD, kThreads>(smem_u32(sK + kv_stage * kKvStride), kg + rel * p.k_row_stride,
                                            p.k_row_stride, sk - nn, p.d, tx);
      load_tile_elems<T, kBN, kD, kThreads>(smem_u32(sV + kv_stage * kKvStride), vg + rel * p.v_row_stride,
                                            p.v_row_stride, sk - nn, p.d_v, tx);
    }
  };
  for (int n = n_begin; n < n_end; ++n) {
    const int stage = (n - n_begin) & 1;  // the bias tile's; K / V's unless one_stage
    if (one_stage && n > n_begin) {  // every warp is done with tile n - 1's K / V
      __syncthreads();
      load_kv(n, 0);
      cp_async_commit();
    }
    cp_async_wait<0>();
    __syncthreads();
    if (kBias && n + 1 < n_end)  // tile n + 1's bias joins its K/V group
      issue_bias_tile<kBM, kBN, kThreads>(sBias + (stage ^ 1) * Cfg::kDqBiasRawBytes,
                                          p.attn_bias, bias_kind(p.attn_bias_dtype), p.bias_batch_stride,
                                          p.bias_head_stride, p.bias_row_stride, p.bias_col_stride, b, h, m0,
                                          (n + 1) * kBN, sq - m0, sk - (n + 1) * kBN, tid);
    if (!one_stage && n + 1 < n_end) load_kv(n + 1, stage ^ 1);
    cp_async_commit();
    // Boolean mask (attention_tiles.cuh): this warp's rows see nothing in this tile ->
    // dS = 0, no work; all visible -> no bias pass.
    bool bias_pass = kBias;
    if constexpr (kBias) {
      if (p.attn_bias_dtype == DType::kUInt8) {
        const MaskVote mv = bool_region_vote<kBN, 16, kBN>(
            sBias + stage * Cfg::kDqBiasRawBytes, warp * 16, 0, lane);
        if (mv.none) continue;
        bias_pass = !mv.all;
      }
    }
    const int kv_stage = one_stage ? 0 : stage;
    const T* sKs = sK + kv_stage * kKvStride;
    const T* sVs = sV + kv_stage * kKvStride;
    const int n0 = n * kBN;

    float s[kNT][4], dp[kNT][4];
#pragma unroll
    for (int i = 0; i < kNT; ++i)
#pragma unroll
      for (int c = 0; c < 4; ++c) s[i][c] = dp[i][c] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      uint32_t aq[4], ado[4];
      ldmatrix_x4(aq, a_addr<kS>(sQ, warp * 16, ks * 16, lane));
      ldmatrix_x4(ado, a_addr<kS>(sdO, warp * 16, ks * 16, lane));
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        uint32_t bk[4], bv[4];
        ldmatrix_x4(bk, b_addr_nk<kS>(sKs, np * 16, ks * 16, lane));
        ldmatrix_x4(bv, b_addr_nk<kS>(sVs, np * 16, ks * 16, lane));
        mma16816<T>(s[2 * np], aq, bk[0], bk[1]);
        mma16816<T>(s[2 * np + 1], aq, bk[2], bk[3]);
        mma16816<T>(dp[2 * np], ado, bv[0], bv[1]);
        mma16816<T>(dp[2 * np + 1], ado, bv[2], bv[3]);
      }
    }
    const bool need_mask = tile_needs_mask<kCausal>(n0, kBN, m0, sk, diag);
    if (has_window || has_mod || kBias) {  // features: scores modified / window bounds masked (-inf)
      const WindowOffsets w = window_offsets(kCausal, p.window_left, p.window_right, diag);
      // Element (row row_base + dr, col n0 + 2t + dc). Only P * (1 - tanh^2) is
      // needed here (no dV): softcap's factor rides in the exponent.
      auto each = [&](auto&& g) {
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int dc = nt * 8 + (c & 1), dr = (c >> 1) * 8;
            g(s[nt][c], dc - dr, dc);
          }
      };
      apply_score_mods(each, p.scale, p.softcap, alibi_slope_ptr(p.alibi_slopes, p.alibi_batch_stride, b, h), diag, w,
                       tile_needs_mask_window(n0, kBN, m0, kBM, sk, w), n0 + 2 * t - row_base, sk - n0 - 2 * t,
                       1.f / scale_log2);
      if constexpr (kBias) if (bias_pass) {  // + bias / scale (element: row warp * 16 + g + dr, col 2t + dc)
        const unsigned char* tile = sBias + stage * Cfg::kDqBiasRawBytes;
        const float inv_scale = 1.f / p.scale;
        bias_dispatch(bias_kind(p.attn_bias_dtype), [&](auto kind) {
          constexpr int kKind = decltype(kind)::value;
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
            for (int c = 0; c < 4; ++c)
              s[nt][c] +=
                  bias_smem<kKind, kBN>(tile, warp * 16 + g + (c >> 1) * 8, nt * 8 + 2 * t + (c & 1)) * inv_scale;
        });
      }
    }
    Philox4 drop_call{};
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
      const uint32_t cb = static_cast<uint32_t>(n0 + nt * 8) + static_cast<uint32_t>(p.dropout_col_offset);
      if constexpr (kDropout)  // rows = queries: one call per 32-column block (dropout_fragment.h)
        if (fragment_calls && query_rows_new_call(nt))
          drop_call = dropout_call(key.seed, key.offset, drop_bh,
                                   static_cast<uint32_t>(row_base) + static_cast<uint32_t>(p.dropout_row_offset),
                                   cb + 2u * t);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = row_base + r * 8;
        const int col0 = n0 + nt * 8 + 2 * t;
        bool keep0 = true, keep1 = true;
        if constexpr (kDropout) {
          uint32_t pair;
          if (fragment_calls) {
            pair = query_rows_pair(drop_call, r, nt);
          } else {  // offsets off the 16 / 32 grid: per element
            const uint32_t grow = static_cast<uint32_t>(row) + static_cast<uint32_t>(p.dropout_row_offset);
            const uint32_t c0 = cb + 2u * t;
            pair = dropout_draw(dropout_call(key.seed, key.offset, drop_bh, grow, c0), grow, c0) |
                   dropout_draw(dropout_call(key.seed, key.offset, drop_bh, grow, c0 + 1u), grow, c0 + 1u) << 8;
          }
          keep0 = (pair & 0xFFu) >= keep_threshold;
          keep1 = (pair >> 8) >= keep_threshold;
        }
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int c = 2 * r + j;
          float pv = fast_exp2(fmaf(s[nt][c], scale_log2, -lse_l2[r]));
          if (need_mask) {
            const int col = col0 + j;
            if (col >= sk || (kCausal && col > static_cast<int64_t>(row) + diag)) pv = 0.f;
          }
          const float dpv = (j == 0 ? keep0 : keep1) ? dp[nt][c] * rdrop : 0.f;
          s[nt][c] = pv * (dpv - dsv[r]);
        }
      }
    }
    // dQ += dS K
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      uint32_t a[4];
      pack_a_fragment<T>(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int dpi = 0; dpi < kDT / 2; ++dpi) {
        uint32_t bfr[4];
        ldmatrix_x4_trans(bfr, b_addr_kn<kS>(sKs, kk * 16, dpi * 16, lane));
        mma16816<T>(acc_dq[2 * dpi], a, bfr[0], bfr[1]);
        mma16816<T>(acc_dq[2 * dpi + 1], a, bfr[2], bfr[3]);
      }
    }
  }
  cp_async_wait<0>();

  T* dqg = static_cast<T*>(p.dq) + b * p.dq_batch_stride + h * p.dq_head_stride + span.q_start * p.dq_row_stride;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row_base + r * 8;
    if (row >= sq) continue;
    if (vec) store_accumulator_row<T>(dqg + row * p.dq_row_stride, acc_dq, r, 0, t, d, p.scale);
    else store_accumulator_row_elems<T>(dqg + row * p.dq_row_stride, acc_dq, r, 0, t, d, p.scale);
  }
}

// ORCHARD_BWD_TWO_PASS=1: d > 128 backward on the two-pass kernel even where the
// one-pass kernel fits (A/B and a fallback while the one-pass kernel is new).
inline bool bwd_force_two_pass() {
  static const bool force = [] {
    const char* e = std::getenv("ORCHARD_BWD_TWO_PASS");
    return e != nullptr && e[0] == '1';
  }();
  return force;
}

template <typename Kernel>
void set_smem(Kernel kernel, int bytes) {
  set_max_dynamic_smem(kernel, bytes);  // once per (kernel, device): launch.h
}

// The two-pass backward's dK/dV grid (d > 128 where the one-pass kernel does not fit): one CTA per
// (key block, batch, kv head); smem (plan_flash_bwd) holds the attn_bias tiles when there is a bias,
// and one Q / dO stage with one_stage.
template <typename T, int kD, bool kCausal, bool kDropout, int kMode, bool kAtomicDq>
void launch_bwd_two_pass(const BwdParams& p, bool one_stage, int smem, bool vec, cudaStream_t stream) {
  using Cfg = BwdConfig<kD>;
  const int num_n_blocks = (p.sk + Cfg::kBN - 1) / Cfg::kBN;
  const int64_t grid = static_cast<int64_t>(num_n_blocks) * p.b * p.hkv;
  if (grid == 0) return;
  auto kernel = pick_bias<kCausal>(p.attn_bias != nullptr, [](auto bias) {
    return flash_bwd_dkdv_kernel<T, kD, kCausal, kDropout, kMode, kAtomicDq, decltype(bias)::value>;
  });
  set_smem(kernel, smem);
  kernel<<<static_cast<unsigned>(grid), Cfg::kNWarps * 32, smem, stream>>>(p, num_n_blocks, vec, one_stage);
  check_launch("flash_bwd_dkdv_kernel");
}

// The kernels a backward call runs where shared memory is short, in this order: the one-pass
// kernel with two Q / dO stages (as measured on H100 / H200), else with one (A100: d64 / d128 need
// 174 / 173 KB with two of the 163 KB it allows, d192 / d256 fit with one); at d <= 128 then its
// compact tiles (BwdConfig2<kD, true>: sm_86 / sm_89's 99 KB at every such head dim, A100 with
// attn_bias at d64), two stages where they fit, else one; at d > 128 the two-pass kernels (sm_86 /
// sm_89: d160 on two Q / dO stages, d192 on one; d256 needs 107008 bytes even so). The deterministic
// dQ kernel drops to one K / V stage where two do not fit (d128 / d192 on 99 KB). Decided before anything
// is launched; a call that no kernel fits raises NotImplementedError naming the smallest kernel's bytes.
struct BwdPlan {
  bool one_pass = true, one_stage = false, compact = false;  // one_stage: the key pass's (either kernel)
  bool dq_one_stage = false;  // the deterministic dQ kernel's K / V
  int smem = 0;               // the key pass's bytes
  int dq_smem = 0;            // the deterministic dQ kernel's bytes
};

// The backward's pass over key blocks that computes dK (and, one-pass, dV) and, with
// kAtomicDq, adds dQ into dq_accum (else the dQ kernel computes dQ afterwards: deterministic
// mode). kAtomicDq = true is the one part of the sm80 backward whose code depends on the
// architecture (dq_accum_add: float4 reductions on sm_90): it is instantiated only in the
// generated flash_bwd_atomic_dq_*.cu files, compiled per architecture; every other kernel here
// is the same code on every architecture and compiles from one PTX (../arch_flags.cmake).
template <typename T, int kD, bool kCausal, bool kDropout, bool kAtomicDq, bool kCompact>
void launch_bwd_one_pass(const BwdParams& p, const BwdPlan& plan, bool vec, cudaStream_t stream) {
  using Cfg2 = BwdConfig2<kD, kCompact>;
  const int nb = (p.sk + Cfg2::kBN - 1) / Cfg2::kBN;
  const int64_t grid = static_cast<int64_t>(nb) * p.b * p.hkv;
  if (grid == 0) return;
  auto kernel = pick_bias<kCausal>(p.attn_bias != nullptr, [](auto bias) {
    return flash_bwd_dkdv2_kernel<T, kD, kCausal, kDropout, kAtomicDq, decltype(bias)::value, kCompact>;
  });
  set_smem(kernel, plan.smem);  // attn_bias: its tile in sdS and past the end
  kernel<<<static_cast<unsigned>(grid), 256, plan.smem, stream>>>(p, nb, causal_head_group(p), vec, plan.one_stage);
  check_launch("flash_bwd_dkdv2_kernel");
}
template <typename T, int kD, bool kCausal, bool kDropout, bool kAtomicDq>
void launch_bwd_key_pass(const BwdParams& p, const BwdPlan& plan, bool vec, cudaStream_t stream) {
  if (!plan.one_pass) {
    if constexpr (BwdConfig<kD>::kSplit)
      launch_bwd_two_pass<T, kD, kCausal, kDropout, kModeDK, kAtomicDq>(p, plan.one_stage, plan.smem, vec, stream);
    return;
  }
  if constexpr (kD <= 128) {
    if (plan.compact) return launch_bwd_one_pass<T, kD, kCausal, kDropout, kAtomicDq, true>(p, plan, vec, stream);
  }
  launch_bwd_one_pass<T, kD, kCausal, kDropout, kAtomicDq, false>(p, plan, vec, stream);
}

template <int kD>
BwdPlan plan_flash_bwd(const BwdParams& p) {
  using Cfg = BwdConfig<kD>;
  const bool bias = p.attn_bias != nullptr;
  const int limit = smem_optin_limit();
  auto fits = [&](int bytes) { return limit <= 0 || bytes <= limit; };  // unknown: left to the launch
  // The one-pass kernel's bytes with two Q / dO stages and with one.
  auto stage_bytes = [&](auto cfg) {
    using Cfg2 = decltype(cfg);
    const int two = Cfg2::kSmemBytes + (bias ? Cfg2::kBiasExtraBytes : 0);
    return std::pair<int, int>{two, two - 2 * Cfg2::kQdOTileBytes};
  };
  const bool may_one_pass = kD <= 128 || !bwd_force_two_pass();
  BwdPlan plan;
  auto take_one_pass = [&](std::pair<int, int> bytes, bool compact) {
    if (!may_one_pass || !fits(bytes.second)) return false;
    plan.compact = compact;
    plan.one_stage = !fits(bytes.first);
    plan.smem = plan.one_stage ? bytes.second : bytes.first;
    return true;
  };
  bool found = take_one_pass(stage_bytes(BwdConfig2<kD>{}), false);
  if constexpr (kD <= 128) {
    if (!found) found = take_one_pass(stage_bytes(BwdConfig2<kD, true>{}), true);
    if (!found) plan.smem = stage_bytes(BwdConfig2<kD, true>{}).second;  // the smallest kernel: reported below
  } else {
    if (!found) {  // the two-pass kernels, on one Q / dO stage where two do not fit (d192 on 99 KB)
      plan.one_pass = false;
      plan.smem = Cfg::kSmemBytes + (bias ? Cfg::kBiasBytes : 0);
      plan.one_stage = !fits(plan.smem);
      if (plan.one_stage) plan.smem -= Cfg::kQdOStageBytes;
    }
  }
  const int dq_bias = bias ? Cfg::kDqBiasBytes : 0;
  plan.dq_smem = Cfg::kDqSmemBytes + dq_bias;  // the deterministic dQ kernel
  if (p.deterministic && !fits(plan.dq_smem)) {
    plan.dq_one_stage = true;
    plan.dq_smem = Cfg::kDqSmemBytes - Cfg::kDqKvStageBytes + dq_bias;
  }
  const int need = std::max(plan.smem, p.deterministic ? plan.dq_smem : 0);
  if (!fits(need))
    throw Error(ErrorKind::kNotImplemented,
                "the CUDA backward at head dim bucket " + std::to_string(kD) + (bias ? " with attn_bias" : "") +
                    (p.deterministic ? " (deterministic)" : "") + " needs " + std::to_string(need) +
                    " bytes of shared memory per block; this GPU allows " + std::to_string(limit) +
                    " (no smaller kernel is built for it)");
  return plan;
}

template <typename T, int kD, bool kCausal, bool kDropout>
void launch_flash_bwd(const BwdParams& p) {
  using Cfg = BwdConfig<kD>;
  const BwdPlan plan = plan_flash_bwd<kD>(p);
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  const BwdWorkspace layout = bwd_workspace_layout(p);
  unsigned char* ws = static_cast<unsigned char*>(p.workspace);
  const int64_t rows = static_cast<int64_t>(p.b) * p.hq * p.sq;
  const bool vec = bwd_vec16(p);  // else the element-wise paths (rows_vec16)
  const bool atomic_dq = !p.deterministic;
  const bool own_dq_accum = p.dq_accum == nullptr;
  if (rows > 0) {
    launch_bwd_dot<T>(p, reinterpret_cast<float*>(ws + layout.d_offset), vec,
                      atomic_dq && own_dq_accum ? reinterpret_cast<float*>(ws + layout.dq_accum_offset) : nullptr,
                      stream);
  }

  if constexpr (Cfg::kSplit) {
    if (!plan.one_pass) launch_bwd_two_pass<T, kD, kCausal, kDropout, kModeDV, false>(p, plan.one_stage, plan.smem, vec, stream);
  }
  if (atomic_dq) launch_bwd_key_pass<T, kD, kCausal, kDropout, true>(p, plan, vec, stream);
  else launch_bwd_key_pass<T, kD, kCausal, kDropout, false>(p, plan, vec, stream);

  if (p.sink != nullptr && p.dsink != nullptr) run_bwd_dsink(p, reinterpret_cast<const float*>(ws + layout.d_offset));
  if (rows == 0 || !own_dq_accum) return;
  if (atomic_dq) {
    launch_bwd_convert_dq<T>(p, reinterpret_cast<const float*>(ws + layout.dq_accum_offset), vec, stream, false);
  } else {
    auto kernel = pick_bias<kCausal>(p.attn_bias != nullptr, [](auto bias) {
      return flash_bwd_dq_kernel<T, kD, kCausal, kDropout, decltype(bias)::value>;
    });
    set_smem(kernel, plan.dq_smem);  // attn_bias tiles; one_stage: one K / V stage
    const int num_m_blocks = (p.sq + Cfg::kDqBM - 1) / Cfg::kDqBM;
    kernel<<<static_cast<unsigned>(static_cast<int64_t>(num_m_blocks) * p.b * p.hq), Cfg::kDqNWarps * 32,
             plan.dq_smem, stream>>>(p, num_m_blocks, vec, plan.dq_one_stage);
    check_launch("flash_bwd_dq_kernel");
  }
}

template <typename T, int kD>
void run_flash_bwd(const BwdParams& p) {
  if (causal_runs_as_window(p)) return run_flash_bwd<T, kD>(causal_as_window(p));
  dispatch_causal_dropout(p.causal, p.dropout_p > 0.f, [&](auto causal, auto dropout) {
    launch_flash_bwd<T, kD, decltype(causal)::value, decltype(dropout)::value>(p);
  });
}

}  // namespace orchard::cuda
