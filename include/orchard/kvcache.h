// Orchard's KV-cache decode entry point (flash-attn's flash_attn_with_kvcache):
// attention of a few new query rows against a (paged or contiguous) KV cache, with
// the new keys / values appended into the cache in place first. Forward only.
//
// Destination passing as elsewhere: the caller allocates out, lse and the split
// workspace (kvcache_plan); the cache is read and written in place,
// never copied or staged. See orchard/decode_params.h for the exact key numbering
// (cache_seqlens, cache_leftpad, cache_batch_idx, block_table, rotary positions).
//
// Requirements beyond flash-attn's: none that are stricter, except that on CUDA the
// caches must be 16-byte aligned with batch/row/head strides that are multiples of 16
// bytes (they are read with 16-byte vector copies and never staged). Supported: bf16,
// fp16, fp32; head dim a multiple of 8 up to 256; any page size that is a multiple of
// 16; rotary_dim any even value <= head dim; leftpad together with paging.
// Values of the index tensors (cache_seqlens, cache_leftpad, cache_batch_idx,
// block_table entries) are checked here when they are in host memory; device-resident
// ones are clamped by the kernels so that no access leaves the cache (the Python layer
// checks them before launching, outside CUDA-graph capture). A query row whose rotary
// position passes the end of rotary_cos uses its last row.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "orchard/errors.h"
#include "orchard/tensor_view.h"

namespace orchard {

struct DecodeOptions {
  std::optional<double> softmax_scale;  // default 1/sqrt(d)
  bool causal = false;                  // bottom-right aligned with the cache length after the append
  std::int64_t window_left = -1, window_right = -1;
  double softcap = 0.0;
  bool rotary_interleaved = true;       // GPT-J pairs (0,1),(2,3)...; false: GPT-NeoX (i, i + rd/2)
  int num_splits = 0;                   // 0: heuristic; 1: no split
  void* stream = nullptr;               // cudaStream_t for CUDA tensors
  // CUDA tensors: copy the index tensors (cache_seqlens, cache_leftpad, cache_batch_idx,
  // block_table) to the host and check their values before anything is written, as the CPU
  // backend always does; one stream sync per call. Skipped while the stream is captured into a
  // CUDA graph. Off: out-of-range values are not detected (reads and writes are still clamped
  // to the cache by the kernels).
  bool check_device_indices = true;
  std::string op_name = "orchard.flash_attn_with_kvcache";
};

struct DecodeArgs {
  TensorView q;                 // (b, sq, hq, d)
  TensorView k_cache, v_cache;  // (cache_b, capacity, hkv, d), or (num_blocks, page_size, hkv, d) with block_table
  TensorView k, v;              // optional (b, s_new, hkv, d): appended at cache_seqlens
  TensorView rotary_cos, rotary_sin;  // optional (seqlen_ro, rotary_dim / 2), q's dtype or float32
  TensorView cache_seqlens;     // optional int32 (b,)
  TensorView cache_batch_idx;   // optional int32 (b,) (contiguous caches only)
  TensorView cache_leftpad;     // optional int32 (b,)
  TensorView block_table;       // optional int32 (b, max_blocks_per_seq)
  TensorView alibi_slopes;      // optional float32 (hq,) or (b, hq)
  TensorView out;               // (b, sq, hq, d), q's dtype
  TensorView lse;               // optional float32 (b, hq, sq)
  TensorView workspace;         // uint8 [kvcache_plan(...).workspace_bytes], 16-byte aligned, when that is > 0
  DecodeOptions options;
};

// Validates and runs; throws orchard::Error (op-prefixed) having written nothing on bad input.
void attention_with_kvcache(const DecodeArgs& args);

// The number of KV splits this call will use (options.num_splits, or the heuristic
// when 0) and the workspace bytes it needs (0 when it does not split).
struct DecodePlan {
  int num_splits = 1;
  std::size_t workspace_bytes = 0;
};
DecodePlan kvcache_plan(const DecodeArgs& args);

// The split heuristic on its own: splits for `work_items` (batch x kv heads x row
// chunks) CTAs over at most `max_keys` keys on a device with `num_sms` multiprocessors.
int kvcache_num_splits_heuristic(std::int64_t work_items, std::int64_t max_keys, int num_sms);

}  // namespace orchard
