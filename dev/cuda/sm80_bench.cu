// Kernel timings of the sm80-class path for issue #16's performance goals, in the
// shapes that dev/cuda/sm80_peers.py times FA2 (torch SDPA flash) and
// FlexAttention on, so one device call gives both sides on the same card.
//   sm80_bench grid [D...]  bf16, b*s = 16k tokens, h = 2048/d, s 2k/4k/8k, causal
//                           and not: fwd / bwd ms and TFLOP/s (fwd 4bhs^2d, /2 causal,
//                           bwd x2.5). Run with ORCHARD_SM90=0 for the sm80 forward.
//   (SM80_BENCH_S=N: only that sequence length)
//   sm80_bench feat         bf16 b2 s8k h16 d128 causal: sliding window (left 1024)
//                           and ALiBi (feature_bench.py's slopes): fwd / bwd ms.
// Timing as cuda_check --bench: CUDA events around each call, 3 warm-ups, median
// of 20, independent random data per tensor.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "core/backend.h"
#include "orchard/numeric.h"
#include "../../tests/cuda/median_ms.h"

using namespace orchard;

#define CK(x)                                                                                         \
  do {                                                                                                \
    cudaError_t e_ = (x);                                                                             \
    if (e_ != cudaSuccess) {                                                                          \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", #x, __FILE__, __LINE__, cudaGetErrorString(e_)); \
      std::exit(2);                                                                                   \
    }                                                                                                 \
  } while (0)

namespace {

const detail::BackendOps* ops = nullptr;

using orchard_harness::median_ms;  // tests/cuda/median_ms.h

struct Shape {
  int b, s, h, d;
  bool causal;
  int64_t window_left = -1;
  bool alibi = false;
};

// Standard-normal bf16 values (Box-Muller on a hashed counter), on the device: the
// host generator took ~100 s for the grid's 8 x 33M values per shape (the first
// device call ran out of time in it).
__global__ void fill_normal_bf16(uint16_t* x, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    auto hash = [](uint32_t a) {
      a ^= a >> 16; a *= 0x7feb352du; a ^= a >> 15; a *= 0x846ca68bu; a ^= a >> 16;
      return a;
    };
    const uint32_t h1 = hash(static_cast<uint32_t>(i) * 2u + seed * 0x9e3779b9u);
    const uint32_t h2 = hash(h1 ^ 0x85ebca6bu);
    const float u1 = (h1 + 1.f) * 2.3283064e-10f, u2 = h2 * 2.3283064e-10f;
    const float z = sqrtf(-2.f * logf(u1)) * cospif(2.f * u2);
    const uint32_t bits = __float_as_uint(z);
    x[i] = static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);  // round to nearest even
  }
}

// fwd ms, bwd ms (atomic dQ) of one shape, BSHD bf16.
std::pair<float, float> time_shape(const Shape& c, std::mt19937& rng) {
  const size_t n = size_t(c.b) * c.s * c.h * c.d;
  void *q, *k, *v, *o, *lse, *dO, *dq, *dk, *dv, *ws;
  for (void** pp : {&q, &k, &v, &o, &dO, &dq, &dk, &dv}) {
    CK(cudaMalloc(pp, n * 2));
    fill_normal_bf16<<<1024, 256>>>(static_cast<uint16_t*>(*pp), n, static_cast<uint32_t>(rng()));
  }
  CK(cudaDeviceSynchronize());
  CK(cudaMalloc(&lse, size_t(c.b) * c.h * c.s * 4));
  float* slopes = nullptr;
  if (c.alibi) {
    std::vector<float> hs(c.h);
    for (int i = 0; i < c.h; ++i) hs[i] = std::pow(2.f, -8.f * (i + 1) / c.h);
    CK(cudaMalloc(&slopes, c.h * 4));
    CK(cudaMemcpy(slopes, hs.data(), c.h * 4, cudaMemcpyHostToDevice));
  }
  BwdParams p;
  const int64_t bs = int64_t(c.s) * c.h * c.d, rs = int64_t(c.h) * c.d, hs = c.d;
  p.q = q, p.k = k, p.v = v, p.out = o, p.lse = lse;
  p.q_batch_stride = p.k_batch_stride = p.v_batch_stride = p.o_batch_stride = bs;
  p.q_row_stride = p.k_row_stride = p.v_row_stride = p.o_row_stride = rs;
  p.q_head_stride = p.k_head_stride = p.v_head_stride = p.o_head_stride = hs;
  p.lse_batch_stride = int64_t(c.h) * c.s;
  p.lse_head_stride = c.s;
  p.b = c.b, p.sq = p.sk = c.s, p.hq = p.hkv = c.h, p.d = p.d_v = c.d;
  p.scale = 1.0f / std::sqrt(float(c.d));
  p.scale_f64 = 1.0 / std::sqrt(double(c.d));
  p.causal = c.causal;
  p.causal_offset = 0;
  if (c.window_left >= 0) p.window_left = c.window_left, p.window_right = c.causal ? 0 : -1;
  p.alibi_slopes = slopes;
  p.dtype = DType::kBFloat16;
  p.stream = nullptr;
  p.dout = dO;
  p.do_batch_stride = p.dq_batch_stride = p.dk_batch_stride = p.dv_batch_stride = bs;
  p.do_row_stride = p.dq_row_stride = p.dk_row_stride = p.dv_row_stride = rs;
  p.do_head_stride = p.dq_head_stride = p.dk_head_stride = p.dv_head_stride = hs;
  p.dq = dq, p.dk = dk, p.dv = dv;
  const std::string why = ops->check_support(p);
  if (!why.empty()) {
    std::printf("unsupported: %s\n", why.c_str());
    std::exit(3);
  }
  const size_t wsb = ops->backward_workspace_bytes(p);
  CK(cudaMalloc(&ws, wsb));
  p.workspace = ws;
  p.workspace_bytes = wsb;
  const float tf = median_ms([&] { ops->forward(p); });
  ops->forward(p);
  const float tb = median_ms([&] { ops->backward(p); });
  CK(cudaGetLastError());
  for (void* ptr : {q, k, v, o, lse, dO, dq, dk, dv, ws}) CK(cudaFree(ptr));
  if (slopes) CK(cudaFree(slopes));
  return {tf, tb};
}

}  // namespace

int main(int argc, char** argv) {
  ops = detail::cuda_backend();
  if (!ops) {
    std::printf("no CUDA backend\n");
    return 1;
  }
  const std::string mode = argc > 1 ? argv[1] : "grid";
  std::mt19937 rng(7);
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s, smem opt-in %zu B, ORCHARD_SM90=%s ORCHARD_BWD_TWO_PASS=%s\n", prop.name,
              prop.sharedMemPerBlockOptin, std::getenv("ORCHARD_SM90") ? std::getenv("ORCHARD_SM90") : "-",
              std::getenv("ORCHARD_BWD_TWO_PASS") ? std::getenv("ORCHARD_BWD_TWO_PASS") : "-");
  if (mode == "grid") {
    std::vector<int> dims;
    for (int i = 2; i < argc; ++i) dims.push_back(std::atoi(argv[i]));
    if (dims.empty()) dims = {64, 96, 128, 160, 192, 256};
    std::printf("%5s %6s %3s %3s %7s | %8s %8s | %s\n", "d", "s", "b", "h", "causal", "fwd", "bwd", "ms fwd/bwd");
    for (int d : dims)
      for (int causal = 0; causal < 2; ++causal)
        for (int s : {2048, 4096, 8192}) {
          if (std::getenv("SM80_BENCH_S") && std::atoi(std::getenv("SM80_BENCH_S")) != s) continue;
          const int b = 16384 / s, h = 2048 / d;
          const auto [tf, tb] = time_shape({b, s, h, d, causal != 0}, rng);
          const double flops = 4.0 * b * h * double(s) * s * d / (causal ? 2 : 1);
          std::printf("%5d %6d %3d %3d %7s | %8.1f %8.1f | %.3f/%.3f\n", d, s, b, h, causal ? "yes" : "no",
                      flops / tf / 1e9, 2.5 * flops / tb / 1e9, tf, tb);
          std::fflush(stdout);
        }
  } else if (mode == "feat") {
    const int b = 2, s = 8192, h = 16, d = 128, left = 1024;
    double visible = 0;
    for (int i = 0; i < s; ++i) visible += std::min(i, left) + 1;
    const double fw = 4.0 * b * h * d * visible, fa = 4.0 * b * h * d * s * (s + 1) / 2.0;
    const auto [wf, wb] = time_shape({b, s, h, d, true, left, false}, rng);
    std::printf("window b2 s8k h16 d128 causal left 1024: fwd %.3f ms (%.1f), bwd %.3f ms, fwd+bwd %.3f ms (%.1f)\n",
                wf, fw / wf / 1e9, wb, wf + wb, 3.5 * fw / (wf + wb) / 1e9);
    const auto [af, ab] = time_shape({b, s, h, d, true, -1, true}, rng);
    std::printf("alibi b2 s8k h16 d128 causal: fwd %.3f ms (%.1f), bwd %.3f ms, fwd+bwd %.3f ms (%.1f)\n", af,
                fa / af / 1e9, ab, af + ab, 3.5 * fa / (af + ab) / 1e9);
  } else {
    std::printf("usage: sm80_bench grid [D...] | feat\n");
    return 2;
  }
  return 0;
}
