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
//
// Features, all decided per block or tile so the plain path keeps its inner
// loops: causal / window bounds pick the column tiles a row block visits and
// each row's visible columns (visibility.h); softcap, ALiBi, attn_bias and a
// window's left edge rewrite a tile's scores first (score_mods.h); a sink
// seeds each row's running max and sum; varlen sequences are (batch, kv head)
// pairs whose rows start at their cu_seqlens offsets (seq_span); V / out have
// d_v columns.
#include <cmath>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "backends/cpu/cache_aligned.h"
#include "backends/cpu/cpu_features.h"
#include "backends/cpu/dropout_mask.h"
#include "backends/cpu/gemm.h"
#include "backends/cpu/gemm_bf16.h"
#include "orchard/philox.h"
#include "backends/cpu/kernel_common.h"
#include "backends/cpu/kernels.h"
#include "backends/cpu/score_mods.h"
#include "backends/cpu/softmax_tile.h"
#include "backends/cpu/split_bf16x3.h"
#include "backends/cpu/few_rows_forward.h"
#include "backends/cpu/stage_bf16_panels.h"
#include "backends/cpu/stage_f32_tiles.h"
#include "backends/cpu/stage_buffer.h"
#include "backends/cpu/task_pool.h"
#include "backends/cpu/tile_load.h"
#include "backends/cpu/visibility.h"

namespace orchard::cpu {
namespace {

// A task's tiles. One per thread, kept between calls (for_call): allocated
// and zeroed per call and participant it cost ~290 KB of memset and a
// malloc / free per thread per call on the AMX tiles, a visible share of an
// s512 call of ~0.4 ms on 16 threads. Every element is written before it is
// read; ORCHARD_CPU_POISON_STAGE=1 fills it with NaN / 0xFF per call to test that.
template <class T>
struct FwdScratch {
  // The tiles the GEMMs read and write start on a cache line (cache_aligned.h).
  CacheAlignedVector<T> q, o, s, m, l;
  std::vector<int> first, nv;
  std::vector<std::uint8_t> keep;  // dropout keep masks of two rows (r, r + 8: for_dropout_rows), bn each
  // bf16 operands: the Q block and the P tile, in `planes` planes of bm x dp / bm x bn
  // (1 on the bf16 path, 3 for fp32 on AMX: split_bf16x3.h).
  CacheAlignedVector<std::uint16_t> q16, p16;

  // planes: 0 on the fp32 / fp64 path; fp32_q: Q is loaded to fp32 first (every path but bf16).
  static FwdScratch& for_call(int bm, int dp, int dvp, int bn, int planes, bool fp32_q) {
    thread_local FwdScratch w;
    const std::size_t qn = fp32_q ? std::size_t(bm) * dp : 0, q16n = std::size_t(planes) * bm * dp;
    const std::size_t p16n = std::size_t(planes) * bm * bn;
    w.q.resize(qn), w.o.resize(std::size_t(bm) * dvp), w.s.resize(std::size_t(bm) * bn);
    w.m.resize(bm), w.l.resize(bm), w.first.resize(bm), w.nv.resize(bm), w.keep.resize(2 * std::size_t(bn));
    w.q16.resize(q16n), w.p16.resize(p16n);
    if (StageBuffer::poison()) {
      const T nan = std::numeric_limits<T>::quiet_NaN();
      for (auto* v : {&w.q, &w.o, &w.s, &w.m, &w.l}) std::fill(v->begin(), v->end(), nan);
      std::fill(w.first.begin(), w.first.end(), -1000000);
      std::fill(w.nv.begin(), w.nv.end(), -1000000);
      std::fill(w.keep.begin(), w.keep.end(), std::uint8_t(0xFF));
      std::fill(w.q16.begin(), w.q16.end(), std::uint16_t(0xFFFF));
      std::fill(w.p16.begin(), w.p16.end(), std::uint16_t(0xFFFF));
    }
    return w;
  }
};

// The largest (batch, kv head) pair whose K / V a task stages for itself (forward_impl's one-region
// path): both staged tiles then fit the 2 MB L2 beside the task's scratch (a bound chosen, not tuned).
constexpr std::size_t kOwnStageMaxBytes = std::size_t(1) << 20;

// Whether the fp32 forward on AMX (FwdGeometry::split3) beats the FMA path at sk keys (the longest
// sequence's under varlen) and padded head dim dp. 2-core AMX box, 2 threads, b1 forwards in separate
// processes (session 58): from 1k keys at d64 (s1k-s8k 1.06-1.15x, causal 1.06-1.10x from s2k) and
// from 512 at d128 (s512 1.1x non-causal, even causal; s2k-s8k 1.24-1.33x); below that the split
// planes' staging and the bf16 path's wider tiles cost more than the GEMMs save (s64 h8 d64 0.14
// against 0.06 ms, s256 d128 1.3 against 1.2, s512 d64 causal 1.54 against 1.34). fp16 takes the
// same rule (timed at s2k-s4k only: 1.17-1.39x). With fewer (batch, kv head) pairs than threads (the
// 16-core host's grid) the FMA units measured faster at d128 below 1k keys and at d64 below 8k
// (session 60, bench/RESULTS.md [G60], two interleaved processes each, kernel / call ms FMA against
// split: b1 h8 s512 d128 0.76 / 0.76 vs 0.86 / 1.09, b1 h4 s2k d64 2.35 / 2.80 vs 3.47 / 3.61, b1 h2
// s4k d64 5.15 / 5.56 vs 5.50 / 6.29; s2k d128, s8k d64 / d128 within noise): each core runs the
// split's AMX products and its plane staging at about half the 2-core box's rate there.
bool split3_pays(std::int64_t sk, int dp, bool fewer_pairs_than_threads) {
  if (fewer_pairs_than_threads) return sk >= (dp >= 128 ? 1024 : 8192);
  return sk >= (dp >= 128 ? 512 : 1024);
}

struct FwdGeometry {
  int dp, dvp;  // d and d_v padded to the GEMM multiple
  // bf16 inputs on a CPU with AVX512_BF16: both GEMMs run on bf16 operands
  // (vdpbf16ps, fp32 accumulation) from K / V staged pair-packed, P rounded
  // to bf16 before P V; scores and softmax stay fp32.
  bool bf16 = false;
  // fp32 / fp16 inputs where fp32_on_amx(): both GEMMs on the three bf16 planes of their operands
  // (gemm_bf16x3_panels), K / V staged as planes kt_plane / v_plane elements apart, in the bf16
  // path's tiles and panels; scores and softmax fp32 as on the fp32 path.
  bool split3 = false;
  std::int64_t kt_plane = 0, v_plane = 0;
  bool bf16_operands() const { return bf16 || split3; }
  int planes() const { return split3 ? 3 : bf16 ? 1 : 0; }
  // Query rows per task and key columns per tile: kBlockM x kBlockN, on the
  // bf16 path bf16_fwd_block_m() x bf16_fwd_block_n() (gemm_bf16.h), fp32 on
  // AVX-512 up to d 64 kBlockM x kFp32FwdBlockNAvx512 (kernel_common.h).
  int bm = kBlockM, bn = kBlockN;
  // bf16: the staged K / V tiles' column panels (gemm_bf16_panels; bf16_b_panel):
  // 32 on AMX, else the whole tile.
  int kt_panel = 0, v_panel = 0;
};

template <class T>
void forward_block(const FwdParams& p, const FwdGeometry& geo, const SeqSpan& span, const T* kt,
                   const T* v, const std::uint16_t* kt16, const std::uint16_t* v16, int bi, int h,
                   std::int64_t i0, int rows, FwdScratch<T>& w) {
  constexpr T kLog2e = T(1.4426950408889634073599246810018921);
  constexpr T kLn2 = T(0.6931471805599453094172321214581766);
  const T ninf = -std::numeric_limits<T>::infinity();
  const int dp = geo.dp, dvp = geo.dvp, bn = geo.bn;
  const T c_plain = softmax_scale<T>(p) * kLog2e;
  const ScoreMods<T> mods = score_mods_for<T>(p, span, bi, h);
  const bool dropout = p.dropout_p > 0.0f;
  const std::uint32_t threshold = dropout_keep_threshold(p.dropout_p);
  const DropoutKey key = dropout_key(p);  // reads rng_state when set
  // Dropout zeroes the dropped probabilities only; 1 / (1 - p) scales O once, with 1 / l at the
  // end (the same product, one rounding fewer), so the bf16 forward keeps its fused P (session 55).
  const T rp = dropout ? T(1) / (T(1) - dropout_prob<T>(p)) : T(1);
  const auto batch_head = static_cast<std::uint32_t>(std::int64_t(bi) * p.hq + h);
  auto mask_row = [&](std::int64_t i) {
    return p.dropout_mask + (std::int64_t(batch_head) * p.sq + i) * p.sk;
  };
  // The Philox index of row i, column j0: the call's dropout offsets added (params.h).
  const std::uint32_t drop_bh = dropout_batch_head(p, bi, h);
  // Block row r's keep mask for columns [j0, j0 + ncols) to keep, with row r + 8's to keep8 when
  // paired (for_dropout_rows: the two rows' draws come from the same Philox calls).
  const auto drop_row0 = static_cast<std::uint32_t>(i0 + p.dropout_row_offset);
  auto keep_rows = [&](int r, bool paired, std::int64_t j0, int ncols, std::uint8_t* keep, std::uint8_t* keep8) {
    if (paired)
      dropout_keep_row_pair(key.seed, key.offset, drop_bh, drop_row0 + r, j0 + p.dropout_col_offset, ncols,
                            threshold, keep, keep8);
    else
      dropout_keep_row(key.seed, key.offset, drop_bh, drop_row0 + r, j0 + p.dropout_col_offset, ncols,
                       threshold, keep);
  };

  const std::int64_t q_row0 = span.q_start + i0;  // first row in q / out / lse
  const std::int64_t q_off = bi * p.q_batch_stride + q_row0 * p.q_row_stride + h * p.q_head_stride;
  if (geo.bf16) {
    load_rows_bf16(p.q, q_off, p.q_row_stride, rows, p.d, dp, w.q16.data());
  } else {
    load_rows(p.q, p.dtype, q_off, p.q_row_stride, rows, rows, p.d, dp, w.q.data());
    if constexpr (sizeof(T) == 4)
      if (geo.split3) split_rows_bf16x3(w.q.data(), dp, rows, dp, w.q16.data(), dp, std::int64_t(geo.bm) * dp);
  }
  std::fill(w.o.begin(), w.o.begin() + std::int64_t(rows) * dvp, T(0));
  // A sink starts every row's softmax as a key of logit sink with no value.
  const T m0 = p.sink ? static_cast<T>(p.sink[h]) * kLog2e : ninf;
  const T l0 = m0 == ninf ? T(0) : T(1);
  std::fill(w.m.begin(), w.m.end(), m0);
  std::fill(w.l.begin(), w.l.end(), l0);

  const ColRange cols = block_visible_cols(p, span, i0, rows, bn);
  std::int64_t mask_end = cols.begin;  // dropout-mask columns [cols.begin, mask_end) written
  // A boolean mask's hidden tiles (a key-padding mask's tail, say) are skipped whole, unless the
  // call returns its dropout mask, which the loop below records in column order (up to
  // mask_end). Dropout itself does not stop it: each element's draw depends on its position only.
  const bool records_mask = dropout && p.dropout_mask != nullptr;
  for (std::int64_t j0 = cols.begin; j0 < cols.end; j0 += bn) {
    const int tile_cols = static_cast<int>(std::min<std::int64_t>(bn, cols.end - j0));
    if (!records_mask && bool_mask_hides_tile(mods, i0, rows, j0, tile_cols)) continue;
    // The GEMMs compute only the tile's first nc columns, those any row of the block sees
    // (rounded up to the K^T panel, 16 for fp32): the causal diagonal's last tile, a last
    // tile past sk. Columns [nc, bn) of S keep stale values; every step after the GEMM
    // masks columns from nv[r] <= nc on, and P V reads nc columns of P only.
    const int unit = geo.bf16_operands() ? geo.kt_panel : kGemmNMultiple;
    const int nc = cols.end - j0 < bn && unit < bn
                       ? static_cast<int>(round_up(cols.end - j0, unit))
                       : bn;
    if constexpr (sizeof(T) == 4) {
      if (geo.split3)
        gemm_bf16x3_panels(rows, nc, dp / 2, w.q16.data(), dp, std::int64_t(geo.bm) * dp, kt16 + j0 * dp,
                           geo.kt_plane, geo.kt_panel, w.s.data(), bn, false);
      else if (geo.bf16)
        gemm_bf16_panels(rows, nc, dp / 2, w.q16.data(), dp, 2, kt16 + j0 * dp, geo.kt_panel,
                         w.s.data(), bn, false);
      else
        gemm(rows, nc, dp, w.q.data(), dp, kt + j0 * dp, bn, w.s.data(), bn, false);
    } else {
      gemm(rows, nc, dp, w.q.data(), dp, kt + j0 * dp, bn, w.s.data(), bn, false);
    }
    const bool left_masked =
        tile_col_bounds(p, span, i0, rows, j0, bn, w.first.data(), w.nv.data());
    T c = c_plain;
    if (left_masked || mods.any()) {
      apply_score_mods(mods, w.s.data(), rows, bn, i0, j0, w.first.data(), w.nv.data(), nullptr);
      c = kLog2e;
    }
    // Each row's keep mask for this tile (recorded when the call returns it), handed to
    // drop_row(r, ncols, keep); rows r and r + 8 drawn together (w.keep: two rows) where paired.
    auto drop_rows = [&](auto&& drop_row) {
      const int ncols = static_cast<int>(std::min<std::int64_t>(bn, span.len_k - j0));
      auto apply = [&](int r, const std::uint8_t* keep) {
        if (p.dropout_mask) std::copy_n(keep, ncols, mask_row(i0 + r) + j0);
        drop_row(r, ncols, keep);
      };
      std::uint8_t* const keep = w.keep.data();
      for_dropout_rows(drop_row0, rows, [&](int r, bool paired) {
        keep_rows(r, paired, j0, ncols, keep, keep + bn);
        apply(r, keep);
        if (paired) apply(r + 8, keep + bn);
      });
      mask_end = j0 + ncols;
    };
    if constexpr (sizeof(T) == 4) {
      // bf16: P goes to bf16 straight from the softmax; dropout zeroes its dropped entries there.
      if (geo.bf16 && softmax_tile_update_bf16(w.s.data(), rows, bn, w.nv.data(), c, w.m.data(), w.l.data(),
                                               w.o.data(), dvp, dvp, w.p16.data())) {
        if (dropout)
          drop_rows([&](int r, int ncols, const std::uint8_t* keep) {
            zero_dropped(w.p16.data() + std::int64_t(r) * bn, keep, ncols);
          });
        gemm_bf16_panels(rows, dvp, nc / 2, w.p16.data(), bn, 2, v16 + j0 * dvp, geo.v_panel,
                         w.o.data(), dvp, true, bn / 2);
        continue;
      }
    }
    softmax_tile_update(w.s.data(), rows, bn, w.nv.data(), c, w.m.data(), w.l.data(),
                        w.o.data(), dvp, dvp);
    if (dropout)
      drop_rows([&](int r, int ncols, const std::uint8_t* keep) {
        zero_dropped(w.s.data() + std::int64_t(r) * bn, keep, ncols);
      });
    if constexpr (sizeof(T) == 4) {
      // fp32 on AMX: P's three planes (a softmax update writing them directly measured no faster:
      // the split's arithmetic, not the extra pass over P, is its cost; session 58).
      if (geo.split3) {
        const std::int64_t plane = std::int64_t(geo.bm) * bn;
        split_probabilities_bf16x3(w.s.data(), bn, rows, nc, w.p16.data(), bn, plane);
        gemm_bf16x3_panels(rows, dvp, nc / 2, w.p16.data(), bn, plane, v16 + j0 * dvp, geo.v_plane, geo.v_panel,
                           w.o.data(), dvp, true, bn / 2);
        continue;
      }
      if (geo.bf16) {
        to_bf16_rows(w.s.data(), bn, rows, bn, w.p16.data(), bn);
        gemm_bf16_panels(rows, dvp, nc / 2, w.p16.data(), bn, 2, v16 + j0 * dvp, geo.v_panel,
                         w.o.data(), dvp, true, bn / 2);
        continue;
      }
    }
    gemm(rows, dvp, nc, w.s.data(), bn, v + j0 * dvp, dvp, w.o.data(), dvp, true);
  }
  // The mask is returned for every element of the sequence, hidden ones included.
  if (dropout && p.dropout_mask) {
    for_dropout_rows(drop_row0, rows, [&](int r, bool paired) {
      std::uint8_t* const mask = mask_row(i0 + r);
      std::uint8_t* const mask8 = paired ? mask_row(i0 + r + 8) : nullptr;
      for (auto [from, to] : {std::pair{std::int64_t(0), cols.begin}, std::pair{mask_end, std::int64_t(span.len_k)}})
        for (std::int64_t j0 = from; j0 < to; j0 += bn) {
          const int ncols = static_cast<int>(std::min<std::int64_t>(bn, to - j0));
          keep_rows(r, paired, j0, ncols, mask + j0, paired ? mask8 + j0 : nullptr);
        }
    });
  }

  T* lse = static_cast<T*>(p.lse) + bi * p.lse_batch_stride + h * p.lse_head_stride + q_row0;
  for (int r = 0; r < rows; ++r) {
    const T l = w.l[r];
    const std::int64_t off = bi * p.o_batch_stride + (q_row0 + r) * p.o_row_stride + h * p.o_head_stride;
    // Only an exact 0 sum means "no visible key"; a NaN sum (NaN/inf in q or
    // k) must propagate to out and lse, never be silently zeroed.
    if (l != T(0)) {
      store_row(w.o.data() + std::int64_t(r) * dvp, rp / l, p.d_v, p.dtype, p.out, off);
      lse[r] = (w.m[r] + std::log2(l)) * kLn2;
    } else {  // fully masked row (or no keys) without a sink: zeros, -inf, never NaN
      std::fill(w.o.begin() + std::int64_t(r) * dvp, w.o.begin() + std::int64_t(r + 1) * dvp, T(0));
      store_row(w.o.data() + std::int64_t(r) * dvp, T(1), p.d_v, p.dtype, p.out, off);
      lse[r] = ninf;
    }
  }
}

// Varlen: the returned dropout mask is (b, hq, max sq, max sk); entries past a
// sequence's own lengths are no element at all and are written 0.
void zero_varlen_mask_padding(const FwdParams& p) {
  for (int bi = 0; bi < p.b; ++bi) {
    const SeqSpan s = seq_span(p, bi);
    for (int h = 0; h < p.hq; ++h)
      for (std::int64_t i = 0; i < p.sq; ++i) {
        std::uint8_t* row = p.dropout_mask + ((std::int64_t(bi) * p.hq + h) * p.sq + i) * p.sk;
        std::fill(row + (i < s.len_q ? s.len_k : 0), row + p.sk, std::uint8_t(0));
      }
  }
}

// The operands and tiles of the forward of p (normalized) in compute type T.
template <class T>
FwdGeometry forward_geometry(const FwdParams& p) {
  FwdGeometry geo;
  geo.dp = static_cast<int>(round_up(p.d, kGemmNMultiple));
  geo.dvp = static_cast<int>(round_up(p.d_v, kGemmNMultiple));
  geo.bf16 = sizeof(T) == 4 && p.dtype == DType::kBFloat16 && bf16_dot_available();
  if (sizeof(T) == 4 && !geo.bf16)
    geo.bn = g_fp32_fwd_block_n > 0 ? g_fp32_fwd_block_n
             : cpu_has_avx512() && std::max(geo.dp, geo.dvp) <= kFp32WideTileMaxD ? kFp32FwdBlockNAvx512
                                                                                : kBlockN;
  geo.split3 = sizeof(T) == 4 && (p.dtype == DType::kFloat32 || p.dtype == DType::kFloat16) && fp32_on_amx() &&
               (g_fp32_amx_any_size || split3_pays(p.sk, geo.dp, std::int64_t(p.b) * p.hkv < cpu_threads()));
  if (geo.bf16_operands()) {
    geo.bm = bf16_fwd_block_m();
    geo.bn = bf16_fwd_block_n();
    geo.kt_panel = bf16_b_panel(geo.bn);
    geo.v_panel = bf16_b_panel(geo.dvp);
  }
  // Keys that fit one kBlockN tile: the wider AVX-512 fp32 tile would be half padding.
  if (!geo.bf16_operands() && geo.bn > kBlockN && p.sk <= kBlockN && g_fp32_fwd_block_n == 0) geo.bn = kBlockN;
  const std::int64_t tasks_per_block_row = std::int64_t(p.b) * p.hq;  // (batch, query head) pairs
  const std::int64_t nthreads = cpu_threads();
  // Fewer row blocks than threads (a tiny call: b1 h1 s64 on 2 threads has one): kFp32SmallBlockM-row
  // tasks, so that more threads take part.
  if (!geo.bf16_operands() && tasks_per_block_row * ((p.sq + geo.bm - 1) / geo.bm) < nthreads) geo.bm = kFp32SmallBlockM;
  // Few tasks for the threads (b1 h8 s512 on 16 threads: 32 of 128 rows):
  // 64-row tasks. The tile A/B on the 16-core AMX host (bench/RESULTS.md,
  // orchard alone) had 64 x 256 at 0.42 / 0.64 ms vs 128 x 256 at 0.45 / 0.67
  // (s512 d64 / d128) and 128 rows ahead from s2k (4+ tasks per thread).
  if (geo.bf16_operands() && bf16_fwd_block_m_is_default() &&
      tasks_per_block_row * ((p.sq + geo.bm - 1) / geo.bm) < 4 * nthreads)
    geo.bm = kAmxSmallBlockM;
  return geo;
}

template <class T>
void forward_impl(const FwdParams& p) {
  if (p.b == 0 || p.hq == 0 || p.sq == 0) return;
  FwdGeometry geo = forward_geometry<T>(p);
  const int g = p.hq / p.hkv;
  const std::int64_t npairs = std::int64_t(p.b) * p.hkv;
  const std::int64_t nthreads = cpu_threads();
  const int dp = geo.dp, dvp = geo.dvp, bm = geo.bm, bn = geo.bn;
  const std::int64_t skp = round_up(p.sk, bn);  // sk is the longest sequence's under varlen
  const std::int64_t nrb = (p.sq + bm - 1) / bm;
  const std::size_t esize = geo.split3 ? 3 * 2 : geo.bf16 ? 2 : sizeof(T);
  geo.kt_plane = skp * dp, geo.v_plane = skp * dvp;
  // One pair's staged K^T and V: skp x dp and skp x dvp elements.
  const std::size_t pair_kt_bytes = std::size_t(dp) * skp * esize, pair_v_bytes = std::size_t(skp) * dvp * esize;
  const std::size_t pair_bytes = std::max<std::size_t>(1, pair_kt_bytes + pair_v_bytes);

  // Rows [c0, c1) of pair's K (is_k) or V, staged into the pair's K^T / V tiles at kt_pair / v_pair
  // (skp x dp / skp x dvp elements: the pair's slot of the chunk, or a task's own scratch).
  auto stage_piece = [&](std::int64_t pair, bool is_k, std::int64_t c0, std::int64_t c1, void* kt_pair, void* v_pair) {
    const std::int64_t bi = pair / p.hkv, kh = pair % p.hkv;
    const SeqSpan span = seq_span(p, static_cast<int>(bi));
    const int rows = static_cast<int>(std::clamp<std::int64_t>(span.len_k - c0, 0, c1 - c0));
    const int rows_pad = static_cast<int>(c1 - c0);
    const auto [koff, voff] = kv_row_offsets(p, bi, kh, span.k_start + c0);
    if (geo.split3) {
      stage_split3_panels(is_k ? p.k : p.v, p.dtype, is_k ? koff : voff, is_k ? p.k_row_stride : p.v_row_stride,
                          rows, rows_pad, is_k ? p.d : p.d_v, is_k ? dp : dvp, bn, is_k,
                          static_cast<std::uint16_t*>(is_k ? kt_pair : v_pair) + c0 * (is_k ? dp : dvp),
                          is_k ? geo.kt_panel : geo.v_panel, is_k ? geo.kt_plane : geo.v_plane);
    } else if (geo.bf16) {
      if (is_k)
        stage_kt_pairs_bf16(p.k, koff, p.k_row_stride, rows, rows_pad, p.d, dp, bn,
                            static_cast<std::uint16_t*>(kt_pair) + c0 * dp, geo.kt_panel);
      else
        stage_v_pairs_bf16(p.v, voff, p.v_row_stride, rows, rows_pad, p.d_v, dvp,
                           static_cast<std::uint16_t*>(v_pair) + c0 * dvp, bn, geo.v_panel);
    } else if (is_k) {
      stage_rows_transposed(p.k, p.dtype, koff, p.k_row_stride, rows, rows_pad, p.d, dp, bn,
                            static_cast<T*>(kt_pair) + c0 * dp);
    } else {
      load_rows(p.v, p.dtype, voff, p.v_row_stride, rows, rows_pad, p.d_v, dvp, static_cast<T*>(v_pair) + c0 * dvp);
    }
  };
  // Task `task` (0 .. g * nrb - 1) of pair: forward_block on the pair's staged K / V, query head
  // task / nrb of the group, its row blocks last first (under a causal mask the longest tasks, and
  // dynamic scheduling balances best heaviest-first).
  auto run_task = [&](std::int64_t pair, std::int64_t task, const void* kt_pair, const void* v_pair,
                      FwdScratch<T>& w) {
    const int gi = static_cast<int>(task / nrb);
    const std::int64_t rb = nrb - 1 - task % nrb;
    const int bi = static_cast<int>(pair / p.hkv), kh = static_cast<int>(pair % p.hkv);
    const SeqSpan span = seq_span(p, bi);
    const std::int64_t i0 = rb * bm;
    if (i0 >= span.len_q) return;  // varlen: a shorter sequence
    const int rows = static_cast<int>(std::min<std::int64_t>(bm, span.len_q - i0));
    const bool b16 = geo.bf16_operands();
    forward_block<T>(p, geo, span, b16 ? nullptr : static_cast<const T*>(kt_pair),
                     b16 ? nullptr : static_cast<const T*>(v_pair),
                     b16 ? static_cast<const std::uint16_t*>(kt_pair) : nullptr,
                     b16 ? static_cast<const std::uint16_t*>(v_pair) : nullptr, bi, kh * g + gi, i0, rows, w);
  };

  // Pairs of at most kOwnStageMaxBytes: one parallel region, each thread staging the pairs it works on
  // into its own buffer (once per pair it meets, in task order) and running their row blocks from its
  // own cache. run_grouped gives a pair's tasks to the same threads first, so a thread meets few pairs:
  // with at least as many pairs as threads none is staged twice; with fewer (b1 h8 on 16 threads) each
  // of a pair's threads stages all of it, which costs less than sharing one staged copy did: on the
  // 16-core host a shared copy's lines, read by other cores in the last call, took 6-10x as long to
  // rewrite (bench/RESULTS.md [G60]). Tiny calls (one row block, b1 h8 s64, session 57 [C57]) gained
  // too: 0.060 -> 0.051 ms, the tiles still in the staging core's cache.
  if (pair_bytes <= kOwnStageMaxBytes) {
    run_grouped(npairs, g * nrb, [&](auto next) {
      FwdScratch<T>& w = FwdScratch<T>::for_call(bm, dp, dvp, bn, geo.planes(), !geo.bf16);
      thread_local CacheAlignedVector<std::byte> own;
      const std::size_t kt_bytes = round_up(pair_kt_bytes, 64);
      if (own.size() < kt_bytes + pair_v_bytes) own.resize(kt_bytes + pair_v_bytes);
      if (StageBuffer::poison()) std::fill(own.begin(), own.end(), std::byte{0xFF});  // NaN in every dtype
      const Bf16GemmScope amx_scope(geo.bf16_operands());
      std::int64_t staged = -1;  // the pair in `own`
      for (std::int64_t t; (t = next()) >= 0;) {
        const std::int64_t pair = t / (g * nrb);
        if (pair != staged) {
          stage_piece(pair, true, 0, skp, own.data(), nullptr);
          stage_piece(pair, false, 0, skp, nullptr, own.data() + kt_bytes);
          staged = pair;
        }
        run_task(pair, t % (g * nrb), own.data(), own.data() + kt_bytes, w);
      }
    }, Team::kWhole);
    return;
  }

  const std::int64_t chunk = std::clamp<std::int64_t>(g_stage_budget_bytes / pair_bytes, 1, npairs);
  // Not zeroed: the staging below writes every element (padding included),
  // in parallel, so no single-threaded memset precedes it (stage_buffer.h).
  const std::size_t v_offset = round_up(chunk * pair_kt_bytes, 64);
  const StageBuffer buf(StageSlot::kForward, v_offset + chunk * pair_v_bytes);
  std::byte* const base = buf.as<std::byte>();

  // Staging jobs: K and V of each pair, split into pieces of `piece` key rows
  // (a multiple of bn) so that few pairs (b1 h1 at s 8k: 2 jobs) still give
  // every thread work; ~4 jobs per thread, at least 256 rows each. Both phases
  // start the whole OpenMP team (Team::kWhole): their task counts differ, and a
  // team fitted to each made libgomp end and re-create threads in every call.
  for (std::int64_t pair0 = 0; pair0 < npairs; pair0 += chunk) {
    const std::int64_t np = std::min(chunk, npairs - pair0);
    const std::int64_t want = std::max<std::int64_t>(1, (4 * nthreads + 2 * np - 1) / (2 * np));
    const std::int64_t piece =
        std::max(round_up((skp + want - 1) / want, bn), round_up(256, bn));
    const std::int64_t npieces = (skp + piece - 1) / piece;
    // Both phases hand out a pair's tasks to the same threads first (run_grouped: the threads
    // that stage a pair's K / V run its row blocks, call after call).
    run_grouped(np, 2 * npieces, [&](auto next) {
      for (std::int64_t t; (t = next()) >= 0;) {
        const std::int64_t local = t / (2 * npieces);
        const std::int64_t c0 = (t % npieces) * piece;
        stage_piece(pair0 + local, (t / npieces) % 2 == 0, c0, std::min(skp, c0 + piece),
                    base + local * pair_kt_bytes, base + v_offset + local * pair_v_bytes);
      }
    }, Team::kWhole);
    run_grouped(np, g * nrb, [&](auto next) {
      FwdScratch<T>& w = FwdScratch<T>::for_call(bm, dp, dvp, bn, geo.planes(), !geo.bf16);
      const Bf16GemmScope amx_scope(geo.bf16_operands());  // AMX tile config for this thread's GEMMs
      for (std::int64_t t; (t = next()) >= 0;) {
        const std::int64_t local_pair = t / (g * nrb);
        run_task(pair0 + local_pair, t % (g * nrb), base + local_pair * pair_kt_bytes,
                 base + v_offset + local_pair * pair_v_bytes, w);
      }
    }, Team::kWhole);
  }
}

}  // namespace

std::string forward_variant(const FwdParams& params) {
  std::string name;
  with_compute_type(params, [&](const FwdParams& p, auto t) {
    const FwdGeometry geo = forward_geometry<decltype(t)>(p);
    name = p.dtype == DType::kFloat64 ? "fp64"
           : geo.split3               ? "fp32split3amx"  // fp32 / fp16 on three bf16 planes
           : geo.bf16                 ? (amx_available() ? "bf16amx" : "bf16dot")
                                      : "fp32";
    name += "_tiled_br" + std::to_string(geo.bm) + "_bc" + std::to_string(geo.bn);
  });
  return name;
}

void forward(const FwdParams& params) {
  if (forward_takes_decode_kernel(params)) return forward_on_decode_kernel(params);
  with_compute_type(params, [](const FwdParams& p, auto t) {
    forward_impl<decltype(t)>(p);
    if (p.cu_seqlens_q && p.dropout_p > 0.0f && p.dropout_mask) zero_varlen_mask_padding(p);
  });
}

}  // namespace orchard::cpu
