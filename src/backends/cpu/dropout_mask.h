// Dropout keep-mask generation for a run of columns of one attention row
// (Philox4x32-10 per orchard/philox.h): AVX2 code that runs eight Philox
// counters side by side when the CPU has it, scalar philox.h otherwise.
#pragma once

#include <cstdint>

namespace orchard::cpu {

// keep[t] = 1 if element (batch_head, row, j0 + t) survives dropout, t < n.
// Any j0 >= 0 (a dropout column offset can make it unaligned); from the first
// multiple of 4 on, each Philox call yields four consecutive columns.
void dropout_keep_row(std::uint64_t seed, std::uint64_t offset, std::uint32_t batch_head,
                      std::uint32_t row, std::int64_t j0, int n, std::uint32_t threshold,
                      std::uint8_t* keep);

}  // namespace orchard::cpu
