// Philox calls shared by the lanes of an mma.sync fragment that hold one call's draws
// (orchard/philox.h: a call gives the draws of four consecutive mask columns of one row).
//
// Without sharing, each lane computes every call its elements touch and keeps one or two of the
// four draws: the sm80 forward one call per two elements, the dK / dV kernel (S^T: keys are the
// fragment's rows) one call per element — ~100 instructions each, 3-5x the forward's time at
// dropout 0.1 (bench/RESULTS.md [G54]). With the mask's column offset a multiple of 4:
//   - pairs (the forward's C fragment): lanes t and t ^ 1 hold columns 2t, 2t + 1 of the same
//     4-column groups in rows g and g + 8. Lane bit b = t & 1 computes row b's call and the two
//     swap the halves the other holds: one call and two shuffles per lane where there were two calls.
//   - quads (the dK / dV kernel's S^T fragment): lanes g = 4a + i (i = 0..3, same t) hold the four
//     keys of one group for each (query column, key block) combo. Lane i computes combo i's call of
//     four combos and a 4 x 4 transpose leaves every lane its own key's draw of all four: one call
//     and four shuffles per lane where there were four calls.
// The mask is the same bits either way. Plain host/device functions, one exchange step each, so a
// host test (tests/cpp/shared_dropout_draws_test.cpp) replays the lanes' exchanges.
#pragma once

#include <cstdint>

#include "orchard/config.h"
#include "orchard/philox.h"

namespace orchard::cuda {

// The sm80 forward and dK / dV kernels share their calls as below (on since session 55: H100,
// bench/sm80_kernel_ab.sh, the same bytes on seven dropout calls; forward at dropout 0.1 1.51-1.74x
// the unshared time, backward 0.97-1.03x). ORCHARD_SM80_DROPOUT_SHARED=0 turns it off (A/B knob).
#ifndef ORCHARD_SM80_DROPOUT_SHARED
#define ORCHARD_SM80_DROPOUT_SHARED 1
#endif
inline constexpr bool kSharedDropoutDraws = ORCHARD_SM80_DROPOUT_SHARED != 0;
// Whether a call's kernels share the draws: the knob, and a mask column offset that keeps every
// lane group's columns inside whole 4-column Philox groups (CTA-uniform).
ORCHARD_HOST_DEVICE bool shares_dropout_draws(std::int64_t dropout_col_offset) {
  return kSharedDropoutDraws && (dropout_col_offset & 3) == 0;
}

// ---- pairs -------------------------------------------------------------------------------
// What lane bit b sends its partner: the half of its call (row b) that the partner's columns use.
ORCHARD_HOST_DEVICE void pair_send(const Philox4& mine, int b, std::uint32_t& s0, std::uint32_t& s1) {
  s0 = b ? mine.x : mine.z;
  s1 = b ? mine.y : mine.w;
}
// This lane's two draws (columns 2t, 2t + 1) in row r, given what the partner sent (r0, r1).
ORCHARD_HOST_DEVICE void pair_row_draws(const Philox4& mine, int b, std::uint32_t r0, std::uint32_t r1, int r,
                                        std::uint32_t& d0, std::uint32_t& d1) {
  const bool own = r == b;
  d0 = own ? (b ? mine.z : mine.x) : r0;
  d1 = own ? (b ? mine.w : mine.y) : r1;
}

// ---- quads -------------------------------------------------------------------------------
// Lane i (bits b = i & 1, c = i >> 1) holds v, the call of combo i. Step 1 swaps with lane i ^ 1:
// it sends the components it will not keep (those with bit 0 != b).
ORCHARD_HOST_DEVICE void quad_step1_send(const Philox4& v, int i, std::uint32_t& s0, std::uint32_t& s1) {
  const bool b = i & 1;
  s0 = b ? v.x : v.y;  // component 1 - b of its own call
  s1 = b ? v.z : v.w;  // component 3 - b
}
// After step 1 a lane holds components b and 2 + b of calls i (own) and i ^ 1 (received r0, r1).
// Step 2 swaps with lane i ^ 2: it sends, of both calls, the component it will not keep (2 (1 - c) + b).
ORCHARD_HOST_DEVICE void quad_step2_send(const Philox4& v, int i, std::uint32_t r0, std::uint32_t r1, std::uint32_t& s0,
                                         std::uint32_t& s1) {
  const bool b = i & 1, c = i & 2;
  const std::uint32_t own_b = b ? v.y : v.x, own_2b = b ? v.w : v.z;
  s0 = c ? own_b : own_2b;  // call i
  s1 = c ? r0 : r1;         // call i ^ 1
}
// The lane's draw (component i) of combo j's call, j = 0..3, after step 2 received q0 (call i ^ 2)
// and q1 (call i ^ 3).
ORCHARD_HOST_DEVICE std::uint32_t quad_draw(const Philox4& v, int i, std::uint32_t r0, std::uint32_t r1, std::uint32_t q0,
                                            std::uint32_t q1, int j) {
  const bool b = i & 1, c = i & 2;
  const std::uint32_t own = c ? (b ? v.w : v.z) : (b ? v.y : v.x);  // component i of call i
  const std::uint32_t partner = c ? r1 : r0;                         // component i of call i ^ 1
  switch (j ^ i) {
    case 0: return own;
    case 1: return partner;
    case 2: return q0;
    default: return q1;
  }
}

}  // namespace orchard::cuda
