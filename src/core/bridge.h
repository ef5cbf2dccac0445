// The bridge: the only place that looks at strides, storage and memory kind.
// It hands kernels the caller's memory whenever they can read it in place and
// otherwise makes ONE staged (contiguous, aligned) copy, logged with
// ORCHARD_TENSOR_PROFILE=1. Staged outputs are copied back into the caller's
// views (whatever their strides) by finish().
#pragma once

#include <string>
#include <vector>

#include "core/backend.h"
#include "orchard/tensor_view.h"

namespace orchard::detail {

class StagingSession {
 public:
  StagingSession(const BackendOps& backend, void* stream, std::string op, const char* direction);
  ~StagingSession();  // releases staging buffers (stream-ordered)
  StagingSession(const StagingSession&) = delete;
  StagingSession& operator=(const StagingSession&) = delete;

  // A view of `view` the kernels can read: the same memory, or a staged copy.
  // `alignment` is the byte alignment the kernel needs for the base pointer
  // and for every outer stride.
  TensorView input(const char* name, const TensorView& view, std::size_t alignment);
  // A view the kernels can write (fully overwritten); staged outputs are
  // copied back by finish().
  // `contiguous` additionally requires row-major contiguity.
  TensorView output(const char* name, const TensorView& view, std::size_t alignment, bool contiguous = false);
  // Copies staged outputs back into the caller's views.
  void finish();

  int staged_count() const { return staged_count_; }

 private:
  struct Staged {
    TensorView caller;
    TensorView staged;
    bool copy_back;
  };
  TensorView stage(const char* name, const TensorView& view, bool copy_in, bool copy_back, const std::string& why);
  void profile(const char* name, const TensorView& view, const std::string& decision) const;

  const BackendOps& backend_;
  void* stream_;
  std::string op_;
  const char* direction_;
  bool profile_on_;
  std::vector<Staged> staged_;
  std::vector<void*> buffers_;
  int staged_count_ = 0;
};

// Row-major contiguity (size-1 dims may have any stride).
bool is_contiguous(const TensorView& view);

// Why `view` cannot be used in place by a kernel that needs the last dim
// contiguous, non-negative strides and `alignment`-byte alignment; empty if it can.
std::string zero_copy_blocker(const TensorView& view, std::size_t alignment, bool contiguous = false);

// A contiguous strided copy description between two same-shaped views.
StridedCopy make_strided_copy(const TensorView& src, const TensorView& dst);

}  // namespace orchard::detail
