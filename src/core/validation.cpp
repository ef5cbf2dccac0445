#include "core/validation.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

namespace orchard::detail {

void fail(ErrorKind kind, const std::string& op, const std::string& message) {
  throw Error(kind, op + ": " + message);
}

DType lse_dtype_for(DType dtype) { return dtype == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32; }

bool runs_on_cuda(DeviceType t) { return t == DeviceType::kCUDA || t == DeviceType::kCUDAManaged; }

bool self_overlapping(const TensorView& v) {
  if (v.numel() == 0) return false;
  std::vector<std::pair<std::int64_t, std::int64_t>> dims;  // (|stride|, size)
  for (int i = 0; i < v.ndim; ++i)
    if (v.shape[i] > 1) dims.emplace_back(std::llabs(v.strides[i]), v.shape[i]);
  std::sort(dims.begin(), dims.end());
  std::int64_t extent = 1;  // elements spanned by the inner dims
  for (const auto& [stride, size] : dims) {
    if (stride < extent) return true;
    extent = stride * (size - 1) + extent;
  }
  return false;
}

namespace {

struct Named {
  const char* name;
  const TensorView* view;
};

bool is_float_dtype(DType t) {
  return t == DType::kFloat16 || t == DType::kBFloat16 || t == DType::kFloat32 || t == DType::kFloat64;
}

// Messages are built with std::to_string, not iostreams: error paths should
// depend on as little of the C++ runtime's locale machinery as possible.
std::string shape_str(const TensorView& v) {
  std::string s = "(";
  for (int i = 0; i < v.ndim; ++i) {
    if (i) s += ", ";
    s += std::to_string(v.shape[i]);
  }
  return s + ")";
}

std::string device_str(const Device& d) {
  std::string s = device_type_name(d.type);
  if (d.type != DeviceType::kCPU) {
    s += ':';
    s += std::to_string(d.index);
  }
  return s;
}

// Byte range [lo, hi) a view can touch; empty views touch nothing.
std::pair<std::uintptr_t, std::uintptr_t> byte_range(const TensorView& v) {
  if (v.numel() == 0) return {0, 0};
  std::int64_t lo = 0, hi = 0;
  for (int i = 0; i < v.ndim; ++i) {
    const std::int64_t span = (v.shape[i] - 1) * v.strides[i];
    (span < 0 ? lo : hi) += span;
  }
  const auto base = reinterpret_cast<std::uintptr_t>(v.data);
  const auto es = static_cast<std::int64_t>(dtype_size(v.dtype));
  return {base + lo * es, base + (hi + 1) * es};
}

bool ranges_overlap(const TensorView& a, const TensorView& b) {
  const auto [alo, ahi] = byte_range(a);
  const auto [blo, bhi] = byte_range(b);
  if (alo == ahi || blo == bhi) return false;
  return alo < bhi && blo < ahi;
}


class Checker {
 public:
  explicit Checker(const std::string& op) : op_(op) {}

  void defined(const Named& t) const {
    if (!t.view->defined()) fail(ErrorKind::kInvalidArgument, op_, std::string(t.name) + " is required");
  }
  void rank(const Named& t, int ndim, const char* layout) const {
    if (t.view->ndim != ndim)
      fail(ErrorKind::kInvalidArgument, op_,
           std::string(t.name) + " must have rank " + std::to_string(ndim) + " " + layout + ", got rank " +
               std::to_string(t.view->ndim) + " " + shape_str(*t.view));
  }
  void dtype(const Named& t, DType expected) const {
    if (t.view->dtype != expected)
      fail(ErrorKind::kInvalidArgument, op_,
           std::string(t.name) + " has dtype " + dtype_name(t.view->dtype) + " but " + dtype_name(expected) +
               " is required (all of q, k, v and their outputs/gradients share one dtype)");
  }
  void shape(const Named& t, const std::vector<std::int64_t>& expected, const char* layout) const {
    bool ok = true;
    for (std::size_t i = 0; i < expected.size(); ++i) ok = ok && t.view->shape[i] == expected[i];
    if (!ok) {
      TensorView want;
      want.ndim = static_cast<int>(expected.size());
      for (std::size_t i = 0; i < expected.size(); ++i) want.shape[i] = expected[i];
      fail(ErrorKind::kInvalidArgument, op_,
           std::string(t.name) + " has shape " + shape_str(*t.view) + ", expected " + shape_str(want) + " " + layout);
    }
  }
  void same_device(const Named& t, const Named& ref) const {
    const Device a = t.view->device, b = ref.view->device;
    const bool ok = runs_on_cuda(a.type) == runs_on_cuda(b.type) && (!runs_on_cuda(a.type) || a.index == b.index);
    if (!ok)
      fail(ErrorKind::kInvalidArgument, op_,
           std::string("device mismatch: ") + ref.name + " is on " + device_str(b) + " but " + t.name + " is on " +
               device_str(a) + (runs_on_cuda(b.type) && !runs_on_cuda(a.type)
                                    ? " (host memory cannot be handed to a CUDA call; move it with .cuda())"
                                    : ""));
  }
  void writable(const Named& out, const std::vector<Named>& inputs) const {
    if (self_overlapping(*out.view))
      fail(ErrorKind::kInvalidArgument, op_,
           std::string(out.name) + " has overlapping memory (zero or overlapping strides " +
               out.view->describe() + "); outputs must be writable views");
    for (const Named& in : inputs)
      if (in.view->defined() && ranges_overlap(*out.view, *in.view))
        fail(ErrorKind::kInvalidArgument, op_,
             std::string("output ") + out.name + " aliases input " + in.name + "; pass a separate buffer");
  }
  void distinct_outputs(const std::vector<Named>& outs) const {
    for (std::size_t i = 0; i < outs.size(); ++i)
      for (std::size_t j = i + 1; j < outs.size(); ++j)
        if (outs[i].view->defined() && outs[j].view->defined() && outs[i].view->numel() > 0 &&
            outs[i].view->data == outs[j].view->data && outs[j].view->numel() > 0)
          fail(ErrorKind::kInvalidArgument, op_,
               std::string("outputs ") + outs[i].name + " and " + outs[j].name + " alias the same memory");
  }

 private:
  const std::string& op_;
};

// Expected shapes of every tensor of a call, in the layout the call uses
// (BSHD, or (total, heads, dim) for varlen).
struct Shapes {
  std::vector<std::int64_t> q, k, v, out, lse;
  const char* q_layout;
  const char* kv_layout;
  const char* lse_layout;
};

Shapes expected_shapes(const ProblemShape& p) {
  if (p.varlen)
    return {{p.total_q, p.hq, p.d},   {p.total_k, p.hkv, p.d}, {p.total_k, p.hkv, p.d_v},
            {p.total_q, p.hq, p.d_v}, {p.hq, p.total_q},       "(total_q, heads, head_dim)",
            "(total_k, kv_heads, head_dim)", "(heads, total_q)"};
  return {{p.b, p.sq, p.hq, p.d},   {p.b, p.sk, p.hkv, p.d}, {p.b, p.sk, p.hkv, p.d_v},
          {p.b, p.sq, p.hq, p.d_v}, {p.b, p.hq, p.sq},       "(batch, seqlen_q, heads, head_dim)",
          "(batch, seqlen_k, kv_heads, head_dim)", "(batch, heads, seqlen_q)"};
}

// Varlen offsets: int32 (b + 1,) on q's device. Their values are checked here when
// they live in host memory; on a GPU reading them would synchronize every call, so
// the Python layer checks them outside graph capture and C++ callers own that.
void check_cu_seqlens(const std::string& op, const Checker& c, const Named& cu, const Named& q, std::int64_t b,
                      std::int64_t total, std::int64_t max_len, const char* max_name) {
  c.rank(cu, 1, "(batch + 1,)");
  if (cu.view->dtype != DType::kInt32)
    fail(ErrorKind::kInvalidArgument, op,
         std::string(cu.name) + " must be int32, got " + dtype_name(cu.view->dtype));
  c.same_device(cu, q);
  if (cu.view->shape[0] != b + 1)
    fail(ErrorKind::kInvalidArgument, op,
         std::string(cu.name) + " has " + std::to_string(cu.view->shape[0]) + " entries, expected batch + 1 = " +
             std::to_string(b + 1) + " (cu_seqlens_q and cu_seqlens_k must have the same length)");
  if (runs_on_cuda(cu.view->device.type)) return;
  const auto* v = static_cast<const std::int32_t*>(cu.view->data);
  const std::int64_t st = cu.view->strides[0];
  if (v[0] < 0) fail(ErrorKind::kInvalidArgument, op, std::string(cu.name) + "[0] is negative");
  for (std::int64_t i = 0; i < b; ++i) {
    const std::int64_t len = std::int64_t(v[(i + 1) * st]) - v[i * st];
    if (len < 0)
      fail(ErrorKind::kInvalidArgument, op,
           std::string(cu.name) + " must be non-decreasing; entry " + std::to_string(i + 1) + " (" +
               std::to_string(v[(i + 1) * st]) + ") < entry " + std::to_string(i) + " (" + std::to_string(v[i * st]) + ")");
    if (len > max_len)
      fail(ErrorKind::kInvalidArgument, op,
           std::string(max_name) + " (" + std::to_string(max_len) + ") is smaller than sequence " + std::to_string(i) +
               "'s length " + std::to_string(len));
  }
  if (v[b * st] > total)
    fail(ErrorKind::kInvalidArgument, op,
         std::string(cu.name) + "[-1] = " + std::to_string(v[b * st]) + " exceeds the " + std::to_string(total) +
             " rows of the packed tensor");
}

ProblemShape check_common(const std::string& op, const TensorView& q, const TensorView& k, const TensorView& v,
                          const AttentionExtras& x, const AttentionOptions& options) {
  const Checker c(op);
  c.defined({"q", &q});
  c.defined({"k", &k});
  c.defined({"v", &v});
  if (x.cu_seqlens_q.defined() != x.cu_seqlens_k.defined())
    fail(ErrorKind::kInvalidArgument, op, "cu_seqlens_q and cu_seqlens_k must be given together (varlen)");
  ProblemShape p;
  p.varlen = x.cu_seqlens_q.defined();
  if (p.varlen) {
    c.rank({"q", &q}, 3, "(total_q, heads, head_dim)");
    c.rank({"k", &k}, 3, "(total_k, kv_heads, head_dim)");
    c.rank({"v", &v}, 3, "(total_k, kv_heads, head_dim)");
  } else {
    c.rank({"q", &q}, 4, "(batch, seqlen_q, heads, head_dim)");
    c.rank({"k", &k}, 4, "(batch, seqlen_k, kv_heads, head_dim)");
    c.rank({"v", &v}, 4, "(batch, seqlen_k, kv_heads, head_dim)");
  }
  if (!is_float_dtype(q.dtype))
    fail(ErrorKind::kInvalidArgument, op,
         std::string("unsupported dtype ") + dtype_name(q.dtype) +
             " for q (supported: float16, bfloat16, float32, float64)");
  c.dtype({"k", &k}, q.dtype);
  c.dtype({"v", &v}, q.dtype);
  c.same_device({"k", &k}, {"q", &q});
  c.same_device({"v", &v}, {"q", &q});
  for (int i = 0; i < q.ndim; ++i)
    if (q.shape[i] < 0 || k.shape[i] < 0 || v.shape[i] < 0)
      fail(ErrorKind::kInvalidArgument, op, "negative sizes are invalid");

  const int hd = q.ndim - 1;  // head_dim axis; heads are the axis before it
  p.hq = q.shape[hd - 1];
  p.d = q.shape[hd];
  p.hkv = k.shape[hd - 1];
  p.d_v = v.shape[hd];
  p.dtype = q.dtype;
  p.device = q.device;
  if (p.varlen) {
    p.total_q = q.shape[0];
    p.total_k = k.shape[0];
    p.b = x.cu_seqlens_q.ndim == 1 ? x.cu_seqlens_q.shape[0] - 1 : 0;
    p.sq = x.max_seqlen_q;
    p.sk = x.max_seqlen_k;
    if (p.sq < 0 || p.sk < 0) fail(ErrorKind::kInvalidArgument, op, "max_seqlen_q and max_seqlen_k must be >= 0");
    if (p.b < 0) fail(ErrorKind::kInvalidArgument, op, "cu_seqlens_q must be 1-D with at least one entry");
    check_cu_seqlens(op, c, {"cu_seqlens_q", &x.cu_seqlens_q}, {"q", &q}, p.b, p.total_q, p.sq, "max_seqlen_q");
    check_cu_seqlens(op, c, {"cu_seqlens_k", &x.cu_seqlens_k}, {"q", &q}, p.b, p.total_k, p.sk, "max_seqlen_k");
  } else {
    p.b = q.shape[0];
    p.sq = q.shape[1];
    p.sk = k.shape[1];
  }
  const Shapes e = expected_shapes(p);
  c.shape({"k", &k}, e.k, "(batch and head_dim must match q)");
  c.shape({"v", &v}, e.v, "(must match k but for its head_dim)");
  if (p.hkv == 0 && p.hq != 0)
    fail(ErrorKind::kInvalidArgument, op, "k and v have 0 heads but q has " + std::to_string(p.hq));
  if (p.hkv != 0 && p.hq % p.hkv != 0)
    fail(ErrorKind::kInvalidArgument, op,
         "number of query heads (" + std::to_string(p.hq) + ") must be a multiple of key/value heads (" +
             std::to_string(p.hkv) + ")");
  for (const auto& [name, dim] : {std::pair{"head dim", p.d}, std::pair{"value head dim", p.d_v}})
    if (dim < 1 || dim > kMaxHeadDim)
      fail(ErrorKind::kInvalidArgument, op,
           std::string(name) + " " + std::to_string(dim) + " is unsupported (1 <= head_dim <= " +
               std::to_string(kMaxHeadDim) + ")");
  constexpr std::int64_t kIntMax = std::numeric_limits<int>::max();
  if (p.b > kIntMax || p.sq > kIntMax || p.sk > kIntMax || p.hq > kIntMax || p.b * p.hq > kIntMax ||
      p.total_q > kIntMax || p.total_k > kIntMax)
    fail(ErrorKind::kInvalidArgument, op, "sizes exceed 2^31 - 1");
  const double dp = options.dropout_p;
  if (!(dp >= 0.0 && dp < 1.0))
    fail(ErrorKind::kInvalidArgument, op, "dropout_p must be in [0, 1), got " + std::to_string(dp));
  {
    const std::int64_t ro = options.dropout_row_offset, co = options.dropout_col_offset;
    const std::int64_t ho = options.dropout_head_offset, hn = options.dropout_heads;
    constexpr std::int64_t kU32 = std::int64_t(1) << 32;  // Philox indices are 32-bit
    if (ro < 0 || co < 0 || ho < 0 || hn < 0)
      fail(ErrorKind::kInvalidArgument, op,
           "dropout offsets must be >= 0, got row " + std::to_string(ro) + ", col " + std::to_string(co) +
               ", head " + std::to_string(ho) + ", heads " + std::to_string(hn));
    if (ro > kU32 - p.sq || co > kU32 - p.sk || hn > kIntMax || ho > (hn > 0 ? hn : kIntMax) - p.hq)
      fail(ErrorKind::kInvalidArgument, op,
           "dropout offsets out of range: rows " + std::to_string(ro) + "+" + std::to_string(p.sq) + ", cols " +
               std::to_string(co) + "+" + std::to_string(p.sk) + " (each <= 2^32), heads " + std::to_string(ho) +
               "+" + std::to_string(p.hq) + " (<= dropout_heads " + std::to_string(hn) + ")");
  }
  if (options.rng_state && reinterpret_cast<std::uintptr_t>(options.rng_state) % alignof(std::uint64_t) != 0)
    fail(ErrorKind::kInvalidArgument, op, "rng_state must be 8-byte aligned");
  if (options.softmax_scale && !std::isfinite(*options.softmax_scale))
    fail(ErrorKind::kInvalidArgument, op, "softmax_scale must be finite");
  if (options.window_left < -1 || options.window_right < -1)
    fail(ErrorKind::kInvalidArgument, op,
         "window_size values must be >= -1 (-1 = unbounded), got (" + std::to_string(options.window_left) + ", " +
             std::to_string(options.window_right) + ")");
  if (!(options.softcap >= 0.0) || !std::isfinite(options.softcap))
    fail(ErrorKind::kInvalidArgument, op, "softcap must be a finite value >= 0, got " + std::to_string(options.softcap));

  // ALiBi slopes and sinks: float32 per head.
  const Named q_named{"q", &q};
  if (x.alibi_slopes.defined()) {
    const Named s{"alibi_slopes", &x.alibi_slopes};
    if (x.alibi_slopes.dtype != DType::kFloat32)
      fail(ErrorKind::kInvalidArgument, op, std::string("alibi_slopes must be float32, got ") +
                                               dtype_name(x.alibi_slopes.dtype));
    c.same_device(s, q_named);
    const bool per_head = x.alibi_slopes.ndim == 1 && x.alibi_slopes.shape[0] == p.hq;
    const bool per_batch = x.alibi_slopes.ndim == 2 && x.alibi_slopes.shape[0] == p.b && x.alibi_slopes.shape[1] == p.hq;
    if (!per_head && !per_batch)
      fail(ErrorKind::kInvalidArgument, op,
           "alibi_slopes must have shape (" + std::to_string(p.hq) + ",) or (" + std::to_string(p.b) + ", " +
               std::to_string(p.hq) + "), got " + shape_str(x.alibi_slopes));
  }
  if (x.sink.defined()) {
    const Named s{"sink", &x.sink};
    if (x.sink.dtype != DType::kFloat32)
      fail(ErrorKind::kInvalidArgument, op, std::string("sink must be float32, got ") + dtype_name(x.sink.dtype));
    c.same_device(s, q_named);
    c.rank(s, 1, "(heads,)");
    c.shape(s, {p.hq}, "(heads,)");
  }
  if (x.attn_bias.defined()) {
    const Named m{"attn_bias", &x.attn_bias};
    if (p.varlen) fail(ErrorKind::kNotImplemented, op, "attn_mask / attn_bias cannot be combined with varlen");
    c.rank(m, 4, "(batch, heads, seqlen_q, seqlen_k), size-1 dims broadcast");
    const DType bt = x.attn_bias.dtype;
    const bool ok_dtype = bt == DType::kUInt8 || bt == p.dtype || (bt == DType::kFloat32 && p.dtype != DType::kFloat64);
    if (!ok_dtype)
      fail(ErrorKind::kInvalidArgument, op,
           std::string("attn_mask must be bool, ") + dtype_name(p.dtype) +
               (p.dtype != DType::kFloat64 && p.dtype != DType::kFloat32 ? " or float32" : "") + ", got " +
               dtype_name(bt));
    c.same_device(m, q_named);
    const std::int64_t want[4] = {p.b, p.hq, p.sq, p.sk};
    for (int i = 0; i < 4; ++i)
      if (x.attn_bias.shape[i] != want[i] && x.attn_bias.shape[i] != 1)
        fail(ErrorKind::kInvalidArgument, op,
             "attn_mask of shape " + shape_str(x.attn_bias) + " does not broadcast to (" + std::to_string(p.b) + ", " +
                 std::to_string(p.hq) + ", " + std::to_string(p.sq) + ", " + std::to_string(p.sk) + ")");
    if (reinterpret_cast<std::uintptr_t>(x.attn_bias.data) % dtype_size(bt) != 0)
      fail(ErrorKind::kInvalidArgument, op, "attn_mask data must be aligned to its element size");
  }
  return p;
}

}  // namespace

ProblemShape validate_forward(const ForwardArgs& a) {
  const std::string& op = a.options.op_name;
  const ProblemShape p = check_common(op, a.q, a.k, a.v, a.extras, a.options);
  const Shapes e = expected_shapes(p);
  const Checker c(op);
  c.defined({"out", &a.out});
  c.defined({"lse", &a.lse});
  c.rank({"out", &a.out}, static_cast<int>(e.out.size()), e.q_layout);
  c.rank({"lse", &a.lse}, static_cast<int>(e.lse.size()), e.lse_layout);
  c.dtype({"out", &a.out}, p.dtype);
  if (a.lse.dtype != lse_dtype_for(p.dtype))
    fail(ErrorKind::kInvalidArgument, op,
         std::string("lse must be ") + dtype_name(lse_dtype_for(p.dtype)) + ", got " + dtype_name(a.lse.dtype));
  c.same_device({"out", &a.out}, {"q", &a.q});
  c.same_device({"lse", &a.lse}, {"q", &a.q});
  c.shape({"out", &a.out}, e.out, "(like q, with v's head_dim)");
  c.shape({"lse", &a.lse}, e.lse, e.lse_layout);
  const std::vector<Named> inputs{{"q", &a.q}, {"k", &a.k}, {"v", &a.v}};
  c.writable({"out", &a.out}, inputs);
  c.writable({"lse", &a.lse}, inputs);
  std::vector<Named> outs{{"out", &a.out}, {"lse", &a.lse}};
  if (a.dropout_mask.defined()) {
    c.rank({"dropout_mask", &a.dropout_mask}, 4, "(batch, heads, seqlen_q, seqlen_k)");
    c.dtype({"dropout_mask", &a.dropout_mask}, DType::kUInt8);
    c.same_device({"dropout_mask", &a.dropout_mask}, {"q", &a.q});
    c.shape({"dropout_mask", &a.dropout_mask}, {p.b, p.hq, p.sq, p.sk}, "(batch, heads, seqlen_q, seqlen_k)");
    c.writable({"dropout_mask", &a.dropout_mask}, inputs);
    outs.push_back({"dropout_mask", &a.dropout_mask});
  }
  c.distinct_outputs(outs);
  if (ranges_overlap(a.out, a.lse)) fail(ErrorKind::kInvalidArgument, op, "outputs out and lse overlap");
  return p;
}

ProblemShape validate_backward(const BackwardArgs& a) {
  const std::string& op = a.options.op_name;
  const ProblemShape p = check_common(op, a.q, a.k, a.v, a.extras, a.options);
  const Shapes e = expected_shapes(p);
  const Checker c(op);
  const Named q{"q", &a.q};
  // With the caller's dq_accum, dq is not written and may be left undefined.
  const bool want_dq = !a.dq_accum.defined() || a.dq.defined();
  for (const Named t : {Named{"out", &a.out}, Named{"dout", &a.dout}, Named{"lse", &a.lse}, Named{"dk", &a.dk},
                        Named{"dv", &a.dv}})
    c.defined(t);
  if (want_dq) c.defined({"dq", &a.dq});
  const int nd = static_cast<int>(e.q.size());
  c.rank({"out", &a.out}, nd, e.q_layout);
  c.rank({"dout", &a.dout}, nd, e.q_layout);
  c.rank({"lse", &a.lse}, static_cast<int>(e.lse.size()), e.lse_layout);
  if (want_dq) c.rank({"dq", &a.dq}, nd, "(like q)");
  c.rank({"dk", &a.dk}, nd, "(like k)");
  c.rank({"dv", &a.dv}, nd, "(like v)");
  for (const Named t : {Named{"out", &a.out}, Named{"dout", &a.dout}, Named{"dk", &a.dk}, Named{"dv", &a.dv}})
    c.dtype(t, p.dtype);
  if (want_dq) c.dtype({"dq", &a.dq}, p.dtype);
  if (a.lse.dtype != lse_dtype_for(p.dtype))
    fail(ErrorKind::kInvalidArgument, op,
         std::string("lse must be ") + dtype_name(lse_dtype_for(p.dtype)) + ", got " + dtype_name(a.lse.dtype));
  for (const Named t : {Named{"out", &a.out}, Named{"dout", &a.dout}, Named{"lse", &a.lse}, Named{"dk", &a.dk},
                        Named{"dv", &a.dv}})
    c.same_device(t, q);
  if (want_dq) c.same_device({"dq", &a.dq}, q);
  c.shape({"out", &a.out}, e.out, "(like q, with v's head_dim)");
  c.shape({"dout", &a.dout}, e.out, "(must match out)");
  c.shape({"lse", &a.lse}, e.lse, e.lse_layout);
  if (want_dq) c.shape({"dq", &a.dq}, e.q, "(must match q)");
  c.shape({"dk", &a.dk}, e.k, "(must match k)");
  c.shape({"dv", &a.dv}, e.v, "(must match v)");
  const std::vector<Named> inputs{{"q", &a.q},       {"k", &a.k},     {"v", &a.v},
                                  {"out", &a.out},   {"dout", &a.dout}, {"lse", &a.lse}};
  std::vector<Named> outs;
  if (want_dq) outs.push_back({"dq", &a.dq});
  outs.push_back({"dk", &a.dk});
  outs.push_back({"dv", &a.dv});
  if (a.dq_accum.defined()) {
    const Named acc{"dq_accum", &a.dq_accum};
    auto refuse = [&](const std::string& why) {
      fail(ErrorKind::kNotImplemented, op, "dq_accum (a caller-owned fp32 dQ accumulator) is not supported " + why);
    };
    if (p.varlen) refuse("with varlen (cu_seqlens)");
    if (a.options.deterministic) refuse("with deterministic=True");
    if (p.dtype == DType::kFloat64) refuse("for float64 inputs");
    if (a.dq_accum.dtype != DType::kFloat32)
      fail(ErrorKind::kInvalidArgument, op, std::string("dq_accum must be float32, got ") + dtype_name(a.dq_accum.dtype));
    c.same_device(acc, q);
    c.rank(acc, 4, "(batch, heads, rows, cols)");
    const std::int64_t rows = (p.sq + 15) / 16 * 16, cols = (p.d + 7) / 8 * 8;
    const TensorView& v = a.dq_accum;
    if (v.shape[0] != p.b || v.shape[1] != p.hq || v.shape[2] < rows || v.shape[3] != cols)
      fail(ErrorKind::kInvalidArgument, op,
           "dq_accum has shape " + shape_str(v) + ", expected (" + std::to_string(p.b) + ", " + std::to_string(p.hq) +
               ", >= " + std::to_string(rows) + ", " + std::to_string(cols) +
               ") (batch, heads, query rows rounded up to 16, head_dim rounded up to 8)");
    if (v.strides[3] != 1 || v.strides[2] != cols || v.strides[0] < 0 || v.strides[1] < 0)
      fail(ErrorKind::kInvalidArgument, op,
           "dq_accum's last two dims must be contiguous (row stride " + std::to_string(cols) + ", got strides " +
               v.describe() + ")");
    if (reinterpret_cast<std::uintptr_t>(v.data) % 16 != 0 || v.strides[0] % 4 != 0 || v.strides[1] % 4 != 0)
      fail(ErrorKind::kInvalidArgument, op, "dq_accum's slabs must be 16-byte aligned (vector reductions)");
    outs.push_back(acc);
  }
  for (const Named& o : outs) c.writable(o, inputs);
  if (a.dsink.defined() && !a.extras.sink.defined())
    fail(ErrorKind::kInvalidArgument, op, "dsink is given but sink is not");
  if (a.dsink.defined()) {
    const Named ds{"dsink", &a.dsink};
    if (a.dsink.dtype != DType::kFloat32)
      fail(ErrorKind::kInvalidArgument, op, std::string("dsink must be float32, got ") + dtype_name(a.dsink.dtype));
    c.same_device(ds, q);
    c.rank(ds, 1, "(heads,)");
    c.shape(ds, {p.hq}, "(heads,)");
    c.writable(ds, inputs);
    outs.push_back(ds);
  }
  if (a.workspace.defined()) {
    c.dtype({"workspace", &a.workspace}, DType::kUInt8);
    c.same_device({"workspace", &a.workspace}, q);
    c.writable({"workspace", &a.workspace}, inputs);
    outs.push_back({"workspace", &a.workspace});
    for (const Named& o : {Named{"dq", &a.dq}, Named{"dk", &a.dk}, Named{"dv", &a.dv}, Named{"dq_accum", &a.dq_accum}})
      if (ranges_overlap(*o.view, a.workspace))
        fail(ErrorKind::kInvalidArgument, op, std::string("workspace overlaps ") + o.name);
  }
  c.distinct_outputs(outs);
  return p;
}

}  // namespace orchard::detail
