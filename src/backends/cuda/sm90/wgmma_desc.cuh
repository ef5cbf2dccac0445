// wgmma shared-memory matrix descriptors (64-bit), as the PTX ISA defines them for sm_90a:
//   bits  0-13  start address >> 4
//   bits 16-29  leading-dimension byte offset >> 4  (LBO)
//   bits 32-45  stride-dimension byte offset >> 4   (SBO)
//   bits 49-51  base offset (0 when each 8-row swizzle pattern starts 1024-byte aligned)
//   bits 62-63  swizzle: 0 none, 1 = 128B, 2 = 64B, 3 = 32B
//
// The layout we use everywhere: a K-major tile whose rows are exactly 128 bytes (64 bf16/fp16),
// written by TMA with CU_TENSOR_MAP_SWIZZLE_128B.  Then 8 rows form one 1024-byte swizzle atom,
// SBO = 1024 (next 8-row group), and LBO is unused because one k16 slice (32 bytes) never
// crosses the 128-byte row; we store 1 there as the ISA suggests for "unused".
// The k-th k16 slice of the tile starts 32*k bytes in: the hardware applies the swizzle XOR
// to the full address, so advancing the start address by 32 bytes is exact as long as the
// tile base is 1024-byte aligned (base offset 0).
#pragma once
#include <cstdint>

namespace orchard::sm90 {

enum class WgmmaSwizzle : uint64_t { kNone = 0, k128B = 1, k64B = 2, k32B = 3 };

__device__ __forceinline__ uint64_t make_wgmma_desc(uint32_t smem_addr, uint32_t lbo_bytes,
                                                    uint32_t sbo_bytes, WgmmaSwizzle swz) {
  uint64_t d = 0;
  d |= static_cast<uint64_t>((smem_addr & 0x3FFFF) >> 4);
  d |= static_cast<uint64_t>((lbo_bytes & 0x3FFFF) >> 4) << 16;
  d |= static_cast<uint64_t>((sbo_bytes & 0x3FFFF) >> 4) << 32;
  d |= static_cast<uint64_t>(swz) << 62;
  return d;
}

// K-major, 128-byte rows, 128B swizzle (the TMA SWIZZLE_128B layout above).
// `smem_addr` = tile base (1024-aligned) + row0 * 128 + k16_index * 32.
__device__ __forceinline__ uint64_t make_desc_kmajor_sw128(uint32_t smem_addr) {
  return make_wgmma_desc(smem_addr, 16, 1024, WgmmaSwizzle::k128B);
}

// The swizzle mode of rows of 128, 64 or 32 bytes (the TMA swizzle that wrote them).
template <int kRowBytes>
constexpr WgmmaSwizzle wgmma_swizzle_of_rows() {
  static_assert(kRowBytes == 128 || kRowBytes == 64 || kRowBytes == 32, "swizzle row width");
  return kRowBytes == 128 ? WgmmaSwizzle::k128B : kRowBytes == 64 ? WgmmaSwizzle::k64B : WgmmaSwizzle::k32B;
}

// K-major with rows of 128, 64 or 32 bytes (64/32/16 16-bit elements of K) and the matching
// TMA swizzle (128B/64B/32B): the swizzle atom is 8 rows, so SBO = 8 * row bytes; a k16 slice
// (32 bytes) still advances the start address by 32 bytes inside the row.
template <int kRowBytes>
__device__ __forceinline__ uint64_t make_desc_kmajor_swizzled(uint32_t smem_addr) {
  return make_wgmma_desc(smem_addr, 16, 8 * kRowBytes, wgmma_swizzle_of_rows<kRowBytes>());
}

// MN-major (transposed: imm-trans = 1), 128B swizzle: the operand is stored as rows of K, each
// row holding 64 MN-contiguous elements (128 bytes); N > 64 comes as separate 64-wide chunks
// (e.g. one TMA box of 64 x rows each), `chunk_bytes` apart.  Canonical layout (elements,
// T = 8): ((T,8,m),(8,k)) : ((1,T,LBO),(8T,SBO)) -> LBO = chunk stride (MN direction),
// SBO = 1024 (next 8 K-rows).  A k16 step moves the start address 16 rows = 2048 bytes.
// Both LBO/SBO assignments are tried by bench/sm90 --selftest (modes ss_tnB, rs_tnB).
__device__ __forceinline__ uint64_t make_desc_mnmajor_sw128(uint32_t smem_addr,
                                                            uint32_t chunk_bytes) {
  return make_wgmma_desc(smem_addr, chunk_bytes, 1024, WgmmaSwizzle::k128B);
}

// MN-major with rows of 128 or 64 bytes (64 / 32 MN-contiguous 16-bit elements) and the matching
// TMA swizzle: CUTLASS's canonical form ((T,R/16,m),(8,k)) : ((1,T,LBO),(R/16 T,SBO)), so LBO =
// `chunk_bytes` (the next R-byte-wide chunk along MN) and SBO = 8 * R (the next 8 K-rows); a k16
// step moves the start address 16 rows = 16 * R bytes.  R = 128 is make_desc_mnmajor_sw128.
template <int kRowBytes>
__device__ __forceinline__ uint64_t make_desc_mnmajor_swizzled(uint32_t smem_addr, uint32_t chunk_bytes) {
  static_assert(kRowBytes == 128 || kRowBytes == 64, "swizzle row width");
  return make_wgmma_desc(smem_addr, chunk_bytes, 8 * kRowBytes, wgmma_swizzle_of_rows<kRowBytes>());
}

// Advancing a descriptor by `bytes` along the start address only touches the low field
// (addresses are < 256 KB, so no carry into LBO): one 64-bit add instead of a rebuild.
__device__ __forceinline__ uint64_t desc_advance(uint64_t desc, uint32_t bytes) {
  return desc + static_cast<uint64_t>(bytes >> 4);
}

}  // namespace orchard::sm90
