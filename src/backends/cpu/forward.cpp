// FlashAttention forward on the CPU: for each (batch, q head, block of
// kBlockM query rows) stream over kBlockN-column tiles of K/V with the online
// softmax (running max m, running sum l, rescaled output accumulator), so
// memory is O(rows x d) per task and nothing is sq x sk.
//
// K and V of a (batch, kv head) are converted to T once per chunk: K
// transposed in (d x kBlockN) tiles so S = Q K^T is a plain row-major GEMM whose inner loop
// runs along columns, V row-major for O += P V. Both are zero-padded (d to a
// multiple of 16, sk to a multiple of kBlockN) so the GEMMs need no edge code.
// T = float for f16/bf16/f32, double for f64.
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

template <class T>
struct FwdScratch {
  std::vector<T> q, o, s, m, l;
  std::vector<int> nv;
  std::vector<std::uint8_t> keep;
  FwdScratch(int dp)
      : q(std::size_t(kBlockM) * dp), o(std::size_t(kBlockM) * dp),
        s(std::size_t(kBlockM) * kBlockN), m(kBlockM), l(kBlockM), nv(kBlockM), keep(kBlockN) {}
};

template <class T>
void forward_block(const FwdParams& p, int dp, const T* kt, const T* v, int bi,
                   int h, std::int64_t i0, int rows, FwdScratch<T>& w) {
  constexpr T kLog2e = T(1.4426950408889634073599246810018921);
  constexpr T kLn2 = T(0.6931471805599453094172321214581766);
  const T ninf = -std::numeric_limits<T>::infinity();
  const int d = p.d;
  const T c = softmax_scale<T>(p) * kLog2e;
  const bool dropout = p.dropout_p > 0.0f;
  const std::uint32_t threshold = dropout_keep_threshold(p.dropout_p);
  const DropoutKey key = dropout_key(p);  // reads rng_state when set
  const T rp = dropout ? T(1) / (T(1) - dropout_prob<T>(p)) : T(1);
  const auto batch_head = static_cast<std::uint32_t>(std::int64_t(bi) * p.hq + h);

  load_rows(p.q, p.dtype, bi * p.q_batch_stride + i0 * p.q_row_stride + h * p.q_head_stride,
            p.q_row_stride, rows, rows, d, dp, w.q.data());
  std::fill(w.o.begin(), w.o.begin() + std::int64_t(rows) * dp, T(0));
  std::fill(w.m.begin(), w.m.end(), ninf);
  std::fill(w.l.begin(), w.l.end(), T(0));

  const std::int64_t col_end = visible_col_end(i0, rows, p.sk, p.causal, p.causal_offset);
  std::int64_t mask_written = 0;  // dropout-mask columns written so far
  for (std::int64_t j0 = 0; j0 < col_end; j0 += kBlockN) {
    gemm(rows, kBlockN, dp, w.q.data(), dp, kt + j0 * dp, kBlockN, w.s.data(), kBlockN, false);
    tile_valid_cols(w.nv.data(), rows, i0, j0, kBlockN, p.sk, p.causal, p.causal_offset);
    softmax_tile_update(w.s.data(), rows, kBlockN, w.nv.data(), c, w.m.data(), w.l.data(),
                        w.o.data(), dp, dp);
    if (dropout) {
      const int ncols = static_cast<int>(std::min<std::int64_t>(kBlockN, p.sk - j0));
      for (int r = 0; r < rows; ++r) {
        const std::int64_t i = i0 + r;
        dropout_keep_row(key.seed, key.offset, batch_head, static_cast<std::uint32_t>(i), j0, ncols,
                         threshold, w.keep.data());
        if (p.dropout_mask)
          std::copy_n(w.keep.data(), ncols,
                      p.dropout_mask + (std::int64_t(batch_head) * p.sq + i) * p.sk + j0);
        apply_dropout(w.s.data() + std::int64_t(r) * kBlockN, w.keep.data(), ncols, rp);
      }
      mask_written = j0 + ncols;
    }
    gemm(rows, dp, kBlockN, w.s.data(), kBlockN, v + j0 * dp, dp, w.o.data(), dp, true);
  }
  // The mask is returned for every element, causally hidden ones included.
  if (dropout && p.dropout_mask && mask_written < p.sk) {
    for (int r = 0; r < rows; ++r) {
      const std::int64_t i = i0 + r;
      for (std::int64_t j0 = mask_written; j0 < p.sk; j0 += kBlockN) {
        const int ncols = static_cast<int>(std::min<std::int64_t>(kBlockN, p.sk - j0));
        dropout_keep_row(key.seed, key.offset, batch_head, static_cast<std::uint32_t>(i), j0, ncols,
                         threshold, p.dropout_mask + (std::int64_t(batch_head) * p.sq + i) * p.sk + j0);
      }
    }
  }

  T* lse = static_cast<T*>(p.lse) + bi * p.lse_batch_stride + h * p.lse_head_stride + i0;
  for (int r = 0; r < rows; ++r) {
    const T l = w.l[r];
    const std::int64_t off = bi * p.o_batch_stride + (i0 + r) * p.o_row_stride + h * p.o_head_stride;
    // Only an exact 0 sum means "no visible key"; a NaN sum (NaN/inf in q or
    // k) must propagate to out and lse, never be silently zeroed.
    if (l != T(0)) {
      store_row(w.o.data() + std::int64_t(r) * dp, T(1) / l, d, p.dtype, p.out, off);
      lse[r] = (w.m[r] + std::log2(l)) * kLn2;
    } else {  // fully masked row (or sk == 0): zeros, -inf, never NaN
      std::fill(w.o.begin() + std::int64_t(r) * dp, w.o.begin() + std::int64_t(r + 1) * dp, T(0));
      store_row(w.o.data() + std::int64_t(r) * dp, T(1), d, p.dtype, p.out, off);
      lse[r] = ninf;
    }
  }
}

template <class T>
void forward_impl(const FwdParams& p) {
  if (p.b == 0 || p.hq == 0 || p.sq == 0) return;
  const int d = p.d;
  const int dp = static_cast<int>(round_up(d, kGemmNMultiple));
  const std::int64_t skp = round_up(p.sk, kBlockN);
  const int g = p.hq / p.hkv;
  const std::int64_t npairs = std::int64_t(p.b) * p.hkv;
  const std::int64_t nrb = (p.sq + kBlockM - 1) / kBlockM;
  const std::size_t pair_bytes = std::max<std::size_t>(1, 2 * skp * dp * sizeof(T));
  const std::int64_t chunk =
      std::clamp<std::int64_t>(g_stage_budget_bytes / pair_bytes, 1, npairs);
  std::vector<T> kt(std::size_t(chunk) * dp * skp), v(std::size_t(chunk) * skp * dp);

  for (std::int64_t pair0 = 0; pair0 < npairs; pair0 += chunk) {
    const std::int64_t np = std::min(chunk, npairs - pair0);
    ORCHARD_OMP("omp parallel for schedule(dynamic, 1)")
    for (std::int64_t t = 0; t < 2 * np; ++t) {
      const std::int64_t pair = pair0 + t / 2;
      const std::int64_t bi = pair / p.hkv, kh = pair % p.hkv;
      T* kt_p = kt.data() + (t / 2) * dp * skp;
      T* v_p = v.data() + (t / 2) * skp * dp;
      if (t % 2 == 0)
        load_rows_transposed(p.k, p.dtype, bi * p.k_batch_stride + kh * p.k_head_stride,
                             p.k_row_stride, p.sk, static_cast<int>(skp), d, dp, kBlockN, kt_p);
      else
        load_rows(p.v, p.dtype, bi * p.v_batch_stride + kh * p.v_head_stride, p.v_row_stride,
                  p.sk, static_cast<int>(skp), d, dp, v_p);
    }
    const std::int64_t ntasks = np * g * nrb;
    ORCHARD_OMP("omp parallel")
    {
      FwdScratch<T> w(dp);
      ORCHARD_OMP("omp for schedule(dynamic, 1)")
      for (std::int64_t t = 0; t < ntasks; ++t) {
        const std::int64_t local_pair = t / (g * nrb);
        const int gi = static_cast<int>((t / nrb) % g);
        const std::int64_t rb = t % nrb;
        const std::int64_t pair = pair0 + local_pair;
        const int bi = static_cast<int>(pair / p.hkv), kh = static_cast<int>(pair % p.hkv);
        const std::int64_t i0 = rb * kBlockM;
        const int rows = static_cast<int>(std::min<std::int64_t>(kBlockM, p.sq - i0));
        forward_block<T>(p, dp, kt.data() + local_pair * dp * skp,
                         v.data() + local_pair * skp * dp, bi, kh * g + gi, i0, rows, w);
      }
    }
  }
}

}  // namespace

void forward(const FwdParams& p) {
  if (p.dtype == DType::kFloat64)
    forward_impl<double>(p);
  else
    forward_impl<float>(p);
}

}  // namespace orchard::cpu
