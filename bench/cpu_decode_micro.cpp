// The CPU decode kernel alone (orchard::attention_with_kvcache, no Python),
// for perf and A/B timing of src/backends/cpu/decode.cpp:
//   ninja -C build-cpu orchard
//   g++ -O2 -std=c++20 -fopenmp -Iinclude bench/cpu_decode_micro.cpp build-cpu/liborchard.a \
//       -o /tmp/decode_micro
//   OMP_NUM_THREADS=1 /tmp/decode_micro bf16 b=1 s=4096 hq=32 hkv=4 d=128 reps=200
// Prints process CPU and wall ms per call (medians of 7 runs of reps calls,
// back to back) and the achieved K+V read rate. Inputs are random; the output is not checked here
// (tests/python/test_kvcache.py and tests/cpp/kvcache_api_test.cpp do that).
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <random>
#include <string>
#include <vector>

#include "orchard/kvcache.h"

namespace {

double cpu_seconds() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

double wall_seconds() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

std::uint16_t to_bf16(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return std::uint16_t((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

}  // namespace

int main(int argc, char** argv) {
  std::string dt = argc > 1 ? argv[1] : "bf16";
  long b = 1, s = 4096, hq = 32, hkv = 4, d = 128, reps = 100;
  for (int i = 2; i < argc; ++i) {
    const char* a = argv[i];
    auto val = [&](const char* key, long& out) {
      const std::size_t n = std::strlen(key);
      if (std::strncmp(a, key, n) == 0 && a[n] == '=') out = std::atol(a + n + 1);
    };
    val("b", b), val("s", s), val("hq", hq), val("hkv", hkv), val("d", d), val("reps", reps);
  }
  const orchard::DType dtype = dt == "bf16" ? orchard::DType::kBFloat16 : orchard::DType::kFloat32;
  const std::size_t es = dt == "bf16" ? 2 : 4;
  const std::size_t nq = std::size_t(b) * hq * d, nc = std::size_t(b) * s * hkv * d;
  std::vector<unsigned char> q(nq * es), kc(nc * es), vc(nc * es), out(nq * es);
  std::mt19937 rng(3);
  std::normal_distribution<float> nd;
  for (auto* v : {&q, &kc, &vc})
    for (std::size_t i = 0; i < v->size() / es; ++i) {
      const float x = nd(rng);
      if (es == 2) {
        const std::uint16_t h = to_bf16(x);
        std::memcpy(v->data() + 2 * i, &h, 2);
      } else {
        std::memcpy(v->data() + 4 * i, &x, 4);
      }
    }
  auto view = [&](void* p, std::initializer_list<std::int64_t> shape) {
    return orchard::make_contiguous_view(p, dtype, orchard::Device{}, shape);
  };
  orchard::DecodeArgs a;
  a.q = view(q.data(), {b, 1, hq, d});
  a.k_cache = view(kc.data(), {b, s, hkv, d});
  a.v_cache = view(vc.data(), {b, s, hkv, d});
  a.out = view(out.data(), {b, 1, hq, d});
  const orchard::DecodePlan plan = orchard::kvcache_plan(a);
  std::vector<float> ws(plan.workspace_bytes / 4 + 64);
  if (plan.workspace_bytes)
    a.workspace = orchard::make_contiguous_view(ws.data(), orchard::DType::kFloat32, orchard::Device{},
                                                {std::int64_t(ws.size())});
  orchard::attention_with_kvcache(a);  // warm-up
  std::vector<double> runs, walls;
  for (int r = 0; r < 7; ++r) {
    const double t0 = cpu_seconds(), w0 = wall_seconds();
    for (long i = 0; i < reps; ++i) orchard::attention_with_kvcache(a);
    runs.push_back((cpu_seconds() - t0) / reps);
    walls.push_back((wall_seconds() - w0) / reps);
  }
  std::sort(runs.begin(), runs.end());
  std::sort(walls.begin(), walls.end());
  const double t = runs[3], w = walls[3];
  std::printf("%s b=%ld s=%ld hq=%ld hkv=%ld d=%ld splits=%d: %.3f ms per call CPU time, %.3f ms wall "
              "(medians of 7), K+V %.1f GB/s (wall)\n",
              dt.c_str(), b, s, hq, hkv, d, plan.num_splits, t * 1e3, w * 1e3, 2.0 * nc * es / w * 1e-9);
  return 0;
}
