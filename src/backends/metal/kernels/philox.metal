// Philox4x32-10 and Orchard's dropout indexing, ported from include/orchard/philox.h
// so the Metal kernels draw exactly the CPU and CUDA mask:
//   key     = (lo32(seed), hi32(seed))
//   counter = (col / 4, row, batch * hq + head, lo32(offset) ^ (hi32(offset) * 0x9E3779B9))
//   keep    = philox(counter, key)[col % 4] >= keep_threshold
// with the call's dropout offsets (meta kMetaDrop*, FwdParams::dropout_* in
// orchard/params.h) added to batch_head, row and col: dropout_keep_at.
struct Philox4 {
  uint x, y, z, w;
};

inline Philox4 philox4x32_10(Philox4 ctr, uint key0, uint key1) {
  for (int round = 0; round < 10; ++round) {
    const uint hi0 = mulhi(0xD2511F53u, ctr.x), lo0 = 0xD2511F53u * ctr.x;
    const uint hi1 = mulhi(0xCD9E8D57u, ctr.z), lo1 = 0xCD9E8D57u * ctr.z;
    ctr = Philox4{hi1 ^ ctr.y ^ key0, lo1, hi0 ^ ctr.w ^ key1, lo0};
    key0 += 0x9E3779B9u;
    key1 += 0xBB67AE85u;
  }
  return ctr;
}

// rng[0] = seed, rng[1] = offset (int64 bit patterns of the uint64 key).
inline bool dropout_keep(device const long* rng, uint batch_head, uint row, uint col, uint keep_threshold) {
  const ulong seed = ulong(rng[0]), offset = ulong(rng[1]);
  const uint off = uint(offset) ^ (uint(offset >> 32) * 0x9E3779B9u);
  const Philox4 r = philox4x32_10(Philox4{col >> 2, row, batch_head, off}, uint(seed), uint(seed >> 32));
  const uint lane = col & 3u;
  const uint draw = lane == 0u ? r.x : lane == 1u ? r.y : lane == 2u ? r.z : r.w;
  return draw >= keep_threshold;
}

// The keep decision of element (bi, h, row, col) of this call: the Philox index with the
// call's dropout offsets added (batch_head = bi * heads + head offset + h).
inline bool dropout_keep_at(device const long* rng, device const long* meta, int bi, int h, int row, int col,
                            uint keep_threshold) {
  const uint batch_head = uint(bi) * uint(meta[kMetaDropHeads]) + uint(meta[kMetaDropHead]) + uint(h);
  return dropout_keep(rng, batch_head, uint(long(row) + meta[kMetaDropRow]), uint(long(col) + meta[kMetaDropCol]),
                      keep_threshold);
}
