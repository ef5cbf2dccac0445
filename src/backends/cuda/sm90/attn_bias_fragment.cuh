// attn_bias / attn_mask (params.h) on the sm90 kernels, for row-broadcast biases only: those
// whose row stride is 0 (a key-padding mask (B, 1, 1, S), a per-head key bias (1, H, 1, S)),
// where one row of sk elements serves every query row.  Each consumer thread reads the elements
// of its own fragment's columns straight from global memory (the read-only path: after the
// first CTA, L1 / L2 hits) and applies them in the kernels' feature pass, after apply_score_mods
// (so after softcap, as params.h orders them), in their kBias instantiations only.
// A bias with rows of its own (1, H, S, S) runs the sm80 kernels, which stage its tiles in shared
// memory (attention_tiles.cuh): read this way, every warp's load touches 8 rows' cache lines, and
// the H200 ran it slower than the sm80 kernels (bench/RESULTS.md, session 37: bf16 d128 b4 s1k,
// 0.183 / 0.783 ms fwd / fwd+bwd against cuDNN's 0.128 / 0.506).  Doing those on sm90 needs
// the tiles staged by the producer warp (TMA), not done yet.
// Batch and head strides of any value (0 = broadcast), key stride 1; the four bias kinds.
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

}  // namespace orchard::sm90
