// The plain parameter structs that kernels see. Nothing else crosses from the
// core into a backend: no framework types, no TensorView, no allocation.
//
// Layout convention: every tensor is addressed as logical (batch, row, head, dim)
// — BSHD — through element strides, so BSHD and BHSD storage (and any other
// view whose last-dim stride is 1) are read in place. The last dimension is
// always contiguous (stride 1); the bridge stages anything else.
#pragma once

#include <cstdint>

#include "orchard/config.h"
#include "orchard/dtype.h"

namespace orchard {

struct FwdParams {
  // Inputs, dtype `dtype`.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  // Outputs: out has dtype `dtype`; lse is (b, hq, sq) with row stride 1,
  // float32 — or float64 when dtype is kFloat64.
  void* out = nullptr;
  void* lse = nullptr;
  // Optional dropout keep-mask output, uint8 (b, hq, sq, sk) contiguous:
  // 1 = kept, 0 = dropped. nullptr = do not write it.
  std::uint8_t* dropout_mask = nullptr;

  // Element strides (batch, row, head); the dim stride is 1.
  std::int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  std::int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  std::int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  std::int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  std::int64_t lse_batch_stride = 0, lse_head_stride = 0;

  int b = 0;    // batch
  int sq = 0;   // query rows
  int sk = 0;   // key/value rows
  int hq = 0;   // query heads
  int hkv = 0;  // key/value heads; hq % hkv == 0 (GQA/MQA)
  int d = 0;    // head dim (q, k and v share it)

  float scale = 1.0f;  // softmax scale (1/sqrt(d) by default), rounded to float
  // The same scale and dropout probability unrounded, for float64 compute
  // (so float64 results, e.g. under gradcheck, carry no float32 rounding).
  double scale_f64 = 1.0;
  double dropout_p_f64 = 0.0;

  // Causal masking: row i may attend to column j iff j <= i + causal_offset.
  // Bottom-right alignment (flash-attn) uses causal_offset = sk - sq;
  // top-left (torch SDPA) uses 0.
  bool causal = false;
  std::int64_t causal_offset = 0;

  // Dropout on the attention probabilities. The keep decision for element
  // (batch, head, row, col) comes from Philox4x32-10 keyed by (seed, offset);
  // see orchard/philox.h. keep_threshold = round(p * 2^32) saturated; an
  // element is kept iff its 32-bit draw is >= keep_threshold.
  float dropout_p = 0.0f;
  std::uint64_t seed = 0;
  std::uint64_t offset = 0;
  // When set, (seed, offset) are read at run time from rng_state[0..1] instead:
  // memory of the tensors' device (a CUDA pointer for CUDA), so a seed drawn on the
  // device by the framework (e.g. torch.randint inside a CUDA graph or a compiled
  // graph) is fresh on every replay. Read through dropout_key().
  const std::uint64_t* rng_state = nullptr;

  DType dtype = DType::kFloat32;
  void* stream = nullptr;  // cudaStream_t on CUDA; unused on the CPU
};

struct BwdParams : FwdParams {
  // out / lse (from FwdParams) are inputs here.
  const void* dout = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  std::int64_t do_batch_stride = 0, do_row_stride = 0, do_head_stride = 0;
  std::int64_t dq_batch_stride = 0, dq_row_stride = 0, dq_head_stride = 0;
  std::int64_t dk_batch_stride = 0, dk_row_stride = 0, dk_head_stride = 0;
  std::int64_t dv_batch_stride = 0, dv_row_stride = 0, dv_head_stride = 0;

  // Caller-provided scratch of `workspace_bytes` bytes (the size the backend
  // asked for via backward_workspace_bytes), 256-byte aligned.
  void* workspace = nullptr;
  std::size_t workspace_bytes = 0;

  bool deterministic = false;  // bitwise-reproducible dq/dk/dv
};

// The (seed, offset) that key this call's dropout mask (orchard/philox.h). Kernels
// read it once at the start: rng_state is dereferenced on the device for CUDA.
struct DropoutKey {
  std::uint64_t seed = 0, offset = 0;
};
ORCHARD_HOST_DEVICE DropoutKey dropout_key(const FwdParams& p) {
  return p.rng_state ? DropoutKey{p.rng_state[0], p.rng_state[1]} : DropoutKey{p.seed, p.offset};
}

}  // namespace orchard
