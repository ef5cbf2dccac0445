// Input validation for the public API. Every check runs before anything is
// written, and every failure throws orchard::Error with the op name first.
#pragma once

#include <cstdint>
#include <string>

#include "orchard/attention.h"

namespace orchard::detail {

[[noreturn]] void fail(ErrorKind kind, const std::string& op, const std::string& message);

// Runs fn() with every orchard::Error it throws prefixed by the op name (backends
// report errors without one: they serve every op), unless it already has it.
template <typename Fn>
auto with_op_prefix(const std::string& op, Fn&& fn) {
  try {
    return fn();
  } catch (const Error& e) {
    const std::string msg = e.what();
    if (msg.rfind(op + ": ", 0) == 0) throw;
    throw Error(e.kind(), op + ": " + msg);
  }
}

// The problem a validated call describes.
struct ProblemShape {
  std::int64_t b = 0, sq = 0, sk = 0, hq = 0, hkv = 0, d = 0;
  std::int64_t d_v = 0;  // value / output head dim
  // Varlen: q/k/v are (total, heads, dim), b sequences, sq/sk the max lengths.
  bool varlen = false;
  std::int64_t total_q = 0, total_k = 0;
  DType dtype = DType::kFloat32;
  Device device{};  // the device the kernels run on (q's)
};

ProblemShape validate_forward(const ForwardArgs& args);
// Checks everything but the workspace size (which needs the backend).
ProblemShape validate_backward(const BackwardArgs& args);

// CPU-side memory kinds (host, pinned host) run on the CPU backend; device-side
// kinds (device, managed) on CUDA.
bool runs_on_cuda(DeviceType type);

// True if two distinct indices of the view can address the same element (zero strides, or
// strides too small for the dims inside them): not a view a kernel may write.
bool self_overlapping(const TensorView& v);

// The element type the LSE tensor must have for inputs of `dtype`.
DType lse_dtype_for(DType dtype);

}  // namespace orchard::detail
