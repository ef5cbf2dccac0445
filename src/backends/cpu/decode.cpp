// The CPU decode (KV-cache) kernel: append the new k/v (rotary on k) into the
// cache in place, attend q (rotary applied) over each (batch, kv head, split)
// with the whole query group of that kv head at once, fp32 online softmax;
// then combine the splits. All three steps run on the CPU backend's task pool
// (task_pool.h: OpenMP by default, ORCHARD_CPU_POOL=1 Orchard's own pool).
//
// Attention runs in blocks of kKeyBlock keys: scores of every query row of
// the group against the block (8 keys at a time, vector dot products summed
// by a transpose-reduce), one online-softmax step per row (exp2 on vectors),
// then O += P V, while the next block's cache rows are prefetched. With one
// query row per kv head (MHA, sq 1) bf16 and fp32 caches are read in place
// (bf16 widened to fp32 in registers: decode is memory-bound, a staged copy
// would be one more pass); fp16, and groups of several rows (GQA, sq > 1),
// go through a per-thread fp32 block stage and O += P V as one tile GEMM.
// Row pointers per key, so paged caches need no other path. All arithmetic
// is fp32.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "backends/cpu/fp16_rows.h"
#include "backends/cpu/gemm.h"
#include "backends/cpu/simd.h"
#include "backends/cpu/task_pool.h"
#include "backends/cpu/tile_load.h"
#include "core/decode_backend.h"
#include "orchard/errors.h"
#include "orchard/numeric.h"

// The vector code below is cloned for x86-64-v4 too (ORCHARD_CPU_CLONES_V4):
// the 8-key score accumulators and the 8-vector output chunks need 32 vector
// registers to stay out of memory.

namespace orchard::detail {
namespace {

using cpu::vf32;
using cpu::vi32;
using cpu::vload;
using cpu::vstore;

template <DType T>
struct Elem;
template <>
struct Elem<DType::kBFloat16> {
  using S = std::uint16_t;
  static float load(S v) { return bf16_to_float(v); }
  static S store(float f) { return float_to_bf16(f); }
};
template <>
struct Elem<DType::kFloat16> {
  using S = std::uint16_t;
  static float load(S v) { return fp16_to_float(v); }
  static S store(float f) { return float_to_fp16(f); }
};
template <>
struct Elem<DType::kFloat32> {
  using S = float;
  static float load(S v) { return v; }
  static S store(float f) { return f; }
};

float load_any(const void* base, DType t, std::int64_t i) {
  switch (t) {
    case DType::kBFloat16: return bf16_to_float(static_cast<const std::uint16_t*>(base)[i]);
    case DType::kFloat16: return fp16_to_float(static_cast<const std::uint16_t*>(base)[i]);
    case DType::kFloat32: return static_cast<const float*>(base)[i];
    default: return 0.f;
  }
}

// Rotary of x[0, rotary_dim) at position pos, in fp32.
void rotate(const DecodeParams& p, float* x, std::int64_t pos) {
  const int half = p.rotary_dim / 2;
  if (pos >= p.rotary_seqlen) pos = p.rotary_seqlen - 1;  // validated on the host; a guard only
  for (int i = 0; i < half; ++i) {
    const float c = load_any(p.rotary_cos, p.rotary_dtype, pos * p.cos_row_stride + i);
    const float s = load_any(p.rotary_sin, p.rotary_dtype, pos * p.sin_row_stride + i);
    const int i0 = p.rotary_interleaved ? 2 * i : i;
    const int i1 = p.rotary_interleaved ? 2 * i + 1 : i + half;
    const float x0 = x[i0], x1 = x[i1];
    x[i0] = x0 * c - x1 * s;
    x[i1] = x0 * s + x1 * c;
  }
}


constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Keys per softmax step. Each key row is read once per query row of the
// group, so the block's K and V rows (64 x d x 2 bytes each in bf16) should
// stay in L1/L2 between the rows.
constexpr int kKeyBlock = 64;
// Query rows per task from which a staged block's scores are one tile GEMM (S^T = K Q^T, its N
// the rows padded to 16) rather than per-row dot products. flash_attn_with_kvcache, sk 4096,
// 2 threads, Zen 4, fp32 / bf16 / fp16, d 64 / 128, the call's time with the GEMM over without:
// 4 rows 0.92-1.43 (12 of 16 columns padding), 8 rows 0.90-1.19, 16 rows 0.72-0.96, 32 and
// 64 rows 0.73-0.98 (bench/RESULTS.md, session 40).
constexpr int kScoresGemmMinRows = 16;
constexpr int kMaxHeadDim = 256;  // validated by src/core/kvcache.cpp

// ---- vector pieces (8 fp32 lanes; clones pick AVX-512VL / AVX2 / SSE) -------------------

typedef std::uint16_t vu16 __attribute__((vector_size(16)));
typedef std::uint32_t vu32 __attribute__((vector_size(32)));

// 8 consecutive elements as fp32: float as is; uint16 means bf16 (fp16 is staged first).
ORCHARD_ALWAYS_INLINE vf32 load8(const float* p) { return vload<vf32>(p); }
ORCHARD_ALWAYS_INLINE vf32 load8(const std::uint16_t* p) {
  const vu32 w = __builtin_convertvector(vload<vu16>(p), vu32) << 16;
  return (vf32)w;
}

// Lane j = the sum of a[j]'s lanes (a transpose-reduce: 7 shuffle pairs, 7 adds).
ORCHARD_ALWAYS_INLINE vf32 sum_lanes_8x8(const vf32* a) {
  const vi32 e1 = {0, 8, 2, 10, 4, 12, 6, 14}, o1 = {1, 9, 3, 11, 5, 13, 7, 15};
  const vi32 e2 = {0, 1, 8, 9, 4, 5, 12, 13}, o2 = {2, 3, 10, 11, 6, 7, 14, 15};
  const vi32 e3 = {0, 1, 2, 3, 8, 9, 10, 11}, o3 = {4, 5, 6, 7, 12, 13, 14, 15};
  vf32 b[4], c[2];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)
    b[i] = __builtin_shuffle(a[2 * i], a[2 * i + 1], e1) + __builtin_shuffle(a[2 * i], a[2 * i + 1], o1);
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)
    c[i] = __builtin_shuffle(b[2 * i], b[2 * i + 1], e2) + __builtin_shuffle(b[2 * i], b[2 * i + 1], o2);
  return __builtin_shuffle(c[0], c[1], e3) + __builtin_shuffle(c[0], c[1], o3);
}

// Cache rows: one head's consecutive keys are hkv * d elements apart, often a
// whole 4 KB page (fp32, 8 heads, d 128), where the hardware prefetchers stop
// (tile_load.h's prefetch_bytes). Without the prefetches below, perf put 64 %
// of a bf16 GQA call in load stalls; with them (prefetcht1; t0 was slower),
// b1 s4k d128 1 thread: bf16 GQA 32:4 4.4 -> 1.5 ms, fp32 MHA 8:8 4.2 -> 1.4 ms.
ORCHARD_ALWAYS_INLINE void prefetch_row(const void* row, int bytes) { cpu::prefetch_bytes(row, bytes); }

// s[j] = q . keys[j] over dk columns (dk % 8 == 0), j < nb8 (nb8 % 8 == 0);
// prefetches next[j] (row_bytes each) for j < n_next along the way.
template <class S>
ORCHARD_ALWAYS_INLINE void block_scores(const float* q, int dk, const S* const* keys, int nb8, float* s,
                                        const S* const* next, int n_next, int row_bytes) {
  for (int j = 0; j < nb8; j += 8) {
    for (int u = j; u < std::min(j + 8, n_next); ++u) prefetch_row(next[u], row_bytes);
    const S* kr[8];
#pragma GCC unroll 8
    for (int u = 0; u < 8; ++u) kr[u] = keys[j + u];
    vf32 acc[8] = {};
    for (int c = 0; c < dk; c += 8) {
      const vf32 qv = vload<vf32>(q + c);
#pragma GCC unroll 8
      for (int u = 0; u < 8; ++u) acc[u] += qv * load8(kr[u] + c);
    }
    vstore(s + j, sum_lanes_8x8(acc));
  }
}

// o[c0, c0 + 8 NV) += sum over j < nb of p[j] * vals[j][c0, c0 + 8 NV);
// prefetches next[j] for j < n_next along the way.
template <class S, int NV>
ORCHARD_ALWAYS_INLINE void pv_chunk(const float* p, int nb, const S* const* vals, int c0, float* o,
                                    const S* const* next, int n_next, int row_bytes) {
  vf32 acc[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) acc[v] = vload<vf32>(o + c0 + 8 * v);
  for (int j = 0; j < nb; ++j) {
    if (j < n_next) prefetch_row(next[j], row_bytes);
    const vf32 pj = vf32{} + p[j];
    const S* vr = vals[j] + c0;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[v] += pj * load8(vr + 8 * v);
  }
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) vstore(o + c0 + 8 * v, acc[v]);
}

// The prefetches ride on the first column chunk only.
template <class S>
ORCHARD_ALWAYS_INLINE void block_pv(const float* p, int nb, const S* const* vals, int dk, float* o,
                                    const S* const* next, int n_next, int row_bytes) {
  int c = 0;
  for (; c + 64 <= dk; c += 64, n_next = 0) pv_chunk<S, 8>(p, nb, vals, c, o, next, n_next, row_bytes);
  switch ((dk - c) / 8) {
    case 7: pv_chunk<S, 7>(p, nb, vals, c, o, next, n_next, row_bytes); break;
    case 6: pv_chunk<S, 6>(p, nb, vals, c, o, next, n_next, row_bytes); break;
    case 5: pv_chunk<S, 5>(p, nb, vals, c, o, next, n_next, row_bytes); break;
    case 4: pv_chunk<S, 4>(p, nb, vals, c, o, next, n_next, row_bytes); break;
    case 3: pv_chunk<S, 3>(p, nb, vals, c, o, next, n_next, row_bytes); break;
    case 2: pv_chunk<S, 2>(p, nb, vals, c, o, next, n_next, row_bytes); break;
    case 1: pv_chunk<S, 1>(p, nb, vals, c, o, next, n_next, row_bytes); break;
    default: break;
  }
}

// ---- one key block for every row of a task -----------------------------------------------

// What a task's rows carry from block to block (per-thread, DecodeScratch).
struct RowState {
  const float* q;     // rows x ld, q rotated, fp32, zero-padded to ld
  float* o;           // rows x ld, unnormalised output
  float* s;           // rows x kKeyBlock scores, then P
  const float* qt;    // ld x rows_pad: q transposed, zero rows past `rows` (scores_gemm only)
  float* st;          // kKeyBlock x rows_pad: a block's scores transposed (scores_gemm only)
  int rows_pad;       // rows rounded up to kGemmNMultiple (scores_gemm only)
  bool scores_gemm;   // staged blocks: all rows' scores as one GEMM (kScoresGemmMinRows)
  float* m;           // running max, log2 units
  float* l;           // running sum
  const std::int64_t* vb;  // visible keys [vb, ve) per row
  const std::int64_t* ve;
  const float* slope;      // ALiBi slope per row (p.alibi_slopes set)
  std::int64_t diag;       // n_keys - sq
  int rows, groups, ld;
};

// A block's keys [j0, j0 + nb): row pointers keys[j] / vals[j], j < nb8
// (the ones past nb point at zeros), dk columns each (d, or the fp16 / bf16
// stage's width). next_*: the next block's n_next rows (row_bytes each) to
// prefetch while this one computes (n_next = 0: none, e.g. staged already).
template <class S>
struct KeyBlock {
  std::int64_t j0;
  int nb, dk;
  const S* const* keys;
  const S* const* vals;
  const void* const* next_keys;
  const void* const* next_vals;
  int n_next, row_bytes;
  bool staged;  // vals[j] = vals[0] + j * dk (the fp32 block stage)
};

template <class S>
ORCHARD_ALWAYS_INLINE void attend_block_body(const DecodeParams& p, const RowState& st, const KeyBlock<S>& kb) {
  const std::int64_t j0 = kb.j0;
  const int nb = kb.nb, dk = kb.dk;
  int n_next = kb.n_next;  // prefetched by the first row that computes
  const S* const* next_k = reinterpret_cast<const S* const*>(kb.next_keys);
  const S* const* next_v = reinterpret_cast<const S* const*>(kb.next_vals);
  const int nb8 = (nb + 7) / 8 * 8;
  const bool plain = !(p.softcap > 0.f) && !p.alibi_slopes;
  const float c_plain = p.scale * kLog2e;
  const vi32 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  // Several rows over a staged block: O += P V as one tile GEMM (gemm.h's
  // register-blocked kernel reads each V row once per 6 rows, not once per row).
  const bool pv_gemm = kb.staged && st.rows > 1 && dk % cpu::kGemmNMultiple == 0;
  // Several rows over a staged block: S^T = K Q^T as one tile GEMM (each K row is read once per
  // register block of rows, not once per row), transposed into the rows' score lines.
  const bool scores_gemm = std::is_same_v<S, float> && kb.staged && st.scores_gemm;
  if constexpr (std::is_same_v<S, float>) {
    if (scores_gemm) {
      cpu::gemm(nb8, st.rows_pad, dk, kb.keys[0], dk, st.qt, st.rows_pad, st.st, st.rows_pad, false);
      for (int r = 0; r < st.rows; ++r)
        for (int j = 0; j < nb8; ++j) st.s[std::int64_t(r) * kKeyBlock + j] = st.st[std::int64_t(j) * st.rows_pad + r];
    }
  }
  for (int r = 0; r < st.rows; ++r) {
    const std::int64_t b0 = std::max(st.vb[r], j0), b1 = std::min(st.ve[r], j0 + nb);
    float* sr = st.s + std::int64_t(r) * kKeyBlock;
    if (b0 >= b1) {  // the row sees none of the block's keys
      if (pv_gemm) std::fill_n(sr, nb, 0.f);
      continue;
    }
    if (!scores_gemm) block_scores(st.q + std::int64_t(r) * st.ld, dk, kb.keys, nb8, sr, next_k, n_next, kb.row_bytes);
    // Log2-domain scores; keys the row does not see (and the padding) -> -inf.
    const int lo = static_cast<int>(b0 - j0), hi = static_cast<int>(b1 - j0);
    if (plain) {
      for (int j = 0; j < nb8; j += 8) {
        const vi32 col = lane + j;
        const vf32 x = vload<vf32>(sr + j) * c_plain;
        vstore(sr + j, (col >= lo) & (col < hi) ? x : vf32{} + kNegInf);
      }
    } else {
      const std::int64_t i = r / st.groups;
      for (int j = 0; j < nb8; ++j) {
        if (j < lo || j >= hi) {
          sr[j] = kNegInf;
          continue;
        }
        float sc = sr[j] * p.scale;
        if (p.softcap > 0.f) sc = p.softcap * std::tanh(sc / p.softcap);
        if (p.alibi_slopes) {
          const std::int64_t dist = i + st.diag - (j0 + j);
          sc -= st.slope[r] * static_cast<float>(dist < 0 ? -dist : dist);
        }
        sr[j] = sc * kLog2e;
      }
    }
    // Online softmax step; a NaN score (NaN / inf in q or k) reaches the output.
    vf32 vmax = vf32{} + kNegInf;
    for (int j = 0; j < nb8; j += 8) {
      const vf32 x = vload<vf32>(sr + j);
      vmax = (x > vmax) | (x != x) ? x : vmax;
    }
    const float tile_max = cpu::hmax(vmax), m_old = st.m[r];
    const float m_new = (tile_max > m_old || tile_max != tile_max) ? tile_max : m_old;
    vf32 vsum = vf32{};
    for (int j = 0; j < nb8; j += 8) {
      const vf32 e = cpu::exp2_f32(vload<vf32>(sr + j) - m_new);  // -inf -> 0
      vstore(sr + j, e);
      vsum += e;
    }
    const float alpha = m_old == kNegInf ? 0.f : std::exp2(m_old - m_new);
    st.l[r] = st.l[r] * alpha + cpu::hsum(vsum);
    st.m[r] = m_new;
    float* orow = st.o + std::int64_t(r) * st.ld;
    if (alpha != 1.f)
      for (int c = 0; c < dk; c += 8) vstore(orow + c, vload<vf32>(orow + c) * alpha);
    if (!pv_gemm) block_pv(sr, nb, kb.vals, dk, orow, next_v, n_next, kb.row_bytes);
    n_next = 0;
  }
  if constexpr (std::is_same_v<S, float>)
    if (pv_gemm) cpu::gemm(st.rows, dk, nb, st.s, kKeyBlock, kb.vals[0], dk, st.o, st.ld, true);
}

ORCHARD_CPU_CLONES_V4
void attend_block(const DecodeParams& p, const RowState& st, const KeyBlock<float>& kb) {
  attend_block_body(p, st, kb);
}

ORCHARD_CPU_CLONES_V4
void attend_block(const DecodeParams& p, const RowState& st, const KeyBlock<std::uint16_t>& kb) {
  attend_block_body(p, st, kb);
}

// ---- tasks -------------------------------------------------------------------------------

// Per-thread buffers of the attention tasks, kept between calls (grown only).
struct DecodeScratch {
  std::vector<float> q, o, s, m, l, slope, stage, qt, st;
  std::vector<std::int64_t> vb, ve;
  std::vector<const void*> kp, vp;
  static DecodeScratch& get(int rows, int ld, bool stage) {
    thread_local DecodeScratch w;
    const std::size_t n = std::size_t(rows) * ld;
    if (w.q.size() < n) w.q.resize(n), w.o.resize(n);
    if (w.s.size() < std::size_t(rows) * kKeyBlock) w.s.resize(std::size_t(rows) * kKeyBlock);
    if (w.m.size() < std::size_t(rows))
      w.m.resize(rows), w.l.resize(rows), w.slope.resize(rows), w.vb.resize(rows), w.ve.resize(rows);
    if (stage && w.stage.size() < std::size_t(2) * kKeyBlock * ld) w.stage.resize(std::size_t(2) * kKeyBlock * ld);
    w.kp.resize(2 * kKeyBlock), w.vp.resize(2 * kKeyBlock);
    if (stage && rows >= kScoresGemmMinRows) {
      const std::size_t rows_pad = (rows + cpu::kGemmNMultiple - 1) / cpu::kGemmNMultiple * cpu::kGemmNMultiple;
      if (w.qt.size() < rows_pad * ld) w.qt.resize(rows_pad * ld);
      if (w.st.size() < rows_pad * kKeyBlock) w.st.resize(rows_pad * kKeyBlock);
    }
    return w;
  }
};

// Elements past a block's last key: zeros in every dtype.
alignas(64) const float kZeroRow[kMaxHeadDim] = {};

// One cache row as fp32 into the block stage (d % 8 == 0).
ORCHARD_CPU_CLONES_V4 void stage_row_bf16(const std::uint16_t* src, int d, float* dst) {
  for (int c = 0; c < d; c += 8) vstore(dst + c, load8(src + c));
}
template <DType T>
void stage_row(const typename Elem<T>::S* src, int d, float* dst) {
  if constexpr (T == DType::kBFloat16)
    stage_row_bf16(src, d, dst);
  else if constexpr (T == DType::kFloat16)
    cpu::fp16_row_to_float(src, d, dst);
  else
    for (int c = 0; c < d; ++c) dst[c] = Elem<T>::load(src[c]);
}

template <DType T>
void attend_task(const DecodeParams& p, std::int64_t task) {
  using E = Elem<T>;
  using S = typename E::S;
  // Rows are copied into an fp32 block stage for fp16 (converted once), and
  // when several query rows read each key (GQA, sq > 1): then each key row is
  // converted once, not once per query row, and O += P V is one tile GEMM.
  // 1 thread, CPU time, b1 s4k hq32 hkv4 d128 (bench/cpu_decode_micro.cpp):
  // bf16 2.16 -> 1.73 ms staged; fp32 3.04 -> 2.96 (its cost is the reads).
  const int groups = p.hq / p.hkv;
  const int rows = groups * p.sq;  // local row r: query row i = r / groups, head h_kv * groups + r % groups
  const bool stage = T == DType::kFloat16 || rows > 1;
  const int d = p.d;               // a multiple of 8 (validated)
  const int split = static_cast<int>(task % p.num_splits);
  const int hk = static_cast<int>((task / p.num_splits) % p.hkv);
  const int bi = static_cast<int>(task / (static_cast<std::int64_t>(p.num_splits) * p.hkv));
  const DecodeSeq s = decode_seq(p, bi);
  std::int64_t kb, ke;
  decode_split_range(s.n_keys, split, p.num_splits, 64, kb, ke);

  DecodeScratch& w = DecodeScratch::get(rows, d, stage);
  std::int64_t ub = s.n_keys, ue = 0;  // union of the rows' visible keys
  for (int r = 0; r < rows; ++r) {
    const int i = r / groups, h = hk * groups + r % groups;
    const S* qp = static_cast<const S*>(p.q) + bi * p.q_batch_stride + i * p.q_row_stride + h * p.q_head_stride;
    float* qr = &w.q[static_cast<std::size_t>(r) * d];
    for (int c = 0; c < d; ++c) qr[c] = E::load(qp[c]);
    if (p.rotary_dim > 0) {
      rotate(p, qr, decode_q_rotary_pos(p, s, i));
      for (int c = 0; c < d; ++c) qr[c] = E::load(E::store(qr[c]));  // q is rotated in its own dtype
    }
    decode_visible(p, s.n_keys, i, w.vb[r], w.ve[r]);
    if (w.vb[r] < w.ve[r]) ub = std::min(ub, w.vb[r]), ue = std::max(ue, w.ve[r]);
    if (p.alibi_slopes) w.slope[r] = p.alibi_slopes[bi * p.alibi_batch_stride + h];
  }
  std::fill_n(w.o.begin(), std::size_t(rows) * d, 0.f);
  std::fill_n(w.m.begin(), rows, kNegInf);
  std::fill_n(w.l.begin(), rows, 0.f);
  if (p.sink && split == 0)  // a sink starts the row's softmax as a key with no value (split 0 only)
    for (int r = 0; r < rows; ++r) w.m[r] = p.sink[hk * groups + r % groups] * kLog2e, w.l[r] = 1.f;
  const bool scores_gemm = stage && rows >= kScoresGemmMinRows;
  const int rows_pad = (rows + cpu::kGemmNMultiple - 1) / cpu::kGemmNMultiple * cpu::kGemmNMultiple;
  if (scores_gemm) {  // q^T, zero columns past the rows
    std::fill_n(w.qt.begin(), std::size_t(rows_pad) * d, 0.f);
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < d; ++c) w.qt[std::size_t(c) * rows_pad + r] = w.q[std::size_t(r) * d + c];
  }
  const RowState st{w.q.data(),  w.o.data(),     w.s.data(),  w.qt.data(), w.st.data(), rows_pad,
                    scores_gemm, w.m.data(),     w.l.data(),  w.vb.data(), w.ve.data(), w.slope.data(),
                    s.n_keys - p.sq, rows, groups, d};

  // Row pointers of this block and the next (double-buffered: the next
  // block's rows are prefetched while this one computes).
  const S* zero = reinterpret_cast<const S*>(kZeroRow);
  const S** kp[2] = {reinterpret_cast<const S**>(w.kp.data()),
                     reinterpret_cast<const S**>(w.kp.data()) + kKeyBlock};
  const S** vp[2] = {reinterpret_cast<const S**>(w.vp.data()),
                     reinterpret_cast<const S**>(w.vp.data()) + kKeyBlock};
  const std::int64_t jb = std::max(kb, ub), je = std::min(ke, ue);
  auto gather = [&](std::int64_t j0, int buf) {
    if (j0 >= je) return 0;
    const int nb = static_cast<int>(std::min<std::int64_t>(kKeyBlock, je - j0));
    for (int j = 0; j < nb; ++j) {
      const std::int64_t row = s.leftpad + j0 + j;
      kp[buf][j] = static_cast<const S*>(p.k_cache) +
                   decode_cache_row_offset(p, bi, row, p.kc_batch_stride, p.kc_row_stride) + hk * p.kc_head_stride;
      vp[buf][j] = static_cast<const S*>(p.v_cache) +
                   decode_cache_row_offset(p, bi, row, p.vc_batch_stride, p.vc_row_stride) + hk * p.vc_head_stride;
    }
    for (int j = nb; j < kKeyBlock; ++j) kp[buf][j] = vp[buf][j] = zero;
    return nb;
  };
  const int row_bytes = d * static_cast<int>(sizeof(S));
  int cur = 0, nb = gather(jb, 0);
  for (std::int64_t j0 = jb; j0 < je; j0 += kKeyBlock, cur ^= 1) {
    const int n_next = gather(j0 + kKeyBlock, cur ^ 1);
    const void* const* next_k = reinterpret_cast<const void* const*>(kp[cur ^ 1]);
    const void* const* next_v = reinterpret_cast<const void* const*>(vp[cur ^ 1]);
    if (stage) {
      float* kf = w.stage.data();
      float* vf = kf + std::size_t(kKeyBlock) * d;
      const float* kfp[kKeyBlock];
      const float* vfp[kKeyBlock];
      for (int j = 0; j < (nb + 7) / 8 * 8; ++j) {  // the rows the block reads
        if (j < n_next) prefetch_row(next_k[j], row_bytes), prefetch_row(next_v[j], row_bytes);
        stage_row<T>(kp[cur][j], d, kf + j * d);
        stage_row<T>(vp[cur][j], d, vf + j * d);
        kfp[j] = kf + j * d, vfp[j] = vf + j * d;
      }
      attend_block(p, st, KeyBlock<float>{j0, nb, d, kfp, vfp, nullptr, nullptr, 0, 0, true});
    } else {
      attend_block(p, st, KeyBlock<S>{j0, nb, d, kp[cur], vp[cur], next_k, next_v, n_next, row_bytes, false});
    }
    nb = n_next;
  }

  for (int r = 0; r < rows; ++r) {
    const int i = r / groups, h = hk * groups + r % groups;
    // Only an exact 0 sum means "no visible key" (out 0, lse -inf); a NaN sum (NaN / inf in q or
    // k) reaches out and lse, as in the tiled forward.
    const float l = w.l[r];
    const float inv = l != 0.f ? 1.f / l : 0.f;
    const float lse = l != 0.f ? (w.m[r] + std::log2(l)) * kLn2 : kNegInf;
    const float* ar = &w.o[static_cast<std::size_t>(r) * d];
    if (p.num_splits == 1) {
      S* op = static_cast<S*>(p.out) + bi * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
      for (int c = 0; c < d; ++c) op[c] = E::store(ar[c] * inv);
      if (p.lse) p.lse[bi * p.lse_batch_stride + h * p.lse_head_stride + i] = lse;
    } else {
      const std::size_t idx = ((static_cast<std::size_t>(split) * p.b + bi) * p.hq + h) * p.sq + i;
      float* oa = p.out_accum + idx * d;
      for (int c = 0; c < d; ++c) oa[c] = ar[c] * inv;
      p.lse_accum[idx] = lse;
    }
  }
}

// Items of `work` elements each, cut into tasks of ~16k elements: below that
// one task, which run_parallel runs on the calling thread (no wake-up).
template <class Item>
void for_items(std::int64_t n, std::int64_t work, Item&& item) {
  const std::int64_t per = std::max<std::int64_t>(1, 16384 / std::max<std::int64_t>(1, work));
  cpu::run_parallel((n + per - 1) / per, [&](int, cpu::TaskQueue& tasks) {
    for (std::int64_t t; (t = tasks.next()) >= 0;)
      for (std::int64_t w = t * per; w < std::min(n, (t + 1) * per); ++w) item(w);
  });
}

template <DType T>
void append(const DecodeParams& p) {
  using E = Elem<T>;
  using S = typename E::S;
  const std::int64_t n = static_cast<std::int64_t>(p.b) * p.s_new * p.hkv;
  for_items(n, 2 * p.d, [&](std::int64_t w) {
    const int h = static_cast<int>(w % p.hkv);
    const int t = static_cast<int>((w / p.hkv) % p.s_new);
    const int bi = static_cast<int>(w / (static_cast<std::int64_t>(p.hkv) * p.s_new));
    const DecodeSeq s = decode_seq(p, bi);
    const std::int64_t row = s.seqlen + t;
    const S* kn = static_cast<const S*>(p.k_new) + bi * p.kn_batch_stride + t * p.kn_row_stride + h * p.kn_head_stride;
    const S* vn = static_cast<const S*>(p.v_new) + bi * p.vn_batch_stride + t * p.vn_row_stride + h * p.vn_head_stride;
    S* kc = static_cast<S*>(p.k_cache) + decode_cache_row_offset(p, bi, row, p.kc_batch_stride, p.kc_row_stride) +
            h * p.kc_head_stride;
    S* vc = static_cast<S*>(p.v_cache) + decode_cache_row_offset(p, bi, row, p.vc_batch_stride, p.vc_row_stride) +
            h * p.vc_head_stride;
    if (p.rotary_dim > 0) {
      float x[kMaxHeadDim];
      for (int c = 0; c < p.d; ++c) x[c] = E::load(kn[c]);
      rotate(p, x, row);
      for (int c = 0; c < p.d; ++c) kc[c] = E::store(x[c]);
    } else {
      for (int c = 0; c < p.d; ++c) kc[c] = kn[c];
    }
    for (int c = 0; c < p.d; ++c) vc[c] = vn[c];
  });
}

template <DType T>
void attend(const DecodeParams& p) {
  const std::int64_t tasks = static_cast<std::int64_t>(p.b) * p.hkv * p.num_splits;
  cpu::run_parallel(tasks, [&](int, cpu::TaskQueue& q) {
    for (std::int64_t t; (t = q.next()) >= 0;) attend_task<T>(p, t);
  });
}

template <DType T>
void combine(const DecodeParams& p) {
  using E = Elem<T>;
  using S = typename E::S;
  const std::int64_t n = static_cast<std::int64_t>(p.b) * p.hq * p.sq;
  const std::size_t stride = static_cast<std::size_t>(n);
  for_items(n, std::int64_t(p.d) * p.num_splits, [&](std::int64_t idx) {
    const int i = static_cast<int>(idx % p.sq);
    const int h = static_cast<int>((idx / p.sq) % p.hq);
    const int bi = static_cast<int>(idx / (static_cast<std::int64_t>(p.sq) * p.hq));
    // A split whose partial is NaN (NaN / inf in q or in a key it saw) makes the row NaN: a
    // max over the splits would drop it (std::max(x, NaN) is x) and zero a row of NaN splits.
    float mx = kNegInf;
    bool nan = false;
    for (int sp = 0; sp < p.num_splits; ++sp) {
      const float ls = p.lse_accum[sp * stride + idx];
      nan |= ls != ls;
      mx = std::max(mx, ls);
    }
    float sum = 0.f;
    if (mx != kNegInf)
      for (int sp = 0; sp < p.num_splits; ++sp) sum += std::exp(p.lse_accum[sp * stride + idx] - mx);
    const float lse = nan ? std::numeric_limits<float>::quiet_NaN() : mx == kNegInf ? kNegInf : mx + std::log(sum);
    S* op = static_cast<S*>(p.out) + bi * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
    if (nan) {
      std::fill_n(op, p.d, E::store(std::numeric_limits<float>::quiet_NaN()));
      if (p.lse) p.lse[bi * p.lse_batch_stride + h * p.lse_head_stride + i] = lse;
      return;
    }
    for (int c = 0; c < p.d; ++c) {
      float o = 0.f;
      if (mx != kNegInf)
        for (int sp = 0; sp < p.num_splits; ++sp) {
          const float ls = p.lse_accum[sp * stride + idx];
          if (ls != kNegInf) o += std::exp(ls - lse) * p.out_accum[(sp * stride + idx) * p.d + c];
        }
      op[c] = E::store(o);
    }
    if (p.lse) p.lse[bi * p.lse_batch_stride + h * p.lse_head_stride + i] = lse;
  });
}

template <DType T>
void run(const DecodeParams& p) {
  if (p.s_new > 0) append<T>(p);
  if (p.sq == 0 || p.hq == 0) return;
  attend<T>(p);
  if (p.num_splits > 1) combine<T>(p);
}

}  // namespace

int decode_cpu_threads() { return cpu::cpu_threads(); }

void decode_cpu(const DecodeParams& p) {
  switch (p.dtype) {
    case DType::kBFloat16: return run<DType::kBFloat16>(p);
    case DType::kFloat16: return run<DType::kFloat16>(p);
    case DType::kFloat32: return run<DType::kFloat32>(p);
    default: throw Error(ErrorKind::kNotImplemented, std::string("decode: dtype ") + dtype_name(p.dtype) + " not supported");
  }
}

}  // namespace orchard::detail
