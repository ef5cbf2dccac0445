// Warp-level building blocks for the sm80-class tensor-core kernels
// (mma.sync m16n8k16, ldmatrix, cp.async). They run unchanged on sm90.
//
// Fragment layouts (PTX ISA, "mma.m16n8k16", g = lane / 4, t = lane % 4):
//   A (16x16, row): reg0 = (g, 2t..2t+1), reg1 = (g+8, 2t..), reg2 = (g, 2t+8..), reg3 = (g+8, 2t+8..)
//   B (16x8, col):  reg0 = (k 2t..2t+1, n g), reg1 = (k 2t+8.., n g)
//   C (16x8):       c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1)
// so two adjacent C tiles (n-tiles 2k, 2k+1) repacked to 16-bit are exactly the
// A fragment of k-tile k: P never leaves registers between the two GEMMs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "backends/cuda/cp_async.cuh"
#include "backends/cuda/sm80/swizzled_tile.h"

namespace orchard::cuda {

template <typename T>
struct MmaType;
template <>
struct MmaType<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ float2 unpack(uint32_t v) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&v));
  }
};
template <>
struct MmaType<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ float2 unpack(uint32_t v) {
    return __half22float2(*reinterpret_cast<__half2*>(&v));
  }
};

// d += a * b, fp32 accumulate.
// (ORCHARD_DECODE_EMU: the CPU emulator's compile of these kernels, dev/sm80_emu; its shim gives
// the warp-collective operations and the shared-state-space addresses.)
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(ORCHARD_DECODE_EMU)
  emu_mma16816<T>(d, a, b0, b1);
#else
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
#if defined(ORCHARD_DECODE_EMU)
  return emu_smem_addr(p);
#else
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#endif
}

// The uint32_t overloads take a shared-state-space byte address: a per-thread
// base computed once plus compile-time tile offsets folds into the instruction's
// immediate, which keeps 64-bit generic pointers out of the register budget.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
#if defined(ORCHARD_DECODE_EMU)
  emu_ldmatrix_x4(r, emu_smem_ptr(addr), false);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
#if defined(ORCHARD_DECODE_EMU)
  emu_ldmatrix_x4(r, emu_smem_ptr(addr), true);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) { ldmatrix_x4(r, smem_u32(p)); }
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  ldmatrix_x4_trans(r, smem_u32(p));
}

// 16-byte async global->shared copy to a shared-state-space byte address;
// zero-fills the destination when !pred.
__device__ __forceinline__ void cp_async16(uint32_t smem_addr, const void* gmem, bool pred) {
  const int src_bytes = pred ? 16 : 0;
#if defined(ORCHARD_DECODE_EMU)
  cp_async16_zfill(emu_smem_ptr(smem_addr), gmem, src_bytes);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr), "l"(gmem), "r"(src_bytes));
#endif
}
// (cp_async_commit / cp_async_wait: cp_async.cuh.)

__device__ __forceinline__ float fast_exp2(float x) {
#if defined(ORCHARD_DECODE_EMU)
  return std::exp2(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
#endif
}

// Copies a (kRows x kD) tile (row stride `row_stride` elements) into padded
// shared memory at byte address `smem` (row stride kD + 8), or a SwizzledTile
// (kSwizzle), with 16-byte cp.async; rows >= rows_valid
// and 8-element chunks at or past d are zero-filled (d % 8 == 0).
template <typename T, int kRows, int kD, int kThreads, bool kSwizzle = false>
__device__ __forceinline__ void load_tile_async(uint32_t smem, const T* gmem, int64_t row_stride, int rows_valid,
                                                int d, int tid) {
  constexpr int kChunks = kD / 8;
  constexpr int kStride = kD + 8;
  constexpr int kTotal = kRows * kChunks;
#pragma unroll
  for (int i = 0; i < (kTotal + kThreads - 1) / kThreads; ++i) {
    const int idx = tid + i * kThreads;
    if (kTotal % kThreads == 0 || idx < kTotal) {
      const int r = idx / kChunks, c = idx % kChunks;
      const bool pred = r < rows_valid && c * 8 < d;
      const T* src = pred ? gmem + r * row_stride + c * 8 : gmem;
      uint32_t off;
      if constexpr (kSwizzle) off = SwizzledTile<kRows, kD>::offset(r, c);
      else off = 2 * (r * kStride + c * 8);
      cp_async16(smem + off, src, pred);
    }
  }
}

// 16-byte shared-memory store to a shared-state-space byte address.
__device__ __forceinline__ void st_shared_v4(uint32_t addr, uint4 v) {
#if defined(ORCHARD_DECODE_EMU)
  std::memcpy(emu_smem_ptr(addr), &v, 16);
#else
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
#endif
}

// One 8-element (16-byte) chunk of 2-byte elements read one element at a time
// (any 2-byte alignment): element e if e < n, else 0 (n <= 0: all zero, src unread).
__device__ __forceinline__ uint4 load_chunk_elems(const uint16_t* src, int n) {
  uint32_t w[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const uint32_t lo = 2 * e < n ? src[2 * e] : 0u;
    const uint32_t hi = 2 * e + 1 < n ? src[2 * e + 1] : 0u;
    w[e] = lo | (hi << 16);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// The element-wise fallback of load_tile_async / TileStream::load for rows that
// 16-byte vectors cannot move (rows_vec16 in launch.h: a head dim that is not a
// multiple of 8, odd strides, an unaligned base): the same chunks in the same
// padded (row stride kD + 8) or swizzled smem layout, each gathered from 8
// 2-byte loads and stored with one 16-byte st.shared; rows >= rows_valid and
// columns >= width zero-filled. Synchronous: the caller's next barrier publishes
// the tile as cp.async's wait does. Not unrolled: few temporaries next to the
// kernels' accumulators.
template <typename T, int kRows, int kD, int kThreads, bool kSwizzle = false>
__device__ __forceinline__ void load_tile_elems(uint32_t smem, const T* gmem, int64_t row_stride, int rows_valid,
                                                int width, int tid) {
  constexpr int kChunks = kD / 8;
  constexpr int kTotal = kRows * kChunks;
#pragma unroll 1
  for (int idx = tid; idx < kTotal; idx += kThreads) {
    const int r = idx / kChunks, c = idx % kChunks;
    const int n = r < rows_valid ? width - c * 8 : 0;
    const uint4 v = load_chunk_elems(reinterpret_cast<const uint16_t*>(gmem) + r * row_stride + c * 8, n);
    uint32_t off;
    if constexpr (kSwizzle) off = SwizzledTile<kRows, kD>::offset(r, c);
    else off = 2 * (r * (kD + 8) + c * 8);
    st_shared_v4(smem + off, v);
  }
}

// The same as a real call (kCall) or inlined: where the element-wise branch sits
// before a kernel's main loop, ptxas's allocation of the plain path depended on
// it (sm_90, bf16 forward, non-dropout spill: d64 0 B inlined / 12 B called,
// d128 48 B inlined / 0 B called), so each kernel picks what measured best.
template <typename T, int kRows, int kD, int kThreads, bool kSwizzle = false>
__device__ __noinline__ void load_tile_elems_noinline(uint32_t smem, const T* gmem, int64_t row_stride, int rows_valid,
                                                      int width, int tid) {
  load_tile_elems<T, kRows, kD, kThreads, kSwizzle>(smem, gmem, row_stride, rows_valid, width, tid);
}
template <bool kCall, typename T, int kRows, int kD, int kThreads, bool kSwizzle = false>
__device__ __forceinline__ void load_tile_elems_at(uint32_t smem, const T* gmem, int64_t row_stride, int rows_valid,
                                                   int width, int tid) {
  if constexpr (kCall) load_tile_elems_noinline<T, kRows, kD, kThreads, kSwizzle>(smem, gmem, row_stride, rows_valid, width, tid);
  else load_tile_elems<T, kRows, kD, kThreads, kSwizzle>(smem, gmem, row_stride, rows_valid, width, tid);
}

// Streams consecutive (kRows x kD) tiles of one row-major global matrix into
// padded shared memory (row stride kD + 8), like load_tile_async, but with the
// per-thread addressing computed once. When kThreads is a multiple of the
// chunks per row, each thread owns the 16-byte chunks (row0 + i * kRowStep, col)
// of every tile, so the loop carries one tile pointer and one 64-bit offset
// instead of a pointer per chunk (ptxas: the per-chunk pointers were most of the
// d128 forward's 60-90 B spill; with this it has none). Other head dims (96,
// 160, 192) take the generic per-chunk path.
// kSwizzle: the smem tile is a SwizzledTile (swizzled_tile.h) instead of padded.
// Columns at or past d (d < kD: a head dim below its bucket, or d != d_v) are not
// zero-filled on the fixed-column path: the threads that own them copy columns
// 0..7 of the same rows instead (in bounds, finite), so no column predicate
// lives in the loop (q/k and v/dO widths differ with d_v != d, and a second
// predicate cost the dropout kernels 8-30 B more spill, ptxas sm_90). That is
// safe because every contraction over the head dim pairs a streamed tile with a
// zero-filled load-once tile (forward: Q with K; backward: K with Q, V with dO),
// and the output columns past the width (forward O from V, backward dV from dO,
// dK from Q) are never stored. Rows >= rows_valid are still zero-filled.
// Except for non-finite inputs: a copied inf meets the zero column as 0 x inf =
// NaN. Where that changes a result the float64 math keeps finite — the forward's
// K (an inf in K[j] gives q_i . k_j = -inf for some rows i, a finite softmax) —
// the stream zero-fills instead (kZeroPastWidth: a past-width thread treats every
// row as invalid, decided once per tile; an inf in K at d = 8 made finite output
// rows NaN, session 15). In the backward a copied inf of Q or dO only touches the
// rows (i) whose float64 scores or dP are already non-finite, so those streams
// keep the copies (their kernels' registers are tight: ptxas moved 0 -> 28-80 B
// of spill in sm_80 d128 kernels with the zero-fill there).
template <typename T, int kRows, int kD, int kThreads, bool kSwizzle = false, bool kZeroPastWidth = false>
struct TileStream {
  static constexpr int kChunks = kD / 8;
  // Swizzled, a thread's rows must differ by multiples of 8 (its chunk's swizzle
  // fixed); else (d192 at 256 threads, d256 at 128) the per-chunk path.
  static constexpr bool kFixedColumn =
      kThreads % kChunks == 0 && (!kSwizzle || (kThreads / kChunks) % 8 == 0);
  static constexpr int kRowStep = kFixedColumn ? kThreads / kChunks : 1;
  static constexpr int kIters = (kRows + kRowStep - 1) / kRowStep;
  static constexpr int kRowBytes = kSwizzle ? 128 : (kD + 8) * 2;  // between rows of one column block
  const T* tile;       // origin (row 0, col 0) of the next tile
  int64_t row_stride;  // elements
  int64_t thread_off;  // elements from the tile origin to this thread's first source chunk
  uint32_t smem_off;   // bytes from a smem tile's origin to this thread's first chunk
  int row0, tid, d;

  __device__ __forceinline__ TileStream(const T* origin, int64_t stride, int d_, int tid_)
      : tile(origin), row_stride(stride), tid(tid_), d(d_) {
    row0 = tid / kChunks;
    const int col = (tid % kChunks) * 8;
    thread_off = row0 * stride + (col < d ? col : 0);  // past d: a copy of columns 0..7 (see above)
    if constexpr (kSwizzle) {
      smem_off = SwizzledTile<kRows, kD>::offset(row0, col / 8);
    } else {
      smem_off = 2 * (row0 * (kD + 8) + col);
    }
  }
  // Copies rows [0, kRows) of the current tile to the smem tile at byte address
  // `smem_tile`; rows >= rows_valid (>= 1) are zero-filled, columns >= d
  // zero-filled (per-chunk path, kZeroPastWidth) or copies of columns 0..7.
  __device__ __forceinline__ void load(uint32_t smem_tile, int rows_valid) const {
    if constexpr (kFixedColumn) {
      if constexpr (kZeroPastWidth)
        if ((tid % kChunks) * 8 >= d) rows_valid = 0;  // this thread's chunk is past the width
#pragma unroll
      for (int i = 0; i < kIters; ++i) {
        const int r = row0 + i * kRowStep;
        if (kRows % kRowStep == 0 || r < kRows) {
          const bool pred = r < rows_valid;
          const T* src = pred ? tile + thread_off + i * kRowStep * row_stride : tile;
          cp_async16(smem_tile + smem_off + i * kRowStep * kRowBytes, src, pred);
        }
      }
    } else {
      load_tile_async<T, kRows, kD, kThreads, kSwizzle>(smem_tile, tile, row_stride, rows_valid, d, tid);
    }
  }
  // The same for a whole tile: the caller guarantees (warp-uniformly) that all
  // kRows rows are valid and d == kD. No predicates or selects, one 64-bit add
  // per chunk: the predicated load costs ~14 instructions per chunk (ptxas, d128
  // backward: 111 for the 8 Q/dO chunks of a step). A separate call, not a
  // branch inside load(): there it raised the d64 forward's spill from 4 to 28 B.
  __device__ __forceinline__ void load_full(uint32_t smem_tile) const {
    static_assert(kFixedColumn && !kZeroPastWidth, "load_full: one column chunk per thread, copies past d");
    const T* src = tile + thread_off;
    const int64_t chunk_stride = kRowStep * row_stride;
#pragma unroll
    for (int i = 0; i < kIters; ++i)
      if (kRows % kRowStep == 0 || row0 + i * kRowStep < kRows)
        cp_async16(smem_tile + smem_off + i * kRowStep * kRowBytes, src + i * chunk_stride, true);
  }
  __device__ __forceinline__ void advance() { tile += kRows * row_stride; }
};

// ldmatrix addressing for a padded row-major smem tile (row stride kS): the
// element offset of this lane's row at the fragment origin (0, 0); add the
// origin (row * kS + col), a compile-time constant in the unrolled loops.
// A fragment (16x16), non-transposed.
template <int kS>
__device__ __forceinline__ int a_lane_off(int lane) { return (lane % 16) * kS + (lane / 16) * 8; }
// B fragments of two n-tiles from storage [n][k] (e.g. K for Q K^T); also the A
// fragment from storage [k][m] (the transpose is stored), used with .trans.
template <int kS>
__device__ __forceinline__ int b_nk_lane_off(int lane) { return ((lane % 8) + (lane / 16) * 8) * kS + ((lane / 8) % 2) * 8; }
// B fragments of two n-tiles from storage [k][n] (e.g. V for P V), used with .trans.
template <int kS>
__device__ __forceinline__ int b_kn_lane_off(int lane) { return ((lane % 8) + ((lane / 8) % 2) * 8) * kS + (lane / 16) * 8; }

// The same as pointers, for the kernels that still address through them.
template <int kS, typename T>
__device__ __forceinline__ const T* a_addr(const T* base, int r0, int c0, int lane) {
  return base + r0 * kS + c0 + a_lane_off<kS>(lane);
}
template <int kS, typename T>
__device__ __forceinline__ const T* b_addr_nk(const T* base, int n0, int k0, int lane) {
  return base + n0 * kS + k0 + b_nk_lane_off<kS>(lane);
}
template <int kS, typename T>
__device__ __forceinline__ const T* b_addr_kn(const T* base, int k0, int n0, int lane) {
  return base + k0 * kS + n0 + b_kn_lane_off<kS>(lane);
}
template <int kS, typename T>
__device__ __forceinline__ const T* a_addr_km(const T* base, int m0, int k0, int lane) {
  return base + k0 * kS + m0 + b_nk_lane_off<kS>(lane);
}

// acc = A B^T for one warp's 16 rows (acc zeroed first): A's rows a_row0 .. a_row0 + 15 and B's first
// kNT * 8 rows, both k-contiguous in shared memory with row stride kS, over kKSteps k16 steps (the
// backward's S^T = K Q^T and dP^T = V dO^T).
template <typename T, int kS, int kNT, int kKSteps>
__device__ __forceinline__ void warp_gemm_nt(float (&acc)[kNT][4], const T* sA, int a_row0, const T* sB, int lane) {
#pragma unroll
  for (int i = 0; i < kNT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
#pragma unroll
  for (int ks = 0; ks < kKSteps; ++ks) {
    uint32_t a[4];
    ldmatrix_x4(a, a_addr<kS>(sA, a_row0, ks * 16, lane));
#pragma unroll
    for (int np = 0; np < kNT / 2; ++np) {
      uint32_t bfr[4];
      ldmatrix_x4(bfr, b_addr_nk<kS>(sB, np * 16, ks * 16, lane));
      mma16816<T>(acc[2 * np], a, bfr[0], bfr[1]);
      mma16816<T>(acc[2 * np + 1], a, bfr[2], bfr[3]);
    }
  }
}

}  // namespace orchard::cuda
