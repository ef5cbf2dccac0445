// Declarations shared by the CUDA backend's translation units: the per-
// instantiation launchers (defined in the generated flash_*.cu files) and the
// launch-error check.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include "backends/cuda/device_attribute.h"
#include "orchard/config.h"
#include "orchard/errors.h"
#include "orchard/params.h"

namespace orchard::cuda {

// T is __nv_bfloat16 or __half; kD is the head-dim bucket (32..256).
template <typename T, int kD>
void run_flash_fwd(const FwdParams& params);
template <typename T, int kD>
void run_flash_bwd(const BwdParams& params);
// Shared memory per block of the sm80 forward's kernel for bucket kD, with / without attn_bias
// (flash_fwd_kernel.cuh; instantiated in the bf16 generated files, the same for fp16).
template <int kD>
int sm80_fwd_smem_bytes(bool bias);

// The run_flash_* entry points' one switch from the run-time flags to the kernels' template
// parameters: launch(std::bool_constant<causal>, std::bool_constant<dropout>).
template <typename Launch>
void dispatch_causal_dropout(bool causal, bool dropout, Launch&& launch) {
  if (causal) {
    if (dropout) launch(std::true_type{}, std::true_type{});
    else launch(std::true_type{}, std::false_type{});
  } else {
    if (dropout) launch(std::false_type{}, std::true_type{});
    else launch(std::false_type{}, std::false_type{});
  }
}

// A call with both causal and attn_bias runs the non-causal attn_bias kernels, its causal mask
// applied as their run-time window's right bound 0 (window_offsets: the same mask, either
// alignment, empty rows included). No sm80 kernel is compiled for causal x attn_bias: a quarter
// of them, and of the CUDA build time, which the 2-core CI machine pays on every run.
template <class Params>
bool causal_runs_as_window(const Params& p) {
  return p.causal && p.attn_bias != nullptr;
}
template <class Params>
Params causal_as_window(const Params& p) {
  Params q = p;
  q.causal = false;
  q.window_right = 0;
  return q;
}

// pick(std::bool_constant<bias>) for a kernel's kBias, never instantiating kBias = true next
// to kCausal = true (causal_runs_as_window).
template <bool kCausal, class Pick>
auto pick_bias(bool bias, Pick&& pick) {
  if constexpr (kCausal) return pick(std::false_type{});
  else return bias ? pick(std::true_type{}) : pick(std::false_type{});
}

// float32 inputs: 3xTF32 tensor-core kernels (flash_fp32_tc.cu) where they fit, else SIMT
// kernels (flash_fp32.cu); both at fp32's error level.
void run_fwd_fp32(const FwdParams& params);
void run_bwd_fp32(const BwdParams& params);
// Whether run_fwd_fp32 / run_bwd_fp32 take the tensor-core kernels for these params (shared
// memory within the device's opt-in, the backward at head dims <= 128; ORCHARD_CUDA_FP32_TC=0
// turns them off).
bool fp32_fwd_takes_tensor_cores(const FwdParams& params);
bool fp32_bwd_takes_tensor_cores(const BwdParams& params);
// The tensor-core kernels; run_bwd_fp32_tc takes the D = rowsum(dO * O) pre-pass's output.
void run_fwd_fp32_tc(const FwdParams& params);
void run_bwd_fp32_tc(const BwdParams& params, const float* dsum);

// Attention-sink gradient (params.h): dsink[h] = -sum over (sequence, row) of
// exp(sink[h] - lse) * D, D = rowsum(dO * O) from the backward's pre-pass at
// dsum[(b * hq + h) * sq + local row]. One CTA per head, fixed summation order:
// deterministic.
void run_bwd_dsink(const BwdParams& params, const float* dsum);

// Dropout keep-mask output (b, hq, sq, sk) uint8, from the Philox definition alone.
void run_dropout_mask(const FwdParams& params);

// Head dim of v, out, dout and dv (params.h: d_v == 0 means d).
ORCHARD_HOST_DEVICE int value_dim(const FwdParams& p) { return p.d_v > 0 ? p.d_v : p.d; }

// Head-dim buckets compiled (d is padded up to the bucket inside the kernel).
// With a value head dim d_v != d the bucket is that of max(d, d_v): q/k and
// v/out are each loaded at their own width and zero-filled up to the bucket.
inline int head_dim_bucket(int d) {
  if (d <= 32) return 32;
  if (d <= 64) return 64;
  if (d <= 96) return 96;
  if (d <= 128) return 128;
  if (d <= 160) return 160;
  if (d <= 192) return 192;
  return 256;
}

// The sm80 forward's bucket: head_dim_bucket, except that d160 / d192 calls whose kernel needs more
// shared memory than the device allows (sm_86 / sm_89: 99 KB; theirs take 105 / 150 KB) run on
// the d256 kernel (99 KB without attn_bias: zero-filled columns, the same results). A call that
// no bucket fits (attn_bias at d96 and d160-d256 there; d64 / d128 take one bias stage) raises
// NotImplementedError at its launch.
inline int sm80_fwd_bucket(const FwdParams& p) {
  const int bucket = head_dim_bucket(std::max(p.d, value_dim(p)));
  if (bucket != 160 && bucket != 192) return bucket;
  const bool bias = p.attn_bias != nullptr;
  const int limit = smem_optin_limit();
  const int need = bucket == 160 ? sm80_fwd_smem_bytes<160>(bias) : sm80_fwd_smem_bytes<192>(bias);
  return need > limit && sm80_fwd_smem_bytes<256>(bias) <= limit ? 256 : bucket;
}
// launch(std::integral_constant<int, kD>{}) for a head-dim bucket (head_dim_bucket's values).
template <typename Launch>
void with_head_dim_bucket(int bucket, Launch&& launch) {
  switch (bucket) {
    case 32: return launch(std::integral_constant<int, 32>{});
    case 64: return launch(std::integral_constant<int, 64>{});
    case 96: return launch(std::integral_constant<int, 96>{});
    case 128: return launch(std::integral_constant<int, 128>{});
    case 160: return launch(std::integral_constant<int, 160>{});
    case 192: return launch(std::integral_constant<int, 192>{});
    default: return launch(std::integral_constant<int, 256>{});
  }
}
// The sm80-class kernels of a call's bucket (cuda_backend.cu's calls, and the CPU emulator's).
template <typename T>
void sm80_fwd_dispatch(const FwdParams& p) {
  with_head_dim_bucket(sm80_fwd_bucket(p), [&](auto d) { run_flash_fwd<T, decltype(d)::value>(p); });
}
template <typename T>
void sm80_bwd_dispatch(const BwdParams& p) {
  with_head_dim_bucket(head_dim_bucket(std::max(p.d, value_dim(p))),
                       [&](auto d) { run_flash_bwd<T, decltype(d)::value>(p); });
}

// Columns of a dq_accum slab: d rounded up to whole 8-column tiles.
ORCHARD_HOST_DEVICE int dq_accum_cols(int d) { return (d + 7) / 8 * 8; }

// Workspace layout for the backward pass (each region 256-byte aligned).
struct BwdWorkspace {
  std::size_t d_offset = 0;         // float[b * hq * sq]: rowsum(dO * O)
  std::size_t dq_accum_offset = 0;  // float[b * hq * dq_accum_rows(sq) * dq_accum_cols(d)]: fp32 dQ reductions
  std::size_t dq_turn_offset = 0;   // int[b * hq * dq_turn_blocks(sq)]: the deterministic sm90 backward's turns
  std::size_t bytes = 0;
};

// The deterministic sm90 backward (sm90/ordered_add.cuh) orders its dQ adds per (batch, q head,
// 64-row query block) with one turn counter each, zeroed before the main kernel.
constexpr int kDqTurnRows = 64;
ORCHARD_HOST_DEVICE int dq_turn_blocks(int sq) { return (sq + kDqTurnRows - 1) / kDqTurnRows; }
ORCHARD_HOST_DEVICE std::size_t dq_turn_count(const FwdParams& p) {
  return static_cast<std::size_t>(p.b) * p.hq * dq_turn_blocks(p.sq);
}

// dq_accum stores each (batch, q head) slab as 16 x 8 tiles in mma.sync's C
// fragment order (tile-major, then lane, then the lane's 4 values), so the 4
// values a lane holds for one tile are 16 contiguous bytes and a warp's tile is
// 512 contiguous bytes: one float4 reduction per lane per tile, fully coalesced
// (FA2 permutes its dq_accum for the same reason). Rows are padded to 16.
ORCHARD_HOST_DEVICE int dq_accum_rows(int sq) { return (sq + 15) / 16 * 16; }
// Float offset, inside its slab, of lane `lane`'s 4 values of the tile whose
// first row is `row16` (a multiple of 16) and first column `col8` (a multiple of 8).
ORCHARD_HOST_DEVICE int64_t dq_accum_tile_offset(int row16, int col8, int d, int lane) {
  return ((static_cast<int64_t>(row16 / 16) * (d / 8) + col8 / 8) * 32 + lane) * 4;
}

// Between tiles of one slab: the next 16 rows (same columns) are
// dq_accum_row_tile_stride(d) floats further, the next 8 columns (same rows)
// kDqAccumColTileStride floats, so dq_accum_tile_offset(row16 + 16 * r, col8 + 8 * c, d,
// lane) = dq_accum_tile_offset(row16, col8, d, lane) + r * row stride + c * 128.
ORCHARD_HOST_DEVICE int dq_accum_row_tile_stride(int d) { return d / 8 * 128; }
constexpr int kDqAccumColTileStride = 128;

// own_dq_accum = false: the caller provides the accumulator (BwdParams::dq_accum), so the
// workspace holds D and the turns only (the turns: 1/64 int per query row and head, allocated
// whatever the mode so that the size does not depend on which kernel runs).
ORCHARD_HOST_DEVICE BwdWorkspace bwd_workspace_layout(const FwdParams& p, bool own_dq_accum = true) {
  auto align = [](std::size_t n) { return (n + 255) / 256 * 256; };
  const std::size_t rows = static_cast<std::size_t>(p.b) * p.hq * p.sq;
  const std::size_t acc_rows = own_dq_accum ? static_cast<std::size_t>(p.b) * p.hq * dq_accum_rows(p.sq) : 0;
  BwdWorkspace w;
  w.d_offset = 0;
  w.dq_accum_offset = align(rows * sizeof(float));
  w.dq_turn_offset = w.dq_accum_offset + align(acc_rows * dq_accum_cols(p.d) * sizeof(float));
  w.bytes = w.dq_turn_offset + align(dq_turn_count(p) * sizeof(int));
  return w;
}

// The workspace's turns region (bwd_workspace_layout) of a backward call: the deterministic sm90
// backward's turn counters.
ORCHARD_HOST_DEVICE int* bwd_dq_turns(const BwdParams& p) {
  return reinterpret_cast<int*>(static_cast<unsigned char*>(p.workspace) +
                                bwd_workspace_layout(p, p.dq_accum == nullptr).dq_turn_offset);
}

// The fp32 dQ accumulator slabs of sequence b that the dK/dV kernels add into, head h's
// at base + h * head_stride: the caller's (BwdParams::dq_accum, its own strides: context
// parallelism adds several calls into one buffer) or the workspace's.
struct DqAccumSlabs {
  float* base;
  int64_t head_stride;  // floats
};
// With the workspace accumulator's base `own` and its width `d` given (the sm90 kernels get
// the base as an argument and pass their compile-time width where d is the bucket); the
// two-argument form below finds both in p.
ORCHARD_HOST_DEVICE DqAccumSlabs bwd_dq_accum_slabs(const BwdParams& p, float* own, int b, int d) {
  if (p.dq_accum != nullptr) return {p.dq_accum + b * p.dq_accum_batch_stride, p.dq_accum_head_stride};
  const int64_t slab = static_cast<int64_t>(dq_accum_rows(p.sq)) * dq_accum_cols(d);
  return {own + static_cast<int64_t>(b) * p.hq * slab, slab};
}
ORCHARD_HOST_DEVICE DqAccumSlabs bwd_dq_accum_slabs(const BwdParams& p, int b) {
  if (p.dq_accum != nullptr) return {p.dq_accum + b * p.dq_accum_batch_stride, p.dq_accum_head_stride};
  // (Not through the form above: computing `own` before the caller's-accumulator test changed
  // the sm80 dK/dV kernels' SASS.)
  const int64_t slab = static_cast<int64_t>(dq_accum_rows(p.sq)) * dq_accum_cols(p.d);
  float* own = reinterpret_cast<float*>(static_cast<unsigned char*>(p.workspace) + bwd_workspace_layout(p).dq_accum_offset);
  return {own + static_cast<int64_t>(b) * p.hq * slab, slab};
}

// Lanes per row in the backward's D = rowsum(dO * O) kernel (d: the value head
// dim): the row's 16-byte chunks (d / 8 <= 32) rounded up to a power of two, at least 8.
ORCHARD_HOST_DEVICE int bwd_dot_lanes(int d) { return d <= 64 ? 8 : (d <= 128 ? 16 : 32); }

// The causal dK/dV kernel's CTA order: the CTAs of `head_group` consecutive
// (batch, kv head) pairs run n_block-major - every head's heaviest key block
// (n_block 0 sees the most query tiles) before any lighter one - so the grid
// ends on the lightest CTAs rather than on one head's heaviest. `heads` = b * hkv;
// the last group may be smaller. A bijection from [0, heads * num_n_blocks).
struct CtaCoord {
  int64_t head;  // b * hkv + kv head
  int n_block;
};
ORCHARD_HOST_DEVICE CtaCoord causal_cta_coord(int64_t cta, int num_n_blocks, int head_group, int64_t heads) {
  const int64_t per_group = static_cast<int64_t>(head_group) * num_n_blocks;
  const int64_t g0 = cta / per_group * head_group;
  const int64_t left = heads - g0;
  const int group_size = static_cast<int>(left < head_group ? left : head_group);
  const int r = static_cast<int>(cta % per_group);
  return {g0 + r % group_size, r / group_size};
}
// (batch, kv head) pairs per causal group: as many as keep the group's Q and dO
// (every q head of the GQA group, 2-byte elements) within 16 MB, a third of the
// H100's L2, so the concurrently running CTAs of a group share them there.
ORCHARD_HOST_DEVICE int causal_head_group(const BwdParams& p) {
  const int64_t bytes_per_head = static_cast<int64_t>(p.hq / p.hkv) * p.sq * (p.d + value_dim(p)) * 2;
  const int64_t heads = static_cast<int64_t>(p.b) * p.hkv;
  int64_t group = bytes_per_head > 0 ? (int64_t{16} << 20) / bytes_per_head : heads;
  if (group > heads) group = heads;
  return static_cast<int>(group < 1 ? 1 : group);
}

// Whether the kernels may move one 2-byte tensor's rows with 16-byte vectors
// (cp.async, uint4 / 4-byte pair stores): a 16-byte aligned base, batch / row /
// head strides that are multiples of 8 elements (dims of extent 1 excepted) and
// a width of whole 8-element chunks. Else the kernels take their element-wise
// path (a CTA-uniform branch on a kernel argument): any head dim and any view is
// read and written in place, never staged.
inline bool rows_vec16(const void* base, int64_t bs, int64_t rs, int64_t hs, int nb, int nr, int nh, int width) {
  const int64_t strides = (nb > 1 ? bs : 0) | (nr > 1 ? rs : 0) | (nh > 1 ? hs : 0);
  return reinterpret_cast<std::uintptr_t>(base) % 16 == 0 && strides % 8 == 0 && width % 8 == 0;
}
// (Varlen: sq / sk are the longest sequence's, the packed rows are more: the row
// strides always count.)
inline bool fwd_vec16(const FwdParams& p) {
  const int rq = p.cu_seqlens_q != nullptr ? 2 : p.sq, rk = p.cu_seqlens_k != nullptr ? 2 : p.sk;
  return rows_vec16(p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride, p.b, rq, p.hq, p.d) &&
         rows_vec16(p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, p.b, rk, p.hkv, p.d) &&
         rows_vec16(p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride, p.b, rk, p.hkv, p.d_v) &&
         rows_vec16(p.out, p.o_batch_stride, p.o_row_stride, p.o_head_stride, p.b, rq, p.hq, p.d_v);
}
inline bool bwd_vec16(const BwdParams& p) {
  const int rq = p.cu_seqlens_q != nullptr ? 2 : p.sq, rk = p.cu_seqlens_k != nullptr ? 2 : p.sk;
  return fwd_vec16(p) &&
         rows_vec16(p.dout, p.do_batch_stride, p.do_row_stride, p.do_head_stride, p.b, rq, p.hq, p.d_v) &&
         rows_vec16(p.dq, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride, p.b, rq, p.hq, p.d) &&
         rows_vec16(p.dk, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride, p.b, rk, p.hkv, p.d) &&
         rows_vec16(p.dv, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride, p.b, rk, p.hkv, p.d_v);
}

// Throws orchard::Error(kRuntime) if the last launch failed.
void check_launch(const char* what);

// The dynamic shared-memory opt-in (cudaFuncSetAttribute MaxDynamicSharedMemorySize) of
// `kernel` on the current device, made once per (kernel, device) and size instead of before
// every launch: a driver call saved per launch on the host path of small problems (issue 12).
// More than the device allows (smem_optin_limit) raises NotImplementedError before the launch; a
// failed opt-in is left for the launch's check_launch to report, as before.
void opt_in_dynamic_smem(const void* kernel, int bytes);  // cuda_backend.cu
template <typename Kernel>
void set_max_dynamic_smem(Kernel kernel, int bytes) {
  if (bytes > 48 * 1024) opt_in_dynamic_smem(reinterpret_cast<const void*>(kernel), bytes);
}

// How many CTAs of `kernel` (threads each, smem_bytes of dynamic shared memory) one SM holds on
// the current device (cudaOccupancyMaxActiveBlocksPerMultiprocessor: registers and shared
// memory), cached per (kernel, device, threads, bytes) like the opt-in; 0 when it cannot tell.
// The opt-in for smem_bytes must be made first.
int resident_ctas(const void* kernel, int threads, int smem_bytes);  // cuda_backend.cu
template <typename Kernel>
int resident_ctas(Kernel kernel, int threads, std::size_t smem_bytes) {
  return resident_ctas(reinterpret_cast<const void*>(kernel), threads, static_cast<int>(smem_bytes));
}

}  // namespace orchard::cuda
