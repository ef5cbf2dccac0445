// The CUDA decode (KV-cache) kernels: flash_attn_with_kvcache's append, split-KV
// attention and split combine. See orchard/decode_params.h for the key numbering.
//
// 1. The append of the new k/v rows (rotary on k, fp32 then rounded) into the cache
//    at cache_seqlens: inside the attention kernel (its CTAs read the new rows from
//    k_new / v_new, rotating k in shared memory, and one CTA per (batch, kv head)
//    writes them to the cache rows that no CTA of the launch reads), or, when k_new /
//    v_new are not 16-byte readable, append_kernel first (one CTA per (batch, new
//    row, kv head), same stream).
// 2. Attention, one CTA per (split, kv head x row chunk, batch); the CTA holds up to
//    16 query rows of one kv head's group (GQA: every query head sharing the kv head,
//    times the new query rows), so each cache row is read from HBM once per CTA.
//    2b. bf16 / fp16 caches, decode_mma_kernel<T, kD, kMT> (kD 64 / 128 / 256; up to 8 rows
//    transposed (kMT = 0: S^T = K Q^T, O^T = V^T P^T, no half-empty m16 tile), 16 rows, or 32
//    rows (kMT = 2) at d <= 128 for groups of 17-32 rows): decode is
//    a stream of K / V bytes, so the kernel is built for memory-level parallelism.
//    Each of the 4 warps streams its own 16-key tiles (tiles w, w+4, ... of the
//    CTA's split) through a private cp.async ring (3 stages at d <= 128, 2 at 256:
//    2 tiles = 16 KB in flight per warp at d=128 while it computes the third), with
//    no CTA barrier in the main loop; a copy instruction moves whole 256-byte rows,
//    the paged row addresses are resolved one tile ahead by one lane per key (at d = 256,
//    tiles of a contiguous cache step each lane's own pointers instead).
//    S = Q K^T and O += P V run on tensor cores (mma.sync m16n8k16, the rows padded
//    to 16; P goes from the S accumulators straight into the A operand), online
//    softmax per warp in fp32 (log2 domain, rescale skipped while no row's max
//    moves); the 4 warps' (m, l, O) are merged through shared memory at the end.
//    2a. fp32 caches, decode_kernel<float, ...>: the first FMA kernel (one key per
//    thread for the scores, (row, 16-byte chunk) pairs for P x V, tiles of 64 keys).
// 3. combine_kernel: with num_splits > 1 the partials (normalized out + lse per
//    split, fp32 workspace) are merged: out = sum_s exp(lse_s - lse) out_s; launched
//    with programmatic dependent launch on sm_90 so that its launch overlaps the
//    attention kernel (ORCHARD_DECODE_PDL=0 turns that off).
// The split count (num_splits = 0) is decode_cuda_num_splits below. Checked on the
// CPU against the CPU backend by compiling this file against a thread-per-CUDA-thread
// emulation (dev/decode_emu/run.sh); GPU measurements go to bench/NOTES.md.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <atomic>
#include <string>
#include <type_traits>

#include "backends/cuda/cp_async.cuh"
#include "backends/cuda/cuda_error.h"
#include "backends/cuda/device_attribute.h"
#include "backends/cuda/pdl.cuh"
#include "core/decode_backend.h"
#include "orchard/decode_params.h"
#include "orchard/errors.h"

namespace orchard::detail {
namespace {

using cuda::check_cuda;

// ---- element helpers -------------------------------------------------------------------

__device__ __forceinline__ float2 to_float2(__nv_bfloat162 v) { return __bfloat1622float2(v); }
__device__ __forceinline__ float2 to_float2(__half2 v) { return __half22float2(v); }
// 16 bytes = 8 elements of a 16-bit type whose pairs are Pair.
template <typename Pair>
__device__ __forceinline__ void chunk_pairs(const uint4& u, float* f) {
  const Pair* h = reinterpret_cast<const Pair*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = to_float2(h[i]);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}

template <typename T>
struct Conv;
template <>
struct Conv<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float f) { return __float2bfloat16_rn(f); }
  static __device__ __forceinline__ void chunk(const uint4& u, float* f) { chunk_pairs<__nv_bfloat162>(u, f); }
};
template <>
struct Conv<__half> {
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float f) { return __float2half_rn(f); }
  static __device__ __forceinline__ void chunk(const uint4& u, float* f) { chunk_pairs<__half2>(u, f); }
};
template <>
struct Conv<float> {
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float f) { return f; }
  static __device__ __forceinline__ void chunk(const uint4& u, float* f) {
    f[0] = __uint_as_float(u.x);
    f[1] = __uint_as_float(u.y);
    f[2] = __uint_as_float(u.z);
    f[3] = __uint_as_float(u.w);
  }
};

__device__ __forceinline__ float load_rotary(const void* base, DType t, std::int64_t i) {
  switch (t) {
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
    case DType::kFloat16: return __half2float(static_cast<const __half*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

// Element c of x (length >= rotary_dim) after rotary at position pos; `get(k)` reads x[k].
template <typename Get>
__device__ __forceinline__ float rotary_elem(const DecodeParams& p, std::int64_t pos, int c, Get get) {
  if (c >= p.rotary_dim) return get(c);
  if (pos >= p.rotary_seqlen) pos = p.rotary_seqlen - 1;
  if (pos < 0) pos = 0;
  const int half = p.rotary_dim / 2;
  int pair, i0, i1;
  if (p.rotary_interleaved) {
    pair = c / 2;
    i0 = 2 * pair;
    i1 = i0 + 1;
  } else {
    pair = c < half ? c : c - half;
    i0 = pair;
    i1 = pair + half;
  }
  const float cs = load_rotary(p.rotary_cos, p.rotary_dtype, pos * p.cos_row_stride + pair);
  const float sn = load_rotary(p.rotary_sin, p.rotary_dtype, pos * p.sin_row_stride + pair);
  const float x0 = get(i0), x1 = get(i1);
  return c == i0 ? x0 * cs - x1 * sn : x0 * sn + x1 * cs;
}

using cuda::cp_async16;
using cuda::cp_async16_zfill;
using cuda::cp_async_commit;
using cuda::cp_async_wait;

// Programmatic dependent launch (sm_90, pdl.cuh): the attention kernel lets the combine kernel
// be launched early; the combine kernel waits for the attention grid's completion (and
// memory flush) before reading the partials. No-ops elsewhere.
using cuda::pdl_launch_dependents;
using cuda::pdl_wait_primary;

// decode_cache_row_offset and decode_split_range (orchard/decode_params.h) with 32-bit
// row arithmetic: rows and keys are < 2^31, and a 64-bit division is a called routine
// whose register saves show up as spills.
__device__ __forceinline__ std::int64_t cache_row_offset32(const DecodeParams& p, int bi, int row,
                                                           std::int64_t batch_stride, std::int64_t row_stride) {
  std::int64_t blk;
  int r = row;
  if (p.block_table == nullptr) {
    blk = p.cache_batch_idx ? p.cache_batch_idx[bi] : bi;
  } else {
    blk = p.block_table[bi * p.block_table_batch_stride + row / p.page_size];
    r = row % p.page_size;
  }
  if (blk < 0 || blk >= p.cache_batch) blk = 0;
  return blk * batch_stride + static_cast<std::int64_t>(r) * row_stride;
}
__device__ __forceinline__ void split_range32(int n_keys, int split, int num_splits, int granule, int& begin,
                                              int& end) {
  int per = (n_keys + num_splits - 1) / num_splits;
  per = (per + granule - 1) / granule * granule;
  begin = min(per * split, n_keys);
  end = min(begin + per, n_keys);
}

// %ctaid.y read again (asm volatile: not merged with an earlier read).
__device__ __forceinline__ unsigned ctaid_y() {
#if defined(__CUDA_ARCH__)
  unsigned r;
  asm volatile("mov.u32 %0, %%ctaid.y;" : "=r"(r));
  return r;
#else
  return blockIdx.y;
#endif
}

// ---- 1. append ------------------------------------------------------------------------

template <typename T>
__global__ void append_kernel(const DecodeParams p) {
  const int h = blockIdx.x % p.hkv;
  const int t = (blockIdx.x / p.hkv) % p.s_new;
  const int bi = blockIdx.x / (p.hkv * p.s_new);
  const DecodeSeq s = decode_seq(p, bi);
  const std::int64_t row = s.seqlen + t;
  const T* kn = static_cast<const T*>(p.k_new) + bi * p.kn_batch_stride + t * p.kn_row_stride + h * p.kn_head_stride;
  const T* vn = static_cast<const T*>(p.v_new) + bi * p.vn_batch_stride + t * p.vn_row_stride + h * p.vn_head_stride;
  T* kc = static_cast<T*>(p.k_cache) + cache_row_offset32(p, bi, static_cast<int>(row), p.kc_batch_stride, p.kc_row_stride) +
          h * p.kc_head_stride;
  T* vc = static_cast<T*>(p.v_cache) + cache_row_offset32(p, bi, static_cast<int>(row), p.vc_batch_stride, p.vc_row_stride) +
          h * p.vc_head_stride;
  for (int c = threadIdx.x; c < p.d; c += blockDim.x) {
    if (p.rotary_dim > 0)
      kc[c] = Conv<T>::store(rotary_elem(p, row, c, [&](int k) { return Conv<T>::load(kn[k]); }));
    else
      kc[c] = kn[c];
    vc[c] = vn[c];
  }
}

// ---- 2a. split-KV attention, fp32 caches (FMA; the 16-bit caches use 2b) ---------------

template <typename T, int kD, int kRows, int kThreads>
struct DecodeSmem {
  static constexpr int kVec = 16 / sizeof(T);           // elements per 16-byte chunk
  static constexpr int kKStride = kD + kVec;            // padded K row (elements)
  static constexpr int kWarps = kThreads / 32;
  static constexpr std::size_t q_off = 0;                                    // float [kRows][kD]
  static constexpr std::size_t k_off = q_off + sizeof(float) * kRows * kD;  // T [kThreads][kKStride]
  static constexpr std::size_t v_off = k_off + sizeof(T) * kThreads * kKStride;  // T [kThreads][kD]
  static constexpr std::size_t p_off = v_off + sizeof(T) * kThreads * kD;   // float [kRows][kThreads]
  static constexpr std::size_t koff_off = p_off + sizeof(float) * kRows * kThreads;  // const T* [kThreads]
  static constexpr std::size_t voff_off = koff_off + sizeof(void*) * kThreads;
  static constexpr std::size_t red_off = voff_off + sizeof(void*) * kThreads;  // float [2][kWarps][kRows]
  static constexpr std::size_t bytes = red_off + sizeof(float) * 2 * kWarps * kRows;
};

template <typename T, int kD, int kRows, int kThreads>
__global__ void __launch_bounds__(kThreads, 1) decode_kernel(const DecodeParams p) {
  using L = DecodeSmem<T, kD, kRows, kThreads>;
  constexpr int kVec = L::kVec;
  constexpr int kWarps = L::kWarps;
  constexpr int kMaxPairs = (kRows * (kD / kVec) + kThreads - 1) / kThreads;
  extern __shared__ __align__(16) unsigned char smem[];
  float* sQ = reinterpret_cast<float*>(smem + L::q_off);
  T* sK = reinterpret_cast<T*>(smem + L::k_off);
  T* sV = reinterpret_cast<T*>(smem + L::v_off);
  float* sP = reinterpret_cast<float*>(smem + L::p_off);
  const T** sKsrc = reinterpret_cast<const T**>(smem + L::koff_off);  // where each key row of the tile comes from
  const T** sVsrc = reinterpret_cast<const T**>(smem + L::voff_off);
  float* sRedMax = reinterpret_cast<float*>(smem + L::red_off);
  float* sRedSum = sRedMax + kWarps * kRows;
  __shared__ float sM[kRows], sL[kRows], sAlpha[kRows], sSlope[kRows];
  __shared__ int sVb[kRows], sVe[kRows], sRowI[kRows], sHead[kRows];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int split = blockIdx.x;
  const int groups = p.hq / p.hkv;
  const int rows_total = groups * p.sq;
  const int chunks_per_head = (rows_total + kRows - 1) / kRows;
  const int hk = blockIdx.y / chunks_per_head;
  const int row0 = (blockIdx.y % chunks_per_head) * kRows;
  const int rows_here = min(kRows, rows_total - row0);
  const int bi = blockIdx.z;
  const int d = p.d;
  const int nchunks = d / kVec;

  const DecodeSeq s = decode_seq(p, bi);
  const std::int64_t diag = s.n_keys - p.sq;
  pdl_launch_dependents();
  const float inv_softcap = p.softcap > 0.f ? __fdividef(1.f, p.softcap) : 0.f;  // (no division call in the loop)

  // Per-row facts and q (rotary applied, rounded to T as flash-attn does) into shared memory.
  if (tid < kRows) {
    const int g = tid;
    sM[g] = -INFINITY;
    sL[g] = 0.f;
    sAlpha[g] = 1.f;
    if (g < rows_here) {
      const int r = row0 + g;
      const int i = r / groups, h = hk * groups + r % groups;
      std::int64_t vb, ve;
      decode_visible(p, s.n_keys, i, vb, ve);
      sVb[g] = static_cast<int>(vb);
      sVe[g] = static_cast<int>(ve);
      sRowI[g] = i;
      sHead[g] = h;
      sSlope[g] = p.alibi_slopes ? p.alibi_slopes[bi * p.alibi_batch_stride + h] : 0.f;
    } else {
      sVb[g] = 0;
      sVe[g] = 0;
      sRowI[g] = 0;
      sHead[g] = 0;
      sSlope[g] = 0.f;
    }
  }
  for (int idx = tid; idx < kRows * kD; idx += kThreads) {
    const int g = idx / kD, c = idx % kD;
    float x = 0.f;
    if (g < rows_here && c < d) {
      const int r = row0 + g;
      const int i = r / groups, h = hk * groups + r % groups;
      const T* qp = static_cast<const T*>(p.q) + bi * p.q_batch_stride + i * p.q_row_stride + h * p.q_head_stride;
      if (p.rotary_dim > 0)
        x = Conv<T>::load(Conv<T>::store(
            rotary_elem(p, decode_q_rotary_pos(p, s, i), c, [&](int k) { return Conv<T>::load(qp[k]); })));
      else
        x = Conv<T>::load(qp[c]);
    }
    sQ[idx] = x;
  }
  __syncthreads();

  // Keys this CTA may need: its split, narrowed to the union of its rows' visible ranges.
  std::int64_t kb, ke;
  {
    int b32, e32;
    split_range32(static_cast<int>(s.n_keys), split, p.num_splits, kThreads, b32, e32);
    kb = b32, ke = e32;
  }
  {
    std::int64_t lo = s.n_keys, hi = 0;
    for (int g = 0; g < rows_here; ++g) {
      if (sVb[g] < sVe[g]) {
        lo = min(lo, static_cast<std::int64_t>(sVb[g]));
        hi = max(hi, static_cast<std::int64_t>(sVe[g]));
      }
    }
    kb = max(kb, lo);
    ke = min(ke, hi);
  }

  float acc[kMaxPairs][kVec];
#pragma unroll
  for (int q = 0; q < kMaxPairs; ++q)
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[q][e] = 0.f;

  const T* kbase = static_cast<const T*>(p.k_cache) + hk * p.kc_head_stride;
  const T* vbase = static_cast<const T*>(p.v_cache) + hk * p.vc_head_stride;
  // Keys [n_cached, n_keys) are this call's new rows. With append_in_kernel they are read
  // from k_new / v_new (rotary applied in shared memory), and one CTA per (batch, kv
  // head) writes them into the cache: rows no CTA of this launch reads there.
  const std::int64_t n_cached = p.append_in_kernel ? s.n_keys - p.s_new : s.n_keys;
  const T* knew = p.append_in_kernel
                      ? static_cast<const T*>(p.k_new) + bi * p.kn_batch_stride + hk * p.kn_head_stride
                      : nullptr;
  const T* vnew = p.append_in_kernel
                      ? static_cast<const T*>(p.v_new) + bi * p.vn_batch_stride + hk * p.vn_head_stride
                      : nullptr;
  if (p.append_in_kernel && split == 0 && blockIdx.y % chunks_per_head == 0) {
    for (int idx = tid; idx < p.s_new * d; idx += kThreads) {
      const int t = idx / d, c = idx % d;
      const std::int64_t row = s.seqlen + t;
      const T* kn = knew + t * p.kn_row_stride;
      T* kc = static_cast<T*>(p.k_cache) + cache_row_offset32(p, bi, static_cast<int>(row), p.kc_batch_stride, p.kc_row_stride) +
              hk * p.kc_head_stride;
      T* vc = static_cast<T*>(p.v_cache) + cache_row_offset32(p, bi, static_cast<int>(row), p.vc_batch_stride, p.vc_row_stride) +
              hk * p.vc_head_stride;
      kc[c] = p.rotary_dim > 0 ? Conv<T>::store(rotary_elem(p, row, c, [&](int k) { return Conv<T>::load(kn[k]); }))
                               : kn[c];
      vc[c] = vnew[t * p.vn_row_stride + c];
    }
  }

  // Pipeline (no extra shared memory): K of the next tile is fetched during this
  // tile's P x V, and V of the next tile during the next tile's scores. Copy groups,
  // oldest first: K(n), V(n), K(n+1), V(n+1), ... (empty groups past the end).
  auto tile_len_at = [&](std::int64_t t0) {
    return static_cast<int>(max(static_cast<std::int64_t>(0), min(static_cast<std::int64_t>(kThreads), ke - t0)));
  };
  auto compute_offsets = [&](std::int64_t t0) {  // cache offsets of the keys of tile t0
    if (tid < tile_len_at(t0)) {
      const std::int64_t j = t0 + tid;
      if (j < n_cached) {
        const std::int64_t row = s.leftpad + j;
        sKsrc[tid] = kbase + cache_row_offset32(p, bi, static_cast<int>(row), p.kc_batch_stride, p.kc_row_stride);
        sVsrc[tid] = vbase + cache_row_offset32(p, bi, static_cast<int>(row), p.vc_batch_stride, p.vc_row_stride);
      } else {
        sKsrc[tid] = knew + (j - n_cached) * p.kn_row_stride;
        sVsrc[tid] = vnew + (j - n_cached) * p.vn_row_stride;
      }
    }
  };
  auto issue_k = [&](int len) {
    for (int idx = tid; idx < len * nchunks; idx += kThreads) {
      const int key = idx / nchunks, c = idx % nchunks;
      cp_async16(sK + key * L::kKStride + c * kVec, sKsrc[key] + c * kVec);
    }
    cp_async_commit();
  };
  auto issue_v = [&](int len) {
    for (int idx = tid; idx < len * nchunks; idx += kThreads) {
      const int key = idx / nchunks, c = idx % nchunks;
      cp_async16(sV + key * kD + c * kVec, sVsrc[key] + c * kVec);
    }
    cp_async_commit();
  };
  if (kb < ke) {
    compute_offsets(kb);
    __syncthreads();
    issue_k(tile_len_at(kb));
    issue_v(tile_len_at(kb));
  }

  for (std::int64_t t0 = kb; t0 < ke; t0 += kThreads) {
    const int tile_len = tile_len_at(t0);
    const std::int64_t next = t0 + kThreads;
    cp_async_wait<1>();  // K(n) has landed (V(n) may still be in flight)
    __syncthreads();
    if (p.append_in_kernel && p.rotary_dim > 0 && t0 + tile_len > n_cached) {
      // New keys came unrotated from k_new: rotate them here (rounded to T, as stored in the cache).
      const int first = static_cast<int>(max(static_cast<std::int64_t>(0), n_cached - t0));
      const int half = p.rotary_dim / 2;
      for (int idx = tid; idx < (tile_len - first) * half; idx += kThreads) {
        const int key = first + idx / half, pair = idx % half;
        std::int64_t pos = s.leftpad + t0 + key;  // the cache row it is appended at
        if (pos >= p.rotary_seqlen) pos = p.rotary_seqlen - 1;
        const int i0 = p.rotary_interleaved ? 2 * pair : pair;
        const int i1 = p.rotary_interleaved ? 2 * pair + 1 : pair + half;
        T* krow = sK + key * L::kKStride;
        const float cs = load_rotary(p.rotary_cos, p.rotary_dtype, pos * p.cos_row_stride + pair);
        const float sn = load_rotary(p.rotary_sin, p.rotary_dtype, pos * p.sin_row_stride + pair);
        const float x0 = Conv<T>::load(krow[i0]), x1 = Conv<T>::load(krow[i1]);
        krow[i0] = Conv<T>::store(x0 * cs - x1 * sn);
        krow[i1] = Conv<T>::store(x0 * sn + x1 * cs);
      }
      __syncthreads();
    }

    // Scores: thread tid <-> key t0 + tid, every row.
    float sc[kRows];
#pragma unroll
    for (int g = 0; g < kRows; ++g) sc[g] = 0.f;
    if (tid < tile_len) {
      const T* krow = sK + tid * L::kKStride;
      for (int c = 0; c < nchunks; ++c) {
        float kf[kVec];
        Conv<T>::chunk(*reinterpret_cast<const uint4*>(krow + c * kVec), kf);
#pragma unroll
        for (int g = 0; g < kRows; ++g) {
          const float4* qv = reinterpret_cast<const float4*>(sQ + g * kD + c * kVec);
#pragma unroll
          for (int e4 = 0; e4 < kVec / 4; ++e4) {
            const float4 qq = qv[e4];
            sc[g] += qq.x * kf[4 * e4] + qq.y * kf[4 * e4 + 1] + qq.z * kf[4 * e4 + 2] + qq.w * kf[4 * e4 + 3];
          }
        }
      }
    }
    const std::int64_t j = t0 + tid;
#pragma unroll
    for (int g = 0; g < kRows; ++g) {
      float v = -INFINITY;
      if (tid < tile_len && g < rows_here && j >= sVb[g] && j < sVe[g]) {
        v = sc[g] * p.scale;
        if (p.softcap > 0.f) v = p.softcap * tanhf(v * inv_softcap);
        if (p.alibi_slopes) {
          const std::int64_t dist = sRowI[g] + diag - j;
          v -= sSlope[g] * static_cast<float>(dist < 0 ? -dist : dist);
        }
      }
      sc[g] = v;
      float m = v;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
      if (lane == 0) sRedMax[warp * kRows + g] = m;
    }
    __syncthreads();
    if (tid < kRows) {
      float m_tile = -INFINITY;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) m_tile = fmaxf(m_tile, sRedMax[w * kRows + tid]);
      const float m_old = sM[tid];
      const float m_new = fmaxf(m_old, m_tile);
      sAlpha[tid] = m_new == -INFINITY ? 1.f : __expf(m_old - m_new);
      sM[tid] = m_new;
    }
    __syncthreads();
#pragma unroll
    for (int g = 0; g < kRows; ++g) {
      const float m = sM[g];
      const float pv = sc[g] == -INFINITY ? 0.f : __expf(sc[g] - m);
      sP[g * kThreads + tid] = pv;
      float sum = pv;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      if (lane == 0) sRedSum[warp * kRows + g] = sum;
    }
    __syncthreads();  // every thread is done with sK (and with sKsrc / sVsrc of this tile)
    if (tid < kRows) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += sRedSum[w * kRows + tid];
      sL[tid] = sL[tid] * sAlpha[tid] + sum;
    }
    compute_offsets(next);
    __syncthreads();
    issue_k(tile_len_at(next));  // K(n+1) (an empty group past the end)
    cp_async_wait<1>();          // V(n) has landed (K(n+1) may still be in flight)
    __syncthreads();
    // P x V over this tile: thread owns pairs (row g, chunk c).
#pragma unroll
    for (int q = 0; q < kMaxPairs; ++q) {
      const int pair = tid + q * kThreads;
      const int g = pair / nchunks, c = pair % nchunks;
      if (g < rows_here) {
        const float alpha = sAlpha[g];
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[q][e] *= alpha;
        const float* prow = sP + g * kThreads;
        for (int key = 0; key < tile_len; ++key) {
          const float pk = prow[key];
          float vf[kVec];
          Conv<T>::chunk(*reinterpret_cast<const uint4*>(sV + key * kD + c * kVec), vf);
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc[q][e] += pk * vf[e];
        }
      }
    }
    __syncthreads();  // every thread is done with sV / sP and the row state of this tile
    issue_v(tile_len_at(next));  // V(n+1) (an empty group past the end)
  }
  cp_async_wait<0>();
  __syncthreads();

  // Write this CTA's rows: the final output (one split) or the split's partial.
#pragma unroll
  for (int q = 0; q < kMaxPairs; ++q) {
    const int pair = tid + q * kThreads;
    const int g = pair / nchunks, c = pair % nchunks;
    if (g >= rows_here) continue;
    const float l = sL[g];
    const float inv = l != 0.f ? __fdividef(1.f, l) : 0.f;  // only an exact 0 is "no key"; NaN stays NaN
    const int i = sRowI[g], h = sHead[g];
    if (p.num_splits == 1) {
      T* op = static_cast<T*>(p.out) + bi * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride + c * kVec;
#pragma unroll
      for (int e = 0; e < kVec; ++e) op[e] = Conv<T>::store(acc[q][e] * inv);
    } else {
      const std::size_t idx = ((static_cast<std::size_t>(split) * p.b + bi) * p.hq + h) * p.sq + i;
      float4* oa = reinterpret_cast<float4*>(p.out_accum + idx * d + c * kVec);
#pragma unroll
      for (int e4 = 0; e4 < kVec / 4; ++e4)
        oa[e4] = make_float4(acc[q][4 * e4] * inv, acc[q][4 * e4 + 1] * inv, acc[q][4 * e4 + 2] * inv,
                             acc[q][4 * e4 + 3] * inv);
    }
  }
  if (tid < rows_here) {
    const float l = sL[tid];
    const float lse = l != 0.f ? sM[tid] + logf(l) : -INFINITY;
    const int i = sRowI[tid], h = sHead[tid];
    if (p.num_splits == 1) {
      if (p.lse) p.lse[bi * p.lse_batch_stride + h * p.lse_head_stride + i] = lse;
    } else {
      p.lse_accum[((static_cast<std::size_t>(split) * p.b + bi) * p.hq + h) * p.sq + i] = lse;
    }
  }
}

// ---- 2b. split-KV attention, 16-bit caches: warp-specialized streaming + tensor cores -----

// mma.sync m16n8k16 (fp32 accumulate) for bf16 / fp16 operands, and ldmatrix.
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                         std::uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#elif defined(ORCHARD_DECODE_EMU)
  emu_mma16816<T>(c, a, b0, b1);
#endif
}
__device__ __forceinline__ void ldsm_x4(std::uint32_t (&r)[4], const void* smem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
#elif defined(ORCHARD_DECODE_EMU)
  emu_ldmatrix_x4(r, smem, false);
#endif
}
__device__ __forceinline__ void ldsm_x4_trans(std::uint32_t (&r)[4], const void* smem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
#elif defined(ORCHARD_DECODE_EMU)
  emu_ldmatrix_x4(r, smem, true);
#endif
}
// An 8x8 matrix of 16-bit pairs held in the mma fragment layout (lane t: row t / 4, columns
// 2 (t % 4) and + 1), transposed across the warp.
__device__ __forceinline__ std::uint32_t movmatrix_trans(std::uint32_t x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  std::uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
#elif defined(ORCHARD_DECODE_EMU)
  return emu_movmatrix_trans(x);
#else
  return x;
#endif
}
__device__ __forceinline__ float fast_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}
template <typename T>
__device__ __forceinline__ std::uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const std::uint32_t*>(&h);
  } else {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const std::uint32_t*>(&h);
  }
}

// Geometry of decode_mma_kernel<T, kD, kMT>. Each of the kWarps warps streams its own tiles of
// kTile keys (tiles w, w + kWarps, ... of the CTA's split) through its own kStages-deep
// cp.async ring of K and V tiles: no CTA barrier in the main loop.
// kMT = 0: up to 8 query rows (a GQA group of 8, or MHA, one new row), run transposed:
// S^T = K Q^T and O^T = V^T P^T put the keys and the head dim on the mma's 16-row side and the
// query rows on its 8-column side, so no half-empty m16 tile is multiplied (half the mma and
// softmax work per key, half the accumulators). H200, bench/decode, same splits: d256 GQA b8
// 32k 171 -> 145 us; d64 / d128 / d120 within 0.5 % (those read at the copy bound already).
template <typename T, int kD, int kMT>
struct MmaCfg {
  static constexpr bool kTransposed = kMT == 0;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRows = kTransposed ? 8 : 16 * kMT;  // query rows per CTA (kMT m16 tiles)
  static constexpr int kMinBlocks = kTransposed && kD <= 128 ? 3 : 2;  // resident CTAs per SM (registers)
  static constexpr int kTile = 16;                  // keys per warp tile
  static constexpr int kStride = kD + 8;            // padded smem row (elements): conflict-free ldmatrix
  static constexpr int kStages = kD <= 128 ? 3 : 2; // per-warp ring depth
  static constexpr int kOStride = kD + 8;           // fp32 row of the cross-warp merge buffer
  static constexpr std::size_t tile_elems = static_cast<std::size_t>(kTile) * kStride;
  static constexpr std::size_t q_bytes = sizeof(T) * kRows * kStride;
  static constexpr std::size_t kv_bytes = sizeof(T) * tile_elems * 2 * kStages * kWarps;
  static constexpr std::size_t merge_bytes = sizeof(float) * kWarps * kRows * kOStride;
  static constexpr std::size_t bytes = q_bytes + (kv_bytes > merge_bytes ? kv_bytes : merge_bytes);
};

template <typename T, int kD, int kMT>
__global__ void __launch_bounds__(MmaCfg<T, kD, kMT>::kThreads, MmaCfg<T, kD, kMT>::kMinBlocks)
    decode_mma_kernel(const DecodeParams p) {
  using C = MmaCfg<T, kD, kMT>;
  constexpr int kWarps = C::kWarps, kRows = C::kRows, kTile = C::kTile, kStride = C::kStride;
  constexpr int kStages = C::kStages;
  constexpr float kLog2e = 1.4426950408889634f;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sKV = reinterpret_cast<T*>(smem + C::q_bytes);            // [warp][stage][K|V][kTile][kStride]
  float* sO = reinterpret_cast<float*>(smem + C::q_bytes);     // after the loop: [warp][kRows][kOStride]
  __shared__ float sM[kWarps][kRows], sL[kWarps][kRows], sSlope[kRows], sInvL[kRows];
  __shared__ int sVb[kRows], sVe[kRows], sRowI[kRows], sHead[kRows];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int split = blockIdx.x;
  const int groups = p.hq / p.hkv;
  const int rows_total = groups * p.sq;
  const int chunks_per_head = (rows_total + kRows - 1) / kRows;
  const int hk = blockIdx.y / chunks_per_head;
  const int row0 = (blockIdx.y % chunks_per_head) * kRows;
  const int rows_here = min(kRows, rows_total - row0);
  const int bi = blockIdx.z;
  const int d = p.d;
  const int d16 = (d + 15) & ~15;  // columns the mma k-steps cover (zero-filled past d)

  const DecodeSeq s = decode_seq(p, bi);
  const int n_keys = static_cast<int>(s.n_keys);
  const int diag = n_keys - p.sq;

  // Keys of this CTA: its split, narrowed to the union of its rows' visible ranges.
  int kb, ke;
  {
    int b32, e32;
    split_range32(n_keys, split, p.num_splits, kWarps * kTile, b32, e32);
    const std::int64_t b64 = b32, e64 = e32;
    std::int64_t lo = s.n_keys, hi = 0;
    const int i_first = row0 / groups, i_last = (row0 + rows_here - 1) / groups;
    for (int i = i_first; i <= i_last; ++i) {
      std::int64_t vb, ve;
      decode_visible(p, s.n_keys, i, vb, ve);
      if (vb < ve) lo = min(lo, vb), hi = max(hi, ve);
    }
    kb = static_cast<int>(max(b64, lo));
    ke = static_cast<int>(min(e64, hi));
  }

  const std::int64_t n_cached = p.append_in_kernel ? s.n_keys - p.s_new : s.n_keys;
  const T* kbase = static_cast<const T*>(p.k_cache) + hk * p.kc_head_stride;
  const T* vbase = static_cast<const T*>(p.v_cache) + hk * p.vc_head_stride;
  const T* knew = p.append_in_kernel
                      ? static_cast<const T*>(p.k_new) + bi * p.kn_batch_stride + hk * p.kn_head_stride
                      : nullptr;
  const T* vnew = p.append_in_kernel
                      ? static_cast<const T*>(p.v_new) + bi * p.vn_batch_stride + hk * p.vn_head_stride
                      : nullptr;
  // ---- this warp's stream: setup, and the first tiles' copies out first ------------------
  const int n_tiles = ke > kb ? (ke - kb + kTile - 1) / kTile : 0;
  const int n_my = warp < n_tiles ? (n_tiles - 1 - warp) / kWarps + 1 : 0;
  T* ring = sKV + static_cast<std::size_t>(warp) * kStages * 2 * C::tile_elems;
  const bool paged = p.block_table != nullptr;
  std::int64_t cb = 0;
  if (!paged) {
    cb = p.cache_batch_idx ? p.cache_batch_idx[bi] : bi;
    if (cb < 0 || cb >= p.cache_batch) cb = 0;
  }
  const std::int32_t* btab = paged ? p.block_table + bi * p.block_table_batch_stride : nullptr;
  // Power-of-two page sizes (the usual 16 ... 256) divide by shifting.
  int page_shift = -1;
  if (paged && (p.page_size & (p.page_size - 1)) == 0) {
    page_shift = 0;
    while ((1 << page_shift) < p.page_size) ++page_shift;
  }
  auto page_of = [&](int row) { return page_shift >= 0 ? row >> page_shift : row / p.page_size; };
  auto in_page = [&](int row) { return page_shift >= 0 ? row & (p.page_size - 1) : row % p.page_size; };
  // Address roles: lane kk (and kk + 16) resolves key kk of the tile. Copy roles: chunk
  // copy_c of keys copy_key0 + m * kKeysPerCopy.
  const int kk = lane & 15;
  constexpr int kChunksPerRow = kD / 8;
  constexpr int kKeysPerCopy = 32 / kChunksPerRow;  // 4, 2, 1 at kD = 64, 128, 256
  constexpr int kCopies = kTile / kKeysPerCopy;
  const int copy_c = lane % kChunksPerRow, copy_key0 = lane / kChunksPerRow;
  const int nchunk = d / 8;        // 16-byte chunks that hold data
  const int nchunk16 = d16 / 8;    // chunks the mma reads (the rest zero-filled)
  // The key this lane copies in local tile `it`, and (paged) its block id, read one tile
  // ahead so that the block-table load is not waited for right before the copies.
  auto tile_start = [&](int it) { return kb + (warp + it * kWarps) * kTile; };  // first key of local tile it
  auto key_of = [&](int it) { return tile_start(it) + kk; };
  auto block_of = [&](int it) -> int {
    const int j = key_of(it);
    if (!paged || it >= n_my || j >= ke || j >= n_cached) return 0;
    return btab[page_of(static_cast<int>(s.leftpad) + j)];
  };
  constexpr int kCopyUnroll = (kCopies > 8 || kMT > 1) ? 4 : kCopies;  // keeps d=256 / 32 rows below 255 registers
  // Contiguous cache at d = 256: a whole tile of cached keys has row addresses affine in the key,
  // so each lane steps its own pointers instead of taking shuffled per-key addresses (~17
  // instructions per copy pair, 16 pairs per tile at d = 256). H200, bench/decode: d256 GQA b8
  // 32k 219 -> 168 us; at d64 / d128 (4 / 8 pairs) no gain, paged d128 2 % slower from the
  // larger kernel, so those kernels keep the one path.
  constexpr bool kAffineCopies = kD > 128;
  const int affine_end =
      !kAffineCopies || paged ? 0 : static_cast<int>(min(static_cast<std::int64_t>(ke), n_cached));
  auto issue_affine = [&](T* sK, T* sV, int t0) {
    if (copy_c >= nchunk16) return;
    const bool data = copy_c < nchunk;  // else a zero-filled column chunk
    const std::int64_t row = s.leftpad + t0 + copy_key0;
    const T* ks = data ? kbase + cb * p.kc_batch_stride + row * p.kc_row_stride + copy_c * 8 : kbase;
    const T* vs = data ? vbase + cb * p.vc_batch_stride + row * p.vc_row_stride + copy_c * 8 : vbase;
    const std::int64_t kstep = data ? kKeysPerCopy * p.kc_row_stride : 0;
    const std::int64_t vstep = data ? kKeysPerCopy * p.vc_row_stride : 0;
    const int bytes = data ? 16 : 0;
#pragma unroll kCopyUnroll
    for (int m = 0; m < kCopies; ++m) {
      const int key = copy_key0 + m * kKeysPerCopy;
      cp_async16_zfill(sK + key * kStride + copy_c * 8, ks, bytes);
      cp_async16_zfill(sV + key * kStride + copy_c * 8, vs, bytes);
      ks += kstep;
      vs += vstep;
    }
  };
  auto issue = [&](int it, int blk) {
    T* sK = ring + static_cast<std::size_t>(it % kStages) * 2 * C::tile_elems;
    T* sV = sK + C::tile_elems;
    if constexpr (kAffineCopies) {
      const int t0 = tile_start(it);
      if (t0 + kTile <= affine_end) return issue_affine(sK, sV, t0);  // warp-uniform
    }
    const int j = key_of(it);
    const bool valid = it < n_my && j < ke;
    const T* ksrc = nullptr;  // null: a key past the tile's end (zero-filled)
    const T* vsrc = nullptr;
    if (valid) {
      if (j < n_cached) {
        const int row = static_cast<int>(s.leftpad) + j;
        std::int64_t b, r;
        if (paged) {
          b = (blk < 0 || blk >= p.cache_batch) ? 0 : blk;
          r = in_page(row);
        } else {
          b = cb;
          r = row;
        }
        ksrc = kbase + b * p.kc_batch_stride + r * p.kc_row_stride;
        vsrc = vbase + b * p.vc_batch_stride + r * p.vc_row_stride;
      } else {
        ksrc = knew + (j - n_cached) * p.kn_row_stride;
        vsrc = vnew + (j - n_cached) * p.vn_row_stride;
      }
    }
    // Each copy instruction of the warp moves kKeysPerCopy whole rows (contiguous 16-byte
    // chunks across lanes: few L1 wavefronts per instruction); the row addresses come from
    // the lanes that resolved them.
#pragma unroll kCopyUnroll
    for (int m = 0; m < kCopies; ++m) {
      const int key = copy_key0 + m * kKeysPerCopy;
      const T* ks = reinterpret_cast<const T*>(
          __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(ksrc), key));
      const T* vs = reinterpret_cast<const T*>(
          __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(vsrc), key));
      if (copy_c < nchunk16) {
        const int bytes = ks != nullptr && copy_c < nchunk ? 16 : 0;
        cp_async16_zfill(sK + key * kStride + copy_c * 8, bytes ? ks + copy_c * 8 : kbase, bytes);
        cp_async16_zfill(sV + key * kStride + copy_c * 8, bytes ? vs + copy_c * 8 : vbase, bytes);
      }
    }
  };

  // Prologue: tiles 0 .. kStages-2 in flight (one copy group per tile, empty past the end).
  int blk_next = block_of(0);
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    const int blk = blk_next;
    blk_next = block_of(st + 1);
    if (st < n_my) issue(st, blk);
    cp_async_commit();
  }

  pdl_launch_dependents();  // the combine kernel (if any) may be scheduled; it waits for this grid

  // ---- while those land: row facts, q, the append --------------------------------------
  // q into shared memory as T (zero past d / rows_here): every load issued before any use.
  {
    constexpr int kQIter = kRows * kD / C::kThreads;
    T raw[kQIter];
#pragma unroll
    for (int k = 0; k < kQIter; ++k) {
      const int idx = tid + k * C::kThreads;
      const int g = idx / kD, c = idx % kD;
      raw[k] = Conv<T>::store(0.f);
      if (g < rows_here && c < d) {
        const int r = row0 + g;
        const int i = r / groups, h = hk * groups + r % groups;
        raw[k] = static_cast<const T*>(p.q)[bi * p.q_batch_stride + i * p.q_row_stride + h * p.q_head_stride + c];
      }
    }
#pragma unroll
    for (int k = 0; k < kQIter; ++k) {
      const int idx = tid + k * C::kThreads;
      sQ[(idx / kD) * kStride + idx % kD] = raw[k];
    }
    if (p.rotary_dim > 0) {  // rotary on q (fp32, rounded to T as flash-attn does)
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kQIter; ++k) {
        const int idx = tid + k * C::kThreads;
        const int g = idx / kD, c = idx % kD;
        if (g < rows_here && c < p.rotary_dim) {
          const T* row = sQ + g * kStride;
          const int i = (row0 + g) / groups;
          raw[k] = Conv<T>::store(
              rotary_elem(p, decode_q_rotary_pos(p, s, i), c, [&](int e) { return Conv<T>::load(row[e]); }));
        }
      }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kQIter; ++k) {
        const int idx = tid + k * C::kThreads;
        sQ[(idx / kD) * kStride + idx % kD] = raw[k];
      }
    }
  }
  if (tid < kRows) {
    const int g = tid;
    int vb = 0, ve = 0, i = 0, h = 0;
    float slope = 0.f;
    if (g < rows_here) {
      const int r = row0 + g;
      i = r / groups;
      h = hk * groups + r % groups;
      std::int64_t b64, e64;
      decode_visible(p, s.n_keys, i, b64, e64);
      vb = static_cast<int>(b64);
      ve = static_cast<int>(e64);
      slope = p.alibi_slopes ? p.alibi_slopes[bi * p.alibi_batch_stride + h] : 0.f;
    }
    sVb[g] = vb, sVe[g] = ve, sRowI[g] = i, sHead[g] = h, sSlope[g] = slope;
  }
  __syncthreads();

  // Per-lane softmax rows (mma C layout): rows rq + 8 * r2 for r2 < kH (two per m16 tile);
  // transposed, the C layout's columns: rows 2 (lane % 4) + r2.
  constexpr bool kT = C::kTransposed;
  constexpr int kH = kT ? 2 : 2 * kMT;
  const int rq = lane >> 2;
  auto lane_row = [&](int r2) { return kT ? 2 * (lane & 3) + r2 : rq + 8 * r2; };
  int vb2[kH], ve2[kH];  // (ALiBi's row index and slope are read from shared memory when used)
#pragma unroll
  for (int r2 = 0; r2 < kH; ++r2) {
    const int g = lane_row(r2);
    vb2[r2] = sVb[g];
    ve2[r2] = min(sVe[g], ke);  // keys past the split's end are the next split's
  }
  const float scale = p.scale, softcap = p.softcap, inv_softcap = softcap > 0.f ? __fdividef(1.f, softcap) : 0.f;
  const bool has_alibi = p.alibi_slopes != nullptr;

  // Q fragments in registers (one m-tile, d <= 128; transposed: Q^T's B fragments, qf[ks][0..1]),
  // else re-read per k-step with ldmatrix.
  constexpr bool kQRegs = kT || (kMT == 1 && kD <= 128);
  constexpr int kKSteps = kD / 16;
  std::uint32_t qf[kQRegs ? kKSteps : 1][4];
  const T* q_lane = sQ + ((lane & 7) + ((lane >> 3) & 1) * 8) * kStride + (lane >> 4) * 8;
  if constexpr (kT) {
    // Rows 0-7, columns 32 ks2 .. + 31: the B fragments of k-steps 2 ks2 and 2 ks2 + 1.
    const T* qt_lane = sQ + (lane & 7) * kStride + (lane >> 3) * 8;
#pragma unroll
    for (int ks2 = 0; ks2 < kKSteps / 2; ++ks2)
      if (ks2 * 32 < d16) {
        std::uint32_t r[4];
        ldsm_x4(r, qt_lane + ks2 * 32);
        qf[2 * ks2][0] = r[0], qf[2 * ks2][1] = r[1], qf[2 * ks2 + 1][0] = r[2], qf[2 * ks2 + 1][1] = r[3];
      }
  } else if constexpr (kQRegs) {
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks)
      if (ks * 16 < d16) ldsm_x4(qf[ks], q_lane + ks * 16);
  }

  // O (kMT m16 tiles of rows x kD / 8 n8 tiles), transposed O^T (kD / 16 m16 tiles of the
  // head dim x the 8 rows).
  constexpr int kAccM = kT ? 1 : kMT, kAccN = kT ? kD / 16 : kD / 8;
  float acc[kAccM][kAccN][4];
#pragma unroll
  for (int mt = 0; mt < kAccM; ++mt)
#pragma unroll
    for (int n = 0; n < kAccN; ++n) acc[mt][n][0] = acc[mt][n][1] = acc[mt][n][2] = acc[mt][n][3] = 0.f;
  float m2[kH], l2[kH];  // running max (log2 units) and this lane's part of the running sum
#pragma unroll
  for (int r2 = 0; r2 < kH; ++r2) m2[r2] = -INFINITY, l2[r2] = 0.f;

  // Score s of key j for this lane's row r2, in log2 units: scale, softcap, ALiBi, and -inf
  // outside the row's visible keys.
  auto score_log2 = [&](float s, int j, int r2) {
    float v = s * scale;
    if (softcap > 0.f) v = softcap * tanhf(v * inv_softcap);
    if (has_alibi) {
      const int g = lane_row(r2);
      const int dist = sRowI[g] + diag - j;
      v -= sSlope[g] * static_cast<float>(dist < 0 ? -dist : dist);
    }
    return (j >= vb2[r2] && j < ve2[r2]) ? v * kLog2e : -INFINITY;
  };
  // Row r2's running max takes this lane's tile max, reduced over the lanes that share the row
  // (those of one lane / 4; transposed, of one lane % 4); returns the factor for the old sum
  // and output, and rescales the sum.
  auto advance_max = [&](int r2, float tile_max) {
#pragma unroll
    for (int x = kT ? 4 : 1; x < (kT ? 32 : 4); x *= 2)
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, x));
    const float m_new = fmaxf(m2[r2], tile_max);
    const float alpha = m_new == -INFINITY ? 1.f : fast_exp2(m2[r2] - m_new);
    m2[r2] = m_new;
    l2[r2] *= alpha;
    return alpha;
  };
  // P of a log2 score against row r2's running max (0 where masked), added to the row's sum.
  auto prob = [&](float s, int r2) {
    const float pv = s == -INFINITY ? 0.f : fast_exp2(s - m2[r2]);
    l2[r2] += pv;
    return pv;
  };

  for (int it = 0; it < n_my; ++it) {
    __syncwarp();  // every lane is done with the stage tile it + kStages - 1 overwrites
    {
      const int blk = blk_next;
      blk_next = block_of(it + kStages);
      if (it + kStages - 1 < n_my) issue(it + kStages - 1, blk);
      cp_async_commit();
    }
    cp_async_wait<kStages - 1>();  // tile it has landed (this lane's copies)
    __syncwarp();                  // ... and every lane's
    T* sK = ring + static_cast<std::size_t>(it % kStages) * 2 * C::tile_elems;
    T* sV = sK + C::tile_elems;
    const int t0 = tile_start(it);

    if (p.append_in_kernel && p.rotary_dim > 0 && t0 + kTile > n_cached) {
      // New keys came unrotated from k_new: rotate them here (rounded to T, as stored in the cache).
      const int hr = p.rotary_dim / 2;
      for (int idx = lane; idx < kTile * hr; idx += 32) {
        const int key = idx / hr, pair = idx % hr;
        const int j = t0 + key;
        if (j < n_cached || j >= ke) continue;
        std::int64_t pos = s.leftpad + j;  // the cache row it is appended at
        if (pos >= p.rotary_seqlen) pos = p.rotary_seqlen - 1;
        const int i0 = p.rotary_interleaved ? 2 * pair : pair;
        const int i1 = p.rotary_interleaved ? 2 * pair + 1 : pair + hr;
        T* krow = sK + key * kStride;
        const float cs = load_rotary(p.rotary_cos, p.rotary_dtype, pos * p.cos_row_stride + pair);
        const float sn = load_rotary(p.rotary_sin, p.rotary_dtype, pos * p.sin_row_stride + pair);
        const float x0 = Conv<T>::load(krow[i0]), x1 = Conv<T>::load(krow[i1]);
        krow[i0] = Conv<T>::store(x0 * cs - x1 * sn);
        krow[i1] = Conv<T>::store(x0 * sn + x1 * cs);
      }
      __syncwarp();
    }

    if constexpr (kT) {
      // S^T = K Q^T (16 keys x 8 rows), K the A operand: sc[e] is key t0 + rq + 8 (e / 2),
      // row 2 (lane % 4) + e % 2.
      const T* kt_lane = sK + ((lane & 7) + ((lane >> 3) & 1) * 8) * kStride + (lane >> 4) * 8;
      float sc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
        if (ks * 16 < d16) {
          std::uint32_t ka[4];
          ldsm_x4(ka, kt_lane + ks * 16);
          mma16816<T>(sc, ka, qf[ks][0], qf[ks][1]);
        }
      }
      float mxt[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        sc[e] = score_log2(sc[e], t0 + rq + 8 * (e >> 1), e & 1);
        mxt[e & 1] = fmaxf(mxt[e & 1], sc[e]);
      }
      const float alpha[2] = {advance_max(0, mxt[0]), advance_max(1, mxt[1])};
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[e] = prob(sc[e], e & 1);
      if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
        for (int n = 0; n < kAccN; ++n) {
          acc[0][n][0] *= alpha[0], acc[0][n][1] *= alpha[1];
          acc[0][n][2] *= alpha[0], acc[0][n][3] *= alpha[1];
        }
      }
      // O^T += V^T P^T: P^T (16 keys x 8 rows) is the B operand, the score fragments of each
      // 8 x 8 half transposed in registers; V^T the A operand, ldmatrix .trans of V's rows.
      const std::uint32_t pb0 = movmatrix_trans(pack2<T>(sc[0], sc[1]));
      const std::uint32_t pb1 = movmatrix_trans(pack2<T>(sc[2], sc[3]));
      const T* vt_lane = sV + ((lane & 7) + ((lane >> 4) & 1) * 8) * kStride + ((lane >> 3) & 1) * 8;
#pragma unroll
      for (int n = 0; n < kAccN; ++n) {
        if (n * 16 < d16) {
          std::uint32_t va[4];
          ldsm_x4_trans(va, vt_lane + n * 16);
          mma16816<T>(acc[0][n], va, pb0, pb1);
        }
      }
      continue;
    }
    // One m16 tile of rows at a time (the second, if any, re-reads K / V from shared
    // memory: fewer live registers than both at once).
    const T* k_lane = sK + ((lane & 7) + (lane >> 4) * 8) * kStride + ((lane >> 3) & 1) * 8;
    const T* v_lane = sV + (lane & 15) * kStride + (lane >> 4) * 8;
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      if (mt > 0 && rows_here <= 16 * mt) continue;  // an empty m-tile (the last row chunk)
      // S = Q K^T for the tile's 16 keys: two n8 tiles.
      float sc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
        if (ks * 16 < d16) {
          std::uint32_t kf[4];
          ldsm_x4(kf, k_lane + ks * 16);
          if constexpr (kQRegs) {
            mma16816<T>(sc[0], qf[ks], kf[0], kf[1]);
            mma16816<T>(sc[1], qf[ks], kf[2], kf[3]);
          } else {
            std::uint32_t qa[4];
            ldsm_x4(qa, q_lane + mt * 16 * kStride + ks * 16);
            mma16816<T>(sc[0], qa, kf[0], kf[1]);
            mma16816<T>(sc[1], qa, kf[2], kf[3]);
          }
        }
      }

      // Online softmax (fp32, log2 units). sc[n][e]: row rq + 8 * (2 mt + e / 2),
      // key t0 + 8n + 2(lane % 4) + e % 2.
      float mxt[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          sc[n][e] = score_log2(sc[n][e], t0 + 8 * n + 2 * (lane & 3) + (e & 1), 2 * mt + (e >> 1));
          mxt[e >> 1] = fmaxf(mxt[e >> 1], sc[n][e]);
        }
      const float alpha[2] = {advance_max(2 * mt, mxt[0]), advance_max(2 * mt + 1, mxt[1])};
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[n][e] = prob(sc[n][e], 2 * mt + (e >> 1));
      if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {  // the max moved for some row
#pragma unroll
        for (int n = 0; n < kD / 8; ++n) {
          acc[mt][n][0] *= alpha[0], acc[mt][n][1] *= alpha[0];
          acc[mt][n][2] *= alpha[1], acc[mt][n][3] *= alpha[1];
        }
      }
      // O += P V: P (16 rows x 16 keys) from the score registers as the A operand.
      std::uint32_t pa[4];
      pa[0] = pack2<T>(sc[0][0], sc[0][1]);
      pa[1] = pack2<T>(sc[0][2], sc[0][3]);
      pa[2] = pack2<T>(sc[1][0], sc[1][1]);
      pa[3] = pack2<T>(sc[1][2], sc[1][3]);
#pragma unroll
      for (int nn = 0; nn < kD / 16; ++nn) {
        if (nn * 16 < d16) {
          std::uint32_t vf[4];
          ldsm_x4_trans(vf, v_lane + nn * 16);
          mma16816<T>(acc[mt][2 * nn], pa, vf[0], vf[1]);
          mma16816<T>(acc[mt][2 * nn + 1], pa, vf[2], vf[3]);
        }
      }
    }
  }
  cp_async_wait<0>();

  // ---- merge the warps' partial softmax states through shared memory -----------------
  // A row's partial sums: over the lanes of one lane / 4 (transposed: of one lane % 4).
#pragma unroll
  for (int r2 = 0; r2 < kH; ++r2)
#pragma unroll
    for (int x = kT ? 4 : 1; x < (kT ? 32 : 4); x *= 2) l2[r2] += __shfl_xor_sync(0xffffffffu, l2[r2], x);
  if (kT ? lane < 4 : (lane & 3) == 0) {
#pragma unroll
    for (int r2 = 0; r2 < kH; ++r2) sM[warp][lane_row(r2)] = m2[r2], sL[warp][lane_row(r2)] = l2[r2];
  }
  __syncthreads();  // every warp is done with its ring (sO aliases it) and wrote (m, l)
  float f[kH];
#pragma unroll
  for (int r2 = 0; r2 < kH; ++r2) {
    const int g = lane_row(r2);
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, sM[w][g]);
    f[r2] = m2[r2] == -INFINITY ? 0.f : fast_exp2(m2[r2] - mx);
  }
  float* o_w = sO + static_cast<std::size_t>(warp) * kRows * C::kOStride;
  if constexpr (kT) {  // acc[0][n][e]: column 16 n + rq + 8 (e / 2), row 2 (lane % 4) + e % 2
#pragma unroll
    for (int n = 0; n < kAccN; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = 16 * n + rq + 8 * (e >> 1);
        if (c < d) o_w[lane_row(e & 1) * C::kOStride + c] = acc[0][n][e] * f[e & 1];
      }
  }
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)  // (none when transposed: kMT = 0)
#pragma unroll
    for (int n = 0; n < kD / 8; ++n) {
      if (n * 8 < d) {
        const int c = n * 8 + 2 * (lane & 3);
        const float f0 = f[2 * mt], f1 = f[2 * mt + 1];
        *reinterpret_cast<float2*>(o_w + (rq + 16 * mt) * C::kOStride + c) =
            make_float2(acc[mt][n][0] * f0, acc[mt][n][1] * f0);
        *reinterpret_cast<float2*>(o_w + (rq + 16 * mt + 8) * C::kOStride + c) =
            make_float2(acc[mt][n][2] * f1, acc[mt][n][3] * f1);
      }
    }
  if (tid < kRows) {
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, sM[w][tid]);
    float l = 0.f;
    bool nan = false;  // a warp's NaN sum (NaN / inf in q or k): fmaxf dropped its max above
#pragma unroll
    for (int w = 0; w < kWarps; ++w) nan |= sL[w][tid] != sL[w][tid];
    if (mx != -INFINITY)
#pragma unroll
      for (int w = 0; w < kWarps; ++w)
        if (sM[w][tid] != -INFINITY) l += sL[w][tid] * fast_exp2(sM[w][tid] - mx);
    if (nan) l = __int_as_float(0x7fc00000);
    sInvL[tid] = l != 0.f ? __fdividef(1.f, l) : 0.f;
    if (tid < rows_here) {
      const float lse = l != 0.f ? (mx + log2f(l)) * 0.6931471805599453f : -INFINITY;
      const int i = sRowI[tid], h = sHead[tid];
      if (p.num_splits == 1) {
        if (p.lse) p.lse[bi * p.lse_batch_stride + h * p.lse_head_stride + i] = lse;
      } else {
        p.lse_accum[((static_cast<std::size_t>(split) * p.b + bi) * p.hq + h) * p.sq + i] = lse;
      }
    }
  }
  __syncthreads();
  const int d4 = d / 4;
  for (int idx = tid; idx < rows_here * d4; idx += C::kThreads) {
    const int g = idx / d4, c = (idx % d4) * 4;
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float4 x = *reinterpret_cast<const float4*>(sO + (static_cast<std::size_t>(w) * kRows + g) * C::kOStride + c);
      o.x += x.x, o.y += x.y, o.z += x.z, o.w += x.w;
    }
    const float inv = sInvL[g];
    const int i = sRowI[g], h = sHead[g];
    if (p.num_splits == 1) {
      T* op = static_cast<T*>(p.out) + bi * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride + c;
      op[0] = Conv<T>::store(o.x * inv);
      op[1] = Conv<T>::store(o.y * inv);
      op[2] = Conv<T>::store(o.z * inv);
      op[3] = Conv<T>::store(o.w * inv);
    } else {
      const std::size_t ridx = ((static_cast<std::size_t>(split) * p.b + bi) * p.hq + h) * p.sq + i;
      *reinterpret_cast<float4*>(p.out_accum + ridx * d + c) = make_float4(o.x * inv, o.y * inv, o.z * inv, o.w * inv);
    }
  }
  // The append, last: one CTA per (batch, kv head) writes the new rows to cache rows no
  // CTA of this launch reads (they read them from k_new / v_new). (ctaid re-read: keeps
  // the row-chunk index from living, spilled, through the kernel.)
  if (p.append_in_kernel && split == 0 && ctaid_y() % chunks_per_head == 0) {
    for (int idx = tid; idx < p.s_new * d; idx += C::kThreads) {
      const int t = idx / d, c = idx % d;
      const std::int64_t row = s.seqlen + t;
      const T* kn = knew + t * p.kn_row_stride;
      T* kc = static_cast<T*>(p.k_cache) + cache_row_offset32(p, bi, static_cast<int>(row), p.kc_batch_stride, p.kc_row_stride) +
              hk * p.kc_head_stride;
      T* vc = static_cast<T*>(p.v_cache) + cache_row_offset32(p, bi, static_cast<int>(row), p.vc_batch_stride, p.vc_row_stride) +
              hk * p.vc_head_stride;
      kc[c] = p.rotary_dim > 0 ? Conv<T>::store(rotary_elem(p, row, c, [&](int k) { return Conv<T>::load(kn[k]); }))
                               : kn[c];
      vc[c] = vnew[t * p.vn_row_stride + c];
    }
  }
}

// ---- 3. combine -----------------------------------------------------------------------

// One CTA per (batch, head, query row): out = sum_s exp(lse_s - lse) out_s. 8 groups of
// 32 threads take splits g, g + 8, ...: each lane reads the split's lse and its float4s of
// the partial row in the same round trip and merges them online (running max), then the
// groups are merged through shared memory.
constexpr int kCombineThreads = 256;
constexpr int kCombineMaxSplits = 256;

template <typename T>
__global__ void __launch_bounds__(kCombineThreads) combine_kernel(const DecodeParams p) {
  constexpr int kGroups = kCombineThreads / 32;
  __shared__ float sMax[kGroups], sSum[kGroups];
  __shared__ float4 sPart[kGroups][64];
  const int tid = threadIdx.x, lane = tid & 31, grp = tid >> 5;
  const std::size_t idx = blockIdx.x;  // ((bi * hq) + h) * sq + i
  const std::size_t n = static_cast<std::size_t>(p.b) * p.hq * p.sq;
  const int i = static_cast<int>(idx % p.sq);
  const int h = static_cast<int>((idx / p.sq) % p.hq);
  const int bi = static_cast<int>(idx / (static_cast<std::size_t>(p.sq) * p.hq));
  const int ns = p.num_splits;
  const int nc4 = p.d / 4;  // <= 64
  pdl_wait_primary();
  float m = -INFINITY, l = 0.f;
  float4 acc[2] = {make_float4(0.f, 0.f, 0.f, 0.f), make_float4(0.f, 0.f, 0.f, 0.f)};
  constexpr int kBatch = 8;  // splits per group whose loads are all in flight together
  for (int sp0 = grp; sp0 < ns; sp0 += kGroups * kBatch) {
    float ls[kBatch];
    float4 x[kBatch][2];
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int sp = sp0 + k * kGroups;
      const bool ok = sp < ns;
      ls[k] = ok ? p.lse_accum[sp * n + idx] : -INFINITY;
      const float4* src = reinterpret_cast<const float4*>(p.out_accum + (static_cast<std::size_t>(ok ? sp : 0) * n + idx) * p.d);
#pragma unroll
      for (int q = 0; q < 2; ++q)
        x[k][q] = ok && lane + 32 * q < nc4 ? src[lane + 32 * q] : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      if (ls[k] == -INFINITY) continue;  // an empty split (or past the last)
      const float m_new = fmaxf(m, ls[k]);
      const float sc = __expf(m - m_new), w = __expf(ls[k] - m_new);  // m = -inf: sc = 0
      m = m_new;
      l = l * sc + w;
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        acc[q].x = acc[q].x * sc + w * x[k][q].x;
        acc[q].y = acc[q].y * sc + w * x[k][q].y;
        acc[q].z = acc[q].z * sc + w * x[k][q].z;
        acc[q].w = acc[q].w * sc + w * x[k][q].w;
      }
    }
  }
  if (lane == 0) sMax[grp] = m, sSum[grp] = l;
#pragma unroll
  for (int q = 0; q < 2; ++q)
    if (lane + 32 * q < nc4) sPart[grp][lane + 32 * q] = acc[q];
  __syncthreads();
  float mx = -INFINITY;
#pragma unroll
  for (int g = 0; g < kGroups; ++g) mx = fmaxf(mx, sMax[g]);
  float wg[kGroups], sum = 0.f;
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
    wg[g] = sMax[g] == -INFINITY ? 0.f : __expf(sMax[g] - mx);
    sum += sSum[g] * wg[g];
  }
  const float inv = sum != 0.f ? __fdividef(1.f, sum) : 0.f;  // a NaN split's sum stays NaN
  T* op = static_cast<T*>(p.out) + bi * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
  if (tid < nc4) {
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
      const float4 x = sPart[g][tid];
      o.x += wg[g] * x.x, o.y += wg[g] * x.y, o.z += wg[g] * x.z, o.w += wg[g] * x.w;
    }
    op[4 * tid] = Conv<T>::store(o.x * inv);
    op[4 * tid + 1] = Conv<T>::store(o.y * inv);
    op[4 * tid + 2] = Conv<T>::store(o.z * inv);
    op[4 * tid + 3] = Conv<T>::store(o.w * inv);
  }
  if (tid == 0 && p.lse) p.lse[bi * p.lse_batch_stride + h * p.lse_head_stride + i] = sum != 0.f ? mx + logf(sum) : -INFINITY;
}

// ---- launch ---------------------------------------------------------------------------

// A/B switch for bench/decode/ab.sh (-DORCHARD_DECODE_TRANSPOSED=0: the 16-row kernel for every
// row count).
#ifndef ORCHARD_DECODE_TRANSPOSED
#define ORCHARD_DECODE_TRANSPOSED 1
#endif
constexpr bool kDecodeTransposed = ORCHARD_DECODE_TRANSPOSED != 0;

// The shared-memory opt-in is per device: once per (kernel, device).
// With max_carveout, the L1 / shared split is asked to favour shared memory so that the
// streaming kernel's 2-3 CTAs per SM are resident (the driver may otherwise pick a split
// that fits one).
template <typename Kernel>
void opt_in_smem(Kernel kernel, std::size_t bytes, std::atomic<bool> (&opted_in)[64], bool max_carveout = false) {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "decode: cudaGetDevice");
  if (device < 0 || device >= 64 || !opted_in[device].load(std::memory_order_acquire)) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
               "decode: cudaFuncSetAttribute");
    if (max_carveout)
      check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                      cudaSharedmemCarveoutMaxShared),
                 "decode: cudaFuncSetAttribute (carveout)");
    if (device >= 0 && device < 64) opted_in[device].store(true, std::memory_order_release);
  }
}

template <typename T, int kD, int kRows, int kThreads>
void launch_decode(const DecodeParams& p, cudaStream_t stream) {
  using L = DecodeSmem<T, kD, kRows, kThreads>;
  auto kernel = decode_kernel<T, kD, kRows, kThreads>;
  static std::atomic<bool> opted_in[64] = {};
  opt_in_smem(kernel, L::bytes, opted_in);
  const int rows_total = (p.hq / p.hkv) * p.sq;
  const int chunks = (rows_total + kRows - 1) / kRows;
  const dim3 grid(p.num_splits, p.hkv * chunks, p.b);
  kernel<<<grid, kThreads, L::bytes, stream>>>(p);
  check_cuda(cudaGetLastError(), "decode kernel launch");
}

// The rows-per-CTA variant for `rows_total` query rows per kv head: fn(std::integral_constant<int,
// kRows>) with kRows 4, 8 or kDecodeCudaRowsPerCta.
template <typename Fn>
auto by_rows(std::int64_t rows_total, Fn&& fn) {
  if (rows_total <= 4) return fn(std::integral_constant<int, 4>{});
  if (rows_total <= 8) return fn(std::integral_constant<int, 8>{});
  return fn(std::integral_constant<int, kDecodeCudaRowsPerCta>{});
}

// The SIMT decode kernel's variant for `rows_total` query rows per kv head:
// fn(std::integral_constant<int, kRows>, std::integral_constant<int, kThreads>). kThreads (keys per
// tile) is 128 when a cache row is <= 256 bytes, else 64; 32 where the 64-thread CTA's shared
// memory exceeds the device's opt-in (fp32 at d > 128 takes up to 153 KB, sm_86 / sm_89 opt in to
// 99 KB; 32 threads halve the K / V tiles: 85 KB).
template <typename T, int kD, typename Fn>
auto by_rows_and_threads(std::int64_t rows_total, Fn&& fn) {
  constexpr int kWide = kD * sizeof(T) <= 256 ? 128 : 64;
  return by_rows(rows_total, [&](auto rows) {
    if constexpr (kWide == 64) {
      const int optin = cuda::smem_optin_limit();
      if (optin > 0 && DecodeSmem<T, kD, decltype(rows)::value, 64>::bytes > static_cast<std::size_t>(optin))
        return fn(rows, std::integral_constant<int, 32>{});
    }
    return fn(rows, std::integral_constant<int, kWide>{});
  });
}

template <typename T, int kD>
void launch_rows(const DecodeParams& p, cudaStream_t stream) {
  by_rows_and_threads<T, kD>((p.hq / p.hkv) * p.sq, [&](auto rows, auto threads) {
    launch_decode<T, kD, decltype(rows)::value, decltype(threads)::value>(p, stream);
  });
}

template <typename T, int kD, int kMT>
void launch_mma(const DecodeParams& p, cudaStream_t stream) {
  using C = MmaCfg<T, kD, kMT>;
  auto kernel = decode_mma_kernel<T, kD, kMT>;
  static std::atomic<bool> opted_in[64] = {};
  opt_in_smem(kernel, C::bytes, opted_in, /*max_carveout=*/true);
  const int rows_total = (p.hq / p.hkv) * p.sq;
  const int chunks = (rows_total + C::kRows - 1) / C::kRows;
  const dim3 grid(p.num_splits, p.hkv * chunks, p.b);
  kernel<<<grid, C::kThreads, C::bytes, stream>>>(p);
  check_cuda(cudaGetLastError(), "decode kernel launch");
}

// Up to 8 query rows per (batch, kv head): the transposed kernel; else 16 rows per CTA (one
// m16 tile), or 32 (two m16 tiles sharing each K / V tile: the cache is read once for groups
// of 17-32 rows) at d <= 128.
template <typename T, int kD>
void launch_mma_rows(const DecodeParams& p, cudaStream_t stream) {
  static_assert(kDecodeCudaRowsPerCta == 16, "decode_cuda_num_splits counts CTAs of 16 / 32 rows");
  const int rows = (p.hq / p.hkv) * p.sq;
  if (rows <= 8 && kDecodeTransposed) return launch_mma<T, kD, 0>(p, stream);
  if constexpr (kD <= 128) {
    if (rows > 16) return launch_mma<T, kD, 2>(p, stream);
  }
  launch_mma<T, kD, 1>(p, stream);
}

// True if k_new / v_new can be read with the 16-byte copies the attention kernel uses.
template <typename T>
bool new_rows_vector_readable(const DecodeParams& p) {
  auto ok = [](const void* base, std::int64_t sb, std::int64_t sr, std::int64_t sh) {
    const std::int64_t es = sizeof(T);
    return reinterpret_cast<std::uintptr_t>(base) % 16 == 0 && (sb * es) % 16 == 0 && (sr * es) % 16 == 0 &&
           (sh * es) % 16 == 0;
  };
  return ok(p.k_new, p.kn_batch_stride, p.kn_row_stride, p.kn_head_stride) &&
         ok(p.v_new, p.vn_batch_stride, p.vn_row_stride, p.vn_head_stride);
}

// Programmatic dependent launch of the combine kernel on sm_90+ (ORCHARD_DECODE_PDL=0 turns
// it off): its launch overlaps the attention kernel's tail instead of following it.
bool pdl_enabled(int device) {
  static std::atomic<int> cache[64] = {};  // 0 unknown, 1 on, 2 off
  if (device < 0 || device >= 64) return false;
  int v = cache[device].load(std::memory_order_relaxed);
  if (v == 0) {
    const char* env = std::getenv("ORCHARD_DECODE_PDL");
    int major = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
      cudaGetLastError();
      major = 0;
    }
    v = (major >= 9 && !(env && env[0] == '0')) ? 1 : 2;
    cache[device].store(v, std::memory_order_relaxed);
  }
  return v == 1;
}

template <typename T>
void launch_combine(const DecodeParams& p, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(p.b) * p.hq * p.sq;
#if !defined(ORCHARD_DECODE_EMU)
  int device = 0;
  check_cuda(cudaGetDevice(&device), "decode: cudaGetDevice");
  if (pdl_enabled(device)) {  // (a plain launch where the runtime refuses the attribute)
    cuda::launch_pdl(combine_kernel<T>, dim3(grid), dim3(kCombineThreads), 0, stream, p);
    check_cuda(cudaGetLastError(), "decode combine kernel launch");
    return;
  }
#endif
  combine_kernel<T><<<grid, kCombineThreads, 0, stream>>>(p);
  check_cuda(cudaGetLastError(), "decode combine kernel launch");
}

template <typename T>
void run(const DecodeParams& params) {
  DecodeParams p = params;
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  // The append rides in the attention kernel (one launch fewer) unless there is no
  // attention to run or the new rows cannot be read with 16-byte copies.
  p.append_in_kernel = p.s_new > 0 && p.sq > 0 && p.hq > 0 && new_rows_vector_readable<T>(p);
  if (p.s_new > 0 && !p.append_in_kernel) {
    append_kernel<T><<<p.b * p.s_new * p.hkv, p.d <= 128 ? 128 : 256, 0, stream>>>(p);
    check_cuda(cudaGetLastError(), "decode append kernel launch");
  }
  if (p.sq == 0 || p.hq == 0) return;
  if constexpr (std::is_same_v<T, float>) {
    if (p.d <= 128)
      launch_rows<T, 128>(p, stream);
    else
      launch_rows<T, 256>(p, stream);
  } else {
    if (p.d <= 64)
      launch_mma_rows<T, 64>(p, stream);
    else if (p.d <= 128)
      launch_mma_rows<T, 128>(p, stream);
    else
      launch_mma_rows<T, 256>(p, stream);
  }
  if (p.num_splits > 1) launch_combine<T>(p, stream);
}

}  // namespace

std::size_t decode_cuda_fp32_smem_bytes(int d, std::int64_t rows) {
  // launch_rows' choice of kernel for fp32 caches on the current device, and its DecodeSmem.
  auto bytes = [&](auto kd) {
    return by_rows_and_threads<float, decltype(kd)::value>(rows, [](auto r, auto t) -> std::size_t {
      return DecodeSmem<float, decltype(kd)::value, decltype(r)::value, decltype(t)::value>::bytes;
    });
  };
  return d <= 128 ? bytes(std::integral_constant<int, 128>{}) : bytes(std::integral_constant<int, 256>{});
}

void decode_cuda(const DecodeParams& p) {
  if (p.sink) throw Error(ErrorKind::kNotImplemented, "decode: attention sinks run on the CPU decode kernel only");
  switch (p.dtype) {
    case DType::kBFloat16: return run<__nv_bfloat16>(p);
    case DType::kFloat16: return run<__half>(p);
    case DType::kFloat32: return run<float>(p);
    default:
      throw Error(ErrorKind::kNotImplemented, std::string("decode: dtype ") + dtype_name(p.dtype) +
                                                  " is not supported on CUDA");
  }
}

int decode_cuda_num_sms(int device) {
  return device >= 0 && device < 64 ? cuda::cached_device_attribute<cudaDevAttrMultiProcessorCount>(device) : 0;
}

int decode_cuda_num_splits(std::int64_t heads, std::int64_t rows, std::int64_t max_keys, int d, DType dtype,
                           int device) {
  // CTAs per (batch, kv head): row chunks of 16 (32 for the 16-bit kernel at d <= 128).
  const int rows_per_cta = dtype != DType::kFloat32 && d <= 128 && rows > 16 ? 32 : kDecodeCudaRowsPerCta;
  const std::int64_t work_items = heads * ((rows + rows_per_cta - 1) / rows_per_cta);
  // A CTA of the streaming kernel keeps 2 tiles per warp in flight (16 KB at d=128 bf16,
  // 4 warps: 64 KB), so about one CTA per SM already draws the HBM rate: split only when
  // there are fewer CTAs than SMs, then into as many splits as fill the resident CTA
  // slots once (no second partial wave), with at least 128 keys (two tiles per warp) per
  // split. Resident CTAs per SM, by shared memory / registers (MmaCfg; ptxas sm_90a): 3 at
  // d<=64, 2 at d<=128, 1 at d=256 (16-bit caches); the fp32 kernel is counted as 2. The
  // transposed kernel (<= 8 rows) fits 4 / 3 / 1 (125 / 159 / 202 registers) but keeps these
  // counts: H200, bench/decode, its more resident CTAs as more splits were slower (GQA b8 128k
  // 12 splits 615 us vs 8 splits 536; b1 99 vs 66 splits 97 vs 81 us).
  const int sms = decode_cuda_num_sms(device);
  if (sms <= 0 || work_items <= 0 || work_items >= sms) return 1;
  const int per_sm = dtype == DType::kFloat32 ? 2 : d <= 64 ? 3 : d <= 128 ? 2 : 1;
  std::int64_t splits = static_cast<std::int64_t>(per_sm) * sms / work_items;
  splits = std::min<std::int64_t>(splits, std::max<std::int64_t>(1, max_keys / 128));
  return static_cast<int>(std::clamp<std::int64_t>(splits, 1, kCombineMaxSplits));
}

}  // namespace orchard::detail
