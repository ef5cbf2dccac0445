// orchard._C.kvcache_forward: binds include/orchard/kvcache.h (the decode /
// KV-cache entry point). Tensors cross as DLPack arrays; the caches are written in
// place (new k/v appended), so they are taken writable.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <cstdint>
#include <optional>
#include <string>

#include "orchard/errors.h"
#include "orchard/kvcache.h"
#include "orchard/tensor_view.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using InArray = nb::ndarray<nb::ro>;
using OutArray = nb::ndarray<>;

[[noreturn]] void invalid(const std::string& op, const std::string& msg) {
  throw orchard::Error(orchard::ErrorKind::kInvalidArgument, op + ": " + msg);
}

orchard::DType dtype_of(nb::dlpack::dtype t, const std::string& op, const char* name) {
  using Code = nb::dlpack::dtype_code;
  const auto code = static_cast<Code>(t.code);
  if (t.lanes == 1) {
    if (code == Code::Float && t.bits == 16) return orchard::DType::kFloat16;
    if (code == Code::Float && t.bits == 32) return orchard::DType::kFloat32;
    if (code == Code::Float && t.bits == 64) return orchard::DType::kFloat64;
    if (code == Code::Bfloat && t.bits == 16) return orchard::DType::kBFloat16;
    if (code == Code::Int && t.bits == 32) return orchard::DType::kInt32;
    if ((code == Code::UInt || code == Code::Bool) && t.bits == 8) return orchard::DType::kUInt8;
  }
  std::string what = code == Code::Int ? "int" : code == Code::UInt ? "uint" : "code " + std::to_string(t.code) + " ";
  invalid(op, std::string(name) + ": unsupported dtype (" + what + std::to_string(t.bits) +
                  "); expected bfloat16/float16/float32 tensors and int32 index tensors");
}

orchard::Device device_of(int type, int id, const std::string& op, const char* name) {
  orchard::Device d;
  d.index = id;
  switch (type) {
    case 1: d.type = orchard::DeviceType::kCPU; d.index = 0; break;
    case 2: d.type = orchard::DeviceType::kCUDA; break;
    case 3: d.type = orchard::DeviceType::kCUDAHost; break;
    case 13: d.type = orchard::DeviceType::kCUDAManaged; break;
    default: invalid(op, std::string(name) + ": unsupported DLPack device type " + std::to_string(type));
  }
  return d;
}

template <typename Array>
orchard::TensorView view(const std::optional<Array>& opt, const std::string& op, const char* name) {
  if (!opt.has_value() || !opt->is_valid()) return orchard::TensorView{};
  const Array& a = *opt;
  orchard::TensorView v;
  if (a.ndim() > static_cast<std::size_t>(orchard::kMaxRank))
    invalid(op, std::string(name) + ": expected at most 4 dimensions, got " + std::to_string(a.ndim()));
  v.data = const_cast<void*>(static_cast<const void*>(a.data()));
  v.dtype = dtype_of(a.dtype(), op, name);
  v.device = device_of(a.device_type(), a.device_id(), op, name);
  v.ndim = static_cast<int>(a.ndim());
  for (int i = 0; i < v.ndim; ++i) {
    v.shape[i] = static_cast<std::int64_t>(a.shape(i));
    v.strides[i] = a.stride(i);
  }
  return v;
}

template <typename Array>
orchard::TensorView view(const Array& a, const std::string& op, const char* name) {
  return view(std::optional<Array>(a), op, name);
}

// Runs the decode; `alloc_workspace(nbytes)` is called (with the GIL held) when the
// chosen split count needs scratch, and must return a uint8 array of that many bytes
// on q's device, 16-byte aligned.
nb::tuple kvcache_forward(const InArray& q, const OutArray& k_cache, const OutArray& v_cache,
                          const std::optional<InArray>& k, const std::optional<InArray>& v,
                          const std::optional<InArray>& rotary_cos, const std::optional<InArray>& rotary_sin,
                          const std::optional<InArray>& cache_seqlens, const std::optional<InArray>& cache_batch_idx,
                          const std::optional<InArray>& cache_leftpad, const std::optional<InArray>& block_table,
                          const std::optional<InArray>& alibi_slopes, const OutArray& out,
                          const std::optional<OutArray>& lse, std::optional<double> softmax_scale, bool causal,
                          std::int64_t window_left, std::int64_t window_right, double softcap,
                          bool rotary_interleaved, int num_splits, bool check_device_indices,
                          std::uintptr_t stream, const nb::object& alloc_workspace, const std::string& op) {
  orchard::DecodeArgs a;
  a.q = view(q, op, "q");
  a.k_cache = view(k_cache, op, "k_cache");
  a.v_cache = view(v_cache, op, "v_cache");
  a.k = view(k, op, "k");
  a.v = view(v, op, "v");
  a.rotary_cos = view(rotary_cos, op, "rotary_cos");
  a.rotary_sin = view(rotary_sin, op, "rotary_sin");
  a.cache_seqlens = view(cache_seqlens, op, "cache_seqlens");
  a.cache_batch_idx = view(cache_batch_idx, op, "cache_batch_idx");
  a.cache_leftpad = view(cache_leftpad, op, "cache_leftpad");
  a.block_table = view(block_table, op, "block_table");
  a.alibi_slopes = view(alibi_slopes, op, "alibi_slopes");
  a.out = view(out, op, "out");
  a.lse = view(lse, op, "lse");
  a.options.softmax_scale = softmax_scale;
  a.options.causal = causal;
  a.options.window_left = window_left;
  a.options.window_right = window_right;
  a.options.softcap = softcap;
  a.options.rotary_interleaved = rotary_interleaved;
  a.options.num_splits = num_splits;
  a.options.stream = reinterpret_cast<void*>(stream);
  a.options.check_device_indices = check_device_indices;
  a.options.op_name = op;
  orchard::DecodePlan plan;
  {
    nb::gil_scoped_release release;
    plan = orchard::kvcache_plan(a);
  }
  nb::object ws = nb::none();
  std::optional<OutArray> ws_array;
  if (plan.workspace_bytes > 0) {
    ws = alloc_workspace(plan.workspace_bytes);
    ws_array = nb::cast<OutArray>(ws);
    a.workspace = view(ws_array, op, "workspace");
    a.options.num_splits = plan.num_splits;  // the plan the workspace was sized for
  }
  {
    nb::gil_scoped_release release;
    orchard::attention_with_kvcache(a);
  }
  return nb::make_tuple(plan.num_splits, ws);  // ws keeps the scratch alive until the caller drops it
}

}  // namespace

void register_kvcache(nb::module_& m) {
  m.def("kvcache_forward", &kvcache_forward, "q"_a, "k_cache"_a, "v_cache"_a, "k"_a.none(), "v"_a.none(),
        "rotary_cos"_a.none(), "rotary_sin"_a.none(), "cache_seqlens"_a.none(), "cache_batch_idx"_a.none(),
        "cache_leftpad"_a.none(), "block_table"_a.none(), "alibi_slopes"_a.none(), "out"_a, "lse"_a.none(),
        "softmax_scale"_a.none(), "causal"_a, "window_left"_a, "window_right"_a, "softcap"_a,
        "rotary_interleaved"_a, "num_splits"_a, "check_device_indices"_a, "stream"_a, "alloc_workspace"_a, "op_name"_a,
        "KV-cache decode (flash_attn_with_kvcache): appends k/v into the caches at cache_seqlens (in place), "
        "attends q over them, writes out and (when given) lse. alloc_workspace(nbytes) -> uint8 array on q's "
        "device, called when split-KV needs scratch. check_device_indices: CUDA index tensors copied back and "
        "checked (one sync) before anything is written. Returns (num_splits used, workspace or None).");
  m.def("kvcache_num_splits_heuristic", &orchard::kvcache_num_splits_heuristic, "work_items"_a, "max_keys"_a,
        "num_sms"_a, "The split-KV heuristic used when num_splits=0.");
}
