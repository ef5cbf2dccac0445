#include "orchard/tensor_view.h"


namespace orchard {

std::string TensorView::describe() const {
  if (!defined()) return "<none>";
  auto join = [](const std::array<std::int64_t, kMaxRank>& values, int n) {
    std::string out;
    for (int i = 0; i < n; ++i) {
      if (i) out += ", ";
      out += std::to_string(values[i]);
    }
    return out;
  };
  std::string s = std::string(dtype_name(dtype)) + "[" + join(shape, ndim) + "] strides [" + join(strides, ndim) +
                  "] " + device_type_name(device.type);
  if (device.type != DeviceType::kCPU) {
    s += ':';
    s += std::to_string(device.index);
  }
  return s;
}

TensorView make_contiguous_view(void* data, DType dtype, Device device,
                                std::initializer_list<std::int64_t> shape) {
  TensorView v;
  v.data = data;
  v.dtype = dtype;
  v.device = device;
  v.ndim = static_cast<int>(shape.size());
  int i = 0;
  for (std::int64_t n : shape) v.shape[i++] = n;
  std::int64_t stride = 1;
  for (int d = v.ndim - 1; d >= 0; --d) {
    v.strides[d] = stride;
    stride *= v.shape[d];
  }
  return v;
}

}  // namespace orchard
