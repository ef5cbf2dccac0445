// orchard._jax_ffi: XLA FFI handlers (CPU) that run Orchard's C++ core on the
// buffers XLA hands a custom call, for orchard.jax. Built only when jaxlib's FFI
// headers are found (python/CMakeLists.txt); links no Python API beyond the
// nanobind module that hands the handler pointers to Python as PyCapsules.
//
// Buffers are row-major (XLA's default layout), in BSHD logical order:
// q (b, sq, hq, d), k/v (b, sk, hkv, d[_v]); out (b, sq, hq, d_v), lse (b, hq, sq).
#include <nanobind/nanobind.h>

#include <cstdint>
#include <exception>
#include <string>
#include <vector>

#include "orchard/attention.h"
#include "orchard/errors.h"
#include "orchard/tensor_view.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
namespace nb = nanobind;

namespace {

constexpr const char* kOp = "orchard.jax.flash_attention";

bool to_dtype(ffi::DataType t, orchard::DType* out) {
  switch (t) {
    case ffi::DataType::F16: *out = orchard::DType::kFloat16; return true;
    case ffi::DataType::BF16: *out = orchard::DType::kBFloat16; return true;
    case ffi::DataType::F32: *out = orchard::DType::kFloat32; return true;
    case ffi::DataType::F64: *out = orchard::DType::kFloat64; return true;
    default: return false;
  }
}

// A row-major view of an XLA buffer on the host.
orchard::TensorView view(void* data, ffi::DataType t, ffi::Span<const int64_t> dims, const char* name) {
  orchard::TensorView v;
  if (!to_dtype(t, &v.dtype))
    throw orchard::Error(orchard::ErrorKind::kInvalidArgument,
                         std::string(kOp) + ": " + name + ": dtype must be float16, bfloat16, float32 or float64");
  if (dims.size() > static_cast<std::size_t>(orchard::kMaxRank))
    throw orchard::Error(orchard::ErrorKind::kInvalidArgument, std::string(kOp) + ": " + name + ": rank too high");
  v.data = data;
  v.device = orchard::Device{orchard::DeviceType::kCPU, 0};
  v.ndim = static_cast<int>(dims.size());
  std::int64_t stride = 1;
  for (int i = v.ndim - 1; i >= 0; --i) {
    v.shape[i] = dims[i];
    v.strides[i] = stride;
    stride *= dims[i];
  }
  return v;
}

orchard::TensorView in(const ffi::AnyBuffer& b, const char* name) {
  return view(b.untyped_data(), b.element_type(), b.dimensions(), name);
}
orchard::TensorView out(ffi::Result<ffi::AnyBuffer>& b, const char* name) {
  return view(b->untyped_data(), b->element_type(), b->dimensions(), name);
}

orchard::AttentionOptions options(double scale, int32_t causal, int64_t window_left, int64_t window_right,
                                  double softcap) {
  orchard::AttentionOptions o;
  if (scale > 0) o.softmax_scale = scale;
  o.causal = causal != 0;
  o.causal_align = orchard::CausalAlign::kBottomRight;
  o.window_left = window_left;
  o.window_right = window_right;
  o.softcap = softcap;
  o.op_name = kOp;
  return o;
}

ffi::Error to_ffi_error(const std::exception& e) {
  if (const auto* oe = dynamic_cast<const orchard::Error*>(&e)) {
    if (oe->kind() == orchard::ErrorKind::kInvalidArgument)
      return ffi::Error(ffi::ErrorCode::kInvalidArgument, e.what());
    if (oe->kind() == orchard::ErrorKind::kNotImplemented)
      return ffi::Error(ffi::ErrorCode::kUnimplemented, e.what());
  }
  return ffi::Error(ffi::ErrorCode::kInternal, e.what());
}

ffi::Error forward_impl(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::Result<ffi::AnyBuffer> o,
                        ffi::Result<ffi::AnyBuffer> lse, double scale, int32_t causal, int64_t window_left,
                        int64_t window_right, double softcap) {
  try {
    orchard::ForwardArgs a;
    a.q = in(q, "q");
    a.k = in(k, "k");
    a.v = in(v, "v");
    a.out = out(o, "out");
    a.lse = out(lse, "lse");
    a.options = options(scale, causal, window_left, window_right, softcap);
    orchard::attention_forward(a);
    return ffi::Error::Success();
  } catch (const std::exception& e) {
    return to_ffi_error(e);
  }
}

ffi::Error backward_impl(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer o,
                         ffi::AnyBuffer lse, ffi::AnyBuffer dout, ffi::Result<ffi::AnyBuffer> dq,
                         ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv, double scale,
                         int32_t causal, int64_t window_left, int64_t window_right, double softcap) {
  try {
    orchard::BackwardArgs g;
    g.q = in(q, "q");
    g.k = in(k, "k");
    g.v = in(v, "v");
    g.out = in(o, "out");
    g.lse = in(lse, "lse");
    g.dout = in(dout, "dout");
    g.dq = out(dq, "dq");
    g.dk = out(dk, "dk");
    g.dv = out(dv, "dv");
    g.options = options(scale, causal, window_left, window_right, softcap);
    // CPU workspace: host memory owned by this call.
    std::vector<unsigned char> workspace(orchard::backward_workspace_bytes(g));
    if (!workspace.empty())
      g.workspace = orchard::make_contiguous_view(workspace.data(), orchard::DType::kUInt8, g.q.device,
                                                  {static_cast<std::int64_t>(workspace.size())});
    orchard::attention_backward(g);
    return ffi::Error::Success();
  } catch (const std::exception& e) {
    return to_ffi_error(e);
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OrchardFlashForwardCpu, forward_impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<double>("softmax_scale")
                                  .Attr<int32_t>("causal")
                                  .Attr<int64_t>("window_left")
                                  .Attr<int64_t>("window_right")
                                  .Attr<double>("softcap"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(OrchardFlashBackwardCpu, backward_impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<double>("softmax_scale")
                                  .Attr<int32_t>("causal")
                                  .Attr<int64_t>("window_left")
                                  .Attr<int64_t>("window_right")
                                  .Attr<double>("softcap"));

NB_MODULE(_jax_ffi, m) {
  m.doc() = "XLA FFI handlers (CPU) for orchard.jax: PyCapsules for jax.ffi.register_ffi_target.";
  m.def("handlers", []() {
    nb::dict d;
    d["orchard_flash_forward"] = nb::capsule(reinterpret_cast<void*>(&OrchardFlashForwardCpu));
    d["orchard_flash_backward"] = nb::capsule(reinterpret_cast<void*>(&OrchardFlashBackwardCpu));
    return d;
  });
}
