// orchard._jax_ffi: XLA FFI handlers that run Orchard's C++ core on the buffers
// XLA hands a custom call, for orchard.jax. One forward and one backward handler
// per platform: CPU (host buffers) and CUDA (device buffers, launched on XLA's
// stream from the FFI's PlatformStream, on the device of the FFI's DeviceOrdinal).
// Both go through orchard::attention_forward / attention_backward, the entry
// points the torch path uses; the core picks its backend from the views' device.
// Built only when jaxlib's FFI headers are found (python/CMakeLists.txt); links no
// Python API beyond the nanobind module that hands the handler pointers to Python
// as PyCapsules, and no CUDA headers: the stream crosses as an opaque pointer, as
// it does on the torch path. In a CPU-only orchard build the CUDA handlers exist
// too and fail with the core's "this build of Orchard has no CUDA backend" error.
//
// Buffers are row-major (XLA's default layout), in BSHD logical order:
// q (b, sq, hq, d), k/v (b, sk, hkv, d[_v]); out (b, sq, hq, d_v), lse (b, hq, sq);
// varlen: q / k / v / out (total, heads, dim), lse (hq, total_q).
// The optional inputs (ALiBi slopes, sink logits, the attention bias or mask,
// cu_seqlens, the dropout RNG state) are operands every call passes; an absent one is
// a buffer with no elements (orchard.jax passes jnp.zeros((0,))). So is dsink, the
// backward's fourth result, when there is no sink.
// No copies: the views point into XLA's buffers (the core stages only what a
// kernel cannot read, e.g. a head_dim whose rows are not 16-byte aligned on CUDA);
// a bias's size-1 dims broadcast in place.
#include <nanobind/nanobind.h>

#include <cstdint>
#include <cstdlib>
#include <exception>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "orchard/attention.h"
#include "orchard/errors.h"
#include "orchard/kvcache.h"
#include "orchard/tensor_view.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
namespace nb = nanobind;

namespace {

constexpr const char* kOp = "orchard.jax.flash_attention";
constexpr const char* kKvcacheOp = "orchard.jax.flash_attn_with_kvcache";
// attention_backward wants its workspace 256-byte aligned.
constexpr std::uintptr_t kWorkspaceAlign = 256;

bool to_dtype(ffi::DataType t, orchard::DType* out) {
  switch (t) {
    case ffi::DataType::F16: *out = orchard::DType::kFloat16; return true;
    case ffi::DataType::BF16: *out = orchard::DType::kBFloat16; return true;
    case ffi::DataType::F32: *out = orchard::DType::kFloat32; return true;
    case ffi::DataType::F64: *out = orchard::DType::kFloat64; return true;
    // XLA's bool (PRED) is one byte holding 0 or 1: a boolean mask read as uint8.
    case ffi::DataType::PRED: *out = orchard::DType::kUInt8; return true;
    case ffi::DataType::U8: *out = orchard::DType::kUInt8; return true;
    case ffi::DataType::S32: *out = orchard::DType::kInt32; return true;
    default: return false;
  }
}

orchard::Device host() { return orchard::Device{orchard::DeviceType::kCPU, 0}; }
orchard::Device gpu(int32_t ordinal) { return orchard::Device{orchard::DeviceType::kCUDA, ordinal}; }

// A row-major view of an XLA buffer in `device`'s memory (errors prefixed with `op`).
orchard::TensorView view(void* data, ffi::DataType t, ffi::Span<const int64_t> dims, orchard::Device device,
                         const char* name, const char* op) {
  orchard::TensorView v;
  if (!to_dtype(t, &v.dtype))
    throw orchard::Error(orchard::ErrorKind::kInvalidArgument,
                         std::string(op) + ": " + name + ": unsupported dtype (XLA type " +
                             std::to_string(static_cast<int>(t)) + ")");
  if (dims.size() > static_cast<std::size_t>(orchard::kMaxRank))
    throw orchard::Error(orchard::ErrorKind::kInvalidArgument, std::string(op) + ": " + name + ": rank too high");
  v.data = data;
  v.device = device;
  v.ndim = static_cast<int>(dims.size());
  std::int64_t stride = 1;
  for (int i = v.ndim - 1; i >= 0; --i) {
    v.shape[i] = dims[i];
    v.strides[i] = stride;
    stride *= dims[i];
  }
  return v;
}

orchard::TensorView in(const ffi::AnyBuffer& b, orchard::Device d, const char* name, const char* op = kOp) {
  return view(b.untyped_data(), b.element_type(), b.dimensions(), d, name, op);
}
orchard::TensorView out(ffi::Result<ffi::AnyBuffer>& b, orchard::Device d, const char* name, const char* op = kOp) {
  return view(b->untyped_data(), b->element_type(), b->dimensions(), d, name, op);
}
// An optional operand of the attention passes: undefined when it has no elements (absent). (A
// given one never has none there: a bias or offsets of no elements describe no work at all.)
orchard::TensorView optional_in(const ffi::AnyBuffer& b, orchard::Device d, const char* name) {
  return b.element_count() == 0 ? orchard::TensorView{} : in(b, d, name);
}

// The optional operands both passes take, in the order orchard.jax passes them.
struct Extras {
  ffi::AnyBuffer alibi, sink, bias, cu_q, cu_k, rng;
};

// The static settings of a call (the handlers' attributes).
struct Settings {
  double scale;
  int32_t causal;
  int64_t window_left, window_right;
  double softcap, dropout_p;
  int64_t max_seqlen_q, max_seqlen_k;
  int32_t deterministic;
};

// The static settings of a KV-cache call (orchard_kvcache_forward's attributes).
struct DecodeSettings {
  double scale;  // orchard.jax resolves the default
  int32_t causal;
  int64_t window_left, window_right;
  double softcap;
  int32_t rotary_interleaved;
  int32_t num_splits;
  int32_t check_device_indices;
  int32_t present;  // bit i: optional operand i (k, v, rotary_cos, rotary_sin, cache_seqlens,
                    // cache_batch_idx, cache_leftpad, block_table, alibi_slopes) was given
};

// The core's extras from the operands. The attention bias is rank 4 (b, hq, sq, sk) with
// size-1 dims where it broadcasts (orchard.jax reshapes it so); those read in place.
orchard::AttentionExtras extras_of(const Extras& x, const Settings& s, orchard::Device d) {
  orchard::AttentionExtras e;
  e.alibi_slopes = optional_in(x.alibi, d, "alibi_slopes");
  e.sink = optional_in(x.sink, d, "sink");
  e.attn_bias = optional_in(x.bias, d, "bias");
  e.cu_seqlens_q = optional_in(x.cu_q, d, "cu_seqlens_q");
  e.cu_seqlens_k = optional_in(x.cu_k, d, "cu_seqlens_k");
  e.max_seqlen_q = s.max_seqlen_q;
  e.max_seqlen_k = s.max_seqlen_k;
  return e;
}

// rng: the dropout RNG state, 2 x uint64 (seed, offset) that orchard.jax draws from the
// caller's key as 4 x uint32; read by the kernels where they run (so a jitted call draws a
// fresh mask per key, and the backward reads the forward's).
orchard::AttentionOptions options(const Settings& s, const ffi::AnyBuffer& rng, void* stream) {
  orchard::AttentionOptions o;
  o.softmax_scale = s.scale;  // orchard.jax resolves the default; any finite value is honoured
  o.causal = s.causal != 0;
  o.causal_align = orchard::CausalAlign::kBottomRight;
  o.window_left = s.window_left;
  o.window_right = s.window_right;
  o.softcap = s.softcap;
  o.dropout_p = s.dropout_p;
  if (s.dropout_p > 0.0) {
    if (rng.size_bytes() != 2 * sizeof(std::uint64_t))
      throw orchard::Error(orchard::ErrorKind::kInvalidArgument,
                           std::string(kOp) + ": dropout needs its 16-byte RNG state (orchard.jax draws it)");
    o.rng_state = static_cast<const std::uint64_t*>(rng.untyped_data());
  }
  o.deterministic = s.deterministic != 0;
  o.op_name = kOp;
  o.stream = stream;  // cudaStream_t on CUDA, nullptr on the CPU
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

// The forward on `device` (stream: XLA's cudaStream_t on CUDA, nullptr on the CPU).
ffi::Error forward_on(orchard::Device device, void* stream, ffi::AnyBuffer q, ffi::AnyBuffer k,
                      ffi::AnyBuffer v, const Extras& x, ffi::Result<ffi::AnyBuffer> o,
                      ffi::Result<ffi::AnyBuffer> lse, const Settings& s) {
  try {
    orchard::ForwardArgs a;
    a.q = in(q, device, "q");
    a.k = in(k, device, "k");
    a.v = in(v, device, "v");
    a.out = out(o, device, "out");
    a.lse = out(lse, device, "lse");
    a.extras = extras_of(x, s, device);
    a.options = options(s, x.rng, stream);
    orchard::attention_forward(a);
    return ffi::Error::Success();
  } catch (const std::exception& e) {
    return to_ffi_error(e);
  }
}

// The backward on `device`. Its workspace (fp32 dq accumulators etc.) comes from
// `allocate(bytes)`: host memory owned by the call on the CPU; on CUDA, XLA's
// scratch allocator (device memory handed back to XLA's allocator when the handler
// returns, as jaxlib's own GPU kernels do: whatever XLA puts there next is ordered
// after this call's kernels on the same stream).
template <class Allocate>
ffi::Error backward_on(orchard::Device device, void* stream, Allocate&& allocate, ffi::AnyBuffer q,
                       ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer o, ffi::AnyBuffer lse,
                       ffi::AnyBuffer dout, const Extras& x, ffi::Result<ffi::AnyBuffer> dq,
                       ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                       ffi::Result<ffi::AnyBuffer> dsink, const Settings& s) {
  try {
    orchard::BackwardArgs g;
    g.q = in(q, device, "q");
    g.k = in(k, device, "k");
    g.v = in(v, device, "v");
    g.out = in(o, device, "out");
    g.lse = in(lse, device, "lse");
    g.dout = in(dout, device, "dout");
    g.dq = out(dq, device, "dq");
    g.dk = out(dk, device, "dk");
    g.dv = out(dv, device, "dv");
    if (dsink->element_count() > 0) g.dsink = out(dsink, device, "dsink");
    g.extras = extras_of(x, s, device);
    g.options = options(s, x.rng, stream);
    const std::size_t bytes = orchard::backward_workspace_bytes(g);
    if (bytes > 0)
      g.workspace = orchard::make_contiguous_view(allocate(bytes), orchard::DType::kUInt8, device,
                                                  {static_cast<std::int64_t>(bytes)});
    orchard::attention_backward(g);
    return ffi::Error::Success();
  } catch (const std::exception& e) {
    return to_ffi_error(e);
  }
}

ffi::Error forward_cpu(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer alibi,
                       ffi::AnyBuffer sink, ffi::AnyBuffer bias, ffi::AnyBuffer cu_q, ffi::AnyBuffer cu_k,
                       ffi::AnyBuffer rng, ffi::Result<ffi::AnyBuffer> o, ffi::Result<ffi::AnyBuffer> lse,
                       Settings s) {
  return forward_on(host(), nullptr, q, k, v, Extras{alibi, sink, bias, cu_q, cu_k, rng}, o, lse, s);
}

ffi::Error backward_cpu(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer o,
                        ffi::AnyBuffer lse, ffi::AnyBuffer dout, ffi::AnyBuffer alibi, ffi::AnyBuffer sink,
                        ffi::AnyBuffer bias, ffi::AnyBuffer cu_q, ffi::AnyBuffer cu_k, ffi::AnyBuffer rng,
                        ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                        ffi::Result<ffi::AnyBuffer> dv, ffi::Result<ffi::AnyBuffer> dsink, Settings s) {
  std::vector<unsigned char> workspace;  // host memory owned by this call
  auto allocate = [&](std::size_t bytes) -> void* {
    workspace.resize(bytes);
    return workspace.data();
  };
  return backward_on(host(), nullptr, allocate, q, k, v, o, lse, dout, Extras{alibi, sink, bias, cu_q, cu_k, rng},
                     dq, dk, dv, dsink, s);
}

ffi::Error forward_cuda(void* stream, int32_t ordinal, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                        ffi::AnyBuffer alibi, ffi::AnyBuffer sink, ffi::AnyBuffer bias, ffi::AnyBuffer cu_q,
                        ffi::AnyBuffer cu_k, ffi::AnyBuffer rng, ffi::Result<ffi::AnyBuffer> o,
                        ffi::Result<ffi::AnyBuffer> lse, Settings s) {
  return forward_on(gpu(ordinal), stream, q, k, v, Extras{alibi, sink, bias, cu_q, cu_k, rng}, o, lse, s);
}

ffi::Error backward_cuda(void* stream, int32_t ordinal, ffi::ScratchAllocator scratch, ffi::AnyBuffer q,
                         ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer o, ffi::AnyBuffer lse,
                         ffi::AnyBuffer dout, ffi::AnyBuffer alibi, ffi::AnyBuffer sink, ffi::AnyBuffer bias,
                         ffi::AnyBuffer cu_q, ffi::AnyBuffer cu_k, ffi::AnyBuffer rng,
                         ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                         ffi::Result<ffi::AnyBuffer> dv, ffi::Result<ffi::AnyBuffer> dsink, Settings s) {
  auto allocate = [&](std::size_t bytes) -> void* {
    // XLA's FFI refuses alignments above 16 ("Unsupported alignment"; kMaxAlignment in
    // xla/ffi/ffi_api.cc) and the core wants 256: over-allocate, round the start up.
    std::optional<void*> p = scratch.Allocate(bytes + kWorkspaceAlign - 1, /*alignment=*/16);
    if (!p.has_value() || *p == nullptr)
      throw orchard::Error(orchard::ErrorKind::kRuntime, std::string(kOp) + ": XLA's scratch allocator could not "
                                                         "allocate the backward workspace (" +
                                                         std::to_string(bytes) + " bytes)");
    const auto address = reinterpret_cast<std::uintptr_t>(*p);
    return reinterpret_cast<void*>((address + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign);
  };
  return backward_on(gpu(ordinal), stream, allocate, q, k, v, o, lse, dout,
                     Extras{alibi, sink, bias, cu_q, cu_k, rng}, dq, dk, dv, dsink, s);
}

// flash_attn_with_kvcache on `device`: operands q, the caches as XLA passed them (unused: the
// results alias them, orchard.jax sets input_output_aliases, so XLA hands the results holding
// the caches' contents, in the same buffers when the caller donated them) and the optional
// inputs (absent: no elements); results out, lse (no elements unless asked for) and the
// caches, appended to in place.
template <class Allocate>
ffi::Error kvcache_on(orchard::Device device, void* stream, Allocate&& allocate, ffi::AnyBuffer q,
                      ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer rotary_cos, ffi::AnyBuffer rotary_sin,
                      ffi::AnyBuffer cache_seqlens, ffi::AnyBuffer cache_batch_idx, ffi::AnyBuffer cache_leftpad,
                      ffi::AnyBuffer block_table, ffi::AnyBuffer alibi, ffi::Result<ffi::AnyBuffer> o,
                      ffi::Result<ffi::AnyBuffer> lse, ffi::Result<ffi::AnyBuffer> k_cache,
                      ffi::Result<ffi::AnyBuffer> v_cache, const DecodeSettings& s) {
  try {
    orchard::DecodeArgs a;
    a.q = in(q, device, "q", kKvcacheOp);
    a.k_cache = out(k_cache, device, "k_cache", kKvcacheOp);
    a.v_cache = out(v_cache, device, "v_cache", kKvcacheOp);
    // Optional operand `bit` (DecodeSettings::present): a view when the caller gave it, even empty.
    auto given = [&](int bit, const ffi::AnyBuffer& b, const char* name) {
      return (s.present >> bit) & 1 ? in(b, device, name, kKvcacheOp) : orchard::TensorView{};
    };
    a.k = given(0, k, "k");
    a.v = given(1, v, "v");
    a.rotary_cos = given(2, rotary_cos, "rotary_cos");
    a.rotary_sin = given(3, rotary_sin, "rotary_sin");
    a.cache_seqlens = given(4, cache_seqlens, "cache_seqlens");
    a.cache_batch_idx = given(5, cache_batch_idx, "cache_batch_idx");
    a.cache_leftpad = given(6, cache_leftpad, "cache_leftpad");
    a.block_table = given(7, block_table, "block_table");
    a.alibi_slopes = given(8, alibi, "alibi_slopes");
    a.out = out(o, device, "out", kKvcacheOp);
    if (lse->element_count() > 0) a.lse = out(lse, device, "lse", kKvcacheOp);
    orchard::DecodeOptions& opt = a.options;
    opt.softmax_scale = s.scale;
    opt.causal = s.causal != 0;
    opt.window_left = s.window_left;
    opt.window_right = s.window_right;
    opt.softcap = s.softcap;
    opt.rotary_interleaved = s.rotary_interleaved != 0;
    opt.num_splits = s.num_splits;
    opt.check_device_indices = s.check_device_indices != 0;
    opt.stream = stream;
    opt.op_name = kKvcacheOp;
    const orchard::DecodePlan plan = orchard::kvcache_plan(a);
    if (plan.workspace_bytes > 0)
      a.workspace = orchard::make_contiguous_view(allocate(plan.workspace_bytes), orchard::DType::kUInt8, device,
                                                  {static_cast<std::int64_t>(plan.workspace_bytes)});
    orchard::attention_with_kvcache(a);
    return ffi::Error::Success();
  } catch (const std::exception& e) {
    return to_ffi_error(e);
  }
}

ffi::Error kvcache_cpu(ffi::AnyBuffer q, ffi::AnyBuffer, ffi::AnyBuffer, ffi::AnyBuffer k, ffi::AnyBuffer v,
                       ffi::AnyBuffer rotary_cos, ffi::AnyBuffer rotary_sin, ffi::AnyBuffer cache_seqlens,
                       ffi::AnyBuffer cache_batch_idx, ffi::AnyBuffer cache_leftpad, ffi::AnyBuffer block_table,
                       ffi::AnyBuffer alibi, ffi::Result<ffi::AnyBuffer> o, ffi::Result<ffi::AnyBuffer> lse,
                       ffi::Result<ffi::AnyBuffer> k_cache, ffi::Result<ffi::AnyBuffer> v_cache, DecodeSettings s) {
  std::vector<unsigned char> workspace;  // host memory owned by this call (16-byte aligned by new)
  auto allocate = [&](std::size_t bytes) -> void* {
    workspace.resize(bytes);
    return workspace.data();
  };
  return kvcache_on(host(), nullptr, allocate, q, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                    cache_leftpad, block_table, alibi, o, lse, k_cache, v_cache, s);
}

ffi::Error kvcache_cuda(void* stream, int32_t ordinal, ffi::ScratchAllocator scratch, ffi::AnyBuffer q,
                        ffi::AnyBuffer, ffi::AnyBuffer, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer rotary_cos,
                        ffi::AnyBuffer rotary_sin, ffi::AnyBuffer cache_seqlens, ffi::AnyBuffer cache_batch_idx,
                        ffi::AnyBuffer cache_leftpad, ffi::AnyBuffer block_table, ffi::AnyBuffer alibi,
                        ffi::Result<ffi::AnyBuffer> o, ffi::Result<ffi::AnyBuffer> lse,
                        ffi::Result<ffi::AnyBuffer> k_cache, ffi::Result<ffi::AnyBuffer> v_cache, DecodeSettings s) {
  auto allocate = [&](std::size_t bytes) -> void* {
    std::optional<void*> p = scratch.Allocate(bytes, /*alignment=*/16);  // the split workspace wants 16
    if (!p.has_value() || *p == nullptr)
      throw orchard::Error(orchard::ErrorKind::kRuntime, std::string(kKvcacheOp) + ": XLA's scratch allocator "
                                                         "could not allocate the split-KV workspace (" +
                                                         std::to_string(bytes) + " bytes)");
    return *p;
  };
  return kvcache_on(gpu(ordinal), stream, allocate, q, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                    cache_leftpad, block_table, alibi, o, lse, k_cache, v_cache, s);
}

template <class Binding>
auto kvcache_signature(Binding b) {
  return std::move(b)
      .template Arg<ffi::AnyBuffer>()   // q
      .template Arg<ffi::AnyBuffer>()   // k_cache (aliased by the third result)
      .template Arg<ffi::AnyBuffer>()   // v_cache (aliased by the fourth result)
      .template Arg<ffi::AnyBuffer>()   // k
      .template Arg<ffi::AnyBuffer>()   // v
      .template Arg<ffi::AnyBuffer>()   // rotary_cos
      .template Arg<ffi::AnyBuffer>()   // rotary_sin
      .template Arg<ffi::AnyBuffer>()   // cache_seqlens
      .template Arg<ffi::AnyBuffer>()   // cache_batch_idx
      .template Arg<ffi::AnyBuffer>()   // cache_leftpad
      .template Arg<ffi::AnyBuffer>()   // block_table
      .template Arg<ffi::AnyBuffer>()   // alibi_slopes
      .template Ret<ffi::AnyBuffer>()   // out
      .template Ret<ffi::AnyBuffer>()   // lse
      .template Ret<ffi::AnyBuffer>()   // k_cache
      .template Ret<ffi::AnyBuffer>()   // v_cache
      .template Attrs<DecodeSettings>();
}

// The Extras operands, after the pass's own.
template <class Binding>
auto extras_signature(Binding b) {
  return std::move(b)
      .template Arg<ffi::AnyBuffer>()   // alibi_slopes
      .template Arg<ffi::AnyBuffer>()   // sink
      .template Arg<ffi::AnyBuffer>()   // bias / mask
      .template Arg<ffi::AnyBuffer>()   // cu_seqlens_q
      .template Arg<ffi::AnyBuffer>()   // cu_seqlens_k
      .template Arg<ffi::AnyBuffer>();  // dropout RNG state
}

// forward: q, k, v, the Extras operands; out, lse; the settings.
template <class Binding>
auto forward_signature(Binding b) {
  return extras_signature(std::move(b)
                              .template Arg<ffi::AnyBuffer>()    // q
                              .template Arg<ffi::AnyBuffer>()    // k
                              .template Arg<ffi::AnyBuffer>())   // v
      .template Ret<ffi::AnyBuffer>()   // out
      .template Ret<ffi::AnyBuffer>()   // lse
      .template Attrs<Settings>();
}

// backward: q, k, v, out, lse, dout, the Extras operands; dq, dk, dv, dsink; the settings.
template <class Binding>
auto backward_signature(Binding b) {
  return extras_signature(std::move(b)
                              .template Arg<ffi::AnyBuffer>()    // q
                              .template Arg<ffi::AnyBuffer>()    // k
                              .template Arg<ffi::AnyBuffer>()    // v
                              .template Arg<ffi::AnyBuffer>()    // out
                              .template Arg<ffi::AnyBuffer>()    // lse
                              .template Arg<ffi::AnyBuffer>())   // dout
      .template Ret<ffi::AnyBuffer>()   // dq
      .template Ret<ffi::AnyBuffer>()   // dk
      .template Ret<ffi::AnyBuffer>()   // dv
      .template Ret<ffi::AnyBuffer>()   // dsink (no elements without a sink)
      .template Attrs<Settings>();
}

}  // namespace

// The attributes orchard.jax._attrs passes, by name, into Settings (its member order).
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(Settings, ffi::StructMember<double>("softmax_scale"),
                                      ffi::StructMember<int32_t>("causal"),
                                      ffi::StructMember<int64_t>("window_left"),
                                      ffi::StructMember<int64_t>("window_right"),
                                      ffi::StructMember<double>("softcap"),
                                      ffi::StructMember<double>("dropout_p"),
                                      ffi::StructMember<int64_t>("max_seqlen_q"),
                                      ffi::StructMember<int64_t>("max_seqlen_k"),
                                      ffi::StructMember<int32_t>("deterministic"));

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(DecodeSettings, ffi::StructMember<double>("softmax_scale"),
                                      ffi::StructMember<int32_t>("causal"),
                                      ffi::StructMember<int64_t>("window_left"),
                                      ffi::StructMember<int64_t>("window_right"),
                                      ffi::StructMember<double>("softcap"),
                                      ffi::StructMember<int32_t>("rotary_interleaved"),
                                      ffi::StructMember<int32_t>("num_splits"),
                                      ffi::StructMember<int32_t>("check_device_indices"),
                                      ffi::StructMember<int32_t>("present"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(OrchardKvcacheCpu, kvcache_cpu, kvcache_signature(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(OrchardKvcacheCuda, kvcache_cuda,
                              kvcache_signature(ffi::Ffi::Bind()
                                                    .Ctx<ffi::PlatformStream<void*>>()
                                                    .Ctx<ffi::DeviceOrdinal>()
                                                    .Ctx<ffi::ScratchAllocator>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(OrchardFlashForwardCpu, forward_cpu, forward_signature(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(OrchardFlashBackwardCpu, backward_cpu, backward_signature(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(OrchardFlashForwardCuda, forward_cuda,
                              forward_signature(ffi::Ffi::Bind()
                                                    .Ctx<ffi::PlatformStream<void*>>()
                                                    .Ctx<ffi::DeviceOrdinal>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(OrchardFlashBackwardCuda, backward_cuda,
                              backward_signature(ffi::Ffi::Bind()
                                                     .Ctx<ffi::PlatformStream<void*>>()
                                                     .Ctx<ffi::DeviceOrdinal>()
                                                     .Ctx<ffi::ScratchAllocator>()));

NB_MODULE(_jax_ffi, m) {
  m.doc() = "XLA FFI handlers (CPU and CUDA) for orchard.jax: PyCapsules for jax.ffi.register_ffi_target.";
  // {platform: {target name: capsule}}; platform names as jax.ffi.register_ffi_target takes them.
  m.def("handlers", []() {
    nb::dict cpu, cuda, d;
    cpu["orchard_flash_forward"] = nb::capsule(reinterpret_cast<void*>(&OrchardFlashForwardCpu));
    cpu["orchard_flash_backward"] = nb::capsule(reinterpret_cast<void*>(&OrchardFlashBackwardCpu));
    cuda["orchard_flash_forward"] = nb::capsule(reinterpret_cast<void*>(&OrchardFlashForwardCuda));
    cuda["orchard_flash_backward"] = nb::capsule(reinterpret_cast<void*>(&OrchardFlashBackwardCuda));
    cpu["orchard_kvcache_forward"] = nb::capsule(reinterpret_cast<void*>(&OrchardKvcacheCpu));
    cuda["orchard_kvcache_forward"] = nb::capsule(reinterpret_cast<void*>(&OrchardKvcacheCuda));
    d["cpu"] = cpu;
    d["CUDA"] = cuda;
    return d;
  });
  // Whether the orchard core linked into this module has its CUDA backend.
  m.def("cuda_compiled", []() { return orchard::build_info().cuda_compiled; });
}
