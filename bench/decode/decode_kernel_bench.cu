// Kernel-level bench of the CUDA decode kernel, without Python: it includes decode_kernel.cu,
// so compile-time variants of the kernel file can be built side by side and A/B'd in one
// device call (bench/decode/ab.sh). Per point: a check against an fp32 reference computed on
// the GPU (output poisoned first), then the CUDA-event median of --reps calls, the HBM bound
// (K / V bytes over the device-to-device copy bandwidth measured here) and the read rate.
//   nvcc -O3 -std=c++20 --expt-relaxed-constexpr -arch=sm_90a -Iinclude -Isrc -o decode_kernel_bench bench/decode/decode_kernel_bench.cu
//   ./decode_kernel_bench [reps]
#include "backends/cuda/decode_kernel.cu"

#ifndef DECODE_BENCH_VARIANT
#define DECODE_BENCH_VARIANT "base"
#endif

#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <vector>

namespace {

using orchard::DecodeParams;
using orchard::DType;

// decode_kernel.cu's check: throws orchard::Error (caught in main, as decode_cuda's own errors).
using orchard::detail::check_cuda;

__device__ float hash_uniform(unsigned long long i, unsigned seed) {
  unsigned long long x = i * 0x9E3779B97F4A7C15ull + seed * 0xBF58476D1CE4E5B9ull;
  x ^= x >> 31;
  x *= 0x94D049BB133111EBull;
  x ^= x >> 29;
  return static_cast<float>(x >> 40) / static_cast<float>(1ull << 24) * 2.f - 1.f;
}

__global__ void fill_bf16(__nv_bfloat16* p, std::size_t n, unsigned seed) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n; i += std::size_t(gridDim.x) * blockDim.x)
    p[i] = __float2bfloat16(hash_uniform(i, seed));
}

// Row j of batch entry bi, kv head h: contiguous (b, L, hkv, d) or paged (blocks, page, hkv, d).
__device__ const __nv_bfloat16* ref_row(const __nv_bfloat16* base, const int* table, int L, int page, int hkv, int d,
                                        int bi, int j, int h) {
  std::size_t row = table ? std::size_t(table[bi * (L / page) + j / page]) * page + j % page : std::size_t(bi) * L + j;
  return base + (row * hkv + h) * d;
}

// Scores in fp32: one thread per (key, q head, batch).
__global__ void ref_scores(const __nv_bfloat16* q, const __nv_bfloat16* k, const int* table, float* s, int L, int page,
                           int hq, int hkv, int d, float scale) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x, h = blockIdx.y, bi = blockIdx.z;
  if (j >= L) return;
  const __nv_bfloat16* kr = ref_row(k, table, L, page, hkv, d, bi, j, h / (hq / hkv));
  const __nv_bfloat16* qr = q + (std::size_t(bi) * hq + h) * d;
  float acc = 0.f;
  for (int c = 0; c < d; ++c) acc += __bfloat162float(qr[c]) * __bfloat162float(kr[c]);
  s[(std::size_t(bi) * hq + h) * L + j] = acc * scale;
}

// Softmax and P V: one CTA of d threads per (q head, batch).
__global__ void ref_out(const float* s, const __nv_bfloat16* v, const int* table, float* out, int L, int page, int hq,
                        int hkv, int d) {
  const int h = blockIdx.x, bi = blockIdx.y, c = threadIdx.x;
  const float* sr = s + (std::size_t(bi) * hq + h) * L;
  float m = -INFINITY;
  for (int j = 0; j < L; ++j) m = fmaxf(m, sr[j]);
  float l = 0.f, o = 0.f;
  for (int j = 0; j < L; ++j) {
    const float p = __expf(sr[j] - m);
    l += p;
    o += p * __bfloat162float(ref_row(v, table, L, page, hkv, d, bi, j, h / (hq / hkv))[c]);
  }
  out[(std::size_t(bi) * hq + h) * d + c] = o / l;
}

struct Point {
  const char* name;
  int b, hq, hkv, L, d, page;  // page 0: contiguous cache
};

// Median milliseconds of `reps` calls of fn (after 3 warm-up calls), each timed by CUDA events.
template <typename Fn>
double median_ms(int reps, Fn fn) {
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  std::vector<float> t;
  for (int r = 0; r < reps + 3; ++r) {
    cudaEventRecord(e0);
    fn();
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    float ms;
    cudaEventElapsedTime(&ms, e0, e1);
    if (r >= 3) t.push_back(ms);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

double copy_bandwidth() {
  const std::size_t n = std::size_t(2) << 30;
  void *a, *b;
  check_cuda(cudaMalloc(&a, n), "malloc");
  check_cuda(cudaMalloc(&b, n), "malloc");
  const double ms = median_ms(10, [&] { cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice); });
  cudaFree(a);
  cudaFree(b);
  return 2.0 * n / (ms * 1e-3);
}

}  // namespace

int run_bench(int reps) {
  const Point points[] = {
      {"gqa b64 L128k", 64, 32, 4, 131072, 128, 0}, {"gqa b8 L128k", 8, 32, 4, 131072, 128, 0},
      {"gqa b1 L128k", 1, 32, 4, 131072, 128, 0},   {"mha b8 L128k", 8, 32, 32, 131072, 128, 0},
      {"mha b1 L128k", 1, 32, 32, 131072, 128, 0},  {"gqa b64 L32k", 64, 32, 4, 32768, 128, 0},
      {"gqa b64 L32k paged", 64, 32, 4, 32768, 128, 256}, {"gqa b8 L128k d64", 8, 32, 4, 131072, 64, 0},
      {"gqa b8 L32k d256", 8, 16, 2, 32768, 256, 0},  {"mha b8 L8k d120", 8, 32, 32, 8192, 120, 0},
  };
  const double bw = copy_bandwidth();
  std::printf("decode_kernel_bench %s  copy bandwidth %.0f GB/s\n", DECODE_BENCH_VARIANT, bw * 1e-9);
  std::printf("| point | splits | us | bound us | x bound | read TB/s | max err / max ref |\n|---|---|---|---|---|---|---|\n");
  int bad = 0;
  for (const Point& pt : points) {
    const std::size_t rows = std::size_t(pt.b) * pt.L, kv_elems = rows * pt.hkv * pt.d;
    __nv_bfloat16 *k, *v, *q, *out;
    float *s, *ref, *oacc = nullptr, *lacc = nullptr;
    int* table = nullptr;
    check_cuda(cudaMalloc(&k, kv_elems * 2), "malloc k");
    check_cuda(cudaMalloc(&v, kv_elems * 2), "malloc v");
    check_cuda(cudaMalloc(&q, std::size_t(pt.b) * pt.hq * pt.d * 2), "malloc q");
    check_cuda(cudaMalloc(&out, std::size_t(pt.b) * pt.hq * pt.d * 2), "malloc out");
    check_cuda(cudaMalloc(&s, std::size_t(pt.b) * pt.hq * pt.L * 4), "malloc s");
    check_cuda(cudaMalloc(&ref, std::size_t(pt.b) * pt.hq * pt.d * 4), "malloc ref");
    fill_bf16<<<4096, 256>>>(k, kv_elems, 1);
    fill_bf16<<<4096, 256>>>(v, kv_elems, 2);
    fill_bf16<<<64, 256>>>(q, std::size_t(pt.b) * pt.hq * pt.d, 3);
    if (pt.page) {  // a shuffled block table
      const int per = pt.L / pt.page, nblk = pt.b * per;
      std::vector<int> t(nblk);
      for (int i = 0; i < nblk; ++i) t[i] = i;
      unsigned x = 12345;
      for (int i = nblk - 1; i > 0; --i) {
        x = x * 1664525u + 1013904223u;
        std::swap(t[i], t[x % (i + 1)]);
      }
      check_cuda(cudaMalloc(&table, nblk * 4), "malloc table");
      cudaMemcpy(table, t.data(), nblk * 4, cudaMemcpyHostToDevice);
    }
    const float scale = 1.f / std::sqrt(float(pt.d));
    ref_scores<<<dim3((pt.L + 127) / 128, pt.hq, pt.b), 128>>>(q, k, table, s, pt.L, pt.page, pt.hq, pt.hkv, pt.d, scale);
    ref_out<<<dim3(pt.hq, pt.b), pt.d>>>(s, v, table, ref, pt.L, pt.page, pt.hq, pt.hkv, pt.d);
    check_cuda(cudaDeviceSynchronize(), "reference");

    DecodeParams p;
    p.q = q;
    p.k_cache = k;
    p.v_cache = v;
    p.out = out;
    p.q_batch_stride = std::int64_t(pt.hq) * pt.d, p.q_row_stride = p.q_batch_stride, p.q_head_stride = pt.d;
    p.o_batch_stride = p.q_batch_stride, p.o_row_stride = p.q_row_stride, p.o_head_stride = pt.d;
    const std::int64_t row_stride = std::int64_t(pt.hkv) * pt.d;
    p.kc_row_stride = p.vc_row_stride = row_stride, p.kc_head_stride = p.vc_head_stride = pt.d;
    p.b = pt.b, p.sq = 1, p.hq = pt.hq, p.hkv = pt.hkv, p.d = pt.d;
    if (pt.page) {
      p.kc_batch_stride = p.vc_batch_stride = row_stride * pt.page;
      p.capacity = pt.L;
      p.cache_batch = std::int64_t(pt.b) * (pt.L / pt.page);
      p.block_table = table;
      p.block_table_batch_stride = pt.L / pt.page;
      p.page_size = pt.page;
    } else {
      p.kc_batch_stride = p.vc_batch_stride = row_stride * pt.L;
      p.capacity = pt.L;
      p.cache_batch = pt.b;
    }
    p.scale = scale;
    p.dtype = DType::kBFloat16;
    p.num_splits = orchard::detail::decode_cuda_num_splits(std::int64_t(pt.b) * pt.hkv, pt.hq / pt.hkv, pt.L, pt.d,
                                                           DType::kBFloat16, 0);
    if (p.num_splits > 1) {
      check_cuda(cudaMalloc(&oacc, std::size_t(p.num_splits) * pt.b * pt.hq * pt.d * 4), "malloc oacc");
      check_cuda(cudaMalloc(&lacc, std::size_t(p.num_splits) * pt.b * pt.hq * 4), "malloc lacc");
      p.out_accum = oacc, p.lse_accum = lacc;
    }
    // Check: poisoned output, one call, against the fp32 reference.
    cudaMemset(out, 0xff, std::size_t(pt.b) * pt.hq * pt.d * 2);
    orchard::detail::decode_cuda(p);
    check_cuda(cudaDeviceSynchronize(), "decode");
    std::vector<__nv_bfloat16> o_h(std::size_t(pt.b) * pt.hq * pt.d);
    std::vector<float> r_h(o_h.size());
    cudaMemcpy(o_h.data(), out, o_h.size() * 2, cudaMemcpyDeviceToHost);
    cudaMemcpy(r_h.data(), ref, r_h.size() * 4, cudaMemcpyDeviceToHost);
    double err = 0, mref = 0;
    for (std::size_t i = 0; i < o_h.size(); ++i) {
      const double o = __bfloat162float(o_h[i]);
      err = std::isfinite(o) ? std::max(err, std::fabs(o - r_h[i])) : INFINITY;
      mref = std::max(mref, double(std::fabs(r_h[i])));
    }
    const double rel = err / mref;
    // bf16 output rounding is 2^-9 relative; the kernel's bf16 P adds a little more.
    const bool ok = rel < 1.5e-2;
    bad += !ok;
    // Timing.
    const double us = median_ms(reps, [&] { orchard::detail::decode_cuda(p); }) * 1e3;
    const double bytes = 2.0 * kv_elems * 2, bound = bytes / bw * 1e6;
    std::printf("| %s | %d | %.1f | %.1f | %.3f | %.2f | %.2e%s |\n", pt.name, p.num_splits, us, bound, us / bound,
                bytes / (us * 1e-6) * 1e-12, rel, ok ? "" : " FAIL");
    std::fflush(stdout);
    cudaFree(k), cudaFree(v), cudaFree(q), cudaFree(out), cudaFree(s), cudaFree(ref);
    if (table) cudaFree(table);
    if (oacc) cudaFree(oacc), cudaFree(lacc);
  }
  std::printf("%s\n", bad ? "CHECKS FAILED" : "all checks passed");
  return bad ? 1 : 0;
}

int main(int argc, char** argv) {
  try {
    return run_bench(argc > 1 ? std::atoi(argv[1]) : 20);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "decode_kernel_bench: %s\n", e.what());
    return 2;
  }
}
