// The path every call takes: validate -> pick backend -> check support ->
// bridge (zero-copy or staged) -> params struct -> kernel -> copy back.
#include "orchard/attention.h"

#include <chrono>
#include <cmath>
#include <cstdio>

#include "core/backend.h"
#include "core/bridge.h"
#include "core/logging.h"
#include "core/validation.h"

namespace orchard {
namespace detail {
namespace {

const BackendOps& select_backend(const ProblemShape& p, const std::string& op) {
  if (!runs_on_cuda(p.device.type)) return cpu_backend();
  const BackendOps* cuda = cuda_backend();
  if (cuda == nullptr)
    fail(ErrorKind::kNotImplemented, op,
         "tensors are on CUDA but this build of Orchard has no CUDA backend (rebuild with nvcc available, "
         "ORCHARD_CUDA=ON)");
  return *cuda;
}

void set_problem(FwdParams& p, const ProblemShape& s, const AttentionOptions& o) {
  p.b = static_cast<int>(s.b);
  p.sq = static_cast<int>(s.sq);
  p.sk = static_cast<int>(s.sk);
  p.total_q = s.total_q;
  p.total_k = s.total_k;
  p.hq = static_cast<int>(s.hq);
  p.hkv = static_cast<int>(s.hkv);
  p.d = static_cast<int>(s.d);
  p.d_v = static_cast<int>(s.d_v);
  p.dtype = s.dtype;
  p.scale_f64 = o.softmax_scale ? *o.softmax_scale : 1.0 / std::sqrt(static_cast<double>(s.d));
  p.scale = static_cast<float>(p.scale_f64);
  p.dropout_p_f64 = o.dropout_p;
  p.causal_top_left = o.causal_align == CausalAlign::kTopLeft;
  p.causal_offset = p.causal_top_left ? 0 : s.sk - s.sq;
  // Windows in flash-attn's normal form: causal is right = 0; a bound that no
  // row can reach is unbounded (so such a window runs the plain kernels).
  const std::int64_t reach = s.sq + s.sk;
  p.window_left = o.window_left >= reach ? -1 : o.window_left;
  p.window_right = o.causal ? 0 : (o.window_right >= reach ? -1 : o.window_right);
  p.causal = p.window_right == 0;
  p.softcap_f64 = o.softcap;
  p.softcap = static_cast<float>(o.softcap);
  p.dropout_p = static_cast<float>(o.dropout_p);
  p.seed = o.seed;
  p.offset = o.offset;
  p.rng_state = o.dropout_p > 0.0 ? o.rng_state : nullptr;
  p.dropout_row_offset = o.dropout_row_offset;
  p.dropout_col_offset = o.dropout_col_offset;
  p.dropout_head_offset = static_cast<int>(o.dropout_head_offset);
  p.dropout_heads = static_cast<int>(o.dropout_heads);
  p.stream = o.stream;
}

// Element strides (batch, row, head) of a BSHD view, or of a varlen
// (total, head, dim) view, whose batch stride is 0 (sequences are rows).
void row_strides(const TensorView& v, std::int64_t& batch, std::int64_t& row, std::int64_t& head) {
  const bool packed = v.ndim == 3;
  batch = packed ? 0 : v.strides[0];
  row = v.strides[packed ? 0 : 1];
  head = v.strides[packed ? 1 : 2];
}

// lse is (b, hq, sq), or (hq, total_q) for varlen.
void lse_strides(const TensorView& lse, FwdParams& p) {
  const bool packed = lse.ndim == 2;
  p.lse_batch_stride = packed ? 0 : lse.strides[0];
  p.lse_head_stride = lse.strides[packed ? 0 : 1];
}

// The extras every kernel call reads, in two steps. set_extras fills every
// field from the caller's tensors, so check_support sees which features a call
// uses (it must run first: nothing may be staged or written for a call a backend
// refuses); stage_extras then swaps in the bridge's copies of the small per-head
// vectors (staged if strided). The attn_bias is read in place with its strides
// (size-1 dims broadcast as stride 0).
void set_extras(FwdParams& p, const AttentionExtras& x) {
  if (x.alibi_slopes.defined()) {
    p.alibi_slopes = static_cast<const float*>(x.alibi_slopes.data);
    p.alibi_batch_stride = x.alibi_slopes.ndim == 2 && x.alibi_slopes.shape[0] > 1 ? x.alibi_slopes.strides[0] : 0;
  }
  if (x.sink.defined()) p.sink = static_cast<const float*>(x.sink.data);
  if (x.cu_seqlens_q.defined()) {
    p.cu_seqlens_q = static_cast<const std::int32_t*>(x.cu_seqlens_q.data);
    p.cu_seqlens_k = static_cast<const std::int32_t*>(x.cu_seqlens_k.data);
  }
  if (x.attn_bias.defined()) {
    const TensorView& m = x.attn_bias;
    auto stride = [&](int i) { return m.shape[i] == 1 ? 0 : m.strides[i]; };
    p.attn_bias = m.data;
    p.attn_bias_dtype = m.dtype;
    p.bias_batch_stride = stride(0);
    p.bias_head_stride = stride(1);
    p.bias_row_stride = stride(2);
    p.bias_col_stride = stride(3);
  }
}

void stage_extras(FwdParams& p, const AttentionExtras& x, StagingSession& staging) {
  if (x.alibi_slopes.defined()) {
    const TensorView s = staging.input("alibi_slopes", x.alibi_slopes, sizeof(float));
    p.alibi_slopes = static_cast<const float*>(s.data);
    p.alibi_batch_stride = s.ndim == 2 && s.shape[0] > 1 ? s.strides[0] : 0;
  }
  if (x.sink.defined()) p.sink = static_cast<const float*>(staging.input("sink", x.sink, sizeof(float)).data);
  if (x.cu_seqlens_q.defined()) {
    p.cu_seqlens_q = static_cast<const std::int32_t*>(staging.input("cu_seqlens_q", x.cu_seqlens_q, 4).data);
    p.cu_seqlens_k = static_cast<const std::int32_t*>(staging.input("cu_seqlens_k", x.cu_seqlens_k, 4).data);
  }
}

// Varlen: the rows of a (total, heads, width) output that no sequence owns, those before
// cu_seqlens[0] (`first`) and those from cu_seqlens[b] (`end`) on, set to 0, or for the (heads,
// total) lse to -inf: no kernel writes them, and uninitialized memory there (NaN, say) would reach
// the caller's outputs, gradients or sums.
void fill_varlen_unowned(const BackendOps& be, const TensorView& t, const std::int32_t* first,
                         const std::int32_t* end, void* stream, bool lse = false) {
  RowTail tail;
  tail.base = t.data;
  tail.element_size = dtype_size(t.dtype);
  if (lse) {  // (heads, total): rows are the last dim
    tail.total = t.shape[1];
    tail.row_stride = t.strides[1];
    tail.head_stride = t.strides[0];
    tail.heads = t.shape[0];
    tail.width = 1;
    tail.pattern = tail.element_size == 8 ? 0xFFF0000000000000ull : 0xFF800000ull;  // -inf
  } else {
    tail.total = t.shape[0];
    tail.row_stride = t.strides[0];
    tail.head_stride = t.strides[1];
    tail.col_stride = t.strides[2];
    tail.heads = t.shape[1];
    tail.width = t.shape[2];
  }
  tail.owned_begin = first;
  tail.owned_end = end;
  be.fill_row_tail(tail, stream);
}

// Where the varlen offsets live in the backend's memory: cu_seqlens[0] and cu_seqlens[b].
struct VarlenBounds {
  const std::int32_t* first;
  const std::int32_t* end;
};

// The caller's offsets (on the view's device, read there by the backend; possibly strided).
VarlenBounds varlen_bounds(const TensorView& cu, std::int64_t b) {
  const auto* v = static_cast<const std::int32_t*>(cu.data);
  return {v, v + b * cu.strides[0]};
}
// The staged (contiguous) copies in FwdParams.
VarlenBounds varlen_bounds(const std::int32_t* cu, std::int64_t b) { return {cu, cu + b}; }

void fill_forward_tails(const BackendOps& be, const TensorView& out, const TensorView& lse, VarlenBounds q,
                        void* stream) {
  fill_varlen_unowned(be, out, q.first, q.end, stream);
  fill_varlen_unowned(be, lse, q.first, q.end, stream, /*lse=*/true);
}

void fill_backward_tails(const BackendOps& be, const TensorView& dq, const TensorView& dk, const TensorView& dv,
                         VarlenBounds q, VarlenBounds k, void* stream) {
  if (dq.defined()) fill_varlen_unowned(be, dq, q.first, q.end, stream);  // none with the caller's dq_accum
  fill_varlen_unowned(be, dk, k.first, k.end, stream);
  fill_varlen_unowned(be, dv, k.first, k.end, stream);
}

std::string problem_summary(const FwdParams& p) {
  LogLine s;
  s << "b=" << p.b << " sq=" << p.sq << " sk=" << p.sk << " hq=" << p.hq << " hkv=" << p.hkv << " d=" << p.d
    << " dtype=" << dtype_name(p.dtype) << " causal=" << (p.causal ? 1 : 0);
  if (p.causal) s << "(offset " << p.causal_offset << ")";
  if (p.window_left >= 0 || p.window_right > 0) s << " window=(" << p.window_left << "," << p.window_right << ")";
  if (p.softcap > 0.f) s << " softcap=" << p.softcap;
  if (p.alibi_slopes) s << " alibi=1";
  if (p.sink) s << " sink=1";
  if (p.attn_bias) s << " attn_mask=" << dtype_name(p.attn_bias_dtype);
  if (p.cu_seqlens_q) s << " varlen=1";
  if (p.d_v != p.d) s << " d_v=" << p.d_v;
  s << " dropout=" << p.dropout_p << " scale=" << p.scale;
  if (p.dropout_p > 0.f && (p.dropout_row_offset || p.dropout_col_offset || p.dropout_head_offset || p.dropout_heads))
    s << " dropout_origin=(" << p.dropout_row_offset << "," << p.dropout_col_offset << "," << p.dropout_head_offset
      << "/" << p.dropout_heads << ")";
  return s.str();
}

// Runs `kernel`, and when the debug log is on, times it and writes its line.
template <class Kernel>
void run_logged(const char* direction, const BackendOps& be, const FwdParams& p, bool backward, int staged,
                const std::string& op, Kernel&& kernel) {
  if (!debug_log_enabled()) {
    kernel();
    return;
  }
  const long long call = next_call_number();
  const bool synced_before = be.synchronize(p.stream);
  RegionTraceScope trace_scope(&be);
  const auto t0 = std::chrono::steady_clock::now();
  kernel();
  const bool synced_after = synced_before && be.synchronize(p.stream);
  const auto t1 = std::chrono::steady_clock::now();
  const std::string trace = trace_scope.finish();
  LogLine line;
  line << direction << " #" << call << " op=" << op << " " << problem_summary(p) << " backend=" << be.name
       << " variant=" << be.variant_name(p, backward) << " staged=" << staged;
  if (!trace.empty()) line << " " << trace;  // before elapsed_ms, which ends every line
  line << " elapsed_ms=";
  if (synced_after) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.4f", std::chrono::duration<double, std::milli>(t1 - t0).count());
    line << buf;
  } else {
    line << "n/a(stream capturing)";
  }
  debug_log_line(line.str());
}

}  // namespace
}  // namespace detail

using namespace detail;

namespace {

void forward_unprefixed(const ForwardArgs& a) {
  const std::string& op = a.options.op_name;
  const ProblemShape shape = validate_forward(a);
  const BackendOps& be = select_backend(shape, op);

  FwdParams p;
  set_problem(p, shape, a.options);
  set_extras(p, a.extras);
  if (shape.b == 0 || shape.sq == 0 || shape.hq == 0) {  // nothing to compute; varlen: rows no sequence owns
    if (p.cu_seqlens_q && shape.hq > 0)
      fill_forward_tails(be, a.out, a.lse, varlen_bounds(a.extras.cu_seqlens_q, p.b), p.stream);
    return;
  }
  if (std::string why = be.check_support(p); !why.empty()) fail(ErrorKind::kNotImplemented, op, why);

  const std::size_t align = be.required_alignment(p);
  StagingSession staging(be, p.stream, op, "fwd");
  const TensorView q = staging.input("q", a.q, align);
  const TensorView k = staging.input("k", a.k, align);
  const TensorView v = staging.input("v", a.v, align);
  const TensorView out = staging.output("out", a.out, align);
  const TensorView lse = staging.output("lse", a.lse, dtype_size(a.lse.dtype));
  TensorView mask;
  if (a.dropout_mask.defined()) mask = staging.output("dropout_mask", a.dropout_mask, 1, /*contiguous=*/true);

  p.q = q.data;
  p.k = k.data;
  p.v = v.data;
  p.out = out.data;
  p.lse = lse.data;
  p.dropout_mask = static_cast<std::uint8_t*>(mask.data);
  row_strides(q, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  row_strides(k, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  row_strides(v, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  row_strides(out, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  lse_strides(lse, p);
  stage_extras(p, a.extras, staging);

  run_logged("FWD", be, p, false, staging.staged_count(), op, [&] {
    be.forward(p);
    if (p.cu_seqlens_q) fill_forward_tails(be, out, lse, varlen_bounds(p.cu_seqlens_q, p.b), p.stream);
  });
  staging.finish();
}

// A backward with no rows on either side writes nothing (sq == 0 alone still
// has dk, dv = 0 to write).
bool backward_is_empty(const ProblemShape& s) { return s.b == 0 || s.hq == 0 || (s.sq == 0 && s.sk == 0); }

BwdParams backward_problem(const BackwardArgs& a, const ProblemShape& shape) {
  BwdParams p;
  set_problem(p, shape, a.options);
  set_extras(p, a.extras);
  p.deterministic = a.options.deterministic;
  // The caller's fp32 dQ accumulator (validated: float32, the last two dims contiguous):
  // set here, before the workspace is sized - the backend's workspace then has no dQ region.
  if (a.dq_accum.defined()) {
    p.dq_accum = static_cast<float*>(a.dq_accum.data);
    p.dq_accum_batch_stride = a.dq_accum.strides[0];
    p.dq_accum_head_stride = a.dq_accum.strides[1];
  }
  return p;
}

std::size_t backward_workspace_bytes_unprefixed(const BackwardArgs& a) {
  const ProblemShape shape = validate_backward(a);
  const BackendOps& be = select_backend(shape, a.options.op_name);
  BwdParams p = backward_problem(a, shape);
  if (backward_is_empty(shape)) return 0;
  return be.backward_workspace_bytes(p);
}

void backward_unprefixed(const BackwardArgs& a) {
  const std::string& op = a.options.op_name;
  const ProblemShape shape = validate_backward(a);
  const BackendOps& be = select_backend(shape, op);
  BwdParams p = backward_problem(a, shape);
  if (backward_is_empty(shape)) {  // varlen: the rows no sequence owns (here all of them) still get 0
    if (p.cu_seqlens_q && shape.hq > 0)
      fill_backward_tails(be, a.dq, a.dk, a.dv, varlen_bounds(a.extras.cu_seqlens_q, p.b),
                          varlen_bounds(a.extras.cu_seqlens_k, p.b), p.stream);
    return;
  }
  if (std::string why = be.check_support(p); !why.empty()) fail(ErrorKind::kNotImplemented, op, why);

  const std::size_t need = be.backward_workspace_bytes(p);
  if (need > 0) {
    if (!a.workspace.defined() || static_cast<std::size_t>(a.workspace.numel()) < need)
      fail(ErrorKind::kInvalidArgument, op,
           "workspace of at least " + std::to_string(need) + " bytes is required (see backward_workspace_bytes), got " +
               (a.workspace.defined() ? std::to_string(a.workspace.numel()) : std::string("none")));
    if (!is_contiguous(a.workspace) || reinterpret_cast<std::uintptr_t>(a.workspace.data) % 256 != 0)
      fail(ErrorKind::kInvalidArgument, op, "workspace must be contiguous and 256-byte aligned");
  }

  const std::size_t align = be.required_alignment(p);
  StagingSession staging(be, p.stream, op, "bwd");
  const TensorView q = staging.input("q", a.q, align);
  const TensorView k = staging.input("k", a.k, align);
  const TensorView v = staging.input("v", a.v, align);
  const TensorView out = staging.input("out", a.out, align);
  const TensorView dout = staging.input("dout", a.dout, align);
  const TensorView lse = staging.input("lse", a.lse, dtype_size(a.lse.dtype));
  const TensorView dq = a.dq.defined() ? staging.output("dq", a.dq, align) : TensorView{};
  const TensorView dk = staging.output("dk", a.dk, align);
  const TensorView dv = staging.output("dv", a.dv, align);

  p.q = q.data;
  p.k = k.data;
  p.v = v.data;
  p.out = out.data;
  p.lse = lse.data;
  p.dout = dout.data;
  p.dq = dq.data;  // nullptr with the caller's dq_accum and no dq
  p.dk = dk.data;
  p.dv = dv.data;
  row_strides(q, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  row_strides(k, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  row_strides(v, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  row_strides(out, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  row_strides(dout, p.do_batch_stride, p.do_row_stride, p.do_head_stride);
  if (dq.defined()) row_strides(dq, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride);
  row_strides(dk, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride);
  row_strides(dv, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride);
  lse_strides(lse, p);
  stage_extras(p, a.extras, staging);
  if (a.dsink.defined()) p.dsink = static_cast<float*>(staging.output("dsink", a.dsink, sizeof(float)).data);
  p.workspace = need > 0 ? a.workspace.data : nullptr;
  p.workspace_bytes = need;

  run_logged("BWD", be, p, true, staging.staged_count(), op, [&] {
    be.backward(p);
    if (p.cu_seqlens_q)
      fill_backward_tails(be, dq, dk, dv, varlen_bounds(p.cu_seqlens_q, p.b), varlen_bounds(p.cu_seqlens_k, p.b),
                          p.stream);
  });
  staging.finish();
}

}  // namespace

void attention_forward(const ForwardArgs& a) {
  with_op_prefix(a.options.op_name, [&] { forward_unprefixed(a); });
}

std::size_t backward_workspace_bytes(const BackwardArgs& a) {
  return with_op_prefix(a.options.op_name, [&] { return backward_workspace_bytes_unprefixed(a); });
}

void attention_backward(const BackwardArgs& a) {
  with_op_prefix(a.options.op_name, [&] { backward_unprefixed(a); });
}

}  // namespace orchard
