// The sm90 backward's dropout step in its two forms (drop bits, as the wide kernel has it; packed AND
// masks, the d64-d128 kernel's since session 65), one lane's 32 S^T elements as flash_bwd_sm90.cuh
// holds them, for a static SASS count without a GPU: the code is
// straight-line (unrolled), so the count is the per-step instruction count of each form. The loads and
// stores only keep the compiler from dropping the work; dev/cuda/sass_op_count.py leaves them out.
//   nvcc -Iinclude -Isrc -O3 -std=c++20 -gencode arch=compute_90a,code=sm_90a --expt-relaxed-constexpr \
//        -cubin dev/cuda/dropout_step_sass.cu -o /tmp/step.cubin
//   cuobjdump -sass /tmp/step.cubin | python3 dev/cuda/sass_op_count.py
// (cuobjdump: the one in triton's wheel, .venv/lib/python3*/site-packages/triton/backends/nvidia/bin.)
// Session 64 (nvcc 13.0, cuobjdump 13.5): draws alone 464, packed step 704, bits step 1020 (the draws
// included in both; bits: SEL 112, ISETP 71, SHF 51, FSEL 32; packed: PRMT 80).
#include <cuda_bf16.h>
#include "backends/cuda/sm90/dropout_scores.cuh"
using namespace orchard;
__device__ float unpack(uint32_t w, int hi) { return __uint_as_float(hi ? (w & 0xffff0000u) : (w << 16)); }
// A lane's dP^T accumulators and packed P^T pairs, from global memory (so the work is not folded away).
__device__ void load_step(const float* in, const uint32_t* pin, float (&dp)[32], uint32_t (&pa)[16]) {
  for (int i = 0; i < 32; ++i) dp[i] = in[i * 32 + threadIdx.x];
  for (int i = 0; i < 16; ++i) pa[i] = pin[i * 32 + threadIdx.x];
}
extern "C" __global__ void bits_step(const float* in, const uint32_t* pin, float* out, uint32_t* pout, DropoutKey key,
                                     uint32_t bh, uint32_t q2t, uint32_t k, uint32_t thr, float rdrop, const float* d) {
  const int g = (threadIdx.x % 32) / 4;
  float dp[32];
  uint32_t pa[16];
  load_step(in, pin, dp, pa);
  const uint32_t dropped = sm90::dropped_bits_keys(key, bh, q2t, k, g, thr);
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    const float x = (dropped >> i) & 1u ? 0.f : dp[i] * rdrop;
    out[i * 32 + threadIdx.x] = unpack(pa[i / 2], i % 2) * (x - d[i]);
  }
#pragma unroll
  for (int i = 0; i < 16; ++i) pout[i * 32 + threadIdx.x] = sm90::zero_dropped_pair(pa[i], dropped, 2 * i);
}
extern "C" __global__ void packed_step(const float* in, const uint32_t* pin, float* out, uint32_t* pout, DropoutKey key,
                                       uint32_t bh, uint32_t q2t, uint32_t k, uint32_t thr, float rdrop, const float* d) {
  const int g = (threadIdx.x % 32) / 4;
  float dp[32];
  uint32_t pa[16];
  load_step(in, pin, dp, pa);
  uint32_t own[4], got[4];
  cuda::key_rows_draws<8>(own, got, key.seed, key.offset, bh, q2t, k, g & 1);
  const uint32_t bias = cuda::query_rows_pair_bias(thr);
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint32_t keep = cuda::key_rows_pair_mask(own[kk], got[kk], g & 1, q, bias);
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int i = 8 * kk + 2 * q + e;
        const float x = __uint_as_float(__float_as_uint(dp[i]) & cuda::key_rows_element_mask(keep, e)) * rdrop;
        out[i * 32 + threadIdx.x] = unpack(pa[4 * kk + q], e) * (x - d[i]);
      }
      pout[(4 * kk + q) * 32 + threadIdx.x] = pa[4 * kk + q] & keep;
    }
}
// The draws alone (the Philox calls and the shuffles), for scale.
extern "C" __global__ void draws_only(uint32_t* out, DropoutKey key, uint32_t bh, uint32_t q2t, uint32_t k) {
  const int g = (threadIdx.x % 32) / 4;
  uint32_t own[4], got[4];
  cuda::key_rows_draws<8>(own, got, key.seed, key.offset, bh, q2t, k, g & 1);
  for (int i = 0; i < 4; ++i) out[i * 32 + threadIdx.x] = own[i] ^ got[i];
}
