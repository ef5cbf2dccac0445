// Each modifier is its own pass over a row's visible columns, chosen per row,
// so the inner loops carry no feature branches.
#include "backends/cpu/score_mods.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "backends/cpu/simd.h"
#include "orchard/numeric.h"

namespace orchard::cpu {
namespace {

// Adds convert(bias[j0 + j]) to sr[j] for j in [first, end); a contiguous
// row (column stride 1, the common case) gets a loop the compiler vectorises.
template <class T, class Raw, class Convert>
void add_bias_cols(T* sr, const void* base, std::int64_t row, std::int64_t cs, std::int64_t j0,
                   int first, int end, Convert convert) {
  const Raw* b = static_cast<const Raw*>(base) + row;
  if (cs == 1) {
    for (int j = first; j < end; ++j) sr[j] += convert(b[j0 + j]);
  } else {
    for (int j = first; j < end; ++j) sr[j] += convert(b[(j0 + j) * cs]);
  }
}

// Adds one bias row (columns [first, end) of the tile) to sr.
template <class T>
void add_bias_row(const ScoreMods<T>& m, T* sr, std::int64_t i, std::int64_t j0, int first, int end) {
  const std::int64_t row = m.bias_offset + i * m.bias_row_stride;
  const std::int64_t cs = m.bias_col_stride;
  const T ninf = -std::numeric_limits<T>::infinity();
  switch (m.bias_dtype) {
    case DType::kUInt8:  // boolean mask: 0 = may not attend (adds -inf, else 0)
      add_bias_cols<T, std::uint8_t>(sr, m.bias, row, cs, j0, first, end,
                                     [ninf](std::uint8_t x) { return x ? T(0) : ninf; });
      break;
    case DType::kFloat16:
      add_bias_cols<T, std::uint16_t>(sr, m.bias, row, cs, j0, first, end,
                                      [](std::uint16_t x) { return static_cast<T>(fp16_to_float(x)); });
      break;
    case DType::kBFloat16:
      add_bias_cols<T, std::uint16_t>(sr, m.bias, row, cs, j0, first, end,
                                      [](std::uint16_t x) { return static_cast<T>(bf16_to_float(x)); });
      break;
    case DType::kFloat32:
      add_bias_cols<T, float>(sr, m.bias, row, cs, j0, first, end, [](float x) { return static_cast<T>(x); });
      break;
    case DType::kFloat64:
      add_bias_cols<T, double>(sr, m.bias, row, cs, j0, first, end, [](double x) { return static_cast<T>(x); });
      break;
    default: break;
  }
}

// softcap * tanh(in * x) over a whole fp32 tile row (bc % 8 == 0), and
// 1 - tanh^2 into dr when given. std::tanh made a softcapped forward 4x
// slower than a plain one (fp32 s1024 d64, one core: 141 vs 35 ms); this is
// tanh|y| = (1 - e) / (1 + e), e = 2^(-2 log2(e) |y|) from the vector exp2.
// Its error is absolute, ~1e-7 (relative near 0): the score error is
// ~1e-7 * softcap, a couple of ulps of the largest scores, which is what the
// softmax sees.
ORCHARD_CPU_CLONES
void softcap_row_f32(float* sr, float* dr, int bc, float in, float cap) {
  constexpr float kMinus2Log2e = -2.8853900817779268f;
  for (int j = 0; j < bc; j += 8) {
    const vf32 y = vload<vf32>(sr + j) * in;
    const vf32 a = y < 0.0f ? -y : y;
    const vf32 e = exp2_f32(a * kMinus2Log2e);
    vf32 t = (1.0f - e) / (1.0f + e);
    t = y < 0.0f ? -t : t;
    vstore(sr + j, t * cap);
    if (dr) vstore(dr + j, 1.0f - t * t);
  }
}

template <class T>
void softcap_row(T* sr, T* dr, int first, int end, int bc, T in, T cap) {
  if constexpr (sizeof(T) == 4) {
    (void)first; (void)end;
    softcap_row_f32(sr, dr, bc, in, cap);  // the whole row: vector width, no tail
  } else {
    for (int j = first; j < end; ++j) {
      const T t = std::tanh(sr[j] * in);
      sr[j] = cap * t;
      if (dr) dr[j] = T(1) - t * t;
    }
  }
}

template <class T>
void apply_impl(const ScoreMods<T>& m, T* s, int rows, int bc, std::int64_t i0, std::int64_t j0,
                const int* first, const int* end, T* dcap) {
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int r = 0; r < rows; ++r) {
    T* sr = s + std::int64_t(r) * bc;
    const int f = first[r], e = end[r];
    const std::int64_t i = i0 + r;
    if (m.softcap > 0) {
      // softcap * tanh(scale * x / softcap), with the two constants folded.
      softcap_row(sr, dcap ? dcap + std::int64_t(r) * bc : nullptr, f, e, bc, m.scale / m.softcap,
                  m.softcap);
    } else {
      for (int j = f; j < e; ++j) sr[j] *= m.scale;
    }
    if (m.alibi) {
      // -slope * |i + diag - j|, split at the diagonal so each loop is linear
      // in an int column index (vectorises; int64 -> float does not on AVX2).
      const std::int64_t at = i + m.diag - j0;  // tile column of the diagonal
      const T at_t = static_cast<T>(at), slope = m.alibi_slope;
      const int split = static_cast<int>(std::clamp<std::int64_t>(at + 1, f, e));
      for (int j = f; j < split; ++j) sr[j] -= slope * (at_t - static_cast<T>(j));
      for (int j = split; j < e; ++j) sr[j] -= slope * (static_cast<T>(j) - at_t);
    }
    if (m.bias) add_bias_row(m, sr, i, j0, f, e);
    for (int j = 0; j < f; ++j) sr[j] = ninf;  // last: the softcap pass may cover the whole row
  }
}

template <class T>
void softcap_grad_impl(T* ds, const T* dcap, int rows, int bc, const int* first, const int* end) {
  for (int r = 0; r < rows; ++r) {
    T* dr = ds + std::int64_t(r) * bc;
    const T* cr = dcap + std::int64_t(r) * bc;
    for (int j = first[r]; j < end[r]; ++j) dr[j] *= cr[j];
  }
}

}  // namespace

template <class T>
ScoreMods<T> score_mods_for(const FwdParams& p, const SeqSpan& s, int bi, int h) {
  ScoreMods<T> m;
  const bool f64 = sizeof(T) == 8;
  m.scale = static_cast<T>(f64 ? p.scale_f64 : static_cast<double>(p.scale));
  if (p.softcap > 0.0f || p.softcap_f64 > 0.0)
    m.softcap = static_cast<T>(f64 && p.softcap_f64 > 0.0 ? p.softcap_f64 : static_cast<double>(p.softcap));
  m.diag = s.diag;
  if (p.alibi_slopes) {
    m.alibi = true;
    m.alibi_slope = static_cast<T>(p.alibi_slopes[bi * p.alibi_batch_stride + h]);
  }
  if (p.attn_bias) {
    m.bias = p.attn_bias;
    m.bias_dtype = p.attn_bias_dtype;
    m.bias_offset = bi * p.bias_batch_stride + h * p.bias_head_stride;
    m.bias_row_stride = p.bias_row_stride;
    m.bias_col_stride = p.bias_col_stride;
  }
  return m;
}
template ScoreMods<float> score_mods_for<float>(const FwdParams&, const SeqSpan&, int, int);
template ScoreMods<double> score_mods_for<double>(const FwdParams&, const SeqSpan&, int, int);

template <class T>
bool bool_mask_hides_tile(const ScoreMods<T>& m, std::int64_t i0, int rows, std::int64_t j0, int cols) {
  if (m.bias == nullptr || m.bias_dtype != DType::kUInt8) return false;
  const auto* base = static_cast<const std::uint8_t*>(m.bias) + m.bias_offset;
  const int scanned = m.bias_row_stride == 0 ? 1 : rows;
  for (int r = 0; r < scanned; ++r) {
    const std::uint8_t* row = base + (i0 + r) * m.bias_row_stride + j0 * m.bias_col_stride;
    if (m.bias_col_stride == 1) {
      for (int j = 0; j < cols; ++j)
        if (row[j] != 0) return false;
    } else {
      for (int j = 0; j < cols; ++j)
        if (row[j * m.bias_col_stride] != 0) return false;
    }
  }
  return true;
}
template bool bool_mask_hides_tile<float>(const ScoreMods<float>&, std::int64_t, int, std::int64_t, int);
template bool bool_mask_hides_tile<double>(const ScoreMods<double>&, std::int64_t, int, std::int64_t, int);

void apply_score_mods(const ScoreMods<float>& m, float* s, int rows, int bc, std::int64_t i0,
                      std::int64_t j0, const int* first, const int* end, float* dcap) {
  apply_impl(m, s, rows, bc, i0, j0, first, end, dcap);
}
void apply_score_mods(const ScoreMods<double>& m, double* s, int rows, int bc, std::int64_t i0,
                      std::int64_t j0, const int* first, const int* end, double* dcap) {
  apply_impl(m, s, rows, bc, i0, j0, first, end, dcap);
}
void softcap_grad(float* ds, const float* dcap, int rows, int bc, const int* first, const int* end) {
  softcap_grad_impl(ds, dcap, rows, bc, first, end);
}
void softcap_grad(double* ds, const double* dcap, int rows, int bc, const int* first,
                  const int* end) {
  softcap_grad_impl(ds, dcap, rows, bc, first, end);
}

}  // namespace orchard::cpu
