// Naive attention reference for the tests: materialises S and P for small
// shapes, in double, with its own loops (nothing shared with the kernels).
// A rounding functor applied after every intermediate product turns the same
// code into the "naive computation in the same low precision" that the
// tolerance rule compares against (flash-attn's rule: kernel error vs the
// exact reference <= 2 x that naive error + a small atol).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "orchard/philox.h"

namespace orchard::test {

// Problem description; tensors are contiguous BSHD double arrays:
// q/out/dout: b*sq*hq*d, k/v: b*sk*hkv*d, lse: b*hq*sq.
struct RefProblem {
  int b = 1, sq = 1, sk = 1, hq = 1, hkv = 1, d = 1;
  double scale = 1.0;
  bool causal = false;
  std::int64_t causal_offset = 0;
  double dropout_p = 0.0;
  std::uint64_t seed = 0, offset = 0;
  // Dropout's global coordinates (FwdParams::dropout_*): the Philox index of (bi, h, i, j)
  // is (bi * heads + head_offset + h, i + row_offset, j + col_offset), heads 0 = hq.
  std::int64_t drop_row = 0, drop_col = 0, drop_head = 0, drop_heads = 0;

  std::size_t q_index(int bi, int i, int h, int c) const {
    return ((std::size_t(bi) * sq + i) * hq + h) * d + c;
  }
  std::size_t kv_index(int bi, int j, int h, int c) const {
    return ((std::size_t(bi) * sk + j) * hkv + h) * d + c;
  }
  std::size_t lse_index(int bi, int h, int i) const { return (std::size_t(bi) * hq + h) * sq + i; }
  bool visible(int i, int j) const { return !causal || j <= i + causal_offset; }
  // Scalar per-element keep decision straight from philox.h.
  bool keep(int bi, int h, int i, int j) const {
    if (dropout_p <= 0.0) return true;
    const std::int64_t heads = drop_heads > 0 ? drop_heads : hq;
    return dropout_keep(seed, offset, static_cast<std::uint32_t>(bi * heads + drop_head + h),
                        static_cast<std::uint32_t>(i + drop_row), static_cast<std::uint32_t>(j + drop_col),
                        dropout_keep_threshold(static_cast<float>(dropout_p)));
  }
};

// Precision policies: res() rounds a result stored in the tensor dtype,
// acc() rounds each step of an accumulation (torch's naive low-precision
// attention accumulates matmuls and softmax sums in fp32).
struct Exact {
  double res(double x) const { return x; }
  double acc(double x) const { return x; }
};
template <class RoundFn>
struct LowPrecision {
  RoundFn round;  // to the tensor dtype
  double res(double x) const { return round(x); }
  double acc(double x) const { return static_cast<float>(x); }
};

struct RefForward {
  std::vector<double> out, lse;
};

template <class Prec = Exact>
RefForward ref_forward(const RefProblem& p, const std::vector<double>& q,
                       const std::vector<double>& k, const std::vector<double>& v,
                       const Prec& P = Prec{}) {
  RefForward r;
  r.out.assign(std::size_t(p.b) * p.sq * p.hq * p.d, 0.0);
  r.lse.assign(std::size_t(p.b) * p.hq * p.sq, -std::numeric_limits<double>::infinity());
  const int g = p.hq / p.hkv;
  std::vector<double> s(p.sk);
  for (int bi = 0; bi < p.b; ++bi)
    for (int h = 0; h < p.hq; ++h)
      for (int i = 0; i < p.sq; ++i) {
        double mx = -INFINITY;
        for (int j = 0; j < p.sk; ++j) {
          double dot = 0;
          for (int c = 0; c < p.d; ++c) dot = P.acc(dot + q[p.q_index(bi, i, h, c)] * k[p.kv_index(bi, j, h / g, c)]);
          s[j] = p.visible(i, j) ? P.res(P.res(dot) * p.scale) : -INFINITY;
          mx = std::max(mx, s[j]);
        }
        if (mx == -INFINITY) continue;  // fully masked: out 0, lse -inf
        double sum = 0;
        for (int j = 0; j < p.sk; ++j) sum = P.acc(sum + (s[j] == -INFINITY ? 0.0 : std::exp(s[j] - mx)));
        r.lse[p.lse_index(bi, h, i)] = mx + std::log(sum);
        for (int j = 0; j < p.sk; ++j) {
          double pr = s[j] == -INFINITY ? 0.0 : P.res(std::exp(s[j] - mx) / sum);
          if (p.dropout_p > 0) pr = p.keep(bi, h, i, j) ? P.res(pr / (1.0 - p.dropout_p)) : 0.0;
          s[j] = pr;
        }
        for (int c = 0; c < p.d; ++c) {
          double acc = 0;
          for (int j = 0; j < p.sk; ++j) acc = P.acc(acc + s[j] * v[p.kv_index(bi, j, h / g, c)]);
          r.out[p.q_index(bi, i, h, c)] = P.res(acc);
        }
      }
  return r;
}

struct RefBackward {
  std::vector<double> dq, dk, dv;
};

// Gradients by the textbook softmax backward (D_i = sum_j P_ij dP_ij, not
// the kernels' rowsum(dO * O) shortcut).
template <class Prec = Exact>
RefBackward ref_backward(const RefProblem& p, const std::vector<double>& q,
                         const std::vector<double>& k, const std::vector<double>& v,
                         const std::vector<double>& dout, const Prec& Pr = Prec{}) {
  RefBackward r;
  r.dq.assign(q.size(), 0.0);
  r.dk.assign(k.size(), 0.0);
  r.dv.assign(v.size(), 0.0);
  std::vector<double> dk_acc(k.size(), 0.0), dv_acc(v.size(), 0.0);
  const int g = p.hq / p.hkv;
  const double rp = 1.0 / (1.0 - p.dropout_p);
  std::vector<double> P(std::size_t(p.sq) * p.sk), dP(std::size_t(p.sq) * p.sk), dS(P.size());
  for (int bi = 0; bi < p.b; ++bi)
    for (int h = 0; h < p.hq; ++h) {
      const int kh = h / g;
      for (int i = 0; i < p.sq; ++i) {
        double mx = -INFINITY;
        double* pr = &P[std::size_t(i) * p.sk];
        for (int j = 0; j < p.sk; ++j) {
          double dot = 0;
          for (int c = 0; c < p.d; ++c) dot = Pr.acc(dot + q[p.q_index(bi, i, h, c)] * k[p.kv_index(bi, j, kh, c)]);
          pr[j] = p.visible(i, j) ? Pr.res(Pr.res(dot) * p.scale) : -INFINITY;
          mx = std::max(mx, pr[j]);
        }
        double sum = 0;
        for (int j = 0; j < p.sk; ++j) sum = Pr.acc(sum + (pr[j] == -INFINITY ? 0.0 : std::exp(pr[j] - mx)));
        for (int j = 0; j < p.sk; ++j) pr[j] = pr[j] == -INFINITY ? 0.0 : Pr.res(std::exp(pr[j] - mx) / sum);
      }
      // dP (w.r.t. the undropped P) and dS.
      for (int i = 0; i < p.sq; ++i) {
        double D = 0;
        for (int j = 0; j < p.sk; ++j) {
          double dot = 0;
          for (int c = 0; c < p.d; ++c) dot = Pr.acc(dot + dout[p.q_index(bi, i, h, c)] * v[p.kv_index(bi, j, kh, c)]);
          dot = Pr.res(dot);
          if (p.dropout_p > 0) dot = p.keep(bi, h, i, j) ? Pr.res(dot * rp) : 0.0;
          dP[std::size_t(i) * p.sk + j] = dot;
          D = Pr.acc(D + P[std::size_t(i) * p.sk + j] * dot);
        }
        for (int j = 0; j < p.sk; ++j) {
          const std::size_t ij = std::size_t(i) * p.sk + j;
          dS[ij] = Pr.res(P[ij] * (dP[ij] - D));
        }
      }
      // dV += P_drop^T dO, dK += dS^T Q * scale, dQ = dS K * scale.
      for (int j = 0; j < p.sk; ++j)
        for (int c = 0; c < p.d; ++c) {
          double av = 0, ak = 0;
          for (int i = 0; i < p.sq; ++i) {
            const std::size_t ij = std::size_t(i) * p.sk + j;
            double pd = P[ij];
            if (p.dropout_p > 0) pd = p.keep(bi, h, i, j) ? Pr.res(pd * rp) : 0.0;
            av = Pr.acc(av + pd * dout[p.q_index(bi, i, h, c)]);
            ak = Pr.acc(ak + dS[ij] * q[p.q_index(bi, i, h, c)]);
          }
          double& dva = dv_acc[p.kv_index(bi, j, kh, c)];
          double& dka = dk_acc[p.kv_index(bi, j, kh, c)];
          dva = Pr.acc(dva + Pr.res(av));
          dka = Pr.acc(dka + Pr.res(Pr.res(ak) * p.scale));
        }
      for (int i = 0; i < p.sq; ++i)
        for (int c = 0; c < p.d; ++c) {
          double acc = 0;
          for (int j = 0; j < p.sk; ++j) acc = Pr.acc(acc + dS[std::size_t(i) * p.sk + j] * k[p.kv_index(bi, j, kh, c)]);
          r.dq[p.q_index(bi, i, h, c)] = Pr.res(Pr.res(acc) * p.scale);
        }
    }
  for (std::size_t t = 0; t < k.size(); ++t) {
    r.dk[t] = Pr.res(dk_acc[t]);
    r.dv[t] = Pr.res(dv_acc[t]);
  }
  return r;
}

}  // namespace orchard::test
