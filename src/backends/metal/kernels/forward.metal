// Forward: O = softmax(S) V per (batch, head), and the fp32 LSE; S = scale * Q K^T under the
// score modifiers (common.metal: causal, window, softcap, ALiBi).
// One threadgroup per (batch, query head, tile of kFwdBlockQ query rows); simdgroup s owns
// rows [8s, 8s + 8) of the tile. Q stays in simdgroup matrices for the whole key loop; K and
// V tiles of kFwdBlockK rows pass through threadgroup memory. The online softmax of a row is
// done by one lane (lanes 0..7 of each simdgroup), and the O accumulators are rescaled by
// multiplying with diag(alpha) — the kernels never address single matrix elements, so the
// simdgroup_matrix lane layout cannot leak into the results.
constant constexpr int kFwdSimdgroups = kFwdBlockQ / 8;
constant constexpr int kFwdThreads = kFwdSimdgroups * 32;
constant constexpr int kFwdStageFloats = (kFwdBlockQ > 2 * kFwdBlockK ? kFwdBlockQ : 2 * kFwdBlockK) * kBlockD;
constant constexpr int kFwdK = 0;                                // K tile (during the key loop)
constant constexpr int kFwdV = kFwdBlockK * kBlockD;             // V tile
constant constexpr int kFwdS = kFwdStageFloats;                  // scores / probabilities
constant constexpr int kFwdDiag = kFwdS + kFwdBlockQ * kFwdBlockK;  // one 8x8 diagonal per simdgroup
constant constexpr int kFwdSmemFloats = kFwdDiag + kFwdSimdgroups * 64;

kernel void orchard_fwd(device const elem_t* q [[buffer(0)]], device const elem_t* k [[buffer(1)]],
                        device const elem_t* v [[buffer(2)]], device elem_t* out [[buffer(3)]],
                        device float* lse [[buffer(4)]], device uchar* mask [[buffer(5)]],
                        device const long* rng [[buffer(6)]], device const long* meta [[buffer(7)]],
                        device const float* alibi [[buffer(8)]], device const float* sink [[buffer(9)]],
                        device const uchar* mask_bool [[buffer(10)]], device const elem_t* mask_elem [[buffer(11)]],
                        device const float* mask_float [[buffer(12)]], device const int* cu_q [[buffer(13)]],
                        device const int* cu_k [[buffer(14)]], uint tg_index [[threadgroup_position_in_grid]],
                        uint tid [[thread_index_in_threadgroup]], uint sg [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]]) {
  threadgroup float smem[kFwdSmemFloats];
  const int max_sq = int(meta[kMetaSq]), max_sk = int(meta[kMetaSk]), hq = int(meta[kMetaHq]);
  const int d = int(meta[kMetaD]), d_v = int(meta[kMetaDv]);  // V / O: d_v columns, zero-filled to kBlockD
  const int group_size = hq / int(meta[kMetaHkv]);
  const bool dropout = meta[kMetaDropout] != 0;
  const uint keep_threshold = uint(meta[kMetaKeepThreshold]);
  const float scale = meta_float(meta, kMetaScaleBits), rescale = meta_float(meta, kMetaRpBits);

  const int q_tiles = (max_sq + kFwdBlockQ - 1) / kFwdBlockQ;
  const int q0 = int(tg_index) % q_tiles * kFwdBlockQ;
  const int batch_head = int(tg_index) / q_tiles;
  const int h = batch_head % hq, bi = batch_head / hq, kh = h / group_size;
  const SeqSpan span = seq_span(meta, cu_q, cu_k, bi);
  if (q0 >= span.len_q) return;  // (varlen) past this sequence's rows: the whole threadgroup leaves
  const int sq = span.len_q, sk = span.len_k;
  device const elem_t* qh = q + bi * meta[kMetaQBatch] + h * meta[kMetaQHead] + span.q_start * meta[kMetaQRow];
  device const elem_t* kh_ptr = k + bi * meta[kMetaKBatch] + kh * meta[kMetaKHead] + span.k_start * meta[kMetaKRow];
  device const elem_t* vh = v + bi * meta[kMetaVBatch] + kh * meta[kMetaVHead] + span.k_start * meta[kMetaVRow];
  const ScoreMods mods = score_mods(meta, span, alibi, mask_bool, mask_elem, mask_float, bi, h);

  // Q -> simdgroup matrices (staged through the K/V area); diagonals start at zero.
  load_tile(smem, qh, meta[kMetaQRow], q0, kFwdBlockQ, sq, d, tid, kFwdThreads);
  for (int e = int(tid); e < kFwdSimdgroups * 64; e += kFwdThreads) smem[kFwdDiag + e] = 0.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_float8x8 qf[kBlockD / 8];
  simdgroup_float8x8 acc[kBlockD / 8];
  for (int c = 0; c < kBlockD / 8; ++c) {
    simdgroup_load(qf[c], smem + int(sg) * 8 * kBlockD + c * 8, kBlockD);
    acc[c] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  }

  const int row = q0 + int(sg) * 8 + int(lane);  // the row lane < 8 owns
  // Running max and sum of the row. kNoScore stands for "no visible key yet": a finite
  // sentinel instead of -inf, since Metal compiles with fast math, which may fold isinf().
  const float kNoScore = -1.0e30f;
  float m = kNoScore, l = 0.0f;
  int k_begin, k_end;  // the key tiles some row of this tile sees (causal / window)
  visible_key_range(mods, q0, kFwdBlockQ, sk, kFwdBlockK, k_begin, k_end);
  for (int k0 = k_begin; k0 < k_end; k0 += kFwdBlockK) {
    threadgroup_barrier(mem_flags::mem_threadgroup);  // Q staging / last tile's V and S are consumed
    load_tile(smem + kFwdK, kh_ptr, meta[kMetaKRow], k0, kFwdBlockK, sk, d, tid, kFwdThreads);
    load_tile(smem + kFwdV, vh, meta[kMetaVRow], k0, kFwdBlockK, sk, d_v, tid, kFwdThreads);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int n = 0; n < kFwdBlockK / 8; ++n) {
      simdgroup_float8x8 s = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      for (int c = 0; c < kBlockD / 8; ++c) {
        simdgroup_float8x8 kt;
        simdgroup_load(kt, smem + kFwdK + n * 8 * kBlockD + c * 8, kBlockD, ulong2(0, 0), true);
        simdgroup_multiply_accumulate(s, qf[c], kt, s);
      }
      simdgroup_store(s, smem + kFwdS + int(sg) * 8 * kFwdBlockK + n * 8, kFwdBlockK);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (lane < 8) {
      const int srow = kFwdS + (int(sg) * 8 + int(lane)) * kFwdBlockK;
      float m_new = m;
      for (int j = 0; j < kFwdBlockK; ++j) {
        const int col = k0 + j;
        if (row < sq && col < sk && visible(mods, row, col)) {
          const float x = final_score(mods, smem[srow + j] * scale, row, col);
          smem[srow + j] = x;  // the final score, read again below
          m_new = max(m_new, x);
        }
      }
      const float alpha = exp(m - m_new);  // 0 when the row saw nothing before (m = kNoScore)
      float sum = 0.0f;
      for (int j = 0; j < kFwdBlockK; ++j) {
        const int col = k0 + j;
        float p = 0.0f;
        if (row < sq && col < sk && visible(mods, row, col)) {
          p = exp(smem[srow + j] - m_new);
          sum += p;
          if (dropout)
            p = dropout_keep_at(rng, meta, bi, h, row, col, keep_threshold) ? p * rescale : 0.0f;
        }
        smem[srow + j] = p;
      }
      l = l * alpha + sum;
      m = m_new;
      smem[kFwdDiag + int(sg) * 64 + int(lane) * 9] = alpha;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_float8x8 diag;
    simdgroup_load(diag, smem + kFwdDiag + int(sg) * 64, 8);
    for (int c = 0; c < kBlockD / 8; ++c) simdgroup_multiply(acc[c], diag, acc[c]);
    for (int n = 0; n < kFwdBlockK / 8; ++n) {
      simdgroup_float8x8 p;
      simdgroup_load(p, smem + kFwdS + int(sg) * 8 * kFwdBlockK + n * 8, kFwdBlockK);
      for (int c = 0; c < kBlockD / 8; ++c) {
        simdgroup_float8x8 vt;
        simdgroup_load(vt, smem + kFwdV + n * 8 * kBlockD + c * 8, kBlockD);
        simdgroup_multiply_accumulate(acc[c], p, vt, acc[c]);
      }
    }
  }

  // O = acc / l; a row that saw no key (l == 0) gets O = 0 and LSE = -inf. A sink (gpt-oss)
  // joins the denominator without a value: with mx = max(m, sink), l' = l e^(m - mx) +
  // e^(sink - mx), O = acc e^(m - mx) / l' and LSE = mx + log l' (LSE = sink without keys).
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (lane < 8) {
    float inv = l > 0.0f ? 1.0f / l : 0.0f, row_lse = l > 0.0f ? m + log(l) : -INFINITY;
    if (meta[kMetaSink] != 0) {
      const float s = sink[h];
      if (l > 0.0f) {
        const float mx = max(m, s), l_all = l * exp(m - mx) + exp(s - mx);
        inv = exp(m - mx) / l_all;
        row_lse = mx + log(l_all);
      } else {
        row_lse = s;
      }
    }
    smem[kFwdDiag + int(sg) * 64 + int(lane) * 9] = inv;
    if (row < sq) lse[bi * meta[kMetaLseBatch] + h * meta[kMetaLseHead] + span.q_start + row] = row_lse;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_float8x8 diag;
  simdgroup_load(diag, smem + kFwdDiag + int(sg) * 64, 8);
  for (int c = 0; c < kBlockD / 8; ++c) {
    simdgroup_multiply(acc[c], diag, acc[c]);
    simdgroup_store(acc[c], smem + int(sg) * 8 * kBlockD + c * 8, kBlockD);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  store_tile(out + bi * meta[kMetaOBatch] + h * meta[kMetaOHead] + span.q_start * meta[kMetaORow], smem,
             meta[kMetaORow], q0, kFwdBlockQ, sq, d_v, 1.0f, tid, kFwdThreads);

  // The keep-mask, when asked for, covers every (row, col), hidden ones included
  // (as the CPU backend returns it): uint8 (b, hq, max sq, max sk) contiguous (varlen: the
  // caller zeroes the entries past a sequence's lengths).
  if (dropout && meta[kMetaWriteMask] != 0) {
    const int rows = min(kFwdBlockQ, sq - q0);
    for (long e = long(tid); e < long(rows) * sk; e += kFwdThreads) {
      const int r = q0 + int(e / sk), col = int(e % sk);
      mask[(long(batch_head) * max_sq + r) * max_sk + col] =
          dropout_keep_at(rng, meta, bi, h, r, col, keep_threshold) ? uchar(1) : uchar(0);
    }
  }
}
