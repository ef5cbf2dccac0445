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
  // Dropout's global coordinates (context parallelism): this call draws the block of
  // the mask of a larger call — one with dropout_heads query heads (0: this call's)
  // — at rows + dropout_row_offset, columns + dropout_col_offset and heads +
  // dropout_head_offset (FwdParams in params.h). Only the dropout index reads them;
  // all 0 is the plain mask. Offsets >= 0, head_offset + heads <= dropout_heads.
  std::int64_t dropout_row_offset = 0, dropout_col_offset = 0;
  std::int64_t dropout_head_offset = 0, dropout_heads = 0;
  // Sliding window, flash-attn's window_size = (left, right): row i sees keys j with
  // i + off - left <= j <= i + off + right (off = the causal diagonal offset of the
  // alignment above); -1 = unbounded. causal is the same as right = 0.
  std::int64_t window_left = -1;
  std::int64_t window_right = -1;
  double softcap = 0.0;         // > 0: scores become softcap * tanh(scores / softcap)
  bool deterministic = false;   // backward only
  void* stream = nullptr;       // cudaStream_t for CUDA tensors (nullptr: default stream)
  std::string op_name = "orchard.flash_attn";  // prefixes every error message
};

// Optional inputs shared by the forward and the backward (leave undefined when unused).
struct AttentionExtras {
  TensorView alibi_slopes;  // float32 (hq,) or (b, hq): bias -slope * |i + off - j|
  TensorView sink;          // float32 (hq,): per-head sink logit joining each row's softmax
  // SDPA's attn_mask: rank 4 (b, hq, sq, sk), size-1 or stride-0 dims broadcast (read in
  // place); uint8/bool (nonzero = may attend) or a float bias of q's dtype or float32.
  TensorView attn_bias;
  // Varlen: int32 (b + 1,) prefix sums of the sequence lengths. q, k, v, out (and
  // their gradients) are then (total, heads, dim) and lse is (hq, total_q). Rows before
  // cu_seqlens[0] and from cu_seqlens[b] on belong to no sequence: out, dq, dk and dv get 0
  // there, lse -inf.
  TensorView cu_seqlens_q, cu_seqlens_k;
  std::int64_t max_seqlen_q = 0, max_seqlen_k = 0;  // varlen: >= every sequence's length
};

struct ForwardArgs {
  TensorView q, k, v;      // (b, sq, hq, d), (b, sk, hkv, d), (b, sk, hkv, dv)
  TensorView out;          // (b, sq, hq, dv), dtype of q
  TensorView lse;          // (b, hq, sq) float32 (float64 for float64 inputs)
  TensorView dropout_mask; // optional (b, hq, sq, sk) uint8, written when defined
  AttentionExtras extras;
  AttentionOptions options;
};

struct BackwardArgs {
  TensorView q, k, v, out, dout;  // dout shaped like out
  TensorView lse;                 // from the forward
  TensorView dq, dk, dv;          // shaped like q, k, v; any strides
  TensorView dsink;               // optional with extras.sink: float32 (hq,), the sinks' gradient
  TensorView workspace;           // uint8[backward_workspace_bytes(...)] on the device, or undefined if 0
  // Optional, caller-owned fp32 dQ accumulator (context parallelism: the backward calls
  // over one sequence's blocks add their dQ into one buffer the caller zeroed once,
  // instead of each call allocating an fp32 workspace and returning a dQ to add up).
  // float32 (b, hq, rows, cols): rows >= sq rounded up to 16, cols = d rounded up to 8,
  // the last two dims contiguous, so a view acc[:, :, r0:] with r0 % 16 == 0 addresses
  // query rows r0.. . The call ADDS dQ / softmax_scale into it, in the backend's
  // element order inside each 16 x 8 tile (CPU: row-major; CUDA: mma.sync's C fragment
  // order, backends/cuda/launch.h); dq is then not written and may be undefined.
  // Not with varlen, deterministic or float64 (CUDA: 16-bit inputs only).
  TensorView dq_accum;
  AttentionExtras extras;         // the same as the forward's
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
  // The instruction sets the CPU kernels use on this machine, e.g. "avx2-fma avx512 avx512-bf16
  // f16c" ("amx" where the CPU has AMX tiles; "generic" when none): which paths run.
  std::string cpu_kernels;
  std::vector<std::string> cuda_devices;  // names of visible devices (empty if none)
};
BuildInfo build_info();

}  // namespace orchard
