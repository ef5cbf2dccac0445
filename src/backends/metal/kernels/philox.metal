// Philox4x32-10 and Orchard's dropout indexing, ported from include/orchard/philox.h
// so the Metal kernels draw exactly the CPU and CUDA mask (8-bit draws, one call per
// 2 rows x 8 columns):
//   key     = (lo32(seed), hi32(seed))
//   counter = (4 * (col / 32) + (col / 2) % 4, 8 * (row / 16) + row % 8, batch * hq + head,
//              lo32(offset) ^ (hi32(offset) * 0x9E3779B9))
//   word    = 2 * ((row / 8) % 2) + (col / 16) % 2, byte = 2 * ((col / 8) % 2) + col % 2
//   keep    = byte of philox(counter, key)[word] >= keep_threshold (round(256 p), <= 256)
// with the call's dropout offsets (meta kMetaDrop*, FwdParams::dropout_* in
// orchard/params.h) added to batch_head, row and col: dropout_keep_at. Each element
// makes its own call (the kernels' lanes do not hold the 16 elements of one).
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
  const uint x = ((col >> 5) << 2) | ((col >> 1) & 3u);
  const uint y = ((row >> 4) << 3) | (row & 7u);
  const Philox4 r = philox4x32_10(Philox4{x, y, batch_head, off}, uint(seed), uint(seed >> 32));
  const uint word = ((row >> 3) & 1u) * 2u + ((col >> 4) & 1u);
  const uint bits = word == 0u ? r.x : word == 1u ? r.y : word == 2u ? r.z : r.w;
  const uint draw = (bits >> (((col >> 3) & 1u) * 16u + (col & 1u) * 8u)) & 0xFFu;
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
