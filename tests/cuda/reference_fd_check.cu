// Finite-difference check of cuda_check's fp64 reference with the features on
// (window, softcap, ALiBi, varlen with an empty sequence, sinks): its dq/dk/dv
// must be the gradient of sum(out * dout). Host only, no GPU needed:
//   nvcc -std=c++20 -O2 -Xcompiler=-fopenmp --expt-relaxed-constexpr -Iinclude -Isrc \
//     tests/cuda/reference_fd_check.cu -o /tmp/refcheck -L<build>/ -lorchard_cuda_backend -lcudart_static -lgomp
// (<build>: the dev/cuda build, for the backend symbols cuda_check.cu references).
// Last run: max |fd - analytic| 1.5e-9 / 2.2e-9 / 2.3e-9 on the three cases.
#define main cuda_check_main
#include "cuda_check.cu"
#undef main
int main() {
  std::mt19937 rng(5);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::vector<Case> cs;
  {
    Case c = with_window(with_varlen({"fd", DType::kFloat64, 0, 4, 2, 0, 0, 8, true}, {5, 0, 7, 4}, {6, 3, 7, 9}), 3, 0);
    c.softcap = 1.5f, c.alibi = 2, c.sink = true;
    cs.push_back(c);
    c = with_window({"fd2", DType::kFloat64, 2, 2, 1, 6, 9, 8}, 2, 3);
    c.softcap = 0.7f, c.alibi = 1;
    cs.push_back(c);
    c = with_window({"fd3", DType::kFloat64, 1, 2, 2, 9, 5, 8, true, true}, 1, 0);
    c.sink = true;
    cs.push_back(c);
  }
  int bad = 0;
  for (const Case& c : cs) {
    const Geometry g = geometry(c);
    const int hb = host_batch(c);
    auto randt = [&](int s, int h) { HostT t(hb, s, h, c.d); for (auto& x : t.v) x = nd(rng); return t; };
    HostT q = randt(g.tq, c.hq), k = randt(g.tk, c.hkv), v = randt(g.tk, c.hkv), dout = randt(g.tq, c.hq);
    const RefOut r = reference(c, g, q, k, v, dout, {}, false);
    auto loss = [&](const HostT& q2, const HostT& k2, const HostT& v2) {
      const RefOut o = reference(c, g, q2, k2, v2, dout, {}, false);
      double L = 0;
      for (size_t i = 0; i < o.out.v.size(); ++i) L += o.out.v[i] * dout.v[i];
      return L;
    };
    double maxerr = 0;
    const double eps = 1e-6;
    for (int which = 0; which < 3; ++which) {
      const HostT& base = which == 0 ? q : (which == 1 ? k : v);
      const HostT& grad = which == 0 ? r.dq : (which == 1 ? r.dk : r.dv);
      for (size_t i = 0; i < base.v.size(); i += 3) {
        HostT a = q, b = k, cc = v, a2 = q, b2 = k, c2 = v;
        HostT* p1 = which == 0 ? &a : (which == 1 ? &b : &cc);
        HostT* p2 = which == 0 ? &a2 : (which == 1 ? &b2 : &c2);
        p1->v[i] += eps, p2->v[i] -= eps;
        const double fd = (loss(a, b, cc) - loss(a2, b2, c2)) / (2 * eps);
        maxerr = std::max(maxerr, std::fabs(fd - grad.v[i]));
      }
    }
    // lse rows: finite; with a sink, lse >= sink
    std::printf("%s: max |fd - analytic| over dq/dk/dv = %.3e\n", c.name, maxerr);
    if (maxerr > 1e-5) ++bad;
  }
  return bad;
}
