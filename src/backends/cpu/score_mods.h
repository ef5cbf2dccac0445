// Score modifiers between S = Q K^T and the softmax: scale, softcap, ALiBi,
// attn_bias (additive or boolean) and the sliding window's left bound. The
// plain path skips all of this and folds the scale into the softmax's exp2
// constant; a tile that needs any modifier is rewritten here into final scores
// in natural units (masked elements -inf) and the softmax then uses c = log2(e).
#pragma once

#include <cstdint>

#include "orchard/dtype.h"
#include "orchard/params.h"

namespace orchard::cpu {

// Modifier constants of one (sequence, q head).
template <class T>
struct ScoreMods {
  T scale = 1;
  T softcap = 0;  // 0 = no softcap
  bool alibi = false;
  T alibi_slope = 0;
  std::int64_t diag = 0;  // the sequence's diagonal (ALiBi distance)
  const void* bias = nullptr;
  DType bias_dtype = DType::kUInt8;
  std::int64_t bias_offset = 0;  // element offset of (batch, head, row 0, col 0)
  std::int64_t bias_row_stride = 0, bias_col_stride = 0;

  // Whether any per-element value modifier is set (the window alone is per tile).
  bool any() const { return softcap > 0 || alibi || bias != nullptr; }
};

template <class T>
ScoreMods<T> score_mods_for(const FwdParams& p, const SeqSpan& s, int bi, int h);

// Rewrites raw q.k scores of a tile (rows x bc, ld bc; query rows i0 + r,
// key columns j0 + j, local to the sequence) into final scores in natural
// units over columns [first[r], end[r]); columns before first[r] become -inf,
// those from end[r] on may hold anything finite (the softmax masks them). With `dcap`
// (backward, softcap set) it also stores 1 - tanh^2 there, the softcap's
// derivative, for softcap_grad.
void apply_score_mods(const ScoreMods<float>& m, float* s, int rows, int bc, std::int64_t i0,
                      std::int64_t j0, const int* first, const int* end, float* dcap);
void apply_score_mods(const ScoreMods<double>& m, double* s, int rows, int bc, std::int64_t i0,
                      std::int64_t j0, const int* first, const int* end, double* dcap);

// Whether a boolean attn_mask hides every element of the tile (query rows i0 .. i0 + rows - 1,
// key columns j0 .. j0 + cols - 1, local to the sequence): such a tile adds nothing to any row's
// softmax (its P is 0), so the forward skips its GEMMs and softmax, which leaves O and the row
// state exactly as processing it would. False without a boolean mask. A row-broadcast mask (row
// stride 0: a key-padding mask) reads one row.
template <class T>
bool bool_mask_hides_tile(const ScoreMods<T>& m, std::int64_t i0, int rows, std::int64_t j0, int cols);

// dS *= 1 - tanh^2 over the same columns: the gradient through the softcap
// (the scale itself is applied when dQ / dK are stored, as on the plain path).
void softcap_grad(float* ds, const float* dcap, int rows, int bc, const int* first, const int* end);
void softcap_grad(double* ds, const double* dcap, int rows, int bc, const int* first,
                  const int* end);

}  // namespace orchard::cpu
