// Which calls the sm90 (Hopper) kernels cover, from the call alone: no device query, no
// environment (cuda_backend.cu adds those: the build holds sm_90a code, the device is compute
// capability 9.0, ORCHARD_SM90 is not "0").  A call they do not cover runs the sm80 kernels.
// Host-only and CUDA-free, so tests/cpp/sm90_call_support_test.cpp pins these rules in CI.
#pragma once
#include <cstddef>
#include <cstdint>

#include "backends/cuda/dropout_fragment.h"
#include "backends/cuda/launch.h"
#include "backends/cuda/score_mods.h"
#include "backends/cuda/sm90/flash_fwd_sm90_launch.h"
#include "orchard/params.h"

namespace orchard::cuda {

// A dense attn_bias / mask (rows of its own) that the sm90 forward stages by TMA
// (sm90/attn_bias_tiles.cuh): boolean or 16-bit float, key stride 1, a 16-byte aligned base and
// row / head / batch strides of whole 16-byte chunks (0 = broadcast).  Not a float32 bias (its
// stage does not fit beside d128's tiles).  Every head-dim bucket of the forward; the backward's
// d <= 128 kernel stages the same tiles with each step's Q / dO (flash_bwd_sm90.cuh), the wide one
// does not (sm90_bwd_call_supported).
ORCHARD_HOST_DEVICE bool sm90_dense_bias(const FwdParams& p) {
  return p.attn_bias != nullptr && p.bias_row_stride != 0 && p.sq != 1;
}
inline bool sm90_dense_bias_stageable(const FwdParams& p) {
  const int kind = bias_kind(p.attn_bias_dtype);
  if (kind == 1) return false;  // float32
  const int64_t big = int64_t{1} << 36;  // TMA strides stay below 2^40 bytes
  // (One key has no key stride to speak of.)
  return bias_tile_async(p.attn_bias, kind, p.bias_batch_stride, p.bias_head_stride, p.bias_row_stride,
                         p.sk == 1 ? 1 : p.bias_col_stride) &&
         p.bias_row_stride > 0 && p.bias_head_stride >= 0 && p.bias_batch_stride >= 0 && p.bias_row_stride < big &&
         p.bias_head_stride < big && p.bias_batch_stride < big;
}

// Dropout (sm90/dropout_scores.cuh): each lane's Philox calls cover its fragment, which needs mask
// row / column offsets on the 16 grid (cuda/dropout_fragment.h; the sm80 kernels draw per element
// otherwise; the forward's columns on the 32 grid, sm90_fwd_takes_dropout); not in varlen's segment
// form (its packed row numbers are not the mask's per-sequence rows). The backward's lane pairs need
// the same (sm90_bwd_call_supported adds its limits). The dispatch adds ORCHARD_SM90_DROPOUT
// (cuda_backend.cu; unset: sm90_dropout_measured_faster below).
ORCHARD_HOST_DEVICE bool sm90_fwd_dropout_form(const FwdParams& p) {
  return p.segment_cu == nullptr && dropout_fragment_aligned(p.dropout_row_offset, p.dropout_col_offset);
}
// The dropout calls the sm90 forward runs (flash_fwd_sm90.cuh, kFwdSm90Dropout): every head-dim
// bucket without attn_bias (the kBias kernels carry no dropout code), with the rows = queries form's
// offsets (dropout_scores.cuh: column offsets of 32s, so each call's place in the tile is known at
// compile time; the backward takes the 16 grid). Session 56 (H100, 4 Philox draws per call) had the
// d64 / d96 forwards on the sm80 kernels (d64's 2-WG tile 0.85-0.89x their speed); session 62 gave
// the 3-WG d64 / d96 kernels the code (sm90_dropout_measured_faster says which buckets run it by
// default).
ORCHARD_HOST_DEVICE bool sm90_fwd_takes_dropout(const FwdParams& p) {
  return p.attn_bias == nullptr && query_rows_aligned(p.dropout_row_offset, p.dropout_col_offset);
}
// The buckets whose dropout calls the sm90 kernels take by default (ORCHARD_SM90_DROPOUT unset):
// those measured faster than the sm80 kernels (bench/sm90_dropout_bench.py, H100, s2k / s8k). Session
// 56 ([G56]): forward d128 1.16-1.30x, d256 1.18-1.43x; forward + backward d64 1.08-1.12x, d128
// 1.26-1.31x. Session 57 ([G57]): d192 forward 1.27-1.39x, forward + backward 1.37-1.40x; d256
// backward (forward + backward, both forwards on sm90) 1.23-1.42x. Session 59 ([G59]): d96 forward +
// backward 1.21-1.27x (the forward on the sm80 kernels either way). Session 62 ([G62], 8-bit draws):
// forward d96 1.28-1.40x (3 WGs x 96 keys), d64 1.16-1.28x on its 128-key 3-WG kernel, which lost
// 1.4-4.6 % without dropout when it carried the code, so d64 got a 96-key tile of its own. Session 63
// ([G63]): that tile 0.93-1.07x the sm80 forward with the drop on fp32 scores, 1.09-1.36x with the
// drop on packed P (ORCHARD_SM90_FWD_DROP_PACKED; 1.02-1.07x FA2). So every bucket, both directions.
ORCHARD_HOST_DEVICE bool sm90_dropout_measured_faster(int /*bucket*/, bool /*backward*/) { return true; }

// The forward: bf16 / fp16; d == d_v in 33..256, a multiple of 8 (run in the bucket 64 / 96 / 128 /
// 192 / 256 above d, sm90_head_dim_bucket; d <= 32 stays on the sm80 kernels' 32-wide bucket);
// plain or causal; sliding windows, softcap and ALiBi (run-time branches of the kernels); sinks
// (the epilogue); attn_bias / masks in the kBias kernels: row-broadcast ones (row stride 0, key
// stride 1; sm90/attn_bias_fragment.cuh) and the dense ones above (not with softcap); GQA; a positive scale (the
// softmax keeps the row max of the raw scores); 16-byte aligned rows with strides of whole
// 16-byte chunks (TMA).  Varlen only in its segment form (sm90_segment_form below); dropout in the
// form above (no dropout mask output); not: float32 dense biases or unaligned ones.
inline bool sm90_fwd_call_supported(const FwdParams& p) {
  if (p.dtype != DType::kBFloat16 && p.dtype != DType::kFloat16) return false;
  if (value_dim(p) != p.d || p.d <= 32 || p.d > 256 || p.d % 8 != 0) return false;
  if (p.dropout_mask != nullptr || p.cu_seqlens_q != nullptr || p.cu_seqlens_k != nullptr) return false;
  if (p.dropout_p > 0.f && !sm90_fwd_dropout_form(p)) return false;
  if (p.b <= 0 || p.b > 65535 || p.hq <= 0 || p.hq > 65535 || p.sq <= 0 || p.sk <= 0) return false;
  // (One query row has no other rows to differ; one key has no stride to speak of.)
  if (p.attn_bias != nullptr && (sm90_dense_bias(p) ? !sm90_dense_bias_stageable(p) : p.bias_col_stride != 1 && p.sk != 1))
    return false;
  // A dense bias starts the scores before the QK^T (flash_fwd_sm90.cuh): softcap would cap it too.
  if (sm90_dense_bias(p) && p.softcap > 0.f) return false;
  if (!(p.scale > 0.f)) return false;
  if (p.segment_cu != nullptr && (p.b != 1 || p.segments <= 0)) return false;
  FwdParams q = p;
  q.d_v = value_dim(p);
  if (!fwd_vec16(q)) return false;
  // The TMA maps stride over rows even when a tensor has one row (fwd_vec16 skips those).
  return (p.q_row_stride | p.k_row_stride | p.v_row_stride) % 8 == 0;
}

// The sm90 kernels run a varlen call whose q and k share one cu_seqlens (the same tensor: packed
// self-attention, as transformers' padded and packed batches and flash-attn's qkvpacked varlen
// pass) as one sequence of the packed rows, each row seeing the keys of its own segment only
// (params.h, segment_cu): every sequence then has len_k == len_q, so both causal alignments put
// the diagonal at 0, and windows, softcap and per-head ALiBi read the same in packed row numbers.
// True when p is such a call; sm90_segment_form(p) is then the call the kernels see.
inline bool sm90_segment_form_applies(const FwdParams& p) {
  return p.cu_seqlens_q != nullptr && p.cu_seqlens_q == p.cu_seqlens_k && p.b > 0 && p.total_q > 0 &&
         p.total_k > 0 && p.total_q <= INT32_MAX && p.total_k <= INT32_MAX && p.alibi_batch_stride == 0;
}
template <class Params>
Params sm90_segment_form(const Params& p) {  // (only where sm90_segment_form_applies)
  Params q = p;
  q.segment_cu = p.cu_seqlens_q;
  q.segments = p.b;
  q.cu_seqlens_q = q.cu_seqlens_k = nullptr;
  q.b = 1;
  q.sq = static_cast<int>(p.total_q);
  q.sk = static_cast<int>(p.total_k);
  q.causal_offset = 0;
  return q;
}
// Whether the segment form's forward beats the sm80 varlen kernels (its backward always did):
// H200, session 39 (bench/feature_bench.py, bf16 causal, ORCHARD_SM90_VARLEN_FWD=1 against two
// offset tensors in the same process): 16 sequences of 256-4096 rows (2.4k on average) d128 1.71x,
// d64 1.24x the sm80 forward's speed; 64 sequences of 64-1024 rows (511 on average) d128 0.96x.
// So from 1024 rows per sequence on average.
inline bool sm90_segment_forward_pays(const FwdParams& p) {
  return p.b > 0 && p.total_q / p.b >= 1024;
}
// The call the sm90 kernels would run: p itself, or a varlen call's segment form.
template <class Params>
Params sm90_form(const Params& p) {
  return sm90_segment_form_applies(p) ? sm90_segment_form(p) : p;
}

// The backward workspace a call needs (BackendOps::backward_workspace_bytes): its own layout,
// and for any varlen call the segment form's too, whose D and dQ accumulator span every packed
// row, the ones no sequence owns included (one sequence of 256 rows in 1024 packed, d128 8 heads:
// 4.2 MB against the call's 1.1 MB; sized by the call's layout alone, the sm90 backward wrote
// past the workspace, session 41's review). For any varlen call, not only where the segment form
// applies: whether q and k share one offsets tensor is a pointer, which the callers'
// workspace-size caches do not key on.
inline std::size_t bwd_workspace_bytes(const BwdParams& p) {
  const bool own = p.dq_accum == nullptr;
  std::size_t bytes = bwd_workspace_layout(p, own).bytes;
  if (p.cu_seqlens_q != nullptr && p.total_q > 0 && p.total_q <= INT32_MAX && p.total_k <= INT32_MAX) {
    const std::size_t segment = bwd_workspace_layout(sm90_segment_form(p), own).bytes;
    if (segment > bytes) bytes = segment;
  }
  return bytes;
}

// The backward: the forward's calls (flash_bwd_sm90.cuh for d <= 128, flash_bwd_sm90_wide.cuh
// above, both with every modifier above; sinks need nothing more, P comes from the LSE, which
// holds them) with dO / dQ / dK / dV rows in 16-byte vectors (dO is read by TMA).  A dense
// attn_bias in the d <= 128 kernel only.  Not: softcap with attn_bias (the sm90 softcap gradient
// recovers tanh from P, which would need the bias read again); the C++ API's dsink output (its
// pass, run_bwd_dsink, reads the sm80 workspace's D); deterministic mode except d == d_v of
// exactly 64 or 128 without score modifiers (the kernels with ordered dQ adds).
inline bool sm90_bwd_call_supported(const BwdParams& p) {
  // The segment form in the d <= 128 kernels only (flash_bwd_sm90.cuh); not deterministic, and not
  // into a caller's dQ accumulator (laid out per sequence).
  if (p.segment_cu != nullptr && (p.deterministic || p.d > 128 || p.dq_accum != nullptr)) return false;
  if (p.deterministic && ((p.d != 64 && p.d != 128) || score_mods_active(p))) return false;
  if (p.attn_bias != nullptr && p.softcap > 0.f) return false;
  if (sm90_dense_bias(p) && p.d > 128) return false;  // the wide kernel reads row-broadcast biases only
  if (p.dsink != nullptr) return false;
  // Dropout in the kFeatures instantiations (flash_bwd_sm90.cuh, flash_bwd_sm90_wide.cuh), not
  // deterministic (the ordered-dQ kernels).
  if (p.dropout_p > 0.f && p.deterministic) return false;
  if (!sm90_fwd_call_supported(p)) return false;
  BwdParams q = p;
  q.d_v = value_dim(p);
  return bwd_vec16(q) && p.do_row_stride % 8 == 0;
}

}  // namespace orchard::cuda
