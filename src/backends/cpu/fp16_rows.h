// fp16 <-> fp32 conversion of contiguous rows for the CPU kernels' loads and stores: F16C's
// vcvtph2ps / vcvtps2ph (8 lanes, round to nearest even) where the CPU has it, numeric.h's
// scalar conversions elsewhere and for the tail. With the scalar conversions (bit
// manipulation and branches, per element) an fp16 decode step (b1 h8 sk4k d64, 2 threads,
// Zen 4) took 2.75 ms against fp32's 0.33; with F16C 0.38 ms (bench/RESULTS.md, session 40).
#pragma once

#include <cstdint>

namespace orchard::cpu {

// dst[i] = float(src[i]), i < n: exact (every fp16 value is an fp32 value).
void fp16_row_to_float(const std::uint16_t* src, int n, float* dst);

// dst[i] = fp16(src[i] * mul), i < n, rounded to nearest even as float_to_fp16 does
// (overflow to inf; a NaN stays a NaN, its payload not kept).
void float_row_to_fp16(const float* src, float mul, int n, std::uint16_t* dst);

// Whether the conversions above run on F16C here.
bool fp16_rows_use_f16c();

}  // namespace orchard::cpu
