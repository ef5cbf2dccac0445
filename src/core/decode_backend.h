// The decode (KV-cache) path's own small dispatch: one function per backend,
// called by src/core/kvcache.cpp with validated params.
#pragma once

#include <cstddef>
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
// Dynamic shared memory (bytes) of the fp32 decode kernel the current device runs for head dim d
// and `rows` query rows per kv head: at d > 128 up to 153 KB, or, on devices whose opt-in is
// smaller (sm_86 / sm_89: 99 KB), its 32-thread variant's 85 KB.
std::size_t decode_cuda_fp32_smem_bytes(int d, std::int64_t rows);
// Multiprocessors of CUDA device `device` (0 when unknown / no CUDA).
int decode_cuda_num_sms(int device);
// The CUDA split-KV count for `heads` (batch x kv heads) query groups of `rows` rows each
// (query heads per kv head x query rows) over at most `max_keys` keys of head dim d and
// dtype `dtype` on device `device` (1 when unknown). The kernel file knows how many rows
// one CTA holds.
int decode_cuda_num_splits(std::int64_t heads, std::int64_t rows, std::int64_t max_keys, int d, DType dtype,
                           int device);
// One strided device-to-host copy: `rows` rows of `row_bytes` bytes, `src_pitch_bytes` apart
// on the device, packed into `dst` on the host.
struct DeviceRows {
  void* dst = nullptr;
  const void* src = nullptr;
  std::size_t row_bytes = 0;
  std::int64_t rows = 0, src_pitch_bytes = 0;
};
// src/backends/cuda/decode_index_copy.cu: runs the copies on `stream` (a cudaStream_t, the
// current device's) and waits for them; false, copying nothing, while the stream is being
// captured into a CUDA graph (a copy and a sync are illegal there).
bool decode_cuda_copy_rows(const DeviceRows* copies, int n, void* stream);
// Query rows (of one kv head's group) of the fp32 CUDA kernel's CTAs.
inline constexpr int kDecodeCudaRowsPerCta = 16;

}  // namespace orchard::detail
