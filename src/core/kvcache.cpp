// orchard::attention_with_kvcache: validation (everything before anything is
// written), the split plan, the params struct, and the decode dispatch.
#include "orchard/kvcache.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <vector>

#include "core/backend.h"
#include "core/decode_backend.h"
#include "core/logging.h"
#include "core/validation.h"
#include "orchard/decode_params.h"

namespace orchard {
namespace detail {

#ifndef ORCHARD_WITH_CUDA
void decode_cuda(const DecodeParams&) {
  throw Error(ErrorKind::kNotImplemented,
              "tensors are on CUDA but this build of Orchard has no CUDA backend (rebuild with nvcc available, "
              "ORCHARD_CUDA=ON)");
}
int decode_cuda_num_sms(int) { return 0; }
int decode_cuda_num_splits(std::int64_t, std::int64_t, std::int64_t, int, DType, int) { return 1; }
std::size_t decode_cuda_fp32_smem_bytes(int, std::int64_t) { return 0; }
bool decode_cuda_copy_rows(const DeviceRows*, int, void*) { return false; }
#endif

namespace {

struct DecodeShape {
  std::int64_t b = 0, sq = 0, hq = 0, hkv = 0, d = 0, s_new = 0;
  std::int64_t capacity = 0, cache_batch = 0, page_size = 0;
  bool paged = false, cuda = false;
};

class Checker {
 public:
  explicit Checker(const std::string& op) : op_(op) {}
  [[noreturn]] void bad(const std::string& msg) const { fail(ErrorKind::kInvalidArgument, op_, msg); }
  [[noreturn]] void unsupported(const std::string& msg) const { fail(ErrorKind::kNotImplemented, op_, msg); }

  static std::string shape(const TensorView& v) {
    std::string s = "(";
    for (int i = 0; i < v.ndim; ++i) s += (i ? ", " : "") + std::to_string(v.shape[i]);
    return s + ")";
  }
  void rank(const TensorView& v, const char* name, int ndim) const {
    if (v.ndim != ndim)
      bad(std::string(name) + " must have " + std::to_string(ndim) + " dimensions, got shape " + shape(v));
  }
  void dims(const TensorView& v, const char* name, std::initializer_list<std::int64_t> want) const {
    bool ok = v.ndim == static_cast<int>(want.size());
    int i = 0;
    for (std::int64_t w : want) ok = ok && v.shape[i++] == w;
    if (!ok) {
      std::string s = "(";
      i = 0;
      for (std::int64_t w : want) s += (i++ ? ", " : "") + std::to_string(w);
      bad(std::string(name) + " must have shape " + s + "), got " + shape(v));
    }
  }
  void dtype(const TensorView& v, const char* name, DType want) const {
    if (v.dtype != want)
      bad(std::string(name) + " must be " + dtype_name(want) + ", got " + dtype_name(v.dtype));
  }
  void device(const TensorView& v, const char* name, const Device& want) const {
    const bool cuda = runs_on_cuda(want.type);
    const bool ok = runs_on_cuda(v.device.type) == cuda && (!cuda || v.device.index == want.index);
    if (!ok)
      bad(std::string(name) + " must be on q's device (" + device_type_name(want.type) + ":" +
          std::to_string(want.index) + "), got " + device_type_name(v.device.type) + ":" +
          std::to_string(v.device.index));
  }
  void last_contiguous(const TensorView& v, const char* name) const {
    if (v.numel() == 0) return;  // no element to read (no new rows, say): its strides mean nothing
    if (v.ndim > 0 && v.shape[v.ndim - 1] > 1 && v.strides[v.ndim - 1] != 1)
      bad(std::string(name) + " must have a contiguous last dimension (stride 1), got stride " +
          std::to_string(v.strides[v.ndim - 1]) + " (the KV cache path never stages a copy)");
    for (int i = 0; i < v.ndim; ++i)
      if (v.strides[i] < 0) bad(std::string(name) + " must not have negative strides");
  }

 private:
  const std::string& op_;
};

bool is_half_or_float(DType t) { return t == DType::kBFloat16 || t == DType::kFloat16 || t == DType::kFloat32; }

// The int32 index tensors' values in host memory: element pointers and element strides.
struct IndexValues {
  const std::int32_t *seqlens = nullptr, *leftpad = nullptr, *batch_idx = nullptr, *table = nullptr;
  std::int64_t seqlens_stride = 0, leftpad_stride = 0, batch_idx_stride = 0, table_row = 0, table_col = 0;
};

IndexValues host_index_values(const DecodeArgs& a) {
  IndexValues v;
  auto one = [](const TensorView& t, const std::int32_t*& p, std::int64_t& stride) {
    if (!t.defined()) return;
    p = static_cast<const std::int32_t*>(t.data);
    stride = t.strides[0];
  };
  one(a.cache_seqlens, v.seqlens, v.seqlens_stride);
  one(a.cache_leftpad, v.leftpad, v.leftpad_stride);
  one(a.cache_batch_idx, v.batch_idx, v.batch_idx_stride);
  if (a.block_table.defined()) {
    v.table = static_cast<const std::int32_t*>(a.block_table.data);
    v.table_row = a.block_table.strides[0];
    v.table_col = a.block_table.strides[1];
  }
  return v;
}

// The value checks of the index tensors, the same for both backends: appended rows inside the
// cache, leftpad within the sequence, batch indices and the used block_table entries inside
// the cache.
void check_index_values(const DecodeShape& s, const IndexValues& v, const Checker& c) {
  for (std::int64_t bi = 0; bi < s.b; ++bi) {
    const std::int64_t seqlen = v.seqlens ? v.seqlens[bi * v.seqlens_stride] : s.capacity;
    if (seqlen < 0) c.bad("cache_seqlens[" + std::to_string(bi) + "] = " + std::to_string(seqlen) + " is negative");
    if (seqlen + s.s_new > s.capacity)
      c.bad("cache_seqlens[" + std::to_string(bi) + "] + new k rows = " + std::to_string(seqlen) + " + " +
            std::to_string(s.s_new) + " is longer than the cache (" + std::to_string(s.capacity) + " rows)");
    std::int64_t lp = 0;
    if (v.leftpad) {
      lp = v.leftpad[bi * v.leftpad_stride];
      if (lp < 0 || lp > seqlen)
        c.bad("cache_leftpad[" + std::to_string(bi) + "] = " + std::to_string(lp) + " is outside [0, cache_seqlens[" +
              std::to_string(bi) + "] = " + std::to_string(seqlen) + "]");
    }
    if (v.batch_idx) {
      const std::int64_t cb = v.batch_idx[bi * v.batch_idx_stride];
      if (cb < 0 || cb >= s.cache_batch)
        c.bad("cache_batch_idx[" + std::to_string(bi) + "] = " + std::to_string(cb) + " is outside the cache's " +
              std::to_string(s.cache_batch) + " batch entries");
    }
    if (v.table) {
      const std::int64_t end = seqlen + s.s_new;
      for (std::int64_t blk = lp / s.page_size; blk * s.page_size < end; ++blk) {
        const std::int64_t id = v.table[bi * v.table_row + blk * v.table_col];
        if (id < 0 || id >= s.cache_batch)
          c.bad("block_table[" + std::to_string(bi) + ", " + std::to_string(blk) + "] = " + std::to_string(id) +
                " is outside the cache's " + std::to_string(s.cache_batch) + " pages");
      }
    }
  }
}

// CUDA calls: the index tensors copied to the host (one sync) and checked as above, unless
// options.check_device_indices is off or the stream is being captured into a CUDA graph.
void check_device_index_values(const DecodeArgs& a, const DecodeShape& s, const Checker& c) {
  if (!a.options.check_device_indices || s.b == 0) return;
  if (!a.cache_seqlens.defined() && !a.cache_leftpad.defined() && !a.cache_batch_idx.defined() &&
      !a.block_table.defined())
    return;  // nothing data-dependent
  std::vector<std::int32_t> seqlens, leftpad, batch_idx, table;
  std::vector<DeviceRows> copies;
  IndexValues v;
  auto vec = [&](const TensorView& t, std::vector<std::int32_t>& host, const std::int32_t*& p,
                 std::int64_t& stride) {
    if (!t.defined()) return;
    host.resize(static_cast<std::size_t>(s.b));
    copies.push_back({host.data(), t.data, sizeof(std::int32_t), s.b,
                      t.strides[0] * static_cast<std::int64_t>(sizeof(std::int32_t))});
    p = host.data();
    stride = 1;
  };
  vec(a.cache_seqlens, seqlens, v.seqlens, v.seqlens_stride);
  vec(a.cache_leftpad, leftpad, v.leftpad, v.leftpad_stride);
  vec(a.cache_batch_idx, batch_idx, v.batch_idx, v.batch_idx_stride);
  if (a.block_table.defined() && a.block_table.shape[1] > 0) {
    const std::int64_t cols = a.block_table.shape[1];  // last_contiguous: column stride 1
    table.resize(static_cast<std::size_t>(s.b * cols));
    copies.push_back({table.data(), a.block_table.data, static_cast<std::size_t>(cols) * sizeof(std::int32_t), s.b,
                      a.block_table.strides[0] * static_cast<std::int64_t>(sizeof(std::int32_t))});
    v.table = table.data();
    v.table_row = cols;
    v.table_col = 1;
  }
  if (decode_cuda_copy_rows(copies.data(), static_cast<int>(copies.size()), a.options.stream))
    check_index_values(s, v, c);
}

DecodeShape validate(const DecodeArgs& a) {
  const std::string& op = a.options.op_name;
  Checker c(op);
  DecodeShape s;
  if (!a.q.defined() || !a.k_cache.defined() || !a.v_cache.defined() || !a.out.defined())
    c.bad("q, k_cache, v_cache and out are required");
  c.rank(a.q, "q", 4);
  c.rank(a.k_cache, "k_cache", 4);
  c.rank(a.v_cache, "v_cache", 4);
  if (!is_half_or_float(a.q.dtype))
    c.bad(std::string("q must be bfloat16, float16 or float32, got ") + dtype_name(a.q.dtype));
  c.dtype(a.k_cache, "k_cache", a.q.dtype);
  c.dtype(a.v_cache, "v_cache", a.q.dtype);
  const Device dev = a.q.device;
  s.cuda = runs_on_cuda(dev.type);
  s.b = a.q.shape[0];
  s.sq = a.q.shape[1];
  s.hq = a.q.shape[2];
  s.d = a.q.shape[3];
  s.hkv = a.k_cache.shape[2];
  s.paged = a.block_table.defined();
  if (a.k_cache.shape[3] != s.d || a.v_cache.shape[3] != s.d)
    c.bad("head dim mismatch: q has " + std::to_string(s.d) + ", k_cache " + std::to_string(a.k_cache.shape[3]) +
          ", v_cache " + std::to_string(a.v_cache.shape[3]) + " (all must be equal)");
  for (int i = 0; i < 3; ++i)
    if (a.k_cache.shape[i] != a.v_cache.shape[i])
      c.bad("k_cache " + Checker::shape(a.k_cache) + " and v_cache " + Checker::shape(a.v_cache) +
            " must have the same shape");
  if (s.hkv <= 0 || s.hq % s.hkv != 0)
    c.bad("head count mismatch: q has " + std::to_string(s.hq) + " heads, the cache " + std::to_string(s.hkv) +
          " (q heads must be a multiple of the cache's kv heads)");
  if (s.d % 8 != 0 || s.d > 256 || s.d <= 0)
    c.unsupported("head dim " + std::to_string(s.d) + " is not supported (a multiple of 8, at most 256)");
  c.device(a.k_cache, "k_cache", dev);
  c.device(a.v_cache, "v_cache", dev);
  c.last_contiguous(a.q, "q");
  c.last_contiguous(a.k_cache, "k_cache");
  c.last_contiguous(a.v_cache, "v_cache");

  // Cache geometry.
  if (s.paged) {
    c.rank(a.block_table, "block_table", 2);
    c.dtype(a.block_table, "block_table", DType::kInt32);
    c.device(a.block_table, "block_table", dev);
    c.last_contiguous(a.block_table, "block_table");
    if (a.block_table.shape[0] != s.b)
      c.bad("block_table must have one row per batch entry of q (" + std::to_string(s.b) + "), got shape " +
            Checker::shape(a.block_table));
    if (a.cache_batch_idx.defined()) c.bad("cache_batch_idx is not supported with a paged cache (block_table)");
    s.page_size = a.k_cache.shape[1];
    if (s.page_size <= 0 || s.page_size % 16 != 0)
      c.unsupported("page size " + std::to_string(s.page_size) +
                    " (k_cache.shape[1] with block_table) is not supported: it must be a positive multiple of 16");
    s.capacity = a.block_table.shape[1] * s.page_size;
    s.cache_batch = a.k_cache.shape[0];
  } else {
    s.capacity = a.k_cache.shape[1];
    s.cache_batch = a.k_cache.shape[0];
    if (!a.cache_batch_idx.defined() && s.cache_batch < s.b)
      c.bad("k_cache has " + std::to_string(s.cache_batch) + " batch entries but q has " + std::to_string(s.b) +
            " (pass cache_batch_idx to map them)");
  }

  // New keys / values.
  if (a.k.defined() != a.v.defined()) c.bad("k and v must be given together");
  if (a.k.defined()) {
    if (!a.cache_seqlens.defined()) c.bad("new k/v need cache_seqlens (where to append them in the cache)");
    c.rank(a.k, "k", 4);
    s.s_new = a.k.shape[1];
    c.dims(a.k, "k", {s.b, s.s_new, s.hkv, s.d});
    c.dims(a.v, "v", {s.b, s.s_new, s.hkv, s.d});
    c.dtype(a.k, "k", a.q.dtype);
    c.dtype(a.v, "v", a.q.dtype);
    c.device(a.k, "k", dev);
    c.device(a.v, "v", dev);
    c.last_contiguous(a.k, "k");
    c.last_contiguous(a.v, "v");
    // The append writes the caches: one cache passed as both, or a view whose entries share memory
    // (expand), would have the new rows overwrite each other.
    if (a.k_cache.data == a.v_cache.data)
      c.bad("k_cache and v_cache are the same memory, and the new k and v are both written into it: "
            "pass two caches");
    for (const auto* t : {&a.k_cache, &a.v_cache})
      if (self_overlapping(*t))
        c.bad(std::string(t == &a.k_cache ? "k_cache" : "v_cache") + " " + Checker::shape(*t) +
              " has overlapping memory (zero or overlapping strides), and the new k / v are written into it: "
              "pass a cache whose entries do not share memory");
    if (s.s_new > s.capacity)
      c.bad("new k has " + std::to_string(s.s_new) + " rows, longer than the cache (" + std::to_string(s.capacity) +
            " rows)");
  }
  auto int_vec = [&](const TensorView& v, const char* name) {
    if (!v.defined()) return;
    c.dtype(v, name, DType::kInt32);
    c.dims(v, name, {s.b});
    c.device(v, name, dev);
  };
  int_vec(a.cache_seqlens, "cache_seqlens");
  int_vec(a.cache_batch_idx, "cache_batch_idx");
  int_vec(a.cache_leftpad, "cache_leftpad");

  // Rotary.
  if (a.rotary_cos.defined() != a.rotary_sin.defined()) c.bad("rotary_cos and rotary_sin must be given together");
  if (a.rotary_cos.defined()) {
    if (!a.k.defined()) c.bad("rotary_cos/rotary_sin need the new k and v (rotary applies to q and the new k)");
    c.rank(a.rotary_cos, "rotary_cos", 2);
    c.dims(a.rotary_sin, "rotary_sin", {a.rotary_cos.shape[0], a.rotary_cos.shape[1]});
    for (const auto* t : {&a.rotary_cos, &a.rotary_sin}) {
      const char* name = t == &a.rotary_cos ? "rotary_cos" : "rotary_sin";
      if (t->dtype != a.q.dtype && t->dtype != DType::kFloat32)
        c.bad(std::string(name) + " must be q's dtype or float32, got " + dtype_name(t->dtype));
      c.device(*t, name, dev);
      c.last_contiguous(*t, name);
    }
    if (a.rotary_sin.dtype != a.rotary_cos.dtype) c.bad("rotary_cos and rotary_sin must have the same dtype");
    const std::int64_t rd = 2 * a.rotary_cos.shape[1];
    if (rd <= 0 || rd > s.d)
      c.bad("rotary_dim (2 * rotary_cos.shape[1] = " + std::to_string(rd) + ") must be in [2, head dim " +
            std::to_string(s.d) + "]");
    if (a.rotary_cos.shape[0] < s.capacity)
      c.bad("rotary_cos/rotary_sin have " + std::to_string(a.rotary_cos.shape[0]) +
            " positions, fewer than the cache's " + std::to_string(s.capacity) + " rows");
  }

  // ALiBi.
  if (a.alibi_slopes.defined()) {
    const TensorView& al = a.alibi_slopes;
    c.dtype(al, "alibi_slopes", DType::kFloat32);
    c.device(al, "alibi_slopes", dev);
    const bool ok = (al.ndim == 1 && al.shape[0] == s.hq) || (al.ndim == 2 && al.shape[0] == s.b && al.shape[1] == s.hq);
    if (!ok)
      c.bad("alibi_slopes must have shape (" + std::to_string(s.hq) + ",) or (" + std::to_string(s.b) + ", " +
            std::to_string(s.hq) + "), got " + Checker::shape(al));
    c.last_contiguous(al, "alibi_slopes");
  }

  // Outputs.
  c.dims(a.out, "out", {s.b, s.sq, s.hq, s.d});
  c.dtype(a.out, "out", a.q.dtype);
  c.device(a.out, "out", dev);
  c.last_contiguous(a.out, "out");
  if (a.lse.defined()) {
    c.dims(a.lse, "lse", {s.b, s.hq, s.sq});
    c.dtype(a.lse, "lse", DType::kFloat32);
    c.device(a.lse, "lse", dev);
    c.last_contiguous(a.lse, "lse");
  }

  // Options.
  const DecodeOptions& o = a.options;
  if (o.window_left < -1 || o.window_right < -1) c.bad("window_size entries must be >= -1");
  if (!(o.softcap >= 0.0) || !std::isfinite(o.softcap)) c.bad("softcap must be a finite value >= 0");
  if (o.softmax_scale && !std::isfinite(*o.softmax_scale)) c.bad("softmax_scale must be finite");
  if (o.num_splits < 0) c.bad("num_splits must be >= 0 (0 = heuristic)");

  // The cache is never staged: on CUDA it is read with 16-byte vector loads.
  if (s.cuda) {
    const std::size_t es = dtype_size(a.q.dtype);
    for (const auto* t : {&a.k_cache, &a.v_cache}) {
      bool ok = reinterpret_cast<std::uintptr_t>(t->data) % 16 == 0;
      for (int i = 0; i < 3; ++i) ok = ok && (t->strides[i] * static_cast<std::int64_t>(es)) % 16 == 0;
      if (!ok)
        c.unsupported(std::string(t == &a.k_cache ? "k_cache" : "v_cache") +
                      " must be 16-byte aligned with batch/row/head strides that are multiples of 16 bytes on "
                      "CUDA (the cache is never copied), got " + t->describe());
    }
  }

  // Values of the index tensors, readable here only when they live in host memory (CUDA calls:
  // check_device_index_values, from run()).
  if (!s.cuda && s.b > 0) check_index_values(s, host_index_values(a), c);
  return s;
}

DecodePlan plan_for(const DecodeArgs& a, const DecodeShape& s) {
  DecodePlan plan;
  const std::int64_t rows = s.sq * (s.hkv ? s.hq / s.hkv : 1);
  int splits = a.options.num_splits;
  if (splits == 0) {
    if (s.cuda) {
      splits = decode_cuda_num_splits(s.b * s.hkv, rows, s.capacity, static_cast<int>(s.d), a.q.dtype,
                                      a.q.device.index);
    } else {
      splits = kvcache_num_splits_heuristic(s.b * s.hkv, s.capacity, decode_cpu_threads());
    }
  }
  splits = clamp_decode_splits(splits, s.capacity);
  plan.num_splits = splits;
  if (splits > 1)
    plan.workspace_bytes = (decode_split_workspace_floats(splits, s.b, s.hq, s.sq, s.d) * sizeof(float) + 255) / 256 * 256;
  return plan;
}

std::string summary(const DecodeParams& p) {
  LogLine s;
  s << "b=" << p.b << " sq=" << p.sq << " hq=" << p.hq << " hkv=" << p.hkv << " d=" << p.d << " s_new=" << p.s_new
    << " capacity=" << p.capacity << " dtype=" << dtype_name(p.dtype) << " paged=" << (p.block_table ? p.page_size : 0)
    << " causal=" << (p.causal ? 1 : 0);
  if (p.window_left >= 0 || p.window_right > 0) s << " window=(" << p.window_left << "," << p.window_right << ")";
  if (p.softcap > 0.f) s << " softcap=" << p.softcap;
  if (p.alibi_slopes) s << " alibi=1";
  if (p.rotary_dim) s << " rotary=" << p.rotary_dim << (p.rotary_interleaved ? "i" : "n");
  if (p.cache_batch_idx) s << " batch_idx=1";
  if (p.cache_leftpad) s << " leftpad=1";
  s << " splits=" << p.num_splits << " scale=" << p.scale;
  return s.str();
}

void run(const DecodeArgs& a) {
  const std::string& op = a.options.op_name;
  const DecodeShape s = validate(a);
  const DecodePlan plan = plan_for(a, s);
  if (plan.workspace_bytes > 0) {
    const TensorView& w = a.workspace;
    if (!w.defined() || static_cast<std::size_t>(w.numel()) * dtype_size(w.dtype) < plan.workspace_bytes)
      fail(ErrorKind::kInvalidArgument, op,
           "workspace of at least " + std::to_string(plan.workspace_bytes) + " bytes is required for " +
               std::to_string(plan.num_splits) + " splits (see kvcache_plan)");
    if (reinterpret_cast<std::uintptr_t>(w.data) % 16 != 0)
      fail(ErrorKind::kInvalidArgument, op, "workspace must be 16-byte aligned");
    const bool same = runs_on_cuda(w.device.type) == s.cuda && (!s.cuda || w.device.index == a.q.device.index);
    if (!same) fail(ErrorKind::kInvalidArgument, op, "workspace must be on q's device");
  }
  if (s.b == 0) return;

  DecodeParams p;
  p.q = a.q.data;
  p.k_cache = a.k_cache.data;
  p.v_cache = a.v_cache.data;
  p.out = a.out.data;
  p.lse = a.lse.defined() ? static_cast<float*>(a.lse.data) : nullptr;
  p.q_batch_stride = a.q.strides[0], p.q_row_stride = a.q.strides[1], p.q_head_stride = a.q.strides[2];
  p.kc_batch_stride = a.k_cache.strides[0], p.kc_row_stride = a.k_cache.strides[1],
  p.kc_head_stride = a.k_cache.strides[2];
  p.vc_batch_stride = a.v_cache.strides[0], p.vc_row_stride = a.v_cache.strides[1],
  p.vc_head_stride = a.v_cache.strides[2];
  p.o_batch_stride = a.out.strides[0], p.o_row_stride = a.out.strides[1], p.o_head_stride = a.out.strides[2];
  if (a.lse.defined()) p.lse_batch_stride = a.lse.strides[0], p.lse_head_stride = a.lse.strides[1];
  if (a.k.defined()) {
    p.k_new = a.k.data;
    p.v_new = a.v.data;
    p.kn_batch_stride = a.k.strides[0], p.kn_row_stride = a.k.strides[1], p.kn_head_stride = a.k.strides[2];
    p.vn_batch_stride = a.v.strides[0], p.vn_row_stride = a.v.strides[1], p.vn_head_stride = a.v.strides[2];
    p.s_new = static_cast<int>(s.s_new);
  }
  p.b = static_cast<int>(s.b);
  p.sq = static_cast<int>(s.sq);
  p.hq = static_cast<int>(s.hq);
  p.hkv = static_cast<int>(s.hkv);
  p.d = static_cast<int>(s.d);
  p.capacity = s.capacity;
  p.cache_batch = s.cache_batch;
  // int32 index vectors must be contiguous for the kernels (they are (b,) in practice).
  auto vec = [&](const TensorView& v, const char* name) -> const std::int32_t* {
    if (!v.defined()) return nullptr;
    if (v.shape[0] > 1 && v.strides[0] != 1)
      fail(ErrorKind::kInvalidArgument, op, std::string(name) + " must be contiguous");
    return static_cast<const std::int32_t*>(v.data);
  };
  p.cache_seqlens = vec(a.cache_seqlens, "cache_seqlens");
  p.cache_batch_idx = vec(a.cache_batch_idx, "cache_batch_idx");
  p.cache_leftpad = vec(a.cache_leftpad, "cache_leftpad");
  if (s.paged) {
    p.block_table = static_cast<const std::int32_t*>(a.block_table.data);
    p.block_table_batch_stride = a.block_table.strides[0];
    p.page_size = static_cast<int>(s.page_size);
  }
  if (s.cuda) check_device_index_values(a, s, Checker(op));  // before anything is written
  if (a.rotary_cos.defined()) {
    p.rotary_cos = a.rotary_cos.data;
    p.rotary_sin = a.rotary_sin.data;
    p.rotary_dtype = a.rotary_cos.dtype;
    p.cos_row_stride = a.rotary_cos.strides[0];
    p.sin_row_stride = a.rotary_sin.strides[0];
    p.rotary_seqlen = a.rotary_cos.shape[0];
    p.rotary_dim = static_cast<int>(2 * a.rotary_cos.shape[1]);
    p.rotary_interleaved = a.options.rotary_interleaved;
  }
  const DecodeOptions& o = a.options;
  p.scale = static_cast<float>(o.softmax_scale ? *o.softmax_scale : 1.0 / std::sqrt(static_cast<double>(s.d)));
  p.softcap = static_cast<float>(o.softcap);
  // flash-attn's normal form: causal is right = 0; bounds no row can reach are unbounded. The
  // windows stay literal (as flash-attn documents them and orchard.flash_attn_func applies them):
  // flash-attn's own kvcache code drops any bound >= the capacity, which differs where
  // sq >= capacity + 2 (a right bound that hides keys from the first rows) and, non-causal with
  // several rows and rotary, for a bound in [capacity, capacity + sq): here q's rotary is per row.
  const std::int64_t reach = s.capacity + s.sq;
  p.window_left = o.window_left >= reach ? -1 : o.window_left;
  p.window_right = o.causal ? 0 : (o.window_right >= reach ? -1 : o.window_right);
  p.causal = p.window_right == 0;
  if (a.alibi_slopes.defined()) {
    p.alibi_slopes = static_cast<const float*>(a.alibi_slopes.data);
    p.alibi_batch_stride = a.alibi_slopes.ndim == 2 ? a.alibi_slopes.strides[0] : 0;
  }
  p.num_splits = plan.num_splits;
  if (plan.num_splits > 1) place_decode_split_partials(p, static_cast<float*>(a.workspace.data));
  p.dtype = a.q.dtype;
  p.stream = o.stream;

  auto kernel = [&] {
    if (s.cuda)
      decode_cuda(p);
    else
      decode_cpu(p);
  };
  if (!debug_log_enabled()) {
    kernel();
    return;
  }
  const long long call = next_call_number();
  RegionTraceScope trace_scope(s.cuda ? nullptr : &cpu_backend());  // the CPU decode runs on its loops
  const auto t0 = std::chrono::steady_clock::now();
  kernel();
  const auto t1 = std::chrono::steady_clock::now();
  const std::string trace = trace_scope.finish();
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.4f", std::chrono::duration<double, std::milli>(t1 - t0).count());
  debug_log_line(std::string("DECODE #") + std::to_string(call) + " op=" + op + " " + summary(p) +
                 " backend=" + (s.cuda ? "cuda" : "cpu") + " staged=0" + (trace.empty() ? "" : " ") + trace +
                 " host_ms=" + buf);
}

}  // namespace
}  // namespace detail

int kvcache_num_splits_heuristic(std::int64_t work_items, std::int64_t max_keys, int num_sms) {
  if (num_sms <= 0 || work_items <= 0) return 1;
  // Aim at two CTAs per multiprocessor (a full wave); never split below 256 keys per split.
  const std::int64_t target = 2LL * num_sms;
  if (work_items >= target * 4 / 5) return 1;
  std::int64_t splits = (target + work_items - 1) / work_items;
  splits = std::min<std::int64_t>(splits, std::max<std::int64_t>(1, max_keys / 256));
  return static_cast<int>(std::clamp<std::int64_t>(splits, 1, 128));
}

DecodePlan kvcache_plan(const DecodeArgs& a) {
  return detail::with_op_prefix(a.options.op_name, [&] { return detail::plan_for(a, detail::validate(a)); });
}

void attention_with_kvcache(const DecodeArgs& a) {
  detail::with_op_prefix(a.options.op_name, [&] { detail::run(a); });
}

}  // namespace orchard
