// Dropout keep-mask generation for a run of columns of one attention row
// (Philox4x32-10 per orchard/philox.h): eight (AVX2) or sixteen (AVX-512)
// Philox calls side by side when the CPU has them, scalar philox.h otherwise.
#pragma once

#include <cstdint>

namespace orchard::cpu {

// keep[t] = 1 if element (batch_head, row, j0 + t) survives dropout, t < n.
// Any j0 >= 0 (a dropout column offset can make it unaligned) and any
// threshold (dropout_keep_threshold: 0 keeps all, 256 drops all). Each Philox
// call holds 8 columns of this row (and 8 of row ^ 8, unused here): 4 calls
// per 32-column block.
void dropout_keep_row(std::uint64_t seed, std::uint64_t offset, std::uint32_t batch_head,
                      std::uint32_t row, std::int64_t j0, int n, std::uint32_t threshold,
                      std::uint8_t* keep);

// The implementations dropout_keep_row picks from (it takes the widest this CPU
// has; ORCHARD_CPU_DROPOUT512=0 leaves out AVX-512): tests run each one.
enum class DropoutMaskIsa { kScalar, kAvx2, kAvx512 };
bool dropout_mask_isa_supported(DropoutMaskIsa isa);
void dropout_keep_row_isa(DropoutMaskIsa isa, std::uint64_t seed, std::uint64_t offset,
                          std::uint32_t batch_head, std::uint32_t row, std::int64_t j0, int n,
                          std::uint32_t threshold, std::uint8_t* keep);

}  // namespace orchard::cpu
