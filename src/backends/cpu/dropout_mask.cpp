// Scalar Philox costs ~45 cycles per call, so the keep-mask runs its calls in
// vector lanes: eight per AVX2 step, sixteen per AVX-512 step (the AVX2 step's
// instructions at twice the width). The 32x32->64 multiplies use vpmuludq on
// even and odd lanes and a blend, cheaper than vpmulld plus a separate high half.
//
// Since the 8-bit draws (philox.h), one call holds 8 columns of a row, 4 calls a
// 32-column block: lane i of a step starting at column c (c % 32 == 0) runs call
// x = 4 * (c / 32) + i, i.e. call t = i % 4 of block i / 4, whose word x (rows
// r % 16 < 8; z for the others) has the bytes of columns 2t, 2t + 1, 8 + 2t,
// 9 + 2t of the block, and word y (w) those 16 columns on. An in-lane byte
// shuffle puts each block's 16-bit column pairs in order, a 128-bit lane
// interleave of the two words the blocks. dropout_keep_row_pair keeps both
// halves of each call (x, y: row r; z, w: row r + 8), the forward and backward
// draw a block's rows in such pairs (for_dropout_rows).
// One core of a 2-core AMX Xeon, ns per element (session 61): AVX-512 0.23 at
// 256 columns, 0.25 at 128; AVX2 0.40 / 0.41; 64 columns (the backward's rows:
// one AVX2 step either way) 0.45; scalar 2.6. Under the 32-bit draws (four
// columns a call, until session 61) AVX-512 took 0.51-0.62, AVX2 0.80-1.0. The
// dropout forward, b1 h4 s2048 d64 p 0.1, 2 threads, best of 15: fp32 16.8-17.8
// -> 14.1-14.2 ms (11-12 without dropout), bf16 7.9-8.2 -> 5.6-6.6 ms (3.0).
// Row pairs, ns per element, one row -> pair: AVX-512 0.24 -> 0.14 at 256
// columns, 0.25 -> 0.15 at 128; AVX2 0.41 -> 0.24; 64 columns 0.45 -> 0.27;
// scalar 2.9 -> 2.0. b1 h4 s2048 p 0.1, 2 threads, bench/cpu_dropout_bench.py
// --ab (the two builds' processes alternating, each's best of 7 calls; ms, range
// over 2 runs x 15 rounds; the ratio of the lows, per run), one row -> pairs:
//   fp32 d64  fwd 14.1-16.7 -> 13.1-19.4 (0.93x)       fwd+bwd 50.4-64.0 -> 46.8-60.8 (0.91-0.93x)
//   fp32 d128 fwd 22.3-26.3 -> 21.5-32.6 (0.95-0.97x)  fwd+bwd 93.9-114 -> 89.1-106 (0.95-0.96x)
//   bf16 d64  fwd 5.6-7.2 -> 4.8-6.3 (0.83-0.86x)      fwd+bwd 23.6-29.7 -> 21.5-26.6 (0.86-0.91x)
//   bf16 d128 fwd 6.9-9.8 -> 5.9-7.9 (0.84-0.86x)      fwd+bwd 35.2-48.3 -> 32.6-38.9 (0.93-0.94x)
// (p 0, both builds alike within the noise: fp32 d64 11.5-12.2 / 43.6-44.1 ms,
// bf16 d64 3.1-3.2 / 15.9-16.2.)
// The backward's 64-column tiles (kBlockN) filled half an AVX-512 step per row pair;
// dropout_keep_block runs two pairs per step: 64 x 64 tiles 0.26 -> 0.165 ns per element
// (one core, session 63); orchard_cpu_bench bf16 b1 h8 s2048 d64 backward with dropout,
// 2 threads, 8 alternating runs: 70.8-81.5 -> 69.1-88.3 ms (best 0.98x; no dropout ~66).
#include "backends/cpu/dropout_mask.h"

#include "backends/cpu/cpu_features.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "orchard/philox.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define ORCHARD_DROPOUT_AVX2 1
// GCC 12 flags the _mm512_undefined_* inside its own intrinsic headers (maybe-: _mm512_inserti64x4).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace orchard::cpu {
namespace {

// Per 32-column block, the calls (of its four) that the columns in range need.
// keep_hi (may be null): row + 8's bytes too, from the same calls (row % 16 < 8).
void keep_scalar(std::uint64_t seed, std::uint64_t offset, std::uint32_t batch_head,
                 std::uint32_t row, std::int64_t j0, int n, std::uint32_t threshold,
                 std::uint8_t* keep, std::uint8_t* keep_hi) {
  const std::int64_t end = j0 + n;
  for (std::int64_t c = j0; c < end;) {
    const std::int64_t block_end = std::min(end, (c | 31) + 1);
    Philox4 calls[4];
    unsigned have = 0;
    for (; c < block_end; ++c) {
      const auto col = static_cast<std::uint32_t>(c);
      const unsigned t = (col >> 1) & 3u;
      if (!((have >> t) & 1u)) {
        calls[t] = dropout_call(seed, offset, batch_head, row, col);
        have |= 1u << t;
      }
      keep[c - j0] = dropout_draw(calls[t], row, col) >= threshold;
      if (keep_hi) keep_hi[c - j0] = dropout_draw(calls[t], row + 8, col) >= threshold;
    }
  }
}

#ifdef ORCHARD_DROPOUT_AVX2
// What a vector step needs of one row: the counter's y, z, w, the key, the
// threshold (1..255: 0 and 256 never reach the steps).
struct RowKey {
  std::uint32_t y, z, w, k0, k1, threshold;
};

RowKey row_key(std::uint64_t seed, std::uint64_t offset, std::uint32_t batch_head, std::uint32_t row,
               std::uint32_t threshold) {
  return {dropout_counter_y(row), batch_head, dropout_counter_w(offset), static_cast<std::uint32_t>(seed),
          static_cast<std::uint32_t>(seed >> 32), threshold};
}

// Which words of its calls a step turns into keep bytes: one row's (x, y for rows
// row % 16 < 8, z, w for the others) to out0, or both rows' (x, y to out0, z, w to out1).
enum class Words { kXY, kZW, kBoth };

// Runs the vector step over columns [j0, j0 + n) into keep0 (and keep1 for Words::kBoth,
// else null): whole steps store in place, a step that sticks out at either end goes
// through a buffer (a step takes about two scalar calls' time, 28 against 11-20 ns; a
// 32-column block needs four).
template <int kWidth, class Step>
inline void run_steps(std::int64_t j0, int n, std::uint8_t* keep0, std::uint8_t* keep1, Step step) {
  const std::int64_t end = j0 + n;
  for (std::int64_t c = j0 & ~std::int64_t(31); c < end; c += kWidth) {
    if (c >= j0 && c + kWidth <= end) {
      step(static_cast<std::uint32_t>(c), keep0 + (c - j0), keep1 ? keep1 + (c - j0) : nullptr);
      continue;
    }
    alignas(64) std::uint8_t buf[2][kWidth];
    step(static_cast<std::uint32_t>(c), buf[0], buf[1]);
    const std::int64_t lo = std::max(c, j0), hi = std::min(c + kWidth, end);
    std::memcpy(keep0 + (lo - j0), buf[0] + (lo - c), static_cast<std::size_t>(hi - lo));
    if (keep1) std::memcpy(keep1 + (lo - j0), buf[1] + (lo - c), static_cast<std::size_t>(hi - lo));
  }
}

// The odd 32-bit lanes moved down (and the even ones up) by a dword shuffle rather than 64-bit
// shifts: 512-bit shifts share the multiplier's port on Intel cores, the shuffle runs on another.
// Session 63, one core of the 2-core AMX Xeon, 64 x 64 blocks: AVX-512 0.165 -> 0.152 ns per
// element; AVX2 unchanged (0.245). Two-source permutes (vpermt2d) in place of shuffle + blend: 0.159
// against 0.139 (with RoundKeys below), slower.
__attribute__((target("avx2"))) inline void mulhilo8(__m256i a, __m256i m, __m256i& hi,
                                                     __m256i& lo) {
  const __m256i pe = _mm256_mul_epu32(a, m);                                 // lanes 0,2,4,6
  const __m256i po = _mm256_mul_epu32(_mm256_shuffle_epi32(a, 0xB1), m);    // lanes 1,3,5,7
  hi = _mm256_blend_epi32(_mm256_shuffle_epi32(pe, 0xB1), po, 0xAA);
  lo = _mm256_blend_epi32(pe, _mm256_shuffle_epi32(po, 0xB1), 0xAA);
}

// Keep bytes of one row, columns [c, c + 64) (c % 32 == 0: two blocks, one per 128-bit
// lane), from its words lo (columns 0..15 of each block) and hi (16..31).
__attribute__((target("avx2"))) inline void store_keep_avx2(__m256i lo, __m256i hi, std::uint32_t threshold,
                                                            std::uint8_t* out) {
  // Word a of call t holds u16 column pairs (2t, 8 + 2t) of its block: gather each
  // lane's four pairs at 2t and those at 8 + 2t behind them (columns 0..15 in order).
  const __m256i order = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,
                                         0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
  const __m256i a = _mm256_shuffle_epi8(lo, order);  // columns 0..15 of each block
  const __m256i b = _mm256_shuffle_epi8(hi, order);  // columns 16..31
  const __m256i thr = _mm256_set1_epi8(static_cast<char>(threshold));
  const __m256i one = _mm256_set1_epi8(1);
  for (int h = 0; h < 2; ++h) {
    const __m256i v = h == 0 ? _mm256_permute2x128_si256(a, b, 0x20) : _mm256_permute2x128_si256(a, b, 0x31);
    const __m256i ge = _mm256_cmpeq_epi8(_mm256_max_epu8(v, thr), v);  // v >= threshold, unsigned
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 32 * h), _mm256_and_si256(ge, one));
  }
}

// The eight calls of columns [c, c + 64), c % 32 == 0, turned into keep bytes (kWords).
template <Words kWords>
__attribute__((target("avx2"))) inline void step_avx2(const RowKey& k, std::uint32_t c, std::uint8_t* out0,
                                                      std::uint8_t* out1) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  __m256i x = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(dropout_counter_x(c))),
                               _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i y = _mm256_set1_epi32(static_cast<int>(k.y));
  __m256i z = _mm256_set1_epi32(static_cast<int>(k.z));
  __m256i w = _mm256_set1_epi32(static_cast<int>(k.w));
  std::uint32_t k0 = k.k0, k1 = k.k1;
  for (int round = 0; round < 10; ++round) {
    __m256i hi0, lo0, hi1, lo1;
    mulhilo8(x, m0, hi0, lo0);
    mulhilo8(z, m1, hi1, lo1);
    x = _mm256_xor_si256(_mm256_xor_si256(hi1, y), _mm256_set1_epi32(static_cast<int>(k0)));
    y = lo1;
    z = _mm256_xor_si256(_mm256_xor_si256(hi0, w), _mm256_set1_epi32(static_cast<int>(k1)));
    w = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  if constexpr (kWords == Words::kZW)
    store_keep_avx2(z, w, k.threshold, out0);
  else
    store_keep_avx2(x, y, k.threshold, out0);
  if constexpr (kWords == Words::kBoth) store_keep_avx2(z, w, k.threshold, out1);
}

template <Words kWords>
__attribute__((target("avx2"))) void keep_avx2(const RowKey& k, std::int64_t j0, int n, std::uint8_t* keep0,
                                               std::uint8_t* keep1) {
  run_steps<64>(j0, n, keep0, keep1, [&](std::uint32_t c, std::uint8_t* out0, std::uint8_t* out1) {
    step_avx2<kWords>(k, c, out0, out1);
  });
}

// Sixteen calls (128 columns, four blocks, one per 128-bit lane) per step.
#define ORCHARD_DROPOUT_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx2")))
ORCHARD_DROPOUT_AVX512_TARGET inline void mulhilo16(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i pe = _mm512_mul_epu32(a, m);                                      // even lanes
  const __m512i po = _mm512_mul_epu32(_mm512_shuffle_epi32(a, _MM_PERM_CDAB), m);  // odd lanes
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_shuffle_epi32(pe, _MM_PERM_CDAB), po);
  lo = _mm512_mask_blend_epi32(0xAAAA, pe, _mm512_shuffle_epi32(po, _MM_PERM_CDAB));
}

// Keep bytes of the four blocks (one per 128-bit lane) from their words lo (columns 0..15 of
// each block) and hi (16..31): blocks 0, 1 to out01[0, 64), blocks 2, 3 to out23[0, 64) (one
// row's 128 columns: out23 = out01 + 64; two rows' 64 columns: step_avx512_two_pairs).
ORCHARD_DROPOUT_AVX512_TARGET inline void store_keep_avx512(__m512i lo, __m512i hi, std::uint32_t threshold,
                                                             std::uint8_t* out01, std::uint8_t* out23) {
  // Bytes 0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15 of each 128-bit lane, as store_keep_avx2.
  const __m512i order = _mm512_set4_epi32(0x0F0E0B0A, 0x07060302, 0x0D0C0908, 0x05040100);
  const __m512i a = _mm512_shuffle_epi8(lo, order);  // lane j: columns 0..15 of block j
  const __m512i b = _mm512_shuffle_epi8(hi, order);  // columns 16..31
  // 64-bit indices into (a, b): lanes a0 b0 a1 b1, then a2 b2 a3 b3.
  const __m512i first = _mm512_permutex2var_epi64(a, _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), b);
  const __m512i second = _mm512_permutex2var_epi64(a, _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15), b);
  const __m512i thr = _mm512_set1_epi8(static_cast<char>(threshold));
  const __m512i one = _mm512_set1_epi8(1);
  _mm512_storeu_si512(out01, _mm512_maskz_mov_epi8(_mm512_cmpge_epu8_mask(first, thr), one));
  _mm512_storeu_si512(out23, _mm512_maskz_mov_epi8(_mm512_cmpge_epu8_mask(second, thr), one));
}

// The ten rounds' keys (round r at index r), kept in memory so that the rounds read them as
// broadcast operands of vpternlogd instead of broadcasting from a general register each round
// (another shuffle-port uop): made once per row (or pair of row pairs), two adds. Session 63, one
// core, AVX-512: 0.152 -> 0.139 ns per element at 64 columns, 0.152 -> 0.136-0.140 at 256.
struct RoundKeys {
  alignas(64) std::uint32_t k0[16], k1[16];
};
ORCHARD_DROPOUT_AVX512_TARGET inline RoundKeys round_keys16(std::uint32_t k0, std::uint32_t k1) {
  const __m512i r = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 0, 0, 0, 0, 0);
  RoundKeys rk;
  _mm512_store_si512(rk.k0, _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(k0)),
                                             _mm512_mullo_epi32(r, _mm512_set1_epi32(static_cast<int>(0x9E3779B9u)))));
  _mm512_store_si512(rk.k1, _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(k1)),
                                             _mm512_mullo_epi32(r, _mm512_set1_epi32(static_cast<int>(0xBB67AE85u)))));
  return rk;
}

// Ten Philox rounds on sixteen counters (x, y, z, w) side by side, in place.
ORCHARD_DROPOUT_AVX512_TARGET inline void philox_rounds16(__m512i& x, __m512i& y, __m512i& z, __m512i& w,
                                                          const RoundKeys& rk) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  for (int round = 0; round < 10; ++round) {
    __m512i hi0, lo0, hi1, lo1;
    mulhilo16(x, m0, hi0, lo0);
    mulhilo16(z, m1, hi1, lo1);
    x = _mm512_ternarylogic_epi32(hi1, y, _mm512_set1_epi32(static_cast<int>(rk.k0[round])), 0x96);  // a ^ b ^ c
    y = lo1;
    z = _mm512_ternarylogic_epi32(hi0, w, _mm512_set1_epi32(static_cast<int>(rk.k1[round])), 0x96);
    w = lo0;
  }
}

template <Words kWords>
ORCHARD_DROPOUT_AVX512_TARGET inline void step_avx512(const RowKey& k, const RoundKeys& rk, std::uint32_t c,
                                                      std::uint8_t* out0, std::uint8_t* out1) {
  __m512i x = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(dropout_counter_x(c))),
                               _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  __m512i y = _mm512_set1_epi32(static_cast<int>(k.y));
  __m512i z = _mm512_set1_epi32(static_cast<int>(k.z));
  __m512i w = _mm512_set1_epi32(static_cast<int>(k.w));
  philox_rounds16(x, y, z, w, rk);
  if constexpr (kWords == Words::kZW)
    store_keep_avx512(z, w, k.threshold, out0, out0 + 64);
  else
    store_keep_avx512(x, y, k.threshold, out0, out0 + 64);
  if constexpr (kWords == Words::kBoth) store_keep_avx512(z, w, k.threshold, out1, out1 + 64);
}

// Two row pairs' columns [c, c + 64) (c % 32 == 0) in one step: lanes 0..7 run the eight calls
// of pair a (rows a, a + 8; a % 16 < 8), lanes 8..15 those of pair b, which differ in the
// counter's y only. out: rows a, a + 8, b, b + 8, 64 bytes each. A 64-column row pair alone
// fills half a step (0.27 ns per element against 0.14 at 256 columns, session 62).
ORCHARD_DROPOUT_AVX512_TARGET inline void step_avx512_two_pairs(const RowKey& a, const RoundKeys& rk, std::uint32_t y_b,
                                                                std::uint32_t c, std::uint8_t* const out[4]) {
  __m512i x = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(dropout_counter_x(c))),
                               _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7));
  __m512i y = _mm512_inserti64x4(_mm512_set1_epi32(static_cast<int>(a.y)), _mm256_set1_epi32(static_cast<int>(y_b)), 1);
  __m512i z = _mm512_set1_epi32(static_cast<int>(a.z));
  __m512i w = _mm512_set1_epi32(static_cast<int>(a.w));
  philox_rounds16(x, y, z, w, rk);
  store_keep_avx512(x, y, a.threshold, out[0], out[2]);
  store_keep_avx512(z, w, a.threshold, out[1], out[3]);
}

// Columns [j0, j0 + n) of two row pairs (step_avx512_two_pairs), all inside the 64 columns from
// c = j0 rounded down to 32: a whole span stores in place, a part goes through a buffer.
ORCHARD_DROPOUT_AVX512_TARGET void keep_two_pairs_avx512(const RowKey& a, std::uint32_t y_b, std::int64_t j0, int n,
                                                         std::uint8_t* const dst[4]) {
  const std::int64_t c = j0 & ~std::int64_t(31);
  const RoundKeys rk = round_keys16(a.k0, a.k1);
  if (j0 == c && n == 64) return step_avx512_two_pairs(a, rk, y_b, static_cast<std::uint32_t>(c), dst);
  alignas(64) std::uint8_t buf[4][64];
  std::uint8_t* const tmp[4] = {buf[0], buf[1], buf[2], buf[3]};
  step_avx512_two_pairs(a, rk, y_b, static_cast<std::uint32_t>(c), tmp);
  for (int i = 0; i < 4; ++i) std::memcpy(dst[i], buf[i] + (j0 - c), static_cast<std::size_t>(n));
}

// 128-column steps while more than 64 columns are left, then (at most) one AVX2 step.
template <Words kWords>
ORCHARD_DROPOUT_AVX512_TARGET void keep_avx512(const RowKey& k, std::int64_t j0, int n, std::uint8_t* keep0,
                                               std::uint8_t* keep1) {
  const std::int64_t end = j0 + n, c = j0 & ~std::int64_t(31);
  const std::int64_t steps = end - c > 64 ? (end - c - 64 + 127) / 128 : 0;
  const std::int64_t wide_end = std::min(end, c + 128 * steps);
  if (steps > 0) {
    const RoundKeys rk = round_keys16(k.k0, k.k1);
    run_steps<128>(j0, static_cast<int>(wide_end - j0), keep0, keep1,
                   [&](std::uint32_t col, std::uint8_t* out0, std::uint8_t* out1) {
                     step_avx512<kWords>(k, rk, col, out0, out1);
                   });
  }
  const std::int64_t rest = std::max(j0, wide_end);
  if (end > rest)
    keep_avx2<kWords>(k, rest, static_cast<int>(end - rest), keep0 + (rest - j0),
                      keep1 ? keep1 + (rest - j0) : nullptr);
}

bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}

// ORCHARD_CPU_DROPOUT512=0 in the environment keeps the AVX2 step (A/B timing).
bool dropout_avx512() {
  static const bool yes = [] {
    const char* e = std::getenv("ORCHARD_CPU_DROPOUT512");
    return cpu_has_avx512() && !(e && e[0] == '0');
  }();
  return yes;
}
#endif

}  // namespace

bool dropout_mask_isa_supported(DropoutMaskIsa isa) {
#ifdef ORCHARD_DROPOUT_AVX2
  if (isa == DropoutMaskIsa::kAvx512) return cpu_has_avx512();
  if (isa == DropoutMaskIsa::kAvx2) return has_avx2();
#endif
  return isa == DropoutMaskIsa::kScalar;
}

namespace {

// One row (keep_hi null) or rows row and row + 8 (row % 16 < 8) from the same calls.
void keep_rows(DropoutMaskIsa isa, std::uint64_t seed, std::uint64_t offset, std::uint32_t batch_head,
               std::uint32_t row, std::int64_t j0, int n, std::uint32_t threshold, std::uint8_t* keep,
               std::uint8_t* keep_hi) {
  if (n <= 0) return;
  // Every 8-bit draw is >= 0 and < 256: no Philox needed.
  if (threshold == 0u || threshold >= 256u) {
    std::memset(keep, threshold == 0u ? 1 : 0, static_cast<std::size_t>(n));
    if (keep_hi) std::memset(keep_hi, threshold == 0u ? 1 : 0, static_cast<std::size_t>(n));
    return;
  }
#ifdef ORCHARD_DROPOUT_AVX2
  if (isa != DropoutMaskIsa::kScalar) {
    const RowKey k = row_key(seed, offset, batch_head, row, threshold);
    const bool avx512 = isa == DropoutMaskIsa::kAvx512;
    if (keep_hi)
      return avx512 ? keep_avx512<Words::kBoth>(k, j0, n, keep, keep_hi)
                    : keep_avx2<Words::kBoth>(k, j0, n, keep, keep_hi);
    if ((row >> 3) & 1u)
      return avx512 ? keep_avx512<Words::kZW>(k, j0, n, keep, nullptr)
                    : keep_avx2<Words::kZW>(k, j0, n, keep, nullptr);
    return avx512 ? keep_avx512<Words::kXY>(k, j0, n, keep, nullptr)
                  : keep_avx2<Words::kXY>(k, j0, n, keep, nullptr);
  }
#endif
  keep_scalar(seed, offset, batch_head, row, j0, n, threshold, keep, keep_hi);
}

// Rows [0, rows) of a block (row 0 is dropout row row0), columns [j0, j0 + n), to keep[r * ld + t]:
// rows paired as for_dropout_rows pairs them. With AVX-512 and all n columns inside one 64-column
// span from j0's 32-column block (the backward's kBlockN tiles), two row pairs share a step.
void keep_block(DropoutMaskIsa isa, std::uint64_t seed, std::uint64_t offset, std::uint32_t batch_head,
                std::uint32_t row0, int rows, std::int64_t j0, int n, std::uint32_t threshold, std::uint8_t* keep,
                std::int64_t ld) {
  auto row_ptr = [&](int r) { return keep + r * ld; };
  auto draw_unit = [&](int r, bool paired) {
    keep_rows(isa, seed, offset, batch_head, row0 + static_cast<std::uint32_t>(r), j0, n, threshold, row_ptr(r),
              paired ? row_ptr(r + 8) : nullptr);
  };
#ifdef ORCHARD_DROPOUT_AVX2
  const std::int64_t c = j0 & ~std::int64_t(31);
  if (isa == DropoutMaskIsa::kAvx512 && n > 0 && j0 + n - c <= 64 && threshold > 0u && threshold < 256u) {
    auto two_pairs = [&](int ra, int rb) {
      std::uint8_t* const dst[4] = {row_ptr(ra), row_ptr(ra + 8), row_ptr(rb), row_ptr(rb + 8)};
      keep_two_pairs_avx512(row_key(seed, offset, batch_head, row0 + static_cast<std::uint32_t>(ra), threshold),
                            dropout_counter_y(row0 + static_cast<std::uint32_t>(rb)), j0, n, dst);
    };
    int waiting = -1;  // a row pair drawn with the next one
    for_dropout_rows(row0, rows, [&](int r, bool paired) {
      if (!paired) return draw_unit(r, false);
      if (waiting < 0) {
        waiting = r;
        return;
      }
      two_pairs(waiting, r);
      waiting = -1;
    });
    if (waiting >= 0) draw_unit(waiting, true);
    return;
  }
#endif
  for_dropout_rows(row0, rows, draw_unit);
}

// The widest implementation this CPU has (ORCHARD_CPU_DROPOUT512=0: not AVX-512).
DropoutMaskIsa widest_isa() {
#ifdef ORCHARD_DROPOUT_AVX2
  if (dropout_avx512()) return DropoutMaskIsa::kAvx512;
  if (has_avx2()) return DropoutMaskIsa::kAvx2;
#endif
  return DropoutMaskIsa::kScalar;
}

}  // namespace

void dropout_keep_row_isa(DropoutMaskIsa isa, std::uint64_t seed, std::uint64_t offset, std::uint32_t batch_head,
                          std::uint32_t row, std::int64_t j0, int n, std::uint32_t threshold, std::uint8_t* keep) {
  keep_rows(isa, seed, offset, batch_head, row, j0, n, threshold, keep, nullptr);
}

void dropout_keep_row_pair_isa(DropoutMaskIsa isa, std::uint64_t seed, std::uint64_t offset,
                               std::uint32_t batch_head, std::uint32_t row_lo, std::int64_t j0, int n,
                               std::uint32_t threshold, std::uint8_t* keep_lo, std::uint8_t* keep_hi) {
  if ((row_lo >> 3) & 1u) {  // rows of different calls: one at a time
    keep_rows(isa, seed, offset, batch_head, row_lo, j0, n, threshold, keep_lo, nullptr);
    keep_rows(isa, seed, offset, batch_head, row_lo + 8, j0, n, threshold, keep_hi, nullptr);
    return;
  }
  keep_rows(isa, seed, offset, batch_head, row_lo, j0, n, threshold, keep_lo, keep_hi);
}

void dropout_keep_row(std::uint64_t seed, std::uint64_t offset, std::uint32_t batch_head,
                      std::uint32_t row, std::int64_t j0, int n, std::uint32_t threshold,
                      std::uint8_t* keep) {
  keep_rows(widest_isa(), seed, offset, batch_head, row, j0, n, threshold, keep, nullptr);
}

void dropout_keep_row_pair(std::uint64_t seed, std::uint64_t offset, std::uint32_t batch_head,
                           std::uint32_t row_lo, std::int64_t j0, int n, std::uint32_t threshold,
                           std::uint8_t* keep_lo, std::uint8_t* keep_hi) {
  dropout_keep_row_pair_isa(widest_isa(), seed, offset, batch_head, row_lo, j0, n, threshold, keep_lo, keep_hi);
}

void dropout_keep_block_isa(DropoutMaskIsa isa, std::uint64_t seed, std::uint64_t offset, std::uint32_t batch_head,
                            std::uint32_t row0, int rows, std::int64_t j0, int n, std::uint32_t threshold,
                            std::uint8_t* keep, std::int64_t ld) {
  keep_block(isa, seed, offset, batch_head, row0, rows, j0, n, threshold, keep, ld);
}

void dropout_keep_block(std::uint64_t seed, std::uint64_t offset, std::uint32_t batch_head, std::uint32_t row0,
                        int rows, std::int64_t j0, int n, std::uint32_t threshold, std::uint8_t* keep,
                        std::int64_t ld) {
  keep_block(widest_isa(), seed, offset, batch_head, row0, rows, j0, n, threshold, keep, ld);
}

}  // namespace orchard::cpu
