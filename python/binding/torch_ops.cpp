// orchard/_C_torch.so: Orchard's forward and backward as C++ PyTorch operators
// registered through torch's *stable* C ABI (torch/csrc/stable, the aoti_torch_* shims).
//
// Why: from Python, one call of the torch.library ops costs the custom-op dispatch into
// Python kernels, DLPack export of every tensor and the tensor allocations in Python —
// several times torch's own SDPA at small shapes (bench/NOTES.md, "Per-call overhead").
// These ops take torch tensors straight from the dispatcher, allocate the outputs with
// torch's allocator (the caching allocator on CUDA, so CUDA-graph capture still works)
// and call the same C++ core (include/orchard/attention.h) on the current CUDA stream —
// the copy orchard._C holds, through the function table it hands over (core_api.h).
//
// The library links no libtorch: the shims are C functions resolved at load time from
// the libtorch the process has already imported, and the stable ABI keeps this one
// binary loadable by every torch from 2.10 on (TORCH_TARGET_VERSION below: 2.10 is the
// first whose stable ABI passes strings, which the op name needs). Older torch, and every
// other framework, keep the DLPack path (orchard._C); python/orchard/_ops.py loads this
// library when it can and falls back otherwise (ORCHARD_DISABLE_STABLE_OPS=1 forces it).
//
// The ops are internal (their Python wrappers in _ops.py add autograd, the op-prefixed
// ValueError translation and the fake kernels):
//   orchard::_flash_fwd   same arguments as orchard::flash_attn_forward
//   orchard::_flash_bwd   same arguments as orchard::flash_attn_backward
//   orchard::_flash_fwd_plain / _flash_bwd_plain   the drop-ins' common call: no feature
//                         arguments, seed/offset 0 (short schemas: ~1 us less per call), and
//                         (bhsd) the SDPA drop-in's (B, H, S, D) tensors as given
//   orchard::_kvcache_fwd flash_attn_with_kvcache's eager call (kvcache.py)
// Errors from the core cross the C ABI as std::runtime_error with a "[orchard:<kind>]"
// tag; _ops.py turns them back into ValueError / NotImplementedError with the message
// the DLPack path gives.
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <exception>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "core_api.h"
#include "orchard/attention.h"
#include "orchard/errors.h"
#include "orchard/tensor_view.h"

// CUDA shims (declared by shim.h only under USE_CUDA). Weak: a CPU-only torch has no
// such symbols, and this library must still load there (they are then null and a CUDA
// tensor cannot reach these kernels anyway).
extern "C" {
struct CUDAGuardOpaque;
using CUDAGuardHandle = CUDAGuardOpaque*;
__attribute__((weak)) AOTITorchError aoti_torch_create_cuda_guard(int32_t device_index, CUDAGuardHandle* ret_guard);
__attribute__((weak)) AOTITorchError aoti_torch_delete_cuda_guard(CUDAGuardHandle guard);
__attribute__((weak)) AOTITorchError aoti_torch_get_current_cuda_stream(int32_t device_index, void** ret_stream);
}

namespace {

using torch::stable::Tensor;
using OptTensor = std::optional<Tensor>;

// -------------------------------------------------------------------------------------
// Errors. The kernels run inside torch's dispatcher, which reports any std::exception as a
// RuntimeError; the tag tells _ops.py which Python exception the DLPack path would raise.
// -------------------------------------------------------------------------------------

[[noreturn]] void invalid(const std::string& op, const std::string& msg) {
  throw orchard::Error(orchard::ErrorKind::kInvalidArgument, op + ": " + msg);
}

// "[orchard:<Python exception>] message": _ops.py raises that exception type for it.
[[noreturn]] void throw_tagged(const char* python_exception, const std::string& msg) {
  throw std::runtime_error(std::string("[orchard:") + python_exception + "] " + msg);
}

[[noreturn]] void rethrow_tagged(const std::exception& e, const orchard::ErrorKind* kind) {
  const char* type = "RuntimeError";
  if (kind != nullptr && *kind == orchard::ErrorKind::kInvalidArgument) type = "ValueError";
  if (kind != nullptr && *kind == orchard::ErrorKind::kNotImplemented) type = "NotImplementedError";
  throw_tagged(type, e.what());
}

template <typename F>
auto tagged(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const orchard::Error& e) {
    const orchard::ErrorKind kind = e.kind();
    rethrow_tagged(e, &kind);
  }
}

// The core, as orchard._C hands it over (core_api.h): set once at import, before any call.
const orchard::binding::CoreApi* g_core = nullptr;

const orchard::binding::CoreApi& core() {
  if (g_core == nullptr) throw std::runtime_error("orchard: _C_torch used before orchard._C handed it the core");
  return *g_core;
}

// A core entry's result: -1 = success, else the orchard::ErrorKind of its error.
void raise_if_failed(int kind, const std::string& error) {
  if (kind < 0) return;
  const auto k = static_cast<orchard::ErrorKind>(kind);
  rethrow_tagged(std::runtime_error(error), &k);
}

void check(AOTITorchError err, const char* what) {
  if (err != AOTI_TORCH_SUCCESS) throw std::runtime_error(std::string("orchard: torch shim call failed: ") + what);
}

// -------------------------------------------------------------------------------------
// torch tensor -> orchard::TensorView (what module.cpp builds from a DLPack capsule).
// -------------------------------------------------------------------------------------

struct DTypes {
  int32_t f16 = aoti_torch_dtype_float16(), bf16 = aoti_torch_dtype_bfloat16(), f32 = aoti_torch_dtype_float32(),
          f64 = aoti_torch_dtype_float64(), u8 = aoti_torch_dtype_uint8(), b8 = aoti_torch_dtype_bool(),
          i32 = aoti_torch_dtype_int32(), i64 = aoti_torch_dtype_int64();
  int32_t cpu = aoti_torch_device_type_cpu(), cuda = aoti_torch_device_type_cuda();
};
const DTypes& codes() {
  static const DTypes c;
  return c;
}

std::string shape_str(int64_t nd, const int64_t* sizes) {  // Python's tuple repr: (2, 3) / (4,)
  std::string s = "(";
  for (int64_t i = 0; i < nd; ++i) {
    if (i) s += ", ";
    s += std::to_string(sizes[i]);
  }
  return s + (nd == 1 ? ",)" : ")");
}

// The raw facts of one tensor, read once through the shims.
struct Facts {
  AtenTensorHandle h = nullptr;
  int64_t nd = 0;
  int64_t* sizes = nullptr;  // torch's arrays, or own_* after swap12
  int64_t* strides = nullptr;
  int32_t dtype = 0, dev_type = 0, dev_index = 0;
  void* data = nullptr;
  std::array<int64_t, orchard::kMaxRank> own_sizes{}, own_strides{};
};

// A (B, H, S, D) tensor seen as the BSHD view the core reads (what x.transpose(1, 2)
// gives, without making the view). Only on a Facts that stays where it is: sizes and
// strides then point into the object itself.
void swap12(Facts& f) {
  if (f.nd != 4) return;  // rank errors are reported before any swap
  for (int i = 0; i < 4; ++i) {
    f.own_sizes[i] = f.sizes[i];
    f.own_strides[i] = f.strides[i];
  }
  std::swap(f.own_sizes[1], f.own_sizes[2]);
  std::swap(f.own_strides[1], f.own_strides[2]);
  f.sizes = f.own_sizes.data();
  f.strides = f.own_strides.data();
}

Facts facts(const Tensor& t) {
  Facts f;
  f.h = t.get();
  check(aoti_torch_get_dim(f.h, &f.nd), "get_dim");
  check(aoti_torch_get_sizes(f.h, &f.sizes), "get_sizes");
  check(aoti_torch_get_strides(f.h, &f.strides), "get_strides");
  check(aoti_torch_get_dtype(f.h, &f.dtype), "get_dtype");
  check(aoti_torch_get_device_type(f.h, &f.dev_type), "get_device_type");
  check(aoti_torch_get_device_index(f.h, &f.dev_index), "get_device_index");
  check(aoti_torch_get_data_ptr(f.h, &f.data), "get_data_ptr");  // includes the storage offset
  return f;
}

// (DLPack type code, bits) of a torch dtype, for messages worded as the DLPack path's
// (module.cpp); -1 for dtypes this table does not name.
std::pair<int, int> dlpack_code_bits(int32_t dt) {
  const DTypes& c = codes();
  if (dt == c.f16) return {2, 16};
  if (dt == c.bf16) return {4, 16};
  if (dt == c.f32) return {2, 32};
  if (dt == c.f64) return {2, 64};
  if (dt == c.u8) return {1, 8};
  if (dt == c.b8) return {6, 8};
  if (dt == c.i32) return {0, 32};
  if (dt == c.i64) return {0, 64};
  if (dt == aoti_torch_dtype_int8()) return {0, 8};
  if (dt == aoti_torch_dtype_int16()) return {0, 16};
  if (dt == aoti_torch_dtype_complex64()) return {5, 64};
  if (dt == aoti_torch_dtype_complex128()) return {5, 128};
  return {-1, -1};
}

orchard::DType to_dtype(int32_t dt, const std::string& op, const char* name) {
  const DTypes& c = codes();
  if (dt == c.f16) return orchard::DType::kFloat16;
  if (dt == c.bf16) return orchard::DType::kBFloat16;
  if (dt == c.f32) return orchard::DType::kFloat32;
  if (dt == c.f64) return orchard::DType::kFloat64;
  if (dt == c.u8 || dt == c.b8) return orchard::DType::kUInt8;  // bool: one byte per element
  if (dt == c.i32) return orchard::DType::kInt32;                // cu_seqlens
  const auto [code, bits] = dlpack_code_bits(dt);
  invalid(op, std::string(name) + ": unsupported dtype (DLPack code " + std::to_string(code) + ", bits " +
                  std::to_string(bits) +
                  ", lanes 1); expected float16, bfloat16, float32, float64 (bool/uint8 masks, int32 cu_seqlens)");
}

orchard::TensorView to_view(const Facts& f, const std::string& op, const char* name) {
  orchard::TensorView v;
  if (f.nd > orchard::kMaxRank)
    invalid(op, std::string(name) + ": expected at most " + std::to_string(orchard::kMaxRank) +
                    " dimensions, got " + std::to_string(f.nd));
  v.data = f.data;
  v.dtype = to_dtype(f.dtype, op, name);
  if (f.dev_type == codes().cpu) {
    v.device = {orchard::DeviceType::kCPU, 0};
  } else if (f.dev_type == codes().cuda) {
    v.device = {orchard::DeviceType::kCUDA, f.dev_index};
  } else {
    invalid(op, std::string(name) + ": unsupported device type " + std::to_string(f.dev_type) +
                    " (orchard runs on CPU and CUDA memory)");
  }
  v.ndim = static_cast<int>(f.nd);
  for (int64_t i = 0; i < f.nd; ++i) {
    v.shape[i] = f.sizes[i];
    v.strides[i] = f.strides[i];
  }
  return v;
}

orchard::TensorView to_view(const Tensor& t, const std::string& op, const char* name) {
  return to_view(facts(t), op, name);
}

orchard::TensorView to_view(const OptTensor& t, const std::string& op, const char* name) {
  if (!t.has_value() || !t->defined()) return orchard::TensorView{};
  return to_view(*t, op, name);
}

// The run-time dropout key (module.cpp's rng_state_pointer, same messages).
const std::uint64_t* rng_state_pointer(const OptTensor& r, const Facts& q, const std::string& op) {
  if (!r.has_value() || !r->defined()) return nullptr;
  const Facts f = facts(*r);
  if (f.dtype != codes().i64 || f.nd != 1 || f.sizes[0] != 2 || f.strides[0] != 1)
    invalid(op, "rng_state must be a contiguous int64 tensor of 2 elements (seed, offset), got " +
                    std::to_string(f.nd) + "-D with " + std::to_string(f.nd ? f.sizes[0] : 0) +
                    " element(s) of DLPack code " + std::to_string(dlpack_code_bits(f.dtype).first) +
                    ", bits " + std::to_string(dlpack_code_bits(f.dtype).second));
  const bool cpu = f.dev_type == codes().cpu && q.dev_type == codes().cpu;
  if (f.dev_type != q.dev_type || (!cpu && f.dev_index != q.dev_index)) {
    auto dl = [](const Facts& t) {  // DLPack device codes, as the DLPack path reports them
      const int type = t.dev_type == codes().cpu ? 1 : t.dev_type == codes().cuda ? 2 : -1;
      return std::to_string(type) + ":" + std::to_string(type == 1 ? 0 : t.dev_index);
    };
    invalid(op, "rng_state must be on q's device (DLPack device " + dl(q) + "), got " + dl(f));
  }
  return static_cast<const std::uint64_t*>(f.data);
}

// -------------------------------------------------------------------------------------
// Allocation through torch (its caching allocator on CUDA).
// -------------------------------------------------------------------------------------

Tensor empty_strided(int64_t nd, const int64_t* sizes, const int64_t* strides, int32_t dtype, const Facts& like) {
  AtenTensorHandle h = nullptr;
  if (aoti_torch_empty_strided(nd, sizes, strides, dtype, like.dev_type, like.dev_index, &h) != AOTI_TORCH_SUCCESS) {
    // The shim returns only an error code (torch printed its allocator's message). On
    // CUDA that is the caching allocator refusing: raise what torch raises there, so
    // callers' `except torch.OutOfMemoryError` (batch-size finders, bench bisections) work.
    int64_t elements = 1;
    for (int64_t i = 0; i < nd; ++i) elements *= sizes[i];
    const bool cuda = like.dev_type == codes().cuda;
    throw_tagged(cuda ? "OutOfMemoryError" : "RuntimeError",
                 "orchard: torch could not allocate a tensor of " + std::to_string(elements) + " elements on " +
                     (cuda ? "cuda:" + std::to_string(like.dev_index) : std::string("cpu")) +
                     (cuda ? " (CUDA out of memory; torch's message above has the allocator's state)" : ""));
  }
  return Tensor(h);
}

Tensor empty_contiguous(std::initializer_list<int64_t> shape, int32_t dtype, const Facts& like) {
  std::array<int64_t, 4> sizes{}, strides{};
  const int64_t nd = static_cast<int64_t>(shape.size());
  int64_t i = 0;
  for (int64_t s : shape) sizes[i++] = s;
  int64_t stride = 1;
  for (int64_t d = nd - 1; d >= 0; --d) {
    strides[d] = stride;
    stride *= sizes[d] > 1 ? sizes[d] : 1;
  }
  return empty_strided(nd, sizes.data(), strides.data(), dtype, like);
}

// c10's compute_non_overlapping_and_dense: sorted by stride (dims of size 0 or 1 last),
// the strides are those of a contiguous tensor.
bool non_overlapping_and_dense(const Facts& f) {
  if (f.nd == 1) return f.sizes[0] < 2 || f.strides[0] == 1;
  std::array<int64_t, orchard::kMaxRank> perm{};
  for (int64_t i = 0; i < f.nd; ++i) perm[i] = i;
  auto before = [&](int64_t a, int64_t b) {  // c10's comparator
    if (f.sizes[a] < 2) return false;
    if (f.sizes[b] < 2) return true;
    return f.strides[a] < f.strides[b];
  };
  for (int64_t i = 1; i < f.nd; ++i)
    for (int64_t j = i; j > 0 && before(perm[j], perm[j - 1]); --j) std::swap(perm[j - 1], perm[j]);
  int64_t expected = 1;
  for (int64_t i = 0; i < f.nd; ++i) {
    const int64_t d = perm[i];
    if (f.sizes[d] < 2) return true;
    if (f.strides[d] != expected) return false;
    expected *= f.sizes[d];
  }
  return true;
}

// torch.empty_like(t): t's strides when t is dense (the common case, no dispatcher
// round trip), else torch's own empty_like (its memory-format rules).
//
// bhsd: f is t's BSHD view (swap12) and the result is what the DLPack path made of it,
// empty_like(t.transpose(1, 2)).transpose(1, 2): t's own shape again.
Tensor empty_like(const Tensor& t, const Facts& f, bool bhsd = false) {
  bhsd = bhsd && f.nd == 4;  // (swap12 leaves other ranks alone; the core reports them)
  if (f.nd <= orchard::kMaxRank && non_overlapping_and_dense(f)) {
    if (!bhsd) return empty_strided(f.nd, f.sizes, f.strides, f.dtype, f);
    std::array<int64_t, 4> sizes{f.sizes[0], f.sizes[2], f.sizes[1], f.sizes[3]};
    std::array<int64_t, 4> strides{f.strides[0], f.strides[2], f.strides[1], f.strides[3]};
    return empty_strided(4, sizes.data(), strides.data(), f.dtype, f);
  }
  if (!bhsd) return torch::stable::empty_like(t);
  return torch::stable::transpose(torch::stable::empty_like(torch::stable::transpose(t, 1, 2)), 1, 2);
}

// _ops._empty_with_head_dim: shaped like q with head dim d_v, in q's memory order when
// that order keeps the last dim innermost, else row-major.
// bhsd: q is the BSHD view (swap12) of a (B, H, S, D) tensor, and the result is returned
// (B, H, S, d_v), the transpose of the BSHD tensor made here.
Tensor empty_with_head_dim(const Facts& q, int64_t d_v, bool bhsd = false) {
  const int64_t nd = q.nd;
  std::array<int64_t, orchard::kMaxRank> sizes{}, order{}, strides{};
  for (int64_t i = 0; i < nd; ++i) {
    sizes[i] = q.sizes[i];
    order[i] = i;
  }
  sizes[nd - 1] = d_v;
  // Python: sorted(range(nd), key=lambda i: -q.stride(i)) — a stable sort, descending stride.
  for (int64_t i = 1; i < nd; ++i)
    for (int64_t j = i; j > 0 && q.strides[order[j - 1]] < q.strides[order[j]]; --j) std::swap(order[j - 1], order[j]);
  if (order[nd - 1] != nd - 1) {
    int64_t stride = 1;
    for (int64_t d = nd - 1; d >= 0; --d) {
      strides[d] = stride;
      stride *= sizes[d];
    }
  } else {
    int64_t stride = 1;
    for (int64_t pos = nd - 1; pos >= 0; --pos) {
      strides[order[pos]] = stride;
      stride *= sizes[order[pos]];
    }
  }
  if (bhsd && nd == 4) {
    std::swap(sizes[1], sizes[2]);
    std::swap(strides[1], strides[2]);
  }
  return empty_strided(nd, sizes.data(), strides.data(), q.dtype, q);
}

// -------------------------------------------------------------------------------------
// Device and stream: the Python path launched inside torch.cuda.device(q.device) on
// torch.cuda.current_stream(q.device); so do these.
// -------------------------------------------------------------------------------------

struct DeviceScope {
  CUDAGuardHandle guard = nullptr;
  void* stream = nullptr;
  explicit DeviceScope(const Facts& q) {
    if (q.dev_type != codes().cuda) return;
    if (aoti_torch_create_cuda_guard == nullptr || aoti_torch_get_current_cuda_stream == nullptr)
      throw std::runtime_error("orchard: this torch has no CUDA shims (a CPU-only build?)");
    check(aoti_torch_create_cuda_guard(q.dev_index, &guard), "create_cuda_guard");
    check(aoti_torch_get_current_cuda_stream(q.dev_index, &stream), "get_current_cuda_stream");
  }
  ~DeviceScope() {
    if (guard != nullptr) aoti_torch_delete_cuda_guard(guard);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;
};

constexpr std::uint64_t as_u64(int64_t v) { return static_cast<std::uint64_t>(v); }  // Python's `int(x) & _U64`

orchard::AttentionOptions make_options(double scale, bool causal, bool top_left, double dropout_p, int64_t seed,
                                       int64_t offset, const std::uint64_t* rng, bool deterministic, void* stream,
                                       std::string op_name) {
  orchard::AttentionOptions o;
  o.softmax_scale = scale;
  o.causal = causal;
  o.causal_align = top_left ? orchard::CausalAlign::kTopLeft : orchard::CausalAlign::kBottomRight;
  o.dropout_p = dropout_p;
  o.seed = as_u64(seed);
  o.offset = as_u64(offset);
  o.rng_state = rng;
  o.deterministic = deterministic;
  o.stream = stream;
  o.op_name = std::move(op_name);
  return o;
}

// The trailing feature arguments (_ops._FEATURE_SCHEMA), packed once by the op entry points
// (flash_fwd / flash_bwd; plain_features() for the short-schema ops); _ops._features' "all
// off" test decides whether they are passed to the core at all (as the DLPack path does).
struct Features {
  int64_t window_left, window_right;
  double softcap;
  const OptTensor &alibi, &sink, &attn_mask, &cu_q, &cu_k;
  int64_t max_q, max_k;
  int64_t drop_row, drop_col, drop_head, drop_heads;  // dropout's global coordinates (attention.h)
  bool any() const {
    return window_left != -1 || window_right != -1 || softcap != 0.0 || alibi.has_value() || sink.has_value() ||
           attn_mask.has_value() || cu_q.has_value() || cu_k.has_value() || drop_row != 0 || drop_col != 0 ||
           drop_head != 0 || drop_heads != 0;
  }
};

// Every feature off: what the short-schema ops (_flash_fwd_plain / _flash_bwd_plain) pass.
const Features& plain_features() {
  static const OptTensor none;
  static const Features f{-1, -1, 0.0, none, none, none, none, none, 0, 0, 0, 0, 0, 0};
  return f;
}

orchard::AttentionExtras make_extras(const Features& f, orchard::AttentionOptions& o) {
  orchard::AttentionExtras x;
  if (!f.any()) return x;
  const std::string& op = o.op_name;
  o.window_left = f.window_left;
  o.window_right = f.window_right;
  o.softcap = f.softcap;
  x.alibi_slopes = to_view(f.alibi, op, "alibi_slopes");
  x.sink = to_view(f.sink, op, "sink");
  x.attn_bias = to_view(f.attn_mask, op, "attn_mask");
  x.cu_seqlens_q = to_view(f.cu_q, op, "cu_seqlens_q");
  x.cu_seqlens_k = to_view(f.cu_k, op, "cu_seqlens_k");
  x.max_seqlen_q = f.max_q;
  x.max_seqlen_k = f.max_k;
  o.dropout_row_offset = f.drop_row;
  o.dropout_col_offset = f.drop_col;
  o.dropout_head_offset = f.drop_head;
  o.dropout_heads = f.drop_heads;
  return x;
}

// _ops._check_rank
void check_rank(const Facts& q, const Facts& k, const Facts& v, const std::string& op, int64_t rank) {
  const char* layout = rank == 4 ? "(batch, seq, heads, head_dim)" : "(total, heads, head_dim)";
  const std::pair<const char*, const Facts*> all[] = {{"q", &q}, {"k", &k}, {"v", &v}};
  for (const auto& [name, t] : all)
    if (t->nd != rank)
      invalid(op, std::string(name) + " must be " + std::to_string(rank) + "-D " + layout + ", got shape " +
                      shape_str(t->nd, t->sizes));
}

// -------------------------------------------------------------------------------------
// The kernels.
// -------------------------------------------------------------------------------------

// bhsd: q, k, v are (B, H, S, D) (the SDPA drop-in's tensors, as given) and out is
// returned (B, H, S, Dv), in q's memory order; the core reads their BSHD views.
std::tuple<Tensor, Tensor, Tensor> fwd_impl(const Tensor& q, const Tensor& k, const Tensor& v, double softmax_scale,
                                            bool causal, bool causal_top_left, double dropout_p, int64_t seed,
                                            int64_t offset, bool return_mask, std::string op_name,
                                            const OptTensor& rng_state, const Features& features, bool bhsd,
                                            bool no_mask_tensor = false) {
  return tagged([&] {
    Facts fq = facts(q), fk = facts(k), fv = facts(v);
    const bool varlen = features.cu_q.has_value();
    if (fq.nd != (varlen ? 3 : 4) || fk.nd != fq.nd || fv.nd != fq.nd) check_rank(fq, fk, fv, op_name, varlen ? 3 : 4);
    if (bhsd) {
      swap12(fq);
      swap12(fk);
      swap12(fv);
    }
    // _ops._alloc_forward, on the BSHD views (bhsd: out is handed back (B, H, S, Dv))
    Tensor out = fv.sizes[fv.nd - 1] == fq.sizes[fq.nd - 1]
                     ? empty_like(q, fq, bhsd)
                     : empty_with_head_dim(fq, fv.sizes[fv.nd - 1], bhsd);
    Facts fo = facts(out);
    if (bhsd) swap12(fo);
    const int32_t lse_dtype = fq.dtype == codes().f64 ? codes().f64 : codes().f32;
    int64_t b, sq, sk, hq = fq.sizes[fq.nd - 2];
    Tensor lse;
    if (!varlen) {
      b = fq.sizes[0];
      sq = fq.sizes[1];
      sk = fk.sizes[1];
      lse = empty_contiguous({b, hq, sq}, lse_dtype, fq);
    } else {
      b = facts(*features.cu_q).sizes[0] - 1;
      sq = features.max_q;
      sk = features.max_k;
      lse = empty_contiguous({hq, fq.sizes[0]}, lse_dtype, fq);
    }
    // no_mask_tensor (the short-schema op): no mask asked for -> None, not an empty tensor
    Tensor mask = return_mask       ? empty_contiguous({b, hq, sq, sk}, codes().u8, fq)
                  : no_mask_tensor ? Tensor()
                                   : empty_contiguous({0}, codes().u8, fq);
    const bool write_mask = return_mask && dropout_p > 0.0;
    if (return_mask && !write_mask) torch::stable::fill_(mask, 1.0);  // no dropout: everything is kept

    DeviceScope scope(fq);
    orchard::ForwardArgs args;
    args.q = to_view(fq, op_name, "q");
    args.k = to_view(fk, op_name, "k");
    args.v = to_view(fv, op_name, "v");
    args.out = to_view(fo, op_name, "out");
    args.lse = to_view(lse, op_name, "lse");
    if (write_mask) args.dropout_mask = to_view(mask, op_name, "dropout_mask");
    const std::uint64_t* rng = rng_state_pointer(rng_state, fq, op_name);
    args.options = make_options(softmax_scale, causal, causal_top_left, dropout_p, seed, offset, rng,
                                /*deterministic=*/false, scope.stream, std::move(op_name));
    args.extras = make_extras(features, args.options);
    std::string error;
    raise_if_failed(core().forward(args, error), error);
    return std::make_tuple(out, lse, mask);
  });
}

std::tuple<Tensor, Tensor, Tensor> flash_fwd(Tensor q, Tensor k, Tensor v, double softmax_scale, bool causal,
                                             bool causal_top_left, double dropout_p, int64_t seed, int64_t offset,
                                             bool return_mask, bool /*deterministic*/, std::string op_name,
                                             OptTensor rng_state, int64_t window_left,
                                             int64_t window_right, double softcap, OptTensor alibi_slopes,
                                             OptTensor sink, OptTensor attn_mask, OptTensor cu_seqlens_q,
                                             OptTensor cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                                             int64_t dropout_row_offset, int64_t dropout_col_offset,
                                             int64_t dropout_head_offset, int64_t dropout_heads) {
  return fwd_impl(q, k, v, softmax_scale, causal, causal_top_left, dropout_p, seed, offset, return_mask,
                  std::move(op_name), rng_state,
                  Features{window_left, window_right, softcap, alibi_slopes, sink, attn_mask, cu_seqlens_q,
                           cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_row_offset, dropout_col_offset,
                           dropout_head_offset, dropout_heads},
                  /*bhsd=*/false);
}

struct WorkspaceKey {
  int32_t dev_type = -1, dev_index = -1, dtype = -1;
  std::array<int64_t, 3 * orchard::kMaxRank> shapes{};
  int64_t ndim = -1;
  bool causal = false, dropout = false, deterministic = false;
  // Varlen: the offsets' lengths (-1: none) and the longest sequences, which size the CUDA
  // accumulators as the batch and sequence length do (launch.h, bwd_workspace_layout).
  int64_t cu_q_len = -1, cu_k_len = -1, max_q = 0, max_k = 0;
  bool valid = false;  // a default key (never cached) matches nothing
  bool operator==(const WorkspaceKey&) const = default;
};

WorkspaceKey workspace_key(const Facts& q, const Facts& k, const Facts& v, bool causal, bool dropout,
                           bool deterministic) {
  WorkspaceKey key;
  key.dev_type = q.dev_type;
  key.dev_index = q.dev_index;
  key.dtype = q.dtype;
  key.ndim = q.nd;
  if (q.nd > orchard::kMaxRank || k.nd != q.nd || v.nd != q.nd) return WorkspaceKey{};  // never cached
  for (int64_t i = 0; i < q.nd; ++i) {
    key.shapes[i] = q.sizes[i];
    key.shapes[orchard::kMaxRank + i] = k.sizes[i];
    key.shapes[2 * orchard::kMaxRank + i] = v.sizes[i];
  }
  key.causal = causal;
  key.dropout = dropout;
  key.deterministic = deterministic;
  key.valid = true;
  return key;
}

// bhsd: as fwd_impl's; dout, q, k, v, out are (B, H, S, D) and so are dq, dk, dv.
std::tuple<Tensor, Tensor, Tensor> bwd_impl(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                            const Tensor& out, const Tensor& lse, double softmax_scale, bool causal,
                                            bool causal_top_left, double dropout_p, int64_t seed, int64_t offset,
                                            bool deterministic, std::string op_name, const OptTensor& rng_state,
                                            const Features& features, bool bhsd) {
  return tagged([&] {
    Facts fq = facts(q), fk = facts(k), fv = facts(v), fo = facts(out), fdo = facts(dout);
    if (bhsd) {
      for (Facts* f : {&fq, &fk, &fv, &fo, &fdo}) swap12(*f);
    }
    Tensor dq = empty_like(q, fq, bhsd), dk = empty_like(k, fk, bhsd), dv = empty_like(v, fv, bhsd);
    Facts fdq = facts(dq), fdk = facts(dk), fdv = facts(dv);
    if (bhsd) {
      for (Facts* f : {&fdq, &fdk, &fdv}) swap12(*f);
    }
    DeviceScope scope(fq);
    orchard::BackwardArgs args;
    args.q = to_view(fq, op_name, "q");
    args.k = to_view(fk, op_name, "k");
    args.v = to_view(fv, op_name, "v");
    args.out = to_view(fo, op_name, "out");
    args.dout = to_view(fdo, op_name, "dout");
    args.lse = to_view(lse, op_name, "lse");
    args.dq = to_view(fdq, op_name, "dq");
    args.dk = to_view(fdk, op_name, "dk");
    args.dv = to_view(fdv, op_name, "dv");
    args.options = make_options(softmax_scale, causal, causal_top_left, dropout_p, seed, offset, nullptr,
                                deterministic, scope.stream, std::move(op_name));
    args.extras = make_extras(features, args.options);
    // The workspace size depends only on what WorkspaceKey holds (as _ops._WORKSPACE_BYTES
    // keys it; no feature argument but varlen's sizes changes it): asked once per thread for
    // a repeated problem, which saves a second validation pass per call. An undersized
    // workspace could only fail loudly (the core checks it).
    std::string error;
    std::size_t nbytes = 0;
    WorkspaceKey key = workspace_key(fq, fk, fv, causal, dropout_p > 0.0, deterministic);
    if (args.extras.cu_seqlens_q.defined()) key.cu_q_len = args.extras.cu_seqlens_q.shape[0];
    if (args.extras.cu_seqlens_k.defined()) key.cu_k_len = args.extras.cu_seqlens_k.shape[0];
    key.max_q = features.max_q;
    key.max_k = features.max_k;
    thread_local WorkspaceKey cached_key{};
    thread_local std::size_t cached_bytes = 0;
    if (key.valid && key == cached_key) {
      nbytes = cached_bytes;
    } else {
      raise_if_failed(core().backward_workspace_bytes(args, nbytes, error), error);
      if (key.valid) {
        cached_key = key;
        cached_bytes = nbytes;
      }
    }
    Tensor workspace;
    if (nbytes > 0) {
      workspace = empty_contiguous({static_cast<int64_t>(nbytes)}, codes().u8, fq);
      args.workspace = to_view(workspace, args.options.op_name, "workspace");
    }
    args.options.rng_state = rng_state_pointer(rng_state, fq, args.options.op_name);
    raise_if_failed(core().backward(args, error), error);
    return std::make_tuple(dq, dk, dv);
  });
}

std::tuple<Tensor, Tensor, Tensor> flash_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
                                             double softmax_scale, bool causal, bool causal_top_left,
                                             double dropout_p, int64_t seed, int64_t offset, bool deterministic,
                                             std::string op_name, OptTensor rng_state, int64_t window_left,
                                             int64_t window_right, double softcap, OptTensor alibi_slopes,
                                             OptTensor sink, OptTensor attn_mask, OptTensor cu_seqlens_q,
                                             OptTensor cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                                             int64_t dropout_row_offset, int64_t dropout_col_offset,
                                             int64_t dropout_head_offset, int64_t dropout_heads) {
  return bwd_impl(dout, q, k, v, out, lse, softmax_scale, causal, causal_top_left, dropout_p, seed, offset,
                  deterministic, std::move(op_name), rng_state,
                  Features{window_left, window_right, softcap, alibi_slopes, sink, attn_mask, cu_seqlens_q,
                           cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_row_offset, dropout_col_offset,
                           dropout_head_offset, dropout_heads},
                  /*bhsd=*/false);
}

// The drop-ins' common call (no feature arguments, seed/offset 0): a short schema, so
// the Python call converts 11 arguments instead of 23; bhsd serves the SDPA drop-in's
// (B, H, S, D) tensors without transposed views (and without their autograd nodes);
// the mask output is None unless return_mask (no empty tensor to allocate and wrap).
std::tuple<Tensor, Tensor, OptTensor> flash_fwd_plain(Tensor q, Tensor k, Tensor v, double softmax_scale,
                                                      bool causal, bool causal_top_left, double dropout_p,
                                                      bool return_mask, std::string op_name, OptTensor rng_state,
                                                      bool bhsd) {
  auto [out, lse, mask] = fwd_impl(q, k, v, softmax_scale, causal, causal_top_left, dropout_p, 0, 0, return_mask,
                                   std::move(op_name), rng_state, plain_features(), bhsd, /*no_mask_tensor=*/true);
  return std::make_tuple(out, lse, return_mask ? OptTensor(mask) : std::nullopt);
}

std::tuple<Tensor, Tensor, Tensor> flash_bwd_plain(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out,
                                                   Tensor lse, double softmax_scale, bool causal,
                                                   bool causal_top_left, double dropout_p, bool deterministic,
                                                   std::string op_name, OptTensor rng_state, bool bhsd) {
  return bwd_impl(dout, q, k, v, out, lse, softmax_scale, causal, causal_top_left, dropout_p, 0, 0, deterministic,
                  std::move(op_name), rng_state, plain_features(), bhsd);
}

// -------------------------------------------------------------------------------------
// aten::_scaled_dot_product_fused_attention_overrideable (+ _backward) on CPU and CUDA
// tensors: torch's SDPA op for out-of-tree backends, whose autograd node is C++
// (derivatives.yaml). The stable ABI cannot register an autograd kernel, and a Python
// autograd.Function costs a Python node per step (~8 us on the CPU proxy; on CUDA its
// backward runs Python on autograd's device thread); serving this op instead gives the
// drop-ins' common training call torch's own C++ node around these kernels (issue 12).
// torch leaves the op unimplemented for CPU / CUDA ("an operator for privateuse1
// backends, please use TORCH_LIBRARY_IMPL to override this function"); these kernels
// implement its contract as SDPA's: (B, H, S, D) tensors, top-left causal, scale
// default 1/sqrt(D), lse (B, H, S) float32; K/V heads may divide Q's (GQA). What
// Orchard's kernels cannot give through this schema is refused (NotImplementedError):
// dropout (no generator key to hand the backward), the debug mask, the gradient of
// attn_bias. attn_bias itself (SDPA's attn_mask as the rank-4 (B, H, L, S) view the
// drop-in builds: bool or float, stride-0 broadcasts) is the kernels' attn_mask feature.
// -------------------------------------------------------------------------------------

constexpr const char* kOverrideableOp = "aten._scaled_dot_product_fused_attention_overrideable";

double sdpa_scale(const Facts& q, std::optional<double> scale) {
  return scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(q.sizes[q.nd - 1]));
}

void check_overrideable_call(double dropout_p, bool debug_mask, bool bias_grad) {
  const char* what = dropout_p > 0.0 ? "dropout_p > 0"
                     : debug_mask    ? "return_debug_mask"
                     : bias_grad     ? "the gradient of attn_bias"
                                     : nullptr;
  if (what != nullptr)
    throw_tagged("NotImplementedError", std::string(kOverrideableOp) + ": Orchard's CPU/CUDA kernel does not take " +
                                            what + " through this op (use orchard.scaled_dot_product_attention)");
}

// attn_bias as the kernels' attn_mask feature (everything else off).
Features bias_features(const OptTensor& attn_bias) {
  static const OptTensor none;
  return Features{-1, -1, 0.0, none, none, attn_bias, none, none, 0, 0, 0, 0, 0, 0};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, int64_t, int64_t, Tensor, Tensor, Tensor> sdpa_overrideable_fwd(
    Tensor query, Tensor key, Tensor value, OptTensor attn_bias, double dropout_p, bool is_causal,
    bool return_debug_mask, std::optional<double> scale) {
  check_overrideable_call(dropout_p, return_debug_mask, false);
  const Facts fq = facts(query);
  if (fq.nd != 4) invalid(kOverrideableOp, "query must be 4-D (batch, heads, seq, head_dim), got shape " +
                                               shape_str(fq.nd, fq.sizes));
  const bool biased = attn_bias.has_value() && attn_bias->defined();
  auto [out, lse, mask] = fwd_impl(query, key, value, sdpa_scale(fq, scale), is_causal, /*causal_top_left=*/true,
                                   0.0, 0, 0, /*return_mask=*/false, kOverrideableOp, std::nullopt,
                                   biased ? bias_features(attn_bias) : plain_features(), /*bhsd=*/true,
                                   /*no_mask_tensor=*/true);
  (void)mask;
  // cum_seq_q/k, the philox seed/offset and the debug mask: undefined, as torch's
  // flash kernel returns them without varlen or dropout.
  return std::make_tuple(out, lse, Tensor(), Tensor(), fq.sizes[2], facts(key).sizes[2], Tensor(), Tensor(),
                         Tensor());
}

std::tuple<Tensor, Tensor, Tensor, Tensor> sdpa_overrideable_bwd(
    Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor attn_bias, std::vector<bool> grad_input_mask,
    Tensor out, Tensor logsumexp, Tensor /*cum_seq_q*/, Tensor /*cum_seq_k*/, int64_t /*max_q*/,
    int64_t /*max_k*/, double dropout_p, bool is_causal, Tensor /*philox_seed*/, Tensor /*philox_offset*/,
    std::optional<double> scale) {
  // No gradient for out (autograd hands an undefined one, e.g. gradcheck's undefined-grad
  // check): no gradients, which autograd reads as zeros.
  if (!grad_out.defined()) return std::make_tuple(Tensor(), Tensor(), Tensor(), Tensor());
  const bool biased = attn_bias.defined();
  check_overrideable_call(dropout_p, false, biased && grad_input_mask.size() > 3 && grad_input_mask[3]);
  const Facts fq = facts(query);
  const OptTensor bias = biased ? OptTensor(attn_bias) : std::nullopt;
  auto [dq, dk, dv] = bwd_impl(grad_out, query, key, value, out, logsumexp, sdpa_scale(fq, scale), is_causal,
                               /*causal_top_left=*/true, 0.0, 0, 0, /*deterministic=*/false, kOverrideableOp,
                               std::nullopt, biased ? bias_features(bias) : plain_features(), /*bhsd=*/true);
  return std::make_tuple(dq, dk, dv, Tensor());
}

// -------------------------------------------------------------------------------------
// flash_attn_with_kvcache's eager call (kvcache.py): the decode core on torch tensors,
// as orchard._C.kvcache_forward (kvcache.cpp) runs it on DLPack arrays. The caches are
// written in place (the new k/v appended); out, lse and the split-KV scratch are
// allocated here through torch. Returns (out, lse or None, the split count used).
// -------------------------------------------------------------------------------------

// kvcache.cpp's dtype message for a tensor the decode path cannot take (its dtype_of).
void check_decode_dtype(const Facts& f, const std::string& op, const char* name) {
  const DTypes& c = codes();
  const int32_t dt = f.dtype;
  if (dt == c.f16 || dt == c.bf16 || dt == c.f32 || dt == c.f64 || dt == c.i32 || dt == c.u8 || dt == c.b8) return;
  const auto [code, bits] = dlpack_code_bits(dt);
  const std::string what = code == 0 ? "int" : code == 1 ? "uint" : "code " + std::to_string(code) + " ";
  invalid(op, std::string(name) + ": unsupported dtype (" + what + std::to_string(bits) +
                  "); expected bfloat16/float16/float32 tensors and int32 index tensors");
}

orchard::TensorView decode_view(const Tensor& t, const std::string& op, const char* name) {
  const Facts f = facts(t);
  check_decode_dtype(f, op, name);
  return to_view(f, op, name);
}

orchard::TensorView decode_view(const OptTensor& t, const std::string& op, const char* name) {
  if (!t.has_value() || !t->defined()) return orchard::TensorView{};
  return decode_view(*t, op, name);
}

std::tuple<Tensor, OptTensor, int64_t> kvcache_fwd(
    Tensor q, Tensor k_cache, Tensor v_cache, OptTensor k, OptTensor v, OptTensor rotary_cos, OptTensor rotary_sin,
    OptTensor cache_seqlens, OptTensor cache_batch_idx, OptTensor cache_leftpad, OptTensor block_table,
    OptTensor alibi_slopes, std::optional<double> softmax_scale, bool causal, int64_t window_left,
    int64_t window_right, double softcap, bool rotary_interleaved, int64_t num_splits, bool return_lse,
    bool check_device_indices, std::string op_name) {
  return tagged([&] {
    const Facts fq = facts(q);
    if (fq.nd != 4)
      invalid(op_name, "q must be (batch, seqlen, nheads, headdim), got shape " + shape_str(fq.nd, fq.sizes));
    // kvcache.py's allocations: out row-major like q, lse (b, hq, sq) float32
    Tensor out = empty_contiguous({fq.sizes[0], fq.sizes[1], fq.sizes[2], fq.sizes[3]}, fq.dtype, fq);
    OptTensor lse;
    if (return_lse) lse = empty_contiguous({fq.sizes[0], fq.sizes[2], fq.sizes[1]}, codes().f32, fq);
    DeviceScope scope(fq);
    orchard::DecodeArgs a;
    const std::string& op = op_name;
    a.q = decode_view(q, op, "q");
    a.k_cache = decode_view(k_cache, op, "k_cache");
    a.v_cache = decode_view(v_cache, op, "v_cache");
    a.k = decode_view(k, op, "k");
    a.v = decode_view(v, op, "v");
    a.rotary_cos = decode_view(rotary_cos, op, "rotary_cos");
    a.rotary_sin = decode_view(rotary_sin, op, "rotary_sin");
    a.cache_seqlens = decode_view(cache_seqlens, op, "cache_seqlens");
    a.cache_batch_idx = decode_view(cache_batch_idx, op, "cache_batch_idx");
    a.cache_leftpad = decode_view(cache_leftpad, op, "cache_leftpad");
    a.block_table = decode_view(block_table, op, "block_table");
    a.alibi_slopes = decode_view(alibi_slopes, op, "alibi_slopes");
    a.out = decode_view(out, op, "out");
    a.lse = decode_view(lse, op, "lse");
    a.options.softmax_scale = softmax_scale;
    a.options.causal = causal;
    a.options.window_left = window_left;
    a.options.window_right = window_right;
    a.options.softcap = softcap;
    a.options.rotary_interleaved = rotary_interleaved;
    a.options.num_splits = static_cast<int>(num_splits);
    a.options.stream = scope.stream;
    a.options.check_device_indices = check_device_indices;
    a.options.op_name = op_name;
    std::string error;
    orchard::DecodePlan plan;
    raise_if_failed(core().kvcache_plan(a, plan, error), error);
    Tensor workspace;  // freed after the launch: the caching allocator orders reuse on the stream
    if (plan.workspace_bytes > 0) {
      workspace = empty_contiguous({static_cast<int64_t>(plan.workspace_bytes)}, codes().u8, fq);
      a.workspace = to_view(workspace, op, "workspace");
      a.options.num_splits = plan.num_splits;  // the plan the workspace was sized for
    }
    raise_if_failed(core().kvcache_forward(a, error), error);
    return std::make_tuple(out, lse, static_cast<int64_t>(plan.num_splits));
  });
}

}  // namespace

// Called once by _ops.py (ctypes) with orchard._C._core_api(). Returns 0 when the table
// fits this library (same ABI version and struct sizes), else nonzero and the library
// stays unusable (the DLPack path is used).
extern "C" __attribute__((visibility("default"))) int orchard_torch_set_core_api(const void* table) {
  const auto* api = static_cast<const orchard::binding::CoreApi*>(table);
  const orchard::binding::CoreApi expected;
  if (api == nullptr || api->abi != expected.abi || api->forward_args_size != expected.forward_args_size ||
      api->backward_args_size != expected.backward_args_size || api->options_size != expected.options_size ||
      api->decode_args_size != expected.decode_args_size || api->forward == nullptr || api->backward == nullptr ||
      api->backward_workspace_bytes == nullptr || api->kvcache_plan == nullptr || api->kvcache_forward == nullptr)
    return 1;
  g_core = api;
  return 0;
}

// The schemas repeat orchard::flash_attn_forward / flash_attn_backward (_ops.py) under
// internal names; keep them in step (test_stable_ops.py compares them).
STABLE_TORCH_LIBRARY_FRAGMENT(orchard, m) {
  m.def(
      "_flash_fwd(Tensor q, Tensor k, Tensor v, float softmax_scale, bool causal, bool causal_top_left, "
      "float dropout_p, SymInt seed, SymInt offset, bool return_mask, bool deterministic=False, "
      "str op_name=\"orchard.flash_attn\", Tensor? rng_state=None, SymInt window_left=-1, "
      "SymInt window_right=-1, float softcap=0.0, Tensor? alibi_slopes=None, Tensor? sink=None, "
      "Tensor? attn_mask=None, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, SymInt max_seqlen_q=0, "
      "SymInt max_seqlen_k=0, SymInt dropout_row_offset=0, SymInt dropout_col_offset=0, "
      "SymInt dropout_head_offset=0, SymInt dropout_heads=0) -> (Tensor, Tensor, Tensor)");
  m.def(
      "_flash_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float softmax_scale, "
      "bool causal, bool causal_top_left, float dropout_p, SymInt seed, SymInt offset, bool deterministic, "
      "str op_name=\"orchard.flash_attn\", Tensor? rng_state=None, SymInt window_left=-1, "
      "SymInt window_right=-1, float softcap=0.0, Tensor? alibi_slopes=None, Tensor? sink=None, "
      "Tensor? attn_mask=None, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, SymInt max_seqlen_q=0, "
      "SymInt max_seqlen_k=0, SymInt dropout_row_offset=0, SymInt dropout_col_offset=0, "
      "SymInt dropout_head_offset=0, SymInt dropout_heads=0) -> (Tensor, Tensor, Tensor)");
  m.def(
      "_flash_fwd_plain(Tensor q, Tensor k, Tensor v, float softmax_scale, bool causal, bool causal_top_left, "
      "float dropout_p, bool return_mask, str op_name, Tensor? rng_state, bool bhsd=False) -> (Tensor, Tensor, "
      "Tensor?)");
  m.def(
      "_flash_bwd_plain(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float softmax_scale, "
      "bool causal, bool causal_top_left, float dropout_p, bool deterministic, str op_name, Tensor? rng_state, "
      "bool bhsd=False) -> (Tensor, Tensor, Tensor)");
  m.def(
      "_kvcache_fwd(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v, Tensor? rotary_cos, "
      "Tensor? rotary_sin, Tensor? cache_seqlens, Tensor? cache_batch_idx, Tensor? cache_leftpad, "
      "Tensor? block_table, Tensor? alibi_slopes, float? softmax_scale, bool causal, int window_left, "
      "int window_right, float softcap, bool rotary_interleaved, int num_splits, bool return_lse, "
      "bool check_device_indices, str op_name) "
      "-> (Tensor, Tensor?, int)");
}

// One kernel per op serves every device (the core dispatches on the tensors' device).
namespace {
template <typename Library>
void impl_orchard_ops(Library& m) {
  m.impl("_flash_fwd", TORCH_BOX(&flash_fwd));
  m.impl("_flash_bwd", TORCH_BOX(&flash_bwd));
  m.impl("_flash_fwd_plain", TORCH_BOX(&flash_fwd_plain));
  m.impl("_flash_bwd_plain", TORCH_BOX(&flash_bwd_plain));
  m.impl("_kvcache_fwd", TORCH_BOX(&kvcache_fwd));
}
template <typename Library>
void impl_aten_ops(Library& m) {
  m.impl("_scaled_dot_product_fused_attention_overrideable", TORCH_BOX(&sdpa_overrideable_fwd));
  m.impl("_scaled_dot_product_fused_attention_overrideable_backward", TORCH_BOX(&sdpa_overrideable_bwd));
}
}  // namespace

STABLE_TORCH_LIBRARY_IMPL(orchard, CPU, m) { impl_orchard_ops(m); }
STABLE_TORCH_LIBRARY_IMPL(orchard, CUDA, m) { impl_orchard_ops(m); }

// The aten op above (its C++ autograd node is torch's). _ops.py uses it only when
// ORCHARD_ATEN_AUTOGRAD is not "0" (the registration itself is unconditional: torch has
// no CPU/CUDA kernel for this op that it could displace).
STABLE_TORCH_LIBRARY_IMPL(aten, CPU, m) { impl_aten_ops(m); }
STABLE_TORCH_LIBRARY_IMPL(aten, CUDA, m) { impl_aten_ops(m); }
