// Runs Orchard's Metal kernels on the emulator the way python/orchard/_mps.py runs them on
// a GPU: variant, geometry and the packed `meta` buffer from the C++ core, buffers bound
// in each kernel's argument order.
#pragma once

#include <cstdint>
#include <vector>

#include "orchard/params.h"

namespace orchard::metal_emu {

// Forward into p.out / p.lse (and p.dropout_mask when set).
void emulate_forward(const FwdParams& p);
// Backward into p.dq / p.dk / p.dv (delta workspace allocated here).
void emulate_backward(const BwdParams& p);

}  // namespace orchard::metal_emu
