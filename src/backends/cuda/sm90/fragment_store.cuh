// Storing a warp's rows of an m64 wgmma accumulator (fp32) as 16-bit values: to global memory
// (the sm90 forward's O and the sm90 backwards' dK / dV epilogues) or staged in shared memory for
// a TMA store (the forward's O where its tile leaves room: stage_fragment_rows, at the end).
//
// A thread holds rows g and g + 8 (g = lane / 4) of its warp's 16, and in each 8-column block
// j the two columns 8 j + 2 t, + 1 (t = lane % 4): acc[4 j + 2 r], acc[4 j + 2 r + 1] for row
// r.  Written as they are held, that is one 4-byte store per block and row.  After a 4 x 4
// transpose across the quad, each lane instead holds one block's 8 columns of a row and writes
// them in one 16-byte store: a quarter of the store instructions and whole 16-byte sectors
// per lane.  The H200 (session 30, the forward's O, ab_fwd.sh): d128 +6.5 / +2.3 % at s1k / s2k
// over the 4-byte stores, d256 +1-8 %.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "backends/cuda/sm90/stmatrix.cuh"

namespace orchard::sm90 {

template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack_pair<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack_pair<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// 4 x 4 transpose of 32-bit values across a quad (the 4 lanes with lane / 4 equal; t = lane % 4):
// afterwards slot i of lane t holds what lane i held in slot t. Two xor-shuffle rounds, each
// swapping one bit of the lane index with the same bit of the slot index.
__device__ __forceinline__ void quad_transpose(uint32_t (&a)[4], int t) {
  const bool b0 = (t & 1) != 0, b1 = (t & 2) != 0;
  uint32_t x = b0 ? a[0] : a[1], y = b0 ? a[2] : a[3];  // the slots whose bit 0 differs from t's
  x = __shfl_xor_sync(0xffffffffu, x, 1);
  y = __shfl_xor_sync(0xffffffffu, y, 1);
  if (b0) a[0] = x, a[2] = y;
  else a[1] = x, a[3] = y;
  x = b1 ? a[0] : a[2], y = b1 ? a[1] : a[3];  // the slots whose bit 1 differs from t's
  x = __shfl_xor_sync(0xffffffffu, x, 2);
  y = __shfl_xor_sync(0xffffffffu, y, 2);
  if (b1) a[0] = x, a[1] = y;
  else a[2] = x, a[3] = y;
}

// Whether rows starting at `base` with `row_stride` elements between them can take 16-byte
// stores (uniform over a tile: the base and the stride are).
template <typename T>
__device__ __forceinline__ bool rows_allow_store16(const T* base, int64_t row_stride) {
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && row_stride % (16 / sizeof(T)) == 0;
}

// Row r of this thread's two (see above), times mul, to row_ptr: the columns below cols (a
// multiple of 8; the accumulator's columns from cols on are padding), kCols columns in all.
// store16 (rows_allow_store16): 16-byte stores after a quad transpose, whose shuffles need
// every lane of the warp, so `write` (the row exists) gates only the stores; else 4-byte ones.
template <typename T, int kCols, int kAccSize>
__device__ __forceinline__ void store_fragment_row(const float (&acc)[kAccSize], int r, float mul, T* row_ptr,
                                                   bool write, int cols, int t, bool store16) {
  static_assert(kCols % 32 == 0 && kAccSize >= kCols / 2, "fragment_store: whole quads of 8-column blocks");
  if (store16) {
#pragma unroll
    for (int k = 0; k < kCols / 32; ++k) {
      uint32_t a[4];
#pragma unroll
      for (int jj = 0; jj < 4; ++jj)
        a[jj] = pack_pair<T>(acc[4 * (4 * k + jj) + 2 * r] * mul, acc[4 * (4 * k + jj) + 2 * r + 1] * mul);
      quad_transpose(a, t);
      const int j = 4 * k + t;  // this lane's column block: columns 8j .. 8j + 7
      if (write && 8 * j < cols) *reinterpret_cast<uint4*>(row_ptr + 8 * j) = make_uint4(a[0], a[1], a[2], a[3]);
    }
  } else if (write) {
#pragma unroll
    for (int j = 0; j < kCols / 8; ++j)
      if (8 * j < cols)
        *reinterpret_cast<uint32_t*>(row_ptr + 8 * j + 2 * t) =
            pack_pair<T>(acc[4 * j + 2 * r] * mul, acc[4 * j + 2 * r + 1] * mul);
  }
}

// This warp's 16 rows (16 wi .. 16 wi + 15 of its warpgroup's 64), times mul[r] for row g + 8 r,
// as 16-bit values into shared memory laid out as a TMA box of 64 rows: column chunks of kSw
// bytes per row (chunk c at buf + c * chunk_bytes, buf 1024-byte aligned) in the copy engine's
// kSw-byte swizzle (16-byte unit bits 4.. XOR address bits 7..: 128B 3 bits, 64B 2), so a TMA
// store writes them out.  stmatrix x4: two 8-column blocks x two 8-row halves per instruction,
// the accumulator pairs as they are held; the swizzle makes each 8-lane phase conflict-free.
template <typename T, int kCols, int kSw, int kAccSize>
__device__ __forceinline__ void stage_fragment_rows(const float (&acc)[kAccSize], const float (&mul)[2],
                                                    uint32_t buf, uint32_t chunk_bytes, int wi, int lane) {
  static_assert(kSw == 128 || kSw == 64, "fragment_store: 64B or 128B swizzle");
  static_assert(kCols % 16 == 0 && kAccSize >= kCols / 2, "fragment_store: pairs of 8-column blocks");
  constexpr int kBlocksPerChunk = kSw / 16;
  constexpr uint32_t kSwizzleMask = kSw == 128 ? 7 : 3;
  const int mi = lane >> 3;                               // the matrix this lane addresses a row of
  const int row = 16 * wi + 8 * (mi & 1) + (lane & 7);    // its row (of the warpgroup's 64)
#pragma unroll
  for (int j = 0; j < kCols / 8; j += 2) {
    const int jb = j + (mi >> 1);                         // its column block
    const uint32_t off = row * kSw + (jb % kBlocksPerChunk) * 16;
    const uint32_t addr = buf + (jb / kBlocksPerChunk) * chunk_bytes + (off ^ (((off >> 7) & kSwizzleMask) << 4));
    stmatrix_x4(addr, pack_pair<T>(acc[4 * j] * mul[0], acc[4 * j + 1] * mul[0]),
                pack_pair<T>(acc[4 * j + 2] * mul[1], acc[4 * j + 3] * mul[1]),
                pack_pair<T>(acc[4 * j + 4] * mul[0], acc[4 * j + 5] * mul[0]),
                pack_pair<T>(acc[4 * j + 6] * mul[1], acc[4 * j + 7] * mul[1]));
  }
}

}  // namespace orchard::sm90
