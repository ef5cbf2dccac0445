// Helpers for kernel-level tests: typed host buffers viewed through BSHD,
// BHSD or sliced (padded, offset) strides, NaN poisoning, and value rounding.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "orchard/dtype.h"
#include "orchard/numeric.h"

namespace orchard::test {

enum class Layout { kBSHD, kBHSD, kSliced };

inline const char* layout_name(Layout l) {
  return l == Layout::kBSHD ? "BSHD" : l == Layout::kBHSD ? "BHSD" : "sliced";
}

// Rounds x to the nearest value representable in `dt`.
inline double round_to(DType dt, double x) {
  switch (dt) {
    case DType::kFloat16: return fp16_to_float(float_to_fp16(static_cast<float>(x)));
    case DType::kBFloat16: return bf16_to_float(float_to_bf16(static_cast<float>(x)));
    case DType::kFloat32: return static_cast<float>(x);
    default: return x;
  }
}

// A logical (b, s, h, d) tensor of dtype `dt` stored in a byte buffer with
// the strides `layout` implies. kSliced views a bigger BSHD allocation
// (s + 3, h + 2, d + 5) at offset (0, 1, 1, 2): non-contiguous, offset base.
struct Tensor4 {
  DType dt = DType::kFloat32;
  int b = 0, s = 0, h = 0, d = 0;
  std::int64_t sb = 0, ss = 0, sh = 0;  // element strides (batch, seq, head)
  std::int64_t base = 0;                // element offset of [0, 0, 0, 0]
  std::vector<unsigned char> bytes;

  Tensor4() = default;
  Tensor4(DType dtype, int b_, int s_, int h_, int d_, Layout layout)
      : dt(dtype), b(b_), s(s_), h(h_), d(d_) {
    std::int64_t total = 0;
    if (layout == Layout::kBSHD) {
      sh = d; ss = std::int64_t(h) * d; sb = std::int64_t(s) * h * d;
      total = std::int64_t(b) * sb;
    } else if (layout == Layout::kBHSD) {
      ss = d; sh = std::int64_t(s) * d; sb = std::int64_t(h) * s * d;
      total = std::int64_t(b) * sb;
    } else {
      const std::int64_t D = d + 5, H = h + 2, S = s + 3;
      sh = D; ss = H * D; sb = S * H * D;
      base = ss + sh + 2;
      total = std::int64_t(b) * sb + 1;
    }
    bytes.assign(std::size_t(std::max<std::int64_t>(total, 1)) * dtype_size(dt), 0);
    poison();
  }
  void* data() { return bytes.data() + base * dtype_size(dt); }
  std::int64_t offset(int bi, int si, int hi, int di) const {
    return base + bi * sb + si * ss + hi * sh + di;
  }
  std::size_t elements() const { return bytes.size() / dtype_size(dt); }

  double get_raw(std::size_t e) const {
    const unsigned char* p = bytes.data() + e * dtype_size(dt);
    std::uint16_t u16; float f; double x;
    switch (dt) {
      case DType::kFloat16: std::memcpy(&u16, p, 2); return fp16_to_float(u16);
      case DType::kBFloat16: std::memcpy(&u16, p, 2); return bf16_to_float(u16);
      case DType::kFloat32: std::memcpy(&f, p, 4); return f;
      default: std::memcpy(&x, p, 8); return x;
    }
  }
  void set_raw(std::size_t e, double v) {
    unsigned char* p = bytes.data() + e * dtype_size(dt);
    std::uint16_t u16; float f;
    switch (dt) {
      case DType::kFloat16: u16 = float_to_fp16(static_cast<float>(v)); std::memcpy(p, &u16, 2); break;
      case DType::kBFloat16: u16 = float_to_bf16(static_cast<float>(v)); std::memcpy(p, &u16, 2); break;
      case DType::kFloat32: f = static_cast<float>(v); std::memcpy(p, &f, 4); break;
      default: std::memcpy(p, &v, 8); break;
    }
  }
  double get(int bi, int si, int hi, int di) const { return get_raw(offset(bi, si, hi, di)); }
  void set(int bi, int si, int hi, int di, double v) { set_raw(offset(bi, si, hi, di), v); }
  void poison() {
    for (std::size_t e = 0; e < elements(); ++e) set_raw(e, NAN);
  }

  // Contiguous BSHD double copy of the logical view.
  std::vector<double> to_double() const {
    std::vector<double> out(std::size_t(b) * s * h * d);
    std::size_t t = 0;
    for (int bi = 0; bi < b; ++bi)
      for (int si = 0; si < s; ++si)
        for (int hi = 0; hi < h; ++hi)
          for (int di = 0; di < d; ++di) out[t++] = get(bi, si, hi, di);
    return out;
  }
  void fill_normal(std::mt19937& rng, double stddev = 1.0) {
    std::normal_distribution<double> dist(0.0, stddev);
    for (int bi = 0; bi < b; ++bi)
      for (int si = 0; si < s; ++si)
        for (int hi = 0; hi < h; ++hi)
          for (int di = 0; di < d; ++di) set(bi, si, hi, di, dist(rng));
  }
  // Number of logical elements that are NaN (i.e. never written).
  std::size_t count_nan() const {
    std::size_t n = 0;
    for (double x : to_double()) n += std::isnan(x);
    return n;
  }
  // Elements outside the logical view that are no longer NaN (stray writes).
  std::size_t count_outside_written() const {
    std::vector<char> inside(elements(), 0);
    for (int bi = 0; bi < b; ++bi)
      for (int si = 0; si < s; ++si)
        for (int hi = 0; hi < h; ++hi)
          for (int di = 0; di < d; ++di) inside[offset(bi, si, hi, di)] = 1;
    std::size_t n = 0;
    for (std::size_t e = 0; e < elements(); ++e) n += !inside[e] && !std::isnan(get_raw(e));
    return n;
  }
};

inline double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double x = a[i], y = b[i];
    if (std::isinf(x) || std::isinf(y)) {
      if (x != y) return INFINITY;
      continue;
    }
    const double e = std::fabs(x - y);
    if (std::isnan(e)) return NAN;
    m = std::max(m, e);
  }
  return m;
}

// One kernel test problem (the CPU and the emulated Metal kernel suites share it).
enum class Causal { kNone, kBottomRight, kTopLeft };

struct Case {
  int b, sq, sk, hq, hkv, d;
  DType dt = DType::kFloat32;
  Causal causal = Causal::kNone;
  Layout layout = Layout::kBSHD;
  float dropout = 0.0f;
  std::uint32_t seed = 1;
  // Dropout's global coordinates (FwdParams::dropout_*): row, col, head offsets, heads.
  int drop_row = 0, drop_col = 0, drop_head = 0, drop_heads = 0;

  std::string name() const {
    std::ostringstream os;
    os << dtype_name(dt) << "_b" << b << "_sq" << sq << "_sk" << sk << "_hq" << hq << "_hkv" << hkv
       << "_d" << d << (causal == Causal::kNone ? "" : causal == Causal::kBottomRight ? "_causalBR" : "_causalTL")
       << "_" << layout_name(layout);
    if (dropout > 0) os << "_drop" << int(dropout * 100);
    if (drop_row || drop_col || drop_head || drop_heads)
      os << "_at" << drop_row << "x" << drop_col << "h" << drop_head << "of" << drop_heads;
    return os.str();
  }
};

}  // namespace orchard::test
