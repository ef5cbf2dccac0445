// Element types and device kinds understood by Orchard.
#pragma once

#include <cstddef>
#include <cstdint>

namespace orchard {

enum class DType : std::uint8_t {
  kFloat16,
  kBFloat16,
  kFloat32,
  kFloat64,
  kUInt8,  // dropout keep-mask, boolean attention masks and raw workspaces
  kInt32,  // varlen sequence offsets (cu_seqlens)
};

constexpr std::size_t dtype_size(DType t) {
  switch (t) {
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
    case DType::kFloat32: return 4;
    case DType::kFloat64: return 8;
    case DType::kUInt8: return 1;
    case DType::kInt32: return 4;
  }
  return 0;
}

constexpr const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
    case DType::kUInt8: return "uint8";
    case DType::kInt32: return "int32";
  }
  return "?";
}

// Where a tensor's memory lives. kCUDAHost is pinned host memory (DLPack
// kDLCUDAHost), kCUDAManaged is unified memory (kDLCUDAManaged).
enum class DeviceType : std::uint8_t { kCPU, kCUDA, kCUDAHost, kCUDAManaged };

constexpr const char* device_type_name(DeviceType t) {
  switch (t) {
    case DeviceType::kCPU: return "cpu";
    case DeviceType::kCUDA: return "cuda";
    case DeviceType::kCUDAHost: return "cuda_host";
    case DeviceType::kCUDAManaged: return "cuda_managed";
  }
  return "?";
}

struct Device {
  DeviceType type = DeviceType::kCPU;
  int index = 0;
  friend constexpr bool operator==(const Device&, const Device&) = default;
};

}  // namespace orchard
