// CPU emulation of the CUDA subset decode_kernel.cu, flash_fp32.cu and flash_fp32_tc.cu use (expf, logf, tanhf,
// fmaf, fmaxf are the C library's): one fiber per CUDA thread (below), CTAs run one after
// another, __syncthreads / __syncwarp / shuffles / ldmatrix / mma.sync as barrier-synchronized
// exchanges (mma and ldmatrix follow the PTX ISA's fragment layouts, written independently of
// the kernel). cp.async is a plain copy.
//
// Threads as fibers (ucontext) on the launching OS thread, switching only where a thread waits at
// a barrier: until session 64 each CUDA thread was a std::thread, and on the 2-core CI machine the
// fp32 emulator spent about twice its user time in the kernel waking threads at barriers. The
// fibers of a CTA take turns in lane order, in reverse order on odd CTAs, so that a missing barrier
// between a write and a read shows in one of the two orders (a read of 0xff smem garbage or a stale
// value); races as such are compute-sanitizer's job on a GPU.
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <type_traits>
#include <vector>

#include "orchard/numeric.h"

#define ORCHARD_DECODE_EMU 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __noinline__ __attribute__((noinline))
#define __align__(n) __attribute__((aligned(n)))  // (alignas may not follow static)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3() = default;
  dim3(unsigned a, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint4 { unsigned x, y, z, w; };
struct float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline float2 make_float2(float a, float b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }

template <class A, class B>
inline auto min(A a, B b) -> std::common_type_t<A, B> { return a < b ? a : b; }
template <class A, class B>
inline auto max(A a, B b) -> std::common_type_t<A, B> { return a < b ? b : a; }
inline float __expf(float x) { return std::exp(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
template <class T>
inline T __ldg(const T* p) { return *p; }

typedef int cudaError_t;
typedef void* cudaStream_t;
constexpr cudaError_t cudaSuccess = 0;
enum { cudaFuncAttributePreferredSharedMemoryCarveout = 9, cudaSharedmemCarveoutMaxShared = 100, cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97
};
inline const char* cudaGetErrorName(cudaError_t) { return "emu"; }
inline const char* cudaGetErrorString(cudaError_t) { return "emu"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
// Emulated devices: emu_device is the current one, emu_smem_optin[device] its dynamic shared-
// memory opt-in (sm_90's 227 KB unless a test sets another, so that kernels which size their
// CTAs by it take their other shapes). Every other attribute reads 132 (an H100's SM count,
// and a compute capability >= 9).
inline int emu_device = 0;
inline int emu_smem_optin[4] = {227 * 1024, 227 * 1024, 227 * 1024, 227 * 1024};
inline cudaError_t cudaGetDevice(int* d) { *d = emu_device; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int d) {
  *v = a == cudaDevAttrMaxSharedMemoryPerBlockOptin ? emu_smem_optin[d] : 132;
  return cudaSuccess;
}
template <class K>
cudaError_t cudaFuncSetAttribute(K, int, int v) {
  return v <= emu_smem_optin[emu_device] ? cudaSuccess : 1;  // the opt-in limit (and any carveout)
}

// ---- fibers -------------------------------------------------------------------------
// The running CTA's fibers. The per-thread globals (threadIdx, emu_mma_calls) are the running
// fiber's: a switch saves the leaving fiber's and loads the next one's.
struct EmuFiber {
  ucontext_t ctx;
  unsigned tid = 0, mma_calls = 0;
  bool done = false;
};
struct EmuScheduler {
  ucontext_t launcher;
  std::vector<EmuFiber> fibers;
  int current = 0, step = 1;  // step: +1 lane order, -1 reverse
  std::function<void()> body;
};
inline EmuScheduler* emu_sched = nullptr;
inline dim3 threadIdx, blockIdx;
inline unsigned emu_mma_calls = 0;

// Hand the OS thread from the running fiber to the next unfinished one in turn (none other: keep
// running; none at all: back to the launcher).
inline void emu_yield() {
  EmuScheduler& s = *emu_sched;
  EmuFiber& leaving = s.fibers[s.current];
  const int n = static_cast<int>(s.fibers.size());
  int next = s.current;
  do next = (next + s.step + n) % n;
  while (s.fibers[next].done && next != s.current);
  if (s.fibers[next].done) {
    setcontext(&s.launcher);
    std::abort();
  }
  if (next == s.current) return;
  leaving.mma_calls = emu_mma_calls;
  s.current = next;
  threadIdx = dim3(s.fibers[next].tid);
  emu_mma_calls = s.fibers[next].mma_calls;
  swapcontext(&leaving.ctx, &s.fibers[next].ctx);
}
inline void emu_fiber_main() {
  emu_sched->body();
  emu_sched->fibers[emu_sched->current].done = true;
  emu_yield();  // does not return: a finished fiber is never resumed
  std::abort();
}

// A barrier of `expected` fibers: the last to arrive goes on, the others yield until it has.
struct EmuBarrier {
  explicit EmuBarrier(int n) : expected(n) {}
  int expected, arrived = 0;
  unsigned phase = 0;
  void arrive_and_wait() {
    const unsigned mine = phase;
    if (++arrived == expected) {
      arrived = 0;
      ++phase;
      return;
    }
    while (phase == mine) emu_yield();
  }
};

// ---- per-thread / per-CTA state -------------------------------------------------------
struct EmuWarp {
  EmuBarrier bar{32};
  float f[32];
  std::uint32_t u[32][6];
  std::uint32_t mma_u[2][32][6];  // emu_mma1688_tf32's exchange buffers
  const void* ptr[32];
};
struct EmuBlock {
  explicit EmuBlock(int n) : bar(n), warps(n / 32) {}
  EmuBarrier bar;
  std::vector<EmuWarp> warps;
  int bar_and = 1;  // __syncthreads_and's vote
};
inline dim3 blockDim, gridDim;
inline EmuBlock* emu_block = nullptr;
// The running CTA's dynamic shared memory: one pool (CTAs run one at a time), in this binary's
// static storage like the kernels' static __shared__ arrays, so that a shared-state-space address
// (the sm80-class kernels' 32-bit ldmatrix / cp.async operands, smem_u32) is the signed 32-bit
// byte offset of any of them from the pool.
alignas(128) inline unsigned char emu_shared_pool[256 * 1024];
inline unsigned char* emu_dyn_smem() { return emu_shared_pool; }
inline std::uint32_t emu_smem_addr(const void* p) {
  return static_cast<std::uint32_t>(static_cast<const unsigned char*>(p) - emu_shared_pool);
}
inline unsigned char* emu_smem_ptr(std::uint32_t a) { return emu_shared_pool + static_cast<std::int32_t>(a); }
inline EmuWarp& emu_warp() { return emu_block->warps[threadIdx.x / 32]; }
inline int emu_lane() { return threadIdx.x % 32; }
inline void __syncthreads() { emu_block->bar.arrive_and_wait(); }
// A barrier that returns whether pred held on every thread: the votes, a barrier, the read, a
// barrier (everyone has read), the reset, and a third barrier (no vote of the next call lands
// before the reset).
inline int __syncthreads_and(int pred) {
  EmuBlock& b = *emu_block;
  if (!pred) b.bar_and = 0;
  b.bar.arrive_and_wait();
  const int all = b.bar_and;
  b.bar.arrive_and_wait();
  if (threadIdx.x == 0) b.bar_and = 1;
  b.bar.arrive_and_wait();
  return all;
}
[[noreturn]] inline void __trap() { std::abort(); }
inline void atomicAdd(float* p, float v) { *p += v; }  // fibers run one at a time
inline void __syncwarp(unsigned = 0xffffffffu) { emu_warp().bar.arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int o) {
  EmuWarp& w = emu_warp();
  const int l = emu_lane();
  w.f[l] = v;
  w.bar.arrive_and_wait();
  const float r = w.f[l ^ o];
  w.bar.arrive_and_wait();
  return r;
}

// 32-bit integers (the sm90 dropout draws' exchanges, dev/dropout_emu).
inline std::uint32_t __shfl_xor_sync(unsigned, std::uint32_t v, int o) {
  EmuWarp& w = emu_warp();
  const int l = emu_lane();
  w.u[l][0] = v;
  w.bar.arrive_and_wait();
  const std::uint32_t r = w.u[l ^ o][0];
  w.bar.arrive_and_wait();
  return r;
}

template <class V>
inline V __shfl_sync(unsigned, V v, int src) {
  static_assert(sizeof(V) <= 8);
  EmuWarp& w = emu_warp();
  const int l = emu_lane();
  std::memcpy(&w.u[l][0], &v, sizeof(V));
  w.bar.arrive_and_wait();
  V r;
  std::memcpy(&r, &w.u[src & 31][0], sizeof(V));
  w.bar.arrive_and_wait();
  return r;
}
inline int __any_sync(unsigned, int pred) {
  EmuWarp& w = emu_warp();
  const int l = emu_lane();
  w.f[l] = pred ? 1.f : 0.f;
  w.bar.arrive_and_wait();
  int any = 0;
  for (int t = 0; t < 32; ++t) any |= w.f[t] != 0.f;
  w.bar.arrive_and_wait();
  return any;
}
inline int __all_sync(unsigned mask, int pred) { return !__any_sync(mask, !pred); }

// mma.m16n8k8 row.col with tf32 operands and fp32 accumulators: A 16x8 (a0 (g, c), a1 (g + 8, c),
// a2 (g, c + 4), a3 (g + 8, c + 4)), B 8x8 (b0 (k = c, n = g), b1 (k = c + 4, n = g)), C 16x8
// (c0, c1 (g, 2c..2c + 1), c2, c3 (g + 8, 2c..)), g = lane / 4, c = lane % 4; an operand's low 13
// bits are ignored (tf32); the sum's rounding is the tensor cores' (below), not fp32's.
// One barrier per call, not two: calls alternate between two exchange buffers (every lane of a
// warp makes the same calls, so the lanes' call counts agree), and a buffer is rewritten only after
// the next call's barrier, which no lane passes before it has read this one.
inline void emu_mma1688_tf32(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1) {
  EmuWarp& w = emu_warp();
  const int l = emu_lane();
  std::uint32_t (&x)[32][6] = w.mma_u[emu_mma_calls++ & 1];
  for (int i = 0; i < 4; ++i) x[l][i] = a[i];
  x[l][4] = b0, x[l][5] = b1;
  w.bar.arrive_and_wait();
  auto tf32 = [](std::uint32_t v) { return __uint_as_float(v & 0xffffe000u); };
  float A[16][8], B[8][8];
  for (int t = 0; t < 32; ++t) {
    const int g = t / 4, cc = t % 4;
    A[g][cc] = tf32(x[t][0]);
    A[g + 8][cc] = tf32(x[t][1]);
    A[g][cc + 4] = tf32(x[t][2]);
    A[g + 8][cc + 4] = tf32(x[t][3]);
    B[cc][g] = tf32(x[t][4]);
    B[cc + 4][g] = tf32(x[t][5]);
  }
  const int g = l / 4, cc = l % 4;
  for (int i = 0; i < 4; ++i) {
    const int r = g + (i >= 2 ? 8 : 0), n = 2 * cc + (i & 1);
    // Tensor cores do not round like a chain of fp32 adds: they align the exact products and the
    // accumulator to the largest one's exponent, dropping the bits below (truncation), and round
    // the sum toward zero. This models that, a harsher rounding than fp32's (Fasi et al. 2021
    // measured it on V100 / T4 / A100), so the kernels' error margins are not flattered.
    double term[9];
    term[8] = c[i];
    double top = std::fabs(term[8]);
    for (int k = 0; k < 8; ++k) {
      term[k] = double(A[r][k]) * double(B[k][n]);  // exact: two 11-bit significands
      top = std::max(top, std::fabs(term[k]));
    }
    double sum = 0;
    if (top > 0 && std::isfinite(top)) {
      int e;
      std::frexp(top, &e);
      const double unit = std::ldexp(1.0, e - 24);  // fp32's last place at the largest term
      for (double t : term) sum += std::trunc(t / unit) * unit;
    } else {
      for (double t : term) sum += t;  // zeros, or inf / NaN as IEEE arithmetic has them
    }
    float f = static_cast<float>(sum);
    if (std::isfinite(f) && std::fabs(double(f)) > std::fabs(sum)) f = std::nextafter(f, 0.f);  // toward zero
    c[i] = f;
  }
}

template <class K, class... A>
void emu_launch(K kernel, dim3 grid, dim3 block, std::size_t smem, cudaStream_t, const A&... args) {
  gridDim = grid;
  blockDim = block;
  const int n = block.x;
  const unsigned ctas = grid.x * grid.y * grid.z;
  if (ctas == 0) return;
  // The CTAs one after another, each on a fresh EmuBlock (barrier, shared memory) and fresh fibers
  // (stacks allocated once per launch; untouched pages cost nothing).
  constexpr std::size_t kStack = 1 << 20;
  std::vector<std::unique_ptr<char[]>> stacks(n);
  for (auto& st : stacks) st.reset(new char[kStack]);
  EmuScheduler sched;
  sched.body = [&] { kernel(args...); };
  EmuScheduler* const outer = emu_sched;
  emu_sched = &sched;
  for (unsigned c = 0; c < ctas; ++c) {
    EmuBlock b(n);
    if (smem + 16 > sizeof emu_shared_pool) std::abort();
    std::memset(emu_shared_pool, 0xff, smem + 16);  // 0xff bytes: NaN-ish garbage to catch reads of unwritten smem
    blockIdx = dim3(c % grid.x, c / grid.x % grid.y, c / grid.x / grid.y);
    emu_block = &b;
    sched.fibers.assign(n, EmuFiber{});
    for (int t = 0; t < n; ++t) {
      EmuFiber& f = sched.fibers[t];
      f.tid = static_cast<unsigned>(t);
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = stacks[t].get();
      f.ctx.uc_stack.ss_size = kStack;
      f.ctx.uc_link = nullptr;
      makecontext(&f.ctx, emu_fiber_main, 0);
    }
    sched.step = c % 2 ? -1 : 1;
    sched.current = c % 2 ? n - 1 : 0;
    threadIdx = dim3(sched.fibers[sched.current].tid);
    emu_mma_calls = 0;
    swapcontext(&sched.launcher, &sched.fibers[sched.current].ctx);  // back when every fiber is done
  }
  emu_sched = outer;
}
