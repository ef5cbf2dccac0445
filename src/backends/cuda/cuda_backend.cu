// The CUDA backend's dispatch table: support checks, dtype x head-dim-bucket
// dispatch to the generated instantiations, staging helpers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "backends/cuda/launch.h"
#include "core/backend.h"
#include "orchard/philox.h"

namespace orchard::cuda {

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw Error(ErrorKind::kRuntime, std::string("CUDA error in ") + what + ": " +
                                         cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

namespace {

// Head-dim buckets compiled (d is padded up to the bucket inside the kernel).
int head_dim_bucket(int d) {
  if (d <= 32) return 32;
  if (d <= 64) return 64;
  if (d <= 96) return 96;
  if (d <= 128) return 128;
  if (d <= 160) return 160;
  if (d <= 192) return 192;
  return 256;
}

template <typename T>
void fwd_dispatch(const FwdParams& p) {
  switch (head_dim_bucket(p.d)) {
    case 32: return run_flash_fwd<T, 32>(p);
    case 64: return run_flash_fwd<T, 64>(p);
    case 96: return run_flash_fwd<T, 96>(p);
    case 128: return run_flash_fwd<T, 128>(p);
    case 160: return run_flash_fwd<T, 160>(p);
    case 192: return run_flash_fwd<T, 192>(p);
    default: return run_flash_fwd<T, 256>(p);
  }
}
template <typename T>
void bwd_dispatch(const BwdParams& p) {
  switch (head_dim_bucket(p.d)) {
    case 32: return run_flash_bwd<T, 32>(p);
    case 64: return run_flash_bwd<T, 64>(p);
    case 96: return run_flash_bwd<T, 96>(p);
    case 128: return run_flash_bwd<T, 128>(p);
    case 160: return run_flash_bwd<T, 160>(p);
    case 192: return run_flash_bwd<T, 192>(p);
    default: return run_flash_bwd<T, 256>(p);
  }
}

std::string check_support(const FwdParams& p) {
  switch (p.dtype) {
    case DType::kFloat16:
    case DType::kBFloat16:
    case DType::kFloat32: break;
    case DType::kFloat64: return "float64 is supported on the CPU backend only";
    default: return std::string("dtype ") + dtype_name(p.dtype) + " is not supported by the CUDA backend";
  }
  if (p.d <= 0 || p.d % 8 != 0)
    return "the CUDA backend needs head_dim to be a positive multiple of 8 (got " + std::to_string(p.d) + ")";
  if (p.d > 256) return "the CUDA backend supports head_dim up to 256 (got " + std::to_string(p.d) + ")";
  // Implemented: sliding window, softcap, ALiBi, varlen, attention sinks (all dtypes,
  // forward and backward). Not yet: attn_bias / attn_mask. The float32 SIMT kernels
  // implement it (flash_fp32.cu; tests/cuda/cuda_check.cu runs them past this check),
  // the bf16/fp16 mma kernels do not; refused for every dtype until they do (the
  // README support matrix has one cell per backend).
  if (p.attn_bias != nullptr) return "attn_bias / attn_mask is not implemented on the CUDA backend yet";
  if (p.d_v != 0 && p.d_v != p.d)
    return "a value head dim different from the query/key head dim is not implemented on the CUDA backend yet";
  if (p.cu_seqlens_q != nullptr && p.dropout_mask != nullptr)
    return "returning the dropout mask is not supported with variable-length sequences on the CUDA backend";
  if ((p.cu_seqlens_q == nullptr) != (p.cu_seqlens_k == nullptr))
    return "varlen needs both cu_seqlens_q and cu_seqlens_k";
  return {};
}

std::string variant_name(const FwdParams& p, bool backward) {
  std::string s = backward ? "cuda.bwd." : "cuda.fwd.";
  if (p.dtype == DType::kFloat32) {
    s += "fp32_simt";
  } else {
    s += p.dtype == DType::kBFloat16 ? "bf16" : "fp16";
    s += ".d" + std::to_string(head_dim_bucket(p.d));
    if (backward) s += static_cast<const BwdParams&>(p).deterministic ? ".deterministic" : ".atomic_dq";
  }
  if (p.causal) s += ".causal";
  if (p.dropout_p > 0.f) s += ".dropout";
  if (p.window_left >= 0 || p.window_right >= 0) s += ".window";
  if (p.softcap > 0.f) s += ".softcap";
  if (p.alibi_slopes != nullptr) s += ".alibi";
  if (p.cu_seqlens_q != nullptr) s += ".varlen";
  if (p.sink != nullptr) s += ".sink";
  if (p.attn_bias != nullptr) s += p.attn_bias_dtype == DType::kUInt8 ? ".mask" : ".bias";
  return s;
}

// (b, hq, sq, sk) uint8 keep-mask: 4 columns (one Philox call) per thread; with a
// dropout column offset that is not a multiple of 4, the 4 columns span two calls.
__global__ void dropout_mask_kernel(const FwdParams p, int64_t total4) {
  const uint32_t thr = dropout_keep_threshold(p.dropout_p);
  const DropoutKey key = dropout_key(p);  // reads rng_state when set
  const int64_t c4n = (p.sk + 3) / 4;
  const uint32_t shift = static_cast<uint32_t>(p.dropout_col_offset) & 3u;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total4;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c4 = idx % c4n;
    const int64_t r = idx / c4n;  // bh * sq + row
    const uint32_t row = static_cast<uint32_t>(r % p.sq + p.dropout_row_offset);
    const uint32_t bh = static_cast<uint32_t>(r / p.sq);
    const uint32_t dbh = dropout_batch_head(p, bh / p.hq, bh % p.hq);
    // Global columns g0 .. g0 + 3 (g0 = c4 * 4 + col offset): lanes shift.. of call g0 / 4, then
    // lanes 0.. of the next call.
    const uint32_t g4 = static_cast<uint32_t>((c4 * 4 + p.dropout_col_offset) >> 2);
    const Philox4 dr = dropout_draws(key.seed, key.offset, dbh, row, g4);
    const Philox4 dr2 = shift != 0u ? dropout_draws(key.seed, key.offset, dbh, row, g4 + 1u) : dr;
    uint8_t* out = p.dropout_mask + r * p.sk + c4 * 4;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t lane = shift + static_cast<uint32_t>(j);
      const Philox4& src = lane < 4u ? dr : dr2;
      if (c4 * 4 + j < p.sk) out[j] = philox_lane(src, static_cast<int>(lane & 3u)) >= thr ? 1 : 0;
    }
  }
}

void forward(const FwdParams& p) {
  switch (p.dtype) {
    case DType::kBFloat16: fwd_dispatch<__nv_bfloat16>(p); break;
    case DType::kFloat16: fwd_dispatch<__half>(p); break;
    case DType::kFloat32: run_fwd_fp32(p); break;
    default: throw Error(ErrorKind::kNotImplemented, "unsupported dtype on CUDA");
  }
  if (p.dropout_mask != nullptr) run_dropout_mask(p);
}

void backward(const BwdParams& p) {
  switch (p.dtype) {
    case DType::kBFloat16: bwd_dispatch<__nv_bfloat16>(p); break;
    case DType::kFloat16: bwd_dispatch<__half>(p); break;
    case DType::kFloat32: run_bwd_fp32(p); break;
    default: throw Error(ErrorKind::kNotImplemented, "unsupported dtype on CUDA");
  }
}

std::size_t backward_workspace_bytes(const FwdParams& p) { return bwd_workspace_layout(p).bytes; }

// 16-byte vector loads (cp.async) need 16-byte aligned bases and row/head/batch
// strides; the bridge stages anything else.
std::size_t required_alignment(const FwdParams&) { return 16; }

void* allocate(std::size_t bytes, void* stream) {
  void* ptr = nullptr;
  const cudaError_t err = cudaMallocAsync(&ptr, bytes, static_cast<cudaStream_t>(stream));
  if (err != cudaSuccess)
    throw Error(ErrorKind::kRuntime, std::string("CUDA error in cudaMallocAsync(") +
                                         std::to_string(bytes) + " bytes): " + cudaGetErrorString(err));
  return ptr;
}

void release(void* ptr, void* stream) {
  if (ptr != nullptr) cudaFreeAsync(ptr, static_cast<cudaStream_t>(stream));
}

template <typename E>
__global__ void strided_copy_kernel(const detail::StridedCopy c, int64_t total) {
  const E* src = static_cast<const E*>(c.src);
  E* dst = static_cast<E*>(c.dst);
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t rem = idx, so = 0, dof = 0;
#pragma unroll
    for (int dim = 3; dim >= 0; --dim) {
      const int64_t i = rem % c.shape[dim];
      rem /= c.shape[dim];
      so += i * c.src_strides[dim];
      dof += i * c.dst_strides[dim];
    }
    dst[dof] = src[so];
  }
}

void copy_strided(const detail::StridedCopy& c, void* stream) {
  int64_t total = 1;
  for (int i = 0; i < 4; ++i) total *= c.shape[i];
  if (total <= 0) return;
  const unsigned blocks = static_cast<unsigned>(total / 256 + 1 < 65536 ? total / 256 + 1 : 65536);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (c.element_size) {
    case 1: strided_copy_kernel<uint8_t><<<blocks, 256, 0, s>>>(c, total); break;
    case 2: strided_copy_kernel<uint16_t><<<blocks, 256, 0, s>>>(c, total); break;
    case 4: strided_copy_kernel<uint32_t><<<blocks, 256, 0, s>>>(c, total); break;
    case 8: strided_copy_kernel<uint64_t><<<blocks, 256, 0, s>>>(c, total); break;
    default:
      throw Error(ErrorKind::kRuntime, "copy_strided: unsupported element size " +
                                           std::to_string(c.element_size));
  }
  check_launch("strided_copy_kernel");
}

bool synchronize(void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(s, &status) != cudaSuccess || status != cudaStreamCaptureStatusNone) {
    cudaGetLastError();  // clear a sticky-free error from the query, if any
    return false;
  }
  const cudaError_t err = cudaStreamSynchronize(s);
  if (err != cudaSuccess)
    throw Error(ErrorKind::kRuntime, std::string("CUDA error in cudaStreamSynchronize: ") +
                                         cudaGetErrorString(err));
  return true;
}

const detail::BackendOps kOps = {
    "cuda",        check_support, variant_name, forward,  backward,   backward_workspace_bytes,
    required_alignment, allocate, release,      copy_strided, synchronize,
};

}  // namespace

namespace {
__global__ void __launch_bounds__(256) bwd_dsink_kernel(const BwdParams p, const float* dsum) {
  __shared__ float red[256];
  const int h = blockIdx.x, tid = threadIdx.x;
  const float sink = p.sink[h];
  float acc = 0.f;
  for (int bi = 0; bi < p.b; ++bi) {
    const SeqSpan s = seq_span(p, bi);
    const float* lse = static_cast<const float*>(p.lse) + bi * p.lse_batch_stride + h * p.lse_head_stride + s.q_start;
    const float* D = dsum + (static_cast<int64_t>(bi) * p.hq + h) * p.sq;
    for (int i = tid; i < s.len_q; i += 256) acc += expf(sink - lse[i]) * D[i];
  }
  red[tid] = acc;
  __syncthreads();
  for (int o = 128; o > 0; o >>= 1) {
    if (tid < o) red[tid] += red[tid + o];
    __syncthreads();
  }
  if (tid == 0) p.dsink[h] = -red[0];
}
}  // namespace

void run_bwd_dsink(const BwdParams& p, const float* dsum) {
  if (p.hq == 0) return;
  bwd_dsink_kernel<<<static_cast<unsigned>(p.hq), 256, 0, static_cast<cudaStream_t>(p.stream)>>>(p, dsum);
  check_launch("bwd_dsink_kernel");
}

void run_dropout_mask(const FwdParams& p) {
  const int64_t total4 = static_cast<int64_t>(p.b) * p.hq * p.sq * ((p.sk + 3) / 4);
  if (total4 == 0) return;
  const unsigned blocks = static_cast<unsigned>(total4 / 256 + 1 < 65536 ? total4 / 256 + 1 : 65536);
  dropout_mask_kernel<<<blocks, 256, 0, static_cast<cudaStream_t>(p.stream)>>>(p, total4);
  check_launch("dropout_mask_kernel");
}

}  // namespace orchard::cuda

namespace orchard::detail {
const BackendOps* cuda_backend() { return &orchard::cuda::kOps; }
}  // namespace orchard::detail
