// attn_bias / attn_mask (params.h) on the sm90 kernels, for row-broadcast biases only: those
// whose row stride is 0 (a key-padding mask (B, 1, 1, S), a per-head key bias (1, H, 1, S)),
// where one row of sk elements serves every query row.  Each consumer thread reads the elements
// of its own fragment's columns straight from global memory (the read-only path: after the
// first CTA, L1 / L2 hits) and applies them in the kernels' feature pass, after apply_score_mods
// (so after softcap, as params.h orders them), in their kBias instantiations only.
// A bias with rows of its own (1, H, S, S) is staged by TMA instead (attn_bias_tiles.cuh, since
// sessions 52 / 53): read this way, every warp's load touches 8 rows' cache lines, and the H200 ran
// it slower than the sm80 kernels (bench/RESULTS.md, session 37: bf16 d128 b4 s1k, 0.183 / 0.783 ms
// fwd / fwd+bwd against cuDNN's 0.128 / 0.506).
// Batch and head strides of any value (0 = broadcast), key stride 1; the four bias kinds.
// Key tiles a boolean mask hides entirely are not run at all (the end of this file).
#pragma once
#include <cstdint>

#include "backends/cuda/sm80/attention_tiles.cuh"
#include "orchard/params.h"

namespace orchard::sm90 {

// The bias row of one (batch, head), its key stride 1 (sm90_fwd_call_supported checks both strides).
struct BiasRow {
  const unsigned char* base;  // element (b, h, 0, 0)
  int last_col;               // sk - 1
  float inv_scale;  // the kernels' scores are q.k before the scale: a bias b adds b / scale
  int kind;
};

__device__ __forceinline__ BiasRow bias_row(const FwdParams& p, int b, int h) {
  const int kind = cuda::bias_kind(p.attn_bias_dtype);
  const int64_t e = cuda::bias_elem_bytes(kind);
  return {static_cast<const unsigned char*>(p.attn_bias) + (b * p.bias_batch_stride + h * p.bias_head_stride) * e,
          static_cast<int>(p.sk - 1), 1.f / p.scale, kind};
}

// One stored element applied to a score: a boolean 0 masks it (-inf), a float adds bias / scale.
template <int kKind>
__device__ __forceinline__ void apply_bias_elem(float& x, cuda::BiasElem<kKind> v, float inv_scale) {
  if constexpr (kKind == 0) x = v != 0 ? x : -INFINITY;
  else x = fmaf(cuda::bias_convert<kKind>(v), inv_scale, x);
}

// The forward's fragment (wgmma accumulator layout): s[i] is row row0 + 8 ((i / 2) % 2), column
// c0 + 8 (i / 4) + (i % 2); both rows take the same element.  Columns past sk are not read (those
// scores are masked already).  One pass per kind (a run-time switch).
template <int kN>
__device__ __forceinline__ void add_attn_bias_row(const BiasRow& br, float (&s)[kN], int c0) {
  cuda::bias_dispatch(br.kind, [&](auto kind_tag) {
    constexpr int kKind = decltype(kind_tag)::value;
    using E = cuda::BiasElem<kKind>;
    const E* line = reinterpret_cast<const E*>(br.base) + c0;
#pragma unroll
    for (int i = 0; i < kN; i += 4) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int dc = 2 * i + e;  // 8 (i / 4) + e
        if (c0 + dc <= br.last_col) {
          const E v = __ldg(line + dc);
          apply_bias_elem<kKind>(s[i + e], v, br.inv_scale);
          apply_bias_elem<kKind>(s[i + 2 + e], v, br.inv_scale);
        }
      }
    }
  });
}

// Whether a boolean mask row (kind 0) shows every key of [k0, k0 + kBN) below sk: then the tile
// needs no mask pass (a key-padding mask leaves all but its boundary tile so).  A warp's vote
// (every lane calls it): one 4-byte word per lane where the row is 4-byte aligned, else bytes.
// Measured: the per-element pass on every tile cost the d128 forward 0.856 -> 1.330 ms (s4k).
template <int kBN>
__device__ __forceinline__ bool bias_row_shows_keys(const BiasRow& br, int k0, int lane) {
  static_assert(kBN % 16 == 0, "key tiles of whole 16-key slices");
  const bool aligned = (reinterpret_cast<uintptr_t>(br.base) & 3) == 0;  // k0 is a multiple of 16
  bool all = true;
#pragma unroll
  for (int j = 0; j < (kBN / 4 + 31) / 32; ++j) {
    const int k = k0 + 4 * (lane + 32 * j);
    if ((kBN / 4) % 32 != 0 && lane + 32 * j >= kBN / 4) continue;
    if (aligned && k + 3 <= br.last_col) {
      all &= cuda::all_bytes_nonzero(__ldg(reinterpret_cast<const uint32_t*>(br.base + k)));
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (k + e <= br.last_col) all &= __ldg(br.base + k + e) != 0;
    }
  }
  return __all_sync(0xffffffffu, all) != 0;
}

// The backward's transposed fragment (S^T): s[i] is key k0 + 8 ((i / 2) % 2), query
// q0 + 8 (i / 4) + (i % 2): one element per key.  Keys past sk read key sk - 1 (their P is zeroed).
template <int kN>
__device__ __forceinline__ void add_attn_bias_keys(const BiasRow& br, float (&s)[kN], int k0) {
  cuda::bias_dispatch(br.kind, [&](auto kind_tag) {
    constexpr int kKind = decltype(kind_tag)::value;
    using E = cuda::BiasElem<kKind>;
    const E* line = reinterpret_cast<const E*>(br.base);
    const E v0 = __ldg(line + (k0 < br.last_col ? k0 : br.last_col));
    const E v1 = __ldg(line + (k0 + 8 < br.last_col ? k0 + 8 : br.last_col));
#pragma unroll
    for (int i = 0; i < kN; ++i) apply_bias_elem<kKind>(s[i], (i / 2) % 2 ? v1 : v0, br.inv_scale);
  });
}

// ---- Key tiles a boolean mask hides (kind 0; float biases never count as hiding) ----
// A row-broadcast mask hides a key from every query row at once, so the kernels drop whole key
// tiles it hides: a right- or left-padded batch entry loads and scores only its keys.

// Whether the mask row hides every key in [k0, k1) (all its bytes 0).  Read per thread (the
// forward's producer is one thread; L1 hits after the first): 16-byte loads where the row
// allows, single bytes at its ends.
__device__ __forceinline__ bool bias_row_hides_keys(const BiasRow& br, int k0, int k1) {
  if (br.kind != 0) return false;
  const unsigned char* a = br.base + k0;
  const unsigned char* const e = br.base + k1;
  uint32_t any = 0;
#pragma unroll 1
  for (; a < e && (reinterpret_cast<uintptr_t>(a) & 15) != 0; ++a) any |= __ldg(a);
#pragma unroll 1
  for (; a + 16 <= e; a += 16) {
    const uint4 w = __ldg(reinterpret_cast<const uint4*>(a));
    any |= w.x | w.y | w.z | w.w;
  }
#pragma unroll 1
  for (; a < e; ++a) any |= __ldg(a);
  return any == 0;
}

// The forward: key tiles [n_begin, n_end) of kBN keys narrowed to those from the first to the last
// one the mask leaves a key visible in (both ends; tiles between keep their scoring).  None
// visible: an empty range, which the kernel already runs as rows that see no key (O 0, LSE -inf).
template <int kBN>
__device__ __forceinline__ void trim_hidden_key_tiles(const BiasRow& br, int sk, int& n_begin, int& n_end) {
  if (br.kind != 0) return;
  auto hidden = [&](int n) { return bias_row_hides_keys(br, n * kBN, min((n + 1) * kBN, sk)); };
#pragma unroll 1
  while (n_end > n_begin && hidden(n_end - 1)) --n_end;
#pragma unroll 1
  while (n_begin < n_end && hidden(n_begin)) ++n_begin;
}

// The backward: key tile [n0, n0 + bn) of kv head hk hidden from every query row (then its CTA
// has no step: dK, dV 0, no dQ term).  Checked where one mask row serves the whole GQA group (head
// stride 0, or no grouping).  A warp's vote (every lane calls it), one byte per lane and step.
__device__ __forceinline__ bool bias_hides_key_tile(const FwdParams& p, int b, int hk, int group, int n0, int bn,
                                                    int lane) {
  if (cuda::bias_kind(p.attn_bias_dtype) != 0 || (p.bias_head_stride != 0 && group != 1)) return false;
  const unsigned char* row = bias_row(p, b, hk * group).base;
  const int k1 = min(n0 + bn, static_cast<int>(p.sk));
  uint32_t any = 0;
#pragma unroll 1
  for (int k = n0 + lane; k < k1; k += 32) any |= __ldg(row + k);
  return __any_sync(0xffffffffu, any != 0) == 0;
}

}  // namespace orchard::sm90
