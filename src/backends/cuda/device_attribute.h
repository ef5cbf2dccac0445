// A CUDA device attribute, queried once per (attribute, device) and cached: the launchers ask on
// every call (SM count, shared-memory opt-in), and cudaDeviceGetAttribute is not free.
#pragma once
#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>

namespace orchard::cuda {

// kAttr of `device`; 0 if unknown (the query failed, its error cleared; or a device index outside
// 0..63, which is not cached). Safe to call from several host threads.
template <cudaDeviceAttr kAttr>
inline int cached_device_attribute(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices] = {};
  const bool cacheable = device >= 0 && device < kMaxDevices;
  if (cacheable) {
    const int c = cached[device].load(std::memory_order_relaxed);
    if (c > 0) return c;
  }
  int value = 0;
  if (cudaDeviceGetAttribute(&value, kAttr, device) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  if (cacheable) cached[device].store(value, std::memory_order_relaxed);
  return value;
}

// The calling thread's current device; -1 if the query failed (its error cleared).
inline int current_device() {
  int device = -1;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  return device;
}

// The same for the calling thread's current device.
template <cudaDeviceAttr kAttr>
inline int current_device_attribute() {
  const int device = current_device();
  return device < 0 ? 0 : cached_device_attribute<kAttr>(device);
}

// The shared memory a block of the current device may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin),
// which picks the kernels' tile configurations, lowered to ORCHARD_CUDA_SMEM_OPTIN (bytes, read once)
// when that is set and smaller: a test switch that makes a larger GPU take the choices of a smaller
// one (A100: 166912, sm_86 / sm_89: 101376; with ORCHARD_SM90=0 on Hopper, whose own kernels need
// more) and raise what that GPU would raise.
// 0 when unknown (the query failed).
inline int smem_optin_limit(int device) {
  static const int cap = [] {
    const char* e = std::getenv("ORCHARD_CUDA_SMEM_OPTIN");
    return e != nullptr ? std::atoi(e) : 0;
  }();
  const int v = cached_device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device);
  return cap > 0 && cap < v ? cap : v;
}
inline int smem_optin_limit() {
  const int device = current_device();
  return device < 0 ? 0 : smem_optin_limit(device);
}

}  // namespace orchard::cuda
