// Dense attn_bias / attn_mask tiles (a bias with rows of its own: (B, H, S, S), (1, 1, S, S), ...)
// on the sm90 forward and the d <= 128 backward, in their kBias kernels (sm90_dense_bias in
// sm90_call_support.h says which calls).  Row-broadcast biases (a key-padding mask) are read
// straight from global memory instead (attn_bias_fragment.cuh).
//
// Read that way, a dense bias was slower than the sm80 kernels (every warp load touched 8 rows'
// cache lines; H200, session 37), so here the producer warp copies each key tile's
// kBM x kBN bias elements into shared memory by TMA right after its K (a stage ring of its own:
// bias_full / bias_empty barriers), and each consumer warp reads its fragment from there into the
// score registers before it issues the tile's QK^T, which accumulates onto them; the stage goes
// back at once.
//
// The stage (attn_bias_tile_layout.h): boxes of 32 bytes of keys x kBM rows (16 keys of a 16-bit
// bias, 32 of a boolean mask), no swizzle (the fragment reads then meet a 2-way bank conflict,
// rows r and r + 4 of a warp's 8; a few loads per key tile).  The map's dims are
// (keys, rows, heads, batch), a broadcast dim (stride 0) of size 1 read at coordinate 0; TMA fills
// rows past sq and keys past sk with zeros (for a boolean mask 0 hides the key, for a float bias it
// adds nothing: both are scores that the kernels mask or never store).
// Kinds: boolean (1 byte) and 16-bit float (bf16 / fp16, either with either q dtype); a float32 bias
// stays on the sm80 kernels (its stage would not fit beside d128's tiles).
#pragma once
#include <cuda.h>

#include <cstdint>

#include "backends/cuda/sm80/attention_tiles.cuh"
#include "backends/cuda/sm80/mma_utils.cuh"
#include "backends/cuda/sm90/attn_bias_tile_layout.h"
#include "backends/cuda/sm90/tma.cuh"
#include "backends/cuda/sm90/tma_host.h"
#include "orchard/params.h"

namespace orchard::sm90 {

// Pins x's value here: the volatile loads after it cannot be hoisted above the math that made it
// (else every load of the tile issues first and their results stay live together, beside the
// scores: ptxas spilled the d128 consumers).
__device__ __forceinline__ void pin_score(float& x) { asm volatile("" : "+f"(x)); }

__device__ __forceinline__ uint32_t ld_shared_u16(uint32_t addr) {
  unsigned short v;
  asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(v) : "r"(addr));
  return v;
}

// The TMA loads of one bias tile into the stage at `dst` (attn_bias_tile_layout.h): kRows rows from
// row0 x kKeys keys from key0 of (batch b, head h), a broadcast dim read at 0, elements of e bytes;
// box x holds keys key0 + x * 32 / e.  They complete on `bar`, whose expect_tx the caller counts
// (kRows * kKeys * e bytes: boxes past sq / sk arrive as zeros).
template <int kRows, int kKeys>
__device__ __forceinline__ void load_bias_tile(uint32_t dst, const CUtensorMap* map, uint32_t bar, const FwdParams& p,
                                               int e, int key0, int row0, int h, int b) {
  // Rolled: the backward's producer has 24 registers (unrolled, its d64 causal kBias kernel spilled 8 B).
#pragma unroll 1
  for (int x = 0; x < bias_boxes<kKeys>(e); ++x)
    tma_load_4d(dst + x * kRows * kBiasBoxBytes, map, bar, key0 + x * (kBiasBoxBytes / e), row0,
                p.bias_head_stride != 0 ? h : 0, p.bias_batch_stride != 0 ? b : 0);
}

// One ldmatrix register of a 16-bit bias (kind 2: bf16, 3: fp16) as floats: x the low half (the lower
// key of a pair in the forward, the lower query in the backward's transposed read), y the high half.
__device__ __forceinline__ float2 bias_pair16(uint32_t r, int kind) {
  const auto lo = static_cast<unsigned short>(r & 0xffffu), hi = static_cast<unsigned short>(r >> 16);
  return make_float2(kind == 2 ? cuda::bias_convert<2>(lo) : cuda::bias_convert<3>(lo),
                     kind == 2 ? cuda::bias_convert<2>(hi) : cuda::bias_convert<3>(hi));
}

// This thread's scores set to the stage's elements (the wgmma accumulator layout: s[i] is row
// row_w + g + 8 ((i / 2) % 2), column 8 (i / 4) + 2t + (i % 2) of the tile; row_w = the warp's
// first row in the tile, 64 wg + 16 wi): bias / scale for a float bias (the kernels' scores are
// q.k before the scale), 0 or -inf for a boolean mask.  The QK^T then accumulates onto them.
template <int kBM, int kBN>
__device__ __forceinline__ void bias_tile_scores(uint32_t stage, int kind, float inv_scale, float (&s)[kBN / 2],
                                                 int row_w, int lane) {
  static_assert(kBN % 16 == 0, "bias tiles of whole 16-key blocks (ldmatrix pairs)");
  const int g = lane / 4, t = lane % 4;
  if (kind == 0) {
#pragma unroll
    for (int j = 0; j < kBN / 8; ++j)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const uint32_t v = ld_shared_u16(stage + bias_stage_offset<kBM>(row_w + g + 8 * r, 8 * j + 2 * t));
        s[4 * j + 2 * r] = cuda::bias_convert<0>(v & 0xffu);
        s[4 * j + 2 * r + 1] = cuda::bias_convert<0>(v >> 8);
        pin_score(s[4 * j + 2 * r]);
        pin_score(s[4 * j + 2 * r + 1]);
      }
    return;
  }
  // 16-bit kinds: one ldmatrix.x4 per two 8-key blocks (attn_bias_tile_layout.h says which lane
  // addresses which row and which register lands in which scores).
  const int row = row_w + bias_ldmatrix_row(lane);
#pragma unroll
  for (int j = 0; j < kBN / 8; j += 2) {
    uint32_t r[4];
    cuda::ldmatrix_x4(r, stage + bias_stage_offset<kBM>(row, bias_ldmatrix_byte_col(lane, j)));
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      const float2 v = bias_pair16(r[m], kind);
      const int i = bias_ldmatrix_score(j, m);
      s[i] = v.x * inv_scale;
      s[i + 1] = v.y * inv_scale;
      pin_score(s[i]);
      pin_score(s[i + 1]);
    }
  }
}

// The backward (flash_bwd_sm90.cuh): this thread's S^T scores (s[i] = key kw + g + 8 ((i / 2) % 2),
// query 8 (i / 4) + 2t + (i % 2) of the step; kw = the warp's first key in the key tile) plus the
// stage's elements for them, added after the S^T GEMM (a stage of kRows queries x the tile's keys,
// the forward's layout: attn_bias_tile_layout.h).  A float bias adds bias / scale, a boolean 0 sets
// -inf.  16-bit kinds: ldmatrix.x4.trans (the pair s[i], s[i + 1] is one key's two queries, in two
// stage rows); booleans: a byte per element.
template <int kRows>
__device__ __forceinline__ void add_bias_tile_keys(uint32_t stage, int kind, float inv_scale, float (&s)[32], int kw,
                                                   int lane) {
  static_assert(kRows == 64, "the backward's steps of 64 queries (S^T: 8 query blocks of 8)");
  const int g = lane / 4, t = lane % 4;
  if (kind == 0) {
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const int query = 8 * (i / 4) + 2 * t + (i % 2), key = kw + g + 8 * ((i / 2) % 2);
      unsigned short v;
      asm volatile("ld.shared.u8 %0, [%1];\n" : "=h"(v) : "r"(stage + bias_stage_offset<kRows>(query, key)));
      s[i] = v != 0 ? s[i] : -INFINITY;
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < 8; j += 2) {
    uint32_t r[4];
    cuda::ldmatrix_x4_trans(r, stage + bias_stage_offset<kRows>(bias_trans_ldmatrix_row(lane, j),
                                                                bias_trans_ldmatrix_byte_col(lane, kw)));
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      const float2 v = bias_pair16(r[m], kind);
      const int i = bias_ldmatrix_score(j, m);
      s[i] = fmaf(v.x, inv_scale, s[i]);
      s[i + 1] = fmaf(v.y, inv_scale, s[i + 1]);
    }
  }
}

// The tensor map of a dense bias (host): boxes of kBiasBoxBytes x box_rows.  False where TMA cannot
// take it (the caller then runs the sm80 kernels; sm90_dense_bias_stageable already checks the strides).
inline bool make_bias_map(CUtensorMap* map, const FwdParams& p, uint32_t box_rows) {
  const int kind = cuda::bias_kind(p.attn_bias_dtype);
  const uint64_t e = static_cast<uint64_t>(cuda::bias_elem_bytes(kind));
  if (e > 2) return false;
  const uint64_t row_bytes = static_cast<uint64_t>(p.bias_row_stride) * e;
  const uint64_t head_bytes = static_cast<uint64_t>(p.bias_head_stride) * e;
  const uint64_t batch_bytes = static_cast<uint64_t>(p.bias_batch_stride) * e;
  // A broadcast dim: size 1, its (unused) stride the packed one.
  const uint64_t dims[4] = {static_cast<uint64_t>(p.sk), static_cast<uint64_t>(p.sq),
                            head_bytes != 0 ? static_cast<uint64_t>(p.hq) : 1u,
                            batch_bytes != 0 ? static_cast<uint64_t>(p.b) : 1u};
  const uint64_t strides[3] = {row_bytes, head_bytes != 0 ? head_bytes : row_bytes * dims[1],
                               batch_bytes != 0 ? batch_bytes : row_bytes * dims[1] * dims[2]};
  const uint32_t box[4] = {static_cast<uint32_t>(kBiasBoxBytes / e), box_rows, 1, 1};
  return make_tma_4d(map, e == 1 ? CU_TENSOR_MAP_DATA_TYPE_UINT8 : CU_TENSOR_MAP_DATA_TYPE_UINT16, p.attn_bias, dims,
                     strides, box, CU_TENSOR_MAP_SWIZZLE_NONE);
}

}  // namespace orchard::sm90
