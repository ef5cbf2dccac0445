// The dropout draws (orchard/philox.h) as the lanes of an mma.sync / wgmma accumulator fragment
// hold them. philox.h lays a call's 16 draws out as one lane's part of a fragment whose rows are
// queries: rows r, r + 8 (r % 16 < 8) x column pairs 2t, 2t + 1 of four 8-column blocks. So
//   - rows = queries (the forwards, the dQ kernel): a lane makes one call per 32-column block of
//     its rows and reads its pair of each 8-column block from it: one call per 16 elements.
//   - rows = keys (the backward's S^T fragments): lanes g and g ^ 1 (mma lane ids xor 4) hold keys
//     k and k + 8 (k % 16 = g, e = g & 1) of query columns q + f (f = 0, 1) in query blocks j and
//     j + 1: the calls of rows q and q + 1 hold both lanes' draws. Lane e makes row q + e's call and
//     hands its partner the four bytes the partner needs: one call and one shuffle per 8 elements.
// Both need the call's offsets aligned: rows and columns of the tile at multiples of 16, and for
// rows = queries columns at multiples of 32 (a kernel draws per element otherwise, or declines).
// Plain host/device functions, so a host test (tests/cpp/dropout_fragment_test.cpp) replays the lanes.
#pragma once

#include <cstdint>

#include "orchard/config.h"
#include "orchard/philox.h"

namespace orchard::cuda {

// Whether a call's dropout row / column offsets keep every fragment's calls whole (uniform): the
// rows = keys form's condition (the rows = queries form's is query_rows_aligned, below).
ORCHARD_HOST_DEVICE bool dropout_fragment_aligned(std::int64_t row_offset, std::int64_t col_offset) {
  return ((row_offset | col_offset) & 15) == 0;
}

// PTX prmt (default mode): result byte i is byte (selector nibble i & 7) of {y, x} (x's bytes 0-3,
// y's 4-7), or, when the nibble's bit 3 is set, that byte's sign bit replicated (0x00 / 0xFF).
ORCHARD_HOST_DEVICE std::uint32_t byte_perm(std::uint32_t x, std::uint32_t y, std::uint32_t s) {
#if defined(__CUDA_ARCH__)
  std::uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(x), "r"(y), "r"(s));
  return r;
#else
  const std::uint64_t xy = (static_cast<std::uint64_t>(y) << 32) | x;
  std::uint32_t r = 0;
  for (int i = 0; i < 4; ++i) {
    const std::uint32_t nibble = (s >> (4 * i)) & 15u;
    std::uint32_t byte = static_cast<std::uint32_t>(xy >> (8 * (nibble & 7u))) & 0xFFu;
    if (nibble & 8u) byte = byte & 0x80u ? 0xFFu : 0u;
    r |= byte << (8 * i);
  }
  return r;
#endif
}

// ---- rows = queries -------------------------------------------------------------------------
// Tiles whose first column (offset included) is a multiple of 32 and whose width is too: offsets
// query_rows_aligned passes, tiles of 32s (every kernel's). Then 8-column block j of a tile is block
// j % 4 of its 32-column block, so an unrolled loop knows at compile time where a call starts and
// which word each block reads. (Session 62: with a run-time first column, the sm90 forward's drop
// loop selected a word per block and could start a call at every one; its PTX was 2.7x longer at
// 128 columns.)
ORCHARD_HOST_DEVICE bool query_rows_aligned(std::int64_t row_offset, std::int64_t col_offset) {
  return (row_offset & 15) == 0 && (col_offset & 31) == 0;
}
// Whether block j needs a call of its own: dropout_call(.., r, cb + 2t), cb its first column.
ORCHARD_HOST_DEVICE constexpr bool query_rows_new_call(int j) { return j % 4 == 0; }
// The draws of columns cb + 2t, cb + 2t + 1 (low, high byte) of row half h (row r + 8 h) of block j
// (first column cb), from its 32-column block's call.
// The call's word holding block j's pair of row half h (the pair in its low or high 16 bits, j % 2).
ORCHARD_HOST_DEVICE std::uint32_t query_rows_word(const Philox4& call, int h, int j) {
  return philox_lane(call, 2 * h + (j >> 1) % 2);
}
ORCHARD_HOST_DEVICE std::uint32_t query_rows_pair(const Philox4& call, int h, int j) {
  return (query_rows_word(call, h, j) >> ((j % 2) * 16)) & 0xFFFFu;
}
// The same pair as an AND mask for a packed 16-bit pair (low half: column cb + 2t): 0xFFFF in each
// half whose draw is kept (>= the threshold). Each byte b goes to its own 16-bit half; adding
// pair_bias = 0x8000 - threshold (0..256) to each half sets its bit 15 exactly when b >= threshold,
// with no carry between halves (b + 0x8000 - threshold <= 0x80FF); prmt replicates that sign.
// Four instructions per pair (prmt, add, prmt, and), against two compares and two selects plus the
// byte extraction on fp32 scores.
ORCHARD_HOST_DEVICE constexpr std::uint32_t query_rows_pair_bias(std::uint32_t keep_threshold) {
  return (0x8000u - keep_threshold) * 0x10001u;
}
// A word's lower (upper = 0) or upper two bytes spread to 16-bit halves (0x00bb'00aa) plus pair_bias:
// bit 15 / 31 set exactly when that byte is kept. Both fragment forms' packed drops start here.
ORCHARD_HOST_DEVICE std::uint32_t kept_halves(std::uint32_t word, int upper, std::uint32_t pair_bias) {
  return byte_perm(word, 0u, upper ? 0x4342u : 0x4140u) + pair_bias;
}
ORCHARD_HOST_DEVICE std::uint32_t query_rows_pair_mask(const Philox4& call, int h, int j, std::uint32_t pair_bias) {
  // halves: the sign of byte 1, of byte 3
  return byte_perm(kept_halves(query_rows_word(call, h, j), j % 2, pair_bias), 0u, 0xBB99u);
}

// A tile's kBN / 32 calls (its 32-column blocks; col0 the tile's first column, on the 32 grid) and
// their drop on P packed to 16-bit mma A fragments: a[kk][q] holds columns 16 kk + 8 (q / 2) + 2t, + 1
// of row half q % 2 (block j = 2 kk + q / 2), the m16n8k16 / wgmma A layout both forwards pack P in.
template <int kBN>
ORCHARD_HOST_DEVICE void query_rows_calls(Philox4 (&calls)[kBN / 32], std::uint64_t seed, std::uint64_t offset,
                                          std::uint32_t batch_head, std::uint32_t row, std::uint32_t col0, int t) {
  static_assert(kBN % 32 == 0, "tiles of whole 32-column blocks");
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int c = 0; c < kBN / 32; ++c)
    calls[c] = dropout_call(seed, offset, batch_head, row, col0 + 32u * static_cast<std::uint32_t>(c) + 2u * static_cast<std::uint32_t>(t));
}
template <int kBN>
ORCHARD_HOST_DEVICE void query_rows_drop_packed(std::uint32_t (&a)[kBN / 16][4], const Philox4 (&calls)[kBN / 32],
                                                std::uint32_t keep_threshold) {
  const std::uint32_t bias = query_rows_pair_bias(keep_threshold);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int j = 0; j < kBN / 8; ++j) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int r = 0; r < 2; ++r) a[j / 2][2 * (j % 2) + r] &= query_rows_pair_mask(calls[j / 4], r, j, bias);
  }
}

// ---- rows = keys ----------------------------------------------------------------------------
// call = dropout_call(.., q + f, k) (f: which of the pair's rows it is). Its four bytes for the
// lane whose e is `e`: [row half 0: key k, key k + 8; row half 1: key k, key k + 8].
ORCHARD_HOST_DEVICE std::uint32_t key_rows_bytes(const Philox4& call, std::uint32_t k, int e) {
  const int w = static_cast<int>((k >> 4) & 1u);
  const std::uint32_t s = static_cast<std::uint32_t>(e);
  return byte_perm(philox_lane(call, w), philox_lane(call, 2 + w), s | (2u + s) << 4 | (4u + s) << 8 | (6u + s) << 12);
}
// A lane's draw of element (query column f, row half rh, key k + 8 h) from its own call's bytes
// (own = key_rows_bytes(call of row q + e, k, e)) and its partner's (got).
ORCHARD_HOST_DEVICE std::uint32_t key_rows_draw(std::uint32_t own, std::uint32_t got, int e, int f, int rh, int h) {
  return ((f == e ? own : got) >> (8 * (2 * rh + h))) & 0xFFu;
}

// The packed form of a call's drop (the sm90 backward): AND masks instead of drop bits. A P^T pair
// (elements i, i + 1 with i = 8 jj + 2 q: query columns f = 0, 1 of row half rh = q / 2, key k + 8 h
// with h = q % 2) takes its f = 0 draw from one of own / got and its f = 1 draw from the other; a
// word's row half rh is its bytes 2 rh, 2 rh + 1 (keys k, k + 8), so kept_halves(word, rh, ..) marks
// the kept draws of that row half (the forward's trick above).
// The prmt selector that turns (kept own, kept got) of a row half into key half h's pair mask: the low
// half replicates the f = 0 draw's sign (byte 2 h + 1 of own when e = 0, of got when e = 1), the high
// half the f = 1 draw's.
ORCHARD_HOST_DEVICE constexpr std::uint32_t key_rows_pair_selector(int e, int h) {
  const std::uint32_t own = 8u | (2u * static_cast<std::uint32_t>(h) + 1u), got = own + 4u;
  const std::uint32_t f0 = e ? got : own, f1 = e ? own : got;
  return f0 * 0x11u | f1 * 0x1100u;
}
// Pair q's AND mask for the packed 16-bit P^T pair (0xFFFF in each kept half), from the lane's own and
// got words of the call (key_rows_bytes; got = the partner's own).
ORCHARD_HOST_DEVICE std::uint32_t key_rows_pair_mask(std::uint32_t own, std::uint32_t got, int e, int q,
                                                     std::uint32_t pair_bias) {
  return byte_perm(kept_halves(own, q / 2, pair_bias), kept_halves(got, q / 2, pair_bias),
                   key_rows_pair_selector(e, q % 2));
}
// The 32-bit AND mask of element f of a pair (for its fp32 dP^T), from the pair's mask.
ORCHARD_HOST_DEVICE std::uint32_t key_rows_element_mask(std::uint32_t pair_mask, int f) {
  return byte_perm(pair_mask, 0u, f ? 0x2222u : 0x0000u);
}

#if defined(__CUDACC__) || defined(ORCHARD_DECODE_EMU)  // (the CPU emulator of dev/decode_emu)
// One step of the rows = keys form: the drop bits of queries q + f + 8 rh (q: a multiple of 16
// plus 2t) and keys k + 8 h (k % 16 = g, e = g & 1), bit 4 rh + 2 h + f set = dropped, from
// call = dropout_call(.., q + e, k). Every lane of the warp must call it (a shuffle with lane ^ 4).
// The lane pair's exchange of one call: this lane's bytes (own) and its partner's (got, lane ^ 4).
__device__ __forceinline__ void key_rows_exchange(const Philox4& call, std::uint32_t k, int e, std::uint32_t& own,
                                                  std::uint32_t& got) {
  own = key_rows_bytes(call, k, e);
  got = __shfl_xor_sync(0xffffffffu, key_rows_bytes(call, k, e ^ 1), 4);
}
__device__ __forceinline__ std::uint32_t key_rows_call_dropped(const Philox4& call, std::uint32_t k, int e,
                                                               std::uint32_t keep_threshold) {
  std::uint32_t own, got;
  key_rows_exchange(call, k, e, own, got);
  std::uint32_t dropped = 0;
#pragma unroll
  for (int rh = 0; rh < 2; ++rh)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int f = 0; f < 2; ++f)
        dropped |= static_cast<std::uint32_t>(key_rows_draw(own, got, e, f, rh, h) < keep_threshold)
                   << (4 * rh + 2 * h + f);
  return dropped;
}

// The drop bits of one 16-key block of an S^T fragment over kJ 8-query blocks: bit 4 j + 2 h + f set
// = element (query q2t + 8 j + f, key k + 8 h) dropped, the backward kernels' element order.
// q2t: the tile's first query + 2t, a multiple of 16 before the 2t; k: the lane's key (k % 16 = g);
// e = g & 1; both with the dropout offsets added. Unrolled: ptxas sm_90 spill stores of the sm90
// backward's kFeatures kernels against the rolled loop, d128 80 / 24 -> 16 / 8 B (non-causal /
// causal; session 60's quads 20 / 16), those with row-broadcast / dense biases 96-136 -> 84-136,
// d96 and d256 0-20 -> 0-16, d64 unchanged.
template <int kJ>
__device__ __forceinline__ std::uint32_t key_rows_dropped(std::uint64_t seed, std::uint64_t offset,
                                                          std::uint32_t batch_head, std::uint32_t q2t, std::uint32_t k,
                                                          int e, std::uint32_t keep_threshold) {
  static_assert(kJ % 2 == 0 && kJ <= 8, "query blocks in pairs, one 32-bit word of drop bits");
  std::uint32_t dropped = 0;
  const std::uint32_t x = dropout_counter_x(k), y0 = dropout_counter_y(q2t + static_cast<std::uint32_t>(e));
#pragma unroll
  for (int jj = 0; jj < kJ / 2; ++jj)  // the rows 16 further down: y + 8
    dropped |= key_rows_call_dropped(dropout_call_xy(seed, offset, batch_head, x, y0 + 8u * jj), k, e, keep_threshold)
               << (8 * jj);
  return dropped;
}

// The packed form's draws of the same block: own[jj] / got[jj] of query blocks 2 jj, 2 jj + 1 (one call
// and one exchange each, as key_rows_dropped), for key_rows_pair_mask. Every lane of the warp must call it.
template <int kJ>
__device__ __forceinline__ void key_rows_draws(std::uint32_t (&own)[kJ / 2], std::uint32_t (&got)[kJ / 2],
                                               std::uint64_t seed, std::uint64_t offset, std::uint32_t batch_head,
                                               std::uint32_t q2t, std::uint32_t k, int e) {
  static_assert(kJ % 2 == 0, "query blocks in pairs");
  const std::uint32_t x = dropout_counter_x(k), y0 = dropout_counter_y(q2t + static_cast<std::uint32_t>(e));
#pragma unroll
  for (int jj = 0; jj < kJ / 2; ++jj)
    key_rows_exchange(dropout_call_xy(seed, offset, batch_head, x, y0 + 8u * jj), k, e, own[jj], got[jj]);
}
#endif

}  // namespace orchard::cuda
