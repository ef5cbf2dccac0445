#include "core/bridge.h"

#include <cstdint>
#include <utility>

#include "core/logging.h"
#include "core/validation.h"

namespace orchard::detail {

bool is_contiguous(const TensorView& view) {
  std::int64_t expected = 1;
  for (int i = view.ndim - 1; i >= 0; --i) {
    if (view.shape[i] > 1 && view.strides[i] != expected) return false;
    expected *= view.shape[i];
  }
  return true;
}

std::string zero_copy_blocker(const TensorView& view, std::size_t alignment, bool contiguous) {
  if (view.numel() == 0) return {};
  if (contiguous && !is_contiguous(view)) return "not contiguous";
  const int last = view.ndim - 1;
  if (view.shape[last] > 1 && view.strides[last] != 1)
    return "last-dim stride " + std::to_string(view.strides[last]) + " != 1";
  for (int i = 0; i < view.ndim; ++i)
    if (view.shape[i] > 1 && view.strides[i] < 0) return "negative stride in dim " + std::to_string(i);
  const auto es = dtype_size(view.dtype);
  if (reinterpret_cast<std::uintptr_t>(view.data) % alignment != 0)
    return "base address not " + std::to_string(alignment) + "-byte aligned";
  for (int i = 0; i < last; ++i)
    if (view.shape[i] > 1 && (static_cast<std::size_t>(view.strides[i]) * es) % alignment != 0)
      return "stride of dim " + std::to_string(i) + " (" + std::to_string(view.strides[i]) + " elements) not a multiple of " +
             std::to_string(alignment) + " bytes";
  return {};
}

StridedCopy make_strided_copy(const TensorView& src, const TensorView& dst) {
  StridedCopy c;
  c.src = src.data;
  c.dst = dst.data;
  c.element_size = dtype_size(src.dtype);
  // Right-align into rank 4.
  const int pad = 4 - src.ndim;
  for (int i = 0; i < src.ndim; ++i) {
    c.shape[pad + i] = src.shape[i];
    c.src_strides[pad + i] = src.strides[i];
    c.dst_strides[pad + i] = dst.strides[i];
  }
  return c;
}

StagingSession::StagingSession(const BackendOps& backend, void* stream, std::string op, const char* direction)
    : backend_(backend),
      stream_(stream),
      op_(std::move(op)),
      direction_(direction),
      profile_on_(tensor_profile_enabled()) {}

StagingSession::~StagingSession() {
  for (void* p : buffers_) backend_.release(p, stream_);
}

void StagingSession::profile(const char* name, const TensorView& view, const std::string& decision) const {
  if (!profile_on_) return;
  tensor_profile_line(op_ + " " + direction_ + " " + name + ": " + view.describe() + " -> " + decision);
}

TensorView StagingSession::stage(const char* name, const TensorView& view, bool copy_in, bool copy_back,
                                 const std::string& why) {
  TensorView staged = view;
  std::int64_t stride = 1;
  for (int i = view.ndim - 1; i >= 0; --i) {
    staged.strides[i] = stride;
    stride *= view.shape[i];
  }
  const std::size_t bytes = static_cast<std::size_t>(view.numel()) * dtype_size(view.dtype);
  staged.data = backend_.allocate(bytes, stream_);
  if (staged.data == nullptr) fail(ErrorKind::kRuntime, op_, std::string("could not allocate staging buffer for ") + name);
  buffers_.push_back(staged.data);
  if (copy_in) backend_.copy_strided(make_strided_copy(view, staged), stream_);
  staged_.push_back({view, staged, copy_back});
  ++staged_count_;
  profile(name, view, "staged (" + why + ")");
  return staged;
}

TensorView StagingSession::input(const char* name, const TensorView& view, std::size_t alignment) {
  const std::string why = zero_copy_blocker(view, alignment);
  if (why.empty()) {
    profile(name, view, "zero-copy");
    return view;
  }
  return stage(name, view, /*copy_in=*/true, /*copy_back=*/false, why);
}

TensorView StagingSession::output(const char* name, const TensorView& view, std::size_t alignment,
                                  bool contiguous) {
  const std::string why = zero_copy_blocker(view, alignment, contiguous);
  if (why.empty()) {
    profile(name, view, "zero-copy");
    return view;
  }
  return stage(name, view, /*copy_in=*/false, /*copy_back=*/true, why);
}

void StagingSession::finish() {
  for (const Staged& s : staged_)
    if (s.copy_back) backend_.copy_strided(make_strided_copy(s.staged, s.caller), stream_);
}

}  // namespace orchard::detail
