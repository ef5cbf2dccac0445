// The forward's output rows for bf16 tensors: an fp32 accumulator row times 1 / l, rounded
// to bf16 exactly as float_to_bf16 (orchard/numeric.h) rounds: nearest even, NaN quieted,
// denormals kept. Where the CPU has AVX-512 (F + BW) 16 lanes at a time: tile_load.h's
// store_row compiles to baseline SSE2 code with the rounding as integer steps, and perf put
// it at ~8 % of the bf16 forward at s1k (session 19).
#pragma once

#include <cstdint>

namespace orchard::cpu {

// dst[i] = float_to_bf16(src[i] * mul), i < d.
void store_row_bf16(const float* src, float mul, int d, std::uint16_t* dst);

}  // namespace orchard::cpu
