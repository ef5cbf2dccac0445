// float32 attention on tensor cores as 3xTF32 (mma.sync m16n8k8 tf32, sm_80+): each fp32
// operand x is split into a tf32 "big" part and the tf32 rounding of its remainder, and a
// product a * b is computed as small_a * big_b + big_a * small_b + big_a * big_b, accumulated
// in fp32. The dropped small_a * small_b term and the two roundings are ~2^-22 of the product:
// the error stays at fp32's level (the same scheme as CUTLASS's OpMultiplyAddFastF32, which
// torch's efficient SDPA runs for fp32), at tensor-core speed instead of fp32 FMA speed.
//
// The kernels mirror the SIMT ones (flash_fp32.cu) and share their per-element semantics
// (fp32_attention_common.cuh: windows, causal, softcap, ALiBi, attn_bias / mask, dropout,
// sinks, varlen, GQA). A warp owns 16 rows (one mma M), a CTA 4 warps = 64 rows, and the
// columns come in tiles of 32 (four mma N tiles) that cp.async copies into shared memory, the
// next tile's copy in flight during this one's compute where two buffers fit (Pipeline):
//   forward  rows = query rows, columns = keys:    S = Q K^T, O += P V;
//   dQ       rows = query rows, columns = keys:    S, dP = dO V^T, dQ += dS K;
//   dK / dV  rows = key rows, columns = queries:   S^T = K Q^T, dP^T = V dO^T,
//            dV += P^T dO, dK += dS^T Q, over every query head of the kv head's group in order.
// Every sum runs in a fixed order (no atomics): the backward is deterministic.
//
// Operands come from shared memory element by element (no ldmatrix: it moves 16-bit elements),
// with row strides of a multiple of 32 floats plus 4, which makes every fragment load of a
// warp hit 32 distinct banks. The score tile's C fragment is reused as the A fragment of the
// next product without a shuffle: a thread holds the tile's columns 2c and 2c + 1 of rows g and
// g + 8, and the mma's A fragment wants k = c and c + 4 of the same rows, so the product reads
// value rows 2c and 2c + 1 of each 8-row chunk as its k = c and c + 4 (one permutation of k
// applied to both operands leaves the product unchanged).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "backends/cuda/fp32_attention_common.cuh"
#include "backends/cuda/launch.h"
#include "orchard/params.h"
#include "orchard/philox.h"

namespace orchard::cuda {
namespace {
using namespace fp32;

constexpr int kWarps = 4;
constexpr int kRows = 16;                   // rows per warp: one mma M
constexpr int kCtaRows = kWarps * kRows;    // 64
constexpr int kCols = 32;                   // columns per tile
constexpr int kColTiles = kCols / 8;        // mma N tiles per column tile
// The forward's and the dQ kernel's __launch_bounds__ minimum of resident CTAs per SM (a register
// cap, 65536 / (128 x it)). Measured on an H100 (session 47, bench/RESULTS.md [G47], 16-byte
// layout): 3 (168 registers) speeds the forward at d <= 128 up 1.11-1.24x at s4k and 1.08-1.19x
// causal at s1k (more warps hide the mma chains' latency; ptxas spills 4-8 B), losing
// 3-13 % only at s1k non-causal (fewer CTAs than 3 per SM: no gain to cover the cap); d256 would
// spill hard and stays uncapped. The dQ kernel gains 1.06x at d64 and loses 8 % at d128 (its
// 253 registers spill when capped), so it is capped at d <= 64 only. Tighter caps lost (session 50,
// [G50]): 4 CTAs for the forward at d128 0.88-0.90x, for the dQ kernel at d64 0.93-0.95x.
// Compile-time knobs for bench/fp32_tc/ab.sh (1 = no cap).
#ifndef ORCHARD_FP32_TC_FWD_MIN_CTAS
#define ORCHARD_FP32_TC_FWD_MIN_CTAS 3
#endif
#ifndef ORCHARD_FP32_TC_DQ_MIN_CTAS
#define ORCHARD_FP32_TC_DQ_MIN_CTAS 3
#endif
// The forward's own minimum at d <= 64: ptxas fits it in 128 registers (4 CTAs) with 16 B of
// spills. Measured on an H100 (session 50, [G50], b2 h16): 1.38x / 1.14x the 3-CTA cap's speed at
// d64 s1k / s4k non-causal, 1.00x / 1.03x causal; d32 1.60x / 1.22x, 1.11x / 1.10x. (The dK / dV
// kernel stays uncapped: 852 B of spills in 168 registers at d64.)
#ifndef ORCHARD_FP32_TC_FWD_MIN_CTAS_D64
#define ORCHARD_FP32_TC_FWD_MIN_CTAS_D64 4
#endif
template <int kOutTiles>
constexpr int kFwdMinCtas =
    kOutTiles <= 8 ? ORCHARD_FP32_TC_FWD_MIN_CTAS_D64 : kOutTiles <= 16 ? ORCHARD_FP32_TC_FWD_MIN_CTAS : 1;
template <int kOutTiles>
constexpr int kDqMinCtas = kOutTiles <= 8 ? ORCHARD_FP32_TC_DQ_MIN_CTAS : 1;

// ---- shared-memory layout of the staged rows -------------------------------------------------
// Two layouts, a compile-time choice (ORCHARD_FP32_TC_VEC_LDS). 1, the default, measured on an H100
// (session 47, [G47]) 1.15-1.24x the forward's and 1.17-1.22x the backward's speed of 0 at d64 / d128
// (s1k / s4k, causal or not; the forward 1.31x at d256), at the cost of more registers (dK / dV d128 spills ~100 B):
//  0: row-major, a row stride of a multiple of 32 floats plus 4, which makes every scalar fragment
//     load of a warp hit 32 distinct banks (LDS.32: one per fragment element).
//  1: 16-byte fragment loads (LDS.128, a quarter of the load instructions). The products read
//     their k (or output) index in a permuted order that gives each thread 4 adjacent floats:
//     tile_scores takes 16 k at a time, thread c holding k0 + 4c .. 4c + 3 as k = c, c + 4 of the
//     first k-step and of the second (one permutation of k on both operands leaves the product
//     unchanged); tile_accumulate's B reads output columns 32G + 4g .. 4g + 3 of group G for its
//     four N tiles 4G .. 4G + 3 (so output column n of tile t is 32 (t / 4) + 4 n + t % 4, which
//     store_rows follows). Rows are a multiple of 32 floats, unpadded, with 16-byte chunks swizzled
//     within each 32-float group: chunk j of row r sits at j ^ swz(r), swz(r) = 2 ((r >> 1) & 3) ^
//     4 (r & 1). A quarter-warp (8 lanes) of tile_scores reads rows g = 2p, 2p + 1 at chunks c
//     (+ 4m): swz(2p) and swz(2p + 1) differ in bit 2, so the two rows' 4 chunks land in opposite
//     halves of the 8; tile_accumulate's reads rows 2c (+ 1) at chunk g: swz(2c) = 2c, so g ^ 2c
//     over g = 2p, 2p + 1 and c = 0..3 is 8 distinct chunks. Both are conflict-free. Widths are
//     zero-filled to a multiple of 32 (odd head dims pay for the padding columns).
#ifndef ORCHARD_FP32_TC_VEC_LDS
#define ORCHARD_FP32_TC_VEC_LDS 1
#endif
constexpr bool kVecLds = ORCHARD_FP32_TC_VEC_LDS != 0;
__host__ __device__ __forceinline__ int pad8(int width) { return (width + 7) / 8 * 8; }
__host__ __device__ __forceinline__ int round32(int width) { return (width + 31) / 32 * 32; }
// Shared-memory row stride (floats) of rows `width` wide.
__host__ __device__ __forceinline__ int tc_stride(int width) { return kVecLds ? round32(width) : round32(width) + 4; }
// The columns staged (the true ones, then zeros): what the products read.
__host__ __device__ __forceinline__ int staged_width(int width) { return kVecLds ? round32(width) : pad8(width); }
// Where column c of (local) row r lies in its shared row.
__device__ __forceinline__ int swizzle_of(int r) { return ((r >> 1) & 3) << 1 ^ (r & 1) << 2; }
struct TcColumns {
  __device__ __forceinline__ int operator()(int r, int c) const { return kVecLds ? c ^ swizzle_of(r) << 2 : c; }
};

// ---- 3xTF32 ------------------------------------------------------------------------------
// The split in integer ops (what cvt.rna.tf32.f32 computes for finite x, in 2 instructions where
// that conversion is a 5-6 instruction sequence on sm_80 / sm_90; the split runs once per operand
// element per mma, so its cost, not the mma's, bounded the kernels): the big part is x rounded to
// nearest (ties away from zero) to tf32, adding half of tf32's last place before clearing the 13
// low bits; the small part, x - big (exact in fp32), is handed over as its bits plus that half
// place and *not* cleared: sm_80 / sm_90 tensor cores ignore a tf32 operand's 13 low bits
// (truncation; PTX leaves tf32's layout to the implementation, CUTLASS's FastF32 relies on the
// same), so the mma sees it rounded to nearest too.
__device__ __forceinline__ uint32_t round_half_up_bits(float x) { return __float_as_uint(x) + 0x1000u; }

// x = big + small (to ~2^-22 relative, once the mma truncates small), for finite x.
// inf and NaN go whole into small, big 0: each of the three products big_a big_b + big_a small_b +
// small_a big_b then meets a non-finite value against the other operand's big part alone, so
// q . k with one inf is +-inf of the right sign (a -inf score masks its key, as in float64: the
// non-finite contract of tests/python/reliability/test_numerics.py) and a NaN is NaN.
// (Before, inf stayed in big with small = inf - inf: big_a times b's small part, 0 or of the other
// sign, made NaN of a -inf score; and the GPU's NaN 0x7fffffff, plus 0x1000, carried into the sign
// bit and reached the mma as -0, dropped — both seen on an H100 in session 45.) Left: inf in both
// operands of one product gives 0 * inf = NaN where fp32 gives +-inf, and a finite x within 2^-12
// of FLT_MAX rounds big to inf (small -inf): NaN there. A NaN whose payload lies in the 13 low bits
// only (never an arithmetic result) reads as inf.
__device__ __forceinline__ void split_tf32(float x, uint32_t& big, uint32_t& small) {
  const bool finite = fabsf(x) < INFINITY;
  big = finite ? round_half_up_bits(x) & 0xffffe000u : 0u;
  small = finite ? round_half_up_bits(x - __uint_as_float(big)) : __float_as_uint(x);
}

// c += A B for one m16n8k8 tile (tf32 operands, fp32 accumulators). Fragments (PTX ISA, g = lane
// / 4, c = lane % 4): A a0 (g, c), a1 (g + 8, c), a2 (g, c + 4), a3 (g + 8, c + 4); B b0 (k = c,
// n = g), b1 (k = c + 4, n = g); C c0 (g, 2c), c1 (g, 2c + 1), c2 (g + 8, 2c), c3 (g + 8, 2c + 1).
__device__ __forceinline__ void mma_tf32(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#elif defined(ORCHARD_DECODE_EMU)
  emu_mma1688_tf32(c, a, b0, b1);
#elif defined(__CUDA_ARCH__)
  __trap();  // no tf32 mma before sm_80 (the backend's kernels all need sm_80)
#endif
}

// A split A fragment, from four fp32 values in its register order.
struct SplitA {
  uint32_t big[4], small[4];
  __device__ __forceinline__ SplitA(float x0, float x1, float x2, float x3) {
    split_tf32(x0, big[0], small[0]);
    split_tf32(x1, big[1], small[1]);
    split_tf32(x2, big[2], small[2]);
    split_tf32(x3, big[3], small[3]);
  }
};

// c += A B in 3xTF32, B given as the fp32 values of b0 and b1. The small terms go first, so that
// they are not lost against an accumulator that already holds the big product.
__device__ __forceinline__ void mma_3xtf32(float (&c)[4], const SplitA& a, float b0, float b1) {
  uint32_t big0, small0, big1, small1;
  split_tf32(b0, big0, small0);
  split_tf32(b1, big1, small1);
  mma_tf32(c, a.small, big0, big1);
  mma_tf32(c, a.big, small0, small1);
  mma_tf32(c, a.big, big0, big1);
}
// The same, the three products summed from zero and then added to c in fp32: the tensor cores
// align a sum to its largest term and drop the bits below it (truncation), so products added
// straight into a large running sum lose their low bits, all toward zero, once per mma; summed
// apart and added with fp32's round-to-nearest, a k-step's products lose only what one fp32 add
// does. (For the score products, whose errors the softmax amplifies; the P V-type products keep
// accumulating in place, which costs no registers.)
__device__ __forceinline__ void mma_3xtf32_apart(float (&c)[4], const SplitA& a, float b0, float b1) {
  float f[4] = {0.f, 0.f, 0.f, 0.f};
  mma_3xtf32(f, a, b0, b1);
#pragma unroll
  for (int e = 0; e < 4; ++e) c[e] += f[e];
}

template <int kTiles>
__device__ __forceinline__ void zero(float (&acc)[kTiles][4]) {
#pragma unroll
  for (int t = 0; t < kTiles; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
}

// ---- the two tile products ----------------------------------------------------------------
// acc = rows_s (the warp's 16 rows) times cols_s (kCols rows)^T over the width (both zero from the
// true width on): acc[t] is the C fragment of columns 8t .. 8t + 7.
__device__ __forceinline__ void tile_scores(float (&acc)[kColTiles][4], const float* rows_s, int rows_stride,
                                            const float* cols_s, int cols_stride, int width, int lane) {
  const int g = lane >> 2, c = lane & 3;
  zero(acc);
  if constexpr (kVecLds) {
    // Every row read here is g (mod 8): one swizzle for all.
    const int swz = swizzle_of(g) << 2;
    const float* r0 = rows_s + g * rows_stride;
    const float* r1 = r0 + 8 * rows_stride;
    const float* col = cols_s + g * cols_stride;
    const int width16 = (width + 15) / 16 * 16;
    for (int k0 = 0; k0 < width16; k0 += 16) {
      const int at = (k0 + 4 * c) ^ swz;
      const float4 x0 = *reinterpret_cast<const float4*>(r0 + at), x1 = *reinterpret_cast<const float4*>(r1 + at);
      const SplitA a_lo(x0.x, x1.x, x0.y, x1.y), a_hi(x0.z, x1.z, x0.w, x1.w);
#pragma unroll
      for (int t = 0; t < kColTiles; ++t) {
        const float4 b = *reinterpret_cast<const float4*>(col + 8 * t * cols_stride + at);
        mma_3xtf32_apart(acc[t], a_lo, b.x, b.y);
        mma_3xtf32_apart(acc[t], a_hi, b.z, b.w);
      }
    }
  } else {
    const float* r0 = rows_s + g * rows_stride + c;
    const float* r1 = r0 + 8 * rows_stride;
    const float* col = cols_s + g * cols_stride + c;
    const int width8 = pad8(width);
    for (int k0 = 0; k0 < width8; k0 += 8) {
      const SplitA a(r0[k0], r1[k0], r0[k0 + 4], r1[k0 + 4]);
#pragma unroll
      for (int t = 0; t < kColTiles; ++t) {
        const float* b = col + 8 * t * cols_stride + k0;
        mma_3xtf32_apart(acc[t], a, b[0], b[4]);
      }
    }
  }
}

// Output column of element e (0, 1) of a thread's C fragment of output tile t (the layout comment).
__device__ __forceinline__ int out_col(int lane, int t, int e) {
  const int n = 2 * (lane & 3) + e;
  return kVecLds ? 32 * (t >> 2) + 4 * n + (t & 3) : 8 * t + n;
}

// out += w (16 rows x kCols, as tile_scores' C fragments) times vals_s (kCols rows, the tile's)
// over the output columns < width: out[t] is the C fragment of output tile t (out_col).
template <int kOutTiles>
__device__ __forceinline__ void tile_accumulate(float (&out)[kOutTiles][4], const float (&w)[kColTiles][4],
                                                const float* vals_s, int vals_stride, int width, int lane) {
  const int g = lane >> 2, c = lane & 3;
#pragma unroll
  for (int kk = 0; kk < kColTiles; ++kk) {
    // Weight columns 8kk + 2c, 8kk + 2c + 1 as k = c, c + 4 (header comment); value rows likewise.
    const SplitA a(w[kk][0], w[kk][2], w[kk][1], w[kk][3]);
    if constexpr (kVecLds) {
      static_assert(kOutTiles % 4 == 0, "output tiles come in groups of 4");
      // Rows 8kk + 2c and 8kk + 2c + 1: swizzles 2c and 2c ^ 4 (chunk g of group G at 8G + (g ^ swz)).
      const float* v0 = vals_s + (8 * kk + 2 * c) * vals_stride + 4 * (g ^ (2 * c));
      const float* v1 = vals_s + (8 * kk + 2 * c + 1) * vals_stride + 4 * (g ^ (2 * c) ^ 4);
#pragma unroll
      for (int grp = 0; grp < kOutTiles / 4; ++grp) {
        if (32 * grp >= width) break;
        const float4 b0 = *reinterpret_cast<const float4*>(v0 + 32 * grp);
        const float4 b1 = *reinterpret_cast<const float4*>(v1 + 32 * grp);
        mma_3xtf32(out[4 * grp], a, b0.x, b1.x);
        mma_3xtf32(out[4 * grp + 1], a, b0.y, b1.y);
        mma_3xtf32(out[4 * grp + 2], a, b0.z, b1.z);
        mma_3xtf32(out[4 * grp + 3], a, b0.w, b1.w);
      }
    } else {
      const float* v = vals_s + (8 * kk + 2 * c) * vals_stride + g;
#pragma unroll
      for (int t = 0; t < kOutTiles; ++t) {
        if (8 * t >= width) break;
        mma_3xtf32(out[t], a, v[8 * t], v[vals_stride + 8 * t]);
      }
    }
  }
}

// The sum over the 4 threads of a quad (the threads holding one fragment row).
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

// Rows (or columns) of a 16-row fragment a thread holds: row g (elements 0, 1) and g + 8 (2, 3);
// columns 8t + 2c and 8t + 2c + 1 of each N tile t.
__device__ __forceinline__ int frag_row(int lane, int half) { return (lane >> 2) + 8 * half; }
__device__ __forceinline__ int frag_col(int lane, int t, int e) { return 8 * t + 2 * (lane & 3) + e; }

// Writes a warp's 16 x width accumulator rows: row r to base + r * row_stride, times scale[half].
template <int kTiles>
__device__ __forceinline__ void store_rows(float* base, int64_t row_stride, const float (&acc)[kTiles][4],
                                           const float (&scale)[2], const bool (&valid)[2], int width, int lane) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    if (!valid[half]) continue;
    float* row = base + frag_row(lane, half) * row_stride;
#pragma unroll
    for (int t = 0; t < kTiles; ++t)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = out_col(lane, t, e);
        if (col < width) row[col] = acc[t][2 * half + e] * scale[half];
      }
  }
}

// ---- the column tiles' pipeline -------------------------------------------------------------
// Column tiles reach shared memory by cp.async (stage_rows_async), in `stages` buffers:
//   1 stage:  wait for tile i, sync, compute, sync, issue tile i + 1 (the copy is exposed);
//   2 stages: wait for tile i, sync, issue tile i + 1 into the other buffer, compute tile i (the
//             copy overlaps it; the sync also tells that every warp is done with tile i - 1,
//             the other buffer's last contents).
// launches pick the count per kernel (pick_stages). One barrier per tile with 2 stages, two with 1.
struct Pipeline {
  int stages;
  __device__ __forceinline__ int buffer(int step) const { return stages == 2 ? step & 1 : 0; }
  // Before step `step`'s compute: its tile is in shared memory; with 2 stages, step + 1's is issued.
  template <typename Issue>
  __device__ __forceinline__ void begin(int step, Issue&& issue) const {
    cp_async_wait<0>();
    __syncthreads();
    if (stages == 2) issue(step + 1, buffer(step + 1));
  }
  // After step `step`'s compute: with 1 stage, step + 1's tile is issued once every warp is done.
  template <typename Issue>
  __device__ __forceinline__ void end(int step, Issue&& issue) const {
    if (stages == 1) {
      __syncthreads();
      issue(step + 1, 0);
    }
  }
};

// One buffer of the pipeline: a column tile of width d (K or Q) and one of width dv (V or dO).
__host__ __device__ __forceinline__ std::size_t stage_floats_of(int d, int dv) {
  return static_cast<std::size_t>(kCols) * (tc_stride(d) + tc_stride(dv));
}

// stage_rows_async into this file's layout: rows `width` wide at row stride tc_stride(width).
__device__ __forceinline__ void stage_tc_rows(float* dst, int width, const float* src, int64_t src_stride, int rows,
                                              int valid, int warp, int warps, int lane) {
  stage_rows_async(dst, tc_stride(width), src, src_stride, rows, valid, width, staged_width(width), warp, warps, lane,
                   TcColumns{});
}

// The column tiles of [range.begin, range.end), kCols wide (the last one narrower).
struct ColTiles {
  ColRange range;
  __device__ __forceinline__ int count() const {
    return range.end > range.begin ? static_cast<int>((range.end - range.begin + kCols - 1) / kCols) : 0;
  }
  __device__ __forceinline__ int64_t start(int i) const { return range.begin + static_cast<int64_t>(i) * kCols; }
  __device__ __forceinline__ int width(int64_t tile) const {
    return static_cast<int>(min(static_cast<int64_t>(kCols), range.end - tile));
  }
};

// Issues the copies of one buffer: rows [0, n) of a (width wa: K or Q) at buf, row stride
// tc_stride(wa), and of b (width wb: V or dO) kCols rows of a after it, row stride tc_stride(wb).
__device__ __forceinline__ void stage_tile_pair(float* buf, const float* a, int64_t a_stride, int wa, const float* b,
                                                int64_t b_stride, int wb, int n, int warp, int lane) {
  stage_tc_rows(buf, wa, a, a_stride, kCols, n, warp, kWarps, lane);
  stage_tc_rows(buf + kCols * tc_stride(wa), wb, b, b_stride, kCols, n, warp, kWarps, lane);
}

// ---- forward -------------------------------------------------------------------------------
// Shared memory: the CTA's Q rows, then `stages` (K tile, V tile) buffers.
std::size_t fwd_tc_smem_bytes(int d, int dv, int stages) {
  return sizeof(float) * (static_cast<std::size_t>(kCtaRows) * tc_stride(d) + stages * stage_floats_of(d, dv));
}

// kOutTiles: dv <= 8 kOutTiles.
template <int kOutTiles>
__global__ void __launch_bounds__(128, kFwdMinCtas<kOutTiles>)
    fwd_tc_kernel(const FwdParams p, int row_blocks, Pipeline pipe) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const RowBlock blk = row_block(p.hq, row_blocks, kCtaRows);
  const int b = blk.b, h = blk.head, row0 = blk.row0;
  const SeqSpan span = seq_span(p, b);
  if (row0 >= span.len_q) return;  // varlen: past this sequence (the whole CTA)
  const int hk = h / (p.hq / p.hkv);
  const int d = p.d, dv = value_dim(p);
  const int qs = tc_stride(d), vs = tc_stride(dv);
  float* q_s = reinterpret_cast<float*>(smem);
  float* kv_s = q_s + kCtaRows * qs;  // buffer i: K at kv_s + i * stage_floats, V kCols * qs after it
  const int stage_floats = static_cast<int>(stage_floats_of(d, dv));
  const float* q = static_cast<const float*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
                   span.q_start * p.q_row_stride;
  const float* k = static_cast<const float*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride +
                   span.k_start * p.k_row_stride;
  const float* v = static_cast<const float*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride +
                   span.k_start * p.v_row_stride;
  const int warp_row0 = row0 + warp * kRows;
  float* q_w = q_s + warp * kRows * qs;
  const ColRange cta_keys = union_of_ranges(p, span, row0, kCtaRows, span.len_q, KeyRange{});
  const ColRange warp_keys = union_of_ranges(p, span, warp_row0, kRows, span.len_q, KeyRange{});
  const ColTiles tiles{cta_keys};
  // Step `step`'s K / V tile into buffer `buf` (one commit group, empty past the last step).
  auto issue = [&](int step, int buf) {
    if (step < tiles.count()) {
      const int64_t tile = tiles.start(step);
      stage_tile_pair(kv_s + buf * stage_floats, k + tile * p.k_row_stride, p.k_row_stride, d,
                      v + tile * p.v_row_stride, p.v_row_stride, dv, tiles.width(tile), warp, lane);
    }
    cp_async_commit();
  };
  // The warp's Q rows travel with the first tile.
  stage_tc_rows(q_w, d, q + warp_row0 * p.q_row_stride, p.q_row_stride, kRows, span.len_q - warp_row0, 0, 1, lane);
  issue(0, 0);
  ColRange visible[2];
  BiasLine bias[2];
  float m[2], l[2];  // l: this thread's columns only
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int i = warp_row0 + frag_row(lane, half);
    visible[half] = i < span.len_q ? key_range(p, span, i) : ColRange{0, 0};
    bias[half] = bias_line(p, b, h, i < span.len_q ? i : 0, true);
    m[half] = -INFINITY;
    l[half] = 0.f;
  }
  float o[kOutTiles][4];
  zero(o);
  const float slope = slope_of(p, b, h);
  const Dropout drop = dropout_of(p);
  for (int step = 0; step < tiles.count(); ++step) {
    const int64_t tile = tiles.start(step);
    const int n = tiles.width(tile);
    pipe.begin(step, issue);
    const float* k_s = kv_s + pipe.buffer(step) * stage_floats;
    const float* v_s = k_s + kCols * qs;
    if (tile < warp_keys.end && tile + n > warp_keys.begin) {  // some row of this warp sees the tile
      float s[kColTiles][4];
      tile_scores(s, q_w, qs, k_s, qs, d, lane);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t i = warp_row0 + frag_row(lane, half);
        float tile_max = -INFINITY;
#pragma unroll
        for (int t = 0; t < kColTiles; ++t)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = frag_col(lane, t, e);
            const int64_t j = tile + col;
            const bool seen = col < n && j >= visible[half].begin && j < visible[half].end;
            float& x = s[t][2 * half + e];
            x = seen ? final_score(p, x, slope, i, j, span.diag, bias[half], j) : -INFINITY;
            tile_max = fmaxf(tile_max, x);  // fmaxf skips NaN: a NaN score reaches l and O below
          }
        const float m_new = fmaxf(m[half], quad_max(tile_max));
        const float corr = m_new == -INFINITY ? 1.f : expf(m[half] - m_new);  // m = -inf: 0
        float sum = 0.f;
#pragma unroll
        for (int t = 0; t < kColTiles; ++t)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float& x = s[t][2 * half + e];
            const int64_t j = tile + frag_col(lane, t, e);
            const bool seen = x != -INFINITY;  // (a seen score of -inf weighs 0 either way)
            const float ex = m_new == -INFINITY ? (x != x ? x : 0.f) : expf(x - m_new);
            sum += ex;
            x = !seen || kept(p, drop, b, h, i, j) ? ex : 0.f;
          }
        m[half] = m_new;
        l[half] = l[half] * corr + sum;
#pragma unroll
        for (int t = 0; t < kOutTiles; ++t) o[t][2 * half] *= corr, o[t][2 * half + 1] *= corr;
      }
      tile_accumulate(o, s, v_s, vs, dv, lane);
    }
    pipe.end(step, issue);
  }
  cp_async_wait<0>();  // (no copy outlives the CTA: the last, empty group; Q's where no key is seen)
  float inv[2];
  bool valid[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const float sum = quad_sum(l[half]);
    const int64_t i = warp_row0 + frag_row(lane, half);
    valid[half] = i < span.len_q;
    const RowEnd end = row_end(p, h, m[half], sum, drop.rdrop);
    inv[half] = end.inv;
    if (valid[half] && (lane & 3) == 0)
      static_cast<float*>(p.lse)[b * p.lse_batch_stride + h * p.lse_head_stride + span.q_start + i] = end.lse;
  }
  store_rows(static_cast<float*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride +
                 (span.q_start + warp_row0) * p.o_row_stride,
             p.o_row_stride, o, inv, valid, dv, lane);
}

// ---- backward: dQ --------------------------------------------------------------------------
// Shared memory of either backward kernel: the CTA's 64 rows, each as a row of width d (Q or K)
// and one of width dv (dO or V), then `stages` buffers of a 32-row tile of the same two widths.
// 101,376 bytes at d = dv = 128 and one stage: exactly the 99 KB opt-in of sm_86 / sm_89, so the
// dK / dV kernel reads its columns' LSE and D from global memory (L1) where it needs them rather
// than staging them.
std::size_t bwd_tc_smem_bytes(int d, int dv, int stages) {
  return sizeof(float) * (static_cast<std::size_t>(kCtaRows) * (tc_stride(d) + tc_stride(dv)) +
                          stages * stage_floats_of(d, dv));
}

// dQ: the CTA's Q and dO rows against K / V tiles.
// kOutTiles: d <= 8 kOutTiles.
template <int kOutTiles>
__global__ void __launch_bounds__(128, kDqMinCtas<kOutTiles>)
    bwd_dq_tc_kernel(const BwdParams p, const float* dsum, int row_blocks, Pipeline pipe) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const RowBlock blk = row_block(p.hq, row_blocks, kCtaRows);
  const int b = blk.b, h = blk.head, row0 = blk.row0;
  const SeqSpan span = seq_span(p, b);
  if (row0 >= span.len_q) return;  // varlen: past this sequence (the whole CTA)
  const int hk = h / (p.hq / p.hkv);
  const int d = p.d, dv = value_dim(p);
  const int qs = tc_stride(d), os = tc_stride(dv);
  float* q_s = reinterpret_cast<float*>(smem);
  float* do_s = q_s + kCtaRows * qs;
  float* kv_s = do_s + kCtaRows * os;  // buffer i: K at kv_s + i * stage_floats, V kCols * qs after it
  const int stage_floats = static_cast<int>(stage_floats_of(d, dv));
  const int warp_row0 = row0 + warp * kRows;
  float* q_w = q_s + warp * kRows * qs;
  float* do_w = do_s + warp * kRows * os;
  const float* k = static_cast<const float*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride +
                   span.k_start * p.k_row_stride;
  const float* v = static_cast<const float*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride +
                   span.k_start * p.v_row_stride;
  const ColRange cta_keys = union_of_ranges(p, span, row0, kCtaRows, span.len_q, KeyRange{});
  const ColRange warp_keys = union_of_ranges(p, span, warp_row0, kRows, span.len_q, KeyRange{});
  const ColTiles tiles{cta_keys};
  auto issue = [&](int step, int buf) {
    if (step < tiles.count()) {
      const int64_t tile = tiles.start(step);
      stage_tile_pair(kv_s + buf * stage_floats, k + tile * p.k_row_stride, p.k_row_stride, d,
                      v + tile * p.v_row_stride, p.v_row_stride, dv, tiles.width(tile), warp, lane);
    }
    cp_async_commit();
  };
  // The warp's Q and dO rows travel with the first tile.
  stage_tc_rows(q_w, d,
                static_cast<const float*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
                    (span.q_start + warp_row0) * p.q_row_stride,
                p.q_row_stride, kRows, span.len_q - warp_row0, 0, 1, lane);
  stage_tc_rows(do_w, dv,
                static_cast<const float*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride +
                    (span.q_start + warp_row0) * p.do_row_stride,
                p.do_row_stride, kRows, span.len_q - warp_row0, 0, 1, lane);
  issue(0, 0);
  const int64_t bh = static_cast<int64_t>(b) * p.hq + h;
  ColRange visible[2];
  BiasLine bias[2];
  float lse[2], D[2];
  bool valid[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int i = warp_row0 + frag_row(lane, half);
    valid[half] = i < span.len_q;
    visible[half] = valid[half] ? key_range(p, span, i) : ColRange{0, 0};
    bias[half] = bias_line(p, b, h, valid[half] ? i : 0, true);
    lse[half] = valid[half] ? lse_or_inf(static_cast<const float*>(p.lse)[b * p.lse_batch_stride +
                                                                         h * p.lse_head_stride + span.q_start + i])
                            : INFINITY;
    D[half] = valid[half] ? dsum[bh * p.sq + i] : 0.f;
  }
  float dq[kOutTiles][4];
  zero(dq);
  const float slope = slope_of(p, b, h);
  const Dropout drop = dropout_of(p);
  for (int step = 0; step < tiles.count(); ++step) {
    const int64_t tile = tiles.start(step);
    const int n = tiles.width(tile);
    pipe.begin(step, issue);
    const float* k_s = kv_s + pipe.buffer(step) * stage_floats;
    const float* v_s = k_s + kCols * qs;
    if (tile < warp_keys.end && tile + n > warp_keys.begin) {  // some row of this warp sees the tile
      float s[kColTiles][4], dp[kColTiles][4];
      tile_scores(s, q_w, qs, k_s, qs, d, lane);
      tile_scores(dp, do_w, os, v_s, os, dv, lane);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t i = warp_row0 + frag_row(lane, half);
#pragma unroll
        for (int t = 0; t < kColTiles; ++t)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = frag_col(lane, t, e);
            const int64_t j = tile + col;
            const bool seen = col < n && j >= visible[half].begin && j < visible[half].end;
            s[t][2 * half + e] = seen ? grad_weights(p, drop, b, h, s[t][2 * half + e], dp[t][2 * half + e],
                                                     lse[half], D[half], slope, i, j, span.diag, bias[half], j)
                                            .ds
                                      : 0.f;
          }
      }
      tile_accumulate(dq, s, k_s, qs, d, lane);
    }
    pipe.end(step, issue);
  }
  cp_async_wait<0>();
  const float scale[2] = {p.scale, p.scale};
  store_rows(static_cast<float*>(p.dq) + b * p.dq_batch_stride + h * p.dq_head_stride +
                 (span.q_start + warp_row0) * p.dq_row_stride,
             p.dq_row_stride, dq, scale, valid, d, lane);
}

// ---- backward: dK / dV ---------------------------------------------------------------------
// The CTA's K and V rows against the Q / dO tiles of each query head of the group.
// kOutTiles: d, dv <= 8 kOutTiles.
template <int kOutTiles>
__global__ void __launch_bounds__(128)
    bwd_dkdv_tc_kernel(const BwdParams p, const float* dsum, int row_blocks, Pipeline pipe) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const RowBlock blk = row_block(p.hkv, row_blocks, kCtaRows);
  const int b = blk.b, hk = blk.head, key0 = blk.row0;
  const SeqSpan span = seq_span(p, b);
  if (key0 >= span.len_k) return;  // varlen: past this sequence (the whole CTA)
  const int group = p.hq / p.hkv;
  const int d = p.d, dv = value_dim(p);
  const int ks = tc_stride(d), vs = tc_stride(dv);
  float* k_s = reinterpret_cast<float*>(smem);
  float* v_s = k_s + kCtaRows * ks;
  float* qdo_s = v_s + kCtaRows * vs;  // buffer i: the query tile at qdo_s + i * stage_floats (stride
                                       // ks), the dO tile kCols * ks after it (stride vs)
  const int stage_floats = static_cast<int>(stage_floats_of(d, dv));
  const int warp_key0 = key0 + warp * kRows;
  float* k_w = k_s + warp * kRows * ks;
  float* v_w = v_s + warp * kRows * vs;
  // The query rows any key of the CTA (of this warp) is seen by; each of this thread's keys' own.
  const ColRange cta_rows = union_of_ranges(p, span, key0, kCtaRows, span.len_k, QueryRange{});
  const ColRange warp_rows = union_of_ranges(p, span, warp_key0, kRows, span.len_k, QueryRange{});
  // The steps: every query tile of cta_rows for each query head of the group, in order.
  const ColTiles tiles{cta_rows};
  const int steps = tiles.count() * group;
  auto tile_of = [&](int step) { return tiles.start(step % tiles.count()); };
  auto head_of = [&](int step) { return hk * group + step / tiles.count(); };
  auto issue = [&](int step, int buf) {
    if (step < steps) {
      const int h = head_of(step);
      const int64_t tile = tile_of(step);
      const float* q = static_cast<const float*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
                       (span.q_start + tile) * p.q_row_stride;
      const float* dO = static_cast<const float*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride +
                        (span.q_start + tile) * p.do_row_stride;
      stage_tile_pair(qdo_s + buf * stage_floats, q, p.q_row_stride, d, dO, p.do_row_stride, dv, tiles.width(tile),
                      warp, lane);
    }
    cp_async_commit();
  };
  // The warp's K and V rows travel with the first tile.
  stage_tc_rows(k_w, d,
                static_cast<const float*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride +
                    (span.k_start + warp_key0) * p.k_row_stride,
                p.k_row_stride, kRows, span.len_k - warp_key0, 0, 1, lane);
  stage_tc_rows(v_w, dv,
                static_cast<const float*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride +
                    (span.k_start + warp_key0) * p.v_row_stride,
                p.v_row_stride, kRows, span.len_k - warp_key0, 0, 1, lane);
  issue(0, 0);
  ColRange seen_by[2];
  bool valid[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int j = warp_key0 + frag_row(lane, half);
    valid[half] = j < span.len_k;
    seen_by[half] = valid[half] ? query_range(p, span, j) : ColRange{0, 0};
  }
  float dk[kOutTiles][4], dvacc[kOutTiles][4];
  zero(dk);
  zero(dvacc);
  const Dropout drop = dropout_of(p);
  for (int step = 0; step < steps; ++step) {
    const int h = head_of(step);
    const int64_t tile = tile_of(step);
    const int n = tiles.width(tile);
    pipe.begin(step, issue);
    const float* q_s = qdo_s + pipe.buffer(step) * stage_floats;
    const float* do_s = q_s + kCols * ks;
    if (tile < warp_rows.end && tile + n > warp_rows.begin) {  // some key of this warp is seen
      const int64_t bh = static_cast<int64_t>(b) * p.hq + h;
      const float slope = slope_of(p, b, h);
      const float* lse_row = static_cast<const float*>(p.lse) + b * p.lse_batch_stride + h * p.lse_head_stride +
                             span.q_start;
      BiasLine bias[2];
#pragma unroll
      for (int half = 0; half < 2; ++half)
        bias[half] = bias_line(p, b, h, valid[half] ? warp_key0 + frag_row(lane, half) : 0, false);
      float s[kColTiles][4], dp[kColTiles][4];
      tile_scores(s, k_w, ks, q_s, ks, d, lane);
      tile_scores(dp, v_w, vs, do_s, vs, dv, lane);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t j = warp_key0 + frag_row(lane, half);
#pragma unroll
        for (int t = 0; t < kColTiles; ++t)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = frag_col(lane, t, e);
            const int64_t i = tile + col;
            const bool seen = col < n && i >= seen_by[half].begin && i < seen_by[half].end;
            const GradWeights w =
                seen ? grad_weights(p, drop, b, h, s[t][2 * half + e], dp[t][2 * half + e], lse_or_inf(lse_row[i]),
                                    dsum[bh * p.sq + i], slope, i, j, span.diag, bias[half], i)
                     : GradWeights{};
            s[t][2 * half + e] = w.pd;
            dp[t][2 * half + e] = w.ds;
          }
      }
      tile_accumulate(dvacc, s, do_s, vs, dv, lane);
      tile_accumulate(dk, dp, q_s, ks, d, lane);
    }
    pipe.end(step, issue);
  }
  cp_async_wait<0>();
  const float scale[2] = {p.scale, p.scale}, one[2] = {1.f, 1.f};
  store_rows(static_cast<float*>(p.dk) + b * p.dk_batch_stride + hk * p.dk_head_stride +
                 (span.k_start + warp_key0) * p.dk_row_stride,
             p.dk_row_stride, dk, scale, valid, d, lane);
  store_rows(static_cast<float*>(p.dv) + b * p.dv_batch_stride + hk * p.dv_head_stride +
                 (span.k_start + warp_key0) * p.dv_row_stride,
             p.dv_row_stride, dvacc, one, valid, dv, lane);
}

// ---- launches ------------------------------------------------------------------------------
// ORCHARD_CUDA_FP32_TC=0 (read per call) keeps every fp32 call on the SIMT kernels (A/B timing).
bool tensor_cores_enabled() {
  const char* e = std::getenv("ORCHARD_CUDA_FP32_TC");
  return e == nullptr || std::strcmp(e, "0") != 0;
}

bool fits(std::size_t smem) { return smem <= static_cast<std::size_t>(smem_optin_bytes()); }

// kernel_for(std::integral_constant<int, kOutTiles>) for the smallest of 8, 16 (and 32 where
// kWide) tiles that holds `width` columns.
template <bool kWide, typename Pick>
void by_width(int width, Pick&& kernel_for) {
  if (width <= 64) return kernel_for(std::integral_constant<int, 8>{});
  if (width <= 128) return kernel_for(std::integral_constant<int, 16>{});
  if constexpr (kWide) {
    if (width <= 256) return kernel_for(std::integral_constant<int, 32>{});
  }
  throw Error(ErrorKind::kNotImplemented, "fp32 tensor-core kernels: head dim " + std::to_string(width) +
                                              " is wider than their accumulators");
}

template <typename Kernel, typename... Args>
void launch(Kernel kernel, int64_t ctas, std::size_t smem, void* stream, const char* name, const Args&... args) {
  if (ctas == 0) return;
  set_max_dynamic_smem(kernel, static_cast<int>(smem));
  kernel<<<static_cast<unsigned>(ctas), kWarps * 32, smem, static_cast<cudaStream_t>(stream)>>>(args...);
  check_launch(name);
}

int row_blocks_of(int rows) { return (rows + kCtaRows - 1) / kCtaRows; }

// The pipeline's stage count for `kernel`, whose shared memory is smem_of(stages): 2 (the copy of
// the next tile overlaps this one's compute) where it fits the opt-in and keeps as many CTAs
// resident per SM as one stage (registers included: the d128 forward's ~230 registers allow 2
// either way), or at least 3; else 1 (the d128 backward: 101 KB and 2 CTAs with one stage, 135 KB
// and 1 with two; the other CTA computes during a CTA's copies). Not tuned on a GPU yet:
// -DORCHARD_FP32_TC_STAGES=1 or 2 forces a count where it fits (bench/fp32_tc/ab.sh).
#ifndef ORCHARD_FP32_TC_STAGES
#define ORCHARD_FP32_TC_STAGES 0
#endif
template <typename Kernel, typename SmemOf>
Pipeline pick_stages(Kernel kernel, SmemOf&& smem_of, bool two_fit) {
  if (!two_fit) return Pipeline{1};
  if (ORCHARD_FP32_TC_STAGES == 1 || ORCHARD_FP32_TC_STAGES == 2) return Pipeline{ORCHARD_FP32_TC_STAGES};
  const int one = resident_ctas(kernel, kWarps * 32, smem_of(1)), two = resident_ctas(kernel, kWarps * 32, smem_of(2));
  return Pipeline{two >= one || two >= 3 ? 2 : 1};
}

// Launches kernel_for(tiles) (by_width) with the pipeline and shared memory pick_stages gives it.
template <typename Kernel, typename SmemOf, typename... Args>
void launch_pipelined(Kernel kernel, int64_t ctas, SmemOf&& smem_of, void* stream, const char* name,
                      const Args&... args) {
  if (ctas == 0) return;
  const bool two_fit = fits(smem_of(2));
  set_max_dynamic_smem(kernel, static_cast<int>(smem_of(two_fit ? 2 : 1)));  // (before the occupancy query)
  const Pipeline pipe = pick_stages(kernel, smem_of, two_fit);
  launch(kernel, ctas, smem_of(pipe.stages), stream, name, args..., pipe);
}

}  // namespace

bool fp32_fwd_takes_tensor_cores(const FwdParams& p) {
  // (dv > 256 has no accumulator width here; the backend refuses it before, this keeps the rule local.)
  return tensor_cores_enabled() && value_dim(p) <= 256 && fits(fwd_tc_smem_bytes(p.d, value_dim(p), 1));
}

bool fp32_bwd_takes_tensor_cores(const BwdParams& p) {
  // d > 128 would hold dK and dV's 2 x 128 accumulators per thread next to the tiles': past the
  // 255-register limit, so those stay on the SIMT kernels.
  const int d = p.d, dv = value_dim(p);
  return tensor_cores_enabled() && d <= 128 && dv <= 128 && fits(bwd_tc_smem_bytes(d, dv, 1));
}

void run_fwd_fp32_tc(const FwdParams& p) {
  const int row_blocks = row_blocks_of(p.sq);
  const int d = p.d, dv = value_dim(p);
  const auto smem_of = [&](int stages) { return fwd_tc_smem_bytes(d, dv, stages); };
  by_width<true>(dv, [&](auto tiles) {
    launch_pipelined(fwd_tc_kernel<decltype(tiles)::value>, int64_t{p.b} * p.hq * row_blocks, smem_of, p.stream,
                     "fwd_tc_kernel", p, row_blocks);
  });
}

void run_bwd_fp32_tc(const BwdParams& p, const float* dsum) {
  const int d = p.d, dv = value_dim(p);
  const int q_blocks = row_blocks_of(p.sq), k_blocks = row_blocks_of(p.sk);
  const auto smem_of = [&](int stages) { return bwd_tc_smem_bytes(d, dv, stages); };
  by_width<false>(d, [&](auto tiles) {
    launch_pipelined(bwd_dq_tc_kernel<decltype(tiles)::value>, int64_t{p.b} * p.hq * q_blocks, smem_of, p.stream,
                     "bwd_dq_tc_kernel", p, dsum, q_blocks);
  });
  by_width<false>(d > dv ? d : dv, [&](auto tiles) {
    launch_pipelined(bwd_dkdv_tc_kernel<decltype(tiles)::value>, int64_t{p.b} * p.hkv * k_blocks, smem_of, p.stream,
                     "bwd_dkdv_tc_kernel", p, dsum, k_blocks);
  });
}

}  // namespace orchard::cuda
