#include "backends/cpu/few_rows_forward.h"

#include <cstdlib>
#include <cstring>

#include "backends/cpu/gemm_bf16.h"
#include "backends/cpu/stage_buffer.h"
#include "backends/cpu/task_pool.h"
#include "core/decode_backend.h"
#include "core/forward_as_decode.h"
#include "orchard/attention.h"
#include "orchard/decode_params.h"
#include "orchard/kvcache.h"

namespace orchard::cpu {

bool forward_takes_decode_kernel(const FwdParams& p) {
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) return false;
  // bf16 runs the tiled forward on bf16 operands where the CPU has AVX512_BF16 (cheap staging,
  // fast GEMMs): the decode kernel pays for fewer rows there. Elsewhere bf16 tiles run the fp32 path.
  const int max_rows = p.dtype == DType::kBFloat16 && bf16_dot_available() ? kFewRowsMaxRowsBf16Dot : kFewRowsMaxRows;
  if (!orchard::detail::forward_fits_decode_kernel(p, max_rows)) return false;
  const char* env = std::getenv("ORCHARD_CPU_FEW_ROWS");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

void forward_on_decode_kernel(const FwdParams& p) {
  // Split-KV as the kvcache API plans it on the CPU (src/core/kvcache.cpp): keys cut into
  // chunks of at least 256 when the (batch, kv head) pairs are fewer than the threads.
  const std::int64_t pairs = static_cast<std::int64_t>(p.b) * p.hkv;
  DecodeParams d =
      orchard::detail::forward_as_decode(p, clamp_decode_splits(kvcache_num_splits_heuristic(pairs, p.sk, cpu_threads()), p.sk));
  const bool split = d.num_splits > 1;
  const StageBuffer accum(StageSlot::kForward,
                          split ? decode_split_workspace_floats(d.num_splits, p.b, p.hq, p.sq, p.d) * sizeof(float) : 0);
  if (split) place_decode_split_partials(d, accum.as<float>());
  orchard::detail::decode_cpu(d);
}

}  // namespace orchard::cpu
