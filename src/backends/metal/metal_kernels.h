// What the Metal backend's C++ side does: pick the kernel variant for a problem, hand
// back its complete MSL source, the launch geometry of each kernel and the packed
// scalar arguments. The launch itself lives in Python (python/orchard/_mps.py), which
// compiles the source with torch.mps.compile_shader once per variant and dispatches on
// torch's MPS stream; the tests run the same source on the emulator in tests/metal.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "orchard/dtype.h"
#include "orchard/params.h"

namespace orchard::metal {

// The int64 `meta` buffer every kernel reads, in this order (kMeta<Name> in MSL).
#define ORCHARD_METAL_META_FIELDS(X)                                                                          \
  X(B) X(Sq) X(Sk) X(Hq) X(Hkv) X(D) X(QBatch) X(QRow) X(QHead) X(KBatch) X(KRow) X(KHead) X(VBatch) X(VRow) \
  X(VHead) X(OBatch) X(ORow) X(OHead) X(DoBatch) X(DoRow) X(DoHead) X(DqBatch) X(DqRow) X(DqHead) X(DkBatch)  \
  X(DkRow) X(DkHead) X(DvBatch) X(DvRow) X(DvHead) X(LseBatch) X(LseHead) X(Causal) X(CausalOffset)          \
  X(Dropout) X(KeepThreshold) X(WriteMask) X(ScaleBits) X(RpBits) X(DropRow) X(DropCol) X(DropHead) \
  X(DropHeads) X(WindowLeft) X(WindowRight) X(SoftcapBits) X(Alibi) X(AlibiBatch) X(Sink) X(Dv) X(MaskKind) X(MaskBatch) X(MaskHead) X(MaskRow) X(MaskCol) \
  X(Varlen) X(TopLeft)

enum MetaField : int {
#define ORCHARD_METAL_META_ENUM(name) kMeta##name,
  ORCHARD_METAL_META_FIELDS(ORCHARD_METAL_META_ENUM)
#undef ORCHARD_METAL_META_ENUM
  kMetaCount
};

// One compiled library: a dtype and a head-dim bucket, with the tile sizes of its four
// kernels (rows of 8 per simdgroup; threadgroup memory <= 32 KB, Apple's limit).
struct Variant {
  DType dtype = DType::kFloat32;
  int block_d = 0;  // head dims 1..block_d
  int fwd_block_q = 0, fwd_block_k = 0;
  int dq_block_q = 0, dq_block_k = 0;
  int dkv_block_k = 0, dkv_block_q = 0;
  std::string name() const;  // e.g. "metal_bf16_d64"
};

constexpr int kMaxHeadDim = 256;
constexpr std::size_t kThreadgroupMemoryBytes = 32 * 1024;
const std::vector<int>& head_dim_buckets();  // 32, 64, 96, 128, 160, 192, 256

// Empty when the Metal kernels can run `p`, else why not (dtype, head dim, ...).
std::string check_support(const FwdParams& p);
std::string check_support(DType dtype, int head_dim);
Variant select_variant(DType dtype, int head_dim);  // throws orchard::Error when unsupported
// The head dim a problem's variant is chosen by: the larger of q/k's and v's (d_v 0 = d).
int variant_head_dim(const FwdParams& p);

// Threadgroup floats each kernel declares (the formulas of the .metal files).
int forward_smem_floats(const Variant& v);
int dq_smem_floats(const Variant& v);
int dkv_smem_floats(const Variant& v);

// The variant's full MSL source: prelude (elem_t, tile sizes, kMeta* indices) followed
// by the kernel files in source_files() order.
std::string variant_prelude(const Variant& v);
std::string variant_source(const Variant& v);
const std::vector<std::string>& source_files();  // e.g. "forward.metal"

struct Launch {
  std::string kernel;  // function name in the library
  std::uint32_t groups = 0;
  std::uint32_t threads_per_group = 0;
};
Launch forward_launch(const Variant& v, const FwdParams& p);
Launch backward_dot_launch(const Variant& v, const FwdParams& p);
Launch backward_dq_launch(const Variant& v, const FwdParams& p);
Launch backward_dkdv_launch(const Variant& v, const FwdParams& p);

// The meta buffer for `p` (forward: the BwdParams-only fields are zero). Reads the
// element strides of p; dropout's keep threshold and 1/(1-p) come from dropout_p. The
// diagonal (causal_offset) is passed as is: the kernels read it for causal, window and
// ALiBi; window_left / window_right / softcap as params.h defines them, ALiBi as a flag
// (p.alibi_slopes set) and the slopes' batch stride, sinks as a flag (p.sink set; slopes and
// sinks travel as buffers). attn_bias: MaskKind 0 none, 1 bool (kUInt8), 2 the problem's
// dtype, 3 float32, with its element strides. Varlen: a flag (p.cu_seqlens_q set; the offsets
// travel as buffers; Sq / Sk are then the max lengths) and TopLeft (p.causal_top_left).
std::vector<std::int64_t> pack_meta(const BwdParams& p, bool write_mask);

// Float workspace the backward needs: delta, (b, hq, sq) contiguous.
std::size_t backward_delta_floats(const FwdParams& p);

}  // namespace orchard::metal
