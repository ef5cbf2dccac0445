// setmaxnreg (sm_90a): warpgroup-wide register reallocation for warp specialization.
// The producer warpgroup (TMA issue only) gives registers back so the consumer warpgroups
// (wgmma accumulators: 128 fp32 per thread for a 64x256 tile) can grow past the launch cap.
// Only honoured when the kernel has a register cap at entry (__launch_bounds__(T, 1) or
// -maxrregcount) and each role is one branch of an if/else; otherwise ptxas warns (C7508).
// Counts must be multiples of 8 in [24, 256]; the sum over warpgroups must fit 64K regs/SM.
#pragma once
#include <cstdint>

namespace orchard::sm90 {

template <uint32_t kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  static_assert(kRegs % 8 == 0 && kRegs >= 24 && kRegs <= 256, "setmaxnreg: 24..256, step 8");
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

template <uint32_t kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  static_assert(kRegs % 8 == 0 && kRegs >= 24 && kRegs <= 256, "setmaxnreg: 24..256, step 8");
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

}  // namespace orchard::sm90
