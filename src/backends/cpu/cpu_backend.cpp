// The CPU dispatch table: kernels in forward.cpp / backward.cpp, staging via
// strided_copy.cpp, plain 64-byte-aligned host memory.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>

#include "backends/cpu/cpu_features.h"
#include "backends/cpu/few_rows_forward.h"
#include "backends/cpu/fp16_rows.h"
#include "backends/cpu/gemm.h"
#include "backends/cpu/gemm_bf16.h"
#include "backends/cpu/kernel_common.h"
#include "backends/cpu/kernels.h"
#include "backends/cpu/strided_copy.h"
#include "backends/cpu/task_pool.h"
#include "core/backend.h"
#include "orchard/errors.h"

namespace orchard::detail {
namespace {

// The CPU kernels handle any head dim (they pad d to a multiple of 16); the
// limit only bounds per-thread scratch (~3 MB at d = 4096).
constexpr int kCpuMaxHeadDim = 4096;

std::string check_support(const FwdParams& p) {
  if (p.dtype == DType::kUInt8) return "uint8 is not an attention dtype";
  if (p.d < 1 || p.d > kCpuMaxHeadDim)
    return "head_dim " + std::to_string(p.d) + " is outside the CPU backend's range [1, " +
           std::to_string(kCpuMaxHeadDim) + "]";
  if (p.hkv < 1 || p.hq < p.hkv || p.hq % p.hkv != 0)
    return "num_heads_q (" + std::to_string(p.hq) + ") must be a positive multiple of num_heads_kv (" +
           std::to_string(p.hkv) + ")";
  if (p.b < 0 || p.sq < 0 || p.sk < 0) return "negative size";
  if (!(p.dropout_p >= 0.0f && p.dropout_p < 1.0f)) return "dropout_p must be in [0, 1)";
  // Value head dim: 0 means "same as d" (callers that predate d_v).
  if (p.d_v < 0 || p.d_v > kCpuMaxHeadDim)
    return "value head_dim " + std::to_string(p.d_v) + " is outside the CPU backend's range [1, " +
           std::to_string(kCpuMaxHeadDim) + "]";
  if ((p.cu_seqlens_q == nullptr) != (p.cu_seqlens_k == nullptr))
    return "varlen needs both cu_seqlens_q and cu_seqlens_k";
  if (p.attn_bias && p.attn_bias_dtype != DType::kUInt8 && p.attn_bias_dtype != DType::kFloat16 &&
      p.attn_bias_dtype != DType::kBFloat16 && p.attn_bias_dtype != DType::kFloat32 &&
      p.attn_bias_dtype != DType::kFloat64)
    return std::string("attn_bias of dtype ") + dtype_name(p.attn_bias_dtype) +
           " is neither a boolean (uint8) mask nor a float bias";
  if (p.softcap < 0.0f || p.softcap_f64 < 0.0) return "softcap must be >= 0";
  return "";
}

std::string variant_name(const FwdParams& p, bool backward) {
  // bf16 inputs run their GEMMs on bf16 operands where the CPU has AVX512_BF16, on AMX
  // tiles where it has AMX too (gemm_bf16.h).
  const bool bf16 = p.dtype == DType::kBFloat16;
  const char* prec = p.dtype == DType::kFloat64                   ? "fp64"
                     : bf16 && cpu::amx_available()              ? "bf16amx"
                     : bf16 && cpu::bf16_dot_available()         ? "bf16dot"
                                                                 : "fp32";
  // Few query rows per kv head: the decode kernel (few_rows_forward.h), fp32 arithmetic.
  const bool decode_kernel = !backward && cpu::forward_takes_decode_kernel(p);
  // The forward names the tiles and operands it picks (cpu::forward_variant); the backward runs
  // kBlockM x kBlockN tiles.
  std::string name = decode_kernel ? std::string("cpu_fwd_fp32_decode_kernel")
                     : backward    ? std::string("cpu_bwd_") + prec + "_tiled_br" + std::to_string(cpu::kBlockM) +
                                      "_bc" + std::to_string(cpu::kBlockN)
                                   : "cpu_fwd_" + cpu::forward_variant(p);
  if (p.causal) name += "_causal";
  if (p.window_left >= 0 || (!p.causal && p.window_right >= 0)) name += "_window";
  if (p.softcap > 0.0f || p.softcap_f64 > 0.0) name += "_softcap";
  if (p.alibi_slopes) name += "_alibi";
  if (p.sink) name += "_sink";
  if (p.attn_bias) name += p.attn_bias_dtype == DType::kUInt8 ? "_mask" : "_bias";
  if (p.cu_seqlens_q) name += "_varlen";
  if (p.d_v > 0 && p.d_v != p.d) name += "_dv" + std::to_string(p.d_v);
  if (p.dropout_p > 0.0f) name += "_dropout";
  name += "_threads" + std::to_string(cpu::cpu_threads());
  return name;
}

std::size_t backward_workspace_bytes(const BwdParams&) { return 0; }  // host temporaries instead
std::size_t required_alignment(const FwdParams&) { return 1; }         // any alignment is read

void* allocate(std::size_t bytes, void*) {
  if (bytes == 0) bytes = 64;
  return ::operator new(bytes, std::align_val_t{64});
}
void release(void* ptr, void*) {
  if (ptr) ::operator delete(ptr, std::align_val_t{64});
}
void copy_strided(const StridedCopy& c, void*) { cpu::copy_strided(c); }
template <class E>
void fill_rows(const RowTail& t, std::int64_t begin, std::int64_t end) {
  E value;
  std::memcpy(&value, &t.pattern, sizeof(E));  // the pattern's low bytes
  E* base = static_cast<E*>(t.base);
  auto fill = [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r)
      for (std::int64_t h = 0; h < t.heads; ++h)
        for (std::int64_t c = 0; c < t.width; ++c) base[r * t.row_stride + h * t.head_stride + c * t.col_stride] = value;
  };
  fill(0, begin);                           // before the first sequence
  fill(std::max(begin, end), t.total);      // past the last one
}
void fill_row_tail(const RowTail& t, void*) {
  auto clamped = [&](const std::int32_t* at) {
    return std::min<std::int64_t>(std::max<std::int64_t>(*at, 0), t.total);
  };
  const std::int64_t begin = clamped(t.owned_begin), end = clamped(t.owned_end);
  switch (t.element_size) {
    case 2: fill_rows<std::uint16_t>(t, begin, end); break;
    case 4: fill_rows<std::uint32_t>(t, begin, end); break;
    case 8: fill_rows<std::uint64_t>(t, begin, end); break;
    default: throw Error(ErrorKind::kRuntime, "fill_row_tail: unsupported element size " + std::to_string(t.element_size));
  }
}
bool synchronize(void*) { return true; }  // CPU work is synchronous

constexpr BackendOps kCpuOps{
    "cpu",
    &check_support,
    &variant_name,
    &cpu::forward,
    &cpu::backward,
    &backward_workspace_bytes,
    &required_alignment,
    &allocate,
    &release,
    &copy_strided,
    &fill_row_tail,
    &synchronize,
    &cpu::region_trace_begin,
    &cpu::region_trace_end,
};

}  // namespace

const BackendOps& cpu_backend() { return kCpuOps; }

std::string cpu_kernel_features() {
  std::string s;
  const auto add = [&s](bool on, const char* name) {
    if (!on) return;
    if (!s.empty()) s += ' ';  // (appending, not `" " + name`: g++ 12 -Wrestrict false positive)
    s += name;
  };
  add(cpu::cpu_has_avx2_fma(), "avx2-fma");
  add(cpu::cpu_has_avx512(), "avx512");
  add(cpu::bf16_dot_available(), "avx512-bf16");
  add(cpu::amx_available(), "amx");
  add(cpu::fp16_rows_use_f16c(), "f16c");
  return s.empty() ? "generic" : s;
}

}  // namespace orchard::detail
