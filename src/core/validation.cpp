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

// True if two distinct indices of the view can address the same element
// (zero strides, or strides too small for the dims inside them).
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
  void shape(const Named& t, std::initializer_list<std::int64_t> expected, const char* layout) const {
    int i = 0;
    bool ok = true;
    for (std::int64_t n : expected) ok = ok && t.view->shape[i++] == n;
    if (!ok) {
      TensorView want;
      want.ndim = static_cast<int>(expected.size());
      i = 0;
      for (std::int64_t n : expected) want.shape[i++] = n;
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

ProblemShape check_common(const std::string& op, const TensorView& q, const TensorView& k, const TensorView& v,
                          const AttentionOptions& options) {
  const Checker c(op);
  c.defined({"q", &q});
  c.defined({"k", &k});
  c.defined({"v", &v});
  c.rank({"q", &q}, 4, "(batch, seqlen_q, heads, head_dim)");
  c.rank({"k", &k}, 4, "(batch, seqlen_k, kv_heads, head_dim)");
  c.rank({"v", &v}, 4, "(batch, seqlen_k, kv_heads, head_dim)");
  if (!is_float_dtype(q.dtype))
    fail(ErrorKind::kInvalidArgument, op,
         std::string("unsupported dtype ") + dtype_name(q.dtype) +
             " for q (supported: float16, bfloat16, float32, float64)");
  c.dtype({"k", &k}, q.dtype);
  c.dtype({"v", &v}, q.dtype);
  c.same_device({"k", &k}, {"q", &q});
  c.same_device({"v", &v}, {"q", &q});

  ProblemShape p;
  p.b = q.shape[0];
  p.sq = q.shape[1];
  p.hq = q.shape[2];
  p.d = q.shape[3];
  p.sk = k.shape[1];
  p.hkv = k.shape[2];
  p.dtype = q.dtype;
  p.device = q.device;
  for (int i = 0; i < 4; ++i)
    if (q.shape[i] < 0 || k.shape[i] < 0 || v.shape[i] < 0)
      fail(ErrorKind::kInvalidArgument, op, "negative sizes are invalid");
  c.shape({"k", &k}, {p.b, p.sk, p.hkv, p.d}, "(batch and head_dim must match q)");
  c.shape({"v", &v}, {p.b, p.sk, p.hkv, p.d}, "(must match k; a different value head dim is not supported)");
  if (p.hkv == 0 && p.hq != 0)
    fail(ErrorKind::kInvalidArgument, op, "k and v have 0 heads but q has " + std::to_string(p.hq));
  if (p.hkv != 0 && p.hq % p.hkv != 0)
    fail(ErrorKind::kInvalidArgument, op,
         "number of query heads (" + std::to_string(p.hq) + ") must be a multiple of key/value heads (" +
             std::to_string(p.hkv) + ")");
  if (p.d < 1 || p.d > kMaxHeadDim)
    fail(ErrorKind::kInvalidArgument, op,
         "head dim " + std::to_string(p.d) + " is unsupported (1 <= head_dim <= " + std::to_string(kMaxHeadDim) + ")");
  constexpr std::int64_t kIntMax = std::numeric_limits<int>::max();
  if (p.b > kIntMax || p.sq > kIntMax || p.sk > kIntMax || p.hq > kIntMax || p.b * p.hq > kIntMax)
    fail(ErrorKind::kInvalidArgument, op, "sizes exceed 2^31 - 1");
  const double dp = options.dropout_p;
  if (!(dp >= 0.0 && dp < 1.0))
    fail(ErrorKind::kInvalidArgument, op, "dropout_p must be in [0, 1), got " + std::to_string(dp));
  if (options.rng_state && reinterpret_cast<std::uintptr_t>(options.rng_state) % alignof(std::uint64_t) != 0)
    fail(ErrorKind::kInvalidArgument, op, "rng_state must be 8-byte aligned");
  if (options.softmax_scale && !std::isfinite(*options.softmax_scale))
    fail(ErrorKind::kInvalidArgument, op, "softmax_scale must be finite");
  return p;
}

}  // namespace

ProblemShape validate_forward(const ForwardArgs& a) {
  const std::string& op = a.options.op_name;
  const ProblemShape p = check_common(op, a.q, a.k, a.v, a.options);
  const Checker c(op);
  c.defined({"out", &a.out});
  c.defined({"lse", &a.lse});
  c.rank({"out", &a.out}, 4, "(batch, seqlen_q, heads, head_dim)");
  c.rank({"lse", &a.lse}, 3, "(batch, heads, seqlen_q)");
  c.dtype({"out", &a.out}, p.dtype);
  if (a.lse.dtype != lse_dtype_for(p.dtype))
    fail(ErrorKind::kInvalidArgument, op,
         std::string("lse must be ") + dtype_name(lse_dtype_for(p.dtype)) + ", got " + dtype_name(a.lse.dtype));
  c.same_device({"out", &a.out}, {"q", &a.q});
  c.same_device({"lse", &a.lse}, {"q", &a.q});
  c.shape({"out", &a.out}, {p.b, p.sq, p.hq, p.d}, "(must match q)");
  c.shape({"lse", &a.lse}, {p.b, p.hq, p.sq}, "(batch, heads, seqlen_q)");
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
  const ProblemShape p = check_common(op, a.q, a.k, a.v, a.options);
  const Checker c(op);
  const Named q{"q", &a.q};
  for (const Named t : {Named{"out", &a.out}, Named{"dout", &a.dout}, Named{"lse", &a.lse}, Named{"dq", &a.dq},
                        Named{"dk", &a.dk}, Named{"dv", &a.dv}})
    c.defined(t);
  c.rank({"out", &a.out}, 4, "(batch, seqlen_q, heads, head_dim)");
  c.rank({"dout", &a.dout}, 4, "(batch, seqlen_q, heads, head_dim)");
  c.rank({"lse", &a.lse}, 3, "(batch, heads, seqlen_q)");
  c.rank({"dq", &a.dq}, 4, "(like q)");
  c.rank({"dk", &a.dk}, 4, "(like k)");
  c.rank({"dv", &a.dv}, 4, "(like v)");
  for (const Named t : {Named{"out", &a.out}, Named{"dout", &a.dout}, Named{"dq", &a.dq}, Named{"dk", &a.dk},
                        Named{"dv", &a.dv}})
    c.dtype(t, p.dtype);
  if (a.lse.dtype != lse_dtype_for(p.dtype))
    fail(ErrorKind::kInvalidArgument, op,
         std::string("lse must be ") + dtype_name(lse_dtype_for(p.dtype)) + ", got " + dtype_name(a.lse.dtype));
  for (const Named t : {Named{"out", &a.out}, Named{"dout", &a.dout}, Named{"lse", &a.lse}, Named{"dq", &a.dq},
                        Named{"dk", &a.dk}, Named{"dv", &a.dv}})
    c.same_device(t, q);
  c.shape({"out", &a.out}, {p.b, p.sq, p.hq, p.d}, "(must match q)");
  c.shape({"dout", &a.dout}, {p.b, p.sq, p.hq, p.d}, "(must match q)");
  c.shape({"lse", &a.lse}, {p.b, p.hq, p.sq}, "(batch, heads, seqlen_q)");
  c.shape({"dq", &a.dq}, {p.b, p.sq, p.hq, p.d}, "(must match q)");
  c.shape({"dk", &a.dk}, {p.b, p.sk, p.hkv, p.d}, "(must match k)");
  c.shape({"dv", &a.dv}, {p.b, p.sk, p.hkv, p.d}, "(must match v)");
  const std::vector<Named> inputs{{"q", &a.q},       {"k", &a.k},     {"v", &a.v},
                                  {"out", &a.out},   {"dout", &a.dout}, {"lse", &a.lse}};
  std::vector<Named> outs{{"dq", &a.dq}, {"dk", &a.dk}, {"dv", &a.dv}};
  for (const Named& o : outs) c.writable(o, inputs);
  if (a.workspace.defined()) {
    c.dtype({"workspace", &a.workspace}, DType::kUInt8);
    c.same_device({"workspace", &a.workspace}, q);
    c.writable({"workspace", &a.workspace}, inputs);
    outs.push_back({"workspace", &a.workspace});
    for (const Named& o : {Named{"dq", &a.dq}, Named{"dk", &a.dk}, Named{"dv", &a.dv}})
      if (ranges_overlap(*o.view, a.workspace))
        fail(ErrorKind::kInvalidArgument, op, std::string("workspace overlaps ") + o.name);
  }
  c.distinct_outputs(outs);
  return p;
}

}  // namespace orchard::detail
