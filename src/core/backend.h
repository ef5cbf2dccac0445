// The dispatch table a backend fills in. The core (bridge, validation,
// logging) talks to backends only through this, and kernels see only the
// params structs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include "orchard/params.h"

namespace orchard::detail {

// A rank-4 strided copy between two buffers of the same dtype on the
// backend's device (used for staging).
struct StridedCopy {
  const void* src = nullptr;
  void* dst = nullptr;
  std::size_t element_size = 0;
  std::int64_t shape[4] = {1, 1, 1, 1};
  std::int64_t src_strides[4] = {0, 0, 0, 0};  // elements
  std::int64_t dst_strides[4] = {0, 0, 0, 0};  // elements
};

// The rows of a (total, heads, width) view outside [*owned_begin, *owned_end) set to one value:
// varlen's packed rows no sequence owns, before cu_seqlens[0] and from cu_seqlens[b] on, which
// no kernel writes (out, dq, dk, dv get 0, lse -inf). The bounds (cu_seqlens and
// cu_seqlens + b) are read in the backend's memory, so a GPU needs no host round trip; both are
// clamped to [0, total].
struct RowTail {
  void* base = nullptr;
  std::size_t element_size = 0;  // 2, 4 or 8
  std::uint64_t pattern = 0;     // one element's bits (little-endian low bytes)
  std::int64_t row_stride = 0, head_stride = 0, col_stride = 0;  // elements
  std::int64_t heads = 0, width = 0;
  const std::int32_t* owned_begin = nullptr;
  const std::int32_t* owned_end = nullptr;
  std::int64_t total = 0;
};

struct BackendOps {
  const char* name;  // "cpu", "cuda"
  // Empty string when the backend can run these params, else why not
  // (the core prefixes it with the op name and raises).
  std::string (*check_support)(const FwdParams& params);
  // Name of the kernel variant these params select, for the debug log.
  std::string (*variant_name)(const FwdParams& params, bool backward);
  void (*forward)(const FwdParams& params);
  void (*backward)(const BwdParams& params);
  // (BwdParams: dq_accum set = the caller's fp32 dQ accumulator, none needed here.)
  std::size_t (*backward_workspace_bytes)(const BwdParams& params);
  // Base-pointer alignment (bytes) and stride multiple (elements) the kernels
  // need for zero-copy reads; anything else is staged.
  std::size_t (*required_alignment)(const FwdParams& params);
  // Staging support, stream-ordered on the params' stream.
  void* (*allocate)(std::size_t bytes, void* stream);
  void (*release)(void* ptr, void* stream);
  void (*copy_strided)(const StridedCopy& copy, void* stream);
  void (*fill_row_tail)(const RowTail& tail, void* stream);
  // Blocks until work queued on `stream` is done (for timing in the debug
  // log); returns false if it cannot (e.g. during CUDA-graph capture).
  bool (*synchronize)(void* stream);
  // Optional (nullptr: none). With the debug log on, called around each kernel call on the calling
  // thread: the CPU backend records its parallel regions and returns them as extra log fields.
  void (*trace_begin)();
  std::string (*trace_end)();
};

// A backend's region trace (trace_begin / trace_end) around one kernel call of the debug log;
// closed by finish() or, when the call throws, by the destructor, so that no later call records
// into it. A null backend, or one without a trace, does nothing.
class RegionTraceScope {
 public:
  explicit RegionTraceScope(const BackendOps* be) : be_(be && be->trace_begin ? be : nullptr) {
    if (be_) be_->trace_begin();
  }
  ~RegionTraceScope() {
    if (be_) be_->trace_end();
  }
  RegionTraceScope(const RegionTraceScope&) = delete;
  RegionTraceScope& operator=(const RegionTraceScope&) = delete;
  // The trace's log fields ("" without one).
  std::string finish() {
    const BackendOps* be = std::exchange(be_, nullptr);
    return be ? be->trace_end() : std::string();
  }

 private:
  const BackendOps* be_;
};

// Always available.
const BackendOps& cpu_backend();
// The instruction sets the CPU kernels use here (BuildInfo::cpu_kernels).
std::string cpu_kernel_features();
// nullptr when this build has no CUDA backend.
const BackendOps* cuda_backend();

}  // namespace orchard::detail
