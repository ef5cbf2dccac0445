// The CUDA backend's dispatch table: support checks, dtype x head-dim-bucket
// dispatch to the generated instantiations, staging helpers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "backends/cuda/cuda_error.h"
#include "backends/cuda/device_attribute.h"
#include "backends/cuda/launch.h"
#include "backends/cuda/score_mods.h"  // window_active (variant_name)
#include "backends/cuda/sm90/flash_bwd_sm90_launch.h"
#include "backends/cuda/sm90/flash_fwd_sm90_launch.h"
#include "backends/cuda/sm90/sm90_call_support.h"
#include "core/backend.h"
#include "core/decode_backend.h"
#include "core/forward_as_decode.h"
#include "orchard/philox.h"

namespace orchard::cuda {

void check_launch(const char* what) { check_cuda(cudaGetLastError(), what); }

void opt_in_dynamic_smem(const void* kernel, int bytes) {
  const int device = current_device();
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int> opted;  // (kernel, device) -> bytes opted in
  const auto key = std::make_pair(kernel, device);
  {
    std::lock_guard<std::mutex> lock(mutex);
    const auto it = opted.find(key);
    if (it != opted.end() && it->second >= bytes) return;
  }
  // The launchers pick configurations that fit (smem_optin_limit); one that does not would fail
  // to launch with a bare CUDA error, so it is refused here with the sizes (once per kernel and
  // size: an opted-in size passed this check, and the limit is fixed per device).
  const int limit = smem_optin_limit(device);
  if (limit > 0 && bytes > limit)
    throw Error(ErrorKind::kNotImplemented, "a CUDA kernel for this call needs " + std::to_string(bytes) +
                                                " bytes of shared memory per block; this GPU allows " +
                                                std::to_string(limit));
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) != cudaSuccess) return;
  std::lock_guard<std::mutex> lock(mutex);
  int& done = opted[key];
  done = std::max(done, bytes);
}

int resident_ctas(const void* kernel, int threads, int smem_bytes) {
  const int device = current_device();
  if (device < 0) return 0;
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, int, int>, int> known;
  const auto key = std::make_tuple(kernel, device, threads, smem_bytes);
  {
    std::lock_guard<std::mutex> lock(mutex);
    const auto it = known.find(key);
    if (it != known.end()) return it->second;
  }
  int ctas = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, kernel, threads, static_cast<std::size_t>(smem_bytes)) !=
      cudaSuccess) {
    cudaGetLastError();
    return 0;  // (not cached: a later call may tell)
  }
  std::lock_guard<std::mutex> lock(mutex);
  known[key] = ctas;
  return ctas;
}

namespace {


// The Hopper forward (sm90/flash_fwd_sm90.cuh) runs when it was compiled in (ORCHARD_CUDA_ARCHS
// holds 90), the current device is compute capability 9.0 (sm_90a code runs nowhere else),
// ORCHARD_SM90 is not "0" (read once, at the first call), and the call is one the kernels cover
// (sm90/sm90_call_support.h); the backward likewise.
#if defined(ORCHARD_WITH_SM90)
bool sm90_device() {
  const int dev = current_device();  // (-1 on failure, its error cleared: false below)
  static int cc[64] = {};  // major * 10 + minor + 1 per device, 0 = not read yet
  if (dev < 0 || dev >= 64) return false;
  if (cc[dev] == 0) {
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    cc[dev] = major * 10 + minor + 1;
  }
  return cc[dev] == 91;
}

bool sm90_enabled() {
  // Read once per process, at the first call: the switch is a launch-time setting (as
  // ORCHARD_BWD_TWO_PASS), not one to flip between calls, and getenv per call cost a scan of
  // the environment on every forward and backward.
  static const bool disabled = [] {
    const char* env = std::getenv("ORCHARD_SM90");
    return env != nullptr && std::strcmp(env, "0") == 0;
  }();
  return !disabled;
}
#endif

#if defined(ORCHARD_WITH_SM90)
// Which dropout calls the sm90 kernels take (flash_fwd_sm90.cuh, flash_bwd_sm90.cuh,
// dropout_scores.cuh): ORCHARD_SM90_DROPOUT (read once, at the first call) "1" every one they
// cover, "0" none (the sm80 kernels), unset the head-dim buckets measured faster than the sm80
// kernels (sm90_dropout_measured_faster).
int sm90_dropout_mode() {
  static const int mode = [] {
    const char* env = std::getenv("ORCHARD_SM90_DROPOUT");
    return env == nullptr ? -1 : (std::strcmp(env, "0") == 0 ? 0 : 1);
  }();
  return mode;
}
bool sm90_takes_dropout(const FwdParams& p, bool backward) {
  const int mode = sm90_dropout_mode();
  return mode == 1 || (mode == -1 && sm90_dropout_measured_faster(sm90_head_dim_bucket(p.d), backward));
}
#endif

// p: the call as the sm90 kernels see it (sm90_form).
bool sm90_fwd_applies(const FwdParams& p) {
#if defined(ORCHARD_WITH_SM90)
  if (p.dropout_p > 0.f && !(sm90_takes_dropout(p, false) && sm90_fwd_takes_dropout(p))) return false;
  return sm90_enabled() && sm90_fwd_call_supported(p) && sm90_device();
#else
  (void)p;
  return false;
#endif
}

#if defined(ORCHARD_WITH_SM90)
// Calls run(T{}, std::integral_constant<int, bucket>{}) for the call's 16-bit dtype and sm90
// head-dim bucket (sm90_head_dim_bucket): the forward's and the backward's dispatch.
template <class Params, class Run>
bool with_sm90_bucket(const Params& p, Run&& run) {
  auto in_bucket = [&](auto tag) {
    switch (sm90_head_dim_bucket(p.d)) {
      case 64: return run(tag, std::integral_constant<int, 64>{});
      case 96: return run(tag, std::integral_constant<int, 96>{});
      case 128: return run(tag, std::integral_constant<int, 128>{});
      case 192: return run(tag, std::integral_constant<int, 192>{});
      default: return run(tag, std::integral_constant<int, 256>{});
    }
  };
  return p.dtype == DType::kBFloat16 ? in_bucket(__nv_bfloat16{}) : in_bucket(__half{});
}
#endif

// The forward of a varlen call in its segment form where it pays (sm90_segment_forward_pays), or
// as ORCHARD_SM90_VARLEN_FWD says: "1" always, "0" never (an A/B switch, read once per process).
bool sm90_segment_forward(const FwdParams& call) {
  static const int forced = [] {
    const char* env = std::getenv("ORCHARD_SM90_VARLEN_FWD");
    return env == nullptr ? -1 : (std::strcmp(env, "0") == 0 ? 0 : 1);
  }();
  return forced >= 0 ? forced == 1 : sm90_segment_forward_pays(call);
}

// The forward call the sm90 kernels would run (nothing sm90 runs for a varlen call without its
// segment form, or whose forward does not pay: its unchanged params say so).
FwdParams sm90_fwd_form(const FwdParams& call) {
  return call.cu_seqlens_q != nullptr && !sm90_segment_forward(call) ? call : sm90_form(call);
}

// fp32 calls with few query rows per kv head (a decode step through flash_attn_func or the SDPA
// drop-in) run on the decode kernel (core/forward_as_decode.h): split over the keys, it fills the
// GPU where the tiled fp32 forward has one CTA per 16 rows of a head (b1 h8: 8 CTAs). The 16-bit
// tiled kernels need no such route (hf_generate_bench, H200, session 42: a bf16 decode step 2.99 ms
// vs SDPA's 3.04, fp32 9.03 vs 2.93). ORCHARD_CUDA_FEW_ROWS=0 (read per call) keeps every call tiled.
bool fp32_takes_decode_kernel(const FwdParams& p) {
  if (p.dtype != DType::kFloat32 || p.sink != nullptr) return false;  // the CUDA decode kernels have no sink
  if (!detail::forward_fits_decode_kernel(p, detail::kDecodeCudaRowsPerCta)) return false;
  // Its grid's z is the batch (at most 65535), and its shared memory must fit the device's opt-in
  // (at d > 128 it takes its 32-thread CTA where the 64-thread one does not fit: 85 KB): calls
  // past either stay on the tiled kernels.
  if (p.b > 65535) return false;
  const std::size_t smem = detail::decode_cuda_fp32_smem_bytes(p.d, static_cast<int64_t>(p.hq / p.hkv) * p.sq);
  if (smem > static_cast<std::size_t>(smem_optin_limit()))
    return false;
  if (current_device_attribute<cudaDevAttrMemoryPoolsSupported>() == 0) return false;  // its cudaMallocAsync
  // The decode kernels read K / V with 16-byte vector loads (the kvcache API's own rule).
  auto vec16 = [](const void* base, int64_t bs, int64_t rs, int64_t hs) {
    return reinterpret_cast<std::uintptr_t>(base) % 16 == 0 && (bs * 4) % 16 == 0 && (rs * 4) % 16 == 0 &&
           (hs * 4) % 16 == 0;
  };
  if (!vec16(p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride) ||
      !vec16(p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride))
    return false;
  const char* env = std::getenv("ORCHARD_CUDA_FEW_ROWS");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

void fwd_on_decode_kernel(const FwdParams& p) {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  const int splits = detail::decode_cuda_num_splits(static_cast<int64_t>(p.b) * p.hkv,
                                                    static_cast<int64_t>(p.hq / p.hkv) * p.sq, p.sk, p.d, p.dtype,
                                                    device);
  DecodeParams d = detail::forward_as_decode(p, splits);
  if (splits <= 1) return detail::decode_cuda(d);
  // The split partials: stream-ordered scratch (also legal inside a CUDA-graph capture).
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  void* workspace = nullptr;
  check_cuda(cudaMallocAsync(&workspace, decode_split_workspace_floats(splits, p.b, p.hq, p.sq, p.d) * sizeof(float),
                             stream),
             "cudaMallocAsync (decode split partials)");
  place_decode_split_partials(d, static_cast<float*>(workspace));
  try {
    detail::decode_cuda(d);
  } catch (...) {
    cudaFreeAsync(workspace, stream);
    throw;
  }
  cudaFreeAsync(workspace, stream);
}

// Runs the sm90 forward when it applies; false = the caller runs the sm80 kernels.
bool try_fwd_sm90(const FwdParams& call) {
#if defined(ORCHARD_WITH_SM90)
  const FwdParams p = sm90_fwd_form(call);
  if (!sm90_fwd_applies(p)) return false;
  return with_sm90_bucket(p, [&](auto t, auto d) { return run_flash_fwd_sm90<decltype(t), decltype(d)::value>(p); });
#else
  (void)call;
  return false;
#endif
}

// p: the call as the sm90 kernels see it (sm90_form).
bool sm90_bwd_applies(const BwdParams& p) {
#if defined(ORCHARD_WITH_SM90)
  if (p.dropout_p > 0.f && !sm90_takes_dropout(p, true)) return false;
  return sm90_enabled() && sm90_bwd_call_supported(p) && sm90_device();
#else
  (void)p;
  return false;
#endif
}

// Runs the sm90 backward when it applies; false = the caller runs the sm80 kernels.
bool try_bwd_sm90(const BwdParams& call) {
#if defined(ORCHARD_WITH_SM90)
  const BwdParams p = sm90_form(call);
  if (!sm90_bwd_applies(p)) return false;
  // A workspace sized for another form (a C++ caller's): the sm80 kernels, which fit it.
  if (bwd_workspace_layout(p, p.dq_accum == nullptr).bytes > call.workspace_bytes) return false;
  return with_sm90_bucket(p, [&](auto t, auto d) { return run_flash_bwd_sm90<decltype(t), decltype(d)::value>(p); });
#else
  (void)call;
  return false;
#endif
}

std::string check_support(const FwdParams& p) {
  switch (p.dtype) {
    case DType::kFloat16:
    case DType::kBFloat16:
    case DType::kFloat32: break;
    case DType::kFloat64: return "float64 is supported on the CPU backend only";
    default: return std::string("dtype ") + dtype_name(p.dtype) + " is not supported by the CUDA backend";
  }
  // Any head dim 1..256 (q/k and v each): rows that are not whole 16-byte vectors
  // take the kernels' element-wise path (rows_vec16, launch.h).
  if (p.d <= 0 || p.d > 256)
    return "the CUDA backend supports head_dim 1..256 (got " + std::to_string(p.d) + ")";
  const int dv = value_dim(p);
  if (dv <= 0 || dv > 256)
    return "the CUDA backend supports value head dims 1..256 (got " + std::to_string(dv) + ")";
  // Implemented: sliding window, softcap, ALiBi, varlen, attention sinks, attn_bias /
  // attn_mask (all dtypes, forward and backward; the mask not with varlen, which the
  // core refuses as well).
  if (p.attn_bias != nullptr && p.cu_seqlens_q != nullptr)
    return "attn_bias / attn_mask cannot be combined with varlen on the CUDA backend";
  // attn_bias with a sink runs in every dtype: session 7's bf16 miss (case bias-win-sink,
  // dsink 2.6e-2 vs a 2.2e-2 tolerance) was the harness's dsink rule, not the kernels
  // (tests/cuda/cuda_check.cu, run_case: the rule and the numpy model behind it).
  if ((p.cu_seqlens_q == nullptr) != (p.cu_seqlens_k == nullptr))
    return "varlen needs both cu_seqlens_q and cu_seqlens_k";
  return {};
}

std::string variant_name(const FwdParams& p, bool backward) {
  const bool sm90 =
      backward ? sm90_bwd_applies(sm90_form(static_cast<const BwdParams&>(p))) : sm90_fwd_applies(sm90_fwd_form(p));
  std::string s = backward ? (sm90 ? "cuda.bwd.sm90." : "cuda.bwd.") : (sm90 ? "cuda.fwd.sm90." : "cuda.fwd.");
  if (p.dtype == DType::kFloat32) {
    const bool tensor_cores = backward ? fp32_bwd_takes_tensor_cores(static_cast<const BwdParams&>(p))
                                       : fp32_fwd_takes_tensor_cores(p);
    s += !backward && fp32_takes_decode_kernel(p) ? "fp32_decode_kernel" : tensor_cores ? "fp32_3xtf32" : "fp32_simt";
  } else {
    s += p.dtype == DType::kBFloat16 ? "bf16" : "fp16";
    const int d = std::max(p.d, value_dim(p));
    s += ".d" + std::to_string(sm90 ? sm90_head_dim_bucket(d) : backward ? head_dim_bucket(d) : sm80_fwd_bucket(p));
    if (backward) s += static_cast<const BwdParams&>(p).deterministic ? ".deterministic" : ".atomic_dq";
  }
  if (p.causal) s += ".causal";
  if (p.dropout_p > 0.f) s += ".dropout";
  // A causal call reaches the kernels as window_right == 0 (params.h): ".window" only for a window
  // beyond causal, as the CPU backend names it.
  if (window_active(p.causal, p.window_left, p.window_right)) s += ".window";
  if (p.softcap > 0.f) s += ".softcap";
  if (p.alibi_slopes != nullptr) s += ".alibi";
  if (p.cu_seqlens_q != nullptr) s += ".varlen";
  if (value_dim(p) != p.d) s += ".dv" + std::to_string(value_dim(p));
  if (p.sink != nullptr) s += ".sink";
  if (p.attn_bias != nullptr) s += p.attn_bias_dtype == DType::kUInt8 ? ".mask" : ".bias";
  return s;
}

// (b, hq, sq, sk) uint8 keep-mask: 8 columns per thread, one Philox call per column pair at most
// (the calls hold column pairs, orchard/philox.h; a pair straddles two only with an odd column
// offset). Varlen: (sequences, hq, max sq, max sk), rows and columns local to each sequence as the
// kernels draw them; entries past a sequence's own lengths are no element and read 0 (the CPU
// backend's zero_varlen_mask_padding).
__global__ void dropout_mask_kernel(const FwdParams p, int64_t total8) {
  const uint32_t thr = dropout_keep_threshold(p.dropout_p);
  const DropoutKey key = dropout_key(p);  // reads rng_state when set
  const int64_t c8n = (p.sk + 7) / 8;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total8;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c8 = idx % c8n;
    const int64_t r = idx / c8n;  // bh * sq + row
    const uint32_t row = static_cast<uint32_t>(r % p.sq + p.dropout_row_offset);
    const uint32_t bh = static_cast<uint32_t>(r / p.sq);
    const uint32_t dbh = dropout_batch_head(p, bh / p.hq, bh % p.hq);
    // Columns [0, cols) of this row are elements (varlen: none past the sequence's rows).
    int64_t cols = p.sk;
    if (p.cu_seqlens_q != nullptr) {
      const SeqSpan span = seq_span(p, static_cast<int>(bh / p.hq));
      cols = r % p.sq < span.len_q ? span.len_k : 0;
    }
    uint8_t* out = p.dropout_mask + r * p.sk + c8 * 8;
    Philox4 call{};
    uint32_t call_col = 1u;  // the column pair (col / 2) the call holds; 1 = none yet (never even)
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64_t col = c8 * 8 + j;
      if (col >= p.sk) break;
      const uint32_t gcol = static_cast<uint32_t>(col + p.dropout_col_offset);
      if ((gcol & ~1u) != call_col) {
        call = dropout_call(key.seed, key.offset, dbh, row, gcol);
        call_col = gcol & ~1u;
      }
      out[j] = col < cols && dropout_draw(call, row, gcol) >= thr ? 1 : 0;
    }
  }
}

// The kernels read the value head dim as p.d_v (a kernel-parameter operand, not a
// select kept in a register: ptxas spilled more with value_dim(p) in the kernels);
// params.h allows 0 for "same as d", so the dispatch fills it in.
template <typename P>
P with_value_dim(const P& p) {
  P q = p;
  q.d_v = value_dim(p);
  return q;
}

void forward(const FwdParams& params) {
  const FwdParams p = with_value_dim(params);
  if (fp32_takes_decode_kernel(p)) return fwd_on_decode_kernel(p);  // (no dropout there either)
  if (try_fwd_sm90(p)) return;  // (no dropout mask to write: the sm90 path never takes one)
  switch (p.dtype) {
    case DType::kBFloat16: sm80_fwd_dispatch<__nv_bfloat16>(p); break;
    case DType::kFloat16: sm80_fwd_dispatch<__half>(p); break;
    case DType::kFloat32: run_fwd_fp32(p); break;
    default: throw Error(ErrorKind::kNotImplemented, "unsupported dtype on CUDA");
  }
  if (p.dropout_mask != nullptr) run_dropout_mask(p);
}

void backward(const BwdParams& params) {
  const BwdParams p = with_value_dim(params);
  if (try_bwd_sm90(p)) return;
  switch (p.dtype) {
    case DType::kBFloat16: sm80_bwd_dispatch<__nv_bfloat16>(p); break;
    case DType::kFloat16: sm80_bwd_dispatch<__half>(p); break;
    case DType::kFloat32:
      if (p.dq_accum != nullptr)  // the fp32 kernels write dQ per row, with no accumulator
        throw Error(ErrorKind::kNotImplemented, "dq_accum is not supported for float32 inputs on CUDA");
      run_bwd_fp32(p);
      break;
    default: throw Error(ErrorKind::kNotImplemented, "unsupported dtype on CUDA");
  }
}

std::size_t backward_workspace_bytes(const BwdParams& p) { return bwd_workspace_bytes(p); }

// Element alignment only: the kernels check 16-byte vector alignment per call
// (rows_vec16, launch.h) and read / write any other view element-wise in place,
// so the bridge stages nothing for alignment.
std::size_t required_alignment(const FwdParams& p) { return dtype_size(p.dtype); }

void* allocate(std::size_t bytes, void* stream) {
  void* ptr = nullptr;
  const cudaError_t err = cudaMallocAsync(&ptr, bytes, static_cast<cudaStream_t>(stream));
  if (err != cudaSuccess)  // the message is built only on failure (this runs on every call)
    check_cuda(err, ("cudaMallocAsync(" + std::to_string(bytes) + " bytes)").c_str());
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

template <typename E>
__global__ void fill_row_tail_kernel(const detail::RowTail t) {
  // Rows [0, begin) then [max(begin, end), total): the ones no sequence owns, as one index range.
  const int64_t begin = min(max(static_cast<int64_t>(*t.owned_begin), int64_t{0}), t.total);
  const int64_t end = max(begin, min(max(static_cast<int64_t>(*t.owned_end), int64_t{0}), t.total));
  const int64_t per_row = t.heads * t.width, n = (begin + t.total - end) * per_row;
  const E value = static_cast<E>(t.pattern);
  E* base = static_cast<E*>(t.base);
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t u = idx / per_row, r = u < begin ? u : u - begin + end;
    const int64_t h = idx % per_row / t.width, c = idx % t.width;
    base[r * t.row_stride + h * t.head_stride + c * t.col_stride] = value;
  }
}

// The grid covers every row (the bounds are on the device): with no rows to fill, each thread
// reads them and exits.
void fill_row_tail(const detail::RowTail& t, void* stream) {
  const int64_t most = t.total * t.heads * t.width;
  if (most <= 0) return;
  const unsigned blocks = static_cast<unsigned>(most / 256 + 1 < 1024 ? most / 256 + 1 : 1024);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (t.element_size) {
    case 2: fill_row_tail_kernel<uint16_t><<<blocks, 256, 0, s>>>(t); break;
    case 4: fill_row_tail_kernel<uint32_t><<<blocks, 256, 0, s>>>(t); break;
    case 8: fill_row_tail_kernel<uint64_t><<<blocks, 256, 0, s>>>(t); break;
    default:
      throw Error(ErrorKind::kRuntime, "fill_row_tail: unsupported element size " + std::to_string(t.element_size));
  }
  check_launch("fill_row_tail_kernel");
}

bool synchronize(void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(s, &status) != cudaSuccess || status != cudaStreamCaptureStatusNone) {
    cudaGetLastError();  // clear a sticky-free error from the query, if any
    return false;
  }
  check_cuda(cudaStreamSynchronize(s), "cudaStreamSynchronize");
  return true;
}

const detail::BackendOps kOps = {
    "cuda",        check_support, variant_name, forward,  backward,   backward_workspace_bytes,
    required_alignment, allocate, release,      copy_strided, fill_row_tail, synchronize,
    nullptr,       nullptr,  // no region trace: the log's elapsed_ms is the stream's time
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
  const int64_t total8 = static_cast<int64_t>(p.b) * p.hq * p.sq * ((p.sk + 7) / 8);
  if (total8 == 0) return;
  const unsigned blocks = static_cast<unsigned>(total8 / 256 + 1 < 65536 ? total8 / 256 + 1 : 65536);
  dropout_mask_kernel<<<blocks, 256, 0, static_cast<cudaStream_t>(p.stream)>>>(p, total8);
  check_launch("dropout_mask_kernel");
}

}  // namespace orchard::cuda

namespace orchard::detail {
const BackendOps* cuda_backend() { return &orchard::cuda::kOps; }
}  // namespace orchard::detail
