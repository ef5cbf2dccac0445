#pragma once
#include "cuda_runtime.h"
struct __half { std::uint16_t x; };
struct __half2 { __half x, y; };
inline __half __ushort_as_half(unsigned short u) { return {u}; }
inline float __half2float(__half h) { return orchard::fp16_to_float(h.x); }
inline __half __float2half_rn(float f) { return {orchard::float_to_fp16(f)}; }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
