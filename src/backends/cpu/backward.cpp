// FlashAttention backward on the CPU, race-free and deterministic without
// atomics or an sq x sk buffer. Per chunk of (batch, kv head) pairs:
//   stage: K^T, K, V^T of the pair and Q, dO, lse*log2(e), D = rowsum(dO*O)
//          of its group's q heads, converted to T once;
//   pass 1, parallel over (pair, dQ slot): a task takes the column blocks
//          cb = slot, slot + G, ... (G = kDqSlots or fewer) in order; per
//          column block it recomputes P and dS tile by tile over every q head
//          of the group and every row block, accumulates dV += P_drop^T dO,
//          dK += dS^T Q in L1 (GQA's sum over the group inside one task) and
//          dQ += dS K into its slot's own (g * sq x d) buffer; a slot's rows are
//          written by their first product, not zeroed ahead (DqSlotRows);
//   pass 2, parallel over (pair, q head, row block): dQ = the sum of the G
//          slot buffers in slot order, over the rows each slot wrote.
// 5 tile GEMMs, deterministic for any thread count without atomics: G does
// not depend on the thread count, each slot adds its column blocks in order.
// (Until 2026-11-30 pass 2 recomputed P and dS per row block for dQ: 7 GEMMs,
// ~25% more backward time; measured in bench/NOTES.md.)
// The features follow the forward (forward.cpp's header); on top, dS goes
// through the softcap's 1 - tanh^2, and dsink comes from the staged lse and
// D per (batch, q head), summed over the batch in a fixed order.
#include <cmath>
#include <limits>
#include <vector>

#include "backends/cpu/cache_aligned.h"
#include "backends/cpu/dropout_mask.h"
#include "backends/cpu/gemm.h"
#include "backends/cpu/gemm_bf16.h"
#include "orchard/philox.h"
#include "backends/cpu/kernel_common.h"
#include "backends/cpu/kernels.h"
#include "backends/cpu/score_mods.h"
#include "backends/cpu/softmax_tile.h"
#include "backends/cpu/stage_bf16_panels.h"
#include "backends/cpu/stage_buffer.h"
#include "backends/cpu/stage_f32_tiles.h"
#include "backends/cpu/task_pool.h"
#include "backends/cpu/tile_load.h"
#include "backends/cpu/visibility.h"

namespace orchard::cpu {
namespace {

// Staged inputs of one (batch, kv head) pair (under varlen: of one sequence;
// rows past its own lengths are padding the loops never reach).
template <class T>
struct PairStage {
  T* kt;     // skp / kBlockN tiles of dp x kBlockN (tile_load.h)
  T* k;      // skp x dp
  T* vt;     // skp / kBlockN tiles of dvp x kBlockN
  T* q;      // (g * sq) x dp
  T* dout;   // (g * sq) x dvp
  T* lse2;   // g * sq
  T* dsum;   // g * sq
  T* dq_slots;  // kDqSlots (or fewer) x (g * sq) x dp fp32 dQ partial sums
  // bf16 path (Geometry::bf16; kt, k, vt, q, dout unused): raw bf16 copies.
  std::uint16_t* kt16;   // K as load_pairs_kt_bf16 tiles: B of S = Q K^T
  std::uint16_t* kp16;   // K pair-packed along rows: B of dQ += dS K
  std::uint16_t* vt16;   // V as load_pairs_kt_bf16 tiles: B of dP = dO V^T
  std::uint16_t* q16;    // (g * sq) x dp row-major: A of S
  std::uint16_t* do16;   // (g * sq) x dvp row-major: A of dP
  std::uint16_t* qp16;   // per q head sqe rows pair-packed (g * sqe x dp): B of dK += dS^T Q
  std::uint16_t* dop16;  // same for dO: B of dV += P^T dO
};

// Which rows of one dQ slot (g * sq rows) hold partial sums. The slot buffer is not zeroed: the
// first product into a row block writes it (the GEMM's accumulate = false), and pass 2 skips
// rows a slot never wrote. Zeroing every slot ahead took ~4 % of the fp32 backward (perf, b1 h4
// s1k d64, one thread, session 59). The products and their order are those of zeroed slots, so
// the sums are the same bits (a zero's sign aside).
struct DqSlotRows {
  std::uint8_t* written;  // g * sq flags, 1: the row holds a partial sum

  // Before a product into rows [r0, r0 + rows) of the slot (dq: row r0, dp wide): whether it must
  // accumulate. Rows of a partly written block are zeroed first, then every row counts as written.
  template <class T>
  bool prepare(T* dq, std::int64_t r0, int rows, int dp) const {
    std::uint8_t* w = written + r0;
    int n = 0;
    for (int r = 0; r < rows; ++r) n += w[r];
    if (n == rows) return true;
    if (n != 0)
      for (int r = 0; r < rows; ++r)
        if (!w[r]) std::fill(dq + std::int64_t(r) * dp, dq + std::int64_t(r + 1) * dp, T(0));
    std::fill(w, w + rows, std::uint8_t(1));
    return n != 0;
  }
};

template <class T>
struct BwdScratch {
  // The tiles the GEMMs read and write start on a cache line (cache_aligned.h).
  CacheAlignedVector<T> s, dp_, dcap, acc0, acc1;
  std::vector<int> first, nv;
  std::vector<std::uint8_t> keep;
  CacheAlignedVector<std::uint16_t> t16;  // bf16 path: P^T / dS^T / dS tile
  BwdScratch(int width)
      : s(std::size_t(kBlockM) * kBlockN), dp_(std::size_t(kBlockM) * kBlockN),
        dcap(std::size_t(kBlockM) * kBlockN),
        acc0(std::size_t(std::max(kBlockM, kBlockN)) * width),
        acc1(std::size_t(std::max(kBlockM, kBlockN)) * width), first(kBlockM), nv(kBlockM),
        keep(std::size_t(kBlockM) * kBlockN), t16(std::size_t(kBlockM + 1) * kBlockN) {}
};

struct Geometry {
  int d, dp, dv, dvp, g;  // dv / dvp: the value head dim d_v and its padded width
  std::int64_t skp;
  // bf16 inputs on a CPU with AVX512_BF16: all five products run on bf16
  // operands (vdpbf16ps, fp32 accumulation). S and dP are exact products of
  // the bf16 inputs as in the fp32 path; P and dS are rounded to bf16 for
  // dV, dK, dQ (as torch's bf16 kernels do).
  bool bf16 = false;
  std::int64_t sqe;  // per-head row stride of qp16 / dop16: sq rounded up to even
};

// Recomputes one (row block, column block) tile: on return w.s holds
// P_drop and w.dp_ holds dS, the gradient of the scale-free score
// (rows x kBlockN).
template <class T>
void recompute_tile(const BwdParams& p, const Geometry& geo, const PairStage<T>& st,
                    const SeqSpan& span, const ScoreMods<T>& mods, int bi, int h, int gi,
                    std::int64_t i0, int rows, std::int64_t j0, BwdScratch<T>& w) {
  constexpr T kLog2e = T(1.4426950408889634073599246810018921);
  const std::int64_t qo = std::int64_t(gi) * p.sq + i0;
  if constexpr (sizeof(T) == 4) {
    if (geo.bf16) {
      gemm_bf16(rows, kBlockN, geo.dp / 2, st.q16 + qo * geo.dp, geo.dp, 2, st.kt16 + j0 * geo.dp,
                2 * kBlockN, w.s.data(), kBlockN, false);
      gemm_bf16(rows, kBlockN, geo.dvp / 2, st.do16 + qo * geo.dvp, geo.dvp, 2,
                st.vt16 + j0 * geo.dvp, 2 * kBlockN, w.dp_.data(), kBlockN, false);
    }
  }
  if (!geo.bf16) {
    const T* qb = st.q + qo * geo.dp;
    const T* dob = st.dout + qo * geo.dvp;
    gemm(rows, kBlockN, geo.dp, qb, geo.dp, st.kt + j0 * geo.dp, kBlockN, w.s.data(), kBlockN, false);
    gemm(rows, kBlockN, geo.dvp, dob, geo.dvp, st.vt + j0 * geo.dvp, kBlockN, w.dp_.data(), kBlockN,
         false);
  }
  const bool left_masked =
      tile_col_bounds(p, span, i0, rows, j0, kBlockN, w.first.data(), w.nv.data());
  T c = softmax_scale<T>(p) * kLog2e;
  const bool modded = left_masked || mods.any();
  if (modded) {
    apply_score_mods(mods, w.s.data(), rows, kBlockN, i0, j0, w.first.data(), w.nv.data(),
                     mods.softcap > 0 ? w.dcap.data() : nullptr);
    c = kLog2e;
  }
  const std::uint8_t* keep = nullptr;
  T rp = T(1);
  if (p.dropout_p > 0.0f) {
    const std::uint32_t threshold = dropout_keep_threshold(p.dropout_p);
    const DropoutKey key = dropout_key(p);  // reads rng_state when set
    const std::uint32_t batch_head = dropout_batch_head(p, bi, h);  // with the dropout offsets
    const int ncols = static_cast<int>(std::min<std::int64_t>(kBlockN, span.len_k - j0));
    const std::int64_t jd = j0 + p.dropout_col_offset;
    const auto row0 = static_cast<std::uint32_t>(i0 + p.dropout_row_offset);
    auto keep_row = [&](int r) { return w.keep.data() + std::int64_t(r) * kBlockN; };
    // Rows r and r + 8 of a 16-row group share their Philox calls; two such pairs per AVX-512 step.
    dropout_keep_block(key.seed, key.offset, batch_head, row0, rows, jd, ncols, threshold, w.keep.data(), kBlockN);
    for (int r = 0; r < rows; ++r) std::fill(keep_row(r) + ncols, keep_row(r) + kBlockN, std::uint8_t(0));
    keep = w.keep.data();
    rp = T(1) / (T(1) - dropout_prob<T>(p));
  }
  const std::int64_t ro = std::int64_t(gi) * p.sq + i0;
  backward_tile(w.s.data(), w.dp_.data(), rows, kBlockN, w.nv.data(), c, st.lse2 + ro,
                st.dsum + ro, keep, rp);
  if (modded && mods.softcap > 0)
    softcap_grad(w.dp_.data(), w.dcap.data(), rows, kBlockN, w.first.data(), w.nv.data());
}

// Pass 1: dK, dV of kv head `kh`, columns [j0, j0 + kBlockN) of sequence bi.
template <class T>
void dkdv_block(const BwdParams& p, const Geometry& geo, const PairStage<T>& st, int bi, int kh,
                std::int64_t j0, T* dq_slot, const DqSlotRows& dq_rows, BwdScratch<T>& w) {
  const SeqSpan span = seq_span(p, bi);
  if (j0 >= span.len_k) return;  // varlen: a shorter sequence
  const int dp = geo.dp, dvp = geo.dvp;
  T* dk = w.acc0.data();
  T* dv = w.acc1.data();
  std::fill(dk, dk + std::int64_t(kBlockN) * dp, T(0));
  std::fill(dv, dv + std::int64_t(kBlockN) * dvp, T(0));
  RowRange rows_seen = block_visible_rows(p, span, j0, kBlockN);
  // bf16: row blocks start at even rows so their pairs line up with qp16 /
  // dop16 (the extra row sees none of these columns: P = dS = 0).
  if (geo.bf16) rows_seen.begin -= rows_seen.begin % 2;
  // A tile a boolean mask hides whole adds nothing to dK, dV or dQ (its P and dS are 0, dropout
  // or not): skipped (bool_mask_hides_tile).
  const int tile_cols = static_cast<int>(std::min<std::int64_t>(kBlockN, span.len_k - j0));
  for (int gi = 0; gi < geo.g; ++gi) {
    const int h = kh * geo.g + gi;
    const ScoreMods<T> mods = score_mods_for<T>(p, span, bi, h);
    for (std::int64_t i0 = rows_seen.begin; i0 < rows_seen.end; i0 += kBlockM) {
      const int rows = static_cast<int>(std::min<std::int64_t>(kBlockM, rows_seen.end - i0));
      if (bool_mask_hides_tile(mods, i0, rows, j0, tile_cols)) continue;
      recompute_tile(p, geo, st, span, mods, bi, h, gi, i0, rows, j0, w);
      const std::int64_t ro = std::int64_t(gi) * p.sq + i0;  // the rows' offset in Q, dO and the dQ slot
      if constexpr (sizeof(T) == 4) {
        if (geo.bf16) {
          // P^T dO and dS^T Q over (rows + 1) / 2 row pairs; an odd block's
          // last pair has a zero P / dS partner.
          const std::int64_t re = std::int64_t(gi) * geo.sqe + i0;  // even
          const int kp = (rows + 1) / 2;
          to_bf16_pairs_t(w.s.data(), kBlockN, rows, kBlockN, w.t16.data(), 2 * kBlockN);
          gemm_bf16(kBlockN, dvp, kp, w.t16.data(), 2, 2 * kBlockN, st.dop16 + re * dvp, 2 * dvp,
                    dv, dvp, true);
          to_bf16_pairs_t(w.dp_.data(), kBlockN, rows, kBlockN, w.t16.data(), 2 * kBlockN);
          gemm_bf16(kBlockN, dp, kp, w.t16.data(), 2, 2 * kBlockN, st.qp16 + re * dp, 2 * dp, dk,
                    dp, true);
          to_bf16_rows(w.dp_.data(), kBlockN, rows, kBlockN, w.t16.data(), kBlockN);
          gemm_bf16(rows, dp, kBlockN / 2, w.t16.data(), kBlockN, 2, st.kp16 + j0 * dp, 2 * dp,
                    dq_slot + ro * dp, dp, dq_rows.prepare(dq_slot + ro * dp, ro, rows, dp));
          continue;
        }
      }
      // The tiles are rows x kBlockN; read them as their transposes.
      gemm_tn(kBlockN, dvp, rows, w.s.data(), kBlockN, st.dout + ro * dvp, dvp, dv, dvp, true);
      gemm_tn(kBlockN, dp, rows, w.dp_.data(), kBlockN, st.q + ro * dp, dp, dk, dp, true);
      gemm(rows, dp, kBlockN, w.dp_.data(), kBlockN, st.k + j0 * dp, dp, dq_slot + ro * dp, dp,
           dq_rows.prepare(dq_slot + ro * dp, ro, rows, dp));
    }
  }
  const int ncols = static_cast<int>(std::min<std::int64_t>(kBlockN, span.len_k - j0));
  const T scale = softmax_scale<T>(p);
  for (int c = 0; c < ncols; ++c) {
    const std::int64_t j = span.k_start + j0 + c;
    store_row(dk + std::int64_t(c) * dp, scale, geo.d, p.dtype, p.dk,
              bi * p.dk_batch_stride + j * p.dk_row_stride + kh * p.dk_head_stride);
    store_row(dv + std::int64_t(c) * dvp, T(1), geo.dv, p.dtype, p.dv,
              bi * p.dv_batch_stride + j * p.dv_row_stride + kh * p.dv_head_stride);
  }
}

// Pass 2: dQ of q head h = kh * g + gi, rows [i0, i0 + kBlockM) of sequence
// bi: the sum of the pair's `slots` dQ slot buffers, in slot order, over the rows each slot
// wrote (dq_written: slots x g * sq flags, DqSlotRows); a row no slot wrote is 0.
template <class T>
void dq_reduce(const BwdParams& p, const Geometry& geo, const T* dq_slots, const std::uint8_t* dq_written,
               int slots, int bi, int kh, int gi, std::int64_t i0) {
  const SeqSpan span = seq_span(p, bi);
  if (i0 >= span.len_q) return;  // varlen: a shorter sequence
  const int rows = static_cast<int>(std::min<std::int64_t>(kBlockM, span.len_q - i0));
  const int dp = geo.dp;
  const int h = kh * geo.g + gi;
  const std::size_t slot_elems = std::size_t(geo.g) * p.sq * dp;
  const T scale = softmax_scale<T>(p);
  T row[4096 + kGemmNMultiple];  // dp <= the CPU backend's max head dim, padded
  const std::size_t slot_rows = std::size_t(geo.g) * p.sq;
  for (int r = 0; r < rows; ++r) {
    const std::int64_t ri = std::int64_t(gi) * p.sq + i0 + r;
    const T* src = dq_slots + ri * dp;
    bool any = false;
    for (int sl = 0; sl < slots; ++sl) {
      if (!dq_written[sl * slot_rows + ri]) continue;
      const T* o = src + sl * slot_elems;
      if (any) {
        for (int c = 0; c < dp; ++c) row[c] += o[c];
      } else {
        std::copy_n(o, dp, row);
        any = true;
      }
    }
    if (!any) std::fill(row, row + dp, T(0));
    if (p.dq_accum != nullptr) {  // the caller's fp32 accumulator (params.h): add dQ / scale, row-major
      float* acc = p.dq_accum + bi * p.dq_accum_batch_stride + h * p.dq_accum_head_stride +
                   (i0 + r) * ((geo.d + 7) / 8 * 8);
      for (int c = 0; c < geo.d; ++c) acc[c] += static_cast<float>(row[c]);
      continue;
    }
    store_row(row, scale, geo.d, p.dtype, p.dq,
              bi * p.dq_batch_stride + (span.q_start + i0 + r) * p.dq_row_stride + h * p.dq_head_stride);
  }
}

// Converts rows [r0, r1) (r0 even; r1 <= sqe) of one q head's Q, dO, lse and
// computes D = rowsum(dO * O). Returns these rows' share of the sink
// gradient, sum over rows of exp(sink - lse) * D (0 without a sink), in double.
template <class T>
double stage_q_head(const BwdParams& p, const Geometry& geo, const PairStage<T>& st, int bi, int h,
                    int gi, std::int64_t r0, std::int64_t r1, std::vector<T>& orow,
                    std::vector<T>& qrow, std::vector<T>& dorow) {
  constexpr T kLog2e = T(1.4426950408889634073599246810018921);
  const int dp = geo.dp, dvp = geo.dvp;
  const SeqSpan span = seq_span(p, bi);
  using LseT = T;  // float32 lse for f16/bf16/f32, float64 for f64 (T matches)
  const LseT* lse = static_cast<const LseT*>(p.lse) + bi * p.lse_batch_stride + h * p.lse_head_stride + span.q_start;
  double sink_share = 0.0;
  for (std::int64_t i = r0; i < std::min<std::int64_t>(r1, span.len_q); ++i) {
    const std::int64_t ro = std::int64_t(gi) * p.sq + i;
    const std::int64_t row = span.q_start + i;
    const std::int64_t qoff = bi * p.q_batch_stride + row * p.q_row_stride + h * p.q_head_stride;
    T* dor = geo.bf16 ? dorow.data() : st.dout + ro * dvp;
    if (geo.bf16) {
      load_rows_bf16(p.q, qoff, 0, 1, geo.d, dp, st.q16 + ro * dp);
      load_rows_bf16(p.dout, bi * p.do_batch_stride + row * p.do_row_stride + h * p.do_head_stride,
                     0, 1, geo.dv, dvp, st.do16 + ro * dvp);
    } else {
      load_row(p.q, p.dtype, qoff, geo.d, dp, st.q + ro * dp);
    }
    (void)qrow;
    load_row(p.dout, p.dtype, bi * p.do_batch_stride + row * p.do_row_stride + h * p.do_head_stride,
             geo.dv, dvp, dor);
    load_row(p.out, p.dtype, bi * p.o_batch_stride + row * p.o_row_stride + h * p.o_head_stride,
             geo.dv, dvp, orow.data());
    T sum = 0;
    for (int c = 0; c < geo.dv; ++c) sum += dor[c] * orow[c];
    st.dsum[ro] = sum;
    st.lse2[ro] = lse[i] * kLog2e;  // -inf stays -inf: the row contributes nothing
    if (p.sink && lse[i] != -std::numeric_limits<T>::infinity())
      sink_share += std::exp(static_cast<double>(p.sink[h]) - static_cast<double>(lse[i])) *
                    static_cast<double>(sum);
  }
  if (geo.bf16) {  // pair rows [r0, r1) of [0, sqe), r0 even
    const std::int64_t e0 = std::int64_t(gi) * geo.sqe + r0, row0 = span.q_start + r0;
    const int rows = static_cast<int>(std::clamp<std::int64_t>(span.len_q - r0, 0, r1 - r0));
    load_pairs_rows_bf16(p.q, bi * p.q_batch_stride + row0 * p.q_row_stride + h * p.q_head_stride,
                         p.q_row_stride, rows, static_cast<int>(r1 - r0), geo.d, dp,
                         st.qp16 + e0 * dp);
    load_pairs_rows_bf16(p.dout, bi * p.do_batch_stride + row0 * p.do_row_stride + h * p.do_head_stride,
                         p.do_row_stride, rows, static_cast<int>(r1 - r0), geo.dv, dvp,
                         st.dop16 + e0 * dvp);
  }
  return sink_share;
}

template <class T>
void backward_impl(const BwdParams& p) {
  if (p.b == 0 || p.hq == 0) {
    if (p.sink && p.dsink) std::fill(p.dsink, p.dsink + p.hq, 0.0f);
    return;
  }
  Geometry geo;
  geo.d = p.d;
  geo.dp = static_cast<int>(round_up(p.d, kGemmNMultiple));
  geo.dv = p.d_v;
  geo.dvp = static_cast<int>(round_up(p.d_v, kGemmNMultiple));
  geo.g = p.hq / p.hkv;
  geo.skp = round_up(p.sk, kBlockN);  // sk / sq are the longest sequence's under varlen
  geo.bf16 = sizeof(T) == 4 && p.dtype == DType::kBFloat16 && bf16_dot_available();
  geo.sqe = round_up(p.sq, 2);
  const int dp = geo.dp, dvp = geo.dvp, g = geo.g;
  const std::int64_t skp = geo.skp;
  const std::int64_t npairs = std::int64_t(p.b) * p.hkv;
  const std::int64_t ncb = (p.sk + kBlockN - 1) / kBlockN;
  const std::int64_t nrb = (p.sq + kBlockM - 1) / kBlockM;
  // dQ slots per pair: fixed (never the thread count), so sums are reproducible.
  const int slots = static_cast<int>(std::clamp<std::int64_t>(ncb, 1, kDqSlots));
  const std::size_t slot_elems = std::size_t(g) * p.sq * dp;
  // bf16: the fp32 part holds only lse2, dsum and the dQ slots; the bf16 part the rest.
  const std::size_t pair_elems =
      (geo.bf16 ? std::size_t(2 * std::int64_t(g) * p.sq)
                : std::size_t(skp * (2 * dp + dvp) + std::int64_t(g) * p.sq * (dp + dvp) +
                              2 * std::int64_t(g) * p.sq)) +
      slots * slot_elems;
  const std::size_t pair_elems16 =
      geo.bf16 ? std::size_t(skp * (2 * dp + dvp) + std::int64_t(g) * (p.sq + geo.sqe) * (dp + dvp)) : 0;
  const std::int64_t chunk = std::clamp<std::int64_t>(
      g_stage_budget_bytes / std::max<std::size_t>(1, pair_elems * sizeof(T) + pair_elems16 * 2), 1,
      npairs);
  // Not zeroed (was: value-initialised vectors, a single-threaded memset of up
  // to the whole stage budget per call): staging writes every element the
  // passes read, pass 2 reads only the dQ slot rows pass 1 wrote (DqSlotRows;
  // stage_buffer.h; poison-tested).
  const StageBuffer stage_buf(StageSlot::kBackward, std::size_t(chunk) * pair_elems * sizeof(T));
  const StageBuffer stage16_buf(StageSlot::kBackward16, std::size_t(chunk) * pair_elems16 * 2);
  T* const stage = stage_buf.as<T>();
  // The dQ slots' written-row flags (DqSlotRows), per pair of a chunk: slots x g * sq; pass 1
  // clears each slot's flags. A fresh vector per call (past glibc's mmap threshold) paid its page
  // faults in every call: clear_page 1.5 % of b1 s1k d64 in perf.
  const std::size_t flags_per_pair = std::size_t(slots) * g * p.sq;
  const StageBuffer dq_rows_buf(StageSlot::kBackwardDqRows, std::size_t(chunk) * flags_per_pair);
  std::uint8_t* const dq_written = dq_rows_buf.as<std::uint8_t>();
  std::uint16_t* const stage16 = stage16_buf.as<std::uint16_t>();
  auto pair_stage = [&](std::int64_t local) {
    PairStage<T> s{};
    if (geo.bf16) {
      std::uint16_t* b16 = stage16 + std::size_t(local) * pair_elems16;
      s.kt16 = b16;
      s.kp16 = s.kt16 + skp * dp;
      s.vt16 = s.kp16 + skp * dp;
      s.q16 = s.vt16 + skp * dvp;
      s.do16 = s.q16 + std::int64_t(g) * p.sq * dp;
      s.qp16 = s.do16 + std::int64_t(g) * p.sq * dvp;
      s.dop16 = s.qp16 + std::int64_t(g) * geo.sqe * dp;
      s.lse2 = stage + std::size_t(local) * pair_elems;
      s.dsum = s.lse2 + std::int64_t(g) * p.sq;
      s.dq_slots = s.dsum + std::int64_t(g) * p.sq;
      return s;
    }
    T* base = stage + std::size_t(local) * pair_elems;
    s.kt = base;
    s.k = s.kt + skp * dp;
    s.vt = s.k + skp * dp;
    s.q = s.vt + skp * dvp;
    s.dout = s.q + std::int64_t(g) * p.sq * dp;
    s.lse2 = s.dout + std::int64_t(g) * p.sq * dvp;
    s.dsum = s.lse2 + std::int64_t(g) * p.sq;
    s.dq_slots = s.dsum + std::int64_t(g) * p.sq;
    return s;
  };
  // Per (batch, q head) shares of the sink gradient, summed in a fixed order at the end.
  // Staging jobs per pair: K^T, K, V^T split into pieces of kv_piece key rows
  // (~4 jobs per thread: b1 h1 had 4 jobs for 16 threads), and each q head
  // into pieces of kQPiece rows (fixed, so the sink-gradient sum below adds
  // the same partial sums in the same order for any thread count).
  constexpr std::int64_t kQPiece = 512;
  const std::int64_t nq = (geo.sqe + kQPiece - 1) / kQPiece;
  std::vector<double> sink_shares(p.sink ? std::size_t(p.b) * p.hq * nq : 0, 0.0);
  const std::int64_t nthreads = cpu_threads();

  for (std::int64_t pair0 = 0; pair0 < npairs; pair0 += chunk) {
    const std::int64_t np = std::min(chunk, npairs - pair0);
    // Stage: per pair, 3 K/V jobs x nkv pieces + g q heads x nq pieces.
    const std::int64_t want = std::max<std::int64_t>(1, (4 * nthreads + 3 * np - 1) / (3 * np));
    const std::int64_t kv_piece =
        std::max(round_up((skp + want - 1) / want, kBlockN), round_up(256, kBlockN));
    const std::int64_t nkv = (skp + kv_piece - 1) / kv_piece;
    const std::int64_t jobs_per_pair = 3 * nkv + g * nq;
    // The three phases hand out a pair's tasks to the same threads first (run_grouped, as the
    // forward's: the threads that stage a pair's K / V / Q / dO mostly run its passes too).
    run_grouped(np, jobs_per_pair, [&](auto next) {
      std::vector<T> orow(dvp), qrow(dp), dorow(dvp);
      for (std::int64_t t; (t = next()) >= 0;) {
        const std::int64_t local = t / jobs_per_pair;
        const std::int64_t job = t % jobs_per_pair;
        const std::int64_t pair = pair0 + local;
        const int bi = static_cast<int>(pair / p.hkv), kh = static_cast<int>(pair % p.hkv);
        const SeqSpan span = seq_span(p, bi);
        const PairStage<T> st = pair_stage(local);
        if (job >= 3 * nkv) {
          const int gi = static_cast<int>((job - 3 * nkv) / nq);
          const std::int64_t piece = (job - 3 * nkv) % nq;
          const std::int64_t r0 = piece * kQPiece, r1 = std::min(geo.sqe, r0 + kQPiece);
          const int h = kh * g + gi;
          const double share = stage_q_head(p, geo, st, bi, h, gi, r0, r1, orow, qrow, dorow);
          if (p.sink) sink_shares[(std::size_t(bi) * p.hq + h) * nq + piece] = share;
          continue;
        }
        const int kind = static_cast<int>(job / nkv);  // 0: K^T, 1: K, 2: V^T
        const std::int64_t c0 = (job % nkv) * kv_piece, c1 = std::min(skp, c0 + kv_piece);
        const int rows = static_cast<int>(std::clamp<std::int64_t>(span.len_k - c0, 0, c1 - c0));
        const int rows_pad = static_cast<int>(c1 - c0);
        const auto [koff, voff] = kv_row_offsets(p, bi, kh, span.k_start + c0);
        if (geo.bf16) {
          if (kind == 0)
            stage_kt_pairs_bf16(p.k, koff, p.k_row_stride, rows, rows_pad, p.d, dp, kBlockN,
                                st.kt16 + c0 * dp, kBlockN);
          else if (kind == 1)
            load_pairs_rows_bf16(p.k, koff, p.k_row_stride, rows, rows_pad, p.d, dp, st.kp16 + c0 * dp);
          else
            stage_kt_pairs_bf16(p.v, voff, p.v_row_stride, rows, rows_pad, p.d_v, dvp, kBlockN,
                                st.vt16 + c0 * dvp, kBlockN);
        } else if (kind == 0) {
          stage_rows_transposed(p.k, p.dtype, koff, p.k_row_stride, rows, rows_pad, p.d, dp, kBlockN,
                                st.kt + c0 * dp);
        } else if (kind == 1) {
          load_rows(p.k, p.dtype, koff, p.k_row_stride, rows, rows_pad, p.d, dp, st.k + c0 * dp);
        } else {
          stage_rows_transposed(p.v, p.dtype, voff, p.v_row_stride, rows, rows_pad, p.d_v, dvp, kBlockN,
                                st.vt + c0 * dvp);
        }
      }
    });
    run_grouped(np, slots, [&](auto next) {
      BwdScratch<T> w(std::max(dp, dvp));
      const Bf16GemmScope amx_scope(geo.bf16);  // AMX tile config for this thread's GEMMs
      for (std::int64_t t; (t = next()) >= 0;) {
        const std::int64_t local = t / slots;
        const int slot = static_cast<int>(t % slots);
        const std::int64_t pair = pair0 + local;
        const PairStage<T> st = pair_stage(local);
        T* dq_slot = st.dq_slots + slot * slot_elems;
        const DqSlotRows dq_rows{dq_written + local * flags_per_pair + slot * std::size_t(g) * p.sq};
        std::fill(dq_rows.written, dq_rows.written + std::size_t(g) * p.sq, std::uint8_t(0));
        for (std::int64_t cb = slot; cb < ncb; cb += slots)
          dkdv_block(p, geo, st, static_cast<int>(pair / p.hkv), static_cast<int>(pair % p.hkv),
                     cb * kBlockN, dq_slot, dq_rows, w);
      }
    });
    // Pass 2 reads every slot of pass 1: a second job (run_grouped returns
    // only when all of pass 1's tasks have finished).
    run_grouped(np, g * nrb, [&](auto next) {
      for (std::int64_t t; (t = next()) >= 0;) {
        const std::int64_t local = t / (g * nrb);
        const int gi = static_cast<int>((t / nrb) % g);
        const std::int64_t i0 = (t % nrb) * kBlockM;
        const std::int64_t pair = pair0 + local;
        dq_reduce(p, geo, pair_stage(local).dq_slots, dq_written + local * flags_per_pair, slots,
                  static_cast<int>(pair / p.hkv), static_cast<int>(pair % p.hkv), gi, i0);
      }
    });
  }
  // dsink[h] = -sum over (batch, row) of exp(sink - lse) * D: P of the sink
  // times the softmax backward's -D (the sink carries no value).
  if (p.sink && p.dsink)
    for (int h = 0; h < p.hq; ++h) {
      double total = 0.0;
      for (int bi = 0; bi < p.b; ++bi)
        for (std::int64_t piece = 0; piece < nq; ++piece)
          total += sink_shares[(std::size_t(bi) * p.hq + h) * nq + piece];
      p.dsink[h] = static_cast<float>(-total);
    }
}

}  // namespace

void backward(const BwdParams& params) {
  with_compute_type(params, [](const BwdParams& p, auto t) { backward_impl<decltype(t)>(p); });
}

}  // namespace orchard::cpu
