// Shared pieces of the CPU forward and backward kernels: tile sizes, stage
// budget, K / V row offsets and the entry's dtype dispatch. (Which columns a row sees: visibility.h.)
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "backends/cpu/visibility.h"
#include "orchard/params.h"


#ifdef ORCHARD_WITH_OPENMP
#include <omp.h>
#define ORCHARD_OMP(directive) _Pragma(directive)
#else
#define ORCHARD_OMP(directive)
#endif

namespace orchard::cpu {

// Tile sizes: kBlockM query rows per task x kBlockN key columns per step.
// Measured on the 2-core AVX2 dev box (AMD EPYC, 2.45 GHz), fp32, b1 h8
// s1024 d64, one thread, CPU time (min of 4 runs; the box was shared, so
// differences under ~5% are noise). fwd / bwd ms:
//   32x64 38.7 / 137   64x32 38.7 / 128   64x64 36.0 / 116
//   96x64 37.0 / 120   64x128 37.2 / 121  128x64 35.2 / 118
// 64x64 is as good as any and keeps the per-thread scratch (S, dP tiles +
// 64 x d accumulators) inside L1/L2 up to d = 256. Override with
// -DORCHARD_CPU_BLOCK_M=... / -DORCHARD_CPU_BLOCK_N=... (N a multiple of 16).
#ifndef ORCHARD_CPU_BLOCK_M
#define ORCHARD_CPU_BLOCK_M 64
#endif
#ifndef ORCHARD_CPU_BLOCK_N
#define ORCHARD_CPU_BLOCK_N 64
#endif
inline constexpr int kBlockM = ORCHARD_CPU_BLOCK_M;
inline constexpr int kBlockN = ORCHARD_CPU_BLOCK_N;
static_assert(kBlockN % 16 == 0, "column tiles must be a multiple of the GEMM N multiple");

// Key columns per tile of the fp32 forward on AVX-512 CPUs (forward.cpp; the
// backward and other CPUs keep kBlockN): the softmax's per-row work (max,
// sum, alpha, rescale of the O row) is spread over twice the columns. 2-core
// Zen 5, 2 threads, alternating rounds, time at 64 / at 128 columns, fp32
// forward: s1k d64 causal 1.06-1.08x, dropout 1.09-1.11x; non-causal s512 d64
// 0.98-1.06x, s1k d64 1.00-1.07x, s2k d128 0.99-1.06x (three A/Bs of 3-5
// rounds: small against this box's noise); 192 columns lost 7 % at s512 d64
// (session 20, bench/NOTES.md). Only up to d (and d_v, padded) 64: at d128 the
// 128-column K^T and V tiles (64 KB each) no longer stay in the 48 KB L1 beside
// Q, S and O, and 128 columns were slower, 1 thread, 3 rounds: s512 / s1k / s2k
// d128 0.885 / 0.932 / 0.935x of 64 (d between 64 and 128 not measured).
// g_fp32_fwd_block_n, when set, is taken on any CPU (tests).
inline constexpr int kFp32FwdBlockNAvx512 = 128, kFp32WideTileMaxD = 64;
// Query rows per task of the forward off the bf16 path (fp32, fp16, fp64) when kBlockM rows would give fewer tasks than
// threads (forward.cpp). 2-core Zen 4, 2 threads, b1 h1 s64 d64 fp32, p10 of 3000 calls: 24.6 ->
// 19.9 us (torch's SDPA 14.1); with the 64-column tile for keys <= kBlockN (rather than 128
// columns half padding) 28.3 -> 19.9 us in all. Staging K / V on the calling thread instead of
// in parallel lost (21.7 us).
inline constexpr int kFp32SmallBlockM = 32;
inline int g_fp32_fwd_block_n = 0;

// Backward dQ partial-sum buffers per (batch, kv head) pair (backward.cpp):
// the column blocks are split over this many slots, each an independent task
// with its own g * sq x d fp32 accumulator. Fixed, so results do not depend
// on the thread count; 8 keeps 2-16 threads busy when few pairs are staged.
inline constexpr int kDqSlots = 8;

// Converted K/V (and Q/dO in the backward) are staged per chunk of
// (batch, kv head) pairs; a chunk holds at most this many bytes (but always
// at least one pair), so memory stays bounded for long sequences.
// (Mutable only so tests can force the multi-chunk path.)
inline std::size_t g_stage_budget_bytes = std::size_t(64) << 20;

constexpr std::int64_t round_up(std::int64_t x, std::int64_t m) { return (x + m - 1) / m * m; }

// Element offsets of key row `row` (a row of the whole tensor, i.e. already
// offset by the sequence's k_start) of kv head kh of batch entry bi, in K and V.
struct KvRowOffsets {
  std::int64_t k, v;
};
inline KvRowOffsets kv_row_offsets(const orchard::FwdParams& p, std::int64_t bi, std::int64_t kh,
                                   std::int64_t row) {
  return {bi * p.k_batch_stride + row * p.k_row_stride + kh * p.k_head_stride,
          bi * p.v_batch_stride + row * p.v_row_stride + kh * p.v_head_stride};
}

// The kernels' entry: normalized params (visibility.h) and the compute type,
// double for fp64 inputs (gradcheck), float for the rest; fn(p, T{}).
template <class Params, class Fn>
void with_compute_type(const Params& params, Fn&& fn) {
  const Params p = normalized(params);
  if (p.dtype == DType::kFloat64)
    fn(p, double{});
  else
    fn(p, float{});
}

// Softmax scale and dropout probability in the compute type: float64 compute
// uses the unrounded values (float32 rounding would show up under gradcheck).
template <class T>
inline T softmax_scale(const orchard::FwdParams& p) {
  return static_cast<T>(sizeof(T) == 8 ? p.scale_f64 : static_cast<double>(p.scale));
}
template <class T>
inline T dropout_prob(const orchard::FwdParams& p) {
  return static_cast<T>(sizeof(T) == 8 ? p.dropout_p_f64 : static_cast<double>(p.dropout_p));
}

}  // namespace orchard::cpu
