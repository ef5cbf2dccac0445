// sm90 attention forward (src/backends/cuda/sm90/flash_fwd_sm90.cuh): correctness + speed.
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Iinclude -Isrc \
//        bench/sm90/sm90_attn_bench.cu -o sm90_attn_bench
//   ./sm90_attn_bench [all|checks|grid|quick|causal]   (causal: the causal grid points, timed only)
//   ./sm90_attn_bench one D S CAUSAL                    (one FA-grid shape, 5 timed calls: for ncu)
// -DSM90_BENCH_LIBRARY_ONLY builds the library entry alone (no kernel variants): quick to build,
// and with -I another tree's src / include, the A/B binary of that tree's forward.
// Per shape (dtype, d, causal, b, hq, hkv, s): fresh random Q/K/V (BSHD), O and LSE poisoned
// (NaN) before the checked run, then checked on a sample of query rows against a GPU
// reference with fp32 arithmetic on the same 16-bit inputs.  The tolerance is
// ARCHITECTURE.md's rule: err(kernel vs fp32 ref) <= 2 * err(naive low-precision vs fp32 ref)
// + atol, where the naive low-precision version rounds S, P (after softmax) and O to the
// input dtype as a plain framework implementation would.  Then CUDA-event timing (median of
// reps) of both variants (overlap on / off) and TFLOP/s = 4 b hq s^2 d (/2 causal) / time.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "backends/cuda/sm90/flash_fwd_sm90.cuh"
#include "bench_util.cuh"

using orchard::FwdParams;

// Reference for one (b, h, sampled row) per block: scores over all keys in smem, fp32 math.
// Writes ref32 O/LSE and the naive low-precision O/LSE.
template <typename T>
__global__ void ref_kernel(const T* q, const T* k, const T* v, int b_, int hq, int hkv, int sq, int sk, int d,
                           float scale, bool causal, int64_t coff, const int* rows, int nrows, float* o32,
                           float* olp, float* lse32, float* lselp) {
  extern __shared__ float sm[];
  float* s32 = sm;        // [sk]
  float* slp = sm + sk;   // [sk]
  __shared__ float red[2][32];
  const int ri = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int row = rows[ri];
  const int hk = h / (hq / hkv);
  const T* qr = q + ((int64_t)(b * sq + row) * hq + h) * d;
  float m32 = -INFINITY, mlp = -INFINITY;
  for (int j = threadIdx.x; j < sk; j += blockDim.x) {
    const T* kr = k + ((int64_t)(b * sk + j) * hkv + hk) * d;
    float acc = 0.f;
    for (int c = 0; c < d; ++c) acc += to_f(qr[c]) * to_f(kr[c]);
    const bool masked = causal && (int64_t)j > row + coff;
    const float a = masked ? -INFINITY : acc * scale;
    const float alp = masked ? -INFINITY : round_t<T>(round_t<T>(acc) * scale);
    s32[j] = a; slp[j] = alp;
    m32 = fmaxf(m32, a); mlp = fmaxf(mlp, alp);
  }
  auto block_max = [&](float x, int slot) {
    for (int o = 16; o; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    if (threadIdx.x % 32 == 0) red[slot][threadIdx.x / 32] = x;
    __syncthreads();
    float r = -INFINITY;
    for (int w = 0; w < (int)blockDim.x / 32; ++w) r = fmaxf(r, red[slot][w]);
    __syncthreads();
    return r;
  };
  auto block_sum = [&](float x, int slot) {
    for (int o = 16; o; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    if (threadIdx.x % 32 == 0) red[slot][threadIdx.x / 32] = x;
    __syncthreads();
    float r = 0.f;
    for (int w = 0; w < (int)blockDim.x / 32; ++w) r += red[slot][w];
    __syncthreads();
    return r;
  };
  m32 = block_max(m32, 0);
  mlp = block_max(mlp, 1);
  float l32 = 0.f, llp = 0.f;
  for (int j = threadIdx.x; j < sk; j += blockDim.x) {
    const float e32 = m32 == -INFINITY ? 0.f : expf(s32[j] - m32);
    const float elp = mlp == -INFINITY ? 0.f : expf(slp[j] - mlp);
    s32[j] = e32; slp[j] = elp;
    l32 += e32; llp += elp;
  }
  l32 = block_sum(l32, 0);
  llp = block_sum(llp, 1);
  __syncthreads();
  const int64_t orow = ((int64_t)(b * hq + h) * nrows + ri);
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    float a32 = 0.f, alp = 0.f;
    for (int j = 0; j < sk; ++j) {
      const float vv = to_f(v[((int64_t)(b * sk + j) * hkv + hk) * d + c]);
      a32 += s32[j] * vv;
      alp += round_t<T>(llp > 0.f ? slp[j] / llp : 0.f) * vv;  // P rounded, as a framework would
    }
    o32[orow * d + c] = l32 > 0.f ? a32 / l32 : 0.f;
    olp[orow * d + c] = round_t<T>(alp);
  }
  if (threadIdx.x == 0) {
    lse32[orow] = l32 > 0.f ? m32 + logf(l32) : -INFINITY;
    lselp[orow] = llp > 0.f ? mlp + logf(llp) : -INFINITY;
  }
}

template <typename T>
__global__ void gather_kernel(const T* out, const float* lse, const int* rows, int nrows, int hq, int sq, int d,
                              float* og, float* lg) {
  const int ri = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int row = rows[ri];
  const int64_t orow = ((int64_t)(b * hq + h) * nrows + ri);
  for (int c = threadIdx.x; c < d; c += blockDim.x) og[orow * d + c] = to_f(out[((int64_t)(b * sq + row) * hq + h) * d + c]);
  if (threadIdx.x == 0) lg[orow] = lse[(int64_t)(b * hq + h) * sq + row];
}

struct Shape {
  bool fp16;
  int d;
  bool causal;
  int b, hq, hkv, s;
};

template <typename T, int kBucket>
bool run_shape(const Shape& sh, int reps, bool check) {
  const int kD = sh.d;  // the true head dim (<= the kernel bucket; TMA zero-fills the rest)
  const int b = sh.b, hq = sh.hq, hkv = sh.hkv, sq = sh.s, sk = sh.s;
  const int64_t nq = (int64_t)b * sq * hq * kD, nk = (int64_t)b * sk * hkv * kD;
  T *q, *k, *v, *o;
  float* lse;
  CK(cudaMalloc(&q, nq * sizeof(T)));
  CK(cudaMalloc(&k, nk * sizeof(T)));
  CK(cudaMalloc(&v, nk * sizeof(T)));
  CK(cudaMalloc(&o, nq * sizeof(T)));
  CK(cudaMalloc(&lse, (int64_t)b * hq * sq * sizeof(float)));
  static uint64_t seed = 1;
  fill_kernel<<<1024, 256>>>(q, nq, seed++);
  fill_kernel<<<1024, 256>>>(k, nk, seed++);
  fill_kernel<<<1024, 256>>>(v, nk, seed++);
  FwdParams p{};
  p.q = q; p.k = k; p.v = v; p.out = o; p.lse = lse;
  p.q_batch_stride = (int64_t)sq * hq * kD; p.q_row_stride = (int64_t)hq * kD; p.q_head_stride = kD;
  p.k_batch_stride = (int64_t)sk * hkv * kD; p.k_row_stride = (int64_t)hkv * kD; p.k_head_stride = kD;
  p.v_batch_stride = p.k_batch_stride; p.v_row_stride = p.k_row_stride; p.v_head_stride = kD;
  p.o_batch_stride = p.q_batch_stride; p.o_row_stride = p.q_row_stride; p.o_head_stride = kD;
  p.lse_batch_stride = (int64_t)hq * sq; p.lse_head_stride = sq;
  p.b = b; p.sq = sq; p.sk = sk; p.hq = hq; p.hkv = hkv; p.d = kD; p.d_v = kD;
  p.scale = 1.f / std::sqrt((float)kD);
  p.causal = sh.causal; p.causal_offset = sk - sq;
  const char* tn = sh.fp16 ? "fp16" : "bf16";
  bool ok = true;
  char label[128];
  std::snprintf(label, sizeof label, "%s d%-3d %-6s b%-2d hq%-2d hkv%-2d s%-5d", tn, kD, sh.causal ? "causal" : "full",
                b, hq, hkv, sq);

  // Variants: "library" = the library's entry (run_flash_fwd_sm90: its per-d / per-length
  // choice), then the kernel's configurations (overlap or plain order, key tile kBN, consumer
  // warpgroups kWG) worth comparing at this head-dim bucket.
  namespace s9 = orchard::sm90;
  struct Variant {
    const char* name;
    bool (*launch)(const FwdParams&);
  };
  std::vector<Variant> variants = {{"library", orchard::cuda::run_flash_fwd_sm90<T, kBucket>}};
#ifndef SM90_BENCH_LIBRARY_ONLY  // (-D...: the library entry alone, a build of a few kernels for A/B)
  variants.push_back({"overlap", s9::launch_flash_fwd_sm90<T, kBucket, true>});
  variants.push_back({"plain", s9::launch_flash_fwd_sm90<T, kBucket, false>});
  if constexpr (kBucket <= 128) {
    variants.push_back({"ovl-n192", s9::launch_flash_fwd_sm90<T, kBucket, true, 192>});
    variants.push_back({"pln-n192", s9::launch_flash_fwd_sm90<T, kBucket, false, 192>});
  }
  if constexpr (kBucket == 128) {  // FA3's d128 non-causal key tile (176), and 160
    variants.push_back({"ovl-n160", s9::launch_flash_fwd_sm90<T, kBucket, true, 160>});
    variants.push_back({"ovl-n176", s9::launch_flash_fwd_sm90<T, kBucket, true, 176>});
  }
  if constexpr (kBucket == 64) {  // FA3's d64 tile: 3 consumer warpgroups (192 query rows)
    variants.push_back({"pln-wg3", s9::launch_flash_fwd_sm90<T, kBucket, false, 128, 3>});
    variants.push_back({"ovl-wg3", s9::launch_flash_fwd_sm90<T, kBucket, true, 128, 3>});
  }
  if constexpr (kBucket == 256) {  // 80 keys: the most two stages of K and V fit beside Q
    variants.push_back({"ovl-n80", s9::launch_flash_fwd_sm90<T, kBucket, true, 80>});
  }
  if constexpr (kBucket == 192) {  // key tiles 64..112 (2 stages of 128 keys do not fit in smem)
    variants.push_back({"ovl-n80", s9::launch_flash_fwd_sm90<T, kBucket, true, 80>});
    variants.push_back({"ovl-n96", s9::launch_flash_fwd_sm90<T, kBucket, true, 96>});
    variants.push_back({"ovl-n112", s9::launch_flash_fwd_sm90<T, kBucket, true, 112>});
    variants.push_back({"pln-n96", s9::launch_flash_fwd_sm90<T, kBucket, false, 96>});
    variants.push_back({"pln-n112", s9::launch_flash_fwd_sm90<T, kBucket, false, 112>});
  }
#endif
  for (const Variant& var : variants) {
    auto launch = [&]() { return var.launch(p); };
    const char* vname = var.name;
    if (check) {
      CK(cudaMemset(o, 0xFF, nq * sizeof(T)));  // NaN poison
      CK(cudaMemset(lse, 0xFF, (int64_t)b * hq * sq * sizeof(float)));
      if (!launch()) { std::printf("%s: tensor map encode failed\n", label); return false; }
      CK(cudaGetLastError());
      CK(cudaDeviceSynchronize());
      // Sample rows: the first / last 130, plus a spread (covers both WGs, ragged ends, diagonals).
      std::vector<int> rows;
      for (int r = 0; r < std::min(sq, 130); ++r) rows.push_back(r);
      for (int r = std::max(130, sq - 130); r < sq; ++r) rows.push_back(r);
      for (int r = 131; r < sq - 130; r += 97) rows.push_back(r);
      const int nr = (int)rows.size();
      int* drows;
      float *o32, *olp, *l32, *llp, *og, *lg;
      const int64_t no = (int64_t)b * hq * nr;
      CK(cudaMalloc(&drows, nr * sizeof(int)));
      CK(cudaMemcpy(drows, rows.data(), nr * sizeof(int), cudaMemcpyHostToDevice));
      for (float** pp : {&o32, &olp, &og}) CK(cudaMalloc(pp, no * kD * sizeof(float)));
      for (float** pp : {&l32, &llp, &lg}) CK(cudaMalloc(pp, no * sizeof(float)));
      const int smem = 2 * sk * sizeof(float);
      CK(cudaFuncSetAttribute(ref_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      ref_kernel<T><<<dim3(nr, hq, b), 256, smem>>>(q, k, v, b, hq, hkv, sq, sk, kD, p.scale, sh.causal, p.causal_offset,
                                                    drows, nr, o32, olp, l32, llp);
      gather_kernel<T><<<dim3(nr, hq, b), 128>>>(o, lse, drows, nr, hq, sq, kD, og, lg);
      CK(cudaGetLastError());
      CK(cudaDeviceSynchronize());
      std::vector<float> h32(no * kD), hlp(no * kD), hg(no * kD), hl32(no), hllp(no), hlg(no);
      CK(cudaMemcpy(h32.data(), o32, no * kD * 4, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(hlp.data(), olp, no * kD * 4, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(hg.data(), og, no * kD * 4, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(hl32.data(), l32, no * 4, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(hllp.data(), llp, no * 4, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(hlg.data(), lg, no * 4, cudaMemcpyDeviceToHost));
      double e_o = 0, e_olp = 0, e_l = 0, e_llp = 0;
      bool nan = false;
      for (int64_t i = 0; i < no * kD; ++i) {
        if (!std::isfinite(hg[i])) nan = true;
        e_o = std::max(e_o, (double)std::fabs(hg[i] - h32[i]));
        e_olp = std::max(e_olp, (double)std::fabs(hlp[i] - h32[i]));
      }
      for (int64_t i = 0; i < no; ++i) {
        if (std::isinf(hl32[i]) && hlg[i] == hl32[i]) continue;  // both -inf: a row with no key
        if (!std::isfinite(hlg[i])) nan = true;
        e_l = std::max(e_l, (double)std::fabs(hlg[i] - hl32[i]));
        e_llp = std::max(e_llp, (double)std::fabs(hllp[i] - hl32[i]));
      }
      const bool pass = !nan && e_o <= 2 * e_olp + 1e-4 && e_l <= 2 * e_llp + 1e-4;
      ok &= pass;
      std::printf("CHECK %s %-7s rows=%d  out err %.3e (naive lowp %.3e)  lse err %.3e (lowp %.3e)%s  %s\n", label,
                  vname, nr, e_o, e_olp, e_l, e_llp, nan ? " NaN/poison left" : "",
                  pass ? "PASS" : "FAIL");
      cudaFree(drows);
      for (float* x : {o32, olp, og, l32, llp, lg}) cudaFree(x);
    }
    if (reps > 0) {
      // SM90_BENCH_DROPOUT=<p>: the timed runs (not the checks) with dropout p (FLOPs as without).
      static const float drop_p = std::getenv("SM90_BENCH_DROPOUT") ? std::atof(std::getenv("SM90_BENCH_DROPOUT")) : 0.f;
      p.dropout_p = drop_p;
      p.seed = 1234;
      p.offset = 0;
      if (drop_p > 0.f && !launch()) {
        std::printf("%s %s: declined dropout %.2f\n", label, vname, drop_p);
        p.dropout_p = 0.f;
        continue;
      }
      const double med = median_ms(launch, reps);
      CK(cudaGetLastError());
      p.dropout_p = 0.f;
      const double flops = 4.0 * b * hq * (double)sq * sk * kD / (sh.causal ? 2.0 : 1.0);
      char tag[16] = "";
      if (drop_p > 0.f) std::snprintf(tag, sizeof tag, " drop%.2f", drop_p);
      std::printf("TIME %s%s %-8s %8.3f ms  %6.1f TFLOP/s\n", label, tag, vname, med, flops / med / 1e9);
    }
  }
  cudaFree(q); cudaFree(k); cudaFree(v); cudaFree(o); cudaFree(lse);
  return ok;
}

// -DSM90_BENCH_BUCKET=<64|96|128|192|256>: build and run one head-dim bucket only (a shorter
// build for an experiment on that bucket); shapes of other buckets are skipped.
// -DSM90_BENCH_D96_BUCKET=128 runs the d96 bucket's shapes on the d128 kernels (the library's d96
// forward before session 28: the A/B baseline of the d96 bucket).
#ifndef SM90_BENCH_BUCKET
#define SM90_BENCH_BUCKET 0
#endif
#ifndef SM90_BENCH_D96_BUCKET
#define SM90_BENCH_D96_BUCKET 96
#endif

template <typename T, int kBucket>
bool run_if_built(const Shape& sh, int reps, bool check) {
  constexpr int kKernels = kBucket == 96 ? SM90_BENCH_D96_BUCKET : kBucket;
  if constexpr (SM90_BENCH_BUCKET == 0 || SM90_BENCH_BUCKET == kBucket) return run_shape<T, kKernels>(sh, reps, check);
  return true;
}

bool run(const Shape& sh, int reps, bool check) {
  switch (orchard::cuda::sm90_head_dim_bucket(sh.d)) {
    case 64: return sh.fp16 ? run_if_built<__half, 64>(sh, reps, check) : run_if_built<__nv_bfloat16, 64>(sh, reps, check);
    case 96:
      return sh.fp16 ? run_if_built<__half, 96>(sh, reps, check) : run_if_built<__nv_bfloat16, 96>(sh, reps, check);
    case 128: return sh.fp16 ? run_if_built<__half, 128>(sh, reps, check) : run_if_built<__nv_bfloat16, 128>(sh, reps, check);
    case 192: return sh.fp16 ? run_if_built<__half, 192>(sh, reps, check) : run_if_built<__nv_bfloat16, 192>(sh, reps, check);
    default: return sh.fp16 ? run_if_built<__half, 256>(sh, reps, check) : run_if_built<__nv_bfloat16, 256>(sh, reps, check);
  }
}

// The FlashAttention grid's shape at head dim d and length s (bf16, MHA): b * s = 16k tokens,
// hq * d = 2048 (d192: hq 10).
int fa_grid_heads(int d) { return d == 192 ? 10 : 2048 / d; }
Shape fa_grid_shape(int d, int s, bool causal) {
  const int h = fa_grid_heads(d);
  return {false, d, causal, std::max(1, 16384 / s), h, h, s};
}

int main(int argc, char** argv) {
  setvbuf(stdout, nullptr, _IOLBF, 0);  // a hang (killed by timeout) still leaves every line before it
  int fails = 0;
  const std::string mode = argc > 1 ? argv[1] : "all";  // all | checks | grid | quick | causal | d<head dim> | one
  if (mode == "one") {  // one D S CAUSAL: the FA grid's shape
    if (argc < 5) {
      std::fprintf(stderr, "usage: %s one D S CAUSAL\n", argv[0]);
      return 2;
    }
    return run(fa_grid_shape(std::atoi(argv[2]), std::atoi(argv[3]), std::atoi(argv[4]) != 0), 5, false) ? 0 : 1;
  }
  // Correctness: ragged lengths, GQA, causal, both dtypes, every head dim.
  const Shape checks[] = {
      {false, 128, false, 2, 4, 4, 1000}, {false, 128, true, 2, 4, 2, 1000}, {true, 128, false, 1, 4, 1, 777},
      {true, 128, true, 1, 4, 4, 2048},   {false, 128, true, 1, 2, 2, 77},   {false, 64, false, 2, 4, 2, 1000},
      {false, 64, true, 1, 4, 4, 1500},   {true, 64, true, 1, 2, 1, 513},    {false, 256, false, 1, 4, 2, 700},
      {false, 256, true, 1, 4, 4, 1025},  {true, 256, true, 1, 2, 2, 300},   {false, 128, false, 1, 16, 16, 8192},
      // head dims below their bucket (zero-filled tile columns) and the d192 bucket
      {false, 192, false, 2, 4, 2, 1000}, {true, 192, true, 1, 4, 4, 777},   {false, 96, true, 2, 4, 2, 1000},
      {true, 96, false, 1, 2, 1, 513},    {false, 160, true, 1, 4, 4, 1025}, {false, 40, false, 2, 4, 4, 700},
      {false, 200, true, 1, 2, 2, 300},
      // causal with more tiles than SMs (persistent CTAs run several; one CTA per tile above
      // sq 4096 / d128), odd m-block counts, GQA
      {false, 128, true, 2, 16, 16, 8192}, {true, 64, true, 4, 32, 8, 1700}, {false, 256, true, 2, 8, 8, 4100},
      {false, 192, true, 2, 10, 5, 3000},
      // the d96 bucket (64B-swizzled chunks): d80 / d88 through it, the wide key tiles (>= 2048
      // keys), causal with more tiles than SMs
      {false, 80, false, 2, 4, 2, 1000},  {true, 88, true, 1, 4, 4, 777},    {false, 96, false, 1, 8, 8, 4096},
      {true, 96, true, 2, 16, 8, 3000},
  };
  if (mode != "grid" && mode != "quick" && mode != "causal" && mode[0] != 'd')
    for (const Shape& s : checks) fails += !run(s, 0, true);
  // Speed grid (b * s = 16k tokens, hq * d = 2048); checked once more on the big shapes.
  const Shape grid[] = {
      {false, 128, false, 8, 16, 16, 2048}, {false, 128, true, 8, 16, 16, 2048}, {false, 128, false, 2, 16, 16, 8192},
      {false, 128, true, 2, 16, 16, 8192},  {false, 128, false, 1, 16, 16, 16384}, {false, 128, true, 1, 16, 16, 16384},
      {false, 64, false, 2, 32, 32, 8192},  {false, 64, true, 2, 32, 32, 8192},   {true, 128, false, 2, 16, 16, 8192},
      {false, 256, false, 4, 8, 8, 4096},   {false, 256, true, 4, 8, 8, 4096},    {false, 128, false, 2, 16, 2, 8192},
      {false, 128, false, 32, 16, 16, 512}, {false, 128, true, 32, 16, 16, 512}, {false, 64, false, 16, 32, 32, 1024},
      {false, 64, false, 8, 32, 32, 2048},  {false, 64, true, 8, 32, 32, 2048},
      {false, 192, false, 4, 10, 10, 4096}, {false, 192, true, 4, 10, 10, 4096}, {false, 96, false, 2, 21, 21, 8192},
      {false, 96, true, 2, 21, 21, 8192},   {false, 160, false, 4, 12, 12, 4096}, {false, 160, true, 4, 12, 12, 4096},
  };
  // causal: causal points at b * s = 16k tokens, hq * d = 2048 (d192: hq 10), s 512..16k, and
  // one non-causal control; timed only (A/B of the causal tile orders, kFwdSm90PairsCausalTiles).
  std::vector<Shape> causal_grid;
  for (int d : {64, 128, 192, 256})
    for (int s : {512, 1024, 2048, 4096, 8192, 16384}) causal_grid.push_back(fa_grid_shape(d, s, true));
  causal_grid.push_back({false, 128, false, 2, 16, 16, 8192});
  // d<D> (d128, d192, d256): one bucket's key-tile experiment (dev/cuda/NOTES.md "What is
  // left" 3): checks on ragged / GQA / causal shapes of head dim D, then timed non-causal points
  // at s 1k..16k (b * s = 16k tokens, hq * D ~ 2048: d192 hq 10), fp16 at s4k, causal s2k..16k.
  // d192 adds d160 (the same bucket). PEER_GRID=d<D> gives attn_peers.py's matching shapes.
  if (mode.size() > 1 && mode[0] == 'd' && std::isdigit(static_cast<unsigned char>(mode[1]))) {
    const int d = std::atoi(mode.c_str() + 1);
    const int h = fa_grid_heads(d);
    const Shape tile_checks[] = {{false, d, false, 2, 4, 2, 1000}, {true, d, false, 1, 4, 4, 777},
                                 {false, d, true, 1, 4, 4, 1025}, {false, d, false, 1, h, h, 4096},
                                 {false, d, true, 1, 4, 2, 2200}};  // 192-row tiles: a WG of phantom rows
    std::vector<Shape> tile_grid;
    for (int sl : {1024, 2048, 4096, 8192, 16384}) tile_grid.push_back(fa_grid_shape(d, sl, false));
    tile_grid.push_back({true, d, false, 4, h, h, 4096});
    if (d == 192) tile_grid.push_back({false, 160, false, 4, 12, 12, 4096});
    for (int sl : {2048, 4096, 8192, 16384}) tile_grid.push_back(fa_grid_shape(d, sl, true));
    for (const Shape& sh : tile_checks) fails += !run(sh, 0, true);
    for (const Shape& sh : tile_grid) fails += !run(sh, 30, false);
  } else if (mode == "causal")
    for (const Shape& s : causal_grid) fails += !run(s, 20, false);
  else if (mode != "checks")
    for (const Shape& s : grid) fails += !run(s, mode == "quick" ? 5 : 20, false);
  std::printf("sm90 attention bench: %d failing shape(s)\n", fails);
  return fails ? 1 : 0;
}
