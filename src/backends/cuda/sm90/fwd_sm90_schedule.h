// The persistent sm90 forward's tile schedule (flash_fwd_sm90.cuh): which (m block, batch x q
// head) a linear tile index stands for, and which indices one CTA runs.  Host and device code
// (the C++ tests check it on the host: tests/cpp/fwd_sm90_schedule_test.cpp).
//
// The (b, h) pairs (h fastest: the q heads of one GQA group, which share K / V, are neighbours)
// are cut into sections of `section` pairs; a section's tiles are consecutive indices, m block
// outer and head inner inside it (FA3's L2 swizzle), so the CTAs running at once read the K / V
// of a few heads.  The last section holds the remaining pairs.
//   Not causal: every tile costs the same; section = 1 (m block innermost, ascending) and
//   CTA x runs the indices x, x + gridDim.x, ...
//   Causal, plain: m blocks descending (longest first), CTA x runs x, x + gridDim.x, ... (or
//   one CTA per tile).  The section: as many heads as keep their K / V within L2.
//   Causal, paired: tile lengths grow with the m block, and a plain stride hands one CTA
//   tiles of similar rank in every round (H200, session 14: d128 s8k -4.4 %; the busiest CTA
//   got 1.15x the mean work at d128 s8k, 1.41x at d256 s8k in a model of the assignment).  So
//   the unit of the stride is a pair of tiles of one head: m blocks nm - 1 - j (long) and
//   j + (nm odd) (short), nm + 1 (+ 1) key tiles together for every pair when sq == sk; index
//   2u is unit u's long tile, 2u + 1 its short one, and CTA x runs units x, x + gridDim.x, ...
//   (both tiles of a unit back to back).  An odd nm leaves m block 0 (the cheapest) alone: one
//   unit per (b, h) after all the sections (spread over the CTAs, at the end, where they fill
//   the last round), its short half a phantom index (m_block = -1) that both sides skip.  The
//   model: busiest CTA 1.03x the mean at d128 / d192 / d256 s2k..8k (hardware greedy dispatch
//   of one-tile CTAs: 1.05-1.14x).
#pragma once

#include "orchard/config.h"

namespace orchard::sm90 {

struct FwdSm90Sched {
  int num_m_blocks;
  int num_hb;   // b * hq
  int section;  // (b, h) pairs per section (>= 1)
  int total;    // indices: num_m_blocks * num_hb, paired 2 * ceil(num_m_blocks / 2) * num_hb
};

struct FwdSm90Coord {
  int m_block;  // -1: a phantom index (nothing to do)
  int hb;       // b * hq + h
};

// Index -> (m block, (b, h)).  The divisors are arguments (the kernel passes copies the compiler
// may not hoist: their reciprocals, kept live across the tile loop, cost registers).
ORCHARD_HOST_DEVICE FwdSm90Coord fwd_sm90_decode(int idx, int num_m_blocks, int num_hb, int section, bool paired,
                                                 bool causal) {
  if (!paired) {
    const int per_section = section * num_m_blocks;
    const int sec = idx / per_section;
    const int r = idx - sec * per_section;
    const int hb0 = sec * section;
    const int heads = section < num_hb - hb0 ? section : num_hb - hb0;
    const int mi = r / heads;
    return {causal ? num_m_blocks - 1 - mi : mi, hb0 + (r - mi * heads)};
  }
  const int u = idx >> 1, half = idx & 1;
  const int pairs = num_m_blocks >> 1, odd = num_m_blocks & 1;
  const int paired_units = pairs * num_hb;
  if (u >= paired_units) return {half == 0 ? 0 : -1, u - paired_units};  // m block 0 alone (odd nm)
  const int per_section = section * pairs;
  const int sec = u / per_section;
  const int r = u - sec * per_section;
  const int hb0 = sec * section;
  const int heads = num_hb - hb0 < section ? num_hb - hb0 : section;
  const int j = r / heads;
  return {half == 0 ? num_m_blocks - 1 - j : j + odd, hb0 + (r - j * heads)};
}

// Indices of a call: num_m_blocks * num_hb, paired 2 * ceil(num_m_blocks / 2) * num_hb.
ORCHARD_HOST_DEVICE long long fwd_sm90_total(int num_m_blocks, int num_hb, bool paired) {
  const long long slots = paired ? 2 * ((num_m_blocks + 1) / 2) : num_m_blocks;
  return slots * num_hb;
}

// A CTA's first index and the one after idx (its next tile).  `paired` is a compile-time
// property of each kernel (flash_fwd_sm90.cuh, kFwdSm90PairsCausalTiles).
ORCHARD_HOST_DEVICE int fwd_sm90_first(bool paired, int cta) { return paired ? 2 * cta : cta; }
ORCHARD_HOST_DEVICE int fwd_sm90_next(bool paired, int idx, int grid) {
  if (!paired) return idx + grid;
  return (idx & 1) == 0 ? idx + 1 : idx - 1 + 2 * grid;
}

// Per consumer WG (flash_fwd_sm90.cuh, kWgSkip): how many of a tile's leading key tiles (its key
// loop runs from n_end - 1 down) no row of WG wg (rows m_block * block_m + 64 wg .. + 63, those
// below rows_end) can see.  Rows at or past rows_end (the call's query rows) are phantoms: their
// output is never stored, so a WG made of them sees nothing (the last m block of a 192-row tile
// when 192 does not divide sq: at sq = 2k / 4k one / two of its three WGs ran every key tile).
// Causal: also the key tiles whose first key lies past the WG's last real row's diagonal
// (key <= row + causal_offset).  At most n_end - n_begin - 1: one tile always runs, so a WG that
// sees no key at all takes the masked path (O 0, LSE -inf).
ORCHARD_HOST_DEVICE int fwd_sm90_wg_hidden_tiles(int m_block, int block_m, int wg, int block_n, bool causal,
                                                 long long causal_offset, long long rows_end, int n_begin,
                                                 int n_end) {
  const int most = n_end - n_begin - 1;
  if (most <= 0) return 0;
  const long long first_row = static_cast<long long>(m_block) * block_m + 64 * wg;
  if (first_row >= rows_end) return most;
  if (!causal) return 0;
  const long long last_row = first_row + 63 < rows_end ? first_row + 63 : rows_end - 1;
  const long long last_key = last_row + causal_offset;
  const int first_hidden = last_key < 0 ? n_begin : static_cast<int>(last_key / block_n) + 1;
  const int hidden = n_end - (first_hidden > n_begin ? first_hidden : n_begin);
  return hidden <= 0 ? 0 : (hidden < most ? hidden : most);
}

}  // namespace orchard::sm90
