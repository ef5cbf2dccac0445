#include "backends/cpu/few_rows_forward.h"

#include <cstdlib>
#include <cstring>

#include "backends/cpu/gemm_bf16.h"
#include "backends/cpu/stage_buffer.h"
#include "backends/cpu/task_pool.h"
#include "core/decode_backend.h"
#include "orchard/attention.h"
#include "orchard/decode_params.h"
#include "orchard/kvcache.h"

namespace orchard::cpu {

bool forward_takes_decode_kernel(const FwdParams& p) {
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) return false;
  // bf16 runs the tiled forward on bf16 operands where the CPU has AVX512_BF16 (cheap staging,
  // fast GEMMs): the decode kernel pays for fewer rows there. Elsewhere bf16 tiles run the fp32 path.
  const int max_rows = p.dtype == DType::kBFloat16 && bf16_dot_available() ? kFewRowsMaxRowsBf16Dot : kFewRowsMaxRows;
  if (p.cu_seqlens_q || p.segment_cu || p.attn_bias || p.dropout_p > 0.0f || p.dropout_mask)
    return false;
  const int d_v = p.d_v > 0 ? p.d_v : p.d;
  if (d_v != p.d || p.d % 8 != 0 || p.d < 8 || p.d > kMaxHeadDim) return false;
  if (p.b < 1 || p.hkv < 1 || p.sq < 1 || p.hq % p.hkv != 0) return false;
  if (static_cast<std::int64_t>(p.hq / p.hkv) * p.sq > max_rows) return false;
  const bool uses_diagonal = p.causal || p.window_left >= 0 || p.window_right >= 0 || p.alibi_slopes;
  if (uses_diagonal && p.causal_offset != static_cast<std::int64_t>(p.sk) - p.sq) return false;
  const char* env = std::getenv("ORCHARD_CPU_FEW_ROWS");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

void forward_on_decode_kernel(const FwdParams& p) {
  DecodeParams d;
  d.q = p.q;
  // The decode kernel writes into its caches only when it appends (s_new > 0); here it never does.
  d.k_cache = const_cast<void*>(p.k);
  d.v_cache = const_cast<void*>(p.v);
  d.out = p.out;
  d.lse = static_cast<float*>(p.lse);
  d.q_batch_stride = p.q_batch_stride, d.q_row_stride = p.q_row_stride, d.q_head_stride = p.q_head_stride;
  d.kc_batch_stride = p.k_batch_stride, d.kc_row_stride = p.k_row_stride, d.kc_head_stride = p.k_head_stride;
  d.vc_batch_stride = p.v_batch_stride, d.vc_row_stride = p.v_row_stride, d.vc_head_stride = p.v_head_stride;
  d.o_batch_stride = p.o_batch_stride, d.o_row_stride = p.o_row_stride, d.o_head_stride = p.o_head_stride;
  d.lse_batch_stride = p.lse_batch_stride, d.lse_head_stride = p.lse_head_stride;
  d.b = p.b, d.sq = p.sq, d.hq = p.hq, d.hkv = p.hkv, d.d = p.d;
  d.capacity = p.sk;  // every batch entry's keys fill its "cache": cache_seqlens stays null
  d.cache_batch = p.b;
  d.scale = p.scale;
  d.softcap = p.softcap;
  // The decode kernel's diagonal is sk - sq (forward_takes_decode_kernel checked that it is
  // this call's); causal is a right window bound of 0 there.
  d.causal = p.causal;
  d.window_left = p.window_left;
  d.window_right = p.causal ? 0 : p.window_right;
  d.alibi_slopes = p.alibi_slopes;
  d.alibi_batch_stride = p.alibi_batch_stride;
  d.sink = p.sink;
  d.dtype = p.dtype;
  // Split-KV as the kvcache API plans it on the CPU (src/core/kvcache.cpp): keys cut into
  // chunks of at least 256 when the (batch, kv head) pairs are fewer than the threads.
  const std::int64_t pairs = static_cast<std::int64_t>(p.b) * p.hkv;
  d.num_splits = clamp_decode_splits(kvcache_num_splits_heuristic(pairs, p.sk, cpu_threads()), p.sk);
  const bool split = d.num_splits > 1;
  const StageBuffer accum(StageSlot::kForward,
                          split ? decode_split_workspace_floats(d.num_splits, p.b, p.hq, p.sq, p.d) * sizeof(float) : 0);
  if (split) place_decode_split_partials(d, accum.as<float>());
  orchard::detail::decode_cpu(d);
}

}  // namespace orchard::cpu
