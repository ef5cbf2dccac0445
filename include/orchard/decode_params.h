// The plain parameter struct the decode (KV-cache) kernels see: pointers,
// element strides and options, nothing else. Filled by src/core/kvcache.cpp
// from a validated DecodeArgs.
//
// Conventions (shared with params.h): tensors are addressed as logical
// (batch, row, head, dim) through element strides, the dim stride is 1.
//
// Key numbering of one batch entry b (flash-attn's flash_attn_with_kvcache):
//   cache batch  cb = cache_batch_idx ? cache_batch_idx[b] : b      (contiguous cache)
//   cache rows   [leftpad, seqlen + s_new) hold the keys, seqlen = cache_seqlens[b]
//                (or the capacity when cache_seqlens is null), leftpad = cache_leftpad[b] or 0
//   key j in [0, n_keys), n_keys = seqlen + s_new - leftpad, lives at cache row leftpad + j
//   new row t (t < s_new) of k/v is written at cache row seqlen + t before attending
//   query row i sees key j on the diagonal diag = n_keys - sq (bottom-right aligned):
//     causal: j <= i + diag; window (l, r): i + diag - l <= j <= i + diag + r
//   rotary positions are cache rows: new k row t at seqlen + t; q row i at seqlen + i
//   when causal or windowed, else every q row at seqlen.
// Paged (block_table != null): cache row r of batch b is row r % page_size of block
// block_table[b * block_table_batch_stride + r / page_size]; k_cache is then
// (num_blocks, page_size, hkv, d) and its batch stride is the block stride.
#pragma once

#include <cstddef>
#include <cstdint>

#include "orchard/config.h"
#include "orchard/dtype.h"

namespace orchard {

struct DecodeParams {
  const void* q = nullptr;      // (b, sq, hq, d)
  void* k_cache = nullptr;      // (cache_batch, capacity, hkv, d) or (num_blocks, page_size, hkv, d)
  void* v_cache = nullptr;
  const void* k_new = nullptr;  // optional (b, s_new, hkv, d), appended in place
  const void* v_new = nullptr;
  void* out = nullptr;          // (b, sq, hq, d), dtype
  float* lse = nullptr;         // optional (b, hq, sq) float32, row stride 1

  std::int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  std::int64_t kc_batch_stride = 0, kc_row_stride = 0, kc_head_stride = 0;  // batch = block when paged
  std::int64_t vc_batch_stride = 0, vc_row_stride = 0, vc_head_stride = 0;
  std::int64_t kn_batch_stride = 0, kn_row_stride = 0, kn_head_stride = 0;
  std::int64_t vn_batch_stride = 0, vn_row_stride = 0, vn_head_stride = 0;
  std::int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  std::int64_t lse_batch_stride = 0, lse_head_stride = 0;

  int b = 0, sq = 0, hq = 0, hkv = 0, d = 0;
  int s_new = 0;                   // rows of k_new / v_new (0 = no append)
  std::int64_t capacity = 0;       // rows a batch entry's cache can hold
  std::int64_t cache_batch = 0;    // contiguous: batch entries of the cache; paged: num_blocks

  const std::int32_t* cache_seqlens = nullptr;    // (b,) or null (= capacity, no append)
  const std::int32_t* cache_batch_idx = nullptr;  // (b,) or null
  const std::int32_t* cache_leftpad = nullptr;    // (b,) or null
  const std::int32_t* block_table = nullptr;      // (b, max_blocks) or null (contiguous)
  std::int64_t block_table_batch_stride = 0;
  int page_size = 0;                               // paged only

  // Rotary on q and k_new: cos/sin (seqlen_ro, rotary_dim / 2) with row stride, dtype rotary_dtype.
  const void* rotary_cos = nullptr;
  const void* rotary_sin = nullptr;
  DType rotary_dtype = DType::kFloat32;
  std::int64_t cos_row_stride = 0, sin_row_stride = 0;
  std::int64_t rotary_seqlen = 0;
  int rotary_dim = 0;
  bool rotary_interleaved = true;

  float scale = 1.0f;
  float softcap = 0.0f;                // > 0: softcap * tanh(s / softcap)
  bool causal = false;                 // == (window_right == 0)
  std::int64_t window_left = -1, window_right = -1;
  const float* alibi_slopes = nullptr; // float32 (hq,) or (b, hq)
  std::int64_t alibi_batch_stride = 0;
  // Attention sinks (params.h's FwdParams::sink): float32 (hq,) logits that join every row's
  // softmax denominator without a value. Read by the CPU decode kernel only, for the CPU
  // forward's few-rows route (few_rows_forward.cpp); the kvcache API has no sink and the CUDA
  // decode kernels refuse one.
  const float* sink = nullptr;

  // Split-KV: the keys of each (batch, kv head) are cut into num_splits chunks; with
  // num_splits > 1, partials go to out_accum (num_splits, b, hq, sq, d) and lse_accum
  // (num_splits, b, hq, sq), float32 contiguous, then are combined into out / lse.
  int num_splits = 1;
  float* out_accum = nullptr;
  float* lse_accum = nullptr;

  DType dtype = DType::kBFloat16;
  void* stream = nullptr;  // cudaStream_t on CUDA

  // Backend-internal (set by the CUDA launcher, not by the core): the attention kernel
  // reads the new keys / values from k_new / v_new and writes them into the cache itself.
  bool append_in_kernel = false;
};

// A split-KV count brought into range: no split shorter than a 64-key granule of `max_keys`,
// at least 1, at most 256 (the kvcache plan and the CPU forward's few-rows route both use it).
inline int clamp_decode_splits(std::int64_t splits, std::int64_t max_keys) {
  const std::int64_t granules = max_keys > 64 ? (max_keys + 63) / 64 : 1;
  const std::int64_t n = splits < 1 ? 1 : (splits > granules ? granules : splits);
  return static_cast<int>(n < 256 ? n : 256);
}

// Split-KV partials (num_splits > 1) live in one fp32 workspace of this many floats: out_accum
// (num_splits, b, hq, sq, d), then lse_accum (num_splits, b, hq, sq).
inline std::size_t decode_split_workspace_floats(int splits, std::int64_t b, std::int64_t hq, std::int64_t sq,
                                                 std::int64_t d) {
  return static_cast<std::size_t>(splits) * b * hq * sq * (d + 1);
}
// Points p.out_accum / p.lse_accum into such a workspace (p.num_splits and the shape set).
inline void place_decode_split_partials(DecodeParams& p, float* workspace) {
  p.out_accum = workspace;
  p.lse_accum = workspace + static_cast<std::size_t>(p.num_splits) * p.b * p.hq * p.sq * p.d;
}

// The (key count, leftpad, seqlen) of batch entry bi, clamped into the cache so that a
// kernel never addresses memory outside it even for inputs the core could not check
// (device-resident indices on CUDA).
struct DecodeSeq {
  std::int64_t seqlen = 0;   // cache rows before the append
  std::int64_t leftpad = 0;  // first cache row that holds a key
  std::int64_t n_keys = 0;   // keys attended: seqlen + s_new - leftpad
};
ORCHARD_HOST_DEVICE DecodeSeq decode_seq(const DecodeParams& p, int bi) {
  DecodeSeq s;
  std::int64_t seqlen = p.cache_seqlens ? p.cache_seqlens[bi] : p.capacity;
  const std::int64_t max_seqlen = p.capacity - p.s_new;
  if (seqlen > max_seqlen) seqlen = max_seqlen;
  if (seqlen < 0) seqlen = 0;
  std::int64_t lp = p.cache_leftpad ? p.cache_leftpad[bi] : 0;
  if (lp > seqlen) lp = seqlen;
  if (lp < 0) lp = 0;
  s.seqlen = seqlen;
  s.leftpad = lp;
  s.n_keys = seqlen + p.s_new - lp;
  return s;
}

// Element offset of cache row `row` of batch entry bi (batch / block part plus row part;
// add head * head_stride). An out-of-range block id is clamped to block 0.
ORCHARD_HOST_DEVICE std::int64_t decode_cache_row_offset(const DecodeParams& p, int bi, std::int64_t row,
                                                         std::int64_t batch_stride, std::int64_t row_stride) {
  if (p.block_table == nullptr) {
    std::int64_t cb = p.cache_batch_idx ? p.cache_batch_idx[bi] : bi;
    if (cb < 0 || cb >= p.cache_batch) cb = 0;
    return cb * batch_stride + row * row_stride;
  }
  std::int64_t block = p.block_table[bi * p.block_table_batch_stride + row / p.page_size];
  if (block < 0 || block >= p.cache_batch) block = 0;
  return block * batch_stride + (row % p.page_size) * row_stride;
}

// Keys [begin, end) that query row i may see (causal / window), within [0, n_keys).
ORCHARD_HOST_DEVICE void decode_visible(const DecodeParams& p, std::int64_t n_keys, std::int64_t i,
                                        std::int64_t& begin, std::int64_t& end) {
  const std::int64_t diag = n_keys - p.sq;
  begin = 0;
  end = n_keys;
  if (p.window_left >= 0 && i + diag - p.window_left > begin) begin = i + diag - p.window_left;
  if (p.window_right >= 0 && i + diag + p.window_right + 1 < end) end = i + diag + p.window_right + 1;
  if (end < 0) end = 0;
  if (begin > n_keys) begin = n_keys;
}

// Rotary position of query row i (see the header comment).
ORCHARD_HOST_DEVICE std::int64_t decode_q_rotary_pos(const DecodeParams& p, const DecodeSeq& s, std::int64_t i) {
  const bool per_row = p.window_left >= 0 || p.window_right >= 0;
  return s.seqlen + (per_row ? i : 0);
}

// The split of keys [0, n_keys) handled by split `split` of `num_splits`: equal chunks
// rounded up to `granule` keys.
ORCHARD_HOST_DEVICE void decode_split_range(std::int64_t n_keys, int split, int num_splits, int granule,
                                            std::int64_t& begin, std::int64_t& end) {
  std::int64_t per = (n_keys + num_splits - 1) / num_splits;
  per = (per + granule - 1) / granule * granule;
  begin = per * split;
  end = begin + per;
  if (begin > n_keys) begin = n_keys;
  if (end > n_keys) end = n_keys;
}

}  // namespace orchard
