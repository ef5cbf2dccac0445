// Which score modifiers a call uses (params.h), host and device: shared by the kernels (their
// run-time feature branches), the sm90 dispatch (sm90/sm90_call_support.h) and the debug log's
// variant name.  No CUDA headers, so the host tests can include it.
#pragma once
#include <cstdint>

#include "orchard/config.h"

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

}  // namespace orchard::cuda
