// Run-time CPU feature checks shared by the CPU kernels' dispatch, each evaluated once per
// process; false off x86-64 (feature names there are x86's).
#pragma once

namespace orchard::cpu {

// AVX-512 F + DQ + BW + VL: what the 16-lane fp32 GEMM and softmax paths use.
inline bool cpu_has_avx512() {
#if defined(__x86_64__)
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return yes;
#else
  return false;
#endif
}

// AVX2 + FMA: the 8-lane intrinsics paths (softmax_tile.cpp).
inline bool cpu_has_avx2_fma() {
#if defined(__x86_64__)
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
#else
  return false;
#endif
}

}  // namespace orchard::cpu
