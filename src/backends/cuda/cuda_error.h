// The CUDA backend's one check of a CUDA runtime call's status (host code; CUDA translation
// units only: it needs cuda_runtime.h, which the CPU-only builds of the C++ tests do not have).
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "orchard/errors.h"

namespace orchard::cuda {

// Throws orchard::Error(kRuntime) naming `what` and the error when `err` is not cudaSuccess.
inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw Error(ErrorKind::kRuntime, std::string("CUDA error in ") + what + ": " + cudaGetErrorName(err) + " (" +
                                         cudaGetErrorString(err) + ")");
}

}  // namespace orchard::cuda
