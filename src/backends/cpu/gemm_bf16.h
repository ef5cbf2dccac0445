// bf16 x bf16 -> fp32 tile products with AVX-512-BF16 (vdpbf16ps: 32 bf16
// multiply-adds into 16 fp32 lanes per instruction, twice the fp32 FMA rate
// on Zen 4). Used for bf16 inputs only, where the kernels may round to bf16
// what they multiply (the inputs already are; P is rounded the way torch's
// bf16 kernels round it).
//
// Layout ("pair-packed", the VNNI layout): the reduction dimension K is taken
// two at a time. A's pair (row r, K pair p) is the 32-bit word at
// a + r * a_rs + p * a_ps (uint16 units): row-major A (element (r, k) at
// a[r * lda + k], lda even) is a_rs = lda, a_ps = 2; a pair-packed A^T (as
// written by to_bf16_pairs_t) is a_rs = 2, a_ps = its ldd. B is stored as pairs:
// element (k, j) at b[(k / 2) * ldb + 2 * j + k % 2]. C (M x N fp32, ldc)
// (+)= A B over kpairs * 2 values of K. N % 16 == 0; M arbitrary.
//
// Where amx_available(), 16 x 16 blocks of C run on AMX tiles (the
// pair-packed B is AMX's B-tile layout, a row-major A its A-tile layout),
// the rest on vdpbf16ps (gemm_bf16.cpp).
#pragma once

#include <cstdint>

namespace orchard::cpu {

// True when the CPU runs vdpbf16ps (AVX512_BF16 + AVX512BW/VL) and the
// bf16 path is enabled (g_bf16_dot).
bool bf16_dot_available();
// Tests and A/B timing switch it off to run the fp32 path on bf16 inputs.
inline bool g_bf16_dot = true;

// True when gemm_bf16 runs its 16-row x 16-K-pair blocks on AMX tiles
// (tdpbf16ps; Sapphire Rapids and later): the CPU has AMX-TILE and
// AMX-BF16, the OS granted this process the tile state (Linux
// arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA), asked on the first call),
// bf16_dot_available() (the row / K-pair remainders run on vdpbf16ps), g_amx,
// and ORCHARD_CPU_AMX is not "0" in the environment (read once).
bool amx_available();
inline bool g_amx = true;
// Calls with fewer rows or K pairs than these stay on AVX-512-BF16.
inline constexpr int kAmxMinM = 16, kAmxMinKPairs = 16;

// Key columns per tile of the bf16 forward (forward.cpp): g_bf16_fwd_block_n
// when set (tests: wide tiles on any CPU), else on AMX kAmxFwdBlockN or
// ORCHARD_CPU_AMX_BN from the environment (a multiple of 16 in [16, 1024],
// read once, for timing), else kBf16FwdBlockN. With AMX the GEMMs are ~8x
// faster and the per-tile row work (max, sum, rescale of the output rows)
// dominates, so wider tiles pay. On vdpbf16ps too since the softmax rewrite
// (session 19): 2-core Zen 5 box (no AMX), 2 threads, 64 x 256 tiles with
// K^T / V in 64-column panels vs 64 x 64 plain, 3 alternating rounds: bf16
// forward s512 / s1k d64 1.30 / 1.24x, s512 / s1k / s2k d128 1.10 / 1.12 /
// 1.18x, causal s1k d64 / s2k d128 1.09 / 1.04x; 512 columns gained at most
// 5 % more non-causal and lost 3 % causal (session 20, bench/NOTES.md).
int bf16_fwd_block_n();
inline int g_bf16_fwd_block_n = 0;
inline constexpr int kAmxFwdBlockN = 256, kBf16FwdBlockN = 256;
// Query rows per task of the bf16 forward, the same way: g_bf16_fwd_block_m,
// else on AMX kAmxFwdBlockM or ORCHARD_CPU_AMX_BM (a multiple of 16 in
// [16, 512]), else kBlockM. More rows per task read each K / V tile once for
// more rows (torch's AMX path takes 256-row query blocks at long sequences).
// With the default (not set by the test hook or the environment), the forward
// takes kAmxSmallBlockM rows per task when kAmxFwdBlockM would give fewer than
// 4 tasks per thread (forward.cpp).
int bf16_fwd_block_m();
bool bf16_fwd_block_m_is_default();
inline int g_bf16_fwd_block_m = 0;
inline constexpr int kAmxFwdBlockM = 128, kAmxSmallBlockM = 64;

// Holds the AMX tile configuration on this thread for its lifetime, so the
// gemm_bf16 calls inside it skip the per-call ldtilecfg / tilerelease; put one
// at the top of each parallel region whose thread calls gemm_bf16 (bf16: the
// region runs the bf16 path). The configuration is loaded per region, not
// once per thread for good: other libraries' AMX kernels (oneDNN's brgemm in
// torch's CPU SDPA) run on the same OpenMP threads and reconfigure or release
// the tiles between our calls. Nothing but gemm_bf16 may touch the tiles
// inside a scope. Nests; no-op without AMX.
class Bf16GemmScope {
 public:
  explicit Bf16GemmScope(bool bf16);
  ~Bf16GemmScope();
  Bf16GemmScope(const Bf16GemmScope&) = delete;
  Bf16GemmScope& operator=(const Bf16GemmScope&) = delete;

 private:
  bool active_ = false;
};

// dst[r * ldw + p] = the 32-bit pair (row r, K pair p) of an A in
// gemm_bf16's layout (a, a_rs, a_ps), r < m, p < kpairs: a row-major copy
// (the AMX A-tile layout). The AMX path packs a pair-packed A^T (a_rs == 2)
// this way; exposed for the tests.
void pack_a_pairs_rows(int m, int kpairs, const std::uint16_t* a, std::int64_t a_rs,
                       std::int64_t a_ps, std::uint32_t* dst, std::int64_t ldw);

void gemm_bf16(int m, int n, int kpairs, const std::uint16_t* a, std::int64_t a_rs,
               std::int64_t a_ps, const std::uint16_t* b, std::int64_t ldb, float* c,
               std::int64_t ldc, bool accumulate);

// B in column panels: panel q (columns q * panel .. + panel - 1) is a pair-packed
// B of its own, kpairs rows of 2 * panel values (ldb = 2 * panel), at
// b + q * kpairs * 2 * panel; n % panel == 0. panel == n is gemm_bf16's plain
// layout (ldb = 2n). On AMX a B tile read from a panel is 16 rows of 64 bytes
// 128 bytes apart instead of 4 n bytes (1 KB at n = 256: 16 lines in a few L1
// sets, and no stream the L2 prefetcher follows): with B from L2, 32-column
// panels ran S = Q K^T (128 x 256, d128) 1.2x and O += P V 1.5x faster
// (bench/NOTES.md, session 18).
inline constexpr int kBf16BPanel = 32;
// Without AMX, the vdpbf16ps kernel's column panel (64 columns, NV = 4) is
// the natural width: a 256-column K^T tile in the plain layout has its pair
// rows 1 KB apart, so the d128 S GEMM's 64 pair rows of one 64-column panel
// fall into 8 L1 sets (16 lines each, 12 ways); in 64-column panels they are
// 128 bytes apart. Zen 5, 2 threads, 64 x 256 tiles: 64-column panels vs the
// plain layout 1.07x (s1k d64), 32-column panels (the AMX width: 6 x 32
// micro-tiles, more broadcasts per product) 0.92x (one run each, session 20).
inline constexpr int kBf16BPanelAvx512 = 64;
// The panel width the staging should use for a B of n columns: kBf16BPanel
// on AMX, kBf16BPanelAvx512 on vdpbf16ps, g_bf16_b_panels when set (tests:
// 32 or 64 on any bf16 CPU), if n is a multiple of it, else n (the plain layout).
int bf16_b_panel(int n);
inline int g_bf16_b_panels = 0;
// panel_kpairs (>= kpairs; 0: kpairs) is the pair rows each panel holds, so a
// product may use the first kpairs of them (the forward's last causal tile:
// P V over the visible key columns only).
void gemm_bf16_panels(int m, int n, int kpairs, const std::uint16_t* a, std::int64_t a_rs,
                      std::int64_t a_ps, const std::uint16_t* b, int panel, float* c,
                      std::int64_t ldc, bool accumulate, int panel_kpairs = 0);

// C (+)= the fp32 product A B of operands split into three bf16 planes each (split_bf16x3.h): the
// six products of weight >= 2^-16, C kept in AMX tiles through all six where gemm_bf16_panels would
// run AMX, else six gemm_bf16_panels calls. A row-major (row r, K pair p at a + r * lda + 2 p; plane
// x at a + x * a_plane), B in panels as gemm_bf16_panels (plane x at b + x * b_plane).
void gemm_bf16x3_panels(int m, int n, int kpairs, const std::uint16_t* a, std::int64_t lda,
                        std::int64_t a_plane, const std::uint16_t* b, std::int64_t b_plane, int panel,
                        float* c, std::int64_t ldc, bool accumulate, int panel_kpairs = 0);

// dst[r * ldd + j] = bf16(src[r * lds + j]) for j < n (n % 16 == 0), round to nearest even.
void to_bf16_rows(const float* src, std::int64_t lds, int rows, int n, std::uint16_t* dst,
                  std::int64_t ldd);

// Pair-packs a fp32 tile (rows x n, lds; n % 16 == 0) along its rows:
// dst[(r / 2) * ldd + 2 * j + r % 2] = bf16(src[r * lds + j]); an odd last row
// gets a zero partner. As the A operand this is src^T (a_rs = 2, a_ps = ldd),
// as the B operand src itself (ldb = ldd).
void to_bf16_pairs_t(const float* src, std::int64_t lds, int rows, int n, std::uint16_t* dst,
                     std::int64_t ldd);

}  // namespace orchard::cpu
