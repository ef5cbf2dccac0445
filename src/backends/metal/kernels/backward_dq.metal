// Backward, step 2: dQ = scale * dS K over query tiles, no atomics. One threadgroup per
// (batch, query head, tile of kDqBlockQ rows); simdgroup s owns rows [8s, 8s + 8). Q and dO
// stay in simdgroup matrices; for each key tile S = Q K^T and dP = dO V^T go to threadgroup
// memory, every thread turns its share of them into dS = P * (dP' - delta) * f'(x) with
// P = exp(f(x) - LSE), x = scale * S, f the score modifiers (common.metal) and dP' = dP with
// the dropout mask and 1/(1-p) applied, and dS K accumulates in fp32.
constant constexpr int kDqSimdgroups = kDqBlockQ / 8;
constant constexpr int kDqThreads = kDqSimdgroups * 32;
constant constexpr int kDqStageFloats = (kDqBlockQ > 2 * kDqBlockK ? kDqBlockQ : 2 * kDqBlockK) * kBlockD;
constant constexpr int kDqK = 0;
constant constexpr int kDqV = kDqBlockK * kBlockD;
constant constexpr int kDqS = kDqStageFloats;            // S, then dS
constant constexpr int kDqP = kDqS + kDqBlockQ * kDqBlockK;  // dP
constant constexpr int kDqSmemFloats = kDqP + kDqBlockQ * kDqBlockK;

kernel void orchard_bwd_dq(device const elem_t* q [[buffer(0)]], device const elem_t* k [[buffer(1)]],
                           device const elem_t* v [[buffer(2)]], device const elem_t* dout [[buffer(3)]],
                           device const float* lse [[buffer(4)]], device const float* delta [[buffer(5)]],
                           device elem_t* dq [[buffer(6)]], device const long* rng [[buffer(7)]],
                           device const long* meta [[buffer(8)]], device const float* alibi [[buffer(9)]],
                           device const uchar* mask_bool [[buffer(10)]], device const elem_t* mask_elem [[buffer(11)]],
                           device const float* mask_float [[buffer(12)]], device const int* cu_q [[buffer(13)]],
                           device const int* cu_k [[buffer(14)]], uint tg_index [[threadgroup_position_in_grid]],
                           uint tid [[thread_index_in_threadgroup]], uint sg [[simdgroup_index_in_threadgroup]],
                           uint lane [[thread_index_in_simdgroup]]) {
  threadgroup float smem[kDqSmemFloats];
  const int max_sq = int(meta[kMetaSq]), hq = int(meta[kMetaHq]), d = int(meta[kMetaD]);
  const int d_v = int(meta[kMetaDv]);  // V and dO columns
  const int group_size = hq / int(meta[kMetaHkv]);
  const bool dropout = meta[kMetaDropout] != 0;
  const uint keep_threshold = uint(meta[kMetaKeepThreshold]);
  const float scale = meta_float(meta, kMetaScaleBits), rescale = meta_float(meta, kMetaRpBits);

  const int q_tiles = (max_sq + kDqBlockQ - 1) / kDqBlockQ;
  const int q0 = int(tg_index) % q_tiles * kDqBlockQ;
  const int batch_head = int(tg_index) / q_tiles;
  const int h = batch_head % hq, bi = batch_head / hq, kh = h / group_size;
  const SeqSpan span = seq_span(meta, cu_q, cu_k, bi);
  if (q0 >= span.len_q) return;  // (varlen) past this sequence's rows: the whole threadgroup leaves
  const int sq = span.len_q, sk = span.len_k;
  device const float* lse_h = lse + bi * meta[kMetaLseBatch] + h * meta[kMetaLseHead] + span.q_start;
  device const float* delta_h = delta + long(batch_head) * max_sq;  // (b, hq, max sq), local rows
  device const elem_t* kh_ptr = k + bi * meta[kMetaKBatch] + kh * meta[kMetaKHead] + span.k_start * meta[kMetaKRow];
  device const elem_t* vh = v + bi * meta[kMetaVBatch] + kh * meta[kMetaVHead] + span.k_start * meta[kMetaVRow];
  const long q_rows = span.q_start * meta[kMetaQRow], do_rows = span.q_start * meta[kMetaDoRow];
  const ScoreMods mods = score_mods(meta, span, alibi, mask_bool, mask_elem, mask_float, bi, h);

  simdgroup_float8x8 qf[kBlockD / 8];
  simdgroup_float8x8 gf[kBlockD / 8];  // dO
  simdgroup_float8x8 acc[kBlockD / 8];
  load_tile(smem, q + bi * meta[kMetaQBatch] + h * meta[kMetaQHead] + q_rows, meta[kMetaQRow], q0, kDqBlockQ, sq, d,
            tid, kDqThreads);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int c = 0; c < kBlockD / 8; ++c) simdgroup_load(qf[c], smem + int(sg) * 8 * kBlockD + c * 8, kBlockD);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  load_tile(smem, dout + bi * meta[kMetaDoBatch] + h * meta[kMetaDoHead] + do_rows, meta[kMetaDoRow], q0, kDqBlockQ, sq,
            d_v, tid, kDqThreads);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int c = 0; c < kBlockD / 8; ++c) {
    simdgroup_load(gf[c], smem + int(sg) * 8 * kBlockD + c * 8, kBlockD);
    acc[c] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  }

  int k_begin, k_end;
  visible_key_range(mods, q0, kDqBlockQ, sk, kDqBlockK, k_begin, k_end);
  for (int k0 = k_begin; k0 < k_end; k0 += kDqBlockK) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
    load_tile(smem + kDqK, kh_ptr, meta[kMetaKRow], k0, kDqBlockK, sk, d, tid, kDqThreads);
    load_tile(smem + kDqV, vh, meta[kMetaVRow], k0, kDqBlockK, sk, d_v, tid, kDqThreads);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int n = 0; n < kDqBlockK / 8; ++n) {
      simdgroup_float8x8 s = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      simdgroup_float8x8 dp = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      for (int c = 0; c < kBlockD / 8; ++c) {
        simdgroup_float8x8 t;
        simdgroup_load(t, smem + kDqK + n * 8 * kBlockD + c * 8, kBlockD, ulong2(0, 0), true);
        simdgroup_multiply_accumulate(s, qf[c], t, s);
        simdgroup_load(t, smem + kDqV + n * 8 * kBlockD + c * 8, kBlockD, ulong2(0, 0), true);
        simdgroup_multiply_accumulate(dp, gf[c], t, dp);
      }
      simdgroup_store(s, smem + kDqS + int(sg) * 8 * kDqBlockK + n * 8, kDqBlockK);
      simdgroup_store(dp, smem + kDqP + int(sg) * 8 * kDqBlockK + n * 8, kDqBlockK);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int e = int(tid); e < kDqBlockQ * kDqBlockK; e += kDqThreads) {
      const int row = q0 + e / kDqBlockK, col = k0 + e % kDqBlockK;
      float ds = 0.0f;
      if (row < sq && col < sk && visible(mods, row, col)) {
        const float x = smem[kDqS + e] * scale;
        const float p = prob_of(final_score(mods, x, row, col), lse_h[row]);
        float dp = smem[kDqP + e];
        if (dropout) dp = dropout_keep_at(rng, meta, bi, h, row, col, keep_threshold) ? dp * rescale : 0.0f;
        ds = p * (dp - delta_h[row]) * final_score_grad(mods, x);
      }
      smem[kDqS + e] = ds;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int n = 0; n < kDqBlockK / 8; ++n) {
      simdgroup_float8x8 ds;
      simdgroup_load(ds, smem + kDqS + int(sg) * 8 * kDqBlockK + n * 8, kDqBlockK);
      for (int c = 0; c < kBlockD / 8; ++c) {
        simdgroup_float8x8 kt;
        simdgroup_load(kt, smem + kDqK + n * 8 * kBlockD + c * 8, kBlockD);
        simdgroup_multiply_accumulate(acc[c], ds, kt, acc[c]);
      }
    }
  }

  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int c = 0; c < kBlockD / 8; ++c) simdgroup_store(acc[c], smem + int(sg) * 8 * kBlockD + c * 8, kBlockD);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  store_tile(dq + bi * meta[kMetaDqBatch] + h * meta[kMetaDqHead] + span.q_start * meta[kMetaDqRow], smem,
             meta[kMetaDqRow], q0, kDqBlockQ, sq, d, scale, tid, kDqThreads);
}
