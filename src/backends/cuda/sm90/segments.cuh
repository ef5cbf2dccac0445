// The segment form of varlen in the sm90 kernels (params.h, segment_cu; sm90_call_support.h says
// which calls take it): one sequence of the packed rows in which row i sees key j only when both
// lie in one segment [cu[s], cu[s + 1]).  q and k share the segments, so the rule is symmetric:
// the keys a row sees and the rows a key is seen by are the same interval of its segment.
// Tiles are narrowed to the segments of their first and last row (or key); inside a tile that
// crosses a segment boundary, elements of other segments are masked per element.
#pragma once
#include <cstdint>

#include "orchard/params.h"

namespace orchard::sm90 {

// [lo, hi): the segment holding row r (or key r); empty for rows before cu[0] or past cu[n].
struct SegmentSpan {
  int lo, hi;
};

__device__ __forceinline__ SegmentSpan segment_of(const int32_t* __restrict__ cu, int n, int r) {
  const int first = __ldg(cu), last = __ldg(cu + n);
  if (r < first) return {first, first};
  if (r >= last) return {last, last};
  // The largest s with cu[s] <= r (cu[s + 1] > r then: empty segments are passed over).
  int a = 0, b = n;  // cu[a] <= r < cu[b]
  while (b - a > 1) {
    const int mid = (a + b) >> 1;
    if (__ldg(cu + mid) <= r) a = mid;
    else b = mid;
  }
  return {__ldg(cu + a), __ldg(cu + a + 1)};
}

// Narrows the tiles [t_begin, t_end) of width kTile (keys of a query tile, or query tiles of a
// key tile) to those holding an index some of the rows [r0, r1] can see.
template <int kTile>
__device__ __forceinline__ void trim_to_segments(const FwdParams& p, int r0, int r1, int& t_begin, int& t_end) {
  const SegmentSpan a = segment_of(p.segment_cu, p.segments, r0);
  const SegmentSpan z = segment_of(p.segment_cu, p.segments, r1);
  // Spans grow with the row: [a.lo, z.hi) holds every index the rows see.
  const int lo = a.lo, hi = z.hi > a.hi ? z.hi : a.hi;
  if (lo >= hi) {
    t_end = t_begin;
    return;
  }
  const int b = lo / kTile, e = (hi + kTile - 1) / kTile;
  if (b > t_begin) t_begin = b;
  if (e < t_end) t_end = e;
  if (t_end < t_begin) t_end = t_begin;
}

// -inf for the elements of one row (or key) r = 0 / 1 of a score fragment that lie outside
// `span`.  Both kernels' fragments keep element 4 j + 2 r + c at index base + 8 j + 2 t + c (j <
// kN / 4, c < 2: the forward's rows over keys, the backward's keys over queries), so a fragment
// covers [base, base + 2 kN).  Nothing when that lies inside the span (the usual tile, away
// from the boundaries).
template <int kN>
__device__ __forceinline__ void mask_outside_segment(float (&acc)[kN], int r, int t, SegmentSpan span, int base) {
  if (base >= span.lo && base + 2 * kN <= span.hi) return;
#pragma unroll
  for (int j = 0; j < kN / 4; ++j)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int i = base + 8 * j + 2 * t + c;
      if (i < span.lo || i >= span.hi) acc[4 * j + 2 * r + c] = -INFINITY;
    }
}

}  // namespace orchard::sm90
