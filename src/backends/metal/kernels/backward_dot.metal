// Backward, step 1: delta[b, h, i] = rowsum(dO * O) over the d_v columns, in fp32 (the softmax backward's
// D_i = sum_j P_ij dP_ij, dropout included), one thread per query row, into a contiguous
// (b, hq, max sq) float workspace (varlen: rows past a sequence's length hold 0).
constant constexpr int kDotThreads = 128;

kernel void orchard_bwd_dot(device const elem_t* out [[buffer(0)]], device const elem_t* dout [[buffer(1)]],
                            device float* delta [[buffer(2)]], device const long* meta [[buffer(3)]],
                            device const int* cu_q [[buffer(4)]], device const int* cu_k [[buffer(5)]], uint tg_index [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]],
                            uint sg [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]]) {
  const int max_sq = int(meta[kMetaSq]), hq = int(meta[kMetaHq]), d_v = int(meta[kMetaDv]);
  const long index = long(tg_index) * kDotThreads + long(tid);
  if (index >= long(meta[kMetaB]) * hq * max_sq) return;
  const int row = int(index % max_sq), h = int(index / max_sq % hq), bi = int(index / max_sq / hq);
  const SeqSpan span = seq_span(meta, cu_q, cu_k, bi);
  if (row >= span.len_q) {  // (varlen) past this sequence's rows
    delta[index] = 0.0f;
    return;
  }
  const long at = long(span.q_start + row);
  device const elem_t* o = out + bi * meta[kMetaOBatch] + h * meta[kMetaOHead] + at * meta[kMetaORow];
  device const elem_t* g = dout + bi * meta[kMetaDoBatch] + h * meta[kMetaDoHead] + at * meta[kMetaDoRow];
  float sum = 0.0f;
  for (int c = 0; c < d_v; ++c) sum += float(o[c]) * float(g[c]);
  delta[index] = sum;
}
