#include "metal_launch.h"

#include <array>

#include "backends/metal/metal_kernels.h"
#include "emulated_kernels.h"

namespace orchard::metal_emu {
namespace {

// Kernels take non-const void* buffers; inputs are only read.
void* buf(const void* p) { return const_cast<void*>(p); }

// The ALiBi slopes, or a float buffer the kernels do not read (meta says there are none).
void* alibi_buffer(const FwdParams& p) { return buf(p.alibi_slopes != nullptr ? p.alibi_slopes : p.lse); }

// The three attn_mask buffers (bool / the problem's dtype / fp32): the mask in the one
// pack_meta's kind names, stand-ins nothing reads in the others.
std::array<void*, 3> mask_buffers(const FwdParams& p, void* bool_stand_in) {
  std::array<void*, 3> b = {bool_stand_in, buf(p.q), buf(p.lse)};
  if (p.attn_bias != nullptr)
    b[p.attn_bias_dtype == DType::kUInt8 ? 0 : p.attn_bias_dtype == p.dtype ? 1 : 2] = buf(p.attn_bias);
  return b;
}

// cu_seqlens_q / _k, or a stand-in nothing reads (meta says there is no varlen).
std::array<void*, 2> varlen_buffers(const FwdParams& p, void* stand_in) {
  return {p.cu_seqlens_q != nullptr ? buf(p.cu_seqlens_q) : stand_in,
          p.cu_seqlens_k != nullptr ? buf(p.cu_seqlens_k) : stand_in};
}

void run(const metal::Variant& v, const metal::Launch& l, const std::vector<void*>& buffers) {
  run_emulated(v.name(), l.kernel, l.groups, l.threads_per_group, buffers);
}

}  // namespace

void emulate_forward(const FwdParams& p) {
  const metal::Variant v = metal::select_variant(p.dtype, metal::variant_head_dim(p));
  BwdParams bp;
  static_cast<FwdParams&>(bp) = p;
  std::vector<std::int64_t> meta = metal::pack_meta(bp, p.dropout_mask != nullptr);
  const DropoutKey key = dropout_key(p);
  std::int64_t rng[2] = {static_cast<std::int64_t>(key.seed), static_cast<std::int64_t>(key.offset)};
  std::uint8_t no_mask = 0;
  const auto masks = mask_buffers(p, &no_mask);
  const auto offsets = varlen_buffers(p, meta.data());
  run(v, metal::forward_launch(v, p),
      {buf(p.q), buf(p.k), buf(p.v), p.out, p.lse, p.dropout_mask ? p.dropout_mask : &no_mask, rng, meta.data(),
       alibi_buffer(p), buf(p.sink != nullptr ? p.sink : p.lse), masks[0], masks[1], masks[2], offsets[0],
       offsets[1]});
}

void emulate_backward(const BwdParams& p) {
  const metal::Variant v = metal::select_variant(p.dtype, metal::variant_head_dim(p));
  std::vector<std::int64_t> meta = metal::pack_meta(p, false);
  const DropoutKey key = dropout_key(p);
  std::int64_t rng[2] = {static_cast<std::int64_t>(key.seed), static_cast<std::int64_t>(key.offset)};
  std::vector<float> delta(metal::backward_delta_floats(p) + 1);
  std::uint8_t no_mask = 0;
  const auto masks = mask_buffers(p, &no_mask);
  const auto offsets = varlen_buffers(p, meta.data());
  run(v, metal::backward_dot_launch(v, p),
      {buf(p.out), buf(p.dout), delta.data(), meta.data(), offsets[0], offsets[1]});
  run(v, metal::backward_dq_launch(v, p),
      {buf(p.q), buf(p.k), buf(p.v), buf(p.dout), buf(p.lse), delta.data(), p.dq, rng, meta.data(), alibi_buffer(p),
       masks[0], masks[1], masks[2], offsets[0], offsets[1]});
  run(v, metal::backward_dkdv_launch(v, p),
      {buf(p.q), buf(p.k), buf(p.v), buf(p.dout), buf(p.lse), delta.data(), p.dk, p.dv, rng, meta.data(),
       alibi_buffer(p), masks[0], masks[1], masks[2], offsets[0], offsets[1]});
}

}  // namespace orchard::metal_emu
