#include "core/forward_as_decode.h"

#include "orchard/attention.h"

namespace orchard::detail {

bool forward_fits_decode_kernel(const FwdParams& p, int max_rows) {
  if (p.cu_seqlens_q || p.segment_cu || p.attn_bias || p.dropout_p > 0.0f || p.dropout_mask) return false;
  const int d_v = p.d_v > 0 ? p.d_v : p.d;
  if (d_v != p.d || p.d % 8 != 0 || p.d < 8 || p.d > kMaxHeadDim) return false;
  if (p.b < 1 || p.hkv < 1 || p.sq < 1 || p.hq % p.hkv != 0) return false;
  if (static_cast<std::int64_t>(p.hq / p.hkv) * p.sq > max_rows) return false;
  const bool uses_diagonal = p.causal || p.window_left >= 0 || p.window_right >= 0 || p.alibi_slopes;
  return !uses_diagonal || p.causal_offset == static_cast<std::int64_t>(p.sk) - p.sq;
}

DecodeParams forward_as_decode(const FwdParams& p, int num_splits) {
  DecodeParams d;
  d.q = p.q;
  // The decode kernels write into their caches only when they append (s_new > 0); here they never do.
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
  // The decode kernels' diagonal is sk - sq (forward_fits_decode_kernel checked that it is this
  // call's); causal is a right window bound of 0 there.
  d.window_left = p.window_left;
  d.window_right = p.causal ? 0 : p.window_right;
  d.causal = d.window_right == 0;
  d.alibi_slopes = p.alibi_slopes;
  d.alibi_batch_stride = p.alibi_batch_stride;
  d.sink = p.sink;
  d.dtype = p.dtype;
  d.num_splits = num_splits;
  d.stream = p.stream;
  return d;
}

}  // namespace orchard::detail
