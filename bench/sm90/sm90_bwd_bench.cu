// sm90 attention BACKWARD (src/backends/cuda/sm90/flash_bwd_sm90.cuh; flash_bwd_sm90_wide.cuh with
// -DSM90_BWD_BENCH_D=192 / 256): correctness + speed.
//   nvcc -O3 -std=c++20 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr \
//        -Iinclude -Isrc bench/sm90/sm90_bwd_bench.cu -o sm90_bwd_bench
//   ./sm90_bwd_bench [checks|grid|all|bulk|det [S]|one S CAUSAL]
// Per shape (dtype, d, causal + alignment, b, hq, hkv, sq, sk): fresh random Q/K/V/dO (BSHD);
// O and LSE from the sm90 forward; dQ/dK/dV poisoned (NaN) before the checked run of the
// sm90 backward (flash_bwd_sm90_run.cuh: sm80 pre-pass, sm90 main kernel, sm80 dQ convert),
// then compared over EVERY element with a GPU reference in fp32 arithmetic on the same 16-bit
// inputs.  ARCHITECTURE.md's rule: max|kernel - ref32| <= 2 max|naive16 - ref32| + atol, the
// naive version rounding S, P, dP, D, dS and the outputs to the input dtype as a plain
// framework implementation would; atol = 1e-3 * max|ref32| (the 16-bit output's own ulp is
// 4e-3 relative).  The same check runs on both sm90 dQ forms (16-byte atomicAdds,
// cp.reduce.async.bulk), on the deterministic sm90 form (ordered bulk adds; also rerun twice,
// poisoned again, and compared bit for bit with the first run) and on the sm80 backward.
// Timing: CUDA-event medians of 20 after warm-up, the three interleaved in one process, best
// of two rounds; TFLOP/s = 2.5 * 4 b hq sq sk d (/2 causal) / time.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "backends/cuda/sm90/flash_bwd_sm90_host.cuh"
#include "backends/cuda/sm90/flash_bwd_sm90_run.cuh"
#include "backends/cuda/sm90/flash_fwd_sm90.cuh"
#include "bench_util.cuh"

using orchard::BwdParams;
using orchard::FwdParams;

// The library's other launch helper (cuda_backend.cu defines it for the real build).
void orchard::cuda::run_bwd_dsink(const BwdParams&, const float*) {  // no sinks in this bench
  std::printf("run_bwd_dsink: not expected here\n");
  std::exit(2);
}

struct Shape {
  bool bf16;
  int d;
  bool causal, top_left;
  int b, hq, hkv, sq, sk;
};

// Reference, per (b, h, row i) block: P (fp32 and naive 16-bit) and dS over all keys,
// written to [b][h][i][j] buffers.  lp: S, P, dP, D, dS rounded to T.
template <typename T>
__global__ void ref_rows_kernel(const T* q, const T* k, const T* v, const T* dO, Shape sh, int64_t coff, float scale,
                                float* P, float* dS, float* Plp, float* dSlp) {
  extern __shared__ float sm[];
  float* s32 = sm;            // [sk]
  float* slp = sm + sh.sk;    // [sk]
  float* dp32 = sm + 2 * sh.sk;
  float* dplp = sm + 3 * sh.sk;
  __shared__ float red[4][32];
  const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (sh.hq / sh.hkv), d = sh.d;
  const T* qr = q + ((int64_t)(b * sh.sq + i) * sh.hq + h) * d;
  const T* dor = dO + ((int64_t)(b * sh.sq + i) * sh.hq + h) * d;
  float mx = -INFINITY, mxl = -INFINITY;
  for (int j = threadIdx.x; j < sh.sk; j += blockDim.x) {
    const T* kr = k + ((int64_t)(b * sh.sk + j) * sh.hkv + hk) * d;
    const T* vr = v + ((int64_t)(b * sh.sk + j) * sh.hkv + hk) * d;
    float acc = 0.f, dacc = 0.f;
    for (int c = 0; c < d; ++c) {
      acc += to_f(qr[c]) * to_f(kr[c]);
      dacc += to_f(dor[c]) * to_f(vr[c]);
    }
    const bool masked = sh.causal && (int64_t)j > i + coff;
    s32[j] = masked ? -INFINITY : acc * scale;
    slp[j] = masked ? -INFINITY : round_t<T>(acc * scale);
    dp32[j] = dacc;
    dplp[j] = round_t<T>(dacc);
    mx = fmaxf(mx, s32[j]);
    mxl = fmaxf(mxl, slp[j]);
  }
  auto block_reduce = [&](float x, bool is_max, int slot) {
    for (int o = 16; o > 0; o >>= 1) {
      const float y = __shfl_xor_sync(0xffffffffu, x, o);
      x = is_max ? fmaxf(x, y) : x + y;
    }
    __syncthreads();
    if (threadIdx.x % 32 == 0) red[slot][threadIdx.x / 32] = x;
    __syncthreads();
    float r = is_max ? -INFINITY : 0.f;
    for (int w = 0; w < (int)blockDim.x / 32; ++w) r = is_max ? fmaxf(r, red[slot][w]) : r + red[slot][w];
    return r;
  };
  mx = block_reduce(mx, true, 0);
  mxl = block_reduce(mxl, true, 1);
  float sum = 0.f, suml = 0.f;
  for (int j = threadIdx.x; j < sh.sk; j += blockDim.x) {
    s32[j] = mx == -INFINITY ? 0.f : expf(s32[j] - mx);
    slp[j] = mxl == -INFINITY ? 0.f : expf(slp[j] - mxl);
    sum += s32[j];
    suml += slp[j];
  }
  sum = block_reduce(sum, false, 2);
  suml = block_reduce(suml, false, 3);
  float dsum = 0.f, dsuml = 0.f;
  for (int j = threadIdx.x; j < sh.sk; j += blockDim.x) {
    s32[j] = sum > 0.f ? s32[j] / sum : 0.f;
    slp[j] = suml > 0.f ? round_t<T>(slp[j] / suml) : 0.f;
    dsum += s32[j] * dp32[j];
    dsuml += slp[j] * dplp[j];
  }
  dsum = block_reduce(dsum, false, 0);
  dsuml = round_t<T>(block_reduce(dsuml, false, 1));
  const int64_t base = (((int64_t)b * sh.hq + h) * sh.sq + i) * sh.sk;
  for (int j = threadIdx.x; j < sh.sk; j += blockDim.x) {
    P[base + j] = s32[j];
    dS[base + j] = s32[j] * (dp32[j] - dsum);
    Plp[base + j] = slp[j];
    dSlp[base + j] = round_t<T>(slp[j] * (dplp[j] - dsuml));
  }
}

// One thread per output element: which = 0 dQ [b][sq][hq][d], 1 dK [b][sk][hkv][d], 2 dV.
template <typename T>
__global__ void ref_grad_kernel(const T* q, const T* k, const T* dO, Shape sh, float scale, const float* P,
                                const float* dS, int which, bool lp, float* out) {
  const int d = sh.d, group = sh.hq / sh.hkv;
  const int64_t n = which == 0 ? (int64_t)sh.b * sh.sq * sh.hq * d : (int64_t)sh.b * sh.sk * sh.hkv * d;
  const int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (idx >= n) return;
  const int c = idx % d;
  float acc = 0.f;
  if (which == 0) {
    const int h = (idx / d) % sh.hq, i = (idx / d / sh.hq) % sh.sq, b = idx / d / sh.hq / sh.sq;
    const int hk = h / group;
    const float* row = dS + (((int64_t)b * sh.hq + h) * sh.sq + i) * sh.sk;
    for (int j = 0; j < sh.sk; ++j) acc += row[j] * to_f(k[((int64_t)(b * sh.sk + j) * sh.hkv + hk) * d + c]);
    acc *= scale;
  } else {
    const int hk = (idx / d) % sh.hkv, j = (idx / d / sh.hkv) % sh.sk, b = idx / d / sh.hkv / sh.sk;
    const float* M = which == 1 ? dS : P;
    const T* X = which == 1 ? q : dO;
    for (int hh = hk * group; hh < (hk + 1) * group; ++hh)
      for (int i = 0; i < sh.sq; ++i)
        acc += M[(((int64_t)b * sh.hq + hh) * sh.sq + i) * sh.sk + j] * to_f(X[((int64_t)(b * sh.sq + i) * sh.hq + hh) * d + c]);
    if (which == 1) acc *= scale;
  }
  out[idx] = lp ? round_t<T>(acc) : acc;
}

template <typename T>
__global__ void to_float_kernel(const T* x, int64_t n, float* y) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    y[i] = to_f(x[i]);
}

struct Bufs {
  void *q, *k, *v, *o, *dO, *dq, *dk, *dv;
  float* lse;
  void* ws;
  size_t ws_bytes;
};

template <typename T>
BwdParams make_params(const Shape& sh, const Bufs& B) {
  BwdParams p{};
  const int d = sh.d;
  p.q = B.q; p.k = B.k; p.v = B.v; p.out = B.o; p.lse = B.lse; p.dout = B.dO; p.dq = B.dq; p.dk = B.dk; p.dv = B.dv;
  p.q_batch_stride = (int64_t)sh.sq * sh.hq * d; p.q_row_stride = (int64_t)sh.hq * d; p.q_head_stride = d;
  p.k_batch_stride = (int64_t)sh.sk * sh.hkv * d; p.k_row_stride = (int64_t)sh.hkv * d; p.k_head_stride = d;
  p.v_batch_stride = p.k_batch_stride; p.v_row_stride = p.k_row_stride; p.v_head_stride = d;
  p.o_batch_stride = p.q_batch_stride; p.o_row_stride = p.q_row_stride; p.o_head_stride = d;
  p.do_batch_stride = p.q_batch_stride; p.do_row_stride = p.q_row_stride; p.do_head_stride = d;
  p.dq_batch_stride = p.q_batch_stride; p.dq_row_stride = p.q_row_stride; p.dq_head_stride = d;
  p.dk_batch_stride = p.k_batch_stride; p.dk_row_stride = p.k_row_stride; p.dk_head_stride = d;
  p.dv_batch_stride = p.k_batch_stride; p.dv_row_stride = p.k_row_stride; p.dv_head_stride = d;
  p.lse_batch_stride = (int64_t)sh.hq * sh.sq; p.lse_head_stride = sh.sq;
  p.b = sh.b; p.sq = sh.sq; p.sk = sh.sk; p.hq = sh.hq; p.hkv = sh.hkv; p.d = d; p.d_v = d;
  p.scale = 1.f / std::sqrt((float)d);
  p.causal = sh.causal;
  p.causal_offset = sh.causal && !sh.top_left ? sh.sk - sh.sq : 0;
  p.dtype = std::is_same<T, __half>::value ? orchard::DType::kFloat16 : orchard::DType::kBFloat16;
  p.workspace = B.ws; p.workspace_bytes = B.ws_bytes;
  return p;
}

template <typename T>
Bufs alloc_bufs(const Shape& sh, uint64_t seed) {
  Bufs B{};
  const int64_t nq = (int64_t)sh.b * sh.sq * sh.hq * sh.d, nk = (int64_t)sh.b * sh.sk * sh.hkv * sh.d;
  CK(cudaMalloc(&B.q, nq * 2)); CK(cudaMalloc(&B.o, nq * 2)); CK(cudaMalloc(&B.dO, nq * 2)); CK(cudaMalloc(&B.dq, nq * 2));
  CK(cudaMalloc(&B.k, nk * 2)); CK(cudaMalloc(&B.v, nk * 2)); CK(cudaMalloc(&B.dk, nk * 2)); CK(cudaMalloc(&B.dv, nk * 2));
  CK(cudaMalloc(&B.lse, (int64_t)sh.b * sh.hq * sh.sq * 4));
  fill_kernel<T><<<1024, 256>>>((T*)B.q, nq, seed + 1);
  fill_kernel<T><<<1024, 256>>>((T*)B.k, nk, seed + 2);
  fill_kernel<T><<<1024, 256>>>((T*)B.v, nk, seed + 3);
  fill_kernel<T><<<1024, 256>>>((T*)B.dO, nq, seed + 4);
  BwdParams p = make_params<T>(sh, B);
  B.ws_bytes = orchard::cuda::bwd_workspace_layout(p).bytes;
  CK(cudaMalloc(&B.ws, B.ws_bytes));
  p = make_params<T>(sh, B);
  return B;
}
void free_bufs(Bufs& B) {
  for (void* x : {B.q, B.k, B.v, B.o, B.dO, B.dq, B.dk, B.dv, (void*)B.lse, B.ws}) cudaFree(x);
}

// -DSM90_BWD_BENCH_D=64 (96, 128): build and run only that head dim (a one-bucket experiment
// builds in a fraction of the time); 0 (default): all three.  192 / 256: the wide kernel
// (flash_bwd_sm90_wide.cuh) of that bucket, only when named (so the default build stays as it
// was); its shapes skip the atomic-dQ and deterministic forms (it has neither: dQ goes by
// atomics in both) and the sm80 comparison (the sm80 d192 / d256 kernels would double the build).  -DSM90_BWD_BENCH_D96_BUCKET=128 runs
// the d96 shapes on the d128 bucket's kernels (the library's d96 backward before session 28:
// the A/B baseline of the d96 bucket).
#ifndef SM90_BWD_BENCH_D
#define SM90_BWD_BENCH_D 0
#endif
#ifndef SM90_BWD_BENCH_D96_BUCKET
#define SM90_BWD_BENCH_D96_BUCKET 96
#endif
constexpr int kBenchD = SM90_BWD_BENCH_D, kD96Bucket = SM90_BWD_BENCH_D96_BUCKET;
static_assert(kD96Bucket == 96 || kD96Bucket == 128, "SM90_BWD_BENCH_D96_BUCKET: 96 or 128");
constexpr bool kBuild64 = kBenchD == 0 || kBenchD == 64, kBuild96 = kBenchD == 0 || kBenchD == 96,
               kBuild128 = kBenchD == 0 || kBenchD == 128, kBuild192 = kBenchD == 192, kBuild256 = kBenchD == 256;
// The shapes' head dim: 64, 65..96 (the d96 bucket, d80 through its padded kernels), 128,
// 129..192 (d160 through the d192 bucket's kernels), 193..256.
bool built(int d) {
  return d <= 64 ? kBuild64 : d <= 96 ? kBuild96 : d <= 128 ? kBuild128 : d <= 192 ? kBuild192 : kBuild256;
}

template <typename T>
bool run_fwd(const Shape& sh, const Bufs& B) {
  BwdParams p = make_params<T>(sh, B);
  if constexpr (kBuild64) if (sh.d <= 64) return orchard::cuda::run_flash_fwd_sm90<T, 64>(p);
  if constexpr (kBuild96) if (sh.d <= 96) return orchard::cuda::run_flash_fwd_sm90<T, kD96Bucket>(p);
  if constexpr (kBuild128) if (sh.d <= 128) return orchard::cuda::run_flash_fwd_sm90<T, 128>(p);
  if constexpr (kBuild192) if (sh.d > 128 && sh.d <= 192) return orchard::cuda::run_flash_fwd_sm90<T, 192>(p);
  if constexpr (kBuild256) if (sh.d > 192) return orchard::cuda::run_flash_fwd_sm90<T, 256>(p);
  return false;
}
template <typename T>
bool run_sm90(const BwdParams& p, bool bulk_dq) {
  if constexpr (kBuild64) if (p.d <= 64) return orchard::cuda::run_flash_bwd_sm90<T, 64>(p, bulk_dq);
  if constexpr (kBuild96) if (p.d <= 96) return orchard::cuda::run_flash_bwd_sm90<T, kD96Bucket>(p, bulk_dq);
  if constexpr (kBuild128) if (p.d <= 128) return orchard::cuda::run_flash_bwd_sm90<T, 128>(p, bulk_dq);
  if constexpr (kBuild192) if (p.d > 128 && p.d <= 192) return orchard::cuda::run_flash_bwd_sm90<T, 192>(p, bulk_dq);
  if constexpr (kBuild256) if (p.d > 192) return orchard::cuda::run_flash_bwd_sm90<T, 256>(p, bulk_dq);
  return false;
}
template <typename T, int kD>
void run_sm80_bucket(const BwdParams& p) {
  if (p.causal) orchard::cuda::launch_flash_bwd<T, kD, true, false>(p);
  else orchard::cuda::launch_flash_bwd<T, kD, false, false>(p);
}
template <typename T>
void run_sm80(const BwdParams& p) {  // the sm80 buckets (cuda_backend.cu head_dim_bucket)
  if constexpr (kBuild64) if (p.d <= 64) return run_sm80_bucket<T, 64>(p);
  if constexpr (kBuild96) if (p.d <= 96) return run_sm80_bucket<T, 96>(p);
  if constexpr (kBuild128) if (p.d <= 128) run_sm80_bucket<T, 128>(p);
  // d > 128: not built (the SM90_BWD_BENCH_D comment); the callers skip those shapes.
}

std::string shape_name(const Shape& sh) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "%s d%d %s b%d hq%d hkv%d sq%d sk%d", sh.bf16 ? "bf16" : "fp16", sh.d,
                sh.causal ? (sh.top_left ? "causal-tl" : "causal-br") : "full", sh.b, sh.hq, sh.hkv, sh.sq, sh.sk);
  return buf;
}

// max |a - ref| over n floats (NaN -> inf) and max |ref|.
float max_err(const std::vector<float>& a, const std::vector<float>& ref, float* ref_max) {
  float e = 0.f, m = 0.f;
  for (size_t i = 0; i < a.size(); ++i) {
    const float d = std::fabs(a[i] - ref[i]);
    e = std::isnan(d) ? INFINITY : std::max(e, d);
    m = std::max(m, std::fabs(ref[i]));
  }
  *ref_max = m;
  return e;
}

template <typename T>
bool check_shape(const Shape& sh, uint64_t seed) {
  std::printf("start %s\n", shape_name(sh).c_str());
  Bufs B = alloc_bufs<T>(sh, seed);
  if (!run_fwd<T>(sh, B)) { std::printf("CHECK %s: forward refused\n", shape_name(sh).c_str()); return false; }
  const BwdParams p = make_params<T>(sh, B);
  const int64_t nq = (int64_t)sh.b * sh.sq * sh.hq * sh.d, nk = (int64_t)sh.b * sh.sk * sh.hkv * sh.d;
  const int64_t nps = (int64_t)sh.b * sh.hq * sh.sq * sh.sk;
  float *P, *dS, *Plp, *dSlp, *ref, *out32;
  CK(cudaMalloc(&P, nps * 4)); CK(cudaMalloc(&dS, nps * 4)); CK(cudaMalloc(&Plp, nps * 4)); CK(cudaMalloc(&dSlp, nps * 4));
  CK(cudaMalloc(&ref, std::max(nq, nk) * 4)); CK(cudaMalloc(&out32, std::max(nq, nk) * 4));
  ref_rows_kernel<T><<<dim3(sh.sq, sh.hq, sh.b), 256, 4 * sh.sk * 4>>>(
      (const T*)B.q, (const T*)B.k, (const T*)B.v, (const T*)B.dO, sh, p.causal_offset, p.scale, P, dS, Plp, dSlp);
  CK(cudaGetLastError());
  bool ok_all = true;
  static const char* kPath[] = {"sm90", "sm90bulk", "sm90det", "sm80"};
  const bool det_applies = sh.d == 64 || sh.d == 128;  // the ordered kernels' buckets, d == bucket
  // The d96 bucket: no atomic-dQ form; d > 128 (the wide kernel): one form (dQ by atomics, run
  // as "sm90bulk"), no sm80 comparison.
  const bool bulk_only = (sh.d > 64 && sh.d <= 96 && kD96Bucket == 96) || sh.d > 128;
  for (int path = 0; path < 4; ++path) {  // sm90 (atomic dQ), sm90 (bulk-reduce dQ), sm90 ordered, sm80
    if ((path == 2 && !det_applies) || (path == 0 && bulk_only) || (path == 3 && sh.d > 128)) continue;
    BwdParams pp = p;
    pp.deterministic = path == 2;
    auto poison = [&] {
      CK(cudaMemset(B.dq, 0xff, nq * 2)); CK(cudaMemset(B.dk, 0xff, nk * 2)); CK(cudaMemset(B.dv, 0xff, nk * 2));
    };
    poison();
    if (path < 3) {
      if (!run_sm90<T>(pp, path != 0)) { std::printf("CHECK %s sm90: maps refused FAIL\n", shape_name(sh).c_str()); ok_all = false; continue; }
    } else {
      run_sm80<T>(pp);
    }
    CK(cudaDeviceSynchronize());
    bool bitwise = true;
    if (path == 2) {  // two reruns, each poisoned first, must reproduce dQ / dK / dV bit for bit
      std::vector<uint16_t> first(nq + 2 * nk), again(nq + 2 * nk);
      auto grab = [&](std::vector<uint16_t>& h) {
        CK(cudaMemcpy(h.data(), B.dq, nq * 2, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(h.data() + nq, B.dk, nk * 2, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(h.data() + nq + nk, B.dv, nk * 2, cudaMemcpyDeviceToHost));
      };
      grab(first);
      for (int rerun = 0; rerun < 2; ++rerun) {
        poison();
        run_sm90<T>(pp, true);
        CK(cudaDeviceSynchronize());
        grab(again);
        bitwise &= std::memcmp(first.data(), again.data(), first.size() * 2) == 0;
      }
    }
    std::string line;
    bool ok = true;
    for (int which = 0; which < 3; ++which) {
      const int64_t n = which == 0 ? nq : nk;
      const void* got = which == 0 ? B.dq : which == 1 ? B.dk : B.dv;
      std::vector<float> r32(n), rlp(n), g(n);
      const float* M32 = which == 2 ? P : dS;
      const float* Mlp = which == 2 ? Plp : dSlp;
      const unsigned blocks = (unsigned)((n + 255) / 256);
      ref_grad_kernel<T><<<blocks, 256>>>((const T*)B.q, (const T*)B.k, (const T*)B.dO, sh, p.scale, M32, M32, which, false, ref);
      CK(cudaMemcpy(r32.data(), ref, n * 4, cudaMemcpyDeviceToHost));
      ref_grad_kernel<T><<<blocks, 256>>>((const T*)B.q, (const T*)B.k, (const T*)B.dO, sh, p.scale, Mlp, Mlp, which, true, ref);
      CK(cudaMemcpy(rlp.data(), ref, n * 4, cudaMemcpyDeviceToHost));
      to_float_kernel<T><<<1024, 256>>>((const T*)got, n, out32);
      CK(cudaMemcpy(g.data(), out32, n * 4, cudaMemcpyDeviceToHost));
      float rmax = 0.f;
      const float e = max_err(g, r32, &rmax), elp = max_err(rlp, r32, &rmax);
      const float tol = 2.f * elp + 1e-3f * rmax;
      const bool pass = e <= tol;
      ok &= pass;
      char buf[160];
      std::snprintf(buf, sizeof buf, " %s err %.3g (naive %.3g, tol %.3g, max %.3g)%s", which == 0 ? "dQ" : which == 1 ? "dK" : "dV",
                    e, elp, tol, rmax, pass ? "" : " !");
      line += buf;
    }
    if (!bitwise) line += " reruns NOT bitwise equal !";
    ok &= bitwise;
    std::printf("CHECK %-44s %-8s %s%s\n", shape_name(sh).c_str(), kPath[path], ok ? "PASS" : "FAIL", line.c_str());
    ok_all &= ok;
  }
  cudaFree(P); cudaFree(dS); cudaFree(Plp); cudaFree(dSlp); cudaFree(ref); cudaFree(out32);
  free_bufs(B);
  return ok_all;
}

template <typename F>
float time_ms(F&& f, int reps = 20) {
  cudaEvent_t a, b;
  cudaEventCreate(&a); cudaEventCreate(&b);
  for (int i = 0; i < 3; ++i) f();
  std::vector<float> ts;
  for (int i = 0; i < reps; ++i) {
    cudaEventRecord(a); f(); cudaEventRecord(b); cudaEventSynchronize(b);
    float ms; cudaEventElapsedTime(&ms, a, b); ts.push_back(ms);
  }
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

// A timed shape's inputs (O and LSE from the sm90 forward), parameters and backward FLOPs.
struct Timed {
  Bufs B;
  BwdParams p;
  double flops;
};
template <typename T>
Timed prepare_timed(const Shape& sh) {
  Timed c{alloc_bufs<T>(sh, 7), {}, 2.5 * 4.0 * sh.b * sh.hq * (double)sh.sq * sh.sk * sh.d / (sh.causal ? 2 : 1)};
  run_fwd<T>(sh, c.B);
  c.p = make_params<T>(sh, c.B);
  return c;
}

template <typename T>
void time_shape(const Shape& sh) {
  Timed c = prepare_timed<T>(sh);
  const BwdParams& p = c.p;
  const double flops = c.flops;
  float t90 = 1e30f, tbulk = 1e30f, t80 = 1e30f;
  for (int round = 0; round < 2; ++round) {  // interleaved: sm90, sm90 bulk, sm80, twice (best of 2 medians)
    t90 = std::min(t90, time_ms([&] { run_sm90<T>(p, false); }));
    tbulk = std::min(tbulk, time_ms([&] { run_sm90<T>(p, true); }));
    t80 = std::min(t80, time_ms([&] { run_sm80<T>(p); }));
  }
  CK(cudaDeviceSynchronize());
  std::printf("TIME %-44s sm90 %7.3f ms %6.1f | bulk %7.3f ms %6.1f | sm80 %7.3f ms %6.1f TFLOP/s | sm90/sm80 %.2fx bulk/atomic %.2fx\n",
              shape_name(sh).c_str(), t90, flops / t90 / 1e9, tbulk, flops / tbulk / 1e9, t80, flops / t80 / 1e9,
              t80 / t90, t90 / tbulk);
  free_bufs(c.B);
}

template <typename F>
void each_dtype(const Shape& sh, F&& f) {
  if (!built(sh.d)) return;
  if (sh.bf16) f(__nv_bfloat16{});
  else f(__half{});
}

// Mode "bulk": the library's default form (bulk dQ) alone, 30 timed runs, for A/Bs of two
// builds run alternately (medians over the runs decide: one binary's timings drift).
// SM90_BWD_BENCH_DROPOUT=<p>: these timed runs with dropout p (the kFeatures kernels; the forward's O
// and LSE stay undropped, which changes no work; FLOPs as without).
template <typename T>
void time_bulk(const Shape& sh) {
  Timed c = prepare_timed<T>(sh);
  static const float drop_p = std::getenv("SM90_BWD_BENCH_DROPOUT") ? std::atof(std::getenv("SM90_BWD_BENCH_DROPOUT")) : 0.f;
  c.p.dropout_p = drop_p;
  c.p.seed = 1234;
  c.p.offset = 0;
  const float t = time_ms([&] { run_sm90<T>(c.p, true); }, 30);
  CK(cudaDeviceSynchronize());
  char tag[16] = "";
  if (drop_p > 0.f) std::snprintf(tag, sizeof tag, " drop%.2f", drop_p);
  std::printf("TIME %-44s bulk %7.3f ms %6.1f TFLOP/s\n", (shape_name(sh) + tag).c_str(), t, c.flops / t / 1e9);
  free_bufs(c.B);
}

// Mode "det": the deterministic form (ordered dQ adds) against the default bulk form and the
// sm80 deterministic backward, interleaved, best of 2 medians each.
template <typename T>
void time_det(const Shape& sh) {
  Timed c = prepare_timed<T>(sh);
  BwdParams det = c.p;
  det.deterministic = true;
  float tb = 1e30f, td = 1e30f, t80 = 1e30f;
  for (int round = 0; round < 2; ++round) {
    tb = std::min(tb, time_ms([&] { run_sm90<T>(c.p, true); }));
    td = std::min(td, time_ms([&] { run_sm90<T>(det, true); }));
    t80 = std::min(t80, time_ms([&] { run_sm80<T>(det); }));  // the sm80 deterministic backward
  }
  CK(cudaDeviceSynchronize());
  std::printf("TIME %-44s bulk %7.3f ms %6.1f | det %7.3f ms %6.1f | sm80det %7.3f ms %6.1f TFLOP/s | det/bulk %.3f "
              "det/sm80det %.2fx\n",
              shape_name(sh).c_str(), tb, c.flops / tb / 1e9, td, c.flops / td / 1e9, t80, c.flops / t80 / 1e9, tb / td,
              t80 / td);
  free_bufs(c.B);
}

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // lines reach the log even if a timeout kills us
  const std::string mode = argc > 1 ? argv[1] : "all";
  int fails = 0;
  if (mode == "checks" || mode == "all") {
    const Shape checks[] = {
        {true, 128, false, false, 2, 4, 4, 512, 512},   {true, 128, true, false, 2, 4, 4, 512, 512},
        {true, 128, false, false, 1, 4, 4, 300, 700},   {true, 128, true, false, 1, 4, 4, 300, 700},
        {true, 128, true, true, 1, 4, 4, 300, 700},     {true, 128, true, false, 1, 4, 4, 700, 300},
        {true, 128, true, true, 1, 4, 4, 700, 300},     {true, 128, false, false, 2, 8, 2, 384, 1000},
        {true, 128, true, false, 2, 8, 2, 1000, 1000},  {false, 128, false, false, 2, 4, 4, 512, 512},
        {false, 128, true, false, 1, 8, 1, 777, 777},   {true, 64, false, false, 2, 4, 4, 512, 512},
        {true, 64, true, false, 1, 8, 2, 700, 900},     {true, 64, true, true, 1, 4, 4, 333, 555},
        {false, 64, false, false, 1, 4, 2, 1000, 129},  {false, 64, true, false, 2, 4, 4, 65, 64},
        // More tiles than an H100 / H200 has SMs: the persistent CTAs run several each (GQA,
        // both causal alignments, sq != sk; top-left with sk > sq gives tiles no query reaches).
        {true, 128, false, false, 4, 16, 16, 1024, 1024}, {true, 128, true, false, 3, 16, 4, 1000, 1500},
        {true, 128, true, true, 2, 8, 8, 700, 2000},      {false, 64, true, false, 4, 16, 8, 1024, 1024},
        {true, 64, false, false, 2, 32, 32, 1500, 1500},
        // d96 (its own bucket; d80 through its padded kernels), as the d64 / d128 shapes above.
        {true, 96, false, false, 2, 4, 4, 512, 512},      {true, 96, true, false, 1, 8, 2, 700, 900},
        {true, 96, true, true, 1, 4, 4, 333, 555},        {false, 96, false, false, 1, 4, 2, 1000, 129},
        {false, 96, true, false, 2, 4, 4, 65, 64},        {true, 96, true, false, 1, 4, 4, 700, 300},
        {true, 80, false, false, 1, 4, 4, 300, 700},      {false, 88, true, false, 2, 8, 2, 384, 1000},
        {true, 96, false, false, 2, 32, 32, 1500, 1500},  {false, 96, true, false, 4, 16, 8, 1024, 1024},
        // d192 / d256 (the wide kernel; d160 through the d192 bucket's kernels), as above.
        {true, 256, false, false, 2, 4, 4, 512, 512},     {true, 256, true, false, 1, 8, 2, 700, 900},
        {true, 256, true, true, 1, 4, 4, 333, 555},       {false, 256, false, false, 1, 4, 2, 1000, 129},
        {false, 256, true, false, 2, 4, 4, 65, 64},       {true, 256, true, false, 1, 4, 4, 700, 300},
        {true, 224, false, false, 1, 4, 4, 300, 700},     {true, 256, false, false, 2, 16, 16, 1500, 1500},
        {true, 192, false, false, 2, 4, 4, 512, 512},     {true, 192, true, false, 1, 8, 2, 700, 900},
        {false, 192, true, true, 1, 4, 4, 333, 555},      {true, 160, false, false, 1, 4, 2, 1000, 129},
        {true, 192, true, false, 2, 16, 16, 1500, 1500},
    };
    for (const Shape& sh : checks)
      each_dtype(sh, [&](auto t) { fails += !check_shape<decltype(t)>(sh, 1234 + fails); });
    std::printf("CHECK summary: %d failing shape(s)\n", fails);
  }
  if (mode == "grid" || mode == "all") {
    const Shape grid[] = {
        {true, 128, false, false, 8, 16, 16, 2048, 2048},  {true, 128, true, false, 8, 16, 16, 2048, 2048},
        {true, 128, false, false, 2, 16, 16, 8192, 8192},  {true, 128, true, false, 2, 16, 16, 8192, 8192},
        {true, 128, false, false, 1, 16, 16, 16384, 16384}, {true, 128, true, false, 1, 16, 16, 16384, 16384},
        {true, 64, false, false, 2, 32, 32, 8192, 8192},   {true, 64, true, false, 2, 32, 32, 8192, 8192},
        {false, 128, false, false, 2, 16, 16, 8192, 8192}, {true, 128, false, false, 2, 16, 2, 8192, 8192},
        {true, 128, false, false, 32, 16, 16, 512, 512},   {true, 128, true, false, 32, 16, 16, 512, 512},
        {true, 64, false, false, 16, 32, 32, 1024, 1024},
    };
    for (const Shape& sh : grid) each_dtype(sh, [&](auto t) { time_shape<decltype(t)>(sh); });
  }
  if (mode == "bulk") {  // the FA grid (b s = 16k, hq d = 2048; d96: 21 heads, d192: 10), s 1k..16k, causal or not; fp16 s8k
    for (int d : {64, 96, 128, 192, 256})
      for (int causal = 0; causal < 2; ++causal)
        for (int s = 1024; s <= 16384; s *= 2) {
          const Shape sh{true, d, causal != 0, false, 16384 / s, 2048 / d, 2048 / d, s, s};
          each_dtype(sh, [&](auto t) { time_bulk<decltype(t)>(sh); });
        }
    for (int d : {64, 96, 128, 192, 256}) {
      const Shape sh{false, d, false, false, 2, 2048 / d, 2048 / d, 8192, 8192};
      each_dtype(sh, [&](auto t) { time_bulk<decltype(t)>(sh); });
    }
  }
  if (mode == "det") {  // the FA grid, s 1k..16k (`det S`: that s only), causal or not: deterministic vs the rest
    const int only = argc > 2 ? std::atoi(argv[2]) : 0;
    for (int d : {64, 128})
      for (int causal = 0; causal < 2; ++causal)
        for (int s = 1024; s <= 16384; s *= 2) {
          if (only != 0 && s != only) continue;
          const Shape sh{true, d, causal != 0, false, 16384 / s, 2048 / d, 2048 / d, s, s};
          each_dtype(sh, [&](auto t) { time_det<decltype(t)>(sh); });
        }
  }
  if (mode == "one") {  // one bf16 FA-grid shape of the built bucket, bulk form: `one S CAUSAL` (for ncu)
    const int s = argc > 2 ? std::atoi(argv[2]) : 8192, causal = argc > 3 ? std::atoi(argv[3]) : 0;
    for (int d : {64, 96, 128, 192, 256}) {
      const Shape sh{true, d, causal != 0, false, std::max(1, 16384 / s), 2048 / d, 2048 / d, s, s};
      each_dtype(sh, [&](auto t) { time_bulk<decltype(t)>(sh); });
    }
  }
  return fails ? 1 : 0;
}
