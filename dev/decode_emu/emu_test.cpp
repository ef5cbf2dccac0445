// Runs the CUDA decode kernels (decode_kernel.cu, CPU-emulated: see shim/) against the CPU
// backend on random cases. Build and run: dev/decode_emu/run.sh
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime.h>  // the shim's: emulated devices

#include "core/decode_backend.h"
#include "orchard/decode_params.h"
#include "orchard/numeric.h"

using namespace orchard;

struct Case {
  DType dt = DType::kBFloat16;
  int b = 2, sq = 1, hq = 4, hkv = 2, d = 64, cap = 160, s_new = 0, page = 0;
  bool batch_idx = false, leftpad = false, lse = true, full = false;
  int rotary_dim = 0;
  bool interleaved = true;
  long wl = -1, wr = -1;
  bool causal = false;
  float softcap = 0.f;
  int alibi = 0;  // 0 none, 1 (hq,), 2 (b, hq)
  int splits = 1; // 0: the CUDA heuristic
  float scale = 0.f;
  bool nan_row = false;  // a NaN in q's first row (batch 0, head 0): NaN out and LSE there
  int device = 0;  // the emulated device: 1 has sm_86 / sm_89's 99 KB shared-memory opt-in (main)
};

static std::mt19937_64 rng(1234);
static float randn() { static std::normal_distribution<float> n(0.f, 1.f); return n(rng); }
static int randint(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); }  // inclusive

struct Buf {
  DType dt;
  std::vector<unsigned char> bytes;
  Buf(DType t, size_t n) : dt(t), bytes(n * es(t) + 64) {}
  static size_t es(DType t) { return t == DType::kFloat32 ? 4 : 2; }
  void* data() { return bytes.data(); }
  void set(size_t i, float v) {
    if (dt == DType::kFloat32) std::memcpy(&bytes[4 * i], &v, 4);
    else { std::uint16_t h = dt == DType::kBFloat16 ? float_to_bf16(v) : float_to_fp16(v); std::memcpy(&bytes[2 * i], &h, 2); }
  }
  float get(size_t i) const {
    if (dt == DType::kFloat32) { float v; std::memcpy(&v, &bytes[4 * i], 4); return v; }
    std::uint16_t h; std::memcpy(&h, &bytes[2 * i], 2);
    return dt == DType::kBFloat16 ? bf16_to_float(h) : fp16_to_float(h);
  }
  size_t n() const { return (bytes.size() - 64) / es(dt); }
};

static int run_case(const Case& c, int id) {
  const int groups = c.hq / c.hkv;
  (void)groups;
  int cap = c.cap, nblocks = 0, per_seq = 0;
  if (c.page) { per_seq = (cap + c.page - 1) / c.page; cap = per_seq * c.page; nblocks = c.b * per_seq + 3; }
  const int cb = c.page ? nblocks : (c.batch_idx ? c.b + 2 : c.b);
  const int rows_per_cb = c.page ? c.page : cap;
  const size_t cache_n = (size_t)cb * rows_per_cb * c.hkv * c.d;
  Buf kc(c.dt, cache_n), vc(c.dt, cache_n), q(c.dt, (size_t)c.b * c.sq * c.hq * c.d);
  for (size_t i = 0; i < cache_n; ++i) kc.set(i, randn()), vc.set(i, randn());
  for (size_t i = 0; i < q.n(); ++i) q.set(i, randn());
  if (c.nan_row) q.set(0, std::nanf(""));
  Buf kn(c.dt, (size_t)c.b * std::max(c.s_new, 1) * c.hkv * c.d), vn = kn;
  for (size_t i = 0; i < kn.n(); ++i) kn.set(i, randn()), vn.set(i, randn());
  std::vector<std::int32_t> seqlens(c.b), leftpad(c.b), bidx(c.b), table;
  const int hi = cap - c.s_new;
  for (int i = 0; i < c.b; ++i) seqlens[i] = c.full ? hi : randint(std::max(0, hi / 2), hi);
  seqlens[0] = hi;
  for (int i = 0; i < c.b; ++i) leftpad[i] = randint(0, seqlens[i]);
  if (c.batch_idx) {
    std::vector<int> perm(cb);
    for (int i = 0; i < cb; ++i) perm[i] = i;
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int i = 0; i < c.b; ++i) bidx[i] = perm[i];
  }
  if (c.page) {
    std::vector<int> perm(nblocks);
    for (int i = 0; i < nblocks; ++i) perm[i] = i;
    std::shuffle(perm.begin(), perm.end(), rng);
    table.assign(perm.begin(), perm.begin() + c.b * per_seq);
  }
  const int ro_len = cap + 8, rh = c.rotary_dim / 2;
  Buf cosb(c.dt, (size_t)ro_len * std::max(rh, 1)), sinb = cosb;
  for (int i = 0; i < ro_len * rh; ++i) {
    const float a = std::uniform_real_distribution<float>(0.f, 6.2831853f)(rng);
    cosb.set(i, std::cos(a)), sinb.set(i, std::sin(a));
  }
  std::vector<float> slopes((c.alibi == 2 ? c.b : 1) * c.hq);
  for (auto& s : slopes) s = std::uniform_real_distribution<float>(0.f, 0.2f)(rng);

  DecodeParams p;
  p.q = q.data();
  p.k_cache = kc.data(), p.v_cache = vc.data();
  p.q_batch_stride = (std::int64_t)c.sq * c.hq * c.d, p.q_row_stride = c.hq * c.d, p.q_head_stride = c.d;
  p.kc_batch_stride = p.vc_batch_stride = (std::int64_t)rows_per_cb * c.hkv * c.d;
  p.kc_row_stride = p.vc_row_stride = c.hkv * c.d;
  p.kc_head_stride = p.vc_head_stride = c.d;
  if (c.s_new) {
    p.k_new = kn.data(), p.v_new = vn.data();
    p.kn_batch_stride = p.vn_batch_stride = (std::int64_t)c.s_new * c.hkv * c.d;
    p.kn_row_stride = p.vn_row_stride = c.hkv * c.d;
    p.kn_head_stride = p.vn_head_stride = c.d;
    p.s_new = c.s_new;
  }
  p.o_batch_stride = p.q_batch_stride, p.o_row_stride = p.q_row_stride, p.o_head_stride = p.q_head_stride;
  p.lse_batch_stride = (std::int64_t)c.hq * c.sq, p.lse_head_stride = c.sq;
  p.b = c.b, p.sq = c.sq, p.hq = c.hq, p.hkv = c.hkv, p.d = c.d;
  p.capacity = cap, p.cache_batch = cb;
  p.cache_seqlens = seqlens.data();
  p.cache_leftpad = c.leftpad ? leftpad.data() : nullptr;
  p.cache_batch_idx = c.batch_idx ? bidx.data() : nullptr;
  if (c.page) p.block_table = table.data(), p.block_table_batch_stride = per_seq, p.page_size = c.page;
  if (c.rotary_dim) {
    p.rotary_cos = cosb.data(), p.rotary_sin = sinb.data(), p.rotary_dtype = c.dt;
    p.cos_row_stride = p.sin_row_stride = rh, p.rotary_seqlen = ro_len, p.rotary_dim = c.rotary_dim;
    p.rotary_interleaved = c.interleaved;
  }
  p.scale = c.scale > 0 ? c.scale : 1.f / std::sqrt((float)c.d);
  p.softcap = c.softcap;
  const long reach = cap + c.sq;
  p.window_left = c.wl >= reach ? -1 : c.wl;
  p.window_right = c.causal ? 0 : (c.wr >= reach ? -1 : c.wr);
  p.causal = p.window_right == 0;
  if (c.alibi) p.alibi_slopes = slopes.data(), p.alibi_batch_stride = c.alibi == 2 ? c.hq : 0;
  p.dtype = c.dt;

  // CPU reference on copies.
  Buf kc_ref = kc, vc_ref = vc, out_ref(c.dt, q.n()), out(c.dt, q.n());
  std::vector<float> lse_ref((size_t)c.b * c.hq * c.sq), lse_o(lse_ref.size(), 12345.f);
  DecodeParams pr = p;
  pr.k_cache = kc_ref.data(), pr.v_cache = vc_ref.data(), pr.out = out_ref.data(), pr.lse = lse_ref.data();
  pr.num_splits = 1;
  detail::decode_cpu(pr);

  int splits = c.splits;
  if (splits == 0) {
    const long rows = (long)c.sq * groups;
    splits = detail::decode_cuda_num_splits((long)c.b * c.hkv, rows, cap, c.d, c.dt, 0);
    splits = std::max(1, std::min(splits, (cap + 63) / 64));
  }
  p.num_splits = splits;
  std::vector<float> ws;
  if (splits > 1) {
    const size_t elems = (size_t)splits * c.b * c.hq * c.sq;
    ws.assign(elems * (c.d + 1) + 16, std::nanf(""));
    p.out_accum = ws.data(), p.lse_accum = ws.data() + elems * c.d;
  }
  for (size_t i = 0; i < out.n(); ++i) out.set(i, std::nanf(""));
  p.out = out.data();
  p.lse = c.lse ? lse_o.data() : nullptr;
  emu_device = c.device;
  detail::decode_cuda(p);
  emu_device = 0;

  const float atol = c.dt == DType::kBFloat16 ? 2e-2f : c.dt == DType::kFloat16 ? 4e-3f : 2e-4f;
  double worst = 0, worst_lse = 0, worst_k = 0, worst_v = 0;
  // NaN where the reference has NaN (a NaN query row) and nowhere else.
  for (size_t i = 0; i < out.n(); ++i) {
    if (std::isnan(out.get(i)) || std::isnan(out_ref.get(i))) {
      if (std::isnan(out.get(i)) != std::isnan(out_ref.get(i))) worst = INFINITY;
      continue;
    }
    worst = std::max(worst, std::fabs((double)out.get(i) - out_ref.get(i)));
  }
  int lse_bad = 0;
  if (c.lse)
    for (size_t i = 0; i < lse_ref.size(); ++i) {
      if (std::isnan(lse_ref[i]) || std::isnan(lse_o[i])) {
        lse_bad += std::isnan(lse_ref[i]) != std::isnan(lse_o[i]);
        continue;
      }
      if (std::isinf(lse_ref[i]) != std::isinf(lse_o[i])) { ++lse_bad; continue; }
      if (!std::isinf(lse_ref[i])) {
        const double e = std::fabs((double)lse_o[i] - lse_ref[i]) / (1e-3 + 1e-3 * std::fabs(lse_ref[i]));
        worst_lse = std::isnan(e) ? INFINITY : std::max(worst_lse, e);
      }
    }
  for (size_t i = 0; i < cache_n; ++i) {
    worst_k = std::max(worst_k, (double)std::fabs(kc.get(i) - kc_ref.get(i)));
    worst_v = std::max(worst_v, (double)std::fabs(vc.get(i) - vc_ref.get(i)));
  }
  const bool ok = worst <= atol && worst_lse <= 1.0 && lse_bad == 0 && worst_k <= 0.05 && worst_v == 0;
  std::printf("%s case %3d dt=%d b=%d sq=%d hq=%d hkv=%d d=%d cap=%d s_new=%d page=%d bidx=%d lp=%d rd=%d il=%d "
              "w=(%ld,%ld) causal=%d softcap=%g alibi=%d splits=%d nan=%d device=%d: out %.3g lse %.3g (%d inf / NaN "
              "mismatches) k %.3g v %.3g\n",
              ok ? "ok  " : "FAIL", id, (int)c.dt, c.b, c.sq, c.hq, c.hkv, c.d, cap, c.s_new, c.page, c.batch_idx,
              c.leftpad, c.rotary_dim, c.interleaved, c.wl, c.wr, c.causal, c.softcap, c.alibi, splits, c.nan_row, c.device, worst,
              worst_lse, lse_bad, worst_k, worst_v);
  return ok ? 0 : 1;
}

int main(int argc, char** argv) {
  emu_smem_optin[1] = 99 * 1024;  // device 1: sm_86 / sm_89's opt-in
  const int n_random = argc > 1 ? std::atoi(argv[1]) : 40;
  if (argc > 2) rng.seed(std::atoll(argv[2]));
  int fails = 0, id = 0;
  std::vector<Case> cases;
  { Case c; cases.push_back(c); }
  { Case c; c.d = 128; c.hq = 8; c.hkv = 1; c.sq = 1; c.cap = 300; cases.push_back(c); }
  { Case c; c.d = 128; c.hq = 32; c.hkv = 32; c.b = 1; c.cap = 700; c.splits = 0; c.s_new = 1; c.page = 256; cases.push_back(c); }
  { Case c; c.d = 256; c.hq = 4; c.hkv = 2; c.sq = 2; c.s_new = 1; c.causal = true; cases.push_back(c); }
  { Case c; c.d = 8; c.sq = 2; c.s_new = 1; c.causal = true; cases.push_back(c); }
  { Case c; c.d = 72; c.hq = 6; c.hkv = 2; c.sq = 3; c.page = 48; c.s_new = 2; c.rotary_dim = 32; c.causal = true; cases.push_back(c); }
  { Case c; c.dt = DType::kFloat16; c.sq = 3; c.s_new = 2; c.rotary_dim = 64; c.interleaved = false; c.page = 16; c.causal = true; cases.push_back(c); }
  { Case c; c.dt = DType::kFloat32; c.sq = 3; c.hq = 4; c.hkv = 2; c.softcap = 5.f; c.alibi = 2; c.scale = 0.3f; c.causal = true; cases.push_back(c); }
  { Case c; c.sq = 4; c.s_new = 1; c.wl = 8; c.wr = 4; c.page = 16; cases.push_back(c); }
  { Case c; c.b = 1; c.sq = 2; c.hq = 8; c.hkv = 2; c.cap = 700; c.page = 16; c.s_new = 1; c.causal = true; c.splits = 50; cases.push_back(c); }
  { Case c; c.b = 3; c.sq = 2; c.s_new = 2; c.leftpad = true; c.page = 32; c.rotary_dim = 32; c.causal = true; cases.push_back(c); }
  { Case c; c.b = 3; c.sq = 2; c.s_new = 2; c.batch_idx = true; c.causal = true; cases.push_back(c); }
  { Case c; c.sq = 5; c.hq = 8; c.hkv = 1; c.d = 128; c.causal = true; c.s_new = 5; cases.push_back(c); }  // 40 rows: 3 chunks
  { Case c; c.b = 1; c.hq = 4; c.hkv = 1; c.d = 64; c.cap = 2000; c.s_new = 1; c.splits = 100; c.causal = true; cases.push_back(c); }  // > 64 splits, empty ones
  // 17-32 rows per kv head (the two-m-tile kernel at d <= 128)
  { Case c; c.sq = 4; c.hq = 16; c.hkv = 2; c.d = 128; c.cap = 300; c.s_new = 2; c.rotary_dim = 32; c.causal = true; c.splits = 3; c.alibi = 1; c.softcap = 4.f; cases.push_back(c); }
  { Case c; c.dt = DType::kFloat16; c.sq = 2; c.hq = 10; c.hkv = 1; c.d = 72; c.cap = 200; c.s_new = 1; c.wl = 30; c.wr = 0; c.page = 16; cases.push_back(c); }
  { Case c; c.b = 3; c.sq = 3; c.hq = 16; c.hkv = 2; c.d = 64; c.cap = 250; c.s_new = 3; c.leftpad = true; c.causal = true; c.splits = 0; cases.push_back(c); }
  for (int i = 0; i < n_random; ++i) {
    Case c;
    const DType dts[] = {DType::kBFloat16, DType::kFloat16, DType::kFloat32};
    c.dt = dts[randint(0, 2)];
    const int ds[] = {8, 16, 32, 40, 64, 80, 128, 136, 192, 256};
    c.d = ds[randint(0, 9)];
    c.hkv = randint(1, 3);
    c.hq = c.hkv * (randint(0, 2) == 0 ? 1 : randint(1, 10));
    c.sq = randint(1, 4);
    c.b = randint(1, 3);
    c.cap = randint(20, 600);
    c.s_new = randint(0, 2) == 0 ? 0 : randint(1, std::min(c.sq + 1, 4));
    const int pages[] = {0, 0, 16, 32, 48, 256};
    c.page = pages[randint(0, 5)];
    c.batch_idx = c.page == 0 && randint(0, 3) == 0;
    c.leftpad = c.page == 0 && randint(0, 3) == 0;
    c.rotary_dim = randint(0, 2) == 0 ? 2 * randint(1, c.d / 2) : 0;
    c.interleaved = randint(0, 1);
    c.causal = randint(0, 1);
    if (randint(0, 3) == 0) c.wl = randint(0, 64), c.wr = randint(-1, 8);
    if (randint(0, 4) == 0) c.softcap = 3.f;
    c.alibi = randint(0, 4) == 0 ? randint(1, 2) : 0;
    const int sp[] = {1, 1, 0, 0, 2, 3, 7};
    c.splits = sp[randint(0, 6)];
    c.lse = randint(0, 3) != 0;
    cases.push_back(c);
  }
  // fp32 caches at d > 128 on a 99 KB device: the 32-thread SIMT kernel (its 64-thread CTA would
  // need up to 153 KB), at each rows-per-CTA variant (4, 8, 16), with splits.
  for (const int hq : {2, 12, 24}) {
    Case c;
    c.dt = DType::kFloat32, c.d = 256, c.hq = hq, c.hkv = 2, c.sq = 1, c.cap = 300, c.s_new = 1, c.causal = true;
    c.splits = hq == 12 ? 3 : 1, c.device = 1;
    cases.push_back(c);
  }
  { Case c; c.dt = DType::kFloat32; c.d = 200; c.hq = 4; c.hkv = 1; c.sq = 2; c.page = 16; c.s_new = 2; c.device = 1; c.splits = 0; cases.push_back(c); }
  // A NaN query row through each kernel (transposed <= 8 rows, 16 and 32 rows per kv head, fp32)
  // with and without splits: session 40's CUDA change (l != 0, the NaN-carrying merge), as on the CPU.
  for (const DType dt : {DType::kBFloat16, DType::kFloat16, DType::kFloat32})
    for (const int hq : {1, 8, 16, 24})
      for (const int splits : {1, 2, 5}) {
        Case c;
        c.dt = dt, c.hq = hq, c.hkv = 1, c.sq = 1, c.d = 64, c.cap = 400, c.splits = splits, c.nan_row = true;
        cases.push_back(c);
      }
  for (const Case& c : cases) fails += run_case(c, id++);
  std::printf("%d of %zu cases failed\n", fails, cases.size());
  return fails != 0;
}
