// Tile bookkeeping shared by the forward and backward kernels: which tiles the
// causal mask and the sequence ends reach, the log2-domain LSE, and moving
// mma.sync C fragments into A fragments or out to global memory.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "backends/cuda/score_mods.h"
#include "backends/cuda/sm80/mma_utils.cuh"
#include "orchard/dtype.h"

namespace orchard::cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// The helpers below take the few scalars they need, not the params struct: a
// reference to the kernel's parameter struct made ptxas spill (measured: the
// d128 causal dK/dV kernel went from 0 to 36 B).

// A (query rows from query0) x (key_rows keys from key0) tile needs per-element
// masking iff it crosses the key end sk or (causal) its last key lies past the
// diagonal of its first query row; every other tile is fully visible.
template <bool kCausal>
__device__ __forceinline__ bool tile_needs_mask(int key0, int key_rows, int query0, int sk, int64_t causal_offset) {
  return (key0 + key_rows > sk) || (kCausal && static_cast<int64_t>(key0) + key_rows - 1 > query0 + causal_offset);
}

// Keys [0, result) are visible to some row of the query tile [query0, query0 + rows).
template <bool kCausal>
__device__ __forceinline__ int visible_key_end(int query0, int rows, int sk, int64_t causal_offset) {
  if (!kCausal) return sk;
  const int64_t last = static_cast<int64_t>(query0) + rows + causal_offset;  // exclusive
  return static_cast<int>(last < 0 ? 0 : (last < sk ? last : sk));
}

// First query tile (of kBM rows; num_tiles in all) with a row that sees key key0.
template <bool kCausal, int kBM>
__device__ __forceinline__ int first_visible_query_tile(int key0, int num_tiles, int sq, int64_t causal_offset) {
  if (!kCausal) return 0;
  const int64_t first_row = key0 - causal_offset < 0 ? 0 : key0 - causal_offset;
  return first_row >= sq ? num_tiles : static_cast<int>(first_row / kBM);
}

// The forward's natural-log LSE in log2 units for exp2(S * scale_log2 - lse);
// a fully masked row (-inf) becomes +inf, so its probabilities are 0, not exp(+inf).
__device__ __forceinline__ float lse_log2(float lse) { return lse == -INFINITY ? INFINITY : lse * kLog2e; }

// ---- Run-time features (params.h): sliding window, softcap, ALiBi, varlen. ----
// Taken per tile through CTA-uniform branches: no template parameter, so the
// plain path (none of them) keeps its instantiations and its inner loop.

constexpr int64_t kUnbounded = int64_t{1} << 40;

// Row i of a sequence sees columns [i + lo, i + hi] (and [0, len_k)): the
// window bounds on the diagonal `diag`, the causal bound folded into hi.
struct WindowOffsets {
  int64_t lo, hi;
};
__device__ __forceinline__ WindowOffsets window_offsets(bool causal, int64_t window_left, int64_t window_right,
                                                        int64_t diag) {
  int64_t hi = window_right >= 0 ? diag + window_right : kUnbounded;
  if (causal && hi > diag) hi = diag;
  const int64_t lo = window_left >= 0 ? diag - window_left : -kUnbounded;
  return {lo, hi};
}

// window_active / score_mods_active: score_mods.h.

// A (rows from r0) x (cols from c0) tile needs per-element masking iff some of
// its elements lie past len_k or outside some row's window.
__device__ __forceinline__ bool tile_needs_mask_window(int c0, int cols, int r0, int rows, int len_k,
                                                       WindowOffsets w) {
  return c0 + cols > len_k || int64_t{c0} + cols - 1 > r0 + w.hi || int64_t{c0} < int64_t{r0} + rows - 1 + w.lo;
}

__device__ __forceinline__ int clamp_i32(int64_t v) {
  return static_cast<int>(v < -(int64_t{1} << 30) ? -(int64_t{1} << 30) : (v > (int64_t{1} << 30) ? (int64_t{1} << 30) : v));
}

// Softcap's tanh: the hardware approximation (one MUFU op, sm_75+; relative
// error <= 2^-10.99). 1 - 2 / (exp(2x) + 1) took two MUFU ops (ex2, rcp) per score
// on top of the softmax's exp2, and MUFU throughput bounds these loops: softcapped
// forward 129 TFLOP/s vs 316 plain (H200, d128 s8k causal). The error this adds to
// a score, softcap * 2^-11, is below what rounding the score to bf16/fp16 costs
// (softcap * 2^-9 or 2^-12 relative), the accuracy these kernels are held to.
// (tanhf's slow path made ptxas spill in the main loops.)
__device__ __forceinline__ float tanh_fast(float x) {
#if defined(ORCHARD_DECODE_EMU)  // (the CPU emulator, dev/sm80_emu)
  return std::tanh(x);
#else
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

// The features' score modification of one tile, as up to three CTA-uniform
// passes over the thread's fragment: softcap, ALiBi, then the window / causal /
// key-end mask (-inf), the last only on tiles that cross a bound (mask_tile).
// Separate passes keep few values live at a time: one fused per-element
// function made ptxas spill in the dropout kernels' main loops.
// `each(g)` calls g(x, d_rel, d_col) for every score x of the thread's fragment
// (a reference), where col - row = rel0 + d_rel and col = col0 + d_col, with
// d_rel, d_col compile-time constants once unrolled; col_lim0 = len_k - col0.
// x comes in as the raw q.k and leaves as the final score (softcap, then ALiBi)
// divided by the softmax scale, so the kernels' exp2(x * scale * log2e - m)
// stays as it is. inv_scale_log2 != 0 (the deterministic dQ kernel, which needs
// only P * (1 - tanh^2)): adds log2(1 - tanh^2) / (scale * log2e) as well, so
// that exp2(x * scale * log2e - lse) is that product.
// [kRelMin, kRelMax] (optional): bounds of d_rel over the fragment. Given, ALiBi's
// bias is computed once per distinct d_rel (a fragment holds few: 14 of 32 scores
// in the d128 forward and dK/dV kernels; entries no score uses are dead code) and
// each score costs one FADD instead of an FADD and an FFMA.
template <int kRelMin = 0, int kRelMax = -1, typename Each>
__device__ __forceinline__ void apply_score_mods(Each each, float scale, float softcap, const float* slope_ptr,
                                                 int64_t diag, WindowOffsets w, bool mask_tile, int rel0,
                                                 int col_lim0, float inv_scale_log2 = 0.f) {
  if (softcap > 0.f) {
    const float ci = scale / softcap, co = softcap / scale;
    if (inv_scale_log2 != 0.f) {
      each([&](float& x, int, int) {
        const float t = tanh_fast(x * ci);
        x = fmaf(co, t, __log2f(fmaxf(1.f - t * t, 0.f)) * inv_scale_log2);  // 1 - t^2 = 0: -inf, P = 0
      });
    } else {
      each([&](float& x, int, int) { x = co * tanh_fast(x * ci); });
    }
  }
  if (slope_ptr != nullptr) {  // - slope * |row + diag - col| = - slope * |a0 - d_rel|
    const float sl = *slope_ptr / scale;
    // a0 converted once: d_rel is a compile-time constant, so each score costs an
    // FADD and an FFMA instead of an I2F (quarter rate) as well (exact below 2^24).
    const float a0 = static_cast<float>(clamp_i32(diag - rel0));
    if constexpr (kRelMax >= kRelMin) {
      float bias[kRelMax - kRelMin + 1];
#pragma unroll
      for (int i = 0; i <= kRelMax - kRelMin; ++i) bias[i] = sl * fabsf(a0 - static_cast<float>(kRelMin + i));
      each([&](float& x, int dr, int) { x -= bias[dr - kRelMin]; });
    } else {
      each([&](float& x, int dr, int) { x -= sl * fabsf(a0 - static_cast<float>(dr)); });
    }
  }
  if (mask_tile) {  // visible iff lo <= col - row <= hi and col < len_k
    const int lo = clamp_i32(w.lo - rel0), hi = clamp_i32(w.hi - rel0);
    each([&](float& x, int dr, int dc) {
      if (dc >= col_lim0 || dr < lo || dr > hi) x = -INFINITY;
    });
  }
}

// Softcap backward: the derivative of softcap * tanh(scale * x / softcap) is
// scale * (1 - tanh^2); the scale is applied where the plain path applies it,
// this returns 1 - tanh^2. tanh is recovered from the probability itself:
// final score = (log2 P + lse_log2) * ln 2 = softcap * tanh + alibi (so no extra
// register array lives across the dP GEMM). P = 0 (masked / underflow): 0.
__device__ __forceinline__ float softcap_dtanh(float pv, float lse_l2, float alibi_term, float inv_softcap) {
  if (!(pv > 0.f)) return 0.f;
  const float t = ((__log2f(pv) + lse_l2) * kLn2 - alibi_term) * inv_softcap;
  return fmaxf(0.f, 1.f - t * t);
}
// ALiBi term of the final score (not divided by the scale) at rel = col - row:
// -slope * |diag - rel| (diag clamped to +-2^30).
__device__ __forceinline__ float alibi_term(float slope, int diag, int rel) {
  return -slope * fabsf(static_cast<float>(diag - rel));
}

// The ALiBi slope of (batch b, head h), 0 without ALiBi.
__device__ __forceinline__ float alibi_slope(const float* slopes, int64_t batch_stride, int b, int h) {
  return slopes != nullptr ? slopes[b * batch_stride + h] : 0.f;
}
// Its address, nullptr without ALiBi.
__device__ __forceinline__ const float* alibi_slope_ptr(const float* slopes, int64_t batch_stride, int b, int h) {
  return slopes != nullptr ? slopes + b * batch_stride + h : nullptr;
}

// ---- attn_bias / attn_mask (params.h) ----
// The bias of one score tile is staged into shared memory in its own element type
// (kind below) by the whole CTA, then added to the fragment from there in a pass
// of its own (compiled once per kind), in the kernels' kBias instantiations only:
// the plain kernels keep their code. (Reading the bias from global memory per
// fragment element inside the score passes made ptxas spill the plain path, and so
// did run-time bias branches in the merged tree.) Staging: 16-byte cp.async when
// the key stride is 1 and the base and the other strides are 16-byte aligned, else
// plain loads (any strides; stride 0 = a broadcast dim, read in place); prefetched
// into a second buffer with the K/V (forward, dQ) or Q/dO (split dK/dV) tiles, or at
// the top of the step (d <= 128 dK/dV). Tile rows: pitch kCols * esz + 16 bytes.

// (bias_kind, bias_elem_bytes and bias_tile_async: score_mods.h, which host code includes too.)
template <int kKind, int kCols>
constexpr int bias_pitch() {
  return kCols * bias_elem_bytes(kKind) + 16;
}
// Shared-memory bytes of a (kRows x kCols) tile of any kind.
template <int kRows, int kCols>
constexpr int bias_tile_bytes() {
  return kRows * bias_pitch<1, kCols>();
}

template <int kKind>
using BiasElem = std::conditional_t<kKind == 0, unsigned char, std::conditional_t<kKind == 1, float, unsigned short>>;
// A stored element as a score term: boolean 0 -> -inf, nonzero -> 0; floats as they are.
template <int kKind>
__device__ __forceinline__ float bias_convert(BiasElem<kKind> u) {
  if constexpr (kKind == 0) return u != 0 ? 0.f : -INFINITY;
  else if constexpr (kKind == 1) return u;
  else if constexpr (kKind == 2) return __uint_as_float(static_cast<uint32_t>(u) << 16);
  else return __half2float(__ushort_as_half(u));
}
// Element (r, c) of a staged tile.
template <int kKind, int kCols>
__device__ __forceinline__ float bias_smem(const unsigned char* tile, int r, int c) {
  return bias_convert<kKind>(
      *reinterpret_cast<const BiasElem<kKind>*>(tile + r * bias_pitch<kKind, kCols>() + c * bias_elem_bytes(kKind)));
}
// 16-byte cp.async reading `bytes` (0..16) and zero-filling the rest.
__device__ __forceinline__ void cp_async16_bytes(uint32_t smem_addr, const void* gmem, int bytes) {
#if defined(ORCHARD_DECODE_EMU)
  cp_async16_zfill(emu_smem_ptr(smem_addr), gmem, bytes);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr), "l"(gmem), "r"(bytes));
#endif
}

// The same through L1 (.ca): the rows of a row-broadcast tile the backward stages in
// full all read one global row, and L1 serves the repeats instead of L2 (H200, bf16
// key padding b4 s1024 h16 d128: deterministic backward 0.777 -> 0.656 ms, atomic
// 0.449 -> 0.445; ptxas: atomic dK/dV bias 8 -> 16 B spill, causal 8 -> 52 B).
__device__ __forceinline__ void cp_async16_bytes_l1(uint32_t smem_addr, const void* gmem, int bytes) {
#if defined(ORCHARD_DECODE_EMU)
  cp_async16_zfill(emu_smem_ptr(smem_addr), gmem, bytes);
#else
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr), "l"(gmem), "r"(bytes));
#endif
}

// Row-broadcast biases (row stride 0: a key-padding mask (B, 1, 1, S), say) stage
// their one row only, and the kernels copy it down the tile in shared memory
// (expand_bias_row) after the tile's barrier. Staged in full, every row of every
// CTA's tile read the same few global bytes: the H200 ran the key-padding forward
// 3.2x slower than the plain one (0.375 vs 0.116 ms, bf16 b4 s1024 h16 d128), a
// bf16 (1, H, S, S) bias 1.4x (cuda_check --bench-mask).
// Only the forward does so (issue_bias_tile's row_once): expanding in the backward
// kernels, where S is live at the tile's barrier, made ptxas spill (bf16 d128 dK/dV
// 8 -> 88 B), and their key-padding times were not the outlier (0.449 vs 0.474 ms).
template <int kKind, int kRows, int kCols, int kThreads>
__device__ __forceinline__ void issue_bias_tile_t(unsigned char* dst, const unsigned char* base, int64_t rs,
                                                  int64_t cs, int rows, int cols, bool async, bool row_once,
                                                  int tid) {
  constexpr int kE = bias_elem_bytes(kKind), kPitch = bias_pitch<kKind, kCols>();
  const int staged = row_once && rs == 0 ? 1 : kRows;
  if (async) {
    constexpr int kCpr = kCols * kE / 16;  // 16-byte chunks per row
    static_assert(kCols * kE % 16 == 0, "bias tile rows: whole 16-byte chunks");
    const uint32_t d0 = smem_u32(dst);
#pragma unroll 1
    for (int idx = tid; idx < staged * kCpr; idx += kThreads) {
      const int r = idx / kCpr, ch = idx % kCpr, c0 = ch * (16 / kE);
      int bytes = r < rows ? (cols - c0) * kE : 0;
      bytes = bytes < 0 ? 0 : (bytes > 16 ? 16 : bytes);
      const unsigned char* src = bytes > 0 ? base + (r * rs + c0) * kE : base;
      if (rs == 0) cp_async16_bytes_l1(d0 + r * kPitch + ch * 16, src, bytes);
      else cp_async16_bytes(d0 + r * kPitch + ch * 16, src, bytes);
    }
  } else {
    using E = BiasElem<kKind>;
    const E* src = reinterpret_cast<const E*>(base);
#pragma unroll 1
    for (int idx = tid; idx < staged * kCols; idx += kThreads) {
      const int r = idx / kCols, c = idx % kCols;
      E v = 0;
      if (r < rows && c < cols) v = __ldg(src + (r * rs + c * cs));
      *reinterpret_cast<E*>(dst + r * kPitch + c * kE) = v;
    }
  }
}
// Copies the (kRows x kCols) bias tile whose element (r, c) is p.attn_bias[(b, h,
// row0 + r, col0 + c)] into `raw` (its own element type, bias_tile_bytes): with
// cp.async where the layout allows (the caller commits the group and waits), else
// plain loads. Elements at r >= rows or c >= cols (past the sequence ends) are 0
// (boolean: masked; those scores are masked or unused anyway). row_once: a
// row-broadcast bias (rs == 0) stages row 0 only; the caller runs expand_bias_row.
template <int kRows, int kCols, int kThreads>
__device__ __forceinline__ void issue_bias_tile(unsigned char* raw, const void* bias, int kind, int64_t bs, int64_t hs,
                                                int64_t rs, int64_t cs, int b, int h, int row0, int col0, int rows,
                                                int cols, int tid, bool row_once = false) {
  const int64_t e = bias_elem_bytes(kind);
  const unsigned char* base = static_cast<const unsigned char*>(bias) + (b * bs + h * hs + row0 * rs + col0 * cs) * e;
  const bool async = bias_tile_async(bias, kind, bs, hs, rs, cs);
  switch (kind) {
    case 0: issue_bias_tile_t<0, kRows, kCols, kThreads>(raw, base, rs, cs, rows, cols, async, row_once, tid); break;
    case 1: issue_bias_tile_t<1, kRows, kCols, kThreads>(raw, base, rs, cs, rows, cols, async, row_once, tid); break;
    case 2: issue_bias_tile_t<2, kRows, kCols, kThreads>(raw, base, rs, cs, rows, cols, async, row_once, tid); break;
    default: issue_bias_tile_t<3, kRows, kCols, kThreads>(raw, base, rs, cs, rows, cols, async, row_once, tid); break;
  }
}

// Row-broadcast staging (bias_staged_rows): copies the staged row 0 of a (kRows x
// kCols) tile of any kind into its other rows. Call once row 0 is visible to the CTA
// (after the tile's barrier), then __syncthreads() before anyone reads the tile.
template <int kRows, int kCols, int kThreads>
__device__ __forceinline__ void expand_bias_row(unsigned char* tile, int kind, int tid) {
  const int row_bytes = kCols * bias_elem_bytes(kind), cpr = row_bytes / 16, pitch = row_bytes + 16;
#pragma unroll 1
  for (int idx = tid; idx < (kRows - 1) * cpr; idx += kThreads) {
    const int r = 1 + idx / cpr, ch = idx % cpr;
    *reinterpret_cast<uint4*>(tile + r * pitch + ch * 16) = *reinterpret_cast<const uint4*>(tile + ch * 16);
  }
}

// f(std::integral_constant<int, kind>()): a pass compiled once per bias kind.
template <typename F>
__device__ __forceinline__ void bias_dispatch(int kind, F&& f) {
  switch (kind) {
    case 0: f(std::integral_constant<int, 0>{}); break;
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 3>{}); break;
  }
}

// ---- Boolean attn_mask tiles: skipping what the mask hides (issue #16) ----
// A staged boolean tile (kind 0) tells which score tiles need no work: a warp's (or
// the CTA's) part of it with no visible element contributes nothing (P = 0: the
// kernels skip its GEMMs and softmax, which leaves every accumulator exactly as
// processing it would), and one with every element visible adds 0 (the kernels skip
// the bias pass). Elements staged as zero past the sequence ends count as masked,
// so edge tiles keep their usual path. A key-padding mask (B, 1, 1, S) thus runs
// the plain kernel's work on the visible keys. Run-time data, no new kernels.

// True iff no byte of w is zero.
__device__ __forceinline__ bool all_bytes_nonzero(uint32_t w) {
  return ((w - 0x01010101u) & ~w & 0x80808080u) == 0u;
}

struct MaskVote {
  bool none;  // no element visible
  bool all;   // every element visible
};

// The warp's vote over the (kR x kC)-byte region at (r0, c0) (c0 % 16 == 0) of a staged
// boolean tile with kCols columns (pitch bias_pitch<0, kCols>); every lane calls it.
// The tile must be visible to the whole warp (read after the barrier that follows
// its cp.async wait).
template <int kCols, int kR, int kC>
__device__ __forceinline__ MaskVote bool_region_vote(const unsigned char* tile, int r0, int c0, int lane) {
  constexpr int kPitch = bias_pitch<0, kCols>(), kCpr = kC / 16, kChunks = kR * kCpr;
  static_assert(kC % 16 == 0 && kPitch % 16 == 0, "boolean tile regions: whole 16-byte chunks");
  bool none = true, all = true;
#pragma unroll
  for (int k = 0; k < (kChunks + 31) / 32; ++k) {
    const int i = lane + 32 * k;
    if (kChunks % 32 == 0 || i < kChunks) {
      const uint4 w = *reinterpret_cast<const uint4*>(tile + (r0 + i / kCpr) * kPitch + c0 + (i % kCpr) * 16);
      none &= (w.x | w.y | w.z | w.w) == 0u;
      all &= all_bytes_nonzero(w.x) & all_bytes_nonzero(w.y) & all_bytes_nonzero(w.z) & all_bytes_nonzero(w.w);
    }
  }
  return {__all_sync(0xffffffffu, none) != 0, __all_sync(0xffffffffu, all) != 0};
}

// Whether every element of a boolean tile that this thread staged itself (through
// issue_bias_tile with the same `async`, kRows, kCols, kThreads) is masked: readable
// by the thread right after its cp.async wait, before any barrier, so a CTA-wide
// vote is the __syncthreads_and that the kernel's barrier becomes.
template <int kRows, int kCols, int kThreads>
__device__ __forceinline__ bool own_bool_chunks_masked(const unsigned char* tile, bool async, int tid) {
  constexpr int kPitch = bias_pitch<0, kCols>();
  uint32_t any = 0;
  if (async) {
    constexpr int kCpr = kCols / 16;
#pragma unroll 2
    for (int idx = tid; idx < kRows * kCpr; idx += kThreads) {
      const uint4 w = *reinterpret_cast<const uint4*>(tile + (idx / kCpr) * kPitch + (idx % kCpr) * 16);
      any |= w.x | w.y | w.z | w.w;
    }
  } else {
#pragma unroll 4
    for (int idx = tid; idx < kRows * kCols; idx += kThreads) any |= tile[(idx / kCols) * kPitch + idx % kCols];
  }
  return any == 0u;
}

// Two adjacent C tiles (n8 tiles 2k, 2k+1) repacked to 16 bits are the A
// fragment of k-tile k (mma_utils.cuh's layout table).
template <typename T>
__device__ __forceinline__ void pack_a_fragment(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = MmaType<T>::pack(c0[0], c0[1]);
  a[1] = MmaType<T>::pack(c0[2], c0[3]);
  a[2] = MmaType<T>::pack(c1[0], c1[1]);
  a[3] = MmaType<T>::pack(c1[2], c1[3]);
}

// Stores one half-row (r = 0: fragment row g, r = 1: row g + 8) of an
// accumulator of kTiles n8 C tiles, times `scale`, to the global row `row`
// starting at column col0: this lane's columns col0 + 8 i + 2t, +1; columns
// at or past d are skipped (d % 8 == 0, so a pair is in or out together).
template <typename T, int kTiles>
__device__ __forceinline__ void store_accumulator_row(T* row, const float (&acc)[kTiles][4], int r, int col0,
                                                      int t, int d, float scale) {
#pragma unroll
  for (int i = 0; i < kTiles; ++i) {
    const int col = col0 + i * 8 + 2 * t;
    if (col < d)
      *reinterpret_cast<uint32_t*>(row + col) = MmaType<T>::pack(acc[i][2 * r] * scale, acc[i][2 * r + 1] * scale);
  }
}

// store_accumulator_row for rows that are not 4-byte aligned or an odd width d
// (the kernels' element-wise path, rows_vec16 in launch.h): 2-byte stores,
// each column < d written, none past it.
template <typename T, int kTiles>
__device__ __forceinline__ void store_accumulator_row_elems(T* row, const float (&acc)[kTiles][4], int r, int col0,
                                                            int t, int d, float scale) {
  uint16_t* out = reinterpret_cast<uint16_t*>(row);
#pragma unroll
  for (int i = 0; i < kTiles; ++i) {
    const int col = col0 + i * 8 + 2 * t;
    const uint32_t v = MmaType<T>::pack(acc[i][2 * r] * scale, acc[i][2 * r + 1] * scale);
    if (col < d) out[col] = static_cast<uint16_t>(v & 0xffffu);
    if (col + 1 < d) out[col + 1] = static_cast<uint16_t>(v >> 16);
  }
}

}  // namespace orchard::cuda
