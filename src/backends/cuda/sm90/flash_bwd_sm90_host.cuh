// The sm90 backward's host side for one (dtype, head-dim bucket): the TMA maps and the main
// kernel's launch, for the d64 / d128 kernel (flash_bwd_sm90.cuh) and the d192 / d256 one
// (flash_bwd_sm90_wide.cuh).  Included by the flash_bwd_sm90_<dtype>_d<d>.cu instantiations
// (sm_90a only) and by bench/sm90/sm90_bwd_bench.cu.
#pragma once
#include <type_traits>

#include "backends/cuda/device_attribute.h"
#include "backends/cuda/sm90/flash_bwd_sm90.cuh"
#include "backends/cuda/sm90/flash_bwd_sm90_wide.cuh"

namespace orchard::cuda {

template <int kD>
using BwdSm90ConfigFor =
    std::conditional_t<(kD > 128), sm90::BwdSm90WideConfig<kD>, sm90::BwdSm90Config<kD>>;

template <typename T, int kD>
bool encode_flash_bwd_sm90(const BwdParams& p, BwdSm90MapsStorage* out) {
  using Cfg = BwdSm90ConfigFor<kD>;
  static_assert(sizeof(sm90::BwdSm90Maps) <= sizeof(BwdSm90MapsStorage), "map storage");
  sm90::BwdSm90Maps* m = reinterpret_cast<sm90::BwdSm90Maps*>(out->bytes);
  // The maps' width is the true d: TMA zero-fills the tile columns d..kD-1, which then add
  // nothing to S^T, dP^T, dK, dV or dQ (and are not stored).
  if (p.d > kD || p.d % 8 != 0 || value_dim(p) != p.d) return false;
  constexpr int kCols = Cfg::kChunkCols;  // the box width: one swizzle row
  // A dense attn_bias (the d <= 128 kernels): boxes of 32 bytes x the step's 64 query rows.
  if constexpr (kD <= 128) {
    if (sm90_dense_bias(p) && !sm90::make_bias_map(&m->bias, p, Cfg::kBM)) return false;
  }
  return sm90::make_attn_map<T>(&m->q, p.q, p.d, p.sq, p.hq, p.b, p.q_row_stride, p.q_head_stride, p.q_batch_stride,
                               Cfg::kBM, kCols) &&
         sm90::make_attn_map<T>(&m->dout, p.dout, p.d, p.sq, p.hq, p.b, p.do_row_stride, p.do_head_stride,
                               p.do_batch_stride, Cfg::kBM, kCols) &&
         sm90::make_attn_map<T>(&m->k, p.k, p.d, p.sk, p.hkv, p.b, p.k_row_stride, p.k_head_stride, p.k_batch_stride,
                               Cfg::kBN, kCols) &&
         sm90::make_attn_map<T>(&m->v, p.v, p.d, p.sk, p.hkv, p.b, p.v_row_stride, p.v_head_stride, p.v_batch_stride,
                               Cfg::kBN, kCols);
}

// The main kernel of a call.  d192 / d256 (flash_bwd_sm90_wide.cuh): dQ by atomics only (no
// deterministic form: sm90_bwd_applies keeps that mode on the sm80 kernels there); score
// modifiers run its kFeatures kernels.  d96: below.  d64 / d128: score modifiers run the kFeatures kernels,
// with bulk dQ only (the atomic-dQ variant, a bench A/B, has no feature instantiation); a d below
// the bucket runs the kPaddedD kernels, which are also the kFeatures ones (bulk dQ; no features
// active = the plain math with its run-time branches): two kernels instead of four.
// The kFeatures kernels run score modifiers and dropout (run-time branches in them).
inline bool features_or_dropout(const BwdParams& p) { return score_mods_active(p) || p.dropout_p > 0.f; }

template <typename T, int kD>
auto flash_bwd_sm90_kernel_for(const BwdParams& p, bool bulk_dq) {
  // attn_bias: the kBias kernels, whatever else the call modifies: per causal flag, and at d <= 128
  // the kPaddedD form for a d below the bucket (the d == kD form spilled less: bf16 d128 52-80 B
  // against 88-116 B).
  if (p.attn_bias != nullptr) {
    if constexpr (kD > 128)
      return p.causal ? sm90::flash_bwd_sm90_wide_kernel<T, kD, true, true, true>
                      : sm90::flash_bwd_sm90_wide_kernel<T, kD, false, true, true>;
    else
      return p.d != kD ? (p.causal ? sm90::flash_bwd_sm90_kernel<T, kD, true, true, true, true, false, true>
                                   : sm90::flash_bwd_sm90_kernel<T, kD, false, true, true, true, false, true>)
                       : (p.causal ? sm90::flash_bwd_sm90_kernel<T, kD, true, true, true, false, false, true>
                                   : sm90::flash_bwd_sm90_kernel<T, kD, false, true, true, false, false, true>);
  }
  if constexpr (kD > 128) {
    (void)bulk_dq;
    return features_or_dropout(p)
               ? (p.causal ? sm90::flash_bwd_sm90_wide_kernel<T, kD, true, true>
                           : sm90::flash_bwd_sm90_wide_kernel<T, kD, false, true>)
               : (p.causal ? sm90::flash_bwd_sm90_wide_kernel<T, kD, true, false>
                           : sm90::flash_bwd_sm90_wide_kernel<T, kD, false, false>);
  } else if constexpr (kD == 96) {
    // d96: bulk dQ only and no deterministic form (sm90_bwd_applies keeps that mode on the sm80
    // kernels); d < 96 runs the kPaddedD kernels (also the kFeatures ones): 6 kernels per dtype.
    (void)bulk_dq;
    return p.d != kD ? (p.causal ? sm90::flash_bwd_sm90_kernel<T, kD, true, true, true, true>
                                 : sm90::flash_bwd_sm90_kernel<T, kD, false, true, true, true>)
           : features_or_dropout(p) ? (p.causal ? sm90::flash_bwd_sm90_kernel<T, kD, true, true, true, false>
                                              : sm90::flash_bwd_sm90_kernel<T, kD, false, true, true, false>)
           : p.causal ? sm90::flash_bwd_sm90_kernel<T, kD, true, true, false, false>
                      : sm90::flash_bwd_sm90_kernel<T, kD, false, true, false, false>;
  } else {
    // Deterministic: ordered bulk dQ adds (sm90_bwd_applies sends only d == kD without score
    // modifiers here).
    if (p.deterministic)
      return p.causal ? sm90::flash_bwd_sm90_kernel<T, kD, true, true, false, false, true>
                      : sm90::flash_bwd_sm90_kernel<T, kD, false, true, false, false, true>;
    return p.d != kD ? (p.causal ? sm90::flash_bwd_sm90_kernel<T, kD, true, true, true, true>
                                 : sm90::flash_bwd_sm90_kernel<T, kD, false, true, true, true>)
           : features_or_dropout(p)
               ? (p.causal ? sm90::flash_bwd_sm90_kernel<T, kD, true, true, true, false>
                           : sm90::flash_bwd_sm90_kernel<T, kD, false, true, true, false>)
           : p.causal ? (bulk_dq ? sm90::flash_bwd_sm90_kernel<T, kD, true, true, false, false>
                                 : sm90::flash_bwd_sm90_kernel<T, kD, true, false, false, false>)
                      : (bulk_dq ? sm90::flash_bwd_sm90_kernel<T, kD, false, true, false, false>
                                 : sm90::flash_bwd_sm90_kernel<T, kD, false, false, false, false>);
  }
}

// The ordered-dQ kernels' head group (bwd_sm90_cta): a key block's dQ add waits for the previous
// key block's at the same query block, so the resident CTAs of one head form a chain that costs
// one add's latency per link when they start together.  Grouping heads so that a wave of CTAs
// (one per SM) holds about kOrderedChain key blocks per head keeps the chains short; the
// same-head CTAs of a wave read the same Q / dO tiles at about the same time (L2 hits).
#ifndef ORCHARD_SM90_ORDERED_CHAIN
#define ORCHARD_SM90_ORDERED_CHAIN 4
#endif
inline int ordered_head_group(const BwdParams& p) {
  constexpr int kOrderedChain = ORCHARD_SM90_ORDERED_CHAIN;
  const int queried = current_device_attribute<cudaDevAttrMultiProcessorCount>();
  const int sms = queried > 0 ? queried : 132;  // an H100 / H200's count if the query failed
  const int64_t heads = static_cast<int64_t>(p.b) * p.hkv;
  const int64_t group = (sms + kOrderedChain - 1) / kOrderedChain;
  return static_cast<int>(group < heads ? group : heads);
}

template <typename T, int kD>
void launch_flash_bwd_sm90_main(const BwdParams& p, const BwdSm90MapsStorage& maps, const float* dsum,
                                float* dq_accum, bool bulk_dq) {
  using Cfg = BwdSm90ConfigFor<kD>;
  const int nb = (p.sk + Cfg::kBN - 1) / Cfg::kBN;
  const int64_t tiles = static_cast<int64_t>(nb) * p.b * p.hkv;
  if (tiles == 0) return;
  // Non-causal d128, and d64 / d96 (d64's rule, not timed apart) up to 2k queries: persistent, one
  // CTA per SM (one fits: __launch_bounds__(384, 1) and the shared memory), so a tile's K / V load
  // and first Q / dO stage overlap the previous tile's last steps and dK / dV stores instead of a
  // CTA launch and an empty pipeline.  The H200 (session 25, ab_bwd.sh, medians of 3 alternating rounds, two
  // calls): d128 non-causal +1-5 % (s1k-16k); d64 +5 % at s1k / s2k but 0.95-0.98x at s4k-16k;
  // causal d128 0.73-0.91x: its tiles' work differs (key block n sees the query tiles from n on)
  // and a static stride cannot balance it as the hardware's launch order of one CTA per tile does.
  // A tile counter as FA3's scheduler (every d64 / d128 launch persistent, tiles from an atomic
  // counter the pre-pass zeroed) lost 0-8 % (session 26, bench/NOTES.md): removed.  The kernel
  // strides over the tiles by gridDim.x either way; the ordered-dQ kernels keep one CTA per tile.
  int64_t grid = tiles;
  const bool persistent = kD == 128 || (kD <= 96 && p.sq <= ORCHARD_SM90_BWD64_PERSISTENT_MAX_SQ);
  if (ORCHARD_SM90_BWD_PERSISTENT && persistent && !p.causal && !p.deterministic) {
    const int sms = current_device_attribute<cudaDevAttrMultiProcessorCount>();
    if (sms > 0 && sms < grid) grid = sms;
  }
  auto kernel = flash_bwd_sm90_kernel_for<T, kD>(p, bulk_dq);
  // A dense attn_bias's stages (the d <= 128 kBias kernels) take shared memory past the others'.
  int smem = Cfg::kSmemBytes;
  if constexpr (kD <= 128) {
    if (sm90_dense_bias(p)) smem = Cfg::kSmemBytesDenseBias;
  }
  cuda::set_max_dynamic_smem(kernel, smem);  // once per (kernel, device): launch.h
  const auto& m = *reinterpret_cast<const sm90::BwdSm90Maps*>(maps.bytes);
  const int head_group = p.deterministic && kD <= 128 ? ordered_head_group(p) : causal_head_group(p);
  // A programmatic dependent of the pre-pass: the launch and the CTAs' start overlap its end;
  // both kernels wait (pdl_wait_primary) before they read its output.
  if (ORCHARD_SM90_BWD_PDL)
    launch_pdl(kernel, dim3(static_cast<unsigned>(grid)), dim3(Cfg::kThreads), smem,
               static_cast<cudaStream_t>(p.stream), m, p, dsum, dq_accum, nb, head_group);
  else
    kernel<<<static_cast<unsigned>(grid), Cfg::kThreads, smem, static_cast<cudaStream_t>(p.stream)>>>(
        m, p, dsum, dq_accum, nb, head_group);
  check_launch(kD > 128 ? "flash_bwd_sm90_wide_kernel" : "flash_bwd_sm90_kernel");
}

}  // namespace orchard::cuda
