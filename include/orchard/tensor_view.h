// A non-owning, strided view of framework memory (what DLPack describes).
#pragma once

#include <array>
#include <cstdint>
#include <string>

#include "orchard/dtype.h"

namespace orchard {

inline constexpr int kMaxRank = 4;

struct TensorView {
  void* data = nullptr;  // address of element [0, 0, ...] (DLPack data + byte_offset)
  DType dtype = DType::kFloat32;
  Device device{};
  int ndim = -1;  // -1: "no tensor" (optional argument left out)
  std::array<std::int64_t, kMaxRank> shape{};
  std::array<std::int64_t, kMaxRank> strides{};  // in elements, may be 0 or negative

  bool defined() const { return ndim >= 0; }
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  std::int64_t size(int dim) const { return shape[dim]; }
  std::int64_t stride(int dim) const { return strides[dim]; }
  std::string describe() const;  // "bfloat16[2, 128, 8, 64] strides [..] cuda:0"
};

// Builds a view with row-major (contiguous) strides.
TensorView make_contiguous_view(void* data, DType dtype, Device device,
                                std::initializer_list<std::int64_t> shape);

}  // namespace orchard
