// orchard._C: the nanobind extension. It binds include/orchard/attention.h and
// nothing else, and links no PyTorch: every tensor crosses as a DLPack array
// (nb::ndarray, zero-copy, any framework), every stream as an integer.
//
// Tensors arrive in logical BSHD order; the Python layer hands BHSD tensors
// over as permuted views, which are still read in place (only strides differ).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "orchard/attention.h"
#include "orchard/errors.h"
#include "orchard/tensor_view.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

// Inputs may be read-only (e.g. NumPy arrays with writeable=False); outputs
// are checked for writability by DLPack/buffer import itself.
using InArray = nb::ndarray<nb::ro>;
using OutArray = nb::ndarray<>;

// DLPack device type codes (dlpack.h: DLDeviceType).
constexpr int kDLCPU = 1;
constexpr int kDLCUDA = 2;
constexpr int kDLCUDAHost = 3;
constexpr int kDLCUDAManaged = 13;

[[noreturn]] void invalid(const std::string& op, const std::string& msg) {
  throw orchard::Error(orchard::ErrorKind::kInvalidArgument, op + ": " + msg);
}

orchard::DType to_dtype(nb::dlpack::dtype t, const std::string& op, const char* name) {
  using Code = nb::dlpack::dtype_code;
  if (t.lanes == 1) {
    const auto code = static_cast<Code>(t.code);
    if (code == Code::Float && t.bits == 16) return orchard::DType::kFloat16;
    if (code == Code::Float && t.bits == 32) return orchard::DType::kFloat32;
    if (code == Code::Float && t.bits == 64) return orchard::DType::kFloat64;
    if (code == Code::Bfloat && t.bits == 16) return orchard::DType::kBFloat16;
    // bool is stored as one byte per element; treat it as a uint8 mask.
    if ((code == Code::UInt || code == Code::Bool) && t.bits == 8) return orchard::DType::kUInt8;
    if (code == Code::Int && t.bits == 32) return orchard::DType::kInt32;  // cu_seqlens
  }
  invalid(op, std::string(name) + ": unsupported dtype (DLPack code " + std::to_string(t.code) +
                  ", bits " + std::to_string(t.bits) + ", lanes " + std::to_string(t.lanes) +
                  "); expected float16, bfloat16, float32, float64 (bool/uint8 masks, int32 cu_seqlens)");
}

orchard::Device to_device(int type, int id, const std::string& op, const char* name) {
  orchard::Device d;
  d.index = id;
  switch (type) {
    case kDLCPU: d.type = orchard::DeviceType::kCPU; d.index = 0; break;
    case kDLCUDA: d.type = orchard::DeviceType::kCUDA; break;
    case kDLCUDAHost: d.type = orchard::DeviceType::kCUDAHost; break;
    case kDLCUDAManaged: d.type = orchard::DeviceType::kCUDAManaged; break;
    default:
      invalid(op, std::string(name) + ": unsupported DLPack device type " + std::to_string(type) +
                      " (orchard runs on CPU and CUDA memory)");
  }
  return d;
}

template <typename Array>
orchard::TensorView to_view(const Array& a, const std::string& op, const char* name) {
  orchard::TensorView v;
  const std::size_t nd = a.ndim();
  if (nd > static_cast<std::size_t>(orchard::kMaxRank)) {
    invalid(op, std::string(name) + ": expected at most " + std::to_string(orchard::kMaxRank) +
                    " dimensions, got " + std::to_string(nd));
  }
  // data() already includes the DLPack byte_offset.
  v.data = const_cast<void*>(static_cast<const void*>(a.data()));
  v.dtype = to_dtype(a.dtype(), op, name);
  v.device = to_device(a.device_type(), a.device_id(), op, name);
  v.ndim = static_cast<int>(nd);
  for (std::size_t i = 0; i < nd; ++i) {
    v.shape[i] = static_cast<std::int64_t>(a.shape(i));
    v.strides[i] = a.stride(i);  // elements (nanobind fills them in for compact arrays)
  }
  return v;
}

template <typename Array>
orchard::TensorView to_view(const std::optional<Array>& a, const std::string& op, const char* name) {
  if (!a.has_value() || !a->is_valid()) return orchard::TensorView{};  // ndim = -1: undefined
  return to_view(*a, op, name);
}

// The optional run-time dropout key: a contiguous 64-bit integer array of 2
// elements (seed, offset) on q's device, read by the kernels when they run.
const std::uint64_t* rng_state_pointer(const std::optional<InArray>& r, const InArray& q, const std::string& op) {
  if (!r.has_value() || !r->is_valid()) return nullptr;
  const nb::dlpack::dtype t = r->dtype();
  using Code = nb::dlpack::dtype_code;
  const bool int64 = t.lanes == 1 && t.bits == 64 &&
                     (static_cast<Code>(t.code) == Code::Int || static_cast<Code>(t.code) == Code::UInt);
  if (!int64 || r->ndim() != 1 || r->shape(0) != 2 || r->stride(0) != 1)
    invalid(op, "rng_state must be a contiguous int64 tensor of 2 elements (seed, offset), got " +
                    std::to_string(r->ndim()) + "-D with " + std::to_string(r->ndim() ? r->shape(0) : 0) +
                    " element(s) of DLPack code " + std::to_string(t.code) + ", bits " + std::to_string(t.bits));
  const bool cpu = r->device_type() == kDLCPU && q.device_type() == kDLCPU;
  if (r->device_type() != q.device_type() || (!cpu && r->device_id() != q.device_id()))
    invalid(op, "rng_state must be on q's device (DLPack device " + std::to_string(q.device_type()) + ":" +
                    std::to_string(q.device_id()) + "), got " + std::to_string(r->device_type()) + ":" +
                    std::to_string(r->device_id()));
  return static_cast<const std::uint64_t*>(r->data());
}

// The feature arguments every entry point shares (all optional), as one Python
// tuple: (window_left, window_right, softcap, alibi_slopes, sink, attn_bias,
// cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_row_offset,
// dropout_col_offset, dropout_head_offset, dropout_heads).
using Features = std::tuple<std::int64_t, std::int64_t, double, std::optional<InArray>, std::optional<InArray>,
                            std::optional<InArray>, std::optional<InArray>, std::optional<InArray>, std::int64_t,
                            std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t>;

orchard::AttentionExtras make_extras(const std::optional<Features>& f, orchard::AttentionOptions& o) {
  orchard::AttentionExtras x;
  if (!f) return x;
  const std::string& op = o.op_name;
  const auto& [left, right, softcap, alibi, sink, bias, cu_q, cu_k, max_q, max_k, drop_row, drop_col, drop_head,
               drop_heads] = *f;
  o.window_left = left;
  o.window_right = right;
  o.softcap = softcap;
  x.alibi_slopes = to_view(alibi, op, "alibi_slopes");
  x.sink = to_view(sink, op, "sink");
  x.attn_bias = to_view(bias, op, "attn_mask");
  x.cu_seqlens_q = to_view(cu_q, op, "cu_seqlens_q");
  x.cu_seqlens_k = to_view(cu_k, op, "cu_seqlens_k");
  x.max_seqlen_q = max_q;
  x.max_seqlen_k = max_k;
  o.dropout_row_offset = drop_row;
  o.dropout_col_offset = drop_col;
  o.dropout_head_offset = drop_head;
  o.dropout_heads = drop_heads;
  return x;
}

orchard::AttentionOptions make_options(std::optional<double> softmax_scale, bool causal,
                                       bool causal_top_left, double dropout_p, std::uint64_t seed,
                                       std::uint64_t offset, const std::uint64_t* rng_state,
                                       bool deterministic, std::uintptr_t stream, const std::string& op_name) {
  orchard::AttentionOptions o;
  o.softmax_scale = softmax_scale;
  o.causal = causal;
  o.causal_align = causal_top_left ? orchard::CausalAlign::kTopLeft : orchard::CausalAlign::kBottomRight;
  o.dropout_p = dropout_p;
  o.seed = seed;
  o.offset = offset;
  o.rng_state = rng_state;
  o.deterministic = deterministic;
  o.stream = reinterpret_cast<void*>(stream);
  o.op_name = op_name;
  return o;
}

void forward(const InArray& q, const InArray& k, const InArray& v, const OutArray& out,
             const OutArray& lse, const std::optional<OutArray>& dropout_mask,
             std::optional<double> softmax_scale, bool causal, bool causal_top_left, double dropout_p,
             std::uint64_t seed, std::uint64_t offset, std::uintptr_t stream,
             const std::string& op_name, const std::optional<InArray>& rng_state,
             const std::optional<Features>& features) {
  orchard::ForwardArgs args;
  args.q = to_view(q, op_name, "q");
  args.k = to_view(k, op_name, "k");
  args.v = to_view(v, op_name, "v");
  args.out = to_view(out, op_name, "out");
  args.lse = to_view(lse, op_name, "lse");
  args.dropout_mask = to_view(dropout_mask, op_name, "dropout_mask");
  args.options = make_options(softmax_scale, causal, causal_top_left, dropout_p, seed, offset,
                              rng_state_pointer(rng_state, q, op_name), /*deterministic=*/false, stream,
                              op_name);
  args.extras = make_extras(features, args.options);
  nb::gil_scoped_release release;
  orchard::attention_forward(args);
}

orchard::BackwardArgs make_backward_args(
    const InArray& q, const InArray& k, const InArray& v, const InArray& out, const InArray& dout,
    const InArray& lse, const std::optional<OutArray>& dq, const OutArray& dk, const OutArray& dv,
    const std::optional<OutArray>& workspace, std::optional<double> softmax_scale, bool causal,
    bool causal_top_left, double dropout_p, std::uint64_t seed, std::uint64_t offset,
    bool deterministic, std::uintptr_t stream, const std::string& op_name,
    const std::optional<InArray>& rng_state, const std::optional<Features>& features,
    const std::optional<OutArray>& dsink, const std::optional<OutArray>& dq_accum) {
  orchard::BackwardArgs args;
  args.q = to_view(q, op_name, "q");
  args.k = to_view(k, op_name, "k");
  args.v = to_view(v, op_name, "v");
  args.out = to_view(out, op_name, "out");
  args.dout = to_view(dout, op_name, "dout");
  args.lse = to_view(lse, op_name, "lse");
  args.dq = to_view(dq, op_name, "dq");
  args.dk = to_view(dk, op_name, "dk");
  args.dv = to_view(dv, op_name, "dv");
  args.workspace = to_view(workspace, op_name, "workspace");
  args.options = make_options(softmax_scale, causal, causal_top_left, dropout_p, seed, offset,
                              rng_state_pointer(rng_state, q, op_name), deterministic, stream, op_name);
  args.extras = make_extras(features, args.options);
  args.dsink = to_view(dsink, op_name, "dsink");
  args.dq_accum = to_view(dq_accum, op_name, "dq_accum");
  return args;
}

void backward(const InArray& q, const InArray& k, const InArray& v, const InArray& out,
              const InArray& dout, const InArray& lse, const std::optional<OutArray>& dq, const OutArray& dk,
              const OutArray& dv, const std::optional<OutArray>& workspace,
              std::optional<double> softmax_scale, bool causal, bool causal_top_left,
              double dropout_p, std::uint64_t seed, std::uint64_t offset, bool deterministic,
              std::uintptr_t stream, const std::string& op_name, const std::optional<InArray>& rng_state,
              const std::optional<Features>& features, const std::optional<OutArray>& dsink,
              const std::optional<OutArray>& dq_accum) {
  const orchard::BackwardArgs args =
      make_backward_args(q, k, v, out, dout, lse, dq, dk, dv, workspace, softmax_scale, causal,
                         causal_top_left, dropout_p, seed, offset, deterministic, stream, op_name, rng_state,
                         features, dsink, dq_accum);
  nb::gil_scoped_release release;
  orchard::attention_backward(args);
}

std::size_t backward_workspace_bytes(const InArray& q, const InArray& k, const InArray& v,
                                     const InArray& out, const InArray& dout, const InArray& lse,
                                     const std::optional<OutArray>& dq, const OutArray& dk, const OutArray& dv,
                                     std::optional<double> softmax_scale, bool causal,
                                     bool causal_top_left, double dropout_p, std::uint64_t seed,
                                     std::uint64_t offset, bool deterministic, std::uintptr_t stream,
                                     const std::string& op_name, const std::optional<Features>& features,
                                     const std::optional<OutArray>& dsink, const std::optional<OutArray>& dq_accum) {
  const orchard::BackwardArgs args = make_backward_args(
      q, k, v, out, dout, lse, dq, dk, dv, std::nullopt, softmax_scale, causal, causal_top_left,
      dropout_p, seed, offset, deterministic, stream, op_name, std::nullopt, features, dsink, dq_accum);
  nb::gil_scoped_release release;
  return orchard::backward_workspace_bytes(args);
}

nb::dict build_info() {
  const orchard::BuildInfo info = orchard::build_info();
  nb::dict d;
  d["version"] = info.version;
  d["cuda_compiled"] = info.cuda_compiled;
  d["cuda_archs"] = info.cuda_archs;
  d["openmp"] = info.openmp;
  d["cpu_threads"] = info.cpu_threads;
  d["cpu_kernels"] = info.cpu_kernels;
  nb::list devices;
  for (const auto& name : info.cuda_devices) devices.append(nb::str(name.c_str()));
  d["cuda_devices"] = devices;
  return d;
}

}  // namespace

void register_metal(nb::module_& m);  // python/binding/metal.cpp
void register_kvcache(nb::module_& m);  // python/binding/kvcache.cpp
void register_core_api(nb::module_& m);  // python/binding/core_api.cpp (for orchard/_C_torch.so)

NB_MODULE(_C, m) {
  m.doc() =
      "Orchard's C++ core: fused attention forward/backward over DLPack arrays (BSHD logical "
      "order, any strides). Use orchard.flash_attn_func / orchard.scaled_dot_product_attention "
      "from PyTorch; this module is the framework-neutral layer under them.";

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const orchard::Error& e) {
      switch (e.kind()) {
        case orchard::ErrorKind::kInvalidArgument: PyErr_SetString(PyExc_ValueError, e.what()); break;
        case orchard::ErrorKind::kNotImplemented:
          PyErr_SetString(PyExc_NotImplementedError, e.what());
          break;
        default: PyErr_SetString(PyExc_RuntimeError, e.what()); break;
      }
    }
  });

  m.def("forward", &forward, "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a, "dropout_mask"_a.none(),
        "softmax_scale"_a.none(), "causal"_a, "causal_top_left"_a, "dropout_p"_a, "seed"_a,
        "offset"_a, "stream"_a, "op_name"_a, "rng_state"_a.none() = nb::none(),
        "features"_a.none() = nb::none(),
        "Fused attention forward. q (b, sq, hq, d), k/v (b, sk, hkv, d) in BSHD logical order "
        "with any strides; writes out (like q), lse (b, hq, sq) float32 (float64 for float64 "
        "inputs) and, when given, the uint8 dropout keep-mask (b, hq, sq, sk). stream is a "
        "cudaStream_t as an int (0 = default stream / CPU). rng_state: optional int64[2] (seed, offset) "
        "on q's device, read when the kernels run instead of seed/offset.");
  m.def("backward", &backward, "q"_a, "k"_a, "v"_a, "out"_a, "dout"_a, "lse"_a, "dq"_a.none(), "dk"_a,
        "dv"_a, "workspace"_a.none(), "softmax_scale"_a.none(), "causal"_a, "causal_top_left"_a,
        "dropout_p"_a, "seed"_a, "offset"_a, "deterministic"_a, "stream"_a, "op_name"_a,
        "rng_state"_a.none() = nb::none(), "features"_a.none() = nb::none(), "dsink"_a.none() = nb::none(),
        "dq_accum"_a.none() = nb::none(),
        "Fused attention backward; overwrites dq, dk, dv (any strides). workspace: uint8 of "
        "backward_workspace_bytes(...) bytes on the tensors' device, or None when that is 0. "
        "dq_accum: optional caller-owned float32 (b, hq, rows16, cols8) dQ accumulator the call adds "
        "dQ / softmax_scale into (orchard/attention.h); dq may then be None.");
  m.def("backward_workspace_bytes", &backward_workspace_bytes, "q"_a, "k"_a, "v"_a, "out"_a,
        "dout"_a, "lse"_a, "dq"_a.none(), "dk"_a, "dv"_a, "softmax_scale"_a.none(), "causal"_a,
        "causal_top_left"_a, "dropout_p"_a, "seed"_a, "offset"_a, "deterministic"_a, "stream"_a,
        "op_name"_a, "features"_a.none() = nb::none(), "dsink"_a.none() = nb::none(),
        "dq_accum"_a.none() = nb::none(),
        "Bytes of scratch backward() needs for these arguments.");
  register_metal(m);
  register_kvcache(m);
  register_core_api(m);
  m.def("build_info", &build_info,
        "Build facts: version, cuda_compiled, cuda_archs, openmp, cpu_threads, cpu_kernels, cuda_devices.");
}
