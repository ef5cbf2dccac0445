// A/B of the sm80-class kernels (a source tree against another, or compile-time knobs) without a
// package build: this file calls the bf16 forward and backward of the d64 / d128 / d192 / d256
// buckets directly (run_flash_fwd / run_flash_bwd), linked with their generated kernel files only,
// so each variant is a small executable (bench/sm80_kernel_ab.sh builds and runs them).
//
//   sm80_kernel_ab check FILE   bf16 outputs (out, lse; dq, dk, dv of the deterministic backward;
//                               dk, dv of the atomic-dQ one) of fixed calls over the buckets, to
//                               FILE: a change that does not touch the arithmetic (a layout, a
//                               pipeline depth) must give the same bytes as the base.
//   sm80_kernel_ab time         fwd / bwd ms and TFLOP/s, bf16, b*s = 16k tokens, h = 2048 / d,
//                               s 2k / 4k / 8k, causal and not, and dropout 0.1 at d64 / d128 s4k
//                               (CUDA events, median of 15 after 3 warm-ups; fwd FLOPs 4 b h s^2 d,
//                               halved causal; bwd 2.5x fwd).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "backends/cuda/sm80/flash_bwd_kernel.cuh"
#include "backends/cuda/sm80/flash_fwd_kernel.cuh"

using namespace orchard;
using bf16 = __nv_bfloat16;

#define CK(x)                                                                                  \
  do {                                                                                         \
    cudaError_t e_ = (x);                                                                      \
    if (e_ != cudaSuccess) {                                                                   \
      std::fprintf(stderr, "sm80_kernel_ab: %s failed at line %d: %s\n", #x, __LINE__,          \
                   cudaGetErrorString(e_));                                                    \
      std::exit(2);                                                                            \
    }                                                                                          \
  } while (0)

// Compiled in the generated files this bench links (sm80/generated/flash_{fwd,bwd}_bf16_d*.cu).
namespace orchard::cuda {
extern template void run_flash_fwd<__nv_bfloat16, 64>(const FwdParams&);
extern template void run_flash_fwd<__nv_bfloat16, 128>(const FwdParams&);
extern template void run_flash_fwd<__nv_bfloat16, 192>(const FwdParams&);
extern template void run_flash_fwd<__nv_bfloat16, 256>(const FwdParams&);
extern template void run_flash_bwd<__nv_bfloat16, 64>(const BwdParams&);
extern template void run_flash_bwd<__nv_bfloat16, 128>(const BwdParams&);
extern template void run_flash_bwd<__nv_bfloat16, 192>(const BwdParams&);
extern template void run_flash_bwd<__nv_bfloat16, 256>(const BwdParams&);

// What cuda_backend.cu defines for the kernels; the bench times no call with sinks.
void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    std::fprintf(stderr, "sm80_kernel_ab: launch of %s failed: %s\n", what, cudaGetErrorString(e));
    std::exit(2);
  }
}
void opt_in_dynamic_smem(const void* kernel, int bytes) {  // every call: the bench is single-threaded
  CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}
void run_bwd_dsink(const BwdParams&, const float*) {
  std::fprintf(stderr, "sm80_kernel_ab: sinks are not part of this bench\n");
  std::exit(2);
}
}  // namespace orchard::cuda


namespace {

// Uniform values in [-2, 2) from a hashed counter, on the device.
__global__ void fill_bf16(bf16* x, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t a = static_cast<uint32_t>(i) * 0x9e3779b9u ^ (seed * 0x85ebca6bu + static_cast<uint32_t>(i >> 32));
    a ^= a >> 16; a *= 0x7feb352du; a ^= a >> 15; a *= 0x846ca68bu; a ^= a >> 16;
    x[i] = __float2bfloat16(static_cast<float>(a >> 8) * (4.f / 16777216.f) - 2.f);
  }
}

struct Shape {
  int b, s, h, d;
  bool causal;
  float dropout = 0.f;
};

// Device buffers of one (b, s, h, d) call in flash-attn's (b, s, h, d) layout.
struct Buffers {
  Shape sh;
  bf16 *q, *k, *v, *o, *dout, *dq, *dk, *dv;
  float* lse;
  void* ws;
  size_t elems;
  BwdParams p;

  explicit Buffers(Shape s, uint32_t seed) : sh(s) {
    elems = size_t(s.b) * s.s * s.h * s.d;
    for (bf16** t : {&q, &k, &v, &o, &dout, &dq, &dk, &dv}) CK(cudaMalloc(t, elems * sizeof(bf16)));
    CK(cudaMalloc(&lse, size_t(s.b) * s.h * s.s * sizeof(float)));
    uint32_t i = 0;
    for (bf16* t : {q, k, v, dout}) fill_bf16<<<1024, 256>>>(t, elems, seed * 16 + i++);
    for (bf16* t : {o, dq, dk, dv}) CK(cudaMemset(t, 0xff, elems * sizeof(bf16)));  // poisoned (NaN)
    CK(cudaGetLastError());
    p = BwdParams{};
    p.q = q, p.k = k, p.v = v, p.out = o, p.lse = lse, p.dout = dout, p.dq = dq, p.dk = dk, p.dv = dv;
    const int64_t row = int64_t(s.h) * s.d, batch = row * s.s;
    p.q_batch_stride = p.k_batch_stride = p.v_batch_stride = p.o_batch_stride = batch;
    p.do_batch_stride = p.dq_batch_stride = p.dk_batch_stride = p.dv_batch_stride = batch;
    p.q_row_stride = p.k_row_stride = p.v_row_stride = p.o_row_stride = row;
    p.do_row_stride = p.dq_row_stride = p.dk_row_stride = p.dv_row_stride = row;
    p.q_head_stride = p.k_head_stride = p.v_head_stride = p.o_head_stride = s.d;
    p.do_head_stride = p.dq_head_stride = p.dk_head_stride = p.dv_head_stride = s.d;
    p.lse_batch_stride = int64_t(s.h) * s.s, p.lse_head_stride = s.s;
    p.b = s.b, p.sq = p.sk = s.s, p.hq = p.hkv = s.h, p.d = p.d_v = s.d;
    p.scale = 1.f / std::sqrt(static_cast<float>(s.d));
    p.scale_f64 = 1.0 / std::sqrt(static_cast<double>(s.d));
    p.causal = s.causal;
    if (s.causal) p.window_right = 0;  // the core's convention: causal == (window_right == 0)
    p.dropout_p = s.dropout, p.dropout_p_f64 = s.dropout, p.seed = 1234, p.offset = 0;
    p.dtype = DType::kBFloat16;
    p.workspace_bytes = cuda::bwd_workspace_layout(p).bytes;
    CK(cudaMalloc(&ws, p.workspace_bytes));
    p.workspace = ws;
  }
  ~Buffers() {
    for (void* t : {(void*)q, (void*)k, (void*)v, (void*)o, (void*)dout, (void*)dq, (void*)dk, (void*)dv,
                    (void*)lse, ws})
      cudaFree(t);
  }
};

void forward(const BwdParams& p) {
  if (p.d <= 64) cuda::run_flash_fwd<bf16, 64>(p);
  else if (p.d <= 128) cuda::run_flash_fwd<bf16, 128>(p);
  else if (p.d <= 192) cuda::run_flash_fwd<bf16, 192>(p);
  else cuda::run_flash_fwd<bf16, 256>(p);
}
void backward(const BwdParams& p) {
  if (p.d <= 64) cuda::run_flash_bwd<bf16, 64>(p);
  else if (p.d <= 128) cuda::run_flash_bwd<bf16, 128>(p);
  else if (p.d <= 192) cuda::run_flash_bwd<bf16, 192>(p);
  else cuda::run_flash_bwd<bf16, 256>(p);
}

template <class F>
float median_ms(F&& f, int reps) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) f();
  std::vector<float> ms;
  for (int i = 0; i < reps; ++i) {
    CK(cudaEventRecord(a));
    f();
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float t = 0.f;
    CK(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

int check(const char* path) {
  // Every bucket, head dims at and below them (zero-filled columns), some not a multiple of 8
  // (the element-wise loads), lengths that are no multiple of the tiles, causal and not, dropout.
  const Shape shapes[] = {{2, 1000, 3, 64, false},        {2, 1000, 3, 64, true},  {1, 700, 2, 60, true},
                          {2, 1000, 3, 64, false, 0.2f},  {2, 1000, 3, 128, false}, {2, 1000, 3, 128, true},
                          {1, 777, 2, 100, false},        {1, 513, 2, 128, true, 0.1f}, {2, 1000, 3, 192, false},
                          {2, 1000, 3, 192, true},        {1, 777, 2, 176, true},  {2, 1000, 3, 256, false},
                          {2, 1000, 3, 256, true},        {1, 777, 2, 200, false}, {1, 555, 2, 250, true},
                          {1, 130, 1, 186, false},        {1, 600, 2, 192, true, 0.1f}, {1, 600, 2, 256, false, 0.1f},
                          {1, 301, 2, 60, false, 0.3f}};
  FILE* f = std::fopen(path, "wb");
  if (!f) { std::perror(path); return 2; }
  // path.idx: one line per segment of path (name, element type, count), for the tolerance
  // comparison of variants whose bytes may differ (another tiling: bench/sm80_kernel_ab.sh).
  FILE* idx = std::fopen((std::string(path) + ".idx").c_str(), "w");
  if (!idx) { std::perror(path); return 2; }
  int bad = 0;
  uint32_t seed = 1;
  for (const Shape& s : shapes) {
    Buffers buf(s, seed++);
    buf.p.deterministic = true;
    forward(buf.p);
    backward(buf.p);
    CK(cudaDeviceSynchronize());
    std::vector<uint16_t> host(buf.elems);
    int nan = 0;
    const char* tag[] = {"o", "dq", "dk", "dv"};
    int ti = 0;
    for (bf16* t : {buf.o, buf.dq, buf.dk, buf.dv}) {
      CK(cudaMemcpy(host.data(), t, buf.elems * sizeof(bf16), cudaMemcpyDeviceToHost));
      for (uint16_t x : host) nan += (x & 0x7f80) == 0x7f80;  // a poisoned (or non-finite) element left
      std::fwrite(host.data(), sizeof(uint16_t), host.size(), f);
      std::fprintf(idx, "d%d_c%d_p%.1f_%s bf16 %zu\n", s.d, s.causal, s.dropout, tag[ti++], host.size());
    }
    std::vector<float> lse(size_t(s.b) * s.h * s.s);
    CK(cudaMemcpy(lse.data(), buf.lse, lse.size() * sizeof(float), cudaMemcpyDeviceToHost));
    std::fwrite(lse.data(), sizeof(float), lse.size(), f);
    std::fprintf(idx, "d%d_c%d_p%.1f_lse f32 %zu\n", s.d, s.causal, s.dropout, lse.size());
    // The atomic-dQ backward (the default): dK / dV are still per-CTA sums (written out), dQ
    // differs from the ordered one by the order of its fp32 adds only.
    std::vector<uint16_t> dq_ordered(buf.elems);
    CK(cudaMemcpy(dq_ordered.data(), buf.dq, buf.elems * sizeof(bf16), cudaMemcpyDeviceToHost));
    for (bf16* t : {buf.dq, buf.dk, buf.dv}) CK(cudaMemset(t, 0xff, buf.elems * sizeof(bf16)));
    buf.p.deterministic = false;
    backward(buf.p);
    CK(cudaDeviceSynchronize());
    for (bf16* t : {buf.dk, buf.dv}) {
      CK(cudaMemcpy(host.data(), t, buf.elems * sizeof(bf16), cudaMemcpyDeviceToHost));
      for (uint16_t x : host) nan += (x & 0x7f80) == 0x7f80;
      std::fwrite(host.data(), sizeof(uint16_t), host.size(), f);
      std::fprintf(idx, "d%d_c%d_p%.1f_%s_atomic bf16 %zu\n", s.d, s.causal, s.dropout, t == buf.dk ? "dk" : "dv",
                   host.size());
    }
    CK(cudaMemcpy(host.data(), buf.dq, buf.elems * sizeof(bf16), cudaMemcpyDeviceToHost));
    auto as_float = [](uint16_t x) { uint32_t u = uint32_t(x) << 16; float v; std::memcpy(&v, &u, 4); return v; };
    double max_diff = 0, max_ref = 0;
    for (size_t i = 0; i < host.size(); ++i) {
      max_diff = std::max(max_diff, double(std::fabs(as_float(host[i]) - as_float(dq_ordered[i]))));
      max_ref = std::max(max_ref, double(std::fabs(as_float(dq_ordered[i]))));
    }
    const bool dq_ok = max_diff <= 1e-2 * max_ref;  // bf16 rounding of differently ordered fp32 sums
    std::printf("check b%d s%d h%d d%d causal=%d dropout=%.1f: %d non-finite elements, atomic dQ vs ordered max "
                "diff %.3g (max |dQ| %.3g)%s\n", s.b, s.s, s.h, s.d, s.causal, s.dropout, nan, max_diff, max_ref,
                dq_ok ? "" : " FAIL");
    bad += nan != 0 || !dq_ok;
  }
  std::fclose(f);
  std::fclose(idx);
  return bad ? 1 : 0;
}

int time_grid() {
  std::printf("| d | causal | dropout | s | fwd ms | bwd ms | fwd TFLOP/s | bwd TFLOP/s |\n"
              "|---|---|---|---|---|---|---|---|\n");
  std::vector<Shape> grid;
  for (int d : {64, 128, 192, 256})
    for (bool causal : {false, true})
      for (int s : {2048, 4096, 8192}) grid.push_back({16384 / s, s, 2048 / d, d, causal});
  for (int d : {64, 128})
    for (bool causal : {false, true}) grid.push_back({4, 4096, 2048 / d, d, causal, 0.1f});
  for (const Shape& sh : grid) {
    Buffers buf(sh, 7);
    const float f_ms = median_ms([&] { forward(buf.p); }, 15);
    const float b_ms = median_ms([&] { backward(buf.p); }, 15);
    CK(cudaGetLastError());
    const double flops = 4.0 * sh.b * sh.h * double(sh.s) * sh.s * sh.d / (sh.causal ? 2 : 1);
    std::printf("| %d | %d | %.1f | %d | %.3f | %.3f | %.1f | %.1f |\n", sh.d, sh.causal, sh.dropout, sh.s, f_ms,
                b_ms, flops / f_ms * 1e-9, 2.5 * flops / b_ms * 1e-9);
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 3 && std::string(argv[1]) == "check") return check(argv[2]);
  if (argc >= 2 && std::string(argv[1]) == "time") return time_grid();
  std::fprintf(stderr, "usage: sm80_kernel_ab check FILE | time\n");
  return 2;
}
