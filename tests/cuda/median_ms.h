// CUDA-event timing shared by the device harnesses (tests/cuda/cuda_check.cu --bench,
// dev/cuda/sm80_bench.cu): the median of `iters` timed calls after 3 warm-ups.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace orchard_harness {

inline void check_event_call(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "CUDA error %s in median_ms: %s\n", what, cudaGetErrorString(e));
    std::exit(2);
  }
}

// f() on the default stream; ms.
template <typename F>
float median_ms(F&& f, int iters = 20) {
  cudaEvent_t a, b;
  check_event_call(cudaEventCreate(&a), "cudaEventCreate");
  check_event_call(cudaEventCreate(&b), "cudaEventCreate");
  for (int i = 0; i < 3; ++i) f();
  std::vector<float> t;
  for (int i = 0; i < iters; ++i) {
    check_event_call(cudaEventRecord(a), "cudaEventRecord");
    f();
    check_event_call(cudaEventRecord(b), "cudaEventRecord");
    check_event_call(cudaEventSynchronize(b), "cudaEventSynchronize");
    float ms;
    check_event_call(cudaEventElapsedTime(&ms, a, b), "cudaEventElapsedTime");
    t.push_back(ms);
  }
  std::sort(t.begin(), t.end());
  check_event_call(cudaEventDestroy(a), "cudaEventDestroy");
  check_event_call(cudaEventDestroy(b), "cudaEventDestroy");
  return t[t.size() / 2];
}

}  // namespace orchard_harness
