// Orchard's public C++ API: fused attention forward and backward over
// framework-owned, strided memory (destination passing: the caller allocates
// every output and workspace).
//
// Tensors are logical (batch, seq, heads, head_dim) — BSHD — with any element
// strides; a BHSD tensor is passed as its BSHD-permuted view (swap the stride
// entries), which is still read in place.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "orchard/errors.h"
#include "orchard/params.h"
#include "orchard/tensor_view.h"

namespace orchard {

inline constexpr int kMaxHeadDim = 256;

// Which diagonal a causal mask follows when sq != sk.
enum class CausalAlign {
  kBottomRight,  // flash-attn >= 2.1: row i sees columns j <= i + (sk - sq)
  kTopLeft,      // torch SDPA is_causal: row i sees columns j <= i
};

struct AttentionOptions {
  std::optional<double> softmax_scale;  // default 1/sqrt(head_dim)
  bool causal = false;
  CausalAlign causal_align = CausalAlign::kBottomRight;
  double dropout_p = 0.0;  // in [0, 1)
  std::uint64_t seed = 0;
  std::uint64_t offset = 0;
  // Optional: 2 x uint64 (seed, offset) in the memory of the tensors' device (a
  // CUDA pointer for CUDA tensors, 8-byte aligned), read when the kernels run
  // instead of seed/offset above. Lets a framework draw the seed on the device,
  // so CUDA-graph replays and compiled graphs get a fresh dropout mask each run.
  const std::uint64_t* rng_state = nullptr;
  bool deterministic = false;   // backward only
  void* stream = nullptr;       // cudaStream_t for CUDA tensors (nullptr: default stream)
  std::string op_name = "orchard.flash_attn";  // prefixes every error message
};

struct ForwardArgs {
  TensorView q, k, v;      // (b, sq, hq, d), (b, sk, hkv, d), (b, sk, hkv, d)
  TensorView out;          // (b, sq, hq, d), dtype of q
  TensorView lse;          // (b, hq, sq) float32 (float64 for float64 inputs)
  TensorView dropout_mask; // optional (b, hq, sq, sk) uint8, written when defined
  AttentionOptions options;
};

struct BackwardArgs {
  TensorView q, k, v, out, dout;  // dout shaped like out
  TensorView lse;                 // from the forward
  TensorView dq, dk, dv;          // shaped like q, k, v; any strides
  TensorView workspace;           // uint8[backward_workspace_bytes(...)] on the device, or undefined if 0
  AttentionOptions options;
};

// Runs the forward pass; throws orchard::Error on invalid input, having
// written nothing.
void attention_forward(const ForwardArgs& args);

// Runs the backward pass (dq, dk, dv overwritten).
void attention_backward(const BackwardArgs& args);

// Bytes of workspace attention_backward needs for these arguments (only the
// shapes, dtypes and devices are read; workspace itself may be undefined).
std::size_t backward_workspace_bytes(const BackwardArgs& args);

// Build and runtime facts, for `python -m orchard doctor`.
struct BuildInfo {
  std::string version;
  bool cuda_compiled = false;
  std::string cuda_archs;  // e.g. "80;90"
  bool openmp = false;
  int cpu_threads = 1;
  std::vector<std::string> cuda_devices;  // names of visible devices (empty if none)
};
BuildInfo build_info();

}  // namespace orchard
