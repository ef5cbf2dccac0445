// Does AMX slow the AVX-512 code around it? (issue #15, session 59)
//
// Session 58 put two of the fp32 backward's five GEMMs on AMX tiles (products
// ~2.5x faster in isolation) and the call got slower. No frequency counters in
// this VM, so this probe reads the core clock through the TSC instead: a loop
// of independent AVX-512 FMAs (12 accumulators, throughput-bound) and a
// dependent chain of scalar adds (latency 1 cycle) are timed in TSC ticks
//   - cold (after a sleep),
//   - right after an AVX-512 FMA burst,
//   - right after an AMX tdpbf16ps burst,
//   - with AMX products interleaved into the FMA loop (one tdpbf16ps every
//     `every` FMA groups), which is what a mixed kernel does.
// If AMX lowers the core clock, the chain's ticks per add rise after the AMX
// burst and the interleaved FMA loop loses more than the AMX work it adds.
//   g++ -O2 -std=c++17 -mavx512f -mamx-tile -mamx-bf16 dev/cpu_amx_clock_probe.cpp -o /tmp/amx_clock
//   /tmp/amx_clock
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <x86intrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <thread>

namespace {

bool amx_permit() {
  constexpr long kArchReqXcompPerm = 0x1023, kXtileData = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXtileData) == 0;
}

struct alignas(64) TileConfig {
  std::uint8_t palette = 1, start_row = 0, reserved[14] = {};
  std::uint16_t colsb[16] = {};
  std::uint8_t rows[16] = {};
};

alignas(64) std::uint16_t a_buf[16 * 32], b_buf[16 * 32];
alignas(64) float c_buf[16 * 16];

void amx_setup() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) { cfg.colsb[t] = 64; cfg.rows[t] = 16; }
  _tile_loadconfig(&cfg);
  for (int i = 0; i < 16 * 32; ++i) { a_buf[i] = 0x3f80 + (i & 7); b_buf[i] = 0x3f00 + (i & 3); }
  _tile_loadd(4, a_buf, 64);
  _tile_loadd(5, b_buf, 64);
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
}

// `n` groups of 4 independent tdpbf16ps.
void amx_burst(long n) {
  for (long i = 0; i < n; ++i) {
    _tile_dpbf16ps(0, 4, 5); _tile_dpbf16ps(1, 4, 5);
    _tile_dpbf16ps(2, 4, 5); _tile_dpbf16ps(3, 4, 5);
  }
}

// 12 independent FMAs on registers of width R ("zmm" or "ymm"): inline asm, because as
// intrinsics the compiler spilled the chains or merged them (equal inputs).
#define FMA_OP(R, N) "vfmadd231ps %%" R "30, %%" R "31, %%" R #N "\n\t"
#define FMA_GROUP(R)                                                                              \
  asm volatile(FMA_OP(R, 0) FMA_OP(R, 1) FMA_OP(R, 2) FMA_OP(R, 3) FMA_OP(R, 4) FMA_OP(R, 5)    \
                   FMA_OP(R, 6) FMA_OP(R, 7) FMA_OP(R, 8) FMA_OP(R, 9) FMA_OP(R, 10) FMA_OP(R, 11) \
               ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",  \
               "xmm10", "xmm11")

// `groups` x 12 independent FMAs, 512-bit or (kYmm) 256-bit (AVX2 width: a lighter power
// licence on Intel cores); every `every` groups (0: never) one tdpbf16ps. Returns TSC ticks
// per FMA instruction.
template <bool kYmm>
double fma_loop(long groups, long every) {
  const long inner = every ? every : groups, outer = groups / inner;
  const std::uint64_t t0 = __rdtsc();
  for (long o = 0; o < outer; ++o) {
    for (long g = 0; g < inner; ++g) {
      if constexpr (kYmm)
        FMA_GROUP("ymm");
      else
        FMA_GROUP("zmm");
    }
    if (every) _tile_dpbf16ps(0, 4, 5);
  }
  const std::uint64_t t1 = __rdtsc();
  return double(t1 - t0) / double(outer * inner * 12);
}

// TSC ticks per core cycle: a chain of dependent imuls (3 cycles each on
// Intel cores; a chain of add-immediates measured 0.15 ticks per add, folded
// at rename on this core).
double add_chain(long n) {
  std::uint64_t v = 1;
  const std::uint64_t t0 = __rdtsc();
  for (long i = 0; i < n; ++i) {
    asm volatile(
        "imul %0, %0\n\timul %0, %0\n\timul %0, %0\n\timul %0, %0\n\t"
        "imul %0, %0\n\timul %0, %0\n\timul %0, %0\n\timul %0, %0\n\t"
        : "+r"(v));
  }
  const std::uint64_t t1 = __rdtsc();
  return double(t1 - t0) / double(n * 8 * 3);
}

double amx_ticks_per_product(long n) {
  const std::uint64_t t0 = __rdtsc();
  amx_burst(n);
  _tile_stored(0, c_buf, 64);
  return double(__rdtsc() - t0) / double(n * 4);
}

void rest() { std::this_thread::sleep_for(std::chrono::milliseconds(200)); }

template <class F>
double min_of(int n, F&& f) {
  double best = 1e30;
  for (int i = 0; i < n; ++i) { const double t = f(); best = t < best ? t : best; }
  return best;
}

}  // namespace

int main() {
  if (!amx_permit()) { std::puts("no AMX permission"); return 1; }
  amx_setup();
  const long chain = 2'000'000, fma_groups = 1'000'000, burst = 500'000;
  const int trials = 7;  // min of: the VM's neighbours add noise of up to 2x
  std::printf("TSC ticks per core cycle (imul chain), min of %d:\n", trials);
  rest();
  std::printf("  cold %.3f\n", min_of(trials, [&] { return add_chain(chain); }));
  std::printf("  right after an AMX burst %.3f\n",
              min_of(trials, [&] { amx_burst(burst); return add_chain(chain); }));
  std::printf("  right after an AVX-512 FMA burst %.3f\n",
              min_of(trials, [&] { fma_loop<false>(fma_groups, 0); return add_chain(chain); }));
  std::printf("AMX alone: %.2f ticks per tdpbf16ps\n",
              min_of(trials, [&] { return amx_ticks_per_product(burst); }));
  const double pure = min_of(trials, [&] { return fma_loop<false>(fma_groups, 0); });
  std::printf("AVX-512 FMAs alone: %.3f ticks per FMA\n", pure);
  std::printf("  right after an AMX burst: %.3f\n",
              min_of(trials, [&] { amx_burst(burst); return fma_loop<false>(fma_groups, 0); }));
  std::printf("AVX-512 FMAs with one tdpbf16ps per N x 12 FMAs (extra = ticks added per tdpbf16ps):\n");
  for (long every : {65536L, 8192L, 1024L, 256L, 64L, 16L, 4L, 1L}) {
    const double mixed = min_of(trials, [&] { return fma_loop<false>(fma_groups, every); });
    std::printf("  N %5ld: %.3f ticks per FMA, extra %.0f\n", every, mixed,
                (mixed - pure) * double(every * 12));
  }
  const double pure_y = min_of(trials, [&] { return fma_loop<true>(fma_groups, 0); });
  std::printf("256-bit FMAs alone: %.3f ticks per FMA; with one tdpbf16ps per N x 12:\n", pure_y);
  for (long every : {8192L, 1024L, 256L, 64L, 16L, 4L}) {
    const double mixed = min_of(trials, [&] { return fma_loop<true>(fma_groups, every); });
    std::printf("  N %5ld: %.3f ticks per FMA, extra %.0f\n", every, mixed,
                (mixed - pure_y) * double(every * 12));
  }
  // Phases as a kernel runs them: M tdpbf16ps (4 independent chains), then N x 12
  // FMAs, repeated; extra = ticks per round beyond the two phases' times alone.
  const double amx_pure = min_of(trials, [&] { return amx_ticks_per_product(burst); });
  std::printf("alternating phases: M tdpbf16ps then N x 12 AVX-512 FMAs (extra per round, %% of the round):\n");
  for (long m : {16L, 64L, 256L, 1024L}) {
    for (long n : {16L, 64L, 256L, 1024L, 4096L}) {
      const long rounds = 2'000'000 / (n + m);
      const double per_round = min_of(trials, [&] {
        const std::uint64_t t0 = __rdtsc();
        for (long r = 0; r < rounds; ++r) { amx_burst(m / 4); fma_loop<false>(n, 0); }
        return double(__rdtsc() - t0) / double(rounds);
      });
      const double alone = double(m) * amx_pure + double(n * 12) * pure;
      std::printf("  M %4ld N %4ld: %8.0f ticks per round, extra %6.0f (%3.0f %%)\n", m, n, per_round,
                  per_round - alone, 100.0 * (per_round - alone) / per_round);
    }
  }
  _tile_release();
  return 0;
}
