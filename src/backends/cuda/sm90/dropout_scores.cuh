// Dropout on the sm90 kernels' probabilities: the keep mask of orchard/philox.h, the same bits
// every backend draws, in the wgmma accumulator layouts (cuda/dropout_fragment.h).
//
// The forward's P (flash_fwd_sm90.cuh): s[i] -> row row0 + 8 ((i / 2) % 2), column
// col0 + 8 (i / 4) + 2 t + (i % 2), the sm80 forward's mma fragment: one Philox call per 32-column
// block gives a lane's 16 draws of its two rows. The caller keeps each row's sum over the undropped
// P (the normaliser, as every backend does) and scales O by 1 / (1 - p) once, in its epilogue.
//
// The calls are unrolled, each zeroing its elements at once: kBN / 32 calls per tile. Session 62
// (ptxas, sm_90a): the 3-WG d64 kernels spilled 4 / 0 B (non-causal / causal) this way against
// 28 / 12 B with the earlier rolled loop that recorded drop bits, which four draws per call had
// needed (16 calls per 128-key tile); no kernel spilled more.
// The backward's form (dropped_bits_keys) is below.
#pragma once
#include <cstdint>

#include "backends/cuda/dropout_fragment.h"
#include "orchard/params.h"
#include "orchard/philox.h"

namespace orchard::sm90 {

// 1 / (1 - p), the kept elements' scale (1 without dropout): the backward's dP^T and dV (the
// forward's epilogue, inside its dropout branch, takes 1 / (1 - p) directly).
__device__ __forceinline__ float dropout_rescale(const FwdParams& p) {
  return p.dropout_p > 0.f ? 1.f / (1.f - p.dropout_p) : 1.f;
}

// row0: the thread's first row, col0: the key tile's first column, both with the call's dropout
// offsets added (row0 - g a multiple of 16, col0 of 32: cuda::query_rows_aligned offsets, key
// tiles of 64 / 96 / 128); batch_head: dropout_batch_head.
template <int kBN>
__device__ __forceinline__ void drop_scores(float (&s)[kBN / 2], const DropoutKey& key, uint32_t batch_head,
                                            uint32_t row0, uint32_t col0, int t, uint32_t keep_threshold) {
  static_assert(kBN % 32 == 0, "tiles of whole 32-column blocks");
  Philox4 call{};
#pragma unroll
  for (int j = 0; j < kBN / 8; ++j) {  // 8-column block j: elements 4j .. 4j + 3
    const uint32_t cb = col0 + 8u * j;
    if (cuda::query_rows_new_call(j)) call = dropout_call(key.seed, key.offset, batch_head, row0, cb + 2u * t);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const uint32_t pair = cuda::query_rows_pair(call, r, j);
      if ((pair & 0xFFu) < keep_threshold) s[4 * j + 2 * r] = 0.f;
      if ((pair >> 8) < keep_threshold) s[4 * j + 2 * r + 1] = 0.f;
    }
  }
}

// The same drop on P already packed to 16-bit wgmma A fragments (convert_p's layout) is
// cuda::query_rows_calls + cuda::query_rows_drop_packed (an AND per pair), called by the forward
// directly: its overlapped loop makes the calls under the previous tile's PV and drops once P is
// converted after the wait.

// The backward's S^T fragment (keys are the rows; kJ = 4 the wide kernel's drop bits, kJ = 8 the
// d64-d128 kernel's step in drop-bit form, kept as the packed form's reference by dev/dropout_emu and
// dev/cuda/dropout_step_sass.cu): element i -> key key + 8 ((i / 2) % 2), query query0 + 8 (i / 4) + 2 t + (i % 2),
// i < 4 kJ. The lanes g, g ^ 1 share calls (dropout_fragment.h, rows = keys): one call and one
// shuffle per 8 elements, in a rolled loop.
// query0: the tile's first query + 2 t, key: this lane's first key (its g), both with the call's
// dropout offsets added (multiples of 16 before the 2 t and the g: sm90_fwd_dropout_form).
// Returns the drop bits: bit i set = element i dropped.
template <int kJ = 8>
__device__ __forceinline__ uint32_t dropped_bits_keys(const DropoutKey& key, uint32_t batch_head, uint32_t query0,
                                                      uint32_t lane_key, int g, uint32_t keep_threshold) {
  return cuda::key_rows_dropped<kJ>(key.seed, key.offset, batch_head, query0, lane_key, g & 1, keep_threshold);
}

// Where one backward step draws: the call's key and (batch, head), query0 = the step's first query + 2 t
// and this lane's first key, both with the call's dropout offsets added.
struct StepDrawAt {
  DropoutKey key;
  uint32_t batch_head, query0, lane_key;
};
__device__ __forceinline__ StepDrawAt step_draw_at(const FwdParams& p, int64_t b, int64_t h, int query0, int key) {
  return {dropout_key(p), dropout_batch_head(p, b, h),
          static_cast<uint32_t>(query0) + static_cast<uint32_t>(p.dropout_row_offset),
          static_cast<uint32_t>(key) + static_cast<uint32_t>(p.dropout_col_offset)};
}

// A step's drop bits (the wide kernel's form), query0 / key as step_draw_at takes them.
template <int kJ>
__device__ __forceinline__ uint32_t step_dropped_bits_keys(const FwdParams& p, int64_t b, int64_t h, int query0, int key,
                                                           int g) {
  const StepDrawAt at = step_draw_at(p, b, h, query0, key);
  return dropped_bits_keys<kJ>(at.key, at.batch_head, at.query0, at.lane_key, g, dropout_keep_threshold(p.dropout_p));
}

// A step's draws in the packed form (cuda::key_rows_draws, for key_rows_pair_mask), query0 / key as
// step_draw_at takes them.
template <int kJ>
__device__ __forceinline__ void step_key_rows_draws(uint32_t (&own)[kJ / 2], uint32_t (&got)[kJ / 2], const FwdParams& p,
                                                    int64_t b, int64_t h, int query0, int key, int g) {
  const StepDrawAt at = step_draw_at(p, b, h, query0, key);
  cuda::key_rows_draws<kJ>(own, got, at.key.seed, at.key.offset, at.batch_head, at.query0, at.lane_key, g & 1);
}

// A packed 16-bit pair (elements i, i + 1: low, high half) with its dropped halves zeroed.
__device__ __forceinline__ uint32_t zero_dropped_pair(uint32_t pair, uint32_t dropped, int i) {
  const uint32_t lo = (dropped >> i) & 1u ? 0u : 0x0000ffffu, hi = (dropped >> (i + 1)) & 1u ? 0u : 0xffff0000u;
  return pair & (lo | hi);
}

}  // namespace orchard::sm90
