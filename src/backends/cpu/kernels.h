// Entry points of the CPU attention kernels (called by the dispatch table).
#pragma once

#include <string>

#include "orchard/params.h"

namespace orchard::cpu {

void forward(const FwdParams& params);
// The forward's operands and tiles for params, as the debug log names them: "<operands>_tiled_br<query
// rows per task>_bc<keys per tile>", operands fp64, fp32 (FMA units), fp32split3amx (fp32 / fp16 on
// AMX through three bf16 planes), bf16amx or bf16dot.
std::string forward_variant(const FwdParams& params);
void backward(const BwdParams& params);

}  // namespace orchard::cpu
