// Entry points of the CPU attention kernels (called by the dispatch table).
#pragma once

#include "orchard/params.h"

namespace orchard::cpu {

void forward(const FwdParams& params);
void backward(const BwdParams& params);

}  // namespace orchard::cpu
