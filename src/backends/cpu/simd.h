// Portable SIMD building blocks for the CPU kernels: GCC/Clang vector
// extensions (no intrinsics, so every clone compiles from one source) and
// function multi-versioning, so one binary runs AVX2+FMA code where the CPU
// has it and plain x86-64 (SSE2) code elsewhere — no -march=native needed.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__) && defined(__ELF__) && !defined(__clang__)
// x86-64-v3 = AVX2 + FMA + F16C. (An x86-64-v4 clone was left out: 256-bit
// vectors gain little from AVX-512 and this machine cannot measure it.)
#define ORCHARD_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
// The same plus an x86-64-v4 clone, for 8-lane code that needs AVX-512's 32
// vector registers to keep its accumulators out of memory (the CPU decode).
#define ORCHARD_CPU_CLONES_V4 __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ORCHARD_CPU_CLONES
#define ORCHARD_CPU_CLONES_V4
#endif

#define ORCHARD_ALWAYS_INLINE inline __attribute__((always_inline))

// The vector helpers are always inlined, so the AVX-vs-SSE argument-passing
// ABI note GCC emits for them does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace orchard::cpu {

// 32-byte vectors: one AVX register; two SSE registers in the default clone.
template <class T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
  typedef std::int32_t itype __attribute__((vector_size(32)));
  static constexpr int kLanes = 8;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
  typedef std::int64_t itype __attribute__((vector_size(32)));
  static constexpr int kLanes = 4;
};
using vf32 = Vec<float>::type;
using vi32 = Vec<float>::itype;

template <class V, class T>
ORCHARD_ALWAYS_INLINE V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof v);  // unaligned load
  return v;
}
template <class V, class T>
ORCHARD_ALWAYS_INLINE void vstore(T* p, const V& v) {
  std::memcpy(p, &v, sizeof v);
}

// Lane indices 0..7 as floats, for building column masks.
ORCHARD_ALWAYS_INLINE vf32 iota_f32() { return vf32{0, 1, 2, 3, 4, 5, 6, 7}; }

// 2^x for a vector, |rel err| ~ 1e-7 on finite inputs; x <= -126 gives 0
// exactly (so masked -inf scores vanish) and NaN never comes from -inf.
// Range reduction x = n + f, f in [-0.5, 0.5]; degree-7 Taylor of e^(f ln2).
ORCHARD_ALWAYS_INLINE vf32 exp2_f32(vf32 x) {
  const vf32 lo = vf32{} - 126.0f;
  const vi32 dead = x < lo;
  x = dead ? lo : x;
  x = x > 127.0f ? vf32{} + 127.0f : x;
  const vf32 magic = vf32{} + 12582912.0f;  // 1.5 * 2^23: add/sub rounds to nearest int
  const vf32 n = (x + magic) - magic;
  const vf32 f = x - n;
  vf32 p = vf32{} + 1.5252733804059841e-05f;  // ln2^7/7!
  p = p * f + 1.5403530393381610e-04f;        // ln2^6/6!
  p = p * f + 1.3333558146428443e-03f;        // ln2^5/5!
  p = p * f + 9.6181291076284772e-03f;        // ln2^4/4!
  p = p * f + 5.5504108664821580e-02f;        // ln2^3/3!
  p = p * f + 2.4022650695910071e-01f;        // ln2^2/2!
  p = p * f + 6.9314718055994531e-01f;        // ln2
  p = p * f + 1.0f;
  const vi32 ni = __builtin_convertvector(n, vi32);
  const vi32 bits = (ni + 127) << 23;
  vf32 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  const vf32 r = p * scale;
  return dead ? vf32{} : r;
}

// NaN-propagating horizontal max: a NaN score (NaN/inf in q or k) must reach
// the output rather than be skipped by the comparison.
ORCHARD_ALWAYS_INLINE float hmax(vf32 v) {
  float m = v[0];
  for (int i = 1; i < 8; ++i) m = (v[i] > m || v[i] != v[i]) ? v[i] : m;
  return m;
}
ORCHARD_ALWAYS_INLINE float hsum(vf32 v) {
  // pairwise, so the result does not depend on lane order much
  const float a = (v[0] + v[4]) + (v[2] + v[6]);
  const float b = (v[1] + v[5]) + (v[3] + v[7]);
  return a + b;
}

}  // namespace orchard::cpu
