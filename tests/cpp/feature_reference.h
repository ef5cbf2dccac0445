// Dense reference for attention with every feature of FwdParams: sliding
// window, softcap, ALiBi, sinks, attn_bias / boolean mask, varlen and a value
// head dim d_v != d. It materialises each row's scores in double with its own
// loops (nothing shared with the kernels) and differentiates analytically,
// dsink included. Precision policies (Exact / LowPrecision) come from
// reference.h, so the same code gives the naive same-precision result that
// the tolerance rule compares against.
//
// Tensors are packed rows: q / out / dout (total_q, hq, d or dv), k / v
// (total_k, hkv, d or dv), contiguous; sequence bi owns rows [q_start[bi],
// q_start[bi] + len_q[bi]). A batch without varlen is b sequences of sq rows.
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

#include "orchard/philox.h"
#include "reference.h"

namespace orchard::test {

struct FeatureProblem {
  int b = 1, hq = 1, hkv = 1, d = 1, dv = 1;
  std::vector<int> q_start, k_start, len_q, len_k;  // per sequence
  std::vector<std::int64_t> diag;                   // per sequence: causal/window/ALiBi diagonal
  int total_q = 0, total_k = 0;
  double scale = 1.0;
  double softcap = 0.0;                      // > 0: softcap * tanh(s / softcap)
  std::int64_t window_left = -1, window_right = -1;  // causal is window_right = 0
  std::vector<double> alibi_slope;           // (b * hq), empty = no ALiBi
  std::vector<double> sink;                  // (hq), empty = no sink
  // Additive bias of (sequence, head, local row, local col), -inf = masked; empty = none.
  std::function<double(int, int, int, int)> bias;
  double dropout_p = 0.0;
  std::uint64_t seed = 0, offset = 0;

  // Sequences from their lengths (packed back to back).
  void set_lengths(const std::vector<int>& lq, const std::vector<int>& lk) {
    b = static_cast<int>(lq.size());
    len_q = lq;
    len_k = lk;
    q_start.assign(b, 0);
    k_start.assign(b, 0);
    total_q = total_k = 0;
    for (int i = 0; i < b; ++i) {
      q_start[i] = total_q;
      k_start[i] = total_k;
      total_q += lq[i];
      total_k += lk[i];
    }
  }
  std::size_t q_index(int row, int h, int c, int width) const {
    return (std::size_t(row) * hq + h) * width + c;
  }
  std::size_t kv_index(int row, int h, int c, int width) const {
    return (std::size_t(row) * hkv + h) * width + c;
  }
  bool visible(int bi, int i, int j) const {
    const std::int64_t at = i + diag[bi];
    if (window_left >= 0 && j < at - window_left) return false;
    if (window_right >= 0 && j > at + window_right) return false;
    return true;
  }
  bool keep(int bi, int h, int i, int j) const {
    if (dropout_p <= 0.0) return true;
    return dropout_keep(seed, offset, static_cast<std::uint32_t>(bi * hq + h), static_cast<std::uint32_t>(i),
                        static_cast<std::uint32_t>(j), dropout_keep_threshold(static_cast<float>(dropout_p)));
  }
};

// One row's final scores s_j (-inf where masked) and, for the backward,
// d s_j / d(scale * q.k) (the softcap's 1 - tanh^2, else 1).
template <class Prec>
void feature_scores(const FeatureProblem& p, const std::vector<double>& q, const std::vector<double>& k,
                    int bi, int h, int i, const Prec& P, std::vector<double>& s, std::vector<double>& dcap) {
  const int kh = h / (p.hq / p.hkv);
  const int n = p.len_k[bi];
  s.assign(n, -INFINITY);
  dcap.assign(n, 1.0);
  for (int j = 0; j < n; ++j) {
    if (!p.visible(bi, i, j)) continue;
    double dot = 0;
    for (int c = 0; c < p.d; ++c)
      dot = P.acc(dot + q[p.q_index(p.q_start[bi] + i, h, c, p.d)] * k[p.kv_index(p.k_start[bi] + j, kh, c, p.d)]);
    double x = P.res(P.res(dot) * p.scale);
    if (p.softcap > 0) {
      const double t = std::tanh(x / p.softcap);
      x = P.res(p.softcap * t);
      dcap[j] = 1.0 - t * t;
    }
    if (!p.alibi_slope.empty()) {
      const double dist = std::fabs(double(i + p.diag[bi] - j));
      x = P.res(x - p.alibi_slope[std::size_t(bi) * p.hq + h] * dist);
    }
    if (p.bias) x = P.res(x + p.bias(bi, h, i, j));
    s[j] = x;
  }
}

struct FeatureForward {
  std::vector<double> out;  // (total_q, hq, dv)
  std::vector<double> lse;  // (total_q, hq)
};

// Softmax probabilities of one row (undropped) and its lse; a row with no
// visible key and no sink has lse -inf and P = 0.
template <class Prec>
double feature_probs(const FeatureProblem& p, int h, const Prec& P, std::vector<double>& s) {
  const bool has_sink = !p.sink.empty();
  double mx = has_sink ? p.sink[h] : -INFINITY;
  for (double x : s) mx = std::max(mx, x);
  if (mx == -INFINITY) {
    for (double& x : s) x = 0.0;
    return -INFINITY;
  }
  double sum = has_sink ? std::exp(p.sink[h] - mx) : 0.0;
  for (double x : s) sum = P.acc(sum + (x == -INFINITY ? 0.0 : std::exp(x - mx)));
  for (double& x : s) x = x == -INFINITY ? 0.0 : P.res(std::exp(x - mx) / sum);
  return mx + std::log(sum);
}

template <class Prec = Exact>
FeatureForward feature_forward(const FeatureProblem& p, const std::vector<double>& q,
                               const std::vector<double>& k, const std::vector<double>& v,
                               const Prec& P = Prec{}) {
  FeatureForward r;
  r.out.assign(std::size_t(p.total_q) * p.hq * p.dv, 0.0);
  r.lse.assign(std::size_t(p.total_q) * p.hq, -INFINITY);
  const int g = p.hq / p.hkv;
  const double rp = 1.0 / (1.0 - p.dropout_p);
  std::vector<double> s, dcap;
  for (int bi = 0; bi < p.b; ++bi)
    for (int h = 0; h < p.hq; ++h)
      for (int i = 0; i < p.len_q[bi]; ++i) {
        const int row = p.q_start[bi] + i;
        feature_scores(p, q, k, bi, h, i, P, s, dcap);
        r.lse[std::size_t(row) * p.hq + h] = feature_probs(p, h, P, s);
        for (int j = 0; j < p.len_k[bi]; ++j)
          if (p.dropout_p > 0) s[j] = p.keep(bi, h, i, j) ? P.res(s[j] * rp) : 0.0;
        for (int c = 0; c < p.dv; ++c) {
          double acc = 0;
          for (int j = 0; j < p.len_k[bi]; ++j)
            acc = P.acc(acc + s[j] * v[p.kv_index(p.k_start[bi] + j, h / g, c, p.dv)]);
          r.out[p.q_index(row, h, c, p.dv)] = P.res(acc);
        }
      }
  return r;
}

struct FeatureBackward {
  std::vector<double> dq, dk, dv, dsink;
};

// Textbook backward: dP = dO V^T (dropped), D = sum_j P_j dP_j, dS = P (dP - D),
// through the softcap by its derivative, times the scale into dQ / dK;
// dsink_h = -sum_rows P_sink D.
template <class Prec = Exact>
FeatureBackward feature_backward(const FeatureProblem& p, const std::vector<double>& q,
                                 const std::vector<double>& k, const std::vector<double>& v,
                                 const std::vector<double>& dout, const Prec& P = Prec{}) {
  FeatureBackward r;
  r.dq.assign(q.size(), 0.0);
  r.dk.assign(k.size(), 0.0);
  r.dv.assign(v.size(), 0.0);
  r.dsink.assign(p.hq, 0.0);
  const int g = p.hq / p.hkv;
  const double rp = 1.0 / (1.0 - p.dropout_p);
  std::vector<double> s, dcap, dP;
  for (int bi = 0; bi < p.b; ++bi)
    for (int h = 0; h < p.hq; ++h) {
      const int kh = h / g;
      for (int i = 0; i < p.len_q[bi]; ++i) {
        const int row = p.q_start[bi] + i;
        const int n = p.len_k[bi];
        feature_scores(p, q, k, bi, h, i, P, s, dcap);
        const double lse = feature_probs(p, h, P, s);
        dP.assign(n, 0.0);
        double D = 0;
        for (int j = 0; j < n; ++j) {
          double dot = 0;
          for (int c = 0; c < p.dv; ++c)
            dot = P.acc(dot + dout[p.q_index(row, h, c, p.dv)] * v[p.kv_index(p.k_start[bi] + j, kh, c, p.dv)]);
          dot = P.res(dot);
          if (p.dropout_p > 0) dot = p.keep(bi, h, i, j) ? P.res(dot * rp) : 0.0;
          dP[j] = dot;
          D = P.acc(D + s[j] * dot);
        }
        if (!p.sink.empty() && lse != -INFINITY) r.dsink[h] -= std::exp(p.sink[h] - lse) * D;
        for (int j = 0; j < n; ++j) {
          const double pd = p.dropout_p > 0 ? (p.keep(bi, h, i, j) ? s[j] * rp : 0.0) : s[j];
          const double ds = P.res(P.res(s[j] * (dP[j] - D)) * dcap[j] * p.scale);
          const int krow = p.k_start[bi] + j;
          for (int c = 0; c < p.dv; ++c) {
            double& a = r.dv[p.kv_index(krow, kh, c, p.dv)];
            a = P.acc(a + pd * dout[p.q_index(row, h, c, p.dv)]);
          }
          for (int c = 0; c < p.d; ++c) {
            double& a = r.dk[p.kv_index(krow, kh, c, p.d)];
            a = P.acc(a + ds * q[p.q_index(row, h, c, p.d)]);
            double& e = r.dq[p.q_index(row, h, c, p.d)];
            e = P.acc(e + ds * k[p.kv_index(krow, kh, c, p.d)]);
          }
        }
      }
    }
  for (auto* t : {&r.dq, &r.dk, &r.dv})
    for (double& x : *t) x = P.res(x);
  return r;
}

}  // namespace orchard::test
