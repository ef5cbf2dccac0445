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
// elements: bit i is element i. The backward's form (dropped_bits_keys) is below.
#pragma once
#include <cstdint>

#include "backends/cuda/sm80/shared_dropout_draws.h"
#include "orchard/params.h"
#include "orchard/philox.h"

namespace orchard::sm90 {

// 1 / (1 - p), the kept elements' scale (1 without dropout): the backward's dP^T and dV (the
// forward's epilogue, inside its dropout branch, takes 1 / (1 - p) directly).
__device__ __forceinline__ float dropout_rescale(const FwdParams& p) {
  return p.dropout_p > 0.f ? 1.f / (1.f - p.dropout_p) : 1.f;
}

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

// The backward's S^T fragment (flash_bwd_sm90.cuh, kJ = 8; flash_bwd_sm90_wide.cuh, kJ = 4; keys are
// the rows): element i -> key key0 + 8 ((i / 2) % 2), query query0 + 8 (i / 4) + 2 t + (i % 2),
// i < 4 kJ. A call's four keys sit in the quad of lanes g = 4a .. 4a + 3 (same t), which share
// calls as the sm80 dK / dV kernel does (shared_dropout_draws.h, quads): for each 8-query block j,
// lane g & 3 computes the call of combo g & 3 (query column c & 1, key half c >> 1) and a 4 x 4
// transpose (lanes xor 4, 8) hands every lane its key's draw of all four — one call per 4
// elements, in a rolled loop.
// query0: the tile's first query + 2 t, group0: the first key of this lane's 4-key group (key0 -
// (g & 3)), both with the call's dropout offsets added (group0 a multiple of 4:
// sm90_fwd_dropout_form). Returns the drop bits: bit i set = element i dropped.
template <int kJ = 8>
__device__ __forceinline__ uint32_t dropped_bits_keys(const DropoutKey& key, uint32_t batch_head, uint32_t query0,
                                                      uint32_t group0, int g, uint32_t keep_threshold) {
  static_assert(kJ <= 8, "one 32-bit word of drop bits");
  const int i = g & 3;
  uint32_t dropped = 0;
#pragma unroll 1
  for (int j = 0; j < kJ; ++j) {
    const Philox4 v = dropout_draws(key.seed, key.offset, batch_head, query0 + 8u * j + (i & 1),
                                    (group0 + 8u * (i >> 1)) >> 2);
    uint32_t s0, s1, u0, u1;
    cuda::quad_step1_send(v, i, s0, s1);
    const uint32_t r0 = __shfl_xor_sync(0xffffffffu, s0, 4), r1 = __shfl_xor_sync(0xffffffffu, s1, 4);
    cuda::quad_step2_send(v, i, r0, r1, u0, u1);
    const uint32_t q0 = __shfl_xor_sync(0xffffffffu, u0, 8), q1 = __shfl_xor_sync(0xffffffffu, u1, 8);
#pragma unroll
    for (int c = 0; c < 4; ++c)  // combo c is element 4 j + c: key half c >> 1, query column c & 1
      dropped |= static_cast<uint32_t>(cuda::quad_draw(v, i, r0, r1, q0, q1, c) < keep_threshold) << (4 * j + c);
  }
  return dropped;
}

// A packed 16-bit pair (elements i, i + 1: low, high half) with its dropped halves zeroed.
__device__ __forceinline__ uint32_t zero_dropped_pair(uint32_t pair, uint32_t dropped, int i) {
  const uint32_t lo = (dropped >> i) & 1u ? 0u : 0x0000ffffu, hi = (dropped >> (i + 1)) & 1u ? 0u : 0xffff0000u;
  return pair & (lo | hi);
}

}  // namespace orchard::sm90
