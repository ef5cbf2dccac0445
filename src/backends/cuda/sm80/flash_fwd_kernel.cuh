// FlashAttention-2 style forward kernel (tensor cores, mma.sync m16n8k16).
//
// One CTA owns kBM = 16 * kNWarps query rows of one (batch, head); each warp
// owns 16 of those rows for the whole kernel, so the online-softmax state
// (row max m, row sum l) and the O accumulator live in that warp's registers
// and no cross-warp reduction is ever needed. The CTA walks the key/value rows
// in kBN-row tiles, double-buffered in shared memory with 16-byte cp.async:
// tile n+1 streams in while tile n is multiplied.
//
// The Q tile is row-padded by 8 elements (16 bytes): a row stride of
// (kD + 8) * 2 bytes puts the 8 rows one ldmatrix phase reads into 8 distinct
// 16-byte bank groups for every bucket (kD % 16 == 0), so ldmatrix is
// conflict-free without a swizzle. The K/V tiles, copied in every step, are
// XOR-swizzled instead at d64 and d128 (swizzled_tile.h: padded rows cost the
// cp.async writes 2.6x the shared-memory wavefronts).
//
// Features (params.h; no template parameter, so no extra instantiations): varlen
// (per-sequence rows via seq_span, CTAs past a sequence's end exit), the sliding
// window (key tiles outside [n_begin, n_end) are skipped; per-element masking only
// on tiles crossing a window bound), softcap and ALiBi (every tile, applied to S
// before the online softmax: apply_score_mods in attention_tiles.cuh), sinks (epilogue).
// The plain path pays one uniform branch per tile; ptxas: no new spills in the
// non-dropout kernels (d64/d128, sm_90). attn_bias / attn_mask: template parameter
// kBias (see the kernel; never with kCausal: launch.h, causal_runs_as_window), its tile
// staged in shared memory with the K/V tiles and added after softcap / ALiBi
// (attention_tiles.cuh).
// Any head dim / view (issue #16): `vec` (rows_vec16, launch.h) is false when some
// tensor's rows are not 16-byte vectors (d % 8 != 0, odd strides or base); then the
// tiles are loaded element-wise (load_tile_elems) and O stored element-wise, all
// in place. A kernel argument, so the branch costs the plain path no register.
#pragma once

#include <cuda_runtime.h>

#include <cmath>

#include "backends/cuda/sm80/attention_tiles.cuh"
#include "backends/cuda/device_attribute.h"
#include "backends/cuda/launch.h"
#include "backends/cuda/sm80/mma_utils.cuh"
#include "backends/cuda/dropout_fragment.h"
#include "backends/cuda/sm80/swizzled_tile.cuh"
#include "orchard/params.h"
#include "orchard/philox.h"

namespace orchard::cuda {

// Tile sizes per head-dim bucket (H100, bf16, b*s = 16k tokens; dev/cuda/NOTES.md).
//   kD <= 128: 4 warps x 32 rows (kMW = 2 m16 tiles per warp) = 128 query rows.
//              Each K/V fragment loaded with ldmatrix feeds two MMAs; with 16
//              rows per warp (8 warps) shared-memory bandwidth
//              was the limit. Measured s8k non-causal: d64 238 -> 305 TFLOP/s,
//              d128 286 -> 316 (same card, same call).
//   kD  > 128: 4 warps x 16 rows (the O accumulator alone is kD/2 registers).
//   Q stays in registers when that costs <= 32 registers, else it is re-read
//   from shared memory with ldmatrix each K tile.
// Measured and rejected (dev/cuda/NOTES.md): 8 warps x 16 rows (calls 1-2),
// skipping the O rescale when no row max moved (call 4), 64-row K/V tiles at
// d128 and 128-row tiles at d64 (calls 3 and 6; slower even without spills).
// Dropout on the fragment calls' grid is an AND on the packed P (cuda::query_rows_drop_packed), as
// in the sm90 forward. H100, session 65 (bench/sm80_kernel_ab.sh, same output bytes): 1.06-1.08x
// the drop on fp32 scores at d64 s4k, 1.01x at d128.

// kWide (d256, plain calls: no attn_bias, no dropout): FA2's H100 shape, 8 warps x 64-key tiles
// (128 query rows, 194 KB), where the device allows it (run_flash_fwd); the 4-warp 32-key
// kernel (97 KB) serves the other calls and smaller GPUs. H100, session 55
// (bench/sm80_kernel_ab.sh, both with the swizzled K / V tiles): forward 1.08-1.18x the 4-warp
// kernel, 1.01-1.07x FA2; 4 warps x 64 keys lost (0.88-0.99x). Not for dropout: those kernels
// spilled 36-76 B with it and were not timed.
template <int kD, bool kBias = false, bool kWide = false>
struct FwdConfig {
  static_assert(!kWide || (kD == 256 && !kBias), "the wide forward is d256's plain kernel");
  static constexpr int kMW = kD <= 128 ? 2 : 1;  // m16 tiles per warp
  // d192 without attn_bias: 8 warps x 16 rows = 128 query rows (FA2's d192 forward tile), so
  // each K/V tile feeds twice the rows of the 4-warp CTA. H200, session 13 (ORCHARD_SM90=0,
  // same run as SDPA flash): forward 0.86-0.92x FA2, from 0.66-0.78x with 4 warps (session 9).
  // With attn_bias the 8-warp CTA would need Q 51 KB + K/V 102 KB + 64 KB of bias tiles =
  // 217 KB, over an A100's 164 KB opt-in limit, so the bias kernels keep 4 warps (160 KB).
  // (d256 on 8 warps with its 32-key tiles measured 0.96-1.04x on an H100, session 54; with
  // 64-key tiles it is kWide.)
  static constexpr int kNWarps = kWide || (!kBias && kD > 160 && kD <= 192) ? 8 : 4;
  static constexpr int kBM = 16 * kMW * kNWarps;
  // d96: 64-key tiles (as FA2's d96 forward): Q is re-read by ldmatrix each tile
  // at d96 (48 registers), so longer tiles halve that traffic and the per-tile
  // barrier / softmax bookkeeping (issue #16: d96 was 0.90x FA2 with 32).
  static constexpr int kBN = kWide ? 64 : kD <= 64 ? 64 : (kD <= 96 ? 64 : (kD <= 128 ? 32 : (kD <= 192 ? 64 : 32)));
  static constexpr bool kQInRegs = kMW * kD / 16 * 4 <= 32;
  static constexpr int kS = kD + 8;  // padded smem row (elements)
  // K and V tiles (streamed every step) swizzled where the head dim allows
  // (swizzled_tile.h: whole-line cp.async writes); the Q tile stays padded.
  static constexpr bool kSwizzleKV = swizzle_streamed_tiles(kD);
  static constexpr int kKVTileBytes = TileOperand<kBN, kD, kS, kSwizzleKV>::tile_bytes();
  static constexpr int kSmemBytes = kBM * kS * 2 + 4 * kKVTileBytes;
  // attn_bias (launched with these bytes only with a bias): the (kBM x kBN) bias
  // tile as stored, double-buffered like K/V (attention_tiles.cuh).
  static constexpr int kBiasRawBytes = bias_tile_bytes<kBM, kBN>();
  static constexpr int kBiasBytes = 2 * kBiasRawBytes;
  static_assert(kSmemBytes % 16 == 0 && kBiasRawBytes % 16 == 0, "bias tiles: 16-byte aligned (bool_region_vote)");
};

// kBias: p.attn_bias is set. A template parameter (in the backward kernels too):
// with run-time bias branches ptxas spilled the plain forward in the merged tree
// (causal d128: 32 B st / 52 B ld; sm_90), and moving the bias code only moved the
// spill to another variant (7 placements tried). kBias = false: the pre-bias code.
// one_bias_stage (kBias): one bias tile buffer instead of two (Cfg::kBiasRawBytes less shared
// memory: d64 / d128 on sm_86 / sm_89's 99 KB): tile n's bias is copied at the top of step n,
// once every warp is done with tile n - 1's, and waited for there (not overlapped).
template <typename T, int kD, bool kCausal, bool kDropout, bool kBias = false, bool kWide = false>
__global__ void __launch_bounds__(FwdConfig<kD, kBias, kWide>::kNWarps * 32)
    flash_fwd_kernel(const FwdParams p, int num_m_blocks, bool vec, bool one_bias_stage) {
  using Cfg = FwdConfig<kD, kBias, kWide>;
  constexpr int kBM = Cfg::kBM, kBN = Cfg::kBN, kS = Cfg::kS, kThreads = Cfg::kNWarps * 32, kMW = Cfg::kMW;
  constexpr int kKSteps = kD / 16;  // k16 steps over the head dim
  constexpr int kNT = kBN / 8;      // n8 tiles of S
  constexpr int kDT = kD / 8;       // n8 tiles of O

  constexpr bool kSwz = Cfg::kSwizzleKV;
  constexpr int kTileBytes = Cfg::kKVTileBytes;  // one K or V stage
  constexpr int kStagePair = 2 * kTileBytes / static_cast<int>(sizeof(T));
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBM * kS;   // [2] stages
  T* sV = sK + kStagePair; // [2] stages
  unsigned char* const sBias = smem_raw + Cfg::kSmemBytes;  // kBias: [2] bias tiles (one_bias_stage: [1])

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  // Linear grid (m-block fastest: the CTAs of one head run together and share
  // its K/V in L2); b*hq may exceed gridDim.y's 65535, gridDim.x does not limit.
  const int64_t bh = blockIdx.x / num_m_blocks;
  int m_block = blockIdx.x % num_m_blocks;
  if (kCausal) m_block = num_m_blocks - 1 - m_block;  // longest rows first: better tail balance
  const int b = static_cast<int>(bh / p.hq), h = static_cast<int>(bh % p.hq);
  const int hk = h / (p.hq / p.hkv);
  const int m0 = m_block * kBM;
  const int d = p.d, dv = p.d_v;  // q/k and v/out head dims (d_v set: cuda_backend.cu)
  const int wrow = warp * 16 * kMW;  // this warp's first row inside the tile
  // Varlen: this sequence's rows and diagonal (seq_span); CTAs past its end exit.
  const SeqSpan span = seq_span(p, b);
  const int sq = span.len_q, sk = span.len_k;
  const int64_t diag = span.diag;
  if (m0 >= sq) return;  // only with varlen (the grid covers the longest sequence)
  // Features (window / softcap / ALiBi): CTA-uniform, checked once per tile.
  const bool has_window = window_active(kCausal, p.window_left, p.window_right);
  const bool has_mod = p.softcap > 0.f || p.alibi_slopes != nullptr;

  const T* qg = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
                (span.q_start + m0) * p.q_row_stride;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride + span.k_start * p.k_row_stride;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride + span.k_start * p.v_row_stride;

  // Key tiles [n_begin, n_end): the window skips the tiles no row of this query tile sees.
  int n_begin = 0;
  int n_end = (visible_key_end<kCausal>(m0, kBM, sk, diag) + kBN - 1) / kBN;
  if (has_window) {
    const WindowOffsets w = window_offsets(kCausal, p.window_left, p.window_right, diag);
    const int64_t lo = static_cast<int64_t>(m0) + w.lo, hi = static_cast<int64_t>(m0) + kBM - 1 + w.hi + 1;
    const int64_t key_begin = lo < 0 ? 0 : (lo > sk ? sk : lo), key_end = hi < 0 ? 0 : (hi > sk ? sk : hi);
    n_begin = static_cast<int>(key_begin / kBN);
    n_end = key_begin < key_end ? static_cast<int>((key_end + kBN - 1) / kBN) : n_begin;
  }
  kg += static_cast<int64_t>(n_begin) * kBN * p.k_row_stride;
  vg += static_cast<int64_t>(n_begin) * kBN * p.v_row_stride;

  // K zero-fills its columns past d (an inf there would meet Q's zero columns: TileStream).
  TileStream<T, kBN, kD, kThreads, kSwz, true> k_stream(kg, p.k_row_stride, d, tid);
  TileStream<T, kBN, kD, kThreads, kSwz> v_stream(vg, p.v_row_stride, dv, tid);
  if (kBias && n_begin < n_end)  // its bias tile joins the K/V group
    issue_bias_tile<kBM, kBN, kThreads>(sBias, p.attn_bias, bias_kind(p.attn_bias_dtype),
                                        p.bias_batch_stride, p.bias_head_stride, p.bias_row_stride, p.bias_col_stride,
                                        b, h, m0, n_begin * kBN, sq - m0, sk - n_begin * kBN, tid, true);
  if (vec) {
    load_tile_async<T, kBM, kD, kThreads>(smem_u32(sQ), qg, p.q_row_stride, sq - m0, d, tid);
    if (n_begin < n_end) {
      k_stream.load(smem_u32(sK), sk - n_begin * kBN);
      v_stream.load(smem_u32(sV), sk - n_begin * kBN);
    }
  } else {  // element-wise (rows_vec16)
    constexpr bool kCall = kD > 64;  // load_tile_elems_at: measured, ptxas sm_90
    load_tile_elems_at<kCall, T, kBM, kD, kThreads>(smem_u32(sQ), qg, p.q_row_stride, sq - m0, d, tid);
    if (n_begin < n_end) {
      load_tile_elems_at<kCall, T, kBN, kD, kThreads, kSwz>(smem_u32(sK), k_stream.tile, k_stream.row_stride,
                                                            sk - n_begin * kBN, k_stream.d, k_stream.tid);
      load_tile_elems_at<kCall, T, kBN, kD, kThreads, kSwz>(smem_u32(sV), v_stream.tile, v_stream.row_stride,
                                                            sk - n_begin * kBN, v_stream.d, v_stream.tid);
    }
  }
  cp_async_commit();

  const float scale_log2 = p.scale * kLog2e;
  float acc_o[kMW][kDT][4];
#pragma unroll
  for (int mt = 0; mt < kMW; ++mt)
#pragma unroll
    for (int i = 0; i < kDT; ++i) acc_o[mt][i][0] = acc_o[mt][i][1] = acc_o[mt][i][2] = acc_o[mt][i][3] = 0.f;
  float row_max[kMW][2], row_sum[kMW][2];  // max in scaled log2 units
#pragma unroll
  for (int mt = 0; mt < kMW; ++mt) row_max[mt][0] = row_max[mt][1] = -INFINITY, row_sum[mt][0] = row_sum[mt][1] = 0.f;

  // Shared-memory byte addresses of this lane's ldmatrix rows at tile origin (0, 0).
  const uint32_t q_lane = smem_u32(sQ) + 2 * ((wrow)*kS + a_lane_off<kS>(lane));
  using KV = TileOperand<kBN, kD, kS, kSwz>;
  const uint32_t k_lane = smem_u32(sK) + KV::nk_lane_offset(lane, 0);
  const uint32_t v_lane = smem_u32(sV) + KV::kn_lane_offset(lane, 0);
  if (kSwz && ((smem_u32(sK) | smem_u32(sV)) & 127)) __trap();  // TileOperand's XOR needs 128-byte aligned tiles
  // Q fragments in registers (kQInRegs), not with a bias: its kernels spilled
  // 68-72 B at d64 (ptxas, sm_90) with them, none without.
  constexpr bool kQRegs = Cfg::kQInRegs && !kBias;
  uint32_t qf[kQRegs ? kMW * kKSteps : 1][4];
  const int row_base = m0 + wrow + g;  // rows row_base + 16 mt + 8 r
  const uint32_t keep_threshold = kDropout ? dropout_keep_threshold(p.dropout_p) : 0u;
  const DropoutKey key = dropout_key(p);  // reads rng_state when set
  const uint32_t drop_bh = dropout_batch_head(p, b, h);  // Philox index: the dropout offsets added
  // Tiles start at multiples of 16 rows / 32 columns, so aligned offsets keep each lane's
  // Philox calls whole and in place (dropout_fragment.h, rows = queries); others draw per element
  // (CTA-uniform branch).
  const bool fragment_calls = kDropout && query_rows_aligned(p.dropout_row_offset, p.dropout_col_offset);

  for (int n = n_begin; n < n_end; ++n) {
    const int stage = (n - n_begin) & 1;
    const int bias_stage = one_bias_stage ? 0 : stage;
    cp_async_wait<0>();
    __syncthreads();
    if constexpr (kBias) {
      if (one_bias_stage && n > n_begin) {  // every warp is done with tile n - 1's bias
        issue_bias_tile<kBM, kBN, kThreads>(sBias, p.attn_bias, bias_kind(p.attn_bias_dtype), p.bias_batch_stride,
                                            p.bias_head_stride, p.bias_row_stride, p.bias_col_stride, b, h, m0,
                                            n * kBN, sq - m0, sk - n * kBN, tid, true);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
      }
      if (p.bias_row_stride == 0) {  // row broadcast: one row staged (attention_tiles.cuh)
        expand_bias_row<kBM, kBN, kThreads>(sBias + bias_stage * Cfg::kBiasRawBytes,
                                            bias_kind(p.attn_bias_dtype), tid);
        __syncthreads();
      }
    }
    if constexpr (kQRegs) {
      if (n == n_begin) {
#pragma unroll
        for (int mt = 0; mt < kMW; ++mt)
#pragma unroll
          for (int ks = 0; ks < kKSteps; ++ks)
            ldmatrix_x4(qf[mt * kKSteps + ks], q_lane + 2 * (mt * 16 * kS + ks * 16));
      }
    }
    if (kBias && !one_bias_stage && n + 1 < n_end)  // tile n + 1's bias joins its K/V group
      issue_bias_tile<kBM, kBN, kThreads>(sBias + (stage ^ 1) * Cfg::kBiasRawBytes, p.attn_bias,
                                          bias_kind(p.attn_bias_dtype), p.bias_batch_stride, p.bias_head_stride,
                                          p.bias_row_stride, p.bias_col_stride, b, h, m0, (n + 1) * kBN, sq - m0,
                                          sk - (n + 1) * kBN, tid, true);
    if (n + 1 < n_end) {
      const int nn = (n + 1) * kBN;
      k_stream.advance();
      v_stream.advance();
      if (!vec) {  // element-wise (rows_vec16); p.* / threadIdx as above (with the
        // streams' d and tid the d64 kernel spilled 4 B)
        const int tx = threadIdx.x;
        load_tile_elems<T, kBN, kD, kThreads, kSwz>(smem_u32(sK) + (stage ^ 1) * kTileBytes, k_stream.tile,
                                                    p.k_row_stride, sk - nn, p.d, tx);
        load_tile_elems<T, kBN, kD, kThreads, kSwz>(smem_u32(sV) + (stage ^ 1) * kTileBytes, v_stream.tile,
                                                    p.v_row_stride, sk - nn, p.d_v, tx);
      } else {
        k_stream.load(smem_u32(sK) + (stage ^ 1) * kTileBytes, sk - nn);
        v_stream.load(smem_u32(sV) + (stage ^ 1) * kTileBytes, sk - nn);
      }
    }
    cp_async_commit();
    // Boolean mask (attention_tiles.cuh): this warp's rows see nothing in this tile ->
    // no work (the state is what processing it would leave).
    // (Skipping the bias pass on all-visible tiles as well made ptxas spill this
    // kernel - 16-60 B at d128, sm_90, in four placements tried - so it runs.)
    if constexpr (kBias) {
      if (p.attn_bias_dtype == DType::kUInt8 &&
          bool_region_vote<kBN, 16 * kMW, kBN>(sBias + bias_stage * Cfg::kBiasRawBytes, wrow, 0, lane)
              .none)
        continue;
    }
    const KV k_op = KV::from_lane(k_lane, stage * kTileBytes), v_op = KV::from_lane(v_lane, stage * kTileBytes);
    const int n0 = n * kBN;

    // S = Q K^T
    float s[kMW][kNT][4];
#pragma unroll
    for (int mt = 0; mt < kMW; ++mt)
#pragma unroll
      for (int i = 0; i < kNT; ++i) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      uint32_t a[kMW][4];
#pragma unroll
      for (int mt = 0; mt < kMW; ++mt) {
        if constexpr (kQRegs) {
#pragma unroll
          for (int i = 0; i < 4; ++i) a[mt][i] = qf[mt * kKSteps + ks][i];
        } else {
          ldmatrix_x4(a[mt], q_lane + 2 * (mt * 16 * kS + ks * 16));
        }
      }
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        uint32_t bfr[4];
        ldmatrix_x4(bfr, k_op.at(np * 16, ks));
#pragma unroll
        for (int mt = 0; mt < kMW; ++mt) {
          mma16816<T>(s[mt][2 * np], a[mt], bfr[0], bfr[1]);
          mma16816<T>(s[mt][2 * np + 1], a[mt], bfr[2], bfr[3]);
        }
      }
    }

    // Masking only where the tile crosses the key end or the causal diagonal.
    // Features: every tile when softcap / ALiBi change the scores, else the
    // tiles that cross a window bound.
    if (has_window || has_mod || kBias) {
      const WindowOffsets w = window_offsets(kCausal, p.window_left, p.window_right, diag);
      // Element (row row_base + dr, col n0 + 2t + dc).
      auto each = [&](auto&& g) {
#pragma unroll
        for (int mt = 0; mt < kMW; ++mt)
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              const int dc = nt * 8 + (c & 1), dr = mt * 16 + (c >> 1) * 8;
              g(s[mt][nt][c], dc - dr, dc);
            }
      };
      apply_score_mods<-16 * kMW, kBN>(each, p.scale, p.softcap,
                                       alibi_slope_ptr(p.alibi_slopes, p.alibi_batch_stride, b, h), diag, w,
                                       tile_needs_mask_window(n0, kBN, m0, kBM, sk, w), n0 + 2 * t - row_base,
                                       sk - n0 - 2 * t);
      if constexpr (kBias) {  // + bias / scale, after softcap and ALiBi (-inf stays -inf)
        const unsigned char* tile = sBias + bias_stage * Cfg::kBiasRawBytes;
        const float inv_scale = 1.f / p.scale;
        bias_dispatch(bias_kind(p.attn_bias_dtype), [&](auto kind) {
          constexpr int kKind = decltype(kind)::value;
#pragma unroll
          for (int mt = 0; mt < kMW; ++mt)
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
              for (int c = 0; c < 4; ++c)
                s[mt][nt][c] +=
                    bias_smem<kKind, kBN>(tile, wrow + mt * 16 + (c >> 1) * 8 + g, nt * 8 + 2 * t + (c & 1)) *
                    inv_scale;
        });
      }
    } else if (tile_needs_mask<kCausal>(n0, kBN, m0, sk, diag)) {
#pragma unroll
      for (int mt = 0; mt < kMW; ++mt)
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int col = n0 + nt * 8 + 2 * t + (c & 1);
            const int64_t row = row_base + mt * 16 + (c >> 1) * 8;
            if (col >= sk || (kCausal && col > row + diag)) s[mt][nt][c] = -INFINITY;
          }
    }

    // Online softmax (fp32, exp2 with the log2e-prescaled scale).
    float corr_r[kMW][2];
#pragma unroll
    for (int mt = 0; mt < kMW; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(row_max[mt][r], mx * scale_log2);
        const float m_use = m_new == -INFINITY ? 0.f : m_new;  // fully masked so far: keep exps at 0
        const float corr = fast_exp2(row_max[mt][r] - m_use);
        corr_r[mt][r] = corr;
        row_max[mt][r] = m_new;
        row_sum[mt][r] *= corr;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
          s[mt][nt][2 * r] = fast_exp2(fmaf(s[mt][nt][2 * r], scale_log2, -m_use));
          s[mt][nt][2 * r + 1] = fast_exp2(fmaf(s[mt][nt][2 * r + 1], scale_log2, -m_use));
          sum += s[mt][nt][2 * r] + s[mt][nt][2 * r + 1];
        }
        row_sum[mt][r] += sum;  // normalizer uses the probabilities before dropout
      }
#pragma unroll
    for (int mt = 0; mt < kMW; ++mt)
#pragma unroll
      for (int i = 0; i < kDT; ++i) {
        acc_o[mt][i][0] *= corr_r[mt][0];
        acc_o[mt][i][1] *= corr_r[mt][0];
        acc_o[mt][i][2] *= corr_r[mt][1];
        acc_o[mt][i][3] *= corr_r[mt][1];
      }

    // The tile's first dropout column (the call's offset added).
    const uint32_t gcol0 = kDropout ? static_cast<uint32_t>(n0) + static_cast<uint32_t>(p.dropout_col_offset) : 0u;
    if constexpr (kDropout) {
      if (!fragment_calls) {
        // Offsets that split a fragment's calls (context-parallel blocks off the 16 / 32 grid): per element,
        // in a rolled loop recording the dropped elements.
        uint32_t dropped[(kMW * kNT * 4 + 31) / 32] = {};
#pragma unroll 1
        for (int e = 0; e < kMW * kNT * 4; ++e) {
          const int mt = e / (kNT * 4), nt = e / 4 % kNT, c = e % 4;
          const uint32_t grow = static_cast<uint32_t>(row_base + mt * 16 + (c >> 1) * 8) +
                                static_cast<uint32_t>(p.dropout_row_offset);
          const uint32_t gcol = gcol0 + static_cast<uint32_t>(nt * 8 + 2 * t + (c & 1));
          dropped[e / 32] |= static_cast<uint32_t>(!dropout_keep(key.seed, key.offset, drop_bh, grow, gcol, keep_threshold))
                             << (e % 32);
        }
#pragma unroll
        for (int mt = 0; mt < kMW; ++mt)
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              const int e = (mt * kNT + nt) * 4 + c;
              if ((dropped[e / 32] >> (e % 32)) & 1u) s[mt][nt][c] = 0.f;
            }
      }
    }

    // O += P V, with P repacked to 16-bit A fragments for the whole tile first.
    uint32_t pa[kMW][kBN / 16][4];
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk)
#pragma unroll
      for (int mt = 0; mt < kMW; ++mt) pack_a_fragment<T>(pa[mt][kk], s[mt][2 * kk], s[mt][2 * kk + 1]);
    if constexpr (kDropout) {
      if (fragment_calls) {
        // One call per 32-column block of each row pair (dropout_fragment.h, rows = queries), then an
        // AND per packed pair of P (query_rows_drop_packed; the Hopper forward's drop, session 63).
#pragma unroll
        for (int mt = 0; mt < kMW; ++mt) {
          const uint32_t grow = static_cast<uint32_t>(row_base + mt * 16) + static_cast<uint32_t>(p.dropout_row_offset);
          Philox4 calls[kBN / 32];
          query_rows_calls<kBN>(calls, key.seed, key.offset, drop_bh, grow, gcol0, t);
          query_rows_drop_packed<kBN>(pa[mt], calls, keep_threshold);
        }
      }
    }
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
#pragma unroll
      for (int dp = 0; dp < kDT / 2; ++dp) {
        uint32_t bfr[4];
        ldmatrix_x4_trans(bfr, v_op.at(kk * 16, dp));
#pragma unroll
        for (int mt = 0; mt < kMW; ++mt) {
          mma16816<T>(acc_o[mt][2 * dp], pa[mt][kk], bfr[0], bfr[1]);
          mma16816<T>(acc_o[mt][2 * dp + 1], pa[mt][kk], bfr[2], bfr[3]);
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // other threads' cp.async into this warp's sQ rows (no key tile) have landed

  // Epilogue: normalize, write LSE, stage O through this warp's own sQ rows
  // (only this warp ever read them) and store 16-byte vectors.
  const float drop_scale = kDropout ? 1.f / (1.f - p.dropout_p) : 1.f;
  float* lse = static_cast<float*>(p.lse) + b * p.lse_batch_stride + h * p.lse_head_stride + span.q_start;
  // Attention sink (params.h): exp(sink) joins every row's denominator.
  const float sink_l2 = p.sink != nullptr ? p.sink[h] * kLog2e : -INFINITY;
  T* sO = sQ + wrow * kS;
#pragma unroll
  for (int mt = 0; mt < kMW; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = row_sum[mt][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      // Only an exact 0 sum means "no visible key": a NaN one (a NaN in the row's q) stays NaN in
      // out and LSE, as on the CPU and the decode kernels.
      float inv = l != 0.f ? drop_scale / l : 0.f;
      float lse_v = l != 0.f ? (row_max[mt][r] + log2f(l)) * kLn2 : -INFINITY;
      if (sink_l2 != -INFINITY) {  // the row's sum in units of max(row max, sink)
        const float mx = row_max[mt][r];
        const float top = fmaxf(mx, sink_l2);
        const float a = l > 0.f ? exp2f(mx - top) : 0.f;
        const float lt = l * a + exp2f(sink_l2 - top);
        inv = drop_scale * a / lt;
        lse_v = (top + log2f(lt)) * kLn2;
      }
#pragma unroll
      for (int i = 0; i < kDT; ++i) {
        acc_o[mt][i][2 * r] *= inv;
        acc_o[mt][i][2 * r + 1] *= inv;
      }
      const int row = row_base + mt * 16 + r * 8;
      if (t == 0 && row < sq) lse[row] = lse_v;
    }
#pragma unroll
    for (int i = 0; i < kDT; ++i) {
      *reinterpret_cast<uint32_t*>(sO + (mt * 16 + g) * kS + i * 8 + 2 * t) =
          MmaType<T>::pack(acc_o[mt][i][0], acc_o[mt][i][1]);
      *reinterpret_cast<uint32_t*>(sO + (mt * 16 + g + 8) * kS + i * 8 + 2 * t) =
          MmaType<T>::pack(acc_o[mt][i][2], acc_o[mt][i][3]);
    }
  }
  __syncwarp();
  T* og = static_cast<T*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride + span.q_start * p.o_row_stride;
  constexpr int kChunks = kD / 8;
  constexpr int kRows = 16 * kMW;
  if (vec) {
#pragma unroll
    for (int i = 0; i < (kRows * kChunks + 31) / 32; ++i) {
      const int idx = lane + i * 32;
      if (idx < kRows * kChunks) {
        const int r = idx / kChunks, c = idx % kChunks;
        const int row = m0 + wrow + r;
        if (row < sq && c * 8 < dv)
          *reinterpret_cast<uint4*>(og + row * p.o_row_stride + c * 8) =
              *reinterpret_cast<const uint4*>(sO + r * kS + c * 8);
      }
    }
  } else {  // element-wise: any width, any alignment
#pragma unroll 4
    for (int idx = lane; idx < kRows * kD; idx += 32) {
      const int r = idx / kD, c = idx % kD;
      const int row = m0 + wrow + r;
      if (row < sq && c < dv) og[row * p.o_row_stride + c] = sO[r * kS + c];
    }
  }
}

// The smallest forward kernel's bytes (the narrow one at d256; with attn_bias, one bias stage):
// what a call of this bucket needs.
template <int kD>
int sm80_fwd_smem_bytes(bool bias) {
  return bias ? FwdConfig<kD, true>::kSmemBytes + FwdConfig<kD, true>::kBiasRawBytes : FwdConfig<kD, false>::kSmemBytes;
}

template <typename T, int kD, bool kCausal, bool kDropout, bool kBias, bool kWide = false>
void launch_flash_fwd_kernel(const FwdParams& p) {
  using Cfg = FwdConfig<kD, kBias, kWide>;
  auto kernel = flash_fwd_kernel<T, kD, kCausal, kDropout, kBias, kWide>;
  const int num_m_blocks = (p.sq + Cfg::kBM - 1) / Cfg::kBM;
  const int64_t grid = static_cast<int64_t>(num_m_blocks) * p.b * p.hq;
  if (grid == 0) return;
  // attn_bias: its staged tiles after the rest (only then: the plain path keeps its occupancy);
  // one stage of them where two exceed the device's opt-in (d64 / d128 on sm_86 / sm_89).
  const int limit = smem_optin_limit();
  const bool one_bias_stage = kBias && limit > 0 && Cfg::kSmemBytes + Cfg::kBiasBytes > limit;
  const int smem = Cfg::kSmemBytes + (kBias ? (one_bias_stage ? Cfg::kBiasRawBytes : Cfg::kBiasBytes) : 0);
  set_max_dynamic_smem(kernel, smem);  // once per (kernel, device): launch.h
  kernel<<<static_cast<unsigned>(grid), Cfg::kNWarps * 32, smem, static_cast<cudaStream_t>(p.stream)>>>(
      p, num_m_blocks, fwd_vec16(p), one_bias_stage);
  check_launch("flash_fwd_kernel");
}

// Whether a d256 call takes the wide kernel: a plain call (no attn_bias, no dropout) on a device
// whose shared-memory opt-in holds it (not an A100's 163 KB or an sm_86's 99 KB).
inline bool sm80_fwd256_wide(const FwdParams& p) {
  return p.attn_bias == nullptr && !(p.dropout_p > 0.f) &&
         smem_optin_limit() >= FwdConfig<256, false, true>::kSmemBytes;
}

template <typename T, int kD, bool kCausal, bool kDropout>
void launch_flash_fwd(const FwdParams& p) {
  if constexpr (kD == 256 && !kDropout)
    if (sm80_fwd256_wide(p)) return launch_flash_fwd_kernel<T, kD, kCausal, false, false, true>(p);
  pick_bias<kCausal>(p.attn_bias != nullptr, [&](auto bias) {
    launch_flash_fwd_kernel<T, kD, kCausal, kDropout, decltype(bias)::value>(p);
  });
}

template <typename T, int kD>
void run_flash_fwd(const FwdParams& p) {
  if (causal_runs_as_window(p)) return run_flash_fwd<T, kD>(causal_as_window(p));
  dispatch_causal_dropout(p.causal, p.dropout_p > 0.f, [&](auto causal, auto dropout) {
    launch_flash_fwd<T, kD, decltype(causal)::value, decltype(dropout)::value>(p);
  });
}

}  // namespace orchard::cuda
