// Kernels that test the emulator (emulator_selftest_kernels.cpp, built through the shim).
#pragma once

#include <cstdint>

namespace orchard::metal_emu::selftest {

void matrix_ops(const float* a, const float* b, float* c, std::uint32_t tid);
void math_builtins(const float* x, float* out, std::uint32_t tid);
void divergent_barrier(std::uint32_t tid, std::uint32_t early);
void divergent_collective(const float* src, std::uint32_t lane);

}  // namespace orchard::metal_emu::selftest
