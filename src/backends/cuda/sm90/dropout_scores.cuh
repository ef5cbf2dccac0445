// Dropout on the sm90 forward's probabilities (flash_fwd_sm90.cuh): the keep mask of
// orchard/philox.h, the same bits every backend draws, applied to one key tile's P in the wgmma
// accumulator layout, s[i] -> row row0 + 8 ((i / 2) % 2), column col0 + 8 (i / 4) + 2 t + (i % 2).
//
// That layout is the sm80 forward's mma fragment, so the lanes share calls as there
// (sm80/shared_dropout_draws.h, pairs): lanes t and t ^ 1 hold columns 2t, 2t + 1 of the same
// 4-column group in rows row0 and row0 + 8; lane bit b = t & 1 computes row b's call and the two
// swap halves — one Philox call per 4 elements. The caller keeps each row's sum over the undropped
// P (the normaliser, as every backend does) and scales O by 1 / (1 - p) once, in its epilogue.
//
// The calls run in a rolled loop recording drop bits, so a kernel holds one call's registers and
// one copy of its code per call site (four per kernel), then one unrolled pass zeroes the dropped
// elements: bit i is element i.
#pragma once
#include <cstdint>

#include "backends/cuda/sm80/shared_dropout_draws.h"
#include "orchard/params.h"
#include "orchard/philox.h"

namespace orchard::sm90 {

// row0: the thread's first row, col0: the key tile's first column, both with the call's dropout
// offsets added (col0 a multiple of 4: sm90_fwd_dropout_form); batch_head: dropout_batch_head.
template <int kBN>
__device__ __forceinline__ void drop_scores(float (&s)[kBN / 2], const DropoutKey& key, uint32_t batch_head,
                                            uint32_t row0, uint32_t col0, int t, uint32_t keep_threshold) {
  static_assert(kBN / 2 <= 128, "two 64-bit words of drop bits");
  const int b = t & 1;
  uint64_t lo = 0, hi = 0;  // drop bits of elements 0..63, 64..127
#pragma unroll 1
  for (int j = 0; j < kBN / 8; ++j) {  // 8-column block j: elements 4j .. 4j + 3
    const Philox4 mine = dropout_draws(key.seed, key.offset, batch_head, row0 + 8u * b,
                                       (col0 + 8u * j + 4u * (t >> 1)) >> 2);
    uint32_t s0, s1;
    cuda::pair_send(mine, b, s0, s1);
    const uint32_t r0 = __shfl_xor_sync(0xffffffffu, s0, 1), r1 = __shfl_xor_sync(0xffffffffu, s1, 1);
    uint64_t bits = 0;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      uint32_t d0, d1;
      cuda::pair_row_draws(mine, b, r0, r1, r, d0, d1);
      bits |= static_cast<uint64_t>(d0 < keep_threshold) << (2 * r);
      bits |= static_cast<uint64_t>(d1 < keep_threshold) << (2 * r + 1);
    }
    if (j < 16) lo |= bits << (4 * j);
    else hi |= bits << (4 * j - 64);
  }
#pragma unroll
  for (int i = 0; i < kBN / 2; ++i)
    if (((i < 64 ? lo : hi) >> (i % 64)) & 1u) s[i] = 0.f;
}

}  // namespace orchard::sm90
