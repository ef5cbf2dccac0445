#include <thread>

#include "core/backend.h"
#include "orchard/attention.h"

#ifdef ORCHARD_WITH_OPENMP
#include <omp.h>
#endif
#ifdef ORCHARD_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#ifndef ORCHARD_VERSION
#define ORCHARD_VERSION "unknown"
#endif

namespace orchard {

BuildInfo build_info() {
  BuildInfo info;
  info.version = ORCHARD_VERSION;
#ifdef ORCHARD_WITH_OPENMP
  info.openmp = true;
  info.cpu_threads = omp_get_max_threads();
#else
  info.cpu_threads = 1;
#endif
  info.cpu_kernels = detail::cpu_kernel_features();
#ifdef ORCHARD_WITH_CUDA
  info.cuda_compiled = true;
  info.cuda_archs = ORCHARD_CUDA_ARCHS;
  int count = 0;
  if (cudaGetDeviceCount(&count) == cudaSuccess) {
    for (int i = 0; i < count; ++i) {
      cudaDeviceProp prop{};
      if (cudaGetDeviceProperties(&prop, i) == cudaSuccess)
        info.cuda_devices.push_back(std::string(prop.name) + " (sm_" + std::to_string(prop.major) +
                                    std::to_string(prop.minor) + ")");
    }
  } else {
    cudaGetLastError();  // clear the sticky "no device" error
  }
#endif
  return info;
}

}  // namespace orchard
