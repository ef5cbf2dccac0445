// fp32 versions use explicit 8-lane vectors and a polynomial exp2 (libm's
// expf does not vectorise without -ffast-math); fp64 versions are plain
// loops with std::exp2 — fp64 exists for gradcheck, not speed.
#include "backends/cpu/softmax_tile.h"

#include <cmath>
#include <limits>

#include "backends/cpu/simd.h"

namespace orchard::cpu {

ORCHARD_CPU_CLONES
void softmax_tile_update(float* s, int rows, int bc, const int* nv, float c, float* m, float* l,
                         float* o, std::int64_t ldo, int dp) {
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int r = 0; r < rows; ++r) {
    float* sr = s + std::int64_t(r) * bc;
    const int n = nv[r];
    const float nvf = static_cast<float>(n);
    // Row max of c*s over the valid columns. Interior tiles (n == bc, the
    // common case) skip the column mask: that pass was ~1/4 of this function.
    vf32 vmax = vf32{} + ninf;
    if (n == bc) {
      for (int j = 0; j < bc; j += 8) {
        const vf32 x = vload<vf32>(sr + j) * c;
        vmax = (x > vmax) | (x != x) ? x : vmax;  // NaN-propagating
      }
    } else {
      for (int j = 0; j < bc; j += 8) {
        const vf32 col = iota_f32() + static_cast<float>(j);
        const vf32 x = col < nvf ? vload<vf32>(sr + j) * c : vf32{} + ninf;
        vmax = (x > vmax) | (x != x) ? x : vmax;  // NaN-propagating
      }
    }
    const float m_old = m[r];
    const float tile_max = hmax(vmax);
    const float m_new = (tile_max > m_old || tile_max != tile_max) ? tile_max : m_old;
    if (m_new == ninf) {  // nothing visible yet in this row
      for (int j = 0; j < bc; ++j) sr[j] = 0.0f;
      continue;
    }
    vf32 vsum = vf32{};
    if (n == bc) {
      for (int j = 0; j < bc; j += 8) {
        const vf32 p = exp2_f32(vload<vf32>(sr + j) * c - m_new);
        vstore(sr + j, p);
        vsum += p;
      }
    } else {
      for (int j = 0; j < bc; j += 8) {
        const vf32 col = iota_f32() + static_cast<float>(j);
        vf32 p = exp2_f32(vload<vf32>(sr + j) * c - m_new);
        p = col < nvf ? p : vf32{};
        vstore(sr + j, p);
        vsum += p;
      }
    }
    const float alpha = m_old == ninf ? 0.0f : std::exp2(m_old - m_new);
    l[r] = l[r] * alpha + hsum(vsum);
    m[r] = m_new;
    if (alpha != 1.0f) {
      float* orow = o + r * ldo;
      for (int j = 0; j < dp; j += 8) vstore(orow + j, vload<vf32>(orow + j) * alpha);
    }
  }
}

void softmax_tile_update(double* s, int rows, int bc, const int* nv, double c, double* m,
                         double* l, double* o, std::int64_t ldo, int dp) {
  const double ninf = -std::numeric_limits<double>::infinity();
  for (int r = 0; r < rows; ++r) {
    double* sr = s + std::int64_t(r) * bc;
    const int n = nv[r];
    double tile_max = ninf;
    for (int j = 0; j < bc; ++j) {
      sr[j] = j < n ? sr[j] * c : ninf;
      if (sr[j] > tile_max || std::isnan(sr[j])) tile_max = sr[j];  // NaN-propagating
    }
    const double m_old = m[r];
    const double m_new = (tile_max > m_old || std::isnan(tile_max)) ? tile_max : m_old;
    if (m_new == ninf) {
      for (int j = 0; j < bc; ++j) sr[j] = 0.0;
      continue;
    }
    double sum = 0.0;
    for (int j = 0; j < bc; ++j) {
      sr[j] = j < n ? std::exp2(sr[j] - m_new) : 0.0;
      sum += sr[j];
    }
    const double alpha = m_old == ninf ? 0.0 : std::exp2(m_old - m_new);
    l[r] = l[r] * alpha + sum;
    m[r] = m_new;
    double* orow = o + r * ldo;
    for (int j = 0; j < dp; ++j) orow[j] *= alpha;
  }
}

ORCHARD_CPU_CLONES
void backward_tile(float* s, float* dp, int rows, int bc, const int* nv, float c,
                   const float* lse2, const float* dsum, const std::uint8_t* keep, float rp) {
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int r = 0; r < rows; ++r) {
    float* sr = s + std::int64_t(r) * bc;
    float* dr = dp + std::int64_t(r) * bc;
    const float nvf = static_cast<float>(lse2[r] == ninf ? 0 : nv[r]);
    const float lr = lse2[r] == ninf ? 0.0f : lse2[r];
    const float dr_sum = dsum[r];
    const std::uint8_t* kr = keep ? keep + std::int64_t(r) * bc : nullptr;
    for (int j = 0; j < bc; j += 8) {
      const vf32 col = iota_f32() + static_cast<float>(j);
      const vi32 valid = col < nvf;
      vf32 p = exp2_f32(vload<vf32>(sr + j) * c - lr);
      p = valid ? p : vf32{};
      vf32 d = vload<vf32>(dr + j);
      vf32 pd = p;
      if (kr) {
        typedef std::uint8_t u8x8 __attribute__((vector_size(8)));
        const vf32 km = __builtin_convertvector(vload<u8x8>(kr + j), vf32) * rp;  // keep is 0/1
        pd = p * km;
        d = d * km;
      }
      vstore(sr + j, pd);
      vstore(dr + j, p * (d - dr_sum));
    }
  }
}

void backward_tile(double* s, double* dp, int rows, int bc, const int* nv, double c,
                   const double* lse2, const double* dsum, const std::uint8_t* keep, double rp) {
  const double ninf = -std::numeric_limits<double>::infinity();
  for (int r = 0; r < rows; ++r) {
    double* sr = s + std::int64_t(r) * bc;
    double* dr = dp + std::int64_t(r) * bc;
    const int n = lse2[r] == ninf ? 0 : nv[r];
    const std::uint8_t* kr = keep ? keep + std::int64_t(r) * bc : nullptr;
    for (int j = 0; j < bc; ++j) {
      const double p = j < n ? std::exp2(sr[j] * c - lse2[r]) : 0.0;
      double d = dr[j];
      double pd = p;
      if (kr) {
        const double k = kr[j] ? rp : 0.0;
        pd = p * k;
        d = d * k;
      }
      sr[j] = pd;
      dr[j] = p * (d - dsum[r]);
    }
  }
}

ORCHARD_CPU_CLONES
void apply_dropout(float* p, const std::uint8_t* keep, int n, float rp) {
  // keep is 0/1, so p * (keep * rp) needs no branch or select.
  typedef std::uint8_t u8x8 __attribute__((vector_size(8)));
  int j = 0;
  for (; j + 8 <= n; j += 8) {
    const vf32 k = __builtin_convertvector(vload<u8x8>(keep + j), vf32);
    vstore(p + j, vload<vf32>(p + j) * (k * rp));
  }
  for (; j < n; ++j) p[j] = keep[j] ? p[j] * rp : 0.0f;
}

void apply_dropout(double* p, const std::uint8_t* keep, int n, double rp) {
  for (int j = 0; j < n; ++j) p[j] = keep[j] ? p[j] * rp : 0.0;
}

}  // namespace orchard::cpu
