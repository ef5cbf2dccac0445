// FlashAttention backward main kernel for sm_90a (H100/H200): warp-specialized, TMA + mbarrier
// + wgmma, on our own PTX wrappers (sm90.cuh).  Compile ONLY with
// -gencode=arch=compute_90a,code=sm_90a.  The pre-pass D = rowsum(dO * O) and the dQ convert
// are the sm80 path's kernels (flash_bwd_sm90_run.cuh runs the three in order).
//
// One tile = one 128-key block of one (batch, kv head); its CTA loops over the q heads of the
// GQA group and over their 64-row query tiles, so dK / dV of the group are summed in registers
// (deterministic, no dK/dV atomics, as the sm80 dK/dV kernel does).  A CTA runs one tile, or
// in the persistent launch (non-causal d128, d64 up to 2k queries: launch_flash_bwd_sm90_main)
// tiles blockIdx.x, + gridDim.x, ...: the producer loads the next tile's first Q / dO stage while
// the consumers finish this one and its K / V once they release them (kv_empty), and the
// ring's stage / phase and the dS^T buffer parity count steps across the CTA's tiles.
// 3 warpgroups:
//   WG2 (warp 8) producer: K and V once (TMA), then per query tile Q and dO (TMA, a ring of Cfg::kStages)
//               plus the tile's LSE (log2 units; +inf for rows past sq / rows that see no key)
//               and D (0 past sq) written by its 32 lanes; setmaxnreg.dec 24, warps 9-11 idle.
//   WG0, WG1    consumers, 64 keys each (setmaxnreg.inc 240: dK + dV + S^T + dP^T are 192 live
//               fp32 accumulators), everything key-major.  (The producer sits in the last WG
//               only so the consumers' warp ranks start at 0.)
//     S^T  = K Q^T        wgmma ss (both K-major over d)            64 x 64 fp32
//     dP^T = V dO^T       wgmma ss                                   64 x 64 fp32
//     P^T  = exp2(S^T * scale log2e - LSE),  dS^T = P^T (dP^T - D)   (registers)
//     dV  += P^T dO       wgmma rs (P^T as the A fragments; dO MN-major: transposed read)
//     dK  += dS^T Q       wgmma rs (Q MN-major)
//     dS^T -> smem (16-bit, 128B-swizzled rows of 64 queries), then
//     dQ_partial = dS K   wgmma ss, A = dS MN-major (transposed read of dS^T), B = K MN-major;
//                         d128: each WG 64 of the 128 dQ columns over all 128 keys (needs both
//                         WGs' dS: a 256-thread named barrier); d64 / d96 (kDqAlternate): WG (it % 2)
//                         all d columns over all 128 keys, the other WG none that step (it
//                         arrives at the dQ WG's barrier once its dS^T rows are written);
//                         otherwise each d64 WG all 64 columns over its own 64 keys (a
//                         WG-local barrier; twice the adds).
//     dQ_partial -> fp32 dq_accum (launch.h's permuted 16 x 8 tile layout: the wgmma
//                   accumulator of one warp's 16 x 8 block IS a lane's float4 there), either
//                   (kBulkDq, the default) staged per warp in smem in that order and added by
//                   one 4 KB cp.reduce.async.bulk, or by a 16-byte atomicAdd per lane and tile
//                   (bulk measured 1.04-1.32x faster on the H200, bench/NOTES.md);
//                   bwd_convert_dq_kernel scales and converts it.
//     d64 (Cfg::kPipelined): S^T of the next step is issued right after this step's dQ GEMM and
//     runs while the dQ partial goes out; dP^T is issued before the softmax and runs during it.
//     d128 (kDkAfterDq): dK += dS^T Q is issued after the dQ GEMM and runs while the dQ partial
//     is staged; the causal kernels run the step in two copies, the masked one on the diagonal
//     steps only (kSplitMask: the registers for it).
//   dK (times the scale) and dV are stored from registers at the end (rows < sk).
//
// d96 (its own bucket since session 28: 64 < d <= 96) runs the d64 form (kDqAlternate: the dQ
// WG's partial is 64 x 96) on 64B-swizzled 32-column chunks, so that S^T / dP^T run over 6 k16
// slices and dV / dK / dQ as n96: no GEMM work on padding (the d128 bucket it ran before did 128
// columns of work for 96).
// Supported: T = bf16 / fp16, kD (the head-dim bucket) in {64, 96, 128} with any run-time d == d_v,
// d <= kD, d % 8 == 0 (the tensor maps have the true width, TMA zero-fills the columns past d;
// dq_accum has d columns; dK / dV stores write d), scale > 0, causal (any causal_offset:
// both alignments) or not, GQA / MQA, BSHD / BHSD views with unit last stride and 16-byte
// strides (TMA).  Deterministic mode (p.deterministic): the kOrderedDq kernels (d == kD, no
// score modifiers; their dQ adds in key-block order, bwd_sm90_write_dq_ordered).
// Sliding window, softcap, ALiBi (params.h; the sm80 kernels' helpers, sm80/attention_tiles.cuh):
// the kFeatures instantiations (the launcher picks them by score_mods_active), inside which
// each feature is a run-time, CTA-uniform branch.  Measured on the H200 (bench/NOTES.md,
// session 11): with the features as run-time branches of the plain kernels, the plain backward
// lost 2-5 % (d64: 5 %); as a template flag the kFeatures=false kernels compile to the same
// SASS as before the features (`dev/cuda/sass_diff.sh -b 9bcc618 -m 'Lb0EEEv=EEv' FILE 90a
// -DORCHARD_WITH_SM90=1`; the kFeatures=true ones: -b a4b0831 -m 'Lb1EEEv=EEv', the code
// verified on the H200).  The window narrows each CTA's
// query tiles to those with a row that sees one of its keys (none: dK = dV = 0); S^T goes
// through apply_score_mods (softcap, ALiBi, window / causal / key-end mask) before P^T;
// softcap's gradient dS^T = P^T (1 - tanh^2) (dP^T - D) takes tanh from the fp32 P^T
// (softcap_dtanh) and parks P^T (1 - tanh^2) as 16 bits in the step's dS^T slots until dP^T
// is ready, so no extra register array lives across the dP^T GEMM.
// attn_bias (the kBias kernels): a row-broadcast one read from global memory in the feature pass
// (attn_bias_fragment.cuh); a dense one (rows of its own, sm90_dense_bias) as each step's 64 x 128
// tile, loaded by TMA with the step's Q / dO on the same full barrier into a buffer per stage
// (Cfg::kOffBias; released with the stage) and added to S^T in the feature pass
// (add_bias_tile_keys, attn_bias_tiles.cuh).
// Dropout (ORCHARD_SM90_DROPOUT; sm90_bwd_call_supported says which calls), in the kFeatures
// kernels: each step's draws made before its dP^T GEMM is issued (d64: while it runs; the
// step's comment says why), pairs of lanes sharing each Philox call (cuda/dropout_fragment.h, rows =
// keys), dS^T = P^T (Z dP^T / (1 - p) - D) with Z applied as AND masks (the packed form below),
// the dropped elements of the 16-bit P^T zeroed for the dV GEMM and 1 / (1 - p) applied to dV in the
// epilogue.
// Varlen in its segment form (segments.cuh), in the kFeatures kernels: each key tile's query tiles
// narrowed to its keys' segments, other segments' elements of S^T masked per step.
// The dispatch (cuda_backend.cu, sm90_bwd_applies) sends d > 128 to flash_bwd_sm90_wide.cuh (the
// same features but varlen, the same kFeatures flag) and everything else this kernel does not
// cover to the sm80 kernels.
#pragma once
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "backends/cuda/launch.h"
#include "backends/cuda/pdl.cuh"
#include "backends/cuda/sm80/attention_tiles.cuh"
#include "backends/cuda/sm90/attn_bias_fragment.cuh"
#include "backends/cuda/sm90/attn_bias_tiles.cuh"
#include "backends/cuda/sm90/bulk_reduce.cuh"
#include "backends/cuda/sm90/dropout_scores.cuh"
#include "backends/cuda/sm90/flash_bwd_sm90_launch.h"
#include "backends/cuda/sm90/flash_fwd_sm90_launch.h"
#include "backends/cuda/sm90/fragment_store.cuh"
#include "backends/cuda/sm90/ordered_add.cuh"
#include "backends/cuda/sm90/segments.cuh"
#include "backends/cuda/sm90/sm90.cuh"
#include "backends/cuda/sm90/sm90_call_support.h"
#include "backends/cuda/sm90/tma_host.h"
#include "orchard/params.h"

#ifndef ORCHARD_SM90_BWD_DK_AFTER_DQ  // an A/B switch for kDkAfterDq below
#define ORCHARD_SM90_BWD_DK_AFTER_DQ 1
#endif
// An A/B switch for the causal d128 kernels: the step in masked / unmasked copies (kSplitMask)
// with kDkAfterDq as in the non-causal ones.
#ifndef ORCHARD_SM90_BWD_CAUSAL_DK_AFTER_DQ
#define ORCHARD_SM90_BWD_CAUSAL_DK_AFTER_DQ 1
#endif

// The persistent launch of the d64 / d128 kernels (launch_flash_bwd_sm90_main: one CTA per SM,
// each running tiles blockIdx.x, + gridDim.x, ...; not the deterministic mode's kernels).
#ifndef ORCHARD_SM90_BWD_PERSISTENT
#define ORCHARD_SM90_BWD_PERSISTENT 1
#endif

// An A/B knob for BwdSm90Config<64>::kStages.  4 against 3 (the H200, session 26, 3 rounds):
// 0.96-1.05x, mostly below: 3 stays.
#ifndef ORCHARD_SM90_BWD64_STAGES
#define ORCHARD_SM90_BWD64_STAGES 3
#endif

// An A/B switch for the d64 kernels' kDqAlternate (the step below; the H200, session 27,
// ab_bwd.sh, medians of 3 alternating rounds: non-causal +6-8 %, causal +5-24 % (s4k 0.99x)).
#ifndef ORCHARD_SM90_BWD64_DQ_ALTERNATE
#define ORCHARD_SM90_BWD64_DQ_ALTERNATE 1
#endif

// The dK / dV epilogue's stores (this kernel's and the wide one's): 1 (default) 16-byte stores
// after a quad transpose (fragment_store.cuh), 0 the 4-byte stores as the fragments are held
// (an A/B switch). The H200 (session 31, ab_bwd.sh, medians of 3 alternating rounds, checks
// passed): d128 +5.5 % at s1k, causal +8.7 / +5.1 / +2.1 % at s1k / s2k / s4k, 1.00-1.01x
// elsewhere; d64 +0-2.5 %; d96 +0.4-3.8 % (causal s16k 0.98x). The wide kernel (d192 / d256)
// was not A/B'd (its kernel-bench form came later the same session and has not run yet):
// through the package its backward went from 0.91 / 0.93 to 0.96 / 0.98x cuDNN at s2k
// non-causal / causal (two grids, spread up to 20 %).
#ifndef ORCHARD_SM90_BWD_STORE16
#define ORCHARD_SM90_BWD_STORE16 1
#endif

// An A/B knob for BwdSm90Config<96>::kStages.  3 against 2 (the H200, session 28, 3 rounds):
// -4 to +1.5 %: 2 stays.
#ifndef ORCHARD_SM90_BWD96_STAGES
#define ORCHARD_SM90_BWD96_STAGES 2
#endif

// The dropout step of the kFeatures kernels in packed form: cuda::key_rows_draws before the dP^T
// wait, AND masks after it (cuda::key_rows_pair_mask on the 16-bit P^T pairs, key_rows_element_mask on
// dP^T's fp32 bits; 704 SASS instructions per lane and step against 1020 for drop bits, the draws' 464
// included: dev/cuda/dropout_step_sass.cu). H100, session 65 (bench/sm90/ab_bwd.sh, dropout 0.1):
// d64 1.15-1.25x the drop-bits form, d128 1.10-1.18x (causal s1k / s2k 0.99 / 0.96x, s4k+ 1.04-1.12x).
// The wide kernel (d192 / d256) keeps drop bits: packed lost there (0.92-0.99x).

namespace orchard::sm90 {

template <int kD>
struct BwdSm90Config {
  static_assert(kD == 64 || kD == 96 || kD == 128, "sm90 backward: d in {64, 96, 128}");
  static constexpr int kHeadDim = kD;
  static constexpr int kBN = 128;  // keys per CTA (2 consumer WGs x 64)
  static constexpr int kBM = 64;   // query rows per step
  // Q / K / V / dO tiles in column chunks of one swizzle row each (cuda::sm90_tile_swizzle_bytes).
  static constexpr int kSwizzleBytes = cuda::sm90_tile_swizzle_bytes(kD);
  static constexpr int kChunkCols = kSwizzleBytes / 2;
  static constexpr int kChunks = kD / kChunkCols;
  static constexpr int kSlicesPerChunk = kSwizzleBytes / 32;  // k16 slices (32 bytes) per chunk row
  // Q / dO stages.  d64: 3 (the H200, session 18, medians of 4 alternating runs: +2-8 % non-causal,
  // +0-5 % causal over 2); d96: 2; d128: 2 (3 fit in 227 KB but spill and lost 3-8 %).
  static constexpr int kStages = kD == 64 ? ORCHARD_SM90_BWD64_STAGES : kD == 96 ? ORCHARD_SM90_BWD96_STAGES : 2;
  // d64: the next step's S^T runs during this step's dQ add, dP^T during the softmax (registers
  // allow it at d64 only: at d96 ptxas spills 40-52 B and serializes the wgmmas).  The H200,
  // session 19, medians of 3 alternating runs over the FA grid: non-causal +3-6 %, causal -1 to
  // +8 % (S^T prefetch alone: +2.5-4 % / -2 to +8 %).
  static constexpr bool kPipelined = kD == 64;
  static constexpr bool kDqSplitN = kD == 128;  // see the header comment
  static constexpr int kDqN = kDqSplitN ? kD / 2 : kD;  // dQ columns per consumer WG
  static constexpr int kKVBytes = kBN * kD * 2, kKVChunkBytes = kBN * kSwizzleBytes;
  static constexpr int kQBytes = kBM * kD * 2, kQChunkBytes = kBM * kSwizzleBytes;
  // One k16 slice of an MN-major operand (16 rows of K): the start address moves 16 rows.
  static constexpr int kMnSliceBytes = 16 * kSwizzleBytes;
  static constexpr int kDsBytes = kBN * kBM * 2;  // dS^T: 128 key rows x 64 queries (128 B)
  // dS^T buffers, one per Q / dO stage (step it uses buffer it % kStages): a WG that writes
  // step it + kStages's dS^T has waited for that step's Q / dO stage, which every consumer warp
  // released only after its dQ GEMM of step it, so no GEMM still reads the buffer (the d64
  // kDqAlternate step reads the other WG's rows).
  static constexpr int kDsBuffers = kStages;
  static constexpr int kOffV = kKVBytes;
  static constexpr int kOffQ = 2 * kKVBytes;
  static constexpr int kOffDo = kOffQ + kStages * kQBytes;
  static constexpr int kOffDs = kOffDo + kStages * kQBytes;
  static constexpr int kOffLse = kOffDs + kDsBuffers * kDsBytes;         // float [kStages][kBM]
  static constexpr int kOffD = kOffLse + kStages * kBM * 4;      // float [kStages][kBM]
  // kBulkDq: each consumer warp stages its 16 x kDqN dQ partial in dq_accum's order here.
  static constexpr int kDqWarpBytes = 16 * kDqN * 4;
  static constexpr int kOffDqStage = kOffD + kStages * kBM * 4;
  static constexpr int kOffBars = kOffDqStage + 8 * kDqWarpBytes;
  static constexpr int kSmemBytes = kOffBars + 128 + 1024;  // + 1024: align the base up
  // The kBias kernels with a dense bias (attn_bias_tiles.cuh): a bias tile of the step's 64 queries
  // x the 128 keys (<= 2 bytes each) per Q / dO stage, loaded and released with it, past the
  // barriers (d128: 231,552 of the 232,448 bytes).
  static constexpr int kBiasStageBytes = kBM * kBN * 2;
  static constexpr int kOffBias = kOffBars + 128;
  static constexpr int kSmemBytesDenseBias = kOffBias + kStages * kBiasStageBytes + 1024;
  static_assert(kSmemBytesDenseBias <= 232448, "the sm_90 opt-in shared memory limit (227 KB)");
  static_assert(kOffBias % 128 == 0 && kBiasStageBytes % 128 == 0, "TMA destinations: 128-byte aligned boxes");
  static constexpr int kThreads = 384;  // producer WG + 2 consumer WGs
  static_assert(8 + 16 * kStages + 24 <= 128, "barriers: kv_full, full / empty per stage, dq_full / dq_empty, kv_empty");
  // kOrderedDq: consumer warp (wg, wi)'s dQ partial slot in the stage area, so that the slots
  // of one step lie in dq_accum's order (d128: rows 16 wi, columns 64 wg of a 64 x 128 block:
  // one contiguous bulk add; d64: both WGs' partials cover rows 16 wi, all 64 columns: WG1's
  // warp wi adds its partial to WG0's in slot wi).
  __host__ __device__ static constexpr int ordered_dq_slot(int wg, int wi) { return kDqSplitN ? 2 * wi + wg : wi; }
  static constexpr int kOrderedDqArrivals = kDqSplitN ? 8 : 4;  // consumer warps that arrive at dq_full
  static_assert(kSmemBytes <= 232448, "the sm_90 opt-in shared memory limit (227 KB)");
};

// TMA maps of one backward call (built on the host, passed as __grid_constant__).
struct BwdSm90Maps {
  CUtensorMap q, k, v, dout;
  CUtensorMap bias;  // a dense attn_bias (d <= 128 kBias kernels, attn_bias_tiles.cuh); else unset
};

__device__ __forceinline__ float bwd_ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// One half of a packed 16-bit pair as float (hi = 1: the upper half).
template <typename T>
__device__ __forceinline__ float unpack_lo_hi(uint32_t w, int hi);
template <>
__device__ __forceinline__ float unpack_lo_hi<__nv_bfloat16>(uint32_t w, int hi) {
  return __uint_as_float(hi ? (w & 0xffff0000u) : (w << 16));
}
template <>
__device__ __forceinline__ float unpack_lo_hi<__half>(uint32_t w, int hi) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(hi ? (w >> 16) : (w & 0xffffu))));
}

// 64 x 64 fp32 accumulator (layout in wgmma_mma.cuh) -> 4 k16 A fragments of 16-bit pairs.
template <typename T>
__device__ __forceinline__ void acc_to_afrag(const float (&s)[32], uint32_t (&a)[4][4]) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
#pragma unroll
    for (int q = 0; q < 4; ++q) a[kk][q] = pack_pair<T>(s[8 * kk + 2 * q], s[8 * kk + 2 * q + 1]);
}

// The per-CTA work: query tiles [m_begin, m_end) of each q head of the group.
struct BwdTileRange {
  int m_begin, n_m;
};
__device__ __forceinline__ BwdTileRange bwd_tile_range(int n0, int sq, int64_t coff, bool causal, int kBM) {
  const int m_end = (sq + kBM - 1) / kBM;
  int m_begin = 0;
  if (causal) {
    const int64_t first = static_cast<int64_t>(n0) - coff;  // first query row that sees key n0
    if (first > sq - 1) return {0, 0};
    m_begin = first <= 0 ? 0 : static_cast<int>(first / kBM);
  }
  return {m_begin, m_end - m_begin};
}
// The same under a sliding window (w: window_offsets, the causal bound folded in): the query
// tiles with a row that sees some key of [n0, n0 + kBN), as the sm80 dK/dV kernels count them.
__device__ __forceinline__ BwdTileRange bwd_window_tile_range(int n0, int kBN, int sq, cuda::WindowOffsets w,
                                                              int kBM) {
  const int64_t first = static_cast<int64_t>(n0) - w.hi, last = static_cast<int64_t>(n0) + kBN - 1 - w.lo + 1;
  const int64_t r0 = first < 0 ? 0 : (first > sq ? sq : first), r1 = last < 0 ? 0 : (last > sq ? sq : last);
  const int m_begin = static_cast<int>(r0 / kBM);
  const int m_end = r0 < r1 ? static_cast<int>((r1 + kBM - 1) / kBM) : m_begin;
  return {m_begin, m_end - m_begin};
}

// CTA -> (batch, kv head, key block): kGrouped (causal, and the ordered-dQ kernels) runs key
// blocks in ascending order over groups of head_group heads (launch.h causal_cta_coord, the sm80
// order: causal's heaviest first); otherwise all key blocks of one head, then the next head.
struct BwdCta {
  int b, hk, n_block;
};
// `tile`: the linear tile index (the CTA's index, or a persistent CTA's current tile).
template <bool kGrouped>
__device__ __forceinline__ BwdCta bwd_sm90_cta(const BwdParams& p, int num_n_blocks, int head_group,
                                               int64_t tile) {
  int64_t head;
  int n_block;
  if (kGrouped) {
    const cuda::CtaCoord c = cuda::causal_cta_coord(tile, num_n_blocks, head_group, static_cast<int64_t>(p.b) * p.hkv);
    head = c.head;
    n_block = c.n_block;
  } else {
    head = tile / num_n_blocks;
    n_block = static_cast<int>(tile % num_n_blocks);
  }
  return {static_cast<int>(head / p.hkv), static_cast<int>(head % p.hkv), n_block};
}

// The backward's mbarriers at `bars`, 8 bytes each (both kernels): kv_full, then full[kStages]
// (the producer warp's 32 lanes + the TMA's tx), then empty[kStages] (one arrival per consumer warp);
// kOrderedDq's dq_full / dq_empty; kv_empty (the persistent kernels).
template <int kStages>
struct BwdSm90Barriers {
  uint32_t bars;
  __device__ __forceinline__ uint32_t kv_full() const { return bars; }
  __device__ __forceinline__ uint32_t full(int s) const { return bars + 8 + 8 * s; }
  __device__ __forceinline__ uint32_t empty(int s) const { return bars + 8 + 8 * kStages + 8 * s; }
  // kOrderedDq (flash_bwd_sm90.cuh only): a step's dQ partials staged (one arrival per consumer
  // warp), and the dQ writer done reading them (one arrival).
  __device__ __forceinline__ uint32_t dq_full() const { return bars + 8 + 16 * kStages; }
  __device__ __forceinline__ uint32_t dq_empty() const { return bars + 16 + 16 * kStages; }
  // A persistent CTA's K / V tiles read for the last time (one arrival per consumer warp): the
  // producer may load the next tile's.
  __device__ __forceinline__ uint32_t kv_empty() const { return bars + 24 + 16 * kStages; }
};

// The producer warp (warp 8): K and V of key tile n0 once (TMA), then per step (query tile of
// tr, q head of the GQA group) Q and dO by TMA into the stage ring plus the tile's LSE (log2
// units; +inf for rows past sq / rows that see no key) and D (0 past sq) written by its 32
// lanes, into the shared memory at sbase (the CTA's aligned base: Cfg's kOff* layout, both
// kernels; offsets from one base keep the producer's 24 registers for its loop).  Barriers:
// BwdSm90Barriers<kStages> at sbase + Cfg::kOffBars.  A persistent CTA calls it once per
// tile: it_base = the steps of its earlier tiles (the ring's stage and phase run on across tiles),
// kv_round = those tiles' count; from the second tile on, the first step's Q / dO go out first
// (their stage is free before the last tile ends), then the K / V tiles once the consumers
// have released the previous ones (kv_empty).
// kDenseBias (the d <= 128 kBias kernels, with a dense bias: the caller's run-time check): each
// step's bias tile (its 64 queries x the 128 keys, attn_bias_tiles.cuh) comes with its Q / dO, on
// the same full barrier, into the stage's bias buffer.
template <typename Cfg, bool kDenseBias = false>
__device__ __forceinline__ void bwd_sm90_produce(const BwdSm90Maps& maps, const BwdParams& p, const float* dsum,
                                                 uint32_t sbase, int b, int hk, int group, int n0,
                                                 BwdTileRange tr, int lane, int it_base = 0, int kv_round = 0) {
  constexpr int kBM = Cfg::kBM, kChunks = Cfg::kChunks;
  const int sq = p.sq;
  const BwdSm90Barriers<Cfg::kStages> bar{sbase + Cfg::kOffBars};
  const uint32_t kv_full = bar.kv_full();
  const int n_iters = tr.n_m * group;
  const float log2e = 1.4426950408889634f;
  auto load_kv = [&] {
    if (lane == 0) {
      mbarrier_arrive_expect_tx(kv_full, 2 * Cfg::kKVBytes);
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        tma_load_4d(sbase + c * Cfg::kKVChunkBytes, &maps.k, kv_full, Cfg::kChunkCols * c, n0, hk, b);
        tma_load_4d(sbase + Cfg::kOffV + c * Cfg::kKVChunkBytes, &maps.v, kv_full, Cfg::kChunkCols * c, n0, hk, b);
      }
    }
  };
  // The step cursor (advanced, not divided: d64's 3 stages made the divisions spill the
  // producer's 24 registers): q head h, query tile m of tr, ring stage s and its phase ph.
  int h = hk * group, m = tr.m_begin, s = it_base % Cfg::kStages;
  uint32_t ph = (it_base / Cfg::kStages) & 1;
  auto load_step = [&] {
    const int m0 = m * kBM;
    mbarrier_wait(bar.empty(s), ph ^ 1);
    const float* lse_g = static_cast<const float*>(p.lse) + b * p.lse_batch_stride + h * p.lse_head_stride;
    const float* d_g = dsum + (static_cast<int64_t>(b) * p.hq + h) * sq;
#pragma unroll
    for (int r = lane; r < kBM; r += 32) {
      const int row = m0 + r;
      float l = INFINITY, dd = 0.f;
      if (row < sq) {
        l = lse_g[row];
        // A row that sees no key (LSE -inf): P must be 0, not exp2(+inf).
        l = l == -INFINITY ? INFINITY : l * log2e;
        dd = d_g[row];
      }
      const uint32_t at = sbase + 4 * (s * kBM + r);
      asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(at + Cfg::kOffLse), "f"(l) : "memory");
      asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(at + Cfg::kOffD), "f"(dd) : "memory");
    }
    if (lane == 0) {
      // A dense bias: boxes of 32 bytes of keys x the 64 rows (past sq / sk: zeros).
      const int bias_bytes = kDenseBias ? cuda::bias_elem_bytes(cuda::bias_kind(p.attn_bias_dtype)) : 0;
      mbarrier_arrive_expect_tx(bar.full(s), 2 * Cfg::kQBytes + bias_bytes * kBM * Cfg::kBN);
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const uint32_t at = sbase + s * Cfg::kQBytes + c * Cfg::kQChunkBytes;
        tma_load_4d(at + Cfg::kOffQ, &maps.q, bar.full(s), Cfg::kChunkCols * c, m0, h, b);
        tma_load_4d(at + Cfg::kOffDo, &maps.dout, bar.full(s), Cfg::kChunkCols * c, m0, h, b);
      }
      if constexpr (kDenseBias)
        load_bias_tile<kBM, Cfg::kBN>(sbase + Cfg::kOffBias + s * Cfg::kBiasStageBytes, &maps.bias, bar.full(s), p,
                                      bias_bytes, n0, m0, h, b);
    } else {
      mbarrier_arrive(bar.full(s));
    }
    if (++m == tr.m_begin + tr.n_m) {
      m = tr.m_begin;
      ++h;
    }
    if (++s == Cfg::kStages) {
      s = 0;
      ph ^= 1;
    }
  };
  int it = 0;
  if (kv_round == 0) {
    if (lane == 0) {
      tma_prefetch_desc(&maps.q);
      tma_prefetch_desc(&maps.dout);
      if constexpr (kDenseBias) tma_prefetch_desc(&maps.bias);
    }
  } else {
    load_step();
    ++it;
    mbarrier_wait(bar.kv_empty(), (kv_round - 1) & 1);
  }
  load_kv();
  for (; it < n_iters; ++it) load_step();
}

// kOrderedDq's dQ writer (warp 9): per step, once the 8 consumer warps have staged their dQ
// partials (dq_full), it waits for this key block's turn at the step's (q head, 64-row block)
// (ordered_add.cuh: turn = the CTA's key block n; the key blocks that reach a query block are
// 0..n_max, causal or not, and a CTA's launch comes after n - 1's, so the wait ends), adds the
// 64 x kD block by one bulk add, releases the stage (dq_empty) once the add has read it, and
// passes the turn once the add has completed.  The consumers compute the next step while this
// one waits: the wait stays off their critical path unless the writer falls a step behind.
template <typename Cfg>
__device__ __forceinline__ void bwd_sm90_write_dq_ordered(const BwdParams& p, float* dq_accum, int* turns,
                                                          uint32_t stage, uint32_t bars, int b, int hk, int group,
                                                          int n_block, BwdTileRange tr, int lane) {
  constexpr int kBM = Cfg::kBM, kD = Cfg::kHeadDim;
  const BwdSm90Barriers<Cfg::kStages> bar{bars};
  const int sq = p.sq, n_iters = tr.n_m * group;
  const cuda::DqAccumSlabs acc = cuda::bwd_dq_accum_slabs(p, dq_accum, b, kD);
  for (int it = 0; it < n_iters; ++it) {
    const int h = hk * group + it / tr.n_m;
    const int m0 = (tr.m_begin + it % tr.n_m) * kBM;
    mbarrier_wait(bar.dq_full(), it & 1);
    if (lane == 0) {
      const int tiles16 = (min(kBM, sq - m0) + 15) / 16;  // 16-row tiles with a row < sq
      int* turn = turns + (static_cast<int64_t>(b) * p.hq + h) * cuda::dq_turn_blocks(sq) + m0 / cuda::kDqTurnRows;
      wait_turn(turn, n_block);
      bulk_reduce_add_f32(acc.base + h * acc.head_stride + cuda::dq_accum_tile_offset(m0, 0, kD, 0), stage,
                          tiles16 * 16 * kD * 4);
      tma_store_commit();
      tma_store_wait_read<0>();
      mbarrier_arrive(bar.dq_empty());
      tma_store_wait_all<0>();
      pass_turn(turn);
    }
    __syncwarp();
  }
}

// kBulkDq: dQ partials go to dq_accum by cp.reduce.async.bulk (one 4 KB add per warp and
// step, issued by one lane from smem) instead of 16-byte atomicAdds from every lane.
// kFeatures: window / softcap / ALiBi compiled in (the header says why it is a template flag).
// kPaddedD: d < kD (the true d's dq_accum columns and dK / dV stores); a template flag because the
// run-time form cost the d == kD kernels registers (d128: 8-12 B more spills, causal fwd+bwd
// -5 % on the H200, session 12), so those compile to the same code as before it.
// kOrderedDq (the deterministic mode; with kBulkDq, no features, d == kD): the consumers stage
// each step's dQ partial and the dQ writer (bwd_sm90_write_dq_ordered) adds it in key-block
// order; the other kernels compile to the same code as before it.
// kBias (with kFeatures): an attn_bias added in the feature pass, row-broadcast or dense (the
// header says how each is read).  A flag of its own: compiled into the feature kernels (a first,
// per-element form of the reads) it raised their spills (bf16 d128: 12-76 B -> 156-188 B); as a
// flag those compile to the same code as before it (the kBias kernels: 52-116 B).
template <typename T, int kD, bool kCausal, bool kBulkDq, bool kFeatures, bool kPaddedD, bool kOrderedDq = false,
          bool kBias = false>
__global__ void __launch_bounds__(384, 1)
    flash_bwd_sm90_kernel(const __grid_constant__ BwdSm90Maps maps, const BwdParams p, const float* dsum,
                          float* dq_accum, int num_n_blocks, int head_group) {
  using Cfg = BwdSm90Config<kD>;
  // Launched as the pre-pass's programmatic dependent (launch_flash_bwd_sm90_main): D and the
  // cleared dq_accum are that kernel's output.
  cuda::pdl_wait_primary();
  const int d_cols = kPaddedD ? p.d : kD;  // columns of dq_accum, dK and dV
  constexpr int kBM = Cfg::kBM, kBN = Cfg::kBN;
  // setmaxnreg moves registers inside the CTA's launch allocation (384 x 168 = 64512): 128 x 24
  // + 256 x 240 = 64512.  A larger sum never completes (the consumers' inc waits forever:
  // the first GPU run hung with 32 / 240).  ptxas allocates each role's code for its count.
  constexpr uint32_t kProducerRegs = 24, kConsumerRegs = 240;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t sbase = (smem_u32(smem_raw) + 1023u) & ~1023u;
  uint8_t* const gbase = smem_raw + (sbase - smem_u32(smem_raw));  // generic pointer to sbase
  const uint32_t sK = sbase, sV = sbase + Cfg::kOffV;
  const uint32_t sQ = sbase + Cfg::kOffQ, sDo = sbase + Cfg::kOffDo, sDs = sbase + Cfg::kOffDs;
  float* const lse_s = reinterpret_cast<float*>(gbase + Cfg::kOffLse);
  float* const d_s = reinterpret_cast<float*>(gbase + Cfg::kOffD);
  const uint32_t bars = sbase + Cfg::kOffBars;
  const BwdSm90Barriers<Cfg::kStages> bar{bars};
  const uint32_t kv_full = bar.kv_full();

  const int group = p.hq / p.hkv;
  const int sq = p.sq, sk = p.sk;
  const int64_t coff = p.causal_offset;
  // Features (window / softcap / ALiBi): CTA-uniform run-time flags.
  const bool has_window = kFeatures && cuda::window_active(kCausal, p.window_left, p.window_right);
  // A dense attn_bias comes through the Q / dO stages (the producer's kDenseBias); a row-broadcast
  // one is read from global memory in the feature pass (attn_bias_fragment.cuh).  Re-read from the
  // parameters where tested: held across the consumers' loop, the flag cost registers.
  auto dense_bias = [&] { return kBias && cuda::sm90_dense_bias(p); };
  // Tiles (one 128-key block of one (batch, kv head)): the CTA runs tiles blockIdx.x,
  // + gridDim.x, ...: one per CTA when the grid covers them, several in the persistent launch
  // (launch_flash_bwd_sm90_main; never for kOrderedDq, whose turn order assumes a CTA per tile).
  // kOrderedDq: the grouped order for both masks (head_group from ordered_head_group).
  // (A grid of one CTA per tile has at most 2^31 - 1 of them.)
  const int num_tiles = static_cast<int>(min(static_cast<int64_t>(num_n_blocks) * p.b * p.hkv, int64_t{INT32_MAX}));
  struct Work {
    BwdCta cta;
    int n0;
    BwdTileRange tr;
    int n_iters;  // steps: query tiles x q heads of the group
  };
  auto work_of = [&](int tile) {
    const BwdCta cta = bwd_sm90_cta<kCausal || kOrderedDq>(p, num_n_blocks, head_group, tile);
    const int n0 = cta.n_block * kBN;
    BwdTileRange tr =
        has_window
            ? bwd_window_tile_range(n0, kBN, sq, cuda::window_offsets(kCausal, p.window_left, p.window_right, coff), kBM)
            : bwd_tile_range(n0, sq, coff, kCausal, kBM);
    // Varlen's segment form: only the query tiles of the segments the tile's keys lie in.
    if (kFeatures && !kBias && p.segment_cu != nullptr && tr.n_m > 0) {
      int m_begin = tr.m_begin, m_end = tr.m_begin + tr.n_m;
      trim_to_segments<kBM>(p, n0, min(n0 + kBN, sk) - 1, m_begin, m_end);
      tr = {m_begin, m_end - m_begin};
    }
    // A key tile a row-broadcast boolean mask hides from every row: no step (dK, dV 0), for every
    // role alike.
    if constexpr (kBias) {
      if (!dense_bias() && tr.n_m > 0 && bias_hides_key_tile(p, cta.b, cta.hk, group, n0, kBN, threadIdx.x % 32))
        tr.n_m = 0;
    }
    return Work{cta, n0, tr, tr.n_m * group};
  };

  const int warp = warp_idx_uniform();
  const int lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    mbarrier_init(kv_full, 1);
    for (int s = 0; s < Cfg::kStages; ++s) {
      mbarrier_init(bar.full(s), 32);  // the producer warp's 32 lanes (LSE / D stores + the TMA's tx)
      mbarrier_init(bar.empty(s), 8);  // one arrival per consumer warp
    }
    mbarrier_init(bar.kv_empty(), 8);  // one arrival per consumer warp
    if constexpr (kOrderedDq) {
      static_assert(kBulkDq && !kFeatures && !kPaddedD && kD != 96,
                    "ordered dQ: the plain d64 / d128 bulk-dQ kernels only");
      mbarrier_init(bar.dq_full(), Cfg::kOrderedDqArrivals);
      mbarrier_init(bar.dq_empty(), 1);
    }
    mbarrier_init_fence();
  }
  __syncthreads();

  if (warp >= 8) {
    // ---------------- producer ----------------
    setmaxnreg_dec<kProducerRegs>();
    if (warp == 8) {
      int it_base = 0, kv_round = 0;  // steps and K / V tiles of this CTA's earlier tiles
      for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
        const Work w = work_of(tile);
        if (w.n_iters == 0) continue;
        if (dense_bias())
          bwd_sm90_produce<Cfg, true>(maps, p, dsum, sbase, w.cta.b, w.cta.hk, group, w.n0, w.tr, lane, it_base,
                                      kv_round);
        else
          bwd_sm90_produce<Cfg>(maps, p, dsum, sbase, w.cta.b, w.cta.hk, group, w.n0, w.tr, lane, it_base, kv_round);
        it_base += w.n_iters;
        ++kv_round;
      }
    }
    if constexpr (kOrderedDq) {  // one tile per CTA (the launcher's grid)
      const Work w = work_of(blockIdx.x);
      if (warp == 9 && w.n_iters > 0) {
        bwd_sm90_write_dq_ordered<Cfg>(p, dq_accum, cuda::bwd_dq_turns(p), sbase + Cfg::kOffDqStage, bars, w.cta.b, w.cta.hk, group,
                                       w.cta.n_block, w.tr, lane);
      }
    }
  } else {
    // ---------------- consumers ----------------
    setmaxnreg_inc<kConsumerRegs>();
    const int wg = warp / 4;  // keys 64 wg .. 64 wg + 63 of the tile
    const int wi = warp % 4;
    const int g = lane / 4, t = lane % 4;
    const int key_l0 = 64 * wg + 16 * wi + g;  // this thread's first key row in the tile (second: + 8)
    const float scale_log2 = p.scale * 1.4426950408889634f;

    // K / V rows of this WG as the A operand (K-major over d); Q / dO stages as B (K-major)
    // for S^T / dP^T and MN-major for dK / dV.
    constexpr int kSw = Cfg::kSwizzleBytes;
    const uint64_t dK_a = make_desc_kmajor_swizzled<kSw>(sK + wg * 64 * kSw);
    const uint64_t dV_a = make_desc_kmajor_swizzled<kSw>(sV + wg * 64 * kSw);
    const uint64_t dQ_b = make_desc_kmajor_swizzled<kSw>(sQ);
    const uint64_t dDo_b = make_desc_kmajor_swizzled<kSw>(sDo);
    const uint64_t dQ_mn = make_desc_mnmajor_swizzled<kSw>(sQ, Cfg::kQChunkBytes);
    const uint64_t dDo_mn = make_desc_mnmajor_swizzled<kSw>(sDo, Cfg::kQChunkBytes);
    // dQ GEMM: A = dS (queries x keys) read MN-major from dS^T rows; B = K MN-major.
    const uint64_t dS_a = make_desc_mnmajor_sw128(sDs, Cfg::kDsBytes);
    const uint64_t dKt_b = make_desc_mnmajor_swizzled<kSw>(sK, Cfg::kKVChunkBytes);
    const bool warp_leader = lane == 0;

    // The step in two copies, masked and not (step below): the plain causal d128 kernels, for
    // kDkAfterDq's registers.  The H200 (session 24, ab_bwd.sh, 3 + 5 alternating rounds): the
    // split alone 0.99-1.02x at d128 (spills 20 -> 12 B) and 0.94-1.0x at d64 causal (not used
    // there); with kDkAfterDq +1-4 % causal d128 (s1k 253 -> 262, s16k 475 -> 489 TFLOP/s); the
    // deferred dQ add on top 0.93-1.04x (44 B spills), not used.
    constexpr bool kSplitMask =
        ORCHARD_SM90_BWD_CAUSAL_DK_AFTER_DQ && kCausal && Cfg::kDqSplitN && !kFeatures && !kOrderedDq;
    // Re-read from the parameters where tested (uniform registers), not held across the loop.
    auto has_feat = [&] {
      return kFeatures && (cuda::window_active(kCausal, p.window_left, p.window_right) || p.softcap > 0.f ||
                           p.alibi_slopes != nullptr || kBias || p.segment_cu != nullptr);
    };
    float dk[kD / 2], dv[kD / 2];
    int it_base = 0, kv_round = 0;  // steps and K / V tiles of this CTA's earlier tiles
    for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
      const Work w = work_of(tile);
      const int b = w.cta.b, hk = w.cta.hk, n0 = w.n0, n_iters = w.n_iters;
      const BwdTileRange tr = w.tr;
#pragma unroll
      for (int i = 0; i < kD / 2; ++i) dk[i] = dv[i] = 0.f;
      // Causal diagonal of key tile n0 in 32-bit tile coordinates: query row m0 + ql sees tile
      // key kl iff kl - ql <= m0 + diag0 (clamped: |coff| may exceed int range in principle).
      const int64_t diag64 = coff - n0;
      const int diag0 = diag64 > (1 << 30) ? (1 << 30) : (diag64 < -(1 << 30) ? -(1 << 30) : static_cast<int>(diag64));
      const int keys_left = sk - n0;
      if (n_iters > 0) {
        mbarrier_wait(kv_full, kv_round & 1);
        // Steps are numbered on across the CTA's tiles (it_base .. it_end - 1 here): the Q / dO ring's
        // stage and phase and the dS^T buffer parity follow that count.
        const int it_end = it_base + n_iters;
        int h = hk * group, m0 = tr.m_begin * kBM;  // (h, m0) of step it, advanced at its end
        const int m_end0 = (tr.m_begin + tr.n_m) * kBM;
        // acc = A B^T over the d columns: A = this WG's 64 K or V rows, B = stage st's 64 Q or dO
        // rows (both K-major), one commit group.
        auto gemm_over_d = [&](float(&acc)[32], uint64_t a, uint64_t b, int st) {
          wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < kD / 16; ++kk) {
            constexpr int kSl = Cfg::kSlicesPerChunk;
            const uint32_t off = (kk / kSl) * Cfg::kKVChunkBytes + (kk % kSl) * 32;
            const uint32_t offq = st * Cfg::kQBytes + (kk / kSl) * Cfg::kQChunkBytes + (kk % kSl) * 32;
            Wgmma<kBM, T>::template ss<0, 0>(acc, desc_advance(a, off), desc_advance(b, offq), kk > 0);
          }
          wgmma_commit();
        };
        // S^T = K Q^T of step `step` (waits for its Q stage), one commit group.  Cfg::kPipelined:
        // issued for step it + 1 right after step it's dQ GEMM (it runs while dQ goes out) and
        // waited for before the loop's back edge (a wgmma in flight across it makes ptxas inject
        // waits, C7517).
        float sacc[32];
        auto issue_s = [&](int step) {
          const int st = step % Cfg::kStages;
          mbarrier_wait(bar.full(st), (step / Cfg::kStages) & 1);
          gemm_over_d(sacc, dK_a, dQ_b, st);
        };
        if constexpr (Cfg::kPipelined) {
          issue_s(it_base);
          wgmma_wait<0>();
        }
        // kDeferDq: the dQ partial staged at the end of a step is fenced and bulk-added in the next
        // step, after its P^T is formed: the stores have drained by then (ncu, the H200, s8k: the
        // fence right after them held the warps for 6.6 % (d128) / 8.2 % (d64) of the samples).
        // Session 19, medians of 3 alternating runs: d64 +2-4 % non-causal, -1 to +5 % causal;
        // d128 non-causal +2-3.6 %, causal -4 to -7 % (more spills): not there.  Only in the plain
        // kernels (no features, d == kD), the instantiations the kernel bench's checks verified.
        constexpr bool kDeferDq = kBulkDq && (kD != 128 || !kCausal) && !kFeatures && !kPaddedD && !kOrderedDq;
        // kDkAfterDq (d128; causal with kSplitMask): the dK GEMM is issued after the dQ GEMM and waited for only
        // after the dQ partial is staged, so the staging runs beside it.  The H200 (session 23,
        // ab_bwd.sh, medians of 3 alternating rounds): non-causal +3.3-4.2 % (s2k 488 -> 509, s16k
        // 541 -> 561 TFLOP/s; fp16 +3.3 %), causal 0.98-1.0x (one outlier +14 %), more spills there.
        constexpr bool kDkAfterDq = ORCHARD_SM90_BWD_DK_AFTER_DQ && Cfg::kDqSplitN && (!kCausal || kSplitMask) && !kOrderedDq;
        // kDqAlternate (d64, d96): the dQ partial of step it is WG (it % 2)'s alone, over all 128 keys
        // (both WGs' dS^T rows: the other WG arrives at named barrier 12 + (it % 2) once its rows
        // are written), so one 64 x 64 partial goes to dq_accum per step instead of one per WG: half
        // the staging and the L2 reduction traffic, and each WG's dQ GEMM runs every other step.
        // Unlike session 26's pair sum (0.85-0.88x: both WGs waited at each step's end) only the
        // dQ WG waits, for dS^T rows the other WG wrote early in the same step.  The H200 (session
        // 27, 3 rounds, against the same tree without it): d64 s1k-16k 378.9 / 437.1 / 436.6 /
        // 457.0 / 468.1 TFLOP/s (+6.3-7.6 %), causal 242.6 / 323.5 / 330.9 / 400.1 / 433.1
        // (+5 to +24 %, s4k 0.99x), fp16 s8k +7.4 %.
        constexpr bool kDqAlternate = ORCHARD_SM90_BWD64_DQ_ALTERNATE && !Cfg::kDqSplitN && !kOrderedDq;
        const uint32_t dq_stage_buf = sbase + Cfg::kOffDqStage + warp * Cfg::kDqWarpBytes;
        float* dq_pending = nullptr;  // where the staged partial goes (nullptr: none)
        int dq_pending_bytes = 0;
        auto flush_dq = [&] {
          if constexpr (kDeferDq) {
            fence_proxy_async_smem();
            __syncwarp();
            if (lane == 0 && dq_pending != nullptr) {
              bulk_reduce_add_f32(dq_pending, dq_stage_buf, dq_pending_bytes);
              tma_store_commit();
            }
            dq_pending = nullptr;
          }
        };
        // One step (query tile m0 of head h).  kMaskStep: the copy that applies the causal / key-end
        // mask; kSplitMask kernels run the other copy, with no mask code, on the steps off the
        // diagonal (fewer live registers there: the causal kernels spilled 20 B, and the deferred dQ
        // add / dK-after-dQ orders lost to more spills in them).
        auto step = [&](const int it, auto mask_tag) {
          constexpr bool kMaskStep = decltype(mask_tag)::value;
          const int s = it % Cfg::kStages;
          const bool dq_here = !kDqAlternate || wg == (it & 1);  // this WG adds a dQ partial
          // S^T first, P^T to 16 bit, then dP^T: only dK + dV + one 64 x 64 fp32 tile + the packed
          // P^T are live at once (S^T and dP^T together with dK / dV spilled under the 240 cap).
          // dS^T is formed from the 16-bit P^T, the value the dV GEMM uses as well.
          uint32_t pa[4][4], dsa[4][4];
          const float* lse_t = lse_s + s * kBM;
          const float* d_t = d_s + s * kBM;
          // dS^T slots of this step (buffer s): row = key (128 B = 64 queries), 16-byte chunk c
          // stored at c ^ (row % 8).  row % 8 == g for both of this thread's rows, and the buffer and
          // row offsets leave bits 4-6 clear, so the address is (row base | g << 4 | 4 t) ^ (c << 4);
          // the pair (8 kk + 2 q) of a fragment (queries 8 c + 2 t, + 1, c = 2 kk + q / 2) goes to
          // ds_slot(kk, q).
          // (Lambdas, evaluated where used: values computed up here stay live across the GEMMs of
          // the plain path too, and ptxas spilled more.)
          auto ds_slot = [&](int kk, int q) {
            const uint32_t ds_row = sDs + s * Cfg::kDsBytes + key_l0 * 128 + (g << 4) + 4 * t;
            return (ds_row + (q % 2) * 1024) ^ (static_cast<uint32_t>(2 * kk + q / 2) << 4);
          };
          // Element i of a 64 x 64 tile: key key_l0 + 8 ((i / 2) % 2), query 8 (i / 4) + 2 t + (i % 2),
          // so key - query = rel0() + d_rel(i).
          auto rel0 = [&] { return n0 + key_l0 - m0 - 2 * t; };
          auto d_rel = [](int i) { return 8 * ((i / 2) % 2) - 8 * (i / 4) - (i % 2); };
          float dpacc[32];
          auto issue_dp = [&] { gemm_over_d(dpacc, dV_a, dDo_b, s); };  // dP^T = V dO^T of this step
          {
            if constexpr (!Cfg::kPipelined) {
              issue_s(it);
              wgmma_wait<0>();
            }
            fence_operands(sacc);
            if constexpr (Cfg::kPipelined) issue_dp();  // it runs while P^T is formed
            if (has_feat()) {  // softcap, ALiBi, then the window / causal / key-end mask (-inf: P = 0)
              const cuda::WindowOffsets w = cuda::window_offsets(kCausal, p.window_left, p.window_right, coff);
              auto each = [&](auto&& f) {
#pragma unroll
                for (int i = 0; i < 32; ++i) f(sacc[i], d_rel(i), 8 * ((i / 2) % 2));
              };
              cuda::apply_score_mods(each, p.scale, p.softcap,
                                     cuda::alibi_slope_ptr(p.alibi_slopes, p.alibi_batch_stride, b, h), coff, w,
                                     cuda::tile_needs_mask_window(n0 + 64 * wg, 64, m0, kBM, sk, w), rel0(),
                                     sk - n0 - key_l0);
              if constexpr (kBias) {
                if (dense_bias())
                  add_bias_tile_keys<kBM>(sbase + Cfg::kOffBias + s * Cfg::kBiasStageBytes,
                                          cuda::bias_kind(p.attn_bias_dtype), 1.f / p.scale, sacc, 64 * wg + 16 * wi,
                                          lane);
                else
                  add_attn_bias_keys(bias_row(p, b, h), sacc, n0 + key_l0);
              }
              if (!kBias && p.segment_cu != nullptr) {
                // Varlen's segment form: each of this thread's two keys is seen by its own
                // segment's rows only (looked up per step rather than held across the loop in registers).
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                  static_assert(2 * 32 == kBM, "sm90 backward: the fragment spans the step's queries");
                  mask_outside_segment(sacc, r, t, segment_of(p.segment_cu, p.segments, n0 + key_l0 + 8 * r), m0);
                }
              }
            }
            // Element i: key key_l0 + 8 ((i / 2) % 2), query 8 (i / 4) + 2 t + (i % 2) of the tile.
            // In tile coordinates (32-bit): a key past sk, or causal key - query > m0 + coff - n0.
            const int diag = m0 + diag0;
            const bool need_mask = kMaskStep && (keys_left < kBN || (kCausal && kBN - 1 > diag));
#pragma unroll
            for (int i = 0; i < 32; ++i) {
              const int ql = 8 * (i / 4) + 2 * t + (i % 2);
              float pv = bwd_ex2(fmaf(sacc[i], scale_log2, -lse_t[ql]));
              if (need_mask) {
                const int kl = key_l0 + 8 * ((i / 2) % 2);
                if (kl >= keys_left || (kCausal && kl - ql > diag)) pv = 0.f;
              }
              sacc[i] = pv;
            }
            acc_to_afrag<T>(sacc, pa);
            if (kFeatures && p.softcap > 0.f) {
              // P^T (1 - tanh^2) from the fp32 P^T (tanh recovered from it: softcap_dtanh), parked
              // as 16 bits in this thread's own dS^T slots (overwritten by dS^T below).
              const float slope = cuda::alibi_slope(p.alibi_slopes, p.alibi_batch_stride, b, h);
              const float inv_cap = 1.f / p.softcap;
              const int diag32 = cuda::clamp_i32(coff);
#pragma unroll
              for (int kk = 0; kk < 4; ++kk)
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                  float f[2];
#pragma unroll
                  for (int e = 0; e < 2; ++e) {
                    const int i = 8 * kk + 2 * q + e;
                    const int ql = 8 * (i / 4) + 2 * t + (i % 2);
                    f[e] = sacc[i] * cuda::softcap_dtanh(sacc[i], lse_t[ql], cuda::alibi_term(slope, diag32, rel0() + d_rel(i)),
                                                         inv_cap);
                  }
                  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(ds_slot(kk, q)), "r"(pack_pair<T>(f[0], f[1])) : "memory");
                }
            }
          }
          {
            // Dropout (the kFeatures kernels): the step's draws, made before dP^T is issued (d64:
            // while it runs; at d128, drawn during the GEMM, the Philox registers beside dP^T's
            // accumulators spilled the kFeatures kernels 8 -> 76 B). P^T stays undropped for dS^T;
            // the dV GEMM gets the kept elements (zeroed below) and dV takes 1 / (1 - p) in the
            // epilogue.
            const bool dropping = kFeatures && p.dropout_p > 0.f;
            // The packed form: each call's bytes (own) and the partner's (got), 8 words across the wait.
            uint32_t own[4] = {}, got[4] = {};
            if (dropping) step_key_rows_draws<8>(own, got, p, b, h, m0 + 2 * t, n0 + key_l0, g);
            if constexpr (!Cfg::kPipelined) issue_dp();
            flush_dq();
            wgmma_wait<0>();
            fence_operands(dpacc);
            if constexpr (kFeatures) {
              // dS^T = P^T (Z dP^T / (1 - p) - D) (Z: the keep mask; no dropout: Z = 1, p = 0);
              // softcap: P^T (1 - tanh^2), the product parked above.
              const bool capped = p.softcap > 0.f;
              const float rdrop = dropout_rescale(p);
              // kDrop: Z as AND masks on dP^T's fp32 bits, then on P^T's 16-bit pairs for the dV GEMM.
              auto ds_step = [&](auto drop_tag) {
                constexpr bool kDrop = decltype(drop_tag)::value;
                const uint32_t pair_bias = cuda::query_rows_pair_bias(dropout_keep_threshold(p.dropout_p));
#pragma unroll
                for (int kk = 0; kk < 4; ++kk)
#pragma unroll
                  for (int q = 0; q < 4; ++q) {
                    uint32_t pw = pa[kk][q];
                    if (capped) asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(pw) : "r"(ds_slot(kk, q)) : "memory");
                    const uint32_t keep = kDrop ? cuda::key_rows_pair_mask(own[kk], got[kk], g & 1, q, pair_bias) : ~0u;
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                      const int i = 8 * kk + 2 * q + e;
                      const int ql = 8 * (i / 4) + 2 * t + (i % 2);
                      float dp = dpacc[i];
                      if constexpr (kDrop)
                        dp = __uint_as_float(__float_as_uint(dp) & cuda::key_rows_element_mask(keep, e)) * rdrop;
                      dpacc[i] = unpack_lo_hi<T>(pw, e) * (dp - d_t[ql]);
                    }
                    if constexpr (kDrop) pa[kk][q] &= keep;  // (P^T Z)^T for the dV GEMM
                  }
              };
              if (dropping)
                ds_step(std::true_type{});
              else
                ds_step(std::false_type{});
            } else {  // dS^T = P^T (dP^T - D)
#pragma unroll
              for (int i = 0; i < 32; ++i) {
                const int ql = 8 * (i / 4) + 2 * t + (i % 2);
                const float pv = unpack_lo_hi<T>(pa[i / 8][(i % 8) / 2], i % 2);
                dpacc[i] = pv * (dpacc[i] - d_t[ql]);
              }
            }
            acc_to_afrag<T>(dpacc, dsa);
          }
          if constexpr (kFeatures) {  // dS^T -> its slots in smem buffer s (ds_slot above)
#pragma unroll
            for (int kk = 0; kk < 4; ++kk)
#pragma unroll
              for (int q = 0; q < 4; ++q)
                asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(ds_slot(kk, q)), "r"(dsa[kk][q]) : "memory");
          } else {  // the same slots, the address computed once per step (ds_slot's formula)
            const uint32_t ds_row = sDs + s * Cfg::kDsBytes + key_l0 * 128 + (g << 4) + 4 * t;
#pragma unroll
            for (int kk = 0; kk < 4; ++kk)
#pragma unroll
              for (int q = 0; q < 4; ++q) {
                const uint32_t c = 2 * kk + q / 2;  // pair (8kk + 2q): queries 8 c + 2 t, + 1
                const uint32_t addr = (ds_row + (q % 2) * 1024) ^ (c << 4);
                asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(dsa[kk][q]) : "memory");
              }
          }
          fence_proxy_async_smem();
          // kDqAlternate: this step's dQ is the other WG's, which waits for these dS^T rows.
          if (kDqAlternate && !dq_here) named_barrier_arrive(12 + (wg ^ 1), 256);
          // dV += P^T dO, dK += dS^T Q  (k = the 64 query rows: 4 k16 slices of 16 rows)
          auto issue_dk = [&] {
#pragma unroll
            for (int kk = 0; kk < kBM / 16; ++kk)
              Wgmma<kD, T>::template rs<1>(dk, dsa[kk],
                                           desc_advance(dQ_mn, s * Cfg::kQBytes + kk * Cfg::kMnSliceBytes), 1);
          };
          wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < kBM / 16; ++kk)
            Wgmma<kD, T>::template rs<1>(dv, pa[kk],
                                         desc_advance(dDo_mn, s * Cfg::kQBytes + kk * Cfg::kMnSliceBytes), 1);
          if constexpr (!kDkAfterDq) issue_dk();
          wgmma_commit();
          // Every dS^T row this GEMM reads is written (both WGs for the split-N form and
          // kDqAlternate's dQ WG).
          if constexpr (Cfg::kDqSplitN) named_barrier_sync(1, 256);
          else if constexpr (kDqAlternate) {
            if (dq_here) named_barrier_sync(12 + wg, 256);
          } else named_barrier_sync(2 + wg, 128);
          float dq[Cfg::kDqN / 2];
          if constexpr (Cfg::kDqSplitN || kDqAlternate) {  // over all 128 keys
            if (dq_here) {
#pragma unroll
              for (int kk = 0; kk < kBN / 16; ++kk)
                Wgmma<Cfg::kDqN, T>::template ss<1, 1>(
                    dq, desc_advance(dS_a, s * Cfg::kDsBytes + kk * 2048),
                    desc_advance(dKt_b, (Cfg::kDqSplitN ? wg * Cfg::kKVChunkBytes : 0) + kk * Cfg::kMnSliceBytes),
                    kk > 0);
            }
          } else {
#pragma unroll
            for (int kk = 0; kk < 4; ++kk)
              Wgmma<Cfg::kDqN, T>::template ss<1, 1>(
                  dq, desc_advance(dS_a, s * Cfg::kDsBytes + wg * 64 * 128 + kk * 2048),
                  desc_advance(dKt_b, wg * 64 * kSw + kk * Cfg::kMnSliceBytes), kk > 0);
          }
          wgmma_commit();  // (an empty group on kDqAlternate's other WG: the same waits below)
          if constexpr (kDkAfterDq) {
            issue_dk();
            wgmma_commit();
            wgmma_wait<1>();  // dV and dQ; dK runs on while dQ is staged (its Q stage is freed below)
          } else if constexpr (Cfg::kPipelined) {
            if (it + 1 < it_end) issue_s(it + 1);
            else wgmma_commit();  // an empty group: the same wait on both paths
            wgmma_wait<1>();      // all but the next step's S^T
          } else {
            wgmma_wait<0>();
          }
          fence_operands(dq);
          fence_operands(dv);
          auto release_stage = [&] {
            fence_operands(dk);
            __syncwarp();
            if (warp_leader) mbarrier_arrive(bar.empty(s));
          };
          if constexpr (!kDkAfterDq) release_stage();
          // dQ partial -> dq_accum: warp wi's rows m0 + 16 wi .. + 15 (a whole 16-row tile; tiles
          // past sq are outside the padded slab and hold zeros anyway).
          [[maybe_unused]] const int row16 = m0 + 16 * wi;  // (the kOrderedDq kernels do not read it)
          if constexpr (kOrderedDq) {
            // Staged in this warp's slot once the writer has read the previous step's; it adds.
            // d64: WG0's warp wi stores, WG1's warp wi then adds its partial there (named barrier
            // 4 + wi of the pair): one partial per step, summed in a fixed order.
            if (it > 0) mbarrier_wait(bar.dq_empty(), (it - 1) & 1);
            const uint32_t slot = sbase + Cfg::kOffDqStage + Cfg::ordered_dq_slot(wg, wi) * Cfg::kDqWarpBytes;
            const bool sums = !Cfg::kDqSplitN && wg == 1;
            if (sums) named_barrier_sync(4 + wi, 64);
#pragma unroll
            for (int j = 0; j < Cfg::kDqN / 8; ++j) {
              const uint32_t a = slot + (j * 32 + lane) * 16;
              float4 v = make_float4(dq[4 * j], dq[4 * j + 1], dq[4 * j + 2], dq[4 * j + 3]);
              if (sums) {
                float4 w;
                asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                             : "=f"(w.x), "=f"(w.y), "=f"(w.z), "=f"(w.w)
                             : "r"(a)
                             : "memory");
                v = make_float4(w.x + v.x, w.y + v.y, w.z + v.z, w.w + v.w);
              }
              asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(a), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w)
                           : "memory");
            }
            if (!Cfg::kDqSplitN && wg == 0) {
              named_barrier_arrive(4 + wi, 64);  // WG1's warp wi adds next
            } else {
              fence_proxy_async_smem();
              __syncwarp();
              if (warp_leader) mbarrier_arrive(bar.dq_full());
            }
          } else if (dq_here && row16 < sq) {
            // The caller's accumulator (p.dq_accum, launch.h) or our own (dq_accum).
            const cuda::DqAccumSlabs acc =
                p.dq_accum != nullptr
                    ? cuda::DqAccumSlabs{p.dq_accum + b * p.dq_accum_batch_stride, p.dq_accum_head_stride}
                    : cuda::DqAccumSlabs{dq_accum + static_cast<int64_t>(b) * p.hq * cuda::dq_accum_rows(sq) *
                                                         cuda::dq_accum_cols(d_cols),
                                         static_cast<int64_t>(cuda::dq_accum_rows(sq)) * cuda::dq_accum_cols(d_cols)};
            float* slab = acc.base + h * acc.head_stride;
            const int col_base = Cfg::kDqSplitN ? wg * Cfg::kDqN : 0;
            // dq_accum has the true d's columns (launch.h): with d below the bucket only this
            // warp's first n_tiles column tiles exist (the rest of dq is the zero padding's).
            const int n_tiles = kPaddedD ? min(Cfg::kDqN, d_cols - col_base) / 8 : Cfg::kDqN / 8;
            if constexpr (kBulkDq) {
              // This warp's kDqN / 8 tiles of 16 x 8 are contiguous in dq_accum (launch.h): stage
              // them in the same order (lane-major float4 per tile), then one 4 KB bulk add.
              const uint32_t stage_buf = sbase + Cfg::kOffDqStage + warp * Cfg::kDqWarpBytes;
              if (lane == 0) tma_store_wait_read<0>();  // the previous step's add has read it
              __syncwarp();
#pragma unroll
              for (int j = 0; j < Cfg::kDqN / 8; ++j)
                asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(stage_buf + (j * 32 + lane) * 16),
                             "f"(dq[4 * j]), "f"(dq[4 * j + 1]), "f"(dq[4 * j + 2]), "f"(dq[4 * j + 3])
                             : "memory");
              if constexpr (kDeferDq) {
                dq_pending = n_tiles > 0 ? slab + cuda::dq_accum_tile_offset(row16, col_base, d_cols, 0) : nullptr;
                dq_pending_bytes = n_tiles * 512;
              } else {
                fence_proxy_async_smem();
                __syncwarp();
                if (lane == 0 && n_tiles > 0) {
                  bulk_reduce_add_f32(slab + cuda::dq_accum_tile_offset(row16, col_base, d_cols, 0), stage_buf,
                                      n_tiles * 512);  // 16 x 8 fp32 per tile
                  tma_store_commit();
                }
              }
            } else {
#pragma unroll
              for (int j = 0; j < Cfg::kDqN / 8; ++j) {
                if (j >= n_tiles) break;
                float* dst = slab + cuda::dq_accum_tile_offset(row16, col_base + 8 * j, d_cols, lane);
                atomicAdd(reinterpret_cast<float4*>(dst), make_float4(dq[4 * j], dq[4 * j + 1], dq[4 * j + 2], dq[4 * j + 3]));
              }
            }
          }
          if constexpr (kDkAfterDq) {
            wgmma_wait<0>();  // dK: its Q stage goes back to the producer
            release_stage();
          }
          if constexpr (Cfg::kPipelined) wgmma_wait<0>();  // the next step's S^T
          m0 += kBM;
          if (m0 == m_end0) {
            m0 = tr.m_begin * kBM;
            ++h;
          }
        };
        for (int it = it_base; it < it_end; ++it) {
          if constexpr (kSplitMask) {
            // The steps need_mask (in step) picks out: keys past sk, or keys after some of its queries.
            if (keys_left < kBN || kBN - 1 > m0 + diag0) step(it, std::true_type{});
            else step(it, std::false_type{});
          } else {
            step(it, std::true_type{});
          }
        }
        flush_dq();
        // Every GEMM that reads K or V has completed (the last step waited for all of them): the
        // producer may load the next tile's.
        __syncwarp();
        if (warp_leader) mbarrier_arrive(bar.kv_empty());
        it_base = it_end;
        ++kv_round;
      }
      // Epilogue: dK (times the scale) and dV, rows < sk, as 16-bit values (fragment_store.cuh).
      T* dkg = static_cast<T*>(p.dk) + b * p.dk_batch_stride + hk * p.dk_head_stride;
      T* dvg = static_cast<T*>(p.dv) + b * p.dv_batch_stride + hk * p.dv_head_stride;
      const bool store16 = ORCHARD_SM90_BWD_STORE16 && rows_allow_store16(dkg, p.dk_row_stride) &&
                           rows_allow_store16(dvg, p.dv_row_stride);
      const float dv_scale = kFeatures ? dropout_rescale(p) : 1.f;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int key = n0 + key_l0 + 8 * r;
        store_fragment_row<T, kD>(dk, r, p.scale, dkg + static_cast<int64_t>(key) * p.dk_row_stride, key < sk,
                                  d_cols, t, store16);
        store_fragment_row<T, kD>(dv, r, dv_scale, dvg + static_cast<int64_t>(key) * p.dv_row_stride, key < sk,
                                  d_cols, t, store16);
      }
      // This tile's bulk adds are done, by every warp (their smem sources must outlive the CTA).
      // The build timed in session 25 waited inside the store loop above, which skipped the wait
      // for lanes whose rows all lie past sk; here once per tile, for every warp.  Once after
      // the last tile instead: within noise (session 26, 0.95-1.02x).
      if constexpr (kBulkDq) {
        if (lane == 0) tma_store_wait_all<0>();
      }
    }
  }
}

}  // namespace orchard::sm90
