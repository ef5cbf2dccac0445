// CPU runtime of the Metal emulator (tests only): runs a compute grid the way a
// Metal GPU does as far as the kernels can observe — threadgroups of
// `threads_per_group` threads, simdgroups of 32 lanes, real threadgroup barriers —
// with one OS thread per GPU thread. Threadgroups of one launch run one after another
// (threadgroup memory is a function-local static in the shim; see metal_stdlib).
//
// Faults fail loudly, as an EmulationError from run_grid:
//   - a barrier reached by only some threads (others at another barrier, or
//     returned from the kernel);
//   - lanes of one simdgroup that issued different simdgroup_matrix operations or
//     arguments between two barriers (collectives must be uniform);
//   - anything else the shim rejects (require()).
#pragma once

#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>

namespace orchard::metal_emu {

struct EmulationError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct ThreadIds {
  std::uint32_t group = 0;      // [[threadgroup_position_in_grid]] (1-D grids)
  std::uint32_t thread = 0;     // [[thread_index_in_threadgroup]]
  std::uint32_t simdgroup = 0;  // [[simdgroup_index_in_threadgroup]]
  std::uint32_t lane = 0;       // [[thread_index_in_simdgroup]]
};

constexpr std::uint32_t kSimdWidth = 32;

// Runs body for every thread of `groups` threadgroups; threads_per_group must be a
// positive multiple of 32 (the kernels are written for full simdgroups).
void run_grid(std::uint32_t groups, std::uint32_t threads_per_group,
              const std::function<void(const ThreadIds&)>& body);

// Called by the shim from inside a kernel.
void barrier(unsigned source_line);
void note_collective(int op, const void* pointer, std::uint64_t stride, bool transpose);
void require(bool ok, const char* what);

}  // namespace orchard::metal_emu
