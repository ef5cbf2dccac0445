// Runs the CUDA float32 forward and backward (flash_fp32.cu's run_fwd_fp32 / run_bwd_fp32, which
// take flash_fp32_tc.cu's tensor-core kernels where they fit unless ORCHARD_CUDA_FP32_TC=0, else
// the SIMT kernels; CPU-emulated: see dev/decode_emu/shim/) against a naive fp64 reference written here from
// params.h's definitions, on fixed and random cases: each case runs the forward, judges out and
// lse, then (unless forward-only) runs the backward on the forward's out and lse with a random
// dO and judges dq, dk, dv against the fp64 gradient, and runs it again for bitwise equality.
// Build and run: dev/fp32_emu/run.sh [--fwd | --bwd] [random cases] [seed]
//   --fwd: forward only; --bwd: only the cases that check the backward (their forward is still
//   run and judged: it makes the backward's out / lse).
// Compiled with -DEMU_SM80 (dev/sm80_emu/run.sh) the same harness runs the sm80-class bf16 / fp16
// kernels instead (sm80/flash_fwd_kernel.cuh, flash_bwd_kernel.cuh, dispatched as cuda_backend.cu
// does), on its own cases and emulated devices (an H100's, an A100's and an sm_86's shared memory),
// their tensors in 16-bit storage, judged against fp64 math on the rounded inputs with 16-bit
// tolerances.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime.h>  // the shim's: emulated devices
#if defined(EMU_SM80)
#include <cuda_bf16.h>  // (the shim's)
#endif

#include "backends/cuda/launch.h"
#include "orchard/numeric.h"
#include "orchard/params.h"
#include "orchard/philox.h"

using namespace orchard;

// cuda_backend.cu's definitions of what flash_fp32.cu calls outside itself.
namespace orchard::cuda {
void check_launch(const char*) {}
void opt_in_dynamic_smem(const void*, int bytes) {
#if defined(EMU_SM80)  // as cuda_backend.cu's: a call no kernel of the device fits raises (the case is skipped)
  if (bytes > emu_smem_optin[emu_device])
    throw Error(ErrorKind::kNotImplemented, "needs " + std::to_string(bytes) + " bytes of shared memory");
#endif
  if (bytes > emu_smem_optin[emu_device]) {  // the launch would fail on the GPU
    std::printf("dynamic shared memory %d bytes over device %d's opt-in, %d\n", bytes, emu_device,
                emu_smem_optin[emu_device]);
    std::exit(2);
  }
}
// The CPU has no occupancy: shared memory alone, in an sm_90 SM's 228 KB (1 KB reserved per CTA).
int resident_ctas(const void*, int, int smem_bytes) { return 228 * 1024 / (smem_bytes + 1024); }
// The sink gradient is another file's (cuda_backend.cu): the tests pass dsink = nullptr, so
// run_bwd_fp32 never calls it.
void run_bwd_dsink(const BwdParams&, const float*) { std::abort(); }
}  // namespace orchard::cuda

namespace {
#if defined(EMU_SM80)
constexpr bool kSm80 = true;
// cuda_backend.cu's dispatch (launch.h) to the kernels of dev/sm80_emu/kernels.cpp.
void kernel_fwd(const FwdParams& p) {
  if (p.dtype == DType::kBFloat16) cuda::sm80_fwd_dispatch<__nv_bfloat16>(p);
  else cuda::sm80_fwd_dispatch<__half>(p);
}
void kernel_bwd(const BwdParams& p) {
  if (p.dtype == DType::kBFloat16) cuda::sm80_bwd_dispatch<__nv_bfloat16>(p);
  else cuda::sm80_bwd_dispatch<__half>(p);
}
bool fwd_takes_tensor_cores(const FwdParams&) { return true; }
bool bwd_takes_tensor_cores(const BwdParams&) { return true; }
#else
constexpr bool kSm80 = false;
void kernel_fwd(const FwdParams& p) { cuda::run_fwd_fp32(p); }
void kernel_bwd(const BwdParams& p) { cuda::run_bwd_fp32(p); }
bool fwd_takes_tensor_cores(const FwdParams& p) { return cuda::fp32_fwd_takes_tensor_cores(p); }
bool bwd_takes_tensor_cores(const BwdParams& p) { return cuda::fp32_bwd_takes_tensor_cores(p); }
#endif
}  // namespace

namespace {

struct Case {
  int b = 1, sq = 16, sk = 16, hq = 1, hkv = 1, d = 64, dv = 0;  // dv 0: d
  bool causal = false;
  long wl = -1, wr = -1;  // window, -1 unbounded
  float softcap = 0.f, scale = 0.f, dropout = 0.f;  // scale 0: 1 / sqrt(d)
  bool rng_state = false;  // dropout's (seed, offset) through FwdParams::rng_state
  int alibi = 0;  // 0 none, 1 per head, 2 per (batch, head)
  bool sink = false;
  // 0 none, 1 float32 (b, hq, sq, sk), 2 uint8 mask (b, hq, sq, sk) with an all-masked row,
  // 3 float32 (1, 1, sq, sk) stored column-major, 4 bf16 (b, 1, sq, sk)
  int bias = 0;
  std::vector<int> lq, lk;  // varlen sequence lengths (empty: not varlen)
  int q0 = 0;               // varlen: cu_seqlens_q[0] (rows before it belong to no sequence)
  bool top_left = false;
  int layout = 0;        // q / k / v: 0 (b, s, h, d), 1 (b, h, s, d), 2 (b, s, h, d) with padded rows; out the next one
  bool nan_row = false;  // NaN in q's first row (sequence 0, head 0): observed, not judged
  // NaN (bits 0x7fffffff, the one NaN GPU arithmetic produces) in v's first key row of kv head 0,
  // column 0: judged, the reference's NaNs (rows that see the key) must come out NaN and no other.
  // Only where every row sees every key of that tile (a masked row's weight 0 times NaN is NaN in
  // the kernels' P V, as in every tiled kernel, while the reference skips the key), and without
  // dropout (the kernels' D = rowsum(dO * out) is NaN where a dropped key's 0 * NaN made out NaN;
  // the reference's D, sum P dP, skips it).
  bool nan_v = false;
  // +-inf (inf_k = +1 / -1) in k's key 2 of kv head 0, column 0: judged the same way; a row's score
  // there is +-inf by the sign of its q, +inf a NaN row, -inf the key masked (the contract of
  // tests/python/reliability/test_numerics.py).
  int inf_k = 0;
  int device = 0;        // the emulated device (main: 1's shared-memory opt-in holds 2 warps at d = 256, not 4)
  bool bwd = true;       // also check the backward (never with nan_row)
  int dtype = 0;         // 0 float32; EMU_SM80: 1 bfloat16, 2 float16
  bool deterministic = true;  // the backward's mode (EMU_SM80; the fp32 kernels have one)
};

// The backward's emulated device for a case's: device 1 (76 KB) holds neither backward kernel's
// 2-warp CTA at d = dv = 256 (91 / 92 KB), so the backward of a device-1 case runs on device 2,
// a 99 KB opt-in (sm_86 / sm_89), where d = dv = 256 takes 2 warps (4 need 107 / 109 KB).
int bwd_device(int device) { return device == 1 ? 2 : device; }

std::mt19937_64 rng(1234);
float randn() { static std::normal_distribution<float> n(0.f, 1.f); return n(rng); }
int randint(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); }  // inclusive
float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng); }

// A logical (batch, row, head, width) tensor in one of Case::layout's storages; varlen
// tensors are one batch of packed rows with batch stride 0.
struct Tensor {
  int64_t bs = 0, rs = 0, hs = 0;
  std::vector<float> data;
  std::vector<uint16_t> h;  // EMU_SM80: the 16-bit storage the kernels read and write (device_copy)
  Tensor(int nb, int ns, int nh, int width, int layout, bool packed) {
    const int w = width + (layout == 2 ? 5 : 0);  // odd padding: rows start unaligned
    if (layout == 1) rs = w, hs = int64_t(ns) * w, bs = int64_t(nh) * ns * w;
    else hs = w, rs = int64_t(nh) * w, bs = int64_t(ns) * nh * w;
    data.assign(size_t(nb) * ns * nh * w, 0.f);
    if (packed) bs = 0;
  }
  size_t index(int b, int64_t r, int h, int c) const { return b * bs + r * rs + h * hs + c; }
  float& at(int b, int64_t r, int h, int c) { return data[index(b, r, h, c)]; }
};

// Outputs start as this NaN: a kernel result never has its payload, so elements left
// unwritten (or written outside the outputs' rows) are told apart from NaN results.
constexpr uint32_t kPoison = 0x7fc0beefu;
float poison() { float f; std::memcpy(&f, &kPoison, 4); return f; }
bool is_poison(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u == kPoison; }

// EMU_SM80's 16-bit storage: a tensor's float values rounded to the dtype (the reference then sees
// exactly what the kernels read), mirrored into 16-bit words for the kernels and back; poison maps
// to a NaN of a payload no kernel writes.
uint16_t to16(float f, int dtype) { return dtype == 1 ? float_to_bf16(f) : float_to_fp16(f); }
float from16(uint16_t h, int dtype) { return dtype == 1 ? bf16_to_float(h) : fp16_to_float(h); }
uint16_t poison16(int dtype) { return dtype == 1 ? 0x7fa5 : 0x7e5a; }
void round_to(Tensor& t, int dtype) {
  if (dtype)
    for (float& x : t.data) x = from16(to16(x, dtype), dtype);
}
// The pointer the kernels get: the float data itself, or its 16-bit mirror (written now).
void* device_copy(Tensor& t, int dtype) {
  if (!dtype) return t.data.data();
  t.h.resize(t.data.size());
  for (size_t i = 0; i < t.data.size(); ++i) t.h[i] = is_poison(t.data[i]) ? poison16(dtype) : to16(t.data[i], dtype);
  return t.h.data();
}
// The kernels' results back into the float data.
void host_copy(Tensor& t, int dtype) {
  if (!dtype) return;
  for (size_t i = 0; i < t.data.size(); ++i) t.data[i] = t.h[i] == poison16(dtype) ? poison() : from16(t.h[i], dtype);
}

std::string describe(const Case& c) {
  char s[512];
  std::snprintf(s, sizeof s,
                "hq=%d hkv=%d d=%d dv=%d causal=%d w=(%ld,%ld) softcap=%g alibi=%d sink=%d bias=%d layout=%d "
                "dropout=%g%s scale=%g top_left=%d device=%d%s%s",
                c.hq, c.hkv, c.d, c.dv ? c.dv : c.d, c.causal, c.wl, c.wr, c.softcap, c.alibi, c.sink, c.bias,
                c.layout, c.dropout, c.rng_state ? " (rng_state)" : "", c.scale, c.top_left, c.device,
                c.nan_v ? " nan_v" : c.inf_k > 0 ? " +inf_k" : c.inf_k < 0 ? " -inf_k" : "",
                c.dtype == 1 ? " bf16" : c.dtype == 2 ? " fp16" : "",
                c.dtype && !c.deterministic ? " atomic_dq" : "");
  std::string r = c.lq.empty() ? "b=" + std::to_string(c.b) + " sq=" + std::to_string(c.sq) +
                                     " sk=" + std::to_string(c.sk)
                               : "varlen q0=" + std::to_string(c.q0) + " lens";
  for (size_t i = 0; i < c.lq.size(); ++i) r += " " + std::to_string(c.lq[i]) + "/" + std::to_string(c.lk[i]);
  return r + " " + s;
}

// Relative / absolute tolerance of fp32 against fp64: |x - ref| <= kTol * (1 + |ref|). (EMU_SM80:
// fwd_tol, bwd_tol below.)
constexpr double kTol = 1e-5;
// The backward's gradients, against their tensor's scale: |x - ref| <= kBwdTol * scale, the scale
// of dq, dk or dv the largest over its elements of the sum of the magnitudes of the element's
// terms before cancellation (dS counted as P (|dP| + |D|)): fp32 rounds dP and D, not their
// difference, so a gradient that cancels to ~0 (a row that sees 1 key: dS = P (dP - P dP) = 0)
// still has errors of that size. (Against 1 + max |ref| instead, the sq = 300, sk = 1 case's dk,
// exactly 0, was 3x under 2e-5, the rest 12x.) A correct fp32 kernel's worst is ~2e-6. An element
// that no (row, key) pair of finite score reaches (a row that sees no key, a key that no row sees)
// must be exactly 0. (Not "every term 0": a row that sees one key has dS = P (dP - P dP), exactly 0
// in fp64 but not after fp32 rounding.)
constexpr double kBwdTol = 2e-5;
// 16-bit storage (EMU_SM80): P and dS are rounded to the dtype before their products and the outputs
// at their stores (bf16 keeps 8 bits, fp16 11). Session 66's first 83 cases (23 fixed, 60 random)
// gave at worst bf16 3.2e-3 forward / 3.3e-3 backward, fp16 4.3e-4 / 4.3e-4: about 3x below these.
// (A K / V tile one step off in the dQ kernel gave 0.13.)
double fwd_tol(int dtype) { return dtype == 1 ? 1e-2 : dtype == 2 ? 1.5e-3 : kTol; }
double bwd_tol(int dtype) { return dtype == 1 ? 1e-2 : dtype == 2 ? 1.5e-3 : kBwdTol; }

struct Result {
  bool ok = true;
  double worst = 0;  // the largest |x - ref| / (1 + |ref|) over out and lse
  long bad_out = 0, bad_lse = 0, stray = 0;
  unsigned threads = 0;  // of the launch's CTAs
  bool tc_fwd = false, tc_bwd = false;  // which family ran: flash_fp32_tc.cu's or the SIMT kernels
  std::string nan_note;
  // The backward (when run).
  bool bwd = false;
  double worst_g[3] = {0, 0, 0};     // dq, dk, dv: the largest |x - ref| / scale (kBwdTol)
  double max_ref[3] = {0, 0, 0};     // max |ref| of each
  double scale[3] = {0, 0, 0};       // and the scale
  long bad_g[3] = {0, 0, 0};         // beyond kBwdTol, or nonzero where the reference has no term
  long bwd_stray = 0;                // written outside dq / dk / dv's owned elements, or inputs changed
  long ws_bad = 0;                   // D (workspace) elements left unwritten, or writes past them
  long nondet = 0;                   // elements that differ between two identical runs
  unsigned bwd_threads = 0;          // of the dK / dV launch's CTAs
  double bwd_secs = 0;
  std::string unsupported;           // EMU_SM80: the NotImplementedError of a call the device fits no kernel for
};

Result run_case(const Case& c) {
  const bool varlen = !c.lq.empty();
  const int dv = c.dv ? c.dv : c.d, nseq = varlen ? int(c.lq.size()) : c.b, groups = c.hq / c.hkv;
  std::vector<int32_t> cu_q{c.q0}, cu_k{0};
  int sq = c.sq, sk = c.sk;
  if (varlen) {
    sq = *std::max_element(c.lq.begin(), c.lq.end()), sk = *std::max_element(c.lk.begin(), c.lk.end());
    for (int i = 0; i < nseq; ++i) cu_q.push_back(cu_q.back() + c.lq[i]), cu_k.push_back(cu_k.back() + c.lk[i]);
  }
  // Varlen: 2 packed rows past cu_seqlens_q[b] that no sequence owns either.
  const int total_q = varlen ? cu_q.back() + 2 : 0, total_k = varlen ? cu_k.back() : 0;
  const int tb = varlen ? 1 : c.b, tq = varlen ? total_q : sq, tk = varlen ? std::max(total_k, 1) : sk;
  Tensor q(tb, tq, c.hq, c.d, c.layout, varlen), k(tb, tk, c.hkv, c.d, c.layout, varlen),
      v(tb, tk, c.hkv, dv, c.layout, varlen), out(tb, tq, c.hq, dv, (c.layout + 1) % 3, varlen);
  for (auto* t : {&q, &k, &v}) {
    for (float& x : t->data) x = randn();
    round_to(*t, c.dtype);
  }
  const int64_t lse_row = tq + 3;  // a padded head stride: only the rows are contiguous
  std::vector<float> lse(size_t(tb) * c.hq * lse_row);
  std::fill(out.data.begin(), out.data.end(), poison());
  std::fill(lse.begin(), lse.end(), poison());

  // Sequence bi's local row i is packed row q_start(bi) + i of batch seq_b(bi).
  auto seq_b = [&](int bi) { return varlen ? 0 : bi; };
  auto q_start = [&](int bi) { return varlen ? cu_q[bi] : 0; };
  auto k_start = [&](int bi) { return varlen ? cu_k[bi] : 0; };
  auto len_q = [&](int bi) { return varlen ? c.lq[bi] : sq; };
  auto len_k = [&](int bi) { return varlen ? c.lk[bi] : sk; };
  auto diag = [&](int bi) -> int64_t { return c.top_left ? 0 : int64_t(len_k(bi)) - len_q(bi); };
  if (c.nan_row) q.at(seq_b(0), q_start(0), 0, 0) = std::nanf("");
  if (c.inf_k) k.at(seq_b(0), k_start(0) + 2, 0, 0) = c.inf_k * INFINITY;
  if (c.nan_v) {
    const uint32_t gpu_nan = 0x7fffffffu;
    std::memcpy(&v.at(seq_b(0), k_start(0), 0, 0), &gpu_nan, 4);
  }

  std::vector<float> slopes(size_t(c.alibi == 2 ? nseq : 1) * c.hq), sinks(c.hq);
  for (float& s : slopes) s = uniform(0.f, 0.15f);
  for (float& s : sinks) s = uniform(-2.f, 3.f);

  FwdParams p;
  // attn_bias: logical (nseq, hq, sq, sk) over local rows / columns, broadcast as Case::bias says.
  std::vector<unsigned char> bias_bytes;
  auto bias_off = [&](int bi, int h, int i, int j) {
    return bi * p.bias_batch_stride + h * p.bias_head_stride + i * p.bias_row_stride + j * p.bias_col_stride;
  };
  if (c.bias) {
    const int nb = c.bias == 3 ? 1 : nseq, nh = c.bias >= 3 ? 1 : c.hq;
    const size_t n = size_t(nb) * nh * sq * sk, es = c.bias == 2 ? 1 : c.bias == 4 ? 2 : 4;
    bias_bytes.assign(n * es, 0);
    if (c.bias == 3) p.bias_row_stride = 1, p.bias_col_stride = sq;
    else p.bias_row_stride = sk, p.bias_col_stride = 1;
    p.bias_head_stride = nh > 1 ? int64_t(sq) * sk : 0;
    p.bias_batch_stride = nb > 1 ? int64_t(nh) * sq * sk : 0;
    p.attn_bias_dtype = c.bias == 2 ? DType::kUInt8 : c.bias == 4 ? DType::kBFloat16 : DType::kFloat32;
    for (size_t i = 0; i < n; ++i) {
      if (c.bias == 2) {
        bias_bytes[i] = randint(0, 3) != 0;  // 1 in 4 masked
      } else if (c.bias == 4) {
        const uint16_t h = float_to_bf16(uniform(-2.f, 2.f));
        std::memcpy(&bias_bytes[2 * i], &h, 2);
      } else {
        const float f = uniform(-2.f, 2.f);
        std::memcpy(&bias_bytes[4 * i], &f, 4);
      }
    }
    if (c.bias == 2 && sq > 1)  // local row 1 masked everywhere: a row that sees no key
      for (int bi = 0; bi < nseq; ++bi)
        for (int h = 0; h < c.hq; ++h)
          for (int j = 0; j < sk; ++j) bias_bytes[bias_off(bi, h, 1, j)] = 0;
    p.attn_bias = bias_bytes.data();
  }
  auto bias_of = [&](int bi, int h, int i, int j) -> double {
    const int64_t o = bias_off(bi, h, i, j);
    switch (c.bias) {
      case 2: return bias_bytes[o] ? 0.0 : -INFINITY;
      case 4: { uint16_t u; std::memcpy(&u, &bias_bytes[2 * o], 2); return bf16_to_float(u); }
      default: { float f; std::memcpy(&f, &bias_bytes[4 * o], 4); return f; }
    }
  };

  // The params as the core fills them (attention.cpp's set_problem / set_extras).
  p.q = q.data.data(), p.k = k.data.data(), p.v = v.data.data(), p.out = out.data.data(), p.lse = lse.data();
  p.q_batch_stride = q.bs, p.q_row_stride = q.rs, p.q_head_stride = q.hs;
  p.k_batch_stride = k.bs, p.k_row_stride = k.rs, p.k_head_stride = k.hs;
  p.v_batch_stride = v.bs, p.v_row_stride = v.rs, p.v_head_stride = v.hs;
  p.o_batch_stride = out.bs, p.o_row_stride = out.rs, p.o_head_stride = out.hs;
  p.lse_batch_stride = varlen ? 0 : c.hq * lse_row, p.lse_head_stride = lse_row;
  p.b = nseq, p.sq = sq, p.sk = sk, p.hq = c.hq, p.hkv = c.hkv, p.d = c.d, p.d_v = dv;
  if (varlen) {
    p.cu_seqlens_q = cu_q.data(), p.cu_seqlens_k = cu_k.data();
    p.total_q = total_q, p.total_k = total_k;
  }
  p.causal_top_left = c.top_left;
  p.causal_offset = c.top_left ? 0 : sk - sq;
  p.scale = c.scale > 0 ? c.scale : float(1.0 / std::sqrt(double(c.d)));
  p.scale_f64 = p.scale;
  const long reach = long(sq) + sk;  // the core's normal form: causal is window_right = 0
  p.window_left = c.wl >= reach ? -1 : c.wl;
  p.window_right = c.causal ? 0 : (c.wr >= reach ? -1 : c.wr);
  p.causal = p.window_right == 0;
  p.softcap = c.softcap, p.softcap_f64 = c.softcap;
  if (c.alibi) p.alibi_slopes = slopes.data(), p.alibi_batch_stride = c.alibi == 2 ? c.hq : 0;
  if (c.sink) p.sink = sinks.data();
  uint64_t seed = 0, offset = 0, rng_words[2];
  if (c.dropout > 0) {
    p.dropout_p = c.dropout, p.dropout_p_f64 = c.dropout;
    seed = rng(), offset = rng();
    if (c.rng_state) {  // read at run time from rng_state (the fields are then not the key)
      rng_words[0] = seed, rng_words[1] = offset;
      p.rng_state = rng_words, p.seed = ~seed, p.offset = offset + 1;
    } else {
      p.seed = seed, p.offset = offset;
    }
    if (randint(0, 1)) {  // a block of a larger call (context parallelism)
      p.dropout_row_offset = randint(0, 1000), p.dropout_col_offset = randint(0, 1000);
      p.dropout_head_offset = randint(0, 3), p.dropout_heads = c.hq + 5;
    }
  }
  p.dtype = c.dtype == 1 ? DType::kBFloat16 : c.dtype == 2 ? DType::kFloat16 : DType::kFloat32;
  p.q = device_copy(q, c.dtype), p.k = device_copy(k, c.dtype), p.v = device_copy(v, c.dtype);
  p.out = device_copy(out, c.dtype);

  emu_device = c.device;
  blockDim = dim3(0);
  const bool tc_fwd = fwd_takes_tensor_cores(p);
  Result res;
  try {
    kernel_fwd(p);
  } catch (const Error& e) {
    if (e.kind() != ErrorKind::kNotImplemented) throw;
    res.unsupported = std::string("forward: ") + e.what();
    return res;
  }
  host_copy(out, c.dtype);
  const double tol = fwd_tol(c.dtype), gtol = bwd_tol(c.dtype);

  // fp64 reference, straight from params.h's definitions; dropout applied by philox.h's
  // keep rule (the definition of the mask, shared with every backend).
  res.tc_fwd = tc_fwd;
  res.threads = blockDim.x;
  std::vector<char> owned_out(out.data.size()), owned_lse(lse.size());
  const uint32_t thr = dropout_keep_threshold(c.dropout);
  const int dheads = p.dropout_heads > 0 ? p.dropout_heads : c.hq;
  auto kept = [&](int bi, int h, int i, int j) {
    return dropout_keep(seed, offset, uint32_t(bi * dheads + p.dropout_head_offset + h),
                        uint32_t(i + p.dropout_row_offset), uint32_t(j + p.dropout_col_offset), thr);
  };

  // The backward's tensors: dO random, the gradients in another storage than their inputs; varlen
  // dk / dv get 2 packed rows past cu_seqlens_k[b] that no sequence owns.
  const bool bwd = c.bwd && !c.nan_row;
  const int gl = (c.layout + 2) % 3, nbw = bwd ? tb : 0, tkg = varlen ? tk + 2 : tk;
  Tensor dout(nbw, tq, c.hq, dv, (c.layout + 1) % 3, varlen), dq(nbw, tq, c.hq, c.d, gl, varlen),
      dk(nbw, tkg, c.hkv, c.d, gl, varlen), dvt(nbw, tkg, c.hkv, dv, gl, varlen);
  for (float& x : dout.data) x = randn();
  round_to(dout, c.dtype);
  Tensor* const grads[3] = {&dq, &dk, &dvt};
  // The fp64 gradients per storage element of dq / dk / dv, the sum of their terms' magnitudes
  // before cancellation (dS's as P (|dP| + |D|)), and whether any term reaches it.
  std::vector<double> g_ref[3], g_mag[3];
  std::vector<char> g_reached[3];
  for (int t = 0; t < 3; ++t) {
    const size_t n = grads[t]->data.size();
    g_ref[t].assign(n, 0.0), g_mag[t].assign(n, 0.0), g_reached[t].assign(n, 0);
  }
  auto add = [&](int t, size_t idx, double term, double mag) {
    g_ref[t][idx] += term, g_mag[t][idx] += std::fabs(mag), g_reached[t][idx] = 1;
  };

  std::vector<double> s, ref(dv), dts, pr, dpr;  // scores, d score / d (scale q.k), P, dP
  std::vector<char> keeps, vis;  // vis: the keys a row sees (a -inf score included)
  for (int bi = 0; bi < nseq; ++bi)
    for (int h = 0; h < c.hq; ++h)
      for (int i = 0; i < len_q(bi); ++i) {
        const int bq = seq_b(bi), hk = h / groups;
        const int64_t qr = q_start(bi) + i, at = i + diag(bi);
        s.assign(len_k(bi), -INFINITY);
        vis.assign(len_k(bi), 0);
        dts.assign(len_k(bi), 1.0);
        double mx = c.sink ? sinks[h] : -INFINITY;
        for (int j = 0; j < len_k(bi); ++j) {
          if ((c.wl >= 0 && j < at - c.wl) || (c.wr >= 0 && j > at + c.wr) || (c.causal && j > at)) continue;
          vis[j] = 1;
          double dot = 0;
          for (int e = 0; e < c.d; ++e) dot += double(q.at(bq, qr, h, e)) * k.at(bq, k_start(bi) + j, hk, e);
          double x = dot * p.scale;
          if (c.softcap > 0) {
            const double t = std::tanh(x / c.softcap);
            x = c.softcap * t, dts[j] = 1.0 - t * t;
          }
          if (c.alibi) x -= slopes[(c.alibi == 2 ? bi * c.hq : 0) + h] * std::fabs(double(at - j));
          if (c.bias) x += bias_of(bi, h, i, j);
          s[j] = x;
          if (x > mx) mx = x;
        }
        double ref_lse = -INFINITY;
        std::fill(ref.begin(), ref.end(), 0.0);
        if (mx > -INFINITY) {
          double sum = c.sink ? std::exp(sinks[h] - mx) : 0.0;
          for (double x : s) sum += std::exp(x - mx);
          ref_lse = mx + std::log(sum);
          for (int j = 0; j < len_k(bi); ++j) {
            if (s[j] == -INFINITY) continue;
            double pj = std::exp(s[j] - ref_lse);
            if (c.dropout > 0) pj = kept(bi, h, i, j) ? pj / (1.0 - c.dropout) : 0.0;
            for (int e = 0; e < dv; ++e) ref[e] += pj * v.at(bq, k_start(bi) + j, hk, e);
          }
        }
        if (bwd && mx > -INFINITY) {
          // The gradient of sum(dO * out): P = exp(s - lse) (the sink in lse), dP = dO.v_j / (1 - p)
          // where kept (else 0), D = sum_j P dP = rowsum(dO * out), dS = P (dP - D); through the
          // softcap's tanh and the scale to q.k (ALiBi and bias are constants).
          const double rd = c.dropout > 0 ? 1.0 / (1.0 - c.dropout) : 1.0;
          pr.assign(len_k(bi), 0.0), dpr.assign(len_k(bi), 0.0), keeps.assign(len_k(bi), 1);
          double D = 0;
          for (int j = 0; j < len_k(bi); ++j) {
            if (!vis[j]) continue;  // (a seen -inf score: P = 0, and 0 * an inf k is NaN in dq, as in torch)
            pr[j] = std::exp(s[j] - ref_lse);
            if (c.dropout > 0) keeps[j] = kept(bi, h, i, j);
            double dot = 0;
            for (int e = 0; e < dv; ++e) dot += double(dout.at(bq, qr, h, e)) * v.at(bq, k_start(bi) + j, hk, e);
            dpr[j] = keeps[j] ? dot * rd : 0.0;
            D += pr[j] * dpr[j];
          }
          for (int j = 0; j < len_k(bi); ++j) {
            if (!vis[j]) continue;
            const int64_t kr = k_start(bi) + j;
            const double dx = pr[j] * (dpr[j] - D) * dts[j] * p.scale;  // d / d (q.k)
            const double mx = pr[j] * (std::fabs(dpr[j]) + std::fabs(D)) * dts[j] * p.scale;
            for (int e = 0; e < c.d; ++e) {
              add(0, dq.index(bq, qr, h, e), dx * k.at(bq, kr, hk, e), mx * k.at(bq, kr, hk, e));
              add(1, dk.index(bq, kr, hk, e), dx * q.at(bq, qr, h, e), mx * q.at(bq, qr, h, e));
            }
            const double pd = keeps[j] ? pr[j] * rd : 0.0;  // the dropped P
            for (int e = 0; e < dv; ++e) {
              const double term = pd * dout.at(bq, qr, h, e);
              add(2, dvt.index(bq, kr, hk, e), term, term);
            }
          }
        }
        const size_t li = size_t(bq) * c.hq * lse_row + h * lse_row + qr;
        owned_lse[li] = 1;
        for (int e = 0; e < dv; ++e) owned_out[out.index(bq, qr, h, e)] = 1;
        if (c.nan_row && bi == 0 && h == 0 && i == 0) {  // observed only: what does the kernel give?
          int nans = 0, poisoned = 0;
          for (int e = 0; e < dv; ++e) {
            const float x = out.at(bq, qr, h, e);
            nans += std::isnan(x) && !is_poison(x), poisoned += is_poison(x);
          }
          char note[256];
          const bool expected = nans == dv && std::isnan(lse[li]) && !is_poison(lse[li]);
          std::snprintf(note, sizeof note,
                        "NaN query row: %d of %d out values NaN (%d unwritten), out[0] = %g, lse = %g%s", nans, dv,
                        poisoned, out.at(bq, qr, h, 0), lse[li], expected ? " (as expected)" : " (expected all NaN)");
          res.nan_note = note;
          continue;
        }
        auto judge = [&](float x, double r, long& bad) {
          if (std::isnan(r) || std::isnan(x)) {  // (nan_v) NaN exactly where the reference has it
            if (std::isnan(r) != std::isnan(x) || is_poison(x)) ++bad, res.worst = INFINITY;
            return;
          }
          if (std::isinf(r) || std::isinf(x)) {  // -inf lse of an empty row: exactly
            if (x != r) ++bad, res.worst = INFINITY;
            return;
          }
          const double e = std::fabs(x - r) / (1.0 + std::fabs(r));
          if (!(e <= tol)) ++bad;
          res.worst = std::isnan(e) ? INFINITY : std::max(res.worst, e);
        };
        judge(lse[li], ref_lse, res.bad_lse);
        for (int e = 0; e < dv; ++e) judge(out.at(bq, qr, h, e), ref[e], res.bad_out);
      }
  // Everything else keeps the poison: padding, varlen rows outside every sequence.
  for (size_t i = 0; i < out.data.size(); ++i) res.stray += !owned_out[i] && !is_poison(out.data[i]);
  for (size_t i = 0; i < lse.size(); ++i) res.stray += !owned_lse[i] && !is_poison(lse[i]);
  res.ok = res.bad_out == 0 && res.bad_lse == 0 && res.stray == 0;
  if (!bwd) return res;

  // ---- the backward, on the forward's out and lse ----
  res.bwd = true;
  BwdParams bp;
  static_cast<FwdParams&>(bp) = p;
  bp.dout = device_copy(dout, c.dtype);
  bp.do_batch_stride = dout.bs, bp.do_row_stride = dout.rs, bp.do_head_stride = dout.hs;
  bp.dq_batch_stride = dq.bs, bp.dq_row_stride = dq.rs, bp.dq_head_stride = dq.hs;
  bp.dk_batch_stride = dk.bs, bp.dk_row_stride = dk.rs, bp.dk_head_stride = dk.hs;
  bp.dv_batch_stride = dvt.bs, bp.dv_row_stride = dvt.rs, bp.dv_head_stride = dvt.hs;
  bp.deterministic = c.deterministic;
  bp.dq_accum = nullptr;  // (the workspace's, as the backend passes it)
  bp.dsink = nullptr;     // the sink's gradient is run_bwd_dsink's (another file): not called
  // The workspace as the backend sizes it (launch.h's bwd_workspace_layout), 256-byte aligned and
  // poisoned, plus 1 KB of slack that must stay poisoned too. D is float[b * hq * sq] at d_offset.
  const cuda::BwdWorkspace wl = cuda::bwd_workspace_layout(bp);
  const size_t d_rows = size_t(nseq) * c.hq * sq, ws_floats = (wl.bytes + 1024) / 4;
  if (wl.d_offset % 4 != 0 || wl.d_offset + 4 * d_rows > wl.bytes) {
    std::printf("workspace layout: D at byte %zu, %zu floats, past its %zu bytes\n", wl.d_offset, d_rows, wl.bytes);
    std::exit(2);
  }
  std::unique_ptr<float[], decltype(&std::free)> ws(
      static_cast<float*>(std::aligned_alloc(256, (ws_floats * 4 + 255) / 256 * 256)), &std::free);
  bp.workspace = ws.get(), bp.workspace_bytes = wl.bytes;
  // The inputs, to check that the backward leaves them as they are.
  const std::vector<float> in_copy[6] = {q.data, k.data, v.data, out.data, lse, dout.data};
  const std::vector<float>* in_now[6] = {&q.data, &k.data, &v.data, &out.data, &lse, &dout.data};
  auto run_bwd = [&] {
    for (Tensor* t : grads) std::fill(t->data.begin(), t->data.end(), poison());
    bp.dq = device_copy(dq, c.dtype), bp.dk = device_copy(dk, c.dtype), bp.dv = device_copy(dvt, c.dtype);
    std::fill(ws.get(), ws.get() + ws_floats, poison());
    emu_device = bwd_device(c.device);
    blockDim = dim3(0);
    res.tc_bwd = bwd_takes_tensor_cores(bp);
    const auto t0 = std::chrono::steady_clock::now();
    kernel_bwd(bp);
    res.bwd_secs += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    for (Tensor* t : grads) host_copy(*t, c.dtype);
  };
  try {
    run_bwd();
  } catch (const Error& e) {
    if (e.kind() != ErrorKind::kNotImplemented) throw;
    res.unsupported = std::string("backward: ") + e.what();
    res.bwd = false;
    return res;
  }
  res.bwd_threads = blockDim.x;
  std::vector<char> owned[3];
  for (int t = 0; t < 3; ++t) owned[t].assign(grads[t]->data.size(), 0);
  for (int bi = 0; bi < nseq; ++bi) {
    for (int h = 0; h < c.hq; ++h)
      for (int i = 0; i < len_q(bi); ++i)
        for (int e = 0; e < c.d; ++e) owned[0][dq.index(seq_b(bi), q_start(bi) + i, h, e)] = 1;
    for (int h = 0; h < c.hkv; ++h)
      for (int j = 0; j < len_k(bi); ++j) {
        for (int e = 0; e < c.d; ++e) owned[1][dk.index(seq_b(bi), k_start(bi) + j, h, e)] = 1;
        for (int e = 0; e < dv; ++e) owned[2][dvt.index(seq_b(bi), k_start(bi) + j, h, e)] = 1;
      }
  }
  for (int t = 0; t < 3; ++t) {
    double mx = 0, mm = 0;
    for (size_t i = 0; i < g_ref[t].size(); ++i)
      if (owned[t][i] && std::isfinite(g_ref[t][i]) && std::isfinite(g_mag[t][i]))  // (nan_v, inf_k)
        mx = std::max(mx, std::fabs(g_ref[t][i])), mm = std::max(mm, g_mag[t][i]);
    res.max_ref[t] = mx, res.scale[t] = mm;
    const std::vector<float>& x = grads[t]->data;
    for (size_t i = 0; i < x.size(); ++i) {
      if (!owned[t][i]) {
        res.bwd_stray += !is_poison(x[i]);
        continue;
      }
      if (std::isnan(g_ref[t][i]) || std::isnan(x[i])) {  // (nan_v) NaN exactly where the reference has it
        if (std::isnan(g_ref[t][i]) != std::isnan(x[i]) || is_poison(x[i])) ++res.bad_g[t], res.worst_g[t] = INFINITY;
        continue;
      }
      if (!g_reached[t][i]) {  // no term: exactly 0
        if (x[i] != 0.f) ++res.bad_g[t], res.worst_g[t] = INFINITY;
        continue;
      }
      const double diff = std::fabs(x[i] - g_ref[t][i]);
      const double e = diff == 0 ? 0.0 : diff / mm;  // (mm = 0: every term 0, x must be too)
      if (!(e <= gtol)) ++res.bad_g[t];
      res.worst_g[t] = std::isnan(e) ? INFINITY : std::max(res.worst_g[t], e);
    }
  }
  for (Tensor* t : {&q, &k, &v, &out, &dout}) host_copy(*t, c.dtype);  // (16-bit: what the kernels left there)
  for (int t = 0; t < 6; ++t) res.bwd_stray += std::memcmp(in_copy[t].data(), in_now[t]->data(), 4 * in_copy[t].size()) != 0;
  for (size_t i = 0; i < ws_floats; ++i) {
    const bool in_d = i >= wl.d_offset / 4 && i < wl.d_offset / 4 + d_rows;
    // The atomic-dQ backward's accumulator (after D) is its own to write.
    const bool in_acc = !bp.deterministic && i >= wl.dq_accum_offset / 4 && i < wl.bytes / 4;
    if (!in_acc) res.ws_bad += in_d == is_poison(ws[i]);  // D written, the rest untouched
  }
  // Determinism: a second run gives the same bits.
  std::vector<float> first[3];
  for (int t = 0; t < 3; ++t) first[t] = grads[t]->data;
  run_bwd();
  for (int t = 0; t < 3; ++t)
    for (size_t i = 0; i < first[t].size(); ++i)
      res.nondet += std::memcmp(&first[t][i], &grads[t]->data[i], 4) != 0;
  res.ok = res.ok && res.bad_g[0] == 0 && res.bad_g[1] == 0 && res.bad_g[2] == 0 && res.bwd_stray == 0 &&
           res.ws_bad == 0 && res.nondet == 0;
  return res;
}

// Rough emulation cost (CTAs x key tiles, plus the start of each CTA's 128 threads): random
// cases are shrunk to a budget so that the run stays short on a 2-core machine.
long cost(const Case& c) {
  const bool varlen = !c.lq.empty();
  long total = 0;
  for (int bi = 0; bi < (varlen ? int(c.lq.size()) : c.b); ++bi) {
    const int lq = varlen ? c.lq[bi] : c.sq, lk = varlen ? c.lk[bi] : c.sk;
    total += long(c.hq) * ((lq + 15) / 16) * (2 + (lk + 31) / 32);
  }
  return total;
}

// A random case's features (both harnesses' odds): causal, a window, softcap, ALiBi, a sink, a bias,
// varlen (up to max_seqs sequences of up to max_len rows, 1 in 5 empty), the causal alignment, the
// layout and dropout.
void random_features(Case& c, int max_seqs, int max_len) {
  c.causal = randint(0, 2) == 0;
  if (randint(0, 3) == 0) c.wl = randint(-1, 64), c.wr = randint(-1, 16);
  if (randint(0, 4) == 0) c.softcap = uniform(2.f, 20.f);
  if (randint(0, 4) == 0) c.alibi = randint(1, 2);
  c.sink = randint(0, 4) == 0;
  if (randint(0, 3) == 0) c.bias = randint(1, 4);
  if (randint(0, 3) == 0) {
    const int n = randint(1, max_seqs);
    auto len = [&] { return randint(0, 4) == 0 ? 0 : randint(1, max_len); };
    for (int i = 0; i < n; ++i) c.lq.push_back(len()), c.lk.push_back(len());
    c.q0 = randint(0, 3);
  }
  c.top_left = randint(0, 3) == 0;
  c.layout = randint(0, 2);
  if (randint(0, 5) == 0) c.dropout = uniform(0.1f, 0.6f), c.rng_state = randint(0, 1);
}

Case random_case() {
  Case c;
  const int heads[3][2] = {{1, 1}, {4, 2}, {8, 1}};
  const int* hh = heads[randint(0, 2)];
  c.hq = hh[0], c.hkv = hh[1];
  c.b = randint(1, 3);
  auto len = [] { return randint(0, 5) == 0 ? randint(1, 3) : randint(1, 300); };
  c.sq = len(), c.sk = len();
  const int ds[] = {1, 8, 36, 64, 96, 128, 200, 256};
  c.d = ds[randint(0, 7)];
  if (randint(0, 4) == 0) c.dv = ds[randint(0, 7)];
  random_features(c, 4, 200);
  c.device = randint(0, 3) == 0;
  // Scores of a few units: fp32's rounding of a score grows with its size (scales of 0.3-0.5 at
  // d >= 96, or ALiBi biases near 60, gave 4-5e-6 in the outputs, too near the 1e-5 tolerance).
  if (randint(0, 4) == 0) c.scale = uniform(0.5f, 2.f) / std::sqrt(float(c.d));
  // Shrink to the budget: the batch, then lengths down to 48, then heads, then lengths again.
  constexpr long kBudget = 400;
  auto shrink_lengths = [&](int floor) {
    bool any = false;
    for (int* n : {&c.sq, &c.sk}) if (*n > floor) *n = std::max(floor, *n * 2 / 3), any = true;
    for (size_t i = 0; i < c.lq.size(); ++i)
      for (int* n : {&c.lq[i], &c.lk[i]}) if (*n > floor) *n = std::max(floor, *n * 2 / 3), any = true;
    return any;
  };
  while (cost(c) > kBudget) {
    if (c.b > 1 && c.lq.empty()) --c.b;
    else if (shrink_lengths(48)) continue;
    else if (c.hq > c.hkv && c.hq > 2) c.hq /= 2;
    else shrink_lengths(1);
  }
  return c;
}

std::vector<Case> fixed_cases() {
  std::vector<Case> v;
  auto add = [&](auto f) { Case c; f(c); v.push_back(c); };
  add([](Case& c) { c.sq = 1, c.sk = 1, c.d = 1; });
  add([](Case& c) { c.sq = 1, c.sk = 300, c.hq = 8, c.hkv = 1, c.d = 128; });  // a decode step
  add([](Case& c) { c.sq = 300, c.sk = 1, c.hq = 4, c.hkv = 2, c.d = 36; });
  add([](Case& c) { c.b = 2, c.sq = 37, c.sk = 71, c.hq = 4, c.hkv = 2, c.d = 256, c.causal = true; });
  add([](Case& c) { c.sq = 50, c.sk = 13, c.d = 8, c.causal = true; });  // rows 0..36 see nothing
  add([](Case& c) { c.sq = 50, c.sk = 13, c.d = 8, c.causal = true, c.sink = true; });  // ... then out 0, lse = sink
  add([](Case& c) { c.sq = 40, c.sk = 60, c.d = 64, c.dv = 200, c.wl = 5, c.wr = 3; });
  add([](Case& c) { c.sq = 70, c.sk = 20, c.d = 96, c.dv = 8, c.wl = 2, c.wr = 1; });  // rows 0..48: empty windows
  add([](Case& c) { c.sq = 33, c.sk = 65, c.hq = 8, c.hkv = 1, c.d = 200, c.softcap = 5.f, c.alibi = 2, c.b = 2; });
  add([](Case& c) { c.sq = 45, c.sk = 45, c.hq = 4, c.hkv = 2, c.d = 64, c.bias = 2, c.layout = 1; });  // bool mask
  add([](Case& c) { c.b = 2, c.sq = 20, c.sk = 90, c.hq = 4, c.hkv = 2, c.d = 36, c.bias = 1, c.causal = true; });
  add([](Case& c) { c.sq = 31, c.sk = 47, c.hq = 4, c.hkv = 2, c.d = 64, c.bias = 3, c.alibi = 1, c.layout = 2; });
  add([](Case& c) { c.b = 2, c.sq = 17, c.sk = 33, c.d = 128, c.bias = 4, c.sink = true, c.wl = 10; });
  add([](Case& c) { c.b = 3, c.sq = 40, c.sk = 70, c.hq = 4, c.hkv = 2, c.d = 64, c.dropout = 0.3f; });
  add([](Case& c) {
    c.sq = 64, c.sk = 64, c.hq = 8, c.hkv = 1, c.d = 96, c.dropout = 0.5f, c.causal = c.sink = c.rng_state = true;
  });
  // Varlen, with empty sequences (q, k or both) and packed rows that no sequence owns.
  add([](Case& c) { c.hq = 4, c.hkv = 2, c.d = 64, c.lq = {30, 0, 17, 5}, c.lk = {40, 9, 0, 50}, c.q0 = 3; });
  add([](Case& c) { c.hq = 4, c.hkv = 2, c.d = 64, c.lq = {0, 21}, c.lk = {0, 40}, c.causal = true; });
  add([](Case& c) {
    c.hq = 8, c.hkv = 1, c.d = 36, c.lq = {1, 60}, c.lk = {80, 33}, c.layout = 1;
    c.top_left = c.causal = c.sink = true;
  });
  add([](Case& c) {
    c.hq = 4, c.hkv = 2, c.d = 128, c.dv = 64, c.lq = {25, 7}, c.lk = {19, 64}, c.bias = 2, c.wl = 8, c.layout = 2;
  });
  add([](Case& c) { c.sq = 20, c.sk = 50, c.top_left = true, c.causal = true, c.d = 8, c.alibi = 1; });
  add([](Case& c) { c.sq = 16, c.sk = 300, c.hq = 1, c.d = 256, c.dv = 1, c.scale = 0.3f; });
  // A saturated softcap (scale * q.k of sd 3 against a cap of 1): the backward's tanh derivative near 0.
  add([](Case& c) { c.sq = 40, c.sk = 60, c.d = 64, c.softcap = 1.f, c.scale = 0.4f, c.causal = true; });
  // The 2-warp CTA (device 1, main).
  add([](Case& c) {
    c.b = 2, c.sq = 37, c.sk = 71, c.hq = 4, c.hkv = 2, c.d = 256, c.causal = c.sink = true;
    c.device = 1;
  });
  add([](Case& c) {
    c.hq = 8, c.hkv = 1, c.d = 256, c.lq = {9, 0, 40}, c.lk = {33, 5, 70}, c.dropout = 0.2f, c.bias = 1, c.wl = 20;
    c.device = 1;
  });
  // The tensor-core kernels' accumulator widths at their edges (kOutTiles 8 / 16 / 32), the
  // backward's dQ and dK / dV on different widths, head dims far from a multiple of 8, a window
  // whose warps skip the middle tiles, GQA with a bias and dropout, and the dQ / dK-dV shared
  // memory at d = dv = 128 exactly at device 2's 99 KB (sm_86 / sm_89).
  add([](Case& c) { c.sq = 40, c.sk = 70, c.d = 72, c.dv = 136, c.causal = true; });
  add([](Case& c) { c.sq = 40, c.sk = 70, c.hq = 2, c.d = 8, c.dv = 128, c.softcap = 4.f; });
  add([](Case& c) { c.sq = 70, c.sk = 40, c.hq = 2, c.d = 128, c.dv = 8, c.alibi = 1; });
  add([](Case& c) { c.sq = 33, c.sk = 41, c.hq = 2, c.d = 3, c.causal = true; });
  add([](Case& c) { c.sq = 33, c.sk = 41, c.d = 17, c.dv = 65, c.wl = 9, c.wr = 0; });
  add([](Case& c) { c.sq = 300, c.sk = 300, c.d = 32, c.wl = 8, c.wr = 3; });
  add([](Case& c) { c.b = 2, c.sq = 40, c.sk = 75, c.hq = 8, c.hkv = 1, c.d = 128, c.bias = 1, c.dropout = 0.25f; });
  add([](Case& c) { c.sq = 40, c.sk = 70, c.hq = 2, c.d = 128, c.causal = true, c.device = 1; });
  // A NaN in the query: out and lse of that row NaN expected, printed rather than judged.
  add([](Case& c) { c.sq = 20, c.sk = 50, c.d = 64, c.nan_row = true; });
  add([](Case& c) { c.sq = 20, c.sk = 50, c.d = 64, c.nan_row = true, c.sink = true, c.causal = true; });
  // The GPU's NaN in v, forward and backward (the tf32 split once turned it into -0: dropped).
  add([](Case& c) { c.sq = 20, c.sk = 50, c.d = 64, c.nan_v = true; });
  add([](Case& c) { c.sq = 40, c.sk = 70, c.hq = 4, c.hkv = 2, c.d = 128, c.dv = 96, c.sink = true, c.nan_v = true; });
  // +-inf in k: -inf scores must mask their key, not turn NaN (the split once made them NaN).
  add([](Case& c) { c.sq = 20, c.sk = 50, c.hq = 2, c.d = 64, c.inf_k = -1; });
  add([](Case& c) { c.sq = 40, c.sk = 70, c.hq = 4, c.hkv = 2, c.d = 40, c.causal = true, c.inf_k = 1; });
  return v;
}

// EMU_SM80: the sm80-class bf16 / fp16 kernels' cases. Devices 0 (227 KB, an H100's opt-in), 3
// (166912, an A100's) and 2 (101376, sm_86 / sm_89's: the backward's compact tiles at d <= 128, the
// forward's one bias stage at d64 / d128, the dQ kernel's one K / V stage at d128). A call no
// kernel of its device fits raises NotImplementedError, as on the GPU: the case is counted as
// skipped (the fixed cases all fit).
Case sm80_random_case() {
  Case c;
  c.dtype = randint(1, 2);
  c.deterministic = randint(0, 1);
  const int heads[3][2] = {{1, 1}, {4, 2}, {4, 1}};
  const int* hh = heads[randint(0, 2)];
  c.hq = hh[0], c.hkv = hh[1];
  c.b = randint(1, 2);
  auto len = [] { return randint(0, 5) == 0 ? randint(1, 3) : randint(1, 160); };
  c.sq = len(), c.sk = len();
  const int ds[] = {16, 32, 59, 64, 80, 96, 128, 160, 192, 256};
  c.d = ds[randint(0, 9)];
  if (randint(0, 5) == 0) c.dv = ds[randint(0, 6)];
  random_features(c, 3, 130);
  const int devices[3] = {0, 3, 2};
  c.device = devices[randint(0, 2)];
  return c;
}

std::vector<Case> sm80_fixed_cases() {
  std::vector<Case> v;
  auto add = [&](auto f) { Case c; c.dtype = 1; f(c); v.push_back(c); };
  // sm_86 / sm_89 (99 KB): the compact backward at every bucket up to 128, both modes.
  for (int d : {32, 64, 96, 128})
    for (int det : {0, 1})
      add([&](Case& c) {
        c.b = 2, c.sq = 150, c.sk = 133, c.hq = 4, c.hkv = 2, c.d = d, c.causal = d % 64 == 0, c.deterministic = det;
        c.device = 2, c.dtype = 1 + det;
      });
  add([](Case& c) { c.sq = 140, c.sk = 140, c.hq = 2, c.d = 59, c.dropout = 0.2f, c.device = 2, c.causal = true; });
  add([](Case& c) { c.sq = 100, c.sk = 170, c.hq = 4, c.hkv = 1, c.d = 128, c.dropout = 0.3f, c.device = 2, c.deterministic = false; });
  add([](Case& c) { c.sq = 90, c.sk = 110, c.hq = 2, c.d = 64, c.wl = 20, c.wr = 5, c.softcap = 8.f, c.alibi = 1, c.device = 2; });
  add([](Case& c) { c.hq = 4, c.hkv = 2, c.d = 96, c.lq = {30, 0, 70}, c.lk = {50, 9, 66}, c.q0 = 2, c.causal = true, c.device = 2; });
  // The two-pass backward there: d160 on two Q / dO stages, d192 on one (the forward: the d256 kernel).
  add([](Case& c) { c.sq = 100, c.sk = 90, c.hq = 2, c.d = 160, c.causal = true, c.device = 2, c.deterministic = false; });
  add([](Case& c) { c.b = 2, c.sq = 80, c.sk = 100, c.hq = 4, c.hkv = 2, c.d = 192, c.dv = 128, c.device = 2; });
  add([](Case& c) {
    c.sq = 70, c.sk = 120, c.hq = 2, c.d = 192, c.causal = true, c.dropout = 0.25f, c.device = 2, c.deterministic = false;
  });
  add([](Case& c) { c.sq = 60, c.sk = 75, c.hq = 2, c.d = 176, c.softcap = 6.f, c.device = 2, c.dtype = 2; });
  // attn_bias on one forward bias stage (99 KB, d64 / d128) and on the compact backward (an A100 at d64 too).
  add([](Case& c) { c.b = 2, c.sq = 70, c.sk = 150, c.hq = 2, c.d = 64, c.bias = 1, c.device = 2, c.deterministic = false; });
  add([](Case& c) { c.sq = 70, c.sk = 150, c.hq = 2, c.d = 128, c.bias = 2, c.device = 2, c.deterministic = false; });
  add([](Case& c) { c.sq = 90, c.sk = 90, c.hq = 2, c.d = 64, c.bias = 3, c.device = 2, c.deterministic = true, c.dtype = 2; });
  add([](Case& c) { c.sq = 130, c.sk = 70, c.hq = 2, c.d = 64, c.bias = 4, c.device = 3, c.deterministic = false; });
  // The regular tiles (an H100's and an A100's shared memory) at every bucket.
  for (int d : {32, 64, 96, 128, 160, 192, 256})
    add([&](Case& c) {
      c.sq = 130, c.sk = 150, c.hq = 2, c.d = d, c.causal = d >= 128, c.deterministic = d % 64 != 0;
      c.device = d == 96 || d == 192 ? 3 : 0;
    });
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  // Device 1: an opt-in of 76 KB, under the forward's 4-warp CTA at d = dv = 256 (83 KB) and over
  // its 2-warp one (74 KB), so that those cases run the 2-warp shape (no real GPU is this size).
  // Device 2: 99 KB, the backward's device for device-1 cases (bwd_device).
  emu_smem_optin[1] = 76 * 1024;
  emu_smem_optin[2] = 99 * 1024;
  emu_smem_optin[3] = 166912;  // (EMU_SM80) an A100's
  bool fwd_only = false, bwd_only = false;
  std::vector<const char*> args;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--fwd")) fwd_only = true;
    else if (!std::strcmp(argv[i], "--bwd")) bwd_only = true;
    else if (argv[i][0] == '-' && argv[i][1] == '-') {
      std::printf("usage: emu_test [--fwd | --bwd] [random cases] [seed]\n");
      return 2;
    } else args.push_back(argv[i]);
  }
  const int n_random = args.size() > 0 ? std::atoi(args[0]) : 40;
  if (args.size() > 1) rng.seed(std::strtoull(args[1], nullptr, 10));
  std::vector<Case> cases = kSm80 ? sm80_fixed_cases() : fixed_cases();
  const size_t n_fixed = cases.size();
  for (int i = 0; i < n_random; ++i) cases.push_back(kSm80 ? sm80_random_case() : random_case());
  if (fwd_only)
    for (Case& c : cases) c.bwd = false;
  const auto t0 = std::chrono::steady_clock::now();
  int passed = 0, run = 0, bwd_run = 0, tc_fwd = 0, tc_bwd = 0, skipped = 0;
  double worst[3] = {0, 0, 0}, worst_g[3][3] = {}, bwd_secs = 0;  // per dtype (fp32, bf16, fp16)
  int of_dtype[3] = {0, 0, 0};
  const bool verbose = std::getenv("EMU_VERBOSE") != nullptr;  // a line for every case
  for (size_t id = 0; id < cases.size(); ++id) {
    const bool bwd = cases[id].bwd && !cases[id].nan_row;
    if (bwd_only && !bwd) continue;  // (case numbers stay those of the full list)
    ++run;
    const auto c0 = std::chrono::steady_clock::now();
    const Result r = run_case(cases[id]);
    if (!r.unsupported.empty()) {  // a fixed case must fit its device
      const bool fixed = id < n_fixed;
      skipped += !fixed, passed += !fixed;
      if (fixed || verbose)
        std::printf("%s case %3zu %s: %s\n", fixed ? "FAIL" : "skip", id, describe(cases[id]).c_str(),
                    r.unsupported.c_str());
      continue;
    }
    const int dt = cases[id].dtype;
    if (r.ok) {
      ++passed, ++of_dtype[dt], worst[dt] = std::max(worst[dt], r.worst);
      for (int t = 0; t < 3; ++t) worst_g[dt][t] = std::max(worst_g[dt][t], r.worst_g[t]);
    }
    bwd_run += r.bwd, bwd_secs += r.bwd_secs;
    tc_fwd += r.tc_fwd, tc_bwd += r.bwd && r.tc_bwd;
    if (!r.ok || verbose) {
      std::printf("%s case %3zu %s: worst err %.3g (tol %.0e), %ld out / %ld lse beyond it, %ld stray writes; "
                  "%u threads, %s, %.2f s\n",
                  r.ok ? "ok  " : "FAIL", id, describe(cases[id]).c_str(), r.worst, fwd_tol(cases[id].dtype), r.bad_out, r.bad_lse,
                  r.stray, r.threads, r.tc_fwd ? "tensor cores" : "SIMT",
                  std::chrono::duration<double>(std::chrono::steady_clock::now() - c0).count());
      if (r.bwd)
        std::printf("     bwd: worst err dq %.3g dk %.3g dv %.3g (tol %.0e; scale %.3g %.3g %.3g, max |ref| %.3g %.3g "
                    "%.3g), %ld / %ld / %ld beyond it, %ld stray writes, %ld workspace, %ld nondeterministic; "
                    "%u threads, %s, %.2f s\n",
                    r.worst_g[0], r.worst_g[1], r.worst_g[2], bwd_tol(cases[id].dtype), r.scale[0], r.scale[1], r.scale[2],
                    r.max_ref[0], r.max_ref[1], r.max_ref[2], r.bad_g[0], r.bad_g[1], r.bad_g[2], r.bwd_stray,
                    r.ws_bad, r.nondet, r.bwd_threads, r.tc_bwd ? "tensor cores" : "SIMT", r.bwd_secs);
    }
    if (!r.nan_note.empty())
      std::printf("note case %3zu %s: %s\n", id, describe(cases[id]).c_str(), r.nan_note.c_str());
    std::fflush(stdout);
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%d/%d passed (%d with the backward", passed, run, bwd_run);
  if (skipped) std::printf("; %d random cases skipped: no kernel fits their device", skipped);
  std::printf(")");
  const char* names[3] = {"fp32", "bf16", "fp16"};
  for (int dt = 0; dt < 3; ++dt) {
    if (!of_dtype[dt]) continue;
    std::printf("; worst passing err (%s): fwd %.3g (tol %.0e)", names[dt], worst[dt], fwd_tol(dt));
    if (bwd_run)
      std::printf(", bwd dq %.3g dk %.3g dv %.3g (tol %.0e)", worst_g[dt][0], worst_g[dt][1], worst_g[dt][2],
                  bwd_tol(dt));
  }
  std::printf("; tensor cores ran %d of %d forwards, %d of %d backwards; %.1f s (backward %.1f s)\n", tc_fwd, run,
              tc_bwd, bwd_run, secs, bwd_secs);
  return passed == run ? 0 : 1;
}
