// Which score modifiers a call uses (params.h), host and device: shared by the kernels (their
// run-time feature branches), the sm90 dispatch (sm90/sm90_call_support.h) and the debug log's
// variant name.  No CUDA headers, so the host tests can include it.
#pragma once
#include <cstdint>

#include "orchard/config.h"
#include "orchard/dtype.h"

namespace orchard::cuda {

// Whether the window adds anything to the kernel's own causal masking: the
// core passes causal calls as window_right == 0 (params.h), which the causal
// kernels already apply, so those keep the plain path.
ORCHARD_HOST_DEVICE bool window_active(bool causal, int64_t window_left, int64_t window_right) {
  return window_left >= 0 || (window_right >= 0 && !(causal && window_right == 0));
}

// Whether a call modifies its scores at all (a window beyond causal, softcap, ALiBi, attn_bias,
// varlen's segment form): the sm90 launchers pick their kFeatures instantiations by it.
template <class Params>
ORCHARD_HOST_DEVICE bool score_mods_active(const Params& p) {
  return window_active(p.causal, p.window_left, p.window_right) || p.softcap > 0.f || p.alibi_slopes != nullptr ||
         p.attn_bias != nullptr || p.segment_cu != nullptr;
}

// attn_bias element kinds (params.h): 0 boolean (uint8), 1 float32, 2 bfloat16, 3 float16.
ORCHARD_HOST_DEVICE int bias_kind(DType t) {
  return t == DType::kUInt8 ? 0 : (t == DType::kFloat32 ? 1 : (t == DType::kBFloat16 ? 2 : 3));
}
ORCHARD_HOST_DEVICE constexpr int bias_elem_bytes(int kind) { return kind == 0 ? 1 : (kind == 1 ? 4 : 2); }

// Whether a bias can be copied in 16-byte chunks (the sm80 kernels' cp.async staging, the sm90
// forward's TMA boxes): key stride 1, a 16-byte aligned base, batch / head / row strides of whole
// 16-byte chunks (0 = a broadcast dim).
ORCHARD_HOST_DEVICE bool bias_tile_async(const void* bias, int kind, int64_t bs, int64_t hs, int64_t rs, int64_t cs) {
  const int64_t e = bias_elem_bytes(kind);
  return cs == 1 && ((reinterpret_cast<uintptr_t>(bias) | static_cast<uint64_t>(bs * e) |
                      static_cast<uint64_t>(hs * e) | static_cast<uint64_t>(rs * e)) & 15) == 0;
}

}  // namespace orchard::cuda
