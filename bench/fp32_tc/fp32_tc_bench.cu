// float32 3xTF32 tensor-core attention (src/backends/cuda/flash_fp32_tc.cu): correctness + speed.
// One translation unit that includes the kernel file itself, so that nvcc -D flags reach it: a
// variant of that file builds in seconds instead of a package build (A/B: bench/fp32_tc/ab.sh).
//   nvcc -O3 -std=c++20 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr
//        -Iinclude -Isrc bench/fp32_tc/fp32_tc_bench.cu -o fp32_tc_bench    (one command line)
//   ./fp32_tc_bench [checks | fwd_d64 | fwd_d128 | bwd_d64 | bwd_d128 | all]   (default all:
//   the four timed modes; fwd_d<D> / bwd_d<D> time any head dim the kernels take)
//   ./fp32_tc_bench one fwd|bwd D S CAUSAL   (one shape, b2 h16: bench/fp32_tc/prof.sh's ncu target)
// Layout: dense (B, S, H, D) fp32 tensors, dv = d, GQA where hkv < hq; causal is bottom-right
// aligned (flash-attn), as the core hands it over (causal = true, window_right = 0).
// checks: small ragged / GQA / causal shapes; O and LSE poisoned (NaN bytes) before the forward,
// dQ / dK / dV before the backward (which runs on the forward's O and LSE, as in training), all
// compared over every element with a naive fp64 GPU reference on the same fp32 inputs, then the
// backward rerun for bitwise equality (the kernels promise determinism). Tolerances are
// dev/fp32_emu/emu_test.cpp's, which the emulator calibrated for these kernels (see judge_*).
// Timing: CUDA-event median of 20 calls after warm-up. TFLOP/s: forward 4 b hq sq sk d (two
// GEMMs), backward 2.5x that (five), both halved when causal.
#include "backends/cuda/flash_fp32_tc.cu"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../sm90/bench_util.cuh"  // check_launch, opt_in_dynamic_smem, CK, the fill, median_ms

using orchard::BwdParams;
using orchard::FwdParams;

// fill_kernel<float> (bench_util.cuh converts through from_f).
template <>
__device__ float from_f<float>(float x) {
  return x;
}

namespace {

struct Shape {
  int b, hq, hkv, sq, sk, d;
  bool causal;
};

std::string describe(const Shape& s) {
  char buf[128];
  std::snprintf(buf, sizeof buf, "b%d hq%d hkv%d sq%d sk%d d%d%s", s.b, s.hq, s.hkv, s.sq, s.sk, s.d,
                s.causal ? " causal" : "");
  return buf;
}

// Element (bi, row, h, e) of a dense (B, rows, heads, d) tensor.
__host__ __device__ int64_t bshd(int bi, int row, int rows, int h, int heads, int d) {
  return ((static_cast<int64_t>(bi) * rows + row) * heads + h) * d;
}

// The device tensors of one shape; the backward's only when asked for.
struct Buffers {
  float *q = nullptr, *k = nullptr, *v = nullptr, *out = nullptr, *lse = nullptr;
  float *dout = nullptr, *dq = nullptr, *dk = nullptr, *dv = nullptr, *dsum = nullptr;
  int64_t nq = 0, nk = 0, nrows = 0;  // elements of q-shaped, k-shaped tensors; (b, hq, sq) rows

  Buffers(const Shape& s, bool bwd, uint64_t seed) {
    nq = static_cast<int64_t>(s.b) * s.sq * s.hq * s.d;
    nk = static_cast<int64_t>(s.b) * s.sk * s.hkv * s.d;
    nrows = static_cast<int64_t>(s.b) * s.hq * s.sq;
    auto alloc = [](float*& p, int64_t n) { CK(cudaMalloc(&p, std::max<int64_t>(n, 1) * sizeof(float))); };
    uint64_t draw = seed * 16;  // each tensor its own draws, each seed its own tensors
    auto fill = [&](float* p, int64_t n) { fill_kernel<float><<<1024, 256>>>(p, n, draw++); };
    alloc(q, nq), alloc(k, nk), alloc(v, nk), alloc(out, nq), alloc(lse, nrows);
    fill(q, nq), fill(k, nk), fill(v, nk);
    if (bwd) {
      alloc(dout, nq), alloc(dq, nq), alloc(dk, nk), alloc(dv, nk), alloc(dsum, nrows);
      fill(dout, nq);
    }
    CK(cudaGetLastError());
  }
  ~Buffers() {
    for (float* p : {q, k, v, out, lse, dout, dq, dk, dv, dsum}) cudaFree(p);
  }
  Buffers(const Buffers&) = delete;
  Buffers& operator=(const Buffers&) = delete;
};

// The params as the core fills them for a dense call (emu_test.cpp follows attention.cpp's
// set_problem): BSHD strides, LSE (b, hq, sq), scale 1/sqrt(d), causal as window_right = 0 on
// the bottom-right diagonal, no other feature. Its FwdParams part is the forward's.
BwdParams make_params(const Shape& s, const Buffers& t) {
  BwdParams p;
  p.q = t.q, p.k = t.k, p.v = t.v, p.out = t.out, p.lse = t.lse;
  p.q_head_stride = s.d, p.q_row_stride = int64_t{s.hq} * s.d, p.q_batch_stride = int64_t{s.sq} * s.hq * s.d;
  p.k_head_stride = s.d, p.k_row_stride = int64_t{s.hkv} * s.d, p.k_batch_stride = int64_t{s.sk} * s.hkv * s.d;
  p.v_head_stride = p.k_head_stride, p.v_row_stride = p.k_row_stride, p.v_batch_stride = p.k_batch_stride;
  p.o_head_stride = p.q_head_stride, p.o_row_stride = p.q_row_stride, p.o_batch_stride = p.q_batch_stride;
  p.lse_head_stride = s.sq, p.lse_batch_stride = int64_t{s.hq} * s.sq;
  p.b = s.b, p.sq = s.sq, p.sk = s.sk, p.hq = s.hq, p.hkv = s.hkv, p.d = s.d, p.d_v = s.d;
  p.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(s.d)));
  p.scale_f64 = p.scale;
  p.causal_offset = int64_t{s.sk} - s.sq;
  p.window_left = -1;
  p.window_right = s.causal ? 0 : -1;
  p.causal = s.causal;
  p.dtype = orchard::DType::kFloat32;
  p.dout = t.dout, p.dq = t.dq, p.dk = t.dk, p.dv = t.dv;
  p.do_head_stride = p.dq_head_stride = p.q_head_stride;
  p.do_row_stride = p.dq_row_stride = p.q_row_stride;
  p.do_batch_stride = p.dq_batch_stride = p.q_batch_stride;
  p.dk_head_stride = p.dv_head_stride = p.k_head_stride;
  p.dk_row_stride = p.dv_row_stride = p.k_row_stride;
  p.dk_batch_stride = p.dv_batch_stride = p.k_batch_stride;
  p.deterministic = true;  // (what these kernels are either way: no atomics)
  return p;
}

// D = rowsum(dO * O) at dsum[(b * hq + h) * sq + i], where the backward kernels read it (the
// library's pre-pass, flash_fp32.cu, writes the same into its workspace). Untimed set-up.
__global__ void dsum_kernel(const float* out, const float* dout, float* dsum, Shape s) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= static_cast<int64_t>(s.b) * s.hq * s.sq) return;
  const int i = r % s.sq, h = r / s.sq % s.hq, bi = r / (static_cast<int64_t>(s.sq) * s.hq);
  const int64_t at = bshd(bi, i, s.sq, h, s.hq, s.d);
  double acc = 0;
  for (int e = 0; e < s.d; ++e) acc += static_cast<double>(out[at + e]) * dout[at + e];
  dsum[r] = static_cast<float>(acc);
}

// ---- naive fp64 reference ------------------------------------------------------------------
// One thread per query row (forward, dQ) or per key row (dK / dV), accumulators in local
// memory: slow, but only the checks' small shapes run it.
constexpr int kRefMaxD = 128;

// Whether query row i sees key j: causal bottom-right aligned (flash-attn).
__device__ bool sees(const Shape& s, int i, int j) { return !s.causal || j <= i + (s.sk - s.sq); }
__device__ double dot(const float* a, const float* b, int n) {
  double acc = 0;
  for (int e = 0; e < n; ++e) acc += static_cast<double>(a[e]) * b[e];
  return acc;
}

// out (BSHD) and lse (b, hq, sq); a row that sees no key: out 0, lse -inf.
__global__ void ref_fwd_kernel(const float* q, const float* k, const float* v, Shape s, double scale, double* out,
                               double* lse) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= static_cast<int64_t>(s.b) * s.hq * s.sq) return;
  const int i = r % s.sq, h = r / s.sq % s.hq, bi = r / (static_cast<int64_t>(s.sq) * s.hq);
  const int hk = h / (s.hq / s.hkv);
  const float* qi = q + bshd(bi, i, s.sq, h, s.hq, s.d);
  double m = -INFINITY;
  for (int j = 0; j < s.sk; ++j)
    if (sees(s, i, j)) m = fmax(m, scale * dot(qi, k + bshd(bi, j, s.sk, hk, s.hkv, s.d), s.d));
  double acc[kRefMaxD] = {};
  double sum = 0;
  if (m > -INFINITY)
    for (int j = 0; j < s.sk; ++j) {
      if (!sees(s, i, j)) continue;
      const double pj = exp(scale * dot(qi, k + bshd(bi, j, s.sk, hk, s.hkv, s.d), s.d) - m);
      const float* vj = v + bshd(bi, j, s.sk, hk, s.hkv, s.d);
      sum += pj;
      for (int e = 0; e < s.d; ++e) acc[e] += pj * vj[e];
    }
  double* o = out + bshd(bi, i, s.sq, h, s.hq, s.d);
  for (int e = 0; e < s.d; ++e) o[e] = sum > 0 ? acc[e] / sum : 0.0;
  lse[r] = sum > 0 ? m + log(sum) : -INFINITY;
}

// The gradient of sum(dO * out): P = exp(s - lse), dP = dO . v_j, D = dO . out = sum_j P dP,
// dS = P (dP - D), dq_i = scale sum_j dS k_j. mag: the sum of the terms' magnitudes before
// cancellation (dS counted as P (|dP| + |D|)), the scale judge_grad measures errors against.
// D (fp64) is written for ref_dkdv_kernel.
__global__ void ref_dq_kernel(const float* q, const float* k, const float* v, const float* dout, Shape s,
                              double scale, const double* out, const double* lse, double* dq, double* dq_mag,
                              double* dsum) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= static_cast<int64_t>(s.b) * s.hq * s.sq) return;
  const int i = r % s.sq, h = r / s.sq % s.hq, bi = r / (static_cast<int64_t>(s.sq) * s.hq);
  const int hk = h / (s.hq / s.hkv);
  const int64_t at = bshd(bi, i, s.sq, h, s.hq, s.d);
  const float *qi = q + at, *doi = dout + at;
  double D = 0;
  for (int e = 0; e < s.d; ++e) D += doi[e] * out[at + e];
  dsum[r] = D;
  double acc[kRefMaxD] = {}, mag[kRefMaxD] = {};
  if (lse[r] > -INFINITY)
    for (int j = 0; j < s.sk; ++j) {
      if (!sees(s, i, j)) continue;
      const float* kj = k + bshd(bi, j, s.sk, hk, s.hkv, s.d);
      const double pj = exp(scale * dot(qi, kj, s.d) - lse[r]);
      const double dp = dot(doi, v + bshd(bi, j, s.sk, hk, s.hkv, s.d), s.d);
      const double ds = pj * (dp - D) * scale, dm = pj * (fabs(dp) + fabs(D)) * scale;
      for (int e = 0; e < s.d; ++e) acc[e] += ds * kj[e], mag[e] += dm * fabs(kj[e]);
    }
  for (int e = 0; e < s.d; ++e) dq[at + e] = acc[e], dq_mag[at + e] = mag[e];
}

// dk_j = scale sum dS q_i, dv_j = sum P dO_i over every (query head of the group, row i) that
// sees key j; magnitudes as ref_dq_kernel's.
__global__ void ref_dkdv_kernel(const float* q, const float* k, const float* v, const float* dout, Shape s,
                                double scale, const double* lse, const double* dsum, double* dk, double* dk_mag,
                                double* dv, double* dv_mag) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= static_cast<int64_t>(s.b) * s.hkv * s.sk) return;
  const int j = r % s.sk, hk = r / s.sk % s.hkv, bi = r / (static_cast<int64_t>(s.sk) * s.hkv);
  const int group = s.hq / s.hkv;
  const int64_t at = bshd(bi, j, s.sk, hk, s.hkv, s.d);
  const float *kj = k + at, *vj = v + at;
  double ak[kRefMaxD] = {}, mk[kRefMaxD] = {}, av[kRefMaxD] = {}, mv[kRefMaxD] = {};
  for (int h = hk * group; h < (hk + 1) * group; ++h)
    for (int i = 0; i < s.sq; ++i) {
      if (!sees(s, i, j)) continue;  // (a row that sees key j sees a key: its lse is finite)
      const int64_t row = (static_cast<int64_t>(bi) * s.hq + h) * s.sq + i, qa = bshd(bi, i, s.sq, h, s.hq, s.d);
      const float *qi = q + qa, *doi = dout + qa;
      const double pj = exp(scale * dot(qi, kj, s.d) - lse[row]);
      const double dp = dot(doi, vj, s.d), D = dsum[row];
      const double ds = pj * (dp - D) * scale, dm = pj * (fabs(dp) + fabs(D)) * scale;
      for (int e = 0; e < s.d; ++e) {
        ak[e] += ds * qi[e], mk[e] += dm * fabs(qi[e]);
        av[e] += pj * doi[e], mv[e] += fabs(pj * doi[e]);
      }
    }
  for (int e = 0; e < s.d; ++e) dk[at + e] = ak[e], dk_mag[at + e] = mk[e], dv[at + e] = av[e], dv_mag[at + e] = mv[e];
}

// ---- judging -------------------------------------------------------------------------------
// Tolerances of dev/fp32_emu/emu_test.cpp (kTol, kBwdTol): fp32's level, which a correct kernel
// meets with ~10x to spare.
constexpr double kFwdTol = 1e-5, kBwdTol = 2e-5;

template <typename T>
std::vector<T> to_host(const T* p, int64_t n) {
  std::vector<T> h(n);
  CK(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

int failures = 0;
void report(bool pass, const std::string& what, double err, double tol, const char* extra = "") {
  failures += !pass;
  std::printf("%s %s err=%.3e (tol %.0e)%s\n", pass ? "PASS" : "FAIL", what.c_str(), err, tol, extra);
}

// max |x - ref| / max |ref| (NaN, e.g. poison left unwritten, counts as infinite).
double judge_out(const std::vector<float>& x, const std::vector<double>& ref, double* max_ref) {
  double m = 0, worst = 0;
  for (double r : ref) m = std::max(m, std::fabs(r));
  for (size_t i = 0; i < x.size(); ++i) {
    const double e = std::fabs(x[i] - ref[i]);
    worst = std::isnan(e) ? INFINITY : std::max(worst, e);
  }
  *max_ref = m;
  return m > 0 ? worst / m : worst;
}

// max |x - ref| absolute; a row that sees no key must give exactly -inf.
double judge_lse(const std::vector<float>& x, const std::vector<double>& ref) {
  double worst = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    if (std::isinf(ref[i])) {
      if (x[i] != ref[i]) worst = INFINITY;
      continue;
    }
    const double e = std::fabs(x[i] - ref[i]);
    worst = std::isnan(e) ? INFINITY : std::max(worst, e);
  }
  return worst;
}

// max |x - ref| / scale, scale = the largest magnitude sum (ref_dq_kernel) over the tensor, as the
// emulator judges: not max |ref|, because a gradient can cancel to exactly 0 in fp64 (sk = 1: P = 1,
// dS = 0 everywhere) while fp32's rounding of dP and D leaves ~1e-7 of the terms' size. An element
// that no term reaches (dQ of a row that sees no key) must be exactly 0.
double judge_grad(const std::vector<float>& x, const std::vector<double>& ref, const std::vector<double>& mag,
                  double* max_ref, double* scale) {
  double m = 0, sc = 0, worst = 0;
  for (size_t i = 0; i < ref.size(); ++i) m = std::max(m, std::fabs(ref[i])), sc = std::max(sc, mag[i]);
  for (size_t i = 0; i < x.size(); ++i) {
    if (mag[i] == 0) {
      if (x[i] != 0.f) worst = INFINITY;
      continue;
    }
    const double e = std::fabs(x[i] - ref[i]) / sc;
    worst = std::isnan(e) ? INFINITY : std::max(worst, e);
  }
  *max_ref = m, *scale = sc;
  return worst;
}

unsigned blocks_for(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

void check_shape(const Shape& s, uint64_t seed) {
  Buffers t(s, true, seed);
  const BwdParams p = make_params(s, t);
  const std::string name = describe(s);
  const double scale = p.scale;

  // The kernels' forward, then its O / LSE into the backward (as autograd would hand them over).
  CK(cudaMemset(t.out, 0xFF, t.nq * sizeof(float)));  // NaN: an element left unwritten fails
  CK(cudaMemset(t.lse, 0xFF, t.nrows * sizeof(float)));
  orchard::cuda::run_fwd_fp32_tc(p);
  dsum_kernel<<<blocks_for(t.nrows, 128), 128>>>(t.out, t.dout, t.dsum, s);
  CK(cudaGetLastError());
  // The gradients of two runs, each on poisoned outputs.
  std::vector<float> first[3], second[3];
  auto run_bwd = [&](std::vector<float>(&grads)[3]) {
    CK(cudaMemset(t.dq, 0xFF, t.nq * sizeof(float)));
    CK(cudaMemset(t.dk, 0xFF, t.nk * sizeof(float)));
    CK(cudaMemset(t.dv, 0xFF, t.nk * sizeof(float)));
    orchard::cuda::run_bwd_fp32_tc(p, t.dsum);
    CK(cudaDeviceSynchronize());
    grads[0] = to_host(t.dq, t.nq), grads[1] = to_host(t.dk, t.nk), grads[2] = to_host(t.dv, t.nk);
  };
  run_bwd(first);
  run_bwd(second);
  const std::vector<float> out = to_host(t.out, t.nq), lse = to_host(t.lse, t.nrows);

  // The reference.
  auto dalloc = [](int64_t n) {
    double* p;
    CK(cudaMalloc(&p, std::max<int64_t>(n, 1) * sizeof(double)));
    return p;
  };
  double *r_out = dalloc(t.nq), *r_lse = dalloc(t.nrows), *r_dsum = dalloc(t.nrows);
  double *r_dq = dalloc(t.nq), *m_dq = dalloc(t.nq), *r_dk = dalloc(t.nk), *m_dk = dalloc(t.nk);
  double *r_dv = dalloc(t.nk), *m_dv = dalloc(t.nk);
  const int64_t key_rows = static_cast<int64_t>(s.b) * s.hkv * s.sk;
  ref_fwd_kernel<<<blocks_for(t.nrows, 64), 64>>>(t.q, t.k, t.v, s, scale, r_out, r_lse);
  ref_dq_kernel<<<blocks_for(t.nrows, 64), 64>>>(t.q, t.k, t.v, t.dout, s, scale, r_out, r_lse, r_dq, m_dq, r_dsum);
  ref_dkdv_kernel<<<blocks_for(key_rows, 64), 64>>>(t.q, t.k, t.v, t.dout, s, scale, r_lse, r_dsum, r_dk, m_dk, r_dv,
                                                    m_dv);
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());

  double max_ref, grad_scale;
  char extra[96];
  const double e_out = judge_out(out, to_host(r_out, t.nq), &max_ref);
  std::snprintf(extra, sizeof extra, "  max|ref| %.3g", max_ref);
  report(e_out <= kFwdTol, "fwd out " + name, e_out, kFwdTol, extra);
  const double e_lse = judge_lse(lse, to_host(r_lse, t.nrows));
  report(e_lse <= kFwdTol, "fwd lse " + name, e_lse, kFwdTol, "  absolute");
  struct Grad {
    const char* name;
    const std::vector<float>& x;
    const double *ref, *mag;
  };
  for (const Grad& g : {Grad{"dq", first[0], r_dq, m_dq}, Grad{"dk", first[1], r_dk, m_dk},
                        Grad{"dv", first[2], r_dv, m_dv}}) {
    const int64_t n = static_cast<int64_t>(g.x.size());
    const double e = judge_grad(g.x, to_host(g.ref, n), to_host(g.mag, n), &max_ref, &grad_scale);
    std::snprintf(extra, sizeof extra, "  scale %.3g, max|ref| %.3g", grad_scale, max_ref);
    report(e <= kBwdTol, std::string("bwd ") + g.name + " " + name, e, kBwdTol, extra);
  }
  // Bitwise: memcmp, so that NaN results (which != would call different) compare as equal bits.
  int64_t differ = 0;
  for (int g = 0; g < 3; ++g)
    for (size_t i = 0; i < first[g].size(); ++i)
      differ += std::memcmp(&first[g][i], &second[g][i], sizeof(float)) != 0;
  failures += differ != 0;
  std::printf("%s bwd deterministic %s: %lld element(s) differ between two runs\n", differ ? "FAIL" : "PASS",
              name.c_str(), static_cast<long long>(differ));
  for (double* x : {r_out, r_lse, r_dsum, r_dq, m_dq, r_dk, m_dk, r_dv, m_dv}) cudaFree(x);
}

// ---- timing (bench_util.cuh's median_ms, 20 calls after >= 3 calls and 50 ms of warm-up) -----
constexpr int kTimedCalls = 20, kWarmCalls = 3;

// TIME lines as ab_variants.sh parses them: TIME <shape words> library <ms> ms <TFLOP/s> TFLOP/s.
void time_shape(bool bwd, const Shape& s) {
  Buffers t(s, bwd, 7);
  const BwdParams p = make_params(s, t);
  const double fwd_flops = 4.0 * s.b * s.hq * static_cast<double>(s.sq) * s.sk * s.d / (s.causal ? 2.0 : 1.0);
  double ms;
  if (!bwd) {
    ms = median_ms([&] { orchard::cuda::run_fwd_fp32_tc(p); }, kTimedCalls, kWarmCalls);
  } else {
    // The backward on a real forward's O and LSE (realistic P), with D computed once, untimed:
    // the library's D pre-pass is another file's kernel.
    orchard::cuda::run_fwd_fp32_tc(p);
    dsum_kernel<<<blocks_for(t.nrows, 128), 128>>>(t.out, t.dout, t.dsum, s);
    CK(cudaGetLastError());
    ms = median_ms([&] { orchard::cuda::run_bwd_fp32_tc(p, t.dsum); }, kTimedCalls, kWarmCalls);
  }
  const double flops = (bwd ? 2.5 : 1.0) * fwd_flops;
  std::printf("TIME %s d%d s%d %s library %9.3f ms %7.2f TFLOP/s\n", bwd ? "bwd" : "fwd", s.d, s.sq,
              s.causal ? "causal" : "noncausal", ms, flops / ms / 1e9);
}

// fwd_d<D> / bwd_d<D>: b2 h16 (MHA), s 1024 and 4096, non-causal and causal.
void time_mode(bool bwd, int d) {
  for (int s : {1024, 4096})
    for (bool causal : {false, true}) time_shape(bwd, Shape{2, 16, 16, s, s, d, causal});
}

// Small shapes: ragged lengths (1, 37, 64, 130, 300) on both sides, sq > sk with causal (rows
// that see no key), GQA and MHA, both head dims, several row / key blocks.
const Shape kChecks[] = {
    {2, 4, 2, 130, 130, 64, false}, {2, 4, 2, 130, 130, 64, true},   {1, 4, 4, 37, 300, 128, true},
    {1, 4, 2, 300, 37, 64, true},   {2, 4, 4, 64, 64, 128, false},   {1, 4, 2, 1, 300, 128, false},
    {1, 4, 2, 300, 1, 64, false},   {2, 4, 2, 300, 130, 128, false}, {1, 4, 4, 130, 37, 128, true},
    {2, 4, 2, 64, 300, 64, true},   {1, 4, 4, 1, 1, 64, true},       {1, 4, 2, 300, 300, 128, true},
    {1, 2, 2, 1024, 1024, 128, true},  // more key tiles than any shape above
    // Rows that are not 16-byte aligned (odd d and strides): the 4-byte cp.async path; d36: 16-byte
    // copies with a partial last chunk.
    {1, 3, 1, 130, 130, 33, true},     {2, 4, 2, 70, 150, 36, false},
};

}  // namespace

int main(int argc, char** argv) {
  setvbuf(stdout, nullptr, _IOLBF, 0);  // a hang (killed by timeout) still leaves every line before it
  const std::string mode = argc > 1 ? argv[1] : "all";
  const bool timed_mode =
      (mode.rfind("fwd_d", 0) == 0 || mode.rfind("bwd_d", 0) == 0) && std::atoi(mode.c_str() + 5) > 0;
  const bool one_mode = mode == "one" && argc == 6;  // one fwd|bwd D S CAUSAL: one shape, b2 h16 (ncu)
  if (mode != "checks" && mode != "all" && !timed_mode && !one_mode) {
    std::fprintf(stderr, "usage: %s [checks | fwd_d<D> | bwd_d<D> | all | one fwd|bwd D S CAUSAL]\n", argv[0]);
    return 2;
  }
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("fp32_tc_bench %s on %s\n", mode.c_str(), prop.name);
  try {
    if (mode == "checks") {
      uint64_t seed = 1;
      for (const Shape& s : kChecks) check_shape(s, seed++);
      std::printf("fp32_tc checks: %d failing\n", failures);
      return failures ? 1 : 0;
    }
    if (one_mode) {
      const int d = std::atoi(argv[3]), sq = std::atoi(argv[4]);
      time_shape(std::strcmp(argv[2], "bwd") == 0, Shape{2, 16, 16, sq, sq, d, std::atoi(argv[5]) != 0});
      return 0;
    }
    if (mode == "all") {
      for (bool bwd : {false, true})
        for (int d : {64, 128}) time_mode(bwd, d);
    } else {
      time_mode(mode[0] == 'b', std::atoi(mode.c_str() + 5));
    }
  } catch (const orchard::Error& e) {  // a head dim wider than the kernels' accumulators
    std::printf("error: %s\n", e.what());
    return 2;
  }
  return 0;
}
