// Tile bookkeeping shared by the forward and backward kernels: which tiles the
// causal mask and the sequence ends reach, the log2-domain LSE, and moving
// mma.sync C fragments into A fragments or out to global memory.
#pragma once

#include <cmath>
#include <cstdint>

#include "backends/cuda/mma_utils.cuh"

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

}  // namespace orchard::cuda
