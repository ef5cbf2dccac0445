// AVX-512-BF16 tile GEMM (see gemm_bf16.h). Micro-tile: MR = 6 rows x NV
// zmm columns (NV <= 4: 64 fp32 columns) = 24 accumulators + 4 B vectors +
// 1 broadcast of 32 zmm registers. Per K pair: NV loads of B (16 columns x 2
// bf16 each), MR 32-bit broadcasts of A, MR * NV vdpbf16ps.
#include "backends/cpu/gemm_bf16.h"

#include "backends/cpu/cache_aligned.h"
#include "backends/cpu/kernel_common.h"
#include "backends/cpu/zmm_tile.h"
#include "backends/cpu/zmm_transpose.h"

#include <cstring>

// GCC 12 flags the _mm512_undefined_* inside its own intrinsic headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define ORCHARD_BF16_DOT 1
#define ORCHARD_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#endif
#if defined(ORCHARD_BF16_DOT) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>
#include <vector>
#define ORCHARD_AMX 1
#define ORCHARD_AMX_TARGET \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))
#endif

namespace orchard::cpu {

#ifdef ORCHARD_BF16_DOT
namespace {

// A's pair (row r, pair p) is the 32-bit word at a + r * a_rs + p * a_ps.
template <int MR, int NV>
ORCHARD_BF16_TARGET inline __attribute__((always_inline)) void micro(
    int kpairs, const std::uint16_t* a, std::int64_t a_rs, std::int64_t a_ps,
    const std::uint16_t* b, std::int64_t ldb, float* c, std::int64_t ldc, bool accumulate) {
  ZmmTile<MR, NV> t;
  t.load(c, ldc, accumulate);
  for (int p = 0; p < kpairs; ++p) {
    __m512bh bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      bv[v] = (__m512bh)_mm512_loadu_si512(b + p * ldb + 32 * v);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      std::int32_t w;
      std::memcpy(&w, a + r * a_rs + p * a_ps, 4);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(w);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) t.acc[r][v] = _mm512_dpbf16_ps(t.acc[r][v], av, bv[v]);
    }
  }
  t.store(c, ldc);
}

template <int NV>
ORCHARD_BF16_TARGET void column_panel(int m, int kpairs, const std::uint16_t* a, std::int64_t a_rs,
                                      std::int64_t a_ps, const std::uint16_t* b, std::int64_t ldb,
                                      float* c, std::int64_t ldc, bool accumulate) {
  constexpr int MR = 6;
  int i = 0;
  for (; i + MR <= m; i += MR)
    micro<MR, NV>(kpairs, a + i * a_rs, a_rs, a_ps, b, ldb, c + i * ldc, ldc, accumulate);
  const std::uint16_t* ai = a + i * a_rs;
  float* ci = c + i * ldc;
  switch (m - i) {
    case 5: micro<5, NV>(kpairs, ai, a_rs, a_ps, b, ldb, ci, ldc, accumulate); break;
    case 4: micro<4, NV>(kpairs, ai, a_rs, a_ps, b, ldb, ci, ldc, accumulate); break;
    case 3: micro<3, NV>(kpairs, ai, a_rs, a_ps, b, ldb, ci, ldc, accumulate); break;
    case 2: micro<2, NV>(kpairs, ai, a_rs, a_ps, b, ldb, ci, ldc, accumulate); break;
    case 1: micro<1, NV>(kpairs, ai, a_rs, a_ps, b, ldb, ci, ldc, accumulate); break;
    default: break;
  }
}

ORCHARD_BF16_TARGET void gemm_bf16_avx512(int m, int n, int kpairs, const std::uint16_t* a,
                                          std::int64_t a_rs, std::int64_t a_ps,
                                          const std::uint16_t* b, std::int64_t ldb, float* c,
                                          std::int64_t ldc, bool accumulate) {
  int j = 0;
  for (; j + 64 <= n; j += 64)
    column_panel<4>(m, kpairs, a, a_rs, a_ps, b + 2 * j, ldb, c + j, ldc, accumulate);
  switch ((n - j) / 16) {
    case 3: column_panel<3>(m, kpairs, a, a_rs, a_ps, b + 2 * j, ldb, c + j, ldc, accumulate); break;
    case 2: column_panel<2>(m, kpairs, a, a_rs, a_ps, b + 2 * j, ldb, c + j, ldc, accumulate); break;
    case 1: column_panel<1>(m, kpairs, a, a_rs, a_ps, b + 2 * j, ldb, c + j, ldc, accumulate); break;
    default: break;
  }
}

ORCHARD_BF16_TARGET void to_bf16_avx512(const float* src, std::int64_t lds, int rows, int n,
                                        std::uint16_t* dst, std::int64_t ldd) {
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < n; j += 16) {
      const __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + r * lds + j));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + r * ldd + j), (__m256i)h);
    }
}

ORCHARD_BF16_TARGET void to_bf16_pairs_t_avx512(const float* src, std::int64_t lds, int rows, int n,
                                                std::uint16_t* dst, std::int64_t ldd) {
  for (int p = 0; 2 * p < rows; ++p) {
    const float* r0 = src + 2 * p * lds;
    const bool has1 = 2 * p + 1 < rows;
    for (int j = 0; j < n; j += 16) {
      const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(r0 + j)));
      __m512i w = lo;
      if (has1) {
        const __m512i hi =
            _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(r0 + lds + j)));
        w = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
      }
      _mm512_storeu_si512(dst + p * ldd + 2 * j, w);
    }
  }
}


// c[r * ldc + j] (+)= part[r * width + j], r < rows, j < width (width % 16 == 0).
ORCHARD_BF16_TARGET void add_rows(const float* part, int rows, int width, float* c, std::int64_t ldc, bool add) {
  for (int r = 0; r < rows; ++r)
    for (int q = 0; q < width; q += 16) {
      float* cr = c + r * ldc + q;
      const __m512 v = _mm512_loadu_ps(part + r * width + q);
      _mm512_storeu_ps(cr, add ? _mm512_add_ps(_mm512_loadu_ps(cr), v) : v);
    }
}

ORCHARD_BF16_TARGET void pack_a_pairs_rows_avx512(int m, int kpairs, const std::uint16_t* a,
                                                  std::int64_t a_rs, std::int64_t a_ps,
                                                  std::uint32_t* dst, std::int64_t ldw) {
  auto word = [&](int r, int p) {
    std::uint32_t w;
    std::memcpy(&w, a + r * a_rs + p * a_ps, 4);
    return w;
  };
  int r0 = 0;
  if (a_rs == 2) {  // a pair-packed A^T: 16 x 16 word blocks, transposed in registers
    for (; r0 + 16 <= m; r0 += 16) {
      int p0 = 0;
      for (; p0 + 16 <= kpairs; p0 += 16) {
        __m512i v[16];
#pragma GCC unroll 16
        for (int q = 0; q < 16; ++q) v[q] = _mm512_loadu_si512(a + (p0 + q) * a_ps + 2 * r0);
        transpose16x16(v);
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + (r0 + i) * ldw + p0, v[i]);
      }
      for (; p0 < kpairs; ++p0)
        for (int i = 0; i < 16; ++i) dst[(r0 + i) * ldw + p0] = word(r0 + i, p0);
    }
  }
  for (int r = r0; r < m; ++r)
    for (int p = 0; p < kpairs; ++p) dst[r * ldw + p] = word(r, p);
}

#ifdef ORCHARD_AMX
// ---------------------------------------------------------------------------
// AMX path (Sapphire Rapids and later: amx_tile + amx_bf16). Hand-written
// with the compiler's intrinsics rather than oneDNN's ukernel API: oneDNN
// >= 3.5 with ukernels is only on PyPI (onednn / onednn-devel 2026.1, oneDNN
// 3.13, a TBB-threaded shared library, no pinned Debian package: bookworm has
// 2.6) and would have to be found, shipped and rpath'd by both the CMake and
// the pip builds, and carried to machines that reach no registry; the
// kernel below is ~100 lines around one instruction.
//
// Tiles (palette 1, all 16 rows x 64 bytes): tmm0..3 are a 2 x 2 block of
// C (16 x 16 fp32 each), tmm4/5 two A tiles (16 rows x 16 K pairs), tmm6/7
// two B tiles (16 K pairs x 16 columns). The pair-packed B of gemm_bf16.h is
// exactly AMX's B layout (row p of a tile = pair p of 16 columns, 64 bytes);
// a row-major A (a_ps == 2) is AMX's A layout; a pair-packed A^T (a_rs ==
// 2) is transposed to row-major first (pack_a_pairs_rows_avx512). Rows past the last
// multiple of 16 and K pairs past the last multiple of 16 go through the
// AVX-512-BF16 kernel (on the original operands, accumulating).
struct alignas(64) TileConfig {
  std::uint8_t palette_id = 1;
  std::uint8_t start_row = 0;
  std::uint8_t reserved[14] = {};
  std::uint16_t colsb[16] = {};
  std::uint8_t rows[16] = {};
};

const TileConfig& tile_config() {
  static const TileConfig cfg = [] {
    TileConfig c;
    for (int t = 0; t < 8; ++t) {
      c.colsb[t] = 64;
      c.rows[t] = 16;
    }
    return c;
  }();
  return cfg;
}

// > 0 while this thread is inside a Bf16GemmScope that loaded the tile config.
thread_local int t_amx_scope = 0;

bool detect_amx() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool amx_bf16 = (edx >> 22) & 1, amx_tile = (edx >> 24) & 1;
  if (!amx_bf16 || !amx_tile) return false;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !((ecx >> 27) & 1)) return false;  // OSXSAVE
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & (3u << 17)) != (3u << 17)) return false;  // XTILECFG + XTILEDATA enabled by the OS
  // Linux (5.16+) hands out the 8 KiB tile state on request only.
  constexpr long kArchGetXcompPerm = 0x1022, kArchReqXcompPerm = 0x1023, kXtileData = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXtileData) != 0) return false;
  unsigned long long perm = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &perm) != 0) return false;
  return (perm >> kXtileData) & 1;
}

ORCHARD_AMX_TARGET void amx_load_config() { _tile_loadconfig(&tile_config()); }
ORCHARD_AMX_TARGET void amx_release() { _tile_release(); }

// Terms [t0, t1) of one K step (s) into tmm0..3. Consecutive terms with the same A or B operand
// keep its tiles loaded (gemm_bf16x3_panels orders its terms by B plane).
template <int MT, int NT>
ORCHARD_AMX_TARGET inline __attribute__((always_inline)) void amx_terms_step(
    int s, int t0, int t1, const std::uint16_t* const* a, std::int64_t lda, const std::uint16_t* const* b,
    std::int64_t ldb) {
  const long as = lda * 2, bs = ldb * 2;
#pragma GCC unroll 6
  for (int t = t0; t < t1; ++t) {
    const bool load_a = t == t0 || a[t] != a[t - 1], load_b = t == t0 || b[t] != b[t - 1];
    const std::uint16_t* ak = a[t] + 32 * s;
    const std::uint16_t* bk = b[t] + 16 * s * ldb;
    // Each load just before the first product that needs it: 3-8 % faster than
    // all four loads first (cpu_gemm shapes of the forward, 1 thread, session 18).
    if (load_a) _tile_loadd(4, ak, as);
    if (load_b) _tile_loadd(6, bk, bs);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NT > 1) {
      if (load_b) _tile_loadd(7, bk + 32, bs);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (MT > 1) {
      if (load_a) _tile_loadd(5, ak + 16 * lda, as);
      _tile_dpbf16ps(2, 5, 6);
    }
    if constexpr (MT > 1 && NT > 1) _tile_dpbf16ps(3, 5, 7);
  }
}

// One MT x NT block of 16 x 16 C tiles over NTERMS products of ksteps * 16 K pairs each,
// C (+)= sum_t A_t B_t with the block in tmm0..3 throughout. a[t]: row-major bf16 (lda
// elements), b[t]: pair-packed (ldb elements per pair row). Several terms (gemm_bf16x3_panels):
// the last is the dominant one and the others are small corrections, so the block starts from
// zero, takes all K steps of the small terms first and of the last one after them, and a C to
// accumulate into is added at the end. The corrections' fp32 roundings then fall on sums 2^-8 the
// size of the result; accumulated K step by K step into C (or into the dominant term) they cost
// 2-3x a plain fp32 GEMM's error (CpuSplitBf16x3 test, session 58).
template <int MT, int NT, int NTERMS>
ORCHARD_AMX_TARGET inline __attribute__((always_inline)) void amx_block(
    int ksteps, const std::uint16_t* const* a, std::int64_t lda, const std::uint16_t* const* b,
    std::int64_t ldb, float* c, std::int64_t ldc, bool accumulate) {
  const long cs = ldc * 4;
  if (NTERMS == 1 && accumulate) {
    _tile_loadd(0, c, cs);
    if constexpr (NT > 1) _tile_loadd(1, c + 16, cs);
    if constexpr (MT > 1) _tile_loadd(2, c + 16 * ldc, cs);
    if constexpr (MT > 1 && NT > 1) _tile_loadd(3, c + 16 * ldc + 16, cs);
  } else {
    _tile_zero(0);
    if constexpr (NT > 1) _tile_zero(1);
    if constexpr (MT > 1) _tile_zero(2);
    if constexpr (MT > 1 && NT > 1) _tile_zero(3);
  }
  if constexpr (NTERMS > 1)
    for (int s = 0; s < ksteps; ++s) amx_terms_step<MT, NT>(s, 0, NTERMS - 1, a, lda, b, ldb);
  for (int s = 0; s < ksteps; ++s) amx_terms_step<MT, NT>(s, NTERMS - 1, NTERMS, a, lda, b, ldb);
  float* out = c;
  long os = cs;
  alignas(64) float sum[NTERMS > 1 ? MT * 16 * NT * 16 : 1];
  if (NTERMS > 1 && accumulate) out = sum, os = NT * 16 * 4;
  const std::int64_t ld = os / 4;
  _tile_stored(0, out, os);
  if constexpr (NT > 1) _tile_stored(1, out + 16, os);
  if constexpr (MT > 1) _tile_stored(2, out + 16 * ld, os);
  if constexpr (MT > 1 && NT > 1) _tile_stored(3, out + 16 * ld + 16, os);
  if (NTERMS > 1 && accumulate) add_rows(sum, MT * 16, NT * 16, c, ldc, true);
}

// The block of C at row i, column j (j % 32 == 0 or the last 16 columns): each term's operands
// offset to it.
template <int MT, int NT, int NTERMS>
ORCHARD_AMX_TARGET inline __attribute__((always_inline)) void amx_block_at(
    int i, int j, int ksteps, const std::uint16_t* const* a, std::int64_t lda,
    const std::uint16_t* const* b, std::int64_t ldb, std::int64_t b_block, float* c, std::int64_t ldc,
    bool accumulate) {
  const std::uint16_t* at[NTERMS];
  const std::uint16_t* bt[NTERMS];
  for (int t = 0; t < NTERMS; ++t) at[t] = a[t] + i * lda, bt[t] = b[t] + j / 32 * b_block;
  amx_block<MT, NT, NTERMS>(ksteps, at, lda, bt, ldb, c + i * ldc + j, ldc, accumulate);
}

// m % 16 == 0, n % 16 == 0, ksteps * 16 K pairs per term. B's columns 32 q .. 32 q + 31
// start at b[t] + q * b_block (pair rows ldb apart): 64 for a plain pair-packed B,
// 64 * kpairs for 32-column panels (gemm_bf16_panels).
template <int NTERMS>
ORCHARD_AMX_TARGET void gemm_amx_tiles(int m, int n, int ksteps, const std::uint16_t* const* a,
                                       std::int64_t lda, const std::uint16_t* const* b, std::int64_t ldb,
                                       std::int64_t b_block, float* c, std::int64_t ldc,
                                       bool accumulate) {
  int i = 0;
  for (; i + 32 <= m; i += 32) {
    int j = 0;
    for (; j + 32 <= n; j += 32)
      amx_block_at<2, 2, NTERMS>(i, j, ksteps, a, lda, b, ldb, b_block, c, ldc, accumulate);
    if (j < n) amx_block_at<2, 1, NTERMS>(i, j, ksteps, a, lda, b, ldb, b_block, c, ldc, accumulate);
  }
  if (i < m) {
    int j = 0;
    for (; j + 32 <= n; j += 32)
      amx_block_at<1, 2, NTERMS>(i, j, ksteps, a, lda, b, ldb, b_block, c, ldc, accumulate);
    if (j < n) amx_block_at<1, 1, NTERMS>(i, j, ksteps, a, lda, b, ldb, b_block, c, ldc, accumulate);
  }
}

// C (+)= sum_t A_t B_t over NTERMS terms of kpairs K pairs each. b_block as in gemm_amx_tiles: 64
// with ldb = 2n (plain), or 64 * kpairs with ldb = 64 (32-column panels; n % 32 == 0). Only a
// single term may have a pair-packed A^T (a_ps != 2): it is packed row-major first; several terms
// take row-major A's only.
template <int NTERMS>
void gemm_bf16_amx(int m, int n, int kpairs, const std::uint16_t* const* a, std::int64_t a_rs,
                   std::int64_t a_ps, const std::uint16_t* const* b, std::int64_t ldb, std::int64_t b_block,
                   float* c, std::int64_t ldc, bool accumulate) {
  static_assert(NTERMS >= 1);
  const int m16 = m / 16 * 16, ksteps = kpairs / 16, kmain = ksteps * 16;
  const bool scoped = t_amx_scope > 0;
  if (!scoped) amx_load_config();  // outside a scope: configure and release per call
  const std::uint16_t* arow[NTERMS];
  for (int t = 0; t < NTERMS; ++t) arow[t] = a[t];
  std::int64_t lda = a_rs;
  if (NTERMS == 1 && a_ps != 2) {  // pack rows [0, m16) x pairs [0, kmain) row-major
    thread_local CacheAlignedVector<std::uint32_t> packed;  // A tile rows on cache lines
    if (packed.size() < std::size_t(m16) * kmain) packed.resize(std::size_t(m16) * kmain);
    pack_a_pairs_rows_avx512(m16, kmain, a[0], a_rs, a_ps, packed.data(), kmain);
    arow[0] = reinterpret_cast<const std::uint16_t*>(packed.data());
    lda = 2 * kmain;
  }
  gemm_amx_tiles<NTERMS>(m16, n, ksteps, arow, lda, b, ldb, b_block, c, ldc, accumulate);
  if (!scoped) amx_release();
  // The remainders on vdpbf16ps: over the whole B, or panel by panel.
  const bool plain = b_block == 64;
  const int width = plain ? n : 32;
  if constexpr (NTERMS == 1) {
    for (int j = 0; j < n; j += width) {
      const std::uint16_t* bj = b[0] + j / 32 * b_block;
      if (kmain < kpairs)
        gemm_bf16_avx512(m16, width, kpairs - kmain, a[0] + kmain * a_ps, a_rs, a_ps, bj + kmain * ldb, ldb,
                         c + j, ldc, true);
      if (m16 < m)
        gemm_bf16_avx512(m - m16, width, kpairs, a[0] + m16 * a_rs, a_rs, a_ps, bj, ldb, c + m16 * ldc + j, ldc,
                         accumulate);
    }
  } else {
    // Several terms: summed into a zeroed part in amx_block's order, then added to C (amx_block says why).
    thread_local CacheAlignedVector<float> part;
    auto terms_then_add = [&](int rows, int k0, int r0, int j, bool add) {
      if (part.size() < std::size_t(rows) * width) part.resize(std::size_t(rows) * width);
      for (int t = 0; t < NTERMS; ++t)
        gemm_bf16_avx512(rows, width, kpairs - k0, a[t] + r0 * a_rs + k0 * a_ps, a_rs, a_ps,
                         b[t] + j / 32 * b_block + k0 * ldb, ldb, part.data(), width, t > 0);
      add_rows(part.data(), rows, width, c + r0 * ldc + j, ldc, add);
    };
    for (int j = 0; j < n; j += width) {
      if (kmain < kpairs && m16 > 0) terms_then_add(m16, kmain, 0, j, true);
      if (m16 < m) terms_then_add(m - m16, 0, m16, j, accumulate);
    }
  }
}
#endif  // ORCHARD_AMX
}  // namespace
#endif

bool bf16_dot_available() {
#ifdef ORCHARD_BF16_DOT
  static const bool yes = __builtin_cpu_supports("avx512bf16") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return yes && g_bf16_dot;
#else
  return false;
#endif
}

bool amx_available() {
#ifdef ORCHARD_AMX
  static const bool yes = [] {
    const char* env = std::getenv("ORCHARD_CPU_AMX");
    if (env && env[0] == '0') return false;
    return detect_amx();
  }();
  return yes && g_amx && bf16_dot_available();
#else
  return false;
#endif
}

int bf16_fwd_block_n() {
  if (g_bf16_fwd_block_n > 0) return g_bf16_fwd_block_n;
  if (!amx_available()) return kBf16FwdBlockN;
#ifdef ORCHARD_AMX
  static const int env_bn = [] {
    const char* env = std::getenv("ORCHARD_CPU_AMX_BN");
    const int v = env ? std::atoi(env) : 0;
    return v >= 16 && v <= 1024 && v % 16 == 0 ? v : 0;
  }();
  if (env_bn) return env_bn;
#endif
  return kAmxFwdBlockN;
}

namespace {
int env_block_m() {
#ifdef ORCHARD_AMX
  static const int env_bm = [] {
    const char* env = std::getenv("ORCHARD_CPU_AMX_BM");
    const int v = env ? std::atoi(env) : 0;
    return v >= 16 && v <= 512 && v % 16 == 0 ? v : 0;
  }();
  return env_bm;
#else
  return 0;
#endif
}
}  // namespace

int bf16_fwd_block_m() {
  if (g_bf16_fwd_block_m > 0) return g_bf16_fwd_block_m;
  if (!amx_available()) return kBlockM;
  if (const int bm = env_block_m()) return bm;
  return kAmxFwdBlockM;
}

bool bf16_fwd_block_m_is_default() {
  return g_bf16_fwd_block_m <= 0 && amx_available() && env_block_m() == 0;
}

Bf16GemmScope::Bf16GemmScope(bool bf16) {
#ifdef ORCHARD_AMX
  if (bf16 && amx_available()) {
    active_ = true;
    if (t_amx_scope++ == 0) amx_load_config();
  }
#else
  (void)bf16;
#endif
}

Bf16GemmScope::~Bf16GemmScope() {
#ifdef ORCHARD_AMX
  if (active_ && --t_amx_scope == 0) amx_release();
#endif
}

void pack_a_pairs_rows(int m, int kpairs, const std::uint16_t* a, std::int64_t a_rs,
                       std::int64_t a_ps, std::uint32_t* dst, std::int64_t ldw) {
#ifdef ORCHARD_BF16_DOT
  if (bf16_dot_available()) {
    pack_a_pairs_rows_avx512(m, kpairs, a, a_rs, a_ps, dst, ldw);
    return;
  }
#endif
  for (int r = 0; r < m; ++r)
    for (int p = 0; p < kpairs; ++p) std::memcpy(dst + r * ldw + p, a + r * a_rs + p * a_ps, 4);
}

void gemm_bf16(int m, int n, int kpairs, const std::uint16_t* a, std::int64_t a_rs,
               std::int64_t a_ps, const std::uint16_t* b, std::int64_t ldb, float* c,
               std::int64_t ldc, bool accumulate) {
#ifdef ORCHARD_BF16_DOT
#ifdef ORCHARD_AMX
  if (m >= kAmxMinM && kpairs >= kAmxMinKPairs && amx_available()) {
    gemm_bf16_amx<1>(m, n, kpairs, &a, a_rs, a_ps, &b, ldb, 64, c, ldc, accumulate);
    return;
  }
#endif
  gemm_bf16_avx512(m, n, kpairs, a, a_rs, a_ps, b, ldb, c, ldc, accumulate);
#else
  (void)m; (void)n; (void)kpairs; (void)a; (void)a_rs; (void)a_ps; (void)b; (void)ldb; (void)c;
  (void)ldc; (void)accumulate;
#endif
}

int bf16_b_panel(int n) {
  const int panel = g_bf16_b_panels > 0 ? g_bf16_b_panels : amx_available() ? kBf16BPanel : kBf16BPanelAvx512;
  return n % panel == 0 ? panel : n;
}

void gemm_bf16_panels(int m, int n, int kpairs, const std::uint16_t* a, std::int64_t a_rs,
                      std::int64_t a_ps, const std::uint16_t* b, int panel, float* c,
                      std::int64_t ldc, bool accumulate, int panel_kpairs) {
  if (panel_kpairs < kpairs) panel_kpairs = kpairs;
  if (panel == n) {
    gemm_bf16(m, n, kpairs, a, a_rs, a_ps, b, 2 * std::int64_t(n), c, ldc, accumulate);
    return;
  }
#ifdef ORCHARD_AMX
  if (panel == 32 && m >= kAmxMinM && kpairs >= kAmxMinKPairs && amx_available()) {
    gemm_bf16_amx<1>(m, n, kpairs, &a, a_rs, a_ps, &b, 2 * panel, std::int64_t(2) * panel * panel_kpairs, c,
                     ldc, accumulate);
    return;
  }
#endif
  for (int j = 0; j < n; j += panel)
    gemm_bf16(m, panel, kpairs, a, a_rs, a_ps, b + std::int64_t(j) * 2 * panel_kpairs, 2 * std::int64_t(panel),
              c + j, ldc, accumulate);
}

void gemm_bf16x3_panels(int m, int n, int kpairs, const std::uint16_t* a, std::int64_t lda,
                        std::int64_t a_plane, const std::uint16_t* b, std::int64_t b_plane, int panel,
                        float* c, std::int64_t ldc, bool accumulate, int panel_kpairs) {
  // The six (A plane, B plane) products of split_bf16x3.h: the five corrections grouped by B plane
  // (the AMX block loads each B tile once per K step for them), hi x hi last (amx_block).
  constexpr int kTerms = 6;
  constexpr int kAPlane[kTerms] = {0, 1, 0, 2, 1, 0}, kBPlane[kTerms] = {2, 1, 1, 0, 0, 0};
  if (panel_kpairs < kpairs) panel_kpairs = kpairs;
#ifdef ORCHARD_AMX
  if (panel == 32 && n % 32 == 0 && m >= kAmxMinM && kpairs >= kAmxMinKPairs && amx_available()) {
    const std::uint16_t* at[kTerms];
    const std::uint16_t* bt[kTerms];
    for (int t = 0; t < kTerms; ++t) at[t] = a + kAPlane[t] * a_plane, bt[t] = b + kBPlane[t] * b_plane;
    gemm_bf16_amx<kTerms>(m, n, kpairs, at, lda, 2, bt, 2 * panel, std::int64_t(2) * panel * panel_kpairs, c,
                          ldc, accumulate);
    return;
  }
#endif
  // Elsewhere (fewer than 16 rows or K pairs, other panels): term by term in the same order, into a
  // zeroed part that is then added to a C to accumulate into (amx_block says why).
  float* out = c;
  std::int64_t ldo = ldc;
  thread_local CacheAlignedVector<float> part;
  if (accumulate) {
    if (part.size() < std::size_t(m) * n) part.resize(std::size_t(m) * n);
    out = part.data(), ldo = n;
  }
  for (int t = 0; t < kTerms; ++t)
    gemm_bf16_panels(m, n, kpairs, a + kAPlane[t] * a_plane, lda, 2, b + kBPlane[t] * b_plane, panel, out, ldo,
                     t > 0, panel_kpairs);
#ifdef ORCHARD_BF16_DOT
  if (accumulate) add_rows(part.data(), m, n, c, ldc, true);
#endif
}

void to_bf16_pairs_t(const float* src, std::int64_t lds, int rows, int n, std::uint16_t* dst,
                     std::int64_t ldd) {
#ifdef ORCHARD_BF16_DOT
  to_bf16_pairs_t_avx512(src, lds, rows, n, dst, ldd);
#else
  (void)src; (void)lds; (void)rows; (void)n; (void)dst; (void)ldd;
#endif
}

void to_bf16_rows(const float* src, std::int64_t lds, int rows, int n, std::uint16_t* dst,
                  std::int64_t ldd) {
#ifdef ORCHARD_BF16_DOT
  to_bf16_avx512(src, lds, rows, n, dst, ldd);
#else
  (void)src; (void)lds; (void)rows; (void)n; (void)dst; (void)ldd;
#endif
}

}  // namespace orchard::cpu
