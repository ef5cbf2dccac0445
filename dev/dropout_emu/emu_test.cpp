// The sm90 kernels' dropout draws (src/backends/cuda/sm90/dropout_scores.cuh) on the CPU emulator
// (dev/decode_emu/shim: one fiber per lane, shuffles as barrier-synchronized exchanges), against
// orchard::dropout_keep element by element. The layouts are written here from the wgmma
// accumulator's definition (PTX ISA, m64nNk16 D fragments: a warp's 16 rows, lane g = lane / 4,
// t = lane % 4 holding rows g and g + 8, columns 8 j + 2 t and + 1 of each 8-column block j),
// independently of the kernels:
//   forward  (drop_scores):       element i = 4 j + 2 r + c -> row row0 + 8 r, column col0 + 8 j + 2 t + c
//            (query_rows_drop_packed: the same elements packed in pairs, i / 2 -> a[i / 8][(i / 2) % 4], half c)
//   backward (dropped_bits_keys): element i -> key (row) key0 + 8 r, query (column) query0 + 8 j + 2 t + c
//            (key_rows_draws + key_rows_pair_mask / key_rows_element_mask: the same elements as AND masks,
//            pair i / 2 in half c of mask i / 2, element i's 32-bit mask: the d64-d128 kernel's form)
// over random keys, offsets, thresholds (p = 0 .. 1, both extremes) and every forward tile width
// the kernels draw in (the forward's tiles start on 32-column blocks: cuda::query_rows_aligned;
// the backward's keys on 16-row ones). A wrong lane pairing, exchange, call position or bit index
// fails it; exit 1 on a mismatch.
// Build and run: dev/dropout_emu/run.sh [cases] [seed]
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>

#include <cuda_runtime.h>  // the shim's

#include "backends/cuda/sm90/dropout_scores.cuh"
#include "orchard/philox.h"

using namespace orchard;

namespace {

struct Case {
  DropoutKey key;
  std::uint32_t batch_head, row0, col0, threshold;  // the warp's first row and column: multiples of 16
  std::uint32_t fwd_col0() const { return col0 & ~31u; }  // the forward's first column: of 32
};

// Per lane: the forward's scores after drop_scores<kBN> (all 1 before), the backward's drop bits.
struct Result {
  float fwd[32][192 / 2];
  std::uint32_t packed[32][192 / 4];  // query_rows_drop_packed's pairs (element i's half before: 0x4000 | i)
  std::uint32_t bwd[32], bwd_wide[32];
  std::uint32_t bwd_pair[32][16], bwd_element[32][32];  // the backward's packed form
};

template <int kBN>
void warp_kernel(Case c, Result* out) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  float s[kBN / 2];
  for (float& x : s) x = 1.f;
  sm90::drop_scores<kBN>(s, c.key, c.batch_head, c.row0 + g, c.fwd_col0(), t, c.threshold);
  for (int i = 0; i < kBN / 2; ++i) out->fwd[lane][i] = s[i];
  std::uint32_t a[kBN / 16][4];
  for (int kk = 0; kk < kBN / 16; ++kk)
    for (int q = 0; q < 4; ++q) {
      const std::uint32_t i = 8 * kk + 2 * q;
      a[kk][q] = (0x4000u | i) | (0x4000u | (i + 1)) << 16;
    }
  Philox4 calls[kBN / 32];
  cuda::query_rows_calls<kBN>(calls, c.key.seed, c.key.offset, c.batch_head, c.row0 + g, c.fwd_col0(), t);
  cuda::query_rows_drop_packed<kBN>(a, calls, c.threshold);
  for (int kk = 0; kk < kBN / 16; ++kk)
    for (int q = 0; q < 4; ++q) out->packed[lane][4 * kk + q] = a[kk][q];
  // The backward's fragment: keys are the rows (key0 = col0 + g), queries the columns (from row0).
  out->bwd[lane] = sm90::dropped_bits_keys(c.key, c.batch_head, c.row0 + 2 * t, c.col0 + g, g, c.threshold);
  out->bwd_wide[lane] =  // the wide kernel's 4 query blocks
      sm90::dropped_bits_keys<4>(c.key, c.batch_head, c.row0 + 2 * t, c.col0 + g, g, c.threshold);
  std::uint32_t own[4], got[4];
  cuda::key_rows_draws<8>(own, got, c.key.seed, c.key.offset, c.batch_head, c.row0 + 2 * t, c.col0 + g, g & 1);
  const std::uint32_t bias = cuda::query_rows_pair_bias(c.threshold);
  for (int kk = 0; kk < 4; ++kk)
    for (int q = 0; q < 4; ++q) {
      const std::uint32_t pair = cuda::key_rows_pair_mask(own[kk], got[kk], g & 1, q, bias);
      out->bwd_pair[lane][4 * kk + q] = pair;
      for (int f = 0; f < 2; ++f) out->bwd_element[lane][8 * kk + 2 * q + f] = cuda::key_rows_element_mask(pair, f);
    }
}

template <int kBN>
int check(const Case& c) {
  static Result r;
  for (auto& lane : r.fwd)
    for (float& x : lane) x = -7.f;  // poisoned
  for (auto& lane : r.packed)
    for (auto& x : lane) x = 0xdeadbeefu;
  for (auto& b : r.bwd) b = 0xdeadbeefu;
  for (auto& b : r.bwd_wide) b = 0xdeadbeefu;
  for (auto& lane : r.bwd_pair)
    for (auto& x : lane) x = 0x5a5a5a5au;
  for (auto& lane : r.bwd_element)
    for (auto& x : lane) x = 0x5a5a5a5au;
  emu_launch(warp_kernel<kBN>, dim3(1), dim3(32), 0, nullptr, c, &r);
  int bad = 0;
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < kBN / 2; ++i) {
      const int j = i / 4, rr = (i / 2) % 2, cc = i % 2;
      const bool keep = dropout_keep(c.key.seed, c.key.offset, c.batch_head, c.row0 + g + 8 * rr,
                                     c.fwd_col0() + 8 * j + 2 * t + cc, c.threshold);
      if (r.fwd[lane][i] != (keep ? 1.f : 0.f)) ++bad;
      const std::uint32_t half = (r.packed[lane][i / 2] >> (16 * cc)) & 0xFFFFu;
      if (half != (keep ? (0x4000u | static_cast<std::uint32_t>(i)) : 0u)) ++bad;
    }
    for (int i = 0; i < 32; ++i) {
      const int j = i / 4, rr = (i / 2) % 2, cc = i % 2;
      const bool keep = dropout_keep(c.key.seed, c.key.offset, c.batch_head, c.row0 + 8 * j + 2 * t + cc,
                                     c.col0 + g + 8 * rr, c.threshold);
      if (((r.bwd[lane] >> i) & 1u) != (keep ? 0u : 1u)) ++bad;
      if (i < 16 && ((r.bwd_wide[lane] >> i) & 1u) != (keep ? 0u : 1u)) ++bad;
      if (((r.bwd_pair[lane][i / 2] >> (16 * cc)) & 0xFFFFu) != (keep ? 0xFFFFu : 0u)) ++bad;
      if (r.bwd_element[lane][i] != (keep ? 0xFFFFFFFFu : 0u)) ++bad;
    }
    if (r.bwd_wide[lane] >> 16 != 0u) ++bad;  // no bits past the 16 elements
  }
  return bad;
}

}  // namespace

int main(int argc, char** argv) {
  const int cases = argc > 1 ? std::atoi(argv[1]) : 40;
  std::mt19937_64 rng(argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 2026);
  int failed = 0, run = 0;
  for (int n = 0; n < cases; ++n) {
    Case c;
    c.key = {rng(), n % 3 == 0 ? 0 : rng()};
    c.batch_head = static_cast<std::uint32_t>(rng() % 4096);
    c.row0 = static_cast<std::uint32_t>(rng() % 100000) & ~15u;
    c.col0 = static_cast<std::uint32_t>(rng() % 100000) & ~15u;
    const float ps[] = {0.f, 0.1f, 0.5f, 0.9f, 1.f};
    c.threshold = dropout_keep_threshold(ps[n % 5]);
    const int bad = check<64>(c) + check<96>(c) + check<128>(c) + check<192>(c);
    run += 4;
    if (bad != 0) {
      ++failed;
      std::printf("case %d (seed %llu, row0 %u, col0 %u, threshold %u): %d elements wrong\n", n,
                  static_cast<unsigned long long>(c.key.seed), c.row0, c.col0, c.threshold, bad);
    }
  }
  std::printf("sm90 dropout draws: %d of %d cases x 4 tile widths match dropout_keep\n", cases - failed, cases);
  (void)run;
  return failed == 0 ? 0 : 1;
}
