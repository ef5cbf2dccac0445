// FlashAttention backward on the CPU, race-free and deterministic without
// atomics or an sq x sk buffer. Per chunk of (batch, kv head) pairs:
//   stage: K^T, K, V^T of the pair and Q, dO, lse*log2(e), D = rowsum(dO*O)
//          of its group's q heads, converted to T once;
//   pass 1, parallel over (pair, column block): recompute P and dS tile by
//          tile over every q head of the group and every row block, and
//          accumulate dV += P_drop^T dO, dK += dS^T Q in registers/L1 —
//          GQA's sum over the group happens inside one task;
//   pass 2, parallel over (pair, q head, row block): recompute again and
//          accumulate dQ += dS K.
// That is 7 tile GEMMs instead of the minimal 5; the price of determinism
// without atomics (a dQ accumulator per column block would be sq x d x nblocks).
#include <cmath>
#include <limits>
#include <vector>

#include "backends/cpu/dropout_mask.h"
#include "backends/cpu/gemm.h"
#include "orchard/philox.h"
#include "backends/cpu/kernel_common.h"
#include "backends/cpu/kernels.h"
#include "backends/cpu/softmax_tile.h"
#include "backends/cpu/tile_load.h"

namespace orchard::cpu {
namespace {

// Staged inputs of one (batch, kv head) pair.
template <class T>
struct PairStage {
  T* kt;     // skp / kBlockN tiles of dp x kBlockN (tile_load.h)
  T* k;      // skp x dp
  T* vt;     // like kt
  T* q;      // (g * sq) x dp
  T* dout;   // (g * sq) x dp
  T* lse2;   // g * sq
  T* dsum;   // g * sq
};

template <class T>
struct BwdScratch {
  std::vector<T> s, dp_, acc0, acc1;
  std::vector<int> nv;
  std::vector<std::uint8_t> keep;
  BwdScratch(int dp)
      : s(std::size_t(kBlockM) * kBlockN), dp_(std::size_t(kBlockM) * kBlockN),
        acc0(std::size_t(std::max(kBlockM, kBlockN)) * dp),
        acc1(std::size_t(std::max(kBlockM, kBlockN)) * dp), nv(kBlockM),
        keep(std::size_t(kBlockM) * kBlockN) {}
};

struct Geometry {
  int d, dp, g;
  std::int64_t skp;
};

// Recomputes one (row block, column block) tile: on return w.s holds
// P_drop and w.dp_ holds dS (rows x kBlockN).
template <class T>
void recompute_tile(const BwdParams& p, const Geometry& geo, const PairStage<T>& st, int bi, int h,
                    int gi, std::int64_t i0, int rows, std::int64_t j0, BwdScratch<T>& w) {
  constexpr T kLog2e = T(1.4426950408889634073599246810018921);
  const T c = softmax_scale<T>(p) * kLog2e;
  const T* qb = st.q + (std::int64_t(gi) * p.sq + i0) * geo.dp;
  const T* dob = st.dout + (std::int64_t(gi) * p.sq + i0) * geo.dp;
  gemm(rows, kBlockN, geo.dp, qb, geo.dp, st.kt + j0 * geo.dp, kBlockN, w.s.data(), kBlockN, false);
  gemm(rows, kBlockN, geo.dp, dob, geo.dp, st.vt + j0 * geo.dp, kBlockN, w.dp_.data(), kBlockN, false);
  tile_valid_cols(w.nv.data(), rows, i0, j0, kBlockN, p.sk, p.causal, p.causal_offset);
  const std::uint8_t* keep = nullptr;
  T rp = T(1);
  if (p.dropout_p > 0.0f) {
    const std::uint32_t threshold = dropout_keep_threshold(p.dropout_p);
    const DropoutKey key = dropout_key(p);  // reads rng_state when set
    const auto batch_head = static_cast<std::uint32_t>(std::int64_t(bi) * p.hq + h);
    const int ncols = static_cast<int>(std::min<std::int64_t>(kBlockN, p.sk - j0));
    for (int r = 0; r < rows; ++r) {
      std::uint8_t* kr = w.keep.data() + std::int64_t(r) * kBlockN;
      dropout_keep_row(key.seed, key.offset, batch_head, static_cast<std::uint32_t>(i0 + r), j0, ncols,
                       threshold, kr);
      std::fill(kr + ncols, kr + kBlockN, std::uint8_t(0));
    }
    keep = w.keep.data();
    rp = T(1) / (T(1) - dropout_prob<T>(p));
  }
  const std::int64_t ro = std::int64_t(gi) * p.sq + i0;
  backward_tile(w.s.data(), w.dp_.data(), rows, kBlockN, w.nv.data(), c, st.lse2 + ro,
                st.dsum + ro, keep, rp);
}

// Pass 1: dK, dV of kv head `kh`, columns [j0, j0 + kBlockN).
template <class T>
void dkdv_block(const BwdParams& p, const Geometry& geo, const PairStage<T>& st, int bi, int kh,
                std::int64_t j0, BwdScratch<T>& w) {
  const int dp = geo.dp;
  T* dk = w.acc0.data();
  T* dv = w.acc1.data();
  std::fill(dk, dk + std::int64_t(kBlockN) * dp, T(0));
  std::fill(dv, dv + std::int64_t(kBlockN) * dp, T(0));
  // Rows i < j0 - causal_offset see none of these columns.
  const std::int64_t row_start =
      p.causal ? std::clamp<std::int64_t>(j0 - p.causal_offset, 0, p.sq) : 0;
  for (int gi = 0; gi < geo.g; ++gi) {
    const int h = kh * geo.g + gi;
    for (std::int64_t i0 = row_start; i0 < p.sq; i0 += kBlockM) {
      const int rows = static_cast<int>(std::min<std::int64_t>(kBlockM, p.sq - i0));
      recompute_tile(p, geo, st, bi, h, gi, i0, rows, j0, w);
      const std::int64_t ro = std::int64_t(gi) * p.sq + i0;
      // The tiles are rows x kBlockN; read them as their transposes.
      gemm_tn(kBlockN, dp, rows, w.s.data(), kBlockN, st.dout + ro * dp, dp, dv, dp, true);
      gemm_tn(kBlockN, dp, rows, w.dp_.data(), kBlockN, st.q + ro * dp, dp, dk, dp, true);
    }
  }
  const int ncols = static_cast<int>(std::min<std::int64_t>(kBlockN, p.sk - j0));
  const T scale = softmax_scale<T>(p);
  for (int c = 0; c < ncols; ++c) {
    const std::int64_t j = j0 + c;
    store_row(dk + std::int64_t(c) * dp, scale, geo.d, p.dtype, p.dk,
              bi * p.dk_batch_stride + j * p.dk_row_stride + kh * p.dk_head_stride);
    store_row(dv + std::int64_t(c) * dp, T(1), geo.d, p.dtype, p.dv,
              bi * p.dv_batch_stride + j * p.dv_row_stride + kh * p.dv_head_stride);
  }
}

// Pass 2: dQ of q head h = kh * g + gi, rows [i0, i0 + rows).
template <class T>
void dq_block(const BwdParams& p, const Geometry& geo, const PairStage<T>& st, int bi, int kh,
              int gi, std::int64_t i0, int rows, BwdScratch<T>& w) {
  const int dp = geo.dp;
  const int h = kh * geo.g + gi;
  T* dq = w.acc0.data();
  std::fill(dq, dq + std::int64_t(rows) * dp, T(0));
  const std::int64_t col_end = visible_col_end(i0, rows, p.sk, p.causal, p.causal_offset);
  for (std::int64_t j0 = 0; j0 < col_end; j0 += kBlockN) {
    recompute_tile(p, geo, st, bi, h, gi, i0, rows, j0, w);
    gemm(rows, dp, kBlockN, w.dp_.data(), kBlockN, st.k + j0 * dp, dp, dq, dp, true);
  }
  const T scale = softmax_scale<T>(p);
  for (int r = 0; r < rows; ++r)
    store_row(dq + std::int64_t(r) * dp, scale, geo.d, p.dtype, p.dq,
              bi * p.dq_batch_stride + (i0 + r) * p.dq_row_stride + h * p.dq_head_stride);
}

// Converts one q head's Q, dO, lse and computes D = rowsum(dO * O).
template <class T>
void stage_q_head(const BwdParams& p, const Geometry& geo, const PairStage<T>& st, int bi, int h,
                  int gi, std::vector<T>& orow) {
  constexpr T kLog2e = T(1.4426950408889634073599246810018921);
  const int d = geo.d, dp = geo.dp;
  using LseT = T;  // float32 lse for f16/bf16/f32, float64 for f64 (T matches)
  const LseT* lse = static_cast<const LseT*>(p.lse) + bi * p.lse_batch_stride + h * p.lse_head_stride;
  for (std::int64_t i = 0; i < p.sq; ++i) {
    const std::int64_t ro = std::int64_t(gi) * p.sq + i;
    load_row(p.q, p.dtype, bi * p.q_batch_stride + i * p.q_row_stride + h * p.q_head_stride, d, dp,
             st.q + ro * dp);
    T* dor = st.dout + ro * dp;
    load_row(p.dout, p.dtype, bi * p.do_batch_stride + i * p.do_row_stride + h * p.do_head_stride,
             d, dp, dor);
    load_row(p.out, p.dtype, bi * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride, d,
             dp, orow.data());
    T sum = 0;
    for (int c = 0; c < d; ++c) sum += dor[c] * orow[c];
    st.dsum[ro] = sum;
    st.lse2[ro] = lse[i] * kLog2e;  // -inf stays -inf: the row contributes nothing
  }
}

template <class T>
void backward_impl(const BwdParams& p) {
  if (p.b == 0 || p.hq == 0) return;
  Geometry geo;
  geo.d = p.d;
  geo.dp = static_cast<int>(round_up(p.d, kGemmNMultiple));
  geo.g = p.hq / p.hkv;
  geo.skp = round_up(p.sk, kBlockN);
  const int dp = geo.dp, g = geo.g;
  const std::int64_t skp = geo.skp;
  const std::int64_t npairs = std::int64_t(p.b) * p.hkv;
  const std::int64_t ncb = (p.sk + kBlockN - 1) / kBlockN;
  const std::int64_t nrb = (p.sq + kBlockM - 1) / kBlockM;
  const std::size_t pair_elems =
      std::size_t(3 * skp * dp + 2 * std::int64_t(g) * p.sq * dp + 2 * std::int64_t(g) * p.sq);
  const std::int64_t chunk = std::clamp<std::int64_t>(
      g_stage_budget_bytes / std::max<std::size_t>(1, pair_elems * sizeof(T)), 1, npairs);
  std::vector<T> stage(std::size_t(chunk) * pair_elems);
  auto pair_stage = [&](std::int64_t local) {
    T* base = stage.data() + std::size_t(local) * pair_elems;
    PairStage<T> s;
    s.kt = base;
    s.k = s.kt + skp * dp;
    s.vt = s.k + skp * dp;
    s.q = s.vt + skp * dp;
    s.dout = s.q + std::int64_t(g) * p.sq * dp;
    s.lse2 = s.dout + std::int64_t(g) * p.sq * dp;
    s.dsum = s.lse2 + std::int64_t(g) * p.sq;
    return s;
  };

  for (std::int64_t pair0 = 0; pair0 < npairs; pair0 += chunk) {
    const std::int64_t np = std::min(chunk, npairs - pair0);
    // Stage: per pair, 3 K/V jobs + one job per q head of the group.
    const std::int64_t jobs_per_pair = 3 + g;
    ORCHARD_OMP("omp parallel")
    {
      std::vector<T> orow(dp);
      ORCHARD_OMP("omp for schedule(dynamic, 1)")
      for (std::int64_t t = 0; t < np * jobs_per_pair; ++t) {
        const std::int64_t local = t / jobs_per_pair;
        const int job = static_cast<int>(t % jobs_per_pair);
        const std::int64_t pair = pair0 + local;
        const int bi = static_cast<int>(pair / p.hkv), kh = static_cast<int>(pair % p.hkv);
        const PairStage<T> st = pair_stage(local);
        const std::int64_t koff = bi * p.k_batch_stride + kh * p.k_head_stride;
        const std::int64_t voff = bi * p.v_batch_stride + kh * p.v_head_stride;
        const int skpi = static_cast<int>(skp);
        if (job == 0)
          load_rows_transposed(p.k, p.dtype, koff, p.k_row_stride, p.sk, skpi, p.d, dp, kBlockN, st.kt);
        else if (job == 1)
          load_rows(p.k, p.dtype, koff, p.k_row_stride, p.sk, skpi, p.d, dp, st.k);
        else if (job == 2)
          load_rows_transposed(p.v, p.dtype, voff, p.v_row_stride, p.sk, skpi, p.d, dp, kBlockN, st.vt);
        else
          stage_q_head(p, geo, st, bi, kh * g + (job - 3), job - 3, orow);
      }
    }
    const std::int64_t ntasks1 = np * ncb;
    const std::int64_t ntasks2 = np * g * nrb;
    ORCHARD_OMP("omp parallel")
    {
      BwdScratch<T> w(dp);
      ORCHARD_OMP("omp for schedule(dynamic, 1) nowait")
      for (std::int64_t t = 0; t < ntasks1; ++t) {
        const std::int64_t local = t / ncb;
        const std::int64_t pair = pair0 + local;
        dkdv_block(p, geo, pair_stage(local), static_cast<int>(pair / p.hkv),
                   static_cast<int>(pair % p.hkv), (t % ncb) * kBlockN, w);
      }
      // nowait: pass 2 reads only the stage, never pass 1's outputs.
      ORCHARD_OMP("omp for schedule(dynamic, 1)")
      for (std::int64_t t = 0; t < ntasks2; ++t) {
        const std::int64_t local = t / (g * nrb);
        const int gi = static_cast<int>((t / nrb) % g);
        const std::int64_t i0 = (t % nrb) * kBlockM;
        const std::int64_t pair = pair0 + local;
        const int rows = static_cast<int>(std::min<std::int64_t>(kBlockM, p.sq - i0));
        dq_block(p, geo, pair_stage(local), static_cast<int>(pair / p.hkv),
                 static_cast<int>(pair % p.hkv), gi, i0, rows, w);
      }
    }
  }
}

}  // namespace

void backward(const BwdParams& p) {
  if (p.dtype == DType::kFloat64)
    backward_impl<double>(p);
  else
    backward_impl<float>(p);
}

}  // namespace orchard::cpu
