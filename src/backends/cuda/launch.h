// Declarations shared by the CUDA backend's translation units: the per-
// instantiation launchers (defined in the generated flash_*.cu files) and the
// launch-error check.
#pragma once

#include <cstddef>
#include <string>

#include "orchard/config.h"
#include "orchard/errors.h"
#include "orchard/params.h"

namespace orchard::cuda {

// T is __nv_bfloat16 or __half; kD is the head-dim bucket (32..256).
template <typename T, int kD>
void run_flash_fwd(const FwdParams& params);
template <typename T, int kD>
void run_flash_bwd(const BwdParams& params);

// float32 inputs: SIMT kernels (exact fp32 arithmetic, no tensor cores).
void run_fwd_fp32(const FwdParams& params);
void run_bwd_fp32(const BwdParams& params);

// Dropout keep-mask output (b, hq, sq, sk) uint8, from the Philox definition alone.
void run_dropout_mask(const FwdParams& params);

// Workspace layout for the backward pass (each region 256-byte aligned).
struct BwdWorkspace {
  std::size_t d_offset = 0;         // float[b * hq * sq]: rowsum(dO * O)
  std::size_t dq_accum_offset = 0;  // float[b * hq * sq * d]: fp32 dQ atomics
  std::size_t bytes = 0;
};
ORCHARD_HOST_DEVICE BwdWorkspace bwd_workspace_layout(const FwdParams& p) {
  auto align = [](std::size_t n) { return (n + 255) / 256 * 256; };
  const std::size_t rows = static_cast<std::size_t>(p.b) * p.hq * p.sq;
  BwdWorkspace w;
  w.d_offset = 0;
  w.dq_accum_offset = align(rows * sizeof(float));
  w.bytes = w.dq_accum_offset + align(rows * p.d * sizeof(float));
  return w;
}

// Throws orchard::Error(kRuntime) if the last launch failed.
void check_launch(const char* what);

}  // namespace orchard::cuda
