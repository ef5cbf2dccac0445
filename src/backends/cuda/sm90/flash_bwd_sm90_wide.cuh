// FlashAttention backward main kernel for sm_90a at head-dim buckets 192 and 256 (d in
// 129..256).  Compile ONLY with -gencode=arch=compute_90a,code=sm_90a.
//
// Why a second kernel: flash_bwd_sm90.cuh gives each consumer warpgroup 64 keys with dK and dV
// of all d columns in its registers: d fp32 accumulators per thread (d128: 128 of the 240), so
// d192 / d256 cannot run that way.  Here the CTA's two consumer WGs share one 64-key tile and
// split the work instead of the keys:
//   S^T  = K Q^T, dP^T = V dO^T   each WG 32 of the step's 64 queries (wgmma m64n32, ss)
//   P^T = exp2(S^T scale log2e - LSE), dS^T = P^T (dP^T - D)  -> both to smem (16-bit,
//                                 128B-swizzled rows of 64 queries; a 256-thread barrier joins
//                                 the two halves)
//   WG0: dV += P^T dO             (ss: A = P^T K-major, B = dO MN-major; N = d, 64 keys)
//   WG1: dK += dS^T Q             (ss: A = dS^T K-major, B = Q MN-major)
//   dQ_partial = dS K             WG0 the first ceil(d/128) 64-column chunks, WG1 the rest
//                                 (ss: A = dS MN-major from the dS^T buffer, B = K MN-major)
//                                 -> dq_accum by 16-byte atomicAdds (launch.h's tile layout)
// So each thread holds d/2 accumulators (d256: 128) plus a dQ chunk (64), as the d128 kernel.
// dV (WG0) and dK (times the scale, WG1) are stored from registers at the end (rows < sk).
// The producer (warp 8) is the d128 kernel's (bwd_sm90_produce): K / V once, Q / dO per step
// into a 2-stage ring, LSE / D per step.
//
// Shared memory at d256: K + V 64 KB, Q + dO 2 x 64 KB, P^T / dS^T 2 x 16 KB (double-buffered:
// one WG may start the next step while the other's GEMMs still read this one), LSE / D 1 KB =
// 226 KB of the 227 KB a CTA may have; so dQ is added by atomics here (the d128 kernel's bulk
// adds stage 64 KB more).  d192's dQ split is 128 + 64 columns (a 64-wide MN-major operand
// cannot start mid-chunk), so WG0 does one chunk more of the step's 15 (d/64 x 5) GEMM units.
//
// Supported: T = bf16 / fp16, kD in {192, 256} with any run-time d == d_v, 128 < d <= kD,
// d % 8 == 0 (TMA zero-fills the columns past d), scale > 0, causal (both alignments) or not,
// GQA / MQA, TMA-able strides; sliding windows, softcap and ALiBi in the kFeatures kernels (a
// template flag for the d128 kernel's reason, flash_bwd_sm90.cuh: the plain kernels keep their
// code).  As there: the window narrows each CTA's query tiles (bwd_window_tile_range, which the
// producer walks too), a step's S^T goes through apply_score_mods (softcap, ALiBi, the window /
// causal / key-end mask) before P^T, and softcap's dS^T = P^T (1 - tanh^2) (dP^T - D) takes tanh
// from the fp32 P^T (softcap_dtanh); P^T (1 - tanh^2) replaces the packed P^T in registers once
// P^T is in smem (dV reads it there), so no register is added.  Not here (the dispatch,
// sm90_bwd_applies, sends it to the sm80 kernels): the deterministic mode.
// Dropout in the kFeatures kernels (ORCHARD_SM90_DROPOUT): each step's draws made before its
// GEMMs (cuda/dropout_fragment.h, rows = keys; Z as drop bits: the packed form of
// flash_bwd_sm90.cuh measured 0.92-0.99x here, session 65),
// dS^T = P^T (Z dP^T / (1 - p) - D), the P^T tile dV reads with its dropped elements zeroed, dV
// times 1 / (1 - p) in the epilogue.
#pragma once
#include "backends/cuda/sm90/flash_bwd_sm90.cuh"

namespace orchard::sm90 {

template <int kD>
struct BwdSm90WideConfig {
  static_assert(kD == 192 || kD == 256, "sm90 wide backward: d in {192, 256}");
  static constexpr int kBN = 64;  // keys per CTA (shared by both consumer WGs)
  static constexpr int kBM = 64;  // query rows per step
  static constexpr int kChunks = kD / 64;
  static constexpr int kChunkCols = 64;  // 128-byte swizzle rows (the TMA maps' box width)
  static constexpr int kStages = 2;
  static constexpr int kDqChunks0 = (kChunks + 1) / 2;  // dQ column chunks of WG0 (WG1: the rest)
  static constexpr int kKVBytes = kBN * kD * 2, kKVChunkBytes = kBN * 128;
  static constexpr int kQBytes = kBM * kD * 2, kQChunkBytes = kBM * 128;
  static constexpr int kPBytes = kBN * kBM * 2;  // P^T or dS^T: 64 key rows x 64 queries (128 B)
  static constexpr int kOffV = kKVBytes;
  static constexpr int kOffQ = 2 * kKVBytes;
  static constexpr int kOffDo = kOffQ + kStages * kQBytes;
  static constexpr int kOffP = kOffDo + kStages * kQBytes;   // [2] buffers
  static constexpr int kOffDs = kOffP + 2 * kPBytes;         // [2] buffers
  static constexpr int kOffLse = kOffDs + 2 * kPBytes;       // float [kStages][kBM]
  static constexpr int kOffD = kOffLse + kStages * kBM * 4;  // float [kStages][kBM]
  static constexpr int kOffBars = kOffD + kStages * kBM * 4;
  static constexpr int kSmemBytes = kOffBars + 64 + 1024;  // + 1024: align the base up
  static_assert(kSmemBytes <= 232448, "sm_90 allows 227 KB of shared memory per CTA");
  static constexpr int kThreads = 384;  // producer WG + 2 consumer WGs
};

// acc (64 keys x 32 queries) = A (K or V, K-major over d in 64-column chunks) B^T (this WG's
// 32 rows of the stage-s Q or dO tile, the same layout): S^T or dP^T; issued, not waited for.
template <typename T, int kD>
__device__ __forceinline__ void bwd_wide_tile_gemm(float (&acc)[16], uint64_t a, uint64_t b, int s) {
  using Cfg = BwdSm90WideConfig<kD>;
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) {
    const uint32_t off = (kk / 4) * Cfg::kKVChunkBytes + (kk % 4) * 32;
    const uint32_t offq = s * Cfg::kQBytes + (kk / 4) * Cfg::kQChunkBytes + (kk % 4) * 32;
    Wgmma<32, T>::template ss<0, 0>(acc, desc_advance(a, off), desc_advance(b, offq), kk > 0);
  }
}

// dQ_partial (64 queries x 64 kN columns starting at chunk c0) = dS K over the tile's 64 keys,
// added to dq_accum by this warp's 16 rows.  dS_a: dS MN-major (the dS^T buffer of the step);
// dKt_b: K MN-major.
template <typename T, int kN>
__device__ __forceinline__ void bwd_wide_dq(uint64_t dS_a, uint64_t dKt_b, int c0, int chunk_bytes, float* slab,
                                            int row16, int d_cols, int lane) {
  float dq[kN / 2];
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
    Wgmma<kN, T>::template ss<1, 1>(dq, desc_advance(dS_a, kk * 2048), desc_advance(dKt_b, c0 * chunk_bytes + kk * 2048),
                                    kk > 0);
  wgmma_commit();
  wgmma_wait<0>();
  fence_operands(dq);
  if (row16 >= 0) {
#pragma unroll
    for (int j = 0; j < kN / 8; ++j) {
      const int col = 64 * c0 + 8 * j;
      if (col >= d_cols) break;  // d below the bucket: the zero padding's columns
      float* dst = slab + cuda::dq_accum_tile_offset(row16, col, d_cols, lane);
      atomicAdd(reinterpret_cast<float4*>(dst), make_float4(dq[4 * j], dq[4 * j + 1], dq[4 * j + 2], dq[4 * j + 3]));
    }
  }
}

// kBias (with kFeatures): attn_bias read in the feature pass, as the d128 kernel's flag.
template <typename T, int kD, bool kCausal, bool kFeatures, bool kBias = false>
__global__ void __launch_bounds__(384, 1)
    flash_bwd_sm90_wide_kernel(const __grid_constant__ BwdSm90Maps maps, const BwdParams p, const float* dsum,
                               float* dq_accum, int num_n_blocks, int head_group) {
  using Cfg = BwdSm90WideConfig<kD>;
  constexpr int kBM = Cfg::kBM, kBN = Cfg::kBN;
  cuda::pdl_wait_primary();  // D and the cleared dq_accum: the pre-pass's (as the d128 kernel)
  // setmaxnreg: 128 x 24 + 256 x 240 = 64512 = 384 x 168, the launch allocation (as the d128
  // kernel: a larger sum never completes).
  constexpr uint32_t kProducerRegs = 24, kConsumerRegs = 240;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t sbase = (smem_u32(smem_raw) + 1023u) & ~1023u;
  uint8_t* const gbase = smem_raw + (sbase - smem_u32(smem_raw));
  const uint32_t sK = sbase, sV = sbase + Cfg::kOffV;
  const uint32_t sQ = sbase + Cfg::kOffQ, sDo = sbase + Cfg::kOffDo;
  const uint32_t sP = sbase + Cfg::kOffP, sDs = sbase + Cfg::kOffDs;
  float* const lse_s = reinterpret_cast<float*>(gbase + Cfg::kOffLse);
  float* const d_s = reinterpret_cast<float*>(gbase + Cfg::kOffD);
  const uint32_t bars = sbase + Cfg::kOffBars;
  const BwdSm90Barriers<Cfg::kStages> bar{bars};
  const uint32_t kv_full = bar.kv_full();

  const BwdCta cta = bwd_sm90_cta<kCausal>(p, num_n_blocks, head_group, blockIdx.x);
  const int b = cta.b, hk = cta.hk;
  const int group = p.hq / p.hkv;
  const int n0 = cta.n_block * kBN;
  const int sq = p.sq, sk = p.sk;
  const int64_t coff = p.causal_offset;
  const bool has_window = kFeatures && cuda::window_active(kCausal, p.window_left, p.window_right);
  BwdTileRange tr =
      has_window
          ? bwd_window_tile_range(n0, kBN, sq, cuda::window_offsets(kCausal, p.window_left, p.window_right, coff), kBM)
          : bwd_tile_range(n0, sq, coff, kCausal, kBM);
  // A key tile a boolean mask hides from every row: no step (dK, dV 0), as the d128 kernel.
  if constexpr (kBias) {
    if (tr.n_m > 0 && bias_hides_key_tile(p, b, hk, group, n0, kBN, threadIdx.x % 32)) tr.n_m = 0;
  }
  const int n_iters = tr.n_m * group;

  const int warp = warp_idx_uniform();
  const int lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    mbarrier_init(kv_full, 1);
    for (int s = 0; s < Cfg::kStages; ++s) {
      mbarrier_init(bar.full(s), 32);
      mbarrier_init(bar.empty(s), 8);
    }
    mbarrier_init_fence();
  }
  __syncthreads();

  if (warp >= 8) {
    setmaxnreg_dec<kProducerRegs>();
    if (warp == 8 && n_iters > 0)
      bwd_sm90_produce<Cfg>(maps, p, dsum, sbase, b, hk, group, n0, tr, lane);
    return;
  }

  // ---------------- consumers ----------------
  setmaxnreg_inc<kConsumerRegs>();
  const int wg = warp / 4;  // 0: dV, 1: dK; S^T / dP^T for queries 32 wg .. 32 wg + 31
  const int wi = warp % 4;
  const int g = lane / 4, t = lane % 4;
  const int key_l0 = 16 * wi + g;  // this thread's first key row in the tile (second: + 8)
  const int q_l0 = 32 * wg;        // this WG's first query of the step's S^T / dP^T
  const int d_cols = p.d;
  const float scale_log2 = p.scale * 1.4426950408889634f;

  float acc[kD / 2];  // dV (WG0) or dK (WG1): 64 keys x kD
#pragma unroll
  for (int i = 0; i < kD / 2; ++i) acc[i] = 0.f;

  const uint64_t dK_a = make_desc_kmajor_sw128(sK), dV_a = make_desc_kmajor_sw128(sV);
  const uint64_t dQ_b = make_desc_kmajor_sw128(sQ + q_l0 * 128), dDo_b = make_desc_kmajor_sw128(sDo + q_l0 * 128);
  // dV += P^T dO (WG0), dK += dS^T Q (WG1): A K-major from the P^T / dS^T buffer, B MN-major.
  const uint64_t acc_a = make_desc_kmajor_sw128(wg == 0 ? sP : sDs);
  const uint64_t acc_b = make_desc_mnmajor_sw128(wg == 0 ? sDo : sQ, Cfg::kQChunkBytes);
  const uint64_t dS_a = make_desc_mnmajor_sw128(sDs, Cfg::kPBytes);
  const uint64_t dKt_b = make_desc_mnmajor_sw128(sK, Cfg::kKVChunkBytes);

  // Causal diagonal of key tile n0 in 32-bit tile coordinates (as the d128 kernel).
  const int64_t diag64 = coff - n0;
  const int diag0 = diag64 > (1 << 30) ? (1 << 30) : (diag64 < -(1 << 30) ? -(1 << 30) : static_cast<int>(diag64));
  const int keys_left = sk - n0;
  // Re-read from the parameters where tested (uniform registers), as the d128 kernel.
  auto has_feat = [&] {
    return kFeatures && (cuda::window_active(kCausal, p.window_left, p.window_right) || p.softcap > 0.f ||
                         p.alibi_slopes != nullptr || kBias);
  };
  if (n_iters > 0) {
    mbarrier_wait(kv_full, 0);
    int h = hk * group, m0 = tr.m_begin * kBM;
    const int m_end0 = (tr.m_begin + tr.n_m) * kBM;
    for (int it = 0; it < n_iters; ++it) {
      const int s = it % Cfg::kStages;
      const uint32_t ph = (it / Cfg::kStages) & 1;
      const int buf = it % 2;
      const float* lse_t = lse_s + s * kBM;
      const float* d_t = d_s + s * kBM;
      // This thread's P^T / dS^T pairs: key rows key_l0 (+ 8 r), queries q_l0 + 8 j + 2 t (+ 1) =
      // 16-byte chunk 4 wg + j of the 128-byte row, stored at chunk ^ (row % 8) = ^ g.
      const uint32_t row_off = buf * Cfg::kPBytes + key_l0 * 128 + (g << 4) + 4 * t;
      auto slot = [&](int j, int r) { return (row_off + r * 1024) ^ (static_cast<uint32_t>(4 * wg + j) << 4); };
      float st[16], dpt[16];
      // Dropout (the kFeatures kernels, as the d128 kernel): this step's draws, made before its GEMMs
      // are issued (only the dV / dK accumulators live).
      const bool dropping = kFeatures && p.dropout_p > 0.f;
      uint32_t dropped = 0;
      if (dropping) dropped = step_dropped_bits_keys<4>(p, b, h, m0 + q_l0 + 2 * t, n0 + key_l0, g);
      mbarrier_wait(bar.full(s), ph);
      wgmma_fence();
      bwd_wide_tile_gemm<T, kD>(st, dK_a, dQ_b, s);
      wgmma_commit();
      bwd_wide_tile_gemm<T, kD>(dpt, dV_a, dDo_b, s);
      wgmma_commit();
      wgmma_wait<1>();  // S^T done (dP^T may still run)
      fence_operands(st);
      // Element i: key key_l0 + 8 ((i / 2) % 2), query q_l0 + 8 (i / 4) + 2 t + (i % 2), so
      // key - query = rel0() + d_rel(i).
      auto rel0 = [&] { return n0 + key_l0 - m0 - q_l0 - 2 * t; };
      auto d_rel = [](int i) { return 8 * ((i / 2) % 2) - 8 * (i / 4) - (i % 2); };
      if (has_feat()) {  // softcap, ALiBi, then the window / causal / key-end mask (-inf: P = 0)
        const cuda::WindowOffsets w = cuda::window_offsets(kCausal, p.window_left, p.window_right, coff);
        auto each = [&](auto&& f) {
#pragma unroll
          for (int i = 0; i < 16; ++i) f(st[i], d_rel(i), 8 * ((i / 2) % 2));
        };
        cuda::apply_score_mods(each, p.scale, p.softcap,
                               cuda::alibi_slope_ptr(p.alibi_slopes, p.alibi_batch_stride, b, h), coff, w,
                               cuda::tile_needs_mask_window(n0, kBN, m0 + q_l0, 32, sk, w), rel0(), keys_left - key_l0);
        if constexpr (kBias) {
          add_attn_bias_keys(bias_row(p, b, h), st, n0 + key_l0);
        }
      }
      const int diag = m0 + diag0;
      const bool need_mask = keys_left < kBN || (kCausal && kBN - 1 > diag);
      uint32_t pw[8];  // P^T as 16-bit pairs (dV reads them from smem; dS^T = pw (dP^T - D))
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        const int ql = q_l0 + 8 * (i / 4) + 2 * t + (i % 2);
        float pv = bwd_ex2(fmaf(st[i], scale_log2, -lse_t[ql]));
        if (need_mask) {
          const int kl = key_l0 + 8 * ((i / 2) % 2);
          if (kl >= keys_left || (kCausal && kl - ql > diag)) pv = 0.f;
        }
        st[i] = pv;
      }
#pragma unroll
      for (int i = 0; i < 16; i += 2) {
        pw[i / 2] = pack_pair<T>(st[i], st[i + 1]);
        // dV reads (P^T Z)^T: the dropped elements zeroed (no dropout: Z = 1)
        const uint32_t kept = kFeatures ? zero_dropped_pair(pw[i / 2], dropped, i) : pw[i / 2];
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(sP + slot(i / 4, (i / 2) % 2)), "r"(kept) : "memory");
      }
      if (kFeatures && p.softcap > 0.f) {  // pw := P^T (1 - tanh^2), the factor of dS^T
        const float slope = cuda::alibi_slope(p.alibi_slopes, p.alibi_batch_stride, b, h);
        const float inv_cap = 1.f / p.softcap;
        const int diag32 = cuda::clamp_i32(coff);
#pragma unroll
        for (int i = 0; i < 16; i += 2) {
          float f[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int ql = q_l0 + 8 * (i / 4) + 2 * t + e;
            const float alibi = cuda::alibi_term(slope, diag32, rel0() + d_rel(i + e));
            f[e] = st[i + e] * cuda::softcap_dtanh(st[i + e], lse_t[ql], alibi, inv_cap);
          }
          pw[i / 2] = pack_pair<T>(f[0], f[1]);
        }
      }
      wgmma_wait<0>();
      fence_operands(dpt);
      // dS^T = P^T (Z dP^T / (1 - p) - D) (no dropout: Z = 1, p = 0).
      const float rdrop = kFeatures ? dropout_rescale(p) : 1.f;
#pragma unroll
      for (int i = 0; i < 16; i += 2) {
        float ds[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int ql = q_l0 + 8 * (i / 4) + 2 * t + e;
          const float dp = kFeatures && ((dropped >> (i + e)) & 1u) ? 0.f : dpt[i + e] * rdrop;
          ds[e] = unpack_lo_hi<T>(pw[i / 2], e) * (dp - d_t[ql]);
        }
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(sDs + slot(i / 4, (i / 2) % 2)), "r"(pack_pair<T>(ds[0], ds[1]))
                     : "memory");
      }
      fence_proxy_async_smem();
      named_barrier_sync(1, 256);  // both WGs' halves of P^T and dS^T are written
      // dV += P^T dO (WG0) / dK += dS^T Q (WG1): k = the step's 64 queries (4 k16 slices).
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBM / 16; ++kk)
        Wgmma<kD, T>::template ss<0, 1>(acc, desc_advance(acc_a, buf * Cfg::kPBytes + kk * 32),
                                        desc_advance(acc_b, s * Cfg::kQBytes + kk * 2048), 1);
      wgmma_commit();
      // dQ partial of this WG's column chunks (its wgmma_wait also retires the dV / dK GEMM).
      const int row16 = m0 + 16 * wi < sq ? m0 + 16 * wi : -1;
      const cuda::DqAccumSlabs slabs =
          p.dq_accum != nullptr
              ? cuda::DqAccumSlabs{p.dq_accum + b * p.dq_accum_batch_stride, p.dq_accum_head_stride}
              : cuda::DqAccumSlabs{dq_accum + static_cast<int64_t>(b) * p.hq * cuda::dq_accum_rows(sq) *
                                                   cuda::dq_accum_cols(d_cols),
                                   static_cast<int64_t>(cuda::dq_accum_rows(sq)) * cuda::dq_accum_cols(d_cols)};
      float* slab = slabs.base + h * slabs.head_stride;
      const uint64_t ds_step = desc_advance(dS_a, buf * Cfg::kPBytes);
      if (wg == 0)
        bwd_wide_dq<T, 64 * Cfg::kDqChunks0>(ds_step, dKt_b, 0, Cfg::kKVChunkBytes, slab, row16, d_cols, lane);
      else
        bwd_wide_dq<T, 64 * (Cfg::kChunks - Cfg::kDqChunks0)>(ds_step, dKt_b, Cfg::kDqChunks0, Cfg::kKVChunkBytes, slab,
                                                              row16, d_cols, lane);
      fence_operands(acc);
      __syncwarp();
      if (lane == 0) mbarrier_arrive(bar.empty(s));  // this warp is done with Q / dO of stage s
      m0 += kBM;
      if (m0 == m_end0) {
        m0 = tr.m_begin * kBM;
        ++h;
      }
    }
  }

  // Epilogue: dV (WG0) or dK times the scale (WG1), rows < sk, as 16-bit values
  // (fragment_store.cuh).
  T* out = wg == 0 ? static_cast<T*>(p.dv) + b * p.dv_batch_stride + hk * p.dv_head_stride
                   : static_cast<T*>(p.dk) + b * p.dk_batch_stride + hk * p.dk_head_stride;
  const int64_t row_stride = wg == 0 ? p.dv_row_stride : p.dk_row_stride;
  const float mul = wg == 0 ? (kFeatures ? dropout_rescale(p) : 1.f) : p.scale;
  const bool store16 = ORCHARD_SM90_BWD_STORE16 && rows_allow_store16(out, row_stride);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = n0 + key_l0 + 8 * r;
    store_fragment_row<T, kD>(acc, r, mul, out + static_cast<int64_t>(key) * row_stride, key < sk, d_cols, t,
                              store16);
  }
}

}  // namespace orchard::sm90
