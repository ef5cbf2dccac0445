// Causal attention on the CPU through Orchard's C++ API, checked against a
// direct computation of the same softmax(QK^T * scale) V.
#include <orchard/attention.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

int main() {
  const int b = 1, s = 64, h = 2, d = 32;
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  std::vector<float> q(b * s * h * d), k(q.size()), v(q.size()), out(q.size(), NAN), lse(b * h * s, NAN);
  for (auto* t : {&q, &k, &v})
    for (float& x : *t) x = normal(rng);

  const orchard::Device cpu{orchard::DeviceType::kCPU, 0};
  orchard::ForwardArgs args;
  args.q = orchard::make_contiguous_view(q.data(), orchard::DType::kFloat32, cpu, {b, s, h, d});
  args.k = orchard::make_contiguous_view(k.data(), orchard::DType::kFloat32, cpu, {b, s, h, d});
  args.v = orchard::make_contiguous_view(v.data(), orchard::DType::kFloat32, cpu, {b, s, h, d});
  args.out = orchard::make_contiguous_view(out.data(), orchard::DType::kFloat32, cpu, {b, s, h, d});
  args.lse = orchard::make_contiguous_view(lse.data(), orchard::DType::kFloat32, cpu, {b, h, s});
  args.options.causal = true;
  orchard::attention_forward(args);

  double max_err = 0;
  const double scale = 1.0 / std::sqrt(double(d));
  for (int hh = 0; hh < h; ++hh)
    for (int i = 0; i < s; ++i) {
      std::vector<double> p(i + 1);
      double m = -INFINITY, sum = 0;
      for (int j = 0; j <= i; ++j) {
        double dot = 0;
        for (int c = 0; c < d; ++c) dot += double(q[(i * h + hh) * d + c]) * k[(j * h + hh) * d + c];
        p[j] = dot * scale;
        m = std::max(m, p[j]);
      }
      for (double& x : p) sum += (x = std::exp(x - m));
      for (int c = 0; c < d; ++c) {
        double o = 0;
        for (int j = 0; j <= i; ++j) o += p[j] / sum * v[(j * h + hh) * d + c];
        max_err = std::max(max_err, std::abs(o - out[(i * h + hh) * d + c]));
      }
    }
  const auto info = orchard::build_info();
  std::printf("orchard %s: causal attention max abs error %.2e (cuda backend compiled: %s)\n", info.version.c_str(),
              max_err, info.cuda_compiled ? "yes" : "no");
  return max_err < 1e-4 ? 0 : 1;
}
