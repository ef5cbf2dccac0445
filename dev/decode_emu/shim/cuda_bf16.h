#pragma once
#include "cuda_fp16.h"
struct __nv_bfloat16 { std::uint16_t x; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
inline float __bfloat162float(__nv_bfloat16 h) { return orchard::bf16_to_float(h.x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {orchard::float_to_bf16(f)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return {__bfloat162float(h.x), __bfloat162float(h.y)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)}; }

// ---- warp-collective matrix ops, by the PTX ISA's fragment layouts ----------------------
template <class T>
inline float emu_b16(std::uint16_t bits) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return orchard::bf16_to_float(bits);
  else return orchard::fp16_to_float(bits);
}
// mma.m16n8k16 row.col: A 16x16 (a0: (g, 2c..2c+1), a1: (g+8, ..), a2: (g, 2c+8..), a3: (g+8, 2c+8..)),
// B 16x8 (b0: (k = 2c..2c+1, n = g), b1: (k = 2c+8.., n = g)), C/D 16x8 (c0,c1: (g, 2c..), c2,c3: (g+8, 2c..)),
// g = lane / 4, c = lane % 4; the lower 16 bits hold the lower column / k index.
template <class T>
inline void emu_mma16816(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1) {
  EmuWarp& w = emu_warp();
  const int l = emu_lane();
  for (int i = 0; i < 4; ++i) w.u[l][i] = a[i];
  w.u[l][4] = b0, w.u[l][5] = b1;
  w.bar.arrive_and_wait();
  float A[16][16], B[16][8];
  for (int t = 0; t < 32; ++t) {
    const int g = t / 4, cc = t % 4;
    for (int e = 0; e < 2; ++e) {
      auto h = [&](std::uint32_t v) { return emu_b16<T>(static_cast<std::uint16_t>(e ? v >> 16 : v & 0xffff)); };
      A[g][2 * cc + e] = h(w.u[t][0]);
      A[g + 8][2 * cc + e] = h(w.u[t][1]);
      A[g][2 * cc + 8 + e] = h(w.u[t][2]);
      A[g + 8][2 * cc + 8 + e] = h(w.u[t][3]);
      B[2 * cc + e][g] = h(w.u[t][4]);
      B[2 * cc + 8 + e][g] = h(w.u[t][5]);
    }
  }
  w.bar.arrive_and_wait();
  const int g = l / 4, cc = l % 4;
  for (int i = 0; i < 4; ++i) {
    const int r = g + (i >= 2 ? 8 : 0), n = 2 * cc + (i & 1);
    float s = c[i];
    for (int k = 0; k < 16; ++k) s += A[r][k] * B[k][n];
    c[i] = s;
  }
}
// movmatrix.m8n8.trans.b16: lane t holds (t/4, 2(t%4)..+1) of an 8x8 matrix; it receives
// the same positions of the transpose.
inline std::uint32_t emu_movmatrix_trans(std::uint32_t x) {
  EmuWarp& w = emu_warp();
  const int l = emu_lane();
  w.u[l][0] = x;
  w.bar.arrive_and_wait();
  const int g = l / 4, cc = l % 4;
  std::uint16_t e[2];
  for (int k = 0; k < 2; ++k) {  // element (g, 2cc + k) of M^T = M(2cc + k, g)
    const int r = 2 * cc + k, c = g;
    const std::uint32_t v = w.u[r * 4 + c / 2][0];
    e[k] = static_cast<std::uint16_t>(c % 2 ? v >> 16 : v & 0xffff);
  }
  w.bar.arrive_and_wait();
  return e[0] | (static_cast<std::uint32_t>(e[1]) << 16);
}
// ldmatrix.m8n8.x4 (.trans): lanes 8m..8m+7 give the row addresses of matrix m; lane t
// receives in r[m] elements (t/4, 2(t%4)) and (t/4, 2(t%4)+1) of matrix m (of its transpose).
inline void emu_ldmatrix_x4(std::uint32_t (&r)[4], const void* smem, bool trans) {
  EmuWarp& w = emu_warp();
  const int l = emu_lane();
  w.ptr[l] = smem;
  w.bar.arrive_and_wait();
  const int g = l / 4, cc = l % 4;
  for (int m = 0; m < 4; ++m) {
    std::uint16_t e[2];
    for (int k = 0; k < 2; ++k) {
      const int row = trans ? 2 * cc + k : g, col = trans ? g : 2 * cc + k;
      std::memcpy(&e[k], static_cast<const unsigned char*>(w.ptr[8 * m + row]) + 2 * col, 2);
    }
    r[m] = e[0] | (static_cast<std::uint32_t>(e[1]) << 16);
  }
  w.bar.arrive_and_wait();
}
