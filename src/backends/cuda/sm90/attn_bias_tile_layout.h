// Where a dense attn_bias tile lives in the sm90 kernels' bias stages, and which of its elements
// each consumer lane reads into which score register (attn_bias_tiles.cuh): the forward's scores
// (rows = queries) and the backward's transposed ones (S^T: rows = keys).  Host and device code,
// no CUDA headers: tests/cpp/attn_bias_tile_layout_test.cpp replays the TMA boxes and the
// ldmatrix delivery on the host for every tile shape.
//
// The stage: boxes of kBiasBoxBytes bytes of keys x kRows rows, box after box along the keys, rows
// kBiasBoxBytes apart (TMA, no swizzle).  The scores: the wgmma accumulator layout, s[i] = row
// 8 ((i / 2) % 2) + g of the warp's 16, column 8 (i / 4) + 2t + (i % 2) of the key tile (g = lane / 4,
// t = lane % 4).
#pragma once

#include "orchard/config.h"

namespace orchard::sm90 {

constexpr int kBiasBoxBytes = 32;

// Byte offset of (row, byte column) in a stage of kRows rows.
template <int kRows>
ORCHARD_HOST_DEVICE constexpr int bias_stage_offset(int row, int byte_col) {
  return (byte_col / kBiasBoxBytes) * (kRows * kBiasBoxBytes) + row * kBiasBoxBytes + byte_col % kBiasBoxBytes;
}

// Boxes per key tile of kBN keys for a bias of `elem_bytes` (1 or 2).
template <int kBN>
ORCHARD_HOST_DEVICE constexpr int bias_boxes(int elem_bytes) {
  return kBN * elem_bytes / kBiasBoxBytes;
}

// 16-bit kinds, one ldmatrix.x4 per two 8-key blocks j, j + 1: lane L gives the address of row L % 8
// of matrix q = L / 8, which is row 8 (q % 2) + L % 8 of the warp's 16 and key block j + q / 2 ...
ORCHARD_HOST_DEVICE constexpr int bias_ldmatrix_row(int lane) { return 8 * ((lane / 8) % 2) + lane % 8; }
ORCHARD_HOST_DEVICE constexpr int bias_ldmatrix_byte_col(int lane, int j) { return 16 * (j + lane / 16); }
// ... and register m of the four then holds the pair s[i], s[i + 1] for i = this.
ORCHARD_HOST_DEVICE constexpr int bias_ldmatrix_score(int j, int m) { return 4 * (j + m / 2) + 2 * (m % 2); }

// The backward's S^T (s[i] = key kw + g + 8 ((i / 2) % 2), query 8 (i / 4) + 2t + (i % 2) of the
// step; kw = the warp's first key in the tile): the stage holds queries x keys, so an 8 x 8 block
// of it read by ldmatrix.x4.trans gives lane (g, t) the pair (queries 2t, 2t + 1; key g), which is
// a pair s[i], s[i + 1].  Per two 8-query blocks j, j + 1: lane L addresses query row 8 (j + L / 16)
// + L % 8 at the 16 bytes of keys kw + 8 ((L / 8) % 2), and register m holds the pair at
// bias_ldmatrix_score(j, m) (16-bit kinds; a boolean mask is read a byte per element).
ORCHARD_HOST_DEVICE constexpr int bias_trans_ldmatrix_row(int lane, int j) { return 8 * (j + lane / 16) + lane % 8; }
ORCHARD_HOST_DEVICE constexpr int bias_trans_ldmatrix_byte_col(int lane, int kw) {
  return 2 * (kw + 8 * ((lane / 8) % 2));
}

}  // namespace orchard::sm90
