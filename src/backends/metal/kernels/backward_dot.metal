// Backward, step 1: delta[b, h, i] = rowsum(dO * O) over the d_v columns, in fp32 (the softmax backward's
// D_i = sum_j P_ij dP_ij, dropout included), one thread per query row, into a contiguous
// (b, hq, sq) float workspace.
constant constexpr int kDotThreads = 128;

kernel void orchard_bwd_dot(device const elem_t* out [[buffer(0)]], device const elem_t* dout [[buffer(1)]],
                            device float* delta [[buffer(2)]], device const long* meta [[buffer(3)]],
                            uint tg_index [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]],
                            uint sg [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]]) {
  const int sq = int(meta[kMetaSq]), hq = int(meta[kMetaHq]), d_v = int(meta[kMetaDv]);
  const long index = long(tg_index) * kDotThreads + long(tid);
  if (index >= long(meta[kMetaB]) * hq * sq) return;
  const int row = int(index % sq), h = int(index / sq % hq), bi = int(index / sq / hq);
  device const elem_t* o = out + bi * meta[kMetaOBatch] + h * meta[kMetaOHead] + row * meta[kMetaORow];
  device const elem_t* g = dout + bi * meta[kMetaDoBatch] + h * meta[kMetaDoHead] + row * meta[kMetaDoRow];
  float sum = 0.0f;
  for (int c = 0; c < d_v; ++c) sum += float(o[c]) * float(g[c]);
  delta[index] = sum;
}
