// The CPU decode (KV-cache) kernel: append the new k/v (rotary on k) into the
// cache in place, attend q (rotary applied) over each (batch, kv head, split)
// with the whole query group of that kv head at once, so each cache row is
// converted once per group, fp32 online softmax; then combine the splits.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "core/decode_backend.h"
#include "orchard/errors.h"
#include "orchard/numeric.h"

#if defined(ORCHARD_WITH_OPENMP)
#include <omp.h>
#endif

namespace orchard::detail {
namespace {

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

template <DType T>
void append(const DecodeParams& p) {
  using E = Elem<T>;
  using S = typename E::S;
  const std::int64_t n = static_cast<std::int64_t>(p.b) * p.s_new * p.hkv;
#if defined(ORCHARD_WITH_OPENMP)
#pragma omp parallel for schedule(static) if (n * p.d > 32768)
#endif
  for (std::int64_t w = 0; w < n; ++w) {
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
      float x[256];
      for (int c = 0; c < p.d; ++c) x[c] = E::load(kn[c]);
      rotate(p, x, row);
      for (int c = 0; c < p.d; ++c) kc[c] = E::store(x[c]);
    } else {
      for (int c = 0; c < p.d; ++c) kc[c] = kn[c];
    }
    for (int c = 0; c < p.d; ++c) vc[c] = vn[c];
  }
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <DType T>
void attend(const DecodeParams& p) {
  using E = Elem<T>;
  using S = typename E::S;
  const int groups = p.hq / p.hkv;
  const int rows = groups * p.sq;  // local row r: query row i = r / groups, head h_kv * groups + r % groups
  const int d = p.d;
  const std::int64_t tasks = static_cast<std::int64_t>(p.b) * p.hkv * p.num_splits;
#if defined(ORCHARD_WITH_OPENMP)
#pragma omp parallel for schedule(dynamic, 1)
#endif
  for (std::int64_t task = 0; task < tasks; ++task) {
    const int split = static_cast<int>(task % p.num_splits);
    const int hk = static_cast<int>((task / p.num_splits) % p.hkv);
    const int bi = static_cast<int>(task / (static_cast<std::int64_t>(p.num_splits) * p.hkv));
    const DecodeSeq s = decode_seq(p, bi);
    std::int64_t kb, ke;
    decode_split_range(s.n_keys, split, p.num_splits, 64, kb, ke);

    std::vector<float> q(static_cast<std::size_t>(rows) * d), acc(static_cast<std::size_t>(rows) * d, 0.f);
    std::vector<float> m(rows, kNegInf), l(rows, 0.f), slope(rows, 0.f), krow(d), vrow(d);
    std::vector<std::int64_t> vb(rows), ve(rows);
    for (int r = 0; r < rows; ++r) {
      const int i = r / groups, h = hk * groups + r % groups;
      const S* qp = static_cast<const S*>(p.q) + bi * p.q_batch_stride + i * p.q_row_stride + h * p.q_head_stride;
      float* qr = &q[static_cast<std::size_t>(r) * d];
      for (int c = 0; c < d; ++c) qr[c] = E::load(qp[c]);
      if (p.rotary_dim > 0) {
        rotate(p, qr, decode_q_rotary_pos(p, s, i));
        for (int c = 0; c < d; ++c) qr[c] = E::load(E::store(qr[c]));  // q is rotated in its own dtype
      }
      decode_visible(p, s.n_keys, i, vb[r], ve[r]);
      if (p.alibi_slopes) slope[r] = p.alibi_slopes[bi * p.alibi_batch_stride + h];
    }
    const std::int64_t diag = s.n_keys - p.sq;
    for (std::int64_t j = kb; j < ke; ++j) {
      bool any = false;
      for (int r = 0; r < rows; ++r) any = any || (j >= vb[r] && j < ve[r]);
      if (!any) continue;
      const std::int64_t row = s.leftpad + j;
      const S* kp = static_cast<const S*>(p.k_cache) +
                    decode_cache_row_offset(p, bi, row, p.kc_batch_stride, p.kc_row_stride) + hk * p.kc_head_stride;
      const S* vp = static_cast<const S*>(p.v_cache) +
                    decode_cache_row_offset(p, bi, row, p.vc_batch_stride, p.vc_row_stride) + hk * p.vc_head_stride;
      for (int c = 0; c < d; ++c) krow[c] = E::load(kp[c]);
      for (int c = 0; c < d; ++c) vrow[c] = E::load(vp[c]);
      for (int r = 0; r < rows; ++r) {
        if (j < vb[r] || j >= ve[r]) continue;
        const float* qr = &q[static_cast<std::size_t>(r) * d];
        float dot = 0.f;
        for (int c = 0; c < d; ++c) dot += qr[c] * krow[c];
        float sc = dot * p.scale;
        if (p.softcap > 0.f) sc = p.softcap * std::tanh(sc / p.softcap);
        if (p.alibi_slopes) {
          const std::int64_t dist = r / groups + diag - j;
          sc -= slope[r] * static_cast<float>(dist < 0 ? -dist : dist);
        }
        float* ar = &acc[static_cast<std::size_t>(r) * d];
        if (sc > m[r]) {
          const float alpha = std::exp(m[r] - sc);  // exp(-inf) = 0 on the first key
          for (int c = 0; c < d; ++c) ar[c] *= alpha;
          l[r] *= alpha;
          m[r] = sc;
        }
        const float pj = std::exp(sc - m[r]);
        l[r] += pj;
        for (int c = 0; c < d; ++c) ar[c] += pj * vrow[c];
      }
    }
    for (int r = 0; r < rows; ++r) {
      const int i = r / groups, h = hk * groups + r % groups;
      const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
      const float lse = l[r] > 0.f ? m[r] + std::log(l[r]) : kNegInf;
      const float* ar = &acc[static_cast<std::size_t>(r) * d];
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
}

template <DType T>
void combine(const DecodeParams& p) {
  using E = Elem<T>;
  using S = typename E::S;
  const std::int64_t n = static_cast<std::int64_t>(p.b) * p.hq * p.sq;
  const std::size_t stride = static_cast<std::size_t>(n);
#if defined(ORCHARD_WITH_OPENMP)
#pragma omp parallel for schedule(static) if (n * p.d > 32768)
#endif
  for (std::int64_t idx = 0; idx < n; ++idx) {
    const int i = static_cast<int>(idx % p.sq);
    const int h = static_cast<int>((idx / p.sq) % p.hq);
    const int bi = static_cast<int>(idx / (static_cast<std::int64_t>(p.sq) * p.hq));
    float mx = kNegInf;
    for (int sp = 0; sp < p.num_splits; ++sp) mx = std::max(mx, p.lse_accum[sp * stride + idx]);
    float sum = 0.f;
    if (mx != kNegInf)
      for (int sp = 0; sp < p.num_splits; ++sp) sum += std::exp(p.lse_accum[sp * stride + idx] - mx);
    const float lse = mx == kNegInf ? kNegInf : mx + std::log(sum);
    S* op = static_cast<S*>(p.out) + bi * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
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
  }
}

template <DType T>
void run(const DecodeParams& p) {
  if (p.s_new > 0) append<T>(p);
  if (p.sq == 0 || p.hq == 0) return;
  attend<T>(p);
  if (p.num_splits > 1) combine<T>(p);
}

}  // namespace

int decode_cpu_threads() {
#if defined(ORCHARD_WITH_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void decode_cpu(const DecodeParams& p) {
  switch (p.dtype) {
    case DType::kBFloat16: return run<DType::kBFloat16>(p);
    case DType::kFloat16: return run<DType::kFloat16>(p);
    case DType::kFloat32: return run<DType::kFloat32>(p);
    default: throw Error(ErrorKind::kNotImplemented, std::string("decode: dtype ") + dtype_name(p.dtype) + " not supported");
  }
}

}  // namespace orchard::detail
