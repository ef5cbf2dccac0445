// Shared pieces of the CPU forward and backward kernels: tile sizes,
// OpenMP helpers and dropout-mask generation.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "orchard/philox.h"

#ifdef ORCHARD_WITH_OPENMP
#include <omp.h>
#define ORCHARD_OMP(directive) _Pragma(directive)
#else
#define ORCHARD_OMP(directive)
#endif

namespace orchard::cpu {

// Tile sizes (rows of Q per task x columns of K per inner step). Measured on
// the 2-core AVX2 dev box (EPYC, fp32 fwd, b1 h8 s1024 d64) — see
// bench/cpu_bench.cpp; the numbers are recorded next to kBlockM/kBlockN in
// forward.cpp's header comment.
#ifndef ORCHARD_CPU_BLOCK_M
#define ORCHARD_CPU_BLOCK_M 64
#endif
#ifndef ORCHARD_CPU_BLOCK_N
#define ORCHARD_CPU_BLOCK_N 64
#endif
inline constexpr int kBlockM = ORCHARD_CPU_BLOCK_M;
inline constexpr int kBlockN = ORCHARD_CPU_BLOCK_N;
static_assert(kBlockN % 16 == 0, "column tiles must be a multiple of the GEMM N multiple");

// Converted K/V (and Q/dO in the backward) are staged per chunk of
// (batch, kv head) pairs; a chunk holds at most this many bytes (but always
// at least one pair), so memory stays bounded for long sequences.
// (Mutable only so tests can force the multi-chunk path.)
inline std::size_t g_stage_budget_bytes = std::size_t(64) << 20;

constexpr std::int64_t round_up(std::int64_t x, std::int64_t m) { return (x + m - 1) / m * m; }

inline int num_threads() {
#ifdef ORCHARD_WITH_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Valid column count of each tile row: columns < sk and, when causal,
// j <= i + causal_offset; relative to the tile's first column j0.
inline void tile_valid_cols(int* nv, int rows, std::int64_t i0, std::int64_t j0, int bc, int sk,
                            bool causal, std::int64_t causal_offset) {
  for (int r = 0; r < rows; ++r) {
    std::int64_t lim = sk;
    if (causal) lim = std::min<std::int64_t>(lim, i0 + r + causal_offset + 1);
    nv[r] = static_cast<int>(std::clamp<std::int64_t>(lim - j0, 0, bc));
  }
}

// End (exclusive) of the columns any of rows [i0, i0 + rows) can see.
inline std::int64_t visible_col_end(std::int64_t i0, int rows, int sk, bool causal,
                                    std::int64_t causal_offset) {
  if (!causal) return sk;
  return std::clamp<std::int64_t>(i0 + rows - 1 + causal_offset + 1, 0, sk);
}

// keep[t] = 1 if element (batch_head, row, j0 + t) survives dropout, t < n.
// j0 % 4 == 0, so each Philox call yields four consecutive columns.
inline void dropout_keep_row(std::uint64_t seed, std::uint64_t offset, std::uint32_t batch_head,
                             std::uint32_t row, std::int64_t j0, int n, std::uint32_t threshold,
                             std::uint8_t* keep) {
  for (int t = 0; t < n; t += 4) {
    const Philox4 r = dropout_draws(seed, offset, batch_head, row,
                                    static_cast<std::uint32_t>((j0 + t) >> 2));
    keep[t] = r.x >= threshold;
    if (t + 1 < n) keep[t + 1] = r.y >= threshold;
    if (t + 2 < n) keep[t + 2] = r.z >= threshold;
    if (t + 3 < n) keep[t + 3] = r.w >= threshold;
  }
}

}  // namespace orchard::cpu
