// The decode (KV-cache) path's own small dispatch: one function per backend,
// called by src/core/kvcache.cpp with validated params.
#pragma once

#include <cstdint>

#include "orchard/decode_params.h"

namespace orchard::detail {

// src/backends/cpu/decode.cpp: append + attention + split combine, OpenMP over
// (batch, kv head, split).
void decode_cpu(const DecodeParams& p);
int decode_cpu_threads();

// src/backends/cuda/decode_kernel.cu when ORCHARD_WITH_CUDA, else a stub in
// src/core/kvcache.cpp that throws "no CUDA backend".
void decode_cuda(const DecodeParams& p);
// Multiprocessors of CUDA device `device` (0 when unknown / no CUDA).
int decode_cuda_num_sms(int device);
// The CUDA split-KV count for `work_items` CTAs (batch x kv heads x row chunks of
// kDecodeCudaRowsPerCta) over at most `max_keys` keys of head dim d and dtype `dtype` on
// device `device` (1 when unknown).
int decode_cuda_num_splits(std::int64_t work_items, std::int64_t max_keys, int d, DType dtype, int device);
// Query rows (of one kv head's group) a CUDA CTA processes together; more rows take
// several CTAs (the split heuristic counts them as work items).
inline constexpr int kDecodeCudaRowsPerCta = 16;

}  // namespace orchard::detail
