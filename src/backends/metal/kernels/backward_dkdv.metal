// Backward, step 3: dK = scale * dS^T Q and dV = P'^T dO over key tiles, no atomics. One
// threadgroup per (batch, key/value head, tile of kDkvBlockK key rows); simdgroup s owns keys
// [8s, 8s + 8) and keeps K, V, dK and dV in simdgroup matrices. It walks every query head of
// its GQA group and every query tile that can see the keys (causal / window skip the rest): S^T = K Q^T
// and dP^T = V dO^T go to threadgroup memory, each thread turns its share into
// P'^T (dropped and rescaled probabilities) and dS^T, and both products accumulate in fp32.
constant constexpr int kDkvSimdgroups = kDkvBlockK / 8;
constant constexpr int kDkvThreads = kDkvSimdgroups * 32;
constant constexpr int kDkvStageFloats = (kDkvBlockK > 2 * kDkvBlockQ ? kDkvBlockK : 2 * kDkvBlockQ) * kBlockD;
constant constexpr int kDkvQ = 0;                         // Q tile
constant constexpr int kDkvG = kDkvBlockQ * kBlockD;      // dO tile
constant constexpr int kDkvS = kDkvStageFloats;           // S^T, then P'^T
constant constexpr int kDkvP = kDkvS + kDkvBlockK * kDkvBlockQ;  // dP^T, then dS^T
constant constexpr int kDkvSmemFloats = kDkvP + kDkvBlockK * kDkvBlockQ;

kernel void orchard_bwd_dkdv(device const elem_t* q [[buffer(0)]], device const elem_t* k [[buffer(1)]],
                             device const elem_t* v [[buffer(2)]], device const elem_t* dout [[buffer(3)]],
                             device const float* lse [[buffer(4)]], device const float* delta [[buffer(5)]],
                             device elem_t* dk [[buffer(6)]], device elem_t* dv [[buffer(7)]],
                             device const long* rng [[buffer(8)]], device const long* meta [[buffer(9)]],
                             device const float* alibi [[buffer(10)]], device const uchar* mask_bool [[buffer(11)]],
                             device const elem_t* mask_elem [[buffer(12)]], device const float* mask_float [[buffer(13)]],
                             device const int* cu_q [[buffer(14)]], device const int* cu_k [[buffer(15)]],
                             uint tg_index [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]],
                             uint sg [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]]) {
  threadgroup float smem[kDkvSmemFloats];
  const int max_sq = int(meta[kMetaSq]), max_sk = int(meta[kMetaSk]), hq = int(meta[kMetaHq]);
  const int d = int(meta[kMetaD]), d_v = int(meta[kMetaDv]);  // V, dO and dV: d_v columns
  const int hkv = int(meta[kMetaHkv]), group_size = hq / hkv;
  const bool dropout = meta[kMetaDropout] != 0;
  const uint keep_threshold = uint(meta[kMetaKeepThreshold]);
  const float scale = meta_float(meta, kMetaScaleBits), rescale = meta_float(meta, kMetaRpBits);

  const int k_tiles = (max_sk + kDkvBlockK - 1) / kDkvBlockK;
  const int k0 = int(tg_index) % k_tiles * kDkvBlockK;
  const int batch_kv_head = int(tg_index) / k_tiles;
  const int kh = batch_kv_head % hkv, bi = batch_kv_head / hkv;
  const SeqSpan span = seq_span(meta, cu_q, cu_k, bi);
  if (k0 >= span.len_k) return;  // (varlen) past this sequence's keys: the whole threadgroup leaves
  const int sq = span.len_q, sk = span.len_k;
  const long k_rows = span.k_start * meta[kMetaKRow], v_rows = span.k_start * meta[kMetaVRow];

  simdgroup_float8x8 kf[kBlockD / 8];
  simdgroup_float8x8 vf[kBlockD / 8];
  simdgroup_float8x8 dk_acc[kBlockD / 8];
  simdgroup_float8x8 dv_acc[kBlockD / 8];
  load_tile(smem, k + bi * meta[kMetaKBatch] + kh * meta[kMetaKHead] + k_rows, meta[kMetaKRow], k0, kDkvBlockK, sk, d,
            tid, kDkvThreads);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int c = 0; c < kBlockD / 8; ++c) simdgroup_load(kf[c], smem + int(sg) * 8 * kBlockD + c * 8, kBlockD);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  load_tile(smem, v + bi * meta[kMetaVBatch] + kh * meta[kMetaVHead] + v_rows, meta[kMetaVRow], k0, kDkvBlockK, sk, d_v,
            tid, kDkvThreads);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int c = 0; c < kBlockD / 8; ++c) {
    simdgroup_load(vf[c], smem + int(sg) * 8 * kBlockD + c * 8, kBlockD);
    dk_acc[c] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    dv_acc[c] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  }

  for (int h = kh * group_size; h < (kh + 1) * group_size; ++h) {
    // Query rows outside [q_begin, q_end) see none of these keys (causal / window).
    const ScoreMods mods = score_mods(meta, span, alibi, mask_bool, mask_elem, mask_float, bi, h);
    int q_begin, q_end;
    visible_query_range(mods, k0, kDkvBlockK, sq, kDkvBlockQ, q_begin, q_end);
    const int batch_head = bi * hq + h;
    device const elem_t* qh = q + bi * meta[kMetaQBatch] + h * meta[kMetaQHead] + span.q_start * meta[kMetaQRow];
    device const elem_t* gh = dout + bi * meta[kMetaDoBatch] + h * meta[kMetaDoHead] + span.q_start * meta[kMetaDoRow];
    device const float* lse_h = lse + bi * meta[kMetaLseBatch] + h * meta[kMetaLseHead] + span.q_start;
    device const float* delta_h = delta + long(batch_head) * max_sq;  // (b, hq, max sq), local rows
    for (int q0 = q_begin; q0 < q_end; q0 += kDkvBlockQ) {
      threadgroup_barrier(mem_flags::mem_threadgroup);
      load_tile(smem + kDkvQ, qh, meta[kMetaQRow], q0, kDkvBlockQ, sq, d, tid, kDkvThreads);
      load_tile(smem + kDkvG, gh, meta[kMetaDoRow], q0, kDkvBlockQ, sq, d_v, tid, kDkvThreads);
      threadgroup_barrier(mem_flags::mem_threadgroup);
      for (int n = 0; n < kDkvBlockQ / 8; ++n) {
        simdgroup_float8x8 st = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
        simdgroup_float8x8 dpt = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
        for (int c = 0; c < kBlockD / 8; ++c) {
          simdgroup_float8x8 t;
          simdgroup_load(t, smem + kDkvQ + n * 8 * kBlockD + c * 8, kBlockD, ulong2(0, 0), true);
          simdgroup_multiply_accumulate(st, kf[c], t, st);
          simdgroup_load(t, smem + kDkvG + n * 8 * kBlockD + c * 8, kBlockD, ulong2(0, 0), true);
          simdgroup_multiply_accumulate(dpt, vf[c], t, dpt);
        }
        simdgroup_store(st, smem + kDkvS + int(sg) * 8 * kDkvBlockQ + n * 8, kDkvBlockQ);
        simdgroup_store(dpt, smem + kDkvP + int(sg) * 8 * kDkvBlockQ + n * 8, kDkvBlockQ);
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
      for (int e = int(tid); e < kDkvBlockK * kDkvBlockQ; e += kDkvThreads) {
        const int col = k0 + e / kDkvBlockQ, row = q0 + e % kDkvBlockQ;
        float p_kept = 0.0f, ds = 0.0f;
        if (row < sq && col < sk && visible(mods, row, col)) {
          const float x = smem[kDkvS + e] * scale;
          const float p = prob_of(final_score(mods, x, row, col), lse_h[row]);
          float dp = smem[kDkvP + e];
          p_kept = p;
          if (dropout) {
            const bool keep = dropout_keep_at(rng, meta, bi, h, row, col, keep_threshold);
            p_kept = keep ? p * rescale : 0.0f;
            dp = keep ? dp * rescale : 0.0f;
          }
          ds = p * (dp - delta_h[row]) * final_score_grad(mods, x);
        }
        smem[kDkvS + e] = p_kept;
        smem[kDkvP + e] = ds;
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
      for (int n = 0; n < kDkvBlockQ / 8; ++n) {
        simdgroup_float8x8 pt, dst;
        simdgroup_load(pt, smem + kDkvS + int(sg) * 8 * kDkvBlockQ + n * 8, kDkvBlockQ);
        simdgroup_load(dst, smem + kDkvP + int(sg) * 8 * kDkvBlockQ + n * 8, kDkvBlockQ);
        for (int c = 0; c < kBlockD / 8; ++c) {
          simdgroup_float8x8 t;
          simdgroup_load(t, smem + kDkvG + n * 8 * kBlockD + c * 8, kBlockD);
          simdgroup_multiply_accumulate(dv_acc[c], pt, t, dv_acc[c]);
          simdgroup_load(t, smem + kDkvQ + n * 8 * kBlockD + c * 8, kBlockD);
          simdgroup_multiply_accumulate(dk_acc[c], dst, t, dk_acc[c]);
        }
      }
    }
  }

  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int c = 0; c < kBlockD / 8; ++c) simdgroup_store(dv_acc[c], smem + int(sg) * 8 * kBlockD + c * 8, kBlockD);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  store_tile(dv + bi * meta[kMetaDvBatch] + kh * meta[kMetaDvHead] + span.k_start * meta[kMetaDvRow], smem,
             meta[kMetaDvRow], k0, kDkvBlockK, sk, d_v, 1.0f, tid, kDkvThreads);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int c = 0; c < kBlockD / 8; ++c) simdgroup_store(dk_acc[c], smem + int(sg) * 8 * kBlockD + c * 8, kBlockD);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  store_tile(dk + bi * meta[kMetaDkBatch] + kh * meta[kMetaDkHead] + span.k_start * meta[kMetaDkRow], smem,
             meta[kMetaDkRow], k0, kDkvBlockK, sk, d, scale, tid, kDkvThreads);
}
