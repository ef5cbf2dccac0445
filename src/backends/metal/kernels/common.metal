// Shared pieces of Orchard's Metal kernels. The C++ core (metal_variant.cpp) prepends a
// prelude that fixes the variant: elem_t (half, bfloat or float), kBlockD (the head-dim
// bucket: rows of every threadgroup tile are kBlockD floats, columns >= d zero-filled),
// the tile sizes of each kernel and the kMeta* indices below. compile_shader offers no
// function constants and no dynamic threadgroup memory, so all of it is baked into the
// source text and each variant is compiled once.
#include <metal_stdlib>
using namespace metal;

// Every integer parameter (sizes, element strides, causal/dropout settings) arrives in
// one int64 buffer, `meta`, indexed by kMeta*: Metal has 31 buffer slots per kernel and
// the backward needs over 40 scalars. Floats travel as their bit patterns.
inline float meta_float(device const long* meta, int index) { return as_type<float>(uint(meta[index])); }

// Copies rows [row0, row0 + rows) of one head of a strided tensor into a threadgroup
// tile of rows x kBlockD floats (row-major), zero-filling rows >= nrows and columns >= d,
// so tails and head dims below the bucket need no special cases in the products.
template <typename TgFloatPtr>
inline void load_tile(TgFloatPtr dst, device const elem_t* src, long row_stride, int row0, int rows, int nrows, int d,
                      uint tid, uint nthreads) {
  for (int e = int(tid); e < rows * kBlockD; e += int(nthreads)) {
    const int r = e / kBlockD, c = e % kBlockD;
    float x = 0.0f;
    if (row0 + r < nrows && c < d) x = float(src[long(row0 + r) * row_stride + c]);
    dst[e] = x;
  }
}

// Writes rows [row0, min(row0 + rows, nrows)) and columns [0, d) of a threadgroup tile,
// multiplied by `scale`, to a strided tensor in elem_t.
template <typename TgFloatPtr>
inline void store_tile(device elem_t* dst, TgFloatPtr src, long row_stride, int row0, int rows, int nrows, int d,
                       float scale, uint tid, uint nthreads) {
  for (int e = int(tid); e < rows * kBlockD; e += int(nthreads)) {
    const int r = e / kBlockD, c = e % kBlockD;
    if (row0 + r < nrows && c < d) dst[long(row0 + r) * row_stride + c] = elem_t(src[e] * scale);
  }
}

// Causal visibility: query row i sees key column j iff j <= i + causal_offset
// (offset sk - sq aligns bottom-right, 0 top-left).
inline bool visible(int row, int col, bool causal, long causal_offset) {
  return !causal || long(col) <= long(row) + causal_offset;
}
