// decode_cuda_copy_rows (core/decode_backend.h): the decode call's index tensors (cache_seqlens,
// cache_leftpad, cache_batch_idx, block_table) read back to the host, so that
// src/core/kvcache.cpp checks their values on CUDA as it does on the CPU — before the kernel
// writes the appended rows into the cache. Host code only (no kernels).
//
// Why copies into pinned memory and one sync, and not a checking kernel: the values are a few
// KB, the copies are asynchronous into page-locked memory (a pageable destination would make
// each copy its own synchronous round trip), and the checks and their messages stay in one
// place (kvcache.cpp) for both backends. kvcache.py's torch version of these checks (until
// session 30) took ~25 small torch ops per call before its one sync.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "backends/cuda/cuda_error.h"
#include "core/decode_backend.h"
#include "orchard/errors.h"

namespace orchard::detail {
namespace {

using cuda::check_cuda;

// One page-locked staging buffer per host thread, grown on demand and kept (the check runs on
// every decode call; cudaHostAlloc costs milliseconds).
struct PinnedBuffer {
  void* data = nullptr;
  std::size_t bytes = 0;
  ~PinnedBuffer() {
    if (data) cudaFreeHost(data);
  }
  void* reserve(std::size_t need) {
    if (need <= bytes) return data;
    if (data) check_cuda(cudaFreeHost(data), "decode index check: cudaFreeHost");
    data = nullptr;
    bytes = 0;
    const std::size_t grown = std::max<std::size_t>(need, 4096);
    check_cuda(cudaHostAlloc(&data, grown, cudaHostAllocDefault), "decode index check: cudaHostAlloc");
    bytes = grown;
    return data;
  }
};

}  // namespace

bool decode_cuda_copy_rows(const DeviceRows* copies, int n, void* stream_handle) {
  auto stream = static_cast<cudaStream_t>(stream_handle);
  // Inside CUDA-graph capture a copy and a sync are illegal: nothing is checked (kvcache.h).
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  check_cuda(cudaStreamIsCapturing(stream, &capture), "decode index check: cudaStreamIsCapturing");
  if (capture != cudaStreamCaptureStatusNone) return false;
  std::size_t total = 0;
  for (int i = 0; i < n; ++i) total += copies[i].row_bytes * static_cast<std::size_t>(copies[i].rows);
  if (total == 0) return true;
  thread_local PinnedBuffer staging;
  auto* pinned = static_cast<char*>(staging.reserve(total));
  std::size_t at = 0;
  for (int i = 0; i < n; ++i) {
    const DeviceRows& c = copies[i];
    if (c.rows == 0 || c.row_bytes == 0) continue;
    if (c.src_pitch_bytes >= static_cast<std::int64_t>(c.row_bytes)) {
      check_cuda(cudaMemcpy2DAsync(pinned + at, c.row_bytes, c.src, static_cast<std::size_t>(c.src_pitch_bytes),
                                   c.row_bytes, static_cast<std::size_t>(c.rows), cudaMemcpyDeviceToHost, stream),
                 "decode index check: cudaMemcpy2DAsync");
    } else {  // overlapping rows (a broadcast block_table): one copy per row
      for (std::int64_t r = 0; r < c.rows; ++r) {
        const char* row = static_cast<const char*>(c.src) + r * c.src_pitch_bytes;
        check_cuda(cudaMemcpyAsync(pinned + at + r * c.row_bytes, row, c.row_bytes, cudaMemcpyDeviceToHost, stream),
                   "decode index check: cudaMemcpyAsync");
      }
    }
    at += c.row_bytes * static_cast<std::size_t>(c.rows);
  }
  check_cuda(cudaStreamSynchronize(stream), "decode index check: cudaStreamSynchronize");
  at = 0;
  for (int i = 0; i < n; ++i) {
    const std::size_t bytes = copies[i].row_bytes * static_cast<std::size_t>(copies[i].rows);
    if (bytes) std::memcpy(copies[i].dst, pinned + at, bytes);
    at += bytes;
  }
  return true;
}

}  // namespace orchard::detail
