// sm90_gemm_bench.cu -- warp-specialized wgmma + TMA GEMM microbenchmark (issue #11, step 1).
//
//   C[M,N] = A[M,K] * B[N,K]^T   A, B, C bf16 or fp16 (row-major, K-major operands), fp32 accumulate.
//
// The kernel is the skeleton the sm90 attention kernels will reuse, built only from the PTX
// wrappers in src/backends/cuda/sm90/:
//   - persistent grid (one CTA per SM, or one 2-CTA cluster per SM pair), tiles walked in
//     groups of `group_m` 128-row blocks (run-time, --groups) so concurrently running CTAs share
//     A and B rows in L2;
//   - warpgroup 0 = producer: one elected thread issues TMA loads of 128B-swizzled A/B tiles
//     into a kStages-deep ring of smem stages; "full" mbarriers carry the TMA byte count,
//     "empty" mbarriers count consumer warps that finished reading the stage;
//   - warpgroups 1 and 2 = consumers: each owns 64 rows of the 128-row tile and issues
//     wgmma m64nBNk16 (4 per 64-wide k step), keeping one wgmma group in flight (wait<1>) and
//     releasing the previous stage as soon as its group retired;
//   - setmaxnreg moves registers from the producer (40) to the consumers (232) so 128 fp32
//     accumulators per thread (64x256 per warpgroup) fit without spills;
//   - clusters of kCM x kCN CTAs (kCM along M, kCN along N): CTAs in one cluster column share
//     the B tile, CTAs in one cluster row share the A tile; each loads 1/kCM of B (1/kCN of A)
//     and TMA-multicasts it to the CTAs that share it, cutting L2->SM traffic.  E.g. 2x1: the
//     two CTAs compute vertically adjacent tiles with the same
//     B columns; each loads half of the B tile and multicasts it to both, halving B's L2 traffic.
//
// Checks: outputs poisoned (0xFF = NaN) before each checked run; full comparison against
// cuBLAS (cublasGemmEx, same dtypes, fp32 compute) and fp64 host reference on sampled entries
// for both our kernel and cuBLAS.  Timing: CUDA events around each launch, warm-up, median.
//
// Build: see bench/sm90/run.sh (nvcc -O3 -gencode=arch=compute_90a,code=sm_90a ... -lcublas).
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "../../src/backends/cuda/sm90/sm90.cuh"
#include "../../src/backends/cuda/sm90/tma_host.h"
#include "wgmma_selftest.cuh"

using namespace orchard::sm90;

#define CK(x)                                                                          \
  do {                                                                                 \
    cudaError_t e_ = (x);                                                              \
    if (e_ != cudaSuccess) {                                                           \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorString(e_), __FILE__, \
                   __LINE__, #x);                                                      \
      std::exit(2);                                                                    \
    }                                                                                  \
  } while (0)
#define CKB(x)                                                                             \
  do {                                                                                     \
    cublasStatus_t s_ = (x);                                                               \
    if (s_ != CUBLAS_STATUS_SUCCESS) {                                                     \
      std::fprintf(stderr, "cuBLAS error %d at %s:%d: %s\n", (int)s_, __FILE__, __LINE__, #x); \
      std::exit(2);                                                                        \
    }                                                                                      \
  } while (0)

// ------------------------------------------------------------------------------------------
// Kernel
// ------------------------------------------------------------------------------------------
constexpr int kBM = 128;                 // rows per CTA tile (2 consumer warpgroups x 64)
constexpr int kBK = 64;                  // default k tile: 64 x 2 bytes = one 128-byte swizzle row
constexpr int kThreads = 384;            // producer warpgroup + 2 consumer warpgroups
constexpr int kProducerRegs = 40;
constexpr int kConsumerRegs = 232;       // 128*40 + 256*232 = 64512 <= 65536

template <int BN, int kStages, int kCM, int kCN, bool kTmaStore = false, int BK = kBK>
struct Cfg {
  // k tile: 64 (128-byte rows, 128B swizzle) or 32 (64-byte rows, 64B swizzle: twice the
  // stages in the same smem, so a released stage is a smaller share of the prefetch depth).
  static_assert(BK == 64 || BK == 32, "k tile");
  static constexpr int kBKt = BK;
  static constexpr int kRowBytes = BK * 2;
  static constexpr int kABytes = kBM * kRowBytes;
  static constexpr int kBBytes = BN * kRowBytes;
  static constexpr int kStageBytes = kABytes + kBBytes;
  // TMA-store epilogue: per consumer warpgroup one 64x128 staging buffer (two 64x64 boxes,
  // 128B-swizzled, 8 KB each); a 64x256 result goes out in two halves.
  static constexpr int kCBytes = kTmaStore ? 2 * 16384 : 0;
  // tiles + C staging + 1 KB for aligning the base to the 128B-swizzle atom + barriers
  static constexpr int kSmem = kStages * kStageBytes + kCBytes + 1024 + 2 * kStages * 8;
  static_assert(kSmem <= 227 * 1024, "too much shared memory");
  static_assert(BN % (8 * kCM) == 0 && kBM % (8 * kCN) == 0, "tiles split across the cluster");
  static constexpr int kCS = kCM * kCN;                    // CTAs per cluster
  static constexpr int kAPart = kBM / kCN;                 // A rows each CTA loads (and multicasts)
  static constexpr int kBPart = BN / kCM;                  // B rows each CTA loads (and multicasts)
  static constexpr int kPeers = kCM + kCN - 1;             // CTAs writing into / reading from my stages
};

template <typename T> struct Pack2;
template <> struct Pack2<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static __device__ __forceinline__ type make(float a, float b) { return __floats2bfloat162_rn(a, b); }
};
template <> struct Pack2<__half> {
  using type = __half2;
  static __device__ __forceinline__ type make(float a, float b) { return __floats2half2_rn(a, b); }
};
template <typename P2> __device__ __forceinline__ uint32_t pack_bits(P2 v) {
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}

// Tile t (in units of cluster tiles: kCM x kCN CTA tiles) -> (m_blk, n_blk)
// in cluster-tile units.  Grouped raster: walk kGroup cluster-rows down a column
// strip before moving right, so ~132 concurrent CTAs touch few distinct A and B rows.
__device__ __forceinline__ void tile_coords(int t, int num_m, int num_n, int group, int& m_blk,
                                            int& n_blk) {
  const int per_group = group * num_n;
  const int g = t / per_group;
  const int first_m = g * group;
  const int gm = min(num_m - first_m, group);
  const int r = t - g * per_group;
  m_blk = first_m + r % gm;
  n_blk = r / gm;
}

// Diagnostic modes (results are wrong by design; the bench reports their speed only):
//   kDiagNoLoad:  after filling each stage once, the producer only arrives on "full" (no TMA):
//                 the same pipeline and barriers with no L2/HBM traffic -> the MMA-issue ceiling.
//   kDiagNoStore: the epilogue stores nothing (behind a branch ptxas can't fold) -> its cost.
enum Diag { kDiagNone = 0, kDiagNoLoad = 1, kDiagNoStore = 2 };

template <typename T, int BN, int kStages, int kCM, int kCN, int kDiag = kDiagNone,
          bool kTmaStore = false, int BK = kBK>
__global__ void __launch_bounds__(kThreads, 1)
    gemm_ws_kernel(const __grid_constant__ CUtensorMap tm_a, const __grid_constant__ CUtensorMap tm_b,
                   const __grid_constant__ CUtensorMap tm_c, T* __restrict__ C, int M, int N, int K,
                   int group) {
  using C_ = Cfg<BN, kStages, kCM, kCN, kTmaStore, BK>;
  static_assert(!kTmaStore || BN % 128 == 0, "TMA-store epilogue writes 128-column halves");
  constexpr int kCluster = C_::kCS;
  static_assert(kDiag != kDiagNoLoad || kCluster == 1, "no-load diagnostic: single CTA only");
  extern __shared__ uint8_t smem_raw[];
  // 128B-swizzled tiles must start on a 1024-byte boundary (wgmma base offset 0).
  const uint32_t smem_base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t sA = smem_base;                               // kStages x [128 x 64]
  const uint32_t sB = smem_base + kStages * C_::kABytes;       // kStages x [BN x 64]
  const uint32_t sC = smem_base + kStages * C_::kStageBytes;   // [2 WG][2 boxes 64x64]
  const uint32_t bar_full = sC + C_::kCBytes;
  const uint32_t bar_empty = bar_full + kStages * 8;

  const int warp = warp_idx_uniform();
  const int lane = threadIdx.x & 31;
  const int wg = warp / 4;
  const uint32_t cta_rank = kCluster > 1 ? cluster_ctarank() : 0;
  const int rm = cta_rank % kCM, rn = cta_rank / kCM;   // position in the cluster

  if (threadIdx.x == 0) {
    tma_prefetch_desc(&tm_a);
    tma_prefetch_desc(&tm_b);
    if constexpr (kTmaStore) tma_prefetch_desc(&tm_c);
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(bar_full + 8 * s, 1);                 // the producer's arrive_expect_tx
      mbarrier_init(bar_empty + 8 * s, 8 * C_::kPeers);   // one per consumer warp of each
                                                          // CTA sharing A or B with this one
    }
    mbarrier_init_fence();
  }
  if constexpr (kCluster > 1) cluster_sync();  // peers' barriers exist before any remote use
  else __syncthreads();

  group = max(1, group / kCM);              // raster group in cluster-tile rows
  const int num_m = M / (kBM * kCM);        // in cluster tiles
  const int num_n = N / (BN * kCN);
  const int num_tiles = num_m * num_n;
  const int k_iters = K / BK;
  const int cluster_id = blockIdx.x / kCluster;
  const int num_clusters = gridDim.x / kCluster;

  if (wg == 0) {
    // ---------------- producer ----------------
    setmaxnreg_dec<kProducerRegs>();
    if (warp == 0 && elect_one_sync()) {
      int stage = 0;
      uint32_t phase = 0;
      int issued = 0;
      for (int t = cluster_id; t < num_tiles; t += num_clusters) {
        int mc, nb;
        tile_coords(t, num_m, num_n, group, mc, nb);
        const int row_a = (mc * kCM + rm) * kBM;
        const int row_b = (nb * kCN + rn) * BN;
        for (int k = 0; k < k_iters; ++k) {
          mbarrier_wait(bar_empty + 8 * stage, phase ^ 1);
          const uint32_t full = bar_full + 8 * stage;
          if (kDiag == kDiagNoLoad && issued++ >= kStages) {
            mbarrier_arrive(full);
            if (++stage == kStages) { stage = 0; phase ^= 1; }
            continue;
          }
          mbarrier_arrive_expect_tx(full, C_::kStageBytes);
          if constexpr (kCN == 1) {
            tma_load_2d(sA + stage * C_::kABytes, &tm_a, full, k * BK, row_a);
          } else {  // my slice rn of A -> every CTA of my cluster row (same rm)
            uint16_t mask = 0;
#pragma unroll
            for (int j = 0; j < kCN; ++j) mask |= 1u << (rm + kCM * j);
            tma_load_2d_multicast(sA + stage * C_::kABytes + rn * C_::kAPart * C_::kRowBytes, &tm_a,
                                  full, k * BK, row_a + rn * C_::kAPart, mask);
          }
          if constexpr (kCM == 1) {
            tma_load_2d(sB + stage * C_::kBBytes, &tm_b, full, k * BK, row_b);
          } else {  // my slice rm of B -> every CTA of my cluster column (same rn)
            uint16_t mask = 0;
#pragma unroll
            for (int i = 0; i < kCM; ++i) mask |= 1u << (i + kCM * rn);
            tma_load_2d_multicast(sB + stage * C_::kBBytes + rm * C_::kBPart * C_::kRowBytes, &tm_b,
                                  full, k * BK, row_b + rm * C_::kBPart, mask);
          }
          if (++stage == kStages) { stage = 0; phase ^= 1; }
        }
      }
      // Drain: wait until every consumer warp (of every CTA in the cluster) released every
      // stage, so no peer can still multicast into, or arrive on, this CTA after it exits.
      for (int s = 0; s < kStages; ++s) {
        mbarrier_wait(bar_empty + 8 * stage, phase ^ 1);
        if (++stage == kStages) { stage = 0; phase ^= 1; }
      }
    }
  } else {
    // ---------------- consumers ----------------
    setmaxnreg_inc<kConsumerRegs>();
    const int cw = wg - 1;             // which 64-row half of the tile
    const int wq = warp & 3;           // warp within the warpgroup
    float acc[BN / 2];
    // Stage release targets: lane j < kPeers signals one CTA that writes into my stages (and
    // whose stages I read): j < kCN -> (rm, j) of my cluster row (me included), then the
    // other CTAs (i, rn) of my cluster column.
    uint32_t peer = 0;
    if (lane < kCN) peer = rm + kCM * lane;
    else if (lane < C_::kPeers) { const int i = lane - kCN; peer = (i < rm ? i : i + 1) + kCM * rn; }
    int stage = 0;
    uint32_t phase = 0;
    using Pk = Pack2<T>;
    for (int t = cluster_id; t < num_tiles; t += num_clusters) {
      int mc, nb;
      tile_coords(t, num_m, num_n, group, mc, nb);
      int prev_stage = 0;
      for (int k = 0; k < k_iters; ++k) {
        mbarrier_wait(bar_full + 8 * stage, phase);
        const uint64_t da = make_desc_kmajor_swizzled<C_::kRowBytes>(
            sA + stage * C_::kABytes + cw * 64 * C_::kRowBytes);
        const uint64_t db = make_desc_kmajor_swizzled<C_::kRowBytes>(sB + stage * C_::kBBytes);
        fence_operands(acc);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
          // +32 bytes per k16 slice inside the swizzled row (wgmma_desc.cuh)
          Wgmma<BN, T>::ss(acc, desc_advance(da, kk * 32), desc_advance(db, kk * 32),
                           (k > 0 || kk > 0) ? 1 : 0);
        }
        wgmma_commit();
        fence_operands(acc);
        // Keep this k step's group in flight; the previous one has retired after this wait,
        // so its stage can go back to the producer(s).
        wgmma_wait<1>();
        fence_operands(acc);
        if (k > 0 && lane < C_::kPeers) {
          if constexpr (kCluster == 1) mbarrier_arrive(bar_empty + 8 * prev_stage);
          else mbarrier_arrive_cluster(bar_empty + 8 * prev_stage, peer);
        }
        prev_stage = stage;
        if (++stage == kStages) { stage = 0; phase ^= 1; }
      }
      wgmma_wait<0>();
      fence_operands(acc);
      if (lane < C_::kPeers) {
        if constexpr (kCluster == 1) mbarrier_arrive(bar_empty + 8 * prev_stage);
        else mbarrier_arrive_cluster(bar_empty + 8 * prev_stage, peer);
      }
      // Epilogue: registers -> global, 2 columns (4 bytes) per store.  The producer is already
      // loading the next tile's stages meanwhile.
      const int row0 = (mc * kCM + rm) * kBM + cw * 64 + wq * 16 + (lane >> 2);
      const int col0 = (nb * kCN + rn) * BN + 2 * (lane & 3);
      T* c0 = C + static_cast<size_t>(row0) * N + col0;
      T* c1 = c0 + static_cast<size_t>(8) * N;
      if constexpr (kDiag == kDiagNoStore) {
        // N >= 0 always, but ptxas can't know: the accumulators stay live (else it deletes
        // the HGMMAs whose results are never stored) and the stores are never executed.
        if (N >= 0) continue;
      }
      if constexpr (kTmaStore) {
        // stmatrix into this warpgroup's 128B-swizzled staging buffer, then one thread sends
        // it out with TMA stores, asynchronously: the warpgroup goes on to the next tile's
        // MMAs while the copy engine reads the buffer.
        const uint32_t buf = sC + cw * 16384;
        const bool leader = (threadIdx.x & 127) == 0;
        const int row_g = (mc * kCM + rm) * kBM + cw * 64;   // first global row of this WG
        const int col_g = (nb * kCN + rn) * BN;
        const int mi = lane >> 3;                              // which of the 4 matrices
        const int r = wq * 16 + (mi & 1) * 8 + (lane & 7);     // row (of 64) this lane addresses
#pragma unroll
        for (int h = 0; h < BN / 128; ++h) {
          if (leader) tma_store_wait_read<0>();                // buffer no longer read by TMA
          named_barrier_sync(1 + cw, 128);
#pragma unroll
          for (int jj = 0; jj < 8; ++jj) {
            const int j = h * 16 + 2 * jj;                     // 8-column block of the 64xBN tile
            const int cb = 2 * jj + (mi >> 1);                 // 8-column block within the half
            const uint32_t addr = buf + (cb >> 3) * 8192 + r * 128 + (((cb & 7) ^ (r & 7)) << 4);
            stmatrix_x4(addr, pack_bits(Pk::make(acc[4 * j + 0], acc[4 * j + 1])),
                        pack_bits(Pk::make(acc[4 * j + 2], acc[4 * j + 3])),
                        pack_bits(Pk::make(acc[4 * j + 4], acc[4 * j + 5])),
                        pack_bits(Pk::make(acc[4 * j + 6], acc[4 * j + 7])));
          }
          fence_proxy_async_smem();                            // st.shared -> TMA (async proxy)
          named_barrier_sync(1 + cw, 128);
          if (leader) {
            tma_store_2d(&tm_c, buf, col_g + h * 128, row_g);
            tma_store_2d(&tm_c, buf + 8192, col_g + h * 128 + 64, row_g);
            tma_store_commit();
          }
        }
      } else {
        // Direct stores: registers -> global, 2 columns (4 bytes) per store.
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
          *reinterpret_cast<typename Pk::type*>(c0 + 8 * j) = Pk::make(acc[4 * j + 0], acc[4 * j + 1]);
          *reinterpret_cast<typename Pk::type*>(c1 + 8 * j) = Pk::make(acc[4 * j + 2], acc[4 * j + 3]);
        }
      }
    }
    // Outstanding TMA stores must finish reading smem (and writing C) before the CTA exits.
    if constexpr (kTmaStore) {
      if ((threadIdx.x & 127) == 0) tma_store_wait_all<0>();
    }
  }
}

// ------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------
template <typename T> struct DT;
template <> struct DT<__nv_bfloat16> {
  static constexpr const char* name = "bf16";
  static constexpr cudaDataType_t cublas = CUDA_R_16BF;
  static constexpr CUtensorMapDataType tma = CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  static double to_d(__nv_bfloat16 x) { return (double)__bfloat162float(x); }
  static constexpr double u = 1.0 / 256;    // unit roundoff (8 significant bits)
};
template <> struct DT<__half> {
  static constexpr const char* name = "fp16";
  static constexpr cudaDataType_t cublas = CUDA_R_16F;
  static constexpr CUtensorMapDataType tma = CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  static double to_d(__half x) { return (double)__half2float(x); }
  static constexpr double u = 1.0 / 2048;   // unit roundoff (11 significant bits)
};

template <typename T>
__global__ void init_kernel(T* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    uint32_t x = (uint32_t)i * 2654435761u ^ (uint32_t)(i >> 32) ^ seed;
    x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16;
    p[i] = (T)((float)(x >> 8) * (2.0f / 16777216.0f) - 1.0f);  // uniform [-1, 1)
  }
}

// Full-matrix comparison on the device: max over i of |x_i - y_i| / max(|y_i|, floor), sum y^2,
// and the count of non-finite x.  With floor = rms(y) the ratio is a relative error for large
// entries and does not blow up on entries near zero; two outputs rounded to 16 bits from nearly
// equal fp32 sums differ by at most ~1 ulp, i.e. 2u relative.
template <typename T>
__global__ void diff_kernel(const T* x, const T* y, size_t n, float floor, unsigned* max_bits,
                            double* sumsq, unsigned long long* bad) {
  float m = 0.f; double s = 0.0; unsigned long long b = 0;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    float a = (float)x[i], r = (float)y[i];
    s += (double)r * r;
    if (!isfinite(a)) { ++b; continue; }
    m = fmaxf(m, fabsf(a - r) / fmaxf(fabsf(r), floor));
  }
  for (int o = 16; o; o >>= 1) {
    m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o));
    s += __shfl_xor_sync(0xffffffff, s, o);
    b += __shfl_xor_sync(0xffffffff, b, o);
  }
  if ((threadIdx.x & 31) == 0) {
    atomicMax(max_bits, __float_as_uint(m));   // m >= 0: uint order == float order
    atomicAdd(sumsq, s);
    atomicAdd(bad, b);
  }
}

template <typename T, int BN, int kStages, int kCM, int kCN, int kDiag = kDiagNone,
          bool kTmaStore = false, int BK = kBK>
struct Runner {
  using C_ = Cfg<BN, kStages, kCM, kCN, kTmaStore, BK>;
  static constexpr int kCluster = C_::kCS;
  CUtensorMap ta{}, tb{}, tc{};
  int grid = 0;
  bool ok = false;
  const T *A, *B;
  T* C;
  int M, N, K;
  std::string why;

  // persistent: grid = one CTA (cluster) per SM (pair/quad), tiles strided over it;
  // otherwise a plain grid with one tile per CTA (the same kernel, its tile loop runs once).
  Runner(const T* A_, const T* B_, T* C_out, int M_, int N_, int K_, int num_sms, bool persistent = true)
      : A(A_), B(B_), C(C_out), M(M_), N(N_), K(K_) {
    if (M % (kBM * kCM) || N % (BN * kCN) || K % BK) { why = "shape not a tile multiple"; return; }
    const CUtensorMapSwizzle swz = BK == 64 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_64B;
    if (!make_tma_2d(&ta, DT<T>::tma, A, M, K, K, C_::kAPart, BK, swz)) { why = "tensor map A"; return; }
    if (!make_tma_2d(&tb, DT<T>::tma, B, N, K, K, C_::kBPart, BK, swz)) { why = "tensor map B"; return; }
    if (!make_tma_2d(&tc, DT<T>::tma, C, M, N, N, 64, 64)) { why = "tensor map C"; return; }
    auto kern = gemm_ws_kernel<T, BN, kStages, kCM, kCN, kDiag, kTmaStore, BK>;
    CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, C_::kSmem));
    const int tiles = (M / (kBM * kCM)) * (N / (BN * kCN));   // cluster tiles
    int max_clusters = num_sms / kCluster;
    if (kCluster > 1) {
      CK(cudaFuncSetAttribute(kern, cudaFuncAttributeNonPortableClusterSizeAllowed, 0));
      cudaLaunchConfig_t cfg = launch_cfg(max_clusters * kCluster);
      cudaLaunchAttribute at[1];
      cfg.attrs = at; cfg.numAttrs = 1;
      at[0].id = cudaLaunchAttributeClusterDimension;
      at[0].val.clusterDim.x = kCluster; at[0].val.clusterDim.y = 1; at[0].val.clusterDim.z = 1;
      int n = 0;
      cudaError_t e = cudaOccupancyMaxActiveClusters(&n, kern, &cfg);
      if (e != cudaSuccess || n <= 0) { why = std::string("cluster occupancy: ") + cudaGetErrorString(e); cudaGetLastError(); return; }
      max_clusters = std::min(max_clusters, n);
    }
    grid = (persistent ? std::min(max_clusters, tiles) : tiles) * kCluster;
    ok = true;
  }
  static cudaLaunchConfig_t launch_cfg(int g) {
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(g, 1, 1);
    cfg.blockDim = dim3(kThreads, 1, 1);
    cfg.dynamicSmemBytes = C_::kSmem;
    cfg.stream = 0;
    return cfg;
  }
  int group = 16;
  cudaError_t launch() {
    cudaLaunchConfig_t cfg = launch_cfg(grid);
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeClusterDimension;
    at[0].val.clusterDim.x = kCluster; at[0].val.clusterDim.y = 1; at[0].val.clusterDim.z = 1;
    if (kCluster > 1) { cfg.attrs = at; cfg.numAttrs = 1; }
    return cudaLaunchKernelEx(&cfg, gemm_ws_kernel<T, BN, kStages, kCM, kCN, kDiag, kTmaStore, BK>, ta, tb, tc, C,
                              M, N, K, group);
  }
};

static double g_warmup_ms = 100;   // --warmup-ms: also warm up for at least this long

template <class F>
static double median_ms(F&& f, int warmup, int iters) {
  // Warm-up: at least `warmup` launches and at least g_warmup_ms of GPU time, so clocks and
  // power settle before timing (the 14:55 run showed cuBLAS alone varying 600-800 TFLOP/s
  // between processes at 4096).
  {
    cudaEvent_t w0, w1;
    CK(cudaEventCreate(&w0)); CK(cudaEventCreate(&w1));
    CK(cudaEventRecord(w0));
    float el = 0;
    for (int i = 0; i < 100000; ++i) {
      f();
      if (i + 1 >= warmup && (i + 1) % 4 == 0) {
        CK(cudaEventRecord(w1)); CK(cudaEventSynchronize(w1));
        CK(cudaEventElapsedTime(&el, w0, w1));
        if (el >= g_warmup_ms) break;
      }
    }
    CK(cudaEventDestroy(w0)); CK(cudaEventDestroy(w1));
  }
  CK(cudaDeviceSynchronize());
  std::vector<cudaEvent_t> ev(2 * iters);
  for (auto& e : ev) CK(cudaEventCreate(&e));
  for (int i = 0; i < iters; ++i) {
    CK(cudaEventRecord(ev[2 * i]));
    f();
    CK(cudaEventRecord(ev[2 * i + 1]));
  }
  CK(cudaDeviceSynchronize());
  std::vector<float> ms(iters);
  for (int i = 0; i < iters; ++i) CK(cudaEventElapsedTime(&ms[i], ev[2 * i], ev[2 * i + 1]));
  for (auto& e : ev) CK(cudaEventDestroy(e));
  std::sort(ms.begin(), ms.end());
  return iters % 2 ? ms[iters / 2] : 0.5 * (ms[iters / 2 - 1] + ms[iters / 2]);
}

struct Row {
  std::string dtype, variant;
  int size;
  double tflops, cublas_tflops, err_full, err_ref, cublas_err_ref;
  int grid, group;
  bool pass;
  std::string note;
};

struct Opts {
  int warmup = 10, iters = 30, samples = 512;
  std::vector<int> sizes{8192, 4096};
  std::vector<std::string> dtypes{"bf16", "fp16"};
  std::string variants = "all";
  std::string out;   // table path; default $OUT/sm90_gemm.md
  bool selftest = false;   // run only the one-warpgroup wrapper tests (wgmma_selftest.cuh)
  std::string selftest_spec = "all";
  std::vector<int> groups{16};   // raster group sizes to time (the first is also checked)
};

template <typename T>
static void run_dtype(const Opts& o, cublasHandle_t h, int num_sms, std::vector<Row>& rows) {
  for (int S : o.sizes) {
    const int M = S, N = S, K = S;
    const size_t nA = (size_t)M * K, nB = (size_t)N * K, nC = (size_t)M * N;
    T *A, *B, *C, *R;
    CK(cudaMalloc(&A, nA * sizeof(T)));
    CK(cudaMalloc(&B, nB * sizeof(T)));
    CK(cudaMalloc(&C, nC * sizeof(T)));
    CK(cudaMalloc(&R, nC * sizeof(T)));
    init_kernel<<<1024, 256>>>(A, nA, 0x1234u + S);
    init_kernel<<<1024, 256>>>(B, nB, 0xabcdu + S);
    CK(cudaGetLastError());
    unsigned* d_max; double* d_ss; unsigned long long* d_bad;
    CK(cudaMalloc(&d_max, 4)); CK(cudaMalloc(&d_ss, 8)); CK(cudaMalloc(&d_bad, 8));

    // cuBLAS (column-major): C^T[N,M] = B[N,K] * A^T  ->  op(B)=T on B's KxN col-major view.
    const float alpha = 1.f, beta = 0.f;
    auto cublas = [&]() {
      CKB(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &alpha, B, DT<T>::cublas, K, A,
                       DT<T>::cublas, K, &beta, R, DT<T>::cublas, N, CUBLAS_COMPUTE_32F,
                       CUBLAS_GEMM_DEFAULT));
    };
    CK(cudaMemset(R, 0xFF, nC * sizeof(T)));
    cublas();
    CK(cudaDeviceSynchronize());
    const double flop = 2.0 * M * N * (double)K;
    // cuBLAS is timed before and after our kernels; the table takes the faster of the two
    // medians (the conservative choice for our ratio), the log shows both.
    const double cublas_ms_before = median_ms(cublas, o.warmup, o.iters);
    double cublas_tf = flop / (cublas_ms_before * 1e-3) / 1e12;

    // fp64 reference on sampled entries (host copies of A and B)
    std::vector<T> hA(nA), hB(nB);
    CK(cudaMemcpy(hA.data(), A, nA * sizeof(T), cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(hB.data(), B, nB * sizeof(T), cudaMemcpyDeviceToHost));
    std::vector<int> si(o.samples), sj(o.samples);
    std::vector<double> ref(o.samples);
    uint64_t lcg = 0x9E3779B97F4A7C15ull ^ S;
    double ref_ss = 0;
    for (int s = 0; s < o.samples; ++s) {
      lcg = lcg * 6364136223846793005ull + 1442695040888963407ull;
      si[s] = (int)((lcg >> 33) % M);
      lcg = lcg * 6364136223846793005ull + 1442695040888963407ull;
      sj[s] = (int)((lcg >> 33) % N);
      // include tile corners: last row / column of the matrix
      if (s == 0) { si[s] = M - 1; sj[s] = N - 1; }
      if (s == 1) { si[s] = 0; sj[s] = 0; }
      double acc = 0;
      const T* a = &hA[(size_t)si[s] * K];
      const T* b = &hB[(size_t)sj[s] * K];
      for (int k = 0; k < K; ++k) acc += DT<T>::to_d(a[k]) * DT<T>::to_d(b[k]);
      ref[s] = acc;
      ref_ss += acc * acc;
    }
    const double ref_rms = std::sqrt(ref_ss / o.samples);
    auto sampled_err = [&](const T* dC) {
      double m = 0;
      for (int s = 0; s < o.samples; ++s) {
        T v;
        CK(cudaMemcpy(&v, dC + (size_t)si[s] * N + sj[s], sizeof(T), cudaMemcpyDeviceToHost));
        const double d = std::fabs(DT<T>::to_d(v) - ref[s]) / std::max(std::fabs(ref[s]), ref_rms);
        if (!(d <= m)) m = std::isnan(d) ? INFINITY : d;
      }
      return m;
    };
    const double cublas_err = sampled_err(R);
    // rms of cuBLAS's C over the whole matrix: the floor of the full comparison's denominator.
    CK(cudaMemset(d_max, 0, 4)); CK(cudaMemset(d_ss, 0, 8)); CK(cudaMemset(d_bad, 0, 8));
    diff_kernel<T><<<1024, 256>>>(R, R, nC, 1.f, d_max, d_ss, d_bad);
    CK(cudaGetLastError());
    double c_ss; unsigned long long r_bad;
    CK(cudaMemcpy(&c_ss, d_ss, 8, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(&r_bad, d_bad, 8, cudaMemcpyDeviceToHost));
    const double c_rms = std::sqrt(c_ss / nC);
    if (r_bad) std::fprintf(stderr, "warning: cuBLAS output has %llu non-finite entries\n", r_bad);

    const size_t first_row = rows.size();
    auto one = [&](auto& runner, const char* vname, bool diag) {
      Row row{DT<T>::name, vname, S, 0, cublas_tf, NAN, NAN, cublas_err, runner.grid, o.groups[0], false, ""};
      if (!runner.ok) { row.note = "skipped: " + runner.why; rows.push_back(row); return; }
      runner.group = o.groups[0];
      CK(cudaMemset(C, 0xFF, nC * sizeof(T)));   // poison: 0xFFFF is NaN in bf16 and fp16
      cudaError_t e = runner.launch();
      if (e == cudaSuccess) e = cudaDeviceSynchronize();
      if (e != cudaSuccess) {
        row.note = std::string("launch failed: ") + cudaGetErrorString(e);
        rows.push_back(row);
        std::fprintf(stderr, "%s %s %d: %s (context may be dead)\n", DT<T>::name, vname, S, row.note.c_str());
        return;
      }
      if (!diag) {
        CK(cudaMemset(d_max, 0, 4)); CK(cudaMemset(d_ss, 0, 8)); CK(cudaMemset(d_bad, 0, 8));
        diff_kernel<T><<<1024, 256>>>(C, R, nC, (float)c_rms, d_max, d_ss, d_bad);
        CK(cudaGetLastError());
        unsigned mb; unsigned long long bad;
        CK(cudaMemcpy(&mb, d_max, 4, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(&bad, d_bad, 8, cudaMemcpyDeviceToHost));
        float mf; std::memcpy(&mf, &mb, 4);
        row.err_full = bad ? INFINITY : mf;
        row.err_ref = sampled_err(C);
        // Pass: within 2 ulps of cuBLAS everywhere, and no worse against fp64 than
        // max(2 x cuBLAS's own error, 1 ulp) on the sampled entries.
        row.pass = bad == 0 && row.err_full <= 4 * DT<T>::u &&
                   row.err_ref <= std::max(2 * cublas_err, 2 * DT<T>::u);
        if (bad) row.note = std::to_string(bad) + " non-finite outputs";
      } else {
        row.pass = true;
        row.note = "diagnostic (output not meaningful, not checked)";
      }
      // Time every raster group size; report the fastest (all are printed).
      double best_ms = 1e30;
      for (int g : o.groups) {
        runner.group = g;
        const double ms = median_ms([&] { CK(runner.launch()); }, o.warmup, o.iters);
        std::printf("   %-5s %5d %-18s group %3d: %7.1f TFLOP/s\n", DT<T>::name, S, vname, g, flop / (ms * 1e-3) / 1e12);
        if (ms < best_ms) { best_ms = ms; row.group = g; }
      }
      CK(cudaGetLastError());
      row.tflops = flop / (best_ms * 1e-3) / 1e12;
      rows.push_back(row);
      std::printf("%-5s %5d %-18s grid %3d group %2d  %7.1f TFLOP/s  cuBLAS %7.1f  ratio %.3f  err_full %.2e  err_ref %.2e (cuBLAS %.2e)  %s %s\n",
                  DT<T>::name, S, vname, runner.grid, row.group, row.tflops, cublas_tf, row.tflops / cublas_tf,
                  row.err_full, row.err_ref, cublas_err, row.pass ? "PASS" : "FAIL", row.note.c_str());
      std::fflush(stdout);
    };
    auto want = [&](const char* v) {
      return o.variants == "all" || ("," + o.variants + ",").find(std::string(",") + v + ",") != std::string::npos;
    };
    if (want("128x256_s4")) { Runner<T, 256, 4, 1, 1> r(A, B, C, M, N, K, num_sms); one(r, "128x256_s4", false); }
    if (want("128x256_s4_c2")) { Runner<T, 256, 4, 2, 1> r(A, B, C, M, N, K, num_sms); one(r, "128x256_s4_c2", false); }
    if (want("128x256_s4_c2n")) { Runner<T, 256, 4, 1, 2> r(A, B, C, M, N, K, num_sms); one(r, "128x256_s4_c2n", false); }
    if (want("128x256_s4_c4")) { Runner<T, 256, 4, 4, 1> r(A, B, C, M, N, K, num_sms); one(r, "128x256_s4_c4", false); }
    if (want("128x256_s4_c2x2")) { Runner<T, 256, 4, 2, 2> r(A, B, C, M, N, K, num_sms); one(r, "128x256_s4_c2x2", false); }
    if (want("128x256_s4_ts")) { Runner<T, 256, 4, 1, 1, kDiagNone, true> r(A, B, C, M, N, K, num_sms); one(r, "128x256_s4_ts", false); }
    if (want("128x256_s4_c2_ts")) { Runner<T, 256, 4, 2, 1, kDiagNone, true> r(A, B, C, M, N, K, num_sms); one(r, "128x256_s4_c2_ts", false); }
    if (want("128x256_s4_c4_ts")) { Runner<T, 256, 4, 4, 1, kDiagNone, true> r(A, B, C, M, N, K, num_sms); one(r, "128x256_s4_c4_ts", false); }
    if (want("128x256_s4_c2x2_ts")) { Runner<T, 256, 4, 2, 2, kDiagNone, true> r(A, B, C, M, N, K, num_sms); one(r, "128x256_s4_c2x2_ts", false); }
    if (want("128x256x32_s8_ts")) { Runner<T, 256, 8, 1, 1, kDiagNone, true, 32> r(A, B, C, M, N, K, num_sms); one(r, "128x256x32_s8_ts", false); }
    if (want("128x256x32_s8_c2_ts")) { Runner<T, 256, 8, 2, 1, kDiagNone, true, 32> r(A, B, C, M, N, K, num_sms); one(r, "128x256x32_s8_c2_ts", false); }
    if (want("128x256_s4_np")) { Runner<T, 256, 4, 1, 1> r(A, B, C, M, N, K, num_sms, false); one(r, "128x256_s4_np", false); }
    if (want("128x128_s6")) { Runner<T, 128, 6, 1, 1> r(A, B, C, M, N, K, num_sms); one(r, "128x128_s6", false); }
    if (want("128x128_s6_c2")) { Runner<T, 128, 6, 2, 1> r(A, B, C, M, N, K, num_sms); one(r, "128x128_s6_c2", false); }
    // diagnostics on the 128x256 pipeline (explicit --variants only, not in "all")
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      if (o.variants != "all" && want("diag_noload")) { Runner<T, 256, 4, 1, 1, kDiagNoLoad> r(A, B, C, M, N, K, num_sms); one(r, "diag_noload", true); }
      if (o.variants != "all" && want("diag_noload_ts")) { Runner<T, 256, 4, 1, 1, kDiagNoLoad, true> r(A, B, C, M, N, K, num_sms); one(r, "diag_noload_ts", true); }
      if (o.variants != "all" && want("diag_nostore")) { Runner<T, 256, 4, 1, 1, kDiagNoStore> r(A, B, C, M, N, K, num_sms); one(r, "diag_nostore", true); }
    }
    const double cublas_ms_after = median_ms(cublas, o.warmup, o.iters);
    const double cublas_best = flop / (std::min(cublas_ms_before, cublas_ms_after) * 1e-3) / 1e12;
    std::printf("%-5s %5d %-18s           %7.1f TFLOP/s before, %7.1f after our kernels (medians of %d)\n",
                DT<T>::name, S, "cuBLAS", flop / (cublas_ms_before * 1e-3) / 1e12,
                flop / (cublas_ms_after * 1e-3) / 1e12, o.iters);
    for (size_t i = first_row; i < rows.size(); ++i) rows[i].cublas_tflops = cublas_best;

    CK(cudaFree(A)); CK(cudaFree(B)); CK(cudaFree(C)); CK(cudaFree(R));
    CK(cudaFree(d_max)); CK(cudaFree(d_ss)); CK(cudaFree(d_bad));
  }
}

int main(int argc, char** argv) {
  Opts o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string { return i + 1 < argc ? argv[++i] : ""; };
    auto split = [](const std::string& s) {
      std::vector<std::string> v; size_t p = 0;
      while (p <= s.size()) { size_t q = s.find(',', p); if (q == std::string::npos) q = s.size(); if (q > p) v.push_back(s.substr(p, q - p)); p = q + 1; }
      return v;
    };
    if (a == "--sizes") { o.sizes.clear(); for (auto& s : split(next())) o.sizes.push_back(std::atoi(s.c_str())); }
    else if (a == "--dtypes") o.dtypes = split(next());
    else if (a == "--variants") o.variants = next();
    else if (a == "--iters") o.iters = std::atoi(next().c_str());
    else if (a == "--warmup") o.warmup = std::atoi(next().c_str());
    else if (a == "--samples") o.samples = std::atoi(next().c_str());
    else if (a == "--warmup-ms") g_warmup_ms = std::atof(next().c_str());
    else if (a == "--out") o.out = next();
    else if (a == "--selftest") { o.selftest = true; o.selftest_spec = i + 1 < argc && argv[i + 1][0] != '-' ? next() : "all"; }
    else if (a == "--groups") { o.groups.clear(); for (auto& s : split(next())) o.groups.push_back(std::max(1, std::atoi(s.c_str()))); }
    else {
      std::printf("usage: %s [--sizes 8192,4096] [--dtypes bf16,fp16] [--iters 30] [--warmup 10] [--warmup-ms 100]\n"
                  "          [--samples 512] [--out FILE.md] [--selftest [all|bf16:64|...]] [--groups 16[,8,...]]\n"
                  "          [--variants all|128x256_s4,128x256_s4_ts,128x256_s4_c2_ts,128x256_s4_c4_ts,128x256_s4_c2x2_ts,128x256x32_s8_ts,128x256x32_s8_c2_ts,128x256_s4_np,128x256_s4_c2,128x256_s4_c2n,128x256_s4_c2x2,128x256_s4_c4,\n"
                  "           128x128_s6,128x128_s6_c2,diag_noload,diag_noload_ts,diag_nostore]\n", argv[0]);
      return a == "-h" || a == "--help" ? 0 : 1;
    }
  }
  if (o.iters < 1) o.iters = 1;
  if (o.samples < 2) o.samples = 2;
  cudaDeviceProp p;
  CK(cudaGetDeviceProperties(&p, 0));
  std::printf("device: %s, %d SMs, cc %d.%d, L2 %d MB, smem/block optin %zu KB\n", p.name,
              p.multiProcessorCount, p.major, p.minor, p.l2CacheSize >> 20, p.sharedMemPerBlockOptin >> 10);
  if (p.major != 9) { std::fprintf(stderr, "needs an sm_90 GPU\n"); return 2; }
  if (o.selftest) return selftest::run_all(o.selftest_spec) ? 1 : 0;
  cublasHandle_t h;
  CKB(cublasCreate(&h));
  std::vector<Row> rows;
  for (auto& d : o.dtypes) {
    if (d == "bf16") run_dtype<__nv_bfloat16>(o, h, p.multiProcessorCount, rows);
    else if (d == "fp16") run_dtype<__half>(o, h, p.multiProcessorCount, rows);
    else std::fprintf(stderr, "unknown dtype %s\n", d.c_str());
  }
  CKB(cublasDestroy(h));

  const char* out_dir = std::getenv("OUT");
  std::string dir = out_dir && *out_dir ? out_dir : "/tmp/sm90_out";
  std::string path = o.out.empty() ? dir + "/sm90_gemm.md" : o.out;
  FILE* f = std::fopen(path.c_str(), "w");
  if (!f) { std::fprintf(stderr, "cannot write %s\n", path.c_str()); f = stdout; }
  std::fprintf(f, "C = A*B^T, fp32 accumulate, %s (%d SMs); median of %d launches after >= %d warm-ups and >= %.0f ms; "
               "err_full = max|ours-cuBLAS|/max(|cuBLAS|,rms(C)) over all of C; err_ref = max|x-fp64|/max(|fp64|,rms) on %d sampled entries; "
               "check = err_full <= 2 ulp and err_ref <= max(2 x cuBLAS's, 1 ulp)\n\n",
               p.name, p.multiProcessorCount, o.iters, o.warmup, g_warmup_ms, o.samples);
  std::fprintf(f, "| dtype | M=N=K | kernel | grid | group | TFLOP/s | cuBLAS TFLOP/s | ratio | err_full | err_ref (ours / cuBLAS) | check |\n");
  std::fprintf(f, "|---|---|---|---|---|---|---|---|---|---|---|\n");
  bool all_pass = true;
  for (auto& r : rows) {
    all_pass &= r.pass;
    std::fprintf(f, "| %s | %d | %s | %d | %d | %.1f | %.1f | %.3f | %.2e | %.2e / %.2e | %s%s%s |\n",
                 r.dtype.c_str(), r.size, r.variant.c_str(), r.grid, r.group, r.tflops, r.cublas_tflops,
                 r.cublas_tflops > 0 ? r.tflops / r.cublas_tflops : 0.0, r.err_full, r.err_ref,
                 r.cublas_err_ref, r.pass ? "PASS" : "FAIL", r.note.empty() ? "" : ": ", r.note.c_str());
  }
  if (f != stdout) { std::fclose(f); std::printf("table written to %s\n", path.c_str()); }
  return all_pass ? 0 : 1;
}
