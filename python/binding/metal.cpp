// orchard._C's Metal functions: what python/orchard/_mps.py asks the C++ core before it
// launches on torch's MPS stream — variant, MSL source, launch geometry, the packed
// `meta` buffer — and the core's debug/profile log writers, so MPS calls log like the
// others. No Metal API here: compile and dispatch go through torch.mps.compile_shader.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "backends/metal/metal_kernels.h"
#include "core/logging.h"
#include "orchard/errors.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using Sizes = std::tuple<int, int, int, int, int, int>;  // b, sq, sk, hq, hkv, d

orchard::DType parse_dtype(const std::string& name) {
  if (name == "float16") return orchard::DType::kFloat16;
  if (name == "bfloat16") return orchard::DType::kBFloat16;
  if (name == "float32") return orchard::DType::kFloat32;
  if (name == "float64") return orchard::DType::kFloat64;
  throw orchard::Error(orchard::ErrorKind::kInvalidArgument,
                       "the Metal backend supports float16, bfloat16 and float32, not " + name);
}

// d_v: the value head dim (0: d).
orchard::BwdParams params_of(const Sizes& s, int d_v = 0) {
  orchard::BwdParams p;
  std::tie(p.b, p.sq, p.sk, p.hq, p.hkv, p.d) = s;
  p.d_v = d_v > 0 ? d_v : p.d;
  return p;
}

std::vector<std::tuple<std::string, std::uint32_t, std::uint32_t>> plan(const std::string& direction,
                                                                         const std::string& dtype, const Sizes& sizes,
                                                                         int d_v) {
  const orchard::BwdParams p = params_of(sizes, d_v);
  const orchard::metal::Variant v =
      orchard::metal::select_variant(parse_dtype(dtype), orchard::metal::variant_head_dim(p));
  std::vector<orchard::metal::Launch> launches;
  if (direction == "fwd") {
    launches = {orchard::metal::forward_launch(v, p)};
  } else if (direction == "bwd") {
    launches = {orchard::metal::backward_dot_launch(v, p), orchard::metal::backward_dq_launch(v, p),
                orchard::metal::backward_dkdv_launch(v, p)};
  } else {
    throw orchard::Error(orchard::ErrorKind::kInvalidArgument, "direction must be 'fwd' or 'bwd'");
  }
  std::vector<std::tuple<std::string, std::uint32_t, std::uint32_t>> out;
  for (const auto& l : launches) out.emplace_back(l.kernel, l.groups, l.threads_per_group);
  return out;
}

using Origin = std::tuple<std::int64_t, std::int64_t, std::int64_t, std::int64_t>;
using Window = std::tuple<std::int64_t, std::int64_t>;
// SDPA's attn_mask: its dtype ("bool", or a float dtype; "" = none) and element strides
// (batch, head, row, col).
using Mask = std::tuple<std::string, std::int64_t, std::int64_t, std::int64_t, std::int64_t>;

// strides: element (batch, row, head) strides of q, k, v, out, dout, dq, dk, dv in that
// order (24 ints; zeros for tensors a forward does not have).
std::vector<std::int64_t> meta(const Sizes& sizes, const std::vector<std::int64_t>& strides,
                               const std::tuple<std::int64_t, std::int64_t>& lse_strides, bool causal,
                               std::int64_t causal_offset, double dropout_p, double scale, bool write_mask,
                               const Origin& dropout_origin, const Window& window, double softcap,
                               std::int64_t alibi_batch_stride, bool sink, int d_v, const std::string& dtype,
                               const Mask& mask, bool varlen, bool top_left) {
  if (strides.size() != 24)
    throw orchard::Error(orchard::ErrorKind::kInvalidArgument, "metal_meta: expected 24 strides");
  orchard::BwdParams p = params_of(sizes, d_v);
  std::int64_t* targets[24] = {
      &p.q_batch_stride,  &p.q_row_stride,  &p.q_head_stride,  &p.k_batch_stride,  &p.k_row_stride,
      &p.k_head_stride,   &p.v_batch_stride, &p.v_row_stride,  &p.v_head_stride,   &p.o_batch_stride,
      &p.o_row_stride,    &p.o_head_stride,  &p.do_batch_stride, &p.do_row_stride, &p.do_head_stride,
      &p.dq_batch_stride, &p.dq_row_stride,  &p.dq_head_stride, &p.dk_batch_stride, &p.dk_row_stride,
      &p.dk_head_stride,  &p.dv_batch_stride, &p.dv_row_stride, &p.dv_head_stride};
  for (int i = 0; i < 24; ++i) *targets[i] = strides[i];
  std::tie(p.lse_batch_stride, p.lse_head_stride) = lse_strides;
  p.causal = causal;
  p.causal_offset = causal_offset;
  p.dropout_p = static_cast<float>(dropout_p);
  p.dropout_p_f64 = dropout_p;
  p.scale = static_cast<float>(scale);
  p.scale_f64 = scale;
  // Dropout's global coordinates (row, col, head offsets, heads; params.h).
  const auto& [drop_row, drop_col, drop_head, drop_heads] = dropout_origin;
  p.dropout_row_offset = drop_row;
  p.dropout_col_offset = drop_col;
  p.dropout_head_offset = static_cast<int>(drop_head);
  p.dropout_heads = static_cast<int>(drop_heads);
  std::tie(p.window_left, p.window_right) = window;
  p.softcap = static_cast<float>(softcap);
  // Slopes, sinks and masks reach the kernels as buffers; pack_meta only asks whether there are any.
  static const float slopes_present = 0.0f;
  p.alibi_slopes = alibi_batch_stride >= 0 ? &slopes_present : nullptr;
  p.alibi_batch_stride = alibi_batch_stride >= 0 ? alibi_batch_stride : 0;
  p.sink = sink ? &slopes_present : nullptr;  // likewise
  p.dtype = parse_dtype(dtype);
  // Varlen: the offsets are buffers too; pack_meta only asks whether there are any.
  static const std::int32_t offsets_present = 0;
  p.cu_seqlens_q = varlen ? &offsets_present : nullptr;
  p.causal_top_left = top_left;
  const auto& [mask_dtype, mask_b, mask_h, mask_r, mask_c] = mask;
  if (!mask_dtype.empty()) {
    p.attn_bias = &slopes_present;  // likewise: the mask is a buffer
    p.attn_bias_dtype = mask_dtype == "bool" ? orchard::DType::kUInt8 : parse_dtype(mask_dtype);
    p.bias_batch_stride = mask_b, p.bias_head_stride = mask_h, p.bias_row_stride = mask_r, p.bias_col_stride = mask_c;
  }
  return orchard::metal::pack_meta(p, write_mask);
}

}  // namespace

void register_metal(nb::module_& m) {
  m.def(
      "metal_check_support",
      [](const std::string& dtype, int head_dim) {
        if (dtype != "float16" && dtype != "bfloat16" && dtype != "float32")
          return "the Metal backend supports float16, bfloat16 and float32, not " + dtype;
        return orchard::metal::check_support(parse_dtype(dtype), head_dim);
      },
      "dtype"_a, "head_dim"_a, "Empty if the Metal kernels support this dtype/head dim, else why not.");
  m.def(
      "metal_variant",
      [](const std::string& dtype, int head_dim) {
        const auto v = orchard::metal::select_variant(parse_dtype(dtype), head_dim);
        return std::make_tuple(v.name(), orchard::metal::variant_source(v));
      },
      "dtype"_a, "head_dim"_a, "(variant name, complete MSL source) of the Metal kernels for dtype/head dim.");
  m.def("metal_plan", &plan, "direction"_a, "dtype"_a, "sizes"_a, "d_v"_a = 0,
        "[(kernel, threadgroups, threads per threadgroup)] of a 'fwd' or 'bwd' call; sizes = (b, sq, sk, hq, hkv, d), "
        "d_v the value head dim (0: d).");
  m.def("metal_meta", &meta, "sizes"_a, "strides"_a, "lse_strides"_a, "causal"_a, "causal_offset"_a,
        "dropout_p"_a, "scale"_a, "write_mask"_a,
        "dropout_origin"_a = Origin(0, 0, 0, 0), "window"_a = Window(-1, -1), "softcap"_a = 0.0,
        "alibi_batch_stride"_a = -1, "sink"_a = false, "d_v"_a = 0, "dtype"_a = "float32",
        "mask"_a = Mask("", 0, 0, 0, 0), "varlen"_a = false, "top_left"_a = false,
        "The int64 `meta` buffer the Metal kernels read. dropout_origin: (row offset, col offset, "
        "head offset, heads) of the dropout index; window: (left, right) in params.h's normal form "
        "(causal: right 0); alibi_batch_stride: the slopes' batch stride, -1 without ALiBi; sink: "
        "whether a sink buffer is bound; d_v: the value head dim (0: d); dtype: q's; mask: attn_mask's dtype "
        "('bool', a float dtype, '' for none) and element strides (batch, head, row, col); varlen: offsets are "
        "bound (sizes then hold the max lengths); top_left: varlen's per-sequence diagonal is 0.");
  m.def("metal_debug_log_enabled", &orchard::detail::debug_log_enabled);
  m.def("metal_tensor_profile_enabled", &orchard::detail::tensor_profile_enabled);
  m.def("metal_debug_log_line", &orchard::detail::debug_log_line, "line"_a);
  m.def("metal_tensor_profile_line", &orchard::detail::tensor_profile_line, "line"_a);
  m.def("metal_next_call_number", &orchard::detail::next_call_number);
}
